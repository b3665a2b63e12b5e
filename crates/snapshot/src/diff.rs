//! Writing data files: a Diff (dirty blocks packed in order) or a Full (identity layout).
//!
//! ```text
//! Diff:  device blocks   0   1   2   3   4   5   6          dirty: 1, 2, 5 (3 is now zero)
//!        data file      [1 ][2 ][5 ]                        runs:  data 1..3, zero 3..4,
//!                                                                  data 5..6
//! Full:  data file      [0 ][1 ][2 ][ hole ][4 ][5 ][6 ]     zero runs: 3..4
//! ```
//!
//! All-zero blocks are never written: in a Diff they become zero runs, in a Full they are
//! holes (the file is seeked over, then `set_len`). Both fsync the data file before returning,
//! and both refuse to overwrite an existing file: a build's data is immutable once written.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::header::{DirtyRun, Run};

/// Bytes read and scanned per step of [`write_full`].
const FULL_CHUNK: u64 = 1 << 20;

/// Errors from writing a data file.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("block size {block_size} is not a usable power of two")]
    BadBlockSize { block_size: u64 },
    #[error("size {size} is not a multiple of block size {block_size}")]
    UnalignedSize { size: u64, block_size: u64 },
    #[error("block {block} pushed after block {previous}: blocks must come in increasing order")]
    OutOfOrder { block: u64, previous: u64 },
    #[error("block {block} has {len} bytes, expected {block_size}")]
    BadBlockLen {
        block: u64,
        len: usize,
        block_size: u64,
    },
    #[error("reading the source at offset {offset}")]
    Source {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// How a diff came out: the runs for [`crate::header::Header::apply_diff`] and the length
/// of the data file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffSummary {
    pub runs: Vec<DirtyRun>,
    pub data_len: u64,
}

/// How a full data file came out: its all-zero runs (holes) for
/// [`crate::header::Header::full`] and its length (the device size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullSummary {
    pub zero_runs: Vec<Run>,
    pub data_len: u64,
}

fn is_zero(bytes: &[u8]) -> bool {
    // Branch-free OR over small chunks vectorises; `all(|b| b == 0)` does not.
    bytes
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

fn block_size_usize(block_size: u64) -> Result<usize, DiffError> {
    usize::try_from(block_size)
        .ok()
        .filter(|&b| b > 0 && block_size.is_power_of_two())
        .ok_or(DiffError::BadBlockSize { block_size })
}

/// A new data file, opened read-write: the writer that made it can hand the same descriptor
/// to a reader (a process that may no longer open files by path, like the VMM in its jail).
fn create_new(path: &Path) -> Result<File, DiffError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| DiffError::Io {
            op: "creating data file",
            path: path.to_owned(),
            source,
        })
}

/// Appends a block (or a zero block) to a list of dirty runs, extending the last run when
/// it continues.
fn extend_runs(runs: &mut Vec<DirtyRun>, block: u64, zero: bool) {
    match runs.last_mut() {
        Some(last) if last.zero == zero && last.run.end_block() == block => last.run.blocks += 1,
        _ => runs.push(DirtyRun {
            run: Run {
                first_block: block,
                blocks: 1,
            },
            zero,
        }),
    }
}

/// Bytes a [`DiffWriter`] gathers before writing them.
const WRITE_BATCH: usize = 1 << 20;

/// Writes a Diff data file block by block. See the module doc.
#[derive(Debug)]
pub struct DiffWriter {
    file: File,
    /// Blocks not yet written: one `write` per MiB instead of one per block.
    pending: Vec<u8>,
    path: PathBuf,
    block_size: u64,
    block_len: usize,
    runs: Vec<DirtyRun>,
    /// The next block index allowed (one past the last pushed).
    next_block: u64,
    data_len: u64,
}

