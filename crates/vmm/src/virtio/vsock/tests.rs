//! Device tests: the real event loop, real unix sockets in a tempdir, and a guest driver played
//! on real guest memory with virtio-queue's mock ring pieces.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::packet::{HEADER_SIZE, PacketHeader};
use super::*;
use crate::api::models;
use crate::memory::GuestMemory;
use crate::virtio::{
    Activation, Interrupt, TYPE_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 16;
/// Each descriptor index owns a buffer this big (a header plus 64 KiB).
const SLOT: u64 = 0x1_1000;
const RX_BUF: u32 = 4096;
const FIRST_PORT: u32 = 1 << 30;

fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// One descriptor of a chain the test driver posts.
#[derive(Clone, Debug)]
enum Seg {
    /// Device-readable, holding these bytes.
    Read(Vec<u8>),
    /// Device-writable, this long.
    Write(u32),
    /// Anything at all (bad addresses, lengths, flags).
    Raw { addr: u64, len: u32, flags: u16 },
}

/// The driver's side of one split virtqueue. The mock's `MockSplitQueue` lays its rings out
/// overlapping for more than a few entries, so the rings are placed here and only the mock's
/// ring accessors are used.
struct GuestQueue<'a> {
    mem: &'a GuestMemory,
    table: DescriptorTable<'a, GuestMemory>,
    avail: AvailRing<'a, GuestMemory>,
    used: UsedRing<'a, GuestMemory>,
    base: u64,
    buffers: u64,
    free: Vec<u16>,
    /// head → the chain's (index, address, length).
    chains: HashMap<u16, Vec<(u16, u64, u32)>>,
    seen_used: u16,
}

impl<'a> GuestQueue<'a> {
    fn new(mem: &'a GuestMemory, base: u64, buffers: u64) -> Self {
        Self {
            mem,
            table: DescriptorTable::new(mem, GuestAddress(base), QSIZE),
            avail: AvailRing::new(mem, GuestAddress(base + 0x400), QSIZE),
            used: UsedRing::new(mem, GuestAddress(base + 0x800), QSIZE),
            base,
            buffers,
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
            seen_used: 0,
        }
    }

    /// The queue as the transport would hand it to `activate`.
    fn queue(&self) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.set_size(QSIZE);
        let split = |a: u64| (Some(u32::try_from(a & 0xffff_ffff).unwrap()), Some(0));
        let (lo, hi) = split(self.base);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.base + 0x400);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.base + 0x800);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Makes a chain available to the device.
    fn post(&mut self, segs: &[Seg]) -> u16 {
        let mut parts = Vec::new();
        for _ in segs {
            parts.push((self.free.pop().expect("out of descriptors"), 0u64, 0u32));
        }
        for (i, seg) in segs.iter().enumerate() {
            let idx = parts[i].0;
            let buf = self.buffers + u64::from(idx) * SLOT;
            let (addr, len, mut flags) = match seg {
                Seg::Read(bytes) => {
                    self.mem.write_slice(bytes, GuestAddress(buf)).unwrap();
                    (buf, u32::try_from(bytes.len()).unwrap(), 0)
                }
                Seg::Write(len) => (buf, *len, u16::try_from(VRING_DESC_F_WRITE).unwrap()),
                Seg::Raw { addr, len, flags } => (*addr, *len, *flags),
            };
            let next = if i + 1 < segs.len() {
                flags |= u16::try_from(VRING_DESC_F_NEXT).unwrap();
                parts[i + 1].0
            } else {
                flags &= !u16::try_from(VRING_DESC_F_NEXT).unwrap();
                0
            };
            self.table
                .store(
                    idx,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
            parts[i] = (idx, addr, len);
        }
        let head = parts[0].0;
        let avail_idx = self.avail.idx().load();
        self.avail
            .ring()
            .ref_at(usize::from(avail_idx % QSIZE))
            .unwrap()
            .store(head);
        self.avail.idx().store(avail_idx.wrapping_add(1));
        self.chains.insert(head, parts);
        head
    }

    /// Chains the device returned since the last call: (the bytes it wrote, used length).
    fn take_used(&mut self) -> Vec<(Vec<u8>, u32)> {
        let used_idx = self.used.idx().load();
        let mut out = Vec::new();
        while self.seen_used != used_idx {
            let elem: VirtqUsedElem = self
                .used
                .ring()
                .ref_at(usize::from(self.seen_used % QSIZE))
                .unwrap()
                .load();
            self.seen_used = self.seen_used.wrapping_add(1);
            let head = u16::try_from(elem.id()).unwrap();
            let parts = self
                .chains
                .remove(&head)
                .expect("device returned an unknown head");
            let mut bytes = Vec::new();
            let mut left = usize::try_from(elem.len()).unwrap();
            for &(idx, addr, len) in &parts {
                self.free.push(idx);
                let n = left.min(usize::try_from(len).unwrap());
                let mut chunk = vec![0u8; n];
                if n > 0 {
                    self.mem.read_slice(&mut chunk, GuestAddress(addr)).unwrap();
                }
                bytes.extend_from_slice(&chunk);
                left -= n;
            }
            out.push((bytes, elem.len()));
        }
        out
    }

    /// The driver's `used_event` (with EVENT_IDX: interrupt me once used idx passes this).
    fn set_used_event(&self, value: u16) {
        let addr = self.base + 0x400 + 4 + 2 * u64::from(QSIZE);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.used.idx().load()
    }

    /// The same driver over another guest memory (a restored VM's), with its bookkeeping.
    /// The mock rings zero their indexes in `mem`: call this before copying the contents over.
    fn moved_to<'n>(&self, mem: &'n GuestMemory) -> GuestQueue<'n> {
        let mut queue = GuestQueue::new(mem, self.base, self.buffers);
        queue.free = self.free.clone();
        queue.chains = self.chains.clone();
        queue.seen_used = self.seen_used;
        queue
    }
}

