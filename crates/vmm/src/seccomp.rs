//! Seccomp filters: one allowlist per kind of thread in the VMM process.
//!
//! A guest that breaks out of KVM into the VMM lands in one of four kinds of thread, and each
//! gets only the system calls its job needs (see `CONFINEMENT.md` for the lists and why):
//!
//! ```text
//!  thread          applies            filter allows (besides the runtime basics)
//!  ─────────────   ────────────────   ───────────────────────────────────────────────
//!  API acceptor    at its start       accept4, recv/send, socket timeouts, FIONBIO,
//!   └ connection   inherited            spawning threads (clone with thread flags only)
//!  vCPU            at its start       ioctl KVM_RUN / KVMCLOCK_CTRL / GET_(S)REGS,
//!                                       TUNSETOFFLOAD, console writes
//!  VMM (main)      after the vCPUs    device I/O on open fds, epoll, AF_UNIX sockets,
//!                  are running          appending to the metrics file, unlinking sockets
//!  page server     at its start       recv on its connection; AF_UNIX socket, connect,
//!   link (uffd)     (Uffd restores)     sendmsg (handing the userfaultfd over again),
//!                                       ioctl UFFDIO_WAKE
//! ```
//!
//! A filter is installed on the calling thread only (no `TSYNC`); threads it spawns later
//! inherit it, and filters stack (the strictest answer wins). Anything not on the list gets the
//! [`DenyAction`]: the whole process is killed with `SIGSYS` unless a debugging mode was asked
//! for.
//!
//! `clone3` takes its flags in a struct that seccomp cannot read, so the API filter answers it
//! with `ENOSYS`: glibc then falls back to `clone`, whose flags are checked to be exactly the
//! ones `pthread_create` uses (a new thread, never a new process).

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// The kinds of thread the VMM runs; each has its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: event loop, device back ends, API request handling.
    Vmm,
    /// The API acceptor and its per-connection threads.
    Api,
    /// One thread per vCPU, looping on `KVM_RUN`.
    Vcpu,
    /// After a lazy (Uffd) restore: watches the page server's connection and reconnects.
    Pager,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Pager,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Pager => "pager",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a system call that is not on the thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyAction {
    /// The kernel kills the whole process with `SIGSYS` (enforcing mode).
    #[default]
    KillProcess,
    /// The call fails with `EPERM` and one line naming the syscall number goes to stderr
    /// (debugging: the VMM keeps running and tells you what it missed).
    Trap,
    /// The call is allowed and the kernel logs it (`audit: type=1326` in the kernel log):
    /// for finding what a workload needs without breaking it.
    Log,
}

impl fmt::Display for DenyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyAction::KillProcess => "kill",
            DenyAction::Trap => "trap",
            DenyAction::Log => "log",
        })
    }
}

impl std::str::FromStr for DenyAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(DenyAction::KillProcess),
            "trap" => Ok(DenyAction::Trap),
            "log" => Ok(DenyAction::Log),
            other => Err(format!(
                "unknown seccomp action {other:?}; expected kill, trap or log"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} seccomp filter")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler for trap mode")]
    TrapHandler(#[source] vmm_sys_util::errno::Error),
}

/// The enforcing filter for `kind`: a denied call kills the process.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    filter_with(kind, DenyAction::KillProcess)
}

/// The filter for `kind` with the given answer to denied calls.
pub fn filter_with(kind: ThreadKind, deny: DenyAction) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, args) in merged(kind) {
        let chain = match args {
            None => Vec::new(),
            Some(alternatives) => alternatives
                .into_iter()
                .map(|all| {
                    let conditions = all
                        .into_iter()
                        .map(Cond::build)
                        .collect::<Result<Vec<_>, _>>()?;
                    SeccompRule::new(conditions)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(build)?,
        };
        rules.insert(nr, chain);
    }
    let filter = SeccompFilter::new(rules, deny.into(), SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    let program = BpfProgram::try_from(filter).map_err(build)?;
    if kind == ThreadKind::Api {
        let mut prefixed = clone3_enosys_prefix();
        prefixed.extend(program);
        return Ok(prefixed);
    }
    Ok(program)
}

/// Installs the enforcing filter for `kind` on the calling thread (and the threads it spawns
/// from now on). Also sets `no_new_privs` on the thread, which seccomp requires.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    apply_with(kind, DenyAction::KillProcess)
}

/// [`apply`] with the given answer to denied calls. In [`DenyAction::Trap`] mode this also
/// installs the process-wide `SIGSYS` handler that reports and fails the call.
pub fn apply_with(kind: ThreadKind, deny: DenyAction) -> Result<(), SeccompError> {
    let program = filter_with(kind, deny)?;
    if deny == DenyAction::Trap {
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, report_denied_syscall)
            .map_err(SeccompError::TrapHandler)?;
    }
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })?;
    tracing::debug!(thread = %kind, action = %deny, "seccomp filter installed");
    Ok(())
}

/// The names of the system calls `kind` may make (some only with certain arguments), sorted.
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = allowlist(kind).iter().map(|a| a.name).collect();
    names.sort_unstable();
    names.dedup();
    names
}

