//! Running the external tools a build needs (make, debootstrap, mkfs.ext4, qemu) with errors
//! that name the command and show the end of its output.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors from running an external command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not start `{program}`; is it installed?")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}){}", fmt_tail(.log, .tail))]
    Failed {
        command: String,
        status: String,
        log: Option<PathBuf>,
        tail: String,
    },
    #[error("could not create log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn fmt_tail(log: &Option<PathBuf>, tail: &str) -> String {
    let mut s = String::new();
    if !tail.is_empty() {
        s.push_str(":\n");
        s.push_str(tail);
    }
    if let Some(log) = log {
        s.push_str(&format!("\n(full log: {})", log.display()));
    }
    s
}

/// A printable form of a command line.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, capturing its output; fails with the output's last lines.
pub fn run(cmd: &mut Command) -> Result<String, CommandError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(CommandError::Failed {
        command: describe(cmd),
        status: out.status.to_string(),
        log: None,
        tail: last_lines(&text, 20),
    })
}

/// Runs `cmd` with stdout and stderr going to `log`; fails with the log's last lines.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<(), CommandError> {
    run_streamed(cmd, log, |_| {})
}

/// Runs `cmd` with its stdout and stderr written to `log`, calling `on_line` with each stdout
/// line as it arrives (for progress); fails with the log's last lines.
pub fn run_streamed(
    cmd: &mut Command,
    log: &Path,
    mut on_line: impl FnMut(&str),
) -> Result<(), CommandError> {
    use std::io::{BufRead, BufReader, Write};
    let log_err = |source| CommandError::Log {
        path: log.into(),
        source,
    };
    let mut file = File::create(log).map_err(log_err)?;
    let err = file.try_clone().map_err(log_err)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
            on_line(&line);
        }
    }
    let status = child.wait().map_err(log_err)?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Err(CommandError::Failed {
        command: describe(cmd),
        status: status.to_string(),
        log: Some(log.to_owned()),
        tail: last_lines(&text, 30),
    })
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_run_failure_names_command_and_output() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn test_run_missing_program_says_so() {
        let err = run(&mut Command::new("wrenn-no-such-program")).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }
}
