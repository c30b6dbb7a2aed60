//! The Grafana dashboards in `dashboards/`.
//!
//! * `every_name_in_the_dashboards_is_in_telemetry_md`: every metric and
//!   label a PromQL query names (panels and template variables), and every
//!   label a LogQL query names, comes from `docs/telemetry.md`: its metric
//!   tables translated to Prometheus names as flowtel's endpoint and the
//!   Collector do (dots to `_`, the unit as a word, `_total` on counters,
//!   `_bucket` on histograms, `ratio` for gauges in `1`), its attribute names
//!   with `.` turned into `_` (labels in Prometheus, and in Loki, whose OTLP
//!   ingestion names structured metadata the same way), and the labels its
//!   Prometheus section names (`job`, `instance`, `le`, `otel_scope_name`),
//!   and the labels its `label` tables list (Istio's and Felix's, as they
//!   are). A metric table's `Prometheus` column must be what the translation
//!   makes of the row. Labels a query makes itself (`label_join`,
//!   `label_replace`) are allowed after they are made.
//!   `the_name_check_can_fail` feeds it undocumented names, and
//!   `the_prometheus_column_and_label_tables_are_read` a wrong column.
//! * `dashboards_are_well_formed`: unique uids, panel ids and refIds, every
//!   target on the panel's data source, the template variables, the grid.
//! * `dashboards_type_check_against_grafana_schema`: TypeScript checks each
//!   dashboard against `@grafana/schema`'s `Dashboard` type, and Grafana's
//!   LogQL grammar parses each LogQL query (`dashboards/typecheck/`).
//! * `every_dashboard_query_returns_data_from_a_real_prometheus`: flowtel
//!   (eBPF source, Kubernetes enrichment from the test API server, its
//!   Prometheus endpoint on) runs in client namespace A of A — router R — B
//!   while A's pod talks to B's pod, to the pod's Service and to an
//!   address no object claims, through a router that loses 3 % of the
//!   packets to B, with refused and unanswered connects, an aborted
//!   connection and packets A's nftables drops (Calico-shaped rules with
//!   counters, for the firewall panels), in two rounds (a counter's
//!   first sample has no rate); each round also runs Debian's CNI plugins
//!   (bridge with host-local) as libcni does, two pods set up and torn down
//!   and one setup that fails, for the pod network setup dashboard (the
//!   pods are checkout's in the test API server, given the address
//!   host-local allocated and deleted after their DEL, for the address and
//!   workload panels). flowtel also scrapes, every second, an Envoy
//!   sidecar of a second checkout pod, ztunnel and Felix: local servers
//!   serving the fixtures of `tests/fixtures/mesh/` with their counters
//!   growing at each scrape (`tests/common/mesh.rs`). Debian's Prometheus
//!   scrapes flowtel every second.
//!   Then every PromQL query of every panel, with the template variables set
//!   to the test's cluster, namespace and workload and again to "All"
//!   (`.*`), goes through Prometheus's HTTP API and must return a series,
//!   with a value above 0 except on the agent health dashboard (where 0
//!   means healthy); the queries in `EXACT` must return exactly the value
//!   the mesh fixtures make (error ratios, duration quantiles, Felix's
//!   gauges). Each template variable's `label_values` must list the
//!   test's value. LogQL queries cannot run without Loki: their label names
//!   are checked against the documentation (above) and against the log
//!   records flowtel sent in the same run (every one must be an attribute
//!   or resource attribute of a record, as Loki names it).
//!
//! The third test needs root, `ip`, `nft`, `prometheus`, Debian's
//! `containernetworking-plugins`, and a flowtel built
//! with eBPF on a kernel with BTF; missing, it is skipped
//! ([`common::skip`]), or fails under `CI`.

mod common;
#[path = "common/prometheus.rs"]
#[allow(dead_code)]
mod prometheus;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::cni::{debian_plugins, Attachment, CniNetwork, LinkGuard};
use common::dns::{self, DIG, DNSMASQ};
use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::kubeapi::{fx, KubeApi};
use common::mesh::{self, Behaviour};
use common::netns::NetnsGuard;
use common::otlp_receiver::OtlpReceiver;
use common::router::{RouterLab, A_V4, BACKEND_PORT, B_V4, IF_RB, RA_V4, RB_V4, VIP, VIP_PORT};
use common::scenario;
use common::traffic::{self, TrafficServer};
use prometheus::{Prometheus, Sample, PROMETHEUS};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const HEALTH: &str = "flowtel-health";

// ---------------------------------------------------------------------------
// The dashboards and their queries.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    PromQl,
    LogQl,
    /// A Prometheus template variable: `label_values(SELECTOR, LABEL)`.
    Variable,
    /// A Tempo search over flowtel's connection spans.
    TraceQl,
}

#[derive(Debug, Clone)]
struct Query {
    dashboard: String,
    /// Panel title, or `$name` for a template variable.
    panel: String,
    /// The target's refId (empty for a template variable).
    ref_id: String,
    lang: Lang,
    expr: String,
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = Path::new(ROOT).join("dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("reading dashboards/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "expected the 10 dashboards, found {files:?}"
    );
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).expect("reading a dashboard");
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", f.display()));
            let name = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, json)
        })
        .collect()
}

/// Every panel, rows' collapsed panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn datasource_type(target: &Value, panel: &Value) -> String {
    target["datasource"]["type"]
        .as_str()
        .or_else(|| panel["datasource"]["type"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn queries(name: &str, dash: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let (expr, lang) = match datasource_type(t, p).as_str() {
                // A service map query has no text: Tempo draws it from its
                // own metrics (tests/ebpf_spans.rs checks the graph).
                "tempo" if t["queryType"] == "traceql" => (t["query"].as_str(), Lang::TraceQl),
                "tempo" => continue,
                "loki" => (t["expr"].as_str(), Lang::LogQl),
                _ => (t["expr"].as_str(), Lang::PromQl),
            };
            let Some(expr) = expr else {
                continue;
            };
            out.push(Query {
                dashboard: name.to_string(),
                panel: p["title"].as_str().unwrap_or_default().to_string(),
                ref_id: t["refId"].as_str().unwrap_or_default().to_string(),
                lang,
                expr: expr.to_string(),
            });
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str());
        out.push(Query {
            dashboard: name.to_string(),
            panel: format!("${}", v["name"].as_str().unwrap_or_default()),
            ref_id: String::new(),
            lang: Lang::Variable,
            expr: q.unwrap_or_default().to_string(),
        });
    }
    out
}

fn all_queries() -> Vec<Query> {
    dashboards()
        .iter()
        .flat_map(|(n, d)| queries(n, d))
        .collect()
}

/// `label_values(SELECTOR, LABEL)` → (`count by (LABEL) (SELECTOR)`, LABEL).
fn variable_promql(expr: &str) -> Result<(String, String), String> {
    let inner = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("not label_values(SELECTOR, LABEL): {expr}"))?;
    let (selector, label) = inner
        .rsplit_once(',')
        .ok_or_else(|| format!("label_values needs a selector: {expr}"))?;
    let label = label.trim().to_string();
    Ok((format!("count by ({label}) ({})", selector.trim()), label))
}

/// Grafana's variables, in the order that keeps `$__range` from eating
/// `$__rate_interval`.
fn substitute(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut out = expr.to_string();
    let mut all: Vec<(&str, &str)> = vec![
        ("$__rate_interval", "2m"),
        ("$__interval", "30s"),
        ("$__range", "10m"),
        ("$__auto", "1m"),
    ];
    all.extend_from_slice(vars);
    all.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (k, v) in all {
        out = out.replace(k, v);
    }
    out
}

// ---------------------------------------------------------------------------
// A small PromQL/LogQL lexer: enough to find the names a query uses.
// Prometheus itself checks the syntax (the live test runs every query).

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num,
    Op(String),
    Open(char),
    Close(char),
    Comma,
}

