//! Prefetch sets: which pages a VM touched, in first-touch order, kept under a key (the build
//! id) so the next VM restored from the same build gets them installed before it asks.
//!
//! The in-memory [`PrefetchStore`] is shared by all VMs of a [`crate::Pager`]. A set can be
//! saved to and loaded from a small file:
//!
//! ```text
//!  offset  size      field
//!  0       8         magic  "WRNPFTCH"
//!  8       4         version (u32 LE) = 1
//!  12      4         page size (u32 LE) = 4096
//!  16      8         count n (u64 LE), at most MAX_PREFETCH_PAGES
//!  24      8 * n     page offsets in the flat memory range (u64 LE), page-aligned, distinct,
//!                    in first-touch order
//!  24+8n   4         CRC-32 (IEEE, LE) of bytes [0, 24+8n)
//! ```
//!
//! The reader checks the file size before reading it, so a hostile file costs at most
//! `MAX_PREFETCH_PAGES * 8` bytes of memory.

use std::collections::HashMap;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::regions::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"WRNPFTCH";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const CRC_LEN: usize = 4;

/// Most pages a prefetch file may list (64 GiB of 4 KiB pages; a 128 MiB file).
pub const MAX_PREFETCH_PAGES: u64 = 1 << 24;

/// A prefetch file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchFileError {
    #[error("{op} prefetch file {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("prefetch file {path}: {problem}")]
    Format {
        path: PathBuf,
        problem: FormatProblem,
    },
    #[error("no prefetch set is recorded under key {key:?}")]
    UnknownKey { key: String },
}

/// What is wrong with the bytes of a prefetch file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatProblem {
    #[error("{len} bytes is too short for the header and checksum")]
    TooShort { len: usize },
    #[error("bad magic (not a prefetch file)")]
    Magic,
    #[error("unsupported version {version}")]
    Version { version: u32 },
    #[error("page size {page_size} is not {PAGE_SIZE}")]
    PageSize { page_size: u32 },
    #[error("count {count} exceeds the cap {MAX_PREFETCH_PAGES}")]
    TooMany { count: u64 },
    #[error("length {len} does not match count {count}")]
    Length { len: usize, count: u64 },
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("entry {index}: offset {offset:#x} is not page-aligned")]
    Unaligned { index: usize, offset: u64 },
    #[error("entry {index}: offset {offset:#x} is listed twice")]
    Duplicate { index: usize, offset: u64 },
}

/// Encodes a prefetch set in the file format.
pub fn encode(pages: &[u64]) -> Vec<u8> {
    let count = u64::try_from(pages.len()).unwrap_or(u64::MAX);
    let mut bytes = Vec::with_capacity(HEADER_LEN + pages.len() * 8 + CRC_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&u32::try_from(PAGE_SIZE).unwrap_or(u32::MAX).to_le_bytes());
    bytes.extend_from_slice(&count.to_le_bytes());
    for page in pages {
        bytes.extend_from_slice(&page.to_le_bytes());
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Decodes and validates a prefetch file's bytes.
pub fn decode(bytes: &[u8]) -> Result<Vec<u64>, FormatProblem> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(FormatProblem::TooShort { len: bytes.len() });
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err(FormatProblem::Magic);
    }
    let version = u32::from_le_bytes(array(&header[8..12]));
    if version != VERSION {
        return Err(FormatProblem::Version { version });
    }
    let page_size = u32::from_le_bytes(array(&header[12..16]));
    if u64::from(page_size) != PAGE_SIZE {
        return Err(FormatProblem::PageSize { page_size });
    }
    let count = u64::from_le_bytes(array(&header[16..24]));
    if count > MAX_PREFETCH_PAGES {
        return Err(FormatProblem::TooMany { count });
    }
    // count <= 2^24, so the entry byte length fits any usize we run on.
    let entries_len = usize::try_from(count * 8).map_err(|_| FormatProblem::TooMany { count })?;
    if rest.len() != entries_len + CRC_LEN {
        return Err(FormatProblem::Length {
            len: bytes.len(),
            count,
        });
    }
    let (body, crc) = bytes.split_at(HEADER_LEN + entries_len);
    let stored = u32::from_le_bytes(array(crc));
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(FormatProblem::Checksum { stored, computed });
    }
    let mut seen = HashSet::with_capacity(rest.len() / 8);
    let mut pages = Vec::with_capacity(rest.len() / 8);
    for (index, entry) in rest[..entries_len].chunks_exact(8).enumerate() {
        let offset = u64::from_le_bytes(array(entry));
        if offset % PAGE_SIZE != 0 {
            return Err(FormatProblem::Unaligned { index, offset });
        }
        if !seen.insert(offset) {
            return Err(FormatProblem::Duplicate { index, offset });
        }
        pages.push(offset);
    }
    Ok(pages)
}

