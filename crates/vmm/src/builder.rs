//! Turning validated [`Resources`] into a running machine: memory, KVM VM, kernel, devices on
//! their buses and interrupt lines, configured vCPUs.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::boot::{self, BootError};
use crate::devices::bus::{Bus, BusDevice, BusError, lock};
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleRing, ConsoleSink, IrqLine, SerialDevice};
use crate::layout::*;
use crate::lifecycle::ExitNotifier;
use crate::memory::{self, MemoryError};
use crate::resources::{ConfigError, Resources};
use crate::vcpu::{self, VcpuError, VcpuHandle};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{VirtioDevice, block, net, rng, vsock};
use crate::vm::{Vm, VmError};

/// An event-loop subscriber as the VMM thread holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("serial output {path}: {source}")]
    SerialOut {
        path: String,
        source: std::io::Error,
    },
    #[error("creating an event or interrupt fd: {0}")]
    EventFd(std::io::Error),
    #[error("drive {id}: {message}")]
    Block { id: String, message: String },
    #[error("network interface {id}: {message}")]
    Net { id: String, message: String },
    #[error("vsock: {0}")]
    Vsock(String),
    #[error("entropy device: {0}")]
    Rng(std::io::Error),
    #[error("restoring the snapshot: {0}")]
    Restore(String),
}

/// A built VM whose vCPUs are configured but not yet running.
pub struct Machine {
    pub vm: Vm,
    pub vcpu_fds: Vec<VcpuFd>,
    pub vcpus: Vec<VcpuHandle>,
    /// Whether the vCPU threads start paused (a restore not asked to resume).
    pub start_paused: bool,
    /// Guest RAM is plain anonymous memory (a boot): a page never backed reads as zero.
    /// False after a restore from files or a page server.
    pub memory_is_anonymous: bool,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub virtio: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    /// The transport of each virtio device, in slot order (what a snapshot saves).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub cmdline: String,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .field("virtio", &self.virtio.len())
            .field("cmdline", &self.cmdline)
            .finish()
    }
}

struct VirtioSlots<'a> {
    vm: &'a Vm,
    mmio: &'a mut Bus,
    next: u32,
    cmdline: String,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    subscribers: Vec<Subscriber>,
}

impl VirtioSlots<'_> {
    /// Puts `device` in the next MMIO slot with the next interrupt line, wires its doorbells
    /// and interrupt into KVM, and names it on the kernel command line.
    fn attach<D: VirtioDevice + 'static>(&mut self, device: D) -> Result<(), StartError> {
        let slot = self.next;
        let irq = VIRTIO_IRQ_FIRST + slot;
        if irq > VIRTIO_IRQ_LAST {
            return Err(ConfigError::TooManyDevices(VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1).into());
        }
        let addr = VIRTIO_MMIO_BASE + u64::from(slot) * VIRTIO_MMIO_SLOT;
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(device.clone(), self.vm.memory().clone())
            .map_err(StartError::EventFd)?;
        self.vm.register_irqfd(transport.interrupt().irqfd(), irq)?;
        for (queue, event) in lock(&device).queue_events().iter().enumerate() {
            let queue = u32::try_from(queue).expect("a few queues");
            self.vm.register_mmio_doorbell(
                event,
                addr + crate::virtio::mmio::reg::QUEUE_NOTIFY,
                queue,
            )?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        let transport: Arc<Mutex<dyn BusDevice>> = transport;
        self.mmio.insert(transport, addr, VIRTIO_MMIO_SLOT)?;
        self.cmdline
            .push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{irq}"));
        self.subscribers.push(device.clone());
        self.devices.push(device);
        self.next += 1;
        Ok(())
    }
}

/// Opens where console output goes: a FIFO (opened read-write so that opening does not wait
/// for a reader, and non-blocking so that a reader that stops reading loses lines instead of
/// stalling the guest), a file (appended), or stdout.
fn console_output(path: Option<&str>) -> Result<Box<dyn Write + Send>, StartError> {
    let Some(path) = path else {
        return Ok(Box::new(std::io::stdout()));
    };
    let err = |source| StartError::SerialOut {
        path: path.to_owned(),
        source,
    };
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    let file = if is_fifo {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    } else {
        OpenOptions::new().create(true).append(true).open(path)
    }
    .map_err(err)?;
    Ok(Box::new(file))
}

/// The parts of a machine that a boot and a restore build alike: the KVM VM over `mem`, the
/// legacy devices on the port bus, and the virtio devices in their slots (drives with the root
/// first, network interfaces, vsock, entropy: a restore depends on this order being stable).
struct Parts {
    vm: Vm,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    subscribers: Vec<Subscriber>,
    /// `virtio_mmio.device=` arguments naming the slots.
    virtio_args: String,
}

