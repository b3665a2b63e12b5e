//! One vsock connection: a guest stream bound to a host unix stream.
//!
//! ```text
//!   host CONNECT ──▶ AwaitingResponse ──guest RESPONSE──▶ Established ◀── guest REQUEST
//!                        │ RST / timeout / host hang-up       │
//!                        ▼                                    ├─ host EOF ──▶ HostClosed  ─┐
//!                      (gone)                                 └─ guest SHUTDOWN(RCV|SEND)  │
//!                                                                  ──▶ GuestClosed ────────┤
//!                                 guest RST, our RST, or the shutdown timeout ──▶ (gone) ◀─┘
//! ```
//!
//! Credit, both ways (virtio 1.2 §5.10.6.3):
//! - guest → host: we advertise `buf_alloc` = [`CONN_TX_BUF_SIZE`] and `fwd_cnt` = guest bytes
//!   written to the host stream. Bytes the host has not taken yet wait in `to_host`, which a
//!   guest honouring credit can never overfill; a guest that overruns it gets RST.
//! - host → guest: we send at most `peer_buf_alloc - (to_guest_cnt - peer_fwd_cnt)` bytes, and
//!   stop reading the host stream while that is zero.
//!
//! The connection never touches the event loop or the queues: it says what it wants
//! ([`Connection::desired_events`], pending packets) and the muxer makes it so.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;

use super::packet::PacketHeader;
use super::{
    CONN_TX_BUF_SIZE, CREDIT_UPDATE_THRESHOLD, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Identifies a connection: our (host-side) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    Established,
    /// The host stream ended; SHUTDOWN(RCV|SEND) went to the guest, which should answer RST.
    HostClosed,
    /// The guest shut down both directions; flush what it sent, then RST.
    GuestClosed,
}

/// Packets a connection has to send the guest, as bits (each is sent once per setting).
pub(super) mod pending {
    pub const REQUEST: u8 = 1 << 0;
    pub const RESPONSE: u8 = 1 << 1;
    pub const CREDIT_REQUEST: u8 = 1 << 2;
    pub const CREDIT_UPDATE: u8 = 1 << 3;
    /// The host stream may have data for the guest.
    pub const RW: u8 = 1 << 4;
    pub const SHUTDOWN: u8 = 1 << 5;
}

/// Where the connection's stream stands with the event loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EpollReg {
    NotAdded,
    Added(EventSet),
    /// Taken out after a hang-up: epoll would report it forever.
    Removed,
}

/// Why a connection must be reset.
#[derive(Debug)]
pub(super) enum ConnError {
    Protocol(&'static str),
    CreditOverrun { buffered: usize, incoming: usize },
    Io(io::Error),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Protocol(what) => write!(f, "protocol violation: {what}"),
            Self::CreditOverrun { buffered, incoming } => write!(
                f,
                "guest sent {incoming} bytes with {buffered} of {CONN_TX_BUF_SIZE} already buffered"
            ),
            Self::Io(e) => write!(f, "host stream: {e}"),
        }
    }
}

/// What a connection put in an RX buffer.
#[derive(Debug)]
pub(super) enum Produced {
    /// A header, with this many payload bytes at the front of the buffer.
    Packet(PacketHeader, usize),
    Nothing,
    Failed(ConnError),
}

enum HostRead {
    Data(usize),
    Eof,
    NoCredit,
    Nothing,
}

#[derive(Debug)]
pub(super) struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    pub state: ConnState,
    pub host_initiated: bool,
    pending: u8,
    /// Muxer bookkeeping: queued for RX, waiting for `settle`, waiting for an epoll update.
    pub in_rxq: bool,
    pub dirty: bool,
    pub epoll_dirty: bool,
    pub epoll: EpollReg,
    pub deadline: Option<Instant>,
    /// The host stream reported a hang-up; it is read (no longer polled) until EOF.
    pub host_hup: bool,

    /// Bytes for the host stream: first `reply_bytes` of our own `OK <port>\n`, then guest data.
    to_host: VecDeque<u8>,
    reply_bytes: usize,
    from_guest_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    to_guest_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    guest_shut_rcv: bool,
    guest_shut_send: bool,
    host_eof: bool,
    host_write_shut: bool,
    /// Writing to the host failed after it closed: guest data is dropped from now on.
    host_write_broken: bool,
}

