//! The host VM's kernel and initramfs, built once per input set and kept in the artifact cache.
//!
//! - kernel: Debian's generic kernel (the package `linux-image-amd64` depends on), unpacked with
//!   `dpkg -x`; the uncompressed `vmlinux` is cut out of its bzImage (the XZ stream after the
//!   magic `FD 37 7A 58 5A 00`) so that QEMU boots it through the PVH entry and TCG need not
//!   decompress it (~3 s).
//! - initramfs (uncompressed newc cpio):
//!
//! ```text
//! /init                         init.sh
//! /bin/busybox                  from busybox-static; init links the applets at boot
//! /dev/console                  char 5:1, so that init has a console before devtmpfs
//! /lib/modules/fs/NN-name.ko    virtio_mmio, 9pnet_virtio, 9p and dependencies, in load order
//! /lib/modules/kvm/NN-name.ko   kvm, kvm_amd, tun, veth, nftables (nf_tables, NAT, masquerade,
//!                               ct, reject), vhost_vsock and dependencies not loaded before, in
//!                               load order
//! /lib/modules/net/NN-name.ko   virtio_net and dependencies not loaded before (only loaded when
//!                               the host VM has a network)
//! /proc /sys /run /tmp /wrenn /mnt/host
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wrenn_image::cache::{Cache, CacheError, Entry, key_of};
use wrenn_image::{command, packages};

use crate::HostVmError;
use crate::cpio::CpioWriter;
use crate::modules::{ModuleFile, ModuleTree, elf_has_interpreter, strip_signature};

/// Cache kind of the host VM's kernel + initramfs.
pub const KIND: &str = "hostvm";
/// Changes when the build recipe changes in a way the other key inputs do not show.
const RECIPE_VERSION: &str = "hostvm artifacts v2";
/// Debian packages the host VM needs on the host.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "util-linux",
];
/// Loaded first: what mounting the 9p shares needs.
pub const FS_MODULES: &[&str] = &["virtio_mmio", "9pnet_virtio", "9p"];
/// Loaded once the per-run share is mounted (so that a failure can be reported through it):
/// KVM, and what VMs on it use: taps and veth pairs for guest networking, the nftables pieces
/// of the agent's network slots (NAT chains, DNAT/SNAT, masquerade, conntrack state, reject;
/// sets and lookups are part of `nf_tables`), vhost-vsock for QEMU guests that benchmarks
/// compare against.
pub const KVM_MODULES: &[&str] = &[
    "kvm",
    "kvm_amd",
    "tun",
    "veth",
    // libcrc32c (which conntrack and NAT need) asks the crypto API for crc32c when loaded; no
    // modprobe answers inside the initramfs, so the algorithm must already be there.
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_ct",
    "nft_reject_ipv4",
    "vhost_vsock",
];
/// Loaded only when the host VM has a network (`wrenn.ip=` on the kernel command line): the
/// NIC of QEMU's user-mode networking. A separate group so that host VMs without a network do
/// not pay for loading it.
pub const NET_MODULES: &[&str] = &["virtio_net"];
/// The VM's PID 1.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
const BUSYBOX: &str = "/bin/busybox";
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];

/// Files of a built host VM.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Uncompressed kernel (ELF, PVH entry).
    pub vmlinux: PathBuf,
    /// Uncompressed newc initramfs.
    pub initramfs: PathBuf,
    /// The kernel's timer frequency (CONFIG_HZ), when its config says.
    pub hz: Option<u32>,
    pub entry: Entry,
}

/// A Debian package and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageVersion {
    pub name: String,
    pub version: String,
}

/// Installs what the host VM needs and returns its kernel and initramfs, building them if the
/// cache has none for the current inputs (kernel package version, module lists, init script,
/// busybox version).
pub fn ensure(cache: &Cache) -> Result<Artifacts, HostVmError> {
    packages::ensure(PACKAGES)?;
    match ensure_for_current_lists(cache) {
        // Stale package lists can name a version the archive no longer has.
        Err(HostVmError::Download { package, source }) if packages::is_root() => {
            tracing::warn!(
                %package,
                error = %source,
                "cannot download the host VM kernel; updating apt's package lists and retrying"
            );
            command::run(Command::new("apt-get").args(["update", "-qq"]))?;
            let _ = fs::remove_file(memo_path(cache)?);
            ensure_for_current_lists(cache)
        }
        other => other,
    }
}

