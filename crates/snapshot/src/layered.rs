//! Reading a device through its header: [`LayeredFile`].
//!
//! Every build the header references is opened once, at [`LayeredFile::open`], and checked
//! to be at least as long as the header says, so a missing or truncated layer is found before
//! the first guest access rather than on a page fault. Reads are positioned (`pread`) and
//! take `&self`, so the page server shares one `LayeredFile` between its threads.
//!
//! ```text
//! read_at(offset, buf)
//!   offset ──lookup──> Location { build, storage_offset, run_remaining }
//!            ZERO  -> fill zeros
//!            build -> pread(file[build], storage_offset, min(len, run_remaining))
//!   repeat with the next run until buf is full
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::header::{BuildInfo, Header, HeaderError, Location};
use crate::id::BuildId;
use crate::store::{DeviceKind, Store};

/// Errors from opening or reading a layered device.
#[derive(Debug, thiserror::Error)]
pub enum LayeredError {
    #[error("header is invalid")]
    Header(#[from] HeaderError),
    #[error("opening data file {path} of build {build}")]
    Open {
        build: BuildId,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data file {path} of build {build} is {actual} bytes, the header expects {expected}")]
    Short {
        build: BuildId,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("read of {len} bytes at offset {offset} is outside the device ({size} bytes)")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("reading {path} of build {build} at {storage_offset}")]
    Read {
        build: BuildId,
        path: PathBuf,
        storage_offset: u64,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug)]
struct Layer {
    file: File,
    path: PathBuf,
    data_len: u64,
}

fn open_layer(store: &Store, info: &BuildInfo, kind: &DeviceKind) -> Result<Layer, LayeredError> {
    let path = store.data_path(info.id, kind);
    let open_err = |source| LayeredError::Open {
        build: info.id,
        path: path.clone(),
        source,
    };
    let file = File::open(&path).map_err(open_err)?;
    let actual = file.metadata().map_err(open_err)?.len();
    if actual < info.data_len {
        return Err(LayeredError::Short {
            build: info.id,
            path,
            expected: info.data_len,
            actual,
        });
    }
    Ok(Layer {
        file,
        path,
        data_len: info.data_len,
    })
}

/// A device read through its header. See the module doc.
#[derive(Debug)]
pub struct LayeredFile {
    header: Header,
    layers: HashMap<BuildId, Layer>,
}

impl LayeredFile {
    /// Validates `header` and opens the `kind` data file of every build it references.
    pub fn open(
        store: &Store,
        header: Header,
        kind: &DeviceKind,
    ) -> Result<LayeredFile, LayeredError> {
        header.validate()?;
        let mut layers = HashMap::with_capacity(header.builds.len());
        for info in &header.builds {
            layers.insert(info.id, open_layer(store, info, kind)?);
        }
        tracing::debug!(build = %header.build, generation = header.generation,
            layers = layers.len(), "opened layered {kind}");
        Ok(LayeredFile { header, layers })
    }

    /// Moves on to `header`, a later generation of the same device. Layers already open stay
    /// open and are not looked up by path again (inside the VMM's jail an imported image's
    /// symlink target is no longer reachable); only builds new in `header` are opened, and
    /// builds it no longer references are closed.
    /// `fresh` may give the data file of the header's own build, already open (its writer's
    /// descriptor), so that nothing is opened by path at all.
    pub fn advance(
        &mut self,
        store: &Store,
        header: Header,
        kind: &DeviceKind,
        fresh: Option<File>,
    ) -> Result<(), LayeredError> {
        header.validate()?;
        let mut fresh = fresh;
        let mut layers = HashMap::with_capacity(header.builds.len());
        for info in &header.builds {
            let layer = match self.layers.remove(&info.id) {
                Some(layer) if layer.data_len >= info.data_len => layer,
                _ if info.id == header.build && fresh.is_some() => Layer {
                    file: fresh.take().expect("checked"),
                    path: store.data_path(info.id, kind),
                    data_len: info.data_len,
                },
                _ => open_layer(store, info, kind)?,
            };
            layers.insert(info.id, layer);
        }
        self.header = header;
        self.layers = layers;
        Ok(())
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// Where device byte `offset` lives (zero or which build), without reading.
    pub fn location(&self, offset: u64) -> Option<Location> {
        self.header.lookup(offset)
    }

    /// Fills `buf` with the device bytes at `offset`. The range must lie within the device.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), LayeredError> {
        let buf_len = buf.len();
        let out_of_range = || LayeredError::OutOfRange {
            offset,
            len: buf_len,
            size: self.header.size,
        };
        let len = u64::try_from(buf.len()).map_err(|_| out_of_range())?;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.header.size)
        {
            return Err(out_of_range());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let position = offset + u64::try_from(done).unwrap_or(u64::MAX);
            let location = self.header.lookup(position).ok_or_else(out_of_range)?;
            let want = buf.len() - done;
            let step = usize::try_from(location.run_remaining).map_or(want, |r| r.min(want));
            self.read_run(location, &mut buf[done..done + step])?;
            done += step;
        }
        Ok(())
    }

    /// Reads bytes that lie within one run.
    fn read_run(&self, location: Location, out: &mut [u8]) -> Result<(), LayeredError> {
        if location.is_zero() {
            out.fill(0);
            return Ok(());
        }
        let Some(layer) = self.layers.get(&location.build) else {
            // validate() guarantees every referenced build is in the table, and open()
            // opened every table entry.
            return Err(LayeredError::Header(HeaderError::UnknownBuild {
                index: 0,
                build: location.build,
            }));
        };
        // The last block of a data file may be partial (an image whose size is not a
        // multiple of the block size): what lies past data_len reads as zeros.
        let present = layer.data_len.saturating_sub(location.storage_offset);
        let split = usize::try_from(present).map_or(out.len(), |p| p.min(out.len()));
        let (stored, tail) = out.split_at_mut(split);
        layer
            .file
            .read_exact_at(stored, location.storage_offset)
            .map_err(|source| LayeredError::Read {
                build: location.build,
                path: layer.path.clone(),
                storage_offset: location.storage_offset,
                source,
            })?;
        tail.fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::{DiffWriter, write_full};
    use crate::header::Run;
    use crate::store::MEM_BLOCK_SIZE;
    use std::fs;

    const BS: u64 = MEM_BLOCK_SIZE;
    const BLOCK: usize = 4096;

    fn assert_send_sync<T: Send + Sync>() {}

    /// A store with a Full memory build of 8 blocks (block i filled with i+1, block 2 zero)
    /// and a diff rewriting blocks 1 (to 0xAA) and 5 (to zeros).
    fn two_generations(tmp: &tempfile::TempDir) -> (Store, Header, Vec<u8>) {
        let store = Store::new(tmp.path());
        let base = BuildId::random().unwrap();
        store.create_build_dir(base).unwrap();
        let mut model = vec![0u8; 8 * BLOCK];
        for (i, block) in model.chunks_mut(BLOCK).enumerate() {
            if i != 2 {
                block.fill(u8::try_from(i + 1).unwrap());
            }
        }
        let full = write_full(
            &store.mem_data(base),
            |offset, buf| {
                let start = usize::try_from(offset).unwrap();
                buf.copy_from_slice(&model[start..start + buf.len()]);
                Ok(())
            },
            8 * BS,
            BS,
        )
        .unwrap();
        assert_eq!(
            full.zero_runs,
            vec![Run {
                first_block: 2,
                blocks: 1
            }]
        );
        let header = Header::full(base, 8 * BS, BS, &full.zero_runs).unwrap();

        let next = BuildId::random().unwrap();
        store.create_build_dir(next).unwrap();
        let mut writer = DiffWriter::create(&store.mem_data(next), BS).unwrap();
        writer.push(1, &[0xAA; BLOCK]).unwrap();
        writer.push(5, &[0; BLOCK]).unwrap();
        let diff = writer.finish().unwrap();
        model[BLOCK..2 * BLOCK].fill(0xAA);
        model[5 * BLOCK..6 * BLOCK].fill(0);
        let header = header.apply_diff(next, &diff.runs).unwrap();
        (store, header, model)
    }

    #[test]
    fn test_layered_file_is_send_sync() {
        assert_send_sync::<LayeredFile>();
    }

    #[test]
    fn test_layered_file_read_spanning_runs_matches_model() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, header, model) = two_generations(&tmp);
        let file = LayeredFile::open(&store, header, &DeviceKind::Mem).unwrap();
        let mut all = vec![0xFFu8; model.len()];
        file.read_at(0, &mut all).unwrap();
        assert_eq!(all, model);
        // An unaligned read across a zero run and both builds.
        let mut part = vec![0xFFu8; 3 * BLOCK];
        file.read_at(BS + 100, &mut part).unwrap();
        assert_eq!(part, model[BLOCK + 100..4 * BLOCK + 100]);
    }

