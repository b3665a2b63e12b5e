//! `wrenn agent` (run the host agent on this machine) and the commands that talk to one:
//! `wrenn template build|list|rm`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use wrenn_agent::manager::{AgentConfig, Manager};
use wrenn_proto::hostagent::v1::{
    BuildTemplateRequest, DeleteSnapshotRequest, HostAgentClient, ListSnapshotsRequest,
};

/// Where a client finds the agent unless told otherwise.
const DEFAULT_AGENT_URL: &str = "http://127.0.0.1:5008";

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Address to serve `hostagent.v1` and /metrics on.
    #[arg(long, default_value = wrenn_agent::server::DEFAULT_LISTEN)]
    listen: String,
    /// Templates, snapshots, sandbox records and disks.
    #[arg(long, default_value = "/var/lib/wrenn/agent")]
    data_dir: PathBuf,
    /// VMM sockets and logs.
    #[arg(long, default_value = "/run/wrenn/agent")]
    run_dir: PathBuf,
    /// The wrenn-vmm binary (default: next to this one).
    #[arg(long, env = "WRENN_VMM")]
    vmm: Option<PathBuf>,
    /// Network slots kept ready.
    #[arg(long, default_value_t = 4)]
    warm_slots: u32,
    /// An object store to share templates and paused sandboxes through, so that another
    /// host's agent can start or resume them: s3://bucket/prefix, gs://..., az://...,
    /// file:///path (credentials from the environment).
    #[arg(long, env = "WRENN_REMOTE")]
    remote: Option<String>,
    /// A control plane (`wrenn server`) to register with: heartbeats with this host's
    /// capacity go to it every 10 s.
    #[arg(long = "server", env = "WRENN_SERVER_URL")]
    server: Option<String>,
    /// The control plane's join token (needed with --server).
    #[arg(long, env = "WRENN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// This host's id in the control plane (default: the machine's hostname).
    #[arg(long)]
    host_id: Option<String>,
    /// This agent's URL as the control plane reaches it (default: http://<listen address>).
    #[arg(long = "advertise")]
    advertise: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum TemplateCommand {
    /// Boot an image, wait for envd, and snapshot it as a template.
    Build {
        name: String,
        /// "base", "test", or the absolute path of an ext4 image on the agent's machine.
        #[arg(long, default_value = "base")]
        image: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 512)]
        memory_mib: u32,
        /// Replace a template of that name.
        #[arg(long)]
        replace: bool,
    },
    /// List the templates.
    List,
    /// Delete a template.
    Rm { name: String },
}

