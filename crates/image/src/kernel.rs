//! The guest kernel: Debian's `linux-source-6.1` with the checked-in microVM config fragment
//! (`guest/kernel/microvm.config`), built as an uncompressed ELF `vmlinux` (PVH note, 64-bit
//! entry) and as a `bzImage` (the same kernel, compressed).
//!
//! The fragment is applied with `allnoconfig` + `KCONFIG_ALLCONFIG`, completed with
//! `olddefconfig`, and then checked line by line: an option Kconfig silently dropped (an unmet
//! dependency) fails the build instead of producing a kernel without it. The unpacked source
//! tree is kept in the cache's work area so that a config change rebuilds incrementally; the
//! finished kernel is a cache entry keyed by the fragment, the source package version and
//! [`RECIPE_VERSION`].

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, Cache, CacheError, Entry};
use crate::command::{self, CommandError};
use crate::disk::{self, SpaceError};
use crate::packages::{self, PackagesError};
use crate::progress::Step;

/// The microVM kernel config fragment, embedded so the built binaries carry their recipe.
pub const CONFIG_FRAGMENT: &str = include_str!("../../../guest/kernel/microvm.config");

/// Bumped when the build steps change in a way that changes the result.
pub const RECIPE_VERSION: &str = "2";

/// Cache kind of kernel entries.
pub const CACHE_KIND: &str = "kernel";

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
const TREE_NAME: &str = "linux-source-6.1";
/// Unpacked source plus objects take ~1.6 GiB.
const BUILD_SPACE_MIB: u64 = 2500;

/// Packages the kernel build needs.
pub const BUILD_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];

/// Errors from building the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Packages(#[from] PackagesError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error("kernel build step failed")]
    Step(#[from] CommandError),
    #[error("cannot read the installed {SOURCE_PACKAGE} version")]
    SourceVersion(#[source] CommandError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the config fragment asks for options Kconfig dropped (unmet dependencies?):\n  {}",
        .0.join("\n  ")
    )]
    DroppedOptions(Vec<String>),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The installed source package's Debian version (part of the cache key).
pub fn source_version() -> Result<String, KernelError> {
    let out =
        command::run(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))
            .map_err(KernelError::SourceVersion)?;
    Ok(out.trim().to_owned())
}

/// The cache key of the kernel that the current recipe and source would produce.
pub fn cache_key(source_version: &str) -> String {
    cache::key_of(&[
        CONFIG_FRAGMENT.as_bytes(),
        source_version.as_bytes(),
        RECIPE_VERSION.as_bytes(),
    ])
}

/// The cached kernel for the installed source, if it has been built.
pub fn find(cache: &Cache) -> Result<Entry, KernelError> {
    Ok(cache.get(CACHE_KIND, &cache_key(&source_version()?))?)
}

/// Returns the cached kernel, building it first if needed. The entry holds `vmlinux`,
/// `bzImage` and `config`; its notes record the source version and kernel release.
pub fn build(cache: &Cache) -> Result<Entry, KernelError> {
    packages::ensure(BUILD_PACKAGES)?;
    let version = source_version()?;
    let key = cache_key(&version);
    cache.get_or_build(CACHE_KIND, &key, |staging| {
        build_into(cache, &version, staging)
    })
}

