//! The pager: one listening socket and one serving thread per VM.
//!
//! ```text
//!  Pager::register(path, source, options) ──> VmHandle
//!      │ binds the socket now (before the VMM's snapshot load starts)
//!      └─ thread "pager-<name>":
//!           Waiting : poll(listener, stop) until accept_timeout ─> accept one connection,
//!                     close the listener, unlink the socket file
//!                     poll(connection, stop) until accept_timeout ─> handshake::receive
//!           Serving : fault loop (fault.rs, with fault-around); prefetch thread if the key
//!                     has a recorded set
//!           end     : stop prefetch, publish the touched pages under the key, set the final
//!                     state: Ended (VMM gone) | Stopped (stop()) | Failed { error }
//! ```
//!
//! Nothing is shared between VMs except the prefetch store and the total counters (both
//! behind short locks or atomics), so one VM's failure or slowness never stalls another.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde::{Deserialize, Serialize};

use crate::fault::{
    DEFAULT_FAULT_AROUND_PAGES, EndReason, InstalledPages, MAX_FAULT_AROUND_PAGES, ServeError,
    Serving, error_chain,
};
use crate::handshake::{self, DEFAULT_MAX_HANDSHAKE_BYTES, HandshakeError};
use crate::pages::{PageBitmap, TouchLog};
use crate::prefetch::PrefetchStore;
use crate::source::PageSource;
use crate::stats::{CounterStats, Counters, StatsSink};

/// Pager-wide settings.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// How long a VM's socket waits for the VMM to connect, and then for its handshake.
    pub accept_timeout: Duration,
    /// Bound on the handshake payload (bytes).
    pub max_handshake_bytes: usize,
    /// Events read from the userfaultfd per `read(2)`.
    pub events_per_read: usize,
}

impl Default for PagerConfig {
    fn default() -> Self {
        Self {
            accept_timeout: Duration::from_secs(10),
            max_handshake_bytes: DEFAULT_MAX_HANDSHAKE_BYTES,
            events_per_read: 64,
        }
    }
}

/// How one VM is served.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Name for logs and stats (the sandbox id).
    pub name: String,
    /// Prefetch key (the build id the memory comes from).
    pub prefetch_key: Option<String>,
    /// Install the set recorded under the key right after the handshake.
    pub prefetch: bool,
    /// When serving ends normally, merge the pages this VM had installed on demand (faulted
    /// and fault-around) into the key's set.
    pub record: bool,
    /// Fault-around window in pages: a fault also installs the pages of its aligned window
    /// (same region, not removed, not yet in place). 1 turns it off; values are clamped to
    /// `1..=MAX_FAULT_AROUND_PAGES`.
    pub fault_around: u64,
}

impl VmOptions {
    /// Options with a name, no prefetch key, prefetch and recording on (they only act once a
    /// key is set), and fault-around of [`DEFAULT_FAULT_AROUND_PAGES`].
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            prefetch_key: None,
            prefetch: true,
            record: true,
            fault_around: DEFAULT_FAULT_AROUND_PAGES,
        }
    }

    /// Sets the fault-around window (pages; 1 serves the faulting page alone).
    pub fn with_fault_around(mut self, pages: u64) -> Self {
        self.fault_around = pages.clamp(1, MAX_FAULT_AROUND_PAGES);
        self
    }

    /// Sets the prefetch key.
    pub fn with_prefetch_key(mut self, key: impl Into<String>) -> Self {
        self.prefetch_key = Some(key.into());
        self
    }
}

/// Where a VM's serving is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Listening: no VMM connected yet, or its handshake has not arrived.
    Waiting,
    /// Handshake done; faults are being served.
    Serving,
    /// The VMM went away (closed its connection or exited).
    Ended,
    /// Stopped by the owner.
    Stopped,
    /// Serving failed; the VMM (if any) will hang on its next missing page.
    Failed { error: String },
}

impl VmState {
    /// Whether serving is over.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Ended | Self::Stopped | Self::Failed { .. })
    }
}

/// One VM's statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    pub name: String,
    pub state: VmState,
    pub peer_pid: Option<i32>,
    pub prefetch_key: Option<String>,
    #[serde(flatten)]
    pub counters: CounterStats,
}

/// Statistics of every live VM handle plus totals since the pager started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagerStats {
    pub vms: Vec<VmStats>,
    pub totals: CounterStats,
}

/// Setting up a VM's serving failed (nothing is left running).
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error("binding the page-server socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making the listening socket non-blocking")]
    Listener {
        #[source]
        source: std::io::Error,
    },
    #[error("creating the stop eventfd")]
    EventFd {
        #[source]
        source: std::io::Error,
    },
    #[error("spawning the serving thread for {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a VM's serving failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VMM connected within {timeout:?}")]
    AcceptTimeout { timeout: Duration },
    #[error("no handshake arrived within {timeout:?} of the connection")]
    HandshakeTimeout { timeout: Duration },
    #[error("accepting the VMM's connection")]
    Accept {
        #[source]
        source: std::io::Error,
    },
    #[error("polling while waiting for the VMM")]
    Poll {
        #[source]
        source: Errno,
    },
    #[error("handshake rejected")]
    Handshake {
        #[source]
        source: HandshakeError,
    },
    #[error("serving failed")]
    Serve {
        #[source]
        source: ServeError,
    },
}

/// State shared between a VM's handle and its threads.
#[derive(Debug)]
struct VmShared {
    name: String,
    prefetch_key: Option<String>,
    state: Mutex<VmState>,
    state_changed: Condvar,
    peer_pid: Mutex<Option<i32>>,
    counters: Arc<Counters>,
    touched: Arc<Mutex<TouchLog>>,
    stop: EventFd,
}

impl VmShared {
    fn set_state(&self, state: VmState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
        self.state_changed.notify_all();
    }

    fn state(&self) -> VmState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn stats(&self) -> VmStats {
        VmStats {
            name: self.name.clone(),
            state: self.state(),
            peer_pid: *self.peer_pid.lock().unwrap_or_else(PoisonError::into_inner),
            prefetch_key: self.prefetch_key.clone(),
            counters: self.counters.snapshot(),
        }
    }
}

/// The page server: serves any number of VMs, each on its own socket and thread.
#[derive(Debug)]
pub struct Pager {
    config: PagerConfig,
    prefetch: Arc<PrefetchStore>,
    totals: Arc<Counters>,
    vms: Mutex<Vec<Weak<VmShared>>>,
}

