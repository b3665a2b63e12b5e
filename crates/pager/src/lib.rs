//! `wrenn-pager`: the userfaultfd page server that restores guest memory lazily.
//!
//! # Protocol (Firecracker's, unchanged)
//!
//! For each VM to restore, the pager listens on a unix socket *before* the VMM's snapshot
//! load starts. The VMM maps guest memory anonymous, creates a userfaultfd (`UFFDIO_API` with
//! `EVENT_REMOVE`), registers the memory in MISSING mode, connects, and sends one message: a
//! JSON array of `{base_host_virt_addr, size, offset, page_size, page_size_kib}` with the
//! userfaultfd attached as `SCM_RIGHTS` ([`handshake`]). Nothing else is ever sent; the VMM
//! keeps the connection open until it exits. From then on, every first touch of a guest page
//! (by a vCPU, by KVM, or by the VMM's device code) blocks the toucher and queues a fault on
//! the userfaultfd; the pager reads it, fetches the page from a [`PageSource`] at
//! `region.offset + (page - region.base)`, and installs it with `UFFDIO_COPY` (or
//! `UFFDIO_ZEROPAGE` for zero pages), which wakes the toucher.
//!
//! # Threads
//!
//! No async runtime: per VM, one thread accepts, handshakes and runs the fault loop (poll on
//! the userfaultfd, a stop eventfd and the connection), plus, when a prefetch set is recorded
//! under the VM's key, one prefetch thread that installs those pages right after the
//! handshake while faults are served concurrently ([`fault`]). VMs share only the prefetch
//! store and the total counters. [`Pager::register`] returns a [`VmHandle`] for stats, the
//! touched pages, waiting and stopping.
//!
//! # What a misbehaving VMM can and cannot do
//!
//! It can:
//! * fail its own restore: a bad handshake (garbage JSON, no or several descriptors, a
//!   descriptor that is not a userfaultfd, regions unaligned / overlapping / beyond the
//!   source) or a fault outside its announced regions ends its serving in `Failed`, with
//!   everything it sent closed; if it never connects or never sends, the accept timeout does
//!   the same;
//! * cost its own serving thread CPU: REMOVE floods, repeated EAGAIN (retried at most every
//!   millisecond), chatter on the connection (discarded; log lines are rate-limited);
//! * read its own memory contents, which it owns anyway.
//!
//! It cannot:
//! * stall other VMs (separate threads, no shared locks on the serving path beyond counters);
//! * make the pager allocate without bound: the handshake read, the region count, the event
//!   batch and the per-page bitmaps are all bounded by the validated memory size;
//! * make the pager touch its own memory at VMM-chosen addresses: fault addresses only ever
//!   reach the kernel as `UFFDIO_*` destinations, which resolve in the VMM's address space;
//! * leak descriptors into the pager: every received descriptor is owned and closed, including
//!   the ones a FORK event installs.
//!
//! A source read error ends the VM's serving (`Failed`, logged with the offset and file). The
//! vCPU that faulted stays blocked on that page forever: the VMM keeps its own copy of the
//! userfaultfd precisely so that a dead pager hangs the guest instead of silently handing it
//! zero pages; the agent's watchdog on the VMM is the guard.
//!
//! The pager learns that a VMM is gone from its connection hanging up (Firecracker leaks the
//! socket on purpose so this happens only when the process exits) or from `ESRCH` on an ioctl;
//! the userfaultfd itself never reports a hang-up while the pager holds it.

pub mod fault;
pub mod handshake;
pub mod layered;
pub mod pages;
pub mod prefetch;
pub mod regions;
pub mod server;
pub mod source;
pub mod stats;
pub mod uffd;

pub use fault::ServeError;
pub use handshake::{GuestRegionUffdMapping, HandshakeError};
pub use layered::{LayeredSource, LayeredSourceError};
pub use prefetch::{PrefetchFileError, PrefetchStore};
pub use regions::{PAGE_SIZE, Region, RegionError, RegionMap};
pub use server::{
    Pager, PagerConfig, PagerError, PagerStats, VmError, VmHandle, VmOptions, VmState, VmStats,
};
pub use source::{FileSource, PageKind, PageSource, SourceError};
pub use stats::{CounterStats, LatencySummary};
