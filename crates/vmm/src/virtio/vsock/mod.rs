//! virtio-vsock with Firecracker's host side: guest AF_VSOCK streams become host AF_UNIX
//! streams.
//!
//! ```text
//!  host process                      VMM (event-loop thread)                  guest
//!  ------------                      -----------------------                  -----
//!  connect(uds_path)
//!  "CONNECT 52\n"  ───────────────▶  Muxer: local port L = 2^30.. ──REQUEST──▶ listen(52)
//!                  ◀── "OK L\n" ───  on RESPONSE                ◀─RESPONSE──
//!  bytes          ◀══════════════▶  Connection (credit, tx buffer) ◀══RW════▶ bytes
//!
//!  listen(uds_path_1234)  ◀─connect─ Muxer  ◀──────────── REQUEST(dst port 1234) connect()
//!                                           ────RESPONSE or RST─────────▶
//! ```
//!
//! - `device`: the virtio device ([`Vsock`]): queues, features, config space (the guest CID),
//!   the event queue's TRANSPORT_RESET, and batching of interrupts.
//! - `event_handler`: the event-loop side: which fd fired and what runs next.
//! - `muxer`: the listening socket, the `CONNECT` handshake, the connection table, local port
//!   allocation, timeouts, and the queue of packets waiting for guest RX buffers.
//! - `connection`: one connection's state machine and credit flow control.
//! - `packet`: the 44-byte header and validated reads and writes of descriptor chains.
//!
//! Only stream sockets exist; anything else gets RST.
//!
//! Snapshots: live connections are not part of a snapshot, and neither is anything else of the
//! host side (the socket path and the guest CID come from the load request). A snapshot keeps
//! only the queues. When an activated device is restored, it sends
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue, in the event buffer the guest
//! posted before the snapshot ([`Vsock::send_transport_reset`]); the guest driver then drops
//! every connection, and host processes connect again (with `CONNECT <port>`) on the new path.
//!
//! That TRANSPORT_RESET is also the documented "you were restored" notification for the
//! in-guest agent, and the only one: pause and resume without a snapshot never send it. The
//! agent sees it as every one of its host connections reset at once; it then reseeds the guest
//! kernel's RNG with fresh host entropy and resyncs the guest clock, because a restored guest
//! shares its RNG state with every other clone of the same snapshot and its wall clock stopped
//! when the snapshot was taken.

mod connection;
mod device;
mod event_handler;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use crate::diag::LogLimiter;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use device::Vsock;

/// The host's CID; the guest reaches the host (and so the unix sockets) through it.
pub const HOST_CID: u64 = 2;
/// Smallest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u32 = 3;

/// Packet types (virtio 1.2 §5.10.6). Only streams are supported.
const TYPE_STREAM: u16 = 1;

/// Operations (virtio 1.2 §5.10.6).
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data / send no more data.
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// Event-queue event telling the driver that every connection is gone.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Largest payload of one packet, both ways (as Firecracker and Linux).
const MAX_PKT_DATA: usize = 64 * 1024;
/// Guest bytes one connection may buffer for a slow host reader; it is also the `buf_alloc`
/// we advertise, so a guest that honours credit never hits it.
const CONN_TX_BUF_SIZE: u32 = 64 * 1024;
/// When the guest's idea of our free buffer space drops below this, send a CREDIT_UPDATE.
const CREDIT_UPDATE_THRESHOLD: u32 = 4 * 1024;
/// Connections (open and still in the `CONNECT` handshake) the device will hold at once.
const MAX_CONNECTIONS: usize = 1023;
/// Replies (RST) to packets for unknown connections that may wait for RX buffers; when full,
/// the device stops taking guest TX packets until the guest posts RX buffers.
const MAX_PENDING_RST: usize = 256;
/// How long a host-initiated connection waits for the guest's RESPONSE (and a host has to send
/// its `CONNECT` line).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);
/// How long a closing connection waits for the other side before it is reset.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(2000);
/// Host-initiated connections get local ports from [2^30, 2^31), round robin.
const LOCAL_PORT_FIRST: u32 = 1 << 30;
const LOCAL_PORT_END: u32 = 1 << 31;
/// Longest `CONNECT <port>\n` line, newline included.
const CONNECT_LINE_MAX: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; it must be {MIN_GUEST_CID} or more")]
    GuestCid(u32),
    #[error("vsock uds_path must not be empty")]
    EmptyPath,
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {path} is in use by a listening process")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot create the device's eventfds and timer")]
    Fd(#[source] io::Error),
}
