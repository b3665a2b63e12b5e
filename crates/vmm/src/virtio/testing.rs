//! Test helpers for devices: the driver's side of a queue, played with virtio-queue's
//! `MockSplitQueue`.

use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// MockSplitQueue puts its used ring over the tail of its avail ring (it measures the avail
/// ring in entries rather than bytes), so used entries would overwrite avail entries and
/// used_event. The device's queue gets a used ring of its own here.
pub const USED_RING: u64 = 0x4000;

pub fn device_queue(vq: &MockSplitQueue<GuestMemory>) -> Queue {
    let mut queue: Queue = vq.create_queue().unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    queue
}

pub fn used_idx(mem: &GuestMemory) -> u16 {
    mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
}

/// (id, len) of used entry `i`.
pub fn used(mem: &GuestMemory, i: usize) -> (u32, u32) {
    let at = USED_RING + 4 + 8 * u64::try_from(i).unwrap();
    let id = mem.read_obj(GuestAddress(at)).unwrap();
    let len = mem.read_obj(GuestAddress(at + 4)).unwrap();
    (id, len)
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}
