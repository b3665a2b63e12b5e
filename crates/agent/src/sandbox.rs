//! One sandbox's record: what it is (template, shape, env, token, egress), where it is in its
//! life, and which snapshot build it restores from. The record is kept on disk
//! (`<data>/sandboxes/<id>/sandbox.json`, written atomically at every state change) so that a
//! restarted agent finds its running and paused sandboxes again.
//!
//! States and the moves between them (any state may also go to `Error`):
//!
//! ```text
//! Creating ─► Running ─► Pausing ─► Paused ─► Resuming ─► Running
//!                │                     │
//!                └──────► Stopping ◄───┘ ─► Stopped (record removed)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Errors of sandbox records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "sandbox id {0:?} is invalid: use 1 to 64 of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    InvalidId(String),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox record {} is damaged: {source}", path.display())]
    Damaged {
        path: PathBuf,
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Creating,
    Running,
    Pausing,
    Paused,
    Resuming,
    Stopping,
    Stopped,
    Error,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Pausing => "pausing",
            State::Paused => "paused",
            State::Resuming => "resuming",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Error => "error",
        }
    }
}

/// Where the sandbox's traffic may go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRules {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// What the agent knows of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub sandbox_id: String,
    pub template: String,
    pub state: State,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub created_at_ms: u64,
    /// When the reaper stops it.
    pub expires_at_ms: Option<u64>,
    /// The timeout it was given (0: none), kept for a resume.
    pub timeout_seconds: u32,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub access_token: String,
    pub egress: EgressRules,
    /// The build it restores from: its template's, then its last pause's.
    pub build_id: String,
    /// Builds its own pauses wrote (removed with it unless a template uses them).
    pub own_builds: Vec<String>,
    /// While it runs: its network slot and its VMM's pid (for a restarted agent).
    pub slot: Option<u32>,
    /// While it runs: the address its guest answers on from this machine.
    pub host_address: Option<String>,
    pub vmm_pid: Option<u32>,
    pub error: Option<String>,
}

/// Checks a sandbox id: it names directories and sockets.
pub fn validate_id(id: &str) -> Result<(), RecordError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(RecordError::InvalidId(id.to_owned()))
    }
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `now + timeout`, or `None` for no timeout (0).
pub fn expiry(timeout_seconds: u32) -> Option<u64> {
    (timeout_seconds > 0).then(|| now_ms().saturating_add(u64::from(timeout_seconds) * 1000))
}

/// A protobuf timestamp for a Unix time in milliseconds.
pub fn timestamp(ms: u64) -> buffa_types::google::protobuf::Timestamp {
    let d = Duration::from_millis(ms);
    buffa_types::google::protobuf::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

impl Record {
    pub const FILE: &'static str = "sandbox.json";

    /// Writes the record into `dir` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), RecordError> {
        let path = dir.join(Self::FILE);
        let tmp = dir.join("sandbox.json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Damaged {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, text).map_err(|source| RecordError::Io {
            op: "writing",
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| RecordError::Io {
            op: "renaming",
            path: tmp,
            source,
        })
    }

    pub fn load(dir: &Path) -> Result<Record, RecordError> {
        let path = dir.join(Self::FILE);
        let text = std::fs::read(&path).map_err(|source| RecordError::Io {
            op: "reading",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| RecordError::Damaged { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ids_are_checked() {
        for good in ["a", "sbx-1", "0abc", &"a".repeat(64)] {
            validate_id(good).unwrap();
        }
        for bad in ["", "-a", "A", "a_b", "a/b", "a.b", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_record_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record {
            sandbox_id: "s1".into(),
            template: "base".into(),
            state: State::Paused,
            vcpus: 2,
            memory_mib: 512,
            created_at_ms: 5,
            expires_at_ms: Some(9),
            timeout_seconds: 4,
            metadata: [("k".to_owned(), "v".to_owned())].into(),
            env_vars: BTreeMap::new(),
            access_token: "t".into(),
            egress: EgressRules::default(),
            build_id: "b".into(),
            own_builds: vec!["b".into()],
            slot: None,
            host_address: None,
            vmm_pid: None,
            error: None,
        };
        record.save(dir.path()).unwrap();
        assert_eq!(Record::load(dir.path()).unwrap(), record);
    }

    #[test]
    fn test_expiry_is_none_without_timeout() {
        assert_eq!(expiry(0), None);
        let at = expiry(10).unwrap();
        assert!(at >= now_ms() + 9_000 && at <= now_ms() + 10_000);
    }
}
