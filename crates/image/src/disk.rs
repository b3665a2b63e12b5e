//! Free-space checks before big builds, so a full disk gives a clear message up front rather
//! than a half-written artifact and a compiler's complaint.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{self, CommandError};

/// Errors from checking free space.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error(
        "not enough free disk space in {path}: {free_mib} MiB free, {what} needs {need_mib} MiB; \
         free some space or point WRENN_CACHE_DIR at a larger disk"
    )]
    TooLittle {
        path: PathBuf,
        free_mib: u64,
        need_mib: u64,
        what: String,
    },
    #[error("cannot read free space of {path}")]
    Df {
        path: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("cannot parse `df` output for {path}: {output:?}")]
    Parse { path: PathBuf, output: String },
}

/// Bytes available to this user on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, SpaceError> {
    let out = command::run(Command::new("df").args(["--output=avail", "-B1"]).arg(path)).map_err(
        |source| SpaceError::Df {
            path: path.to_owned(),
            source,
        },
    )?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| SpaceError::Parse {
            path: path.to_owned(),
            output: out.clone(),
        })
}

/// Fails clearly unless `path`'s filesystem has `need_mib` MiB free for `what`.
pub fn require_free(path: &Path, need_mib: u64, what: &str) -> Result<(), SpaceError> {
    let free_mib = free_bytes(path)? >> 20;
    if free_mib < need_mib {
        return Err(SpaceError::TooLittle {
            path: path.to_owned(),
            free_mib,
            need_mib,
            what: what.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_require_free_impossible_amount_fails_clearly() {
        let err = require_free(Path::new("/"), u64::MAX >> 21, "a test").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("not enough free disk space"), "{msg}");
        assert!(msg.contains("a test needs"), "{msg}");
    }

    #[test]
    fn test_free_bytes_of_root_is_positive() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
    }
}
