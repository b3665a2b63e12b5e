//! `wrenn up`: Wrenn on this machine, in one command.
//!
//! 1. The guest: the static envd, the kernel and the images (built once, then reused from the
//!    cache), and `wrenn-vmm` next to this binary.
//! 2. The control plane in this process: SQLite in the data directory, the REST API on
//!    `--listen`, a join token kept in the data directory.
//! 3. The host agent as a `wrenn agent` process: here when this machine's KVM runs Linux
//!    guests, otherwise inside the host VM, with its port forwarded to this machine's loopback
//!    and the control plane reached at the host's address from inside. It registers with the
//!    control plane by heartbeat.
//! 4. The `base` template, built through the agent unless it exists, with a progress line.
//! 5. An API key (made once, kept in the data directory) and a first command to try.
//!
//! Ctrl-C (or SIGTERM) stops the agent and the control plane; with `--check` everything is
//! started, a sandbox is created, runs `echo`, is destroyed, and `up` exits.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use wrenn_hostvm::{CommandSpec, HostVmNetwork, Placement, RunOptions};
use wrenn_image::cache::Cache;
use wrenn_image::guest;
use wrenn_image::progress::Step;
use wrenn_proto::hostagent::v1::{
    BuildTemplateRequest, HealthRequest, HostAgentClient, ListSnapshotsRequest,
};
use wrenn_server::keys::KeyShape;
use wrenn_server::{Server, ServerConfig};

/// The template `up` makes sure of.
const TEMPLATE: &str = "base";
/// The host id the local agent registers as.
const HOST_ID: &str = "local";
/// How long the agent (and the host VM under it) may take to answer.
const AGENT_START: Duration = Duration::from_secs(300);
/// Building the template boots the image in a VM, which is slow in the host VM.
const TEMPLATE_BUILD: Duration = Duration::from_secs(900);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the REST API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The agent's port on this machine's loopback (forwarded into the host VM when there is one).
    #[arg(long, default_value_t = 5008)]
    agent_port: u16,
    /// Wrenn's files: `server/` (SQLite database, join token, API key) and `agent/` (templates,
    /// snapshots, sandboxes).
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
    data_dir: PathBuf,
    /// vCPUs of the base template (sandboxes from it have as many).
    #[arg(long, default_value_t = 1)]
    template_vcpus: u32,
    /// Memory of the base template, in MiB.
    #[arg(long, default_value_t = 512)]
    template_memory_mib: u32,
    /// Memory of the host VM, in MiB, where one is needed (sandboxes live in it).
    #[arg(long, default_value_t = 8192)]
    hostvm_memory_mib: u32,
    /// Start everything, create a sandbox and run a command in it, then stop.
    #[arg(long)]
    check: bool,
}

/// How the agent runs: a child process here, or a command inside the host VM.
enum AgentProcess {
    Child(std::process::Child),
    HostVm(std::thread::JoinHandle<Result<i32>>),
}

impl AgentProcess {
    /// An error when the agent has already exited.
    fn check_alive(&mut self) -> Result<()> {
        match self {
            AgentProcess::Child(child) => match child.try_wait()? {
                Some(status) => bail!("the agent exited ({status}); its log is above"),
                None => Ok(()),
            },
            AgentProcess::HostVm(thread) if thread.is_finished() => {
                bail!("the host VM running the agent exited; its log is above")
            }
            AgentProcess::HostVm(_) => Ok(()),
        }
    }

    /// Stops the agent: SIGTERM to a child (its sandboxes stop with the host when they run in
    /// the host VM, which ends with this process).
    fn stop(self) {
        if let AgentProcess::Child(mut child) = self {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = child.wait();
        }
    }
}