/// A guest packet header, guest port → host port.
fn pkt(op: u16, guest_port: u32, host_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

struct Harness<'a> {
    uds: PathBuf,
    dev: Arc<Mutex<Vsock>>,
    mgr: EventManager<Arc<Mutex<Vsock>>>,
    interrupt: Arc<Interrupt>,
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    ev: GuestQueue<'a>,
    /// Packets the device put in RX buffers, oldest first.
    received: VecDeque<(PacketHeader, Vec<u8>)>,
    /// Post a fresh RX buffer for each one the device fills.
    refill_rx: bool,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemory, dir: &Path, extra_features: u64) -> Self {
        Self::with_limits(mem, dir, extra_features, |_| {})
    }

    fn with_limits(
        mem: &'a GuestMemory,
        dir: &Path,
        extra_features: u64,
        limits: impl FnOnce(&mut muxer::Limits),
    ) -> Self {
        let uds = dir.join("v.sock");
        let config = models::Vsock {
            guest_cid: 3,
            uds_path: uds.to_str().unwrap().to_string(),
            vsock_id: None,
        };
        let mut dev = Vsock::new(&config).unwrap();
        limits(&mut dev.muxer.limits);
        let mut h = Self::assemble(
            uds,
            dev,
            [
                GuestQueue::new(mem, 0x1000, 0x10_0000),
                GuestQueue::new(mem, 0x2000, 0x30_0000),
                GuestQueue::new(mem, 0x3000, 0x50_0000),
            ],
        );
        {
            let mut d = h.dev.lock().unwrap();
            d.set_acked_features(VIRTIO_F_VERSION_1 | extra_features);
            d.activate(Activation {
                mem: mem.clone(),
                queues: vec![h.rx.queue(), h.tx.queue(), h.ev.queue()],
                interrupt: h.interrupt.clone(),
            })
            .unwrap();
        }
        h.post_rx(8);
        h.pump();
        h
    }

    /// The device on a fresh event loop with a fresh interrupt, and the driver's queues.
    fn assemble(uds: PathBuf, dev: Vsock, [rx, tx, ev]: [GuestQueue<'a>; 3]) -> Self {
        let dev = Arc::new(Mutex::new(dev));
        let mut mgr = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        mgr.add_subscriber(dev.clone());
        Self {
            uds,
            dev,
            mgr,
            interrupt: Arc::new(Interrupt::new().unwrap()),
            rx,
            tx,
            ev,
            received: VecDeque::new(),
            refill_rx: true,
        }
    }

    fn kick(&self, queue: usize) {
        self.dev.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rx.post(&[Seg::Write(RX_BUF)]);
        }
        self.kick(0);
    }

    /// Reads what the device put in RX buffers; returns how many.
    fn collect_rx(&mut self) -> usize {
        let used = self.rx.take_used();
        let n = used.len();
        for (bytes, len) in used {
            assert!(
                usize::try_from(len).unwrap() >= HEADER_SIZE,
                "short RX packet"
            );
            let header = PacketHeader::from_bytes(&bytes[..HEADER_SIZE].try_into().unwrap());
            let data = bytes[HEADER_SIZE..].to_vec();
            assert_eq!(usize::try_from(header.len).unwrap(), data.len());
            self.received.push_back((header, data));
        }
        if self.refill_rx && n > 0 {
            for _ in 0..n {
                self.rx.post(&[Seg::Write(RX_BUF)]);
            }
            self.kick(0);
        }
        n
    }

    fn pump_once(&mut self) -> usize {
        let events = self.mgr.run_with_timeout(5).unwrap();
        self.tx.take_used();
        events + self.collect_rx()
    }

    /// Runs the event loop until it has been idle for a few rounds.
    fn pump(&mut self) {
        let mut idle = 0;
        for _ in 0..1000 {
            if self.pump_once() == 0 {
                idle += 1;
                if idle >= 3 {
                    return;
                }
            } else {
                idle = 0;
            }
        }
    }

    fn pump_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump_once();
        }
    }

    /// Queues a guest TX chain (recycling finished ones first) and notifies the device.
    fn send_segs(&mut self, segs: &[Seg]) {
        self.tx.take_used();
        if self.tx.free_count() < segs.len() {
            self.pump();
        }
        self.tx.post(segs);
        self.kick(1);
    }

    fn send(&mut self, header: PacketHeader, data: &[u8]) {
        let mut header = header;
        header.len = u32::try_from(data.len()).unwrap();
        let mut segs = vec![Seg::Read(header.to_bytes().to_vec())];
        if !data.is_empty() {
            segs.push(Seg::Read(data.to_vec()));
        }
        self.send_segs(&segs);
        self.pump();
    }

    /// Waits for the first received packet with this op (others stay queued).
    fn wait_packet(&mut self, op: u16) -> (PacketHeader, Vec<u8>) {
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(pos) = self.received.iter().position(|(h, _)| h.op == op) {
                return self.received.remove(pos).unwrap();
            }
            assert!(
                Instant::now() < end,
                "no packet with op {op}: {:?}",
                self.received
            );
            self.pump_once();
        }
    }

    fn take_received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        self.received.drain(..).collect()
    }

    /// Reads `n` bytes from a host stream while the loop runs.
    fn host_read(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(3);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while out.len() < n && Instant::now() < end {
            let want = (n - out.len()).min(buf.len());
            match s.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(k) => out.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.pump_once();
                }
                Err(e) => panic!("host read: {e}"),
            }
        }
        out
    }

    /// Whether the host stream reaches EOF (or reset) within a few seconds.
    fn host_sees_eof(&mut self, s: &mut UnixStream) -> bool {
        s.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 1 << 16];
        while Instant::now() < end {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.pump_once();
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("host read: {e}"),
            }
        }
        false
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }

    /// A host process connects and the guest accepts: returns the stream and the local port.
    fn host_connection(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.wait_packet(OP_REQUEST);
        assert_eq!(req.dst_port, guest_port);
        self.send(pkt(OP_RESPONSE, guest_port, req.src_port), &[]);
        let ok = format!("OK {}\n", req.src_port);
        assert_eq!(self.host_read(&mut host, ok.len()), ok.as_bytes());
        (host, req.src_port)
    }

    /// The guest connects to host port `port` (served by `listener`): returns the host's side.
    fn guest_connection(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        port: u32,
    ) -> UnixStream {
        self.send(pkt(OP_REQUEST, guest_port, port), &[]);
        let (resp, _) = self.wait_packet(OP_RESPONSE);
        assert_eq!((resp.src_port, resp.dst_port), (port, guest_port));
        let (stream, _) = listener.accept().unwrap();
        stream
    }

    fn listen(&self, port: u32) -> UnixListener {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{port}"));
        UnixListener::bind(path).unwrap()
    }

    fn drain_irq(&self) -> u64 {
        self.interrupt.irqfd().read().unwrap_or(0)
    }
}

