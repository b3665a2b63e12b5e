//! The device side of a split virtqueue, shared by the devices that complete requests in place.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::Interrupt;
use crate::diag::LogLimiter;
use crate::memory::GuestMemory;

/// Rounds of "drain the ring, re-enable notifications, look again" one call of
/// [`serve_queue`] makes before it yields the event loop to other devices.
pub const MAX_SERVE_ROUNDS: u32 = 4;

/// Device side of a split queue, shared by the devices in this crate: completes every chain
/// the driver has made available with `handle` (which returns the number of bytes it wrote
/// into the chain), then interrupts the guest at most once, and only if the driver wants to be
/// told (with EVENT_IDX, `needs_notification` honours the driver's used_event).
///
/// Notifications are off while draining and re-enabled before the last look, so a buffer
/// posted in between is never missed: if one shows up at that last look, the ring is drained
/// again. A guest that keeps the ring busy gets [`MAX_SERVE_ROUNDS`] rounds of at most a ring's
/// worth of chains each; then `queue_event`
/// is written so the loop comes back after the other devices had their turn. An avail index
/// that runs ahead of the ring is reported and the queue left alone until the next
/// notification.
pub fn serve_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    queue_event: &EventFd,
    log_limit: &mut LogLimiter,
    mut handle: F,
) where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
{
    let mut completed = 0usize;
    let mut rounds = 0;
    loop {
        rounds += 1;
        if let Err(e) = queue.disable_notification(mem)
            && log_limit.allow()
        {
            warn!("cannot disable queue notifications: {e}");
        }
        // At most a ring's worth per round: a driver on another vCPU can repost as fast as
        // we complete.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = handle(chain);
            if let Err(e) = queue.add_used(mem, head, written) {
                if log_limit.allow() {
                    warn!(head, "cannot complete a descriptor chain: {e}");
                }
                continue;
            }
            completed += 1;
        }
        match queue.enable_notification(mem) {
            Ok(false) => break,
            Ok(true) if avail_index_overruns(queue, mem) => {
                if log_limit.allow() {
                    warn!(
                        next_avail = queue.next_avail(),
                        "available ring index is invalid; queue left alone"
                    );
                }
                break;
            }
            Ok(true) if rounds < MAX_SERVE_ROUNDS => {}
            Ok(true) => {
                if let Err(e) = queue_event.write(1) {
                    warn!("cannot requeue a busy queue: {e}");
                }
                break;
            }
            Err(e) => {
                if log_limit.allow() {
                    warn!("cannot enable queue notifications: {e}");
                }
                break;
            }
        }
    }
    if completed == 0 {
        return;
    }
    // When in doubt, interrupt: a spurious interrupt costs an exit, a missing one hangs I/O.
    let wanted = queue.needs_notification(mem).unwrap_or(true);
    if wanted && let Err(e) = interrupt.signal_used_queue() {
        warn!("cannot interrupt the guest: {e}");
    }
}

/// Whether the driver claims more available entries than the ring holds (or the index cannot
/// be read): then nothing can be popped, and looking again will not change that.
fn avail_index_overruns(queue: &Queue, mem: &GuestMemory) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => (idx - Wrapping(queue.next_avail())).0 > queue.size(),
        Err(_) => true,
    }
}
