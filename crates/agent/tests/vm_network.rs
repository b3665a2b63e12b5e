//! A real guest in a network slot: the test image booted with envd as PID 1 inside the slot's
//! namespace (`ip netns exec <ns> wrenn-vmm`), configured by the slot's `ip=` argument, reached
//! from the host through the slot's address, and kept in or out by its egress policy.
//!
//! A `vm_` test: `cargo xtask test` runs it where a usable KVM exists (inside the host VM on
//! machines without one). By hand:
//! `cargo build -p wrenn-cli -p wrenn-vmm && cargo build -p wrenn-agent --tests &&
//!  target/debug/wrenn hostvm --cpus 1 -- env WRENN_REQUIRE_KVM=1 <test exe> --test-threads 1`.
//! It drives the `wrenn-vmm` binary of the same target directory (`WRENN_VMM` to name another)
//! and needs the kernel and the test image holding the current static envd (`WRENN_ENVD`).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wrenn_agent::network::{
    ENVD_PORT, Egress, GUEST_MAC, Slot, SlotPool, SlotPoolConfig, guest_kernel_ip_arg,
};
use wrenn_image::cache::Cache;
use wrenn_image::rootfs::{self, IMAGE_FILE, ImageKind};
use wrenn_vmm::probe;

/// How long the guest may take (nested virtualization in the host VM is slow).
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The console line envd prints once it serves.
const ENVD_READY: &str = "envd: ready";
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux \
                         i8042.dumbkbd";

/// `wrenn-vmm` in the slot's namespace, booting the test image with envd as PID 1.
struct Vm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vm {
    fn boot(slot: &Slot) -> Vm {
        let cache = Cache::from_env();
        let kernel = wrenn_image::kernel::find(&cache)
            .expect("guest kernel (run `cargo xtask guest`)")
            .file("vmlinux");
        let image = rootfs::find(&cache, ImageKind::Test)
            .expect("test image holding the current static envd (run `cargo xtask guest`)")
            .file(IMAGE_FILE);
        let dir = tempfile::tempdir().unwrap();
        // A writable root: envd as PID 1 runs a sandbox, whose disk is its own.
        let root = dir.path().join("rootfs.ext4");
        std::fs::copy(image, &root).unwrap();
        let boot_args = format!(
            "{BASE_ARGS} {} {} envd.sandbox_id=vm-network",
            wrenn_image::envd::INIT_ARG,
            guest_kernel_ip_arg()
        );
        let config = json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
            "drives": [{"drive_id": "rootfs", "path_on_host": root,
                        "is_root_device": true, "is_read_only": false}],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": slot.tap_name(),
                                    "guest_mac": GUEST_MAC}],
            "serial": {"serial_out_path": dir.path().join("console.log")},
        });
        let config_path = dir.path().join("vm.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", slot.netns_name()])
            .arg(support::vmm_binary())
            .arg("--no-jail")
            .arg("--config-file")
            .arg(&config_path)
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .arg("--id")
            .arg("vm-network")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("vmm.log")).unwrap())
            .spawn()
            .expect("spawn ip netns exec wrenn-vmm");
        Vm { child, dir }
    }

    fn report(&self) -> String {
        let read = |name| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!(
            "console:\n{}\nvmm log:\n{}",
            read("console.log"),
            read("vmm.log")
        )
    }

    fn wait_console(&mut self, needle: &str) {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            let console =
                std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
            if console.contains(needle) {
                return;
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
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over TCP with `Connection: close`: status and de-chunked body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw).unwrap();
    if !chunked {
        return (status, raw);
    }
    let mut body = Vec::new();
    let mut rest = &raw[..];
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[end + 2..end + 2 + size]);
        rest = &rest[end + 2 + size + 2..];
    }
    (status, body)
}

