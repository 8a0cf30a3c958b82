//! `emit_document` (src/kube/yaml.rs), the writer behind every rewritten manifest document.
//!
//! For any value yaml_serde reads from the input, what `emit_document` writes (when it
//! writes anything) reads back as an equal value: nothing the proxy's YAML emitter quotes,
//! indents or folds changes what a reader sees. NaN is compared as NaN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yaml_serde::Value as Yaml;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = yaml_serde::from_str::<Yaml>(s) else {
        return;
    };
    let Ok(text) = lameduck::kube::yaml::emit_document(&value) else {
        return;
    };
    let back: Yaml = match yaml_serde::from_str(&text) {
        Ok(v) => v,
        Err(e) => panic!("emitted text does not parse: {e}\nvalue: {value:?}\ntext:\n{text}"),
    };
    assert!(
        same(&value, &back),
        "round trip changed the value\nin:   {value:?}\nout:  {back:?}\ntext:\n{text}"
    );
});

/// Equality with NaN equal to itself.
fn same(a: &Yaml, b: &Yaml) -> bool {
    match (a, b) {
        (Yaml::Number(x), Yaml::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(f), Some(g)) if f.is_nan() && g.is_nan() => true,
            _ => x == y,
        },
        (Yaml::Sequence(x), Yaml::Sequence(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Yaml::Mapping(x), Yaml::Mapping(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
        }
        (Yaml::Tagged(x), Yaml::Tagged(y)) => x.tag == y.tag && same(&x.value, &y.value),
        _ => a == b,
    }
}
