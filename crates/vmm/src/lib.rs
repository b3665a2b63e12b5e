//! Wrenn's microVM monitor on KVM.

pub mod api;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod probe;
pub mod virtio;
