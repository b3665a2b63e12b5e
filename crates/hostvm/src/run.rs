//! Running a command with a placement: as a child process, or in a fresh host VM.
//!
//! Per-run directory (under the cache's `work/hostvm-runs/`), removed after a successful run;
//! after a failure it stays for inspection until the next run starts:
//!
//! ```text
//! <pid>-<n>/
//!   lock          flock held while the run is alive: a directory whose lock is free is stale
//!   qemu.log      QEMU's own stdout and stderr
//!   console.log   the VM's serial console (kernel messages, init's progress and errors)
//!   qmp.sock      QEMU's QMP monitor
//!   stall.txt     after a stall: QEMU's CPU use and the vCPU registers
//!   guest/        9p share `wrennrun`, mounted at /wrenn in the VM
//!     spec.sh     the command (see spec.rs)
//!     ready       created by init just before the command starts
//!     stdout      the command's stdout and stderr, streamed to the caller while they grow
//!     stderr
//!     alive       the VM's uptime, rewritten every few seconds by init (the heartbeat)
//!     exit        the command's exit status (decimal), written after it exits
//!     error       what failed in init, with the last kernel messages
//! ```

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use wrenn_image::cache::Cache;
use wrenn_image::command::last_lines;
use wrenn_image::packages;

use crate::decide::Placement;
use crate::net::{self, HOST_ADDRESS_FROM_GUEST, HOST_ENV, HostVmNetwork};
use crate::qemu::{Qemu, VmConfig};
use crate::spec::CommandSpec;
use crate::{HostVmError, artifacts, monitor};

/// How often output files and status are checked while the VM runs.
const POLL: Duration = Duration::from_millis(10);
/// Lines of console output quoted in errors.
const TAIL_LINES: usize = 40;
/// How long QEMU may take to exit once init reported the exit status or an error.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the heartbeat is read.
const HEARTBEAT_POLL: Duration = Duration::from_secs(1);
/// A run directory without a lock file older than this is a leftover of a crash.
const UNLOCKED_GRACE: Duration = Duration::from_secs(60);

/// How to run a [`CommandSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    pub placement: Placement,
    /// QEMU CPU model of the host VM (default `max`: every feature TCG emulates, with AMD SVM and
    /// nested paging).
    pub cpu: String,
    /// Host VM vCPUs (default 2: parallel work inside runs ~1.6x faster than with one). With
    /// exactly one, the host VM's clock is the TSC (ns resolution); with more it is jiffies
    /// (4 ms), because emulated vCPUs' TSCs are not synchronized: time fine-grained events
    /// with one vCPU.
    pub cpus: u32,
    /// Host VM memory in MiB (default 4096).
    pub memory_mib: u32,
    /// Time from QEMU's launch to the command's start before the boot counts as hung and is
    /// retried (default 30 s; a boot normally takes ~3 s).
    pub boot_timeout: Duration,
    /// Boots tried before giving up (default 3).
    pub boot_attempts: u32,
    /// Kill the command (and its VM) when it has not finished after this long, counted from the
    /// first QEMU launch (boots included; building the host VM's artifacts once is not) or from
    /// the start of a direct command.
    pub timeout: Option<Duration>,
    /// Kill the host VM when the command has written nothing to stdout or stderr for this long:
    /// `HostVmError::Stalled`. Independently of this, a host VM whose heartbeat stops (the
    /// emulated host VM has been seen to freeze for many minutes) is killed as stalled.
    pub quiet_timeout: Option<Duration>,
    /// A heartbeat unchanged for this long means the host VM froze (init rewrites it every 3 s;
    /// default 45 s).
    pub heartbeat_timeout: Duration,
    /// A network between the host and the host VM (default none: the host VM has no network
    /// device). When set, the command's environment gets [`HOST_ENV`] (the host's address as
    /// the command sees it) in either placement; the forwards apply to the host VM only (a
    /// direct command's ports are the host's already: see [`RunOptions::host_address_of`]).
    pub network: Option<HostVmNetwork>,
}

impl RunOptions {
    /// Applies the overrides a user gave (command-line flags); `None` keeps the default.
    pub fn with_overrides(
        mut self,
        cpus: Option<u32>,
        memory_mib: Option<u32>,
        timeout: Option<Duration>,
    ) -> Self {
        self.cpus = cpus.unwrap_or(self.cpus);
        self.memory_mib = memory_mib.unwrap_or(self.memory_mib);
        self.timeout = timeout.or(self.timeout);
        self
    }

