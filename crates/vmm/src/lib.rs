//! Wrenn's microVM monitor on KVM.

pub mod api;
pub mod boot;
pub mod builder;
pub mod controller;
pub mod cpuid;
pub mod devices;
pub mod diag;
pub mod jail;
pub mod layout;
pub mod lifecycle;
pub mod memory;
pub mod mptable;
pub mod probe;
pub mod resources;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
