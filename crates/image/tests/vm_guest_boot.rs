//! The guest kernel and images boot under QEMU microvm on a usable KVM (QEMU proves the images
//! here; Wrenn's own VMM replaces it as the thing under test). Needs `cargo xtask guest` first;
//! `cargo xtask test` does both and runs this inside the host VM where needed.

use std::time::Duration;

use wrenn_image::cache::Cache;
use wrenn_image::kernel;
use wrenn_image::qemu::{Accel, Boot, BootOutcome};
use wrenn_image::rootfs::{self, IMAGE_FILE, ImageKind};
use wrenn_vmm::probe;

fn boot(kind: ImageKind, memory_mib: u32, script: &str) -> BootOutcome {
    let cache = Cache::from_env();
    let kernel = kernel::find(&cache).expect("guest kernel (run `cargo xtask guest`)");
    let image = rootfs::find(&cache, kind).expect("guest image (run `cargo xtask guest`)");
    let mut boot =
        Boot::new(&kernel.file("vmlinux"), &image.file(IMAGE_FILE), Accel::Kvm).run_script(script);
    boot.memory_mib = memory_mib;
    boot.timeout = Duration::from_secs(90);
    let outcome = boot.run().expect("qemu boot");
    assert!(
        outcome.ready_after.is_some(),
        "no {} marker; console:\n{}",
        rootfs::READY_MARKER,
        outcome.console
    );
    outcome
}

/// Lines the script printed between the ready marker and its exit code.
fn script_output(outcome: &BootOutcome) -> Vec<String> {
    outcome
        .console
        .lines()
        .skip_while(|l| !l.contains(rootfs::READY_MARKER))
        .skip(1)
        .take_while(|l| !l.contains("WRENN_EXIT="))
        .map(str::to_owned)
        .collect()
}

#[test]
fn test_test_image_boots_to_marker_with_devices() {
    if !probe::usable_for_test("test_test_image_boots_to_marker_with_devices") {
        return;
    }
    let script = "\
        echo cpus=$(grep -c ^processor /proc/cpuinfo)\n\
        echo root=$(awk '$2 == \"/\" {print $1, $3}' /proc/mounts)\n\
        echo cgroup=$(cat /sys/fs/cgroup/cgroup.controllers)\n\
        echo kernel=$(uname -r)\n";
    let outcome = boot(ImageKind::Test, 256, script);
    let out = script_output(&outcome);
    assert_eq!(outcome.run_exit, Some(0), "console:\n{}", outcome.console);
    assert!(out.contains(&"cpus=2".to_owned()), "{out:?}");
    assert!(
        out.contains(&"root=/dev/root ext4".to_owned())
            || out.contains(&"root=/dev/vda ext4".to_owned()),
        "{out:?}"
    );
    let cgroup = out
        .iter()
        .find(|l| l.starts_with("cgroup="))
        .expect("cgroup line");
    for controller in ["cpu", "memory", "pids"] {
        assert!(
            cgroup
                .split_whitespace()
                .any(|c| c.trim_start_matches("cgroup=") == controller),
            "{cgroup}"
        );
    }
}

#[test]
fn test_base_image_runs_python_as_user() {
    if !probe::usable_for_test("test_base_image_runs_python_as_user") {
        return;
    }
    let script = "runuser -u user -- sh -c 'id -un; echo home=$HOME; python3 -c \"print(1)\"; sudo -n id -u'\n";
    let outcome = boot(ImageKind::Base, 512, script);
    assert_eq!(outcome.run_exit, Some(0), "console:\n{}", outcome.console);
    assert_eq!(
        script_output(&outcome),
        vec![
            "user".to_owned(),
            "home=/home/user".to_owned(),
            "1".to_owned(),
            "0".to_owned()
        ],
        "console:\n{}",
        outcome.console
    );
}
