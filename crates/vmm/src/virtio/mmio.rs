//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register file through which a
//! driver finds a device, negotiates features, describes its queues and starts it.
//!
//! ```text
//! offset  register             access  what we do
//! 0x000   MagicValue           R       "virt"
//! 0x004   Version              R       2: modern only, none of the legacy (v1) registers
//! 0x008   DeviceID             R       the device's TYPE_* id
//! 0x00c   VendorID             R       0
//! 0x010   DeviceFeatures       R       32 feature bits, bank chosen by DeviceFeaturesSel
//! 0x014   DeviceFeaturesSel    W
//! 0x020   DriverFeatures       W       kept only where the device offers the bit
//! 0x024   DriverFeaturesSel    W
//! 0x030   QueueSel             W
//! 0x034   QueueNumMax          R       0 for a queue the device does not have
//! 0x038   QueueNum             W
//! 0x044   QueueReady           RW
//! 0x050   QueueNotify          W       normally a KVM ioeventfd; if it gets here we do its job
//! 0x060   InterruptStatus      R       no device lock: the guest's IRQ handler must not wait
//! 0x064   InterruptACK         W         for I/O the event loop is doing
//! 0x070   Status               RW      the state machine below; 0 resets
//! 0x080   QueueDescLow/High    W       descriptor table
//! 0x090   QueueDriverLow/High  W       available ring
//! 0x0a0   QueueDeviceLow/High  W       used ring
//! 0x0ac   SHMSel               W       no shared memory regions: SHMLen/SHMBase read all ones
//! 0x0fc   ConfigGeneration     R       0: no device here changes its config on its own
//! 0x100-  config space         RW      any width, forwarded to the device
//! ```
//!
//! Status walks `0 → ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK`, one stage at a time (a write
//! may take several stages at once, in order). FEATURES_OK is refused unless the driver accepted
//! VIRTIO_F_VERSION_1; features are written only between DRIVER and FEATURES_OK, and queues only
//! between FEATURES_OK and DRIVER_OK. At DRIVER_OK the transport turns the queue registers into
//! [`virtio_queue::Queue`]s, checks each ready one against guest memory and calls
//! [`VirtioDevice::activate`]; if anything is wrong the device is not activated, Status gets
//! DEVICE_NEEDS_RESET and the guest gets a configuration-change interrupt (§2.1.2). FAILED from
//! the driver is recorded and nothing else happens until it writes 0.
//!
//! 32-bit registers take only 4-byte accesses; other widths read as zero and write nothing.
//!
//! Snapshots: [`MmioTransport::save_state`] keeps the registers as the driver left them,
//! InterruptStatus and the device's state; [`MmioTransport::restore_state`] puts them back on a
//! freshly built transport, refusing anything register writes could not have produced, and
//! raises the interrupt line again when InterruptStatus had bits the guest had not handled.

use std::io;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::persist::{MmioQueueState, MmioTransportState, PersistError};
use super::{
    ActivateError, Activation, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING, Interrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, type_name,
};
use crate::devices::bus::{BusDevice, lock};
use crate::diag::{LogLimiter, error_chain};
use crate::memory::GuestMemory;

/// "virt" read as a little-endian u32.
const MAGIC_VALUE: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// Register offsets (virtio 1.2 §4.2.2).
pub(crate) mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// The initialisation stages in the order a driver must set them.
const STATUS_STAGES: [u32; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    STATUS_DRIVER_OK,
];

