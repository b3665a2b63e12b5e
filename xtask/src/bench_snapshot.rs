//! `cargo xtask bench snapshot`: wrenn-vmm's snapshots and restores against QEMU's migration
//! to a file, side by side in one host VM run.
//!
//! As with `bench vmm` (whose outer runner, API client, console watcher and vsock client this
//! reuses), the outer process builds wrenn-vmm and wrenn-pager in release mode and re-runs
//! itself with `--inner` where a usable KVM exists (inside the host VM with one vCPU). The inner
//! process prints `SAMPLE <monitor> <metric> <value>` lines; the outer one turns them into
//! `BENCH snapshot ...` lines and one `RESULT snapshot ...` line.
//!
//! Every guest is the base image (python3) running [`SNAP_SCRIPT`]: an echo server on vsock
//! port 5000 and, on port 5003, a "dirtier" that writes a requested number of bytes to
//! /dev/shm. One vCPU; everything (binaries, kernel, snapshots, sockets) lives in one private
//! directory on the host VM's tmpfs, which is also the directory wrenn-vmm's jail keeps
//! (its API socket lives there).
//!
//! ```text
//!  per size (256 MiB, 1 GiB):
//!    wrenn-vmm boot ── VSOCK_READY ── pause ── Full (plain) ── Full (layered build)
//!                                                  │ 1 GiB only: resume, dirty 64 MiB, pause,
//!                                                  │ Diff (layered); again, Diff (plain)
//!    QEMU boot ─────── VSOCK_READY ── stop ─── migrate to a file
//!                                                  │ 1 GiB only: cont, dirty 64 MiB, stop,
//!                                                  │ migrate to a second file
//!    restores, alternating variants, `--runs` each:
//!      spawn ──► running (load / `cont` returned) ──► vsock (CONNECT + 64-byte echo)
//!  256 MiB: 5 clones per variant alive at once; sum of their Rss and Pss
//! ```
//!
//! 1. restore: wrenn-vmm `--api-sock`, `PUT /snapshot/load` with `resume_vm` from the plain Full
//!    (`file`: the memory file mapped private; `uffd`: a `wrenn-pager --mem-file` started, and
//!    listening, before the clock starts, as the agent's pager always is) or from the layered
//!    build (`file_layered`; `uffd_layered` when wrenn-pager has `--store`); QEMU started with
//!    `-incoming defer`, then `migrate-incoming` from its file, its `MIGRATION completed`
//!    event, and `cont`. One unmeasured restore per variant first (binaries, page cache).
//!    The pager runs with its default fault-around (a fault installs its 64 KiB window).
//!    `uffd_prefetch` / `uffd_layered_prefetch` are `uffd` / `uffd_layered` with the pager
//!    given `--prefetch-file`: the pages a previous, unmeasured restore of the same snapshot
//!    had installed on demand (recorded with `--record`, once per size before the
//!    measurements), which is the agent's steady state for a template's clones:
//!
//! ```text
//!    record (unmeasured): pager --record F ── restore ── vsock ── VM ends ── pager writes F
//!    measured:            pager --prefetch-file F ── restore (prefetch thread installs F
//!                         while faults are served) ── vsock
//! ```
//! 2. diff: bytes are the allocated blocks (`st_blocks * 512`) of the files a snapshot wrote
//!    (state, memory, header); `mem` counts the memory file alone, against the 64 MiB dirtied.
//!    Times are the create request alone (the VM is already paused) and QEMU's `migrate` to
//!    its `MIGRATION completed` event (the VM already stopped).
//! 3. clones: `/proc/PID/smaps_rollup` Rss and Pss of the monitor processes (and, apart, of
//!    the pagers) once all five answered vsock.
//!
//! Metric keys carry their unit (`_ms`, `_mib`, `_us`, `_n`: a count), which the report
//! strips from the printed names. `WRENN_BENCH_VMM` / `WRENN_BENCH_PAGER` measure those
//! binaries instead of fresh builds.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use wrenn_image::cache::Cache;
use wrenn_image::qemu::{Accel, Boot};
use wrenn_image::rootfs::{self, ImageKind};
use wrenn_image::{guest, kernel};

use crate::bench_vmm::{
    self, API_TIMEOUT, BOOT_TIMEOUT, ECHO_PORT, GUEST_CID, MICROVM_CMDLINE, Monitor, Samples,
    Stats, VMM_ENV, Vm, ms, sample,
};

/// Restore samples per variant and size unless `--runs` says otherwise.
const DEFAULT_RUNS: usize = 10;
/// Guest sizes restored.
const SIZES_MIB: [u32; 2] = [256, 1024];
/// The size whose source VMs dirty memory for the diff measurement.
const DIFF_SIZE_MIB: u32 = 1024;
/// What the guest writes to /dev/shm between the Full snapshot and the Diff.
const DIRTY_MIB: u64 = 64;
const DIRTY_PORT: u32 = 5003;
/// The size cloned, and how many clones are alive at once.
const CLONE_SIZE_MIB: u32 = 256;
const CLONES: u32 = 5;
const VCPUS: u8 = 1;
const PING_BYTES: usize = 64;
/// Outer -> inner: the wrenn-pager binary to measure.
const PAGER_ENV: &str = "WRENN_BENCH_PAGER";
/// A snapshot, a migration or a 64 MiB dirtying of a 1 GiB guest in the emulated host VM.
const SAVE_TIMEOUT: Duration = Duration::from_secs(180);
/// Spawning a monitor to its guest answering vsock.
const RESTORE_TIMEOUT: Duration = BOOT_TIMEOUT;
/// One vsock attempt (connect and exchange) before it is retried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Between vsock attempts: short, and a sleep, as the monitor needs the same single CPU.
const RETRY_PAUSE: Duration = Duration::from_millis(2);
/// How long a pager gets to exit after its VM, then again after SIGTERM.
const PAGER_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than every single wait above, so a stuck step ends with its own error first.
const QUIET_TIMEOUT: Duration = Duration::from_secs(240);
/// QEMU's migration speed limit, lifted (the default is 128 MiB/s even for a stopped VM).
const MIGRATE_BANDWIDTH: u64 = 1 << 40;

/// Guest side (base image, run by wrenn-init): 5000 echoes; 5003 takes an 8-byte big-endian
/// length and a tag byte, writes that many bytes of a non-zero pattern over /dev/shm/d (in
/// place: a second round dirties the same pages), and answers `done`. Kept short: it travels
/// base64-encoded on the kernel command line.
const SNAP_SCRIPT: &str = r#"cat >/tmp/s.py<<'E'
import socket as S,threading as T,os
def L(p,f):
 s=S.socket(S.AF_VSOCK,S.SOCK_STREAM);s.bind((S.VMADDR_CID_ANY,p));s.listen(8)
 def a():
  while 1:c,_=s.accept();T.Thread(target=f,args=(c,),daemon=1).start()
 T.Thread(target=a,daemon=1).start()
def echo(c):
 while 1:
  d=c.recv(65536)
  if not d:break
  c.sendall(d)
def dirty(c):
 b=b''
 while len(b)<9:
  d=c.recv(9-len(b))
  if not d:return
  b+=d
 k=int.from_bytes(b[:8],'big');z=bytes([b[8]|1])*(1<<20)
 f=os.open('/dev/shm/d',os.O_WRONLY|os.O_CREAT)
 while k>0:k-=os.write(f,z[:min(k,1<<20)])
 os.close(f);c.sendall(b'done')
L(5000,echo);L(5003,dirty)
print('VSOCK_READY',flush=1)
T.Event().wait()
E
exec python3 /tmp/s.py
"#;

/// How a restore is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// wrenn-vmm, the plain memory file mapped private.
    File,
    /// wrenn-vmm, guest memory served by a wrenn-pager reading the plain memory file.
    Uffd,
    /// wrenn-vmm, the layered build's memory files mapped private.
    FileLayered,
    /// wrenn-vmm, a wrenn-pager reading the layered build.
    UffdLayered,
    /// [`Variant::Uffd`] with the pager prefetching a recorded page set.
    UffdPrefetch,
    /// [`Variant::UffdLayered`] with the pager prefetching a recorded page set.
    UffdLayeredPrefetch,
    /// QEMU `-incoming` from its migration file, then `cont`.
    Qemu,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::File => "file",
            Variant::Uffd => "uffd",
            Variant::FileLayered => "file_layered",
            Variant::UffdLayered => "uffd_layered",
            Variant::UffdPrefetch => "uffd_prefetch",
            Variant::UffdLayeredPrefetch => "uffd_layered_prefetch",
            Variant::Qemu => "qemu",
        }
    }

    /// The variant whose restore request and pager source this one uses: itself, or the
    /// plain variant a prefetching one adds `--prefetch-file` to.
    fn without_prefetch(self) -> Variant {
        match self {
            Variant::UffdPrefetch => Variant::Uffd,
            Variant::UffdLayeredPrefetch => Variant::UffdLayered,
            other => other,
        }
    }

    fn prefetches(self) -> bool {
        self.without_prefetch() != self
    }

    fn monitor(self) -> Monitor {
        match self {
            Variant::Qemu => Monitor::Qemu,
            _ => Monitor::Wrenn,
        }
    }

    fn uses_pager(self) -> bool {
        matches!(
            self.without_prefetch(),
            Variant::Uffd | Variant::UffdLayered
        )
    }
}

