//! The ClientHello judge of the TLS fast path, written once for the kernel and for user space.
//!
//! The `sk_msg` program (`passthrough-ebpf/src/sni.rs`) runs [`parse`] over the first bytes a
//! workload sends on a connection that went straight to a verified destination; user-space tests
//! and a fuzz target run the very same code over byte slices and hold it equal to the proxy's
//! reader (`passthrough-user/src/proxy/tls.rs`) and name rules (`policy::normalize_name`,
//! `policy::domain_matches`). Everything here is `no_std`, allocation-free, panic-free and built
//! from loops with constant bounds, because the BPF verifier must accept it.
//!
//! What it computes, in the proxy's terms (docs/security.md, "The proxy (L7)"):
//! - the record layer: handshake records (type 22, version 3.x, 1..=2^14 bytes) reassembled into
//!   one ClientHello handshake message; a first byte other than 22, or a version other than
//!   3.0–3.4 in the first record, is "not TLS";
//! - the ClientHello body: legacy version 3.x, session id of at most 32 bytes, a non-empty even
//!   list of cipher suites, non-empty compression methods, then (optionally) extensions that end
//!   exactly at the end of the message, no extension twice, a `server_name` list with exactly
//!   one non-empty `host_name`, a well-formed ALPN list, and the ECH flag;
//! - the name: upper case folded, a trailing dot kept (it makes another name, as Envoy compares
//!   server names), IPv4 literals refused (Rust's `Ipv4Addr` syntax after trailing dots: four
//!   decimal octets, no leading zeros), and only `[A-Za-z0-9_-]` labels of 1..=63 bytes in names
//!   of at most 253 bytes (254 with the dot). Nothing is trimmed: a name with any other byte
//!   (space, NUL, non-ASCII) is refused.
//!
//! Where the two differ, by design, the kernel refuses and the proxy may allow: hellos past
//! [`Limits`] (more bytes, records, extensions or list entries than the kernel walks). The
//! result is the same verdict for every ClientHello a TLS library sends, and fail-closed for
//! the rest.
//!
//! The name comes out *reversed* (`example.com` → `moc.elpmaxe`): the kernel looks it up in an
//! LPM trie keyed `table ‖ reversed name`, where one lookup finds the exact name and every `*.`
//! suffix at once (see [`SniNameKey`]).

/// TLS record content type of a handshake.
pub const HANDSHAKE: u8 = 22;
/// Handshake type of a ClientHello.
pub const CLIENT_HELLO: u8 = 1;
/// Bytes of a TLS record header.
pub const RECORD_HEADER: u32 = 5;
/// TLS plaintext records carry at most 2^14 bytes (RFC 8446 §5.1).
pub const MAX_RECORD: u32 = 1 << 14;
/// Longest host name (without the trailing dot), as DNS and the proxy's name rules allow.
pub const MAX_NAME: u32 = 253;
/// Longest label.
pub const MAX_LABEL: u32 = 63;
/// Bytes of the name part of an [`SniNameKey`]: a 253-byte name and its terminating 0, or a
/// 254-byte one (253 and a trailing dot) alone.
pub const SNI_KEY_NAME: usize = 254;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ECH: u16 = 0xfe0d;

/// Where the bytes come from: the first bytes a connection sends, from stream offset 0.
pub trait Stream {
    /// Byte `at` of the stream, `None` when it has not arrived (or is past what is held).
    fn byte(&self, at: u32) -> Option<u8>;
}

impl Stream for [u8] {
    #[inline(always)]
    fn byte(&self, at: u32) -> Option<u8> {
        self.get(at as usize).copied()
    }
}

/// How much of a ClientHello the judge walks before it gives up (refuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most stream bytes of the records that carry the hello (headers included).
    pub max_bytes: u32,
    /// Most records.
    pub max_records: u32,
    /// Most extensions.
    pub max_extensions: u32,
    /// Most entries of the `server_name` list and of the ALPN list.
    pub max_list_entries: u32,
}

/// The kernel's limits: a 16 KiB ClientHello in two records (the proxy's smallest
/// `--max-peek`), split over up to [`MAX_RECORDS`] records; 64 extensions (browsers send
/// about 20), 32 entries per list.
pub const KERNEL_LIMITS: Limits = Limits {
    max_bytes: 16 * 1024 + 2 * RECORD_HEADER + 4,
    max_records: MAX_RECORDS as u32,
    max_extensions: 64,
    max_list_entries: 32,
};

/// Why the judge stopped without a complete hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A prefix of a possibly valid ClientHello: the stream must hold at least this many bytes
    /// before the judge can go on (the end of the record being read, or of the next header).
    NeedMore(u32),
    /// The first bytes cannot start a TLS handshake record.
    NotTls,
    /// A TLS handshake that breaks the rules.
    Invalid(Invalid),
    /// Past the [`Limits`].
    TooLarge,
}

/// Which TLS rule was broken (the proxy's `TlsError`, by class).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Invalid {
    /// A record longer than 2^14 bytes.
    RecordTooLong = 1,
    /// A record of another type (or version) before the hello was complete.
    UnexpectedRecord = 2,
    /// An empty handshake record.
    EmptyRecord = 3,
    /// The first handshake message is not a ClientHello.
    NotClientHello = 4,
    /// A length points past its container, or a field is malformed.
    Malformed = 5,
    /// An extension appears twice.
    DuplicateExtension = 6,
    /// `server_name` carries two host names.
    TwoServerNames = 7,
}

