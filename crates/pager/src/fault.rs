//! Serving one VM after its handshake: the fault loop and the prefetcher.
//!
//! The fault loop is single-threaded per VM. Each round it polls the userfaultfd, the stop
//! eventfd and the handshake connection, reads a batch of events, applies REMOVE events
//! before serving any fault of the batch (faults can be queued ahead of the remove that
//! explains them), then serves the faults in order:
//!
//! ```text
//!  fault(addr) -> page, offset      (outside every region: the VMM lied, serving fails)
//!     removed[offset]?  -> UFFDIO_ZEROPAGE
//!     source: Zero      -> UFFDIO_ZEROPAGE
//!     source: Data      -> UFFDIO_COPY
//!  outcome: done | EEXIST (wake the page, done) | EAGAIN (defer, read events, retry)
//!           | ENOENT (memory unmapped: drop) | ESRCH (VMM gone: end)
//! ```
//!
//! While faults are deferred the loop polls with a 1 ms timeout instead of blocking, so a
//! retry storm costs at most a thousand rounds a second, never a busy spin.
//!
//! The prefetcher runs on its own thread and installs a recorded page list with the same
//! ioctls. It must not resurrect data in a removed range, so the fault loop holds the
//! `removed` write lock from reading events until their REMOVEs are applied, and the
//! prefetcher holds the read lock from its check to the end of its ioctl: a REMOVE is either
//! still unread (the kernel fails the copy with EAGAIN) or already in the bitmap.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;

use crate::pages::{PageBitmap, TouchLog};
use crate::regions::{PAGE_SIZE, RegionMap};
use crate::source::{PageKind, PageSource, SourceError};
use crate::stats::StatsSink;
use crate::uffd::{Install, ReadEvents, UFFD_MSG_SIZE, Uffd, UffdError, UffdEvent};

/// Retry period while faults wait for a layout change to finish.
const DEFERRED_RETRY: Duration = Duration::from_millis(1);
/// How many times the prefetcher retries one page on EAGAIN before skipping it.
const PREFETCH_AGAIN_ATTEMPTS: u32 = 200;
/// Page-size buffer length.
const PAGE_LEN: usize = 4096;

/// Serving a VM failed; the VM's serving ends in the `Failed` state.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("polling the userfaultfd, stop eventfd and connection")]
    Poll {
        #[source]
        source: Errno,
    },
    #[error("the userfaultfd reports an error (UFFDIO_API not done by the VMM?)")]
    UffdNotReady,
    #[error("userfaultfd operation failed")]
    Uffd {
        #[source]
        source: UffdError,
    },
    #[error("page fault at {address:#x} lies outside every announced region")]
    FaultOutsideRegions { address: u64 },
    #[error(
        "reading the page at offset {offset:#x} (fault at {address:#x}) from the source; \
         the faulting vCPU stays blocked"
    )]
    Source {
        offset: u64,
        address: u64,
        #[source]
        source: SourceError,
    },
}

/// Why serving ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    /// The VMM closed its connection or its process is gone.
    VmmGone,
    /// The owner asked to stop.
    Stopped,
}

/// Everything the fault loop and the prefetcher share for one VM.
#[derive(Clone)]
pub(crate) struct Serving {
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) regions: Arc<RegionMap>,
    pub(crate) source: Arc<dyn PageSource>,
    pub(crate) removed: Arc<RwLock<PageBitmap>>,
    pub(crate) touched: Arc<Mutex<TouchLog>>,
    pub(crate) stats: StatsSink,
}

/// A fault waiting to be served.
#[derive(Debug, Clone, Copy)]
struct PendingFault {
    address: u64,
    received: Instant,
}

/// Result of one install attempt.
enum Served {
    Done,
    Deferred,
    ProcessGone,
}

/// Lets through a few messages per window; for anything a guest or VMM can repeat at will.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    const WINDOW: Duration = Duration::from_secs(10);
    const PER_WINDOW: u32 = 10;

    pub(crate) fn new() -> Self {
        Self {
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// True if this message may be logged; counts the ones that may not.
    pub(crate) fn allow(&mut self) -> bool {
        if self.window_start.elapsed() >= Self::WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "rate-limited messages dropped"
                );
            }
            *self = Self::new();
        }
        self.in_window += 1;
        let allowed = self.in_window <= Self::PER_WINDOW;
        if !allowed {
            self.suppressed += 1;
        }
        allowed
    }
}

