//! The VMM's confinement on the real kernel: seccomp filters per thread kind, the jail
//! (mount namespace + new root), no_new_privs, resource limits and dropping to another uid.
//!
//! Filters, namespaces and credentials cannot be undone, and a denied call kills the whole
//! process, so every scenario runs in a child: this test binary run again with
//! `WRENN_CONFINEMENT_SCENARIO` set, which makes [`scenario_child`] run the scenario instead of
//! doing nothing. The child reports progress as `STEP <name>` lines on stdout; the parent
//! checks the steps and how the child ended. Jail scenarios need root (CAP_SYS_ADMIN) and say
//! so when skipped.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use wrenn_vmm::jail::{self, Access, Credentials, JailPlan, ResourceLimits};
use wrenn_vmm::seccomp::{self, DenyAction, ThreadKind};

const SCENARIO_ENV: &str = "WRENN_CONFINEMENT_SCENARIO";
const DIR_ENV: &str = "WRENN_CONFINEMENT_DIR";
/// `nobody`/`nogroup` on Debian.
const NOBODY: u32 = 65534;
const KEPT_SOCKET: &str = "v.sock_52";
const JAIL_OPEN_FILES: u64 = 512;
const JAIL_FILE_SIZE: u64 = 1 << 20;
const JAIL_PROCESSES: u64 = 4096;

// ---- child side ---------------------------------------------------------------------------------

/// Entry point of the child process; does nothing in a normal test run.
#[test]
fn scenario_child() {
    let Ok(name) = std::env::var(SCENARIO_ENV) else {
        return;
    };
    let dir = std::env::var_os(DIR_ENV).map(PathBuf::from);
    no_core_dumps();
    let code = match run_scenario(&name, dir.as_deref()) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("scenario {name} failed: {message}");
            3
        }
    };
    std::process::exit(code);
}

/// A killed child must not leave a core file behind (core_pattern may be a plain `core`).
fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit from a live local.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    // SAFETY: PR_SET_DUMPABLE takes plain integers.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0_u64, 0_u64, 0_u64, 0_u64) };
}

fn step(name: &str) {
    // stdout is line-buffered: the line is out before a later call can kill the process.
    println!("STEP {name}");
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn gettid() -> i64 {
    // SAFETY: gettid takes no arguments.
    i64::from(unsafe { libc::gettid() })
}

type Scenario = Result<(), String>;

fn run_scenario(name: &str, dir: Option<&Path>) -> Scenario {
    let dir = || dir.ok_or_else(|| format!("{DIR_ENV} is not set"));
    match name {
        "vcpu-openat" => vcpu_openat(),
        "vcpu-unlisted-ioctl" => vcpu_unlisted_ioctl(),
        "vcpu-exec-mapping" => vcpu_exec_mapping(),
        "api-execve" => api_execve(dir()?),
        "vmm-inet-socket" => vmm_inet_socket(dir()?),
        "vmm-spawn-thread" => vmm_spawn_thread(),
        "trap-mode" => trap_mode(),
        "log-mode" => log_mode(),
        "jail" => jail_scenario(dir()?),
        "jail-drop-uid" => jail_drop_uid(dir()?),
        "jail-vmm-ordering" => jail_vmm_ordering(dir()?),
        other => Err(format!("unknown scenario {other}")),
    }
}

fn apply(kind: ThreadKind) -> Scenario {
    seccomp::apply(kind).map_err(|e| format!("applying {kind}: {e:?}"))
}

/// What a vCPU thread does works; opening a file kills the process.
fn vcpu_openat() -> Scenario {
    let counter = std::sync::Arc::new(std::sync::Mutex::new(0u32));
    apply(ThreadKind::Vcpu)?;
    step("filtered");
    // The KVM_RUN request is let through to the kernel, which says stdout is no vCPU.
    // SAFETY: KVM_RUN takes no argument pointer.
    let ret = unsafe { libc::ioctl(libc::STDOUT_FILENO, 0xae80) };
    if ret != -1 || errno() != libc::ENOTTY {
        return Err(format!(
            "ioctl(KVM_RUN) on stdout: {ret}, errno {}",
            errno()
        ));
    }
    step("kvm-run-reached-kernel");
    // Locks, allocation (a large one is an mmap), a thread-safe counter.
    *counter.lock().map_err(|_| "poisoned")? += 1;
    let big = vec![7u8; 16 << 20];
    if big.iter().map(|b| u64::from(*b)).sum::<u64>() != 7 * (16 << 20) {
        return Err("allocation".into());
    }
    step("memory-and-locks");
    // Only plain values are printed after a forbidden call: formatting a `File` would make
    // more system calls (readlink, fcntl) and could be what gets killed instead.
    let opened = File::open("/etc/passwd").is_ok();
    step(&format!("survived-openat {opened}"));
    Ok(())
}

/// An ioctl that is not a vCPU one (here FIONBIO) kills the process.
fn vcpu_unlisted_ioctl() -> Scenario {
    apply(ThreadKind::Vcpu)?;
    step("filtered");
    let mut on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int from a live local.
    let ret = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::FIONBIO, &mut on) };
    step(&format!("survived-ioctl {ret}"));
    Ok(())
}

