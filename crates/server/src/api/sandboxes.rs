//! `/v1/sandboxes...`: create (placement, idempotent retries), list, get, destroy, exec
//! (unary and SSE), pause, resume, timeout, and file upload / download streamed through the
//! sandbox's host agent.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use connectrpc::ErrorCode;
use wrenn_proto::hostagent::v1 as pb;

use super::types::{
    CreateSandbox, ErrorBody, ExecRequest, ExecResult, FileWritten, OnTimeout, ReadFileRequest,
    ResumeRequest, Sandbox, SandboxList, TimeoutRequest,
};
use super::{JsonBody, OptionalJson, request_id};
use crate::Shared;
use crate::agents::{FAST, SLOW, TRANSFER, map_error, options, timed};
use crate::db::sandboxes::{SandboxRow, on_timeout, state};
use crate::db::{ListFilter, now_ms};
use crate::error::ApiError;
use crate::{ids, placement};

type Shd = State<Arc<Shared>>;

const DEFAULT_TIMEOUT_S: u32 = 300;
const MAX_TIMEOUT_S: u32 = 86_400;

/// Runs a state-changing operation in its own task, so that a client hanging up does not
/// leave a sandbox half-way (the database and the agent stay in step).
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    let id = request_id();
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        super::REQUEST_ID.scope(id, work),
        span,
    ))
    .await
    .map_err(|e| ApiError::internal(format!("the request's task failed: {e}")))?
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if ids::valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{id:?} is not a sandbox id ([a-z0-9][a-z0-9-]{{0,62}})"
        )))
    }
}

fn check_timeout(timeout: u32) -> Result<(), ApiError> {
    if (1..=MAX_TIMEOUT_S).contains(&timeout) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "timeout_seconds must be 1 to {MAX_TIMEOUT_S}, got {timeout}"
        )))
    }
}

async fn load(shared: &Shared, id: &str) -> Result<SandboxRow, ApiError> {
    check_id(id)?;
    shared
        .db
        .sandbox(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))
}

fn timestamp_ms(ts: &buffa_types::google::protobuf::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos / 1_000_000))
}

fn expiry(sandbox: &pb::Sandbox, timeout_seconds: i64) -> Option<i64> {
    match sandbox.expires_at.as_option() {
        Some(ts) => Some(timestamp_ms(ts)),
        None if timeout_seconds > 0 => Some(now_ms().saturating_add(timeout_seconds * 1000)),
        None => None,
    }
}

async fn event(shared: &Shared, kind: &str, sandbox_id: &str, host_id: Option<&str>, detail: &str) {
    let request = request_id();
    if let Err(error) = shared
        .db
        .record_event(kind, Some(sandbox_id), host_id, detail, Some(&request))
        .await
    {
        tracing::warn!(sandbox_id = %sandbox_id, %error, "recording an event failed");
    }
}

#[utoipa::path(post, operation_id = "create_sandbox", path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandbox,
    responses((status = 201, body = Sandbox, description = "created, running"),
        (status = 200, body = Sandbox, description = "the same request again: the existing sandbox"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "unknown template"),
        (status = 409, body = ErrorBody, description = "id taken with other parameters"),
        (status = 503, body = ErrorBody, description = "no host has the template or capacity")))]
pub async fn create(
    State(shared): Shd,
    JsonBody(request): JsonBody<CreateSandbox>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    if !ids::valid_name(&request.template) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not a template name",
            request.template
        )));
    }
    let id = match &request.id {
        Some(id) => {
            check_id(id)?;
            id.clone()
        }
        None => format!("sbx-{}", ids::random_hex(8).map_err(ApiError::internal)?),
    };
    let timeout = request.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_S);
    check_timeout(timeout)?;
    if request.metadata.len() > 64
        || request
            .metadata
            .iter()
            .any(|(k, v)| k.is_empty() || k.chars().count() > 256 || v.chars().count() > 4096)
    {
        return Err(ApiError::bad_request(
            "metadata: at most 64 entries, keys 1 to 256 characters, values up to 4096 characters",
        ));
    }
    if let Some(existing) = shared.db.sandbox(&id).await? {
        return same_request(existing, &request);
    }
    detached(create_detached(shared, id, request, timeout)).await
}

