//! E2B's sandbox, snapshot and template paths, each translated onto Wrenn's own handlers (so
//! placement, idempotency, state rules and events are the same whichever API is used), then
//! answered in E2B's shapes and statuses: the generated SDK clients parse a body only for the
//! documented status (create 201, connect 200 or 201 ...), so the statuses are load-bearing.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::types::{
    Connect, Lifecycle, ListedSandbox, NewSandbox, NewSnapshot, Refresh, Resume, Sandbox,
    SandboxDetail, SandboxMetric, SnapshotInfo, Timeout,
};
use super::{CLIENT_ID, ENVD_VERSION};
use crate::Shared;
use crate::api::types::{
    CreateSandbox, CreateSnapshot, Egress, OnTimeout, ResumeRequest, TimeoutRequest,
};
use crate::api::{JsonBody, OptionalJson, sandboxes as wrenn, snapshots as wrenn_snapshots};
use crate::db::sandboxes::{SandboxRow, on_timeout, state};
use crate::db::templates::KIND_SNAPSHOT;
use crate::db::{ListFilter, now_ms, rfc3339};
use crate::error::ApiError;
use crate::ids;

type Shd = State<Arc<Shared>>;

/// E2B's default sandbox timeout, seconds.
const DEFAULT_TIMEOUT_S: i64 = 300;
/// The longest timeout (24 hours, as E2B's paid tiers).
const MAX_TIMEOUT_S: i64 = 86_400;
/// The most rows one list page holds (E2B's limit).
const MAX_PAGE: u32 = 100;
/// `POST /sandboxes/{id}/refreshes` without a duration.
const DEFAULT_REFRESH_S: i64 = 60;

fn check_timeout(timeout: i64) -> Result<u32, ApiError> {
    if timeout <= 0 {
        return Err(ApiError::bad_request(format!(
            "timeout must be a positive number of seconds, got {timeout}"
        )));
    }
    if timeout > MAX_TIMEOUT_S {
        return Err(ApiError::bad_request(format!(
            "Timeout cannot be greater than {} hours",
            MAX_TIMEOUT_S / 3600
        )));
    }
    u32::try_from(timeout).map_err(|_| ApiError::bad_request("timeout is out of range"))
}

/// The sandbox, unless unknown or stopped (or stopping): E2B forgets a sandbox once it is
/// killed.
async fn live(shared: &Shared, id: &str) -> Result<SandboxRow, ApiError> {
    let not_found = || ApiError::not_found(format!("sandbox {id} not found"));
    if !ids::valid_id(id) {
        return Err(not_found());
    }
    match shared.db.sandbox(id).await? {
        // Being destroyed counts as gone already.
        Some(row) if row.state != state::STOPPED && row.state != state::STOPPING => Ok(row),
        _ => Err(not_found()),
    }
}

/// E2B's two states: a sandbox is paused (or on its way there) or it is running.
fn e2b_state(wrenn_state: &str) -> &'static str {
    if wrenn_state == state::PAUSED || wrenn_state == state::PAUSING {
        "paused"
    } else {
        "running"
    }
}

fn sandbox_of(shared: &Shared, row: &SandboxRow) -> Sandbox {
    Sandbox {
        template_id: row.template.clone(),
        sandbox_id: row.id.clone(),
        client_id: CLIENT_ID.to_owned(),
        envd_version: ENVD_VERSION.to_owned(),
        envd_access_token: row.envd_access_token.clone(),
        traffic_access_token: None,
        domain: shared.config.domain.clone(),
    }
}

fn listed_of(row: SandboxRow) -> ListedSandbox {
    let end = row
        .expires_at
        .unwrap_or_else(|| row.updated_at.saturating_add(row.timeout_seconds * 1000));
    ListedSandbox {
        template_id: row.template,
        sandbox_id: row.id,
        client_id: CLIENT_ID.to_owned(),
        started_at: rfc3339(row.created_at),
        end_at: rfc3339(end),
        cpu_count: row.vcpus,
        memory_mb: row.memory_mib,
        // The disk is the template's image; its size is not tracked per sandbox.
        disk_size_mb: 0,
        state: e2b_state(&row.state),
        envd_version: ENVD_VERSION.to_owned(),
        metadata: row.metadata,
    }
}

