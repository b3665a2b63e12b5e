//! `wrenn-pager`: serves one VM's memory from a raw memory file over userfaultfd.
//!
//! ```text
//! wrenn-pager --socket /run/vm1.uffd --mem-file vm.mem [--prefetch-file F] [--record F]
//!             [--fault-around PAGES]
//! ```
//!
//! Listens on `--socket` (which must not exist), serves the VM that connects, and exits when
//! the VM ends or on SIGINT/SIGTERM, printing the stats as JSON on stdout. Logs go to stderr
//! (`RUST_LOG` filters them). Any failure prints a message and exits 1.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use wrenn_pager::fault::{DEFAULT_FAULT_AROUND_PAGES, MAX_FAULT_AROUND_PAGES};
use wrenn_pager::{FileSource, Pager, PagerConfig, VmOptions, VmState, prefetch};

/// Prefetch key used for the single VM this binary serves.
const KEY: &str = "cli";

#[derive(Debug, Parser)]
#[command(
    name = "wrenn-pager",
    about = "Serve a VM's memory over userfaultfd, from a raw memory file or a build of a layered store"
)]
struct Args {
    /// Unix socket to listen on (created; must not exist).
    #[arg(long)]
    socket: PathBuf,
    /// Raw guest memory file (Firecracker layout: regions back to back).
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    mem_file: Option<PathBuf>,
    /// A layered store: serve the memory of build --build, read through its header.
    #[arg(long, requires = "build")]
    store: Option<PathBuf>,
    /// The build (32 hex digits) of --store to serve.
    #[arg(long, requires = "store")]
    build: Option<wrenn_snapshot::id::BuildId>,
    /// Install the pages listed in this prefetch file right after the handshake.
    #[arg(long)]
    prefetch_file: Option<PathBuf>,
    /// On exit, write the pages installed on demand (faulted, and fault-around; install
    /// order) after any prefetched ones to this file.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Pages installed per fault: the faulting page's aligned window of this many pages
    /// (same region, not yet in place). 1 serves the faulting page alone.
    #[arg(
        long,
        value_name = "PAGES",
        default_value_t = DEFAULT_FAULT_AROUND_PAGES,
        value_parser = clap::value_parser!(u64).range(1..=MAX_FAULT_AROUND_PAGES)
    )]
    fault_around: u64,
    /// Seconds to wait for the VMM to connect and send its handshake.
    #[arg(long, default_value_t = 10)]
    accept_timeout_secs: u64,
}

fn main() {
    if let Err(error) = run() {
        eprintln!("wrenn-pager: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    // Block the signals before any thread exists so every thread inherits the mask and only
    // the waiter below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = Arc::clone(&interrupted);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(signal) = signals.wait() {
                    tracing::info!(?signal, "stopping");
                    interrupted.store(true, Ordering::SeqCst);
                }
            })
            .context("spawning the signal thread")?;
    }

    let source: Arc<dyn wrenn_pager::PageSource> = match (&args.mem_file, &args.store, args.build) {
        (Some(path), _, _) => Arc::new(FileSource::open(path)?),
        (None, Some(store), Some(build)) => {
            Arc::new(wrenn_pager::LayeredSource::open(store, build)?)
        }
        _ => bail!("give --mem-file, or --store and --build"),
    };
    let pager = Pager::new(PagerConfig {
        accept_timeout: Duration::from_secs(args.accept_timeout_secs),
        ..PagerConfig::default()
    });
    if let Some(path) = &args.prefetch_file {
        let count = pager.prefetch_store().load(KEY, path)?;
        tracing::info!(pages = count, path = %path.display(), "loaded the prefetch file");
    }
    let options = VmOptions::new("vm")
        .with_prefetch_key(KEY)
        .with_fault_around(args.fault_around);
    let mut vm = pager
        .register(&args.socket, source, options)
        .with_context(|| format!("serving on {}", args.socket.display()))?;

    let state = loop {
        if let Some(state) = vm.wait_timeout(Duration::from_millis(100)) {
            break state;
        }
        if interrupted.load(Ordering::SeqCst) {
            break vm.stop();
        }
    };
    let stats = vm.stats();
    let touched = vm.touched();
    drop(vm);

    if let Some(path) = &args.record {
        // The recording is what this VM faulted, after any prefetched pages it was given.
        let pages = pager
            .prefetch_store()
            .get(KEY)
            .map_or(touched, |pages| pages.to_vec());
        prefetch::write_file(path, &pages)?;
        tracing::info!(pages = pages.len(), path = %path.display(), "wrote the prefetch record");
    }
    let json = serde_json::to_string_pretty(&stats).context("serialising the stats")?;
    println!("{json}");
    if let VmState::Failed { error } = state {
        bail!("serving failed: {error}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = ["wrenn-pager", "--socket", "s.sock", "--mem-file", "vm.mem"];
        Args::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn test_args_fault_around_defaults_to_sixteen_pages() {
        let args = parse(&[]).expect("parse");
        assert_eq!(args.fault_around, DEFAULT_FAULT_AROUND_PAGES);
        assert_eq!(args.fault_around, 16);
    }

    #[test]
    fn test_args_fault_around_one_is_accepted() {
        assert_eq!(
            parse(&["--fault-around", "1"]).expect("parse").fault_around,
            1
        );
    }

    #[test]
    fn test_args_fault_around_out_of_range_is_rejected() {
        for bad in ["0", "513", "-1", "lots"] {
            let flag = format!("--fault-around={bad}");
            let error = parse(&[flag.as_str()]).expect_err(bad);
            assert!(
                error.to_string().contains("--fault-around"),
                "{bad}: {error}"
            );
        }
    }
}
