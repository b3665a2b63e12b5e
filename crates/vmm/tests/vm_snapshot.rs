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

/// Waits until `parse` finds at least `n` items in the console; fails with the console and
/// the VMM's log if the VMM exits or time runs out.
fn wait_parsed<T>(vmm: &mut Vmm, what: &str, n: usize, parse: impl Fn(&str) -> Vec<T>) -> Vec<T> {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let found = parse(&vmm.console_text());
        if found.len() >= n {
            return found;
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
            "fewer than {n} {what} lines\nconsole:\n{}\nlog:\n{}",
            vmm.console_text(),
            vmm.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the console has at least `n` complete `KEY=` values.
fn wait_values(vmm: &mut Vmm, key: &str, n: usize) -> Vec<u64> {
    wait_parsed(vmm, key, n, |console| values(console, key))
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
    if !probe::usable_for_test("test_counter_continues_after_full_snapshot_kill_and_file_restore") {
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
    let diff =
        serde_json::json!({"snapshot_type": "Diff", "snapshot_path": state, "mem_file_path": mem});
    let (status, text) = vmm.request("PUT", "/snapshot/create", Some(&diff.to_string()));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("track_dirty_pages"), "{text}");
    vmm.put_ok("/snapshot/create", &body.to_string());
    // A layered build, and the same build id again: refused, the first one intact.
    let store = vmm.path("store");
    std::fs::create_dir(&store).unwrap();
    let build = new_build_id();
    layered_snapshot(&vmm, &store, &build, "Full");
    let again = serde_json::json!({"layers": {"store": store, "build_id": build}});
    let (status, text) = vmm.request("PUT", "/snapshot/create", Some(&again.to_string()));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("exists already"), "{text}");
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

    // Layered: a damaged header, then a missing memory layer, each named; the page server
    // refuses the broken build at start instead of failing under a guest.
    let layered = serde_json::json!({
        "layers": {"store": store, "build_id": build},
        "mem_backend": {"backend_type": "File"},
        "drive_overrides": root_override(),
    });
    let top = wrenn_snapshot::store::Store::new(&store);
    let id: wrenn_snapshot::id::BuildId = build.parse().unwrap();
    let header_path = top.mem_header(id);
    let good_header = std::fs::read(&header_path).unwrap();
    let mut bytes = good_header.clone();
    let last = bytes.len() - 6;
    bytes[last] ^= 0x10;
    std::fs::write(&header_path, &bytes).unwrap();
    try_load(layered.clone(), "crc32 mismatch");
    std::fs::write(&header_path, &good_header).unwrap();
    std::fs::remove_file(top.mem_data(id)).unwrap();
    try_load(layered, "memfile");
    let socket = store.join("pager.sock");
    let log = store.join("pager.log");
    let mut pager = start_pager(&socket, &store, &build, &log);
    let status = support::wait_child(&mut pager, Duration::from_secs(30), &log, &log);
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("memfile"), "{text}");
}

/// The guest keeps a 4 MiB random blob and a growing log in guest memory (tmpfs) and prints,
/// every round, `CHECK=<round>:<log lines>:<blob md5>`: a restore that lost or mixed up any
/// page of any generation shows as a wrong count, a wrong line total or a different sum.
const CHECKER: &str = "dd if=/dev/urandom of=/dev/shm/blob bs=64k count=64 2>/dev/null\n\
    sum=$(md5sum < /dev/shm/blob | cut -c1-32)\n\
    i=0\n\
    while :; do i=$((i+1)); echo $i >> /dev/shm/log; \
    echo CHECK=$i:$(wc -l < /dev/shm/log):$(md5sum < /dev/shm/blob | cut -c1-32):$sum; \
    sleep 0.2; done\n";

/// Complete `CHECK=` lines as (round, log lines, blob sum now, blob sum at boot).
fn checks(console: &str) -> Vec<(u64, u64, String, String)> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("CHECK=")?;
            let mut parts = rest.split(':');
            let round = parts.next()?.parse().ok()?;
            let lines = parts.next()?.trim().parse().ok()?;
            let now = parts.next()?.to_owned();
            let boot = parts.next()?.to_owned();
            Some((round, lines, now, boot))
        })
        .collect()
}