/// Every variant's name, for the report (which sees only names).
const VARIANT_NAMES: [&str; 7] = [
    "file",
    "uffd",
    "file_layered",
    "uffd_layered",
    "uffd_prefetch",
    "uffd_layered_prefetch",
    "qemu",
];

/// `restore_<variant>_<size>_<phase>_ms`.
fn restore_key(variant: &str, size: u32, phase: &str) -> String {
    format!("restore_{variant}_{size}_{phase}_ms")
}

/// `variants` rotated by `round`, so that no variant always goes first.
fn rotated<T: Copy>(variants: &[T], round: usize) -> Vec<T> {
    let mut v = variants.to_vec();
    if !v.is_empty() {
        let by = round % v.len();
        v.rotate_left(by);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Outer: build, run inside the host VM, report.
// ---------------------------------------------------------------------------------------------

pub fn outer(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    guest::build(cache, &[], false).context("building the guest kernel and images")?;
    wrenn_image::packages::ensure(wrenn_image::qemu::PACKAGES)?;
    let binary = |env: &str, package: &str| match std::env::var_os(env) {
        Some(path) => Ok(PathBuf::from(path)),
        None => bench_vmm::build_release(package, package),
    };
    let vmm = binary(VMM_ENV, "wrenn-vmm")?;
    let pager = binary(PAGER_ENV, "wrenn-pager")?;
    println!("# wrenn-vmm: {}", vmm.display());
    println!("# wrenn-pager: {}", pager.display());
    let (vmm, pager) = (
        bench_vmm::path_string(&vmm)?,
        bench_vmm::path_string(&pager)?,
    );
    // Boots, snapshots and clones take ~3 minutes inside the emulated host VM, the restores
    // ~35 s per run (the default 10 runs: ~10 minutes in all); generous limits.
    let minutes = 20 + 3 * u64::try_from(runs).unwrap_or(u64::MAX / 4);
    let samples = bench_vmm::run_inner(
        cache,
        "snapshot",
        runs,
        &[(VMM_ENV, vmm.as_str()), (PAGER_ENV, pager.as_str())],
        Duration::from_secs(minutes.saturating_mul(60)),
        QUIET_TIMEOUT,
    )?;
    for line in report_lines(&by_key(&samples))? {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The samples by metric alone (every metric name here is unique across monitors).
fn by_key(samples: &Samples) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for ((_, key), values) in samples {
        out.entry(key.clone()).or_default().extend(values);
    }
    out
}

/// A metric's printed name and unit, from the unit suffix of its key.
fn split_unit(key: &str) -> (&str, &'static str) {
    for (suffix, unit) in [("_ms", "ms"), ("_mib", "MiB"), ("_us", "us"), ("_n", "")] {
        if let Some(name) = key.strip_suffix(suffix) {
            return (name, unit);
        }
    }
    (key, "")
}

fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "" => format!("{value:.0}"),
        _ => bench_vmm::format_value(value, unit),
    }
}

/// The BENCH lines (every metric, then the wrenn/QEMU ratios) and the RESULT line.
fn report_lines(samples: &BTreeMap<String, Vec<f64>>) -> Result<Vec<String>> {
    let stats = |key: &str| samples.get(key).and_then(|v| Stats::of(v));
    let mut lines = Vec::new();
    for (key, values) in samples {
        let Some(s) = Stats::of(values) else { continue };
        let (name, unit) = split_unit(key);
        let value = |v: f64| format_value(v, unit);
        if s.count == 1 {
            lines.push(format!("BENCH snapshot {name}={}", value(s.median)));
            continue;
        }
        lines.push(format!("BENCH snapshot {name}_median={}", value(s.median)));
        if s.count >= 5 {
            lines.push(format!("BENCH snapshot {name}_p99={}", value(s.p99)));
        }
        lines.push(format!("BENCH snapshot {name}_min={}", value(s.min)));
        lines.push(format!("BENCH snapshot {name}_max={}", value(s.max)));
        lines.push(format!("BENCH snapshot {name}_samples={}", s.count));
    }

    // Ratios of medians, wrenn over QEMU (or over the dirtied bytes).
    let median = |key: &str| stats(key).map(|s| s.median);
    let mut ratios: Vec<(String, f64)> = Vec::new();
    let mut ratio = |name: String, over: Option<f64>, under: Option<f64>| {
        if let (Some(a), Some(b)) = (over, under)
            && b > 0.0
        {
            ratios.push((name, a / b));
        }
    };
    for size in SIZES_MIB {
        for variant in VARIANT_NAMES.iter().filter(|v| **v != "qemu") {
            for phase in ["running", "vsock"] {
                ratio(
                    format!("restore_{variant}_{size}_{phase}_ratio"),
                    median(&restore_key(variant, size, phase)),
                    median(&restore_key("qemu", size, phase)),
                );
            }
        }
    }
    for kind in ["plain", "layered"] {
        ratio(
            format!("diff_{kind}_write_ratio"),
            median(&format!("diff_{kind}_mem_mib")),
            median("diff_dirtied_mib"),
        );
        ratio(
            format!("diff_{kind}_bytes_ratio"),
            median(&format!("diff_{kind}_bytes_mib")),
            median("diff_qemu_bytes_mib"),
        );
        ratio(
            format!("diff_{kind}_time_ratio"),
            median(&format!("diff_{kind}_time_ms")),
            median("diff_qemu_time_ms"),
        );
    }
    for variant in ["uffd", "file"] {
        for what in ["rss", "pss"] {
            ratio(
                format!("clones_{variant}_{what}_ratio"),
                median(&format!("clones_{variant}_{what}_mib")),
                median(&format!("clones_qemu_{what}_mib")),
            );
        }
    }
    ratio(
        "clones_uffd_with_pagers_pss_ratio".into(),
        median("clones_uffd_pss_mib")
            .zip(median("clones_uffd_pager_pss_mib"))
            .map(|(a, b)| a + b),
        median("clones_qemu_pss_mib"),
    );
    for (name, value) in &ratios {
        lines.push(format!(
            "BENCH snapshot {name}={}",
            format_value(*value, "x")
        ));
    }

    for key in [
        restore_key("uffd", DIFF_SIZE_MIB, "vsock"),
        restore_key("qemu", DIFF_SIZE_MIB, "running"),
    ] {
        ensure!(
            samples.contains_key(&key),
            "the inner run reported no {key} samples"
        );
    }
    let mut result = String::from("RESULT snapshot");
    let mut metric = |key: &str| {
        let Some(s) = stats(key) else { return };
        let (name, unit) = split_unit(key);
        if s.count == 1 {
            result.push_str(&format!(" {name}={}", format_value(s.median, unit)));
            return;
        }
        result.push_str(&format!(" {name}_median={}", format_value(s.median, unit)));
        if s.count >= 5 {
            result.push_str(&format!(" {name}_p99={}", format_value(s.p99, unit)));
        }
    };
    for size in SIZES_MIB.iter().rev() {
        for phase in ["vsock", "running"] {
            for variant in VARIANT_NAMES {
                metric(&restore_key(variant, *size, phase));
            }
        }
    }
    for variant in VARIANT_NAMES {
        for what in ["faults_n", "around_pages_n", "prefetched_pages_n"] {
            metric(&format!("pager_{variant}_{DIFF_SIZE_MIB}_{what}"));
        }
    }
    for key in [
        "diff_dirtied_mib",
        "diff_plain_mem_mib",
        "diff_plain_bytes_mib",
        "diff_layered_mem_mib",
        "diff_layered_bytes_mib",
        "diff_qemu_bytes_mib",
        "diff_plain_time_ms",
        "diff_layered_time_ms",
        "diff_qemu_time_ms",
        "clones_uffd_pss_mib",
        "clones_uffd_pager_pss_mib",
        "clones_file_pss_mib",
        "clones_qemu_pss_mib",
        "clones_uffd_rss_mib",
        "clones_file_rss_mib",
        "clones_qemu_rss_mib",
    ] {
        metric(key);
    }
    for (name, value) in &ratios {
        result.push_str(&format!(" {name}={}", format_value(*value, "x")));
    }
    lines.push(result);
    Ok(lines)
}

// ---------------------------------------------------------------------------------------------
// Inner: the measurements, where a usable KVM exists.
// ---------------------------------------------------------------------------------------------

/// How QEMU writes and reads its migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrateVia {
    /// `exec:cat > FILE` / `exec:cat FILE` (any QEMU).
    Exec,
    /// `file:FILE` (QEMU 8.2 and later).
    File,
}

