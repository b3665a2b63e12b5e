//! envd's plain HTTP endpoints (E2B's envd API): `/health`, `/init`, `/envs`, `/metrics` here,
//! `/files` in [`files`].
pub mod files;
mod init;
mod metrics;
pub mod signing;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};

use crate::state::Shared;

/// The routes of the plain endpoints.
pub fn routes(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/init", post(init::init))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics::metrics))
        .merge(files::routes())
        .with_state(shared)
}

/// E2B's error body: `{"code": <status>, "message": "..."}` as JSON.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// `GET /health`: 204 while envd serves (the SDK's liveness probe).
async fn health() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /envs`: the environment `/init` set for every process.
async fn envs(State(shared): State<Arc<Shared>>) -> Json<BTreeMap<String, String>> {
    Json(shared.read(|s| s.env_vars.clone()))
}
