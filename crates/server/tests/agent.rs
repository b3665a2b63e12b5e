//! The server against a real host agent (`wrenn-agent` on a real socket, no VM: it runs no
//! sandbox, so every call about one is answered by the agent's own refusals). Shows that the
//! handlers and the reconciler really call the agent and map its answers. Creating, pausing
//! and exec'ing real sandboxes needs KVM: the VM tests cover that.
//!
//! Needs root, `ip` and `nft` (the agent sets up its network pool with no slot made).

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use support::{JOIN_TOKEN, Kind, TestServer};
use wrenn_agent::manager::{AgentConfig, Manager};
use wrenn_server::db::now_ms;
use wrenn_server::db::sandboxes::SandboxRow;
use wrenn_server::db::templates::TemplateRow;

/// The agent's slot pool, whose host table outlives the static agent: a watchdog deletes
/// it when this test process ends.
const POOL: &str = "wsrvtest";

fn remove_pool_table_at_exit() {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; nft delete table ip {POOL} 2>/dev/null",
        pid = std::process::id()
    );
    if let Ok(mut watchdog) = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        std::thread::spawn(move || watchdog.wait());
    }
}

/// One agent per test binary, on its own runtime thread.
fn agent() -> SocketAddr {
    static AGENT: OnceLock<SocketAddr> = OnceLock::new();
    *AGENT.get_or_init(|| {
        remove_pool_table_at_exit();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let dir = tempfile::tempdir().unwrap();
                let mut config = AgentConfig::new(
                    dir.path().join("data"),
                    dir.path().join("run"),
                    dir.path().join("no-vmm-needed"),
                );
                config.slots.warm = 0;
                config.slots.max_slots = 4;
                config.slots.name = POOL.into();
                config.slots.base = std::net::Ipv4Addr::new(10, 213, 0, 0);
                let manager = Manager::start(config).await.expect("starting the agent");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app =
                    wrenn_agent::server::app(manager, Arc::new(wrenn_agent::rpc::CacheImages));
                let _ = wrenn_agent::server::serve(listener, app, std::future::pending()).await;
                drop(dir);
            });
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the agent did not start (root, ip and nft are needed)")
    })
}

