//! One `wrenn-vmm` process, driven over its API socket.
//!
//! The agent never links the VMM: it spawns the binary (one process per sandbox) and speaks
//! its Firecracker-shaped HTTP API on a unix socket. A [`Vmm`] is either a child this agent
//! spawned ([`Vmm::spawn`]) or one an earlier agent left running ([`Vmm::adopt`]): VMMs run in
//! their own process group and outlive the agent, so an agent restart does not stop guests.
//!
//! Everything a VMM keeps on disk lives in its run directory ([`VmmConfig::run_dir`]):
//! `api.sock` (the API), `vsock.sock` (the guest's vsock, envd is reached through it) and
//! `vmm.log` (its stdout and stderr, appended). The VMM's jail keeps that directory, so it is
//! also the place for a page-server socket (`Uffd` restores reconnect to it by path).
//!
//! The few request bodies the agent sends are written here with serde; their shapes are the
//! VMM's (`crates/vmm/src/api/models.rs`). A refused request (`400 {"fault_message": ..}`)
//! becomes [`VmmError::Fault`] carrying the VMM's message, which says what to fix. Every call
//! is bounded by a timeout.
//!
//! The HTTP client is hyper's HTTP/1 connection over `tokio::net::UnixStream`, one connection
//! per request (requests are rare and the socket is local).

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::json;

/// The API socket's name in the run directory.
pub const API_SOCKET: &str = "api.sock";
/// The vsock socket's name in the run directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The VMM's log (stdout and stderr) in the run directory.
pub const LOG_FILE: &str = "vmm.log";

/// How long a new VMM may take to answer on its API socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on an ordinary API call (configuration, pause, resume).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on snapshot create and load: they write or map all of guest memory.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a killed VMM may take to vanish.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of `vmm.log` an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("preparing the VMM's run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "wrenn-vmm for sandbox {sandbox_id} exited ({status}) before its API socket answered; \
         the end of {log}:\n{tail}"
    )]
    DiedAtStart {
        sandbox_id: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "wrenn-vmm for sandbox {sandbox_id} did not answer on {socket} within {timeout:?}; \
         the end of {log}:\n{tail}"
    )]
    StartTimeout {
        sandbox_id: String,
        socket: PathBuf,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("process {pid} is not the wrenn-vmm serving {socket}: {reason}")]
    NotOurVmm {
        pid: u32,
        socket: PathBuf,
        reason: String,
    },
    /// The VMM refused the request and said why.
    #[error("the VMM refused {method} {path} ({status}): {message}")]
    Fault {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path} on the VMM's API socket {socket}: {reason}")]
    Api {
        method: String,
        path: String,
        socket: PathBuf,
        reason: String,
    },
    #[error("{method} {path} on the VMM's API socket {socket}: no answer within {timeout:?}")]
    Timeout {
        method: String,
        path: String,
        socket: PathBuf,
        timeout: Duration,
    },
    #[error("signalling VMM process {pid}: {source}")]
    Signal { pid: u32, source: nix::Error },
    #[error("VMM process {pid} still exists {timeout:?} after SIGKILL")]
    Unkillable { pid: u32, timeout: Duration },
}

impl VmmError {
    /// The VMM's own explanation, when it refused a request.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            VmmError::Fault { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// How to start one VMM.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// The `wrenn-vmm` executable.
    pub binary: PathBuf,
    /// Names the VMM (`--id`, on its every log line) and this module's log lines.
    pub sandbox_id: String,
    /// Created if missing; `api.sock`, `vsock.sock` and `vmm.log` live here. One per VMM.
    pub run_dir: PathBuf,
    /// A network namespace to run in (`/run/netns/<name>`), holding the VM's tap.
    pub netns: Option<PathBuf>,
    /// Extra directories the jail keeps read-write: the snapshot store (snapshots are
    /// written there by path).
    pub keep: Vec<PathBuf>,
    /// After a `Uffd` restore, how long a page server that went away has to come back on the
    /// same socket before the VM stops (`None`: the VMM's default, 30 s; zero: at once).
    pub page_server_grace: Option<Duration>,
}

