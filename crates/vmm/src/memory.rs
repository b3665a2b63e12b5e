//! Guest RAM: anonymous private mappings laid out around the 32-bit MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest and largest guest RAM the VMM accepts, in MiB.
pub const MIN_MEM_MIB: u64 = 16;
pub const MAX_MEM_MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, not {0}")]
    Size(u64),
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

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
/// guest touches them).
pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    GuestMemoryMmap::from_ranges(&ranges(mib)?).map_err(|source| MemoryError::Map { mib, source })
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
}
