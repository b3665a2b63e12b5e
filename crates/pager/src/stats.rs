//! Counters per VM and for the whole pager, and a fault-latency histogram.
//!
//! Counters are atomics bumped on the serving path; [`Counters::snapshot`] turns them into the
//! serialisable [`CounterStats`]. The histogram has 8 linear sub-buckets per power of two of
//! nanoseconds, so a reported percentile is at most 12.5% above the true value (and never
//! above the recorded maximum).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

const SUB_BUCKET_BITS: u32 = 3;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
const BUCKETS: usize = 496;

/// A log-linear histogram of durations in nanoseconds.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    max_ns: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_ns: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn record(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get(bucket_of(ns)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Count, p50, p99, max and mean.
    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        let percentile = |permille: u64| {
            if count == 0 {
                return 0;
            }
            let rank = (count * permille).div_ceil(1000).max(1);
            let mut seen = 0;
            for (index, bucket_count) in counts.iter().enumerate() {
                seen += bucket_count;
                if seen >= rank {
                    return bucket_upper(index).min(max_ns);
                }
            }
            max_ns
        };
        LatencySummary {
            count,
            p50_ns: percentile(500),
            p99_ns: percentile(990),
            max_ns,
            mean_ns: self
                .sum_ns
                .load(Ordering::Relaxed)
                .checked_div(count)
                .unwrap_or(0),
        }
    }
}

/// Bucket index of a value: exact below 8, then 8 sub-buckets per power of two.
fn bucket_of(ns: u64) -> usize {
    let index = if ns < SUB_BUCKETS {
        ns
    } else {
        let msb = u64::from(63 - ns.leading_zeros());
        let sub = (ns >> (msb - u64::from(SUB_BUCKET_BITS))) & (SUB_BUCKETS - 1);
        (msb - 2) * SUB_BUCKETS + sub
    };
    usize::try_from(index).unwrap_or(BUCKETS - 1)
}

/// Smallest value that falls in bucket `index`.
fn bucket_lower(index: usize) -> u64 {
    let index = u64::try_from(index).unwrap_or(u64::MAX);
    if index < SUB_BUCKETS {
        return index;
    }
    let msb = index / SUB_BUCKETS + 2;
    let sub = index % SUB_BUCKETS;
    (SUB_BUCKETS + sub)
        .checked_shl(u32::try_from(msb).unwrap_or(64) - SUB_BUCKET_BITS)
        .unwrap_or(u64::MAX)
}

/// Largest value that falls in bucket `index`.
fn bucket_upper(index: usize) -> u64 {
    if index + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_lower(index + 1) - 1
    }
}

/// Latency figures, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub mean_ns: u64,
}

/// Live counters of one VM (or of the whole pager).
#[derive(Debug, Default)]
pub struct Counters {
    faults: AtomicU64,
    pages_copied: AtomicU64,
    zero_pages: AtomicU64,
    bytes_copied: AtomicU64,
    prefetched_pages: AtomicU64,
    around_pages: AtomicU64,
    eexist: AtomicU64,
    eagain: AtomicU64,
    remove_events: AtomicU64,
    fault_latency: LatencyHistogram,
}

impl Counters {
    /// A point-in-time copy.
    pub fn snapshot(&self) -> CounterStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CounterStats {
            faults: load(&self.faults),
            pages_copied: load(&self.pages_copied),
            zero_pages: load(&self.zero_pages),
            bytes_copied: load(&self.bytes_copied),
            prefetched_pages: load(&self.prefetched_pages),
            around_pages: load(&self.around_pages),
            eexist: load(&self.eexist),
            eagain: load(&self.eagain),
            remove_events: load(&self.remove_events),
            fault_latency: self.fault_latency.summary(),
        }
    }
}

/// Serving statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterStats {
    /// Page-fault events received.
    pub faults: u64,
    /// Pages installed with `UFFDIO_COPY` (faults, fault-around and prefetch; zero pages
    /// inside a copied run count here).
    pub pages_copied: u64,
    /// Pages installed with `UFFDIO_ZEROPAGE` (faults, fault-around and prefetch).
    pub zero_pages: u64,
    /// Bytes installed with `UFFDIO_COPY`.
    pub bytes_copied: u64,
    /// Pages the prefetcher installed (it lost no race for them).
    pub prefetched_pages: u64,
    /// Pages installed around a faulting page, in the same ioctl or the same window, before
    /// anything touched them (the faulting pages themselves are not counted).
    #[serde(default)]
    pub around_pages: u64,
    /// Installs that found the page already there (`EEXIST`).
    pub eexist: u64,
    /// Installs deferred because the memory layout was changing (`EAGAIN`).
    pub eagain: u64,
    /// REMOVE events (balloon / `MADV_DONTNEED`).
    pub remove_events: u64,
    /// From reading a fault to its install ioctl returning.
    pub fault_latency: LatencySummary,
}