/// A retry of a create: 200 with the sandbox when it asked the same, else 409.
fn same_request(
    existing: SandboxRow,
    request: &CreateSandbox,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let same = existing.template == request.template
        && existing.requested_vcpus == i64::from(request.vcpus.unwrap_or(0))
        && existing.requested_memory_mib == i64::from(request.memory_mib.unwrap_or(0))
        && existing.metadata == request.metadata
        && existing.on_timeout == request.on_timeout.unwrap_or_default().as_str();
    if same {
        Ok((StatusCode::OK, Json(existing.into())))
    } else {
        Err(ApiError::conflict(format!(
            "sandbox {} exists with other parameters",
            existing.id
        )))
    }
}

async fn create_detached(
    shared: Arc<Shared>,
    id: String,
    request: CreateSandbox,
    timeout: u32,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let vcpus = i64::from(request.vcpus.unwrap_or(0));
    let memory_mib = i64::from(request.memory_mib.unwrap_or(0));
    let (template, hosts) = placement::candidates(
        &shared.db,
        shared.config.host_grace,
        &request.template,
        vcpus,
        memory_mib,
    )
    .await?;
    let token = ids::random_hex(16).map_err(ApiError::internal)?;
    let now = now_ms();
    let row = SandboxRow {
        id: id.clone(),
        template: request.template.clone(),
        state: state::CREATING.into(),
        host_id: None,
        vcpus: if vcpus > 0 { vcpus } else { template.vcpus },
        memory_mib: if memory_mib > 0 {
            memory_mib
        } else {
            template.memory_mib
        },
        requested_vcpus: vcpus,
        requested_memory_mib: memory_mib,
        timeout_seconds: i64::from(timeout),
        envd_access_token: token.clone(),
        metadata: request.metadata.clone(),
        created_at: now,
        updated_at: now,
        expires_at: None,
        error: None,
        on_timeout: request.on_timeout.unwrap_or_default().as_str().to_owned(),
        auto_resume: request.auto_resume.unwrap_or(false),
    };
    // A sandbox that pauses on its timeout is paused by this server (`expiry`); its agent
    // must not reap it.
    let pauses = request.on_timeout == Some(OnTimeout::Pause);
    let agent_timeout = if pauses { 0 } else { timeout };
    if !shared.db.insert_sandbox(&row).await? {
        // Another request with this id got there first.
        let existing = load(&shared, &id).await?;
        return same_request(existing, &request);
    }
    let egress = request.egress.clone().unwrap_or_default();
    let mut last_refusal = String::new();
    for host in hosts {
        shared.db.set_sandbox_host(&id, &host.id).await?;
        let client = shared.agents.client(&host.address)?;
        let call = pb::CreateSandboxRequest {
            sandbox_id: id.clone(),
            template: request.template.clone(),
            vcpus: request.vcpus.unwrap_or(0),
            memory_mib: request.memory_mib.unwrap_or(0),
            timeout_seconds: agent_timeout,
            env_vars: request.env_vars.clone().into_iter().collect(),
            metadata: request.metadata.clone().into_iter().collect(),
            envd_access_token: token.clone(),
            egress: pb::EgressPolicy {
                allow: egress.allow.clone(),
                deny: egress.deny.clone(),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        };
        let answer = timed(
            &shared.metrics,
            "CreateSandbox",
            client.create_sandbox_with_options(call, options(SLOW)),
        )
        .await;
        match answer {
            Ok(response) => {
                let sandbox = response
                    .into_owned()
                    .sandbox
                    .as_option()
                    .cloned()
                    .unwrap_or_default();
                let token = if sandbox.envd_access_token.is_empty() {
                    token.clone()
                } else {
                    sandbox.envd_access_token.clone()
                };
                let vcpus = if sandbox.vcpus > 0 {
                    i64::from(sandbox.vcpus)
                } else {
                    row.vcpus
                };
                let memory = if sandbox.memory_mib > 0 {
                    i64::from(sandbox.memory_mib)
                } else {
                    row.memory_mib
                };
                shared
                    .db
                    .sandbox_started(
                        &id,
                        state::CREATING,
                        &host.id,
                        vcpus,
                        memory,
                        &token,
                        expiry(&sandbox, i64::from(timeout)),
                    )
                    .await?;
                tracing::info!(sandbox_id = %id, host_id = %host.id, template = %request.template, "sandbox created");
                event(&shared, "sandbox_created", &id, Some(&host.id), "").await;
                let row = load(&shared, &id).await?;
                return Ok((StatusCode::CREATED, Json(row.into())));
            }
            Err(error) if error.code == ErrorCode::ResourceExhausted => {
                tracing::info!(sandbox_id = %id, host_id = %host.id, %error, "host full; trying the next");
                last_refusal = format!("{}: {}", host.id, error.message.unwrap_or_default());
            }
            Err(error) => {
                tracing::warn!(sandbox_id = %id, host_id = %host.id, %error, "create failed");
                shared.db.delete_sandbox(&id).await?;
                return Err(map_error(&error, &format!("creating on host {}", host.id)));
            }
        }
    }
    shared.db.delete_sandbox(&id).await?;
    Err(ApiError::unavailable(format!(
        "every host with template {:?} is full ({last_refusal})",
        request.template
    )))
}

#[utoipa::path(get, operation_id = "list_sandboxes", path = "/v1/sandboxes", tag = "sandboxes",
    params(("state" = Option<String>, Query, pattern = "^((creating|running|pausing|paused|resuming|stopping|stopped|error|lost)(,(creating|running|pausing|paused|resuming|stopping|stopped|error|lost))*)?$",
            description = "comma-separated states; absent or empty: every state but stopped"),
        ("template" = Option<String>, Query), ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1..=1000, default 100"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("metadata.KEY" = Option<String>, Query, description = "only sandboxes whose metadata KEY has this value")),
    responses((status = 200, body = SandboxList), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(shared): Shd,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<SandboxList>, ApiError> {
    let mut filter = ListFilter {
        limit: 100,
        ..Default::default()
    };
    for (key, value) in query {
        match key.as_str() {
            "state" if value.is_empty() => {}
            "state" => {
                for s in value.split(',') {
                    if !state::ALL.contains(&s) {
                        return Err(ApiError::bad_request(format!("unknown state {s:?}")));
                    }
                    filter.states.push(s.to_owned());
                }
            }
            "template" => filter.template = Some(value),
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::bad_request("limit must be 1 to 1000"))?;
            }
            "cursor" => filter.after = Some(decode_cursor(&value)?),
            other => match other.strip_prefix("metadata.") {
                Some(k) if !k.is_empty() => filter.metadata.push((k.to_owned(), value)),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter {other:?}"
                    )));
                }
            },
        }
    }
    let page = shared.db.list_sandboxes(&filter).await?;
    Ok(Json(SandboxList {
        sandboxes: page.sandboxes.into_iter().map(Sandbox::from).collect(),
        next_cursor: page.next.map(|(at, id)| encode_cursor(at, &id)),
    }))
}

