//! Virtio devices over the MMIO transport.
//!
//! The pieces and who runs them:
//! - [`mmio::MmioTransport`] is the device's register file on the MMIO bus. vCPU threads drive
//!   it; when the driver sets DRIVER_OK it hands the device its queues through
//!   [`VirtioDevice::activate`].
//! - Each device is also an event-loop subscriber: the VMM thread waits on the device's queue
//!   eventfds (which KVM signals through ioeventfd when the guest writes QueueNotify, with no
//!   exit to user space) and on its backend (file, tap, unix sockets), and does the I/O.
//! - [`Interrupt`] is how a device tells the guest: it sets a bit in InterruptStatus and
//!   writes an irqfd that KVM turns into the device's I/O APIC line.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::MutEventSubscriber;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::memory::GuestMemory;
use persist::{PersistError, VirtioDeviceState};

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod queue;
pub mod rng;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;

/// Device ids (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Reads `data` from a device's config space at `offset`: bytes beyond the space read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(available) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = available.len().min(data.len());
    data[..n].copy_from_slice(&available[..n]);
}

/// A device type's name, for metrics and logs.
pub fn type_name(device_type: u32) -> &'static str {
    match device_type {
        TYPE_NET => "net",
        TYPE_BLOCK => "block",
        TYPE_RNG => "rng",
        TYPE_VSOCK => "vsock",
        _ => "unknown",
    }
}

/// Feature bit every modern (non-legacy) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bits of the ring layout that our queue implementation supports.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Bits of the InterruptStatus register.
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt: the InterruptStatus bits and the irqfd behind its interrupt line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd that KVM watches (registered with `KVM_IRQFD` for the device's line).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the guest that a queue's used ring has new entries.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(INTERRUPT_USED_RING)
    }

    /// Tells the guest that the device's configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.raise(INTERRUPT_CONFIG_CHANGE)
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver clears the bits it has handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restore: sets the InterruptStatus bits a snapshot saved and, if any, raises the line
    /// again, so an interrupt the guest had not handled yet is not lost.
    pub fn restore_status(&self, bits: u32) -> io::Result<()> {
        if bits == 0 {
            return Ok(());
        }
        self.raise(bits)
    }
}

/// What a device gets when the driver sets DRIVER_OK: guest memory, the queues as the driver
/// configured them (only the ones it made ready; the rest are not ready), and the interrupt.
#[derive(Debug)]
pub struct Activation {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver made {got} queues ready; the device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("device backend failed to start: {0}")]
    Backend(#[from] io::Error),
    #[error("{0}")]
    Device(String),
}

/// A virtio device as the MMIO transport and the event loop see it.
///
/// Contract:
/// - The device creates one eventfd per queue in its constructor and exposes them through
///   [`VirtioDevice::queue_events`]; the VM builder registers them with KVM as ioeventfds on
///   QueueNotify (datamatch = queue index), and the device registers them with the event loop
///   in `init`. Before activation (and after a reset) the device drains and ignores them.
/// - `activate` runs on a vCPU thread with the device lock held: it must not block. Backend fds
///   that must only be polled once active (a tap) are added to the event loop from `process`,
///   e.g. after a private activation eventfd fires.
/// - Guest-controlled values (descriptor addresses, lengths, indexes, config offsets) never
///   panic or hang the device: a bad request gets an error status or is dropped, and the device
///   carries on with the next.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// One of the `TYPE_*` ids.
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Eventfds written (by KVM) when the driver notifies each queue, in queue order.
    fn queue_events(&self) -> &[EventFd];
    /// Features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    fn acked_features(&self) -> u64;
    /// Device configuration space; out-of-range parts read as zero and writes are ignored.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// The driver wrote 0 to Status: forget the queues and the acked features.
    fn reset(&mut self);
    /// Counters for `GET /metrics` (null when the device keeps none).
    fn metrics(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The device's state for a snapshot: features, whether it is activated, its queues as it
    /// will resume them, and its device-specific part ([`persist::DeviceKindState`]).
    ///
    /// Called with the vCPUs paused, on the thread that runs the device's I/O, so nothing is in
    /// flight. Changes nothing: the device carries on afterwards. A device that holds buffers
    /// it took from an available ring but has not used yet (net RX) saves that queue's
    /// `next_avail` as if it had not taken them, so the restored device takes them again.
    fn save_state(&self) -> VirtioDeviceState;

    /// Restores [`VirtioDevice::save_state`]'s result on a freshly built device of the same
    /// configuration (host paths come from the load request, not the snapshot), before any
    /// vCPU runs; `mem` already holds the guest memory of the snapshot and `interrupt` is the
    /// transport's.
    ///
    /// The state is untrusted: it is checked against the device first (device type, features
    /// the device offers now, queue sizes, rings inside `mem`, the device-specific part), and
    /// on error the device is left as built. If the state was activated, the device is
    /// activated on the saved queues exactly as the driver's DRIVER_OK would activate it
    /// (backend polled, the queues looked at once), without the guest doing anything; a
    /// later [`VirtioDevice::kick`] makes it look again.
    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), PersistError>;

    /// Writes a layered drive's disk diff as build `build` of `store`: the blocks the guest
    /// wrote since the drive's last snapshot (or its open) become `disk-<drive>.data`, the
    /// drive's header with them remapped becomes `disk-<drive>.header`, and the drive goes on
    /// reading through that header. Called with the vCPUs paused, on the VMM thread, so
    /// nothing is in flight. Devices other than layered drives refuse.
    fn snapshot_disk(
        &mut self,
        store: &wrenn_snapshot::store::Store,
        build: wrenn_snapshot::id::BuildId,
    ) -> Result<(), String> {
        let _ = (store, build);
        Err("not a layered drive".into())
    }

    /// Makes the device look at its queues again, as if the guest had notified every one
    /// (after a resume, buffers may have been posted while the device was not looking).
    fn kick(&self) {
        for event in self.queue_events() {
            let _ = event.write(1);
        }
    }
}
