//! The artifact cache: built kernels, images and host-VM parts, kept outside the repository.
//!
//! ```text
//! <root>/                      WRENN_CACHE_DIR, else /var/cache/wrenn (root) or ~/.cache/wrenn
//!   <kind>/<key>/              one finished entry; <key> hashes every input of the build
//!     manifest.json            what was built: files with size + sha256, build time, notes
//!     <files...>
//!   <kind>/.<key>.lock         held while the entry is being built
//!   <kind>/.<key>.staging-*/   a build in progress; renamed to <key>/ only when complete
//!   work/                      long-lived scratch trees (e.g. the unpacked kernel source)
//! ```
//!
//! An entry is published with one `rename`, so a reader sees either nothing or a whole entry.
//! Lookups check each file against the manifest; a mismatch is reported as [`CacheError::Corrupt`]
//! naming the file, never silently used.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Files at most this large are re-hashed on every lookup; larger ones are checked by size
/// (and fully by [`Cache::verify`]).
const HASH_ON_LOOKUP_LIMIT: u64 = 256 << 20;

const MANIFEST: &str = "manifest.json";

/// Entries kept per kind when a new one is built: the current recipe's and a few older ones
/// (another checkout may still use them; a kernel takes minutes to rebuild).
const KEEP_PER_KIND: usize = 3;

/// Errors from the artifact cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cache entry {dir} is corrupt: {reason}; delete it (or run `cargo xtask guest --rebuild`)"
    )]
    Corrupt { dir: PathBuf, reason: String },
    #[error("cached {kind} with key {key} is missing; build it first with `cargo xtask guest`")]
    Missing { kind: String, key: String },
}

impl CacheError {
    fn io(path: &Path, source: io::Error) -> Self {
        CacheError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// One file of an entry as recorded when it was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub size: u64,
    pub sha256: String,
}

/// What an entry holds and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub kind: String,
    pub key: String,
    pub created_unix: u64,
    pub build_seconds: f64,
    pub files: BTreeMap<String, FileRecord>,
    /// Free-form facts about the build (source version, package list, ...).
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
}

/// A finished, checked cache entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Entry {
    /// Path of one of the entry's files.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Total size of the entry's files in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.files.values().map(|f| f.size).sum()
    }
}

