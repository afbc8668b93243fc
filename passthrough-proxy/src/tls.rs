//! A TLS ClientHello reader over the first bytes of a connection.
//!
//! [`parse_client_hello`] never guesses: it answers [`Parse::NeedMore`] until the whole
//! ClientHello handshake message is there (it may be split across TCP segments *and* across
//! several TLS records, and be large: post-quantum key shares, padding, 16 KiB and more),
//! [`Parse::NotTls`] when the bytes cannot start a TLS handshake record, [`Parse::Invalid`] when
//! they start one but break the TLS rules, and [`Parse::Hello`] with what the proxy needs.
//!
//! Decisions on odd ClientHellos (the proxy denies everything but [`Parse::Hello`] with a name):
//! - **No `server_name`**: `sni = None` (the policy denies it).
//! - **Two host names** in `server_name`, or **any extension twice**: [`TlsError`], denied
//!   (RFC 6066 §3 and RFC 8446 §4.2 forbid both; a server and a policy could pick different ones).
//! - **Upper-case** names are returned as sent; the policy compares case-insensitively.
//!   **NUL or other non host-name bytes**, and **IP literals**, are returned (non-UTF-8 bytes as
//!   U+FFFD) and the policy rejects them as malformed names / IP literals.
//! - **GREASE** values (RFC 8701) in cipher suites, extensions, groups, versions are skipped like
//!   any unknown value.
//! - **ECH** (`encrypted_client_hello`, 0xfe0d): `ech = true`; the decision is made on the outer
//!   SNI, which is what the network (and Kuma/Envoy) sees: the ECH *public name* of the
//!   client-facing server. Allowing that name therefore allows whatever that server fronts.
//!   The inner name is encrypted and cannot be judged.

use thiserror::Error;

/// The record content type of a handshake.
const HANDSHAKE: u8 = 22;
/// The handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// TLS plaintext records carry at most 2^14 bytes (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
/// `server_name` extension.
const EXT_SERVER_NAME: u16 = 0;
/// `application_layer_protocol_negotiation` extension.
const EXT_ALPN: u16 = 16;
/// `encrypted_client_hello` extension (RFC 9849).
const EXT_ECH: u16 = 0xfe0d;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// A prefix of a possibly valid ClientHello: read more.
    NeedMore,
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS handshake that breaks the rules.
    Invalid(TlsError),
    /// A complete ClientHello.
    Hello(ClientHello),
}

/// What the proxy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The `host_name` of the `server_name` extension, as sent (not normalised).
    pub sni: Option<String>,
    /// An `encrypted_client_hello` extension was present (`sni` is then the outer name).
    pub ech: bool,
    /// ALPN protocol names offered (for logging).
    pub alpn: Vec<String>,
    /// Bytes of the records that carried the ClientHello (headers included).
    pub record_bytes: usize,
}

/// Why a TLS handshake start is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TlsError {
    /// A record is longer than TLS allows.
    #[error("TLS record longer than 2^14 bytes")]
    RecordTooLong,
    /// A record of another content type arrived before the ClientHello was complete.
    #[error("non-handshake record before the ClientHello was complete")]
    UnexpectedRecord,
    /// An empty handshake record.
    #[error("empty handshake record")]
    EmptyRecord,
    /// The first handshake message is not a ClientHello.
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    /// A length field points past its container or a field is malformed.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// An extension appears twice.
    #[error("extension {0:#06x} appears twice")]
    DuplicateExtension(u16),
    /// `server_name` carries more than one host name.
    #[error("server_name carries more than one host name")]
    TwoServerNames,
}

