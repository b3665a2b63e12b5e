//! `cargo xtask test`: the whole suite.
//!
//! 1. Builds the static envd, then builds (or reuses) the guest kernel and the images holding
//!    it, which the VM tests boot.
//! 2. Compiles every test target once, on the host.
//! 3. Runs the host tests here: every test binary except those whose target name starts with
//!    `vm_`.
//! 4. Runs the `vm_` binaries where a usable KVM exists: directly, or inside the host VM (one
//!    boot for all of them), with `WRENN_REQUIRE_KVM=1` so that a VM test can never pass by
//!    skipping.
//! 5. Prints one closing line: `wrenn: N passed, N failed, N skipped`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use wrenn_image::cache::Cache;

use wrenn_image::guest;

/// What host tests run besides the code under test: `protoc` (envd's descriptor set is checked
/// against its .proto files), `ip`, `unshare`, `nsenter` (network namespaces for envd's
/// port forwarding and SDK tests), `curl`, `gzip`, and Python for the E2B SDK tests.
const HOST_TEST_PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "iproute2",
    "nftables",
    "util-linux",
    "curl",
    "gzip",
    "python3",
    "python3-venv",
];

/// Prefix of test targets that need a usable KVM.
const VM_TEST_PREFIX: &str = "vm_";
/// A test binary that runs longer than this is killed and counted as failed.
const BINARY_TIMEOUT_SECS: u32 = 1200;
/// Host VM vCPUs for the VM test phase (see run_vm_binaries).
const VM_PHASE_CPUS: u32 = 1;
/// Silence after which the host VM counts as stalled (each VM test has a 2-minute deadline; a
/// frozen host VM is found sooner by its heartbeat).
const VM_PHASE_QUIET: std::time::Duration = std::time::Duration::from_secs(6 * 60);
/// Runs of the VM test phase when the host VM stalls (each runs only the binaries that had not
/// finished).
const VM_PHASE_ATTEMPTS: u32 = 5;
/// The whole VM test phase, boots included, on the host's clock.
const VM_PHASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(40 * 60);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run only the host tests.
    #[arg(long, conflicts_with = "vm_only")]
    host_only: bool,
    /// Run only the VM tests.
    #[arg(long)]
    vm_only: bool,
    /// Passed to every test binary: run only tests whose name contains it.
    filter: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// JSON list of test binaries, as written by `cargo xtask test`.
    #[arg(long)]
    manifest: PathBuf,
    #[arg(long)]
    filter: Option<String>,
}

/// One compiled test target.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TestBinary {
    package: String,
    target: String,
    executable: PathBuf,
    /// The package's directory: cargo runs tests there.
    cwd: PathBuf,
}

/// Counts from libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    passed: u64,
    failed: u64,
    skipped: u64,
    /// Binaries that failed without a result line (crash, timeout, skipped phase).
    broken: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.broken += other.broken;
    }

    /// Reads one line of libtest output.
    fn scan(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.skipped += n,
                _ => {}
            }
        }
    }
}