/// Why a DRIVER_OK did not start the device.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("queue {queue}: the device's largest size {max} is not a usable queue size")]
    MaxSize {
        queue: usize,
        max: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: size {size} is not a power of two no larger than {max}")]
    QueueSize { queue: usize, size: u32, max: u16 },
    #[error("queue {queue}: ring address is misaligned")]
    QueueAlignment {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: rings are not inside guest memory")]
    QueueMemory { queue: usize },
    #[error("device refused activation")]
    Activate(#[from] ActivateError),
}

/// What the driver wrote for one queue.
#[derive(Debug, Clone, Copy)]
struct QueueRegisters {
    max_size: u16,
    /// Kept as written: a value that does not fit a queue is reported at DRIVER_OK.
    size: u32,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            // A driver that never writes QueueNum gets the largest queue, as with virtio-queue.
            size: u32::from(max_size),
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    fn save(&self) -> MmioQueueState {
        MmioQueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }

    /// The queue as the device will see it; ready queues are checked against `mem`.
    fn build(&self, index: usize, event_idx: bool, mem: &GuestMemory) -> Result<Queue, MmioError> {
        let mut queue = Queue::new(self.max_size).map_err(|source| MmioError::MaxSize {
            queue: index,
            max: self.max_size,
            source,
        })?;
        if !self.ready {
            return Ok(queue);
        }
        let size_ok = u16::try_from(self.size).is_ok_and(|size| queue.try_set_size(size).is_ok());
        if !size_ok {
            return Err(MmioError::QueueSize {
                queue: index,
                size: self.size,
                max: self.max_size,
            });
        }
        let alignment = |source| MmioError::QueueAlignment {
            queue: index,
            source,
        };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(alignment)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(alignment)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(alignment)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(MmioError::QueueMemory { queue: index });
        }
        Ok(queue)
    }
}

/// Replaces the low or high half of a 64-bit register.
fn set_half(register: &mut u64, high: bool, value: u32) {
    let value = u64::from(value);
    *register = if high {
        (*register & 0xffff_ffff) | (value << 32)
    } else {
        (*register & !0xffff_ffff) | value
    };
}

/// The virtio-mmio register file of one device. It sits on the MMIO bus; vCPU threads call it.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    /// Copied from the device once: they never change, and reading them needs no device lock.
    device_type: u32,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// What the driver accepted so far, already masked by what the device offers.
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
    log_limit: LogLimiter,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, with a fresh [`Interrupt`] whose irqfd the VMM registers with
    /// KVM for the slot's interrupt line.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemory) -> io::Result<Self> {
        let (device_type, queues, queue_events) = {
            let dev = lock(&device);
            let queues: Vec<_> = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| QueueRegisters::new(max))
                .collect();
            let events = dev
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<io::Result<Vec<_>>>()?;
            (dev.device_type(), queues, events)
        };
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new()?),
            device_type,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            log_limit: LogLimiter::default(),
        })
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The registers, InterruptStatus and (under its lock) the device's state, for a snapshot.
    /// Called with the vCPUs paused, so no register access is in flight.
    pub fn save_state(&self) -> MmioTransportState {
        MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(QueueRegisters::save).collect(),
            interrupt_status: self.interrupt.status(),
            device: lock(&self.device).save_state(),
        }
    }

    /// Restores a saved transport onto this freshly built one (same slot, same kind of
    /// device): checks the registers, restores the device (see
    /// [`VirtioDevice::restore_state`]), then the registers, then InterruptStatus, raising the
    /// interrupt line again if a bit was pending. On error nothing of the transport changed.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), PersistError> {
        self.check_state(state)?;
        lock(&self.device).restore_state(
            &state.device,
            self.mem.clone(),
            self.interrupt.clone(),
        )?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        for (regs, saved) in self.queues.iter_mut().zip(&state.queues) {
            *regs = QueueRegisters {
                max_size: regs.max_size,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            };
        }
        // OR-ed in: the device may have raised bits of its own while being restored.
        self.interrupt
            .restore_status(state.interrupt_status)
            .map_err(|source| PersistError::Interrupt {
                device: self.name(),
                source,
            })?;
        debug!(
            device_type = self.device_type,
            status = self.status,
            "virtio-mmio transport restored"
        );
        Ok(())
    }

    fn name(&self) -> String {
        format!("virtio-mmio {}", type_name(self.device_type))
    }

    /// The transport-level checks: everything a register write could not have produced is
    /// refused, as is a state that does not go with the device behind it.
    fn check_state(&self, state: &MmioTransportState) -> Result<(), PersistError> {
        let name = self.name();
        let invalid = |field: &str, reason: String| PersistError::invalid(&name, field, reason);
        if self.status != 0 {
            return Err(invalid(
                "status",
                format!(
                    "this transport is in use (status {:#x}); restore needs a fresh one",
                    self.status
                ),
            ));
        }
        if state.device.device_type != self.device_type {
            return Err(PersistError::DeviceType {
                device: name,
                saved_type: state.device.device_type,
                saved: type_name(state.device.device_type),
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(invalid(
                "queues",
                format!(
                    "{} saved; the device has {}",
                    state.queues.len(),
                    self.queues.len()
                ),
            ));
        }
        for (index, (saved, regs)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != regs.max_size {
                return Err(invalid(
                    &format!("queues[{index}].max_size"),
                    format!(
                        "{} saved; the device's queue holds {}",
                        saved.max_size, regs.max_size
                    ),
                ));
            }
        }
        let status = state.status;
        let known = STATUS_STAGES.iter().fold(0, |acc, bit| acc | bit)
            | STATUS_DEVICE_NEEDS_RESET
            | STATUS_FAILED;
        if status & !known != 0 {
            return Err(invalid(
                "status",
                format!("{status:#x} has bits no driver can set"),
            ));
        }
        // Stages are set in order: the ones present form a prefix.
        let mut before = true;
        for stage in STATUS_STAGES {
            let set = status & stage != 0;
            if set && !before {
                return Err(invalid(
                    "status",
                    format!("{status:#x} skips an initialisation stage"),
                ));
            }
            before = set;
        }
        if status & STATUS_DEVICE_NEEDS_RESET != 0 && status & STATUS_DRIVER_OK == 0 {
            return Err(invalid(
                "status",
                format!("{status:#x}: DEVICE_NEEDS_RESET is only set at DRIVER_OK"),
            ));
        }
        let offered = lock(&self.device).avail_features();
        let not_offered = state.driver_features & !offered;
        if not_offered != 0 {
            return Err(PersistError::NotOffered {
                device: name,
                field: "driver_features",
                value: state.driver_features,
                missing: not_offered,
            });
        }
        if status & STATUS_FEATURES_OK != 0 && state.driver_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(invalid(
                "driver_features",
                "FEATURES_OK is set without VIRTIO_F_VERSION_1".into(),
            ));
        }
        // The device's acked features are the driver's, from FEATURES_OK on.
        let acked = if status & STATUS_FEATURES_OK != 0 {
            state.driver_features
        } else {
            0
        };
        if state.device.acked_features != acked {
            return Err(invalid(
                "device.acked_features",
                format!(
                    "{:#x} does not match what the driver accepted ({acked:#x})",
                    state.device.acked_features
                ),
            ));
        }
        let runs = status & STATUS_DRIVER_OK != 0 && status & STATUS_DEVICE_NEEDS_RESET == 0;
        if state.device.activated != runs {
            return Err(invalid(
                "device.activated",
                format!(
                    "{} does not go with status {status:#x}",
                    state.device.activated
                ),
            ));
        }
        let interrupt_bits = INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE;
        if state.interrupt_status & !interrupt_bits != 0 {
            return Err(invalid(
                "interrupt_status",
                format!("{:#x} has bits no device raises", state.interrupt_status),
            ));
        }
        Ok(())
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let offered = lock(&self.device).avail_features();
                feature_bank(offered, self.device_features_sel)
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => 0,
            _ => {
                if self.log_limit.allow() {
                    debug!(
                        device_type = self.device_type,
                        offset, "read of a write-only or unknown virtio-mmio register"
                    );
                }
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.write_queue(|q| q.size = value),
            reg::QUEUE_READY => self.write_queue(|q| q.ready = value == 1),
            reg::QUEUE_DESC_LOW => self.write_queue(|q| set_half(&mut q.desc_table, false, value)),
            reg::QUEUE_DESC_HIGH => self.write_queue(|q| set_half(&mut q.desc_table, true, value)),
            reg::QUEUE_DRIVER_LOW => {
                self.write_queue(|q| set_half(&mut q.avail_ring, false, value))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.write_queue(|q| set_half(&mut q.avail_ring, true, value))
            }
            reg::QUEUE_DEVICE_LOW => self.write_queue(|q| set_half(&mut q.used_ring, false, value)),
            reg::QUEUE_DEVICE_HIGH => self.write_queue(|q| set_half(&mut q.used_ring, true, value)),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            // No shared memory regions, so nothing to select.
            reg::SHM_SEL => {}
            _ => {
                if self.log_limit.allow() {
                    warn!(
                        device_type = self.device_type,
                        offset, value, "write to a read-only or unknown virtio-mmio register"
                    );
                }
            }
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// Applies a queue register write, if queues may be configured now (after FEATURES_OK,
    /// before DRIVER_OK) and QueueSel names one of the device's queues.
    fn write_queue(&mut self, apply: impl FnOnce(&mut QueueRegisters)) {
        let setup_phase = self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0;
        let queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i));
        match queue {
            Some(queue) if setup_phase => apply(queue),
            _ => {
                if self.log_limit.allow() {
                    warn!(
                        device_type = self.device_type,
                        status = self.status,
                        queue = self.queue_sel,
                        "queue register write outside queue setup or to a missing queue; ignored"
                    );
                }
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & STATUS_DRIVER != 0
            && self.status & (STATUS_FEATURES_OK | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0;
        if !negotiating {
            if self.log_limit.allow() {
                warn!(
                    device_type = self.device_type,
                    status = self.status,
                    "DriverFeatures written outside feature negotiation; ignored"
                );
            }
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            // The device offers nothing in higher banks, so nothing there can be accepted.
            _ => return,
        };
        let offered = lock(&self.device).avail_features();
        let bank_mask = 0xffff_ffff_u64 << shift;
        let accepted = (u64::from(value) << shift) & offered;
        self.driver_features = (self.driver_features & !bank_mask) | accepted;
    }

    fn notify(&mut self, value: u32) {
        let event = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_events.get(i));
        match event {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    warn!(
                        device_type = self.device_type,
                        queue = value,
                        "cannot notify queue: {e}"
                    );
                }
            }
            None => {
                if self.log_limit.allow() {
                    warn!(
                        device_type = self.device_type,
                        queue = value,
                        "QueueNotify for a queue the device does not have"
                    );
                }
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            self.refuse_status(value, "bits can only be cleared by writing 0");
            return;
        }
        let added = value & !old;
        if added & STATUS_FAILED != 0 {
            // The driver gave up on the device; it will write 0 before trying again.
            if self.log_limit.allow() {
                info!(
                    device_type = self.device_type,
                    status = old,
                    "driver marked the device FAILED"
                );
            }
            self.status |= STATUS_FAILED;
            return;
        }
        let stage_bits = STATUS_STAGES.iter().fold(0, |acc, bit| acc | bit);
        if added & !stage_bits != 0 {
            self.refuse_status(value, "the driver may not set these bits");
            return;
        }
        // Check the whole write before applying any of it, so a refused write changes nothing.
        let mut reached = old;
        let mut before_stage = 0;
        for stage in STATUS_STAGES {
            if added & stage != 0 {
                if reached != before_stage {
                    self.refuse_status(value, "stages must be set in order");
                    return;
                }
                reached |= stage;
            }
            before_stage |= stage;
        }
        if added & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            self.refuse_status(
                value,
                "FEATURES_OK without VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
            );
            return;
        }
        for stage in STATUS_STAGES {
            if added & stage != 0 {
                self.enter_stage(stage);
            }
        }
    }

    /// Sets one status stage the write has been checked to allow.
    fn enter_stage(&mut self, stage: u32) {
        self.status |= stage;
        match stage {
            STATUS_FEATURES_OK => lock(&self.device).set_acked_features(self.driver_features),
            STATUS_DRIVER_OK => {
                if let Err(e) = self.activate() {
                    if self.log_limit.allow() {
                        warn!(
                            device_type = self.device_type,
                            "device not started: {}",
                            error_chain(&e)
                        );
                    }
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    if let Err(e) = self.interrupt.signal_config_change() {
                        warn!(
                            device_type = self.device_type,
                            "cannot raise interrupt: {e}"
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn refuse_status(&mut self, value: u32, why: &str) {
        if self.log_limit.allow() {
            warn!(
                device_type = self.device_type,
                status = self.status,
                value,
                "status write refused: {why}"
            );
        }
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, regs)| regs.build(i, event_idx, &self.mem))
            .collect::<Result<Vec<_>, _>>()?;
        lock(&self.device).activate(Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
        })?;
        // Rate-limited too: a guest can reset and restart a device in a loop.
        if self.log_limit.allow() {
            info!(
                device_type = self.device_type,
                features = self.driver_features,
                "virtio device activated"
            );
        }
        Ok(())
    }

    /// Status 0: the device forgets its queues and features, the transport its registers.
    fn reset(&mut self) {
        lock(&self.device).reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueRegisters::new(queue.max_size);
        }
        self.interrupt.ack(u32::MAX);
        debug!(device_type = self.device_type, "virtio device reset");
    }
}

/// The 32 feature bits of bank `sel`.
fn feature_bank(features: u64, sel: u32) -> u32 {
    let bank = match sel {
        0 => features,
        1 => features >> 32,
        _ => 0,
    };
    u32::try_from(bank & 0xffff_ffff).unwrap_or(0)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) => *word = self.read_register(offset).to_le_bytes(),
            Err(_) => {
                data.fill(0);
                if self.log_limit.allow() {
                    debug!(
                        device_type = self.device_type,
                        offset,
                        len = data.len(),
                        "virtio-mmio register read that is not 4 bytes"
                    );
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) => self.write_register(offset, u32::from_le_bytes(word)),
            Err(_) => {
                if self.log_limit.allow() {
                    warn!(
                        device_type = self.device_type,
                        offset,
                        len = data.len(),
                        "virtio-mmio register write that is not 4 bytes; ignored"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::{MAX_SERVE_ROUNDS, serve_queue};

    use crate::virtio::persist::testing::{arb_device_state, copy_guest_memory};
    use crate::virtio::persist::{DeviceKindState, QueueState, VirtioDeviceState};
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{USED_RING, desc, used, used_idx};

    use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
    use proptest::prelude::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A device that records what the transport does to it.
    struct FakeDevice {
        max_sizes: Vec<u16>,
        events: Vec<EventFd>,
        offered: u64,
        acked: u64,
        config: [u8; 8],
        activations: Vec<Vec<Queue>>,
        resets: u32,
        refuse_activation: bool,
        active: bool,
    }

    impl FakeDevice {
        const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b101;

        fn new(max_sizes: &[u16]) -> Self {
            Self {
                max_sizes: max_sizes.to_vec(),
                events: max_sizes
                    .iter()
                    .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                    .collect(),
                offered: Self::OFFERED,
                acked: 0,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                activations: Vec::new(),
                resets: 0,
                refuse_activation: false,
                active: false,
            }
        }
    }

    impl MutEventSubscriber for FakeDevice {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
        fn init(&mut self, _ops: &mut EventOps) {}
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            super::super::TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn avail_features(&self) -> u64 {
            self.offered
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(0);
            let Ok(start) = usize::try_from(offset) else {
                return;
            };
            for (i, byte) in data.iter_mut().enumerate() {
                if let Some(v) = self.config.get(start + i) {
                    *byte = *v;
                }
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Ok(start) = usize::try_from(offset) {
                for (i, v) in data.iter().enumerate() {
                    if let Some(byte) = self.config.get_mut(start + i) {
                        *byte = *v;
                    }
                }
            }
        }
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            if self.refuse_activation {
                return Err(ActivateError::Device("refused by the test".into()));
            }
            self.activations.push(activation.queues);
            self.active = true;
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.active = false;
            self.acked = 0;
        }
        fn save_state(&self) -> VirtioDeviceState {
            let queues = self
                .activations
                .last()
                .map(|queues| queues.iter().map(QueueState::from).collect())
                .unwrap_or_default();
            crate::virtio::persist::device_state(self, queues, FAKE_KIND)
        }
        fn restore_state(
            &mut self,
            state: &VirtioDeviceState,
            mem: GuestMemory,
            interrupt: Arc<Interrupt>,
        ) -> Result<(), PersistError> {
            crate::virtio::persist::restore_device(self, "fake", state, mem, interrupt)
        }
    }

    const FAKE_KIND: DeviceKindState = DeviceKindState::Block {
        read_only: false,
        capacity_sectors: 0,
    };

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn transport(max_sizes: &[u16]) -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        let dev = Arc::new(Mutex::new(FakeDevice::new(max_sizes)));
        let t = MmioTransport::new(dev.clone(), memory()).unwrap();
        (t, dev)
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0xaa; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// (low, high) 32-bit halves, as a driver writes a 64-bit value.
    fn halves(v: u64) -> (u32, u32) {
        let [a, b, c, d, e, f, g, h] = v.to_le_bytes();
        (
            u32::from_le_bytes([a, b, c, d]),
            u32::from_le_bytes([e, f, g, h]),
        )
    }

    /// What Linux's virtio_mmio + virtio core do up to FEATURES_OK; returns the status read back.
    fn negotiate(t: &mut MmioTransport, wanted: u64) -> u32 {
        assert_eq!(rd(t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(t, reg::VERSION), 2);
        assert_ne!(rd(t, reg::DEVICE_ID), 0);
        wr(t, reg::STATUS, 0);
        wr(t, reg::STATUS, STATUS_ACKNOWLEDGE);
        let s = rd(t, reg::STATUS);
        wr(t, reg::STATUS, s | STATUS_DRIVER);
        wr(t, reg::DEVICE_FEATURES_SEL, 1);
        let high = u64::from(rd(t, reg::DEVICE_FEATURES));
        wr(t, reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(rd(t, reg::DEVICE_FEATURES));
        let accepted = ((high << 32) | low) & wanted;
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        let (low, high) = halves(accepted);
        wr(t, reg::DRIVER_FEATURES, high);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, low);
        let s = rd(t, reg::STATUS);
        wr(t, reg::STATUS, s | STATUS_FEATURES_OK);
        rd(t, reg::STATUS)
    }

    /// vm_setup_vq for queue `index` with the rings of `vq`.
    fn setup_queue(t: &mut MmioTransport, index: u32, vq: &MockSplitQueue<GuestMemory>, size: u32) {
        wr(t, reg::QUEUE_SEL, index);
        assert_eq!(rd(t, reg::QUEUE_READY), 0, "queue already set up");
        assert!(rd(t, reg::QUEUE_NUM_MAX) >= size);
        wr(t, reg::QUEUE_NUM, size);
        let split = |a: GuestAddress| halves(a.0);
        let (lo, hi) = split(vq.desc_table_addr());
        wr(t, reg::QUEUE_DESC_LOW, lo);
        wr(t, reg::QUEUE_DESC_HIGH, hi);
        let (lo, hi) = split(vq.avail_addr());
        wr(t, reg::QUEUE_DRIVER_LOW, lo);
        wr(t, reg::QUEUE_DRIVER_HIGH, hi);
        let (lo, hi) = split(vq.used_addr());
        wr(t, reg::QUEUE_DEVICE_LOW, lo);
        wr(t, reg::QUEUE_DEVICE_HIGH, hi);
        wr(t, reg::QUEUE_READY, 1);
        assert_eq!(rd(t, reg::QUEUE_READY), 1);
    }

    fn driver_ok(t: &mut MmioTransport) {
        let s = rd(t, reg::STATUS);
        wr(t, reg::STATUS, s | STATUS_DRIVER_OK);
    }

    const ALL_STAGES: u32 =
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn test_mmio_identity_registers_read_as_spec() {
        let (mut t, _) = transport(&[16]);
        assert_eq!(rd(&mut t, reg::MAGIC_VALUE), u32::from_le_bytes(*b"virt"));
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), super::super::TYPE_BLOCK);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), 0);
        assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 0);
        wr(&mut t, reg::SHM_SEL, 0);
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
        // Write-only registers read as zero.
        assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0);
        assert_eq!(rd(&mut t, reg::DRIVER_FEATURES), 0);
    }

    #[test]
    fn test_mmio_device_features_are_banked_by_selector() {
        let (mut t, _) = transport(&[16]);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), (1 << 29) | 0b101);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn test_mmio_linux_probe_activates_device_with_configured_queues() {
        let mem = memory();
        let (mut t, dev) = transport(&[16, 8]);
        let vq0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let vq1 = MockSplitQueue::create(&mem, GuestAddress(0x4000), 8);
        let status = negotiate(&mut t, u64::MAX);
        assert_eq!(
            status,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        assert_eq!(dev.lock().unwrap().acked, FakeDevice::OFFERED);
        setup_queue(&mut t, 0, &vq0, 16);
        setup_queue(&mut t, 1, &vq1, 4);
        assert!(dev.lock().unwrap().activations.is_empty());
        driver_ok(&mut t);

        assert_eq!(t.status(), ALL_STAGES);
        let dev = dev.lock().unwrap();
        assert_eq!(dev.activations.len(), 1);
        let queues = &dev.activations[0];
        assert_eq!(queues.len(), 2);
        assert!(queues[0].ready() && queues[1].ready());
        assert_eq!(queues[0].size(), 16);
        assert_eq!(queues[1].size(), 4);
        assert_eq!(queues[0].desc_table(), vq0.desc_table_addr().0);
        assert_eq!(queues[0].avail_ring(), vq0.avail_addr().0);
        assert_eq!(queues[0].used_ring(), vq0.used_addr().0);
        assert_eq!(queues[1].used_ring(), vq1.used_addr().0);
        assert!(queues[0].event_idx_enabled(), "EVENT_IDX was negotiated");
    }

    #[test]
    fn test_mmio_unready_queue_is_passed_not_ready() {
        let mem = memory();
        let (mut t, dev) = transport(&[16, 16]);
        let vq0 = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &vq0, 16);
        driver_ok(&mut t);
        let dev = dev.lock().unwrap();
        let queues = &dev.activations[0];
        assert!(queues[0].ready());
        assert!(!queues[1].ready());
        assert!(!queues[0].event_idx_enabled(), "EVENT_IDX was not accepted");
    }

    #[test]
    fn test_mmio_features_not_offered_are_dropped() {
        let (mut t, dev) = transport(&[16]);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 40) | (1 << 3) | 1);
        assert_eq!(dev.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 1);
    }

    #[test]
    fn test_mmio_features_ok_without_version_1_is_refused() {
        let (mut t, dev) = transport(&[16]);
        let status = negotiate(&mut t, 0b101);
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        assert_eq!(dev.lock().unwrap().acked, 0);
        // Nor can the driver go on to DRIVER_OK.
        driver_ok(&mut t);
        assert_eq!(t.status() & STATUS_DRIVER_OK, 0);
        assert!(dev.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn test_mmio_out_of_order_status_is_refused() {
        let (mut t, dev) = transport(&[16]);
        wr(&mut t, reg::STATUS, STATUS_DRIVER);
        assert_eq!(t.status(), 0);
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
        assert_eq!(t.status(), 0, "a refused write changes nothing");
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        wr(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(
            t.status(),
            STATUS_ACKNOWLEDGE,
            "FEATURES_OK skipped: all refused"
        );
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // The driver cannot set DEVICE_NEEDS_RESET, nor clear bits without a reset.
        let status = t.status();
        wr(&mut t, reg::STATUS, status | STATUS_DEVICE_NEEDS_RESET);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(dev.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn test_mmio_several_stages_in_one_write_are_taken_in_order() {
        let (mut t, _) = transport(&[16]);
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    }

    #[test]
    fn test_mmio_queue_writes_outside_setup_are_ignored() {
        let (mut t, _) = transport(&[16]);
        // Before FEATURES_OK.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        // A queue the device does not have.
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        // Features cannot change after FEATURES_OK.
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0b100);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn test_mmio_rings_outside_memory_refuse_activation_with_needs_reset() {
        let (mut t, dev) = transport(&[16]);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 16);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0);
        wr(&mut t, reg::QUEUE_DESC_HIGH, 0x10); // 64 GiB: no memory there
        wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x1000);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x2000);
        wr(&mut t, reg::QUEUE_READY, 1);
        driver_ok(&mut t);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_ne!(t.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
    }

    #[test]
    fn test_mmio_bad_queue_size_or_alignment_refuses_activation() {
        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        for (size, desc_low) in [(12, None), (0, None), (32, None), (16, Some(0x1008))] {
            let (mut t, dev) = transport(&[16]);
            negotiate(&mut t, VIRTIO_F_VERSION_1);
            setup_queue(&mut t, 0, &vq, 16);
            wr(&mut t, reg::QUEUE_NUM, size);
            if let Some(low) = desc_low {
                wr(&mut t, reg::QUEUE_DESC_LOW, low);
            }
            driver_ok(&mut t);
            assert!(dev.lock().unwrap().activations.is_empty(), "size {size}");
            assert_ne!(t.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn test_mmio_device_refusing_activation_sets_needs_reset() {
        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut t, dev) = transport(&[16]);
        dev.lock().unwrap().refuse_activation = true;
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &vq, 16);
        driver_ok(&mut t);
        assert_eq!(t.status(), ALL_STAGES | STATUS_DEVICE_NEEDS_RESET);
        // A second DRIVER_OK does not retry: the driver must reset.
        driver_ok(&mut t);
        assert!(dev.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn test_mmio_reset_clears_transport_and_device_and_allows_a_new_probe() {
        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut t, dev) = transport(&[16]);
        negotiate(&mut t, u64::MAX);
        setup_queue(&mut t, 0, &vq, 8);
        driver_ok(&mut t);
        t.interrupt().signal_used_queue().unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
        let resets = dev.lock().unwrap().resets;

        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, resets + 1);
        assert!(!dev.lock().unwrap().active);
        assert_eq!(dev.lock().unwrap().acked, 0);
        assert_eq!(t.driver_features, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);

        // Linux's del_vqs after a reset writes QueueReady 0 and expects to read 0 back.
        wr(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);

        negotiate(&mut t, u64::MAX);
        setup_queue(&mut t, 0, &vq, 16);
        driver_ok(&mut t);
        let dev = dev.lock().unwrap();
        assert_eq!(dev.activations.len(), 2);
        assert_eq!(dev.activations[1][0].size(), 16);
    }

    #[test]
    fn test_mmio_failed_is_recorded_until_reset() {
        let (mut t, _) = transport(&[16]);
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_FAILED);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_FAILED);
        wr(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_FAILED | STATUS_DRIVER,
        );
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_FAILED);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn test_mmio_interrupt_ack_clears_only_acked_bits() {
        let (mut t, _) = transport(&[16]);
        t.interrupt().signal_used_queue().unwrap();
        t.interrupt().signal_config_change().unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 3);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 2);
        wr(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn test_mmio_queue_notify_writes_the_queue_event() {
        let (mut t, dev) = transport(&[16, 16]);
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        wr(&mut t, reg::QUEUE_NOTIFY, 7);
        let dev = dev.lock().unwrap();
        assert_eq!(dev.events[1].read().unwrap(), 1);
        assert!(dev.events[0].read().is_err(), "queue 0 was not notified");
    }

    #[test]
    fn test_mmio_odd_width_register_access_is_ignored() {
        let (mut t, _) = transport(&[16]);
        let mut two = [0xaa; 2];
        t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut one = [0xaa; 1];
        t.read(reg::VERSION, &mut one);
        assert_eq!(one, [0]);
        let mut eight = [0xaa; 8];
        t.read(reg::MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS, &[1, 0]);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn test_mmio_config_space_is_forwarded_at_any_width() {
        let (mut t, dev) = transport(&[16]);
        let mut b = [0u8; 1];
        t.read(0x103, &mut b);
        assert_eq!(b, [4]);
        let mut b = [0u8; 2];
        t.read(0x106, &mut b);
        assert_eq!(b, [7, 8]);
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Past the device's config: zero.
        let mut b = [0xaa; 4];
        t.read(0x108, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(0x101, &[0xee]);
        assert_eq!(dev.lock().unwrap().config[1], 0xee);
    }

    #[test]
    fn test_mmio_real_device_end_to_end_through_event_loop() {
        use crate::virtio::rng::Rng;
        use event_manager::{EventManager, SubscriberOps};
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
        use virtio_queue::desc::{RawDescriptor, split::Descriptor};
        use vm_memory::Bytes;

        let mem = memory();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut t = MmioTransport::new(rng.clone(), mem.clone()).unwrap();
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(rng.clone());

        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), super::super::TYPE_RNG);
        negotiate(&mut t, u64::MAX);
        setup_queue(&mut t, 0, &vq, 16);
        driver_ok(&mut t);
        assert_eq!(t.status(), ALL_STAGES);
        assert!(lock(&rng).is_activated());
        // Activation kicks the queue once; let the loop see that with nothing posted.
        manager.run_with_timeout(100).unwrap();

        let buf = GuestAddress(0x8000);
        mem.write_slice(&[0u8; 64], buf).unwrap();
        let desc = RawDescriptor::from(Descriptor::new(
            buf.0,
            64,
            u16::try_from(VRING_DESC_F_WRITE).unwrap(),
            0,
        ));
        vq.add_desc_chains(&[desc], 0).unwrap();
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(manager.run_with_timeout(1000).unwrap() >= 1);

        assert_eq!(vq.used().idx().load(), 1);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 64));
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, buf).unwrap();
        assert_ne!(got, [0u8; 64], "64 random bytes are not all zero");
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_USED_RING);
        assert!(t.interrupt().irqfd().read().unwrap() >= 1);
    }

    #[test]
    fn test_serve_queue_yields_to_other_devices_when_driver_keeps_posting() {
        use virtio_queue::desc::{RawDescriptor, split::Descriptor};

        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let mut queue: Queue = vq.create_queue().unwrap();
        // The mock lays its used ring over the tail of its avail ring; keep them apart.
        queue
            .try_set_used_ring_address(GuestAddress(0x4000))
            .unwrap();
        let interrupt = Interrupt::new().unwrap();
        let queue_event = EventFd::new(EFD_NONBLOCK).unwrap();
        let one_desc = |i: u16| {
            vq.desc_table()
                .store(i, RawDescriptor::from(Descriptor::new(0x8000, 8, 0, 0)))
                .unwrap();
            let idx = vq.avail().idx().load();
            vq.avail()
                .ring()
                .ref_at(usize::from(idx % 16))
                .unwrap()
                .store(i);
            vq.avail().idx().store(idx.wrapping_add(1));
        };
        one_desc(0);
        let mut served = 0u32;
        // The "driver" posts another buffer every time one is completed.
        serve_queue(
            &mut queue,
            &mem,
            &interrupt,
            &queue_event,
            &mut LogLimiter::default(),
            |chain| {
                served += 1;
                one_desc(chain.head_index() ^ 1);
                0
            },
        );
        assert_eq!(served, MAX_SERVE_ROUNDS * 16);
        assert_eq!(queue_event.read().unwrap(), 1, "the device requeued itself");
        assert_eq!(
            interrupt.irqfd().read().unwrap(),
            1,
            "one interrupt for it all"
        );
        assert_eq!(queue.next_used(), u16::try_from(served).unwrap());
    }

    type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// A transport with a real entropy device, registered with an event loop.
    fn rng_transport(mem: &GuestMemory) -> (MmioTransport, Arc<Mutex<Rng>>, Loop) {
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let t = MmioTransport::new(rng.clone(), mem.clone()).unwrap();
        let mut manager = Loop::new().unwrap();
        manager.add_subscriber(rng.clone());
        (t, rng, manager)
    }

    /// A driver that set the rng up on `vq` (used ring apart, at [`USED_RING`]).
    fn drive_rng_up(t: &mut MmioTransport, vq: &MockSplitQueue<GuestMemory>) {
        negotiate(t, u64::MAX);
        setup_queue(t, 0, vq, 16);
        wr(t, reg::QUEUE_DEVICE_LOW, u32::try_from(USED_RING).unwrap());
        driver_ok(t);
        assert_eq!(t.status(), ALL_STAGES);
    }

    fn post_random_request(mem: &GuestMemory, vq: &MockSplitQueue<GuestMemory>, head: u16) {
        let write =
            u16::try_from(virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE).unwrap();
        let buf = 0x8000 + 0x100 * u64::from(head);
        mem.write_slice(&[0u8; 32], GuestAddress(buf)).unwrap();
        vq.add_desc_chains(&[desc(buf, 32, write, 0)], head)
            .unwrap();
    }

    fn json_round_trip(state: &MmioTransportState) -> MmioTransportState {
        serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap()
    }

    /// A running rng transport that served one request, saved.
    fn saved_running_rng() -> (GuestMemory, MmioTransportState) {
        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut t, _rng, mut manager) = rng_transport(&mem);
        drive_rng_up(&mut t, &vq);
        post_random_request(&mem, &vq, 0);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while used_idx(&mem) != 1 && std::time::Instant::now() < deadline {
            manager.run_with_timeout(50).unwrap();
        }
        assert_eq!(used_idx(&mem), 1);
        (mem, json_round_trip(&t.save_state()))
    }

    #[test]
    fn test_mmio_snapshot_restore_registers_survive_and_io_continues() {
        let (mem, state) = saved_running_rng();
        assert_eq!(state.status, ALL_STAGES);
        assert_eq!(
            state.interrupt_status, INTERRUPT_USED_RING,
            "the guest had not acked the interrupt yet"
        );
        assert!(state.device.activated);
        assert_eq!(state.device.queues[0].next_used, 1);

        let copy = memory();
        let vq = MockSplitQueue::create(&copy, GuestAddress(0x1000), 16);
        copy_guest_memory(&mem, &copy);
        // Posted while the VM was paused, before the snapshot was taken.
        post_random_request(&copy, &vq, 1);
        let (mut t, rng, mut manager) = rng_transport(&copy);
        t.restore_state(&state).unwrap();

        assert_eq!(t.save_state(), state, "restore then save is the identity");
        assert_eq!(rd(&mut t, reg::STATUS), ALL_STAGES);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(
            rd(&mut t, reg::QUEUE_NUM_MAX),
            u32::from(crate::virtio::rng::QUEUE_SIZE)
        );
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_USED_RING);
        assert_eq!(
            t.interrupt().irqfd().read().unwrap(),
            1,
            "interrupt raised again"
        );
        assert!(lock(&rng).is_activated());

        // The device looks at its queue on its own and serves what was posted.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while used_idx(&copy) != 2 && std::time::Instant::now() < deadline {
            manager.run_with_timeout(50).unwrap();
        }
        assert_eq!(used_idx(&copy), 2);
        assert_eq!(used(&copy, 1), (1, 32));
        let mut got = [0u8; 32];
        copy.read_slice(&mut got, GuestAddress(0x8100)).unwrap();
        assert_ne!(got, [0u8; 32]);
        // And again after a resume's kick, with a buffer posted later.
        post_random_request(&copy, &vq, 2);
        lock(&rng).kick();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(used_idx(&copy), 3);
        assert_eq!(used_idx(&mem), 1, "the old memory is not touched");
    }

    #[test]
    fn test_mmio_snapshot_mid_negotiation_lets_the_driver_carry_on() {
        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut t, _rng, _manager) = rng_transport(&mem);
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        let state = json_round_trip(&t.save_state());
        assert!(!state.device.activated);
        assert_eq!(state.interrupt_status, 0);

        let (mut t, rng, _manager) = rng_transport(&mem);
        t.restore_state(&state).unwrap();
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1, "bank 1 still selected");
        assert!(t.interrupt().irqfd().read().is_err(), "nothing was pending");
        // The driver finishes: the low bank, FEATURES_OK, the queue, DRIVER_OK.
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        wr(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(
            t.driver_features, VIRTIO_F_VERSION_1,
            "the high bank survived"
        );
        setup_queue(&mut t, 0, &vq, 16);
        driver_ok(&mut t);
        assert_eq!(t.status(), ALL_STAGES);
        assert!(lock(&rng).is_activated());
    }

    #[test]
    fn test_mmio_restore_corrupted_state_is_an_error_and_changes_nothing() {
        let (mem, good) = saved_running_rng();
        type Corrupt = fn(&mut MmioTransportState);
        let cases: [(&str, Corrupt); 12] = [
            ("device type", |s| {
                s.device.device_type = crate::virtio::TYPE_NET
            }),
            ("status bits", |s| s.status |= 0x20),
            ("skipped stage", |s| s.status &= !STATUS_FEATURES_OK),
            ("needs reset before DRIVER_OK", |s| {
                s.status = STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET
            }),
            ("activated without DRIVER_OK", |s| {
                s.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
            }),
            ("driver feature not offered", |s| {
                s.driver_features |= 1 << 40
            }),
            ("acked features differ", |s| {
                s.device.acked_features = VIRTIO_F_VERSION_1
            }),
            ("queue registers missing", |s| s.queues.clear()),
            ("queue max size", |s| s.queues[0].max_size = 64),
            ("interrupt bits", |s| s.interrupt_status = 0x80),
            ("queue size not a power of two", |s| {
                s.device.queues[0].size = 24
            }),
            ("ring outside memory", |s| {
                s.device.queues[0].avail_ring = 0x7fff_0000
            }),
        ];
        for (what, corrupt) in cases {
            let mut state = good.clone();
            corrupt(&mut state);
            let (mut t, rng, _manager) = rng_transport(&mem);
            let Err(err) = t.restore_state(&state) else {
                panic!("{what}: accepted");
            };
            assert!(err.to_string().contains("rng"), "{what}: {err}");
            assert_eq!(t.status(), 0, "{what}");
            assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0, "{what}");
            assert!(!lock(&rng).is_activated(), "{what}");
            // The good state still restores on the same transport.
            t.restore_state(&good).unwrap();
        }
    }

    #[test]
    fn test_mmio_restore_onto_a_used_transport_is_refused() {
        let (mem, state) = saved_running_rng();
        let (mut t, _rng, _manager) = rng_transport(&mem);
        wr(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        let err = t.restore_state(&state).unwrap_err();
        assert!(err.to_string().contains("fresh"), "{err}");
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE);
    }

    fn arb_transport_state() -> impl Strategy<Value = MmioTransportState> {
        let queue = (
            prop_oneof![Just(256u16), any::<u16>()],
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(max_size, size, ready, desc_table, avail_ring, used_ring)| MmioQueueState {
                    max_size,
                    size,
                    ready,
                    desc_table,
                    avail_ring,
                    used_ring,
                },
            );
        (
            prop_oneof![Just(ALL_STAGES), Just(0u32), 0u32..0x100, any::<u32>()],
            any::<u32>(),
            any::<u32>(),
            prop_oneof![
                Just(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX),
                any::<u64>()
            ],
            any::<u32>(),
            proptest::collection::vec(queue, 0..3),
            prop_oneof![0u32..4, any::<u32>()],
            arb_device_state(),
        )
            .prop_map(
                |(
                    status,
                    device_features_sel,
                    driver_features_sel,
                    driver_features,
                    queue_sel,
                    queues,
                    interrupt_status,
                    device,
                )| MmioTransportState {
                    status,
                    device_features_sel,
                    driver_features_sel,
                    driver_features,
                    queue_sel,
                    queues,
                    interrupt_status,
                    device,
                },
            )
    }

    proptest! {
        /// Random states never panic. An accepted one reads back as saved; a refused one leaves
        /// the transport fresh.
        #[test]
        fn test_mmio_restore_random_state_never_panics(state in arb_transport_state()) {
            let mem = memory();
            let (mut t, rng, _manager) = rng_transport(&mem);
            match t.restore_state(&state) {
                Ok(()) => {
                    // The device reports what it offers now, which may be more than was saved.
                    let mut expected = state.clone();
                    expected.device.avail_features = lock(&rng).avail_features();
                    prop_assert_eq!(t.save_state(), expected);
                    prop_assert_eq!(lock(&rng).is_activated(), state.device.activated);
                }
                Err(_) => {
                    prop_assert_eq!(t.status(), 0);
                    prop_assert!(!lock(&rng).is_activated());
                }
            }
            // The driver can always start over.
            wr(&mut t, reg::STATUS, 0);
            prop_assert_eq!(t.status(), 0);
        }
    }

    proptest! {
        // Each case runs a VM's worth of setup and an event loop.
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A good state with one random device queue field still never panics.
        #[test]
        fn test_mmio_restore_mutated_queue_never_panics(
            field in 0usize..6,
            value in prop_oneof![0u64..0x10_0000, any::<u64>()],
        ) {
            let (mem, mut state) = saved_running_rng();
            let q = &mut state.device.queues[0];
            let v16 = u16::try_from(value & 0xffff).unwrap();
            match field {
                0 => q.size = v16,
                1 => q.desc_table = value,
                2 => q.avail_ring = value,
                3 => q.used_ring = value,
                4 => q.next_avail = v16,
                _ => q.max_size = v16,
            }
            let (mut t, rng, mut manager) = rng_transport(&mem);
            if t.restore_state(&state).is_ok() {
                prop_assert!(lock(&rng).is_activated());
                manager.run_with_timeout(0).unwrap();
            } else {
                prop_assert_eq!(t.status(), 0);
            }
        }
    }

    proptest! {
        /// Any sequence of register accesses leaves the transport answering and never panics;
        /// a reset always brings it back to a clean state.
        #[test]
        fn test_mmio_random_register_traffic_never_panics(
            ops in proptest::collection::vec(
                (any::<bool>(), 0u64..0x140, any::<u32>(), prop::sample::select(vec![1usize, 2, 4, 8])),
                0..200,
            ),
            negotiated_first in any::<bool>(),
        ) {
            let (mut t, dev) = transport(&[16, 8]);
            if negotiated_first {
                // Start where queue setup happens, so DRIVER_OK paths get exercised too.
                negotiate(&mut t, u64::MAX);
            }
            for (is_write, offset, value, width) in ops {
                // Registers sit at 4-byte offsets.
                let offset = offset & !3;
                let bytes = u64::from(value).to_le_bytes();
                if is_write {
                    t.write(offset, &bytes[..width]);
                } else {
                    let mut data = vec![0u8; width];
                    t.read(offset, &mut data);
                }
            }
            wr(&mut t, reg::STATUS, 0);
            prop_assert_eq!(t.status(), 0);
            prop_assert_eq!(rd(&mut t, reg::MAGIC_VALUE), MAGIC_VALUE);
            prop_assert!(!dev.lock().unwrap().active);
        }
    }
}