/// A fresh boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub boot_args: String,
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Needed for `Diff` snapshots later.
    pub track_dirty_pages: bool,
    pub drives: Vec<DriveSpec>,
    pub network: Option<NetSpec>,
    /// Adds a vsock device with this guest CID on [`Vmm::vsock_socket`].
    pub vsock_cid: Option<u32>,
    /// Adds a virtio-rng device.
    pub entropy: bool,
    /// Where the serial console goes (a file, appended); `None` keeps it only in the VMM's
    /// ring buffer ([`Vmm::console`]).
    pub console: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct DriveSpec {
    pub drive_id: String,
    pub is_root_device: bool,
    pub read_only: bool,
    pub source: DriveSource,
}

#[derive(Debug, Clone)]
pub enum DriveSource {
    /// A plain file used as is.
    File(PathBuf),
    /// A drive of a layered store's build; guest writes go to `overlay` (created).
    Layered {
        store: PathBuf,
        build_id: String,
        overlay: PathBuf,
    },
}

/// One network interface on a tap.
#[derive(Debug, Clone)]
pub struct NetSpec {
    pub iface_id: String,
    /// The tap's name (in the VMM's network namespace).
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`; the guest picks one when `None`.
    pub guest_mac: Option<String>,
}

/// Where a restore's guest memory comes from.
#[derive(Debug, Clone)]
pub enum MemorySource {
    /// Mapped from the build's memory layers at load.
    File,
    /// Served lazily by a page server listening on this unix socket (put it in the run
    /// directory: the jail keeps that, and the VMM reconnects there if the server restarts).
    Uffd(PathBuf),
}

/// A restore from a layered store's build.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    pub store: PathBuf,
    pub build_id: String,
    pub memory: MemorySource,
    /// A tap for each network interface the snapshot has: (iface_id, tap).
    pub taps: Vec<(String, String)>,
    /// Where each drive's writes go now: (drive_id, path). For a layered drive, a new
    /// overlay file; for a plain one, the file itself.
    pub drives: Vec<(String, PathBuf)>,
    /// Run the guest at once (otherwise it stays paused until [`Vmm::resume`]).
    pub resume: bool,
    /// Track dirty pages from here on (for a later `Diff` snapshot).
    pub track_dirty_pages: bool,
    /// As [`BootSpec::console`].
    pub console: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// Pages written since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// A snapshot into a new build of a layered store (the VM must be paused).
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    pub store: PathBuf,
    /// 32 hex digits; must not exist in the store yet.
    pub build_id: String,
    pub kind: SnapshotKind,
}

// Request bodies: the VMM's shapes (models.rs), only the fields the agent sets.

#[derive(Serialize)]
struct BootSourceBody<'a> {
    kernel_image_path: &'a Path,
    boot_args: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd_path: Option<&'a Path>,
}

#[derive(Serialize)]
struct MachineConfigBody {
    vcpu_count: u8,
    mem_size_mib: u64,
    track_dirty_pages: bool,
}

#[derive(Serialize)]
struct LayersBody<'a> {
    store: &'a Path,
    build_id: &'a str,
}

#[derive(Serialize)]
struct DriveBody<'a> {
    drive_id: &'a str,
    path_on_host: &'a Path,
    is_root_device: bool,
    is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<LayersBody<'a>>,
}

#[derive(Serialize)]
struct NetBody<'a> {
    iface_id: &'a str,
    host_dev_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_mac: Option<&'a str>,
}

#[derive(Serialize)]
struct MemBackendBody<'a> {
    backend_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_path: Option<&'a Path>,
}

#[derive(Serialize)]
struct OverrideNet<'a> {
    iface_id: &'a str,
    host_dev_name: &'a str,
}

#[derive(Serialize)]
struct OverrideDrive<'a> {
    drive_id: &'a str,
    path_on_host: &'a Path,
}

#[derive(Serialize)]
struct LoadBody<'a> {
    layers: LayersBody<'a>,
    mem_backend: MemBackendBody<'a>,
    network_overrides: Vec<OverrideNet<'a>>,
    vsock_override: serde_json::Value,
    drive_overrides: Vec<OverrideDrive<'a>>,
    resume_vm: bool,
    track_dirty_pages: bool,
}

#[derive(Serialize)]
struct CreateBody<'a> {
    snapshot_type: SnapshotKind,
    layers: LayersBody<'a>,
}

/// One `wrenn-vmm` process. Dropping it leaves the process running (it belongs to its
/// sandbox, not to this handle): call [`Vmm::stop`] to end it.
#[derive(Debug)]
pub struct Vmm {
    pid: u32,
    sandbox_id: String,
    run_dir: PathBuf,
    api_socket: PathBuf,
    /// Our child, until reaped; `None` for an adopted VMM.
    child: Mutex<Option<Child>>,
    adopted: bool,
}

impl Vmm {
    /// Starts the process in its own process group (it must outlive the agent and the request
    /// that made it; no parent-death signal), stdout and stderr appended to `run_dir/vmm.log`,
    /// and waits until the API socket answers. If it dies first, the error quotes the log.
    pub async fn spawn(config: VmmConfig) -> Result<Vmm, VmmError> {
        let run_dir = config.run_dir.clone();
        let dir_err = |source| VmmError::RunDir {
            path: run_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&run_dir).map_err(dir_err)?;
        let api_socket = run_dir.join(API_SOCKET);
        let log_path = run_dir.join(LOG_FILE);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(dir_err)?;
        let log_err = log.try_clone().map_err(dir_err)?;

        let mut command = std::process::Command::new(&config.binary);
        command
            .arg("--api-sock")
            .arg(&api_socket)
            .arg("--id")
            .arg(&config.sandbox_id);
        if let Some(netns) = &config.netns {
            command.arg("--netns").arg(netns);
        }
        for dir in &config.keep {
            command.arg("--keep").arg(dir);
        }
        if let Some(grace) = config.page_server_grace {
            command
                .arg("--page-server-grace")
                .arg(grace.as_secs().to_string());
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // Its own group: a signal to the agent's group (Ctrl-C, a service stop) is not
            // one to the VMs.
            .process_group(0);
        let child = command.spawn().map_err(|source| VmmError::Spawn {
            binary: config.binary.clone(),
            source,
        })?;
        let pid = child.id();
        tracing::info!(sandbox_id = %config.sandbox_id, pid, run_dir = %run_dir.display(), "VMM started");
        let vmm = Vmm {
            pid,
            sandbox_id: config.sandbox_id,
            run_dir,
            api_socket,
            child: Mutex::new(Some(child)),
            adopted: false,
        };
        vmm.wait_ready().await?;
        Ok(vmm)
    }

    /// Polls the API until it answers, the child exits, or [`START_TIMEOUT`] passes.
    async fn wait_ready(&self) -> Result<(), VmmError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(VmmError::DiedAtStart {
                    sandbox_id: self.sandbox_id.clone(),
                    status,
                    log: self.log_path(),
                    tail: log_tail(&self.log_path()),
                });
            }
            if tokio::net::UnixStream::connect(&self.api_socket)
                .await
                .is_ok()
                && self.instance_state().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::StartTimeout {
                    sandbox_id: self.sandbox_id.clone(),
                    socket: self.api_socket.clone(),
                    timeout: START_TIMEOUT,
                    log: self.log_path(),
                    tail: log_tail(&self.log_path()),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A VMM an earlier agent started: `/proc/<pid>/cmdline` must name `wrenn-vmm` with
    /// `--api-sock <run_dir>/api.sock`, and the socket must answer.
    pub async fn adopt(pid: u32, run_dir: &Path) -> Result<Vmm, VmmError> {
        let api_socket = run_dir.join(API_SOCKET);
        let not_ours = |reason: String| VmmError::NotOurVmm {
            pid,
            socket: api_socket.clone(),
            reason,
        };
        let args = vmm_cmdline(pid, &api_socket).map_err(not_ours)?;
        let sandbox_id = flag_value(&args, "--id").unwrap_or_else(|| "anonymous-instance".into());
        let vmm = Vmm {
            pid,
            sandbox_id,
            run_dir: run_dir.to_owned(),
            api_socket: api_socket.clone(),
            child: Mutex::new(None),
            adopted: true,
        };
        let state = vmm
            .instance_state()
            .await
            .map_err(|e| not_ours(format!("its API socket does not answer: {e}")))?;
        tracing::info!(sandbox_id = %vmm.sandbox_id, pid, %state, "VMM adopted");
        Ok(vmm)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The host side of the guest's vsock: connect and send `CONNECT <port>\n`.
    pub fn vsock_socket(&self) -> PathBuf {
        self.run_dir.join(VSOCK_SOCKET)
    }

    pub fn log_path(&self) -> PathBuf {
        self.run_dir.join(LOG_FILE)
    }

    /// Whether this VMM was started by an earlier agent.
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// Configures a fresh VM and starts it: machine, boot source, drives, network, vsock,
    /// entropy, console, then `InstanceStart`.
    pub async fn boot(&self, boot: &BootSpec) -> Result<(), VmmError> {
        if let Some(console) = &boot.console {
            self.put("/serial", &json!({ "serial_out_path": console }))
                .await?;
        }
        self.put(
            "/machine-config",
            &MachineConfigBody {
                vcpu_count: boot.vcpus,
                mem_size_mib: boot.mem_mib,
                track_dirty_pages: boot.track_dirty_pages,
            },
        )
        .await?;
        self.put(
            "/boot-source",
            &BootSourceBody {
                kernel_image_path: &boot.kernel,
                boot_args: &boot.boot_args,
                initrd_path: boot.initrd.as_deref(),
            },
        )
        .await?;
        for drive in &boot.drives {
            let (path, layers) = match &drive.source {
                DriveSource::File(path) => (path.as_path(), None),
                DriveSource::Layered {
                    store,
                    build_id,
                    overlay,
                } => (
                    overlay.as_path(),
                    Some(LayersBody {
                        store,
                        build_id: build_id.as_str(),
                    }),
                ),
            };
            let body = DriveBody {
                drive_id: &drive.drive_id,
                path_on_host: path,
                is_root_device: drive.is_root_device,
                is_read_only: drive.read_only,
                layers,
            };
            self.put(&format!("/drives/{}", drive.drive_id), &body)
                .await?;
        }
        if let Some(net) = &boot.network {
            let body = NetBody {
                iface_id: &net.iface_id,
                host_dev_name: &net.tap,
                guest_mac: net.guest_mac.as_deref(),
            };
            self.put(&format!("/network-interfaces/{}", net.iface_id), &body)
                .await?;
        }
        if let Some(cid) = boot.vsock_cid {
            let body = json!({ "guest_cid": cid, "uds_path": self.vsock_socket() });
            self.put("/vsock", &body).await?;
        }
        if boot.entropy {
            self.put("/entropy", &json!({})).await?;
        }
        self.put("/actions", &json!({ "action_type": "InstanceStart" }))
            .await?;
        tracing::info!(sandbox_id = %self.sandbox_id, "VM booted");
        Ok(())
    }

    /// Restores a layered build into this (fresh) VMM: memory from the build's files or a
    /// page server, taps, drives and the vsock socket given anew (snapshots name no host
    /// paths), then optionally resumes.
    pub async fn restore(&self, restore: &RestoreSpec) -> Result<(), VmmError> {
        if let Some(console) = &restore.console {
            self.put("/serial", &json!({ "serial_out_path": console }))
                .await?;
        }
        let mem_backend = match &restore.memory {
            MemorySource::File => MemBackendBody {
                backend_type: "File",
                backend_path: None,
            },
            MemorySource::Uffd(socket) => MemBackendBody {
                backend_type: "Uffd",
                backend_path: Some(socket),
            },
        };
        let body = LoadBody {
            layers: LayersBody {
                store: &restore.store,
                build_id: &restore.build_id,
            },
            mem_backend,
            network_overrides: restore
                .taps
                .iter()
                .map(|(iface_id, tap)| OverrideNet {
                    iface_id,
                    host_dev_name: tap,
                })
                .collect(),
            // Ignored by the VMM when the snapshot has no vsock device.
            vsock_override: json!({ "uds_path": self.vsock_socket() }),
            drive_overrides: restore
                .drives
                .iter()
                .map(|(drive_id, path)| OverrideDrive {
                    drive_id,
                    path_on_host: path,
                })
                .collect(),
            resume_vm: restore.resume,
            track_dirty_pages: restore.track_dirty_pages,
        };
        self.call("PUT", "/snapshot/load", Some(&body), SNAPSHOT_TIMEOUT)
            .await?;
        tracing::info!(sandbox_id = %self.sandbox_id, build_id = %restore.build_id, resumed = restore.resume, "VM restored");
        Ok(())
    }

    pub async fn pause(&self) -> Result<(), VmmError> {
        self.patch_vm("Paused").await
    }

    pub async fn resume(&self) -> Result<(), VmmError> {
        self.patch_vm("Resumed").await
    }

    /// Writes the paused VM as a new build of a layered store. The store must be kept in
    /// the jail ([`VmmConfig::keep`]).
    pub async fn snapshot(&self, snap: &SnapshotSpec) -> Result<(), VmmError> {
        let body = CreateBody {
            snapshot_type: snap.kind,
            layers: LayersBody {
                store: &snap.store,
                build_id: &snap.build_id,
            },
        };
        self.call("PUT", "/snapshot/create", Some(&body), SNAPSHOT_TIMEOUT)
            .await?;
        tracing::info!(sandbox_id = %self.sandbox_id, build_id = %snap.build_id, kind = ?snap.kind, "snapshot written");
        Ok(())
    }

    /// `Not started`, `Running` or `Paused`, as the VMM reports it.
    pub async fn instance_state(&self) -> Result<String, VmmError> {
        let body = self.call::<()>("GET", "/", None, CALL_TIMEOUT).await?;
        let info: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| self.api_error("GET", "/", e))?;
        Ok(info["state"].as_str().unwrap_or("unknown").to_owned())
    }

    /// The last bytes the guest wrote to its serial console (the VMM's ring buffer).
    pub async fn console(&self) -> Result<Bytes, VmmError> {
        self.call::<()>("GET", "/serial", None, CALL_TIMEOUT).await
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the process if it is our child, waits for
    /// the pid to vanish otherwise (adopted). Idempotent: stopping a stopped VMM is fine.
    pub async fn stop(&mut self, grace: Duration) -> Result<(), VmmError> {
        if !self.is_running() {
            return Ok(());
        }
        // An adopted pid may have been reused since: signal only the VMM we checked.
        if self.adopted && vmm_cmdline(self.pid, &self.api_socket).is_err() {
            return Ok(());
        }
        tracing::info!(sandbox_id = %self.sandbox_id, pid = self.pid, "stopping VMM");
        self.signal(Signal::SIGTERM)?;
        if self.wait_gone(grace).await {
            return Ok(());
        }
        tracing::warn!(sandbox_id = %self.sandbox_id, pid = self.pid, grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX), "VMM ignored SIGTERM; killing it");
        self.signal(Signal::SIGKILL)?;
        if self.wait_gone(KILL_TIMEOUT).await {
            // Killed: it could not remove its socket.
            let _ = std::fs::remove_file(&self.api_socket);
            return Ok(());
        }
        Err(VmmError::Unkillable {
            pid: self.pid,
            timeout: KILL_TIMEOUT,
        })
    }

    /// Whether the process still runs (a child that exited is reaped here).
    pub fn is_running(&self) -> bool {
        if self.adopted {
            return pid_alive(self.pid);
        }
        self.exit_status().is_none() && self.child_present()
    }

    fn child_present(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// Our child's exit status once it exited (reaping it); `None` while it runs.
    fn exit_status(&self) -> Option<ExitStatus> {
        let mut guard = self
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(sandbox_id = %self.sandbox_id, pid = self.pid, %status, "VMM exited");
                *guard = None;
                Some(status)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(sandbox_id = %self.sandbox_id, pid = self.pid, error = %e, "checking the VMM process");
                None
            }
        }
    }

    fn signal(&self, signal: Signal) -> Result<(), VmmError> {
        let pid = i32::try_from(self.pid).map_err(|_| VmmError::Signal {
            pid: self.pid,
            source: nix::Error::EINVAL,
        })?;
        match nix::sys::signal::kill(Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(source) => Err(VmmError::Signal {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Waits up to `timeout` for the process to end; true if it did.
    async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn patch_vm(&self, state: &str) -> Result<(), VmmError> {
        self.call(
            "PATCH",
            "/vm",
            Some(&json!({ "state": state })),
            CALL_TIMEOUT,
        )
        .await?;
        tracing::info!(sandbox_id = %self.sandbox_id, state, "VM state changed");
        Ok(())
    }

    async fn put<T: Serialize>(&self, path: &str, body: &T) -> Result<(), VmmError> {
        self.call("PUT", path, Some(body), CALL_TIMEOUT)
            .await
            .map(drop)
    }

    fn api_error(&self, method: &str, path: &str, reason: impl std::fmt::Display) -> VmmError {
        VmmError::Api {
            method: method.into(),
            path: path.into(),
            socket: self.api_socket.clone(),
            reason: reason.to_string(),
        }
    }

    /// One request on a fresh connection, bounded by `timeout`. 2xx gives the body; any
    /// other status is a [`VmmError::Fault`] with the VMM's `fault_message`.
    async fn call<T: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&T>,
        timeout: Duration,
    ) -> Result<Bytes, VmmError> {
        let payload = match body {
            Some(b) => {
                Bytes::from(serde_json::to_vec(b).map_err(|e| self.api_error(method, path, e))?)
            }
            None => Bytes::new(),
        };
        let exchange = self.exchange(method, path, payload);
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| VmmError::Timeout {
                method: method.into(),
                path: path.into(),
                socket: self.api_socket.clone(),
                timeout,
            })??;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        tracing::debug!(sandbox_id = %self.sandbox_id, method, path, status = status.as_u16(), %message, "VMM refused a request");
        Err(VmmError::Fault {
            method: method.into(),
            path: path.into(),
            status: status.as_u16(),
            message,
        })
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        payload: Bytes,
    ) -> Result<(http::StatusCode, Bytes), VmmError> {
        let err = |reason: &dyn std::fmt::Display| self.api_error(method, path, reason);
        let stream = tokio::net::UnixStream::connect(&self.api_socket)
            .await
            .map_err(|e| err(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(&e))?;
        tokio::spawn(async move {
            // Ends when the response is read and the sender dropped.
            let _ = connection.await;
        });
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::ACCEPT, "application/json");
        if !payload.is_empty() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(payload)).map_err(|e| err(&e))?;
        let response = sender.send_request(request).await.map_err(|e| err(&e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| err(&e))?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// The arguments of `pid` if it is a `wrenn-vmm` serving `api_socket`; why not otherwise.
fn vmm_cmdline(pid: u32, api_socket: &Path) -> Result<Vec<String>, String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("no such process ({e})"))?;
    if !pid_alive(pid) {
        return Err("it has exited".into());
    }
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let program = args.first().map(String::as_str).unwrap_or_default();
    if Path::new(program).file_name() != Some(std::ffi::OsStr::new("wrenn-vmm")) {
        return Err(format!("it runs {program:?}, not wrenn-vmm"));
    }
    let want = api_socket.to_string_lossy();
    match flag_value(&args, "--api-sock") {
        Some(sock) if sock == want => Ok(args),
        Some(sock) => Err(format!("it serves {sock}")),
        None => Err("it has no --api-sock".into()),
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == flag {
            return iter.next().cloned();
        }
        if let Some(value) = arg
            .strip_prefix(flag)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return Some(value.to_owned());
        }
    }
    None
}

/// Whether `pid` exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain any byte.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// The last few KiB of a log file, for errors.
fn log_tail(path: &Path) -> String {
    use std::io::Seek as _;
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(std::io::SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_flag_value_both_spellings() {
        let args: Vec<String> = ["wrenn-vmm", "--api-sock", "/r/api.sock", "--id=sb-1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            flag_value(&args, "--api-sock").as_deref(),
            Some("/r/api.sock")
        );
        assert_eq!(flag_value(&args, "--id").as_deref(), Some("sb-1"));
        assert_eq!(flag_value(&args, "--keep"), None);
    }

    #[test]
    fn test_load_body_has_the_vmm_shape() {
        let body = LoadBody {
            layers: LayersBody {
                store: Path::new("/s"),
                build_id: "ab",
            },
            mem_backend: MemBackendBody {
                backend_type: "Uffd",
                backend_path: Some(Path::new("/r/pager.sock")),
            },
            network_overrides: vec![OverrideNet {
                iface_id: "eth0",
                host_dev_name: "tap0",
            }],
            vsock_override: json!({"uds_path": "/r/vsock.sock"}),
            drive_overrides: vec![],
            resume_vm: true,
            track_dirty_pages: false,
        };
        let value = serde_json::to_value(&body).unwrap();
        assert_eq!(value["mem_backend"]["backend_type"], "Uffd");
        assert_eq!(value["mem_backend"]["backend_path"], "/r/pager.sock");
        assert_eq!(value["network_overrides"][0]["host_dev_name"], "tap0");
        assert_eq!(value["layers"]["build_id"], "ab");
        let file = MemBackendBody {
            backend_type: "File",
            backend_path: None,
        };
        assert_eq!(
            serde_json::to_string(&file).unwrap(),
            r#"{"backend_type":"File"}"#
        );
    }

    #[test]
    fn test_pid_alive_of_self_and_of_nothing() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }

    #[tokio::test]
    async fn test_adopt_refuses_a_process_that_is_not_a_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let err = Vmm::adopt(std::process::id(), dir.path())
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::NotOurVmm { .. }), "{err}");
        assert!(err.to_string().contains("not wrenn-vmm"), "{err}");
    }

    #[tokio::test]
    async fn test_spawn_of_a_binary_that_dies_quotes_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let config = VmmConfig {
            binary: PathBuf::from("/bin/sh"),
            sandbox_id: "sb-dies".into(),
            run_dir: dir.path().join("run"),
            netns: None,
            keep: vec![],
            page_server_grace: None,
        };
        // `sh --api-sock ...` fails at once and says so on stderr, which goes to the log.
        let err = Vmm::spawn(config).await.unwrap_err();
        assert!(matches!(err, VmmError::DiedAtStart { .. }), "{err}");
        let VmmError::DiedAtStart { tail, .. } = &err else {
            unreachable!()
        };
        assert!(tail.contains("/bin/sh"), "{err}");
        assert!(dir.path().join("run").join(LOG_FILE).exists());
    }
}
