//! Root filesystem images: ext4 files made from a directory tree with `mkfs.ext4 -d`, so no
//! loop mount (and no privilege beyond owning the files) is needed.
//!
//! - `test`: busybox-static and `guest/rootfs/wrenn-init`; builds in about a second.
//! - `base`: Debian bookworm (debootstrap, minbase) with the packages in
//!   `guest/rootfs/base.packages`, a user `user` (uid 1000, passwordless sudo) and the same init.
//!
//! Both hold the static envd at `/usr/bin/envd` (see [`crate::envd`]). Each image is built in
//! two cached stages: the operating system (`rootfs-<kind>-os`, keyed by the recipe), then a
//! sparse copy of it with envd written in by `debugfs` (`rootfs-<kind>`, keyed by the first
//! stage's key and envd's content hash). A new envd thus makes new images in seconds, without
//! a new debootstrap. Both boot with `init=/sbin/wrenn-init` (see that script for its
//! command-line protocol), or with `init=/usr/bin/envd` to run envd as PID 1.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, Cache, CacheError, Entry};
use crate::command::{self, CommandError};
use crate::disk::{self, SpaceError};
use crate::envd::{self, Envd, EnvdError};
use crate::packages::{self, PackagesError};
use crate::progress::Step;

/// The images' default PID 1 (tests rely on its protocol); envd can take its place.
pub const INIT_SCRIPT: &str = include_str!("../../../guest/rootfs/wrenn-init");
/// Extra packages of the base image.
pub const BASE_PACKAGES: &str = include_str!("../../../guest/rootfs/base.packages");
/// Finishing steps run inside the base tree.
pub const BASE_SETUP: &str = include_str!("../../../guest/rootfs/base-setup.sh");

/// Where images put the init script; boot with `init=` this.
pub const INIT_PATH: &str = "/sbin/wrenn-init";
/// The line the init prints once the guest is up.
pub const READY_MARKER: &str = "WRENN_GUEST_READY";
/// File name of the image inside its cache entry.
pub const IMAGE_FILE: &str = "rootfs.ext4";

/// Bumped when the build steps change in a way that changes the result.
const RECIPE_VERSION: &str = "1";
const DEBIAN_SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const TEST_IMAGE_MIB: u64 = 64;
/// The base image is a sparse file: room for users' own installs costs nothing until used.
const BASE_IMAGE_MIN_MIB: u64 = 2048;
const BASE_BUILD_SPACE_MIB: u64 = 2048;

/// Packages the image builds need.
pub const BUILD_PACKAGES: &[&str] = &["busybox-static", "e2fsprogs", "debootstrap"];

/// The images Wrenn builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Test,
    Base,
}

impl ImageKind {
    pub const ALL: [ImageKind; 2] = [ImageKind::Test, ImageKind::Base];

    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Test => "test",
            ImageKind::Base => "base",
        }
    }

    fn cache_kind(self) -> String {
        format!("rootfs-{}", self.name())
    }

    /// The first stage: the image without envd.
    fn os_cache_kind(self) -> String {
        format!("rootfs-{}-os", self.name())
    }
}

impl std::str::FromStr for ImageKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "test" => Ok(ImageKind::Test),
            "base" => Ok(ImageKind::Base),
            other => Err(format!("unknown image {other:?}: expected test or base")),
        }
    }
}