impl From<DenyAction> for SeccompAction {
    fn from(deny: DenyAction) -> Self {
        match deny {
            DenyAction::KillProcess => SeccompAction::KillProcess,
            DenyAction::Trap => SeccompAction::Trap,
            DenyAction::Log => SeccompAction::Log,
        }
    }
}

// ---- the allowlists ---------------------------------------------------------------------------

/// One argument comparison; all conditions of an alternative must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cond {
    arg: u8,
    /// Compare the low 32 bits only (the kernel reads the argument as an `int`).
    dword: bool,
    op: Op,
    value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    /// `arg & mask == value`
    Masked(u64),
}

impl Cond {
    fn build(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        let len = if self.dword {
            SeccompCmpArgLen::Dword
        } else {
            SeccompCmpArgLen::Qword
        };
        let op = match self.op {
            Op::Eq => SeccompCmpOp::Eq,
            Op::Masked(mask) => SeccompCmpOp::MaskedEq(mask),
        };
        SeccompCondition::new(self.arg, len, op, self.value)
    }
}

/// A system call on a list: allowed with any arguments (`args: None`), or only when one of the
/// alternatives matches.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    name: &'static str,
    nr: i64,
    args: Option<Vec<Vec<Cond>>>,
}

/// `sys!(SYS_read)` is the syscall's name ("read") and number.
macro_rules! sys {
    ($nr:ident) => {
        (stringify!($nr).trim_start_matches("SYS_"), libc::$nr)
    };
}

