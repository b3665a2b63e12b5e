//! The `process.Process` service over HTTP against the real envd binary: real processes,
//! real users, the Connect protocol spoken by hand.
mod common;

use std::time::{Duration, Instant};

use common::{Client, Envd, Frame, Stream, b64, unb64, wait_for};
use serde_json::{Value, json};

const START: &str = "process.Process/Start";

/// What a finished stream carried.
#[derive(Debug, Default)]
struct Run {
    pid: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    keepalives: usize,
    end: Option<Value>,
    /// The end-of-stream frame's error, if any.
    error: Option<Value>,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn pty(&self) -> String {
        String::from_utf8_lossy(&self.pty).into_owned()
    }

    fn end(&self) -> &Value {
        self.end
            .as_ref()
            .unwrap_or_else(|| panic!("no end event: {self:?}"))
    }

    fn exit_code(&self) -> i64 {
        self.end()["exitCode"].as_i64().unwrap_or(0)
    }

    fn error_code(&self) -> &str {
        self.error
            .as_ref()
            .and_then(|e| e["code"].as_str())
            .unwrap_or_else(|| panic!("no error: {self:?}"))
    }

    fn error_message(&self) -> &str {
        self.error
            .as_ref()
            .and_then(|e| e["message"].as_str())
            .unwrap_or_default()
    }

    /// Adds one frame; true at the end of the stream.
    fn add(&mut self, frame: &Frame) -> bool {
        if frame.end {
            self.error = frame.json.get("error").cloned();
            return true;
        }
        let event = &frame.json["event"];
        if let Some(start) = event.get("start") {
            assert_eq!(self.pid, 0, "a second start event: {frame:?}");
            assert!(self.end.is_none());
            self.pid = start["pid"].as_u64().unwrap();
        } else if let Some(data) = event.get("data") {
            assert_ne!(self.pid, 0, "data before start");
            assert!(self.end.is_none(), "data after end");
            if let Some(s) = data.get("stdout") {
                self.stdout.extend(unb64(s.as_str().unwrap()));
            } else if let Some(s) = data.get("stderr") {
                self.stderr.extend(unb64(s.as_str().unwrap()));
            } else if let Some(s) = data.get("pty") {
                self.pty.extend(unb64(s.as_str().unwrap()));
            }
        } else if event.get("keepalive").is_some() {
            self.keepalives += 1;
        } else if let Some(end) = event.get("end") {
            assert!(self.end.is_none(), "a second end event");
            self.end = Some(end.clone());
        } else {
            panic!("unknown event {frame:?}");
        }
        false
    }
}

/// Reads `stream` to its end.
fn finish(mut stream: Stream, mut run: Run) -> Run {
    while let Some(frame) = stream.next() {
        if run.add(&frame) {
            break;
        }
    }
    run
}

/// Reads frames until `until` holds for what was read so far (or the stream ends).
fn read_until(stream: &mut Stream, run: &mut Run, until: impl Fn(&Run) -> bool) {
    while !until(run) {
        let Some(frame) = stream.next() else { return };
        if run.add(&frame) {
            return;
        }
    }
}

fn start(client: &Client, body: Value, headers: &[(&str, &str)]) -> Stream {
    let stream = client.server_stream(START, &body, headers);
    assert_eq!(stream.status, 200);
    stream
}

/// Runs a command to its end.
fn run(client: &Client, cmd: &str, args: &[&str]) -> Run {
    finish(
        start(
            client,
            json!({"process": {"cmd": cmd, "args": args}, "stdin": false}),
            &[],
        ),
        Run::default(),
    )
}

/// Starts a command and reads only its start event.
fn spawn(client: &Client, body: Value) -> (Stream, Run) {
    let mut stream = start(client, body, &[]);
    let mut run = Run::default();
    read_until(&mut stream, &mut run, |r| r.pid != 0);
    assert_ne!(run.pid, 0, "{run:?}");
    (stream, run)
}

fn sh(script: &str) -> Value {
    json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}})
}

