//! The `wrenn-pager` binary: argument errors, timeouts and signals end it as documented.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pager() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wrenn-pager"))
}

fn memory_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    file.as_file().set_len(16 * 4096).expect("size");
    file
}

#[test]
fn test_binary_missing_mem_file_exits_1_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = pager()
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--mem-file", "/nonexistent/wrenn-mem"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/wrenn-mem"), "{stderr}");
}

#[test]
fn test_binary_accept_timeout_prints_stats_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let memory = memory_file();
    let output = pager()
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--mem-file")
        .arg(memory.path())
        .args(["--accept-timeout-secs", "0"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stats JSON");
    assert!(
        stats["state"]["failed"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no VMM")),
        "{stats}"
    );
    assert_eq!(stats["faults"], 0);
}

#[test]
fn test_binary_sigterm_while_waiting_exits_0_with_stats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let memory = memory_file();
    let socket = dir.path().join("s.sock");
    let record = dir.path().join("record.prefetch");
    let child = pager()
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(memory.path())
        .arg("--record")
        .arg(&record)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // The socket appears only after the signal mask is in place.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill");
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(0));
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stats JSON");
    assert_eq!(stats["state"], "stopped");
    // Nothing was faulted, so the record is an empty but valid prefetch file.
    assert_eq!(
        wrenn_pager::prefetch::read_file(&record).expect("record"),
        Vec::<u64>::new()
    );
}