/// Mapping executable memory kills the process.
fn vcpu_exec_mapping() -> Scenario {
    apply(ThreadKind::Vcpu)?;
    step("filtered");
    // SAFETY: an anonymous private mapping touches no existing memory; it is not used.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    step(&format!("survived-mmap {ptr:?}"));
    Ok(())
}

/// The API thread accepts, reads with timeouts, spawns connection threads; execve kills it.
fn api_execve(dir: &Path) -> Scenario {
    let path = dir.join("api.sock");
    let listener = UnixListener::bind(&path).map_err(|e| format!("bind: {e}"))?;
    // The client side needs socket() + connect(), which the API filter does not allow.
    let mut client = UnixStream::connect(&path).map_err(|e| format!("connect: {e}"))?;
    apply(ThreadKind::Api)?;
    step("filtered");
    let server = std::thread::Builder::new()
        .name("wrenn-api-conn".into())
        .spawn(move || -> Result<Vec<u8>, String> {
            let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            let _tracked = stream.try_clone().map_err(|e| format!("try_clone: {e}"))?;
            stream
                .set_nonblocking(false)
                .map_err(|e| format!("FIONBIO: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
            stream
                .set_write_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
            let mut request = [0u8; 4];
            stream
                .read_exact(&mut request)
                .map_err(|e| format!("read: {e}"))?;
            stream
                .write_all(b"pong")
                .map_err(|e| format!("write: {e}"))?;
            stream
                .shutdown(std::net::Shutdown::Both)
                .map_err(|e| format!("shutdown: {e}"))?;
            Ok(request.to_vec())
        })
        .map_err(|e| format!("spawning a thread under the API filter: {e}"))?;
    client
        .write_all(b"ping")
        .map_err(|e| format!("client write: {e}"))?;
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .map_err(|e| format!("client read: {e}"))?;
    let request = server.join().map_err(|_| "connection thread panicked")??;
    if request != b"ping" || reply != b"pong" {
        return Err(format!("exchange: {request:?} {reply:?}"));
    }
    step("connection-served-on-new-thread");
    let program = c"/bin/true";
    let argv = [program.as_ptr(), std::ptr::null()];
    // SAFETY: a NUL-terminated path and a null-terminated argv of live C strings.
    let ret = unsafe { libc::execv(program.as_ptr(), argv.as_ptr()) };
    step(&format!("survived-execve {ret}"));
    Ok(())
}

/// The VMM thread's device work is allowed; an AF_INET socket kills the process.
fn vmm_inet_socket(dir: &Path) -> Scenario {
    let listener = UnixListener::bind(dir.join(KEPT_SOCKET)).map_err(|e| format!("bind: {e}"))?;
    let disk = dir.join("disk.img");
    std::fs::write(&disk, [5u8; 8192]).map_err(|e| format!("disk: {e}"))?;
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .map_err(|e| format!("open disk: {e}"))?;
    apply(ThreadKind::Vmm)?;
    step("filtered");
    // virtio-vsock: a guest-initiated connection to `<uds_path>_<port>`, accepted here.
    let mut out =
        UnixStream::connect(dir.join(KEPT_SOCKET)).map_err(|e| format!("connect: {e}"))?;
    let (mut accepted, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    accepted
        .set_nonblocking(true)
        .map_err(|e| format!("FIONBIO: {e}"))?;
    out.write_all(b"hi").map_err(|e| format!("send: {e}"))?;
    let mut got = [0u8; 2];
    accepted
        .read_exact(&mut got)
        .map_err(|e| format!("recv: {e}"))?;
    step("vsock-connect-accept");
    // virtio-blk and virtio-rng.
    let mut sector = [0u8; 512];
    disk.read_exact_at(&mut sector, 4096)
        .map_err(|e| format!("pread: {e}"))?;
    disk.write_all_at(&[9u8; 512], 0)
        .map_err(|e| format!("pwrite: {e}"))?;
    disk.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    let mut random = [0u8; 32];
    // SAFETY: getrandom writes at most 32 bytes into the live buffer.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != 32 || sector != [5u8; 512] {
        return Err(format!("block/rng: {n}"));
    }
    step("block-and-rng");
    // FlushMetrics appends to its file; socket files are removed at exit.
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("metrics.json"))
        .and_then(|mut f| f.write_all(b"{}\n"))
        .map_err(|e| format!("metrics: {e}"))?;
    std::fs::remove_file(dir.join(KEPT_SOCKET)).map_err(|e| format!("unlink: {e}"))?;
    step("metrics-and-unlink");
    // SAFETY: socket() takes plain integers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    step(&format!("survived-socket {fd}"));
    Ok(())
}

/// The VMM thread starts no threads once filtered.
fn vmm_spawn_thread() -> Scenario {
    apply(ThreadKind::Vmm)?;
    step("filtered");
    let spawned = std::thread::Builder::new().spawn(|| 1);
    step(&format!("survived-spawn {}", spawned.is_ok()));
    Ok(())
}

/// Trap mode: the denied call fails with EPERM, a line names it, the process goes on.
fn trap_mode() -> Scenario {
    seccomp::apply_with(ThreadKind::Vcpu, DenyAction::Trap)
        .map_err(|e| format!("applying: {e:?}"))?;
    step("filtered");
    match File::open("/etc/passwd") {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            step("openat-failed-with-eperm");
            Ok(())
        }
        other => Err(format!("open under trap mode: {other:?}")),
    }
}

