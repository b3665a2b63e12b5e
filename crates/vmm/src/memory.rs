//! Guest RAM: anonymous private mappings laid out around the 32-bit MMIO gap.
//!
//! Each region is mapped at a 2 MiB-aligned host address, so that its guest-physical and host
//! addresses agree modulo 2 MiB: only then can KVM map the guest's memory with 2 MiB pages when
//! the host backs it with huge pages. With transparent huge pages asked for
//! (`huge_pages: "Transparent"`), the mapping is `MADV_HUGEPAGE`: a first touch costs one fault
//! per 2 MiB instead of one per 4 KiB, which under nested virtualization (an exit per fault)
//! is most of a cold boot's time. Guest RAM stays mapped for the life of the process (a VMM
//! process runs one VM).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as every part of the VMM sees it. The bitmap records the pages the VMM itself
/// writes (virtio data and rings), which KVM's dirty log cannot see: a Diff snapshot needs both.
/// Writes through vm-memory's accessors mark it; a device that writes through a raw pointer
/// (positioned reads, readv, getrandom) marks the range itself with [`mark_dirty`].
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Smallest and largest guest RAM the VMM accepts, in MiB.
pub const MIN_MEM_MIB: u64 = 16;
pub const MAX_MEM_MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, not {0}")]
    Size(u64),
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map { mib: u64, source: std::io::Error },
    #[error("cannot describe guest memory: {0}")]
    Region(String),
}

/// Huge pages give way at this alignment.
const HUGE_PAGE: usize = 2 << 20;

/// The guest-physical ranges that hold `mib` MiB of RAM: below the MMIO gap first, the rest
/// from 4 GiB up.
pub fn ranges(mib: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::Size(mib));
    }
    let bytes = mib << 20;
    let low = bytes.min(MMIO_GAP_START);
    let mut out = vec![(GuestAddress(0), to_usize(low))];
    if bytes > low {
        out.push((GuestAddress(MMIO_GAP_END), to_usize(bytes - low)));
    }
    Ok(out)
}