pub fn run(cache: &Cache, args: Args) -> Result<ExitCode> {
    let envd = wrenn_image::envd::ensure().context("building the static envd")?;
    let built = guest::build_with(cache, &[], false, Some(&envd)).context("building the guest")?;
    print!("{}", built.summary());
    let vmm = ensure_vmm()?;
    let decision = wrenn_hostvm::decide()?;
    let server_dir = args.data_dir.join("server");
    let agent_dir = args.data_dir.join("agent");
    std::fs::create_dir_all(&agent_dir)
        .with_context(|| format!("creating {}", agent_dir.display()))?;
    let mut config = ServerConfig::new(crate::server::sqlite_in(&server_dir)?);
    config.listen = args.listen;
    config.join_token = crate::server::join_token_in(&server_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("listening on {} (another Wrenn running?)", args.listen))?;
    let server = runtime.block_on(Server::start(config.clone()))?;
    let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(wrenn_server::serve(listener, server.router(), async {
        let _ = stopped.await;
    }));

    let base_image = stage_base_image(&built, &agent_dir)?;
    let mut agent = start_agent(cache, &args, &decision.placement, &vmm, &agent_dir, &config)?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            ready = bring_up(&server, &args, &base_image, &mut agent) => ready,
            () = crate::server::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    let code = match outcome {
        Ok(keys) => {
            print_welcome(&args, &keys);
            if args.check {
                runtime.block_on(check(&args, &keys.wrenn))?;
                ExitCode::SUCCESS
            } else {
                runtime.block_on(async {
                    tokio::select! {
                        () = crate::server::shutdown_signal() => {}
                        () = watch_agent(&mut agent) => {}
                    }
                });
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    eprintln!("==> stopping Wrenn");
    agent.stop();
    let _ = stop_serving.send(());
    runtime.block_on(async {
        let _ = serving.await;
        server.stop().await;
    });
    Ok(code)
}

/// Waits until the agent exits.
async fn watch_agent(agent: &mut AgentProcess) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(e) = agent.check_alive() {
            eprintln!("error: {e:#}");
            return;
        }
    }
}

/// `wrenn-vmm` for the agent: `WRENN_VMM`, next to this binary, or built there from the
/// workspace this binary was built in.
fn ensure_vmm() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WRENN_VMM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("this binary has no directory")?;
    let sibling = dir.join("wrenn-vmm");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if workspace.join("crates/vmm/Cargo.toml").is_file() {
        // Keep it as fresh as this binary: cargo answers quickly when nothing changed.
        let profile = if dir.ends_with("release") {
            "release"
        } else {
            "dev"
        };
        let target_dir = dir
            .parent()
            .context("this binary is not in a target directory")?;
        let step = Step::start("building wrenn-vmm");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--profile",
                profile,
                "-p",
                "wrenn-vmm",
                "--bin",
                "wrenn-vmm",
            ])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(&workspace)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("building wrenn-vmm failed ({status})");
        }
        step.finish(&sibling.display().to_string());
    }
    if !sibling.is_file() {
        bail!(
            "no wrenn-vmm next to {} (set WRENN_VMM to its path)",
            exe.display()
        );
    }
    Ok(sibling)
}

/// The base image, linked (or sparsely copied) into the agent's data directory here, so that the
/// agent keeps it with a hard link of its own even inside the host VM, where the cache and the
/// data directory are different mounts and a copy would cross them.
fn stage_base_image(built: &guest::Guest, agent_dir: &Path) -> Result<PathBuf> {
    let entry = built
        .base
        .as_ref()
        .context("the guest build has no base image")?;
    let image = entry.file(wrenn_image::rootfs::IMAGE_FILE);
    let dir = agent_dir.join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = dir.join(format!("base-{}.ext4", entry.manifest.key));
    if staged.is_file() {
        return Ok(staged);
    }
    if std::fs::hard_link(&image, &staged).is_err() {
        let status = std::process::Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(&image)
            .arg(&staged)
            .status()
            .context("running cp")?;
        if !status.success() {
            let _ = std::fs::remove_file(&staged);
            bail!("copying {} to {} failed", image.display(), staged.display());
        }
    }
    Ok(staged)
}

