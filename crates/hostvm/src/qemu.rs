//! The QEMU process of one host VM: its command line and a handle that kills it on drop.
//!
//! QEMU is started through `setpriv --pdeathsig KILL`, so the kernel kills it when the thread
//! that started it dies, however that happens; it stays in the caller's process group, so a
//! Ctrl-C in the terminal reaches it too.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Instant;

use crate::HostVmError;
use crate::net::HostVmNetwork;

pub(crate) const QEMU: &str = "qemu-system-x86_64";

/// Kernel command line: console on the serial port (to a file on the host), a panic or reset
/// ends the VM at once (QEMU runs with -no-reboot), reset by triple fault (microvm has no
/// keyboard controller), no crypto self-tests at boot (~0.2 s under TCG), and an idle loop that
/// polls instead of halting: host VMs were seen frozen for good with their vCPU halted in the
/// idle loop and QEMU using no CPU (a wake-up lost by the emulated vCPU; `stall.txt` said
/// `HLT=1` at the idle loop's address), which a polling idle loop cannot miss.
const CMDLINE: &str = "console=ttyS0 panic=-1 reboot=t cryptomgr.notests idle=poll \
    initcall_blacklist=crypto_kdf108_init,load_system_certificate_list";

/// The kernel command line for this host and a kernel with timer frequency `hz`.
///
/// Under TCG the guest's TSC is the host's TSC, and the guest's own calibration against the
/// emulated PIT often fails when the host is busy (microvm has no other reference); the kernel
/// then hangs calibrating its delay loop (measured: 7 of 8 boots hung during a parallel kernel
/// build, 0 of 6 with the frequency given). `lpj` also spares each secondary vCPU a ~0.9 s
/// calibration.
///
/// With one vCPU, `tsc=reliable`: the kernel otherwise falls back to jiffies, a 4 ms clock that
/// makes every timing taken inside the host VM coarse. With several vCPUs the emulated TSCs
/// really are unsynchronized (they follow the host's), and forcing the TSC there hung the host
/// VM within minutes; such a host VM keeps jiffies.
///
/// `quiet` saves ~0.25 s of serial output; `verbose` (used after a failed boot) keeps the
/// kernel's messages in the console log to show where a boot stops. With `network`, init
/// finds eth0's address and gateway there (`wrenn.ip=`, `wrenn.gw=`: dotted, so the kernel
/// takes them for module parameters and neither warns nor passes them to init as arguments).
pub(crate) fn cmdline(hz: Option<u32>, cpus: u32, verbose: bool, network: bool) -> String {
    let mut line = CMDLINE.to_owned();
    if !verbose {
        line.push_str(" quiet");
    }
    if network {
        line.push(' ');
        line.push_str(&HostVmNetwork::kernel_args());
    }
    if let Some(khz) = host_tsc_khz() {
        line.push_str(&format!(" tsc_early_khz={khz}"));
        if cpus == 1 {
            line.push_str(" tsc=reliable");
        }
        if let Some(hz) = hz.filter(|hz| *hz > 0) {
            line.push_str(&format!(" lpj={}", khz * 1000 / u64::from(hz)));
        }
    }
    line
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo when the TSC has a constant rate.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    tsc_khz_from_cpuinfo(&cpuinfo)
}

fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let value = |key: &str| {
        cpuinfo
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key))
            .map(|(_, v)| v.trim())
    };
    if !value("flags")?
        .split_whitespace()
        .any(|f| f == "constant_tsc")
    {
        return None;
    }
    let (whole, frac) = value("cpu MHz")?
        .split_once('.')
        .unwrap_or((value("cpu MHz")?, ""));
    let frac = format!("{frac:0<3}");
    let khz = whole.parse::<u64>().ok()? * 1000 + frac.get(..3)?.parse::<u64>().ok()?;
    (khz > 0).then_some(khz)
}

