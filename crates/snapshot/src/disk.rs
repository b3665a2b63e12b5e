//! A writable layered disk for virtio-blk: [`LayeredDisk`].
//!
//! ```text
//!                 read                          write
//!                  |                              |
//!       present[block]? --yes--> overlay <--------+  (partial block not present:
//!                  | no           (sparse,           copy it from the layers first)
//!                  v               private)          sets present + dirty
//!            LayeredFile (header -> builds' data files, read-only)
//!
//! snapshot(new_build): dirty blocks of the overlay --DiffWriter--> disk-<drive>.data
//!                      header.apply_diff(...)                  --> disk-<drive>.header
//!                      dirty cleared; present blocks keep being served by the overlay
//! ```
//!
//! Layers are never written. The overlay starts empty on every open: which of its blocks
//! hold data is known only from the in-memory `present` bitmap, so an old overlay's content
//! is meaningless and is discarded. No operation copies the whole disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::diff::{DiffError, DiffWriter};
use crate::header::{Header, HeaderError};
use crate::id::BuildId;
use crate::layered::{LayeredError, LayeredFile};
use crate::store::{DeviceKind, DriveId, Store, StoreError};

/// Blocks copied per read while snapshotting.
const SNAPSHOT_BATCH_BLOCKS: u64 = 256;

/// Errors from the layered disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Layered(#[from] LayeredError),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(transparent)]
    Diff(#[from] DiffError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{op} overlay {path}")]
    Overlay {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("access of {len} bytes at offset {offset} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("disk of {size} bytes is too large for this host's address space")]
    TooLarge { size: u64 },
}

/// One bit per block.
#[derive(Clone, Debug)]
struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    fn new(bits: u64) -> Option<Bitmap> {
        let words = usize::try_from(bits.div_ceil(64)).ok()?;
        Some(Bitmap {
            words: vec![0; words],
        })
    }

    fn word(bit: u64) -> (usize, u64) {
        (
            usize::try_from(bit / 64).unwrap_or(usize::MAX),
            1 << (bit % 64),
        )
    }

    fn get(&self, bit: u64) -> bool {
        let (word, mask) = Bitmap::word(bit);
        self.words.get(word).is_some_and(|w| w & mask != 0)
    }

    fn set(&mut self, bit: u64) {
        let (word, mask) = Bitmap::word(bit);
        if let Some(w) = self.words.get_mut(word) {
            *w |= mask;
        }
    }

    fn clear_all(&mut self) {
        self.words.fill(0);
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The set bits, in increasing order.
    fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().zip(0u64..).flat_map(|(&word, index)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                Some(index * 64 + bit)
            })
        })
    }
}

/// A layered disk with a private overlay. See the module doc.
#[derive(Debug)]
pub struct LayeredDisk {
    store: Store,
    drive: DriveId,
    layers: LayeredFile,
    overlay: File,
    overlay_path: PathBuf,
    block_size: u64,
    /// Blocks whose current content is in the overlay.
    present: Bitmap,
    /// Blocks written since the last snapshot (a subset of `present`).
    dirty: Bitmap,
}