/// What the hello says about its server name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name {
    /// No `server_name` extension, or one without a `host_name`.
    Absent,
    /// A valid host name of `len` bytes (lower case, reversed in the output buffer, a trailing
    /// dot kept) and `labels` labels (a trailing dot counts an empty last label, as the
    /// proxy's `domain_matches` splits names).
    Valid {
        /// Bytes.
        len: u32,
        /// Labels (dots + 1).
        labels: u32,
    },
    /// An IPv4 literal (after removing trailing dots).
    IpLiteral,
    /// Not a host name: empty, too long, an empty or long label, a byte outside
    /// `[A-Za-z0-9_-.]`.
    Bad,
}

/// A complete ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Its server name.
    pub name: Name,
    /// An `encrypted_client_hello` extension was present (the name is the outer one).
    pub ech: bool,
    /// Stream bytes of the records that carried it.
    pub record_bytes: u32,
}

/// Comparisons as 0/1 values without a branch.
///
/// Why: the verifier follows both sides of every conditional jump whose outcome it cannot
/// tell, and keeps the other side pending; a loop over 253 name bytes or 64 extensions with a
/// few such jumps per step leaves thousands pending (it allows 8,192 along one path) and
/// paths that multiply. BPF has no set-on-condition instruction, and LLVM turns any
/// arithmetic that computes a comparison (a borrow, a sign bit) back into a compare and a
/// branch. In the BPF build these are therefore three instructions of inline assembly the
/// compiler cannot see into; elsewhere they are plain Rust.
pub mod cmp {
    /// 1 when `a < b`, else 0.
    #[inline(always)]
    pub fn lt(a: u32, b: u32) -> u32 {
        #[cfg(target_arch = "bpf")]
        {
            let r: u64;
            // SAFETY: register arithmetic only. a - b as 64-bit values of 32-bit numbers is
            // negative exactly when a < b.
            unsafe {
                core::arch::asm!(
                    "{r} = {a}",
                    "{r} -= {b}",
                    "{r} >>= 63",
                    r = out(reg) r,
                    a = in(reg) u64::from(a),
                    b = in(reg) u64::from(b),
                    options(pure, nomem, nostack),
                );
            }
            r as u32
        }
        #[cfg(not(target_arch = "bpf"))]
        {
            u32::from(a < b)
        }
    }

    /// 1 when `x != 0`, else 0.
    #[inline(always)]
    pub fn nonzero(x: u32) -> u32 {
        lt(0, x)
    }

    /// 1 when `a == b`, else 0.
    #[inline(always)]
    pub fn eq(a: u32, b: u32) -> u32 {
        1 - nonzero(a ^ b)
    }
}

/// Most records a hello may span in the kernel. Real clients send one (two past 16 KiB).
pub const MAX_RECORDS: usize = 8;

/// Where the handshake message lies in the stream: the records carrying it, all complete.
/// Message offset `m` is stream offset `m + 5 * (k + 1)`, `k` the number of record bodies that
/// end at or before `m` ([`Layout::stream`]).
#[derive(Clone, Copy)]
struct Layout {
    /// Message offset where body `k` ends (`u32::MAX` past the last record).
    ends: [u32; MAX_RECORDS],
    /// Records used.
    records: u32,
    /// Message bytes available (the records' bodies).
    have: u32,
}

impl Layout {
    /// Stream offset of message byte `m`. Branch-free over the table (the verifier explores
    /// every branch of every read otherwise).
    #[inline(always)]
    fn stream(&self, m: u32) -> u32 {
        // k = records whose body ends at or before m = MAX_RECORDS - (those ending after m).
        let mut after = 0u32;
        let mut i = 0;
        while i < MAX_RECORDS {
            after += cmp::lt(m, self.ends[i]);
            i += 1;
        }
        let k = MAX_RECORDS as u32 - after;
        m.wrapping_add(RECORD_HEADER * (k + 1))
    }
}

