//! The `wrenn` CLI as a client of a real `wrenn server` (SQLite, no agent): tables, `--json`,
//! the API's errors as one line and a non-zero exit, keys made in the database.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
    key: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wrenn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wrenn"))
}

fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = dir.path().join("server");
    let key = wrenn()
        .args(["keys", "create", "--name", "cli-test", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(key.status.success(), "{key:?}");
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("wrenn_") && key.len() == 46, "{key}");
    let child = wrenn()
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "wrenn server did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    Server {
        child,
        url,
        _dir: dir,
        key,
    }
}

impl Server {
    fn run(&self, args: &[&str]) -> Output {
        wrenn()
            .args(args)
            .env("WRENN_API_URL", &self.url)
            .env("WRENN_API_KEY", &self.key)
            .output()
            .unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn test_cli_lists_as_tables_and_json_and_reports_api_errors() {
    let server = start();

    let out = server.run(&["sandbox", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let header = text(&out.stdout);
    assert!(header.starts_with("ID  TEMPLATE  STATE"), "{header}");

    let out = server.run(&["sandbox", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["sandboxes"], serde_json::json!([]));

    for args in [&["snapshot", "list"][..], &["hosts", "list"]] {
        let out = server.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }

    // The API's errors: one line naming the code, and exit 1.
    let out = server.run(&["sandbox", "get", "no-such-sandbox"]);
    assert_eq!(out.status.code(), Some(1));
    let error = text(&out.stderr);
    assert!(
        error.contains("not_found") && error.contains("404"),
        "{error}"
    );

    let out = server.run(&["sandbox", "create", "base"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("HTTP 503"),
        "{}",
        text(&out.stderr)
    );

    let out = wrenn()
        .args(["sandbox", "list"])
        .env("WRENN_API_URL", &server.url)
        .env(
            "WRENN_API_KEY",
            "wrenn_0000000000000000000000000000000000000000",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unauthenticated"),
        "{}",
        text(&out.stderr)
    );

    // A server that is not there: a clear message, not a panic.
    let out = wrenn()
        .args(["sandbox", "list"])
        .env("WRENN_API_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the Wrenn API"),
        "{}",
        text(&out.stderr)
    );

    // Bad arguments are the CLI's own errors.
    let out = server.run(&["sandbox", "create", "base", "--env", "NOEQUALS"]);
    assert_eq!(out.status.code(), Some(2));
}
