//! `wrenn-vmm`: one microVM per process, driven over a Firecracker-shaped API on a unix socket
//! or booted straight from a config file.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};

use anyhow::{Context, bail};
use clap::Parser;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use wrenn_vmm::api::models::VmmConfig;
use wrenn_vmm::controller::{self, Confinement, Controller};

#[derive(Debug, Parser)]
#[command(name = "wrenn-vmm", version, about = "Wrenn's KVM microVM monitor")]
struct Args {
    /// Serve the control API on this unix socket (created; removed on exit).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Boot at once from this JSON document (Firecracker's config-file shape).
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Instance id reported by `GET /` and on every log line.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Do not install the per-thread seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// What a system call outside a thread's filter gets: kill (the process), trap (EPERM and
    /// a line on stderr) or log (allowed, logged by the kernel).
    #[arg(long, default_value = "kill")]
    seccomp_action: wrenn_vmm::seccomp::DenyAction,
    /// Keep the host's filesystem view (no private mount namespace); limits and
    /// no-new-privileges still apply. Needed when not running as root.
    #[arg(long)]
    no_jail: bool,
    /// Also keep this directory reachable (read-write) inside the jail: where snapshots are
    /// written (a layered store, a pause directory). Repeatable.
    #[arg(long = "keep", value_name = "DIR")]
    keep: Vec<PathBuf>,
    /// Switch to this uid (and --gid) once the VM is built.
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    /// Join this network namespace (e.g. /run/netns/NAME, made by `ip netns add`) before
    /// anything else, so the VM's tap is looked up there.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// After a lazy (Uffd) restore: how long a page server that hung up has to come back on
    /// the same socket before the VM stops; 0 stops at once.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    page_server_grace: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WRENN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wrenn-vmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Removes the API socket when the process ends normally.
struct SocketFile(PathBuf);
impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind_api(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // A socket left by a VMM that was killed: nobody answers on it, so take it over.
        if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        } else {
            bail!("{} already exists and is in use", path.display());
        }
    }
    UnixListener::bind(path).with_context(|| format!("binding API socket {}", path.display()))
}

/// Moves this (still single-threaded) process into the network namespace at `path`. Namespaces
/// are per thread: threads created afterwards (API, vCPUs) inherit it.
fn join_netns(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| {
        format!(
            "joining network namespace {} (is it a netns file, and are we root?)",
            path.display()
        )
    })?;
    tracing::info!(netns = %path.display(), "joined network namespace");
    Ok(())
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Every log line of this process, from every thread, names the VM.
    let span = tracing::info_span!("vm", vm_id = %args.id);
    let _span = span.enter();
    // First: every thread, socket and tap from here on belongs to the namespace.
    if let Some(netns) = &args.netns {
        join_netns(netns)?;
    }
    if args.api_sock.is_none() && args.config_file.is_none() {
        bail!("give --api-sock PATH, --config-file FILE, or both");
    }
    wrenn_vmm::lifecycle::ignore_sigpipe();

    let config = match &args.config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config: VmmConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid VM config", path.display()))?;
            Some(config)
        }
        None => None,
    };

    let is_root = wrenn_vmm::lifecycle::is_root();
    if !args.no_jail && !is_root {
        bail!("the jail needs root (a private mount namespace); run as root or pass --no-jail");
    }
    let seccomp = (!args.no_seccomp).then_some(args.seccomp_action);
    let mut confinement = Confinement {
        seccomp,
        new_root: !args.no_jail,
        keep: args
            .keep
            .iter()
            .map(|path| wrenn_vmm::jail::KeptPath {
                path: path.clone(),
                access: wrenn_vmm::jail::Access::ReadWrite,
            })
            .collect(),
        drop_to: args
            .uid
            .zip(args.gid)
            .map(|(uid, gid)| wrenn_vmm::jail::Credentials { uid, gid }),
    };

    let mut _socket_file = None;
    let api = match &args.api_sock {
        Some(path) => {
            let listener = bind_api(path)?;
            _socket_file = Some(SocketFile(path.clone()));
            // Removing the socket at exit needs its directory inside the jail.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                confinement.keep.push(wrenn_vmm::jail::KeptPath {
                    path: dir.to_owned(),
                    access: wrenn_vmm::jail::Access::ReadWrite,
                });
            }
            let (tx, rx) = mpsc::channel();
            let wake = EventFd::new(EFD_NONBLOCK)?;
            let config = wrenn_vmm::api::server::ServerConfig {
                seccomp,
                ..Default::default()
            };
            wrenn_vmm::api::server::spawn_with_config(listener, tx, wake.try_clone()?, config)
                .context("starting the API thread")?;
            Some((rx, wake))
        }
        None => None,
    };

    let mut controller = Controller::new(args.id.clone(), api, confinement)?;
    controller.set_page_server_grace(std::time::Duration::from_secs(args.page_server_grace));
    wrenn_vmm::lifecycle::stop_on_signals(controller.stop_event()?)
        .map_err(|e| anyhow::anyhow!("installing the SIGTERM/SIGINT handler: {e}"))?;
    let controller = Arc::new(Mutex::new(controller));
    if let Some(config) = &config {
        let mut c = controller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.start_from_config(config)
            .map_err(|e| anyhow::anyhow!("starting the VM: {e}"))?;
    }
    let exit = controller::run(controller)?;
    match &exit {
        wrenn_vmm::lifecycle::VmExit::Reset | wrenn_vmm::lifecycle::VmExit::Shutdown => {
            tracing::info!(?exit, "VMM exiting");
        }
        other => {
            tracing::error!(exit = ?other, "VMM exiting");
            eprintln!("wrenn-vmm: {}", describe(other));
        }
    }
    Ok(ExitCode::from(u8::try_from(exit.exit_code()).unwrap_or(1)))
}

fn describe(exit: &wrenn_vmm::lifecycle::VmExit) -> String {
    match exit {
        wrenn_vmm::lifecycle::VmExit::GuestPanic(reason) => reason.clone(),
        wrenn_vmm::lifecycle::VmExit::Error(reason) => reason.clone(),
        other => format!("{other:?}"),
    }
}