pub(crate) fn encode_cursor(created_at: i64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}:{id}"))
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<(i64, String), ApiError> {
    let bad = || ApiError::bad_request("the cursor is not one this server gave out");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, id.to_owned()))
}

#[utoipa::path(get, operation_id = "get_sandbox", path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(shared): Shd,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(load(&shared, &id).await?.into()))
}

#[utoipa::path(delete, operation_id = "delete_sandbox", path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 204, description = "destroyed (or already stopped)"), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn destroy(State(shared): Shd, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let row = load(&shared, &id).await?;
    if row.state == state::STOPPED {
        return Ok(StatusCode::NO_CONTENT);
    }
    detached(destroy_detached(shared, row)).await
}

async fn destroy_detached(shared: Arc<Shared>, row: SandboxRow) -> Result<StatusCode, ApiError> {
    let id = row.id.clone();
    let live: Vec<&str> = state::ALL
        .into_iter()
        .filter(|s| *s != state::STOPPED)
        .collect();
    if !shared
        .db
        .transition_sandbox(&id, &live, state::STOPPING, None)
        .await?
    {
        return Ok(StatusCode::NO_CONTENT);
    }
    let host = match &row.host_id {
        Some(host_id) => shared.db.host(host_id).await?,
        None => None,
    };
    let note = match host {
        Some(host) if host.state == crate::db::hosts::READY => {
            let client = shared.agents.client(&host.address)?;
            let answer = timed(
                &shared.metrics,
                "DestroySandbox",
                client.destroy_sandbox_with_options(
                    pb::DestroySandboxRequest {
                        sandbox_id: id.clone(),
                        ..Default::default()
                    },
                    options(SLOW),
                ),
            )
            .await;
            match answer {
                Ok(_) => None,
                Err(error) if error.code == ErrorCode::NotFound => None,
                Err(error) => {
                    shared
                        .db
                        .transition_sandbox(
                            &id,
                            &[state::STOPPING],
                            &row.state,
                            row.error.as_deref(),
                        )
                        .await?;
                    return Err(map_error(&error, &format!("destroying {id}")));
                }
            }
        }
        Some(host) => Some(format!(
            "deleted while its host {} was unreachable",
            host.id
        )),
        None => None,
    };
    shared
        .db
        .transition_sandbox(&id, &[state::STOPPING], state::STOPPED, note.as_deref())
        .await?;
    tracing::info!(sandbox_id = %id, "sandbox destroyed");
    event(
        &shared,
        "sandbox_destroyed",
        &id,
        row.host_id.as_deref(),
        note.as_deref().unwrap_or(""),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// The running sandbox and a client of its host.
async fn running(
    shared: &Shared,
    id: &str,
) -> Result<(SandboxRow, crate::agents::Client), ApiError> {
    let row = load(shared, id).await?;
    if row.state != state::RUNNING {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}, not running",
            row.state
        )));
    }
    let host =
        placement::live_host(&shared.db, shared.config.host_grace, row.host_id.as_deref()).await?;
    let client = shared.agents.client(&host.address)?;
    Ok((row, client))
}