/// Reads a prefetch file, refusing files larger than the cap allows before reading them.
pub fn read_file(path: &Path) -> Result<Vec<u64>, PrefetchFileError> {
    let io_error = |op| {
        move |source| PrefetchFileError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = std::fs::File::open(path).map_err(io_error("opening"))?;
    let len = file.metadata().map_err(io_error("inspecting"))?.len();
    let max_len = u64::try_from(HEADER_LEN + CRC_LEN).unwrap_or(u64::MAX) + MAX_PREFETCH_PAGES * 8;
    if len > max_len {
        let count = len.saturating_sub(28) / 8;
        return Err(PrefetchFileError::Format {
            path: path.to_path_buf(),
            problem: FormatProblem::TooMany { count },
        });
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max_len), &mut bytes)
        .map_err(io_error("reading"))?;
    decode(&bytes).map_err(|problem| PrefetchFileError::Format {
        path: path.to_path_buf(),
        problem,
    })
}

/// Writes a prefetch file atomically (a temporary file in the same directory, then rename).
pub fn write_file(path: &Path, pages: &[u64]) -> Result<(), PrefetchFileError> {
    let io_error = |op| {
        move |source| PrefetchFileError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary).map_err(io_error("creating"))?;
    file.write_all(&encode(pages))
        .map_err(io_error("writing"))?;
    file.sync_all().map_err(io_error("syncing"))?;
    std::fs::rename(&temporary, path).map_err(io_error("renaming into place"))
}

/// Prefetch sets by key, shared by every VM of a pager.
#[derive(Debug, Default)]
pub struct PrefetchStore {
    sets: Mutex<HashMap<String, Arc<[u64]>>>,
}

