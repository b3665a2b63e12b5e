//! Wrenn's microVM monitor on KVM.

pub mod probe;