fn allow((name, nr): (&'static str, i64)) -> Allowed {
    Allowed {
        name,
        nr,
        args: None,
    }
}

/// Allowed when 32-bit argument `arg` is one of `values`.
fn arg_in((name, nr): (&'static str, i64), arg: u8, values: &[u64]) -> Allowed {
    Allowed {
        name,
        nr,
        args: Some(
            values
                .iter()
                .map(|&value| {
                    vec![Cond {
                        arg,
                        dword: true,
                        op: Op::Eq,
                        value,
                    }]
                })
                .collect(),
        ),
    }
}

/// Allowed when 32-bit argument `arg` has none of the bits of `mask`.
fn arg_without((name, nr): (&'static str, i64), arg: u8, mask: u64) -> Allowed {
    Allowed {
        name,
        nr,
        args: Some(vec![vec![Cond {
            arg,
            dword: true,
            op: Op::Masked(mask),
            value: 0,
        }]]),
    }
}

/// Converts a non-negative C constant for an argument comparison.
fn c(value: impl TryInto<u64>) -> u64 {
    // Every constant used here is a small non-negative number.
    value.try_into().unwrap_or(u64::MAX)
}

/// Numbers of the KVM ioctls the vCPU threads (running, and reading their state for a
/// snapshot) and the VMM thread (VM state and dirty log for a snapshot) make.
mod kvm {
    use kvm_bindings::{
        KVMIO, kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip,
        kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
        kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
}

/// The flags glibc's `pthread_create` passes to `clone`: a thread in this process.
fn thread_clone_flags() -> u64 {
    c(libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID)
}

/// What `OpenOptions::new().create(true).append(true)` asks for: the metrics file.
fn append_create_flags() -> u64 {
    c(libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC)
}

/// What a snapshot opens: new files (`create` + `truncate`; or `create_new` read-write, a disk
/// layer that the drive then reads through the same descriptor) and the directory it fsyncs
/// after renaming the state file into place (`O_DIRECTORY`: never a file's contents).
fn snapshot_open_flags() -> [u64; 3] {
    [
        c(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC),
        c(libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC),
        c(libc::O_RDONLY | libc::O_CLOEXEC | libc::O_DIRECTORY),
    ]
}

/// `SO_RCVTIMEO`/`SO_SNDTIMEO`, in both the old (32-bit time) and new numbering.
const SO_RCVTIMEO_OLD: u64 = 20;
const SO_SNDTIMEO_OLD: u64 = 21;
const SO_RCVTIMEO_NEW: u64 = 66;
const SO_SNDTIMEO_NEW: u64 = 67;

/// What every thread of a Rust program needs once it runs: memory, locks, time, signals,
/// logging to stderr, closing fds, and ending.
fn runtime_basics() -> Vec<Allowed> {
    let exec = c(libc::PROT_EXEC);
    vec![
        // Allocator; nothing maps or re-protects memory as executable after start-up.
        allow(sys!(SYS_brk)),
        arg_without(sys!(SYS_mmap), 2, exec),
        arg_without(sys!(SYS_mprotect), 2, exec),
        allow(sys!(SYS_munmap)),
        allow(sys!(SYS_mremap)),
        allow(sys!(SYS_madvise)),
        // Mutexes, channels, parking, sleeping, clocks (when the vDSO cannot answer).
        allow(sys!(SYS_futex)),
        allow(sys!(SYS_sched_yield)),
        allow(sys!(SYS_nanosleep)),
        allow(sys!(SYS_clock_nanosleep)),
        allow(sys!(SYS_clock_gettime)),
        allow(sys!(SYS_gettimeofday)),
        allow(sys!(SYS_restart_syscall)),
        // Signal handlers (vCPU kick, SIGTERM) return; thread exit tears down sigaltstack.
        allow(sys!(SYS_rt_sigreturn)),
        allow(sys!(SYS_rt_sigprocmask)),
        allow(sys!(SYS_sigaltstack)),
        // abort() (double panic, allocation failure) raises SIGABRT on itself.
        allow(sys!(SYS_getpid)),
        allow(sys!(SYS_gettid)),
        arg_in(sys!(SYS_tgkill), 2, &[c(libc::SIGABRT)]),
        // Logs to stderr; std's debug builds check an fd with F_GETFD before closing it.
        allow(sys!(SYS_write)),
        allow(sys!(SYS_close)),
        arg_in(sys!(SYS_fcntl), 1, &[c(libc::F_GETFD)]),
        // HashMap seeds (std asks once per thread) and the entropy device.
        allow(sys!(SYS_getrandom)),
        allow(sys!(SYS_exit)),
        allow(sys!(SYS_exit_group)),
    ]
}

/// glibc changes uid/gid in every thread at once: it signals each thread to make the call
/// itself. Threads that exist when the VMM drops privileges must be allowed these (they can
/// only keep or lower privileges that the process already has).
fn credential_broadcast() -> Vec<Allowed> {
    vec![
        allow(sys!(SYS_setgroups)),
        allow(sys!(SYS_setresgid)),
        allow(sys!(SYS_setresuid)),
    ]
}

fn vmm() -> Vec<Allowed> {
    let mut list = runtime_basics();
    list.extend([
        // Device back ends on fds opened before confinement (drives, tap, eventfds, timerfd).
        allow(sys!(SYS_read)),
        allow(sys!(SYS_readv)),
        allow(sys!(SYS_writev)),
        allow(sys!(SYS_pread64)),
        allow(sys!(SYS_pwrite64)),
        allow(sys!(SYS_preadv)),
        allow(sys!(SYS_pwritev)),
        allow(sys!(SYS_lseek)),
        allow(sys!(SYS_fsync)),
        allow(sys!(SYS_fdatasync)),
        allow(sys!(SYS_timerfd_settime)),
        allow(sys!(SYS_timerfd_gettime)),
        // The event loop.
        allow(sys!(SYS_epoll_ctl)),
        allow(sys!(SYS_epoll_wait)),
        allow(sys!(SYS_epoll_pwait)),
        // vsock: host connections come in on the listener, guest connections go out to
        // `<uds_path>_<port>` (unix sockets only).
        allow(sys!(SYS_accept4)),
        arg_in(sys!(SYS_socket), 0, &[c(libc::AF_UNIX)]),
        allow(sys!(SYS_connect)),
        allow(sys!(SYS_shutdown)),
        allow(sys!(SYS_recvfrom)),
        allow(sys!(SYS_sendto)),
        allow(sys!(SYS_recvmsg)),
        allow(sys!(SYS_sendmsg)),
        arg_in(
            sys!(SYS_ioctl),
            1,
            &[
                c(libc::FIONBIO),
                c(libc::TUNSETOFFLOAD),
                // Snapshots: the VM's state and the guest's dirty pages.
                kvm::KVM_GET_DIRTY_LOG(),
                kvm::KVM_GET_IRQCHIP(),
                kvm::KVM_GET_PIT2(),
                kvm::KVM_GET_CLOCK(),
            ],
        ),
        arg_in(
            sys!(SYS_fcntl),
            1,
            &[
                c(libc::F_GETFL),
                c(libc::F_SETFL),
                c(libc::F_SETFD),
                c(libc::F_DUPFD_CLOEXEC),
            ],
        ),
        // FlushMetrics appends to the metrics file (kept in the jail); snapshots write new
        // files into kept directories. Nothing else is opened after confinement.
        arg_in(
            sys!(SYS_openat),
            2,
            &[
                append_create_flags(),
                snapshot_open_flags()[0],
                snapshot_open_flags()[1],
                snapshot_open_flags()[2],
            ],
        ),
        // Snapshots: a build's directory, sizing sparse files, atomic renames, and which
        // guest pages are resident (never-touched pages are not written).
        allow(sys!(SYS_mkdir)),
        allow(sys!(SYS_mkdirat)),
        allow(sys!(SYS_ftruncate)),
        allow(sys!(SYS_rename)),
        allow(sys!(SYS_renameat)),
        allow(sys!(SYS_renameat2)),
        allow(sys!(SYS_mincore)),
        allow(sys!(SYS_fstat)),
        // Removing the vsock and API sockets at exit (only if still ours: stat first).
        allow(sys!(SYS_statx)),
        allow(sys!(SYS_newfstatat)),
        allow(sys!(SYS_unlink)),
        allow(sys!(SYS_unlinkat)),
        // Kicking vCPU threads out of KVM_RUN (pthread_kill = getpid + tgkill).
        arg_in(sys!(SYS_tgkill), 2, &[c(crate::vcpu::kick_signal())]),
    ]);
    list
}

fn api() -> Vec<Allowed> {
    let mut list = runtime_basics();
    list.extend(credential_broadcast());
    list.extend([
        allow(sys!(SYS_accept4)),
        allow(sys!(SYS_read)),
        allow(sys!(SYS_recvfrom)),
        allow(sys!(SYS_sendto)),
        allow(sys!(SYS_shutdown)),
        Allowed {
            name: "setsockopt",
            nr: libc::SYS_setsockopt,
            args: Some(
                [
                    SO_RCVTIMEO_OLD,
                    SO_SNDTIMEO_OLD,
                    SO_RCVTIMEO_NEW,
                    SO_SNDTIMEO_NEW,
                ]
                .iter()
                .map(|&name| {
                    vec![
                        Cond {
                            arg: 1,
                            dword: true,
                            op: Op::Eq,
                            value: c(libc::SOL_SOCKET),
                        },
                        Cond {
                            arg: 2,
                            dword: true,
                            op: Op::Eq,
                            value: name,
                        },
                    ]
                })
                .collect(),
            ),
        },
        arg_in(sys!(SYS_ioctl), 1, &[c(libc::FIONBIO)]),
        // `UnixStream::try_clone` for the connection table.
        arg_in(sys!(SYS_fcntl), 1, &[c(libc::F_DUPFD_CLOEXEC)]),
        // One thread per connection; what a new thread does before user code runs.
        Allowed {
            name: "clone",
            nr: libc::SYS_clone,
            args: Some(vec![vec![Cond {
                arg: 0,
                dword: false,
                op: Op::Eq,
                value: thread_clone_flags(),
            }]]),
        },
        allow(sys!(SYS_set_robust_list)),
        allow(sys!(SYS_rseq)),
        arg_in(sys!(SYS_prctl), 0, &[c(libc::PR_SET_NAME)]),
        allow(sys!(SYS_sched_getaffinity)),
    ]);
    list
}

fn vcpu() -> Vec<Allowed> {
    let mut list = runtime_basics();
    list.extend(credential_broadcast());
    list.extend([
        arg_in(
            sys!(SYS_ioctl),
            1,
            &[
                kvm::KVM_RUN(),
                kvm::KVM_KVMCLOCK_CTRL(),
                kvm::KVM_GET_REGS(),
                kvm::KVM_GET_SREGS(),
                // A paused vCPU reads its whole state for a snapshot.
                kvm::KVM_GET_MSRS(),
                kvm::KVM_GET_LAPIC(),
                kvm::KVM_GET_CPUID2(),
                kvm::KVM_GET_MP_STATE(),
                kvm::KVM_GET_VCPU_EVENTS(),
                kvm::KVM_GET_DEBUGREGS(),
                kvm::KVM_GET_XSAVE(),
                kvm::KVM_GET_XCRS(),
                kvm::KVM_GET_TSC_KHZ(),
                // virtio-net activation (DRIVER_OK arrives on a vCPU thread) sets offloads.
                c(libc::TUNSETOFFLOAD),
            ],
        ),
        // The serial console writes where its output goes (stdout, a file or a FIFO).
        allow(sys!(SYS_writev)),
    ]);
    list
}

/// The page-server link (`snapshot::uffd`): waits for the connection to hang up, then
/// connects again and hands over the same userfaultfd, and wakes the faulting threads.
fn pager() -> Vec<Allowed> {
    let mut list = runtime_basics();
    list.extend([
        // Waiting for the hang-up (`UnixStream` reads use `recv`).
        allow(sys!(SYS_recvfrom)),
        // Reconnecting: a unix socket only, and the handshake with the fd attached.
        arg_in(sys!(SYS_socket), 0, &[c(libc::AF_UNIX)]),
        allow(sys!(SYS_connect)),
        allow(sys!(SYS_sendmsg)),
        // Waking faulting threads so the new page server sees their faults.
        arg_in(
            sys!(SYS_ioctl),
            1,
            &[crate::snapshot::uffd::uffdio_wake_request()],
        ),
    ]);
    list
}

fn allowlist(kind: ThreadKind) -> Vec<Allowed> {
    match kind {
        ThreadKind::Vmm => vmm(),
        ThreadKind::Api => api(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Pager => pager(),
    }
}

/// The list with one entry per syscall: alternatives of repeated entries are joined, and an
/// entry that allows any arguments wins.
fn merged(kind: ThreadKind) -> BTreeMap<i64, Option<Vec<Vec<Cond>>>> {
    let mut map: BTreeMap<i64, Option<Vec<Vec<Cond>>>> = BTreeMap::new();
    for allowed in allowlist(kind) {
        match (map.get_mut(&allowed.nr), allowed.args) {
            (None, args) => {
                map.insert(allowed.nr, args);
            }
            (Some(existing), None) => *existing = None,
            (Some(None), Some(_)) => {}
            (Some(Some(existing)), Some(more)) => {
                for alternative in more {
                    if !existing.contains(&alternative) {
                        existing.push(alternative);
                    }
                }
            }
        }
    }
    map
}

// ---- raw BPF for clone3 -----------------------------------------------------------------------

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
/// `struct seccomp_data`: `int nr; __u32 arch; ...`
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// Answers `clone3` with `ENOSYS` (so glibc falls back to `clone`, whose flags the filter can
/// check); everything else falls through to the program that follows. Another architecture
/// falls through too, and the seccompiler program behind kills it.
fn clone3_enosys_prefix() -> Vec<sock_filter> {
    let clone3 = u32::try_from(libc::SYS_clone3).unwrap_or(u32::MAX);
    let enosys = u32::try_from(libc::ENOSYS).unwrap_or(0);
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        op(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        op(BPF_JMP_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        op(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        op(BPF_JMP_JEQ_K, 0, 1, clone3),
        op(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | enosys),
    ]
}

// ---- trap mode --------------------------------------------------------------------------------

/// The start of the kernel's `siginfo_t` for `SIGSYS` (`_sigsys` in the union at offset 16).
/// Only `syscall` is read; the other fields are there for the layout.
#[allow(dead_code)]
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `SIGSYS` handler for trap mode: says which call was denied and makes it fail with `EPERM`.
/// Only async-signal-safe work: formatting into a stack buffer and one `write`.
extern "C" fn report_denied_syscall(
    _signo: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    if info.is_null() || context.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for a SA_SIGINFO handler; for
    // SIGSYS its first 32 bytes have the `SigsysInfo` layout, which is all we read.
    let sigsys = unsafe { info.cast::<SigsysInfo>().read() };
    let (digits, count) = decimal(i64::from(sigsys.syscall));
    let parts: [&[u8]; 3] = [
        b"wrenn-vmm: seccomp denied syscall ",
        digits.get(..count).unwrap_or_default(),
        b" (failed with EPERM; trap mode)\n",
    ];
    let mut line = [0u8; 96];
    let mut len = 0;
    for part in parts {
        for &byte in part {
            if let Some(slot) = line.get_mut(len) {
                *slot = byte;
                len += 1;
            }
        }
    }
    // SAFETY: writes `len` initialised bytes of a live stack buffer to stderr.
    let _ = unsafe { libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len) };
    let context = context.cast::<libc::ucontext_t>();
    let Ok(rax) = usize::try_from(libc::REG_RAX) else {
        return;
    };
    // SAFETY: for a SA_SIGINFO handler the third argument is the interrupted thread's
    // ucontext_t, valid and exclusively ours until the handler returns; the register written
    // becomes the system call's return value when the thread resumes.
    if let Some(register) = unsafe { (*context).uc_mcontext.gregs.get_mut(rax) } {
        *register = -i64::from(libc::EPERM);
    }
}

/// `n` in decimal, as bytes and their count (no allocation: used in a signal handler).
fn decimal(n: i64) -> ([u8; 20], usize) {
    let mut digits = [0u8; 20];
    let mut out = [0u8; 20];
    let mut rest = n.unsigned_abs();
    let mut count = 0;
    loop {
        if let Some(slot) = digits.get_mut(count) {
            // `rest % 10` is below 10.
            *slot = b'0' + u8::try_from(rest % 10).unwrap_or(0);
        }
        count += 1;
        rest /= 10;
        if rest == 0 || count == digits.len() {
            break;
        }
    }
    let mut len = 0;
    if n < 0 {
        out[0] = b'-';
        len = 1;
    }
    for i in (0..count).rev() {
        if let (Some(slot), Some(&digit)) = (out.get_mut(len), digits.get(i)) {
            *slot = digit;
            len += 1;
        }
    }
    (out, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- a classic-BPF interpreter for the instructions seccompiler and we emit ----

    const BPF_CLASS_MASK: u16 = 0x07;
    const BPF_LD: u16 = 0x00;
    const BPF_ALU: u16 = 0x04;
    const BPF_JMP: u16 = 0x05;
    const BPF_RET: u16 = 0x06;

    /// `struct seccomp_data` for one call.
    struct Call {
        nr: i64,
        arch: u32,
        args: [u64; 6],
    }

    impl Call {
        fn new(nr: i64, args: &[u64]) -> Call {
            let mut all = [0u64; 6];
            for (slot, arg) in all.iter_mut().zip(args) {
                *slot = *arg;
            }
            Call {
                nr,
                arch: AUDIT_ARCH_X86_64,
                args: all,
            }
        }

        fn word(&self, offset: u32) -> u32 {
            let arg_word = |i: u32| {
                let arg = self.args[usize::try_from((i - 16) / 8).unwrap()];
                let bytes = arg.to_le_bytes();
                let half = usize::try_from((i - 16) % 8).unwrap();
                u32::from_le_bytes(bytes[half..half + 4].try_into().unwrap())
            };
            match offset {
                0 => u32::from_le_bytes(i32::try_from(self.nr).unwrap().to_le_bytes()),
                4 => self.arch,
                16..=63 => arg_word(offset),
                other => panic!("load from seccomp_data offset {other}"),
            }
        }
    }

    /// Runs `program` on `call`; returns the filter's verdict (SECCOMP_RET_*).
    fn run(program: &[sock_filter], call: &Call) -> u32 {
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let insn = &program[pc];
            pc += 1;
            match insn.code & BPF_CLASS_MASK {
                BPF_LD => {
                    assert_eq!(insn.code, 0x20, "only LD|W|ABS is emitted");
                    acc = call.word(insn.k);
                }
                BPF_ALU => {
                    assert_eq!(insn.code, 0x54, "only ALU|AND|K is emitted");
                    acc &= insn.k;
                }
                BPF_JMP => {
                    let taken = match insn.code {
                        0x05 => {
                            pc += usize::try_from(insn.k).unwrap();
                            continue;
                        }
                        0x15 => acc == insn.k,
                        0x25 => acc > insn.k,
                        0x35 => acc >= insn.k,
                        0x45 => acc & insn.k != 0,
                        other => panic!("jump opcode {other:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                BPF_RET => return insn.k,
                other => panic!("instruction class {other:#x}"),
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;

    fn verdict(kind: ThreadKind, nr: i64, args: &[u64]) -> u32 {
        let program = filter(kind).unwrap();
        run(&program, &Call::new(nr, args))
    }

    fn nr(n: libc::c_long) -> i64 {
        n
    }

    #[test]
    fn test_filter_every_kind_and_action_builds() {
        for kind in ThreadKind::ALL {
            for deny in [DenyAction::KillProcess, DenyAction::Trap, DenyAction::Log] {
                let program = filter_with(kind, deny).unwrap();
                assert!(!program.is_empty());
                assert!(
                    program.len() < 4096,
                    "{kind}: {} instructions",
                    program.len()
                );
            }
        }
    }

    #[test]
    fn test_filter_deny_action_is_the_mismatch_verdict() {
        let execve = Call::new(nr(libc::SYS_execve), &[]);
        for (deny, want) in [
            (DenyAction::KillProcess, KILL),
            (DenyAction::Trap, libc::SECCOMP_RET_TRAP),
            (DenyAction::Log, libc::SECCOMP_RET_LOG),
        ] {
            for kind in ThreadKind::ALL {
                let program = filter_with(kind, deny).unwrap();
                assert_eq!(run(&program, &execve), want, "{kind} {deny}");
            }
        }
    }

    #[test]
    fn test_filter_other_architecture_is_killed() {
        for kind in ThreadKind::ALL {
            let program = filter_with(kind, DenyAction::Log).unwrap();
            let mut call = Call::new(nr(libc::SYS_write), &[]);
            call.arch = 0x4000_0003; // AUDIT_ARCH_I386
            assert_eq!(run(&program, &call), KILL, "{kind}");
        }
    }

    #[test]
    fn test_filter_listed_syscalls_are_allowed() {
        for kind in ThreadKind::ALL {
            for (nr, args) in merged(kind) {
                let call_args: Vec<u64> = match &args {
                    None => Vec::new(),
                    Some(alternatives) => {
                        let mut values = vec![0u64; 6];
                        for cond in &alternatives[0] {
                            values[usize::from(cond.arg)] = cond.value;
                        }
                        values
                    }
                };
                assert_eq!(verdict(kind, nr, &call_args), ALLOW, "{kind}: syscall {nr}");
            }
        }
    }

    #[test]
    fn test_vcpu_ioctl_only_kvm_requests_we_use() {
        let ioctl = nr(libc::SYS_ioctl);
        for request in [
            kvm::KVM_RUN(),
            kvm::KVM_KVMCLOCK_CTRL(),
            kvm::KVM_GET_REGS(),
            kvm::KVM_GET_SREGS(),
        ] {
            assert_eq!(verdict(ThreadKind::Vcpu, ioctl, &[9, request]), ALLOW);
        }
        // KVM_SET_USER_MEMORY_REGION, KVM_CREATE_VCPU, FIONBIO: not from a vCPU thread.
        for request in [0x4020_ae46, 0xae41, c(libc::FIONBIO)] {
            assert_eq!(verdict(ThreadKind::Vcpu, ioctl, &[9, request]), KILL);
        }
    }

    #[test]
    fn test_kvm_ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(kvm::KVM_KVMCLOCK_CTRL(), 0xaead);
        assert_eq!(kvm::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm::KVM_GET_SREGS(), 0x8138_ae83);
    }

    #[test]
    fn test_vmm_socket_unix_only() {
        let socket = nr(libc::SYS_socket);
        assert_eq!(
            verdict(ThreadKind::Vmm, socket, &[c(libc::AF_UNIX), 1]),
            ALLOW
        );
        for domain in [
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
            libc::AF_PACKET,
        ] {
            assert_eq!(verdict(ThreadKind::Vmm, socket, &[c(domain), 1]), KILL);
        }
        assert_eq!(
            verdict(ThreadKind::Api, socket, &[c(libc::AF_UNIX), 1]),
            KILL
        );
        assert_eq!(
            verdict(ThreadKind::Vcpu, socket, &[c(libc::AF_UNIX), 1]),
            KILL
        );
    }

    #[test]
    fn test_pager_link_reconnects_over_unix_sockets_and_wakes_only() {
        let kind = ThreadKind::Pager;
        let socket = nr(libc::SYS_socket);
        assert_eq!(verdict(kind, socket, &[c(libc::AF_UNIX), 1]), ALLOW);
        assert_eq!(verdict(kind, socket, &[c(libc::AF_INET), 1]), KILL);
        for call in [libc::SYS_connect, libc::SYS_sendmsg, libc::SYS_recvfrom] {
            assert_eq!(verdict(kind, nr(call), &[3, 0, 0]), ALLOW, "{call}");
        }
        let ioctl = nr(libc::SYS_ioctl);
        let wake = crate::snapshot::uffd::uffdio_wake_request();
        assert_eq!(verdict(kind, ioctl, &[3, wake]), ALLOW);
        // No other ioctl (FIONBIO, KVM_RUN), no opening files, no threads, no accept.
        assert_eq!(verdict(kind, ioctl, &[3, c(libc::FIONBIO)]), KILL);
        assert_eq!(verdict(kind, ioctl, &[3, kvm::KVM_RUN()]), KILL);
        for call in [
            libc::SYS_openat,
            libc::SYS_clone,
            libc::SYS_accept4,
            libc::SYS_read,
        ] {
            assert_eq!(verdict(kind, nr(call), &[0, 0, 0]), KILL, "{call}");
        }
        // The wake request is UFFDIO_WAKE: _IOR(0xAA, 0x02, 16 bytes).
        assert_eq!(wake, 0x8010_aa02);
    }

    #[test]
    fn test_vmm_openat_never_opens_existing_files_for_writing() {
        let openat = nr(libc::SYS_openat);
        let at_fdcwd = u64::from_ne_bytes(i64::from(libc::AT_FDCWD).to_ne_bytes());
        assert_eq!(
            verdict(
                ThreadKind::Vmm,
                openat,
                &[at_fdcwd, 0, append_create_flags()]
            ),
            ALLOW
        );
        for flags in snapshot_open_flags() {
            assert_eq!(
                verdict(ThreadKind::Vmm, openat, &[at_fdcwd, 0, flags]),
                ALLOW
            );
        }
        let read_write = c(libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC);
        let write_existing = c(libc::O_WRONLY | libc::O_CLOEXEC);
        let read_only = c(libc::O_RDONLY | libc::O_CLOEXEC);
        for flags in [read_write, write_existing, read_only] {
            assert_eq!(
                verdict(ThreadKind::Vmm, openat, &[at_fdcwd, 0, flags]),
                KILL
            );
        }
        for kind in [ThreadKind::Api, ThreadKind::Vcpu] {
            assert_eq!(
                verdict(kind, openat, &[at_fdcwd, 0, append_create_flags()]),
                KILL
            );
        }
    }

    #[test]
    fn test_no_thread_maps_executable_memory() {
        let mmap = nr(libc::SYS_mmap);
        let mprotect = nr(libc::SYS_mprotect);
        let rw = c(libc::PROT_READ | libc::PROT_WRITE);
        let rx = c(libc::PROT_READ | libc::PROT_EXEC);
        for kind in ThreadKind::ALL {
            assert_eq!(verdict(kind, mmap, &[0, 4096, rw]), ALLOW);
            assert_eq!(verdict(kind, mmap, &[0, 4096, rx]), KILL);
            assert_eq!(verdict(kind, mprotect, &[0, 4096, rx]), KILL);
        }
    }

    #[test]
    fn test_api_clone3_gets_enosys_and_clone_only_threads() {
        let program = filter(ThreadKind::Api).unwrap();
        let clone3 = Call::new(nr(libc::SYS_clone3), &[]);
        assert_eq!(
            run(&program, &clone3),
            libc::SECCOMP_RET_ERRNO | u32::try_from(libc::ENOSYS).unwrap()
        );
        let clone = nr(libc::SYS_clone);
        assert_eq!(
            verdict(ThreadKind::Api, clone, &[thread_clone_flags()]),
            ALLOW
        );
        // fork() is clone(SIGCHLD | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID).
        let fork_flags = c(libc::SIGCHLD | libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID);
        assert_eq!(verdict(ThreadKind::Api, clone, &[fork_flags]), KILL);
        // The upper half of the flags word counts too.
        assert_eq!(
            verdict(ThreadKind::Api, clone, &[thread_clone_flags() | (1 << 32)]),
            KILL
        );
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            assert_eq!(verdict(kind, clone, &[thread_clone_flags()]), KILL);
            assert_eq!(verdict(kind, nr(libc::SYS_clone3), &[]), KILL);
        }
    }

    #[test]
    fn test_tgkill_only_kick_from_vmm_and_abort_everywhere() {
        let tgkill = nr(libc::SYS_tgkill);
        let kick = c(crate::vcpu::kick_signal());
        assert_eq!(verdict(ThreadKind::Vmm, tgkill, &[1, 2, kick]), ALLOW);
        assert_eq!(verdict(ThreadKind::Vcpu, tgkill, &[1, 2, kick]), KILL);
        for kind in ThreadKind::ALL {
            assert_eq!(verdict(kind, tgkill, &[1, 2, c(libc::SIGABRT)]), ALLOW);
            assert_eq!(verdict(kind, tgkill, &[1, 2, c(libc::SIGKILL)]), KILL);
        }
    }

    #[test]
    fn test_api_setsockopt_only_timeouts() {
        let setsockopt = nr(libc::SYS_setsockopt);
        let sol = c(libc::SOL_SOCKET);
        assert_eq!(
            verdict(ThreadKind::Api, setsockopt, &[3, sol, SO_RCVTIMEO_OLD]),
            ALLOW
        );
        assert_eq!(
            verdict(ThreadKind::Api, setsockopt, &[3, sol, SO_SNDTIMEO_NEW]),
            ALLOW
        );
        assert_eq!(
            verdict(
                ThreadKind::Api,
                setsockopt,
                &[3, sol, c(libc::SO_REUSEADDR)]
            ),
            KILL
        );
        assert_eq!(
            verdict(
                ThreadKind::Api,
                setsockopt,
                &[3, c(libc::IPPROTO_TCP), SO_RCVTIMEO_OLD]
            ),
            KILL
        );
    }

    #[test]
    fn test_merged_any_wins_over_argument_rules() {
        // fcntl is listed with F_GETFD in the basics and more commands for the VMM; tgkill
        // with SIGABRT and the kick signal: both stay argument-checked, with every value.
        let vmm = merged(ThreadKind::Vmm);
        let fcntl = vmm[&nr(libc::SYS_fcntl)].as_ref().unwrap();
        assert_eq!(fcntl.len(), 5);
        let tgkill = vmm[&nr(libc::SYS_tgkill)].as_ref().unwrap();
        assert_eq!(tgkill.len(), 2);
        assert!(vmm[&nr(libc::SYS_write)].is_none());
    }

    #[test]
    fn test_allowed_syscalls_names_are_real_and_sorted() {
        for kind in ThreadKind::ALL {
            let names = allowed_syscalls(kind);
            assert!(names.windows(2).all(|w| w[0] < w[1]), "{kind}: {names:?}");
            assert!(
                names
                    .iter()
                    .all(|n| !n.starts_with("SYS_") && !n.is_empty())
            );
            assert!(names.contains(&"futex") && names.contains(&"exit_group"));
        }
        assert!(allowed_syscalls(ThreadKind::Vcpu).contains(&"ioctl"));
        assert!(!allowed_syscalls(ThreadKind::Vcpu).contains(&"openat"));
        assert!(!allowed_syscalls(ThreadKind::Api).contains(&"execve"));
    }

    /// The syscalls a CONFINEMENT.md table between `<!-- syscalls:NAME -->` markers lists
    /// (first cell of each row).
    fn doc_table<'a>(doc: &'a str, name: &str) -> Vec<&'a str> {
        let start = format!("<!-- syscalls:{name} -->");
        let end = format!("<!-- /syscalls:{name} -->");
        let from = doc.find(&start).map(|i| i + start.len());
        let to = doc.find(&end);
        let (Some(from), Some(to)) = (from, to) else {
            panic!("CONFINEMENT.md has no {start} ... {end} section");
        };
        doc[from..to]
            .lines()
            .filter_map(|line| line.trim().strip_prefix('|'))
            .filter_map(|row| row.split('|').next())
            .map(|cell| cell.trim().trim_matches('`'))
            .filter(|cell| !cell.is_empty() && *cell != "syscall" && !cell.starts_with('-'))
            .collect()
    }

    /// CONFINEMENT.md's tables (the basics every thread has, plus each kind's own) must list
    /// exactly what the filters allow.
    #[test]
    fn test_confinement_doc_lists_exactly_the_allowlists() {
        let doc = include_str!("../CONFINEMENT.md");
        let basics = doc_table(doc, "basics");
        let mut basics_sorted = basics.clone();
        basics_sorted.sort_unstable();
        let mut code_basics: Vec<&str> = runtime_basics().iter().map(|a| a.name).collect();
        code_basics.sort_unstable();
        assert_eq!(basics_sorted, code_basics, "CONFINEMENT.md, basics");
        for kind in ThreadKind::ALL {
            let mut listed = basics.clone();
            listed.extend(doc_table(doc, kind.name()));
            listed.sort_unstable();
            listed.dedup();
            assert_eq!(listed, allowed_syscalls(kind), "CONFINEMENT.md, {kind}");
        }
    }

    #[test]
    fn test_deny_action_parses_its_display() {
        for deny in [DenyAction::KillProcess, DenyAction::Trap, DenyAction::Log] {
            assert_eq!(deny.to_string().parse::<DenyAction>(), Ok(deny));
        }
        assert!("errno".parse::<DenyAction>().is_err());
        assert_eq!(DenyAction::default(), DenyAction::KillProcess);
    }

    #[test]
    fn test_decimal_formats_like_display() {
        for n in [0, 7, 10, 59, 435, -1, i64::MAX, i64::MIN] {
            let (bytes, len) = decimal(n);
            assert_eq!(std::str::from_utf8(&bytes[..len]).unwrap(), n.to_string());
        }
    }

    proptest! {
        /// A syscall number that is on no list gets the deny action, whatever its arguments.
        #[test]
        fn prop_unlisted_syscalls_are_denied(
            nr in 0i64..1024,
            args in proptest::array::uniform6(any::<u64>()),
        ) {
            for kind in ThreadKind::ALL {
                let listed = merged(kind).contains_key(&nr)
                    || (kind == ThreadKind::Api && nr == libc::SYS_clone3);
                if !listed {
                    let program = filter(kind).unwrap();
                    prop_assert_eq!(run(&program, &Call::new(nr, &args)), KILL);
                }
            }
        }

        /// vCPU ioctls are allowed exactly for the listed request numbers (low 32 bits).
        #[test]
        fn prop_vcpu_ioctl_request_decides(request in any::<u64>(), fd in any::<u64>()) {
            let allowed = merged(ThreadKind::Vcpu)[&nr(libc::SYS_ioctl)]
                .as_ref()
                .unwrap()
                .iter()
                .any(|alt| alt[0].value == request & 0xffff_ffff);
            let got = verdict(ThreadKind::Vcpu, nr(libc::SYS_ioctl), &[fd, request]);
            prop_assert_eq!(got, if allowed { ALLOW } else { KILL });
        }
    }
}