// ---- construction, config space --------------------------------------------------------------

fn config(path: &Path, cid: u32) -> models::Vsock {
    models::Vsock {
        guest_cid: cid,
        uds_path: path.to_str().unwrap().to_string(),
        vsock_id: None,
    }
}

#[test]
fn test_new_rejects_reserved_cid_and_empty_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    assert!(matches!(
        Vsock::new(&config(&path, 2)),
        Err(VsockError::GuestCid(2))
    ));
    assert!(!path.exists(), "no socket file after a failed new");
    let mut empty = config(&path, 3);
    empty.uds_path.clear();
    assert!(matches!(Vsock::new(&empty), Err(VsockError::EmptyPath)));
}

#[test]
fn test_new_replaces_stale_socket_but_not_live_one_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    // A socket file whose listener is gone (a VMM that died).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(&config(&path, 3)).unwrap();
    assert!(UnixStream::connect(&path).is_ok(), "listening again");
    // While it listens, a second device must not steal the path.
    let err = Vsock::new(&config(&path, 4)).unwrap_err();
    assert!(matches!(err, VsockError::InUse { .. }));
    assert!(err.to_string().contains("v.sock"), "{err}");
    drop(dev);
    assert!(!path.exists(), "drop removes the socket file");

    std::fs::write(&path, b"not a socket").unwrap();
    let err = Vsock::new(&config(&path, 3)).unwrap_err();
    assert!(matches!(err, VsockError::NotASocket { .. }));
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");

    let missing = dir.path().join("no/such/dir/v.sock");
    let err = Vsock::new(&config(&missing, 3)).unwrap_err();
    assert!(matches!(err, VsockError::Bind { .. }));
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn test_drop_leaves_a_socket_file_that_replaced_ours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let dev = Vsock::new(&config(&path, 3)).unwrap();
    std::fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    drop(dev);
    assert!(path.exists());
    drop(other);
}

#[test]
fn test_device_identity_features_and_config_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut dev = Vsock::new(&config(&path, 0x1234_5678)).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(dev.queue_events().len(), 3);
    assert_eq!(dev.uds_path(), path);
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    );
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features(), dev.avail_features());
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
    let mut part = [0xffu8; 4];
    dev.read_config(6, &mut part);
    assert_eq!(part, [0, 0, 0, 0]);
    dev.read_config(2, &mut part);
    assert_eq!(part, [0x34, 0x12, 0, 0]);
    dev.read_config(u64::MAX, &mut part);
    assert_eq!(part, [0; 4]);
    dev.write_config(0, &[9; 8]);
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678, "config is read-only");
}

#[test]
fn test_activate_needs_three_ready_queues() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(&config(&dir.path().join("v.sock"), 3)).unwrap();
    let rx = GuestQueue::new(&mem, 0x1000, 0x10_0000);
    let result = dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![rx.queue(), rx.queue()],
        interrupt: Arc::new(Interrupt::new().unwrap()),
    });
    assert!(matches!(
        result,
        Err(crate::virtio::ActivateError::QueueCount { want: 3, got: 2 })
    ));
    assert!(!dev.is_activated());
}

