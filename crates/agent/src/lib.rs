//! The host agent (`wrenn agent`, one per machine): turns `wrenn-vmm`, the layered snapshot
//! store, the page server and envd into sandboxes, served as `hostagent.v1` over Connect RPC.
//!
//! Modules, bottom up: `network` (the pool of network slots: namespace, veth, tap, NAT),
//! `vmm` (one `wrenn-vmm` process and its API socket), `envd` (the client of the daemon inside
//! each guest), `pages` (the page server shared by every sandbox), `templates` (named
//! snapshots), `sandbox` (one sandbox's record and states), `manager` (everything the RPCs do),
//! `storage` (templates and paused sandboxes shared through an object store), `metrics`,
//! `rpc` (the Connect service), `tunnel` (the control plane's way to sandbox ports),
//! `heartbeat` (registration with the control plane), `server` (the listener).

pub mod envd;
pub mod heartbeat;
pub mod manager;
pub mod metrics;
pub mod network;
pub mod pages;
pub mod rpc;
pub mod sandbox;
pub mod server;
pub mod storage;
pub mod templates;
pub mod tunnel;
pub mod vmm;
