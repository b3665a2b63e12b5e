//! The VMM's half of lazy restore through userfaultfd, following Firecracker's handshake.
//!
//! Guest RAM is mapped anonymous and registered with a userfaultfd (MISSING mode: the first
//! touch of every page, by the guest through KVM or by the VMM itself, waits for the page
//! server). The VMM connects to the page server's unix socket and sends, in one `sendmsg`,
//! the JSON list of regions with the userfaultfd attached (SCM_RIGHTS). Nothing else is said.
//!
//! Unlike Firecracker, the VMM keeps the connection and watches it: the page server holds its
//! end open for as long as it serves the VM, so end-of-file means it is gone. The page server
//! may come back (the agent that runs it in-process restarted), so the VMM then reconnects to
//! the same socket path and sends the same handshake again, retrying for a grace period
//! ([`UffdBackend::watch`]). Meanwhile faulting vCPUs simply wait. After a reconnect the VMM
//! wakes every waiter on the userfaultfd (`UFFDIO_WAKE` over guest RAM): faults the dead page
//! server had read but not served are then raised again, for the new one to see. Pages that
//! were installed before stay installed (the new server's copy of them fails with `EEXIST`,
//! which it treats as done). Only when the grace runs out does the VM stop, with an error,
//! instead of hanging.
//!
//! How the VMM ends matters while faults wait: a guest with KVM async page faults leaves a
//! missing page to a kernel worker that sleeps in the userfaultfd, deaf to signals, and
//! destroying the VM waits for that worker. So the userfaultfd is closed after the vCPUs stop
//! and before the VM goes ([`Controller::shutdown`](crate::controller::Controller::shutdown)),
//! and it sits at a high descriptor number so that an abrupt exit closes it first too.
//!
//! The watching runs on its own thread (`wrenn-uffd`, seccomp kind
//! [`ThreadKind::Pager`](crate::seccomp::ThreadKind::Pager)), not on the event loop: the VMM
//! thread touches guest memory when it emulates devices, and would itself be stuck on a
//! missing page while the page server is away.

use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

use crate::memory::{GuestMemory, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("creating the userfaultfd: {0}")]
    Create(std::io::Error),
    #[error("userfaultfd API handshake: {0}")]
    Api(std::io::Error),
    #[error("registering guest memory at {addr:#x} ({len} bytes) with the userfaultfd: {source}")]
    Register {
        addr: usize,
        len: usize,
        source: std::io::Error,
    },
    #[error("connecting to the page server at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("sending the userfaultfd to the page server at {path}: {source}")]
    Send {
        path: String,
        source: std::io::Error,
    },
}

/// One guest RAM region as the page server sees it (Firecracker's `GuestRegionUffdMapping`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionMapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    /// Where the region starts in the flat memory range (the memory file's offsets).
    pub offset: u64,
    pub page_size: u64,
    /// Deprecated in Firecracker and, despite the name, in bytes; still sent.
    pub page_size_kib: u64,
}

const UFFD_API: u64 = 0xaa;
const UFFDIO: u32 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRange {
    start: u64,
    len: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);

/// The `UFFDIO_WAKE` request number, for the page-server thread's seccomp filter.
pub(crate) fn uffdio_wake_request() -> u64 {
    UFFDIO_WAKE()
}

/// What the VMM says after a page server hung up: the message `wrenn-vmm` exits with.
pub const PAGE_SERVER_GONE: &str = "the page server serving guest memory went away";

/// The regions of `mem` as the handshake describes them.
pub fn region_mappings(mem: &GuestMemory) -> Vec<RegionMapping> {
    let mut offset = 0;
    mem.iter()
        .map(|region| {
            let mapping = RegionMapping {
                base_host_virt_addr: region.as_ptr() as u64,
                size: region.len(),
                offset,
                page_size: PAGE_SIZE as u64,
                page_size_kib: PAGE_SIZE as u64,
            };
            offset += region.len();
            mapping
        })
        .collect()
}

/// A registered userfaultfd and the live connection to the page server serving it, with what
/// it takes to connect again.
#[derive(Debug)]
pub struct UffdBackend {
    /// Kept so that a page server that dies leaves faults pending (the VMM notices through
    /// `connection`) rather than silently turning into zero-filled memory.
    pub uffd: Arc<OwnedFd>,
    pub connection: UnixStream,
    /// The page server's socket, connected to again after a hang-up.
    pub socket: PathBuf,
    /// The handshake's JSON (the regions), sent again on every reconnect.
    handshake: Vec<u8>,
    /// Guest RAM as (start, length) in this process, for `UFFDIO_WAKE` after a reconnect.
    ranges: Vec<(u64, u64)>,
}

