//! Registration with the control plane: a background task that POSTs
//! `{server}/v1/hosts/heartbeat` at start and then every interval (10 s, or what the server's
//! answer says), with the join token and this host's capacity and use. The first heartbeat
//! registers the host; later ones keep it `ready`. A server that is down or refuses is logged
//! once per change of error and retried; the agent keeps serving meanwhile.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::manager::{Manager, chain};
use crate::sandbox::State;

/// How often heartbeats go unless the server says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// One heartbeat's time limit, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer read.
const REPLY_LIMIT: usize = 64 << 10;
/// The longest interval a server may ask for.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Where and how to heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// The control plane's base URL (`http://host:port`).
    pub server_url: String,
    /// The server's join token (sent as `Authorization: Bearer`).
    pub join_token: String,
    /// This host's id in the control plane.
    pub host_id: String,
    /// This agent's base URL as the server reaches it.
    pub advertise_url: String,
    /// The shared-storage URL (`--remote`): hosts with the same one share templates and
    /// paused sandboxes.
    pub storage: Option<String>,
    /// The first interval between heartbeats.
    pub interval: Duration,
}

/// The body of one heartbeat (the REST contract's `POST /v1/hosts/heartbeat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: String,
    pub address: String,
    pub version: String,
    pub vcpus_total: u32,
    pub memory_mib_total: u64,
    pub vcpus_used: u32,
    pub memory_mib_used: u64,
    pub sandboxes_running: u32,
    pub storage: Option<String>,
}

impl Heartbeat {
    /// This host's state now.
    pub fn now(manager: &Manager, config: &HeartbeatConfig) -> Heartbeat {
        let (vcpus_used, memory_mib_used) = manager.used();
        let running = manager
            .list()
            .iter()
            .filter(|r| r.state == State::Running)
            .count();
        Heartbeat {
            id: config.host_id.clone(),
            address: config.advertise_url.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            vcpus_total: manager.config().vcpus_total,
            memory_mib_total: manager.config().memory_mib_total,
            vcpus_used,
            memory_mib_used,
            sandboxes_running: u32::try_from(running).unwrap_or(u32::MAX),
            storage: config.storage.clone(),
        }
    }
}

/// The server's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub host_id: String,
    pub heartbeat_interval_seconds: u64,
}

/// A heartbeat that did not get through.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("server URL {url:?} is not usable: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to the control plane at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the control plane at {address}")]
    Http {
        address: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the control plane at {address} did not answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout { address: String },
    #[error("the control plane refused the heartbeat ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the control plane's answer is not a heartbeat reply: {reason}")]
    BadReply { reason: String },
}

/// Where the server is, from its base URL, and the heartbeat's path there.
struct ServerUrl {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl ServerUrl {
    fn parse(url: &str) -> Result<ServerUrl, HeartbeatError> {
        let parsed = wrenn_tunnel::HttpUrl::parse(url).map_err(|e| HeartbeatError::InvalidUrl {
            url: url.to_owned(),
            reason: match e {
                wrenn_tunnel::TunnelError::InvalidUrl { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
        Ok(ServerUrl {
            path: format!("{}/v1/hosts/heartbeat", parsed.prefix),
            host: parsed.host,
            port: parsed.port,
            authority: parsed.authority,
        })
    }
}

/// The JSON error body of the server.
#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

/// Sends one heartbeat and returns the server's answer.
pub async fn send(
    config: &HeartbeatConfig,
    heartbeat: &Heartbeat,
) -> Result<HeartbeatReply, HeartbeatError> {
    let url = ServerUrl::parse(&config.server_url)?;
    let address = url.authority.clone();
    tokio::time::timeout(REQUEST_TIMEOUT, post(&url, &config.join_token, heartbeat))
        .await
        .map_err(|_| HeartbeatError::Timeout { address })?
}

async fn post(
    url: &ServerUrl,
    token: &str,
    heartbeat: &Heartbeat,
) -> Result<HeartbeatReply, HeartbeatError> {
    let address = &url.authority;
    let http_error = |source| HeartbeatError::Http {
        address: address.clone(),
        source,
    };
    let stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|source| HeartbeatError::Connect {
            address: address.clone(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let body = serde_json::to_vec(heartbeat).map_err(|e| HeartbeatError::BadReply {
        reason: format!("encoding the heartbeat: {e}"),
    })?;
    let request = http::Request::post(&url.path)
        .header(HOST, &url.authority)
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| HeartbeatError::InvalidUrl {
            url: url.path.clone(),
            reason: e.to_string(),
        })?;
    let response = sender.send_request(request).await.map_err(http_error)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), REPLY_LIMIT)
        .collect()
        .await
        .map_err(|e| HeartbeatError::BadReply {
            reason: format!("reading it: {e}"),
        })?
        .to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorBody>(&body).map_or_else(
            |_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            |e| e.message,
        );
        return Err(HeartbeatError::Refused { status, message });
    }
    serde_json::from_slice(&body).map_err(|e| HeartbeatError::BadReply {
        reason: e.to_string(),
    })
}

/// Starts heartbeating in the background, forever (abort the handle to stop).
pub fn spawn(manager: Arc<Manager>, config: HeartbeatConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(manager, config))
}

async fn run(manager: Arc<Manager>, config: HeartbeatConfig) {
    let server = config.server_url.clone();
    let mut interval = config.interval;
    // The last failure logged, so that a server down for an hour is one line, not 360.
    let mut last_error: Option<String> = None;
    let mut registered = false;
    loop {
        let heartbeat = Heartbeat::now(&manager, &config);
        match send(&config, &heartbeat).await {
            Ok(reply) => {
                if !registered {
                    tracing::info!(%server, host_id = %reply.host_id, "registered with the control plane");
                } else if last_error.is_some() {
                    tracing::info!(%server, host_id = %reply.host_id, "the control plane answers heartbeats again");
                }
                registered = true;
                last_error = None;
                let asked = Duration::from_secs(reply.heartbeat_interval_seconds);
                if !asked.is_zero() && asked != interval {
                    interval = asked.min(MAX_INTERVAL);
                    tracing::debug!(%server, interval_s = interval.as_secs(), "heartbeat interval set by the control plane");
                }
            }
            Err(e) => {
                let text = chain(&e);
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(%server, error = %text, retry_s = interval.as_secs_f64(), "heartbeat failed; the agent keeps serving and retries");
                    last_error = Some(text);
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_server_url_joins_the_heartbeat_path() {
        let url = ServerUrl::parse("http://cp.example:8080/").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("cp.example", 8080));
        assert_eq!(url.path, "/v1/hosts/heartbeat");
        let url = ServerUrl::parse("http://[::1]/wrenn").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 80));
        assert_eq!(url.path, "/wrenn/v1/hosts/heartbeat");
        for bad in ["https://cp:1", "cp:1", ""] {
            assert!(ServerUrl::parse(bad).is_err(), "{bad:?}");
        }
    }
}
