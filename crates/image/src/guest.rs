//! Everything a guest needs, built together: the kernel and both root filesystem images.

use crate::cache::{Cache, CacheError, Entry};
use crate::kernel::{self, KernelError};
use crate::packages::{self, PackagesError};
use crate::rootfs::{self, ImageKind, RootfsError};

/// One buildable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Kernel,
    Test,
    Base,
}

impl std::str::FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kernel" => Ok(Part::Kernel),
            "test" => Ok(Part::Test),
            "base" => Ok(Part::Base),
            other => Err(format!(
                "unknown part {other:?}: expected kernel, test or base"
            )),
        }
    }
}

/// Errors from building the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Packages(#[from] PackagesError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
}

/// Every system package that building the guest needs.
pub fn build_packages() -> Vec<&'static str> {
    let mut all = kernel::BUILD_PACKAGES.to_vec();
    all.extend_from_slice(rootfs::BUILD_PACKAGES);
    all
}

/// The built artifacts (each present when it was asked for).
#[derive(Debug, Default)]
pub struct Guest {
    pub kernel: Option<Entry>,
    pub test: Option<Entry>,
    pub base: Option<Entry>,
}

/// Builds the requested parts (all when `only` is empty); `rebuild` discards cached ones first.
pub fn build(cache: &Cache, only: &[Part], rebuild: bool) -> Result<Guest, GuestError> {
    packages::ensure(&build_packages())?;
    let wanted = |p: Part| only.is_empty() || only.contains(&p);
    let mut guest = Guest::default();
    if wanted(Part::Kernel) {
        if rebuild {
            cache.remove(
                kernel::CACHE_KIND,
                &kernel::cache_key(&kernel::source_version()?),
            )?;
        }
        guest.kernel = Some(kernel::build(cache)?);
    }
    for (part, kind) in [(Part::Test, ImageKind::Test), (Part::Base, ImageKind::Base)] {
        if !wanted(part) {
            continue;
        }
        if rebuild {
            rootfs::remove(cache, kind)?;
        }
        let entry = rootfs::build(cache, kind)?;
        match kind {
            ImageKind::Test => guest.test = Some(entry),
            ImageKind::Base => guest.base = Some(entry),
        }
    }
    Ok(guest)
}

/// Finds the already built parts (all when `only` is empty) without building anything.
pub fn find(cache: &Cache, only: &[Part]) -> Result<Guest, GuestError> {
    let wanted = |p: Part| only.is_empty() || only.contains(&p);
    Ok(Guest {
        kernel: wanted(Part::Kernel)
            .then(|| kernel::find(cache))
            .transpose()?,
        test: wanted(Part::Test)
            .then(|| rootfs::find(cache, ImageKind::Test))
            .transpose()?,
        base: wanted(Part::Base)
            .then(|| rootfs::find(cache, ImageKind::Base))
            .transpose()?,
    })
}

impl Guest {
    /// One line per artifact: path, size, and how long its build took when it was made.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if let Some(k) = &self.kernel {
            out.push_str(&format!(
                "kernel  {}  {:.1} MiB  linux {} (source {}), built in {:.0} s\n",
                k.file("vmlinux").display(),
                k.manifest.files.get("vmlinux").map_or(0, |f| f.size) as f64 / f64::from(1 << 20),
                k.manifest
                    .notes
                    .get("kernel_release")
                    .map_or("?", String::as_str),
                k.manifest
                    .notes
                    .get("source_version")
                    .map_or("?", String::as_str),
                k.manifest.build_seconds,
            ));
        }
        for (name, entry) in [("test", &self.test), ("base", &self.base)] {
            if let Some(e) = entry {
                out.push_str(&format!(
                    "{name:<6}  {}  {} MiB ({} MiB allocated), built in {:.0} s\n",
                    e.file(rootfs::IMAGE_FILE).display(),
                    e.manifest
                        .notes
                        .get("image_mib")
                        .map_or("?", String::as_str),
                    e.manifest
                        .notes
                        .get("allocated_mib")
                        .map_or("?", String::as_str),
                    e.manifest.build_seconds,
                ));
            }
        }
        out
    }
}
