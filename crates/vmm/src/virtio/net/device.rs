//! The device itself: features, configuration space, activation, and the TX and RX paths.

use crate::diag::{LogLimiter, error_chain};
use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::{fmt, io};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::metrics::{self, NetCounters, NetMetrics};
use super::tap::{HostSpan, MAX_IOVECS, Tap};
use super::{
    DEFAULT_MTU, ETH_HLEN, MAX_FRAME_LEN, MIN_MTU, NetError, QUEUE_SIZE, RX_INDEX, TX_INDEX,
    VLAN_HLEN, VNET_HDR_LEN, parse_mac,
};
use crate::api::models::NetworkInterface;
use crate::memory::GuestMemory;
use crate::virtio::persist::{self, DeviceKindState, PersistError, QueueState, VirtioDeviceState};
use crate::virtio::{
    ActivateError, Activation, Interrupt, TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
};

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Offered whatever the configuration: modern virtio, ring optimisations, link status, and
/// checksum/TSO offloads in both directions (the tap handles them natively).
const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// `struct virtio_net_config` up to `mtu`: mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// Header and status values narrowed from the bindings' `u32`s to the fields' sizes.
const LINK_UP: u16 = 1;
const HDR_F_NEEDS_CSUM: u8 = 1;
const HDR_GSO_ECN: u8 = 0x80;
const _: () = assert!(
    VIRTIO_NET_S_LINK_UP == 1 && VIRTIO_NET_HDR_F_NEEDS_CSUM == 1 && VIRTIO_NET_HDR_GSO_ECN == 0x80
);

/// Largest TX chain: the header and the largest frame.
const MAX_TX_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Largest frame the tap can hand over, header included; also the size of the scratch buffer
/// that catches frames too large for the guest's buffers, so the tap never truncates one.
const MAX_RX_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Most memory spans one RX chain may have; more is not a buffer any driver posts.
const MAX_RX_CHAIN_SPANS: usize = 256;

/// Work done per event before yielding to the rest of the event loop. The tap is polled
/// level-triggered and a queue that is not finished is re-kicked, so nothing is lost.
const RX_FRAME_BUDGET: usize = 128;
const TX_CHAIN_BUDGET: usize = 2 * QUEUE_SIZE as usize;
const RX_CHAIN_BUDGET: usize = 2 * QUEUE_SIZE as usize;

/// A virtio-net device bound to one tap.
pub struct Net {
    id: String,
    pub(super) tap: Tap,
    avail_features: u64,
    acked_features: u64,
    config_space: [u8; CONFIG_LEN],
    mtu: u16,
    pub(super) queue_events: [EventFd; 2],
    /// Written by `activate` (vCPU thread) so that the event loop starts polling the tap.
    pub(super) activate_event: EventFd,
    pub(super) active: Option<Active>,
    /// Whether the tap fd is in the event loop's interest list right now.
    pub(super) tap_polled: bool,
    /// The tap reported an error condition; it is no longer polled.
    pub(super) tap_broken: bool,
    /// Catches the part of a frame that does not fit the guest's buffers.
    overflow: Box<[u8]>,
    /// Reused per frame to avoid allocating on the data paths.
    tx_spans: Vec<HostSpan>,
    rx_spans: Vec<HostSpan>,
    used_scratch: Vec<(u16, u32)>,
    counters: NetCounters,
    guest_log: LogLimiter,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("id", &self.id)
            .field("tap", &self.tap.name())
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("activated", &self.active.is_some())
            .field("tap_polled", &self.tap_polled)
            .finish_non_exhaustive()
    }
}

/// Everything that exists only between activation and reset.
pub(super) struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    rx_buffers: RxBuffers,
    /// Frames may span several RX chains (`VIRTIO_NET_F_MRG_RXBUF`).
    mergeable: bool,
    /// Largest frame, header included, the tap may hand over with the negotiated offloads.
    rx_frame_max: usize,
    /// Whether the RX queue's notifications are on (they are turned off while the device holds
    /// enough buffers, and on again when it runs out).
    rx_notify: bool,
    acked_features: u64,
}

