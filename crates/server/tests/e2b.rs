//! E2B's REST surface and sandbox routing on real databases and sockets, without agents: the
//! shapes and statuses the SDKs' generated clients parse (errors as `{"code": <status>,
//! "message"}`), list filters and `x-next-token` paging, kill/get of unknown or stopped
//! sandboxes, and the envd router's refusals (missing headers, unknown sandboxes, tokens,
//! signatures). The SDKs themselves run against `wrenn up` in `crates/cli/tests/e2b_sdk.rs`.

#[macro_use]
mod support;

use std::collections::BTreeMap;

use support::{Kind, TestServer};
use wrenn_server::db::now_ms;
use wrenn_server::db::sandboxes::SandboxRow;

fn row(id: &str, state: &str, created_at: i64, metadata: &[(&str, &str)]) -> SandboxRow {
    SandboxRow {
        id: id.into(),
        template: "base".into(),
        state: state.into(),
        host_id: None,
        vcpus: 2,
        memory_mib: 512,
        requested_vcpus: 0,
        requested_memory_mib: 0,
        timeout_seconds: 300,
        envd_access_token: format!("token-of-{id}"),
        metadata: metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        created_at,
        updated_at: created_at,
        expires_at: Some(created_at + 300_000),
        error: None,
        on_timeout: "kill".into(),
        auto_resume: false,
    }
}

/// Asserts E2B's error body: the status as `code`, a message.
fn assert_e2b_error(reply: &support::Reply, status: u16) -> String {
    assert_eq!(reply.status, status, "body: {}", reply.text());
    let json = reply.json();
    assert_eq!(json["code"], status, "{json}");
    json["message"].as_str().expect("a message").to_owned()
}

fn e2b_headers(t: &TestServer, json: bool) -> Vec<(String, String)> {
    let mut headers = vec![("X-API-KEY".to_owned(), t.key.clone())];
    if json {
        headers.push(("Content-Type".into(), "application/json".into()));
    }
    headers
}