fn build_into(
    cache: &Cache,
    version: &str,
    staging: &Path,
) -> Result<BTreeMap<String, String>, KernelError> {
    let work = cache.work_dir(&format!("linux-{version}"))?;
    disk::require_free(&work, BUILD_SPACE_MIB, "the kernel build")?;
    // One build at a time per source tree, whatever the config.
    let lock_path = work.join(".lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    let tree = work.join(TREE_NAME);
    let unpacked_marker = work.join(".unpacked");
    if !unpacked_marker.exists() {
        let step = Step::start(format!("unpacking {SOURCE_PACKAGE} {version}"));
        if tree.exists() {
            fs::remove_dir_all(&tree).map_err(io_err(&tree))?;
        }
        command::run(
            Command::new("tar")
                .arg("-xf")
                .arg(SOURCE_TARBALL)
                .arg("-C")
                .arg(&work),
        )?;
        fs::write(&unpacked_marker, version).map_err(io_err(&unpacked_marker))?;
        step.finish("done");
    }

    let fragment = work.join("microvm.config");
    fs::write(&fragment, CONFIG_FRAGMENT).map_err(io_err(&fragment))?;
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.current_dir(&tree).arg("ARCH=x86_64").args(args);
        cmd
    };
    let config_log = work.join("config.log");
    let mut allno = make(&["allnoconfig"]);
    allno.env("KCONFIG_ALLCONFIG", &fragment);
    command::run_logged(&mut allno, &config_log)?;
    command::run_logged(&mut make(&["olddefconfig"]), &config_log)?;
    let config_path = tree.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let dropped = dropped_options(CONFIG_FRAGMENT, &config);
    if !dropped.is_empty() {
        return Err(KernelError::DroppedOptions(dropped));
    }

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let step = Step::start(format!(
        "building guest kernel (make -j{jobs} vmlinux bzImage)"
    ));
    let mut compiled = 0u32;
    command::run_streamed(
        &mut make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]),
        &work.join("build.log"),
        |line| {
            let line = line.trim_start();
            if line.starts_with("CC") || line.starts_with("AS") || line.starts_with("LD") {
                compiled += 1;
                step.message(&format!("{compiled} objects, {line}"));
            }
        },
    )?;
    let release = command::run(&mut make(&["-s", "kernelrelease"]))?
        .trim()
        .to_owned();
    let vmlinux = tree.join("vmlinux");
    fs::copy(&vmlinux, staging.join("vmlinux")).map_err(io_err(&vmlinux))?;
    // The same kernel compressed, for VMMs and tests that boot the bzImage format.
    let bzimage = tree.join("arch/x86/boot/bzImage");
    fs::copy(&bzimage, staging.join("bzImage")).map_err(io_err(&bzimage))?;
    fs::write(staging.join("config"), &config).map_err(io_err(staging))?;
    let size = fs::metadata(staging.join("vmlinux")).map_or(0, |m| m.len());
    step.finish(&format!(
        "vmlinux {release}, {:.1} MiB",
        size as f64 / f64::from(1 << 20)
    ));
    Ok(BTreeMap::from([
        ("source_version".to_owned(), version.to_owned()),
        ("kernel_release".to_owned(), release),
    ]))
}

/// Lines of `fragment` that the final `config` does not honour.
pub fn dropped_options(fragment: &str, config: &str) -> Vec<String> {
    let actual = parse_config(config);
    parse_config(fragment)
        .into_iter()
        .filter(|(name, want)| {
            let have = actual.get(name).map_or("n", String::as_str);
            have != want
        })
        .map(|(name, want)| {
            let have = actual.get(&name).map_or("not set", String::as_str);
            format!("CONFIG_{name}={want} (got {have})")
        })
        .collect()
}

/// Option name (without `CONFIG_`) to value, with `# CONFIG_X is not set` as `n`.
fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                out.insert(name.to_owned(), "n".to_owned());
            }
        } else if let Some((name, value)) = line
            .strip_prefix("CONFIG_")
            .and_then(|rest| rest.split_once('='))
        {
            out.insert(name.to_owned(), value.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_dropped_options_reports_missing_and_changed() {
        let fragment = "# group\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=32\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=64\n";
        assert_eq!(
            dropped_options(fragment, config),
            vec![
                "CONFIG_B=y (got n)".to_owned(),
                "CONFIG_C=n (got y)".to_owned(),
                "CONFIG_N=32 (got 64)".to_owned(),
            ]
        );
    }

    #[test]
    fn test_dropped_options_absent_equals_not_set() {
        assert!(dropped_options("# CONFIG_X is not set\n", "CONFIG_A=y\n").is_empty());
    }

    #[test]
    fn test_fragment_has_what_the_vmm_needs() {
        let fragment = parse_config(CONFIG_FRAGMENT);
        for name in [
            "VIRTIO_MMIO_CMDLINE_DEVICES",
            "X86_MPPARSE",
            "PVH",
            "VIRTIO_BLK",
        ] {
            assert_eq!(fragment.get(name).map(String::as_str), Some("y"), "{name}");
        }
        assert_eq!(fragment.get("MODULES").map(String::as_str), Some("n"));
    }
}