// ---- host-initiated --------------------------------------------------------------------------

#[test]
fn test_host_connect_handshake_and_data_both_ways() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);

    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"connect 52\n").unwrap();
    let (req, _) = h.wait_packet(OP_REQUEST);
    assert_eq!(
        (req.src_cid, req.src_port, req.dst_cid, req.dst_port),
        (HOST_CID, FIRST_PORT, GUEST_CID, 52)
    );
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_TX_BUF_SIZE);
    h.send(pkt(OP_RESPONSE, 52, FIRST_PORT), &[]);
    assert_eq!(h.host_read(&mut host, 14), b"OK 1073741824\n");

    host.write_all(b"ping").unwrap();
    let (rw, data) = h.wait_packet(OP_RW);
    assert_eq!((rw.src_port, rw.dst_port), (FIRST_PORT, 52));
    assert_eq!(data, b"ping");

    h.send(pkt(OP_RW, 52, FIRST_PORT), b"pong");
    assert_eq!(h.host_read(&mut host, 4), b"pong");
    assert_eq!(h.connections(), 1);

    // The next host connection gets the next local port.
    let (_second, port) = h.host_connection(52);
    assert_eq!(port, FIRST_PORT + 1);
}

#[test]
fn test_host_connect_bytes_after_the_line_reach_the_guest() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let (req, _) = h.wait_packet(OP_REQUEST);
    h.send(pkt(OP_RESPONSE, 52, req.src_port), &[]);
    let (_, data) = h.wait_packet(OP_RW);
    assert_eq!(data, b"early");
}

#[test]
fn test_host_connect_refused_by_guest_rst_closes_host_stream() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let (req, _) = h.wait_packet(OP_REQUEST);
    h.send(pkt(OP_RST, 9, req.src_port), &[]);
    assert!(h.host_sees_eof(&mut host));
    assert_eq!(h.connections(), 0);
    // The port is free again.
    let (_host, port) = h.host_connection(9);
    assert_eq!(port, FIRST_PORT + 1, "round robin, not reuse");
}

#[test]
fn test_host_connect_without_response_times_out() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::with_limits(&mem, dir.path(), 0, |l| {
        l.request_timeout = Duration::from_millis(100);
    });
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = h.wait_packet(OP_REQUEST);
    h.pump_for(Duration::from_millis(250));
    assert!(h.host_sees_eof(&mut host));
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 52));
    assert_eq!(h.connections(), 0);
}

#[test]
fn test_bad_connect_lines_close_the_host_stream() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    for line in [
        &b"HELLO 52\n"[..],
        b"CONNECT\n",
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'C'; 40][..],
    ] {
        let mut host = UnixStream::connect(&h.uds).unwrap();
        host.write_all(line).unwrap();
        assert!(
            h.host_sees_eof(&mut host),
            "{:?} kept open",
            String::from_utf8_lossy(line)
        );
    }
    assert!(h.take_received().is_empty(), "the guest heard nothing");
    assert_eq!(h.connections(), 0);
}

#[test]
fn test_silent_host_is_dropped_after_the_request_timeout() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::with_limits(&mem, dir.path(), 0, |l| {
        l.request_timeout = Duration::from_millis(100);
    });
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONN").unwrap();
    h.pump_for(Duration::from_millis(250));
    assert!(h.host_sees_eof(&mut host));
}

// ---- guest-initiated -------------------------------------------------------------------------

#[test]
fn test_guest_connect_reaches_port_listener_and_data_flows_both_ways() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    let mut srv = h.guest_connection(&listener, 5000, 1234);

    h.send(pkt(OP_RW, 5000, 1234), b"hello host");
    assert_eq!(h.host_read(&mut srv, 10), b"hello host");
    srv.write_all(b"hello guest").unwrap();
    let (rw, data) = h.wait_packet(OP_RW);
    assert_eq!(
        (rw.src_port, rw.dst_port, rw.dst_cid),
        (1234, 5000, GUEST_CID)
    );
    assert_eq!(data, b"hello guest");
    assert_eq!(rw.fwd_cnt, 10, "we report what reached the host");
}

#[test]
fn test_guest_connect_without_listener_gets_rst() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    h.send(pkt(OP_REQUEST, 5000, 777), &[]);
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (777, 5000));
    assert_eq!(h.connections(), 0);
}

#[test]
fn test_connection_limit_refuses_with_rst() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::with_limits(&mem, dir.path(), 0, |l| l.max_connections = 2);
    let listener = h.listen(1234);
    let _a = h.guest_connection(&listener, 1, 1234);
    let _b = h.guest_connection(&listener, 2, 1234);
    h.send(pkt(OP_REQUEST, 3, 1234), &[]);
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!(rst.dst_port, 3);
    assert_eq!(h.connections(), 2);
    // A host connection is refused at accept: closed without a word.
    let mut host = UnixStream::connect(&h.uds).unwrap();
    let _ = host.write_all(b"CONNECT 52\n");
    assert!(h.host_sees_eof(&mut host));
}

// ---- protocol edges --------------------------------------------------------------------------

