//! `cargo xtask bench e2b`: the official E2B Python SDK (`e2b` 2.63.0) against Wrenn, beside
//! Wrenn's own REST API, both driven from one Python process (`xtask/bench/e2b_bench.py`) so
//! that both sides pay the same client costs.
//!
//! Wrenn runs as users run it: a release `wrenn up` with a data directory of its own
//! (`$WRENN_BENCH_DATA`, kept between runs so the `base` template is built once; else a fresh
//! one under /tmp), its agent in the host VM on this machine. The SDK gets only the environment
//! `up` prints (`E2B SDKs: E2B_API_URL=... E2B_SANDBOX_URL=... E2B_API_KEY=...`); the REST side
//! uses the key in `<data>/server/api-key`. `up` is stopped with SIGINT at the end and on every
//! error path, which stops the host VM with it.
//!
//! Measured (ms): `Sandbox.create("base")` until the first `commands.run("true")` returned,
//! beside `POST /v1/sandboxes` then `POST /v1/sandboxes/{id}/exec {"cmd":"true"}` (alternating,
//! one warm-up each, every sandbox killed after its sample, untimed); then the SDK's
//! `commands.run("true")` on a running sandbox beside Wrenn's exec, what agents do most. The SDK
//! wraps every command in `/bin/bash -l -c`, so its run also pays for a login shell: Wrenn's exec
//! of that same command line is reported too (`api_exec_bash`, BENCH lines only).
//!
//! `WRENN_BENCH_E2B_API_ONLY=1` measures the REST side alone, for checking the harness against
//! a Wrenn without the E2B surface.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wrenn_image::cache::Cache;

use crate::bench_vmm::Stats;

const DEFAULT_RUNS: usize = 20;
/// Runs of `true` on one running sandbox, per side.
const EXEC_RUNS: usize = 50;
const TEMPLATE: &str = "base";
/// The SDK's pinned version: the venv's name, as in crates/envd/tests/sdk_python.rs.
const E2B_VERSION: &str = "2.63.0";
/// Starting `up`: the host VM's boot and, on a new data directory, the template's build.
const UP_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// After `Wrenn is up.`, how long the `E2B SDKs:` line may take.
const E2B_LINE_GRACE: Duration = Duration::from_secs(10);
/// How long `up` may take to stop after SIGINT before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// What `up` prints once ready, and its line for the E2B SDKs.
const UP_MARKER: &str = "Wrenn is up.";
const E2B_MARKER: &str = "E2B SDKs:";
const DATA_ENV: &str = "WRENN_BENCH_DATA";
const API_ONLY_ENV: &str = "WRENN_BENCH_E2B_API_ONLY";

/// The sample series the script reports (ms).
const SDK_CREATE_RUN: &str = "sdk_create_run";
const API_CREATE_RUN: &str = "api_create_run";
const SDK_RUN: &str = "sdk_run";
const API_EXEC: &str = "api_exec";
/// Wrenn's exec of the SDK's command line (`/bin/bash -l -c true`): BENCH lines only.
const API_EXEC_BASH: &str = "api_exec_bash";

pub fn run(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    let api_only = std::env::var_os(API_ONLY_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    let wrenn = crate::bench_vmm::build_release("wrenn-cli", "wrenn")?;
    let vmm = crate::bench_vmm::build_release("wrenn-vmm", "wrenn-vmm")?;
    let root = workspace_root();
    let requirements = root.join("crates/envd/tests/sdk/requirements.txt");
    let venv =
        wrenn_image::venv::ensure(cache, &format!("e2b-python-{E2B_VERSION}"), &requirements)
            .context("the E2B SDK's venv")?;
    let script = root.join("xtask/bench/e2b_bench.py");

    let _temp;
    let data = match std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("wrenn-bench-e2b-")
                .tempdir_in("/tmp")?;
            let path = dir.path().to_owned();
            _temp = dir;
            path
        }
    };
    let (api_port, agent_port) = (free_port()?, free_port()?);
    eprintln!(
        "==> wrenn up (data {}, API 127.0.0.1:{api_port})",
        data.display()
    );
    let mut up = Up::start(&wrenn, &vmm, &data, api_port, agent_port)?;
    let e2b_env = up.wait_ready(!api_only)?;
    let wrenn_key = read_key(&data.join("server/api-key"))?;
    if let Some(env) = &e2b_env {
        let file_key = read_key(&data.join("server/e2b-api-key"))?;
        let printed = env.iter().find(|(k, _)| k == "E2B_API_KEY").map(|(_, v)| v);
        ensure!(
            printed == Some(&file_key),
            "`up` printed an E2B key other than the one in server/e2b-api-key"
        );
    }

    let mut python = Command::new(venv.join("bin/python"));
    python
        .arg(&script)
        .args(["--runs", &runs.to_string()])
        .args(["--exec-runs", &EXEC_RUNS.to_string()])
        .args(["--template", TEMPLATE])
        .env("WRENN_API_URL", format!("http://127.0.0.1:{api_port}"))
        .env("WRENN_API_KEY", &wrenn_key)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN");
    match &e2b_env {
        Some(env) => {
            python.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        None => {
            python.arg("--api-only");
        }
    }
    let limit = Duration::from_secs(20 * 60) + Duration::from_secs(90) * u32::try_from(runs)?;
    let output = run_script(python, limit)?;
    let samples = parse_samples(&output)?;
    up.stop()?;

    for name in [
        SDK_CREATE_RUN,
        API_CREATE_RUN,
        SDK_RUN,
        API_EXEC,
        API_EXEC_BASH,
    ] {
        if let Some(s) = samples.get(name).and_then(|v| Stats::of(v)) {
            println!("BENCH e2b {name}_median={:.1}ms", s.median);
            println!("BENCH e2b {name}_p99={:.1}ms", s.p99);
            println!("BENCH e2b {name}_min={:.1}ms", s.min);
            println!("BENCH e2b {name}_max={:.1}ms", s.max);
            println!("BENCH e2b {name}_samples={}", s.count);
        }
    }
    println!("{}", result_line(&samples, api_only)?);
    Ok(ExitCode::SUCCESS)
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| ".".into(), Path::to_owned)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn read_key(path: &Path) -> Result<String> {
    let key = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key `up` keeps in {}", path.display()))?;
    Ok(key.trim().to_owned())
}

