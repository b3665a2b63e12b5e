//! Kernel modules for the host VM's initramfs: find them in an unpacked kernel package and put
//! them in load order.
//!
//! Debian's kernel package ships no `modules.dep` (its postinst runs depmod), so dependencies
//! come from each module's `.modinfo` ELF section, a run of NUL-terminated `key=value` strings
//! whose `depends=` entry lists the modules it needs. Modules built into the kernel (listed in
//! `modules.builtin`) need no loading.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::HostVmError;

/// A module file to load, in the order [`ModuleTree::load_order`] gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Module name with `_` (file names may use `-`).
    pub name: String,
    pub path: PathBuf,
}

/// Where one module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    /// Built into the kernel image.
    Builtin,
    /// A loadable module needing these modules first.
    Module { path: PathBuf, depends: Vec<String> },
}

/// The modules of one kernel: `lib/modules/<version>/` of an unpacked package.
#[derive(Debug)]
pub struct ModuleTree {
    dir: PathBuf,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// `kvm-amd` and `kvm_amd` name the same module.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleTree {
    /// Indexes the `.ko` files under `dir/kernel` and reads `dir/modules.builtin`.
    pub fn open(dir: &Path) -> Result<Self, HostVmError> {
        let mut files = BTreeMap::new();
        walk(&dir.join("kernel"), &mut files)?;
        let builtin_path = dir.join("modules.builtin");
        let builtin = match fs::read_to_string(&builtin_path) {
            Ok(text) => text
                .lines()
                .filter_map(|l| l.rsplit('/').next())
                .filter_map(|f| f.strip_suffix(".ko"))
                .map(normalize)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => {
                return Err(HostVmError::Io {
                    path: builtin_path,
                    source,
                });
            }
        };
        Ok(ModuleTree {
            dir: dir.to_owned(),
            files,
            builtin,
        })
    }

    /// How `name` is provided, reading the module's dependencies from its file.
    pub fn provider(&self, name: &str) -> Result<Provider, HostVmError> {
        let name = normalize(name);
        if let Some(path) = self.files.get(&name) {
            if path.extension().is_none_or(|e| e != "ko") {
                return Err(HostVmError::Module {
                    name,
                    reason: format!(
                        "{} is compressed; only plain .ko is supported",
                        path.display()
                    ),
                });
            }
            let bytes = fs::read(path).map_err(|source| HostVmError::Io {
                path: path.clone(),
                source,
            })?;
            let depends = modinfo_depends(&bytes).map_err(|reason| HostVmError::Module {
                name: name.clone(),
                reason: format!("{}: {reason}", path.display()),
            })?;
            return Ok(Provider::Module {
                path: path.clone(),
                depends,
            });
        }
        if self.builtin.contains(&name) {
            return Ok(Provider::Builtin);
        }
        Err(HostVmError::Module {
            reason: format!(
                "neither a module file under {} nor built in",
                self.dir.display()
            ),
            name,
        })
    }

    /// The module files to load, dependencies first, so that `wanted` all work; modules in
    /// `loaded` are skipped, and the result is added to it.
    pub fn load_order(
        &self,
        wanted: &[&str],
        loaded: &mut BTreeSet<String>,
    ) -> Result<Vec<ModuleFile>, HostVmError> {
        resolve(wanted, loaded, &mut |name| self.provider(name))
    }
}

