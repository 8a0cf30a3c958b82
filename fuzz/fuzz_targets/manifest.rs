//! `inject_manifests` (src/kube/inject/): the multi-document manifest rewrite of `lameduck
//! inject`, on arbitrary text. The first byte chooses `--all`.
//!
//! Never panics. `split_documents` pieces concatenate to the input. On `Ok`: with nothing
//! injected the output is the input byte for byte; and the output, rewritten again, comes
//! back byte for byte (every pod template in it is marked injected, so no document
//! changes, and a document that does not change is copied as it was).
#![no_main]

use lameduck::kube::inject::{inject_manifests, split_documents, Settings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(input) = std::str::from_utf8(rest) else {
        return;
    };
    let all = flags & 1 == 1;
    assert_eq!(
        split_documents(input).concat(),
        input,
        "the pieces are the input"
    );

    let settings = Settings::default();
    let Ok(out) = inject_manifests(input, &settings, all) else {
        return;
    };
    if out.injected == 0 {
        assert_eq!(out.yaml, input, "nothing injected, yet the text changed");
        return;
    }
    let again = match inject_manifests(&out.yaml, &settings, all) {
        Ok(again) => again,
        Err(e) => panic!("the rewritten stream is refused: {e}\n{}", out.yaml),
    };
    assert_eq!(again.injected, 0, "injected twice:\n{}", out.yaml);
    assert_eq!(again.yaml, out.yaml, "an unchanged stream was rewritten");
});
