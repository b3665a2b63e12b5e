//! The `wrenn-snapshot` binary, run as a user would against a real store.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use wrenn_snapshot::{BuildId, DeviceKind, DriveId, Header, LayeredDisk, LayeredFile, Store};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wrenn-snapshot"))
        .args(args)
        .output()
        .unwrap()
}

/// A store with an imported 16-block image and one disk diff; returns the diff's build.
fn two_generation_store(dir: &Path) -> (Store, BuildId) {
    fs::write(dir.join("image"), vec![0x5Au8; 16 * 4096]).unwrap();
    let store = Store::new(dir.join("store"));
    let drive = DriveId::new("rootfs").unwrap();
    let base = store.import_disk_image(&dir.join("image"), &drive).unwrap();
    let header = Header::read(&store.disk_header(base, &drive)).unwrap();
    let mut disk = LayeredDisk::open(&store, header, &drive, &dir.join("overlay")).unwrap();
    disk.write_at(3 * 4096, &[1u8; 8192]).unwrap();
    disk.write_at(9 * 4096, &[0u8; 4096]).unwrap();
    let header = disk.snapshot(BuildId::random().unwrap()).unwrap();
    (store, header.build)
}

#[test]
fn test_cli_inspect_prints_summary_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, build) = two_generation_store(tmp.path());
    let drive = DriveId::new("rootfs").unwrap();
    let path = store.disk_header(build, &drive);
    let out = run(&["inspect", path.to_str().unwrap(), "--runs"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("generation  1"), "{text}");
    assert!(text.contains(&build.to_string()), "{text}");
    assert!(text.contains("runs        5"), "{text}");
    assert!(text.contains("chain depth 2"), "{text}");
    assert!(text.contains("zero"), "{text}");
}

#[test]
fn test_cli_compact_writes_full_build() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, build) = two_generation_store(tmp.path());
    let out = run(&[
        "compact",
        "--store",
        store.root().to_str().unwrap(),
        "--build",
        &build.to_string(),
        "--kind",
        "disk:rootfs",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_build: BuildId = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let drive = DriveId::new("rootfs").unwrap();
    let header = Header::read(&store.disk_header(new_build, &drive)).unwrap();
    assert_eq!(header.generation, 0);
    let file = LayeredFile::open(&store, header, &DeviceKind::Disk(drive)).unwrap();
    let mut block = vec![0u8; 4096];
    file.read_at(3 * 4096, &mut block).unwrap();
    assert!(block.iter().all(|&b| b == 1));
    file.read_at(9 * 4096, &mut block).unwrap();
    assert!(block.iter().all(|&b| b == 0));
}

#[test]
fn test_cli_bad_input_exits_1_with_message() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.header");
    fs::write(&garbage, b"not a header at all, definitely").unwrap();
    let out = run(&["inspect", garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("garbage.header") && err.contains("magic"),
        "{err}"
    );

    let out = run(&[
        "compact",
        "--store",
        tmp.path().to_str().unwrap(),
        "--build",
        &BuildId::random().unwrap().to_string(),
        "--kind",
        "disk:rootfs",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("opening"));
}
