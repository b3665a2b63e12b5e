//! The `events` table: an audit line for every state change the server or its reconciler made.

use sqlx::Row;

use super::{Db, DbError, now_ms};

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub at: i64,
    pub kind: String,
    pub sandbox_id: Option<String>,
    pub host_id: Option<String>,
    pub detail: String,
    pub request_id: Option<String>,
}

impl Db {
    pub async fn record_event(
        &self,
        kind: &str,
        sandbox_id: Option<&str>,
        host_id: Option<&str>,
        detail: &str,
        request_id: Option<&str>,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO events (at, kind, sandbox_id, host_id, detail, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(now_ms())
        .bind(kind)
        .bind(sandbox_id)
        .bind(host_id)
        .bind(detail)
        .bind(request_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest `limit` events, newest first (for tests and operators).
    pub async fn events(&self, limit: i64) -> Result<Vec<EventRow>, DbError> {
        let rows = sqlx::query(
            "SELECT at, kind, sandbox_id, host_id, detail, request_id FROM events \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(EventRow {
                    at: row.try_get("at")?,
                    kind: row.try_get("kind")?,
                    sandbox_id: row.try_get("sandbox_id")?,
                    host_id: row.try_get("host_id")?,
                    detail: row.try_get("detail")?,
                    request_id: row.try_get("request_id")?,
                })
            })
            .collect()
    }
}
