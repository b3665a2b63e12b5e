//! The one app envd serves: the Connect services and the plain endpoints behind the token
//! check and E2B's CORS rules, on TCP (and on vsock, see [`crate::system`]).
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt as _;
use connectrpc::{ConnectRpcService, Limits};
use http::{HeaderName, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::state::Shared;

/// The largest Connect message envd accepts (file contents travel over `/files`, which has no
/// such limit).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The whole app.
pub fn app(shared: Arc<Shared>) -> axum::Router {
    let connect = crate::process::register(connectrpc::Router::new(), shared.clone());
    let connect = crate::filesystem::register(connect, shared.clone());
    let connect = ConnectRpcService::new(connect).with_limits(
        Limits::default()
            .with_max_message_size(MAX_MESSAGE_BYTES)
            .with_max_request_body_size(MAX_MESSAGE_BYTES + 4096),
    );
    crate::http::routes(shared.clone())
        .fallback_service(connect)
        .layer(axum::middleware::from_fn_with_state(
            shared,
            crate::auth::require_token,
        ))
        .layer(cors())
}

/// E2B's envd CORS policy: any origin, the usual methods, any header, Connect's headers
/// exposed, two hours of preflight caching.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([
            Method::HEAD,
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers(AllowHeaders::any())
        .expose_headers(
            [
                "grpc-status",
                "grpc-message",
                "grpc-status-details-bin",
                "connect-protocol-version",
                "location",
                "cache-control",
                "x-content-type-options",
            ]
            .map(HeaderName::from_static),
        )
        .max_age(Duration::from_secs(2 * 60 * 60))
}

/// Serves `app` on a bound TCP listener until the process ends. Responses go out as several
/// small writes (a stream's events, its end envelope): without `TCP_NODELAY` each would wait
/// for the client's delayed ACK, ~40 ms per exec round trip.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    app: axum::Router,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, app).await
}
