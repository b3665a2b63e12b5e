//! File metadata as extended attributes: E2B keeps a file's user metadata in `user.e2b.<key>`
//! xattrs (set by `X-Metadata-<key>` upload headers, reported in `EntryInfo.metadata`). nix has
//! no xattr calls, so these wrap libc's.
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// The namespace prefix of E2B metadata attributes.
pub const PREFIX: &str = "user.e2b.";

/// The longest key E2B accepts (`user.e2b.` + key must fit the kernel's 255-byte name limit).
pub const MAX_KEY_LEN: usize = 246;

/// The most metadata bytes (keys plus values) one file may carry.
pub const MAX_TOTAL_LEN: usize = 4096;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// The `user.e2b.*` attributes of `path` (not following a final symlink), prefix removed.
/// A filesystem without xattr support has none.
pub fn read_metadata(path: &Path) -> io::Result<HashMap<String, String>> {
    let cpath = c_path(path)?;
    let mut metadata = HashMap::new();
    let names = match list(&cpath) {
        Ok(names) => names,
        Err(error) if error.raw_os_error() == Some(libc::ENOTSUP) => return Ok(metadata),
        Err(error) => return Err(error),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Some(key) = name.strip_prefix(PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        match get(&cpath, &cname) {
            Ok(value) => {
                metadata.insert(
                    String::from_utf8_lossy(key).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                );
            }
            // Removed between the list and the read.
            Err(error) if error.raw_os_error() == Some(libc::ENODATA) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(metadata)
}

/// The attribute names of `path`, NUL-separated.
fn list(path: &CString) -> io::Result<Vec<u8>> {
    read_sized(|buffer, size| {
        // SAFETY: `read_sized` passes a null buffer with size 0 (a size query) or a buffer
        // writable for `size` bytes; `path` is a valid NUL-terminated string.
        unsafe { libc::llistxattr(path.as_ptr(), buffer, size) }
    })
}

/// The value of attribute `name` of `path`.
fn get(path: &CString, name: &CString) -> io::Result<Vec<u8>> {
    read_sized(|buffer, size| {
        // SAFETY: as in `list`; both strings are valid and NUL-terminated.
        unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buffer.cast(), size) }
    })
}

/// The xattr calls' size protocol: ask for the size with a null buffer, read into a buffer
/// of that size, and ask again if the data grew in between (ERANGE).
fn read_sized(mut call: impl FnMut(*mut libc::c_char, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        let size = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buffer = vec![0u8; size];
        let got = call(buffer.as_mut_ptr().cast(), size);
        match usize::try_from(got) {
            Ok(got) => {
                buffer.truncate(got);
                return Ok(buffer);
            }
            Err(_) if io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
}

/// Sets `user.e2b.<key>` = `value` for each pair on the open file `fd`.
pub fn write_metadata(fd: BorrowedFd<'_>, metadata: &[(String, String)]) -> io::Result<()> {
    for (key, value) in metadata {
        let name = CString::new(format!("{PREFIX}{key}"))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in metadata key"))?;
        let value: &OsStr = OsStr::new(value);
        let bytes = value.as_bytes();
        // SAFETY: `fd` is an open descriptor borrowed for the call; `name` is NUL-terminated;
        // `bytes` is readable for `bytes.len()` bytes.
        let result = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    #[test]
    fn test_metadata_round_trip_strips_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let pairs = vec![
            ("owner".to_owned(), "alice".to_owned()),
            ("tag".to_owned(), "v 1".to_owned()),
        ];
        if let Err(error) = write_metadata(file.as_fd(), &pairs) {
            // tmpfs without user xattrs: nothing to check here.
            assert_eq!(error.raw_os_error(), Some(libc::ENOTSUP), "{error}");
            return;
        }
        let read = read_metadata(&path).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read["owner"], "alice");
        assert_eq!(read["tag"], "v 1");
        assert!(read_metadata(&dir.path().join("missing")).is_err());
    }
}
