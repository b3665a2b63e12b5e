//! The virtio-vsock device: three queues (rx, tx, event), config space = the guest CID.
//!
//! Guest TX packets go to the [`Muxer`]; whatever the muxer has for the guest fills RX
//! buffers. One pass handles everything that is ready, then the guest gets at most one
//! interrupt (exits cost tens of microseconds here), and with `VIRTIO_RING_F_EVENT_IDX` only
//! when the driver asked for one.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{Muxer, connect_nonblocking};
use super::packet::{RxBuffer, read_tx_packet};
use super::{EVENT_TRANSPORT_RESET, LogLimiter, MAX_PKT_DATA, MIN_GUEST_CID, VsockError};
use crate::memory::GuestMemory;
use crate::virtio::persist::{self, DeviceKindState, PersistError, QueueState, VirtioDeviceState};
use crate::virtio::{
    ActivateError, Activation, Interrupt, TYPE_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
};

/// Queue indexes.
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
pub(super) const EVENT: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256; 3];
/// Descriptor chains one queue pass takes before the others get a turn.
const BUDGET: usize = 256;
/// TX-then-RX rounds per wake-up, before yielding to other event sources.
const MAX_ROUNDS: usize = 16;

/// The queues and memory the driver handed over at DRIVER_OK.
#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    event: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio-vsock device whose host side is Firecracker's unix-socket multiplexer.
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    /// Written when activation, reset or a transport reset happened on another thread, so
    /// the event loop catches up (polls the listener, closes dropped streams).
    pub(super) control_evt: EventFd,
    active: Option<Active>,
    pub(super) muxer: Muxer,
    /// One packet's payload, both directions.
    scratch: Vec<u8>,
    /// The socket file we created, to remove it on drop only if it is still ours.
    socket_id: Option<(u64, u64)>,
    log: LogLimiter,
}

impl Vsock {
    /// Checks the CID and listens on `uds_path`.
    pub fn new(config: &crate::api::models::Vsock) -> Result<Vsock, VsockError> {
        if config.guest_cid < MIN_GUEST_CID {
            return Err(VsockError::GuestCid(config.guest_cid));
        }
        if config.uds_path.is_empty() {
            return Err(VsockError::EmptyPath);
        }
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::Fd);
        let queue_events = vec![new_evt()?, new_evt()?, new_evt()?];
        let control_evt = new_evt()?;
        let timer = TimerFd::new().map_err(|e| VsockError::Fd(e.into()))?;
        // The timer may be re-armed between epoll reporting it and our read of it; a blocking
        // read would then stall the event loop until the new expiry.
        set_nonblocking(timer.as_raw_fd()).map_err(VsockError::Fd)?;