/// Parses the ClientHello at the start of `buf` (see the module doc).
pub fn parse_client_hello(buf: &[u8]) -> Parse {
    match buf {
        [] => return Parse::NeedMore,
        [t, ..] if *t != HANDSHAKE => return Parse::NotTls,
        [_] => return Parse::NeedMore,
        [_, major, ..] if *major != 3 => return Parse::NotTls,
        [_, _] => return Parse::NeedMore,
        [_, _, minor, ..] if *minor > 4 => return Parse::NotTls,
        _ => {}
    }
    // Reassemble the handshake message from as many records as it takes.
    let mut msg: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    loop {
        let Some(hdr) = buf.get(pos..pos + 5) else {
            return Parse::NeedMore;
        };
        if hdr[0] != HANDSHAKE {
            return Parse::Invalid(TlsError::UnexpectedRecord);
        }
        if hdr[1] != 3 {
            return Parse::Invalid(TlsError::Malformed("record version"));
        }
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if len > MAX_RECORD {
            return Parse::Invalid(TlsError::RecordTooLong);
        }
        if len == 0 {
            return Parse::Invalid(TlsError::EmptyRecord);
        }
        // A handshake type other than ClientHello can be refused before the record completes.
        if msg.is_empty()
            && let Some(&t) = buf.get(pos + 5)
            && t != CLIENT_HELLO
        {
            return Parse::Invalid(TlsError::NotClientHello);
        }
        let Some(body) = buf.get(pos + 5..pos + 5 + len) else {
            return Parse::NeedMore;
        };
        msg.extend_from_slice(body);
        pos += 5 + len;
        if msg.len() >= 4 {
            let need =
                4 + (usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]));
            if msg.len() >= need {
                return match parse_hello_body(&msg[4..need]) {
                    Ok(mut hello) => {
                        hello.record_bytes = pos;
                        Parse::Hello(hello)
                    }
                    Err(e) => Parse::Invalid(e),
                };
            }
        }
    }
}

