//! Serving one VM after its handshake: the fault loop, fault-around and the prefetcher.
//!
//! The fault loop is single-threaded per VM. Each round it polls the userfaultfd, the stop
//! eventfd and the handshake connection, reads a batch of events, applies REMOVE events
//! before serving any fault of the batch (faults can be queued ahead of the remove that
//! explains them), then serves the faults in order.
//!
//! # Fault-around
//!
//! A fault costs the guest far more than the pager's work for it (about a millisecond end to
//! end under nested virtualization, most of it in the kernel and the hypervisors), so the
//! pager answers a fault with the whole aligned window around it (`fault_around` pages of the
//! flat offset space, clipped to the faulting page's region), minus the pages already in
//! place or removed. Each maximal run of what is left is one ioctl:
//!
//! ```text
//!  window (16 pages)  |<-------- aligned in the offset space, clipped to the region ------->|
//!  pages              |  .  .  I  I  .  .  .  F  .  .  .  .  R  R  .  .  |  I installed (bitmap)
//!  runs               | [0,2)       [4,              12)     [14,16)    |  R removed, F faulting
//!  order              F's run first (its ioctl wakes the vCPU), then the others
//!  one run            every page zero -> one UFFDIO_ZEROPAGE of the run
//!                     otherwise       -> one UFFDIO_COPY (zero pages in it copied as zeros)
//!  F's run outcome    done, or partial past F          : served
//!                     partial short of F, EEXIST, ENOENT, error, neighbour unreadable
//!                                                      : F alone, as below
//!                     EAGAIN (nothing installed)       : defer the fault, retry the window
//! ```
//!
//! The faulting page alone (fault-around 1, a run of one page, or the fallback):
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
//! The installed bitmap is a hint that only shapes windows: the faulting page is always
//! answered by an install attempt (EEXIST then wakes it), so a wrong bit can never leave a
//! vCPU asleep, and the kernel never overwrites a present page, so a stale bit for a
//! neighbour costs at most a partial copy.
//!
//! While faults are deferred the loop polls with a 1 ms timeout instead of blocking, so a
//! retry storm costs at most a thousand rounds a second, never a busy spin.
//!
//! # Prefetch and recording
//!
//! The prefetcher runs on its own thread and installs a recorded page list with the same
//! ioctls, consecutive pages of the list as one run (up to 64 pages). It must not resurrect
//! data in a removed range, so the fault loop holds the `removed` write lock from reading
//! events until their REMOVEs are applied, and the prefetcher holds the read lock from its
//! check to the end of its ioctl: a REMOVE is either still unread (the kernel fails the copy
//! with EAGAIN) or already in the bitmap. Fault-around needs no such care: it runs on the
//! fault loop's own thread, after the REMOVEs read so far were applied.
//!
//! The touch log records what was installed on demand, in install order: each faulting page
//! and the pages of its window (ascending). That is the set a later VM of the same build
//! needs prefetched, since pages fault-around put in place never fault themselves.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;

use crate::pages::{PageBitmap, TouchLog};
use crate::regions::{PAGE_SIZE, PageLocation, Region, RegionMap};
use crate::source::{PageKind, PageSource, SourceError, is_all_zero};
use crate::stats::StatsSink;
use crate::uffd::{Install, ReadEvents, UFFD_MSG_SIZE, Uffd, UffdError, UffdEvent};

/// Fault-around window unless configured otherwise: 16 pages, 64 KiB.
pub const DEFAULT_FAULT_AROUND_PAGES: u64 = 16;
/// Largest fault-around window (2 MiB); bounds the fault loop's read buffer.
pub const MAX_FAULT_AROUND_PAGES: u64 = 512;
/// Most consecutive listed pages the prefetcher installs with one ioctl (256 KiB).
const PREFETCH_RUN_PAGES: u64 = 64;
/// Retry period while faults wait for a layout change to finish.
const DEFERRED_RETRY: Duration = Duration::from_millis(1);
/// How many times the prefetcher retries one run on EAGAIN before skipping it.
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
    pub(crate) installed: Arc<InstalledPages>,
    pub(crate) touched: Arc<Mutex<TouchLog>>,
    pub(crate) stats: StatsSink,
    /// Fault-around window in pages (1: the faulting page alone).
    pub(crate) fault_around: u64,
}

