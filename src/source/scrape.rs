//! Scraping Prometheus endpoints (Envoy sidecars, ztunnel, Calico Felix) and
//! turning the families flowtel keeps into a small model an OTLP exporter
//! can use directly.
//!
//! The parser is our own: the published crates either drop or mis-split
//! lines with escaped label values (`response_flags="UF,URX"`), reject
//! ztunnel's OpenMetrics output (`# TYPE x counter` over `x_total`, `{}`),
//! or are LGPL and an order of magnitude slower. It reads both the
//! Prometheus text format 0.0.4 and OpenMetrics 1.0, validates every line,
//! but allocates only for the families asked for.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{offer_state, Source};
use crate::flow::mesh::MeshUpdate;
use crate::flow::SourceEvent;

use crate::component::{positive, ConfigError};
use crate::flow::mesh::{Family, HistogramValue, Point, PointValue};
use crate::telemetry::catalogue::{self, Instrument, Metric};

/// Largest response accepted; Envoy's full stats on a busy sidecar stay
/// well under this.
pub const DEFAULT_MAX_BYTES: usize = 16 << 20;

/// Time allowed for a whole scrape, connection to last byte.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most series of the kept families one scrape of one target may produce.
/// A busy sidecar has a few hundred per family (one per peer workload and
/// response code); ztunnel, reporting for the whole node, a few thousand.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

/// Caps on one scrape: a misbehaving endpoint costs at most this much memory
/// and time, whatever it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrapeLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
    /// The series budget of one scrape: series of the kept families past it
    /// are not kept, and counted ([`Parsed::series_shed`]).
    pub max_series: usize,
}

impl Default for ScrapeLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            timeout: DEFAULT_TIMEOUT,
            max_series: DEFAULT_MAX_SERIES,
        }
    }
}

/// A parsed scrape within the series budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The kept families, in the order asked for.
    pub families: Vec<Family>,
    /// Series of the kept families past the budget, not kept (each
    /// counted once per scrape; a histogram series is one series).
    pub series_shed: u64,
}

/// Why a scrape produced nothing. Each is counted by [`ScrapeError::kind`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScrapeError {
    #[error("could not build the HTTP client: {0}")]
    Client(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("unexpected content type {0:?}")]
    ContentType(String),
    #[error("response larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    #[error("response truncated: {0}")]
    Truncated(String),
    #[error("response is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: &'static str },
}

impl ScrapeError {
    /// A short stable name, for counting errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Client(_) => "client",
            Self::Request(_) => "request",
            Self::Status(_) => "status",
            Self::ContentType(_) => "content_type",
            Self::TooLarge { .. } => "too_large",
            Self::Timeout(_) => "timeout",
            Self::Truncated(_) => "truncated",
            Self::NotUtf8 { .. } => "not_utf8",
            Self::Parse { .. } => "parse",
        }
    }
}

/// Counts scrape errors between two log lines, so that a target failing on
/// every scrape is logged once per interval rather than once per scrape.
#[derive(Debug, Default)]
pub struct ScrapeErrorTally {
    by_kind: Vec<(&'static str, u64, String)>,
}

impl ScrapeErrorTally {
    /// Counts one error, keeping the first message of its kind.
    pub fn record(&mut self, error: &ScrapeError) {
        let kind = error.kind();
        match self.by_kind.iter_mut().find(|(k, _, _)| *k == kind) {
            Some((_, count, _)) => *count += 1,
            None => self.by_kind.push((kind, 1, error.to_string())),
        }
    }

    /// The counts since the last call, as (kind, count, first message), and
    /// a fresh start.
    pub fn take(&mut self) -> Vec<(&'static str, u64, String)> {
        std::mem::take(&mut self.by_kind)
    }
}

/// What kind of endpoint a scrape target is; the `flowtel.scrape.target`
/// attribute of `flowtel.scrape.errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    IstioSidecar,
    Ztunnel,
    Felix,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IstioSidecar => "istio_sidecar",
            Self::Ztunnel => "ztunnel",
            Self::Felix => "felix",
        }
    }
}

