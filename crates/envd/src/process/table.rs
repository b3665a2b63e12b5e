//! The processes envd started: running ones, and ended ones for a grace period so that a
//! client reconnecting right after the end still gets the output and the end event.
//!
//! Also the global set of child pids envd waits for itself ([`is_tracked`]), which the PID-1
//! reaper consults so it never steals their exit statuses.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use connectrpc::ConnectError;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::ChildStdin;
use wrenn_proto::process::ProcessConfig;
use wrenn_proto::process::process_selector::Selector;

use super::cgroup::ProcessCgroup;
use super::output::OutputLog;
use super::pty::Pty;

/// How long an ended process stays reachable by `Connect`.
pub const ENDED_GRACE: Duration = Duration::from_secs(120);

/// At most this many ended processes are kept (the oldest go first).
pub const ENDED_CAP: usize = 64;

/// Where a process's input goes.
#[derive(Debug)]
pub enum Input {
    /// A stdin pipe; `None` after CloseStdin.
    Pipe(Option<ChildStdin>),
    /// The terminal.
    Pty(Arc<Pty>),
    /// Started with `stdin: false` (stdin is /dev/null).
    Disabled,
    /// The process ended.
    Ended,
}

/// One started process.
#[derive(Debug)]
pub struct Record {
    /// Its pid (and process group id: it leads its own session).
    pub pid: u32,
    /// The client's tag, if any.
    pub tag: Option<String>,
    /// What was started.
    pub config: ProcessConfig,
    /// Its output, for replay.
    pub log: Arc<OutputLog>,
    /// Input (async lock: writes may wait for the child to read).
    pub input: tokio::sync::Mutex<Input>,
    /// The terminal, for resizing (cleared at the end).
    pub pty: Mutex<Option<Arc<Pty>>>,
    /// Its cgroup, when envd manages cgroups.
    pub cgroup: Option<ProcessCgroup>,
    /// Set once the main process has been reaped.
    exited: AtomicBool,
}

impl Record {
    /// A record for a just-started process.
    pub fn new(
        pid: u32,
        tag: Option<String>,
        config: ProcessConfig,
        log: Arc<OutputLog>,
        input: Input,
        pty: Option<Arc<Pty>>,
        cgroup: Option<ProcessCgroup>,
    ) -> Self {
        Self {
            pid,
            tag,
            config,
            log,
            input: tokio::sync::Mutex::new(input),
            pty: Mutex::new(pty),
            cgroup,
            exited: AtomicBool::new(false),
        }
    }