    pub fn new(placement: Placement) -> Self {
        RunOptions {
            placement,
            cpu: "max".into(),
            cpus: 2,
            memory_mib: 4096,
            boot_timeout: Duration::from_secs(20),
            boot_attempts: 3,
            timeout: None,
            quiet_timeout: None,
            heartbeat_timeout: Duration::from_secs(45),
            network: None,
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Gives the host VM a network to the host with these forwards.
    pub fn network(mut self, network: HostVmNetwork) -> Self {
        self.network = Some(network);
        self
    }

    /// Where the host reaches a TCP port the command listens on: the port itself on 127.0.0.1
    /// for a direct command, the host side of a forward to it for the host VM (`None` when no
    /// forward leads there).
    pub fn host_address_of(&self, guest_port: u16) -> Option<SocketAddr> {
        match self.placement {
            Placement::Direct => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), guest_port)),
            Placement::HostVm => self
                .network
                .as_ref()?
                .forwards
                .iter()
                .find(|f| f.guest_port == guest_port)
                .map(|f| f.host),
        }
    }

    /// The host's address as the command sees it: what [`HOST_ENV`] says when there is a
    /// network.
    pub fn host_address_from_command(&self) -> Ipv4Addr {
        match self.placement {
            Placement::Direct => Ipv4Addr::LOCALHOST,
            Placement::HostVm => HOST_ADDRESS_FROM_GUEST,
        }
    }
}