/// Runs `sh -c script` in the guest through envd's `process.Process/Start` (Connect, JSON
/// envelopes) and returns its exit code.
fn guest_run(slot: &Slot, script: &str) -> i64 {
    let request = json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}}).to_string();
    let mut envelope = vec![0u8];
    envelope.extend(u32::try_from(request.len()).unwrap().to_be_bytes());
    envelope.extend(request.as_bytes());
    let (status, body) = http(
        slot.envd_address(),
        "POST",
        "/process.Process/Start",
        &[
            ("content-type", "application/connect+json"),
            ("connect-protocol-version", "1"),
        ],
        &envelope,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut rest = &body[..];
    let mut exit = None;
    while rest.len() >= 5 {
        let len = usize::try_from(u32::from_be_bytes(rest[1..5].try_into().unwrap())).unwrap();
        let frame: Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
        if let Some(end) = frame["event"].get("end") {
            exit = Some(end["exitCode"].as_i64().unwrap_or(0));
        }
        rest = &rest[5 + len..];
    }
    exit.unwrap_or_else(|| panic!("no end event: {}", String::from_utf8_lossy(&body)))
}

/// Waits on a thread for one connection to `listener` within `wait` and returns the line it
/// sent, then closes it (busybox `nc` ends only when the other side closes).
fn accept_one(listener: &TcpListener, wait: Duration) -> std::thread::JoinHandle<Option<String>> {
    let listener = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + wait;
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut line = String::new();
                    let _ = BufReader::new(conn).read_line(&mut line);
                    return Some(line);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_guest_in_slot_is_reachable_and_follows_egress_policy() {
    if !probe::usable_for_test("test_guest_in_slot_is_reachable_and_follows_egress_policy") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter("wrenn_agent=debug")
        .with_writer(std::io::stderr)
        .try_init();
    let config = SlotPoolConfig {
        base: std::net::Ipv4Addr::new(10, 212, 0, 0),
        prefix_len: 24,
        max_slots: 2,
        warm: 0,
        name: "wvm".into(),
    };
    let pool = SlotPool::new(config).await.unwrap();
    let slot = pool.acquire().await.unwrap();
    eprintln!("slot {} ready; booting", slot.index());
    let mut vm = Vm::boot(&slot);
    vm.wait_console(ENVD_READY);
    eprintln!("envd ready");

    // envd, from the host, through the slot's address (DNAT to the guest).
    let slot_ref = &slot;
    let (status, _) =
        tokio::task::block_in_place(|| http(slot_ref.envd_address(), "GET", "/health", &[], b""));
    assert_eq!(status, 204, "{}", vm.report());
    assert_eq!(slot.envd_address().port(), ENVD_PORT);

    // With no policy the guest reaches a listener on the host end.
    let listener = TcpListener::bind(SocketAddrV4::new(slot.gateway_address(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!("echo hi | nc {} {port}", slot.gateway_address());
    let got = accept_one(&listener, GUEST_TIMEOUT);
    let code = tokio::task::block_in_place(|| guest_run(slot_ref, &script));
    assert_eq!(code, 0, "{}", vm.report());
    assert_eq!(got.join().unwrap().as_deref(), Some("hi\n"));

    // Denying the host end keeps it out (refused at once: the namespace rejects).
    slot.set_egress(&Egress {
        allow: vec![],
        deny: vec![slot.gateway_address().to_string()],
    })
    .await
    .unwrap();
    let got = accept_one(&listener, Duration::from_secs(5));
    let code = tokio::task::block_in_place(|| guest_run(slot_ref, &script));
    assert_ne!(code, 0, "nc succeeded through a deny");
    assert_eq!(got.join().unwrap(), None);

    // And allowing all again lets it through.
    slot.set_egress(&Egress::default()).await.unwrap();
    let got = accept_one(&listener, GUEST_TIMEOUT);
    let code = tokio::task::block_in_place(|| guest_run(slot_ref, &script));
    assert_eq!(code, 0, "{}", vm.report());
    assert_eq!(got.join().unwrap().as_deref(), Some("hi\n"));

    drop(vm);
    pool.release(slot).await;
    pool.destroy_all().await.unwrap();
    assert!(!Path::new("/run/netns/wvm-0").exists());
}
