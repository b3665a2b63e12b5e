//! npm packages in the cache, for the test harnesses that drive Wrenn with tools from the npm
//! registry (the E2B JS SDK). A directory holding `package.json` and a committed
//! `package-lock.json` is installed with `npm ci` (exactly what the lock file pins, no install
//! scripts) into `<cache>/<name>/`, rebuilt when either file or the Node.js version changes,
//! and built under a file lock so that test processes running at once build it once.
//!
//! Node.js itself comes from the machine: when `node` is not on PATH, Debian's `nodejs` and
//! `npm` are installed; when the Node.js found does not satisfy the package's `engines.node`
//! range, the error says which version to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::cache::Cache;
use crate::packages::{self, PackagesError};

/// The Debian packages that bring `node` and `npm` when `node` is absent.
pub const PACKAGES: &[&str] = &["nodejs", "npm"];
/// The two files that pin an install.
const PINNED: [&str; 2] = ["package.json", "package-lock.json"];
/// Written last into a finished install: the pinned files' hash and the Node.js version.
const STAMP: &str = ".wrenn-stamp";

#[derive(Debug, thiserror::Error)]
pub enum NpmError {
    #[error(transparent)]
    Packages(#[from] PackagesError),
    #[error(
        "{dir} needs Node.js {range} (engines.node in its package.json) but `node --version` \
         says {found}; install a Node.js in that range (Debian trixie's nodejs, or NodeSource's \
         nodejs 22) and run again"
    )]
    NodeVersion {
        dir: PathBuf,
        range: String,
        found: String,
    },
    #[error("engines.node in {path} is {range:?}, which this checker cannot read: {reason}")]
    Range {
        path: PathBuf,
        range: String,
        reason: String,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NpmError {
    let what = what.into();
    move |source| NpmError::Io { what, source }
}

/// `<cache>/<name>`, holding a copy of `dir`'s `package.json` and `package-lock.json` and the
/// `node_modules/` that `npm ci` made from them; installed when missing or when its stamp
/// differs. Fails when Node.js is older (or newer) than `engines.node` allows.
pub fn ensure(cache: &Cache, name: &str, dir: &Path) -> Result<PathBuf, NpmError> {
    if which("node").is_none() {
        packages::ensure(PACKAGES)?;
    }
    let found = node_version()?;
    check_engines(dir, &found)?;
    let root = cache.root();
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    let target = root.join(name);
    let stamp_path = target.join(STAMP);
    let mut hasher = Sha256::new();
    for file in PINNED {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
        hasher.update(file.as_bytes());
        hasher.update(u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_le_bytes());
        hasher.update(&bytes);
    }
    let stamp = format!("{:x} node {found}", hasher.finalize());
    let current = || std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
    if current() {
        return Ok(target);
    }
    let lock_path = root.join(format!(".{name}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .map_err(io(format!("creating {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("locking {}", lock_path.display())))?;
    // Another process may have installed it while we waited.
    if current() {
        return Ok(target);
    }
    eprintln!("installing npm packages into {}", target.display());
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io(format!("removing {}", target.display())))?;
    }
    std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
    for file in PINNED {
        std::fs::copy(dir.join(file), target.join(file))
            .map_err(io(format!("copying {file} to {}", target.display())))?;
    }
    run(Command::new("npm")
        .args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .current_dir(&target))?;
    std::fs::write(&stamp_path, &stamp).map_err(io(format!("writing {}", stamp_path.display())))?;
    Ok(target)
}

/// `node --version` without its `v`, e.g. `20.20.2`.
pub fn node_version() -> Result<String, NpmError> {
    let out = run(Command::new("node").arg("--version"))?;
    Ok(out.trim().trim_start_matches('v').to_owned())
}