/// Starts `wrenn agent`, registered with the control plane at `config.listen`.
fn start_agent(
    cache: &Cache,
    args: &Args,
    placement: &Placement,
    vmm: &Path,
    agent_dir: &Path,
    config: &ServerConfig,
) -> Result<AgentProcess> {
    let exe = std::env::current_exe()?;
    let port = args.agent_port;
    let server_port = config.listen.port();
    let advertise = format!("http://127.0.0.1:{port}");
    let (listen, server_host, run_dir) = match placement {
        // Slirp delivers forwarded connections to the host VM's eth0, not its loopback.
        Placement::HostVm => (
            format!("0.0.0.0:{port}"),
            wrenn_hostvm::HOST_ADDRESS_FROM_GUEST.to_string(),
            // The host VM's own /tmp (sockets cannot live on its 9p shares).
            "/tmp/wrenn-agent-run".to_owned(),
        ),
        Placement::Direct => (
            format!("127.0.0.1:{port}"),
            Ipv4Addr::LOCALHOST.to_string(),
            "/run/wrenn/agent".to_owned(),
        ),
    };
    if !config.listen.ip().is_loopback() && *placement == Placement::HostVm {
        bail!(
            "with the host VM the API must listen on a loopback address (the agent reaches it through the host VM's network)"
        );
    }
    let argv: Vec<OsString> = vec![
        exe.into_os_string(),
        "agent".into(),
        "--listen".into(),
        listen.into(),
        "--data-dir".into(),
        agent_dir.as_os_str().to_owned(),
        "--run-dir".into(),
        run_dir.into(),
        "--vmm".into(),
        vmm.as_os_str().to_owned(),
        "--server".into(),
        format!("http://{server_host}:{server_port}").into(),
        "--host-id".into(),
        HOST_ID.into(),
        "--advertise".into(),
        advertise.into(),
    ];
    let token = ("WRENN_JOIN_TOKEN", config.join_token.clone());
    match placement {
        Placement::Direct => {
            let child = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env(token.0, &token.1)
                .spawn()
                .context("starting wrenn agent")?;
            Ok(AgentProcess::Child(child))
        }
        Placement::HostVm => {
            eprintln!(
                "==> starting the host VM for the agent (this machine's KVM cannot run Linux guests)"
            );
            let forward = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            // One vCPU: with two, the emulated host VM has been seen to livelock under nested
            // guests (the test suite and the benches run it the same way).
            let options = RunOptions::new(Placement::HostVm)
                .with_overrides(Some(1), Some(args.hostvm_memory_mib), None)
                .network(HostVmNetwork::new().forward(forward, port));
            let spec = CommandSpec::new(argv)
                .env(token.0, token.1)
                .writable(agent_dir.to_owned())
                .with_cache(cache);
            let cache = cache.clone();
            let thread = std::thread::Builder::new()
                .name("wrenn-hostvm".into())
                .spawn(move || {
                    Ok(wrenn_hostvm::run(
                        &spec,
                        &options,
                        &cache,
                        &mut std::io::stderr(),
                        &mut std::io::stderr(),
                    )?)
                })?;
            Ok(AgentProcess::HostVm(thread))
        }
    }
}

/// The API keys `up` shows: one of each shape, both good on both APIs.
struct Keys {
    wrenn: String,
    /// `e2b_` + 40 hex, for E2B's SDKs (older ones check the shape before sending).
    e2b: String,
}