pub fn run(cache: &Cache, args: Args) -> Result<ExitCode> {
    wrenn_image::packages::ensure(HOST_TEST_PACKAGES)?;
    let postgres = crate::postgres::ensure()?;
    let envd = crate::static_envd()?;
    guest::build_with(cache, &[], false, Some(&envd))
        .context("building the guest kernel and images")?;
    let binaries = compile_tests()?;
    let (vm, host): (Vec<_>, Vec<_>) = binaries
        .into_iter()
        .partition(|b| b.target.starts_with(VM_TEST_PREFIX));

    let mut tally = Tally::default();
    if !args.vm_only {
        eprintln!("==> host tests: {} binaries", host.len());
        let env = [(crate::postgres::URL_ENV, postgres.url("127.0.0.1"))];
        tally.add(run_binaries(
            &host,
            args.filter.as_deref(),
            &env,
            &mut std::io::stdout(),
        ));
    }
    if !args.host_only {
        eprintln!("==> VM tests: {} binaries", vm.len());
        tally.add(run_vm_binaries(
            cache,
            &vm,
            args.filter.as_deref(),
            &postgres,
        )?);
    }
    println!();
    if tally.broken > 0 {
        println!(
            "{} test binaries crashed or timed out (see above)",
            tally.broken
        );
    }
    let failed = tally.failed + tally.broken;
    println!(
        "wrenn: {} passed, {} failed, {} skipped",
        tally.passed, failed, tally.skipped
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Builds every test target and lists the executables.
fn compile_tests() -> Result<Vec<TestBinary>> {
    eprintln!("==> compiling tests");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("compiling the tests failed");
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        binaries.push(TestBinary {
            package: msg["package_id"]
                .as_str()
                .map_or_else(String::new, package_name),
            target: msg["target"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            executable: exe.into(),
            cwd: manifest.parent().map(Path::to_owned).unwrap_or_default(),
        });
    }
    Ok(binaries)
}

/// `path+file:///w/crates/image#wrenn-image@0.1.0` -> `wrenn-image`;
/// `path+file:///w/xtask#0.1.0` (directory named like the package) -> `xtask`.
fn package_name(id: &str) -> String {
    let (path, fragment) = id.rsplit_once('#').unwrap_or((id, ""));
    match fragment.split_once('@') {
        Some((name, _)) => name.to_owned(),
        None => path.rsplit('/').next().unwrap_or(path).to_owned(),
    }
}

/// Runs test binaries one after another, with `env` added, echoing their output to `out`.
fn run_binaries(
    binaries: &[TestBinary],
    filter: Option<&str>,
    env: &[(&str, String)],
    out: &mut dyn Write,
) -> Tally {
    let mut total = Tally::default();
    for bin in binaries {
        let _ = writeln!(out, "---- {} ({})", bin.target, bin.package);
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=10", &BINARY_TIMEOUT_SECS.to_string()])
            .arg(&bin.executable)
            .args(filter)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&bin.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = writeln!(out, "cannot run {}: {e}", bin.executable.display());
                total.broken += 1;
                continue;
            }
        };
        let mut tally = Tally::default();
        let mut saw_result = false;
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                saw_result |= line.trim().starts_with("test result: ");
                tally.scan(&line);
                let _ = writeln!(out, "{line}");
            }
        }
        let status = child.wait();
        let ok = status.as_ref().is_ok_and(|s| s.success());
        if !ok && (!saw_result || tally.failed == 0) {
            let _ = writeln!(out, "{} exited with {status:?}", bin.target);
            tally.broken += 1;
        }
        total.add(tally);
    }
    total
}

/// Runs the VM test binaries where a usable KVM exists, with a network to this machine (the
/// control plane's VM tests use its PostgreSQL).
fn run_vm_binaries(
    cache: &Cache,
    binaries: &[TestBinary],
    filter: Option<&str>,
    postgres: &crate::postgres::Postgres,
) -> Result<Tally> {
    if binaries.is_empty() {
        return Ok(Tally::default());
    }
    let manifest_dir = binaries[0]
        .executable
        .ancestors()
        .nth(3)
        .map(|target| target.join("wrenn-tests"))
        .context("test executables are not in a cargo target directory")?;
    std::fs::create_dir_all(&manifest_dir)?;
    let manifest = manifest_dir.join("vm-tests.json");

    let mut argv = vec![
        std::env::current_exe()?.into_os_string(),
        "run-tests".into(),
        "--manifest".into(),
        manifest.clone().into_os_string(),
    ];
    if let Some(filter) = filter {
        argv.extend(["--filter".into(), filter.into()]);
    }
    let host = match wrenn_hostvm::decide()?.placement {
        wrenn_hostvm::Placement::HostVm => wrenn_hostvm::HOST_ADDRESS_FROM_GUEST.to_string(),
        wrenn_hostvm::Placement::Direct => "127.0.0.1".to_owned(),
    };
    let postgres_url = postgres.url(&host);
    let mut tee = TallyWriter::new(std::io::stdout());
    // One host VM vCPU: with two, the emulated host VM has been seen to livelock for many
    // minutes under nested guests (its vCPUs spin; QEMU guests inside hit it too). Rarely it
    // also freezes with one: its heartbeat stops, it is killed (with a note of what its vCPU was
    // doing) and the binaries that had not finished run again in a new one, said out loud.
    let mut attempt = 1;
    let mut remaining: Vec<&TestBinary> = binaries.iter().collect();
    let code = loop {
        std::fs::write(&manifest, serde_json::to_vec_pretty(&remaining)?)?;
        let run = crate::hostvm::run_argv_with(
            cache,
            &argv,
            &[
                ("WRENN_REQUIRE_KVM", "1"),
                (crate::postgres::URL_ENV, &postgres_url),
            ],
            &mut tee,
            Some(VM_PHASE_CPUS),
            Some(VM_PHASE_TIMEOUT),
            Some(VM_PHASE_QUIET),
            true,
        );
        match run {
            Err(e)
                if attempt < VM_PHASE_ATTEMPTS
                    && matches!(
                        e.downcast_ref::<wrenn_hostvm::HostVmError>(),
                        Some(wrenn_hostvm::HostVmError::Stalled { .. })
                    ) =>
            {
                tee.flush()?;
                remaining.retain(|b| !tee.finished.contains(&b.target));
                tee.forget_unfinished();
                eprintln!(
                    "==> {e}; running the {} unfinished VM test binaries again (attempt {})",
                    remaining.len(),
                    attempt + 1
                );
                attempt += 1;
            }
            other => break other?,
        }
    };
    tee.flush()?;
    let mut tally = tee.total();
    if code != 0 && tally.failed == 0 {
        eprintln!("the VM test phase exited with {code}");
        tally.broken += 1;
    }
    Ok(tally)
}