    #[test]
    fn test_layered_file_location_reports_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, header, _) = two_generations(&tmp);
        let file = LayeredFile::open(&store, header, &DeviceKind::Mem).unwrap();
        assert!(file.location(2 * BS).unwrap().is_zero());
        assert!(file.location(5 * BS).unwrap().is_zero());
        assert!(!file.location(BS).unwrap().is_zero());
        assert_eq!(file.location(8 * BS), None);
    }

    #[test]
    fn test_layered_file_read_past_end_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, header, _) = two_generations(&tmp);
        let file = LayeredFile::open(&store, header, &DeviceKind::Mem).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(
            file.read_at(8 * BS - 1, &mut buf),
            Err(LayeredError::OutOfRange { .. })
        ));
        assert!(matches!(
            file.read_at(u64::MAX, &mut buf),
            Err(LayeredError::OutOfRange { .. })
        ));
    }

    #[test]
    fn test_layered_file_missing_layer_names_build_and_path() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, header, _) = two_generations(&tmp);
        let path = store.mem_data(header.base);
        fs::remove_file(&path).unwrap();
        let err = LayeredFile::open(&store, header.clone(), &DeviceKind::Mem).unwrap_err();
        assert!(matches!(err, LayeredError::Open { build, .. } if build == header.base));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn test_layered_file_short_layer_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, header, _) = two_generations(&tmp);
        let path = store.mem_data(header.build);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10)
            .unwrap();
        let err = LayeredFile::open(&store, header, &DeviceKind::Mem).unwrap_err();
        assert!(matches!(err, LayeredError::Short { actual: 10, .. }));
    }

    #[test]
    fn test_layered_file_image_tail_reads_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("image");
        fs::write(&image, vec![3u8; 5000]).unwrap();
        let store = Store::new(tmp.path().join("store"));
        let drive = crate::store::DriveId::new("rootfs").unwrap();
        let build = store.import_disk_image(&image, &drive).unwrap();
        let header = Header::read(&store.disk_header(build, &drive)).unwrap();
        let file = LayeredFile::open(&store, header, &DeviceKind::Disk(drive)).unwrap();
        let mut buf = vec![0xFFu8; 8192];
        file.read_at(0, &mut buf).unwrap();
        assert!(buf[..5000].iter().all(|&b| b == 3));
        assert!(buf[5000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn test_layered_file_concurrent_reads_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, header, model) = two_generations(&tmp);
        let file = LayeredFile::open(&store, header, &DeviceKind::Mem).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (file, model) = (&file, &model);
                scope.spawn(move || {
                    for block in 0..8u64 {
                        let offset = (block + t) % 8 * BS;
                        let mut buf = [0u8; BLOCK];
                        file.read_at(offset, &mut buf).unwrap();
                        let start = usize::try_from(offset).unwrap();
                        assert_eq!(buf[..], model[start..start + BLOCK]);
                    }
                });
            }
        });
    }
}
