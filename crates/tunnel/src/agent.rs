//! The agent's side: check the upgrade request, connect to the guest's port, answer 101 and
//! copy bytes both ways on the upgraded connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderName, Method, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::{CONNECT_TIMEOUT, PROTOCOL};

/// An error answered before the upgrade: `{"code": ..., "message": ...}` with `status`.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": code, "message": message.into() });
    (status, axum::Json(body)).into_response()
}

/// Whether the comma-separated header `name` holds `token` (case-insensitive), as
/// `Connection: keep-alive, Upgrade` holds `upgrade`.
pub(crate) fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `headers` ask for the tunnel (`Connection: Upgrade`, `Upgrade: wrenn-tunnel`).
pub fn is_tunnel_request(headers: &HeaderMap) -> bool {
    header_has_token(headers, &CONNECTION, "upgrade")
        && header_has_token(headers, &UPGRADE, PROTOCOL)
}

/// Serves one tunnel request: checks it, connects to `target` (the guest's port as this host
/// reaches it, within [`CONNECT_TIMEOUT`]), answers `101 Switching Protocols` and copies bytes
/// between the upgraded connection and the guest until both directions are closed; an end of
/// stream in one direction is passed on as a half-close. Errors before the upgrade are
/// answered as JSON (see [`error_response`]). `sandbox_id` names the sandbox in messages and
/// logs.
pub async fn accept(req: Request, target: SocketAddr, sandbox_id: &str) -> Response {
    accept_until(req, target, sandbox_id, std::future::pending()).await
}

/// [`accept`], with the tunnel cut (both connections closed) when `ended` completes: the
/// agent passes "the sandbox stopped or paused", since a guest that vanishes sends neither a
/// FIN nor a reset and a stream through the tunnel would otherwise wait forever.
pub async fn accept_until(
    mut req: Request,
    target: SocketAddr,
    sandbox_id: &str,
    ended: impl Future<Output = ()> + Send + 'static,
) -> Response {
    let port = target.port();
    if req.method() != Method::GET {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a tunnel is opened with GET",
        );
    }
    if !is_tunnel_request(req.headers()) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("a tunnel needs the headers `Connection: Upgrade` and `Upgrade: {PROTOCOL}`"),
        );
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "this connection cannot be upgraded (a tunnel needs HTTP/1.1)",
        );
    };
    let guest = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::debug!(sandbox_id = %sandbox_id, port, "tunnel refused: nothing listens");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "host_error",
                format!("nothing listens on port {port} in sandbox {sandbox_id}"),
            );
        }
        Ok(Err(e)) => {
            tracing::debug!(sandbox_id = %sandbox_id, port, error = %e, "tunnel cannot connect");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "host_error",
                format!("cannot connect to port {port} in sandbox {sandbox_id}: {e}"),
            );
        }
        Err(_) => {
            tracing::debug!(sandbox_id = %sandbox_id, port, "tunnel connect timed out");
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "port {port} in sandbox {sandbox_id} did not accept a connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            );
        }
    };
    let _ = guest.set_nodelay(true);
    tokio::spawn(copy(on_upgrade, guest, sandbox_id.to_owned(), port, ended));
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Waits for the upgrade, then copies both ways until both sides have closed or `ended`
/// completes.
async fn copy(
    on_upgrade: OnUpgrade,
    guest: TcpStream,
    sandbox_id: String,
    port: u16,
    ended: impl Future<Output = ()> + Send + 'static,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(sandbox_id = %sandbox_id, port, error = %e, "tunnel client left before the upgrade");
            return;
        }
    };
    let started = Instant::now();
    let mut client = Counted::new(TokioIo::new(upgraded));
    let mut guest = Counted::new(guest);
    let result = tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut guest) => result,
        () = ended => Err(io::Error::other("the sandbox stopped or paused: tunnel cut")),
    };
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // Guests decide when tunnels end, so these lines stay at debug level.
    match result {
        Ok(_) => tracing::debug!(
            sandbox_id = %sandbox_id,
            port,
            bytes_to_guest = client.read,
            bytes_from_guest = guest.read,
            elapsed_ms,
            "tunnel closed"
        ),
        Err(e) => tracing::debug!(
            sandbox_id = %sandbox_id,
            port,
            bytes_to_guest = client.read,
            bytes_from_guest = guest.read,
            elapsed_ms,
            error = %e,
            "tunnel broken"
        ),
    }
}

/// A stream that counts the bytes read from it (what crosses the tunnel in one direction),
/// kept even when the copy ends in an error.
struct Counted<S> {
    inner: S,
    read: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted { inner, read: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read = self
            .read
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_header_has_token_lists_and_case_found() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert(UPGRADE, "Wrenn-Tunnel".parse().unwrap());
        assert!(is_tunnel_request(&headers));
        headers.insert(UPGRADE, "websocket".parse().unwrap());
        assert!(!is_tunnel_request(&headers));
        headers.remove(UPGRADE);
        assert!(!is_tunnel_request(&headers));
    }
}
