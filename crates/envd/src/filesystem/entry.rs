//! `EntryInfo`: what the SDKs learn about a file. Shaped like E2B's envd: for a symlink,
//! `type` and `mode` describe what it points at and `symlink_target` is the resolved target,
//! while `size`, `permissions` and the times are the link's own; `permissions` is Go's
//! `FileMode.String()` form ("-rw-r--r--", "drwxr-xr-x", "Lrwxrwxrwx"), `mode` the
//! permission bits alone.
use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;

use buffa::{EnumValue, MessageField};
use buffa_types::google::protobuf::Timestamp;
use wrenn_proto::filesystem::{EntryInfo, FileType};

use crate::users::UserDb;

/// User and group names by id, looked up once per request (each lookup reads a file).
#[derive(Debug)]
pub struct Names {
    users: UserDb,
    owners: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    /// An empty cache over `users`.
    pub fn new(users: UserDb) -> Self {
        Self {
            users,
            owners: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    fn owner(&mut self, uid: u32) -> String {
        let users = &self.users;
        self.owners
            .entry(uid)
            .or_insert_with(|| users.user_name(uid))
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        let users = &self.users;
        self.groups
            .entry(gid)
            .or_insert_with(|| users.group_name(gid))
            .clone()
    }
}

/// The entry for `path`, which is reported as given (not resolved).
pub fn entry_info(path: &Path, names: &mut Names) -> io::Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok(entry_from_metadata(path, &meta, names))
}

/// The entry for `path` with its `lstat` result already at hand.
pub fn entry_from_metadata(path: &Path, meta: &Metadata, names: &mut Names) -> EntryInfo {
    let (kind, mode, symlink_target) = if meta.file_type().is_symlink() {
        // A dangling or looping link keeps its own path as the target, like E2B.
        let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let (kind, mode) = match std::fs::metadata(&target) {
            Ok(target_meta) => (file_type(&target_meta), target_meta.mode() & 0o777),
            Err(_) => (FileType::FILE_TYPE_UNSPECIFIED, 0),
        };
        (kind, mode, Some(target.to_string_lossy().into_owned()))
    } else {
        (file_type(meta), meta.mode() & 0o777, None)
    };
    let metadata = if meta.file_type().is_symlink() {
        HashMap::new()
    } else {
        // Unreadable attributes are not worth failing a listing for.
        crate::filesystem::xattr::read_metadata(path).unwrap_or_default()
    };
    let name = path
        .file_name()
        .map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned());
    EntryInfo {
        name,
        r#type: EnumValue::from(kind),
        path: path.to_string_lossy().into_owned(),
        size: i64::try_from(meta.size()).unwrap_or(i64::MAX),
        mode,
        permissions: go_mode_string(meta),
        owner: names.owner(meta.uid()),
        group: names.group(meta.gid()),
        modified_time: MessageField::some(Timestamp {
            seconds: meta.mtime(),
            nanos: i32::try_from(meta.mtime_nsec()).unwrap_or(0),
            ..Default::default()
        }),
        symlink_target,
        metadata: metadata.into_iter().collect(),
        ..Default::default()
    }
}

fn file_type(meta: &Metadata) -> FileType {
    let kind = meta.file_type();
    if kind.is_file() {
        FileType::FILE_TYPE_FILE
    } else if kind.is_dir() {
        FileType::FILE_TYPE_DIRECTORY
    } else if kind.is_symlink() {
        FileType::FILE_TYPE_SYMLINK
    } else {
        FileType::FILE_TYPE_UNSPECIFIED
    }
}

/// Go's `os.FileMode.String()` for a stat result: type and special-bit letters in Go's order
/// (`d`, `L`, `D`, `p`, `S`, `u`, `g`, `c`, `t`; `-` when none), then `rwxrwxrwx`.
pub fn go_mode_string(meta: &Metadata) -> String {
    let kind = meta.file_type();
    let mode = meta.mode();
    let mut out = String::with_capacity(12);
    if kind.is_dir() {
        out.push('d');
    }
    if kind.is_symlink() {
        out.push('L');
    }
    if kind.is_block_device() || kind.is_char_device() {
        out.push('D');
    }
    if kind.is_fifo() {
        out.push('p');
    }
    if kind.is_socket() {
        out.push('S');
    }
    if mode & 0o4000 != 0 {
        out.push('u');
    }
    if mode & 0o2000 != 0 {
        out.push('g');
    }
    if kind.is_char_device() {
        out.push('c');
    }
    if mode & 0o1000 != 0 {
        out.push('t');
    }
    if out.is_empty() {
        out.push('-');
    }
    for (bit, letter) in [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ] {
        out.push(if mode & bit != 0 { letter } else { '-' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn names() -> Names {
        Names::new(UserDb::system())
    }

    #[test]
    fn test_mode_strings_match_go() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            go_mode_string(&std::fs::metadata(&file).unwrap()),
            "-rw-r-----"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(
            go_mode_string(&std::fs::metadata(dir.path()).unwrap()),
            "dtrwxrwxrwx"
        );
        assert_eq!(
            go_mode_string(&std::fs::metadata("/dev/null").unwrap()),
            "Dcrw-rw-rw-"
        );
    }

    #[test]
    fn test_symlink_entry_follows_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o750)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let entry = entry_info(&link, &mut names()).unwrap();
        assert_eq!(entry.name, "link");
        assert_eq!(entry.r#type, EnumValue::from(FileType::FILE_TYPE_DIRECTORY));
        assert_eq!(entry.mode, 0o750);
        assert!(entry.permissions.starts_with('L'), "{}", entry.permissions);
        assert_eq!(
            entry.symlink_target.as_deref(),
            Some(std::fs::canonicalize(&target).unwrap().to_str().unwrap())
        );

        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
        let entry = entry_info(&dangling, &mut names()).unwrap();
        assert_eq!(
            entry.r#type,
            EnumValue::from(FileType::FILE_TYPE_UNSPECIFIED)
        );
        assert_eq!(entry.symlink_target.as_deref(), dangling.to_str());
    }

    #[test]
    fn test_file_entry_has_size_owner_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.bin");
        std::fs::write(&file, vec![7u8; 1234]).unwrap();
        let entry = entry_info(&file, &mut names()).unwrap();
        assert_eq!(entry.size, 1234);
        assert_eq!(entry.r#type, EnumValue::from(FileType::FILE_TYPE_FILE));
        assert_eq!(entry.path, file.to_str().unwrap());
        assert!(!entry.owner.is_empty());
        assert!(entry.modified_time.seconds > 1_600_000_000);
        assert!(entry.symlink_target.is_none());
    }
}
