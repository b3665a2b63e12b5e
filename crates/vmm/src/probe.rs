//! Can this machine's /dev/kvm run a Linux guest, and how fast does guest kernel code run?
//!
//! Two small checks on a throw-away VM with one vCPU and 1 MiB of memory:
//! - real mode: a 16-bit loop, then `out 0x10` and `hlt`, as a guest's first instructions run;
//! - long mode: paging on, a 64-bit CPL0 loop of `dec rcx; jnz`, timed, then `out` and `hlt`.
//!
//! Both must produce exactly the expected exits and register values. The long-mode timing tells a
//! real (or nested) KVM from a software hypervisor such as PVM, which emulates CPL0 code one
//! instruction at a time (measured 400-1100 ns per loop iteration there against ~0.3 ns on
//! hardware and ~4 ns nested under QEMU TCG).

use crate::diag::error_chain;
use std::path::Path;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest code is emulated, not run, when a CPL0 loop iteration costs more than this.
pub const MAX_USABLE_NS_PER_ITER: f64 = 100.0;

const MEM_SIZE: usize = 1 << 20;
const CODE_ADDR: u64 = 0x1000;
const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
const PD_ADDR: u64 = 0x4000;
/// The port the probe code writes its result to (`out imm8, al` takes an 8-bit port).
const PROBE_PORT: u8 = 0x10;

/// Errors from a KVM check.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM call {call} failed")]
    Kvm {
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up probe guest memory: {0}")]
    Memory(String),
    #[error("{mode} check: unexpected vCPU exit {exit}")]
    UnexpectedExit { mode: &'static str, exit: String },
    #[error("{mode} check: the guest finished with {what}")]
    WrongResult { mode: &'static str, what: String },
}

fn kvm_err(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |source| ProbeError::Kvm { call, source }
}

/// What the long-mode check measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongModeTiming {
    pub iterations: u64,
    pub elapsed: Duration,
}

impl LongModeTiming {
    pub fn ns_per_iter(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e9 / self.iterations as f64
    }
}

/// The whole judgement on a machine's KVM.
#[derive(Debug, Clone, PartialEq)]
pub enum KvmVerdict {
    /// Guest kernels run at hardware (or nested-hardware) speed.
    Usable { pvm: bool, timing: LongModeTiming },
    /// There is no /dev/kvm, or it fails the checks.
    Unusable { pvm: bool, reason: String },
}

impl KvmVerdict {
    pub fn is_usable(&self) -> bool {
        matches!(self, KvmVerdict::Usable { .. })
    }
}

impl std::fmt::Display for KvmVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pvm_note = |pvm: bool| if pvm { " (kvm_pvm module loaded)" } else { "" };
        match self {
            KvmVerdict::Usable { pvm, timing } => write!(
                f,
                "/dev/kvm is usable{}: CPL0 loop {:.1} ns/iteration",
                pvm_note(*pvm),
                timing.ns_per_iter()
            ),
            KvmVerdict::Unusable { pvm, reason } => {
                write!(f, "/dev/kvm is not usable{}: {reason}", pvm_note(*pvm))
            }
        }
    }
}

/// Whether the PVM software hypervisor provides this machine's /dev/kvm.
pub fn pvm_loaded() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Decides whether /dev/kvm can run Linux guests: it must exist, pass both checks, and run a
/// CPL0 loop faster than [`MAX_USABLE_NS_PER_ITER`].
pub fn assess() -> KvmVerdict {
    let pvm = pvm_loaded();
    if !Path::new("/dev/kvm").exists() {
        return KvmVerdict::Unusable {
            pvm,
            reason: "/dev/kvm does not exist".into(),
        };
    }
    if let Err(e) = check_real_mode() {
        return KvmVerdict::Unusable {
            pvm,
            reason: error_chain(&e),
        };
    }
    // A short run first: on an emulating hypervisor a long one would take seconds.
    let quick = match check_long_mode(100_000) {
        Ok(t) => t,
        Err(e) => {
            return KvmVerdict::Unusable {
                pvm,
                reason: error_chain(&e),
            };
        }
    };
    if quick.ns_per_iter() > MAX_USABLE_NS_PER_ITER {
        return KvmVerdict::Unusable {
            pvm,
            reason: format!(
                "guest kernel code is emulated, not run: CPL0 loop {:.0} ns/iteration (limit {})",
                quick.ns_per_iter(),
                MAX_USABLE_NS_PER_ITER
            ),
        };
    }
    // Long enough (~40 ms nested) to time even against a coarse 4 ms guest clock.
    match check_long_mode(10_000_000) {
        Ok(timing) if timing.ns_per_iter() <= MAX_USABLE_NS_PER_ITER => {
            KvmVerdict::Usable { pvm, timing }
        }
        Ok(timing) => KvmVerdict::Unusable {
            pvm,
            reason: format!("CPL0 loop {:.0} ns/iteration", timing.ns_per_iter()),
        },
        Err(e) => KvmVerdict::Unusable {
            pvm,
            reason: error_chain(&e),
        },
    }
}

/// A one-vCPU VM with 1 MiB of memory at guest address 0.
struct ProbeVm {
    _vm: VmFd,
    vcpu: VcpuFd,
    // Must outlive the VM: KVM maps it as guest memory.
    mem: GuestMemoryMmap,
}

