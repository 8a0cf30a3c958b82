//! Manifests: the YAML-stream rewriting behind `lameduck inject`. Every opted-in pod
//! template in a multi-document stream is injected (through [`super::template_patch`]);
//! documents nothing changes are copied byte for byte, and a Service that would bypass the
//! proxy by targeting the app's port by number is refused.

use json_patch::{Patch, PatchOperation};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value as Json;
use yaml_serde::Value as Yaml;

use super::annotations::{
    wants_injection, Settings, ANN_ALLOW_DEGRADED, ANN_DEGRADED, INJECT_LABEL,
};
use super::template_injection;

/// A YAML stream with every opted-in pod template injected.
#[derive(Debug, PartialEq)]
pub struct Rewritten {
    pub yaml: String,
    /// Each names its document: `document 2 (Deployment web): …`.
    pub warnings: Vec<String>,
    /// How many pod templates were injected.
    pub injected: usize,
}

/// A document that could not be read or injected.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("document {index} ({what}): {reason}")]
pub struct ManifestError {
    /// 1-based position in the stream.
    pub index: usize,
    /// `Kind name`, or what is known of it.
    pub what: String,
    pub reason: String,
}

/// Where a kind keeps its pod template (a JSON pointer), by API group and kind.
pub fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    Some(match (group, kind) {
        ("", "Pod") => "",
        ("", "PodTemplate") => "/template",
        ("", "ReplicationController") => "/spec/template",
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => "/spec/template",
        ("batch", "Job") => "/spec/template",
        ("batch", "CronJob") => "/spec/jobTemplate/spec/template",
        ("argoproj.io", "Rollout") => "/spec/template",
        _ => return None,
    })
}

/// Reads a multi-document YAML stream (`kind: List` included), injects every pod template
/// that opted in (with `all`: every one not labelled `"false"`), and writes the stream
/// back. A document injection does not change is copied byte for byte (comments, quoting,
/// anchors and all); a changed one keeps the comments above it and is written with every
/// string quoted that a YAML 1.1 reader (kubectl, Argo CD, kustomize) could read as
/// something else ([`crate::kube::yaml::emit_document`]).
///
/// Refused: a document that cannot be injected, and a Service that targets an injected
/// app's port by number (it would reach the app directly), unless that pod template allows
/// a degraded injection.
pub fn inject_manifests(
    input: &str,
    settings: &Settings,
    all: bool,
) -> Result<Rewritten, ManifestError> {
    // Each document's own text, so unchanged ones can be copied as they were.
    let mut docs = read_documents(input)?;
    let numbers = document_numbers(&docs);
    let mut apps = Vec::new();
    // (document index, warning): sorted by document at the end.
    let mut warnings: Vec<(usize, String)> = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        let index = numbers[i];
        if doc.value.is_null() {
            continue;
        }
        let what = describe(&doc.value);
        let mut found = Vec::new();
        rewrite_object(
            &mut doc.value,
            "",
            settings,
            all,
            &mut found,
            &mut |warning| warnings.push((index, format!("document {index} ({what}): {warning}"))),
        )
        .map_err(|(what, reason)| ManifestError {
            index,
            what,
            reason,
        })?;
        apps.extend(found.into_iter().map(|app| (i, app)));
    }

    check_services(&mut docs, &numbers, &apps, &mut warnings)?;
    let yaml = write_documents(&docs, &numbers, input.len() * 2)?;
    warnings.sort_by_key(|(index, _)| *index);
    Ok(Rewritten {
        yaml,
        warnings: warnings.into_iter().map(|(_, w)| w).collect(),
        injected: apps.len(),
    })
}

