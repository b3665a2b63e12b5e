//! `cargo xtask bench vmm`: wrenn-vmm against QEMU microvm, side by side in one host VM run.
//!
//! The outer process (here) builds wrenn-vmm in release mode, makes sure the guest kernel and
//! images exist, then re-runs itself with `--inner` where a usable KVM exists: inside the host
//! VM with one vCPU, so that its clock is the TSC (the host VM loads vhost_vsock, which QEMU's
//! vsock needs). The inner process
//! prints `SAMPLE <monitor> <metric> <value>` lines (and `#` comments, passed through); the outer
//! one turns them into `BENCH vmm ...` lines and one `RESULT vmm ...` line.
//!
//! Both monitors boot the same kernel and image with 1 vCPU, 256 MiB and the same kernel
//! command line (QEMU's reference line from `wrenn_image::qemu::Boot` plus the microVM
//! extras; wrenn-vmm adds `root=/dev/vda ro` itself), their console on a pipe read the same
//! way, the kernel and test image copied to the host VM's tmpfs first. Samples alternate
//! between the two monitors (and which goes first) after one unmeasured warm-up boot each.
//!
//! 1. boot: spawning the monitor to `WRENN_GUEST_READY` on the console (wrenn-vmm from
//!    `--config-file`, so neither needs API calls); guest_uptime: the guest's own uptime at the
//!    marker; startup: the difference, i.e. the monitor's start-up plus the guest's earliest
//!    boot before its clock runs. exec: `--version` to exit, the process-start floor of each.
//! 2. api_ready: spawning `wrenn-vmm --api-sock` until `GET /` answers 200; api_boot: the same
//!    VM booted through the API (spawn, four requests, marker).
//! 3. overhead: 2 s after the marker, the monitor process's Rss from /proc/PID/smaps minus the
//!    Rss of the guest-RAM mapping (see [`Memory::parse`]); overhead_private counts only
//!    private pages (shared libraries' shared pages left out).
//! 4. vsock (base image, python3 echo/sink/source servers in the guest): round trips of 64 bytes
//!    through `CONNECT <port>` (wrenn-vmm) or AF_VSOCK (QEMU vhost-vsock), and 64 MiB each way.
//! 5. block (same boots): `dd` with O_DIRECT, bs=1M, over a 256 MiB data drive backed by a file
//!    on the host VM's tmpfs, through the host page cache in both monitors (wrenn-vmm
//!    `cache_type: Writeback`, QEMU `cache=writeback,aio=threads`).
//!
//! `WRENN_BENCH_VMM=/path/to/wrenn-vmm` measures that binary instead of a fresh release build.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use wrenn_hostvm::RunOptions;
use wrenn_image::cache::Cache;
use wrenn_image::qemu::{Accel, Boot};
use wrenn_image::rootfs::{self, ImageKind, READY_MARKER};
use wrenn_image::{guest, kernel};

/// Boot, memory and API samples per monitor unless `--runs` says otherwise.
const DEFAULT_RUNS: usize = 10;
/// Base-image boots per monitor for the vsock and block measurements.
const IO_ROUNDS: usize = 3;
const VCPUS: u8 = 1;
const MEM_MIB: u32 = 256;
/// Idle time between the marker and reading smaps.
const SETTLE: Duration = Duration::from_secs(2);
/// Nested guests are slow; a boot that takes this long is broken.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The whole inner run (host VM boot included).
const HOSTVM_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(20);
pub(crate) const GUEST_CID: u32 = 3;
pub(crate) const ECHO_PORT: u32 = 5000;
const SINK_PORT: u32 = 5001;
const SOURCE_PORT: u32 = 5002;
const PING_WARMUP: usize = 50;
const PING_COUNT: usize = 1000;
const PING_BYTES: usize = 64;
const STREAM_MIB: u64 = 64;
const CHUNK: usize = 1 << 20;
const DATA_MIB: u64 = 256;
/// Kernel command line parameters both monitors get on top of QEMU's reference line.
pub(crate) const MICROVM_CMDLINE: &str = " pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

/// Outer -> inner: the wrenn-vmm binary to measure.
pub(crate) const VMM_ENV: &str = "WRENN_BENCH_VMM";

/// Guest side of the I/O rounds (base image, run by wrenn-init): find the drive whose serial is
/// `data`, write it and read it back with O_DIRECT, then serve vsock: 5000 echoes, 5001 takes
/// an 8-byte big-endian length and that many bytes and answers `done`, 5002 takes a length and
/// sends that many bytes. `{mib}` is the drive's size. Kept short: it travels base64-encoded on
/// the kernel command line (2048 bytes in all).
const IO_SCRIPT: &str = r#"for d in /sys/block/vd*;do [ "$(cat $d/serial 2>/dev/null)" = data ]&&D=/dev/${d##*/};done
[ -b "$D" ]||{ echo BLK_ERR no drive with serial data;exit 1;}
echo BLK_W $(dd if=/dev/zero of=$D bs=1M count={mib} oflag=direct conv=fsync 2>&1|tail -n1)
echo BLK_R $(dd if=$D of=/dev/null bs=1M iflag=direct 2>&1|tail -n1)
cat >/tmp/v.py<<'E'
import socket as S,threading as T
def L(p,f):
 s=S.socket(S.AF_VSOCK,S.SOCK_STREAM);s.bind((S.VMADDR_CID_ANY,p));s.listen(4)
 def a():
  while 1:c,_=s.accept();T.Thread(target=f,args=(c,),daemon=1).start()
 T.Thread(target=a,daemon=1).start()
def n(c):
 b=b''
 while len(b)<8:
  d=c.recv(8-len(b))
  if not d:raise EOFError
  b+=d
 return int.from_bytes(b,'big')
def echo(c):
 while 1:
  d=c.recv(65536)
  if not d:break
  c.sendall(d)
