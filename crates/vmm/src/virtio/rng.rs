//! virtio-rng (virtio 1.2 §5.4): entropy for the guest from the host's `getrandom(2)`.
//!
//! One request queue, no configuration space, no device features beyond VERSION_1 and
//! EVENT_IDX. The driver posts device-writable buffers; each writable descriptor of a chain is
//! filled straight from `getrandom(2)` into guest memory, and the chain is completed with the
//! number of bytes written. Readable descriptors carry nothing for this device and are
//! skipped. A chain gets at most [`MAX_BYTES_PER_REQUEST`], so a guest posting huge buffers
//! cannot keep the VMM's event loop busy (the driver asks again for more).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestAddress, GuestMemory as _, GuestMemoryError, Permissions, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::persist::{self, DeviceKindState, PersistError, QueueState, VirtioDeviceState};
use super::queue::serve_queue;
use super::{
    ActivateError, Activation, Interrupt, TYPE_RNG, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
};
use crate::diag::LogLimiter;
use crate::memory::GuestMemory;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes of entropy one descriptor chain gets.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("buffer at {addr:#x}+{len:#x} is not writable guest memory")]
    Buffer { addr: u64, len: u32 },
    #[error("cannot fill a buffer from getrandom")]
    Entropy(#[source] GuestMemoryError),
}

/// What the device holds while the driver has it running.
#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    queue_max_sizes: [u16; 1],
    queue_events: [EventFd; 1],
    acked_features: u64,
    active: Option<Active>,
    log_limit: LogLimiter,
    request_log_limit: LogLimiter,
}

impl Rng {
    pub fn new() -> io::Result<Rng> {
        Ok(Rng {
            queue_max_sizes: [QUEUE_SIZE],
            queue_events: [EventFd::new(EFD_NONBLOCK)?],
            acked_features: 0,
            active: None,
            log_limit: LogLimiter::default(),
            request_log_limit: LogLimiter::default(),
        })
    }

    /// Serves everything the driver has posted.
    pub(crate) fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            queue,
            interrupt,
        } = active;
        let request_log_limit = &mut self.request_log_limit;
        serve_queue(
            queue,
            mem,
            interrupt,
            &self.queue_events[0],
            &mut self.log_limit,
            |chain| fill_chain(chain, mem, request_log_limit),
        );
    }
}

/// Fills the chain's writable descriptors, up to [`MAX_BYTES_PER_REQUEST`] in all; returns the
/// number of bytes written.
fn fill_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    log_limit: &mut LogLimiter,
) -> u32 {
    let mut written = 0u32;
    for desc in chain.writable() {
        let room = MAX_BYTES_PER_REQUEST - written;
        if room == 0 {
            break;
        }
        let len = desc.len().min(room);
        if len == 0 {
            continue;
        }
        if let Err(e) = fill_random(mem, desc.addr(), len) {
            if log_limit.allow() {
                warn!("entropy request cut short: {e}");
            }
            break;
        }
        written += len;
    }
    written
}

/// Writes `len` random bytes at `addr`, which must all be guest memory.
fn fill_random(mem: &GuestMemory, addr: GuestAddress, len: u32) -> Result<(), RngError> {
    let bad_buffer = RngError::Buffer { addr: addr.0, len };
    let Ok(count) = usize::try_from(len) else {
        return Err(bad_buffer);
    };
    // Checked first so that a bad buffer is not half filled and then reported as empty.
    if !mem.check_range(addr, count, Permissions::Write) {
        return Err(bad_buffer);
    }
    let slices = mem
        .get_slices(addr, count, Permissions::Write)
        .map_err(RngError::Entropy)?;
    for slice in slices {
        let mut slice = slice.map_err(RngError::Entropy)?;
        HostEntropy
            .read_exact_volatile(&mut slice)
            .map_err(|e| RngError::Entropy(GuestMemoryError::IOError(io_error(e))))?;
    }
    Ok(())
}

