//! What to run ([`CommandSpec`]) and how it reaches the host VM: a shell fragment in the per-run
//! directory, sourced by the VM's init.
//!
//! ```text
//! WRENN_CWD='/work/main'
//! share wrenn0 '/work/main'                 # writable 9p share <tag> mounted at <path>
//! share wrenn1 '/var/cache/wrenn'
//! set -- 'HOME=/root' 'PATH=/usr/bin:/bin' 'WRENN_IN_HOSTVM=1' 'sh' '-c' 'exit 7'
//! ```
//!
//! Every value is single-quoted, so any bytes but NUL pass unchanged (spaces, quotes, newlines,
//! non-UTF-8). Init then runs `chroot /mnt/host /usr/bin/env -i -C "$WRENN_CWD" -- "$@"`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::HostVmError;

/// The variable init sets for the command so that code inside the host VM runs directly.
pub const IN_HOSTVM_ENV: &str = "WRENN_IN_HOSTVM";

/// A command to run: directly or inside the host VM, with the same argv, cwd and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and arguments; the program is looked up in the environment's `PATH`.
    pub argv: Vec<OsString>,
    /// Absolute working directory. Inside the host VM it must exist there: anywhere in the
    /// host's tree, but under /tmp only within a writable directory (/tmp is per-run).
    pub cwd: PathBuf,
    /// The command's whole environment (nothing else is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// Host directories the command may write to inside the host VM (everything else of the host
    /// is read-only there, and /tmp is a fresh per-run directory). Ignored when running directly.
    pub writable: Vec<PathBuf>,
}

impl CommandSpec {
    /// `argv` with this process's working directory and environment, no writable directories.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        CommandSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: std::env::vars_os().collect(),
            writable: Vec::new(),
        }
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = dir.into();
        self
    }

    /// Sets (or replaces) one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Adds a host directory the command may write to inside the host VM.
    pub fn writable(mut self, dir: impl Into<PathBuf>) -> Self {
        self.writable.push(dir.into());
        self
    }

    /// Shares the artifact cache writable and names it in the environment, so that the command
    /// finds the same kernels and images inside the host VM as here (whatever user it runs as).
    pub fn with_cache(self, cache: &wrenn_image::cache::Cache) -> Self {
        self.writable(cache.root())
            .env("WRENN_CACHE_DIR", cache.root())
    }

    /// Checks what both placements need.
    pub(crate) fn validate(&self) -> Result<(), HostVmError> {
        let invalid = |reason: String| Err(HostVmError::InvalidSpec { reason });
        let Some(program) = self.argv.first() else {
            return invalid("the command is empty".into());
        };
        if program.is_empty() {
            return invalid("the program name is empty".into());
        }
        // env(1) would take a program name with '=' for a variable assignment.
        if program.as_bytes().contains(&b'=') {
            return invalid(format!("the program name {program:?} contains '='"));
        }
        if !self.cwd.is_absolute() {
            return invalid(format!(
                "the working directory {} is not absolute",
                self.cwd.display()
            ));
        }
        for (key, _) in &self.env {
            if key.is_empty() || key.as_bytes().contains(&b'=') {
                return invalid(format!("bad environment variable name {key:?}"));
            }
        }
        let has_nul = |s: &OsStr| s.as_bytes().contains(&0);
        if self.argv.iter().any(|a| has_nul(a))
            || self.env.iter().any(|(k, v)| has_nul(k) || has_nul(v))
            || has_nul(self.cwd.as_os_str())
        {
            return invalid("a NUL byte in the argv, environment or cwd".into());
        }
        Ok(())
    }

    /// The writable directories as (tag, canonical path), parents before children, checked.
    pub(crate) fn shares(&self) -> Result<Vec<(String, PathBuf)>, HostVmError> {
        let mut dirs = Vec::new();
        for dir in &self.writable {
            let canon = dir.canonicalize().map_err(|e| HostVmError::InvalidSpec {
                reason: format!("writable directory {}: {e}", dir.display()),
            })?;
            if !canon.is_dir() {
                return Err(HostVmError::InvalidSpec {
                    reason: format!("writable path {} is not a directory", canon.display()),
                });
            }
            let first = canon.components().nth(1);
            let reserved = ["proc", "sys", "dev"]
                .iter()
                .any(|r| first == Some(Component::Normal(OsStr::new(r))));
            if canon == Path::new("/") || reserved {
                return Err(HostVmError::InvalidSpec {
                    reason: format!(
                        "{} cannot be shared writable (/, /proc, /sys and /dev are not)",
                        canon.display()
                    ),
                });
            }
            if !dirs.contains(&canon) {
                dirs.push(canon);
            }
        }
        dirs.sort_by_key(|d| d.components().count());
        Ok(dirs
            .into_iter()
            .enumerate()
            .map(|(i, d)| (format!("wrenn{i}"), d))
            .collect())
    }

    /// The fragment init sources (see the module doc).
    pub(crate) fn guest_script(&self, shares: &[(String, PathBuf)]) -> Vec<u8> {
        let mut s = b"WRENN_CWD=".to_vec();
        s.extend(shell_quote(self.cwd.as_os_str()));
        s.push(b'\n');
        for (tag, path) in shares {
            s.extend_from_slice(format!("share {tag} ").as_bytes());
            s.extend(shell_quote(path.as_os_str()));
            s.push(b'\n');
        }
        for path in self.hidden_by_tmp(shares) {
            s.extend_from_slice(b"keep ");
            s.extend(shell_quote(path.as_os_str()));
            s.push(b'\n');
        }
        s.extend_from_slice(b"set --");
        let in_hostvm = OsStr::new(IN_HOSTVM_ENV);
        for (key, value) in self.env.iter().filter(|(k, _)| k != in_hostvm) {
            let mut pair = key.clone();
            pair.push("=");
            pair.push(value);
            s.push(b' ');
            s.extend(shell_quote(&pair));
        }
        s.push(b' ');
        s.extend(shell_quote(OsStr::new(&format!("{IN_HOSTVM_ENV}=1"))));
        for arg in &self.argv {
            s.push(b' ');
            s.extend(shell_quote(arg));
        }
        s.push(b'\n');
        s
    }
}

