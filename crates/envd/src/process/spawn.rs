//! Starting a process the way E2B's envd does (environment, working directory, user, session,
//! stdin, PTY, cgroup, OOM score), and the task that owns it until it ends: it reads the
//! output into the process's log, enforces the timeout, reaps the child and records the end.
use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use connectrpc::ConnectError;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use wrenn_proto::process::StartRequest;
use wrenn_proto::process::process_event::EndEvent;
use wrenn_proto::process::process_event::data_event::Output;

use super::cgroup;
use super::output::{OUTPUT_LIMIT_BYTES, OutputLog};
use super::pty::Pty;
use super::table::{Input, Record, Table};
use crate::auth::resolve_path;
use crate::state::Shared;
use crate::users::User;

/// Read size for stdout and stderr pipes (E2B's).
pub const PIPE_CHUNK: usize = 32 * 1024;

/// Read size for a PTY (E2B's).
pub const PTY_CHUNK: usize = 16 * 1024;

/// After the process exits, how long a read of its output may wait for more (a background
/// child holding the pipes open must not hold the end back for ever) ...
pub const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// ... and the latest, after the exit, that reading goes on (a background child that keeps
/// writing). Only reading is bounded: output already read still waits for a slow starter.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Reads of already-written output at the end of the drain window, at most.
const DRAIN_READS: usize = 64;

/// The OOM score every started process gets, so the kernel picks user code before envd.
const CHILD_OOM_SCORE_ADJ: &[u8] = b"100";

/// PATH for children when envd itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Names process cgroups (`p1`, `p2`, ...), known before the pid is.
static NEXT_CGROUP: AtomicU64 = AtomicU64::new(1);

/// The child's environment: PATH, then the user's HOME, USER and LOGNAME, then envd's global
/// variables, then the request's (later ones win).
pub fn child_env(
    user: &User,
    global: BTreeMap<String, String>,
    request: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let path = std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    env.insert("PATH".to_owned(), path);
    env.insert("HOME".to_owned(), user.home.display().to_string());
    env.insert("USER".to_owned(), user.name.clone());
    env.insert("LOGNAME".to_owned(), user.name.clone());
    env.extend(global);
    env.extend(request);
    env
}

/// The directory a process starts in: the request's `cwd` (resolved like any path), else the
/// default workdir, else the user's home. It must be an existing directory.
pub fn working_dir(
    cwd: Option<&str>,
    user: &User,
    default_workdir: Option<&Path>,
) -> Result<PathBuf, ConnectError> {
    let dir = match cwd.filter(|c| !c.is_empty()) {
        Some(cwd) => resolve_path(cwd, user, default_workdir),
        None => default_workdir.map_or_else(|| user.home.clone(), Path::to_path_buf),
    };
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(ConnectError::invalid_argument(format!(
            "cwd '{}' does not exist",
            dir.display()
        )))
    }
}

/// Go's `ProcessState.String()` signal names (Linux).
pub fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        _ => return None,
    })
}

/// The end event for a wait status, with E2B's fields: the exit code (-1 when signalled),
/// whether it exited normally, Go's status text, and the same text as `error` when the
/// process failed (Go's `cmd.Wait()` error).
pub fn end_event(status: &ExitStatus) -> EndEvent {
    let (exit_code, exited, text) = if let Some(code) = status.code() {
        (code, true, format!("exit status {code}"))
    } else if let Some(signal) = status.signal() {
        let name = signal_name(signal).map_or_else(|| format!("signal {signal}"), str::to_owned);
        let core = if status.core_dumped() {
            " (core dumped)"
        } else {
            ""
        };
        (-1, false, format!("signal: {name}{core}"))
    } else {
        (-1, false, status.to_string())
    };
    EndEvent {
        exit_code,
        exited,
        error: (!(exited && exit_code == 0)).then(|| text.clone()),
        status: text,
        ..Default::default()
    }
}

