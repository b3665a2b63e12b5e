//! Placement: which hosts may run a new sandbox, least loaded first, and where a paused
//! sandbox may resume.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::db::hosts::{HostRow, READY};
use crate::db::templates::TemplateRow;
use crate::db::{Db, duration_ms, now_ms};
use crate::error::ApiError;

/// Hosts that are `ready` with a heartbeat within `grace`.
pub async fn live_hosts(db: &Db, grace: Duration) -> Result<Vec<HostRow>, ApiError> {
    let cutoff = now_ms().saturating_sub(duration_ms(grace));
    Ok(db
        .hosts()
        .await?
        .into_iter()
        .filter(|h| h.state == READY && h.last_heartbeat_at >= cutoff)
        .collect())
}

/// The template and the hosts that can start a sandbox of it with `vcpus` and `memory_mib`
/// (0: the template's), least loaded (most free memory) first.
pub async fn candidates(
    db: &Db,
    grace: Duration,
    template: &str,
    vcpus: i64,
    memory_mib: i64,
) -> Result<(TemplateRow, Vec<HostRow>), ApiError> {
    let live = live_hosts(db, grace).await?;
    if live.is_empty() {
        return Err(ApiError::unavailable(
            "no host is ready: start a host agent that sends heartbeats to this server",
        ));
    }
    let Some(row) = db.template(template).await? else {
        return Err(ApiError::not_found(format!(
            "no template or snapshot named {template:?} (build one with `wrenn template build`)"
        )));
    };
    let all = db.hosts().await?;
    let storages: BTreeSet<&str> = all
        .iter()
        .filter(|h| row.hosts.contains(&h.id))
        .filter_map(|h| h.storage.as_deref())
        .collect();
    let holders: Vec<HostRow> = live
        .into_iter()
        .filter(|h| {
            row.hosts.contains(&h.id) || h.storage.as_deref().is_some_and(|s| storages.contains(s))
        })
        .collect();
    if holders.is_empty() {
        return Err(ApiError::unavailable(format!(
            "no ready host has template {template:?} (its hosts: {})",
            row.hosts.join(", ")
        )));
    }
    let vcpus = if vcpus > 0 { vcpus } else { row.vcpus };
    let memory_mib = if memory_mib > 0 {
        memory_mib
    } else {
        row.memory_mib
    };
    let reserved = db.reserved_by_host().await?;
    let mut fitting: Vec<(i64, i64, HostRow)> = holders
        .into_iter()
        .map(|h| {
            let (used_vcpus, used_memory) = reserved.get(&h.id).copied().unwrap_or((0, 0));
            (
                h.vcpus_total - used_vcpus,
                h.memory_mib_total - used_memory,
                h,
            )
        })
        .filter(|(free_vcpus, free_memory, _)| *free_vcpus >= vcpus && *free_memory >= memory_mib)
        .collect();
    if fitting.is_empty() {
        return Err(ApiError::unavailable(format!(
            "no host with template {template:?} has {vcpus} vCPUs and {memory_mib} MiB free"
        )));
    }
    fitting.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)).then(a.2.id.cmp(&b.2.id)));
    Ok((row, fitting.into_iter().map(|(_, _, h)| h).collect()))
}

/// Where a paused sandbox last on `host_id` may resume: that host if live, else a live host
/// sharing its storage.
pub async fn resume_host(db: &Db, grace: Duration, host_id: &str) -> Result<HostRow, ApiError> {
    let live = live_hosts(db, grace).await?;
    if let Some(host) = live.iter().find(|h| h.id == host_id) {
        return Ok(host.clone());
    }
    let storage = db.host(host_id).await?.and_then(|h| h.storage);
    if let Some(storage) = storage
        && let Some(host) = live
            .into_iter()
            .find(|h| h.storage.as_deref() == Some(storage.as_str()))
    {
        return Ok(host);
    }
    Err(ApiError::unavailable(format!(
        "the sandbox's host {host_id} is unreachable and no ready host shares its storage"
    )))
}

/// The sandbox's host if it is live.
pub async fn live_host(
    db: &Db,
    grace: Duration,
    host_id: Option<&str>,
) -> Result<HostRow, ApiError> {
    let Some(host_id) = host_id else {
        return Err(ApiError::conflict("the sandbox has no host yet"));
    };
    live_hosts(db, grace)
        .await?
        .into_iter()
        .find(|h| h.id == host_id)
        .ok_or_else(|| {
            ApiError::unavailable(format!("the sandbox's host {host_id} is unreachable"))
        })
}
