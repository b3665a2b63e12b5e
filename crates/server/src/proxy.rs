//! Traffic to ports inside sandboxes: HTTP and WebSocket, forwarded through the sandbox's
//! agent (`wrenn-tunnel`: the agent connects to the guest's port for us; only it can reach
//! the guest).
//!
//! Two ways in:
//! - `ANY /v1/sandboxes/{id}/ports/{port}/{*path}` with an API key (which is not passed on);
//! - with a configured domain, any request whose Host is `{port}-{sandbox_id}.{domain}`, with
//!   no API key, like E2B's public sandbox URLs. This one is an outer layer, so it sees every
//!   path.
//!
//! What the sandbox answers is passed back untouched, error statuses included: the API's JSON
//! error rendering skips responses marked [`Proxied`].

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use crate::Shared;
use crate::api::types::ErrorBody;
use crate::db::hosts::READY;
use crate::db::sandboxes::{SandboxRow, state};
use crate::error::{ApiError, code_for};

/// Marks a response that came from inside a sandbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proxied;

/// The API-key routes (the caller adds authentication).
pub(crate) fn routes(state: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/sandboxes/{id}/ports/{port}", any(by_path))
        .route("/v1/sandboxes/{id}/ports/{port}/", any(by_path))
        .route("/v1/sandboxes/{id}/ports/{port}/{*path}", any(by_path))
        .with_state(state)
}

/// Any method is forwarded; the document shows GET (the methods are the sandbox service's).
#[utoipa::path(get, operation_id = "proxy_port", path = "/v1/sandboxes/{id}/ports/{port}/{path}", tag = "sandboxes",
    params(
        ("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$", description = "the sandbox"),
        ("port" = u16, Path, minimum = 1, maximum = 65535, description = "a TCP port inside the sandbox"),
        ("path" = String, Path, description = "the path on the sandbox's service (query kept)"),
    ),
    responses(
        (status = 200, description = "the sandbox service's answer, passed through untouched (any status, headers and body; WebSocket upgrades too)"),
        (status = 404, body = ErrorBody, description = "no such sandbox"),
        (status = 409, body = ErrorBody, description = "the sandbox is not running"),
    ))]
pub(crate) async fn by_path(
    State(shared): State<Arc<Shared>>,
    Path(params): Path<Vec<(String, String)>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (id, port) = (param("id"), parse_port(&param("port"))?);
    // The rest of the raw (still percent-encoded) path, after `/ports/{port}`.
    let path = request.uri().path();
    let marker = format!("/ports/{}", param("port"));
    let rest = path
        .find(&marker)
        .map_or("", |at| &path[at + marker.len()..]);
    let mut target = if rest.is_empty() {
        "/".to_owned()
    } else {
        rest.to_owned()
    };
    if let Some(query) = request.uri().query() {
        target.push('?');
        target.push_str(query);
    }
    // The API key is ours, not the sandbox's.
    request.headers_mut().remove(header::AUTHORIZATION);
    request.headers_mut().remove("x-api-key");
    forward(&shared, &id, port, request, &target).await
}

fn parse_port(text: &str) -> Result<u16, ApiError> {
    text.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
        ApiError::bad_request(format!("port {text:?} is not a number from 1 to 65535"))
    })
}

/// `{port}-{sandbox_id}` from a Host header under `domain` (any `:port` suffix ignored).
fn host_target<'h>(host: &'h str, domain: &str) -> Option<(u16, &'h str)> {
    let host = host.rsplit_once(':').map_or(host, |(name, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            name
        } else {
            host
        }
    });
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    (!id.is_empty() && !id.contains('.')).then_some((port, id))
}