async fn register(t: &TestServer, host: &str, address: &str) {
    let body = serde_json::json!({
        "id": host, "address": address, "version": "test", "vcpus_total": 8,
        "memory_mib_total": 16384, "vcpus_used": 0, "memory_mib_used": 0,
        "sandboxes_running": 0, "storage": null
    })
    .to_string();
    let headers = vec![
        ("Authorization".to_owned(), format!("Bearer {JOIN_TOKEN}")),
        ("Content-Type".to_owned(), "application/json".to_owned()),
    ];
    let reply = t
        .raw("POST", "/v1/hosts/heartbeat", &headers, body.as_bytes())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

fn running_row(id: &str, host: &str) -> SandboxRow {
    let now = now_ms();
    SandboxRow {
        id: id.into(),
        template: "base".into(),
        state: "running".into(),
        host_id: Some(host.into()),
        vcpus: 1,
        memory_mib: 256,
        requested_vcpus: 0,
        requested_memory_mib: 0,
        timeout_seconds: 300,
        envd_access_token: "t".into(),
        metadata: BTreeMap::new(),
        created_at: now,
        updated_at: now,
        expires_at: Some(now + 300_000),
        error: None,
        on_timeout: "kill".into(),
        auto_resume: false,
    }
}

async fn with_agent(kind: Kind) {
    let address = format!("http://{}", agent());
    let t = TestServer::start(kind).await;
    register(&t, "host-real", &address).await;
    let db = t.server.db();

    // A pass over a real agent with nothing: no errors, no corrections.
    let report = t.server.reconcile_once().await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.corrections.is_empty(), "{report:?}");

    // The database says the host has template "ghost"; the agent does not: its not_found
    // comes back as 404 and no row is left.
    db.upsert_template(
        &TemplateRow {
            name: "ghost".into(),
            kind: "template".into(),
            vcpus: 1,
            memory_mib: 256,
            source_sandbox_id: None,
            size_bytes: 0,
            created_at: now_ms(),
            hosts: Vec::new(),
        },
        "host-real",
    )
    .await
    .unwrap();
    let refused = t
        .call(
            "POST",
            "/v1/sandboxes",
            Some(r#"{"template":"ghost","id":"sbx-ghost"}"#),
        )
        .await;
    let message = refused.assert_error(404, "not_found");
    assert!(message.contains("host-real"), "{message}");
    t.call("GET", "/v1/sandboxes/sbx-ghost", None)
        .await
        .assert_error(404, "not_found");

    // Calls about a sandbox the agent does not have: its answers, mapped.
    db.insert_sandbox(&running_row("sbx-phantom", "host-real"))
        .await
        .unwrap();
    t.call(
        "POST",
        "/v1/sandboxes/sbx-phantom/exec",
        Some(r#"{"cmd":"true"}"#),
    )
    .await
    .assert_error(404, "not_found");
    t.call(
        "POST",
        "/v1/sandboxes/sbx-phantom/exec/stream",
        Some(r#"{"cmd":"true"}"#),
    )
    .await
    .assert_error(404, "not_found");
    t.call(
        "POST",
        "/v1/sandboxes/sbx-phantom/files/read",
        Some(r#"{"path":"/etc/hostname"}"#),
    )
    .await
    .assert_error(404, "not_found");
    t.call(
        "POST",
        "/v1/sandboxes/sbx-phantom/timeout",
        Some(r#"{"timeout_seconds":60}"#),
    )
    .await
    .assert_error(404, "not_found");
    let pause = t
        .call("POST", "/v1/sandboxes/sbx-phantom/pause", None)
        .await;
    pause.assert_error(404, "not_found");
    // A failed pause leaves the sandbox as it was.
    let row = t
        .call("GET", "/v1/sandboxes/sbx-phantom", None)
        .await
        .json();
    assert_eq!(row["state"], "running");
    t.call(
        "POST",
        "/v1/snapshots",
        Some(r#"{"sandbox_id":"sbx-phantom","name":"snap-1"}"#),
    )
    .await
    .assert_error(404, "not_found");
    let boundary = "XBOUNDARYX";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/tmp/x\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\
         Content-Type: application/octet-stream\r\n\r\nhello\r\n--{boundary}--\r\n"
    );
    let upload = t
        .raw(
            "POST",
            "/v1/sandboxes/sbx-phantom/files",
            &[
                ("Authorization".into(), format!("Bearer {}", t.key)),
                (
                    "Content-Type".into(),
                    format!("multipart/form-data; boundary={boundary}"),
                ),
            ],
            form.as_bytes(),
        )
        .await;
    upload.assert_error(404, "not_found");

    // The reconciler: the agent does not list it, so it stopped.
    let report = t.server.reconcile_once().await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.corrections.len(), 1, "{report:?}");
    let row = t
        .call("GET", "/v1/sandboxes/sbx-phantom", None)
        .await
        .json();
    assert_eq!(row["state"], "stopped");
    assert!(
        row["error"].as_str().unwrap().contains("no longer has it"),
        "{row}"
    );
    // ...and the template table follows the agent's ListSnapshots: "ghost" is gone.
    t.call("GET", "/v1/snapshots/ghost", None)
        .await
        .assert_error(404, "not_found");

    // Destroy asks the agent; its not_found means the sandbox is gone already.
    db.insert_sandbox(&running_row("sbx-phantom2", "host-real"))
        .await
        .unwrap();
    assert_eq!(
        t.call("DELETE", "/v1/sandboxes/sbx-phantom2", None)
            .await
            .status,
        204
    );
    let row = t
        .call("GET", "/v1/sandboxes/sbx-phantom2", None)
        .await
        .json();
    assert_eq!(row["state"], "stopped");

    // A lost sandbox whose host comes back without it stops.
    let mut lost = running_row("sbx-lost", "host-real");
    lost.state = "lost".into();
    db.insert_sandbox(&lost).await.unwrap();
    let report = t.server.reconcile_once().await;
    assert!(
        report
            .corrections
            .iter()
            .any(|c| c.sandbox_id == "sbx-lost" && c.to == "stopped"),
        "{report:?}"
    );

    // Agent call latencies are in /metrics.
    let metrics = t.raw("GET", "/metrics", &[], b"").await.text();
    assert!(
        metrics.contains("wrenn_agent_call_seconds_count{method=\"ListSandboxes\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wrenn_agent_call_failures_total{method=\"Exec\"} 1"),
        "{metrics}"
    );
    t.stop().await;
}
both!(real_agent, with_agent);

/// An upload over `max_upload_bytes` is refused with 413 while it streams.
async fn upload_limit(kind: Kind) {
    let address = format!("http://{}", agent());
    let t = TestServer::start_with(kind, |c| c.max_upload_bytes = 1000).await;
    register(&t, "host-real", &address).await;
    t.server
        .db()
        .insert_sandbox(&running_row("sbx-upload", "host-real"))
        .await
        .unwrap();
    let boundary = "B0UNDARY";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\nbig.bin\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big\"\r\n\r\n"
    )
    .into_bytes();
    form.extend(std::iter::repeat_n(b'x', 5000));
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let headers = [
        ("Authorization".to_owned(), format!("Bearer {}", t.key)),
        (
            "Content-Type".to_owned(),
            format!("multipart/form-data; boundary={boundary}"),
        ),
    ];
    let reply = t
        .raw("POST", "/v1/sandboxes/sbx-upload/files", &headers, &form)
        .await;
    let message = reply.assert_error(413, "payload_too_large");
    assert!(message.contains("1000"), "{message}");
    // The path must come first, and must be sane.
    let no_path = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nx\r\n--{boundary}--\r\n"
    );
    t.raw(
        "POST",
        "/v1/sandboxes/sbx-upload/files",
        &headers,
        no_path.as_bytes(),
    )
    .await
    .assert_error(400, "invalid_request");
    let bad_path = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n../x\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nx\r\n--{boundary}--\r\n"
    );
    t.raw(
        "POST",
        "/v1/sandboxes/sbx-upload/files",
        &headers,
        bad_path.as_bytes(),
    )
    .await
    .assert_error(400, "invalid_request");
    t.stop().await;
}
both!(upload_over_the_limit, upload_limit);