/// Walks the record layer until the handshake message is complete (the proxy's reader does
/// the same: whole records, as many as the message takes).
#[inline(always)]
fn records<S: Stream + ?Sized>(s: &S, lim: &Limits) -> Result<(Layout, u32, u32), Stop> {
    let mut l = Layout {
        ends: [u32::MAX; MAX_RECORDS],
        records: 0,
        have: 0,
    };
    let mut pos = 0u32;
    let mut msg_len = u32::MAX;
    let max_records = if (lim.max_records as usize) < MAX_RECORDS {
        lim.max_records
    } else {
        MAX_RECORDS as u32
    };
    let mut k = 0usize;
    while k < MAX_RECORDS {
        if k as u32 >= max_records {
            return Err(Stop::TooLarge);
        }
        pos = settle(pos);
        let first = k == 0;
        if pos.saturating_add(RECORD_HEADER) > lim.max_bytes {
            return Err(Stop::TooLarge);
        }
        let need = Stop::NeedMore(pos + RECORD_HEADER);
        // The proxy reads a later record's header only once all five bytes are there (the
        // first one's type and version byte by byte, to tell "not TLS" early).
        if !first {
            s.byte(pos + RECORD_HEADER - 1).ok_or(need)?;
        }
        let t = s.byte(pos).ok_or(need)?;
        if t != HANDSHAKE {
            return Err(if first {
                Stop::NotTls
            } else {
                Stop::Invalid(Invalid::UnexpectedRecord)
            });
        }
        let major = s.byte(pos + 1).ok_or(need)?;
        if major != 3 {
            return Err(if first {
                Stop::NotTls
            } else {
                Stop::Invalid(Invalid::Malformed)
            });
        }
        let minor = s.byte(pos + 2).ok_or(need)?;
        if first && minor > 4 {
            return Err(Stop::NotTls);
        }
        let hi = s.byte(pos + 3).ok_or(need)?;
        let lo = s.byte(pos + 4).ok_or(need)?;
        let len = (u32::from(hi) << 8) | u32::from(lo);
        if len > MAX_RECORD {
            return Err(Stop::Invalid(Invalid::RecordTooLong));
        }
        if len == 0 {
            return Err(Stop::Invalid(Invalid::EmptyRecord));
        }
        let body = pos + RECORD_HEADER;
        // A handshake type other than ClientHello is refused before its record completes,
        // as the proxy does.
        if first
            && let Some(ty) = s.byte(body)
            && ty != CLIENT_HELLO
        {
            return Err(Stop::Invalid(Invalid::NotClientHello));
        }
        let end = body + len;
        if end > lim.max_bytes {
            return Err(Stop::TooLarge);
        }
        s.byte(end - 1).ok_or(Stop::NeedMore(end))?;
        l.have += len;
        if let Some(e) = l.ends.get_mut(k) {
            *e = l.have;
        }
        l.records += 1;
        pos = end;
        if msg_len == u32::MAX && l.have >= 4 {
            let b = |m: u32| s.byte(l.stream(m)).ok_or(Stop::TooLarge);
            msg_len = (u32::from(b(1)?) << 16) | (u32::from(b(2)?) << 8) | u32::from(b(3)?);
            if msg_len > lim.max_bytes {
                return Err(Stop::TooLarge);
            }
        }
        if msg_len != u32::MAX && l.have >= 4 + msg_len {
            return Ok((l, msg_len, pos));
        }
        k += 1;
    }
    Err(Stop::TooLarge)
}

/// Reads the (complete) handshake message through its [`Layout`].
struct Msg<'a, S: Stream + ?Sized> {
    s: &'a S,
    l: Layout,
    /// Message offset of the next unread byte.
    at: u32,
    /// End of the message.
    end: u32,
}

impl<S: Stream + ?Sized> Msg<'_, S> {
    /// Byte `m` of the message (a missing byte cannot happen: the records are complete).
    #[inline(always)]
    fn get(&self, m: u32) -> Result<u8, Stop> {
        if m >= self.end {
            return Err(Stop::Invalid(Invalid::Malformed));
        }
        self.s
            .byte(self.l.stream(m))
            .ok_or(Stop::Invalid(Invalid::Malformed))
    }

    #[inline(always)]
    fn u8(&mut self) -> Result<u8, Stop> {
        let b = self.get(self.at)?;
        self.at += 1;
        Ok(b)
    }

    #[inline(always)]
    fn u16(&mut self) -> Result<u16, Stop> {
        let hi = self.u8()?;
        let lo = self.u8()?;
        Ok((u16::from(hi) << 8) | u16::from(lo))
    }

    /// Called at the top of every loop iteration: bounds the position with a mask the
    /// compiler cannot drop. Every offset is below [`WINDOW`], so it changes nothing here; for
    /// the verifier it makes the states of different paths at the loop head comparable (it
    /// prunes a state whose ranges lie within one it has seen), which keeps the paths it
    /// walks from multiplying with each iteration.
    #[inline(always)]
    fn settle(&mut self) {
        self.at = settle(self.at);
    }

    /// Skips `n` bytes that must fit before `end` (message offsets).
    #[inline(always)]
    fn skip(&mut self, n: u32, end: u32) -> Result<(), Stop> {
        fits(self.at, n, end)?;
        self.at += n;
        Ok(())
    }
}

/// Offsets are below this (the largest [`Limits::max_bytes`] is smaller).
pub const WINDOW: u32 = 1 << 15;

/// `x` masked to [`WINDOW`] through a volatile read, so the mask stays in the compiled code
/// (see [`Msg::settle`]).
#[inline(always)]
fn settle(x: u32) -> u32 {
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&x) & (WINDOW - 1) }
}

/// `n` more bytes must fit before `end` (message offsets).
#[inline(always)]
fn fits(at: u32, n: u32, end: u32) -> Result<(), Stop> {
    if at.saturating_add(n) > end {
        Err(Stop::Invalid(Invalid::Malformed))
    } else {
        Ok(())
    }
}

/// What the first phase ([`scan`]) found, for the later ones: the layout of the records, the
/// message's end and where the extensions the judge reads lie (message offsets). Kept in the
/// socket's storage between the kernel's phases, which run as separate programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Message offset where each record body ends (`u32::MAX` past the last record).
    pub ends: [u32; MAX_RECORDS],
    /// End of the handshake message (message offset).
    pub end: u32,
    /// Stream bytes of the records that carried the hello.
    pub record_bytes: u32,
    /// The `server_name` extension's data (offset, length), if [`scan_flag::SERVER_NAME`]
    /// (the name phase reuses it as scratch: `Scan::spill`).
    pub server_name: [u32; 2],
    /// The ALPN extension's data, if [`scan_flag::ALPN`] (the name phase reuses it as
    /// scratch: `Scan::spill`).
    pub alpn: [u32; 2],
    /// The `host_name` entry (offset, length), if [`scan_flag::HOST`].
    pub host: [u32; 2],
    /// [`scan_flag`] bits.
    pub flags: u32,
}

