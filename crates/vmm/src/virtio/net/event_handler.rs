//! The device on the event loop: queue notifications, the tap, and activation.
//!
//! The tap is in the interest list only while the device is active, the tap is healthy, and
//! the guest has posted room for a frame; otherwise a readable tap would wake the loop for
//! nothing, forever.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::{RX_INDEX, TX_INDEX};

/// The `data` of each event source.
const RX_QUEUE_EVENT: u32 = 0;
const TX_QUEUE_EVENT: u32 = 1;
const TAP_EVENT: u32 = 2;
const ACTIVATE_EVENT: u32 = 3;

impl Net {
    /// Runs the RX path and puts the tap in or out of the interest list as the result says.
    fn run_rx(&mut self, ops: &mut EventOps) -> bool {
        if self.tap_broken {
            self.set_tap_polling(ops, false);
            return false;
        }
        let run = self.process_rx();
        let want = run.want_tap && !self.tap_broken;
        self.set_tap_polling(ops, want);
        run.interrupt
    }

    fn set_tap_polling(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.tap_polled {
            return;
        }
        let events = Events::with_data(&self.tap, TAP_EVENT, EventSet::IN);
        let result = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.tap_polled = want,
            Err(e) => tracing::error!(net = %self.id(), "cannot change the tap's polling: {e}"),
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (&self.queue_events[RX_INDEX], RX_QUEUE_EVENT),
            (&self.queue_events[TX_INDEX], TX_QUEUE_EVENT),
            (&self.activate_event, ACTIVATE_EVENT),
        ];
        for (fd, data) in sources {
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                tracing::error!(net = %self.id(), "cannot register with the event loop: {e}");
            }
        }
        if self.active.is_some() {
            // Activated before being registered: finish the activation on the loop.
            let _ = self.activate_event.write(1);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let interrupt = match events.data() {
            RX_QUEUE_EVENT => {
                // Reading resets the eventfd; an empty one (EAGAIN) is harmless.
                let _ = self.queue_events[RX_INDEX].read();
                self.active.is_some() && self.run_rx(ops)
            }
            TX_QUEUE_EVENT => {
                let _ = self.queue_events[TX_INDEX].read();
                self.process_tx()
            }
            TAP_EVENT => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    // Level-triggered errors would wake the loop forever.
                    tracing::error!(
                        net = %self.id(),
                        tap = %self.tap.name(),
                        "the tap reported an error; no longer reading it"
                    );
                    self.tap_broken = true;
                }
                if self.active.is_none() || self.tap_broken {
                    self.set_tap_polling(ops, false);
                    false
                } else {
                    self.run_rx(ops)
                }
            }
            ACTIVATE_EVENT => {
                let _ = self.activate_event.read();
                if self.active.is_some() {
                    let tx = self.process_tx();
                    self.run_rx(ops) || tx
                } else {
                    false
                }
            }
            other => {
                tracing::warn!(net = %self.id(), "unexpected event source {other}");
                false
            }
        };
        if interrupt {
            self.signal_guest();
        }
    }
}
