//! Clients for the host agents (`hostagent.v1` over Connect), one per agent address, and the
//! mapping of their errors onto the REST API's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use connectrpc::{ConnectError, ErrorCode};
use wrenn_proto::hostagent::v1::HostAgentClient;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// A client of one agent.
pub type Client = HostAgentClient<HttpClient>;

/// Calls that boot or write memory (create, resume, pause, snapshot) can take a while.
pub const SLOW: Duration = Duration::from_secs(180);
/// Streamed file transfers: as long as the bytes keep coming (a large file over a slow link
/// takes minutes).
pub const TRANSFER: Duration = Duration::from_secs(3600);
/// Everything else.
pub const FAST: Duration = Duration::from_secs(30);

/// The agents' clients, made on first use and kept per address.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    clients: Arc<Mutex<HashMap<String, ClientEntry>>>,
}

#[derive(Clone)]
struct ClientEntry(Client);

impl std::fmt::Debug for ClientEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostAgentClient")
    }
}

impl Agents {
    /// The client for the agent at `address` (`http://host:port`).
    pub fn client(&self, address: &str) -> Result<Client, ApiError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| ApiError::internal("the agent client table is poisoned"))?;
        if let Some(entry) = clients.get(address) {
            return Ok(entry.0.clone());
        }
        let uri = address.parse().map_err(|e| {
            ApiError::host_error(format!("the host's address {address:?} is not a URL: {e}"))
        })?;
        let client = HostAgentClient::new(HttpClient::plaintext(), ClientConfig::new(uri));
        clients.insert(address.to_owned(), ClientEntry(client.clone()));
        Ok(client)
    }
}

/// Call options with a deadline.
pub fn options(timeout: Duration) -> CallOptions {
    CallOptions::default().with_timeout(timeout)
}

/// Times an agent call into the metrics (`method` is the RPC's name).
pub async fn timed<T>(
    metrics: &Metrics,
    method: &'static str,
    call: impl Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    let start = Instant::now();
    let result = call.await;
    metrics.agent_call(method, start.elapsed(), result.is_ok());
    result
}

/// What the REST API answers for an agent's error, keeping the agent's message.
pub fn map_error(error: &ConnectError, what: &str) -> ApiError {
    let message = match &error.message {
        Some(message) if !message.is_empty() => format!("{what}: {message}"),
        _ => format!("{what}: the host agent answered {:?}", error.code),
    };
    match error.code {
        ErrorCode::NotFound => ApiError::not_found(message),
        ErrorCode::InvalidArgument | ErrorCode::OutOfRange => ApiError::bad_request(message),
        ErrorCode::AlreadyExists | ErrorCode::FailedPrecondition | ErrorCode::Aborted => {
            ApiError::conflict(message)
        }
        ErrorCode::ResourceExhausted | ErrorCode::Unavailable => ApiError::unavailable(message),
        ErrorCode::DeadlineExceeded => ApiError::timeout(message),
        ErrorCode::PermissionDenied => ApiError::permission_denied(message),
        _ => ApiError::host_error(message),
    }
}
