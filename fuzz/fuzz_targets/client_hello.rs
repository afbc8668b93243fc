//! The proxy's ClientHello reader on arbitrary bytes: never panics, and reading more bytes never
//! changes a verdict already given (a prefix judged NotTls/Invalid stays so; a complete hello
//! keeps its SNI), so a client cannot get a different answer by splitting its writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passthrough_proxy::tls::{Parse, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    let full = parse_client_hello(data);
    if let Parse::Hello(h) = &full {
        assert!(h.record_bytes <= data.len());
        if let Some(sni) = &h.sni {
            assert!(!sni.is_empty());
        }
    }
    // Every prefix (a sample of them for long inputs) is consistent with the whole.
    let step = (data.len() / 32).max(1);
    for k in (0..data.len()).step_by(step) {
        match parse_client_hello(&data[..k]) {
            Parse::NeedMore => {}
            Parse::NotTls => assert_eq!(full, Parse::NotTls, "prefix of {k} bytes"),
            Parse::Invalid(e) => assert_eq!(full, Parse::Invalid(e), "prefix of {k} bytes"),
            Parse::Hello(h) => match &full {
                Parse::Hello(f) => assert_eq!(f.sni, h.sni, "prefix of {k} bytes"),
                other => panic!("prefix of {k} bytes is a hello, the whole is {other:?}"),
            },
        }
    }
});