fn wait_checks(vmm: &mut Vmm, n: usize) -> Vec<(u64, u64, String, String)> {
    wait_parsed(vmm, "CHECK", n, checks)
}

/// Every check is consistent: one log line per round and the blob unchanged since boot.
fn assert_consistent(found: &[(u64, u64, String, String)]) {
    for (round, lines, now, boot) in found {
        assert_eq!(round, lines, "log lines lost or doubled: {found:?}");
        assert_eq!(now, boot, "the blob changed: {found:?}");
    }
}

fn pager_binary() -> std::path::PathBuf {
    let path = Path::new(support::VMM).with_file_name("wrenn-pager");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p wrenn-pager",
        path.display()
    );
    path
}

/// A `wrenn-pager` process serving build `build` of `store` on `socket`.
fn start_pager(socket: &Path, store: &Path, build: &str, log: &Path) -> std::process::Child {
    start_pager_with(socket, store, build, log, &[], std::process::Stdio::null())
}

fn start_pager_with(
    socket: &Path,
    store: &Path,
    build: &str,
    log: &Path,
    extra: &[&std::ffi::OsStr],
    stdout: std::process::Stdio,
) -> std::process::Child {
    let mut child = std::process::Command::new(pager_binary())
        .arg("--socket")
        .arg(socket)
        .arg("--store")
        .arg(store)
        .arg("--build")
        .arg(build)
        // The VMM that connects may take long to start on a busy host VM; the default 10 s
        // has run out before it came.
        .args(["--accept-timeout-secs", "120"])
        .args(extra)
        .stdout(stdout)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn wrenn-pager");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until it listens, or ends (refusing what it was asked to serve).
    while !socket.exists() && child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the page server never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn layered_snapshot(vmm: &Vmm, store: &Path, build: &str, kind: &str) {
    let body = serde_json::json!({
        "snapshot_type": kind,
        "layers": {"store": store, "build_id": build},
    });
    vmm.put_ok("/snapshot/create", &body.to_string());
}

fn new_build_id() -> String {
    wrenn_snapshot::id::BuildId::random().unwrap().to_string()
}

#[test]
fn test_three_generation_chain_restores_exactly_from_file_and_page_server() {
    if !probe::usable_for_test(
        "test_three_generation_chain_restores_exactly_from_file_and_page_server",
    ) {
        return;
    }
    let mut vmm = boot_test_image(128, CHECKER, true);
    let store = vmm.path("store");
    std::fs::create_dir(&store).unwrap();
    let builds = [new_build_id(), new_build_id(), new_build_id()];
    let mut rounds_at = Vec::new();
    for (generation, build) in builds.iter().enumerate() {
        wait_checks(&mut vmm, 3 * (generation + 1));
        pause(&vmm);
        let kind = if generation == 0 { "Full" } else { "Diff" };
        if generation == 1 {
            // A Diff that fails (the build id is taken) must not lose the pages it had
            // collected: the next Diff still carries them, or the restore below breaks.
            let taken = serde_json::json!({
                "snapshot_type": "Diff",
                "layers": {"store": store, "build_id": builds[0]},
            });
            let (status, text) = vmm.request("PUT", "/snapshot/create", Some(&taken.to_string()));
            assert_eq!(status, 400, "{text}");
            assert!(text.contains("exists already"), "{text}");
        }
        layered_snapshot(&vmm, &store, build, kind);
        eprintln!("generation {generation} ({kind}) written");
        rounds_at.push(checks(&vmm.console_text()).last().unwrap().0);
        if generation < 2 {
            vmm.request_ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
        }
    }
    let _dir = kill(vmm);

    // Generation 2's header maps every page straight to the build that last wrote it.
    let top = wrenn_snapshot::store::Store::new(&store);
    let top_id: wrenn_snapshot::id::BuildId = builds[2].parse().unwrap();
    let header = wrenn_snapshot::header::Header::read(&top.mem_header(top_id)).unwrap();
    eprintln!("{}", header.summary());
    assert_eq!(header.generation, 2);
    assert!(header.builds.len() >= 2, "{}", header.summary());
    // A Diff holds what changed, not guest memory: far less than the 128 MiB.
    let diff_len = std::fs::metadata(top.mem_data(top_id)).unwrap().len();
    assert!(diff_len < 32 << 20, "generation 2 wrote {diff_len} bytes");

    let load = |backend: serde_json::Value| {
        serde_json::json!({
            "layers": {"store": store, "build_id": builds[2]},
            "mem_backend": backend,
            "drive_overrides": root_override(),
            "resume_vm": true,
        })
    };
    let last = rounds_at[2];
    let mut from_file = restore(load(serde_json::json!({"backend_type": "File"})));
    let found = wait_checks(&mut from_file, 3);
    assert!(
        found[0].0 > last && found[0].0 <= last + 3,
        "snapshot at round {last}, restored at {found:?}"
    );
    assert_consistent(&found);
    drop(from_file);
    eprintln!("restored from files");

    let socket = store.join("pager.sock");
    let mut pager = start_pager(&socket, &store, &builds[2], &store.join("pager.log"));
    let mut from_pager = restore(load(
        serde_json::json!({"backend_type": "Uffd", "backend_path": socket}),
    ));
    let found_uffd = wait_checks(&mut from_pager, 3);
    assert_consistent(&found_uffd);
    // Both backends give the same guest: it carries on from the same round with the same blob.
    assert_eq!(found_uffd[0].0, found[0].0, "{found_uffd:?} vs {found:?}");
    assert_eq!(found_uffd[0].3, found[0].3);

    eprintln!("restored from the page server");
    // The page server dies under the running VM: the VMM stops with a clear error, no hang.
    pager.kill().unwrap();
    pager.wait().unwrap();
    let status = from_pager.wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the VMM must fail when its page server dies"
    );
    assert!(
        from_pager.log().contains("page server"),
        "{}",
        from_pager.log()
    );
}

