//! Traffic for sandboxes on the control plane's origin, routed as E2B's proxy does when the
//! SDKs are given `E2B_SANDBOX_URL`: every envd request (Connect RPCs, `/files`, `/health`)
//! carries `E2b-Sandbox-Id` and `E2b-Sandbox-Port`, and goes through the sandbox's agent
//! (`wrenn-tunnel`) to that port in the guest.
//!
//! Before anything reaches envd its access token is checked here (envd checks it again), and
//! envd's host-only `/init` is refused. Signed `/files` URLs (`download_url`/`upload_url`) name
//! no sandbox; the sandbox whose token produced the signature is found among the running ones.
//! Failures are answered with the bodies the SDKs recognise ("was not found", "port is not
//! open").

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use wrenn_envd::http::signing::{self, Operation};

use super::types::ProxyError;
use crate::Shared;
use crate::db::sandboxes::{SandboxRow, state};
use crate::db::{ListFilter, now_ms};
use crate::ids;

/// envd's port in every guest.
pub const ENVD_PORT: u16 = 49983;
const SANDBOX_ID: &str = "e2b-sandbox-id";
const SANDBOX_PORT: &str = "e2b-sandbox-port";
const ACCESS_TOKEN: &str = "x-access-token";
/// envd's answer to a missing or wrong token, word for word.
const UNAUTHORIZED: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// The outer layer: requests for a sandbox go there, the rest to the API.
pub(crate) async fn route(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(id) = request.headers().get(SANDBOX_ID) {
        let id = id.to_str().unwrap_or_default().to_owned();
        let port = match request.headers().get(SANDBOX_PORT) {
            None => return plain(StatusCode::BAD_REQUEST, "Missing header: E2b-Sandbox-Port"),
            Some(value) => match value.to_str().ok().and_then(|v| v.parse::<u16>().ok()) {
                Some(port) if port > 0 => port,
                _ => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        "E2b-Sandbox-Port is not a port number",
                    );
                }
            },
        };
        return to_sandbox(&shared, &id, port, request).await;
    }
    if request.uri().path() == "/files" && query_value(&request, "signature").is_some() {
        return signed_files(&shared, request).await;
    }
    next.run(request).await
}

async fn to_sandbox(shared: &Arc<Shared>, id: &str, port: u16, request: Request) -> Response {
    if !ids::valid_id(id) {
        return plain(
            StatusCode::BAD_REQUEST,
            &format!("{id:?} is not a sandbox id"),
        );
    }
    let row = match shared.db.sandbox(id).await {
        Ok(Some(row)) => row,
        Ok(None) => return not_found(id),
        Err(error) => {
            tracing::error!(sandbox_id = %id, %error, "database error while routing to a sandbox");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "database error");
        }
    };
    let row = match crate::proxy::awake(shared, row).await {
        Ok(row) if row.state == state::RUNNING => row,
        Ok(_) => return not_found(id),
        Err(error) => {
            tracing::warn!(sandbox_id = %id, message = %error.message, "resuming on traffic failed");
            return proxy_error(id, error.status, &error.message);
        }
    };
    if port == ENVD_PORT
        && let Err((status, message)) = envd_access(&row, &request)
    {
        return plain(status, message);
    }
    forward(shared, &row, port, request).await
}

/// Whether a request may reach the sandbox's envd: its token, or (for `/files`) a valid
/// signature; `/health` is open, as in envd.
fn envd_access(row: &SandboxRow, request: &Request) -> Result<(), (StatusCode, &'static str)> {
    let path = request.uri().path();
    if path == "/init" {
        return Err((StatusCode::FORBIDDEN, "envd's /init is for the host only"));
    }
    let open = request.method() == Method::GET && path == "/health";
    if open || token_matches(request.headers(), &row.envd_access_token) {
        return Ok(());
    }
    if path == "/files" && signature_matches(request, &row.envd_access_token) {
        return Ok(());
    }
    tracing::debug!(sandbox_id = %row.id, path, "envd request without a valid access token");
    Err((StatusCode::UNAUTHORIZED, UNAUTHORIZED))
}

fn token_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(ACCESS_TOKEN)
        .is_some_and(|given| wrenn_envd::auth::constant_time_eq(given.as_bytes(), token.as_bytes()))
}

/// A query parameter, decoded.
fn query_value(request: &Request, key: &str) -> Option<String> {
    let query = request.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Whether the request's `/files` signature was made with `token`.
fn signature_matches(request: &Request, token: &str) -> bool {
    let operation = match *request.method() {
        Method::GET => Operation::Read,
        Method::POST => Operation::Write,
        _ => return false,
    };
    let Some(given) = query_value(request, "signature") else {
        return false;
    };
    let expiration = match query_value(request, "signature_expiration") {
        None => None,
        Some(text) => match text.trim().parse::<i64>() {
            Ok(at) => Some(at),
            Err(_) => return false,
        },
    };
    signing::matches(
        &given,
        &query_value(request, "path").unwrap_or_default(),
        operation,
        &query_value(request, "username").unwrap_or_default(),
        token,
        expiration,
        now_ms() / 1000,
    )
}

/// A signed `/files` URL without a sandbox id: the running sandbox whose token signed it.
async fn signed_files(shared: &Shared, request: Request) -> Response {
    let mut filter = ListFilter {
        states: vec![state::RUNNING.to_owned()],
        limit: 1000,
        ..Default::default()
    };
    loop {
        let page = match shared.db.list_sandboxes(&filter).await {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, "database error while routing a signed URL");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "database error");
            }
        };
        if let Some(row) = page
            .sandboxes
            .iter()
            .find(|row| signature_matches(&request, &row.envd_access_token))
        {
            let row = row.clone();
            return forward(shared, &row, ENVD_PORT, request).await;
        }
        match page.next {
            Some(after) => filter.after = Some(after),
            None => break,
        }
    }
    plain(
        StatusCode::UNAUTHORIZED,
        "the signature matches no running sandbox (wrong, expired, or its sandbox is gone)",
    )
}

async fn forward(shared: &Shared, row: &SandboxRow, port: u16, request: Request) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    match crate::proxy::forward_to(shared, row, port, request, &target).await {
        Ok(response) => response,
        Err(error) if matches!(error.status.as_u16(), 404 | 409) => not_found(&row.id),
        Err(error) if error.status == StatusCode::BAD_GATEWAY => {
            tracing::debug!(sandbox_id = %row.id, port, message = %error.message, "port closed");
            proxy_error(
                &row.id,
                StatusCode::BAD_GATEWAY,
                "The sandbox is running but port is not open",
            )
        }
        Err(error) => proxy_error(&row.id, error.status, &error.message),
    }
}

fn not_found(id: &str) -> Response {
    proxy_error(id, StatusCode::BAD_GATEWAY, "The sandbox was not found")
}

fn proxy_error(id: &str, status: StatusCode, message: &str) -> Response {
    json(
        status,
        &ProxyError {
            sandbox_id: id.to_owned(),
            message: message.to_owned(),
            code: status.as_u16(),
        },
    )
}

/// E2B's `{"code", "message"}`.
fn plain(status: StatusCode, message: &str) -> Response {
    json(
        status,
        &serde_json::json!({ "code": status.as_u16(), "message": message }),
    )
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let mut response = (
        status,
        Body::from(serde_json::to_vec(body).unwrap_or_default()),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
