//! `cargo xtask bench agent`: the host agent's sandbox operations, in one host VM run.
//!
//! The outer process builds wrenn-vmm in release mode and makes sure the guest kernel and test
//! image exist, then re-runs itself with `--inner` inside the host VM (one vCPU, so its clock
//! is the TSC). The inner process starts an agent in-process (its Connect server on loopback,
//! driven through the generated client, as the control plane drives it), builds a template of
//! the test image with 1 vCPU and 256 MiB, and prints `SAMPLE wrenn <metric> <value>` lines:
//!
//! 1. raw_restore: what a create cannot do without: a fresh `wrenn-vmm` on a ready slot,
//!    `snapshot/load` of the template with the agent's page server, until envd answers /health
//!    (the agent's own modules, none of its bookkeeping); create: `CreateSandbox` to its answer
//!    (envd ready and given its token and env). Alternating, one unmeasured warm-up each.
//! 2. exec: `Exec` of `true` through the agent; envd_exec: the same straight to envd.
//! 3. pause: `PauseSandbox` after the guest dirtied 16 MiB of tmpfs; pause_written: the bytes
//!    the pause wrote; pause_dirtied: the memory and disk blocks its build holds (what the VMM
//!    found dirty), so written/dirtied is the format's overhead.
//! 4. resume: `ResumeSandbox` to its answer (envd ready, clock set).
//! 5. parallel_creates_per_s: 8 `CreateSandbox` calls at once.
//! 6. idle_rss: with 8 idle sandboxes from the template running, each VMM's resident memory
//!    (kB, `/proc/PID/smaps_rollup`), against the template's 256 MiB.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use wrenn_agent::envd::{EnvdClient, ExecSpec};
use wrenn_agent::manager::{AgentConfig, Manager};
use wrenn_agent::network::SlotPool;
use wrenn_agent::pages::Pages;
use wrenn_agent::rpc::ImageResolver;
use wrenn_agent::vmm::{MemorySource, RestoreSpec, Vmm, VmmConfig};
use wrenn_image::cache::Cache;
use wrenn_image::guest;
use wrenn_image::rootfs::{IMAGE_FILE, ImageKind};
use wrenn_proto::hostagent::v1::*;

use crate::bench_vmm::{Monitor, Samples, Stats, VMM_ENV};

const DEFAULT_RUNS: usize = 20;
const MEM_MIB: u32 = 256;
const PARALLEL: usize = 8;
const IDLE: usize = 8;
const DIRTY_MIB: u32 = 16;
const HOSTVM_TIMEOUT: Duration = Duration::from_secs(40 * 60);

pub fn outer(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    guest::build(cache, &[], false).context("building the guest kernel and images")?;
    let vmm = match std::env::var_os(VMM_ENV) {
        Some(path) => PathBuf::from(path),
        None => crate::bench_vmm::build_release("wrenn-vmm", "wrenn-vmm")?,
    };
    println!("# wrenn-vmm: {}", vmm.display());
    let vmm_path = crate::bench_vmm::path_string(&vmm)?;
    let samples = crate::bench_vmm::run_inner(
        cache,
        "agent",
        runs,
        &[(VMM_ENV, vmm_path.as_str())],
        HOSTVM_TIMEOUT,
        Duration::from_secs(300),
    )?;
    report(&samples)?;
    Ok(ExitCode::SUCCESS)
}

fn report(samples: &Samples) -> Result<()> {
    let stats = |key: &str| {
        samples
            .get(&(Monitor::Wrenn, key.to_owned()))
            .and_then(|v| Stats::of(v))
            .with_context(|| format!("the inner run reported no samples of {key}"))
    };
    for (key, unit) in [
        ("raw_restore", "ms"),
        ("create", "ms"),
        ("exec", "ms"),
        ("envd_exec", "ms"),
        ("pause", "ms"),
        ("pause_written", "MiB"),
        ("pause_dirtied", "MiB"),
        ("resume", "ms"),
        ("parallel_creates_per_s", "/s"),
        ("idle_rss", "MiB"),
    ] {
        let s = stats(key)?;
        println!("BENCH agent {key}_median={:.2}{unit}", s.median);
        println!("BENCH agent {key}_p99={:.2}{unit}", s.p99);
        println!("BENCH agent {key}_samples={}", s.count);
    }
    let raw = stats("raw_restore")?;
    let create = stats("create")?;
    let exec = stats("exec")?;
    let envd_exec = stats("envd_exec")?;
    let written = stats("pause_written")?;
    let dirtied = stats("pause_dirtied")?;
    let rss = stats("idle_rss")?;
    let create_ratio = create.median / raw.median;
    let write_ratio = written.median / dirtied.median.max(f64::MIN_POSITIVE);
    let rss_ratio = rss.median / f64::from(MEM_MIB);
    println!(
        "RESULT agent create_median={:.0}ms create_p99={:.0}ms raw_restore_median={:.0}ms create_ratio={:.2}x \
         pause_median={:.0}ms pause_written={:.1}MiB pause_dirtied={:.1}MiB pause_write_ratio={:.2}x \
         resume_median={:.0}ms exec_median={:.2}ms exec_p99={:.2}ms envd_exec_median={:.2}ms \
         creates_per_s={:.2} idle_rss={:.1}MiB rss_ratio={:.3}x",
        create.median,
        create.p99,
        raw.median,
        create_ratio,
        stats("pause")?.median,
        written.median,
        dirtied.median,
        write_ratio,
        stats("resume")?.median,
        exec.median,
        exec.p99,
        envd_exec.median,
        stats("parallel_creates_per_s")?.median,
        rss.median,
        rss_ratio,
    );
    Ok(())
}

