//! Device state for snapshots: the plain-data `*State` structs of the virtio devices and their
//! transport, and the checks that turn a saved state back into a running device.
//!
//! ```text
//! MmioTransportState                       one per virtio slot, in slot order
//! ├── status, feature selects, driver_features, queue_sel
//! ├── queues[i]: MmioQueueState            the queue registers as the driver wrote them
//! ├── interrupt_status                     re-raised on restore when non-zero
//! └── device: VirtioDeviceState
//!     ├── device_type, avail_features, acked_features, activated
//!     ├── queues[i]: QueueState            only when activated: rings (GPAs), sizes,
//!     │                                      next_avail / next_used, event_idx
//!     └── kind: DeviceKindState            Block { read_only, capacity_sectors } | Net {}
//!                                            | Vsock {} | Rng {}
//! ```
//!
//! The serial port's and the i8042's states ([`SerialState`], [`I8042State`]) live with those
//! devices and are re-exported here.
//!
//! What is not here, on purpose: host paths and names (a drive's file, a tap, the vsock socket
//! come from the load request), vsock connections (the guest is told they are gone), frames
//! and requests in flight (none: state is saved with the vCPUs paused, on the thread that runs
//! all device I/O), counters.
//!
//! Restore runs on devices built exactly as a boot builds them. Every saved value is
//! untrusted: a state that does not fit the device (another type, features it no longer
//! offers, a queue size that is not a power of two, rings outside guest memory) is a
//! [`PersistError`] naming the device and the field, and the device is left as it was.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{
    ActivateError, Activation, Interrupt, TYPE_BLOCK, TYPE_NET, TYPE_RNG, TYPE_VSOCK,
    VIRTIO_F_VERSION_1, VirtioDevice, type_name,
};
use crate::memory::GuestMemory;

pub use crate::devices::i8042::I8042State;
pub use crate::devices::serial::SerialState;

/// Why a saved state cannot be restored. `device` names the device ("block rootfs",
/// "net eth0", "vsock", "serial", ...); the caller adds the slot.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{device}: the snapshot holds the state of a {saved} device (type {saved_type})")]
    DeviceType {
        device: String,
        saved_type: u32,
        saved: &'static str,
    },
    #[error(
        "{device}: {field} {value:#x} has bits {missing:#x} the device does not offer now \
         (is it configured differently from when the snapshot was taken?)"
    )]
    NotOffered {
        device: String,
        field: &'static str,
        value: u64,
        missing: u64,
    },
    #[error("{device}: {field} was {saved} when the snapshot was taken, and is {now} now")]
    Changed {
        device: String,
        field: &'static str,
        saved: String,
        now: String,
    },
    #[error("{device}: {field}: {reason}")]
    Invalid {
        device: String,
        field: String,
        reason: String,
    },
    #[error("{device}: the device refused the restored queues")]
    Activate {
        device: String,
        #[source]
        source: ActivateError,
    },
    #[error("{device}: cannot raise the restored interrupt")]
    Interrupt {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("the snapshot holds {saved} virtio devices; this VM was built with {built}")]
    SlotCount { saved: usize, built: usize },
    #[error("virtio slot {slot}")]
    Slot {
        slot: usize,
        #[source]
        source: Box<PersistError>,
    },
}

impl PersistError {
    /// The same error, saying which virtio slot (MMIO slot and IRQ order) it is about.
    pub fn in_slot(self, slot: usize) -> Self {
        Self::Slot {
            slot,
            source: Box::new(self),
        }
    }