/// Bits of [`Scan::flags`].
pub mod scan_flag {
    /// A `server_name` extension is present.
    pub const SERVER_NAME: u32 = 1;
    /// An ALPN extension is present.
    pub const ALPN: u32 = 2;
    /// An `encrypted_client_hello` extension is present.
    pub const ECH: u32 = 4;
    /// The `server_name` list holds a `host_name` ([`super::Scan::host`]).
    pub const HOST: u32 = 8;
}

impl Scan {
    /// The name walk's counters written into `alpn` and `server_name` (the earlier phases'
    /// offsets, which nothing reads after the name phase starts) and read back with the name's
    /// length, all through volatile accesses the compiler keeps: in the kernel this is socket
    /// storage, so what comes back is unknown to the verifier, the same after every exit of the
    /// walk (see `host_name`). Changes no value.
    #[inline(always)]
    fn spill(&mut self, s: NameShape) -> (NameShape, u32) {
        // SAFETY: volatile accesses to fields of `self`.
        unsafe {
            core::ptr::write_volatile(&mut self.alpn[0], s.bad);
            core::ptr::write_volatile(&mut self.alpn[1], s.other);
            core::ptr::write_volatile(&mut self.server_name[0], s.label);
            core::ptr::write_volatile(&mut self.server_name[1], s.dots);
            (
                NameShape {
                    bad: core::ptr::read_volatile(&self.alpn[0]),
                    other: core::ptr::read_volatile(&self.alpn[1]),
                    label: core::ptr::read_volatile(&self.server_name[0]),
                    dots: core::ptr::read_volatile(&self.server_name[1]),
                },
                core::ptr::read_volatile(&self.host[1]),
            )
        }
    }

    #[inline(always)]
    fn layout(&self) -> Layout {
        Layout {
            ends: self.ends,
            records: 0,
            have: 0,
        }
    }
}

/// Judges the first bytes of a connection: all phases, as user space runs them. On `Ok`, a
/// [`Name::Valid`] name is in `out`, reversed, lower case, followed by a 0 byte.
pub fn parse<S: Stream + ?Sized>(
    s: &S,
    lim: Limits,
    out: &mut [u8; SNI_KEY_NAME],
) -> Result<Hello, Stop> {
    let mut sc = Scan::default();
    scan(s, &lim, &mut sc)?;
    names(s, &lim, &mut sc)?;
    let name = name(s, &mut sc, out)?;
    Ok(Hello {
        name,
        ech: sc.flags & scan_flag::ECH != 0,
        record_bytes: sc.record_bytes,
    })
}

/// Phase 1: the record layer, the hello's fixed fields, and the list of extensions (each
/// fits, none twice), into `sc`. `Err(NeedMore)` can only come from here.
///
/// The phases write what they find into `sc` as they go rather than into locals: in the
/// kernel `sc` is socket storage, whose contents the verifier does not track, so paths that
/// found different offsets do not stay apart (locals would keep them apart, and their number
/// would multiply with every loop iteration).
#[inline(always)]
pub fn scan<S: Stream + ?Sized>(s: &S, lim: &Limits, sc: &mut Scan) -> Result<(), Stop> {
    let (layout, len, record_bytes) = records(s, lim)?;
    let end = 4 + len;
    sc.ends = layout.ends;
    sc.end = end;
    sc.record_bytes = record_bytes;
    sc.flags = 0;
    let mut c = Msg {
        s,
        l: layout,
        at: 4,
        end,
    };
    let major = c.u8()?;
    let _minor = c.u8()?;
    if major != 3 {
        return Err(Stop::Invalid(Invalid::Malformed));
    }
    c.skip(32, end)?;
    let sid = u32::from(c.u8()?);
    if sid > 32 {
        return Err(Stop::Invalid(Invalid::Malformed));
    }
    c.skip(sid, end)?;
    let suites = u32::from(c.u16()?);
    if suites == 0 || suites % 2 != 0 {
        return Err(Stop::Invalid(Invalid::Malformed));
    }
    c.skip(suites, end)?;
    let comp = u32::from(c.u8()?);
    if comp == 0 {
        return Err(Stop::Invalid(Invalid::Malformed));
    }
    c.skip(comp, end)?;
    if c.at < end {
        let exts = u32::from(c.u16()?);
        // The extensions must end exactly where the message ends.
        if c.at + exts != end {
            return Err(Stop::Invalid(Invalid::Malformed));
        }
        extensions(&mut c, lim, sc)?;
    }
    Ok(())
}

/// Phase 2: the ALPN list and the `server_name` list; finds the `host_name`.
#[inline(always)]
pub fn names<S: Stream + ?Sized>(s: &S, lim: &Limits, sc: &mut Scan) -> Result<(), Stop> {
    let mut c = Msg {
        s,
        l: sc.layout(),
        at: 0,
        end: sc.end,
    };
    if sc.flags & scan_flag::ALPN != 0 {
        c.at = sc.alpn[0];
        alpn(&mut c, sc.alpn[0].saturating_add(sc.alpn[1]), lim)?;
    }
    if sc.flags & scan_flag::SERVER_NAME != 0 {
        c.at = sc.server_name[0];
        let end = sc.server_name[0].saturating_add(sc.server_name[1]);
        server_name(&mut c, end, lim, sc)?;
    }
    Ok(())
}

