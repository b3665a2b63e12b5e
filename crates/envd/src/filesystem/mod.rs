//! The `filesystem.Filesystem` Connect service: stat, make directories, move, list, remove,
//! and watch directories (streaming, or polled through watcher ids).
//!
//! Every path is resolved against the request's user ([`auth::rpc_user`],
//! [`auth::resolve_path`]) and every filesystem call runs with that user's identity
//! ([`as_user`]), so permissions are the kernel's, not a re-implementation of them.
pub mod as_user;
pub mod entry;
pub mod watch;
pub mod xattr;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use wrenn_proto::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, EntryInfo, Filesystem, FilesystemExt as _,
    GetWatcherEventsRequest, GetWatcherEventsResponse, ListDirRequest, ListDirResponse,
    MakeDirRequest, MakeDirResponse, MoveRequest, MoveResponse, RemoveRequest, RemoveResponse,
    RemoveWatcherRequest, RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest,
    WatchDirResponse, watch_dir_response,
};

use crate::auth;
use crate::rpc::io_error;
use crate::state::Shared;
use crate::users::User;
use as_user::run_as;
use entry::{Names, entry_from_metadata, entry_info};
use watch::{DirWatch, PollingWatcher};

/// The most polling watchers alive at once (each holds an inotify descriptor).
const MAX_WATCHERS: usize = 128;

/// Adds the filesystem service to `router`.
pub fn register(router: connectrpc::Router, shared: Arc<Shared>) -> connectrpc::Router {
    Arc::new(FilesystemService::new(shared)).register(router)
}

/// The service: shared state plus the polling watchers by id.
#[derive(Debug)]
pub struct FilesystemService {
    shared: Arc<Shared>,
    watchers: Mutex<HashMap<String, PollingWatcher>>,
}

impl FilesystemService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            watchers: Mutex::new(HashMap::new()),
        }
    }

    /// The request's user and `path` resolved for them.
    fn user_and_path(
        &self,
        ctx: &RequestContext,
        path: &str,
    ) -> Result<(User, PathBuf), ConnectError> {
        let user = auth::rpc_user(&self.shared, ctx.headers())?;
        let workdir = self.shared.read(|s| s.default_workdir.clone());
        let resolved = auth::resolve_path(path, &user, workdir.as_deref());
        Ok((user, resolved))
    }

    fn names(&self) -> Names {
        Names::new(self.shared.users.clone())
    }

    /// Starts a watch for a `WatchDir` or `CreateWatcher` request.
    async fn watch(
        &self,
        ctx: &RequestContext,
        path: &str,
        recursive: bool,
        include_entry: bool,
    ) -> Result<DirWatch, ConnectError> {
        let (user, root) = self.user_and_path(ctx, path)?;
        DirWatch::new(
            root,
            recursive,
            include_entry,
            user,
            self.shared.users.clone(),
        )
        .await
    }
}

/// `what`'s error for `path`, with E2B's wording for a missing file.
fn stat_error(path: &Path, error: &io::Error) -> ConnectError {
    if error.kind() == io::ErrorKind::NotFound {
        ConnectError::not_found(format!(
            "file not found: stat {}: no such file or directory",
            path.display()
        ))
    } else {
        io_error("stat", path, error)
    }
}

/// `mkdir -p` done by the current thread (so the new directories belong to its identity).
fn make_dirs(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)
}

/// Walks `root` (already known to be a directory) up to `depth` levels, reporting entries
/// under `shown` (the path the client asked for) and never following symlinks below the root.
/// Subdirectories the user cannot read are listed but not entered.
fn walk(root: &Path, shown: &Path, depth: u32, names: &mut Names) -> io::Result<Vec<EntryInfo>> {
    let mut entries = Vec::new();
    // (real directory, reported directory, its level)
    let mut queue = vec![(root.to_path_buf(), shown.to_path_buf(), 1u32)];
    let mut first = true;
    while let Some((dir, reported, level)) = queue.pop() {
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(error) if first => return Err(error),
            Err(error) => {
                tracing::debug!(dir = %dir.display(), %error, "not listing a subdirectory");
                continue;
            }
        };
        first = false;
        let mut level_entries = Vec::new();
        for item in listing {
            let item = item?;
            let real = item.path();
            let Ok(meta) = std::fs::symlink_metadata(&real) else {
                continue; // removed meanwhile
            };
            let path = reported.join(item.file_name());
            // The reported path leads to the same file (only the root may differ, by a link).
            let entry = entry_from_metadata(&path, &meta, names);
            if meta.is_dir() && level < depth {
                queue.push((real, path, level + 1));
            }
            level_entries.push(entry);
        }
        level_entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries.extend(level_entries);
    }
    Ok(entries)
}