/// The Connect error for a failed spawn of `cmd`.
fn spawn_error(cmd: &str, error: &io::Error) -> ConnectError {
    let message = format!("error starting process '{cmd}': {error}");
    let resource = [
        Errno::EAGAIN,
        Errno::ENOMEM,
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOSPC,
    ];
    match error.kind() {
        io::ErrorKind::NotFound => ConnectError::not_found(message),
        io::ErrorKind::PermissionDenied => ConnectError::permission_denied(message),
        _ if error
            .raw_os_error()
            .is_some_and(|code| resource.iter().any(|e| *e as i32 == code)) =>
        {
            ConnectError::resource_exhausted(message)
        }
        _ => ConnectError::invalid_argument(message),
    }
}

/// Who the child becomes in `pre_exec`: `None` keeps envd's identity (envd is that user).
struct Identity {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

/// Starts the process `request` describes as `user`, registers it in `table`, and hands it
/// to its owner task. `deadline` (the request's `Connect-Timeout-Ms`) bounds its lifetime.
pub fn start(
    shared: &Shared,
    table: &Arc<Table>,
    request: StartRequest,
    user: &User,
    deadline: Option<std::time::Instant>,
) -> Result<Arc<Record>, ConnectError> {
    let StartRequest {
        process,
        pty,
        tag,
        stdin,
        ..
    } = request;
    let config = process
        .into_option()
        .ok_or_else(|| ConnectError::invalid_argument("process config is required"))?;
    if config.cmd.is_empty() {
        return Err(ConnectError::invalid_argument("process cmd is empty"));
    }
    let settings = shared.settings();
    let cwd = working_dir(
        config.cwd.as_deref(),
        user,
        settings.default_workdir.as_deref(),
    )?;
    let env = child_env(
        user,
        shared.global_env(),
        config.envs.iter().map(|(k, v)| (k.clone(), v.clone())),
    );

    let identity = if Uid::effective().is_root() {
        Some(Identity {
            uid: Uid::from_raw(user.uid),
            gid: Gid::from_raw(user.gid),
            groups: user.groups.iter().copied().map(Gid::from_raw).collect(),
        })
    } else if Uid::effective().as_raw() == user.uid {
        None
    } else {
        return Err(ConnectError::permission_denied(format!(
            "envd is not root and cannot run processes as '{}'",
            user.name
        )));
    };

    let cgroup = cgroup::manager(settings.manage_cgroups).and_then(|cgroups| {
        let name = format!("p{}", NEXT_CGROUP.fetch_add(1, Ordering::Relaxed));
        cgroups
            .create(&name)
            .inspect_err(|error| tracing::warn!(%error, "process runs without its own cgroup"))
            .ok()
    });
    let procs_file = cgroup.as_ref().and_then(|cgroup| {
        cgroup
            .open_procs()
            .inspect_err(|error| tracing::warn!(%error, "process runs without its own cgroup"))
            .ok()
    });

    let mut command = Command::new(&config.cmd);
    command
        .args(&config.args)
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .kill_on_drop(false);
    let terminal = match pty.into_option() {
        Some(pty) => {
            let size = pty.size.into_option().unwrap_or_default();
            let (terminal, slave) = Pty::open(size.cols, size.rows)
                .map_err(|error| spawn_error(&config.cmd, &error))?;
            let (out, err) = (
                slave
                    .try_clone()
                    .map_err(|error| spawn_error(&config.cmd, &error))?,
                slave
                    .try_clone()
                    .map_err(|error| spawn_error(&config.cmd, &error))?,
            );
            command
                .stdin(Stdio::from(slave))
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err));
            Some(Arc::new(terminal))
        }
        None => {
            let stdin = if stdin == Some(false) {
                Stdio::null()
            } else {
                Stdio::piped()
            };
            command
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    let is_pty = terminal.is_some();
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // that are async-signal-safe (setsid, ioctl, open, write, close, setgroups, setgid,
    // setuid) on data prepared before the fork (`procs_file`, `identity`), and allocates
    // nothing and takes no locks.
    unsafe {
        command.pre_exec(move || prepare_child(is_pty, procs_file.as_ref(), identity.as_ref()));
    }

    // envd reaps its own children (tokio does); as PID 1 the orphan reaper runs in envd's
    // parent process (`system::pid1`), so it never takes these.
    let spawned = command.spawn().and_then(|child| {
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the child has no pid"))?;
        Ok((pid, child))
    });
    // The command holds the parent's copies of the PTY slave: close them now, or the master
    // never sees the end of the output.
    drop(command);
    let (pid, mut child) = match spawned {
        Ok(spawned) => spawned,
        Err(error) => {
            if let Some(cgroup) = cgroup {
                cgroup.remove_when_empty();
            }
            tracing::info!(cmd = %config.cmd, %error, "process failed to start");
            return Err(spawn_error(&config.cmd, &error));
        }
    };

    // Held for the Start stream, which follows it as soon as this returns.
    let log = Arc::new(OutputLog::new(OUTPUT_LIMIT_BYTES, true));
    let (exited_tx, exited) = watch::channel(None);
    let mut readers = Vec::new();
    let input = match &terminal {
        Some(terminal) => {
            readers.push(tokio::spawn(read_pty(
                Arc::clone(terminal),
                Arc::clone(&log),
                exited.clone(),
            )));
            Input::Pty(Arc::clone(terminal))
        }
        None => {
            if let Some(stdout) = child.stdout.take() {
                readers.push(tokio::spawn(read_pipe(
                    stdout,
                    Arc::clone(&log),
                    Output::Stdout,
                    exited.clone(),
                )));
            }
            if let Some(stderr) = child.stderr.take() {
                readers.push(tokio::spawn(read_pipe(
                    stderr,
                    Arc::clone(&log),
                    Output::Stderr,
                    exited.clone(),
                )));
            }
            match child.stdin.take() {
                Some(stdin) => Input::Pipe(Some(stdin)),
                None => Input::Disabled,
            }
        }
    };
    tracing::info!(
        pid,
        cmd = %config.cmd,
        user = %user.name,
        cwd = %cwd.display(),
        pty = is_pty,
        timeout = ?deadline.map(|d| d.saturating_duration_since(std::time::Instant::now())),
        "process started"
    );
    let record = Arc::new(Record::new(pid, tag, config, log, input, terminal, cgroup));
    table.insert(Arc::clone(&record));
    tokio::spawn(supervise(
        Arc::clone(&record),
        Arc::clone(table),
        child,
        Readers {
            tasks: readers,
            exited: exited_tx,
        },
        deadline.map(Instant::from_std),
    ));
    Ok(record)
}

/// In the child, between fork and exec: a new session (the process group is the tree
/// SendSignal kills), the terminal as controlling TTY, the cgroup, the OOM score, then the
/// user's groups and ids (last: the steps before need root).
fn prepare_child(
    is_pty: bool,
    procs_file: Option<&std::fs::File>,
    identity: Option<&Identity>,
) -> io::Result<()> {
    nix::unistd::setsid()?;
    if is_pty {
        // SAFETY: fd 0 is the PTY slave (std has dup2'd it); TIOCSCTTY takes an int argument
        // and touches no memory of ours.
        let result = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        Errno::result(result)?;
    }
    if let Some(procs) = procs_file {
        // Best effort: a process outside its cgroup still runs (and is killed by group).
        let _ = nix::unistd::write(procs, b"0");
    }
    const OOM_PATH: &CStr = c"/proc/self/oom_score_adj";
    if let Ok(fd) = nix::fcntl::open(OOM_PATH, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = nix::unistd::write(&fd, CHILD_OOM_SCORE_ADJ);
    }
    if let Some(identity) = identity {
        nix::unistd::setgroups(&identity.groups)?;
        nix::unistd::setgid(identity.gid)?;
        nix::unistd::setuid(identity.uid)?;
    }
    Ok(())
}

/// The output readers of one process, and how they learn that it exited (and when).
struct Readers {
    tasks: Vec<JoinHandle<()>>,
    exited: watch::Sender<Option<Instant>>,
}

/// Resolves when a read started now has waited long enough after the process's exit:
/// [`DRAIN_IDLE`] from now, but not later than [`DRAIN_MAX`] after the exit. Never before the
/// exit.
async fn read_window_closed(exited: &mut watch::Receiver<Option<Instant>>) {
    let exit_at = match exited.wait_for(Option::is_some).await {
        Ok(at) => *at,
        // The owner task is gone without saying: keep reading until end of file.
        Err(_) => None,
    };
    match exit_at {
        Some(exit_at) => {
            let until = (Instant::now() + DRAIN_IDLE).min(exit_at + DRAIN_MAX);
            tokio::time::sleep_until(until).await;
        }
        None => std::future::pending().await,
    }
}

/// Copies a pipe into the log until end of file (or the drain window after the exit).
async fn read_pipe(
    mut pipe: impl AsyncRead + AsFd + Unpin,
    log: Arc<OutputLog>,
    wrap: fn(Vec<u8>) -> Output,
    mut exited: watch::Receiver<Option<Instant>>,
) {
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        let read = tokio::select! {
            // Reading wins a tie with the window: output already written is never dropped.
            biased;
            read = pipe.read(&mut buf) => read,
            () = read_window_closed(&mut exited) => {
                drain_ready(pipe.as_fd(), &mut buf, &log, wrap).await;
                return;
            }
        };
        match read {
            Ok(0) => return,
            Ok(n) => log.push(wrap(buf[..n].to_vec())).await,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::debug!(%error, "reading process output failed");
                return;
            }
        }
    }
}

