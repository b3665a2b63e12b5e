//! The control plane's side: open a tunnel through an agent, and forward HTTP (and WebSocket)
//! requests over it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use bytes::Bytes;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::agent::header_has_token;
use crate::{CONNECT_TIMEOUT, PROTOCOL};

/// How long the agent may take to answer a tunnel request: its own connect timeout plus
/// slack.
const OPEN_TIMEOUT: Duration = Duration::from_secs(CONNECT_TIMEOUT.as_secs() + 5);
/// The most of an agent's error body read.
const ERROR_BODY_LIMIT: usize = 64 << 10;
/// What a path segment keeps unescaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_');

/// A failure to open a tunnel or to forward over one.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("agent URL {url:?} is not usable: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("cannot reach the agent at {address}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} took longer than {} s", limit.as_secs())]
    Timeout { what: String, limit: Duration },
    /// The agent refused the tunnel with a JSON error (a missing or stopped sandbox, nothing
    /// listening on the port, ...).
    #[error("{message}")]
    Agent {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("the agent at {address} does not speak the tunnel protocol: {reason}")]
    Protocol { address: String, reason: String },
    #[error("talking to the agent at {address}")]
    AgentHttp {
        address: String,
        #[source]
        source: hyper::Error,
    },
    #[error("port {port} in sandbox {sandbox_id} did not answer with HTTP/1.1")]
    Forward {
        sandbox_id: String,
        port: u16,
        #[source]
        source: hyper::Error,
    },
    #[error("port {port} in sandbox {sandbox_id} switched protocols without being asked to")]
    UnaskedUpgrade { sandbox_id: String, port: u16 },
}