/// Log mode: the denied call goes through (and the kernel logs it).
fn log_mode() -> Scenario {
    seccomp::apply_with(ThreadKind::Vcpu, DenyAction::Log)
        .map_err(|e| format!("applying: {e:?}"))?;
    step("filtered");
    let text = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("read: {e}"))?;
    if !text.contains("root:") {
        return Err("unexpected /etc/passwd".into());
    }
    step("openat-allowed");
    Ok(())
}

fn jail_plan(dir: &Path) -> JailPlan {
    let mut plan = JailPlan::default()
        .keep(dir.join("keep"), Access::ReadWrite)
        .keep(dir.join("files/metrics.json"), Access::ReadWrite)
        .keep(dir.join("files/readonly"), Access::ReadOnly);
    plan.limits = ResourceLimits {
        open_files: JAIL_OPEN_FILES,
        file_size: Some(JAIL_FILE_SIZE),
        processes: Some(JAIL_PROCESSES),
        core_size: 0,
    };
    plan
}

/// Waits for the parent's go-ahead (a line on stdin) so it can inspect /proc meanwhile.
fn ready_and_wait(tids: &[i64]) -> Scenario {
    let list: Vec<String> = tids.iter().map(ToString::to_string).collect();
    println!("READY {}", list.join(" "));
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("stdin: {e}"))?;
    Ok(())
}

fn getrlimit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a live local.
    unsafe { libc::getrlimit(resource, &mut limit) };
    (limit.rlim_cur, limit.rlim_max)
}

