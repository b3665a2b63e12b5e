//! The agent's side of the control plane, on the host without KVM: a real `Manager` (no
//! sandbox can run here, but a paused one is recovered from its record) behind the real app,
//! the tunnel route's refusals, and heartbeats to a real HTTP server. Needs root (the
//! manager sets up its network slot pool's host table).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State as AxumState;
use axum::routing::post;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use wrenn_agent::heartbeat::{self, Heartbeat, HeartbeatConfig};
use wrenn_agent::manager::{AgentConfig, Manager};
use wrenn_agent::network::SlotPoolConfig;
use wrenn_agent::sandbox::{EgressRules, Record, State};
use wrenn_tunnel::TunnelError;

/// A manager on `dir` with its own slot pool `name` (none made: warm 0) and one paused
/// sandbox, `sbx-paused`, found in its records.
async fn manager(dir: &Path, name: &str, third_octet: u8) -> Arc<Manager> {
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", name])
        .stderr(std::process::Stdio::null())
        .status();
    let paused = Record {
        sandbox_id: "sbx-paused".into(),
        template: "base".into(),
        state: State::Paused,
        vcpus: 2,
        memory_mib: 512,
        created_at_ms: 1,
        expires_at_ms: None,
        timeout_seconds: 0,
        metadata: BTreeMap::new(),
        env_vars: BTreeMap::new(),
        access_token: "t".into(),
        egress: EgressRules::default(),
        build_id: "00000000000000000000000000000000".into(),
        own_builds: Vec::new(),
        slot: None,
        host_address: None,
        vmm_pid: None,
        error: None,
    };
    let record_dir = dir.join("data/sandboxes/sbx-paused");
    std::fs::create_dir_all(&record_dir).unwrap();
    paused.save(&record_dir).unwrap();
    let mut config = AgentConfig::new(dir.join("data"), dir.join("run"), dir.join("no-wrenn-vmm"));
    config.slots = SlotPoolConfig {
        base: Ipv4Addr::new(10, 212, third_octet, 0),
        prefix_len: 24,
        max_slots: 4,
        warm: 0,
        name: name.to_owned(),
    };
    let manager = Manager::start(config).await.unwrap();
    assert_eq!(manager.get("sbx-paused").unwrap().state, State::Paused);
    manager
}

fn drop_table(name: &str) {
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", name])
        .status();
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// One GET with the tunnel's upgrade headers; the status and JSON body of the refusal.
async fn raw_tunnel_get(agent: SocketAddr, path: &str) -> (StatusCode, serde_json::Value) {
    let stream = tokio::net::TcpStream::connect(agent).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", "agent")
        .header("connection", "Upgrade")
        .header("upgrade", "wrenn-tunnel")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn test_tunnel_route_refuses_unknown_paused_and_bad_port() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), "wtuntst", 1).await;
    let app = wrenn_agent::server::app(manager, Arc::new(wrenn_agent::rpc::CacheImages));
    let agent = serve(app).await;
    let url = format!("http://{agent}");

    let error = wrenn_tunnel::open(&url, "sbx-nope", 8080)
        .await
        .unwrap_err();
    match &error {
        TunnelError::Agent {
            status,
            code,
            message,
        } => {
            assert_eq!(*status, StatusCode::NOT_FOUND);
            assert_eq!(code, "not_found");
            assert!(message.contains("sbx-nope"), "{message}");
        }
        other => panic!("expected not_found, got {other:?}"),
    }

    let error = wrenn_tunnel::open(&url, "sbx-paused", 8080)
        .await
        .unwrap_err();
    assert_eq!(error.status(), StatusCode::CONFLICT, "{error:?}");
    assert_eq!(error.code(), "conflict");
    assert!(error.to_string().contains("paused"), "{error}");

    for port in ["0", "65536", "http"] {
        let (status, body) = raw_tunnel_get(agent, &format!("/v1/tunnel/sbx-paused/{port}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "port {port}");
        assert_eq!(body["code"], "invalid_request");
    }
    // The rest of the app is still there.
    let stream = tokio::net::TcpStream::connect(agent).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(
            http::Request::get("/healthz")
                .header("host", "agent")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop_table("wtuntst");
}

/// What the test's control plane received: the Authorization header and the body.
type Received = mpsc::UnboundedSender<(Option<String>, Heartbeat)>;

/// A control plane that records heartbeats and asks for `interval_s` between them.
fn control_plane(tx: Received, interval_s: u64) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/hosts/heartbeat",
            post(
                move |AxumState(tx): AxumState<Received>,
                      headers: HeaderMap,
                      Json(body): Json<Heartbeat>| async move {
                    let auth = headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let host_id = body.id.clone();
                    let _ = tx.send((auth, body));
                    Json(serde_json::json!({
                        "host_id": host_id,
                        "heartbeat_interval_seconds": interval_s,
                    }))
                },
            ),
        )
        .with_state(tx)
}