fn walk(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<(), HostVmError> {
    let io = |source| HostVmError::Io {
        path: dir.to_owned(),
        source,
    };
    for item in fs::read_dir(dir).map_err(io)? {
        let item = item.map_err(io)?;
        let path = item.path();
        if item.file_type().map_err(io)?.is_dir() {
            walk(&path, files)?;
            continue;
        }
        let file_name = item.file_name();
        let file_name = file_name.to_string_lossy();
        let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .find_map(|ext| file_name.strip_suffix(ext));
        if let Some(stem) = stem {
            files.insert(normalize(stem), path);
        }
    }
    Ok(())
}

/// Trailer of a signed module: `[module][signature][struct module_signature][MAGIC]`.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len (BE).
const SIGNATURE_INFO_LEN: usize = 12;

/// The module without its appended signature (unchanged when it has none).
///
/// Checking a signature costs noticeable time under TCG (~0.4 s for the host VM's modules),
/// and the host VM's kernel does not enforce signatures: an unsigned module only taints it.
pub fn strip_signature(ko: &[u8]) -> &[u8] {
    let Some(body) = ko.strip_suffix(SIGNATURE_MAGIC) else {
        return ko;
    };
    let Some(info_at) = body.len().checked_sub(SIGNATURE_INFO_LEN) else {
        return ko;
    };
    let sig_len = body[info_at + 8..].try_into().map(u32::from_be_bytes);
    let sig_len = sig_len.ok().and_then(|n| usize::try_from(n).ok());
    match sig_len.and_then(|n| info_at.checked_sub(n)) {
        Some(end) => &ko[..end],
        None => ko,
    }
}

/// Orders `wanted` and their dependencies so that each comes after what it needs (a
/// depth-first post-order). `provider` says how a module is provided.
pub fn resolve(
    wanted: &[&str],
    loaded: &mut BTreeSet<String>,
    provider: &mut dyn FnMut(&str) -> Result<Provider, HostVmError>,
) -> Result<Vec<ModuleFile>, HostVmError> {
    fn visit(
        name: &str,
        chain: &mut Vec<String>,
        loaded: &mut BTreeSet<String>,
        order: &mut Vec<ModuleFile>,
        provider: &mut dyn FnMut(&str) -> Result<Provider, HostVmError>,
    ) -> Result<(), HostVmError> {
        let name = normalize(name);
        if loaded.contains(&name) {
            return Ok(());
        }
        if chain.contains(&name) {
            chain.push(name.clone());
            return Err(HostVmError::Module {
                name,
                reason: format!("dependency cycle: {}", chain.join(" -> ")),
            });
        }
        match provider(&name)? {
            Provider::Builtin => {}
            Provider::Module { path, depends } => {
                chain.push(name.clone());
                for dep in &depends {
                    visit(dep, chain, loaded, order, provider)?;
                }
                chain.pop();
                order.push(ModuleFile {
                    name: name.clone(),
                    path,
                });
            }
        }
        loaded.insert(name);
        Ok(())
    }

    let mut order = Vec::new();
    for name in wanted {
        visit(name, &mut Vec::new(), loaded, &mut order, provider)?;
    }
    Ok(order)
}

/// The `depends=` list of a module's `.modinfo` section (empty when it needs nothing).
pub fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>, String> {
    let modinfo = elf_section(elf, ".modinfo")?.ok_or("no .modinfo section")?;
    let depends = modinfo
        .split(|b| *b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="));
    Ok(match depends {
        Some(list) => String::from_utf8_lossy(list)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(normalize)
            .collect(),
        None => Vec::new(),
    })
}

fn elf_bytes<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N], String> {
    at.checked_add(N)
        .and_then(|end| data.get(at..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| format!("truncated ELF: {N} bytes at {at:#x}"))
}

fn u16_at(data: &[u8], at: usize) -> Result<usize, String> {
    Ok(usize::from(u16::from_le_bytes(elf_bytes(data, at)?)))
}

fn u32_at(data: &[u8], at: usize) -> Result<usize, String> {
    usize::try_from(u32::from_le_bytes(elf_bytes(data, at)?)).map_err(|e| e.to_string())
}

fn u64_at(data: &[u8], at: usize) -> Result<usize, String> {
    usize::try_from(u64::from_le_bytes(elf_bytes(data, at)?)).map_err(|e| e.to_string())
}

fn check_elf64(elf: &[u8]) -> Result<(), String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    Ok(())
}

/// Offset of table entry `i` (`base + i * size`), checked.
fn entry_at(base: usize, i: usize, size: usize) -> Result<usize, String> {
    i.checked_mul(size)
        .and_then(|o| o.checked_add(base))
        .ok_or_else(|| "ELF table offset overflows".to_owned())
}

/// Whether a 64-bit ELF executable names a program interpreter (is dynamically linked).
pub fn elf_has_interpreter(elf: &[u8]) -> Result<bool, String> {
    const PT_INTERP: usize = 3;
    check_elf64(elf)?;
    let phoff = u64_at(elf, 0x20)?;
    let phentsize = u16_at(elf, 0x36)?;
    let phnum = u16_at(elf, 0x38)?;
    for i in 0..phnum {
        if u32_at(elf, entry_at(phoff, i, phentsize)?)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The contents of the named section of a 64-bit little-endian ELF file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, String> {
    fn range(data: &[u8], offset: usize, size: usize) -> Result<&[u8], String> {
        offset
            .checked_add(size)
            .and_then(|end| data.get(offset..end))
            .ok_or_else(|| format!("ELF section at {offset:#x}+{size:#x} is out of the file"))
    }

    check_elf64(elf)?;
    let shoff = u64_at(elf, 0x28)?;
    let shentsize = u16_at(elf, 0x3a)?;
    let shnum = u16_at(elf, 0x3c)?;
    let shstrndx = u16_at(elf, 0x3e)?;
    if shentsize < 0x40 {
        return Err(format!("ELF section header size {shentsize} is too small"));
    }
    let header = |i: usize| -> Result<(usize, usize, usize), String> {
        let at = entry_at(shoff, i, shentsize)?;
        Ok((
            u32_at(elf, at)?,
            u64_at(elf, at + 0x18)?,
            u64_at(elf, at + 0x20)?,
        ))
    };
    if shstrndx >= shnum {
        return Err(format!(
            "ELF string table index {shstrndx} >= {shnum} sections"
        ));
    }
    let (_, str_off, str_size) = header(shstrndx)?;
    let strtab = range(elf, str_off, str_size)?;
    for i in 0..shnum {
        let (name_off, offset, size) = header(i)?;
        let name = strtab
            .get(name_off..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .ok_or_else(|| format!("ELF section name offset {name_off:#x} out of range"))?;
        if name == wanted.as_bytes() {
            return range(elf, offset, size).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file with sections: null, .shstrtab, .modinfo (with `modinfo` bytes).
    fn fake_ko(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 0x40];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little-endian
        let str_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let info_off = elf.len();
        elf.extend_from_slice(modinfo);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut section = |name: u32, offset: usize, size: usize| {
            let mut sh = [0u8; 0x40];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        };
        section(0, 0, 0);
        section(1, str_off, shstrtab.len());
        section(11, info_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn test_modinfo_depends_lists_dependencies() {
        let ko = fake_ko(b"license=GPL\0depends=kvm,ccp\0name=kvm_amd\0");
        assert_eq!(modinfo_depends(&ko).unwrap(), ["kvm", "ccp"]);
    }

    #[test]
    fn test_modinfo_depends_empty_field_is_empty() {
        let ko = fake_ko(b"depends=\0name=9pnet\0");
        assert!(modinfo_depends(&ko).unwrap().is_empty());
    }

    #[test]
    fn test_modinfo_depends_normalizes_dashes() {
        let ko = fake_ko(b"depends=kvm-amd\0");
        assert_eq!(modinfo_depends(&ko).unwrap(), ["kvm_amd"]);
    }

    #[test]
    fn test_modinfo_truncated_elf_is_error() {
        let ko = fake_ko(b"depends=kvm\0");
        // Cut the last section header (the .modinfo one) inside its offset field.
        assert!(modinfo_depends(&ko[..ko.len() - 0x40 + 0x1c]).is_err());
        assert!(modinfo_depends(b"\x7fELF\x02\x01").is_err());
        assert!(modinfo_depends(b"not elf at all").is_err());
    }

    #[test]
    fn test_modinfo_missing_section_is_error() {
        let mut ko = fake_ko(b"depends=kvm\0");
        // Rename ".modinfo" to ".modinfX".
        let at = ko.windows(8).position(|w| w == b".modinfo").unwrap();
        ko[at + 7] = b'X';
        assert!(modinfo_depends(&ko).unwrap_err().contains("no .modinfo"));
    }

    #[test]
    fn test_strip_signature_removes_trailer() {
        let mut ko = b"MODULE-BODY".to_vec();
        ko.extend_from_slice(b"SIGNATURE");
        ko.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        ko.extend_from_slice(&9u32.to_be_bytes());
        ko.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(strip_signature(&ko), b"MODULE-BODY");
    }

    #[test]
    fn test_strip_signature_unsigned_or_bad_length_unchanged() {
        assert_eq!(strip_signature(b"plain module"), b"plain module");
        let mut ko = b"x".to_vec();
        ko.extend_from_slice(&[0; 8]);
        ko.extend_from_slice(&1000u32.to_be_bytes());
        ko.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(strip_signature(&ko), ko.as_slice());
    }

    #[test]
    fn test_elf_has_interpreter_tells_static_from_dynamic() {
        // /bin/sh is dynamically linked on every Debian system.
        let sh = fs::read("/bin/sh").unwrap();
        assert!(elf_has_interpreter(&sh).unwrap());
        // A .ko-like file has no program headers at all.
        assert!(!elf_has_interpreter(&fake_ko(b"depends=\0")).unwrap());
        assert!(elf_has_interpreter(b"#!/bin/sh").is_err());
    }

    fn graph(edges: &[(&str, &[&str])]) -> impl FnMut(&str) -> Result<Provider, HostVmError> {
        let map: BTreeMap<String, Vec<String>> = edges
            .iter()
            .map(|(n, d)| ((*n).to_owned(), d.iter().map(|s| (*s).to_owned()).collect()))
            .collect();
        move |name: &str| match map.get(name) {
            Some(deps) if deps.first().is_some_and(|d| d == "BUILTIN") => Ok(Provider::Builtin),
            Some(deps) => Ok(Provider::Module {
                path: PathBuf::from(format!("{name}.ko")),
                depends: deps.clone(),
            }),
            None => Err(HostVmError::Module {
                name: name.to_owned(),
                reason: "missing".into(),
            }),
        }
    }

    fn names(files: &[ModuleFile]) -> Vec<&str> {
        files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn test_resolve_dependencies_come_first() {
        let mut provider = graph(&[
            ("kvm_amd", &["kvm", "ccp"]),
            ("kvm", &["irqbypass"]),
            ("irqbypass", &[]),
            ("ccp", &[]),
        ]);
        let mut loaded = BTreeSet::new();
        let order = resolve(&["kvm_amd"], &mut loaded, &mut provider).unwrap();
        assert_eq!(names(&order), ["irqbypass", "kvm", "ccp", "kvm_amd"]);
        assert!(loaded.contains("kvm_amd") && loaded.contains("irqbypass"));
    }

    #[test]
    fn test_resolve_shared_dependency_loaded_once() {
        let mut provider = graph(&[
            ("9p", &["9pnet", "fscache", "netfs"]),
            ("9pnet_virtio", &["virtio", "9pnet", "virtio_ring"]),
            ("9pnet", &[]),
            ("fscache", &["netfs"]),
            ("netfs", &[]),
            ("virtio", &["virtio_ring"]),
            ("virtio_ring", &[]),
        ]);
        let mut loaded = BTreeSet::new();
        let order = resolve(&["9pnet_virtio", "9p"], &mut loaded, &mut provider).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_ring",
                "virtio",
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p"
            ]
        );
    }

    #[test]
    fn test_resolve_skips_builtin_and_already_loaded() {
        let mut provider = graph(&[
            ("virtio_mmio", &["virtio", "virtio_ring"]),
            ("virtio", &["BUILTIN"]),
            ("virtio_ring", &[]),
        ]);
        let mut loaded = BTreeSet::from(["virtio_ring".to_owned()]);
        let order = resolve(&["virtio-mmio"], &mut loaded, &mut provider).unwrap();
        assert_eq!(names(&order), ["virtio_mmio"]);
        // A second group does not load them again.
        let again = resolve(&["virtio_mmio"], &mut loaded, &mut provider).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn test_resolve_missing_module_names_it() {
        let mut provider = graph(&[("kvm_amd", &["kvm", "ccp"]), ("kvm", &[])]);
        let err = resolve(&["kvm_amd"], &mut BTreeSet::new(), &mut provider).unwrap_err();
        assert!(
            matches!(err, HostVmError::Module { ref name, .. } if name == "ccp"),
            "{err}"
        );
    }

    #[test]
    fn test_resolve_cycle_is_error() {
        let mut provider = graph(&[("a", &["b"]), ("b", &["a"])]);
        let err = resolve(&["a"], &mut BTreeSet::new(), &mut provider).unwrap_err();
        assert!(err.to_string().contains("a -> b -> a"), "{err}");
    }

    #[test]
    fn test_module_tree_reads_files_and_builtin() {
        let tmp = tempfile::tempdir().unwrap();
        let kdir = tmp.path().join("kernel/arch/x86/kvm");
        fs::create_dir_all(&kdir).unwrap();
        fs::write(kdir.join("kvm.ko"), fake_ko(b"depends=\0")).unwrap();
        fs::write(kdir.join("kvm-amd.ko"), fake_ko(b"depends=kvm,ccp\0")).unwrap();
        fs::write(
            tmp.path().join("modules.builtin"),
            "kernel/drivers/crypto/ccp/ccp.ko\n",
        )
        .unwrap();
        let tree = ModuleTree::open(tmp.path()).unwrap();
        let order = tree.load_order(&["kvm_amd"], &mut BTreeSet::new()).unwrap();
        assert_eq!(names(&order), ["kvm", "kvm_amd"]);
        assert_eq!(order[1].path, kdir.join("kvm-amd.ko"));
    }
}