/// Where the serving code reports: one VM's counters and the pager's totals.
#[derive(Debug, Clone)]
pub(crate) struct StatsSink {
    vm: Arc<Counters>,
    total: Arc<Counters>,
}

impl StatsSink {
    pub(crate) fn new(vm: Arc<Counters>, total: Arc<Counters>) -> Self {
        Self { vm, total }
    }

    fn bump(&self, field: impl Fn(&Counters) -> &AtomicU64, by: u64) {
        field(&self.vm).fetch_add(by, Ordering::Relaxed);
        field(&self.total).fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn fault(&self) {
        self.bump(|c| &c.faults, 1);
    }

    /// `pages` pages (`bytes` bytes) installed with `UFFDIO_COPY`.
    pub(crate) fn copied(&self, pages: u64, bytes: u64) {
        self.bump(|c| &c.pages_copied, pages);
        self.bump(|c| &c.bytes_copied, bytes);
    }

    pub(crate) fn zero_pages(&self, pages: u64) {
        self.bump(|c| &c.zero_pages, pages);
    }

    pub(crate) fn prefetched(&self, pages: u64) {
        self.bump(|c| &c.prefetched_pages, pages);
    }

    pub(crate) fn around(&self, pages: u64) {
        self.bump(|c| &c.around_pages, pages);
    }

    pub(crate) fn eexist(&self) {
        self.bump(|c| &c.eexist, 1);
    }

    pub(crate) fn eagain(&self) {
        self.bump(|c| &c.eagain, 1);
    }

    pub(crate) fn remove_event(&self) {
        self.bump(|c| &c.remove_events, 1);
    }

    pub(crate) fn fault_latency(&self, elapsed: Duration) {
        self.vm.fault_latency.record(elapsed);
        self.total.fault_latency.record(elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_summary_empty_is_all_zero() {
        assert_eq!(
            LatencyHistogram::default().summary(),
            LatencySummary::default()
        );
    }

    #[test]
    fn test_summary_percentiles_within_bucket_error() {
        let histogram = LatencyHistogram::default();
        for micros in 1..=100u64 {
            histogram.record(Duration::from_micros(micros));
        }
        let summary = histogram.summary();
        assert_eq!(summary.count, 100);
        assert_eq!(summary.max_ns, 100_000);
        assert!((50_000..=56_250).contains(&summary.p50_ns), "{summary:?}");
        assert!((99_000..=100_000).contains(&summary.p99_ns), "{summary:?}");
        assert_eq!(summary.mean_ns, 50_500);
    }

    #[test]
    fn test_sink_bumps_vm_and_total() {
        let vm = Arc::new(Counters::default());
        let total = Arc::new(Counters::default());
        let sink = StatsSink::new(Arc::clone(&vm), Arc::clone(&total));
        sink.copied(1, 4096);
        sink.eexist();
        sink.around(15);
        for counters in [&vm, &total] {
            let stats = counters.snapshot();
            assert_eq!(
                (
                    stats.pages_copied,
                    stats.bytes_copied,
                    stats.eexist,
                    stats.around_pages
                ),
                (1, 4096, 1, 15)
            );
        }
    }

    #[test]
    fn test_counter_stats_without_around_pages_deserializes_as_zero() {
        let mut json = serde_json::to_value(CounterStats::default()).expect("json");
        json.as_object_mut()
            .expect("object")
            .remove("around_pages")
            .expect("field present");
        let stats: CounterStats = serde_json::from_value(json).expect("older stats parse");
        assert_eq!(stats.around_pages, 0);
    }

    proptest! {
        #[test]
        fn test_bucket_bounds_contain_value(ns in any::<u64>()) {
            let index = bucket_of(ns);
            prop_assert!(index < BUCKETS);
            prop_assert!(bucket_lower(index) <= ns);
            prop_assert!(ns <= bucket_upper(index));
            // Relative width of a bucket is at most 1/8 of its lower bound.
            prop_assert!(bucket_upper(index) - bucket_lower(index) <= bucket_lower(index) / 8 + 1);
        }
    }
}
