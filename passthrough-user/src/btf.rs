//! Reads member offsets of kernel structs from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for the few fields the TLS fast path reads from `struct tcp_sock`
//! (see [`passthrough_common::TcpOffsets`]).
//!
//! Why by hand: the programs are Rust, so the compiler emits no CO-RE relocations; the loader
//! resolves the offsets instead and hands them over as a read-only global, which the verifier
//! treats as constants and checks against the same BTF. The format is the kernel's documented
//! one (`Documentation/bpf/btf.rst`); only what finding a struct member needs is parsed.

use std::collections::HashMap;

use passthrough_common::TcpOffsets;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// One member of a struct or union.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name ("" for an anonymous struct/union).
    pub name: String,
    /// Type id.
    pub ty: u32,
    /// Offset in bits from the start of the containing struct.
    pub bit_offset: u32,
    /// Bitfield size in bits (0: not a bitfield).
    pub bits: u32,
}

/// The structs and unions of a BTF blob, by type id.
#[derive(Debug, Default)]
pub struct Btf {
    /// Composite types: id → (name, members).
    composites: HashMap<u32, (String, Vec<Member>)>,
}

/// Why the BTF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// Reading the file failed.
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    /// The blob is not BTF or is cut short.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A struct or member is not there.
    #[error("{0} not found in the kernel's BTF")]
    Missing(String),
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Parses the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| BtfError::Io(path.into(), e))?;
        Self::parse(&data)
    }

    /// Parses a (little-endian) BTF blob.
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if u16_at(b, 0)? != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (or a big-endian blob)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = u32_at(b, 8)? as usize;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = u32_at(b, 16)? as usize;
        let str_len = u32_at(b, 20)? as usize;
        let types = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;
        let name = |off: u32| -> String {
            let s = strings.get(off as usize..).unwrap_or_default();
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let mut btf = Btf::default();
        let mut at = 0usize;
        let mut id = 1u32;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let off = u32_at(types, m + 8)?;
                        let (bit_offset, bits) = if kind_flag {
                            (off & 0x00ff_ffff, off >> 24)
                        } else {
                            (off, 0)
                        };
                        members.push(Member {
                            name: name(u32_at(types, m)?),
                            ty: u32_at(types, m + 4)?,
                            bit_offset,
                            bits,
                        });
                    }
                    btf.composites.insert(id, (name(name_off), members));
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => 0,
            };
            at += extra;
            id += 1;
        }
        Ok(btf)
    }

    /// Bit offset and bitfield size of `member` in the struct named `name`, looking into
    /// anonymous struct and union members too.
    pub fn member(&self, name: &str, member: &str) -> Result<(u32, u32), BtfError> {
        let missing = || BtfError::Missing(format!("{name}.{member}"));
        let (_, members) = self
            .composites
            .values()
            .find(|(n, m)| n == name && !m.is_empty())
            .ok_or_else(missing)?;
        self.find_in(members, member, 0).ok_or_else(missing)
    }

    fn find_in(&self, members: &[Member], want: &str, base: u32) -> Option<(u32, u32)> {
        for m in members {
            if m.name == want {
                return Some((base + m.bit_offset, m.bits));
            }
            if m.name.is_empty()
                && let Some((_, inner)) = self.composites.get(&m.ty)
                && let Some(found) = self.find_in(inner, want, base + m.bit_offset)
            {
                return Some(found);
            }
        }
        None
    }
}

/// The `struct tcp_sock` offsets the fast path needs, from the running kernel's BTF.
pub fn tcp_offsets() -> Result<TcpOffsets, BtfError> {
    let btf = Btf::from_sys_fs()?;
    tcp_offsets_from(&btf)
}

/// [`tcp_offsets`] from a parsed BTF.
pub fn tcp_offsets_from(btf: &Btf) -> Result<TcpOffsets, BtfError> {
    let whole = |m: &str| -> Result<u32, BtfError> {
        let (bit, bits) = btf.member("tcp_sock", m)?;
        if bits != 0 || bit % 8 != 0 {
            return Err(BtfError::Missing(format!("tcp_sock.{m} as a whole field")));
        }
        Ok(bit / 8)
    };
    let (bit, bits) = btf.member("tcp_sock", "fastopen_connect")?;
    if bits != 1 {
        return Err(BtfError::Missing(
            "tcp_sock.fastopen_connect as a 1-bit field".into(),
        ));
    }
    Ok(TcpOffsets {
        write_seq: whole("write_seq")?,
        fastopen_req: whole("fastopen_req")?,
        fastopen_connect_byte: bit / 8,
        fastopen_connect_mask: 1 << (bit % 8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF (every machine this agent supports has it): the offsets exist,
    /// are distinct and lie inside `struct tcp_sock` (well past its `struct sock` head).
    #[test]
    fn tcp_sock_offsets_of_the_running_kernel() {
        let Ok(off) = tcp_offsets() else {
            if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
                panic!("BTF present but unreadable: {:?}", tcp_offsets());
            }
            return;
        };
        assert!(off.write_seq > 512 && off.fastopen_req > 512, "{off:?}");
        assert_ne!(off.write_seq, off.fastopen_req);
        assert!(off.fastopen_connect_mask.is_power_of_two() && off.fastopen_connect_mask < 256);
    }
}
