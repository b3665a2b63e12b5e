//! `cargo xtask bench NAME`: benchmarks. Each prints `BENCH <name> <metric>=<value><unit>`
//! lines and ends with one `RESULT <name> ...` line: median, p99 and the ratio against the
//! baseline measured in the same run (these machines are noisy; compare within one run).
//!
//! `vmm`: wrenn-vmm against QEMU microvm on the same kernel and images (see `bench_vmm.rs`).
//!
//! `snapshot`: wrenn-vmm's snapshots (restore from a file and through wrenn-pager, Diff size
//! and time, memory of lazy clones) against QEMU's migration to a file (see
//! `bench_snapshot.rs`).
//!
//! `envd`: envd's exec round trip, stdout streaming and `/files` throughput against doing the
//! same directly on the host (see `bench_envd.rs`).
//!
//! `agent`: the host agent's create (beside the raw restore), exec, pause, resume, parallel
//! creates and idle memory, in one host VM run (see `bench_agent.rs`).
//!
//! `api`: the control plane's create and exec beside the agent's and envd's own, and its list
//! throughput with 1000 sandboxes on SQLite and PostgreSQL (see `bench_api.rs`).
//!
//! `e2b`: the official E2B Python SDK's create-and-run and run against a release `wrenn up`,
//! beside Wrenn's own REST API from the same Python process (see `bench_e2b.rs`).
//!
//! `guest`: the foundation's baselines: kernel and image build times and sizes (as recorded
//! when they were built, or rebuilt now with `--rebuild`), the host VM's boot to a running
//! command, and our guest's boot to its ready marker under QEMU microvm on the host VM's KVM,
//! against the same guest under QEMU's software emulation directly on this machine.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wrenn_image::cache::Cache;
use wrenn_image::kernel;
use wrenn_image::qemu::{Accel, Boot};
use wrenn_image::rootfs::{self, ImageKind, READY_MARKER};

use wrenn_image::guest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Benchmark to run: `guest`, `vmm`, `snapshot`, `envd`, `agent`, `api` or `e2b`.
    name: String,
    /// Samples per measurement (default: 5 for `guest`, 10 for `vmm` and `snapshot`, 20 for
    /// `api` and `e2b`; for `envd` the throughput rounds, default 3).
    #[arg(long)]
    runs: Option<usize>,
    /// Rebuild the kernel and images first, so their build times are measured now.
    #[arg(long)]
    rebuild: bool,
    /// Internal: measure guest boots on this machine's KVM and print SAMPLE lines.
    #[arg(long, hide = true)]
    inner: bool,
}

pub fn run(cache: &Cache, args: Args) -> Result<ExitCode> {
    match args.name.as_str() {
        "guest" if args.inner => guest_boot_samples(cache, guest_runs(&args), Accel::Kvm),
        "guest" => bench_guest(cache, &args),
        "vmm" if args.inner => crate::bench_vmm::inner(cache, args.runs),
        "vmm" => crate::bench_vmm::outer(cache, args.runs),
        "snapshot" if args.inner => crate::bench_snapshot::inner(cache, args.runs),
        "snapshot" => crate::bench_snapshot::outer(cache, args.runs),
        "envd" => crate::bench_envd::run(args.runs),
        "agent" if args.inner => crate::bench_agent::inner(args.runs),
        "agent" => crate::bench_agent::outer(cache, args.runs),
        "api" if args.inner => crate::bench_api::inner(args.runs),
        "api" => crate::bench_api::outer(cache, args.runs),
        "e2b" => crate::bench_e2b::run(cache, args.runs),
        other => {
            bail!(
                "unknown benchmark {other:?}; available: guest, vmm, snapshot, envd, agent, api, e2b"
            )
        }
    }
}

fn guest_runs(args: &Args) -> usize {
    args.runs.unwrap_or(5)
}

fn bench_guest(cache: &Cache, args: &Args) -> Result<ExitCode> {
    let runs = guest_runs(args);
    let built = guest::build(cache, &[], args.rebuild)?;
    wrenn_image::packages::ensure(wrenn_image::qemu::PACKAGES)?;
    let (Some(k), Some(test), Some(base)) = (&built.kernel, &built.test, &built.base) else {
        bail!("guest build returned no artifacts");
    };
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!("BENCH guest kernel_build={:.1}s", k.manifest.build_seconds);
    println!("BENCH guest kernel_size={:.1}MiB", mib(k.size()));
    for (name, e) in [("test", test), ("base", base)] {
        println!(
            "BENCH guest {name}_image_build={:.1}s",
            e.manifest.build_seconds
        );
        println!(
            "BENCH guest {name}_image_size={}MiB",
            e.manifest
                .notes
                .get("image_mib")
                .map_or("?", String::as_str)
        );
        println!(
            "BENCH guest {name}_image_allocated={}MiB",
            e.manifest
                .notes
                .get("allocated_mib")
                .map_or("?", String::as_str)
        );
    }

    // Baseline: the same guest under software emulation, directly on this machine.
    let (tcg, tcg_uptime) = boot_samples(cache, runs, Accel::Tcg)?;
    print_stats("guest", "tcg_boot_to_marker", &tcg);
    print_stats("guest", "tcg_guest_uptime_at_marker", &tcg_uptime);

    // Host VM: launch to a command running inside, then (once) our guest on its KVM.
    let mut hostvm_ready = Vec::new();
    let mut kvm = Vec::new();
    let mut kvm_uptime = Vec::new();
    for i in 0..runs {
        let started = Instant::now();
        if i == 0 {
            let mut capture = SampleCapture::default();
            let exe = std::env::current_exe()?.into_os_string();
            let argv = [
                exe,
                "bench".into(),
                "guest".into(),
                "--inner".into(),
                "--runs".into(),
                runs.to_string().into(),
            ];
            let code = crate::hostvm::run_argv(cache, &argv, &[], &mut capture)?;
            if code != 0 {
                bail!("the boot benchmark inside the host VM failed ({code})");
            }
            kvm = capture.samples.iter().map(|s| s.0).collect();
            kvm_uptime = capture.samples.iter().map(|s| s.1).collect();
        } else {
            let code = crate::hostvm::run_argv(cache, &["true".into()], &[], &mut std::io::sink())?;
            if code != 0 {
                bail!("`true` inside the host VM exited with {code}");
            }
            hostvm_ready.push(started.elapsed());
        }
    }
    print_stats("guest", "hostvm_run_true", &hostvm_ready);
    print_stats("guest", "kvm_boot_to_marker", &kvm);
    print_stats("guest", "kvm_guest_uptime_at_marker", &kvm_uptime);
    let (kvm_med, tcg_med) = (median(&kvm), median(&tcg));
    println!(
        "RESULT guest kvm_boot_median={:.0}ms kvm_boot_p99={:.0}ms kvm_guest_uptime_median={:.0}ms tcg_baseline_median={:.0}ms ratio={:.2}x hostvm_run_true_median={:.0}ms kernel_build={:.0}s",
        ms(kvm_med),
        ms(p99(&kvm)),
        ms(median(&kvm_uptime)),
        ms(tcg_med),
        kvm_med.as_secs_f64() / tcg_med.as_secs_f64(),
        ms(median(&hostvm_ready)),
        k.manifest.build_seconds,
    );
    Ok(ExitCode::SUCCESS)
}