/// Scrapes that succeeded and failed since start, by target kind (and
/// error kind), and what was last logged of the failures.
#[derive(Debug, Default)]
pub struct ScrapeCounts {
    errors: BTreeMap<(TargetKind, &'static str), u64>,
    successes: BTreeMap<TargetKind, u64>,
    series_shed: BTreeMap<TargetKind, u64>,
    tally: ScrapeErrorTally,
    /// Series shed since the last [`ScrapeCounts::log_round`], and by how
    /// many scrapes.
    round_shed: (u64, u64),
}

impl ScrapeCounts {
    pub fn success(&mut self, kind: TargetKind) {
        *self.successes.entry(kind).or_default() += 1;
    }

    /// `n` series of one scrape past the series budget.
    pub fn shed(&mut self, kind: TargetKind, n: u64) {
        if n > 0 {
            *self.series_shed.entry(kind).or_default() += n;
            self.round_shed.0 += n;
            self.round_shed.1 += 1;
        }
    }

    /// A successful scrape, its series shed counted.
    pub fn scraped(&mut self, kind: TargetKind, parsed: &Parsed) {
        self.success(kind);
        self.shed(kind, parsed.series_shed);
    }

    pub fn failure(&mut self, kind: TargetKind, error: &ScrapeError) {
        *self.errors.entry((kind, error.kind())).or_default() += 1;
        self.tally.record(error);
    }

    /// Logs the failures since the last call: one line per error kind,
    /// with the count and the first message.
    pub fn log_round(&mut self, kind: TargetKind) {
        let (shed, scrapes) = std::mem::take(&mut self.round_shed);
        if shed > 0 {
            tracing::warn!(
                target_kind = kind.as_str(),
                series = shed,
                scrapes,
                "scrapes produced more series than max_series this round; those past it were not kept (flowtel.scrape.series.shed)"
            );
        }
        for (error, count, first) in self.tally.take() {
            tracing::warn!(
                target_kind = kind.as_str(),
                error = error,
                count,
                "scrapes failed this round; first: {first}"
            );
        }
    }

    /// `flowtel.scrape.errors`, `flowtel.scrape.successes` and
    /// `flowtel.scrape.series.shed`.
    pub fn families(&self) -> Vec<Family> {
        let target = |kind: TargetKind| {
            (
                catalogue::SCRAPE_TARGET.to_owned(),
                kind.as_str().to_owned(),
            )
        };
        vec![
            Family {
                metric: &catalogue::SCRAPE_ERRORS,
                points: self
                    .errors
                    .iter()
                    .map(|((kind, error), n)| {
                        Point::new(
                            vec![
                                target(*kind),
                                (catalogue::ERROR_TYPE.to_owned(), (*error).to_owned()),
                            ],
                            PointValue::Int(*n),
                        )
                    })
                    .collect(),
            },
            Family {
                metric: &catalogue::SCRAPE_SUCCESSES,
                points: self
                    .successes
                    .iter()
                    .map(|(kind, n)| Point::new(vec![target(*kind)], PointValue::Int(*n)))
                    .collect(),
            },
            Family {
                metric: &catalogue::SCRAPE_SERIES_SHED,
                points: self
                    .series_shed
                    .iter()
                    .map(|(kind, n)| Point::new(vec![target(*kind)], PointValue::Int(*n)))
                    .collect(),
            },
        ]
    }
}

/// What a scraped source keeps between rounds, and sends each interval.
pub trait ScrapeState: Default + Send + 'static {
    /// The state as the source's update.
    fn update(&self) -> MeshUpdate;
}

/// A scraped source (Istio, Felix): its task scrapes into `state` on its
/// own schedule; each interval the latest state goes into the pipeline.
pub struct Scraped<S> {
    name: &'static str,
    state: Arc<Mutex<S>>,
    task: tokio::task::JoinHandle<()>,
    events: mpsc::Sender<SourceEvent>,
}

