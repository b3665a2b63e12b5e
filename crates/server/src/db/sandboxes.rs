//! The `sandboxes` table (and `sandbox_metadata`, its filter index): guarded state
//! transitions and keyset-paginated lists.

use std::collections::BTreeMap;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Db, DbError, now_ms, placeholders};

/// Sandbox states, as stored.
pub mod state {
    pub const CREATING: &str = "creating";
    pub const RUNNING: &str = "running";
    pub const PAUSING: &str = "pausing";
    pub const PAUSED: &str = "paused";
    pub const RESUMING: &str = "resuming";
    pub const STOPPING: &str = "stopping";
    pub const STOPPED: &str = "stopped";
    pub const ERROR: &str = "error";
    pub const LOST: &str = "lost";
    pub const ALL: [&str; 9] = [
        CREATING, RUNNING, PAUSING, PAUSED, RESUMING, STOPPING, STOPPED, ERROR, LOST,
    ];
}

/// One stored sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    pub id: String,
    pub template: String,
    pub state: String,
    pub host_id: Option<String>,
    pub vcpus: i64,
    pub memory_mib: i64,
    /// What the create request asked for (0: the template's).
    pub requested_vcpus: i64,
    pub requested_memory_mib: i64,
    pub timeout_seconds: i64,
    pub envd_access_token: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: Option<i64>,
    pub error: Option<String>,
    /// What the timeout does: [`on_timeout::KILL`] (the agent reaps it) or
    /// [`on_timeout::PAUSE`] (the control plane pauses it).
    pub on_timeout: String,
    /// Traffic through the control plane to the paused sandbox resumes it.
    pub auto_resume: bool,
}

/// What a sandbox's timeout does.
pub mod on_timeout {
    pub const KILL: &str = "kill";
    pub const PAUSE: &str = "pause";
}

/// What a create inserts before any agent is asked.
pub type NewSandbox = SandboxRow;

/// Filters of `GET /v1/sandboxes`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Empty: every state but `stopped`.
    pub states: Vec<String>,
    pub template: Option<String>,
    pub metadata: Vec<(String, String)>,
    pub limit: u32,
    /// The last row of the previous page: (created_at, id).
    pub after: Option<(i64, String)>,
}

/// One page of a list, newest first.
#[derive(Debug, Clone)]
pub struct SandboxPage {
    pub sandboxes: Vec<SandboxRow>,
    /// The (created_at, id) to continue after, when there may be more.
    pub next: Option<(i64, String)>,
}

const COLUMNS: &str = "id, template, state, host_id, vcpus, memory_mib, requested_vcpus, \
     requested_memory_mib, timeout_seconds, envd_access_token, metadata, created_at, updated_at, \
     expires_at, error, on_timeout, auto_resume";

fn from_row(row: &AnyRow) -> Result<SandboxRow, DbError> {
    let metadata: String = row.try_get("metadata")?;
    let metadata = serde_json::from_str(&metadata)
        .map_err(|e| DbError::Corrupt(format!("sandbox metadata {metadata:?}: {e}")))?;
    Ok(SandboxRow {
        id: row.try_get("id")?,
        template: row.try_get("template")?,
        state: row.try_get("state")?,
        host_id: row.try_get("host_id")?,
        vcpus: row.try_get("vcpus")?,
        memory_mib: row.try_get("memory_mib")?,
        requested_vcpus: row.try_get("requested_vcpus")?,
        requested_memory_mib: row.try_get("requested_memory_mib")?,
        timeout_seconds: row.try_get("timeout_seconds")?,
        envd_access_token: row.try_get("envd_access_token")?,
        metadata,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
        error: row.try_get("error")?,
        on_timeout: row.try_get("on_timeout")?,
        auto_resume: row.try_get::<i64, _>("auto_resume")? != 0,
    })
}

