//! vCPUs: their boot state, and the thread that runs each one.
//!
//! A vCPU thread loops on `KVM_RUN` and dispatches port and MMIO exits to the buses. The VMM
//! thread controls it with commands (pause, resume, stop): it sends the command, then kicks the
//! thread out of `KVM_RUN` with a real-time signal, repeating the kick until the thread answers
//! (a kick that lands just before the thread enters `KVM_RUN` would otherwise be lost).

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::boot::{CODE_SELECTOR, DATA_SELECTOR, GDT, KernelEntry, TSS_SELECTOR};
use crate::cpuid;
use crate::devices::bus::Bus;
use crate::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use crate::lifecycle::{ExitNotifier, VmExit};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("configuring vCPU {index}: {what}: {source}")]
    Configure {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("setting up the vCPU kick signal: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("starting vCPU thread {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("vCPU {0} did not answer a {1:?} command")]
    NoAnswer(u8, VcpuCommand),
}

/// Control of a running vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Stop,
}

/// MSRs a 64-bit Linux entry expects to find in a sane state.
const BOOT_MSRS: [(u32, u64); 11] = [
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: MTRRs on, default write-back
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// LVT registers in the local APIC page, and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// Sets CPUID, MSRs, FPU and LAPIC on every vCPU, and on the boot vCPU the long-mode registers
/// that enter the kernel at `entry`.
pub fn configure(
    fd: &VcpuFd,
    supported: &CpuId,
    index: u8,
    count: u8,
    entry: KernelEntry,
) -> Result<(), VcpuError> {
    let err = |what| {
        move |source| VcpuError::Configure {
            index,
            what,
            source,
        }
    };
    let mut cpuid = supported.clone();
    cpuid::apply_template(&mut cpuid, index, count);
    fd.set_cpuid2(&cpuid).map_err(err("CPUID"))?;

    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).expect("a short fixed list");
    fd.set_msrs(&msrs).map_err(err("MSRs"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(err("FPU"))?;

    let mut lapic = fd.get_lapic().map_err(err("LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(err("LAPIC"))?;

    if index == 0 {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry.entry.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_ADDR,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(err("registers"))?;
        let mut sregs = fd.get_sregs().map_err(err("special registers"))?;
        long_mode_sregs(&mut sregs);
        fd.set_sregs(&sregs).map_err(err("special registers"))?;
    }
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = r.to_ne_bytes()[0];
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = std::os::raw::c_char::from_ne_bytes([b]);
    }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    let index = usize::from(selector >> 3);
    let descriptor = GDT[index];
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long && (descriptor >> 54) & 1 == 1),
        s: u8::from(selector != TSS_SELECTOR),
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn long_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).expect("4 entries");
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(CODE_SELECTOR, 0xb, true);
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, 0xb, false);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// The VMM thread's handle on one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
    commands: mpsc::Sender<VcpuCommand>,
    acks: mpsc::Receiver<VcpuCommand>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what interrupts KVM_RUN with EINTR.
}

/// The signal that kicks vCPU threads out of `KVM_RUN`; its handler is installed once.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the no-op handler for [`kick_signal`] (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// Starts the thread that runs `fd`. It begins running the guest at once.
pub fn spawn(
    index: u8,
    mut fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exits: Arc<ExitNotifier>,
    seccomp: Option<crate::seccomp::DenyAction>,
) -> Result<VcpuHandle, VcpuError> {
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::channel();
    let span = tracing::Span::current();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let _span = span.enter();
            if let Some(action) = seccomp
                && let Err(e) = crate::seccomp::apply_with(crate::seccomp::ThreadKind::Vcpu, action)
            {
                exits.report(VmExit::Error(format!("vCPU {index}: {e}")));
                return;
            }
            let runner = Runner {
                index,
                pio,
                mmio,
                commands: cmd_rx,
                acks: ack_tx,
            };
            if let Some(exit) = runner.run(&mut fd) {
                exits.report(exit);
            }
        })
        .map_err(|source| VcpuError::Spawn { index, source })?;
    Ok(VcpuHandle {
        index,
        thread: Some(thread),
        commands: cmd_tx,
        acks: ack_rx,
    })
}