/// Phase 3: the `host_name`, normalised into `out` (reversed, 0-terminated).
#[inline(always)]
pub fn name<S: Stream + ?Sized>(
    s: &S,
    sc: &mut Scan,
    out: &mut [u8; SNI_KEY_NAME],
) -> Result<Name, Stop> {
    if sc.flags & scan_flag::HOST == 0 {
        return Ok(Name::Absent);
    }
    let c = Msg {
        s,
        l: sc.layout(),
        at: sc.host[0],
        end: sc.end,
    };
    host_name(&c, sc, out)
}

/// Walks the extensions block `[c.at, c.end)`: every extension fits, none appears twice.
/// The ones that matter are parsed in the next phase, once (a parse inside this loop would be
/// verified once per iteration).
#[inline(always)]
fn extensions<S: Stream + ?Sized>(
    c: &mut Msg<'_, S>,
    lim: &Limits,
    sc: &mut Scan,
) -> Result<(), Stop> {
    let end = c.end;
    let mut seen = [0u16; KERNEL_LIMITS.max_extensions as usize];
    let mut n = 0u32;
    while n < KERNEL_LIMITS.max_extensions && c.at < end {
        c.settle();
        if n >= lim.max_extensions {
            return Err(Stop::TooLarge);
        }
        let ty = c.u16()?;
        let len = u32::from(c.u16()?);
        let at = c.at;
        c.skip(len, end)?;
        // Counted without a branch per earlier extension ([`cmp`]): a compare-and-branch each
        // would leave the verifier ~2,000 pending branches for 64 extensions.
        let mut same = 0u32;
        let mut k = 0usize;
        while k < seen.len() && (k as u32) < n {
            same += cmp::eq(u32::from(seen[k]), u32::from(ty));
            k += 1;
        }
        if same != 0 {
            return Err(Stop::Invalid(Invalid::DuplicateExtension));
        }
        if let Some(slot) = seen.get_mut(n as usize) {
            *slot = ty;
        }
        n += 1;
        match ty {
            EXT_SERVER_NAME => {
                sc.server_name = [at, len];
                sc.flags |= scan_flag::SERVER_NAME;
            }
            EXT_ALPN => {
                sc.alpn = [at, len];
                sc.flags |= scan_flag::ALPN;
            }
            EXT_ECH => sc.flags |= scan_flag::ECH,
            _ => {}
        }
    }
    if c.at < end {
        return Err(Stop::TooLarge);
    }
    Ok(())
}

/// The ALPN extension: a list of names; bytes after the list are ignored, as the proxy
/// ignores them.
#[inline(always)]
fn alpn<S: Stream + ?Sized>(c: &mut Msg<'_, S>, data_end: u32, lim: &Limits) -> Result<(), Stop> {
    fits(c.at, 2, data_end)?;
    let list = u32::from(c.u16()?);
    fits(c.at, list, data_end)?;
    let list_end = c.at + list;
    let mut i = 0;
    while i < KERNEL_LIMITS.max_list_entries && c.at < list_end {
        c.settle();
        if i >= lim.max_list_entries {
            return Err(Stop::TooLarge);
        }
        fits(c.at, 1, list_end)?;
        let n = u32::from(c.u8()?);
        c.skip(n, list_end)?;
        i += 1;
    }
    if c.at < list_end {
        return Err(Stop::TooLarge);
    }
    Ok(())
}

/// The `server_name` extension: exactly one non-empty `host_name` (entries of other name
/// types are skipped), the list filling the extension exactly. Records where the name lies.
#[inline(always)]
fn server_name<S: Stream + ?Sized>(
    c: &mut Msg<'_, S>,
    data_end: u32,
    lim: &Limits,
    sc: &mut Scan,
) -> Result<(), Stop> {
    fits(c.at, 2, data_end)?;
    let list = u32::from(c.u16()?);
    if c.at + list != data_end || list == 0 {
        return Err(Stop::Invalid(Invalid::Malformed));
    }
    let mut i = 0;
    while i < KERNEL_LIMITS.max_list_entries && c.at < data_end {
        c.settle();
        if i >= lim.max_list_entries {
            return Err(Stop::TooLarge);
        }
        fits(c.at, 3, data_end)?;
        let ty = c.u8()?;
        let n = u32::from(c.u16()?);
        let at = c.at;
        c.skip(n, data_end)?;
        if ty == 0 {
            if n == 0 {
                return Err(Stop::Invalid(Invalid::Malformed));
            }
            if sc.flags & scan_flag::HOST != 0 {
                return Err(Stop::Invalid(Invalid::TwoServerNames));
            }
            sc.host = [at, n];
            sc.flags |= scan_flag::HOST;
        }
        i += 1;
    }
    if c.at < data_end {
        return Err(Stop::TooLarge);
    }
    Ok(())
}

