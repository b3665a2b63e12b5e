//! The build store: one directory per build, fixed file names inside.
//!
//! ```text
//! <store>/<build id>/vmstate                VM state (container, written by the VMM)
//!                   /memfile                memory blocks this build stores
//!                   /memfile.header         memory header
//!                   /disk-<drive>.data      disk blocks this build stores (or a symlink
//!                                           to the base image, for an imported image)
//!                   /disk-<drive>.header    disk header
//! ```
//!
//! Paths are derived, never stored: headers name builds by id, and whoever opens them supplies
//! the store root. Drive ids are validated ([`DriveId`]) so a file name cannot leave the build
//! directory.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::header::{Header, HeaderError};
use crate::id::{BuildId, IdError};

/// Block size of the memory file offset space (the guest page size).
pub const MEM_BLOCK_SIZE: u64 = 4096;
/// Block size of disks.
pub const DISK_BLOCK_SIZE: u64 = 4096;

const MAX_DRIVE_ID_LEN: usize = 64;

/// Errors from store paths and store operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("drive id {text:?} is invalid: expected 1 to 64 characters from [A-Za-z0-9_-]")]
    BadDriveId { text: String },
    #[error("device kind {text:?} is invalid: expected \"mem\" or \"disk:<drive id>\"")]
    BadKind { text: String },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Header(#[from] HeaderError),
}

/// A validated drive id: 1 to 64 characters from `[A-Za-z0-9_-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DriveId(String);

impl DriveId {
    pub fn new(text: &str) -> Result<DriveId, StoreError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if text.is_empty() || text.len() > MAX_DRIVE_ID_LEN || !text.chars().all(valid_char) {
            return Err(StoreError::BadDriveId {
                text: text.chars().take(80).collect(),
            });
        }
        Ok(DriveId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DriveId {
    type Err = StoreError;
    fn from_str(text: &str) -> Result<DriveId, StoreError> {
        DriveId::new(text)
    }
}

impl fmt::Display for DriveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DriveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DriveId({})", self.0)
    }
}

/// Which layered device of a build: guest memory or one disk.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Mem,
    Disk(DriveId),
}

impl DeviceKind {
    pub fn block_size(&self) -> u64 {
        match self {
            DeviceKind::Mem => MEM_BLOCK_SIZE,
            DeviceKind::Disk(_) => DISK_BLOCK_SIZE,
        }
    }
}

/// Parses `mem` or `disk:<drive id>`.
impl FromStr for DeviceKind {
    type Err = StoreError;
    fn from_str(text: &str) -> Result<DeviceKind, StoreError> {
        if text == "mem" {
            return Ok(DeviceKind::Mem);
        }
        match text.strip_prefix("disk:") {
            Some(drive) => Ok(DeviceKind::Disk(DriveId::new(drive)?)),
            None => Err(StoreError::BadKind {
                text: text.chars().take(80).collect(),
            }),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Mem => f.write_str("mem"),
            DeviceKind::Disk(drive) => write!(f, "disk:{drive}"),
        }
    }
}

