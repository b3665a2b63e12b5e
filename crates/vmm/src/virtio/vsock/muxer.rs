//! The host side: the listening socket at `uds_path`, the `CONNECT` handshake, the connection
//! table, and what goes to the guest next.
//!
//! Work happens in three steps per event-loop wake-up, so that epoll is touched once per
//! connection and nothing is forgotten:
//! 1. events and guest packets change connections and mark them dirty;
//! 2. [`Muxer::settle`] turns each dirty connection's state into work: queue it for RX, arm its
//!    deadline, reset it when it is done;
//! 3. after the queues ran, [`Muxer::sync_epoll`] updates what each stream is polled for and
//!    deregisters streams of connections that are gone (an fd must leave epoll before it closes).
//!
//! Streams are polled for reading only while the guest can take their data: a connection with
//! host data waiting for an RX buffer is not polled, so an idle guest never causes a busy loop.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnError, ConnKey, ConnState, Connection, EpollReg, Produced, pending};
use super::event_handler::TOKEN_LISTENER;
use super::packet::PacketHeader;
use super::{
    CONNECT_LINE_MAX, HOST_CID, LOCAL_PORT_END, LOCAL_PORT_FIRST, LogLimiter, MAX_CONNECTIONS,
    MAX_PENDING_RST, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, REQUEST_TIMEOUT, SHUTDOWN_TIMEOUT, TYPE_STREAM,
};

/// Event-loop token (the `data` of an epoll registration) of every host stream.
pub(super) const TOKEN_STREAM: u32 = 100;

/// How long the listener rests after `accept` fails for lack of fds.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Something waiting for a guest RX buffer.
#[derive(Clone, Copy, Debug)]
enum RxEntry {
    /// A connection with pending packets (it builds them when a buffer is there).
    Conn(ConnKey),
    /// RST for a connection that does not exist (any more).
    Rst { key: ConnKey, from_guest: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    Conn(ConnKey),
    Handshake(RawFd),
    Listener,
}

/// A host stream that connected to `uds_path` and has not finished its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Timeouts and limits, fixed in production, shortened by tests.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: REQUEST_TIMEOUT,
            shutdown_timeout: SHUTDOWN_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

#[derive(Debug)]
pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    pub listener: UnixListener,
    pub timer: TimerFd,
    pub limits: Limits,
    /// Whether the listener is polled: only while the device is active and accept works.
    listener_polled: bool,
    listener_backoff: bool,
    timer_armed_for: Option<Instant>,
    deadlines: BinaryHeap<Reverse<(Instant, Deadline)>>,
    conns: HashMap<ConnKey, Connection>,
    conn_by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Local ports handed out to host-initiated connections.
    local_ports: HashSet<u32>,
    last_local_port: u32,
    rxq: VecDeque<RxEntry>,
    /// RST entries in `rxq` that answer guest packets (bounded by [`MAX_PENDING_RST`]).
    pending_guest_rst: usize,
    dirty: Vec<ConnKey>,
    epoll_dirty: Vec<ConnKey>,
    /// Streams to take out of epoll before they close: (stream, registered).
    graveyard: Vec<(UnixStream, bool)>,
    log: LogLimiter,
}