impl MigrateVia {
    /// From the first line of `qemu-system-x86_64 --version`.
    fn for_version(line: &str) -> MigrateVia {
        let version = line
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .unwrap_or("");
        let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) if (major, minor) >= (8, 2) => MigrateVia::File,
            _ => MigrateVia::Exec,
        }
    }

    fn outgoing(self, file: &Path) -> String {
        match self {
            MigrateVia::Exec => format!("exec:cat > {}", file.display()),
            MigrateVia::File => format!("file:{}", file.display()),
        }
    }

    fn incoming(self, file: &Path) -> String {
        match self {
            MigrateVia::Exec => format!("exec:cat {}", file.display()),
            MigrateVia::File => format!("file:{}", file.display()),
        }
    }
}

/// Files of one inner run, in a private directory under /tmp (the host VM's tmpfs), removed
/// when dropped.
struct Setup {
    dir: PathBuf,
    vmm: PathBuf,
    pager: PathBuf,
    /// wrenn-pager can serve a layered build (`--store DIR --build ID`).
    pager_layered: bool,
    kernel: PathBuf,
    base_image: PathBuf,
    /// Why QEMU cannot have a vsock device here, if it cannot.
    qemu_vsock: std::result::Result<(), String>,
    migrate: MigrateVia,
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
            "no /dev/kvm here; run `cargo xtask bench snapshot` (not --inner) to get one"
        );
        let source = |env: &str| {
            std::env::var_os(env)
                .map(PathBuf::from)
                .with_context(|| format!("{env} is not set"))
        };
        let (vmm_src, pager_src) = (source(VMM_ENV)?, source(PAGER_ENV)?);
        let qemu_version = bench_vmm::qemu_version()
            .context("qemu-system-x86_64 --version failed: is QEMU installed here?")?;
        let dir = std::env::temp_dir().join(format!("wrenn-bench-snapshot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, dropping `setup` removes the directory.
        let mut setup = Setup {
            vmm: dir.join("wrenn-vmm"),
            pager: dir.join("wrenn-pager"),
            pager_layered: false,
            kernel: dir.join("vmlinux"),
            base_image: rootfs::find(cache, ImageKind::Base)?.file(rootfs::IMAGE_FILE),
            dir,
            qemu_vsock: Ok(()),
            migrate: MigrateVia::for_version(&qemu_version),
        };
        let kernel = kernel::find(cache)?.file("vmlinux");
        for (from, to) in [
            (&vmm_src, &setup.vmm),
            (&pager_src, &setup.pager),
            (&kernel, &setup.kernel),
        ] {
            fs::copy(from, to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        let help = Command::new(&setup.pager)
            .arg("--help")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} --help", setup.pager.display()))?;
        setup.pager_layered = String::from_utf8_lossy(&help.stdout).contains("--store");
        setup.qemu_vsock = bench_vmm::load_vhost_vsock();
        Ok(setup)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The restore variants measured here.
    fn variants(&self) -> Vec<Variant> {
        let mut v = vec![
            Variant::File,
            Variant::Uffd,
            Variant::UffdPrefetch,
            Variant::FileLayered,
        ];
        if self.pager_layered {
            v.extend([Variant::UffdLayered, Variant::UffdLayeredPrefetch]);
        }
        v.push(Variant::Qemu);
        v
    }

    /// The prefetch file recorded for `variant`'s snapshot of `size` MiB.
    fn prefetch_file(&self, variant: Variant, size: u32) -> PathBuf {
        let base = variant.without_prefetch().name();
        self.path(&format!("prefetch-{base}-{size}.pf"))
    }

    /// The reference boot of the base image with [`SNAP_SCRIPT`], `mem_mib` of RAM.
    fn boot(&self, mem_mib: u32) -> Boot {
        let mut boot = Boot::new(&self.kernel, &self.base_image, Accel::Kvm);
        boot.cpus = u32::from(VCPUS);
        boot.memory_mib = mem_mib;
        boot.extra_cmdline = format!(
            "{MICROVM_CMDLINE} wrenn_run={}",
            wrenn_image::qemu::base64(SNAP_SCRIPT.as_bytes())
        );
        boot.timeout = BOOT_TIMEOUT;
        boot
    }

    /// QEMU for a `mem_mib` guest with a QMP socket, a vsock device (guest `cid`) when this
    /// host allows one, and, for a restore, waiting for `migrate-incoming`. Sources and
    /// restores differ only in these, as migration needs.
    fn qemu(&self, mem_mib: u32, qmp: &Path, cid: u32, incoming: bool) -> Command {
        let mut cmd = self.boot(mem_mib).command();
        if self.qemu_vsock.is_ok() {
            cmd.args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")]);
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd
    }

    /// Spawns `cmd` with the console on a pipe and stderr to `<tag>.log`.
    fn spawn(&self, monitor: Monitor, tag: &str, mut cmd: Command) -> Result<Vm> {
        let log = self.path(&format!("{tag}.log"));
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
}

pub fn inner(cache: &Cache, runs: Option<usize>) -> Result<ExitCode> {
    let runs = runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    let setup = Setup::new(cache)?;
    describe_environment(&setup);
    let variants = setup.variants();
    for (index, size) in SIZES_MIB.into_iter().enumerate() {
        eprintln!("==> {size} MiB: boot and snapshot wrenn-vmm");
        let wrenn = wrenn_source(&setup, size).with_context(|| format!("wrenn-vmm {size} MiB"))?;
        eprintln!("==> {size} MiB: boot and save QEMU");
        let qemu = qemu_source(&setup, size).with_context(|| format!("QEMU {size} MiB"))?;
        let snaps = Snapshots { size, wrenn, qemu };
        for &variant in variants.iter().filter(|v| v.prefetches()) {
            eprintln!(
                "==> {size} MiB: record the prefetch set ({}, unmeasured)",
                variant.without_prefetch().name()
            );
            record_prefetch(&setup, &snaps, variant)
                .with_context(|| format!("recording for {} ({size} MiB)", variant.name()))?;
        }
        if index == 0 {
            eprintln!("==> warm-up: one unmeasured restore per variant");
            for &variant in &variants {
                restore(&setup, &snaps, variant, "warmup", GUEST_CID, &[])
                    .and_then(Restored::end)
                    .with_context(|| format!("warm-up restore ({})", variant.name()))?;
            }
        }
        eprintln!(
            "==> {size} MiB: {runs} restores per variant ({})",
            variants
                .iter()
                .map(|v| v.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for round in 0..runs {
            for variant in rotated(&variants, round) {
                let tag = format!("restore-{round}");
                restore_sample(&setup, &snaps, variant, &tag).with_context(|| {
                    format!("restore {round} of {size} MiB ({})", variant.name())
                })?;
            }
        }
        if size == CLONE_SIZE_MIB {
            for variant in [Variant::Uffd, Variant::File, Variant::Qemu] {
                eprintln!("==> {CLONES} clones at once ({})", variant.name());
                clones(&setup, &snaps, variant)
                    .with_context(|| format!("{CLONES} clones ({})", variant.name()))?;
            }
        }
        snaps.remove(&setup);
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_environment(setup: &Setup) {
    println!("{}", bench_vmm::host_line());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let nested = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    let mem_mib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(|| "?".to_owned(), |kib| (kib >> 10).to_string());
    println!(
        "# {}; {mem_mib} MiB RAM",
        if nested {
            "this host is itself a VM (nested KVM: the host VM)"
        } else {
            "bare-metal KVM"
        },
    );
    println!(
        "# guests: {VCPUS} vCPU, {} MiB, base image with python3 vsock servers; wrenn-vmm \
         snapshot/load with resume_vm (file: MAP_PRIVATE memory file; uffd: wrenn-pager, \
         started before the clock{}); QEMU `stop` + migrate {:?}, restore -incoming defer + \
         migrate-incoming + `cont`",
        SIZES_MIB.map(|s| s.to_string()).join(" and "),
        if setup.pager_layered {
            "; layered builds too; *_prefetch: --prefetch-file recorded by an unmeasured \
             restore with --record"
        } else {
            "; this wrenn-pager has no --store, so no uffd_layered; uffd_prefetch: \
             --prefetch-file recorded by an unmeasured restore with --record"
        },
        setup.migrate.outgoing(Path::new("FILE")),
    );
    println!(
        "# restore: spawn -> running (load / cont returned) -> vsock (wrenn CONNECT, QEMU \
         AF_VSOCK; one {PING_BYTES}-byte echo); diff: {DIFF_SIZE_MIB} MiB guest wrote \
         {DIRTY_MIB} MiB to /dev/shm after a Full and resume, bytes = allocated blocks; \
         clones: {CLONES} x {CLONE_SIZE_MIB} MiB alive at once, smaps_rollup"
    );
    if let Err(reason) = &setup.qemu_vsock {
        println!("# QEMU vsock not measured (no restore_qemu_*_vsock, no QEMU diff): {reason}");
    }
}

/// The snapshots of one size.
struct Snapshots {
    size: u32,
    wrenn: WrennSnapshot,
    qemu: PathBuf,
}

impl Snapshots {
    /// Frees the host VM's tmpfs for the next size.
    fn remove(self, setup: &Setup) {
        for variant in [Variant::UffdPrefetch, Variant::UffdLayeredPrefetch] {
            let _ = fs::remove_file(setup.prefetch_file(variant, self.size));
        }
        let _ = fs::remove_file(&self.wrenn.state);
        let _ = fs::remove_file(&self.wrenn.mem);
        let _ = fs::remove_dir_all(&self.wrenn.store);
        let _ = fs::remove_file(&self.qemu);
    }
}

/// A wrenn-vmm Full snapshot, plain and as a layered build.
struct WrennSnapshot {
    state: PathBuf,
    mem: PathBuf,
    store: PathBuf,
    build: String,
}

/// A fresh build id: 16 random bytes as 32 hex digits, never the reserved all-zero one.
fn new_build_id() -> Result<String> {
    let mut bytes = [0_u8; 16];
    let mut urandom = fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    while bytes.iter().all(|b| *b == 0) {
        urandom
            .read_exact(&mut bytes)
            .context("reading /dev/urandom")?;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Bytes of storage a file takes (its allocated blocks: holes are free).
fn allocated(path: &Path) -> Result<u64> {
    let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(meta.blocks().saturating_mul(512))
}

/// [`allocated`] summed over the files of a directory.
fn allocated_in(dir: &Path) -> Result<u64> {
    let mut total = 0_u64;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        total = total.saturating_add(allocated(&entry?.path())?);
    }
    Ok(total)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// A request to wrenn-vmm's API that must answer 204; returns how long it took.
fn api(vm: &Vm, sock: &Path, method: &str, path: &str, body: &Value) -> Result<Duration> {
    let started = Instant::now();
    let (status, text) =
        bench_vmm::http_with_timeout(sock, method, path, Some(&body.to_string()), SAVE_TIMEOUT)
            .with_context(|| format!("{method} {path} {body}"))?;
    let took = started.elapsed();
    ensure!(
        status == 204,
        "{method} {path} {body}: {status} {text}\n{}",
        vm.tails()
    );
    Ok(took)
}

/// Boots wrenn-vmm with `size` MiB and dirty-page tracking, snapshots it (plain, then as a
/// layered build); for the diff size, dirties memory and takes both kinds of Diff.
fn wrenn_source(setup: &Setup, size: u32) -> Result<WrennSnapshot> {
    let tag = format!("source-wrenn-{size}");
    let sock = setup.path(&format!("{tag}.api"));
    let uds = setup.path(&format!("{tag}.vsock"));
    let boot = setup.boot(size);
    let config = json!({
        "boot-source": {
            "kernel_image_path": setup.kernel,
            "boot_args": bench_vmm::wrenn_boot_args(&boot)?,
        },
        "machine-config": {"vcpu_count": VCPUS, "mem_size_mib": size, "track_dirty_pages": true},
        "drives": [{"drive_id": "rootfs", "path_on_host": setup.base_image,
                    "is_root_device": true, "is_read_only": true}],
        "vsock": {"guest_cid": GUEST_CID, "uds_path": uds},
    });
    let config_path = setup.path(&format!("{tag}.json"));
    fs::write(&config_path, config.to_string())
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut cmd = Command::new(&setup.vmm);
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config_path)
        .args(["--id", &tag]);
    let mut vm = setup.spawn(Monitor::Wrenn, &tag, cmd)?;
    vm.wait_line("VSOCK_READY", BOOT_TIMEOUT)?;
    bench_vmm::wait_api(&mut vm.child, &sock)?;
    vsock_echo(&mut vm, &uds, GUEST_CID, Instant::now() + RESTORE_TIMEOUT)?;

    let paused = json!({"state": "Paused"});
    let resumed = json!({"state": "Resumed"});
    let pause = api(&vm, &sock, "PATCH", "/vm", &paused)?;
    sample(Monitor::Wrenn, &format!("pause_wrenn_{size}_ms"), ms(pause));
    let snap = WrennSnapshot {
        state: setup.path(&format!("wrenn-{size}.vmstate")),
        mem: setup.path(&format!("wrenn-{size}.mem")),
        store: setup.path(&format!("store-{size}")),
        build: new_build_id()?,
    };
    fs::create_dir_all(&snap.store)
        .with_context(|| format!("creating {}", snap.store.display()))?;
    let full = json!({"snapshot_type": "Full", "snapshot_path": snap.state,
                      "mem_file_path": snap.mem});
    let took = api(&vm, &sock, "PUT", "/snapshot/create", &full)?;
    sample(
        Monitor::Wrenn,
        &format!("save_full_{size}_time_ms"),
        ms(took),
    );
    let bytes = allocated(&snap.state)? + allocated(&snap.mem)?;
    sample(
        Monitor::Wrenn,
        &format!("save_full_{size}_bytes_mib"),
        mib(bytes),
    );

    let layers = |build: &str| json!({"store": snap.store, "build_id": build});
    let full = json!({"snapshot_type": "Full", "layers": layers(&snap.build)});
    let took = api(&vm, &sock, "PUT", "/snapshot/create", &full)?;
    sample(
        Monitor::Wrenn,
        &format!("save_full_layered_{size}_time_ms"),
        ms(took),
    );
    let bytes = allocated_in(&snap.store.join(&snap.build))?;
    sample(
        Monitor::Wrenn,
        &format!("save_full_layered_{size}_bytes_mib"),
        mib(bytes),
    );
    if size != DIFF_SIZE_MIB {
        return Ok(snap);
    }

    // Layered first: its parent is the layered Full just taken (a plain snapshot in between
    // would have reset the dirty log it needs).
    sample(Monitor::Wrenn, "diff_dirtied_mib", mib(DIRTY_MIB << 20));
    api(&vm, &sock, "PATCH", "/vm", &resumed)?;
    dirty(&mut vm, &uds, GUEST_CID, 2)?;
    api(&vm, &sock, "PATCH", "/vm", &paused)?;
    let diff_build = new_build_id()?;
    let diff = json!({"snapshot_type": "Diff", "layers": layers(&diff_build)});
    let took = api(&vm, &sock, "PUT", "/snapshot/create", &diff)?;
    let dir = snap.store.join(&diff_build);
    sample(Monitor::Wrenn, "diff_layered_time_ms", ms(took));
    sample(
        Monitor::Wrenn,
        "diff_layered_bytes_mib",
        mib(allocated_in(&dir)?),
    );
    sample(
        Monitor::Wrenn,
        "diff_layered_mem_mib",
        mib(allocated(&dir.join("memfile"))?),
    );
    let _ = fs::remove_dir_all(&dir);

    api(&vm, &sock, "PATCH", "/vm", &resumed)?;
    dirty(&mut vm, &uds, GUEST_CID, 4)?;
    api(&vm, &sock, "PATCH", "/vm", &paused)?;
    let (state, mem) = (setup.path("diff.vmstate"), setup.path("diff.mem"));
    let _remove = (
        bench_vmm::RemoveOnDrop(state.clone()),
        bench_vmm::RemoveOnDrop(mem.clone()),
    );
    let diff = json!({"snapshot_type": "Diff", "snapshot_path": state, "mem_file_path": mem});
    let took = api(&vm, &sock, "PUT", "/snapshot/create", &diff)?;
    sample(Monitor::Wrenn, "diff_plain_time_ms", ms(took));
    let mem_bytes = allocated(&mem)?;
    sample(
        Monitor::Wrenn,
        "diff_plain_bytes_mib",
        mib(mem_bytes + allocated(&state)?),
    );
    sample(Monitor::Wrenn, "diff_plain_mem_mib", mib(mem_bytes));
    Ok(snap)
}

/// Boots QEMU with `size` MiB, stops it and migrates it to a file; for the diff size, dirties
/// memory and migrates again to a second file (measured, then removed).
fn qemu_source(setup: &Setup, size: u32) -> Result<PathBuf> {
    let tag = format!("source-qemu-{size}");
    let qmp_path = setup.path(&format!("{tag}.qmp"));
    let mut vm = setup.spawn(
        Monitor::Qemu,
        &tag,
        setup.qemu(size, &qmp_path, GUEST_CID, false),
    )?;
    vm.wait_line("VSOCK_READY", BOOT_TIMEOUT)?;
    let mut qmp = Qmp::connect(&qmp_path, &mut vm, Instant::now() + API_TIMEOUT)?;
    qmp.execute("migrate-set-capabilities", Some(migration_events()))?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": MIGRATE_BANDWIDTH})),
    )?;
    let vsock = setup.qemu_vsock.is_ok();
    if vsock {
        vsock_echo(
            &mut vm,
            Path::new(""),
            GUEST_CID,
            Instant::now() + RESTORE_TIMEOUT,
        )?;
    }
    let started = Instant::now();
    qmp.execute("stop", None)?;
    sample(
        Monitor::Qemu,
        &format!("pause_qemu_{size}_ms"),
        ms(started.elapsed()),
    );
    let file = setup.path(&format!("qemu-{size}.migration"));
    let took = qmp.migrate(setup.migrate, &file)?;
    sample(
        Monitor::Qemu,
        &format!("save_qemu_{size}_time_ms"),
        ms(took),
    );
    sample(
        Monitor::Qemu,
        &format!("save_qemu_{size}_bytes_mib"),
        mib(allocated(&file)?),
    );
    if size != DIFF_SIZE_MIB || !vsock {
        return Ok(file);
    }
    qmp.cont()?;
    dirty(&mut vm, Path::new(""), GUEST_CID, 2)?;
    qmp.execute("stop", None)?;
    let again = setup.path("qemu-diff.migration");
    let _remove = bench_vmm::RemoveOnDrop(again.clone());
    let took = qmp.migrate(setup.migrate, &again)?;
    sample(Monitor::Qemu, "diff_qemu_time_ms", ms(took));
    sample(
        Monitor::Qemu,
        "diff_qemu_bytes_mib",
        mib(allocated(&again)?),
    );
    Ok(file)
}

/// A restored VM (with its pager), alive until [`Restored::end`] or drop.
struct Restored {
    vm: Vm,
    pager: Option<PagerProcess>,
    /// Spawn to running.
    running: Duration,
    /// Spawn to the guest's vsock echo, when the monitor has vsock here.
    answered: Option<Duration>,
}

impl Restored {
    /// Stops the VM; returns its pager's statistics output, if it had a pager.
    fn end(self) -> Result<Option<String>> {
        let Restored { vm, pager, .. } = self;
        drop(vm);
        pager.map(|mut p| p.finish()).transpose()
    }
}

/// One timed restore: samples for both phases and, with a pager, its fault figures.
fn restore_sample(setup: &Setup, snaps: &Snapshots, variant: Variant, tag: &str) -> Result<()> {
    let restored = restore(setup, snaps, variant, tag, GUEST_CID, &[])?;
    let (monitor, name, size) = (variant.monitor(), variant.name(), snaps.size);
    sample(
        monitor,
        &restore_key(name, size, "running"),
        ms(restored.running),
    );
    if let Some(answered) = restored.answered {
        sample(monitor, &restore_key(name, size, "vsock"), ms(answered));
    }
    let Some(out) = restored.end()? else {
        return Ok(());
    };
    match PagerFigures::parse(&out) {
        Some(f) => {
            sample(
                monitor,
                &format!("pager_{name}_{size}_faults_n"),
                f.faults as f64,
            );
            for (what, value) in [
                ("around_pages", f.around_pages),
                ("prefetched_pages", f.prefetched_pages),
            ] {
                if let Some(pages) = value {
                    sample(
                        monitor,
                        &format!("pager_{name}_{size}_{what}_n"),
                        pages as f64,
                    );
                }
            }
            sample(
                monitor,
                &format!("pager_{name}_{size}_copied_mib"),
                mib(f.bytes_copied),
            );
            if let Some(ns) = f.p50_ns {
                sample(
                    monitor,
                    &format!("pager_{name}_{size}_fault_p50_us"),
                    ns as f64 / 1000.0,
                );
            }
        }
        None => eprintln!(
            "warning: wrenn-pager printed no statistics JSON on exit: {:?}",
            wrenn_image::command::last_lines(&out, 3)
        ),
    }
    Ok(())
}

/// Records, with an unmeasured restore the `--record` way, the pages the pager installs on
/// demand for `variant`'s snapshot: the prefetch file its measured restores get.
fn record_prefetch(setup: &Setup, snaps: &Snapshots, variant: Variant) -> Result<()> {
    let file = setup.prefetch_file(variant, snaps.size);
    let _ = fs::remove_file(&file);
    let record = [OsArg::from("--record"), file.clone().into()];
    let restored = restore(
        setup,
        snaps,
        variant.without_prefetch(),
        "record",
        GUEST_CID,
        &record,
    )?;
    let out = restored.end()?.unwrap_or_default();
    let bytes = fs::metadata(&file)
        .with_context(|| {
            format!(
                "wrenn-pager wrote no prefetch record {}\n{}",
                file.display(),
                wrenn_image::command::last_lines(&out, 5)
            )
        })?
        .len();
    let pages = prefetch_file_pages(bytes)
        .with_context(|| format!("{} is not a prefetch file", file.display()))?;
    let faults = PagerFigures::parse(&out).map_or(0, |f| f.faults);
    eprintln!(
        "    recorded {pages} pages ({} MiB) from {faults} faults in {}",
        pages >> 8,
        file.display()
    );
    sample(
        Monitor::Wrenn,
        &format!(
            "prefetch_{}_{}_recorded_pages_n",
            variant.name(),
            snaps.size
        ),
        pages as f64,
    );
    Ok(())
}

/// Pages a prefetch file of `bytes` bytes lists: a 24-byte header, 8 bytes a page, a 4-byte
/// checksum (wrenn-pager's format).
fn prefetch_file_pages(bytes: u64) -> Option<u64> {
    let body = bytes.checked_sub(24 + 4)?;
    (body % 8 == 0).then_some(body / 8)
}

/// Restores `snaps` the `variant` way (QEMU's vsock as guest `cid`), timing spawn to running
/// and to the guest's vsock answer. `pager_args` go to the pager, if the variant has one.
fn restore(
    setup: &Setup,
    snaps: &Snapshots,
    variant: Variant,
    tag: &str,
    cid: u32,
    pager_args: &[OsArg],
) -> Result<Restored> {
    let tag = format!("{tag}-{}-{}", variant.name(), snaps.size);
    if variant == Variant::Qemu {
        return restore_qemu(setup, snaps, &tag, cid);
    }
    let snap = &snaps.wrenn;
    let mut args: Vec<OsArg> = match variant.without_prefetch() {
        Variant::Uffd => vec![OsArg::from("--mem-file"), snap.mem.clone().into()],
        Variant::UffdLayered => vec![
            OsArg::from("--store"),
            snap.store.clone().into(),
            OsArg::from("--build"),
            OsArg::from(snap.build.as_str()),
        ],
        _ => Vec::new(),
    };
    if variant.prefetches() {
        args.push(OsArg::from("--prefetch-file"));
        args.push(setup.prefetch_file(variant, snaps.size).into());
    }
    args.extend(pager_args.iter().cloned());
    let pager = if variant.uses_pager() {
        Some(PagerProcess::spawn(setup, &tag, &args)?)
    } else {
        None
    };
    let sock = setup.path(&format!("{tag}.api"));
    let uds = setup.path(&format!("{tag}.vsock"));
    let mut body = json!({
        "resume_vm": true,
        "drive_overrides": [{"drive_id": "rootfs", "path_on_host": setup.base_image}],
        "vsock_override": {"uds_path": uds},
    });
    match (variant.without_prefetch(), &pager) {
        (Variant::File, _) => {
            body["snapshot_path"] = json!(snap.state);
            body["mem_backend"] = json!({"backend_type": "File", "backend_path": snap.mem});
        }
        (Variant::Uffd, Some(p)) => {
            body["snapshot_path"] = json!(snap.state);
            body["mem_backend"] = json!({"backend_type": "Uffd", "backend_path": p.socket});
        }
        (Variant::FileLayered, _) => {
            body["layers"] = json!({"store": snap.store, "build_id": snap.build});
        }
        (Variant::UffdLayered, Some(p)) => {
            body["layers"] = json!({"store": snap.store, "build_id": snap.build});
            body["mem_backend"] = json!({"backend_type": "Uffd", "backend_path": p.socket});
        }
        _ => bail!("no restore request for {variant:?}"),
    }
    let mut cmd = Command::new(&setup.vmm);
    cmd.arg("--api-sock").arg(&sock).args(["--id", &tag]);
    let mut vm = setup.spawn(Monitor::Wrenn, &tag, cmd)?;
    let pager_tail = |pager: &Option<PagerProcess>| {
        pager
            .as_ref()
            .map(|p| format!("\nwrenn-pager log (last lines):\n{}", p.log_tail()))
            .unwrap_or_default()
    };
    bench_vmm::wait_api(&mut vm.child, &sock)?;
    let (status, text) = bench_vmm::http_with_timeout(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&body.to_string()),
        RESTORE_TIMEOUT,
    )
    .context("PUT /snapshot/load")?;
    ensure!(
        status == 204,
        "PUT /snapshot/load {body}: {status} {text}\n{}{}",
        vm.tails(),
        pager_tail(&pager)
    );
    let running = vm.started.elapsed();
    let deadline = vm.started + RESTORE_TIMEOUT;
    vsock_echo(&mut vm, &uds, cid, deadline).with_context(|| pager_tail(&pager))?;
    let answered = Some(vm.started.elapsed());
    Ok(Restored {
        vm,
        pager,
        running,
        answered,
    })
}

fn restore_qemu(setup: &Setup, snaps: &Snapshots, tag: &str, cid: u32) -> Result<Restored> {
    let qmp_path = setup.path(&format!("{tag}.qmp"));
    let cmd = setup.qemu(snaps.size, &qmp_path, cid, true);
    let mut vm = setup.spawn(Monitor::Qemu, tag, cmd)?;
    let deadline = vm.started + RESTORE_TIMEOUT;
    let mut qmp = Qmp::connect(&qmp_path, &mut vm, deadline)?;
    // `-incoming defer`: the MIGRATION events must be on before the load starts, so that
    // its end is an event rather than something to poll for (polling QMP would take the
    // single CPU from the load it waits for).
    qmp.execute("migrate-set-capabilities", Some(migration_events()))?;
    let uri = setup.migrate.incoming(&snaps.qemu);
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    let end = qmp
        .wait_migration(deadline)
        .with_context(|| format!("QEMU loading {}\n{}", snaps.qemu.display(), vm.tails()))?;
    ensure!(
        end["status"] == "completed",
        "QEMU's load of {} ended {end}\n{}",
        snaps.qemu.display(),
        vm.tails()
    );
    // QEMU changes the run state before it reports completion; the stream was saved
    // stopped, so the VM is paused now whatever -S says.
    qmp.cont()?;
    let running = vm.started.elapsed();
    let answered = if setup.qemu_vsock.is_ok() {
        vsock_echo(&mut vm, Path::new(""), cid, deadline)?;
        Some(vm.started.elapsed())
    } else {
        None
    };
    Ok(Restored {
        vm,
        pager: None,
        running,
        answered,
    })
}

/// [`CLONES`] restores of `snaps` alive at once; samples the sums of their monitors' (and
/// pagers') Rss and Pss once every guest answered vsock.
fn clones(setup: &Setup, snaps: &Snapshots, variant: Variant) -> Result<()> {
    let mut live = Vec::new();
    for i in 0..CLONES {
        let tag = format!("clone-{i}");
        live.push(restore(setup, snaps, variant, &tag, GUEST_CID + i, &[])?);
    }
    let (mut monitors, mut pagers) = (Resident::default(), Resident::default());
    for clone in &live {
        monitors.add(Resident::of(clone.vm.pid())?);
        if let Some(pager) = &clone.pager {
            pagers.add(Resident::of(pager.child.id())?);
        }
    }
    let (monitor, name) = (variant.monitor(), variant.name());
    let kib = bench_vmm::mib_of_kib;
    sample(
        monitor,
        &format!("clones_{name}_rss_mib"),
        kib(monitors.rss_kib),
    );
    sample(
        monitor,
        &format!("clones_{name}_pss_mib"),
        kib(monitors.pss_kib),
    );
    if variant.uses_pager() {
        sample(
            monitor,
            &format!("clones_{name}_pager_rss_mib"),
            kib(pagers.rss_kib),
        );
        sample(
            monitor,
            &format!("clones_{name}_pager_pss_mib"),
            kib(pagers.pss_kib),
        );
    }
    for clone in live {
        clone.end()?;
    }
    Ok(())
}

/// Resident memory of a process, from `/proc/PID/smaps_rollup`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Resident {
    rss_kib: u64,
    pss_kib: u64,
}

impl Resident {
    fn of(pid: u32) -> Result<Resident> {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Resident::parse(&text).with_context(|| format!("in {path}"))
    }

    /// The `Rss:` and `Pss:` lines (kB) of smaps_rollup text.
    fn parse(text: &str) -> Result<Resident> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| {
                    let mut words = rest.split_whitespace();
                    let value = words.next()?.parse::<u64>().ok()?;
                    (words.next() == Some("kB")).then_some(value)
                })
                .with_context(|| format!("no `{name} <n> kB` line"))
        };
        Ok(Resident {
            rss_kib: field("Rss:")?,
            pss_kib: field("Pss:")?,
        })
    }

    fn add(&mut self, other: Resident) {
        self.rss_kib = self.rss_kib.saturating_add(other.rss_kib);
        self.pss_kib = self.pss_kib.saturating_add(other.pss_kib);
    }
}

/// A command-line argument for the pager.
type OsArg = std::ffi::OsString;

/// A `wrenn-pager` serving one VM: its socket, its statistics output and its log.
struct PagerProcess {
    child: Child,
    socket: PathBuf,
    out: PathBuf,
    log: PathBuf,
}

impl Drop for PagerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl PagerProcess {
    /// Starts `wrenn-pager --socket <tag>.pager.sock SOURCE...` and waits until it listens.
    fn spawn(setup: &Setup, tag: &str, source: &[OsArg]) -> Result<PagerProcess> {
        let socket = setup.path(&format!("{tag}.pager.sock"));
        let out = setup.path(&format!("{tag}.pager.out"));
        let log = setup.path(&format!("{tag}.pager.log"));
        let create =
            |p: &Path| fs::File::create(p).with_context(|| format!("creating {}", p.display()));
        let child = Command::new(&setup.pager)
            .arg("--socket")
            .arg(&socket)
            .args(source)
            .stdin(Stdio::null())
            .stdout(create(&out)?)
            .stderr(create(&log)?)
            .spawn()
            .context("starting wrenn-pager")?;
        let mut pager = PagerProcess {
            child,
            socket,
            out,
            log,
        };
        let deadline = Instant::now() + API_TIMEOUT;
        // Not a connect probe: the pager would take it for its VMM.
        while !fs::symlink_metadata(&pager.socket).is_ok_and(|m| m.file_type().is_socket()) {
            if let Some(status) = pager.child.try_wait()? {
                bail!(
                    "wrenn-pager exited ({status}) before listening on {}\n{}",
                    pager.socket.display(),
                    pager.log_tail()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "wrenn-pager did not listen on {} within {API_TIMEOUT:?}\n{}",
                pager.socket.display(),
                pager.log_tail()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // bind() makes the file just before listen(): leave it that moment.
        std::thread::sleep(Duration::from_millis(20));
        Ok(pager)
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        wrenn_image::command::last_lines(&log, 20)
    }

    /// Waits for the pager to exit now that its VM is gone, asking with SIGTERM if it does
    /// not; returns what it printed (its statistics).
    fn finish(&mut self) -> Result<String> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let mut deadline = Instant::now() + PAGER_EXIT_TIMEOUT;
        let mut asked = false;
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                ensure!(
                    !asked,
                    "wrenn-pager did not exit after its VM ended and SIGTERM\n{}",
                    self.log_tail()
                );
                let pid = i32::try_from(self.child.id()).context("pid out of range")?;
                kill(Pid::from_raw(pid), Signal::SIGTERM).context("signalling wrenn-pager")?;
                asked = true;
                deadline = Instant::now() + PAGER_EXIT_TIMEOUT;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(fs::read_to_string(&self.out).unwrap_or_default())
    }
}

/// The figures of a pager's statistics JSON (`faults`, `bytes_copied`,
/// `fault_latency.p50_ns`, `around_pages`, `prefetched_pages`, wherever they sit in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PagerFigures {
    faults: u64,
    bytes_copied: u64,
    p50_ns: Option<u64>,
    /// Pages fault-around installed (absent from pagers without fault-around).
    around_pages: Option<u64>,
    prefetched_pages: Option<u64>,
}

impl PagerFigures {
    /// From the pager's output: the last JSON document carrying the counters (one per line,
    /// or the whole output pretty-printed).
    fn parse(output: &str) -> Option<PagerFigures> {
        let documents = std::iter::once(output).chain(output.lines().rev());
        documents
            .filter_map(|text| serde_json::from_str::<Value>(text.trim()).ok())
            .find_map(|doc| {
                Some(PagerFigures {
                    faults: find_u64(&doc, "faults", 0)?,
                    bytes_copied: find_u64(&doc, "bytes_copied", 0)?,
                    p50_ns: find_u64(&doc, "p50_ns", 0),
                    around_pages: find_u64(&doc, "around_pages", 0),
                    prefetched_pages: find_u64(&doc, "prefetched_pages", 0),
                })
            })
    }
}

/// The first number under `key` in `value`, depth first (at most a few levels: this is a
/// small statistics document).
fn find_u64(value: &Value, key: &str, depth: usize) -> Option<u64> {
    if depth > 8 {
        return None;
    }
    match value {
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_u64)
            .or_else(|| map.values().find_map(|v| find_u64(v, key, depth + 1))),
        Value::Array(items) => items.iter().find_map(|v| find_u64(v, key, depth + 1)),
        _ => None,
    }
}

/// One vsock round trip to the echo server, retried (a restored guest drops connections
/// once, and a fresh one may not answer at first) until `deadline`; fails at once when the
/// monitor exits. `uds` is wrenn-vmm's vsock socket, `cid` QEMU's guest.
fn vsock_echo(vm: &mut Vm, uds: &Path, cid: u32, deadline: Instant) -> Result<()> {
    let monitor = vm.monitor;
    vsock_retrying(vm, deadline, |timeout| {
        let mut stream = bench_vmm::vsock_connect(monitor, uds, cid, ECHO_PORT, timeout)?;
        let message = [0x5a_u8; PING_BYTES];
        let mut back = [0_u8; PING_BYTES];
        stream.write_all(&message)?;
        stream.read_exact(&mut back)?;
        ensure!(back == message, "the echo differs");
        Ok(())
    })
}

/// Has the guest write [`DIRTY_MIB`] of pattern `tag` to /dev/shm; returns when it is done.
fn dirty(vm: &mut Vm, uds: &Path, cid: u32, tag: u8) -> Result<()> {
    let monitor = vm.monitor;
    let deadline = Instant::now() + SAVE_TIMEOUT;
    let mut stream = vsock_retrying(vm, deadline, |timeout| {
        bench_vmm::vsock_connect(monitor, uds, cid, DIRTY_PORT, timeout)
    })?;
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut request = (DIRTY_MIB << 20).to_be_bytes().to_vec();
    request.push(tag);
    stream.write_all(&request)?;
    let mut done = [0_u8; 4];
    stream
        .read_exact(&mut done)
        .context("waiting for the guest to write /dev/shm")?;
    ensure!(&done == b"done", "the guest's dirtier answered {done:?}");
    Ok(())
}

/// Runs `attempt` (given its time limit) until it succeeds, the VM's process exits, or
/// `deadline` passes.
fn vsock_retrying<T>(
    vm: &mut Vm,
    deadline: Instant,
    mut attempt: impl FnMut(Duration) -> Result<T>,
) -> Result<T> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = left.clamp(Duration::from_millis(1), ATTEMPT_TIMEOUT);
        let error = match attempt(timeout) {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if let Some(status) = vm.child.try_wait()? {
            bail!(
                "the monitor exited ({status}) before its guest answered vsock\n{}",
                vm.tails()
            );
        }
        if Instant::now() + RETRY_PAUSE >= deadline {
            return Err(error.context(format!(
                "the guest did not answer vsock in time\n{}",
                vm.tails()
            )));
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// QMP arguments that turn on QEMU's `MIGRATION` events.
fn migration_events() -> Value {
    json!({"capabilities": [{"capability": "events", "state": true}]})
}

/// One line of QMP, parsed.
#[derive(Debug, Clone, PartialEq)]
enum QmpMessage {
    Greeting,
    Return(Value),
    Error(String),
    Event(String, Value),
}

impl QmpMessage {
    fn parse(line: &str) -> Result<QmpMessage> {
        let value: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("QMP sent something that is not JSON: {line:?}"))?;
        if let Some(ret) = value.get("return") {
            return Ok(QmpMessage::Return(ret.clone()));
        }
        if let Some(error) = value.get("error") {
            let field = |k: &str| {
                error
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned()
            };
            return Ok(QmpMessage::Error(format!(
                "{}: {}",
                field("class"),
                field("desc")
            )));
        }
        if let Some(event) = value.get("event").and_then(Value::as_str) {
            let data = value.get("data").cloned().unwrap_or(Value::Null);
            return Ok(QmpMessage::Event(event.to_owned(), data));
        }
        if value.get("QMP").is_some() {
            return Ok(QmpMessage::Greeting);
        }
        bail!("QMP sent an unknown message: {line:?}")
    }
}

/// A QMP connection: commands and the events that arrive in between.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<(String, Value)>,
}

impl Qmp {
    /// Connects (retrying until QEMU has made its socket), reads the greeting and leaves
    /// capability negotiation.
    fn connect(path: &Path, vm: &mut Vm, deadline: Instant) -> Result<Qmp> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) => {
                    if let Some(status) = vm.child.try_wait()? {
                        bail!("QEMU exited ({status}) before QMP answered\n{}", vm.tails());
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "QMP on {} did not answer in time: {e}\n{}",
                        path.display(),
                        vm.tails()
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        };
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        match qmp.read(deadline)? {
            QmpMessage::Greeting => {}
            other => bail!("expected the QMP greeting, got {other:?}"),
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self, deadline: Instant) -> Result<QmpMessage> {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "QMP: no answer in time");
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        ensure!(n > 0, "QEMU closed its QMP socket");
        QmpMessage::parse(&line)
    }

    /// Runs one command; its `return` value.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let deadline = Instant::now() + SAVE_TIMEOUT;
        let mut message = json!({ "execute": command });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        writeln!(self.writer, "{message}").with_context(|| format!("sending QMP {command}"))?;
        loop {
            match self
                .read(deadline)
                .with_context(|| format!("QMP {command}"))?
            {
                QmpMessage::Return(value) => return Ok(value),
                QmpMessage::Error(e) => bail!("QMP {command}: {e}"),
                QmpMessage::Event(name, data) => self.events.push((name, data)),
                QmpMessage::Greeting => bail!("QMP {command}: a second greeting"),
            }
        }
    }

    /// `cont`, once QEMU's migration thread has finished tidying up: the `MIGRATION
    /// completed` event can come a moment before QEMU accepts `cont` ("Migration is not
    /// finalized yet").
    fn cont(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.execute("cont", None) {
                Ok(_) => return Ok(()),
                Err(e) if e.to_string().contains("not finalized") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Migrates the (stopped) VM to `file`; returns the time from the request to the
    /// `MIGRATION` event saying it completed.
    fn migrate(&mut self, via: MigrateVia, file: &Path) -> Result<Duration> {
        let started = Instant::now();
        self.execute("migrate", Some(json!({"uri": via.outgoing(file)})))?;
        let end = self
            .wait_migration(started + SAVE_TIMEOUT)
            .context("waiting for QEMU's migration")?;
        let took = started.elapsed();
        ensure!(
            end["status"] == "completed",
            "QEMU's migration to {} ended {end}",
            file.display()
        );
        Ok(took)
    }

    /// Waits for the `MIGRATION` event that ends a migration (in or out); returns its data.
    fn wait_migration(&mut self, deadline: Instant) -> Result<Value> {
        let is_end = |name: &str, data: &Value| {
            name == "MIGRATION"
                && matches!(
                    data["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
        };
        loop {
            if let Some(at) = self.events.iter().position(|(n, d)| is_end(n, d)) {
                return Ok(self.events.remove(at).1);
            }
            match self.read(deadline)? {
                QmpMessage::Event(name, data) => self.events.push((name, data)),
                other => bail!("unexpected QMP message during migration: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_snap_script_serves_the_ports_the_host_uses() {
        for (port, role) in [(ECHO_PORT, "echo"), (DIRTY_PORT, "dirty")] {
            assert!(
                SNAP_SCRIPT.contains(&format!("L({port},{role})")),
                "{port} {role}"
            );
        }
        assert!(SNAP_SCRIPT.contains("VSOCK_READY"));
    }

    #[test]
    fn test_snap_script_fits_on_the_kernel_command_line() {
        let encoded = wrenn_image::qemu::base64(SNAP_SCRIPT.as_bytes());
        // Room left for the rest of the line and the monitors' virtio_mmio.device entries.
        assert!(encoded.len() < 1500, "{} bytes", encoded.len());
    }

    #[test]
    fn test_migrate_via_by_qemu_version_file_from_8_2() {
        let line = |v: &str| format!("QEMU emulator version {v} (Debian 1:7.2+dfsg-7+deb12u18)");
        assert_eq!(MigrateVia::for_version(&line("7.2.22")), MigrateVia::Exec);
        assert_eq!(MigrateVia::for_version(&line("8.1.0")), MigrateVia::Exec);
        assert_eq!(MigrateVia::for_version(&line("8.2.0")), MigrateVia::File);
        assert_eq!(MigrateVia::for_version(&line("10.0.2")), MigrateVia::File);
        assert_eq!(MigrateVia::for_version("garbage"), MigrateVia::Exec);
        let file = Path::new("/tmp/x.mig");
        assert_eq!(MigrateVia::Exec.outgoing(file), "exec:cat > /tmp/x.mig");
        assert_eq!(MigrateVia::Exec.incoming(file), "exec:cat /tmp/x.mig");
        assert_eq!(MigrateVia::File.incoming(file), "file:/tmp/x.mig");
    }

    #[test]
    fn test_resident_parse_reads_rss_and_pss() {
        let text = "\
55d0c0000000-7ffd5a1f7000 ---p 00000000 00:00 0                          [rollup]
Rss:              123456 kB
Pss:               65432 kB
Pss_Anon:          60000 kB
Shared_Clean:       1000 kB
";
        assert_eq!(
            Resident::parse(text).unwrap(),
            Resident {
                rss_kib: 123_456,
                pss_kib: 65_432
            }
        );
    }

    #[test]
    fn test_resident_parse_missing_or_bad_pss_fails() {
        assert!(Resident::parse("Rss: 10 kB\n").is_err());
        assert!(Resident::parse("Rss: 10 kB\nPss: ten kB\n").is_err());
        assert!(Resident::parse("Rss: 10 kB\nPss: 10 MB\n").is_err());
    }

    #[test]
    fn test_qmp_parse_each_message_kind() {
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;
        assert_eq!(QmpMessage::parse(greeting).unwrap(), QmpMessage::Greeting);
        assert_eq!(
            QmpMessage::parse("{\"return\": {}}\r\n").unwrap(),
            QmpMessage::Return(json!({}))
        );
        assert_eq!(
            QmpMessage::parse(r#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap(),
            QmpMessage::Error("GenericError: no".into())
        );
        let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "completed"}}"#;
        assert_eq!(
            QmpMessage::parse(event).unwrap(),
            QmpMessage::Event("MIGRATION".into(), json!({"status": "completed"}))
        );
    }

    #[test]
    fn test_qmp_parse_garbage_and_unknown_fail() {
        assert!(QmpMessage::parse("not json").is_err());
        assert!(QmpMessage::parse("{\"something\": 1}").is_err());
        assert!(QmpMessage::parse("[1, 2]").is_err());
    }

    #[test]
    fn test_pager_figures_from_vm_stats_line() {
        let out = "some log line\n{\"name\":\"vm\",\"state\":{\"state\":\"ended\"},\"faults\":120,\
                   \"pages_copied\":100,\"bytes_copied\":409600,\"prefetched_pages\":3,\
                   \"around_pages\":1800,\
                   \"fault_latency\":{\"count\":120,\"p50_ns\":8000,\"p99_ns\":90000}}\n";
        assert_eq!(
            PagerFigures::parse(out),
            Some(PagerFigures {
                faults: 120,
                bytes_copied: 409_600,
                p50_ns: Some(8000),
                around_pages: Some(1800),
                prefetched_pages: Some(3),
            })
        );
    }

    #[test]
    fn test_pager_figures_from_pretty_pager_stats() {
        let out = "{\n  \"vms\": [{\"name\": \"a\", \"faults\": 7, \"bytes_copied\": 4096}],\n  \
                   \"totals\": {\"faults\": 7, \"bytes_copied\": 4096}\n}\n";
        assert_eq!(
            PagerFigures::parse(out),
            Some(PagerFigures {
                faults: 7,
                bytes_copied: 4096,
                p50_ns: None,
                around_pages: None,
                prefetched_pages: None,
            })
        );
    }

    #[test]
    fn test_pager_figures_without_counters_is_none() {
        assert_eq!(PagerFigures::parse(""), None);
        assert_eq!(PagerFigures::parse("{\"faults\": \"many\"}"), None);
        assert_eq!(PagerFigures::parse("error: no such file"), None);
    }

    #[test]
    fn test_split_unit_strips_the_suffix() {
        assert_eq!(
            split_unit("restore_uffd_256_vsock_ms"),
            ("restore_uffd_256_vsock", "ms")
        );
        assert_eq!(
            split_unit("diff_plain_bytes_mib"),
            ("diff_plain_bytes", "MiB")
        );
        assert_eq!(
            split_unit("pager_uffd_256_faults_n"),
            ("pager_uffd_256_faults", "")
        );
        assert_eq!(split_unit("x"), ("x", ""));
    }

    #[test]
    fn test_new_build_id_is_32_hex_digits_not_zero() {
        let id = new_build_id().unwrap();
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(id, "0".repeat(32));
        assert_ne!(id, new_build_id().unwrap());
    }

    #[test]
    fn test_rotated_puts_each_variant_first_in_turn() {
        let v = [1, 2, 3];
        assert_eq!(rotated(&v, 0), vec![1, 2, 3]);
        assert_eq!(rotated(&v, 1), vec![2, 3, 1]);
        assert_eq!(rotated(&v, 5), vec![3, 1, 2]);
        assert!(rotated::<u8>(&[], 3).is_empty());
    }

    #[test]
    fn test_variant_names_match_the_report_list() {
        let all = [
            Variant::File,
            Variant::Uffd,
            Variant::FileLayered,
            Variant::UffdLayered,
            Variant::UffdPrefetch,
            Variant::UffdLayeredPrefetch,
            Variant::Qemu,
        ];
        assert_eq!(all.map(Variant::name), VARIANT_NAMES);
    }

    #[test]
    fn test_prefetch_variants_restore_like_their_base_with_a_pager() {
        for (variant, base) in [
            (Variant::UffdPrefetch, Variant::Uffd),
            (Variant::UffdLayeredPrefetch, Variant::UffdLayered),
        ] {
            assert_eq!(variant.without_prefetch(), base);
            assert!(variant.prefetches() && variant.uses_pager());
            assert!(!base.prefetches());
        }
        for plain in [Variant::File, Variant::FileLayered, Variant::Qemu] {
            assert_eq!(plain.without_prefetch(), plain);
            assert!(!plain.prefetches() && !plain.uses_pager());
        }
    }

    #[test]
    fn test_prefetch_file_pages_from_its_size() {
        assert_eq!(prefetch_file_pages(24 + 4), Some(0));
        assert_eq!(prefetch_file_pages(24 + 8 * 1500 + 4), Some(1500));
        assert_eq!(
            prefetch_file_pages(27),
            None,
            "shorter than header and checksum"
        );
        assert_eq!(prefetch_file_pages(24 + 5 + 4), None, "not whole entries");
    }

    fn samples(pairs: &[(&str, &[f64])]) -> BTreeMap<String, Vec<f64>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect()
    }

    #[test]
    fn test_report_lines_ratios_and_result() {
        let s = samples(&[
            ("restore_uffd_1024_vsock_ms", &[10.0, 12.0, 11.0, 30.0, 9.0]),
            ("restore_qemu_1024_vsock_ms", &[220.0]),
            ("restore_qemu_1024_running_ms", &[200.0]),
            ("diff_dirtied_mib", &[64.0]),
            ("diff_plain_mem_mib", &[67.2]),
            ("diff_plain_time_ms", &[50.0]),
            ("diff_qemu_time_ms", &[500.0]),
            ("clones_uffd_pss_mib", &[100.0]),
            ("clones_uffd_pager_pss_mib", &[20.0]),
            ("clones_qemu_pss_mib", &[600.0]),
            ("restore_uffd_prefetch_1024_vsock_ms", &[6.6]),
            ("pager_uffd_prefetch_1024_faults_n", &[12.0]),
            ("pager_uffd_1024_around_pages_n", &[21000.0]),
        ]);
        let lines = report_lines(&s).unwrap();
        let has = |l: &str| lines.iter().any(|x| x == l);
        assert!(
            has("BENCH snapshot restore_uffd_1024_vsock_median=11.0ms"),
            "{lines:#?}"
        );
        assert!(
            has("BENCH snapshot restore_uffd_1024_vsock_p99=30.0ms"),
            "{lines:#?}"
        );
        assert!(
            has("BENCH snapshot restore_qemu_1024_vsock=220.0ms"),
            "{lines:#?}"
        );
        assert!(
            has("BENCH snapshot restore_uffd_1024_vsock_ratio=0.05x"),
            "{lines:#?}"
        );
        assert!(
            has("BENCH snapshot diff_plain_write_ratio=1.05x"),
            "{lines:#?}"
        );
        assert!(
            has("BENCH snapshot diff_plain_time_ratio=0.10x"),
            "{lines:#?}"
        );
        assert!(
            has("BENCH snapshot clones_uffd_with_pagers_pss_ratio=0.20x"),
            "{lines:#?}"
        );
        let result = lines.last().unwrap();
        assert!(result.starts_with("RESULT snapshot "), "{result}");
        assert_eq!(lines.iter().filter(|l| l.starts_with("RESULT")).count(), 1);
        for part in [
            " restore_uffd_1024_vsock_median=11.0ms",
            " restore_uffd_1024_vsock_p99=30.0ms",
            " restore_qemu_1024_running=200.0ms",
            " restore_uffd_1024_vsock_ratio=0.05x",
            " diff_plain_mem=67.2MiB",
            " restore_uffd_prefetch_1024_vsock=6.6ms",
            " restore_uffd_prefetch_1024_vsock_ratio=0.03x",
            " pager_uffd_prefetch_1024_faults=12",
            " pager_uffd_1024_around_pages=21000",
        ] {
            assert!(result.contains(part), "{part} missing from {result}");
        }
    }

    #[test]
    fn test_report_lines_without_the_main_restores_fails() {
        let s = samples(&[("diff_plain_time_ms", &[50.0])]);
        let err = report_lines(&s).unwrap_err().to_string();
        assert!(err.contains("restore_uffd_1024_vsock_ms"), "{err}");
    }

    proptest! {
        #[test]
        fn proptest_resident_parse_never_panics(text in "\\PC*") {
            let _ = Resident::parse(&text);
        }

        #[test]
        fn proptest_resident_parse_reads_any_values(rss: u64, pss: u64) {
            let text = format!("x [rollup]\nRss: {rss} kB\nPss: {pss} kB\n");
            prop_assert_eq!(Resident::parse(&text).unwrap(), Resident { rss_kib: rss, pss_kib: pss });
        }

        #[test]
        fn proptest_qmp_parse_never_panics(text in "\\PC*") {
            let _ = QmpMessage::parse(&text);
        }

        #[test]
        fn proptest_pager_figures_never_panics(text in "\\PC*") {
            let _ = PagerFigures::parse(&text);
        }

        #[test]
        fn proptest_migrate_via_never_panics(text in "\\PC*") {
            let _ = MigrateVia::for_version(&text);
        }
    }
}
