//! Server metrics in the Prometheus text format: request and token counters, queue depth,
//! latency histograms, prefix-cache hits.

use crate::prefix_cache::PrefixStats;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with fixed buckets, updated without locks.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// Everything `/metrics` reports; shared by the HTTP handlers and the engine thread.
#[derive(Default)]
pub struct Metrics {
    pub requests_received: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_failed: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens actually run through the model (the rest came from the prefix cache).
    pub prefill_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub forward_steps: AtomicU64,
    /// Sequences waiting to be scheduled.
    pub waiting: AtomicU64,
    pub running: AtomicU64,
    pub ttft: Histogram,
    pub e2e: Histogram,
    pub inter_token: Histogram,
    pub step: Histogram,
    pub prefix: Mutex<PrefixStats>,
    /// Set when the engine thread has ended.
    pub engine_stopped: std::sync::atomic::AtomicBool,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        };
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut o,
            "dsv4_requests_received_total",
            "Generation sequences accepted.",
            &self.requests_received,
        );
        counter(
            &mut o,
            "dsv4_requests_rejected_total",
            "Requests refused because the queue was full.",
            &self.requests_rejected,
        );
        counter(
            &mut o,
            "dsv4_requests_cancelled_total",
            "Sequences cancelled by a client disconnect.",
            &self.requests_cancelled,
        );
        counter(
            &mut o,
            "dsv4_requests_failed_total",
            "Sequences ended by an internal error.",
            &self.requests_failed,
        );
        let _ = writeln!(
            o,
            "# HELP dsv4_requests_finished_total Sequences finished, by reason.\n# TYPE dsv4_requests_finished_total counter\ndsv4_requests_finished_total{{finish_reason=\"stop\"}} {}\ndsv4_requests_finished_total{{finish_reason=\"length\"}} {}",
            self.finished_stop.load(Relaxed),
            self.finished_length.load(Relaxed)
        );
        counter(
            &mut o,
            "dsv4_prompt_tokens_total",
            "Prompt tokens of accepted sequences.",
            &self.prompt_tokens,
        );
        counter(
            &mut o,
            "dsv4_prefill_tokens_total",
            "Prompt tokens computed (not served by the prefix cache).",
            &self.prefill_tokens,
        );
        counter(
            &mut o,
            "dsv4_generation_tokens_total",
            "Tokens generated.",
            &self.generation_tokens,
        );
        counter(
            &mut o,
            "dsv4_forward_steps_total",
            "Batched forward passes.",
            &self.forward_steps,
        );
        gauge(
            &mut o,
            "dsv4_queue_depth",
            "Sequences waiting to be scheduled.",
            self.waiting.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "dsv4_running_sequences",
            "Sequences being prefilled or decoded.",
            self.running.load(Relaxed) as f64,
        );
        let p = *self.prefix.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            o,
            "# HELP dsv4_prefix_cache_lookups_total Prefix-cache lookups, by result.\n# TYPE dsv4_prefix_cache_lookups_total counter\ndsv4_prefix_cache_lookups_total{{result=\"hit\"}} {}\ndsv4_prefix_cache_lookups_total{{result=\"miss\"}} {}",
            p.hits, p.misses
        );
        let lookups = p.hits + p.misses;
        let rate = if lookups > 0 {
            p.hits as f64 / lookups as f64
        } else {
            0.0
        };
        gauge(
            &mut o,
            "dsv4_prefix_cache_hit_rate",
            "Fraction of lookups that found a cached prefix.",
            rate,
        );
        let _ = writeln!(o, "# HELP dsv4_prefix_cache_hit_tokens_total Prompt tokens served from the prefix cache.\n# TYPE dsv4_prefix_cache_hit_tokens_total counter\ndsv4_prefix_cache_hit_tokens_total {}", p.hit_tokens);
        gauge(
            &mut o,
            "dsv4_prefix_cache_entries",
            "Snapshots held.",
            p.entries as f64,
        );
        gauge(
            &mut o,
            "dsv4_prefix_cache_bytes",
            "Bytes of state held by the prefix cache.",
            p.bytes as f64,
        );
        self.ttft.render(
            &mut o,
            "dsv4_time_to_first_token_seconds",
            "From arrival to the first generated token.",
        );
        self.e2e.render(
            &mut o,
            "dsv4_request_latency_seconds",
            "From arrival to the last token.",
        );
        self.inter_token.render(
            &mut o,
            "dsv4_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence.",
        );
        self.step.render(
            &mut o,
            "dsv4_forward_step_seconds",
            "Duration of one batched forward.",
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(0.003);
        m.ttft.observe(0.2);
        m.ttft.observe(100.0);
        let text = m.render();
        assert!(text.contains("dsv4_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("dsv4_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"));
        assert!(text.contains("dsv4_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("dsv4_time_to_first_token_seconds_count 3\n"));
    }
}