fn code(reply: &common::Reply) -> String {
    reply.json()["code"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn echo_stdout_stderr_and_exit_code() {
    let mut envd = Envd::start();
    let client = envd.client();
    let run = run(
        &client,
        "/bin/sh",
        &["-c", "echo out; echo err >&2; exit 3"],
    );
    assert!(run.pid > 0);
    assert_eq!(run.stdout(), "out\n");
    assert_eq!(run.stderr(), "err\n");
    assert_eq!(run.exit_code(), 3);
    assert_eq!(run.end()["exited"], true);
    assert_eq!(run.end()["status"], "exit status 3");
    assert_eq!(run.end()["error"], "exit status 3");
    assert!(run.error.is_none(), "{run:?}");

    let ok = self::run(&client, "true", &[]);
    assert_eq!(ok.exit_code(), 0);
    assert_eq!(ok.end()["status"], "exit status 0");
    assert!(ok.end().get("error").is_none());
    assert!(envd.alive());
}

#[test]
fn env_and_cwd() {
    let mut envd = Envd::start();
    let client = envd.client();
    let body = json!({"process": {
        "cmd": "/bin/sh",
        "args": ["-c", "echo $HOME:$USER:$LOGNAME:$FOO:$E2B_SANDBOX; pwd; test -n \"$PATH\" && echo path"],
        "envs": {"FOO": "bar"},
    }});
    let run = finish(start(&client, body, &[]), Run::default());
    let home = envd.root_home();
    assert_eq!(
        run.stdout(),
        format!(
            "{home}:root:root:bar:true\n{home}\npath\n",
            home = home.display()
        )
    );

    let in_tmp = finish(
        start(
            &client,
            json!({"process": {"cmd": "pwd", "cwd": "/tmp"}}),
            &[],
        ),
        Run::default(),
    );
    assert_eq!(in_tmp.stdout(), "/tmp\n");

    std::fs::create_dir(home.join("sub")).unwrap();
    let relative = finish(
        start(
            &client,
            json!({"process": {"cmd": "pwd", "cwd": "sub"}}),
            &[],
        ),
        Run::default(),
    );
    assert_eq!(
        relative.stdout(),
        format!("{}\n", home.join("sub").display())
    );

    let missing = finish(
        start(
            &client,
            json!({"process": {"cmd": "pwd", "cwd": "/no/such/dir"}}),
            &[],
        ),
        Run::default(),
    );
    assert_eq!(missing.error_code(), "invalid_argument");
    assert_eq!(missing.error_message(), "cwd '/no/such/dir' does not exist");
    assert_eq!(missing.pid, 0);
    assert!(envd.alive());
}

#[test]
fn runs_as_the_requested_user() {
    let mut envd = Envd::start();
    let tester = envd.client().user("tester");
    let run = run(
        &tester,
        "/bin/sh",
        &["-c", "id -u; id -g; id -G; pwd; echo $HOME"],
    );
    let out = run.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "4242", "{out}");
    assert_eq!(lines[1], "4242", "{out}");
    let groups: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(groups.contains(&"4343"), "{out}");
    assert!(groups.contains(&"4242"), "{out}");
    assert!(!groups.contains(&"0"), "root's group leaked: {out}");
    assert_eq!(lines[3], envd.home().display().to_string());
    assert_eq!(lines[4], envd.home().display().to_string());

    // Children are the OOM killer's first choice, and lead their own session.
    let oom = self::run(&tester, "cat", &["/proc/self/oom_score_adj"]);
    assert_eq!(oom.stdout(), "100\n");
    let session = self::run(
        &tester,
        "/bin/sh",
        &["-c", "echo $$; cut -d' ' -f6 /proc/$$/stat"],
    );
    let ids: Vec<&str> = session
        .stdout
        .split(|b| *b == b'\n')
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    assert_eq!(ids[0], ids[1], "{ids:?}");

    let stranger = envd.client().user("nobody-here");
    let refused = self::run(&stranger, "true", &[]);
    assert_eq!(refused.error_code(), "unauthenticated");
    assert!(refused.error_message().contains("nobody-here"));
    assert!(envd.alive());
}

#[test]
fn stdin_through_send_input_and_close_stdin() {
    let mut envd = Envd::start();
    let client = envd.client();
    let (stream, run) = spawn(&client, json!({"process": {"cmd": "cat"}}));
    let pid = run.pid;
    let sent = client.unary(
        "process.Process/SendInput",
        &json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}}),
    );
    assert_eq!(sent.status, 200, "{}", sent.text());
    let wrong_kind = client.unary(
        "process.Process/SendInput",
        &json!({"process": {"pid": pid}, "input": {"pty": b64(b"x")}}),
    );
    assert_eq!(code(&wrong_kind), "invalid_argument");
    let closed = client.unary(
        "process.Process/CloseStdin",
        &json!({"process": {"pid": pid}}),
    );
    assert_eq!(closed.status, 200, "{}", closed.text());
    let run = finish(stream, run);
    assert_eq!(run.stdout(), "hello\n");
    assert_eq!(run.exit_code(), 0);

    // Started without stdin: CloseStdin has nothing to close.
    let (stream, run) = spawn(
        &client,
        json!({"process": {"cmd": "sleep", "args": ["5"]}, "stdin": false}),
    );
    let no_stdin = client.unary(
        "process.Process/CloseStdin",
        &json!({"process": {"pid": run.pid}}),
    );
    assert_eq!(code(&no_stdin), "failed_precondition");
    let no_stdin = client.unary(
        "process.Process/SendInput",
        &json!({"process": {"pid": run.pid}, "input": {"stdin": b64(b"x")}}),
    );
    assert_eq!(code(&no_stdin), "failed_precondition");
    kill(&client, run.pid);
    let run = finish(stream, run);
    assert_eq!(run.end()["status"], "signal: killed");
    assert!(envd.alive());
}

