//! A small reader of BTF, the kernel's type format: the members of an enum
//! (the running kernel's drop reasons) and the layout of a struct (to check
//! the Rust mirrors against the compiled objects). Hand-read because aya's
//! BTF parser does not expose types and the BTF crates on crates.io are LGPL.

/// A struct as BTF describes it: its size and its members in order, each
/// with its byte offset.
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub struct StructLayout {
    pub size: u32,
    pub members: Vec<(String, u32)>,
}

#[cfg(test)]
const KIND_STRUCT: u32 = 4;
const KIND_ENUM: u32 = 6;
const KIND_ENUM64: u32 = 19;

/// One type found by [`Btf::find`]: its kind, member count, and where its
/// members start (its size, for a struct, is the 4 bytes before them).
struct Found {
    kind: u32,
    vlen: usize,
    members: usize,
}

struct Btf<'a> {
    data: &'a [u8],
    types: usize,
    types_end: usize,
    strings: usize,
}

impl<'a> Btf<'a> {
    fn new(data: &'a [u8]) -> Result<Self, String> {
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let mut btf = Btf {
            data,
            types: 0,
            types_end: 0,
            strings: 0,
        };
        let hdr_len = btf.u32_at(4)? as usize;
        let (type_off, type_len) = (btf.u32_at(8)? as usize, btf.u32_at(12)? as usize);
        let str_off = btf.u32_at(16)? as usize;
        btf.types = hdr_len + type_off;
        btf.types_end = btf.types + type_len;
        btf.strings = hdr_len + str_off;
        Ok(btf)
    }

    fn u32_at(&self, off: usize) -> Result<u32, String> {
        self.data
            .get(off..off + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| format!("BTF truncated at byte {off}"))
    }

    fn string(&self, off: u32) -> Result<String, String> {
        let start = self.strings + off as usize;
        let rest = self
            .data
            .get(start..)
            .ok_or_else(|| format!("BTF string offset {off} out of range"))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("BTF string at offset {off} is not terminated"))?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    /// The first type of one of `kinds` called `name`.
    fn find(&self, kinds: &[u32], name: &str) -> Result<Option<Found>, String> {
        let mut pos = self.types;
        while pos < self.types_end {
            let (name_off, info) = (self.u32_at(pos)?, self.u32_at(pos + 4)?);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            pos += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,   // int, var, decl_tag
                3 => 12,            // array
                4 | 5 => 12 * vlen, // struct, union
                6 => 8 * vlen,      // enum
                13 => 8 * vlen,     // func_proto
                15 => 12 * vlen,    // datasec
                19 => 12 * vlen,    // enum64
                2 | 7..=12 | 16 | 18 => 0,
                k => return Err(format!("unknown BTF kind {k} at byte {pos}")),
            };
            if kinds.contains(&kind) && self.string(name_off)? == name {
                return Ok(Some(Found {
                    kind,
                    vlen,
                    members: pos,
                }));
            }
            pos += extra;
        }
        Ok(None)
    }
}

/// The members of the enum called `name` in a raw BTF blob (the format of
/// `/sys/kernel/btf/vmlinux`).
pub fn enum_members(data: &[u8], name: &str) -> Result<Vec<(String, u32)>, String> {
    let btf = Btf::new(data)?;
    let found = btf
        .find(&[KIND_ENUM, KIND_ENUM64], name)?
        .ok_or_else(|| format!("enum {name} not found"))?;
    let step = if found.kind == KIND_ENUM { 8 } else { 12 };
    (0..found.vlen)
        .map(|i| {
            let m = found.members + i * step;
            Ok((btf.string(btf.u32_at(m)?)?, btf.u32_at(m + 4)?))
        })
        .collect()
}

/// The layout of the struct called `name` in a raw BTF blob.
#[cfg(test)]
pub fn struct_layout(data: &[u8], name: &str) -> Result<StructLayout, String> {
    let btf = Btf::new(data)?;
    let found = btf
        .find(&[KIND_STRUCT], name)?
        .ok_or_else(|| format!("struct {name} not found"))?;
    let members = (0..found.vlen)
        .map(|i| {
            let m = found.members + i * 12;
            // Bit offset; with kind_flag the top 8 bits are a bitfield size,
            // which these plain structs never use.
            let bits = btf.u32_at(m + 8)? & 0x00ff_ffff;
            Ok((btf.string(btf.u32_at(m)?)?, bits / 8))
        })
        .collect::<Result<_, String>>()?;
    Ok(StructLayout {
        size: btf.u32_at(found.members - 4)?,
        members,
    })
}

