//! virtio-net on a host tap interface (virtio 1.2 §5.1).
//!
//! ```text
//!   guest TX queue ──gather chain──► writev(tap)     one frame per chain, zero copy
//!   guest RX queue ◄──readv(tap)──── frame           straight into the guest's buffers
//! ```
//!
//! Both directions move the guest's bytes without a bounce buffer: TX hands the kernel the
//! chain's guest-memory spans, RX reads into spans of RX chains parsed ahead of time. Every frame
//! starts with the 12-byte `virtio_net_hdr_v1`, which the tap speaks too (`IFF_VNET_HDR`), so
//! checksum and TSO offloads cross unchanged; the device only fills in `num_buffers` and
//! enforces what the driver negotiated.
//!
//! With `VIRTIO_NET_F_MRG_RXBUF` one frame may fill several RX chains. The device reads from the
//! tap only once it holds enough guest buffers for the largest frame it can get (or every
//! buffer the ring can hold), so a frame is never cut short; when the guest has posted too
//! little, the tap leaves the event loop's interest list until the guest posts more, so the
//! VMM never spins on a readable tap it cannot drain. A frame that does not fit what the guest
//! offered lands in a host scratch buffer and is dropped (and counted).
//!
//! Files: `device.rs` (the device and its data paths), `event_handler.rs` (event-loop glue),
//! `metrics.rs` (counters), `tap.rs` (the tap and its system calls, the device's `unsafe`).

mod device;
mod event_handler;
mod metrics;
mod tap;

#[cfg(test)]
mod tests;

use std::io;

pub use device::Net;
pub use metrics::NetMetrics;
pub use tap::TapError;

/// Size of `virtio_net_hdr_v1` (with `num_buffers`): the header of every frame with VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Ethernet header and one 802.1Q tag.
const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// Largest frame (without the vnet header) either side may send: a 64 KiB GSO packet plus its
/// link-layer header.
pub const MAX_FRAME_LEN: usize = 65536 + ETH_HLEN + VLAN_HLEN;
/// MTU assumed for sizing receive buffers when the configuration gives none.
const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU virtio allows a device to offer (IPv4's minimum).
pub const MIN_MTU: u16 = 68;

/// Each queue holds this many descriptors.
pub const QUEUE_SIZE: u16 = 256;
/// Queue order, fixed by the spec.
const RX_INDEX: usize = 0;
const TX_INDEX: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("guest_mac {value:?} is not a unicast MAC address like 06:00:AC:10:00:02 ({reason})")]
    InvalidMac { value: String, reason: &'static str },
    #[error("mtu {mtu} is below the minimum of {MIN_MTU}")]
    InvalidMtu { mtu: u16 },
    /// The message names the tap; the caller adds which interface it was.
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// Parses `06:00:AC:10:00:02` (either case). Multicast and all-zero addresses cannot name a NIC.
pub fn parse_mac(value: &str) -> Result<[u8; 6], NetError> {
    let invalid = |reason| NetError::InvalidMac {
        value: value.into(),
        reason,
    };
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .ok_or_else(|| invalid("fewer than six bytes"))?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("each byte is two hex digits"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid("not hex"))?;
    }
    if parts.next().is_some() {
        return Err(invalid("more than six bytes"));
    }
    if mac[0] & 1 != 0 {
        return Err(invalid("multicast bit set"));
    }
    if mac == [0; 6] {
        return Err(invalid("all zero"));
    }
    Ok(mac)
}