    /// Whether the main process has exited.
    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }

    pub(super) fn mark_exited(&self) {
        self.exited.store(true, Ordering::Release);
    }

    /// The terminal, if this is a PTY process that has not ended.
    pub fn pty(&self) -> Option<Arc<Pty>> {
        self.pty
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(super) fn drop_pty(&self) {
        self.pty
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
    }

    /// Sends `signal` to the whole tree: every process in its cgroup, and its process group
    /// (which also covers the tree when there is no cgroup).
    pub fn signal_tree(&self, signal: Signal) {
        if let Some(cgroup) = &self.cgroup
            && let Err(error) = cgroup.signal(signal)
        {
            tracing::warn!(pid = self.pid, %error, "signalling the cgroup failed");
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            match killpg(Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(error) => tracing::warn!(pid, %error, "signalling the process group failed"),
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    record: Arc<Record>,
    ended_at: Option<Instant>,
}

/// All processes envd started that are running or recently ended, by pid.
#[derive(Debug, Default)]
pub struct Table {
    entries: Mutex<HashMap<u32, Entry>>,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a started process (replacing an ended one whose pid was reused).
    pub fn insert(&self, record: Arc<Record>) {
        self.lock().insert(
            record.pid,
            Entry {
                record,
                ended_at: None,
            },
        );
    }

    /// The process `selector` names, running or recently ended (the newest for a tag,
    /// preferring running ones).
    pub fn find(&self, selector: &Selector) -> Option<Arc<Record>> {
        let entries = self.lock();
        match selector {
            Selector::Pid(pid) => entries.get(pid).map(|e| Arc::clone(&e.record)),
            Selector::Tag(tag) => entries
                .values()
                .filter(|e| e.record.tag.as_deref() == Some(tag.as_str()))
                .max_by_key(|e| (e.ended_at.is_none(), e.ended_at))
                .map(|e| Arc::clone(&e.record)),
        }
    }

    /// The running process `selector` names; `not_found` for an unknown or ended one.
    pub fn running(&self, selector: &Selector) -> Result<Arc<Record>, ConnectError> {
        self.find(selector)
            .filter(|record| !record.exited())
            .ok_or_else(|| not_found(selector))
    }

    /// The running processes.
    pub fn list(&self) -> Vec<Arc<Record>> {
        let mut list: Vec<Arc<Record>> = self
            .lock()
            .values()
            .filter(|e| !e.record.exited())
            .map(|e| Arc::clone(&e.record))
            .collect();
        list.sort_by_key(|r| r.pid);
        list
    }

    /// Marks `record` ended: it stays findable for [`ENDED_GRACE`], and only the newest
    /// [`ENDED_CAP`] ended records are kept.
    pub fn ended(self: &Arc<Self>, record: &Arc<Record>) {
        {
            let mut entries = self.lock();
            if let Some(entry) = entries.get_mut(&record.pid)
                && Arc::ptr_eq(&entry.record, record)
            {
                entry.ended_at = Some(Instant::now());
            }
            let mut ended: Vec<(Instant, u32)> = entries
                .iter()
                .filter_map(|(pid, e)| e.ended_at.map(|at| (at, *pid)))
                .collect();
            if ended.len() > ENDED_CAP {
                ended.sort();
                for (_, pid) in &ended[..ended.len() - ENDED_CAP] {
                    entries.remove(pid);
                }
            }
        }
        let table = Arc::clone(self);
        let record = Arc::clone(record);
        tokio::spawn(async move {
            tokio::time::sleep(ENDED_GRACE).await;
            let mut entries = table.lock();
            if entries
                .get(&record.pid)
                .is_some_and(|e| Arc::ptr_eq(&e.record, &record))
            {
                entries.remove(&record.pid);
            }
        });
    }
}

/// E2B's error for a selector that names no process.
pub fn not_found(selector: &Selector) -> ConnectError {
    match selector {
        Selector::Pid(pid) => ConnectError::not_found(format!("process with pid {pid} not found")),
        Selector::Tag(tag) => {
            ConnectError::not_found(format!("process with tag '{tag}' not found"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, tag: Option<&str>) -> Arc<Record> {
        Arc::new(Record::new(
            pid,
            tag.map(str::to_owned),
            ProcessConfig::default(),
            Arc::new(OutputLog::new(1024, false)),
            Input::Disabled,
            None,
            None,
        ))
    }

    #[tokio::test]
    async fn test_table_ended_records_are_found_but_not_listed() {
        let table = Arc::new(Table::default());
        let a = record(10, Some("web"));
        let b = record(11, None);
        table.insert(Arc::clone(&a));
        table.insert(Arc::clone(&b));
        assert_eq!(table.list().len(), 2);
        a.mark_exited();
        table.ended(&a);
        assert_eq!(table.list().len(), 1);
        let found = table.find(&Selector::Tag("web".into())).unwrap();
        assert!(Arc::ptr_eq(&found, &a));
        assert!(table.running(&Selector::Pid(10)).is_err());
        assert_eq!(
            table.running(&Selector::Pid(99)).unwrap_err().code,
            connectrpc::ErrorCode::NotFound
        );
        assert!(table.running(&Selector::Pid(11)).is_ok());
    }

    #[tokio::test]
    async fn test_table_ended_cap_drops_oldest() {
        let table = Arc::new(Table::default());
        let total = u32::try_from(ENDED_CAP).unwrap() + 5;
        for pid in 1..=total {
            let r = record(pid, None);
            table.insert(Arc::clone(&r));
            r.mark_exited();
            table.ended(&r);
        }
        assert!(table.find(&Selector::Pid(1)).is_none());
        assert!(table.find(&Selector::Pid(total)).is_some());
        assert_eq!(table.lock().len(), ENDED_CAP);
    }
}