#[test]
fn test_five_clones_of_one_template_diverge_on_their_own() {
    if !probe::usable_for_test("test_five_clones_of_one_template_diverge_on_their_own") {
        return;
    }
    // From round 15 on (long after the template is taken) the guest takes 8 fresh bytes from
    // the host (virtio-rng) into its own memory once, then keeps printing them: each clone
    // must get its own and keep it.
    let script = "i=0\nwhile :; do i=$((i+1)); \
        if [ $i -ge 15 ] && [ ! -f /dev/shm/mine ]; then \
        od -An -tx1 -N8 /dev/hwrng | tr -d ' \\n' > /dev/shm/mine; fi; \
        echo CLONE=$i:$(cat /dev/shm/mine 2>/dev/null); sleep 0.2; done\n";
    let mut vmm = Vmm::start(None);
    vmm.configure(1, 96, &boot_args(script, true));
    vmm.drive("rootfs", &image(ImageKind::Test), true, true);
    vmm.put_ok("/entropy", "{}");
    vmm.start_instance();
    vmm.wait_console("WRENN_GUEST_READY", GUEST_TIMEOUT);
    wait_values_prefix(&mut vmm, "CLONE=2:");
    pause(&vmm);
    assert!(
        !vmm.console_text().contains("CLONE=15:"),
        "the template must be taken before the guest reads its entropy"
    );
    let store = vmm.path("store");
    std::fs::create_dir(&store).unwrap();
    let template = new_build_id();
    layered_snapshot(&vmm, &store, &template, "Full");
    let _dir = kill(vmm);

    let mut clones = Vec::new();
    for n in 0..5 {
        let socket = store.join(format!("pager{n}.sock"));
        let pager = start_pager(
            &socket,
            &store,
            &template,
            &store.join(format!("pager{n}.log")),
        );
        let load = serde_json::json!({
            "layers": {"store": store, "build_id": template},
            "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
            "drive_overrides": root_override(),
            "resume_vm": true,
        });
        clones.push((restore(load), pager));
    }
    let mut seen = Vec::new();
    for (clone, _) in &mut clones {
        let value = wait_clone_value(clone);
        seen.push(value);
    }
    // Later rounds of each clone still show its own value: no clone saw another's write.
    for ((clone, _), value) in clones.iter_mut().zip(&seen) {
        let later = wait_clone_value(clone);
        assert_eq!(&later, value);
    }
    let mut distinct = seen.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "clones share entropy: {seen:?}");
    for (_, mut pager) in clones {
        let _ = pager.kill();
        let _ = pager.wait();
    }
}

