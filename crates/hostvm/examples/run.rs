//! Runs a command where a usable KVM exists, e.g.
//! `cargo run -p wrenn-hostvm --example run -- sh -c 'ls -l /dev/kvm'`.
//! `WRENN_HOSTVM=always|never` overrides the decision; `RUST_LOG=wrenn_hostvm=debug` shows more.

use std::process::ExitCode;
use std::time::Instant;

use wrenn_hostvm::{CommandSpec, RunOptions, decide, run};
use wrenn_image::cache::Cache;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "wrenn_hostvm=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let started = Instant::now();
    let result = decide().and_then(|decision| {
        let spec = CommandSpec::new(argv).writable(std::env::current_dir().unwrap_or_default());
        let options = RunOptions::new(decision.placement);
        run(
            &spec,
            &options,
            &Cache::from_env(),
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )
    });
    eprintln!("(took {:.2?})", started.elapsed());
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                msg.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            eprintln!("error: {msg}");
            ExitCode::from(125)
        }
    }
}