#[test]
fn stream_input_feeds_stdin() {
    let mut envd = Envd::start();
    let client = envd.client();
    let (stream, run) = spawn(&client, json!({"process": {"cmd": "cat"}, "tag": "feed"}));
    let frames = client.client_stream(
        "process.Process/StreamInput",
        &[
            json!({"start": {"process": {"tag": "feed"}}}),
            json!({"data": {"input": {"stdin": b64(b"one ")}}}),
            json!({"keepalive": {}}),
            json!({"data": {"input": {"stdin": b64(b"two\n")}}}),
        ],
    );
    let last = frames.last().unwrap();
    assert!(last.end, "{frames:?}");
    assert!(last.json.get("error").is_none(), "{frames:?}");
    let closed = client.unary(
        "process.Process/CloseStdin",
        &json!({"process": {"pid": run.pid}}),
    );
    assert_eq!(closed.status, 200);
    let run = finish(stream, run);
    assert_eq!(run.stdout(), "one two\n");

    // Data before start is refused.
    let frames = client.client_stream(
        "process.Process/StreamInput",
        &[json!({"data": {"input": {"stdin": b64(b"x")}}})],
    );
    let last = frames.last().unwrap();
    assert_eq!(last.json["error"]["code"], "invalid_argument", "{frames:?}");
    assert!(envd.alive());
}