fn sample(metric: &str, value: f64) {
    println!("SAMPLE wrenn {metric} {value}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug)]
struct CacheImages;

impl ImageResolver for CacheImages {
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

type Client = HostAgentClient<HttpClient>;

fn call() -> CallOptions {
    CallOptions::default().with_timeout(Duration::from_secs(600))
}

async fn measure(vmm: PathBuf, runs: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = AgentConfig::new(dir.path().join("data"), dir.path().join("run"), vmm);
    // Enough warm slots for the parallel creates.
    config.slots.warm = 10;
    let manager = Manager::start(config.clone())
        .await
        .map_err(|e| anyhow::anyhow!("starting the agent: {e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = wrenn_agent::server::app(manager.clone(), Arc::new(CacheImages));
    tokio::spawn(wrenn_agent::server::serve(
        listener,
        app,
        std::future::pending(),
    ));
    let client = Client::new(
        HttpClient::plaintext(),
        ClientConfig::new(format!("http://{addr}").parse()?),
    );
    let built = client
        .build_template_with_options(
            BuildTemplateRequest {
                name: "bench".into(),
                image: "test".into(),
                vcpus: 1,
                memory_mib: MEM_MIB,
                ..Default::default()
            },
            call(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("building the template: {e}"))?
        .into_owned();
    let template = built.snapshot.as_option().cloned().unwrap_or_default();
    println!(
        "# template: build {}, boot {} ms, {} prefetch pages",
        template.build_id, built.boot_ms, built.prefetch_pages
    );

    // 1. create against the raw restore.
    // A pool of its own (name and range): the agent's pool would take its slots as leftovers.
    let slots = SlotPool::new(wrenn_agent::network::SlotPoolConfig {
        base: std::net::Ipv4Addr::new(10, 12, 0, 0),
        name: "benchraw".into(),
        ..config.slots.clone()
    })
    .await
    .map_err(|e| anyhow::anyhow!("a slot pool for the raw restores: {e}"))?;
    let store = config.data_dir.join("store");
    let pages = Pages::new(&store);
    for round in 0..=runs {
        let raw = raw_restore(&config, &slots, &pages, &store, &template.build_id, round).await?;
        let id = format!("bench-{round}");
        let started = Instant::now();
        create(&client, &id).await?;
        let took = started.elapsed();
        destroy(&client, &id).await?;
        if round > 0 {
            sample("raw_restore", ms(raw));
            sample("create", ms(took));
        }
    }

    // 2. exec through the agent and straight to envd.
    let id = "bench-exec";
    let sandbox = create(&client, id).await?;
    let envd = EnvdClient::new(
        sandbox.envd_address.parse()?,
        Some(sandbox.envd_access_token.clone()),
    );
    let spec = ExecSpec {
        cmd: "true".into(),
        ..ExecSpec::default()
    };
    for round in 0..=(runs * 5) {
        let started = Instant::now();
        let out = client
            .exec(ExecRequest {
                sandbox_id: id.into(),
                cmd: "true".into(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("exec: {e}"))?
            .into_owned();
        let through_agent = started.elapsed();
        ensure!(out.exit_code == 0, "`true` exited with {}", out.exit_code);
        let started = Instant::now();
        envd.exec(&spec, 1024).await?;
        let direct = started.elapsed();
        if round > 0 {
            sample("exec", ms(through_agent));
            sample("envd_exec", ms(direct));
        }
    }

    // 3 and 4. pause after dirtying, then resume.
    for round in 0..runs.min(5) {
        let script = format!(
            "dd if=/dev/urandom of=/dev/shm/dirty-{round} bs=1M count={DIRTY_MIB} 2>/dev/null; sync"
        );
        let out = client
            .exec_with_options(
                ExecRequest {
                    sandbox_id: id.into(),
                    cmd: "/bin/sh".into(),
                    args: vec!["-c".into(), script],
                    ..Default::default()
                },
                call(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("dirtying memory: {e}"))?
            .into_owned();
        ensure!(
            out.exit_code == 0,
            "dd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let started = Instant::now();
        let paused = client
            .pause_sandbox_with_options(
                PauseSandboxRequest {
                    sandbox_id: id.into(),
                    ..Default::default()
                },
                call(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("pause: {e}"))?
            .into_owned();
        sample("pause", ms(started.elapsed()));
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        sample("pause_written", mib(paused.bytes_written));
        let record = manager.get(id).map_err(|e| anyhow::anyhow!("{e}"))?;
        sample(
            "pause_dirtied",
            mib(dirtied_bytes(&store, &record.build_id)?),
        );
        let started = Instant::now();
        client
            .resume_sandbox_with_options(
                ResumeSandboxRequest {
                    sandbox_id: id.into(),
                    ..Default::default()
                },
                call(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("resume: {e}"))?;
        sample("resume", ms(started.elapsed()));
    }
    destroy(&client, id).await?;

    // 5. parallel creates.
    for round in 0..runs.min(3) {
        let started = Instant::now();
        let mut calls = Vec::new();
        for k in 0..PARALLEL {
            let client = client.clone();
            let id = format!("par-{round}-{k}");
            calls.push(tokio::spawn(async move { create(&client, &id).await }));
        }
        for call in calls {
            call.await??;
        }
        sample(
            "parallel_creates_per_s",
            PARALLEL as f64 / started.elapsed().as_secs_f64(),
        );
        for k in 0..PARALLEL {
            destroy(&client, &format!("par-{round}-{k}")).await?;
        }
    }

    // 6. idle sandboxes' resident memory.
    for k in 0..IDLE {
        create(&client, &format!("idle-{k}")).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for k in 0..IDLE {
        let record = manager
            .get(&format!("idle-{k}"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let pid = record.vmm_pid.context("an idle sandbox without a VMM")?;
        sample("idle_rss", rss_kib(pid)? as f64 / 1024.0);
    }
    for k in 0..IDLE {
        destroy(&client, &format!("idle-{k}")).await?;
    }
    manager.shutdown(true).await;
    slots
        .destroy_all()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

async fn create(client: &Client, id: &str) -> Result<Sandbox> {
    let response = client
        .create_sandbox_with_options(
            CreateSandboxRequest {
                sandbox_id: id.into(),
                template: "bench".into(),
                ..Default::default()
            },
            call(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("create {id}: {e}"))?
        .into_owned();
    response
        .sandbox
        .as_option()
        .cloned()
        .context("a create without a sandbox")
}

async fn destroy(client: &Client, id: &str) -> Result<()> {
    client
        .destroy_sandbox_with_options(
            DestroySandboxRequest {
                sandbox_id: id.into(),
                ..Default::default()
            },
            call(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("destroy {id}: {e}"))?;
    Ok(())
}

/// A restore with the agent's parts only: VMM, slot, page server, envd's /health.
async fn raw_restore(
    config: &AgentConfig,
    slots: &SlotPool,
    pages: &Pages,
    store: &std::path::Path,
    build: &str,
    round: usize,
) -> Result<Duration> {
    let id = format!("raw-{round}");
    let run_dir = config.run_dir.join(&id);
    std::fs::create_dir_all(&run_dir)?;
    let slot = slots.acquire().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let socket = run_dir.join("uffd.sock");
    let mut handle = pages
        .serve(&id, &socket, build.parse()?, false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut vmm = Vmm::spawn(VmmConfig {
        binary: config.vmm_binary.clone(),
        sandbox_id: id.clone(),
        run_dir: run_dir.clone(),
        netns: Some(slot.netns_path()),
        keep: vec![store.to_owned(), run_dir.clone()],
        page_server_grace: None,
    })
    .await?;
    vmm.restore(&RestoreSpec {
        store: store.to_owned(),
        build_id: build.to_owned(),
        memory: MemorySource::Uffd(socket),
        taps: vec![("eth0".into(), slot.tap_name().to_owned())],
        drives: vec![("rootfs".into(), run_dir.join("rootfs.overlay"))],
        resume: true,
        track_dirty_pages: true,
        console: None,
    })
    .await?;
    EnvdClient::new(slot.envd_address(), None)
        .wait_healthy(Duration::from_secs(60))
        .await?;
    let took = started.elapsed();
    vmm.stop(Duration::from_secs(2)).await?;
    tokio::task::spawn_blocking(move || handle.stop()).await?;
    slots.release(slot).await;
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(took)
}

/// Bytes of memory and disk blocks stored in `build` itself (what its pause found dirty).
fn dirtied_bytes(store: &std::path::Path, build: &str) -> Result<u64> {
    let id: wrenn_snapshot::id::BuildId = build.parse()?;
    let mut total = 0;
    for entry in std::fs::read_dir(store.join(build))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "header") {
            let header = wrenn_snapshot::header::Header::read(&path)?;
            let summary = header.summary();
            total += summary
                .builds
                .iter()
                .filter(|b| b.id == id)
                .map(|b| b.bytes)
                .sum::<u64>();
        }
    }
    Ok(total)
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let values: BTreeMap<&str, u64> = text
        .lines()
        .filter_map(|l| {
            let (key, rest) = l.split_once(':')?;
            Some((key, rest.trim().trim_end_matches(" kB").parse().ok()?))
        })
        .collect();
    match values.get("Rss") {
        Some(kib) => Ok(*kib),
        None => bail!("no Rss in /proc/{pid}/smaps_rollup"),
    }
}