/// Creates a userfaultfd over all of `mem` (which nothing has touched yet) and hands it to
/// the page server listening at `socket`.
pub fn connect(mem: &GuestMemory, socket: &Path) -> Result<UffdBackend, UffdError> {
    let uffd = to_high_descriptor(create()?);
    for region in mem.iter() {
        register(&uffd, region.as_ptr() as usize, usize_of(region.len()))?;
    }
    let handshake = serde_json::to_vec(&region_mappings(mem)).expect("plain numbers serialize");
    let connection = send_handshake(socket, &handshake, &uffd)?;
    Ok(UffdBackend {
        uffd: Arc::new(uffd),
        connection,
        socket: socket.to_owned(),
        handshake,
        ranges: mem
            .iter()
            .map(|region| (region.as_ptr() as u64, region.len()))
            .collect(),
    })
}

/// Connects to the page server at `socket` and sends it the regions with the userfaultfd.
fn send_handshake(
    socket: &Path,
    handshake: &[u8],
    uffd: &OwnedFd,
) -> Result<UnixStream, UffdError> {
    let path = socket.display().to_string();
    let connection = UnixStream::connect(socket).map_err(|source| UffdError::Connect {
        path: path.clone(),
        source,
    })?;
    connection
        .send_with_fd(handshake, uffd.as_raw_fd())
        .map_err(|e| UffdError::Send {
            path,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    Ok(connection)
}

/// The first wait between reconnect attempts; it doubles up to [`MAX_RETRY_INTERVAL`].
const FIRST_RETRY_INTERVAL: Duration = Duration::from_millis(100);
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long the VMM thread gets to stop the VM cleanly after the page server is given up.
const FORCED_EXIT_AFTER: Duration = Duration::from_secs(5);

impl UffdBackend {
    /// Watches the page server's connection on a new thread (`wrenn-uffd`) for the rest of
    /// the VM's life. On a hang-up it reconnects to the same socket path with the same
    /// handshake, retrying for `grace` (zero: not at all), then wakes every faulting thread so
    /// the new server sees their faults. If no page server takes the VM within `grace`,
    /// `gone` is called once with the reason; if the process still runs
    /// [`FORCED_EXIT_AFTER`] later (its VMM thread stuck on a missing page), the thread ends
    /// it with status 1. The userfaultfd stays open meanwhile (the caller holds
    /// [`UffdBackend::uffd`]), so guest memory never silently reads as zero.
    ///
    /// The thread installs its own seccomp filter (`seccomp`, when given) before anything
    /// else; call this after the jail is in place so the thread is born inside it.
    pub fn watch(
        self,
        grace: Duration,
        seccomp: Option<crate::seccomp::DenyAction>,
        gone: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("wrenn-uffd".into())
            .spawn(move || {
                if let Some(action) = seccomp
                    && let Err(e) =
                        crate::seccomp::apply_with(crate::seccomp::ThreadKind::Pager, action)
                {
                    gone(format!("page server thread: {e}"));
                    return;
                }
                let reason = self.serve(grace);
                gone(reason.clone());
                // The VMM thread may itself be waiting on a missing page (device emulation
                // reads guest memory) and never see the report: end the process from here.
                std::thread::sleep(FORCED_EXIT_AFTER);
                eprintln!("wrenn-vmm: {reason}");
                std::process::exit(1);
            })
            .map(drop)
    }

    /// Waits for hang-ups and reconnects; returns why it gave up.
    fn serve(mut self, grace: Duration) -> String {
        let socket = self.socket.display().to_string();
        loop {
            wait_for_hang_up(&mut self.connection);
            if grace.is_zero() {
                tracing::error!(%socket, "the page server closed its connection; stopping the VM");
                return format!("{PAGE_SERVER_GONE} ({socket} hung up)");
            }
            tracing::warn!(
                %socket,
                grace_secs = grace.as_secs_f64(),
                "the page server closed its connection; reconnecting (faulting vCPUs wait)"
            );
            match self.reconnect(grace) {
                Ok(connection) => self.connection = connection,
                Err(last) => {
                    tracing::error!(
                        %socket,
                        error = %last,
                        grace_secs = grace.as_secs_f64(),
                        "no page server took the VM back in time; stopping the VM"
                    );
                    return format!(
                        "{PAGE_SERVER_GONE}: no page server on {socket} within {}s ({last})",
                        grace.as_secs()
                    );
                }
            }
        }
    }

    /// Connects and hands over the userfaultfd again, retrying until `grace` has passed.
    fn reconnect(&self, grace: Duration) -> Result<UnixStream, UffdError> {
        let deadline = Instant::now() + grace;
        let mut interval = FIRST_RETRY_INTERVAL;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match send_handshake(&self.socket, &self.handshake, &self.uffd) {
                Ok(connection) => {
                    self.wake_all();
                    tracing::info!(
                        socket = %self.socket.display(),
                        attempt,
                        "page server reconnected; guest memory is served again"
                    );
                    return Ok(connection);
                }
                Err(e) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tracing::warn!(
                        socket = %self.socket.display(),
                        attempt,
                        error = %e,
                        left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                        "page server not back yet"
                    );
                    if left.is_zero() {
                        return Err(e);
                    }
                    std::thread::sleep(interval.min(left));
                    interval = (interval * 2).min(MAX_RETRY_INTERVAL);
                }
            }
        }
    }

    /// Wakes every thread waiting on a missing page, without installing one: each retries its
    /// access and, if the page is still missing, queues a new fault for the new page server.
    fn wake_all(&self) {
        for &(start, len) in &self.ranges {
            let mut range = UffdioRange { start, len };
            // SAFETY: UFFDIO_WAKE reads one `uffdio_range` (repr(C), same layout) and only
            // wakes threads; the range is guest RAM registered on this userfaultfd.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(&*self.uffd, UFFDIO_WAKE(), &mut range)
            };
            if ret != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    start,
                    len,
                    "waking faulting threads after the page server came back"
                );
            }
        }
    }
}