impl DiffWriter {
    /// Creates the data file at `path`, which must not exist.
    pub fn create(path: &Path, block_size: u64) -> Result<DiffWriter, DiffError> {
        let block_len = block_size_usize(block_size)?;
        let file = create_new(path)?;
        Ok(DiffWriter {
            file,
            pending: Vec::with_capacity(WRITE_BATCH),
            path: path.to_owned(),
            block_size,
            block_len,
            runs: Vec::new(),
            next_block: 0,
            data_len: 0,
        })
    }

    /// Records block `block_index` with contents `data` (exactly one block). Blocks come in
    /// strictly increasing order; an all-zero block becomes a zero run and is not written.
    pub fn push(&mut self, block_index: u64, data: &[u8]) -> Result<(), DiffError> {
        if data.len() != self.block_len {
            return Err(DiffError::BadBlockLen {
                block: block_index,
                len: data.len(),
                block_size: self.block_size,
            });
        }
        if block_index < self.next_block {
            return Err(DiffError::OutOfOrder {
                block: block_index,
                previous: self.next_block - 1,
            });
        }
        let zero = is_zero(data);
        if !zero {
            self.pending.extend_from_slice(data);
            if self.pending.len() >= WRITE_BATCH {
                self.write_pending()?;
            }
            self.data_len += self.block_size;
        }
        extend_runs(&mut self.runs, block_index, zero);
        self.next_block = block_index.saturating_add(1);
        Ok(())
    }

    /// Fsyncs the data file and returns the runs to apply.
    pub fn finish(self) -> Result<DiffSummary, DiffError> {
        self.finish_with_file().map(|(summary, _)| summary)
    }

    fn write_pending(&mut self) -> Result<(), DiffError> {
        self.file
            .write_all(&self.pending)
            .map_err(|source| DiffError::Io {
                op: "writing",
                path: self.path.clone(),
                source,
            })?;
        self.pending.clear();
        Ok(())
    }

    /// [`DiffWriter::finish`], also giving back the data file (open for reading).
    pub fn finish_with_file(mut self) -> Result<(DiffSummary, File), DiffError> {
        self.write_pending()?;
        self.file.sync_all().map_err(|source| DiffError::Io {
            op: "syncing",
            path: self.path.clone(),
            source,
        })?;
        tracing::debug!(path = %self.path.display(), runs = self.runs.len(),
            data_len = self.data_len, "wrote diff data file");
        Ok((
            DiffSummary {
                runs: self.runs,
                data_len: self.data_len,
            },
            self.file,
        ))
    }
}