impl PrefetchStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set recorded under `key`.
    pub fn get(&self, key: &str) -> Option<Arc<[u64]>> {
        self.lock().get(key).cloned()
    }

    /// Replaces the set under `key`.
    pub fn insert(&self, key: &str, pages: Vec<u64>) {
        self.lock().insert(key.to_owned(), pages.into());
    }

    /// Appends to the set under `key` the pages of `pages` it does not list yet, keeping the
    /// existing order first (pages a prefetched VM never faulted on were served by the
    /// prefetch, so the old list must stay).
    pub fn merge(&self, key: &str, pages: &[u64]) {
        let mut sets = self.lock();
        let merged: Arc<[u64]> = match sets.get(key) {
            Some(existing) => {
                let known: HashSet<u64> = existing.iter().copied().collect();
                let mut merged = existing.to_vec();
                merged.extend(pages.iter().copied().filter(|page| !known.contains(page)));
                merged.into()
            }
            None => pages.into(),
        };
        sets.insert(key.to_owned(), merged);
    }

    /// Forgets the set under `key`.
    pub fn remove(&self, key: &str) -> Option<Arc<[u64]>> {
        self.lock().remove(key)
    }

    /// Saves the set under `key` to `path`.
    pub fn save(&self, key: &str, path: &Path) -> Result<(), PrefetchFileError> {
        let pages = self.get(key).ok_or_else(|| PrefetchFileError::UnknownKey {
            key: key.to_owned(),
        })?;
        write_file(path, &pages)
    }

    /// Loads `path` as the set under `key` (replacing any); returns the page count.
    pub fn load(&self, key: &str, path: &Path) -> Result<usize, PrefetchFileError> {
        let pages = read_file(path)?;
        let count = pages.len();
        self.insert(key, pages);
        Ok(count)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<[u64]>>> {
        // The map stays consistent even if a holder panicked: every update is one insert.
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_encode_decode_roundtrip_keeps_order() {
        let pages = vec![5 * PAGE_SIZE, 0, 3 * PAGE_SIZE];
        assert_eq!(decode(&encode(&pages)).expect("decode"), pages);
    }

    #[test]
    fn test_decode_flipped_bit_is_checksum_error() {
        let mut bytes = encode(&[PAGE_SIZE, 2 * PAGE_SIZE]);
        bytes[HEADER_LEN + 9] ^= 0x10;
        assert!(matches!(
            decode(&bytes),
            Err(FormatProblem::Checksum { .. })
        ));
    }

    #[test]
    fn test_decode_truncated_is_length_error() {
        let bytes = encode(&[PAGE_SIZE, 2 * PAGE_SIZE]);
        let err = decode(&bytes[..bytes.len() - 3]).expect_err("truncated");
        assert!(matches!(err, FormatProblem::Length { .. }), "{err}");
    }

    #[test]
    fn test_decode_huge_count_is_rejected_without_allocating() {
        let mut bytes = encode(&[]);
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(FormatProblem::TooMany { count: u64::MAX })
        );
    }

    #[test]
    fn test_decode_duplicate_offset_is_rejected() {
        let err = decode(&encode(&[PAGE_SIZE, PAGE_SIZE])).expect_err("dup");
        assert_eq!(
            err,
            FormatProblem::Duplicate {
                index: 1,
                offset: PAGE_SIZE
            }
        );
    }

    #[test]
    fn test_decode_unaligned_offset_is_rejected() {
        let err = decode(&encode(&[7])).expect_err("unaligned");
        assert_eq!(
            err,
            FormatProblem::Unaligned {
                index: 0,
                offset: 7
            }
        );
    }

    #[test]
    fn test_write_then_read_file_roundtrips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("build.prefetch");
        write_file(&path, &[PAGE_SIZE * 9, PAGE_SIZE]).expect("write");
        assert_eq!(
            read_file(&path).expect("read"),
            vec![PAGE_SIZE * 9, PAGE_SIZE]
        );
    }

    #[test]
    fn test_read_file_garbage_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("garbage");
        std::fs::write(&path, b"definitely not a prefetch file").expect("write");
        let err = read_file(&path).expect_err("garbage");
        assert!(err.to_string().contains("garbage"), "{err}");
        assert!(matches!(
            err,
            PrefetchFileError::Format {
                problem: FormatProblem::Magic,
                ..
            }
        ));
    }

    #[test]
    fn test_store_merge_keeps_old_order_and_appends_new() {
        let store = PrefetchStore::new();
        store.insert("build", vec![3, 1]);
        store.merge("build", &[1, 7, 3, 9]);
        assert_eq!(&*store.get("build").expect("set"), &[3, 1, 7, 9]);
    }

    #[test]
    fn test_store_save_unknown_key_is_error() {
        let store = PrefetchStore::new();
        let err = store
            .save("nope", Path::new("/tmp/unused"))
            .expect_err("unknown");
        assert!(matches!(err, PrefetchFileError::UnknownKey { .. }), "{err}");
    }

    proptest! {
        #[test]
        fn test_decode_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn test_decode_valid_header_random_body_never_panics(
            count in 0u64..8, body in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut bytes = encode(&[]);
            bytes.truncate(HEADER_LEN);
            bytes[16..24].copy_from_slice(&count.to_le_bytes());
            bytes.extend_from_slice(&body);
            if let Ok(pages) = decode(&bytes) {
                prop_assert_eq!(u64::try_from(pages.len()).expect("small"), count);
            }
        }

        #[test]
        fn test_encode_decode_roundtrip_any_distinct_pages(pages in proptest::collection::btree_set(0u64..1_000_000, 0..50)) {
            let pages: Vec<u64> = pages.into_iter().map(|p| p * PAGE_SIZE).collect();
            prop_assert_eq!(decode(&encode(&pages)).expect("decode"), pages);
        }
    }
}