fn wait_values_prefix(vmm: &mut Vmm, needle: &str) {
    vmm.wait_console(needle, GUEST_TIMEOUT);
}

/// The latest non-empty value a clone printed as `CLONE=<round>:<value>`.
fn wait_clone_value(vmm: &mut Vmm) -> String {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let text = vmm.console_text();
        let value = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| l.trim().strip_prefix("CLONE="))
            .filter_map(|rest| rest.split_once(':').map(|(_, v)| v.to_owned()))
            .rfind(|v| v.len() == 16);
        if let Some(value) = value {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "no clone value\nconsole:\n{text}\nlog:\n{}",
            vmm.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each round the guest appends a line to a file on its root disk, syncs, drops its page cache
/// and counts the lines from the disk: `DISK=<round>:<lines>`.
const DISK_LOG: &str = "i=0\nwhile :; do i=$((i+1)); echo $i >> /disklog; sync; \
    echo 3 > /proc/sys/vm/drop_caches; echo DISK=$i:$(wc -l < /disklog); sleep 0.2; done\n";

fn disk_rounds(console: &str) -> Vec<(u64, u64)> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let (round, lines) = l.trim().strip_prefix("DISK=")?.split_once(':')?;
            Some((round.parse().ok()?, lines.trim().parse().ok()?))
        })
        .collect()
}

fn wait_disk_rounds(vmm: &mut Vmm, n: usize) -> Vec<(u64, u64)> {
    wait_parsed(vmm, "DISK", n, disk_rounds)
}

fn file_digest(path: &Path) -> Vec<u8> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hasher).unwrap();
    hasher.finalize().to_vec()
}

#[test]
fn test_layered_root_disk_keeps_writes_across_generations_and_never_touches_the_image() {
    if !probe::usable_for_test(
        "test_layered_root_disk_keeps_writes_across_generations_and_never_touches_the_image",
    ) {
        return;
    }
    let image_path = image(ImageKind::Test);
    let image_digest = file_digest(&image_path);
    let mut vmm = Vmm::start(None);
    let store_dir = vmm.path("store");
    std::fs::create_dir(&store_dir).unwrap();
    let store = wrenn_snapshot::store::Store::new(&store_dir);
    let rootfs = wrenn_snapshot::store::DriveId::new("rootfs").unwrap();
    let base = store.import_disk_image(&image_path, &rootfs).unwrap();

    vmm.configure(1, 128, &boot_args(DISK_LOG, true));
    vmm.put_ok(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true}"#,
    );
    let drive = serde_json::json!({
        "drive_id": "rootfs",
        "path_on_host": vmm.path("overlay"),
        "is_root_device": true,
        "is_read_only": false,
        "layers": {"store": store_dir, "build_id": base.to_string()},
    });
    vmm.put_ok("/drives/rootfs", &drive.to_string());
    vmm.start_instance();
    vmm.wait_console("WRENN_GUEST_READY", GUEST_TIMEOUT);

    let builds = [new_build_id(), new_build_id()];
    let mut rounds_at = 0;
    for (generation, build) in builds.iter().enumerate() {
        wait_disk_rounds(&mut vmm, 3 * (generation + 1));
        pause(&vmm);
        let kind = if generation == 0 { "Full" } else { "Diff" };
        layered_snapshot(&vmm, &store_dir, build, kind);
        rounds_at = disk_rounds(&vmm.console_text()).last().unwrap().0;
        if generation == 0 {
            vmm.request_ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
        }
    }
    let _dir = kill(vmm);

    // Generation 1's disk diff holds the blocks written since generation 0, nothing like the
    // whole disk; the image the disk started from is unchanged.
    let top: wrenn_snapshot::id::BuildId = builds[1].parse().unwrap();
    let diff_len = std::fs::metadata(store.disk_data(top, &rootfs))
        .unwrap()
        .len();
    let image_len = std::fs::metadata(&image_path).unwrap().len();
    assert!(
        diff_len < image_len / 4,
        "disk diff {diff_len} bytes for a {image_len}-byte disk"
    );
    assert_eq!(
        file_digest(&image_path),
        image_digest,
        "the base image changed"
    );

    let overlay_dir = tempfile::tempdir().unwrap();
    let mut restored = restore(serde_json::json!({
        "layers": {"store": store_dir, "build_id": builds[1]},
        "mem_backend": {"backend_type": "File"},
        "drive_overrides": [{"drive_id": "rootfs", "path_on_host": overlay_dir.path().join("overlay")}],
        "resume_vm": true,
    }));
    let found = wait_disk_rounds(&mut restored, 3);
    assert!(
        found[0].0 > rounds_at && found[0].0 <= rounds_at + 3,
        "snapshot at round {rounds_at}, restored at {found:?}"
    );
    for (round, lines) in &found {
        assert_eq!(
            round, lines,
            "lines written before the pause were lost: {found:?}"
        );
    }
    drop(restored);
    assert_eq!(
        file_digest(&image_path),
        image_digest,
        "the base image changed"
    );
}

