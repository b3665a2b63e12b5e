//! `GET /v1/tunnel/{sandbox_id}/{port}`: the control plane's way to a port inside a sandbox.
//! The sandbox must be running; its slot translates every port of its host address to the
//! guest, so the tunnel connects to `host_address:port` (see `wrenn_tunnel::accept` for the
//! protocol and its errors).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::routing::get;
use connectrpc::ErrorCode;
use http::StatusCode;
use wrenn_tunnel::error_response;

use crate::manager::Manager;
use crate::sandbox;

/// The tunnel route, for the agent's app.
pub fn routes() -> axum::Router<Arc<Manager>> {
    axum::Router::new().route(wrenn_tunnel::ROUTE, get(tunnel))
}

async fn tunnel(
    State(manager): State<Arc<Manager>>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    let Ok(Path((sandbox_id, port))) = path else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the tunnel path is /v1/tunnel/{sandbox_id}/{port}",
        );
    };
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 => port,
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("port {port:?} is not a number from 1 to 65535"),
            );
        }
    };
    let target = match guest_address(&manager, &sandbox_id) {
        Ok(ip) => SocketAddr::new(ip, port),
        Err((status, code, message)) => return error_response(status, code, message),
    };
    tracing::debug!(sandbox_id = %sandbox_id, port, "tunnel requested");
    let ended = stopped(manager.clone(), sandbox_id.clone());
    wrenn_tunnel::accept_until(req, target, &sandbox_id, ended).await
}

/// How often an open tunnel checks that its sandbox still runs.
const STATE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Completes once the sandbox is no longer running (pausing, stopping, gone): its tunnels are
/// cut then, so streams through them end instead of waiting on a guest that is not there.
async fn stopped(manager: Arc<Manager>, sandbox_id: String) {
    loop {
        tokio::time::sleep(STATE_CHECK).await;
        let running = manager
            .get(&sandbox_id)
            .is_ok_and(|record| record.state == sandbox::State::Running);
        if !running {
            return;
        }
    }
}

/// A refusal: status, code, message.
type Refusal = (StatusCode, &'static str, String);

/// The address this host reaches a running sandbox's guest at, or the refusal to answer.
fn guest_address(manager: &Manager, sandbox_id: &str) -> Result<IpAddr, Refusal> {
    let record = manager.get(sandbox_id).map_err(|e| match e.code {
        ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found", e.message),
        ErrorCode::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request", e.message),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal", e.message),
    })?;
    if record.state != sandbox::State::Running {
        return Err((
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "sandbox {sandbox_id} is {}: only a running sandbox's ports can be reached",
                record.state.name()
            ),
        ));
    }
    let Some(address) = record.host_address else {
        return Err((
            StatusCode::CONFLICT,
            "conflict",
            format!("sandbox {sandbox_id} has no network address yet"),
        ));
    };
    address.parse().map_err(|_| {
        tracing::error!(sandbox_id = %sandbox_id, %address, "the sandbox record's host address is not an IP address");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("sandbox {sandbox_id} has a damaged network address"),
        )
    })
}