/// E2B's egress switches as Wrenn's policy: `allowOut` entries are the only destinations
/// when given (E2B lets them win over `denyOut`); no internet access denies everything.
fn egress_of(request: &NewSandbox) -> Option<Egress> {
    let network = request.network.clone().unwrap_or_default();
    let allow = network.allow_out.unwrap_or_default();
    let mut deny = network.deny_out.unwrap_or_default();
    if request.allow_internet_access == Some(false) && allow.is_empty() {
        deny.push("0.0.0.0/0".to_owned());
    }
    if !allow.is_empty() {
        // Everything else is refused by the allow list already; a blanket deny would refuse
        // the allowed entries too (a deny wins in Wrenn's policy).
        deny.retain(|d| d != "0.0.0.0/0" && d != "::/0");
    }
    (!allow.is_empty() || !deny.is_empty()).then_some(Egress { allow, deny })
}

async fn create(
    shared: Arc<Shared>,
    request: NewSandbox,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    if request.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(ApiError::bad_request(
            "the MCP gateway (mcp) is not offered here",
        ));
    }
    if request
        .volume_mounts
        .as_ref()
        .is_some_and(|v| !v.is_empty())
    {
        return Err(ApiError::bad_request("volume mounts are not offered here"));
    }
    let timeout = check_timeout(request.timeout.unwrap_or(DEFAULT_TIMEOUT_S))?;
    let egress = egress_of(&request);
    let call = CreateSandbox {
        template: request.template_id,
        id: None,
        vcpus: None,
        memory_mib: None,
        timeout_seconds: Some(timeout),
        env_vars: request.env_vars.unwrap_or_default(),
        metadata: request.metadata.unwrap_or_default(),
        egress,
        on_timeout: Some(if request.auto_pause == Some(true) {
            OnTimeout::Pause
        } else {
            OnTimeout::Kill
        }),
        auto_resume: Some(request.auto_resume.is_some_and(|a| a.enabled)),
    };
    let (_, Json(created)) = wrenn::create(State(shared.clone()), JsonBody(call)).await?;
    let row = live(&shared, &created.id).await?;
    Ok((StatusCode::CREATED, Json(sandbox_of(&shared, &row))))
}

/// `POST /sandboxes` (SDKs up to 2.45).
pub async fn create_v1(
    State(shared): Shd,
    JsonBody(request): JsonBody<NewSandbox>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    create(shared, request).await
}

/// `POST /v2/sandboxes` (current SDKs).
pub async fn create_v2(
    State(shared): Shd,
    JsonBody(request): JsonBody<NewSandbox>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    create(shared, request).await
}

/// `metadata=k%3Dv%26k2%3Dv2`: the SDKs send the filter as one URL-encoded query string.
fn metadata_filter(value: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(value.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// `GET /v2/sandboxes`: running and paused sandboxes, newest first, `x-next-token` paging.
pub async fn list_v2(
    State(shared): Shd,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let mut filter = ListFilter {
        limit: MAX_PAGE,
        ..Default::default()
    };
    for (key, value) in query {
        match key.as_str() {
            "metadata" => filter.metadata.extend(metadata_filter(&value)),
            "state" => {
                for s in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match s {
                        "running" => filter.states.push(state::RUNNING.to_owned()),
                        "paused" => filter.states.push(state::PAUSED.to_owned()),
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "unknown state {other:?}: running or paused"
                            )));
                        }
                    }
                }
            }
            "template" => filter.template = Some(value),
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}"))
                    })?;
            }
            "nextToken" if value.is_empty() => {}
            "nextToken" => filter.after = Some(wrenn::decode_cursor(&value)?),
            // Newest first is the only order kept; a start time filter is not offered.
            "order" | "startedAfter" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    if filter.states.is_empty() {
        filter.states = vec![state::RUNNING.to_owned(), state::PAUSED.to_owned()];
    }
    let page = shared.db.list_sandboxes(&filter).await?;
    let rows: Vec<ListedSandbox> = page.sandboxes.into_iter().map(listed_of).collect();
    let mut response = Json(rows).into_response();
    if let Some((at, id)) = page.next
        && let Ok(token) = HeaderValue::from_str(&wrenn::encode_cursor(at, &id))
    {
        response.headers_mut().insert("x-next-token", token);
    }
    Ok(response)
}

