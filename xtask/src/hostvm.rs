//! `cargo xtask hostvm -- CMD...`: run CMD where a usable KVM exists, with the workspace and the
//! cache writable (inside the host VM everything else of this machine is read-only).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use wrenn_hostvm::{CommandSpec, RunOptions};
use wrenn_image::cache::Cache;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Host VM memory in MiB.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Host VM vCPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Kill the command (and the host VM) after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

pub fn run(cache: &Cache, args: Args) -> Result<ExitCode> {
    let options = RunOptions::new(wrenn_hostvm::decide()?.placement).with_overrides(
        args.cpus,
        args.memory_mib,
        args.timeout.map(Duration::from_secs),
    );
    let spec = spec(cache, &args.command, &[]);
    let code = wrenn_hostvm::run(
        &spec,
        &options,
        cache,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )?;
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(u8::MAX),
    ))
}

/// Runs `argv` where a usable KVM exists, its stdout to `out`; returns its exit code.
pub fn run_argv(
    cache: &Cache,
    argv: &[OsString],
    env: &[(&str, &str)],
    out: &mut dyn Write,
) -> Result<i32> {
    run_argv_with(cache, argv, env, out, None, None, None, false)
}

/// [`run_argv`] with the host VM's vCPUs, a wall-clock limit and a limit on silence (`None`:
/// the defaults), and a network to this machine (reached at `WRENN_HOSTVM_HOST`). A stall is
/// returned as `wrenn_hostvm::HostVmError::Stalled`.
#[allow(clippy::too_many_arguments)]
pub fn run_argv_with(
    cache: &Cache,
    argv: &[OsString],
    env: &[(&str, &str)],
    out: &mut dyn Write,
    cpus: Option<u32>,
    timeout: Option<Duration>,
    quiet_timeout: Option<Duration>,
    network: bool,
) -> Result<i32> {
    let mut options =
        RunOptions::new(wrenn_hostvm::decide()?.placement).with_overrides(cpus, None, timeout);
    options.quiet_timeout = quiet_timeout;
    if network {
        options = options.network(wrenn_hostvm::HostVmNetwork::new());
    }
    let spec = spec(cache, argv, env);
    Ok(wrenn_hostvm::run(
        &spec,
        &options,
        cache,
        out,
        &mut std::io::stderr(),
    )?)
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| ".".into(), Path::to_owned)
}

pub(crate) fn spec(cache: &Cache, argv: &[OsString], env: &[(&str, &str)]) -> CommandSpec {
    let mut spec = CommandSpec::new(argv.iter().cloned())
        .writable(workspace_root())
        .with_cache(cache);
    // A target directory outside the workspace must be writable too (tests write there).
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        spec = spec.writable(target);
    }
    for (key, value) in env {
        spec = spec.env(key, value);
    }
    spec
}
