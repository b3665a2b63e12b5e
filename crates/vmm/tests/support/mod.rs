//! Running `wrenn-vmm` as a real process in tests: the guest artifacts, a raw HTTP client for
//! the API socket, the console, and cleanup.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use wrenn_image::cache::Cache;
use wrenn_image::rootfs::{self, IMAGE_FILE, ImageKind};

pub const VMM: &str = env!("CARGO_BIN_EXE_wrenn-vmm");

/// How long a guest may take to do its work in the host VM (nested, so slow).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Kernel and image paths from the artifact cache (built by `cargo xtask guest`).
pub fn kernel() -> PathBuf {
    let cache = Cache::from_env();
    wrenn_image::kernel::find(&cache)
        .expect("guest kernel (run `cargo xtask guest`)")
        .file("vmlinux")
}

/// The same kernel as a bzImage.
pub fn bzimage() -> PathBuf {
    kernel().with_file_name("bzImage")
}

pub fn image(kind: ImageKind) -> PathBuf {
    let cache = Cache::from_env();
    rootfs::find(&cache, kind)
        .expect("guest image (run `cargo xtask guest`)")
        .file(IMAGE_FILE)
}

/// Kernel command line for the test images: `script` runs as soon as the guest is up, its exit
/// code is printed as `WRENN_EXIT=n`, then the guest resets (which ends the VMM) unless `hold`.
pub fn boot_args(script: &str, hold: bool) -> String {
    let mut line = String::from(
        "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.dumbkbd \
         init=/sbin/wrenn-init",
    );
    if !script.is_empty() {
        line.push_str(" wrenn_run=");
        line.push_str(&wrenn_image::qemu::base64(script.as_bytes()));
    }
    if hold {
        line.push_str(" wrenn_hold=1");
    }
    line
}

/// A `wrenn-vmm` process with its own directory (API socket, console file, vsock sockets).
pub struct Vmm {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub api: PathBuf,
    pub console: PathBuf,
}

impl Vmm {
    /// Starts `wrenn-vmm --api-sock` (optionally inside network namespace `netns`) and waits
    /// for its socket.
    pub fn start(netns: Option<&str>) -> Vmm {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api.sock");
        let console = dir.path().join("console.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, VMM]);
                c
            }
            None => Command::new(VMM),
        };
        let child = cmd
            .arg("--api-sock")
            .arg(&api)
            .arg("--id")
            .arg("test-vm")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("vmm.log")).unwrap())
            .spawn()
            .expect("spawn wrenn-vmm");
        let vmm = Vmm {
            child,
            dir,
            api,
            console,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&vmm.api).is_err() {
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Sends one request on a fresh connection; returns (status, body).
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(&self.api, method, path, body)
    }

    /// PUT that must succeed with 204.
    pub fn put_ok(&self, path: &str, body: &str) {
        self.request_ok("PUT", path, body);
    }

    /// A request that must succeed with 204.
    pub fn request_ok(&self, method: &str, path: &str, body: &str) {
        let (status, text) = self.request(method, path, Some(body));
        assert_eq!(
            status,
            204,
            "{method} {path} {body}: {text}\nlog:\n{}",
            self.log()
        );
    }

    /// Boot source, machine config and console file in one go.
    pub fn configure(&self, vcpus: u8, mem_mib: u32, boot_args: &str) {
        let boot = serde_json::json!({
            "kernel_image_path": kernel(),
            "boot_args": boot_args,
        });
        self.put_ok("/boot-source", &boot.to_string());
        self.put_ok(
            "/machine-config",
            &format!(r#"{{"vcpu_count": {vcpus}, "mem_size_mib": {mem_mib}}}"#),
        );
        let serial = serde_json::json!({ "serial_out_path": self.console });
        self.put_ok("/serial", &serial.to_string());
    }

    pub fn drive(&self, id: &str, path: &Path, root: bool, read_only: bool) {
        let body = serde_json::json!({
            "drive_id": id,
            "path_on_host": path,
            "is_root_device": root,
            "is_read_only": read_only,
        });
        self.put_ok(&format!("/drives/{id}"), &body.to_string());
    }

    pub fn start_instance(&self) {
        self.put_ok("/actions", r#"{"action_type": "InstanceStart"}"#);
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console shows `needle`; panics with the console and VMM log if not.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console_text();
            if text.contains(needle) {
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "VMM exited ({status}) before {needle:?}\nconsole:\n{text}\nlog:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {timeout:?}\nconsole:\n{text}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the VMM to end on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let log = self.path("vmm.log");
        wait_child(&mut self.child, timeout, &self.console, &log)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("vmm.log")).unwrap_or_default()
    }

    /// Runs the guest's script to its end and returns (exit code, what it printed).
    pub fn script_result(&mut self) -> (i32, Vec<String>) {
        let status = self.wait_exit(GUEST_TIMEOUT);
        let console = self.console_text();
        assert!(
            status.success(),
            "VMM exit {status}\nconsole:\n{console}\nlog:\n{}",
            self.log()
        );
        script_output(&console)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit; past `timeout` it is killed and the test fails with its console
/// and log.
pub fn wait_child(child: &mut Child, timeout: Duration, console: &Path, log: &Path) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "VMM still running after {timeout:?}\nconsole:\n{}\nlog:\n{}",
                std::fs::read_to_string(console).unwrap_or_default(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lines between the ready marker and `WRENN_EXIT=`, and the exit code.
pub fn script_output(console: &str) -> (i32, Vec<String>) {
    let mut lines = Vec::new();
    let mut code = None;
    for line in console
        .lines()
        .skip_while(|l| !l.contains(rootfs::READY_MARKER))
        .skip(1)
    {
        if let Some(at) = line.find("WRENN_EXIT=") {
            let digits: String = line[at + 11..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            code = digits.parse().ok();
            break;
        }
        lines.push(line.to_owned());
    }
    let code = code.unwrap_or_else(|| panic!("no WRENN_EXIT in console:\n{console}"));
    (code, lines)
}

/// One HTTP/1.1 request over a unix socket; returns (status, body).
pub fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = UnixStream::connect(sock).expect("connect to API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A network namespace for one test, deleted on drop.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("wrenn-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        NetNs(name)
    }

    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        run(&full);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed: {status}");
}
