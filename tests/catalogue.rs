//! `docs/telemetry.md` and the catalogue in code
//! (`src/telemetry/catalogue.rs`) say the same thing: every metric the
//! catalogue holds has a row in a metric table of the page, with the same
//! instrument, unit and Prometheus name, and every row names a catalogue
//! metric; every attribute the catalogue holds is named on the page, and
//! every attribute in an attribute table is in the catalogue.

use std::collections::BTreeSet;

use flowtel::telemetry::catalogue::{self, Instrument, Metric};

/// One markdown table: its header cells and rows of cells.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_owned()).collect()
}

fn tables(text: &str) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::new();
    let mut current: Option<Table> = None;
    for line in text.lines() {
        if !line.trim_start().starts_with('|') {
            out.extend(current.take());
            continue;
        }
        let row = cells(line);
        if row
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        match &mut current {
            Some(t) => t.rows.push(row),
            None => {
                current = Some(Table {
                    header: row.iter().map(|c| c.to_ascii_lowercase()).collect(),
                    rows: Vec::new(),
                })
            }
        }
    }
    out.extend(current);
    out
}

/// The `backticked` words of a cell.
fn quoted(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn column(t: &Table, name: &str) -> Option<usize> {
    t.header.iter().position(|h| h == name)
}

fn instrument(cell: &str) -> Option<Instrument> {
    if cell.contains("Histogram") {
        Some(Instrument::Histogram)
    } else if cell.contains("Gauge") {
        Some(Instrument::Gauge)
    } else if cell.contains("Sum") {
        Some(Instrument::Counter)
    } else {
        None
    }
}

fn page() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/telemetry.md");
    std::fs::read_to_string(path).expect("docs/telemetry.md is readable")
}

/// What the page says that the catalogue does not, and the other way round.
fn disagreements(text: &str, metrics: &[&Metric], attributes: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let tables = tables(text);
    let mut documented = BTreeSet::new();
    for t in tables
        .iter()
        .filter(|t| t.header.first().is_some_and(|h| h == "metric"))
    {
        for row in &t.rows {
            let Some(name) = row.first().and_then(|c| quoted(c).into_iter().next()) else {
                continue;
            };
            documented.insert(name.clone());
            let Some(m) = metrics.iter().find(|m| m.name == name) else {
                out.push(format!("docs: metric `{name}` is not in the catalogue"));
                continue;
            };
            if let Some(cell) = column(t, "instrument").and_then(|i| row.get(i)) {
                if instrument(cell) != Some(m.instrument) {
                    out.push(format!(
                        "docs: `{name}` is a {cell:?}, the catalogue says {:?}",
                        m.instrument
                    ));
                }
            }
            if let Some(cell) = column(t, "unit").and_then(|i| row.get(i)) {
                if quoted(cell).first().map(String::as_str) != Some(m.unit) {
                    out.push(format!(
                        "docs: `{name}` has unit {cell}, the catalogue `{}`",
                        m.unit
                    ));
                }
            }
            if let Some(cell) = column(t, "/readyz").and_then(|i| row.get(i)) {
                let documented = quoted(cell).into_iter().next();
                if documented.as_deref() != m.readyz {
                    out.push(format!(
                        "docs: `{name}` is {cell:?} in /readyz, the catalogue says {:?}",
                        m.readyz
                    ));
                }
            }
            if let Some(cell) = column(t, "prometheus").and_then(|i| row.get(i)) {
                let want = m.prometheus_name();
                if quoted(cell).first() != Some(&want) {
                    out.push(format!(
                        "docs: `{name}` is {cell} on Prometheus, the catalogue derives `{want}`"
                    ));
                }
            }
        }
    }
    for m in metrics {
        if !documented.contains(m.name) {
            out.push(format!(
                "catalogue: metric `{}` has no row in a metric table of docs/telemetry.md",
                m.name
            ));
        }
    }
    let known = |name: &str| {
        let name = name.trim_end_matches("<key>");
        if let Some(prefix) = name.strip_suffix(".*") {
            return attributes
                .iter()
                .any(|a| a.starts_with(&format!("{prefix}.")));
        }
        attributes.contains(&name)
    };
    for t in tables
        .iter()
        .filter(|t| t.header.first().is_some_and(|h| h == "attribute"))
    {
        for row in &t.rows {
            for name in row.first().map(|c| quoted(c)).unwrap_or_default() {
                if !known(&name) {
                    out.push(format!("docs: attribute `{name}` is not in the catalogue"));
                }
            }
        }
    }
    let everything: BTreeSet<String> = quoted(text).into_iter().collect();
    for a in attributes {
        let named = everything.contains(*a)
            || everything.contains(&format!("{a}<key>"))
            || everything
                .iter()
                .any(|w| w.starts_with(*a) && a.ends_with('.'));
        if !named {
            out.push(format!(
                "catalogue: attribute `{a}` is not named in docs/telemetry.md"
            ));
        }
    }
    out
}

#[test]
fn docs_and_catalogue_agree() {
    let found = disagreements(&page(), catalogue::METRICS, catalogue::ATTRIBUTES);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The check fails both ways: a metric or attribute added to one side only.
#[test]
fn the_check_catches_a_one_sided_addition() {
    static EXTRA: Metric = Metric {
        name: "flowtel.test.only",
        unit: "1",
        description: "only in code",
        instrument: Instrument::Gauge,
        readyz: None,
        selectable: false,
    };
    let text = page();
    let mut metrics = catalogue::METRICS.to_vec();
    metrics.push(&EXTRA);
    let found = disagreements(&text, &metrics, catalogue::ATTRIBUTES);
    assert_eq!(
        found,
        ["catalogue: metric `flowtel.test.only` has no row in a metric table of docs/telemetry.md"]
    );
    let documented = format!(
        "{text}\n| metric | instrument | unit |\n| --- | --- | --- |\n| `flowtel.docs.only` | Gauge | `1` |\n"
    );
    let found = disagreements(&documented, catalogue::METRICS, catalogue::ATTRIBUTES);
    assert_eq!(
        found,
        ["docs: metric `flowtel.docs.only` is not in the catalogue"]
    );
    let mut attributes = catalogue::ATTRIBUTES.to_vec();
    attributes.push("flowtel.test.attribute");
    let found = disagreements(&text, catalogue::METRICS, &attributes);
    assert_eq!(
        found,
        ["catalogue: attribute `flowtel.test.attribute` is not named in docs/telemetry.md"]
    );
}
