//! The REST API: the router, the request middleware (request ids, tracing spans, metrics,
//! JSON errors for everything) and API-key authentication.

pub(crate) mod hosts;
pub(crate) mod keys;
pub(crate) mod sandboxes;
pub(crate) mod snapshots;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::Shared;
use crate::error::{ApiError, ErrorInfo, code_for};
use crate::ids;

/// JSON request bodies larger than this are refused with 413.
pub const JSON_LIMIT: usize = 1 << 20;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled (empty outside one).
pub fn request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// The API's router; `extra_protected` routes get the API-key check, `extra_public` not; both
/// get request ids, spans, metrics and JSON errors.
pub(crate) fn router(state: Arc<Shared>, extra_protected: Router, extra_public: Router) -> Router {
    let protected = Router::new()
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get_one).delete(sandboxes::destroy),
        )
        .route("/v1/sandboxes/{id}/exec", post(sandboxes::exec))
        .route(
            "/v1/sandboxes/{id}/exec/stream",
            post(sandboxes::exec_stream),
        )
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route(
            "/v1/sandboxes/{id}/files",
            post(sandboxes::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/sandboxes/{id}/files/read", post(sandboxes::read_file))
        .route(
            "/v1/snapshots",
            post(snapshots::create).get(snapshots::list),
        )
        .route(
            "/v1/snapshots/{name}",
            get(snapshots::get_one).delete(snapshots::destroy),
        )
        .route("/v1/hosts", get(hosts::list))
        .route("/v1/hosts/{id}", delete(hosts::destroy))
        .route("/v1/api-keys", post(keys::create).get(keys::list))
        .route("/v1/api-keys/{id}", delete(keys::destroy))
        .with_state(state.clone())
        .merge(crate::proxy::routes(state.clone()))
        .merge(crate::e2b::routes(state.clone()))
        .merge(extra_protected)
        .route_layer(from_fn_with_state(state.clone(), authenticate));
    let public = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/openapi.yaml", get(openapi_yaml))
        .route("/v1/hosts/heartbeat", post(hosts::heartbeat))
        .with_state(state.clone())
        .merge(crate::e2b::public_routes())
        .merge(extra_public)
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .url("/openapi.json", crate::openapi::document()),
        );
    Router::new()
        .merge(protected)
        .merge(public)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
        .layer(from_fn_with_state(state.clone(), request_context))
        .layer(from_fn_with_state(state.clone(), crate::e2b::envd::route))
        .layer(from_fn_with_state(state, crate::proxy::by_host))
}

/// Gives every request an id (the client's if sane), a tracing span, a metrics count, and
/// renders every error response as the contract's JSON.
async fn request_context(
    State(state): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| ids::sane_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req-{}", ids::random_hex(8).unwrap_or_default()));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let e2b = crate::e2b::is_e2b_path(request.uri().path());
    let start = Instant::now();
    let response = REQUEST_ID
        .scope(id.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    let mut response = render_error(response, &id, e2b)
        .instrument(span.clone())
        .await;
    let status = response.status();
    // Heartbeats and probes come every few seconds: they would drown the access log.
    let routine = matches!(
        route.as_str(),
        "/v1/hosts/heartbeat" | "/healthz" | "/health" | "/metrics"
    ) && status.is_success();
    span.in_scope(|| {
        let elapsed_ms = start.elapsed().as_millis();
        if routine {
            tracing::debug!(status = status.as_u16(), elapsed_ms, "answered");
        } else {
            tracing::info!(status = status.as_u16(), elapsed_ms, "answered");
        }
    });
    state.metrics.request(&route, status.as_u16());
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Turns an error response (ours or axum's) into the JSON error body: Wrenn's, or for E2B's
/// paths E2B's (`code` is the status there).
async fn render_error(response: Response, request_id: &str, e2b: bool) -> Response {
    let status = response.status();
    let from_sandbox = response
        .extensions()
        .get::<crate::proxy::Proxied>()
        .is_some();
    if !(status.is_client_error() || status.is_server_error()) || from_sandbox {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let info = match parts.extensions.remove::<ErrorInfo>() {
        Some(info) => info,
        None => {
            // axum's rejections say what was wrong in a short text body.
            let text = match http_body_util::Limited::new(body, 4096).collect().await {
                Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
                Err(_) => String::new(),
            };
            let message = if text.trim().is_empty() {
                status.canonical_reason().unwrap_or("error").to_lowercase()
            } else {
                text.trim().to_owned()
            };
            ErrorInfo {
                code: code_for(status),
                message,
            }
        }
    };
    if status.is_server_error() {
        tracing::warn!(code = info.code, message = %info.message, "request failed");
    } else {
        tracing::debug!(code = info.code, message = %info.message, "request refused");
    }
    // axum answers 422 for well-formed JSON of the wrong shape; the contract says 400.
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let bytes = if e2b {
        serde_json::to_vec(&crate::e2b::types::ErrorBody {
            code: status.as_u16(),
            message: info.message,
            request_id: request_id.to_owned(),
        })
    } else {
        serde_json::to_vec(&types::ErrorBody {
            code: info.code.to_owned(),
            message: info.message,
            request_id: request_id.to_owned(),
        })
    }
    .unwrap_or_default();
    parts.status = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

/// Refuses requests without a live API key.
async fn authenticate(State(state): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    match check_api_key(&state.db, request.headers()).await {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Whether the headers carry a live API key (`Authorization: Bearer` or `X-API-Key`).
pub async fn check_api_key(db: &crate::Db, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = presented_key(headers) else {
        return Err(ApiError::unauthenticated(
            "missing API key: send Authorization: Bearer <key> or X-API-Key",
        ));
    };
    if !crate::keys::well_formed(&key) {
        return Err(ApiError::unauthenticated("unknown or revoked API key"));
    }
    match db.use_api_key(&crate::keys::hash(&key)).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::unauthenticated("unknown or revoked API key")),
    }
}

/// The key of `Authorization: Bearer` or `X-API-Key`.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(value.trim().to_owned());
    }
    bearer(headers)
}

/// The token of `Authorization: Bearer <token>`.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

async fn metrics(State(state): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let counts = state.db.count_sandboxes_by_state().await?;
    let text = state.metrics.render(&counts);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi_yaml() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        crate::openapi::yaml(),
    )
        .into_response()
}

/// A JSON body: `Content-Type: application/json` required, at most [`JSON_LIMIT`] bytes,
/// errors as 400 with serde's message.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let json = is_json(request.headers());
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if !json {
            return Err(unsupported_media_type().into_response());
        }
        parse(&bytes)
            .map(JsonBody)
            .map_err(IntoResponse::into_response)
    }
}

/// Like [`JsonBody`], but an empty body (or JSON `null`) means the type's default.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let json = is_json(request.headers());
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        if !json {
            return Err(unsupported_media_type().into_response());
        }
        parse::<Option<T>>(&bytes)
            .map(|value| OptionalJson(value.unwrap_or_default()))
            .map_err(IntoResponse::into_response)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
}

fn unsupported_media_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "send the body as JSON with Content-Type: application/json",
    )
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}
