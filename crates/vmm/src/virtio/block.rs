//! virtio-blk (virtio 1.2 §5.2) on a host file or block device, or on a store's layers.
//!
//! One request queue of [`QUEUE_SIZE`]. Each request is one descriptor chain:
//!
//! ```text
//! +---------------------------------+
//! | type: u32 | reserved: u32       |  header: one readable descriptor of exactly 16 bytes
//! | sector: u64 (512-byte units)    |
//! +---------------------------------+
//! | data, 0..=seg_max descriptors   |  IN, GET_ID: device-writable; OUT: readable
//! +---------------------------------+
//! | status: u8                      |  the chain's last descriptor: device-writable, 1 byte
//! +---------------------------------+
//! ```
//!
//! Requests: IN (read), OUT (write), FLUSH, GET_ID (the drive id, 20 bytes, zero padded);
//! anything else gets VIRTIO_BLK_S_UNSUPP. A chain that breaks the layout, goes past the end
//! of the disk or names memory the guest does not have gets VIRTIO_BLK_S_IOERR, written to its
//! last descriptor if that one is device-writable. Without a writable status byte in guest
//! memory the request is not run (the driver could not learn its outcome) and the chain is
//! completed with length 0. Either way the ring moves on and the device serves the next.
//!
//! Two backends:
//!
//! ```text
//! plain    path_on_host  <--pread/pwrite-->  guest memory     (no bounce buffer)
//!          capacity = the file's size in 512-byte sectors, rounded down
//!
//! layered  layers.store/layers.build_id/disk-<drive>.header
//!            reads:  LayeredDisk (overlay if written, else the layers) --> bounce --> guest
//!            writes: guest --> bounce --> LayeredDisk overlay = path_on_host (private,
//!                    sparse, emptied on open; the base image and the layers are never written)
//!          capacity = the header's size; the bounce buffer moves at most 1 MiB per step
//!          snapshot_disk(store, build): the overlay's dirty blocks become build's disk diff
//! ```
//!
//! Caching, from the drive's `cache_type`:
//! - `Unsafe`: VIRTIO_BLK_F_FLUSH is not offered and a FLUSH anyway is a no-op; the host page
//!   cache decides when data reaches the disk.
//! - `Writeback`: VIRTIO_BLK_F_FLUSH is offered and FLUSH runs `fdatasync` (of the overlay,
//!   for a layered drive). A driver that does not accept the feature cannot flush, so then
//!   every write is followed by `fdatasync`.
//!
//! A read-only drive opens its file read-only (a layered one still has its overlay, unused),
//! offers VIRTIO_BLK_F_RO and fails writes with VIRTIO_BLK_S_IOERR.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, error, info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory as _, GuestMemoryError, Permissions, ReadVolatile,
    VolatileMemoryError, VolatileSlice, WriteVolatile,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use wrenn_snapshot::disk::{DiskError, LayeredDisk};
use wrenn_snapshot::header::{Header, HeaderError};
use wrenn_snapshot::id::BuildId;
use wrenn_snapshot::store::{DriveId, Store, StoreError};

use super::persist::{self, DeviceKindState, PersistError, QueueState, VirtioDeviceState};
use super::queue::serve_queue;
use super::{
    ActivateError, Activation, Interrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
};
use crate::api::models::{CacheType, Drive, DriveLayers, IoEngine};
use crate::diag::LogLimiter;
use crate::memory::GuestMemory;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
const SECTOR_SHIFT: u32 = 9;
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
const HEADER_LEN: u32 = 16;
const ID_LEN: usize = 20;
/// Most bytes a layered drive moves per step between guest memory and the disk.
const BOUNCE_MAX: usize = 1 << 20;

/// Byte offsets in `struct virtio_blk_config`; fields we do not offer read as zero.
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;
const CONFIG_LEN: usize = 24;

const fn feature(bit: u32) -> u64 {
    1 << bit
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("drive {drive_id} has no path_on_host")]
    NoPath { drive_id: String },
    #[error("cannot open drive file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("drive file {path} is a directory")]
    Directory { path: PathBuf },
    #[error("cannot read the size of drive file {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the queue eventfd")]
    QueueEvent(#[source] io::Error),
    #[error("layers.build_id {text:?} is invalid: {reason}")]
    LayersBuildId { text: String, reason: String },
    #[error("drive_id {drive_id:?} cannot name a layered drive's files in the store")]
    LayersDriveId {
        drive_id: String,
        #[source]
        source: StoreError,
    },
    #[error("layers.store {path} cannot be read")]
    LayersStore {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layers.store {path} is not a directory")]
    LayersStoreNotDir { path: PathBuf },
    #[error("cannot read disk header {path} (of layers.store and layers.build_id)")]
    LayersHeader {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("disk header {path} belongs to build {found}, not to layers.build_id {expected}")]
    HeaderBuild {
        path: PathBuf,
        expected: BuildId,
        found: BuildId,
    },
    #[error(
        "path_on_host {path} is {layer}, a layer of the drive: a layered drive's path_on_host is its private overlay, emptied on open"
    )]
    OverlayIsLayer { path: PathBuf, layer: PathBuf },
    #[error("path_on_host {path}: its directory does not exist")]
    OverlayDir { path: PathBuf },
    #[error("cannot open the layers or the overlay {overlay}")]
    Layered {
        overlay: PathBuf,
        #[source]
        source: DiskError,
    },
}

/// Why one request failed; each maps to a status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{sectors} go past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("buffer at {addr:#x}+{len:#x} is not guest memory")]
    Memory { addr: u64, len: u32 },
    #[error("write to a read-only drive")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("I/O on the drive file failed")]
    Io(#[source] io::Error),
    #[error("I/O on the layered disk failed")]
    Layered(#[source] DiskError),
}

impl RequestError {
    fn status(&self) -> u8 {
        let status = match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        u8::try_from(status).unwrap_or(u8::MAX)
    }

    /// Failures a correct driver causes only when something is wrong on the host.
    fn is_host_side(&self) -> bool {
        matches!(self, Self::Io(_) | Self::Layered(_))
    }
}

impl From<GuestMemoryError> for RequestError {
    fn from(e: GuestMemoryError) -> Self {
        match e {
            GuestMemoryError::IOError(e) => Self::Io(e),
            other => Self::Io(io::Error::other(other)),
        }
    }
}

impl From<VolatileMemoryError> for RequestError {
    fn from(e: VolatileMemoryError) -> Self {
        match e {
            VolatileMemoryError::IOError(e) => Self::Io(e),
            other => Self::Io(io::Error::other(other)),
        }
    }
}

/// The drive file at a position: `pread`/`pwrite` straight between it and guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }

    fn advance(&mut self, done: usize) {
        self.offset = self
            .offset
            .saturating_add(u64::try_from(done).unwrap_or(u64::MAX));
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the fd belongs to `self.file`, open for the whole call; `guard` points at
        // `buf.len()` bytes of mapped guest memory that stay mapped while it lives, and pread
        // writes at most that many bytes there.
        let done = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        let Ok(done) = usize::try_from(done) else {
            let e = io::Error::last_os_error();
            // Part of the buffer may have been written before the failure.
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(e));
        };
        buf.bitmap().mark_dirty(0, done);
        self.advance(done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the fd belongs to `self.file`, open for the whole call; `guard` points at
        // `buf.len()` bytes of mapped guest memory that stay mapped while it lives, and pwrite
        // only reads them.
        let done = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        let done = usize::try_from(done)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.advance(done);
        Ok(done)
    }
}

/// Where a drive's data lives.
#[derive(Debug)]
enum Backend {
    /// The drive file itself: `pread`/`pwrite` straight between it and guest memory.
    File(File),
    /// A store's layers plus a private overlay, through a bounce buffer.
    Layered(Box<Layered>),
}

impl Backend {
    /// Makes written data durable (`fdatasync` of the file or of the overlay).
    fn sync(&self) -> Result<(), RequestError> {
        match self {
            Backend::File(file) => file.sync_data().map_err(RequestError::Io),
            Backend::Layered(layered) => layered.disk.flush().map_err(RequestError::Layered),
        }
    }
}

/// A layered drive's disk and what serving it needs.
#[derive(Debug)]
struct Layered {
    disk: LayeredDisk,
    /// The store the disk was opened in: its snapshots must go to the same one.
    store: Store,
    /// Reused between requests; grows to at most [`BOUNCE_MAX`].
    bounce: Vec<u8>,
}

impl Layered {
    /// Disk → guest memory for the data descriptors of a checked IN request.
    fn read_into(
        &mut self,
        mem: &GuestMemory,
        data: &[Descriptor],
        offset: u64,
    ) -> Result<(), RequestError> {
        let mut offset = offset;
        for desc in data {
            let mut addr = desc.addr();
            let mut left = desc_len(desc)?;
            while left > 0 {
                let step = left.min(BOUNCE_MAX);
                let buf = bounce(&mut self.bounce, step);
                self.disk
                    .read_at(offset, buf)
                    .map_err(RequestError::Layered)?;
                // vm-memory's accessor marks the pages dirty, as the plain path's pread does.
                mem.write_slice(buf, addr)?;
                (addr, offset) = advance(addr, offset, step)?;
                left -= step;
            }
        }
        Ok(())
    }

    /// Guest memory → overlay for the data descriptors of a checked OUT request.
    fn write_from(
        &mut self,
        mem: &GuestMemory,
        data: &[Descriptor],
        offset: u64,
    ) -> Result<(), RequestError> {
        let mut offset = offset;
        for desc in data {
            let mut addr = desc.addr();
            let mut left = desc_len(desc)?;
            while left > 0 {
                let step = left.min(BOUNCE_MAX);
                let buf = bounce(&mut self.bounce, step);
                mem.read_slice(buf, addr)?;
                self.disk
                    .write_at(offset, buf)
                    .map_err(RequestError::Layered)?;
                (addr, offset) = advance(addr, offset, step)?;
                left -= step;
            }
        }
        Ok(())
    }
}