fn ensure_for_current_lists(cache: &Cache) -> Result<Artifacts, HostVmError> {
    let kernel = kernel_package_remembered(cache)?;
    let busybox = installed_version("busybox-static")?;
    let key = key_of(&[
        RECIPE_VERSION.as_bytes(),
        kernel.name.as_bytes(),
        kernel.version.as_bytes(),
        FS_MODULES.join(",").as_bytes(),
        KVM_MODULES.join(",").as_bytes(),
        NET_MODULES.join(",").as_bytes(),
        INIT_SCRIPT.as_bytes(),
        busybox.as_bytes(),
    ]);
    let build = |staging: &Path| {
        tracing::info!(
            kernel = %format!("{} {}", kernel.name, kernel.version),
            "building the host VM kernel and initramfs (once)"
        );
        build(staging, &kernel, &busybox)
    };
    let entry = match cache.get_or_build(KIND, &key, build) {
        Err(HostVmError::Cache(CacheError::Corrupt { dir, reason })) => {
            tracing::warn!(dir = %dir.display(), %reason, "rebuilding a corrupt host VM cache entry");
            cache.remove(KIND, &key)?;
            cache.get_or_build(KIND, &key, build)?
        }
        other => other?,
    };
    Ok(Artifacts {
        vmlinux: entry.file("vmlinux"),
        initramfs: entry.file("initramfs.cpio"),
        hz: entry.manifest.notes.get("hz").and_then(|h| h.parse().ok()),
        entry,
    })
}

/// [`kernel_package`], remembered in the cache for as long as apt's package lists are unchanged:
/// each `apt-cache` call takes ~0.8 s where apt keeps no binary cache (as in Debian's container
/// images), which would be paid on every run.
fn kernel_package_remembered(cache: &Cache) -> Result<PackageVersion, HostVmError> {
    let memo = memo_path(cache)?;
    if let (Some(lists), Ok(text)) = (apt_lists_fingerprint(), fs::read_to_string(&memo)) {
        let mut lines = text.lines();
        if lines.next() == Some(lists.as_str())
            && let (Some(name), Some(version)) = (lines.next(), lines.next())
        {
            return Ok(PackageVersion {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
    }
    let kernel = kernel_package()?;
    // Taken after the lookup, which may have run `apt-get update`.
    if let Some(lists) = apt_lists_fingerprint() {
        let tmp = memo.with_extension(format!("tmp-{}", std::process::id()));
        let text = format!("{lists}\n{}\n{}\n", kernel.name, kernel.version);
        if fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &memo))
            .is_err()
        {
            let _ = fs::remove_file(&tmp);
        }
    }
    Ok(kernel)
}

fn memo_path(cache: &Cache) -> Result<PathBuf, HostVmError> {
    Ok(cache.work_dir(KIND)?.join("kernel-package"))
}

/// A hash of the names, sizes and modification times of apt's package lists.
fn apt_lists_fingerprint() -> Option<String> {
    let mut files: Vec<String> = fs::read_dir("/var/lib/apt/lists")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let mtime = meta
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some(format!(
                "{} {} {}",
                e.file_name().to_string_lossy(),
                meta.len(),
                mtime.as_nanos()
            ))
        })
        .collect();
    files.sort();
    Some(key_of(&[files.join("\n").as_bytes()]))
}

/// The generic kernel package `linux-image-amd64` currently depends on, and its version.
pub fn kernel_package() -> Result<PackageVersion, HostVmError> {
    let name = match depends_on(KERNEL_META_PACKAGE)? {
        Some(name) => name,
        None if packages::is_root() => {
            // A fresh machine may have no package lists yet.
            command::run(Command::new("apt-get").args(["update", "-qq"]))?;
            depends_on(KERNEL_META_PACKAGE)?.ok_or_else(|| HostVmError::Kernel {
                reason: format!("apt-cache names no kernel package for {KERNEL_META_PACKAGE}"),
            })?
        }
        None => {
            return Err(HostVmError::Kernel {
                reason: format!(
                    "apt-cache names no kernel package for {KERNEL_META_PACKAGE}; run `apt-get update` as root"
                ),
            });
        }
    };
    let show = command::run(Command::new("apt-cache").args(["show", "--no-all-versions", &name]))?;
    let version = field(&show, "Version").ok_or_else(|| HostVmError::Kernel {
        reason: format!("`apt-cache show {name}` gives no version"),
    })?;
    Ok(PackageVersion { name, version })
}

fn depends_on(meta: &str) -> Result<Option<String>, HostVmError> {
    let out = Command::new("apt-cache")
        .args(["depends", meta])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HostVmError::Spawn {
            program: "apt-cache".into(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_owned))
}