def sink(c):
 k=n(c);m=memoryview(bytearray(1<<20))
 while k>0:
  r=c.recv_into(m,min(k,1<<20))
  if not r:break
  k-=r
 c.sendall(b'done')
def src(c):
 k=n(c);z=bytes(1<<20)
 while k>0:
  w=min(k,1<<20);c.sendall(z[:w]);k-=w
 c.close()
L(5000,echo);L(5001,sink);L(5002,src)
print('VSOCK_READY',flush=1)
T.Event().wait()
E
exec python3 /tmp/v.py
"#;

/// The two monitors compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Monitor {
    Wrenn,
    Qemu,
}

impl Monitor {
    const BOTH: [Monitor; 2] = [Monitor::Wrenn, Monitor::Qemu];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Monitor::Wrenn => "wrenn",
            Monitor::Qemu => "qemu",
        }
    }

    /// Prefix of the monitor's metrics in BENCH and RESULT lines: wrenn-vmm's are unprefixed.
    fn prefix(self) -> &'static str {
        match self {
            Monitor::Wrenn => "",
            Monitor::Qemu => "qemu_",
        }
    }

    fn parse(s: &str) -> Option<Monitor> {
        Monitor::BOTH.into_iter().find(|m| m.name() == s)
    }
}

// ---------------------------------------------------------------------------------------------
// Outer: build, run inside the host VM, report.
// ---------------------------------------------------------------------------------------------

pub fn outer(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    guest::build(cache, &[], false).context("building the guest kernel and images")?;
    wrenn_image::packages::ensure(wrenn_image::qemu::PACKAGES)?;
    let vmm = match std::env::var_os(VMM_ENV) {
        Some(path) => PathBuf::from(path),
        None => build_vmm()?,
    };
    println!("# wrenn-vmm: {}", vmm.display());
    let vmm_path = path_string(&vmm)?;
    let samples = run_inner(
        cache,
        "vmm",
        runs,
        &[(VMM_ENV, vmm_path.as_str())],
        HOSTVM_TIMEOUT,
        Duration::from_secs(180),
    )?;
    report(&samples)?;
    Ok(ExitCode::SUCCESS)
}

/// Samples of one inner run, by monitor and metric.
pub(crate) type Samples = BTreeMap<(Monitor, String), Vec<f64>>;

/// Runs `cargo xtask bench NAME --inner --runs RUNS` where a usable KVM exists (inside the host
/// VM with one vCPU: its clock is then the TSC; with more it is 4 ms jiffies), with `env` set,
/// and returns its SAMPLE lines (everything else it prints is passed through). `timeout` limits
/// the whole run (host VM boot included); `quiet` limits silence: the emulated host VM can
/// stall, and minutes without output end the run with a clear error instead of waiting for
/// the overall limit.
pub(crate) fn run_inner(
    cache: &Cache,
    name: &str,
    runs: usize,
    env: &[(&str, &str)],
    timeout: Duration,
    quiet: Duration,
) -> Result<Samples> {
    let placement = wrenn_hostvm::decide()?.placement;
    let argv: Vec<OsString> = vec![
        std::env::current_exe()?.into_os_string(),
        "bench".into(),
        name.into(),
        "--inner".into(),
        "--runs".into(),
        runs.to_string().into(),
    ];
    let mut options = RunOptions::new(placement).with_overrides(Some(1), None, Some(timeout));
    options.quiet_timeout = Some(quiet);
    let spec = crate::hostvm::spec(cache, &argv, env);
    let mut capture = SampleCapture::default();
    let code = wrenn_hostvm::run(&spec, &options, cache, &mut capture, &mut std::io::stderr())?;
    capture.finish();
    if code != 0 {
        bail!("the {name} benchmark inside the host VM failed (exit code {code}); see above");
    }
    Ok(capture.samples)
}

pub(crate) fn path_string(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}

/// `cargo build --release` of the wrenn-vmm binary; returns its path.
fn build_vmm() -> Result<PathBuf> {
    build_release("wrenn-vmm", "wrenn-vmm")
}

/// `cargo build --release` of binary `bin` of package `package`; returns its path.
pub(crate) fn build_release(package: &str, bin: &str) -> Result<PathBuf> {
    eprintln!("==> building {bin} (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "-p", package, "--bin", bin])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    ensure!(
        out.status.success(),
        "building {bin} in release mode failed ({})",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo build named no {bin} executable"))
}

/// Collects the inner run's SAMPLE lines, passing everything else through.
#[derive(Default)]
struct SampleCapture {
    line: Vec<u8>,
    samples: Samples,
}

impl SampleCapture {
    fn take_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        match parse_sample(&line) {
            Some((monitor, metric, value)) => self
                .samples
                .entry((monitor, metric))
                .or_default()
                .push(value),
            None => println!("{line}"),
        }
    }

    fn finish(&mut self) {
        if !self.line.is_empty() {
            self.take_line();
        }
    }
}

impl Write for SampleCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.take_line();
            } else {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// `SAMPLE <monitor> <metric> <value>`.
fn parse_sample(line: &str) -> Option<(Monitor, String, f64)> {
    let mut fields = line.trim().strip_prefix("SAMPLE ")?.split_whitespace();
    let monitor = Monitor::parse(fields.next()?)?;
    let metric = fields.next()?.to_owned();
    let value: f64 = fields.next()?.parse().ok()?;
    if fields.next().is_some() || !value.is_finite() {
        return None;
    }
    Some((monitor, metric, value))
}

/// Order statistics of one metric's samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) count: usize,
}

impl Stats {
    pub(crate) fn of(samples: &[f64]) -> Option<Stats> {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let (&min, &max) = (s.first()?, s.last()?);
        // Nearest rank: the maximum for fewer than 100 samples.
        let rank = (s.len() * 99).div_ceil(100);
        Some(Stats {
            median: s[s.len() / 2],
            p99: s[rank.saturating_sub(1)],
            min,
            max,
            count: s.len(),
        })
    }
}

