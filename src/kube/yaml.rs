//! YAML out: writes a document so that every reader reads back what was meant, YAML 1.1
//! readers included (kubectl and client-go via go-yaml, Argo CD, kustomize, PyYAML), which
//! take a plain `yes`, `off`, `1_000`, `12:30` or `2024-01-01` for a boolean, a number or a
//! timestamp. yaml_serde quotes only what YAML 1.2 would misread; this emitter quotes
//! every string that either version could read as anything but that string.
//!
//! Block style, two-space indents, sequences under a key at the key's indentation (the
//! layout yaml_serde and most Kubernetes tooling write). Plain where safe, single quotes
//! where a plain scalar could be misread, double quotes (with escapes) for control
//! characters, `|` literal blocks for multi-line strings.

use std::fmt::Write as _;

use yaml_serde::Value as Yaml;

/// What [`emit_document`] cannot write so that a reader reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    #[error("a mapping key that is not a scalar")]
    KeyNotScalar,
    #[error("a mapping key longer than {MAX_KEY} characters (YAML's limit)")]
    KeyTooLong,
    #[error("a collection where a scalar was expected")]
    NotScalar,
}

/// One document, without a `---` marker, ending in a newline.
pub fn emit_document(v: &Yaml) -> Result<String, EmitError> {
    let mut out = String::new();
    match v {
        Yaml::Mapping(m) if !m.is_empty() => mapping(&mut out, m, 0, false)?,
        Yaml::Sequence(s) if !s.is_empty() => sequence(&mut out, s, 0, false)?,
        Yaml::Tagged(t) => {
            out.push_str(&tag(&t.tag));
            after_indicator(&mut out, &t.value, 0, 0)?;
        }
        // At the start of a line, plain `---` and `...` are document markers.
        Yaml::String(s) if s.starts_with("---") || s.starts_with("...") => {
            double_quoted(&mut out, s);
            out.push('\n');
        }
        other => scalar(&mut out, other, 0)?,
    }
    Ok(out)
}

