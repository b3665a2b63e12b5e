//! The agent's counters and timings, written as Prometheus text at `GET /metrics`.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram in Prometheus' cumulative form.
#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if secs <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Everything the agent counts.
#[derive(Debug, Default)]
pub struct Metrics {
    created: AtomicU64,
    destroyed: AtomicU64,
    paused: AtomicU64,
    resumed: AtomicU64,
    reaped: AtomicU64,
    vmm_exits: AtomicU64,
    pause_bytes: AtomicU64,
    execs: AtomicU64,
    timings: Mutex<Timings>,
}

#[derive(Debug, Default)]
struct Timings {
    create: Histogram,
    pause: Histogram,
    resume: Histogram,
    exec: Histogram,
}

/// Point-in-time values the manager supplies when the text is written.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub running: u64,
    pub paused: u64,
    pub slots_free: u64,
    pub vcpus_used: u64,
    pub memory_mib_used: u64,
    pub templates: u64,
    pub pager_faults: u64,
    pub pager_bytes: u64,
}

impl Metrics {
    fn timings(&self) -> std::sync::MutexGuard<'_, Timings> {
        self.timings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn created(&self, took: Duration) {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.timings().create.observe(took);
    }

    pub fn destroyed(&self) {
        self.destroyed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn paused(&self, took: Duration, bytes: u64) {
        self.paused.fetch_add(1, Ordering::Relaxed);
        self.pause_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.timings().pause.observe(took);
    }

    pub fn resumed(&self, took: Duration) {
        self.resumed.fetch_add(1, Ordering::Relaxed);
        self.timings().resume.observe(took);
    }

    pub fn reaped(&self) {
        self.reaped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn vmm_exited(&self) {
        self.vmm_exits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn exec(&self, took: Duration) {
        self.execs.fetch_add(1, Ordering::Relaxed);
        self.timings().exec.observe(took);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let counters = [
            (
                "wrenn_agent_sandboxes_created_total",
                "Sandboxes created.",
                &self.created,
            ),
            (
                "wrenn_agent_sandboxes_destroyed_total",
                "Sandboxes destroyed (reaped included).",
                &self.destroyed,
            ),
            (
                "wrenn_agent_sandboxes_paused_total",
                "Pauses.",
                &self.paused,
            ),
            (
                "wrenn_agent_sandboxes_resumed_total",
                "Resumes.",
                &self.resumed,
            ),
            (
                "wrenn_agent_sandboxes_reaped_total",
                "Sandboxes stopped by their timeout.",
                &self.reaped,
            ),
            (
                "wrenn_agent_vmm_exits_total",
                "Running sandboxes whose VMM exited on its own (killed, crashed).",
                &self.vmm_exits,
            ),
            (
                "wrenn_agent_pause_written_bytes_total",
                "Bytes pauses wrote.",
                &self.pause_bytes,
            ),
            ("wrenn_agent_execs_total", "Unary execs.", &self.execs),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let gauge_values = [
            (
                "wrenn_agent_sandboxes_running",
                "Sandboxes running.",
                gauges.running,
            ),
            (
                "wrenn_agent_sandboxes_paused",
                "Sandboxes paused.",
                gauges.paused,
            ),
            (
                "wrenn_agent_slots_free",
                "Network slots ready.",
                gauges.slots_free,
            ),
            (
                "wrenn_agent_vcpus_used",
                "vCPUs of running sandboxes.",
                gauges.vcpus_used,
            ),
            (
                "wrenn_agent_memory_used_mib",
                "Memory of running sandboxes (MiB).",
                gauges.memory_mib_used,
            ),
            ("wrenn_agent_templates", "Templates.", gauges.templates),
        ];
        for (name, help, value) in gauge_values {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        for (name, help, value) in [
            (
                "wrenn_agent_page_faults_total",
                "Guest page faults served.",
                gauges.pager_faults,
            ),
            (
                "wrenn_agent_page_bytes_total",
                "Guest memory bytes installed by the page server.",
                gauges.pager_bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        }
        let timings = self.timings();
        timings.create.write(
            &mut out,
            "wrenn_agent_create_seconds",
            "Create from template to envd ready.",
        );
        timings.pause.write(
            &mut out,
            "wrenn_agent_pause_seconds",
            "Pause: snapshot written and resources freed.",
        );
        timings.resume.write(
            &mut out,
            "wrenn_agent_resume_seconds",
            "Resume to envd ready.",
        );
        timings.exec.write(
            &mut out,
            "wrenn_agent_exec_seconds",
            "Unary exec round trip.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_render_counts_and_buckets() {
        let m = Metrics::default();
        m.created(Duration::from_millis(30));
        m.created(Duration::from_secs(3));
        m.paused(Duration::from_millis(1), 4096);
        let text = m.render(&Gauges {
            running: 2,
            ..Gauges::default()
        });
        assert!(
            text.contains("wrenn_agent_sandboxes_created_total 2\n"),
            "{text}"
        );
        assert!(text.contains("wrenn_agent_pause_written_bytes_total 4096\n"));
        assert!(text.contains("wrenn_agent_sandboxes_running 2\n"));
        assert!(text.contains("wrenn_agent_create_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("wrenn_agent_create_seconds_bucket{le=\"5\"} 2\n"));
        assert!(text.contains("wrenn_agent_create_seconds_count 2\n"));
    }
}