/// The stream's documents, each with its own text; refused: one that is not YAML.
fn read_documents(input: &str) -> Result<Vec<Doc<'_>>, ManifestError> {
    let mut docs: Vec<Doc> = Vec::new();
    for text in split_documents(input) {
        let index = docs.len() + 1;
        let unreadable = |e: yaml_serde::Error| ManifestError {
            index,
            what: "unreadable".into(),
            reason: e.to_string(),
        };
        let mut parsed = Vec::new();
        let (header, body) = document_header(text);
        let has_marker = header.lines().any(|l| l.starts_with("---"));
        // Comments alone are no document (a YAML reader sees none there).
        let content = has_marker || !body.trim().is_empty();
        for de in
            yaml_serde::Deserializer::from_str(text).take(if content { usize::MAX } else { 0 })
        {
            let mut doc = Yaml::deserialize(de).map_err(unreadable)?;
            // `<<: *anchor` merge keys, which Kubernetes' YAML reader applies too: a
            // container written with one is seen, and written back, whole.
            doc.apply_merge().map_err(unreadable)?;
            parsed.push(doc);
        }
        match parsed.len() {
            0 => docs.push(Doc {
                text,
                original: None,
                value: Yaml::Null,
            }),
            1 => {
                let value = parsed.pop().expect("one");
                docs.push(Doc {
                    text,
                    original: Some(value.clone()),
                    value,
                })
            }
            _ => {
                return Err(ManifestError {
                    index,
                    what: "unreadable".into(),
                    reason: "cannot tell where its documents begin: separate them with --- \
                             lines"
                        .into(),
                })
            }
        }
    }
    Ok(docs)
}

/// Each document's number as a YAML reader counts them: text with no document in it
/// (comments before the first ---) has no number of its own.
fn document_numbers(docs: &[Doc]) -> Vec<usize> {
    let mut numbers = Vec::with_capacity(docs.len());
    let mut n = 0;
    for d in docs {
        if d.original.is_some() {
            n += 1;
        }
        numbers.push(n);
    }
    numbers
}

/// A Service that targets an injected app's port by number bypasses lameduck: refused,
/// unless that app's pod template allows a degraded injection (then it is marked
/// `lameduck.io/degraded`, with a warning).
fn check_services(
    docs: &mut [Doc],
    numbers: &[usize],
    apps: &[(usize, InjectedApp)],
    warnings: &mut Vec<(usize, String)>,
) -> Result<(), ManifestError> {
    let mut degraded: Vec<(usize, String, String)> = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        if doc.value.is_null() {
            continue;
        }
        let index = numbers[i];
        for (app, problem) in service_problems(&doc.value, apps.iter().map(|(_, a)| a)) {
            let (app_doc, app) = &apps[app];
            let message = format!("document {index} ({}): {problem}", describe(&doc.value));
            if !app.allow_degraded {
                return Err(ManifestError {
                    index,
                    what: describe(&doc.value),
                    reason: format!(
                        "{problem} (or set annotation {ANN_ALLOW_DEGRADED}: \"true\" on the pod \
                         template of document {} ({}) to inject it anyway, marked \
                         {ANN_DEGRADED})",
                        numbers[*app_doc],
                        describe(&docs[*app_doc].value)
                    ),
                });
            }
            warnings.push((index, format!("{message} (allowed: {ANN_ALLOW_DEGRADED})")));
            degraded.push((
                *app_doc,
                app.pointer.clone(),
                format!(
                    "Service {} targets port {} by number, reaching the app directly",
                    str_at(&doc.value, &["metadata", "name"]).unwrap_or("?"),
                    app.port
                ),
            ));
        }
    }
    for (doc, pointer, what) in degraded {
        let template = yaml_pointer_mut(&mut docs[doc].value, &pointer).expect("found before");
        note_degraded(template, &what);
    }

    Ok(())
}

/// The stream written back: unchanged documents as they were read, changed ones emitted
/// under the comments that were above them.
fn write_documents(
    docs: &[Doc],
    numbers: &[usize],
    capacity: usize,
) -> Result<String, ManifestError> {
    let mut yaml = String::with_capacity(capacity);
    for (i, doc) in docs.iter().enumerate() {
        if doc.original.as_ref() == Some(&doc.value) || doc.original.is_none() {
            yaml.push_str(doc.text);
            continue;
        }
        let (header, _) = document_header(doc.text);
        let body =
            crate::kube::yaml::emit_document(&doc.value).map_err(|reason| ManifestError {
                index: numbers[i],
                what: describe(&doc.value),
                reason: format!("cannot be written back as YAML: {reason}"),
            })?;
        if !yaml.is_empty() && !yaml.ends_with('\n') {
            yaml.push('\n');
        }
        let has_marker = header.lines().any(|l| l.starts_with("---"));
        if i > 0 && !has_marker && !yaml.is_empty() {
            yaml.push_str("---\n");
        }
        yaml.push_str(header);
        yaml.push_str(&body);
    }
    Ok(yaml)
}

