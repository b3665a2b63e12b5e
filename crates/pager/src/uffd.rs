//! The userfaultfd system interface: the ioctls, and decoding of `uffd_msg`.
//!
//! All of the crate's `unsafe` for userfaultfd lives here. The pager only ever uses the
//! serving half ([`Uffd::copy`], [`Uffd::zeropage`], [`Uffd::wake`], [`Uffd::read_events`]);
//! the VMM half ([`Uffd::create`], [`Uffd::api`], [`Uffd::register`]) is here for tests and
//! for whoever plays the VMM.
//!
//! Events are read as raw bytes and decoded by [`UffdEvent::parse`], which never trusts the
//! buffer. One message is 32 bytes (`struct uffd_msg`, native endian):
//!
//! ```text
//!  0       1       2               4               8                16               24      32
//!  +-------+-------+---------------+---------------+----------------+----------------+-------+
//!  | event | rsvd  |   reserved    |   reserved    | arg word 0     | arg word 1     | word 2|
//!  +-------+-------+---------------+---------------+----------------+----------------+-------+
//!  PAGEFAULT (0x12): word0 = flags, word1 = address, word2 low 32 bits = thread id
//!  FORK      (0x13): word0 low 32 bits = new uffd installed in *our* fd table
//!  REMAP     (0x14): word0 = from, word1 = to, word2 = len
//!  REMOVE    (0x15): word0 = start, word1 = end
//!  UNMAP     (0x16): word0 = start, word1 = end
//! ```
//!
//! Addresses in events and in `copy`/`zeropage`/`wake` are in the *VMM's* address space: the
//! kernel resolves them against the mm that created the userfaultfd, and this process never
//! dereferences them. That is what makes these ioctls memory-safe for us whatever the VMM
//! sends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The userfaultfd API version (`UFFD_API`).
pub const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_EVENT_REMOVE`: `madvise(MADV_DONTNEED)` on registered memory is reported.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP`: `munmap` of registered memory is reported.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_THREAD_ID`: page faults carry the faulting thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFDIO_REGISTER_MODE_MISSING`: fault on pages that are not present.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_COPY_MODE_DONTWAKE` / `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
const MODE_DONTWAKE: u64 = 1;

/// Size of one `struct uffd_msg`.
pub const UFFD_MSG_SIZE: usize = 32;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// `_IOC(dir, 0xAA, nr, size)` for the userfaultfd ioctls (x86_64/aarch64 encoding).
const fn uffd_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    const IOC_TYPESHIFT: u64 = 8;
    const IOC_SIZESHIFT: u64 = 16;
    const IOC_DIRSHIFT: u64 = 30;
    // The sizes are compile-time struct sizes (at most 40), so the widening is exact.
    (dir << IOC_DIRSHIFT) | ((size as u64) << IOC_SIZESHIFT) | (0xaa << IOC_TYPESHIFT) | nr
}
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const UFFDIO_API: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = uffd_ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = uffd_ioc(IOC_NONE, 0x00, 0);

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// A userfaultfd syscall or ioctl failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the `userfaultfd(2)` syscall gave us a descriptor.
    #[error("creating a userfaultfd (via /dev/userfaultfd and userfaultfd(2))")]
    Create {
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_API` was refused (unknown feature bits, or the API was already set).
    #[error("UFFDIO_API with features {features:#x}")]
    Api {
        features: u64,
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_REGISTER` was refused.
    #[error("UFFDIO_REGISTER of [{start:#x}, +{len:#x})")]
    Register {
        start: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// A serving ioctl failed with an errno that has no defined recovery.
    #[error("{op} of [{start:#x}, +{len:#x})")]
    Ioctl {
        op: &'static str,
        start: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// `read(2)` of the userfaultfd failed.
    #[error("reading userfaultfd events")]
    Read {
        #[source]
        source: io::Error,
    },
}

/// How a page-installing ioctl (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`) or a wake ended, when it did
/// not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// The page is now mapped and the waiting threads were woken (unless asked not to).
    Done,
    /// `EEXIST`: the page was already mapped (a racing fault or the prefetcher won).
    Exists,
    /// `EAGAIN` with nothing installed: the VMM's memory layout is changing, typically a
    /// REMOVE event waits in the queue. Read the events, then retry.
    Again,
    /// A multi-page install stopped part way: the first `bytes` of the range are mapped (and
    /// their waiters woken, unless asked not to), the rest is not. The kernel stops at the
    /// first page already present (or when the layout starts changing) and reports how far it
    /// got; what stopped it is not reported.
    Partial { bytes: u64 },
    /// `ENOENT`: the destination is no longer registered memory (the VMM unmapped it).
    Vanished,
    /// `ESRCH`: the process that owns the memory is gone.
    ProcessGone,
}

impl Install {
    fn from_errno(errno: i32) -> Option<Self> {
        match errno {
            libc::EEXIST => Some(Self::Exists),
            // EINTR: the kernel gave up because of a pending signal in this thread; retry.
            libc::EAGAIN | libc::EINTR => Some(Self::Again),
            libc::ENOENT => Some(Self::Vanished),
            libc::ESRCH => Some(Self::ProcessGone),
            _ => None,
        }
    }
}

/// Outcome of one non-blocking read of the event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEvents {
    /// This many complete messages were read into the buffer.
    Messages(usize),
    /// No event is pending.
    Empty,
}

