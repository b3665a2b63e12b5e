//! envd's duties toward the guest system: being PID 1, cgroups, port forwarding, the clock
//! and entropy after a restore.
pub mod clock;
pub mod entropy;
