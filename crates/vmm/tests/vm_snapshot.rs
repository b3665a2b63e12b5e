//! Snapshots of real guests: pause, snapshot, kill the VMM, restore (from a memory file, a
//! layered store, or a page server), and the guest carries on where it was. Runs inside the
//! host VM on machines without a usable KVM.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{GUEST_TIMEOUT, Vmm, boot_args, image};
use wrenn_image::rootfs::ImageKind;
use wrenn_vmm::probe;

/// The guest counts in a shell variable (guest memory only) and prints every value.
const COUNTER: &str = "i=0\nwhile :; do i=$((i+1)); echo COUNT=$i; sleep 0.2; done\n";

fn boot_test_image(mem_mib: u32, script: &str, track_dirty: bool) -> Vmm {
    let mut vmm = Vmm::start(None);
    vmm.configure(1, mem_mib, &boot_args(script, true));
    if track_dirty {
        vmm.put_ok(
            "/machine-config",
            &format!(
                r#"{{"vcpu_count": 1, "mem_size_mib": {mem_mib}, "track_dirty_pages": true}}"#
            ),
        );
    }
    vmm.drive("rootfs", &image(ImageKind::Test), true, true);
    vmm.start_instance();
    vmm.wait_console("WRENN_GUEST_READY", GUEST_TIMEOUT);
    vmm
}

/// Complete `KEY=<number>` lines of `console`, in order.
fn values(console: &str, key: &str) -> Vec<u64> {
    let prefix = format!("{key}=");
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix(&prefix)?.parse().ok())
        .collect()
}

/// Waits until the console has at least `n` complete `KEY=` values.
fn wait_values(vmm: &mut Vmm, key: &str, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let v = values(&vmm.console_text(), key);
        if v.len() >= n {
            return v;
        }
        if let Ok(Some(status)) = vmm.child.try_wait() {
            panic!(
                "VMM exited ({status})\nconsole:\n{}\nlog:\n{}",
                vmm.console_text(),
                vmm.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} {key}= lines\nconsole:\n{}\nlog:\n{}",
            vmm.console_text(),
            vmm.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pause(vmm: &Vmm) {
    vmm.request_ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
}

/// A fresh VMM whose console goes to its own file, restored with `load` (a JSON body).
fn restore(load: serde_json::Value) -> Vmm {
    let vmm = Vmm::start(None);
    let serial = serde_json::json!({ "serial_out_path": vmm.console });
    vmm.put_ok("/serial", &serial.to_string());
    vmm.put_ok("/snapshot/load", &load.to_string());
    vmm
}

fn root_override() -> serde_json::Value {
    serde_json::json!([{"drive_id": "rootfs", "path_on_host": image(ImageKind::Test)}])
}

/// Kills the VMM process; its directory (where it wrote its snapshot) lives on.
fn kill(mut vmm: Vmm) -> tempfile::TempDir {
    let _ = vmm.child.kill();
    let _ = vmm.child.wait();
    std::mem::replace(&mut vmm.dir, tempfile::tempdir().unwrap())
}

#[test]
fn test_counter_continues_after_full_snapshot_kill_and_file_restore() {
    if !probe::usable_for_test("test_counter_continues_after_full_snapshot_kill_and_file_restore")
    {
        return;
    }
    let mut vmm = boot_test_image(128, COUNTER, false);
    // Inside the VMM's own directory: the jail keeps it reachable.
    let (state, mem) = (vmm.path("vmstate"), vmm.path("mem"));
    wait_values(&mut vmm, "COUNT", 5);
    pause(&vmm);
    let before = *values(&vmm.console_text(), "COUNT").last().unwrap();
    let body = serde_json::json!({
        "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem,
    });
    vmm.put_ok("/snapshot/create", &body.to_string());
    let _dir = kill(vmm);
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 128 << 20);

    let mut restored = restore(serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "drive_overrides": root_override(),
        "resume_vm": true,
    }));
    let after = wait_values(&mut restored, "COUNT", 3);
    assert!(
        after[0] > before && after[0] <= before + 3,
        "counted {before} before the snapshot, then {after:?} after the restore"
    );
    let (_, info) = restored.request("GET", "/", None);
    assert!(info.contains("Running"), "{info}");
}

#[test]
fn test_restore_refuses_bad_requests_and_files_clearly() {
    if !probe::usable_for_test("test_restore_refuses_bad_requests_and_files_clearly") {
        return;
    }
    let mut vmm = boot_test_image(64, COUNTER, false);
    let (state, mem) = (vmm.path("vmstate"), vmm.path("mem"));
    wait_values(&mut vmm, "COUNT", 1);
    // Not paused: refused.
    let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    let (status, text) = vmm.request("PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("paused"), "{text}");
    pause(&vmm);
    // A Diff without dirty tracking: refused.
    let diff = serde_json::json!({"snapshot_type": "Diff", "snapshot_path": state, "mem_file_path": mem});
    let (status, text) = vmm.request("PUT", "/snapshot/create", Some(&diff.to_string()));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("track_dirty_pages"), "{text}");
    vmm.put_ok("/snapshot/create", &body.to_string());
    let dir = kill(vmm);

    let good_state = std::fs::read(&state).unwrap();
    let load = |state: &Path, mem: &Path, drives: serde_json::Value| {
        serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "drive_overrides": drives,
        })
    };
    let try_load = |body: serde_json::Value, expect: &str| {
        let vmm = Vmm::start(None);
        let (status, text) = vmm.request("PUT", "/snapshot/load", Some(&body.to_string()));
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(expect), "wanted {expect:?} in {text}");
        // The VMM is still there and still not started.
        let (_, info) = vmm.request("GET", "/", None);
        assert!(info.contains("Not started"), "{info}");
    };
    // A missing drive override names the drive.
    try_load(load(&state, &mem, serde_json::json!([])), "rootfs");
    // A truncated state file.
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &good_state[..good_state.len() / 2]).unwrap();
    try_load(load(&truncated, &mem, root_override()), "truncated");
    // A flipped byte: the CRC says so.
    let corrupt = dir.path().join("corrupt");
    let mut bytes = good_state.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&corrupt, &bytes).unwrap();
    try_load(load(&corrupt, &mem, root_override()), "crc32 mismatch");
    // Another format version.
    let version = dir.path().join("version");
    let mut bytes = good_state.clone();
    bytes[8] = bytes[8].wrapping_add(7);
    std::fs::write(&version, &bytes).unwrap();
    try_load(load(&version, &mem, root_override()), "version");
    // A memory file shorter than guest memory.
    let short = dir.path().join("short");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    try_load(load(&state, &short, root_override()), "shorter");
    // A missing memory file names it.
    try_load(
        load(&state, &dir.path().join("nope"), root_override()),
        "nope",
    );
}