impl<S: ScrapeState> Scraped<S> {
    /// Spawns `run` with the shared state.
    pub fn spawn<F>(
        name: &'static str,
        events: mpsc::Sender<SourceEvent>,
        run: impl FnOnce(Arc<Mutex<S>>) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let state = Arc::new(Mutex::new(S::default()));
        let task = tokio::spawn(run(Arc::clone(&state)));
        Self {
            name,
            state,
            task,
            events,
        }
    }
}

impl<S: ScrapeState> Source for Scraped<S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn request(&mut self, _epoch: u64) -> bool {
        let update = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update();
        offer_state(&self.events, SourceEvent::Mesh(Box::new(update)))
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.task.abort();
        Box::pin(async {})
    }
}

/// Checks the settings every scraped source has; errors name the key.
pub fn check_settings(interval: Duration, limits: &ScrapeLimits) -> Result<(), ConfigError> {
    let ScrapeLimits {
        max_bytes,
        timeout,
        max_series,
    } = *limits;
    positive("interval", interval, "15s")?;
    if max_bytes < 4096 {
        return Err(ConfigError::new("max_bytes", "must be at least 4096"));
    }
    if max_series == 0 {
        return Err(ConfigError::new(
            "max_series",
            format!("must be at least 1, e.g. {DEFAULT_MAX_SERIES}"),
        ));
    }
    if timeout.is_zero() || timeout > interval {
        return Err(ConfigError::new(
            "timeout",
            "must be greater than 0 and at most the interval",
        ));
    }
    Ok(())
}

/// The exposition format, from the response's content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4` (Envoy, Go clients such as Felix).
    Text,
    /// `application/openmetrics-text` (ztunnel): must end with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format a `Content-Type` header announces.
    pub fn from_content_type(content_type: &str) -> Result<Self, ScrapeError> {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "text/plain" => Ok(Self::Text),
            "application/openmetrics-text" => Ok(Self::OpenMetrics),
            _ => Err(ScrapeError::ContentType(content_type.to_owned())),
        }
    }
}

/// A family to keep, and the catalogue metric it is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilySpec {
    /// The Prometheus family name without `_total` (`istio_requests`); both
    /// `x` and `x_total` samples are accepted for counters, because Go and
    /// Envoy clients write one and OpenMetrics the other.
    pub source: &'static str,
    /// Its OTel name, unit, kind and description, chosen so that the
    /// standard OTLP→Prometheus translation (unit suffix, `_total`) gives
    /// back the source name where it can.
    pub metric: &'static Metric,
}

/// A scrape's body, checked for size, time, type and encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    pub text: String,
    pub format: Format,
}

/// An HTTP client for scrapes; cheap to clone and share between targets.
#[derive(Debug, Clone)]
pub struct Scraper {
    client: reqwest::Client,
    limits: ScrapeLimits,
}

const ACCEPT: &str =
    "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5";

impl Scraper {
    pub fn new(limits: ScrapeLimits) -> Result<Self, ScrapeError> {
        // reqwest is built without a crypto provider of its own; scrapes are
        // plain HTTP, but the builder still wants one installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(limits.timeout)
            .timeout(limits.timeout)
            // Pod and node addresses must never go through a proxy set for
            // the exporter's egress.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ScrapeError::Client(e.to_string()))?;
        Ok(Self { client, limits })
    }

    pub fn limits(&self) -> ScrapeLimits {
        self.limits
    }

    /// GETs `url` within the limits: the whole exchange is cut at
    /// `timeout` (a server trickling bytes cannot hold it), and reading
    /// stops as soon as the body passes `max_bytes`.
    pub async fn fetch(&self, url: &str) -> Result<Body, ScrapeError> {
        let timeout = self.limits.timeout;
        match tokio::time::timeout(timeout, self.fetch_unbounded(url)).await {
            Ok(result) => result,
            Err(_) => Err(ScrapeError::Timeout(timeout)),
        }
    }