/// Marks a connection for [`Muxer::settle`] and hands it out.
fn touch<'a>(
    conns: &'a mut HashMap<ConnKey, Connection>,
    dirty: &mut Vec<ConnKey>,
    key: ConnKey,
) -> Option<&'a mut Connection> {
    let conn = conns.get_mut(&key)?;
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(key);
    }
    Some(conn)
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener, timer: TimerFd) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            timer,
            limits: Limits::default(),
            listener_polled: false,
            listener_backoff: false,
            timer_armed_for: None,
            deadlines: BinaryHeap::new(),
            conns: HashMap::new(),
            conn_by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            local_ports: HashSet::new(),
            last_local_port: LOCAL_PORT_FIRST - 1,
            rxq: VecDeque::new(),
            pending_guest_rst: 0,
            dirty: Vec::new(),
            epoll_dirty: Vec::new(),
            graveyard: Vec::new(),
            log: LogLimiter::new(),
        }
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether anything waits for a guest RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// When replies to guest packets pile up (the guest sends but posts no RX buffers), guest
    /// TX is left in the ring until they drain.
    pub fn rx_backlog_full(&self) -> bool {
        self.pending_guest_rst >= MAX_PENDING_RST
    }

    fn in_use(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    // ---- host side --------------------------------------------------------------------------

    /// The listener is readable: take every waiting host connection.
    pub fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Out of fds, most likely: the listener stays readable, so rest instead of
                    // spinning on it.
                    tracing::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    self.listener_backoff = true;
                    self.add_deadline(Instant::now() + ACCEPT_BACKOFF, Deadline::Listener);
                    return;
                }
            };
            if self.in_use() >= self.limits.max_connections {
                tracing::warn!(
                    "vsock: {} connections open, refusing a host connection",
                    self.in_use()
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("vsock: cannot make a host stream non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = ops.add(Events::with_data(&stream, TOKEN_STREAM, EventSet::IN)) {
                tracing::error!("vsock: cannot poll a host stream: {e:?}");
                continue;
            }
            let deadline = Instant::now() + self.limits.request_timeout;
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::with_capacity(CONNECT_LINE_MAX),
                    deadline,
                },
            );
            self.add_deadline(deadline, Deadline::Handshake(fd));
        }
    }

    /// A host stream has an event: either a handshake in progress or a connection.
    pub fn stream_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        if self.handshakes.contains_key(&fd) {
            self.handshake_event(fd, events, ops);
            return;
        }
        let Some(&key) = self.conn_by_fd.get(&fd) else {
            // Not ours any more (it was closed in this same batch).
            return;
        };
        let Some(conn) = touch(&mut self.conns, &mut self.dirty, key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            self.kill(key, &"host stream error");
            return;
        }
        if events.contains(EventSet::HANG_UP)
            && let Err(e) = conn.on_host_hang_up()
        {
            self.kill(key, &e);
            return;
        }
        if events.contains(EventSet::IN) {
            conn.on_host_readable();
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP)
            && let Err(e) = conn.flush()
        {
            self.kill(key, &e);
        }
    }

    fn handshake_event(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        // One byte at a time, so bytes after the newline stay in the stream for the guest.
        let mut byte = [0u8; 1];
        let outcome = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before the CONNECT line ended"),
                Ok(_) => {
                    hs.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break parse_connect_line(&hs.line).ok_or("malformed CONNECT line");
                    }
                    if hs.line.len() >= CONNECT_LINE_MAX {
                        break Err("CONNECT line too long");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                        break Err("hung up during the CONNECT line");
                    }
                    return;
                }
                Err(_) => break Err("read error during the CONNECT line"),
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let port = match outcome {
            Ok(port) if self.conns.len() < self.limits.max_connections => port,
            Ok(_) => {
                tracing::warn!("vsock: connection limit reached, closing a host connection");
                let _ = ops.remove(Events::empty(&hs.stream));
                return;
            }
            Err(why) => {
                tracing::debug!("vsock: closing host stream: {why}");
                let _ = ops.remove(Events::empty(&hs.stream));
                return;
            }
        };
        let Some(local_port) = self.allocate_local_port(port) else {
            let _ = ops.remove(Events::empty(&hs.stream));
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::host_initiated(key, hs.stream);
        conn.epoll = EpollReg::Added(EventSet::IN);
        self.local_ports.insert(local_port);
        self.conn_by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        touch(&mut self.conns, &mut self.dirty, key);
    }

    /// The next local port after the last one handed out, in [2^30, 2^31), skipping ports in
    /// use. There are far fewer connections than ports, so this ends quickly.
    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        let mut port = self.last_local_port;
        for _ in 0..=self.limits.max_connections {
            port = port.wrapping_add(1);
            if !(LOCAL_PORT_FIRST..LOCAL_PORT_END).contains(&port) {
                port = LOCAL_PORT_FIRST;
            }
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.local_ports.contains(&port) && !self.conns.contains_key(&key) {
                self.last_local_port = port;
                return Some(port);
            }
        }
        None
    }

    // ---- guest side -------------------------------------------------------------------------

    /// One packet from the guest's TX queue.
    pub fn handle_guest_packet(&mut self, header: &PacketHeader, data: &[u8]) {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            if self.log.allow() {
                tracing::warn!(
                    "vsock: dropping packet from CID {} to CID {}",
                    header.src_cid,
                    header.dst_cid
                );
            }
            return;
        }
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.type_ != TYPE_STREAM {
            if header.op != OP_RST {
                self.reply_rst(key);
            }
            return;
        }
        let Some(conn) = touch(&mut self.conns, &mut self.dirty, key) else {
            match header.op {
                OP_REQUEST => self.guest_connect(key, header),
                OP_RST => {}
                _ => self.reply_rst(key),
            }
            return;
        };
        conn.update_peer_credit(header.buf_alloc, header.fwd_cnt);
        let result = match header.op {
            OP_RST => {
                self.forget(key);
                return;
            }
            OP_RESPONSE => conn.on_response(),
            OP_RW => conn.on_guest_data(data),
            OP_SHUTDOWN => conn.on_guest_shutdown(header.flags),
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                conn.add_pending(pending::CREDIT_UPDATE);
                Ok(())
            }
            OP_REQUEST => Err(ConnError::Protocol("REQUEST on an open connection")),
            _ => Err(ConnError::Protocol("unknown operation")),
        };
        if let Err(e) = result {
            self.kill(key, &e);
        }
    }

    /// The guest connects to host port P: connect to `<uds_path>_P`.
    fn guest_connect(&mut self, key: ConnKey, request: &PacketHeader) {
        if self.in_use() >= self.limits.max_connections {
            if self.log.allow() {
                tracing::warn!("vsock: connection limit reached, refusing a guest connection");
            }
            self.reply_rst(key);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to {} refused: {e}",
                    Path::new(&path).display()
                );
                self.reply_rst(key);
                return;
            }
        };
        self.conn_by_fd.insert(stream.as_raw_fd(), key);
        self.conns
            .insert(key, Connection::guest_initiated(key, stream, request));
        touch(&mut self.conns, &mut self.dirty, key);
    }

    fn reply_rst(&mut self, key: ConnKey) {
        if self.pending_guest_rst >= MAX_PENDING_RST {
            return;
        }
        self.pending_guest_rst += 1;
        self.rxq.push_back(RxEntry::Rst {
            key,
            from_guest: true,
        });
    }

    // ---- ending connections -----------------------------------------------------------------

    /// Resets a connection: closes the host stream and sends the guest RST.
    fn kill(&mut self, key: ConnKey, why: &dyn fmt::Display) {
        if self.log.allow() {
            tracing::debug!(
                "vsock: resetting connection {}:{}: {why}",
                key.local_port,
                key.peer_port
            );
        }
        if self.forget(key) {
            self.rxq.push_back(RxEntry::Rst {
                key,
                from_guest: false,
            });
        }
    }

    /// Drops a connection without telling the guest. Returns whether it existed.
    fn forget(&mut self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.remove(&key) else {
            return false;
        };
        self.conn_by_fd.remove(&conn.stream.as_raw_fd());
        if conn.host_initiated {
            self.local_ports.remove(&key.local_port);
        }
        let registered = matches!(conn.epoll, EpollReg::Added(_));
        self.graveyard.push((conn.stream, registered));
        true
    }

    /// The driver is gone (device reset, or a transport reset event): drop every connection
    /// without RST and everything queued for the guest.
    pub fn forget_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.forget(key);
        }
        self.rxq.clear();
        self.pending_guest_rst = 0;
    }

    // ---- timeouts ---------------------------------------------------------------------------

    fn add_deadline(&mut self, when: Instant, what: Deadline) {
        self.deadlines.push(Reverse((when, what)));
        self.rearm_timer();
    }

    fn rearm_timer(&mut self) {
        let next = self.deadlines.peek().map(|Reverse((when, _))| *when);
        if next == self.timer_armed_for {
            return;
        }
        self.timer_armed_for = next;
        let result = match next {
            // A zero duration would disarm the timer.
            Some(when) => self.timer.reset(
                when.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            tracing::error!("vsock: cannot arm the timer: {e}");
        }
    }

    /// The timer fired: reset connections and drop handshakes whose time is up.
    pub fn expire(&mut self) {
        self.timer_armed_for = None;
        let now = Instant::now();
        while let Some(&Reverse((when, what))) = self.deadlines.peek() {
            if when > now {
                break;
            }
            self.deadlines.pop();
            match what {
                Deadline::Conn(key) => {
                    let expired = self
                        .conns
                        .get(&key)
                        .is_some_and(|c| c.deadline == Some(when));
                    if expired {
                        self.kill(key, &"timed out");
                    }
                }
                Deadline::Handshake(fd) => {
                    if self.handshakes.get(&fd).is_some_and(|h| h.deadline == when)
                        && let Some(hs) = self.handshakes.remove(&fd)
                    {
                        tracing::debug!("vsock: no CONNECT line in time, closing");
                        self.graveyard.push((hs.stream, true));
                    }
                }
                Deadline::Listener => self.listener_backoff = false,
            }
        }
        self.rearm_timer();
    }

    // ---- the three steps --------------------------------------------------------------------

    /// Step 2: turns the state of each dirty connection into work.
    pub fn settle(&mut self) {
        let now = Instant::now();
        while let Some(key) = self.dirty.pop() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.dirty = false;
            if conn.state == ConnState::GuestClosed && conn.to_host_is_empty() {
                // Both directions are finished and the host has everything.
                self.kill(key, &"closed by the guest");
                continue;
            }
            conn.shutdown_host_write_if_done();
            conn.continue_after_hang_up();
            if conn.needs_credit_update() {
                conn.add_pending(pending::CREDIT_UPDATE);
            }
            if conn.has_pending() && !conn.in_rxq {
                conn.in_rxq = true;
                self.rxq.push_back(RxEntry::Conn(key));
            }
            let timeout = match conn.state {
                ConnState::AwaitingResponse => Some(self.limits.request_timeout),
                ConnState::HostClosed | ConnState::GuestClosed => {
                    Some(self.limits.shutdown_timeout)
                }
                ConnState::Established => None,
            };
            match (timeout, conn.deadline) {
                (Some(timeout), None) => {
                    let when = now + timeout;
                    conn.deadline = Some(when);
                    self.deadlines.push(Reverse((when, Deadline::Conn(key))));
                }
                (None, Some(_)) => conn.deadline = None,
                _ => {}
            }
            if !conn.epoll_dirty {
                conn.epoll_dirty = true;
                self.epoll_dirty.push(key);
            }
        }
        self.rearm_timer();
    }

    /// Builds the next packet for a guest RX buffer with `buf.len()` bytes of payload room.
    /// Returns the header and how many bytes of `buf` are its payload; `None` when there is
    /// nothing to send right now.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        let mut retry = Vec::new();
        let mut found = None;
        while let Some(entry) = self.rxq.pop_front() {
            match entry {
                RxEntry::Rst { key, from_guest } => {
                    if from_guest {
                        self.pending_guest_rst = self.pending_guest_rst.saturating_sub(1);
                    }
                    found = Some((self.rst_header(key), 0));
                    break;
                }
                RxEntry::Conn(key) => {
                    let guest_cid = self.guest_cid;
                    let Some(conn) = touch(&mut self.conns, &mut self.dirty, key) else {
                        continue;
                    };
                    conn.in_rxq = false;
                    match conn.produce(guest_cid, buf) {
                        Produced::Packet(header, len) => {
                            if conn.has_pending() {
                                conn.in_rxq = true;
                                self.rxq.push_back(RxEntry::Conn(key));
                            }
                            found = Some((header, len));
                            break;
                        }
                        Produced::Nothing => {
                            // Still wants to send but this buffer cannot carry it.
                            if conn.has_pending() {
                                conn.in_rxq = true;
                                retry.push(key);
                            }
                        }
                        Produced::Failed(e) => self.kill(key, &e),
                    }
                }
            }
        }
        for key in retry.into_iter().rev() {
            self.rxq.push_front(RxEntry::Conn(key));
        }
        found
    }

    fn rst_header(&self, key: ConnKey) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..PacketHeader::default()
        }
    }

    /// Step 3: brings epoll in line with what each touched stream wants, and takes streams of
    /// finished connections out before they close.
    pub fn sync_epoll(&mut self, ops: &mut EventOps, device_active: bool) {
        for (stream, registered) in self.graveyard.drain(..) {
            if registered {
                let _ = ops.remove(Events::empty(&stream));
            }
        }
        let want_listener = device_active && !self.listener_backoff;
        if want_listener != self.listener_polled {
            let events = if want_listener {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            match ops.modify(Events::with_data(&self.listener, TOKEN_LISTENER, events)) {
                Ok(()) => self.listener_polled = want_listener,
                Err(e) => tracing::error!("vsock: cannot poll the listener: {e:?}"),
            }
        }
        let mut failed = Vec::new();
        for key in self.epoll_dirty.drain(..) {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.epoll_dirty = false;
            let result = match (conn.epoll, conn.desired_events()) {
                (EpollReg::NotAdded, Some(events)) => ops
                    .add(Events::with_data(&conn.stream, TOKEN_STREAM, events))
                    .map(|()| conn.epoll = EpollReg::Added(events)),
                (EpollReg::Added(current), Some(events)) if current != events => ops
                    .modify(Events::with_data(&conn.stream, TOKEN_STREAM, events))
                    .map(|()| conn.epoll = EpollReg::Added(events)),
                (EpollReg::Added(_), None) => ops
                    .remove(Events::empty(&conn.stream))
                    .map(|()| conn.epoll = EpollReg::Removed),
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::error!("vsock: cannot poll a host stream: {e:?}");
                failed.push(key);
            }
        }
        for key in failed {
            self.kill(key, &"epoll failed");
        }
    }
}

