//! `envd`: the in-guest daemon. Run as PID 1 (`init=/usr/bin/envd`) it also brings the guest
//! up and reaps orphans (see `wrenn_envd::system::pid1`); the server then runs in a child.
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use wrenn_envd::state::{Settings, Shared};
use wrenn_envd::system::cmdline::KernelCmdline;
use wrenn_envd::system::portforward::ExternalAddress;
use wrenn_envd::system::{cgroups, metadata, network, pid1, portforward, vsock};
use wrenn_envd::users::UserDb;

/// envd: runs processes and manages files inside a Wrenn sandbox (E2B's envd protocol).
#[derive(Debug, Parser)]
#[command(version = wrenn_envd::ENVD_VERSION)]
struct Args {
    /// TCP port to answer on (all addresses).
    #[arg(long, default_value_t = wrenn_envd::DEFAULT_PORT)]
    port: u16,
    /// The user requests run as when they name none (until `/init` says otherwise); else
    /// `envd.default_user=` from the kernel command line, else root.
    #[arg(long)]
    default_user: Option<String>,
    /// Read users and groups from DIR/passwd and DIR/group instead of /etc (envd outside a
    /// sandbox: tests, a container with its own user database).
    #[arg(long, value_name = "DIR", default_value = "/etc")]
    etc: std::path::PathBuf,
    /// Manage the machine without being PID 1: read the kernel command line, set the clock
    /// and reseed entropy on `/init`, write /run/e2b, forward ports, serve on vsock.
    /// Implied as PID 1.
    #[arg(long)]
    manage_system: bool,
    /// Own the cgroup tree /sys/fs/cgroup/wrenn (create it, move envd into wrenn/envd,
    /// enable controllers) and start processes in it. Implied as PID 1.
    #[arg(long)]
    manage_cgroups: bool,
    /// vsock port to serve on as well, 0 for none; else `envd.vsock_port=`, else 49983 when
    /// managing the system and none otherwise.
    #[arg(long, value_name = "PORT")]
    vsock_port: Option<u32>,
    /// Forward loopback-only listeners to the external address even when not managing the
    /// system.
    #[arg(long)]
    port_forward: bool,
    /// The external address forwarded ports listen on (default: eth0's IPv4 address).
    #[arg(long, value_name = "IPV4")]
    forward_address: Option<Ipv4Addr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENVD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if pid1::is_pid1() {
        // The kernel hands init the command line's stray words; none may stop the boot.
        let args = Args::try_parse().unwrap_or_else(|error| {
            tracing::warn!(%error, "ignoring init's arguments");
            Args::parse_from(["envd"])
        });
        pid1::run(|cmdline| exit_code(serve(&args, cmdline, true)));
    }
    let args = Args::parse();
    let cmdline = if args.manage_system {
        KernelCmdline::read()
    } else {
        KernelCmdline::default()
    };
    if args.manage_cgroups
        && let Err(error) = cgroups::setup(std::path::Path::new(cgroups::MOUNT))
    {
        tracing::warn!(%error, "cgroups not set up");
    }
    match serve(&args, &cmdline, false) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn exit_code(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!("{error:#}");
            1
        }
    }
}

/// Runs the server until it fails.
fn serve(args: &Args, cmdline: &KernelCmdline, pid1: bool) -> anyhow::Result<()> {
    let manage_system = pid1 || args.manage_system;
    let settings = Settings {
        default_user: args
            .default_user
            .clone()
            .or_else(|| cmdline.default_user.clone())
            .unwrap_or_else(|| "root".to_owned()),
        access_token: cmdline.access_token.clone(),
        sandbox_id: cmdline.sandbox_id.clone(),
        template_id: cmdline.template_id.clone(),
        manage_system,
        manage_cgroups: pid1 || args.manage_cgroups,
        ..Settings::default()
    };
    if manage_system {
        // The OOM killer takes user processes, never the daemon that reports on them.
        if let Err(error) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
            tracing::warn!(%error, "cannot protect envd from the OOM killer");
        }
        metadata::publish(&settings);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shared = Shared::new(
            settings,
            UserDb::at(args.etc.join("passwd"), args.etc.join("group")),
        );
        let app = wrenn_envd::server::app(shared);
        let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening on port {}", args.port))?;
        tracing::info!(%address, "envd listening");
        let vsock_port = args
            .vsock_port
            .or(cmdline.vsock_port)
            .unwrap_or(if manage_system {
                u32::from(wrenn_envd::DEFAULT_PORT)
            } else {
                0
            });
        if vsock_port != 0 {
            vsock::spawn(vsock_port, app.clone());
        }
        if manage_system || args.port_forward {
            let external = args.forward_address.map_or_else(
                || ExternalAddress::Interface(network::DEFAULT_DEVICE.to_owned()),
                ExternalAddress::Fixed,
            );
            portforward::spawn(external, vec![args.port]);
        }
        eprintln!("envd: ready");
        wrenn_envd::server::serve_tcp(listener, app)
            .await
            .context("serving over TCP")
    })
}
