//! The Connect protocol as envd serves it, checked byte by byte with a hand-written client:
//! unary JSON and binary, stream envelopes, errors in the end-of-stream envelope (HTTP 200),
//! the HTTP statuses of unary errors, and bad input that must leave envd serving.
mod common;

use common::{Envd, envelope};
use serde_json::json;

#[test]
fn unary_json_and_errors() {
    let mut envd = Envd::start();
    let client = envd.client();

    let list = client.unary("process.Process/List", &json!({}));
    assert_eq!(list.status, 200, "{}", list.text());
    assert!(
        list.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    assert!(list.json().is_object());

    // Unknown method: 404 with a Connect error body.
    let missing = client.unary("process.Process/Explode", &json!({}));
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "unimplemented");

    // Malformed JSON: invalid_argument (HTTP 400), and envd keeps serving.
    let garbage = client
        .request(
            "POST",
            "/filesystem.Filesystem/Stat",
            &[("content-type", "application/json")],
            b"{\"path\": ",
        )
        .unwrap();
    assert_eq!(garbage.status, 400, "{}", garbage.text());
    assert_eq!(garbage.json()["code"], "invalid_argument");

    // A wrongly typed field is invalid too.
    let typed = client.unary("filesystem.Filesystem/Stat", &json!({"path": 12}));
    assert_eq!(typed.status, 400, "{}", typed.text());
    assert_eq!(typed.json()["code"], "invalid_argument");

    // An unsupported content type: 415.
    let text = client
        .request(
            "POST",
            "/process.Process/List",
            &[("content-type", "text/plain")],
            b"{}",
        )
        .unwrap();
    assert_eq!(text.status, 415, "{}", text.text());

    // An oversized message is refused before it is decoded.
    let huge = json!({"path": "x".repeat(wrenn_envd::server::MAX_MESSAGE_BYTES + 1024)});
    let refused = client.unary("filesystem.Filesystem/Stat", &huge);
    assert!(
        refused.status == 429 || refused.status == 413,
        "{} {}",
        refused.status,
        refused.text()
    );

    // Not found, with the code the SDK maps to NotFoundException.
    let stat = client.unary(
        "filesystem.Filesystem/Stat",
        &json!({"path": "/definitely/not/here"}),
    );
    assert_eq!(stat.status, 404, "{}", stat.text());
    assert_eq!(stat.json()["code"], "not_found");

    // An unknown user: unauthenticated (401).
    let stranger = client
        .clone()
        .user("nobody-at-all")
        .unary("process.Process/List", &json!({}));
    assert_eq!(stranger.status, 401, "{}", stranger.text());
    assert_eq!(stranger.json()["code"], "unauthenticated");
    assert!(
        stranger.json()["message"]
            .as_str()
            .unwrap()
            .contains("nobody-at-all")
    );

    assert_eq!(client.get("/health").unwrap().status, 204);
    assert!(envd.alive());
}

#[test]
fn binary_codec_is_served_too() {
    let envd = Envd::start();
    // An empty ListRequest is zero bytes in the binary codec.
    let reply = envd
        .client()
        .request(
            "POST",
            "/process.Process/List",
            &[("content-type", "application/proto")],
            b"",
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/proto"));
}

#[test]
fn stream_envelopes_and_end_of_stream_errors() {
    let mut envd = Envd::start();
    let client = envd.client();

    let frames = client
        .server_stream(
            "process.Process/Start",
            &json!({"process": {"cmd": "/bin/sh", "args": ["-c", "printf hello"]}, "stdin": false}),
            &[],
        )
        .collect();
    assert!(frames.len() >= 3, "{frames:?}");
    assert!(
        frames[0].json["event"]["start"]["pid"].as_u64().unwrap() > 0,
        "{frames:?}"
    );
    let last = frames.last().unwrap();
    assert!(
        last.end,
        "the stream must close with an end-of-stream envelope: {frames:?}"
    );
    assert_eq!(last.json, json!({}), "a clean end carries no error");
    let stdout: Vec<u8> = frames
        .iter()
        .filter_map(|f| f.json["event"]["data"]["stdout"].as_str())
        .flat_map(common::unb64)
        .collect();
    assert_eq!(stdout, b"hello");

    // An error after the stream started is reported in the end envelope, over HTTP 200.
    let stranger = client.clone().user("nobody-at-all");
    let stream = stranger.server_stream(
        "process.Process/Start",
        &json!({"process": {"cmd": "/bin/true"}}),
        &[],
    );
    assert_eq!(stream.status, 200);
    let frames = stream.collect();
    let last = frames.last().unwrap();
    assert!(last.end, "{frames:?}");
    assert_eq!(last.json["error"]["code"], "unauthenticated", "{frames:?}");

    // A truncated envelope is an error, not a hang or a crash.
    let mut body = envelope(0, &json!({"process": {"cmd": "/bin/true"}}));
    body.truncate(body.len() - 3);
    let (status, _, reader) = client
        .send(
            "POST",
            "/process.Process/Start",
            &[("content-type", "application/connect+json")],
            &body,
        )
        .unwrap();
    let mut stream = common::Stream::from_parts(status, reader);
    let frames: Vec<_> = std::iter::from_fn(|| stream.next()).collect();
    assert!(
        status >= 400
            || frames
                .last()
                .is_some_and(|f| f.end && f.json["error"]["code"].is_string()),
        "{status} {frames:?}"
    );
    assert!(envd.alive());
}