/// Runs `spec` where `options.placement` says, streams its stdout and stderr to the writers as
/// they are produced, and returns its exit code (128 + N when signal N killed it).
pub fn run(
    spec: &CommandSpec,
    options: &RunOptions,
    cache: &Cache,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32, HostVmError> {
    spec.validate()?;
    let with_host;
    let spec = match &options.network {
        Some(network) => {
            network.validate()?;
            with_host = spec
                .clone()
                .env(HOST_ENV, options.host_address_from_command().to_string());
            &with_host
        }
        None => spec,
    };
    match options.placement {
        Placement::Direct => run_direct(spec, options, stdout, stderr),
        Placement::HostVm => run_hostvm(spec, options, cache, stdout, stderr),
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Kills the child on drop unless it was reaped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn run_direct(
    spec: &CommandSpec,
    options: &RunOptions,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32, HostVmError> {
    let started = Instant::now();
    let program = spec.argv[0].to_string_lossy().into_owned();
    let child = Command::new(&spec.argv[0])
        .args(&spec.argv[1..])
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HostVmError::Spawn { program, source })?;
    let mut child = ChildGuard(child);
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let readers: [(bool, Option<Box<dyn Read + Send>>); 2] = [
        (
            false,
            child
                .0
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
        (
            true,
            child
                .0
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
    ];
    for (is_err, reader) in readers {
        let Some(mut reader) = reader else { continue };
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send((is_err, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    loop {
        let wait = match options.timeout {
            Some(t) => match t.checked_sub(started.elapsed()) {
                Some(left) => left,
                None => {
                    let _ = child.0.kill();
                    let _ = child.0.wait();
                    return Err(HostVmError::Timeout {
                        timeout: t,
                        what: "the command".into(),
                    });
                }
            },
            None => Duration::from_secs(3600),
        };
        match rx.recv_timeout(wait) {
            Ok((is_err, data)) => {
                let w: &mut dyn Write = if is_err { &mut *stderr } else { &mut *stdout };
                w.write_all(&data)
                    .and_then(|()| w.flush())
                    .map_err(HostVmError::Output)?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.0.wait().map_err(|source| HostVmError::Spawn {
        program: spec.argv[0].to_string_lossy().into_owned(),
        source,
    })?;
    Ok(exit_code(status))
}

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A per-run directory, locked while alive (see the module doc).
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    _lock: File,
    keep: bool,
}

impl RunDir {
    fn create(cache: &Cache) -> Result<RunDir, HostVmError> {
        let base = cache.work_dir("hostvm-runs")?;
        clean_stale(&base);
        let name = format!(
            "{}-{}",
            std::process::id(),
            RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = base.join(name);
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| HostVmError::Io { path: p, source }
        };
        // A leftover of an earlier process with the same pid.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).map_err(io(&path))?;
        let lock_path = path.join("lock");
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let dir = RunDir {
            path,
            _lock: lock,
            keep: false,
        };
        let guest = dir.guest("");
        fs::create_dir_all(&guest).map_err(io(&guest))?;
        Ok(dir)
    }

    fn guest(&self, name: &str) -> PathBuf {
        self.path.join("guest").join(name)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Clears what an earlier boot attempt left; creates empty output files.
    fn reset(&self) -> Result<(), HostVmError> {
        for name in ["ready", "exit", "exit.new", "error", "error.new", "alive"] {
            let _ = fs::remove_file(self.guest(name));
        }
        for name in ["stdout", "stderr"] {
            let path = self.guest(name);
            File::create(&path).map_err(|source| HostVmError::Io { path, source })?;
        }
        Ok(())
    }

    fn console_tail(&self) -> String {
        let text = fs::read(self.file("console.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let tail = last_lines(text.trim_end(), TAIL_LINES);
        if tail.is_empty() {
            "(nothing)".into()
        } else {
            tail
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes run directories whose owner is gone (their lock is free).
fn clean_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = match File::open(path.join("lock")) {
            Ok(lock) => lock.try_lock().is_ok(),
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > UNLOCKED_GRACE),
        };
        if stale {
            tracing::debug!(dir = %path.display(), "removing a stale host VM run directory");
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove a stale host VM run directory");
            }
        }
    }
}

enum Boot {
    Ready,
    /// Not ready within the boot timeout: killed.
    Hung,
    /// The VM stopped before it was ready without an error report.
    Stopped,
}

fn run_hostvm(
    spec: &CommandSpec,
    options: &RunOptions,
    cache: &Cache,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32, HostVmError> {
    let shares = spec.shares()?;
    if !packages::is_root() {
        return Err(HostVmError::NotRoot);
    }
    let prepare = Instant::now();
    if options.network.is_some() {
        // Init keeps forwarded traffic off the host's loopback with the host's nft.
        packages::ensure(net::PACKAGES)?;
    }
    let artifacts = artifacts::ensure(cache)?;
    tracing::debug!(
        took_ms = prepare.elapsed().as_millis(),
        "host VM artifacts ready"
    );
    let mut dir = RunDir::create(cache)?;
    let spec_path = dir.guest("spec.sh");
    fs::write(&spec_path, spec.guest_script(&shares)).map_err(|source| HostVmError::Io {
        path: spec_path,
        source,
    })?;
    let console_log = dir.file("console.log");
    let qemu_log = dir.file("qemu.log");
    let qmp_socket = dir.file("qmp.sock");
    let run_share = dir.path.join("guest");
    let mut cfg = VmConfig {
        vmlinux: &artifacts.vmlinux,
        initramfs: &artifacts.initramfs,
        cpu: &options.cpu,
        cpus: options.cpus.max(1),
        memory_mib: options.memory_mib,
        hz: artifacts.hz,
        verbose: false,
        console_log: &console_log,
        qmp_socket: &qmp_socket,
        run_share: &run_share,
        shares: &shares,
        network: options.network.as_ref(),
    };
    let started = Instant::now();
    let deadline = options.timeout.map(|t| (started + t, t));
    let attempts = options.boot_attempts.max(1);
    let mut failure = String::new();
    dir.keep = true;
    for attempt in 1..=attempts {
        // After a failure, keep every kernel message to show where the next one stops.
        cfg.verbose = attempt > 1;
        dir.reset()?;
        let mut vm = Qemu::launch(&cfg, &qemu_log)?;
        match wait_ready(&mut vm, &dir, options.boot_timeout, deadline)? {
            Boot::Ready => {
                tracing::info!(
                    attempt,
                    pid = vm.pid(),
                    ready_ms = vm.launched.elapsed().as_millis(),
                    network = options.network.is_some(),
                    "host VM ready; command started"
                );
                let ready = Instant::now();
                let code = supervise(
                    &mut vm,
                    &dir,
                    deadline,
                    options.quiet_timeout,
                    options.heartbeat_timeout,
                    stdout,
                    stderr,
                )?;
                tracing::debug!(
                    code,
                    after_ready_ms = ready.elapsed().as_millis(),
                    "host VM stopped"
                );
                dir.keep = false;
                return Ok(code);
            }
            Boot::Hung => {
                failure = format!("not ready within {:?} (killed)", options.boot_timeout);
            }
            Boot::Stopped => failure = "the VM stopped before it was ready".into(),
        }
        tracing::warn!(
            attempt,
            attempts,
            console = %console_log.display(),
            "host VM boot failed: {failure}"
        );
    }
    Err(HostVmError::Boot {
        attempts,
        what: failure,
        tail: dir.console_tail(),
        console: console_log,
    })
}

/// Waits until init created `ready`.
fn wait_ready(
    vm: &mut Qemu,
    dir: &RunDir,
    boot_timeout: Duration,
    deadline: Option<(Instant, Duration)>,
) -> Result<Boot, HostVmError> {
    let ready = dir.guest("ready");
    let mut error_seen = None;
    loop {
        let exited = vm.try_wait()?;
        if ready.exists() {
            return Ok(Boot::Ready);
        }
        if let Some(status) = exited {
            if let Some(message) = guest_error(dir) {
                return Err(HostVmError::GuestSetup {
                    message,
                    console: dir.file("console.log"),
                });
            }
            if !status.success() {
                let log = dir.file("qemu.log");
                let text = fs::read_to_string(&log).unwrap_or_default();
                return Err(HostVmError::QemuFailed {
                    status: status.to_string(),
                    tail: last_lines(text.trim_end(), TAIL_LINES),
                    log,
                });
            }
            return Ok(Boot::Stopped);
        }
        check_deadline(vm, deadline)?;
        if let Some(message) = guest_error(dir) {
            // Init resets the VM right after writing the error; do not wait for ever.
            let since = error_seen.get_or_insert_with(Instant::now);
            if since.elapsed() > STOP_GRACE {
                vm.kill();
                return Err(HostVmError::GuestSetup {
                    message,
                    console: dir.file("console.log"),
                });
            }
        }
        if vm.launched.elapsed() > boot_timeout {
            vm.kill();
            return Ok(Boot::Hung);
        }
        std::thread::sleep(POLL);
    }
}

fn check_deadline(vm: &mut Qemu, deadline: Option<(Instant, Duration)>) -> Result<(), HostVmError> {
    match deadline {
        Some((at, timeout)) if Instant::now() >= at => {
            vm.kill();
            Err(HostVmError::Timeout {
                timeout,
                what: "the host VM".into(),
            })
        }
        _ => Ok(()),
    }
}

fn guest_error(dir: &RunDir) -> Option<String> {
    fs::read_to_string(dir.guest("error"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// Streams the command's output until the VM stops; returns the recorded exit status.
fn supervise(
    vm: &mut Qemu,
    dir: &RunDir,
    deadline: Option<(Instant, Duration)>,
    quiet_timeout: Option<Duration>,
    heartbeat_timeout: Duration,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<i32, HostVmError> {
    let open = |name: &str| {
        let path = dir.guest(name);
        File::open(&path).map_err(|source| HostVmError::Io { path, source })
    };
    let mut out = open("stdout")?;
    let mut err = open("stderr")?;
    let mut buf = vec![0u8; 64 << 10];
    let exit = dir.guest("exit");
    let mut exit_seen: Option<Instant> = None;
    let mut last_output = Instant::now();
    let mut heartbeat = Heartbeat::new(dir.guest("alive"), heartbeat_timeout);
    loop {
        let exited = vm.try_wait()?.is_some();
        // After the VM stopped, this reads everything that is left.
        let wrote_out = pump(&mut out, stdout, &mut buf)?;
        let wrote_err = pump(&mut err, stderr, &mut buf)?;
        if exited {
            break;
        }
        if wrote_out || wrote_err {
            last_output = Instant::now();
        }
        let frozen = exit_seen.is_none() && heartbeat.lost();
        let quiet =
            quiet_timeout.filter(|quiet| exit_seen.is_none() && last_output.elapsed() > *quiet);
        if frozen || quiet.is_some() {
            let what = match quiet {
                _ if frozen => format!("its heartbeat stopped for {heartbeat_timeout:?}"),
                Some(quiet) => format!("the command wrote nothing for {quiet:?}"),
                None => unreachable!("checked above"),
            };
            return Err(stall(vm, dir, what));
        }
        if let Err(e) = check_deadline(vm, deadline) {
            pump(&mut out, stdout, &mut buf)?;
            pump(&mut err, stderr, &mut buf)?;
            return Err(e);
        }
        if exit_seen.is_none() && exit.exists() {
            exit_seen = Some(Instant::now());
        }
        if exit_seen.is_some_and(|t| t.elapsed() > STOP_GRACE) {
            tracing::warn!(
                pid = vm.pid(),
                "the host VM did not stop after the command; killing it"
            );
            vm.kill();
        }
        std::thread::sleep(POLL);
    }
    match fs::read_to_string(&exit) {
        Ok(text) => text.trim().parse().map_err(|_| HostVmError::Io {
            path: exit,
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad exit status {text:?}"),
            ),
        }),
        Err(_) => match guest_error(dir) {
            Some(message) => Err(HostVmError::GuestSetup {
                message,
                console: dir.file("console.log"),
            }),
            None => Err(HostVmError::NoExitStatus {
                tail: dir.console_tail(),
                console: dir.file("console.log"),
            }),
        },
    }
}

/// Asks QEMU what the stalled VM was doing, keeps that in `stall.txt`, and kills the VM.
fn stall(vm: &mut Qemu, dir: &RunDir, what: String) -> HostVmError {
    let report = monitor::stall_report(vm.pid(), &dir.file("qmp.sock"));
    let state = monitor::summary(&report);
    let _ = fs::write(dir.file("stall.txt"), &report);
    tracing::warn!(pid = vm.pid(), %what, %state, "the host VM stalled; killing it");
    vm.kill();
    HostVmError::Stalled {
        what,
        state,
        console: dir.file("console.log"),
    }
}

/// The VM's heartbeat file, read at most once a second.
struct Heartbeat {
    path: PathBuf,
    timeout: Duration,
    last: Option<String>,
    changed: Instant,
    checked: Instant,
}

impl Heartbeat {
    fn new(path: PathBuf, timeout: Duration) -> Self {
        let now = Instant::now();
        Heartbeat {
            path,
            timeout,
            last: None,
            changed: now,
            checked: now,
        }
    }

    /// Whether the heartbeat, once seen, has not changed for its timeout. A VM whose init
    /// never wrote one (an older initramfs) is never called frozen.
    fn lost(&mut self) -> bool {
        if self.checked.elapsed() < HEARTBEAT_POLL {
            return false;
        }
        self.checked = Instant::now();
        let Ok(text) = fs::read_to_string(&self.path) else {
            return false;
        };
        if text.is_empty() {
            // Caught between init's truncate and write.
            return false;
        }
        if self.last.as_deref() != Some(text.as_str()) {
            self.last = Some(text);
            self.changed = Instant::now();
            return false;
        }
        self.changed.elapsed() > self.timeout
    }
}

/// Copies what `file` has beyond what was read before to `to`.
fn pump(file: &mut File, to: &mut dyn Write, buf: &mut [u8]) -> Result<bool, HostVmError> {
    let mut wrote = false;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HostVmError::Output(e)),
        };
        to.write_all(&buf[..n]).map_err(HostVmError::Output)?;
        wrote = true;
    }
    if wrote {
        to.flush().map_err(HostVmError::Output)?;
    }
    Ok(wrote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(argv: &[&str]) -> (Result<i32, HostVmError>, Vec<u8>, Vec<u8>) {
        let spec = CommandSpec::new(argv.iter().copied());
        let options = RunOptions::new(Placement::Direct);
        let cache = Cache::new("/nonexistent-wrenn-cache");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = run(&spec, &options, &cache, &mut out, &mut err);
        (result, out, err)
    }

    #[test]
    fn test_direct_exit_code_and_streams_arrive() {
        let (code, out, err) = direct(&["sh", "-c", "echo out; echo err >&2; exit 7"]);
        assert_eq!(code.unwrap(), 7);
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
    }

    #[test]
    fn test_direct_signal_gives_128_plus_signal() {
        let (code, _, _) = direct(&["sh", "-c", "kill -TERM $$"]);
        assert_eq!(code.unwrap(), 128 + 15);
    }

    #[test]
    fn test_direct_cwd_and_env_are_exact() {
        let spec = CommandSpec {
            argv: ["sh", "-c", "pwd; echo \"$ONLY\"; env | wc -l"]
                .map(Into::into)
                .to_vec(),
            cwd: "/usr".into(),
            env: vec![
                ("ONLY".into(), "here".into()),
                ("PATH".into(), "/usr/bin:/bin".into()),
            ],
            writable: Vec::new(),
        };
        let mut out = Vec::new();
        let code = run(
            &spec,
            &RunOptions::new(Placement::Direct),
            &Cache::new("/nonexistent-wrenn-cache"),
            &mut out,
            &mut io::sink(),
        )
        .unwrap();
        assert_eq!(code, 0);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["/usr", "here"]);
        // ONLY, PATH and what sh adds itself (PWD); nothing inherited.
        assert!(lines[2].trim().parse::<u32>().unwrap() <= 3, "{text}");
    }

    #[test]
    fn test_direct_with_network_tells_the_command_the_host_is_local() {
        let spec = CommandSpec::new(["sh", "-c", "echo \"$WRENN_HOSTVM_HOST\""])
            .env(HOST_ENV, "stale value from the caller");
        let cache = Cache::new("/nonexistent-wrenn-cache");
        let mut out = Vec::new();
        let options = RunOptions::new(Placement::Direct).network(HostVmNetwork::new());
        assert_eq!(
            run(&spec, &options, &cache, &mut out, &mut io::sink()).unwrap(),
            0
        );
        assert_eq!(out, b"127.0.0.1\n");
        // Without a network the environment is the spec's, untouched.
        let mut out = Vec::new();
        let options = RunOptions::new(Placement::Direct);
        run(&spec, &options, &cache, &mut out, &mut io::sink()).unwrap();
        assert_eq!(out, b"stale value from the caller\n");
    }

    #[test]
    fn test_direct_with_invalid_network_fails_before_running() {
        let host = "127.0.0.1:15008".parse().unwrap();
        let options = RunOptions::new(Placement::Direct)
            .network(HostVmNetwork::new().forward(host, 1).forward(host, 2));
        let (cache, spec) = (Cache::new("/nonexistent"), CommandSpec::new(["true"]));
        let err = run(&spec, &options, &cache, &mut io::sink(), &mut io::sink()).unwrap_err();
        assert!(matches!(err, HostVmError::InvalidNetwork { .. }), "{err}");
    }

    #[test]
    fn test_host_address_of_follows_placement_and_forwards() {
        let net = HostVmNetwork::new().forward("127.0.0.1:15008".parse().unwrap(), 5008);
        let direct = RunOptions::new(Placement::Direct);
        assert_eq!(
            direct.host_address_of(5008),
            Some("127.0.0.1:5008".parse().unwrap())
        );
        assert_eq!(direct.host_address_from_command(), Ipv4Addr::LOCALHOST);
        let vm = RunOptions::new(Placement::HostVm);
        assert_eq!(vm.host_address_of(5008), None);
        let vm = vm.network(net);
        assert_eq!(
            vm.host_address_of(5008),
            Some("127.0.0.1:15008".parse().unwrap())
        );
        assert_eq!(vm.host_address_of(5009), None);
        assert_eq!(vm.host_address_from_command(), HOST_ADDRESS_FROM_GUEST);
    }

    #[test]
    fn test_direct_timeout_kills_command() {
        let spec = CommandSpec::new(["sleep", "30"]);
        let options = RunOptions::new(Placement::Direct).timeout(Duration::from_millis(300));
        let started = Instant::now();
        let err = run(
            &spec,
            &options,
            &Cache::new("/nonexistent-wrenn-cache"),
            &mut io::sink(),
            &mut io::sink(),
        )
        .unwrap_err();
        assert!(matches!(err, HostVmError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn test_direct_missing_program_is_spawn_error() {
        let (result, _, _) = direct(&["wrenn-no-such-program"]);
        assert!(matches!(result, Err(HostVmError::Spawn { .. })));
    }

    #[test]
    fn test_clean_stale_removes_unlocked_and_keeps_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = tmp.path().join("1-0");
        let live = tmp.path().join("2-0");
        for d in [&stale, &live] {
            fs::create_dir(d).unwrap();
            File::create(d.join("lock")).unwrap();
        }
        let held = File::open(live.join("lock")).unwrap();
        held.lock().unwrap();
        clean_stale(tmp.path());
        assert!(!stale.exists());
        assert!(live.exists());
        drop(held);
    }

    #[test]
    fn test_run_dir_removed_on_success_kept_on_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let ok = RunDir::create(&cache).unwrap();
        let ok_path = ok.path.clone();
        assert!(ok.guest("").is_dir());
        drop(ok);
        assert!(!ok_path.exists());
        let mut failed = RunDir::create(&cache).unwrap();
        failed.keep = true;
        let failed_path = failed.path.clone();
        drop(failed);
        assert!(failed_path.exists());
        // The next run cleans it up.
        let next = RunDir::create(&cache).unwrap();
        assert!(!failed_path.exists());
        drop(next);
    }
}