/// RX chains taken from the avail ring and not yet used, oldest first, with their memory.
#[derive(Debug, Default)]
struct RxBuffers {
    chains: VecDeque<RxChain>,
    /// The spans of every chain in `chains`, in the same order.
    spans: VecDeque<GuestSpan>,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    /// The queue's `next_avail` when the chain was taken: where a snapshot rewinds to.
    avail_pos: u16,
    spans: usize,
    capacity: usize,
}

/// A piece of a guest buffer within one memory region: where the guest sees it and where the
/// VMM does.
#[derive(Debug, Clone, Copy)]
struct GuestSpan {
    gpa: GuestAddress,
    host: HostSpan,
}

/// What one RX run concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RxRun {
    /// Keep (or put) the tap in the interest list: the guest has buffers for what it may send.
    pub want_tap: bool,
    pub interrupt: bool,
}

impl Net {
    /// Validates the configuration and attaches to the tap `config.host_dev_name`.
    pub fn new(config: &NetworkInterface) -> Result<Net, NetError> {
        let mac = config.guest_mac.as_deref().map(parse_mac).transpose()?;
        if let Some(mtu) = config.mtu
            && mtu < MIN_MTU
        {
            return Err(NetError::InvalidMtu { mtu });
        }
        if config.rx_rate_limiter.is_some() || config.tx_rate_limiter.is_some() {
            tracing::warn!(
                net = %config.iface_id,
                "rate limiters are not implemented; this interface runs unlimited"
            );
        }
        let tap = Tap::open(&config.host_dev_name)?;

        let mut avail_features = BASE_FEATURES;
        let mut config_space = [0u8; CONFIG_LEN];
        if let Some(mac) = mac {
            avail_features |= bit(VIRTIO_NET_F_MAC);
            config_space[..6].copy_from_slice(&mac);
        }
        config_space[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        // max_virtqueue_pairs: one pair (only read when MQ is negotiated, which it is not).
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes());
        if let Some(mtu) = config.mtu {
            avail_features |= bit(VIRTIO_NET_F_MTU);
            config_space[10..12].copy_from_slice(&mtu.to_le_bytes());
        }

        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            id: config.iface_id.clone(),
            tap,
            avail_features,
            acked_features: 0,
            config_space,
            mtu: config.mtu.unwrap_or(DEFAULT_MTU),
            queue_events: [eventfd()?, eventfd()?],
            activate_event: eventfd()?,
            active: None,
            tap_polled: false,
            tap_broken: false,
            overflow: vec![0u8; MAX_RX_LEN].into_boxed_slice(),
            tx_spans: Vec::new(),
            rx_spans: Vec::new(),
            used_scratch: Vec::new(),
            counters: NetCounters::default(),
            guest_log: LogLimiter::default(),
        })
    }

    /// The `iface_id` this device was configured with.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn metrics(&self) -> NetMetrics {
        self.counters.snapshot()
    }

    /// Raises the interrupt for used buffers, counting it.
    pub(super) fn signal_guest(&self) {
        let Some(active) = &self.active else { return };
        metrics::inc(&self.counters.interrupts);
        if let Err(e) = active.interrupt.signal_used_queue() {
            tracing::error!(net = %self.id, "cannot raise the interrupt: {e}");
        }
    }

    /// Sends every chain the guest has queued for transmission. Returns whether the guest
    /// needs an interrupt.
    pub(super) fn process_tx(&mut self) -> bool {
        let Net {
            id,
            tap,
            active,
            tx_spans,
            counters,
            guest_log,
            queue_events,
            ..
        } = self;
        let Some(Active { mem, tx, .. }) = active.as_mut() else {
            return false;
        };
        let start = Wrapping(tx.next_used());
        let mut handled = 0usize;
        'refill: loop {
            if let Err(e) = tx.disable_notification(&*mem) {
                warn_guest(guest_log, id, format_args!("TX queue: {e}"));
                break;
            }
            while let Some(chain) = tx.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                tx_spans.clear();
                match gather_tx_chain(chain, mem, tx_spans) {
                    Ok(len) => {
                        // SAFETY: the spans were just taken from slices of `mem`, which is
                        // borrowed (so mapped) for the whole call.
                        match unsafe { tap.write_frame(tx_spans) } {
                            Ok(_) => {
                                metrics::inc(&counters.tx_packets);
                                metrics::add(&counters.tx_bytes, len - VNET_HDR_LEN);
                            }
                            Err(e) => {
                                metrics::inc(&counters.tx_dropped);
                                metrics::inc(&counters.tap_errors);
                                warn_guest(guest_log, id, format_args!("tap write failed: {e}"));
                            }
                        }
                    }
                    Err(reason) => {
                        metrics::inc(&counters.tx_dropped);
                        metrics::inc(&counters.tx_bad_chains);
                        warn_guest(guest_log, id, format_args!("dropping a TX chain: {reason}"));
                    }
                }
                if let Err(e) = put_used(mem, tx, &[(head, 0)]) {
                    warn_guest(guest_log, id, format_args!("TX used ring: {e}"));
                    break 'refill;
                }
                handled += 1;
                if handled >= TX_CHAIN_BUDGET {
                    // Come back through the event loop; notifications stay off meanwhile.
                    let _ = queue_events[TX_INDEX].write(1);
                    break 'refill;
                }
            }
            match tx.enable_notification(&*mem) {
                Ok(true) if !ring_is_broken(tx, mem) => continue,
                Ok(_) => break,
                Err(e) => {
                    warn_guest(guest_log, id, format_args!("TX queue: {e}"));
                    break;
                }
            }
        }
        needs_interrupt(mem, tx, start)
    }

    /// Moves frames from the tap into the guest's RX buffers until the tap is empty, the guest
    /// has no room, or the budget is spent.
    pub(super) fn process_rx(&mut self) -> RxRun {
        let Some(active) = self.active.as_ref() else {
            return RxRun {
                want_tap: false,
                interrupt: false,
            };
        };
        let start = Wrapping(active.rx.next_used());
        let mut frames = 0usize;
        let want_tap = loop {
            if !self.fill_rx_buffers() {
                // Count running dry, not every look at a ring that is still dry.
                if self.tap_polled || frames > 0 {
                    metrics::inc(&self.counters.rx_stalls);
                }
                break false;
            }
            if frames >= RX_FRAME_BUDGET {
                break true;
            }
            match self.receive_frame() {
                Ok(()) => frames += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Anything else (a detached or broken tap) would repeat on every poll.
                    metrics::inc(&self.counters.tap_errors);
                    tracing::error!(
                        net = %self.id,
                        tap = %self.tap.name(),
                        "tap read failed, no longer reading it: {e}"
                    );
                    self.tap_broken = true;
                    break false;
                }
            }
        };
        let interrupt = self
            .active
            .as_mut()
            .is_some_and(|a| needs_interrupt(&a.mem, &mut a.rx, start));
        RxRun {
            want_tap,
            interrupt,
        }
    }

    /// Takes RX chains from the avail ring until the device holds enough room for the largest
    /// frame. Returns false when the guest has not posted enough; the RX queue's notifications
    /// are then on, so the guest's next post brings the device back.
    fn fill_rx_buffers(&mut self) -> bool {
        let Net {
            id,
            active,
            counters,
            guest_log,
            queue_events,
            ..
        } = self;
        let Some(Active {
            mem,
            rx,
            rx_buffers,
            mergeable,
            rx_frame_max,
            rx_notify,
            ..
        }) = active.as_mut()
        else {
            return false;
        };
        let queue_size = usize::from(rx.size());
        let ready = |b: &RxBuffers| b.is_ready(*mergeable, *rx_frame_max, queue_size);
        let mut popped = 0usize;
        loop {
            while !ready(rx_buffers) {
                let avail_pos = rx.next_avail();
                let Some(chain) = rx.pop_descriptor_chain(&*mem) else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                if let Err(reason) = rx_buffers.push_chain(chain, mem, avail_pos) {
                    metrics::inc(&counters.rx_bad_buffers);
                    warn_guest(
                        guest_log,
                        id,
                        format_args!("returning an RX chain: {reason}"),
                    );
                    if let Err(e) = put_used(mem, rx, &[(head, 0)]) {
                        warn_guest(guest_log, id, format_args!("RX used ring: {e}"));
                        return false;
                    }
                }
                if popped >= RX_CHAIN_BUDGET {
                    // A guest posting only bad chains must not keep the event loop here.
                    let _ = queue_events[RX_INDEX].write(1);
                    return false;
                }
            }
            if ready(rx_buffers) {
                if *rx_notify {
                    // Enough buffers: the guest need not tell us about more for now.
                    *rx_notify = rx.disable_notification(&*mem).is_err();
                }
                return true;
            }
            // The ring is empty: ask for a notification, then look again in case the guest
            // posted between our last look and the request.
            *rx_notify = true;
            match rx.enable_notification(&*mem) {
                Ok(true) if !ring_is_broken(rx, mem) => continue,
                Ok(_) => return false,
                Err(e) => {
                    warn_guest(guest_log, id, format_args!("RX queue: {e}"));
                    return false;
                }
            }
        }
    }

    /// Reads one frame from the tap into the held RX chains and publishes it, or drops it when
    /// it does not fit or carries offloads the guest did not accept.
    fn receive_frame(&mut self) -> io::Result<()> {
        let Net {
            id,
            tap,
            active,
            overflow,
            rx_spans,
            used_scratch,
            counters,
            guest_log,
            ..
        } = self;
        let Some(Active {
            mem,
            rx,
            rx_buffers,
            mergeable,
            rx_frame_max,
            acked_features,
            ..
        }) = active.as_mut()
        else {
            return Err(io::ErrorKind::WouldBlock.into());
        };

        // Offer the oldest chains: one without merging, else enough for the largest frame.
        rx_spans.clear();
        let mut offered = 0usize;
        let mut offered_chains = 0usize;
        let mut spans = rx_buffers.spans.iter();
        for chain in &rx_buffers.chains {
            let enough = if *mergeable {
                offered >= *rx_frame_max
            } else {
                offered_chains == 1
            };
            if enough || rx_spans.len() + chain.spans >= MAX_IOVECS {
                break;
            }
            rx_spans.extend(spans.by_ref().take(chain.spans).map(|s| s.host));
            offered += chain.capacity;
            offered_chains += 1;
        }

        // SAFETY: the spans come from slices of `mem`, which this device holds (so they stay
        // mapped) until reset drops them together; guest memory is only ever accessed
        // through volatile operations, never through Rust references.
        let len = unsafe { tap.read_frame(rx_spans, overflow) }?;
        // readv wrote guest memory behind vm-memory's back: record it for diff snapshots, even
        // for a frame dropped below (its bytes are in the guest's buffers all the same).
        let mut written = len;
        for span in rx_buffers.spans.iter().take(rx_spans.len()) {
            if written == 0 {
                break;
            }
            let n = written.min(span.host.len);
            crate::memory::mark_dirty(mem, span.gpa, n);
            written -= n;
        }

        if len > offered || len < VNET_HDR_LEN {
            metrics::inc(&counters.rx_dropped);
            warn_guest(
                guest_log,
                id,
                format_args!("dropping a {len}-byte frame: the guest offered {offered} bytes"),
            );
            return Ok(());
        }

        // Which chains the frame filled, and how much of each.
        used_scratch.clear();
        let mut left = len;
        for chain in rx_buffers.chains.iter().take(offered_chains) {
            if left == 0 {
                break;
            }
            let used = left.min(chain.capacity);
            used_scratch.push((chain.head, u32::try_from(used).unwrap_or(u32::MAX)));
            left -= used;
        }
        let num_buffers = u16::try_from(used_scratch.len()).unwrap_or(u16::MAX);

        let first_spans = rx_buffers.chains.front().map_or(0, |c| c.spans);
        let header_spans = || rx_buffers.spans.range(..first_spans);
        let mut header = [0u8; VNET_HDR_LEN];
        if let Err(e) = copy_from_spans(mem, header_spans(), &mut header) {
            metrics::inc(&counters.rx_dropped);
            warn_guest(guest_log, id, format_args!("RX header: {e}"));
            return Ok(());
        }
        if let Err(reason) = fix_rx_header(&mut header, *acked_features, num_buffers) {
            metrics::inc(&counters.rx_dropped);
            warn_guest(guest_log, id, format_args!("dropping a frame: {reason}"));
            return Ok(());
        }
        if let Err(e) = copy_to_spans(mem, header_spans(), &header) {
            metrics::inc(&counters.rx_dropped);
            warn_guest(guest_log, id, format_args!("RX header: {e}"));
            return Ok(());
        }

        rx_buffers.consume(used_scratch.len());
        if let Err(e) = put_used(mem, rx, used_scratch) {
            warn_guest(guest_log, id, format_args!("RX used ring: {e}"));
        }
        metrics::inc(&counters.rx_packets);
        metrics::add(&counters.rx_bytes, len - VNET_HDR_LEN);
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(Net::metrics(self)).unwrap_or_default()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space[..CONFIG_LEN], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a modern driver; nothing else here is writable.
        if self.guest_log.allow() {
            tracing::warn!(
                net = %self.id,
                offset,
                len = data.len(),
                "ignoring a write to the read-only configuration space"
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Device(format!(
                "network interface {} is already active",
                self.id
            )));
        }
        let Activation {
            mem,
            queues,
            interrupt,
        } = activation;
        let got = queues.len();
        let Ok([mut rx, mut tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { want: 2, got });
        };
        for (name, queue) in [("RX", &rx), ("TX", &tx)] {
            if !queue.is_valid(&mem) {
                return Err(ActivateError::Device(format!(
                    "network interface {}: the {name} queue is not ready or not in guest memory",
                    self.id
                )));
            }
        }
        let acked = self.acked_features;
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);

        let offloads = tap_offload_flags(acked);
        self.tap
            .set_offload(offloads)
            .map_err(|e| ActivateError::Device(error_chain(&e)))?;
        self.activate_event.write(1)?;

        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            rx_buffers: RxBuffers::default(),
            mergeable: acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame_max: rx_frame_max(offloads, self.mtu),
            rx_notify: true,
            acked_features: acked,
        });
        // Not info: a guest can reset and restart the device in a loop.
        tracing::debug!(
            net = %self.id,
            tap = %self.tap.name(),
            features = %format_args!("{acked:#x}"),
            "activated"
        );
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        // Held RX chains go with the queues; the tap leaves the poll set the next time it
        // fires (the event loop owns that list).
        self.active = None;
        self.acked_features = 0;
    }

    /// The RX queue is saved rewound over the chains the device holds, so the restored device
    /// takes them again; a frame not yet read stays in the tap.
    fn save_state(&self) -> VirtioDeviceState {
        let queues = match &self.active {
            Some(active) => {
                let mut rx = QueueState::from(&active.rx);
                let (next_avail, left_behind) =
                    active.rx_buffers.rewind_position(active.rx.next_avail());
                rx.next_avail = next_avail;
                if left_behind > 0 {
                    tracing::warn!(
                        net = %self.id,
                        left_behind,
                        "RX buffers taken before a bad chain are not in the snapshot"
                    );
                }
                vec![rx, QueueState::from(&active.tx)]
            }
            None => Vec::new(),
        };
        persist::device_state(self, queues, DeviceKindState::Net {})
    }

    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), PersistError> {
        let name = format!("net {}", self.id);
        persist::restore_device(self, &name, state, mem, interrupt)
    }
}

