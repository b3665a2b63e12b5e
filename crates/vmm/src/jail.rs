//! The VMM's jail: what the process can still reach once the VM is built.
//!
//! [`confine`] runs on the main thread after every file, tap, KVM fd and listening socket is
//! open, and before the vCPU threads start (they are born inside it). It:
//!
//! 1. moves the calling thread into a new mount namespace whose mounts are all private, so
//!    nothing below propagates back to the host;
//! 2. mounts a small tmpfs (over the staging directory, inside the new namespace only), binds
//!    into it each kept path at the same absolute path, makes it the root with `pivot_root`
//!    (`chroot` if the current root cannot be pivoted, e.g. an initramfs), detaches the old
//!    root and remounts the new one read-only:
//!
//!    ```text
//!    /                  tmpfs, read-only, nosuid nodev noexec, mode 0755
//!    └── run/vm1/       bind of the host's /run/vm1 (vsock `<uds_path>_<port>` sockets)
//!    ```
//! 3. makes the process non-dumpable (no core file or same-uid ptrace holding guest memory);
//! 4. lowers resource limits (open files, file size, core size, optionally processes);
//! 5. optionally drops to an unprivileged uid/gid (every thread, through glibc);
//! 6. sets `no_new_privs`, so nothing the process could still exec gains privileges.
//!
//! Namespaces and the root are per thread: threads that already exist (the API threads) keep
//! the host's view. Their seccomp filter allows no path-based system call at all.

use std::ffi::{CStr, CString};
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Open files allowed after confinement: vsock's 1023 connections plus the VMM's own fds.
pub const DEFAULT_OPEN_FILES: u64 = 2048;
/// Room above the largest drive for the files that grow: console output, metrics, logs.
pub const FILE_SIZE_MARGIN: u64 = 1 << 30;
/// Where the new root's tmpfs is mounted before it becomes `/` (only inside the new mount
/// namespace: the host's directory is not touched).
pub const DEFAULT_STAGING_DIR: &str = "/tmp";

/// How a kept path is bound into the new root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A directory or file the VMM still needs by path, bound at the same absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptPath {
    pub path: PathBuf,
    pub access: Access,
}

/// Resource limits; soft and hard limits are both set, so they cannot be raised again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_NOFILE`.
    pub open_files: u64,
    /// `RLIMIT_FSIZE`: the largest offset any write may reach. Must cover the largest drive
    /// (see [`file_size_limit`]). `None` leaves it as it is.
    pub file_size: Option<u64>,
    /// `RLIMIT_NPROC`: threads of the process's real uid, system-wide (root ignores it). The
    /// API server starts a thread per connection, so this is never 0. `None` leaves it.
    pub processes: Option<u64>,
    /// `RLIMIT_CORE`.
    pub core_size: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            open_files: DEFAULT_OPEN_FILES,
            file_size: None,
            processes: None,
            core_size: 0,
        }
    }
}

/// An unprivileged identity to switch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// What [`confine`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    /// Build the new root (mount namespace, tmpfs, pivot_root). `false` keeps the host's
    /// filesystem view and still applies the rest (`--no-jail`).
    pub new_root: bool,
    /// An existing directory to mount the new root's tmpfs on, in the new namespace only.
    pub staging_dir: PathBuf,
    /// Paths the VMM needs after confinement (the vsock socket directory, the metrics file).
    pub keep: Vec<KeptPath>,
    pub limits: ResourceLimits,
    /// Switch to this uid/gid (and no supplementary groups) at the end.
    pub drop_to: Option<Credentials>,
}

impl Default for JailPlan {
    fn default() -> Self {
        Self {
            new_root: true,
            staging_dir: PathBuf::from(DEFAULT_STAGING_DIR),
            keep: Vec::new(),
            limits: ResourceLimits::default(),
            drop_to: None,
        }
    }
}

impl JailPlan {
    /// Adds a path to keep.
    pub fn keep(mut self, path: impl Into<PathBuf>, access: Access) -> Self {
        self.keep.push(KeptPath {
            path: path.into(),
            access,
        });
        self
    }
}

