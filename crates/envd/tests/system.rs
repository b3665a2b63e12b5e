//! envd's system duties against the real binary on the build host (as root): `/init` must not
//! touch the host's clock or `/run` when envd does not manage the system, and port
//! forwarding, inside a network namespace of the test's own so the host's network is
//! untouched.
mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use common::Envd;
use serde_json::json;

#[test]
fn init_with_timestamp_leaves_host_clock_and_run_alone() {
    let envd = Envd::start();
    let sandbox_id = format!("sbx-test-{}", std::process::id());
    let reply = envd
        .client()
        .request(
            "POST",
            "/init",
            &[("content-type", "application/json")],
            json!({"timestamp": "2001-02-03T04:05:06Z", "sandboxId": sandbox_id})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    assert_eq!(reply.status, 204, "{}", reply.text());
    let year_2020 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800);
    assert!(SystemTime::now() > year_2020, "the host clock was set back");
    let published = std::fs::read_to_string("/run/e2b/.E2B_SANDBOX_ID").unwrap_or_default();
    assert_ne!(published, sandbox_id, "envd wrote the host's /run/e2b");
}

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Self {
        let name = format!("wrenn-envd-test-{}", std::process::id());
        // A namespace left behind by a killed run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = Self(name);
        ns.run(&["ip", "netns", "add", &ns.0], false);
        ns
    }

    /// Runs `argv` (inside the namespace when `inside`), asserting success.
    fn run(&self, argv: &[&str], inside: bool) -> Output {
        let output = self.command(argv, inside).output().unwrap();
        assert!(
            output.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn command(&self, argv: &[&str], inside: bool) -> Command {
        let mut command = if inside {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &self.0]).args(argv);
            command
        } else {
            let mut command = Command::new(argv[0]);
            command.args(&argv[1..]);
            command
        };
        command.stdin(Stdio::null());
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fetches `url` from inside the namespace: `Some(body)` on success.
fn fetch(ns: &NetNs, url: &str) -> Option<String> {
    let output = ns
        .command(&["curl", "-sf", "--max-time", "2", url], true)
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn loopback_listener_is_forwarded_to_the_external_address() {
    let ns = NetNs::new();
    ns.run(&["ip", "link", "set", "lo", "up"], true);
    ns.run(
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ],
        true,
    );
    ns.run(&["ip", "addr", "add", "10.200.0.2/24", "dev", "eth0"], true);
    ns.run(&["ip", "link", "set", "eth0", "up"], true);
    ns.run(&["ip", "link", "set", "eth1", "up"], true);

    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\n").unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "forwarded hello\n").unwrap();

    let envd_port = "49983";
    let mut envd = ns
        .command(
            &[
                env!("CARGO_BIN_EXE_envd"),
                "--port",
                envd_port,
                "--port-forward",
                "--forward-address",
                "10.200.0.2",
                "--etc",
                etc.to_str().unwrap(),
            ],
            true,
        )
        .env("ENVD_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = envd.stderr.take().unwrap();
    let envd = Killed(envd);
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[envd] {line}");
            if line == "envd: ready" {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("envd printed no 'envd: ready'");

    let server = Killed(
        ns.command(
            &[
                "python3",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "8123",
            ],
            true,
        )
        .current_dir(&site)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    // The server answers on loopback first; then envd's scan picks it up.
    let deadline = Instant::now() + Duration::from_secs(15);
    while fetch(&ns, "http://127.0.0.1:8123/hello.txt").is_none() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = loop {
        if let Some(body) = fetch(&ns, "http://10.200.0.2:8123/hello.txt") {
            break body;
        }
        assert!(Instant::now() < deadline, "port 8123 was not forwarded");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(body, "forwarded hello\n");
    // envd's own port is served on all addresses, never forwarded: /health answers directly.
    assert!(fetch(&ns, &format!("http://10.200.0.2:{envd_port}/health")).is_some());

    // The listener goes away: so does the forwarder (connections are refused again).
    drop(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refused = ns
            .command(
                &[
                    "python3",
                    "-c",
                    "import socket,sys\ntry:\n socket.create_connection(('10.200.0.2',8123),2)\nexcept ConnectionRefusedError:\n sys.exit(0)\nsys.exit(1)",
                ],
                true,
            )
            .status()
            .unwrap()
            .success();
        if refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the forwarder outlived its listener"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(envd);
}
