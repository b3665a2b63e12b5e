//! `cargo xtask bench api`: the control plane's overhead, beside what it drives. Everything
//! measured is a release build of `wrenn` (`wrenn server`, `wrenn agent`) and `wrenn-vmm`, run
//! as the processes users run; this program is only the client.
//!
//! 1. On this machine (no VM): `GET /v1/sandboxes` requests per second, 8 clients at once for
//!    5 s, with 1000 sandboxes in the table, on SQLite and on PostgreSQL (Debian's server,
//!    started by `postgres::ensure`), the first page (100 rows) and the whole table
//!    (`limit=1000`).
//! 2. In one host VM run (one vCPU, like `bench agent`): `wrenn agent` registered with
//!    `wrenn server` (SQLite), a template of the test image with 1 vCPU and 256 MiB;
//!    api_create: `POST /v1/sandboxes` to its answer (running, envd ready), beside
//!    agent_create: the agent's own `CreateSandbox` (alternating, one warm-up each);
//!    api_exec: `POST /v1/sandboxes/{id}/exec` of `true`, beside envd_exec: the same command
//!    straight to envd in the guest.
//!
//! Targets: create through the API <= 1.2x the agent's; exec through the API <= 3x envd's.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use serde_json::json;
use wrenn_agent::envd::{EnvdClient, ExecSpec};
use wrenn_image::cache::Cache;
use wrenn_image::guest;
use wrenn_image::rootfs::{IMAGE_FILE, ImageKind};
use wrenn_proto::hostagent::v1::*;
use wrenn_server::db::sandboxes::SandboxRow;

use crate::bench_vmm::{Monitor, Samples, Stats, VMM_ENV};

const DEFAULT_RUNS: usize = 20;
const EXEC_RUNS: usize = 200;
const MEM_MIB: u32 = 256;
const LIST_ROWS: usize = 1000;
const LIST_CLIENTS: usize = 8;
const LIST_SECONDS: u64 = 5;
const JOIN_TOKEN: &str = "bench-join-token";
const HOSTVM_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// The release `wrenn` the inner run starts.
const WRENN_ENV: &str = "WRENN_BENCH_WRENN";

