//! The server's counters, gauges and latency histogram, and their Prometheus text
//! (`GET /metrics`, text exposition format 0.0.4).

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The kinds of `flux2_klein_errors_total{kind=…}`: every kind's line is always written, so a
/// rate over a kind that has not happened yet is 0, not absent.
pub const ERROR_KINDS: [&str; 8] = [
    "bad_request",
    "unauthorized",
    "not_found",
    "too_large",
    "queue_full",
    "shutting_down",
    "server_error",
    "client_gone",
];

/// Upper bounds (seconds) of the latency histogram's buckets: from a warm tiny-model request
/// (milliseconds) to a 2048² base-model image on a small GPU (minutes).
const BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Default)]
pub struct Metrics {
    /// The models are loaded and warm (`/health` is 200).
    pub ready: AtomicBool,
    /// Requests in the batch the device worker runs now.
    pub running: AtomicU64,
    pub images: AtomicU64,
    errors: [AtomicU64; ERROR_KINDS.len()],
    latency: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    /// Per bucket (not cumulative); the last is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Metrics {
    /// Counts an error of `kind` (one of [`ERROR_KINDS`]).
    pub fn error(&self, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the latency of an answered image request (queueing included).
    pub fn observe(&self, latency: Duration) {
        let s = latency.as_secs_f64();
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = BUCKETS
            .iter()
            .position(|&le| s <= le)
            .unwrap_or(BUCKETS.len());
        h.counts[bucket] += 1;
        h.sum += s;
        h.count += 1;
    }

    /// The mean latency of the requests answered so far (`None` before the first).
    pub fn mean_latency(&self) -> Option<Duration> {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        (h.count > 0).then(|| Duration::from_secs_f64(h.sum / h.count as f64))
    }

    /// The Prometheus text of every metric; `queue_depth` is the queue's length now.
    pub fn render(&self, queue_depth: usize) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(out, "# HELP flux2_klein_{name} {help}");
            let _ = writeln!(out, "# TYPE flux2_klein_{name} {kind}");
            for (suffix, value) in lines {
                let _ = writeln!(out, "flux2_klein_{name}{suffix} {value}");
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        metric(
            "ready",
            "gauge",
            "1 once the models are loaded and warm.",
            &[(
                String::new(),
                u8::from(self.ready.load(Ordering::Relaxed)).to_string(),
            )],
        );
        metric(
            "queue_depth",
            "gauge",
            "Requests waiting for the device worker.",
            &[(String::new(), queue_depth.to_string())],
        );
        metric(
            "requests_running",
            "gauge",
            "Requests in the batch the device worker runs now.",
            &[(String::new(), load(&self.running))],
        );
        metric(
            "images_total",
            "counter",
            "Images generated.",
            &[(String::new(), load(&self.images))],
        );
        let errors: Vec<_> = ERROR_KINDS
            .iter()
            .zip(&self.errors)
            .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), load(n)))
            .collect();
        metric(
            "errors_total",
            "counter",
            "Requests answered with an error, by kind.",
            &errors,
        );
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let mut cumulative = 0;
        let mut lines = Vec::with_capacity(BUCKETS.len() + 3);
        for (i, count) in h.counts.iter().enumerate() {
            cumulative += count;
            let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            lines.push((format!("_bucket{{le=\"{le}\"}}"), cumulative.to_string()));
        }
        lines.push(("_sum".into(), format!("{}", h.sum)));
        lines.push(("_count".into(), h.count.to_string()));
        metric(
            "request_duration_seconds",
            "histogram",
            "Time from an image request's arrival to its answer.",
            &lines,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe(Duration::from_millis(30));
        m.observe(Duration::from_millis(700));
        m.observe(Duration::from_secs(5000));
        m.error("queue_full");
        let text = m.render(3);
        assert!(text.contains("flux2_klein_queue_depth 3\n"));
        assert!(text.contains("flux2_klein_request_duration_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("flux2_klein_request_duration_seconds_bucket{le=\"1\"} 2\n"));
        assert!(text.contains("flux2_klein_request_duration_seconds_bucket{le=\"600\"} 2\n"));
        assert!(text.contains("flux2_klein_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("flux2_klein_request_duration_seconds_count 3\n"));
        assert!(text.contains("flux2_klein_errors_total{kind=\"queue_full\"} 1\n"));
        assert!(text.contains("flux2_klein_errors_total{kind=\"server_error\"} 0\n"));
        assert_eq!(
            m.mean_latency().unwrap(),
            Duration::from_secs_f64((0.03 + 0.7 + 5000.0) / 3.0)
        );
    }
}
