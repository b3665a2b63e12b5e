//! The REST API's request and response bodies (also the OpenAPI schemas).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::hosts::HostRow;
use crate::db::rfc3339;
use crate::db::sandboxes::SandboxRow;
use crate::db::templates::TemplateRow;

/// Integers of request bodies also accept a JSON number with a zero fraction (`300.0`): JSON
/// Schema calls it an integer, and clients (JavaScript's among them) may send one.
mod whole {
    use serde::de::{Deserialize, Deserializer, Error, Visitor};

    /// A non-negative whole number, however the JSON spelled it.
    pub struct Whole(pub u64);

    impl<'de> Deserialize<'de> for Whole {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Whole, D::Error> {
            deserializer.deserialize_any(WholeVisitor)
        }
    }

    struct WholeVisitor;

    impl Visitor<'_> for WholeVisitor {
        type Value = Whole;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: Error>(self, n: u64) -> Result<Whole, E> {
            Ok(Whole(n))
        }
        fn visit_i64<E: Error>(self, n: i64) -> Result<Whole, E> {
            u64::try_from(n)
                .map(Whole)
                .map_err(|_| E::custom(format!("{n} is negative; expected a non-negative integer")))
        }
        fn visit_f64<E: Error>(self, n: f64) -> Result<Whole, E> {
            // Printed without a fraction and parsed back: no lossy cast, and anything that is
            // not a whole number within u64 is refused.
            if n == 0.0 {
                // -0.0 too.
                return Ok(Whole(0));
            }
            let text = format!("{n:.0}");
            match text.parse::<u64>() {
                Ok(value) if n.fract() == 0.0 => Ok(Whole(value)),
                _ => Err(E::custom(format!("{n} is not a non-negative integer"))),
            }
        }
    }

    fn narrow<T: TryFrom<u64>, E: Error>(n: u64) -> Result<T, E> {
        T::try_from(n).map_err(|_| E::custom(format!("{n} is too large")))
    }

    pub fn u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
        narrow(Whole::deserialize(deserializer)?.0)
    }

    pub fn u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        Ok(Whole::deserialize(deserializer)?.0)
    }

    pub fn option_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
        Option::<Whole>::deserialize(deserializer)?
            .map(|w| narrow(w.0))
            .transpose()
    }
}

/// Metadata: at most 64 entries, keys 1 to 256 characters, values up to 4096 characters.
fn metadata_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .max_properties(Some(64))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(256)),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(4096)),
        ))
        .build()
}

/// Every error: the status's code, a message, and the request's id.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// `invalid_request`, `unauthenticated`, `permission_denied`, `not_found`,
    /// `method_not_allowed`, `conflict`, `payload_too_large`, `unsupported_media_type`,
    /// `internal`, `host_error`, `unavailable` or `timeout`.
    pub code: String,
    pub message: String,
    pub request_id: String,
}

/// Where a sandbox's traffic may go (CIDRs or addresses); a deny entry wins.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    #[schema(pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub template: String,
    /// `[a-z0-9][a-z0-9-]{0,62}`; absent: the server picks `sbx-` + 16 hex.
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub id: Option<String>,
    /// 0 or absent: the template's.
    #[serde(default, deserialize_with = "whole::option_u32")]
    pub vcpus: Option<u32>,
    #[serde(default, deserialize_with = "whole::option_u32")]
    pub memory_mib: Option<u32>,
    /// 1..=86400, default 300.
    #[serde(default, deserialize_with = "whole::option_u32")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<u32>,
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// At most 64 entries; keys 1 to 256 characters, values up to 4096.
    #[serde(default)]
    #[schema(schema_with = metadata_schema)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub egress: Option<Egress>,
    /// What the timeout does: `kill` (the default) or `pause` (memory and disk kept; resume
    /// it later).
    #[serde(default)]
    pub on_timeout: Option<OnTimeout>,
    /// Traffic to the paused sandbox through this server (its ports, E2B's SDKs) resumes it.
    #[serde(default)]
    pub auto_resume: Option<bool>,
}

/// What a sandbox's timeout does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Kill,
    Pause,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Kill => crate::db::sandboxes::on_timeout::KILL,
            OnTimeout::Pause => crate::db::sandboxes::on_timeout::PAUSE,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub template: String,
    /// creating, running, pausing, paused, resuming, stopping, stopped, error or lost.
    pub state: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub host_id: Option<String>,
    pub timeout_seconds: i64,
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub envd_access_token: String,
    pub error: Option<String>,
    /// `kill` or `pause`.
    pub on_timeout: String,
    pub auto_resume: bool,
}