/// `RLIMIT_FSIZE` for files of these sizes (the drives): the largest plus [`FILE_SIZE_MARGIN`].
pub fn file_size_limit(sizes: impl IntoIterator<Item = u64>) -> u64 {
    sizes
        .into_iter()
        .max()
        .unwrap_or(0)
        .saturating_add(FILE_SIZE_MARGIN)
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("kept path {path:?} must be absolute, without `.` or `..` components")]
    BadKeptPath { path: PathBuf },
    #[error("kept path {path:?} contains a NUL byte")]
    NulInPath { path: PathBuf },
    #[error("{inner:?} is kept read-write inside {outer:?}, which is kept read-only")]
    NestedKeptPaths { outer: PathBuf, inner: PathBuf },
    #[error("opening kept path {path:?}")]
    OpenKept {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating mount point {path:?} in the new root")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} at {target:?}")]
    Mount {
        what: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{step}")]
    Sys {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("setting {resource} to {value}")]
    Limit {
        resource: &'static str,
        value: u64,
        #[source]
        source: io::Error,
    },
    #[error("dropping to uid {uid} gid {gid}: {step}")]
    Drop {
        uid: libc::uid_t,
        gid: libc::gid_t,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("after dropping to uid {uid} the process could become root again")]
    StillPrivileged { uid: libc::uid_t },
}

/// Confines the calling thread and the threads it starts from now on, and the process's
/// limits and credentials (see the module doc). Needs `CAP_SYS_ADMIN` when `plan.new_root`.
pub fn confine(plan: &JailPlan) -> Result<(), JailError> {
    let kept = if plan.new_root {
        let kept = normalize_kept(&plan.keep)?;
        build_new_root(&plan.staging_dir, &kept)?;
        kept.len()
    } else {
        0
    };
    // SAFETY: PR_SET_DUMPABLE takes plain integers and changes only this process's flag.
    let ret = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0_u64, 0_u64, 0_u64, 0_u64) };
    check(ret, "making the process non-dumpable")?;
    let limits = apply_limits(&plan.limits)?;
    if let Some(credentials) = plan.drop_to {
        drop_privileges(credentials)?;
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and only sets a flag on this thread
    // (inherited by threads and processes it creates).
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1_u64, 0_u64, 0_u64, 0_u64) };
    check(ret, "setting no_new_privs")?;
    tracing::info!(
        new_root = plan.new_root,
        kept_paths = kept,
        open_files = limits.open_files,
        file_size = ?limits.file_size,
        processes = ?limits.processes,
        uid = ?plan.drop_to.map(|c| c.uid),
        "VMM confined"
    );
    Ok(())
}

/// Validates kept paths and makes the list minimal: sorted, duplicates merged (read-write
/// wins), and paths inside another kept directory dropped when that one already grants them.
fn normalize_kept(keep: &[KeptPath]) -> Result<Vec<KeptPath>, JailError> {
    let mut normalized = Vec::with_capacity(keep.len());
    for kept in keep {
        let mut path = PathBuf::new();
        for component in kept.path.components() {
            match component {
                Component::RootDir => path.push("/"),
                Component::Normal(name) => path.push(name),
                Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                    return Err(JailError::BadKeptPath {
                        path: kept.path.clone(),
                    });
                }
            }
        }
        if !kept.path.is_absolute() || path.parent().is_none() {
            // Relative, or `/` itself (keeping the whole root is not a jail).
            return Err(JailError::BadKeptPath {
                path: kept.path.clone(),
            });
        }
        if path.as_os_str().as_bytes().contains(&0) {
            return Err(JailError::NulInPath { path });
        }
        normalized.push(KeptPath {
            path,
            access: kept.access,
        });
    }
    normalized.sort_by(|a, b| a.path.cmp(&b.path));
    let mut minimal: Vec<KeptPath> = Vec::with_capacity(normalized.len());
    for kept in normalized {
        if let Some(same) = minimal.iter_mut().find(|m| m.path == kept.path) {
            if kept.access == Access::ReadWrite {
                same.access = Access::ReadWrite;
            }
            continue;
        }
        // Sorted order puts an ancestor before its descendants.
        if let Some(outer) = minimal.iter().find(|m| kept.path.starts_with(&m.path)) {
            if outer.access == Access::ReadOnly && kept.access == Access::ReadWrite {
                return Err(JailError::NestedKeptPaths {
                    outer: outer.path.clone(),
                    inner: kept.path,
                });
            }
            continue;
        }
        minimal.push(kept);
    }
    Ok(minimal)
}