impl Pager {
    /// A pager with no VMs.
    pub fn new(config: PagerConfig) -> Self {
        Self {
            config,
            prefetch: Arc::new(PrefetchStore::new()),
            totals: Arc::new(Counters::default()),
            vms: Mutex::new(Vec::new()),
        }
    }

    /// The prefetch sets, by key (load or save them here).
    pub fn prefetch_store(&self) -> &Arc<PrefetchStore> {
        &self.prefetch
    }

    /// Binds a listening socket at `socket_path` (which must not exist) and serves the VM
    /// that connects to it from `source`. The socket file is removed once the VMM connected
    /// or serving ended.
    pub fn register(
        &self,
        socket_path: &Path,
        source: Arc<dyn PageSource>,
        options: VmOptions,
    ) -> Result<VmHandle, PagerError> {
        let listener = UnixListener::bind(socket_path).map_err(|source| PagerError::Bind {
            path: socket_path.to_path_buf(),
            source,
        })?;
        self.start(listener, Some(socket_path.to_path_buf()), source, options)
    }

    /// Serves the VM that connects to an existing `listener` (whose socket file the caller
    /// owns).
    pub fn serve(
        &self,
        listener: UnixListener,
        source: Arc<dyn PageSource>,
        options: VmOptions,
    ) -> Result<VmHandle, PagerError> {
        self.start(listener, None, source, options)
    }

    /// Every live VM handle's stats, and totals since the pager was created.
    pub fn stats(&self) -> PagerStats {
        let mut vms = self.vms.lock().unwrap_or_else(PoisonError::into_inner);
        vms.retain(|vm| vm.strong_count() > 0);
        PagerStats {
            vms: vms
                .iter()
                .filter_map(Weak::upgrade)
                .map(|vm| vm.stats())
                .collect(),
            totals: self.totals.snapshot(),
        }
    }

    fn start(
        &self,
        listener: UnixListener,
        owned_path: Option<PathBuf>,
        source: Arc<dyn PageSource>,
        options: VmOptions,
    ) -> Result<VmHandle, PagerError> {
        let cleanup = SocketFile(owned_path);
        listener
            .set_nonblocking(true)
            .map_err(|source| PagerError::Listener { source })?;
        let stop = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(
            |source| PagerError::EventFd {
                source: source.into(),
            },
        )?;
        let shared = Arc::new(VmShared {
            name: options.name.clone(),
            prefetch_key: options.prefetch_key.clone(),
            state: Mutex::new(VmState::Waiting),
            state_changed: Condvar::new(),
            peer_pid: Mutex::new(None),
            counters: Arc::new(Counters::default()),
            touched: Arc::new(Mutex::new(TouchLog::default())),
            stop,
        });
        let run = VmRun {
            shared: Arc::clone(&shared),
            config: self.config.clone(),
            prefetch: Arc::clone(&self.prefetch),
            stats: StatsSink::new(Arc::clone(&shared.counters), Arc::clone(&self.totals)),
            source,
            options,
        };
        let thread = std::thread::Builder::new()
            .name(thread_name("pager", &shared.name))
            .spawn(move || run.run(listener, cleanup))
            .map_err(|source| PagerError::Spawn {
                name: shared.name.clone(),
                source,
            })?;
        self.vms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&shared));
        Ok(VmHandle {
            shared,
            thread: Some(thread),
        })
    }
}

/// Removes the socket file it names when dropped (if any).
#[derive(Debug)]
struct SocketFile(Option<PathBuf>);

impl SocketFile {
    fn remove(&mut self) {
        if let Some(path) = self.0.take()
            && let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "removing the page-server socket");
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A VM being served. Dropping it stops the serving (like [`VmHandle::stop`]).
#[derive(Debug)]
pub struct VmHandle {
    shared: Arc<VmShared>,
    thread: Option<JoinHandle<()>>,
}

impl VmHandle {
    /// The name given in [`VmOptions`].
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        self.shared.state()
    }

    /// Current statistics.
    pub fn stats(&self) -> VmStats {
        self.shared.stats()
    }

    /// The VMM's pid once it connected (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> Option<i32> {
        *self
            .shared
            .peer_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The pages installed on demand so far (flat offsets, install order): each faulting
    /// page and the pages fault-around installed with it.
    pub fn touched(&self) -> Vec<u64> {
        self.shared
            .touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pages()
            .to_vec()
    }