/// Errors from building a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Packages(#[from] PackagesError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Space(#[from] SpaceError),
    #[error(transparent)]
    Envd(#[from] EnvdError),
    #[error("{image} image build step failed")]
    Step {
        image: &'static str,
        #[source]
        source: CommandError,
    },
    #[error("envd was not written into {image}: {reason}")]
    Inject { image: PathBuf, reason: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn step_err(image: ImageKind) -> impl FnOnce(CommandError) -> RootfsError {
    move |source| RootfsError::Step {
        image: image.name(),
        source,
    }
}

fn package_version(name: &str) -> Result<String, CommandError> {
    let out = command::run(Command::new("dpkg-query").args(["-W", "-f=${Version}", name]))?;
    Ok(out.trim().to_owned())
}

/// The base image's package list, comments and blank lines removed.
pub fn base_packages() -> Vec<&'static str> {
    BASE_PACKAGES
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The cache key of the first stage (the image without envd) built from the current recipe.
pub fn os_cache_key(kind: ImageKind) -> Result<String, RootfsError> {
    let key = match kind {
        ImageKind::Test => {
            let busybox = package_version("busybox-static").map_err(step_err(kind))?;
            cache::key_of(&[
                INIT_SCRIPT.as_bytes(),
                busybox.as_bytes(),
                RECIPE_VERSION.as_bytes(),
            ])
        }
        ImageKind::Base => cache::key_of(&[
            INIT_SCRIPT.as_bytes(),
            BASE_PACKAGES.as_bytes(),
            BASE_SETUP.as_bytes(),
            DEBIAN_SUITE.as_bytes(),
            RECIPE_VERSION.as_bytes(),
        ]),
    };
    Ok(key)
}

/// The cache key of an image built from the current recipe and `envd`.
pub fn cache_key(kind: ImageKind, envd: &Envd) -> Result<String, RootfsError> {
    Ok(cache::key_of(&[
        os_cache_key(kind)?.as_bytes(),
        envd.sha256.as_bytes(),
        INJECT_RECIPE_VERSION.as_bytes(),
    ]))
}

/// The cached image holding the envd that [`envd::locate`] finds (the last static build, or
/// `WRENN_ENVD`), or an error saying how to build it.
pub fn find(cache: &Cache, kind: ImageKind) -> Result<Entry, RootfsError> {
    find_with(cache, kind, &envd::locate()?)
}

/// The cached image holding `envd`, or an error saying how to build it.
pub fn find_with(cache: &Cache, kind: ImageKind, envd: &Envd) -> Result<Entry, RootfsError> {
    Ok(cache.get(&kind.cache_kind(), &cache_key(kind, envd)?)?)
}

/// Discards the cached image built from the current recipe and `envd`, and its first stage.
pub fn remove(cache: &Cache, kind: ImageKind, envd: &Envd) -> Result<(), RootfsError> {
    cache.remove(&kind.cache_kind(), &cache_key(kind, envd)?)?;
    Ok(cache.remove(&kind.os_cache_kind(), &os_cache_key(kind)?)?)
}

/// Returns the cached image holding `envd`, building it (and its first stage) first if
/// needed. The entry holds [`IMAGE_FILE`].
pub fn build(cache: &Cache, kind: ImageKind, envd: &Envd) -> Result<Entry, RootfsError> {
    packages::ensure(BUILD_PACKAGES)?;
    let key = cache_key(kind, envd)?;
    if let Some(entry) = cache.lookup(&kind.cache_kind(), &key)? {
        return Ok(entry);
    }
    let os = build_os(cache, kind)?;
    cache.get_or_build(&kind.cache_kind(), &key, |staging| {
        let step = Step::start(format!("adding envd to the {} image", kind.name()));
        let image = staging.join(IMAGE_FILE);
        // Sparse: the base image is mostly holes.
        command::run(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(os.file(IMAGE_FILE))
                .arg(&image),
        )
        .map_err(step_err(kind))?;
        inject_envd(&image, envd)?;
        let mut notes = os.manifest.notes.clone();
        let allocated = allocated_bytes(&image)?;
        notes.insert("allocated_mib".into(), (allocated >> 20).to_string());
        notes.insert("envd_sha256".into(), envd.sha256.clone());
        notes.insert(
            "os_build_seconds".into(),
            format!("{:.0}", os.manifest.build_seconds),
        );
        step.finish(&format!("{GUEST_ENVD} ({} MiB allocated)", allocated >> 20));
        Ok(notes)
    })
}

/// The first stage of `kind`: the image without envd, built if needed.
fn build_os(cache: &Cache, kind: ImageKind) -> Result<Entry, RootfsError> {
    let key = os_cache_key(kind)?;
    cache.get_or_build(&kind.os_cache_kind(), &key, |staging| {
        let tree = cache.work_dir(&format!("rootfs-{}-{}", kind.name(), std::process::id()))?;
        let result = build_into(cache, kind, &tree, staging);
        let _ = fs::remove_dir_all(&tree);
        result
    })
}

/// Where envd goes, and the directory `debugfs` works in (it links names into its cwd).
const GUEST_ENVD: &str = envd::GUEST_PATH;
const GUEST_ENVD_DIR: &str = "/usr/bin";
const GUEST_ENVD_NAME: &str = "envd";
/// Bumped when the way envd is written into an image changes.
const INJECT_RECIPE_VERSION: &str = "1";

/// Writes `envd` into the ext4 file `image` at [`envd::GUEST_PATH`], root-owned, mode 0755,
/// replacing whatever was there, and checks the result by reading it back.
fn inject_envd(image: &Path, envd: &Envd) -> Result<(), RootfsError> {
    let source = envd.path.to_string_lossy();
    // debugfs splits its request on white space and quotes.
    if source.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        return Err(RootfsError::Inject {
            image: image.to_owned(),
            reason: format!("the path {source:?} has spaces or quotes; set WRENN_ENVD to a copy"),
        });
    }
    // `rm` of a missing name is reported and skipped; debugfs goes on either way, so the
    // result is checked below rather than trusted from its exit status.
    let requests = format!(
        "cd {GUEST_ENVD_DIR}\n\
         rm {GUEST_ENVD_NAME}\n\
         write {source} {GUEST_ENVD_NAME}\n\
         sif {GUEST_ENVD_NAME} mode 0100755\n\
         sif {GUEST_ENVD_NAME} uid 0\n\
         sif {GUEST_ENVD_NAME} gid 0\n"
    );
    let script = image.with_extension("debugfs");
    fs::write(&script, requests).map_err(io_err(&script))?;
    let written = command::run(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(image),
    );
    let _ = fs::remove_file(&script);
    written.map_err(|source| RootfsError::Inject {
        image: image.to_owned(),
        reason: source.to_string(),
    })?;
    let size = fs::metadata(&envd.path).map_err(io_err(&envd.path))?.len();
    let stat = command::run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {GUEST_ENVD}"))
            .arg(image),
    )
    .map_err(|source| RootfsError::Inject {
        image: image.to_owned(),
        reason: source.to_string(),
    })?;
    let expected = [
        "Type: regular    Mode:  0755".to_owned(),
        "User:     0   Group:     0".to_owned(),
        format!("Size: {size}\n"),
    ];
    if let Some(missing) = expected.iter().find(|want| !stat.contains(want.as_str())) {
        return Err(RootfsError::Inject {
            image: image.to_owned(),
            reason: format!("{GUEST_ENVD} lacks {missing:?} after writing:\n{stat}"),
        });
    }
    Ok(())
}