    async fn fetch_unbounded(&self, url: &str) -> Result<Body, ScrapeError> {
        let timeout = self.limits.timeout;
        let request_error = |e: reqwest::Error| {
            if e.is_timeout() {
                ScrapeError::Timeout(timeout)
            } else {
                ScrapeError::Request(error_chain(&e))
            }
        };
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, ACCEPT)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(ScrapeError::Status(status.as_u16()));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let format = Format::from_content_type(&content_type)?;
        let limit = self.limits.max_bytes;
        let declared = response.content_length();
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ScrapeError::TooLarge { limit });
        }
        let capacity = declared.map_or(64 << 10, |n| n as usize);
        let mut buf = Vec::with_capacity(capacity.min(limit));
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > limit {
                        return Err(ScrapeError::TooLarge { limit });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(ScrapeError::Timeout(timeout)),
                Err(e) => return Err(ScrapeError::Truncated(error_chain(&e))),
            }
        }
        let text = String::from_utf8(buf).map_err(|e| ScrapeError::NotUtf8 {
            offset: e.utf8_error().valid_up_to(),
        })?;
        Ok(Body { text, format })
    }

    /// Fetches and parses, keeping the families in `specs`, at most
    /// `max_series` series of them.
    pub async fn scrape(&self, url: &str, specs: &[FamilySpec]) -> Result<Parsed, ScrapeError> {
        let body = self.fetch(url).await?;
        parse_within(&body.text, body.format, specs, self.limits.max_series)
    }
}

/// reqwest's top-level message hides the cause ("error sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Which part of a family a sample line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Value,
    Bucket,
    Sum,
    Count,
}

fn resolve(name: &str, specs: &[FamilySpec]) -> Option<(usize, Part)> {
    specs.iter().enumerate().find_map(|(i, spec)| {
        let rest = name.strip_prefix(spec.source)?;
        let part = match (spec.metric.instrument, rest) {
            (Instrument::Counter, "" | "_total") | (Instrument::Gauge, "") => Part::Value,
            (Instrument::Histogram, "_bucket") => Part::Bucket,
            (Instrument::Histogram, "_sum") => Part::Sum,
            (Instrument::Histogram, "_count") => Part::Count,
            _ => return None,
        };
        Some((i, part))
    })
}

/// One histogram series while its lines are read.
#[derive(Debug)]
struct HistogramSeries {
    labels: Vec<(String, String)>,
    /// (upper bound, cumulative count).
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: Option<f64>,
}

#[derive(Debug, Default)]
struct FamilyBuilder {
    points: Vec<Point>,
    histograms: Vec<HistogramSeries>,
    index: HashMap<Vec<(String, String)>, usize>,
}

impl FamilyBuilder {
    /// The series with these labels: usually the one just read, since a
    /// histogram's lines come together.
    fn find(&self, labels: &[(String, String)]) -> Option<usize> {
        let last = self.histograms.len().checked_sub(1);
        match last.filter(|&i| self.histograms[i].labels == labels) {
            Some(i) => Some(i),
            None => self.index.get(labels).copied(),
        }
    }

    /// The series with these labels, made if new and the budget allows
    /// (`None`: shed).
    fn histogram(
        &mut self,
        labels: Vec<(String, String)>,
        budget: &mut Budget,
        family: usize,
    ) -> Option<&mut HistogramSeries> {
        let i = match self.find(&labels) {
            Some(i) => i,
            None => {
                if !budget.take() {
                    budget.shed_histogram(family, &labels);
                    return None;
                }
                let i = self.histograms.len();
                self.index.insert(labels.clone(), i);
                self.histograms.push(HistogramSeries {
                    labels,
                    buckets: Vec::new(),
                    sum: 0.0,
                    count: None,
                });
                i
            }
        };
        Some(&mut self.histograms[i])
    }

