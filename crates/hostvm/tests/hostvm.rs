//! Host VM tests with real QEMU and a real L1 (each boot takes a few seconds under TCG).
//!
//! They need root and QEMU (installed on demand) and are skipped, saying so, inside the host VM
//! itself. VM tests take a lock so that boots do not compete for the machine's two cores.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wrenn_hostvm::{CommandSpec, HostVmError, Placement, RunOptions, decide, run};
use wrenn_image::cache::Cache;

static VM_LOCK: Mutex<()> = Mutex::new(());

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "wrenn_hostvm=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Why host VM tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    if decide::in_hostvm() {
        return Some("already inside the host VM");
    }
    if !wrenn_image::packages::is_root() {
        return Some("not root");
    }
    None
}

macro_rules! require_hostvm {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

/// A fresh directory under the target directory (not /tmp: /tmp is per-run inside the VM).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hostvm-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_captured(
    spec: &CommandSpec,
    options: &RunOptions,
) -> (Result<i32, HostVmError>, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = run(spec, options, &Cache::from_env(), &mut out, &mut err);
    (
        result,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// QEMU processes whose command line mentions the run directories of process `pid`.
fn qemus_of(pid: u32) -> Vec<String> {
    let marker = format!("hostvm-runs/{pid}-");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(&marker) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

const SCRIPT: &str = r#"
echo "cwd=$(pwd)"
echo "var=$WRENN_TEST_VAR"
echo "in_hostvm=$WRENN_IN_HOSTVM"
[ -c /dev/kvm ] && echo "kvm=yes" || echo "kvm=no"
grep -qw svm /proc/cpuinfo && echo "svm=yes" || echo "svm=no"
echo "from the VM" > written.txt && echo "share=written"
if touch "$RO_PROBE" 2>/dev/null; then echo "root=writable"; else echo "root=readonly"; fi
echo tmpdata > /tmp/inside && echo "tmp=$(cat /tmp/inside)"
echo "to stderr" >&2
exit 7
"#;

#[test]
fn test_hostvm_command_gets_kvm_cwd_env_shares_and_returns_exit_code() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let share = scratch("share");
    let ro_parent = scratch("ro");
    let ro_probe = ro_parent.join("must-not-exist");
    let spec = CommandSpec::new(["sh", "-c", SCRIPT])
        .cwd(&share)
        .env("WRENN_TEST_VAR", "hello 'quoted' world")
        .env("RO_PROBE", &ro_probe)
        .writable(&share);
    let started = Instant::now();
    let (result, out, err) = run_captured(&spec, &RunOptions::new(Placement::HostVm));
    eprintln!(
        "took {:?}\nstdout:\n{out}\nstderr:\n{err}",
        started.elapsed()
    );
    let code = result.unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(code, 7);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("cwd={}", share.display()).as_str(),
            "var=hello 'quoted' world",
            "in_hostvm=1",
            "kvm=yes",
            "svm=yes",
            "share=written",
            "root=readonly",
            "tmp=tmpdata",
        ]
    );
    assert_eq!(err, "to stderr\n");
    assert_eq!(
        fs::read_to_string(share.join("written.txt")).unwrap(),
        "from the VM\n"
    );
    assert!(!ro_probe.exists(), "the host root was writable");
    let _ = fs::remove_dir_all(&share);
    let _ = fs::remove_dir_all(&ro_parent);
}

#[test]
fn test_hostvm_signal_gives_128_plus_signal_and_no_shell_noise() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // A cwd under the host's /tmp, outside any writable share, stays visible inside (the VM's
    // own /tmp would hide it otherwise).
    let host_tmp = tempfile::Builder::new()
        .prefix("wrenn-hostvm-cwd")
        .tempdir_in("/tmp")
        .unwrap();
    fs::write(host_tmp.path().join("note.txt"), "before\n").unwrap();
    let spec =
        CommandSpec::new(["sh", "-c", "cat note.txt >&2; kill -KILL $$"]).cwd(host_tmp.path());
    let (result, out, err) = run_captured(&spec, &RunOptions::new(Placement::HostVm));
    assert_eq!(result.unwrap_or_else(|e| panic!("{}", chain(&e))), 128 + 9);
    assert_eq!(out, "");
    // Only what the command wrote: no "Killed" from the VM's init shell.
    assert_eq!(err, "before\n");
}

#[test]
fn test_hostvm_timeout_kills_vm_and_leaves_no_qemu() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let spec = CommandSpec::new(["sh", "-c", "echo started; sleep 600"]);
    let options = RunOptions::new(Placement::HostVm).timeout(Duration::from_secs(15));
    let started = Instant::now();
    let (result, out, _) = run_captured(&spec, &options);
    let took = started.elapsed();
    let err = result.expect_err("a 600 s sleep must time out");
    assert!(
        matches!(err, HostVmError::Timeout { .. }),
        "{}",
        chain(&err)
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
    assert_eq!(out, "started\n", "the output before the timeout arrives");
    let left = qemus_of(std::process::id());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}