/// Waits for the agent, makes sure of the template, and returns the API keys to show.
async fn bring_up(
    server: &Server,
    args: &Args,
    base_image: &Path,
    agent: &mut AgentProcess,
) -> Result<Keys> {
    let agent_url = format!("http://127.0.0.1:{}", args.agent_port);
    let client = HostAgentClient::new(
        HttpClient::plaintext(),
        ClientConfig::new(agent_url.parse().context("the agent's URL")?),
    );
    let step = Step::start("waiting for the host agent");
    let started = Instant::now();
    loop {
        agent.check_alive()?;
        let health = client
            .health_with_options(
                HealthRequest::default(),
                CallOptions::default().with_timeout(Duration::from_secs(2)),
            )
            .await;
        if health.is_ok() {
            break;
        }
        if started.elapsed() > AGENT_START {
            bail!("the agent did not answer on {agent_url} within {AGENT_START:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    step.finish(&format!("answering on {agent_url}"));

    let listed = client
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .map_err(|e| anyhow::anyhow!("listing the agent's templates: {e}"))?
        .into_owned();
    if listed.snapshots.iter().any(|s| s.name == TEMPLATE) {
        eprintln!("==> template {TEMPLATE}: ready");
    } else {
        let step = Step::start(format!(
            "building template {TEMPLATE} (boot the base image, snapshot it)"
        ));
        let built = client
            .build_template_with_options(
                BuildTemplateRequest {
                    name: TEMPLATE.into(),
                    image: base_image.display().to_string(),
                    vcpus: args.template_vcpus,
                    memory_mib: args.template_memory_mib,
                    ..Default::default()
                },
                CallOptions::default().with_timeout(TEMPLATE_BUILD),
            )
            .await
            .map_err(|e| anyhow::anyhow!("building template {TEMPLATE}: {e}"))?
            .into_owned();
        step.finish(&format!(
            "booted in {} ms, {} pages to prefetch",
            built.boot_ms, built.prefetch_pages
        ));
    }

    // The agent's first heartbeat registers it; then the control plane learns its templates.
    let step = Step::start("registering the agent with the control plane");
    let started = Instant::now();
    loop {
        agent.check_alive()?;
        server.reconcile_once().await;
        if server.db().template(TEMPLATE).await?.is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the control plane has not heard from the agent within 60 s (its heartbeats go to the API's port)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    step.finish("host local ready");
    let dir = args.data_dir.join("server");
    Ok(Keys {
        wrenn: api_key(server, &dir.join("api-key"), KeyShape::Wrenn).await?,
        e2b: api_key(server, &dir.join("e2b-api-key"), KeyShape::E2b).await?,
    })
}

/// A key `up` shows: made once and kept (readable by root only) at `path`.
async fn api_key(server: &Server, path: &Path, shape: KeyShape) -> Result<String> {
    let prefix = match shape {
        KeyShape::Wrenn => "wrenn_",
        KeyShape::E2b => "e2b_",
    };
    if let Ok(text) = std::fs::read_to_string(path) {
        let key = text.trim().to_owned();
        if key.starts_with(prefix)
            && wrenn_server::keys::well_formed(&key)
            && server
                .db()
                .use_api_key(&wrenn_server::keys::hash(&key))
                .await?
                .is_some()
        {
            return Ok(key);
        }
    }
    let made = wrenn_server::keys::create_shaped(server.db(), "wrenn up", shape).await?;
    crate::server::write_private(path, &made.key)?;
    Ok(made.key)
}

fn print_welcome(args: &Args, keys: &Keys) {
    let key = &keys.wrenn;
    let url = format!("http://{}", args.listen);
    println!();
    println!("Wrenn is up.");
    println!("  API:      {url}   (docs: {url}/docs)");
    println!("  API key:  {key}");
    println!();
    println!("Try it:");
    println!("  export WRENN_API_URL={url} WRENN_API_KEY={key}");
    println!("  wrenn sandbox create {TEMPLATE}");
    println!("  wrenn sandbox exec <id> -- echo hello from a microVM");
    println!();
    println!("or with curl:");
    println!(
        "  curl -s -H 'Authorization: Bearer {key}' -d '{{\"template\":\"{TEMPLATE}\"}}' {url}/v1/sandboxes"
    );
    println!();
    println!("or with E2B's SDKs (pip install e2b / npm install e2b), unchanged:");
    println!(
        "E2B SDKs: E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY={}",
        keys.e2b
    );
    if !args.check {
        println!();
        println!("Ctrl-C stops Wrenn.");
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
}

/// `--check`: one sandbox through the REST API, as a user would.
async fn check(args: &Args, key: &str) -> Result<()> {
    let url = format!("http://{}", args.listen);
    let http = reqwest::Client::new();
    let step = Step::start("checking: create a sandbox, run a command, destroy it");
    let created: serde_json::Value = http
        .post(format!("{url}/v1/sandboxes"))
        .bearer_auth(key)
        .json(&serde_json::json!({ "template": TEMPLATE }))
        .send()
        .await?
        .error_for_status()
        .context("creating a sandbox")?
        .json()
        .await?;
    let id = created["id"].as_str().context("a sandbox without an id")?;
    let out: serde_json::Value = http
        .post(format!("{url}/v1/sandboxes/{id}/exec"))
        .bearer_auth(key)
        .json(&serde_json::json!({ "cmd": "echo", "args": ["hello from", id] }))
        .send()
        .await?
        .error_for_status()
        .context("running a command")?
        .json()
        .await?;
    http.delete(format!("{url}/v1/sandboxes/{id}"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()
        .context("destroying the sandbox")?;
    let stdout = out["stdout"].as_str().unwrap_or_default().trim().to_owned();
    if stdout != format!("hello from {id}") {
        bail!("the command printed {stdout:?}");
    }
    step.finish(&format!("sandbox {id} said {stdout:?}"));
    Ok(())
}