        // Last, so an error above leaves no socket file behind.
        let path = PathBuf::from(&config.uds_path);
        let listener = bind_listener(&path)?;
        let socket_id = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if let Err(source) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(&path);
            return Err(VsockError::Bind { path, source });
        }
        let guest_cid = u64::from(config.guest_cid);
        Ok(Vsock {
            guest_cid,
            acked_features: 0,
            queue_events,
            control_evt,
            active: None,
            muxer: Muxer::new(guest_cid, path, listener, timer),
            scratch: vec![0; MAX_PKT_DATA],
            socket_id,
            log: LogLimiter::new(),
        })
    }

    /// Where host processes connect (and, with `_<port>`, where guest connections go).
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Open connections (not counting host streams still sending their `CONNECT` line).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Tells the driver that every connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET):
    /// done on restore, since connections are not saved. The host streams are closed too.
    pub fn send_transport_reset(&mut self) {
        self.muxer.forget_all();
        // The event loop takes the closed streams out of epoll.
        if let Err(e) = self.control_evt.write(1) {
            tracing::error!("vsock: cannot wake the event loop: {e}");
        }
        let Some(active) = self.active.as_mut() else {
            tracing::debug!("vsock: transport reset on an inactive device");
            return;
        };
        let mem = &active.mem;
        let Some(chain) = active.event.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: the guest posted no event buffer for the transport reset");
            return;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut writer) if writer.available_bytes() >= 4 => writer
                .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                .map(|()| 4)
                .unwrap_or(0),
            _ => {
                tracing::warn!("vsock: the guest's event buffer is unusable");
                0
            }
        };
        if let Err(e) = active.event.add_used(mem, head, written) {
            tracing::error!("vsock: event queue: {e}");
            return;
        }
        signal_if_needed(&mut active.event, mem, &active.interrupt);
    }

    /// Runs both queues until nothing moves, then interrupts the guest at most once.
    pub(super) fn run_queues(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut rx_used = 0usize;
        let mut tx_used = 0usize;
        let mut unfinished = false;
        for round in 1..=MAX_ROUNDS {
            let tx = process_tx(active, &mut self.muxer, &mut self.scratch, &mut self.log);
            tx_used += tx.used;
            self.muxer.settle();
            let rx = process_rx(active, &mut self.muxer, &mut self.scratch, &mut self.log);
            rx_used += rx;
            self.muxer.settle();
            // Sending made room for more replies, more is waiting, or TX ran out of budget.
            let again = tx.out_of_budget || (rx > 0 && (tx.stalled || self.muxer.has_rx()));
            if !again {
                break;
            }
            unfinished = round == MAX_ROUNDS;
        }
        if unfinished {
            // A guest that keeps both rings busy does not keep the loop from its other fds;
            // carry on at the next turn.
            if let Err(e) = self.control_evt.write(1) {
                tracing::error!("vsock: cannot wake the event loop: {e}");
            }
        }
        let mut signal = false;
        if rx_used > 0 {
            signal |= needs_notification(&mut active.rx, &active.mem);
        }
        if tx_used > 0 {
            signal |= needs_notification(&mut active.tx, &active.mem);
        }
        if signal && let Err(e) = active.interrupt.signal_used_queue() {
            tracing::error!("vsock: cannot interrupt the guest: {e}");
        }
    }

    pub(super) fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub(super) fn queue_event(&self, index: usize) -> Option<&EventFd> {
        self.queue_events.get(index)
    }
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path())
            .field("acked_features", &self.acked_features)
            .field("active", &self.active.is_some())
            .field("connections", &self.connection_count())
            .finish_non_exhaustive()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove the socket file unless someone replaced it since (e.g. a restored VM that
        // listens on the same path).
        let path = self.muxer.uds_path();
        let still_ours = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
            .is_some_and(|id| Some(id) == self.socket_id);
        if still_ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The CID is read-only.
        if self.log.allow() {
            tracing::warn!(
                "vsock: guest wrote {} bytes of config space at {offset}",
                data.len()
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            interrupt,
        } = activation;
        let ready = queues.iter().filter(|q| q.ready()).count();
        if queues.len() != QUEUE_SIZES.len() || ready != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                want: QUEUE_SIZES.len(),
                got: ready,
            });
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = queues;
        for (index, queue) in queues.iter_mut().enumerate() {
            queue.set_event_idx(event_idx);
            if !queue.is_valid(&mem) {
                return Err(ActivateError::Device(format!(
                    "vsock queue {index} does not fit in guest memory"
                )));
            }
        }
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount {
                want: QUEUE_SIZES.len(),
                got: 0,
            });
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            event,
            interrupt,
        });
        // The event loop starts polling the listener and looks at the queues.
        self.control_evt.write(1)?;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.muxer.forget_all();
        if let Err(e) = self.control_evt.write(1) {
            tracing::error!("vsock: cannot wake the event loop: {e}");
        }
    }

    /// Connections are not saved (nor is anything of the muxer): the queues are all there is.
    fn save_state(&self) -> VirtioDeviceState {
        let queues = self
            .active
            .as_ref()
            .map(|a| [&a.rx, &a.tx, &a.event].map(QueueState::from).to_vec())
            .unwrap_or_default();
        persist::device_state(self, queues, DeviceKindState::Vsock {})
    }

    /// An activated device comes back on its queues and at once tells the guest that every
    /// connection is gone (TRANSPORT_RESET, in the event buffer the guest posted before the
    /// snapshot). The guest CID and the socket path are this device's, not the snapshot's.
    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), PersistError> {
        persist::restore_device(self, "vsock", state, mem, interrupt)?;
        if self.is_active() {
            self.send_transport_reset();
        }
        Ok(())
    }
}

#[derive(Debug)]
struct TxOutcome {
    used: usize,
    /// Stopped because replies wait for RX buffers; resume when they are sent.
    stalled: bool,
    /// Stopped with packets still queued, to let others run.
    out_of_budget: bool,
}