#[test]
fn test_hostvm_whose_heartbeat_stops_is_killed_as_frozen_with_its_state() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // The command keeps talking but stops init's heartbeat loop (the parent of its `sleep 3`),
    // which is what a frozen VM looks like from the host.
    let script = r#"
        echo tick
        for p in /proc/[0-9]*; do
            if [ "$(tr '\0' ' ' <$p/cmdline 2>/dev/null)" = "sleep 3 " ]; then
                kill -STOP "$(cut -d' ' -f4 $p/stat)"
                break
            fi
        done
        while :; do echo tick; sleep 1; done"#;
    let spec = CommandSpec::new(["sh", "-c", script]);
    let mut options = RunOptions::new(Placement::HostVm).timeout(Duration::from_secs(120));
    // Long enough for the scan above on a busy machine, short enough for a test.
    options.heartbeat_timeout = Duration::from_secs(15);
    let started = Instant::now();
    let (result, out, _) = run_captured(&spec, &options);
    let took = started.elapsed();
    let err = result.expect_err("a VM without heartbeat must count as stalled");
    match &err {
        HostVmError::Stalled { what, state, .. } => {
            assert!(what.contains("heartbeat"), "{what}");
            assert!(
                !state.contains("RIP=unknown"),
                "QMP did not answer: {state}"
            );
        }
        other => panic!("expected a stall, got: {}", chain(other)),
    }
    assert!(out.contains("tick"), "{out}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    let left = qemus_of(std::process::id());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}

#[test]
fn test_hostvm_silent_command_is_killed_as_a_stall() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Output every second for a while, then silence: only the silence counts.
    let spec = CommandSpec::new([
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6; do echo tick; sleep 1; done; sleep 600",
    ]);
    let mut options = RunOptions::new(Placement::HostVm).timeout(Duration::from_secs(120));
    options.quiet_timeout = Some(Duration::from_secs(8));
    let started = Instant::now();
    let (result, out, _) = run_captured(&spec, &options);
    let took = started.elapsed();
    let err = result.expect_err("a silent command must count as a stall");
    assert!(
        matches!(err, HostVmError::Stalled { .. }),
        "{}",
        chain(&err)
    );
    assert_eq!(out.matches("tick").count(), 6, "{out}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let left = qemus_of(std::process::id());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}

#[test]
fn test_hostvm_without_svm_reports_missing_kvm_clearly() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut options = RunOptions::new(Placement::HostVm);
    options.cpu = "max,-svm".into();
    options.timeout = Some(Duration::from_secs(120));
    let (result, out, _) = run_captured(&CommandSpec::new(["true"]), &options);
    let err = result.expect_err("kvm_amd cannot load without SVM");
    let msg = chain(&err);
    eprintln!("{msg}");
    assert!(matches!(err, HostVmError::GuestSetup { .. }), "{msg}");
    assert!(msg.contains("kvm_amd"), "{msg}");
    assert!(out.is_empty());
}

const CHILD_ENV: &str = "WRENN_HOSTVM_TEST_CHILD";

/// Not a test by itself: the body of the process that
/// `test_hostvm_killed_caller_takes_qemu_along` starts and kills.
#[test]
fn test_hostvm_child_helper() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let spec = CommandSpec::new(["sleep", "600"]);
    let _ = run_captured(&spec, &RunOptions::new(Placement::HostVm));
}

#[test]
fn test_hostvm_killed_caller_takes_qemu_along_and_next_run_cleans_up() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "test_hostvm_child_helper", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The first run may build the artifacts first.
    let waited = Instant::now();
    while qemus_of(pid).is_empty() {
        assert!(
            waited.elapsed() < Duration::from_secs(300),
            "no QEMU appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    while !qemus_of(pid).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "QEMU outlived its caller: {:?}",
            qemus_of(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let runs = Cache::from_env().root().join("work/hostvm-runs");
    let stale: Vec<PathBuf> = fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pid}-")))
        })
        .collect();
    assert_eq!(stale.len(), 1, "the killed run's directory: {stale:?}");

    // A run whose boots cannot finish in time: killed and retried, then a clear error. Its
    // start removes the killed run's directory.
    let mut options = RunOptions::new(Placement::HostVm);
    options.boot_timeout = Duration::from_millis(300);
    options.boot_attempts = 2;
    let (result, _, _) = run_captured(&CommandSpec::new(["true"]), &options);
    let err = result.expect_err("no boot finishes in 300 ms");
    let msg = chain(&err);
    eprintln!("{msg}");
    assert!(
        matches!(err, HostVmError::Boot { attempts: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains("not ready within 300ms"), "{msg}");
    assert!(
        !stale[0].exists(),
        "stale run directory left: {}",
        stale[0].display()
    );
    assert!(qemus_of(std::process::id()).is_empty());
}

#[test]
fn test_hostvm_invalid_writable_dir_is_error_before_boot() {
    let spec = CommandSpec::new(["true"]).writable("/wrenn/no/such/dir");
    let (result, _, _) = run_captured(&spec, &RunOptions::new(Placement::HostVm));
    assert!(
        matches!(result, Err(HostVmError::InvalidSpec { .. })),
        "{result:?}"
    );
}

#[test]
fn test_decide_on_pvm_machine_chooses_hostvm() {
    init_logs();
    if std::env::var_os("WRENN_HOSTVM").is_some() || decide::in_hostvm() {
        eprintln!("skipped: WRENN_HOSTVM or WRENN_IN_HOSTVM is set");
        return;
    }
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: not a PVM machine");
        return;
    }
    let decision = decide().unwrap();
    assert_eq!(decision.placement, Placement::HostVm, "{decision}");
    assert!(decision.reason.contains("kvm_pvm"), "{decision}");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
