//! The cgroup v2 tree envd owns: `/sys/fs/cgroup/wrenn`, with envd itself in
//! `/sys/fs/cgroup/wrenn/envd` and every available controller enabled for the children of
//! `wrenn` (where the process service puts the processes it starts, when
//! [`Settings::manage_cgroups`](crate::state::Settings::manage_cgroups) is on).
//!
//! cgroup v2's "no internal processes" rule: a non-root cgroup with controllers enabled for
//! its children may hold no processes itself, so envd moves into `wrenn/envd` before it
//! enables controllers in `wrenn/cgroup.subtree_control`.
use std::io;
use std::path::{Path, PathBuf};

/// Where cgroup2 is mounted.
pub const MOUNT: &str = "/sys/fs/cgroup";
/// The subtree envd owns.
pub const ROOT: &str = "/sys/fs/cgroup/wrenn";
/// envd's own cgroup, below [`ROOT`].
pub const ENVD: &str = "/sys/fs/cgroup/wrenn/envd";

/// A cgroup file operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct CgroupError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn context(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError {
        action,
        path,
        source,
    }
}

/// Creates the `wrenn` subtree under `mount`, moves this process (and any other in `wrenn`)
/// into `wrenn/envd`, and enables the available controllers at the root and in `wrenn`.
/// A controller that cannot be enabled is logged and skipped.
pub fn setup(mount: &Path) -> Result<(), CgroupError> {
    let root = mount.join("wrenn");
    let envd = root.join("envd");
    enable_controllers(mount);
    std::fs::create_dir_all(&envd).map_err(context("creating", &envd))?;
    let procs = envd.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .map_err(context("moving envd into", &procs))?;
    // Anything still directly in `wrenn` (an earlier envd's children) moves too, or the
    // controllers below could not be enabled.
    if let Ok(text) = std::fs::read_to_string(root.join("cgroup.procs")) {
        for pid in text.lines() {
            let _ = std::fs::write(&procs, pid);
        }
    }
    enable_controllers(&root);
    Ok(())
}

/// Enables every controller `cgroup`'s parent offers in `cgroup/cgroup.subtree_control`,
/// one by one.
fn enable_controllers(cgroup: &Path) {
    let available = match std::fs::read_to_string(cgroup.join("cgroup.controllers")) {
        Ok(text) => text,
        Err(error) => {
            tracing::warn!(cgroup = %cgroup.display(), %error, "no cgroup controllers");
            return;
        }
    };
    let control = cgroup.join("cgroup.subtree_control");
    for controller in available.split_whitespace() {
        if let Err(error) = std::fs::write(&control, format!("+{controller}")) {
            tracing::warn!(cgroup = %cgroup.display(), controller, %error, "cannot enable controller");
        }
    }
}
