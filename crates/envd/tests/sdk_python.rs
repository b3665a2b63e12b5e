//! The official E2B Python SDK (`e2b` from PyPI, pinned in `tests/sdk/requirements.txt`)
//! against the real envd binary.
//!
//! Each test starts envd in a network namespace of its own (`unshare --net`, loopback up),
//! listening on E2B's port 49983, with a user database (`--etc`) holding `root` and `user`
//! (uid 1000, the default user), and runs one pytest file of `tests/sdk/` inside that
//! namespace (`nsenter --net`) with `E2B_DEBUG=true`: the SDK then talks to
//! `localhost:49983` without any API calls, and tests never fight over the port.
//!
//! The SDK lives in a venv in the cache (`$WRENN_CACHE_DIR/e2b-python-<version>`, else
//! `/var/cache/wrenn/...`), built on first use under a file lock, with the Debian packages it
//! needs installed by `wrenn_image::packages::ensure`. pytest's output is printed (libtest
//! shows it when a test fails, or always with `--nocapture`), followed by envd's log on
//! failure. envd, whatever it started, and with them the namespace, are killed on drop.
use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The SDK version the requirements file pins (the venv's directory name).
const E2B_VERSION: &str = "2.63.0";
/// Debian packages the harness needs besides the venv's: `ip`, and `unshare`/`nsenter` (bash
/// and coreutils are essential packages).
const PACKAGES: &[&str] = &["iproute2", "util-linux"];
/// E2B's envd port, which the SDK in debug mode always uses.
const ENVD_PORT: u16 = 49983;
/// uid and gid of the sandbox's default user, as in E2B's templates.
const USER_ID: u32 = 1000;
/// A pytest run longer than this is killed (the 200 MiB transfer takes seconds).
const PYTEST_TIMEOUT_SECS: u32 = 600;

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

/// The venv's interpreter, built once per cache (and once per test process).
fn venv_python() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        wrenn_image::packages::ensure(PACKAGES).expect("installing the harness's packages");
        let cache = wrenn_image::cache::Cache::from_env();
        let requirements = sdk_dir().join("requirements.txt");
        wrenn_image::venv::ensure(&cache, &format!("e2b-python-{E2B_VERSION}"), &requirements)
            .unwrap_or_else(|e| panic!("the E2B SDK's venv: {e}"))
            .join("bin/python")
    })
}

/// The identity of a process's network namespace (`net:[<inode>]`).
fn netns_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|link| link.to_string_lossy().into_owned())
}

/// envd alone in a fresh network namespace, with its own users and directories:
///
/// ```text
/// <dir>/etc/{passwd,group}   root (home <dir>/root, 0700) and user (1000, home <dir>/home/user)
/// <dir>/scratch/             the Python side's own files (not touched through envd)
/// <dir>/envd.log             envd's stdout and stderr
/// ```
struct NetnsEnvd {
    child: Child,
    netns: String,
    dir: tempfile::TempDir,
}