async fn rest(kind: Kind) {
    let t = TestServer::start(kind).await;
    let db = t.server.db();
    let now = now_ms();
    db.insert_sandbox(&row(
        "sbx-a",
        "running",
        now - 3,
        &[("team", "ml"), ("job", "a&b")],
    ))
    .await
    .unwrap();
    db.insert_sandbox(&row("sbx-b", "paused", now - 2, &[("team", "ml")]))
        .await
        .unwrap();
    db.insert_sandbox(&row("sbx-c", "running", now - 1, &[("team", "web")]))
        .await
        .unwrap();
    db.insert_sandbox(&row("sbx-gone", "stopped", now, &[("team", "ml")]))
        .await
        .unwrap();
    let auth = e2b_headers(&t, false);
    let get = |path: &'static str| t.raw("GET", path, &auth, b"");

    // /health needs no key; the rest do, and say so E2B's way.
    assert_eq!(t.raw("GET", "/health", &[], b"").await.status, 204);
    let unauthenticated = t.raw("GET", "/v2/sandboxes", &[], b"").await;
    assert!(assert_e2b_error(&unauthenticated, 401).contains("API key"));

    // v2 list: running and paused, newest first, E2B's fields.
    let all = get("/v2/sandboxes").await;
    assert_eq!(all.status, 200, "{}", all.text());
    let listed = all.json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sbx-c", "sbx-b", "sbx-a"]);
    let first = &listed[2];
    for field in [
        "templateID",
        "clientID",
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
        "envdVersion",
    ] {
        assert!(!first[field].is_null(), "{field} missing in {first}");
    }
    assert_eq!(first["cpuCount"], 2);
    assert_eq!(first["memoryMB"], 512);
    assert_eq!(first["state"], "running");
    assert_eq!(listed[1]["state"], "paused");
    assert_eq!(first["envdVersion"], wrenn_envd::ENVD_VERSION);
    assert_eq!(first["metadata"]["job"], "a&b");

    // Filters as the SDKs encode them, and paging by x-next-token.
    let ml = get("/v2/sandboxes?metadata=team%3Dml%26job%3Da%2526b")
        .await
        .json();
    assert_eq!(ml.as_array().unwrap().len(), 1, "{ml}");
    assert_eq!(ml[0]["sandboxID"], "sbx-a");
    let paused = get("/v2/sandboxes?state=paused").await.json();
    assert_eq!(paused.as_array().unwrap().len(), 1);
    assert_eq!(paused[0]["sandboxID"], "sbx-b");
    let page = get("/v2/sandboxes?limit=2").await;
    assert_eq!(page.json().as_array().unwrap().len(), 2);
    let token = page
        .header("x-next-token")
        .expect("a next token")
        .to_owned();
    let rest_of = t
        .raw(
            "GET",
            &format!("/v2/sandboxes?limit=2&nextToken={token}"),
            &e2b_headers(&t, false),
            b"",
        )
        .await;
    assert_eq!(rest_of.json()[0]["sandboxID"], "sbx-a");
    assert!(rest_of.header("x-next-token").is_none());
    assert_e2b_error(&get("/v2/sandboxes?state=stopped").await, 400);
    assert_e2b_error(&get("/v2/sandboxes?limit=1000").await, 400);
    // v1 list: running only.
    let v1 = get("/sandboxes").await.json();
    assert_eq!(v1.as_array().unwrap().len(), 2, "{v1}");

    // Get: detail fields; stopped and unknown sandboxes are 404 (E2B forgets killed ones).
    let detail = get("/sandboxes/sbx-a").await;
    assert_eq!(detail.status, 200, "{}", detail.text());
    let detail = detail.json();
    assert_eq!(detail["envdAccessToken"], "token-of-sbx-a");
    assert_eq!(detail["lifecycle"]["onTimeout"], "kill");
    assert_e2b_error(&get("/sandboxes/sbx-gone").await, 404);
    assert_e2b_error(&get("/sandboxes/nope").await, 404);
    assert_e2b_error(&get("/sandboxes/NOT%20AN%20ID").await, 404);

    // Kill, pause, connect, timeout of stopped or unknown sandboxes: 404 as the SDKs expect.
    let with_body = e2b_headers(&t, true);
    for (method, path, body) in [
        ("DELETE", "/sandboxes/sbx-gone", ""),
        ("DELETE", "/sandboxes/nope", ""),
        ("POST", "/sandboxes/sbx-gone/pause", "{}"),
        ("POST", "/v2/sandboxes/nope/connect", "{}"),
        ("POST", "/sandboxes/nope/connect", r#"{"timeout":300}"#),
        ("POST", "/sandboxes/sbx-gone/timeout", r#"{"timeout":60}"#),
    ] {
        let reply = t.raw(method, path, &with_body, body.as_bytes()).await;
        assert_e2b_error(&reply, 404);
    }
    // Pausing a paused sandbox: 409 (the SDK's "already paused").
    let again = t
        .raw("POST", "/sandboxes/sbx-b/pause", &with_body, b"{}")
        .await;
    assert_e2b_error(&again, 409);

    // Bad bodies: 400 with E2B's body.
    for (path, body) in [
        ("/v2/sandboxes", r#"{"templateID":"base","timeout":0}"#),
        ("/v2/sandboxes", r#"{"templateID":"base","timeout":90000}"#),
        (
            "/v2/sandboxes",
            r#"{"templateID":"base","mcp":{"servers":{}}}"#,
        ),
        (
            "/v2/sandboxes",
            r#"{"templateID":"base","volumeMounts":[{"name":"v","path":"/v"}]}"#,
        ),
        ("/sandboxes", r#"{"timeout":10}"#),
        ("/sandboxes", "not json"),
        ("/sandboxes/sbx-a/timeout", r#"{"timeout":-1}"#),
    ] {
        let reply = t.raw("POST", path, &with_body, body.as_bytes()).await;
        let message = assert_e2b_error(&reply, 400);
        assert!(!message.is_empty(), "{path} {body}");
    }
    // Creating with no host: 503 (the SDK retries, then raises ServiceBusy); unknown
    // template: 404.
    let busy = t
        .raw(
            "POST",
            "/v2/sandboxes",
            &with_body,
            br#"{"templateID":"base","metadata":{},"envVars":{}}"#,
        )
        .await;
    assert!(matches!(busy.status, 404 | 503), "{}", busy.text());
    assert_eq!(busy.json()["code"], busy.status);

    // Snapshots: none yet; unknown ones 404 on delete.
    let snapshots = get("/snapshots").await;
    assert_eq!(snapshots.status, 200);
    assert_eq!(snapshots.json(), serde_json::json!([]));
    assert_e2b_error(
        &t.raw("DELETE", "/templates/nope", &e2b_headers(&t, false), b"")
            .await,
        404,
    );
    // Wrenn's own routes keep Wrenn's error body.
    t.call("GET", "/v1/sandboxes/nope", None)
        .await
        .assert_error(404, "not_found");
    t.stop().await;
}
both!(e2b_rest, rest);

/// Timeouts kept by the server: an `autoPause` sandbox's detail says so, and a running one
/// whose time has passed is paused (here its host is unknown, so the pause fails and is put
/// off 30 s: the row shows the pass happened); a killing one past its time is destroyed.
async fn auto_pause(kind: Kind) {
    let t = TestServer::start(kind).await;
    let db = t.server.db();
    let now = now_ms();
    let mut pausing = row("sbx-pauses", "running", now, &[]);
    pausing.on_timeout = "pause".into();
    pausing.auto_resume = true;
    pausing.expires_at = Some(now - 1000);
    db.insert_sandbox(&pausing).await.unwrap();
    let mut killing = row("sbx-kills", "running", now, &[]);
    killing.expires_at = Some(now - 1000);
    db.insert_sandbox(&killing).await.unwrap();

    let auth = e2b_headers(&t, false);
    let detail = t
        .raw("GET", "/sandboxes/sbx-pauses", &auth, b"")
        .await
        .json();
    assert_eq!(detail["lifecycle"]["onTimeout"], "pause", "{detail}");
    assert_eq!(detail["lifecycle"]["autoResume"], true, "{detail}");
    let wrenn = t.call("GET", "/v1/sandboxes/sbx-pauses", None).await.json();
    assert_eq!(wrenn["on_timeout"], "pause");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let row = db.sandbox("sbx-pauses").await.unwrap().unwrap();
        if row.expires_at.unwrap() > now + 20_000 {
            assert_eq!(row.state, "running", "a failed pause puts the state back");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the timeout pauser never looked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The killing one is destroyed by the same pass (its host is unknown here, so only the
    // record changes); E2B forgets it.
    let killed = db.sandbox("sbx-kills").await.unwrap().unwrap();
    assert_eq!(killed.state, "stopped");
    let gone = t.raw("GET", "/sandboxes/sbx-kills", &auth, b"").await;
    assert_e2b_error(&gone, 404);
    t.stop().await;
}
both!(e2b_auto_pause, auto_pause);

async fn routing(kind: Kind) {
    let t = TestServer::start(kind).await;
    let db = t.server.db();
    let now = now_ms();
    db.insert_sandbox(&row("sbx-live", "running", now, &[]))
        .await
        .unwrap();
    db.insert_sandbox(&row("sbx-asleep", "paused", now, &[]))
        .await
        .unwrap();
    let envd = |id: &str, token: Option<&str>| {
        let mut headers = vec![
            ("E2b-Sandbox-Id".to_owned(), id.to_owned()),
            ("E2b-Sandbox-Port".to_owned(), "49983".to_owned()),
        ];
        if let Some(token) = token {
            headers.push(("X-Access-Token".into(), token.into()));
        }
        headers
    };

    // The header decides: with it, /health is the sandbox's, not the API's.
    let missing_port = t
        .raw(
            "GET",
            "/health",
            &[("E2b-Sandbox-Id".into(), "sbx-live".into())],
            b"",
        )
        .await;
    assert!(assert_e2b_error(&missing_port, 400).contains("E2b-Sandbox-Port"));
    for id in ["sbx-asleep", "sbx-unknown"] {
        let reply = t.raw("GET", "/health", &envd(id, None), b"").await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        let json = reply.json();
        assert_eq!(json["sandboxId"], id);
        assert!(
            json["message"].as_str().unwrap().contains("was not found"),
            "{json}"
        );
    }
    // No token, a wrong one, /init: refused here, before any host is asked.
    let rpc = "/process.Process/List";
    let no_token = t.raw("POST", rpc, &envd("sbx-live", None), b"{}").await;
    assert!(assert_e2b_error(&no_token, 401).contains("access token"));
    let wrong = t
        .raw(
            "POST",
            rpc,
            &envd("sbx-live", Some("token-of-sbx-asleep")),
            b"{}",
        )
        .await;
    assert_e2b_error(&wrong, 401);
    let init = t
        .raw(
            "POST",
            "/init",
            &envd("sbx-live", Some("token-of-sbx-live")),
            b"{}",
        )
        .await;
    assert_e2b_error(&init, 403);
    // With its token the request goes on to the sandbox's host, which is unknown here: the
    // proxy's own error, not an auth refusal.
    let through = t
        .raw(
            "POST",
            rpc,
            &envd("sbx-live", Some("token-of-sbx-live")),
            b"{}",
        )
        .await;
    assert_eq!(through.status, 503, "{}", through.text());
    assert_eq!(through.json()["sandboxId"], "sbx-live");

    // A signed /files URL without the header finds its sandbox by the signature.
    let signed = wrenn_envd::http::signing::signature(
        "/tmp/a.txt",
        wrenn_envd::http::signing::Operation::Read,
        "user",
        "token-of-sbx-live",
        None,
    );
    let encoded: String = url_encode(&signed);
    let found = t
        .raw(
            "GET",
            &format!("/files?path=%2Ftmp%2Fa.txt&username=user&signature={encoded}"),
            &[],
            b"",
        )
        .await;
    assert_eq!(
        found.status,
        503,
        "routed to sbx-live's (unknown) host: {}",
        found.text()
    );
    assert_eq!(found.json()["sandboxId"], "sbx-live");
    let forged = t
        .raw(
            "GET",
            "/files?path=%2Ftmp%2Fa.txt&username=user&signature=v1_forged",
            &[],
            b"",
        )
        .await;
    assert!(assert_e2b_error(&forged, 401).contains("signature"));
    // An expired signature matches nothing.
    let expired = wrenn_envd::http::signing::signature(
        "/tmp/a.txt",
        wrenn_envd::http::signing::Operation::Read,
        "",
        "token-of-sbx-live",
        Some(1000),
    );
    let stale = t
        .raw(
            "GET",
            &format!(
                "/files?path=%2Ftmp%2Fa.txt&signature={}&signature_expiration=1000",
                url_encode(&expired)
            ),
            &[],
            b"",
        )
        .await;
    assert_e2b_error(&stale, 401);
    t.stop().await;
}
both!(e2b_routing, routing);

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
