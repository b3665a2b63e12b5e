//! `/v1/snapshots...`: templates and snapshots (a snapshot is taken on the sandbox's host; the
//! list is the database's, kept in line with the agents' ListSnapshots by the reconciler).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use connectrpc::ErrorCode;
use wrenn_proto::hostagent::v1 as pb;

use super::JsonBody;
use super::types::{CreateSnapshot, ErrorBody, Snapshot, SnapshotList};
use crate::Shared;
use crate::agents::{FAST, SLOW, map_error, options, timed};
use crate::db::hosts::READY;
use crate::db::now_ms;
use crate::db::sandboxes::state;
use crate::db::templates::{KIND_SNAPSHOT, KIND_TEMPLATE, TemplateRow};
use crate::error::ApiError;
use crate::{ids, placement};

fn check_name(name: &str) -> Result<(), ApiError> {
    if ids::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{name:?} is not a snapshot name ([a-z0-9][a-z0-9._-]{{0,62}})"
        )))
    }
}

/// The row for a snapshot an agent reported.
pub(crate) fn row_of(snapshot: &pb::Snapshot) -> TemplateRow {
    let created_at = snapshot.created_at.as_option().map_or(0, |ts| {
        ts.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(ts.nanos / 1_000_000))
    });
    TemplateRow {
        name: snapshot.name.clone(),
        kind: if snapshot.source_sandbox_id.is_empty() {
            KIND_TEMPLATE.into()
        } else {
            KIND_SNAPSHOT.into()
        },
        vcpus: i64::from(snapshot.vcpus),
        memory_mib: i64::from(snapshot.memory_mib),
        source_sandbox_id: (!snapshot.source_sandbox_id.is_empty())
            .then(|| snapshot.source_sandbox_id.clone()),
        size_bytes: i64::try_from(snapshot.size_bytes).unwrap_or(i64::MAX),
        created_at,
        hosts: Vec::new(),
    }
}

#[utoipa::path(post, operation_id = "create_snapshot", path = "/v1/snapshots", tag = "snapshots", request_body = CreateSnapshot,
    responses((status = 201, body = Snapshot), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name taken, or the sandbox is not running or paused")))]
pub async fn create(
    State(shared): State<Arc<Shared>>,
    JsonBody(request): JsonBody<CreateSnapshot>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    check_name(&request.name)?;
    if !ids::valid_id(&request.sandbox_id) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not a sandbox id",
            request.sandbox_id
        )));
    }
    if shared.db.template(&request.name).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "a template or snapshot named {:?} exists",
            request.name
        )));
    }
    let sandbox = shared
        .db
        .sandbox(&request.sandbox_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {}", request.sandbox_id)))?;
    if sandbox.state != state::RUNNING && sandbox.state != state::PAUSED {
        return Err(ApiError::conflict(format!(
            "sandbox {} is {}: only a running or paused sandbox can be snapshotted",
            sandbox.id, sandbox.state
        )));
    }
    let host = placement::live_host(
        &shared.db,
        shared.config.host_grace,
        sandbox.host_id.as_deref(),
    )
    .await?;
    let client = shared.agents.client(&host.address)?;
    let answer = timed(
        &shared.metrics,
        "CreateSnapshot",
        client.create_snapshot_with_options(
            pb::CreateSnapshotRequest {
                sandbox_id: sandbox.id.clone(),
                name: request.name.clone(),
                ..Default::default()
            },
            options(SLOW),
        ),
    )
    .await
    .map_err(|e| map_error(&e, &format!("snapshotting {}", sandbox.id)))?
    .into_owned();
    let mut row = match answer.snapshot.as_option() {
        Some(snapshot) => row_of(snapshot),
        None => TemplateRow {
            name: request.name.clone(),
            kind: KIND_SNAPSHOT.into(),
            vcpus: sandbox.vcpus,
            memory_mib: sandbox.memory_mib,
            source_sandbox_id: Some(sandbox.id.clone()),
            size_bytes: 0,
            created_at: now_ms(),
            hosts: Vec::new(),
        },
    };
    row.kind = KIND_SNAPSHOT.into();
    if row.source_sandbox_id.is_none() {
        row.source_sandbox_id = Some(sandbox.id.clone());
    }
    shared.db.upsert_template(&row, &host.id).await?;
    tracing::info!(sandbox_id = %sandbox.id, snapshot = %row.name, host_id = %host.id, "snapshot taken");
    let stored = shared
        .db
        .template(&row.name)
        .await?
        .ok_or_else(|| ApiError::internal("the snapshot row vanished"))?;
    Ok((StatusCode::CREATED, Json(stored.into())))
}

#[utoipa::path(get, operation_id = "list_snapshots", path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, body = SnapshotList)))]
pub async fn list(State(shared): State<Arc<Shared>>) -> Result<Json<SnapshotList>, ApiError> {
    let snapshots = shared.db.templates().await?;
    Ok(Json(SnapshotList {
        snapshots: snapshots.into_iter().map(Snapshot::from).collect(),
    }))
}

#[utoipa::path(get, operation_id = "get_snapshot", path = "/v1/snapshots/{name}", tag = "snapshots", params(("name" = String, Path, pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$")),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    check_name(&name)?;
    let row =
        shared.db.template(&name).await?.ok_or_else(|| {
            ApiError::not_found(format!("no template or snapshot named {name:?}"))
        })?;
    Ok(Json(row.into()))
}

#[utoipa::path(delete, operation_id = "delete_snapshot", path = "/v1/snapshots/{name}", tag = "snapshots", params(("name" = String, Path, pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "sandboxes run from it")))]
pub async fn destroy(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    let row =
        shared.db.template(&name).await?.ok_or_else(|| {
            ApiError::not_found(format!("no template or snapshot named {name:?}"))
        })?;
    for host_id in &row.hosts {
        let Some(host) = shared.db.host(host_id).await? else {
            continue;
        };
        if host.state != READY {
            tracing::warn!(snapshot = %name, host_id = %host.id, "host unreachable; its copy stays until it returns");
            continue;
        }
        let client = shared.agents.client(&host.address)?;
        let answer = timed(
            &shared.metrics,
            "DeleteSnapshot",
            client.delete_snapshot_with_options(
                pb::DeleteSnapshotRequest {
                    name: name.clone(),
                    ..Default::default()
                },
                options(FAST),
            ),
        )
        .await;
        match answer {
            Ok(_) => {}
            Err(error) if error.code == ErrorCode::NotFound => {}
            Err(error) => {
                return Err(map_error(
                    &error,
                    &format!("deleting {name} on {}", host.id),
                ));
            }
        }
    }
    shared.db.delete_template(&name).await?;
    tracing::info!(snapshot = %name, "snapshot deleted");
    Ok(StatusCode::NO_CONTENT)
}
