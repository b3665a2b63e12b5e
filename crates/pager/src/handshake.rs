//! The VMM → pager handshake: one `sendmsg` carrying a JSON region list and the userfaultfd.
//!
//! ```text
//!  VMM                                                    pager (listening UDS)
//!   | connect()                                             |
//!   | sendmsg( payload = JSON array, SCM_RIGHTS = [uffd] )  |   exactly one message,
//!   |------------------------------------------------------>|   exactly one descriptor
//!   |   (nothing else is ever sent; the VMM keeps the        |
//!   |    connection open until it exits)                    |
//!
//!  payload: [{"base_host_virt_addr":140230467751936,"size":134217728,"offset":0,
//!             "page_size":4096,"page_size_kib":4096}, ...]
//! ```
//!
//! `offset` is the region's start in the flat memory range (the running sum of the earlier
//! region sizes for Firecracker); `page_size_kib` is, despite its name, in bytes for
//! Firecracker (a value of `page_size / 1024` is accepted too).
//!
//! Everything here treats the peer as hostile: the read is bounded, any number of descriptors
//! other than one is refused (all received descriptors are closed), the descriptor must be a
//! userfaultfd, and the regions must pass [`RegionMap::new`]. The only `unsafe` is taking
//! ownership of the descriptors the kernel installed for us.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, RecvMsg, getsockopt, recvmsg, sendmsg, sockopt,
};
use serde::{Deserialize, Serialize};

use crate::regions::{Region, RegionError, RegionMap};
use crate::uffd::{Uffd, fd_is_userfaultfd};

/// Default bound on the handshake payload.
pub const DEFAULT_MAX_HANDSHAKE_BYTES: usize = 64 * 1024;

/// `SCM_MAX_FD`: the most descriptors Linux passes in one message. Sizing the control buffer
/// for this many means the kernel never truncates it, so every received descriptor reaches us
/// and gets closed if unwanted.
const SCM_MAX_FD: usize = 253;

/// One region as the VMM describes it (Firecracker's `GuestRegionUffdMapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Start of the region in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Region length in bytes.
    pub size: u64,
    /// Start of the region in the flat memory range.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Deprecated duplicate of `page_size` (in bytes for Firecracker).
    pub page_size_kib: u64,
}

/// The handshake failed; the connection and any received descriptor are closed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("recvmsg on the handshake socket")]
    Receive {
        #[source]
        source: Errno,
    },
    #[error("the VMM closed the connection without sending the handshake")]
    Closed,
    #[error("the handshake payload is {limit} bytes or more (limit)")]
    TooLarge { limit: usize },
    #[error("the control message was truncated (more descriptors than the kernel allows?)")]
    ControlTruncated,
    #[error("expected exactly one file descriptor (SCM_RIGHTS), got {count}")]
    FdCount { count: usize },
    #[error("the descriptor sent is not a userfaultfd")]
    NotUserfaultfd,
    #[error("making the userfaultfd non-blocking")]
    NonBlocking {
        #[source]
        source: Errno,
    },
    #[error("the handshake payload is not a JSON region list")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("region {index}: page_size_kib {page_size_kib} contradicts page_size {page_size}")]
    PageSizeKib {
        index: usize,
        page_size: u64,
        page_size_kib: u64,
    },
    #[error("invalid region list")]
    Regions {
        #[source]
        source: RegionError,
    },
}

/// What a valid handshake yields.
#[derive(Debug)]
pub struct Handshake {
    /// The validated regions.
    pub regions: RegionMap,
    /// The VMM's userfaultfd, non-blocking.
    pub uffd: Uffd,
}

/// Reads the single handshake message (the socket must be readable: this does not block) and
/// validates it against a source of `source_size` bytes.
pub fn receive(
    stream: &UnixStream,
    max_bytes: usize,
    source_size: u64,
) -> Result<Handshake, HandshakeError> {
    let (payload, fds) = receive_message(stream, max_bytes)?;
    if payload.is_empty() && fds.is_empty() {
        return Err(HandshakeError::Closed);
    }
    if payload.len() >= max_bytes {
        return Err(HandshakeError::TooLarge { limit: max_bytes });
    }
    let mut fds = fds;
    if fds.len() != 1 {
        return Err(HandshakeError::FdCount { count: fds.len() });
    }
    let fd = fds.pop().ok_or(HandshakeError::FdCount { count: 0 })?;
    if !fd_is_userfaultfd(fd.as_raw_fd()) {
        return Err(HandshakeError::NotUserfaultfd);
    }
    let regions = parse_regions(&payload, source_size)?;
    set_nonblocking(fd.as_fd())?;
    Ok(Handshake {
        regions,
        uffd: Uffd::from_owned(fd),
    })
}