impl Serving {
    /// Runs the fault loop until the VMM goes away, `stop` fires, or an error.
    pub(crate) fn fault_loop(
        &self,
        connection: &UnixStream,
        stop: &EventFd,
        events_per_read: usize,
    ) -> Result<EndReason, ServeError> {
        let mut events = vec![0u8; UFFD_MSG_SIZE * events_per_read.max(1)];
        let mut page = vec![0u8; PAGE_LEN];
        let mut pending = VecDeque::new();
        let mut deferred: Vec<PendingFault> = Vec::new();
        let mut limiter = LogLimiter::new();
        loop {
            let timeout = if deferred.is_empty() {
                PollTimeout::NONE
            } else {
                PollTimeout::try_from(DEFERRED_RETRY).unwrap_or(PollTimeout::NONE)
            };
            let (uffd_flags, stop_flags, connection_flags) = {
                let mut fds = [
                    PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                    PollFd::new(connection.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(source) => return Err(ServeError::Poll { source }),
                }
                let revents = |fd: &PollFd<'_>| fd.revents().unwrap_or(PollFlags::empty());
                (revents(&fds[0]), revents(&fds[1]), revents(&fds[2]))
            };
            if !stop_flags.is_empty() {
                return Ok(EndReason::Stopped);
            }
            if uffd_flags.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                return Err(ServeError::UffdNotReady);
            }
            if !connection_flags.is_empty() && drain_connection(connection, &mut limiter) {
                tracing::info!("the VMM closed its connection: serving ends");
                return Ok(EndReason::VmmGone);
            }
            // Read even when only retrying: the REMOVE that caused EAGAIN must be consumed.
            if !uffd_flags.is_empty() || !deferred.is_empty() {
                self.read_events(&mut events, &mut pending, &mut limiter)?;
            }
            pending.extend(deferred.drain(..));
            while let Some(fault) = pending.pop_front() {
                match self.serve_fault(fault, &mut page)? {
                    Served::Done => {}
                    Served::Deferred => deferred.push(fault),
                    Served::ProcessGone => {
                        tracing::info!("the VMM process is gone (ESRCH): serving ends");
                        return Ok(EndReason::VmmGone);
                    }
                }
            }
        }
    }

    /// Reads every pending event; REMOVEs are applied under the write lock before it is
    /// released, faults are queued.
    fn read_events(
        &self,
        buf: &mut [u8],
        pending: &mut VecDeque<PendingFault>,
        limiter: &mut LogLimiter,
    ) -> Result<(), ServeError> {
        loop {
            let mut removed = self.removed.write().unwrap_or_else(PoisonError::into_inner);
            let count = match self.uffd.read_events(buf) {
                Ok(ReadEvents::Messages(count)) => count,
                Ok(ReadEvents::Empty) => return Ok(()),
                Err(source) => return Err(ServeError::Uffd { source }),
            };
            let received = Instant::now();
            for message in buf.chunks_exact(UFFD_MSG_SIZE).take(count) {
                match UffdEvent::parse(message) {
                    UffdEvent::PageFault { address, .. } => {
                        self.stats.fault();
                        pending.push_back(PendingFault { address, received });
                    }
                    UffdEvent::Remove { start, end } => {
                        self.stats.remove_event();
                        for range in self.regions.offset_ranges(start, end) {
                            removed.insert_range(range.start, range.end);
                        }
                        tracing::debug!(start, end, "REMOVE: later faults there get zero pages");
                    }
                    UffdEvent::Unmap { start, end } => {
                        if limiter.allow() {
                            tracing::warn!(start, end, "the VMM unmapped guest memory");
                        }
                    }
                    UffdEvent::Remap { from, to, len } => {
                        if limiter.allow() {
                            tracing::warn!(from, to, len, "the VMM remapped guest memory");
                        }
                    }
                    UffdEvent::Fork { new_fd } => {
                        crate::uffd::close_forked_uffd(new_fd);
                        if limiter.allow() {
                            tracing::warn!("the VMM forked; the child's faults are not served");
                        }
                    }
                    UffdEvent::Unknown { event } => {
                        if limiter.allow() {
                            tracing::warn!(event, "unknown userfaultfd event ignored");
                        }
                    }
                }
            }
            drop(removed);
            if count * UFFD_MSG_SIZE < buf.len() {
                return Ok(());
            }
        }
    }

    fn serve_fault(&self, fault: PendingFault, page: &mut [u8]) -> Result<Served, ServeError> {
        let location =
            self.regions
                .translate(fault.address)
                .ok_or(ServeError::FaultOutsideRegions {
                    address: fault.address,
                })?;
        self.touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(location.offset);
        let removed = self
            .removed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(location.offset);
        let kind = if removed {
            PageKind::Zero
        } else {
            self.source
                .read_page(location.offset, page)
                .map_err(|source| ServeError::Source {
                    offset: location.offset,
                    address: fault.address,
                    source,
                })?
        };
        let outcome = self
            .install(kind, location.host_addr, page)
            .map_err(|source| ServeError::Uffd { source })?;
        Ok(match outcome {
            Install::Done => {
                self.stats.fault_latency(fault.received.elapsed());
                Served::Done
            }
            Install::Exists => {
                self.stats.eexist();
                // The winner may have installed without waking our faulting thread.
                let wake = self.uffd.wake(location.host_addr, PAGE_SIZE);
                self.stats.fault_latency(fault.received.elapsed());
                match wake {
                    Ok(Install::ProcessGone) => Served::ProcessGone,
                    Ok(_) => Served::Done,
                    Err(source) => return Err(ServeError::Uffd { source }),
                }
            }
            Install::Again => {
                self.stats.eagain();
                Served::Deferred
            }
            Install::Vanished => {
                tracing::debug!(
                    address = fault.address,
                    "faulted memory was unmapped: dropped"
                );
                Served::Done
            }
            Install::ProcessGone => Served::ProcessGone,
        })
    }