fn exec_request(id: &str, request: ExecRequest) -> Result<pb::ExecRequest, ApiError> {
    if request.cmd.is_empty() {
        return Err(ApiError::bad_request("cmd is empty"));
    }
    if let Some(cwd) = &request.cwd {
        ids::check_path(cwd).map_err(|e| ApiError::bad_request(format!("cwd: {e}")))?;
    }
    Ok(pb::ExecRequest {
        sandbox_id: id.to_owned(),
        cmd: request.cmd,
        args: request.args,
        envs: request.env.into_iter().collect(),
        cwd: request.cwd.unwrap_or_default(),
        user: request.user.unwrap_or_default(),
        stdin: request.stdin.unwrap_or_default().into_bytes(),
        timeout_seconds: request.timeout_seconds.unwrap_or(0),
        ..Default::default()
    })
}

fn exec_deadline(request: &ExecRequest) -> Duration {
    match request.timeout_seconds {
        Some(t) if t > 0 => Duration::from_secs(u64::from(t) + 10),
        _ => Duration::from_secs(3600),
    }
}

#[utoipa::path(post, operation_id = "exec", path = "/v1/sandboxes/{id}/exec", tag = "sandboxes", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body = ExecRequest,
    responses((status = 200, body = ExecResult, description = "the command ran (any exit code)"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "not running")))]
