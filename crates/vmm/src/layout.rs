//! Where things live in the guest's physical address space and its interrupt lines.
//!
//! ```text
//! 0x0000_0500  GDT                  0x0000_7000  zero page (Linux boot) / memmap (PVH)
//! 0x0000_0520  IDT                  0x0000_9000  page tables (PML4, PDPT, PD)
//! 0x0000_6000  PVH start_info       0x0000_8ff0  boot stack
//! 0x0002_0000  kernel command line  0x0009_fc00  MP table
//! 0x0010_0000  kernel               0xc000_0000  32-bit MMIO gap (1 GiB): virtio-mmio slots
//! 0xfec0_0000  I/O APIC             0xfee0_0000  local APIC
//! 0x1_0000_0000  guest RAM above 3 GiB continues here
//! ```

/// Global descriptor table and (empty) interrupt descriptor table for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, its module list, and the memory map it points to.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// The Linux boot protocol's zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-map page tables for the first GiB: PML4, PDPT and one PD of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line and its longest length (the Linux limit on x86).
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The end of real-mode memory; below it, the EBDA and the MP table.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap below 4 GiB; guest RAM beyond it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB slot each from here.
pub const VIRTIO_MMIO_BASE: u64 = 0xc000_1000;
pub const VIRTIO_MMIO_SLOT: u64 = 0x1000;

/// Legacy devices on the I/O port bus and their ISA interrupt lines.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
pub const I8042_IRQ: u32 = 1;
/// Interrupt lines handed to virtio-mmio devices, one each (GSI 5..=23 on the I/O APIC).
pub const VIRTIO_IRQ_FIRST: u32 = 5;
pub const VIRTIO_IRQ_LAST: u32 = 23;
