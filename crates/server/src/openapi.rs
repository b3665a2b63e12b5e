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
    ),
    components(schemas(
        types::ErrorBody, types::Egress, types::CreateSandbox, types::Sandbox, types::SandboxList,
        types::ExecRequest, types::ExecResult, types::ResumeRequest, types::TimeoutRequest,
        types::FileWritten, types::ReadFileRequest, types::CreateSnapshot, types::Snapshot,
        types::SnapshotList, types::Heartbeat, types::HeartbeatAck, types::Host, types::HostList,
        types::CreateApiKey, types::CreatedApiKey, types::ApiKey, types::ApiKeyList,
    )),
    modifiers(&Security),
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