#[derive(Debug, clap::Args)]
pub struct TemplateArgs {
    /// The agent's address.
    #[arg(long, env = "WRENN_AGENT_URL", default_value = DEFAULT_AGENT_URL)]
    agent: String,
    #[command(subcommand)]
    command: TemplateCommand,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs the agent until Ctrl-C or SIGTERM; sandboxes keep running (a restarted agent adopts
/// them).
pub fn run_agent(args: AgentArgs) -> Result<()> {
    if !wrenn_image::packages::is_root() {
        bail!("wrenn agent must run as root (it makes network namespaces and taps)");
    }
    wrenn_image::packages::ensure(wrenn_agent::network::PACKAGES)?;
    let vmm = match args.vmm {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("wrenn-vmm"),
    };
    if !vmm.is_file() {
        bail!(
            "no wrenn-vmm at {} (build it with `cargo build -p wrenn-vmm`, or pass --vmm)",
            vmm.display()
        );
    }
    let control_plane = match (&args.server, &args.join_token) {
        (Some(server), Some(token)) => {
            let host_id = match &args.host_id {
                Some(id) => id.clone(),
                None => hostname()?,
            };
            Some((server.clone(), token.clone(), host_id))
        }
        (Some(_), None) => bail!(
            "--server needs the control plane's join token: pass --join-token or set WRENN_JOIN_TOKEN"
        ),
        (None, _) => None,
    };
    let mut config = AgentConfig::new(args.data_dir, args.run_dir, vmm);
    config.slots.warm = args.warm_slots;
    if let Some(url) = args.remote.clone() {
        config.remote = wrenn_agent::storage::Remote::Url(url);
    }
    runtime()?.block_on(async move {
        let manager = Manager::start(config).await?;
        manager.spawn_reaper();
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let local = listener.local_addr()?;
        println!("wrenn agent: serving hostagent.v1 on http://{local}");
        if let Some((server_url, join_token, host_id)) = control_plane {
            let advertise_url = match args.advertise {
                Some(url) => url,
                None if local.ip().is_unspecified() => bail!(
                    "the agent listens on {local}, which the control plane cannot connect to: \
                     pass --advertise http://<this host's address>:{}",
                    local.port()
                ),
                None => format!("http://{local}"),
            };
            println!(
                "wrenn agent: heartbeating to {server_url} as host {host_id} ({advertise_url})"
            );
            wrenn_agent::heartbeat::spawn(
                manager.clone(),
                wrenn_agent::heartbeat::HeartbeatConfig {
                    server_url,
                    join_token,
                    host_id,
                    advertise_url,
                    storage: args.remote,
                    interval: wrenn_agent::heartbeat::DEFAULT_INTERVAL,
                },
            );
        }
        let app = wrenn_agent::server::app(manager, Arc::new(wrenn_agent::rpc::CacheImages));
        wrenn_agent::server::serve(listener, app, crate::server::shutdown_signal()).await?;
        println!("wrenn agent: stopped; sandboxes keep running");
        Ok(())
    })
}

/// This machine's hostname: the default host id.
fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname (pass --host-id)")?;
    let name = name.trim();
    if name.is_empty() {
        bail!("this machine has no hostname: pass --host-id");
    }
    Ok(name.to_owned())
}

/// `wrenn template ...` against an agent.
pub fn run_template(args: TemplateArgs) -> Result<()> {
    let uri = args
        .agent
        .parse()
        .with_context(|| format!("{:?} is not a URL", args.agent))?;
    let client = HostAgentClient::new(HttpClient::plaintext(), ClientConfig::new(uri));
    runtime()?.block_on(async move {
        match args.command {
            TemplateCommand::Build {
                name,
                image,
                vcpus,
                memory_mib,
                replace,
            } => {
                let request = BuildTemplateRequest {
                    name,
                    image,
                    vcpus,
                    memory_mib,
                    replace,
                    ..Default::default()
                };
                let built = client
                    .build_template_with_options(
                        request,
                        CallOptions::default().with_timeout(Duration::from_secs(600)),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("building the template: {e}"))?
                    .into_owned();
                let snapshot = built.snapshot.as_option().cloned().unwrap_or_default();
                println!(
                    "template {} built: build {}, {} vCPU, {} MiB, booted in {} ms, {} prefetch pages",
                    snapshot.name,
                    snapshot.build_id,
                    snapshot.vcpus,
                    snapshot.memory_mib,
                    built.boot_ms,
                    built.prefetch_pages
                );
            }
            TemplateCommand::List => {
                let list = client
                    .list_snapshots(ListSnapshotsRequest::default())
                    .await
                    .map_err(|e| anyhow::anyhow!("listing templates: {e}"))?
                    .into_owned();
                println!("{:<24} {:<34} {:>5} {:>8} {:>10}", "NAME", "BUILD", "VCPUS", "MEM_MIB", "SIZE_MIB");
                for s in list.snapshots {
                    println!(
                        "{:<24} {:<34} {:>5} {:>8} {:>10.1}",
                        s.name,
                        s.build_id,
                        s.vcpus,
                        s.memory_mib,
                        s.size_bytes as f64 / f64::from(1 << 20)
                    );
                }
            }
            TemplateCommand::Rm { name } => {
                client
                    .delete_snapshot(DeleteSnapshotRequest {
                        name: name.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("deleting template {name:?}: {e}"))?;
                println!("template {name} deleted");
            }
        }
        Ok(())
    })
}
