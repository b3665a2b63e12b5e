//! wrenn-vmm boots real Linux guests: the test image to its marker, with the vCPUs and memory
//! asked for, drives, vsock both ways, a tap in a namespace, entropy, pause and resume, and
//! clear refusals of bad requests. Runs inside the host VM on machines without a usable KVM.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use support::{GUEST_TIMEOUT, NetNs, Vmm, boot_args, image, kernel, run};
use wrenn_image::rootfs::ImageKind;
use wrenn_vmm::probe;

fn test_image_vmm(vcpus: u8, mem_mib: u32, script: &str, hold: bool) -> Vmm {
    let vmm = Vmm::start(None);
    vmm.configure(vcpus, mem_mib, &boot_args(script, hold));
    vmm.drive("rootfs", &image(ImageKind::Test), true, true);
    vmm
}

#[test]
fn test_guest_sees_configured_vcpus_and_memory() {
    if !probe::usable_for_test("test_guest_sees_configured_vcpus_and_memory") {
        return;
    }
    let script = "grep -c ^processor /proc/cpuinfo\ngrep MemTotal /proc/meminfo\n\
                  cat /sys/devices/system/clocksource/clocksource0/current_clocksource\n\
                  grep -c hypervisor /proc/cpuinfo\n";
    let mut vmm = test_image_vmm(3, 200, script, false);
    vmm.start_instance();
    let (code, lines) = vmm.script_result();
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(lines[0].trim(), "3", "{lines:?}");
    let kib: u64 = lines[1]
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{lines:?}"));
    // MemTotal is RAM minus what the kernel keeps for itself.
    assert!(
        (150 * 1024..=200 * 1024).contains(&kib),
        "MemTotal {kib} kB"
    );
    // The CPUID template: KVM's paravirtual clock, and the hypervisor bit on every vCPU.
    assert_eq!(lines[2].trim(), "kvm-clock", "{lines:?}");
    assert_eq!(lines[3].trim(), "3", "{lines:?}");
}

#[test]
fn test_config_file_boots_without_api_calls() {
    if !probe::usable_for_test("test_config_file_boots_without_api_calls") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel(), "boot_args": boot_args("echo via-config", false)},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [{"drive_id": "rootfs", "path_on_host": image(ImageKind::Test),
                    "is_root_device": true, "is_read_only": true}],
        "serial": {"serial_out_path": console},
    });
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let log = dir.path().join("vmm.log");
    let mut child = Command::new(support::VMM)
        .arg("--config-file")
        .arg(&path)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = support::wait_child(&mut child, GUEST_TIMEOUT, &console, &log);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        status.success(),
        "{status:?}\n{text}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (code, lines) = support::script_output(&text);
    assert_eq!((code, lines), (0, vec!["via-config".to_owned()]));
}

#[test]
fn test_bzimage_boots_to_the_marker() {
    if !probe::usable_for_test("test_bzimage_boots_to_the_marker") {
        return;
    }
    let mut vmm = Vmm::start(None);
    let boot = serde_json::json!({
        "kernel_image_path": support::bzimage(),
        "boot_args": boot_args("uname -r", false),
    });
    vmm.put_ok("/boot-source", &boot.to_string());
    let serial = serde_json::json!({ "serial_out_path": vmm.console });
    vmm.put_ok("/serial", &serial.to_string());
    vmm.drive("rootfs", &image(ImageKind::Test), true, true);
    vmm.start_instance();
    let (code, lines) = vmm.script_result();
    assert_eq!(code, 0, "{lines:?}");
    assert!(lines[0].starts_with("6.1"), "{lines:?}");
}

