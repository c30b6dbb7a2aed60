//! The kernel program's map layouts (mirrors of `bpf/flow.bpf.c`) and the
//! one map operation aya 0.14 does not offer: lookup-and-delete.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;

/// `struct flow_key`: one directional 5-tuple at one sighting point.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    pub pad: u8,
    pub ifindex: u32,
}

/// `FlowKey::dir` values. Userspace merges both hooks, so only tests and
/// debugging look at them.
#[allow(dead_code)]
pub const DIR_INGRESS: u8 = 0;
#[allow(dead_code)]
pub const DIR_EGRESS: u8 = 1;

/// TCP flag bits as the program stores them in [`FlowValue::flags`].
pub const TCP_FIN: u32 = 0x01;
pub const TCP_RST: u32 = 0x04;
/// A SYN without ACK was seen: this direction's sender opened the connection.
pub const FLAG_SYN_ONLY: u32 = 0x100;

// SAFETY: plain old data with no padding holes the kernel could leave
// uninitialised that Rust would mind (all fields are integers).
unsafe impl aya::Pod for FlowKey {}

impl FlowKey {
    /// The source address, or `None` for a family the program never writes.
    pub fn src_ip(&self) -> Option<IpAddr> {
        ip(self.family, &self.src)
    }

    pub fn dst_ip(&self) -> Option<IpAddr> {
        ip(self.family, &self.dst)
    }
}

fn ip(family: u8, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
        _ => None,
    }
}

/// `struct flow_val`: one CPU's share of a [`FlowKey`]'s counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// L3 bytes (skb->len minus the L2 header).
    pub bytes: u64,
    /// Wire packets (GSO segments).
    pub packets: u64,
    /// CLOCK_MONOTONIC nanoseconds; 0 on CPUs that never saw the flow.
    pub first_ns: u64,
    pub last_ns: u64,
    pub flags: u32,
    pub pad: u32,
}

// SAFETY: integers only, `repr(C)`, no implicit padding (40 bytes).
unsafe impl aya::Pod for FlowValue {}

impl FlowValue {
    /// Folds the per-CPU copies into one value.
    pub fn sum<'a>(values: impl IntoIterator<Item = &'a FlowValue>) -> FlowValue {
        let mut out = FlowValue::default();
        for v in values {
            out.bytes = out.bytes.saturating_add(v.bytes);
            out.packets = out.packets.saturating_add(v.packets);
            if v.first_ns != 0 && (out.first_ns == 0 || v.first_ns < out.first_ns) {
                out.first_ns = v.first_ns;
            }
            out.last_ns = out.last_ns.max(v.last_ns);
            out.flags |= v.flags;
        }
        out
    }
}

/// `struct overflow_val`: traffic that could not be recorded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverflowValue {
    pub packets: u64,
    pub bytes: u64,
    /// The share of `packets` refused for ENOMEM (no preallocation) rather
    /// than because the map held `max_flows` entries.
    pub nomem_packets: u64,
    pub pad: u64,
}

// SAFETY: four u64s.
unsafe impl aya::Pod for OverflowValue {}

/// Two maps that the programs write in turn, and the one-entry array
/// (`epoch`) that names the map written (0 or 1). See `bpf/flow.bpf.c`.
pub struct EpochMaps {
    maps: [aya::maps::Map; 2],
    epoch: aya::maps::Map,
    /// The map the programs write now.
    active: usize,
}

impl EpochMaps {
    /// Takes the maps called `names` and `epoch` out of a loaded object.
    pub fn take(bpf: &mut aya::Ebpf, names: [&str; 2], epoch: &str) -> anyhow::Result<EpochMaps> {
        let mut take = |name: &str| {
            bpf.take_map(name).ok_or_else(|| {
                anyhow::anyhow!("map `{name}` is missing from flowtel's eBPF object")
            })
        };
        Ok(EpochMaps {
            maps: [take(names[0])?, take(names[1])?],
            epoch: take(epoch)?,
            active: 0,
        })
    }

    /// Points the programs at the other map, waits for an RCU grace period
    /// (after it no program holds an entry of the map it left) and returns
    /// the map it left, which nothing writes until the next flip.
    pub fn flip(&mut self) -> Result<&aya::maps::Map, String> {
        let next = 1 - self.active;
        let mut epoch: aya::maps::Array<&mut MapData, u32> =
            aya::maps::Array::try_from(&mut self.epoch)
                .map_err(|e| format!("the epoch map cannot be used: {e}"))?;
        epoch
            .set(0, next as u32, 0)
            .map_err(|e| format!("switching maps failed: {e}"))?;
        let old = self.active;
        self.active = next;
        grace_period();
        Ok(&self.maps[old])
    }
}