/// Boots the test image `runs` times; returns the times from QEMU's start to the ready marker
/// and the guest's own uptime at the marker.
fn boot_samples(
    cache: &Cache,
    runs: usize,
    accel: Accel,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let kernel = kernel::find(cache)?;
    let image = rootfs::find(cache, ImageKind::Test)?;
    let mut samples = Vec::with_capacity(runs);
    let mut uptimes = Vec::with_capacity(runs);
    for _ in 0..runs {
        let boot = Boot::new(
            &kernel.file("vmlinux"),
            &image.file(rootfs::IMAGE_FILE),
            accel,
        );
        let outcome = boot.run()?;
        let ready = outcome
            .ready_after
            .with_context(|| format!("no {READY_MARKER} from the guest:\n{}", outcome.console))?;
        samples.push(ready);
        uptimes.push(
            outcome
                .guest_uptime
                .context("the ready marker carries no uptime")?,
        );
    }
    Ok((samples, uptimes))
}

/// Inside the host VM: print one SAMPLE line per boot for the outer process.
fn guest_boot_samples(cache: &Cache, runs: usize, accel: Accel) -> Result<ExitCode> {
    let (ready, uptime) = boot_samples(cache, runs, accel)?;
    for (ready, uptime) in ready.iter().zip(&uptime) {
        println!("SAMPLE {:.3} {:.3}", ms(*ready), ms(*uptime));
    }
    Ok(ExitCode::SUCCESS)
}

/// Collects SAMPLE lines from the inner run, passing everything else through.
#[derive(Default)]
struct SampleCapture {
    line: Vec<u8>,
    /// (QEMU start to marker, guest uptime at marker)
    samples: Vec<(Duration, Duration)>,
}

impl Write for SampleCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&self.line).into_owned();
            match parse_sample(&line) {
                Some(sample) => self.samples.push(sample),
                None => println!("{line}"),
            }
            self.line.clear();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `SAMPLE <ready ms> <uptime ms>`.
fn parse_sample(line: &str) -> Option<(Duration, Duration)> {
    let mut fields = line.trim().strip_prefix("SAMPLE ")?.split_whitespace();
    let mut next = || -> Option<Duration> {
        Duration::try_from_secs_f64(fields.next()?.parse::<f64>().ok()? / 1000.0).ok()
    };
    Some((next()?, next()?))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sorted(samples: &[Duration]) -> Vec<Duration> {
    let mut s = samples.to_vec();
    s.sort();
    s
}

fn median(samples: &[Duration]) -> Duration {
    let s = sorted(samples);
    if s.is_empty() {
        Duration::ZERO
    } else {
        s[s.len() / 2]
    }
}

/// Nearest-rank 99th percentile (the maximum for fewer than 100 samples).
fn p99(samples: &[Duration]) -> Duration {
    let s = sorted(samples);
    if s.is_empty() {
        return Duration::ZERO;
    }
    let rank = (s.len() * 99).div_ceil(100);
    s[rank.saturating_sub(1)]
}

fn print_stats(bench: &str, metric: &str, samples: &[Duration]) {
    let s = sorted(samples);
    let (Some(min), Some(max)) = (s.first(), s.last()) else {
        return;
    };
    for (stat, value) in [
        ("median", median(&s)),
        ("p99", p99(&s)),
        ("min", *min),
        ("max", *max),
    ] {
        println!("BENCH {bench} {metric}_{stat}={:.0}ms", ms(value));
    }
    println!("BENCH {bench} {metric}_samples={}", s.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_sample_reads_both_fields() {
        assert_eq!(
            parse_sample("SAMPLE 1500.000 820.500"),
            Some((Duration::from_millis(1500), Duration::from_micros(820_500)))
        );
        assert_eq!(parse_sample("SAMPLE 1500"), None);
        assert_eq!(parse_sample("BENCH x"), None);
    }

    #[test]
    fn test_median_and_p99_of_five() {
        let s: Vec<_> = [5, 1, 4, 2, 3]
            .iter()
            .map(|&v| Duration::from_millis(v))
            .collect();
        assert_eq!(median(&s), Duration::from_millis(3));
        assert_eq!(p99(&s), Duration::from_millis(5));
    }
}
