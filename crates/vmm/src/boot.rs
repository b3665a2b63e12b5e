//! Loading a Linux kernel into guest memory and preparing the 64-bit boot protocol.
//!
//! Both formats enter the kernel in long mode with paging on (Linux's 64-bit boot protocol):
//! - ELF `vmlinux`: the segments are loaded at their physical addresses; entry is the ELF entry.
//! - bzImage: the protected-mode part is loaded at 1 MiB; entry is load address + 0x200
//!   (`startup_64`), which needs boot protocol 2.12+ and the XLF_KERNEL_64 flag.
//!
//! The vCPU state that goes with it (GDT, page tables, registers) is in [`crate::vcpu`]; this
//! module writes the memory side: kernel, command line, zero page with the e820 map, page tables,
//! GDT and the MP table.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::layout::*;
use crate::memory::GuestMemory;
use crate::mptable;

/// `type_of_loader` "undefined" (0xff): we are not one of the registered boot loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry point sits 0x200 into the protected-mode part of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "kernel image {path} is neither an ELF vmlinux nor a bzImage (ELF: {elf}; bzImage: {bz})"
    )]
    KernelFormat {
        path: String,
        elf: loader::Error,
        bz: loader::Error,
    },
    #[error("bzImage {path} has no 64-bit entry point (boot protocol {version:#x})")]
    No64BitEntry { path: String, version: u16 },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooBig { size: u64, limit: u64 },
    #[error("kernel command line is {len} bytes; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong { len: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("reading initrd: {0}")]
    ReadInitrd(std::io::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub entry: GuestAddress,
}

/// Loads the kernel (ELF first, then bzImage) and returns its entry and, for a bzImage, the
/// setup header that must go into the zero page.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
) -> Result<(KernelEntry, Option<setup_header>), BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: display.clone(),
        source,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let elf = match loader::Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            return Ok((
                KernelEntry {
                    entry: r.kernel_load,
                },
                None,
            ));
        }
        Err(e) => e,
    };
    match loader::BzImage::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let hdr = r.setup_header.unwrap_or_default();
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: display,
                    version,
                });
            }
            Ok((
                KernelEntry {
                    entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                },
                Some(hdr),
            ))
        }
        Err(bz) => Err(BootError::KernelFormat {
            path: display,
            elf,
            bz,
        }),
    }
}

/// Loads an initrd at the top of low memory (below the MMIO gap and below 4 GiB, page aligned);
/// returns (address, size).
pub fn load_initrd(mem: &GuestMemory, path: &Path) -> Result<(GuestAddress, u64), BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: display,
        source,
    })?;
    let size = file.metadata().map_err(BootError::ReadInitrd)?.len();
    let low_end = low_memory_end(mem);
    let start = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START + (16 << 20))
        .ok_or(BootError::InitrdTooBig {
            size,
            limit: low_end,
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
        size,
        limit: low_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)?;
    Ok((GuestAddress(start), size))
}

/// End of the RAM region that starts at 0.
fn low_memory_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map_or(0, |r| r.len())
}

/// Writes everything the 64-bit entry expects to find in memory: command line, zero page
/// (e820 map, setup header), identity page tables for the first GiB, the GDT, and the MP table.
pub fn write_boot_structures(
    mem: &GuestMemory,
    cmdline: &str,
    setup_header: Option<setup_header>,
    initrd: Option<(GuestAddress, u64)>,
    vcpus: u8,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))?;

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).expect("below 4 GiB");
    params.hdr.cmdline_size = u32::try_from(bytes.len()).expect("checked above");
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        // Both are below 4 GiB by construction in load_initrd.
        params.hdr.ramdisk_image = u32::try_from(addr.raw_value()).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    let e820 = e820_map(mem);
    params.e820_entries = u8::try_from(e820.len()).expect("a handful of entries");
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = entry;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    mptable::write(mem, vcpus)?;
    Ok(())
}

/// RAM below the EBDA, a reserved hole for the EBDA/MP table and the BIOS area, RAM from 1 MiB
/// to the end of low memory, and RAM above 4 GiB if there is any.
fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel to reach its own page
/// tables, which it sets up right away.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PD_ADDR | PRESENT_RW, GuestAddress(PDPT_ADDR))?;
    let mut pd = [0u8; 512 * 8];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))?;
    Ok(())
}

/// The GDT the vCPU starts with: null, 64-bit code, data, and a TSS descriptor.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// Selectors into [`GDT`].
pub const CODE_SELECTOR: u16 = 1 << 3;
pub const DATA_SELECTOR: u16 = 2 << 3;
pub const TSS_SELECTOR: u16 = 3 << 3;

/// Packs a segment descriptor (flags in the Intel SDM's "access byte + flags" layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    let mut bytes = Vec::with_capacity(GDT.len() * 8);
    for e in GDT {
        bytes.extend_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT_ADDR))?;
    // An empty IDT: interrupts stay off until the kernel loads its own.
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gdt_entries_match_the_sdm_layout() {
        // Values a 64-bit code and a data segment have in every x86 VMM.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn test_boot_structures_land_where_the_kernel_looks() {
        let mem = crate::memory::create(64, false).unwrap();
        write_boot_structures(&mem, "console=ttyS0", None, None, 2).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
        let mut line = [0u8; 14];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
        let pd1: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pd1, (1 << 21) | 0x83);
    }

    #[test]
    fn test_overlong_cmdline_is_refused() {
        let mem = crate::memory::create(64, false).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_boot_structures(&mem, &long, None, None, 1),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn test_garbage_kernel_is_refused_with_both_reasons() {
        let mem = crate::memory::create(64, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"not a kernel at all").unwrap();
        let err = load_kernel(&mem, &path).unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
        let err = load_kernel(&mem, &dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
