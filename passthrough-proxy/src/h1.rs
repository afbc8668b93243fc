//! HTTP/1.x message framing on peeked bytes (RFC 9112), for the plaintext proxy ([`super::http1`]).
//!
//! Pure: no IO, no clock. Parsers take the bytes read so far and answer "complete" (with what
//! the proxy needs), "need more bytes" (`Ok(None)`, or a [`Chunked`] that has not ended), or an
//! error; they never guess. Heads are parsed with `httparse` (strict: one space between the
//! request-line parts, no whitespace before a colon, no obs-fold in requests).
//!
//! Why framing matters here: the proxy judges the `Host` of *every* request of a keep-alive
//! connection, so it must know exactly where each request ends, and the upstream must agree.
//! Anything two parsers could read differently is refused instead of forwarded:
//! - a request with both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3 lets a server
//!   reject it; forwarding it is the classic CL.TE / TE.CL smuggling) → 400;
//! - `Transfer-Encoding` other than exactly `chunked` (`xchunked`, `gzip, chunked`, `chunked`
//!   twice, parameters) → 501; on HTTP/1.0 → 400;
//! - `Content-Length` that is not a decimal number, or several that disagree → 400;
//! - chunked bodies whose lines do not end in CRLF, whose size is not hex, or whose extensions
//!   hold anything but token characters, `=`, `;` and blanks (no quoted strings: a quote is
//!   where parsers differ) → the connection is closed.
//!
//! The upstream then gets a head the proxy wrote itself ([`write_request_head`]): the request
//! line (origin-form), `Host` = the judged authority, the client's fields minus hop-by-hop ones,
//! and exactly one framing field. Body bytes are forwarded as they came, framed as parsed.

use std::ops::Range;

use thiserror::Error;

/// Most header fields in one head (hyper's default too); more is a 431.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields accepted after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a message cannot be framed safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum H1Error {
    /// The head is not valid HTTP/1.x.
    #[error("malformed HTTP/1 head: {0}")]
    Head(httparse::Error),
    /// A `Content-Length` that is not a decimal number, or several that disagree.
    #[error("invalid Content-Length")]
    ContentLength,
    /// A request with both `Content-Length` and `Transfer-Encoding`.
    #[error("both Content-Length and Transfer-Encoding (ambiguous framing)")]
    BothFramings,
    /// A request `Transfer-Encoding` other than exactly `chunked`.
    #[error("unsupported Transfer-Encoding (only `chunked` is proxied)")]
    TransferCoding,
    /// `Transfer-Encoding` in an HTTP/1.0 message (RFC 9112 §6.1: faulty framing).
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    TransferEncodingHttp10,
    /// The absolute-form request target is not a URI.
    #[error("the request target is not a valid URI")]
    Target,
    /// An upstream answered `101 Switching Protocols` to a request that did not ask to upgrade.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedSwitch,
    /// Malformed chunked framing (the reason names the part).
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

impl H1Error {
    /// The status a client gets for a request refused with this error.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            H1Error::Head(httparse::Error::TooManyHeaders) => {
                (431, "Request Header Fields Too Large")
            }
            H1Error::TransferCoding => (501, "Not Implemented"),
            _ => (400, "Bad Request"),
        }
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// A header field kept for the upstream: byte ranges of its name and value in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    name: Range<usize>,
    value: Range<usize>,
}

/// What the proxy needs of a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Length of the head, the blank line included.
    pub head_len: usize,
    /// The method's bytes in the buffer.
    method: Range<usize>,
    /// The request target's bytes in the buffer (used as is unless absolute-form).
    target: Range<usize>,
    /// For an absolute-form target: its origin-form path and query.
    origin_form: Option<String>,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor: u8,
    /// The authority to judge: the absolute-form URI's (it wins over `Host`, RFC 9112 §3.2.2),
    /// else the single `Host` field's; or why there is none.
    pub authority: Result<String, &'static str>,
    /// How the request body is delimited.
    pub body: BodyFraming,
    /// The client ends the connection after this exchange (`Connection: close`, or HTTP/1.0
    /// without `keep-alive`, RFC 9112 §9.3).
    pub closes: bool,
    /// The `Upgrade` field's value, if any.
    pub upgrade: Option<String>,
    /// `HEAD` (its response has no body).
    pub is_head: bool,
    /// `CONNECT`.
    pub is_connect: bool,
}

/// What the proxy needs of a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Length of the head, the blank line included.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub body: BodyFraming,
    /// The upstream keeps the connection open after this response.
    pub persistent: bool,
}

