//! Progress for long build steps: a spinner with the step's elapsed time and its latest
//! output line when attached to a terminal; plain start and finish lines otherwise (CI logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// One long step in progress.
#[derive(Debug)]
pub struct Step {
    name: String,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl Step {
    /// Starts a step and says so.
    pub fn start(name: impl Into<String>) -> Self {
        let name = name.into();
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(name.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            Some(bar)
        } else {
            eprintln!("==> {name} ...");
            None
        };
        Step {
            name,
            started: Instant::now(),
            bar,
        }
    }

    /// Shows the latest thing the step is doing (terminal only).
    pub fn message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_owned());
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ends the step with a one-line summary and its time.
    pub fn finish(self, summary: &str) -> Duration {
        let took = self.started.elapsed();
        let line = format!("{}: {summary} ({:.1} s)", self.name, took.as_secs_f64());
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("==> {line}");
        took
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
