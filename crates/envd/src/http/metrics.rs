//! `GET /metrics`: the guest's CPU, memory and disk use, in E2B's field names.
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub(super) struct Metrics {
    ts: u64,
    cpu_count: usize,
    cpu_used_pct: f64,
    mem_total: u64,
    mem_used: u64,
    mem_cache: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    disk_used: u64,
    disk_total: u64,
}

/// CPU jiffies (busy, total) at the previous call: CPU use is measured between two calls
/// (since boot for the first).
static LAST_CPU: Mutex<(u64, u64)> = Mutex::new((0, 0));

pub(super) async fn metrics() -> Json<Metrics> {
    let (busy, total) = cpu_jiffies().unwrap_or((0, 0));
    let cpu_used_pct = {
        let mut last = LAST_CPU
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (delta_busy, delta_total) = (busy.saturating_sub(last.0), total.saturating_sub(last.1));
        *last = (busy, total);
        if delta_total == 0 {
            0.0
        } else {
            percent(delta_busy, delta_total)
        }
    };
    let memory = meminfo();
    let (disk_used, disk_total) = disk("/");
    let mem_used = memory.total.saturating_sub(memory.available);
    Json(Metrics {
        ts: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpu_count: std::thread::available_parallelism().map_or(1, usize::from),
        cpu_used_pct,
        mem_total: memory.total,
        mem_used,
        mem_cache: memory.cache,
        mem_total_mib: memory.total >> 20,
        mem_used_mib: mem_used >> 20,
        disk_used,
        disk_total,
    })
}

fn percent(part: u64, whole: u64) -> f64 {
    // Jiffy counts stay far below 2^52, where f64 is exact.
    #[allow(clippy::cast_precision_loss)]
    let ratio = part as f64 / whole as f64;
    (ratio * 10_000.0).round() / 100.0
}

/// (busy, total) jiffies over all CPUs from `/proc/stat`.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle + iowait
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

#[derive(Debug, Default)]
struct Memory {
    total: u64,
    available: u64,
    cache: u64,
}

fn meminfo() -> Memory {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Memory {
        total: field("MemTotal"),
        available: field("MemAvailable"),
        cache: field("Cached"),
    }
}

/// (used, total) bytes of the filesystem holding `path`.
fn disk(path: &str) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(stat) => {
            let block = stat.fragment_size();
            let total = stat.blocks() * block;
            (total.saturating_sub(stat.blocks_free() * block), total)
        }
        Err(_) => (0, 0),
    }
}