impl CommandSpec {
    /// Host paths the command needs (its cwd, an absolute program path, absolute paths among
    /// its arguments that exist here, such as a binary it is told to run) that lie under /tmp
    /// outside every writable share: the VM's own /tmp would hide them, so init keeps them
    /// visible, read-only. (A fresh clone under /tmp is a common place to run tests from.)
    fn hidden_by_tmp(&self, shares: &[(String, PathBuf)]) -> Vec<PathBuf> {
        let program = self.argv.first().map(Path::new).filter(|p| p.is_absolute());
        let arguments = self
            .argv
            .iter()
            .skip(1)
            .map(Path::new)
            .filter(|p| p.is_absolute() && p.exists());
        let mut paths: Vec<PathBuf> = std::iter::once(self.cwd.as_path())
            .chain(program)
            .chain(arguments)
            .filter(|p| p.starts_with("/tmp") && *p != Path::new("/tmp"))
            .filter(|p| !shares.iter().any(|(_, dir)| p.starts_with(dir)))
            .map(Path::to_owned)
            .collect();
        paths.dedup();
        paths
    }
}

/// `s` in single quotes, with each `'` written as `'\''`.
pub(crate) fn shell_quote(s: &OsStr) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in s.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;
    use std::process::Command;

    fn spec(argv: &[&str]) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(OsString::from).collect(),
            cwd: PathBuf::from("/"),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            writable: Vec::new(),
        }
    }

    /// Sources the script in a real shell and prints what init would see.
    fn evaluate(script: &[u8]) -> Vec<u8> {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("spec.sh");
        std::fs::write(&path, script).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#"share() { printf 'share:%s:%s\n' "$1" "$2"; }; . "$0"; printf 'cwd:%s\n' "$WRENN_CWD"; for a in "$@"; do printf 'arg:%s\n' "$a"; done"#)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn test_guest_script_hard_values_survive_the_shell() {
        let mut s = spec(&["printf", "it's a \"test\"\n$HOME `x` \\"]);
        s.cwd = PathBuf::from("/dir with space/o'k");
        s = s.env("WEIRD", "a'b\nc");
        s.env
            .push((OsString::from(IN_HOSTVM_ENV), OsString::from("0")));
        let shares = vec![("wrenn0".to_owned(), PathBuf::from("/work/it's"))];
        let out = evaluate(&s.guest_script(&shares));
        let expected = "share:wrenn0:/work/it's\n\
            cwd:/dir with space/o'k\n\
            arg:PATH=/usr/bin:/bin\n\
            arg:WEIRD=a'b\nc\n\
            arg:WRENN_IN_HOSTVM=1\n\
            arg:printf\n\
            arg:it's a \"test\"\n$HOME `x` \\\n";
        assert_eq!(String::from_utf8_lossy(&out), expected);
    }

    #[test]
    fn test_guest_script_non_utf8_bytes_pass_unchanged() {
        let arg = OsString::from_vec(vec![b'a', 0xff, 0xfe, b'b']);
        let mut s = spec(&["echo"]);
        s.argv.push(arg);
        let out = evaluate(&s.guest_script(&[]));
        let wanted: &[u8] = b"arg:a\xff\xfeb\n";
        assert!(out.windows(wanted.len()).any(|w| w == wanted), "{out:?}");
    }

    #[test]
    fn test_guest_script_keeps_existing_tmp_paths_among_the_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("wrenn-vmm");
        std::fs::write(&binary, b"").unwrap();
        let missing = dir.path().join("not-there");
        let spec = CommandSpec::new([
            OsStr::new("/bin/true"),
            OsStr::new("--vmm"),
            binary.as_os_str(),
            missing.as_os_str(),
        ]);
        let script = String::from_utf8(spec.guest_script(&[])).unwrap();
        assert!(
            script.contains(&format!("keep '{}'\n", binary.display())),
            "{script}"
        );
        assert!(
            !script.contains(&format!("keep '{}'", missing.display())),
            "{script}"
        );
    }

    #[test]
    fn test_guest_script_keeps_tmp_paths_outside_shares() {
        let spec = CommandSpec::new(["/tmp/clone/target/debug/t"]).cwd("/tmp/clone/crates/a");
        let script = String::from_utf8(spec.guest_script(&[])).unwrap();
        assert!(script.contains("keep '/tmp/clone/crates/a'\n"), "{script}");
        assert!(
            script.contains("keep '/tmp/clone/target/debug/t'\n"),
            "{script}"
        );

        let shares = [("wrenn0".to_owned(), PathBuf::from("/tmp/clone"))];
        let script = String::from_utf8(spec.guest_script(&shares)).unwrap();
        assert!(
            !script.contains("keep "),
            "inside a share needs no keep: {script}"
        );

        let spec = CommandSpec::new(["sh"]).cwd("/work");
        assert!(
            !String::from_utf8(spec.guest_script(&[]))
                .unwrap()
                .contains("keep ")
        );
    }

    #[test]
    fn test_validate_rejects_bad_specs() {
        assert!(spec(&[]).validate().is_err());
        assert!(spec(&["A=b"]).validate().is_err());
        let mut relative = spec(&["true"]);
        relative.cwd = PathBuf::from("rel");
        assert!(relative.validate().is_err());
        assert!(spec(&["true"]).env("", "x").validate().is_err());
        assert!(spec(&["true", "a\0b"]).validate().is_err());
        assert!(spec(&["true"]).validate().is_ok());
    }

    #[test]
    fn test_shares_sorted_parents_first_and_deduplicated() {
        let tmp = tempfile::tempdir().unwrap();
        let child = tmp.path().join("a/b");
        std::fs::create_dir_all(&child).unwrap();
        let s = spec(&["true"])
            .writable(&child)
            .writable(tmp.path())
            .writable(tmp.path().join("a/b/."));
        let shares = s.shares().unwrap();
        let parent = tmp.path().canonicalize().unwrap();
        assert_eq!(
            shares,
            [
                ("wrenn0".to_owned(), parent.clone()),
                ("wrenn1".to_owned(), parent.join("a/b"))
            ]
        );
    }

    #[test]
    fn test_shares_rejects_root_proc_and_missing() {
        assert!(spec(&["true"]).writable("/").shares().is_err());
        assert!(spec(&["true"]).writable("/proc/self").shares().is_err());
        assert!(
            spec(&["true"])
                .writable("/wrenn/no/such/dir")
                .shares()
                .is_err()
        );
    }
}