fn io_error(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

/// `getrandom(2)` as a source that writes straight into guest memory.
struct HostEntropy;

impl ReadVolatile for HostEntropy {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        // SAFETY: `guard` points at `buf.len()` bytes of mapped guest memory that stay mapped
        // while the guard lives; getrandom writes at most `buf.len()` bytes there and keeps no
        // reference to the buffer.
        let got = unsafe { libc::getrandom(guard.as_ptr().cast(), buf.len(), 0) };
        let got = usize::try_from(got)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        buf.bitmap().mark_dirty(0, got);
        Ok(got)
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        let event = &self.queue_events[0];
        if let Err(e) = ops.add(Events::with_data(event, 0, EventSet::IN)) {
            error!("virtio-rng: cannot watch the queue eventfd: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let event = &self.queue_events[0];
        if events.fd() != event.as_raw_fd() {
            warn!(fd = events.fd(), "virtio-rng: event on an unknown fd");
            return;
        }
        // Non-blocking: nothing to read just means someone else drained it.
        let _ = event.read();
        if self.active.is_none() {
            debug!("virtio-rng: queue notified before activation; ignored");
            return;
        }
        self.process_queue();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            mut queues,
            interrupt,
        } = activation;
        let ready = queues.iter().filter(|q| q.ready()).count();
        let queue = match queues.pop() {
            Some(queue) if ready == 1 && queues.is_empty() => queue,
            _ => {
                return Err(ActivateError::QueueCount {
                    want: 1,
                    got: ready,
                });
            }
        };
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        // Buffers posted before now (e.g. before a snapshot) would otherwise wait for the
        // next notification.
        self.kick();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn save_state(&self) -> VirtioDeviceState {
        let queues = self
            .active
            .as_ref()
            .map(|active| vec![QueueState::from(&active.queue)])
            .unwrap_or_default();
        persist::device_state(self, queues, DeviceKindState::Rng {})
    }

    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), PersistError> {
        persist::restore_device(self, "rng", state, mem, interrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::persist::testing::transport_queue;
    use crate::virtio::testing::{desc, device_queue, used, used_idx};
    // Explicit, so it wins over proptest's `Rng` trait from the glob below.
    use super::Rng;

    use proptest::prelude::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    // The bindings are u32; descriptor flags are u16, and these fit.
    #[allow(clippy::cast_possible_truncation)]
    mod narrow {
        use virtio_bindings::bindings::virtio_ring::{
            VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
        };
        pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
        pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
        pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    }
    use narrow::{INDIRECT, NEXT, WRITE};

    fn memory() -> GuestMemory {
        // Two adjacent regions, so a buffer can straddle them.
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x2_0000),
            (GuestAddress(0x2_0000), 0x4_0000),
        ])
        .unwrap()
    }

    /// An activated device on `vq`, with EVENT_IDX as given.
    fn active_rng(
        mem: &GuestMemory,
        vq: &MockSplitQueue<GuestMemory>,
        event_idx: bool,
    ) -> (Rng, Arc<Interrupt>) {
        let mut rng = Rng::new().unwrap();
        let mut queue = transport_queue(vq, QUEUE_SIZE);
        queue.set_event_idx(event_idx);
        let interrupt = Arc::new(Interrupt::new().unwrap());
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue],
            interrupt: interrupt.clone(),
        })
        .unwrap();
        (rng, interrupt)
    }

    #[test]
    fn test_rng_identity_and_features() {
        let rng = Rng::new().unwrap();
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), &[256]);
        assert_eq!(rng.queue_events().len(), 1);
        assert_ne!(rng.avail_features() & VIRTIO_F_VERSION_1, 0);
        let mut b = [0xaa; 4];
        rng.read_config(0, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn test_rng_fills_every_writable_descriptor_and_skips_readable() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&[0u8; 0x300], GuestAddress(0x8000))
            .unwrap();
        vq.add_desc_chains(
            &[
                desc(0x8000, 0x100, WRITE | NEXT, 1),
                desc(0x8100, 0x100, NEXT, 2), // readable: left alone
                desc(0x8200, 0x100, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let (mut rng, interrupt) = active_rng(&mem, &vq, false);
        rng.process_queue();

        assert_eq!(used_idx(&mem), 1);
        assert_eq!(used(&mem, 0), (0, 0x200));
        let mut buf = [0u8; 0x100];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert_ne!(buf, [0u8; 0x100]);
        mem.read_slice(&mut buf, GuestAddress(0x8100)).unwrap();
        assert_eq!(buf, [0u8; 0x100], "readable descriptor was written");
        mem.read_slice(&mut buf, GuestAddress(0x8200)).unwrap();
        assert_ne!(buf, [0u8; 0x100]);
        assert_eq!(interrupt.status(), 1);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn test_rng_buffer_straddling_two_regions_is_filled() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let start = 0x2_0000 - 0x80;
        vq.add_desc_chains(&[desc(start, 0x100, WRITE, 0)], 0)
            .unwrap();
        let (mut rng, _) = active_rng(&mem, &vq, false);
        rng.process_queue();
        assert_eq!(used(&mem, 0), (0, 0x100));
        let mut tail = [0u8; 0x80];
        mem.read_slice(&mut tail, GuestAddress(0x2_0000)).unwrap();
        assert_ne!(tail, [0u8; 0x80]);
    }

    #[test]
    fn test_rng_caps_bytes_per_request() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                desc(0x1_0000, 0x1_0000, WRITE | NEXT, 1),
                desc(0x2_0000, 0x1_0000, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let (mut rng, _) = active_rng(&mem, &vq, false);
        rng.process_queue();
        assert_eq!(used(&mem, 0), (0, MAX_BYTES_PER_REQUEST));
        let mut second = [0u8; 16];
        mem.read_slice(&mut second, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(second, [0u8; 16], "nothing beyond the cap was written");
    }

    #[test]
    fn test_rng_buffer_outside_memory_completes_with_what_was_written() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                desc(0x8000, 0x40, WRITE | NEXT, 1),
                desc(0x10_0000_0000, 0x40, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        vq.add_desc_chains(&[desc(0x9000, 0x10, WRITE, 0)], 2)
            .unwrap();
        let (mut rng, _) = active_rng(&mem, &vq, false);
        rng.process_queue();
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used(&mem, 0), (0, 0x40));
        assert_eq!(used(&mem, 1), (2, 0x10), "the device carried on");
    }

    #[test]
    fn test_rng_event_idx_suppresses_unwanted_interrupts() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // used_event (after the avail ring) says "interrupt me when used idx passes 5".
        let used_event = GuestAddress(vq.avail_addr().0 + 4 + 2 * 16);
        mem.write_obj(5u16, used_event).unwrap();
        vq.add_desc_chains(&[desc(0x8000, 8, WRITE, 0)], 0).unwrap();
        let (mut rng, interrupt) = active_rng(&mem, &vq, true);
        rng.process_queue();
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(
            interrupt.status(),
            0,
            "driver did not want an interrupt yet"
        );
        assert!(interrupt.irqfd().read().is_err());

        mem.write_obj(1u16, used_event).unwrap();
        vq.add_desc_chains(&[desc(0x8000, 8, WRITE, 0)], 1).unwrap();
        rng.process_queue();
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(interrupt.status(), 1);
        assert_eq!(
            interrupt.irqfd().read().unwrap(),
            1,
            "one interrupt for the batch"
        );
    }

    #[test]
    fn test_rng_batch_gets_one_interrupt() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        for i in 0..5u16 {
            vq.add_desc_chains(&[desc(0x8000 + u64::from(i) * 0x100, 16, WRITE, 0)], i)
                .unwrap();
        }
        let (mut rng, interrupt) = active_rng(&mem, &vq, false);
        rng.process_queue();
        assert_eq!(used_idx(&mem), 5);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    }

    #[test]
    fn test_rng_activation_needs_exactly_one_ready_queue() {
        let mem = memory();
        let mut rng = Rng::new().unwrap();
        let not_ready = Queue::new(QUEUE_SIZE).unwrap();
        let result = rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![not_ready],
            interrupt: Arc::new(Interrupt::new().unwrap()),
        });
        assert!(matches!(
            result,
            Err(ActivateError::QueueCount { want: 1, got: 0 })
        ));
        assert!(!rng.is_activated());
        let result = rng.activate(Activation {
            mem,
            queues: vec![],
            interrupt: Arc::new(Interrupt::new().unwrap()),
        });
        assert!(result.is_err());
    }

    #[test]
    fn test_rng_reset_deactivates_and_forgets_features() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut rng, _) = active_rng(&mem, &vq, false);
        rng.set_acked_features(u64::MAX);
        assert_eq!(rng.acked_features(), AVAIL_FEATURES);
        rng.reset();
        assert!(!rng.is_activated());
        assert_eq!(rng.acked_features(), 0);
        // A queue event now is drained and ignored.
        vq.add_desc_chains(&[desc(0x8000, 8, WRITE, 0)], 0).unwrap();
        rng.process_queue();
        assert_eq!(used_idx(&mem), 0);
    }

    #[test]
    fn test_rng_event_loop_ignores_queue_events_until_activated() {
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::Mutex;

        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x8000, 8, WRITE, 0)], 0).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut manager = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        manager.add_subscriber(rng.clone());

        rng.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(used_idx(&mem), 0, "not active: nothing served");
        // The event was drained: the loop does not spin on it.
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);

        let queue = device_queue(&vq);
        rng.lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![queue],
                interrupt: Arc::new(Interrupt::new().unwrap()),
            })
            .unwrap();
        // Activation kicks the queue, which finds the chain posted earlier.
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(used(&mem, 0), (0, 8));
    }

    #[test]
    fn test_rng_invalid_avail_index_does_not_spin() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut rng, interrupt) = active_rng(&mem, &vq, false);
        // Drop the kick activation made.
        rng.queue_events[0].read().unwrap();
        // More entries "available" than the ring holds.
        vq.avail().idx().store(100);
        rng.process_queue();
        assert_eq!(used_idx(&mem), 0);
        assert_eq!(interrupt.status(), 0);
        assert!(
            rng.queue_events[0].read().is_err(),
            "a broken ring must not make the device requeue itself"
        );
    }

    #[test]
    fn test_rng_entropy_written_to_guest_memory_marks_the_page_dirty() {
        use crate::virtio::persist::testing::{clear_dirty, is_dirty};
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x8000, 0x100, WRITE, 0)], 0)
            .unwrap();
        let (mut rng, _) = active_rng(&mem, &vq, false);
        clear_dirty(&mem);
        rng.process_queue();
        assert_eq!(used(&mem, 0), (0, 0x100));
        assert!(is_dirty(&mem, 0x8000), "getrandom's bytes are not tracked");
        assert!(!is_dirty(&mem, 0x9000), "a page nobody wrote is clean");
    }

    #[test]
    fn test_rng_snapshot_restore_on_copied_memory_continues_serving() {
        use crate::virtio::persist::VirtioDeviceState;
        use crate::virtio::persist::testing::copy_guest_memory;

        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x8000, 0x40, WRITE, 0)], 0)
            .unwrap();
        let (mut rng, _) = active_rng(&mem, &vq, true);
        rng.set_acked_features(AVAIL_FEATURES);
        rng.process_queue();
        assert_eq!(used_idx(&mem), 1);

        let json = serde_json::to_string(&rng.save_state()).unwrap();
        drop(rng);
        let state: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        assert!(state.activated);
        assert_eq!(state.queues[0].next_used, 1);

        // The restored VM: its own memory, same contents; the driver's rings laid over it first.
        let copy = memory();
        let vq = MockSplitQueue::new(&copy, 16);
        copy_guest_memory(&mem, &copy);
        let mut restored = Rng::new().unwrap();
        let interrupt = Arc::new(Interrupt::new().unwrap());
        restored
            .restore_state(&state, copy.clone(), interrupt.clone())
            .unwrap();
        assert!(restored.is_activated());

        copy.write_slice(&[0u8; 0x40], GuestAddress(0x9000))
            .unwrap();
        // EVENT_IDX survived: the driver asks for an interrupt once the second entry is used.
        let used_event = GuestAddress(vq.avail_addr().0 + 4 + 2 * 16);
        copy.write_obj(1u16, used_event).unwrap();
        vq.add_desc_chains(&[desc(0x9000, 0x40, WRITE, 0)], 1)
            .unwrap();
        restored.process_queue();
        assert_eq!(used_idx(&copy), 2);
        assert_eq!(used(&copy, 1), (1, 0x40));
        let mut got = [0u8; 0x40];
        copy.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_ne!(got, [0u8; 0x40]);
        assert_eq!(used_idx(&mem), 1, "the old memory is not touched");
        assert_eq!(interrupt.status(), 1);
        assert_eq!(restored.save_state().queues[0].next_used, 2);
    }

    proptest! {
        /// Random descriptor tables and avail entries never panic, never write outside the
        /// buffers the chain marks writable, and leave the device serving good requests.
        #[test]
        fn test_rng_random_chains_never_panic(
            descs in proptest::collection::vec(
                (
                    prop_oneof![0x8000u64..0x9000, Just(0x5_fff0), any::<u64>()],
                    prop_oneof![0u32..0x200, any::<u32>()],
                    prop::sample::select(vec![0u16, WRITE, NEXT, WRITE | NEXT, INDIRECT]),
                    0u16..20,
                ),
                1..16,
            ),
            heads in proptest::collection::vec(0u16..20, 1..8),
        ) {
            let mem = memory();
            let vq = MockSplitQueue::new(&mem, 16);
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                vq.desc_table().store(u16::try_from(i).unwrap(), desc(*addr, *len, *flags, *next)).unwrap();
            }
            for (i, head) in heads.iter().enumerate() {
                vq.avail().ring().ref_at(i).unwrap().store(*head);
            }
            vq.avail().idx().store(u16::try_from(heads.len()).unwrap());
            // A canary the rings and buffers never cover.
            let canary = GuestAddress(0x1_f000);
            mem.write_slice(&[0x5a; 64], canary).unwrap();

            let (mut rng, _) = active_rng(&mem, &vq, false);
            rng.process_queue();
            let served = used_idx(&mem);
            prop_assert!(usize::from(served) <= heads.len());
            for i in 0..usize::from(served) {
                prop_assert!(used(&mem, i).1 <= MAX_BYTES_PER_REQUEST);
            }
            let mut got = [0u8; 64];
            mem.read_slice(&mut got, canary).unwrap();
            prop_assert_eq!(got, [0x5a; 64]);

            // Still usable: a well-formed request at a fresh descriptor is served.
            vq.desc_table().store(15, desc(0x8000, 32, WRITE, 0)).unwrap();
            let idx = vq.avail().idx().load();
            vq.avail().ring().ref_at(usize::from(idx % 16)).unwrap().store(15);
            vq.avail().idx().store(idx.wrapping_add(1));
            rng.process_queue();
            let after = used_idx(&mem);
            prop_assert_eq!(after, served.wrapping_add(1));
            prop_assert_eq!(used(&mem, usize::from(served % 16)), (15, 32));
        }
    }
}