/// What `up`'s stdout reader thread sends.
enum Out {
    Line(String),
    Closed,
}

/// A running `wrenn up`; stopped with SIGINT (then killed if it does not stop) when dropped.
struct Up {
    child: Option<Child>,
    lines: Receiver<Out>,
}

impl Up {
    fn start(wrenn: &Path, vmm: &Path, data: &Path, api_port: u16, agent_port: u16) -> Result<Up> {
        let mut child = Command::new(wrenn)
            .arg("up")
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .args(["--agent-port", &agent_port.to_string()])
            .args(["--template-memory-mib", "256"])
            .env("WRENN_VMM", vmm)
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting wrenn up")?;
        let stdout = child.stdout.take().context("wrenn up has no stdout")?;
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || forward_lines(stdout, &send));
        Ok(Up {
            child: Some(child),
            lines,
        })
    }

    /// Waits for `up` to be ready; with `e2b`, returns the environment its `E2B SDKs:` line
    /// gives the SDKs.
    fn wait_ready(&mut self, e2b: bool) -> Result<Option<Vec<(String, String)>>> {
        let started = Instant::now();
        let mut up_at: Option<Instant> = None;
        loop {
            let deadline = match up_at {
                Some(at) => at + E2B_LINE_GRACE,
                None => started + UP_TIMEOUT,
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(wait) {
                Ok(Out::Line(line)) => {
                    if line.trim() == UP_MARKER {
                        if !e2b {
                            return Ok(None);
                        }
                        up_at = Some(Instant::now());
                    }
                    if e2b && let Some(env) = parse_e2b_line(&line) {
                        return Ok(Some(env?));
                    }
                }
                Ok(Out::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().map(Child::wait).transpose()?;
                    bail!("wrenn up ended before it was ready ({status:?}); its log is above");
                }
                Err(RecvTimeoutError::Timeout) if up_at.is_some() => bail!(
                    "wrenn up printed no `{E2B_MARKER}` line within {E2B_LINE_GRACE:?} of \
                     `{UP_MARKER}`: this Wrenn has no E2B surface (set {API_ONLY_ENV}=1 to \
                     measure its own API alone)"
                ),
                Err(RecvTimeoutError::Timeout) => {
                    bail!("wrenn up was not ready within {UP_TIMEOUT:?}")
                }
            }
        }
    }

    /// SIGINT, then waits for `up` to stop (it stops the host VM); killed after STOP_TIMEOUT.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            bail!("wrenn up had already exited");
        }
        eprintln!("==> stopping wrenn up (SIGINT)");
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        kill(pid, Signal::SIGINT).context("sending SIGINT to wrenn up")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(status.success(), "wrenn up stopped with {status}");
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("wrenn up did not stop within {STOP_TIMEOUT:?} of SIGINT; killed");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // Already gone (its failure was reported): only reap it.
        if let Some(child) = self.child.as_mut()
            && !matches!(child.try_wait(), Ok(None))
        {
            let _ = child.wait();
            return;
        }
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Passes `up`'s stdout to our stderr (our stdout is for BENCH lines) and to the channel.
fn forward_lines(stdout: ChildStdout, send: &mpsc::Sender<Out>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        eprintln!("{line}");
        // The receiver is gone once `up` is ready; keep draining so `up` never blocks.
        let _ = send.send(Out::Line(line));
    }
    let _ = send.send(Out::Closed);
}

