//! The `hosts` table: registered by heartbeats, marked unreachable by the reconciler.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Db, DbError, now_ms};

pub const READY: &str = "ready";
pub const UNREACHABLE: &str = "unreachable";

/// One registered host agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub id: String,
    pub address: String,
    pub state: String,
    pub version: String,
    pub vcpus_total: i64,
    pub memory_mib_total: i64,
    pub vcpus_used: i64,
    pub memory_mib_used: i64,
    pub sandboxes_running: i64,
    pub storage: Option<String>,
    pub last_heartbeat_at: i64,
    pub registered_at: i64,
}

const COLUMNS: &str = "id, address, state, version, vcpus_total, memory_mib_total, vcpus_used, \
     memory_mib_used, sandboxes_running, storage, last_heartbeat_at, registered_at";

fn from_row(row: &AnyRow) -> Result<HostRow, DbError> {
    Ok(HostRow {
        id: row.try_get("id")?,
        address: row.try_get("address")?,
        state: row.try_get("state")?,
        version: row.try_get("version")?,
        vcpus_total: row.try_get("vcpus_total")?,
        memory_mib_total: row.try_get("memory_mib_total")?,
        vcpus_used: row.try_get("vcpus_used")?,
        memory_mib_used: row.try_get("memory_mib_used")?,
        sandboxes_running: row.try_get("sandboxes_running")?,
        storage: row.try_get("storage")?,
        last_heartbeat_at: row.try_get("last_heartbeat_at")?,
        registered_at: row.try_get("registered_at")?,
    })
}

impl Db {
    /// Registers or refreshes a host from its heartbeat (it is `ready` again); true when the
    /// host had been unreachable or was new.
    pub async fn upsert_host(&self, host: &HostRow) -> Result<bool, DbError> {
        // Only for the "became ready" signal: no transaction (one upsert is atomic itself).
        let previous: Option<String> = sqlx::query("SELECT state FROM hosts WHERE id = $1")
            .bind(&host.id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get("state"))
            .transpose()?;
        sqlx::query(&format!(
            "INSERT INTO hosts ({COLUMNS}) VALUES \
             ($1, $2, 'ready', $3, $4, $5, $6, $7, $8, $9, $10, $10) \
             ON CONFLICT (id) DO UPDATE SET address = $2, state = 'ready', version = $3, \
             vcpus_total = $4, memory_mib_total = $5, vcpus_used = $6, memory_mib_used = $7, \
             sandboxes_running = $8, storage = $9, last_heartbeat_at = $10"
        ))
        .bind(&host.id)
        .bind(&host.address)
        .bind(&host.version)
        .bind(host.vcpus_total)
        .bind(host.memory_mib_total)
        .bind(host.vcpus_used)
        .bind(host.memory_mib_used)
        .bind(host.sandboxes_running)
        .bind(host.storage.as_deref())
        .bind(host.last_heartbeat_at)
        .execute(&self.pool)
        .await?;
        Ok(previous.as_deref() != Some(READY))
    }

    pub async fn host(&self, id: &str) -> Result<Option<HostRow>, DbError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM hosts WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn hosts(&self) -> Result<Vec<HostRow>, DbError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM hosts ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Marks `ready` hosts whose last heartbeat is older than `cutoff_ms` unreachable and
    /// returns their ids.
    pub async fn mark_stale_hosts(&self, cutoff_ms: i64) -> Result<Vec<String>, DbError> {
        let mut tx = self.pool.begin().await?;
        let rows =
            sqlx::query("SELECT id FROM hosts WHERE state = 'ready' AND last_heartbeat_at < $1")
                .bind(cutoff_ms)
                .fetch_all(&mut *tx)
                .await?;
        let mut ids = Vec::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            let done = sqlx::query(
                "UPDATE hosts SET state = 'unreachable' WHERE id = $1 AND state = 'ready' \
                 AND last_heartbeat_at < $2",
            )
            .bind(&id)
            .bind(cutoff_ms)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                ids.push(id);
            }
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Forgets a host; false when it still has live sandboxes (or does not exist: see `host`).
    pub async fn delete_host(&self, id: &str) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let live: i64 = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM sandboxes WHERE host_id = $1 \
             AND state NOT IN ('stopped', 'error')",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if live > 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM template_hosts WHERE host_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Test and bench helper: pretend a host's last heartbeat was at `at_ms`.
    pub async fn set_host_heartbeat(&self, id: &str, at_ms: i64) -> Result<(), DbError> {
        sqlx::query("UPDATE hosts SET last_heartbeat_at = $2 WHERE id = $1")
            .bind(id)
            .bind(at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// A fresh row for a heartbeat received now.
pub fn heartbeat_row(id: String, address: String, version: String) -> HostRow {
    let now = now_ms();
    HostRow {
        id,
        address,
        state: READY.into(),
        version,
        vcpus_total: 0,
        memory_mib_total: 0,
        vcpus_used: 0,
        memory_mib_used: 0,
        sandboxes_running: 0,
        storage: None,
        last_heartbeat_at: now,
        registered_at: now,
    }
}