pub async fn exec(
    State(shared): Shd,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ExecRequest>,
) -> Result<Json<ExecResult>, ApiError> {
    let (_, client) = running(&shared, &id).await?;
    let deadline = exec_deadline(&request);
    let call = exec_request(&id, request)?;
    let answer = timed(
        &shared.metrics,
        "Exec",
        client.exec_with_options(call, options(deadline)),
    )
    .await
    .map_err(|e| map_error(&e, &format!("exec in {id}")))?
    .into_owned();
    Ok(Json(ExecResult {
        stdout: String::from_utf8_lossy(&answer.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&answer.stderr).into_owned(),
        exit_code: answer.exit_code,
        truncated: answer.truncated,
        pid: answer.pid,
    }))
}

fn sse(kind: &str, data: serde_json::Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(kind).data(data.to_string()))
}

fn exec_event(event: pb::ExecEvent) -> Option<Result<Event, Infallible>> {
    use pb::exec_event::Event as Kind;
    let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
    Some(match event.event? {
        Kind::StartedPid(pid) => sse("start", serde_json::json!({ "pid": pid })),
        Kind::Stdout(data) => sse("stdout", serde_json::json!({ "data": b64(&data) })),
        Kind::Stderr(data) => sse("stderr", serde_json::json!({ "data": b64(&data) })),
        Kind::ExitCode(code) => sse("exit", serde_json::json!({ "exit_code": code })),
    })
}