/// One bit per page of the flat range, set once the page is known to be in place. Shared by
/// the fault loop and the prefetcher without a lock: every update is an atomic OR or AND of
/// whole words, and a reader seeing an old value only costs an ioctl that finds the page.
#[derive(Debug, Default)]
pub(crate) struct InstalledPages {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl InstalledPages {
    /// Nothing installed, over `pages` pages.
    pub(crate) fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Whether the page holding `offset` is marked (false outside the range).
    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.word(offset / PAGE_SIZE)
            .is_some_and(|(word, bit)| word.load(Ordering::Relaxed) & bit != 0)
    }

    /// Marks the pages of `[start, end)` (page-aligned byte offsets), clipped to the range.
    pub(crate) fn insert_range(&self, start: u64, end: u64) {
        self.update(start, end, |word, mask| {
            word.fetch_or(mask, Ordering::Relaxed);
        });
    }

    /// Clears the pages of `[start, end)` (page-aligned byte offsets), clipped to the range.
    pub(crate) fn remove_range(&self, start: u64, end: u64) {
        self.update(start, end, |word, mask| {
            word.fetch_and(!mask, Ordering::Relaxed);
        });
    }

    fn update(&self, start: u64, end: u64, apply: impl Fn(&AtomicU64, u64)) {
        for (word, mask) in crate::pages::word_masks(start, end, self.pages) {
            if let Some(word) = self.words.get(word) {
                apply(word, mask);
            }
        }
    }

    fn word(&self, page: u64) -> Option<(&AtomicU64, u64)> {
        if page >= self.pages {
            return None;
        }
        let word = self.words.get(usize::try_from(page / 64).ok()?)?;
        Some((word, 1u64 << (page % 64)))
    }
}

/// The aligned window of `pages` pages (clamped to `1..=MAX_FAULT_AROUND_PAGES`) holding the
/// page at flat `offset`, clipped to `region` (which holds `offset`).
pub(crate) fn fault_window(offset: u64, region: &Region, pages: u64) -> Range<u64> {
    let span = pages.clamp(1, MAX_FAULT_AROUND_PAGES) * PAGE_SIZE;
    let page = offset - offset % PAGE_SIZE;
    let aligned = page - page % span;
    let region_end = region.offset.saturating_add(region.size);
    aligned.max(region.offset)..aligned.saturating_add(span).min(region_end)
}

/// Splits `window` into the maximal runs of pages to install: every page but those `skip`
/// marks (in place or removed), and always the page at `fault`. The run holding `fault`
/// comes first, the others follow in offset order.
pub(crate) fn window_runs(
    window: Range<u64>,
    fault: u64,
    skip: impl Fn(u64) -> bool,
) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut open: Option<u64> = None;
    let mut offset = window.start;
    while offset < window.end {
        let wanted = offset == fault || !skip(offset);
        match (wanted, open) {
            (true, None) => open = Some(offset),
            (false, Some(start)) => {
                runs.push(start..offset);
                open = None;
            }
            _ => {}
        }
        offset += PAGE_SIZE;
    }
    if let Some(start) = open {
        runs.push(start..window.end);
    }
    if let Some(index) = runs.iter().position(|run| run.contains(&fault)) {
        let run = runs.remove(index);
        runs.insert(0, run);
    }
    runs
}

/// The region holding host address `host_addr`.
fn region_of(regions: &RegionMap, host_addr: u64) -> Option<Region> {
    let sorted = regions.regions();
    let after = sorted.partition_point(|r| r.base <= host_addr);
    let region = sorted.get(after.checked_sub(1)?)?;
    (host_addr - region.base < region.size).then_some(*region)
}

/// Byte length of a run of pages, as a buffer length.
fn run_len(run: &Range<u64>) -> Option<usize> {
    usize::try_from(run.end.checked_sub(run.start)?).ok()
}

/// A fault waiting to be served.
#[derive(Debug, Clone, Copy)]
struct PendingFault {
    address: u64,
    received: Instant,
}

