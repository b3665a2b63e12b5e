//! envd's plain endpoints and the token, over HTTP against the real binary.
mod common;

use common::Envd;
use serde_json::json;

#[test]
fn health_init_envs_and_the_token() {
    let mut envd = Envd::start();
    let client = envd.client();
    let health = client.get("/health").unwrap();
    assert_eq!(health.status, 204);
    assert_eq!(health.header("cache-control"), Some("no-store"));

    let init = client
        .request(
            "POST",
            "/init",
            &[("content-type", "application/json")],
            json!({"accessToken": "secret", "envVars": {"GREETING": "hi"}, "defaultUser": "tester",
                   "timestamp": "2026-01-01T00:00:00.5Z", "unknownField": 1})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
    assert_eq!(init.status, 204, "{}", init.text());
    assert_eq!(
        init.header("x-envd-version"),
        Some(wrenn_envd::ENVD_VERSION)
    );

    // Without the token: 401 with E2B's JSON body; /health stays open.
    let denied = client.get("/envs").unwrap();
    assert_eq!(denied.status, 401);
    assert_eq!(denied.json()["code"], 401);
    assert_eq!(client.get("/health").unwrap().status, 204);
    let denied_rpc = client.unary("process.Process/List", &json!({}));
    assert_eq!(denied_rpc.status, 401);

    let authed = client.clone().with("x-access-token", "secret");
    let envs = authed.get("/envs").unwrap();
    assert_eq!(envs.status, 200);
    assert_eq!(envs.json(), json!({"GREETING": "hi"}));
    let metrics = authed.get("/metrics").unwrap().json();
    assert!(metrics["mem_total"].as_u64().unwrap() > 0, "{metrics}");
    assert!(metrics["cpu_count"].as_u64().unwrap() >= 1, "{metrics}");

    // A second /init needs the current token; an unknown default user is refused.
    let stranger = client
        .request(
            "POST",
            "/init",
            &[],
            json!({"accessToken": "mine"}).to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(stranger.status, 401);
    let bad_user = authed
        .request(
            "POST",
            "/init",
            &[],
            json!({"defaultUser": "nobody-at-all"})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    assert_eq!(bad_user.status, 400);
    assert!(
        bad_user.json()["message"]
            .as_str()
            .unwrap()
            .contains("nobody-at-all")
    );
    let bad_json = authed.request("POST", "/init", &[], b"{not json").unwrap();
    assert_eq!(bad_json.status, 400);
    assert!(envd.alive());
}