    /// Blocks until serving is over; returns the final state.
    pub fn wait(&self) -> VmState {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !state.is_terminal() {
            state = self
                .shared
                .state_changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.clone()
    }

    /// Like [`VmHandle::wait`], giving up after `timeout` (returns `None` then).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmState> {
        let deadline = Instant::now() + timeout;
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !state.is_terminal() {
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .shared
                .state_changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Some(state.clone())
    }

    /// Stops serving (closing the socket, connection and userfaultfd) and waits for the
    /// threads to finish. Idempotent; returns the final state.
    pub fn stop(&mut self) -> VmState {
        if let Some(thread) = self.thread.take() {
            if let Err(error) = self.shared.stop.write(1) {
                tracing::error!(vm = %self.shared.name, %error, "signalling the serving thread");
            }
            if thread.join().is_err() {
                self.shared.set_state(VmState::Failed {
                    error: "serving thread panicked".into(),
                });
            }
        }
        self.state()
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the serving thread owns.
struct VmRun {
    shared: Arc<VmShared>,
    config: PagerConfig,
    prefetch: Arc<PrefetchStore>,
    stats: StatsSink,
    source: Arc<dyn PageSource>,
    options: VmOptions,
}

impl VmRun {
    fn run(self, listener: UnixListener, mut socket_file: SocketFile) {
        let span = tracing::info_span!("pager_vm", vm = %self.shared.name);
        let _entered = span.enter();
        let prefetch_stop = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            let result = self.serve(listener, &mut socket_file, scope, &prefetch_stop);
            prefetch_stop.store(true, Ordering::Relaxed);
            result
        });
        socket_file.remove();
        let state = match result {
            Ok(EndReason::VmmGone) => VmState::Ended,
            Ok(EndReason::Stopped) => VmState::Stopped,
            Err(error) => {
                let error = error_chain(&error);
                tracing::error!(%error, "serving this VM failed");
                VmState::Failed { error }
            }
        };
        if !matches!(state, VmState::Failed { .. }) {
            self.publish_touched();
        }
        tracing::info!(?state, "serving over");
        self.shared.set_state(state);
    }

    fn serve<'scope>(
        &'scope self,
        listener: UnixListener,
        socket_file: &mut SocketFile,
        scope: &'scope std::thread::Scope<'scope, '_>,
        prefetch_stop: &'scope AtomicBool,
    ) -> Result<EndReason, VmError> {
        let deadline = Instant::now() + self.config.accept_timeout;
        let Some(connection) = self.accept(&listener, deadline)? else {
            return Ok(EndReason::Stopped);
        };
        // One VM per socket: nobody else may connect now.
        drop(listener);
        socket_file.remove();
        let peer_pid = handshake::peer_pid(&connection);
        *self
            .shared
            .peer_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = peer_pid;
        tracing::info!(?peer_pid, "VMM connected");

        let deadline = Instant::now() + self.config.accept_timeout;
        match poll_with_stop(connection.as_fd(), &self.shared.stop, deadline)? {
            Readiness::Ready => {}
            Readiness::Stop => return Ok(EndReason::Stopped),
            Readiness::TimedOut => {
                return Err(VmError::HandshakeTimeout {
                    timeout: self.config.accept_timeout,
                });
            }
        }
        let handshake = handshake::receive(
            &connection,
            self.config.max_handshake_bytes,
            self.source.size(),
        )
        .map_err(|source| VmError::Handshake { source })?;
        let regions = Arc::new(handshake.regions);
        tracing::info!(
            regions = regions.regions().len(),
            bytes = regions.end_offset(),
            "handshake accepted: serving"
        );
        *self
            .shared
            .touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = TouchLog::new(regions.page_count());
        let serving = Serving {
            uffd: Arc::new(handshake.uffd),
            removed: Arc::new(RwLock::new(PageBitmap::new(regions.page_count()))),
            installed: Arc::new(InstalledPages::new(regions.page_count())),
            regions,
            source: Arc::clone(&self.source),
            touched: Arc::clone(&self.shared.touched),
            stats: self.stats.clone(),
            fault_around: self.options.fault_around.clamp(1, MAX_FAULT_AROUND_PAGES),
        };
        self.shared.set_state(VmState::Serving);

        if let Some(pages) = self.prefetch_set() {
            let prefetcher = serving.clone();
            let spawned = std::thread::Builder::new()
                .name(thread_name("prefetch", &self.shared.name))
                .spawn_scoped(scope, move || prefetcher.prefetch(&pages, prefetch_stop));
            if let Err(error) = spawned {
                tracing::warn!(%error, "could not start the prefetch thread; serving on demand");
            }
        }
        serving
            .fault_loop(&connection, &self.shared.stop, self.config.events_per_read)
            .map_err(|source| VmError::Serve { source })
    }

    fn prefetch_set(&self) -> Option<Arc<[u64]>> {
        if !self.options.prefetch {
            return None;
        }
        let key = self.options.prefetch_key.as_deref()?;
        let pages = self.prefetch.get(key)?;
        tracing::info!(key, pages = pages.len(), "prefetching the recorded pages");
        Some(pages)
    }

    fn publish_touched(&self) {
        let (true, Some(key)) = (self.options.record, self.options.prefetch_key.as_deref()) else {
            return;
        };
        let touched = self
            .shared
            .touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if touched.pages().is_empty() {
            return;
        }
        self.prefetch.merge(key, touched.pages());
        tracing::info!(
            key,
            installed_on_demand = touched.pages().len(),
            "recorded the pages installed on demand"
        );
    }

    /// Waits for one connection; `None` when stopped first.
    fn accept(
        &self,
        listener: &UnixListener,
        deadline: Instant,
    ) -> Result<Option<UnixStream>, VmError> {
        loop {
            let ready = poll_with_stop(listener.as_fd(), &self.shared.stop, deadline)?;
            match ready {
                Readiness::Stop => return Ok(None),
                Readiness::TimedOut => {
                    return Err(VmError::AcceptTimeout {
                        timeout: self.config.accept_timeout,
                    });
                }
                Readiness::Ready => {}
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(true)
                        .map_err(|source| VmError::Accept { source })?;
                    return Ok(Some(stream));
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                // The peer gave up between poll and accept: keep waiting for another.
                Err(error) if error.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(source) => return Err(VmError::Accept { source }),
            }
        }
    }
}

/// `<prefix>-<name>` without NUL bytes (which would make thread creation panic).
fn thread_name(prefix: &str, name: &str) -> String {
    format!("{prefix}-{}", name.replace('\0', ""))
}

enum Readiness {
    Ready,
    Stop,
    TimedOut,
}