/// Tag of the host's root, shared read-only.
pub(crate) const ROOT_TAG: &str = "hostroot";
/// Tag of the per-run directory (spec, status files, output, /tmp).
pub(crate) const RUN_TAG: &str = "wrennrun";

/// What one VM is made of.
#[derive(Debug)]
pub(crate) struct VmConfig<'a> {
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    pub cpu: &'a str,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The kernel's CONFIG_HZ, for `lpj=`.
    pub hz: Option<u32>,
    /// All kernel messages to the console log.
    pub verbose: bool,
    pub console_log: &'a Path,
    /// QMP monitor socket (asked what the VM is doing when it stalls).
    pub qmp_socket: &'a Path,
    pub run_share: &'a Path,
    /// Writable shares as (tag, host path).
    pub shares: &'a [(String, PathBuf)],
    /// User-mode networking with its forwards, when asked for.
    pub network: Option<&'a HostVmNetwork>,
}

/// QEMU's arguments for `cfg`.
pub(crate) fn args(cfg: &VmConfig<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: OsString| {
        args.push(name.into());
        args.push(value);
    };
    flag("-accel", "tcg,thread=multi".into());
    flag("-cpu", cfg.cpu.into());
    flag("-M", "microvm".into());
    flag("-smp", cfg.cpus.to_string().into());
    flag("-m", format!("{}M", cfg.memory_mib).into());
    flag("-kernel", cfg.vmlinux.into());
    flag("-initrd", cfg.initramfs.into());
    flag(
        "-append",
        cmdline(cfg.hz, cfg.cpus, cfg.verbose, cfg.network.is_some()).into(),
    );
    flag(
        "-chardev",
        concat(&[
            "file,id=console,path=".as_ref(),
            &escape(cfg.console_log.as_os_str()),
        ]),
    );
    flag("-serial", "chardev:console".into());
    flag(
        "-qmp",
        concat(&[
            "unix:".as_ref(),
            &escape(cfg.qmp_socket.as_os_str()),
            ",server=on,wait=off".as_ref(),
        ]),
    );
    let mut fs_share = |id: &str, tag: &str, path: &Path, readonly: bool| {
        let options = if readonly { ",readonly=on" } else { "" };
        flag(
            "-fsdev",
            concat(&[
                format!("local,id={id},path=").as_ref(),
                &escape(path.as_os_str()),
                format!(",security_model=none,multidevs=remap{options}").as_ref(),
            ]),
        );
        flag(
            "-device",
            format!("virtio-9p-device,fsdev={id},mount_tag={tag}").into(),
        );
    };
    fs_share("fsroot", ROOT_TAG, Path::new("/"), true);
    fs_share("fsrun", RUN_TAG, cfg.run_share, false);
    for (tag, path) in cfg.shares {
        fs_share(&format!("fs{tag}"), tag, path, false);
    }
    if let Some(network) = cfg.network {
        // Created after the 9p devices, so that the network takes the next virtio-mmio
        // transport and the shares keep theirs.
        flag("-netdev", network.netdev("net0").into());
        flag("-device", "virtio-net-device,netdev=net0".into());
    }
    for switch in ["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"] {
        args.push(switch.into());
    }
    args
}

fn concat(parts: &[&OsStr]) -> OsString {
    let mut s = OsString::new();
    for part in parts {
        s.push(part);
    }
    s
}

/// QEMU option values escape `,` as `,,`.
fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// A running QEMU; dropping it kills it.
#[derive(Debug)]
pub(crate) struct Qemu {
    child: Child,
    pub launched: Instant,
    exited: Option<ExitStatus>,
}