impl RxBuffers {
    /// Whether the held chains can take any frame the tap may hand over: one chain without
    /// merging; with merging, room for the largest frame, or every buffer the ring can hold
    /// (waiting for more would never end).
    fn is_ready(&self, mergeable: bool, frame_max: usize, queue_size: usize) -> bool {
        if mergeable {
            self.capacity >= frame_max
                || self.chains.len() >= queue_size
                || self.spans.len() + MAX_RX_CHAIN_SPANS >= MAX_IOVECS
        } else {
            !self.chains.is_empty()
        }
    }

    /// Validates an RX chain and holds on to it. The chain must be device-writable only and
    /// large enough for the header.
    fn push_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        avail_pos: u16,
    ) -> Result<(), &'static str> {
        let head = chain.head_index();
        let before = self.spans.len();
        let result = (|| {
            let mut capacity = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    return Err("it has a device-readable descriptor");
                }
                let len = usize::try_from(desc.len()).map_err(|_| "length overflow")?;
                capacity = capacity.checked_add(len).ok_or("length overflow")?;
                let mut gpa = desc.addr();
                for slice in GuestMemoryBackend::get_slices(mem, gpa, len) {
                    let slice = slice.map_err(|_| "a buffer lies outside guest memory")?;
                    if self.spans.len() - before >= MAX_RX_CHAIN_SPANS {
                        return Err("it has too many pieces");
                    }
                    let host = slice.ptr_guard_mut().as_ptr().expose_provenance();
                    self.spans.push_back(GuestSpan {
                        gpa,
                        host: HostSpan {
                            addr: host,
                            len: slice.len(),
                        },
                    });
                    gpa = gpa
                        .checked_add(u64::try_from(slice.len()).map_err(|_| "length overflow")?)
                        .ok_or("a buffer wraps around the address space")?;
                }
            }
            if capacity < VNET_HDR_LEN {
                return Err("it is smaller than the virtio-net header");
            }
            Ok(capacity)
        })();
        match result {
            Ok(capacity) => {
                self.chains.push_back(RxChain {
                    head,
                    avail_pos,
                    spans: self.spans.len() - before,
                    capacity,
                });
                self.capacity += capacity;
                Ok(())
            }
            Err(reason) => {
                self.spans.truncate(before);
                Err(reason)
            }
        }
    }

    /// Where the RX queue's `next_avail` must be for the chains held here to be taken again
    /// (a snapshot does not keep them). Held chains are taken in ring order, but a bad chain
    /// in between went straight back to the used ring; rewinding past it would complete it
    /// twice, so held chains before such a gap stay with the old device (the guest has that
    /// many fewer RX buffers; only a driver posting bad chains gets there). Returns the
    /// position and the number of chains left behind.
    fn rewind_position(&self, next_avail: u16) -> (u16, usize) {
        let mut position = next_avail;
        let mut rewound = 0;
        for chain in self.chains.iter().rev() {
            if chain.avail_pos != position.wrapping_sub(1) {
                break;
            }
            position = chain.avail_pos;
            rewound += 1;
        }
        (position, self.chains.len() - rewound)
    }

    /// Forgets the `count` oldest chains (they went to the used ring).
    fn consume(&mut self, count: usize) {
        for _ in 0..count {
            let Some(chain) = self.chains.pop_front() else {
                return;
            };
            self.spans.drain(..chain.spans.min(self.spans.len()));
            self.capacity -= chain.capacity;
        }
    }
}