fn build_into(
    cache: &Cache,
    kind: ImageKind,
    tree: &Path,
    staging: &Path,
) -> Result<BTreeMap<String, String>, RootfsError> {
    let step = Step::start(format!("building {} image", kind.name()));
    let mut notes = BTreeMap::new();
    let size_mib = match kind {
        ImageKind::Test => {
            disk::require_free(cache.root(), TEST_IMAGE_MIB + 16, "the test image build")?;
            populate_test_tree(tree)?;
            notes.insert(
                "busybox".into(),
                package_version("busybox-static").map_err(step_err(kind))?,
            );
            TEST_IMAGE_MIB
        }
        ImageKind::Base => {
            disk::require_free(
                cache.root(),
                BASE_BUILD_SPACE_MIB + BASE_IMAGE_MIN_MIB / 2,
                "the base image build",
            )?;
            let mirror =
                std::env::var("WRENN_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
            populate_base_tree(cache, tree, &mirror, &step)?;
            notes.insert("suite".into(), DEBIAN_SUITE.into());
            notes.insert("packages".into(), base_packages().join(" "));
            let used_mib = dir_size(tree)? >> 20;
            notes.insert("tree_mib".into(), used_mib.to_string());
            BASE_IMAGE_MIN_MIB.max(used_mib * 2)
        }
    };
    step.message("mkfs.ext4 -d");
    let image = staging.join(IMAGE_FILE);
    let label = format!("wrenn-{}", kind.name());
    command::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", &label, "-E", "root_owner=0:0", "-d"])
            .arg(tree)
            .arg(&image)
            .arg(format!("{size_mib}M")),
    )
    .map_err(step_err(kind))?;
    let allocated = allocated_bytes(&image)?;
    notes.insert("image_mib".into(), size_mib.to_string());
    notes.insert("allocated_mib".into(), (allocated >> 20).to_string());
    step.finish(&format!(
        "{IMAGE_FILE} {size_mib} MiB ({} MiB allocated)",
        allocated >> 20
    ));
    Ok(notes)
}

