//! Prometheus metrics of an agent, in the text exposition format, at `/metrics` on its API
//! address (behind the API token unless the agent runs with `--metrics-public`).
//!
//! Most figures are counters and sizes the protocol layers, the transport and the runner
//! already keep; they are read when scraped (a [`Snapshot`]). Key-value latencies are
//! measured by the actor as operations end, in a histogram kept here.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of one sample: name and value pairs.
pub type Labels = Vec<(&'static str, String)>;

/// One metric read at scrape time: name, help, and its samples.
pub type Figure<T> = (&'static str, &'static str, Vec<(Labels, T)>);

/// Figures read at scrape time: `(name, help, samples)`; counter names carry no `_total`
/// (the encoder adds it).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Counters.
    pub counters: Vec<Figure<u64>>,
    /// Gauges.
    pub gauges: Vec<Figure<f64>>,
}

impl Snapshot {
    /// Adds a counter without labels.
    pub fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.counters.push((name, help, vec![(Vec::new(), value)]));
    }

    /// Adds a gauge without labels.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.gauges.push((name, help, vec![(Vec::new(), value)]));
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, samples) in &self.counters {
            let kind = ConstCounter::new(0u64).metric_type();
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            match samples.as_slice() {
                [(labels, value)] if labels.is_empty() => {
                    ConstCounter::new(*value).encode(metric)?;
                }
                _ => {
                    for (labels, value) in samples {
                        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        for (name, help, samples) in &self.gauges {
            let kind = ConstGauge::new(0.0f64).metric_type();
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            match samples.as_slice() {
                [(labels, value)] if labels.is_empty() => {
                    ConstGauge::new(*value).encode(metric)?;
                }
                _ => {
                    for (labels, value) in samples {
                        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Metrics measured as things happen.
#[derive(Clone, Debug)]
pub struct Measured {
    kv_seconds: Family<Vec<(&'static str, String)>, Histogram>,
}

impl Default for Measured {
    fn default() -> Self {
        Measured {
            kv_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
        }
    }
}

impl Measured {
    /// A key-value operation (`get` or `put`) that ended `ok` or not, after `seconds`.
    pub fn kv_operation(&self, op: &'static str, ok: bool, seconds: f64) {
        self.kv_seconds
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("result", if ok { "ok" } else { "error" }.to_string()),
            ])
            .observe(seconds);
    }
}

/// The text exposition of everything: what was measured, and `snapshot`.
pub fn render(measured: &Measured, snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("nubo");
    registry.register(
        "kv_operation_seconds",
        "How long key-value operations started on this node took, by operation and result",
        measured.kv_seconds.clone(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_as_text_exposition() {
        let measured = Measured::default();
        measured.kv_operation("get", true, 0.002);
        let mut snapshot = Snapshot::default();
        snapshot.counter("roster_announced", "Announcements sent", 7);
        snapshot.gauges.push((
            "instances",
            "This node's instances by state",
            vec![
                (vec![("state", "ready".to_string())], 2.0),
                (vec![("state", "starting".to_string())], 1.0),
            ],
        ));
        let text = render(&measured, snapshot);
        assert!(
            text.contains("# TYPE nubo_roster_announced counter"),
            "{text}"
        );
        assert!(text.contains("nubo_roster_announced_total 7"), "{text}");
        assert!(text.contains("nubo_instances{state=\"ready\"} 2"), "{text}");
        assert!(
            text.contains("nubo_kv_operation_seconds_count{op=\"get\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
