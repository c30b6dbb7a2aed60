//! Builds flowtel's eBPF objects (bpf/*.c) into OUT_DIR.
//!
//! The programs are compiled against the committed `bpf/vmlinux.h` (CO-RE:
//! aya relocates the field accesses against the running kernel's BTF), so
//! the build machine's kernel does not matter. The target architecture comes
//! from cargo (`CARGO_CFG_TARGET_ARCH`, `CARGO_CFG_TARGET_ENDIAN`). When
//! clang or libbpf's headers are missing, the build still succeeds: it
//! warns, writes empty objects and sets `cfg(flowtel_no_ebpf)` so the eBPF
//! source refuses to start with a clear message instead.
//!
//! Overrides: `FLOWTEL_CLANG` (path), and `FLOWTEL_NO_EBPF=1` to build
//! without eBPF on purpose.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The objects the Rust code embeds: (source stem, object name, defines).
const OBJECTS: &[(&str, &str, &[&str])] = &[
    ("flow.bpf", "flow.bpf.o", &[]),
    ("flow.bpf", "flow_prealloc.bpf.o", &["-DFT_PREALLOC"]),
    ("tcp.bpf", "tcp.bpf.o", &[]),
    // Not embedded: the "other vendor's program" of tests/ebpf_coverage.rs.
    ("foreign_drop.bpf", "foreign_drop.bpf.o", &[]),
    ("cni.bpf", "cni.bpf.o", &[]),
];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(flowtel_no_ebpf)");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    // Only the C sources and headers: editing the README rebuilds nothing.
    // A new object needs a line in OBJECTS, and editing build.rs reruns it.
    let mut watched = 0;
    if let Ok(dir) = fs::read_dir(manifest.join("bpf")) {
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "c" || e == "h") {
                println!("cargo:rerun-if-changed={}", path.display());
                watched += 1;
            }
        }
    }
    if watched == 0 {
        println!("cargo:rerun-if-changed=bpf");
    }
    for var in ["FLOWTEL_CLANG", "FLOWTEL_NO_EBPF"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    if let Err(why) = build(&manifest.join("bpf"), &out) {
        println!("cargo:warning=building flowtel without eBPF support: {why}");
        println!("cargo:rustc-cfg=flowtel_no_ebpf");
        println!("cargo:rustc-env=FLOWTEL_NO_EBPF_REASON={why}");
        for (_, object, _) in OBJECTS {
            fs::write(out.join(object), b"").expect("writing an empty object");
        }
    }
}

/// Builds every object, or says which tool is missing. A compile error in
/// our own C source is a bug, not a missing tool, so it fails the build.
fn build(src: &Path, out: &Path) -> Result<(), String> {
    if env::var_os("FLOWTEL_NO_EBPF").is_some_and(|v| !v.is_empty() && v != "0") {
        return Err("FLOWTEL_NO_EBPF is set".into());
    }
    let clang = tool(
        "FLOWTEL_CLANG",
        &["clang", "clang-14", "clang-15", "clang-16"],
    )
    .ok_or("clang not found (install clang or set FLOWTEL_CLANG)")?;
    if !libbpf_headers(&clang) {
        return Err("libbpf's headers (bpf/bpf_helpers.h) not found (install libbpf-dev)".into());
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let arch_define = format!("-D__TARGET_ARCH_{}", bpf_arch(&arch)?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };

    for (stem, object, defines) in OBJECTS {
        let source = src.join(format!("{stem}.c"));
        let object = out.join(object);
        let result = Command::new(&clang)
            .args(*defines)
            .args(["-O2", "-g", "-target", target, "-Wall"])
            .arg(&arch_define)
            .arg(format!("-I{}", src.display()))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .output()
            .map_err(|e| format!("running {}: {e}", clang.display()))?;
        if !result.status.success() {
            let stderr = String::from_utf8_lossy(&result.stderr);
            if stderr.contains("No available targets") || stderr.contains("unknown target") {
                return Err(format!("{} cannot target BPF", clang.display()));
            }
            panic!("compiling {} failed:\n{stderr}", source.display());
        }
    }
    Ok(())
}

/// libbpf's name for a cargo target architecture (`bpf_tracing.h` needs it).
fn bpf_arch(cargo_arch: &str) -> Result<&'static str, String> {
    Ok(match cargo_arch {
        "x86_64" | "x86" => "x86",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv",
        "s390x" => "s390",
        "powerpc64" | "powerpc" => "powerpc",
        "loongarch64" => "loongarch",
        "mips" | "mips64" => "mips",
        other => return Err(format!("no eBPF build for target architecture {other:?}")),
    })
}

/// `$ENV` if set, else the first of `names` on PATH.
fn tool(env_var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = env::var_os(env_var).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = env::var_os("PATH")?;
    names.iter().find_map(|name| {
        env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether clang finds `<bpf/bpf_helpers.h>` (Debian's libbpf-dev).
fn libbpf_headers(clang: &Path) -> bool {
    let probe = Command::new(clang)
        .args(["-target", "bpf", "-E", "-x", "c", "-", "-o", "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"#include <bpf/bpf_helpers.h>\n")?;
            }
            child.wait()
        });
    probe.is_ok_and(|s| s.success())
}
