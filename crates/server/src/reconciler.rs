//! The reconciler: keeps the database in line with what the hosts report.
//!
//! Every pass: hosts without a heartbeat for the grace period become `unreachable` and their
//! running sandboxes `lost`; each ready host's `ListSandboxes` corrects the states of the
//! sandboxes recorded on it, and its `ListSnapshots` refreshes the templates it holds. Every
//! correction is logged, recorded as an event and counted in `/metrics`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use wrenn_proto::hostagent::v1 as pb;
use wrenn_proto::hostagent::v1::SandboxState;

use crate::Shared;
use crate::agents::{FAST, options, timed};
use crate::db::hosts::{HostRow, READY};
use crate::db::sandboxes::{SandboxRow, state};
use crate::db::{duration_ms, now_ms};

/// A creating / pausing / resuming / stopping sandbox older than this is stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(300);

/// One state the reconciler corrected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    pub sandbox_id: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Hosts this pass marked unreachable.
    pub hosts_unreachable: Vec<String>,
    pub corrections: Vec<Correction>,
    /// Sandboxes a host still had although they are stopped here, destroyed on it.
    pub orphans_destroyed: Vec<String>,
    /// Hosts that could not be asked, with why.
    pub errors: Vec<String>,
}

/// Runs a pass every `reconcile_interval` until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(shared.config.reconcile_interval) => {
                let report = reconcile_once(&shared).await;
                if !report.errors.is_empty() {
                    tracing::warn!(errors = ?report.errors, "reconciler could not reach some hosts");
                }
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// One pass over every host.
pub(crate) async fn reconcile_once(shared: &Shared) -> Report {
    let mut report = Report::default();
    let cutoff = now_ms().saturating_sub(duration_ms(shared.config.host_grace));
    match shared.db.mark_stale_hosts(cutoff).await {
        Ok(stale) => {
            for host_id in stale {
                tracing::warn!(host_id = %host_id, "host unreachable: no heartbeat within the grace period");
                shared.metrics.correction("host_unreachable");
                let _ = shared
                    .db
                    .record_event(
                        "host_unreachable",
                        None,
                        Some(&host_id),
                        "no heartbeat",
                        None,
                    )
                    .await;
                match shared
                    .db
                    .sandboxes_on_host(&host_id, &[state::RUNNING])
                    .await
                {
                    Ok(rows) => {
                        for row in rows {
                            let reason = format!("its host {host_id} stopped sending heartbeats");
                            correct(shared, &mut report, &row, state::LOST, &reason).await;
                        }
                    }
                    Err(error) => report.errors.push(format!("{host_id}: {error}")),
                }
                report.hosts_unreachable.push(host_id);
            }
        }
        Err(error) => report.errors.push(format!("marking stale hosts: {error}")),
    }
    let stuck_before = now_ms().saturating_sub(duration_ms(STUCK_AFTER));
    match shared.db.stuck_unplaced(stuck_before).await {
        Ok(rows) => {
            for row in rows {
                let reason = "its create stopped before a host was chosen";
                correct(shared, &mut report, &row, state::STOPPED, reason).await;
            }
        }
        Err(error) => report.errors.push(format!("stuck creates: {error}")),
    }
    let hosts = match shared.db.hosts().await {
        Ok(hosts) => hosts,
        Err(error) => {
            report.errors.push(format!("listing hosts: {error}"));
            return report;
        }
    };
    for host in hosts.into_iter().filter(|h| h.state == READY) {
        if let Err(error) = sync_host(shared, &mut report, &host).await {
            report.errors.push(format!("{}: {error}", host.id));
        }
    }
    report
}

/// Applies a correction if the row is still in the state it was read in.
async fn correct(shared: &Shared, report: &mut Report, row: &SandboxRow, to: &str, reason: &str) {
    let error = (to == state::STOPPED || to == state::ERROR || to == state::LOST).then_some(reason);
    match shared
        .db
        .transition_sandbox(&row.id, &[row.state.as_str()], to, error)
        .await
    {
        Ok(true) => {
            tracing::info!(sandbox_id = %row.id, from = %row.state, to, reason, "reconciler corrected a sandbox");
            shared.metrics.correction(&format!("{}_to_{to}", row.state));
            let detail = format!("{} -> {to}: {reason}", row.state);
            let _ = shared
                .db
                .record_event(
                    "reconciled",
                    Some(&row.id),
                    row.host_id.as_deref(),
                    &detail,
                    None,
                )
                .await;
            report.corrections.push(Correction {
                sandbox_id: row.id.clone(),
                from: row.state.clone(),
                to: to.to_owned(),
                reason: reason.to_owned(),
            });
        }
        Ok(false) => {}
        Err(error) => report.errors.push(format!("{}: {error}", row.id)),
    }
}

