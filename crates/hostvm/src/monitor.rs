//! What a stalled host VM was doing, asked of QEMU before it is killed.
//!
//! The host VM has been seen to stop making progress for minutes under nested guests. To tell a
//! spinning guest from one waiting for an interrupt that never comes (or QEMU itself stuck), the
//! stall report samples QEMU's CPU time and asks its QMP monitor for the vCPU registers twice.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one monitor answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The interval over which QEMU's CPU use is measured.
const CPU_SAMPLE: Duration = Duration::from_secs(2);
/// The unit of /proc CPU times: 100 on every architecture Linux supports.
const USER_HZ: f64 = 100.0;

/// A report for a person: QEMU's CPU use, run state and registers. Never fails: what could not
/// be learned is said in the report.
pub(crate) fn stall_report(qemu_pid: u32, qmp_socket: &Path) -> String {
    let mut report = String::new();
    let before = cpu_ticks(qemu_pid);
    std::thread::sleep(CPU_SAMPLE);
    let after = cpu_ticks(qemu_pid);
    match (before, after) {
        (Some(b), Some(a)) => {
            let busy = a.saturating_sub(b) as f64 / USER_HZ / CPU_SAMPLE.as_secs_f64();
            let _ = writeln!(report, "QEMU CPU use: {:.0}%", busy * 100.0);
        }
        _ => report.push_str("QEMU CPU use: unknown\n"),
    }
    match ask(qmp_socket) {
        Ok(text) => report.push_str(&text),
        Err(e) => {
            let _ = writeln!(report, "QMP monitor: {e}");
        }
    }
    report
}

/// The one-line gist of a report: CPU use and the first vCPU's instruction pointer.
pub(crate) fn summary(report: &str) -> String {
    let cpu = report
        .lines()
        .find_map(|l| l.strip_prefix("QEMU CPU use: "))
        .unwrap_or("unknown");
    let rip = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("RIP="))
        .unwrap_or("unknown");
    let halted = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("HLT="))
        .unwrap_or("?");
    format!("QEMU CPU {cpu}, vCPU RIP={rip} HLT={halted}")
}

/// User plus system CPU ticks of every thread of `pid`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Run state and registers (twice, a second apart, to see whether RIP moves), from QMP.
fn ask(socket: &Path) -> Result<String, std::io::Error> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?; // the greeting
    let mut command = |json: &str| -> Result<String, std::io::Error> {
        writer.write_all(json.as_bytes())?;
        writer.write_all(b"\n")?;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            // Asynchronous events come on the same stream; the answer has "return" or "error".
            if let Some(answer) = value.get("return") {
                return Ok(match answer {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
            if let Some(error) = value.get("error") {
                return Ok(format!("error: {error}"));
            }
        }
    };
    command(r#"{"execute":"qmp_capabilities"}"#)?;
    let hmp = |cmd: &str| {
        format!(r#"{{"execute":"human-monitor-command","arguments":{{"command-line":"{cmd}"}}}}"#)
    };
    let mut out = String::new();
    let _ = writeln!(out, "status: {}", command(r#"{"execute":"query-status"}"#)?);
    out.push_str(&command(&hmp("info registers"))?);
    std::thread::sleep(Duration::from_secs(1));
    out.push_str("--- one second later\n");
    out.push_str(&command(&hmp("info registers"))?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_summary_finds_cpu_rip_and_halt_state() {
        let report = "QEMU CPU use: 98%\nstatus: {}\nRAX=0 RBX=1\nRIP=ffffffff8100362d RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n";
        assert_eq!(
            summary(report),
            "QEMU CPU 98%, vCPU RIP=ffffffff8100362d HLT=1"
        );
        assert_eq!(
            summary("QMP monitor: refused"),
            "QEMU CPU unknown, vCPU RIP=unknown HLT=?"
        );
    }

    #[test]
    fn test_cpu_ticks_of_this_process() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(cpu_ticks(u32::MAX).is_none());
    }
}