/// The outer layer: requests for `{port}-{sandbox_id}.{domain}` go to the sandbox, the rest
/// to the API.
pub(crate) async fn by_host(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(domain) = shared.config.domain.as_deref() else {
        return next.run(request).await;
    };
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let Some((port, id)) = host_target(&host, domain) else {
        return next.run(request).await;
    };
    let id = id.to_owned();
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    match forward(&shared, &id, port, request, &target).await {
        Ok(response) => response,
        // Outside the API's middleware: the error body is written here.
        Err(error) => {
            let body = ErrorBody {
                code: code_for(error.status).to_owned(),
                message: error.message,
                request_id: String::new(),
            };
            let mut response =
                (error.status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    }
}

/// Sends `request` to `port` in sandbox `id` as `target` (path and query).
async fn forward(
    shared: &Arc<Shared>,
    id: &str,
    port: u16,
    request: Request<Body>,
    target: &str,
) -> Result<Response, ApiError> {
    let sandbox = shared
        .db
        .sandbox(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))?;
    let sandbox = awake(shared, sandbox).await?;
    if sandbox.state != state::RUNNING {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}: only a running sandbox's ports can be reached",
            sandbox.state
        )));
    }
    forward_to(shared, &sandbox, port, request, target).await
}

/// How long traffic waits for a sandbox that another request is resuming.
const RESUME_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The sandbox, resumed first when it is paused and resumes on traffic (`auto_resume`); a
/// request that finds it pausing or resuming waits for that to settle first.
pub(crate) async fn awake(shared: &Arc<Shared>, row: SandboxRow) -> Result<SandboxRow, ApiError> {
    let settling = |state: &str| matches!(state, state::PAUSING | state::RESUMING);
    if !row.auto_resume || !(row.state == state::PAUSED || settling(&row.state)) {
        return Ok(row);
    }
    let id = row.id.clone();
    let deadline = tokio::time::Instant::now() + RESUME_WAIT;
    let mut row = row;
    loop {
        if tokio::time::Instant::now() > deadline {
            return Ok(row);
        }
        if row.state == state::PAUSED {
            tracing::info!(sandbox_id = %id, "resuming on traffic");
            let resumed = crate::api::sandboxes::resume(
                State(shared.clone()),
                Path(id.clone()),
                crate::api::OptionalJson(crate::api::types::ResumeRequest::default()),
            )
            .await;
            match resumed {
                Ok(_) => {}
                // Another request got there first: wait for it.
                Err(error) if error.status == StatusCode::CONFLICT => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
        } else if !settling(&row.state) {
            return Ok(row);
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        row = shared
            .db
            .sandbox(&id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))?;
    }
}

/// Sends `request` to `port` of `sandbox` (running) as `target`, through its host's agent.
pub(crate) async fn forward_to(
    shared: &Shared,
    sandbox: &SandboxRow,
    port: u16,
    request: Request<Body>,
    target: &str,
) -> Result<Response, ApiError> {
    let id = sandbox.id.as_str();
    let host = match &sandbox.host_id {
        Some(host_id) => shared.db.host(host_id).await?,
        None => None,
    }
    .filter(|h| h.state == READY)
    .ok_or_else(|| ApiError::unavailable(format!("sandbox {id}'s host is not reachable now")))?;
    let tunnel = wrenn_tunnel::open(&host.address, id, port)
        .await
        .map_err(tunnel_error)?;
    let mut response = wrenn_tunnel::forward_http(tunnel, request, target)
        .await
        .map_err(tunnel_error)?;
    tracing::debug!(sandbox_id = %id, port, status = response.status().as_u16(), "proxied");
    response.extensions_mut().insert(Proxied);
    Ok(response)
}

fn tunnel_error(error: wrenn_tunnel::TunnelError) -> ApiError {
    let status = error.status();
    let status = if status.is_client_error() || status.is_server_error() {
        status
    } else {
        StatusCode::BAD_GATEWAY
    };
    ApiError::new(status, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_host_target_reads_port_and_sandbox_from_the_host() {
        assert_eq!(
            host_target("8080-sbx-1a2b.sandbox.example", "sandbox.example"),
            Some((8080, "sbx-1a2b"))
        );
        assert_eq!(
            host_target("3000-abc.sandbox.example:8443", "sandbox.example"),
            Some((3000, "abc"))
        );
        assert_eq!(host_target("sandbox.example", "sandbox.example"), None);
        assert_eq!(host_target("api.sandbox.example", "sandbox.example"), None);
        assert_eq!(
            host_target("0-abc.sandbox.example", "sandbox.example"),
            None
        );
        assert_eq!(
            host_target("80-a.b.sandbox.example", "sandbox.example"),
            None
        );
        assert_eq!(
            host_target("80-abc.evil-sandbox.example", "sandbox.example"),
            None
        );
    }
}