/// The first `len` bytes of the bounce buffer, growing it if needed.
fn bounce(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Moves a guest address and a disk offset on by `step` bytes.
fn advance(
    addr: GuestAddress,
    offset: u64,
    step: usize,
) -> Result<(GuestAddress, u64), RequestError> {
    let step = u64::try_from(step).map_err(|_| RequestError::Malformed("descriptor too long"))?;
    let addr = addr
        .0
        .checked_add(step)
        .ok_or(RequestError::Malformed("buffer wraps around"))?;
    let offset = offset
        .checked_add(step)
        .ok_or(RequestError::Malformed("request wraps around"))?;
    Ok((GuestAddress(addr), offset))
}

/// The drive's data and everything a request needs, apart from the queue.
#[derive(Debug)]
struct Disk {
    backend: Backend,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    read_only: bool,
    /// FLUSH runs fdatasync (cache_type Writeback).
    flush_syncs: bool,
    /// Every write is followed by fdatasync (Writeback, but the driver cannot flush).
    write_through: bool,
    /// The chain being served, reused so a request costs no allocation.
    chain: Vec<Descriptor>,
    max_chain_len: usize,
    log_limit: LogLimiter,
}

impl Disk {
    /// Serves one chain; returns the number of bytes written into it (data and status).
    fn serve(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        self.chain.clear();
        let mut last = None;
        let mut too_long = false;
        for desc in chain {
            if self.chain.len() < self.max_chain_len {
                self.chain.push(desc);
            } else {
                too_long = true;
            }
            last = Some(desc);
        }
        // Without a status byte the driver cannot learn the outcome, so the request is not run.
        let status_addr = last
            .and_then(status_byte)
            .filter(|&addr| mem.check_range(addr, 1, Permissions::Write));
        let Some(status_addr) = status_addr else {
            if self.log_limit.allow() {
                warn!("virtio-blk: request without a writable status byte; dropped");
            }
            return 0;
        };
        let result = if too_long {
            Err(RequestError::Malformed(
                "more descriptors than seg_max allows",
            ))
        } else {
            self.execute(mem)
        };
        let (status, data_len) = match result {
            Ok(data_len) => (status_u8(VIRTIO_BLK_S_OK), data_len),
            Err(e) => {
                if self.log_limit.allow() {
                    if e.is_host_side() {
                        error!("virtio-blk: {}", crate::diag::error_chain(&e));
                    } else {
                        debug!("virtio-blk: {e}");
                    }
                }
                (e.status(), 0)
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        data_len.saturating_add(1)
    }

    /// Runs the request in `self.chain` (header first, status last); returns how many data
    /// bytes it wrote into guest memory.
    fn execute(&mut self, mem: &GuestMemory) -> Result<u32, RequestError> {
        let (header, rest) = self
            .chain
            .split_first()
            .ok_or(RequestError::Malformed("empty chain"))?;
        let (status, data) = rest
            .split_last()
            .ok_or(RequestError::Malformed("no descriptor after the header"))?;
        if header.is_write_only() || header.len() != HEADER_LEN {
            return Err(RequestError::Malformed(
                "header is not one readable 16-byte descriptor",
            ));
        }
        if status.len() != 1 {
            return Err(RequestError::Malformed("status descriptor is not 1 byte"));
        }
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| RequestError::Memory {
                addr: header.addr().0,
                len: HEADER_LEN,
            })?;
        let (kind, sector) = parse_header(raw);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = self.check_data(mem, data, sector, true)?;
                let offset = sector << SECTOR_SHIFT;
                match &mut self.backend {
                    Backend::File(file) => {
                        let mut file = FileAt { file, offset };
                        for desc in data {
                            read_into(mem, desc, &mut file)?;
                        }
                    }
                    Backend::Layered(layered) => layered.read_into(mem, data, offset)?,
                }
                u32::try_from(len).map_err(|_| RequestError::Malformed("data too long"))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                self.check_data(mem, data, sector, false)?;
                let offset = sector << SECTOR_SHIFT;
                match &mut self.backend {
                    Backend::File(file) => {
                        let mut file = FileAt { file, offset };
                        for desc in data {
                            write_from(mem, desc, &mut file)?;
                        }
                    }
                    Backend::Layered(layered) => layered.write_from(mem, data, offset)?,
                }
                if self.write_through {
                    self.backend.sync()?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.flush_syncs {
                    self.backend.sync()?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => self.write_id(mem, data),
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Checks the data descriptors of a read or write: direction, memory, length and sector
    /// range. Nothing is transferred unless all of it holds. Returns the length in bytes.
    fn check_data(
        &self,
        mem: &GuestMemory,
        data: &[Descriptor],
        sector: u64,
        device_writes: bool,
    ) -> Result<u64, RequestError> {
        let access = if device_writes {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut len = 0u64;
        for desc in data {
            if desc.is_write_only() != device_writes {
                return Err(RequestError::Malformed(
                    "data descriptor has the wrong direction",
                ));
            }
            check_memory(mem, desc, access)?;
            len += u64::from(desc.len());
        }
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Unaligned(len));
        }
        let sectors = len >> SECTOR_SHIFT;
        let fits = sector
            .checked_add(sectors)
            .is_some_and(|end| end <= self.capacity_sectors);
        if !fits {
            return Err(RequestError::OutOfRange {
                sector,
                sectors,
                capacity: self.capacity_sectors,
            });
        }
        Ok(len)
    }

    /// GET_ID: the drive id, zero padded to 20 bytes, into the writable data descriptors.
    fn write_id(&self, mem: &GuestMemory, data: &[Descriptor]) -> Result<u32, RequestError> {
        for desc in data {
            if !desc.is_write_only() {
                return Err(RequestError::Malformed(
                    "GET_ID buffer is not device-writable",
                ));
            }
            check_memory(mem, desc, Permissions::Write)?;
        }
        let mut id = &self.id[..];
        let mut written = 0u32;
        for desc in data {
            let n = usize::try_from(desc.len()).map_or(id.len(), |len| len.min(id.len()));
            let (now, later) = id.split_at(n);
            mem.write_slice(now, desc.addr())?;
            written += u32::try_from(n).unwrap_or(0);
            id = later;
        }
        Ok(written)
    }
}

fn status_u8(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(u8::MAX)
}

/// Where the status byte of a chain whose last descriptor is `last` goes: the last byte of a
/// device-writable descriptor.
fn status_byte(last: Descriptor) -> Option<GuestAddress> {
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    last.addr()
        .0
        .checked_add(u64::from(last.len() - 1))
        .map(GuestAddress)
}

/// (type, sector) of a request header.
fn parse_header(raw: [u8; 16]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = raw;
    (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(s))
}

fn check_memory(
    mem: &GuestMemory,
    desc: &Descriptor,
    access: Permissions,
) -> Result<(), RequestError> {
    let bad = RequestError::Memory {
        addr: desc.addr().0,
        len: desc.len(),
    };
    let len = usize::try_from(desc.len()).map_err(|_| bad)?;
    if mem.check_range(desc.addr(), len, access) {
        Ok(())
    } else {
        Err(RequestError::Memory {
            addr: desc.addr().0,
            len: desc.len(),
        })
    }
}

fn desc_len(desc: &Descriptor) -> Result<usize, RequestError> {
    usize::try_from(desc.len()).map_err(|_| RequestError::Malformed("descriptor too long"))
}

/// File → guest memory for one descriptor, one region-contiguous slice at a time.
fn read_into(mem: &GuestMemory, desc: &Descriptor, file: &mut FileAt) -> Result<(), RequestError> {
    for slice in mem.get_slices(desc.addr(), desc_len(desc)?, Permissions::Write)? {
        file.read_exact_volatile(&mut slice?)?;
    }
    Ok(())
}

/// Guest memory → file for one descriptor.
fn write_from(mem: &GuestMemory, desc: &Descriptor, file: &mut FileAt) -> Result<(), RequestError> {
    for slice in mem.get_slices(desc.addr(), desc_len(desc)?, Permissions::Read)? {
        file.write_all_volatile(&slice?)?;
    }
    Ok(())
}

/// The plain backend: the drive file, and its capacity in sectors.
fn open_file(drive_id: &str, path: &Path, read_only: bool) -> Result<(Backend, u64), BlockError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
    let metadata = file.metadata().map_err(|source| BlockError::Size {
        path: path.to_owned(),
        source,
    })?;
    if metadata.is_dir() {
        return Err(BlockError::Directory {
            path: path.to_owned(),
        });
    }
    // Seeking to the end works for regular files and block devices alike.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|source| BlockError::Size {
            path: path.to_owned(),
            source,
        })?;
    if size % SECTOR_SIZE != 0 {
        warn!(
            drive_id,
            size, "drive file size is not a multiple of 512; the tail is not visible"
        );
    }
    Ok((Backend::File(file), size >> SECTOR_SHIFT))
}

/// A layered drive's source, resolved from its `layers` and checked.
#[derive(Debug)]
struct LayerSource {
    store: Store,
    drive: DriveId,
    header: Header,
}

fn resolve_layers(drive_id: &str, layers: &DriveLayers) -> Result<LayerSource, BlockError> {
    let bad_id = |reason: String| BlockError::LayersBuildId {
        text: layers.build_id.chars().take(80).collect(),
        reason,
    };
    let build: BuildId = layers
        .build_id
        .parse()
        .map_err(|e: wrenn_snapshot::id::IdError| bad_id(e.to_string()))?;
    if build.is_zero() {
        return Err(bad_id("the all-zero id is reserved".into()));
    }
    let drive = DriveId::new(drive_id).map_err(|source| BlockError::LayersDriveId {
        drive_id: drive_id.to_owned(),
        source,
    })?;
    let root = PathBuf::from(&layers.store);
    let meta = fs::metadata(&root).map_err(|source| BlockError::LayersStore {
        path: root.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(BlockError::LayersStoreNotDir { path: root });
    }
    let store = Store::new(root);
    let header_path = store.disk_header(build, &drive);
    let header = Header::read(&header_path).map_err(|source| BlockError::LayersHeader {
        path: header_path.clone(),
        source,
    })?;
    if header.build != build {
        return Err(BlockError::HeaderBuild {
            path: header_path,
            expected: build,
            found: header.build,
        });
    }
    Ok(LayerSource {
        store,
        drive,
        header,
    })
}

/// The overlay may not exist yet (it is created on open), but it must never be one of the
/// files the drive reads through: opening empties it.
fn check_overlay(overlay: &Path, source: &LayerSource) -> Result<(), BlockError> {
    let meta = match fs::metadata(overlay) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = overlay.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) {
                return Err(BlockError::OverlayDir {
                    path: overlay.to_owned(),
                });
            }
            return Ok(());
        }
        Err(source) => {
            return Err(BlockError::Open {
                path: overlay.to_owned(),
                source,
            });
        }
    };
    if meta.is_dir() {
        return Err(BlockError::Directory {
            path: overlay.to_owned(),
        });
    }
    let header_path = source.store.disk_header(source.header.build, &source.drive);
    let layers = source
        .header
        .builds
        .iter()
        .map(|info| source.store.disk_data(info.id, &source.drive))
        .chain([header_path]);
    for layer in layers {
        // Symlinks followed: an imported build's data file links to the base image.
        let same =
            fs::metadata(&layer).is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
        if same {
            return Err(BlockError::OverlayIsLayer {
                path: overlay.to_owned(),
                layer,
            });
        }
    }
    Ok(())
}