/// One document of the input stream: its text, as read, and as rewritten.
struct Doc<'a> {
    text: &'a str,
    /// `None`: text with no document in it (comments only).
    original: Option<Yaml>,
    value: Yaml,
}

/// Splits a YAML stream into the text of each document: a new one begins at a `---` line
/// (a directives-end marker: `---` alone or followed by a space) and after a `...` line.
/// Such lines cannot occur inside a document's content (YAML 1.2 §9.1.4 forbids them at
/// the start of a line), so the split is exact. Comments and `%` directives before a
/// `---` belong to the document it starts. The pieces concatenate to the input.
pub fn split_documents(input: &str) -> Vec<&str> {
    let is_marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    let mut pieces = Vec::new();
    let (mut start, mut pos) = (0, 0);
    // Whether the current piece has content, or a `---` of its own, yet.
    let (mut content, mut marker) = (false, false);
    for line in input.split_inclusive('\n') {
        if is_marker(line, "---") {
            if content || marker {
                pieces.push(&input[start..pos]);
                start = pos;
                content = false;
            }
            marker = true;
        } else {
            let t = line.trim();
            if !(t.is_empty() || t.starts_with('#') || t.starts_with('%')) {
                content = true;
            }
        }
        pos += line.len();
        if is_marker(line, "...") {
            pieces.push(&input[start..pos]);
            start = pos;
            (content, marker) = (false, false);
        }
    }
    if start < input.len() || pieces.is_empty() {
        pieces.push(&input[start..]);
    }
    pieces
}

/// The lines at the top of a document's text that carry no content (its `---` marker
/// with at most a comment, blank lines and comments), kept above a rewritten document.
fn document_header(text: &str) -> (&str, &str) {
    let mut end = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        let rest = line.get(3..).unwrap_or_default().trim();
        let marker_only = line.starts_with("---") && (rest.is_empty() || rest.starts_with('#'));
        // A bare CR is a line break to YAML: what follows it may be content.
        let bare_cr = line
            .trim_end_matches('\n')
            .trim_end_matches('\r')
            .contains('\r');
        if bare_cr {
            break;
        }
        if t.is_empty() || t.starts_with('#') || t.starts_with('%') || marker_only {
            end += line.len();
        } else {
            break;
        }
    }
    text.split_at(end)
}

/// Adds `what` to a pod template's `lameduck.io/degraded` annotation.
fn note_degraded(template: &mut Yaml, what: &str) {
    let Some(meta) = template.get_mut("metadata").and_then(Yaml::as_mapping_mut) else {
        return;
    };
    let annotations = meta
        .entry(Yaml::String("annotations".into()))
        .or_insert_with(|| Yaml::Mapping(Default::default()));
    let Some(annotations) = annotations.as_mapping_mut() else {
        return;
    };
    let entry = annotations
        .entry(Yaml::String(ANN_DEGRADED.into()))
        .or_insert_with(|| Yaml::String(String::new()));
    if let Yaml::String(s) = entry {
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str(what);
    }
}

/// What the numeric-targetPort check needs to know about an injected template.
struct InjectedApp {
    namespace: Option<String>,
    labels: Vec<(String, String)>,
    /// The app's port number, and the name that moved to the proxy.
    port: i32,
    moved_name: Option<String>,
    /// Where the template is in its document (a JSON pointer).
    pointer: String,
    allow_degraded: bool,
}

type Located = (String, String);

