//! `wrenn_agent::envd::EnvdClient` against the real envd binary, run as an ordinary process
//! on a free port with its own user database (`--etc`), as envd's own tests do. It does not
//! manage the system (no clock, cgroups, mounts) and is killed when the test ends.
//!
//! Needs `target/debug/envd`: `cargo build -p wrenn-envd --bin envd`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use connectrpc::ErrorCode;
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use wrenn_agent::envd::{EnvdClient, EnvdError, ExecEvent, ExecSpec, InitRequest};

/// The uid/gid of the unprivileged user `tester`.
const TESTER_UID: u32 = 4242;

/// A running envd with users `root` and `tester` (home `<dir>/home/tester`).
struct Envd {
    child: Child,
    address: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("root")).unwrap();
        let home = root.join("home/tester");
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(TESTER_UID), Some(TESTER_UID)).unwrap();
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            format!(
                "root:x:0:0:root:{}:/bin/sh\ntester:x:{TESTER_UID}:{TESTER_UID}::{}:/bin/sh\n",
                root.join("root").display(),
                home.display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            format!("root:x:0:\ntester:x:{TESTER_UID}:\n"),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(envd_binary())
            .arg("--port")
            .arg(port.to_string())
            .arg("--etc")
            .arg(root.join("etc"))
            .env("ENVD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        }
    }

    fn root_home(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn tester_home(&self) -> PathBuf {
        self.dir.path().join("home/tester")
    }

    /// A client that has waited for envd to serve.
    async fn client(&self) -> EnvdClient {
        let client = EnvdClient::new(self.address, None);
        client.wait_healthy(Duration::from_secs(20)).await.unwrap();
        client
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/debug/envd`: the test executable lives in `target/debug/deps/`.
fn envd_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("envd"))
        .unwrap();
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p wrenn-envd --bin envd` first",
        path.display()
    );
    path
}

fn command(cmd: &str, args: &[&str]) -> ExecSpec {
    ExecSpec {
        cmd: cmd.to_owned(),
        args: args.iter().map(|&a| a.to_owned()).collect(),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    }
}

/// Piece `i` (1 MiB) of the large test file.
fn piece(i: u8) -> Vec<u8> {
    (0..1usize << 20)
        .map(|j| {
            u8::try_from(j % 256)
                .unwrap()
                .wrapping_mul(31)
                .wrapping_add(i)
        })
        .collect()
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn test_wait_healthy_before_start_then_ready() {
    // The client is polling before envd listens: refused connections are retried.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = EnvdClient::new(SocketAddr::from(([127, 0, 0, 1], port)), None);
    let error = client
        .wait_healthy(Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::Unavailable, "{error}");
    assert!(
        error.to_string().contains("did not become healthy"),
        "{error}"
    );

    let envd = Envd::start();
    let client = EnvdClient::new(envd.address, None);
    let took = client.wait_healthy(Duration::from_secs(20)).await.unwrap();
    assert!(took < Duration::from_secs(20));
}

#[tokio::test]
async fn test_init_sets_token_then_token_required() {
    let envd = Envd::start();
    let client = envd.client().await;
    let mut env = BTreeMap::new();
    env.insert("FROM_INIT".to_owned(), "yes".to_owned());
    client
        .init(&InitRequest {
            env_vars: env,
            access_token: Some("secret-1".into()),
            sandbox_id: Some("sb-test".into()),
            ..Default::default()
        })
        .await
        .unwrap();

    // The client switched to the new token: commands work and see /init's environment.
    let out = client
        .exec(&command("sh", &["-c", "echo $FROM_INIT"]), 1024)
        .await
        .unwrap();
    assert_eq!(&out.stdout[..], b"yes\n");

    // Without it, envd refuses both RPCs and files.
    let stranger = EnvdClient::new(envd.address, None);
    let error = stranger
        .exec(&command("true", &[]), 1024)
        .await
        .unwrap_err();
    assert!(
        matches!(error, EnvdError::TokenRejected { .. }),
        "{error:?}"
    );
    let error = stranger
        .read_file("/etc/hostname", None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(error, EnvdError::TokenRejected { .. }),
        "{error:?}"
    );
    let mut wrong = EnvdClient::new(envd.address, Some("wrong".into()));
    let error = wrong.init(&InitRequest::default()).await.unwrap_err();
    assert!(
        matches!(error, EnvdError::TokenRejected { .. }),
        "{error:?}"
    );

    // A client told the token works; a second /init rotates it.
    wrong.set_access_token(Some("secret-1".into()));
    wrong
        .init(&InitRequest {
            access_token: Some("secret-2".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    wrong.exec(&command("true", &[]), 16).await.unwrap();
    let error = client.exec(&command("true", &[]), 16).await.unwrap_err();
    assert!(
        matches!(error, EnvdError::TokenRejected { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn test_init_unknown_default_user_invalid_argument() {
    let envd = Envd::start();
    let client = envd.client().await;
    let error = client
        .init(&InitRequest {
            default_user: Some("nobody-here".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::InvalidArgument, "{error}");
    assert!(error.to_string().contains("nobody-here"), "{error}");
}

#[tokio::test]
async fn test_exec_echo_and_exit_codes() {
    let envd = Envd::start();
    let client = envd.client().await;
    let out = client.exec(&command("echo", &["hi"]), 1024).await.unwrap();
    assert_eq!(&out.stdout[..], b"hi\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.exit_code, 0);
    assert!(!out.truncated);
    assert!(out.pid > 0);

    let out = client
        .exec(&command("sh", &["-c", "echo oops >&2; exit 3"]), 1024)
        .await
        .unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(&out.stderr[..], b"oops\n");

    // Killed by a signal: -1.
    let out = client
        .exec(&command("sh", &["-c", "kill -9 $$"]), 1024)
        .await
        .unwrap();
    assert_eq!(out.exit_code, -1);
}

#[tokio::test]
async fn test_exec_env_cwd_user_applied() {
    let envd = Envd::start();
    let client = envd.client().await;
    let mut spec = command("sh", &["-c", "echo $GREETING; pwd; id -u"]);
    spec.envs.insert("GREETING".into(), "hello".into());
    spec.cwd = Some("/tmp".into());
    spec.user = Some("tester".into());
    let out = client.exec(&spec, 1024).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hello\n/tmp\n{TESTER_UID}\n")
    );

    spec.user = Some("no-such-user".into());
    let error = client.exec(&spec, 1024).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::InvalidArgument, "{error}");
    assert!(matches!(error, EnvdError::UnknownUser { ref user, .. } if user == "no-such-user"));
}

#[tokio::test]
async fn test_exec_stdin_to_cat() {
    let envd = Envd::start();
    let client = envd.client().await;
    let mut spec = command("cat", &[]);
    // Larger than one SendInput piece.
    let data: Vec<u8> = (0..1_000_000u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    spec.stdin = Some(Bytes::from(data.clone()));
    let out = client.exec(&spec, 2_000_000).await.unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout[..] == data[..], "cat echoed other bytes");

    // Empty stdin: the command sees end of input at once.
    spec.cmd = "wc".into();
    spec.args = vec!["-c".into()];
    spec.stdin = Some(Bytes::new());
    let out = client.exec(&spec, 1024).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");

    // A command that stops reading early is not an error.
    spec.cmd = "head".into();
    spec.args = vec!["-c".into(), "3".into()];
    spec.stdin = Some(Bytes::from(vec![b'x'; 4_000_000]));
    let out = client.exec(&spec, 1024).await.unwrap();
    assert_eq!(&out.stdout[..], b"xxx");
    assert_eq!(out.exit_code, 0);
}

#[tokio::test]
async fn test_exec_output_over_limit_truncated() {
    let envd = Envd::start();
    let client = envd.client().await;
    let out = client
        .exec(
            &command("sh", &["-c", "head -c 200000 /dev/zero; echo err >&2"]),
            1000,
        )
        .await
        .unwrap();
    assert!(out.truncated);
    assert_eq!(out.stdout.len(), 1000);
    assert_eq!(&out.stderr[..], b"err\n");
    assert_eq!(out.exit_code, 0);
}

#[tokio::test]
async fn test_exec_stream_events_in_order() {
    let envd = Envd::start();
    let client = envd.client().await;
    let spec = command(
        "sh",
        &[
            "-c",
            "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; exit 7",
        ],
    );
    let events: Vec<ExecEvent> = client
        .exec_stream(&spec)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert!(
        matches!(events[0], ExecEvent::Started(pid) if pid > 0),
        "{events:?}"
    );
    assert_eq!(
        events[1..],
        [
            ExecEvent::Stdout(Bytes::from_static(b"one\n")),
            ExecEvent::Stderr(Bytes::from_static(b"two\n")),
            ExecEvent::Stdout(Bytes::from_static(b"three\n")),
            ExecEvent::Exit(7),
        ]
    );
}

#[tokio::test]
async fn test_exec_stream_is_send_and_static() {
    let envd = Envd::start();
    let client = envd.client().await;
    let stream = client
        .exec_stream(&command("echo", &["spawned"]))
        .await
        .unwrap();
    drop(client);
    let events = tokio::spawn(stream.collect::<Vec<_>>()).await.unwrap();
    assert!(events.iter().all(Result::is_ok));
    assert!(matches!(events.last(), Some(Ok(ExecEvent::Exit(0)))));
}

#[tokio::test]
async fn test_exec_missing_program_error() {
    let envd = Envd::start();
    let client = envd.client().await;
    let error = client
        .exec(&command("/no/such/program", &[]), 1024)
        .await
        .unwrap_err();
    assert!(matches!(error, EnvdError::NotStarted { .. }), "{error:?}");
    assert_eq!(error.code(), ErrorCode::InvalidArgument);
    let text = error.to_string();
    assert!(text.contains("/no/such/program"), "{text}");
    assert!(text.contains("No such file"), "{text}");

    let mut spec = command("true", &[]);
    spec.cwd = Some("/no/such/dir".into());
    let error = client.exec(&spec, 1024).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::InvalidArgument, "{error}");
    assert!(error.to_string().contains("/no/such/dir"), "{error}");
}

#[tokio::test]
async fn test_exec_timeout_deadline_exceeded() {
    let envd = Envd::start();
    let client = envd.client().await;
    let mut spec = command("sleep", &["30"]);
    spec.timeout = Some(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let error = client.exec(&spec, 1024).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::DeadlineExceeded, "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn test_envd_gone_unavailable() {
    let mut envd = Envd::start();
    let client = envd.client().await;
    envd.child.kill().unwrap();
    envd.child.wait().unwrap();
    let error = client.exec(&command("true", &[]), 16).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::Unavailable, "{error:?}");
    let error = client.read_file("/etc/hostname", None).await.err().unwrap();
    assert_eq!(error.code(), ErrorCode::Unavailable, "{error:?}");
}

#[tokio::test]
async fn test_write_then_read_64_mib_sha256() {
    let envd = Envd::start();
    let client = envd.client().await;
    let path = envd.root_home().join("big.bin");
    let path = path.to_str().unwrap();

    // 64 MiB in 1 MiB pieces, made as they are sent (never all in memory at once).
    let mut hasher = Sha256::new();
    for i in 0..64 {
        hasher.update(piece(i));
    }
    let expected = hex(&hasher.finalize());
    let body = futures::stream::iter((0..64).map(|i| Ok(Bytes::from(piece(i)))));
    let written = client.write_file(path, None, body).await.unwrap();
    assert_eq!(written, 64 << 20);
    assert_eq!(std::fs::metadata(path).unwrap().len(), 64 << 20);

    let mut stream = Box::pin(client.read_file(path, None).await.unwrap());
    let mut hasher = Sha256::new();
    let mut total = 0usize;
    let mut chunks = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        total += chunk.len();
        chunks += 1;
        hasher.update(&chunk);
    }
    assert_eq!(total, 64 << 20);
    assert!(chunks > 1, "the file came in one piece");
    assert_eq!(hex(&hasher.finalize()), expected);
}

#[tokio::test]
async fn test_files_as_user_and_errors() {
    let envd = Envd::start();
    let client = envd.client().await;

    // Written as tester, in its home: owned by tester.
    let mine = envd.tester_home().join("note.txt");
    let body = futures::stream::iter([Ok(Bytes::from_static(b"hello"))]);
    client
        .write_file(mine.to_str().unwrap(), Some("tester"), body)
        .await
        .unwrap();
    let meta = std::fs::metadata(&mine).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), TESTER_UID);

    // A missing file: not_found.
    let error = client.read_file("/no/such/file", None).await.err().unwrap();
    assert_eq!(error.code(), ErrorCode::NotFound, "{error}");
    assert!(error.to_string().contains("/no/such/file"), "{error}");

    // tester may not write into root's home: permission_denied, and nothing is left there.
    let theirs = envd.root_home().join("not-yours.txt");
    let body = futures::stream::iter([Ok(Bytes::from_static(b"x"))]);
    let error = client
        .write_file(theirs.to_str().unwrap(), Some("tester"), body)
        .await
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::PermissionDenied, "{error}");
    assert!(!theirs.exists());

    // An unknown user: invalid_argument.
    let error = client
        .read_file(mine.to_str().unwrap(), Some("ghost"))
        .await
        .err()
        .unwrap();
    assert_eq!(error.code(), ErrorCode::InvalidArgument, "{error}");
}

#[tokio::test]
async fn test_write_file_source_error_leaves_old_file() {
    let envd = Envd::start();
    let client = envd.client().await;
    let path = envd.root_home().join("kept.txt");
    std::fs::write(&path, b"old").unwrap();
    let body = futures::stream::iter([
        Ok(Bytes::from_static(b"new data")),
        Err(std::io::Error::other("disk on fire")),
    ]);
    let error = client
        .write_file(path.to_str().unwrap(), None, body)
        .await
        .unwrap_err();
    assert!(matches!(error, EnvdError::UploadSource { .. }), "{error:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
}

/// Client-side sockets to `port` in any state (TIME-WAIT included), from /proc/net/tcp.
fn sockets_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let wanted = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            line.split_whitespace()
                .nth(2)
                .is_some_and(|remote| remote.ends_with(&wanted))
        })
        .count()
}

#[tokio::test]
async fn test_exec_connections_pooled() {
    let envd = Envd::start();
    let client = envd.client().await;
    for _ in 0..20 {
        let out = client.exec(&command("true", &[]), 16).await.unwrap();
        assert_eq!(out.exit_code, 0);
    }
    // Each exec on a fresh connection would leave 20 sockets behind (in TIME-WAIT).
    let sockets = sockets_to(envd.address.port());
    assert!(sockets <= 3, "{sockets} connections for 20 commands");
}