/// Turns an `-1`-means-error return into a [`JailError::Sys`].
fn check(ret: libc::c_int, step: &'static str) -> Result<(), JailError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(JailError::Sys {
            step,
            source: io::Error::last_os_error(),
        })
    }
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::NulInPath {
        path: path.to_path_buf(),
    })
}

/// `mount(2)`; `None` is a null pointer.
fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call, and
    // mount(2) only reads them.
    let ret = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Flags every mount of the new root gets.
const JAIL_MOUNT_FLAGS: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

fn build_new_root(staging: &Path, kept: &[KeptPath]) -> Result<(), JailError> {
    // SAFETY: unshare takes a flag word; CLONE_NEWNS (which implies CLONE_FS) gives this
    // thread its own mount namespace and root/cwd, and touches no memory.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check(ret, "creating a mount namespace")?;
    let root = c_path(Path::new("/"))?;
    mount(None, &root, None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(|source| {
        JailError::Mount {
            what: "making every mount private",
            target: PathBuf::from("/"),
            source,
        }
    })?;

    // Open what is kept before the tmpfs goes on top: a kept path may lie under the staging
    // directory. O_PATH grants no access by itself; it only names the file for the bind.
    let mut sources = Vec::with_capacity(kept.len());
    for k in kept {
        let open_error = |source| JailError::OpenKept {
            path: k.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&k.path)
            .map_err(open_error)?;
        let is_dir = file.metadata().map_err(open_error)?.is_dir();
        sources.push((k, file, is_dir));
    }

    let staging_c = c_path(staging)?;
    let tmpfs = c_path(Path::new("tmpfs"))?;
    let options = c_path(Path::new("mode=0755,size=256k"))?;
    mount(
        Some(&tmpfs),
        &staging_c,
        Some(&tmpfs),
        JAIL_MOUNT_FLAGS,
        Some(&options),
    )
    .map_err(|source| JailError::Mount {
        what: "mounting the new root's tmpfs",
        target: staging.to_path_buf(),
        source,
    })?;

    for (k, file, is_dir) in &sources {
        bind_kept(staging, k, file, *is_dir)?;
    }
    // The O_PATH fds point into the old root: closed before it is detached.
    drop(sources);

    // SAFETY: chdir reads a NUL-terminated string that outlives the call.
    if unsafe { libc::chdir(staging_c.as_ptr()) } != 0 {
        return Err(JailError::Mount {
            what: "entering the new root",
            target: staging.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    enter_new_root()?;

    mount(
        None,
        &root,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | JAIL_MOUNT_FLAGS,
        None,
    )
    .map_err(|source| JailError::Mount {
        what: "making the new root read-only",
        target: PathBuf::from("/"),
        source,
    })
}

/// Makes the current directory (the tmpfs) the root: `pivot_root(".", ".")` stacks the old
/// root on top of the new one, and detaching it leaves only the new one. An initramfs root
/// cannot be pivoted (EINVAL): then `chroot`, which leaves the old mounts in the namespace
/// but out of reach of a process that may not call `chroot` (seccomp denies it).
fn enter_new_root() -> Result<(), JailError> {
    let dot = c_path(Path::new("."))?;
    // SAFETY: pivot_root reads two NUL-terminated strings that outlive the call.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if pivoted == 0 {
        // SAFETY: umount2 reads a NUL-terminated string that outlives the call.
        let ret = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
        check(ret, "detaching the old root")?;
    } else {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::Sys {
                step: "pivot_root into the new root",
                source: error,
            });
        }
        tracing::warn!("pivot_root refused (EINVAL: initramfs root?); using chroot");
        // SAFETY: chroot reads a NUL-terminated string that outlives the call.
        let ret = unsafe { libc::chroot(dot.as_ptr()) };
        check(ret, "chroot into the new root")?;
    }
    let root = c_path(Path::new("/"))?;
    // SAFETY: chdir reads a NUL-terminated string that outlives the call.
    let ret = unsafe { libc::chdir(root.as_ptr()) };
    check(ret, "entering /")
}

/// Creates the mount point for `kept` in the tmpfs at `staging` and binds the source there.
fn bind_kept(
    staging: &Path,
    kept: &KeptPath,
    source: &File,
    is_dir: bool,
) -> Result<(), JailError> {
    let relative = kept.path.strip_prefix("/").unwrap_or(&kept.path);
    let target = staging.join(relative);
    let point_error = |source| JailError::MountPoint {
        path: kept.path.clone(),
        source,
    };
    // Each directory on the way, 0755 whatever the umask: a dropped uid must traverse them.
    let mut dir = staging.to_path_buf();
    let parents: Vec<_> = relative
        .parent()
        .into_iter()
        .flat_map(Path::components)
        .collect();
    for component in parents {
        dir.push(component);
        make_dir(&dir).map_err(point_error)?;
    }
    if is_dir {
        make_dir(&target).map_err(point_error)?;
    } else {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target)
            .map_err(point_error)?;
    }

    let target_c = c_path(&target)?;
    let via_fd = c_path(Path::new(&format!("/proc/self/fd/{}", source.as_raw_fd())))?;
    mount(Some(&via_fd), &target_c, None, libc::MS_BIND, None).map_err(|source| {
        JailError::Mount {
            what: "binding a kept path",
            target: kept.path.clone(),
            source,
        }
    })?;
    let read_only = match kept.access {
        Access::ReadOnly => libc::MS_RDONLY,
        Access::ReadWrite => 0,
    };
    mount(
        None,
        &target_c,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | JAIL_MOUNT_FLAGS | read_only,
        None,
    )
    .map_err(|source| JailError::Mount {
        what: "setting a kept path's mount flags",
        target: kept.path.clone(),
        source,
    })
}