fn config(server: SocketAddr, interval: Duration) -> HeartbeatConfig {
    HeartbeatConfig {
        server_url: format!("http://{server}"),
        join_token: "join-secret".into(),
        host_id: "host-test".into(),
        advertise_url: "http://10.0.0.5:5008".into(),
        storage: Some("file:///srv/wrenn".into()),
        interval,
    }
}

#[tokio::test]
async fn test_heartbeats_carry_token_capacity_and_follow_the_servers_interval() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), "wtunhb", 2).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = serve(control_plane(tx, 1)).await;
    // A first interval of a minute: a second heartbeat within seconds means the server's
    // interval (1 s) was taken.
    let task = heartbeat::spawn(manager.clone(), config(server, Duration::from_secs(60)));

    let (auth, first) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no heartbeat at start")
        .unwrap();
    assert_eq!(auth.as_deref(), Some("Bearer join-secret"));
    assert_eq!(
        first,
        Heartbeat {
            id: "host-test".into(),
            address: "http://10.0.0.5:5008".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            vcpus_total: manager.config().vcpus_total,
            memory_mib_total: manager.config().memory_mib_total,
            // The paused sandbox holds nothing.
            vcpus_used: 0,
            memory_mib_used: 0,
            sandboxes_running: 0,
            storage: Some("file:///srv/wrenn".into()),
        }
    );
    assert!(first.vcpus_total > 0 && first.memory_mib_total > 0);
    let (_, second) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the server's 1 s interval was not honoured")
        .unwrap();
    assert_eq!(second, first);
    task.abort();
    drop_table("wtunhb");
}

#[tokio::test]
async fn test_heartbeats_reach_a_server_that_comes_up_later() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), "wtunlate", 3).await;
    // A port nothing listens on yet.
    let addr = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let task = heartbeat::spawn(manager, config(addr, Duration::from_millis(200)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !task.is_finished(),
        "the heartbeat task gave up on a down server"
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        axum::serve(listener, control_plane(tx, 10)).await.unwrap();
    });
    let (auth, heartbeat) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no heartbeat once the server came up")
        .unwrap();
    assert_eq!(auth.as_deref(), Some("Bearer join-secret"));
    assert_eq!(heartbeat.id, "host-test");
    task.abort();
    drop_table("wtunlate");
}

#[tokio::test]
async fn test_refused_heartbeat_is_an_error_with_the_servers_message() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(dir.path(), "wtunref", 4).await;
    let server = serve(axum::Router::new().route(
        "/v1/hosts/heartbeat",
        post(|| async {
            (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"code": "unauthenticated", "message": "wrong join token"})),
            )
        }),
    ))
    .await;
    let config = config(server, Duration::from_secs(10));
    let error = heartbeat::send(&config, &Heartbeat::now(&manager, &config))
        .await
        .unwrap_err();
    match error {
        heartbeat::HeartbeatError::Refused { status, message } => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(message, "wrong join token");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop_table("wtunref");
}