impl From<SandboxRow> for Sandbox {
    fn from(row: SandboxRow) -> Sandbox {
        Sandbox {
            id: row.id,
            template: row.template,
            state: row.state,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            host_id: row.host_id,
            timeout_seconds: row.timeout_seconds,
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
            expires_at: row.expires_at.map(rfc3339),
            metadata: row.metadata,
            envd_access_token: row.envd_access_token,
            error: row.error,
            on_timeout: row.on_timeout,
            auto_resume: row.auto_resume,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    #[schema(min_length = 1)]
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A path in the sandbox (see `ReadFileRequest.path`).
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 1024,
        pattern = r"^([^/\x00.][^/\x00]*|\.|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)?(/([^/\x00.][^/\x00]*|\.|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)?)*$"
    )]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default, deserialize_with = "whole::option_u32")]
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    /// The output was cut (use exec/stream for large output).
    pub truncated: bool,
    pub pid: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// 1..=86400; absent: the sandbox's.
    #[serde(default, deserialize_with = "whole::option_u32")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    #[serde(deserialize_with = "whole::u32")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub bytes_written: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    /// Non-empty, no NUL, no `..` component, at most 4096 bytes (the schema says 1024
    /// characters, which any UTF-8 encoding keeps within that); relative paths are relative to
    /// the user's home. The pattern spells out "segments separated by `/`, none of them `..`,
    /// no NUL" without look-ahead, so that every tool can use it.
    #[schema(
        min_length = 1,
        max_length = 1024,
        pattern = r"^([^/\x00.][^/\x00]*|\.|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)?(/([^/\x00.][^/\x00]*|\.|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)?)*$"
    )]
    pub path: String,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub sandbox_id: String,
    #[schema(pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub name: String,
    /// `template` (built from an image) or `snapshot` (taken from a sandbox).
    pub kind: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub source_sandbox_id: Option<String>,
    pub size_bytes: i64,
    pub created_at: String,
    pub hosts: Vec<String>,
}

impl From<TemplateRow> for Snapshot {
    fn from(row: TemplateRow) -> Snapshot {
        Snapshot {
            name: row.name,
            kind: row.kind,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            source_sandbox_id: row.source_sandbox_id,
            size_bytes: row.size_bytes,
            created_at: rfc3339(row.created_at),
            hosts: row.hosts,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// Unknown fields are ignored here (unlike the API's other bodies), so that agents newer than
/// the server can still register.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub id: String,
    /// The agent's base URL, reachable from the server.
    pub address: String,
    pub version: String,
    #[serde(deserialize_with = "whole::u32")]
    pub vcpus_total: u32,
    #[serde(deserialize_with = "whole::u64")]
    pub memory_mib_total: u64,
    #[serde(deserialize_with = "whole::u32")]
    pub vcpus_used: u32,
    #[serde(deserialize_with = "whole::u64")]
    pub memory_mib_used: u64,
    #[serde(deserialize_with = "whole::u32")]
    pub sandboxes_running: u32,
    /// The agent's shared-storage URL: hosts with the same value share templates and paused
    /// sandboxes.
    #[serde(default)]
    pub storage: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAck {
    pub host_id: String,
    pub heartbeat_interval_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: String,
    pub address: String,
    /// `ready` or `unreachable`.
    pub state: String,
    pub version: String,
    pub vcpus_total: i64,
    pub memory_mib_total: i64,
    pub vcpus_used: i64,
    pub memory_mib_used: i64,
    pub sandboxes_running: i64,
    pub storage: Option<String>,
    pub last_heartbeat_at: String,
    pub registered_at: String,
}

impl From<HostRow> for Host {
    fn from(row: HostRow) -> Host {
        Host {
            id: row.id,
            address: row.address,
            state: row.state,
            version: row.version,
            vcpus_total: row.vcpus_total,
            memory_mib_total: row.memory_mib_total,
            vcpus_used: row.vcpus_used,
            memory_mib_used: row.memory_mib_used,
            sandboxes_running: row.sandboxes_running,
            storage: row.storage,
            last_heartbeat_at: rfc3339(row.last_heartbeat_at),
            registered_at: rfc3339(row.registered_at),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<Host>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: String,
    /// The key itself: shown this once only.
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_may_be_spelled_as_whole_floats() {
        let parse = |json: &str| serde_json::from_str::<TimeoutRequest>(json);
        assert_eq!(
            parse(r#"{"timeout_seconds": 300}"#)
                .unwrap()
                .timeout_seconds,
            300
        );
        assert_eq!(
            parse(r#"{"timeout_seconds": 300.0}"#)
                .unwrap()
                .timeout_seconds,
            300
        );
        assert_eq!(
            parse(r#"{"timeout_seconds": -0.0}"#)
                .unwrap()
                .timeout_seconds,
            0
        );
        for bad in [
            "300.5",
            "-1",
            "-1.0",
            "1e300",
            "4294967296",
            "\"300\"",
            "null",
        ] {
            assert!(
                parse(&format!(r#"{{"timeout_seconds": {bad}}}"#)).is_err(),
                "{bad} was accepted"
            );
        }
        let resume: ResumeRequest = serde_json::from_str(r#"{"timeout_seconds": 60.0}"#).unwrap();
        assert_eq!(resume.timeout_seconds, Some(60));
        let resume: ResumeRequest = serde_json::from_str(r#"{"timeout_seconds": null}"#).unwrap();
        assert_eq!(resume.timeout_seconds, None);
        assert!(serde_json::from_str::<ResumeRequest>(r#"{"timeout_seconds": 1.5}"#).is_err());
    }
}
