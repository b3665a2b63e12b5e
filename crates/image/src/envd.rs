//! envd, the in-guest daemon, as an input of the images: a static binary (no dynamic loader,
//! no shared libraries: it runs as PID 1 in any root filesystem) installed at [`GUEST_PATH`].
//!
//! The binary is built from this workspace with `cargo build --release --target
//! x86_64-unknown-linux-gnu` and `-C target-feature=+crt-static`, in a target directory of its
//! own ([`static_target_dir`]) so that the changed flags do not invalidate the normal build.
//! `WRENN_ENVD=<path>` names a ready binary instead; both [`ensure`] and [`locate`] honour it,
//! so the images a build made are the images a later lookup finds. The binary's content hash is
//! part of the images' cache keys: a new envd makes new images.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cache::{self, CacheError};
use crate::progress::Step;

/// Where images install envd.
pub const GUEST_PATH: &str = "/usr/bin/envd";
/// Boot with `init=` this to run envd as PID 1.
pub const INIT_ARG: &str = "init=/usr/bin/envd";
/// The Rust target envd is built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Names a prebuilt static envd to use instead of building one.
pub const ENV_OVERRIDE: &str = "WRENN_ENVD";
/// The package and binary names in the workspace.
const PACKAGE: &str = "wrenn-envd";
const BINARY: &str = "envd";

/// Errors from building or checking envd.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error(
        "no envd binary at {path}: run `cargo xtask guest` (it builds a static envd) or set \
         {ENV_OVERRIDE}"
    )]
    Missing { path: PathBuf },
    #[error("{path} is not a static x86-64 ELF executable: {reason}")]
    NotStatic { path: PathBuf, reason: String },
    #[error("could not start cargo to build envd")]
    Spawn(#[source] std::io::Error),
    #[error("building the static envd failed ({status}); the command was: {command}")]
    Build { status: String, command: String },
    #[error("the workspace source is not at {0}; set {ENV_OVERRIDE} to a static envd")]
    NoWorkspace(PathBuf),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// A checked static envd binary and the hash of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envd {
    pub path: PathBuf,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

impl Envd {
    /// Checks that `path` is a static x86-64 executable and hashes it.
    pub fn open(path: &Path) -> Result<Envd, EnvdError> {
        if !path.is_file() {
            return Err(EnvdError::Missing { path: path.into() });
        }
        check_static(path)?;
        Ok(Envd {
            path: path.to_owned(),
            sha256: cache::sha256_file(path)?,
        })
    }
}

/// The workspace this crate was compiled from (where envd's source is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// The static build's own target directory: `$CARGO_TARGET_DIR/envd-static`, else
/// `<workspace>/target/envd-static` (a relative `CARGO_TARGET_DIR` counts from the workspace).
pub fn static_target_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    workspace_root().join(base).join("envd-static")
}

/// Where the static build leaves the binary.
pub fn static_path() -> PathBuf {
    static_target_dir()
        .join(TARGET)
        .join("release")
        .join(BINARY)
}

/// The envd the images are built from: `WRENN_ENVD` if set, else the static build's output.
/// Nothing is built.
pub fn locate() -> Result<Envd, EnvdError> {
    match override_path() {
        Some(path) => Envd::open(&path),
        None => Envd::open(&static_path()),
    }
}

/// The envd to build images from: `WRENN_ENVD` if set, else a fresh static build of the
/// workspace's envd (cargo makes this quick when nothing changed).
pub fn ensure() -> Result<Envd, EnvdError> {
    match override_path() {
        Some(path) => Envd::open(&path),
        None => build_static(),
    }
}

fn override_path() -> Option<PathBuf> {
    std::env::var_os(ENV_OVERRIDE)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The cargo command that builds the static envd.
pub fn static_build_command() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "-p", PACKAGE, "--bin", BINARY])
        .args(["--target", TARGET])
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", static_target_dir())
        // RUSTFLAGS with an explicit --target reaches only the target's crates, not build
        // scripts or proc macros (which must stay dynamic). An encoded form would win over it.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // Symbols stay (backtraces name functions); line tables would make the binary
        // (and every image) about four times larger.
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    cmd
}

