//! Developer and CI entry points for Wrenn:
//!
//! - `cargo xtask guest`: build the static envd, then build (or reuse from the cache) the guest
//!   kernel and images that hold it;
//! - `cargo xtask hostvm -- CMD...`: run CMD where a usable KVM exists;
//! - `cargo xtask test`: the whole test suite (host tests here, VM tests through `hostvm`);
//! - `cargo xtask bench NAME`: benchmarks, printed as `BENCH` lines and one `RESULT` line;
//! - `cargo xtask proto`: regenerate envd's descriptor set after a `.proto` change.

#![forbid(unsafe_code)]

mod bench;
mod bench_agent;
mod bench_api;
mod bench_e2b;
mod bench_envd;
mod bench_snapshot;
mod bench_vmm;
mod hostvm;
mod postgres;
mod proto;
mod test;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use wrenn_image::cache::Cache;
use wrenn_image::envd::{self, Envd};
use wrenn_image::guest::{self, Part};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Wrenn's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the guest kernel and root filesystem images (cached outside the repository).
    Guest {
        /// Build only these parts.
        #[arg(long, value_delimiter = ',')]
        only: Vec<Part>,
        /// Discard the cached artifacts first.
        #[arg(long)]
        rebuild: bool,
    },
    /// Run a command where a usable KVM exists (directly, or inside the host VM).
    Hostvm(hostvm::Args),
    /// Run the whole test suite.
    Test(test::Args),
    /// Run a benchmark.
    Bench(bench::Args),
    /// Regenerate crates/proto/proto/descriptor.bin from the .proto files.
    Proto,
    /// Run prebuilt test binaries listed in a manifest (used inside the host VM).
    #[command(hide = true)]
    RunTests(test::RunArgs),
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
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The envd the images hold: `WRENN_ENVD` if set, else the workspace's envd built static
/// (`cargo build --release --target x86_64-unknown-linux-gnu` with `+crt-static`, in
/// `target/envd-static`). Returns the checked binary; its path is `.path`.
pub fn static_envd() -> Result<Envd> {
    envd::ensure().context("building the static envd for the guest images")
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cache = Cache::from_env();
    match cli.command {
        Task::Guest { only, rebuild } => {
            let envd = guest::wants_image(&only).then(static_envd).transpose()?;
            let built = guest::build_with(&cache, &only, rebuild, envd.as_ref())?;
            print!("{}", built.summary());
            Ok(ExitCode::SUCCESS)
        }
        Task::Hostvm(args) => hostvm::run(&cache, args),
        Task::Test(args) => test::run(&cache, args),
        Task::Bench(args) => {
            // The benchmarks build and find images with the envd at its usual place.
            static_envd()?;
            bench::run(&cache, args)
        }
        Task::RunTests(args) => test::run_manifest(args),
        Task::Proto => proto::run().map(|()| ExitCode::SUCCESS),
    }
}
