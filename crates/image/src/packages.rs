//! Debian packages the build and the host VM need, installed with apt when missing.
//!
//! Every entry point calls [`ensure`] with what it needs. When everything is present this is
//! one `dpkg-query` call and prints nothing; otherwise, as root, it runs `apt-get update` once
//! and installs the missing packages quietly. Without root, or off Debian, it says what to
//! install instead.

use std::process::{Command, Stdio};

/// Errors from checking or installing system packages.
#[derive(Debug, thiserror::Error)]
pub enum PackagesError {
    #[error(
        "missing system packages: {}; this needs Debian (or Ubuntu) with dpkg and apt-get",
        missing.join(" ")
    )]
    NotDebian { missing: Vec<String> },
    #[error(
        "missing system packages: {cmd}; run it as root",
        cmd = format!("apt-get install {}", missing.join(" "))
    )]
    NotRoot { missing: Vec<String> },
    #[error("`{command}` failed ({status}): {stderr}")]
    Apt {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Packages from `wanted` that are not installed.
pub fn missing(wanted: &[&str]) -> Result<Vec<String>, PackagesError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let out = match Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(wanted)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PackagesError::NotDebian {
                missing: wanted.iter().map(|s| (*s).to_owned()).collect(),
            });
        }
        Err(source) => {
            return Err(PackagesError::Spawn {
                program: "dpkg-query",
                source,
            });
        }
    };
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect();
    Ok(wanted
        .iter()
        .filter(|w| !installed.contains(w))
        .map(|s| (*s).to_owned())
        .collect())
}

/// Installs whatever of `wanted` is missing.
pub fn ensure(wanted: &[&str]) -> Result<(), PackagesError> {
    ensure_with(wanted, is_root())
}

fn ensure_with(wanted: &[&str], root: bool) -> Result<(), PackagesError> {
    let missing = missing(wanted)?;
    if missing.is_empty() {
        return Ok(());
    }
    if !root {
        return Err(PackagesError::NotRoot { missing });
    }
    tracing::info!(packages = %missing.join(" "), "installing system packages");
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().map(String::as_str));
    apt(&args)
}

fn apt(args: &[&str]) -> Result<(), PackagesError> {
    let out = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PackagesError::Spawn {
            program: "apt-get",
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(PackagesError::Apt {
        command: format!("apt-get {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

/// Whether this process runs as root (read from /proc to avoid unsafe FFI).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_missing_reports_unknown_package() {
        let missing = missing(&["dpkg", "wrenn-no-such-package-xyz"]).unwrap();
        assert_eq!(missing, vec!["wrenn-no-such-package-xyz".to_owned()]);
    }

    #[test]
    fn test_ensure_missing_without_root_says_what_to_install() {
        let err = ensure_with(&["dpkg", "wrenn-no-such-package-xyz"], false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("apt-get install wrenn-no-such-package-xyz"),
            "{msg}"
        );
        assert!(!msg.contains("dpkg "), "{msg}");
    }

    #[test]
    fn test_ensure_all_present_does_nothing() {
        ensure_with(&["dpkg", "coreutils"], false).unwrap();
    }

    #[test]
    fn test_missing_empty_list_is_empty() {
        assert!(missing(&[]).unwrap().is_empty());
    }
}