#[test]
fn test_unknown_connection_and_non_stream_get_rst_but_rst_gets_nothing() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    h.send(pkt(OP_RW, 10, 20), b"data");
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (20, 10));
    let mut dgram = pkt(OP_REQUEST, 11, 21);
    dgram.type_ = 2;
    h.send(dgram, &[]);
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!(rst.dst_port, 11);
    h.send(pkt(OP_RST, 12, 22), &[]);
    let mut wrong_cid = pkt(OP_REQUEST, 13, 23);
    wrong_cid.src_cid = 99;
    h.send(wrong_cid, &[]);
    h.pump();
    assert!(h.take_received().is_empty());
}

#[test]
fn test_no_rx_buffers_means_no_polling_until_buffers_arrive() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    let mut srv = h.guest_connection(&listener, 5000, 1234);
    // The guest stops posting RX buffers; the host sends more than the posted ones hold.
    h.refill_rx = false;
    h.pump();
    let posted = usize::from(QSIZE) - h.rx.free_count();
    let payload = usize::try_from(RX_BUF).unwrap() - HEADER_SIZE;
    let total = posted * payload + 1000;
    srv.write_all(&vec![1u8; total]).unwrap();
    h.pump();
    assert_eq!(h.rx.free_count(), usize::from(QSIZE), "every buffer filled");
    // With data waiting and no buffers, the host stream must not wake the loop again and
    // again.
    let mut wakeups = 0;
    for _ in 0..5 {
        wakeups += h.mgr.run_with_timeout(20).unwrap();
    }
    assert_eq!(
        wakeups, 0,
        "the event loop spins while the guest has no buffers"
    );
    // Buffers come back: the rest flows.
    h.refill_rx = true;
    h.post_rx(4);
    h.pump();
    let got: usize = h
        .take_received()
        .iter()
        .filter(|(p, _)| p.op == OP_RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(got, total);
}

// ---- credit ----------------------------------------------------------------------------------

#[test]
fn test_guest_with_small_buf_alloc_is_not_overrun() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    let mut request = pkt(OP_REQUEST, 5000, 1234);
    request.buf_alloc = 100;
    h.send(request, &[]);
    h.wait_packet(OP_RESPONSE);
    let (mut srv, _) = listener.accept().unwrap();
    srv.write_all(&[7u8; 1000]).unwrap();
    h.pump();
    let rw_bytes = |h: &mut Harness| -> usize {
        h.take_received()
            .iter()
            .filter(|(p, _)| p.op == OP_RW)
            .map(|(_, d)| d.len())
            .sum()
    };
    assert_eq!(rw_bytes(&mut h), 100);
    // The guest's reader took 60 bytes: 60 more may come.
    let mut update = pkt(OP_CREDIT_UPDATE, 5000, 1234);
    update.buf_alloc = 100;
    update.fwd_cnt = 60;
    h.send(update, &[]);
    assert_eq!(rw_bytes(&mut h), 60);
    // A bigger buffer: everything else.
    update.buf_alloc = 4096;
    h.send(update, &[]);
    assert_eq!(rw_bytes(&mut h), 840);
}

#[test]
fn test_credit_request_is_answered_and_low_credit_triggers_an_update() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    let mut srv = h.guest_connection(&listener, 5000, 1234);
    h.send(pkt(OP_RW, 5000, 1234), &[1u8; 1000]);
    h.send(pkt(OP_CREDIT_REQUEST, 5000, 1234), &[]);
    let (update, _) = h.wait_packet(OP_CREDIT_UPDATE);
    assert_eq!((update.buf_alloc, update.fwd_cnt), (CONN_TX_BUF_SIZE, 1000));
    assert_eq!(h.host_read(&mut srv, 1000).len(), 1000);
    // 62 KiB more: the guest now believes less than 4 KiB is free, so we tell it.
    h.send(pkt(OP_RW, 5000, 1234), &vec![2u8; 62 * 1024]);
    assert_eq!(h.host_read(&mut srv, 62 * 1024).len(), 62 * 1024);
    h.pump();
    let (update, _) = h.wait_packet(OP_CREDIT_UPDATE);
    assert_eq!(update.fwd_cnt, 1000 + 62 * 1024);
}

#[test]
fn test_guest_overrunning_credit_is_reset() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    // The host never reads.
    let _srv = h.guest_connection(&listener, 5000, 1234);
    let chunk = vec![3u8; 64 * 1024];
    let mut sent = 0;
    while h.connections() == 1 && sent < 64 {
        h.send(pkt(OP_RW, 5000, 1234), &chunk);
        sent += 1;
    }
    assert_eq!(h.connections(), 0, "still open after {sent} packets");
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!(rst.dst_port, 5000);
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
}

#[test]
fn test_slow_host_reader_gets_everything_in_order_under_credit() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    let mut srv = h.guest_connection(&listener, 5000, 1234);
    srv.set_nonblocking(true).unwrap();
    let data = pattern(600 * 1024);
    let mut sent = 0usize;
    let mut fwd_seen = 0usize;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    let end = Instant::now() + Duration::from_secs(20);
    while got.len() < data.len() {
        assert!(
            Instant::now() < end,
            "stalled: sent {sent}, host got {}",
            got.len()
        );
        // The guest sends as far as the credit it was told about allows.
        let credit = 65536 - (sent - fwd_seen);
        if sent < data.len() && credit > 0 {
            let n = credit.min(16 * 1024).min(data.len() - sent);
            h.send(pkt(OP_RW, 5000, 1234), &data[sent..sent + n]);
            sent += n;
        }
        for (p, _) in h.take_received() {
            assert_ne!(p.op, OP_RST, "a guest within its credit was reset");
            fwd_seen = fwd_seen.max(usize::try_from(p.fwd_cnt).unwrap());
        }
        // The host reads only when the guest is stuck, and little at a time.
        if credit == 0 || sent == data.len() {
            match srv.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            h.pump_once();
        }
    }
    assert!(got == data, "bytes lost or reordered");
    assert_eq!(h.connections(), 1);
}

