//! Compaction: folding a chain of builds into one Full build.
//!
//! ```text
//! before   header (gen 7) ──> builds A, C, D, F, G  (one lookup each, but 5 files to keep)
//! after    header (gen 0) ──> build N: identity data file, holes where the device is zero
//! ```
//!
//! Every run is read through the layered view and written into the new build with
//! [`write_full`], so the result reads identically. Only the device's data file and header
//! are written; the caller copies whatever else the build needs (the VM state).

use crate::diff::{DiffError, write_full};
use crate::header::{Header, HeaderError};
use crate::id::BuildId;
use crate::layered::{LayeredError, LayeredFile};
use crate::store::{DeviceKind, Store, StoreError};

/// Errors from compaction.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("build {build} is already in the chain being compacted")]
    BuildReused { build: BuildId },
    #[error("the new build id is the reserved zero id")]
    ZeroBuild,
    #[error(transparent)]
    Layered(#[from] LayeredError),
    #[error(transparent)]
    Diff(#[from] DiffError),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The number of distinct builds `header` reads from: how many files a restore must open
/// and keep. Callers compact when this grows past their limit.
pub fn chain_depth(header: &Header) -> usize {
    header.builds.len()
}

/// Writes the device `kind` described by `header` as a new Full build `new_build`
/// (generation 0, its own base) and returns the new header, also written to the store.
pub fn compact(
    store: &Store,
    header: &Header,
    new_build: BuildId,
    kind: &DeviceKind,
) -> Result<Header, CompactError> {
    if new_build.is_zero() {
        return Err(CompactError::ZeroBuild);
    }
    if new_build == header.build || header.data_len(new_build).is_some() {
        return Err(CompactError::BuildReused { build: new_build });
    }
    let source = LayeredFile::open(store, header.clone(), kind)?;
    store.create_build_dir(new_build)?;
    let full = write_full(
        &store.data_path(new_build, kind),
        |offset, buf| {
            // Zero runs need no read at all.
            match source.location(offset) {
                Some(loc)
                    if loc.is_zero()
                        && loc.run_remaining >= u64::try_from(buf.len()).unwrap_or(u64::MAX) =>
                {
                    buf.fill(0);
                    Ok(())
                }
                _ => source.read_at(offset, buf).map_err(std::io::Error::other),
            }
        },
        header.size,
        header.block_size,
    )?;
    let compacted = Header::full(new_build, header.size, header.block_size, &full.zero_runs)?;
    compacted.write(&store.header_path(new_build, kind))?;
    tracing::info!(from = %header.build, to = %new_build, kind = %kind,
        depth_before = chain_depth(header), "compacted");
    Ok(compacted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::LayeredDisk;
    use crate::store::DriveId;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    const BS: u64 = 4096;

    #[test]
    fn test_compact_disk_chain_reads_identically() {
        let tmp = tempfile::tempdir().unwrap();
        let image: Vec<u8> = (0..40 * 4096)
            .map(|i| u8::try_from(i % 239).unwrap())
            .collect();
        fs::write(tmp.path().join("image"), &image).unwrap();
        let store = Store::new(tmp.path().join("store"));
        let drive = DriveId::new("rootfs").unwrap();
        let kind = DeviceKind::Disk(drive.clone());
        let base = store
            .import_disk_image(&tmp.path().join("image"), &drive)
            .unwrap();
        let header = Header::read(&store.disk_header(base, &drive)).unwrap();

        // Three generations of writes, including zeroing a stretch of blocks.
        let mut disk = LayeredDisk::open(&store, header, &drive, &tmp.path().join("ov")).unwrap();
        disk.write_at(5 * BS + 3, &[9u8; 5000]).unwrap();
        disk.snapshot(BuildId::random().unwrap()).unwrap();
        disk.write_at(20 * BS, &vec![0u8; 10 * 4096]).unwrap();
        disk.snapshot(BuildId::random().unwrap()).unwrap();
        disk.write_at(BS, &[4u8; 100]).unwrap();
        let header = disk.snapshot(BuildId::random().unwrap()).unwrap();
        assert_eq!(chain_depth(&header), 3);
        let mut before = vec![0u8; 40 * 4096];
        disk.read_at(0, &mut before).unwrap();

        let new_build = BuildId::random().unwrap();
        let compacted = compact(&store, &header, new_build, &kind).unwrap();
        assert_eq!(compacted.generation, 0);
        assert_eq!((compacted.build, compacted.base), (new_build, new_build));
        assert_eq!(chain_depth(&compacted), 1);
        assert!(compacted.lookup(25 * BS).unwrap().is_zero());
        assert_eq!(
            Header::read(&store.disk_header(new_build, &drive)).unwrap(),
            compacted
        );

        let reopened = LayeredFile::open(&store, compacted, &kind).unwrap();
        let mut after = vec![0u8; 40 * 4096];
        reopened.read_at(0, &mut after).unwrap();
        assert_eq!(after, before);
        // The zeroed stretch is a hole, not written data.
        let meta = fs::metadata(store.disk_data(new_build, &drive)).unwrap();
        assert!(
            meta.blocks() * 512 <= 31 * BS,
            "allocated {}",
            meta.blocks() * 512
        );
    }

    #[test]
    fn test_compact_reused_build_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let build = BuildId::random().unwrap();
        let header = Header::full(build, 4 * BS, BS, &[]).unwrap();
        assert!(matches!(
            compact(&store, &header, build, &DeviceKind::Mem),
            Err(CompactError::BuildReused { .. })
        ));
        assert!(matches!(
            compact(&store, &header, BuildId::ZERO, &DeviceKind::Mem),
            Err(CompactError::ZeroBuild)
        ));
    }

    #[test]
    fn test_compact_missing_layer_fails_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let header = Header::full(BuildId::random().unwrap(), 4 * BS, BS, &[]).unwrap();
        let new_build = BuildId::random().unwrap();
        let err = compact(&store, &header, new_build, &DeviceKind::Mem);
        assert!(matches!(
            err,
            Err(CompactError::Layered(LayeredError::Open { .. }))
        ));
        assert!(!store.build_dir(new_build).exists());
    }
}