/// Normalises the `host_name` of `n` bytes at message offset `at` into `out` (reversed, lower
/// case, a trailing dot kept).
#[inline(always)]
fn host_name<S: Stream + ?Sized>(
    c: &Msg<'_, S>,
    sc: &mut Scan,
    out: &mut [u8; SNI_KEY_NAME],
) -> Result<Name, Stop> {
    let (at, n) = (sc.host[0], sc.host[1]);
    if n > MAX_NAME + 1 {
        // Longer than any host name even with its trailing dot.
        return Ok(Name::Bad);
    }
    // A trailing dot is part of the name (`example.com.` is another name than `example.com`,
    // as Envoy compares server names), but not of its last label for the syntax check.
    let dot = u32::from(c.get(at + n - 1)? == b'.');
    let len = n - dot;
    // Two walks of a fixed number of steps each, whatever the length: a short name (the
    // common case) takes SHORT_NAME steps, a longer one all 254 (walking them all was most
    // of the judge's time: ~2.5 µs per connection for the benchmark's `bench.test`). A loop
    // that ends at a data-dependent step would leave the verifier one state per possible end
    // to carry through the rest of the program. The two walks reach the rest in states of
    // their own (other bounds on the counters and on `n`), so after the walk the counters
    // and `n` go through the socket's storage ([`Scan::spill`]), whose contents the verifier
    // does not track: the second walk reaches the rest in the state of the first.
    let shape = if n <= SHORT_NAME {
        walk::<S, SHORT_NAME>(c, at, n, len, out)?
    } else {
        walk::<S, { MAX_NAME + 1 }>(c, at, n, len, out)?
    };
    // `n` comes back unknown: the mask (below 256, as checked above: it changes nothing)
    // bounds it for the verifier again.
    let (shape, n) = sc.spill(shape);
    let n = n & 0xff;
    let len = n - dot;
    // The terminating 0 (a 254-byte name fills the key: no longer name exists).
    if let Some(o) = out.get_mut(n as usize) {
        *o = 0;
    }
    if shape.other == 0 && ipv4_literal(out, n) {
        return Ok(Name::IpLiteral);
    }
    match shape.finish(len) {
        // Labels as the proxy splits the name: a trailing dot ends an empty last one.
        Some(labels) => Ok(Name::Valid {
            len: n,
            labels: labels + dot,
        }),
        None => Ok(Name::Bad),
    }
}

/// Names up to this many bytes take [`host_name`]'s short walk.
const SHORT_NAME: u32 = 32;

/// `STEPS` steps over the `n` bytes of the name at `at` (`STEPS` ≥ `n`): its shape, and the
/// name reversed and case-folded into `out`. Steps past the name re-read its first byte and
/// change nothing (`live` = 0).
#[inline(always)]
fn walk<S: Stream + ?Sized, const STEPS: u32>(
    c: &Msg<'_, S>,
    at: u32,
    n: u32,
    len: u32,
    out: &mut [u8; SNI_KEY_NAME],
) -> Result<NameShape, Stop> {
    let mut shape = NameShape::new();
    let mut i = 0u32;
    while i < STEPS {
        let live = cmp::lt(i, n);
        // In bounds: `server_name` checked the entry against its container.
        let Some(b) = c.s.byte(c.l.stream(at + i * live)) else {
            return Err(Stop::Invalid(Invalid::Malformed));
        };
        let class = class_of(b);
        shape.feed(class, cmp::lt(i, len));
        // Reversed: byte i of the name lands at n - 1 - i (past the name: the last slot,
        // which the terminating 0 or an unused tail covers); upper case folded by the class
        // table.
        let slot = (n.wrapping_sub(1 + i) * live) + (SNI_KEY_NAME as u32 - 1) * (1 - live);
        if let Some(o) = out.get_mut(slot as usize) {
            *o = b | (class & LOWER_BIT);
        }
        i += 1;
    }
    Ok(shape)
}

/// Whether the reversed name in `out[..len]` is, trailing dots removed, an IPv4 literal in
/// Rust's `Ipv4Addr` syntax (what the proxy's `parse_go_ip` accepts without a colon): four
/// decimal octets of one to three digits, at most 255, no leading zero. Only names of digits
/// and dots get here.
///
/// One difference in reason, none in verdict: the proxy strips any number of trailing dots,
/// this at most 16 (`1.2.3.4` and 17 dots is "not a host name" here, an "IP literal" there;
/// both are refused).
#[inline(always)]
fn ipv4_literal(out: &[u8; SNI_KEY_NAME], len: u32) -> bool {
    // Trailing dots are leading in the reversed name.
    let mut t = 0u32;
    while t < 16 && t < len && out.get(t as usize) == Some(&b'.') {
        t += 1;
    }
    if len - t > 15 || len == t {
        return false;
    }
    // Octets from the last (reversed order): digits units first.
    let mut octets = 0u32;
    let mut digits = 0u32;
    let mut value = 0u32;
    let mut scale = 1u32;
    let mut last = 0u8;
    let mut i = t;
    while i < t + 16 && i < len {
        let b = out.get(i as usize).copied().unwrap_or(0);
        if b == b'.' {
            if digits == 0 || value > 255 || (digits > 1 && last == b'0') {
                return false;
            }
            octets += 1;
            digits = 0;
            value = 0;
            scale = 1;
        } else {
            digits += 1;
            if digits > 3 {
                return false;
            }
            value += u32::from(b - b'0') * scale;
            scale *= 10;
            last = b;
        }
        i += 1;
    }
    digits > 0 && value <= 255 && !(digits > 1 && last == b'0') && octets == 3
}

/// Class bits of a byte ([`CLASS`]). `LOWER_BIT` is 0x20 itself: OR-ing a byte with its
/// class & 0x20 folds upper case and changes nothing else.
const LOWER_BIT: u8 = 0x20;
/// A host-name byte other than the dot: `[A-Za-z0-9_-]`.
const HOST: u8 = 0x01;
/// A decimal digit.
const DIGIT: u8 = 0x02;
/// The dot.
const DOT: u8 = 0x04;

