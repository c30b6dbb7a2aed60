//! A [`HubbleReport`] as metric families (names and attributes in
//! docs/telemetry.md, "Cilium Hubble"): counters of flows and L7 records
//! within the series budget, the latency histogram, and the stream's own
//! health.

use super::report::HubbleReport;
use crate::flow::mesh::{Family, HistogramValue, Point, PointValue};
use crate::telemetry::catalogue::{self, Metric};

fn family(metric: &'static Metric, points: Vec<Point>) -> Family {
    Family { metric, points }
}

fn int(labels: Vec<(String, String)>, n: u64) -> Point {
    Point::new(labels, PointValue::Int(n))
}

/// The overflow series of a counter, when anything went there.
fn overflow_count(n: u64) -> Option<Point> {
    (n > 0).then(|| Point {
        labels: Vec::new(),
        overflow: true,
        value: PointValue::Int(n),
    })
}

fn overflow_histogram(h: &HistogramValue) -> Point {
    Point {
        labels: Vec::new(),
        overflow: true,
        value: PointValue::Histogram(h.clone()),
    }
}

fn labelled<'a, K: 'a + ToString>(
    key: &str,
    counts: impl IntoIterator<Item = (&'a K, &'a u64)>,
) -> Vec<Point> {
    counts
        .into_iter()
        .map(|(k, n)| int(vec![(key.to_owned(), k.to_string())], *n))
        .collect()
}

/// Every Hubble metric of `r`.
pub fn families(r: &HubbleReport) -> Vec<Family> {
    let flows = r
        .flows
        .iter()
        .map(|s| int(s.key.attributes(), s.count))
        .chain(overflow_count(r.flows_overflow))
        .collect();
    let l7 = r
        .l7_requests
        .iter()
        .map(|s| int(s.key.attributes(), s.count))
        .chain(overflow_count(r.l7_requests_overflow))
        .collect();
    let durations = r
        .l7_duration
        .iter()
        .map(|s| {
            Point::new(
                s.key.attributes(),
                PointValue::Histogram(s.histogram.clone()),
            )
        })
        .chain(r.l7_duration_overflow.as_ref().map(overflow_histogram))
        .collect();
    let st = &r.stream;
    vec![
        family(&catalogue::HUBBLE_FLOWS, flows),
        family(&catalogue::HUBBLE_L7_REQUESTS, l7),
        family(&catalogue::HUBBLE_L7_DURATION, durations),
        family(
            &catalogue::HUBBLE_LOST_EVENTS,
            labelled(catalogue::HUBBLE_LOST_EVENTS_SOURCE, &st.lost_events),
        ),
        family(
            &catalogue::HUBBLE_STREAM_ERRORS,
            labelled(catalogue::ERROR_TYPE, &st.errors),
        ),
        family(
            &catalogue::HUBBLE_STREAM_CONNECTED,
            vec![int(Vec::new(), u64::from(st.connected))],
        ),
        family(
            &catalogue::HUBBLE_STREAM_RECONNECTS,
            vec![int(Vec::new(), st.reconnects)],
        ),
        family(
            &catalogue::HUBBLE_FLOWS_DUPLICATES,
            vec![int(Vec::new(), st.duplicates)],
        ),
        family(
            &catalogue::HUBBLE_FLOWS_MALFORMED,
            labelled(catalogue::ERROR_TYPE, &st.malformed),
        ),
        family(
            &catalogue::HUBBLE_RECORDS_DROPPED,
            vec![int(Vec::new(), r.records_dropped)],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::hubble::{StreamStats, LATENCY_BOUNDS};

    fn get<'a>(families: &'a [Family], name: &str) -> &'a Family {
        families
            .iter()
            .find(|f| f.metric.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    #[test]
    fn overflow_and_stream_counters_are_reported() {
        let mut counts = vec![0; LATENCY_BOUNDS.len() + 1];
        counts[2] = 4;
        let report = HubbleReport {
            flows_overflow: 3,
            l7_duration_overflow: Some(HistogramValue {
                bounds: LATENCY_BOUNDS.to_vec(),
                counts,
                sum: 0.08,
                count: 4,
            }),
            stream: StreamStats {
                lost_events: [("PERF_EVENT_RING_BUFFER".to_owned(), 9)].into(),
                errors: [("stream", 2)].into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let families = families(&report);
        let flows = get(&families, "flowtel.hubble.flows");
        assert_eq!(flows.points.len(), 1);
        assert!(flows.points[0].overflow);
        assert_eq!(flows.points[0].value, PointValue::Int(3));
        // No L7 request at all: no point (the exporters leave it out).
        assert!(get(&families, "flowtel.hubble.l7.requests")
            .points
            .is_empty());
        let duration = get(&families, "flowtel.hubble.l7.duration");
        let PointValue::Histogram(h) = &duration.points[0].value else {
            panic!("duration is not a histogram");
        };
        assert_eq!((h.count, h.sum, h.counts[2]), (4, 0.08, 4));
        assert!(duration.points[0].overflow);
        let lost = get(&families, "flowtel.hubble.lost_events");
        assert_eq!(lost.points[0].value, PointValue::Int(9));
        assert_eq!(
            lost.points[0].labels,
            vec![(
                "flowtel.hubble.lost_events.source".to_owned(),
                "PERF_EVENT_RING_BUFFER".to_owned()
            )]
        );
        let errors = get(&families, "flowtel.hubble.stream.errors");
        assert_eq!(errors.points[0].value, PointValue::Int(2));
    }
}
