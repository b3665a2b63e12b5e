//! envd as the guest's init (`init=/usr/bin/envd`): it brings the system up, runs the server
//! in a child process, reaps every orphan, and powers the VM off on SIGTERM or
//! ctrl-alt-del.
//!
//! ```text
//!   pid 1 (single-threaded, never starts tokio)         pid N: the server (tokio)
//!   mounts, hostname, lo + ip=, resolv.conf,
//!   cgroups, PATH ──── fork ─────────────────────────▶  oom_score_adj -1000, serve
//!   loop: sigwait(SIGCHLD|SIGTERM|SIGINT|SIGPWR)          (reaps its own children through
//!     SIGCHLD: waitpid(-1) until none; the server          tokio::process; their orphans
//!       died unexpectedly → log, fork a new one            come to pid 1)
//!     SIGTERM/SIGINT/SIGPWR: TERM the server, TERM all,
//!       grace, KILL all, sync, remount / ro, reboot
//! ```
//!
//! Only pid 1 reaps with `waitpid(-1)`; the server is not a subreaper, so the exit statuses
//! tokio waits for are never taken from it. Every setup step logs its failure and goes on:
//! pid 1 must not exit (the kernel panics when it does).
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot, set_cad_enabled};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, sethostname, setsid};

use super::cmdline::KernelCmdline;
use super::{cgroups, network};

/// How long processes get between SIGTERM and SIGKILL at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// A server that dies sooner than this after its start is restarted only after a pause.
const MIN_SERVER_LIFETIME: Duration = Duration::from_secs(5);
/// The PATH processes get when the kernel gave init none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether this process is the init of its PID namespace.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Brings the system up, then runs `server` (given the kernel command line) in a child
/// process, again whenever it dies, and reaps until shutdown, which reboots (a reset ends a
/// microVM). `server` returns the server process's exit code. Call before any thread
/// exists: this forks.
pub fn run(server: impl Fn(&KernelCmdline) -> i32) -> ! {
    // /proc first: the command line is read from it.
    mount_filesystems();
    let cmdline = KernelCmdline::read();
    setup(&cmdline);
    let server = move || server(&cmdline);
    let signals = init_signals();
    if let Err(error) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None) {
        tracing::error!(%error, "cannot block signals; reaping may lag");
    }
    let mut server_pid = start_server(&server);
    let mut started = Instant::now();
    loop {
        let signal = match signals.wait() {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "sigwait failed");
                std::thread::sleep(Duration::from_millis(100));
                Signal::SIGCHLD
            }
        };
        match signal {
            Signal::SIGCHLD => {
                if reap(server_pid) {
                    if started.elapsed() < MIN_SERVER_LIFETIME {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    server_pid = start_server(&server);
                    started = Instant::now();
                }
            }
            _ => shutdown(server_pid, signal),
        }
    }
}

/// The signals pid 1 handles with `sigwait`.
fn init_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
    ] {
        set.add(signal);
    }
    set
}

/// The steps before the server starts; each logs its own failure.
fn setup(cmdline: &KernelCmdline) {
    ensure_console();
    if std::env::var_os("PATH").is_none() {
        // SAFETY: pid 1 is single-threaded here (no runtime, no threads started yet), so no
        // other thread can read the environment concurrently.
        unsafe { std::env::set_var("PATH", DEFAULT_PATH) };
    }
    // Ctrl-alt-del (the VMM's "send ctrl-alt-del") becomes SIGINT to pid 1.
    if let Err(error) = set_cad_enabled(false) {
        tracing::warn!(%error, "cannot route ctrl-alt-del to envd");
    }
    let hostname = cmdline.hostname();
    if let Err(error) = sethostname(&hostname) {
        tracing::warn!(%hostname, %error, "cannot set the hostname");
    }
    if let Err(error) = network::bring_up("lo") {
        tracing::warn!(%error, "cannot bring up lo");
    }
    match &cmdline.ip {
        Some(config) => match network::configure(config) {
            Ok(()) => {
                tracing::info!(device = %config.device, address = %config.address, "network up")
            }
            Err(error) => tracing::error!(%error, "cannot configure the network"),
        },
        None => tracing::info!("no ip= on the kernel command line: no external network"),
    }
    if let Err(error) =
        network::write_resolv_conf(Path::new("/etc/resolv.conf"), &cmdline.name_servers())
    {
        tracing::warn!(%error, "cannot write resolv.conf");
    }
    if let Err(error) = cgroups::setup(Path::new(cgroups::MOUNT)) {
        tracing::warn!(%error, "cgroups not set up");
    }
}

