use anyhow::{Result, bail};
use std::process::ExitCode;
use wrenn_image::cache::Cache;
#[derive(Debug, clap::Args)]
pub struct Args {}
#[derive(Debug, clap::Args)]
pub struct RunArgs {}
pub fn run(_c: &Cache, _a: Args) -> Result<ExitCode> {
    bail!("not yet")
}
pub fn run_manifest(_a: RunArgs) -> Result<ExitCode> {
    bail!("not yet")
}