/// Polls `fd` for input (or hang-up) and the stop eventfd until `deadline`.
fn poll_with_stop(
    fd: std::os::fd::BorrowedFd<'_>,
    stop: &EventFd,
    deadline: Instant,
) -> Result<Readiness, VmError> {
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Ok(Readiness::TimedOut);
        };
        // Round up so that we never wake a hair before the deadline and spin.
        let millis = left.as_millis().saturating_add(1);
        let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(source) => return Err(VmError::Poll { source }),
        }
        if fds[0].revents().is_some_and(|events| !events.is_empty()) {
            return Ok(Readiness::Stop);
        }
        if fds[1].revents().is_some_and(|events| !events.is_empty()) {
            return Ok(Readiness::Ready);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{GuestRegionUffdMapping, send, send_raw};
    use crate::source::{FileSource, PageKind, SourceError};
    use crate::uffd::testing::AnonMemory;
    use crate::uffd::{UFFD_FEATURE_EVENT_REMOVE, Uffd};
    use std::io::Write;
    use std::sync::mpsc;

    const PAGE: usize = 4096;
    const PAGES: usize = 64;
    const WAIT: Duration = Duration::from_secs(10);

    /// Page `i` of the test memory file: every fourth page is zeros, the others a pattern.
    fn page_contents(page: usize) -> Vec<u8> {
        if page % 4 == 3 {
            return vec![0; PAGE];
        }
        (0..PAGE)
            .map(|j| u8::try_from((page * 7 + j * 13 + 1) % 251).expect("< 251"))
            .collect()
    }

    fn memory_file(pages: usize) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for page in 0..pages {
            file.write_all(&page_contents(page)).expect("write");
        }
        file
    }

    fn file_source(file: &tempfile::NamedTempFile) -> Arc<dyn PageSource> {
        Arc::new(FileSource::open(file.path()).expect("open memory file"))
    }

    /// Memory page `page` of the fake VMM holds this flat-offset page: the mapping's second
    /// half is announced as region 0 (offset 0), its first half as region 1.
    fn offset_page(page: usize) -> usize {
        (page + PAGES / 2) % PAGES
    }

    /// A process-less stand-in for a VMM: guest memory, its userfaultfd, the connection.
    struct FakeVmm {
        memory: Arc<AnonMemory>,
        uffd: Option<Uffd>,
        connection: Option<UnixStream>,
    }

    impl FakeVmm {
        fn new() -> Self {
            let memory = Arc::new(AnonMemory::new(PAGES * PAGE));
            let uffd = Uffd::create().expect("create userfaultfd");
            uffd.api(UFFD_FEATURE_EVENT_REMOVE).expect("UFFDIO_API");
            uffd.register(memory.addr(), u64::try_from(memory.len()).expect("len"))
                .expect("register");
            Self {
                memory,
                uffd: Some(uffd),
                connection: None,
            }
        }

        fn regions(&self) -> Vec<GuestRegionUffdMapping> {
            let half = u64::try_from(PAGES / 2 * PAGE).expect("small");
            let region = |base, offset| GuestRegionUffdMapping {
                base_host_virt_addr: base,
                size: half,
                offset,
                page_size: 4096,
                page_size_kib: 4096,
            };
            vec![
                region(self.memory.addr() + half, 0),
                region(self.memory.addr(), half),
            ]
        }

        fn connect(path: &Path) -> Self {
            let mut vmm = Self::new();
            let connection = UnixStream::connect(path).expect("connect");
            let uffd = vmm.uffd.as_ref().expect("uffd");
            send(&connection, &vmm.regions(), uffd.as_fd()).expect("send handshake");
            vmm.connection = Some(connection);
            vmm
        }

        fn read_page(&self, page: usize) -> Vec<u8> {
            self.memory.read(page * PAGE, PAGE)
        }

        /// Reads `page` on a new thread (the read blocks until the page is served).
        fn read_page_in_thread(&self, page: usize) -> JoinHandle<Vec<u8>> {
            let memory = Arc::clone(&self.memory);
            std::thread::spawn(move || memory.read(page * PAGE, PAGE))
        }

        /// What a VMM's exit does to the pager's view: connection and userfaultfd closed.
        fn exit(&mut self) {
            self.connection = None;
            self.uffd = None;
        }
    }

    /// Options without fault-around: one page per fault, the behaviour these counts assume.
    fn single_page(name: &str) -> VmOptions {
        VmOptions::new(name).with_fault_around(1)
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn socket_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
        dir.path().join(format!("{name}.sock"))
    }

    fn failed_error(state: VmState) -> String {
        match state {
            VmState::Failed { error } => error,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn test_serve_reads_match_source_across_two_regions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), single_page("vm"))
            .expect("register");
        let mut vmm = FakeVmm::connect(&path);
        for page in 0..PAGES {
            assert_eq!(
                vmm.read_page(page),
                page_contents(offset_page(page)),
                "page {page}"
            );
        }
        // The reader wakes as the ioctl returns, a moment before the counters move.
        wait_until("the last fault's stats", || {
            vm.stats().counters.fault_latency.count == 64
        });
        let stats = vm.stats();
        assert_eq!(stats.state, VmState::Serving);
        assert_eq!(stats.counters.faults, 64);
        assert_eq!(stats.counters.zero_pages, 16);
        assert_eq!(stats.counters.pages_copied, 48);
        assert_eq!(stats.counters.bytes_copied, 48 * 4096);
        assert_eq!(stats.counters.fault_latency.count, 64);
        assert!(stats.counters.fault_latency.p50_ns <= stats.counters.fault_latency.max_ns);
        assert_eq!(
            stats.peer_pid,
            Some(i32::try_from(std::process::id()).expect("pid"))
        );
        assert!(
            !path.exists(),
            "the socket file is removed once the VMM connected"
        );
        vmm.exit();
        assert_eq!(vm.wait_timeout(WAIT), Some(VmState::Ended));
    }

    #[test]
    fn test_serve_write_fault_keeps_the_rest_of_the_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let _vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        let vmm = FakeVmm::connect(&path);
        vmm.memory.write_byte(5 * PAGE + 10, 0xee);
        let mut expected = page_contents(offset_page(5));
        expected[10] = 0xee;
        assert_eq!(vmm.read_page(5), expected);
    }

    #[test]
    fn test_serve_concurrent_faults_install_each_page_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), single_page("vm"))
            .expect("register");
        let vmm = FakeVmm::connect(&path);
        let readers: Vec<_> = (0..4)
            .map(|thread| {
                let memory = Arc::clone(&vmm.memory);
                std::thread::spawn(move || {
                    // Each thread walks all pages from a different start, so they collide.
                    (0..PAGES)
                        .map(|i| (i + thread * 16) % PAGES)
                        .map(|page| (page, memory.read(page * PAGE, PAGE)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for reader in readers {
            for (page, contents) in reader.join().expect("reader") {
                assert_eq!(contents, page_contents(offset_page(page)), "page {page}");
            }
        }
        wait_until("the last fault's stats", || {
            vm.stats().counters.fault_latency.count >= 64
        });
        let counters = vm.stats().counters;
        assert_eq!(
            counters.pages_copied + counters.zero_pages,
            64,
            "{counters:?}"
        );
        assert!(counters.faults >= 64, "{counters:?}");
    }

    #[test]
    fn test_two_vms_bad_handshakes_fail_alone_while_a_good_vm_is_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let good_path = socket_path(&dir, "good");
        let good = pager
            .register(&good_path, file_source(&file), single_page("good"))
            .expect("good");

        type Misbehave = Box<dyn Fn(&UnixStream, &FakeVmm)>;
        let cases: [(&str, Misbehave, &str); 3] = [
            (
                "garbage",
                Box::new(|stream, vmm| {
                    let fd = vmm.uffd.as_ref().expect("uffd").as_fd().as_raw_fd();
                    send_raw(stream, b"{not json", &[fd]).expect("send");
                }),
                "not a JSON region list",
            ),
            (
                "nofd",
                Box::new(|stream, vmm| {
                    let payload = serde_json::to_vec(&vmm.regions()).expect("json");
                    send_raw(stream, &payload, &[]).expect("send");
                }),
                "exactly one file descriptor",
            ),
            (
                "hangup",
                Box::new(|_, _| {}),
                "closed the connection without sending",
            ),
        ];
        use std::os::fd::AsRawFd;
        let mut bad_vms = Vec::new();
        for (name, misbehave, expected) in cases {
            let path = socket_path(&dir, name);
            let vm = pager
                .register(&path, file_source(&file), VmOptions::new(name))
                .expect("bad");
            let vmm = FakeVmm::new();
            let stream = UnixStream::connect(&path).expect("connect");
            misbehave(&stream, &vmm);
            drop(stream);
            bad_vms.push((vm, vmm, expected));
        }
        let vmm = FakeVmm::connect(&good_path);
        for (vm, _vmm, expected) in &bad_vms {
            let error = failed_error(vm.wait_timeout(WAIT).expect("bad VM ends"));
            assert!(error.contains(expected), "{}: {error}", vm.name());
        }
        for page in 0..PAGES {
            assert_eq!(
                vmm.read_page(page),
                page_contents(offset_page(page)),
                "page {page}"
            );
        }
        assert_eq!(good.state(), VmState::Serving);
        let stats = pager.stats();
        assert_eq!(stats.vms.len(), 4);
        assert_eq!(stats.totals.faults, 64);
        wait_until("the last fault's stats", || {
            pager.stats().totals.fault_latency.count == 64
        });
    }

    #[test]
    fn test_vmm_exit_mid_run_ends_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        let mut vmm = FakeVmm::connect(&path);
        assert_eq!(vmm.read_page(1), page_contents(offset_page(1)));
        vmm.exit();
        drop(vmm);
        assert_eq!(vm.wait_timeout(WAIT), Some(VmState::Ended));
    }

    #[test]
    fn test_prefetch_second_vm_gets_recorded_pages_before_touching() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let touched_pages = [5usize, 2, 9, 30, 2];

        let path = socket_path(&dir, "first");
        let first = pager
            .register(
                &path,
                file_source(&file),
                single_page("first").with_prefetch_key("build"),
            )
            .expect("register");
        let mut vmm = FakeVmm::connect(&path);
        for page in touched_pages {
            vmm.read_page(page);
        }
        vmm.exit();
        assert_eq!(first.wait_timeout(WAIT), Some(VmState::Ended));
        let recorded = pager.prefetch_store().get("build").expect("recorded set");
        let expected: Vec<u64> = [5usize, 2, 9, 30]
            .iter()
            .map(|page| u64::try_from(offset_page(*page) * PAGE).expect("small"))
            .collect();
        assert_eq!(
            &*recorded,
            expected.as_slice(),
            "first-touch order, deduplicated"
        );

        let path = socket_path(&dir, "second");
        let second = pager
            .register(
                &path,
                file_source(&file),
                single_page("second").with_prefetch_key("build"),
            )
            .expect("register");
        let vmm = FakeVmm::connect(&path);
        wait_until("the prefetch", || {
            second.stats().counters.prefetched_pages == 4
        });
        let resident = vmm.memory.resident(0, PAGES * PAGE);
        for (page, resident) in resident.iter().enumerate() {
            assert_eq!(
                *resident,
                [5, 2, 9, 30].contains(&page),
                "page {page} residency"
            );
        }
        for page in [5usize, 2, 9, 30] {
            assert_eq!(
                vmm.read_page(page),
                page_contents(offset_page(page)),
                "page {page}"
            );
        }
        assert_eq!(
            second.stats().counters.faults,
            0,
            "prefetched pages must not fault"
        );
    }

    #[test]
    fn test_remove_event_makes_later_faults_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), single_page("vm"))
            .expect("register");
        let vmm = FakeVmm::connect(&path);
        assert_eq!(vmm.read_page(4), page_contents(offset_page(4)));
        vmm.memory.dontneed(4 * PAGE, 2 * PAGE);
        assert_eq!(vmm.read_page(4), vec![0u8; PAGE]);
        assert_eq!(
            vmm.read_page(5),
            vec![0u8; PAGE],
            "never-served page in the removed range"
        );
        assert_eq!(vmm.read_page(6), page_contents(offset_page(6)));
        wait_until("the last fault's stats", || {
            vm.stats().counters.fault_latency.count == 4
        });
        let counters = vm.stats().counters;
        assert_eq!(counters.remove_events, 1);
        assert_eq!(counters.zero_pages, 2, "{counters:?}");
    }

    /// A source that blocks on one page until released, to hold the fault loop still.
    struct GatedSource {
        inner: Arc<dyn PageSource>,
        gate_offset: u64,
        entered: Mutex<Option<mpsc::Sender<()>>>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl PageSource for GatedSource {
        fn size(&self) -> u64 {
            self.inner.size()
        }

        fn read_page(&self, offset: u64, buf: &mut [u8]) -> Result<PageKind, SourceError> {
            if offset == self.gate_offset
                && let Some(entered) = self.entered.lock().expect("lock").take()
            {
                entered.send(()).expect("signal entry");
                self.release.lock().expect("lock").recv().expect("release");
            }
            self.inner.read_page(offset, buf)
        }
    }

    #[test]
    fn test_fault_racing_a_remove_gets_eagain_then_is_served() {
        use nix::poll::{PollFd, PollFlags, poll};
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let source = Arc::new(GatedSource {
            inner: file_source(&file),
            gate_offset: u64::try_from(offset_page(0) * PAGE).expect("small"),
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(release_rx),
        });
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, source, single_page("vm"))
            .expect("register");
        let vmm = FakeVmm::connect(&path);

        // 1. A fault on page 0 parks the fault loop inside the source.
        let reader = vmm.read_page_in_thread(0);
        entered_rx
            .recv_timeout(WAIT)
            .expect("the fault loop reached the gate");
        // 2. A MADV_DONTNEED elsewhere queues a REMOVE; the kernel now fails installs with
        //    EAGAIN until the pager reads it.
        let madviser = {
            let memory = Arc::clone(&vmm.memory);
            std::thread::spawn(move || memory.dontneed(8 * PAGE, PAGE))
        };
        let uffd = vmm.uffd.as_ref().expect("uffd");
        let mut fds = [PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, 10_000u16).expect("poll"), 1, "REMOVE queued");
        // 3. Let the fault loop install page 0: EAGAIN, read the REMOVE, retry.
        release_tx.send(()).expect("release");
        assert_eq!(
            reader.join().expect("reader"),
            page_contents(offset_page(0))
        );
        madviser.join().expect("madvise");
        let counters = vm.stats().counters;
        assert!(counters.eagain >= 1, "{counters:?}");
        assert_eq!(counters.remove_events, 1);
        assert_eq!(vmm.read_page(8), vec![0u8; PAGE]);
    }

    /// A source whose reads fail at one offset.
    struct FailingSource {
        inner: Arc<dyn PageSource>,
        bad_offset: u64,
    }

    impl PageSource for FailingSource {
        fn size(&self) -> u64 {
            self.inner.size()
        }

        fn read_page(&self, offset: u64, buf: &mut [u8]) -> Result<PageKind, SourceError> {
            if offset == self.bad_offset {
                return Err(SourceError::Backend {
                    offset,
                    what: "injected".into(),
                    source: None,
                });
            }
            self.inner.read_page(offset, buf)
        }
    }

    #[test]
    fn test_source_error_fails_the_vm_with_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let bad_offset = u64::try_from(offset_page(2) * PAGE).expect("small");
        let source = Arc::new(FailingSource {
            inner: file_source(&file),
            bad_offset,
        });
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, source, VmOptions::new("vm"))
            .expect("register");
        let mut vmm = FakeVmm::connect(&path);
        assert_eq!(vmm.read_page(1), page_contents(offset_page(1)));
        let stuck = vmm.read_page_in_thread(2);
        let error = failed_error(vm.wait_timeout(WAIT).expect("serving ends"));
        assert!(
            error.contains(&format!("offset {bad_offset:#x}")),
            "{error}"
        );
        assert!(error.contains("injected"), "{error}");
        // Closing the last userfaultfd reference releases the blocked reader (with zeros).
        vmm.exit();
        assert_eq!(stuck.join().expect("reader"), vec![0u8; PAGE]);
    }

    #[test]
    fn test_fault_outside_announced_regions_fails_the_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        let mut vmm = FakeVmm::new();
        let connection = UnixStream::connect(&path).expect("connect");
        // Announce only the first region: the other half is registered but unannounced.
        let regions = vmm.regions()[..1].to_vec();
        send(
            &connection,
            &regions,
            vmm.uffd.as_ref().expect("uffd").as_fd(),
        )
        .expect("send");
        vmm.connection = Some(connection);
        let stuck = vmm.read_page_in_thread(0);
        let error = failed_error(vm.wait_timeout(WAIT).expect("serving ends"));
        assert!(error.contains("outside every announced region"), "{error}");
        vmm.exit();
        stuck.join().expect("reader");
    }

    #[test]
    fn test_accept_timeout_fails_and_removes_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(1);
        let config = PagerConfig {
            accept_timeout: Duration::from_millis(100),
            ..PagerConfig::default()
        };
        let pager = Pager::new(config);
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        assert!(path.exists());
        let error = failed_error(vm.wait_timeout(WAIT).expect("times out"));
        assert!(error.contains("no VMM connected"), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn test_handshake_timeout_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(1);
        let config = PagerConfig {
            accept_timeout: Duration::from_millis(100),
            ..PagerConfig::default()
        };
        let pager = Pager::new(config);
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        let _silent = UnixStream::connect(&path).expect("connect");
        let error = failed_error(vm.wait_timeout(WAIT).expect("times out"));
        assert!(error.contains("no handshake arrived"), "{error}");
    }

    #[test]
    fn test_stop_while_waiting_is_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(1);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let mut vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        let started = Instant::now();
        assert_eq!(vm.stop(), VmState::Stopped);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!path.exists());
    }

    #[test]
    fn test_stop_while_serving_is_stopped_and_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let mut vm = pager
            .register(
                &path,
                file_source(&file),
                single_page("vm").with_prefetch_key("k"),
            )
            .expect("register");
        let vmm = FakeVmm::connect(&path);
        vmm.read_page(3);
        assert_eq!(
            vm.touched(),
            vec![u64::try_from(offset_page(3) * PAGE).expect("small")]
        );
        assert_eq!(vm.stop(), VmState::Stopped);
        assert_eq!(pager.prefetch_store().get("k").expect("recorded").len(), 1);
    }

    #[test]
    fn test_handshake_regions_beyond_source_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES / 2);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        let _vmm = FakeVmm::connect(&path);
        let error = failed_error(vm.wait_timeout(WAIT).expect("rejected"));
        assert!(error.contains("exceeds the source size"), "{error}");
    }

    /// Environment variable that turns [`test_helper_fake_vmm_child`] into a VMM process.
    const CHILD_SOCKET: &str = "WRENN_PAGER_TEST_CHILD_SOCKET";
    /// When set in the child, it reads page 1 (checking its contents) before exiting.
    const CHILD_READ: &str = "WRENN_PAGER_TEST_CHILD_READ";

    /// Not a test of its own: run as a separate process by the tests below, it plays a VMM
    /// that connects to `$WRENN_PAGER_TEST_CHILD_SOCKET`, optionally reads a page, and exits
    /// without any cleanup, so that its memory and userfaultfd die with the process.
    #[test]
    #[ignore = "helper process for the VMM-exit tests"]
    fn test_helper_fake_vmm_child() {
        let Some(path) = std::env::var_os(CHILD_SOCKET) else {
            return;
        };
        let vmm = FakeVmm::connect(Path::new(&path));
        if std::env::var_os(CHILD_READ).is_some()
            && vmm.read_page(1) != page_contents(offset_page(1))
        {
            std::process::exit(3);
        }
        std::process::exit(0);
    }

    fn run_child_vmm(path: &Path, read: bool) -> std::process::Child {
        let mut command = std::process::Command::new(std::env::current_exe().expect("test binary"));
        command
            .args([
                "--exact",
                "server::tests::test_helper_fake_vmm_child",
                "--ignored",
                "--quiet",
            ])
            .env(CHILD_SOCKET, path)
            .stdout(std::process::Stdio::null());
        if read {
            command.env(CHILD_READ, "1");
        }
        command.spawn().expect("spawn the child VMM")
    }

    #[test]
    fn test_vmm_process_exit_ends_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        let vm = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect("register");
        let mut child = run_child_vmm(&path, true);
        let status = child.wait().expect("child exit");
        assert!(status.success(), "child VMM failed: {status}");
        assert_eq!(vm.wait_timeout(WAIT), Some(VmState::Ended));
        let stats = vm.stats();
        assert_eq!(
            stats.peer_pid,
            Some(i32::try_from(child.id()).expect("pid"))
        );
        assert!(stats.counters.faults >= 1);
    }

    #[test]
    fn test_copy_after_vmm_process_exit_is_process_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(&dir, "raw");
        let listener = UnixListener::bind(&path).expect("bind");
        let mut child = run_child_vmm(&path, false);
        let (connection, _) = listener.accept().expect("accept");
        assert!(child.wait().expect("child exit").success());
        let source_size = u64::try_from(PAGES * PAGE).expect("small");
        let handshake = handshake::receive(&connection, 4096, source_size).expect("handshake");
        let base = handshake.regions.regions()[0].base;
        let page = vec![1u8; PAGE];
        assert_eq!(
            handshake.uffd.copy(base, &page, true).expect("copy"),
            crate::uffd::Install::ProcessGone
        );
    }

    #[test]
    fn test_pager_and_handle_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pager>();
        assert_send_sync::<VmHandle>();
    }

    #[test]
    fn test_vm_state_serializes_as_snake_case() {
        let failed = VmState::Failed {
            error: "boom".into(),
        };
        assert_eq!(
            serde_json::to_string(&VmState::Serving).expect("json"),
            r#""serving""#
        );
        assert_eq!(
            serde_json::to_string(&failed).expect("json"),
            r#"{"failed":{"error":"boom"}}"#
        );
    }

    #[test]
    fn test_register_existing_path_is_bind_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(1);
        let pager = Pager::new(PagerConfig::default());
        let path = socket_path(&dir, "vm");
        std::fs::write(&path, b"").expect("occupy the path");
        let err = pager
            .register(&path, file_source(&file), VmOptions::new("vm"))
            .expect_err("bind");
        assert!(matches!(err, PagerError::Bind { .. }), "{err}");
        assert!(err.to_string().contains("vm.sock"), "{err}");
    }

    // ---- fault-around (default window: 16 pages) -------------------------------------------
    //
    // Memory page p of the fake VMM holds flat page (p + 32) % 64, so memory pages 0..16 are
    // the aligned window of flat pages 32..48, inside region 1 (flat pages 32..64).

    fn to_u64(value: usize) -> u64 {
        u64::try_from(value).expect("small")
    }

    /// Registers a VM with `options` and connects a fake VMM to it.
    fn serve(
        pager: &Pager,
        dir: &tempfile::TempDir,
        source: Arc<dyn PageSource>,
        options: VmOptions,
    ) -> (VmHandle, FakeVmm) {
        let path = socket_path(dir, &options.name.clone());
        let vm = pager.register(&path, source, options).expect("register");
        let vmm = FakeVmm::connect(&path);
        (vm, vmm)
    }

    /// Which memory pages (of all `PAGES`) are resident.
    fn resident_pages(vmm: &FakeVmm) -> Vec<usize> {
        let resident = vmm.memory.resident(0, PAGES * PAGE);
        (0..PAGES).filter(|page| resident[*page]).collect()
    }

    /// Reads memory pages `pages` and checks each against the source.
    fn assert_pages_match_source(vmm: &FakeVmm, pages: impl IntoIterator<Item = usize>) {
        for page in pages {
            assert_eq!(
                vmm.read_page(page),
                page_contents(offset_page(page)),
                "page {page}"
            );
        }
    }

    #[test]
    fn test_fault_around_installs_the_window_before_it_is_touched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), VmOptions::new("vm"));
        assert_eq!(vmm.read_page(5), page_contents(offset_page(5)));
        assert_eq!(
            resident_pages(&vmm),
            (0..16).collect::<Vec<_>>(),
            "the whole window, in place as the fault returns"
        );
        wait_until("the fault's stats", || {
            vm.stats().counters.fault_latency.count == 1
        });
        assert_pages_match_source(&vmm, 0..16);
        let counters = vm.stats().counters;
        assert_eq!(counters.faults, 1, "{counters:?}");
        assert_eq!(counters.around_pages, 15, "{counters:?}");
        assert_eq!(
            counters.pages_copied, 16,
            "one mixed run, copied: {counters:?}"
        );
    }

    #[test]
    fn test_fault_around_reads_match_source_across_two_regions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let (vm, mut vmm) = serve(&pager, &dir, file_source(&file), VmOptions::new("vm"));
        assert_pages_match_source(&vmm, 0..PAGES);
        wait_until("the last fault's stats", || {
            vm.stats().counters.fault_latency.count == 4
        });
        let counters = vm.stats().counters;
        assert_eq!(counters.faults, 4, "one per window: {counters:?}");
        assert_eq!(counters.around_pages, 60, "{counters:?}");
        assert_eq!(
            counters.pages_copied + counters.zero_pages,
            64,
            "{counters:?}"
        );
        assert_eq!(counters.eexist, 0, "{counters:?}");
        vmm.exit();
        assert_eq!(vm.wait_timeout(WAIT), Some(VmState::Ended));
    }

    #[test]
    fn test_fault_around_stops_at_the_region_edge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        // A 64-page window spans both regions; only the faulting page's region is served.
        let options = VmOptions::new("vm").with_fault_around(64);
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), options);
        // Memory page 40 is flat page 8, in region 0 = memory pages 32..64.
        assert_eq!(vmm.read_page(40), page_contents(offset_page(40)));
        assert_eq!(resident_pages(&vmm), (32..64).collect::<Vec<_>>());
        wait_until("the fault's stats", || {
            vm.stats().counters.fault_latency.count == 1
        });
        assert_eq!(vm.stats().counters.around_pages, 31);
        assert_pages_match_source(&vmm, 32..64);
    }

    #[test]
    fn test_fault_around_skips_pages_already_installed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        // The prefetcher installs memory pages 2 and 9 first; the window must go around them.
        let prefetched = [2usize, 9];
        let set = prefetched
            .map(|page| to_u64(offset_page(page) * PAGE))
            .to_vec();
        pager.prefetch_store().insert("k", set);
        let options = VmOptions::new("vm").with_prefetch_key("k");
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), options);
        wait_until("the prefetch", || vm.stats().counters.prefetched_pages == 2);
        assert_eq!(vmm.read_page(5), page_contents(offset_page(5)));
        wait_until("the window's other runs", || {
            resident_pages(&vmm) == (0..16).collect::<Vec<_>>()
        });
        wait_until("the fault's stats", || {
            vm.stats().counters.around_pages == 13
        });
        assert_pages_match_source(&vmm, 0..16);
        let counters = vm.stats().counters;
        assert_eq!(counters.faults, 1, "{counters:?}");
        assert_eq!(
            counters.eexist, 0,
            "the bitmap kept the runs off them: {counters:?}"
        );
    }

    #[test]
    fn test_fault_around_partial_copy_before_the_fault_serves_it_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), VmOptions::new("vm"));
        // Memory page 7 appears behind the pager's back: its run copy stops there.
        let foreign = vec![0xabu8; PAGE];
        let uffd = vmm.uffd.as_ref().expect("uffd");
        let page7 = vmm.memory.addr() + to_u64(7 * PAGE);
        assert_eq!(
            uffd.copy(page7, &foreign, true).expect("copy"),
            crate::uffd::Install::Done
        );
        assert_eq!(vmm.read_page(9), page_contents(offset_page(9)));
        wait_until("the fault's stats", || {
            vm.stats().counters.fault_latency.count == 1
        });
        let mut expected: Vec<usize> = (0..8).collect();
        expected.push(9);
        assert_eq!(
            resident_pages(&vmm),
            expected,
            "the copied prefix and the fault"
        );
        assert_eq!(vmm.read_page(7), foreign, "never overwritten");
        assert_pages_match_source(&vmm, 0..7);
        let counters = vm.stats().counters;
        assert_eq!(counters.around_pages, 7, "{counters:?}");
        assert_eq!(counters.faults, 1, "{counters:?}");
    }

    #[test]
    fn test_fault_around_partial_copy_past_the_fault_serves_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), VmOptions::new("vm"));
        let uffd = vmm.uffd.as_ref().expect("uffd");
        let page12 = vmm.memory.addr() + to_u64(12 * PAGE);
        assert_eq!(
            uffd.copy(page12, &vec![0xcdu8; PAGE], true).expect("copy"),
            crate::uffd::Install::Done
        );
        assert_eq!(vmm.read_page(5), page_contents(offset_page(5)));
        assert_eq!(resident_pages(&vmm), (0..13).collect::<Vec<_>>());
        wait_until("the fault's stats", || {
            vm.stats().counters.fault_latency.count == 1
        });
        let counters = vm.stats().counters;
        assert_eq!(counters.around_pages, 11, "{counters:?}");
        assert_eq!(counters.faults, 1, "{counters:?}");
        assert_pages_match_source(&vmm, 0..12);
    }

    #[test]
    fn test_fault_around_skips_a_removed_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), VmOptions::new("vm"));
        // Returns once the pager has read (and applied) the REMOVE.
        vmm.memory.dontneed(2 * PAGE, 2 * PAGE);
        assert_eq!(vmm.read_page(5), page_contents(offset_page(5)));
        wait_until("the window's other runs", || {
            resident_pages(&vmm) == [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        });
        assert_eq!(vmm.read_page(2), vec![0u8; PAGE], "removed: zeros");
        assert_eq!(vmm.read_page(3), vec![0u8; PAGE], "removed: zeros");
        assert_pages_match_source(&vmm, [0, 1, 4, 6, 15]);
        let counters = vm.stats().counters;
        assert_eq!(counters.remove_events, 1, "{counters:?}");
        assert_eq!(counters.faults, 3, "{counters:?}");
    }

    #[test]
    fn test_fault_around_all_zero_window_is_zero_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Flat pages 16..32 (memory pages 48..64) are all zeros.
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for page in 0..PAGES {
            let contents = if (16..32).contains(&page) {
                vec![0u8; PAGE]
            } else {
                page_contents(page)
            };
            file.write_all(&contents).expect("write");
        }
        let pager = Pager::new(PagerConfig::default());
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), VmOptions::new("vm"));
        assert_eq!(vmm.read_page(52), vec![0u8; PAGE]);
        assert_eq!(resident_pages(&vmm), (48..64).collect::<Vec<_>>());
        wait_until("the fault's stats", || {
            vm.stats().counters.fault_latency.count == 1
        });
        let counters = vm.stats().counters;
        assert_eq!(counters.zero_pages, 16, "{counters:?}");
        assert_eq!(counters.pages_copied, 0, "{counters:?}");
        assert_eq!(counters.bytes_copied, 0, "{counters:?}");
        for page in 48..64 {
            assert_eq!(vmm.read_page(page), vec![0u8; PAGE], "page {page}");
        }
    }

    #[test]
    fn test_fault_around_one_serves_the_faulting_page_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), single_page("vm"));
        assert_eq!(vmm.read_page(5), page_contents(offset_page(5)));
        assert_eq!(resident_pages(&vmm), vec![5]);
        wait_until("the fault's stats", || {
            vm.stats().counters.fault_latency.count == 1
        });
        let counters = vm.stats().counters;
        assert_eq!(counters.around_pages, 0, "{counters:?}");
        assert_eq!(counters.pages_copied, 1, "{counters:?}");
    }

    #[test]
    fn test_fault_around_recording_feeds_a_coalesced_prefetch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        let options = VmOptions::new("first").with_prefetch_key("build");
        let (first, mut vmm) = serve(&pager, &dir, file_source(&file), options);
        vmm.read_page(5);
        wait_until("the fault's stats", || {
            first.stats().counters.fault_latency.count == 1
        });
        let window: Vec<u64> = (32..48).map(|page| to_u64(page * PAGE)).collect();
        assert_eq!(first.touched(), window, "the window, in offset order");
        vmm.exit();
        assert_eq!(first.wait_timeout(WAIT), Some(VmState::Ended));

        let options = VmOptions::new("second").with_prefetch_key("build");
        let (second, vmm) = serve(&pager, &dir, file_source(&file), options);
        wait_until("the prefetch", || {
            second.stats().counters.prefetched_pages == 16
        });
        assert_eq!(resident_pages(&vmm), (0..16).collect::<Vec<_>>());
        assert_pages_match_source(&vmm, 0..16);
        assert_eq!(second.stats().counters.faults, 0);
    }

    #[test]
    fn test_prefetch_consecutive_pages_split_at_the_region_edge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = memory_file(PAGES);
        let pager = Pager::new(PagerConfig::default());
        // Flat pages 20..40 cross from region 0 (memory 52..64) into region 1 (memory 0..8).
        let set: Vec<u64> = (20..40).map(|page| to_u64(page * PAGE)).collect();
        pager.prefetch_store().insert("k", set);
        let options = VmOptions::new("vm").with_prefetch_key("k");
        let (vm, vmm) = serve(&pager, &dir, file_source(&file), options);
        wait_until("the prefetch", || {
            vm.stats().counters.prefetched_pages == 20
        });
        let mut expected: Vec<usize> = (0..8).collect();
        expected.extend(52..64);
        assert_eq!(resident_pages(&vmm), expected);
        assert_pages_match_source(&vmm, expected.iter().copied());
        assert_eq!(vm.stats().counters.faults, 0);
    }
}
