//! cgroup v2 for started processes: each gets its own cgroup under
//! `/sys/fs/cgroup/wrenn/processes/`, so that killing it kills everything it started (even what
//! left its process group) and the host's limits for all user processes (`/init`'s
//! `processLimits`, written to `wrenn/processes`) hold together.
//!
//! ```text
//! /sys/fs/cgroup                  (envd; controllers enabled for the subtree)
//! └── wrenn
//!     └── processes               memory.max, cpu.max, pids.max from /init
//!         ├── p1                  one started process and its descendants
//!         └── p2
//! ```
//!
//! Only used when [`Settings::manage_cgroups`](crate::state::Settings) says so (envd is PID 1
//! in a sandbox): on a host whose tree belongs to systemd, envd keeps its hands off.
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::Pid;
use serde::Deserialize;
use thiserror::Error;

/// Where the cgroup2 hierarchy is mounted in a sandbox.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The controllers envd enables down to `wrenn/processes` (those the kernel offers).
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Errors setting up cgroups or writing limits.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// The path is not a cgroup2 mount.
    #[error("{0} is not a cgroup2 mount")]
    NotCgroup2(PathBuf),
    /// A cgroup file or directory could not be read or written.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A limit value that cgroup files would not take (or could be used to inject others).
    #[error("invalid {name} value '{value}'")]
    InvalidLimit {
        /// The limit's name.
        name: &'static str,
        /// The value given.
        value: String,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A limit given as a number or as cgroup text (`"max"`, `"512M"`, `"50000 100000"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LimitValue {
    /// A plain number (bytes, process count).
    Number(u64),
    /// Text written as it is, after validation.
    Text(String),
}

impl LimitValue {
    fn render(&self, name: &'static str) -> Result<String, CgroupError> {
        match self {
            Self::Number(n) => Ok(n.to_string()),
            Self::Text(text) => {
                let ok = !text.is_empty()
                    && text.len() <= 64
                    && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ');
                if ok {
                    Ok(text.clone())
                } else {
                    Err(CgroupError::InvalidLimit {
                        name,
                        value: text.clone(),
                    })
                }
            }
        }
    }
}

/// `/init`'s `processLimits`: limits for all user processes together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessLimits {
    /// `memory.max` (bytes, or e.g. `"512M"`, `"max"`).
    pub memory_max: Option<LimitValue>,
    /// `cpu.max` (`"<quota> <period>"` in microseconds, or `"max"`).
    pub cpu_max: Option<LimitValue>,
    /// `pids.max` (a count, or `"max"`).
    pub pids_max: Option<LimitValue>,
}

/// The cgroup tree envd manages: the `wrenn/processes` parent of every process cgroup.
#[derive(Debug)]
pub struct Cgroups {
    parent: PathBuf,
}

impl ProcessLimits {
    /// The `(file, value)` writes these limits make; an error for any value cgroup files
    /// would not take.
    pub fn writes(&self) -> Result<Vec<(&'static str, String)>, CgroupError> {
        let entries = [
            ("memory.max", &self.memory_max),
            ("cpu.max", &self.cpu_max),
            ("pids.max", &self.pids_max),
        ];
        let mut writes = Vec::new();
        for (file, value) in entries {
            if let Some(value) = value {
                writes.push((file, value.render(file)?));
            }
        }
        Ok(writes)
    }
}

impl Cgroups {
    /// Prepares `<root>/wrenn/processes` on the cgroup2 mount at `root`, enabling the
    /// available controllers on the way down (best effort: a missing controller only loses
    /// its limit).
    pub fn init(root: &Path) -> Result<Self, CgroupError> {
        let fs = statfs(root).map_err(|e| io_at(root)(e.into()))?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2(root.to_owned()));
        }
        let wrenn = root.join("wrenn");
        let parent = wrenn.join("processes");
        std::fs::create_dir_all(&parent).map_err(io_at(&parent))?;
        for dir in [root, wrenn.as_path()] {
            enable_controllers(dir);
        }
        Ok(Self { parent })
    }

    /// The `wrenn/processes` directory.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// A new, empty cgroup for one process, named `name`.
    pub fn create(&self, name: &str) -> Result<ProcessCgroup, CgroupError> {
        let path = self.parent.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(io_at(&path)(error)),
        }
        Ok(ProcessCgroup { path })
    }

    /// Writes `limits` to the parent of all process cgroups.
    pub fn apply_limits(&self, limits: &ProcessLimits) -> Result<(), CgroupError> {
        // All validated first, so a bad value changes nothing.
        for (file, value) in limits.writes()? {
            let path = self.parent.join(file);
            std::fs::write(&path, value.as_bytes()).map_err(io_at(&path))?;
        }
        Ok(())
    }
}

/// Enables in `dir/cgroup.subtree_control` each of [`CONTROLLERS`] that `dir` has.
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for controller in CONTROLLERS {
        if !available.split_whitespace().any(|c| c == controller) {
            continue;
        }
        let path = dir.join("cgroup.subtree_control");
        if let Err(error) = std::fs::write(&path, format!("+{controller}")) {
            tracing::warn!(%error, path = %path.display(), controller, "could not enable a cgroup controller");
        }
    }
}

/// The cgroup of one started process.
#[derive(Debug, Clone)]
pub struct ProcessCgroup {
    path: PathBuf,
}

impl ProcessCgroup {
    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs` opened for writing: the child writes `0` to it (moving itself in)
    /// between fork and exec, so it never runs a user instruction outside its cgroup.
    pub fn open_procs(&self) -> Result<File, CgroupError> {
        let path = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_at(&path))
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// Sends `signal` to every process in the cgroup; SIGKILL goes through `cgroup.kill`,
    /// which also catches processes forking while we look.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        if signal == Signal::SIGKILL {
            let kill_file = self.path.join("cgroup.kill");
            match OpenOptions::new()
                .write(true)
                .open(&kill_file)
                .and_then(|mut f| f.write_all(b"1"))
            {
                Ok(()) => return Ok(()),
                // Kernels before 5.14 have no cgroup.kill: signal one by one.
                Err(error) => {
                    tracing::debug!(%error, "cgroup.kill failed; signalling each process")
                }
            }
        }
        for pid in self.pids() {
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Removes the cgroup once it is empty: now if it is, else from a background task that
    /// retries while leftovers (background children of the process) still live in it.
    pub fn remove_when_empty(self) {
        if self.try_remove() {
            return;
        }
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                tokio::time::sleep(delay).await;
                if self.try_remove() {
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        });
    }

    /// One removal attempt; true when the cgroup is gone.
    fn try_remove(&self) -> bool {
        match std::fs::remove_dir(&self.path) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::NotFound => true,
            Err(_) => false,
        }
    }
}