/// `E2B SDKs: E2B_API_URL=http://H:P E2B_SANDBOX_URL=http://H:P E2B_API_KEY=e2b_...` as
/// variables; `None` for any other line.
fn parse_e2b_line(line: &str) -> Option<Result<Vec<(String, String)>>> {
    let rest = line.trim().strip_prefix(E2B_MARKER)?;
    let parse = || {
        let env: Vec<(String, String)> = rest
            .split_whitespace()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .with_context(|| format!("{pair:?} in `up`'s E2B line is not NAME=VALUE"))
            })
            .collect::<Result<_>>()?;
        for name in ["E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"] {
            ensure!(
                env.iter().any(|(k, v)| k == name && !v.is_empty()),
                "`up`'s E2B line has no {name}: {line:?}"
            );
        }
        Ok(env)
    };
    Some(parse())
}

/// Runs the script, its stderr passed through; its stdout, killed after `limit`.
fn run_script(mut command: Command, limit: Duration) -> Result<String> {
    let mut child = crate::bench_vmm::ChildGuard(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the Python bench script")?,
    );
    let mut stdout = child.0.stdout.take().context("the script has no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the Python bench script ran longer than {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the script's stdout reader panicked"))?
        .context("reading the script's stdout")?;
    ensure!(
        status.success(),
        "the Python bench script failed ({status}); its output is above"
    );
    Ok(text)
}

/// The script's JSON object: series name to samples in ms.
fn parse_samples(text: &str) -> Result<BTreeMap<String, Vec<f64>>> {
    let samples: BTreeMap<String, Vec<f64>> = serde_json::from_str(text.trim())
        .with_context(|| format!("the script printed no JSON object of samples: {text:?}"))?;
    ensure!(
        samples.values().all(|v| !v.is_empty()),
        "the script reported an empty series: {text}"
    );
    Ok(samples)
}

/// The RESULT line: medians, p99s and the SDK/API ratios.
fn result_line(samples: &BTreeMap<String, Vec<f64>>, api_only: bool) -> Result<String> {
    let stats = |key: &str| {
        samples
            .get(key)
            .and_then(|v| Stats::of(v))
            .with_context(|| format!("the script reported no samples of {key}"))
    };
    let api_create = stats(API_CREATE_RUN)?;
    let api_exec = stats(API_EXEC)?;
    if api_only {
        return Ok(format!(
            "RESULT e2b api_create_run_median={:.0}ms api_create_run_p99={:.0}ms \
             api_exec_median={:.1}ms (api only: no SDK samples)",
            api_create.median, api_create.p99, api_exec.median,
        ));
    }
    let sdk_create = stats(SDK_CREATE_RUN)?;
    let sdk_run = stats(SDK_RUN)?;
    Ok(format!(
        "RESULT e2b sdk_create_run_median={:.0}ms sdk_create_run_p99={:.0}ms \
         api_create_run_median={:.0}ms api_create_run_p99={:.0}ms create_run_ratio={:.2}x \
         sdk_run_median={:.1}ms api_exec_median={:.1}ms run_ratio={:.2}x",
        sdk_create.median,
        sdk_create.p99,
        api_create.median,
        api_create.p99,
        sdk_create.median / api_create.median,
        sdk_run.median,
        api_exec.median,
        sdk_run.median / api_exec.median,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_e2b_line_gives_the_three_variables() {
        let line = "E2B SDKs: E2B_API_URL=http://127.0.0.1:8080 \
                    E2B_SANDBOX_URL=http://127.0.0.1:8080 E2B_API_KEY=e2b_00ff";
        let env = parse_e2b_line(line).unwrap().unwrap();
        assert_eq!(
            env,
            [
                ("E2B_API_URL", "http://127.0.0.1:8080"),
                ("E2B_SANDBOX_URL", "http://127.0.0.1:8080"),
                ("E2B_API_KEY", "e2b_00ff"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert!(parse_e2b_line("  API key:  wrn_abc").is_none());
        assert!(
            parse_e2b_line("E2B SDKs: E2B_API_URL=http://x")
                .unwrap()
                .is_err()
        );
        assert!(parse_e2b_line("E2B SDKs: garbage").unwrap().is_err());
    }

    #[test]
    fn test_result_line_puts_ratios_beside_medians() {
        let samples = parse_samples(
            r#"{"sdk_create_run": [300, 100, 200], "api_create_run": [100, 50, 150],
                "sdk_run": [10, 12, 11], "api_exec": [5, 5, 6]}"#,
        )
        .unwrap();
        let line = result_line(&samples, false).unwrap();
        assert_eq!(
            line,
            "RESULT e2b sdk_create_run_median=200ms sdk_create_run_p99=300ms \
             api_create_run_median=100ms api_create_run_p99=150ms create_run_ratio=2.00x \
             sdk_run_median=11.0ms api_exec_median=5.0ms run_ratio=2.20x"
        );
        assert!(result_line(&samples, true).unwrap().contains("api only"));
    }

    #[test]
    fn test_samples_must_be_a_json_object_of_series() {
        assert!(parse_samples("Traceback (most recent call last):").is_err());
        assert!(parse_samples(r#"{"api_exec": []}"#).is_err());
        let only_api = parse_samples(r#"{"api_create_run": [1.5], "api_exec": [0.5]}"#).unwrap();
        assert!(result_line(&only_api, false).is_err());
        assert!(result_line(&only_api, true).is_ok());
    }
}
