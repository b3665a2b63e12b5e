//! `/files`: download and upload, streaming.
use std::sync::Arc;

use crate::state::Shared;

/// The `/files` routes.
pub fn routes() -> axum::Router<Arc<Shared>> {
    axum::Router::new()
}