async fn sync_host(shared: &Shared, report: &mut Report, host: &HostRow) -> Result<(), String> {
    let client = shared.agents.client(&host.address).map_err(|e| e.message)?;
    let listed = timed(
        &shared.metrics,
        "ListSandboxes",
        client.list_sandboxes_with_options(pb::ListSandboxesRequest::default(), options(FAST)),
    )
    .await
    .map_err(|e| format!("ListSandboxes: {e}"))?
    .into_owned();
    let on_agent: HashMap<String, pb::Sandbox> = listed
        .sandboxes
        .into_iter()
        .map(|s| (s.sandbox_id.clone(), s))
        .collect();
    let rows = shared
        .db
        .sandboxes_on_host(
            &host.id,
            &[
                state::RUNNING,
                state::LOST,
                state::PAUSED,
                state::CREATING,
                state::PAUSING,
                state::RESUMING,
                state::STOPPING,
            ],
        )
        .await
        .map_err(|e| e.to_string())?;
    let now = now_ms();
    let stuck_before = now.saturating_sub(duration_ms(STUCK_AFTER));
    let live_rows: std::collections::HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
    for row in rows {
        let stuck = row.updated_at < stuck_before;
        let transitional = matches!(
            row.state.as_str(),
            state::CREATING | state::PAUSING | state::RESUMING | state::STOPPING
        );
        if transitional && !stuck {
            continue;
        }
        let agent = on_agent.get(&row.id);
        let agent_state = agent.and_then(|s| s.state.as_known());
        match agent_state {
            Some(SandboxState::SANDBOX_STATE_RUNNING) => {
                if row.state != state::RUNNING {
                    let reason = format!("its host {} lists it running", host.id);
                    correct(shared, report, &row, state::RUNNING, &reason).await;
                }
            }
            Some(SandboxState::SANDBOX_STATE_PAUSED) => {
                if row.state != state::PAUSED {
                    let reason = format!("its host {} lists it paused", host.id);
                    correct(shared, report, &row, state::PAUSED, &reason).await;
                }
            }
            Some(SandboxState::SANDBOX_STATE_ERROR) => {
                let why = agent.map(|s| s.error.clone()).unwrap_or_default();
                let reason = format!("its host {} reports an error: {why}", host.id);
                correct(shared, report, &row, state::ERROR, &reason).await;
            }
            Some(SandboxState::SANDBOX_STATE_STOPPED) | None => {
                // A paused sandbox lives in storage; an agent not listing it proves nothing.
                if row.state == state::PAUSED && agent.is_none() {
                    continue;
                }
                let reason = if row.expires_at.is_some_and(|at| at <= now) {
                    "reaped by its host: timeout".to_owned()
                } else if transitional {
                    format!("stuck in {} and its host does not run it", row.state)
                } else if let Some(listed) = agent {
                    // The agent says why (a VMM that died behind its back, ...).
                    let why = if listed.error.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", listed.error)
                    };
                    format!("its host {} lists it stopped{why}", host.id)
                } else {
                    format!("its host {} no longer has it", host.id)
                };
                correct(shared, report, &row, state::STOPPED, &reason).await;
                if agent.is_some() {
                    // The agent keeps a stopped sandbox's record until it is destroyed.
                    let request = pb::DestroySandboxRequest {
                        sandbox_id: row.id.clone(),
                        ..Default::default()
                    };
                    if let Err(e) = client
                        .destroy_sandbox_with_options(request, options(FAST))
                        .await
                    {
                        tracing::warn!(sandbox_id = %row.id, host_id = %host.id, error = %e, "could not remove a stopped sandbox from its host");
                    }
                }
            }
            // Mid-transition on the agent: look again next pass.
            Some(_) => {}
        }
    }
    // Sandboxes the host still runs or keeps although the database has them stopped (deleted
    // while the host was unreachable, say): nobody can reach them through the API any more.
    for (id, listed) in &on_agent {
        let alive = matches!(
            listed.state.as_known(),
            Some(SandboxState::SANDBOX_STATE_RUNNING | SandboxState::SANDBOX_STATE_PAUSED)
        );
        if !alive || live_rows.contains(id) {
            continue;
        }
        let stopped = matches!(
            shared.db.sandbox(id).await,
            Ok(Some(row)) if row.state == state::STOPPED || row.state == state::ERROR
        );
        if !stopped {
            // Not ours (made on the agent directly), or on another host in the database.
            continue;
        }
        let request = pb::DestroySandboxRequest {
            sandbox_id: id.clone(),
            ..Default::default()
        };
        match client
            .destroy_sandbox_with_options(request, options(FAST))
            .await
        {
            Ok(_) => {
                tracing::warn!(sandbox_id = %id, host_id = %host.id, "destroyed a sandbox its host still had after it was stopped here");
                shared.metrics.correction("orphan_destroyed");
                let _ = shared
                    .db
                    .record_event(
                        "orphan_destroyed",
                        Some(id),
                        Some(&host.id),
                        "stopped in the database, still on its host",
                        None,
                    )
                    .await;
                report.orphans_destroyed.push(id.clone());
            }
            Err(e) => {
                report.errors.push(format!("destroying orphan {id}: {e}"));
            }
        }
    }
    let snapshots = timed(
        &shared.metrics,
        "ListSnapshots",
        client.list_snapshots_with_options(pb::ListSnapshotsRequest::default(), options(FAST)),
    )
    .await
    .map_err(|e| format!("ListSnapshots: {e}"))?
    .into_owned();
    let mut names = Vec::new();
    for snapshot in &snapshots.snapshots {
        let row = crate::api::snapshots::row_of(snapshot);
        shared
            .db
            .upsert_template(&row, &host.id)
            .await
            .map_err(|e| e.to_string())?;
        names.push(row.name);
    }
    let dropped = shared
        .db
        .retain_host_templates(&host.id, &names)
        .await
        .map_err(|e| e.to_string())?;
    for name in dropped {
        tracing::info!(host_id = %host.id, template = %name, "template gone from its host");
    }
    Ok(())
}
