//! A process's output, kept so that any number of streams (the `Start` that launched it, any
//! later `Connect`) can replay what was produced so far and then follow it live.
//!
//! The log is bounded: once the retained data exceeds its byte limit the oldest chunks are
//! dropped (a `Connect` reader that fell that far behind skips them). The stream that started
//! the process is the log's *primary* reader: while it is attached, the process's output is
//! not read further ahead of it than the limit (the process blocks on its writes, as with
//! E2B's envd), so a slow client never loses data; once it goes away the process runs freely.
//! The end event is kept apart and is never dropped, so a client that reconnects after the
//! process ended still learns how it ended.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use wrenn_proto::process::process_event::{DataEvent, data_event::Output};
use wrenn_proto::process::process_event::{EndEvent, Event, KeepAlive, StartEvent};

/// How much output (bytes of data) a process keeps for replay.
pub const OUTPUT_LIMIT_BYTES: usize = 8 << 20;

/// The retained output of one process and the way to wake its followers.
#[derive(Debug)]
pub struct OutputLog {
    state: Mutex<LogState>,
    /// Bumped on every change; followers wait on it.
    changed: watch::Sender<()>,
    /// Signalled when the primary reader moves on or goes away; `push` waits on it.
    consumed: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct LogState {
    /// Retained chunks; the first has sequence number `first_seq`.
    chunks: VecDeque<Output>,
    first_seq: u64,
    /// Data bytes in `chunks`.
    bytes: usize,
    end: Option<EndEvent>,
    /// The next sequence number the primary reader will take, while one is attached.
    primary: Option<u64>,
}

impl LogState {
    /// Whether `len` more bytes fit without running further than the limit ahead of the
    /// primary reader (always, without one; always for the first unread chunk).
    fn has_room(&self, len: usize, limit: usize) -> bool {
        let Some(primary) = self.primary else {
            return true;
        };
        let skip = usize::try_from(primary.saturating_sub(self.first_seq)).unwrap_or(usize::MAX);
        let unread: usize = self.chunks.iter().skip(skip).map(output_len).sum();
        unread == 0 || unread + len <= limit
    }
}

fn output_len(output: &Output) -> usize {
    match output {
        Output::Stdout(data) | Output::Stderr(data) | Output::Pty(data) => data.len(),
    }
}

impl OutputLog {
    /// An empty log keeping at most `limit` bytes of data (always at least the newest chunk).
    /// With `held`, a primary reader is expected: pushes wait for it from the start, until a
    /// [`follow`](Self::follow) with `primary` takes the place (or is dropped).
    pub fn new(limit: usize, held: bool) -> Self {
        Self {
            state: Mutex::new(LogState {
                primary: held.then_some(0),
                ..LogState::default()
            }),
            changed: watch::Sender::new(()),
            consumed: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a chunk, first waiting while the primary reader is a limit behind, and drops
    /// the oldest chunks beyond the limit.
    pub async fn push(&self, output: Output) {
        let len = output_len(&output);
        if len == 0 {
            return;
        }
        loop {
            let consumed = self.consumed.notified();
            tokio::pin!(consumed);
            // Registered before the check, so a wake-up between the two is not lost.
            consumed.as_mut().enable();
            if self.lock().has_room(len, self.limit) {
                break;
            }
            consumed.await;
        }
        {
            let mut state = self.lock();
            state.bytes += output_len(&output);
            state.chunks.push_back(output);
            while state.bytes > self.limit && state.chunks.len() > 1 {
                if let Some(old) = state.chunks.pop_front() {
                    state.bytes -= output_len(&old);
                    state.first_seq += 1;
                }
            }
        }
        self.changed.send_replace(());
    }

    /// Records how the process ended; followers get it after the data.
    pub fn finish(&self, end: EndEvent) {
        self.lock().end = Some(end);
        self.changed.send_replace(());
    }

    /// Whether [`finish`](Self::finish) was called.
    pub fn is_finished(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Data bytes currently retained.
    pub fn retained_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The chunks from `*cursor` on (advancing it), and the end once everything before it has
    /// been read. A `primary` reader's progress lets waiting pushes go on.
    fn read_from(&self, cursor: &mut u64, primary: bool) -> (Vec<Output>, Option<EndEvent>) {
        let mut state = self.lock();
        let start = (*cursor).max(state.first_seq);
        let skip = usize::try_from(start - state.first_seq).unwrap_or(usize::MAX);
        let chunks: Vec<Output> = state.chunks.iter().skip(skip).cloned().collect();
        let retained = u64::try_from(state.chunks.len()).unwrap_or(u64::MAX);
        *cursor = state.first_seq + retained;
        let end = if chunks.is_empty() {
            state.end.clone()
        } else {
            None
        };
        if primary {
            state.primary = Some(*cursor);
            drop(state);
            self.consumed.notify_waiters();
        }
        (chunks, end)
    }

    /// The primary reader went away: output no longer waits for anyone.
    fn release(&self) {
        self.lock().primary = None;
        self.consumed.notify_waiters();
    }

    /// A reader of this log: `start{pid}` first, then everything retained, then live data,
    /// then the end. The `primary` one (the starter's stream) holds the output back while it
    /// is a limit behind.
    pub fn follow(self: &Arc<Self>, pid: u32, keepalive: Duration, primary: bool) -> Follower {
        if primary {
            self.lock().primary = Some(0);
        }
        Follower {
            primary,
            log: Arc::clone(self),
            changed: self.changed.subscribe(),
            cursor: 0,
            pending: VecDeque::from([Event::from(StartEvent {
                pid,
                ..Default::default()
            })]),
            keepalive,
            done: false,
        }
    }
}

/// One stream's position in an [`OutputLog`].
#[derive(Debug)]
pub struct Follower {
    primary: bool,
    log: Arc<OutputLog>,
    changed: watch::Receiver<()>,
    cursor: u64,
    pending: VecDeque<Event>,
    keepalive: Duration,
    done: bool,
}

impl Follower {
    /// The next event; a keep-alive after `keepalive` without one; `None` after the end.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            // Mark the current version seen before reading, so a push racing the read still
            // wakes the wait below.
            self.changed.borrow_and_update();
            let (chunks, end) = self.log.read_from(&mut self.cursor, self.primary);
            if !chunks.is_empty() {
                self.pending.extend(chunks.into_iter().map(|output| {
                    Event::from(DataEvent {
                        output: Some(output),
                        ..Default::default()
                    })
                }));
                continue;
            }
            if let Some(end) = end {
                self.done = true;
                return Some(Event::from(end));
            }
            // The log (and so its sender) lives as long as this follower holds it: `changed`
            // only returns when there is something new.
            let wait = tokio::time::timeout(self.keepalive, self.changed.changed()).await;
            if wait.is_err() {
                return Some(Event::from(KeepAlive::default()));
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.primary {
            self.log.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdout(len: usize, byte: u8) -> Output {
        Output::Stdout(vec![byte; len])
    }

    fn end(code: i32) -> EndEvent {
        EndEvent {
            exit_code: code,
            exited: true,
            status: format!("exit status {code}"),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn test_log_over_limit_drops_oldest() {
        let log = OutputLog::new(100, false);
        for byte in 0..10u8 {
            log.push(stdout(30, byte)).await;
        }
        assert!(log.retained_bytes() <= 100, "{}", log.retained_bytes());
        let mut cursor = 0;
        let (chunks, end) = log.read_from(&mut cursor, false);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0], stdout(30, 7));
        assert_eq!(chunks[2], stdout(30, 9));
        assert!(end.is_none());
        assert_eq!(cursor, 10);
    }

    #[tokio::test]
    async fn test_log_single_huge_chunk_is_kept() {
        let log = OutputLog::new(10, false);
        log.push(stdout(5, 1)).await;
        log.push(stdout(50, 2)).await;
        let mut cursor = 0;
        let (chunks, _) = log.read_from(&mut cursor, false);
        assert_eq!(chunks, vec![stdout(50, 2)]);
    }

    #[tokio::test]
    async fn test_follower_replays_then_follows_then_ends() {
        let log = Arc::new(OutputLog::new(OUTPUT_LIMIT_BYTES, false));
        log.push(stdout(3, b'a')).await;
        let mut follower = log.follow(7, Duration::from_secs(30), false);
        assert!(matches!(follower.next().await, Some(Event::Start(s)) if s.pid == 7));
        assert!(matches!(follower.next().await, Some(Event::Data(_))));
        let writer = Arc::clone(&log);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.push(Output::Stderr(b"late".to_vec())).await;
            writer.finish(end(3));
        });
        match follower.next().await {
            Some(Event::Data(data)) => {
                assert_eq!(data.output, Some(Output::Stderr(b"late".to_vec())));
            }
            other => panic!("expected data, got {other:?}"),
        }
        assert!(matches!(follower.next().await, Some(Event::End(e)) if e.exit_code == 3));
        assert!(follower.next().await.is_none());
    }

    #[tokio::test]
    async fn test_follower_quiet_log_sends_keepalive() {
        let log = Arc::new(OutputLog::new(OUTPUT_LIMIT_BYTES, false));
        let mut follower = log.follow(1, Duration::from_millis(10), false);
        assert!(matches!(follower.next().await, Some(Event::Start(_))));
        assert!(matches!(follower.next().await, Some(Event::Keepalive(_))));
    }

    #[tokio::test]
    async fn test_primary_reader_holds_output_back_until_it_reads_or_leaves() {
        let log = Arc::new(OutputLog::new(100, true));
        log.push(stdout(60, 1)).await;
        // 60 unread + 60 > 100: the push waits for the (expected) primary reader.
        let blocked = tokio::time::timeout(Duration::from_millis(50), log.push(stdout(60, 2)));
        assert!(blocked.await.is_err());
        let mut primary = log.follow(1, Duration::from_secs(30), true);
        assert!(matches!(primary.next().await, Some(Event::Start(_))));
        assert!(matches!(primary.next().await, Some(Event::Data(_))));
        // Read: room again.
        tokio::time::timeout(Duration::from_secs(5), log.push(stdout(60, 2)))
            .await
            .unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(50), log.push(stdout(60, 3)));
        assert!(blocked.await.is_err());
        // The primary goes away: output flows, and the log bound applies again.
        drop(primary);
        for byte in 3..10 {
            tokio::time::timeout(Duration::from_secs(5), log.push(stdout(60, byte)))
                .await
                .unwrap();
        }
        assert!(log.retained_bytes() <= 100);
    }
}
