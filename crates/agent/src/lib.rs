//! The host agent (`wrenn agent`, one per machine): turns `wrenn-vmm`, the layered snapshot
//! store, the page server and envd into sandboxes, served as `hostagent.v1` over Connect RPC.
//!
//! Modules, bottom up: `network` (the pool of network slots: namespace, veth, tap, NAT),
//! `vmm` (one `wrenn-vmm` process and its API socket), `envd` (the client of the daemon inside
//! each guest), `templates` (named snapshots), `sandbox` (one sandbox's record and states),
//! `manager` (everything the RPCs do), `rpc` (the Connect service), `server` (the listener).

pub mod envd;
pub mod network;
pub mod vmm;