    fn finish(mut self) -> Vec<Point> {
        for series in self.histograms {
            self.points.push(Point::new(
                series.labels,
                PointValue::Histogram(to_otel_histogram(series.buckets, series.sum, series.count)),
            ));
        }
        self.points
    }
}

fn to_otel_histogram(mut buckets: Vec<(f64, f64)>, sum: f64, count: Option<f64>) -> HistogramValue {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = count
        .or_else(|| buckets.last().map(|b| b.1))
        .map_or(0, to_count);
    let mut bounds = Vec::with_capacity(buckets.len());
    let mut counts = Vec::with_capacity(buckets.len() + 1);
    let mut below = 0u64;
    for (bound, cumulative) in buckets {
        if bound == f64::INFINITY {
            break;
        }
        let cumulative = to_count(cumulative).max(below);
        bounds.push(bound);
        counts.push(cumulative - below);
        below = cumulative;
    }
    counts.push(total.saturating_sub(below));
    HistogramValue {
        bounds,
        counts,
        sum,
        count: total.max(below),
    }
}

/// Observation counts are written as floats; a negative or NaN one is
/// nonsense and counts as zero.
fn to_count(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.round() as u64
    } else {
        0
    }
}

/// The series budget of one parse.
#[derive(Debug)]
struct Budget {
    left: usize,
    shed: u64,
    /// The histogram series shed (by family and a hash of their labels),
    /// so that each is counted once however its lines are spread: 16 bytes
    /// each, not their labels.
    shed_histograms: std::collections::HashSet<(usize, u64)>,
}

impl Budget {
    fn new(max_series: usize) -> Self {
        Self {
            left: max_series,
            shed: 0,
            shed_histograms: Default::default(),
        }
    }

    fn full(&self) -> bool {
        self.left == 0
    }

    /// Room for one more series: taken if there is.
    fn take(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }

    fn shed_histogram(&mut self, family: usize, labels: &[(String, String)]) {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(labels);
        if self.shed_histograms.insert((family, hash)) {
            self.shed += 1;
        }
    }
}

/// Parses a whole exposition, keeping the families in `specs` in that
/// order (families with no series are left out), with no series budget.
/// Every sample line is checked, kept or not, so a garbled response is an
/// error rather than a silently partial result.
pub fn parse(text: &str, format: Format, specs: &[FamilySpec]) -> Result<Vec<Family>, ScrapeError> {
    parse_within(text, format, specs, usize::MAX).map(|p| p.families)
}

/// [`parse`] keeping at most `max_series` series of the kept families: the
/// first ones in the exposition's order (a target writes its series in a
/// stable order, so the same ones are kept scrape after scrape), each
/// sample of a counter or gauge and each histogram (all its lines) being
/// one series. Those past the budget are counted in
/// [`Parsed::series_shed`]; their lines are still checked, but their
/// labels are not kept.
pub fn parse_within(
    text: &str,
    format: Format,
    specs: &[FamilySpec],
    max_series: usize,
) -> Result<Parsed, ScrapeError> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(ScrapeError::Truncated(
            "the last line has no newline".into(),
        ));
    }
    let mut builders: Vec<Option<FamilyBuilder>> = specs.iter().map(|_| None).collect();
    let mut budget = Budget::new(max_series);
    let mut eof = false;
    for (i, line) in text.split_terminator('\n').enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line).trim_start();
        if line.is_empty() {
            continue;
        }
        if eof {
            return Err(ScrapeError::Parse {
                line: line_no,
                reason: "content after # EOF",
            });
        }
        if line.starts_with('#') {
            eof = line == "# EOF";
            continue;
        }
        parse_sample(line, line_no, specs, &mut builders, &mut budget)?;
    }
    if format == Format::OpenMetrics && !eof {
        return Err(ScrapeError::Truncated("no # EOF".into()));
    }
    let families = specs
        .iter()
        .zip(builders)
        .filter_map(|(spec, builder)| {
            let points = builder?.finish();
            (!points.is_empty()).then_some(Family {
                metric: spec.metric,
                points,
            })
        })
        .collect();
    Ok(Parsed {
        families,
        series_shed: budget.shed,
    })
}