/// Collects the memory of a TX chain into `spans`; returns the frame length with its header.
fn gather_tx_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    spans: &mut Vec<HostSpan>,
) -> Result<usize, &'static str> {
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err("it has a device-writable descriptor");
        }
        let len = usize::try_from(desc.len()).map_err(|_| "length overflow")?;
        total = total.checked_add(len).ok_or("length overflow")?;
        if total > MAX_TX_LEN {
            return Err("the frame is longer than 64 KiB");
        }
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            let slice = slice.map_err(|_| "a buffer lies outside guest memory")?;
            if spans.len() >= MAX_IOVECS {
                return Err("it has too many pieces");
            }
            spans.push(HostSpan {
                addr: slice.ptr_guard().as_ptr().expose_provenance(),
                len: slice.len(),
            });
        }
    }
    if total < VNET_HDR_LEN + ETH_HLEN {
        return Err("it is shorter than the virtio-net and Ethernet headers");
    }
    Ok(total)
}

/// Makes a header from the tap say only what the guest negotiated: checksum flags only with
/// GUEST_CSUM, GSO types only with the matching GUEST_TSO, and `num_buffers` filled in.
fn fix_rx_header(
    header: &mut [u8; VNET_HDR_LEN],
    acked: u64,
    num_buffers: u16,
) -> Result<(), &'static str> {
    let has = |feature: u32| acked & bit(feature) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        if header[0] & HDR_F_NEEDS_CSUM != 0 {
            return Err("its checksum is incomplete and the guest does not accept that");
        }
        // The spec wants flags zero without GUEST_CSUM (no DATA_VALID either).
        header[0] = 0;
    }
    let ecn = HDR_GSO_ECN;
    let gso = header[1];
    let kind_ok = match u32::from(gso & !ecn) {
        VIRTIO_NET_HDR_GSO_NONE => gso & ecn == 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        _ => false,
    };
    if !kind_ok || (gso & ecn != 0 && !has(VIRTIO_NET_F_GUEST_ECN)) {
        return Err("it is segmentation-offloaded in a way the guest did not accept");
    }
    header[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    Ok(())
}

