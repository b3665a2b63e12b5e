//! `wrenn up`, README's first command, for real: the guest from the cache, the control plane,
//! an agent (inside the host VM on machines whose KVM cannot run Linux guests), the `base`
//! template, a sandbox through the REST API; then a second start that reuses the template and
//! the key and stops cleanly on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wrenn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wrenn"))
}

fn up(data: &Path, api: u16, agent: u16) -> Command {
    let mut cmd = wrenn();
    cmd.arg("up")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--agent-port", &agent.to_string()])
        .args(["--template-memory-mib", "256"])
        .env("WRENN_LOG", "warn");
    cmd
}

/// Whether nothing listens on `port` any more, waiting a little: the host VM (and its port
/// forward) is killed by the kernel when `up` exits, a moment later.
fn closed(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let open = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )
        .is_ok();
        if !open {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn test_up_check_then_up_again_reuses_everything_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (api, agent) = (free_port(), free_port());

    // 1. First start: builds the template, makes the key, runs a sandbox, exits.
    let out = up(dir.path(), api, agent)
        .arg("--check")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Wrenn is up."), "{stdout}");
    assert!(stderr.contains("building template base"), "{stderr}");
    assert!(stderr.contains("said \"hello from sbx-"), "{stderr}");
    let key = std::fs::read_to_string(dir.path().join("server/api-key")).unwrap();
    assert!(stdout.contains(&format!("API key:  {key}")), "{stdout}");
    assert!(closed(api), "the API still listens");
    assert!(closed(agent), "the agent still listens");

    // 2. Again, staying up: the template and the key are the ones from before.
    let mut child = up(dir.path(), api, agent)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
    }
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !log
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops Wrenn"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => panic!("wrenn up never came up:\n{}", log.join("\n")),
        }
    }
    let text = log.join("\n");
    assert!(text.contains("template base: ready"), "{text}");
    assert!(!text.contains("building template base"), "{text}");
    assert!(text.contains(&format!("API key:  {key}")), "{text}");

    // The CLI as a user drives it, with the kept key, on a real sandbox.
    let cli = |args: &[&str]| {
        let out = wrenn()
            .args(args)
            .env("WRENN_API_URL", format!("http://127.0.0.1:{api}"))
            .env("WRENN_API_KEY", &key)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    let (code, out, err) = cli(&["sandbox", "create", "base", "--id", "cli-e2e", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["state"], "running");
    let (code, out, err) = cli(&[
        "sandbox",
        "exec",
        "cli-e2e",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (Some(7), "out\n", "err\n")
    );
    let local = dir.path().join("up.bin");
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    std::fs::write(&local, &data).unwrap();
    let (code, out, err) = cli(&[
        "files",
        "put",
        "cli-e2e",
        local.to_str().unwrap(),
        "/root/up.bin",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = cli(&["sandbox", "pause", "cli-e2e"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = cli(&["sandbox", "list", "--state", "paused"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("cli-e2e ") && l.contains("paused")),
        "{out}"
    );
    let (code, _, err) = cli(&["sandbox", "resume", "cli-e2e"]);
    assert_eq!(code, Some(0), "{err}");
    let back = dir.path().join("back.bin");
    let (code, _, err) = cli(&[
        "files",
        "get",
        "cli-e2e",
        "/root/up.bin",
        back.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the file came back different"
    );
    let (code, _, err) = cli(&["sandbox", "rm", "cli-e2e"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = cli(&["sandbox", "get", "cli-e2e", "--json"]);
    assert!(out.contains("\"stopped\""), "{out}");

    // Ctrl-C: everything stops, nothing listens any more.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("wrenn up did not stop within 60 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "{status}");
    assert!(closed(api), "the API still listens");
    assert!(closed(agent), "the agent still listens");
}