impl TunnelError {
    /// The HTTP status a REST API answers this error with.
    pub fn status(&self) -> StatusCode {
        match self {
            TunnelError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            TunnelError::Connect { .. } => StatusCode::SERVICE_UNAVAILABLE,
            TunnelError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            TunnelError::Agent { status, .. } => *status,
            TunnelError::InvalidUrl { .. }
            | TunnelError::Protocol { .. }
            | TunnelError::AgentHttp { .. }
            | TunnelError::Forward { .. }
            | TunnelError::UnaskedUpgrade { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The REST error code (`invalid_request`, `unavailable`, `timeout`, `host_error`, or the
    /// agent's own).
    pub fn code(&self) -> &str {
        match self {
            TunnelError::InvalidRequest(_) => "invalid_request",
            TunnelError::Connect { .. } => "unavailable",
            TunnelError::Timeout { .. } => "timeout",
            TunnelError::Agent { code, .. } => code,
            TunnelError::InvalidUrl { .. }
            | TunnelError::Protocol { .. }
            | TunnelError::AgentHttp { .. }
            | TunnelError::Forward { .. }
            | TunnelError::UnaskedUpgrade { .. } => "host_error",
        }
    }
}

/// An open tunnel: a byte stream to one port in one sandbox.
pub struct Tunnel {
    io: TokioIo<Upgraded>,
    sandbox_id: String,
    port: u16,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("sandbox_id", &self.sandbox_id)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Where an agent (or the control plane) is: from its base URL (`http://host:port[/prefix]`).
#[derive(Debug, Clone)]
pub struct HttpUrl {
    /// For connecting: host without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// For the Host header and messages.
    pub authority: String,
    /// The URL's path without its trailing slash (routes go under it).
    pub prefix: String,
}

impl HttpUrl {
    /// Parses a plain `http://host[:port][/prefix]` base URL (the agents and the control plane
    /// speak HTTP/1.1 without TLS to each other).
    pub fn parse(url: &str) -> Result<HttpUrl, TunnelError> {
        let bad = |reason: &str| TunnelError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(bad("only http:// is supported")),
            None => return Err(bad("missing http://")),
        }
        let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(HttpUrl {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// The JSON error body of the agent.
#[derive(serde::Deserialize)]
struct AgentErrorBody {
    code: String,
    message: String,
}

/// Opens a tunnel to `port` in `sandbox_id` through the agent at `agent_base_url`
/// (`http://host:port`). The agent's refusals (no such sandbox, not running, nothing listens)
/// come back as [`TunnelError::Agent`] with its status, code and message.
pub async fn open(
    agent_base_url: &str,
    sandbox_id: &str,
    port: u16,
) -> Result<Tunnel, TunnelError> {
    let agent = HttpUrl::parse(agent_base_url)?;
    if sandbox_id.is_empty() {
        return Err(TunnelError::InvalidRequest(
            "the sandbox id is empty".into(),
        ));
    }
    let address = agent.authority.clone();
    let stream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((agent.host.as_str(), agent.port)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(TunnelError::Connect { address, source }),
        Err(_) => {
            return Err(TunnelError::Timeout {
                what: format!("connecting to the agent at {address}"),
                limit: CONNECT_TIMEOUT,
            });
        }
    };
    let _ = stream.set_nodelay(true);
    let http_error = |source| TunnelError::AgentHttp {
        address: address.clone(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel connection to the agent failed");
        }
    });
    let path = format!(
        "{}/v1/tunnel/{}/{port}",
        agent.prefix,
        utf8_percent_encode(sandbox_id, SEGMENT)
    );
    let request = http::Request::get(path)
        .header(HOST, &agent.authority)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, PROTOCOL)
        .body(Empty::<Bytes>::new())
        .map_err(|e| TunnelError::InvalidRequest(format!("building the tunnel request: {e}")))?;
    let what = || format!("opening a tunnel to port {port} in sandbox {sandbox_id} via {address}");
    let response = tokio::time::timeout(OPEN_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| TunnelError::Timeout {
            what: what(),
            limit: OPEN_TIMEOUT,
        })?
        .map_err(http_error)?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if !header_has_token(response.headers(), &UPGRADE, PROTOCOL) {
            return Err(TunnelError::Protocol {
                address,
                reason: "101 without `Upgrade: wrenn-tunnel`".into(),
            });
        }
        let upgraded = tokio::time::timeout(OPEN_TIMEOUT, hyper::upgrade::on(response))
            .await
            .map_err(|_| TunnelError::Timeout {
                what: what(),
                limit: OPEN_TIMEOUT,
            })?
            .map_err(http_error)?;
        return Ok(Tunnel {
            io: TokioIo::new(upgraded),
            sandbox_id: sandbox_id.to_owned(),
            port,
        });
    }
    let status = response.status();
    let body = tokio::time::timeout(
        OPEN_TIMEOUT,
        Limited::new(response.into_body(), ERROR_BODY_LIMIT).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|c| c.to_bytes())
    .unwrap_or_default();
    match serde_json::from_slice::<AgentErrorBody>(&body) {
        Ok(error) => Err(TunnelError::Agent {
            status,
            code: error.code,
            message: error.message,
        }),
        Err(_) => Err(TunnelError::Protocol {
            address,
            reason: format!(
                "it answered {status} with {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        }),
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1), besides those a
/// `Connection` header names.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers of `headers`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Adds `X-Forwarded-For` (the client's address appended), `-Proto` and `-Host` (kept when a
/// proxy in front already set them).
fn add_forwarded(headers: &mut HeaderMap, peer: Option<SocketAddr>) {
    let xff = HeaderName::from_static("x-forwarded-for");
    if let Some(peer) = peer {
        let ip = peer.ip().to_string();
        let value = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(earlier) if !earlier.trim().is_empty() => format!("{earlier}, {ip}"),
            _ => ip,
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(xff, value);
        }
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&proto) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
    let forwarded_host = HeaderName::from_static("x-forwarded-host");
    if !headers.contains_key(&forwarded_host)
        && let Some(host) = headers.get(HOST).cloned()
    {
        headers.insert(forwarded_host, host);
    }
}

/// Sends `req` over `tunnel` as HTTP/1.1 to `path_and_query` (`/path?query`) and streams the
/// answer back. The method, the headers (minus hop-by-hop ones, plus `X-Forwarded-For`,
/// `-Proto`, `-Host`) and the body (streamed) are kept. When `req` asks for an upgrade (a
/// WebSocket) and the sandbox answers `101`, the client's and the sandbox's upgraded
/// connections are joined once the returned `101` has been sent.
///
/// `X-Forwarded-For` needs the client's address as axum's `ConnectInfo<SocketAddr>`
/// (served with `into_make_service_with_connect_info`); without it the header is kept as is.
/// Every other header goes to the sandbox, which runs untrusted code: the caller removes the
/// credentials meant for itself (`Authorization`, `X-API-Key`, cookies) first.
pub async fn forward_http(
    tunnel: Tunnel,
    mut req: Request,
    path_and_query: &str,
) -> Result<Response, TunnelError> {
    let path: PathAndQuery = path_and_query
        .parse()
        .ok()
        .filter(|p: &PathAndQuery| p.path().starts_with('/'))
        .ok_or_else(|| {
            TunnelError::InvalidRequest(format!("{path_and_query:?} is not a path and query"))
        })?;
    let Tunnel {
        io,
        sandbox_id,
        port,
    } = tunnel;
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let wants_upgrade = header_has_token(req.headers(), &CONNECTION, "upgrade")
        && req.headers().contains_key(UPGRADE);
    let client_upgrade = if wants_upgrade {
        req.extensions_mut().remove::<OnUpgrade>()
    } else {
        None
    };
    let upgrade_protocol = req.headers().get(UPGRADE).cloned();

    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if let (Some(_), Some(protocol)) = (&client_upgrade, upgrade_protocol) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
    }
    add_forwarded(&mut headers, peer);
    if !headers.contains_key(HOST) {
        headers.insert(HOST, HeaderValue::from_static("localhost"));
    }
    let mut outgoing = http::Request::new(body);
    *outgoing.method_mut() = parts.method;
    *outgoing.uri_mut() = Uri::from(path);
    *outgoing.version_mut() = Version::HTTP_11;
    *outgoing.headers_mut() = headers;

    let forward_error = |source| TunnelError::Forward {
        sandbox_id: sandbox_id.clone(),
        port,
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io.into_inner())
        .await
        .map_err(forward_error)?;
    let log_id = sandbox_id.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(sandbox_id = %log_id, port, error = %e, "forwarded connection failed");
        }
    });
    let mut response = sender.send_request(outgoing).await.map_err(forward_error)?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(TunnelError::UnaskedUpgrade { sandbox_id, port });
        };
        let sandbox_upgrade = hyper::upgrade::on(&mut response);
        let (parts, _) = response.into_parts();
        tokio::spawn(join_upgrades(
            client_upgrade,
            sandbox_upgrade,
            sandbox_id,
            port,
        ));
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Copies between the client's and the sandbox's upgraded connections until both close.
async fn join_upgrades(client: OnUpgrade, sandbox: OnUpgrade, sandbox_id: String, port: u16) {
    let (client, sandbox) = match tokio::try_join!(client, sandbox) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(sandbox_id = %sandbox_id, port, error = %e, "upgrade not completed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut sandbox = TokioIo::new(sandbox);
    match tokio::io::copy_bidirectional(&mut client, &mut sandbox).await {
        Ok((to_sandbox, from_sandbox)) => tracing::debug!(
            sandbox_id = %sandbox_id,
            port,
            to_sandbox,
            from_sandbox,
            "upgraded connection closed"
        ),
        Err(e) => tracing::debug!(
            sandbox_id = %sandbox_id,
            port,
            error = %e,
            "upgraded connection broken"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_agent_url_parses_host_port_and_prefix() {
        let url = HttpUrl::parse("http://10.0.0.5:5008").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("10.0.0.5", 5008));
        assert_eq!(url.prefix, "");
        let url = HttpUrl::parse("http://[::1]:9/agent/").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 9));
        assert_eq!(url.authority, "[::1]:9");
        assert_eq!(url.prefix, "/agent");
        assert_eq!(HttpUrl::parse("http://h").unwrap().port, 80);
        for bad in ["https://h:1", "h:1", "", "http://"] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_strip_hop_by_hop_removes_listed_and_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        headers.insert("x-kept", "2".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-kept"], "2");
    }

    #[test]
    fn test_add_forwarded_appends_client_and_keeps_earlier_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, "8080-sbx.example.com".parse().unwrap());
        headers.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        add_forwarded(&mut headers, Some("10.0.0.9:555".parse().unwrap()));
        assert_eq!(headers["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "8080-sbx.example.com");
    }
}