// Concrete response types are clearer than the trait's `impl Encodable` bounds.
#[allow(refining_impl_trait)]
impl Filesystem for FilesystemService {
    async fn stat(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StatRequest>,
    ) -> ServiceResult<StatResponse> {
        let (user, path) = self.user_and_path(&ctx, request.path)?;
        let mut names = self.names();
        let target = path.clone();
        let entry = run_as(&user, move || entry_info(&target, &mut names))
            .await?
            .map_err(|error| stat_error(&path, &error))?;
        Response::ok(StatResponse {
            entry: entry.into(),
            ..Default::default()
        })
    }

    async fn make_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MakeDirRequest>,
    ) -> ServiceResult<MakeDirResponse> {
        let (user, path) = self.user_and_path(&ctx, request.path)?;
        let mut names = self.names();
        let target = path.clone();
        let outcome = run_as(&user, move || {
            match std::fs::metadata(&target) {
                Ok(meta) if meta.is_dir() => return Ok(Err(true)),
                Ok(_) => return Ok(Err(false)),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
            make_dirs(&target)?;
            entry_info(&target, &mut names).map(Ok)
        })
        .await?
        .map_err(|error| io_error("make directory", &path, &error))?;
        match outcome {
            Ok(entry) => Response::ok(MakeDirResponse {
                entry: entry.into(),
                ..Default::default()
            }),
            Err(true) => Err(ConnectError::already_exists(format!(
                "directory already exists: {}",
                path.display()
            ))),
            Err(false) => Err(ConnectError::invalid_argument(format!(
                "path already exists but it is not a directory: {}",
                path.display()
            ))),
        }
    }

    async fn r#move(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MoveRequest>,
    ) -> ServiceResult<MoveResponse> {
        let (user, source) = self.user_and_path(&ctx, request.source)?;
        let (_, destination) = self.user_and_path(&ctx, request.destination)?;
        let mut names = self.names();
        let (from, to) = (source.clone(), destination.clone());
        let entry = run_as(&user, move || {
            // The source must exist before anything is created for the destination.
            std::fs::symlink_metadata(&from).map_err(|e| (from.clone(), e))?;
            if let Some(parent) = to.parent() {
                make_dirs(parent).map_err(|e| (parent.to_path_buf(), e))?;
            }
            std::fs::rename(&from, &to).map_err(|e| (to.clone(), e))?;
            entry_info(&to, &mut names).map_err(|e| (to.clone(), e))
        })
        .await?
        .map_err(|(path, error)| io_error("move", &path, &error))?;
        Response::ok(MoveResponse {
            entry: entry.into(),
            ..Default::default()
        })
    }

    async fn list_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, ListDirRequest>,
    ) -> ServiceResult<ListDirResponse> {
        let depth = request.depth.max(1);
        let (user, path) = self.user_and_path(&ctx, request.path)?;
        let mut names = self.names();
        let shown = path.clone();
        let listed = run_as(&user, move || {
            // The root itself may be a symlink: follow it.
            let root = std::fs::canonicalize(&shown)?;
            if !std::fs::metadata(&root)?.is_dir() {
                return Ok(None);
            }
            walk(&root, &shown, depth, &mut names).map(Some)
        })
        .await?
        .map_err(|error| io_error("list directory", &path, &error))?;
        let Some(entries) = listed else {
            return Err(ConnectError::invalid_argument(format!(
                "path is not a directory: {}",
                path.display()
            )));
        };
        Response::ok(ListDirResponse {
            entries,
            ..Default::default()
        })
    }

    async fn remove(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, RemoveRequest>,
    ) -> ServiceResult<RemoveResponse> {
        let (user, path) = self.user_and_path(&ctx, request.path)?;
        let target = path.clone();
        run_as(&user, move || {
            let meta = std::fs::symlink_metadata(&target)?;
            if meta.is_dir() {
                std::fs::remove_dir_all(&target)
            } else {
                std::fs::remove_file(&target)
            }
        })
        .await?
        .map_err(|error| io_error("remove", &path, &error))?;
        Response::ok(RemoveResponse::default())
    }

    async fn watch_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, WatchDirRequest>,
    ) -> ServiceResult<connectrpc::ServiceStream<WatchDirResponse>> {
        let keepalive = crate::rpc::keepalive_interval(ctx.headers());
        let watch = self
            .watch(&ctx, request.path, request.recursive, request.include_entry)
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(forward_watch(watch, tx, keepalive));
        Ok(Response::stream(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        )))
    }

    async fn create_watcher(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, CreateWatcherRequest>,
    ) -> ServiceResult<CreateWatcherResponse> {
        if self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            >= MAX_WATCHERS
        {
            return Err(ConnectError::resource_exhausted(format!(
                "too many watchers (at most {MAX_WATCHERS}); remove some first"
            )));
        }
        let watch = self
            .watch(&ctx, request.path, request.recursive, request.include_entry)
            .await?;
        let id = new_watcher_id()?;
        let watcher = PollingWatcher::start(watch, id.clone());
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), watcher);
        Response::ok(CreateWatcherResponse {
            watcher_id: id,
            ..Default::default()
        })
    }

    async fn get_watcher_events(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, GetWatcherEventsRequest>,
    ) -> ServiceResult<GetWatcherEventsResponse> {
        let events = {
            let watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            let watcher = watchers
                .get(request.watcher_id)
                .ok_or_else(|| unknown_watcher(request.watcher_id))?;
            watcher.take()?
        };
        Response::ok(GetWatcherEventsResponse {
            events,
            ..Default::default()
        })
    }

    async fn remove_watcher(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, RemoveWatcherRequest>,
    ) -> ServiceResult<RemoveWatcherResponse> {
        let removed = self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(request.watcher_id);
        if removed.is_none() {
            return Err(unknown_watcher(request.watcher_id));
        }
        Response::ok(RemoveWatcherResponse::default())
    }
}