/// Injects into one object (recursing into `List` items); `base` is the object's JSON
/// pointer in its document.
fn rewrite_object(
    doc: &mut Yaml,
    base: &str,
    settings: &Settings,
    all: bool,
    apps: &mut Vec<InjectedApp>,
    warn: &mut dyn FnMut(String),
) -> Result<(), Located> {
    let api_version = str_at(doc, &["apiVersion"]).unwrap_or_default().to_owned();
    let kind = str_at(doc, &["kind"]).unwrap_or_default().to_owned();
    if kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()) {
        let Some(items) = doc.get_mut("items").and_then(Yaml::as_sequence_mut) else {
            return Ok(());
        };
        for (i, item) in items.iter_mut().enumerate() {
            let what = describe(item);
            rewrite_object(
                item,
                &format!("{base}/items/{i}"),
                settings,
                all,
                apps,
                &mut |w| warn(format!("item {} ({what}): {w}", i + 1)),
            )
            .map_err(|(inner, reason)| (format!("{kind}, item {} {inner}", i + 1), reason))?;
        }
        return Ok(());
    }
    let Some(pointer) = template_pointer(&api_version, &kind) else {
        return Ok(());
    };
    let what = describe(doc);
    let fail = |reason: String| (what.clone(), reason);
    let Some(template) = yaml_pointer_mut(doc, pointer) else {
        return Ok(()); // e.g. a Rollout with workloadRef instead of a template
    };
    let template_json: Json = serde_json::to_value(&*template)
        .map_err(|e| fail(format!("not representable as JSON: {e}")))?;
    let meta: ObjectMeta = template_json
        .get("metadata")
        .map(|m| ObjectMeta::deserialize(m).map_err(|e| fail(format!("bad pod metadata: {e}"))))
        .transpose()?
        .unwrap_or_default();
    if !wants_injection(&meta, all) {
        let object_labelled = str_at(doc, &["metadata", "labels", INJECT_LABEL]) == Some("true");
        if object_labelled && !pointer.is_empty() {
            warn(format!(
                "the label {INJECT_LABEL} is on the {kind} itself, not on its pod template \
                 ({pointer}/metadata/labels): not injected"
            ));
        }
        return Ok(());
    }
    let (patch, injection) =
        template_injection(&template_json, settings).map_err(|e| fail(e.to_string()))?;
    for w in injection.warnings {
        warn(w);
    }
    let Some(wiring) = injection.wiring.filter(|_| !patch.0.is_empty()) else {
        return Ok(());
    };
    let template = yaml_pointer_mut(doc, pointer).expect("found above");
    apply_to_yaml(template, &patch).map_err(|e| fail(e.to_string()))?;

    // Remember where the app listens now, for the Service check.
    apps.push(InjectedApp {
        namespace: str_at(doc, &["metadata", "namespace"]).map(str::to_owned),
        labels: meta.labels.unwrap_or_default().into_iter().collect(),
        port: wiring.app_port,
        moved_name: wiring.moved_name,
        pointer: format!("{base}{pointer}"),
        // The pod's own annotation, as before `Wiring` (a `--sidecar-default` for it does
        // not waive this check).
        allow_degraded: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_ALLOW_DEGRADED))
            .is_some_and(|v| v.trim() == "true"),
    });
    Ok(())
}