/// A tag as written. yaml_serde's `Display` prefixes a `!`, which turns the non-specific
/// tag `!` (`note: ! plain`) into `!!`, a shorthand with no suffix that no reader accepts.
/// The suffix is percent-encoded where YAML's tag characters (ns-tag-char, YAML 1.2
/// §5.6, less `#`, which libyaml's scanner refuses) do not allow a character: yaml_serde
/// decodes `%22` to `"` when reading.
fn tag(t: &yaml_serde::value::Tag) -> String {
    let shown = t.to_string();
    if shown == "!!" {
        return "!".to_owned();
    }
    let mut out = String::from("!");
    // Reading drops one `!` from the tag and compares without a second one (yaml_serde's
    // `parse_tag` and `nobang`): a suffix that itself starts with `!` needs one more.
    if shown[1..].starts_with('!') {
        out.push_str("%21");
    }
    for b in shown[1..].bytes() {
        if b.is_ascii_alphanumeric() || b"-;/?:@&=+$_.~*'()".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn mapping(
    out: &mut String,
    m: &yaml_serde::Mapping,
    at: usize,
    inline_first: bool,
) -> Result<(), EmitError> {
    for (i, (k, v)) in m.iter().enumerate() {
        if !(inline_first && i == 0) {
            indent(out, at);
        }
        key(out, k)?;
        out.push(':');
        // A sequence under a key sits at the key's indentation; a mapping two deeper.
        after_indicator(out, v, at, at + 2)?;
    }
    Ok(())
}

/// What follows `key:` or a tag: ` scalar`, or a block on the next lines.
fn after_indicator(
    out: &mut String,
    v: &Yaml,
    seq_at: usize,
    map_at: usize,
) -> Result<(), EmitError> {
    match v {
        Yaml::Mapping(m) if !m.is_empty() => {
            out.push('\n');
            mapping(out, m, map_at, false)
        }
        Yaml::Sequence(s) if !s.is_empty() => {
            out.push('\n');
            sequence(out, s, seq_at, false)
        }
        Yaml::Tagged(t) => {
            out.push(' ');
            out.push_str(&tag(&t.tag));
            after_indicator(out, &t.value, map_at, map_at)
        }
        other => {
            out.push(' ');
            scalar(out, other, map_at)
        }
    }
}

fn sequence(out: &mut String, s: &[Yaml], at: usize, inline_first: bool) -> Result<(), EmitError> {
    for (i, item) in s.iter().enumerate() {
        if !(inline_first && i == 0) {
            indent(out, at);
        }
        out.push('-');
        match item {
            Yaml::Mapping(m) if !m.is_empty() => {
                out.push(' ');
                mapping(out, m, at + 2, true)?;
            }
            Yaml::Sequence(s) if !s.is_empty() => {
                out.push(' ');
                sequence(out, s, at + 2, true)?;
            }
            other => after_indicator(out, other, at + 2, at + 2)?,
        }
    }
    Ok(())
}

/// The longest key written as `key: value`: YAML allows an implicit key of at most 1024
/// characters (libyaml refuses a longer one). Kubernetes keys are far shorter; a longer
/// one is an error rather than text no reader accepts.
const MAX_KEY: usize = 1024;

fn key(out: &mut String, k: &Yaml) -> Result<(), EmitError> {
    let mut text = String::new();
    match k {
        Yaml::String(s) if s.contains('\n') => double_quoted(&mut text, s),
        Yaml::String(s) => inline_string(&mut text, s),
        Yaml::Mapping(_) | Yaml::Sequence(_) | Yaml::Tagged(_) => {
            return Err(EmitError::KeyNotScalar)
        }
        other => {
            scalar(&mut text, other, 0)?;
            text.truncate(text.trim_end().len());
        }
    }
    if text.len() > MAX_KEY {
        return Err(EmitError::KeyTooLong);
    }
    out.push_str(&text);
    Ok(())
}

/// A scalar (or an empty collection) and its newline; `block_at` is where the lines of a
/// literal block go.
fn scalar(out: &mut String, v: &Yaml, block_at: usize) -> Result<(), EmitError> {
    match v {
        Yaml::Null => out.push_str("null"),
        Yaml::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Yaml::Number(n) if n.is_f64() => out.push_str(&float(n.as_f64().unwrap_or(f64::NAN))),
        Yaml::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Yaml::String(s) if s.contains('\n') => {
            if !literal(out, s, block_at) {
                double_quoted(out, s);
            }
        }
        Yaml::String(s) => inline_string(out, s),
        Yaml::Mapping(m) if m.is_empty() => out.push_str("{}"),
        Yaml::Sequence(s) if s.is_empty() => out.push_str("[]"),
        Yaml::Mapping(_) | Yaml::Sequence(_) | Yaml::Tagged(_) => return Err(EmitError::NotScalar),
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(())
}

/// A float as both YAML versions read it: YAML 1.1 needs a `.` in the mantissa and a
/// sign on the exponent (`1.0e+100`, not `1e100`, which it reads as a string).
fn float(f: f64) -> String {
    if f.is_nan() {
        return ".nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { ".inf" } else { "-.inf" }.into();
    }
    let s = format!("{f:?}");
    let (mantissa, exponent) = match s.split_once('e') {
        Some((m, e)) => (m.to_owned(), Some(e.to_owned())),
        None => (s, None),
    };
    let mantissa = if mantissa.contains('.') {
        mantissa
    } else {
        format!("{mantissa}.0")
    };
    match exponent {
        Some(e) if e.starts_with('-') => format!("{mantissa}e{e}"),
        Some(e) => format!("{mantissa}e+{e}"),
        None => mantissa,
    }
}

fn inline_string(out: &mut String, s: &str) {
    if is_plain_safe(s) {
        out.push_str(s);
    } else if s.chars().all(single_quotable) {
        out.push('\'');
        out.push_str(&s.replace('\'', "''"));
        out.push('\'');
    } else {
        double_quoted(out, s);
    }
}

fn single_quotable(c: char) -> bool {
    !(escaped(c) || matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}'))
}

/// Characters written only as a `\u` escape in a double-quoted scalar: those outside
/// YAML's printable set (C0 and C1 controls, DEL, U+FFFE and U+FFFF; a reader refuses them
/// anywhere in a stream), and the byte-order mark.
fn escaped(c: char) -> bool {
    c.is_control() || matches!(c, '\u{feff}' | '\u{fffe}' | '\u{ffff}')
}

fn double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{85}' => out.push_str("\\N"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            c if escaped(c) => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A `|` literal block, when the string can be one exactly: printable lines, the first
/// content line not starting with whitespace (it sets the block's indentation), no line
/// of whitespace only. Returns false (writing nothing) otherwise.
fn literal(out: &mut String, s: &str, at: usize) -> bool {
    let body = s.trim_end_matches('\n');
    let trailing = s.len() - body.len();
    let lines: Vec<&str> = body.split('\n').collect();
    let printable = s
        .chars()
        .all(|c| c == '\n' || c == '\t' || single_quotable(c));
    let first_ok = lines
        .first()
        .is_some_and(|l| !l.is_empty() && !l.starts_with([' ', '\t']));
    let no_blank_space = lines
        .iter()
        .all(|l| l.is_empty() || !l.trim_matches([' ', '\t']).is_empty());
    if !(printable && first_ok && no_blank_space) {
        return false;
    }
    out.push_str(match trailing {
        0 => "|-",
        1 => "|",
        _ => "|+",
    });
    out.push('\n');
    for line in &lines {
        if !line.is_empty() {
            indent(out, at.max(1));
            out.push_str(line);
        }
        out.push('\n');
    }
    for _ in 1..trailing {
        out.push('\n');
    }
    true
}

/// Whether `s` can be written as a plain scalar and read back as this string by YAML 1.1
/// and 1.2 readers alike.
pub fn is_plain_safe(s: &str) -> bool {
    let bytes = s.as_bytes();
    let Some(&first) = bytes.first() else {
        return false;
    };
    if s.trim() != s || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return false;
    }
    if b"-?:,[]{}#&*!|>'\"%@`".contains(&first) {
        // `-`, `?` and `:` may begin a plain scalar when a non-space follows (`--flag`).
        let next_ok = bytes.get(1).is_some_and(|b| *b != b' ');
        if !(matches!(first, b'-' | b'?' | b':') && next_ok) {
            return false;
        }
    }
    // At the start of a line (a key under a tag or at the top level), `---` and `...`
    // are document markers.
    if s.starts_with("---") || s.starts_with("...") {
        return false;
    }
    if s.contains(": ") || s.contains(" #") || s.ends_with(':') {
        return false;
    }
    !resolves_to_non_string(s)
}

/// Whether a plain scalar `s` would be read as a null, a boolean, a number, a timestamp
/// or a merge key by a YAML 1.1 or 1.2 (core schema) reader. Errs on the side of yes: a
/// quoted string is never misread.
pub fn resolves_to_non_string(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "~", "null", "Null", "NULL", "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO",
        "true", "True", "TRUE", "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF",
        "<<", "=",
    ];
    if WORDS.contains(&s) {
        return true;
    }
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let lower = body.to_ascii_lowercase();
    if lower == ".inf" || lower == ".nan" {
        return true;
    }
    // Ints (decimal, 0x, 0o, 0b, 1.1 octal `017`, `1_000`, sexagesimal `1:30`), floats
    // (`1.5`, `1e3`, `.5`, `1:30.5`) and timestamps (`2024-01-01`, `2001-12-14t21:59:43z`)
    // all begin with a digit or a dot and use only these characters.
    body.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && body
            .chars()
            .all(|c| c.is_ascii_hexdigit() || "xXoObB_:.+-tTzZ".contains(c) || c == ' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_strings_are_quoted() {
        for s in [
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "Y",
            "NO",
            "true",
            "False",
            "1_000",
            "12:30",
            "2024-01-01",
            "0x1f",
            "0o7",
            "017",
            "~",
            "null",
            "",
            ".inf",
            "-.inf",
            ".NaN",
            "1.5",
            "1e3",
            "1.4.2",
            "10.0.0.1",
            "<<",
            "=",
            "-1",
            "+1",
            "190:20:30",
        ] {
            assert!(!is_plain_safe(s), "{s:?} must be quoted");
        }
    }

    #[test]
    fn ordinary_strings_stay_plain() {
        for s in [
            "web",
            "example/web:1.4.2",
            "--listen=[::]:9900",
            "/drain",
            "250m",
            "256Mi",
            "RuntimeDefault",
            "a b",
            "ELB-HealthChecker,kube-probe",
            "x-lameduck-token",
        ] {
            assert!(is_plain_safe(s), "{s:?} can be plain");
        }
        for s in [
            "- a", "a: b", "a #b", "key:", "*ref", "&a", "!t", "'q", " lead", "tab\t",
        ] {
            assert!(!is_plain_safe(s), "{s:?} must be quoted");
        }
    }

    #[test]
    fn floats_are_floats_in_yaml_1_1() {
        assert_eq!(float(0.5), "0.5");
        assert_eq!(float(1.0), "1.0");
        assert_eq!(float(1e100), "1.0e+100");
        assert_eq!(float(1.5e-7), "1.5e-7");
        assert_eq!(float(f64::INFINITY), ".inf");
        for f in [0.5, 1.0, 1e100, 1.5e-7, -2.25] {
            let back: f64 = yaml_serde::from_str(&float(f)).unwrap();
            assert_eq!(back, f);
        }
    }

    /// The non-specific tag `!` (a string, whatever it looks like), tags whose characters
    /// need escapes, and a document that is the string `---`. Before: written as `!!`,
    /// with `"` unescaped (no YAML reader accepts either), and as a plain `---`, read back
    /// as an empty document; a key starting `...` under a tag, written at column 0, where
    /// it ended the document; a tag whose suffix starts with `!`, which lost it (all found by
    /// fuzz/fuzz_targets/yaml.rs).
    #[test]
    fn tags_and_markers_round_trip() {
        for text in [
            "!\n",
            "note: ! plain\n",
            "- ! 12\n",
            "a: !custom x\n",
            "!a:%24%224 l\n",
            "!a%21b%2C%25 x\n",
            "!a:$%23l x\n",
            "'---'\n",
            "'... x'\n",
            "!t\n'...  k': v\n",
            "!t\n'---': v\n",
            "!%21!; null\n",
            "!%21%21; x\n",
            "- !%21!a%21 x\n",
        ] {
            let doc: Yaml = yaml_serde::from_str(text).unwrap();
            let out = emit_document(&doc).unwrap();
            let back: Yaml = yaml_serde::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
            assert_eq!(back, doc, "{text:?} -> {out:?}");
        }
    }

    /// A key too long for YAML's implicit-key form is refused, not written unreadable.
    /// Before: `lameduck inject` wrote it (found by fuzz/fuzz_targets/yaml.rs).
    #[test]
    fn overlong_keys_are_refused() {
        let mut m = yaml_serde::Mapping::new();
        m.insert(Yaml::String("k".repeat(MAX_KEY)), Yaml::Null);
        let text = emit_document(&Yaml::Mapping(m.clone())).unwrap();
        assert_eq!(
            yaml_serde::from_str::<Yaml>(&text).unwrap(),
            Yaml::Mapping(m)
        );
        let mut m = yaml_serde::Mapping::new();
        m.insert(Yaml::String("k".repeat(MAX_KEY + 1)), Yaml::Null);
        assert!(emit_document(&Yaml::Mapping(m)).is_err());
    }

    #[test]
    fn strings_round_trip() {
        let strings = [
            "yes",
            "it's",
            "tab\there",
            "line\nline\n",
            "no newline\nat end",
            "kept\n\n\n",
            "  indented\nfirst",
            "blank\n   \nline",
            "\u{2028}",
            "ctl\u{1}",
            "é",
            // Outside YAML's printable set, not controls: a reader refuses them unescaped.
            "non\u{ffff}char\u{fffe}",
            "\u{ffff}",
        ];
        for s in strings {
            let mut m = yaml_serde::Mapping::new();
            m.insert(Yaml::String("k".into()), Yaml::String(s.into()));
            m.insert(
                Yaml::String("list".into()),
                Yaml::Sequence(vec![Yaml::String(s.into())]),
            );
            let doc = Yaml::Mapping(m);
            let text = emit_document(&doc).unwrap();
            let back: Yaml = yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(back, doc, "{text}");
        }
    }
}
