//! `cargo xtask bench api`: the control plane's overhead, beside what it drives.
//!
//! 1. On this machine (no VM): `GET /v1/sandboxes` requests per second, 8 clients at once for
//!    a few seconds, with 1000 sandboxes in the table, on SQLite and on PostgreSQL (Debian's
//!    server, started by `postgres::ensure`), one database each, first page (100 rows) and the
//!    whole table (`limit=1000`).
//! 2. In one host VM run (one vCPU, like `bench agent`): an agent and the control plane
//!    in-process on SQLite, a template of the test image with 1 vCPU and 256 MiB;
//!    api_create: `POST /v1/sandboxes` to its answer (running, envd ready), beside
//!    agent_create: the agent's own `CreateSandbox` (alternating, one warm-up each);
//!    api_exec: `POST /v1/sandboxes/{id}/exec` of `true`, beside envd_exec: the same command
//!    straight to envd in the guest.
//!
//! Targets: create through the API <= 1.2x the agent's; exec through the API <= 3x envd's.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use serde_json::json;
use wrenn_agent::envd::{EnvdClient, ExecSpec};
use wrenn_agent::manager::{AgentConfig, BuildRequest, Manager};
use wrenn_agent::rpc::ImageResolver;
use wrenn_image::cache::Cache;
use wrenn_image::guest;
use wrenn_image::rootfs::{IMAGE_FILE, ImageKind};
use wrenn_proto::hostagent::v1::*;
use wrenn_server::db::sandboxes::SandboxRow;
use wrenn_server::{Server, ServerConfig};

use crate::bench_vmm::{Monitor, Samples, Stats, VMM_ENV};

const DEFAULT_RUNS: usize = 20;
const EXEC_RUNS: usize = 200;
const MEM_MIB: u32 = 256;
const LIST_ROWS: usize = 1000;
const LIST_CLIENTS: usize = 8;
const LIST_SECONDS: u64 = 5;
const JOIN_TOKEN: &str = "bench-join-token";
const HOSTVM_TIMEOUT: Duration = Duration::from_secs(40 * 60);

pub fn outer(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");

    // 1. Lists, here.
    let postgres = crate::postgres::ensure()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}/bench.db", dir.path().display());
    let pg = rt.block_on(fresh_postgres_database(&postgres.url("127.0.0.1")))?;
    let mut list_results = Vec::new();
    for (backend, url) in [("sqlite", sqlite.as_str()), ("postgres", pg.as_str())] {
        for (what, query) in [("page", ""), ("all", "?limit=1000")] {
            let rps = rt.block_on(list_throughput(url, query))?;
            println!("BENCH api list_{what}_{backend}_rps={rps:.0}");
            list_results.push((format!("{what}_{backend}"), rps));
        }
    }

    // 2. Creates and execs, in the host VM.
    guest::build(cache, &[], false).context("building the guest kernel and images")?;
    let vmm = match std::env::var_os(VMM_ENV) {
        Some(path) => PathBuf::from(path),
        None => crate::bench_vmm::build_release("wrenn-vmm", "wrenn-vmm")?,
    };
    let vmm_path = crate::bench_vmm::path_string(&vmm)?;
    let samples = crate::bench_vmm::run_inner(
        cache,
        "api",
        runs,
        &[(VMM_ENV, vmm_path.as_str())],
        HOSTVM_TIMEOUT,
        Duration::from_secs(300),
    )?;
    report(&samples, &list_results)?;
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

/// Requests per second of `GET /v1/sandboxes{query}` with LIST_ROWS rows on `database_url`.
async fn list_throughput(database_url: &str, query: &str) -> Result<f64> {
    let server = Server::start(ServerConfig::new(database_url)).await?;
    let db = server.db();
    if db
        .list_sandboxes(&wrenn_server::db::sandboxes::ListFilter {
            limit: 1,
            ..Default::default()
        })
        .await?
        .sandboxes
        .is_empty()
    {
        let now = wrenn_server::db::now_ms();
        for i in 0..LIST_ROWS {
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
            })
            .await?;
        }
    }
    let key = wrenn_server::keys::create(db, "bench").await?.key;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/sandboxes{query}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(wrenn_server::serve(listener, server.router(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    // Warm-up, and a check that the page is what we think.
    let first: serde_json::Value = http
        .get(&url)
        .bearer_auth(&key)
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
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        clients.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                let response = http.get(&url).bearer_auth(&key).send().await?;
                ensure!(response.status() == 200, "HTTP {}", response.status());
                response.bytes().await?;
                done += 1;
            }
            Ok::<u64, anyhow::Error>(done)
        }));
    }
    let mut total = 0u64;
    for client in clients {
        total += client.await??;
    }
    let rps = total as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = serving.await;
    server.stop().await;
    Ok(rps)
}

