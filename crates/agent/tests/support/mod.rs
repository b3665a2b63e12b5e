//! What the agent's VM tests share: the `wrenn-vmm` binary, the cache's kernel and images.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use wrenn_image::cache::Cache;
use wrenn_image::rootfs::{self, IMAGE_FILE, ImageKind};

/// `WRENN_VMM`, else `wrenn-vmm` next to this test's `deps` directory (where a workspace build
/// puts every package's binaries).
pub fn vmm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WRENN_VMM").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("wrenn-vmm"))
        .unwrap();
    assert!(
        path.is_file(),
        "no wrenn-vmm at {} (cargo build -p wrenn-vmm, or set WRENN_VMM)",
        path.display()
    );
    path
}

pub fn kernel() -> PathBuf {
    wrenn_image::kernel::find(&Cache::from_env())
        .expect("guest kernel (run `cargo xtask guest`)")
        .file("vmlinux")
}

pub fn image(kind: ImageKind) -> PathBuf {
    rootfs::find(&Cache::from_env(), kind)
        .expect("guest image holding the current static envd (run `cargo xtask guest`)")
        .file(IMAGE_FILE)
}