impl VcpuHandle {
    /// Sends `command` and waits until the thread has carried it out.
    pub fn command(&self, command: VcpuCommand, timeout: Duration) -> Result<(), VcpuError> {
        if self.commands.send(command).is_err() {
            // The thread has ended: it is as paused or stopped as it will ever be.
            return Ok(());
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(thread) = &self.thread {
                let _ = thread.kill(kick_signal());
            }
            match self.acks.recv_timeout(Duration::from_millis(2)) {
                Ok(ack) if ack == command => return Ok(()),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if std::time::Instant::now() > deadline {
                        return Err(VcpuError::NoAnswer(self.index, command));
                    }
                }
            }
        }
    }

    /// Stops the thread and waits for it to end.
    pub fn stop(&mut self) {
        let _ = self.command(VcpuCommand::Stop, Duration::from_secs(2));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Runner {
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    commands: mpsc::Receiver<VcpuCommand>,
    acks: mpsc::Sender<VcpuCommand>,
}

enum Control {
    Continue,
    Stop,
}

impl Runner {
    /// Runs until the guest or the VMM ends the VM; returns the exit to report, if any.
    fn run(&self, fd: &mut VcpuFd) -> Option<VmExit> {
        loop {
            match self.handle_commands(fd) {
                Control::Continue => {}
                Control::Stop => return None,
            }
            match fd.run() {
                Ok(exit) => {
                    if let Some(vm_exit) = self.handle_exit(exit) {
                        return Some(vm_exit);
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    return Some(VmExit::Error(format!("vCPU {}: KVM_RUN: {e}", self.index)));
                }
            }
        }
    }

    fn handle_commands(&self, fd: &VcpuFd) -> Control {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                VcpuCommand::Resume => {
                    let _ = self.acks.send(VcpuCommand::Resume);
                }
                VcpuCommand::Stop => {
                    let _ = self.acks.send(VcpuCommand::Stop);
                    return Control::Stop;
                }
                VcpuCommand::Pause => {
                    // Tell the guest's kvmclock it was paused, so its watchdogs do not count
                    // the pause as a lockup (EINVAL when the guest does not use kvmclock).
                    let _ = fd.kvmclock_ctrl();
                    let _ = self.acks.send(VcpuCommand::Pause);
                    loop {
                        match self.commands.recv() {
                            Ok(VcpuCommand::Resume) => {
                                let _ = self.acks.send(VcpuCommand::Resume);
                                break;
                            }
                            Ok(VcpuCommand::Pause) => {
                                let _ = self.acks.send(VcpuCommand::Pause);
                            }
                            Ok(VcpuCommand::Stop) | Err(_) => {
                                let _ = self.acks.send(VcpuCommand::Stop);
                                return Control::Stop;
                            }
                        }
                    }
                }
            }
        }
        Control::Continue
    }

    fn handle_exit(&self, exit: VcpuExit<'_>) -> Option<VmExit> {
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.pio.read(u64::from(port), data);
            }
            VcpuExit::IoOut(port, data) => {
                self.pio.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                self.mmio.read(addr, data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio.write(addr, data);
            }
            // A triple fault: how `reboot=t` resets, and how a guest that lost its way ends.
            VcpuExit::Shutdown => return Some(VmExit::Reset),
            VcpuExit::SystemEvent(kind, _) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                        VmExit::GuestPanic("guest reported a crash".into())
                    }
                    other => VmExit::Error(format!("unknown KVM system event {other}")),
                });
            }
            // With the in-kernel irqchip, HLT is handled in KVM; if it reaches us, just go on.
            VcpuExit::Hlt | VcpuExit::Intr => {}
            VcpuExit::FailEntry(reason, cpu) => {
                return Some(VmExit::Error(format!(
                    "vCPU {}: KVM entry failed: hardware reason {reason:#x} on cpu {cpu}",
                    self.index
                )));
            }
            VcpuExit::InternalError => {
                return Some(VmExit::Error(format!(
                    "vCPU {}: KVM internal error (emulation failure)",
                    self.index
                )));
            }
            other => {
                tracing::debug!(vcpu = self.index, exit = ?other, "unhandled vCPU exit");
            }
        }
        None
    }
}