#[test]
fn test_drives_read_write_persists_and_read_only_refuses() {
    if !probe::usable_for_test("test_drives_read_write_persists_and_read_only_refuses") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.ext4");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(&["mkfs.ext4", "-q", "-F", data.to_str().unwrap()]);
    let ro = dir.path().join("ro.img");
    std::fs::write(&ro, vec![0xabu8; 1 << 20]).unwrap();

    let write = "mkdir -p /tmp/m && mount /dev/vdb /tmp/m && echo persisted > /tmp/m/f && sync && umount /tmp/m && echo mounted-rw\n\
                 cat /sys/block/vdc/ro\n\
                 if dd if=/dev/zero of=/dev/vdc bs=512 count=1 conv=fsync 2>/dev/null; then echo WROTE; else echo REFUSED; fi\n\
                 head -c 2 /dev/vdc | od -An -tx1\n";
    let mut vmm = test_image_vmm(1, 128, write, false);
    vmm.drive("data", &data, false, false);
    vmm.drive("scratch", &ro, false, true);
    vmm.start_instance();
    let (code, lines) = vmm.script_result();
    assert_eq!(code, 0, "{lines:?}");
    let lines: Vec<&str> = lines.iter().map(|l| l.trim()).collect();
    assert_eq!(lines, ["mounted-rw", "1", "REFUSED", "ab ab"]);
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0xab));

    let read = "mkdir -p /tmp/m && mount -o ro /dev/vdb /tmp/m && cat /tmp/m/f\n";
    let mut vmm = test_image_vmm(1, 128, read, false);
    vmm.drive("data", &data, false, false);
    vmm.start_instance();
    let (code, lines) = vmm.script_result();
    assert_eq!((code, lines), (0, vec!["persisted".to_owned()]));
}

#[test]
fn test_entropy_device_feeds_hwrng() {
    if !probe::usable_for_test("test_entropy_device_feeds_hwrng") {
        return;
    }
    let script = "cat /sys/class/misc/hw_random/rng_current\n\
                  dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'; echo\n\
                  dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'; echo\n";
    let mut vmm = test_image_vmm(1, 128, script, false);
    vmm.put_ok("/entropy", "{}");
    vmm.start_instance();
    let (code, lines) = vmm.script_result();
    assert_eq!(code, 0, "{lines:?}");
    assert!(lines[0].starts_with("virtio_rng"), "{lines:?}");
    assert_eq!(lines[1].len(), 64, "{lines:?}");
    assert_ne!(lines[1], "0".repeat(64));
    assert_ne!(lines[1], lines[2], "two reads gave the same bytes");
}

#[test]
fn test_guest_pings_host_over_tap_in_a_namespace() {
    if !probe::usable_for_test("test_guest_pings_host_over_tap_in_a_namespace") {
        return;
    }
    let ns = NetNs::new("net");
    ns.exec(&["ip", "tuntap", "add", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "addr", "add", "172.30.0.1/24", "dev", "tap0"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);
    let mut vmm = Vmm::start(Some(&ns.0));
    let script = "cat /sys/class/net/eth0/address\n\
                  ip addr add 172.30.0.2/24 dev eth0 && ip link set eth0 up && \
                  ping -c 3 -W 5 172.30.0.1 >/dev/null && echo PING-OK\n";
    vmm.configure(1, 128, &boot_args(script, false));
    vmm.drive("rootfs", &image(ImageKind::Test), true, true);
    vmm.put_ok(
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#,
    );
    vmm.start_instance();
    let (code, lines) = vmm.script_result();
    assert_eq!(code, 0, "{lines:?}\n{}", vmm.log());
    assert_eq!(lines, ["06:00:ac:10:00:02", "PING-OK"]);
}

#[test]
fn test_vsock_echo_in_both_directions() {
    if !probe::usable_for_test("test_vsock_echo_in_both_directions") {
        return;
    }
    let mut vmm = Vmm::start(None);
    let uds = vmm.path("v.sock");
    // Guest-initiated connections to port 6000 arrive here; the host answers in upper case.
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let host_side = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "guest never connected"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
    });
    let script = r#"python3 - <<'PY' &
import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, 5000))
s.listen()
print("VSOCK_LISTENING", flush=True)
c, _ = s.accept()
while True:
    d = c.recv(65536)
    if not d:
        break
    c.sendall(d)
