//! The proxy's HTTP/1 framing (`proxy::h1`): never panic, never claim more bytes than given,
//! and a chunked body ends at the same byte however its bytes are split across reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passthrough_proxy::h1::{Chunked, parse_request, parse_response, write_request_head};

fuzz_target!(|data: &[u8]| {
    let mut fields = Vec::new();
    if let Ok(Some(req)) = parse_request(data, &mut fields) {
        assert!(req.head_len <= data.len());
        let mut out = Vec::new();
        write_request_head(data, &req, &fields, "web.test", req.closes, &mut out);
        // What goes upstream parses again, to the same framing and authority.
        let again = parse_request(&out, &mut Vec::new())
            .expect("the rewritten head parses")
            .expect("the rewritten head is complete");
        assert_eq!(again.head_len, out.len());
        assert_eq!(again.body, req.body);
        assert_eq!(again.authority.as_deref(), Ok("web.test"));
    }
    if let Ok(Some(resp)) = parse_response(data, false) {
        assert!(resp.head_len <= data.len());
    }
    let mut whole = Chunked::default();
    let end = whole.advance(data);
    if let Ok(n) = end {
        assert!(n <= data.len());
        // The same bytes in pieces of 1..=7 bytes reach the same verdict at the same byte.
        let step = usize::from(data.first().copied().unwrap_or(1) % 7) + 1;
        let mut split = Chunked::default();
        let mut pos = 0;
        while pos < data.len() && !split.done() {
            let cut = (pos + step).min(data.len());
            pos += split
                .advance(&data[pos..cut])
                .expect("a prefix of a valid body is valid");
        }
        assert_eq!(split.done(), whole.done());
        if whole.done() {
            assert_eq!(pos, n);
        }
    }
});