/// Copies the terminal's output into the log until every slave is closed (or the drain
/// window after the exit).
async fn read_pty(
    pty: Arc<Pty>,
    log: Arc<OutputLog>,
    mut exited: watch::Receiver<Option<Instant>>,
) {
    let mut buf = vec![0u8; PTY_CHUNK];
    loop {
        let read = tokio::select! {
            biased;
            read = pty.read(&mut buf) => read,
            () = read_window_closed(&mut exited) => {
                drain_ready(pty.as_fd(), &mut buf, &log, Output::Pty).await;
                return;
            }
        };
        match read {
            Ok(0) => return,
            Ok(n) => log.push(Output::Pty(buf[..n].to_vec())).await,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::debug!(%error, "reading terminal output failed");
                return;
            }
        }
    }
}

/// At the end of the drain window: whatever already sits in the (non-blocking) pipe or
/// terminal goes to the log, read directly. The reactor may not have reported it readable
/// yet on a busy machine, and the process wrote it before it exited. Bounded, so a
/// background child that keeps writing cannot hold the end back.
async fn drain_ready(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    log: &OutputLog,
    wrap: fn(Vec<u8>) -> Output,
) {
    for _ in 0..DRAIN_READS {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return,
            Ok(n) => log.push(wrap(buf[..n].to_vec())).await,
            Err(Errno::EINTR) => {}
            // EAGAIN: nothing more; EIO: a terminal whose slaves are all closed.
            Err(_) => return,
        }
    }
}