/// Returns when the page server's end of `connection` is gone (end-of-file or an error). It
/// never sends anything; whatever arrives is discarded. The connection is blocking (as
/// `UnixStream::connect` made it).
fn wait_for_hang_up(connection: &mut UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match connection.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading the page server connection");
                return;
            }
        }
    }
}

/// Moves `fd` to a descriptor number above every KVM descriptor (best effort: unchanged if
/// the open-files limit leaves no room).
///
/// Why: when the process ends with guest faults still unserved (the page server gone and the
/// VMM thread itself stuck on a missing page, so [`UffdBackend::watch`] ends the process
/// without the orderly [`Controller::shutdown`](crate::controller::Controller::shutdown)), a
/// KVM async-page-fault worker may be asleep in this userfaultfd. Destroying the VM waits for
/// that worker, which only closing the userfaultfd wakes. The kernel closes an exiting
/// process's files in reverse order of their numbers (last queued, first released), so a
/// userfaultfd numbered above the VM and vCPU descriptors is released first and the VM's
/// destruction no longer waits forever. The guest never runs again at that point.
fn to_high_descriptor(fd: OwnedFd) -> OwnedFd {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit`, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return fd;
    }
    // Far above the VMM's few dozen descriptors, yet a small descriptor table; room left
    // below a low limit for what the VMM opens later.
    let Ok(lowest) = i32::try_from(limit.rlim_cur.saturating_sub(64).min(1024)) else {
        return fd;
    };
    if lowest <= fd.as_raw_fd() {
        return fd;
    }
    // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor for the file `fd` refers to.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, lowest) };
    if high < 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            lowest,
            "keeping the userfaultfd at its first descriptor number"
        );
        return fd;
    }
    // SAFETY: the kernel just returned `high` as a new descriptor that nothing else owns;
    // dropping `fd` closes only the old number.
    unsafe { OwnedFd::from_raw_fd(high) }
}

fn create() -> Result<OwnedFd, UffdError> {
    // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd).map_err(|_| UffdError::Create(std::io::Error::other("bad fd")))?;
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which `api` is (repr(C),
    // same layout), on the userfaultfd we own.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, UFFDIO_API(), &mut api) };
    if ret != 0 {
        return Err(UffdError::Api(std::io::Error::last_os_error()));
    }
    Ok(uffd)
}

fn register(uffd: &OwnedFd, addr: usize, len: usize) -> Result<(), UffdError> {
    let mut reg = UffdioRegister {
        start: addr as u64,
        len: len as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one `uffdio_register` (repr(C), same
    // layout); the range is guest RAM that this process mapped and keeps mapped.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(uffd, UFFDIO_REGISTER(), &mut reg) };
    if ret != 0 {
        return Err(UffdError::Register {
            addr,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("x86_64: u64 fits in usize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_region_mappings_offsets_are_running_sums() {
        let mem = crate::memory::create(4096 + 64, false).unwrap();
        let maps = region_mappings(&mem);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].offset, 0);
        assert_eq!(maps[1].offset, maps[0].size);
        assert_eq!(maps[0].size + maps[1].size, (4096 + 64) << 20);
        let json = serde_json::to_string(&maps[0]).unwrap();
        assert!(json.contains("\"page_size\":4096"), "{json}");
        assert!(json.contains("\"page_size_kib\":4096"), "{json}");
    }

    #[test]
    fn test_connect_to_missing_socket_names_it() {
        let mem = crate::memory::create(16, false).unwrap();
        let err = connect(&mem, Path::new("/nonexistent/pager.sock")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/pager.sock"), "{err}");
    }
}
