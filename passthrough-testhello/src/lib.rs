//! Hand-built TLS ClientHello bytes for passthrough's tests (dev-only, never in a shipped
//! binary): the one builder behind the kernel judge's unit tests (`passthrough-common`), the
//! proxy's reader and relay tests (`passthrough-proxy`), the policy's plan-versus-decision
//! property test and the kernel tests and probe (`passthrough-tests`).
//!
//! A [`Hello`] is a ClientHello handshake message whose parts are options: session id, cipher
//! suites (GREASE values: [`grease`]), extensions in order (server_name with one name, several,
//! an empty one or none; duplicates; anything else as raw type and data), padding to an exact
//! size, and lies in its length fields. [`Hello::records`] wraps it into TLS records of a
//! chosen size (the name then lands in a later record than the start of the hello); splitting
//! the bytes into several writes is the caller's `chunks`.
//!
//! ```
//! use passthrough_testhello::{Hello, grease};
//! let bytes = Hello::new()
//!     .ext(grease(0), b"")
//!     .server_name(b"api.example.com")
//!     .records(64);
//! assert_eq!(bytes[0], 22);
//! ```

/// `server_name` (RFC 6066).
pub const SERVER_NAME: u16 = 0;
/// `application_layer_protocol_negotiation` (RFC 7301).
pub const ALPN: u16 = 16;
/// `padding` (RFC 7685).
pub const PADDING: u16 = 21;
/// `supported_versions` (RFC 8446).
pub const SUPPORTED_VERSIONS: u16 = 43;
/// `key_share` (RFC 8446).
pub const KEY_SHARE: u16 = 51;
/// `encrypted_client_hello` (draft-ietf-tls-esni).
pub const ECH: u16 = 0xfe0d;

/// TLS 1.3 cipher suite `TLS_AES_128_GCM_SHA256`.
pub const TLS_AES_128_GCM_SHA256: u16 = 0x1301;
/// TLS 1.3 cipher suite `TLS_AES_256_GCM_SHA384`.
pub const TLS_AES_256_GCM_SHA384: u16 = 0x1302;
/// `supported_versions` value of TLS 1.3.
pub const TLS13: u16 = 0x0304;
/// `supported_versions` value of TLS 1.2.
pub const TLS12: u16 = 0x0303;

/// The largest TLS record payload (2^14 bytes).
pub const MAX_RECORD: usize = 1 << 14;

/// GREASE value `i` of the 16 (RFC 8701): `0x0a0a`, `0x1a1a`, … `0xfafa`, usable as a cipher
/// suite or an extension type. Panics past 15.
pub const fn grease(i: u8) -> u16 {
    assert!(i < 16, "there are 16 GREASE values");
    0x0a0a + 0x1010 * i as u16
}

