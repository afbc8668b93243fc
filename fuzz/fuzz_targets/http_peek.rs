//! The proxy's first-bytes classifier (`proxy::peek`) and the ClientHello reader it hands TLS
//! to: never panic, and a verdict other than NeedMore never changes when more bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passthrough_proxy::{
    peek::{Peeked, classify},
    tls::parse_client_hello,
};

fuzz_target!(|data: &[u8]| {
    let full = classify(data);
    for k in 0..data.len().min(64) {
        let p = classify(&data[..k]);
        if p != Peeked::NeedMore {
            assert_eq!(p, full, "prefix of {k} bytes");
        }
    }
    if full == Peeked::Tls {
        let _ = parse_client_hello(data);
    }
});