fn make_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => std::fs::set_permissions(path, Permissions::from_mode(0o755)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The limits as applied (lowered to the current hard limit where that is lower).
fn apply_limits(limits: &ResourceLimits) -> Result<ResourceLimits, JailError> {
    let mut applied = *limits;
    applied.open_files = set_limit(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", limits.open_files)?;
    applied.core_size = set_limit(libc::RLIMIT_CORE, "RLIMIT_CORE", limits.core_size)?;
    if let Some(size) = limits.file_size {
        applied.file_size = Some(set_limit(libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", size)?);
        // A write past the limit then fails with EFBIG (the console or metrics file stops
        // growing) instead of SIGXFSZ killing the VMM.
        // SAFETY: setting a signal's disposition to "ignore" is always sound.
        let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        if previous == libc::SIG_ERR {
            return Err(JailError::Sys {
                step: "ignoring SIGXFSZ",
                source: io::Error::last_os_error(),
            });
        }
    }
    if let Some(count) = limits.processes {
        applied.processes = Some(set_limit(libc::RLIMIT_NPROC, "RLIMIT_NPROC", count)?);
    }
    Ok(applied)
}

/// The value actually set: `want`, or the hard limit when that is lower (raising a hard
/// limit needs CAP_SYS_RESOURCE, and lower is what we are after anyway).
fn clamp_to_hard(want: u64, hard: libc::rlim_t) -> u64 {
    want.min(hard)
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    name: &'static str,
    want: u64,
) -> Result<u64, JailError> {
    let error = |source| JailError::Limit {
        resource: name,
        value: want,
        source,
    };
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the live local it is given.
    if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    let value = clamp_to_hard(want, current.rlim_max);
    let new = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one rlimit from the live local it is given.
    if unsafe { libc::setrlimit(resource, &new) } != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    Ok(value)
}

/// Switches every thread to `credentials` (glibc signals each thread to make the call; the
/// seccomp filters of threads that exist by then allow these calls).
fn drop_privileges(credentials: Credentials) -> Result<(), JailError> {
    let Credentials { uid, gid } = credentials;
    let error = |step| JailError::Drop {
        uid,
        gid,
        step,
        source: io::Error::last_os_error(),
    };
    // SAFETY: with a count of 0 setgroups reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(error("clearing supplementary groups"));
    }
    // SAFETY: setresgid takes plain integers.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(error("setresgid"));
    }
    // SAFETY: setresuid takes plain integers.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(error("setresuid"));
    }
    if uid != 0 {
        // Paranoia: getting root back must fail now. A raw syscall, so that if it wrongly
        // succeeded only this thread would change (and the VMM stops on the error).
        // SAFETY: setresuid takes plain integers.
        let regained = unsafe { libc::syscall(libc::SYS_setresuid, 0_i64, 0_i64, 0_i64) };
        if regained == 0 {
            return Err(JailError::StillPrivileged { uid });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(path: &str, access: Access) -> KeptPath {
        KeptPath {
            path: PathBuf::from(path),
            access,
        }
    }

    #[test]
    fn test_normalize_kept_rejects_relative_dot_dot_and_root() {
        for bad in ["run/vm", "/run/../etc", "/", "./run", ""] {
            let result = normalize_kept(&[kept(bad, Access::ReadOnly)]);
            assert!(
                matches!(result, Err(JailError::BadKeptPath { .. })),
                "{bad:?}: {result:?}"
            );
        }
    }

    #[test]
    fn test_normalize_kept_cleans_slashes_and_interior_dots() {
        let got = normalize_kept(&[kept("//run///vm/./sock/", Access::ReadOnly)]).unwrap();
        assert_eq!(got, vec![kept("/run/vm/sock", Access::ReadOnly)]);
    }

    #[test]
    fn test_normalize_kept_merges_duplicates_read_write_wins() {
        let got = normalize_kept(&[
            kept("/run/vm", Access::ReadOnly),
            kept("/run/vm/", Access::ReadWrite),
        ])
        .unwrap();
        assert_eq!(got, vec![kept("/run/vm", Access::ReadWrite)]);
    }

    #[test]
    fn test_normalize_kept_drops_paths_covered_by_a_kept_directory() {
        let got = normalize_kept(&[
            kept("/run/vm/metrics", Access::ReadWrite),
            kept("/run/vm", Access::ReadWrite),
            kept("/srv/a", Access::ReadOnly),
            kept("/srv/ab", Access::ReadOnly),
        ])
        .unwrap();
        // `/srv/ab` is not inside `/srv/a`: components, not string prefixes.
        assert_eq!(
            got,
            vec![
                kept("/run/vm", Access::ReadWrite),
                kept("/srv/a", Access::ReadOnly),
                kept("/srv/ab", Access::ReadOnly),
            ]
        );
    }

    #[test]
    fn test_normalize_kept_read_write_inside_read_only_is_an_error() {
        let result = normalize_kept(&[
            kept("/run/vm", Access::ReadOnly),
            kept("/run/vm/metrics", Access::ReadWrite),
        ]);
        assert!(
            matches!(result, Err(JailError::NestedKeptPaths { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn test_file_size_limit_covers_largest_drive_plus_margin() {
        assert_eq!(
            file_size_limit([10, 1 << 33, 5]),
            (1 << 33) + FILE_SIZE_MARGIN
        );
        assert_eq!(file_size_limit([]), FILE_SIZE_MARGIN);
        assert_eq!(file_size_limit([u64::MAX]), u64::MAX);
    }

    #[test]
    fn test_clamp_to_hard_never_raises() {
        assert_eq!(clamp_to_hard(2048, libc::RLIM_INFINITY), 2048);
        assert_eq!(clamp_to_hard(2048, 1024), 1024);
        assert_eq!(clamp_to_hard(0, 1024), 0);
    }

    #[test]
    fn test_plan_defaults_and_builder() {
        let plan = JailPlan::default().keep("/run/vm", Access::ReadWrite);
        assert!(plan.new_root);
        assert_eq!(plan.staging_dir, Path::new(DEFAULT_STAGING_DIR));
        assert_eq!(plan.limits.open_files, DEFAULT_OPEN_FILES);
        assert_eq!(plan.limits.core_size, 0);
        assert_eq!(plan.limits.file_size, None);
        assert_eq!(plan.limits.processes, None);
        assert_eq!(plan.drop_to, None);
        assert_eq!(plan.keep, vec![kept("/run/vm", Access::ReadWrite)]);
    }

    #[test]
    fn test_c_path_rejects_nul() {
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/run/a\0b"));
        assert!(matches!(c_path(&path), Err(JailError::NulInPath { .. })));
        let result = normalize_kept(&[KeptPath {
            path,
            access: Access::ReadOnly,
        }]);
        assert!(
            matches!(result, Err(JailError::NulInPath { .. })),
            "{result:?}"
        );
    }
}
