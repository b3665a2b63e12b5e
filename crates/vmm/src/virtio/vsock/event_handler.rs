//! The vsock device on the event loop.
//!
//! Every wake-up runs the same way: note what fired (drain an eventfd, accept, read a
//! handshake byte, mark a connection readable or writable, expire deadlines), then run both
//! queues as far as they go, then bring epoll in line with what each stream wants now.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{EVENT, RX, TX, Vsock};
use super::muxer::TOKEN_STREAM;

/// Epoll data tokens: the queue eventfds use their queue index.
const TOKEN_RX: u32 = 0;
const TOKEN_TX: u32 = 1;
const TOKEN_EVENT: u32 = 2;
const TOKEN_CONTROL: u32 = 3;
pub(super) const TOKEN_LISTENER: u32 = 4;
const TOKEN_TIMER: u32 = 5;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let mut registrations = Vec::new();
        for (token, index) in [(TOKEN_RX, RX), (TOKEN_TX, TX), (TOKEN_EVENT, EVENT)] {
            if let Some(evt) = self.queue_event(index) {
                registrations.push(Events::with_data(evt, token, EventSet::IN));
            }
        }
        registrations.push(Events::with_data(
            &self.control_evt,
            TOKEN_CONTROL,
            EventSet::IN,
        ));
        // Polled for connections only while the device is active (see `Muxer::sync_epoll`):
        // until then host connections wait in the backlog.
        registrations.push(Events::with_data(
            &self.muxer.listener,
            TOKEN_LISTENER,
            EventSet::empty(),
        ));
        registrations.push(Events::with_data(
            &self.muxer.timer,
            TOKEN_TIMER,
            EventSet::IN,
        ));
        for events in registrations {
            if let Err(e) = ops.add(events) {
                tracing::error!("vsock: cannot register with the event loop: {e:?}");
            }
        }
        // Activation may have happened before the device was added to the loop.
        if self.is_active() {
            let _ = self.control_evt.write(1);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_RX | TOKEN_TX | TOKEN_EVENT => {
                // The queues are looked at below whatever fired; before activation the
                // notification is just dropped.
                let index = usize::try_from(events.data()).unwrap_or(RX);
                if let Some(evt) = self.queue_event(index) {
                    let _ = evt.read();
                }
            }
            TOKEN_CONTROL => {
                let _ = self.control_evt.read();
            }
            TOKEN_LISTENER => {
                if self.is_active() {
                    self.muxer.accept(ops);
                }
            }
            TOKEN_TIMER => {
                // Non-blocking: EAGAIN if it was re-armed in the meantime.
                let _ = self.muxer.timer.wait();
                self.muxer.expire();
            }
            TOKEN_STREAM => self
                .muxer
                .stream_event(events.fd(), events.event_set(), ops),
            other => tracing::warn!("vsock: event with unknown token {other}"),
        }
        self.muxer.settle();
        self.run_queues();
        let active = self.is_active();
        self.muxer.sync_epoll(ops, active);
    }
}