impl ResponseHead {
    /// A 1xx other than 101: forwarded, then the final response follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }
}

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// Comma-separated list elements of a field value, trimmed, empty ones skipped (RFC 9110 §5.6.1).
fn list(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(trim).filter(|t| !t.is_empty())
}

/// Folds `Content-Length` values: every element of every field must be the same number.
fn content_length(acc: &mut Option<u64>, value: &[u8]) -> Result<(), H1Error> {
    let mut any = false;
    for el in list(value) {
        any = true;
        if el.len() > 19 || !el.iter().all(u8::is_ascii_digit) {
            return Err(H1Error::ContentLength);
        }
        let n = el.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        match acc {
            Some(prev) if *prev != n => return Err(H1Error::ContentLength),
            _ => *acc = Some(n),
        }
    }
    if any {
        Ok(())
    } else {
        Err(H1Error::ContentLength)
    }
}

/// The connection options of the `Connection` fields.
#[derive(Default)]
struct ConnectionOptions {
    close: bool,
    keep_alive: bool,
}

fn has_token(fields: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| list(h.value))
        .any(|t| t.eq_ignore_ascii_case(token))
}

fn connection_options(fields: &[httparse::Header<'_>]) -> ConnectionOptions {
    ConnectionOptions {
        close: has_token(fields, "connection", b"close"),
        keep_alive: has_token(fields, "connection", b"keep-alive"),
    }
}

/// Fields that belong to one hop (RFC 9110 §7.6.1): never forwarded as they came.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Fields the proxy writes itself (or refuses: `upgrade`) instead of forwarding them.
const WRITTEN_HERE: [&str; 3] = ["upgrade", "host", "content-length"];

/// Parses a request head at the start of `buf`. `Ok(None)`: need more bytes. On success the
/// fields to forward are in `fields` (cleared first).
pub fn parse_request(buf: &[u8], fields: &mut Vec<Field>) -> Result<Option<RequestHead>, H1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(H1Error::Head(e)),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(H1Error::Head(httparse::Error::Token));
    };
    let hs: &[httparse::Header<'_>] = req.headers;

    let mut length = None;
    let mut te = None::<bool>; // Some(true): exactly one `chunked`
    let mut hosts = hs.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = hosts.next();
    let several_hosts = hosts.next().is_some();
    let mut upgrade = None;
    for h in hs {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length(&mut length, h.value)?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let mut codings = list(h.value);
            let only_chunked = te.is_none()
                && codings
                    .next()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                && codings.next().is_none();
            te = Some(only_chunked);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(String::from_utf8_lossy(h.value).into_owned());
        }
    }
    let body = match (te, length) {
        (Some(_), _) if minor == 0 => return Err(H1Error::TransferEncodingHttp10),
        (Some(_), Some(_)) => return Err(H1Error::BothFramings),
        (Some(false), None) => return Err(H1Error::TransferCoding),
        (Some(true), None) => BodyFraming::Chunked,
        (None, Some(n)) => BodyFraming::Length(n),
        (None, None) => BodyFraming::None,
    };

    // The authority: absolute-form wins over Host (RFC 9112 §3.2.2); userinfo is dropped.
    let mut origin_form = None;
    let authority = if !target.starts_with('/') && target != "*" && method != "CONNECT" {
        let uri: hyper::http::Uri = target.parse().map_err(|_| H1Error::Target)?;
        let Some(a) = uri.authority() else {
            return Err(H1Error::Target);
        };
        origin_form = Some(match uri.path_and_query().map(|p| p.as_str()) {
            Some(p) if p.starts_with('/') => p.to_string(),
            // `http://host?q`: the path is empty, the query stays.
            Some(p) => format!("/{p}"),
            None => "/".to_string(),
        });
        if several_hosts {
            Err("several Host headers")
        } else {
            Ok(match a.port() {
                Some(p) => format!("{}:{}", a.host(), p),
                None => a.host().to_string(),
            })
        }
    } else if several_hosts {
        Err("several Host headers")
    } else {
        match host {
            Some(h) if h.value.iter().all(|b| (0x20..0x7f).contains(b)) => {
                Ok(String::from_utf8_lossy(h.value).into_owned())
            }
            Some(_) => Err("the Host header is not ASCII"),
            None => Err("no Host header and no absolute-form authority"),
        }
    };

    let conn = connection_options(hs);
    fields.clear();
    for h in hs {
        if HOP_BY_HOP
            .iter()
            .chain(&WRITTEN_HERE)
            .any(|n| h.name.eq_ignore_ascii_case(n))
            || has_token(hs, "connection", h.name.as_bytes())
        {
            continue;
        }
        fields.push(Field {
            name: offset(buf, h.name.as_bytes()),
            value: offset(buf, h.value),
        });
    }
    // The head written upstream adds Host, a framing field and maybe `Connection: close`: it
    // must fit the same limit (an upstream like this parser would refuse it).
    if fields.len() + 3 > MAX_HEADERS {
        return Err(H1Error::Head(httparse::Error::TooManyHeaders));
    }
    Ok(Some(RequestHead {
        head_len,
        method: offset(buf, method.as_bytes()),
        target: offset(buf, target.as_bytes()),
        origin_form,
        minor,
        authority,
        body,
        closes: conn.close || (minor == 0 && !conn.keep_alive),
        upgrade,
        is_head: method == "HEAD",
        is_connect: method == "CONNECT",
    }))
}

