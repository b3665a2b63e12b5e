//! The `process.Process` Connect service.
use std::sync::Arc;

use crate::state::Shared;

/// Adds the process service to `router`.
pub fn register(router: connectrpc::Router, _shared: Arc<Shared>) -> connectrpc::Router {
    router
}
