//! Boots a kernel and root filesystem under QEMU's `microvm` machine and watches the serial
//! console: the reference the project's images are proven with, and the baseline our own VMM
//! is measured against.
//!
//! The root image is attached read-only, so booting a cached image never changes it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::command::{self, last_lines};
use crate::rootfs::{INIT_PATH, READY_MARKER};

/// Packages a boot needs.
pub const PACKAGES: &[&str] = &["qemu-system-x86"];

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware (or nested) KVM: `-enable-kvm -cpu host`.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// Errors from a QEMU boot.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("could not start qemu-system-x86_64 (apt-get install qemu-system-x86)")]
    Spawn(#[source] std::io::Error),
    #[error("the guest did not finish within {timeout:?}; console so far:\n{console_tail}")]
    Timeout {
        timeout: Duration,
        console_tail: String,
    },
}

/// One guest boot's settings.
#[derive(Debug, Clone)]
pub struct Boot {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
    /// Print kernel messages on the console (slow when nested: each byte is a VM exit).
    pub verbose: bool,
    pub timeout: Duration,
}

/// What a boot showed.
#[derive(Debug, Clone)]
pub struct BootOutcome {
    /// Everything the guest printed on its console.
    pub console: String,
    /// From QEMU's start to the init's ready marker.
    pub ready_after: Option<Duration>,
    /// The guest's own uptime when it printed the marker (its kernel's boot plus init).
    pub guest_uptime: Option<Duration>,
    /// The exit code of the `wrenn_run` script, when one was given.
    pub run_exit: Option<i32>,
    /// From QEMU's start to its exit.
    pub total: Duration,
}

impl Boot {
    /// Defaults for a small guest: 2 vCPUs, 256 MiB, a 120 s limit.
    pub fn new(kernel: &Path, rootfs: &Path, accel: Accel) -> Self {
        Boot {
            kernel: kernel.to_owned(),
            rootfs: rootfs.to_owned(),
            accel,
            cpus: 2,
            memory_mib: 256,
            extra_cmdline: String::new(),
            verbose: false,
            timeout: Duration::from_secs(120),
        }
    }

    /// Has the guest's init run `script` with /bin/sh (as root) before it resets.
    pub fn run_script(mut self, script: &str) -> Self {
        self.extra_cmdline
            .push_str(&format!(" wrenn_run={}", base64(script.as_bytes())));
        self
    }

    /// The kernel command line this boot uses.
    pub fn cmdline(&self) -> String {
        let mut line = format!(
            "console=ttyS0 reboot=t panic=-1 root=/dev/vda ro rootfstype=ext4 init={INIT_PATH}"
        );
        if !self.verbose {
            line.push_str(" quiet");
        }
        line.push_str(&self.extra_cmdline);
        line
    }

    /// The QEMU command for this boot.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        match self.accel {
            Accel::Kvm => cmd.args(["-enable-kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
        };
        cmd.args([
            "-M",
            "microvm,acpi=off,pcie=off,rtc=off",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-no-reboot", "-serial", "stdio"])
        .args([
            "-smp",
            &self.cpus.to_string(),
            "-m",
            &self.memory_mib.to_string(),
        ])
        .arg("-kernel")
        .arg(&self.kernel)
        .args(["-append", &self.cmdline()])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            self.rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"]);
        cmd
    }

    /// Boots, waits for QEMU to exit (the init resets the VM when done), and reports.
    pub fn run(&self) -> Result<BootOutcome, QemuError> {
        let mut cmd = self.command();
        tracing::debug!(command = %command::describe(&cmd), "starting qemu");
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(QemuError::Spawn)?;
        let mut guard = KillOnDrop(child);
        let (tx, rx) = mpsc::channel();
        let stdout = guard.0.stdout.take();
        let stderr = guard.0.stderr.take();
        let tx_err = tx.clone();
        std::thread::spawn(move || forward_lines(stdout, &tx));
        std::thread::spawn(move || forward_lines(stderr, &tx_err));

        let deadline = started + self.timeout;
        let mut console = String::new();
        let mut ready_after = None;
        let mut guest_uptime = None;
        let mut run_exit = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let line = line.trim_end_matches('\r');
                    if ready_after.is_none() && line.contains(READY_MARKER) {
                        ready_after = Some(started.elapsed());
                        guest_uptime = parse_uptime(line);
                    }
                    if let Some(code) = parse_exit(line) {
                        run_exit = Some(code);
                    }
                    console.push_str(line);
                    console.push('\n');
                }
                // Both streams closed: QEMU has exited.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(QemuError::Timeout {
                        timeout: self.timeout,
                        console_tail: last_lines(&console, 30),
                    });
                }
            }
        }
        let _ = guard.0.wait();
        Ok(BootOutcome {
            console,
            ready_after,
            guest_uptime,
            run_exit,
            total: started.elapsed(),
        })
    }
}

/// `WRENN_EXIT=3` -> 3. Kernel messages printed while the serial port drains can land on the
/// same line (`WRENN_EXIT=0sysrq: Resetting`), so only the leading digits count.
fn parse_exit(line: &str) -> Option<i32> {
    let rest = &line[line.find("WRENN_EXIT=")? + "WRENN_EXIT=".len()..];
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().ok()
}

/// `WRENN_GUEST_READY uptime=0.84` -> 0.84 s.
fn parse_uptime(line: &str) -> Option<Duration> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uptime="))?;
    Duration::try_from_secs_f64(value.parse().ok()?).ok()
}

fn forward_lines(stream: Option<impl std::io::Read>, tx: &mpsc::Sender<String>) {
    let Some(stream) = stream else { return };
    for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
        if tx
            .send(String::from_utf8_lossy(&line).into_owned())
            .is_err()
        {
            return;
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Standard base64 with padding (the guest decodes it with `base64 -d`).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn test_parse_uptime_reads_marker_suffix() {
        assert_eq!(
            parse_uptime("WRENN_GUEST_READY uptime=0.84"),
            Some(Duration::from_millis(840))
        );
        assert_eq!(parse_uptime("WRENN_GUEST_READY"), None);
        assert_eq!(parse_uptime("WRENN_GUEST_READY uptime=-1"), None);
    }

    #[test]
    fn test_parse_exit_ignores_kernel_text_on_the_same_line() {
        assert_eq!(parse_exit("WRENN_EXIT=0"), Some(0));
        assert_eq!(parse_exit("WRENN_EXIT=0sysrq: Resetting"), Some(0));
        assert_eq!(parse_exit("WRENN_EXIT=127"), Some(127));
        assert_eq!(parse_exit("WRENN_EXIT="), None);
        assert_eq!(parse_exit("hello"), None);
    }

    #[test]
    fn test_cmdline_carries_script_and_init() {
        let boot = Boot::new(Path::new("k"), Path::new("r"), Accel::Kvm).run_script("true\n");
        let line = boot.cmdline();
        assert!(line.contains("init=/sbin/wrenn-init"), "{line}");
        assert!(line.contains("wrenn_run=dHJ1ZQo="), "{line}");
        assert!(line.contains(" quiet"), "{line}");
    }
}
