//! The vsock packet header and validated access to the guest's descriptor chains.
//!
//! ```text
//!  offset  0        8        16       20       24    28     30   32     36         40      44
//!          src_cid  dst_cid  src_port dst_port len   type   op   flags  buf_alloc  fwd_cnt
//!          u64      u64      u32      u32      u32   u16    u16  u32    u32        u32     (LE)
//! ```
//!
//! A packet is that header followed by `len` payload bytes, laid over a descriptor chain in any
//! shape: header and data in one descriptor (Linux 6.2+), in two, or scattered over several
//! (Linux's zero-copy TX). `virtio_vsock::VsockPacket` only accepts the first two shapes, so we
//! go through virtio-queue's `Reader`/`Writer`, which check every descriptor against guest
//! memory and walk regions.

use std::io::{Read, Write};

use virtio_queue::DescriptorChain;

use crate::memory::GuestMemory;

/// Size of the header on the wire.
pub(super) const HEADER_SIZE: usize = 44;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        Self {
            src_cid: u64::from_le_bytes(array(b, 0)),
            dst_cid: u64::from_le_bytes(array(b, 8)),
            src_port: u32::from_le_bytes(array(b, 16)),
            dst_port: u32::from_le_bytes(array(b, 20)),
            len: u32::from_le_bytes(array(b, 24)),
            type_: u16::from_le_bytes(array(b, 28)),
            op: u16::from_le_bytes(array(b, 30)),
            flags: u32::from_le_bytes(array(b, 32)),
            buf_alloc: u32::from_le_bytes(array(b, 36)),
            fwd_cnt: u32::from_le_bytes(array(b, 40)),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// `N` bytes of the header starting at `at` (offsets are constants, always in range).
fn array<const N: usize>(b: &[u8; HEADER_SIZE], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

#[derive(Debug, thiserror::Error)]
pub(super) enum PacketError {
    #[error("descriptor chain points outside guest memory: {0}")]
    Chain(virtio_queue::Error),
    #[error("descriptor chain holds {0} bytes, less than a packet header")]
    ShortHeader(usize),
    #[error("payload length {0} is larger than the {1} bytes allowed")]
    TooLong(u32, usize),
    #[error("header says {len} payload bytes but the chain holds {available}")]
    ShortData { len: usize, available: usize },
}

/// Reads one guest TX packet: the header, and its payload into `data` (which bounds the payload
/// size). Returns the header and the payload length.
pub(super) fn read_tx_packet(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    data: &mut [u8],
) -> Result<(PacketHeader, usize), PacketError> {
    let mut reader = chain.reader(mem).map_err(PacketError::Chain)?;
    let mut raw = [0u8; HEADER_SIZE];
    let available = reader.available_bytes();
    reader
        .read_exact(&mut raw)
        .map_err(|_| PacketError::ShortHeader(available))?;
    let header = PacketHeader::from_bytes(&raw);
    let len = usize::try_from(header.len)
        .ok()
        .filter(|&len| len <= data.len())
        .ok_or(PacketError::TooLong(header.len, data.len()))?;
    let available = reader.available_bytes();
    if available < len {
        return Err(PacketError::ShortData { len, available });
    }
    reader
        .read_exact(&mut data[..len])
        .map_err(|_| PacketError::ShortData { len, available })?;
    Ok((header, len))
}

/// A guest RX buffer, checked and ready to take one packet.
pub(super) struct RxBuffer<'a> {
    writer: virtio_queue::Writer<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>,
}

impl<'a> RxBuffer<'a> {
    /// Checks the chain's writable descriptors against guest memory; the buffer must hold at
    /// least a header.
    pub fn new(
        mem: &'a GuestMemory,
        chain: DescriptorChain<&'a GuestMemory>,
    ) -> Result<Self, PacketError> {
        let writer = chain.writer(mem).map_err(PacketError::Chain)?;
        if writer.available_bytes() < HEADER_SIZE {
            return Err(PacketError::ShortHeader(writer.available_bytes()));
        }
        Ok(Self { writer })
    }

    /// Payload bytes that fit after the header.
    pub fn data_capacity(&self) -> usize {
        self.writer.available_bytes().saturating_sub(HEADER_SIZE)
    }

    /// Writes the header and payload; returns the byte count for the used ring. The caller
    /// keeps `data` within [`RxBuffer::data_capacity`]; anything beyond it is cut off.
    pub fn write(mut self, mut header: PacketHeader, data: &[u8]) -> u32 {
        let data = &data[..data.len().min(self.data_capacity())];
        let Ok(len) = u32::try_from(data.len()) else {
            return 0;
        };
        header.len = len;
        // Writes into a checked Writer cannot fail once the capacity is known.
        let written = self
            .writer
            .write_all(&header.to_bytes())
            .and_then(|()| self.writer.write_all(data));
        if written.is_err() {
            return 0;
        }
        u32::try_from(self.writer.bytes_written()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn sample() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 52,
            len: 5,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn test_header_bytes_round_trip_little_endian() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[16..20], &1234u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&b), h);
    }

    #[test]
    fn test_read_tx_packet_header_and_data_scattered_over_descriptors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let raw = sample().to_bytes();
        // Header split 10 + 34 bytes, payload split 2 + 3 bytes.
        m.write_slice(&raw[..10], GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&raw[10..], GuestAddress(0x11_0000)).unwrap();
        m.write_slice(b"heXXllo", GuestAddress(0x12_0000)).unwrap();
        m.write_slice(b"llo", GuestAddress(0x13_0000)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 10, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x11_0000, 34, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x12_0000, 2, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x13_0000, 3, 0, 0)),
        ];
        let chain = vq.build_desc_chain(&descs).unwrap();
        let mut data = [0u8; 64];
        let (h, len) = read_tx_packet(&m, chain, &mut data).unwrap();
        assert_eq!(h, sample());
        assert_eq!(&data[..len], b"hello");
    }

    #[test]
    fn test_read_tx_packet_rejects_short_and_oversized() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut h = sample();
        h.len = 100;
        m.write_slice(&h.to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x10_0000, 60, 0, 0,
        ))];
        let chain = vq.build_desc_chain(&descs).unwrap();
        let mut data = [0u8; 200];
        assert!(matches!(
            read_tx_packet(&m, chain, &mut data),
            Err(PacketError::ShortData { len: 100, .. })
        ));
        let chain = vq.build_desc_chain(&descs).unwrap();
        let mut small = [0u8; 50];
        assert!(matches!(
            read_tx_packet(&m, chain, &mut small),
            Err(PacketError::TooLong(100, 50))
        ));
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x10_0000, 43, 0, 0,
        ))];
        let chain = vq.build_desc_chain(&descs).unwrap();
        assert!(matches!(
            read_tx_packet(&m, chain, &mut data),
            Err(PacketError::ShortHeader(43))
        ));
    }

    #[test]
    fn test_rx_buffer_writes_header_and_data_across_descriptors() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 30, w, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x11_0000, 20, w, 0)),
        ];
        let chain = vq.build_desc_chain(&descs).unwrap();
        let buf = RxBuffer::new(&m, chain).unwrap();
        assert_eq!(buf.data_capacity(), 6);
        let used = buf.write(sample(), b"abcdefgh");
        assert_eq!(used, 50);
        let mut raw = [0u8; HEADER_SIZE];
        m.read_slice(&mut raw[..30], GuestAddress(0x10_0000))
            .unwrap();
        m.read_slice(&mut raw[30..], GuestAddress(0x11_0000))
            .unwrap();
        let h = PacketHeader::from_bytes(&raw);
        assert_eq!(h.len, 6, "payload is cut to the buffer");
        let mut data = [0u8; 6];
        m.read_slice(&mut data, GuestAddress(0x11_0000 + 14))
            .unwrap();
        assert_eq!(&data, b"abcdef");
    }

    #[test]
    fn test_rx_buffer_refuses_read_only_or_tiny_chains() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x10_0000, 4096, 0, 0,
        ))];
        let chain = vq.build_desc_chain(&descs).unwrap();
        assert!(RxBuffer::new(&m, chain).is_err());
        let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x10_0000, 40, w, 0,
        ))];
        let chain = vq.build_desc_chain(&descs).unwrap();
        assert!(RxBuffer::new(&m, chain).is_err());
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x3f_ff00, 0x1000, w, 0,
        ))];
        let chain = vq.build_desc_chain(&descs).unwrap();
        assert!(matches!(
            RxBuffer::new(&m, chain),
            Err(PacketError::Chain(_))
        ));
    }

    proptest! {
        // Any chain shape and header bytes: parsing returns Ok or Err, never panics, and an Ok
        // payload always lies within the bounds it was given.
        #[test]
        fn prop_read_tx_packet_never_panics(
            descs in proptest::collection::vec(
                (0u64..0x50_0000, 0u32..0x2_0000, any::<bool>()), 1..5),
            header in proptest::array::uniform32(any::<u8>()),
            tail in proptest::array::uniform12(any::<u8>()),
            max in 0usize..0x2_0000,
        ) {
            let m = mem();
            let vq = MockSplitQueue::new(&m, 16);
            let mut raw = [0u8; HEADER_SIZE];
            raw[..32].copy_from_slice(&header);
            raw[32..].copy_from_slice(&tail);
            let _ = m.write_slice(&raw, GuestAddress(descs[0].0));
            let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
            let descs: Vec<RawDescriptor> = descs
                .iter()
                .map(|&(addr, len, writable)| {
                    RawDescriptor::from(SplitDescriptor::new(addr, len, if writable { w } else { 0 }, 0))
                })
                .collect();
            let chain = vq.build_desc_chain(&descs).unwrap();
            let mut data = vec![0u8; max];
            if let Ok((h, len)) = read_tx_packet(&m, chain, &mut data) {
                prop_assert!(len <= max);
                prop_assert_eq!(usize::try_from(h.len).unwrap(), len);
            }
            let chain = vq.build_desc_chain(&descs).unwrap();
            if let Ok(buf) = RxBuffer::new(&m, chain) {
                let cap = buf.data_capacity();
                let used = buf.write(PacketHeader::default(), &data);
                prop_assert!(usize::try_from(used).unwrap() <= HEADER_SIZE + cap);
            }
        }
    }
}
