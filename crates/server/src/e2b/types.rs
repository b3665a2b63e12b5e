//! E2B's REST shapes, field for field as the SDKs read and write them (camelCase, `templateID`
//! and `sandboxID` spelled so, RFC 3339 times). Request types ignore fields they do not know:
//! newer SDKs send more than older servers read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /sandboxes` (older SDKs) and `POST /v2/sandboxes`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds; absent: 300 (the v2 default; older SDKs always send it).
    pub timeout: Option<i64>,
    /// Pause, not kill, when the timeout passes.
    pub auto_pause: Option<bool>,
    pub auto_resume: Option<AutoResume>,
    /// Spelled in snake case by E2B.
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    pub network: Option<Network>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub mcp: Option<serde_json::Value>,
    pub volume_mounts: Option<Vec<serde_json::Value>>,
}

/// `autoResume`: traffic to the paused sandbox resumes it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

/// The egress part of `network` (`allowPublicTraffic` and the rest are accepted, not used).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    pub allow_out: Option<Vec<String>>,
    pub deny_out: Option<Vec<String>>,
}

/// `POST /sandboxes/{id}/connect` and the v2 form.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Connect {
    pub timeout: Option<i64>,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Deserialize)]
pub struct Timeout {
    pub timeout: i64,
}

/// `POST /sandboxes/{id}/refreshes`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Refresh {
    pub duration: Option<i64>,
}

/// `POST /sandboxes/{id}/resume` (deprecated by E2B, still served).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resume {
    pub timeout: Option<i64>,
    pub auto_pause: Option<bool>,
}

/// `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NewSnapshot {
    pub name: Option<String>,
}

/// The answer to create, connect and resume.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    pub envd_access_token: String,
    pub traffic_access_token: Option<String>,
    pub domain: Option<String>,
}

/// One row of the lists (`GET /sandboxes`, `GET /v2/sandboxes`); `GET /sandboxes/{id}` adds
/// the detail fields.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub started_at: String,
    pub end_at: String,
    pub cpu_count: i64,
    #[serde(rename = "memoryMB")]
    pub memory_mb: i64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: i64,
    /// `running` or `paused`.
    pub state: &'static str,
    pub envd_version: String,
    pub metadata: BTreeMap<String, String>,
}

/// `GET /sandboxes/{id}`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(flatten)]
    pub listed: ListedSandbox,
    pub envd_access_token: String,
    pub domain: Option<String>,
    pub lifecycle: Lifecycle,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub auto_resume: bool,
    /// What the timeout does: `kill` or `pause`.
    pub on_timeout: String,
}

/// One sample of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    pub timestamp: String,
    pub timestamp_unix: i64,
    pub cpu_count: i64,
    pub cpu_used_pct: f64,
    pub mem_used: i64,
    pub mem_total: i64,
    pub mem_cache: i64,
    pub disk_used: i64,
    pub disk_total: i64,
}

/// `POST /sandboxes/{id}/snapshots` and the rows of `GET /snapshots`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

/// E2B's error body: the status as a number and a message.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
    /// Ours, beside E2B's two fields (the SDKs keep unknown fields).
    pub request_id: String,
}

/// What the sandbox proxy answers for a sandbox it cannot reach (the SDKs look for "was not
/// found" and "port is not open" in `message`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyError {
    pub sandbox_id: String,
    pub message: String,
    pub code: u16,
}
