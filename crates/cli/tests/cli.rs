//! The `wrenn` command's behaviour on bad input and broken environments: a clear message and a
//! non-zero exit, never a hang, a panic or a leftover process.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const WRENN: &str = env!("CARGO_BIN_EXE_wrenn");

fn wrenn(cache: &Path, args: &[&str]) -> Output {
    Command::new(WRENN)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run wrenn")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

#[test]
fn test_guest_show_empty_cache_says_how_to_build() {
    let cache = tempfile::tempdir().unwrap();
    let out = wrenn(cache.path(), &["guest", "show", "--only", "test"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is missing; build it first with `cargo xtask guest`"),
        "{err}"
    );
}

#[test]
fn test_guest_build_corrupt_entry_fails_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let out = wrenn(cache.path(), &["guest", "build", "--only", "test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let image = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.ends_with("rootfs.ext4"))
        .map(str::to_owned)
        .expect("image path in the summary");
    // Flip bytes in the middle of the image, keeping its size.
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[1024] ^= 0xff;
    std::fs::write(&image, bytes).unwrap();

    let out = wrenn(cache.path(), &["guest", "build", "--only", "test"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is corrupt: rootfs.ext4 does not match its sha256"),
        "{err}"
    );
    assert!(err.contains("--rebuild"), "{err}");

    let out = wrenn(
        cache.path(),
        &["guest", "build", "--only", "test", "--rebuild"],
    );
    assert!(out.status.success(), "rebuild heals it: {}", stderr(&out));
}

#[test]
fn test_guest_build_full_disk_fails_clearly() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A private mount namespace: the tiny filesystem disappears with the command.
    let script = format!(
        "mount -t tmpfs -o size=1m wrenn-full {dir} && exec {WRENN} --cache-dir {dir} guest build --only test",
        dir = dir.path().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("not enough free disk space"), "{err}");
    assert!(err.contains("the test image build needs"), "{err}");
}

#[test]
fn test_hostvm_without_command_is_a_usage_error() {
    let cache = tempfile::tempdir().unwrap();
    let out = wrenn(cache.path(), &["hostvm"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Usage"), "{}", stderr(&out));
}

/// Children of `pid` (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn test_hostvm_interrupted_leaves_no_qemu() {
    let mut child = Command::new(WRENN)
        .args(["hostvm", "--", "sleep", "600"])
        .env("WRENN_HOSTVM", "always")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let qemu = loop {
        let found: Vec<u32> = children(pid)
            .into_iter()
            .filter(|c| {
                std::fs::read_to_string(format!("/proc/{c}/comm"))
                    .is_ok_and(|n| n.starts_with("qemu"))
            })
            .collect();
        if let Some(&q) = found.first() {
            break q;
        }
        assert!(
            Instant::now() < deadline,
            "no qemu started under wrenn hostvm"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "wrenn hostvm exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let it get going, then interrupt wrenn alone (not its process group).
    std::thread::sleep(Duration::from_secs(2));
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "an interrupted run must not report success"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(qemu) {
        assert!(
            Instant::now() < deadline,
            "qemu {qemu} outlived wrenn hostvm"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