/// A bounds-checked reader; every short read is a malformed message (the message is complete).
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TlsError> {
        if self.buf.len() < n {
            return Err(TlsError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, TlsError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, TlsError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], TlsError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], TlsError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn parse_hello_body(body: &[u8]) -> Result<ClientHello, TlsError> {
    let mut r = Reader { buf: body };
    let version = r.u16("legacy_version")?;
    if version >> 8 != 3 {
        return Err(TlsError::Malformed("legacy_version"));
    }
    r.take(32, "random")?;
    let sid = r.vec8("session_id")?;
    if sid.len() > 32 {
        return Err(TlsError::Malformed("session_id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(TlsError::Malformed("cipher_suites"));
    }
    if r.vec8("compression_methods")?.is_empty() {
        return Err(TlsError::Malformed("compression_methods"));
    }
    let mut hello = ClientHello::default();
    if r.is_empty() {
        return Ok(hello); // no extensions at all (TLS 1.0-style)
    }
    let mut exts = Reader {
        buf: r.vec16("extensions")?,
    };
    if !r.is_empty() {
        return Err(TlsError::Malformed("bytes after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !exts.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if seen.contains(&ty) {
            return Err(TlsError::DuplicateExtension(ty));
        }
        seen.push(ty);
        match ty {
            EXT_SERVER_NAME => hello.sni = parse_server_name(data)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_ECH => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, TlsError> {
    let mut r = Reader { buf: data };
    let mut list = Reader {
        buf: r.vec16("server_name_list")?,
    };
    if !r.is_empty() {
        return Err(TlsError::Malformed("bytes after server_name_list"));
    }
    if list.is_empty() {
        return Err(TlsError::Malformed("empty server_name_list"));
    }
    let mut name = None;
    while !list.is_empty() {
        let ty = list.u8("name_type")?;
        let n = list.vec16("host_name")?;
        if ty != 0 {
            continue; // no other name type is defined; ignore it
        }
        if n.is_empty() {
            return Err(TlsError::Malformed("empty host_name"));
        }
        if name.is_some() {
            return Err(TlsError::TwoServerNames);
        }
        name = Some(String::from_utf8_lossy(n).into_owned());
    }
    Ok(name)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<String>, TlsError> {
    let mut r = Reader { buf: data };
    let mut list = Reader {
        buf: r.vec16("alpn list")?,
    };
    let mut out = Vec::new();
    while !list.is_empty() {
        out.push(String::from_utf8_lossy(list.vec8("alpn name")?).into_owned());
    }
    Ok(out)
}

/// A fatal TLS alert record (`level` 2) with `description`, e.g. [`ALERT_ACCESS_DENIED`].
pub fn alert(description: u8) -> [u8; 7] {
    [21, 3, 3, 0, 2, 2, description]
}

/// `access_denied` (49): the proxy's answer to a denied ClientHello.
pub const ALERT_ACCESS_DENIED: u8 = 49;
/// `internal_error` (80): the upstream could not be reached.
pub const ALERT_INTERNAL_ERROR: u8 = 80;
/// `handshake_failure` (40): the ClientHello could not be parsed.
pub const ALERT_HANDSHAKE_FAILURE: u8 = 40;

/// The ClientHello shape of this crate's unit tests: a GREASE cipher suite first.
#[cfg(test)]
pub(crate) fn test_hello() -> passthrough_testhello::Hello {
    use passthrough_testhello::{Hello, TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, grease};
    Hello::new().cipher_suites(&[grease(0), TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384])
}

#[cfg(test)]
mod tests {
    use super::*;
    use passthrough_testhello::{KEY_SHARE, PADDING, grease, records};
    use proptest::prelude::*;

    fn hello_of(bytes: &[u8]) -> ClientHello {
        match parse_client_hello(bytes) {
            Parse::Hello(h) => h,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    #[test]
    fn simple_sni() {
        let b = test_hello()
            .server_name(b"Example.COM")
            .ext(grease(1), b"")
            .record();
        let h = hello_of(&b);
        assert_eq!(h.sni.as_deref(), Some("Example.COM"));
        assert!(!h.ech);
        assert_eq!(h.record_bytes, b.len());
    }

    #[test]
    fn every_prefix_needs_more() {
        let b = test_hello().server_name(b"a.example.com").record();
        for n in 0..b.len() {
            assert_eq!(parse_client_hello(&b[..n]), Parse::NeedMore, "prefix {n}");
        }
        assert!(matches!(parse_client_hello(&b), Parse::Hello(_)));
    }

    #[test]
    fn across_records_and_large() {
        let msg = test_hello()
            .ext(grease(2), b"")
            .ext(KEY_SHARE, &[0x42; 1216])
            .server_name(b"big.example.com")
            .ext(PADDING, &[0; 16 * 1024])
            .message();
        assert!(msg.len() > 16 * 1024);
        for chunk in [1usize, 7, 100, 1 << 14] {
            let b = records(&msg, chunk);
            assert_eq!(
                hello_of(&b).sni.as_deref(),
                Some("big.example.com"),
                "chunk {chunk}"
            );
            assert_eq!(parse_client_hello(&b[..b.len() - 1]), Parse::NeedMore);
        }
    }

    #[test]
    fn odd_hellos() {
        assert_eq!(hello_of(&test_hello().records(99)).sni, None);
        assert_eq!(
            parse_client_hello(&test_hello().server_names(&[b"a.com", b"b.com"]).record()),
            Parse::Invalid(TlsError::TwoServerNames)
        );
        assert_eq!(
            parse_client_hello(
                &test_hello()
                    .server_name(b"a.com")
                    .server_name(b"b.com")
                    .record()
            ),
            Parse::Invalid(TlsError::DuplicateExtension(0))
        );
        let h = hello_of(
            &test_hello()
                .server_name(b"a\0.com")
                .ext(EXT_ECH, b"x")
                .record(),
        );
        assert_eq!(h.sni.as_deref(), Some("a\0.com"));
        assert!(h.ech);
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Parse::NotTls);
        assert_eq!(parse_client_hello(&[22, 2]), Parse::NotTls);
        // A ServerHello is not a ClientHello.
        assert_eq!(
            parse_client_hello(&test_hello().msg_type(2).record()),
            Parse::Invalid(TlsError::NotClientHello)
        );
        // Lengths that lie: an extensions block longer than the hello, a handshake header
        // shorter than the fields it holds.
        for lying in [
            test_hello().server_name(b"a.b").extensions_len(0xffff),
            test_hello().server_name(b"a.b").handshake_len(40),
        ] {
            assert!(
                matches!(
                    parse_client_hello(&lying.record()),
                    Parse::Invalid(TlsError::Malformed(_))
                ),
                "{lying:?}: {:?}",
                parse_client_hello(&lying.record())
            );
        }
        // Alert record in the middle of a split hello.
        let mut b = test_hello().server_name(b"a.com").records(20);
        b.truncate(25);
        b.extend_from_slice(&alert(0));
        assert_eq!(
            parse_client_hello(&b),
            Parse::Invalid(TlsError::UnexpectedRecord)
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_client_hello(&b);
        }

        #[test]
        fn mutated_hello_never_panics(
            cut in 0usize..400, flip in 0usize..400, val in any::<u8>(), chunk in 1usize..300
        ) {
            let mut b = test_hello().server_name(b"x.example.org").alpn(&[b"h2"]).records(chunk);
            let i = flip % b.len();
            b[i] = val;
            let c = cut % (b.len() + 1);
            let _ = parse_client_hello(&b[..c]);
        }

        #[test]
        fn truncated_valid_hello_needs_more(cut in 0usize..10_000, chunk in 1usize..2000) {
            let b = test_hello().server_name(b"x.example.org").ext(PADDING, &[0; 3000]).records(chunk);
            let c = cut % b.len();
            prop_assert_eq!(parse_client_hello(&b[..c]), Parse::NeedMore);
        }
    }
}