/// Only the kept paths remain, the socket in the kept directory answers, the root is
/// read-only, and limits and no_new_privs are in place.
fn jail_scenario(dir: &Path) -> Scenario {
    let listener =
        UnixListener::bind(dir.join("keep").join(KEPT_SOCKET)).map_err(|e| format!("bind: {e}"))?;
    jail::confine(&jail_plan(dir)).map_err(|e| format!("confine: {e:?}"))?;
    step("confined");

    match std::fs::metadata("/etc/passwd") {
        Err(e) if e.kind() == ErrorKind::NotFound => step("no-etc-passwd"),
        other => return Err(format!("/etc/passwd after confine: {other:?}")),
    }
    if Path::new("/proc/self").exists() || Path::new("/dev/kvm").exists() {
        return Err("/proc or /dev is visible".into());
    }
    let mut top: Vec<String> = std::fs::read_dir("/")
        .map_err(|e| format!("read_dir /: {e}"))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("read_dir /: {e}"))?;
    top.sort();
    let first = dir
        .components()
        .nth(1)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    if top != [first.clone()] {
        return Err(format!("/ holds {top:?}, expected only {first:?}"));
    }
    step("root-holds-only-kept-paths");

    let mut client = UnixStream::connect(dir.join("keep").join(KEPT_SOCKET))
        .map_err(|e| format!("connect in jail: {e}"))?;
    let (mut server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    client.write_all(b"ok").map_err(|e| format!("write: {e}"))?;
    let mut got = [0u8; 2];
    server
        .read_exact(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    step("kept-socket-connects");

    let metrics = dir.join("files/metrics.json");
    OpenOptions::new()
        .append(true)
        .open(&metrics)
        .and_then(|mut f| f.write_all(b"{\"flush\":1}\n"))
        .map_err(|e| format!("append to kept file: {e}"))?;
    step("kept-file-writable");
    match OpenOptions::new()
        .append(true)
        .open(dir.join("files/readonly"))
    {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => step("read-only-file-refuses-writes"),
        other => return Err(format!("writing the read-only kept file: {other:?}")),
    }
    match File::create("/new-file") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => step("root-read-only"),
        other => return Err(format!("creating /new-file: {other:?}")),
    }

    // Past RLIMIT_FSIZE a write fails with EFBIG; SIGXFSZ does not kill the VMM.
    let file = OpenOptions::new()
        .write(true)
        .open(&metrics)
        .map_err(|e| format!("open metrics: {e}"))?;
    match file.write_at(b"x", JAIL_FILE_SIZE) {
        Err(e) if e.raw_os_error() == Some(libc::EFBIG) => step("file-size-limited"),
        other => return Err(format!("write past RLIMIT_FSIZE: {other:?}")),
    }

    // SAFETY: PR_GET_NO_NEW_PRIVS takes plain integers.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0_u64, 0_u64, 0_u64, 0_u64) };
    // SAFETY: PR_GET_DUMPABLE takes plain integers.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0_u64, 0_u64, 0_u64, 0_u64) };
    let limits = [
        getrlimit(libc::RLIMIT_NOFILE),
        getrlimit(libc::RLIMIT_FSIZE),
        getrlimit(libc::RLIMIT_CORE),
        getrlimit(libc::RLIMIT_NPROC),
    ];
    let want = [
        (JAIL_OPEN_FILES, JAIL_OPEN_FILES),
        (JAIL_FILE_SIZE, JAIL_FILE_SIZE),
        (0, 0),
        (JAIL_PROCESSES, JAIL_PROCESSES),
    ];
    if nnp != 1 || dumpable != 0 || limits != want {
        return Err(format!("nnp {nnp} dumpable {dumpable} limits {limits:?}"));
    }
    step("nnp-and-limits");
    ready_and_wait(&[gettid()])
}

