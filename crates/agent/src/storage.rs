//! Remote storage for snapshot builds and the records that name them, so a sandbox paused on
//! one host can resume on another.
//!
//! The local layered store (`wrenn_snapshot::Store`) stays the only thing the VMM and the page
//! server read. This module mirrors it to an object store (`object_store`: S3, GCS, Azure or a
//! local directory, chosen by URL) and back:
//!
//! ```text
//! <prefix>/builds/<build id>/<file>        every file of the build directory (an imported
//!                                          image's symlinked data file is uploaded as content)
//! <prefix>/builds/<build id>/complete      the manifest (file names and sizes), written last:
//!                                          a build without it is not in the remote
//! <prefix>/templates/<name>.json           template records
//! <prefix>/sandboxes/<id>.json             paused sandbox records
//! ```
//!
//! Laziness, honestly: [`Storage::ensure_build`] fetches *whole builds* on demand, before a
//! restore, in fixed-size chunks with several ranged GETs in flight, into a temporary
//! directory renamed into place only when every file is complete. Fetching single pages on
//! first touch through the page server (so a restore starts before the build is local) is a
//! later step; the chunked layout here is what it will build on.
//!
//! With [`Remote::None`] every operation is a no-op: builds and records live only locally.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use wrenn_snapshot::header::Header;
use wrenn_snapshot::{BuildId, Store};

/// Bytes per upload part and per ranged GET. Above S3's 5 MiB minimum part size; small
/// enough that several in flight stay a few tens of MiB of memory.
pub const CHUNK_SIZE: u64 = 8 << 20;
/// Parts or ranges in flight per file.
const CONCURRENCY: usize = 4;
/// The object written last into a build's remote directory.
const MARKER: &str = "complete";
const MANIFEST_VERSION: u32 = 1;
/// Temporary download directories in the store root start with this (never a build id).
const FETCH_PREFIX: &str = ".fetch-";
const MAX_RECORD_NAME: usize = 128;

/// Errors from remote storage. Each names the object or local path and what failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("remote storage URL {url:?} is invalid: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("opening remote storage {url}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{op} remote object {object}")]
    Remote {
        op: &'static str,
        object: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading snapshot header {path}")]
    Header {
        path: PathBuf,
        #[source]
        source: wrenn_snapshot::HeaderError,
    },
    #[error(
        "build {build} is not in the remote storage (no {object}): it was never uploaded, \
         its upload did not finish, or it was deleted"
    )]
    NotInRemote { build: BuildId, object: String },
    #[error("build {build} is not in the local store ({path} is missing)")]
    NotLocal { build: BuildId, path: PathBuf },
    #[error("manifest {object} is unusable: {reason}")]
    BadManifest { object: String, reason: String },
    #[error(
        "remote object {object} is short: expected {expected} bytes at offset {offset}, got {got}"
    )]
    ShortRead {
        object: String,
        offset: u64,
        expected: u64,
        got: u64,
    },
    #[error("{path} changed while it was uploaded: expected {expected} bytes, read {got}")]
    Changed {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error(
        "record name {name:?} is invalid: expected 1 to 128 characters from [A-Za-z0-9_.-], \
         not starting with '.'"
    )]
    BadRecordName { name: String },
    #[error("a storage worker task failed: {reason}")]
    Task { reason: String },
}

/// Where builds and records live besides the local store.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Remote {
    /// Local store only.
    #[default]
    None,
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`,
    /// `file:///absolute/path` (anything `object_store::parse_url` accepts).
    Url(String),
}

/// Which kind of JSON record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// `<prefix>/templates/<name>.json`
    Template,
    /// `<prefix>/sandboxes/<id>.json` (paused sandboxes)
    Sandbox,
}

impl RecordKind {
    fn dir(self) -> &'static str {
        match self {
            RecordKind::Template => "templates",
            RecordKind::Sandbox => "sandboxes",
        }
    }
}

/// One file moved between the local store and the remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileTransfer {
    pub build: BuildId,
    pub name: String,
    pub bytes: u64,
    /// Upload parts or ranged GETs (a small file is one; an empty download is zero).
    pub chunks: u64,
}

