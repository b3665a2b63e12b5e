//! The official E2B SDKs, unmodified, against `wrenn up` (README's first command): one Wrenn
//! for three suites run one after another, each with only `E2B_API_URL`, `E2B_SANDBOX_URL`
//! and `E2B_API_KEY` set (taken from the `E2B SDKs:` line `wrenn up` prints):
//!
//! ```text
//! tests/e2b/python/       pytest, PyPI e2b 2.63.0 (the venv of crates/envd/tests/sdk, shared)
//! tests/e2b/python-2.45/  pytest, PyPI e2b 2.45.1 (the older generation: POST /sandboxes)
//! tests/e2b/js/           node --test, npm e2b 2.51.0 (package-lock.json, `npm ci` in the cache)
//! ```
//!
//! Each suite's output is printed as it runs; the test fails naming every suite that failed.
//! Starting Wrenn builds the `base` template in the host VM (minutes). Wrenn is stopped with
//! Ctrl-C (SIGINT, then SIGKILL after 60 s) and a suite's whole process group is killed, on
//! every way out, panics included.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// The SDK versions the pinned files hold (the cache directories' names).
const PYTHON_SDK: &str = "2.63.0";
const PYTHON_OLD_SDK: &str = "2.45.1";
const JS_SDK: &str = "2.51.0";
/// How long `wrenn up` may take to say it is up (the first start builds the template).
const UP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long Wrenn gets to stop after Ctrl-C before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn e2b_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2b")
        .join(sub)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment the SDKs get: what `wrenn up` printed.
#[derive(Debug, Clone)]
struct E2bEnv {
    api_url: String,
    sandbox_url: String,
    api_key: String,
}

/// `wrenn up`, running until dropped.
struct Wrenn {
    child: Child,
    data: tempfile::TempDir,
    env: E2bEnv,
}

impl Wrenn {
    fn up() -> Self {
        let data = tempfile::tempdir().unwrap();
        let (api, agent) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_wrenn"))
            .arg("up")
            .arg("--data-dir")
            .arg(data.path())
            .args(["--listen", &format!("127.0.0.1:{api}")])
            .args(["--agent-port", &agent.to_string()])
            .args(["--template-memory-mib", "256"])
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting wrenn up");
        let streams = [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ];
        let mut wrenn = Wrenn {
            child,
            data,
            env: E2bEnv {
                api_url: String::new(),
                sandbox_url: String::new(),
                api_key: String::new(),
            },
        };
        // Wrenn's own lines go on being printed while the suites run (its warnings say what
        // a failing request met on the server side).
        let (lines, seen) = mpsc::channel::<String>();
        for stream in streams {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    println!("wrenn| {line}");
                    let _ = lines.send(line);
                }
            });
        }
        drop(lines);
        let started = Instant::now();
        let mut log = Vec::new();
        // The `E2B SDKs:` line comes with the welcome text, around "Ctrl-C stops Wrenn".
        let mut welcomed: Option<Instant> = None;
        while !log.iter().any(|l: &String| l.contains("E2B SDKs:")) || welcomed.is_none() {
            let deadline = match welcomed {
                Some(at) => at + Duration::from_secs(5),
                None => started + UP_TIMEOUT,
            };
            match seen.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if line.contains("Ctrl-C stops Wrenn") {
                        welcomed = Some(Instant::now());
                    }
                    log.push(line);
                }
                Err(_) => panic!(
                    "wrenn up did not come up with an `E2B SDKs:` line within {:?}:\n{}",
                    started.elapsed(),
                    log.join("\n")
                ),
            }
        }
        println!(
            "---- wrenn up is up after {:.0}s",
            started.elapsed().as_secs_f64()
        );
        // Later lines are not needed here; the readers keep printing them.
        std::thread::spawn(move || while seen.recv().is_ok() {});
        let line = log
            .iter()
            .find_map(|l| l.split_once("E2B SDKs:").map(|(_, rest)| rest.to_owned()))
            .unwrap_or_default();
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some(("E2B_API_URL", v)) => wrenn.env.api_url = v.to_owned(),
                Some(("E2B_SANDBOX_URL", v)) => wrenn.env.sandbox_url = v.to_owned(),
                Some(("E2B_API_KEY", v)) => wrenn.env.api_key = v.to_owned(),
                _ => {}
            }
        }
        let kept = std::fs::read_to_string(wrenn.data.path().join("server/e2b-api-key"))
            .expect("reading <data-dir>/server/e2b-api-key");
        assert_eq!(
            wrenn.env.api_key,
            kept.trim(),
            "the printed key is the kept one"
        );
        assert_eq!(
            wrenn.env.api_url,
            format!("http://127.0.0.1:{api}"),
            "{line}"
        );
        assert_eq!(wrenn.env.sandbox_url, wrenn.env.api_url, "{line}");
        let key = wrenn.env.api_key.strip_prefix("e2b_").unwrap_or_default();
        assert!(
            key.len() == 40 && key.bytes().all(|b| b.is_ascii_hexdigit()),
            "the key is not shaped e2b_<40 hex>: {line}"
        );
        wrenn
    }

    /// Ctrl-C, then SIGKILL if Wrenn has not stopped in time; whether it stopped cleanly.
    fn stop(&mut self) -> bool {
        if self.child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("wrenn up did not stop within {STOP_TIMEOUT:?} of Ctrl-C; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Wrenn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One suite's process (in a process group of its own), killed with its group on drop.
struct SuiteProcess(Child);

impl Drop for SuiteProcess {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0.id()) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one suite with the SDK environment, printing its output as it comes; whether it
/// passed (an error names what went wrong otherwise).
fn run_suite(
    name: &str,
    mut command: Command,
    env: &E2bEnv,
    limit: Duration,
) -> Result<(), String> {
    // Only the three variables point the SDKs at Wrenn; nothing inherited may redirect them.
    for var in [
        "E2B_DEBUG",
        "E2B_DOMAIN",
        "E2B_ACCESS_TOKEN",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        command.env_remove(var);
    }
    command
        .env("E2B_API_URL", &env.api_url)
        .env("E2B_SANDBOX_URL", &env.sandbox_url)
        .env("E2B_API_KEY", &env.api_key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let shown: Vec<String> = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("==== {name}: {}", shown.join(" "));
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|e| format!("{name}: could not start: {e}"))?;
    let streams = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ];
    let mut process = SuiteProcess(child);
    let readers: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    println!("{name}| {line}");
                }
            })
        })
        .collect();
    let status = loop {
        if let Some(status) = process.0.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if started.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(process);
    for reader in readers {
        let _ = reader.join();
    }
    let took = started.elapsed().as_secs_f64();
    let outcome = match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("{name}: failed ({status}) after {took:.0}s")),
        None => Err(format!("{name}: killed after {limit:?}")),
    };
    match &outcome {
        Ok(()) => println!("==== {name}: passed in {took:.0}s"),
        Err(e) => println!("==== {e}"),
    }
    outcome
}