#[test]
fn test_bulk_host_to_guest_follows_guest_credit() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    let mut request = pkt(OP_REQUEST, 5000, 1234);
    request.buf_alloc = 32 * 1024;
    h.send(request, &[]);
    h.wait_packet(OP_RESPONSE);
    let (mut srv, _) = listener.accept().unwrap();
    srv.set_nonblocking(true).unwrap();
    let data = pattern(300 * 1024);
    let mut written = 0usize;
    let mut got = Vec::new();
    let mut consumed_reported = 0usize;
    let end = Instant::now() + Duration::from_secs(20);
    while got.len() < data.len() {
        assert!(Instant::now() < end, "stalled at {} bytes", got.len());
        if written < data.len() {
            match srv.write(&data[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        h.pump_once();
        for (p, d) in h.take_received() {
            if p.op == OP_RW {
                got.extend_from_slice(&d);
                assert!(
                    got.len() - consumed_reported <= 32 * 1024,
                    "the device sent past the guest's buffer"
                );
            }
        }
        // The guest's reader keeps up, and says so every 8 KiB.
        if got.len() - consumed_reported >= 8 * 1024 {
            consumed_reported = got.len();
            let mut update = pkt(OP_CREDIT_UPDATE, 5000, 1234);
            update.buf_alloc = 32 * 1024;
            update.fwd_cnt = u32::try_from(consumed_reported).unwrap();
            h.send(update, &[]);
        }
    }
    assert!(got == data, "bytes lost or reordered");
}

// ---- shutdown --------------------------------------------------------------------------------

#[test]
fn test_guest_shutdown_both_ways_gets_rst_and_frees_the_connection() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let listener = h.listen(1234);
    let mut srv = h.guest_connection(&listener, 5000, 1234);
    h.send(pkt(OP_RW, 5000, 1234), b"last words");
    let mut shut = pkt(OP_SHUTDOWN, 5000, 1234);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    // Half-closed: the host reads the data, then EOF, and the connection lives on.
    assert_eq!(h.host_read(&mut srv, 10), b"last words");
    assert!(h.host_sees_eof(&mut srv));
    assert_eq!(h.connections(), 1);
    shut.flags = SHUTDOWN_RCV;
    h.send(shut, &[]);
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!(rst.dst_port, 5000);
    assert_eq!(h.connections(), 0);
}

#[test]
fn test_host_close_sends_shutdown_and_guest_rst_frees_the_connection() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let (mut host, port) = h.host_connection(52);
    host.write_all(b"bye").unwrap();
    drop(host);
    let (rw, data) = h.wait_packet(OP_RW);
    assert_eq!((rw.src_port, data.as_slice()), (port, &b"bye"[..]));
    let (shut, _) = h.wait_packet(OP_SHUTDOWN);
    assert_eq!(shut.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(h.connections(), 1);
    h.send(pkt(OP_RST, 52, port), &[]);
    assert_eq!(h.connections(), 0);
    assert!(
        h.take_received().iter().all(|(p, _)| p.op != OP_RST),
        "no RST in answer to an RST"
    );
}

#[test]
fn test_shutdown_without_answer_is_reset_after_the_timeout() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::with_limits(&mem, dir.path(), 0, |l| {
        l.shutdown_timeout = Duration::from_millis(100);
    });
    let (host, port) = h.host_connection(52);
    drop(host);
    h.wait_packet(OP_SHUTDOWN);
    h.pump_for(Duration::from_millis(250));
    let (rst, _) = h.wait_packet(OP_RST);
    assert_eq!(rst.src_port, port);
    assert_eq!(h.connections(), 0);
}

// ---- event queue, interrupts, reset ----------------------------------------------------------

#[test]
fn test_transport_reset_event_and_connections_closed() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let (mut host, _) = h.host_connection(52);
    h.ev.post(&[Seg::Write(8)]);
    h.drain_irq();
    h.dev.lock().unwrap().send_transport_reset();
    let used = h.ev.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 4);
    assert_eq!(used[0].0, EVENT_TRANSPORT_RESET.to_le_bytes());
    assert!(h.drain_irq() > 0, "the guest is interrupted");
    assert!(h.host_sees_eof(&mut host));
    assert_eq!(h.connections(), 0);
    // Still serving new connections afterwards.
    let (_host, port) = h.host_connection(52);
    assert_eq!(port, FIRST_PORT + 1);
}