#[utoipa::path(post, operation_id = "exec_stream", path = "/v1/sandboxes/{id}/exec/stream", tag = "sandboxes", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body = ExecRequest,
    responses((status = 200, content_type = "text/event-stream", body = String,
        description = "events start {pid}, stdout/stderr {data: base64}, exit {exit_code}, error {code, message}"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec_stream(
    State(shared): Shd,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    let (_, client) = running(&shared, &id).await?;
    let deadline = exec_deadline(&request);
    let call = exec_request(&id, request)?;
    let what = format!("exec in {id}");
    let mut stream = timed(
        &shared.metrics,
        "ExecStream",
        client.exec_stream_with_options(call, options(deadline)),
    )
    .await
    .map_err(|e| map_error(&e, &what))?;
    // The first message tells whether the command started at all; errors before it are
    // plain HTTP errors.
    let first = stream
        .message()
        .await
        .map_err(|e| map_error(&e, &what))?
        .map(|m| m.to_owned_message());
    let events = futures::stream::unfold(
        (Some(stream), first, what),
        |(stream, pending, what): (Option<_>, Option<pb::ExecEvent>, String)| async move {
            if let Some(message) = pending {
                let item =
                    exec_event(message).unwrap_or_else(|| sse("noop", serde_json::json!({})));
                return Some((item, (stream, None, what)));
            }
            let mut stream = stream?;
            match stream.message().await {
                Ok(Some(message)) => {
                    let item = exec_event(message.to_owned_message())
                        .unwrap_or_else(|| sse("noop", serde_json::json!({})));
                    Some((item, (Some(stream), None, what)))
                }
                Ok(None) => None,
                Err(error) => {
                    let api = map_error(&error, &what);
                    let item = sse(
                        "error",
                        serde_json::json!({ "code": api.code, "message": api.message }),
                    );
                    Some((item, (None, None, what)))
                }
            }
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[utoipa::path(post, operation_id = "pause_sandbox", path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pause(State(shared): Shd, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    let row = load(&shared, &id).await?;
    detached(pause_detached(shared, row)).await
}

async fn pause_detached(shared: Arc<Shared>, row: SandboxRow) -> Result<Json<Sandbox>, ApiError> {
    let id = row.id.clone();
    let host =
        placement::live_host(&shared.db, shared.config.host_grace, row.host_id.as_deref()).await;
    if !shared
        .db
        .transition_sandbox(&id, &[state::RUNNING], state::PAUSING, None)
        .await?
    {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}, not running",
            load(&shared, &id).await?.state
        )));
    }
    let result = async {
        let host = host?;
        let client = shared.agents.client(&host.address)?;
        timed(
            &shared.metrics,
            "PauseSandbox",
            client.pause_sandbox_with_options(
                pb::PauseSandboxRequest {
                    sandbox_id: id.clone(),
                    ..Default::default()
                },
                options(SLOW),
            ),
        )
        .await
        .map_err(|e| map_error(&e, &format!("pausing {id}")))
    }
    .await;
    match result {
        Ok(_) => {
            shared
                .db
                .transition_sandbox(&id, &[state::PAUSING], state::PAUSED, None)
                .await?;
            tracing::info!(sandbox_id = %id, "sandbox paused");
            event(&shared, "sandbox_paused", &id, row.host_id.as_deref(), "").await;
            Ok(Json(load(&shared, &id).await?.into()))
        }
        Err(error) => {
            shared
                .db
                .transition_sandbox(&id, &[state::PAUSING], state::RUNNING, None)
                .await?;
            Err(error)
        }
    }
}

#[utoipa::path(post, operation_id = "resume_sandbox", path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body(content = Option<ResumeRequest>, description = "may be empty"),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn resume(
    State(shared): Shd,
    Path(id): Path<String>,
    OptionalJson(request): OptionalJson<ResumeRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    if let Some(timeout) = request.timeout_seconds {
        check_timeout(timeout)?;
    }
    let row = load(&shared, &id).await?;
    detached(resume_detached(shared, row, request.timeout_seconds)).await
}

async fn resume_detached(
    shared: Arc<Shared>,
    row: SandboxRow,
    timeout: Option<u32>,
) -> Result<Json<Sandbox>, ApiError> {
    let id = row.id.clone();
    if row.state != state::PAUSED {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}, not paused",
            row.state
        )));
    }
    let host_id = row
        .host_id
        .clone()
        .ok_or_else(|| ApiError::conflict(format!("sandbox {id} has no host")))?;
    let host = placement::resume_host(&shared.db, shared.config.host_grace, &host_id).await?;
    if !shared
        .db
        .transition_sandbox(&id, &[state::PAUSED], state::RESUMING, None)
        .await?
    {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is no longer paused"
        )));
    }
    let answer = async {
        let client = shared.agents.client(&host.address)?;
        timed(
            &shared.metrics,
            "ResumeSandbox",
            client.resume_sandbox_with_options(
                pb::ResumeSandboxRequest {
                    sandbox_id: id.clone(),
                    // A sandbox that pauses on its timeout has none on its agent.
                    timeout_seconds: if row.on_timeout == on_timeout::PAUSE {
                        0
                    } else {
                        timeout.unwrap_or(0)
                    },
                    ..Default::default()
                },
                options(SLOW),
            ),
        )
        .await
        .map_err(|e| map_error(&e, &format!("resuming {id} on {}", host.id)))
    }
    .await;
    match answer {
        Ok(response) => {
            let sandbox = response
                .into_owned()
                .sandbox
                .as_option()
                .cloned()
                .unwrap_or_default();
            let timeout_s = timeout.map_or(row.timeout_seconds, i64::from);
            if let Some(t) = timeout {
                shared
                    .db
                    .set_sandbox_timeout(&id, i64::from(t), None)
                    .await?;
            }
            let token = if sandbox.envd_access_token.is_empty() {
                row.envd_access_token.clone()
            } else {
                sandbox.envd_access_token.clone()
            };
            shared
                .db
                .sandbox_started(
                    &id,
                    state::RESUMING,
                    &host.id,
                    row.vcpus,
                    row.memory_mib,
                    &token,
                    expiry(&sandbox, timeout_s),
                )
                .await?;
            tracing::info!(sandbox_id = %id, host_id = %host.id, "sandbox resumed");
            event(&shared, "sandbox_resumed", &id, Some(&host.id), "").await;
            Ok(Json(load(&shared, &id).await?.into()))
        }
        Err(error) => {
            shared
                .db
                .transition_sandbox(&id, &[state::RESUMING], state::PAUSED, None)
                .await?;
            Err(error)
        }
    }
}