fn parse_sample(
    line: &str,
    line_no: usize,
    specs: &[FamilySpec],
    builders: &mut [Option<FamilyBuilder>],
    budget: &mut Budget,
) -> Result<(), ScrapeError> {
    let err = |reason| ScrapeError::Parse {
        line: line_no,
        reason,
    };
    let name_end = line
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(err("no metric name"));
    }
    let mut target = resolve(name, specs);
    // A counter or gauge sample past the budget: checked, not kept, and
    // its labels not even copied.
    let shed_value = matches!(target, Some((_, Part::Value))) && budget.full();
    if shed_value {
        target = None;
    }
    let mut labels = Vec::new();
    let mut le = None;
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        rest = scan_labels(after, |key, raw| {
            let Some((_, part)) = target else { return };
            let value = unescape(raw);
            if part == Part::Bucket && key == "le" {
                le = Some(value);
            } else {
                labels.push((key.to_owned(), value));
            }
        })
        .ok_or_else(|| err("malformed labels"))?;
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .and_then(parse_float)
        .ok_or_else(|| err("no valid value"))?;
    match fields.next() {
        None => {}
        Some("#") => {}
        Some(timestamp) => {
            parse_float(timestamp).ok_or_else(|| err("invalid timestamp"))?;
            if fields.next().is_some_and(|f| f != "#") {
                return Err(err("unexpected text after the timestamp"));
            }
        }
    }
    if shed_value {
        budget.shed += 1;
        return Ok(());
    }
    let Some((family, part)) = target else {
        return Ok(());
    };
    let builder = builders[family].get_or_insert_with(FamilyBuilder::default);
    match part {
        Part::Value => {
            // Not full (checked above), so there is room.
            budget.take();
            builder
                .points
                .push(Point::new(labels, PointValue::Number(value)));
        }
        Part::Bucket => {
            let bound = le
                .as_deref()
                .and_then(parse_float)
                .ok_or_else(|| err("a bucket without a valid le label"))?;
            if let Some(series) = builder.histogram(labels, budget, family) {
                series.buckets.push((bound, value));
            }
        }
        Part::Sum => {
            if let Some(series) = builder.histogram(labels, budget, family) {
                series.sum = value;
            }
        }
        Part::Count => {
            if let Some(series) = builder.histogram(labels, budget, family) {
                series.count = Some(value);
            }
        }
    }
    Ok(())
}

/// Reads `name="value",...}` and returns what follows the `}`; `f` gets
/// each name and raw (still escaped) value. `None` when malformed.
fn scan_labels<'a>(mut s: &'a str, mut f: impl FnMut(&'a str, &'a str)) -> Option<&'a str> {
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some(rest);
        }
        let key_end = s
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_'))?;
        if key_end == 0 {
            return None;
        }
        let key = &s[..key_end];
        let after_eq = s[key_end..]
            .trim_start_matches([' ', '\t'])
            .strip_prefix('=')?;
        let quoted = after_eq.trim_start_matches([' ', '\t']).strip_prefix('"')?;
        let bytes = quoted.as_bytes();
        let mut i = 0;
        loop {
            match bytes.get(i)? {
                b'\\' => i += 2,
                b'"' => break,
                b'\n' => return None,
                _ => i += 1,
            }
        }
        f(key, &quoted[..i]);
        s = quoted[i + 1..].trim_start_matches([' ', '\t']);
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