/// The mount points currently in `/proc/self/mounts`.
fn mounted() -> HashSet<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

fn mount_one(
    already: &HashSet<String>,
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) {
    if already.contains(target) {
        tracing::debug!(target, "already mounted");
        return;
    }
    let _ = std::fs::create_dir_all(target);
    if let Err(error) = mount(Some(fstype), target, Some(fstype), flags, data) {
        tracing::warn!(target, fstype, %error, "mount failed");
    }
}

/// /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and cgroup2, where not mounted yet.
fn mount_filesystems() {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !Path::new("/proc/self").exists() {
        mount_one(&HashSet::new(), "proc", "/proc", hardened, None);
    }
    let already = mounted();
    mount_one(&already, "sysfs", "/sys", hardened, None);
    mount_one(
        &already,
        "devtmpfs",
        "/dev",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    mount_one(
        &already,
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    );
    let tmpfs = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_one(&already, "tmpfs", "/dev/shm", tmpfs, Some("mode=1777"));
    mount_one(&already, "tmpfs", "/run", tmpfs, Some("mode=0755"));
    mount_one(&already, "tmpfs", "/tmp", tmpfs, Some("mode=1777"));
    mount_one(&already, "cgroup2", cgroups::MOUNT, hardened, None);
    // /dev/ptmx must reach the devpts instance at /dev/pts; the usual links in /dev.
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err()
            && let Err(error) = std::os::unix::fs::symlink(target, link)
        {
            tracing::warn!(link, %error, "cannot create link");
        }
    }
}

/// Gives pid 1 a stdin/stdout/stderr on /dev/console if the kernel could not.
fn ensure_console() {
    // fcntl(F_GETFD) on a closed descriptor is the one way to ask without owning it.
    let closed = |fd: i32| {
        // SAFETY: F_GETFD only reads the descriptor's flags; any number is a valid argument.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags == -1 && Errno::last() == Errno::EBADF
    };
    let missing: Vec<i32> = (0..=2).filter(|fd| closed(*fd)).collect();
    if missing.is_empty() {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in missing {
        // The console stays open as fd 0, 1 or 2; the original descriptor closes on drop.
        let _ = match fd {
            0 => nix::unistd::dup2_stdin(&console),
            1 => nix::unistd::dup2_stdout(&console),
            _ => nix::unistd::dup2_stderr(&console),
        };
    }
}

/// Forks the server process; `None` when fork fails (retried on the next SIGCHLD).
fn start_server(server: &impl Fn() -> i32) -> Option<Pid> {
    // SAFETY: pid 1 never starts a thread, so the child is a copy of a single-threaded
    // process and may run any code, including starting its own runtime.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let _ = setsid();
            std::process::exit(server());
        }
        Ok(ForkResult::Parent { child }) => {
            tracing::info!(pid = child.as_raw(), "server started");
            Some(child)
        }
        Err(error) => {
            tracing::error!(%error, "cannot fork the server");
            None
        }
    }
}

/// Reaps every exited child; true when the server was among them (or there is none).
fn reap(server: Option<Pid>) -> bool {
    let mut server_gone = server.is_none();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) => {
                if status.pid().is_some() && status.pid() == server {
                    tracing::error!(?status, "the server died; restarting it");
                    server_gone = true;
                }
            }
            Err(Errno::EINTR) => {}
            Err(error) => {
                tracing::warn!(%error, "waitpid failed");
                break;
            }
        }
    }
    server_gone
}

/// Reaps until no child is left or `deadline` passes.
fn reap_until(deadline: Instant) {
    while Instant::now() < deadline {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            _ => {}
        }
    }
}

/// Stops everything and resets the VM. Never returns.
fn shutdown(server: Option<Pid>, signal: Signal) -> ! {
    eprintln!("envd: shutting down ({signal})");
    if let Some(server) = server {
        let _ = kill(server, Signal::SIGTERM);
    }
    // -1: every process but pid 1 itself.
    let everyone = Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    reap_until(Instant::now() + SHUTDOWN_GRACE);
    let _ = kill(everyone, Signal::SIGKILL);
    reap_until(Instant::now() + Duration::from_secs(1));
    nix::unistd::sync();
    if let Err(error) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        tracing::warn!(%error, "cannot remount / read-only");
    }
    nix::unistd::sync();
    // A microVM has no ACPI: a reset ends it (the VMM exits on a guest reset).
    let Err(error) = reboot(RebootMode::RB_AUTOBOOT);
    tracing::error!(%error, "reboot failed");
    let _ = reboot(RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}