#[utoipa::path(post, operation_id = "set_sandbox_timeout", path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body = TimeoutRequest,
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn set_timeout(
    State(shared): Shd,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<TimeoutRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    check_timeout(request.timeout_seconds)?;
    let (row, client) = running(&shared, &id).await?;
    let timeout = i64::from(request.timeout_seconds);
    if row.on_timeout == on_timeout::PAUSE {
        // This server keeps the time of a sandbox that pauses (the agent has none for it).
        let expires = now_ms().saturating_add(timeout * 1000);
        shared
            .db
            .set_sandbox_timeout(&id, timeout, Some(expires))
            .await?;
        return Ok(Json(load(&shared, &id).await?.into()));
    }
    let answer = timed(
        &shared.metrics,
        "SetTimeout",
        client.set_timeout_with_options(
            pb::SetTimeoutRequest {
                sandbox_id: id.clone(),
                timeout_seconds: request.timeout_seconds,
                ..Default::default()
            },
            options(FAST),
        ),
    )
    .await
    .map_err(|e| map_error(&e, &format!("setting the timeout of {id}")))?
    .into_owned();
    let sandbox = answer.sandbox.as_option().cloned().unwrap_or_default();
    shared
        .db
        .set_sandbox_timeout(&id, timeout, expiry(&sandbox, timeout))
        .await?;
    Ok(Json(load(&shared, &id).await?.into()))
}

/// Reads a small text field of a multipart form.
async fn text_field(
    field: &mut axum::extract::multipart::Field<'_>,
    name: &str,
) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        text.extend_from_slice(&chunk);
        if text.len() > 8192 {
            return Err(ApiError::bad_request(format!(
                "the form field {name:?} is over 8 KiB"
            )));
        }
    }
    String::from_utf8(text)
        .map_err(|_| ApiError::bad_request(format!("the form field {name:?} is not UTF-8")))
}

fn multipart_error(error: axum::extract::multipart::MultipartError) -> ApiError {
    let status = error.status();
    let status = if status.is_server_error() {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    ApiError::new(status, format!("reading the upload: {}", error.body_text()))
}

/// Messages of a WriteFile stream, fed from the upload.
fn request_stream(
    rx: tokio::sync::mpsc::Receiver<pb::WriteFileRequest>,
) -> impl futures::Stream<Item = pb::WriteFileRequest> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

const UPLOAD_CHUNK: usize = 512 * 1024;

#[utoipa::path(post, operation_id = "upload_file", path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body(content_type = "multipart/form-data", content = String,
        description = "text field `path` (first), optional `user`, then file field `file`"),
    responses((status = 200, body = FileWritten), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody, description = "over the server's upload limit")))]
pub async fn upload(
    State(shared): Shd,
    Path(id): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<FileWritten>, ApiError> {
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "upload files as multipart/form-data (fields path, user, file)",
        ));
    }
    let mut multipart = multipart
        .map_err(|e| ApiError::bad_request(format!("not a multipart form: {}", e.body_text())))?;
    let (_, client) = running(&shared, &id).await?;
    let limit = shared.config.max_upload_bytes;
    let mut path = None;
    let mut user = String::new();
    let mut field = loop {
        let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? else {
            return Err(ApiError::bad_request("the form has no `file` field"));
        };
        match field.name() {
            Some("path") => path = Some(text_field(&mut field, "path").await?),
            Some("user") => user = text_field(&mut field, "user").await?,
            Some("file") => break field,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected form field {other:?} (expected path, user, file)"
                )));
            }
        }
    };
    let Some(path) = path else {
        return Err(ApiError::bad_request(
            "the `path` field must come before `file`",
        ));
    };
    ids::check_path(&path).map_err(ApiError::bad_request)?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = timed(
        &shared.metrics,
        "WriteFile",
        client.write_file_with_options(request_stream(rx), options(TRANSFER)),
    );
    tokio::pin!(call);
    let feed = feed_upload(&mut field, tx, limit, (id.clone(), path.clone(), user));
    tokio::pin!(feed);
    let mut fed = false;
    let answer = loop {
        tokio::select! {
            answer = &mut call => break answer,
            result = &mut feed, if !fed => {
                result?;
                fed = true;
            }
        }
    };
    let answer = answer
        .map_err(|e| map_error(&e, &format!("writing {path} in {id}")))?
        .into_owned();
    Ok(Json(FileWritten {
        path,
        bytes_written: answer.bytes_written,
    }))
}