/// Writes the head the upstream gets for `req` (parsed from `buf` with `fields`) into `out`:
/// the request line in origin-form, `Host: host`, the forwarded fields, one framing field, and
/// `Connection: close` when `close`.
pub fn write_request_head(
    buf: &[u8],
    req: &RequestHead,
    fields: &[Field],
    host: &str,
    close: bool,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&buf[req.method.clone()]);
    out.push(b' ');
    match &req.origin_form {
        Some(p) => out.extend_from_slice(p.as_bytes()),
        None => out.extend_from_slice(&buf[req.target.clone()]),
    }
    out.extend_from_slice(if req.minor == 0 {
        b" HTTP/1.0\r\nHost: "
    } else {
        b" HTTP/1.1\r\nHost: "
    });
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for f in fields {
        out.extend_from_slice(&buf[f.name.clone()]);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&buf[f.value.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    match req.body {
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyFraming::None | BodyFraming::UntilClose => {}
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head at the start of `buf`, to a request that was `HEAD` when
/// `head_request`. `Ok(None)`: need more bytes. The head is forwarded to the client as it came.
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, H1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(H1Error::Head(e)),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(H1Error::Head(httparse::Error::Status));
    };
    if status == 101 {
        return Err(H1Error::UnexpectedSwitch);
    }
    let hs: &[httparse::Header<'_>] = resp.headers;
    let mut length = None;
    let mut te: Option<bool> = None; // Some(true): the final coding is chunked
    for h in hs {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length(&mut length, h.value)?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Codings of several fields concatenate; the last one decides (RFC 9112 §6.3).
            if let Some(last) = list(h.value).last() {
                te = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        }
    }
    let conn = connection_options(hs);
    let mut persistent = if minor == 0 {
        conn.keep_alive && !conn.close
    } else {
        !conn.close
    };
    let body = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        BodyFraming::None
    } else {
        match te {
            Some(_) if minor == 0 => return Err(H1Error::TransferEncodingHttp10),
            Some(chunked) => {
                // Both framings: Transfer-Encoding wins, and the connection must not be reused
                // (RFC 9112 §6.3 item 3).
                if length.is_some() {
                    persistent = false;
                }
                if chunked {
                    BodyFraming::Chunked
                } else {
                    BodyFraming::UntilClose
                }
            }
            None => match length {
                Some(n) => BodyFraming::Length(n),
                None => BodyFraming::UntilClose,
            },
        }
    };
    if body == BodyFraming::UntilClose {
        persistent = false;
    }
    Ok(Some(ResponseHead {
        head_len,
        status,
        body,
        persistent,
    }))
}

/// Where a [`Chunked`] reader is in the body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size.
    #[default]
    Size,
    /// After the size: extensions until CR.
    Ext,
    /// The LF ending a size line.
    SizeLf,
    /// Chunk data (the remaining count is in `Chunked::size`).
    Data,
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer line (or of the final blank line).
    TrailerStart,
    /// A trailer field name.
    TrailerName,
    /// A trailer field's value until CR.
    TrailerValue,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The LF of the final blank line.
    EndLf,
    /// The body has ended.
    Done,
}