/// Parses and validates the JSON region list.
pub fn parse_regions(payload: &[u8], source_size: u64) -> Result<RegionMap, HandshakeError> {
    let mappings: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(payload).map_err(|source| HandshakeError::Json { source })?;
    let mut regions = Vec::with_capacity(mappings.len().min(crate::regions::MAX_REGIONS));
    for (index, mapping) in mappings.iter().enumerate() {
        let kib_ok = mapping.page_size_kib == mapping.page_size
            || mapping.page_size_kib.checked_mul(1024) == Some(mapping.page_size);
        if !kib_ok {
            return Err(HandshakeError::PageSizeKib {
                index,
                page_size: mapping.page_size,
                page_size_kib: mapping.page_size_kib,
            });
        }
        let region = Region {
            base: mapping.base_host_virt_addr,
            size: mapping.size,
            offset: mapping.offset,
        };
        regions.push((region, mapping.page_size));
    }
    RegionMap::new(&regions, source_size).map_err(|source| HandshakeError::Regions { source })
}

/// The peer's pid, from `SO_PEERCRED` (for logs).
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    getsockopt(stream, sockopt::PeerCredentials)
        .ok()
        .map(|creds| creds.pid())
}

/// Sends a handshake as a VMM does: the JSON list and `uffd` in one `sendmsg`.
pub fn send(
    stream: &UnixStream,
    regions: &[GuestRegionUffdMapping],
    uffd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let payload = serde_json::to_vec(regions)?;
    send_raw(stream, &payload, &[uffd.as_raw_fd()])
}

/// Sends `payload` with `fds` attached in one `sendmsg` (no descriptor message if empty).
pub fn send_raw(stream: &UnixStream, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    if sent != payload.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {sent} of {} handshake bytes", payload.len()),
        ));
    }
    Ok(())
}

/// A control buffer big enough for the most descriptors one message can carry.
pub(crate) fn descriptor_buffer() -> Vec<u8> {
    nix::cmsg_space!([RawFd; SCM_MAX_FD])
}