/// The layered backend: the layers of `layers`, a fresh overlay at `overlay`, and the
/// capacity in sectors (the header's size).
fn open_layered(
    drive_id: &str,
    layers: &DriveLayers,
    overlay: &Path,
) -> Result<(Backend, u64), BlockError> {
    let source = resolve_layers(drive_id, layers)?;
    check_overlay(overlay, &source)?;
    let disk = LayeredDisk::open(&source.store, source.header, &source.drive, overlay).map_err(
        |source| BlockError::Layered {
            overlay: overlay.to_owned(),
            source,
        },
    )?;
    let capacity_sectors = disk.size() >> SECTOR_SHIFT;
    let layered = Layered {
        disk,
        store: source.store,
        bounce: Vec::new(),
    };
    Ok((Backend::Layered(Box::new(layered)), capacity_sectors))
}

/// Checks a layered drive's configuration before the VM is built, without creating or
/// changing anything: `layers.build_id` is a build id, `layers.store` is a directory, the
/// build's disk header for this drive exists and is valid, and `path_on_host` (the overlay,
/// possibly not there yet) is not a directory, not in a missing directory, and not one of
/// the files the drive reads through. A drive without `layers` passes.
pub fn check_layered_drive(config: &Drive) -> Result<(), BlockError> {
    let Some(layers) = &config.layers else {
        return Ok(());
    };
    let overlay = config
        .path_on_host
        .as_deref()
        .ok_or_else(|| BlockError::NoPath {
            drive_id: config.drive_id.clone(),
        })?;
    let source = resolve_layers(&config.drive_id, layers)?;
    check_overlay(Path::new(overlay), &source)
}