/// `GET /sandboxes` (deprecated by E2B): every running sandbox, one page.
pub async fn list_v1(
    State(shared): Shd,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    let mut filter = ListFilter {
        limit: 1000,
        states: vec![state::RUNNING.to_owned()],
        ..Default::default()
    };
    for (key, value) in query {
        match key.as_str() {
            "metadata" => filter.metadata.extend(metadata_filter(&value)),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    let page = shared.db.list_sandboxes(&filter).await?;
    Ok(Json(page.sandboxes.into_iter().map(listed_of).collect()))
}

/// `GET /sandboxes/{id}`.
pub async fn get_one(
    State(shared): Shd,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, ApiError> {
    let row = live(&shared, &id).await?;
    let token = row.envd_access_token.clone();
    let (row_auto_resume, row_on_timeout) = (row.auto_resume, row.on_timeout.clone());
    Ok(Json(SandboxDetail {
        listed: listed_of(row),
        envd_access_token: token,
        domain: shared.config.domain.clone(),
        lifecycle: Lifecycle {
            auto_resume: row_auto_resume,
            on_timeout: row_on_timeout,
        },
    }))
}

/// `DELETE /sandboxes/{id}`: 204, or 404 when unknown or already killed (the SDKs then
/// return false).
pub async fn kill(State(shared): Shd, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    live(&shared, &id).await?;
    wrenn::destroy(State(shared), Path(id)).await
}

/// `POST /sandboxes/{id}/connect` and `/v2/...`: a running sandbox has its end moved later
/// (never earlier) and answers 200; a paused one is resumed and answers 201.
pub async fn connect(
    State(shared): Shd,
    Path(id): Path<String>,
    OptionalJson(request): OptionalJson<Connect>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let timeout = request.timeout.map(check_timeout).transpose()?;
    let row = live(&shared, &id).await?;
    match row.state.as_str() {
        state::RUNNING => {
            if let Some(timeout) = timeout {
                extend(&shared, &row, timeout).await?;
            }
            let row = live(&shared, &id).await?;
            Ok((StatusCode::OK, Json(sandbox_of(&shared, &row))))
        }
        state::PAUSED => resumed(shared, id, timeout).await,
        other => Err(ApiError::conflict(format!(
            "sandbox {id} is {other}; try again when it is running or paused"
        ))),
    }
}

/// Moves a running sandbox's end to `timeout` seconds from now, unless it is later already.
async fn extend(shared: &Arc<Shared>, row: &SandboxRow, timeout: u32) -> Result<(), ApiError> {
    let wanted = now_ms().saturating_add(i64::from(timeout) * 1000);
    if row.expires_at.is_some_and(|end| end >= wanted) {
        return Ok(());
    }
    let _updated = wrenn::set_timeout(
        State(shared.clone()),
        Path(row.id.clone()),
        JsonBody(TimeoutRequest {
            timeout_seconds: timeout,
        }),
    )
    .await?;
    Ok(())
}

/// `POST /sandboxes/{id}/timeout`: the sandbox ends `timeout` seconds from now.
pub async fn set_timeout(
    State(shared): Shd,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<Timeout>,
) -> Result<StatusCode, ApiError> {
    let timeout = check_timeout(request.timeout)?;
    live(&shared, &id).await?;
    let _updated = wrenn::set_timeout(
        State(shared),
        Path(id),
        JsonBody(TimeoutRequest {
            timeout_seconds: timeout,
        }),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/refreshes`: keeps the sandbox alive `duration` more seconds.
pub async fn refresh(
    State(shared): Shd,
    Path(id): Path<String>,
    OptionalJson(request): OptionalJson<Refresh>,
) -> Result<StatusCode, ApiError> {
    let duration = request.duration.unwrap_or(DEFAULT_REFRESH_S);
    if !(0..=3600).contains(&duration) {
        return Err(ApiError::bad_request(format!(
            "duration must be 0 to 3600 seconds, got {duration}"
        )));
    }
    let row = live(&shared, &id).await?;
    if row.state != state::RUNNING {
        return Err(ApiError::conflict(format!("sandbox {id} is not running")));
    }
    if duration > 0 {
        extend(&shared, &row, check_timeout(duration)?).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/pause`: 204; 409 when paused already (the SDKs return false).
/// Memory is always kept (`memory: false` asks for less, and gets a full pause).
pub async fn pause(
    State(shared): Shd,
    Path(id): Path<String>,
    OptionalJson(_request): OptionalJson<serde_json::Value>,
) -> Result<StatusCode, ApiError> {
    live(&shared, &id).await?;
    let _paused = wrenn::pause(State(shared), Path(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/resume` (deprecated by E2B; the SDKs connect instead): 201.
pub async fn resume(
    State(shared): Shd,
    Path(id): Path<String>,
    OptionalJson(request): OptionalJson<Resume>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let timeout = request.timeout.map(check_timeout).transpose()?;
    let row = live(&shared, &id).await?;
    if request
        .auto_pause
        .is_some_and(|p| p != (row.on_timeout == on_timeout::PAUSE))
    {
        return Err(ApiError::bad_request(
            "autoPause is set when a sandbox is created; it cannot change on resume",
        ));
    }
    if row.state != state::PAUSED {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}, not paused",
            row.state
        )));
    }
    resumed(shared, id, timeout).await
}

/// Resumes the paused sandbox `id` through Wrenn's handler: 201 with E2B's body.
async fn resumed(
    shared: Arc<Shared>,
    id: String,
    timeout: Option<u32>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let resume = ResumeRequest {
        timeout_seconds: timeout,
    };
    let _resumed = wrenn::resume(
        State(shared.clone()),
        Path(id.clone()),
        OptionalJson(resume),
    )
    .await?;
    let row = live(&shared, &id).await?;
    Ok((StatusCode::CREATED, Json(sandbox_of(&shared, &row))))
}

/// One sample of the guest's use, from its envd's `/metrics`.
async fn sample(shared: &Shared, row: &SandboxRow) -> Result<SandboxMetric, ApiError> {
    if row.state != state::RUNNING {
        return Err(ApiError::conflict(format!(
            "sandbox {} is {}: metrics come from a running sandbox",
            row.id, row.state
        )));
    }
    let request = Request::get("/metrics")
        .header("x-access-token", &row.envd_access_token)
        .body(Body::empty())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let response =
        crate::proxy::forward_to(shared, row, super::envd::ENVD_PORT, request, "/metrics").await?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 64 << 10)
        .collect()
        .await
        .map_err(|e| ApiError::host_error(format!("reading envd's metrics: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(ApiError::host_error(format!(
            "envd in {} answered {status} for its metrics",
            row.id
        )));
    }
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::host_error(format!("envd's metrics are not JSON: {e}")))?;
    let int = |key: &str| {
        raw.get(key)
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0)
    };
    let at_s = raw
        .get("ts")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or_else(|| now_ms() / 1000);
    Ok(SandboxMetric {
        timestamp: rfc3339(at_s.saturating_mul(1000)),
        timestamp_unix: at_s,
        cpu_count: int("cpu_count"),
        cpu_used_pct: raw
            .get("cpu_used_pct")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0),
        mem_used: int("mem_used"),
        mem_total: int("mem_total"),
        mem_cache: int("mem_cache"),
        disk_used: int("disk_used"),
        disk_total: int("disk_total"),
    })
}

/// `GET /sandboxes/{id}/metrics`: the guest's use now (samples are not stored, so the
/// `start`/`end` window holds one sample when now is in it).
pub async fn metrics(
    State(shared): Shd,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Vec<SandboxMetric>>, ApiError> {
    let bound = |key: &str| -> Result<Option<i64>, ApiError> {
        query
            .get(key)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("{key} must be unix seconds")))
            })
            .transpose()
    };
    let (start, end) = (bound("start")?, bound("end")?);
    let row = live(&shared, &id).await?;
    let sample = sample(&shared, &row).await?;
    let inside = start.is_none_or(|s| s <= sample.timestamp_unix)
        && end.is_none_or(|e| sample.timestamp_unix <= e);
    Ok(Json(if inside { vec![sample] } else { Vec::new() }))
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each running one.
pub async fn metrics_many(
    State(shared): Shd,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ids = query.get("sandbox_ids").map_or("", String::as_str);
    let mut out = serde_json::Map::new();
    for id in ids
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take(100)
    {
        let Ok(row) = live(&shared, id).await else {
            continue;
        };
        if let Ok(sample) = sample(&shared, &row).await {
            out.insert(
                id.to_owned(),
                serde_json::to_value(sample).map_err(|e| ApiError::internal(e.to_string()))?,
            );
        }
    }
    Ok(Json(serde_json::json!({ "sandboxes": out })))
}

/// `POST /sandboxes/{id}/snapshots`: 201 `{snapshotID, names}`; the sandbox keeps running,
/// and `Sandbox.create(snapshotID)` starts new sandboxes from it.
pub async fn snapshot(
    State(shared): Shd,
    Path(id): Path<String>,
    OptionalJson(request): OptionalJson<NewSnapshot>,
) -> Result<(StatusCode, Json<SnapshotInfo>), ApiError> {
    live(&shared, &id).await?;
    let name = match request.name {
        Some(name) => name,
        None => format!("snap-{}", ids::random_hex(8).map_err(ApiError::internal)?),
    };
    let call = CreateSnapshot {
        sandbox_id: id,
        name,
    };
    let (_, Json(taken)) = wrenn_snapshots::create(State(shared), JsonBody(call)).await?;
    Ok((
        StatusCode::CREATED,
        Json(SnapshotInfo {
            snapshot_id: taken.name.clone(),
            names: vec![taken.name],
        }),
    ))
}

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: snapshots (not base templates), by
/// name, `x-next-token` paging.
pub async fn list_snapshots(
    State(shared): Shd,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit: usize = match query.get("limit") {
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit must be 1 to 1000"))?,
        None => 100,
    };
    let after = query.get("nextToken").filter(|t| !t.is_empty());
    let mut rows: Vec<_> = shared
        .db
        .templates()
        .await?
        .into_iter()
        .filter(|t| t.kind == KIND_SNAPSHOT)
        .filter(|t| {
            query
                .get("sandboxID")
                .is_none_or(|s| t.source_sandbox_id.as_deref() == Some(s.as_str()))
        })
        .filter(|t| query.get("name").is_none_or(|n| &t.name == n))
        .filter(|t| after.is_none_or(|a| t.name.as_str() > a.as_str()))
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more.then(|| rows.last().map(|t| t.name.clone())).flatten();
    let body: Vec<SnapshotInfo> = rows
        .into_iter()
        .map(|t| SnapshotInfo {
            snapshot_id: t.name.clone(),
            names: vec![t.name],
        })
        .collect();
    let mut response = Json(body).into_response();
    if let Some(next) = next
        && let Ok(token) = HeaderValue::from_str(&next)
    {
        response.headers_mut().insert("x-next-token", token);
    }
    Ok(response)
}

/// `DELETE /templates/{id}`: how the SDKs delete a snapshot (204; 404 when unknown).
pub async fn delete_template(
    State(shared): Shd,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !ids::valid_name(&id) {
        return Err(ApiError::not_found(format!(
            "no template or snapshot {id:?}"
        )));
    }
    wrenn_snapshots::destroy(State(shared), Path(id)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2b::types::Network;

    #[test]
    fn test_metadata_filter_reads_the_sdks_encoding() {
        assert_eq!(
            metadata_filter("user=alice&job=a%26b"),
            vec![
                ("user".to_owned(), "alice".to_owned()),
                ("job".to_owned(), "a&b".to_owned())
            ]
        );
        assert!(metadata_filter("").is_empty());
    }

    #[test]
    fn test_egress_follows_e2b_precedence() {
        let closed = NewSandbox {
            allow_internet_access: Some(false),
            ..Default::default()
        };
        assert_eq!(egress_of(&closed).unwrap().deny, vec!["0.0.0.0/0"]);
        let some = NewSandbox {
            network: Some(Network {
                allow_out: Some(vec!["1.1.1.1".into()]),
                deny_out: Some(vec!["0.0.0.0/0".into(), "10.0.0.0/8".into()]),
            }),
            ..Default::default()
        };
        let egress = egress_of(&some).unwrap();
        assert_eq!(
            (egress.allow, egress.deny),
            (vec!["1.1.1.1".to_owned()], vec!["10.0.0.0/8".to_owned()])
        );
        assert!(egress_of(&NewSandbox::default()).is_none());
    }

    #[test]
    fn test_timeouts_are_checked_as_e2b_does() {
        assert!(check_timeout(0).is_err());
        assert!(check_timeout(-5).is_err());
        assert_eq!(check_timeout(300).unwrap(), 300);
        assert!(
            check_timeout(MAX_TIMEOUT_S + 1)
                .unwrap_err()
                .message
                .contains("24 hours")
        );
    }
}
