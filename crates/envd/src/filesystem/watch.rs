//! Directory watches over inotify, shared by the streaming `WatchDir` and the polling watchers
//! (`CreateWatcher` / `GetWatcherEvents`).
//!
//! A recursive watch puts one inotify watch on every directory below the root, and on each
//! directory created (or moved in) later, before the event announcing it is handed out, so a
//! client that saw a directory appear also sees what happens inside it afterwards. Watches are
//! added with the request user's permissions (a directory the user cannot read cannot be
//! watched). Event names are relative to the watched directory, like E2B's.
//!
//! inotify operations map to E2B's event types as fsnotify maps them: create/moved-to →
//! CREATE, modify → WRITE, delete → REMOVE, moved-from → RENAME, attrib → CHMOD. The "self"
//! events of subdirectories are dropped (their parent already reported them).
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use buffa::{EnumValue, MessageField};
use connectrpc::ConnectError;
use futures::StreamExt as _;
use inotify::{EventMask, EventOwned, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use wrenn_proto::filesystem::{EventType, FilesystemEvent};

use super::as_user::run_as;
use super::entry::{Names, entry_info};
use crate::users::{User, UserDb};

/// The events a watch asks the kernel for.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MODIFY
        | WatchMask::MOVE_SELF
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DONT_FOLLOW
}

/// A live watch on one directory (and, when recursive, its subdirectories).
#[derive(Debug)]
pub struct DirWatch {
    stream: EventStream<Vec<u8>>,
    watches: Watches,
    /// Each watched directory, relative to the root ("" is the root).
    dirs: HashMap<WatchDescriptor, PathBuf>,
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    user: User,
    users: UserDb,
    /// Events decoded but not yet handed out.
    pending: VecDeque<FilesystemEvent>,
}

impl DirWatch {
    /// Starts watching `root`, which must be a directory the user may read.
    pub async fn new(
        root: PathBuf,
        recursive: bool,
        include_entry: bool,
        user: User,
        users: UserDb,
    ) -> Result<Self, ConnectError> {
        let check = root.clone();
        let meta = run_as(&user, move || std::fs::metadata(&check))
            .await?
            .map_err(|error| crate::rpc::io_error("watch", &root, &error))?;
        if !meta.is_dir() {
            return Err(ConnectError::invalid_argument(format!(
                "path {} not a directory",
                root.display()
            )));
        }
        let inotify = Inotify::init()
            .map_err(|error| ConnectError::internal(format!("creating a watcher: {error}")))?;
        let stream = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .map_err(|error| ConnectError::internal(format!("creating a watcher: {error}")))?;
        let mut watch = Self {
            watches: stream.watches(),
            stream,
            dirs: HashMap::new(),
            root: root.clone(),
            recursive,
            include_entry,
            user,
            users,
            pending: VecDeque::new(),
        };
        let added = watch
            .add_tree(PathBuf::new())
            .await?
            .map_err(|error| crate::rpc::io_error("watch", &root, &error))?;
        watch.dirs.extend(added);
        Ok(watch)
    }

