//! envd inside a real microVM: the guest images hold the static envd at `/usr/bin/envd`, and
//! booted with `init=/usr/bin/envd` it is the guest's PID 1, answering over vsock through
//! Firecracker's host side (`CONNECT <port>` on the unix socket, then plain HTTP/1.1).
//!
//! A `vm_` test: `cargo xtask test` runs it where a usable KVM exists (inside the host VM on
//! machines without one) after building the static envd, the kernel and the images. It drives
//! the `wrenn-vmm` binary of the same target directory (`WRENN_VMM` to name another).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use wrenn_image::cache::Cache;
use wrenn_image::rootfs::{self, IMAGE_FILE, ImageKind};
use wrenn_vmm::probe;

mod common;
use common::{Reply, envelope, frames, request_on};

/// One request on `stream`, failing the test when no reply comes.
fn http(
    stream: UnixStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    request_on(stream, method, path, headers, body)
        .unwrap_or_else(|error| panic!("{method} {path}: no reply: {error}"))
}

/// How long a guest may take to do its work in the host VM (nested, so slow).
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// envd's port, on TCP inside the guest and on vsock.
const ENVD_PORT: u16 = 49983;
/// The console line envd prints once it serves.
const ENVD_READY: &str = "envd: ready";
/// Kernel parameters every boot here uses: serial console, reset ends the VM, keyboard
/// controller for Ctrl-Alt-Del.
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux \
                         i8042.dumbkbd";

/// The `wrenn-vmm` binary: `WRENN_VMM`, else next to this test's `deps` directory (where
/// `cargo test --workspace` puts every package's binaries).
fn vmm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WRENN_VMM").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("wrenn-vmm"))
        .unwrap();
    assert!(
        path.is_file(),
        "no wrenn-vmm at {} (cargo build -p wrenn-vmm, or set WRENN_VMM)",
        path.display()
    );
    path
}

fn kernel() -> PathBuf {
    wrenn_image::kernel::find(&Cache::from_env())
        .expect("guest kernel (run `cargo xtask guest`)")
        .file("vmlinux")
}

fn image(kind: ImageKind) -> PathBuf {
    rootfs::find(&Cache::from_env(), kind)
        .expect("guest image holding the current static envd (run `cargo xtask guest`)")
        .file(IMAGE_FILE)
}