/// How a metric is printed.
#[derive(Debug, Clone, Copy)]
struct Metric {
    key: &'static str,
    unit: &'static str,
    /// Print p99, min and max too (for metrics with many samples).
    spread: bool,
}

const fn metric(key: &'static str, unit: &'static str, spread: bool) -> Metric {
    Metric { key, unit, spread }
}

/// Every metric the inner run reports, in print order.
const METRICS: &[Metric] = &[
    metric("boot", "ms", true),
    metric("guest_uptime", "ms", true),
    metric("startup", "ms", true),
    metric("exec", "ms", true),
    metric("api_ready", "ms", true),
    metric("api_boot", "ms", true),
    metric("rss_total", "MiB", false),
    metric("rss_guest_ram", "MiB", false),
    metric("overhead", "MiB", false),
    metric("overhead_private", "MiB", false),
    // Per I/O round, the median and p99 of its round trips; printed: medians over rounds.
    metric("vsock_rtt", "us", false),
    metric("vsock_rtt_p99", "us", false),
    metric("vsock_h2g", "MiB/s", false),
    metric("vsock_g2h", "MiB/s", false),
    metric("blk_write", "MiB/s", false),
    metric("blk_read", "MiB/s", false),
];

pub(crate) fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "ms" | "MiB" | "MiB/s" => format!("{value:.1}{unit}"),
        "us" => format!("{value:.0}{unit}"),
        _ => format!("{value:.2}{unit}"),
    }
}

