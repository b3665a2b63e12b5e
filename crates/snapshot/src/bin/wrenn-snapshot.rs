//! `wrenn-snapshot`: inspect and compact snapshot builds.
//!
//! ```text
//! wrenn-snapshot inspect <header file> [--runs]
//! wrenn-snapshot compact --store DIR --build ID --kind mem|disk:<drive>
//! ```

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wrenn_snapshot::{BuildId, DeviceKind, Header, Store, chain_depth, compact};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn-snapshot",
    about = "Inspect and compact Wrenn snapshot builds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a header's summary: generation, builds and the bytes each serves, runs.
    Inspect {
        /// A `memfile.header` or `disk-<drive>.header` file.
        header: PathBuf,
        /// Also list every mapping run.
        #[arg(long)]
        runs: bool,
    },
    /// Fold a build's chain for one device into a new Full build; prints the new build id.
    Compact {
        #[arg(long)]
        store: PathBuf,
        /// The build whose header to compact.
        #[arg(long)]
        build: BuildId,
        /// `mem` or `disk:<drive id>`.
        #[arg(long)]
        kind: DeviceKind,
    },
}

fn inspect(path: &Path, runs: bool) -> anyhow::Result<()> {
    let header = Header::read(path)?;
    print!("{}", header.summary());
    println!("chain depth {}", chain_depth(&header));
    if runs {
        println!(
            "{:>16} {:>16} {:32} {:>16}",
            "offset", "len", "build", "storage offset"
        );
        for m in &header.mappings {
            let build = if m.build.is_zero() {
                "zero".to_owned()
            } else {
                m.build.to_string()
            };
            println!(
                "{:>16} {:>16} {build:32} {:>16}",
                m.offset, m.len, m.storage_offset
            );
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { header, runs } => inspect(&header, runs),
        Command::Compact { store, build, kind } => {
            let store = Store::new(store);
            let header = Header::read(&store.header_path(build, &kind))?;
            let new_build = BuildId::random()?;
            compact(&store, &header, new_build, &kind)
                .with_context(|| format!("compacting {kind} of build {build}"))?;
            println!("{new_build}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version are not errors; everything else exits 1 like other errors.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wrenn-snapshot: {error:#}");
            ExitCode::FAILURE
        }
    }
}