    pub(crate) fn invalid(
        device: &str,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            device: device.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// One split virtqueue as the device left it. Mirrors `virtio_queue::QueueState` (which has no
/// serde) field for field.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    /// Guest-physical addresses of the descriptor table and the two rings.
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Next available-ring entry the device will take, and next used-ring entry it will fill.
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(s: virtio_queue::QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<&QueueState> for virtio_queue::QueueState {
    fn from(s: &QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&Queue> for QueueState {
    fn from(queue: &Queue) -> Self {
        queue.state().into()
    }
}

/// What a device needs beyond the generic virtio part. Devices keep no request state across a
/// snapshot; the fields here only check that the device restored is the device saved.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DeviceKindState {
    /// The guest has read these from config space and features; they must not change.
    Block {
        read_only: bool,
        capacity_sectors: u64,
    },
    /// RX buffers the device held are given back to the ring (see `next_avail`); a frame the
    /// tap had queued stays in the tap or is lost with the old one, as on a real link.
    Net {},
    /// Connections are not saved; the guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on restore.
    Vsock {},
    Rng {},
}

impl DeviceKindState {
    /// The `TYPE_*` id of the device this part belongs to.
    pub fn device_type(&self) -> u32 {
        match self {
            Self::Block { .. } => TYPE_BLOCK,
            Self::Net {} => TYPE_NET,
            Self::Vsock {} => TYPE_VSOCK,
            Self::Rng {} => TYPE_RNG,
        }
    }
}

/// The generic virtio part of a device's state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioDeviceState {
    pub device_type: u32,
    pub avail_features: u64,
    pub acked_features: u64,
    pub activated: bool,
    /// One per device queue, in queue order, when activated; empty otherwise.
    pub queues: Vec<QueueState>,
    pub kind: DeviceKindState,
}

/// One queue's registers in the MMIO transport, as the driver wrote them (they matter again
/// only after a reset, when the driver writes them anew, but a paused driver may be halfway
/// through setting them up).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MmioQueueState {
    pub max_size: u16,
    /// As written: a value that does not fit a queue is reported at DRIVER_OK.
    pub size: u32,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// The virtio-mmio register file of one slot, and the device behind it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// What the driver accepted so far, already masked by what the device offers.
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<MmioQueueState>,
    /// InterruptStatus: bits the driver has not acknowledged yet.
    pub interrupt_status: u32,
    pub device: VirtioDeviceState,
}

/// The generic part of a device's state; `queues` are the device's queues as it will resume
/// them (empty when not activated).
pub(crate) fn device_state<D: VirtioDevice + ?Sized>(
    device: &D,
    queues: Vec<QueueState>,
    kind: DeviceKindState,
) -> VirtioDeviceState {
    let activated = device.is_activated();
    VirtioDeviceState {
        device_type: device.device_type(),
        avail_features: device.avail_features(),
        acked_features: device.acked_features(),
        activated,
        queues: if activated { queues } else { Vec::new() },
        kind,
    }
}

/// Restores the generic part on a freshly built `device` named `name`: checks `state` against
/// it, sets the acked features and, if the state was activated, activates the device on the
/// saved queues exactly as the driver's DRIVER_OK would. Nothing changes on an error, except
/// when the device itself refuses activation (then it is reset).
pub(crate) fn restore_device<D: VirtioDevice + ?Sized>(
    device: &mut D,
    name: &str,
    state: &VirtioDeviceState,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
) -> Result<(), PersistError> {
    if device.is_activated() {
        return Err(PersistError::invalid(
            name,
            "activated",
            "the device is already running; restore needs a freshly built device",
        ));
    }
    let queues = check_device_state(
        name,
        state,
        device.device_type(),
        device.avail_features(),
        device.queue_max_sizes(),
        &mem,
    )?;
    device.set_acked_features(state.acked_features);
    if let Some(queues) = queues
        && let Err(source) = device.activate(Activation {
            mem,
            queues,
            interrupt,
        })
    {
        device.reset();
        return Err(PersistError::Activate {
            device: name.to_owned(),
            source,
        });
    }
    Ok(())
}

/// Checks a saved device state against a device of `device_type` that offers `avail_features`
/// and has queues of `queue_max_sizes`; returns the queues to activate it with (`None` when the
/// state was not activated).
pub(crate) fn check_device_state(
    name: &str,
    state: &VirtioDeviceState,
    device_type: u32,
    avail_features: u64,
    queue_max_sizes: &[u16],
    mem: &GuestMemory,
) -> Result<Option<Vec<Queue>>, PersistError> {
    if state.device_type != device_type {
        return Err(PersistError::DeviceType {
            device: name.to_owned(),
            saved_type: state.device_type,
            saved: type_name(state.device_type),
        });
    }
    if state.kind.device_type() != device_type {
        return Err(PersistError::invalid(
            name,
            "kind",
            format!(
                "holds the state of a {} device",
                type_name(state.kind.device_type())
            ),
        ));
    }
    let not_offered = state.avail_features & !avail_features;
    if not_offered != 0 {
        return Err(PersistError::NotOffered {
            device: name.to_owned(),
            field: "avail_features",
            value: state.avail_features,
            missing: not_offered,
        });
    }
    let not_offered = state.acked_features & !state.avail_features;
    if not_offered != 0 {
        return Err(PersistError::NotOffered {
            device: name.to_owned(),
            field: "acked_features",
            value: state.acked_features,
            missing: not_offered,
        });
    }
    if !state.activated {
        if !state.queues.is_empty() {
            return Err(PersistError::invalid(
                name,
                "queues",
                "queues are saved for a device that was not activated",
            ));
        }
        return Ok(None);
    }
    // The transport refuses FEATURES_OK without VERSION_1, so no activated device lacks it.
    if state.acked_features & VIRTIO_F_VERSION_1 == 0 {
        return Err(PersistError::invalid(
            name,
            "acked_features",
            "an activated device always has VIRTIO_F_VERSION_1 accepted",
        ));
    }
    if state.queues.len() != queue_max_sizes.len() {
        return Err(PersistError::invalid(
            name,
            "queues",
            format!(
                "{} saved; the device has {}",
                state.queues.len(),
                queue_max_sizes.len()
            ),
        ));
    }
    state
        .queues
        .iter()
        .zip(queue_max_sizes)
        .enumerate()
        .map(|(index, (saved, &max_size))| restore_queue(name, index, saved, max_size, mem))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Builds queue `index` from its saved state, checking every field a corrupted file could get
/// wrong before virtio-queue sees it.
pub(crate) fn restore_queue(
    name: &str,
    index: usize,
    saved: &QueueState,
    max_size: u16,
    mem: &GuestMemory,
) -> Result<Queue, PersistError> {
    let field = |f: &str| format!("queues[{index}].{f}");
    if saved.max_size != max_size {
        return Err(PersistError::invalid(
            name,
            field("max_size"),
            format!(
                "{} saved; the device's queue holds {max_size}",
                saved.max_size
            ),
        ));
    }
    if saved.size == 0 || !saved.size.is_power_of_two() || saved.size > max_size {
        return Err(PersistError::invalid(
            name,
            field("size"),
            format!(
                "{} is not a power of two no larger than {max_size}",
                saved.size
            ),
        ));
    }
    // Alignments of the split ring parts (virtio 1.2 §2.7).
    for (what, addr, align) in [
        ("desc_table", saved.desc_table, 16),
        ("avail_ring", saved.avail_ring, 2),
        ("used_ring", saved.used_ring, 4),
    ] {
        if addr % align != 0 {
            return Err(PersistError::invalid(
                name,
                field(what),
                format!("{addr:#x} is not {align}-byte aligned"),
            ));
        }
    }
    let queue = Queue::try_from(virtio_queue::QueueState::from(saved))
        .map_err(|e| PersistError::invalid(name, format!("queues[{index}]"), e.to_string()))?;
    if saved.ready && !queue.is_valid(mem) {
        return Err(PersistError::invalid(
            name,
            format!("queues[{index}]"),
            format!(
                "rings at {:#x}/{:#x}/{:#x} for {} entries are not inside guest memory",
                saved.desc_table, saved.avail_ring, saved.used_ring, saved.size
            ),
        ));
    }
    Ok(queue)
}

/// Helpers for the snapshot tests of the devices.
#[cfg(test)]
pub(crate) mod testing {
    use vm_memory::bitmap::Bitmap as _;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

    use proptest::prelude::*;
    use virtio_queue::Queue;
    use virtio_queue::mock::MockSplitQueue;

    use super::{DeviceKindState, QueueState, VirtioDeviceState};
    use crate::memory::GuestMemory;
    use crate::virtio::{TYPE_BLOCK, TYPE_RNG, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

    const RNG_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

    /// Copies every byte of `src` into `dst` (same layout) and leaves `dst` with a clean dirty
    /// bitmap: what a restore does with a memory file. Build the driver's view of `dst` (mock
    /// rings, which zero their indexes) before the copy.
    pub fn copy_guest_memory(src: &GuestMemory, dst: &GuestMemory) {
        for region in src.iter() {
            let len = usize::try_from(region.len()).unwrap();
            let mut bytes = vec![0u8; len];
            src.read_slice(&mut bytes, region.start_addr()).unwrap();
            dst.write_slice(&bytes, region.start_addr()).unwrap();
        }
        clear_dirty(dst);
    }

    /// The queue a transport hands a device at DRIVER_OK: the device's largest size
    /// `max_size`, and the size and rings the driver set up in `vq` (its used ring apart, as
    /// [`crate::virtio::testing::device_queue`] does).
    pub fn transport_queue(vq: &MockSplitQueue<GuestMemory>, max_size: u16) -> Queue {
        let mut state = crate::virtio::testing::device_queue(vq).state();
        state.max_size = max_size;
        Queue::try_from(state).unwrap()
    }

    /// Forgets every write recorded in the dirty bitmap.
    pub fn clear_dirty(mem: &GuestMemory) {
        for region in mem.iter() {
            let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
            mapping.bitmap().reset();
        }
    }

    /// Whether the page holding `addr` is marked dirty.
    pub fn is_dirty(mem: &GuestMemory, addr: u64) -> bool {
        let (region, offset) = mem.to_region_addr(GuestAddress(addr)).unwrap();
        region.bitmap().dirty_at(usize::try_from(offset.0).unwrap())
    }

    pub fn arb_queue_state() -> impl Strategy<Value = QueueState> {
        (
            prop_oneof![Just(crate::virtio::rng::QUEUE_SIZE), any::<u16>()],
            prop_oneof![Just(16u16), Just(256), any::<u16>()],
            any::<bool>(),
            prop_oneof![0u64..0x2_0000, any::<u64>()],
            prop_oneof![0u64..0x2_0000, any::<u64>()],
            prop_oneof![0u64..0x2_0000, any::<u64>()],
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
        )
            .prop_map(
                |(max_size, size, ready, desc, avail, used, next_avail, next_used, event_idx)| {
                    QueueState {
                        max_size,
                        size,
                        ready,
                        desc_table: desc,
                        avail_ring: avail,
                        used_ring: used,
                        next_avail,
                        next_used,
                        event_idx_enabled: event_idx,
                    }
                },
            )
    }

    pub fn arb_kind() -> impl Strategy<Value = DeviceKindState> {
        prop_oneof![
            (any::<bool>(), any::<u64>()).prop_map(|(read_only, capacity_sectors)| {
                DeviceKindState::Block {
                    read_only,
                    capacity_sectors,
                }
            }),
            Just(DeviceKindState::Net {}),
            Just(DeviceKindState::Vsock {}),
            Just(DeviceKindState::Rng {}),
        ]
    }

    pub fn arb_device_state() -> impl Strategy<Value = VirtioDeviceState> {
        (
            prop_oneof![Just(TYPE_RNG), Just(TYPE_BLOCK), any::<u32>()],
            prop_oneof![Just(RNG_FEATURES), any::<u64>()],
            prop_oneof![Just(RNG_FEATURES), Just(VIRTIO_F_VERSION_1), any::<u64>()],
            any::<bool>(),
            proptest::collection::vec(arb_queue_state(), 0..3),
            arb_kind(),
        )
            .prop_map(|(device_type, avail, acked, activated, queues, kind)| {
                VirtioDeviceState {
                    device_type,
                    avail_features: avail,
                    acked_features: acked,
                    activated,
                    queues,
                    kind,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::virtio::VIRTIO_RING_F_EVENT_IDX;
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{desc, device_queue};

    use proptest::prelude::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap()
    }

    const RNG_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

    /// The state of an activated rng whose queue is `vq`'s (used ring kept apart).
    fn rng_state(vq: &MockSplitQueue<GuestMemory>) -> VirtioDeviceState {
        let mut queue = transport_queue(vq, crate::virtio::rng::QUEUE_SIZE);
        queue.set_event_idx(true);
        VirtioDeviceState {
            device_type: TYPE_RNG,
            avail_features: RNG_FEATURES,
            acked_features: RNG_FEATURES,
            activated: true,
            queues: vec![QueueState::from(&queue)],
            kind: DeviceKindState::Rng {},
        }
    }

    fn restore_rng(state: &VirtioDeviceState, mem: &GuestMemory) -> Result<Rng, PersistError> {
        let mut rng = Rng::new().unwrap();
        rng.restore_state(state, mem.clone(), Arc::new(Interrupt::new().unwrap()))?;
        Ok(rng)
    }

    fn invalid_field(err: PersistError) -> String {
        match err {
            PersistError::Invalid { field, .. } => field,
            other => panic!("not an Invalid error: {other:?}"),
        }
    }

    #[test]
    fn test_queue_state_round_trips_through_virtio_queue_state() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue = device_queue(&vq);
        queue.set_next_avail(7);
        queue.set_next_used(5);
        queue.set_event_idx(true);
        let saved = QueueState::from(&queue);
        assert_eq!((saved.next_avail, saved.next_used), (7, 5));
        assert!(saved.event_idx_enabled && saved.ready);
        let back = Queue::try_from(virtio_queue::QueueState::from(&saved)).unwrap();
        assert_eq!(back.state(), queue.state());
    }

    #[test]
    fn test_device_state_json_round_trip_is_lossless() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        state.queues[0].next_avail = u16::MAX;
        state.avail_features = u64::MAX;
        let json = serde_json::to_string(&state).unwrap();
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let block = DeviceKindState::Block {
            read_only: true,
            capacity_sectors: u64::MAX,
        };
        let json = serde_json::to_string(&block).unwrap();
        assert_eq!(
            serde_json::from_str::<DeviceKindState>(&json).unwrap(),
            block
        );
    }

    #[test]
    fn test_restore_valid_state_activates_with_saved_indexes() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        state.queues[0].next_avail = 3;
        state.queues[0].next_used = 3;
        let rng = restore_rng(&state, &mem).unwrap();
        assert!(rng.is_activated());
        assert_eq!(rng.acked_features(), RNG_FEATURES);
        assert_eq!(rng.save_state(), state);
    }

    #[test]
    fn test_restore_inactive_state_leaves_device_inactive() {
        let state = VirtioDeviceState {
            device_type: TYPE_RNG,
            avail_features: RNG_FEATURES,
            acked_features: 0,
            activated: false,
            queues: Vec::new(),
            kind: DeviceKindState::Rng {},
        };
        let rng = restore_rng(&state, &memory()).unwrap();
        assert!(!rng.is_activated());
        assert_eq!(rng.save_state(), state);
    }

    #[test]
    fn test_restore_wrong_device_type_is_an_error() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        state.device_type = TYPE_BLOCK;
        let err = restore_rng(&state, &mem).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::DeviceType {
                    saved_type: TYPE_BLOCK,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("block"), "{err}");

        let mut state = rng_state(&vq);
        state.kind = DeviceKindState::Vsock {};
        assert_eq!(
            invalid_field(restore_rng(&state, &mem).unwrap_err()),
            "kind"
        );
    }

    #[test]
    fn test_restore_feature_not_offered_is_an_error() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        state.avail_features |= 1 << 5;
        state.acked_features |= 1 << 5;
        let err = restore_rng(&state, &mem).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::NotOffered {
                    field: "avail_features",
                    missing: 0x20,
                    ..
                }
            ),
            "{err:?}"
        );

        // Accepted but never offered: a corrupted file.
        let mut state = rng_state(&vq);
        state.avail_features = VIRTIO_F_VERSION_1;
        let err = restore_rng(&state, &mem).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::NotOffered {
                    field: "acked_features",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn test_restore_queue_size_not_power_of_two_is_an_error() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        for size in [0, 12, 512] {
            let mut state = rng_state(&vq);
            state.queues[0].size = size;
            let err = restore_rng(&state, &mem).unwrap_err();
            assert!(err.to_string().contains(&size.to_string()), "{err}");
            assert_eq!(invalid_field(err), "queues[0].size");
        }
        let mut state = rng_state(&vq);
        state.queues[0].max_size = 128;
        assert_eq!(
            invalid_field(restore_rng(&state, &mem).unwrap_err()),
            "queues[0].max_size"
        );
    }

    #[test]
    fn test_restore_ring_outside_memory_is_an_error() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        state.queues[0].used_ring = 0x10_0000_0000;
        let err = restore_rng(&state, &mem).unwrap_err();
        assert!(err.to_string().contains("not inside guest memory"), "{err}");
        assert_eq!(invalid_field(err), "queues[0]");
        // Straddling the end of memory is outside too.
        let mut state = rng_state(&vq);
        state.queues[0].desc_table = 0x2_0000 - 0x80;
        assert_eq!(
            invalid_field(restore_rng(&state, &mem).unwrap_err()),
            "queues[0]"
        );
    }

