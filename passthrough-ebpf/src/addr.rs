//! IPv6 addresses as the contexts give them (four 32-bit words in network byte order, read and
//! written one word at a time for the verifier) and as map keys hold them (16 bytes).

/// `user_ip6`/`local_ip6` words → address bytes (shared with the decision).
pub use passthrough_common::decide::words_to_bytes;

/// Address bytes → words to write into `user_ip6`.
#[inline(always)]
pub fn bytes_to_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