fn pytest(
    name: &str,
    venv: &Path,
    dir: &Path,
    env: &E2bEnv,
    limit: Duration,
) -> Result<(), String> {
    let mut command = Command::new(venv.join("bin/python"));
    command
        .args([
            "-m",
            "pytest",
            "-v",
            "-rA",
            "--durations=10",
            "-p",
            "no:cacheprovider",
        ])
        .arg(dir)
        .current_dir(dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    run_suite(name, command, env, limit)
}

/// The JS suite's files next to a `node_modules` link into the cache (Node resolves `e2b`
/// from the importing file's directory upwards).
fn node_test(name: &str, installed: &Path, env: &E2bEnv, limit: Duration) -> Result<(), String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(
        installed.join("node_modules"),
        work.path().join("node_modules"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::copy(
        installed.join("package.json"),
        work.path().join("package.json"),
    )
    .map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(e2b_dir("js")).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if file.ends_with(".mjs") {
            std::fs::copy(&path, work.path().join(file)).map_err(|e| e.to_string())?;
            if file.ends_with(".test.mjs") {
                files.push(file.to_owned());
            }
        }
    }
    files.sort();
    let mut command = Command::new("node");
    command
        .args(["--test", "--test-reporter=spec", "--test-concurrency=1"])
        .args(&files)
        .current_dir(work.path());
    run_suite(name, command, env, limit)
}

#[test]
fn e2b_sdks_python_older_python_and_js_against_wrenn_up() {
    // Everything the suites need, before the minutes of starting Wrenn.
    let cache = wrenn_image::cache::Cache::from_env();
    let venv = wrenn_image::venv::ensure(
        &cache,
        &format!("e2b-python-{PYTHON_SDK}"),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../envd/tests/sdk/requirements.txt"),
    )
    .unwrap_or_else(|e| panic!("the E2B Python SDK's venv: {e}"));
    let old_venv = wrenn_image::venv::ensure(
        &cache,
        &format!("e2b-python-{PYTHON_OLD_SDK}"),
        &e2b_dir("python-2.45").join("requirements.txt"),
    )
    .unwrap_or_else(|e| panic!("the older E2B Python SDK's venv: {e}"));
    let js = wrenn_image::npm::ensure(&cache, &format!("e2b-js-{JS_SDK}"), &e2b_dir("js"))
        .unwrap_or_else(|e| panic!("the E2B JS SDK: {e}"));

    let started = Instant::now();
    let mut wrenn = Wrenn::up();
    let env = wrenn.env.clone();
    let results = [
        pytest(
            &format!("python-{PYTHON_SDK}"),
            &venv,
            &e2b_dir("python"),
            &env,
            Duration::from_secs(600),
        ),
        pytest(
            &format!("python-{PYTHON_OLD_SDK}"),
            &old_venv,
            &e2b_dir("python-2.45"),
            &env,
            Duration::from_secs(240),
        ),
        node_test(&format!("js-{JS_SDK}"), &js, &env, Duration::from_secs(480)),
    ];
    let stopped = wrenn.stop();
    println!(
        "---- all suites and Wrenn's stop took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "E2B SDK suites failed: {failed:#?}");
    assert!(stopped, "wrenn up did not stop cleanly on Ctrl-C");
}
