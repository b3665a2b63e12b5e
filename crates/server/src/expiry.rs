//! Sandboxes whose timeout pauses them instead of killing them (`on_timeout: pause`, E2B's
//! `autoPause`). Their agents are given no timeout; this server keeps the time and pauses each
//! one once its `expires_at` has passed, checking every second. Several replicas may look at
//! once: the pause's guarded state change lets exactly one of them do it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use tokio::sync::watch;

use crate::Shared;
use crate::db::now_ms;
use crate::db::sandboxes::state;

const INTERVAL: Duration = Duration::from_secs(1);
/// Pauses started per pass (each takes a moment; the rest wait for the next pass).
const BATCH: i64 = 16;
/// A pause that failed is tried again this much later, not every second.
const RETRY_AFTER_MS: i64 = 30_000;

pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(INTERVAL) => {
                pause_due(&shared).await;
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// Pauses the sandboxes whose timeout has passed; returns how many it paused.
pub(crate) async fn pause_due(shared: &Arc<Shared>) -> usize {
    let due = match shared.db.due_for_pause(now_ms(), BATCH).await {
        Ok(due) => due,
        Err(error) => {
            tracing::warn!(%error, "listing sandboxes due for pausing failed");
            return 0;
        }
    };
    let mut paused = 0;
    for row in due {
        let id = row.id.clone();
        match crate::api::sandboxes::pause(State(shared.clone()), Path(id.clone())).await {
            Ok(_) => {
                paused += 1;
                tracing::info!(sandbox_id = %id, "paused on its timeout");
            }
            Err(error) => {
                // Paused, destroyed or busy meanwhile (another replica, a client) is fine;
                // one still running past its time is tried again later, not every second.
                let still_due = matches!(
                    shared.db.sandbox(&id).await,
                    Ok(Some(now)) if now.state == state::RUNNING
                );
                if !still_due {
                    tracing::debug!(sandbox_id = %id, message = %error.message, "not paused on its timeout");
                    continue;
                }
                tracing::warn!(sandbox_id = %id, status = error.status.as_u16(), message = %error.message, "pausing on its timeout failed; trying again in 30 s");
                let later = now_ms().saturating_add(RETRY_AFTER_MS);
                if let Err(error) = shared
                    .db
                    .set_sandbox_timeout(&id, row.timeout_seconds, Some(later))
                    .await
                {
                    tracing::warn!(sandbox_id = %id, %error, "postponing the pause failed");
                }
            }
        }
    }
    paused
}
