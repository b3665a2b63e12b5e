//! Python virtual environments in the cache, for the test harnesses that drive Wrenn with tools
//! from PyPI (the E2B SDK, schemathesis). A venv is pinned by a requirements file listing every
//! package (installed as wheels, without resolving dependencies), rebuilt when that file or the
//! interpreter changes, and built under a file lock so that test processes running at once
//! build it once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::cache::Cache;
use crate::packages::{self, PackagesError};

/// Debian's interpreter (not whatever `python3` comes first on PATH).
pub const PYTHON: &str = "/usr/bin/python3";
/// The Debian packages a venv needs.
pub const PACKAGES: &[&str] = &["python3", "python3-venv"];
/// Written last into a built venv: its requirements' hash and the interpreter's version.
const STAMP: &str = ".wrenn-stamp";

#[derive(Debug, thiserror::Error)]
pub enum VenvError {
    #[error(transparent)]
    Packages(#[from] PackagesError),
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

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VenvError {
    let what = what.into();
    move |source| VenvError::Io { what, source }
}

/// `<cache>/<name>`, a venv holding exactly what `requirements` pins; built when missing or
/// when its stamp differs.
pub fn ensure(cache: &Cache, name: &str, requirements: &Path) -> Result<PathBuf, VenvError> {
    packages::ensure(PACKAGES)?;
    let root = cache.root();
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    let venv = root.join(name);
    let stamp_path = venv.join(STAMP);
    let pinned =
        std::fs::read(requirements).map_err(io(format!("reading {}", requirements.display())))?;
    let python = run(Command::new(PYTHON).arg("--version"))?;
    let stamp = format!("{:x} {}", Sha256::digest(&pinned), python.trim());
    let current = || std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
    if current() {
        return Ok(venv);
    }
    let lock_path = root.join(format!(".{name}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .map_err(io(format!("creating {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("locking {}", lock_path.display())))?;
    // Another process may have built it while we waited.
    if current() {
        return Ok(venv);
    }
    eprintln!("building the Python venv {}", venv.display());
    if venv.exists() {
        std::fs::remove_dir_all(&venv).map_err(io(format!("removing {}", venv.display())))?;
    }
    run(Command::new(PYTHON).arg("-m").arg("venv").arg(&venv))?;
    let pip = || {
        let mut pip = Command::new(venv.join("bin/python"));
        pip.args(["-m", "pip", "--disable-pip-version-check"]);
        pip
    };
    run(pip()
        .args([
            "install",
            "--quiet",
            "--no-input",
            "--no-deps",
            "--only-binary=:all:",
            "-r",
        ])
        .arg(requirements))?;
    run(pip().arg("check"))?;
    std::fs::write(&stamp_path, &stamp).map_err(io(format!("writing {}", stamp_path.display())))?;
    Ok(venv)
}

/// Runs `command`; its stdout, or an error with everything it printed.
fn run(command: &mut Command) -> Result<String, VenvError> {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {shown}")))?;
    if !out.status.success() {
        return Err(VenvError::Command {
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