fn build_parts(
    resources: &Resources,
    mem: memory::GuestMemory,
    exits: &Arc<ExitNotifier>,
    ring: &Arc<Mutex<ConsoleRing>>,
) -> Result<Parts, StartError> {
    let vm = Vm::new(mem, resources.machine.track_dirty_pages)?;

    // Legacy devices on the port bus.
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(StartError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let sink = ConsoleSink::new(
        console_output(resources.serial.serial_out_path.as_deref())?,
        ring.clone(),
        exits.clone(),
    );
    let serial = Arc::new(Mutex::new(SerialDevice::new(IrqLine(serial_irq), sink)));
    let serial_bus: Arc<Mutex<dyn BusDevice>> = serial.clone();
    pio.insert(
        serial_bus,
        u64::from(SERIAL_PORT),
        u64::from(SERIAL_PORT_LEN),
    )?;
    let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(StartError::EventFd)?;
    vm.register_irqfd(&kbd_irq, I8042_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(IrqLine(kbd_irq), exits.clone())));
    pio.insert(
        i8042.clone(),
        u64::from(I8042_PORT),
        u64::from(I8042_PORT_LEN),
    )?;

    let mut mmio = Bus::new();
    let mut slots = VirtioSlots {
        vm: &vm,
        mmio: &mut mmio,
        next: 0,
        cmdline: String::new(),
        devices: Vec::new(),
        transports: Vec::new(),
        subscribers: Vec::new(),
    };
    for drive in &resources.drives {
        let dev = block::Block::new(drive).map_err(|e| StartError::Block {
            id: drive.drive_id.clone(),
            message: crate::diag::error_chain(&e),
        })?;
        slots.attach(dev)?;
    }
    for iface in &resources.nets {
        let dev = net::Net::new(iface).map_err(|e| StartError::Net {
            id: iface.iface_id.clone(),
            message: crate::diag::error_chain(&e),
        })?;
        slots.attach(dev)?;
    }
    if let Some(config) = &resources.vsock {
        let dev = vsock::Vsock::new(config)
            .map_err(|e| StartError::Vsock(crate::diag::error_chain(&e)))?;
        slots.attach(dev)?;
    }
    if resources.entropy.is_some() {
        slots.attach(rng::Rng::new().map_err(StartError::Rng)?)?;
    }
    let VirtioSlots {
        cmdline: virtio_args,
        devices: virtio,
        transports,
        subscribers,
        ..
    } = slots;
    Ok(Parts {
        vm,
        pio,
        mmio,
        serial,
        i8042,
        virtio,
        transports,
        subscribers,
        virtio_args,
    })
}

impl Parts {
    fn into_machine(self, vcpu_fds: Vec<VcpuFd>, cmdline: String, start_paused: bool) -> Machine {
        Machine {
            vm: self.vm,
            vcpu_fds,
            vcpus: Vec::new(),
            start_paused,
            memory_is_anonymous: true,
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            serial: self.serial,
            i8042: self.i8042,
            virtio: self.virtio,
            transports: self.transports,
            cmdline,
        }
    }
}

/// Builds the machine. On error everything built so far is dropped (fds closed, memory
/// unmapped, the vsock socket removed by its device).
pub fn build(
    resources: &Resources,
    exits: &Arc<ExitNotifier>,
    ring: &Arc<Mutex<ConsoleRing>>,
) -> Result<(Machine, Vec<Subscriber>), StartError> {
    let kernel_path = resources.kernel_path()?;
    let mut cmdline = resources.base_cmdline()?;
    let vcpu_count = resources.machine.vcpu_count;

    let mem = memory::create(
        resources.machine.mem_size_mib,
        resources.machine.huge_pages == crate::api::models::HugePages::Transparent,
    )?;
    let (entry, setup_header) = boot::load_kernel(&mem, kernel_path)?;
    let initrd = match resources
        .boot_source
        .as_ref()
        .and_then(|b| b.initrd_path.as_deref())
    {
        Some(path) => Some(boot::load_initrd(&mem, std::path::Path::new(path))?),
        None => None,
    };
    let mut parts = build_parts(resources, mem.clone(), exits, ring)?;
    cmdline.push_str(&parts.virtio_args);
    boot::write_boot_structures(&mem, &cmdline, setup_header, initrd, vcpu_count)?;

    let mut vcpu_fds = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let fd = parts.vm.create_vcpu(index)?;
        vcpu::configure(&fd, parts.vm.supported_cpuid(), index, vcpu_count, entry)?;
        vcpu_fds.push(fd);
    }
    let subscribers = std::mem::take(&mut parts.subscribers);
    Ok((parts.into_machine(vcpu_fds, cmdline, false), subscribers))
}