/// The cgroup tree, set up on first use when the settings allow it (`None`: not usable here).
pub fn manager(manage: bool) -> Option<&'static Cgroups> {
    static MANAGER: OnceLock<Option<Cgroups>> = OnceLock::new();
    if !manage {
        return None;
    }
    MANAGER
        .get_or_init(|| match Cgroups::init(Path::new(CGROUP_ROOT)) {
            Ok(cgroups) => Some(cgroups),
            Err(error) => {
                tracing::warn!(%error, "processes run without their own cgroups");
                None
            }
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup2 mount to test on, if this machine has a writable one.
    fn test_root() -> Option<PathBuf> {
        for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let path = Path::new(candidate);
            let is_cgroup2 =
                statfs(path).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC);
            if !is_cgroup2 {
                continue;
            }
            let mut id = [0u8; 6];
            getrandom::fill(&mut id).ok()?;
            let name: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let root = path.join(format!("wrenn-test-{name}"));
            if std::fs::create_dir(&root).is_ok() {
                return Some(root);
            }
        }
        None
    }

    fn cleanup(root: &Path) {
        let _ = std::fs::remove_dir(root.join("wrenn/processes"));
        let _ = std::fs::remove_dir(root.join("wrenn"));
        let _ = std::fs::remove_dir(root);
    }

    #[test]
    fn test_limit_values_injection_is_refused() {
        assert_eq!(LimitValue::Number(5).render("pids.max").unwrap(), "5");
        assert_eq!(
            LimitValue::Text("50000 100000".into())
                .render("cpu.max")
                .unwrap(),
            "50000 100000"
        );
        assert!(LimitValue::Text("1\n+memory".into()).render("x").is_err());
        assert!(LimitValue::Text(String::new()).render("x").is_err());
        let limits: ProcessLimits =
            serde_json::from_str(r#"{"memoryMax": 1048576, "cpuMax": "max", "pidsMax": "100"}"#)
                .unwrap();
        assert_eq!(limits.memory_max, Some(LimitValue::Number(1 << 20)));
        assert_eq!(limits.cpu_max, Some(LimitValue::Text("max".into())));
    }

    #[test]
    fn test_limits_written_to_the_parent_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cgroups = Cgroups {
            parent: dir.path().to_owned(),
        };
        cgroups
            .apply_limits(&ProcessLimits {
                memory_max: Some(LimitValue::Number(1 << 20)),
                cpu_max: Some(LimitValue::Text("50000 100000".into())),
                pids_max: None,
            })
            .unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "1048576");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert!(!dir.path().join("pids.max").exists());
        let bad = cgroups.apply_limits(&ProcessLimits {
            pids_max: Some(LimitValue::Number(5)),
            memory_max: Some(LimitValue::Text("1;2".into())),
            ..ProcessLimits::default()
        });
        assert!(matches!(bad, Err(CgroupError::InvalidLimit { .. })));
        assert!(!dir.path().join("pids.max").exists());
    }

    #[test]
    fn test_not_cgroup2_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Cgroups::init(dir.path()),
            Err(CgroupError::NotCgroup2(_))
        ));
    }

    #[tokio::test]
    async fn test_cgroup_holds_kills_and_goes_away() {
        let Some(root) = test_root() else {
            eprintln!("skipped: no writable cgroup2 mount");
            return;
        };
        let cgroups = Cgroups::init(&root).unwrap();
        let cgroup = cgroups.create("p1").unwrap();
        let procs = cgroup.open_procs().unwrap();
        let mut command = std::process::Command::new("sh");
        command.args(["-c", "sleep 100 & sleep 100"]);
        // SAFETY: the closure only calls write(2) on an open descriptor; it allocates nothing
        // and takes no lock, so it is safe between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                nix::unistd::write(&procs, b"0")?;
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cgroup.pids().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "{:?}", cgroup.pids());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(cgroup.pids().contains(&i32::try_from(child.id()).unwrap()));
        cgroup.signal(Signal::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cgroup.pids().is_empty() {
            assert!(std::time::Instant::now() < deadline, "{:?}", cgroup.pids());
            std::thread::sleep(Duration::from_millis(10));
        }
        let path = cgroup.path().to_owned();
        cgroup.remove_when_empty();
        assert!(!path.exists());
        cleanup(&root);
    }
}
