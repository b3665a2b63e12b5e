//! The REST API on real databases (SQLite and PostgreSQL) and real sockets, without agents:
//! migrations, keys, auth, every error path that needs no sandbox, heartbeats, hosts going
//! unreachable, idempotent creates, list filters and pagination, request ids, metrics.

#[macro_use]
mod support;

use std::collections::BTreeMap;

use support::{Kind, TestServer};
use wrenn_server::db::sandboxes::SandboxRow;
use wrenn_server::db::{Db, now_ms};

fn sandbox_row(id: &str, template: &str, state: &str, created_at: i64) -> SandboxRow {
    SandboxRow {
        id: id.into(),
        template: template.into(),
        state: state.into(),
        host_id: None,
        vcpus: 1,
        memory_mib: 256,
        requested_vcpus: 0,
        requested_memory_mib: 0,
        timeout_seconds: 300,
        envd_access_token: "token".into(),
        metadata: BTreeMap::new(),
        created_at,
        updated_at: created_at,
        expires_at: None,
        error: None,
        on_timeout: "kill".into(),
        auto_resume: false,
    }
}

async fn migrations(kind: Kind) {
    let t = TestServer::start(kind).await;
    use sqlx::Row;
    for table in [
        "hosts",
        "sandboxes",
        "sandbox_metadata",
        "templates",
        "template_hosts",
        "api_keys",
        "events",
    ] {
        let n: i64 = sqlx::query(&format!(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table}"
        ))
        .fetch_one(t.server.db().pool())
        .await
        .unwrap_or_else(|e| panic!("table {table}: {e}"))
        .try_get("n")
        .unwrap();
        assert_eq!(n, i64::from(table == "api_keys"), "rows in {table}");
    }
    // Connecting again to a migrated database applies nothing and fails nothing.
    let again = Db::connect(&t.db.url).await.expect("second connect");
    again.close().await;
    t.stop().await;
}
both!(migrations_from_empty, migrations);

#[tokio::test]
async fn sqlite_in_memory_and_bad_urls() {
    let db = Db::connect("sqlite::memory:")
        .await
        .expect("in-memory SQLite");
    let key = wrenn_server::keys::create(&db, "mem").await.unwrap();
    assert_eq!(db.api_keys().await.unwrap()[0].id, key.id);
    db.close().await;
    let error = Db::connect("mysql://x").await.unwrap_err().to_string();
    assert!(error.contains("postgres://"), "{error}");
    // A key made through a URL, as `wrenn keys create` does on an empty database.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sub/dir/w.db").display());
    let made = wrenn_server::keys::create_at(&url, "first", Default::default())
        .await
        .unwrap();
    let db = Db::connect(&url).await.unwrap();
    assert_eq!(db.api_keys().await.unwrap()[0].prefix, made.prefix);
    db.close().await;
}