PY
python3 -c '
import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((2, 6000))
s.sendall(b"ping-from-guest")
print("GUEST_GOT", s.recv(64).decode(), flush=True)
'
wait
"#;
    vmm.configure(2, 256, &boot_args(script, false));
    vmm.drive("rootfs", &image(ImageKind::Base), true, true);
    vmm.put_ok(
        "/vsock",
        &serde_json::json!({"guest_cid": 3, "uds_path": uds}).to_string(),
    );
    vmm.start_instance();
    vmm.wait_console("VSOCK_LISTENING", GUEST_TIMEOUT);

    let mut stream = UnixStream::connect(&uds).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    let port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("handshake answer {ok:?}"));
    assert!(port >= 1 << 30, "host port {port}");
    let payload: Vec<u8> = (0..256 * 1024u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let writer = {
        let mut s = stream.try_clone().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let p = payload.clone();
        std::thread::spawn(move || s.write_all(&p).unwrap())
    };
    let mut echoed = vec![0u8; payload.len()];
    reader.read_exact(&mut echoed).unwrap();
    writer.join().unwrap();
    assert!(echoed == payload, "echo differs");
    stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(reader);

    host_side.join().unwrap();
    let (code, lines) = vmm.script_result();
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        lines.contains(&"GUEST_GOT PING-FROM-GUEST".to_owned()),
        "{lines:?}"
    );
}

#[test]
fn test_pause_resume_and_ctrl_alt_del() {
    if !probe::usable_for_test("test_pause_resume_and_ctrl_alt_del") {
        return;
    }
    let script = "(i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done) &\n";
    let mut vmm = test_image_vmm(2, 128, script, true);
    let metrics_path = vmm.path("metrics.json");
    vmm.put_ok(
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics_path }).to_string(),
    );
    vmm.start_instance();
    vmm.wait_console("tick 5", GUEST_TIMEOUT);
    assert_confined(&vmm);
    let ticks = |vmm: &Vmm| vmm.console_text().matches("tick ").count();

    let (status, body) = vmm.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{body}");
    let (_, info) = vmm.request("GET", "/", None);
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    let before = ticks(&vmm);
    std::thread::sleep(Duration::from_millis(1500));
    let after = ticks(&vmm);
    assert!(
        after <= before + 1,
        "guest ran while paused: {before} -> {after}"
    );

    let (status, body) = vmm.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(status, 204, "{body}");
    let next = format!("tick {}", after + 5);
    vmm.wait_console(&next, GUEST_TIMEOUT);
    let (_, info) = vmm.request("GET", "/", None);
    assert!(info.contains(r#""state":"Running""#), "{info}");
    // The console ring holds what the guest printed, whatever the console's sink.
    let (status, ring) = vmm.request("GET", "/serial", None);
    assert_eq!(status, 200);
    assert!(ring.contains(&next), "ring lacks {next:?}");
    // Metrics: counters as JSON on demand, and a line per FlushMetrics in the file.
    let (status, body) = vmm.request("GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(metrics["api"]["pauses"], 1, "{metrics}");
    assert_eq!(metrics["vmm"]["state"], "Running", "{metrics}");
    assert_eq!(metrics["devices"][0]["type"], "block", "{metrics}");
    let (status, body) = vmm.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(status, 204, "{body}");
    let flushed = std::fs::read_to_string(&metrics_path).unwrap();
    let line: serde_json::Value = serde_json::from_str(flushed.trim()).unwrap();
    assert_eq!(line["api"]["resumes"], 1, "{line}");

    let (status, body) = vmm.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 204, "{body}");
    let status = vmm.wait_exit(GUEST_TIMEOUT);
    assert!(status.success(), "{status}\n{}", vmm.log());
}

/// Every thread of a running VMM is under a seccomp filter, and the process sees its jail,
/// not the host's files.
fn assert_confined(vmm: &Vmm) {
    let proc_dir = format!("/proc/{}", vmm.child.id());
    let mut threads = 0;
    for task in std::fs::read_dir(format!("{proc_dir}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .map(str::to_owned)
        };
        assert_eq!(field("Seccomp:").as_deref(), Some("2"), "{status}");
        assert_eq!(field("NoNewPrivs:").as_deref(), Some("1"), "{status}");
        threads += 1;
    }
    assert!(
        threads >= 4,
        "main, API and two vCPU threads; saw {threads}"
    );
    assert!(std::path::Path::new("/etc/passwd").exists());
    assert!(
        !std::path::Path::new(&format!("{proc_dir}/root/etc/passwd")).exists(),
        "the VMM can see the host's /etc"
    );
}

fn assert_fault(vmm: &Vmm, method: &str, path: &str, body: &str, needle: &str) {
    let (status, text) = vmm.request(method, path, Some(body));
    assert_eq!(status, 400, "{method} {path} {body}: {text}");
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let message = json["fault_message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{method} {path}: {message:?} lacks {needle:?}"
    );
}

#[test]
fn test_bad_requests_get_400_and_the_vmm_keeps_serving() {
    if !probe::usable_for_test("test_bad_requests_get_400_and_the_vmm_keeps_serving") {
        return;
    }
    let mut vmm = Vmm::start(None);
    assert_fault(
        &vmm,
        "PUT",
        "/machine-config",
        "{\"vcpu_count\": 2,",
        "json",
    );
    assert_fault(
        &vmm,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128, "gpu": true}"#,
        "gpu",
    );
    assert_fault(
        &vmm,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
        "vcpu_count",
    );
    assert_fault(
        &vmm,
        "PUT",
        "/boot-source",
        r#"{"boot_args": "x"}"#,
        "kernel_image_path",
    );
    assert_fault(
        &vmm,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/no/such/vmlinux"}"#,
        "/no/such/vmlinux",
    );
    assert_fault(
        &vmm,
        "PUT",
        "/drives/data",
        r#"{"drive_id": "data", "path_on_host": "/no/such/disk.img", "is_root_device": false}"#,
        "/no/such/disk.img",
    );
    assert_fault(
        &vmm,
        "PATCH",
        "/vm",
        r#"{"state": "Paused"}"#,
        "before starting",
    );
    assert_fault(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "boot source",
    );

    vmm.configure(1, 128, &boot_args("", true));
    vmm.drive("rootfs", &image(ImageKind::Test), true, true);
    vmm.start_instance();
    assert_fault(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "after starting",
    );
    assert_fault(
        &vmm,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128}"#,
        "after starting",
    );
    let (status, info) = vmm.request("GET", "/", None);
    assert_eq!(status, 200);
    assert!(info.contains("test-vm"), "{info}");
    vmm.wait_console(wrenn_image::rootfs::READY_MARKER, GUEST_TIMEOUT);

    // SIGTERM stops the VM cleanly and the VMM removes its socket.
    let pid = i32::try_from(vmm.child.id()).unwrap();
    run(&["kill", "-TERM", &pid.to_string()]);
    let status = vmm.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(!vmm.api.exists(), "API socket left behind");
}