/// The contents of the section called `name` in a little-endian ELF64 file
/// (a compiled BPF object), e.g. `.BTF`.
#[cfg(test)]
pub fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<&'a [u8], String> {
    let u16_at = |off: usize| -> Result<usize, String> {
        elf.get(off..off + 2)
            .and_then(|b| b.try_into().ok())
            .map(|b| u16::from_le_bytes(b) as usize)
            .ok_or_else(|| format!("ELF truncated at byte {off}"))
    };
    let u32_at = |off: usize| -> Result<usize, String> {
        elf.get(off..off + 4)
            .and_then(|b| b.try_into().ok())
            .map(|b| u32::from_le_bytes(b) as usize)
            .ok_or_else(|| format!("ELF truncated at byte {off}"))
    };
    let u64_at = |off: usize| -> Result<usize, String> {
        elf.get(off..off + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from_le_bytes(b) as usize)
            .ok_or_else(|| format!("ELF truncated at byte {off}"))
    };
    if elf.get(0..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a little-endian ELF64 object".into());
    }
    let (shoff, shentsize) = (u64_at(0x28)?, u16_at(0x3a)?);
    let (shnum, shstrndx) = (u16_at(0x3c)?, u16_at(0x3e)?);
    let header = |i: usize| shoff + i * shentsize;
    let names = u64_at(header(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let h = header(i);
        let start = names + u32_at(h)?;
        let section_name = elf
            .get(start..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .ok_or_else(|| format!("ELF section name at {start} out of range"))?;
        if section_name == name.as_bytes() {
            let (off, size) = (u64_at(h + 0x18)?, u64_at(h + 0x20)?);
            return elf
                .get(off..off + size)
                .ok_or_else(|| format!("ELF section {name} out of range"));
        }
    }
    Err(format!("no {name} section"))
}

/// Asserts that a `repr(C)` Rust struct mirrors the C struct of the same
/// layout in a compiled object: the same size and the same members, in
/// order, at the same offsets.
#[cfg(test)]
macro_rules! assert_mirrors {
    ($object:expr, $c_name:literal, $rust:ty, [$($field:ident),+ $(,)?]) => {{
        let btf = $crate::source::ebpf::btf::elf_section($object, ".BTF").expect(".BTF");
        let layout =
            $crate::source::ebpf::btf::struct_layout(btf, $c_name).expect($c_name);
        let rust = $crate::source::ebpf::btf::StructLayout {
            size: std::mem::size_of::<$rust>() as u32,
            members: vec![$((stringify!($field).to_string(),
                std::mem::offset_of!($rust, $field) as u32)),+],
        };
        assert_eq!(rust, layout, "{} does not mirror struct {}", stringify!($rust), $c_name);
    }};
}
#[cfg(test)]
pub(crate) use assert_mirrors;

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made BTF blob: an int, then the enum.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0drops\0SKB_NOT_DROPPED_YET\0SKB_DROP_REASON_NO_SOCKET\0";
        let mut types = Vec::new();
        let push = |t: &mut Vec<u8>, v: u32| t.extend_from_slice(&v.to_le_bytes());
        // int: name "int" (1), kind 1, size 4, then its 4-byte encoding.
        push(&mut types, 1);
        push(&mut types, 1 << 24);
        push(&mut types, 4);
        push(&mut types, 32);
        // enum "drops" (5) with two members.
        push(&mut types, 5);
        push(&mut types, (6 << 24) | 2);
        push(&mut types, 4);
        push(&mut types, 11);
        push(&mut types, 0);
        push(&mut types, 31);
        push(&mut types, 3);
        let mut out = vec![0x9f, 0xeb, 1, 0];
        push(&mut out, 24);
        push(&mut out, 0);
        push(&mut out, types.len() as u32);
        push(&mut out, types.len() as u32);
        push(&mut out, strings.len() as u32);
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn enum_members_are_read_from_btf() {
        let members = enum_members(&blob(), "drops").expect("parses");
        assert_eq!(
            members,
            vec![
                ("SKB_NOT_DROPPED_YET".to_string(), 0),
                ("SKB_DROP_REASON_NO_SOCKET".to_string(), 3)
            ]
        );
        assert!(enum_members(&blob(), "other").is_err());
        assert!(struct_layout(&blob(), "drops").is_err());
    }

    #[test]
    fn bad_btf_is_an_error_not_a_panic() {
        let data = blob();
        for cut in [0, 3, 10, 30, 45, data.len() - 5] {
            assert!(enum_members(&data[..cut], "drops").is_err(), "cut {cut}");
        }
        assert!(enum_members(b"\x00\x00garbage", "drops").is_err());
        assert!(elf_section(b"\x7fELF\x02\x01", ".BTF").is_err());
        assert!(elf_section(b"garbage", ".BTF").is_err());
    }
}
