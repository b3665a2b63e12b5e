//! The one versioned envelope around every binary file Wrenn writes (headers, VM state).
//!
//! ```text
//! offset 0        8         12     16            24                 24+len
//!        +--------+---------+------+-------------+------------------+---------+
//!        | magic  | version | kind | payload_len | payload          | crc32   |
//!        | 8 B    | u32 LE  | u32  | u64 LE      | postcard, len B  | u32 LE  |
//!        +--------+---------+------+-------------+------------------+---------+
//!          "WRENNSNP"                                  crc32 covers bytes [0, 24+len)
//! ```
//!
//! A reader checks, in this order, each with its own error: the file is at least as long as
//! the fixed parts, the magic, the kind, the version (no cross-version reads: a format change
//! bumps it), `payload_len` against the actual size and against the caller's cap (a hostile
//! length never drives an allocation), the CRC, then the postcard decode (which must consume
//! the whole payload).
//!
//! Writes go to a temporary file in the same directory, are fsynced, renamed over the target
//! and the directory is fsynced: a reader sees the old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub const MAGIC: [u8; 8] = *b"WRENNSNP";
/// Bytes before the payload.
pub const PREFIX_LEN: usize = 24;
/// Bytes of the fixed parts: prefix and CRC.
pub const FIXED_LEN: usize = PREFIX_LEN + 4;

/// What a container holds. The numbers are part of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// A layered mapping header ([`crate::header::Header`]).
    Header = 1,
    /// The VMM's VM state (its own payload type).
    VmState = 2,
}

impl Kind {
    fn code(self) -> u32 {
        self as u32
    }
}

