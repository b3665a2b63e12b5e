//! The OpenAPI 3.1 document of the REST API, generated from the handlers and types
//! (committed as `crates/server/openapi.yaml`; a test keeps the two equal).

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{hosts, keys, sandboxes, snapshots, types};

#[derive(OpenApi)]
#[openapi(
    info(title = "Wrenn", description = "Wrenn's control plane: sandboxes on host agents.", version = "1"),
    paths(
        sandboxes::create, sandboxes::list, sandboxes::get_one, sandboxes::destroy,
        sandboxes::exec, sandboxes::exec_stream, sandboxes::pause, sandboxes::resume,
        sandboxes::set_timeout, sandboxes::upload, sandboxes::read_file,
        snapshots::create, snapshots::list, snapshots::get_one, snapshots::destroy,
        hosts::heartbeat, hosts::list, hosts::destroy,
        keys::create, keys::list, keys::destroy,
        crate::proxy::by_path,
    ),
    components(schemas(
        types::ErrorBody, types::Egress, types::CreateSandbox, types::Sandbox, types::SandboxList,
        types::ExecRequest, types::ExecResult, types::ResumeRequest, types::TimeoutRequest,
        types::FileWritten, types::ReadFileRequest, types::CreateSnapshot, types::Snapshot,
        types::SnapshotList, types::Heartbeat, types::HeartbeatAck, types::Host, types::HostList,
        types::CreateApiKey, types::CreatedApiKey, types::ApiKey, types::ApiKeyList,
    )),
    modifiers(&Security, &CommonResponses),
    security(("bearer" = []), ("api_key" = [])),
)]
struct ApiDoc;

/// API keys as `Authorization: Bearer` or `X-API-Key`; the heartbeat's join token.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key (wrenn_ + 40 hex)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        components.add_security_scheme(
            "join_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The server's join token (agents' heartbeats)"))
                    .build(),
            ),
        );
    }
}

/// Operations that call a host agent, whose failures come back as 403, 502, 503 or 504.
const AGENT_OPERATIONS: &[&str] = &[
    "create_sandbox",
    "delete_sandbox",
    "exec",
    "exec_stream",
    "pause_sandbox",
    "resume_sandbox",
    "set_sandbox_timeout",
    "upload_file",
    "read_file",
    "create_snapshot",
    "delete_snapshot",
    "proxy_port",
];

/// The error answers any operation can give, declared once here rather than on every
/// handler: 401 (API key), 400 (bad path or body), 413 (JSON bodies), 415 (bodies), 500, and the
/// agent errors of [`AGENT_OPERATIONS`]. A status a handler documents itself is kept.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                add_common_responses(operation);
            }
        }
    }
}

fn add_common_responses(operation: &mut utoipa::openapi::path::Operation) {
    let has_path_params = operation.parameters.as_ref().is_some_and(|params| {
        params
            .iter()
            .any(|p| p.parameter_in == utoipa::openapi::path::ParameterIn::Path)
    });
    let has_query_params = operation.parameters.as_ref().is_some_and(|params| {
        params
            .iter()
            .any(|p| p.parameter_in == utoipa::openapi::path::ParameterIn::Query)
    });
    let json_body = operation
        .request_body
        .as_ref()
        .is_some_and(|body| body.content.contains_key("application/json"));
    let any_body = operation.request_body.is_some();
    let api_key = operation.security.is_none();
    let agent = operation
        .operation_id
        .as_deref()
        .is_some_and(|id| AGENT_OPERATIONS.contains(&id));
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description).into());
    };
    if has_path_params || has_query_params || any_body {
        add("400", "invalid_request: a malformed path, query or body");
    }
    if api_key {
        add(
            "401",
            "unauthenticated: a missing, unknown or revoked API key",
        );
    }
    if json_body {
        add("413", "payload_too_large: a JSON body over 1 MiB");
    }
    if any_body {
        add(
            "415",
            "unsupported_media_type: a body without the Content-Type the operation takes",
        );
    }
    add("500", "internal: the server's database failed");
    if agent {
        add(
            "403",
            "permission_denied: the sandbox refused the path or user",
        );
        add("502", "host_error: the host agent failed");
        add(
            "503",
            "unavailable: no host can take it, or the sandbox's host is unreachable",
        );
        add("504", "timeout: the host agent did not answer in time");
    }
}

fn error_response(description: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// The document as a value.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as YAML (what `GET /openapi.yaml` serves and the repository commits).
pub fn yaml() -> String {
    document()
        .to_yaml()
        .unwrap_or_else(|e| format!("# the OpenAPI document failed to render: {e}\n"))
}