/// Waits until every BPF program that may have read an old `epoch` has
/// returned. TC and tracepoint programs run inside RCU read-side sections,
/// and `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU grace period
/// (`synchronize_rcu`). Kernels with `nohz_full` refuse that command: then a
/// pause far longer than any program run stands in for it.
fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    const FALLBACK: std::time::Duration = std::time::Duration::from_millis(20);
    static WARN: std::sync::Once = std::sync::Once::new();
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret != 0 {
        let e = io::Error::last_os_error();
        WARN.call_once(|| {
            tracing::warn!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) failed ({e}); waiting {FALLBACK:?} instead of \
                 an RCU grace period before reading each flow or drop map"
            );
        });
        std::thread::sleep(FALLBACK);
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a per-CPU hash map: reads a key's
/// final per-CPU values and removes it in one step. `Ok(None)` when the key
/// is gone. A program that looked the entry up just before still adds to
/// it after the delete, and that packet is lost: use it only on a map no
/// program writes any more.
/// `V` must be the map's value type, a multiple of 8 bytes (the kernel's
/// per-CPU stride).
pub fn take_percpu<K: aya::Pod, V: aya::Pod + Default>(
    map: &MapData,
    key: &K,
    possible_cpus: usize,
) -> io::Result<Option<Vec<V>>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    /// The `map_elem` member of `union bpf_attr`.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const { assert!(std::mem::size_of::<V>().is_multiple_of(8)) };
    let mut values = vec![V::default(); possible_cpus];
    let attr = MapElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        pad: 0,
        key: key as *const K as u64,
        value: values.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the attribute points at a live key and at a buffer of
    // possible_cpus values, which is what the kernel writes for per-CPU maps.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if ret == 0 {
        return Ok(Some(values));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Reads and deletes every entry with `BPF_MAP_LOOKUP_AND_DELETE_BATCH`
/// (kernel 5.6+), thousands per syscall, calling `f` with each key and its
/// per-CPU values. Each batch is read and deleted in one step, so after an
/// error what `f` was given is gone from the map and the rest is still
/// there. On error, returns it with the number of entries already passed to
/// `f` (0 and EINVAL: the kernel lacks batch operations).
pub fn drain_batch(
    map: &MapData,
    possible_cpus: usize,
    mut f: impl FnMut(&FlowKey, &[FlowValue]),
) -> Result<u64, (io::Error, u64)> {
    const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let cpus = possible_cpus.max(1);
    let mut chunk = 1024usize;
    let mut keys = vec![FlowKey::default(); chunk];
    let mut values = vec![FlowValue::default(); chunk * cpus];
    // Opaque position tokens (a bucket index for hash maps).
    let (mut in_token, mut out_token) = (0u64, 0u64);
    let mut first = true;
    let mut total = 0u64;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &in_token as *const u64 as u64
            },
            out_batch: &mut out_token as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the buffers hold `count` keys and `count * cpus` values,
        // what the kernel writes for a per-CPU map; the tokens are 8 bytes
        // (the kernel uses 4); all outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        if err.as_ref().and_then(io::Error::raw_os_error) == Some(libc::ENOSPC) {
            // One bucket holds more entries than fit: retry bigger.
            if chunk >= 1 << 20 {
                return Err((err.unwrap_or_else(io::Error::last_os_error), total));
            }
            chunk *= 2;
            keys.resize(chunk, FlowKey::default());
            values.resize(chunk * cpus, FlowValue::default());
            continue;
        }
        let n = (attr.count as usize).min(chunk);
        for (i, key) in keys[..n].iter().enumerate() {
            f(key, &values[i * cpus..(i + 1) * cpus]);
        }
        total += n as u64;
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Some(e) => return Err((e, total)),
        }
        in_token = out_token;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mirror against the struct's BTF in both compiled flow objects.
    #[test]
    #[cfg(not(flowtel_no_ebpf))]
    fn layouts_match_the_compiled_objects() {
        use crate::source::ebpf::btf::assert_mirrors;
        for object in [super::super::OBJECT, super::super::OBJECT_PREALLOC] {
            #[rustfmt::skip]
            assert_mirrors!(object, "flow_key", FlowKey, [src, dst, sport, dport, proto, family,
                dir, pad, ifindex]);
            #[rustfmt::skip]
            assert_mirrors!(object, "flow_val", FlowValue, [bytes, packets, first_ns, last_ns,
                flags, pad]);
            #[rustfmt::skip]
            assert_mirrors!(object, "overflow_val", OverflowValue, [packets, bytes,
                nomem_packets, pad]);
        }
    }

    #[test]
    fn per_cpu_values_fold() {
        let a = FlowValue {
            bytes: 10,
            packets: 1,
            first_ns: 0,
            last_ns: 0,
            flags: 0,
            pad: 0,
        };
        let b = FlowValue {
            bytes: 5,
            packets: 2,
            first_ns: 7,
            last_ns: 9,
            flags: 0x10,
            pad: 0,
        };
        let c = FlowValue {
            first_ns: 3,
            last_ns: 4,
            flags: FLAG_SYN_ONLY | 0x02,
            ..FlowValue::default()
        };
        let s = FlowValue::sum([&a, &b, &c]);
        assert_eq!((s.bytes, s.packets), (15, 3));
        assert_eq!((s.first_ns, s.last_ns), (3, 9));
        assert_eq!(s.flags, FLAG_SYN_ONLY | 0x12);
    }
}