impl ProbeVm {
    fn new() -> Result<Self, ProbeError> {
        let kvm = Kvm::new().map_err(ProbeError::Open)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| ProbeError::Memory(e.to_string()))?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| ProbeError::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: `region` describes exactly the MEM_SIZE bytes mapped by `mem`, which is stored
        // in the returned ProbeVm beside the VM fd and is dropped only after `_vm` (field order),
        // so the mapping stays valid for as long as KVM can access it.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        // Long mode needs the LM bit in the guest's CPUID, so pass KVM's supported set through.
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        Ok(ProbeVm { _vm: vm, vcpu, mem })
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), ProbeError> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| ProbeError::Memory(e.to_string()))
    }

    /// Runs until the probe's `out` and then `hlt`; returns the byte written and the time the
    /// first run (the loop) took.
    fn run_to_halt(&mut self, mode: &'static str) -> Result<(u8, Duration), ProbeError> {
        let started = Instant::now();
        let out = match self.vcpu.run().map_err(kvm_err("KVM_RUN"))? {
            VcpuExit::IoOut(port, data) if port == u16::from(PROBE_PORT) && data.len() == 1 => {
                data[0]
            }
            other => {
                return Err(ProbeError::UnexpectedExit {
                    mode,
                    exit: format!("{other:?}"),
                });
            }
        };
        let elapsed = started.elapsed();
        match self.vcpu.run().map_err(kvm_err("KVM_RUN"))? {
            VcpuExit::Hlt => Ok((out, elapsed)),
            other => Err(ProbeError::UnexpectedExit {
                mode,
                exit: format!("{other:?}"),
            }),
        }
    }

    fn rcx(&self) -> Result<u64, ProbeError> {
        Ok(self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rcx)
    }
}

/// Runs a 16-bit real-mode loop and checks its result.
pub fn check_real_mode() -> Result<(), ProbeError> {
    const MODE: &str = "real-mode";
    let mut vm = ProbeVm::new()?;
    #[rustfmt::skip]
    let code = [
        0x66, 0xb9, 0x00, 0x10, 0x00, 0x00, // mov ecx, 0x1000
        0x66, 0x49,                         // loop: dec ecx
        0x75, 0xfc,                         // jnz loop
        0xb0, b'R',                         // mov al, 'R'
        0xe6, PROBE_PORT,             // out 0x10, al
        0xf4,                               // hlt
    ];
    vm.write(CODE_ADDR, &code)?;
    let mut sregs = vm.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vm.vcpu
        .set_sregs(&sregs)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs = vm.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    vm.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

    let (out, _) = vm.run_to_halt(MODE)?;
    if out != b'R' {
        return Err(ProbeError::WrongResult {
            mode: MODE,
            what: format!("out byte {out:#x}"),
        });
    }
    // The loop counts ECX down to zero (outside 64-bit mode the upper half is left undefined).
    let rcx = vm.rcx()?;
    if rcx & 0xffff_ffff != 0 {
        return Err(ProbeError::WrongResult {
            mode: MODE,
            what: format!("rcx {rcx:#x}"),
        });
    }
    Ok(())
}

/// Runs a 64-bit CPL0 loop of `iterations` with paging on, checks it and times it.
pub fn check_long_mode(iterations: u64) -> Result<LongModeTiming, ProbeError> {
    const MODE: &str = "long-mode";
    let mut vm = ProbeVm::new()?;
    // Identity-map the first 2 MiB with one large page.
    vm.write(PML4_ADDR, &(PDPT_ADDR | 0x3).to_le_bytes())?;
    vm.write(PDPT_ADDR, &(PD_ADDR | 0x3).to_le_bytes())?;
    vm.write(PD_ADDR, &0x83u64.to_le_bytes())?; // present | writable | 2 MiB page
    let mut code = vec![0x48, 0xb9]; // mov rcx, imm64 (the count is patched in below)
    code.extend_from_slice(&0u64.to_le_bytes());
    #[rustfmt::skip]
    code.extend_from_slice(&[
        0x48, 0xff, 0xc9,       // loop: dec rcx
        0x75, 0xfb,             // jnz loop
        0xb0, b'L',             // mov al, 'L'
        0xe6, PROBE_PORT, // out 0x10, al
        0xf4,                   // hlt
    ]);
    vm.write(CODE_ADDR, &code)?;

    let mut sregs = vm.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code_seg = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data_seg = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code_seg
    };
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 31); // PE | PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME | LMA
    vm.vcpu
        .set_sregs(&sregs)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    // A first pass of one iteration takes the one-off costs (memory faults, first entry),
    // which nested virtualization makes large; only the second pass is timed.
    let mut pass = |count: u64| {
        vm.write(CODE_ADDR + 2, &count.to_le_bytes())?;
        let mut regs = vm.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = CODE_ADDR;
        regs.rflags = 2;
        vm.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vm.run_to_halt(MODE)
    };
    pass(1)?;
    let (out, elapsed) = pass(iterations)?;
    if out != b'L' {
        return Err(ProbeError::WrongResult {
            mode: MODE,
            what: format!("out byte {out:#x}"),
        });
    }
    let rcx = vm.rcx()?;
    if rcx != 0 {
        return Err(ProbeError::WrongResult {
            mode: MODE,
            what: format!("rcx {rcx:#x}"),
        });
    }
    Ok(LongModeTiming {
        iterations,
        elapsed,
    })
}

/// For VM tests: whether this machine's KVM can run guests.
///
/// When it cannot, the test is skipped with a message saying so, unless `WRENN_REQUIRE_KVM=1`
/// (set by `cargo xtask test` where it promised a usable KVM), in which case this panics: a VM
/// test must never pass by skipping where it was supposed to run.
pub fn usable_for_test(test: &str) -> bool {
    let verdict = assess();
    if verdict.is_usable() {
        return true;
    }
    if std::env::var("WRENN_REQUIRE_KVM").is_ok_and(|v| v == "1") {
        panic!("{test}: a usable KVM was required but {verdict}");
    }
    eprintln!(
        "SKIPPED {test}: {verdict}; run it through `cargo xtask hostvm` or `cargo xtask test`"
    );
    false
}