/// Builds the workspace's envd as a static binary and checks the result. Cargo's own output
/// goes to this process's stderr.
pub fn build_static() -> Result<Envd, EnvdError> {
    let root = workspace_root();
    if !root.join("crates/envd/Cargo.toml").is_file() {
        return Err(EnvdError::NoWorkspace(root));
    }
    let step = Step::start("building static envd");
    let mut cmd = static_build_command();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(EnvdError::Spawn)?;
    if !status.success() {
        return Err(EnvdError::Build {
            status: status.to_string(),
            command: format!(
                "RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=debuginfo \
                 CARGO_TARGET_DIR={} {}",
                static_target_dir().display(),
                crate::command::describe(&cmd)
            ),
        });
    }
    let envd = Envd::open(&static_path())?;
    step.finish(&format!(
        "{} (sha256 {})",
        envd.path.display(),
        &envd.sha256[..12]
    ));
    Ok(envd)
}

/// ELF constants this check needs.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;
const ELF64_HEADER_LEN: usize = 64;
const ELF64_PHDR_LEN: usize = 56;

/// Fails unless `path` is an x86-64 ELF executable without a program interpreter: that is,
/// linked statically (plain or static-pie), so it needs nothing from the image to start.
pub fn check_static(path: &Path) -> Result<(), EnvdError> {
    let io = |source| EnvdError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(io)?
        // The headers are at the start; program headers sit right after the ELF header.
        .take(64 * 1024)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    static_reason(&bytes).map_or(Ok(()), |reason| {
        Err(EnvdError::NotStatic {
            path: path.to_owned(),
            reason,
        })
    })
}

/// Why the ELF image starting with `bytes` is not a static x86-64 executable, or `None`.
fn static_reason(bytes: &[u8]) -> Option<String> {
    if bytes.len() < ELF64_HEADER_LEN || &bytes[..4] != ELF_MAGIC {
        return Some("not an ELF file".into());
    }
    if bytes[4] != ELFCLASS64 || bytes[5] != ELFDATA2LSB {
        return Some("not 64-bit little-endian".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let kind = u16_at(0x10);
    if kind != ET_EXEC && kind != ET_DYN {
        return Some(format!("ELF type {kind} is not an executable"));
    }
    if u16_at(0x12) != EM_X86_64 {
        return Some(format!("machine {} is not x86-64", u16_at(0x12)));
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&bytes[0x20..0x28]);
    let phoff = u64::from_le_bytes(phoff);
    let entsize = usize::from(u16_at(0x36));
    let count = usize::from(u16_at(0x38));
    if entsize < ELF64_PHDR_LEN {
        return Some(format!("program header size {entsize}"));
    }
    let Some(start) = usize::try_from(phoff).ok() else {
        return Some("program headers out of range".into());
    };
    let end = entsize
        .checked_mul(count)
        .and_then(|len| start.checked_add(len));
    if end.is_none_or(|end| end > bytes.len()) {
        return Some("program headers out of range".into());
    }
    let has_interp = (0..count).any(|i| {
        let at = start + i * entsize;
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) == PT_INTERP
    });
    has_interp.then(|| "it has a program interpreter (dynamically linked)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_check_static_dynamic_binary_is_refused() {
        // The test binary itself is linked dynamically (the normal build's flags).
        let me = std::env::current_exe().unwrap();
        let err = check_static(&me).unwrap_err();
        assert!(err.to_string().contains("program interpreter"), "{err}");
    }

    #[test]
    fn test_check_static_busybox_static_passes() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            eprintln!("SKIPPED: no /bin/busybox (busybox-static)");
            return;
        }
        check_static(busybox).unwrap();
    }

    #[test]
    fn test_check_static_text_file_is_not_elf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envd");
        std::fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
        let err = Envd::open(&path).unwrap_err();
        assert!(err.to_string().contains("not an ELF file"), "{err}");
    }

    #[test]
    fn test_static_reason_truncated_program_headers_refused() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let mut head = me[..ELF64_HEADER_LEN].to_vec();
        head[0x38] = 0xff; // many program headers, none present
        let reason = static_reason(&head).unwrap();
        assert!(reason.contains("out of range"), "{reason}");
    }

    #[test]
    fn test_open_missing_file_says_how_to_build() {
        let err = Envd::open(Path::new("/nonexistent/envd")).unwrap_err();
        assert!(err.to_string().contains("cargo xtask guest"), "{err}");
    }

    #[test]
    fn test_static_path_is_under_workspace_target() {
        let path = static_path();
        assert!(path.ends_with("envd-static/x86_64-unknown-linux-gnu/release/envd"));
        assert!(workspace_root().join("crates/envd/Cargo.toml").is_file());
    }
}