/// An incremental reader of chunked framing: it only finds where the body ends (the bytes are
/// forwarded as they came). Feed it every body byte once, in order, in any split.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    line: usize,
    trailers: usize,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Chunked {
    /// Whether the body has ended.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Reads body bytes from the start of `buf`; returns how many belong to the body (all of
    /// `buf`, or fewer when the body ended inside it).
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, H1Error> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() && self.state != Done {
            if self.state == Data {
                let take = (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = buf[i];
            i += 1;
            self.state = match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 16 {
                            return Err(H1Error::Chunked("chunk size too large"));
                        }
                        self.digits += 1;
                        // One hex digit: the shift cannot overflow with at most 16 digits.
                        self.size =
                            (self.size << 4) | u64::from((b as char).to_digit(16).unwrap_or(0));
                        Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => {
                        self.line = self.digits.into();
                        Ext
                    }
                    b'\r' if self.digits > 0 => SizeLf,
                    _ => return Err(H1Error::Chunked("invalid chunk size")),
                },
                Ext => match b {
                    b'\r' => SizeLf,
                    b';' | b'=' | b' ' | b'\t' => self.ext_byte()?,
                    _ if is_tchar(b) => self.ext_byte()?,
                    _ => return Err(H1Error::Chunked("invalid chunk extension")),
                },
                SizeLf => match b {
                    b'\n' if self.size == 0 => TrailerStart,
                    b'\n' => Data,
                    _ => return Err(H1Error::Chunked("chunk size line not ended by CRLF")),
                },
                DataCr => match b {
                    b'\r' => DataLf,
                    _ => return Err(H1Error::Chunked("chunk data not followed by CRLF")),
                },
                DataLf => match b {
                    b'\n' => {
                        self.digits = 0;
                        Size
                    }
                    _ => return Err(H1Error::Chunked("chunk data not followed by CRLF")),
                },
                TrailerStart => match b {
                    b'\r' => EndLf,
                    _ if is_tchar(b) => self.trailer_byte(TrailerName)?,
                    _ => return Err(H1Error::Chunked("invalid trailer field")),
                },
                TrailerName => match b {
                    b':' => self.trailer_byte(TrailerValue)?,
                    _ if is_tchar(b) => self.trailer_byte(TrailerName)?,
                    _ => return Err(H1Error::Chunked("invalid trailer field name")),
                },
                TrailerValue => match b {
                    b'\r' => TrailerLf,
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => self.trailer_byte(TrailerValue)?,
                    _ => return Err(H1Error::Chunked("invalid trailer field value")),
                },
                TrailerLf => match b {
                    b'\n' => TrailerStart,
                    _ => return Err(H1Error::Chunked("trailer line not ended by CRLF")),
                },
                EndLf => match b {
                    b'\n' => Done,
                    _ => return Err(H1Error::Chunked("last chunk not ended by CRLF")),
                },
                // Handled before a byte is taken; an error rather than a panic if that changes.
                Data | Done => return Err(H1Error::Chunked("internal state")),
            };
        }
        Ok(i)
    }

    fn ext_byte(&mut self) -> Result<ChunkState, H1Error> {
        self.line += 1;
        if self.line > MAX_CHUNK_LINE {
            return Err(H1Error::Chunked("chunk extensions too long"));
        }
        Ok(ChunkState::Ext)
    }

    fn trailer_byte(&mut self, next: ChunkState) -> Result<ChunkState, H1Error> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(H1Error::Chunked("trailer section too large"));
        }
        Ok(next)
    }
}

/// Tracks where a body of known framing ends, across reads.
#[derive(Debug, Clone)]
pub enum BodyReader {
    /// `n` bytes remain.
    Length(u64),
    /// Chunked framing.
    Chunked(Chunked),
    /// Until the sender closes.
    UntilClose,
}

impl BodyReader {
    /// A reader for a body framed as `f`.
    pub fn new(f: BodyFraming) -> Self {
        match f {
            BodyFraming::None => BodyReader::Length(0),
            BodyFraming::Length(n) => BodyReader::Length(n),
            BodyFraming::Chunked => BodyReader::Chunked(Chunked::default()),
            BodyFraming::UntilClose => BodyReader::UntilClose,
        }
    }

    /// Whether the body has ended (never for [`BodyReader::UntilClose`]).
    pub fn done(&self) -> bool {
        match self {
            BodyReader::Length(n) => *n == 0,
            BodyReader::Chunked(c) => c.done(),
            BodyReader::UntilClose => false,
        }
    }

