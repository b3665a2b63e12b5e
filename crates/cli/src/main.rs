//! `wrenn`: the product's command.
//!
//! - `wrenn up`: the guest built (or reused), the control plane and a host agent started (the
//!   agent inside the host VM where this machine's KVM cannot run Linux guests), the `base`
//!   template ready, an API key printed; stays up until Ctrl-C.
//! - `wrenn server`: the control plane; `wrenn keys create`: an API key.
//! - `wrenn guest build|show`: the guest kernel and images (which hold envd: `WRENN_ENVD`, or
//!   built static from the workspace).
//! - `wrenn hostvm -- CMD...`: run CMD where a usable KVM exists.
//! - `wrenn kvm-check`: say whether this machine's /dev/kvm can run Linux guests.
//! - `wrenn agent`: the host agent; `wrenn template build|list|rm`: templates through it.
//! - `wrenn sandbox|files|snapshot|hosts ...`: a client of the control plane's REST API.

#![forbid(unsafe_code)]

mod agent;
mod client;
mod server;
mod up;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use wrenn_hostvm::{CommandSpec, RunOptions};
use wrenn_image::cache::Cache;
use wrenn_image::guest::{self, Part};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn",
    version,
    about = "Wrenn: microVM sandboxes on your own machines"
)]
struct Cli {
    /// Cache directory for built artifacts (default: /var/cache/wrenn as root).
    #[arg(long, global = true, env = "WRENN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start Wrenn on this machine and stay up until Ctrl-C.
    Up(up::Args),
    /// Build or show the guest kernel and images.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Run a command where a usable KVM exists (directly, or inside the host VM).
    Hostvm(HostvmArgs),
    /// Say whether this machine's /dev/kvm can run Linux guests; exits 1 when it cannot.
    KvmCheck,
    /// Run the host agent: sandboxes on this machine, served as hostagent.v1.
    Agent(agent::AgentArgs),
    /// Build, list or delete templates through the agent.
    Template(agent::TemplateArgs),
    /// Run the control plane: the REST API over host agents, its database, the reconciler.
    Server(server::ServerArgs),
    /// API keys, made straight in the control plane's database.
    #[command(subcommand)]
    Keys(server::KeysCommand),
    /// Sandboxes through the control plane: create, list, get, exec, pause, resume, rm.
    Sandbox {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::SandboxCommand,
    },
    /// Files in a sandbox through the control plane: put, get.
    Files {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::FilesCommand,
    },
    /// Snapshots (templates made from sandboxes) through the control plane.
    Snapshot {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::SnapshotCommand,
    },
    /// The hosts (agents) the control plane knows.
    Hosts {
        #[command(flatten)]
        api: client::ApiArgs,
        #[command(subcommand)]
        command: client::HostsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum GuestCommand {
    /// Build (or reuse from the cache) the kernel and images.
    Build {
        /// Build only these parts: kernel, test, base.
        #[arg(long, value_delimiter = ',')]
        only: Vec<Part>,
        /// Discard the cached artifacts first.
        #[arg(long)]
        rebuild: bool,
    },
    /// Print the built artifacts; fails when one is missing or damaged.
    Show {
        #[arg(long, value_delimiter = ',')]
        only: Vec<Part>,
    },
}

#[derive(Debug, clap::Args)]
struct HostvmArgs {
    /// Host VM memory in MiB.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Host VM vCPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Kill the command (and the host VM) after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Forward a TCP port of the host into the host VM: HOSTPORT:GUESTPORT (on 127.0.0.1) or
    /// HOSTADDR:HOSTPORT:GUESTPORT; repeatable. Implies --network.
    #[arg(long = "forward", value_name = "HOSTPORT:GUESTPORT")]
    forwards: Vec<wrenn_hostvm::PortForward>,
    /// Give the host VM a network: the host is at $WRENN_HOSTVM_HOST (10.0.2.2) inside.
    #[arg(long)]
    network: bool,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WRENN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cache = cli.cache_dir.map_or_else(Cache::from_env, Cache::new);
    match cli.command {
        Command::Up(args) => up::run(&cache, args),
        Command::Guest(GuestCommand::Build { only, rebuild }) => {
            let envd = guest::wants_image(&only)
                .then(wrenn_image::envd::ensure)
                .transpose()?;
            print!(
                "{}",
                guest::build_with(&cache, &only, rebuild, envd.as_ref())?.summary()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Guest(GuestCommand::Show { only }) => {
            print!("{}", guest::find(&cache, &only)?.summary());
            Ok(ExitCode::SUCCESS)
        }
        Command::Hostvm(args) => {
            let mut options = RunOptions::new(wrenn_hostvm::decide()?.placement).with_overrides(
                args.cpus,
                args.memory_mib,
                args.timeout.map(Duration::from_secs),
            );
            if args.network || !args.forwards.is_empty() {
                options = options.network(wrenn_hostvm::HostVmNetwork {
                    forwards: args.forwards,
                });
            }
            Ok(exit_code(run_where_kvm_is(
                &cache,
                &args.command,
                &options,
            )?))
        }
        Command::KvmCheck => {
            let verdict = wrenn_vmm::probe::assess();
            println!("{verdict}");
            Ok(if verdict.is_usable() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Agent(args) => {
            agent::run_agent(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Template(args) => {
            agent::run_template(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Server(args) => {
            server::run_server(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(command) => {
            server::run_keys(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox { api, command } => client::run_sandbox(&api, command),
        Command::Files { api, command } => client::run_files(&api, command),
        Command::Snapshot { api, command } => client::run_snapshot(&api, command),
        Command::Hosts { api, command } => client::run_hosts(&api, command),
    }
}

/// Runs `argv` with the working directory and the cache writable inside the host VM; returns
/// its exit code.
fn run_where_kvm_is(cache: &Cache, argv: &[OsString], options: &RunOptions) -> Result<i32> {
    let cwd = std::env::current_dir()?;
    let spec = CommandSpec::new(argv.iter().cloned())
        .writable(cwd)
        .with_cache(cache);
    Ok(wrenn_hostvm::run(
        &spec,
        options,
        cache,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )?)
}

/// The command's exit code as ours (clamped into 0..=255).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(u8::MAX))
}
