//! The VMM's half of lazy restore through userfaultfd, following Firecracker's handshake.
//!
//! Guest RAM is mapped anonymous and registered with a userfaultfd (MISSING mode: the first
//! touch of every page, by the guest through KVM or by the VMM itself, waits for the page
//! server). The VMM connects to the page server's unix socket and sends, in one `sendmsg`,
//! the JSON list of regions with the userfaultfd attached (SCM_RIGHTS). Nothing else is said.
//!
//! Unlike Firecracker, the VMM keeps the connection and watches it: the page server holds its
//! end open for as long as it serves the VM, so end-of-file means it is gone and no missing
//! page will ever be served; the VMM then stops the VM with an error instead of hanging.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
use vmm_sys_util::ioctl_iowr_nr;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::memory::{GuestMemory, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("creating the userfaultfd: {0}")]
    Create(std::io::Error),
    #[error("userfaultfd API handshake: {0}")]
    Api(std::io::Error),
    #[error("registering guest memory at {addr:#x} ({len} bytes) with the userfaultfd: {source}")]
    Register {
        addr: usize,
        len: usize,
        source: std::io::Error,
    },
    #[error("connecting to the page server at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("sending the userfaultfd to the page server at {path}: {source}")]
    Send {
        path: String,
        source: std::io::Error,
    },
}

/// One guest RAM region as the page server sees it (Firecracker's `GuestRegionUffdMapping`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionMapping {
    pub base_host_virt_addr: u64,
    pub size: u64,
    /// Where the region starts in the flat memory range (the memory file's offsets).
    pub offset: u64,
    pub page_size: u64,
    /// Deprecated in Firecracker and, despite the name, in bytes; still sent.
    pub page_size_kib: u64,
}

const UFFD_API: u64 = 0xaa;
const UFFDIO: u32 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);

/// The regions of `mem` as the handshake describes them.
pub fn region_mappings(mem: &GuestMemory) -> Vec<RegionMapping> {
    let mut offset = 0;
    mem.iter()
        .map(|region| {
            let mapping = RegionMapping {
                base_host_virt_addr: region.as_ptr() as u64,
                size: region.len(),
                offset,
                page_size: PAGE_SIZE as u64,
                page_size_kib: PAGE_SIZE as u64,
            };
            offset += region.len();
            mapping
        })
        .collect()
}

/// A registered userfaultfd and the live connection to the page server serving it.
#[derive(Debug)]
pub struct UffdBackend {
    /// Kept so that a page server that dies leaves faults pending (the VMM notices through
    /// `connection` and stops) rather than silently turning into zero-filled memory.
    pub uffd: OwnedFd,
    pub connection: UnixStream,
}

/// Creates a userfaultfd over all of `mem` (which nothing has touched yet) and hands it to
/// the page server listening at `socket`.
pub fn connect(mem: &GuestMemory, socket: &Path) -> Result<UffdBackend, UffdError> {
    let uffd = create()?;
    for region in mem.iter() {
        register(&uffd, region.as_ptr() as usize, usize_of(region.len()))?;
    }
    let path = socket.display().to_string();
    let connection = UnixStream::connect(socket).map_err(|source| UffdError::Connect {
        path: path.clone(),
        source,
    })?;
    let payload = serde_json::to_vec(&region_mappings(mem)).expect("plain numbers serialize");
    connection
        .send_with_fd(&payload[..], uffd.as_raw_fd())
        .map_err(|e| UffdError::Send {
            path,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    Ok(UffdBackend { uffd, connection })
}

fn create() -> Result<OwnedFd, UffdError> {
    // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd).map_err(|_| UffdError::Create(std::io::Error::other("bad fd")))?;
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which `api` is (repr(C),
    // same layout), on the userfaultfd we own.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, UFFDIO_API(), &mut api) };
    if ret != 0 {
        return Err(UffdError::Api(std::io::Error::last_os_error()));
    }
    Ok(uffd)
}

fn register(uffd: &OwnedFd, addr: usize, len: usize) -> Result<(), UffdError> {
    let mut reg = UffdioRegister {
        start: addr as u64,
        len: len as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one `uffdio_register` (repr(C), same
    // layout); the range is guest RAM that this process mapped and keeps mapped.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(uffd, UFFDIO_REGISTER(), &mut reg) };
    if ret != 0 {
        return Err(UffdError::Register {
            addr,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("x86_64: u64 fits in usize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_region_mappings_offsets_are_running_sums() {
        let mem = crate::memory::create(4096 + 64, false).unwrap();
        let maps = region_mappings(&mem);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].offset, 0);
        assert_eq!(maps[1].offset, maps[0].size);
        assert_eq!(maps[0].size + maps[1].size, (4096 + 64) << 20);
        let json = serde_json::to_string(&maps[0]).unwrap();
        assert!(json.contains("\"page_size\":4096"), "{json}");
        assert!(json.contains("\"page_size_kib\":4096"), "{json}");
    }

    #[test]
    fn test_connect_to_missing_socket_names_it() {
        let mem = crate::memory::create(16, false).unwrap();
        let err = connect(&mem, Path::new("/nonexistent/pager.sock")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/pager.sock"), "{err}");
    }
}