/// The page server's stats (printed as JSON when the VM it served ended).
fn pager_stats(mut pager: std::process::Child, stdout: &Path, log: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pager.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the page server did not end with its VM: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(stdout).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "stats {text:?}: {e}\nlog:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

#[test]
fn test_second_resume_of_a_build_is_prefetched_from_the_first() {
    if !probe::usable_for_test("test_second_resume_of_a_build_is_prefetched_from_the_first") {
        return;
    }
    let mut vmm = boot_test_image(128, COUNTER, false);
    wait_values(&mut vmm, "COUNT", 3);
    pause(&vmm);
    let store = vmm.path("store");
    std::fs::create_dir(&store).unwrap();
    let build = new_build_id();
    layered_snapshot(&vmm, &store, &build, "Full");
    let _dir = kill(vmm);

    let record = store.join("prefetch");
    let mut faults = Vec::new();
    for (round, extra) in [("record", "--record"), ("prefetch", "--prefetch-file")]
        .iter()
        .enumerate()
    {
        let (name, flag) = extra;
        let socket = store.join(format!("{name}.sock"));
        let (out, log) = (
            store.join(format!("{name}.json")),
            store.join(format!("{name}.log")),
        );
        let pager = start_pager_with(
            &socket,
            &store,
            &build,
            &log,
            &[std::ffi::OsStr::new(flag), record.as_os_str()],
            std::process::Stdio::from(std::fs::File::create(&out).unwrap()),
        );
        let mut restored = restore(serde_json::json!({
            "layers": {"store": store, "build_id": build},
            "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
            "drive_overrides": root_override(),
            "resume_vm": true,
        }));
        wait_values(&mut restored, "COUNT", 5);
        drop(restored);
        let stats = pager_stats(pager, &out, &log);
        let faulted = stats["faults"].as_u64().unwrap();
        let prefetched = stats["prefetched_pages"].as_u64().unwrap();
        if round == 0 {
            assert_eq!(prefetched, 0, "{stats}");
            assert!(record.exists(), "no prefetch record written");
        } else {
            assert!(prefetched > 0, "nothing prefetched: {stats}");
        }
        faults.push(faulted);
    }
    // The second resume faults on far fewer pages: the first one's set was installed up front.
    assert!(
        faults[1] * 2 < faults[0],
        "faults without prefetch {}, with {}",
        faults[0],
        faults[1]
    );
}

/// Like [`restore`], with extra `wrenn-vmm` flags.
fn restore_with_flags(load: serde_json::Value, flags: &[&str]) -> Vmm {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let console = dir.path().join("console.log");
    let child = std::process::Command::new(support::VMM)
        .arg("--api-sock")
        .arg(&api)
        .arg("--id")
        .arg("test-vm")
        .args(flags)
        .stdout(std::process::Stdio::null())
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
    while std::os::unix::net::UnixStream::connect(&vmm.api).is_err() {
        assert!(Instant::now() < deadline, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let serial = serde_json::json!({ "serial_out_path": vmm.console });
    vmm.put_ok("/serial", &serial.to_string());
    vmm.put_ok("/snapshot/load", &load.to_string());
    vmm
}

/// Kills a page server and removes its socket file (a SIGKILLed server leaves it behind, and
/// a new one refuses to bind over it).
fn kill_pager(mut pager: std::process::Child, socket: &Path) {
    pager.kill().unwrap();
    pager.wait().unwrap();
    let _ = std::fs::remove_file(socket);
}

#[test]
fn test_page_server_restart_within_grace_keeps_the_guest_running_and_none_stops_it() {
    if !probe::usable_for_test(
        "test_page_server_restart_within_grace_keeps_the_guest_running_and_none_stops_it",
    ) {
        return;
    }
    // Every round writes 256 KiB more into guest memory (tmpfs), so the guest keeps touching
    // pages it never touched before: it cannot count on without a page server.
    let grower = "i=0\nwhile :; do i=$((i+1)); \
        dd if=/dev/zero of=/dev/shm/f$i bs=64k count=4 2>/dev/null; \
        echo COUNT=$i; sleep 0.2; done\n";
    let mut vmm = boot_test_image(128, grower, false);
    wait_values(&mut vmm, "COUNT", 3);
    pause(&vmm);
    let store = vmm.path("store");
    std::fs::create_dir(&store).unwrap();
    let build = new_build_id();
    layered_snapshot(&vmm, &store, &build, "Full");
    let _dir = kill(vmm);

    // Its own directory, as the jail keeps the socket's directory for reconnecting.
    let pager_dir = store.join("pager");
    std::fs::create_dir(&pager_dir).unwrap();
    let socket = pager_dir.join("pager.sock");
    let pager = start_pager(&socket, &store, &build, &store.join("pager1.log"));
    let mut restored = restore_with_flags(
        serde_json::json!({
            "layers": {"store": store, "build_id": build},
            "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
            "drive_overrides": root_override(),
            "resume_vm": true,
        }),
        &["--page-server-grace", "15"],
    );
    wait_values(&mut restored, "COUNT", 3);

    // The page server dies; the VMM retries while the guest waits; a new server on the same
    // path takes the VM back and the guest goes on.
    kill_pager(pager, &socket);
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !restored.log().contains("page server not back yet") {
        assert!(Instant::now() < deadline, "no retry:\n{}", restored.log());
        assert!(
            restored.child.try_wait().unwrap().is_none(),
            "{}",
            restored.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = values(&restored.console_text(), "COUNT").len();
    let pager = start_pager(&socket, &store, &build, &store.join("pager2.log"));
    let after = wait_values(&mut restored, "COUNT", seen + 5);
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "the count skipped or went back: {after:?}"
    );
    assert!(
        restored.log().contains("page server reconnected"),
        "{}",
        restored.log()
    );
    let (_, info) = restored.request("GET", "/", None);
    assert!(info.contains("Running"), "{info}");

    // Gone for good: after the grace the VMM stops with the page-server error.
    kill_pager(pager, &socket);
    let gone = Instant::now();
    let status = wait_exit_or_report(&mut restored, Duration::from_secs(90));
    assert!(
        !status.success(),
        "the VMM must fail without its page server"
    );
    assert!(
        gone.elapsed() >= Duration::from_secs(14),
        "stopped after {:?}, before the grace ran out",
        gone.elapsed()
    );
    let log = restored.log();
    assert!(
        log.contains("the page server serving guest memory went away"),
        "{log}"
    );
}

/// Waits for the VMM to exit. Past `timeout` the test fails with where each of its threads
/// sleeps, and leaves the process be: a VMM stuck in uninterruptible sleep (a kernel worker
/// waiting on a page nobody serves) would hang the test's own kill and wait.
fn wait_exit_or_report(vmm: &mut Vmm, timeout: Duration) -> std::process::ExitStatus {
    let pid = vmm.child.id();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = vmm.child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let report = thread_report(pid);
            let log = vmm.log();
            let _ = vmm.child.kill();
            std::thread::sleep(Duration::from_secs(2));
            if vmm.child.try_wait().unwrap().is_none() {
                // Unkillable: dropping the handle would wait for it forever.
                std::mem::forget(std::mem::replace(&mut vmm.child, spawn_true()));
            }
            panic!("the VMM did not exit within {timeout:?}; its threads:\n{report}\nlog:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An already finished child, to stand in for one the test gives up on.
fn spawn_true() -> std::process::Child {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    child
}

/// Each thread of `pid`: name, state, wait channel and kernel stack (root only).
fn thread_report(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("process {pid} is gone\n");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or('?');
        out.push_str(&format!(
            "task {} {} state={state} wchan={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    out
}
