//! The tunnel over real sockets: an "agent" (an axum app calling `accept`), a "control plane"
//! (an axum app calling `open` + `forward_http`) and real targets: a raw TCP echo, an HTTP
//! server and a WebSocket server.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
use axum::extract::{Path, Query, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wrenn_tunnel::{Tunnel, TunnelError, forward_http, open};

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Serves `app` on a fresh local port (with the peer's address for `X-Forwarded-For`).
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// An agent whose every sandbox is this machine: the port is reached on 127.0.0.1.
async fn agent() -> String {
    let app = Router::new().route(
        wrenn_tunnel::ROUTE,
        get(
            |Path((id, port)): Path<(String, u16)>, req: Request| async move {
                wrenn_tunnel::accept(req, SocketAddr::from((LOCALHOST, port)), &id).await
            },
        ),
    );
    format!("http://{}", serve(app).await)
}

fn error_json(e: &TunnelError) -> Response {
    (
        e.status(),
        axum::Json(serde_json::json!({ "code": e.code(), "message": e.to_string() })),
    )
        .into_response()
}

/// A control plane forwarding `/p/{id}/{port}/{*path}` through the agent at `agent_url`.
async fn front(agent_url: String) -> SocketAddr {
    let app = Router::new().route(
        "/p/{id}/{port}/{*path}",
        any(
            move |Path((id, port, _)): Path<(String, u16, String)>, req: Request| async move {
                // The path as sent (still percent-encoded), after `/p/{id}/{port}`.
                let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let target = raw
                    .splitn(5, '/')
                    .nth(4)
                    .map(|rest| format!("/{rest}"))
                    .unwrap();
                let tunnel = match open(&agent_url, &id, port).await {
                    Ok(tunnel) => tunnel,
                    Err(e) => return error_json(&e),
                };
                forward_http(tunnel, req, &target)
                    .await
                    .unwrap_or_else(|e| error_json(&e))
            },
        ),
    );
    serve(app).await
}

/// A one-request HTTP/1.1 client.
async fn send(addr: SocketAddr, request: http::Request<Body>) -> http::Response<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender.send_request(request).await.unwrap().map(Body::new)
}

async fn body_json(response: http::Response<Body>) -> serde_json::Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// Deterministic bytes.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 31 + usize::from(seed)) % 251).unwrap())
        .collect()
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn test_raw_bytes_echo_both_ways_with_half_close() {
    // The target greets first, echoes everything, and answers "bye" after the client's end
    // of stream: only a half-close lets that last word through.
    let target = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = target.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = target.accept().await.unwrap();
        stream.write_all(b"hello\n").await.unwrap();
        let (mut r, mut w) = stream.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.write_all(b"bye").await.unwrap();
        w.shutdown().await.unwrap();
    });
    let agent = agent().await;
    let mut tunnel: Tunnel = open(&agent, "sbx-echo", port).await.unwrap();
    assert_eq!((tunnel.sandbox_id(), tunnel.port()), ("sbx-echo", port));
    let mut greeting = [0u8; 6];
    tunnel.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello\n");

    let data = pattern(7, 3 << 20);
    let (mut r, mut w) = tokio::io::split(tunnel);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut received))
        .await
        .expect("the tunnel did not close after the half-close")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(received.len(), data.len() + 3);
    assert!(received[..data.len()] == data[..], "echo differs");
    assert_eq!(&received[data.len()..], b"bye");
}

/// What the sandbox's HTTP server saw of a request.
async fn inspect(
    Path(rest): Path<String>,
    Query(query): Query<std::collections::BTreeMap<String, String>>,
    headers: HeaderMap,
    req: Request,
) -> axum::Json<serde_json::Value> {
    let method = req.method().to_string();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let mut body = req.into_body().into_data_stream();
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    let mut chunks = 0usize;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len();
        chunks += 1;
        hasher.update(&chunk);
    }
    axum::Json(serde_json::json!({
        "method": method,
        "path": rest,
        "query": query,
        "x_test": header("x-test"),
        "x_secret": header("x-secret"),
        "host": header("host"),
        "xff": header("x-forwarded-for"),
        "xfp": header("x-forwarded-proto"),
        "xfh": header("x-forwarded-host"),
        "len": len,
        "chunks": chunks,
        "sha256": format!("{:x}", hasher.finalize()),
    }))
}