impl Db {
    /// Inserts a sandbox row and its metadata index; false when the id is taken.
    pub async fn insert_sandbox(&self, row: &SandboxRow) -> Result<bool, DbError> {
        let metadata = serde_json::to_string(&row.metadata)
            .map_err(|e| DbError::Corrupt(format!("encoding metadata: {e}")))?;
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO sandboxes ({COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (id) DO NOTHING"
        ))
        .bind(&row.id)
        .bind(&row.template)
        .bind(&row.state)
        .bind(row.host_id.as_deref())
        .bind(row.vcpus)
        .bind(row.memory_mib)
        .bind(row.requested_vcpus)
        .bind(row.requested_memory_mib)
        .bind(row.timeout_seconds)
        .bind(&row.envd_access_token)
        .bind(metadata)
        .bind(row.created_at)
        .bind(row.updated_at)
        .bind(row.expires_at)
        .bind(row.error.as_deref())
        .bind(&row.on_timeout)
        .bind(i64::from(row.auto_resume))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        for (key, value) in &row.metadata {
            sqlx::query(
                "INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES ($1, $2, $3)",
            )
            .bind(&row.id)
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub async fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, DbError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Moves a sandbox from one of `from` to `to` (setting or clearing its error); false when
    /// it was in no state of `from` (another request or replica got there first).
    pub async fn transition_sandbox(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&str>,
    ) -> Result<bool, DbError> {
        let sql = format!(
            "UPDATE sandboxes SET state = $2, error = $3, updated_at = $4 \
             WHERE id = $1 AND state IN {}",
            placeholders(5, from.len())
        );
        let mut query = sqlx::query(&sql)
            .bind(id)
            .bind(to)
            .bind(error)
            .bind(now_ms());
        for state in from {
            query = query.bind(*state);
        }
        Ok(query.execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Records where a sandbox runs (a create picked a host, a resume moved it).
    pub async fn set_sandbox_host(&self, id: &str, host_id: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE sandboxes SET host_id = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(host_id)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A create or resume succeeded on `host_id`: the sandbox runs, with what the agent said.
    #[allow(clippy::too_many_arguments)]
    pub async fn sandbox_started(
        &self,
        id: &str,
        from: &str,
        host_id: &str,
        vcpus: i64,
        memory_mib: i64,
        envd_access_token: &str,
        expires_at: Option<i64>,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'running', host_id = $3, vcpus = $4, memory_mib = $5, \
             envd_access_token = $6, expires_at = $7, error = NULL, updated_at = $8 \
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(from)
        .bind(host_id)
        .bind(vcpus)
        .bind(memory_mib)
        .bind(envd_access_token)
        .bind(expires_at)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A new timeout, and when it ends.
    pub async fn set_sandbox_timeout(
        &self,
        id: &str,
        timeout_seconds: i64,
        expires_at: Option<i64>,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE sandboxes SET timeout_seconds = $2, expires_at = $3, updated_at = $4 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(timeout_seconds)
        .bind(expires_at)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets a sandbox whose create failed, so that a retry with its id starts afresh.
    pub async fn delete_sandbox(&self, id: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM sandboxes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// One page of sandboxes, newest first (created_at DESC, id DESC).
    pub async fn list_sandboxes(&self, filter: &ListFilter) -> Result<SandboxPage, DbError> {
        let mut sql = format!("SELECT {COLUMNS} FROM sandboxes s WHERE 1 = 1");
        let mut binds: Vec<Bind> = Vec::new();
        let next = |binds: &mut Vec<Bind>, value: Bind| {
            binds.push(value);
            format!("${}", binds.len())
        };
        if filter.states.is_empty() {
            let p = next(&mut binds, Bind::Text("stopped".into()));
            sql.push_str(&format!(" AND state <> {p}"));
        } else {
            let list: Vec<String> = filter
                .states
                .iter()
                .map(|s| next(&mut binds, Bind::Text(s.clone())))
                .collect();
            sql.push_str(&format!(" AND state IN ({})", list.join(", ")));
        }
        if let Some(template) = &filter.template {
            let p = next(&mut binds, Bind::Text(template.clone()));
            sql.push_str(&format!(" AND template = {p}"));
        }
        for (key, value) in &filter.metadata {
            let k = next(&mut binds, Bind::Text(key.clone()));
            let v = next(&mut binds, Bind::Text(value.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id \
                 AND m.key = {k} AND m.value = {v})"
            ));
        }
        if let Some((created_at, id)) = &filter.after {
            let c1 = next(&mut binds, Bind::Int(*created_at));
            let c2 = next(&mut binds, Bind::Int(*created_at));
            let i = next(&mut binds, Bind::Text(id.clone()));
            sql.push_str(&format!(
                " AND (created_at < {c1} OR (created_at = {c2} AND id < {i}))"
            ));
        }
        let limit = i64::from(filter.limit.max(1));
        let p = next(&mut binds, Bind::Int(limit + 1));
        sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT {p}"));
        let mut query = sqlx::query(&sql);
        for bind in binds {
            query = match bind {
                Bind::Text(text) => query.bind(text),
                Bind::Int(int) => query.bind(int),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut sandboxes = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next = if sandboxes.len() > limit {
            sandboxes.truncate(limit);
            sandboxes.last().map(|s| (s.created_at, s.id.clone()))
        } else {
            None
        };
        Ok(SandboxPage { sandboxes, next })
    }

    /// The sandboxes recorded on a host in any of `states`.
    pub async fn sandboxes_on_host(
        &self,
        host_id: &str,
        states: &[&str],
    ) -> Result<Vec<SandboxRow>, DbError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE host_id = $1 AND state IN {}",
            placeholders(2, states.len())
        );
        let mut query = sqlx::query(&sql).bind(host_id);
        for state in states {
            query = query.bind(*state);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(from_row).collect()
    }

    /// Creates that never got a host and have not moved since `before_ms` (the server that
    /// took them stopped half-way).
    pub async fn stuck_unplaced(&self, before_ms: i64) -> Result<Vec<SandboxRow>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE state = 'creating' AND host_id IS NULL \
             AND updated_at < $1"
        ))
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Running sandboxes whose timeout has passed at `now_ms` (at most `limit`, the longest
    /// overdue first): those that pause, and those that are killed (their agent reaps them
    /// too; whichever comes first).
    pub async fn due_for_timeout(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<SandboxRow>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE state = 'running' \
             AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// vCPUs and MiB the server's own live sandboxes reserve on each host.
    pub async fn reserved_by_host(&self) -> Result<BTreeMap<String, (i64, i64)>, DbError> {
        let rows = sqlx::query(
            "SELECT host_id, CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus, \
             CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS memory_mib FROM sandboxes \
             WHERE host_id IS NOT NULL \
             AND state IN ('creating', 'running', 'pausing', 'resuming') GROUP BY host_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut reserved = BTreeMap::new();
        for row in rows {
            let host: String = row.try_get("host_id")?;
            reserved.insert(host, (row.try_get("vcpus")?, row.try_get("memory_mib")?));
        }
        Ok(reserved)
    }

    /// How many sandboxes are in each state (for /metrics).
    pub async fn count_sandboxes_by_state(&self) -> Result<BTreeMap<String, i64>, DbError> {
        let rows = sqlx::query(
            "SELECT state, CAST(COUNT(*) AS BIGINT) AS n FROM sandboxes GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut counts = BTreeMap::new();
        for row in rows {
            counts.insert(row.try_get("state")?, row.try_get("n")?);
        }
        Ok(counts)
    }
}

enum Bind {
    Text(String),
    Int(i64),
}