/// Inside the host VM: runs the listed binaries and exits non-zero if any failed.
pub fn run_manifest(args: RunArgs) -> Result<ExitCode> {
    let text = std::fs::read(&args.manifest)
        .with_context(|| format!("reading {}", args.manifest.display()))?;
    let binaries: Vec<TestBinary> = serde_json::from_slice(&text)?;
    let tally = run_binaries(
        &binaries,
        args.filter.as_deref(),
        &[],
        &mut std::io::stdout(),
    );
    Ok(if tally.failed + tally.broken == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Passes output through while counting libtest results in it, per binary (`run_binaries`
/// starts each with a `---- TARGET (PACKAGE)` line).
struct TallyWriter<W: Write> {
    inner: W,
    line: Vec<u8>,
    /// Binaries whose summary line was seen.
    finished: Vec<String>,
    /// Their results.
    finished_tally: Tally,
    current: Option<String>,
    current_tally: Tally,
}

impl<W: Write> TallyWriter<W> {
    fn new(inner: W) -> Self {
        TallyWriter {
            inner,
            line: Vec::new(),
            finished: Vec::new(),
            finished_tally: Tally::default(),
            current: None,
            current_tally: Tally::default(),
        }
    }

    fn scan_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if let Some(header) = line.strip_prefix("---- ") {
            self.forget_unfinished();
            self.current = header.split_whitespace().next().map(str::to_owned);
            return;
        }
        self.current_tally.scan(&line);
        if line.trim().starts_with("test result: ") {
            self.finished_tally
                .add(std::mem::take(&mut self.current_tally));
            self.finished.extend(self.current.take());
        }
    }

    /// Drops what the binary cut off by a stall had printed: it runs again.
    fn forget_unfinished(&mut self) {
        self.current = None;
        self.current_tally = Tally::default();
    }

    fn total(&self) -> Tally {
        let mut total = self.finished_tally;
        total.add(self.current_tally);
        total
    }
}

impl<W: Write> Write for TallyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.scan_line();
            } else {
                self.line.push(b);
            }
        }
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.scan_line();
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tally_scan_reads_libtest_summary() {
        let mut t = Tally::default();
        t.scan("test result: ok. 5 passed; 1 failed; 2 ignored; 0 measured; 3 filtered out; finished in 0.01s");
        t.scan("running 8 tests");
        assert_eq!((t.passed, t.failed, t.skipped), (5, 1, 2));
    }

    #[test]
    fn test_tally_writer_keeps_finished_binaries_and_forgets_a_cut_one() {
        let mut tee = TallyWriter::new(Vec::new());
        let out = "---- vm_a (p)\nrunning 2 tests\ntest x ... ok\n\
            test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
            ---- vm_b (p)\nrunning 3 tests\n\
            test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n\
            ---- vm_c (p)\nrunning 1 tests\ntest y ... ok\n";
        tee.write_all(out.as_bytes()).unwrap();
        tee.flush().unwrap();
        assert_eq!(tee.finished, ["vm_a", "vm_b"]);
        let t = tee.total();
        assert_eq!((t.passed, t.failed), (3, 2));
        tee.forget_unfinished();
        tee.write_all(b"---- vm_c (p)\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n")
            .unwrap();
        assert_eq!(tee.finished, ["vm_a", "vm_b", "vm_c"]);
        assert_eq!(tee.total().passed, 4);
    }

    #[test]
    fn test_package_name_from_package_id() {
        assert_eq!(
            package_name("path+file:///work/main/crates/image#wrenn-image@0.1.0"),
            "wrenn-image"
        );
        assert_eq!(package_name("path+file:///work/main/xtask#0.1.0"), "xtask");
    }
}