impl Connection {
    fn new(key: ConnKey, stream: UnixStream, state: ConnState, host_initiated: bool) -> Self {
        Self {
            key,
            stream,
            state,
            host_initiated,
            pending: 0,
            in_rxq: false,
            dirty: false,
            epoll_dirty: false,
            epoll: EpollReg::NotAdded,
            deadline: None,
            host_hup: false,
            to_host: VecDeque::new(),
            reply_bytes: 0,
            from_guest_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            to_guest_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
            host_eof: false,
            host_write_shut: false,
            host_write_broken: false,
        }
    }

    /// The host connected and asked for a guest port: REQUEST the guest.
    pub fn host_initiated(key: ConnKey, stream: UnixStream) -> Self {
        let mut conn = Self::new(key, stream, ConnState::AwaitingResponse, true);
        conn.pending = pending::REQUEST;
        conn
    }

    /// The guest's REQUEST reached a host listener: answer RESPONSE.
    pub fn guest_initiated(key: ConnKey, stream: UnixStream, request: &PacketHeader) -> Self {
        let mut conn = Self::new(key, stream, ConnState::Established, false);
        conn.update_peer_credit(request.buf_alloc, request.fwd_cnt);
        conn.pending = pending::RESPONSE;
        conn
    }

    pub fn has_pending(&self) -> bool {
        self.pending != 0
    }

    pub fn add_pending(&mut self, bits: u8) {
        self.pending |= bits;
    }

    /// A header from us to the guest for this connection, carrying our current credit.
    pub fn header(&mut self, op: u16, guest_cid: u64) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Every guest packet carries its receive buffer size and how much it has consumed.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes the guest can still take. A bogus `fwd_cnt` ahead of what we sent reads as none.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.to_guest_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data may still flow to the guest.
    pub fn can_read(&self) -> bool {
        self.state == ConnState::Established && !self.guest_shut_rcv && !self.host_eof
    }

    /// The events to poll the host stream for; `None` once it must not be polled at all.
    pub fn desired_events(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut events = EventSet::empty();
        if self.can_read() && self.pending & pending::RW == 0 && self.peer_credit() > 0 {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() && !self.host_write_broken {
            events |= EventSet::OUT;
        }
        Some(events)
    }

    /// The host stream is readable.
    pub fn on_host_readable(&mut self) {
        if self.can_read() {
            self.pending |= pending::RW;
        }
    }

    /// The host stream hung up: stop polling it, read what is left, then tell the guest.
    pub fn on_host_hang_up(&mut self) -> Result<(), ConnError> {
        match self.state {
            ConnState::AwaitingResponse => Err(ConnError::Protocol("host left before RESPONSE")),
            ConnState::GuestClosed => Err(ConnError::Protocol("host left while closing")),
            ConnState::Established | ConnState::HostClosed => {
                self.host_hup = true;
                Ok(())
            }
        }
    }

    /// After a hang-up nothing polls the stream: keep reading it through the RX queue, or, if
    /// the guest takes no more data, end the host's side now.
    pub fn continue_after_hang_up(&mut self) {
        if !self.host_hup || self.host_eof {
            return;
        }
        if self.can_read() {
            if self.peer_credit() > 0 {
                self.pending |= pending::RW;
            }
        } else if self.state == ConnState::Established {
            self.close_host_side();
            self.pending |= pending::SHUTDOWN;
        }
    }

    fn close_host_side(&mut self) {
        self.host_eof = true;
        self.pending &= !pending::RW;
        if self.state == ConnState::Established {
            self.state = ConnState::HostClosed;
        }
    }

    /// The guest accepted a host-initiated connection: greet the host.
    pub fn on_response(&mut self) -> Result<(), ConnError> {
        if self.state != ConnState::AwaitingResponse {
            return Err(ConnError::Protocol("unexpected RESPONSE"));
        }
        self.state = ConnState::Established;
        // A guest that answered before hearing the REQUEST gets no REQUEST now.
        self.pending &= !pending::REQUEST;
        let reply = format!("OK {}\n", self.key.local_port);
        self.reply_bytes = reply.len();
        self.to_host.extend(reply.as_bytes());
        self.flush()
    }

    /// Guest payload for the host.
    pub fn on_guest_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        match self.state {
            ConnState::AwaitingResponse => {
                return Err(ConnError::Protocol("data before RESPONSE"));
            }
            // The guest said it sends no more; whatever follows is dropped.
            ConnState::GuestClosed => return Ok(()),
            ConnState::Established | ConnState::HostClosed => {}
        }
        if self.guest_shut_send || data.is_empty() {
            return Ok(());
        }
        let buffered =
            usize::try_from((self.from_guest_cnt - self.fwd_cnt).0).unwrap_or(usize::MAX);
        let limit = usize::try_from(CONN_TX_BUF_SIZE).unwrap_or(usize::MAX);
        if buffered.saturating_add(data.len()) > limit {
            return Err(ConnError::CreditOverrun {
                buffered,
                incoming: data.len(),
            });
        }
        self.from_guest_cnt += wrapping(data.len());
        if self.host_write_broken {
            self.fwd_cnt += wrapping(data.len());
            return Ok(());
        }
        let mut rest = data;
        if self.to_host.is_empty() {
            // Nothing queued ahead: straight to the host, buffer only what it cannot take.
            while !rest.is_empty() {
                match send_to_host(&self.stream, rest) {
                    Ok(0) => return self.write_failed(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.fwd_cnt += wrapping(n);
                        rest = &rest[n..];
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.fwd_cnt += wrapping(rest.len());
                        return self.write_failed(e);
                    }
                }
            }
        }
        self.to_host.extend(rest);
        Ok(())
    }