/// A streamed answer of `n` pattern bytes in 64 KiB chunks.
async fn download(Query(q): Query<std::collections::BTreeMap<String, usize>>) -> Response {
    let n = q["bytes"];
    let data = Bytes::from(pattern(3, n));
    let chunks = (0..n.div_ceil(65536))
        .map(move |i| Ok::<_, std::io::Error>(data.slice(i * 65536..((i + 1) * 65536).min(n))));
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

#[tokio::test]
async fn test_http_request_and_16_mib_bodies_stream_through() {
    let sandbox = serve(
        Router::new()
            .route("/upload/{*rest}", any(inspect))
            .route("/download", get(download)),
    )
    .await;
    let front = front(agent().await).await;

    // A 16 MiB body sent in 1 MiB chunks with no Content-Length (chunked).
    let data = pattern(9, 16 << 20);
    let expected = format!("{:x}", Sha256::digest(&data));
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = data
        .chunks(1 << 20)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = Body::new(StreamBody::new(futures::stream::iter(chunks)));
    let request = http::Request::put(format!(
        "/p/sbx-http/{}/upload/a/b%20c?x=1&y=two",
        sandbox.port()
    ))
    .header("host", "8080-sbx-http.example.test")
    .header("x-test", "yes")
    .header("connection", "keep-alive, x-secret")
    .header("x-secret", "hop-by-hop")
    .body(body)
    .unwrap();
    let response = send(front, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = body_json(response).await;
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "a/b c");
    assert_eq!(seen["query"], serde_json::json!({"x": "1", "y": "two"}));
    assert_eq!(seen["x_test"], "yes");
    assert_eq!(
        seen["x_secret"],
        serde_json::Value::Null,
        "a header named in Connection leaked"
    );
    assert_eq!(seen["host"], "8080-sbx-http.example.test");
    assert_eq!(seen["xff"], "127.0.0.1");
    assert_eq!(seen["xfp"], "http");
    assert_eq!(seen["xfh"], "8080-sbx-http.example.test");
    assert_eq!(seen["len"], 16 << 20);
    assert_eq!(seen["sha256"], expected);
    assert!(
        seen["chunks"].as_u64().unwrap() > 1,
        "the body was not streamed"
    );

    // A 16 MiB streamed answer.
    let n = 16 << 20;
    let request = http::Request::get(format!("/p/sbx-http/{}/download?bytes={n}", sandbox.port()))
        .header("host", "front")
        .body(Body::empty())
        .unwrap();
    let response = send(front, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let mut hasher = Sha256::new();
    let mut len = 0;
    let mut frames = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len();
        frames += 1;
        hasher.update(&chunk);
    }
    assert_eq!(len, n);
    assert!(frames > 1, "the answer was not streamed");
    assert_eq!(hasher.finalize()[..], Sha256::digest(pattern(3, n))[..]);
}

#[tokio::test]
async fn test_websocket_handshake_and_echo_through_forward_http() {
    let sandbox = serve(Router::new().route(
        "/ws",
        get(|ws: WebSocketUpgrade| async move {
            ws.on_upgrade(|mut socket| async move {
                while let Some(Ok(message)) = socket.recv().await {
                    let reply = match message {
                        WsMessage::Text(t) => WsMessage::Text(format!("echo: {t}").into()),
                        WsMessage::Binary(b) => WsMessage::Binary(b),
                        WsMessage::Close(_) => break,
                        _ => continue,
                    };
                    if socket.send(reply).await.is_err() {
                        break;
                    }
                }
            })
        }),
    ))
    .await;
    let front = front(agent().await).await;
    let url = format!("ws://{front}/p/sbx-ws/{}/ws", sandbox.port());
    let (mut socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    socket.send(Message::text("hi")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("echo: hi")
    );
    let big = pattern(5, 1 << 20);
    socket.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::binary(big));
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn test_refused_port_is_502_host_error() {
    let agent = agent().await;
    let port = closed_port();
    let error = open(&agent, "sbx-none", port).await.unwrap_err();
    match &error {
        TunnelError::Agent {
            status,
            code,
            message,
        } => {
            assert_eq!(*status, StatusCode::BAD_GATEWAY);
            assert_eq!(code, "host_error");
            assert_eq!(
                message,
                &format!("nothing listens on port {port} in sandbox sbx-none")
            );
        }
        other => panic!("expected the agent's refusal, got {other:?}"),
    }
    assert_eq!(error.code(), "host_error");

    // Through the control plane the same refusal reaches the client.
    let front = front(agent).await;
    let request = http::Request::get(format!("/p/sbx-none/{port}/x"))
        .header("host", "front")
        .body(Body::empty())
        .unwrap();
    let response = send(front, request).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(body_json(response).await["code"], "host_error");
}

#[tokio::test]
async fn test_missing_upgrade_headers_are_400_invalid_request() {
    let agent = agent().await;
    let addr: SocketAddr = agent.trim_start_matches("http://").parse().unwrap();
    let port = closed_port();
    for (connection, upgrade) in [
        (None, None),
        (Some("Upgrade"), None),
        (None, Some("wrenn-tunnel")),
        (Some("Upgrade"), Some("websocket")),
    ] {
        let mut request =
            http::Request::get(format!("/v1/tunnel/sbx-1/{port}")).header("host", "agent");
        if let Some(v) = connection {
            request = request.header("connection", v);
        }
        if let Some(v) = upgrade {
            request = request.header("upgrade", v);
        }
        let response = send(addr, request.body(Body::empty()).unwrap()).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{connection:?} {upgrade:?}"
        );
        let body = body_json(response).await;
        assert_eq!(body["code"], "invalid_request");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("Upgrade: wrenn-tunnel")
        );
    }
}