    /// How many bytes at the start of `buf` belong to the body.
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, H1Error> {
        match self {
            BodyReader::Length(n) => {
                let take = buf.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                *n -= take as u64;
                Ok(take)
            }
            BodyReader::Chunked(c) => c.advance(buf),
            BodyReader::UntilClose => Ok(buf.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(s: &str) -> Result<Option<RequestHead>, H1Error> {
        parse_request(s.as_bytes(), &mut Vec::new())
    }

    fn upstream_head(s: &str, close: bool) -> String {
        let mut fields = Vec::new();
        let r = parse_request(s.as_bytes(), &mut fields).unwrap().unwrap();
        let mut out = Vec::new();
        let host = r.authority.clone().unwrap();
        write_request_head(s.as_bytes(), &r, &fields, &host, close, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn request_heads() {
        let r = req("GET /a?b HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.authority.as_deref(), Ok("web.test"));
        assert_eq!(r.body, BodyFraming::None);
        assert!(!r.closes && !r.is_head && r.upgrade.is_none());
        assert_eq!(req("GET / HTTP/1.1\r\nHost: web.test\r\n").unwrap(), None);
        assert_eq!(req("GET / HTTP/1.1\r\nHost: web").unwrap(), None);
        // Absolute-form wins; userinfo dropped; several Hosts and none refused.
        let r = req("GET http://u@web.test:8080/x?y HTTP/1.1\r\nHost: evil.test\r\n\r\n");
        assert_eq!(
            r.unwrap().unwrap().authority.as_deref(),
            Ok("web.test:8080")
        );
        let r = req("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.authority, Err("several Host headers"));
        let r = req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(r.authority.is_err() && r.closes);
        let r = parse_request(
            "GET / HTTP/1.1\r\nHost: wéb\r\n\r\n".as_bytes(),
            &mut Vec::new(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.authority, Err("the Host header is not ASCII"));
        // Connection options.
        assert!(
            req("GET / HTTP/1.1\r\nHost: a\r\nConnection: x, Close\r\n\r\n")
                .unwrap()
                .unwrap()
                .closes
        );
        assert!(
            !req("GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .closes
        );
        // Not HTTP, or not strict HTTP.
        assert!(req("GET  / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(req("GET / HTTP/1.1\r\nHost : a\r\n\r\n").is_err());
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n").is_err());
        assert!(req("GET http://[::1 HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        // The rewritten head must fit the field limit too.
        let fields = |n: usize| (0..n).map(|i| format!("X-{i}: v\r\n")).collect::<String>();
        assert!(req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", fields(97))).is_ok());
        assert_eq!(
            req(&format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", fields(98))),
            Err(H1Error::Head(httparse::Error::TooManyHeaders))
        );
    }

    #[test]
    fn request_framing_refuses_what_parsers_could_read_differently() {
        let f = |s: &str| req(s).map(|r| r.unwrap().body);
        let p = "POST / HTTP/1.1\r\nHost: a\r\n";
        assert_eq!(
            f(&format!("{p}Content-Length: 5\r\n\r\n")),
            Ok(BodyFraming::Length(5))
        );
        assert_eq!(
            f(&format!(
                "{p}Content-Length: 5\r\nContent-Length: 5, 5\r\n\r\n"
            )),
            Ok(BodyFraming::Length(5))
        );
        assert_eq!(
            f(&format!("{p}Transfer-Encoding: Chunked\r\n\r\n")),
            Ok(BodyFraming::Chunked)
        );
        for bad in [
            "Content-Length: 0\r\nContent-Length: 5",
            "Content-Length: 5, 6",
            "Content-Length: +5",
            "Content-Length: 0x5",
            "Content-Length: ",
            "Content-Length: 99999999999999999999",
        ] {
            assert_eq!(
                f(&format!("{p}{bad}\r\n\r\n")),
                Err(H1Error::ContentLength),
                "{bad}"
            );
        }
        assert_eq!(
            f(&format!(
                "{p}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            Err(H1Error::BothFramings)
        );
        for te in [
            "xchunked",
            "gzip, chunked",
            "chunked, chunked",
            "chunked;q=1",
            "identity",
        ] {
            assert_eq!(
                f(&format!("{p}Transfer-Encoding: {te}\r\n\r\n")),
                Err(H1Error::TransferCoding),
                "{te}"
            );
        }
        assert_eq!(
            f(&format!(
                "{p}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            Err(H1Error::TransferCoding)
        );
        assert_eq!(
            f("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(H1Error::TransferEncodingHttp10)
        );
        assert_eq!(H1Error::TransferCoding.status().0, 501);
    }

    #[test]
    fn upstream_head_is_rewritten() {
        let h = upstream_head(
            "GET http://web.test/x HTTP/1.1\r\nHost: evil.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Keep: 2\r\nTE: trailers\r\nProxy-Authorization: s\r\nContent-Length: 0\r\n\r\n",
            true,
        );
        assert_eq!(
            h,
            "GET /x HTTP/1.1\r\nHost: web.test\r\nX-Keep: 2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let h = upstream_head(
            "POST /p HTTP/1.1\r\nhost: web.test\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(
            h,
            "POST /p HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let h = upstream_head("GET http://web.test?q=1 HTTP/1.1\r\n\r\n", false);
        assert!(
            h.starts_with("GET /?q=1 HTTP/1.1\r\nHost: web.test\r\n"),
            "{h}"
        );
        let h = upstream_head("OPTIONS * HTTP/1.0\r\nHost: web.test\r\n\r\n", true);
        assert_eq!(
            h,
            "OPTIONS * HTTP/1.0\r\nHost: web.test\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn response_framing() {
        let f = |s: &str, head: bool| {
            parse_response(s.as_bytes(), head).map(|r| r.map(|r| (r.body, r.persistent)))
        };
        use BodyFraming::*;
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            Ok(Some((Length(2), true)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true),
            Ok(Some((None, true)))
        );
        assert_eq!(
            f("HTTP/1.1 204 No Content\r\n\r\n", false),
            Ok(Some((None, true)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            ),
            Ok(Some((None, true)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false
            ),
            Ok(Some((Chunked, true)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false
            ),
            Ok(Some((Chunked, false)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            Ok(Some((UntilClose, false)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\n\r\n", false),
            Ok(Some((UntilClose, false)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            ),
            Ok(Some((Length(0), false)))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
            Ok(Some((Length(0), false)))
        );
        assert_eq!(
            f(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                false
            ),
            Ok(Some((Length(0), true)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            ),
            Err(H1Error::ContentLength)
        );
        assert_eq!(
            f("HTTP/1.1 101 Switching Protocols\r\n\r\n", false),
            Err(H1Error::UnexpectedSwitch)
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\nContent-Le", false), Ok(Option::None));
        let r = parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n", false)
            .unwrap()
            .unwrap();
        assert!(r.is_interim() && r.head_len == 25);
    }

    fn chunked_end(body: &[u8]) -> Result<Option<usize>, H1Error> {
        let mut c = Chunked::default();
        let n = c.advance(body)?;
        Ok(c.done().then_some(n))
    }

    #[test]
    fn chunked_framing() {
        let ok =
            b"5\r\nhello\r\n1a;ext=v ; e2\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: v\r\n\r\nGET";
        assert_eq!(chunked_end(ok), Ok(Some(ok.len() - 3)));
        assert_eq!(chunked_end(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(chunked_end(b"5\r\nhel"), Ok(None));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"g\r\n",
            b"\r\n",
            b" 5\r\n",
            b"5;a=\"x\"\r\n",
            b"5;a\x01\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX-T: v\n\r\n",
            b"0\r\nX-T v\r\n\r\n",
            b"0\r\n\n",
            b"0\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                chunked_end(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Sixteen hex digits are the most.
        assert!(chunked_end(b"ffffffffffffffff\r\n").is_ok());
    }

    proptest! {
        /// Fed in any split, a chunked reader ends at the same byte as fed at once.
        #[test]
        fn chunked_split_invariant(
            sizes in proptest::collection::vec(0usize..40, 0..6),
            cuts in proptest::collection::vec(0usize..200, 0..8),
            tail in proptest::collection::vec(any::<u8>(), 0..10),
        ) {
            let mut body = Vec::new();
            for s in sizes.iter().filter(|s| **s > 0) {
                body.extend_from_slice(format!("{s:x}\r\n").as_bytes());
                body.extend(std::iter::repeat_n(b'x', *s));
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let end = body.len();
            body.extend_from_slice(&tail);
            prop_assert_eq!(chunked_end(&body), Ok(Some(end)));
            let mut c = Chunked::default();
            let mut pos = 0;
            let mut cuts: Vec<usize> = cuts.into_iter().map(|k| k.min(body.len())).collect();
            cuts.sort_unstable();
            cuts.push(body.len());
            for cut in cuts {
                if cut <= pos || c.done() { continue; }
                pos += c.advance(&body[pos..cut]).unwrap();
            }
            prop_assert!(c.done());
            prop_assert_eq!(pos, end);
        }

        /// Random bytes never panic any parser, and a reader never claims more than it was given.
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_request(&b, &mut Vec::new());
            let _ = parse_response(&b, false);
            let mut c = Chunked::default();
            if let Ok(n) = c.advance(&b) { prop_assert!(n <= b.len()); }
        }
    }
}