    /// One install ioctl, counted when it put a page in place.
    fn install(&self, kind: PageKind, host_addr: u64, page: &[u8]) -> Result<Install, UffdError> {
        let outcome = match kind {
            PageKind::Zero => self.uffd.zeropage(host_addr, PAGE_SIZE, true)?,
            PageKind::Data => self.uffd.copy(host_addr, page, true)?,
        };
        if outcome == Install::Done {
            match kind {
                PageKind::Zero => self.stats.zero_page(),
                PageKind::Data => self.stats.copied(PAGE_SIZE),
            }
        }
        Ok(outcome)
    }

    /// Installs `pages` (flat offsets, in order) until done, `stop` is set, or the VMM is gone.
    /// Returns how many pages this call installed.
    pub(crate) fn prefetch(&self, pages: &[u64], stop: &AtomicBool) -> u64 {
        let started = Instant::now();
        let mut page = vec![0u8; PAGE_LEN];
        let mut installed = 0u64;
        let mut skipped = 0u64;
        for &offset in pages {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Some(host_addr) = self.regions.host_address(offset) else {
                skipped += 1;
                continue;
            };
            let kind = match self.source.read_page(offset, &mut page) {
                Ok(kind) => kind,
                Err(error) => {
                    tracing::warn!(offset, error = %error_chain(&error), "prefetch stops: source read failed");
                    break;
                }
            };
            match self.prefetch_one(kind, offset, host_addr, &page, stop) {
                Ok(true) => installed += 1,
                Ok(false) => skipped += 1,
                Err(()) => break,
            }
        }
        tracing::info!(
            installed,
            skipped,
            listed = pages.len(),
            elapsed_ms = started.elapsed().as_millis(),
            "prefetch finished"
        );
        installed
    }

    /// Ok(true): installed; Ok(false): skipped; Err: stop prefetching.
    fn prefetch_one(
        &self,
        kind: PageKind,
        offset: u64,
        host_addr: u64,
        page: &[u8],
        stop: &AtomicBool,
    ) -> Result<bool, ()> {
        for _ in 0..PREFETCH_AGAIN_ATTEMPTS {
            let outcome = {
                let removed = self.removed.read().unwrap_or_else(PoisonError::into_inner);
                if removed.contains(offset) {
                    return Ok(false);
                }
                self.install(kind, host_addr, page)
            };
            match outcome {
                Ok(Install::Done) => {
                    self.stats.prefetched();
                    return Ok(true);
                }
                Ok(Install::Exists) => {
                    self.stats.eexist();
                    return Ok(false);
                }
                Ok(Install::Again) => {
                    self.stats.eagain();
                    if stop.load(Ordering::Relaxed) {
                        return Err(());
                    }
                    std::thread::sleep(DEFERRED_RETRY);
                }
                Ok(Install::Vanished) => return Ok(false),
                Ok(Install::ProcessGone) => return Err(()),
                Err(error) => {
                    tracing::warn!(offset, error = %error_chain(&error), "prefetch stops");
                    return Err(());
                }
            }
        }
        Ok(false)
    }
}

/// Handles readiness on the handshake connection after the handshake. Returns true when the
/// VMM hung up. Anything it sends is discarded (descriptors closed): the protocol has no
/// second message.
fn drain_connection(connection: &UnixStream, limiter: &mut LogLimiter) -> bool {
    use nix::sys::socket::{MsgFlags, recvmsg};
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;

    let mut scratch = [0u8; 4096];
    let mut cmsg = crate::handshake::descriptor_buffer();
    let mut iov = [IoSliceMut::new(&mut scratch)];
    let received = recvmsg::<()>(
        connection.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    );
    match received {
        Ok(message) => {
            // Dropping the descriptors closes them.
            let descriptors =
                crate::handshake::take_descriptors(&message).map_or(0, |fds| fds.len());
            if message.bytes == 0 {
                // End of stream: the VMM closed the connection or exited.
                return true;
            }
            if limiter.allow() {
                tracing::warn!(
                    bytes = message.bytes,
                    descriptors,
                    "unexpected data from the VMM after the handshake: discarded"
                );
            }
            false
        }
        Err(Errno::EAGAIN | Errno::EINTR) => false,
        Err(error) => {
            tracing::info!(%error, "the VMM connection failed: serving ends");
            true
        }
    }
}

/// `error` and its sources, joined with ": ".
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
