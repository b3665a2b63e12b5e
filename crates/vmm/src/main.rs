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
use wrenn_vmm::controller::{self, Controller};

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

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.api_sock.is_none() && args.config_file.is_none() {
        bail!("give --api-sock PATH, --config-file FILE, or both");
    }
    // Writing to a console FIFO or a socket whose reader left must be an error, not a signal.
    // SAFETY: setting SIGPIPE's disposition to ignore is always sound.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

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

    let mut _socket_file = None;
    let api = match &args.api_sock {
        Some(path) => {
            let listener = bind_api(path)?;
            _socket_file = Some(SocketFile(path.clone()));
            let (tx, rx) = mpsc::channel();
            let wake = EventFd::new(EFD_NONBLOCK)?;
            wrenn_vmm::api::server::spawn(listener, tx, wake.try_clone()?)
                .context("starting the API thread")?;
            Some((rx, wake))
        }
        None => None,
    };

    let controller = Controller::new(args.id.clone(), api)?;
    let stop = controller.stop_event()?;
    ctrlc::set_handler(move || {
        let _ = stop.write(1);
    })
    .context("installing the SIGTERM/SIGINT handler")?;
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
            tracing::info!(vm_id = %args.id, ?exit, "VMM exiting");
        }
        other => {
            tracing::error!(vm_id = %args.id, exit = ?other, "VMM exiting");
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
