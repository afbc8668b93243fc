//! Classifies the first bytes of a redirected connection: TLS, HTTP/1.x, h2c (prior
//! knowledge) or something else. Like the ClientHello reader it answers
//! [`Peeked::NeedMore`] rather than guessing.

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP method token accepted before the space that ends it.
const MAX_METHOD: usize = 20;

/// What the first bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peeked {
    /// Too few bytes to tell.
    NeedMore,
    /// A TLS handshake record (the ClientHello reader takes over).
    Tls,
    /// An HTTP/1.x request line (`METHOD SP ...`).
    Http1,
    /// The HTTP/2 connection preface.
    H2c,
    /// Anything else.
    Other,
}

/// Classifies `buf` (the bytes read so far).
pub fn classify(buf: &[u8]) -> Peeked {
    let Some(&first) = buf.first() else {
        return Peeked::NeedMore;
    };
    if first == 22 {
        return Peeked::Tls;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Peeked::H2c
        } else {
            Peeked::NeedMore
        };
    }
    // An HTTP/1 method: an upper-case token followed by one space.
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            b' ' if i > 0 => return Peeked::Http1,
            _ => return Peeked::Other,
        }
    }
    Peeked::NeedMore
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kinds() {
        assert_eq!(classify(b""), Peeked::NeedMore);
        assert_eq!(classify(&[22]), Peeked::Tls);
        assert_eq!(classify(b"GE"), Peeked::NeedMore);
        assert_eq!(classify(b"GET /"), Peeked::Http1);
        assert_eq!(classify(b"CONNECT a:443 HTTP/1.1"), Peeked::Http1);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Peeked::NeedMore);
        assert_eq!(classify(H2_PREFACE), Peeked::H2c);
        assert_eq!(classify(b"PRI /x HTTP/1.1\r\n"), Peeked::Http1);
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Peeked::Other);
        assert_eq!(classify(b"get / HTTP/1.1"), Peeked::Other);
        assert_eq!(classify(b" GET"), Peeked::Other);
        assert_eq!(classify(&[b'A'; 30]), Peeked::Other);
        assert_eq!(classify(&[0x80, 0x2e, 0x01]), Peeked::Other);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = classify(&b);
        }

        #[test]
        fn truncated_preface_needs_more(n in 1usize..24) {
            prop_assert_eq!(classify(&H2_PREFACE[..n]), Peeked::NeedMore);
        }

        #[test]
        fn truncated_method_needs_more(m in "[A-Z]{1,20}") {
            prop_assume!(!H2_PREFACE.starts_with(m.as_bytes()));
            prop_assert_eq!(classify(m.as_bytes()), Peeked::NeedMore);
            prop_assert_eq!(classify(format!("{m} /").as_bytes()), Peeked::Http1);
        }
    }
}