/// Sends the file field to the agent in chunks of [`UPLOAD_CHUNK`]; the first message names
/// the sandbox, path and user. Returns the bytes read; `tx` is dropped at the end, which ends
/// the agent's request stream.
async fn feed_upload(
    field: &mut axum::extract::multipart::Field<'_>,
    tx: tokio::sync::mpsc::Sender<pb::WriteFileRequest>,
    limit: u64,
    first: (String, String, String),
) -> Result<u64, ApiError> {
    let mut total: u64 = 0;
    let mut first = Some(first);
    let mut buffer: Vec<u8> = Vec::with_capacity(UPLOAD_CHUNK);
    loop {
        let chunk: Option<Bytes> = field.chunk().await.map_err(multipart_error)?;
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            total = total.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
            if total > limit {
                return Err(ApiError::payload_too_large(format!(
                    "the upload is over this server's limit of {limit} bytes"
                )));
            }
            buffer.extend_from_slice(&chunk);
        }
        if buffer.len() >= UPLOAD_CHUNK || done {
            let (sandbox_id, path, user) = first.take().unwrap_or_default();
            let message = pb::WriteFileRequest {
                sandbox_id,
                path,
                user,
                data: std::mem::take(&mut buffer),
                ..Default::default()
            };
            if tx.send(message).await.is_err() {
                // The call ended early; its result says why.
                return Ok(total);
            }
        }
        if done {
            return Ok(total);
        }
    }
}

#[utoipa::path(post, operation_id = "read_file", path = "/v1/sandboxes/{id}/files/read", tag = "files", params(("id" = String, Path, pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body = ReadFileRequest,
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = ErrorBody, description = "no such sandbox or file")))]
pub async fn read_file(
    State(shared): Shd,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ReadFileRequest>,
) -> Result<Response, ApiError> {
    ids::check_path(&request.path).map_err(ApiError::bad_request)?;
    let (_, client) = running(&shared, &id).await?;
    let what = format!("reading {} in {id}", request.path);
    let mut stream = timed(
        &shared.metrics,
        "ReadFile",
        client.read_file_with_options(
            pb::ReadFileRequest {
                sandbox_id: id.clone(),
                path: request.path.clone(),
                user: request.user.clone().unwrap_or_default(),
                ..Default::default()
            },
            options(TRANSFER),
        ),
    )
    .await
    .map_err(|e| map_error(&e, &what))?;
    let first = stream
        .message()
        .await
        .map_err(|e| map_error(&e, &what))?
        .map(|m| Bytes::from(m.to_owned_message().data));
    let chunks = futures::stream::unfold((Some(stream), first), |(stream, pending)| async move {
        if let Some(data) = pending {
            return Some((Ok::<_, std::io::Error>(data), (stream, None)));
        }
        let mut stream = stream?;
        match stream.message().await {
            Ok(Some(message)) => Some((
                Ok(Bytes::from(message.to_owned_message().data)),
                (Some(stream), None),
            )),
            Ok(None) => None,
            Err(error) => Some((Err(std::io::Error::other(error.to_string())), (None, None))),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(chunks),
    )
        .into_response())
}