/// For a Service whose selector picks an injected template but which targets the app's
/// port by number (that still reaches the app directly): the app's index in `apps` and
/// what is wrong, naming the fix.
fn service_problems<'a>(
    doc: &Yaml,
    apps: impl Iterator<Item = &'a InjectedApp>,
) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    if str_at(doc, &["kind"]) != Some("Service") || str_at(doc, &["apiVersion"]) != Some("v1") {
        return out;
    }
    let namespace = str_at(doc, &["metadata", "namespace"]);
    let Some(selector) = doc
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(Yaml::as_mapping)
    else {
        return out;
    };
    if selector.is_empty() {
        return out;
    }
    let Some(ports) = doc
        .get("spec")
        .and_then(|s| s.get("ports"))
        .and_then(Yaml::as_sequence)
    else {
        return out;
    };
    for (i, app) in apps.enumerate() {
        if app.namespace.as_deref() != namespace {
            continue;
        }
        let selects = selector.iter().all(|(k, v)| {
            app.labels
                .iter()
                .any(|(lk, lv)| Some(lk.as_str()) == k.as_str() && Some(lv.as_str()) == v.as_str())
        });
        if !selects {
            continue;
        }
        for port in ports {
            let target = port.get("targetPort").or_else(|| port.get("port"));
            let number = match target {
                Some(Yaml::Number(n)) => n.as_i64(),
                Some(Yaml::String(s)) => s.parse::<i64>().ok(),
                _ => None,
            };
            if number == Some(i64::from(app.port)) {
                let label = match (port.get("name").and_then(Yaml::as_str), port.get("port")) {
                    (Some(n), _) => format!("port {n}"),
                    (None, Some(Yaml::Number(p))) => format!("port {p}"),
                    _ => "a port".to_owned(),
                };
                let fix = match &app.moved_name {
                    Some(n) => format!("use targetPort: {n}"),
                    None => "name the app's port and use that name as targetPort".to_owned(),
                };
                out.push((
                    i,
                    format!(
                        "{label} targets {} by number: that reaches the app \
                         directly, bypassing lameduck (a numeric targetPort cannot be moved to \
                         the proxy); {fix}",
                        app.port
                    ),
                ));
            }
        }
    }
    out
}

fn describe(doc: &Yaml) -> String {
    let kind = str_at(doc, &["kind"]).unwrap_or("no kind");
    match str_at(doc, &["metadata", "name"]) {
        Some(name) => format!("{kind} {name}"),
        None => kind.to_owned(),
    }
}

fn str_at<'a>(doc: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(doc, |v, k| v.get(k))?.as_str()
}

fn yaml_pointer_mut<'a>(doc: &'a mut Yaml, pointer: &str) -> Option<&'a mut Yaml> {
    pointer
        .split('/')
        .skip(1)
        .try_fold(doc, |v, k| v.get_mut(k))
}

/// Applies a JSON Patch of `add`, `remove` and `replace` operations (all that
/// [`json_patch::diff`] produces) to a YAML value in place, keeping the order of mapping
/// keys, which a round trip through JSON would sort.
pub fn apply_to_yaml(doc: &mut Yaml, patch: &Patch) -> Result<(), PatchError> {
    for op in &patch.0 {
        let (path, value) = match op {
            PatchOperation::Add(o) => (&o.path, Some(&o.value)),
            PatchOperation::Replace(o) => (&o.path, Some(&o.value)),
            PatchOperation::Remove(o) => (&o.path, None),
            other => return Err(PatchError::Unsupported(other.to_string())),
        };
        let mut value = value
            .map(yaml_serde::to_value)
            .transpose()
            .map_err(PatchError::Value)?;
        if let Some(v) = &mut value {
            name_first(v);
        }
        let tokens: Vec<String> = path.tokens().map(|t| t.decoded().into_owned()).collect();
        let Some((last, parents)) = tokens.split_last() else {
            *doc = value.unwrap_or(Yaml::Null);
            continue;
        };
        let parent = parents
            .iter()
            .try_fold(&mut *doc, |v, k| match v {
                Yaml::Mapping(m) => m.get_mut(k.as_str()),
                Yaml::Sequence(s) => k.parse::<usize>().ok().and_then(|i| s.get_mut(i)),
                _ => None,
            })
            .ok_or_else(|| PatchError::NoPath(path.to_string()))?;
        let missing = || PatchError::NoPath(path.to_string());
        match (parent, op, value) {
            (Yaml::Mapping(m), PatchOperation::Remove(_), _) => {
                m.shift_remove(last.as_str()).ok_or_else(missing)?;
            }
            (Yaml::Mapping(m), PatchOperation::Replace(_), Some(v)) => {
                *m.get_mut(last.as_str()).ok_or_else(missing)? = v;
            }
            (Yaml::Mapping(m), _, Some(v)) => {
                m.insert(Yaml::String(last.clone()), v);
            }
            (Yaml::Sequence(s), op, v) => {
                let index = if last == "-" {
                    s.len()
                } else {
                    last.parse::<usize>().map_err(|_| missing())?
                };
                match (op, v) {
                    (PatchOperation::Add(_), Some(v)) if index <= s.len() => s.insert(index, v),
                    (PatchOperation::Replace(_), Some(v)) if index < s.len() => s[index] = v,
                    (PatchOperation::Remove(_), _) if index < s.len() => {
                        s.remove(index);
                    }
                    _ => return Err(missing()),
                }
            }
            _ => return Err(missing()),
        }
    }
    Ok(())
}