/// One extension: type, 2-byte length, data.
pub fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut v = ty.to_be_bytes().to_vec();
    v.extend_from_slice(&len16(data.len()).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A `server_name` extension listing `names` verbatim as host names (none: an empty list).
pub fn server_name(names: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for n in names {
        list.push(0);
        list.extend_from_slice(&len16(n.len()).to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut d = len16(list.len()).to_be_bytes().to_vec();
    d.extend_from_slice(&list);
    ext(SERVER_NAME, &d)
}

/// A `supported_versions` extension (ClientHello form: a 1-byte list length).
pub fn supported_versions(versions: &[u16]) -> Vec<u8> {
    let mut d = vec![u8::try_from(versions.len() * 2).expect("at most 127 versions")];
    for v in versions {
        d.extend_from_slice(&v.to_be_bytes());
    }
    ext(SUPPORTED_VERSIONS, &d)
}

/// An ALPN extension offering `protocols`.
pub fn alpn(protocols: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for p in protocols {
        list.push(u8::try_from(p.len()).expect("a protocol name of at most 255 bytes"));
        list.extend_from_slice(p);
    }
    let mut d = len16(list.len()).to_be_bytes().to_vec();
    d.extend_from_slice(&list);
    ext(ALPN, &d)
}

/// `msg` (handshake bytes) in TLS handshake records (type 22, version 3.1) of at most `chunk`
/// bytes each. An empty `msg` gives no record.
pub fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
    assert!(chunk > 0, "records of at least one byte");
    let mut out = Vec::new();
    for c in msg.chunks(chunk) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&len16(c.len()).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}

fn len16(n: usize) -> u16 {
    u16::try_from(n).expect("a length that fits 16 bits")
}

/// A ClientHello handshake message, built from options (see the crate's documentation).
///
/// [`Hello::new`]: the shape of a TLS 1.3 client's hello: legacy version 3.3, a random of 7s,
/// a 32-byte session id (9s), the suites `TLS_AES_128_GCM_SHA256` and
/// `TLS_AES_256_GCM_SHA384`, null compression and no extensions. [`Hello::minimal`]: the same
/// with no session id and one suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    msg_type: u8,
    session_id: Vec<u8>,
    cipher_suites: Vec<u16>,
    extensions: Vec<Vec<u8>>,
    pad_to: Option<usize>,
    handshake_len: Option<u32>,
    extensions_len: Option<u16>,
}

impl Default for Hello {
    fn default() -> Self {
        Self::new()
    }
}

impl Hello {
    /// A TLS 1.3 client's shape (32-byte session id, two suites), no extensions yet.
    pub fn new() -> Self {
        Self {
            msg_type: 1,
            session_id: vec![9; 32],
            cipher_suites: vec![TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384],
            extensions: Vec::new(),
            pad_to: None,
            handshake_len: None,
            extensions_len: None,
        }
    }

    /// No session id and the one suite `TLS_AES_128_GCM_SHA256`, no extensions yet.
    pub fn minimal() -> Self {
        Self::new()
            .session_id(&[])
            .cipher_suites(&[TLS_AES_128_GCM_SHA256])
    }

    /// The legacy session id (0 to 32 bytes in real hellos; not checked).
    pub fn session_id(mut self, id: &[u8]) -> Self {
        self.session_id = id.to_vec();
        self
    }

    /// The cipher suites, in order (GREASE: [`grease`]).
    pub fn cipher_suites(mut self, suites: &[u16]) -> Self {
        self.cipher_suites = suites.to_vec();
        self
    }

    /// Another handshake message type than ClientHello's 1 (2: a ServerHello).
    pub fn msg_type(mut self, ty: u8) -> Self {
        self.msg_type = ty;
        self
    }

    /// Appends an extension of type `ty` with `data`.
    pub fn ext(self, ty: u16, data: &[u8]) -> Self {
        self.raw_ext(ext(ty, data))
    }

    /// Appends an extension already encoded (type, length, data), e.g. from [`server_name`].
    pub fn raw_ext(mut self, encoded: Vec<u8>) -> Self {
        self.extensions.push(encoded);
        self
    }

    /// Appends extensions already encoded.
    pub fn raw_exts(mut self, encoded: impl IntoIterator<Item = Vec<u8>>) -> Self {
        self.extensions.extend(encoded);
        self
    }

    /// Appends a `server_name` extension with this one host name, verbatim (case, trailing
    /// dot, NUL bytes, an IP literal or an empty name are all the caller's).
    pub fn server_name(self, name: &[u8]) -> Self {
        self.raw_ext(server_name(&[name]))
    }

    /// Appends a `server_name` extension listing these host names (empty: an empty list).
    pub fn server_names(self, names: &[&[u8]]) -> Self {
        self.raw_ext(server_name(names))
    }

    /// Appends a `supported_versions` extension.
    pub fn supported_versions(self, versions: &[u16]) -> Self {
        self.raw_ext(supported_versions(versions))
    }

    /// Appends an ALPN extension.
    pub fn alpn(self, protocols: &[&[u8]]) -> Self {
        self.raw_ext(alpn(protocols))
    }

    /// Appends, last, a `padding` extension that makes the message exactly `msg_len` bytes
    /// (header included). Panics in [`Hello::message`] when the hello without it is already
    /// too long for one (4 bytes of extension header at least).
    pub fn pad_to(mut self, msg_len: usize) -> Self {
        self.pad_to = Some(msg_len);
        self
    }

    /// Declares `len` in the handshake header instead of the body's real length.
    pub fn handshake_len(mut self, len: u32) -> Self {
        self.handshake_len = Some(len);
        self
    }

    /// Declares `len` as the extensions block's length instead of its real length.
    pub fn extensions_len(mut self, len: u16) -> Self {
        self.extensions_len = Some(len);
        self
    }

    /// The handshake message: type, 3-byte length, body.
    pub fn message(&self) -> Vec<u8> {
        let mut exts: Vec<u8> = self.extensions.concat();
        if let Some(want) = self.pad_to {
            let base = self.message_with(&exts).len();
            assert!(
                want >= base + 4,
                "padding to {want} bytes: the hello is {base} bytes without padding"
            );
            exts.extend_from_slice(&ext(PADDING, &vec![0; want - base - 4]));
        }
        self.message_with(&exts)
    }

    fn message_with(&self, exts: &[u8]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[7; 32]);
        b.push(u8::try_from(self.session_id.len()).expect("a session id of at most 255 bytes"));
        b.extend_from_slice(&self.session_id);
        b.extend_from_slice(&len16(self.cipher_suites.len() * 2).to_be_bytes());
        for s in &self.cipher_suites {
            b.extend_from_slice(&s.to_be_bytes());
        }
        b.extend_from_slice(&[1, 0]);
        let declared = self.extensions_len.unwrap_or_else(|| len16(exts.len()));
        b.extend_from_slice(&declared.to_be_bytes());
        b.extend_from_slice(exts);
        let len = self.handshake_len.unwrap_or_else(|| {
            u32::try_from(b.len())
                .ok()
                .filter(|&n| n < 1 << 24)
                .expect("a hello under 16 MiB")
        });
        let mut m = vec![self.msg_type];
        m.extend_from_slice(&len.to_be_bytes()[1..]);
        m.extend_from_slice(&b);
        m
    }

    /// The message in as few records as TLS allows (one up to [`MAX_RECORD`] bytes).
    pub fn record(&self) -> Vec<u8> {
        records(&self.message(), MAX_RECORD)
    }

    /// The message in records of at most `chunk` bytes each.
    pub fn records(&self, chunk: usize) -> Vec<u8> {
        records(&self.message(), chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The builder's bytes against a hello written out by hand, field by field.
    #[test]
    fn minimal_hello_byte_for_byte() {
        let got = Hello::minimal()
            .server_name(b"ab")
            .supported_versions(&[TLS13, TLS12])
            .record();
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // suites
        body.extend_from_slice(&[1, 0]); // compression
        let exts = [
            &[0, 0, 0, 7, 0, 5, 0, 0, 2, b'a', b'b'][..], // server_name "ab"
            &[0, 43, 0, 5, 4, 3, 4, 3, 3],                // supported_versions 1.3, 1.2
        ]
        .concat();
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut want = vec![22, 3, 1, 0, body.len() as u8 + 4, 1, 0, 0, body.len() as u8];
        want.extend_from_slice(&body);
        assert_eq!(got, want);
    }

    #[test]
    fn default_shape_and_options() {
        let m = Hello::new().message();
        // type, length, version, random, session id length 32 then 32 nines, 2 suites.
        assert_eq!(m[0], 1);
        assert_eq!(usize::from(m[3]), m.len() - 4);
        assert_eq!(m[38], 32);
        assert!(m[39..71].iter().all(|&b| b == 9));
        assert_eq!(m[71..77], [0, 4, 0x13, 0x01, 0x13, 0x02]);
        assert_eq!(m[77..], [1, 0, 0, 0]);
        let g = Hello::new()
            .session_id(&[])
            .cipher_suites(&[grease(3), TLS_AES_128_GCM_SHA256])
            .msg_type(2)
            .message();
        assert_eq!(g[0], 2);
        assert_eq!(g[38..43], [0, 0, 4, 0x3a, 0x3a]);
        assert_eq!(
            [grease(0), grease(1), grease(13), grease(15)],
            [0x0a0a, 0x1a1a, 0xdada, 0xfafa]
        );
    }

    #[test]
    fn server_name_forms() {
        assert_eq!(server_name(&[]), [0, 0, 0, 2, 0, 0]);
        assert_eq!(server_name(&[b""]), [0, 0, 0, 5, 0, 3, 0, 0, 0]);
        assert_eq!(
            server_name(&[b"a", b"b"]),
            [0, 0, 0, 10, 0, 8, 0, 0, 1, b'a', 0, 0, 1, b'b']
        );
        assert_eq!(alpn(&[b"h2"]), [0, 16, 0, 5, 0, 3, 2, b'h', b'2']);
        assert_eq!(supported_versions(&[TLS13]), [0, 43, 0, 3, 2, 3, 4]);
        let two = Hello::new()
            .server_name(b"a")
            .server_name(b"b")
            .ext(ECH, b"x");
        let m = two.message();
        let exts = [server_name(&[b"a"]), server_name(&[b"b"]), ext(ECH, b"x")].concat();
        assert!(m.ends_with(&exts));
        assert_eq!(m[m.len() - exts.len() - 2..m.len() - exts.len()], [0, 25]);
    }

    #[test]
    fn padding_reaches_the_size_exactly() {
        for want in [200, 512, 517, 16 * 1024 + 3] {
            let m = Hello::new()
                .server_name(b"x.example")
                .pad_to(want)
                .message();
            assert_eq!(m.len(), want);
            let tail =
                &m[m.len() - (want - Hello::new().server_name(b"x.example").message().len())..];
            assert_eq!(tail[..2], PADDING.to_be_bytes());
        }
    }

    #[test]
    #[should_panic(expected = "without padding")]
    fn padding_below_the_hello_panics() {
        Hello::new().pad_to(10).message();
    }

    #[test]
    fn records_split_and_rejoin() {
        let msg = Hello::new().server_name(b"api.test").pad_to(200).message();
        for chunk in [1, 7, 40, 199, 200, MAX_RECORD] {
            let b = records(&msg, chunk);
            let mut joined = Vec::new();
            let mut rest = &b[..];
            let mut n = 0;
            while !rest.is_empty() {
                assert_eq!(rest[..3], [22, 3, 1]);
                let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                assert!(len <= chunk && len > 0);
                joined.extend_from_slice(&rest[5..5 + len]);
                rest = &rest[5 + len..];
                n += 1;
            }
            assert_eq!(joined, msg, "chunk {chunk}");
            assert_eq!(n, msg.len().div_ceil(chunk));
        }
        assert_eq!(
            Hello::new().record(),
            Hello::new().records(MAX_RECORD),
            "one record"
        );
    }

    #[test]
    fn declared_lengths_lie() {
        let honest = Hello::minimal().server_name(b"a.b").message();
        let m = Hello::minimal()
            .server_name(b"a.b")
            .handshake_len(7)
            .extensions_len(0xffff)
            .message();
        assert_eq!(m.len(), honest.len());
        assert_eq!(m[1..4], [0, 0, 7]);
        let at = honest.len() - server_name(&[b"a.b"]).len() - 2;
        assert_eq!(m[at..at + 2], [0xff, 0xff]);
        assert_eq!(honest[at..at + 2], [0, 12]);
        assert_eq!(m[..1], honest[..1]);
        assert_eq!(m[4..at], honest[4..at]);
        assert_eq!(m[at + 2..], honest[at + 2..]);
    }
}
