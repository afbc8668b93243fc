//! The policy loader (`policy::load_policy_bytes`: YAML, JSON, validation)
//! on arbitrary bytes: never panics, and an accepted policy set merges and compiles without
//! panicking either.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use passthrough_policy::load_policy_bytes;

fuzz_target!(|data: &[u8]| {
    let name = if data.first() == Some(&b'{') || data.first() == Some(&b'[') {
        "fuzz.json"
    } else {
        "fuzz.yaml"
    };
    if let Ok(set) = load_policy_bytes(Path::new(name), data, "default") {
        let _ = format!("{set:?}");
    }
});
