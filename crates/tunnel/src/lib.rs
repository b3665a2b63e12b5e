//! A byte tunnel from the control plane to a TCP port inside a sandbox, and HTTP forwarding
//! over it.
//!
//! Only the sandbox's host reaches the guest (its address lives in a network namespace on that
//! host), so the control plane asks the host's agent to connect for it, over one HTTP/1.1
//! upgrade:
//!
//! ```text
//!  control plane (open)                 agent (accept)                      guest
//!  ───────────────────                  ──────────────                      ─────
//!  GET /v1/tunnel/{sandbox_id}/{port}
//!  Connection: Upgrade
//!  Upgrade: wrenn-tunnel        ──────► TCP connect host_address:port ────► port
//!                                       (5 s; refused → 502, slow → 504)
//!                               ◄────── 101 Switching Protocols
//!                                       Upgrade: wrenn-tunnel
//!  raw bytes                    ◄─────► copied both ways, half-close kept ◄─► raw bytes
//! ```
//!
//! Before the upgrade the agent answers errors as JSON `{"code", "message"}` (404 `not_found`,
//! 409 `conflict`, 502 `host_error`, 504 `timeout`, 400 `invalid_request`), which [`open`]
//! returns as [`TunnelError::Agent`].
//!
//! On top of a [`Tunnel`], [`forward_http`] sends one HTTP/1.1 request to the sandbox's port
//! and streams the answer back; a WebSocket (any `Upgrade`) that the sandbox accepts is joined
//! to the client's upgraded connection.
//!
//! The crate knows neither the agent nor the control plane: the agent calls [`accept`] with
//! the guest's address, the control plane calls [`open`] and [`forward_http`].

#![forbid(unsafe_code)]

mod agent;
mod client;

pub use agent::{accept, accept_until, error_response, is_tunnel_request};
pub use client::{HttpUrl, Tunnel, TunnelError, forward_http, open};

/// The `Upgrade` protocol token of the tunnel.
pub const PROTOCOL: &str = "wrenn-tunnel";

/// How long the agent waits for the guest's port to accept a connection.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The path of the tunnel route, for routers (`{sandbox_id}` and `{port}` are path
/// parameters).
pub const ROUTE: &str = "/v1/tunnel/{sandbox_id}/{port}";
