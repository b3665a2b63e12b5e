//! The `templates` table (templates and snapshots, learned from agents or made through the
//! API) and `template_hosts` (which hosts hold each).

use std::collections::BTreeMap;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Db, DbError};

pub const KIND_TEMPLATE: &str = "template";
pub const KIND_SNAPSHOT: &str = "snapshot";

/// One template or snapshot, with the hosts that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRow {
    pub name: String,
    pub kind: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub source_sandbox_id: Option<String>,
    pub size_bytes: i64,
    pub created_at: i64,
    pub hosts: Vec<String>,
}

const COLUMNS: &str = "name, kind, vcpus, memory_mib, source_sandbox_id, size_bytes, created_at";

fn from_row(row: &AnyRow) -> Result<TemplateRow, DbError> {
    Ok(TemplateRow {
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        vcpus: row.try_get("vcpus")?,
        memory_mib: row.try_get("memory_mib")?,
        source_sandbox_id: row.try_get("source_sandbox_id")?,
        size_bytes: row.try_get("size_bytes")?,
        created_at: row.try_get("created_at")?,
        hosts: Vec::new(),
    })
}

impl Db {
    /// Records that `host_id` holds a template (inserting or refreshing its row).
    pub async fn upsert_template(&self, row: &TemplateRow, host_id: &str) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO templates ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (name) DO UPDATE SET kind = $2, vcpus = $3, memory_mib = $4, \
             source_sandbox_id = $5, size_bytes = $6, created_at = $7"
        ))
        .bind(&row.name)
        .bind(&row.kind)
        .bind(row.vcpus)
        .bind(row.memory_mib)
        .bind(row.source_sandbox_id.as_deref())
        .bind(row.size_bytes)
        .bind(row.created_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO template_hosts (template, host_id) VALUES ($1, $2) \
             ON CONFLICT (template, host_id) DO NOTHING",
        )
        .bind(&row.name)
        .bind(host_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets that `host_id` holds the templates not in `keep`; templates no host holds any
    /// more are removed. Returns the names dropped from the host.
    pub async fn retain_host_templates(
        &self,
        host_id: &str,
        keep: &[String],
    ) -> Result<Vec<String>, DbError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("SELECT template FROM template_hosts WHERE host_id = $1")
            .bind(host_id)
            .fetch_all(&mut *tx)
            .await?;
        let mut dropped = Vec::new();
        for row in rows {
            let name: String = row.try_get("template")?;
            if !keep.contains(&name) {
                sqlx::query("DELETE FROM template_hosts WHERE template = $1 AND host_id = $2")
                    .bind(&name)
                    .bind(host_id)
                    .execute(&mut *tx)
                    .await?;
                dropped.push(name);
            }
        }
        sqlx::query(
            "DELETE FROM templates WHERE NOT EXISTS \
             (SELECT 1 FROM template_hosts h WHERE h.template = templates.name)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(dropped)
    }

    pub async fn template(&self, name: &str) -> Result<Option<TemplateRow>, DbError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM templates WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut template = from_row(&row)?;
        template.hosts =
            sqlx::query("SELECT host_id FROM template_hosts WHERE template = $1 ORDER BY host_id")
                .bind(name)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| row.try_get("host_id"))
                .collect::<Result<_, _>>()?;
        Ok(Some(template))
    }

    pub async fn templates(&self) -> Result<Vec<TemplateRow>, DbError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM templates ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        let mut templates = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let mut hosts: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in sqlx::query("SELECT template, host_id FROM template_hosts ORDER BY host_id")
            .fetch_all(&self.pool)
            .await?
        {
            hosts
                .entry(row.try_get("template")?)
                .or_default()
                .push(row.try_get("host_id")?);
        }
        for template in &mut templates {
            template.hosts = hosts.remove(&template.name).unwrap_or_default();
        }
        Ok(templates)
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), DbError> {
        sqlx::query("DELETE FROM templates WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