fn populate_test_tree(tree: &Path) -> Result<(), RootfsError> {
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "home/user",
    ] {
        let path = tree.join(dir);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
    }
    let busybox = tree.join("bin/busybox");
    fs::copy("/bin/busybox", &busybox).map_err(io_err(&busybox))?;
    let applets = command::run(Command::new("/bin/busybox").arg("--list-full"))
        .map_err(step_err(ImageKind::Test))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = tree.join(applet);
        if !link.exists() {
            symlink("/bin/busybox", &link).map_err(io_err(&link))?;
        }
    }
    write_file(
        tree,
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
        0o644,
    )?;
    write_file(
        tree,
        "etc/group",
        "root:x:0:\ntty:x:5:\nuser:x:1000:\n",
        0o644,
    )?;
    write_file(tree, "etc/hostname", "wrenn\n", 0o644)?;
    write_file(tree, INIT_PATH.trim_start_matches('/'), INIT_SCRIPT, 0o755)
}

fn populate_base_tree(
    cache: &Cache,
    tree: &Path,
    mirror: &str,
    step: &Step,
) -> Result<(), RootfsError> {
    let debs = cache.work_dir("debootstrap-debs")?;
    let _ = fs::remove_dir_all(tree);
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .arg("--variant=minbase")
        .arg(format!("--include={}", base_packages().join(",")))
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(DEBIAN_SUITE)
        .arg(tree)
        .arg(mirror);
    let log = cache.work_dir("logs")?.join("debootstrap.log");
    command::run_streamed(&mut debootstrap, &log, |line| step.message(line))
        .map_err(step_err(ImageKind::Base))?;
    write_file(tree, "tmp/wrenn-base-setup.sh", BASE_SETUP, 0o755)?;
    command::run(
        Command::new("chroot")
            .arg(tree)
            .args(["/bin/sh", "/tmp/wrenn-base-setup.sh"]),
    )
    .map_err(step_err(ImageKind::Base))?;
    let setup = tree.join("tmp/wrenn-base-setup.sh");
    fs::remove_file(&setup).map_err(io_err(&setup))?;
    write_file(tree, INIT_PATH.trim_start_matches('/'), INIT_SCRIPT, 0o755)
}

fn write_file(tree: &Path, rel: &str, text: &str, mode: u32) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    let path = tree.join(rel);
    fs::write(&path, text).map_err(io_err(&path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_err(&path))
}

