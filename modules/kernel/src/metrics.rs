//! A small Prometheus registry passed around by handle (no global recorder, so
//! several applications can run in one test process without mixing figures).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

type Key = (&'static str, String);

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters and histograms, keyed by metric name and rendered labels.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
    histograms: Mutex<BTreeMap<Key, Histogram>>,
}

/// Renders `{a="x",b="y"}` with Prometheus escaping.
fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{k}=\"{v}\"");
    }
    out.push('}');
    out
}

impl Metrics {
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)], by: u64) {
        if by == 0 {
            return;
        }
        if let Ok(mut counters) = self.counters.lock() {
            *counters.entry((name, render_labels(labels))).or_default() += by;
        }
    }

    pub fn observe(&self, name: &'static str, labels: &[(&str, &str)], seconds: f64) {
        if let Ok(mut histograms) = self.histograms.lock() {
            let h = histograms.entry((name, render_labels(labels))).or_default();
            for (bound, count) in BUCKETS.iter().zip(h.counts.iter_mut()) {
                if seconds <= *bound {
                    *count += 1;
                }
            }
            h.count += 1;
            h.sum += seconds;
        }
    }

    /// The value of a counter, for tests and the admin view.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let key = render_labels(labels);
        self.counters
            .lock()
            .map(|c| {
                c.iter()
                    .find(|((n, l), _)| *n == name && *l == key)
                    .map_or(0, |(_, v)| *v)
            })
            .unwrap_or(0)
    }

    /// Appends every counter and histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        if let Ok(counters) = self.counters.lock() {
            let mut last = "";
            for ((name, labels), value) in counters.iter() {
                if *name != last {
                    let _ = writeln!(out, "# TYPE {name} counter");
                    last = name;
                }
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }
        if let Ok(histograms) = self.histograms.lock() {
            let mut last = "";
            for ((name, labels), h) in histograms.iter() {
                if *name != last {
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    last = name;
                }
                let inner = labels.trim_start_matches('{').trim_end_matches('}');
                let sep = if inner.is_empty() { "" } else { "," };
                for (bound, count) in BUCKETS.iter().zip(h.counts.iter()) {
                    let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"{bound}\"}} {count}");
                }
                let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{labels} {}", h.sum);
                let _ = writeln!(out, "{name}_count{labels} {}", h.count);
            }
        }
    }
}

/// Appends one gauge sample.
pub fn gauge(out: &mut String, name: &str, labels: &[(&str, &str)], value: i64) {
    let _ = writeln!(out, "{name}{} {value}", render_labels(labels));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms_in_text_format() {
        let m = Metrics::default();
        m.inc("colony_events_handled_total", &[("consumer", "cart")], 2);
        m.inc("colony_events_handled_total", &[("consumer", "cart")], 1);
        m.observe(
            "colony_http_request_duration_seconds",
            &[("route", "/x")],
            0.002,
        );
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("colony_events_handled_total{consumer=\"cart\"} 3"));
        assert!(
            out.contains(
                "colony_http_request_duration_seconds_bucket{route=\"/x\",le=\"0.0025\"} 1"
            )
        );
        assert!(
            out.contains(
                "colony_http_request_duration_seconds_bucket{route=\"/x\",le=\"0.001\"} 0"
            )
        );
        assert_eq!(
            m.counter("colony_events_handled_total", &[("consumer", "cart")]),
            3
        );
    }
}