/// Owns the child until it ends: enforces the deadline (killing the whole tree), reaps it,
/// lets the output drain, records the end, and cleans up (input, terminal, cgroup).
async fn supervise(
    record: Arc<Record>,
    table: Arc<Table>,
    mut child: Child,
    readers: Readers,
    deadline: Option<Instant>,
) {
    let pid = record.pid;
    let waited = match deadline {
        Some(deadline) => {
            tokio::select! {
                status = child.wait() => status,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::info!(pid, "process timed out; killing it");
                    record.signal_tree(Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
        None => child.wait().await,
    };
    record.mark_exited();

    // The readers finish on their own: end of file, or the drain window after this.
    readers.exited.send_replace(Some(Instant::now()));
    futures::future::join_all(readers.tasks).await;
    // Closing stdin and the terminal master hangs up anything still attached to them.
    match tokio::time::timeout(Duration::from_secs(1), record.input.lock()).await {
        Ok(mut input) => *input = Input::Ended,
        Err(_) => tracing::debug!(pid, "stdin busy at the end; left to the last writer"),
    }
    record.drop_pty();

    let end = match &waited {
        Ok(status) => end_event(status),
        Err(error) => EndEvent {
            exit_code: -1,
            exited: false,
            status: String::new(),
            error: Some(format!("waiting for the process: {error}")),
            ..Default::default()
        },
    };
    tracing::info!(pid, status = %end.status, "process ended");
    record.log.finish(end);
    table.ended(&record);
    if let Some(cgroup) = record.cgroup.clone() {
        cgroup.remove_when_empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(home: &Path) -> User {
        User {
            name: "tester".into(),
            uid: 4242,
            gid: 4242,
            home: home.to_owned(),
            shell: "/bin/sh".into(),
            groups: vec![4242],
        }
    }

    #[test]
    fn test_status_exit_codes_read_like_go() {
        let ok = end_event(&ExitStatus::from_raw(0));
        assert_eq!((ok.exit_code, ok.exited), (0, true));
        assert_eq!(ok.status, "exit status 0");
        assert_eq!(ok.error, None);
        let failed = end_event(&ExitStatus::from_raw(3 << 8));
        assert_eq!((failed.exit_code, failed.exited), (3, true));
        assert_eq!(failed.status, "exit status 3");
        assert_eq!(failed.error.as_deref(), Some("exit status 3"));
    }

    #[test]
    fn test_status_signals_read_like_go() {
        let killed = end_event(&ExitStatus::from_raw(9));
        assert_eq!((killed.exit_code, killed.exited), (-1, false));
        assert_eq!(killed.status, "signal: killed");
        assert_eq!(killed.error.as_deref(), Some("signal: killed"));
        assert_eq!(
            end_event(&ExitStatus::from_raw(15)).status,
            "signal: terminated"
        );
        // Bit 7: a core was dumped.
        assert_eq!(
            end_event(&ExitStatus::from_raw(6 | 0x80)).status,
            "signal: aborted (core dumped)"
        );
        assert_eq!(
            end_event(&ExitStatus::from_raw(40)).status,
            "signal: signal 40"
        );
    }

    #[test]
    fn test_env_order_request_wins() {
        let u = user(Path::new("/home/tester"));
        let global = BTreeMap::from([
            ("E2B_SANDBOX".to_owned(), "true".to_owned()),
            ("USER".to_owned(), "global".to_owned()),
        ]);
        let env = child_env(&u, global, [("E2B_SANDBOX".to_owned(), "x".to_owned())]);
        assert_eq!(env["HOME"], "/home/tester");
        assert_eq!(env["LOGNAME"], "tester");
        assert_eq!(env["USER"], "global");
        assert_eq!(env["E2B_SANDBOX"], "x");
        assert!(!env["PATH"].is_empty());
    }

    #[test]
    fn test_working_dir_defaults_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let u = user(dir.path());
        assert_eq!(working_dir(None, &u, None).unwrap(), dir.path());
        assert_eq!(working_dir(Some(""), &u, None).unwrap(), dir.path());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(
            working_dir(Some("sub"), &u, None).unwrap(),
            dir.path().join("sub")
        );
        assert_eq!(
            working_dir(None, &u, Some(Path::new("/"))).unwrap(),
            Path::new("/")
        );
        let error = working_dir(Some("nope"), &u, None).unwrap_err();
        assert_eq!(error.code, connectrpc::ErrorCode::InvalidArgument);
        assert!(
            error
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("does not exist")
        );
    }

    #[test]
    fn test_spawn_errors_name_the_command() {
        let missing = spawn_error("nope", &io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(missing.code, connectrpc::ErrorCode::NotFound);
        assert!(
            missing
                .message
                .as_deref()
                .unwrap_or_default()
                .contains("'nope'")
        );
        let denied = spawn_error("x", &io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(denied.code, connectrpc::ErrorCode::PermissionDenied);
        let busy = spawn_error("x", &io::Error::from_raw_os_error(libc::EAGAIN));
        assert_eq!(busy.code, connectrpc::ErrorCode::ResourceExhausted);
    }
}