/// The class of every byte, one table lookup instead of a chain of comparisons (each of which
/// the verifier explores both ways, for every byte of a name).
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        let mut v = 0;
        if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
            v |= HOST;
        }
        if c.is_ascii_digit() {
            v |= DIGIT;
        }
        if c == b'.' {
            v |= DOT;
        }
        if c.is_ascii_uppercase() {
            v |= LOWER_BIT;
        }
        t[b] = v;
        b += 1;
    }
    t
};

#[inline(always)]
fn class_of(b: u8) -> u8 {
    CLASS[b as usize]
}

/// Host-name syntax, fed one byte class at a time, without branches ([`cmp`]: a name is up
/// to 253 bytes).
#[derive(Clone, Copy)]
struct NameShape {
    /// Non-zero once the name is not a host name.
    bad: u32,
    /// Bytes that are neither digits nor dots (0: the name may be an IPv4 literal).
    other: u32,
    /// Bytes of the current label.
    label: u32,
    /// Dots seen.
    dots: u32,
}

impl NameShape {
    #[inline(always)]
    fn new() -> Self {
        NameShape {
            bad: 0,
            other: 0,
            label: 0,
            dots: 0,
        }
    }

    /// Feeds one byte's class; `live` 0 feeds nothing.
    #[inline(always)]
    fn feed(&mut self, class: u8, live: u32) {
        let host = u32::from(class & HOST) & live;
        let dot = (u32::from(class & DOT) >> 2) & live;
        // Past the name, count as a host-name digit byte: no error, no dot, and the label
        // counter is put back below.
        let digit = (u32::from(class & DIGIT) >> 1) | (1 - live);
        let label = self.label;
        let nonempty = cmp::nonzero(self.label);
        // Neither a host-name byte nor a dot; or a dot ending an empty label.
        self.bad |= (1 - host) & (1 - dot) & live;
        self.bad |= dot & (1 - nonempty);
        self.other += (1 - digit) & (1 - dot);
        self.dots += dot;
        self.label = ((self.label + host) * (1 - dot)) * live + label * (1 - live);
        // A label past 63 bytes.
        self.bad |= cmp::lt(MAX_LABEL, self.label);
    }

    /// Labels, if the name of `len` bytes was a host name.
    #[inline(always)]
    fn finish(self, len: u32) -> Option<u32> {
        if self.bad == 0 && self.label > 0 && len > 0 && len <= MAX_NAME {
            Some(self.dots + 1)
        } else {
            None
        }
    }
}

/// Data of a key of the `SNI_NAMES` LPM trie: the SNI table (one per rule set and port, see
/// [`SniTable`]), then a name reversed and 0-terminated (a 254-byte name, the longest there is,
/// fills the key without its 0).
///
/// Why reversed and an LPM trie: `*.example.com` is the prefix `moc.elpmaxe.` of every name
/// below `example.com` (at any depth) and of no other name (`badexample.com` reversed has `d`
/// where the pattern has `.`), an exact name is its reversed bytes with the terminating 0 (a
/// longer name has a `.` there), and `*` alone is the table prefix. So one longest-prefix
/// lookup answers for exact names and wildcards together, with full names as keys: nothing an
/// attacker can collide. The value ([`SniNameValue`]) carries what the longest entry cannot
/// say by itself (patterns like `*.*.example.com` need more labels).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniNameKey {
    /// [`SniTable::id`], big-endian (the trie compares bytes from the first bit).
    pub table_be: u16,
    /// The reversed name and its 0 byte; for a wildcard entry the reversed suffix and a `.`.
    pub name: [u8; SNI_KEY_NAME],
}

/// Bits of the LPM prefix taken by the table id.
pub const SNI_KEY_TABLE_BITS: u32 = 16;

/// Value of an `SNI_NAMES` entry: a name matches when it has at least `min_labels` labels.
/// Exact entries have 0; a wildcard entry has the smallest, over itself and every shorter
/// wildcard entry of its table that is a prefix of it, of (its `*.` count + its suffix's
/// labels) — computed by the agent, so that the longest match alone decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SniNameValue {
    /// Labels the name needs.
    pub min_labels: u32,
}

/// Key of the `SNI_TABLES` hash: a rule set and a port (0: the port-less matches).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SniTableKey {
    /// Rule set id (with generation bit).
    pub ruleset: u32,
    /// Port in host order; 0 = the table of a rule set's port-less TLS Domain matches.
    pub port: u32,
}

/// Value of `SNI_TABLES`: the table of TLS Domain patterns for one rule set and port (the
/// port's own patterns and the port-less ones).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SniTable {
    /// Table id in `SNI_NAMES` keys (never 0).
    pub id: u16,
    /// Explicit padding.
    pub _pad: u16,
}