/// Threads that exist before the drop (already under the API and vCPU filters) switch uid
/// with the main thread; afterwards root is out of reach and the kept socket still answers.
fn jail_drop_uid(dir: &Path) -> Scenario {
    let listener =
        UnixListener::bind(dir.join("keep").join(KEPT_SOCKET)).map_err(|e| format!("bind: {e}"))?;
    std::fs::set_permissions(
        dir.join("keep").join(KEPT_SOCKET),
        Permissions::from_mode(0o777),
    )
    .map_err(|e| format!("chmod socket: {e}"))?;
    let mut helpers = Vec::new();
    let mut stops = Vec::new();
    for kind in [ThreadKind::Api, ThreadKind::Vcpu] {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        helpers.push(std::thread::spawn(move || {
            let applied = seccomp::apply(kind).map_err(|e| format!("{e:?}"));
            let _ = tid_tx.send((gettid(), applied));
            let _ = stop_rx.recv();
        }));
        let (tid, applied) = tid_rx.recv().map_err(|e| format!("helper: {e}"))?;
        applied?;
        stops.push((tid, stop_tx));
    }
    step("filtered-threads-running");

    let mut plan = jail_plan(dir);
    plan.drop_to = Some(Credentials {
        uid: NOBODY,
        gid: NOBODY,
    });
    jail::confine(&plan).map_err(|e| format!("confine: {e:?}"))?;
    step("confined-as-nobody");

    let (mut ruid, mut euid, mut suid) = (0, 0, 0);
    // SAFETY: getresuid writes three uids into live locals.
    unsafe { libc::getresuid(&mut ruid, &mut euid, &mut suid) };
    if (ruid, euid, suid) != (NOBODY, NOBODY, NOBODY) {
        return Err(format!("uids {ruid} {euid} {suid}"));
    }
    // SAFETY: setresuid takes plain integers; a raw syscall changes only this thread.
    let regained = unsafe { libc::syscall(libc::SYS_setresuid, 0_i64, 0_i64, 0_i64) };
    if regained != -1 || errno() != libc::EPERM {
        return Err(format!("setresuid(0) after the drop: {regained}"));
    }
    step("root-out-of-reach");
    let _client = UnixStream::connect(dir.join("keep").join(KEPT_SOCKET))
        .map_err(|e| format!("connect as nobody: {e}"))?;
    let _accepted = listener.accept().map_err(|e| format!("accept: {e}"))?;
    step("kept-socket-connects-as-nobody");

    let mut tids = vec![gettid()];
    tids.extend(stops.iter().map(|(tid, _)| *tid));
    ready_and_wait(&tids)?;
    for (_, stop) in stops {
        let _ = stop.send(());
    }
    for helper in helpers {
        helper.join().map_err(|_| "helper panicked")?;
    }
    Ok(())
}

/// The order the VMM uses: API thread filtered at its start, jail after the build, vCPU
/// threads started inside it (each filtered at its start), then the main thread's filter.
/// The main thread's device work still runs; reading a file by path kills the process.
fn jail_vmm_ordering(dir: &Path) -> Scenario {
    let listener =
        UnixListener::bind(dir.join("keep").join(KEPT_SOCKET)).map_err(|e| format!("bind: {e}"))?;
    let (api_tx, api_rx) = mpsc::channel();
    let api = std::thread::spawn(move || {
        let applied = seccomp::apply(ThreadKind::Api).map_err(|e| format!("{e:?}"));
        let _ = api_tx.send(applied);
        std::thread::park();
    });
    api_rx.recv().map_err(|e| format!("api thread: {e}"))??;

    jail::confine(&jail_plan(dir)).map_err(|e| format!("confine: {e:?}"))?;
    wrenn_vmm::vcpu::install_kick_handler().map_err(|e| format!("kick handler: {e}"))?;
    let (vcpu_tx, vcpu_rx) = mpsc::channel();
    let vcpu = std::thread::spawn(move || {
        let applied = seccomp::apply(ThreadKind::Vcpu).map_err(|e| format!("{e:?}"));
        let failed = applied.is_err();
        let _ = vcpu_tx.send(applied);
        if failed {
            return;
        }
        // Stands in for KVM_RUN: sleeps until kicked (the signal interrupts the sleep).
        // SAFETY: nanosleep reads one timespec from a live local and may write no remainder.
        let ret = unsafe {
            libc::nanosleep(
                &libc::timespec {
                    tv_sec: 30,
                    tv_nsec: 0,
                },
                std::ptr::null_mut(),
            )
        };
        println!("STEP vcpu-kicked {ret} {}", errno());
    });
    vcpu_rx.recv().map_err(|e| format!("vcpu thread: {e}"))??;
    apply(ThreadKind::Vmm)?;
    step("all-filtered");

    let _guest_conn = UnixStream::connect(dir.join("keep").join(KEPT_SOCKET))
        .map_err(|e| format!("guest-initiated connect: {e}"))?;
    let _accepted = listener.accept().map_err(|e| format!("accept: {e}"))?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("files/metrics.json"))
        .and_then(|mut f| f.write_all(b"{}\n"))
        .map_err(|e| format!("FlushMetrics: {e}"))?;
    step("device-work-in-jail");
    std::thread::sleep(Duration::from_millis(50));
    use vmm_sys_util::signal::Killable;
    vcpu.kill(wrenn_vmm::vcpu::kick_signal())
        .map_err(|e| format!("kick: {e}"))?;
    vcpu.join().map_err(|_| "vcpu thread panicked")?;
    api.thread().unpark();
    api.join().map_err(|_| "api thread panicked")?;
    std::fs::remove_file(dir.join("keep").join(KEPT_SOCKET)).map_err(|e| format!("unlink: {e}"))?;
    step("threads-joined");
    // Anything else by path: the metrics file opened for reading is not FlushMetrics.
    let opened = File::open(dir.join("files/metrics.json")).is_ok();
    step(&format!("survived-open {opened}"));
    Ok(())
}

