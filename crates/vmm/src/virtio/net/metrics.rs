//! Counters of one network device.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of a device's counters. Bytes count frames without the vnet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames read from the tap and not delivered: larger than the buffers the guest offered,
    /// or carrying offloads the guest did not accept.
    pub rx_dropped: u64,
    /// Guest RX chains handed back unused because they were malformed (device-readable parts,
    /// too small for the header, too fragmented).
    pub rx_bad_buffers: u64,
    /// Times the guest ran out of RX buffers while the device was reading the tap (it then
    /// stops polling the tap until the guest posts more).
    pub rx_stalls: u64,
    /// Frames sent to the tap.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Guest TX chains not sent: malformed, or refused by the tap.
    pub tx_dropped: u64,
    /// Of `tx_dropped`, the malformed ones (device-writable parts, bad lengths or addresses).
    pub tx_bad_chains: u64,
    /// Reads and writes the tap failed for a reason other than being empty.
    pub tap_errors: u64,
    /// Interrupts raised to the guest.
    pub interrupts: u64,
}

/// The live counters; updated on the event-loop thread, read from anywhere.
#[derive(Debug, Default)]
pub(super) struct NetCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub rx_bad_buffers: AtomicU64,
    pub rx_stalls: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub tx_bad_chains: AtomicU64,
    pub tap_errors: AtomicU64,
    pub interrupts: AtomicU64,
}

/// Adds one to a counter.
pub(super) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub(super) fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

impl NetCounters {
    pub fn snapshot(&self) -> NetMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetrics {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_bad_buffers: get(&self.rx_bad_buffers),
            rx_stalls: get(&self.rx_stalls),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_bad_chains: get(&self.tx_bad_chains),
            tap_errors: get(&self.tap_errors),
            interrupts: get(&self.interrupts),
        }
    }
}
