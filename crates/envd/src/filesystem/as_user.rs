//! Filesystem work done with a request user's permissions.
//!
//! envd runs as root, but a file request must succeed or fail exactly as it would for the
//! user it names (a `tester` must not read `/root`). Linux keeps the identity used for
//! permission checks (`fsuid`, `fsgid`, supplementary groups) per thread, so each operation
//! runs on a short-lived thread of its own that takes the user's identity and then ends: no
//! tokio worker ever carries a changed identity, and nothing has to be switched back. Files
//! and directories created there belong to the user without a `chown`.
//!
//! `setgroups` goes through the raw syscall because the C library's wrapper changes the groups
//! of every thread in the process (POSIX semantics), which is exactly what must not happen.
use std::io;

use nix::unistd::{Gid, Uid, geteuid, setfsgid, setfsuid};
use thiserror::Error;

use crate::users::User;

/// Why an operation could not be run as the user.
#[derive(Debug, Error)]
pub enum AsUserError {
    /// The helper thread could not be started.
    #[error("starting a helper thread")]
    Spawn(#[source] io::Error),
    /// The thread could not take the user's identity (envd is not root?).
    #[error("acting as user '{user}'")]
    Switch {
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The operation panicked.
    #[error("a filesystem helper thread failed")]
    Panicked,
}

impl From<AsUserError> for connectrpc::ConnectError {
    fn from(error: AsUserError) -> Self {
        let message = match &error {
            AsUserError::Spawn(source) => format!("{error}: {source}"),
            AsUserError::Switch { source, .. } => format!("{error}: {source}"),
            AsUserError::Panicked => error.to_string(),
        };
        connectrpc::ConnectError::internal(message)
    }
}

/// Runs `work` on a fresh thread whose filesystem identity is `user`'s, and returns its result.
pub async fn run_as<T, F>(user: &User, work: F) -> Result<T, AsUserError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (uid, gid, groups, name) = (user.uid, user.gid, user.groups.clone(), user.name.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("envd-fs".into())
        .spawn(move || {
            let result = become_user(uid, gid, &groups)
                .map(|()| work())
                .map_err(|source| AsUserError::Switch { user: name, source });
            // The receiver is gone only when the request was dropped; nothing to report then.
            let _ = tx.send(result);
        })
        .map_err(AsUserError::Spawn)?;
    rx.await.map_err(|_| AsUserError::Panicked)?
}

/// Gives the calling thread `uid`'s filesystem identity. Only for threads that end right after.
fn become_user(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    let euid = geteuid().as_raw();
    if euid != 0 {
        // Not root: envd can only act as itself.
        return if euid == uid {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        };
    }
    set_thread_groups(groups)?;
    setfsgid(Gid::from_raw(gid));
    // setfsgid reports failure only through the value a second call returns.
    if setfsgid(Gid::from_raw(gid)).as_raw() != gid {
        return Err(io::Error::other("setfsgid did not take effect"));
    }
    setfsuid(Uid::from_raw(uid));
    if setfsuid(Uid::from_raw(uid)).as_raw() != uid {
        return Err(io::Error::other("setfsuid did not take effect"));
    }
    Ok(())
}

/// Sets the supplementary groups of the calling thread only.
fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    let gids: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: SYS_setgroups reads `gids.len()` gid_t values from `gids.as_ptr()`, a live Vec
    // of exactly that many gid_t for the duration of the call; it writes no memory of ours.
    let result = unsafe { libc::syscall(libc::SYS_setgroups, gids.len(), gids.as_ptr()) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn user(uid: u32) -> User {
        User {
            name: "someone".into(),
            uid,
            gid: uid,
            home: "/".into(),
            shell: "/bin/sh".into(),
            groups: vec![uid],
        }
    }

    #[tokio::test]
    async fn test_run_as_creates_files_owned_by_the_user_and_leaves_caller_alone() {
        if !geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let path = dir.path().join("made");
        let made = path.clone();
        run_as(&user(4321), move || std::fs::write(&made, b"x"))
            .await
            .unwrap()
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4321, 4321));
        // This thread is still root: it may write where the user may not.
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let inside = private.join("f");
        let denied = run_as(&user(4321), move || std::fs::write(&inside, b"x"))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
        std::fs::write(private.join("g"), b"root can").unwrap();
    }
}
