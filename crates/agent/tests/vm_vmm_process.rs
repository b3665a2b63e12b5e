//! `wrenn_agent::vmm` against real `wrenn-vmm` processes (host VM): boot the test image in a
//! network namespace, pause, layered Full snapshot, stop; restore in a new VMM with the page
//! server library serving, resume, and the guest counts on; adopt; stop; a refused request.
//!
//! Needs `cargo build -p wrenn-vmm` (the binary next to this test's target directory, or
//! `WRENN_VMM_BIN`) and the guest artifacts (`cargo xtask guest`).

mod support;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wrenn_agent::vmm::{
    BootSpec, DriveSource, DriveSpec, MemorySource, NetSpec, RestoreSpec, SnapshotKind,
    SnapshotSpec, Vmm, VmmConfig, VmmError,
};
use wrenn_image::rootfs::ImageKind;

const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The guest counts in a shell variable (guest memory only) and prints every value.
const COUNTER: &str = "i=0\nwhile :; do i=$((i+1)); echo COUNT=$i; sleep 0.2; done\n";

fn boot_args(script: &str) -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux i8042.nomux i8042.dumbkbd \
         init=/sbin/wrenn-init wrenn_hold=1 wrenn_run={}",
        wrenn_image::qemu::base64(script.as_bytes())
    )
}

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?}: {status}");
}

/// A network namespace holding one tap; deleted on drop.
struct Slot {
    name: String,
    tap: &'static str,
}