fn dir_size(tree: &Path) -> Result<u64, RootfsError> {
    let out = command::run(Command::new("du").args(["-s", "-B1", "-x"]).arg(tree))
        .map_err(step_err(ImageKind::Base))?;
    Ok(out
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

fn allocated_bytes(path: &Path) -> Result<u64, RootfsError> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path).map_err(io_err(path))?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_base_packages_has_required() {
        let pkgs = base_packages();
        for p in [
            "python3",
            "python3-pip",
            "git",
            "curl",
            "ca-certificates",
            "bash",
            "sudo",
            "procps",
        ] {
            assert!(pkgs.contains(&p), "{p} missing from base.packages");
        }
        assert!(pkgs.iter().all(|p| !p.contains(' ') && !p.contains('#')));
    }

    /// A static binary standing in for envd (busybox-static is one of the build packages).
    fn stand_in_envd() -> Envd {
        packages::ensure(BUILD_PACKAGES).unwrap();
        Envd::open(Path::new("/bin/busybox")).unwrap()
    }

    #[test]
    fn test_cache_key_changes_with_envd_content() {
        let busybox = stand_in_envd();
        let other = Envd {
            sha256: "0".repeat(64),
            ..busybox.clone()
        };
        for kind in ImageKind::ALL {
            let a = cache_key(kind, &busybox).unwrap();
            assert_eq!(a, cache_key(kind, &busybox).unwrap());
            assert_ne!(a, cache_key(kind, &other).unwrap(), "{kind:?}");
        }
    }

    #[test]
    fn test_inject_envd_replaces_an_existing_file_and_keeps_the_rest() {
        let envd = stand_in_envd();
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("usr/bin")).unwrap();
        write_file(&tree, "usr/bin/envd", "old envd", 0o600).unwrap();
        write_file(&tree, "usr/bin/other", "other", 0o644).unwrap();
        let image = dir.path().join("img.ext4");
        command::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
                .arg(&tree)
                .arg(&image)
                .arg("16M"),
        )
        .unwrap();
        inject_envd(&image, &envd).unwrap();
        let listing = command::run(
            Command::new("debugfs")
                .args(["-R", "ls -l /usr/bin"])
                .arg(&image),
        )
        .unwrap();
        assert_eq!(listing.matches(" envd").count(), 1, "{listing}");
        assert!(listing.contains(" other"), "{listing}");
        assert_eq!(envd_sha256_in(&image, dir.path()), envd.sha256);
    }

    /// The SHA-256 of `/usr/bin/envd` as the file system `image` holds it (read by debugfs).
    fn envd_sha256_in(image: &Path, scratch: &Path) -> String {
        let out = scratch.join("envd.out");
        command::run(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump /usr/bin/envd {}", out.display()))
                .arg(image),
        )
        .unwrap();
        cache::sha256_file(&out).unwrap()
    }

    #[test]
    fn test_inject_envd_without_usr_bin_fails_clearly() {
        let envd = stand_in_envd();
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(&tree).unwrap();
        let image = dir.path().join("img.ext4");
        command::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-d"])
                .arg(&tree)
                .arg(&image)
                .arg("8M"),
        )
        .unwrap();
        let err = inject_envd(&image, &envd).unwrap_err();
        assert!(err.to_string().contains("/usr/bin/envd lacks"), "{err}");
    }

    #[test]
    fn test_test_image_holds_envd_at_usr_bin_mode_0755() {
        let envd = stand_in_envd();
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let entry = build(&cache, ImageKind::Test, &envd).unwrap();
        assert_eq!(entry.manifest.notes["envd_sha256"], envd.sha256);
        let image = entry.file(IMAGE_FILE);
        // Read the file system itself, as the guest will see it.
        let stat = command::run(
            Command::new("debugfs")
                .args(["-R", "stat /usr/bin/envd"])
                .arg(&image),
        )
        .unwrap();
        assert!(stat.contains("Mode:  0755"), "{stat}");
        assert!(stat.contains("User:     0   Group:     0"), "{stat}");
        assert_eq!(envd_sha256_in(&image, dir.path()), envd.sha256);
        // The same envd finds the same entry; another envd does not.
        assert_eq!(
            find_with(&cache, ImageKind::Test, &envd).unwrap().dir,
            entry.dir
        );
        let other = Envd {
            sha256: "0".repeat(64),
            ..envd
        };
        assert!(find_with(&cache, ImageKind::Test, &other).is_err());
        // The first stage is kept apart, without envd.
        let os = cache
            .get(
                &ImageKind::Test.os_cache_kind(),
                &os_cache_key(ImageKind::Test).unwrap(),
            )
            .unwrap();
        let stat = command::run(
            Command::new("debugfs")
                .args(["-R", "stat /usr/bin/envd"])
                .arg(os.file(IMAGE_FILE)),
        )
        .unwrap_or_default();
        assert!(!stat.contains("Mode:"), "{stat}");
    }

    #[test]
    fn test_image_kind_parse_unknown_fails() {
        assert_eq!("base".parse::<ImageKind>(), Ok(ImageKind::Base));
        assert!(
            "ubuntu"
                .parse::<ImageKind>()
                .unwrap_err()
                .contains("expected test or base")
        );
    }
}