/// What a restore puts back into a freshly built machine.
#[derive(Debug)]
pub struct RestoredState<'a> {
    pub vcpus: &'a [vcpu::VcpuState],
    pub vm: &'a crate::vm::VmState,
    pub devices: &'a crate::snapshot::DevicesState,
}

/// Builds a machine over restored guest memory and puts the saved state back: vCPUs, then the
/// VM (clock, interrupt controllers), then the devices (last: restoring a device may raise an
/// interrupt, which the irqchip restore would otherwise wipe).
pub fn restore(
    resources: &Resources,
    mem: memory::GuestMemory,
    state: RestoredState<'_>,
    start_paused: bool,
    exits: &Arc<ExitNotifier>,
    ring: &Arc<Mutex<ConsoleRing>>,
) -> Result<(Machine, Vec<Subscriber>), StartError> {
    let vcpu_count = resources.machine.vcpu_count;
    if state.vcpus.len() != usize::from(vcpu_count) {
        return Err(StartError::Restore(format!(
            "the snapshot holds {} vCPU states for {vcpu_count} vCPUs",
            state.vcpus.len()
        )));
    }
    let mut parts = build_parts(resources, mem, exits, ring)?;
    let mut vcpu_fds = Vec::with_capacity(usize::from(vcpu_count));
    for (index, saved) in (0..vcpu_count).zip(state.vcpus) {
        let fd = parts.vm.create_vcpu(index)?;
        vcpu::restore_state(&fd, index, saved)?;
        vcpu_fds.push(fd);
    }
    parts.vm.restore_state(state.vm)?;
    crate::snapshot::restore_devices(
        state.devices,
        &parts.serial,
        &parts.i8042,
        &parts.transports,
    )
    .map_err(|e| StartError::Restore(crate::diag::error_chain(&e)))?;
    let subscribers = std::mem::take(&mut parts.subscribers);
    Ok((
        parts.into_machine(vcpu_fds, String::new(), start_paused),
        subscribers,
    ))
}

impl Machine {
    /// Starts one thread per vCPU.
    pub fn start_vcpus(
        &mut self,
        exits: &Arc<ExitNotifier>,
        seccomp: Option<crate::seccomp::DenyAction>,
    ) -> Result<(), VcpuError> {
        vcpu::install_kick_handler()?;
        let context = vcpu::VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exits: exits.clone(),
            seccomp,
            msr_list: Arc::new(self.vm.msr_list().to_vec()),
        };
        for (index, fd) in self.vcpu_fds.drain(..).enumerate() {
            let index = u8::try_from(index).expect("at most 32 vCPUs");
            self.vcpus
                .push(vcpu::spawn(index, fd, context.clone(), self.start_paused)?);
        }
        Ok(())
    }

    pub fn pause(&self) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.command(vcpu::VcpuCommand::Pause, std::time::Duration::from_secs(2))?;
        }
        Ok(())
    }

    /// Kicks every device first: buffers the guest posted while paused get looked at.
    pub fn resume(&self) -> Result<(), VcpuError> {
        for d in &self.virtio {
            let d = lock(d);
            if d.is_activated() {
                d.kick();
            }
        }
        for v in &self.vcpus {
            v.command(vcpu::VcpuCommand::Resume, std::time::Duration::from_secs(2))?;
        }
        Ok(())
    }

    /// Stops and joins every vCPU thread (before the VM and its memory go away).
    pub fn stop(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.vcpus.clear();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_console_to_a_fifo_without_reader_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("console");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let mut out = console_output(Some(fifo.to_str().unwrap())).unwrap();
        // Far more than a pipe holds: writes beyond its capacity fail instead of blocking.
        let chunk = [b'x'; 4096];
        let mut refused = false;
        for _ in 0..64 {
            if out.write_all(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(
            refused,
            "a full FIFO must refuse writes, not block the guest"
        );
    }

    #[test]
    fn test_console_to_a_file_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "before\n").unwrap();
        let mut out = console_output(Some(path.to_str().unwrap())).unwrap();
        out.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "before\nafter\n");
        let err = console_output(Some("/no/such/dir/console")).err().unwrap();
        assert!(err.to_string().contains("/no/such/dir/console"), "{err}");
    }
}
