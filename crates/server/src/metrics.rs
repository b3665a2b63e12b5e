//! Counters for `GET /metrics` (Prometheus text format), kept in memory by this replica.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
struct Counters {
    /// (route, status class) → requests.
    requests: BTreeMap<(String, String), u64>,
    /// Correction kind → count.
    corrections: BTreeMap<String, u64>,
    /// RPC method → (calls, failures, seconds).
    agent_calls: BTreeMap<&'static str, (u64, u64, f64)>,
}

/// The server's metrics; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    counters: Arc<Mutex<Counters>>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counters)) {
        if let Ok(mut counters) = self.counters.lock() {
            f(&mut counters);
        }
    }

    pub fn request(&self, route: &str, status: u16) {
        let class = format!("{}xx", status / 100);
        self.with(|c| *c.requests.entry((route.to_owned(), class)).or_default() += 1);
    }

    pub fn correction(&self, kind: &str) {
        self.with(|c| *c.corrections.entry(kind.to_owned()).or_default() += 1);
    }

    pub fn agent_call(&self, method: &'static str, elapsed: Duration, ok: bool) {
        self.with(|c| {
            let entry = c.agent_calls.entry(method).or_default();
            entry.0 += 1;
            if !ok {
                entry.1 += 1;
            }
            entry.2 += elapsed.as_secs_f64();
        });
    }

    /// How many corrections of `kind` the reconciler made.
    pub fn corrections(&self, kind: &str) -> u64 {
        self.counters
            .lock()
            .map(|c| c.corrections.get(kind).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The Prometheus text, with `sandboxes` (state → count) from the database.
    pub fn render(&self, sandboxes: &BTreeMap<String, i64>) -> String {
        let mut out = String::new();
        let Ok(c) = self.counters.lock() else {
            return out;
        };
        let _ = writeln!(
            out,
            "# HELP wrenn_http_requests_total HTTP requests by route and status class."
        );
        let _ = writeln!(out, "# TYPE wrenn_http_requests_total counter");
        for ((route, class), n) in &c.requests {
            let _ = writeln!(
                out,
                "wrenn_http_requests_total{{route=\"{}\",status=\"{class}\"}} {n}",
                escape(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP wrenn_sandboxes Sandboxes in the database by state."
        );
        let _ = writeln!(out, "# TYPE wrenn_sandboxes gauge");
        for state in crate::db::sandboxes::state::ALL {
            let n = sandboxes.get(state).copied().unwrap_or(0);
            let _ = writeln!(out, "wrenn_sandboxes{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP wrenn_reconciler_corrections_total State corrections the reconciler made."
        );
        let _ = writeln!(out, "# TYPE wrenn_reconciler_corrections_total counter");
        for (kind, n) in &c.corrections {
            let _ = writeln!(
                out,
                "wrenn_reconciler_corrections_total{{kind=\"{}\"}} {n}",
                escape(kind)
            );
        }
        let _ = writeln!(
            out,
            "# HELP wrenn_agent_call_seconds Host agent calls by method."
        );
        let _ = writeln!(out, "# TYPE wrenn_agent_call_seconds summary");
        for (method, (calls, _, seconds)) in &c.agent_calls {
            let _ = writeln!(
                out,
                "wrenn_agent_call_seconds_sum{{method=\"{method}\"}} {seconds}"
            );
            let _ = writeln!(
                out,
                "wrenn_agent_call_seconds_count{{method=\"{method}\"}} {calls}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP wrenn_agent_call_failures_total Host agent calls that failed."
        );
        let _ = writeln!(out, "# TYPE wrenn_agent_call_failures_total counter");
        for (method, (_, failures, _)) in &c.agent_calls {
            let _ = writeln!(
                out,
                "wrenn_agent_call_failures_total{{method=\"{method}\"}} {failures}"
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
