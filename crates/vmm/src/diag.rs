//! Diagnostics shared by the devices: errors rendered with their causes, and a limit on log
//! lines a guest can trigger.

use std::time::{Duration, Instant};

use tracing::warn;

/// "error: cause: cause" on one line, for a log.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Lets through a burst of log lines per time window, so a guest that pokes at registers or
/// posts garbage cannot flood the VMM's log. What it holds back is counted and reported once
/// the next window opens.
#[derive(Debug, Default)]
pub struct LogLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    held_back: u64,
}

impl LogLimiter {
    const WINDOW: Duration = Duration::from_secs(5);
    const BURST: u32 = 10;

    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the caller may log now.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let window_open = self
            .window_start
            .is_some_and(|start| now.duration_since(start) < Self::WINDOW);
        if !window_open {
            if self.held_back > 0 {
                warn!(
                    count = self.held_back,
                    "held back guest-triggered log lines"
                );
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.held_back = 0;
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            true
        } else {
            self.held_back += 1;
            false
        }
    }
}
