//! Runs commands where a usable KVM exists: directly, or inside the "host VM".
//!
//! Some machines' /dev/kvm cannot run a Linux guest (PVM, a software hypervisor, emulates guest
//! kernel code ~3000x slower). QEMU's software emulation (TCG) with `-cpu max` offers AMD SVM with
//! nested paging, so Debian's generic kernel with kvm_amd has a real KVM inside it: the host VM
//! (L1). [`decide()`] chooses between running directly and the host VM (probing /dev/kvm,
//! overridable with `WRENN_HOSTVM`); [`run()`] runs a [`CommandSpec`] either way and streams its
//! output.
//!
//! The host VM: QEMU microvm boots the uncompressed kernel (PVH) with a small initramfs (busybox,
//! `init.sh`, the kvm and 9p modules), both built once into the artifact cache
//! ([`artifacts`]). Init mounts the host's root read-only over 9p, the requested writable
//! directories and a per-run directory over 9p, chroots into the host root and runs the command
//! with its argv, cwd and environment read from a file in the per-run directory. Its stdout and
//! stderr go to files there that the host streams while they grow; its exit status is written to
//! another file, so it can never be confused with output. The console goes to a log file whose
//! tail errors quote. QEMU dies with its caller (`setpriv --pdeathsig KILL`, kill on drop);
//! hung boots are killed and retried.
//!
//! On request ([`RunOptions::network`]) the host VM gets a network to the host: QEMU's
//! user-mode networking, with TCP ports of the host forwarded in and the host reachable at
//! [`HOST_ADDRESS_FROM_GUEST`] from inside ([`net`]).

#![forbid(unsafe_code)]

pub mod artifacts;
pub mod cpio;
pub mod decide;
pub mod modules;
mod monitor;
pub mod net;
mod qemu;
mod run;
pub mod spec;

use std::path::PathBuf;
use std::time::Duration;

use wrenn_image::cache::CacheError;
use wrenn_image::command::CommandError;
use wrenn_image::packages::PackagesError;

pub use decide::{Decision, Mode, Placement, decide};
pub use net::{
    HOST_ADDRESS_FROM_GUEST, HOST_ENV, HostVmNetwork, PortForward, free_local_address,
    free_local_port,
};
pub use run::{RunOptions, run};
pub use spec::CommandSpec;

/// Errors from deciding, building the host VM or running a command.
#[derive(Debug, thiserror::Error)]
pub enum HostVmError {
    #[error("{}={value:?} is not one of auto, always, never", decide::MODE_ENV)]
    InvalidMode { value: String },
    #[error("invalid command: {reason}")]
    InvalidSpec { reason: String },
    #[error("invalid host VM network: {reason}")]
    InvalidNetwork { reason: String },
    #[error("cannot find a free TCP port on 127.0.0.1")]
    FreePort {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the host VM needs root: QEMU shares the host's root directory and the command runs as root inside"
    )]
    NotRoot,
    #[error("system packages for the host VM")]
    Packages(#[from] PackagesError),
    #[error("host VM artifact cache")]
    Cache(#[from] CacheError),
    #[error("building the host VM")]
    Tool(#[from] CommandError),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot download the kernel package {package}")]
    Download {
        package: String,
        #[source]
        source: CommandError,
    },
    #[error("host VM kernel: {reason}")]
    Kernel { reason: String },
    #[error("kernel module {name}: {reason}")]
    Module { name: String, reason: String },
    #[error("could not run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU failed ({status}) before the host VM was ready:\n{tail}\n(QEMU log: {})", log.display())]
    QemuFailed {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "the host VM did not boot in {attempts} attempt(s), last: {what}; console:\n{tail}\n(console log: {})",
        console.display()
    )]
    Boot {
        attempts: u32,
        what: String,
        console: PathBuf,
        tail: String,
    },
    #[error("host VM setup failed: {message}\n(console log: {})", console.display())]
    GuestSetup { message: String, console: PathBuf },
    #[error(
        "the host VM stopped without reporting the command's exit status; console:\n{tail}\n(console log: {})",
        console.display()
    )]
    NoExitStatus { console: PathBuf, tail: String },
    #[error("the command did not finish within {timeout:?}; {what} was killed")]
    Timeout { timeout: Duration, what: String },
    #[error(
        "the host VM stalled: {what} ({state}); it was killed (console: {})",
        console.display()
    )]
    Stalled {
        /// What showed the stall.
        what: String,
        /// What QEMU said the VM was doing (details in `stall.txt` beside the console log).
        state: String,
        console: PathBuf,
    },
    #[error("cannot pass on the command's output")]
    Output(#[source] std::io::Error),
}