impl LayeredDisk {
    /// Opens drive `drive` at `header`, with a fresh sparse overlay at `overlay_path`
    /// (created, or truncated if it exists).
    pub fn open(
        store: &Store,
        header: Header,
        drive: &DriveId,
        overlay_path: &Path,
    ) -> Result<LayeredDisk, DiskError> {
        let size = header.size;
        let block_size = header.block_size;
        let layers = LayeredFile::open(store, header, &DeviceKind::Disk(drive.clone()))?;
        let overlay_err = |op: &'static str| {
            move |source| DiskError::Overlay {
                op,
                path: overlay_path.to_owned(),
                source,
            }
        };
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(overlay_path)
            .map_err(overlay_err("creating"))?;
        overlay.set_len(size).map_err(overlay_err("sizing"))?;
        let blocks = size / block_size;
        let bitmap = Bitmap::new(blocks).ok_or(DiskError::TooLarge { size })?;
        Ok(LayeredDisk {
            store: store.clone(),
            drive: drive.clone(),
            layers,
            overlay,
            overlay_path: overlay_path.to_owned(),
            block_size,
            present: bitmap.clone(),
            dirty: bitmap,
        })
    }

    /// The header the disk currently reads through.
    pub fn header(&self) -> &Header {
        self.layers.header()
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.layers.size()
    }

    /// Blocks written since the last snapshot.
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty.count()
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<u64, DiskError> {
        let size = self.size();
        u64::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .filter(|&end| end <= size)
            .ok_or(DiskError::OutOfRange { offset, len, size })
    }

    fn overlay_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> DiskError + '_ {
        move |source| DiskError::Overlay {
            op,
            path: self.overlay_path.clone(),
            source,
        }
    }

    /// Fills `buf` with the disk bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let end = self.check_range(offset, buf.len())?;
        let mut position = offset;
        while position < end {
            // The longest stretch whose blocks all come from the same side.
            let in_overlay = self.present.get(position / self.block_size);
            let mut stretch_end = (position / self.block_size + 1) * self.block_size;
            while stretch_end < end && self.present.get(stretch_end / self.block_size) == in_overlay
            {
                stretch_end += self.block_size;
            }
            let stretch_end = stretch_end.min(end);
            let from = usize::try_from(position - offset).unwrap_or(usize::MAX);
            let to = usize::try_from(stretch_end - offset).unwrap_or(usize::MAX);
            let out = &mut buf[from..to];
            if in_overlay {
                self.overlay
                    .read_exact_at(out, position)
                    .map_err(self.overlay_err("reading"))?;
            } else {
                self.layers.read_at(position, out)?;
            }
            position = stretch_end;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let end = self.check_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / self.block_size;
        let last = (end - 1) / self.block_size;
        // Only the first and last blocks can be partially covered; bring their old content
        // into the overlay so the untouched part survives.
        for block in [first, last] {
            let start = block * self.block_size;
            let fully_covered = start >= offset && start + self.block_size <= end;
            if !fully_covered && !self.present.get(block) {
                self.copy_up(block)?;
            }
        }
        self.overlay
            .write_all_at(data, offset)
            .map_err(self.overlay_err("writing"))?;
        for block in first..=last {
            self.present.set(block);
            self.dirty.set(block);
        }
        Ok(())
    }

    /// Copies one block from the layers into the overlay.
    fn copy_up(&mut self, block: u64) -> Result<(), DiskError> {
        let mut buf = vec![0u8; usize::try_from(self.block_size).unwrap_or(0)];
        let start = block * self.block_size;
        self.layers.read_at(start, &mut buf)?;
        self.overlay
            .write_all_at(&buf, start)
            .map_err(self.overlay_err("writing"))?;
        self.present.set(block);
        Ok(())
    }

    /// Makes written data durable in the overlay (fdatasync).
    pub fn flush(&self) -> Result<(), DiskError> {
        self.overlay
            .sync_data()
            .map_err(self.overlay_err("syncing"))
    }

    /// Writes the blocks dirtied since the last snapshot as build `new_build`
    /// (`disk-<drive>.data` packed, `disk-<drive>.header`), then reads through the new header
    /// and clears the dirty set. Returns the new header.
    pub fn snapshot(&mut self, new_build: BuildId) -> Result<Header, DiskError> {
        let kind = DeviceKind::Disk(self.drive.clone());
        self.store.create_build_dir(new_build)?;
        let data_path = self.store.disk_data(new_build, &self.drive);
        let mut writer = DiffWriter::create(&data_path, self.block_size)?;
        let block_len = usize::try_from(self.block_size).unwrap_or(0);
        let mut buf = Vec::new();
        let dirty: Vec<u64> = self.dirty.ones().collect();
        for batch in dirty.chunk_by(|a, b| b == &(a + 1) && b % SNAPSHOT_BATCH_BLOCKS != 0) {
            let first = batch[0];
            buf.resize(batch.len() * block_len, 0);
            self.overlay
                .read_exact_at(&mut buf, first * self.block_size)
                .map_err(self.overlay_err("reading"))?;
            for (block, data) in batch.iter().zip(buf.chunks_exact(block_len)) {
                writer.push(*block, data)?;
            }
        }
        let (diff, data_file) = writer.finish_with_file()?;
        let header = self.header().apply_diff(new_build, &diff.runs)?;
        header.write(&self.store.disk_header(new_build, &self.drive))?;
        self.layers
            .advance(&self.store, header.clone(), &kind, Some(data_file))?;
        self.dirty.clear_all();
        tracing::info!(build = %new_build, drive = %self.drive, generation = header.generation,
            dirty_blocks = dirty.len(), data_len = diff.data_len, "disk snapshot written");
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    const BS: u64 = 4096;

    struct Fixture {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        store: Store,
        drive: DriveId,
        header: Header,
        /// The image's bytes, zero-extended to the disk size.
        model: Vec<u8>,
    }

    /// An imported image of `len` bytes filled with a pattern.
    fn fixture(len: usize) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let image: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        fs::write(dir.join("image"), &image).unwrap();
        let store = Store::new(dir.join("store"));
        let drive = DriveId::new("rootfs").unwrap();
        let build = store.import_disk_image(&dir.join("image"), &drive).unwrap();
        let header = Header::read(&store.disk_header(build, &drive)).unwrap();
        let mut model = image;
        model.resize(usize::try_from(header.size).unwrap(), 0);
        Fixture {
            _tmp: tmp,
            dir,
            store,
            drive,
            header,
            model,
        }
    }

    impl Fixture {
        fn open(&self, header: Header, overlay: &str) -> LayeredDisk {
            LayeredDisk::open(&self.store, header, &self.drive, &self.dir.join(overlay)).unwrap()
        }
    }

    fn read_all(disk: &LayeredDisk) -> Vec<u8> {
        let mut buf = vec![0xEEu8; usize::try_from(disk.size()).unwrap()];
        disk.read_at(0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn test_layered_disk_snapshot_keeps_layers_unreachable_by_path() {
        // Inside the VMM's jail the imported image's symlink target is gone from view: a
        // snapshot must keep reading through the file it opened, not open it again.
        let f = fixture(4 * 4096);
        let mut disk = f.open(f.header.clone(), "overlay");
        disk.write_at(0, &[7; 10]).unwrap();
        fs::rename(f.dir.join("image"), f.dir.join("image-moved")).unwrap();
        let build = BuildId::random().unwrap();
        let header = disk.snapshot(build).unwrap();
        assert_eq!(header.generation, 1);
        let mut model = f.model.clone();
        model[..10].fill(7);
        assert_eq!(read_all(&disk), model);
    }

    #[test]
    fn test_layered_disk_fresh_reads_image() {
        let f = fixture(5 * 4096 + 100);
        let disk = f.open(f.header.clone(), "overlay");
        assert_eq!(disk.size(), 6 * BS);
        assert_eq!(read_all(&disk), f.model);
    }

    #[test]
    fn test_layered_disk_partial_write_keeps_rest_of_block() {
        let f = fixture(4 * 4096);
        let mut disk = f.open(f.header.clone(), "overlay");
        disk.write_at(BS + 10, &[0xAB; 20]).unwrap();
        let mut model = f.model.clone();
        model[4096 + 10..4096 + 30].fill(0xAB);
        assert_eq!(read_all(&disk), model);
        assert_eq!(disk.dirty_blocks(), 1);
    }

    #[test]
    fn test_layered_disk_write_spanning_blocks_reads_back() {
        let f = fixture(4 * 4096);
        let mut disk = f.open(f.header.clone(), "overlay");
        disk.write_at(BS - 5, &[7u8; 4096 + 10]).unwrap();
        let mut model = f.model.clone();
        model[4096 - 5..2 * 4096 + 5].fill(7);
        assert_eq!(read_all(&disk), model);
        assert_eq!(disk.dirty_blocks(), 3);
    }

    #[test]
    fn test_layered_disk_out_of_range_rejected() {
        let f = fixture(4 * 4096);
        let mut disk = f.open(f.header.clone(), "overlay");
        assert!(matches!(
            disk.write_at(4 * BS - 1, &[1, 2]),
            Err(DiskError::OutOfRange { .. })
        ));
        let mut buf = [0u8; 1];
        assert!(matches!(
            disk.read_at(4 * BS, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
    }

    #[test]
    fn test_layered_disk_snapshot_stores_only_dirty_blocks() {
        let f = fixture(64 * 4096);
        let mut disk = f.open(f.header.clone(), "overlay");
        disk.write_at(3 * BS, &[1u8; 4096]).unwrap();
        disk.write_at(40 * BS + 7, &[2u8; 3]).unwrap();
        disk.write_at(50 * BS, &[0u8; 4096]).unwrap();
        let new_build = BuildId::random().unwrap();
        let header = disk.snapshot(new_build).unwrap();
        assert_eq!(header.generation, 1);
        assert_eq!(header.base, f.header.build);
        // Two data blocks; block 50 became a zero run.
        let data = f.store.disk_data(new_build, &f.drive);
        assert_eq!(fs::metadata(&data).unwrap().len(), 2 * BS);
        assert!(header.lookup(50 * BS).unwrap().is_zero());
        assert_eq!(disk.dirty_blocks(), 0);
        assert_eq!(
            Header::read(&f.store.disk_header(new_build, &f.drive)).unwrap(),
            header
        );
    }

    #[test]
    fn test_layered_disk_snapshot_without_writes_adds_generation() {
        let f = fixture(4 * 4096);
        let mut disk = f.open(f.header.clone(), "overlay");
        let header = disk.snapshot(BuildId::random().unwrap()).unwrap();
        assert_eq!(header.generation, 1);
        assert_eq!(header.mappings, f.header.mappings);
        assert_eq!(read_all(&disk), f.model);
    }

    #[test]
    fn test_layered_disk_bitmap_ones_in_order() {
        let mut bitmap = Bitmap::new(200).unwrap();
        for bit in [199, 0, 64, 63, 65] {
            bitmap.set(bit);
        }
        assert_eq!(bitmap.ones().collect::<Vec<_>>(), vec![0, 63, 64, 65, 199]);
        assert_eq!(bitmap.count(), 5);
        assert!(bitmap.get(64) && !bitmap.get(66) && !bitmap.get(10_000));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write { offset: u64, len: usize, seed: u8 },
        Snapshot,
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..size, 1usize..3 * 4096, any::<u8>()).prop_map(|(offset, len, seed)| Op::Write {
                offset,
                len,
                seed
            }),
            1 => Just(Op::Snapshot),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn test_layered_disk_random_writes_match_model(
            ops in proptest::collection::vec(op(17 * 4096), 1..40)
        ) {
            let f = fixture(16 * 4096 + 1000);
            let mut disk = f.open(f.header.clone(), "overlay");
            let mut model = f.model.clone();
            let size = disk.size();
            for op in ops.iter().chain([Op::Snapshot].iter()) {
                match *op {
                    Op::Write { offset, len, seed } => {
                        let len = usize::try_from(size - offset).unwrap().min(len);
                        // Seed 0 writes zeros, so blocks can turn into zero runs.
                        let data: Vec<u8> = (0..len)
                            .map(|i| if seed == 0 { 0 } else { seed.wrapping_add(u8::try_from(i % 256).unwrap()) })
                            .collect();
                        disk.write_at(offset, &data).unwrap();
                        let start = usize::try_from(offset).unwrap();
                        model[start..start + len].copy_from_slice(&data);
                    }
                    Op::Snapshot => {
                        disk.snapshot(BuildId::random().unwrap()).unwrap();
                    }
                }
                prop_assert_eq!(read_all(&disk), model.clone());
            }
            // A fresh disk from the latest header file, with a new empty overlay.
            let latest = Header::read(&f.store.disk_header(disk.header().build, &f.drive)).unwrap();
            let fresh = f.open(latest, "overlay2");
            prop_assert_eq!(read_all(&fresh), model);
        }
    }
}