pub fn outer(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    let wrenn = crate::bench_vmm::build_release("wrenn-cli", "wrenn")?;
    let vmm = match std::env::var_os(VMM_ENV) {
        Some(path) => PathBuf::from(path),
        None => crate::bench_vmm::build_release("wrenn-vmm", "wrenn-vmm")?,
    };

    // 1. Lists, here.
    let postgres = crate::postgres::ensure()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}/bench.db", dir.path().display());
    let pg = rt.block_on(fresh_postgres_database(&postgres.url("127.0.0.1")))?;
    let mut lists = Vec::new();
    for (backend, url) in [("sqlite", sqlite.as_str()), ("postgres", pg.as_str())] {
        let key = rt.block_on(fill(url, LIST_ROWS))?;
        let port = free_port()?;
        let server = Process(
            Command::new(&wrenn)
                .args(["server", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--database-url", url])
                .arg("--data-dir")
                .arg(dir.path())
                .env("WRENN_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .context("starting wrenn server")?,
        );
        wait_port(port, Duration::from_secs(30))?;
        for (what, query) in [("page", ""), ("all", "?limit=1000")] {
            let url = format!("http://127.0.0.1:{port}/v1/sandboxes{query}");
            let rps = rt.block_on(list_throughput(&url, &key))?;
            println!("BENCH api list_{what}_{backend}_rps={rps:.0}");
            lists.push((format!("{what}_{backend}"), rps));
        }
        drop(server);
    }

    // 2. Creates and execs, in the host VM.
    guest::build(cache, &[], false).context("building the guest kernel and images")?;
    let samples = crate::bench_vmm::run_inner(
        cache,
        "api",
        runs,
        &[
            (VMM_ENV, crate::bench_vmm::path_string(&vmm)?.as_str()),
            (WRENN_ENV, crate::bench_vmm::path_string(&wrenn)?.as_str()),
        ],
        HOSTVM_TIMEOUT,
        Duration::from_secs(300),
    )?;
    report(&samples, &lists)?;
    Ok(ExitCode::SUCCESS)
}

fn report(samples: &Samples, lists: &[(String, f64)]) -> Result<()> {
    let stats = |key: &str| {
        samples
            .get(&(Monitor::Wrenn, key.to_owned()))
            .and_then(|v| Stats::of(v))
            .with_context(|| format!("the inner run reported no samples of {key}"))
    };
    for key in ["agent_create", "api_create", "envd_exec", "api_exec"] {
        let s = stats(key)?;
        println!("BENCH api {key}_median={:.2}ms", s.median);
        println!("BENCH api {key}_p99={:.2}ms", s.p99);
        println!("BENCH api {key}_samples={}", s.count);
    }
    let agent_create = stats("agent_create")?;
    let api_create = stats("api_create")?;
    let envd_exec = stats("envd_exec")?;
    let api_exec = stats("api_exec")?;
    let lists: Vec<String> = lists
        .iter()
        .map(|(name, rps)| format!("list_{name}={rps:.0}/s"))
        .collect();
    println!(
        "RESULT api create_median={:.0}ms create_p99={:.0}ms agent_create_median={:.0}ms create_ratio={:.2}x \
         exec_median={:.2}ms exec_p99={:.2}ms envd_exec_median={:.2}ms exec_ratio={:.2}x {}",
        api_create.median,
        api_create.p99,
        agent_create.median,
        api_create.median / agent_create.median,
        api_exec.median,
        api_exec.p99,
        envd_exec.median,
        api_exec.median / envd_exec.median,
        lists.join(" "),
    );
    Ok(())
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A new database on the PostgreSQL server `admin` names; its URL.
async fn fresh_postgres_database(admin: &str) -> Result<String> {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(admin).await?;
    let name = format!("wrenn_bench_{}", std::process::id());
    pool.execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
        .await?;
    pool.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    pool.close().await;
    let (base, _) = admin
        .rsplit_once('/')
        .context("the PostgreSQL URL has no database")?;
    Ok(format!("{base}/{name}"))
}

/// `rows` sandboxes and an API key in the database at `url` (made and migrated when new); the
/// key.
async fn fill(url: &str, rows: usize) -> Result<String> {
    let db = wrenn_server::Db::connect(url).await?;
    let now = wrenn_server::db::now_ms();
    for i in 0..rows {
        let n = i64::try_from(i)?;
        db.insert_sandbox(&SandboxRow {
            id: format!("bench-{i:05}"),
            template: "bench".into(),
            state: if i % 3 == 0 { "paused" } else { "running" }.into(),
            host_id: Some("bench-host".into()),
            vcpus: 1,
            memory_mib: 256,
            requested_vcpus: 0,
            requested_memory_mib: 0,
            timeout_seconds: 300,
            envd_access_token: format!("token-{i}"),
            metadata: [("n".to_owned(), i.to_string())].into(),
            created_at: now - n,
            updated_at: now - n,
            expires_at: Some(now + 300_000),
            error: None,
            on_timeout: "kill".into(),
            auto_resume: false,
        })
        .await?;
    }
    let key = wrenn_server::keys::create(&db, "bench").await?.key;
    db.close().await;
    Ok(key)
}

/// Requests per second of GET `url`, LIST_CLIENTS at once for LIST_SECONDS.
async fn list_throughput(url: &str, key: &str) -> Result<f64> {
    let http = reqwest::Client::new();
    // Warm-up, and a check that the page is what we think.
    let first: serde_json::Value = http
        .get(url)
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(
        first["sandboxes"].as_array().is_some_and(|a| !a.is_empty()),
        "the list came back empty: {first}"
    );
    let deadline = Instant::now() + Duration::from_secs(LIST_SECONDS);
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..LIST_CLIENTS {
        let (http, url, key) = (http.clone(), url.to_owned(), key.to_owned());
        clients.push(tokio::spawn(async move {
            let mut done = 0u32;
            while Instant::now() < deadline {
                let response = http.get(&url).bearer_auth(&key).send().await?;
                ensure!(response.status() == 200, "HTTP {}", response.status());
                response.bytes().await?;
                done += 1;
            }
            Ok::<u32, anyhow::Error>(done)
        }));
    }
    let mut total = 0u32;
    for client in clients {
        total += client.await??;
    }
    Ok(f64::from(total) / started.elapsed().as_secs_f64())
}

fn sample(metric: &str, value: f64) {
    println!("SAMPLE wrenn {metric} {value}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Inside the host VM: the measurements.
pub fn inner(runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    let path = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .with_context(|| format!("the outer run sets {var}"))
    };
    let (vmm, wrenn) = (path(VMM_ENV)?, path(WRENN_ENV)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(measure(&wrenn, &vmm, runs))?;
    Ok(ExitCode::SUCCESS)
}

async fn measure(wrenn: &Path, vmm: &Path, runs: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (api_port, agent_port) = (free_port()?, free_port()?);
    let api = format!("http://127.0.0.1:{api_port}");
    let agent_url = format!("http://127.0.0.1:{agent_port}");
    let database = format!("sqlite://{}/api.db", dir.path().display());
    let key = fill(&database, 0).await?;
    let _server = Process(
        Command::new(wrenn)
            .args(["server", "--listen", &format!("127.0.0.1:{api_port}")])
            .args(["--database-url", &database, "--join-token", JOIN_TOKEN])
            .args(["--reconcile-interval", "5s"])
            .arg("--data-dir")
            .arg(dir.path().join("server"))
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting wrenn server")?,
    );
    let _agent = Process(
        Command::new(wrenn)
            .args(["agent", "--listen", &format!("127.0.0.1:{agent_port}")])
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--vmm")
            .arg(vmm)
            .args(["--server", &api, "--join-token", JOIN_TOKEN])
            .args(["--host-id", "bench", "--advertise", &agent_url])
            .args(["--warm-slots", "2"])
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting wrenn agent")?,
    );
    wait_port(api_port, Duration::from_secs(60))?;
    wait_port(agent_port, Duration::from_secs(120))?;
    let client = HostAgentClient::new(
        HttpClient::plaintext(),
        ClientConfig::new(agent_url.parse()?),
    );
    let slow = || CallOptions::default().with_timeout(Duration::from_secs(600));
    let image = wrenn_image::rootfs::find(&Cache::from_env(), ImageKind::Test)?.file(IMAGE_FILE);
    client
        .build_template_with_options(
            BuildTemplateRequest {
                name: "bench".into(),
                image: image.display().to_string(),
                vcpus: 1,
                memory_mib: MEM_MIB,
                ..Default::default()
            },
            slow(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("building the template: {e}"))?;
    let http = reqwest::Client::new();
    // The server learns the template at its next reconciler pass.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = http
            .get(format!("{api}/v1/snapshots/bench"))
            .bearer_auth(&key)
            .send()
            .await?
            .status();
        if status == 200 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the server never learned the template (GET answered {status})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 1. Create through the API beside the agent's own.
    for round in 0..=runs {
        let id = format!("agent-{round}");
        let started = Instant::now();
        client
            .create_sandbox_with_options(
                CreateSandboxRequest {
                    sandbox_id: id.clone(),
                    template: "bench".into(),
                    ..Default::default()
                },
                slow(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("agent create: {e}"))?;
        let agent_took = started.elapsed();
        client
            .destroy_sandbox_with_options(
                DestroySandboxRequest {
                    sandbox_id: id,
                    ..Default::default()
                },
                slow(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("agent destroy: {e}"))?;

        let id = format!("api-{round}");
        let started = Instant::now();
        let created: serde_json::Value = http
            .post(format!("{api}/v1/sandboxes"))
            .bearer_auth(&key)
            .json(&json!({ "template": "bench", "id": id }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let api_took = started.elapsed();
        ensure!(created["state"] == "running", "created: {created}");
        http.delete(format!("{api}/v1/sandboxes/{id}"))
            .bearer_auth(&key)
            .send()
            .await?
            .error_for_status()?;
        if round > 0 {
            sample("agent_create", ms(agent_took));
            sample("api_create", ms(api_took));
        }
    }

    // 2. Exec through the API beside envd's own.
    let created: serde_json::Value = http
        .post(format!("{api}/v1/sandboxes"))
        .bearer_auth(&key)
        .json(&json!({ "template": "bench", "id": "exec" }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = created["envd_access_token"]
        .as_str()
        .context("no envd token")?
        .to_owned();
    let sandbox = client
        .get_sandbox(GetSandboxRequest {
            sandbox_id: "exec".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("get sandbox: {e}"))?
        .into_owned();
    let address = sandbox
        .sandbox
        .as_option()
        .map(|s| s.envd_address.clone())
        .context("the agent has no exec sandbox")?;
    let envd = EnvdClient::new(address.parse()?, Some(token));
    let spec = ExecSpec {
        cmd: "true".into(),
        ..Default::default()
    };
    for round in 0..=EXEC_RUNS {
        let started = Instant::now();
        let out: serde_json::Value = http
            .post(format!("{api}/v1/sandboxes/exec/exec"))
            .bearer_auth(&key)
            .json(&json!({ "cmd": "true" }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let api_took = started.elapsed();
        ensure!(out["exit_code"] == 0, "exec: {out}");
        let started = Instant::now();
        envd.exec(&spec, 1 << 20)
            .await
            .map_err(|e| anyhow::anyhow!("envd exec: {e}"))?;
        let envd_took = started.elapsed();
        if round > 0 {
            sample("api_exec", ms(api_took));
            sample("envd_exec", ms(envd_took));
        }
    }
    Ok(())
}