    /// Adds watches on `relative` (under the root) and, when recursive, every directory below
    /// it, as the user. Unreadable subdirectories are skipped; only the top one must succeed.
    async fn add_tree(
        &self,
        relative: PathBuf,
    ) -> Result<io::Result<Vec<(WatchDescriptor, PathBuf)>>, ConnectError> {
        let mut watches = self.watches.clone();
        let root = self.root.clone();
        let recursive = self.recursive;
        Ok(run_as(&self.user, move || {
            let mut added = Vec::new();
            let top = watches.add(root.join(&relative), mask())?;
            added.push((top, relative.clone()));
            if !recursive {
                return Ok(added);
            }
            let mut queue = vec![relative];
            while let Some(dir) = queue.pop() {
                let Ok(entries) = std::fs::read_dir(root.join(&dir)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                        let child = dir.join(entry.file_name());
                        if let Ok(wd) = watches.add(root.join(&child), mask()) {
                            added.push((wd, child.clone()));
                            queue.push(child);
                        }
                    }
                }
            }
            Ok(added)
        })
        .await?)
    }

    /// The next event; `None` once the kernel side is gone.
    pub async fn next(&mut self) -> Option<Result<FilesystemEvent, ConnectError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            let raw = match self.stream.next().await? {
                Ok(raw) => raw,
                Err(error) => {
                    return Some(Err(ConnectError::internal(format!(
                        "watcher error: {error}"
                    ))));
                }
            };
            if let Err(error) = self.handle(raw).await {
                return Some(Err(error));
            }
        }
    }

    /// Turns one inotify event into zero or more queued events.
    async fn handle(&mut self, raw: EventOwned) -> Result<(), ConnectError> {
        let mask = raw.mask;
        if mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!(root = %self.root.display(), "inotify queue overflowed; events lost");
            return Ok(());
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&raw.wd);
            return Ok(());
        }
        let Some(dir) = self.dirs.get(&raw.wd).cloned() else {
            return Ok(());
        };
        let is_self = mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF);
        if is_self && !dir.as_os_str().is_empty() {
            return Ok(());
        }
        let relative = match &raw.name {
            Some(name) => dir.join(name),
            None => dir.clone(),
        };
        if self.recursive
            && mask.contains(EventMask::ISDIR)
            && mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
        {
            // Watch the new directory before anyone hears of it. It may be gone already.
            if let Ok(added) = self.add_tree(relative.clone()).await? {
                self.dirs.extend(added);
            }
        }
        if self.recursive && mask.contains(EventMask::ISDIR) && mask.contains(EventMask::MOVED_FROM)
        {
            // The directory left (or is re-entering under a new name, which re-adds it): its
            // watches would report under a stale name.
            self.forget_tree(&relative);
        }
        let name = relative_name(&relative);
        let mut kinds = Vec::new();
        if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            kinds.push(EventType::EVENT_TYPE_CREATE);
        }
        if mask.intersects(EventMask::MOVED_FROM | EventMask::MOVE_SELF) {
            kinds.push(EventType::EVENT_TYPE_RENAME);
        }
        if mask.contains(EventMask::ATTRIB) {
            kinds.push(EventType::EVENT_TYPE_CHMOD);
        }
        if mask.contains(EventMask::MODIFY) {
            kinds.push(EventType::EVENT_TYPE_WRITE);
        }
        if mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
            kinds.push(EventType::EVENT_TYPE_REMOVE);
        }
        for kind in kinds {
            let entry = if self.include_entry
                && !matches!(
                    kind,
                    EventType::EVENT_TYPE_REMOVE | EventType::EVENT_TYPE_RENAME
                ) {
                self.entry(&relative).await
            } else {
                None
            };
            self.pending.push_back(FilesystemEvent {
                name: name.clone(),
                r#type: EnumValue::from(kind),
                entry: entry.map_or_else(MessageField::none, MessageField::some),
                ..Default::default()
            });
        }
        Ok(())
    }

    /// Drops the watches of `relative` and everything below it.
    fn forget_tree(&mut self, relative: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, dir)| dir.starts_with(relative))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // Fails only when the kernel already dropped the watch.
            let _ = self.watches.remove(wd);
        }
    }

    /// The entry of `relative` now, if it still exists and the user may see it.
    async fn entry(&self, relative: &Path) -> Option<wrenn_proto::filesystem::EntryInfo> {
        let path = self.root.join(relative);
        let users = self.users.clone();
        run_as(&self.user, move || {
            entry_info(&path, &mut Names::new(users)).ok()
        })
        .await
        .ok()
        .flatten()
    }
}

/// E2B's event name: the path relative to the watched directory ("." for the directory).
fn relative_name(relative: &Path) -> String {
    if relative.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        OsString::from(relative.as_os_str())
            .to_string_lossy()
            .into_owned()
    }
}

/// The most events a polling watcher keeps between two `GetWatcherEvents` calls; older ones
/// are dropped first.
pub const MAX_QUEUED_EVENTS: usize = 10_000;

/// A watch whose events wait in a bounded queue until the client asks for them.
#[derive(Debug)]
pub struct PollingWatcher {
    queue: Arc<Mutex<Queue>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<FilesystemEvent>,
    dropped: u64,
    error: Option<ConnectError>,
}

impl PollingWatcher {
    /// Starts collecting `watch`'s events in the background.
    pub fn start(mut watch: DirWatch, id: String) -> Self {
        let queue = Arc::new(Mutex::new(Queue::default()));
        let sink = queue.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                let mut queue = sink.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    Ok(event) => {
                        if queue.events.len() >= MAX_QUEUED_EVENTS {
                            queue.events.pop_front();
                            queue.dropped += 1;
                            if queue.dropped == 1 {
                                tracing::warn!(watcher = %id, "watcher queue full; dropping oldest events");
                            }
                        }
                        queue.events.push_back(event);
                    }
                    Err(error) => {
                        tracing::warn!(watcher = %id, %error, "watcher stopped");
                        queue.error = Some(error);
                        return;
                    }
                }
            }
        });
        Self { queue, task }
    }

    /// The events queued since the last call (the queue is emptied), or the error that stopped
    /// the watcher.
    pub fn take(&self) -> Result<Vec<FilesystemEvent>, ConnectError> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.events.is_empty()
            && let Some(error) = queue.error.take()
        {
            return Err(error);
        }
        queue.dropped = 0;
        Ok(queue.events.drain(..).collect())
    }
}

impl Drop for PollingWatcher {
    fn drop(&mut self) {
        // Dropping the task's watch closes its inotify descriptor.
        self.task.abort();
    }
}