/// Whether two store roots name the same directory.
fn same_store(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (fs::canonicalize(a), fs::canonicalize(b)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// What the device holds while the driver has it running.
#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The virtio-blk device for one drive.
#[derive(Debug)]
pub struct Block {
    id: String,
    cache_type: CacheType,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 1],
    queue_events: [EventFd; 1],
    disk: Disk,
    active: Option<Active>,
    log_limit: LogLimiter,
}

impl Block {
    /// Opens the drive: its file, or (with `layers`) its layers and a fresh overlay at
    /// `path_on_host`.
    pub fn new(config: &Drive) -> Result<Block, BlockError> {
        let path = config
            .path_on_host
            .as_deref()
            .map(PathBuf::from)
            .ok_or_else(|| BlockError::NoPath {
                drive_id: config.drive_id.clone(),
            })?;
        let read_only = config.is_read_only == Some(true);
        let (backend, capacity_sectors) = match &config.layers {
            None => open_file(&config.drive_id, &path, read_only)?,
            Some(layers) => open_layered(&config.drive_id, layers, &path)?,
        };
        if config.io_engine == Some(IoEngine::Async) {
            warn!(
                drive_id = config.drive_id,
                "io_engine Async is not supported; using Sync"
            );
        }
        if config.rate_limiter.is_some() {
            warn!(
                drive_id = config.drive_id,
                "drive rate limiters are not supported; ignored"
            );
        }

        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE);
        if read_only {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        }
        if config.cache_type == CacheType::Writeback {
            avail_features |= feature(VIRTIO_BLK_F_FLUSH);
        }

        // Without indirect descriptors a chain has at most a queue's worth of descriptors,
        // two of which are the header and the status.
        let max_chain_len = usize::from(QUEUE_SIZE);
        let seg_max = u32::from(QUEUE_SIZE) - 2;
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[CONFIG_CAPACITY..CONFIG_CAPACITY + 8]
            .copy_from_slice(&capacity_sectors.to_le_bytes());
        config_space[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&seg_max.to_le_bytes());
        let blk_size = u32::try_from(SECTOR_SIZE).unwrap_or(512);
        config_space[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4].copy_from_slice(&blk_size.to_le_bytes());

        let mut id = [0u8; ID_LEN];
        let id_bytes = config.drive_id.as_bytes();
        let id_len = id_bytes.len().min(ID_LEN);
        id[..id_len].copy_from_slice(&id_bytes[..id_len]);

        info!(
            drive_id = config.drive_id,
            path = %path.display(),
            layers = ?config.layers,
            capacity_sectors,
            read_only,
            cache_type = ?config.cache_type,
            "virtio-blk drive opened"
        );
        Ok(Block {
            id: config.drive_id.clone(),
            cache_type: config.cache_type,
            avail_features,
            acked_features: 0,
            config: config_space,
            queue_max_sizes: [QUEUE_SIZE],
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(BlockError::QueueEvent)?],
            disk: Disk {
                backend,
                capacity_sectors,
                id,
                read_only,
                flush_syncs: config.cache_type == CacheType::Writeback,
                write_through: false,
                chain: Vec::with_capacity(max_chain_len),
                max_chain_len,
                log_limit: LogLimiter::default(),
            },
            active: None,
            log_limit: LogLimiter::default(),
        })
    }

    /// The drive id (`drive_id` of the API).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    /// Serves everything the driver has posted.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            queue,
            interrupt,
        } = active;
        let disk = &mut self.disk;
        serve_queue(
            queue,
            mem,
            interrupt,
            &self.queue_events[0],
            &mut self.log_limit,
            |chain| disk.serve(chain, mem),
        );
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let event = &self.queue_events[0];
        if let Err(e) = ops.add(Events::with_data(event, 0, EventSet::IN)) {
            error!(
                drive_id = self.id,
                "virtio-blk: cannot watch the queue eventfd: {e}"
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let event = &self.queue_events[0];
        if events.fd() != event.as_raw_fd() {
            warn!(
                drive_id = self.id,
                fd = events.fd(),
                "virtio-blk: event on an unknown fd"
            );
            return;
        }
        // Non-blocking: nothing to read just means someone else drained it.
        let _ = event.read();
        if self.active.is_none() {
            debug!(
                drive_id = self.id,
                "virtio-blk: queue notified before activation; ignored"
            );
            return;
        }
        self.process_queue();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    /// Nothing in our config space is writable (no VIRTIO_BLK_F_CONFIG_WCE).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.log_limit.allow() {
            debug!(
                drive_id = self.id,
                offset,
                len = data.len(),
                "virtio-blk config write ignored"
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            mut queues,
            interrupt,
        } = activation;
        let ready = queues.iter().filter(|q| q.ready()).count();
        let queue = match queues.pop() {
            Some(queue) if ready == 1 && queues.is_empty() => queue,
            _ => {
                return Err(ActivateError::QueueCount {
                    want: 1,
                    got: ready,
                });
            }
        };
        let flush_acked = self.acked_features & feature(VIRTIO_BLK_F_FLUSH) != 0;
        self.disk.write_through = self.cache_type == CacheType::Writeback && !flush_acked;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        // Requests posted before now (e.g. before a snapshot) would otherwise wait for the
        // next notification.
        self.kick();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.disk.write_through = false;
    }

    fn save_state(&self) -> VirtioDeviceState {
        let queues = self
            .active
            .as_ref()
            .map(|active| vec![QueueState::from(&active.queue)])
            .unwrap_or_default();
        let kind = DeviceKindState::Block {
            read_only: self.disk.read_only,
            capacity_sectors: self.disk.capacity_sectors,
        };
        persist::device_state(self, queues, kind)
    }

    /// Besides the generic checks, the drive must look to the guest as it did: same size and
    /// same writability (the guest has read both).
    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), PersistError> {
        let name = format!("block {}", self.id);
        if let DeviceKindState::Block {
            read_only,
            capacity_sectors,
        } = state.kind
        {
            if read_only != self.disk.read_only {
                return Err(PersistError::Changed {
                    device: name,
                    field: "read_only",
                    saved: read_only.to_string(),
                    now: self.disk.read_only.to_string(),
                });
            }
            if capacity_sectors != self.disk.capacity_sectors {
                return Err(PersistError::Changed {
                    device: name,
                    field: "capacity_sectors",
                    saved: capacity_sectors.to_string(),
                    now: self.disk.capacity_sectors.to_string(),
                });
            }
        }
        persist::restore_device(self, &name, state, mem, interrupt)
    }

    /// A layered drive writes the blocks written since its last snapshot (or its open) as
    /// `build`'s `disk-<drive>.data` and `disk-<drive>.header`, then reads through the new
    /// header. `store` must be the store the drive reads from.
    fn snapshot_disk(&mut self, store: &Store, build: BuildId) -> Result<(), String> {
        let Backend::Layered(layered) = &mut self.disk.backend else {
            return Err(format!("drive {} is not a layered drive", self.id));
        };
        if !same_store(store.root(), layered.store.root()) {
            return Err(format!(
                "drive {} reads from store {}, not from {}: its diff cannot go there",
                self.id,
                layered.store.root().display(),
                store.root().display()
            ));
        }
        if build.is_zero() {
            return Err(format!(
                "drive {}: the all-zero build id is reserved",
                self.id
            ));
        }
        let dirty_blocks = layered.disk.dirty_blocks();
        let header = layered
            .disk
            .snapshot(build)
            .map_err(|e| format!("drive {}: {}", self.id, crate::diag::error_chain(&e)))?;
        info!(
            drive_id = self.id,
            %build,
            generation = header.generation,
            dirty_blocks,
            "virtio-blk layered drive snapshot written"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::persist::testing::transport_queue;
    use crate::virtio::testing::{USED_RING, desc, device_queue, used, used_idx};

    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use proptest::prelude::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    // The bindings are u32; descriptor flags are u16 and status bytes u8, and these fit.
    #[allow(clippy::cast_possible_truncation)]
    mod narrow {
        use virtio_bindings::bindings::virtio_ring::{
            VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
        };
        use virtio_bindings::virtio_blk::{
            VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
        };
        pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
        pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
        pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
        pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
        pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
        pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    }
    use narrow::{INDIRECT, IOERR, NEXT, OK, UNSUPP, WRITE};

    const HEADER: u64 = 0x9000;
    const STATUS: u64 = 0x9100;
    const DISK_SECTORS: u64 = 128;

    fn memory() -> GuestMemory {
        // Two adjacent regions, so a buffer can straddle them.
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x2_0000),
            (GuestAddress(0x2_0000), 0x4_0000),
        ])
        .unwrap()
    }

    struct TestDisk {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl TestDisk {
        /// A disk file of `len` bytes where byte i is `i % 251`.
        fn new(len: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.img");
            let mut f = File::create(&path).unwrap();
            let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            f.write_all(&content).unwrap();
            Self { _dir: dir, path }
        }

        fn contents(&self) -> Vec<u8> {
            fs::read(&self.path).unwrap()
        }

        fn drive(&self, read_only: bool, cache_type: CacheType) -> Drive {
            Drive {
                drive_id: "rootfs".into(),
                path_on_host: Some(self.path.to_string_lossy().into_owned()),
                is_root_device: true,
                is_read_only: Some(read_only),
                partuuid: None,
                cache_type,
                io_engine: None,
                rate_limiter: None,
                layers: None,
            }
        }
    }

    fn active_block(
        disk: &TestDisk,
        mem: &GuestMemory,
        vq: &MockSplitQueue<GuestMemory>,
        read_only: bool,
        cache_type: CacheType,
    ) -> (Block, Arc<Interrupt>) {
        let mut block = Block::new(&disk.drive(read_only, cache_type)).unwrap();
        block.set_acked_features(u64::MAX);
        let interrupt = Arc::new(Interrupt::new().unwrap());
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![transport_queue(vq, QUEUE_SIZE)],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        (block, interrupt)
    }

    /// Posts header + `data` + status as one chain starting at descriptor `first`. Each
    /// request gets its own header and status byte, so several can be posted at once.
    fn post(
        mem: &GuestMemory,
        vq: &MockSplitQueue<GuestMemory>,
        first: u16,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, u16)],
    ) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let header_at = request_header(first);
        mem.write_slice(&header, GuestAddress(header_at)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(request_status_at(first)))
            .unwrap();
        let mut descs = vec![desc(header_at, 16, NEXT, first + 1)];
        for (i, &(addr, len, flags)) in data.iter().enumerate() {
            let next = first + 2 + u16::try_from(i).unwrap();
            descs.push(desc(addr, len, flags | NEXT, next));
        }
        descs.push(desc(request_status_at(first), 1, WRITE, 0));
        vq.add_desc_chains(&descs, first).unwrap();
    }

    fn request_header(first: u16) -> u64 {
        0xa000 + 0x20 * u64::from(first)
    }

    fn request_status_at(first: u16) -> u64 {
        0xb000 + u64::from(first)
    }

    /// The status byte of the request `post`ed at `first`.
    fn request_status(mem: &GuestMemory, first: u16) -> u8 {
        mem.read_obj(GuestAddress(request_status_at(first)))
            .unwrap()
    }

    fn status(mem: &GuestMemory) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn expected(range: std::ops::Range<u64>) -> Vec<u8> {
        range.map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn test_block_new_missing_file_error_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        let mut drive = TestDisk::new(512).drive(false, CacheType::Unsafe);
        drive.path_on_host = Some(missing.to_string_lossy().into_owned());
        let err = Block::new(&drive).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }));
        assert!(err.to_string().contains("nope.img"), "{err}");
        drive.path_on_host = None;
        assert!(matches!(Block::new(&drive), Err(BlockError::NoPath { .. })));
        drive.path_on_host = Some(dir.path().to_string_lossy().into_owned());
        drive.is_read_only = Some(true);
        assert!(matches!(
            Block::new(&drive),
            Err(BlockError::Directory { .. })
        ));
    }

    #[test]
    fn test_block_capacity_rounds_down_and_config_space() {
        let disk = TestDisk::new(512 * 10 + 300);
        let block = Block::new(&disk.drive(false, CacheType::Unsafe)).unwrap();
        assert_eq!(block.capacity_sectors(), 10);
        let mut b = [0u8; 8];
        block.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 10);
        let mut b = [0u8; 4];
        block.read_config(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 254);
        block.read_config(20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 512);
        // Past our fields, and far out of range: zero.
        let mut b = [0xaa; 4];
        block.read_config(21, &mut b);
        assert_eq!(b, [2, 0, 0, 0]);
        block.read_config(0xe00, &mut b);
        assert_eq!(b, [0; 4]);
        block.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(block.device_type(), TYPE_BLOCK);
        assert_eq!(block.queue_max_sizes(), &[256]);
        assert_eq!(block.id(), "rootfs");
    }

    #[test]
    fn test_block_features_follow_read_only_and_cache_type() {
        let disk = TestDisk::new(4096);
        let rw = Block::new(&disk.drive(false, CacheType::Unsafe)).unwrap();
        assert!(!rw.is_read_only());
        let f = rw.avail_features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
        assert_ne!(f & feature(VIRTIO_BLK_F_SEG_MAX), 0);
        assert_ne!(f & feature(VIRTIO_BLK_F_BLK_SIZE), 0);
        assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & feature(VIRTIO_BLK_F_FLUSH),
            0,
            "Unsafe does not offer FLUSH"
        );

        let ro = Block::new(&disk.drive(true, CacheType::Writeback)).unwrap();
        assert!(ro.is_read_only());
        assert_ne!(ro.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro.avail_features() & feature(VIRTIO_BLK_F_FLUSH), 0);
    }

    #[test]
    fn test_block_write_then_read_round_trip() {
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, interrupt) = active_block(&disk, &mem, &vq, false, CacheType::Writeback);

        // Write sectors 4..7 from two buffers, one straddling the two memory regions.
        let a = 0x2_0000 - 0x200;
        let payload: Vec<u8> = (0..1536u32)
            .map(|i| u8::try_from(i * 7 % 256).unwrap())
            .collect();
        mem.write_slice(&payload[..1024], GuestAddress(a)).unwrap();
        mem.write_slice(&payload[1024..], GuestAddress(0x3_0000))
            .unwrap();
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_OUT,
            4,
            &[(a, 1024, 0), (0x3_0000, 512, 0)],
        );
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(used(&mem, 0), (0, 1));
        let on_disk = disk.contents();
        assert_eq!(&on_disk[4 * 512..7 * 512], &payload[..]);
        assert_eq!(
            &on_disk[..4 * 512],
            &expected(0..4 * 512)[..],
            "nothing else changed"
        );
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);

        // Read them back into three buffers.
        mem.write_slice(&[0u8; 1536], GuestAddress(0x1_0000))
            .unwrap();
        post(
            &mem,
            &vq,
            4,
            VIRTIO_BLK_T_IN,
            4,
            &[
                (0x1_0000, 512, WRITE),
                (0x1_0200, 512, WRITE),
                (0x1_0400, 512, WRITE),
            ],
        );
        block.process_queue();
        assert_eq!(request_status(&mem, 4), OK);
        assert_eq!(used(&mem, 1), (4, 1536 + 1));
        let mut back = vec![0u8; 1536];
        mem.read_slice(&mut back, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn test_block_read_of_untouched_sectors_returns_file_contents() {
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, true, CacheType::Unsafe);
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_IN,
            DISK_SECTORS - 2,
            &[(0x1_0000, 1024, WRITE)],
        );
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(got, expected((DISK_SECTORS - 2) * 512..DISK_SECTORS * 512));
    }

    #[test]
    fn test_block_flush_and_unsafe_flush_succeed() {
        let disk = TestDisk::new(4096);
        let mem = memory();
        for cache in [CacheType::Writeback, CacheType::Unsafe] {
            let vq = MockSplitQueue::new(&mem, 16);
            let (mut block, _) = active_block(&disk, &mem, &vq, false, cache);
            assert_eq!(block.disk.flush_syncs, cache == CacheType::Writeback);
            assert!(!block.disk.write_through);
            post(&mem, &vq, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
            block.process_queue();
            assert_eq!(request_status(&mem, 0), OK, "{cache:?}");
            assert_eq!(used(&mem, 0), (0, 1));
        }
    }

    #[test]
    fn test_block_writeback_without_flush_acked_writes_through() {
        let disk = TestDisk::new(4096);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = Block::new(&disk.drive(false, CacheType::Writeback)).unwrap();
        block.set_acked_features(VIRTIO_F_VERSION_1);
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![device_queue(&vq)],
                interrupt: Arc::new(Interrupt::new().unwrap()),
            })
            .unwrap();
        assert!(block.disk.write_through);
        mem.write_slice(&[0xab; 512], GuestAddress(0x1_0000))
            .unwrap();
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 1, &[(0x1_0000, 512, 0)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(&disk.contents()[512..1024], &[0xab; 512][..]);
    }

    #[test]
    fn test_block_get_id_is_zero_padded_to_20_bytes() {
        let disk = TestDisk::new(4096);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        mem.write_slice(&[0xee; 32], GuestAddress(0x1_0000))
            .unwrap();
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(0x1_0000, 20, WRITE)],
        );
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(used(&mem, 0), (0, 21));
        let mut id = [0u8; 21];
        mem.read_slice(&mut id, GuestAddress(0x1_0000)).unwrap();
        let mut want = [0u8; 21];
        want[..6].copy_from_slice(b"rootfs");
        want[20] = 0xee; // past the buffer: untouched
        assert_eq!(id, want);
    }

    #[test]
    fn test_block_get_id_truncates_long_ids_and_fills_split_buffers() {
        let disk = TestDisk::new(4096);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut drive = disk.drive(false, CacheType::Unsafe);
        drive.drive_id = "a-drive-id-longer-than-twenty-bytes".into();
        let mut block = Block::new(&drive).unwrap();
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![device_queue(&vq)],
                interrupt: Arc::new(Interrupt::new().unwrap()),
            })
            .unwrap();
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(0x1_0000, 8, WRITE), (0x1_1000, 64, WRITE)],
        );
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(used(&mem, 0), (0, 21));
        let mut a = [0u8; 8];
        let mut b = [0u8; 12];
        mem.read_slice(&mut a, GuestAddress(0x1_0000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x1_1000)).unwrap();
        assert_eq!(&a, b"a-drive-");
        assert_eq!(&b, b"id-longer-th");
    }

    #[test]
    fn test_block_read_only_refuses_writes() {
        let disk = TestDisk::new(4096);
        let before = disk.contents();
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, true, CacheType::Writeback);
        mem.write_slice(&[0xab; 512], GuestAddress(0x1_0000))
            .unwrap();
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 0, &[(0x1_0000, 512, 0)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), IOERR);
        assert_eq!(used(&mem, 0), (0, 1));
        assert_eq!(disk.contents(), before);
        // Reads still work.
        post(&mem, &vq, 3, VIRTIO_BLK_T_IN, 0, &[(0x1_0000, 512, WRITE)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 3), OK);
    }

    #[test]
    fn test_block_out_of_range_sectors_get_ioerr() {
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let before = disk.contents();
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 64);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        let cases = [
            (VIRTIO_BLK_T_IN, DISK_SECTORS, WRITE),
            (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, WRITE), // 2 sectors, 1 past the end
            (VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, 0),
            (VIRTIO_BLK_T_OUT, u64::MAX, 0), // sector + count overflows
            (VIRTIO_BLK_T_IN, u64::MAX >> 9, WRITE),
        ];
        for (i, (kind, sector, flags)) in cases.into_iter().enumerate() {
            let first = u16::try_from(i * 3).unwrap();
            post(&mem, &vq, first, kind, sector, &[(0x1_0000, 1024, flags)]);
            block.process_queue();
            assert_eq!(request_status(&mem, first), IOERR, "case {i}");
            assert_eq!(used(&mem, i), (u32::from(first), 1));
        }
        assert_eq!(disk.contents(), before);
    }

    #[test]
    fn test_block_unknown_type_gets_unsupp() {
        let disk = TestDisk::new(4096);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        // DISCARD is not offered.
        post(&mem, &vq, 0, 11, 0, &[(0x1_0000, 16, 0)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), UNSUPP);
    }

    #[test]
    fn test_block_malformed_chains_get_ioerr_and_device_carries_on() {
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let before = disk.contents();
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 64);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        let chains: Vec<Vec<RawDescriptor>> = vec![
            // Header the device may write: wrong direction.
            vec![desc(HEADER, 16, WRITE | NEXT, 1), desc(STATUS, 1, WRITE, 0)],
            // Header of the wrong size.
            vec![desc(HEADER, 8, NEXT, 1), desc(STATUS, 1, WRITE, 0)],
            // OUT with device-writable data.
            vec![
                desc(HEADER, 16, NEXT, 1),
                desc(0x1_0000, 512, WRITE | NEXT, 2),
                desc(STATUS, 1, WRITE, 0),
            ],
            // Data not a multiple of 512.
            vec![
                desc(HEADER, 16, NEXT, 1),
                desc(0x1_0000, 100, NEXT, 2),
                desc(STATUS, 1, WRITE, 0),
            ],
            // Data outside guest memory.
            vec![
                desc(HEADER, 16, NEXT, 1),
                desc(0x7_0000, 512, NEXT, 2),
                desc(STATUS, 1, WRITE, 0),
            ],
            // Header outside guest memory.
            vec![desc(0x10_0000_0000, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)],
            // Status of 4 bytes: IOERR goes in its last byte.
            vec![desc(HEADER, 16, NEXT, 1), desc(STATUS - 3, 4, WRITE, 0)],
            // Only a status descriptor.
            vec![desc(STATUS, 1, WRITE, 0)],
        ];
        for (i, chain) in chains.iter().enumerate() {
            // Re-base `next` fields onto where this chain lands in the table.
            let first = u16::try_from(i * 4).unwrap();
            let rebased: Vec<RawDescriptor> = chain
                .iter()
                .map(|d| {
                    let d = Descriptor::from(*d);
                    let next = if d.has_next() { d.next() + first } else { 0 };
                    desc(d.addr().0, d.len(), d.flags(), next)
                })
                .collect();
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            vq.add_desc_chains(&rebased, first).unwrap();
            block.process_queue();
            assert_eq!(status(&mem), IOERR, "chain {i}");
            assert_eq!(used(&mem, i), (u32::from(first), 1), "chain {i}");
        }
        assert_eq!(disk.contents(), before);
    }

    #[test]
    fn test_block_chain_without_status_byte_is_dropped_but_completed() {
        let disk = TestDisk::new(4096);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        // Last descriptor readable: no status byte anywhere.
        vq.add_desc_chains(&[desc(HEADER, 16, NEXT, 1), desc(0x1_0000, 512, 0, 0)], 0)
            .unwrap();
        // Last descriptor writable but empty.
        vq.add_desc_chains(&[desc(HEADER, 16, NEXT, 3), desc(STATUS, 0, WRITE, 0)], 2)
            .unwrap();
        block.process_queue();
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used(&mem, 0), (0, 0));
        assert_eq!(used(&mem, 1), (2, 0));
        // And the next good request is served.
        post(&mem, &vq, 4, VIRTIO_BLK_T_IN, 0, &[(0x1_0000, 512, WRITE)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 4), OK);
    }

    #[test]
    fn test_block_write_whose_status_is_outside_memory_is_not_run() {
        let disk = TestDisk::new(4096);
        let before = disk.contents();
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        mem.write_slice(&[0xab; 512], GuestAddress(0x1_0000))
            .unwrap();
        vq.add_desc_chains(
            &[
                desc(HEADER, 16, NEXT, 1),
                desc(0x1_0000, 512, NEXT, 2),
                desc(0x7_0000, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        block.process_queue();
        assert_eq!(used(&mem, 0), (0, 0));
        assert_eq!(disk.contents(), before);
    }

    #[test]
    fn test_block_io_error_from_the_file_gets_ioerr() {
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        // The file shrinks under the device: the read hits end of file.
        OpenOptions::new()
            .write(true)
            .open(&disk.path)
            .unwrap()
            .set_len(512)
            .unwrap();
        post(&mem, &vq, 0, VIRTIO_BLK_T_IN, 4, &[(0x1_0000, 512, WRITE)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), IOERR);
        assert_eq!(used(&mem, 0), (0, 1));
    }

    #[test]
    fn test_block_event_idx_suppresses_interrupt_until_driver_asks() {
        let disk = TestDisk::new(4096);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = Block::new(&disk.drive(false, CacheType::Unsafe)).unwrap();
        let mut queue = device_queue(&vq);
        queue.set_event_idx(true);
        let interrupt = Arc::new(Interrupt::new().unwrap());
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![queue],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        // used_event sits right after the avail ring; "interrupt me after entry 3".
        let used_event = GuestAddress(vq.avail_addr().0 + 4 + 2 * 16);
        mem.write_obj(3u16, used_event).unwrap();
        for first in [0u16, 3] {
            post(
                &mem,
                &vq,
                first,
                VIRTIO_BLK_T_IN,
                0,
                &[(0x1_0000, 512, WRITE)],
            );
            block.process_queue();
        }
        assert_eq!(used_idx(&mem), 2);
        assert!(interrupt.irqfd().read().is_err(), "no interrupt wanted yet");
        // The driver asks after the next one.
        mem.write_obj(2u16, used_event).unwrap();
        post(&mem, &vq, 6, VIRTIO_BLK_T_IN, 0, &[(0x1_0000, 512, WRITE)]);
        block.process_queue();
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
        // And the driver saw EVENT_IDX's avail_event advanced, so it may skip notifying.
        let avail_event = GuestAddress(USED_RING + 4 + 8 * 16);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);
    }

    #[test]
    fn test_block_batch_of_requests_gets_one_interrupt() {
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 64);
        let (mut block, interrupt) = active_block(&disk, &mem, &vq, false, CacheType::Unsafe);
        for i in 0..10u16 {
            post(
                &mem,
                &vq,
                i * 3,
                VIRTIO_BLK_T_IN,
                u64::from(i),
                &[(0x1_0000 + u64::from(i) * 512, 512, WRITE)],
            );
        }
        block.process_queue();
        assert_eq!(used_idx(&mem), 10);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
        let mut got = vec![0u8; 5120];
        mem.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(got, expected(0..5120));
    }

    #[test]
    fn test_block_event_loop_serves_only_when_active() {
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::Mutex;

        let disk = TestDisk::new(4096);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Arc::new(Mutex::new(
            Block::new(&disk.drive(false, CacheType::Unsafe)).unwrap(),
        ));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        post(&mem, &vq, 0, VIRTIO_BLK_T_IN, 1, &[(0x1_0000, 512, WRITE)]);

        block.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(used_idx(&mem), 0, "not active: ignored");
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0, "event was drained");

        block
            .lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![device_queue(&vq)],
                interrupt: Arc::new(Interrupt::new().unwrap()),
            })
            .unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(request_status(&mem, 0), OK);

        block.lock().unwrap().reset();
        assert!(!block.lock().unwrap().is_activated());
        assert_eq!(block.lock().unwrap().acked_features(), 0);
    }

    #[test]
    fn test_block_activation_needs_one_ready_queue() {
        let disk = TestDisk::new(4096);
        let mut block = Block::new(&disk.drive(false, CacheType::Unsafe)).unwrap();
        let result = block.activate(Activation {
            mem: memory(),
            queues: vec![Queue::new(QUEUE_SIZE).unwrap()],
            interrupt: Arc::new(Interrupt::new().unwrap()),
        });
        assert!(matches!(
            result,
            Err(ActivateError::QueueCount { want: 1, got: 0 })
        ));
        assert!(!block.is_activated());
    }

    #[test]
    fn test_block_pread_pwrite_wrapper_moves_exact_bytes() {
        let disk = TestDisk::new(4096);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&disk.path)
            .unwrap();
        let mem = memory();
        let d = Descriptor::new(0x2_0000 - 8, 16, 0, 0);
        mem.write_slice(b"0123456789abcdef", d.addr()).unwrap();
        write_from(
            &mem,
            &d,
            &mut FileAt {
                file: &file,
                offset: 100,
            },
        )
        .unwrap();
        let mut got = [0u8; 16];
        file.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(&got, b"0123456789abcdef");
        let d2 = Descriptor::new(0x3_0000, 16, WRITE, 0);
        read_into(
            &mem,
            &d2,
            &mut FileAt {
                file: &file,
                offset: 100,
            },
        )
        .unwrap();
        mem.read_slice(&mut got, d2.addr()).unwrap();
        assert_eq!(&got, b"0123456789abcdef");
    }

    #[test]
    fn test_block_read_into_guest_memory_marks_the_pages_dirty() {
        use crate::virtio::persist::testing::{clear_dirty, is_dirty};
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, true, CacheType::Unsafe);
        // 8 KiB over two pages, the second in the next memory region.
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_IN,
            0,
            &[(0x1_f000, 0x1000, WRITE), (0x2_0000, 0x1000, WRITE)],
        );
        clear_dirty(&mem);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert!(is_dirty(&mem, 0x1_f000), "pread's bytes are not tracked");
        assert!(is_dirty(&mem, 0x2_0fff));
        assert!(!is_dirty(&mem, 0x2_1000), "a page nobody wrote is clean");
    }

    fn block_state(block: &Block) -> VirtioDeviceState {
        let json = serde_json::to_string(&block.save_state()).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn test_block_snapshot_restore_on_copied_memory_continues_io() {
        use crate::virtio::persist::testing::copy_guest_memory;

        let disk = TestDisk::new(512 * DISK_SECTORS);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut block, _) = active_block(&disk, &mem, &vq, false, CacheType::Writeback);
        mem.write_slice(&[0x5a; 512], GuestAddress(0x1_0000))
            .unwrap();
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 3, &[(0x1_0000, 512, 0)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        let state = block_state(&block);
        drop(block);
        assert_eq!(state.queues[0].next_used, 1);

        let copy = memory();
        let vq = MockSplitQueue::new(&copy, 16);
        copy_guest_memory(&mem, &copy);
        let mut restored = Block::new(&disk.drive(false, CacheType::Writeback)).unwrap();
        let interrupt = Arc::new(Interrupt::new().unwrap());
        restored
            .restore_state(&state, copy.clone(), interrupt.clone())
            .unwrap();
        assert!(restored.is_activated());
        assert_eq!(restored.acked_features(), state.acked_features);

        // Read back what was written before the snapshot.
        post(&copy, &vq, 4, VIRTIO_BLK_T_IN, 3, &[(0x3_0000, 512, WRITE)]);
        restored.process_queue();
        assert_eq!(used_idx(&copy), 2);
        assert_eq!(used(&copy, 1), (4, 513));
        assert_eq!(request_status(&copy, 4), OK);
        let mut back = [0u8; 512];
        copy.read_slice(&mut back, GuestAddress(0x3_0000)).unwrap();
        assert_eq!(back, [0x5a; 512]);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn test_block_restore_onto_a_drive_configured_otherwise_is_refused() {
        let disk = TestDisk::new(512 * DISK_SECTORS);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (ro, _) = active_block(&disk, &mem, &vq, true, CacheType::Unsafe);
        let state = block_state(&ro);
        drop(ro);
        let interrupt = Arc::new(Interrupt::new().unwrap());

        // Read-only then, writable now: the guest would not know it may write.
        let mut rw = Block::new(&disk.drive(false, CacheType::Unsafe)).unwrap();
        let err = rw
            .restore_state(&state, mem.clone(), interrupt.clone())
            .unwrap_err();
        assert!(err.to_string().contains("block rootfs"), "{err}");
        assert!(err.to_string().contains("read_only"), "{err}");
        assert!(!rw.is_activated());

        // Flush offered then, not now: features changed under the driver.
        let wb_disk = TestDisk::new(512 * DISK_SECTORS);
        let (wb, _) = active_block(&wb_disk, &mem, &vq, false, CacheType::Writeback);
        let state = block_state(&wb);
        drop(wb);
        let mut unsafe_cache = Block::new(&wb_disk.drive(false, CacheType::Unsafe)).unwrap();
        let err = unsafe_cache
            .restore_state(&state, mem.clone(), interrupt.clone())
            .unwrap_err();
        assert!(
            matches!(err, PersistError::NotOffered { missing, .. } if missing == feature(VIRTIO_BLK_F_FLUSH)),
            "{err:?}"
        );

        // Another disk size.
        let bigger = TestDisk::new(512 * (DISK_SECTORS + 8));
        let mut other = Block::new(&bigger.drive(false, CacheType::Writeback)).unwrap();
        let err = other.restore_state(&state, mem, interrupt).unwrap_err();
        assert!(err.to_string().contains("capacity_sectors"), "{err}");
    }

    /// A store holding an imported image (byte i is `i % 251`) as its generation 0, for
    /// layered drives; overlays go next to it.
    struct TestStore {
        _dir: tempfile::TempDir,
        dir: PathBuf,
        image: PathBuf,
        store: Store,
        base: BuildId,
    }

    impl TestStore {
        fn new(image_len: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_owned();
            let image = root.join("base.img");
            fs::write(&image, expected(0..image_len)).unwrap();
            let store = Store::new(root.join("store"));
            let drive = DriveId::new("rootfs").unwrap();
            let base = store.import_disk_image(&image, &drive).unwrap();
            Self {
                _dir: dir,
                dir: root,
                image,
                store,
                base,
            }
        }

        fn drive(&self, build: BuildId, overlay: &str, read_only: bool) -> Drive {
            Drive {
                drive_id: "rootfs".into(),
                path_on_host: Some(self.overlay(overlay).to_string_lossy().into_owned()),
                is_root_device: true,
                is_read_only: Some(read_only),
                partuuid: None,
                cache_type: CacheType::Writeback,
                io_engine: None,
                rate_limiter: None,
                layers: Some(DriveLayers {
                    store: self.store.root().to_string_lossy().into_owned(),
                    build_id: build.to_string(),
                }),
            }
        }

        fn overlay(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        fn data_len(&self, build: BuildId) -> u64 {
            let drive = DriveId::new("rootfs").unwrap();
            fs::metadata(self.store.disk_data(build, &drive))
                .unwrap()
                .len()
        }
    }

    /// Acks every feature and activates `block` on `vq`.
    fn activate(
        mut block: Block,
        mem: &GuestMemory,
        vq: &MockSplitQueue<GuestMemory>,
    ) -> (Block, Arc<Interrupt>) {
        block.set_acked_features(u64::MAX);
        let interrupt = Arc::new(Interrupt::new().unwrap());
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![transport_queue(vq, QUEUE_SIZE)],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        (block, interrupt)
    }

    fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        got
    }

    fn bounce_len(block: &Block) -> usize {
        match &block.disk.backend {
            Backend::Layered(layered) => layered.bounce.len(),
            Backend::File(_) => panic!("not a layered drive"),
        }
    }

    const LAYERED_IMAGE: u64 = 64 * 1024 + 100;

    #[test]
    fn test_block_layered_reads_image_through_queue() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Block::new(&ts.drive(ts.base, "overlay", false)).unwrap();
        // The header's size: the image rounded up to 4 KiB blocks.
        assert_eq!(block.capacity_sectors(), 17 * 4096 / 512);
        let (mut block, interrupt) = activate(block, &mem, &vq);
        // The image's first 3 sectors, split over two buffers, one across the regions.
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_IN,
            0,
            &[(0x2_0000 - 0x200, 1024, WRITE), (0x3_0000, 512, WRITE)],
        );
        // The last two sectors: the image's tail, then zeros past its end.
        post(
            &mem,
            &vq,
            4,
            VIRTIO_BLK_T_IN,
            17 * 8 - 2,
            &[(0x1_0000, 1024, WRITE)],
        );
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(used(&mem, 0), (0, 1536 + 1));
        let mut first = guest_bytes(&mem, 0x2_0000 - 0x200, 1024);
        first.extend(guest_bytes(&mem, 0x3_0000, 512));
        assert_eq!(first, expected(0..1536));
        assert_eq!(request_status(&mem, 4), OK);
        let start = (17 * 8 - 2) * 512;
        let mut want = expected(start..LAYERED_IMAGE);
        want.resize(1024, 0);
        assert_eq!(guest_bytes(&mem, 0x1_0000, 1024), want);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn test_block_layered_writes_land_in_overlay_not_image() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let image_before = fs::read(&ts.image).unwrap();
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Block::new(&ts.drive(ts.base, "overlay", false)).unwrap();
        let (mut block, _) = activate(block, &mem, &vq);
        mem.write_slice(&[0xa5; 4096], GuestAddress(0x1_0000))
            .unwrap();
        mem.write_slice(&[0x3c; 512], GuestAddress(0x3_0000))
            .unwrap();
        // A whole block (block 1), and one sector in the middle of block 5.
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 8, &[(0x1_0000, 4096, 0)]);
        post(&mem, &vq, 3, VIRTIO_BLK_T_OUT, 42, &[(0x3_0000, 512, 0)]);
        post(&mem, &vq, 6, VIRTIO_BLK_T_FLUSH, 0, &[]);
        block.process_queue();
        for first in [0, 3, 6] {
            assert_eq!(request_status(&mem, first), OK, "request {first}");
        }

        assert_eq!(fs::read(&ts.image).unwrap(), image_before);
        let overlay = File::open(ts.overlay("overlay")).unwrap();
        let mut got = vec![0u8; 4096];
        overlay.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(got, vec![0xa5; 4096]);
        let mut got = vec![0u8; 512];
        overlay.read_exact_at(&mut got, 42 * 512).unwrap();
        assert_eq!(got, vec![0x3c; 512]);

        // Reads see the writes, and the rest of the partly written block is the image's.
        post(
            &mem,
            &vq,
            9,
            VIRTIO_BLK_T_IN,
            40,
            &[(0x2_8000, 4096, WRITE)],
        );
        block.process_queue();
        assert_eq!(request_status(&mem, 9), OK);
        let mut want = expected(40 * 512..48 * 512);
        want[1024..1536].fill(0x3c);
        assert_eq!(guest_bytes(&mem, 0x2_8000, 4096), want);
    }

    #[test]
    fn test_block_layered_snapshot_stores_only_written_blocks_and_reopens() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Block::new(&ts.drive(ts.base, "overlay", false)).unwrap();
        let (mut block, _) = activate(block, &mem, &vq);
        let payload: Vec<u8> = (0..8192u32)
            .map(|i| u8::try_from(i * 13 % 255 + 1).unwrap())
            .collect();
        mem.write_slice(&payload, GuestAddress(0x1_0000)).unwrap();
        // Blocks 2..4 in full, one sector of block 10.
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 16, &[(0x1_0000, 8192, 0)]);
        post(&mem, &vq, 3, VIRTIO_BLK_T_OUT, 81, &[(0x1_0000, 512, 0)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(request_status(&mem, 3), OK);

        let next = BuildId::random().unwrap();
        block.snapshot_disk(&ts.store, next).unwrap();
        assert_eq!(ts.data_len(next), 3 * 4096, "only the three written blocks");
        let drive = DriveId::new("rootfs").unwrap();
        let header = Header::read(&ts.store.disk_header(next, &drive)).unwrap();
        assert_eq!(
            (header.build, header.base, header.generation),
            (next, ts.base, 1)
        );
        drop(block);

        // A fresh device on the new build, with a new, empty overlay.
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let fresh = Block::new(&ts.drive(next, "overlay2", false)).unwrap();
        let (mut fresh, _) = activate(fresh, &mem, &vq);
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_IN,
            8,
            &[(0x1_0000, 4096 * 3, WRITE)],
        );
        post(
            &mem,
            &vq,
            3,
            VIRTIO_BLK_T_IN,
            80,
            &[(0x3_0000, 1024, WRITE)],
        );
        fresh.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(request_status(&mem, 3), OK);
        let mut want = expected(8 * 512..32 * 512);
        want[4096..].copy_from_slice(&payload);
        assert_eq!(guest_bytes(&mem, 0x1_0000, 4096 * 3), want);
        let mut want = expected(80 * 512..82 * 512);
        want[512..].copy_from_slice(&payload[..512]);
        assert_eq!(guest_bytes(&mem, 0x3_0000, 1024), want);
    }

    #[test]
    fn test_block_layered_request_larger_than_bounce_buffer_round_trips() {
        const LEN: u32 = 0x28_0000; // 2.5 MiB: three bounce steps
        let ts = TestStore::new(4 << 20);
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x2_0000),
            (GuestAddress(0x2_0000), 0x60_0000),
        ])
        .unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Block::new(&ts.drive(ts.base, "overlay", false)).unwrap();
        let (mut block, _) = activate(block, &mem, &vq);
        let payload: Vec<u8> = (0..LEN).map(|i| u8::try_from(i % 253).unwrap()).collect();
        mem.write_slice(&payload, GuestAddress(0x10_0000)).unwrap();
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 7, &[(0x10_0000, LEN, 0)]);
        post(&mem, &vq, 3, VIRTIO_BLK_T_IN, 7, &[(0x38_0000, LEN, WRITE)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert_eq!(request_status(&mem, 3), OK);
        assert_eq!(used(&mem, 1), (3, LEN + 1));
        assert_eq!(
            guest_bytes(&mem, 0x38_0000, usize::try_from(LEN).unwrap()),
            payload
        );
        assert_eq!(
            bounce_len(&block),
            BOUNCE_MAX,
            "the bounce buffer stays bounded"
        );
    }

    #[test]
    fn test_block_layered_read_marks_the_pages_dirty() {
        use crate::virtio::persist::testing::{clear_dirty, is_dirty};
        let ts = TestStore::new(LAYERED_IMAGE);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Block::new(&ts.drive(ts.base, "overlay", true)).unwrap();
        let (mut block, _) = activate(block, &mem, &vq);
        post(
            &mem,
            &vq,
            0,
            VIRTIO_BLK_T_IN,
            0,
            &[(0x1_f000, 0x1000, WRITE), (0x2_0000, 0x1000, WRITE)],
        );
        clear_dirty(&mem);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        assert!(is_dirty(&mem, 0x1_f000));
        assert!(is_dirty(&mem, 0x2_0fff));
        assert!(!is_dirty(&mem, 0x2_1000), "a page nobody wrote is clean");
    }

    #[test]
    fn test_block_layered_read_only_refuses_writes() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let image_before = fs::read(&ts.image).unwrap();
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Block::new(&ts.drive(ts.base, "overlay", true)).unwrap();
        assert!(block.is_read_only());
        assert_ne!(block.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
        let (mut block, _) = activate(block, &mem, &vq);
        mem.write_slice(&[0xab; 512], GuestAddress(0x1_0000))
            .unwrap();
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 0, &[(0x1_0000, 512, 0)]);
        post(&mem, &vq, 3, VIRTIO_BLK_T_IN, 0, &[(0x3_0000, 512, WRITE)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), IOERR);
        assert_eq!(request_status(&mem, 3), OK);
        assert_eq!(guest_bytes(&mem, 0x3_0000, 512), expected(0..512));
        assert_eq!(fs::read(&ts.image).unwrap(), image_before);
        let overlay = fs::read(ts.overlay("overlay")).unwrap();
        assert!(overlay.iter().all(|&b| b == 0), "the overlay was written");
        // Nothing was written, so a snapshot stores no data.
        let next = BuildId::random().unwrap();
        block.snapshot_disk(&ts.store, next).unwrap();
        assert_eq!(ts.data_len(next), 0);
    }

    #[test]
    fn test_block_layered_bad_layers_fail_at_construction() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let good = ts.drive(ts.base, "overlay", false);

        let mut drive = good.clone();
        let missing = ts.dir.join("no-store");
        drive.layers.as_mut().unwrap().store = missing.to_string_lossy().into_owned();
        let err = Block::new(&drive).unwrap_err();
        assert!(matches!(err, BlockError::LayersStore { .. }), "{err:?}");
        assert!(err.to_string().contains("layers.store"), "{err}");
        assert!(err.to_string().contains("no-store"), "{err}");

        let mut drive = good.clone();
        drive.layers.as_mut().unwrap().store = ts.image.to_string_lossy().into_owned();
        let err = Block::new(&drive).unwrap_err();
        assert!(
            matches!(err, BlockError::LayersStoreNotDir { .. }),
            "{err:?}"
        );

        // A well-formed build id the store does not hold: no header.
        let absent = BuildId::random().unwrap();
        let err = Block::new(&ts.drive(absent, "overlay", false)).unwrap_err();
        assert!(matches!(err, BlockError::LayersHeader { .. }), "{err:?}");
        assert!(err.to_string().contains(&absent.to_string()), "{err}");
        assert!(err.to_string().contains("disk-rootfs.header"), "{err}");

        for text in ["not-hex", &"0".repeat(32)] {
            let mut drive = good.clone();
            drive.layers.as_mut().unwrap().build_id = text.to_owned();
            let err = Block::new(&drive).unwrap_err();
            assert!(matches!(err, BlockError::LayersBuildId { .. }), "{err:?}");
            assert!(err.to_string().contains("layers.build_id"), "{err}");
        }

        let mut drive = good.clone();
        drive.drive_id = "../escape".into();
        let err = Block::new(&drive).unwrap_err();
        assert!(matches!(err, BlockError::LayersDriveId { .. }), "{err:?}");

        // A header copied into another build's directory is refused.
        let other = BuildId::random().unwrap();
        let rootfs = DriveId::new("rootfs").unwrap();
        ts.store.create_build_dir(other).unwrap();
        fs::copy(
            ts.store.disk_header(ts.base, &rootfs),
            ts.store.disk_header(other, &rootfs),
        )
        .unwrap();
        let err = Block::new(&ts.drive(other, "overlay", false)).unwrap_err();
        assert!(matches!(err, BlockError::HeaderBuild { .. }), "{err:?}");
        assert!(!ts.overlay("overlay").exists(), "nothing was created");
    }

    #[test]
    fn test_block_layered_overlay_on_the_base_image_is_refused() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let image_before = fs::read(&ts.image).unwrap();
        let mut drive = ts.drive(ts.base, "overlay", false);
        drive.path_on_host = Some(ts.image.to_string_lossy().into_owned());
        let err = check_layered_drive(&drive).unwrap_err();
        assert!(matches!(err, BlockError::OverlayIsLayer { .. }), "{err:?}");
        let err = Block::new(&drive).unwrap_err();
        assert!(matches!(err, BlockError::OverlayIsLayer { .. }), "{err:?}");
        assert!(err.to_string().contains("path_on_host"), "{err}");
        assert_eq!(fs::read(&ts.image).unwrap(), image_before);
    }

    #[test]
    fn test_block_check_layered_drive_accepts_missing_overlay_only_in_existing_dir() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let drive = ts.drive(ts.base, "overlay", false);
        check_layered_drive(&drive).unwrap();
        assert!(!ts.overlay("overlay").exists(), "the check creates nothing");
        let mut drive = ts.drive(ts.base, "no-dir/overlay", false);
        let err = check_layered_drive(&drive).unwrap_err();
        assert!(matches!(err, BlockError::OverlayDir { .. }), "{err:?}");
        drive.path_on_host = Some(ts.dir.to_string_lossy().into_owned());
        let err = check_layered_drive(&drive).unwrap_err();
        assert!(matches!(err, BlockError::Directory { .. }), "{err:?}");
    }

    #[test]
    fn test_block_snapshot_disk_refuses_plain_drive_and_other_store() {
        let ts = TestStore::new(LAYERED_IMAGE);
        let disk = TestDisk::new(4096);
        let mut plain = Block::new(&disk.drive(false, CacheType::Unsafe)).unwrap();
        let build = BuildId::random().unwrap();
        let err = plain.snapshot_disk(&ts.store, build).unwrap_err();
        assert!(err.contains("not a layered drive"), "{err}");

        let mut layered = Block::new(&ts.drive(ts.base, "overlay", false)).unwrap();
        let elsewhere = Store::new(ts.dir.join("other-store"));
        let err = layered.snapshot_disk(&elsewhere, build).unwrap_err();
        assert!(err.contains("other-store"), "{err}");
        assert!(!elsewhere.build_dir(build).exists());
        assert!(!ts.store.build_dir(build).exists());
        // The same store through another spelling of its path is accepted.
        let spelled = Store::new(ts.dir.join(".").join("store"));
        layered.snapshot_disk(&spelled, build).unwrap();
        assert_eq!(ts.data_len(build), 0);
    }

    #[test]
    fn test_block_layered_save_restore_keeps_capacity_and_serves_new_build() {
        use crate::virtio::persist::testing::copy_guest_memory;

        let ts = TestStore::new(LAYERED_IMAGE);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Block::new(&ts.drive(ts.base, "overlay", false)).unwrap();
        let (mut block, _) = activate(block, &mem, &vq);
        mem.write_slice(&[0x77; 512], GuestAddress(0x1_0000))
            .unwrap();
        post(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 9, &[(0x1_0000, 512, 0)]);
        block.process_queue();
        assert_eq!(request_status(&mem, 0), OK);
        let state = block_state(&block);
        assert!(matches!(
            state.kind,
            DeviceKindState::Block {
                read_only: false,
                capacity_sectors: 136
            }
        ));
        let next = BuildId::random().unwrap();
        block.snapshot_disk(&ts.store, next).unwrap();
        drop(block);

        let copy = memory();
        let vq = MockSplitQueue::new(&copy, 16);
        copy_guest_memory(&mem, &copy);
        let mut restored = Block::new(&ts.drive(next, "overlay2", false)).unwrap();
        restored
            .restore_state(&state, copy.clone(), Arc::new(Interrupt::new().unwrap()))
            .unwrap();
        post(&copy, &vq, 3, VIRTIO_BLK_T_IN, 9, &[(0x3_0000, 512, WRITE)]);
        restored.process_queue();
        assert_eq!(request_status(&copy, 3), OK);
        assert_eq!(guest_bytes(&copy, 0x3_0000, 512), vec![0x77; 512]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Random sector-aligned writes and reads through the queue on a layered drive match
        /// a model of the disk; the base image never changes; after a snapshot, a fresh
        /// device on the new build reads the model back.
        #[test]
        fn test_block_layered_random_io_matches_model(
            ops in proptest::collection::vec(
                (any::<bool>(), 0u64..136, 1u64..24, any::<u8>()),
                // The mock's avail ring does not wrap: at most 15 requests per queue.
                1..16,
            ),
        ) {
            let ts = TestStore::new(LAYERED_IMAGE);
            let image_before = fs::read(&ts.image).unwrap();
            let mut model = expected(0..LAYERED_IMAGE);
            model.resize(136 * 512, 0);
            let mem = memory();
            let vq = MockSplitQueue::new(&mem, 16);
            let block = Block::new(&ts.drive(ts.base, "overlay", false)).unwrap();
            let (mut block, _) = activate(block, &mem, &vq);
            for (i, &(write, sector, sectors, seed)) in ops.iter().enumerate() {
                let sectors = sectors.min(136 - sector);
                let len = usize::try_from(sectors * 512).unwrap();
                let start = usize::try_from(sector * 512).unwrap();
                let first = u16::try_from(i % 5 * 3).unwrap();
                let buf_len = u32::try_from(len).unwrap();
                if write {
                    let data: Vec<u8> = (0..len)
                        .map(|j| seed.wrapping_add(u8::try_from(j % 256).unwrap()))
                        .collect();
                    mem.write_slice(&data, GuestAddress(0x1_0000)).unwrap();
                    post(&mem, &vq, first, VIRTIO_BLK_T_OUT, sector, &[(0x1_0000, buf_len, 0)]);
                    model[start..start + len].copy_from_slice(&data);
                } else {
                    post(&mem, &vq, first, VIRTIO_BLK_T_IN, sector, &[(0x3_0000, buf_len, WRITE)]);
                }
                block.process_queue();
                prop_assert_eq!(request_status(&mem, first), OK);
                if !write {
                    prop_assert_eq!(guest_bytes(&mem, 0x3_0000, len), model[start..start + len].to_vec());
                }
            }
            prop_assert_eq!(fs::read(&ts.image).unwrap(), image_before);

            let next = BuildId::random().unwrap();
            block.snapshot_disk(&ts.store, next).unwrap();
            let mem = memory();
            let vq = MockSplitQueue::new(&mem, 16);
            let fresh = Block::new(&ts.drive(next, "overlay2", true)).unwrap();
            let (mut fresh, _) = activate(fresh, &mem, &vq);
            post(&mem, &vq, 0, VIRTIO_BLK_T_IN, 0, &[(0x2_0000, 136 * 512, WRITE)]);
            fresh.process_queue();
            prop_assert_eq!(request_status(&mem, 0), OK);
            prop_assert_eq!(guest_bytes(&mem, 0x2_0000, 136 * 512), model);
        }
    }

    proptest! {
        /// Random descriptor tables, headers and avail entries never panic, never change the
        /// file's size, never change a read-only file, and leave the device serving.
        #[test]
        fn test_block_random_chains_never_panic(
            descs in proptest::collection::vec(
                (
                    prop_oneof![
                        Just(HEADER), Just(STATUS), 0x1_0000u64..0x1_0400,
                        Just(0x5_ff00u64), any::<u64>()
                    ],
                    prop_oneof![Just(16u32), Just(1), Just(512), 0u32..0x1000, any::<u32>()],
                    prop::sample::select(vec![
                        0u16, WRITE, NEXT, WRITE | NEXT, INDIRECT,
                    ]),
                    0u16..20,
                ),
                1..16,
            ),
            heads in proptest::collection::vec(0u16..20, 1..8),
            kind in prop_oneof![
                prop::sample::select(vec![
                    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                ]),
                any::<u32>(),
            ],
            sector in prop_oneof![0u64..DISK_SECTORS + 4, any::<u64>()],
            read_only in any::<bool>(),
        ) {
            let disk = TestDisk::new(512 * DISK_SECTORS);
            let before = disk.contents();
            let mem = memory();
            let vq = MockSplitQueue::new(&mem, 16);
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                vq.desc_table()
                    .store(u16::try_from(i).unwrap(), desc(*addr, *len, *flags, *next))
                    .unwrap();
            }
            for (i, head) in heads.iter().enumerate() {
                vq.avail().ring().ref_at(i).unwrap().store(*head);
            }
            vq.avail().idx().store(u16::try_from(heads.len()).unwrap());

            let (mut block, _) = active_block(&disk, &mem, &vq, read_only, CacheType::Writeback);
            block.process_queue();
            let served = used_idx(&mem);
            prop_assert!(usize::from(served) <= heads.len());
            let after = disk.contents();
            prop_assert_eq!(after.len(), before.len());
            if read_only {
                prop_assert!(after == before, "read-only disk changed");
            }

            // Still usable: a well-formed read at fresh descriptors is served.
            let idx = vq.avail().idx().load();
            vq.desc_table().store(13, desc(HEADER, 16, NEXT, 14)).unwrap();
            vq.desc_table().store(14, desc(0x3_0000, 512, WRITE | NEXT, 15)).unwrap();
            vq.desc_table().store(15, desc(STATUS, 1, WRITE, 0)).unwrap();
            let mut good = [0u8; 16];
            good[8..].copy_from_slice(&1u64.to_le_bytes());
            mem.write_slice(&good, GuestAddress(HEADER)).unwrap();
            vq.avail().ring().ref_at(usize::from(idx % 16)).unwrap().store(13);
            vq.avail().idx().store(idx.wrapping_add(1));
            block.process_queue();
            prop_assert_eq!(used_idx(&mem), served.wrapping_add(1));
            prop_assert_eq!(used(&mem, usize::from(served % 16)), (13, 513));
            prop_assert_eq!(status(&mem), OK);
            let mut got = vec![0u8; 512];
            mem.read_slice(&mut got, GuestAddress(0x3_0000)).unwrap();
            prop_assert_eq!(got, after[512..1024].to_vec());
        }
    }
}
