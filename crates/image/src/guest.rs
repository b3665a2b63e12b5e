//! Everything a guest needs, built together: the kernel and both root filesystem images (which
//! hold the static envd).

use crate::cache::{Cache, CacheError, Entry};
use crate::envd::{self, Envd, EnvdError};
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
    #[error(transparent)]
    Envd(#[from] EnvdError),
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

/// Whether `only` (all when empty) asks for an image, which needs envd.
pub fn wants_image(only: &[Part]) -> bool {
    only.is_empty() || only.contains(&Part::Test) || only.contains(&Part::Base)
}

/// Builds the requested parts (all when `only` is empty) with the envd that
/// [`envd::locate`] finds; `rebuild` discards cached ones first.
pub fn build(cache: &Cache, only: &[Part], rebuild: bool) -> Result<Guest, GuestError> {
    let envd = if wants_image(only) {
        Some(envd::locate()?)
    } else {
        None
    };
    build_with(cache, only, rebuild, envd.as_ref())
}

/// Builds the requested parts (all when `only` is empty), the images holding `envd` (needed
/// when an image is asked for); `rebuild` discards cached ones first.
pub fn build_with(
    cache: &Cache,
    only: &[Part],
    rebuild: bool,
    envd: Option<&Envd>,
) -> Result<Guest, GuestError> {
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
        let envd = match envd {
            Some(envd) => envd,
            None => &envd::locate()?,
        };
        if rebuild {
            rootfs::remove(cache, kind, envd)?;
        }
        let entry = rootfs::build(cache, kind, envd)?;
        match kind {
            ImageKind::Test => guest.test = Some(entry),
            ImageKind::Base => guest.base = Some(entry),
        }
    }
    Ok(guest)
}

/// Finds the already built parts (all when `only` is empty) without building anything; the
/// images are those holding the envd that [`envd::locate`] finds.
pub fn find(cache: &Cache, only: &[Part]) -> Result<Guest, GuestError> {
    let wanted = |p: Part| only.is_empty() || only.contains(&p);
    let envd = if wants_image(only) {
        Some(envd::locate()?)
    } else {
        None
    };
    let image = |part: Part, kind: ImageKind| -> Result<Option<Entry>, GuestError> {
        match &envd {
            Some(envd) if wanted(part) => Ok(Some(rootfs::find_with(cache, kind, envd)?)),
            _ => Ok(None),
        }
    };
    Ok(Guest {
        kernel: wanted(Part::Kernel)
            .then(|| kernel::find(cache))
            .transpose()?,
        test: image(Part::Test, ImageKind::Test)?,
        base: image(Part::Base, ImageKind::Base)?,
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
                    "{name:<6}  {}  {} MiB ({} MiB allocated), envd {}, built in {:.0} s\n",
                    e.file(rootfs::IMAGE_FILE).display(),
                    e.manifest
                        .notes
                        .get("image_mib")
                        .map_or("?", String::as_str),
                    e.manifest
                        .notes
                        .get("allocated_mib")
                        .map_or("?", String::as_str),
                    e.manifest
                        .notes
                        .get("envd_sha256")
                        .map_or("?", |h| h.get(..12).unwrap_or(h)),
                    e.manifest.build_seconds,
                ));
            }
        }
        out
    }
}
