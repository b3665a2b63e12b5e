//! envd's duties toward the guest system: being PID 1 ([`pid1`]: mounts, network, reaping,
//! shutdown), the kernel command line ([`cmdline`]) and the metadata files it feeds
//! ([`metadata`]), cgroups ([`cgroups`]), serving on vsock ([`vsock`]), port forwarding
//! ([`portforward`]), and the clock and entropy after a restore ([`clock`], [`entropy`]).
//! Everything that changes the machine is gated on `Settings::manage_system`.
pub mod cgroups;
pub mod clock;
pub mod cmdline;
pub mod entropy;
pub mod metadata;
pub mod network;
pub mod pid1;
pub mod portforward;
pub mod vsock;
