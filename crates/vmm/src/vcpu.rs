//! vCPUs: their boot state, and the thread that runs each one.
//!
//! A vCPU thread loops on `KVM_RUN` and dispatches port and MMIO exits to the buses. The VMM
//! thread controls it with commands (pause, resume, stop): it sends the command, then kicks the
//! thread out of `KVM_RUN` with a real-time signal, repeating the kick until the thread answers
//! (a kick that lands just before the thread enters `KVM_RUN` would otherwise be lost).

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
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
    #[error("vCPU {index}: saving {what}: {source}")]
    Save {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: restoring {what}: {source}")]
    Restore {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM refused MSR {msr:#x} on restore")]
    MsrRefused { index: u8, msr: u32 },
    #[error("vCPU {0}: its state can only be saved while it is paused")]
    NotPaused(u8),
}

/// Control of a running vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Stop,
    /// Only while paused: the thread reads its registers and sends them back.
    SaveState,
}

/// Everything KVM holds for one vCPU, as a snapshot keeps it (plain data).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) pairs; IA32_TSC first and TSC_DEADLINE last, the order they restore in.
    pub msrs: Vec<(u32, u64)>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs KVM lists but that a snapshot must not carry: machine-check control (host policy).
const MSR_IA32_MCG_CTL: u32 = 0x17b;

/// The MSRs a snapshot saves: what KVM says it can save and restore, minus host policy, with
/// IA32_TSC first (a TSC deadline is only meaningful against the restored TSC) and
/// TSC_DEADLINE last.
pub fn msrs_to_save(kvm_list: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = kvm_list
        .iter()
        .copied()
        .filter(|&m| m != MSR_IA32_MCG_CTL && m != MSR_IA32_TSC && m != MSR_IA32_TSC_DEADLINE)
        .collect();
    list.insert(0, MSR_IA32_TSC);
    if kvm_list.contains(&MSR_IA32_TSC_DEADLINE) {
        list.push(MSR_IA32_TSC_DEADLINE);
    }
    list
}

/// Reads a vCPU's whole state, in the order that keeps it consistent: MP state first (it
/// makes KVM accept pending APIC events), vCPU events last. Must run while the vCPU is not in
/// `KVM_RUN` (its own thread, paused; or before it ever ran).
pub fn save_state(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
    let err = |what| {
        move |source| VcpuError::Save {
            index,
            what,
            source,
        }
    };
    let mp_state = fd.get_mp_state().map_err(err("MP state"))?;
    let regs = fd.get_regs().map_err(err("registers"))?;
    let sregs = fd.get_sregs().map_err(err("special registers"))?;
    let xsave = fd.get_xsave().map_err(err("XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(err("XCRs"))?;
    let debug_regs = fd.get_debug_regs().map_err(err("debug registers"))?;
    let lapic = fd.get_lapic().map_err(err("LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("CPUID"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, index, msr_list)?;
    let vcpu_events = fd.get_vcpu_events().map_err(err("vCPU events"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// MSRs go to KVM this many at a time (well under its limit on one call).
const MSR_CHUNK: usize = 64;

/// A `kvm_msrs` list of (index, value) pairs; at most [`MSR_CHUNK`] of them.
fn msr_list(pairs: &[(u32, u64)]) -> Msrs {
    let entries: Vec<kvm_msr_entry> = pairs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).expect("at most MSR_CHUNK entries")
}

/// Reads `list` in chunks. KVM stops at the first MSR it cannot read: that one is skipped
/// (logged) and reading goes on after it.
fn read_msrs(fd: &VcpuFd, index: u8, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let pairs: Vec<(u32, u64)> = chunk.iter().map(|&index| (index, 0)).collect();
        let mut msrs = msr_list(&pairs);
        let read = fd.get_msrs(&mut msrs).map_err(|source| VcpuError::Save {
            index,
            what: "MSRs",
            source,
        })?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        if read < chunk.len() {
            tracing::debug!(
                vcpu = index,
                msr = chunk[read],
                "MSR not readable; not saved"
            );
            rest = &rest[read + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// Puts a saved state into a fresh vCPU, in the order KVM needs: CPUID before anything that
/// depends on features, registers before events (setting registers clears pending
/// exceptions), special registers before the LAPIC (they hold the APIC base), the LAPIC
/// before the MSRs (TSC deadline), and every saved MSR accepted or an error.
pub fn restore_state(fd: &VcpuFd, index: u8, state: &VcpuState) -> Result<(), VcpuError> {
    let err = |what| {
        move |source| VcpuError::Restore {
            index,
            what,
            source,
        }
    };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Restore {
        index,
        what: "CPUID (too many entries)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    fd.set_cpuid2(&cpuid).map_err(err("CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        set_tsc_khz_if_needed(fd, index, khz);
    }
    fd.set_mp_state(state.mp_state).map_err(err("MP state"))?;
    fd.set_regs(&state.regs).map_err(err("registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(err("special registers"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (KVM_SET_XSAVE reads exactly that size;
    // this CPU has no features that need the larger XSAVE2 layout, which KVM_GET_XSAVE would
    // have failed for).
    unsafe { fd.set_xsave(&state.xsave) }.map_err(err("XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(err("XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(err("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(err("LAPIC"))?;
    for chunk in state.msrs.chunks(MSR_CHUNK) {
        let set = fd.set_msrs(&msr_list(chunk)).map_err(err("MSRs"))?;
        if set < chunk.len() {
            return Err(VcpuError::MsrRefused {
                index,
                msr: chunk[set].0,
            });
        }
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(err("vCPU events"))?;
    Ok(())
}

/// A snapshot taken on a host with another TSC frequency runs the guest's clocks too fast or
/// too slow unless KVM scales the TSC; within 250 ppm it is left alone (the guest's NTP-level
/// drift). Nested KVM may not scale: then the guest runs with the host's rate, logged.
fn set_tsc_khz_if_needed(fd: &VcpuFd, index: u8, saved_khz: u32) {
    let Ok(current) = fd.get_tsc_khz() else {
        return;
    };
    let diff = u64::from(current.abs_diff(saved_khz));
    if diff * 1_000_000 <= u64::from(saved_khz) * 250 {
        return;
    }
    if let Err(e) = fd.set_tsc_khz(saved_khz) {
        tracing::warn!(
            vcpu = index,
            saved_khz,
            host_khz = current,
            error = %e,
            "cannot scale the TSC to the snapshot's frequency; guest clocks will drift"
        );
    }
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

    fd.set_msrs(&msr_list(&BOOT_MSRS)).map_err(err("MSRs"))?;

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
    states: mpsc::Receiver<Result<VcpuState, VcpuError>>,
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

/// What a vCPU thread needs besides its fd.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exits: Arc<ExitNotifier>,
    pub seccomp: Option<crate::seccomp::DenyAction>,
    /// The MSRs a snapshot saves ([`msrs_to_save`]).
    pub msr_list: Arc<Vec<u32>>,
}

/// Starts the thread that runs `fd`: it runs the guest at once, or, with `start_paused`,
/// waits for a Resume first (a restored VM that was not asked to resume).
pub fn spawn(
    index: u8,
    mut fd: VcpuFd,
    context: VcpuContext,
    start_paused: bool,
) -> Result<VcpuHandle, VcpuError> {
    let VcpuContext {
        pio,
        mmio,
        exits,
        seccomp,
        msr_list,
    } = context;
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::channel();
    let (state_tx, state_rx) = mpsc::channel();
    if start_paused {
        let _ = cmd_tx.send(VcpuCommand::Pause);
    }
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
                states: state_tx,
                msr_list,
            };
            if let Some(exit) = runner.run(&mut fd) {
                exits.report(exit);
            }
        })
        .map_err(|source| VcpuError::Spawn { index, source })?;
    let handle = VcpuHandle {
        index,
        thread: Some(thread),
        commands: cmd_tx,
        acks: ack_rx,
        states: state_rx,
    };
    if start_paused {
        // The Pause queued above is acknowledged before the guest runs an instruction.
        handle.wait_ack(VcpuCommand::Pause, Duration::from_secs(2))?;
    }
    Ok(handle)
}

impl VcpuHandle {
    /// Sends `command` and waits until the thread has carried it out.
    pub fn command(&self, command: VcpuCommand, timeout: Duration) -> Result<(), VcpuError> {
        if self.commands.send(command).is_err() {
            // The thread has ended: it is as paused or stopped as it will ever be.
            return Ok(());
        }
        self.wait_ack(command, timeout)
    }

    /// The vCPU's state, read on its own thread; it must be paused.
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, VcpuError> {
        if self.commands.send(VcpuCommand::SaveState).is_err() {
            return Err(VcpuError::NotPaused(self.index));
        }
        match self.states.recv_timeout(timeout) {
            Ok(state) => state,
            Err(_) => Err(VcpuError::NoAnswer(self.index, VcpuCommand::SaveState)),
        }
    }

    fn wait_ack(&self, command: VcpuCommand, timeout: Duration) -> Result<(), VcpuError> {
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

    /// Stops the thread and waits for it to end. A thread that does not answer (stuck in a
    /// guest page fault that nobody serves any more, e.g. after the page server died) is left
    /// behind: the process is about to exit, and joining it would hang.
    pub fn stop(&mut self) {
        let answered = self.command(VcpuCommand::Stop, Duration::from_secs(2));
        if let Some(thread) = self.thread.take() {
            if answered.is_ok() {
                let _ = thread.join();
            } else {
                tracing::warn!(vcpu = self.index, "vCPU thread did not stop; left behind");
            }
        }
    }
}

struct Runner {
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    commands: mpsc::Receiver<VcpuCommand>,
    acks: mpsc::Sender<VcpuCommand>,
    states: mpsc::Sender<Result<VcpuState, VcpuError>>,
    msr_list: Arc<Vec<u32>>,
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
                VcpuCommand::SaveState => {
                    let _ = self.states.send(Err(VcpuError::NotPaused(self.index)));
                }
                VcpuCommand::Pause => {
                    // Tell the guest's kvmclock it was paused, so its watchdogs do not count
                    // the pause as a lockup (EINVAL when the guest does not use kvmclock).
                    let _ = fd.kvmclock_ctrl();
                    let _ = self.acks.send(VcpuCommand::Pause);
                    loop {
                        match self.commands.recv() {
                            Ok(VcpuCommand::Resume) => {
                                // Again after a restore, whose clock jumped across the pause.
                                let _ = fd.kvmclock_ctrl();
                                let _ = self.acks.send(VcpuCommand::Resume);
                                break;
                            }
                            Ok(VcpuCommand::Pause) => {
                                let _ = self.acks.send(VcpuCommand::Pause);
                            }
                            Ok(VcpuCommand::SaveState) => {
                                let state = save_state(fd, self.index, &self.msr_list);
                                let _ = self.states.send(state);
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