/// Takes the packets the guest queued for sending (up to [`BUDGET`]).
fn process_tx(
    active: &mut Active,
    muxer: &mut Muxer,
    scratch: &mut [u8],
    log: &mut LogLimiter,
) -> TxOutcome {
    let mem = &active.mem;
    let queue = &mut active.tx;
    let mut outcome = TxOutcome {
        used: 0,
        stalled: false,
        out_of_budget: false,
    };
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            tracing::error!("vsock: tx queue: {e}");
        }
        let mut popped = false;
        loop {
            if muxer.rx_backlog_full() {
                outcome.stalled = true;
                return outcome;
            }
            if outcome.used >= BUDGET {
                outcome.out_of_budget = true;
                return outcome;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            popped = true;
            let head = chain.head_index();
            match read_tx_packet(mem, chain, scratch) {
                Ok((header, len)) => muxer.handle_guest_packet(&header, &scratch[..len]),
                Err(e) => {
                    if log.allow() {
                        tracing::warn!("vsock: dropping a malformed TX packet: {e}");
                    }
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0)
                && log.allow()
            {
                tracing::warn!("vsock: tx queue: {e}");
            }
            outcome.used += 1;
        }
        match queue.enable_notification(mem) {
            // More arrived while notifications were off.
            Ok(true) if popped => {}
            // The ring says there is more but none could be taken: the driver broke it.
            Ok(true) => {
                if log.allow() {
                    tracing::warn!("vsock: the guest's TX ring is inconsistent");
                }
                return outcome;
            }
            Ok(false) => return outcome,
            Err(e) => {
                tracing::error!("vsock: tx queue: {e}");
                return outcome;
            }
        }
    }
}

/// Fills guest RX buffers with whatever the muxer has, until either runs out (or [`BUDGET`]).
fn process_rx(
    active: &mut Active,
    muxer: &mut Muxer,
    scratch: &mut [u8],
    log: &mut LogLimiter,
) -> usize {
    let mem = &active.mem;
    let queue = &mut active.rx;
    let mut used = 0;
    let mut rechecked = false;
    while muxer.has_rx() && used < BUDGET {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Out of buffers: have the guest notify us when it adds some. If the ring claims
            // more right away, look once more; a ring that keeps claiming is broken.
            match queue.enable_notification(mem) {
                Ok(true) if !rechecked => {
                    rechecked = true;
                    continue;
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::error!("vsock: rx queue: {e}");
                    break;
                }
            }
        };
        rechecked = false;
        let head = chain.head_index();
        let written = match RxBuffer::new(mem, chain) {
            Ok(buffer) => {
                let room = buffer.data_capacity().min(scratch.len());
                let Some((header, len)) = muxer.next_rx(&mut scratch[..room]) else {
                    // Nothing could be sent after all; leave the buffer for next time.
                    queue.go_to_previous_position();
                    break;
                };
                buffer.write(header, &scratch[..len])
            }
            Err(e) => {
                if log.allow() {
                    tracing::warn!("vsock: returning an unusable RX buffer: {e}");
                }
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, written)
            && log.allow()
        {
            tracing::warn!("vsock: rx queue: {e}");
        }
        used += 1;
    }
    used
}

fn needs_notification(queue: &mut Queue, mem: &GuestMemory) -> bool {
    queue.needs_notification(mem).unwrap_or_else(|e| {
        tracing::error!("vsock: queue: {e}");
        true
    })
}

fn signal_if_needed(queue: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) {
    if needs_notification(queue, mem)
        && let Err(e) = interrupt.signal_used_queue()
    {
        tracing::error!("vsock: cannot interrupt the guest: {e}");
    }
}

/// Listens on `path`. A file already there is replaced only if it is a socket nobody listens
/// on (left behind by a VMM that died); anything else is an error.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let bind_error = |source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(listener) => return Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(bind_error(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(bind_error)?;
    if !meta.file_type().is_socket() {
        return Err(VsockError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    // Someone answers (or has a full backlog, which also means alive): leave it alone.
    let alive = match connect_nonblocking(path) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => false,
        Err(e) => return Err(bind_error(e)),
    };
    if alive {
        return Err(VsockError::InUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(bind_error)?;
    UnixListener::bind(path).map_err(bind_error)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no pointer; `fd` is open and owned by the caller.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int; `fd` is open and owned by the caller.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