fn unknown_watcher(id: &str) -> ConnectError {
    ConnectError::not_found(format!("watcher with id {id} not found"))
}

/// A random id in UUID form (E2B's watcher ids are UUIDs).
fn new_watcher_id() -> Result<String, ConnectError> {
    let mut bytes = [0u8; 16];
    crate::system::entropy::fill_unblocking(&mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

type StreamItem = Result<WatchDirResponse, ConnectError>;

/// Feeds a `WatchDir` stream: `start`, then events, with a keep-alive after each quiet
/// `keepalive`; ends when the client goes away or the watch fails.
async fn forward_watch(
    mut watch: DirWatch,
    tx: tokio::sync::mpsc::Sender<StreamItem>,
    keepalive: Duration,
) {
    let start = WatchDirResponse {
        event: Some(watch_dir_response::StartEvent::default().into()),
        ..Default::default()
    };
    if tx.send(Ok(start)).await.is_err() {
        return;
    }
    let mut deadline = tokio::time::Instant::now() + keepalive;
    loop {
        let item = tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep_until(deadline) => Ok(WatchDirResponse {
                event: Some(watch_dir_response::KeepAlive::default().into()),
                ..Default::default()
            }),
            event = watch.next() => match event {
                Some(Ok(event)) => Ok(WatchDirResponse {
                    event: Some(event.into()),
                    ..Default::default()
                }),
                Some(Err(error)) => Err(error),
                None => Err(ConnectError::internal("watcher closed")),
            },
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
        deadline = tokio::time::Instant::now() + keepalive;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_watcher_ids_are_uuid_shaped_and_distinct() {
        let a = new_watcher_id().unwrap();
        let b = new_watcher_id().unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert_ne!(a, b);
    }

    #[test]
    fn test_walk_reports_requested_prefix_and_depth() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b/c")).unwrap();
        std::fs::write(dir.path().join("a/f"), b"x").unwrap();
        let shown = Path::new("/shown");
        let mut names = Names::new(crate::users::UserDb::system());
        let one = walk(dir.path(), shown, 1, &mut names).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].path, "/shown/a");
        let two = walk(dir.path(), shown, 2, &mut names).unwrap();
        let mut paths: Vec<_> = two.iter().map(|e| e.path.clone()).collect();
        paths.sort();
        assert_eq!(paths, ["/shown/a", "/shown/a/b", "/shown/a/f"]);
    }
}