/// Checks `found` against `engines.node` of `dir/package.json`, if it has one.
fn check_engines(dir: &Path, found: &str) -> Result<(), NpmError> {
    let path = dir.join("package.json");
    let text = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&text).map_err(|source| NpmError::Json {
            path: path.clone(),
            source,
        })?;
    let Some(range) = manifest["engines"]["node"].as_str() else {
        return Ok(());
    };
    let bad_range = |reason: String| NpmError::Range {
        path: path.clone(),
        range: range.to_owned(),
        reason,
    };
    let version = parse_version(found).map_err(|reason| NpmError::NodeVersion {
        dir: dir.to_owned(),
        range: range.to_owned(),
        found: format!("{found} ({reason})"),
    })?;
    if satisfies(range, version).map_err(bad_range)? {
        Ok(())
    } else {
        Err(NpmError::NodeVersion {
            dir: dir.to_owned(),
            range: range.to_owned(),
            found: found.to_owned(),
        })
    }
}

type Version = (u64, u64, u64);

/// `20.18.1` (or `20.18`, `20`: missing parts are 0) as a triple.
fn parse_version(text: &str) -> Result<Version, String> {
    let core = text.split(['-', '+']).next().unwrap_or(text);
    let mut parts = core.split('.').map(|p| {
        p.parse::<u64>()
            .map_err(|_| format!("{p:?} is not a version number"))
    });
    let major = parts.next().ok_or("an empty version")??;
    let minor = parts.next().transpose()?.unwrap_or(0);
    let patch = parts.next().transpose()?.unwrap_or(0);
    if parts.next().is_some() {
        return Err(format!("{text:?} has more than three parts"));
    }
    Ok((major, minor, patch))
}

/// Whether `version` satisfies a semver range made of `||` alternatives, each a
/// space-separated list of comparisons (`>=20.18.1 <21 || >=22`), the form `engines` fields
/// use.
fn satisfies(range: &str, version: Version) -> Result<bool, String> {
    let mut any = false;
    for alternative in range.split("||") {
        let mut all = true;
        for comparison in alternative.split_whitespace() {
            let (op, rest) = ["<=", ">=", "<", ">", "="]
                .iter()
                .find_map(|op| comparison.strip_prefix(op).map(|rest| (*op, rest)))
                .unwrap_or(("=", comparison));
            let bound = parse_version(rest.trim_start_matches('v'))?;
            all &= match op {
                "<=" => version <= bound,
                ">=" => version >= bound,
                "<" => version < bound,
                ">" => version > bound,
                _ => version == bound,
            };
        }
        any |= all;
    }
    Ok(any)
}

/// The first `program` on PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// Runs `command`; its stdout, or an error with everything it printed.
fn run(command: &mut Command) -> Result<String, NpmError> {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {shown}")))?;
    if !out.status.success() {
        return Err(NpmError::Command {
            command: shown,
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_engines_range_of_e2b_2_51() {
        let range = ">=20.18.1 <21 || >=22";
        for (version, ok) in [
            ((20, 18, 1), true),
            ((20, 20, 2), true),
            ((20, 18, 0), false),
            ((18, 20, 4), false),
            ((21, 7, 3), false),
            ((22, 0, 0), true),
            ((24, 1, 0), true),
        ] {
            assert_eq!(satisfies(range, version), Ok(ok), "{version:?}");
        }
    }

    #[test]
    fn test_versions_parse_loosely_but_not_wrongly() {
        assert_eq!(parse_version("20.20.2"), Ok((20, 20, 2)));
        assert_eq!(parse_version("22"), Ok((22, 0, 0)));
        assert_eq!(parse_version("23.0.0-nightly2024"), Ok((23, 0, 0)));
        assert!(parse_version("x.1").is_err());
        assert!(satisfies("^20", (20, 1, 0)).is_err());
    }

    #[test]
    fn test_too_old_node_is_named_with_the_range() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("package.json"),
            r#"{"engines": {"node": ">=20.18.1"}}"#,
        )
        .unwrap();
        let err = check_engines(dir.path(), "18.20.4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs Node.js >=20.18.1"), "{err}");
        assert!(err.contains("says 18.20.4"), "{err}");
        check_engines(dir.path(), "20.18.1").unwrap();
    }
}