/// Takes ownership of every descriptor a received message carried, so that dropping the
/// result closes them. Fails (after nothing was installed that we could see) when the control
/// data was truncated; the control buffers in this crate are sized so that it cannot be.
pub(crate) fn take_descriptors<S>(
    message: &RecvMsg<'_, '_, S>,
) -> Result<Vec<OwnedFd>, HandshakeError> {
    let cmsgs = message
        .cmsgs()
        .map_err(|_| HandshakeError::ControlTruncated)?;
    let mut fds = Vec::new();
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(raw_fds) = cmsg {
            for fd in raw_fds {
                // SAFETY: the kernel installed each SCM_RIGHTS descriptor in our table during
                // this recvmsg; nothing else in this process knows the numbers, so we are the
                // only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(fds)
}

/// One bounded `recvmsg`, returning the payload and every descriptor received (owned, so
/// that dropping them closes them).
fn receive_message(
    stream: &UnixStream,
    max_bytes: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), HandshakeError> {
    let mut payload = vec![0u8; max_bytes];
    let mut cmsg_buffer = descriptor_buffer();
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut payload)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buffer),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(|source| HandshakeError::Receive { source })?;
        (message.bytes, take_descriptors(&message)?)
    };
    payload.truncate(bytes);
    Ok((payload, fds))
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), HandshakeError> {
    // The flag lives on the open file description the VMM shares; Firecracker sets it already,
    // and poll(2) on a blocking userfaultfd only ever reports POLLERR.
    let flags =
        fcntl(fd, FcntlArg::F_GETFL).map_err(|source| HandshakeError::NonBlocking { source })?;
    let flags = OFlag::from_bits_truncate(flags);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))
            .map_err(|source| HandshakeError::NonBlocking { source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uffd::testing::AnonMemory;
    use proptest::prelude::*;

    fn mapping(base: u64, size: u64, offset: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: 4096,
            page_size_kib: 4096,
        }
    }

    fn uffd_for(memory: &AnonMemory) -> Uffd {
        let uffd = Uffd::create().expect("create");
        uffd.api(crate::uffd::UFFD_FEATURE_EVENT_REMOVE)
            .expect("api");
        uffd.register(memory.addr(), 4096).expect("register");
        uffd
    }

    #[test]
    fn test_parse_regions_firecracker_payload_is_accepted() {
        let payload = br#"[{"base_host_virt_addr":140230467751936,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let map = parse_regions(payload, 134_217_728).expect("valid");
        assert_eq!(map.regions()[0].base, 140_230_467_751_936);
        assert_eq!(map.end_offset(), 134_217_728);
    }

    #[test]
    fn test_parse_regions_kib_value_in_kib_is_accepted() {
        let mut region = mapping(0x10000, 4096, 0);
        region.page_size_kib = 4;
        let payload = serde_json::to_vec(&[region]).expect("json");
        assert!(parse_regions(&payload, 4096).is_ok());
    }

    #[test]
    fn test_parse_regions_contradicting_kib_is_rejected() {
        let mut region = mapping(0x10000, 4096, 0);
        region.page_size_kib = 8192;
        let payload = serde_json::to_vec(&[region]).expect("json");
        let err = parse_regions(&payload, 4096).expect_err("contradiction");
        assert!(
            matches!(err, HandshakeError::PageSizeKib { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn test_parse_regions_missing_field_is_json_error() {
        let err = parse_regions(br#"[{"base_host_virt_addr":4096,"size":4096}]"#, 8192)
            .expect_err("missing offset");
        assert!(matches!(err, HandshakeError::Json { .. }), "{err}");
    }

    #[test]
    fn test_parse_regions_empty_array_is_rejected() {
        let err = parse_regions(b"[]", 8192).expect_err("empty");
        assert!(
            matches!(
                err,
                HandshakeError::Regions {
                    source: RegionError::Empty
                }
            ),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn test_parse_regions_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_regions(&bytes, 1 << 30);
        }

        #[test]
        fn test_parse_regions_random_numbers_never_panic(
            regions in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()), 0..5),
        ) {
            let regions: Vec<_> = regions.iter().map(|(base, size, offset, page_size, page_size_kib)|
                GuestRegionUffdMapping {
                    base_host_virt_addr: *base, size: *size, offset: *offset,
                    page_size: *page_size, page_size_kib: *page_size_kib,
                }).collect();
            let payload = serde_json::to_vec(&regions).expect("json");
            if let Ok(map) = parse_regions(&payload, u64::MAX) {
                prop_assert_eq!(map.regions().len(), regions.len());
            }
        }
    }

    #[test]
    fn test_receive_valid_handshake_yields_uffd_and_regions() {
        let memory = AnonMemory::new(4096);
        let uffd = uffd_for(&memory);
        let (vmm, pager) = UnixStream::pair().expect("socketpair");
        send(&vmm, &[mapping(memory.addr(), 4096, 0)], uffd.as_fd()).expect("send");
        let handshake = receive(&pager, DEFAULT_MAX_HANDSHAKE_BYTES, 4096).expect("receive");
        assert_eq!(handshake.regions.regions()[0].base, memory.addr());
        assert!(fd_is_userfaultfd(handshake.uffd.as_fd().as_raw_fd()));
        assert_eq!(
            peer_pid(&pager),
            Some(i32::try_from(std::process::id()).expect("pid"))
        );
    }

    #[test]
    fn test_receive_without_fd_is_rejected() {
        let (vmm, pager) = UnixStream::pair().expect("socketpair");
        let payload = serde_json::to_vec(&[mapping(0x10000, 4096, 0)]).expect("json");
        send_raw(&vmm, &payload, &[]).expect("send");
        let err = receive(&pager, DEFAULT_MAX_HANDSHAKE_BYTES, 4096).expect_err("no fd");
        assert!(matches!(err, HandshakeError::FdCount { count: 0 }), "{err}");
    }

    #[test]
    fn test_receive_two_fds_rejects_and_closes_both() {
        use std::io::Write;
        let (vmm, pager) = UnixStream::pair().expect("socketpair");
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        let payload = serde_json::to_vec(&[mapping(0x10000, 4096, 0)]).expect("json");
        let raw = reader.as_raw_fd();
        send_raw(&vmm, &payload, &[raw, raw]).expect("send");
        drop(reader);
        let err = receive(&pager, DEFAULT_MAX_HANDSHAKE_BYTES, 4096).expect_err("two fds");
        assert!(matches!(err, HandshakeError::FdCount { count: 2 }), "{err}");
        // Only the pager's two received copies could still hold the pipe open.
        let write = writer
            .write(b"x")
            .expect_err("every read end must be closed");
        assert_eq!(write.kind(), std::io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn test_receive_non_uffd_descriptor_is_rejected() {
        let (vmm, pager) = UnixStream::pair().expect("socketpair");
        let file = tempfile::tempfile().expect("tempfile");
        let payload = serde_json::to_vec(&[mapping(0x10000, 4096, 0)]).expect("json");
        send_raw(&vmm, &payload, &[file.as_raw_fd()]).expect("send");
        let err = receive(&pager, DEFAULT_MAX_HANDSHAKE_BYTES, 4096).expect_err("a file");
        assert!(matches!(err, HandshakeError::NotUserfaultfd), "{err}");
    }

    #[test]
    fn test_receive_oversized_payload_is_rejected() {
        let (vmm, pager) = UnixStream::pair().expect("socketpair");
        send_raw(&vmm, &[b' '; 300], &[]).expect("send");
        let err = receive(&pager, 256, 4096).expect_err("too big");
        assert!(
            matches!(err, HandshakeError::TooLarge { limit: 256 }),
            "{err}"
        );
    }

    #[test]
    fn test_receive_after_peer_close_is_closed() {
        let (vmm, pager) = UnixStream::pair().expect("socketpair");
        drop(vmm);
        let err = receive(&pager, 256, 4096).expect_err("closed");
        assert!(matches!(err, HandshakeError::Closed), "{err}");
    }
}
