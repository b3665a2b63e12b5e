//! The `api_keys` table: only SHA-256 hashes of keys are stored, with a display prefix.

use sqlx::Row;

use super::{Db, DbError, now_ms};

/// One stored key (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRow {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl Db {
    pub async fn insert_api_key(
        &self,
        id: &str,
        name: &str,
        prefix: &str,
        hash: &str,
        created_at: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(prefix)
        .bind(hash)
        .bind(created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The id of the live key with this hash, marking it used.
    pub async fn use_api_key(&self, hash: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT id FROM api_keys WHERE hash = $1 AND revoked_at IS NULL")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let id: String = row.try_get("id")?;
        // At most one write a minute per key, not one per request.
        let now = now_ms();
        sqlx::query(
            "UPDATE api_keys SET last_used_at = $2 WHERE id = $1 \
             AND (last_used_at IS NULL OR last_used_at < $3)",
        )
        .bind(&id)
        .bind(now)
        .bind(now - 60_000)
        .execute(&self.pool)
        .await?;
        Ok(Some(id))
    }

    /// Live (unrevoked) keys, oldest first.
    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRow>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, prefix, created_at, last_used_at, revoked_at FROM api_keys \
             WHERE revoked_at IS NULL ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ApiKeyRow {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    prefix: row.try_get("prefix")?,
                    created_at: row.try_get("created_at")?,
                    last_used_at: row.try_get("last_used_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    /// Revokes a key; false when there is no live key with that id.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool, DbError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}