#[tokio::test]
async fn test_unreachable_agent_is_unavailable() {
    let error = open(&format!("http://127.0.0.1:{}", closed_port()), "sbx-1", 80)
        .await
        .unwrap_err();
    assert!(matches!(error, TunnelError::Connect { .. }), "{error:?}");
    assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.code(), "unavailable");

    let error = open("https://127.0.0.1:1", "sbx-1", 80).await.unwrap_err();
    assert!(matches!(error, TunnelError::InvalidUrl { .. }), "{error:?}");
}

#[tokio::test]
async fn test_non_tunnel_server_is_a_protocol_error() {
    // A server without the route answers 404 with no JSON: not an agent refusal.
    let plain = serve(Router::new().route("/healthz", get(|| async { "ok" }))).await;
    let error = open(&format!("http://{plain}"), "sbx-1", 80)
        .await
        .unwrap_err();
    assert!(matches!(error, TunnelError::Protocol { .. }), "{error:?}");
    assert_eq!(error.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn test_port_that_never_accepts_is_504_timeout() {
    // A listener with a full accept queue: the kernel drops further SYNs, so a connect hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((LOCALHOST, 0).into()).unwrap();
    let listener = socket.listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        fillers.push(tokio::spawn(TcpStream::connect((LOCALHOST, port))));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let agent = agent().await;
    let started = std::time::Instant::now();
    let error = open(&agent, "sbx-slow", port).await.unwrap_err();
    assert!(
        matches!(&error, TunnelError::Agent { status, code, .. }
            if *status == StatusCode::GATEWAY_TIMEOUT && code == "timeout"),
        "{error:?}"
    );
    assert!(started.elapsed() >= wrenn_tunnel::CONNECT_TIMEOUT);
    drop(listener);
    for filler in fillers {
        filler.abort();
    }
}
