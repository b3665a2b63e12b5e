//! The KVM VM: memory slots, the in-kernel interrupt controllers and PIT, and how devices are
//! wired to interrupts (irqfd) and doorbells (ioeventfd).

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_clock_data,
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
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

/// The VM-wide state KVM keeps outside guest memory and the vCPUs: the interrupt controllers,
/// the PIT and the kvmclock.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// A VM with its memory registered. Field order matters: the VM fd closes before the memory
/// it points into is unmapped.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    msr_list: Vec<u32>,
    track_dirty_pages: bool,
    mem: GuestMemory,
    _kvm: Kvm,
}

impl Vm {
    /// Creates the VM over `mem`; with `track_dirty_pages`, KVM logs the pages the guest
    /// writes (for Diff snapshots).
    pub fn new(mem: GuestMemory, track_dirty_pages: bool) -> Result<Self, VmError> {
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
                flags: if track_dirty_pages {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
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
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("get MSR index list"))?
            .as_slice()
            .to_vec();
        Ok(Self {
            fd,
            supported_cpuid,
            msr_list: crate::vcpu::msrs_to_save(&msr_list),
            track_dirty_pages,
            mem,
            _kvm: kvm,
        })
    }

    /// The MSRs a vCPU snapshot saves.
    pub fn msr_list(&self) -> &[u32] {
        &self.msr_list
    }

    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages
    }

    /// The pages the guest wrote since the last call (or since the memory was registered), one
    /// bitmap per memory region (bit i of word j = page 64*j + i of the region). KVM clears
    /// its log as it hands it over.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>, VmError> {
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let len = usize::try_from(region.len()).expect("x86_64: u64 fits in usize");
                self.fd
                    .get_dirty_log(u32::try_from(slot).expect("two regions at most"), len)
                    .map_err(kvm_err("get dirty log"))
            })
            .collect()
    }

    /// Reads the interrupt controllers, PIT and clock (the vCPUs are paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let pit = self.fd.get_pit2().map_err(kvm_err("get PIT"))?;
        let mut clock = self.fd.get_clock().map_err(kvm_err("get clock"))?;
        // Only the value carries over; the flags describe this host's clock source.
        clock.flags = 0;
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("get irqchip"))?;
            Ok(chip)
        };
        Ok(VmState {
            pit,
            clock,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Puts saved VM state back, in KVM's order: PIT, clock (kvmclock continues from the
    /// saved value: guest time does not jump over the pause; the host agent sets the wall
    /// clock), then the three irqchips.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&state.pit).map_err(kvm_err("set PIT"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            flags: 0,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm_err("set clock"))?;
        for (chip, id) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(VmError::Kvm {
                    what: "set irqchip (the snapshot's chip ids are out of order)",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
            self.fd.set_irqchip(chip).map_err(kvm_err("set irqchip"))?;
        }
        Ok(())
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
