//! The kernel's ClientHello judge (`passthrough_common::sni`, the code the TLS fast path's
//! `sk_msg` programs run) against the proxy's reader and name rules on arbitrary bytes: they
//! agree on every input within the kernel's limits (same verdict class, same normalised name),
//! the judge never panics, and every prefix is consistent with the whole (it asks for more
//! bytes than the prefix has, or gives the whole's answer), so splitting writes changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passthrough_common::sni::{KERNEL_LIMITS, SNI_KEY_NAME, Stop, parse};
use passthrough_proxy::kernel_judge::compare_with_proxy;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = compare_with_proxy(data) {
        panic!("kernel and proxy disagree: {e}");
    }
    let mut out = [0u8; SNI_KEY_NAME];
    let full = parse(data, KERNEL_LIMITS, &mut out);
    let step = (data.len() / 32).max(1);
    for k in (0..data.len()).step_by(step) {
        match parse(&data[..k], KERNEL_LIMITS, &mut out) {
            Err(Stop::NeedMore(t)) => assert!(t as usize > k, "prefix of {k} asks for {t}"),
            Ok(h) => assert_eq!(full, Ok(h), "prefix of {k} bytes"),
            other => assert_eq!(full, other, "prefix of {k} bytes"),
        }
    }
});
