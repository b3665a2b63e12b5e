//! `cargo xtask proto`: regenerate `crates/proto/proto/descriptor.bin` from the `.proto` files
//! with Debian's `protoc` (installed when missing). The build reads the checked-in descriptor
//! set, so building never needs `protoc`; `crates/proto/tests/descriptor.rs` fails when the
//! set is stale.
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The Debian package that provides `protoc` and the well-known types.
pub const PACKAGES: &[&str] = &["protobuf-compiler"];

pub fn run() -> Result<()> {
    wrenn_image::packages::ensure(PACKAGES)?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/proto/proto");
    let status = Command::new("protoc")
        .current_dir(&dir)
        .args([
            "--include_imports",
            "--include_source_info",
            "-I",
            ".",
            "-I",
            "/usr/include",
        ])
        .arg("--descriptor_set_out=descriptor.bin")
        .args(proto_files(&dir))
        .status()
        .context("running protoc")?;
    if !status.success() {
        bail!("protoc failed ({status})");
    }
    println!("wrote {}", dir.join("descriptor.bin").display());
    Ok(())
}

/// Every `.proto` file of the directory, sorted (the order the descriptor set holds them in).
fn proto_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".proto"))
        .collect();
    files.sort();
    files
}