fn installed_version(package: &str) -> Result<String, HostVmError> {
    let out = command::run(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))?;
    Ok(out.trim().to_owned())
}

/// The value of `name:` in a Debian control paragraph.
fn field(control: &str, name: &str) -> Option<String> {
    control
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HostVmError + '_ {
    move |source| HostVmError::Io {
        path: path.to_owned(),
        source,
    }
}

fn build(
    staging: &Path,
    kernel: &PackageVersion,
    busybox_version: &str,
) -> Result<BTreeMap<String, String>, HostVmError> {
    let work = staging.join(".build");
    let result = build_in(staging, &work, kernel, busybox_version);
    // The unpacked package is ~400 MB; never leave it in the cache.
    let _ = fs::remove_dir_all(&work);
    result
}

fn build_in(
    staging: &Path,
    work: &Path,
    kernel: &PackageVersion,
    busybox_version: &str,
) -> Result<BTreeMap<String, String>, HostVmError> {
    fs::create_dir_all(work).map_err(io_err(work))?;
    let package = format!("{}={}", kernel.name, kernel.version);
    command::run(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(work),
    )
    .map_err(|source| HostVmError::Download { package, source })?;
    let deb = find_file(work, |n| n.ends_with(".deb"))?.ok_or_else(|| HostVmError::Kernel {
        reason: format!("apt-get download left no .deb in {}", work.display()),
    })?;
    let root = work.join("root");
    command::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;

    let boot = root.join("boot");
    let vmlinuz =
        find_file(&boot, |n| n.starts_with("vmlinuz-"))?.ok_or_else(|| HostVmError::Kernel {
            reason: format!("{} has no vmlinuz-*", boot.display()),
        })?;
    extract_vmlinux(&vmlinuz, &staging.join("vmlinux"))?;
    let config = find_file(&boot, |n| n.starts_with("config-"))?;
    let hz = config
        .and_then(|c| fs::read_to_string(c).ok())
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("CONFIG_HZ="))
                .map(str::to_owned)
        });

    let modules_root = root.join("lib/modules");
    let modules_dir = fs::read_dir(&modules_root)
        .map_err(io_err(&modules_root))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .ok_or_else(|| HostVmError::Kernel {
            reason: format!("{} is empty", modules_root.display()),
        })?;
    let tree = ModuleTree::open(&modules_dir)?;
    let mut loaded = BTreeSet::new();
    let fs_modules = tree.load_order(FS_MODULES, &mut loaded)?;
    let kvm_modules = tree.load_order(KVM_MODULES, &mut loaded)?;
    let net_modules = tree.load_order(NET_MODULES, &mut loaded)?;

    let busybox = fs::read(BUSYBOX).map_err(io_err(Path::new(BUSYBOX)))?;
    let dynamic = elf_has_interpreter(&busybox).map_err(|e| HostVmError::Kernel {
        reason: format!("{BUSYBOX}: {e}"),
    })?;
    if dynamic {
        return Err(HostVmError::Kernel {
            reason: format!("{BUSYBOX} is dynamically linked; install busybox-static"),
        });
    }
    let initramfs = staging.join("initramfs.cpio");
    let groups = [
        ("fs", &fs_modules[..]),
        ("kvm", &kvm_modules[..]),
        ("net", &net_modules[..]),
    ];
    write_initramfs(&initramfs, &busybox, &groups)?;

    let list = |m: &[ModuleFile]| {
        m.iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut notes = BTreeMap::from([
        (
            "kernel_package".to_owned(),
            format!("{} {}", kernel.name, kernel.version),
        ),
        ("busybox".to_owned(), busybox_version.to_owned()),
        ("modules_fs".to_owned(), list(&fs_modules)),
        ("modules_kvm".to_owned(), list(&kvm_modules)),
        ("modules_net".to_owned(), list(&net_modules)),
    ]);
    if let Some(hz) = hz {
        notes.insert("hz".to_owned(), hz);
    }
    Ok(notes)
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>, HostVmError> {
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let item = item.map_err(io_err(dir))?;
        if pred(&item.file_name().to_string_lossy()) {
            return Ok(Some(item.path()));
        }
    }
    Ok(None)
}