/// Undoes the format's three escapes (`\\`, `\"`, `\n`); any other
/// backslash is kept as written.
fn unescape(raw: &str) -> String {
    if !raw.contains('\\') {
        return raw.to_owned();
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(c @ ('\\' | '"')) => out.push(c),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Go's float syntax as Prometheus writes it (`+Inf`, `-Inf`, `NaN`,
/// exponents), which Rust's parser accepts as is.
fn parse_float(s: &str) -> Option<f64> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[FamilySpec] = &[
        FamilySpec {
            source: "requests",
            metric: &catalogue::ISTIO_REQUESTS,
        },
        FamilySpec {
            source: "latency_ms",
            metric: &catalogue::ISTIO_REQUEST_DURATION,
        },
    ];

    #[test]
    fn go_float_syntax() {
        assert_eq!(parse_float("+Inf"), Some(f64::INFINITY));
        assert_eq!(parse_float("-Inf"), Some(f64::NEG_INFINITY));
        assert!(parse_float("NaN").is_some_and(f64::is_nan));
        assert_eq!(parse_float("1.5e+06"), Some(1.5e6));
        assert_eq!(parse_float("abc"), None);
    }

    #[test]
    fn escaped_label_values_with_separators() {
        let text = "requests_total{a=\"x,y}z\",b=\"q\\\"uote\\\\back\\nline\",} 3 1700000000000\n";
        let families = parse(text, Format::Text, SPECS).expect("parses");
        let labels = &families[0].points[0].labels;
        assert_eq!(labels[0], ("a".into(), "x,y}z".into()));
        assert_eq!(labels[1], ("b".into(), "q\"uote\\back\nline".into()));
        assert_eq!(families[0].points[0].value, PointValue::Number(3.0));
    }

    #[test]
    fn histogram_becomes_per_bucket_counts() {
        let text = "latency_ms_bucket{r=\"a\",le=\"1\"} 2\n\
                    latency_ms_bucket{r=\"a\",le=\"10\"} 5\n\
                    latency_ms_bucket{r=\"a\",le=\"+Inf\"} 6\n\
                    latency_ms_sum{r=\"a\"} 31.5\n\
                    latency_ms_count{r=\"a\"} 6\n";
        let families = parse(text, Format::Text, SPECS).expect("parses");
        let PointValue::Histogram(h) = &families[0].points[0].value else {
            panic!("not a histogram");
        };
        assert_eq!(h.bounds, vec![1.0, 10.0]);
        assert_eq!(h.counts, vec![2, 3, 1]);
        assert_eq!((h.sum, h.count), (31.5, 6));
    }

    #[test]
    fn series_past_the_budget_are_shed_and_counted_once() {
        // 3 counter samples, then 2 histogram series of 3 lines each and
        // their sums and counts, then 2 more counter samples, and a line
        // of another family (never a series).
        let mut text = String::from(
            "requests_total{r=\"a\"} 1\nrequests_total{r=\"b\"} 2\nrequests_total{r=\"c\"} 3\n",
        );
        for r in ["h1", "h2"] {
            for (le, n) in [("1", 1), ("10", 2), ("+Inf", 3)] {
                text.push_str(&format!("latency_ms_bucket{{r=\"{r}\",le=\"{le}\"}} {n}\n"));
            }
            text.push_str(&format!(
                "latency_ms_sum{{r=\"{r}\"}} 4.5\nlatency_ms_count{{r=\"{r}\"}} 3\n"
            ));
        }
        text.push_str("requests_total{r=\"d\"} 4\nrequests_total{r=\"e\"} 5\nother{x=\"y\"} 1\n");
        let all = parse_within(&text, Format::Text, SPECS, usize::MAX).expect("parses");
        assert_eq!(all.series_shed, 0);
        assert_eq!(all.families[0].points.len(), 5);
        assert_eq!(all.families[1].points.len(), 2);
        for (budget, requests, histograms, shed) in [
            (7, 5, 2, 0),
            (6, 4, 2, 1),
            (5, 3, 2, 2),
            (4, 3, 1, 3),
            (3, 3, 0, 4),
            (1, 1, 0, 6),
        ] {
            let p = parse_within(&text, Format::Text, SPECS, budget).expect("parses");
            let len = |name: &str| {
                p.families
                    .iter()
                    .find(|f| f.metric.name == name)
                    .map_or(0, |f| f.points.len())
            };
            assert_eq!(
                (
                    len("istio.requests"),
                    len("istio.request.duration"),
                    p.series_shed
                ),
                (requests, histograms, shed),
                "budget {budget}"
            );
        }
        // The kept ones are the first in the body, whole.
        let p = parse_within(&text, Format::Text, SPECS, 4).expect("parses");
        let PointValue::Histogram(h) = &p.families[1].points[0].value else {
            panic!("not a histogram");
        };
        assert_eq!(
            p.families[1].points[0].labels,
            vec![("r".into(), "h1".into())]
        );
        assert_eq!((h.counts.clone(), h.count), (vec![1, 1, 1], 3));
        // Lines past the budget are still checked.
        let bad = format!("{text}requests_total{{r=\"f\" 1\n");
        assert!(matches!(
            parse_within(&bad, Format::Text, SPECS, 1),
            Err(ScrapeError::Parse { .. })
        ));
    }

    #[test]
    fn shed_series_are_counted_by_target_kind() {
        let mut counts = ScrapeCounts::default();
        let parsed = |shed| Parsed {
            families: Vec::new(),
            series_shed: shed,
        };
        counts.scraped(TargetKind::Ztunnel, &parsed(0));
        counts.scraped(TargetKind::Felix, &parsed(7));
        counts.scraped(TargetKind::Felix, &parsed(5));
        let families = counts.families();
        let shed = families
            .iter()
            .find(|f| f.metric.name == "flowtel.scrape.series.shed")
            .expect("the shed family");
        assert_eq!(
            shed.points,
            vec![Point::new(
                vec![("flowtel.scrape.target".into(), "felix".into())],
                PointValue::Int(12)
            )]
        );
        counts.log_round(TargetKind::Felix);
        assert_eq!(counts.round_shed, (0, 0));
    }

    #[test]
    fn garbage_is_an_error_even_in_skipped_families() {
        for text in [
            "other{a=\"b\" 1\n",
            "other{a=b} 1\n",
            "other 1 2 3\n",
            "other\n",
            "{a=\"b\"} 1\n",
            "# EOF\nrequests 1\n",
        ] {
            let result = parse(text, Format::Text, SPECS);
            assert!(
                matches!(result, Err(ScrapeError::Parse { .. })),
                "{text:?}: {result:?}"
            );
        }
    }

    #[test]
    fn openmetrics_needs_eof() {
        let text = "requests_total 1\n";
        assert!(matches!(
            parse(text, Format::OpenMetrics, SPECS),
            Err(ScrapeError::Truncated(_))
        ));
        assert!(parse(
            "requests_total 1 # {trace_id=\"a\"} 1\n# EOF\n",
            Format::OpenMetrics,
            SPECS
        )
        .is_ok());
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type("text/plain; version=0.0.4; charset=utf-8"),
            Ok(Format::Text)
        );
        assert_eq!(
            Format::from_content_type("application/openmetrics-text;charset=utf-8;version=1.0.0"),
            Ok(Format::OpenMetrics)
        );
        assert!(Format::from_content_type("text/html").is_err());
        assert!(Format::from_content_type("").is_err());
    }

    #[test]
    fn tally_counts_by_kind() {
        let mut tally = ScrapeErrorTally::default();
        tally.record(&ScrapeError::Status(503));
        tally.record(&ScrapeError::Status(500));
        tally.record(&ScrapeError::Timeout(DEFAULT_TIMEOUT));
        let taken = tally.take();
        assert_eq!(taken[0], ("status", 2, "HTTP status 503".into()));
        assert_eq!(taken[1].1, 1);
        assert!(tally.take().is_empty());
    }
}