/// The cache root.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache at an explicit directory.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    /// The cache named by `WRENN_CACHE_DIR`, else the per-user default.
    pub fn from_env() -> Self {
        if let Some(dir) = std::env::var_os("WRENN_CACHE_DIR").filter(|d| !d.is_empty()) {
            return Cache::new(dir);
        }
        let is_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
            || std::env::var_os("HOME").is_some_and(|h| h == "/root");
        if is_root {
            return Cache::new("/var/cache/wrenn");
        }
        match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            Some(dir) => Cache::new(PathBuf::from(dir).join("wrenn")),
            None => Cache::new(
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                    .join(".cache/wrenn"),
            ),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A long-lived scratch directory for `name` (created if missing).
    pub fn work_dir(&self, name: &str) -> Result<PathBuf, CacheError> {
        let dir = self.root.join("work").join(name);
        fs::create_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
        Ok(dir)
    }

    fn entry_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// The finished entry for `kind`/`key`, if there is one. A damaged entry is an error.
    pub fn lookup(&self, kind: &str, key: &str) -> Result<Option<Entry>, CacheError> {
        let dir = self.entry_dir(kind, key);
        if !dir.exists() {
            return Ok(None);
        }
        check_entry(&dir, false).map(Some)
    }

    /// Like [`Cache::lookup`], but a missing entry is an error that says how to build it.
    pub fn get(&self, kind: &str, key: &str) -> Result<Entry, CacheError> {
        self.lookup(kind, key)?.ok_or_else(|| CacheError::Missing {
            kind: kind.to_owned(),
            key: key.to_owned(),
        })
    }

    /// Re-hashes every file of an entry, however large.
    pub fn verify(&self, entry: &Entry) -> Result<(), CacheError> {
        check_entry(&entry.dir, true).map(|_| ())
    }

    /// Removes an entry (used to rebuild a corrupt or stale one).
    pub fn remove(&self, kind: &str, key: &str) -> Result<(), CacheError> {
        let dir = self.entry_dir(kind, key);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::io(&dir, e)),
        }
    }

    /// Returns the entry for `kind`/`key`, building it with `build` if it is missing.
    ///
    /// `build` fills the staging directory it is given and returns notes for the manifest.
    /// Concurrent callers wait on a lock, and the second finds the first one's entry. A
    /// corrupt entry is reported, not rebuilt: callers decide (see [`Cache::remove`]).
    pub fn get_or_build<E>(
        &self,
        kind: &str,
        key: &str,
        build: impl FnOnce(&Path) -> Result<BTreeMap<String, String>, E>,
    ) -> Result<Entry, E>
    where
        E: From<CacheError>,
    {
        if let Some(entry) = self.lookup(kind, key)? {
            return Ok(entry);
        }
        let kind_dir = self.root.join(kind);
        fs::create_dir_all(&kind_dir).map_err(|e| CacheError::io(&kind_dir, e))?;
        let lock_path = kind_dir.join(format!(".{key}.lock"));
        let lock = File::create(&lock_path).map_err(|e| CacheError::io(&lock_path, e))?;
        lock.lock().map_err(|e| CacheError::io(&lock_path, e))?;
        // Someone else may have finished it while we waited.
        if let Some(entry) = self.lookup(kind, key)? {
            return Ok(entry);
        }

        let staging = kind_dir.join(format!(".{key}.staging-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(|e| CacheError::io(&staging, e))?;
        let started = Instant::now();
        let notes = match build(&staging) {
            Ok(notes) => notes,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let published = publish(&staging, kind, key, started.elapsed(), notes)
            .and_then(|()| {
                let dir = self.entry_dir(kind, key);
                fs::rename(&staging, &dir).map_err(|e| CacheError::io(&dir, e))
            })
            .and_then(|()| self.get(kind, key));
        if published.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        let entry = published?;
        // A new build usually replaces an older recipe's; keep a few for other checkouts.
        if let Err(e) = self.prune(kind, KEEP_PER_KIND) {
            tracing::warn!(kind, error = %e, "could not prune old cache entries");
        }
        Ok(entry)
    }

    /// Removes all but the `keep` most recently built entries of `kind`.
    pub fn prune(&self, kind: &str, keep: usize) -> Result<Vec<PathBuf>, CacheError> {
        let kind_dir = self.root.join(kind);
        let mut entries = Vec::new();
        for item in fs::read_dir(&kind_dir).map_err(|e| CacheError::io(&kind_dir, e))? {
            let item = item.map_err(|e| CacheError::io(&kind_dir, e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            // Locks and builds in progress start with a dot.
            if name.starts_with('.') || !item.path().is_dir() {
                continue;
            }
            let built = fs::metadata(item.path().join(MANIFEST))
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            entries.push((built, item.path()));
        }
        entries.sort_by_key(|(built, _)| std::cmp::Reverse(*built));
        let mut removed = Vec::new();
        for (_, dir) in entries.into_iter().skip(keep) {
            fs::remove_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
            // The lock file of a removed entry is no longer needed either.
            if let Some(key) = dir.file_name() {
                let _ = fs::remove_file(kind_dir.join(format!(".{}.lock", key.to_string_lossy())));
            }
            tracing::info!(entry = %dir.display(), "removed an old cache entry");
            removed.push(dir);
        }
        Ok(removed)
    }
}

/// Hashes the staging directory's files and writes its manifest.
fn publish(
    staging: &Path,
    kind: &str,
    key: &str,
    took: Duration,
    notes: BTreeMap<String, String>,
) -> Result<(), CacheError> {
    let mut files = BTreeMap::new();
    for item in fs::read_dir(staging).map_err(|e| CacheError::io(staging, e))? {
        let item = item.map_err(|e| CacheError::io(staging, e))?;
        let path = item.path();
        let meta = item.metadata().map_err(|e| CacheError::io(&path, e))?;
        if !meta.is_file() {
            continue;
        }
        let name = item.file_name().to_string_lossy().into_owned();
        let record = FileRecord {
            size: meta.len(),
            sha256: sha256_file(&path)?,
        };
        files.insert(name, record);
    }
    let manifest = Manifest {
        kind: kind.to_owned(),
        key: key.to_owned(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        build_seconds: took.as_secs_f64(),
        files,
        notes,
    };
    let path = staging.join(MANIFEST);
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| CacheError::Corrupt {
        dir: staging.to_owned(),
        reason: format!("manifest does not serialise: {e}"),
    })?;
    fs::write(&path, text).map_err(|e| CacheError::io(&path, e))?;
    // Make the data durable before the rename publishes it.
    File::open(staging)
        .and_then(|d| d.sync_all())
        .map_err(|e| CacheError::io(staging, e))
}

fn check_entry(dir: &Path, full: bool) -> Result<Entry, CacheError> {
    let corrupt = |reason: String| CacheError::Corrupt {
        dir: dir.to_owned(),
        reason,
    };
    let path = dir.join(MANIFEST);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(corrupt("manifest.json is missing".into()));
        }
        Err(e) => return Err(CacheError::io(&path, e)),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| corrupt(format!("manifest.json does not parse: {e}")))?;
    for (name, record) in &manifest.files {
        let file = dir.join(name);
        let size = match fs::metadata(&file) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(corrupt(format!("{name} is missing")));
            }
            Err(e) => return Err(CacheError::io(&file, e)),
        };
        if size != record.size {
            return Err(corrupt(format!(
                "{name} is {size} bytes, the manifest says {}",
                record.size
            )));
        }
        if (full || size <= HASH_ON_LOOKUP_LIMIT) && sha256_file(&file)? != record.sha256 {
            return Err(corrupt(format!("{name} does not match its sha256")));
        }
    }
    Ok(Entry {
        dir: dir.to_owned(),
        manifest,
    })
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let mut file = File::open(path).map_err(|e| CacheError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| CacheError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Hex sha256 over several inputs, each length-prefixed so that boundaries count.
pub fn key_of(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    // 16 bytes of hash keep paths short and are plenty to tell builds apart.
    hex(&hasher.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_ok(staging: &Path) -> Result<BTreeMap<String, String>, CacheError> {
        fs::write(staging.join("a.bin"), b"hello").unwrap();
        Ok(BTreeMap::from([("source".to_owned(), "test".to_owned())]))
    }

    #[test]
    fn test_get_or_build_builds_once_then_hits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let entry = cache.get_or_build("thing", "k1", build_ok).unwrap();
        assert_eq!(fs::read(entry.file("a.bin")).unwrap(), b"hello");
        assert_eq!(entry.manifest.notes["source"], "test");
        let again = cache
            .get_or_build::<CacheError>("thing", "k1", |_| panic!("must not rebuild"))
            .unwrap();
        assert_eq!(again.manifest.files, entry.manifest.files);
    }

    #[test]
    fn test_lookup_modified_file_reports_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let entry = cache.get_or_build("thing", "k1", build_ok).unwrap();
        fs::write(entry.file("a.bin"), b"jello").unwrap();
        let err = cache.lookup("thing", "k1").unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains("a.bin does not match its sha256"),
            "{err}"
        );
    }

    #[test]
    fn test_lookup_truncated_file_reports_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let entry = cache.get_or_build("thing", "k1", build_ok).unwrap();
        fs::write(entry.file("a.bin"), b"he").unwrap();
        let err = cache.lookup("thing", "k1").unwrap_err();
        assert!(err.to_string().contains("a.bin is 2 bytes"), "{err}");
    }

    #[test]
    fn test_failed_build_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        let err = cache
            .get_or_build("thing", "k1", |staging| {
                fs::write(staging.join("half"), b"x").unwrap();
                Err(CacheError::Missing {
                    kind: "x".into(),
                    key: "y".into(),
                })
            })
            .unwrap_err();
        assert!(matches!(err, CacheError::Missing { .. }));
        assert!(cache.lookup("thing", "k1").unwrap().is_none());
        let leftovers: Vec<_> = fs::read_dir(tmp.path().join("thing"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !n.to_string_lossy().ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn test_prune_keeps_newest_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        for key in ["k1", "k2", "k3"] {
            cache.get_or_build("thing", key, build_ok).unwrap();
            // Distinct modification times, oldest first.
            std::thread::sleep(Duration::from_millis(20));
        }
        let removed = cache.prune("thing", 2).unwrap();
        assert_eq!(removed, vec![tmp.path().join("thing/k1")]);
        assert!(cache.lookup("thing", "k1").unwrap().is_none());
        assert!(cache.lookup("thing", "k2").unwrap().is_some());
        assert!(cache.lookup("thing", "k3").unwrap().is_some());
    }

    #[test]
    fn test_get_missing_says_how_to_build() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Cache::new(tmp.path()).get("kernel", "abc").unwrap_err();
        assert!(err.to_string().contains("cargo xtask guest"), "{err}");
    }

    #[test]
    fn test_key_of_boundaries_matter() {
        assert_ne!(key_of(&[b"ab", b"c"]), key_of(&[b"a", b"bc"]));
        assert_eq!(key_of(&[b"ab", b"c"]), key_of(&[b"ab", b"c"]));
    }
}