impl Slot {
    fn new() -> Slot {
        let name = format!("wrenn-vmmproc-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        run(&["ip", "netns", "add", &name]);
        let tap = "wtap0";
        run(&[
            "ip", "netns", "exec", &name, "ip", "tuntap", "add", "dev", tap, "mode", "tap",
        ]);
        run(&["ip", "netns", "exec", &name, "ip", "link", "set", tap, "up"]);
        Slot { name, tap }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn config(id: &str, run_dir: &Path, netns: Option<&Path>, keep: &[&Path]) -> VmmConfig {
    VmmConfig {
        binary: support::vmm_binary(),
        sandbox_id: id.into(),
        run_dir: run_dir.to_owned(),
        netns: netns.map(Path::to_owned),
        keep: keep.iter().map(|p| p.to_path_buf()).collect(),
        page_server_grace: Some(Duration::from_secs(10)),
    }
}

/// Complete `COUNT=<n>` lines of a console file.
fn counts(console: &Path) -> Vec<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("COUNT=")?.parse().ok())
        .collect()
}

fn wait_counts(vmm: &Vmm, console: &Path, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let found = counts(console);
        if found.len() >= n {
            return found;
        }
        let log = || std::fs::read_to_string(vmm.log_path()).unwrap_or_default();
        assert!(vmm.is_running(), "the VMM exited; log:\n{}", log());
        assert!(
            Instant::now() < deadline,
            "fewer than {n} counts; console:\n{}\nlog:\n{}",
            std::fs::read_to_string(console).unwrap_or_default(),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_boot_snapshot_stop_restore_through_the_pager_adopt_and_refusals() {
    if !wrenn_vmm::probe::usable_for_test(
        "test_boot_snapshot_stop_restore_through_the_pager_adopt_and_refusals",
    ) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let slot = Slot::new();
    let image = support::image(ImageKind::Test);

    // Boot inside the slot: the tap exists only in its namespace.
    let run_a = root.path().join("a");
    let mut a = Vmm::spawn(config("sb-a", &run_a, Some(&slot.path()), &[&store]))
        .await
        .unwrap();
    let ns_of = |pid: u32| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino()
    };
    assert_eq!(
        ns_of(a.pid()),
        std::fs::metadata(slot.path()).unwrap().ino(),
        "the VMM is not in the slot's network namespace"
    );
    let console_a = run_a.join("console.log");
    let boot = BootSpec {
        kernel: support::kernel(),
        boot_args: boot_args(COUNTER),
        initrd: None,
        vcpus: 1,
        mem_mib: 128,
        track_dirty_pages: false,
        drives: vec![DriveSpec {
            drive_id: "rootfs".into(),
            is_root_device: true,
            read_only: true,
            source: DriveSource::File(image.clone()),
        }],
        network: Some(NetSpec {
            iface_id: "eth0".into(),
            tap: slot.tap.into(),
            guest_mac: Some("06:00:ac:10:00:02".into()),
        }),
        vsock_cid: Some(3),
        entropy: true,
        console: Some(console_a.clone()),
    };
    a.boot(&boot).await.unwrap();
    wait_counts(&a, &console_a, 3);
    assert!(a.vsock_socket().exists(), "no vsock socket in the run dir");

    // Adopting a live VMM works; a wrong run dir or a pid that is no VMM is refused clearly.
    let adopted = Vmm::adopt(a.pid(), &run_a).await.unwrap();
    assert!(adopted.is_adopted() && adopted.is_running());
    assert_eq!(adopted.sandbox_id(), "sb-a");
    assert_eq!(adopted.instance_state().await.unwrap(), "Running");
    let wrong_dir = Vmm::adopt(a.pid(), root.path()).await.unwrap_err();
    assert!(
        matches!(wrong_dir, VmmError::NotOurVmm { .. }) && wrong_dir.to_string().contains("serves"),
        "{wrong_dir}"
    );
    let not_vmm = Vmm::adopt(std::process::id(), &run_a).await.unwrap_err();
    assert!(not_vmm.to_string().contains("not wrenn-vmm"), "{not_vmm}");

    // Pause, snapshot into the store, stop.
    a.pause().await.unwrap();
    assert_eq!(a.instance_state().await.unwrap(), "Paused");
    let before = *counts(&console_a).last().unwrap();
    let build = wrenn_snapshot::id::BuildId::random().unwrap();
    a.snapshot(&SnapshotSpec {
        store: store.clone(),
        build_id: build.to_string(),
        kind: SnapshotKind::Full,
    })
    .await
    .unwrap();
    // The same build id again: the VMM's own words come back.
    let again = a
        .snapshot(&SnapshotSpec {
            store: store.clone(),
            build_id: build.to_string(),
            kind: SnapshotKind::Full,
        })
        .await
        .unwrap_err();
    assert!(
        again
            .fault_message()
            .is_some_and(|m| m.contains("exists already")),
        "{again}"
    );
    let pid_a = a.pid();
    a.stop(Duration::from_secs(10)).await.unwrap();
    assert!(!a.is_running());
    assert!(!proc_exists(pid_a), "VMM {pid_a} still exists after stop");
    a.stop(Duration::from_secs(1)).await.unwrap();
    assert!(!adopted.is_running());

    // Restore into a new VMM with the page server library serving its memory.
    let run_b = root.path().join("b");
    let mut b = Vmm::spawn(config("sb-b", &run_b, Some(&slot.path()), &[&store]))
        .await
        .unwrap();
    let pager = wrenn_pager::Pager::new(wrenn_pager::PagerConfig::default());
    let source = Arc::new(wrenn_pager::LayeredSource::open(&store, build).unwrap());
    let socket = run_b.join("pager.sock");
    let serving = pager
        .register(&socket, source, wrenn_pager::VmOptions::new("sb-b"))
        .unwrap();
    let console_b = run_b.join("console.log");
    b.restore(&RestoreSpec {
        store: store.clone(),
        build_id: build.to_string(),
        memory: MemorySource::Uffd(socket.clone()),
        taps: vec![("eth0".into(), slot.tap.into())],
        drives: vec![("rootfs".into(), image.clone())],
        resume: false,
        track_dirty_pages: false,
        console: Some(console_b.clone()),
    })
    .await
    .unwrap();
    assert_eq!(b.instance_state().await.unwrap(), "Paused");
    b.resume().await.unwrap();
    let after = wait_counts(&b, &console_b, 3);
    assert!(
        after[0] > before && after[0] <= before + 3,
        "counted to {before} before the snapshot, then {after:?} after the restore"
    );
    assert!(
        serving.stats().counters.faults > 0,
        "the page server served nothing"
    );

    // An adopted handle stops a VMM too; the spawning handle then finds it gone.
    let pid_b = b.pid();
    let mut adopted_b = Vmm::adopt(pid_b, &run_b).await.unwrap();
    adopted_b.stop(Duration::from_secs(10)).await.unwrap();
    assert!(!adopted_b.is_running());
    b.stop(Duration::from_secs(1)).await.unwrap();
    assert!(!b.is_running());
    assert!(!proc_exists(pid_b), "VMM {pid_b} still exists after stop");
    drop(serving);

    // A bad request: the VMM's message, naming the missing kernel, is in the error.
    let run_c = root.path().join("c");
    let mut c = Vmm::spawn(config("sb-c", &run_c, None, &[])).await.unwrap();
    let missing = root.path().join("no-such-vmlinux");
    let bad = BootSpec {
        kernel: missing.clone(),
        network: None,
        ..boot
    };
    let err = c.boot(&bad).await.unwrap_err();
    let message = err.fault_message().unwrap_or_else(|| panic!("{err}"));
    assert!(message.contains("no-such-vmlinux"), "{err}");
    assert!(c.is_running(), "a refused request must not end the VMM");
    c.stop(Duration::from_secs(10)).await.unwrap();
    assert!(!c.is_running());
}
