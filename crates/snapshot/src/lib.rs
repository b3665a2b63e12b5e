//! Wrenn's on-disk snapshot formats: the build store, layered headers, diff data files, and
//! the readers and writers built on them. The bottom layer: the VMM, the page server and the
//! agent depend on it, and it depends on no other Wrenn crate.
//!
//! A **build** is one generation of a sandbox's state, named by a random [`BuildId`]. Each
//! lives in its own directory of a [`Store`]:
//!
//! ```text
//! <store>/
//!   3f2a...c1/                 generation 0 (template: Full memory, imported disk image)
//!     vmstate                  container(VmState)
//!     memfile                  every non-zero page, identity layout, holes for zeros
//!     memfile.header           container(Header)
//!     disk-rootfs.data    ->   symlink to the base image
//!     disk-rootfs.header
//!   9b07...4e/                 generation 1 (a pause): only what changed
//!     vmstate
//!     memfile                  dirty pages, packed in order
//!     memfile.header           = gen 0's header with the dirty pages remapped here
//!     disk-rootfs.data         dirty disk blocks, packed
//!     disk-rootfs.header
//! ```
//!
//! Layering: a header maps *every* block of its device to (build, offset in that build's data
//! file) or to zeros. A diff's header is its parent's with the dirtied blocks remapped to the
//! new build, so reading any block is one binary search plus one `pread`, whatever the depth
//! of the chain; only the headers ever grow, and [`compact`](compact::compact) folds a deep
//! chain back into one Full build.
//!
//! ```text
//! block        0   1   2   3   4   5   6   7
//! gen 0 (A)    A0  A1  0   A3  A4  A5  A6  A7     Full: holes are zero runs
//! gen 1 (B)        B0          B1                 diff: blocks 1, 4 packed in B's file
//! gen 2 (C)            C0      0                  diff: block 2 written, 4 zeroed
//! header 2     A0  B0  C0  A3  0   A5  A6  A7
//! ```
//!
//! Headers name builds by id only: whoever opens them supplies the store root.
//!
//! Modules: [`id`], [`store`], [`container`] (the versioned, checksummed envelope),
//! [`header`] (the mapping algebra), [`diff`] (writing data files), [`layered`] (reading
//! through a header), [`disk`] (the writable disk with an overlay), [`compact`].

#![forbid(unsafe_code)]

pub mod compact;
pub mod container;
pub mod diff;
pub mod disk;
pub mod header;
pub mod id;
pub mod layered;
pub mod store;

pub use compact::{CompactError, chain_depth, compact};
pub use diff::{DiffError, DiffSummary, DiffWriter, FullSummary, write_full};
pub use disk::{DiskError, LayeredDisk};
pub use header::{
    BuildInfo, DirtyRun, Header, HeaderError, Location, Mapping, Run, Summary, read_header,
    write_header,
};
pub use id::{BuildId, IdError};
pub use layered::{LayeredError, LayeredFile};
pub use store::{DISK_BLOCK_SIZE, DeviceKind, DriveId, MEM_BLOCK_SIZE, Store, StoreError};
