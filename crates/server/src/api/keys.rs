//! `/v1/api-keys...`: make, list and revoke API keys.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::JsonBody;
use super::types::{ApiKey, ApiKeyList, CreateApiKey, CreatedApiKey, ErrorBody};
use crate::Shared;
use crate::db::rfc3339;
use crate::error::ApiError;
use crate::keys::{KeyError, create as make_key};

#[utoipa::path(post, operation_id = "create_api_key", path = "/v1/api-keys", tag = "api-keys", request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey, description = "the key is shown this once"),
        (status = 400, body = ErrorBody)))]
pub async fn create(
    State(shared): State<Arc<Shared>>,
    JsonBody(request): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let key = make_key(&shared.db, &request.name)
        .await
        .map_err(|e| match e {
            KeyError::BadName(_) => ApiError::bad_request(e.to_string()),
            KeyError::Db(db) => ApiError::from(db),
            KeyError::Random(_) => ApiError::internal(e.to_string()),
        })?;
    tracing::info!(key_id = %key.id, name = %key.name, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            id: key.id,
            name: key.name,
            prefix: key.prefix,
            created_at: rfc3339(key.created_at),
            key: key.key,
        }),
    ))
}

#[utoipa::path(get, operation_id = "list_api_keys", path = "/v1/api-keys", tag = "api-keys", responses((status = 200, body = ApiKeyList)))]
pub async fn list(State(shared): State<Arc<Shared>>) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = shared.db.api_keys().await?;
    Ok(Json(ApiKeyList {
        api_keys: keys
            .into_iter()
            .map(|k| ApiKey {
                id: k.id,
                name: k.name,
                prefix: k.prefix,
                created_at: rfc3339(k.created_at),
                last_used_at: k.last_used_at.map(rfc3339),
            })
            .collect(),
    }))
}

#[utoipa::path(delete, operation_id = "delete_api_key", path = "/v1/api-keys/{id}", tag = "api-keys", params(("id" = String, Path)),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody)))]
pub async fn destroy(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if shared.db.revoke_api_key(&id).await? {
        tracing::info!(key_id = %id, "API key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no live API key {id}")))
    }
}