#[test]
fn background_process_survives_the_client_and_replays() {
    let mut envd = Envd::start();
    let client = envd.client();
    let (stream, run) = spawn(
        &client,
        json!({"process": {"cmd": "/bin/sh", "args": ["-c", "echo one; sleep 1; echo two >&2; sleep 1; echo three"]}, "tag": "bg"}),
    );
    let pid = run.pid;
    // The client goes away right after the start event.
    drop(stream);

    let list = client.unary("process.Process/List", &json!({}));
    assert_eq!(list.status, 200);
    let listed = list.json()["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid))
        .cloned()
        .unwrap_or_else(|| panic!("{} not listed: {}", pid, list.text()));
    assert_eq!(listed["tag"], "bg");
    assert_eq!(listed["config"]["cmd"], "/bin/sh");

    // Following live by tag, from the start.
    let live = finish(
        client.server_stream(
            "process.Process/Connect",
            &json!({"process": {"tag": "bg"}}),
            &[],
        ),
        Run::default(),
    );
    assert_eq!(live.pid, pid);
    assert_eq!(live.stdout(), "one\nthree\n");
    assert_eq!(live.stderr(), "two\n");
    assert_eq!(live.exit_code(), 0);

    // After the end: the output and the end are still there, by pid.
    let replay = finish(
        client.server_stream(
            "process.Process/Connect",
            &json!({"process": {"pid": pid}}),
            &[],
        ),
        Run::default(),
    );
    assert_eq!(replay.pid, pid);
    assert_eq!(replay.stdout(), "one\nthree\n");
    assert_eq!(replay.stderr(), "two\n");
    assert_eq!(replay.end()["status"], "exit status 0");

    // Ended processes are not listed, and cannot be signalled.
    let list = client.unary("process.Process/List", &json!({}));
    assert!(
        !list.json()["processes"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["pid"].as_u64() == Some(pid))),
        "{}",
        list.text()
    );
    let gone = client.unary(
        "process.Process/SendSignal",
        &json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(code(&gone), "not_found");
    assert!(envd.alive());
}

fn kill(client: &Client, pid: u64) {
    let reply = client.unary(
        "process.Process/SendSignal",
        &json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Whether `pid` is gone (or only a zombie waiting for its new parent to reap it).
fn dead(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn send_signal_kills_the_whole_tree() {
    let mut envd = Envd::start();
    let client = envd.client();
    let (mut stream, mut run) = spawn(&client, sh("sleep 100 & echo $!; sleep 100"));
    read_until(&mut stream, &mut run, |r| r.stdout.ends_with(b"\n"));
    let background: u64 = run.stdout().trim().parse().unwrap();
    assert!(!dead(background));
    kill(&client, run.pid);
    let run = finish(stream, run);
    assert_eq!(run.exit_code(), -1);
    assert!(run.end().get("exited").is_none_or(|e| e == false));
    assert_eq!(run.end()["status"], "signal: killed");
    wait_for("the background sleep to die", || dead(background));

    // SIGTERM works too.
    let (stream, run) = spawn(&client, sh("sleep 100"));
    let reply = client.unary(
        "process.Process/SendSignal",
        &json!({"process": {"pid": run.pid}, "signal": "SIGNAL_SIGTERM"}),
    );
    assert_eq!(reply.status, 200);
    let run = finish(stream, run);
    assert_eq!(run.end()["status"], "signal: terminated");
    assert!(envd.alive());
}

#[test]
fn bad_selectors_and_signals_get_the_right_codes() {
    let mut envd = Envd::start();
    let client = envd.client();
    let (stream, run) = spawn(&client, sh("sleep 100"));
    let unspecified = client.unary(
        "process.Process/SendSignal",
        &json!({"process": {"pid": run.pid}, "signal": "SIGNAL_UNSPECIFIED"}),
    );
    assert_eq!(unspecified.status, 400);
    assert_eq!(code(&unspecified), "invalid_argument");
    let unknown = client.unary(
        "process.Process/SendSignal",
        &json!({"process": {"pid": 999_999_999u32}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(code(&unknown), "not_found");
    let no_tag = client.unary(
        "process.Process/SendInput",
        &json!({"process": {"tag": "nope"}, "input": {"stdin": b64(b"x")}}),
    );
    assert_eq!(code(&no_tag), "not_found");
    let not_pty = client.unary(
        "process.Process/Update",
        &json!({"process": {"pid": run.pid}, "pty": {"size": {"cols": 10, "rows": 10}}}),
    );
    assert_eq!(code(&not_pty), "invalid_argument");
    let connect = finish(
        client.server_stream(
            "process.Process/Connect",
            &json!({"process": {"pid": 999_999_999u32}}),
            &[],
        ),
        Run::default(),
    );
    assert_eq!(connect.error_code(), "not_found");
    kill(&client, run.pid);
    finish(stream, run);
    assert!(envd.alive());
}

#[test]
fn pty_process_has_a_terminal_and_resizes() {
    let mut envd = Envd::start();
    let client = envd.client();
    let (mut stream, mut run) = spawn(
        &client,
        json!({
            "process": {"cmd": "/bin/sh", "args": ["-c", "tty; stty size; read x; stty size"]},
            "pty": {"size": {"cols": 80, "rows": 24}},
        }),
    );
    read_until(&mut stream, &mut run, |r| r.pty().contains("24 80"));
    assert!(run.pty().contains("/dev/pts/"), "{:?}", run.pty());
    assert!(run.stdout.is_empty() && run.stderr.is_empty());

    let resized = client.unary(
        "process.Process/Update",
        &json!({"process": {"pid": run.pid}, "pty": {"size": {"cols": 100, "rows": 40}}}),
    );
    assert_eq!(resized.status, 200, "{}", resized.text());
    let wrong_kind = client.unary(
        "process.Process/SendInput",
        &json!({"process": {"pid": run.pid}, "input": {"stdin": b64(b"x")}}),
    );
    assert_eq!(code(&wrong_kind), "invalid_argument");
    let close = client.unary(
        "process.Process/CloseStdin",
        &json!({"process": {"pid": run.pid}}),
    );
    assert_eq!(code(&close), "invalid_argument");
    assert!(close.json()["message"].as_str().unwrap().contains("0x04"));
    let typed = client.unary(
        "process.Process/SendInput",
        &json!({"process": {"pid": run.pid}, "input": {"pty": b64(b"go\n")}}),
    );
    assert_eq!(typed.status, 200, "{}", typed.text());
    let run = finish(stream, run);
    assert!(run.pty().contains("40 100"), "{:?}", run.pty());
    assert_eq!(run.exit_code(), 0);
    assert!(envd.alive());
}

#[test]
fn connect_timeout_kills_the_process() {
    let mut envd = Envd::start();
    let client = envd.client();
    let began = Instant::now();
    let run = finish(
        start(
            &client,
            json!({"process": {"cmd": "sleep", "args": ["30"]}}),
            &[("connect-timeout-ms", "1000")],
        ),
        Run::default(),
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert!(began.elapsed() >= Duration::from_millis(900));
    assert_eq!(run.end()["status"], "signal: killed");
    assert_eq!(run.exit_code(), -1);
    assert!(run.error.is_none(), "{run:?}");
    assert!(envd.alive());
}

#[test]
fn connect_timeout_zero_is_no_limit() {
    let mut envd = Envd::start();
    let client = envd.client();
    let run = finish(
        start(
            &client,
            json!({"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 0.3; echo done"]}}),
            &[("connect-timeout-ms", "0")],
        ),
        Run::default(),
    );
    assert_eq!(run.stdout(), "done\n");
    assert_eq!(run.exit_code(), 0);
    assert!(envd.alive());
}

#[test]
fn init_process_limits_are_validated() {
    let mut envd = Envd::start();
    let client = envd.client();
    let post = |body: Value| {
        client
            .request(
                "POST",
                "/init",
                &[("content-type", "application/json")],
                body.to_string().as_bytes(),
            )
            .unwrap()
    };
    let bad = post(json!({"processLimits": {"memoryMax": "1\n+cpu"}}));
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("memory.max")
    );
    // Valid limits on an envd that does not manage cgroups (not PID 1) are accepted and
    // ignored.
    let ok = post(
        json!({"processLimits": {"memoryMax": 536870912, "cpuMax": "50000 100000", "pidsMax": "max"}}),
    );
    assert_eq!(ok.status, 204, "{}", ok.text());
    assert!(envd.alive());
}

#[test]
fn quiet_process_gets_keepalives() {
    let mut envd = Envd::start();
    let client = envd.client();
    let run = finish(
        start(
            &client,
            json!({"process": {"cmd": "sleep", "args": ["2.5"]}}),
            &[("keepalive-ping-interval", "1")],
        ),
        Run::default(),
    );
    assert!(run.keepalives >= 1, "{run:?}");
    assert_eq!(run.exit_code(), 0);
    assert!(envd.alive());
}

#[test]
fn commands_that_cannot_run_are_errors() {
    let mut envd = Envd::start();
    let client = envd.client();
    let missing = run(&client, "/no/such/command", &[]);
    assert_eq!(missing.error_code(), "not_found");
    assert!(missing.error_message().contains("/no/such/command"));
    let missing = run(&client, "no-such-command-anywhere", &[]);
    assert_eq!(missing.error_code(), "not_found");

    let script = envd.dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let denied = run(&client, script.to_str().unwrap(), &[]);
    assert_eq!(denied.error_code(), "permission_denied");
    assert!(denied.error_message().contains("not-executable"));

    let empty = run(&client, "", &[]);
    assert_eq!(empty.error_code(), "invalid_argument");
    let nul = run(&client, "echo", &["a\u{0}b"]);
    assert_eq!(nul.error_code(), "invalid_argument");
    assert!(envd.alive());
    // envd still runs processes afterwards.
    assert_eq!(run(&client, "true", &[]).exit_code(), 0);
}

#[test]
fn large_output_arrives_whole() {
    let mut envd = Envd::start();
    let client = envd.client();
    // 1 MiB through the pipe, in 32 KiB reads.
    let run = run(&client, "head", &["-c", "1048576", "/dev/zero"]);
    assert_eq!(run.stdout.len(), 1 << 20);
    assert!(run.stdout.iter().all(|b| *b == 0));
    assert_eq!(run.exit_code(), 0);
    assert!(envd.alive());
}

#[test]
fn slow_starter_loses_no_output() {
    let mut envd = Envd::start();
    let client = envd.client();
    // 20 MiB, more than the replay buffer holds; the client only starts reading after the
    // process could have written all of it.
    let (stream, run) = spawn(
        &client,
        json!({"process": {"cmd": "head", "args": ["-c", "20971520", "/dev/zero"]}}),
    );
    std::thread::sleep(Duration::from_secs(1));
    let run = finish(stream, run);
    assert_eq!(run.stdout.len(), 20 << 20);
    assert_eq!(run.exit_code(), 0);
    assert!(envd.alive());
}

#[test]
fn background_child_holding_stdout_does_not_hold_the_end() {
    let mut envd = Envd::start();
    let client = envd.client();
    let began = Instant::now();
    let run = run(&client, "/bin/sh", &["-c", "sleep 30 & echo $!"]);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(run.exit_code(), 0);
    let background = run.stdout().trim().to_owned();
    assert!(!background.is_empty());
    let _ = std::process::Command::new("kill")
        .args(["-9", &background])
        .status();
    assert!(envd.alive());
}
