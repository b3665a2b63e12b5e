//! `wrenn server`: the control plane. A REST API (`/v1/...`, see `openapi.yaml`) over one or
//! many host agents, its state in PostgreSQL or SQLite, and a reconciler that keeps the
//! database in line with what the agents report.
//!
//! The lead's CLI uses [`ServerConfig`], [`Server::start`], [`Server::router`], [`serve`],
//! [`keys::create`] and [`openapi::yaml`].

pub mod agents;
pub mod api;
pub mod db;
pub mod e2b;
pub mod error;
mod expiry;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod placement;
mod proxy;
pub mod reconciler;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use db::Db;

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the REST API listens (default 127.0.0.1:8080).
    pub listen: SocketAddr,
    /// `postgres://user:pass@host/db` or `sqlite:///path/to/wrenn.db`.
    pub database_url: String,
    /// How often the reconciler compares the database with the agents.
    pub reconcile_interval: Duration,
    /// A host without a heartbeat for this long is unreachable.
    pub host_grace: Duration,
    /// The largest file upload accepted.
    pub max_upload_bytes: u64,
    /// What agents present (`Authorization: Bearer`) with their heartbeats. Empty: every
    /// heartbeat is refused.
    pub join_token: String,
    /// With a domain, `{port}-{sandbox_id}.{domain}` reaches sandbox ports (the proxy).
    pub domain: Option<String>,
}

impl ServerConfig {
    /// The defaults, for a database at `database_url`.
    pub fn new(database_url: impl Into<String>) -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: database_url.into(),
            reconcile_interval: Duration::from_secs(30),
            host_grace: Duration::from_secs(90),
            max_upload_bytes: 1 << 30,
            join_token: String::new(),
            domain: None,
        }
    }
}

/// A sandbox's whereabouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub sandbox_id: String,
    pub state: String,
    pub host_id: Option<String>,
    /// The agent's base URL (`http://10.0.0.5:5008`).
    pub host_address: Option<String>,
    /// The host is `ready` (not unreachable).
    pub host_ready: bool,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// What the handlers and the reconciler share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub db: Db,
    pub config: ServerConfig,
    pub agents: agents::Agents,
    pub metrics: metrics::Metrics,
}

/// A started control plane: database connected and migrated, reconciler running.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// The reconciler and the timeout pauser.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Connects to the database, applies migrations and starts the reconciler.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let db = Db::connect(&config.database_url).await?;
        let shared = Arc::new(Shared {
            db,
            config,
            agents: agents::Agents::default(),
            metrics: metrics::Metrics::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let reconciler = tokio::spawn(reconciler::run(shared.clone(), stopped.clone()));
        let expiry = tokio::spawn(expiry::run(shared.clone(), stopped));
        tracing::info!(
            database = %shared.db.backend_name(),
            reconcile_interval_s = shared.config.reconcile_interval.as_secs(),
            "control plane started"
        );
        Ok(Server {
            shared,
            stop,
            tasks: vec![reconciler, expiry],
        })
    }

    /// The REST API.
    pub fn router(&self) -> axum::Router {
        self.router_with(axum::Router::new(), axum::Router::new())
    }

    /// The REST API with more routes (e.g. the port proxy): `protected` ones require an API
    /// key, `public` ones not; all get request ids, tracing spans, metrics and JSON errors
    /// (return [`error::ApiError`] from them). A Host-header proxy that must see every path
    /// goes in as an outer layer of the result instead.
    pub fn router_with(&self, protected: axum::Router, public: axum::Router) -> axum::Router {
        api::router(self.shared.clone(), protected, public)
    }

    /// Where a sandbox runs: for the port proxy.
    pub async fn locate(&self, sandbox_id: &str) -> Result<Option<Located>, db::DbError> {
        let Some(sandbox) = self.shared.db.sandbox(sandbox_id).await? else {
            return Ok(None);
        };
        let host = match &sandbox.host_id {
            Some(host_id) => self.shared.db.host(host_id).await?,
            None => None,
        };
        Ok(Some(Located {
            sandbox_id: sandbox.id,
            state: sandbox.state,
            host_id: sandbox.host_id,
            host_address: host.as_ref().map(|h| h.address.clone()),
            host_ready: host.is_some_and(|h| h.state == db::hosts::READY),
        }))
    }

    /// Checks the API key of a request (for routes the lead serves outside [`Self::router_with`]).
    pub async fn check_api_key(&self, headers: &http::HeaderMap) -> Result<(), error::ApiError> {
        api::check_api_key(&self.shared.db, headers).await
    }

    /// The database, for tests and benches.
    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// The metrics counters.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.shared.metrics
    }

    /// One reconciler pass now (what the background task does every interval).
    pub async fn reconcile_once(&self) -> reconciler::Report {
        reconciler::reconcile_once(&self.shared).await
    }

    /// Stops the background tasks and closes the database pool.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.shared.db.close().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