#[test]
fn test_guest_poweroff_ends_vmm_with_zero() {
    if !probe::usable_for_test("test_guest_poweroff_ends_vmm_with_zero") {
        return;
    }
    // No ACPI: the kernel halts after "reboot: Power down"; the VMM sees it on the console.
    let mut vmm = test_image_vmm(1, 128, "sync; poweroff -f", true);
    vmm.start_instance();
    let status = vmm.wait_exit(GUEST_TIMEOUT);
    assert!(status.success(), "{status}\n{}", vmm.log());
    assert!(vmm.log().contains("Shutdown"), "{}", vmm.log());
}

#[test]
fn test_guest_panic_ends_vmm_non_zero_with_reason() {
    if !probe::usable_for_test("test_guest_panic_ends_vmm_non_zero_with_reason") {
        return;
    }
    // No root device: the kernel panics when it cannot mount one. panic=-1 resets at once:
    // with panic=1 the guest spins a second with interrupts off before resetting, which the
    // emulated host VM on our machines has been seen not to survive (it stops entirely).
    let mut vmm = Vmm::start(None);
    vmm.configure(1, 128, "console=ttyS0 reboot=k panic=-1 pci=off");
    vmm.start_instance();
    let status = vmm.wait_exit(GUEST_TIMEOUT);
    assert_eq!(status.code(), Some(2), "{}", vmm.log());
    assert!(vmm.log().contains("Unable to mount root"), "{}", vmm.log());
}
