//! A writer for the cpio "newc" format, the format of a Linux initramfs (uncompressed).
//!
//! ```text
//! entry:   header (110 ASCII bytes) | name + NUL | pad to 4 | data | pad to 4
//! header:  "070701" then 13 fields of 8 hex digits:
//!          ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
//!          namesize (with the NUL) check (0)
//! archive: entries..., then an entry named "TRAILER!!!"
//! ```
//!
//! Paths are written without a leading `/`; parents must be added before their children (the
//! kernel's unpacker does not create missing directories). Every entry has uid/gid 0 and mtime 0
//! so that the same inputs give the same bytes.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive entry by entry.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: usize,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// A directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {path:?}"),
            ));
        }
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "cpio entry too large");
        let size = u32::try_from(data.len()).map_err(|_| too_big())?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| too_big())?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = Vec::with_capacity(110 + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write(&header)?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len();
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = self.offset.next_multiple_of(4) - self.offset;
        self.write(&[0u8; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: name, mode, rdev, data.
    type Parsed = (String, u32, (u32, u32), Vec<u8>);

    /// A minimal newc reader, independent of the writer's code, for checking its output.
    fn parse(mut bytes: &[u8]) -> Vec<Parsed> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!((total - bytes.len()) % 4, 0, "entry not 4-aligned");
            assert_eq!(&bytes[..6], MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rdev, namesize) =
                (field(1), field(6), (field(9), field(10)), field(11));
            let namesize = namesize as usize;
            let name = std::str::from_utf8(&bytes[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[110 + namesize - 1], 0, "name not NUL-terminated");
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = bytes[data_at..data_at + size as usize].to_vec();
            let next = (data_at + size as usize).next_multiple_of(4);
            bytes = &bytes[next..];
            if name == TRAILER {
                assert!(bytes.is_empty(), "bytes after the trailer");
                return entries;
            }
            entries.push((name, mode, rdev, data));
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        w.file("/empty", 0o644, b"").unwrap();
        w.file("/abc", 0o600, b"abc").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.char_dev("/console", 0o600, 5, 1).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn test_cpio_round_trip_entries_match() {
        let entries = parse(&sample());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/hello", "empty", "abc", "bin/sh", "console"]
        );
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(entries[1].1, 0o100_755);
        assert_eq!(entries[1].3, b"#!/bin/sh\necho hi\n");
        assert_eq!(entries[3].3, b"abc");
        assert_eq!(entries[4].1, 0o120_777);
        assert_eq!(entries[4].3, b"busybox");
        assert_eq!(entries[5].1, 0o020_600);
        assert_eq!(entries[5].2, (5, 1));
    }

    #[test]
    fn test_cpio_archive_length_is_multiple_of_4() {
        assert_eq!(sample().len() % 4, 0);
    }

    #[test]
    fn test_cpio_empty_name_is_rejected() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("/", 0o644, b"x").is_err());
    }

    #[test]
    fn test_cpio_system_tool_extracts_archive() {
        // Cross-check with GNU cpio when it is installed (it is on Debian build hosts).
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no cpio binary");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("a.cpio");
        std::fs::write(&archive, sample()).unwrap();
        let out_dir = tmp.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        // Skip the device node: creating it would need CAP_MKNOD.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cpio -id --quiet --no-absolute-filenames -f console < {}",
                archive.display()
            ))
            .current_dir(&out_dir)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            std::fs::read(out_dir.join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read_link(out_dir.join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
        assert_eq!(std::fs::read(out_dir.join("empty")).unwrap(), b"");
    }
}