/// One decoded `uffd_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread touched a missing page at `address` (not page-aligned).
    PageFault {
        address: u64,
        flags: u64,
        thread_id: u32,
    },
    /// `madvise(MADV_DONTNEED)` (or similar) dropped `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `munmap` of `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// The VMM forked; the kernel installed a new userfaultfd in our fd table.
    Fork { new_fd: u32 },
    /// An event type this crate does not know.
    Unknown { event: u8 },
}

impl UffdEvent {
    /// Decodes one message. `msg` must hold [`UFFD_MSG_SIZE`] bytes; shorter input decodes as
    /// `Unknown` (the kernel never hands out partial messages).
    pub fn parse(msg: &[u8]) -> Self {
        let Some(msg) = msg.get(..UFFD_MSG_SIZE) else {
            return Self::Unknown {
                event: msg.first().copied().unwrap_or(0),
            };
        };
        let word = |index: usize| {
            let start = 8 + index * 8;
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&msg[start..start + 8]);
            u64::from_ne_bytes(bytes)
        };
        let low32 = |value: u64| u32::try_from(value & u64::from(u32::MAX)).unwrap_or(u32::MAX);
        match msg[0] {
            EVENT_PAGEFAULT => Self::PageFault {
                flags: word(0),
                address: word(1),
                thread_id: low32(word(2)),
            },
            EVENT_FORK => Self::Fork {
                new_fd: low32(word(0)),
            },
            EVENT_REMAP => Self::Remap {
                from: word(0),
                to: word(1),
                len: word(2),
            },
            EVENT_REMOVE => Self::Remove {
                start: word(0),
                end: word(1),
            },
            EVENT_UNMAP => Self::Unmap {
                start: word(0),
                end: word(1),
            },
            event => Self::Unknown { event },
        }
    }
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Uffd {
    /// Wraps a descriptor received from a VMM. The caller has checked that it is a
    /// userfaultfd; a wrong kind of file only makes the ioctls fail.
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Creates a new userfaultfd for this process (the VMM's side), close-on-exec and
    /// non-blocking, handling faults from kernel mode too (`UFFD_USER_MODE_ONLY` unset: KVM
    /// touches guest memory from the kernel). Tries `/dev/userfaultfd` first (which is what
    /// the userfaultfd crate and Firecracker do), then the `userfaultfd(2)` syscall.
    pub fn create() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let device_error = match std::fs::File::open("/dev/userfaultfd") {
            Ok(device) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and touches no memory
                // of ours; `device` is an open /dev/userfaultfd.
                let fd = unsafe { ioctl_with_val(&device, USERFAULTFD_IOC_NEW, flags_arg(flags)) };
                match owned_from_result(fd) {
                    Ok(fd) => return Ok(Self { fd }),
                    Err(error) => error,
                }
            }
            Err(error) => error,
        };
        // SAFETY: userfaultfd(2) takes one integer flags argument and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = RawFd::try_from(fd).unwrap_or(-1);
        owned_from_result(fd)
            .map(|fd| Self { fd })
            .map_err(|syscall_error| {
                tracing::debug!(%device_error, "/dev/userfaultfd unusable, the syscall failed too");
                UffdError::Create {
                    source: syscall_error,
                }
            })
    }

    /// `UFFDIO_API`: enables `features`; returns the features the kernel reports.
    pub fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `api` is a live, correctly laid out `struct uffdio_api` that the kernel reads
        // and writes for the duration of the call only.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_API, &mut api) };
        if ret < 0 {
            return Err(UffdError::Api {
                features,
                source: io::Error::last_os_error(),
            });
        }
        Ok(api.features)
    }

    /// `UFFDIO_REGISTER` in MISSING mode for `[start, start + len)` of this process.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `register` is a live `struct uffdio_register`, read and written by the kernel
        // during the call only; the range is only validated against this process's mappings.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER, &mut register) };
        if ret < 0 {
            return Err(UffdError::Register {
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `UFFDIO_COPY`: maps a copy of `src` at `dst` (page-aligned, in the VMM's address space)
    /// and wakes the threads waiting on it unless `wake` is false.
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<Install, UffdError> {
        let len = u64::try_from(src.len()).unwrap_or(u64::MAX);
        let mut copy = UffdioCopy {
            dst,
            // The kernel reads `len` bytes from here, in our address space: exactly `src`.
            src: src.as_ptr() as u64,
            len,
            mode: if wake { 0 } else { MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: `copy` is a live `struct uffdio_copy`; the kernel reads `len` bytes at `src`,
        // which `src: &[u8]` keeps valid for the call, and writes only `copy.copy` of ours.
        // `dst` is resolved in the VMM's mm, never in this process.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY, &mut copy) };
        if ret == 0 {
            return Ok(Install::Done);
        }
        let error = io::Error::last_os_error();
        classify(error, copy.copy, "UFFDIO_COPY", dst, len)
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page over `[dst, dst + len)` (VMM address space).
    pub fn zeropage(&self, dst: u64, len: u64, wake: bool) -> Result<Install, UffdError> {
        let mut zero = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: if wake { 0 } else { MODE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: `zero` is a live `struct uffdio_zeropage` the kernel reads and writes during
        // the call; the range is resolved in the VMM's mm.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_ZEROPAGE, &mut zero) };
        if ret == 0 {
            return Ok(Install::Done);
        }
        let error = io::Error::last_os_error();
        classify(error, zero.zeropage, "UFFDIO_ZEROPAGE", dst, len)
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<Install, UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: `range` is a live `struct uffdio_range` the kernel only reads.
        let ret = unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE, &range) };
        if ret == 0 {
            return Ok(Install::Done);
        }
        classify(io::Error::last_os_error(), 0, "UFFDIO_WAKE", start, len)
    }

    /// Reads as many whole messages as fit in `buf` without blocking (the descriptor must be
    /// `O_NONBLOCK`). Decode them with [`UffdEvent::parse`] on `UFFD_MSG_SIZE` chunks.
    ///
    /// Reading a FORK message installs a descriptor in this process: call
    /// [`close_forked_uffd`] on it.
    pub fn read_events(&self, buf: &mut [u8]) -> Result<ReadEvents, UffdError> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow
        // mutably for the call.
        let ret = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(ret) {
            Ok(bytes) => Ok(ReadEvents::Messages(bytes / UFFD_MSG_SIZE)),
            Err(_) => {
                let source = io::Error::last_os_error();
                match source.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR) => Ok(ReadEvents::Empty),
                    _ => Err(UffdError::Read { source }),
                }
            }
        }
    }
}

/// Closes the userfaultfd the kernel installed in our fd table when it delivered a FORK event
/// (we do not serve forked children; keeping it would leak a descriptor per fork).
pub fn close_forked_uffd(new_fd: u32) {
    let Ok(fd) = RawFd::try_from(new_fd) else {
        return;
    };
    // The value comes from the kernel's FORK message, which installed this descriptor for us
    // while we read it; nothing else in this process knows the number yet.
    if fd_is_userfaultfd(fd) {
        // SAFETY: `fd` was just installed in our table by the kernel for this event, refers to
        // a userfaultfd (checked above), and no other owner exists.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// True when `fd` (in this process) is a userfaultfd, judged by its `/proc/self/fd` link.
/// Without a mounted `/proc` the check cannot be made and passes: a wrong kind of file then
/// only makes the userfaultfd ioctls fail (`ENOTTY`), which ends that VM's serving.
pub fn fd_is_userfaultfd(fd: RawFd) -> bool {
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(target) => target.as_os_str() == "anon_inode:[userfaultfd]",
        Err(_) => !std::path::Path::new("/proc/self/fd").exists(),
    }
}

/// The outcome of a failed serving ioctl. `progress` is the kernel's `copy` / `zeropage`
/// result field: bytes installed before it stopped when positive (the errno is then EAGAIN,
/// whatever stopped it), a negative errno or 0 otherwise.
fn classify(
    error: io::Error,
    progress: i64,
    op: &'static str,
    start: u64,
    len: u64,
) -> Result<Install, UffdError> {
    if let Ok(bytes) = u64::try_from(progress)
        && bytes > 0
    {
        // Never more than asked: a larger value would be a kernel bug, treated as done.
        return Ok(if bytes >= len {
            Install::Done
        } else {
            Install::Partial { bytes }
        });
    }
    match error.raw_os_error().and_then(Install::from_errno) {
        Some(outcome) => Ok(outcome),
        None => Err(UffdError::Ioctl {
            op,
            start,
            len,
            source: error,
        }),
    }
}

fn flags_arg(flags: i32) -> libc::c_ulong {
    libc::c_ulong::try_from(flags).unwrap_or(0)
}

fn owned_from_result(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return from the creating call is a fresh descriptor owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Test-only stand-in for a VMM's guest memory: an anonymous private mapping.
#[cfg(test)]
pub(crate) mod testing {
    use std::ptr::NonNull;

    /// An anonymous `MAP_PRIVATE | MAP_NORESERVE` mapping, unmapped on drop.
    #[derive(Debug)]
    pub(crate) struct AnonMemory {
        ptr: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the mapping is plain memory owned by this value; access goes through raw
    // volatile reads/writes that are valid from any thread.
    unsafe impl Send for AnonMemory {}
    // SAFETY: as above; concurrent accesses to distinct or identical bytes are volatile byte
    // accesses on memory that stays mapped for the value's life.
    unsafe impl Sync for AnonMemory {}

    impl AnonMemory {
        pub(crate) fn new(len: usize) -> Self {
            // SAFETY: a fresh anonymous mapping at a kernel-chosen address touches no existing
            // memory.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap of {len} bytes");
            let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap returned null");
            Self { ptr, len }
        }

        pub(crate) fn addr(&self) -> u64 {
            self.ptr.as_ptr() as u64
        }

        pub(crate) fn len(&self) -> usize {
            self.len
        }

        /// Reads `len` bytes at `offset` (faulting them in through the pager).
        pub(crate) fn read(&self, offset: usize, len: usize) -> Vec<u8> {
            assert!(offset + len <= self.len);
            (offset..offset + len)
                .map(|i| {
                    // SAFETY: `i < self.len`, inside the live mapping.
                    let byte = unsafe { self.ptr.as_ptr().add(i) };
                    // SAFETY: `byte` points into the live mapping; volatile keeps the access.
                    unsafe { byte.read_volatile() }
                })
                .collect()
        }

        /// Writes one byte at `offset`.
        pub(crate) fn write_byte(&self, offset: usize, value: u8) {
            assert!(offset < self.len);
            // SAFETY: `offset < self.len`, inside the live mapping.
            let byte = unsafe { self.ptr.as_ptr().add(offset) };
            // SAFETY: `byte` points into the live, writable mapping.
            unsafe { byte.write_volatile(value) };
        }

        /// `madvise(MADV_DONTNEED)` over `[offset, offset + len)`.
        pub(crate) fn dontneed(&self, offset: usize, len: usize) {
            assert!(offset + len <= self.len);
            // SAFETY: `offset + len <= self.len`, inside the live mapping.
            let start = unsafe { self.ptr.as_ptr().add(offset) };
            // SAFETY: the range lies inside our own anonymous mapping; dropping its pages is
            // what the test wants and no Rust reference points into it.
            let ret = unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTNEED) };
            assert_eq!(ret, 0, "madvise: {}", std::io::Error::last_os_error());
        }

        /// Which pages of `[offset, offset + len)` are resident (`mincore`).
        pub(crate) fn resident(&self, offset: usize, len: usize) -> Vec<bool> {
            assert!(offset + len <= self.len);
            let pages = len.div_ceil(4096);
            let mut vec = vec![0u8; pages];
            // SAFETY: `offset + len <= self.len`, inside the live mapping.
            let start = unsafe { self.ptr.as_ptr().add(offset) };
            // SAFETY: `vec` holds one byte per page of the queried range, as mincore requires.
            let ret = unsafe { libc::mincore(start.cast(), len, vec.as_mut_ptr()) };
            assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
            vec.iter().map(|b| b & 1 == 1).collect()
        }
    }

    impl Drop for AnonMemory {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping; no references into it outlive `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::AnonMemory;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_ioctl_numbers_match_linux_headers() {
        // Values printed by a C program including <linux/userfaultfd.h> on x86_64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn test_parse_pagefault_reads_address_and_thread() {
        let mut msg = [0u8; UFFD_MSG_SIZE];
        msg[0] = EVENT_PAGEFAULT;
        msg[8..16].copy_from_slice(&1u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x7f00_1234u64.to_ne_bytes());
        msg[24..28].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(
            UffdEvent::parse(&msg),
            UffdEvent::PageFault {
                address: 0x7f00_1234,
                flags: 1,
                thread_id: 42
            }
        );
    }

    #[test]
    fn test_parse_remove_reads_range() {
        let mut msg = [0u8; UFFD_MSG_SIZE];
        msg[0] = EVENT_REMOVE;
        msg[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(
            UffdEvent::parse(&msg),
            UffdEvent::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
    }

    #[test]
    fn test_parse_short_message_is_unknown() {
        assert_eq!(
            UffdEvent::parse(&[EVENT_PAGEFAULT; 5]),
            UffdEvent::Unknown { event: 0x12 }
        );
        assert_eq!(UffdEvent::parse(&[]), UffdEvent::Unknown { event: 0 });
    }

    proptest! {
        #[test]
        fn test_parse_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let event = UffdEvent::parse(&bytes);
            if bytes.len() < UFFD_MSG_SIZE {
                let is_unknown = matches!(event, UffdEvent::Unknown { .. });
                prop_assert!(is_unknown, "short input decoded as {:?}", event);
            }
        }
    }

    fn registered(memory: &AnonMemory, features: u64) -> Uffd {
        let uffd = Uffd::create().expect("create userfaultfd");
        uffd.api(features).expect("UFFDIO_API");
        uffd.register(memory.addr(), u64::try_from(memory.len()).expect("len"))
            .expect("register");
        uffd
    }

    #[test]
    fn test_copy_then_copy_again_reports_exists() {
        let memory = AnonMemory::new(2 * 4096);
        let uffd = registered(&memory, UFFD_FEATURE_EVENT_REMOVE);
        let page = [0x5au8; 4096];
        assert_eq!(
            uffd.copy(memory.addr(), &page, true).expect("copy"),
            Install::Done
        );
        assert_eq!(
            uffd.copy(memory.addr(), &page, true).expect("copy"),
            Install::Exists
        );
        assert_eq!(memory.read(0, 4096), page.to_vec());
    }

    #[test]
    fn test_copy_run_over_a_present_page_is_partial() {
        let memory = AnonMemory::new(4 * 4096);
        let uffd = registered(&memory, UFFD_FEATURE_EVENT_REMOVE);
        let present = [0x11u8; 4096];
        assert_eq!(
            uffd.copy(memory.addr() + 2 * 4096, &present, true)
                .expect("copy"),
            Install::Done
        );
        let run = [0x22u8; 4 * 4096];
        assert_eq!(
            uffd.copy(memory.addr(), &run, true).expect("copy"),
            Install::Partial { bytes: 2 * 4096 }
        );
        assert_eq!(memory.read(0, 2 * 4096), vec![0x22u8; 2 * 4096]);
        assert_eq!(memory.read(2 * 4096, 4096), present.to_vec());
        assert_eq!(
            memory.resident(3 * 4096, 4096),
            vec![false],
            "the kernel stops at the present page"
        );
    }

    #[test]
    fn test_copy_run_starting_on_a_present_page_is_exists() {
        let memory = AnonMemory::new(3 * 4096);
        let uffd = registered(&memory, 0);
        assert_eq!(
            uffd.copy(memory.addr(), &[1u8; 4096], true).expect("copy"),
            Install::Done
        );
        assert_eq!(
            uffd.copy(memory.addr(), &[2u8; 3 * 4096], true)
                .expect("copy"),
            Install::Exists
        );
    }

    #[test]
    fn test_zeropage_run_over_a_present_page_is_partial() {
        let memory = AnonMemory::new(3 * 4096);
        let uffd = registered(&memory, 0);
        assert_eq!(
            uffd.copy(memory.addr() + 4096, &[7u8; 4096], true)
                .expect("copy"),
            Install::Done
        );
        assert_eq!(
            uffd.zeropage(memory.addr(), 3 * 4096, true)
                .expect("zeropage"),
            Install::Partial { bytes: 4096 }
        );
        assert_eq!(memory.read(0, 4096), vec![0u8; 4096]);
        assert_eq!(memory.read(4096, 4096), vec![7u8; 4096]);
    }

    #[test]
    fn test_zeropage_installs_zeros() {
        let memory = AnonMemory::new(4096);
        let uffd = registered(&memory, 0);
        assert_eq!(
            uffd.zeropage(memory.addr(), 4096, true).expect("zeropage"),
            Install::Done
        );
        assert_eq!(memory.read(0, 4096), vec![0u8; 4096]);
    }

    #[test]
    fn test_copy_outside_registered_range_is_vanished() {
        let memory = AnonMemory::new(4096);
        let uffd = registered(&memory, 0);
        let other = AnonMemory::new(4096);
        let page = [1u8; 4096];
        assert_eq!(
            uffd.copy(other.addr(), &page, true).expect("copy"),
            Install::Vanished
        );
    }

    #[test]
    fn test_read_events_without_events_is_empty() {
        let memory = AnonMemory::new(4096);
        let uffd = registered(&memory, 0);
        let mut buf = [0u8; UFFD_MSG_SIZE * 4];
        assert_eq!(uffd.read_events(&mut buf).expect("read"), ReadEvents::Empty);
    }

    #[test]
    fn test_pending_remove_makes_copy_return_again() {
        use nix::poll::{PollFd, PollFlags, poll};
        let memory = std::sync::Arc::new(AnonMemory::new(2 * 4096));
        let uffd = registered(&memory, UFFD_FEATURE_EVENT_REMOVE);
        // The madvise blocks in the kernel until we read its REMOVE event.
        let madviser = {
            let memory = std::sync::Arc::clone(&memory);
            std::thread::spawn(move || memory.dontneed(4096, 4096))
        };
        let mut fds = [PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, 10_000u16).expect("poll"),
            1,
            "no REMOVE event within 10 s"
        );
        let page = [3u8; 4096];
        assert_eq!(
            uffd.copy(memory.addr(), &page, true).expect("copy"),
            Install::Again
        );

        let mut buf = [0u8; UFFD_MSG_SIZE * 2];
        assert_eq!(
            uffd.read_events(&mut buf).expect("read"),
            ReadEvents::Messages(1)
        );
        let base = memory.addr();
        let expected = UffdEvent::Remove {
            start: base + 4096,
            end: base + 8192,
        };
        assert_eq!(UffdEvent::parse(&buf), expected);
        madviser.join().expect("madvise thread");
        assert_eq!(
            uffd.copy(memory.addr(), &page, true).expect("copy"),
            Install::Done
        );
    }

    #[test]
    fn test_fd_is_userfaultfd_rejects_a_pipe() {
        let memory = AnonMemory::new(4096);
        let uffd = registered(&memory, 0);
        assert!(fd_is_userfaultfd(uffd.as_fd().as_raw_fd()));
        let file = tempfile::tempfile().expect("tempfile");
        assert!(!fd_is_userfaultfd(file.as_raw_fd()));
    }
}