    #[test]
    fn test_restore_misaligned_ring_is_an_error() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        state.queues[0].desc_table += 8;
        assert_eq!(
            invalid_field(restore_rng(&state, &mem).unwrap_err()),
            "queues[0].desc_table"
        );
    }

    #[test]
    fn test_restore_inconsistent_queues_are_errors() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        state.queues.push(state.queues[0].clone());
        assert_eq!(
            invalid_field(restore_rng(&state, &mem).unwrap_err()),
            "queues"
        );
        let mut state = rng_state(&vq);
        state.activated = false;
        assert_eq!(
            invalid_field(restore_rng(&state, &mem).unwrap_err()),
            "queues"
        );
        let mut state = rng_state(&vq);
        state.acked_features = VIRTIO_RING_F_EVENT_IDX;
        assert_eq!(
            invalid_field(restore_rng(&state, &mem).unwrap_err()),
            "acked_features"
        );
    }

    #[test]
    fn test_restore_refused_by_device_resets_it() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut state = rng_state(&vq);
        // Valid for the queue, but the rng needs its one queue ready.
        state.queues[0].ready = false;
        let mut rng = Rng::new().unwrap();
        let err = rng
            .restore_state(&state, mem.clone(), Arc::new(Interrupt::new().unwrap()))
            .unwrap_err();
        assert!(matches!(err, PersistError::Activate { .. }), "{err:?}");
        assert!(!rng.is_activated());
        assert_eq!(rng.acked_features(), 0);
    }

    #[test]
    fn test_restore_onto_running_device_is_refused() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let state = rng_state(&vq);
        let mut rng = restore_rng(&state, &mem).unwrap();
        let err = rng
            .restore_state(&state, mem.clone(), Arc::new(Interrupt::new().unwrap()))
            .unwrap_err();
        assert_eq!(invalid_field(err), "activated");
    }

    #[test]
    fn test_error_in_slot_names_the_slot_and_keeps_the_cause() {
        let err = PersistError::invalid("rng", "queues", "bad").in_slot(3);
        assert_eq!(err.to_string(), "virtio slot 3");
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(cause, "rng: queues: bad");
    }

    #[test]
    fn test_copy_guest_memory_copies_bytes_and_clears_dirty_pages() {
        let a = memory();
        let b = memory();
        a.write_slice(b"snapshot", GuestAddress(0x1_2345)).unwrap();
        b.write_obj(1u8, GuestAddress(0x100)).unwrap();
        assert!(is_dirty(&b, 0x100));
        copy_guest_memory(&a, &b);
        let mut got = [0u8; 8];
        b.read_slice(&mut got, GuestAddress(0x1_2345)).unwrap();
        assert_eq!(&got, b"snapshot");
        assert!(!is_dirty(&b, 0x100));
        assert!(!is_dirty(&b, 0x1_2345));
        assert!(is_dirty(&a, 0x1_2345));
    }

    proptest! {
        /// Random saved states never panic; a state that is accepted gives a device that is
        /// activated exactly when the state says so, and that serves its queue without panic.
        #[test]
        fn test_restore_random_device_state_never_panics(state in arb_device_state()) {
            let mem = memory();
            let mut rng = Rng::new().unwrap();
            let result = rng.restore_state(&state, mem.clone(), Arc::new(Interrupt::new().unwrap()));
            match result {
                Ok(()) => {
                    prop_assert_eq!(rng.is_activated(), state.activated);
                    prop_assert_eq!(rng.acked_features(), state.acked_features);
                    rng.process_queue();
                }
                Err(e) => {
                    prop_assert!(!rng.is_activated(), "{e}");
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    #[test]
    fn test_restored_device_serves_chains_posted_before_the_snapshot() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x8000, 32, 2, 0)], 0).unwrap();
        let state = rng_state(&vq);
        let mut rng = restore_rng(&state, &mem).unwrap();
        rng.process_queue();
        assert_eq!(crate::virtio::testing::used(&mem, 0), (0, 32));
    }
}