/// Prints the BENCH lines and the RESULT line.
fn report(samples: &Samples) -> Result<()> {
    let stats =
        |m: Monitor, key: &str| samples.get(&(m, key.to_owned())).and_then(|v| Stats::of(v));
    for metric in METRICS {
        for monitor in Monitor::BOTH {
            let Some(s) = stats(monitor, metric.key) else {
                continue;
            };
            let name = format!("{}{}", monitor.prefix(), metric.key);
            let value = |v: f64| format_value(v, metric.unit);
            println!("BENCH vmm {name}_median={}", value(s.median));
            if metric.spread {
                println!("BENCH vmm {name}_p99={}", value(s.p99));
            }
            println!("BENCH vmm {name}_min={}", value(s.min));
            println!("BENCH vmm {name}_max={}", value(s.max));
            println!("BENCH vmm {name}_samples={}", s.count);
        }
        if let (Some(w), Some(q)) = (
            stats(Monitor::Wrenn, metric.key),
            stats(Monitor::Qemu, metric.key),
        ) && q.median > 0.0
        {
            println!(
                "BENCH vmm {}_ratio={}",
                metric.key,
                format_value(w.median / q.median, "x")
            );
        }
    }

    let need = |m: Monitor, key: &str| {
        stats(m, key)
            .with_context(|| format!("the inner run reported no {} samples of {key}", m.name()))
    };
    let boot = need(Monitor::Wrenn, "boot")?;
    let qemu_boot = need(Monitor::Qemu, "boot")?;
    let overhead = need(Monitor::Wrenn, "overhead")?;
    let qemu_overhead = need(Monitor::Qemu, "overhead")?;
    let mut result = format!(
        "RESULT vmm boot_median={} boot_p99={} qemu_boot_median={} boot_ratio={} \
         overhead={} qemu_overhead={} overhead_ratio={}",
        format_value(boot.median, "ms"),
        format_value(boot.p99, "ms"),
        format_value(qemu_boot.median, "ms"),
        format_value(boot.median / qemu_boot.median, "x"),
        format_value(overhead.median, "MiB"),
        format_value(qemu_overhead.median, "MiB"),
        format_value(overhead.median / qemu_overhead.median, "x"),
    );
    for key in ["guest_uptime", "startup", "exec", "api_ready", "api_boot"] {
        for monitor in Monitor::BOTH {
            if let Some(s) = stats(monitor, key) {
                result.push_str(&format!(
                    " {}{key}_median={}",
                    monitor.prefix(),
                    format_value(s.median, "ms")
                ));
            }
        }
    }
    // Per I/O round: the round's median and p99 round trip; the medians over rounds.
    for (key, name, unit) in [
        ("vsock_rtt", "vsock_rtt_median", "us"),
        ("vsock_rtt_p99", "vsock_rtt_p99", "us"),
        ("vsock_h2g", "vsock_h2g", "MiB/s"),
        ("vsock_g2h", "vsock_g2h", "MiB/s"),
        ("blk_read", "blk_read", "MiB/s"),
        ("blk_write", "blk_write", "MiB/s"),
    ] {
        for monitor in Monitor::BOTH {
            if let Some(s) = stats(monitor, key) {
                result.push_str(&format!(
                    " {}{name}={}",
                    monitor.prefix(),
                    format_value(s.median, unit)
                ));
            }
        }
    }
    println!("{result}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inner: the measurements, where a usable KVM exists.
// ---------------------------------------------------------------------------------------------

pub(crate) fn sample(monitor: Monitor, metric: &str, value: f64) {
    println!("SAMPLE {} {metric} {value:.3}", monitor.name());
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn mib_of_kib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Files of one inner run, in a private directory under /tmp (the host VM's tmpfs), removed
/// when dropped.
struct Setup {
    dir: PathBuf,
    vmm: PathBuf,
    kernel: PathBuf,
    test_image: PathBuf,
    base_image: PathBuf,
    /// Why QEMU cannot have a vsock device here, if it cannot.
    qemu_vsock: std::result::Result<(), String>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    fn new(cache: &Cache) -> Result<Setup> {
        ensure!(
            Path::new("/dev/kvm").exists(),
            "no /dev/kvm here; run `cargo xtask bench vmm` (not --inner) to get one"
        );
        let vmm_src = PathBuf::from(
            std::env::var_os(VMM_ENV).with_context(|| format!("{VMM_ENV} is not set"))?,
        );
        let dir = std::env::temp_dir().join(format!("wrenn-bench-vmm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, dropping `setup` removes the directory.
        let mut setup = Setup {
            vmm: dir.join("wrenn-vmm"),
            kernel: dir.join("vmlinux"),
            test_image: dir.join("test.ext4"),
            base_image: rootfs::find(cache, ImageKind::Base)?.file(rootfs::IMAGE_FILE),
            dir,
            qemu_vsock: Ok(()),
        };
        // Off the 9p shares: both monitors read their files from tmpfs. (The 2 GiB sparse base
        // image stays where it is; only its boots' I/O numbers use it, not their timing.)
        let kernel = kernel::find(cache)?.file("vmlinux");
        let test_image = rootfs::find(cache, ImageKind::Test)?.file(rootfs::IMAGE_FILE);
        for (from, to) in [
            (&vmm_src, &setup.vmm),
            (&kernel, &setup.kernel),
            (&test_image, &setup.test_image),
        ] {
            fs::copy(from, to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        setup.qemu_vsock = load_vhost_vsock();
        Ok(setup)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Makes sure /dev/vhost-vsock exists (the host VM loads the module at boot; elsewhere,
/// modprobe): QEMU's vsock device needs it. The error says why QEMU's vsock cannot be measured.
pub(crate) fn load_vhost_vsock() -> std::result::Result<(), String> {
    let dev = Path::new("/dev/vhost-vsock");
    if !dev.exists() {
        let _ = Command::new("modprobe")
            .args(["-q", "vhost_vsock"])
            .stderr(Stdio::null())
            .status();
    }
    // devtmpfs creates the node shortly after the module registers it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !dev.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "no /dev/vhost-vsock and `modprobe vhost_vsock` did not make one (kernel {})",
                fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn inner(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    let setup = Setup::new(cache)?;
    describe_environment(&setup);

    eprintln!("==> boots: 1 warm-up + {runs} per monitor, alternating");
    // One unmeasured boot each: page cache, KVM module state, lazy kernel paths.
    for monitor in Monitor::BOTH {
        boot_sample(&setup, monitor, "warmup", false)
            .with_context(|| format!("warm-up boot of {}", monitor.name()))?;
    }
    for i in 0..runs {
        for monitor in alternating(i) {
            let s = boot_sample(&setup, monitor, &format!("boot-{i}"), true)
                .with_context(|| format!("boot {i} of {}", monitor.name()))?;
            sample(monitor, "boot", ms(s.ready));
            sample(monitor, "guest_uptime", ms(s.uptime));
            sample(monitor, "startup", ms(s.ready.saturating_sub(s.uptime)));
            if let Some(mem) = s.memory {
                sample(monitor, "rss_total", mib_of_kib(mem.total_rss));
                sample(monitor, "rss_guest_ram", mib_of_kib(mem.guest_rss));
                sample(monitor, "overhead", mib_of_kib(mem.overhead()));
                sample(
                    monitor,
                    "overhead_private",
                    mib_of_kib(mem.overhead_private()),
                );
            }
        }
    }

    eprintln!("==> process start (--version), API ready, API-driven boots");
    for i in 0..runs {
        for monitor in alternating(i) {
            let exec = exec_sample(&setup, monitor)
                .with_context(|| format!("{} --version", monitor.name()))?;
            sample(monitor, "exec", ms(exec));
        }
    }
    for i in 0..runs {
        let ready = api_ready_sample(&setup, i).with_context(|| format!("API sample {i}"))?;
        sample(Monitor::Wrenn, "api_ready", ms(ready));
    }
    for i in 0..runs {
        let boot = api_boot_sample(&setup, i).with_context(|| format!("API boot {i}"))?;
        sample(Monitor::Wrenn, "api_boot", ms(boot));
    }

    eprintln!("==> block and vsock: {IO_ROUNDS} base-image boots per monitor");
    if let Err(reason) = &setup.qemu_vsock {
        println!("# QEMU vsock not measured (wrenn-vmm's numbers stand alone): {reason}");
    }
    for round in 0..IO_ROUNDS {
        for monitor in alternating(round) {
            io_round(&setup, monitor, round)
                .with_context(|| format!("I/O round {round} of {}", monitor.name()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Both monitors, the first one changing from round to round.
fn alternating(round: usize) -> [Monitor; 2] {
    if round.is_multiple_of(2) {
        [Monitor::Wrenn, Monitor::Qemu]
    } else {
        [Monitor::Qemu, Monitor::Wrenn]
    }
}

/// Spawning the monitor with `--version` until it exits: process creation, dynamic loading
/// and runtime start, the floor under its start-up.
fn exec_sample(setup: &Setup, monitor: Monitor) -> Result<Duration> {
    let mut cmd = match monitor {
        Monitor::Wrenn => Command::new(&setup.vmm),
        Monitor::Qemu => Command::new("qemu-system-x86_64"),
    };
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let started = Instant::now();
    let status = cmd.status()?;
    let took = started.elapsed();
    ensure!(status.success(), "exited with {status}");
    Ok(took)
}

fn describe_environment(setup: &Setup) {
    println!("{}", host_line());
    println!(
        "# guests: {VCPUS} vCPU, {MEM_MIB} MiB; cmdline: {}",
        qemu_boot(setup, &setup.test_image, "").cmdline()
    );
    println!(
        "# block: {DATA_MIB} MiB file on tmpfs; wrenn-vmm cache_type=Writeback (host page cache, \
         pread/pwrite), QEMU cache=writeback,aio=threads; guest dd bs=1M O_DIRECT"
    );
    println!(
        "# vsock: wrenn-vmm CONNECT over its unix socket, QEMU vhost-vsock-device over AF_VSOCK; \
         guest python3 servers; {PING_COUNT} x {PING_BYTES} B round trips, {STREAM_MIB} MiB each way"
    );
    println!(
        "# startup = boot - guest_uptime (monitor start-up + guest boot before its clock runs); \
         exec = `--version` to exit"
    );
}

/// `# host: kernel ..., N CPU(s), clocksource ...; QEMU ...`: where the monitors run.
pub(crate) fn host_line() -> String {
    let read = |p: &str| {
        fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "# host: kernel {}, {} CPU(s), clocksource {}; {}",
        read("/proc/sys/kernel/osrelease"),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        qemu_version().unwrap_or_else(|| "?".into()),
    )
}

/// The first line of `qemu-system-x86_64 --version`.
pub(crate) fn qemu_version() -> Option<String> {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
}

/// QEMU's reference boot of `rootfs` with this benchmark's size and `extra` on the command line.
fn qemu_boot(setup: &Setup, rootfs: &Path, extra: &str) -> Boot {
    let mut boot = Boot::new(&setup.kernel, rootfs, Accel::Kvm);
    boot.cpus = u32::from(VCPUS);
    boot.memory_mib = MEM_MIB;
    boot.extra_cmdline = format!("{MICROVM_CMDLINE}{extra}");
    boot.timeout = BOOT_TIMEOUT;
    boot
}

/// The same command line for wrenn-vmm, which adds `root=/dev/vda ro` for a read-only root drive.
pub(crate) fn wrenn_boot_args(boot: &Boot) -> Result<String> {
    let line = boot.cmdline();
    let root = " root=/dev/vda ro";
    ensure!(
        line.contains(root),
        "QEMU's command line has no {root:?}: {line}"
    );
    Ok(line.replacen(root, "", 1))
}

/// What one VM gets.
struct VmSpec<'a> {
    rootfs: &'a Path,
    /// Appended to the kernel command line (`wrenn_hold=1`, `wrenn_run=...`).
    extra_cmdline: String,
    data: Option<&'a Path>,
    /// wrenn-vmm: the vsock's unix socket; QEMU: a vhost-vsock device (the path is unused).
    vsock: Option<PathBuf>,
}

/// A running monitor process; killed when dropped.
pub(crate) struct Vm {
    pub(crate) monitor: Monitor,
    pub(crate) child: Child,
    pub(crate) started: Instant,
    lines: mpsc::Receiver<(Instant, String)>,
    console: String,
    log: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Vm {
    fn launch(setup: &Setup, monitor: Monitor, tag: &str, spec: &VmSpec) -> Result<Vm> {
        let log = setup.path(&format!("{tag}-{}.log", monitor.name()));
        let mut cmd = match monitor {
            Monitor::Wrenn => {
                let boot = qemu_boot(setup, spec.rootfs, &spec.extra_cmdline);
                let mut drives = vec![serde_json::json!({
                    "drive_id": "rootfs",
                    "path_on_host": spec.rootfs,
                    "is_root_device": true,
                    "is_read_only": true,
                })];
                if let Some(data) = spec.data {
                    drives.push(serde_json::json!({
                        "drive_id": "data",
                        "path_on_host": data,
                        "is_root_device": false,
                        "is_read_only": false,
                        "cache_type": "Writeback",
                    }));
                }
                let mut config = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": setup.kernel,
                        "boot_args": wrenn_boot_args(&boot)?,
                    },
                    "machine-config": {"vcpu_count": VCPUS, "mem_size_mib": MEM_MIB},
                    "drives": drives,
                });
                if let Some(uds) = &spec.vsock {
                    config["vsock"] = serde_json::json!({"guest_cid": GUEST_CID, "uds_path": uds});
                }
                let path = setup.path(&format!("{tag}.json"));
                fs::write(&path, config.to_string())
                    .with_context(|| format!("writing {}", path.display()))?;
                let mut cmd = Command::new(&setup.vmm);
                cmd.arg("--config-file").arg(&path).args(["--id", tag]);
                cmd
            }
            Monitor::Qemu => {
                let mut cmd = qemu_boot(setup, spec.rootfs, &spec.extra_cmdline).command();
                if let Some(data) = spec.data {
                    cmd.arg("-drive")
                        .arg(format!(
                            "id=data,file={},format=raw,if=none,cache=writeback,aio=threads",
                            data.display()
                        ))
                        .args(["-device", "virtio-blk-device,drive=data,serial=data"]);
                }
                if spec.vsock.is_some() {
                    cmd.args([
                        "-device",
                        &format!("vhost-vsock-device,guest-cid={GUEST_CID}"),
                    ]);
                }
                cmd
            }
        };
        let stderr =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", monitor.name()))?;
        Ok(Vm::watch(monitor, child, started, log))
    }

    /// Reads the console (the child's stdout) on a thread, stamping each line when it arrives.
    pub(crate) fn watch(monitor: Monitor, mut child: Child, started: Instant, log: PathBuf) -> Vm {
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_owned();
                    if tx.send((at, text)).is_err() {
                        return;
                    }
                }
            });
        }
        Vm {
            monitor,
            child,
            started,
            lines,
            console: String::new(),
            log,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `needle`; returns when it arrived and the line.
    pub(crate) fn wait_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.console.push_str(&line);
                    self.console.push('\n');
                    if line.contains(needle) {
                        return Ok((at, line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "{} exited ({status}) before {needle:?}\n{}",
                        self.monitor.name(),
                        self.tails()
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "no {needle:?} from {} within {timeout:?}\n{}",
                    self.monitor.name(),
                    self.tails()
                ),
            }
        }
    }

    pub(crate) fn tails(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        format!(
            "console (last lines):\n{}\n{} log (last lines):\n{}",
            wrenn_image::command::last_lines(&self.console, 20),
            self.monitor.name(),
            wrenn_image::command::last_lines(&log, 20)
        )
    }
}

/// One boot to the marker.
struct BootSample {
    ready: Duration,
    uptime: Duration,
    memory: Option<Memory>,
}

fn boot_sample(setup: &Setup, monitor: Monitor, tag: &str, memory: bool) -> Result<BootSample> {
    let spec = VmSpec {
        rootfs: &setup.test_image,
        extra_cmdline: " wrenn_hold=1".into(),
        data: None,
        vsock: None,
    };
    let mut vm = Vm::launch(setup, monitor, tag, &spec)?;
    let (at, line) = vm.wait_line(READY_MARKER, BOOT_TIMEOUT)?;
    let ready = at.duration_since(vm.started);
    let uptime = parse_uptime(&line).with_context(|| format!("no uptime in {line:?}"))?;
    let memory = if memory {
        std::thread::sleep(SETTLE);
        if let Ok(Some(status)) = vm.child.try_wait() {
            bail!(
                "{} exited ({status}) while idle\n{}",
                monitor.name(),
                vm.tails()
            );
        }
        Some(Memory::of(vm.pid(), u64::from(MEM_MIB) * 1024)?)
    } else {
        None
    };
    Ok(BootSample {
        ready,
        uptime,
        memory,
    })
}

/// `WRENN_GUEST_READY uptime=0.84` -> 0.84 s.
fn parse_uptime(line: &str) -> Option<Duration> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uptime="))?;
    Duration::try_from_secs_f64(value.parse().ok()?).ok()
}

/// How much larger than the guest's RAM its mapping may be after merging with a neighbour.
const MERGE_SLACK_KIB: u64 = 16 << 10;

/// A process's resident memory, split into the guest's RAM and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memory {
    total_rss: u64,
    total_private: u64,
    guest_rss: u64,
    guest_private: u64,
}

impl Memory {
    fn overhead(&self) -> u64 {
        self.total_rss.saturating_sub(self.guest_rss)
    }

    fn overhead_private(&self) -> u64 {
        self.total_private.saturating_sub(self.guest_private)
    }

    fn of(pid: u32, guest_kib: u64) -> Result<Memory> {
        let path = format!("/proc/{pid}/smaps");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Memory::parse(&text, guest_kib).with_context(|| format!("in {path}"))
    }

    /// From smaps text. The guest's RAM is an anonymous mapping of `guest_kib`, which the kernel
    /// may have merged with an adjacent anonymous mapping of the same protection (seen: a
    /// 132 KiB malloc arena), so the smallest anonymous mapping of at least that size (and at
    /// most [`MERGE_SLACK_KIB`] more) counts. Up to the merged extra of its Rss is charged to
    /// the monitor: the overhead is then an upper bound, off by at most that extra.
    fn parse(smaps: &str, guest_kib: u64) -> Result<Memory> {
        #[derive(Default)]
        struct Mapping {
            anonymous: bool,
            size: u64,
            rss: u64,
            private: u64,
        }
        let mut maps: Vec<Mapping> = Vec::new();
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if let Some((lo, hi)) = first.split_once('-')
                && u64::from_str_radix(lo, 16).is_ok()
                && u64::from_str_radix(hi, 16).is_ok()
            {
                // address perms offset dev inode [pathname]
                let path = words.nth(4).unwrap_or("");
                maps.push(Mapping {
                    anonymous: path.is_empty() || path.starts_with("[anon:"),
                    ..Mapping::default()
                });
                continue;
            }
            let (Some(map), Some(value)) = (maps.last_mut(), words.next()) else {
                continue;
            };
            let Ok(kib) = value.parse::<u64>() else {
                continue;
            };
            match first {
                "Size:" => map.size = kib,
                "Rss:" => map.rss = kib,
                "Private_Clean:" | "Private_Dirty:" => map.private += kib,
                _ => {}
            }
        }
        ensure!(!maps.is_empty(), "no mappings");
        let guest = maps
            .iter()
            .filter(|m| m.anonymous && (guest_kib..=guest_kib + MERGE_SLACK_KIB).contains(&m.size))
            .min_by_key(|m| (m.size, std::cmp::Reverse(m.rss)))
            .with_context(|| {
                format!(
                    "no anonymous mapping of {guest_kib} KiB or a little more (the guest's RAM)"
                )
            })?;
        let extra = guest.size - guest_kib;
        Ok(Memory {
            total_rss: maps.iter().map(|m| m.rss).sum(),
            total_private: maps.iter().map(|m| m.private).sum(),
            guest_rss: guest.rss.saturating_sub(extra),
            guest_private: guest.private.saturating_sub(extra),
        })
    }
}

/// Kills and reaps a child when dropped.
pub(crate) struct ChildGuard(pub(crate) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn spawn_api_vmm(setup: &Setup, sock: &Path, tag: &str) -> Result<(Child, Instant, PathBuf)> {
    let log = setup.path(&format!("{tag}.log"));
    let stderr = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(&setup.vmm);
    cmd.arg("--api-sock")
        .arg(sock)
        .args(["--id", tag])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let started = Instant::now();
    let child = cmd.spawn().context("starting wrenn-vmm")?;
    Ok((child, started, log))
}

/// Polls `GET /` until it answers 200; returns when it did.
pub(crate) fn wait_api(child: &mut Child, sock: &Path) -> Result<Instant> {
    let deadline = Instant::now() + API_TIMEOUT;
    loop {
        if let Ok((200, _)) = http(sock, "GET", "/", None) {
            return Ok(Instant::now());
        }
        if let Some(status) = child.try_wait()? {
            bail!("wrenn-vmm exited ({status}) before its API answered");
        }
        ensure!(
            Instant::now() < deadline,
            "the API on {} did not answer within {API_TIMEOUT:?}",
            sock.display()
        );
        // Short, and a sleep rather than a spin: the VMM needs the same single CPU.
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn api_ready_sample(setup: &Setup, i: usize) -> Result<Duration> {
    let tag = format!("api-{i}");
    let sock = setup.path(&format!("{tag}.sock"));
    let (child, started, _) = spawn_api_vmm(setup, &sock, &tag)?;
    let mut child = ChildGuard(child);
    let ready = wait_api(&mut child.0, &sock)?;
    Ok(ready.duration_since(started))
}

/// wrenn-vmm as Wrenn drives it: spawn, configure over the API, start, wait for the marker.
fn api_boot_sample(setup: &Setup, i: usize) -> Result<Duration> {
    let tag = format!("apiboot-{i}");
    let sock = setup.path(&format!("{tag}.sock"));
    let (child, started, log) = spawn_api_vmm(setup, &sock, &tag)?;
    // The console goes to the VMM's stdout (no PUT /serial), as with --config-file.
    let mut vm = Vm::watch(Monitor::Wrenn, child, started, log);
    wait_api(&mut vm.child, &sock)?;
    let boot = qemu_boot(setup, &setup.test_image, " wrenn_hold=1");
    let put = |path: &str, body: serde_json::Value| -> Result<()> {
        let (status, text) = http(&sock, "PUT", path, Some(&body.to_string()))?;
        ensure!(status == 204, "PUT {path}: {status} {text}");
        Ok(())
    };
    put(
        "/boot-source",
        serde_json::json!({"kernel_image_path": setup.kernel, "boot_args": wrenn_boot_args(&boot)?}),
    )?;
    put(
        "/machine-config",
        serde_json::json!({"vcpu_count": VCPUS, "mem_size_mib": MEM_MIB}),
    )?;
    put(
        "/drives/rootfs",
        serde_json::json!({"drive_id": "rootfs", "path_on_host": setup.test_image,
                           "is_root_device": true, "is_read_only": true}),
    )?;
    put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    )?;
    let (at, _) = vm.wait_line(READY_MARKER, BOOT_TIMEOUT)?;
    Ok(at.duration_since(vm.started))
}

/// One HTTP/1.1 request on a fresh connection to a unix socket; returns (status, body).
fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    http_with_timeout(sock, method, path, body, API_TIMEOUT)
}

/// [`http`] for a request that may take up to `timeout` to answer.
pub(crate) fn http_with_timeout(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP response {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One base-image boot with a data drive (and a vsock where the monitor can have one): the
/// guest's dd numbers, then vsock latency and throughput.
fn io_round(setup: &Setup, monitor: Monitor, round: usize) -> Result<()> {
    let tag = format!("io-{round}");
    let data = setup.path(&format!("{tag}-{}.img", monitor.name()));
    fs::File::create(&data)
        .and_then(|f| f.set_len(DATA_MIB << 20))
        .with_context(|| format!("creating {}", data.display()))?;
    let _remove = RemoveOnDrop(data.clone());
    let with_vsock = monitor == Monitor::Wrenn || setup.qemu_vsock.is_ok();
    let uds = setup.path(&format!("{tag}-vsock.sock"));
    let script = IO_SCRIPT.replace("{mib}", &DATA_MIB.to_string());
    let spec = VmSpec {
        rootfs: &setup.base_image,
        extra_cmdline: format!(
            " wrenn_run={}",
            wrenn_image::qemu::base64(script.as_bytes())
        ),
        data: Some(&data),
        vsock: with_vsock.then(|| uds.clone()),
    };
    let mut vm = Vm::launch(setup, monitor, &tag, &spec)?;
    let (_, write) = vm.wait_line("BLK_W", BOOT_TIMEOUT)?;
    let (_, read) = vm.wait_line("BLK_R", BOOT_TIMEOUT)?;
    for (metric, line) in [("blk_write", &write), ("blk_read", &read)] {
        let secs = parse_dd_seconds(line).with_context(|| format!("no dd result in {line:?}"))?;
        sample(monitor, metric, DATA_MIB as f64 / secs);
    }
    if !with_vsock {
        return Ok(());
    }
    vm.wait_line("VSOCK_READY", BOOT_TIMEOUT)?;
    let connect = |port| vsock_connect(monitor, &uds, GUEST_CID, port, BOOT_TIMEOUT);

    let mut echo = connect(ECHO_PORT)?;
    let message = [0x5a_u8; PING_BYTES];
    let mut back = [0_u8; PING_BYTES];
    let mut rtts = Vec::with_capacity(PING_COUNT);
    for i in 0..PING_WARMUP + PING_COUNT {
        let t = Instant::now();
        echo.write_all(&message)?;
        echo.read_exact(&mut back)?;
        if i >= PING_WARMUP {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        ensure!(back == message, "the echo differs");
    }
    let rtt = Stats::of(&rtts).context("no round trips")?;
    sample(monitor, "vsock_rtt", rtt.median);
    sample(monitor, "vsock_rtt_p99", rtt.p99);
    drop(echo);

    let total = STREAM_MIB << 20;
    let chunk = vec![0xa5_u8; CHUNK];
    let mut sink = connect(SINK_PORT)?;
    let t = Instant::now();
    sink.write_all(&total.to_be_bytes())?;
    let mut left = total;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64))?;
        sink.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    let mut done = [0_u8; 4];
    sink.read_exact(&mut done)?;
    ensure!(&done == b"done", "the guest's sink answered {done:?}");
    sample(
        monitor,
        "vsock_h2g",
        STREAM_MIB as f64 / t.elapsed().as_secs_f64(),
    );
    drop(sink);

    let mut source = connect(SOURCE_PORT)?;
    let mut buf = vec![0_u8; CHUNK];
    let t = Instant::now();
    source.write_all(&total.to_be_bytes())?;
    let mut got = 0_u64;
    while got < total {
        let n = source.read(&mut buf)?;
        ensure!(
            n > 0,
            "the guest's source closed after {got} of {total} bytes"
        );
        got += n as u64;
    }
    sample(
        monitor,
        "vsock_g2h",
        STREAM_MIB as f64 / t.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Removes a file when dropped.
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `BLK_W 268435456 bytes (268 MB, 256 MiB) copied, 1.52 s, 177 MB/s` -> 1.52.
fn parse_dd_seconds(line: &str) -> Option<f64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "s," || *w == "s")?;
    let secs: f64 = words
        .get(at.checked_sub(1)?)?
        .trim_end_matches(',')
        .parse()
        .ok()?;
    (secs > 0.0 && secs.is_finite()).then_some(secs)
}

/// A stream to guest port `port`: wrenn-vmm's `CONNECT` handshake on its unix socket, or
/// AF_VSOCK to guest `cid` for QEMU's vhost-vsock; reads and writes time out after `timeout`.
pub(crate) fn vsock_connect(
    monitor: Monitor,
    uds: &Path,
    cid: u32,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream> {
    let stream = match monitor {
        Monitor::Wrenn => {
            let mut s = UnixStream::connect(uds)
                .with_context(|| format!("connecting to {}", uds.display()))?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut answer = Vec::new();
            let mut byte = [0_u8; 1];
            while answer.len() < 64 {
                s.read_exact(&mut byte)
                    .context("reading the CONNECT answer")?;
                if byte[0] == b'\n' {
                    break;
                }
                answer.push(byte[0]);
            }
            let answer = String::from_utf8_lossy(&answer);
            ensure!(
                answer.starts_with("OK "),
                "CONNECT {port} answered {answer:?}"
            );
            s
        }
        Monitor::Qemu => {
            use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
            let fd = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .context("creating an AF_VSOCK socket")?;
            connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))
                .with_context(|| format!("connecting to vsock {cid}:{port}"))?;
            // Only read, write and timeouts are used: plain socket calls, whatever the family.
            UnixStream::from(fd)
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_sample_reads_monitor_metric_value() {
        assert_eq!(
            parse_sample("SAMPLE qemu boot 812.500"),
            Some((Monitor::Qemu, "boot".to_owned(), 812.5))
        );
        assert_eq!(parse_sample("SAMPLE firecracker boot 1"), None);
        assert_eq!(parse_sample("SAMPLE wrenn boot"), None);
        assert_eq!(parse_sample("SAMPLE wrenn boot 1 2"), None);
        assert_eq!(parse_sample("# comment"), None);
    }

    #[test]
    fn test_stats_median_p99_min_max() {
        let s = Stats::of(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            (s.median, s.p99, s.min, s.max, s.count),
            (3.0, 5.0, 1.0, 5.0, 5)
        );
        let many: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(Stats::of(&many).unwrap().p99, 198.0);
        assert_eq!(Stats::of(&[]), None);
    }

    #[test]
    fn test_parse_dd_seconds_from_gnu_dd_summary() {
        let line = "BLK_W 268435456 bytes (268 MB, 256 MiB) copied, 1.52044 s, 177 MB/s";
        assert_eq!(parse_dd_seconds(line), Some(1.52044));
        assert_eq!(parse_dd_seconds("BLK_R dd: error reading"), None);
    }

    #[test]
    fn test_parse_uptime_from_marker() {
        assert_eq!(
            parse_uptime("WRENN_GUEST_READY uptime=0.84"),
            Some(Duration::from_millis(840))
        );
        assert_eq!(parse_uptime("WRENN_GUEST_READY"), None);
    }

    #[test]
    fn test_memory_splits_guest_ram_from_the_rest() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 00:1f 1234    /usr/bin/qemu
Size:               1024 kB
Rss:                 800 kB
Private_Clean:         0 kB
Private_Dirty:        16 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               40000 kB
Private_Clean:         0 kB
Private_Dirty:     40000 kB
VmFlags: rd wr mr mw me ac
7f0010000000-7f0010200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                1000 kB
Private_Clean:         0 kB
Private_Dirty:      1000 kB
";
        let m = Memory::parse(smaps, 262_144).unwrap();
        assert_eq!(m.total_rss, 41_800);
        assert_eq!(m.guest_rss, 40_000);
        assert_eq!(m.overhead(), 1_800);
        assert_eq!(m.overhead_private(), 1_016);
        assert!(Memory::parse(smaps, 131_072).is_err());

        // The guest's RAM merged with a 132 KiB arena after it: the extra counts as overhead.
        let merged = smaps.replace("Size:             262144 kB", "Size:             262276 kB");
        let m = Memory::parse(&merged, 262_144).unwrap();
        assert_eq!(m.guest_rss, 40_000 - 132);
        assert_eq!(m.overhead(), 1_800 + 132);
    }

    #[test]
    fn test_io_script_serves_the_ports_the_host_uses() {
        for (port, role) in [
            (ECHO_PORT, "echo"),
            (SINK_PORT, "sink"),
            (SOURCE_PORT, "src"),
        ] {
            assert!(
                IO_SCRIPT.contains(&format!("L({port},{role})")),
                "{port} {role}"
            );
        }
    }

    #[test]
    fn test_io_script_fits_on_the_kernel_command_line() {
        let script = IO_SCRIPT.replace("{mib}", "256");
        let encoded = wrenn_image::qemu::base64(script.as_bytes());
        // Room left for the rest of the line and the monitors' virtio_mmio.device entries.
        assert!(encoded.len() < 1500, "{} bytes", encoded.len());
    }
}