/// Parses `CONNECT <port>\n` (keyword in any case, port in decimal).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line.strip_suffix(b"\n")?).ok()?;
    let mut words = text.split_ascii_whitespace();
    let keyword = words.next()?;
    let port = words.next()?;
    if !keyword.eq_ignore_ascii_case("connect") || words.next().is_some() {
        return None;
    }
    port.parse().ok()
}

/// Connects to a unix socket without blocking: a host listener with a full backlog answers
/// EAGAIN instead of stalling the event loop (std only offers a blocking connect).
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: a zeroed sockaddr_un is a valid (empty) address; it is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = path.as_os_str().as_bytes();
    // Leave room for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    let addr_len = libc::socklen_t::try_from(size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a properly initialised sockaddr_un that outlives the call and
    // `addr_len` is its size; the kernel only reads it.
    let ret = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            addr_len,
        )
    };
    if ret < 0 {
        // AF_UNIX connects complete at once: EAGAIN means the backlog is full, and is refused.
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_connect_line_accepts_firecracker_forms() {
        assert_eq!(parse_connect_line(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect_line(b"connect 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"Connect  7 \r\n"), Some(7));
        assert_eq!(parse_connect_line(b"CONNECT 52"), None);
        assert_eq!(parse_connect_line(b"CONNECT\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect_line(b"LISTEN 52\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT 5 2\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT \xff\n"), None);
    }

    #[test]
    fn test_connect_nonblocking_reaches_listener_and_reports_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        io::Write::write_all(&mut &stream, b"x").unwrap();
        let mut b = [0u8; 1];
        accepted.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
