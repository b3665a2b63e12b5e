//! Guest memory to files and back: which pages changed, and writing them.
//!
//! Offsets here are in the flat range: the guest RAM regions end to end (what a memory file
//! holds and what the page server is asked for), counted in 4 KiB pages.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::SnapshotError;
use crate::builder::Machine;
use crate::memory::{GuestMemory, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Bytes of guest RAM, all regions.
pub fn flat_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// The guest address of each flat page index, region by region: `(guest start, first flat
/// page, pages)`.
fn regions(mem: &GuestMemory) -> Vec<(GuestAddress, u64, u64)> {
    let mut first = 0;
    mem.iter()
        .map(|r| {
            let pages = r.len() / PAGE;
            let out = (r.start_addr(), first, pages);
            first += pages;
            out
        })
        .collect()
}

fn guest_addr(mem: &GuestMemory, page: u64) -> GuestAddress {
    let mut first = 0;
    for region in mem.iter() {
        let pages = region.len() / PAGE;
        if page < first + pages {
            return GuestAddress(region.start_addr().0 + (page - first) * PAGE);
        }
        first += pages;
    }
    GuestAddress(u64::MAX)
}

/// Pages written since the last call, snapshot or restore, one flag per flat page: KVM's log
/// of the guest's writes (when tracking) together with the VMM's own writes (the guest memory
/// bitmap). Both are cleared.
pub fn take_dirty(machine: &Machine) -> Result<Vec<bool>, SnapshotError> {
    let mem = machine.vm.memory();
    let total = usize::try_from(flat_size(mem) / PAGE).expect("x86_64");
    let mut dirty = vec![false; total];
    let kvm_logs = if machine.vm.tracks_dirty_pages() {
        Some(machine.vm.take_dirty_log()?)
    } else {
        None
    };
    for (slot, (region, (_, first, pages))) in mem.iter().zip(regions(mem)).enumerate() {
        let first = usize::try_from(first).expect("x86_64");
        let pages = usize::try_from(pages).expect("x86_64");
        let vmm_words = std::ops::Deref::deref(region).bitmap().get_and_reset();
        let kvm_words = kvm_logs.as_ref().map(|l| &l[slot]);
        for page in 0..pages {
            let (word, bit) = (page / 64, page % 64);
            let by_vmm = vmm_words.get(word).is_some_and(|w| w >> bit & 1 == 1);
            let by_guest = kvm_words
                .and_then(|w| w.get(word))
                .is_some_and(|w| w >> bit & 1 == 1);
            dirty[first + page] = by_vmm || by_guest;
        }
    }
    Ok(dirty)
}

/// Puts pages taken by [`take_dirty`] back (into the guest memory bitmap, which the next
/// [`take_dirty`] reads too), after a snapshot that failed.
pub fn give_back_dirty(mem: &GuestMemory, dirty: &[bool]) {
    for (page, _) in dirty.iter().enumerate().filter(|(_, d)| **d) {
        let page = u64::try_from(page).expect("x86_64");
        crate::memory::mark_dirty(mem, guest_addr(mem, page), PAGE_SIZE);
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// What [`write_full`] wrote.
#[derive(Debug)]
pub struct FullWritten {
    /// Bytes of data written (the rest of the file is holes).
    pub bytes: u64,
    /// One flag per flat page: it holds data (false: zeros, a hole in the file).
    pub data_pages: Vec<bool>,
}

/// Writes all of guest RAM to `path` at flat offsets, leaving holes for pages that read as
/// zero. On `anonymous` memory a page the kernel has never backed is zero without reading it
/// (no swap here); memory restored from files or a page server is read in full.
pub fn write_full(
    mem: &GuestMemory,
    path: &Path,
    anonymous: bool,
) -> Result<FullWritten, SnapshotError> {
    let io = |source| SnapshotError::MemoryFile {
        path: path.to_owned(),
        source,
    };
    let mut file = create(path).map_err(io)?;
    let size = flat_size(mem);
    let mut data_pages = vec![false; usize::try_from(size / PAGE).expect("x86_64")];
    let mut page_buf = vec![0u8; PAGE_SIZE];
    for (region, (start, first, pages)) in mem.iter().zip(regions(mem)) {
        let resident = if anonymous {
            let len = usize::try_from(region.len()).expect("x86_64");
            Some(crate::memory::residency(region.as_ptr() as usize, len).map_err(io)?)
        } else {
            None
        };
        for page in 0..pages {
            let i = usize::try_from(page).expect("x86_64");
            if resident.as_ref().is_some_and(|r| !r[i]) {
                continue;
            }
            mem.read_slice(&mut page_buf, GuestAddress(start.0 + page * PAGE))
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            data_pages[usize::try_from(first + page).expect("x86_64")] = !is_zero(&page_buf);
        }
    }
    let bytes = write_pages(mem, &mut file, &data_pages, Placement::AtOwnOffset).map_err(io)?;
    file.set_len(size).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(FullWritten { bytes, data_pages })
}

/// Firecracker's Diff: a file the size of guest RAM holding only the `dirty` pages, each at
/// its own offset (the rest are holes). Returns the bytes written.
pub fn write_sparse_diff(
    mem: &GuestMemory,
    path: &Path,
    dirty: &[bool],
) -> Result<u64, SnapshotError> {
    let io = |source| SnapshotError::MemoryFile {
        path: path.to_owned(),
        source,
    };
    let mut file = create(path).map_err(io)?;
    let bytes = write_pages(mem, &mut file, dirty, Placement::AtOwnOffset).map_err(io)?;
    file.set_len(flat_size(mem)).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(bytes)
}

/// Where [`write_pages`] puts each page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// At its flat offset (identity layout).
    AtOwnOffset,
    /// One after the other from offset 0, in page order.
    Packed,
}

/// Writes the `selected` pages of guest RAM to `file`, straight from guest memory, one
/// `write` per contiguous run. Returns the bytes written.
pub fn write_pages(
    mem: &GuestMemory,
    file: &mut File,
    selected: &[bool],
    placement: Placement,
) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut page = 0usize;
    let total = selected.len();
    let region_bounds: Vec<u64> = regions(mem).iter().map(|&(_, first, _)| first).collect();
    while page < total {
        if !selected[page] {
            page += 1;
            continue;
        }
        // A run never crosses a region boundary: the next region is elsewhere in guest space.
        let mut end = page + 1;
        while end < total
            && selected[end]
            && !region_bounds.contains(&u64::try_from(end).expect("x86_64"))
        {
            end += 1;
        }
        let first = u64::try_from(page).expect("x86_64");
        let len = u64::try_from(end - page).expect("x86_64") * PAGE;
        let offset = match placement {
            Placement::AtOwnOffset => first * PAGE,
            Placement::Packed => written,
        };
        file.seek(SeekFrom::Start(offset))?;
        mem.write_all_volatile_to(
            guest_addr(mem, first),
            file,
            usize::try_from(len).expect("x86_64"),
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        written += len;
        page = end;
    }
    Ok(written)
}

fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// A memory file shorter than guest RAM would SIGBUS the VMM when the guest touches its end.
pub fn check_len(file: &File, path: &Path, want: u64) -> Result<(), SnapshotError> {
    let len = file
        .metadata()
        .map_err(|source| SnapshotError::MemoryFile {
            path: path.to_owned(),
            source,
        })?
        .len();
    if len < want {
        return Err(SnapshotError::MemoryFile {
            path: path.to_owned(),
            source: std::io::Error::other(format!(
                "{len} bytes, shorter than the {want} bytes of guest memory it must hold"
            )),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_write_full_leaves_holes_and_keeps_data() {
        let mem = crate::memory::create(16, false).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(5 * PAGE))
            .unwrap();
        mem.write_obj(0x1234_u16, GuestAddress(9 * PAGE + 100))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let out = write_full(&mem, &path, true).unwrap();
        assert_eq!(out.bytes, 2 * PAGE);
        assert!(out.data_pages[5] && out.data_pages[9] && !out.data_pages[0]);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 16 << 20);
        let at = usize::try_from(5 * PAGE).unwrap();
        assert_eq!(&bytes[at..at + 4], &0xdead_beef_u32.to_ne_bytes());
        let at = usize::try_from(9 * PAGE + 100).unwrap();
        assert_eq!(&bytes[at..at + 2], &0x1234_u16.to_ne_bytes());
    }

    #[test]
    fn test_packed_pages_follow_each_other() {
        let mem = crate::memory::create(16, false).unwrap();
        for p in [3u64, 4, 10] {
            mem.write_obj(p, GuestAddress(p * PAGE)).unwrap();
        }
        let mut selected = vec![false; 4096];
        for p in [3, 4, 10] {
            selected[p] = true;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diff");
        let mut file = create(&path).unwrap();
        let n = write_pages(&mem, &mut file, &selected, Placement::Packed).unwrap();
        assert_eq!(n, 3 * PAGE);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 3 * PAGE_SIZE);
        for (k, p) in [3u64, 4, 10].iter().enumerate() {
            let at = k * PAGE_SIZE;
            assert_eq!(&bytes[at..at + 8], &p.to_ne_bytes());
        }
    }

    #[test]
    fn test_dirty_pages_given_back_are_dirty_again() {
        use vm_memory::bitmap::Bitmap as _;
        let mem = crate::memory::create(16, false).unwrap();
        let mut dirty = vec![false; 4096];
        dirty[3] = true;
        dirty[4095] = true;
        give_back_dirty(&mem, &dirty);
        let region = mem.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(usize::try_from(3 * PAGE).unwrap()));
        assert!(
            region
                .bitmap()
                .dirty_at(usize::try_from(4095 * PAGE).unwrap())
        );
        assert!(!region.bitmap().dirty_at(usize::try_from(4 * PAGE).unwrap()));
    }

    #[test]
    fn test_vmm_writes_show_in_the_guest_memory_bitmap() {
        use vm_memory::bitmap::Bitmap as _;
        let mem = crate::memory::create(16, false).unwrap();
        mem.write_obj(1u8, GuestAddress(7 * PAGE)).unwrap();
        crate::memory::mark_dirty(&mem, GuestAddress(12 * PAGE + 5), 10);
        let region = mem.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(usize::try_from(7 * PAGE).unwrap()));
        assert!(
            region
                .bitmap()
                .dirty_at(usize::try_from(12 * PAGE).unwrap())
        );
        assert!(!region.bitmap().dirty_at(usize::try_from(8 * PAGE).unwrap()));
    }
}
