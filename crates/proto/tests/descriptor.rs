//! The checked-in descriptor set (what the build generates code from) must be the one the
//! `.proto` files compile to; `cargo xtask proto` regenerates it.
use std::path::Path;
use std::process::Command;

#[test]
fn descriptor_set_matches_the_proto_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let out = tempfile::NamedTempFile::new().unwrap();
    let protoc = std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into());
    let status = Command::new(&protoc)
        .current_dir(&dir)
        .args([
            "--include_imports",
            "--include_source_info",
            "-I",
            ".",
            "-I",
            "/usr/include",
        ])
        .arg(format!("--descriptor_set_out={}", out.path().display()))
        .args(proto_files(&dir))
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {protoc} (Debian: protobuf-compiler; `cargo xtask test` installs it): {e}"
            )
        });
    assert!(status.success());
    let fresh = std::fs::read(out.path()).unwrap();
    let checked_in = std::fs::read(dir.join("descriptor.bin")).unwrap();
    assert!(
        fresh == checked_in,
        "proto/descriptor.bin is stale: run `cargo xtask proto` and commit it"
    );
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
