//! Wrenn's microVM monitor on KVM.

pub mod mptable;
pub mod probe;