    /// Writes buffered bytes to the host stream until it would block.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.to_host.is_empty() && !self.host_write_broken {
            let (front, _) = self.to_host.as_slices();
            match send_to_host(&self.stream, front) {
                Ok(0) => return self.write_failed(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.account_written(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.write_failed(e),
            }
        }
        Ok(())
    }

    fn account_written(&mut self, n: usize) {
        let reply = n.min(self.reply_bytes);
        self.reply_bytes -= reply;
        self.fwd_cnt += wrapping(n - reply);
    }

    /// A write error resets the connection, unless the host has already gone: then the rest
    /// of the guest's data is dropped (and counted as consumed, so the guest is not stuck).
    fn write_failed(&mut self, error: io::Error) -> Result<(), ConnError> {
        if !(self.host_eof || self.host_hup) {
            return Err(ConnError::Io(error));
        }
        self.host_write_broken = true;
        let dropped = self.to_host.len();
        self.to_host.clear();
        self.account_written(dropped);
        Ok(())
    }

    pub fn to_host_is_empty(&self) -> bool {
        self.to_host.is_empty()
    }

    /// Guest SHUTDOWN: RCV stops host → guest data, SEND (once flushed) half-closes the host
    /// stream, both together end the connection.
    pub fn on_guest_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        if self.state == ConnState::AwaitingResponse {
            return Err(ConnError::Protocol("SHUTDOWN before RESPONSE"));
        }
        self.guest_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        if self.guest_shut_rcv {
            self.pending &= !pending::RW;
        }
        if self.guest_shut_rcv && self.guest_shut_send {
            self.state = ConnState::GuestClosed;
        }
        Ok(())
    }

    /// Once the guest stopped sending and everything reached the host, the host sees EOF.
    pub fn shutdown_host_write_if_done(&mut self) {
        if self.guest_shut_send && self.to_host.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            // The host may already be gone; nothing to do about it then.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// Whether the guest's picture of our free space is low while we have freed more.
    pub fn needs_credit_update(&self) -> bool {
        if self.guest_shut_send
            || !matches!(self.state, ConnState::Established | ConnState::HostClosed)
        {
            return false;
        }
        let guest_view_used = (self.from_guest_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = CONN_TX_BUF_SIZE.saturating_sub(guest_view_used);
        guest_view_free < CREDIT_UPDATE_THRESHOLD && self.fwd_cnt != self.last_fwd_cnt_sent
    }

    /// Fills one RX buffer: the next pending control packet, or host data read straight into
    /// `buf` (whose length is the payload room of the guest's buffer).
    pub fn produce(&mut self, guest_cid: u64, buf: &mut [u8]) -> Produced {
        for (bit, op) in [
            (pending::REQUEST, OP_REQUEST),
            (pending::RESPONSE, OP_RESPONSE),
            (pending::CREDIT_REQUEST, OP_CREDIT_REQUEST),
            (pending::CREDIT_UPDATE, OP_CREDIT_UPDATE),
        ] {
            if self.pending & bit != 0 {
                self.pending &= !bit;
                return Produced::Packet(self.header(op, guest_cid), 0);
            }
        }
        if self.pending & pending::RW != 0 {
            match self.read_host(buf) {
                Ok(HostRead::Data(n)) => {
                    let mut header = self.header(OP_RW, guest_cid);
                    header.len = wrapping(n).0;
                    return Produced::Packet(header, n);
                }
                Ok(HostRead::Eof) => {
                    self.close_host_side();
                    self.pending &= !pending::SHUTDOWN;
                    return Produced::Packet(self.shutdown_header(guest_cid), 0);
                }
                Ok(HostRead::NoCredit) if !self.credit_requested => {
                    self.credit_requested = true;
                    return Produced::Packet(self.header(OP_CREDIT_REQUEST, guest_cid), 0);
                }
                Ok(HostRead::NoCredit | HostRead::Nothing) => {}
                Err(e) => return Produced::Failed(e),
            }
        }
        if self.pending & pending::SHUTDOWN != 0 {
            self.pending &= !pending::SHUTDOWN;
            return Produced::Packet(self.shutdown_header(guest_cid), 0);
        }
        Produced::Nothing
    }

    fn shutdown_header(&mut self, guest_cid: u64) -> PacketHeader {
        let mut header = self.header(OP_SHUTDOWN, guest_cid);
        header.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        header
    }

    fn read_host(&mut self, buf: &mut [u8]) -> Result<HostRead, ConnError> {
        self.pending &= !pending::RW;
        if !self.can_read() {
            return Ok(HostRead::Nothing);
        }
        let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
        if credit == 0 {
            return Ok(HostRead::NoCredit);
        }
        let want = buf.len().min(credit);
        if want == 0 {
            // This RX buffer has no room for data; try again with the next one.
            self.pending |= pending::RW;
            return Ok(HostRead::Nothing);
        }
        loop {
            match (&self.stream).read(&mut buf[..want]) {
                Ok(0) => return Ok(HostRead::Eof),
                Ok(n) => {
                    self.to_guest_cnt += wrapping(n);
                    if n == want {
                        // Likely more behind it; read again instead of waiting for epoll.
                        self.pending |= pending::RW;
                    }
                    return Ok(HostRead::Data(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // After a hang-up nothing more can arrive.
                    return Ok(if self.host_hup {
                        HostRead::Eof
                    } else {
                        HostRead::Nothing
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }
}

/// Writes to the host stream. MSG_NOSIGNAL: a host that went away must cost an EPIPE, not
/// the SIGPIPE that would kill the VMM unless something ignores it.
fn send_to_host(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes during the call and the fd
    // belongs to `stream`, which outlives the call; send() writes no memory of ours.
    let ret = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Byte counts here are at most a packet or a buffer (well below 4 GiB); the counters they
/// feed wrap by design.
fn wrapping(n: usize) -> Wrapping<u32> {
    Wrapping(u32::try_from(n).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 52,
        };
        (Connection::host_initiated(key, ours), theirs)
    }

    #[test]
    fn test_connection_response_writes_ok_line_not_counted_as_guest_data() {
        let (mut conn, mut host) = pair();
        assert!(conn.on_guest_data(b"early").is_err());
        conn.on_response().unwrap();
        conn.on_guest_data(b"hi").unwrap();
        let mut got = [0u8; 16];
        let n = host.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"OK 1073741824\nhi");
        assert_eq!(conn.header(OP_RW, 3).fwd_cnt, 2);
    }

    #[test]
    fn test_connection_peer_credit_bounds_reads() {
        let (mut conn, mut host) = pair();
        let mut buf = [0u8; 100];
        assert!(matches!(
            conn.produce(3, &mut buf),
            Produced::Packet(PacketHeader { op: OP_REQUEST, .. }, 0)
        ));
        conn.on_response().unwrap();
        conn.update_peer_credit(10, 0);
        host.write_all(b"0123456789abcdef").unwrap();
        conn.on_host_readable();
        match conn.produce(3, &mut buf) {
            Produced::Packet(h, n) => {
                assert_eq!((h.op, h.len, n), (OP_RW, 10, 10));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(conn.peer_credit(), 0);
        assert_eq!(conn.desired_events(), Some(EventSet::empty()));
        // The guest consumed 4 bytes: 4 more may go (read on, without waiting for epoll).
        conn.update_peer_credit(10, 4);
        match conn.produce(3, &mut buf) {
            Produced::Packet(h, n) => {
                assert_eq!((h.op, n), (OP_RW, 4));
                assert_eq!(&buf[..n], b"abcd");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_connection_overrun_is_an_error() {
        let (mut conn, _host) = pair();
        conn.on_response().unwrap();
        // The host never reads: the socket buffer fills, then our buffer.
        let chunk = vec![7u8; 4096];
        let mut result = Ok(());
        for _ in 0..1024 {
            result = conn.on_guest_data(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(ConnError::CreditOverrun { .. })));
    }
}