async fn keys(kind: Kind) {
    let t = TestServer::start(kind).await;
    // The table holds hashes, never keys.
    let made = wrenn_server::keys::create(t.server.db(), "second")
        .await
        .unwrap();
    assert!(
        made.key.starts_with("wrenn_") && made.key.len() == 46,
        "{}",
        made.key
    );
    assert_eq!(made.prefix, &made.key[..10]);
    use sqlx::Row;
    let rows = sqlx::query("SELECT id, name, prefix, hash FROM api_keys")
        .fetch_all(t.server.db().pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        for column in ["id", "name", "prefix", "hash"] {
            let value: String = row.try_get(column).unwrap();
            assert!(
                !value.contains(&made.key) && !value.contains(&t.key),
                "{column} holds a key"
            );
        }
    }

    // Accepted as Bearer and as X-API-Key.
    assert_eq!(t.call("GET", "/v1/sandboxes", None).await.status, 200);
    let by_header = t
        .raw(
            "GET",
            "/v1/sandboxes",
            &[("X-API-Key".into(), made.key.clone())],
            b"",
        )
        .await;
    assert_eq!(by_header.status, 200, "{}", by_header.text());

    // Refused: missing, malformed, unknown.
    let missing = t.raw("GET", "/v1/sandboxes", &[], b"").await;
    let message = missing.assert_error(401, "unauthenticated");
    assert!(message.contains("missing API key"), "{message}");
    let wrong = t
        .raw(
            "GET",
            "/v1/sandboxes",
            &[("Authorization".into(), "Bearer nope".into())],
            b"",
        )
        .await;
    wrong.assert_error(401, "unauthenticated");
    let unknown = format!("wrenn_{}", "0".repeat(40));
    let unknown = t
        .raw(
            "GET",
            "/v1/sandboxes",
            &[("X-API-Key".into(), unknown)],
            b"",
        )
        .await;
    unknown.assert_error(401, "unauthenticated");

    // Through the API: make, list (no key shown), revoke.
    let created = t
        .call("POST", "/v1/api-keys", Some(r#"{"name":"ci"}"#))
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let created = created.json();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let listed = t.call("GET", "/v1/api-keys", None).await.json();
    let keys = listed["api_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    assert!(!listed.to_string().contains(&key), "the list shows a key");
    assert!(
        keys.iter()
            .any(|k| k["id"] == id.as_str() && k["name"] == "ci")
    );
    let with_new = t
        .raw(
            "GET",
            "/v1/hosts",
            &[("X-API-Key".into(), key.clone())],
            b"",
        )
        .await;
    assert_eq!(with_new.status, 200);
    let revoked = t.call("DELETE", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(revoked.status, 204);
    let after = t
        .raw("GET", "/v1/hosts", &[("X-API-Key".into(), key)], b"")
        .await;
    after.assert_error(401, "unauthenticated");
    t.call("DELETE", &format!("/v1/api-keys/{id}"), None)
        .await
        .assert_error(404, "not_found");
    t.call("POST", "/v1/api-keys", Some(r#"{"name":""}"#))
        .await
        .assert_error(400, "invalid_request");
    t.stop().await;
}
both!(api_keys, keys);

async fn errors(kind: Kind) {
    let t = TestServer::start(kind).await;
    // Bodies.
    t.call("POST", "/v1/sandboxes", Some("{not json"))
        .await
        .assert_error(400, "invalid_request");
    t.call("POST", "/v1/sandboxes", Some(r#"{"template": 5}"#))
        .await
        .assert_error(400, "invalid_request");
    t.call("POST", "/v1/sandboxes", Some(r#"{}"#))
        .await
        .assert_error(400, "invalid_request");
    let unknown = t
        .call(
            "POST",
            "/v1/sandboxes",
            Some(r#"{"template":"base","colour":"red"}"#),
        )
        .await
        .assert_error(400, "invalid_request");
    assert!(unknown.contains("colour"), "{unknown}");
    t.call(
        "POST",
        "/v1/sandboxes",
        Some(r#"{"template":"base","timeout_seconds":0}"#),
    )
    .await
    .assert_error(400, "invalid_request");
    t.call(
        "POST",
        "/v1/sandboxes",
        Some(r#"{"template":"base","id":"Bad_Id"}"#),
    )
    .await
    .assert_error(400, "invalid_request");
    let text = t
        .raw(
            "POST",
            "/v1/sandboxes",
            &[
                ("Authorization".into(), format!("Bearer {}", t.key)),
                ("Content-Type".into(), "text/plain".into()),
            ],
            br#"{"template":"base"}"#,
        )
        .await;
    text.assert_error(415, "unsupported_media_type");
    let big = format!(
        r#"{{"template":"base","metadata":{{"k":"{}"}}}}"#,
        "x".repeat(1 << 21)
    );
    t.call("POST", "/v1/sandboxes", Some(&big))
        .await
        .assert_error(413, "payload_too_large");

    // Routes, methods, paths.
    t.call("GET", "/v1/nothing-here", None)
        .await
        .assert_error(404, "not_found");
    t.raw("GET", "/nope", &[], b"")
        .await
        .assert_error(404, "not_found");
    t.call("PUT", "/v1/sandboxes", None)
        .await
        .assert_error(405, "method_not_allowed");
    t.call("GET", "/v1/sandboxes/NOT_AN_ID", None)
        .await
        .assert_error(400, "invalid_request");
    t.call("GET", "/v1/sandboxes/sbx-missing", None)
        .await
        .assert_error(404, "not_found");
    t.call("DELETE", "/v1/sandboxes/sbx-missing", None)
        .await
        .assert_error(404, "not_found");
    t.call(
        "POST",
        "/v1/sandboxes/sbx-missing/exec",
        Some(r#"{"cmd":"ls"}"#),
    )
    .await
    .assert_error(404, "not_found");
    t.call(
        "POST",
        "/v1/sandboxes/sbx-missing/exec",
        Some(r#"{"args":[]}"#),
    )
    .await
    .assert_error(400, "invalid_request");
    t.call("POST", "/v1/sandboxes/sbx-missing/resume", None)
        .await
        .assert_error(404, "not_found");
    t.call("POST", "/v1/sandboxes/sbx-missing/pause", None)
        .await
        .assert_error(404, "not_found");
    t.call(
        "POST",
        "/v1/sandboxes/sbx-missing/timeout",
        Some(r#"{"timeout_seconds":999999}"#),
    )
    .await
    .assert_error(400, "invalid_request");
    t.call(
        "POST",
        "/v1/sandboxes/sbx-missing/files/read",
        Some(r#"{"path":"../etc/passwd"}"#),
    )
    .await
    .assert_error(400, "invalid_request");
    t.call("POST", "/v1/sandboxes/sbx-missing/files", Some("{}"))
        .await
        .assert_error(415, "unsupported_media_type");
    t.call("GET", "/v1/sandboxes?limit=0", None)
        .await
        .assert_error(400, "invalid_request");
    t.call("GET", "/v1/sandboxes?limit=abc", None)
        .await
        .assert_error(400, "invalid_request");
    t.call("GET", "/v1/sandboxes?cursor=%%%", None)
        .await
        .assert_error(400, "invalid_request");
    t.call("GET", "/v1/sandboxes?state=sleeping", None)
        .await
        .assert_error(400, "invalid_request");
    t.call("GET", "/v1/snapshots/Bad!", None)
        .await
        .assert_error(400, "invalid_request");
    t.call("GET", "/v1/snapshots/none", None)
        .await
        .assert_error(404, "not_found");
    t.call(
        "POST",
        "/v1/snapshots",
        Some(r#"{"sandbox_id":"sbx-x","name":"snap"}"#),
    )
    .await
    .assert_error(404, "not_found");
    t.call("DELETE", "/v1/hosts/nohost", None)
        .await
        .assert_error(404, "not_found");

    // Placement: no host at all, then a host without the template.
    let none = t
        .call("POST", "/v1/sandboxes", Some(r#"{"template":"base"}"#))
        .await
        .assert_error(503, "unavailable");
    assert!(none.contains("no host"), "{none}");
    assert_eq!(t.heartbeat("host-a", 8, 8192).await.status, 200);
    let message = t
        .call("POST", "/v1/sandboxes", Some(r#"{"template":"base"}"#))
        .await
        .assert_error(404, "not_found");
    assert!(message.contains("base"), "{message}");
    // A failed create leaves no row behind.
    let list = t
        .call("GET", "/v1/sandboxes?state=creating", None)
        .await
        .json();
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 0);
    t.stop().await;
}
both!(error_paths, errors);

async fn states(kind: Kind) {
    let t = TestServer::start(kind).await;
    let db = t.server.db();
    let now = now_ms();
    db.insert_sandbox(&sandbox_row("sbx-paused", "base", "paused", now))
        .await
        .unwrap();
    db.insert_sandbox(&sandbox_row("sbx-stopped", "base", "stopped", now))
        .await
        .unwrap();
    let mut with_host = sandbox_row("sbx-gone-host", "base", "running", now);
    with_host.host_id = Some("host-nowhere".into());
    db.insert_sandbox(&with_host).await.unwrap();

    // Exec in a paused sandbox, pause of a paused one, resume of a stopped one: 409.
    t.call(
        "POST",
        "/v1/sandboxes/sbx-paused/exec",
        Some(r#"{"cmd":"ls"}"#),
    )
    .await
    .assert_error(409, "conflict");
    t.call("POST", "/v1/sandboxes/sbx-paused/pause", None)
        .await
        .assert_error(409, "conflict");
    t.call("POST", "/v1/sandboxes/sbx-stopped/resume", Some("{}"))
        .await
        .assert_error(409, "conflict");
    // Running on a host nobody knows: 503, not a 5xx of ours.
    t.call(
        "POST",
        "/v1/sandboxes/sbx-gone-host/exec",
        Some(r#"{"cmd":"ls"}"#),
    )
    .await
    .assert_error(503, "unavailable");
    // Destroying a stopped sandbox is a no-op; one whose host is unknown just stops.
    assert_eq!(
        t.call("DELETE", "/v1/sandboxes/sbx-stopped", None)
            .await
            .status,
        204
    );
    assert_eq!(
        t.call("DELETE", "/v1/sandboxes/sbx-gone-host", None)
            .await
            .status,
        204
    );
    let gone = t.call("GET", "/v1/sandboxes/sbx-gone-host", None).await;
    assert_eq!(gone.status, 200);
    assert_eq!(gone.json()["state"], "stopped");

    // Idempotent create: same parameters → 200 with the existing one; others → 409.
    let mut existing = sandbox_row("sbx-idem", "base", "running", now);
    existing.metadata.insert("team".into(), "a".into());
    db.insert_sandbox(&existing).await.unwrap();
    let again = t
        .call(
            "POST",
            "/v1/sandboxes",
            Some(r#"{"template":"base","id":"sbx-idem","metadata":{"team":"a"}}"#),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
    let body = again.json();
    assert_eq!(body["id"], "sbx-idem");
    assert_eq!(body["state"], "running");
    assert_eq!(body["metadata"]["team"], "a");
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
    t.call(
        "POST",
        "/v1/sandboxes",
        Some(r#"{"template":"base","id":"sbx-idem","metadata":{"team":"b"}}"#),
    )
    .await
    .assert_error(409, "conflict");
    t.call(
        "POST",
        "/v1/sandboxes",
        Some(r#"{"template":"other","id":"sbx-idem","metadata":{"team":"a"}}"#),
    )
    .await
    .assert_error(409, "conflict");

    // A create that died before choosing a host is stopped by the reconciler.
    db.insert_sandbox(&sandbox_row("sbx-stuck", "base", "creating", now - 600_000))
        .await
        .unwrap();
    let report = t.server.reconcile_once().await;
    assert!(
        report
            .corrections
            .iter()
            .any(|c| c.sandbox_id == "sbx-stuck" && c.to == "stopped"),
        "{report:?}"
    );
    // Where a sandbox is, for the proxy.
    let located = t.server.locate("sbx-gone-host").await.unwrap().unwrap();
    assert_eq!(located.host_id.as_deref(), Some("host-nowhere"));
    assert_eq!(located.host_address, None);
    assert!(!located.host_ready);
    assert!(t.server.locate("sbx-none").await.unwrap().is_none());

    // Guarded transitions: only one of two movers wins.
    assert!(
        db.transition_sandbox("sbx-idem", &["running"], "pausing", None)
            .await
            .unwrap()
    );
    assert!(
        !db.transition_sandbox("sbx-idem", &["running"], "pausing", None)
            .await
            .unwrap()
    );
    t.stop().await;
}
both!(state_rules, states);

async fn hosts(kind: Kind) {
    let t = TestServer::start_with(kind, |c| {
        c.host_grace = std::time::Duration::from_secs(60);
    })
    .await;
    // The join token, not an API key.
    let no_token = t
        .raw(
            "POST",
            "/v1/hosts/heartbeat",
            &[("Content-Type".into(), "application/json".into())],
            br#"{"id":"h"}"#,
        )
        .await;
    no_token.assert_error(401, "unauthenticated");
    let with_key = t
        .raw(
            "POST",
            "/v1/hosts/heartbeat",
            &[
                ("Authorization".into(), format!("Bearer {}", t.key)),
                ("Content-Type".into(), "application/json".into()),
            ],
            br#"{"id":"host-a","address":"http://127.0.0.1:9","version":"x","vcpus_total":1,"memory_mib_total":1,"vcpus_used":0,"memory_mib_used":0,"sandboxes_running":0}"#,
        )
        .await;
    with_key.assert_error(401, "unauthenticated");
    let ack = t.heartbeat("host-a", 4, 4096).await;
    assert_eq!(ack.status, 200, "{}", ack.text());
    assert_eq!(ack.json()["host_id"], "host-a");
    assert_eq!(ack.json()["heartbeat_interval_seconds"], 10);
    let listed = t.call("GET", "/v1/hosts", None).await.json();
    let host = &listed["hosts"][0];
    assert_eq!(host["id"], "host-a");
    assert_eq!(host["state"], "ready");
    assert_eq!(host["vcpus_total"], 4);
    assert_eq!(host["address"], "http://127.0.0.1:9");

    // A running sandbox on it; the host goes silent past the grace.
    let db = t.server.db();
    let mut running = sandbox_row("sbx-on-a", "base", "running", now_ms());
    running.host_id = Some("host-a".into());
    db.insert_sandbox(&running).await.unwrap();
    let mut paused = sandbox_row("sbx-paused-a", "base", "paused", now_ms());
    paused.host_id = Some("host-a".into());
    db.insert_sandbox(&paused).await.unwrap();
    db.set_host_heartbeat("host-a", now_ms() - 120_000)
        .await
        .unwrap();
    let report = t.server.reconcile_once().await;
    assert_eq!(report.hosts_unreachable, vec!["host-a".to_owned()]);
    assert_eq!(report.corrections.len(), 1, "{report:?}");
    assert_eq!(report.corrections[0].sandbox_id, "sbx-on-a");
    let host = t.call("GET", "/v1/hosts", None).await.json();
    assert_eq!(host["hosts"][0]["state"], "unreachable");
    let lost = t.call("GET", "/v1/sandboxes/sbx-on-a", None).await.json();
    assert_eq!(lost["state"], "lost");
    assert!(lost["error"].as_str().unwrap().contains("host-a"), "{lost}");
    let paused = t
        .call("GET", "/v1/sandboxes/sbx-paused-a", None)
        .await
        .json();
    assert_eq!(paused["state"], "paused", "paused sandboxes are left alone");
    let events = db.events(10).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "reconciled" && e.sandbox_id.as_deref() == Some("sbx-on-a"))
    );
    assert!(events.iter().any(|e| e.kind == "host_unreachable"));
    assert_eq!(t.server.metrics().corrections("running_to_lost"), 1);
    let metrics = t.raw("GET", "/metrics", &[], b"").await.text();
    assert!(
        metrics.contains("wrenn_reconciler_corrections_total{kind=\"running_to_lost\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wrenn_sandboxes{state=\"lost\"} 1"),
        "{metrics}"
    );
    // A second pass changes nothing more.
    let quiet = t.server.reconcile_once().await;
    assert!(
        quiet.hosts_unreachable.is_empty() && quiet.corrections.is_empty(),
        "{quiet:?}"
    );
    // Placement skips it: no ready host.
    t.call("POST", "/v1/sandboxes", Some(r#"{"template":"base"}"#))
        .await
        .assert_error(503, "unavailable");
    // A host with live sandboxes cannot be forgotten.
    t.call("DELETE", "/v1/hosts/host-a", None)
        .await
        .assert_error(409, "conflict");
    // It comes back.
    assert_eq!(t.heartbeat("host-a", 4, 4096).await.status, 200);
    let host = t.call("GET", "/v1/hosts", None).await.json();
    assert_eq!(host["hosts"][0]["state"], "ready");
    // A host without sandboxes can be forgotten.
    assert_eq!(t.heartbeat("host-b", 4, 4096).await.status, 200);
    assert_eq!(t.call("DELETE", "/v1/hosts/host-b", None).await.status, 204);
    assert_eq!(
        t.call("GET", "/v1/hosts", None).await.json()["hosts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    t.stop().await;
}
both!(hosts_and_reconciler, hosts);

async fn lists(kind: Kind) {
    let t = TestServer::start(kind).await;
    let db = t.server.db();
    let base = now_ms() - 1_000_000;
    for n in 0..1000i64 {
        let state = match n % 4 {
            0 => "running",
            1 => "paused",
            2 => "stopped",
            _ => "error",
        };
        let template = if n % 2 == 0 { "base" } else { "python" };
        // Pairs share a created_at, so the id breaks ties.
        let mut row = sandbox_row(&format!("sbx-{n:04}"), template, state, base + n / 2);
        row.metadata.insert("team".into(), format!("t{}", n % 10));
        row.metadata.insert("n".into(), n.to_string());
        assert!(db.insert_sandbox(&row).await.unwrap());
    }
    // Every page in order, nothing twice, default filter: all but stopped (750).
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/sandboxes?limit=100&cursor={c}"),
            None => "/v1/sandboxes?limit=100".to_owned(),
        };
        let page = t.call("GET", &path, None).await;
        assert_eq!(page.status, 200, "{}", page.text());
        let page = page.json();
        for s in page["sandboxes"].as_array().unwrap() {
            assert_ne!(s["state"], "stopped");
            seen.push(s["id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 750);
    assert_eq!(pages, 8);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first (ids rise with created_at)");
    sorted.dedup();
    assert_eq!(sorted.len(), 750);

    // Filters.
    let count = |path: String| {
        let t = &t;
        async move {
            let page = t.call("GET", &path, None).await;
            assert_eq!(page.status, 200, "{path}: {}", page.text());
            page.json()["sandboxes"].as_array().unwrap().len()
        }
    };
    assert_eq!(
        count("/v1/sandboxes?state=running&limit=1000".into()).await,
        250
    );
    assert_eq!(
        count("/v1/sandboxes?state=running,paused&limit=1000".into()).await,
        500
    );
    assert_eq!(
        count("/v1/sandboxes?state=stopped&limit=1000".into()).await,
        250
    );
    assert_eq!(
        count("/v1/sandboxes?template=python&limit=1000".into()).await,
        500
    );
    assert_eq!(
        count("/v1/sandboxes?state=running&template=python&limit=1000".into()).await,
        0
    );
    assert_eq!(
        count("/v1/sandboxes?metadata.team=t3&state=paused,error&limit=1000".into()).await,
        100
    );
    assert_eq!(
        count("/v1/sandboxes?metadata.team=t3&metadata.n=13".into()).await,
        1
    );
    assert_eq!(count("/v1/sandboxes?metadata.team=nobody".into()).await, 0);
    assert_eq!(count("/v1/sandboxes".into()).await, 100, "default limit");
    t.stop().await;
}
both!(list_filters_and_pagination, lists);

async fn request_ids(kind: Kind) {
    let t = TestServer::start(kind).await;
    let ok = t
        .raw(
            "GET",
            "/healthz",
            &[("X-Request-Id".into(), "my-req.1_x".into())],
            b"",
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.text(), "ok");
    assert_eq!(ok.header("x-request-id"), Some("my-req.1_x"));
    let insane = t
        .raw(
            "GET",
            "/healthz",
            &[("X-Request-Id".into(), "has spaces and ünicode".into())],
            b"",
        )
        .await;
    let made = insane.header("x-request-id").unwrap();
    assert!(made.starts_with("req-") && made.len() == 20, "{made}");
    let error = t
        .raw(
            "GET",
            "/v1/nope",
            &[("X-Request-Id".into(), "abc".into())],
            b"",
        )
        .await;
    error.assert_error(404, "not_found");
    assert_eq!(error.json()["request_id"], "abc");
    let long = "a".repeat(65);
    let replaced = t
        .raw(
            "GET",
            "/healthz",
            &[("X-Request-Id".into(), long.clone())],
            b"",
        )
        .await;
    assert_ne!(replaced.header("x-request-id"), Some(long.as_str()));

    // The unauthenticated documents.
    let yaml = t.raw("GET", "/openapi.yaml", &[], b"").await;
    assert_eq!(yaml.status, 200);
    assert!(
        yaml.text().starts_with("openapi: 3.1"),
        "{}",
        &yaml.text()[..40.min(yaml.body.len())]
    );
    let json = t.raw("GET", "/openapi.json", &[], b"").await;
    assert_eq!(json.status, 200);
    assert!(json.json()["paths"]["/v1/sandboxes"].is_object());
    let docs = t.raw("GET", "/docs/", &[], b"").await;
    assert_eq!(docs.status, 200, "{}", docs.text());
    assert!(docs.text().to_lowercase().contains("swagger"));
    let metrics = t.raw("GET", "/metrics", &[], b"").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(
        text.contains("wrenn_http_requests_total{route=\"/healthz\",status=\"2xx\"}"),
        "{text}"
    );
    assert!(
        text.contains("wrenn_sandboxes{state=\"running\"} 0"),
        "{text}"
    );
    t.stop().await;
}
both!(request_ids_and_documents, request_ids);

fn template(name: &str, vcpus: i64, memory_mib: i64) -> wrenn_server::db::templates::TemplateRow {
    wrenn_server::db::templates::TemplateRow {
        name: name.into(),
        kind: "template".into(),
        vcpus,
        memory_mib,
        source_sandbox_id: None,
        size_bytes: 0,
        created_at: now_ms(),
        hosts: Vec::new(),
    }
}

async fn placing(kind: Kind) {
    let t = TestServer::start(kind).await;
    let db = t.server.db();
    let grace = std::time::Duration::from_secs(90);
    let beat = |id: &'static str, vcpus: u32, memory: u64, storage: Option<&'static str>| {
        let t = &t;
        async move {
            let body = serde_json::json!({
                "id": id, "address": "http://127.0.0.1:9", "version": "test",
                "vcpus_total": vcpus, "memory_mib_total": memory, "vcpus_used": 0,
                "memory_mib_used": 0, "sandboxes_running": 0, "storage": storage
            })
            .to_string();
            let headers = vec![
                (
                    "Authorization".to_owned(),
                    format!("Bearer {}", support::JOIN_TOKEN),
                ),
                ("Content-Type".to_owned(), "application/json".to_owned()),
            ];
            let reply = t
                .raw("POST", "/v1/hosts/heartbeat", &headers, body.as_bytes())
                .await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    };
    // a holds the template but is nearly full; b shares a's storage; c has other storage;
    // d shares the storage and has the most room.
    beat("host-a", 2, 1024, Some("s3://shared")).await;
    beat("host-b", 8, 8192, Some("s3://shared")).await;
    beat("host-c", 64, 65536, Some("s3://other")).await;
    beat("host-d", 16, 16384, Some("s3://shared")).await;
    db.upsert_template(&template("py", 1, 512), "host-a")
        .await
        .unwrap();
    let mut busy = sandbox_row("sbx-busy", "py", "running", now_ms());
    busy.host_id = Some("host-a".into());
    busy.memory_mib = 768;
    db.insert_sandbox(&busy).await.unwrap();

    let (row, hosts) = wrenn_server::placement::candidates(db, grace, "py", 0, 0)
        .await
        .unwrap();
    assert_eq!(row.hosts, vec!["host-a".to_owned()]);
    let order: Vec<&str> = hosts.iter().map(|h| h.id.as_str()).collect();
    // a has 256 MiB left of the 512 it needs; c lacks the template and its storage.
    assert_eq!(order, vec!["host-d", "host-b"]);
    // Asking for more than any host has.
    let error = wrenn_server::placement::candidates(db, grace, "py", 0, 20000)
        .await
        .unwrap_err();
    assert_eq!(error.status.as_u16(), 503, "{error}");
    t.call(
        "POST",
        "/v1/sandboxes",
        Some(r#"{"template":"py","memory_mib":20000}"#),
    )
    .await
    .assert_error(503, "unavailable");
    // Stale hosts are not candidates.
    db.set_host_heartbeat("host-d", now_ms() - 600_000)
        .await
        .unwrap();
    let (_, hosts) = wrenn_server::placement::candidates(db, grace, "py", 0, 0)
        .await
        .unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].id, "host-b");
    // A paused sandbox of a gone host resumes on a live host sharing its storage.
    db.set_host_heartbeat("host-a", now_ms() - 600_000)
        .await
        .unwrap();
    let host = wrenn_server::placement::resume_host(db, grace, "host-a")
        .await
        .unwrap();
    assert_eq!(host.id, "host-b");
    let error = wrenn_server::placement::resume_host(db, grace, "host-zz")
        .await
        .unwrap_err();
    assert_eq!(error.status.as_u16(), 503);
    // The snapshot list shows what the table holds.
    let listed = t.call("GET", "/v1/snapshots", None).await.json();
    assert_eq!(listed["snapshots"][0]["name"], "py");
    assert_eq!(listed["snapshots"][0]["hosts"][0], "host-a");
    assert_eq!(listed["snapshots"][0]["kind"], "template");
    t.stop().await;
}
both!(placement, placing);
