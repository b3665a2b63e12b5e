//! E2B's protocol on the control plane's origin, so the official E2B SDKs (Python and JS)
//! run against Wrenn unchanged with `E2B_API_URL` and `E2B_SANDBOX_URL` both pointing here:
//!
//! - [`sandboxes`]: E2B's REST paths (`/sandboxes`, `/v2/sandboxes`, `/snapshots`,
//!   `/templates/{id}`, `/health`), translated onto Wrenn's own handlers; errors as E2B's
//!   `{"code": <status>, "message"}`.
//! - [`envd`]: requests carrying `E2b-Sandbox-Id` go to that sandbox's envd (or another port,
//!   by `E2b-Sandbox-Port`), its access token checked here before anything reaches the guest;
//!   signed `/files` URLs (which carry no sandbox id) find their sandbox by their signature.
//! - [`types`]: the wire shapes.
//!
//! E2B sandboxes are Wrenn sandboxes: the same rows, states and agents; an id made through one
//! API works in the other.

pub(crate) mod envd;
pub(crate) mod sandboxes;
pub mod types;

use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, post};

use crate::Shared;

/// The envd protocol version Wrenn's guests speak; the SDKs enable features by it.
pub const ENVD_VERSION: &str = wrenn_envd::ENVD_VERSION;

/// E2B's `clientID` field: one value for every sandbox (E2B's is a fixed string too).
pub const CLIENT_ID: &str = "wrenn";

/// Whether `path` is one of E2B's REST paths (its errors are rendered E2B's way).
pub fn is_e2b_path(path: &str) -> bool {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    under("/sandboxes")
        || under("/v2")
        || under("/snapshots")
        || under("/templates")
        || path == "/health"
}

/// The API-key routes (the caller adds authentication).
pub(crate) fn routes(state: Arc<Shared>) -> Router {
    use sandboxes as s;
    Router::new()
        .route("/sandboxes", post(s::create_v1).get(s::list_v1))
        .route("/v2/sandboxes", post(s::create_v2).get(s::list_v2))
        .route("/sandboxes/metrics", get(s::metrics_many))
        .route("/sandboxes/{id}", get(s::get_one).delete(s::kill))
        .route("/sandboxes/{id}/connect", post(s::connect))
        .route("/v2/sandboxes/{id}/connect", post(s::connect))
        .route("/sandboxes/{id}/timeout", post(s::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(s::refresh))
        .route("/sandboxes/{id}/pause", post(s::pause))
        .route("/sandboxes/{id}/resume", post(s::resume))
        .route("/sandboxes/{id}/metrics", get(s::metrics))
        .route("/sandboxes/{id}/snapshots", post(s::snapshot))
        .route("/snapshots", get(s::list_snapshots))
        .route("/templates/{id}", delete(s::delete_template))
        .with_state(state)
}

/// Routes without an API key.
pub(crate) fn public_routes() -> Router {
    Router::new().route("/health", get(|| async { http::StatusCode::NO_CONTENT }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_e2b_paths_are_told_from_wrenns() {
        for path in [
            "/sandboxes",
            "/sandboxes/x/pause",
            "/v2/sandboxes",
            "/snapshots",
            "/templates/a",
            "/health",
        ] {
            assert!(is_e2b_path(path), "{path}");
        }
        for path in [
            "/v1/sandboxes",
            "/sandboxesx",
            "/healthz",
            "/metrics",
            "/docs",
            "/v20",
        ] {
            assert!(!is_e2b_path(path), "{path}");
        }
    }
}