fn lex(expr: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' | '\'' | '`' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(format!("unterminated string in {expr}")),
                        Some('\\') if quote != '`' => {
                            if let Some(n) = chars.get(i + 1) {
                                s.push(*n);
                            }
                            i += 2;
                        }
                        Some(ch) if *ch == quote => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                out.push(Tok::Num);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            '(' | '{' | '[' => {
                out.push(Tok::Open(c));
                i += 1;
            }
            ')' | '}' | ']' => {
                out.push(Tok::Close(c));
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '$' => return Err(format!("unsubstituted variable in {expr}")),
            _ => {
                let start = i;
                while i < chars.len() && "=~!<>+-*/%^|".contains(chars[i]) {
                    i += 1;
                }
                if i == start {
                    return Err(format!("unexpected {c:?} in {expr}"));
                }
                out.push(Tok::Op(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: [&str; 5] = ["bool", "and", "or", "unless", "offset"];
const AGGREGATORS: [&str; 12] = [
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];
const MATCH_OPS: [&str; 9] = ["=", "!=", "=~", "!~", "==", ">", "<", ">=", "<="];

/// What a query names.
#[derive(Debug, Default, Clone, PartialEq)]
struct Names {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    /// Labels the query makes (`label_join`/`label_replace` destinations).
    created: BTreeSet<String>,
}

#[derive(Debug)]
enum Frame {
    Call(Option<String>, usize),
    Grouping,
    Brace,
    Bracket,
}

fn promql_names(expr: &str) -> Result<Names, String> {
    let toks = lex(expr)?;
    let mut names = Names::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut grouping_next = false;
    let mut call_next: Option<String> = None;
    for (i, t) in toks.iter().enumerate() {
        let next = toks.get(i + 1);
        match t {
            Tok::Ident(s) => match stack.last() {
                Some(Frame::Brace) => {
                    if matches!(next, Some(Tok::Op(op)) if MATCH_OPS.contains(&op.as_str())) {
                        names.labels.insert(s.clone());
                    }
                }
                Some(Frame::Grouping) => {
                    names.labels.insert(s.clone());
                }
                Some(Frame::Bracket) => {}
                _ => {
                    if GROUPING.contains(&s.as_str()) {
                        grouping_next = true;
                    } else if KEYWORDS.contains(&s.as_str()) {
                    } else if next == Some(&Tok::Open('(')) {
                        call_next = Some(s.clone());
                    } else if AGGREGATORS.contains(&s.as_str())
                        && matches!(next, Some(Tok::Ident(g)) if g == "by" || g == "without")
                    {
                    } else {
                        names.metrics.insert(s.clone());
                    }
                }
            },
            Tok::Open('(') => {
                if std::mem::take(&mut grouping_next) {
                    stack.push(Frame::Grouping);
                } else {
                    stack.push(Frame::Call(call_next.take(), 0));
                }
            }
            Tok::Open('{') => stack.push(Frame::Brace),
            Tok::Open(_) => stack.push(Frame::Bracket),
            Tok::Close(_) => {
                stack.pop();
            }
            Tok::Comma => {
                if let Some(Frame::Call(_, arg)) = stack.last_mut() {
                    *arg += 1;
                }
            }
            Tok::Str(v) => {
                if let Some(Frame::Call(Some(f), arg)) = stack.last() {
                    match (f.as_str(), *arg) {
                        ("label_join" | "label_replace", 1) => {
                            names.created.insert(v.clone());
                        }
                        ("label_join", a) if a >= 3 => {
                            names.labels.insert(v.clone());
                        }
                        ("label_replace", 3) => {
                            names.labels.insert(v.clone());
                        }
                        _ => {}
                    }
                }
            }
            Tok::Num | Tok::Op(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(format!("unbalanced brackets in {expr}"));
    }
    Ok(names)
}

/// The labels (stream labels, structured metadata, `unwrap`ped and grouped
/// fields) a LogQL query names.
fn logql_labels(expr: &str) -> Result<BTreeSet<String>, String> {
    let toks = lex(expr)?;
    let mut labels = BTreeSet::new();
    let mut stack: Vec<char> = Vec::new();
    let mut grouping_next = false;
    let mut after_pipe = false;
    let mut unwrap_next = false;
    for (i, t) in toks.iter().enumerate() {
        let next = toks.get(i + 1);
        match t {
            Tok::Ident(s) => {
                let in_group = stack.last() == Some(&'g');
                let in_brace = stack.last() == Some(&'{');
                let before_op =
                    matches!(next, Some(Tok::Op(op)) if MATCH_OPS.contains(&op.as_str()));
                if in_group || std::mem::take(&mut unwrap_next) || (in_brace && before_op) {
                    labels.insert(s.clone());
                } else if s == "by" || s == "without" {
                    grouping_next = true;
                } else if after_pipe && s == "unwrap" {
                    unwrap_next = true;
                } else if after_pipe && before_op {
                    labels.insert(s.clone());
                } else if after_pipe && s != "unwrap" {
                    return Err(format!("unsupported LogQL stage `{s}` in {expr}"));
                }
                after_pipe = false;
            }
            Tok::Op(op) => after_pipe = op == "|",
            Tok::Open(c) => {
                stack.push(if *c == '(' && std::mem::take(&mut grouping_next) {
                    'g'
                } else {
                    *c
                });
                after_pipe = false;
            }
            Tok::Close(_) => {
                stack.pop();
            }
            _ => after_pipe = false,
        }
    }
    Ok(labels)
}

// ---------------------------------------------------------------------------
// docs/telemetry.md.

/// `name` as a Prometheus metric or label name: what is not a letter, digit
/// (or `:` in metric names) becomes `_`, no two `_` in a row.
fn sanitize(name: &str, metric: bool) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || (metric && c == ':') {
            c
        } else {
            '_'
        };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Instrument {
    Counter,
    Gauge,
    Histogram,
}

/// The Prometheus names of a documented metric (docs/telemetry.md,
/// "Prometheus endpoint").
fn prometheus_names(name: &str, unit: &str, kind: Instrument) -> Vec<String> {
    let mut base = sanitize(name, true);
    let plain: String = {
        let mut depth = 0;
        unit.chars()
            .filter(|c| {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => return depth == 0,
                }
                false
            })
            .collect()
    };
    let word = match (plain.trim(), kind) {
        ("", _) => None,
        ("1", Instrument::Gauge) => Some("ratio".to_string()),
        ("1", _) => None,
        ("By", _) => Some("bytes".to_string()),
        ("s", _) => Some("seconds".to_string()),
        ("ms", _) => Some("milliseconds".to_string()),
        ("us", _) => Some("microseconds".to_string()),
        ("ns", _) => Some("nanoseconds".to_string()),
        (other, _) => Some(sanitize(other, true)),
    };
    if let Some(w) = word {
        if !format!("_{base}_").contains(&format!("_{w}_")) {
            base = format!("{base}_{w}");
        }
    }
    match kind {
        Instrument::Counter if base.ends_with("_total") => vec![base],
        Instrument::Counter => vec![format!("{base}_total")],
        Instrument::Gauge => vec![base],
        Instrument::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect(),
    }
}

/// What the documentation defines, in Prometheus's (and Loki's) spelling.
#[derive(Debug, Default)]
struct Documented {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    /// Metric-table rows whose `Prometheus` column is not what the
    /// translation makes of the row's name, unit and instrument.
    mismatches: Vec<String>,
    /// The page itself, where span attributes are named in backticks.
    text: String,
}

/// Attribute namespaces of flowtel's telemetry; other dotted names in the
/// page are configuration keys (`ebpf.max_flows`, ...).
const ATTRIBUTE_ROOTS: [&str; 14] = [
    "flowtel",
    "k8s",
    "network",
    "client",
    "server",
    "cloud",
    "otel",
    "service",
    "host",
    "source",
    "destination",
    "flow",
    "event",
    "dns",
];

fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn documented() -> Documented {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/telemetry.md"))
        .expect("reading docs/telemetry.md");
    let mut doc = documented_in(&text);
    doc.text.clone_from(&text);
    // The Prometheus section: the resource as `target_info`, joined `on
    // (job, instance)`, histogram buckets by `le`, the scope label.
    for (needle, metric, labels) in [
        ("`target_info`", Some("target_info"), &[][..]),
        ("on (job, instance)", None, &["job", "instance"][..]),
        ("(with `le`)", None, &["le"][..]),
        ("`otel_scope_name=", None, &["otel_scope_name"][..]),
    ] {
        assert!(
            text.contains(needle),
            "docs/telemetry.md no longer says {needle:?}"
        );
        doc.metrics.extend(metric.map(String::from));
        doc.labels.extend(labels.iter().map(|l| l.to_string()));
    }
    doc
}

/// The names `text`'s tables (and backticked attributes) define.
fn documented_in(text: &str) -> Documented {
    let mut doc = Documented::default();
    let mut metric_names = BTreeSet::new();
    let mut header: Vec<String> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with('|') {
            header.clear();
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        if lines
            .get(i + 1)
            .is_some_and(|l| l.starts_with("| ---") || l.starts_with("|---"))
        {
            header = cells.iter().map(|c| c.to_lowercase()).collect();
        }
        let is_metric_table = header.first().is_some_and(|h| h == "metric")
            && header.iter().any(|h| h == "instrument")
            && header.iter().any(|h| h == "unit");
        let is_row = !line.starts_with("| metric") && !line.starts_with("| label");
        if is_metric_table && is_row && cells.len() >= 3 {
            let kind = if cells[1].contains("Histogram") {
                Instrument::Histogram
            } else if cells[1].contains("Gauge") {
                Instrument::Gauge
            } else {
                Instrument::Counter
            };
            let unit = cells[2].trim_matches('`');
            let stated = header
                .iter()
                .position(|h| h == "prometheus")
                .and_then(|i| cells.get(i))
                .map(|c| backticked(c));
            for name in backticked(cells[0]) {
                metric_names.insert(name.to_string());
                let names = prometheus_names(name, unit, kind);
                if let Some(stated) = &stated {
                    let made = match kind {
                        Instrument::Histogram => names[0].trim_end_matches("_bucket"),
                        _ => names[0].as_str(),
                    };
                    if stated.as_slice() != [made] {
                        doc.mismatches.push(format!(
                            "{name}: the table says {stated:?}, the translation makes {made}"
                        ));
                    }
                }
                doc.metrics.extend(names);
            }
        }
        // Tables of labels (scraped families' labels, as they are): the
        // names in the first column.
        if header.first().is_some_and(|h| h == "label") && is_row {
            doc.labels
                .extend(backticked(cells[0]).into_iter().map(|l| sanitize(l, false)));
        }
        for token in backticked(line) {
            let root = token.split('.').next().unwrap_or_default();
            if token.contains('.')
                && !token.contains(['<', ' ', '=', '/', '*'])
                && ATTRIBUTE_ROOTS.contains(&root)
            {
                doc.labels.insert(sanitize(token, false));
            }
        }
    }
    for m in &metric_names {
        doc.labels.remove(&sanitize(m, false));
    }
    doc
}

/// What `q` names that the documentation does not.
fn undocumented(q: &Query, doc: &Documented) -> Result<Vec<String>, String> {
    let mut missing = Vec::new();
    match q.lang {
        Lang::PromQl | Lang::Variable => {
            let expr = if q.lang == Lang::Variable {
                let (promql, label) = variable_promql(&q.expr)?;
                if !doc.labels.contains(&label) {
                    missing.push(format!("label {label}"));
                }
                promql
            } else {
                q.expr.clone()
            };
            let names = promql_names(&substitute(&expr, &VARS_ALL))?;
            for m in &names.metrics {
                if !doc.metrics.contains(m) {
                    missing.push(format!("metric {m}"));
                }
            }
            for l in &names.labels {
                if !doc.labels.contains(l) && !names.created.contains(l) {
                    missing.push(format!("label {l}"));
                }
            }
            if names.metrics.is_empty() {
                return Err(format!("no metric in {}", q.expr));
            }
        }
        Lang::LogQl => {
            for l in logql_labels(&substitute(&q.expr, &VARS_ALL))? {
                if !doc.labels.contains(&l) {
                    missing.push(format!("label {l}"));
                }
            }
        }
        Lang::TraceQl => {
            for c in traceql_conditions(&q.expr)? {
                if let Some(name) = c.attribute() {
                    if !doc.text.contains(&format!("`{name}`")) {
                        missing.push(format!("span attribute {name}"));
                    }
                }
            }
        }
    }
    Ok(missing)
}

/// One comparison of a TraceQL spanset filter: `resource.k8s.pod.name =~
/// "x"`, `span.flowtel.tcp.retransmits > 0`, `kind = client`.
#[derive(Debug, Clone, PartialEq)]
struct TraceCond {
    field: String,
    op: String,
    value: String,
}

impl TraceCond {
    /// The attribute it reads, if not an intrinsic (`kind`, `status`).
    fn attribute(&self) -> Option<&str> {
        self.field
            .strip_prefix("resource.")
            .or_else(|| self.field.strip_prefix("span."))
    }

    /// Whether `span` passes. Regular expressions are evaluated only as the
    /// dashboards use them: `.*` (All) or a literal (one selected value).
    fn matches(&self, span: &common::otlp_receiver::ReceivedSpan) -> Result<bool, String> {
        use common::otlp_receiver::AttrValue;
        let actual: Option<String> = match self.field.as_str() {
            "kind" => Some(match span.kind {
                2 => "server".into(),
                3 => "client".into(),
                k => format!("kind {k}"),
            }),
            "status" => Some(match span.status.0 {
                0 => "unset".into(),
                1 => "ok".into(),
                _ => "error".into(),
            }),
            f => {
                let attrs = if f.starts_with("resource.") {
                    &span.resource
                } else {
                    &span.attrs
                };
                self.attribute()
                    .and_then(|a| attrs.get(a))
                    .map(|v| match v {
                        AttrValue::Str(s) => s.clone(),
                        other => other.to_string(),
                    })
            }
        };
        let value = self.value.trim_matches('"');
        Ok(match (self.op.as_str(), actual) {
            ("!=", None) => value != "nil",
            (_, None) => false,
            ("=", Some(a)) => a == value,
            ("!=", Some(a)) => value == "nil" || a != value,
            ("=~", Some(_)) if value == ".*" => true,
            ("=~", Some(a))
                if value
                    .chars()
                    .all(|c| c.is_alphanumeric() || "-_.".contains(c)) =>
            {
                a == value
            }
            (">", Some(a)) => {
                let (a, v) = (a.parse::<f64>(), value.parse::<f64>());
                matches!((a, v), (Ok(a), Ok(v)) if a > v)
            }
            (op, _) => return Err(format!("{self:?}: {op} {value} is not evaluated here")),
        })
    }
}

/// The comparisons of a spanset filter joined by `&&`, the only TraceQL
/// the dashboards use (Grafana's grammar checks the syntax in
/// dashboards/typecheck; this reads what the query asks of a span).
fn traceql_conditions(expr: &str) -> Result<Vec<TraceCond>, String> {
    let inner = expr
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(|| format!("not one spanset filter: {expr}"))?;
    if inner.contains("||") || inner.contains('|') || inner.contains('(') {
        return Err(format!(
            "only comparisons joined by && are read here: {expr}"
        ));
    }
    inner
        .split("&&")
        .map(|c| match c.split_whitespace().collect::<Vec<_>>()[..] {
            [field, op, value] => Ok(TraceCond {
                field: field.into(),
                op: op.into(),
                value: value.into(),
            }),
            _ => Err(format!("not FIELD OP VALUE: {c:?} in {expr}")),
        })
        .collect()
}

/// The spans `expr` (variables substituted) finds.
fn traceql_run(expr: &str, spans: &[common::otlp_receiver::ReceivedSpan]) -> Result<usize, String> {
    let conds = traceql_conditions(expr)?;
    let mut found = 0;
    for s in spans {
        let mut all = true;
        for c in &conds {
            all &= c.matches(s)?;
        }
        found += usize::from(all);
    }
    Ok(found)
}

const VARS_ALL: [(&str, &str); 3] = [
    ("$cluster", ".*"),
    ("$namespace", ".*"),
    ("$workload", ".*"),
];

#[test]
fn every_name_in_the_dashboards_is_in_telemetry_md() {
    let doc = documented();
    println!(
        "docs/telemetry.md: {} Prometheus metric names, {} labels",
        doc.metrics.len(),
        doc.labels.len()
    );
    assert!(
        doc.mismatches.is_empty(),
        "docs/telemetry.md states Prometheus names the translation does not make:\n  {}",
        doc.mismatches.join("\n  ")
    );
    for m in [
        "flowtel_flow_bytes_total",
        "flowtel_tcp_rtt_seconds_bucket",
        "flowtel_source_byte_counters_ratio",
        "flowtel_flows_tracked",
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "felix_resync_state_ratio",
        "flowtel_hubble_flows_total",
    ] {
        assert!(
            doc.metrics.contains(m),
            "the doc parser lost {m}: {:?}",
            doc.metrics
        );
    }
    let queries = all_queries();
    let mut problems = Vec::new();
    let mut used_metrics = BTreeSet::new();
    let mut used_labels = BTreeSet::new();
    for q in &queries {
        match undocumented(q, &doc) {
            Ok(missing) if missing.is_empty() => {}
            Ok(missing) => problems.push(format!("{} / {}: {missing:?}", q.dashboard, q.panel)),
            Err(e) => problems.push(format!("{} / {}: {e}", q.dashboard, q.panel)),
        }
        match q.lang {
            Lang::LogQl => used_labels
                .extend(logql_labels(&substitute(&q.expr, &VARS_ALL)).unwrap_or_default()),
            Lang::TraceQl => used_labels.extend(
                traceql_conditions(&q.expr)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| c.attribute().map(String::from)),
            ),
            _ => {
                let expr = match q.lang {
                    Lang::Variable => variable_promql(&q.expr).map(|v| v.0).unwrap_or_default(),
                    _ => q.expr.clone(),
                };
                if let Ok(n) = promql_names(&substitute(&expr, &VARS_ALL)) {
                    used_metrics.extend(n.metrics);
                    used_labels
                        .extend(n.labels.difference(&n.created).cloned().collect::<Vec<_>>());
                }
            }
        }
    }
    let count = |l: Lang| queries.iter().filter(|q| q.lang == l).count();
    println!(
        "{} queries ({} PromQL, {} LogQL, {} TraceQL, {} template variables) name {} metrics and {} \
         labels or attributes, all documented: {}",
        queries.len(),
        count(Lang::PromQl),
        count(Lang::LogQl),
        count(Lang::TraceQl),
        count(Lang::Variable),
        used_metrics.len(),
        used_labels.len(),
        problems.is_empty()
    );
    println!("metrics: {used_metrics:?}\nlabels: {used_labels:?}");
    assert!(
        problems.is_empty(),
        "undocumented names:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_name_check_can_fail() {
    let doc = documented();
    let q = |lang: Lang, expr: &str| Query {
        dashboard: "test".into(),
        panel: "test".into(),
        ref_id: "A".into(),
        lang,
        expr: expr.into(),
    };
    for (query, expected) in [
        (
            q(Lang::PromQl, "sum(rate(flowtel_flow_byte_total[5m]))"),
            "metric flowtel_flow_byte_total",
        ),
        (
            q(
                Lang::PromQl,
                "sum by (k8s_namespace) (rate(flowtel_flow_bytes_total[5m]))",
            ),
            "label k8s_namespace",
        ),
        (
            q(Lang::PromQl, r#"flowtel_flow_bytes_total{pod="x"}"#),
            "label pod",
        ),
        (
            q(
                Lang::PromQl,
                r#"label_join(flowtel_flow_bytes_total, "id", "/", "nope")"#,
            ),
            "label nope",
        ),
        (
            q(
                Lang::PromQl,
                "flowtel_flow_bytes_total * on (job, node) group_left () target_info",
            ),
            "label node",
        ),
        (
            q(Lang::PromQl, "flowtel_tcp_rtt_bucket"),
            "metric flowtel_tcp_rtt_bucket",
        ),
        (
            q(
                Lang::LogQl,
                r#"{service_name="flowtel"} | event_name="flowtel.flow" | bytes > 10"#,
            ),
            "label bytes",
        ),
        (
            q(
                Lang::LogQl,
                r#"sum by (namespace) (count_over_time({service_name="flowtel"} [1m]))"#,
            ),
            "label namespace",
        ),
        (
            q(
                Lang::LogQl,
                r#"sum(sum_over_time({service_name="flowtel"} | unwrap io_bytes [1m]))"#,
            ),
            "label io_bytes",
        ),
        (
            q(
                Lang::Variable,
                "label_values(flowtel_flow_bytes_total, cluster)",
            ),
            "label cluster",
        ),
    ] {
        let missing = undocumented(&query, &doc).unwrap_or_else(|e| vec![e]);
        println!("{}: {missing:?}", query.expr);
        assert!(
            missing.iter().any(|m| m == expected),
            "{}: expected {expected:?} among {missing:?}",
            query.expr
        );
    }
    // And documented names pass.
    let fine = q(
        Lang::PromQl,
        r#"label_replace(label_join(sum by (k8s_namespace_name, flowtel_k8s_workload_name) (rate(flowtel_flow_bytes_total{server_port="80"}[5m]) * on (job, instance) group_left () target_info{k8s_cluster_name=~".*"}), "source", "/", "k8s_namespace_name", "flowtel_k8s_workload_name"), "source", "$1", "source", "(.*)")"#,
    );
    assert_eq!(undocumented(&fine, &doc), Ok(vec![]));
}

/// The parts of the documentation the mesh metrics use: a metric table's
/// `Prometheus` column is checked against the translation, and a `label`
/// table names labels as they are.
#[test]
fn the_prometheus_column_and_label_tables_are_read() {
    let text = "| metric | instrument | unit | Prometheus |\n\
                | --- | --- | --- | --- |\n\
                | `a.b.requests` | Sum | `{request}` | `a_b_requests_total` |\n\
                | `a.b.duration` | Histogram | `ms` | `a_b_duration_milliseconds` |\n\
                | `a.b.state` | Gauge | `1` | `a_b_state` |\n\
                \n\
                | label | on | meaning |\n\
                | --- | --- | --- |\n\
                | `reporter`, `source_workload` | `a.b.requests` | who |\n";
    let doc = documented_in(text);
    assert_eq!(
        doc.mismatches,
        ["a.b.state: the table says [\"a_b_state\"], the translation makes a_b_state_ratio"]
    );
    for m in [
        "a_b_requests_total",
        "a_b_duration_milliseconds_bucket",
        "a_b_state_ratio",
    ] {
        assert!(doc.metrics.contains(m), "{m}: {:?}", doc.metrics);
    }
    for l in ["reporter", "source_workload"] {
        assert!(doc.labels.contains(l), "{l}: {:?}", doc.labels);
    }
    assert!(
        !doc.labels.contains("a_b_requests"),
        "a metric name is not a label"
    );
}

#[test]
fn dashboards_are_well_formed() {
    let mut uids = BTreeSet::new();
    let mut panels_total = 0;
    for (name, d) in dashboards() {
        let uid = d["uid"].as_str().unwrap_or_default();
        assert_eq!(uid, name, "{name}: the uid is the file name");
        assert!(uids.insert(uid.to_string()), "{name}: duplicate uid");
        assert!(
            d["title"]
                .as_str()
                .is_some_and(|t| t.starts_with("flowtel / ")),
            "{name}: title"
        );
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(
            vars.contains(&"datasource") && vars.contains(&"cluster"),
            "{name}: variables {vars:?}"
        );
        let text = d.to_string();
        for v in ["namespace", "workload"] {
            if text.contains(&format!("${v}")) {
                assert!(
                    vars.contains(&v),
                    "{name}: uses ${v} but does not define it"
                );
            }
        }
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            panels_total += 1;
            let title = p["title"].as_str().unwrap_or_default();
            assert!(
                ids.insert(p["id"].as_u64()),
                "{name} / {title}: duplicate panel id"
            );
            let grid = &p["gridPos"];
            let (x, w) = (
                grid["x"].as_u64().unwrap_or(99),
                grid["w"].as_u64().unwrap_or(99),
            );
            assert!(
                x + w <= 24 && grid["h"].as_u64().is_some_and(|h| h > 0),
                "{name} / {title}: gridPos {grid}"
            );
            let ds = p["datasource"]["type"].as_str().unwrap_or_default();
            assert!(
                ["prometheus", "loki", "tempo"].contains(&ds),
                "{name} / {title}: datasource {ds:?}"
            );
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{name} / {title}: no query");
            let mut refs = BTreeSet::new();
            for t in &targets {
                assert!(
                    refs.insert(t["refId"].as_str().unwrap_or_default().to_string()),
                    "{name} / {title}: duplicate refId"
                );
                assert_eq!(
                    datasource_type(t, p),
                    ds,
                    "{name} / {title}: target on another data source"
                );
                let text = match (ds, t["queryType"].as_str()) {
                    ("tempo", Some("serviceMap")) => Some("service map"),
                    ("tempo", Some("traceql")) => t["query"].as_str(),
                    ("tempo", other) => panic!("{name} / {title}: Tempo query type {other:?}"),
                    _ => t["expr"].as_str(),
                };
                assert!(
                    text.is_some_and(|e| !e.is_empty()),
                    "{name} / {title}: empty query"
                );
            }
            assert!(
                !p["description"].as_str().unwrap_or_default().is_empty(),
                "{name} / {title}: no description"
            );
        }
    }
    let node_graphs: usize = dashboards()
        .iter()
        .map(|(_, d)| {
            panels(d)
                .iter()
                .filter(|p| p["type"] == "nodeGraph")
                .count()
        })
        .sum();
    assert!(node_graphs >= 1, "a node-graph service map");
    println!(
        "{} dashboards, {panels_total} panels, {node_graphs} node graph",
        uids.len()
    );
}

/// `node dashboards/typecheck/check.mjs`: every dashboard against
/// `@grafana/schema`'s `Dashboard` type (TypeScript, `satisfies`), every
/// LogQL query through Grafana's LogQL grammar, and a self-test that both
/// reject broken input. Needs the npm packages scripts/install-test-deps.sh
/// installs; missing, it is skipped ([`common::skip`]), or fails under `CI`.
#[test]
fn dashboards_type_check_against_grafana_schema() {
    let dir = Path::new(ROOT).join("dashboards/typecheck");
    let node = common::find_tool(&common::Tool {
        name: "node",
        env: "NODE_BIN",
        fallbacks: &["/usr/bin/node"],
    });
    let missing = match &node {
        Err(e) => Some(e.clone()),
        Ok(_) if !dir.join("node_modules/@grafana/schema").exists() => Some(format!(
            "{} has no node_modules (scripts/install-test-deps.sh runs npm ci there)",
            dir.display()
        )),
        Ok(_) => None,
    };
    if let Some(why) = missing {
        common::skip("dashboards_type_check_against_grafana_schema", &why);
        return;
    }
    let out = std::process::Command::new(node.expect("node, checked above"))
        .arg(dir.join("check.mjs"))
        .output()
        .expect("running node");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");
    assert!(
        out.status.success(),
        "dashboards/typecheck/check.mjs failed:\n{said}"
    );
    assert!(said.contains("@grafana/schema: 0 errors;"), "{said}");
}

// ---------------------------------------------------------------------------
// Live: flowtel, traffic and a real Prometheus.

const TEST: &str = "every_dashboard_query_returns_data_from_a_real_prometheus";
const NODE: &str = "node-a";
const CLUSTER: &str = "dash-test";
const EXTRA_V4: &str = "198.19.0.9";
const CLOSED_PORT: u16 = 5555;
const DROPPED_TCP_PORT: u16 = 9999;
const DROPPED_UDP_PORT: u16 = 9998;
const LOSS_PERCENT: u32 = 3;
/// Names dnsmasq in B (the payments pod) answers, A and AAAA.
const DNS_KNOWN: [&str; 2] = [
    "payments.shop.svc.cluster.local",
    "checkout.shop.svc.cluster.local",
];
/// Names it answers NXDOMAIN, A only.
const DNS_MISSING: [&str; 2] = [
    "missing0.shop.svc.cluster.local",
    "missing1.shop.svc.cluster.local",
];
/// `ebpf.dns.timeout`: A's lookups sent to EXTRA_V4, whose DNS R drops,
/// are timeouts after this.
const DNS_TIMEOUT: &str = "1s";
/// Where the meshed checkout pod's sidecar, ztunnel and Felix serve their
/// scrapes: loopback addresses of flowtel's own namespace.
const SIDECAR_IP: &str = "127.0.0.2";
const ZTUNNEL_IP: &str = "127.0.0.3";
const FELIX_IP: &str = "127.0.0.4";
const QUERY_DEADLINE: Duration = Duration::from_secs(40);

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("literal address"), port)
}

/// Request-duration quantiles of the Envoy fixture, as Prometheus's
/// `histogram_quantile` interpolates them within a bucket (1042 requests;
/// cumulative 120 at 5 ms, 700 at 10, 1000 at 25, 1040 at 50).
const P50_MS: f64 = 5.0 + (0.5 * 1042.0 - 120.0) / 580.0 * 5.0;
const P95_MS: f64 = 10.0 + (0.95 * 1042.0 - 700.0) / 300.0 * 15.0;
const P99_MS: f64 = 25.0 + (0.99 * 1042.0 - 1000.0) / 40.0 * 25.0;
/// 5xx share of the Envoy fixture's requests as they grow: each scrape
/// adds 7 + 1 to the 503 series and 1042 + 1 to the 200 series.
const ERROR_RATIO: f64 = 8.0 / 1051.0;

/// Queries whose value the mesh fixtures fix, at any time and over any
/// window (`tests/common/mesh.rs`, `advanced`: each scrape adds the same
/// multiple of every counter and bucket, and gauges stay): dashboard,
/// panel, refId, the value every series must have.
const EXACT: [(&str, &str, &str, f64); 18] = [
    ("flowtel-istio", "Error ratio (5xx)", "A", ERROR_RATIO),
    (
        "flowtel-istio",
        "Error ratio by response code",
        "A",
        ERROR_RATIO,
    ),
    (
        "flowtel-istio",
        "Error ratio by destination workload",
        "A",
        ERROR_RATIO,
    ),
    ("flowtel-istio", "p99 request duration", "A", P99_MS),
    (
        "flowtel-istio",
        "Request duration p50, p95, p99",
        "A",
        P50_MS,
    ),
    (
        "flowtel-istio",
        "Request duration p50, p95, p99",
        "B",
        P95_MS,
    ),
    (
        "flowtel-istio",
        "Request duration p50, p95, p99",
        "C",
        P99_MS,
    ),
    (
        "flowtel-istio",
        "p95 request duration by destination workload",
        "A",
        P95_MS,
    ),
    ("flowtel-istio", "Nodes scraping Istio proxies", "A", 1.0),
    ("flowtel-felix", "Nodes with Felix", "A", 1.0),
    ("flowtel-felix", "Nodes in sync", "A", 1.0),
    ("flowtel-felix", "Active local endpoints", "A", 4.0),
    ("flowtel-felix", "Active local policies", "A", 0.0),
    ("flowtel-felix", "Policies in the cluster", "A", 0.0),
    ("flowtel-felix", "Active local endpoints by node", "A", 4.0),
    ("flowtel-felix", "Calico IP sets", "A", 4.0),
    ("flowtel-felix", "BPF dataplane endpoints", "A", 0.0),
    ("flowtel-felix", "BPF dataplane endpoints", "B", 0.0),
];

/// Two nodes in two zones, the checkout pod (A) on this node, the payments
/// pod (B) on the other behind its Service. On this node also a second
/// checkout pod with an Istio sidecar and ztunnel, at loopback addresses
/// where `sidecar` and `ztunnel` serve their scrapes.
/// Returns checkout's ReplicaSet, which the CNI rounds' pods belong to.
fn cluster(api: &KubeApi, sidecar: u16, ztunnel: u16) -> Value {
    let checkout = fx::workload("Deployment", "shop", "checkout");
    let checkout_rs = fx::replicaset("shop", "checkout-5d8f7c9b6", Some(&checkout));
    let checkout_rs_owner = checkout_rs.clone();
    let payments = fx::workload("Deployment", "shop", "payments");
    let payments_rs = fx::replicaset("shop", "payments-6b7f9c4d2", Some(&payments));
    let checkout_pod = fx::PodFx::new("shop", "checkout")
        .on(NODE, RA_V4)
        .ips(&[A_V4])
        .owned_by(&checkout_rs)
        .label("app.kubernetes.io/name", "checkout")
        .build();
    let payments_pod = fx::PodFx::new("shop", "payments")
        .on("node-b", RB_V4)
        .ips(&[B_V4])
        .owned_by(&payments_rs)
        .label("app.kubernetes.io/name", "payments")
        .build();
    let meshed_checkout = mesh::with_proxy(
        fx::PodFx::new("shop", "checkout-5d8f7c9b6-z2x8k")
            .on(NODE, RA_V4)
            .ips(&[SIDECAR_IP])
            .owned_by(&checkout_rs)
            .label("app.kubernetes.io/name", "checkout"),
        sidecar,
        false,
    );
    let ztunnel_ds = fx::workload("DaemonSet", "istio-system", "ztunnel");
    let ztunnel_pod = mesh::with_proxy(
        fx::PodFx::new("istio-system", "ztunnel-p4k9s")
            .on(NODE, RA_V4)
            .ips(&[ZTUNNEL_IP])
            .owned_by(&ztunnel_ds),
        ztunnel,
        true,
    );
    let service = fx::service("shop", "payments", &[VIP]);
    let slice = fx::endpoint_slice(&service, "IPv4", &[&payments_pod]);
    api.load([
        fx::node(NODE, "zone-a", "region-1", &[RA_V4], None),
        fx::node("node-b", "zone-b", "region-1", &[RB_V4], None),
        checkout_rs,
        payments_rs,
        checkout_pod,
        payments_pod,
        meshed_checkout,
        ztunnel_pod,
        service,
        slice,
    ]);
    checkout_rs_owner
}

/// One round of traffic from A: a bulk transfer and short connections
/// through the lossy router, connections to the Service and to an
/// unclaimed address, an aborted connection, refused and unanswered
/// connects, and UDP that A's nftables drops.
/// Closed UDP ports of B each round probes once: a port scan at
/// `flows.anomaly.scan_ports` 3 (no reply comes, only ICMP).
const SCAN_PORTS: [u16; 3] = [7001, 7002, 7003];

fn round(lab: &RouterLab) {
    lab.a
        .in_ns(|| -> std::io::Result<()> {
            let s = std::net::UdpSocket::bind(sock(A_V4, 0))?;
            for port in SCAN_PORTS {
                s.send_to(b"probe", sock(B_V4, port))?;
            }
            Ok(())
        })
        .expect("entering A")
        .expect("UDP probes from A");
    // The retransmit panels need every round to raise the counter its first
    // round created. With segmentation offload the router sees few large
    // packets, so the 3 % loss can miss a whole transfer: repeat it until
    // A's kernel counted a retransmission.
    let retransmitted = || scenario::retransmitted_segments(&lab.a).expect("A's TCP MIB");
    let before = retransmitted();
    let mut transfers = 0;
    let bulk = loop {
        let bulk =
            traffic::tcp_connections(&lab.a, sock(B_V4, BACKEND_PORT), 1, 2 << 20, 256 << 10)
                .expect("bulk transfer to the payments pod");
        transfers += 1;
        if retransmitted() > before {
            break bulk;
        }
        assert!(
            transfers < 20,
            "{transfers} bulk transfers through {LOSS_PERCENT} % loss, no retransmission"
        );
    };
    let vip = traffic::tcp_connections(&lab.a, sock(VIP, VIP_PORT), 3, 20_000, 20_000)
        .expect("connections to the payments Service");
    let extra = traffic::tcp_connections(&lab.a, sock(EXTRA_V4, BACKEND_PORT), 2, 50_000, 50_000)
        .expect("connections to an address no object claims");
    let (refused, unanswered) = lab
        .a
        .in_ns(|| {
            traffic::Failures {
                // Not through the lossy rule: a lost RST leaves the server
                // waiting out its read timeout.
                reset: sock(EXTRA_V4, BACKEND_PORT),
                refused: (sock(B_V4, CLOSED_PORT), 2),
                unanswered: sock(B_V4, DROPPED_TCP_PORT),
                udp_dropped: (sock(A_V4, 0), sock(B_V4, DROPPED_UDP_PORT), 5),
            }
            .run()
        })
        .expect("entering A")
        .expect("client sockets in A");
    assert_eq!(
        (refused, unanswered),
        (2, true),
        "refused and unanswered connects"
    );
    println!("{TEST}: round: bulk {bulk:?} (transfer {transfers}, {} segments retransmitted), Service {vip:?}, unclaimed {extra:?}, 1 reset, 2 refused, 1 unanswered, 5 UDP dropped", retransmitted() - before);
}

/// One round of DNS lookups from A: each of `DNS_KNOWN` A and AAAA
/// (NOERROR) and each of `DNS_MISSING` A (NXDOMAIN) to dnsmasq in B, one
/// to EXTRA_V4 where R drops them (a timeout), and one malformed query (a
/// compression loop: a parse error). Adds what dig printed to `lookups`
/// (RCODE, or TIMEOUT without a response → lookups).
fn dns_round(lab: &RouterLab, dig: &Path, lookups: &mut BTreeMap<String, u64>) {
    let mut ask = |server: &str, name: &str, qtype: &str| {
        let status = dns::dig(&lab.a, dig, server, name, qtype, false);
        *lookups
            .entry(status.unwrap_or_else(|| "TIMEOUT".into()))
            .or_default() += 1;
    };
    for name in DNS_KNOWN {
        ask(B_V4, name, "A");
        ask(B_V4, name, "AAAA");
    }
    for name in DNS_MISSING {
        ask(B_V4, name, "A");
    }
    ask(EXTRA_V4, "lost.shop.svc.cluster.local", "A");
    lab.a
        .in_ns(|| -> std::io::Result<()> {
            let s = std::net::UdpSocket::bind((A_V4, 0))?;
            s.send_to(&dns::compression_loop(7), (B_V4, 53))?;
            Ok(())
        })
        .expect("entering A")
        .expect("sending a malformed query from A");
    println!("{TEST}: DNS round: lookups so far {lookups:?}, 1 malformed query");
}

/// One round of CNI plugin executions (Debian's bridge with host-local,
/// run as libcni runs them): ADD and DEL of two pods and an ADD that fails
/// for a missing IPAM plugin, for the pod network setup dashboard. The pods
/// are checkout's, in the API (so the operations carry their workload):
/// scheduled before their ADD, given the address host-local allocated 2 s
/// after, deleted after their DEL.
fn cni_round(
    guard: &mut NetnsGuard,
    round: usize,
    bin_dir: &Path,
    data: &Path,
    api: &KubeApi,
    owner: &Value,
) {
    let pid = std::process::id();
    let network = |ipam: Value| CniNetwork {
        bin_dir: bin_dir.to_path_buf(),
        conflist: serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "ft-dash",
            "plugins": [{"type": "bridge", "bridge": format!("ftd{}", pid % 10_000_000),
                "isGateway": true, "ipam": ipam}],
        }),
        padding: Vec::new(),
    };
    let good = network(serde_json::json!({"type": "host-local",
        "ranges": [[{"subnet": format!("198.19.{}.0/24", 20 + pid % 200)}]],
        "dataDir": data}));
    let broken = network(serde_json::json!({"type": "ft-no-such-ipam"}));
    let mut ran = Vec::new();
    for i in 0..3 {
        let ns = guard.add(&format!("c{round}{i}")).expect("a pod namespace");
        let at = Attachment {
            container_id: format!("dash{round}{i}"),
            netns: ns.path(),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: format!("checkout-{round}{i}"),
            pod_uid: format!("uid-dash-{round}{i}"),
        };
        let scheduled = std::time::SystemTime::now() - Duration::from_secs(10);
        let condition = |kind: &str, at: std::time::SystemTime, status: &str| {
            serde_json::json!({"type": kind, "status": status, "lastProbeTime": null,
                "lastTransitionTime": fx::timestamp(at)})
        };
        let mut pod = fx::PodFx::new("shop", &at.pod_name)
            .on(NODE, RA_V4)
            .owned_by(owner)
            .phase("Pending")
            .build();
        pod["status"]["conditions"] = serde_json::json!([
            condition("PodScheduled", scheduled, "True"),
            condition("PodReadyToStartContainers", scheduled, "False"),
        ]);
        let mut pod = api.apply(&pod);
        if i == 2 {
            broken
                .add(&at, &mut ran)
                .expect_err("ADD with a missing IPAM plugin fails");
        } else {
            let result = good.add(&at, &mut ran).expect("ADD");
            let address = result["ips"][0]["address"].as_str().unwrap_or_default();
            let ip = address.split('/').next().unwrap_or_default();
            pod["status"]["phase"] = serde_json::json!("Running");
            pod["status"]["podIP"] = serde_json::json!(ip);
            pod["status"]["podIPs"] = serde_json::json!([{"ip": ip}]);
            pod["status"]["conditions"] = serde_json::json!([
                condition("PodScheduled", scheduled, "True"),
                condition(
                    "PodReadyToStartContainers",
                    scheduled + Duration::from_secs(2),
                    "True"
                ),
            ]);
            api.apply(&pod);
            good.del(&at, Some(&result), &mut ran).expect("DEL");
        }
        api.delete(&pod);
    }
    println!("{TEST}: CNI round: {} plugin executions", ran.len());
}

fn nft(lab_ns: &common::netns::Netns, nft: &Path, dir: &Path, name: &str, ruleset: &str) {
    let file = dir.join(name);
    std::fs::write(&file, ruleset).expect("writing an nftables ruleset");
    lab_ns
        .run(nft, &["-f", &file.display().to_string()])
        .expect("loading an nftables ruleset");
}

fn show(samples: &[Sample]) -> String {
    samples
        .iter()
        .take(5)
        .map(|s| format!("{} {:?}", s.value, s.labels))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs `q` with `vars`; `Ok(summary)` when it returns what its panel needs.
fn run_query(prom: &Prometheus, q: &Query, vars: &[(&str, &str)]) -> Result<String, String> {
    let (expr, label) = match q.lang {
        Lang::Variable => {
            let (e, l) = variable_promql(&q.expr)?;
            (e, Some(l))
        }
        _ => (q.expr.clone(), None),
    };
    let expr = substitute(&expr, vars);
    let samples = prom.query(&expr).map_err(|e| format!("{e:#}"))?;
    if let Some(label) = label {
        let values: Vec<&str> = samples
            .iter()
            .filter_map(|s| s.label(&label))
            .filter(|v| !v.is_empty())
            .collect();
        let want = match q.panel.as_str() {
            "$cluster" => CLUSTER,
            "$namespace" => "shop",
            _ => "checkout",
        };
        return if values.contains(&want) {
            Ok(format!("{values:?}"))
        } else {
            Err(format!("{label} values {values:?} lack {want}"))
        };
    }
    if let Some(&(.., want)) = EXACT
        .iter()
        .find(|(d, p, r, _)| *d == q.dashboard && *p == q.panel && *r == q.ref_id)
    {
        let exact = |v: f64| (v - want).abs() <= 1e-6 * want.abs().max(1.0);
        return if !samples.is_empty() && samples.iter().all(|s| exact(s.value)) {
            Ok(format!(
                "{} series, each {want} as the fixtures make it",
                samples.len()
            ))
        } else {
            Err(format!("every series must be {want}: [{}]", show(&samples)))
        };
    }
    let positive = samples.iter().any(|s| s.value > 0.0 && s.value.is_finite());
    let needs_positive = q.dashboard != HEALTH;
    if samples.is_empty() || (needs_positive && !positive) {
        return Err(format!(
            "no {}series: [{}]",
            if needs_positive { "positive " } else { "" },
            show(&samples)
        ));
    }
    Ok(format!(
        "{} series, e.g. {}",
        samples.len(),
        show(&samples[..1])
    ))
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let cni_bin = debian_plugins();
    let mut conditions = common::ebpf_conditions().to_vec();
    conditions.push((
        cni_bin.is_some(),
        "Debian's containernetworking-plugins is not installed (/usr/lib/cni/bridge)",
    ));
    let Some((tools, bins)) =
        common::prerequisites_with(TEST, &[PROMETHEUS, DNSMASQ, DIG], &conditions)
    else {
        return;
    };
    let Some(cni_bin) = cni_bin else { return };
    let mut cni_guard = NetnsGuard::new(&tools);
    let _cni_bridge = LinkGuard {
        ip: tools.ip.clone(),
        name: format!("ftd{}", std::process::id() % 10_000_000),
    };
    let t0 = Instant::now();
    let queries = all_queries();
    let lab = RouterLab::new(&tools).expect("setting up A — R — B");
    // After the lab: dnsmasq is killed before the namespaces go.
    let mut dns_guard = NetnsGuard::new(&tools);
    let dir = tempfile::tempdir().expect("temp dir");
    nft(
        &lab.a,
        &tools.nft,
        dir.path(),
        "a.nft",
        &format!(
            "table inet ft_dash_drop {{\n  chain cali-OUTPUT {{\n    type filter hook output priority 0; policy accept;\n    \
             tcp dport {DROPPED_TCP_PORT} counter drop comment \"Policy default/knp.default.deny-dash egress\"\n    \
             udp dport {DROPPED_UDP_PORT} counter drop comment \"Policy default/knp.default.deny-dash egress\"\n  }}\n}}\n"
        ),
    );
    nft(
        &lab.r,
        &tools.nft,
        dir.path(),
        "r.nft",
        &format!(
            "table inet ft_dash_loss {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    \
             ip daddr {B_V4} tcp dport {BACKEND_PORT} numgen random mod 100 < {LOSS_PERCENT} drop\n    \
             ip daddr {EXTRA_V4} udp dport 53 drop\n  }}\n}}\n"
        ),
    );
    lab.b
        .ip(&["addr", "add", &format!("{EXTRA_V4}/32"), "dev", "ftnb"])
        .expect("a second address in B");
    lab.r
        .ip(&[
            "neigh",
            "add",
            EXTRA_V4,
            "lladdr",
            "02:00:00:00:0b:04",
            "dev",
            IF_RB,
            "nud",
            "permanent",
        ])
        .expect("R's neighbour entry for it");

    // The cluster's DNS server: dnsmasq in B, answering for the Services'
    // names and NXDOMAIN for the rest of cluster.local.
    let (dig_bin, dnsmasq) = (&bins[2], &bins[1]);
    dns::start_dnsmasq(
        &mut dns_guard,
        &lab.b,
        &lab.a,
        (dnsmasq, dig_bin),
        &dns::dnsmasq_args(
            &[B_V4],
            "/cluster.local/",
            &[
                format!("{},198.51.100.9,2001:db8::9", DNS_KNOWN[0]),
                format!("{},198.51.100.10,2001:db8::10", DNS_KNOWN[1]),
            ],
        ),
        (B_V4, DNS_KNOWN[0]),
    );

    let rt = tokio::runtime::Runtime::new()
        .expect("a tokio runtime for the API server and the scrape targets");
    // The mesh sources' targets, counters growing at every scrape.
    let (sidecar, ztunnel, felix) = rt.block_on(async {
        (
            mesh::serve(
                sock(SIDECAR_IP, 0),
                Behaviour::Growing(mesh::TEXT, mesh::ENVOY),
            )
            .await,
            mesh::serve(
                sock(ZTUNNEL_IP, 0),
                Behaviour::Growing(mesh::OPENMETRICS, mesh::ZTUNNEL),
            )
            .await,
            mesh::serve(
                sock(FELIX_IP, 0),
                Behaviour::Growing(mesh::TEXT, mesh::FELIX),
            )
            .await,
        )
    });
    let api = KubeApi::new();
    rt.block_on(api.start());
    let checkout_rs = cluster(&api, sidecar.port(), ztunnel.port());
    let kubeconfig = api.write_kubeconfig(dir.path());
    let receiver = OtlpReceiver::start().expect("the OTLP receiver (log records)");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            (
                "FLOWTEL_KUBERNETES__KUBECONFIG",
                kubeconfig.display().to_string(),
            ),
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.to_string()),
            ("FLOWTEL_RESOURCE__CLUSTER_NAME", CLUSTER.to_string()),
            (
                "FLOWTEL_EXPORT__PROMETHEUS__LISTEN",
                "127.0.0.1:0".to_string(),
            ),
            ("FLOWTEL_EXPORT__CONSOLE__MODE", "never".to_string()),
            ("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", "0".to_string()),
            ("FLOWTEL_CNI__ENABLED", "on".to_string()),
            // Every connection's span, for the TraceQL panels.
            ("FLOWTEL_EXPORT__TRACES__ENABLED", "true".to_string()),
            // The UDP probes of each round: a port scan at this threshold,
            // for the anomaly panels.
            (
                "FLOWTEL_FLOWS__ANOMALY__SCAN_PORTS",
                SCAN_PORTS.len().to_string(),
            ),
            ("FLOWTEL_EXPORT__TRACES__SAMPLING", "1".to_string()),
            ("FLOWTEL_EXPORT__TRACES__RATE_LIMIT", "0".to_string()),
            ("FLOWTEL_EBPF__DNS__TIMEOUT", DNS_TIMEOUT.to_string()),
            ("FLOWTEL_EXPORT__LOGS__DNS", "failed".to_string()),
            ("FLOWTEL_FLOWS__DNS_TOP_NAMES", "3".to_string()),
        ]
        .into_iter()
        .chain(mesh::scrape_env(felix, "1s", "800ms"))
        .collect(),
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    let out = flowtel.output();
    assert!(
        out.contains("naming flow ends from the Kubernetes API")
            && !out.contains("TCP health unavailable"),
        "{TEST}: Kubernetes naming and TCP health must be on:\n{out}"
    );
    let mut addr = None;
    common::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        addr = flowtel.prometheus_addr();
        addr.is_some()
    });
    let addr = addr.unwrap_or_else(|| {
        panic!(
            "flowtel logged no Prometheus endpoint:\n{}",
            flowtel.output()
        )
    });
    let prom = Prometheus::start(&bins[0], "flowtel", addr, "1s").expect("starting Prometheus");
    // Flows are named once the cache has synced and flowtel took that view
    // (before its next dump).
    let synced = flowtel
        .wait_for_kube_synced(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{TEST}: {e:#}"));
    flowtel
        .wait_for_dump_after(&synced, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{TEST}: {e:#}"));

    let server = TrafficServer::start(
        &lab.b,
        &[sock(B_V4, BACKEND_PORT), sock(EXTRA_V4, BACKEND_PORT)],
        &[],
    )
    .expect("the servers in B");
    let mut lookups = BTreeMap::new();
    round(&lab);
    dns_round(&lab, dig_bin, &mut lookups);
    cni_round(
        &mut cni_guard,
        0,
        &cni_bin,
        &dir.path().join("ipam"),
        &api,
        &checkout_rs,
    );
    // The second round raises counters that the first created, so their
    // rates are above 0.
    std::thread::sleep(Duration::from_secs(3));
    round(&lab);
    dns_round(&lab, dig_bin, &mut lookups);
    cni_round(
        &mut cni_guard,
        1,
        &cni_bin,
        &dir.path().join("ipam"),
        &api,
        &checkout_rs,
    );
    let errors = server.errors();
    drop(server);
    // The aborted connection of each round resets the server's side: the
    // server sees ECONNRESET on a read, or ENOTCONN when the reset came
    // before its shutdown.
    let unexpected: Vec<&String> = errors
        .iter()
        .filter(|e| !e.contains("Connection reset by peer") && !e.contains("(os error 107)"))
        .collect();
    assert!(
        unexpected.is_empty() && errors.len() <= 2,
        "the servers in B failed: {errors:?}"
    );
    println!("{TEST}: {:.1}s: traffic done", t0.elapsed().as_secs_f64());

    // The DNS panels' ground truth: what dig printed, two rounds.
    let want_lookups: BTreeMap<String, u64> = [
        ("NOERROR", 2 * 2 * DNS_KNOWN.len()),
        ("NXDOMAIN", 2 * DNS_MISSING.len()),
        ("TIMEOUT", 2),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v as u64))
    .collect();
    assert_eq!(lookups, want_lookups, "{TEST}: what dig got from dnsmasq");
    // flowtel's counts through Prometheus, by RCODE, for the checkout pod:
    // exactly those (the timeouts come `DNS_TIMEOUT` after the last round).
    let by_rcode = "sum by (flowtel_dns_rcode) (flowtel_dns_requests_total{k8s_namespace_name=\"shop\", flowtel_k8s_workload_name=\"checkout\", server_port=\"53\"})";
    let mut counted = BTreeMap::new();
    common::wait_until(QUERY_DEADLINE, Duration::from_millis(500), || {
        counted = prom
            .query(by_rcode)
            .unwrap_or_default()
            .iter()
            .map(|s| {
                let rcode = s.label("flowtel_dns_rcode").unwrap_or_default();
                (rcode.to_string(), s.value as u64)
            })
            .collect();
        counted == lookups
    });
    println!("{TEST}: DNS lookups: dig {lookups:?}, flowtel through Prometheus {counted:?}");
    assert_eq!(counted, lookups, "{TEST}: {by_rcode} against what dig got");

    let concrete: [(&str, &str); 3] = [
        ("$cluster", CLUSTER),
        ("$namespace", "shop"),
        ("$workload", "checkout"),
    ];
    let promql: Vec<&Query> = queries
        .iter()
        .filter(|q| matches!(q.lang, Lang::PromQl | Lang::Variable))
        .collect();
    let deadline = Instant::now() + QUERY_DEADLINE;
    let prom = &prom;
    let results = loop {
        std::thread::sleep(Duration::from_secs(2));
        let results: Vec<(&Query, &str, Result<String, String>)> = promql
            .iter()
            .flat_map(|q| {
                [("selected", &concrete[..]), ("All", &VARS_ALL[..])]
                    .into_iter()
                    .map(move |(which, vars)| (*q, which, run_query(prom, q, vars)))
            })
            .collect();
        if results.iter().all(|(_, _, r)| r.is_ok()) || Instant::now() >= deadline {
            break results;
        }
    };
    // One line per query only with FLOWTEL_TEST_VERBOSE: a failure's
    // message must stay within what a CI log's tail shows.
    let verbose = std::env::var_os("FLOWTEL_TEST_VERBOSE").is_some();
    for (q, which, r) in results.iter().filter(|(_, _, r)| verbose || r.is_err()) {
        println!(
            "{TEST}: {} / {} [{which}]: {}",
            q.dashboard,
            q.panel,
            match r {
                Ok(s) => format!("ok, {s}"),
                Err(e) => format!("FAILED: {e}"),
            }
        );
    }
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(q, which, r)| {
            r.as_ref().err().map(|e| {
                format!(
                    "{} / {} [{which}]: {e}\n    {}",
                    q.dashboard, q.panel, q.expr
                )
            })
        })
        .collect();
    println!(
        "{TEST}: {} PromQL queries ({} panel queries, {} template variables) x 2 variable settings: {} ran with data",
        promql.len(),
        promql.iter().filter(|q| q.lang == Lang::PromQl).count(),
        promql.iter().filter(|q| q.lang == Lang::Variable).count(),
        results.len() - failed.len()
    );
    let exact_runs = results
        .iter()
        .filter(|(q, _, r)| {
            r.is_ok()
                && EXACT
                    .iter()
                    .any(|(d, p, id, _)| *d == q.dashboard && *p == q.panel && *id == q.ref_id)
        })
        .count();
    println!(
        "{TEST}: {exact_runs} of those runs ({} queries x 2) returned exactly the value the mesh fixtures make",
        EXACT.len()
    );

    // LogQL: every label must be a name Loki would give a field of the
    // records flowtel sent (attributes and resource, `.` → `_`).
    // The records of the last round may still be on their way: wait until
    // every label the LogQL queries use is on some record, or the deadline.
    let logql: Vec<&Query> = queries.iter().filter(|q| q.lang == Lang::LogQl).collect();
    let wanted: BTreeSet<String> = logql
        .iter()
        .flat_map(|q| logql_labels(&substitute(&q.expr, &VARS_ALL)).expect("LogQL labels"))
        .collect();
    let fields_of = |records: &[common::otlp_receiver::LogEvent]| -> BTreeSet<String> {
        records
            .iter()
            .flat_map(|r| r.attrs.keys().chain(r.resource.keys()))
            .map(|k| sanitize(k, false))
            .collect()
    };
    let mut records = Vec::new();
    common::wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        records = receiver.log_events();
        wanted.is_subset(&fields_of(&records))
    });
    let fields = fields_of(&records);
    let mut kinds = BTreeMap::new();
    for r in &records {
        *kinds.entry(r.event_name.clone()).or_insert(0u32) += 1;
    }
    println!("{TEST}: {} log records: {kinds:?}", records.len());
    // One flowtel.dns.failed record per NXDOMAIN and timeout dig saw.
    let failed_lookups = |records: &[common::otlp_receiver::LogEvent]| {
        let mut by_rcode: BTreeMap<String, u64> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r.event_name == "flowtel.dns.failed")
        {
            *by_rcode
                .entry(r.str("flowtel.dns.rcode").unwrap_or_default().to_string())
                .or_default() += 1;
        }
        by_rcode
    };
    let mut want_failed = lookups.clone();
    want_failed.remove("NOERROR");
    common::wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        failed_lookups(&receiver.log_events()) == want_failed
    });
    let got_failed = failed_lookups(&receiver.log_events());
    println!("{TEST}: flowtel.dns.failed records by rcode {got_failed:?}, dig {want_failed:?}");
    assert_eq!(
        got_failed, want_failed,
        "{TEST}: flowtel.dns.failed records"
    );
    let mut logql_missing = Vec::new();
    for q in &logql {
        let labels = logql_labels(&substitute(&q.expr, &VARS_ALL)).expect("LogQL labels");
        let missing: Vec<&String> = labels.iter().filter(|l| !fields.contains(*l)).collect();
        println!(
            "{TEST}: {} / {} (LogQL): labels {labels:?}: {}",
            q.dashboard,
            q.panel,
            if missing.is_empty() {
                "all on the records".to_string()
            } else {
                format!("MISSING {missing:?}")
            }
        );
        if !missing.is_empty() {
            logql_missing.push(format!("{} / {}: {missing:?}", q.dashboard, q.panel));
        }
    }
    // TraceQL: each query finds spans among those flowtel sent, with one
    // workload selected and with All.
    let traceql: Vec<&Query> = queries.iter().filter(|q| q.lang == Lang::TraceQl).collect();
    let runs =
        |spans: &[common::otlp_receiver::ReceivedSpan]| -> Vec<(String, Result<usize, String>)> {
            traceql
                .iter()
                .flat_map(|q| {
                    [("selected", &concrete), ("All", &VARS_ALL)].map(|(which, vars)| {
                        (
                            format!("{} / {} [{which}]", q.dashboard, q.panel),
                            traceql_run(&substitute(&q.expr, vars), spans),
                        )
                    })
                })
                .collect()
        };
    // Two rounds, each with a reset, two refused and an unanswered connect.
    let failed_connections = ("flowtel-connections / Failed connections", 2 * (1 + 2 + 1));
    let found = |r: &Result<usize, String>| r.as_ref().is_ok_and(|n| *n > 0);
    let mut spans = Vec::new();
    common::wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        spans = receiver.spans();
        runs(&spans).iter().all(|(_, r)| found(r))
    });
    let traceql_runs = runs(&spans);
    for (what, r) in &traceql_runs {
        println!("{TEST}: {what} (TraceQL): {r:?} of {} spans", spans.len());
    }
    let traceql_failed: Vec<&(String, Result<usize, String>)> = traceql_runs
        .iter()
        .filter(|(what, r)| {
            !found(r)
                || (what.starts_with(failed_connections.0)
                    && r.as_ref().ok() != Some(&failed_connections.1))
        })
        .collect();
    assert!(
        traceql_failed.is_empty(),
        "{TEST}: TraceQL queries found no span: {traceql_failed:?}"
    );
    assert!(
        failed.is_empty(),
        "{TEST}: {} queries returned no data:\n  {}\nPrometheus targets: {}",
        failed.len(),
        failed.join("\n  "),
        prom.targets()
    );
    assert!(
        logql_missing.is_empty(),
        "{TEST}: LogQL labels not on flowtel's records: {logql_missing:?}"
    );
    assert!(
        flowtel.exit_status().is_none(),
        "flowtel exited:\n{}",
        flowtel.output()
    );
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly: {status:?}\n{}",
        flowtel.output()
    );
    rt.block_on(api.stop());
    println!("{TEST}: passed in {:?}", t0.elapsed());
}
