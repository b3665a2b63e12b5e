//! Timeouts, kept by this server too: every second, each running sandbox whose `expires_at`
//! has passed is paused (`on_timeout: pause`, E2B's `autoPause`; its agent is given no timeout)
//! or destroyed (`kill`; its agent reaps it as well, whichever is first, so clients see it gone
//! at once rather than at the reconciler's next pass). Several replicas may look at once: the
//! guarded state changes let exactly one of them act.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use tokio::sync::watch;

use crate::Shared;
use crate::api::sandboxes as handlers;
use crate::db::now_ms;
use crate::db::sandboxes::{SandboxRow, on_timeout, state};
use crate::error::ApiError;

const INTERVAL: Duration = Duration::from_secs(1);
/// Sandboxes handled per pass (each takes a moment; the rest wait for the next pass).
const BATCH: i64 = 16;
/// A timeout that could not be carried out is tried again this much later, not every second.
const RETRY_AFTER_MS: i64 = 30_000;

pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(INTERVAL) => {
                end_due(&shared).await;
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// Pauses or destroys the sandboxes whose timeout has passed; returns how many it handled.
pub(crate) async fn end_due(shared: &Arc<Shared>) -> usize {
    let due = match shared.db.due_for_timeout(now_ms(), BATCH).await {
        Ok(due) => due,
        Err(error) => {
            tracing::warn!(%error, "listing sandboxes past their timeout failed");
            return 0;
        }
    };
    let mut handled = 0;
    for row in due {
        let id = row.id.clone();
        let pauses = row.on_timeout == on_timeout::PAUSE;
        let outcome: Result<(), ApiError> = if pauses {
            handlers::pause(State(shared.clone()), Path(id.clone()))
                .await
                .map(|_| ())
        } else {
            handlers::destroy(State(shared.clone()), Path(id.clone()))
                .await
                .map(|_| ())
        };
        match outcome {
            Ok(()) => {
                handled += 1;
                let what = if pauses { "paused" } else { "destroyed" };
                tracing::info!(sandbox_id = %id, "{what} at its timeout");
            }
            Err(error) => postpone(shared, &row, &error).await,
        }
    }
    handled
}

/// After a failure: fine when the sandbox is no longer running (another replica, a client, its
/// agent's reaper); otherwise tried again later.
async fn postpone(shared: &Shared, row: &SandboxRow, error: &ApiError) {
    let id = &row.id;
    let still_due = matches!(
        shared.db.sandbox(id).await,
        Ok(Some(now)) if now.state == state::RUNNING
    );
    if !still_due {
        tracing::debug!(sandbox_id = %id, message = %error.message, "timeout already dealt with");
        return;
    }
    tracing::warn!(sandbox_id = %id, status = error.status.as_u16(), message = %error.message, "carrying out the timeout failed; trying again in 30 s");
    let later = now_ms().saturating_add(RETRY_AFTER_MS);
    if let Err(error) = shared
        .db
        .set_sandbox_timeout(id, row.timeout_seconds, Some(later))
        .await
    {
        tracing::warn!(sandbox_id = %id, %error, "postponing the timeout failed");
    }
}