fn sample(metric: &str, value: f64) {
    println!("SAMPLE wrenn {metric} {value}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug)]
struct TestImage;

impl ImageResolver for TestImage {
    fn image(&self, _name: &str) -> Result<PathBuf, String> {
        wrenn_image::rootfs::find(&Cache::from_env(), ImageKind::Test)
            .map(|e| e.file(IMAGE_FILE))
            .map_err(|e| e.to_string())
    }

    fn kernel(&self) -> Result<PathBuf, String> {
        wrenn_image::kernel::find(&Cache::from_env())
            .map(|e| e.file("vmlinux"))
            .map_err(|e| e.to_string())
    }
}

/// Inside the host VM: the measurements.
pub fn inner(runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    let vmm = std::env::var_os(VMM_ENV)
        .map(PathBuf::from)
        .context("the outer run names the wrenn-vmm to measure")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(measure(vmm, runs))?;
    Ok(ExitCode::SUCCESS)
}

async fn measure(vmm: PathBuf, runs: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = AgentConfig::new(dir.path().join("agent"), dir.path().join("run"), vmm);
    config.slots.warm = 2;
    let manager = Manager::start(config)
        .await
        .map_err(|e| anyhow::anyhow!("starting the agent: {e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent_url = format!("http://{}", listener.local_addr()?);
    let app = wrenn_agent::server::app(manager.clone(), Arc::new(TestImage));
    tokio::spawn(wrenn_agent::server::serve(
        listener,
        app,
        std::future::pending(),
    ));
    manager
        .build_template(BuildRequest {
            name: "bench".into(),
            image: TestImage.image("test").map_err(anyhow::Error::msg)?,
            kernel: TestImage.kernel().map_err(anyhow::Error::msg)?,
            vcpus: 1,
            memory_mib: MEM_MIB,
            replace: false,
        })
        .await
        .map_err(|e| anyhow::anyhow!("building the template: {e}"))?;

    let mut server_config = ServerConfig::new(format!("sqlite://{}/api.db", dir.path().display()));
    server_config.join_token = JOIN_TOKEN.into();
    server_config.reconcile_interval = Duration::from_secs(3600);
    let server = Server::start(server_config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", listener.local_addr()?);
    tokio::spawn(wrenn_server::serve(
        listener,
        server.router(),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    http.post(format!("{api}/v1/hosts/heartbeat"))
        .bearer_auth(JOIN_TOKEN)
        .json(&json!({
            "id": "bench", "address": agent_url, "version": "bench",
            "vcpus_total": 64, "memory_mib_total": 65536, "vcpus_used": 0,
            "memory_mib_used": 0, "sandboxes_running": 0, "storage": null,
        }))
        .send()
        .await?
        .error_for_status()?;
    server.reconcile_once().await;
    let key = wrenn_server::keys::create(server.db(), "bench").await?.key;

    let client = HostAgentClient::new(
        HttpClient::plaintext(),
        ClientConfig::new(agent_url.parse()?),
    );
    let slow = || CallOptions::default().with_timeout(Duration::from_secs(600));

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

        let started = Instant::now();
        let created: serde_json::Value = http
            .post(format!("{api}/v1/sandboxes"))
            .bearer_auth(&key)
            .json(&json!({ "template": "bench", "id": format!("api-{round}") }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let api_took = started.elapsed();
        ensure!(created["state"] == "running", "created: {created}");
        http.delete(format!("{api}/v1/sandboxes/api-{round}"))
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
    let address = manager
        .get("exec")
        .ok()
        .and_then(|r| r.host_address)
        .context("the exec sandbox has no address")?;
    let envd = EnvdClient::new(format!("{address}:49983").parse()?, Some(token));
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