/// Result of serving one fault.
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
        let window_pages =
            usize::try_from(self.fault_around.clamp(1, MAX_FAULT_AROUND_PAGES)).unwrap_or(1);
        let mut buf = vec![0u8; PAGE_LEN * window_pages];
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
                match self.serve_fault(fault, &mut buf, &mut limiter)? {
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
                            self.installed.remove_range(range.start, range.end);
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

    /// Serves one fault: its window's run first, then the window's other runs.
    fn serve_fault(
        &self,
        fault: PendingFault,
        buf: &mut [u8],
        limiter: &mut LogLimiter,
    ) -> Result<Served, ServeError> {
        let outside = || ServeError::FaultOutsideRegions {
            address: fault.address,
        };
        let location = self.regions.translate(fault.address).ok_or_else(outside)?;
        let region = region_of(&self.regions, location.host_addr).ok_or_else(outside)?;
        // Held to the end: only this thread takes the write lock, between faults.
        let removed = self.removed.read().unwrap_or_else(PoisonError::into_inner);
        let fault_removed = removed.contains(location.offset);
        let window = fault_window(location.offset, &region, self.fault_around);
        let runs = window_runs(window, location.offset, |offset| {
            removed.contains(offset) || self.installed.contains(offset)
        });
        let (first, others) = match runs.split_first() {
            Some((first, others)) if first.contains(&location.offset) => (first.clone(), others),
            // Not reachable (the window holds the faulting page); serve it alone.
            _ => (location.offset..location.offset + PAGE_SIZE, &[][..]),
        };
        let served = if first.end - first.start == PAGE_SIZE {
            self.serve_single(fault, location, fault_removed, buf)?
        } else {
            self.serve_run(fault, location, fault_removed, &first, buf, limiter)?
        };
        if !matches!(served, Served::Done) {
            return Ok(served);
        }
        for run in others {
            if !self.install_around(run, &region, buf, limiter) {
                return Ok(Served::ProcessGone);
            }
        }
        Ok(Served::Done)
    }

    /// The faulting page alone, as without fault-around.
    fn serve_single(
        &self,
        fault: PendingFault,
        location: PageLocation,
        fault_removed: bool,
        buf: &mut [u8],
    ) -> Result<Served, ServeError> {
        self.record(location.offset, 1);
        let run = location.offset..location.offset + PAGE_SIZE;
        let Some(page) = buf.get_mut(..PAGE_LEN) else {
            // The fault loop's buffer always holds a page; nothing to serve from otherwise.
            return Ok(Served::Deferred);
        };
        let kind = if fault_removed {
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
        let (outcome, _) = self
            .install_run(&run, location.host_addr, kind == PageKind::Zero, page)
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
            // A one-page install is never partial; if it were, the retry settles it.
            Install::Again | Install::Partial { .. } => {
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

    /// The run of the window that holds the faulting page, in one ioctl; the faulting page
    /// alone when that does not put it in place.
    fn serve_run(
        &self,
        fault: PendingFault,
        location: PageLocation,
        fault_removed: bool,
        run: &Range<u64>,
        buf: &mut [u8],
        limiter: &mut LogLimiter,
    ) -> Result<Served, ServeError> {
        let host_start = location.host_addr - (location.offset - run.start);
        let Some(data) = run_len(run).and_then(|len| buf.get_mut(..len)) else {
            return self.serve_single(fault, location, fault_removed, buf);
        };
        let zeroed = fault_removed.then_some(location.offset);
        let all_zero = match self.read_run(run, data, zeroed) {
            Ok(all_zero) => all_zero,
            Err((offset, source)) if offset == location.offset => {
                return Err(ServeError::Source {
                    offset,
                    address: fault.address,
                    source,
                });
            }
            Err((offset, error)) => {
                if limiter.allow() {
                    tracing::warn!(
                        offset,
                        error = %error_chain(&error),
                        "reading a page around a fault failed; serving the faulting page alone"
                    );
                }
                return self.serve_single(fault, location, fault_removed, buf);
            }
        };
        let (outcome, pages) = match self.install_run(run, host_start, all_zero, data) {
            Ok(result) => result,
            Err(error) => {
                if limiter.allow() {
                    tracing::warn!(
                        error = %error_chain(&error),
                        "installing a fault-around run failed; serving the faulting page alone"
                    );
                }
                return self.serve_single(fault, location, fault_removed, buf);
            }
        };
        self.record(run.start, pages);
        let fault_index = (location.offset - run.start) / PAGE_SIZE;
        match outcome {
            Install::Done | Install::Partial { .. } if fault_index < pages => {
                self.stats.around(pages - 1);
                self.stats.fault_latency(fault.received.elapsed());
                Ok(Served::Done)
            }
            Install::Partial { .. } => {
                self.stats.around(pages);
                self.serve_single(fault, location, fault_removed, buf)
            }
            Install::Again => {
                self.stats.eagain();
                Ok(Served::Deferred)
            }
            Install::Exists => {
                self.stats.eexist();
                self.serve_single(fault, location, fault_removed, buf)
            }
            Install::Done | Install::Vanished => {
                self.serve_single(fault, location, fault_removed, buf)
            }
            Install::ProcessGone => Ok(Served::ProcessGone),
        }
    }

    /// A run of the window without the faulting page: best effort, since anything it does not
    /// install faults later and is served then. Returns false when the VMM is gone.
    fn install_around(
        &self,
        run: &Range<u64>,
        region: &Region,
        buf: &mut [u8],
        limiter: &mut LogLimiter,
    ) -> bool {
        let Some(data) = run_len(run).and_then(|len| buf.get_mut(..len)) else {
            return true;
        };
        let all_zero = match self.read_run(run, data, None) {
            Ok(all_zero) => all_zero,
            Err((offset, error)) => {
                if limiter.allow() {
                    tracing::warn!(
                        offset,
                        error = %error_chain(&error),
                        "reading a page around a fault failed; it is served when it faults"
                    );
                }
                return true;
            }
        };
        let host_start = region.base + (run.start - region.offset);
        match self.install_run(run, host_start, all_zero, data) {
            Ok((Install::ProcessGone, _)) => false,
            Ok((_, pages)) => {
                self.record(run.start, pages);
                self.stats.around(pages);
                true
            }
            Err(error) => {
                if limiter.allow() {
                    tracing::warn!(
                        error = %error_chain(&error),
                        "installing a fault-around run failed; its pages are served when they fault"
                    );
                }
                true
            }
        }
    }

    /// Reads the pages of `run` into `data` (the run's length), zero-filling those the source
    /// reports as zero and `zeroed` (a removed faulting page, never read). Returns whether
    /// every page is zero, or the offset whose read failed.
    fn read_run(
        &self,
        run: &Range<u64>,
        data: &mut [u8],
        zeroed: Option<u64>,
    ) -> Result<bool, (u64, SourceError)> {
        let mut all_zero = true;
        let offsets = (run.start..run.end).step_by(PAGE_LEN);
        for (offset, page) in offsets.zip(data.chunks_exact_mut(PAGE_LEN)) {
            let kind = if zeroed == Some(offset) {
                PageKind::Zero
            } else {
                self.source
                    .read_page(offset, page)
                    .map_err(|error| (offset, error))?
            };
            match kind {
                // A zero page's buffer is not necessarily filled; it is copied with the run.
                PageKind::Zero => page.fill(0),
                PageKind::Data => all_zero = false,
            }
        }
        Ok(all_zero)
    }

    /// Installs `run` (flat offsets, `data` its bytes) at `host_addr` with one ioctl,
    /// `UFFDIO_ZEROPAGE` when `all_zero`, else `UFFDIO_COPY`, waking waiters. Counts and marks
    /// what it put in place; returns the outcome and that page count.
    fn install_run(
        &self,
        run: &Range<u64>,
        host_addr: u64,
        all_zero: bool,
        data: &[u8],
    ) -> Result<(Install, u64), UffdError> {
        let len = run.end - run.start;
        let outcome = if all_zero {
            self.uffd.zeropage(host_addr, len, true)?
        } else {
            self.uffd.copy(host_addr, data, true)?
        };
        let bytes = match outcome {
            Install::Done => len,
            Install::Partial { bytes } => bytes.min(len),
            _ => 0,
        };
        let pages = bytes / PAGE_SIZE;
        if pages > 0 {
            self.installed
                .insert_range(run.start, run.start + pages * PAGE_SIZE);
            if all_zero {
                self.stats.zero_pages(pages);
            } else {
                self.stats.copied(pages, pages * PAGE_SIZE);
            }
        }
        if outcome == Install::Exists {
            // The first page is there; for a one-page run, that is all of it.
            self.installed
                .insert_range(run.start, run.start + PAGE_SIZE);
        }
        Ok((outcome, pages))
    }

    /// Records `pages` pages from `start` as installed on demand.
    fn record(&self, start: u64, pages: u64) {
        let mut touched = self.touched.lock().unwrap_or_else(PoisonError::into_inner);
        for index in 0..pages {
            touched.record(start + index * PAGE_SIZE);
        }
    }

    /// Installs `pages` (flat offsets, in order; consecutive ones as one run) until done,
    /// `stop` is set, or the VMM is gone. Returns how many pages this call installed.
    pub(crate) fn prefetch(&self, pages: &[u64], stop: &AtomicBool) -> u64 {
        let started = Instant::now();
        let run_pages = usize::try_from(PREFETCH_RUN_PAGES).unwrap_or(1);
        let mut buf = vec![0u8; PAGE_LEN * run_pages];
        let mut installed = 0u64;
        let mut skipped = 0u64;
        let mut index = 0;
        while let Some(listed) = pages.get(index..)
            && !listed.is_empty()
        {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Some((run, host_addr)) = self.next_prefetch_run(listed, run_pages) else {
                skipped += 1;
                index += 1;
                continue;
            };
            let count = (run.end - run.start) / PAGE_SIZE;
            index += usize::try_from(count).unwrap_or(1).max(1);
            let Some(data) = run_len(&run).and_then(|len| buf.get_mut(..len)) else {
                skipped += count;
                continue;
            };
            let all_zero = match self.read_run(&run, data, None) {
                Ok(all_zero) => all_zero,
                Err((offset, error)) => {
                    tracing::warn!(offset, error = %error_chain(&error), "prefetch stops: source read failed");
                    break;
                }
            };
            match self.prefetch_run(&run, host_addr, all_zero, data, stop) {
                Ok(done) => {
                    installed += done;
                    skipped += count.saturating_sub(done);
                }
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

    /// The run the prefetcher installs next from the head of `listed`: the leading entries
    /// that are consecutive pages of one region, none known to be in place (at most
    /// `max_pages`), with the host address of the first. `None` when the first entry is
    /// unaligned, outside every region or already in place: skip it.
    fn next_prefetch_run(&self, listed: &[u64], max_pages: usize) -> Option<(Range<u64>, u64)> {
        let first = *listed.first()?;
        if first % PAGE_SIZE != 0 || self.installed.contains(first) {
            return None;
        }
        let host_addr = self.regions.host_address(first)?;
        let region = region_of(&self.regions, host_addr)?;
        let region_end = region.offset + region.size;
        let mut end = first + PAGE_SIZE;
        let mut count = 1;
        while count < max_pages
            && end < region_end
            && listed.get(count) == Some(&end)
            && !self.installed.contains(end)
        {
            end += PAGE_SIZE;
            count += 1;
        }
        Some((first..end, host_addr))
    }

    /// One prefetch run in one ioctl, page by page once it is partly in place or removed.
    /// Ok: pages installed; Err: stop prefetching.
    fn prefetch_run(
        &self,
        run: &Range<u64>,
        host_addr: u64,
        all_zero: bool,
        data: &[u8],
        stop: &AtomicBool,
    ) -> Result<u64, ()> {
        for _ in 0..PREFETCH_AGAIN_ATTEMPTS {
            let outcome = {
                let removed = self.removed.read().unwrap_or_else(PoisonError::into_inner);
                let any_removed = (run.start..run.end)
                    .step_by(PAGE_LEN)
                    .any(|offset| removed.contains(offset));
                if any_removed {
                    drop(removed);
                    return self.prefetch_pages(run.start, host_addr, data, stop);
                }
                self.install_run(run, host_addr, all_zero, data)
            };
            match outcome {
                Ok((Install::Done, pages)) => {
                    self.stats.prefetched(pages);
                    return Ok(pages);
                }
                Ok((Install::Partial { .. }, pages)) => {
                    // The page after the installed prefix is likely there (EEXIST); the
                    // rest may not be.
                    self.stats.prefetched(pages);
                    let skip = usize::try_from(pages * PAGE_SIZE).unwrap_or(data.len());
                    let rest = data.get(skip..).unwrap_or(&[]);
                    let more = self.prefetch_pages(
                        run.start + pages * PAGE_SIZE,
                        host_addr + pages * PAGE_SIZE,
                        rest,
                        stop,
                    )?;
                    return Ok(pages + more);
                }
                Ok((Install::Exists, _)) => {
                    self.stats.eexist();
                    let rest = data.get(PAGE_LEN..).unwrap_or(&[]);
                    return self.prefetch_pages(
                        run.start + PAGE_SIZE,
                        host_addr + PAGE_SIZE,
                        rest,
                        stop,
                    );
                }
                Ok((Install::Again, _)) => {
                    self.stats.eagain();
                    if stop.load(Ordering::Relaxed) {
                        return Err(());
                    }
                    std::thread::sleep(DEFERRED_RETRY);
                }
                Ok((Install::Vanished, _)) => return Ok(0),
                Ok((Install::ProcessGone, _)) => return Err(()),
                Err(error) => {
                    tracing::warn!(offset = run.start, error = %error_chain(&error), "prefetch stops");
                    return Err(());
                }
            }
        }
        Ok(0)
    }

    /// The pages of `data` (consecutive from flat `start` at `host_addr`) one at a time.
    fn prefetch_pages(
        &self,
        start: u64,
        host_addr: u64,
        data: &[u8],
        stop: &AtomicBool,
    ) -> Result<u64, ()> {
        let mut installed = 0;
        for (index, page) in (0u64..).zip(data.chunks_exact(PAGE_LEN)) {
            let offset = start + index * PAGE_SIZE;
            if self.installed.contains(offset) {
                continue;
            }
            let kind = if is_all_zero(page) {
                PageKind::Zero
            } else {
                PageKind::Data
            };
            if self.prefetch_one(kind, offset, host_addr + index * PAGE_SIZE, page, stop)? {
                installed += 1;
            }
        }
        Ok(installed)
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
        let run = offset..offset + PAGE_SIZE;
        for _ in 0..PREFETCH_AGAIN_ATTEMPTS {
            let outcome = {
                let removed = self.removed.read().unwrap_or_else(PoisonError::into_inner);
                if removed.contains(offset) {
                    return Ok(false);
                }
                self.install_run(&run, host_addr, kind == PageKind::Zero, page)
            };
            match outcome {
                Ok((Install::Done, _)) => {
                    self.stats.prefetched(1);
                    return Ok(true);
                }
                Ok((Install::Exists, _)) => {
                    self.stats.eexist();
                    return Ok(false);
                }
                Ok((Install::Again | Install::Partial { .. }, _)) => {
                    self.stats.eagain();
                    if stop.load(Ordering::Relaxed) {
                        return Err(());
                    }
                    std::thread::sleep(DEFERRED_RETRY);
                }
                Ok((Install::Vanished, _)) => return Ok(false),
                Ok((Install::ProcessGone, _)) => return Err(()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const PAGE: u64 = PAGE_SIZE;

    fn region(first_page: u64, pages: u64) -> Region {
        Region {
            base: 0x7f00_0000_0000,
            size: pages * PAGE,
            offset: first_page * PAGE,
        }
    }

    #[test]
    fn test_fault_window_aligned_inside_region_is_whole_window() {
        let window = fault_window(21 * PAGE + 5, &region(0, 64), 16);
        assert_eq!(window, 16 * PAGE..32 * PAGE);
    }

    #[test]
    fn test_fault_window_clipped_to_region_edges() {
        // Region [10, 40): the window [0, 16) loses its head, [32, 48) its tail.
        assert_eq!(
            fault_window(12 * PAGE, &region(10, 30), 16),
            10 * PAGE..16 * PAGE
        );
        assert_eq!(
            fault_window(39 * PAGE, &region(10, 30), 16),
            32 * PAGE..40 * PAGE
        );
    }

    #[test]
    fn test_fault_window_one_page_is_the_page() {
        assert_eq!(
            fault_window(7 * PAGE, &region(0, 64), 1),
            7 * PAGE..8 * PAGE
        );
        assert_eq!(
            fault_window(7 * PAGE, &region(0, 64), 0),
            7 * PAGE..8 * PAGE,
            "0 means off too"
        );
    }

    #[test]
    fn test_window_runs_split_at_skipped_pages_fault_run_first() {
        let skipped = [2u64, 3, 12, 13];
        let runs = window_runs(0..16 * PAGE, 7 * PAGE, |offset| {
            skipped.contains(&(offset / PAGE))
        });
        assert_eq!(
            runs,
            vec![4 * PAGE..12 * PAGE, 0..2 * PAGE, 14 * PAGE..16 * PAGE]
        );
    }

    #[test]
    fn test_window_runs_keep_the_fault_even_when_marked() {
        let runs = window_runs(0..4 * PAGE, 2 * PAGE, |_| true);
        assert_eq!(runs, vec![2 * PAGE..3 * PAGE]);
    }

    #[test]
    fn test_installed_pages_insert_remove_and_bounds() {
        let installed = InstalledPages::new(100);
        installed.insert_range(60 * PAGE, 70 * PAGE);
        assert!(installed.contains(60 * PAGE));
        assert!(installed.contains(69 * PAGE + 17));
        assert!(!installed.contains(70 * PAGE));
        installed.remove_range(62 * PAGE, 64 * PAGE);
        assert!(!installed.contains(63 * PAGE));
        assert!(installed.contains(64 * PAGE));
        installed.insert_range(99 * PAGE, 200 * PAGE);
        assert!(installed.contains(99 * PAGE));
        assert!(!installed.contains(100 * PAGE), "outside the range");
        assert!(!installed.contains(u64::MAX));
    }

    proptest! {
        #[test]
        fn test_fault_window_is_the_aligned_block_clipped_to_the_region(
            region_start in 0u64..200, region_pages in 1u64..300,
            fault_index in 0u64..300, pages in 0u64..700,
        ) {
            let region = region(region_start, region_pages);
            let fault = (region_start + fault_index % region_pages) * PAGE;
            let window = fault_window(fault, &region, pages);
            let span = pages.clamp(1, MAX_FAULT_AROUND_PAGES) * PAGE;
            let block = fault - fault % span..fault - fault % span + span;
            prop_assert!(window.contains(&fault));
            prop_assert_eq!(window.start, block.start.max(region.offset));
            prop_assert_eq!(window.end, block.end.min(region.offset + region.size));
            prop_assert!(window.end - window.start <= span);
            prop_assert_eq!(window.start % PAGE, 0);
        }

        #[test]
        fn test_window_runs_cover_exactly_the_wanted_pages(
            pages in 1u64..80, fault_index in 0u64..80,
            skipped in proptest::collection::btree_set(0u64..80, 0..80),
        ) {
            let fault = (fault_index % pages) * PAGE;
            let runs = window_runs(0..pages * PAGE, fault, |o| skipped.contains(&(o / PAGE)));
            prop_assert!(runs.first().is_some_and(|run| run.contains(&fault)));
            let mut covered = BTreeSet::new();
            for run in &runs {
                prop_assert!(run.start < run.end);
                for page in run.start / PAGE..run.end / PAGE {
                    prop_assert!(covered.insert(page), "page {} in two runs", page);
                }
                // Maximal: the pages just outside a run are not wanted.
                for edge in [run.start.checked_sub(PAGE), Some(run.end)].into_iter().flatten() {
                    if edge < pages * PAGE {
                        prop_assert!(edge != fault && skipped.contains(&(edge / PAGE)));
                    }
                }
            }
            let wanted: BTreeSet<u64> = (0..pages)
                .filter(|page| *page * PAGE == fault || !skipped.contains(page))
                .collect();
            prop_assert_eq!(covered, wanted);
            let rest_sorted = runs.iter().skip(1).map(|r| r.start).collect::<Vec<_>>();
            let mut sorted = rest_sorted.clone();
            sorted.sort_unstable();
            prop_assert_eq!(rest_sorted, sorted);
        }

        #[test]
        fn test_installed_pages_match_a_set_model(
            pages in 1u64..200,
            ops in proptest::collection::vec((any::<bool>(), 0u64..220, 0u64..100), 0..20),
        ) {
            let installed = InstalledPages::new(pages);
            let mut model = BTreeSet::new();
            for (insert, start, len) in ops {
                let range = start * PAGE..(start + len) * PAGE;
                if insert {
                    installed.insert_range(range.start, range.end);
                    model.extend((start..start + len).filter(|p| *p < pages));
                } else {
                    installed.remove_range(range.start, range.end);
                    for page in start..start + len {
                        model.remove(&page);
                    }
                }
            }
            for page in 0..pages + 70 {
                prop_assert_eq!(installed.contains(page * PAGE), model.contains(&page), "page {}", page);
            }
        }
    }
}