/// What [`Storage::upload_build`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Builds uploaded now (the requested one and those its headers name).
    pub uploaded: Vec<BuildId>,
    /// Builds already complete in the remote.
    pub skipped: Vec<BuildId>,
    pub files: Vec<FileTransfer>,
}

impl UploadReport {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// What [`Storage::ensure_build`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Builds downloaded now.
    pub fetched: Vec<BuildId>,
    /// Builds that were already in the local store.
    pub present: Vec<BuildId>,
    pub files: Vec<FileTransfer>,
}

impl FetchReport {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// The `complete` marker: what a build's remote directory holds.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    build: BuildId,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    name: String,
    size: u64,
}

/// Remote storage bound to one local store. Cheap to clone and share.
#[derive(Clone)]
pub struct Storage {
    local: Store,
    remote: Option<Arc<RemoteStore>>,
}

struct RemoteStore {
    url: String,
    objects: Box<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("local", &self.local.root())
            .field("remote", &self.remote.as_ref().map(|r| r.url.as_str()))
            .finish()
    }
}

impl Storage {
    /// `Remote::None`: every operation below is a no-op (local only). A URL is parsed with
    /// `object_store`'s URL parsing; credentials and options come from the environment
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`), as `object_store`'s builders read them. Leftover
    /// temporary download directories of a crashed fetch are removed.
    pub fn new(remote: &Remote, local_store: &Path) -> Result<Storage, StorageError> {
        let local = Store::new(local_store);
        let Remote::Url(url) = remote else {
            return Ok(Storage {
                local,
                remote: None,
            });
        };
        let parsed = ::url::Url::parse(url).map_err(|e| StorageError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let (objects, prefix) =
            object_store::parse_url_opts(&parsed, std::env::vars()).map_err(|source| {
                StorageError::Open {
                    url: url.clone(),
                    source,
                }
            })?;
        remove_stale_fetches(local_store);
        tracing::info!(remote = %url, local = %local_store.display(), "remote storage configured");
        Ok(Storage {
            local,
            remote: Some(Arc::new(RemoteStore {
                url: url.clone(),
                objects,
                prefix,
            })),
        })
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Uploads `build` and every build its headers name that the remote does not hold yet,
    /// each as every file of its local directory (a symlinked image as its content) under
    /// `<prefix>/builds/<id>/`, large files as multipart uploads of [`CHUNK_SIZE`] parts read
    /// one at a time, then the `complete` manifest last. Idempotent: a build whose marker
    /// exists is skipped. Call it once the build is final (after its prefetch set is saved).
    pub async fn upload_build(&self, build: BuildId) -> Result<UploadReport, StorageError> {
        let mut report = UploadReport::default();
        let Some(remote) = &self.remote else {
            return Ok(report);
        };
        let mut builds = vec![build];
        for referenced in referenced_builds(&self.local, build).await? {
            if !builds.contains(&referenced) {
                builds.push(referenced);
            }
        }
        for id in builds {
            if remote.has_build(id).await? {
                tracing::debug!(build = %id, "build already in remote storage");
                report.skipped.push(id);
                continue;
            }
            self.upload_one(remote, id, &mut report.files).await?;
            report.uploaded.push(id);
        }
        Ok(report)
    }

    async fn upload_one(
        &self,
        remote: &RemoteStore,
        build: BuildId,
        transfers: &mut Vec<FileTransfer>,
    ) -> Result<(), StorageError> {
        let dir = self.local.build_dir(build);
        let files = local_build_files(build, &dir).await?;
        let mut manifest = Manifest {
            version: MANIFEST_VERSION,
            build,
            files: Vec::with_capacity(files.len()),
        };
        for (name, size) in files {
            let path = dir.join(&name);
            let object = remote.build_object(build, &name);
            let chunks = upload_file(remote, &path, &object, size).await?;
            manifest.files.push(ManifestFile {
                name: name.clone(),
                size,
            });
            transfers.push(FileTransfer {
                build,
                name,
                bytes: size,
                chunks,
            });
        }
        let marker = remote.build_object(build, MARKER);
        let json = serde_json::to_vec(&manifest).map_err(|e| StorageError::BadManifest {
            object: marker.to_string(),
            reason: e.to_string(),
        })?;
        remote
            .objects
            .put(&marker, PutPayload::from(json))
            .await
            .map_err(remote_err("writing", &marker))?;
        let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
        tracing::info!(%build, files = manifest.files.len(), bytes, remote = %remote.url,
            "uploaded build");
        Ok(())
    }

    /// Makes `build` and every build its headers name present in the local store,
    /// downloading what is missing ([`CHUNK_SIZE`] ranged GETs, several in flight) into a
    /// temporary directory in the store root that is renamed to the build's directory only
    /// when every file is complete and synced, so an interrupted fetch never leaves a build
    /// directory behind. A build directory that exists locally is taken as whole.
    pub async fn ensure_build(&self, build: BuildId) -> Result<FetchReport, StorageError> {
        let mut report = FetchReport::default();
        let Some(remote) = &self.remote else {
            return Ok(report);
        };
        let mut queue = vec![build];
        let mut seen = HashSet::new();
        while let Some(id) = queue.pop() {
            if id.is_zero() || !seen.insert(id) {
                continue;
            }
            if exists(&self.local.build_dir(id)).await? {
                report.present.push(id);
            } else {
                self.fetch_one(remote, id, &mut report.files).await?;
                report.fetched.push(id);
            }
            queue.extend(referenced_builds(&self.local, id).await?);
        }
        Ok(report)
    }

    async fn fetch_one(
        &self,
        remote: &RemoteStore,
        build: BuildId,
        transfers: &mut Vec<FileTransfer>,
    ) -> Result<(), StorageError> {
        let manifest = remote.manifest(build).await?;
        let root = self.local.root().to_owned();
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(io_err("creating the local store", &root))?;
        // Unique per attempt: concurrent fetches of one build must not share a directory.
        let nonce = BuildId::random().map_err(|e| StorageError::Task {
            reason: e.to_string(),
        })?;
        let tmp = root.join(format!("{FETCH_PREFIX}{build}-{nonce}"));
        tokio::fs::create_dir(&tmp)
            .await
            .map_err(io_err("creating download directory", &tmp))?;
        let result = self.fetch_into(remote, build, &manifest, &tmp).await;
        let files = match result {
            Ok(files) => files,
            Err(e) => {
                if let Err(clean) = tokio::fs::remove_dir_all(&tmp).await {
                    tracing::warn!(%build, path = %tmp.display(), error = %clean,
                        "cannot remove a failed download");
                }
                return Err(e);
            }
        };
        let dir = self.local.build_dir(build);
        match tokio::fs::rename(&tmp, &dir).await {
            Ok(()) => {}
            // Another fetch of the same build finished first: its copy is as good.
            Err(_) if exists(&dir).await.unwrap_or(false) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
            }
            Err(source) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(StorageError::Io {
                    op: "moving the downloaded build into place at",
                    path: dir,
                    source,
                });
            }
        }
        sync_dir(root).await?;
        let bytes: u64 = files.iter().map(|f| f.bytes).sum();
        tracing::info!(%build, files = files.len(), bytes, remote = %remote.url, "fetched build");
        transfers.extend(files);
        Ok(())
    }

    async fn fetch_into(
        &self,
        remote: &RemoteStore,
        build: BuildId,
        manifest: &Manifest,
        tmp: &Path,
    ) -> Result<Vec<FileTransfer>, StorageError> {
        let mut files = Vec::with_capacity(manifest.files.len());
        for file in &manifest.files {
            let object = remote.build_object(build, &file.name);
            let path = tmp.join(&file.name);
            let chunks = download_file(remote, &object, &path, file.size).await?;
            files.push(FileTransfer {
                build,
                name: file.name.clone(),
                bytes: file.size,
                chunks,
            });
        }
        sync_dir(tmp.to_owned()).await?;
        Ok(files)
    }

    /// Removes `build` from the remote (the local store is left alone): the marker first, so
    /// a delete cut short leaves a build that no host takes as complete. A build that is not
    /// there is not an error.
    pub async fn delete_build(&self, build: BuildId) -> Result<(), StorageError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let marker = remote.build_object(build, MARKER);
        remote
            .objects
            .delete(&marker)
            .await
            .or_else(ignore_not_found)
            .map_err(remote_err("deleting", &marker))?;
        let dir = remote.prefix.clone().join("builds").join(build.to_string());
        let objects: Vec<ObjectPath> = remote
            .objects
            .list(Some(&dir))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(remote_err("listing", &dir))?;
        for object in &objects {
            remote
                .objects
                .delete(object)
                .await
                .or_else(ignore_not_found)
                .map_err(remote_err("deleting", object))?;
        }
        tracing::info!(%build, objects = objects.len() + 1, remote = %remote.url,
            "deleted build from remote storage");
        Ok(())
    }

    /// Stores a small JSON record so another host can find it (overwrites).
    pub async fn put_record(
        &self,
        kind: RecordKind,
        name: &str,
        json: &[u8],
    ) -> Result<(), StorageError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let object = remote.record_object(kind, name)?;
        remote
            .objects
            .put(&object, PutPayload::from(json.to_vec()))
            .await
            .map_err(remote_err("writing", &object))?;
        Ok(())
    }

    /// The record's bytes, or `None` if the remote has no such record (or there is no remote).
    pub async fn get_record(
        &self,
        kind: RecordKind,
        name: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let object = remote.record_object(kind, name)?;
        let result = match remote.objects.get(&object).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(remote_err("reading", &object)(source)),
        };
        let bytes = result
            .bytes()
            .await
            .map_err(remote_err("reading", &object))?;
        Ok(Some(bytes.to_vec()))
    }

    /// Removes a record; a missing one is not an error.
    pub async fn delete_record(&self, kind: RecordKind, name: &str) -> Result<(), StorageError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let object = remote.record_object(kind, name)?;
        remote
            .objects
            .delete(&object)
            .await
            .or_else(ignore_not_found)
            .map_err(remote_err("deleting", &object))
    }

    /// The names of every record of `kind`, sorted.
    pub async fn list_records(&self, kind: RecordKind) -> Result<Vec<String>, StorageError> {
        let Some(remote) = &self.remote else {
            return Ok(Vec::new());
        };
        let dir = remote.prefix.clone().join(kind.dir());
        let listing = match remote.objects.list_with_delimiter(Some(&dir)).await {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(source) => return Err(remote_err("listing", &dir)(source)),
        };
        let mut names: Vec<String> = listing
            .objects
            .iter()
            .filter_map(|meta| meta.location.filename())
            .filter_map(|file| file.strip_suffix(".json"))
            .filter(|name| valid_record_name(name))
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }
}

impl RemoteStore {
    fn build_object(&self, build: BuildId, file: &str) -> ObjectPath {
        self.prefix
            .clone()
            .join("builds")
            .join(build.to_string())
            .join(file)
    }

    fn record_object(&self, kind: RecordKind, name: &str) -> Result<ObjectPath, StorageError> {
        if !valid_record_name(name) {
            return Err(StorageError::BadRecordName {
                name: name.chars().take(MAX_RECORD_NAME + 8).collect(),
            });
        }
        Ok(self
            .prefix
            .clone()
            .join(kind.dir())
            .join(format!("{name}.json")))
    }

    async fn has_build(&self, build: BuildId) -> Result<bool, StorageError> {
        let marker = self.build_object(build, MARKER);
        match self.objects.head(&marker).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(remote_err("checking", &marker)(source)),
        }
    }

    /// Reads and checks a build's manifest: file names must stay inside the build directory.
    async fn manifest(&self, build: BuildId) -> Result<Manifest, StorageError> {
        let marker = self.build_object(build, MARKER);
        let result = match self.objects.get(&marker).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StorageError::NotInRemote {
                    build,
                    object: marker.to_string(),
                });
            }
            Err(source) => return Err(remote_err("reading", &marker)(source)),
        };
        let bytes = result
            .bytes()
            .await
            .map_err(remote_err("reading", &marker))?;
        let bad = |reason: String| StorageError::BadManifest {
            object: marker.to_string(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if manifest.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "version {} (this agent reads {MANIFEST_VERSION})",
                manifest.version
            )));
        }
        if manifest.build != build {
            return Err(bad(format!("it names build {}", manifest.build)));
        }
        let mut names = HashSet::new();
        for file in &manifest.files {
            if !valid_file_name(&file.name) || file.name == MARKER {
                return Err(bad(format!("file name {:?} is not allowed", file.name)));
            }
            if !names.insert(file.name.as_str()) {
                return Err(bad(format!("file {:?} is listed twice", file.name)));
            }
        }
        Ok(manifest)
    }
}

/// The entries of a local build directory; a missing one is `NotLocal`.
fn read_build_dir(build: BuildId, dir: &Path) -> Result<fs::ReadDir, StorageError> {
    fs::read_dir(dir).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            StorageError::NotLocal {
                build,
                path: dir.to_owned(),
            }
        } else {
            StorageError::Io {
                op: "listing build directory",
                path: dir.to_owned(),
                source,
            }
        }
    })
}

/// Every build the headers in `build`'s local directory name, other than itself.
async fn referenced_builds(local: &Store, build: BuildId) -> Result<Vec<BuildId>, StorageError> {
    let dir = local.build_dir(build);
    tokio::task::spawn_blocking(move || {
        let entries = read_build_dir(build, &dir)?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing build directory", &dir))?;
            let path = entry.path();
            if !entry.file_name().to_string_lossy().ends_with(".header") {
                continue;
            }
            let header = Header::read(&path).map_err(|source| StorageError::Header {
                path: path.clone(),
                source,
            })?;
            for info in header.builds {
                if info.id != build && !info.id.is_zero() && !out.contains(&info.id) {
                    out.push(info.id);
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(task_err)?
}

/// The regular files (symlinks followed) of a local build directory, with their sizes,
/// sorted by name.
async fn local_build_files(build: BuildId, dir: &Path) -> Result<Vec<(String, u64)>, StorageError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let entries = read_build_dir(build, &dir)?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing build directory", &dir))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(%build, path = %path.display(), "skipping a file with a non-UTF-8 name");
                continue;
            };
            if !valid_file_name(&name) || name == MARKER {
                tracing::warn!(%build, path = %path.display(), "skipping a file not part of the build");
                continue;
            }
            // Follows the symlink of an imported image: its content is what is uploaded.
            let meta = fs::metadata(&path).map_err(io_err("reading metadata of", &path))?;
            if !meta.is_file() {
                tracing::warn!(%build, path = %path.display(), "skipping a non-regular file");
                continue;
            }
            files.push((name, meta.len()));
        }
        files.sort();
        Ok(files)
    })
    .await
    .map_err(task_err)?
}

/// Uploads one local file; returns the number of parts (1 for a single PUT).
async fn upload_file(
    remote: &RemoteStore,
    path: &Path,
    object: &ObjectPath,
    size: u64,
) -> Result<u64, StorageError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(io_err("opening", path))?;
    let chunk_len = usize::try_from(CHUNK_SIZE).unwrap_or(usize::MAX);
    if size <= CHUNK_SIZE {
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(chunk_len));
        (&mut file)
            .take(CHUNK_SIZE + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(io_err("reading", path))?;
        check_len(path, size, &buf)?;
        remote
            .objects
            .put(object, PutPayload::from(buf))
            .await
            .map_err(remote_err("writing", object))?;
        return Ok(1);
    }
    let upload = remote
        .objects
        .put_multipart(object)
        .await
        .map_err(remote_err("starting a multipart upload of", object))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, chunk_len);
    let result = async {
        let mut sent = 0u64;
        let mut parts = 0u64;
        loop {
            // A fresh buffer per part: the part owns it until its upload finishes.
            let mut buf = vec![0u8; chunk_len];
            let n = read_full(&mut file, &mut buf)
                .await
                .map_err(io_err("reading", path))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            writer
                .wait_for_capacity(CONCURRENCY)
                .await
                .map_err(remote_err("uploading a part of", object))?;
            writer.put(bytes::Bytes::from(buf));
            sent += u64::try_from(n).unwrap_or(u64::MAX);
            parts += 1;
            if sent > size {
                break;
            }
        }
        if sent != size {
            return Err(StorageError::Changed {
                path: path.to_owned(),
                expected: size,
                got: sent,
            });
        }
        Ok(parts)
    }
    .await;
    match result {
        Ok(parts) => {
            writer
                .finish()
                .await
                .map_err(remote_err("finishing the multipart upload of", object))?;
            Ok(parts)
        }
        Err(e) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(object = %object, error = %abort, "cannot abort a multipart upload");
            }
            Err(e)
        }
    }
}

fn check_len(path: &Path, expected: u64, buf: &[u8]) -> Result<(), StorageError> {
    let got = u64::try_from(buf.len()).unwrap_or(u64::MAX);
    if got == expected {
        Ok(())
    } else {
        Err(StorageError::Changed {
            path: path.to_owned(),
            expected,
            got,
        })
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Downloads `object` (`size` bytes) into the new file `path` with ranged GETs of
/// [`CHUNK_SIZE`], [`CONCURRENCY`] in flight, written in place; returns the GET count.
async fn download_file(
    remote: &RemoteStore,
    object: &ObjectPath,
    path: &Path,
    size: u64,
) -> Result<u64, StorageError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("creating", path))?;
    file.set_len(size).map_err(io_err("sizing", path))?;
    let file = Arc::new(file);
    let ranges: Vec<Range<u64>> = (0..size.div_ceil(CHUNK_SIZE))
        .map(|i| i * CHUNK_SIZE..size.min((i + 1) * CHUNK_SIZE))
        .collect();
    let chunks = u64::try_from(ranges.len()).unwrap_or(u64::MAX);
    futures::stream::iter(ranges)
        .map(|range| {
            let file = Arc::clone(&file);
            async move {
                let bytes = remote
                    .objects
                    .get_range(object, range.clone())
                    .await
                    .map_err(remote_err("downloading", object))?;
                let expected = range.end - range.start;
                let got = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                if got != expected {
                    return Err(StorageError::ShortRead {
                        object: object.to_string(),
                        offset: range.start,
                        expected,
                        got,
                    });
                }
                let path = path.to_owned();
                tokio::task::spawn_blocking(move || {
                    file.write_all_at(&bytes, range.start)
                        .map_err(io_err("writing", &path))
                })
                .await
                .map_err(task_err)?
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await?;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || file.sync_all().map_err(io_err("syncing", &path)))
        .await
        .map_err(task_err)??;
    Ok(chunks)
}

async fn exists(path: &Path) -> Result<bool, StorageError> {
    tokio::fs::try_exists(path)
        .await
        .map_err(io_err("checking", path))
}

async fn sync_dir(dir: PathBuf) -> Result<(), StorageError> {
    tokio::task::spawn_blocking(move || {
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing directory", &dir))
    })
    .await
    .map_err(task_err)?
}

/// Removes `.fetch-*` directories a crashed download left in the store root.
fn remove_stale_fetches(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(FETCH_PREFIX)
        {
            let path = entry.path();
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed an interrupted build download");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "cannot remove an interrupted build download");
                }
            }
        }
    }
}

/// A file name inside a build directory: no separators, not hidden, not `.`/`..`.
fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn valid_record_name(name: &str) -> bool {
    name.len() <= MAX_RECORD_NAME && valid_file_name(name)
}

fn ignore_not_found(e: object_store::Error) -> Result<(), object_store::Error> {
    match e {
        object_store::Error::NotFound { .. } => Ok(()),
        e => Err(e),
    }
}

fn remote_err(
    op: &'static str,
    object: &ObjectPath,
) -> impl FnOnce(object_store::Error) -> StorageError {
    let object = object.to_string();
    move |source| StorageError::Remote { op, object, source }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_owned();
    move |source| StorageError::Io { op, path, source }
}

fn task_err(e: tokio::task::JoinError) -> StorageError {
    StorageError::Task {
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_file_names_cannot_escape() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b", "é"] {
            assert!(!valid_file_name(bad), "{bad:?} accepted");
        }
        for good in ["memfile", "disk-rootfs.data", "memfile.header", "prefetch"] {
            assert!(valid_file_name(good), "{good:?} rejected");
        }
        assert!(!valid_record_name(&"x".repeat(129)));
    }

    #[test]
    fn test_bad_url_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Storage::new(&Remote::Url("not a url".into()), tmp.path()).unwrap_err();
        assert!(matches!(err, StorageError::BadUrl { .. }), "{err}");
        let err = Storage::new(&Remote::Url("ftp://host/x".into()), tmp.path()).unwrap_err();
        assert!(matches!(err, StorageError::Open { .. }), "{err}");
        // Building an S3 client needs no network: credentials are resolved on first use.
        let s3 = Storage::new(&Remote::Url("s3://bucket/prefix".into()), tmp.path()).unwrap();
        assert!(s3.is_remote());
    }
}