/// A container's bytes are wrong (no file involved; see [`ContainerError`] for files).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: {len} bytes, the fixed parts alone take {FIXED_LEN}")]
    Truncated { len: u64 },
    #[error("bad magic {found:02x?}, expected \"WRENNSNP\"")]
    BadMagic { found: [u8; 8] },
    #[error("kind is {found}, expected {expected:?} ({})", expected.code())]
    WrongKind { expected: Kind, found: u32 },
    #[error("format version is {found}, this build reads version {expected}")]
    WrongVersion { expected: u32, found: u32 },
    #[error("payload_len {payload_len} does not match the size: {len} bytes hold {available}")]
    LengthMismatch {
        payload_len: u64,
        len: u64,
        available: u64,
    },
    #[error("payload_len {payload_len} exceeds the cap of {max_bytes} bytes")]
    TooLarge { payload_len: u64, max_bytes: u64 },
    #[error("crc32 mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("payload does not decode")]
    Decode(#[source] postcard::Error),
    #[error("payload has {trailing} bytes after the encoded value")]
    TrailingBytes { trailing: usize },
    #[error("payload does not encode")]
    Encode(#[source] postcard::Error),
}

/// Reading or writing a container file failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid snapshot file")]
    Invalid {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
}

/// Encodes `value` into a complete container.
pub fn encode<T: Serialize>(kind: Kind, version: u32, value: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(value).map_err(FormatError::Encode)?;
    let payload_len = u64::try_from(payload.len()).unwrap_or(u64::MAX);
    let mut bytes = Vec::with_capacity(FIXED_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&kind.code().to_le_bytes());
    bytes.extend_from_slice(&payload_len.to_le_bytes());
    bytes.extend_from_slice(&payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Checks the fixed prefix of a container whose total size is `total_len`; returns the
/// payload length. `prefix` may be shorter than [`PREFIX_LEN`] only if the whole thing is.
fn check_prefix(
    prefix: &[u8],
    total_len: u64,
    kind: Kind,
    expected_version: u32,
    max_bytes: u64,
) -> Result<usize, FormatError> {
    let fixed = u64::try_from(FIXED_LEN).unwrap_or(u64::MAX);
    let (Some(magic), Some(version), Some(found_kind), Some(payload_len)) = (
        prefix.get(0..8),
        prefix.get(8..12),
        prefix.get(12..16),
        prefix.get(16..24),
    ) else {
        return Err(FormatError::Truncated { len: total_len });
    };
    if total_len < fixed {
        return Err(FormatError::Truncated { len: total_len });
    }
    let mut found_magic = [0u8; 8];
    found_magic.copy_from_slice(magic);
    if found_magic != MAGIC {
        return Err(FormatError::BadMagic { found: found_magic });
    }
    let found_kind = u32::from_le_bytes(le4(found_kind));
    if found_kind != kind.code() {
        return Err(FormatError::WrongKind {
            expected: kind,
            found: found_kind,
        });
    }
    let version = u32::from_le_bytes(le4(version));
    if version != expected_version {
        return Err(FormatError::WrongVersion {
            expected: expected_version,
            found: version,
        });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(payload_len);
    let payload_len = u64::from_le_bytes(len_bytes);
    let available = total_len - fixed;
    if payload_len != available {
        return Err(FormatError::LengthMismatch {
            payload_len,
            len: total_len,
            available,
        });
    }
    if payload_len > max_bytes {
        return Err(FormatError::TooLarge {
            payload_len,
            max_bytes,
        });
    }
    usize::try_from(payload_len).map_err(|_| FormatError::TooLarge {
        payload_len,
        max_bytes,
    })
}

fn le4(bytes: &[u8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    out.copy_from_slice(bytes);
    out
}

/// Decodes a complete container held in memory. See the module doc for the checks.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    kind: Kind,
    expected_version: u32,
    max_bytes: u64,
) -> Result<T, FormatError> {
    let total_len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let payload_len = check_prefix(bytes, total_len, kind, expected_version, max_bytes)?;
    // check_prefix proved bytes.len() == FIXED_LEN + payload_len.
    let (covered, crc) = bytes.split_at(PREFIX_LEN + payload_len);
    let stored = u32::from_le_bytes(le4(crc));
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(FormatError::BadCrc { stored, computed });
    }
    let payload = &covered[PREFIX_LEN..];
    let (value, rest) = postcard::take_from_bytes(payload).map_err(FormatError::Decode)?;
    if !rest.is_empty() {
        return Err(FormatError::TrailingBytes {
            trailing: rest.len(),
        });
    }
    Ok(value)
}

/// `O_DIRECTORY` on Linux (x86_64 and aarch64 differ; this crate builds for both).
fn libc_o_directory() -> i32 {
    if cfg!(target_arch = "aarch64") {
        0o40000
    } else {
        0o200000
    }
}

/// Writes `value` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write<T: Serialize>(
    path: &Path,
    kind: Kind,
    version: u32,
    value: &T,
) -> Result<(), ContainerError> {
    let bytes = encode(kind, version, value).map_err(|source| ContainerError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    let io_err = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| ContainerError::Io { op, path, source }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    // Unique per process and call, so concurrent writers never share a temp file.
    static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.unwrap_or_default(),
        std::process::id(),
        NEXT_TMP.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        file.write_all(&bytes).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
        // O_DIRECTORY: this can only ever open a directory (a sandboxed writer may be allowed
        // exactly that and no read of file contents).
        OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_directory())
            .open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing directory", &dir))
    })();
    if result.is_err() {
        // Best effort: do not leave a half-written temp file behind.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads and checks a container file. The size is checked against `max_bytes` before the
/// payload is read, so a hostile file cannot make this allocate more than the cap.
pub fn read<T: DeserializeOwned>(
    path: &Path,
    kind: Kind,
    expected_version: u32,
    max_bytes: u64,
) -> Result<T, ContainerError> {
    let io_err = |op: &'static str| {
        move |source| ContainerError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let invalid = |source| ContainerError::Invalid {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err("opening"))?;
    let total_len = file
        .metadata()
        .map_err(io_err("reading metadata of"))?
        .len();
    let mut prefix = Vec::with_capacity(PREFIX_LEN);
    (&file)
        .take(u64::try_from(PREFIX_LEN).unwrap_or(0))
        .read_to_end(&mut prefix)
        .map_err(io_err("reading"))?;
    let payload_len =
        check_prefix(&prefix, total_len, kind, expected_version, max_bytes).map_err(invalid)?;
    let mut bytes = prefix;
    let rest = payload_len.saturating_add(FIXED_LEN - PREFIX_LEN);
    bytes.reserve_exact(rest);
    // `take` bounds the read even if the file grows meanwhile; decode re-checks the length.
    (&file)
        .take(u64::try_from(rest).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)
        .map_err(io_err("reading"))?;
    decode(&bytes, kind, expected_version, max_bytes).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            values: vec![1, 2, 1 << 40],
        }
    }

    fn decode_sample(bytes: &[u8]) -> Result<Sample, FormatError> {
        decode(bytes, Kind::VmState, 3, 1 << 20)
    }

    #[test]
    fn test_container_encode_decode_round_trips() {
        let bytes = encode(Kind::VmState, 3, &sample()).unwrap();
        assert_eq!(&bytes[..8], b"WRENNSNP");
        assert_eq!(decode_sample(&bytes).unwrap(), sample());
    }

    #[test]
    fn test_container_write_read_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vmstate");
        write(&path, Kind::VmState, 3, &sample()).unwrap();
        let back: Sample = read(&path, Kind::VmState, 3, 1 << 20).unwrap();
        assert_eq!(back, sample());
        // The temp file was renamed away.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn test_container_short_input_is_truncated() {
        let bytes = encode(Kind::VmState, 3, &sample()).unwrap();
        for len in [0, 5, 24, 27] {
            assert!(matches!(
                decode_sample(&bytes[..len]),
                Err(FormatError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn test_container_bad_magic_rejected() {
        let mut bytes = encode(Kind::VmState, 3, &sample()).unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            decode_sample(&bytes),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn test_container_wrong_kind_rejected() {
        let bytes = encode(Kind::Header, 3, &sample()).unwrap();
        assert!(matches!(
            decode_sample(&bytes),
            Err(FormatError::WrongKind { found: 1, .. })
        ));
    }

    #[test]
    fn test_container_wrong_version_names_both() {
        let bytes = encode(Kind::VmState, 4, &sample()).unwrap();
        let err = decode_sample(&bytes).unwrap_err();
        assert!(matches!(
            err,
            FormatError::WrongVersion {
                expected: 3,
                found: 4
            }
        ));
        let message = err.to_string();
        assert!(message.contains('3') && message.contains('4'), "{message}");
    }

    #[test]
    fn test_container_length_mismatch_rejected() {
        let mut bytes = encode(Kind::VmState, 3, &sample()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode_sample(&bytes),
            Err(FormatError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn test_container_over_cap_rejected() {
        let bytes = encode(Kind::VmState, 3, &sample()).unwrap();
        assert!(matches!(
            decode::<Sample>(&bytes, Kind::VmState, 3, 4),
            Err(FormatError::TooLarge { .. })
        ));
    }

    #[test]
    fn test_container_hostile_length_file_rejected_before_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut bytes = encode(Kind::VmState, 3, &sample()).unwrap();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let err = read::<Sample>(&path, Kind::VmState, 3, 1 << 20).unwrap_err();
        assert!(matches!(
            err,
            ContainerError::Invalid {
                source: FormatError::LengthMismatch { .. },
                ..
            }
        ));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn test_container_flipped_payload_bit_fails_crc() {
        let mut bytes = encode(Kind::VmState, 3, &sample()).unwrap();
        bytes[PREFIX_LEN + 1] ^= 0x40;
        assert!(matches!(
            decode_sample(&bytes),
            Err(FormatError::BadCrc { .. })
        ));
    }

    #[test]
    fn test_container_trailing_payload_bytes_rejected() {
        // A payload of a u8 followed by junk, decoded as a bare u8.
        let bytes = encode(Kind::VmState, 3, &(7u8, 9u8)).unwrap();
        assert!(matches!(
            decode::<u8>(&bytes, Kind::VmState, 3, 100),
            Err(FormatError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn test_container_missing_file_names_path() {
        let err = read::<Sample>(Path::new("/nonexistent/x"), Kind::VmState, 3, 100).unwrap_err();
        assert!(matches!(err, ContainerError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/x"));
    }

    proptest! {
        #[test]
        fn test_container_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_sample(&bytes);
        }

        #[test]
        fn test_container_corrupted_valid_file_detected(
            index in 0usize..64, value in any::<u8>(), cut in 0usize..64
        ) {
            let original = encode(Kind::VmState, 3, &sample()).unwrap();
            let mut bytes = original.clone();
            let index = index % bytes.len();
            bytes[index] = value;
            bytes.truncate(original.len() - cut.min(original.len()));
            let result = decode_sample(&bytes);
            // CRC32 catches every single-byte change; a cut breaks the length.
            if bytes == original {
                prop_assert_eq!(result.unwrap(), sample());
            } else {
                prop_assert!(result.is_err());
            }
        }
    }
}
