//! The host end of a virtio-net device: a tap interface opened through `/dev/net/tun`.
//!
//! Every frame crossing the tap carries a 12-byte `virtio_net_hdr_v1` in front of it
//! (`IFF_VNET_HDR` + `TUNSETVNETHDRSZ`), the same header the guest uses, so checksum and
//! segmentation offloads pass through untouched. The fd is non-blocking: the event loop polls
//! it and reads until `EAGAIN`. The device's system calls (ioctls, `readv`, `writev`) are all
//! here; the two that move frames are `unsafe fn`s, because only the caller can vouch that the
//! guest-memory spans it passes stay mapped.

use std::ffi::{CString, c_int, c_uint, c_ulong, c_void};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

/// Most iovecs one `readv`/`writev` accepts (`UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (0x5002) as the C `short` of `ifr_flags`.
#[allow(clippy::cast_possible_truncation)]
const TAP_FLAGS: libc::c_short = {
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    assert!(flags > 0 && flags < 0x8000);
    flags as libc::c_short
};

/// The vnet header length as the `int` that TUNSETVNETHDRSZ takes.
const VNET_HDR_LEN_C: c_int = 12;
const _: () = assert!(VNET_HDR_LEN == 12);

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {name:?} is not a valid interface name ({reason})")]
    InvalidName { name: String, reason: &'static str },
    #[error("tap {name} does not exist (create it first, e.g. `ip tuntap add {name} mode tap`)")]
    Missing { name: String },
    #[error("cannot open tap {name}")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure tap {name} ({what})")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A span of host memory (inside guest RAM) that a frame is read into or written from.
///
/// The address is a plain integer so that the structures holding spans stay `Send`; it is
/// turned back into a pointer only for the system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSpan {
    pub addr: usize,
    pub len: usize,
}