/// A `wrenn-vmm` process booted from a config file, with its own directory (API socket,
/// console file, vsock socket, a writable copy of the root image if asked for).
struct Vm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vm {
    /// Boots `kind` with `boot_args`, 1 vCPU and `mem_mib`, a vsock device (CID 3, socket
    /// `v.sock`) and the console in `console.log`. The root is the cached image, read-only,
    /// or with `writable` a copy of it (small images only: the host VM's /tmp is memory).
    fn boot(kind: ImageKind, mem_mib: u32, boot_args: &str, writable: bool) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let root = if writable {
            let copy = dir.path().join("rootfs.ext4");
            std::fs::copy(image(kind), &copy).unwrap();
            copy
        } else {
            image(kind)
        };
        let config = json!({
            "boot-source": {"kernel_image_path": kernel(), "boot_args": boot_args},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
            "drives": [{"drive_id": "rootfs", "path_on_host": root,
                        "is_root_device": true, "is_read_only": !writable}],
            "vsock": {"guest_cid": 3, "uds_path": dir.path().join("v.sock")},
            "serial": {"serial_out_path": dir.path().join("console.log")},
        });
        let config_path = dir.path().join("vm.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let child = Command::new(vmm_binary())
            .arg("--config-file")
            .arg(&config_path)
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .arg("--id")
            .arg("vm-envd")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("vmm.log")).unwrap())
            .spawn()
            .expect("spawn wrenn-vmm");
        Vm { child, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.path("console.log")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("vmm.log")).unwrap_or_default()
    }

    /// What went on, for failure messages.
    fn report(&self) -> String {
        format!("console:\n{}\nvmm log:\n{}", self.console(), self.log())
    }

    /// Waits until the console shows `needle`.
    fn wait_console(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            let text = self.console();
            if text.contains(needle) {
                return text;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("VMM exited ({status}) before {needle:?}\n{}", self.report());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {GUEST_TIMEOUT:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the VMM to end on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "VMM still running after {GUEST_TIMEOUT:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request to the VMM's API socket; returns (status, body).
    fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let stream = UnixStream::connect(self.path("api.sock")).expect("connect to API socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reply = http(
            stream,
            method,
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        (
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned(),
        )
    }

    /// A fresh connection to guest vsock `port` through the host side of the device.
    fn vsock(&self, port: u16) -> UnixStream {
        let mut stream = UnixStream::connect(self.path("v.sock")).expect("connect to vsock UDS");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        // Read the answer byte by byte: what follows it belongs to the HTTP exchange.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            stream.read_exact(&mut byte).unwrap_or_else(|e| {
                panic!("vsock handshake: {e} after {line:?}\n{}", self.report())
            });
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line);
        assert!(
            line.starts_with("OK ") && line.trim_end()[3..].parse::<u32>().is_ok(),
            "vsock handshake answer {line:?}"
        );
        stream
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel command line of a wrenn-init boot that runs `script` and resets.
fn script_args(script: &str) -> String {
    format!(
        "{BASE_ARGS} init={} wrenn_run={}",
        rootfs::INIT_PATH,
        wrenn_image::qemu::base64(script.as_bytes())
    )
}

/// The lines the script printed (between the ready marker and `WRENN_EXIT=`) and its exit code.
fn script_output(console: &str) -> (Option<i32>, Vec<String>) {
    let mut lines = Vec::new();
    for line in console
        .lines()
        .skip_while(|l| !l.contains(rootfs::READY_MARKER))
        .skip(1)
    {
        if let Some(at) = line.find("WRENN_EXIT=") {
            return (line[at + 11..].trim().parse().ok(), lines);
        }
        lines.push(line.trim_end().to_owned());
    }
    (None, lines)
}

/// Boots `kind` under wrenn-init, runs `script`, and returns its output once the VM reset.
fn run_script(kind: ImageKind, mem_mib: u32, script: &str) -> Vec<String> {
    let mut vm = Vm::boot(kind, mem_mib, &script_args(script), false);
    let status = vm.wait_exit();
    let console = vm.console();
    assert!(status.success(), "VMM exit {status}\n{}", vm.report());
    let (code, lines) = script_output(&console);
    assert_eq!(code, Some(0), "{lines:?}\n{}", vm.report());
    lines
}

/// What the check script prints for an image: envd's mode, owner and version, and that it is
/// the same file the host built.
const CHECK_ENVD: &str = "stat -c '%A %u:%g' /usr/bin/envd\n\
                          /usr/bin/envd --version\n\
                          sha256sum /usr/bin/envd | cut -d' ' -f1\n";

/// Checks the first three lines of [`CHECK_ENVD`]'s output.
fn assert_envd_checked(lines: &[String]) {
    let envd = wrenn_image::envd::locate().expect("the static envd");
    assert!(lines.len() >= 3, "{lines:?}");
    assert_eq!(lines[0], "-rwxr-xr-x 0:0", "{lines:?}");
    // clap prints `<name> <version>`.
    assert!(
        lines[1].ends_with(&format!(" {}", wrenn_envd::ENVD_VERSION)),
        "{lines:?}"
    );
    assert_eq!(lines[2], envd.sha256, "{lines:?}");
}

#[test]
fn test_test_image_holds_static_envd_that_runs() {
    if !probe::usable_for_test("test_test_image_holds_static_envd_that_runs") {
        return;
    }
    let lines = run_script(ImageKind::Test, 128, CHECK_ENVD);
    assert_envd_checked(&lines);
    assert_eq!(lines.len(), 3, "{lines:?}");
}

#[test]
fn test_base_image_holds_static_envd_and_user() {
    if !probe::usable_for_test("test_base_image_holds_static_envd_and_user") {
        return;
    }
    let script = format!("{CHECK_ENVD}id -u user\necho home=$(getent passwd user | cut -d: -f6)\n");
    let lines = run_script(ImageKind::Base, 512, &script);
    assert_envd_checked(&lines);
    assert_eq!(lines[3..], ["1000", "home=/home/user"], "{lines:?}");
}

#[test]
fn test_envd_as_pid1_serves_over_vsock_and_runs_a_process() {
    if !probe::usable_for_test("test_envd_as_pid1_serves_over_vsock_and_runs_a_process") {
        return;
    }
    let token = "vm-envd-secret-token";
    let args = format!(
        "{BASE_ARGS} {} envd.sandbox_id=vm-envd-test envd.access_token={token} \
         envd.vsock_port={ENVD_PORT}",
        wrenn_image::envd::INIT_ARG
    );
    // A writable root: envd as PID 1 runs a sandbox, whose disk is its own.
    let mut vm = Vm::boot(ImageKind::Test, 256, &args, true);
    vm.wait_console(ENVD_READY);

    // Health needs no token.
    let reply = http(vm.vsock(ENVD_PORT), "GET", "/health", &[], b"");
    assert_eq!(reply.status, 204, "{reply:?}\n{}", vm.report());

    // The host's /init (what the agent sends after a restore): only with the current token;
    // envd as PID 1 takes the host's time (a day ahead here, so the change is visible) and
    // reseeds the kernel's random generator.
    let ahead = std::time::SystemTime::now() + Duration::from_secs(86_400);
    let ahead_secs = ahead
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let init = json!({"timestamp": humantime::format_rfc3339_millis(ahead).to_string(),
                      "envVars": {"FROM_INIT": "yes"}})
    .to_string();
    let vsock = vm.vsock(ENVD_PORT);
    let refused = std::panic::catch_unwind(|| http(vsock, "POST", "/init", &[], init.as_bytes()))
        .unwrap_or_else(|_| panic!("/init without the token failed\n{}", vm.report()));
    assert_eq!(refused.status, 401, "{refused:?}");
    let vsock = vm.vsock(ENVD_PORT);
    let headers = [
        ("x-access-token", token),
        ("content-type", "application/json"),
    ];
    let reply =
        std::panic::catch_unwind(|| http(vsock, "POST", "/init", &headers, init.as_bytes()))
            .unwrap_or_else(|_| panic!("/init failed\n{}", vm.report()));
    assert_eq!(reply.status, 204, "{reply:?}\n{}", vm.report());

    // A process, through the Connect streaming protocol with the JSON codec.
    // Besides running: the process sits in its own cgroup, is not OOM-protected like envd,
    // the hostname and /run/e2b come from the command line, and an orphan (the `sleep` whose
    // parent exits at once) is reaped by PID 1 rather than left a zombie.
    let script = "echo hello; id -u; cat /proc/self/cgroup; hostname; \
                  cat /run/e2b/.E2B_SANDBOX_ID; echo; cat /proc/self/oom_score_adj; \
                  (sleep 0.2 &); sleep 1; grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l; \
                  echo $FROM_INIT; date +%s";
    let request = json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}});
    let start = |token: Option<&str>| {
        let mut headers = vec![
            ("content-type", "application/connect+json"),
            ("connect-protocol-version", "1"),
        ];
        if let Some(token) = token {
            headers.push(("x-access-token", token));
        }
        http(
            vm.vsock(ENVD_PORT),
            "POST",
            "/process.Process/Start",
            &headers,
            &envelope(0, &request),
        )
    };
    // The access token from the command line guards the RPCs.
    let refused = start(None);
    assert_eq!(refused.status, 401, "{refused:?}");

    let reply = start(Some(token));
    assert_eq!(reply.status, 200, "{reply:?}\n{}", vm.report());
    assert_eq!(
        reply.header("content-type"),
        Some("application/connect+json"),
        "{reply:?}"
    );
    let frames = frames(&reply.body);
    let last = frames.last().expect("no envelopes");
    assert_eq!(
        last.flags, 0x02,
        "last envelope is not end-stream: {frames:?}"
    );
    assert!(last.json.get("error").is_none(), "stream error: {last:?}");
    let events: Vec<&Value> = frames[..frames.len() - 1]
        .iter()
        .map(|frame| {
            assert_eq!(frame.flags, 0, "{frames:?}");
            &frame.json["event"]
        })
        .filter(|event| event.get("keepalive").is_none())
        .collect();
    let pid = events
        .first()
        .and_then(|e| e["start"]["pid"].as_u64())
        .unwrap_or_else(|| panic!("first event is not start{{pid}}: {events:?}"));
    assert!(pid > 1, "pid {pid}");
    let mut stdout = Vec::new();
    for event in &events {
        if let Some(data) = event["data"]["stdout"].as_str() {
            stdout.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap(),
            );
        }
    }
    let stdout = String::from_utf8_lossy(&stdout);
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 9, "{stdout}\n{events:?}");
    assert_eq!(lines[..2], ["hello", "0"], "{stdout}");
    assert!(
        lines[2].starts_with("0::/wrenn/processes/"),
        "own cgroup: {stdout}"
    );
    assert_eq!(lines[3..6], ["wrenn", "vm-envd-test", "100"], "{stdout}");
    assert_eq!(lines[6], "0", "zombies left: {stdout}");
    assert_eq!(lines[7], "yes", "/init's environment: {stdout}");
    let guest_now: u64 = lines[8].parse().unwrap();
    assert!(
        guest_now + 120 >= ahead_secs,
        "the guest clock did not take /init's time: {guest_now} vs {ahead_secs}"
    );
    let end = &events.last().unwrap()["end"];
    assert_eq!(end["exited"], true, "{events:?}");
    assert_eq!(end["exitCode"].as_i64().unwrap_or(0), 0, "{events:?}");
    assert_eq!(end["status"], "exit status 0", "{events:?}");
    assert_eq!(
        events.iter().filter(|e| e.get("end").is_some()).count(),
        1,
        "{events:?}"
    );

    // A clean stop: Ctrl-Alt-Del reaches envd as PID 1 (SIGINT), which resets the VM; the
    // VMM then ends with 0.
    let (status, body) = vm.api("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    assert_eq!(status, 204, "{body}");
    let status = vm.wait_exit();
    assert!(status.success(), "VMM exit {status}\n{}", vm.report());
}

#[test]
fn test_envelopes_splits_frames_and_flags() {
    let mut body = envelope(0, &json!({"event": {"start": {"pid": 7}}}));
    body.extend(envelope(2, &json!({})));
    let frames = frames(&body);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].json["event"]["start"]["pid"], 7);
    assert_eq!((frames[1].flags, &frames[1].json), (2, &json!({})));
}
