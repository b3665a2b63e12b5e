//! The agent's listener: `hostagent.v1` over Connect, `GET /metrics` (Prometheus text),
//! `GET /healthz` and the control plane's tunnel to sandbox ports
//! (`GET /v1/tunnel/{sandbox_id}/{port}`), in one axum app.

use std::sync::Arc;

use axum::routing::get;
use connectrpc::{ConnectRpcService, Limits};

use crate::manager::Manager;
use crate::metrics::Gauges;
use crate::rpc::{HostAgentService, ImageResolver};
use crate::sandbox::State;

/// Where the agent listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5008";
/// The largest message accepted (a WriteFile chunk, an Exec's stdin).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The whole app.
pub fn app(manager: Arc<Manager>, images: Arc<dyn ImageResolver>) -> axum::Router {
    let connect =
        HostAgentService::new(manager.clone(), images).register(connectrpc::Router::new());
    let connect = ConnectRpcService::new(connect).with_limits(
        Limits::default()
            .with_max_message_size(MAX_MESSAGE_BYTES)
            .with_max_request_body_size(MAX_MESSAGE_BYTES + 4096),
    );
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::tunnel::routes())
        .with_state(manager)
        .fallback_service(connect)
}

async fn metrics(axum::extract::State(manager): axum::extract::State<Arc<Manager>>) -> String {
    let records = manager.list();
    let count = |state| records.iter().filter(|r| r.state == state).count() as u64;
    let (vcpus, memory) = manager.used();
    let pager = manager.pager_totals();
    manager.metrics.render(&Gauges {
        running: count(State::Running),
        paused: count(State::Paused),
        slots_free: manager.slots_free() as u64,
        vcpus_used: u64::from(vcpus),
        memory_mib_used: memory,
        templates: manager.templates().len() as u64,
        pager_faults: pager.faults,
        pager_bytes: pager.bytes_copied,
    })
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