/// A store rooted at a directory. See the module doc for the layout.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn build_dir(&self, id: BuildId) -> PathBuf {
        self.root.join(id.to_string())
    }

    pub fn vmstate(&self, id: BuildId) -> PathBuf {
        self.build_dir(id).join("vmstate")
    }

    pub fn mem_data(&self, id: BuildId) -> PathBuf {
        self.build_dir(id).join("memfile")
    }

    pub fn mem_header(&self, id: BuildId) -> PathBuf {
        self.build_dir(id).join("memfile.header")
    }

    pub fn disk_data(&self, id: BuildId, drive: &DriveId) -> PathBuf {
        self.build_dir(id).join(format!("disk-{drive}.data"))
    }

    pub fn disk_header(&self, id: BuildId, drive: &DriveId) -> PathBuf {
        self.build_dir(id).join(format!("disk-{drive}.header"))
    }

    /// The data file of `kind` in build `id`.
    pub fn data_path(&self, id: BuildId, kind: &DeviceKind) -> PathBuf {
        match kind {
            DeviceKind::Mem => self.mem_data(id),
            DeviceKind::Disk(drive) => self.disk_data(id, drive),
        }
    }

    /// The header file of `kind` in build `id`.
    pub fn header_path(&self, id: BuildId, kind: &DeviceKind) -> PathBuf {
        match kind {
            DeviceKind::Mem => self.mem_header(id),
            DeviceKind::Disk(drive) => self.disk_header(id, drive),
        }
    }

    /// Creates the build's directory (and the store root). Idempotent: the VMM's memory
    /// snapshot and the disk snapshot of one pause write into the same build.
    pub fn create_build_dir(&self, id: BuildId) -> Result<PathBuf, StoreError> {
        let dir = self.build_dir(id);
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            op: "creating build directory",
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Makes a generation-0 disk build from a raw image without copying it: the build's
    /// `disk-<drive>.data` is a symlink to the image (by absolute path), and its header maps
    /// the whole image identity. The device size is the image size rounded up to the block
    /// size; the tail past the image's end reads as zeros. The image must then stay unchanged
    /// for as long as the build is used.
    pub fn import_disk_image(&self, image: &Path, drive: &DriveId) -> Result<BuildId, StoreError> {
        let io_err = |op: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { op, path, source }
        };
        let image = fs::canonicalize(image).map_err(io_err("resolving disk image", image))?;
        let meta = fs::metadata(&image).map_err(io_err("reading disk image metadata", &image))?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile { path: image });
        }
        let build = BuildId::random()?;
        self.create_build_dir(build)?;
        let data = self.disk_data(build, drive);
        std::os::unix::fs::symlink(&image, &data)
            .map_err(io_err("symlinking disk image", &data))?;
        let header = Header::from_image(build, meta.len())?;
        header.write(&self.disk_header(build, drive))?;
        tracing::info!(%build, drive = %drive, image = %image.display(), size = meta.len(),
            "imported disk image");
        Ok(build)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;

    #[test]
    fn test_drive_id_valid_accepted() {
        for text in ["rootfs", "a", "Disk_1-b", &"x".repeat(64)] {
            assert_eq!(DriveId::new(text).unwrap().as_str(), text);
        }
    }

    #[test]
    fn test_drive_id_escaping_rejected() {
        for text in ["", "../x", "a/b", "a b", ".", "é", &"x".repeat(65)] {
            assert!(
                matches!(DriveId::new(text), Err(StoreError::BadDriveId { .. })),
                "{text:?} accepted"
            );
        }
    }

    #[test]
    fn test_device_kind_parse_round_trips() {
        let disk: DeviceKind = "disk:rootfs".parse().unwrap();
        assert_eq!(disk, DeviceKind::Disk(DriveId::new("rootfs").unwrap()));
        assert_eq!(disk.to_string(), "disk:rootfs");
        assert_eq!("mem".parse::<DeviceKind>().unwrap(), DeviceKind::Mem);
        assert!("disk:".parse::<DeviceKind>().is_err());
        assert!("disk:../a".parse::<DeviceKind>().is_err());
        assert!("memory".parse::<DeviceKind>().is_err());
    }

    #[test]
    fn test_store_paths_follow_layout() {
        let store = Store::new("/s");
        let id = BuildId::from_bytes([0x11; 16]);
        let drive = DriveId::new("rootfs").unwrap();
        let dir = format!("/s/{}", "11".repeat(16));
        assert_eq!(store.build_dir(id), PathBuf::from(&dir));
        assert_eq!(store.vmstate(id), PathBuf::from(format!("{dir}/vmstate")));
        assert_eq!(store.mem_data(id), PathBuf::from(format!("{dir}/memfile")));
        assert_eq!(
            store.mem_header(id),
            PathBuf::from(format!("{dir}/memfile.header"))
        );
        assert_eq!(
            store.disk_data(id, &drive),
            PathBuf::from(format!("{dir}/disk-rootfs.data"))
        );
        assert_eq!(
            store.disk_header(id, &drive),
            PathBuf::from(format!("{dir}/disk-rootfs.header"))
        );
    }

    #[test]
    fn test_import_disk_image_symlinks_and_maps_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("image.ext4");
        fs::write(&image, vec![5u8; 10_000]).unwrap();
        let store = Store::new(tmp.path().join("store"));
        let drive = DriveId::new("rootfs").unwrap();

        let build = store.import_disk_image(&image, &drive).unwrap();

        let data = store.disk_data(build, &drive);
        assert!(
            fs::symlink_metadata(&data)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read_link(&data).unwrap(),
            fs::canonicalize(&image).unwrap()
        );
        let header = Header::read(&store.disk_header(build, &drive)).unwrap();
        assert_eq!(header.size, 12_288);
        assert_eq!(header.generation, 0);
        assert_eq!((header.build, header.base), (build, build));
        assert_eq!(header.mappings.len(), 1);
        assert_eq!(header.builds[0].data_len, 10_000);
    }

    #[test]
    fn test_import_disk_image_missing_image_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let drive = DriveId::new("rootfs").unwrap();
        let err = store.import_disk_image(&tmp.path().join("nope"), &drive);
        assert!(matches!(err, Err(StoreError::Io { .. })));
    }

    #[test]
    fn test_import_disk_image_directory_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let drive = DriveId::new("rootfs").unwrap();
        let err = store.import_disk_image(tmp.path(), &drive);
        assert!(matches!(err, Err(StoreError::NotAFile { .. })));
    }
}