impl NetnsEnvd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["etc", "root", "home/user", "scratch"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::set_permissions(root.join("root"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::os::unix::fs::chown(root.join("home/user"), Some(USER_ID), Some(USER_ID)).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            format!(
                "root:x:0:0:root:{}:/bin/bash\nuser:x:{USER_ID}:{USER_ID}::{}:/bin/bash\n",
                root.join("root").display(),
                root.join("home/user").display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            format!("root:x:0:\nuser:x:{USER_ID}:\n"),
        )
        .unwrap();
        let log = File::create(root.join("envd.log")).unwrap();
        let own_netns = netns_of(std::process::id()).expect("reading our network namespace");
        // `unshare` (without --fork) unshares and execs the shell, which execs envd: the
        // child's pid is envd's.
        let child = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
            ])
            .arg(env!("CARGO_BIN_EXE_envd"))
            .args([
                "--port",
                &ENVD_PORT.to_string(),
                "--default-user",
                "user",
                "--etc",
            ])
            .arg(root.join("etc"))
            .env("ENVD_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running unshare");
        let mut envd = Self {
            child,
            netns: String::new(),
            dir,
        };
        // Until unshare(2) has run, the child still shares our namespace.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = envd.child.try_wait().unwrap() {
                panic!("envd exited at start ({status}):\n{}", envd.log());
            }
            match netns_of(envd.child.id()) {
                Some(ns) if ns != own_netns => {
                    envd.netns = ns;
                    break;
                }
                _ => {}
            }
            assert!(Instant::now() < deadline, "envd's namespace did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        envd
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("envd.log")).unwrap_or_default()
    }

    /// Runs one pytest file of `tests/sdk/` in envd's namespace; panics (after printing
    /// pytest's output and envd's log) when pytest fails.
    fn pytest(&mut self, file: &str) {
        let python = venv_python();
        let mut command = Command::new("timeout");
        command
            .args(["--kill-after=10", &PYTEST_TIMEOUT_SECS.to_string()])
            .arg("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.child.id()))
            .arg("--")
            .arg(python)
            .args(["-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", file])
            .current_dir(sdk_dir())
            .stdin(Stdio::null())
            .env("E2B_DEBUG", "true")
            .env("E2B_API_KEY", format!("e2b_{}", "0".repeat(40)))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .env("WRENN_TEST_HOME", self.path("home/user"))
            .env("WRENN_TEST_ROOT_ONLY", self.path("root"))
            .env("WRENN_TEST_SCRATCH", self.path("scratch"));
        // Nothing may send localhost traffic elsewhere or point the SDK at another server.
        for var in [
            "E2B_SANDBOX_URL",
            "E2B_API_URL",
            "E2B_DOMAIN",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ] {
            command.env_remove(var);
        }
        let started = Instant::now();
        let out = command.output().expect("running pytest");
        println!(
            "---- pytest {file} ({:.1}s, {})",
            started.elapsed().as_secs_f64(),
            out.status
        );
        println!("{}", String::from_utf8_lossy(&out.stdout));
        println!("{}", String::from_utf8_lossy(&out.stderr));
        let alive = self.child.try_wait().unwrap().is_none();
        if !out.status.success() || !alive {
            println!("---- envd log\n{}", self.log());
        }
        assert!(
            out.status.success(),
            "pytest {file} failed ({})",
            out.status
        );
        assert!(alive, "envd exited during pytest {file}");
    }
}

impl Drop for NetnsEnvd {
    /// Kills envd, then every process still in its namespace (commands the tests started),
    /// which frees the namespace.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.netns.is_empty() {
            return;
        }
        for _ in 0..50 {
            let mut left = 0;
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|name| name.parse::<i32>().ok())
                else {
                    continue;
                };
                let Ok(pid_u32) = u32::try_from(pid) else {
                    continue;
                };
                if netns_of(pid_u32).as_deref() == Some(self.netns.as_str()) {
                    left += 1;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if left == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("processes remain in envd's namespace {}", self.netns);
    }
}

fn run(file: &str) {
    let mut envd = NetnsEnvd::start();
    envd.pytest(file);
}

#[test]
fn sdk_commands() {
    run("test_commands.py");
}

#[test]
fn sdk_pty() {
    run("test_pty.py");
}

#[test]
fn sdk_files() {
    run("test_files.py");
}

#[test]
fn sdk_transfer_200mib() {
    run("test_transfer.py");
}

#[test]
fn sdk_bad_input() {
    run("test_errors.py");
}

#[test]
fn harness_namespace_is_cleaned_up() {
    let envd = NetnsEnvd::start();
    let pid = envd.child.id();
    let netns = envd.netns.clone();
    // A process of the namespace that is not envd's child must go too.
    let straggler = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["--", "sleep", "600"])
        .spawn()
        .unwrap();
    let straggler_pid = straggler.id();
    wait_until(|| netns_of(straggler_pid).as_deref() == Some(netns.as_str()));
    drop(envd);
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err()
            || netns_of(pid).as_deref() != Some(netns.as_str()),
        "envd survived"
    );
    let mut straggler = straggler;
    let status = straggler.wait().unwrap();
    assert!(
        !status.success(),
        "the namespace's other process was not killed"
    );
}

fn wait_until(mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}
