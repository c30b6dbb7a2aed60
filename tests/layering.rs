//! The tree shows the data path, and imports follow it: each stage
//! (`source`, `flow`, `enrich`, `export`) imports only itself, the flow
//! model every stage speaks (`flow`) and the shared modules (`telemetry`,
//! `component`); never another stage, and never the assembly (`pipeline`,
//! `config`, `health`). `telemetry` and `component` import nothing of the
//! crate but themselves (and the catalogue's users).
//!
//! Every `crate::…` path and every `super::…` path that climbs out of its
//! stage is resolved to the top-level module it names, in code only
//! (comments are skipped), so a re-export or a fully qualified path cannot
//! slip past.

use std::path::{Path, PathBuf};

/// The crate's top-level modules.
const MODULES: &[&str] = &[
    "component",
    "config",
    "enrich",
    "export",
    "flow",
    "health",
    "pipeline",
    "source",
    "telemetry",
];

/// What each top-level module may use besides itself.
fn allowed(module: &str) -> Option<&'static [&'static str]> {
    Some(match module {
        "source" => &["flow", "telemetry", "component"],
        "flow" => &["telemetry", "component"],
        "enrich" => &["flow", "telemetry", "component"],
        "export" => &["flow", "telemetry", "component"],
        "telemetry" => &[],
        "component" => &[],
        // The assembly may use everything.
        _ => return None,
    })
}

/// The module path of a file under `src/`: `source/hubble/report.rs` is
/// `[source, hubble, report]`, `source/mod.rs` is `[source]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The top-level modules `text` (the file at `relative`) refers to, with
/// the line of each reference.
fn references(relative: &Path, text: &str) -> Vec<(usize, String)> {
    let path = module_path(relative);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let bytes = code.as_bytes();
        let mut at = 0;
        while at < code.len() {
            let rest = &code[at..];
            let boundary =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            if boundary && rest.starts_with("crate::") {
                let name: String = rest["crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push((i + 1, name));
                at += "crate::".len();
                continue;
            }
            if boundary && rest.starts_with("super::") {
                let mut ups = 0;
                let mut tail = rest;
                while let Some(t) = tail.strip_prefix("super::") {
                    ups += 1;
                    tail = t;
                }
                // `super` of a file module is its parent module.
                let depth = path.len().saturating_sub(ups);
                let name = if depth == 0 {
                    tail.chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect()
                } else {
                    path[0].clone()
                };
                out.push((i + 1, name));
                at += ups * "super::".len();
                continue;
            }
            at += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    out
}

/// The references of `relative` that its stage may not make.
fn violations(relative: &Path, text: &str) -> Vec<String> {
    let path = module_path(relative);
    let Some(own) = path.first() else {
        return Vec::new();
    };
    let Some(allowed) = allowed(own) else {
        return Vec::new();
    };
    references(relative, text)
        .into_iter()
        // `super::*` in an inline test module, or a path `super` resolves
        // to below the crate root, names no top-level module.
        .filter(|(_, name)| MODULES.contains(&name.as_str()))
        .filter(|(_, name)| name != own && !allowed.contains(&name.as_str()))
        .map(|(line, name)| format!("src/{}:{line}: {own} uses {name}", relative.display()))
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable").flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn stages_import_only_the_model_and_the_shared_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "found only {} files in src/", files.len());
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        let relative = file.strip_prefix(&src).expect("under src/");
        found.extend(violations(relative, &text));
    }
    assert!(
        found.is_empty(),
        "imports against the data path (a stage uses only itself, flow, telemetry and \
         component):\n{}",
        found.join("\n")
    );
}

/// The check itself can fail: each forbidden direction the issue names is
/// caught, through `use`, a qualified path or `super::`.
#[test]
fn the_check_catches_each_forbidden_direction() {
    let cases = [
        (
            "source/kernel.rs",
            "use crate::export::queue;",
            "source uses export",
        ),
        (
            "flow/table.rs",
            "let q = crate::export::queue::Exporters::start;",
            "flow uses export",
        ),
        (
            "flow/table.rs",
            "use crate::enrich::Namer;",
            "flow uses enrich",
        ),
        (
            "enrich/mod.rs",
            "use crate::source::detect::MeshRole;",
            "enrich uses source",
        ),
        (
            "enrich/kubernetes/model.rs",
            "use super::super::super::export::x;",
            "enrich uses export",
        ),
        (
            "export/mesh.rs",
            "use crate::source::hubble::HubbleReport;",
            "export uses source",
        ),
        (
            "telemetry/mod.rs",
            "use crate::flow::SourceEvent;",
            "telemetry uses flow",
        ),
    ];
    for (file, line, want) in cases {
        let got = violations(Path::new(file), line);
        assert!(
            got.len() == 1 && got[0].ends_with(want),
            "{file}: {line:?} gave {got:?}, expected {want:?}"
        );
    }
    for (file, line) in [
        ("export/otlp/wire.rs", "use super::super::families::x;"),
        (
            "source/hubble/report.rs",
            "use crate::flow::mesh::HistogramValue;",
        ),
        ("enrich/mod.rs", "/// see crate::source::detect"),
        ("telemetry/mod.rs", "    use super::*;"),
        ("pipeline.rs", "use crate::export::queue;"),
    ] {
        assert!(
            violations(Path::new(file), line).is_empty(),
            "{file}: {line:?}"
        );
    }
}
