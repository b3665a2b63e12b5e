//! `POST /init`: the host hands the sandbox its settings (after a cold boot and after every
//! restore): environment, access token, default user and workdir, the current time.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;

use super::json_error;
use crate::auth::token_matches;
use crate::state::Shared;
use crate::system;

/// The body of `/init` (E2B's fields, plus Wrenn's sandbox and template ids, which E2B's envd
/// reads from Firecracker's metadata service). Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct InitRequest {
    env_vars: Option<BTreeMap<String, String>>,
    access_token: Option<String>,
    timestamp: Option<String>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    sandbox_id: Option<String>,
    template_id: Option<String>,
    /// Limits for all user processes together (written to their parent cgroup).
    process_limits: Option<crate::process::ProcessLimits>,
}

pub(super) async fn init(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Once a token is set only its holder may change the settings; the first /init (cold boot
    // or template build) sets it.
    if !token_matches(&shared, &headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "/init needs the current access token",
        );
    }
    let request: InitRequest = if body.is_empty() {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid /init body: {error}"),
                );
            }
        }
    };
    if let Some(user) = request
        .default_user
        .as_deref()
        .filter(|user| !user.is_empty())
        && let Err(error) = shared.users.lookup(user)
    {
        return json_error(StatusCode::BAD_REQUEST, format!("defaultUser: {error}"));
    }
    if let Some(stamp) = request.timestamp.as_deref() {
        match humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z')) {
            Ok(now) => match system::clock::set_if_skewed(&shared.settings(), now) {
                Ok(true) => tracing::info!("clock set from /init"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "could not set the clock from /init"),
            },
            Err(error) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!("timestamp '{stamp}': {error}"),
                );
            }
        }
    }
    if let Some(limits) = &request.process_limits
        && let Err(error) = crate::process::apply_limits(&shared, limits)
    {
        let status = match error {
            crate::process::CgroupError::InvalidLimit { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match std::error::Error::source(&error) {
            Some(source) => format!("processLimits: {error}: {source}"),
            None => format!("processLimits: {error}"),
        };
        tracing::error!(%message, "applying the process limits failed");
        return json_error(status, message);
    }
    // A restored sandbox must not replay the random stream of its snapshot's other clones.
    let settings = shared.settings();
    match tokio::task::spawn_blocking(move || system::entropy::reseed(&settings)).await {
        Ok(Ok(true)) => tracing::info!("random generator reseeded"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "could not reseed the random generator"),
        Err(error) => tracing::warn!(%error, "reseeding the random generator failed"),
    }
    shared.update(|settings| {
        if let Some(env) = request.env_vars {
            settings.env_vars = env;
        }
        if let Some(token) = request.access_token {
            settings.access_token = (!token.is_empty()).then_some(token);
        }
        if let Some(user) = request.default_user.filter(|user| !user.is_empty()) {
            settings.default_user = user;
        }
        if let Some(dir) = request.default_workdir {
            settings.default_workdir = (!dir.is_empty()).then(|| PathBuf::from(dir));
        }
        if let Some(id) = request.sandbox_id {
            settings.sandbox_id = Some(id);
        }
        if let Some(id) = request.template_id {
            settings.template_id = Some(id);
        }
    });
    let settings = shared.settings();
    system::metadata::publish(&settings);
    tracing::info!(
        sandbox_id = settings.sandbox_id.as_deref().unwrap_or(""),
        default_user = %settings.default_user,
        token = settings.access_token.is_some(),
        at = ?SystemTime::now(),
        "initialised by the host"
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        "x-envd-version",
        HeaderValue::from_static(crate::ENVD_VERSION),
    );
    response
}