// ---- parent side --------------------------------------------------------------------------------

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn steps(&self) -> Vec<&str> {
        self.stdout
            .lines()
            // libtest's "test scenario_child ... " may share the first line.
            .filter_map(|line| line.find("STEP ").map(|at| &line[at + 5..]))
            .collect()
    }

    fn has_step(&self, name: &str) -> bool {
        self.steps().iter().any(|s| s.starts_with(name))
    }

    fn context(&self) -> String {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    fn assert_killed_by_seccomp(&self) {
        assert_eq!(
            self.status.signal(),
            Some(libc::SIGSYS),
            "{}",
            self.context()
        );
        assert!(
            !self.steps().iter().any(|s| s.starts_with("survived")),
            "{}",
            self.context()
        );
    }

    fn assert_succeeded(&self) {
        assert!(self.status.success(), "{}", self.context());
    }
}

fn command(scenario: &str, dir: Option<&Path>) -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let mut command = Command::new(exe);
    command
        .args([
            "scenario_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO_ENV, scenario)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        command.env(DIR_ENV, dir);
    }
    command
}

fn run(scenario: &str, dir: Option<&Path>) -> Outcome {
    let output = command(scenario, dir).output().expect("running the child");
    Outcome {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A child that stops at `READY <tid>...`: the parent looks at it through /proc, then lets
/// it finish.
struct Paused {
    /// Taken by `finish`; a `Paused` dropped early (a failed assertion) kills and reaps it.
    child: Option<Child>,
    stdout: BufReader<ChildStdout>,
    before_ready: String,
    tids: Vec<i64>,
}

impl Paused {
    // The child is waited for in `finish` or, when an assertion fails first, in `Drop`.
    #[allow(clippy::zombie_processes)]
    fn start(scenario: &str, dir: &Path) -> Paused {
        let mut child = command(scenario, Some(dir))
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawning the child");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut before_ready = String::new();
        loop {
            let mut line = String::new();
            let n = stdout.read_line(&mut line).expect("child stdout");
            if n == 0 {
                let status = child.wait().expect("child status");
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = err.read_to_string(&mut stderr);
                }
                panic!("child ended before READY: {status:?}\n{before_ready}\n{stderr}");
            }
            if let Some(rest) = line.find("READY ").map(|at| &line[at + 6..]) {
                let tids = rest
                    .split_whitespace()
                    .map(|t| t.parse().expect("tid"))
                    .collect();
                return Paused {
                    child: Some(child),
                    stdout,
                    before_ready,
                    tids,
                };
            }
            before_ready.push_str(&line);
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn task_file(&self, tid: i64, name: &str) -> String {
        let path = format!("/proc/{}/task/{tid}/{name}", self.pid());
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn task_status(&self, tid: i64) -> String {
        self.task_file(tid, "status")
    }

    fn finish(mut self) -> Outcome {
        let mut child = self.child.take().expect("finished once");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        let status = child.wait().expect("child status");
        Outcome {
            status,
            stdout: std::mem::take(&mut self.before_ready) + &rest,
            stderr,
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {field} in\n{status}"))
}

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// A directory the jail scenarios keep parts of, traversable by `nobody`:
/// `keep/` (read-write, sockets go here), `files/metrics.json`, `files/readonly`.
fn jail_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("wrenn-confine-")
        .permissions(Permissions::from_mode(0o755))
        .tempdir()
        .expect("temp dir");
    for sub in ["keep", "files"] {
        std::fs::create_dir(dir.path().join(sub)).expect("subdir");
        std::fs::set_permissions(dir.path().join(sub), Permissions::from_mode(0o777))
            .expect("chmod");
    }
    std::fs::write(dir.path().join("files/metrics.json"), b"").expect("metrics file");
    std::fs::write(dir.path().join("files/readonly"), b"ro").expect("read-only file");
    std::fs::set_permissions(
        dir.path().join("files/metrics.json"),
        Permissions::from_mode(0o666),
    )
    .expect("chmod");
    dir
}

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .count()
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wrenn-seccomp-")
        .tempdir()
        .expect("temp dir")
}

#[test]
fn test_vcpu_filter_allows_kvm_run_and_kills_on_openat() {
    let outcome = run("vcpu-openat", None);
    outcome.assert_killed_by_seccomp();
    for want in ["filtered", "kvm-run-reached-kernel", "memory-and-locks"] {
        assert!(outcome.has_step(want), "{want}: {}", outcome.context());
    }
}

#[test]
fn test_vcpu_filter_kills_on_non_kvm_ioctl() {
    let outcome = run("vcpu-unlisted-ioctl", None);
    outcome.assert_killed_by_seccomp();
    assert!(outcome.has_step("filtered"), "{}", outcome.context());
}

#[test]
fn test_vcpu_filter_kills_on_executable_mapping() {
    let outcome = run("vcpu-exec-mapping", None);
    outcome.assert_killed_by_seccomp();
    assert!(outcome.has_step("filtered"), "{}", outcome.context());
}

#[test]
fn test_api_filter_serves_connections_on_new_threads_and_kills_on_execve() {
    let dir = temp_dir();
    let outcome = run("api-execve", Some(dir.path()));
    outcome.assert_killed_by_seccomp();
    assert!(
        outcome.has_step("connection-served-on-new-thread"),
        "{}",
        outcome.context()
    );
}

#[test]
fn test_vmm_filter_runs_devices_and_kills_on_inet_socket() {
    let dir = temp_dir();
    let outcome = run("vmm-inet-socket", Some(dir.path()));
    outcome.assert_killed_by_seccomp();
    for want in [
        "vsock-connect-accept",
        "block-and-rng",
        "metrics-and-unlink",
    ] {
        assert!(outcome.has_step(want), "{want}: {}", outcome.context());
    }
    assert!(!dir.path().join(KEPT_SOCKET).exists());
    let metrics = std::fs::read_to_string(dir.path().join("metrics.json")).unwrap();
    assert_eq!(metrics, "{}\n");
}

#[test]
fn test_vmm_filter_kills_on_thread_spawn() {
    let outcome = run("vmm-spawn-thread", None);
    outcome.assert_killed_by_seccomp();
    assert!(outcome.has_step("filtered"), "{}", outcome.context());
}

#[test]
fn test_trap_mode_fails_the_call_and_names_it() {
    let outcome = run("trap-mode", None);
    outcome.assert_succeeded();
    assert!(
        outcome.has_step("openat-failed-with-eperm"),
        "{}",
        outcome.context()
    );
    let want = format!("seccomp denied syscall {}", libc::SYS_openat);
    assert!(outcome.stderr.contains(&want), "{}", outcome.context());
}

#[test]
fn test_log_mode_lets_the_call_through() {
    let outcome = run("log-mode", None);
    outcome.assert_succeeded();
    assert!(outcome.has_step("openat-allowed"), "{}", outcome.context());
}

#[test]
fn test_jail_hides_host_files_keeps_socket_dir_sets_nnp_and_limits() {
    if !is_root() {
        eprintln!(
            "skipping test_jail_hides_host_files_keeps_socket_dir_sets_nnp_and_limits: needs root"
        );
        return;
    }
    let dir = jail_dir();
    let mounts_before = mount_count();
    let paused = Paused::start("jail", dir.path());
    // What the host sees of the confined process while it runs.
    let status = paused.task_status(paused.tids[0]);
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", paused.pid())).unwrap();
    let row = |name: &str| {
        limits
            .lines()
            .find(|line| line.starts_with(name))
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {name} in\n{limits}"))
    };
    assert!(row("Max open files").contains("512 512"), "{limits}");
    assert!(row("Max file size").contains("1048576 1048576"), "{limits}");
    assert!(row("Max core file size").contains("0 0"), "{limits}");
    assert!(row("Max processes").contains("4096 4096"), "{limits}");
    // The confined thread's whole mount table: the read-only tmpfs root and the kept paths,
    // nothing of the old root.
    let mountinfo = paused.task_file(paused.tids[0], "mountinfo");
    let mut points: Vec<(String, String)> = mountinfo
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields[4].to_owned(), fields[5].to_owned())
        })
        .collect();
    points.sort();
    let kept = |p: &str| dir.path().join(p).display().to_string();
    let mut want = vec![
        ("/".to_owned(), "ro"),
        (kept("files/metrics.json"), "rw"),
        (kept("files/readonly"), "ro"),
        (kept("keep"), "rw"),
    ];
    want.sort();
    assert_eq!(points.len(), want.len(), "{mountinfo}");
    for ((point, options), (want_point, want_access)) in points.iter().zip(&want) {
        assert_eq!(point, want_point, "{mountinfo}");
        assert!(options.starts_with(want_access), "{mountinfo}");
        for flag in ["nosuid", "nodev", "noexec"] {
            assert!(options.contains(flag), "{point}: {options}");
        }
    }
    // The child's mounts stayed in its own namespace.
    assert_eq!(mount_count(), mounts_before);
    let outcome = paused.finish();
    outcome.assert_succeeded();
    for want in [
        "confined",
        "no-etc-passwd",
        "root-holds-only-kept-paths",
        "kept-socket-connects",
        "kept-file-writable",
        "read-only-file-refuses-writes",
        "root-read-only",
        "file-size-limited",
        "nnp-and-limits",
    ] {
        assert!(outcome.has_step(want), "{want}: {}", outcome.context());
    }
    // The jail wrote through to the host's file, and did not touch the host otherwise.
    let metrics = std::fs::read_to_string(dir.path().join("files/metrics.json")).unwrap();
    assert_eq!(metrics, "{\"flush\":1}\n");
    assert_eq!(mount_count(), mounts_before);
}

#[test]
fn test_jail_drops_every_thread_to_nobody() {
    if !is_root() {
        eprintln!("skipping test_jail_drops_every_thread_to_nobody: needs root");
        return;
    }
    let dir = jail_dir();
    let paused = Paused::start("jail-drop-uid", dir.path());
    assert_eq!(paused.tids.len(), 3, "main, API and vCPU threads");
    for &tid in &paused.tids {
        let status = paused.task_status(tid);
        let nobody = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
        assert_eq!(status_field(&status, "Uid:"), nobody, "{status}");
        assert_eq!(status_field(&status, "Gid:"), nobody, "{status}");
        assert_eq!(status_field(&status, "Groups:"), "", "{status}");
        assert_eq!(
            status_field(&status, "CapEff:"),
            "0000000000000000",
            "{status}"
        );
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    }
    let outcome = paused.finish();
    outcome.assert_succeeded();
    for want in [
        "filtered-threads-running",
        "confined-as-nobody",
        "root-out-of-reach",
        "kept-socket-connects-as-nobody",
    ] {
        assert!(outcome.has_step(want), "{want}: {}", outcome.context());
    }
}

#[test]
fn test_jail_then_filters_in_vmm_order_keeps_device_work_and_kills_on_open() {
    if !is_root() {
        eprintln!(
            "skipping test_jail_then_filters_in_vmm_order_keeps_device_work_and_kills_on_open: needs root"
        );
        return;
    }
    let dir = jail_dir();
    let outcome = run("jail-vmm-ordering", Some(dir.path()));
    outcome.assert_killed_by_seccomp();
    for want in [
        "all-filtered",
        "device-work-in-jail",
        "vcpu-kicked",
        "threads-joined",
    ] {
        assert!(outcome.has_step(want), "{want}: {}", outcome.context());
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("files/metrics.json")).unwrap(),
        "{}\n"
    );
}