#[test]
fn test_one_interrupt_per_batch() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    h.drain_irq();
    for port in 0..5 {
        let mut header = pkt(OP_RW, 100 + port, 200);
        header.len = 1;
        h.tx.post(&[Seg::Read(header.to_bytes().to_vec()), Seg::Read(vec![0])]);
    }
    h.kick(1);
    h.pump();
    assert_eq!(h.take_received().len(), 5, "five RSTs");
    assert_eq!(h.drain_irq(), 1);
}

#[test]
fn test_event_idx_interrupts_only_when_the_driver_asks() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), VIRTIO_RING_F_EVENT_IDX);
    h.tx.set_used_event(0x7000);
    h.rx.set_used_event(0x7000);
    h.drain_irq();
    h.send(pkt(OP_RW, 1, 2), b"x");
    assert_eq!(h.take_received().len(), 1);
    assert_eq!(h.drain_irq(), 0, "interrupt the driver did not ask for");
    // Now ask for one on the next RX buffer used.
    h.rx.set_used_event(h.rx.used_idx());
    h.send(pkt(OP_RW, 1, 2), b"x");
    assert_eq!(h.take_received().len(), 1);
    assert_eq!(h.drain_irq(), 1);
}

#[test]
fn test_device_reset_drops_connections_and_stops_serving() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    let (mut host, _) = h.host_connection(52);
    h.dev.lock().unwrap().reset();
    assert!(!h.dev.lock().unwrap().is_activated());
    assert!(h.host_sees_eof(&mut host));
    assert_eq!(h.connections(), 0);
    // Host connections wait in the backlog until the driver is back.
    let mut waiting = UnixStream::connect(&h.uds).unwrap();
    waiting.write_all(b"CONNECT 52\n").unwrap();
    h.pump();
    assert!(h.take_received().is_empty());
    drop(waiting);
}

#[test]
fn test_inconsistent_avail_index_does_not_hang_the_loop() {
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    // The driver claims 1000 new TX chains in a ring of 16.
    let idx = h.tx.avail.idx().load();
    h.tx.avail.idx().store(idx.wrapping_add(1000));
    h.kick(1);
    h.pump();
    // RX and the host side still work.
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = h.wait_packet(OP_REQUEST);
    assert_eq!(req.dst_port, 52);
}

// ---- guest packets at random ------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Layout {
    Split,
    Single,
    Scattered,
    WritableHeader,
    Truncated(usize),
    BadAddress(u64),
}

#[derive(Clone, Debug)]
struct RandomPacket {
    header: PacketHeader,
    data: Vec<u8>,
    layout: Layout,
}

fn random_packet() -> impl Strategy<Value = RandomPacket> {
    let cid = prop_oneof![
        Just(GUEST_CID),
        Just(GUEST_CID),
        Just(HOST_CID),
        any::<u64>()
    ];
    let dst_cid = prop_oneof![
        Just(HOST_CID),
        Just(HOST_CID),
        Just(GUEST_CID),
        any::<u64>()
    ];
    let port = prop_oneof![
        Just(52u32),
        Just(5000),
        Just(FIRST_PORT),
        Just(1234),
        any::<u32>()
    ];
    let layout = prop_oneof![
        Just(Layout::Split),
        Just(Layout::Single),
        Just(Layout::Scattered),
        Just(Layout::WritableHeader),
        (0usize..HEADER_SIZE).prop_map(Layout::Truncated),
        any::<u64>().prop_map(Layout::BadAddress),
    ];
    let len = prop_oneof![
        Just(None),
        Just(Some(u32::MAX)),
        (0u32..70_000).prop_map(Some)
    ];
    (
        (cid, dst_cid, port.clone(), port),
        (
            0u16..10,
            prop_oneof![Just(TYPE_STREAM), any::<u16>()],
            any::<u32>(),
        ),
        (any::<u32>(), any::<u32>(), len),
        proptest::collection::vec(any::<u8>(), 0..300),
        layout,
    )
        .prop_map(
            |(
                (src_cid, dst_cid, src_port, dst_port),
                (op, type_, flags),
                (buf_alloc, fwd_cnt, len),
                data,
                layout,
            )| {
                let header = PacketHeader {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len: len.unwrap_or(u32::try_from(data.len()).unwrap()),
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                RandomPacket {
                    header,
                    data,
                    layout,
                }
            },
        )
}

fn segs_for(p: &RandomPacket) -> Vec<Seg> {
    let raw = p.header.to_bytes().to_vec();
    let mut segs = match &p.layout {
        Layout::Split => vec![Seg::Read(raw)],
        Layout::Single => {
            let mut all = raw;
            all.extend_from_slice(&p.data);
            return vec![Seg::Read(all)];
        }
        Layout::Scattered => vec![Seg::Read(raw[..7].to_vec()), Seg::Read(raw[7..].to_vec())],
        Layout::WritableHeader => vec![Seg::Write(64)],
        Layout::Truncated(n) => vec![Seg::Read(raw[..*n].to_vec())],
        Layout::BadAddress(addr) => vec![Seg::Raw {
            addr: *addr,
            len: 64,
            flags: 0,
        }],
    };
    if !p.data.is_empty() {
        segs.push(Seg::Read(p.data.clone()));
    }
    segs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the guest puts in its TX queue, the device does not panic, and afterwards a
    /// fresh connection still works both ways.
    #[test]
    fn prop_random_guest_tx_leaves_the_device_working(
        packets in proptest::collection::vec(random_packet(), 1..24),
    ) {
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(&mem, dir.path(), 0);
        let _listener = h.listen(1234);
        // A live host-initiated connection for the random packets to hit.
        let mut host = UnixStream::connect(&h.uds).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        h.wait_packet(OP_REQUEST);
        for p in &packets {
            h.send_segs(&segs_for(p));
            h.pump_once();
        }
        h.pump();
        drop(host);
        h.pump();

        let listener = h.listen(4321);
        h.take_received();
        let mut srv = h.guest_connection(&listener, 60_000, 4321);
        h.send(pkt(OP_RW, 60_000, 4321), b"still");
        prop_assert_eq!(h.host_read(&mut srv, 5), b"still".to_vec());
        srv.write_all(b"works").unwrap();
        let end = Instant::now() + Duration::from_secs(3);
        let data = loop {
            if let Some(pos) = h
                .received
                .iter()
                .position(|(p, _)| p.op == OP_RW && p.dst_port == 60_000)
            {
                break h.received.remove(pos).unwrap().1;
            }
            prop_assert!(Instant::now() < end);
            h.pump_once();
        };
        prop_assert_eq!(data, b"works".to_vec());
    }
}

// ---- snapshots ---------------------------------------------------------------------------------

#[test]
fn test_rx_packet_written_to_guest_memory_marks_the_page_dirty() {
    use crate::virtio::persist::testing::{clear_dirty, is_dirty};
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), 0);
    // The eight RX buffers the harness posted lie in slots 0..8 of the RX buffer area, and the
    // device fills slot 0 first.
    clear_dirty(&mem);
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    h.refill_rx = false;
    let (req, _) = h.wait_packet(OP_REQUEST);
    assert_eq!(req.dst_port, 52);
    assert!(
        is_dirty(&mem, 0x10_0000),
        "the packet written into the RX buffer is not tracked"
    );
    assert!(
        !is_dirty(&mem, 0x10_0000 + 7 * SLOT),
        "an RX buffer nobody wrote is clean"
    );
}