/// Writes a Full data file of `size` bytes at `path` (which must not exist), reading the
/// device through `read_at(offset, buf)` (fill `buf` with the bytes at `offset`). All-zero
/// blocks are left as holes and returned as zero runs.
pub fn write_full(
    path: &Path,
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    block_size: u64,
) -> Result<FullSummary, DiffError> {
    let block_len = block_size_usize(block_size)?;
    if !size.is_multiple_of(block_size) {
        return Err(DiffError::UnalignedSize { size, block_size });
    }
    let io_err = |op: &'static str| {
        move |source| DiffError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let file = create_new(path)?;
    let chunk = FULL_CHUNK.max(block_size);
    let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(block_len)];
    let mut runs = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = usize::try_from(chunk.min(size - offset)).unwrap_or(block_len);
        let buf = &mut buf[..len];
        read_at(offset, buf).map_err(|source| DiffError::Source { offset, source })?;
        // Write each maximal run of non-zero blocks with one call.
        let mut pending: Option<(u64, usize)> = None;
        for (i, block) in buf.chunks_exact(block_len).enumerate() {
            let start = i * block_len;
            let block_offset = offset + u64::try_from(start).unwrap_or(0);
            if is_zero(block) {
                extend_runs(&mut runs, block_offset / block_size, true);
                if let Some((at, from)) = pending.take() {
                    file.write_all_at(&buf[from..start], at)
                        .map_err(io_err("writing"))?;
                }
            } else if pending.is_none() {
                pending = Some((block_offset, start));
            }
        }
        if let Some((at, from)) = pending {
            file.write_all_at(&buf[from..], at)
                .map_err(io_err("writing"))?;
        }
        offset += u64::try_from(len).unwrap_or(0);
    }
    file.set_len(size).map_err(io_err("setting length of"))?;
    file.sync_all().map_err(io_err("syncing"))?;
    let zero_runs: Vec<Run> = runs.into_iter().map(|d| d.run).collect();
    tracing::debug!(path = %path.display(), size, zero_runs = zero_runs.len(),
        "wrote full data file");
    Ok(FullSummary {
        zero_runs,
        data_len: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    const BS: u64 = 4096;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; 4096]
    }

    #[test]
    fn test_diff_writer_packs_blocks_and_records_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("memfile");
        let mut w = DiffWriter::create(&path, BS).unwrap();
        w.push(1, &block(1)).unwrap();
        w.push(2, &block(2)).unwrap();
        w.push(3, &block(0)).unwrap();
        w.push(5, &block(5)).unwrap();
        let summary = w.finish().unwrap();
        assert_eq!(summary.data_len, 3 * BS);
        let run = |first_block, blocks, zero| DirtyRun {
            run: Run {
                first_block,
                blocks,
            },
            zero,
        };
        assert_eq!(
            summary.runs,
            vec![run(1, 2, false), run(3, 1, true), run(5, 1, false)]
        );
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 3 * 4096);
        assert_eq!((bytes[0], bytes[4096], bytes[8192]), (1, 2, 5));
    }

    #[test]
    fn test_diff_writer_out_of_order_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = DiffWriter::create(&tmp.path().join("d"), BS).unwrap();
        w.push(4, &block(1)).unwrap();
        assert!(matches!(
            w.push(4, &block(1)),
            Err(DiffError::OutOfOrder {
                block: 4,
                previous: 4
            })
        ));
        assert!(matches!(
            w.push(2, &block(1)),
            Err(DiffError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn test_diff_writer_wrong_block_len_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = DiffWriter::create(&tmp.path().join("d"), BS).unwrap();
        assert!(matches!(
            w.push(0, &[1u8; 100]),
            Err(DiffError::BadBlockLen { len: 100, .. })
        ));
    }

    #[test]
    fn test_diff_writer_existing_file_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d");
        fs::write(&path, b"keep").unwrap();
        assert!(matches!(
            DiffWriter::create(&path, BS),
            Err(DiffError::Io { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn test_write_full_leaves_holes_for_zero_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("memfile");
        // 600 blocks (crosses the 1 MiB chunk): data in blocks 0, 300..302 and 599.
        let size = 600 * BS;
        let mut source = vec![0u8; usize::try_from(size).unwrap()];
        source[..4096].fill(7);
        source[300 * 4096..302 * 4096].fill(8);
        source[599 * 4096 + 17] = 9;
        let summary = write_full(
            &path,
            |offset, buf| {
                let start = usize::try_from(offset).unwrap();
                buf.copy_from_slice(&source[start..start + buf.len()]);
                Ok(())
            },
            size,
            BS,
        )
        .unwrap();
        let run = |first_block, blocks| Run {
            first_block,
            blocks,
        };
        assert_eq!(summary.zero_runs, vec![run(1, 299), run(302, 297)]);
        assert_eq!(summary.data_len, size);
        assert_eq!(fs::read(&path).unwrap(), source);
        // Holes: far fewer 512-byte sectors allocated than the file's length.
        let meta = fs::metadata(&path).unwrap();
        assert!(
            meta.blocks() * 512 < size / 4,
            "allocated {}",
            meta.blocks() * 512
        );
    }

    #[test]
    fn test_write_full_source_error_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let err = write_full(
            &tmp.path().join("m"),
            |_, _| Err(io::Error::other("boom")),
            BS,
            BS,
        );
        assert!(matches!(err, Err(DiffError::Source { offset: 0, .. })));
    }

    #[test]
    fn test_write_full_unaligned_size_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let err = write_full(&tmp.path().join("m"), |_, _| Ok(()), BS + 1, BS);
        assert!(matches!(err, Err(DiffError::UnalignedSize { .. })));
    }
}
