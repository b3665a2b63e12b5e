//! schemathesis (PyPI, pinned in `tests/schemathesis/requirements.txt`) against a real server:
//! it reads the server's own `/openapi.yaml` and sends generated requests (the schema's
//! examples, its coverage cases, then random positive and negative data), and fails on any
//! 5xx, any status, content type or body the document does not declare, and any invalid
//! request the server accepts.
//!
//! The server runs on SQLite, on 127.0.0.1:0, with an API key (sent as
//! `Authorization: Bearer`) and one registered host that has no templates and no sandboxes
//! (its address is a closed port): every operation is answered by the server itself
//! (validation, 404s, 409s), and no request reaches an agent. The agent's own answers are
//! covered by `tests/agent.rs`. `tests/schemathesis/hooks.py` keeps the run from deleting
//! the key and the host it depends on.
//!
//! schemathesis lives in a venv in the cache (`$WRENN_CACHE_DIR/schemathesis-<version>`, else
//! `/var/cache/wrenn/...`), built on first use under a file lock, with the Debian packages it
//! needs installed by `wrenn_image::packages::ensure`. Its output is printed (libtest shows it
//! when the test fails, or always with `--nocapture`).
//!
//! `WRENN_SCHEMATHESIS_SEED` replays a run (schemathesis prints its seed);
//! `WRENN_SCHEMATHESIS_ARGS` adds options to `st run` (e.g. `--report har --report-dir DIR`).

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use support::{Kind, TestServer};

/// The version the requirements file pins (the venv's directory name).
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// A run longer than this is killed; a normal one takes well under a minute.
const RUN_TIMEOUT_SECS: u32 = 150;
/// The run's own budget (seconds): fuzzing stops when it is spent.
const MAX_TIME_SECS: u32 = 60;
/// The host the test registers.
const HOST_ID: &str = "host-st";
/// Test cases per operation and phase.
const MAX_EXAMPLES: u32 = 40;

fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis")
}

/// The venv's `st`, built once per cache.
fn schemathesis() -> PathBuf {
    let cache = wrenn_image::cache::Cache::from_env();
    let requirements = harness_dir().join("requirements.txt");
    wrenn_image::venv::ensure(
        &cache,
        &format!("schemathesis-{SCHEMATHESIS_VERSION}"),
        &requirements,
    )
    .unwrap_or_else(|e| panic!("the schemathesis venv: {e}"))
    .join("bin/st")
}

/// `st run` against the server at `base` with `key`; panics (after printing its output) when
/// schemathesis reports a failure.
fn run_schemathesis(base: &str, key: &str, key_id: &str, host_id: &str) {
    let st = schemathesis();
    let scratch = tempfile::tempdir().unwrap();
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=10", &RUN_TIMEOUT_SECS.to_string()])
        .arg(&st)
        .arg("--config-file")
        .arg(harness_dir().join("schemathesis.toml"))
        .args(["run", &format!("{base}/openapi.yaml")])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", &MAX_EXAMPLES.to_string()])
        .args(["--max-time", &MAX_TIME_SECS.to_string()])
        // One worker: schemathesis's threads hit a CPython 3.11 race in `ast.parse`
        // ("AST constructor recursion depth mismatch") that fails the run at random.
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(scratch.path())
        .stdin(Stdio::null())
        .env("SCHEMATHESIS_HOOKS", harness_dir().join("hooks.py"))
        .env("WRENN_SCHEMATHESIS_KEY_ID", key_id)
        .env("WRENN_SCHEMATHESIS_HOST_ID", host_id)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("COLUMNS", "120");
    if let Ok(seed) = std::env::var("WRENN_SCHEMATHESIS_SEED")
        && !seed.is_empty()
    {
        command.args(["--seed", &seed]);
    }
    // More options for a person looking into a failure (e.g. `--report har --report-dir /tmp/st`).
    if let Ok(extra) = std::env::var("WRENN_SCHEMATHESIS_ARGS") {
        command.args(extra.split_whitespace());
    }
    // Nothing may send the requests through a proxy.
    for var in [
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
    let out = command.output().expect("running schemathesis");
    println!(
        "---- schemathesis ({:.1}s, {})",
        started.elapsed().as_secs_f64(),
        out.status
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "schemathesis found problems ({}); its report is above",
        out.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    // The host stays ready for the whole run without more heartbeats.
    let t = TestServer::start_with(Kind::Sqlite, |config| {
        config.host_grace = std::time::Duration::from_secs(3600);
    })
    .await;
    let beat = t.heartbeat(HOST_ID, 8, 16384).await;
    assert_eq!(beat.status, 200, "{}", beat.text());
    let base = format!("http://{}", t.addr);
    let key = t.key.clone();
    let keys = t.call("GET", "/v1/api-keys", None).await.json();
    let key_id = keys["api_keys"][0]["id"].as_str().unwrap().to_owned();
    tokio::task::spawn_blocking(move || run_schemathesis(&base, &key, &key_id, HOST_ID))
        .await
        .unwrap();
    // The server survived all of it, and the run's key was in use to the end.
    let health = t.raw("GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "{}", health.text());
    let hosts = t.call("GET", "/v1/hosts", None).await;
    assert_eq!(hosts.status, 200, "{}", hosts.text());
    assert_eq!(hosts.json()["hosts"][0]["id"], HOST_ID, "{}", hosts.text());
    t.stop().await;
}