impl Qemu {
    /// Starts QEMU with its own output going to `log`.
    pub fn launch(cfg: &VmConfig<'_>, log: &Path) -> Result<Qemu, HostVmError> {
        let io = |source| HostVmError::Io {
            path: log.to_owned(),
            source,
        };
        let out = File::create(log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", QEMU])
            .args(args(cfg))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        tracing::debug!(command = %wrenn_image::command::describe(&cmd), "starting the host VM");
        let child = cmd.spawn().map_err(|source| HostVmError::Spawn {
            program: "setpriv (util-linux)".into(),
            source,
        })?;
        Ok(Qemu {
            child,
            launched: Instant::now(),
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, HostVmError> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().map_err(|source| HostVmError::Spawn {
                program: QEMU.into(),
                source,
            })?;
        }
        Ok(self.exited)
    }

    /// Kills QEMU (if still running) and reaps it.
    pub fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => self.exited = Some(status),
            Err(e) => tracing::warn!(pid = self.child.id(), error = %e, "cannot reap QEMU"),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tsc_khz_from_cpuinfo_needs_constant_tsc() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2600.5\nflags\t\t: fpu tsc constant_tsc\n";
        assert_eq!(tsc_khz_from_cpuinfo(info), Some(2_600_500));
        let info = "cpu MHz\t\t: 2600.000\nflags\t\t: fpu tsc\n";
        assert_eq!(tsc_khz_from_cpuinfo(info), None);
        assert_eq!(tsc_khz_from_cpuinfo("flags: constant_tsc\n"), None);
    }

    #[test]
    fn test_escape_doubles_commas() {
        assert_eq!(escape(OsStr::new("/a,b,,c")), OsString::from("/a,,b,,,,c"));
    }

    #[test]
    fn test_args_share_root_readonly_and_run_dir_writable() {
        let shares = [("wrenn0".to_owned(), PathBuf::from("/work/x,y"))];
        let cfg = VmConfig {
            vmlinux: Path::new("/c/vmlinux"),
            initramfs: Path::new("/c/initramfs.cpio"),
            cpu: "max",
            cpus: 2,
            memory_mib: 4096,
            hz: Some(250),
            verbose: false,
            console_log: Path::new("/r/console.log"),
            qmp_socket: Path::new("/r/qmp.sock"),
            run_share: Path::new("/r/guest"),
            shares: &shares,
            network: None,
        };
        let args: Vec<String> = args(&cfg)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let after = |flag: &str| -> Vec<&str> {
            args.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(after("-smp"), ["2"]);
        assert_eq!(after("-m"), ["4096M"]);
        assert_eq!(
            after("-fsdev"),
            [
                "local,id=fsroot,path=/,security_model=none,multidevs=remap,readonly=on",
                "local,id=fsrun,path=/r/guest,security_model=none,multidevs=remap",
                "local,id=fswrenn0,path=/work/x,,y,security_model=none,multidevs=remap",
            ]
        );
        assert!(after("-device").contains(&"virtio-9p-device,fsdev=fswrenn0,mount_tag=wrenn0"));
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(after("-netdev").is_empty(), "no network unless asked");
        assert!(!after("-append")[0].contains("wrenn.ip="));
    }

    #[test]
    fn test_args_with_network_add_slirp_nic_and_kernel_args() {
        let network = HostVmNetwork::new().forward("127.0.0.1:15008".parse().unwrap(), 5008);
        let cfg = VmConfig {
            vmlinux: Path::new("/c/vmlinux"),
            initramfs: Path::new("/c/initramfs.cpio"),
            cpu: "max",
            cpus: 1,
            memory_mib: 1024,
            hz: None,
            verbose: false,
            console_log: Path::new("/r/console.log"),
            qmp_socket: Path::new("/r/qmp.sock"),
            run_share: Path::new("/r/guest"),
            shares: &[],
            network: Some(&network),
        };
        let args: Vec<String> = args(&cfg)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let at = args.iter().position(|a| a == "-netdev").unwrap();
        assert!(
            args[at + 1].contains("hostfwd=tcp:127.0.0.1:15008-10.0.2.15:5008"),
            "{}",
            args[at + 1]
        );
        assert_eq!(args[at + 3], "virtio-net-device,netdev=net0");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.contains("wrenn.ip=10.0.2.15/24 wrenn.gw=10.0.2.2"),
            "{append}"
        );
    }
}