/// An open tap queue. Closing it detaches the VMM from the interface; the interface itself
/// belongs to whoever created it.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap interface `name` with a 12-byte vnet header, non-blocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let c_name = validate_name(name)?;
        // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index == 0 {
            return Err(TapError::Missing { name: name.into() });
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                name: name.into(),
                source,
            })?;

        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(c_name.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: TUNSETIFF reads (and may update) one `struct ifreq`; `ifr` is one, valid and
        // exclusively borrowed for the call, and the fd is the tun control device we just
        // opened.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::Open {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }

        let tap = Tap {
            file,
            name: name.into(),
        };
        let hdr_len = VNET_HDR_LEN_C;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points at a live
        // local for the duration of the call.
        let ret = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(tap.configure_error("TUNSETVNETHDRSZ"));
        }
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the guest accepts on frames it receives (`TUN_F_*`
    /// bits). Without them the kernel checksums and segments before handing frames over.
    pub fn set_offload(&self, flags: c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(self.configure_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Reads one frame (vnet header included) into `spans`, then `overflow`. Returns the frame
    /// length; bytes past the spans landed in `overflow`. `WouldBlock` when no frame waits.
    ///
    /// # Safety
    ///
    /// Every span must be mapped, writable memory of this process that stays mapped for the
    /// call and that no Rust reference points into (guest RAM, which the VMM only touches
    /// through volatile accesses, qualifies).
    pub unsafe fn read_frame(&self, spans: &[HostSpan], overflow: &mut [u8]) -> io::Result<usize> {
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(spans.len() + 1);
        iovecs.extend(spans.iter().map(|span| libc::iovec {
            iov_base: std::ptr::with_exposed_provenance_mut::<c_void>(span.addr),
            iov_len: span.len,
        }));
        iovecs.push(libc::iovec {
            iov_base: overflow.as_mut_ptr().cast(),
            iov_len: overflow.len(),
        });
        let count = iov_count(&iovecs)?;
        // SAFETY: every iovec is writable memory for its whole length: the spans by the
        // caller's contract, `overflow` because we hold it mutably. The kernel writes at most
        // that much and the buffers outlive the call.
        let ret = unsafe { libc::readv(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (vnet header included) gathered from `spans`.
    ///
    /// # Safety
    ///
    /// Every span must be mapped, readable memory of this process that stays mapped for the
    /// call.
    pub unsafe fn write_frame(&self, spans: &[HostSpan]) -> io::Result<usize> {
        let iovecs: Vec<libc::iovec> = spans
            .iter()
            .map(|span| libc::iovec {
                iov_base: std::ptr::with_exposed_provenance_mut::<c_void>(span.addr),
                iov_len: span.len,
            })
            .collect();
        let count = iov_count(&iovecs)?;
        // SAFETY: the kernel only reads the iovecs' memory, which is mapped and readable for
        // the duration of the call by the caller's contract.
        let ret = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    fn configure_error(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn iov_count(iovecs: &[libc::iovec]) -> io::Result<c_int> {
    if iovecs.len() > MAX_IOVECS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    c_int::try_from(iovecs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Interface names are at most 15 bytes (IFNAMSIZ with its NUL), and the kernel refuses `/`,
/// `:` and whitespace in them.
fn validate_name(name: &str) -> Result<CString, TapError> {
    let invalid = |reason| TapError::InvalidName {
        name: name.into(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(invalid("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("reserved name"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(invalid("contains '/', ':', whitespace or NUL"));
    }
    CString::new(name).map_err(|_| invalid("contains NUL"))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::process::Command;

    use super::*;

    /// Runs `f` on a fresh thread inside a new, private network namespace; the namespace and
    /// every interface in it go away when the thread ends.
    pub(crate) fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: unshare takes a flag word and only changes this thread's
                    // namespaces; nothing else in the process is affected.
                    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                    assert_eq!(ret, 0, "unshare: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("netns thread panicked")
        })
    }

    /// Runs `ip` with `args` (in the calling thread's network namespace) and checks it worked.
    pub(crate) fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn vnet_hdr_len(tap: &Tap) -> c_int {
        let mut len: c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int through the pointer, which points at a live
        // local.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut len) };
        assert_eq!(ret, 0);
        len
    }

    #[test]
    fn test_tap_open_existing_sets_vnet_header_and_offloads() {
        in_netns(|| {
            ip(&["tuntap", "add", "wtap0", "mode", "tap"]);
            let tap = Tap::open("wtap0").unwrap();
            assert_eq!(tap.name(), "wtap0");
            assert_eq!(vnet_hdr_len(&tap), 12);
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            tap.set_offload(0).unwrap();
            // Unknown offload bits are refused, and the error names the tap.
            let err = tap.set_offload(0x8000_0000).unwrap_err();
            assert!(err.to_string().contains("wtap0"), "{err}");
            // Nothing is queued on a fresh tap.
            let mut overflow = [0u8; 64];
            // SAFETY: no spans; `overflow` is a live local buffer.
            let err = unsafe { tap.read_frame(&[], &mut overflow) }.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        });
    }

    #[test]
    fn test_tap_open_missing_interface_is_named_error() {
        in_netns(|| {
            let err = Tap::open("wnotthere0").unwrap_err();
            assert!(matches!(err, TapError::Missing { .. }), "{err:?}");
            assert!(err.to_string().contains("wnotthere0"));
            // The failed open must not have created it.
            assert!(
                !Command::new("ip")
                    .args(["link", "show", "wnotthere0"])
                    .output()
                    .unwrap()
                    .status
                    .success()
            );
        });
    }

    #[test]
    fn test_tap_open_non_tap_interface_fails_with_name() {
        in_netns(|| {
            let err = Tap::open("lo").unwrap_err();
            assert!(matches!(err, TapError::Open { .. }), "{err:?}");
            assert!(err.to_string().contains("lo"));
        });
    }

    #[test]
    fn test_tap_invalid_names_are_refused() {
        for name in ["", "a-name-that-is-too-long", "a/b", "a b", "a:b", ".."] {
            let err = Tap::open(name).unwrap_err();
            assert!(
                matches!(err, TapError::InvalidName { .. }),
                "{name:?}: {err}"
            );
        }
    }
}
