//! `/v1/hosts...`: agents register and refresh themselves with heartbeats (authenticated by
//! the join token); operators list and forget hosts.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::types::{ErrorBody, Heartbeat, HeartbeatAck, Host, HostList};
use super::{JsonBody, bearer};
use crate::Shared;
use crate::db::hosts::heartbeat_row;
use crate::error::ApiError;
use crate::ids;

/// Agents send a heartbeat this often.
pub const HEARTBEAT_INTERVAL_S: u64 = 10;

/// Compares without stopping at the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[utoipa::path(post, operation_id = "heartbeat", path = "/v1/hosts/heartbeat", tag = "hosts", request_body = Heartbeat,
    security(("join_token" = [])),
    responses((status = 200, body = HeartbeatAck), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody, description = "missing or wrong join token")))]
pub async fn heartbeat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<JsonBody<Heartbeat>, Response>,
) -> Response {
    if let Err(error) = check_join_token(&shared.config.join_token, &headers) {
        return error.into_response();
    }
    match body {
        Ok(JsonBody(beat)) => register(&shared, beat).await.into_response(),
        Err(rejection) => rejection,
    }
}

/// Refuses a heartbeat without the server's join token (checked before the body is read).
fn check_join_token(token: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer(headers) {
        _ if token.is_empty() => Err(ApiError::unauthenticated(
            "this server has no join token configured, so it accepts no hosts",
        )),
        Some(presented) if same_secret(&presented, token) => Ok(()),
        Some(_) => Err(ApiError::unauthenticated("wrong join token")),
        None => Err(ApiError::unauthenticated(
            "missing join token: send Authorization: Bearer <join token>",
        )),
    }
}

async fn register(shared: &Shared, beat: Heartbeat) -> Result<Json<HeartbeatAck>, ApiError> {
    if !ids::valid_id(&beat.id) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not a host id ([a-z0-9][a-z0-9-]{{0,62}})",
            beat.id
        )));
    }
    let address_ok = (beat.address.starts_with("http://") || beat.address.starts_with("https://"))
        && beat.address.parse::<http::Uri>().is_ok();
    if !address_ok {
        return Err(ApiError::bad_request(format!(
            "address {:?} is not an http(s) URL",
            beat.address
        )));
    }
    let mut row = heartbeat_row(beat.id.clone(), beat.address, beat.version);
    row.vcpus_total = i64::from(beat.vcpus_total);
    row.memory_mib_total = i64::try_from(beat.memory_mib_total).unwrap_or(i64::MAX);
    row.vcpus_used = i64::from(beat.vcpus_used);
    row.memory_mib_used = i64::try_from(beat.memory_mib_used).unwrap_or(i64::MAX);
    row.sandboxes_running = i64::from(beat.sandboxes_running);
    row.storage = beat.storage.filter(|s| !s.is_empty());
    if shared.db.upsert_host(&row).await? {
        tracing::info!(host_id = %row.id, address = %row.address, "host ready");
        let _ = shared
            .db
            .record_event(
                "host_ready",
                None,
                Some(&row.id),
                &row.address,
                Some(&super::request_id()),
            )
            .await;
    }
    Ok(Json(HeartbeatAck {
        host_id: row.id,
        heartbeat_interval_seconds: HEARTBEAT_INTERVAL_S,
    }))
}

#[utoipa::path(get, operation_id = "list_hosts", path = "/v1/hosts", tag = "hosts", responses((status = 200, body = HostList)))]
pub async fn list(State(shared): State<Arc<Shared>>) -> Result<Json<HostList>, ApiError> {
    let hosts = shared.db.hosts().await?;
    Ok(Json(HostList {
        hosts: hosts.into_iter().map(Host::from).collect(),
    }))
}

#[utoipa::path(delete, operation_id = "delete_host", path = "/v1/hosts/{id}", tag = "hosts", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the host has live sandboxes")))]
pub async fn destroy(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !ids::valid_id(&id) {
        return Err(ApiError::bad_request(format!("{id:?} is not a host id")));
    }
    if shared.db.host(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no host {id}")));
    }
    if !shared.db.delete_host(&id).await? {
        return Err(ApiError::conflict(format!(
            "host {id} has live sandboxes: destroy them first"
        )));
    }
    tracing::info!(host_id = %id, "host forgotten");
    Ok(StatusCode::NO_CONTENT)
}
