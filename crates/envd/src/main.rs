//! `envd`: the in-guest daemon. Run as PID 1 it also brings the guest up (see
//! `wrenn_envd::system`).
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use clap::Parser;
use wrenn_envd::state::{Settings, Shared};
use wrenn_envd::users::UserDb;

/// envd: runs processes and manages files inside a Wrenn sandbox (E2B's envd protocol).
#[derive(Debug, Parser)]
#[command(version = wrenn_envd::ENVD_VERSION)]
struct Args {
    /// TCP port to answer on (all addresses).
    #[arg(long, default_value_t = wrenn_envd::DEFAULT_PORT)]
    port: u16,
    /// The user requests run as when they name none (until `/init` says otherwise).
    #[arg(long, default_value = "root")]
    default_user: String,
    /// Read users and groups from DIR/passwd and DIR/group instead of /etc (envd outside a
    /// sandbox: tests, a container with its own user database).
    #[arg(long, value_name = "DIR", default_value = "/etc")]
    etc: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENVD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let settings = Settings {
            default_user: args.default_user,
            ..Settings::default()
        };
        let shared = Shared::new(
            settings,
            UserDb::at(args.etc.join("passwd"), args.etc.join("group")),
        );
        let app = wrenn_envd::server::app(shared);
        wrenn_envd::server::serve_tcp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port)), app)
            .await
            .with_context(|| format!("serving on port {}", args.port))
    })
}
