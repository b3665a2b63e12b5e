//! Builds and caches what Wrenn boots: the guest kernel (Debian's `linux-source` with the
//! microVM config in `guest/kernel/`) and ext4 root filesystems made without loop mounts
//! (`mkfs.ext4 -d`): a tiny busybox test image and the Debian `base` image, both holding the
//! static envd built from this workspace ([`envd`]).
//!
//! Everything built lands in the [`cache::Cache`], keyed by a hash of every input, so a
//! fresh clone on the same machine reuses it and a changed recipe rebuilds only what changed.

#![forbid(unsafe_code)]

pub mod cache;
pub mod command;
pub mod disk;
pub mod envd;
pub mod guest;
pub mod kernel;
pub mod npm;
pub mod packages;
pub mod progress;
pub mod qemu;
pub mod rootfs;
pub mod venv;
