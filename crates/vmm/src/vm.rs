//! The KVM VM: memory slots, the in-kernel interrupt controllers and PIT, and how devices are
//! wired to interrupts (irqfd) and doorbells (ioeventfd).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion as _};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Addresses KVM needs for its own use on Intel (three pages for the TSS, one for the identity
/// map), placed in the MMIO gap just below the I/O APIC where no RAM or device lives.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A VM with its memory registered. Field order matters: the VM fd closes before the memory
/// it points into is unmapped.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    mem: GuestMemory,
    _kvm: Kvm,
}

impl Vm {
    pub fn new(mem: GuestMemory) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_err("set TSS address"))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set identity map address"))?;
        fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        // The PIT is Linux's calibration and early timer source; it has no speaker to drive.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("two regions at most"),
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes, owned by
            // `mem`, which this struct keeps until after the VM fd is closed (field order), and
            // vCPU threads are joined before the Vm is dropped.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("register guest memory"))?;
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        Ok(Self {
            fd,
            supported_cpuid,
            mem,
            _kvm: kvm,
        })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    pub fn create_vcpu(&self, index: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create vCPU"))
    }

    /// Writes to `event` raise interrupt line `gsi` (an I/O APIC pin).
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(kvm_err("register irqfd"))
    }

    /// A 4-byte guest write of `value` to MMIO `addr` signals `event` inside KVM, without an
    /// exit to the VMM.
    pub fn register_mmio_doorbell(
        &self,
        event: &EventFd,
        addr: u64,
        value: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), value)
            .map_err(kvm_err("register ioeventfd"))
    }
}
