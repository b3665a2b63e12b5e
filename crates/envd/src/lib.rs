//! envd, the daemon inside every Wrenn sandbox. It speaks E2B's envd protocol (Connect RPC
//! `process.Process` and `filesystem.Filesystem` with JSON or binary messages, plus plain HTTP
//! endpoints on port 49983) so that the E2B SDKs work against Wrenn unchanged; the code is ours.
//!
//! - [`server`]: one axum app serving both the Connect services and the HTTP endpoints, on TCP
//!   and on a vsock port for the host agent.
//! - [`state`]: what the host tells envd (`/init`): access token, default user and workdir,
//!   environment, sandbox metadata.
//! - [`users`] and [`auth`]: `/etc/passwd` users, the access token, HTTP Basic user selection,
//!   path resolution against a user's home.
//! - [`process`]: the process service; [`filesystem`]: the filesystem service; [`http`]: the
//!   plain endpoints (`/health`, `/init`, `/envs`, `/metrics`, `/files`).
//! - [`system`]: being PID 1 (mounts, network, reaping, shutdown), cgroups, port forwarding,
//!   clock and entropy.
pub mod auth;
pub mod filesystem;
pub mod http;
pub mod process;
pub mod rpc;
pub mod server;
pub mod state;
pub mod system;
pub mod users;

/// The envd protocol version this build implements; the SDKs gate features on it.
pub const ENVD_VERSION: &str = "0.6.13";

/// The TCP port envd answers on (E2B's).
pub const DEFAULT_PORT: u16 = 49983;