#[test]
fn test_snapshot_restore_resets_connections_and_serves_on_the_new_socket() {
    use crate::virtio::persist::testing::copy_guest_memory;
    use crate::virtio::persist::{DeviceKindState, VirtioDeviceState};

    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&mem, dir.path(), VIRTIO_RING_F_EVENT_IDX);
    let (mut old_host, _) = h.host_connection(52);
    // The guest driver keeps event buffers posted.
    h.ev.post(&[Seg::Write(8)]);
    h.kick(2);
    h.pump();
    let json = serde_json::to_string(&h.dev.lock().unwrap().save_state()).unwrap();
    let state: VirtioDeviceState = serde_json::from_str(&json).unwrap();
    assert!(state.activated);
    assert_eq!(state.kind, DeviceKindState::Vsock {});
    assert_eq!(state.queues.len(), 3);
    assert_eq!(h.ev.used_idx(), 0, "saving sends nothing to the guest");
    assert_eq!(
        h.connections(),
        1,
        "saving keeps the running VM's connections"
    );

    // The restored VM: copied memory, a new socket path from the load request.
    let copy = test_mem();
    let queues = [
        h.rx.moved_to(&copy),
        h.tx.moved_to(&copy),
        h.ev.moved_to(&copy),
    ];
    copy_guest_memory(&mem, &copy);
    let uds = dir.path().join("restored.sock");
    let dev = Vsock::new(&config(&uds, 3)).unwrap();
    let mut r = Harness::assemble(uds, dev, queues);
    r.dev
        .lock()
        .unwrap()
        .restore_state(&state, copy.clone(), r.interrupt.clone())
        .unwrap();
    assert!(r.dev.lock().unwrap().is_activated());

    // The guest learns at once that every connection is gone.
    let events = r.ev.take_used();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, EVENT_TRANSPORT_RESET.to_le_bytes());
    assert_eq!(events[0].1, 4);
    assert!(r.drain_irq() > 0, "the guest is interrupted for it");
    assert_eq!(h.ev.used_idx(), 0, "the old memory is not touched");

    // Host processes connect again on the new path; the RX buffers the guest posted before
    // the snapshot carry the request.
    let (mut host, port) = r.host_connection(52);
    assert_eq!(port, FIRST_PORT);
    r.send(pkt(OP_RW, 52, port), b"restored");
    assert_eq!(r.host_read(&mut host, 8), b"restored");
    host.write_all(b"back").unwrap();
    let (_, data) = r.wait_packet(OP_RW);
    assert_eq!(data, b"back");

    // The running VM's connection was not touched by the save.
    h.send(pkt(OP_RW, 52, FIRST_PORT), b"still here");
    assert_eq!(h.host_read(&mut old_host, 10), b"still here");
}

#[test]
fn test_restore_inactive_device_sends_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(&config(&dir.path().join("a.sock"), 3)).unwrap();
    let state = dev.save_state();
    assert!(!state.activated);
    let mem = test_mem();
    let mut restored = Vsock::new(&config(&dir.path().join("b.sock"), 3)).unwrap();
    let interrupt = Arc::new(Interrupt::new().unwrap());
    restored
        .restore_state(&state, mem, interrupt.clone())
        .unwrap();
    assert!(!restored.is_activated());
    assert!(interrupt.irqfd().read().is_err());
}