/// Whether a valid name of `labels` labels matching an `SNI_NAMES` entry with `value` is
/// allowed (see [`SniNameValue`]).
#[inline(always)]
pub fn name_allowed(labels: u32, value: &SniNameValue) -> bool {
    labels >= value.min_labels
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use passthrough_testhello::{Hello, ext, grease, records};
    use std::vec::Vec;

    fn name_of(b: &[u8]) -> (Name, std::string::String) {
        let mut out = [0xaa; SNI_KEY_NAME];
        let h = parse(b, KERNEL_LIMITS, &mut out).expect("a hello");
        let s = match h.name {
            Name::Valid { len, .. } => {
                let mut v = out[..len as usize].to_vec();
                if (len as usize) < SNI_KEY_NAME {
                    assert_eq!(out[len as usize], 0);
                }
                v.reverse();
                std::string::String::from_utf8(v).unwrap()
            }
            _ => std::string::String::new(),
        };
        (h.name, s)
    }

    #[test]
    fn names_are_normalised_and_reversed() {
        let b = Hello::new().server_name(b"Api.Example.COM").record();
        assert_eq!(
            name_of(&b),
            (Name::Valid { len: 15, labels: 3 }, "api.example.com".into())
        );
        // A trailing dot is part of the name (and ends an empty label).
        let b = Hello::new().server_name(b"Api.Example.COM.").record();
        assert_eq!(
            name_of(&b),
            (
                Name::Valid { len: 16, labels: 4 },
                "api.example.com.".into()
            )
        );
        for (raw, want) in [
            (&b"1.2.3.4"[..], Name::IpLiteral),
            (b"1.2.3.4.", Name::IpLiteral),
            (b"1.2.3.4..", Name::IpLiteral),
            (b"01.2.3.4", Name::Valid { len: 8, labels: 4 }),
            (b"1.2.3.256", Name::Valid { len: 9, labels: 4 }),
            (b"1.2.3", Name::Valid { len: 5, labels: 3 }),
            (b"a..b", Name::Bad),
            (b".a", Name::Bad),
            (b".", Name::Bad),
            (b"a b", Name::Bad),
            (b" a", Name::Bad),
            (b"a\0.com", Name::Bad),
            (b"under_score.x", Name::Valid { len: 13, labels: 2 }),
        ] {
            let b = Hello::new().server_name(raw).record();
            assert_eq!(
                name_of(&b).0,
                want,
                "{:?}",
                std::string::String::from_utf8_lossy(raw)
            );
        }
        let long = [b'a'; 64];
        let b = Hello::new().server_name(&long).record();
        assert_eq!(name_of(&b).0, Name::Bad);
    }

    #[test]
    fn every_prefix_needs_more_and_records_split() {
        let msg = Hello::new()
            .ext(grease(0), b"")
            .server_name(b"x.example.org")
            .alpn(&[b"h2"])
            .message();
        for chunk in [1usize, 3, 20, 50, 1 << 14] {
            let b = records(&msg, chunk);
            let mut out = [0; SNI_KEY_NAME];
            if b.len() as u32 > KERNEL_LIMITS.max_bytes || msg.len().div_ceil(chunk) > MAX_RECORDS {
                assert_eq!(parse(&b[..], KERNEL_LIMITS, &mut out), Err(Stop::TooLarge));
                continue;
            }
            for n in 0..b.len() {
                match parse(&b[..n], KERNEL_LIMITS, &mut out) {
                    Err(Stop::NeedMore(t)) => assert!(t as usize > n, "chunk {chunk} prefix {n}"),
                    other => panic!("chunk {chunk} prefix {n}: {other:?}"),
                }
            }
            let h = parse(&b[..], KERNEL_LIMITS, &mut out).unwrap();
            assert_eq!(h.record_bytes as usize, b.len());
            assert_eq!(name_of(&b).1, "x.example.org");
        }
    }

    #[test]
    fn odd_hellos() {
        let mut out = [0; SNI_KEY_NAME];
        let p = |b: &[u8], out: &mut [u8; SNI_KEY_NAME]| parse(b, KERNEL_LIMITS, out);
        assert_eq!(
            p(&Hello::new().records(99), &mut out).unwrap().name,
            Name::Absent
        );
        assert_eq!(
            p(
                &Hello::new().server_names(&[b"a.com", b"b.com"]).record(),
                &mut out
            ),
            Err(Stop::Invalid(Invalid::TwoServerNames))
        );
        assert_eq!(
            p(
                &Hello::new()
                    .server_name(b"a.com")
                    .server_name(b"b.com")
                    .record(),
                &mut out
            ),
            Err(Stop::Invalid(Invalid::DuplicateExtension))
        );
        assert_eq!(p(b"GET / HTTP/1.1\r\n", &mut out), Err(Stop::NotTls));
        assert_eq!(p(&[22, 2], &mut out), Err(Stop::NotTls));
        assert_eq!(p(&[22, 3, 5], &mut out), Err(Stop::NotTls));
        assert_eq!(
            p(&Hello::new().msg_type(2).record()[..6], &mut out),
            Err(Stop::Invalid(Invalid::NotClientHello))
        );
        let h = p(
            &Hello::new().ext(EXT_ECH, b"x").server_name(b"a.b").record(),
            &mut out,
        )
        .unwrap();
        assert!(h.ech);
        // Lengths that lie: an extensions block longer than the hello, a handshake header
        // shorter than the fields it holds.
        for lying in [
            Hello::new().server_name(b"a.b").extensions_len(0xffff),
            Hello::new().server_name(b"a.b").handshake_len(40),
        ] {
            assert_eq!(
                p(&lying.record(), &mut out),
                Err(Stop::Invalid(Invalid::Malformed)),
                "{lying:?}"
            );
        }
        // 65 extensions: past the kernel's limit.
        let many: Vec<Vec<u8>> = (0..65u16).map(|i| ext(0x1000 + i, b"")).collect();
        assert_eq!(
            p(&Hello::new().raw_exts(many).record(), &mut out),
            Err(Stop::TooLarge)
        );
    }
}