/// Writes the ELF kernel inside a bzImage to `out`: the first XZ stream that decompresses to an
/// ELF file.
pub fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<(), HostVmError> {
    let data = fs::read(vmlinuz).map_err(io_err(vmlinuz))?;
    let mut tried = 0;
    let mut last_error = String::new();
    let starts = data
        .windows(XZ_MAGIC.len())
        .enumerate()
        .filter(|(_, w)| *w == XZ_MAGIC)
        .map(|(i, _)| i);
    for start in starts {
        tried += 1;
        match xz_decompress(&data[start..], out) {
            Ok(()) if is_elf(out)? => return Ok(()),
            Ok(()) => last_error = format!("the stream at {start:#x} is not an ELF file"),
            Err(e) => last_error = format!("the stream at {start:#x}: {e}"),
        }
    }
    let _ = fs::remove_file(out);
    Err(HostVmError::Kernel {
        reason: format!(
            "no XZ stream in {} decompresses to an ELF kernel ({tried} tried){}",
            vmlinuz.display(),
            if last_error.is_empty() {
                String::new()
            } else {
                format!("; last: {last_error}")
            }
        ),
    })
}

fn xz_decompress(input: &[u8], out: &Path) -> Result<(), HostVmError> {
    let file = File::create(out).map_err(io_err(out))?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HostVmError::Spawn {
            program: "xz".into(),
            source,
        })?;
    let mut stdin = child.stdin.take();
    let output = std::thread::scope(|s| {
        s.spawn(move || {
            // xz stops reading at the end of the stream; the broken pipe after that is expected.
            if let Some(stdin) = stdin.as_mut() {
                let _ = stdin.write_all(input);
            }
        });
        child.wait_with_output()
    })
    .map_err(|source| HostVmError::Spawn {
        program: "xz".into(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HostVmError::Kernel {
            reason: format!(
                "xz failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

fn is_elf(path: &Path) -> Result<bool, HostVmError> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(io_err(path))?;
    Ok(file.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF")
}

fn write_initramfs(
    path: &Path,
    busybox: &[u8],
    groups: &[(&str, &[ModuleFile])],
) -> Result<(), HostVmError> {
    let io = io_err(path);
    let mut cpio = CpioWriter::new(Vec::new());
    let result = (|| -> std::io::Result<Vec<u8>> {
        for dir in [
            "bin",
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "wrenn",
            "mnt",
            "mnt/host",
            "lib",
            "lib/modules",
        ] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.char_dev("dev/console", 0o600, 5, 1)?;
        cpio.file("bin/busybox", 0o755, busybox)?;
        cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
        for &(group, modules) in groups {
            cpio.dir(&format!("lib/modules/{group}"), 0o755)?;
            for (i, module) in modules.iter().enumerate() {
                let data = fs::read(&module.path)?;
                let name = format!("lib/modules/{group}/{i:02}-{}.ko", module.name);
                cpio.file(&name, 0o644, strip_signature(&data))?;
            }
        }
        cpio.finish()
    })();
    let bytes = result.map_err(io)?;
    fs::write(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_field_reads_control_value() {
        let text = "Package: linux-image-6.1.0-56-amd64\nVersion: 6.1.192-2\nSize: 1\n";
        assert_eq!(field(text, "Version").as_deref(), Some("6.1.192-2"));
        assert_eq!(field(text, "Missing"), None);
    }

    #[test]
    fn test_extract_vmlinux_finds_elf_after_other_streams() {
        if Command::new("xz").arg("--version").output().is_err() {
            eprintln!("skipped: no xz");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let xz = |data: &[u8]| {
            let src = tmp.path().join("src");
            fs::write(&src, data).unwrap();
            let out = Command::new("xz")
                .args(["-c", "-0"])
                .arg(&src)
                .output()
                .unwrap();
            assert!(out.status.success());
            out.stdout
        };
        let mut image = b"boot sector and setup code".to_vec();
        image.extend(xz(b"not a kernel"));
        image.extend_from_slice(b"\xfd7zXZ\0 a false magic");
        image.extend(xz(b"\x7fELF kernel body"));
        image.extend_from_slice(b"trailing data");
        let vmlinuz = tmp.path().join("vmlinuz");
        fs::write(&vmlinuz, image).unwrap();
        let out = tmp.path().join("vmlinux");
        extract_vmlinux(&vmlinuz, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"\x7fELF kernel body");
    }

    #[test]
    fn test_extract_vmlinux_without_kernel_is_error() {
        let tmp = tempfile::tempdir().unwrap();
        let vmlinuz = tmp.path().join("vmlinuz");
        fs::write(&vmlinuz, b"no xz here").unwrap();
        let err = extract_vmlinux(&vmlinuz, &tmp.path().join("vmlinux")).unwrap_err();
        assert!(err.to_string().contains("0 tried"), "{err}");
    }
}
