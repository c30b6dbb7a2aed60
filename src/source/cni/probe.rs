//! Loads `bpf/cni.bpf.c` (exec, stdout-write and exit tracepoints) and
//! reads its ring buffer and loss counters.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use std::os::fd::{AsRawFd, RawFd};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The object built by build.rs (empty when built without clang/bpftool).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cni.bpf.o"));

const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// `FT_DIRS` and `FT_DIR_MAX` of the C side.
pub const MAX_BIN_DIRS: usize = 8;
pub const DIR_MAX: usize = 128;

/// Indexes of `lost`, and their `error.type` on `flowtel.cni.events.lost`.
pub const LOST_KINDS: [&str; 4] = [
    "exec_ring_full",
    "output_ring_full",
    "exit_ring_full",
    "running_map_full",
];

/// (program, tracepoint).
const PROGRAMS: &[(&str, &str)] = &[
    ("flowtel_cni_exec", "sched_process_exec"),
    ("flowtel_cni_write", "sys_enter"),
    ("flowtel_cni_exit", "sched_process_exit"),
];

/// The program that reads the plugins' stdout: it runs on every system
/// call of the node, so it is attached only with `cni.capture_output`.
const OUTPUT_PROGRAM: &str = "flowtel_cni_write";

/// One slot of `bin_dirs`: a directory with its trailing `/`.
#[repr(C)]
#[derive(Clone, Copy)]
struct BinDir {
    len: u32,
    path: [u8; DIR_MAX],
}

// SAFETY: plain old data, `repr(C)` with no padding (4 + 128 bytes).
unsafe impl aya::Pod for BinDir {}

/// The loaded, attached programs; dropping it detaches them.
pub struct Probe {
    _bpf: aya::Ebpf,
    pub events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

/// Whether the CNI programs were built into this binary.
pub fn built() -> bool {
    !OBJECT.is_empty()
}

/// The directory as the kernel compares it: absolute, with one trailing
/// `/`, shorter than the slot.
pub fn dir_prefix(dir: &Path) -> Result<String, String> {
    let s = dir
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", dir.display()))?;
    if !s.starts_with('/') {
        return Err(format!("{s:?} is not an absolute path"));
    }
    let prefix = format!("{}/", s.trim_end_matches('/'));
    if prefix.len() >= DIR_MAX {
        return Err(format!("{s:?} is longer than {} bytes", DIR_MAX - 2));
    }
    Ok(prefix)
}

impl Probe {
    /// Loads and attaches the programs, watching `bin_dirs` (at most
    /// [`MAX_BIN_DIRS`], checked by the config); the stdout program only
    /// when `capture_output`.
    pub fn start(
        bin_dirs: &[PathBuf],
        ring_bytes: u32,
        capture_output: bool,
    ) -> anyhow::Result<Probe> {
        if !built() {
            bail!(
                "flowtel was built without its CNI programs (clang/bpftool missing at build time)"
            );
        }
        if !Path::new(KERNEL_BTF).exists() {
            bail!(
                "the kernel has no BTF ({KERNEL_BTF} is missing): CNI executions cannot be traced"
            );
        }
        let mut bpf = aya::EbpfLoader::new()
            .map_max_entries("cni_events", ring_bytes)
            .load(OBJECT)
            .map_err(|e| anyhow!("loading the CNI programs failed: {e}"))?;
        let btf = aya::Btf::from_sys_fs()
            .with_context(|| format!("reading the kernel's BTF from {KERNEL_BTF}"))?;
        for &(name, tracepoint) in PROGRAMS {
            if name == OUTPUT_PROGRAM && !capture_output {
                continue;
            }
            let prog: &mut aya::programs::BtfTracePoint = bpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} is missing from flowtel's CNI object"))?
                .try_into()
                .map_err(|e| anyhow!("program {name}: {e}"))?;
            prog.load(tracepoint, &btf).map_err(|e| {
                anyhow!(
                    "loading {name} for tracepoint {tracepoint} failed: {e} (needs CAP_BPF and \
                     CAP_PERFMON, and a kernel with BTF tracepoints, 5.5+)"
                )
            })?;
            prog.attach()
                .map_err(|e| anyhow!("attaching {name} to tracepoint {tracepoint} failed: {e}"))?;
        }
        let take = |bpf: &mut aya::Ebpf, name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| anyhow!("map `{name}` is missing from flowtel's CNI object"))
        };
        let mut dirs: Array<MapData, BinDir> = Array::try_from(take(&mut bpf, "bin_dirs")?)
            .map_err(|e| anyhow!("map bin_dirs: {e}"))?;
        for (i, dir) in bin_dirs.iter().take(MAX_BIN_DIRS).enumerate() {
            let prefix = dir_prefix(dir).map_err(|e| anyhow!("cni.bin_dirs: {e}"))?;
            let mut slot = BinDir {
                len: prefix.len() as u32,
                path: [0; DIR_MAX],
            };
            slot.path[..prefix.len()].copy_from_slice(prefix.as_bytes());
            dirs.set(i as u32, slot, 0)
                .map_err(|e| anyhow!("writing bin_dirs[{i}]: {e}"))?;
        }
        let events = RingBuf::try_from(take(&mut bpf, "cni_events")?)
            .map_err(|e| anyhow!("map cni_events: {e}"))?;
        let lost =
            PerCpuArray::try_from(take(&mut bpf, "lost")?).map_err(|e| anyhow!("map lost: {e}"))?;
        Ok(Probe {
            _bpf: bpf,
            events,
            lost,
        })
    }

    /// Registers the ring buffer with tokio, to wait until it is readable.
    pub fn into_async(self) -> anyhow::Result<AsyncFd<Probe>> {
        // SAFETY: the descriptor is the ring buffer map's, owned by `events`
        // and open as long as the Probe, which the AsyncFd owns.
        let fd = unsafe { AsyncFd::register_with_interest(self, Interest::READABLE) };
        fd.map_err(|e| {
            anyhow!(
                "registering the CNI ring buffer with tokio: {}",
                std::io::Error::from(e)
            )
        })
    }

    /// The kernel's loss counters, summed over CPUs, in [`LOST_KINDS`]
    /// order. A counter that cannot be read keeps `previous`.
    pub fn lost(&self, previous: [u64; 4]) -> [u64; 4] {
        let mut out = previous;
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.lost.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

impl AsRawFd for Probe {
    fn as_raw_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }
}