/// Why a patch could not be applied to a YAML document (a bug: [`json_patch::diff`] made it).
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("unsupported patch operation {0}")]
    Unsupported(String),
    #[error("patch value: {0}")]
    Value(yaml_serde::Error),
    #[error("patch path {0} does not exist")]
    NoPath(String),
}

/// Moves `name` to the front of every mapping in a value that came through JSON (whose
/// keys are sorted), so an added container reads the way people write them.
fn name_first(v: &mut Yaml) {
    match v {
        Yaml::Mapping(m) => {
            if let Some(name) = m.shift_remove("name") {
                let rest = std::mem::take(m);
                m.insert(Yaml::String("name".into()), name);
                m.extend(rest);
            }
            m.values_mut().for_each(name_first);
        }
        Yaml::Sequence(s) => s.iter_mut().for_each(name_first),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A comment line with a bare CR in it: YAML reads what follows the CR as content, so
    /// it is not kept above the rewritten document as well. Before: the key was written
    /// twice and the output refused as a duplicate key (found by fuzz/fuzz_targets/manifest.rs).
    #[test]
    fn a_bare_cr_ends_the_comment_header() {
        let input = "# note\rextra: v\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:\n    \
                     lameduck.io/inject: \"true\"\nspec:\n  containers:\n  - name: app\n    image: a:1\n    \
                     ports:\n    - name: http\n      containerPort: 5000\n";
        let out = inject_manifests(input, &Settings::default(), false).unwrap();
        assert_eq!(out.injected, 1);
        assert_eq!(out.yaml.matches("extra: v").count(), 1, "{}", out.yaml);
        let again = inject_manifests(&out.yaml, &Settings::default(), false).unwrap();
        assert_eq!(again.yaml, out.yaml);
    }

    #[test]
    fn documents_split_where_a_reader_splits_them() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[""]),
            ("a: 1\n", &["a: 1\n"]),
            ("# c\n---\na: 1\n", &["# c\n---\na: 1\n"]),
            ("%YAML 1.1\n---\na: 1\n", &["%YAML 1.1\n---\na: 1\n"]),
            ("---\n---\na: 1\n", &["---\n", "---\na: 1\n"]),
            ("a: 1\n# c\n---\nb: 2\n", &["a: 1\n# c\n", "---\nb: 2\n"]),
            ("---\na: 1\n---\nb: 2", &["---\na: 1\n", "---\nb: 2"]),
            ("a: |\n  ---\n  x\n", &["a: |\n  ---\n  x\n"]),
            ("a: 1\n...\nb: 2\n", &["a: 1\n...\n", "b: 2\n"]),
            ("--- # c\na: 1\n---x: 1\n", &["--- # c\na: 1\n---x: 1\n"]),
        ];
        for (input, pieces) in cases {
            assert_eq!(split_documents(input), *pieces, "{input:?}");
            assert_eq!(split_documents(input).concat(), *input);
        }
    }

    #[test]
    fn template_kinds() {
        assert_eq!(
            template_pointer("apps/v1", "Deployment"),
            Some("/spec/template")
        );
        assert_eq!(
            template_pointer("batch/v1", "CronJob"),
            Some("/spec/jobTemplate/spec/template")
        );
        assert_eq!(template_pointer("v1", "Pod"), Some(""));
        assert_eq!(
            template_pointer("argoproj.io/v1alpha1", "Rollout"),
            Some("/spec/template")
        );
        assert_eq!(template_pointer("v1", "Service"), None);
        assert_eq!(template_pointer("example.com/v1", "Deployment"), None);
    }
}
