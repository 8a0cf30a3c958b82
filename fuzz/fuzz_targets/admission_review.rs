//! The webhook's pure part (src/kube/webhook.rs `review_of`): request body bytes in, the
//! AdmissionReview to answer with out.
//!
//! Never panics. An answer is an `admission.k8s.io/v1` AdmissionReview whose response
//! carries the request's uid and `allowed`; a JSON Patch in it is valid base64 and applies
//! to the object the API server sent (or the pod could never be created), and the patched
//! pod, reviewed again, is allowed with no patch (injected once).
#![no_main]

use base64::Engine as _;
use lameduck::kube::inject::Settings;
use lameduck::kube::webhook::review_of;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value as Json};

fuzz_target!(|data: &[u8]| {
    let settings = Settings {
        drain_token: Some("0123456789abcdef0123456789abcdef".into()),
        ..Settings::default()
    };
    let Ok((answer, _subject)) = review_of(data, &settings) else {
        return;
    };
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    let response = &answer["response"];
    assert!(response["uid"].is_string(), "the uid comes back");
    let allowed = response["allowed"].as_bool().expect("allowed is a boolean");
    // serde skips the members it does not read without checking their UTF-8 or escapes, so
    // a body the review accepts may not be a JSON value. Invalid UTF-8 there can be
    // replaced (those members are ignored anyway); a body still not JSON is left there.
    let request = serde_json::from_slice::<Json>(data)
        .or_else(|_| serde_json::from_str::<Json>(&String::from_utf8_lossy(data)));
    let Ok(request) = request else {
        return;
    };
    assert_eq!(
        response["uid"], request["request"]["uid"],
        "the uid comes back"
    );
    let Some(patch) = response.get("patch") else {
        return;
    };
    assert!(allowed, "a patch on a denial");
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(patch.as_str().expect("the patch is a string"))
        .expect("the patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
    let mut pod = request["request"]["object"].clone();
    if let Err(e) = json_patch::patch(&mut pod, &patch) {
        panic!("the patch does not apply to the pod it was made for: {e}\npatch: {patch:?}");
    }

    // The patched pod again: allowed, nothing more to do.
    let mut again = request.clone();
    again["request"]["object"] = pod;
    let body = serde_json::to_vec(&again).expect("JSON serializes");
    let (answer, _) = review_of(&body, &settings).expect("the patched pod is a review too");
    let response = &answer["response"];
    assert_eq!(
        response["allowed"],
        json!(true),
        "the injected pod is refused: {answer}"
    );
    assert!(response.get("patch").is_none(), "a second patch: {answer}");
});
