//! Where page contents come from.
//!
//! The pager never knows how guest memory is stored: it asks a [`PageSource`] for one page at
//! a time, by offset in the flat memory range (the guest RAM regions concatenated in order,
//! the same offset space as a Firecracker memory file and as `"offset"` in the handshake).
//! A source answers either "zeros" (the pager installs the kernel's zero page, no copy) or
//! "data" (it filled the buffer).
//!
//! [`FileSource`] is the plain implementation: a raw memory file, byte `i` of the file is byte
//! `i` of guest memory. The layered snapshot source lives elsewhere and implements the same
//! trait.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What backs a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// The page is all zeros: serve it with `UFFDIO_ZEROPAGE`; the buffer was not filled.
    Zero,
    /// The buffer holds the page's bytes.
    Data,
}

/// A source of guest-memory pages, indexed by offset in the flat memory range.
pub trait PageSource: Send + Sync {
    /// Size of the device (guest memory as one flat range) in bytes.
    fn size(&self) -> u64;
    /// What backs the page at `offset` (page-aligned): zeros (serve with UFFDIO_ZEROPAGE, no
    /// read) or data (fill `buf`, len = page size).
    fn read_page(&self, offset: u64, buf: &mut [u8]) -> Result<PageKind, SourceError>;
}

/// Reading a page from a source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The page lies (partly) beyond the end of the device.
    #[error("page at offset {offset} (len {len}) is beyond the device size {size}")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    /// Reading the backing file failed (a short file reads as an `UnexpectedEof` error).
    #[error("reading {len} bytes at offset {offset} of {path}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// Opening or inspecting the backing file failed.
    #[error("opening memory file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Any other backend's failure (for implementations outside this crate).
    #[error("page at offset {offset}: {what}")]
    Backend {
        offset: u64,
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// A raw memory file (Firecracker's `mem_file_path` format, or our Full `memfile`): device
/// offset = file offset. Pages that read as all zeros are reported as [`PageKind::Zero`], so
/// the guest gets the shared zero page instead of a private copy of zeros.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileSource {
    /// Opens `path` read-only; the device size is the file's length at open time.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let open_error = |source| SourceError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_error)?;
        let size = file.metadata().map_err(open_error)?.len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// The file this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PageSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_page(&self, offset: u64, buf: &mut [u8]) -> Result<PageKind, SourceError> {
        let len = buf.len();
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len));
        if end.is_none_or(|end| end > self.size) {
            return Err(SourceError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| SourceError::Read {
                path: self.path.clone(),
                offset,
                len,
                source,
            })?;
        if is_all_zero(buf) {
            Ok(PageKind::Zero)
        } else {
            Ok(PageKind::Data)
        }
    }
}

/// True when every byte is zero (compares in 8-byte words; the compiler vectorises it).
pub(crate) fn is_all_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(8);
    let words_zero = words
        .by_ref()
        .all(|w| w.iter().fold(0u8, |acc, b| acc | b) == 0);
    words_zero && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents).expect("write temp file");
        file
    }

    #[test]
    fn test_file_source_data_page_reads_bytes() {
        let mut contents = vec![0u8; 8192];
        contents[4096..].fill(0xab);
        let file = file_with(&contents);
        let source = FileSource::open(file.path()).expect("open");
        let mut buf = [0u8; 4096];
        assert_eq!(
            source.read_page(4096, &mut buf).expect("read"),
            PageKind::Data
        );
        assert!(buf.iter().all(|b| *b == 0xab));
        assert_eq!(source.size(), 8192);
    }

    #[test]
    fn test_file_source_zero_page_reports_zero() {
        let file = file_with(&[0u8; 8192]);
        let source = FileSource::open(file.path()).expect("open");
        let mut buf = [1u8; 4096];
        assert_eq!(source.read_page(0, &mut buf).expect("read"), PageKind::Zero);
    }

    #[test]
    fn test_file_source_past_end_is_out_of_range() {
        let file = file_with(&[0u8; 4096]);
        let source = FileSource::open(file.path()).expect("open");
        let mut buf = [0u8; 4096];
        let err = source.read_page(4096, &mut buf).expect_err("past end");
        assert!(
            matches!(err, SourceError::OutOfRange { offset: 4096, .. }),
            "{err}"
        );
        let err = source
            .read_page(u64::MAX - 10, &mut buf)
            .expect_err("overflow");
        assert!(matches!(err, SourceError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn test_file_source_truncated_after_open_is_read_error() {
        let file = file_with(&[7u8; 8192]);
        let source = FileSource::open(file.path()).expect("open");
        file.as_file().set_len(100).expect("truncate");
        let mut buf = [0u8; 4096];
        let err = source.read_page(4096, &mut buf).expect_err("short file");
        assert!(
            matches!(err, SourceError::Read { offset: 4096, .. }),
            "{err}"
        );
    }

    #[test]
    fn test_file_source_missing_file_is_open_error() {
        let err = FileSource::open(Path::new("/nonexistent/wrenn-pager-mem")).expect_err("open");
        assert!(
            err.to_string().contains("/nonexistent/wrenn-pager-mem"),
            "{err}"
        );
    }

    #[test]
    fn test_is_all_zero_single_set_byte_is_false() {
        for position in [0usize, 7, 8, 4095, 4100] {
            let mut buf = vec![0u8; 4101];
            assert!(is_all_zero(&buf));
            buf[position] = 1;
            assert!(!is_all_zero(&buf), "byte {position}");
        }
    }
}