/// `TUN_F_*` bits matching the offloads the guest accepts on received frames. The kernel
/// takes TSO only together with checksum offload.
fn tap_offload_flags(acked: u64) -> libc::c_uint {
    let has = |feature: u32| acked & bit(feature) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// Largest frame, header included, the tap can hand over with `offloads` (`TUN_F_*`) set.
fn rx_frame_max(offloads: libc::c_uint, mtu: u16) -> usize {
    if offloads & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        MAX_RX_LEN
    } else {
        VNET_HDR_LEN + ETH_HLEN + VLAN_HLEN + usize::from(mtu)
    }
}

/// A ring whose avail index is more than a queue ahead of the device is garbage: waiting for
/// its chains would loop forever.
fn ring_is_broken(queue: &Queue, mem: &GuestMemory) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => (idx - Wrapping(queue.next_avail())).0 > queue.size(),
        Err(_) => true,
    }
}

#[derive(Debug, thiserror::Error)]
enum RingError {
    #[error("used ring address overflows")]
    Overflow,
    #[error("empty queue")]
    Empty,
    #[error(transparent)]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Puts `elems` (chain head, bytes written) in the used ring and publishes them with a single
/// index update, so the driver never sees half of a multi-buffer frame. Heads past the end of
/// the descriptor table name no chain and are left out.
fn put_used(mem: &GuestMemory, queue: &mut Queue, elems: &[(u16, u32)]) -> Result<(), RingError> {
    let size = queue.size();
    if size == 0 {
        return Err(RingError::Empty);
    }
    let ring = GuestAddress(queue.used_ring());
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in elems.iter().filter(|(head, _)| *head < size) {
        let slot = u64::from(next.0 % size);
        let addr = ring.checked_add(4 + slot * 8).ok_or(RingError::Overflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)?;
        next += 1;
    }
    let idx_addr = ring.checked_add(2).ok_or(RingError::Overflow)?;
    // Release: the elements (and the frame bytes before them) are visible before the index.
    mem.store(next.0.to_le(), idx_addr, Ordering::Release)?;
    queue.set_next_used(next.0);
    Ok(())
}

/// Whether the driver wants an interrupt for the used entries published since `start`
/// (`used_event` with EVENT_IDX, else the avail ring's NO_INTERRUPT flag).
fn needs_interrupt(mem: &GuestMemory, queue: &mut Queue, start: Wrapping<u16>) -> bool {
    let now = Wrapping(queue.next_used());
    if now == start {
        return false;
    }
    // The index update must be visible before we read what the driver asked for, or we could
    // both miss each other.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        let used_event_addr = avail.checked_add(4 + 2 * u64::from(queue.size()));
        let used_event = used_event_addr
            .and_then(|addr| mem.load::<u16>(addr, Ordering::Relaxed).ok())
            .map(u16::from_le);
        match used_event {
            Some(event) => now - Wrapping(event) - Wrapping(1) < now - start,
            None => true,
        }
    } else {
        match mem.load::<u16>(avail, Ordering::Relaxed) {
            Ok(flags) => u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT == 0,
            Err(_) => true,
        }
    }
}

fn copy_from_spans<'a>(
    mem: &GuestMemory,
    spans: impl IntoIterator<Item = &'a GuestSpan>,
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for span in spans {
        if done == out.len() {
            break;
        }
        let n = span.host.len.min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], span.gpa)?;
        done += n;
    }
    Ok(())
}

fn copy_to_spans<'a>(
    mem: &GuestMemory,
    spans: impl IntoIterator<Item = &'a GuestSpan>,
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for span in spans {
        if done == data.len() {
            break;
        }
        let n = span.host.len.min(data.len() - done);
        mem.write_slice(&data[done..done + n], span.gpa)?;
        done += n;
    }
    Ok(())
}

fn warn_guest(limit: &mut LogLimiter, id: &str, message: fmt::Arguments<'_>) {
    if limit.allow() {
        tracing::warn!(net = %id, "{message}");
    }
}