/// Maps fresh, zeroed guest RAM (anonymous, private, not reserved: pages cost nothing until the
/// guest touches them), with transparent huge pages when `transparent_huge_pages`.
pub fn create(mib: u64, transparent_huge_pages: bool) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (addr, len) in ranges(mib)? {
        let ptr = map_aligned(len, transparent_huge_pages)
            .map_err(|source| MemoryError::Map { mib, source })?;
        // SAFETY: `ptr` is the start of a fresh private anonymous mapping of `len` readable and
        // writable bytes that nothing else uses and that is never unmapped (it lives as long
        // as the process), so every access vm-memory makes through the region stays valid.
        let region = unsafe { MmapRegion::build_raw(ptr, len, PROT, FLAGS) }
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| MemoryError::Region(format!("region at {:#x} overflows", addr.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region(e.to_string()))
}

/// Maps guest RAM for a restore whose memory comes from files: an anonymous reservation laid
/// out like [`create`]'s, then, for each `(device_offset, len, file, file_offset)`, that part
/// of the file mapped over it private and copy-on-write (the guest's writes never reach the
/// file; pages are read from the page cache on first touch). `device_offset` counts in the
/// flat range the regions make end to end; every number must be page-aligned, and the files
/// must cover what is mapped (checked by the caller: touching past EOF is SIGBUS).
pub fn map_files(
    mib: u64,
    pieces: &[(u64, u64, &std::fs::File, u64)],
) -> Result<GuestMemory, MemoryError> {
    use std::os::fd::AsRawFd as _;
    let mem = create(mib, false)?;
    let map_err = |source| MemoryError::Map { mib, source };
    for &(device_offset, len, file, file_offset) in pieces {
        let mut done = 0u64;
        while done < len {
            let (host, room) = host_address(&mem, device_offset + done).ok_or_else(|| {
                MemoryError::Region(format!(
                    "offset {:#x} is beyond guest memory",
                    device_offset + done
                ))
            })?;
            let chunk = (len - done).min(room);
            let offset = libc::off_t::try_from(file_offset + done)
                .map_err(|_| MemoryError::Region("file offset too large".into()))?;
            // SAFETY: the target range [host, host + chunk) lies inside guest RAM mapped by
            // `create` above (host_address checked it), which nothing has touched yet and no
            // other thread uses; MAP_FIXED replaces exactly those pages with a private mapping
            // of the file. The result is checked.
            let mapped = unsafe {
                libc::mmap(
                    host as *mut libc::c_void,
                    to_usize(chunk),
                    PROT,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(map_err(std::io::Error::last_os_error()));
            }
            done += chunk;
        }
    }
    Ok(mem)
}

/// The host address of flat-range offset `device_offset`, and how many bytes of its region
/// follow it.
fn host_address(mem: &GuestMemory, device_offset: u64) -> Option<(usize, u64)> {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    let mut base = 0u64;
    for region in mem.iter() {
        let len = region.len();
        if device_offset < base + len {
            let within = device_offset - base;
            return Some((region.as_ptr() as usize + to_usize(within), len - within));
        }
        base += len;
    }
    None
}

/// For each page of `[host, host + len)` of guest RAM: whether it is resident (backed by a
/// page in memory). On anonymous guest RAM (no swap) a page that is not resident was never
/// written and reads as zero.
pub fn residency(host: usize, len: usize) -> std::io::Result<Vec<bool>> {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: [host, host + len) is a page-aligned range of our guest RAM mapping (callers pass
    // region starts and lengths); mincore writes exactly one byte per page into `vec`, which
    // has that many.
    let ret = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
}

/// Guest page size for snapshots and dirty tracking.
pub const PAGE_SIZE: usize = 4096;

/// Records that the VMM wrote `[addr, addr + len)` of guest memory through a raw pointer (not
/// through vm-memory's accessors, which record their writes themselves). Ranges outside guest
/// RAM are ignored: the write they describe could not have happened.
pub fn mark_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    use vm_memory::bitmap::Bitmap as _;
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    let mut addr = addr;
    let mut left = len;
    while left > 0 {
        let Some((region, offset)) = mem.to_region_addr(addr) else {
            return;
        };
        let Ok(offset) = usize::try_from(offset.0) else {
            return;
        };
        let in_region = left.min(to_usize(region.len()).saturating_sub(offset));
        if in_region == 0 {
            return;
        }
        region.bitmap().mark_dirty(offset, in_region);
        left -= in_region;
        addr = GuestAddress(addr.0 + in_region as u64);
    }
}

/// Names the mapping `[anon:wrenn-guest-ram]` in /proc/PID/maps and smaps, so tools (and
/// the benchmark) can tell guest RAM from the VMM's own memory, and the kernel never merges it
/// with a neighbouring allocation. Best effort: kernels without CONFIG_ANON_VMA_NAME refuse.
fn name_guest_ram(addr: usize, len: usize) {
    const PR_SET_VMA: libc::c_int = 0x5356_4d41;
    const PR_SET_VMA_ANON_NAME: libc::c_ulong = 0;
    static NAME: &std::ffi::CStr = c"wrenn-guest-ram";
    // SAFETY: prctl only reads the NUL-terminated name, which is static; the range is the
    // mapping created by map_aligned.
    let _ = unsafe {
        libc::prctl(
            PR_SET_VMA,
            PR_SET_VMA_ANON_NAME,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            NAME.as_ptr(),
        )
    };
}

const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps `len` bytes at a 2 MiB-aligned address: maps `len + 2 MiB` and gives back the
/// unaligned head and the tail.
fn map_aligned(len: usize, transparent_huge_pages: bool) -> std::io::Result<*mut u8> {
    let padded = len + HUGE_PAGE;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing touches no
    // existing memory; the result is checked.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), padded, PROT, FLAGS, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = padded - head - len;
    if head > 0 {
        // SAFETY: [start, start + head) is the front of the mapping made above, unused.
        unsafe { libc::munmap(raw, head) };
    }
    if tail > 0 {
        // SAFETY: [aligned + len, aligned + len + tail) is the end of that mapping, unused.
        unsafe { libc::munmap((aligned + len) as *mut libc::c_void, tail) };
    }
    name_guest_ram(aligned, len);
    if transparent_huge_pages {
        // SAFETY: advice on the mapping made above; it changes no contents.
        let ret = unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "transparent huge pages unavailable for guest memory"
            );
        }
    }
    Ok(aligned as *mut u8)
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("x86_64: u64 fits in usize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ranges_split_around_the_mmio_gap() {
        assert_eq!(ranges(128).unwrap(), vec![(GuestAddress(0), 128 << 20)]);
        let r = ranges(4096).unwrap();
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 1 << 30));
        assert!(matches!(ranges(0), Err(MemoryError::Size(0))));
    }

    #[test]
    fn test_regions_are_mapped_2m_aligned_and_usable() {
        use vm_memory::{Bytes, GuestMemoryBackend};
        for thp in [false, true] {
            let mem = create(64, thp).unwrap();
            for region in mem.iter() {
                assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
            }
            mem.write_obj(0xabcd_u32, GuestAddress((64 << 20) - 4))
                .unwrap();
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
                0xabcd
            );
        }
    }
}
