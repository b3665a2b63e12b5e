//! The device against a real tap in a private network namespace, with `MockSplitQueue` playing
//! the guest driver and host sockets playing the network.
//!
//! Layout of the test guest's memory: RX rings at 0, TX rings at 64 KiB, RX buffers from 1 MiB,
//! TX frames from 8 MiB.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::tap::tests::{in_netns, ip};
use super::*;
use crate::api::models::NetworkInterface;
use crate::memory::GuestMemory;
use crate::virtio::persist::VirtioDeviceState;
use crate::virtio::persist::testing::{clear_dirty, copy_guest_memory, is_dirty};
use crate::virtio::{
    ActivateError, Activation, INTERRUPT_USED_RING, Interrupt, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};

const TAP: &str = "wtap0";
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const GUEST_MAC_TEXT: &str = "06:00:AC:10:00:02";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const RX_BUFFERS: u64 = 0x10_0000;
const TX_FRAMES: u64 = 0x80_0000;
const MEM_SIZE: usize = 16 << 20;

fn bit(n: u32) -> u64 {
    1 << n
}

fn interface(mac: Option<&str>, mtu: Option<u16>) -> NetworkInterface {
    NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: TAP.into(),
        guest_mac: mac.map(String::from),
        mtu,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }
}

/// Creates the tap the way an operator would: up, 10.0.0.1/24, the guest as a static
/// neighbour (so no ARP), and no IPv6 (so the kernel sends nothing on its own).
fn setup_tap() {
    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").unwrap();
    ip(&["link", "set", "lo", "up"]);
    ip(&["tuntap", "add", TAP, "mode", "tap"]);
    ip(&["link", "set", TAP, "address", "02:00:00:00:00:01"]);
    ip(&["addr", "add", "10.0.0.1/24", "dev", TAP]);
    ip(&["link", "set", TAP, "up"]);
    ip(&[
        "neigh",
        "add",
        "10.0.0.2",
        "lladdr",
        "06:00:ac:10:00:02",
        "dev",
        TAP,
        "nud",
        "permanent",
    ]);
}

/// Attaching to the tap turns its carrier on, but the kernel swaps in a real qdisc only when
/// its link watcher runs (up to a second later); frames sent before that are dropped.
fn wait_for_carrier() {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = std::process::Command::new("ip")
            .args(["-o", "link", "show", TAP])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("LOWER_UP") && !text.contains("qdisc noop") {
            return;
        }
        assert!(Instant::now() < deadline, "tap never came up: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn guest_memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The driver side of one queue.
struct Driver<'m> {
    mem: &'m GuestMemory,
    vq: MockSplitQueue<'m, GuestMemory>,
    next_desc: u16,
    used_seen: u16,
    /// The buffers behind each posted chain head.
    posted: HashMap<u16, Vec<(u64, u32)>>,
}

impl<'m> Driver<'m> {
    fn new(mem: &'m GuestMemory, ring: u64) -> Self {
        Driver {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(ring), QUEUE_SIZE),
            next_desc: 0,
            used_seen: 0,
            posted: HashMap::new(),
        }
    }

    fn queue(&self) -> Queue {
        self.vq.create_queue().unwrap()
    }

    /// The same driver over another guest memory (a restored VM's), with its bookkeeping.
    /// The mock zeroes ring indexes in `mem`: call this before copying the contents over.
    fn moved_to<'n>(&self, mem: &'n GuestMemory) -> Driver<'n> {
        let mut driver = Driver::new(mem, self.vq.desc_table_addr().0);
        driver.next_desc = self.next_desc;
        driver.used_seen = self.used_seen;
        driver.posted = self.posted.clone();
        driver
    }

    /// Posts one chain of `(address, length, device-writable)` buffers; returns its head.
    fn post(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let write = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        let with_flags: Vec<(u64, u32, u16)> = bufs
            .iter()
            .map(|&(addr, len, writable)| (addr, len, if writable { write } else { 0 }))
            .collect();
        self.post_with_flags(&with_flags)
    }

    /// Posts one chain of `(address, length, flags)`; NEXT and `next` are filled in.
    fn post_with_flags(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc % QUEUE_SIZE;
        for (i, &(addr, len, mut flags)) in bufs.iter().enumerate() {
            let index = self.next_desc % QUEUE_SIZE;
            if i + 1 < bufs.len() {
                flags |= u16::try_from(VRING_DESC_F_NEXT).unwrap();
            }
            let next = (index + 1) % QUEUE_SIZE;
            let desc = Descriptor::new(addr, len, flags, next);
            self.vq
                .desc_table()
                .store(index, RawDescriptor::from(desc))
                .unwrap();
            self.next_desc = self.next_desc.wrapping_add(1);
        }
        self.posted.insert(
            head,
            bufs.iter().map(|&(addr, len, _)| (addr, len)).collect(),
        );
        self.publish(head);
        head
    }

    /// Puts `head` in the avail ring.
    fn publish(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Used entries `(head, len)` added since the last call.
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.vq.used().idx().load();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = self
                .vq
                .used()
                .ring()
                .ref_at(usize::from(self.used_seen % QUEUE_SIZE))
                .unwrap()
                .load();
            out.push((elem.id(), elem.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    fn avail_idx(&self) -> u16 {
        self.vq.avail().idx().load()
    }

    /// `used_event` (driver side of EVENT_IDX): interrupt once the used index passes it.
    fn set_used_event(&self, value: u16) {
        let addr = self.vq.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// `avail_event` (device side of EVENT_IDX).
    fn avail_event(&self) -> u16 {
        let addr = self.vq.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn set_avail_flags(&self, flags: u16) {
        self.mem.write_obj(flags, self.vq.avail_addr()).unwrap();
    }

    fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.vq.used_addr()).unwrap()
    }

    /// Reads what the device wrote into a used chain.
    fn read_chain(&self, head: u32, len: u32) -> Vec<u8> {
        let bufs = &self.posted[&u16::try_from(head).unwrap()];
        let mut out = Vec::new();
        let mut left = usize::try_from(len).unwrap();
        for &(addr, buf_len) in bufs {
            let n = left.min(usize::try_from(buf_len).unwrap());
            let mut part = vec![0u8; n];
            self.mem.read_slice(&mut part, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&part);
            left -= n;
        }
        out
    }

    /// Frames the device delivered since the last call, as (vnet header, frame), merging
    /// the chains of each frame as a driver with MRG_RXBUF does.
    fn take_frames(&mut self) -> Vec<([u8; VNET_HDR_LEN], Vec<u8>)> {
        let used = self.take_used();
        let mut frames = Vec::new();
        let mut entries = used.into_iter();
        while let Some((head, len)) = entries.next() {
            let mut bytes = self.read_chain(head, len);
            let num_buffers = u16::from_le_bytes([bytes[10], bytes[11]]);
            for _ in 1..num_buffers {
                let (head, len) = entries
                    .next()
                    .expect("a buffer of a merged frame is missing");
                bytes.extend(self.read_chain(head, len));
            }
            let header: [u8; VNET_HDR_LEN] = bytes[..VNET_HDR_LEN].try_into().unwrap();
            frames.push((header, bytes[VNET_HDR_LEN..].to_vec()));
        }
        frames
    }
}

/// The device on a real event loop, as the VMM runs it.
struct Rig {
    net: Arc<Mutex<Net>>,
    events: EventManager<Arc<Mutex<Net>>>,
    interrupt: Arc<Interrupt>,
}

impl Rig {
    fn new(config: &NetworkInterface) -> Rig {
        let net = Arc::new(Mutex::new(Net::new(config).unwrap()));
        wait_for_carrier();
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(net.clone());
        Rig {
            net,
            events,
            interrupt: Arc::new(Interrupt::new().unwrap()),
        }
    }

    fn net(&self) -> std::sync::MutexGuard<'_, Net> {
        self.net.lock().unwrap()
    }

    fn activate(&self, mem: &GuestMemory, rx: &Driver, tx: &Driver, features: u64) {
        let mut net = self.net();
        net.set_acked_features(features);
        net.activate(Activation {
            mem: mem.clone(),
            queues: vec![rx.queue(), tx.queue()],
            interrupt: self.interrupt.clone(),
        })
        .unwrap();
    }

    /// What the guest's QueueNotify write turns into (KVM's ioeventfd).
    fn notify(&self, queue: usize) {
        self.net().queue_events()[queue].write(1).unwrap();
    }

    fn run(&mut self, timeout_ms: i32) -> usize {
        self.events.run_with_timeout(timeout_ms).unwrap()
    }

    /// Runs the loop until `done` holds, for at most two seconds.
    fn run_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            self.run(10);
        }
        done(self)
    }

    /// Interrupts raised since the last call.
    fn take_interrupts(&self) -> u64 {
        self.interrupt.irqfd().read().unwrap_or(0)
    }

    fn metrics(&self) -> NetMetrics {
        self.net().metrics()
    }
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum + u32::from(proto) + u32::try_from(len).unwrap()
}

fn ethernet(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap();
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let sum = checksum(&packet, 0);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// A guest UDP frame without a UDP checksum (allowed over IPv4).
fn guest_udp_frame(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&4000u16.to_be_bytes());
    udp.extend_from_slice(&dst_port.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ethernet(HOST_MAC, GUEST_MAC, &ipv4(GUEST_IP, HOST_IP, 17, &udp))
}

/// Writes `header + frame` at `addr` and returns its length.
fn write_tx(mem: &GuestMemory, addr: u64, header: &[u8; VNET_HDR_LEN], frame: &[u8]) -> u32 {
    mem.write_slice(header, GuestAddress(addr)).unwrap();
    mem.write_slice(frame, GuestAddress(addr + 12)).unwrap();
    u32::try_from(VNET_HDR_LEN + frame.len()).unwrap()
}

fn host_udp_socket() -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 5000)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket
}

/// The UDP payload of an IPv4 frame the host sent to the guest.
fn udp_payload(frame: &[u8]) -> &[u8] {
    assert_eq!(&frame[12..14], &[0x08, 0x00], "not IPv4");
    assert_eq!(frame[14 + 9], 17, "not UDP");
    &frame[14 + 20 + 8..]
}

const NO_OFFLOADS: u64 = VIRTIO_F_VERSION_1;

#[test]
fn test_parse_mac_accepts_both_cases_and_refuses_junk() {
    assert_eq!(parse_mac(GUEST_MAC_TEXT).unwrap(), GUEST_MAC);
    assert_eq!(parse_mac("06:00:ac:10:00:02").unwrap(), GUEST_MAC);
    for bad in [
        "",
        "06:00:AC:10:00",
        "06:00:AC:10:00:02:03",
        "06-00-AC-10-00-02",
        "6:00:AC:10:00:02",
        "06:00:AC:10:00:0G",
        "+6:00:AC:10:00:02",
        "01:00:5E:00:00:01",
        "00:00:00:00:00:00",
    ] {
        let err = parse_mac(bad).unwrap_err();
        assert!(matches!(err, NetError::InvalidMac { .. }), "{bad:?}");
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
}

#[test]
fn test_new_refuses_bad_mac_and_mtu_before_touching_the_tap() {
    // No namespace and no tap needed: configuration errors come first.
    let err = Net::new(&interface(Some("not-a-mac"), None)).unwrap_err();
    assert!(matches!(err, NetError::InvalidMac { .. }));
    let err = Net::new(&interface(None, Some(67))).unwrap_err();
    assert!(matches!(err, NetError::InvalidMtu { mtu: 67 }));
}

#[test]
fn test_new_missing_tap_error_names_the_tap() {
    in_netns(|| {
        let err = Net::new(&interface(None, None)).unwrap_err();
        assert!(
            matches!(err, NetError::Tap(TapError::Missing { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains(TAP), "{err}");
    });
}

#[test]
fn test_new_busy_tap_error_carries_the_os_error() {
    in_netns(|| {
        setup_tap();
        let _first = Net::new(&interface(None, None)).unwrap();
        // A single-queue tap takes one user at a time.
        let err = Net::new(&interface(None, None)).unwrap_err();
        assert!(err.to_string().contains(TAP), "{err}");
        let source = std::error::Error::source(&err).expect("the OS error");
        let os = source.downcast_ref::<io::Error>().expect("an io::Error");
        assert_eq!(os.raw_os_error(), Some(libc::EBUSY));
    });
}

#[test]
fn test_features_and_config_space_follow_the_configuration() {
    in_netns(|| {
        setup_tap();
        let plain = Net::new(&interface(None, None)).unwrap();
        assert_eq!(plain.device_type(), TYPE_NET);
        assert_eq!(plain.queue_max_sizes(), &[256, 256]);
        assert_eq!(plain.queue_events().len(), 2);
        assert_eq!(plain.id(), "eth0");
        let features = plain.avail_features();
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        assert_ne!(features & bit(VIRTIO_NET_F_STATUS), 0);
        assert_ne!(features & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
        assert_ne!(features & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(features & bit(VIRTIO_NET_F_MAC), 0);
        assert_eq!(features & bit(VIRTIO_NET_F_MTU), 0);
        let mut status = [0u8; 2];
        plain.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 1, "link up");
        drop(plain);

        let mut net = Net::new(&interface(Some(GUEST_MAC_TEXT), Some(1400))).unwrap();
        assert_ne!(net.avail_features() & bit(VIRTIO_NET_F_MAC), 0);
        assert_ne!(net.avail_features() & bit(VIRTIO_NET_F_MTU), 0);
        let mut config = [0u8; 12];
        net.read_config(0, &mut config);
        assert_eq!(&config[..6], &GUEST_MAC);
        assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);
        // Reads past the end are zero; writes change nothing.
        let mut tail = [0xffu8; 8];
        net.read_config(8, &mut tail);
        assert_eq!(&tail[..4], &[1, 0, 0x78, 0x05]);
        assert_eq!(&tail[4..], &[0; 4]);
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        net.write_config(0, &[0; 6]);
        net.read_config(0, &mut config);
        assert_eq!(&config[..6], &GUEST_MAC);
        // The driver cannot ack what was not offered.
        net.set_acked_features(u64::MAX);
        assert_eq!(net.acked_features(), net.avail_features());
    });
}

#[test]
fn test_activate_refuses_wrong_queue_count_and_unready_queues() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut net = Net::new(&interface(None, None)).unwrap();
        let interrupt = Arc::new(Interrupt::new().unwrap());
        let err = net
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![rx.queue()],
                interrupt: interrupt.clone(),
            })
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { want: 2, got: 1 }));
        let mut unready = tx.queue();
        unready.set_ready(false);
        let err = net
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![rx.queue(), unready],
                interrupt: interrupt.clone(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("TX"), "{err}");
        assert!(!net.is_activated());
        net.activate(Activation {
            mem: mem.clone(),
            queues: vec![rx.queue(), tx.queue()],
            interrupt,
        })
        .unwrap();
        assert!(net.is_activated());
    });
}

#[test]
fn test_tx_frame_reaches_host_udp_socket() {
    in_netns(|| {
        setup_tap();
        let socket = host_udp_socket();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        rx.post(&[(RX_BUFFERS, 2048, true)]);

        let frame = guest_udp_frame(5000, b"hello from the guest");
        write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
        // Header and frame in separate descriptors, the frame itself split in two.
        let head = tx.post(&[
            (TX_FRAMES, 12, false),
            (TX_FRAMES + 12, 20, false),
            (
                TX_FRAMES + 32,
                u32::try_from(frame.len() - 20).unwrap(),
                false,
            ),
        ]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == 1));

        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello from the guest");
        assert_eq!(from, SocketAddrV4::new(GUEST_IP, 4000).into());
        assert_eq!(tx.take_used(), vec![(u32::from(head), 0)]);
        assert!(rig.take_interrupts() >= 1);
        assert_ne!(rig.interrupt.status() & INTERRUPT_USED_RING, 0);
        let metrics = rig.metrics();
        assert_eq!(metrics.tx_packets, 1);
        assert_eq!(metrics.tx_bytes, u64::try_from(frame.len()).unwrap());
        assert_eq!(metrics.tx_dropped, 0);
    });
}

#[test]
fn test_rx_frame_from_host_lands_in_guest_buffer_with_header() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        // The header straddles two descriptors.
        let head = rx.post(&[(RX_BUFFERS, 10, true), (RX_BUFFERS + 0x1000, 2000, true)]);
        rig.run(0);

        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(b"hello from the host", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|_| rx.used_idx() == 1));

        let used = rx.take_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        let bytes = rx.read_chain(used[0].0, used[0].1);
        let (header, frame) = bytes.split_at(VNET_HDR_LEN);
        assert_eq!(
            header,
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            "flags 0, no GSO, 1 buffer"
        );
        assert_eq!(&frame[..6], &GUEST_MAC);
        assert_eq!(&frame[6..12], &HOST_MAC);
        assert_eq!(udp_payload(frame), b"hello from the host");
        assert_eq!(used[0].1, u32::try_from(bytes.len()).unwrap());
        assert!(rig.take_interrupts() >= 1);
        let metrics = rig.metrics();
        assert_eq!(metrics.rx_packets, 1);
        assert_eq!(metrics.rx_bytes, u64::try_from(frame.len()).unwrap());
    });
}

#[test]
fn test_rx_with_guest_csum_passes_partial_checksum_through() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(
            &mem,
            &rx,
            &tx,
            NO_OFFLOADS | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_CSUM),
        );
        rx.post(&[(RX_BUFFERS, 2048, true)]);
        rig.run(0);

        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(b"checksum me later", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|_| rx.used_idx() == 1));
        let frames = rx.take_frames();
        let (header, frame) = &frames[0];
        // The host stack left the UDP checksum to the guest (TUNSETOFFLOAD took effect).
        assert_eq!(header[0], 1, "NEEDS_CSUM");
        assert_eq!(u16::from_le_bytes([header[6], header[7]]), 34, "csum_start");
        assert_eq!(u16::from_le_bytes([header[8], header[9]]), 6, "csum_offset");
        assert_eq!(udp_payload(frame), b"checksum me later");
    });
}

#[test]
fn test_rx_mergeable_frame_spans_several_chains() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS | bit(VIRTIO_NET_F_MRG_RXBUF));
        let heads: Vec<u16> = (0..4)
            .map(|i| rx.post(&[(RX_BUFFERS + i * 0x1000, 512, true)]))
            .collect();
        rig.run(0);

        let payload: Vec<u8> = (0..1000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(&payload, SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|_| rx.used_idx() == 3));

        // 12 + 14 + 20 + 8 + 1000 = 1054 bytes: 512 + 512 + 30, published together.
        let used = rx.take_used();
        let expected: Vec<(u32, u32)> = vec![
            (u32::from(heads[0]), 512),
            (u32::from(heads[1]), 512),
            (u32::from(heads[2]), 30),
        ];
        assert_eq!(used, expected);
        rx.used_seen = 0;
        let frames = rx.take_frames();
        assert_eq!(frames.len(), 1);
        let (header, frame) = &frames[0];
        assert_eq!(
            u16::from_le_bytes([header[10], header[11]]),
            3,
            "num_buffers"
        );
        assert_eq!(udp_payload(frame), &payload[..]);
        assert_eq!(rig.metrics().rx_packets, 1);
    });
}

#[test]
fn test_rx_without_buffers_stops_polling_tap_until_guest_posts() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS | VIRTIO_RING_F_EVENT_IDX);
        // The activation event: no RX buffers, so the tap is not polled.
        assert_eq!(rig.run(100), 1);
        assert!(!rig.net().tap_polled);
        // The device asked to hear about the next buffer.
        assert_eq!(rx.avail_event(), 0);

        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(b"waiting", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        // A readable tap with nowhere to put frames must not wake the loop.
        assert_eq!(rig.run(200), 0);
        assert_eq!(rx.used_idx(), 0);

        rx.post(&[(RX_BUFFERS, 2048, true)]);
        rig.notify(RX_INDEX);
        assert!(rig.run_until(|_| rx.used_idx() == 1));
        let frames = rx.take_frames();
        assert_eq!(udp_payload(&frames[0].1), b"waiting");
        // The only buffer is used: the device stalls again, asks to hear about the next
        // buffer, and the loop goes quiet once more.
        assert!(!rig.net().tap_polled);
        assert_eq!(rig.metrics().rx_stalls, 1);
        assert_eq!(rx.avail_event(), 1);
        assert_eq!(rig.run(100), 0);
    });
}

#[test]
fn test_rx_frame_larger_than_buffer_is_dropped_and_buffer_reused() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        rx.post(&[(RX_BUFFERS, 200, true)]);
        rig.run(0);

        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(&[7u8; 500], SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|rig| rig.metrics().rx_dropped == 1));
        assert_eq!(rx.used_idx(), 0);

        host.send_to(b"small", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|_| rx.used_idx() == 1));
        let frames = rx.take_frames();
        assert_eq!(udp_payload(&frames[0].1), b"small");
        assert_eq!(rig.metrics().rx_packets, 1);
    });
}

#[test]
fn test_rx_malformed_chain_is_returned_and_next_one_used() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        let readable = rx.post(&[(RX_BUFFERS, 2048, false)]);
        let tiny = rx.post(&[(RX_BUFFERS + 0x1000, 8, true)]);
        let outside = rx.post(&[(u64::MAX - 100, 2048, true)]);
        let good = rx.post(&[(RX_BUFFERS + 0x2000, 2048, true)]);
        rig.run(0);
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(b"past the bad ones", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|_| rx.used_idx() == 4));
        let used = rx.take_used();
        assert_eq!(
            &used[..3],
            &[
                (u32::from(readable), 0),
                (u32::from(tiny), 0),
                (u32::from(outside), 0)
            ]
        );
        assert_eq!(used[3].0, u32::from(good));
        assert_eq!(rig.metrics().rx_bad_buffers, 3);
        assert_eq!(rig.metrics().rx_packets, 1);
    });
}

#[test]
fn test_tx_malformed_chains_are_dropped_and_device_carries_on() {
    in_netns(|| {
        setup_tap();
        let socket = host_udp_socket();
        let mem = guest_memory();
        let rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);

        let frame = guest_udp_frame(5000, b"still alive");
        let len = write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
        tx.post(&[(TX_FRAMES, len, true)]); // device-writable
        tx.post(&[(TX_FRAMES, 20, false)]); // shorter than the headers
        tx.post(&[(TX_FRAMES, 40_000, false), (TX_FRAMES, 40_000, false)]); // > 64 KiB
        tx.post(&[(u64::MAX - 10, 100, false)]); // outside guest memory
        tx.post(&[(TX_FRAMES, 12, false), (0x7fff_0000_0000, 50, false)]); // partly outside
        let good = tx.post(&[(TX_FRAMES, len, false)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == 6));

        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still alive");
        let used = tx.take_used();
        assert_eq!(used.last(), Some(&(u32::from(good), 0)));
        let metrics = rig.metrics();
        assert_eq!(metrics.tx_bad_chains, 5);
        assert_eq!(metrics.tx_dropped, 5);
        assert_eq!(metrics.tx_packets, 1);
    });
}

#[test]
fn test_interrupts_follow_event_idx_and_no_interrupt_flag() {
    in_netns(|| {
        setup_tap();
        let _socket = host_udp_socket();
        let mem = guest_memory();
        let frame = guest_udp_frame(5000, b"x");

        // EVENT_IDX: the driver wants an interrupt only once entry 3 (the fourth) is used.
        let rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS | VIRTIO_RING_F_EVENT_IDX);
        rig.run(0);
        rig.take_interrupts();
        tx.set_used_event(3);
        let len = write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
        for _ in 0..3 {
            tx.post(&[(TX_FRAMES, len, false)]);
            rig.notify(TX_INDEX);
            assert!(rig.run_until(|_| tx.used_idx() == tx.avail_idx()));
            assert_eq!(rig.take_interrupts(), 0, "used_event not reached yet");
        }
        tx.post(&[(TX_FRAMES, len, false)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == 4));
        assert_eq!(rig.take_interrupts(), 1);
        // The device asked to be notified of the next chain.
        assert_eq!(tx.avail_event(), 4);
        drop(rig);

        // Without EVENT_IDX: the avail ring's NO_INTERRUPT flag.
        let mem = guest_memory();
        let rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        rig.run(0);
        rig.take_interrupts();
        tx.set_avail_flags(u16::try_from(VRING_AVAIL_F_NO_INTERRUPT).unwrap());
        let len = write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
        tx.post(&[(TX_FRAMES, len, false)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == 1));
        assert_eq!(rig.take_interrupts(), 0);
        tx.set_avail_flags(0);
        tx.post(&[(TX_FRAMES, len, false)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == 2));
        assert_eq!(rig.take_interrupts(), 1);
        // Notifications are back on once the queue is drained.
        assert_eq!(tx.used_flags(), 0);
    });
}

#[test]
fn test_reset_forgets_queues_and_reactivation_works() {
    in_netns(|| {
        setup_tap();
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        rx.post(&[(RX_BUFFERS, 2048, true)]);
        rig.run(0);
        assert!(rig.net().tap_polled);

        rig.net().reset();
        assert!(!rig.net().is_activated());
        assert_eq!(rig.net().acked_features(), 0);
        // A frame arriving while reset takes the tap out of the loop instead of spinning.
        host.send_to(b"during reset", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|rig| !rig.net().tap_polled));
        assert_eq!(rig.run(100), 0);
        assert_eq!(rx.used_idx(), 0);

        // The driver sets the device up again from scratch.
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        rx.post(&[(RX_BUFFERS, 2048, true)]);
        assert!(rig.run_until(|_| rx.used_idx() == 1));
        let frames = rx.take_frames();
        assert_eq!(udp_payload(&frames[0].1), b"during reset");
    });
}

#[test]
fn test_tx_indirect_chain_is_sent() {
    in_netns(|| {
        setup_tap();
        let socket = host_udp_socket();
        let mem = guest_memory();
        let rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        let net_features = rig.net().avail_features();
        assert_ne!(net_features & bit(VIRTIO_RING_F_INDIRECT_DESC), 0);
        rig.activate(
            &mem,
            &rx,
            &tx,
            NO_OFFLOADS | bit(VIRTIO_RING_F_INDIRECT_DESC),
        );

        let frame = guest_udp_frame(5000, b"through an indirect table");
        write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
        // The table holds two descriptors: the header, then the frame.
        let table = TX_FRAMES + 0x1_0000;
        let next = u16::try_from(VRING_DESC_F_NEXT).unwrap();
        let entries = [
            Descriptor::new(TX_FRAMES, 12, next, 1),
            Descriptor::new(TX_FRAMES + 12, u32::try_from(frame.len()).unwrap(), 0, 0),
        ];
        for (i, desc) in (0u64..).zip(entries) {
            mem.write_obj(RawDescriptor::from(desc), GuestAddress(table + 16 * i))
                .unwrap();
        }
        let indirect = u16::try_from(VRING_DESC_F_INDIRECT).unwrap();
        let head = tx.post_with_flags(&[(table, 32, indirect)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == 1));
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"through an indirect table");
        assert_eq!(tx.take_used(), vec![(u32::from(head), 0)]);
    });
}

#[test]
fn test_deleted_tap_leaves_the_loop_and_tx_counts_failures() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        rx.post(&[(RX_BUFFERS, 2048, true)]);
        rig.run(0);
        assert!(rig.net().tap_polled);

        ip(&["link", "del", TAP]);
        // The detached tap polls as an error: it leaves the loop instead of spinning it.
        assert!(rig.run_until(|rig| rig.net().tap_broken));
        assert!(!rig.net().tap_polled);
        assert_eq!(rig.run(100), 0);

        // TX still completes every chain and counts the failures.
        let frame = guest_udp_frame(5000, b"nowhere to go");
        let len = write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
        tx.post(&[(TX_FRAMES, len, false)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == 1));
        let metrics = rig.metrics();
        assert_eq!(metrics.tx_dropped, 1);
        assert_eq!(metrics.tx_bad_chains, 0);
        assert!(metrics.tap_errors >= 1);
    });
}

/// A minimal TCP peer on the guest side: enough to get a connection established, so that the
/// host's own TCP stack sends segmentation-offloaded frames.
struct GuestTcp {
    seq: u32,
    ack: u32,
    next_frame: u64,
}

const GUEST_PORT: u16 = 40000;
const HOST_PORT: u16 = 7000;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

impl GuestTcp {
    /// A TCP/IPv4 frame from the guest. With `gso_size`, the TCP checksum is left partial and
    /// the header asks the host to segment and finish it.
    fn frame(
        &self,
        flags: u8,
        options: &[u8],
        payload: &[u8],
        gso_size: Option<u16>,
    ) -> ([u8; 12], Vec<u8>) {
        let header_len = 20 + options.len();
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&GUEST_PORT.to_be_bytes());
        tcp.extend_from_slice(&HOST_PORT.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.push(u8::try_from(header_len / 4).unwrap() << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&0xffffu16.to_be_bytes()); // window (scaled by 2^7)
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        tcp.extend_from_slice(options);
        tcp.extend_from_slice(payload);
        let pseudo = pseudo_header_sum(GUEST_IP, HOST_IP, 6, tcp.len());
        let mut vnet = [0u8; 12];
        match gso_size {
            None => {
                let sum = checksum(&tcp, pseudo);
                tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            }
            Some(mss) => {
                // Partial checksum: the pseudo-header sum, not complemented.
                let partial = !checksum(&[], pseudo);
                tcp[16..18].copy_from_slice(&partial.to_be_bytes());
                vnet[0] = 1; // NEEDS_CSUM
                vnet[1] = 1; // GSO TCPV4
                vnet[2..4]
                    .copy_from_slice(&u16::try_from(14 + 20 + header_len).unwrap().to_le_bytes());
                vnet[4..6].copy_from_slice(&mss.to_le_bytes());
                vnet[6..8].copy_from_slice(&34u16.to_le_bytes());
                vnet[8..10].copy_from_slice(&16u16.to_le_bytes());
            }
        }
        (
            vnet,
            ethernet(HOST_MAC, GUEST_MAC, &ipv4(GUEST_IP, HOST_IP, 6, &tcp)),
        )
    }

    fn send(
        &mut self,
        rig: &mut Rig,
        mem: &GuestMemory,
        tx: &mut Driver,
        frame: ([u8; 12], Vec<u8>),
    ) {
        let addr = TX_FRAMES + self.next_frame * 0x2_0000;
        self.next_frame += 1;
        let len = write_tx(mem, addr, &frame.0, &frame.1);
        let target = tx.avail_idx().wrapping_add(1);
        tx.post(&[(addr, len, false)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx.used_idx() == target));
    }
}

/// (flags, seq, ack, payload length) of a TCP frame the host sent.
fn parse_tcp(frame: &[u8]) -> (u8, u32, u32, usize) {
    assert_eq!(frame[14 + 9], 6, "not TCP");
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let tcp = &frame[34..];
    let header_len = usize::from(tcp[12] >> 4) * 4;
    let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
    let ack = u32::from_be_bytes(tcp[8..12].try_into().unwrap());
    (tcp[13], seq, ack, total - 20 - header_len)
}

#[test]
fn test_tcp_segmentation_offload_both_ways() {
    in_netns(|| {
        setup_tap();
        let listener = TcpListener::bind(SocketAddrV4::new(HOST_IP, HOST_PORT)).unwrap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(
            &mem,
            &rx,
            &tx,
            NO_OFFLOADS
                | bit(VIRTIO_NET_F_CSUM)
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_MRG_RXBUF),
        );
        for i in 0..128 {
            rx.post(&[(RX_BUFFERS + i * 0x1000, 2048, true)]);
        }
        rig.run(0);

        // Handshake: SYN with MSS 1460 and window scaling, SYN-ACK back, ACK.
        let mut guest = GuestTcp {
            seq: 1000,
            ack: 0,
            next_frame: 0,
        };
        let syn = guest.frame(TCP_SYN, &[2, 4, 0x05, 0xb4, 1, 3, 3, 7], &[], None);
        guest.send(&mut rig, &mem, &mut tx, syn);
        assert!(rig.run_until(|_| rx.used_idx() >= 1));
        let frames = rx.take_frames();
        let (flags, host_seq, host_ack, _) = parse_tcp(&frames[0].1);
        assert_eq!(flags & (TCP_SYN | TCP_ACK), TCP_SYN | TCP_ACK);
        assert_eq!(host_ack, 1001);
        guest.seq = 1001;
        guest.ack = host_seq.wrapping_add(1);
        let ack = guest.frame(TCP_ACK, &[], &[], None);
        guest.send(&mut rig, &mem, &mut tx, ack);
        let (mut stream, _) = listener.accept().unwrap();

        // Host to guest: the first flight leaves as TSO frames longer than one MSS.
        let data: Vec<u8> = (0..14_600u32)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        stream.write_all(&data).unwrap();
        let mut received = 0usize;
        let mut largest_gso = 0usize;
        let deadline = Instant::now() + Duration::from_secs(3);
        while received < data.len() && Instant::now() < deadline {
            rig.run(10);
            for (header, frame) in rx.take_frames() {
                let (_, _, _, len) = parse_tcp(&frame);
                if header[1] == 1 {
                    assert_eq!(u16::from_le_bytes([header[4], header[5]]), 1460, "gso_size");
                    largest_gso = largest_gso.max(len);
                }
                received += len;
            }
        }
        assert!(received >= data.len(), "{received} of {} bytes", data.len());
        assert!(
            largest_gso > 1460,
            "no segmentation-offloaded frame reached the guest"
        );

        // Guest to host: one 20000-byte frame that the host segments and checksums.
        guest.ack = guest.ack.wrapping_add(u32::try_from(data.len()).unwrap());
        let payload: Vec<u8> = (0..20_000u32)
            .map(|i| u8::try_from(i % 241).unwrap())
            .collect();
        let big = guest.frame(TCP_ACK | TCP_PSH, &[], &payload, Some(1448));
        assert!(big.1.len() > 20_000);
        guest.send(&mut rig, &mem, &mut tx, big);
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut got = vec![0u8; payload.len()];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(got, payload);
        let metrics = rig.metrics();
        assert_eq!(metrics.tx_dropped, 0);
        assert_eq!(metrics.rx_dropped, 0);
    });
}

/// One descriptor as a fuzzing guest might write it.
fn any_descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    let addr = prop_oneof![
        (0u64..0x8_0000).prop_map(|o| RX_BUFFERS + o),
        any::<u64>(),
        Just(u64::try_from(MEM_SIZE).unwrap() - 8),
    ];
    let len = prop_oneof![0u32..2000, 0u32..70_000, any::<u32>()];
    let flag = |f: u32| u16::try_from(f).unwrap();
    let flags = prop_oneof![
        Just(0u16),
        Just(flag(VRING_DESC_F_NEXT)),
        Just(flag(VRING_DESC_F_WRITE)),
        Just(flag(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE)),
        Just(flag(VRING_DESC_F_INDIRECT)),
        any::<u16>(),
    ];
    (addr, len, flags, 0u16..300)
}

/// Guest-controlled parsing never panics and leaves the device working: random descriptor
/// tables and avail entries on both queues, then a well-formed frame each way.
#[test]
fn test_random_chains_never_break_the_device() {
    in_netns(|| {
        setup_tap();
        let socket = host_udp_socket();
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        // The runner wants a `Fn`; the rig lives across cases.
        let rig = RefCell::new(Rig::new(&interface(Some(GUEST_MAC_TEXT), None)));
        let config = ProptestConfig {
            cases: 128,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let strategy = (
            proptest::collection::vec(any_descriptor(), 1..12),
            proptest::collection::vec(0u16..300, 1..8),
            any::<bool>(),
        );
        let mut runner = TestRunner::new(config);
        runner
            .run(&strategy, |(descs, heads, mergeable)| {
                let mut rig = rig.borrow_mut();
                let mem = guest_memory();
                let mut rx = Driver::new(&mem, RX_RING);
                let mut tx = Driver::new(&mem, TX_RING);
                let mut features = NO_OFFLOADS | VIRTIO_RING_F_EVENT_IDX;
                if mergeable {
                    features |= bit(VIRTIO_NET_F_MRG_RXBUF);
                }
                rig.net().reset();
                rig.activate(&mem, &rx, &tx, features);
                rig.run(0);

                // The same garbage on both queues, in the first descriptor slots.
                for driver in [&rx, &tx] {
                    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                        let desc = Descriptor::new(addr, len, flags, next);
                        driver
                            .vq
                            .desc_table()
                            .store(u16::try_from(i).unwrap(), RawDescriptor::from(desc))
                            .unwrap();
                    }
                    for &head in &heads {
                        driver.publish(head);
                    }
                }
                rx.next_desc = 32;
                tx.next_desc = 32;
                host.send_to(b"fuzz", SocketAddrV4::new(GUEST_IP, 6000))
                    .unwrap();
                rig.notify(RX_INDEX);
                rig.notify(TX_INDEX);
                for _ in 0..5 {
                    rig.run(5);
                }
                let before = rig.metrics();

                // A good frame still goes out...
                let frame = guest_udp_frame(5000, b"after fuzz");
                let len = write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
                tx.post(&[(TX_FRAMES, len, false)]);
                rig.notify(TX_INDEX);
                let sent = rig.run_until(|rig| rig.metrics().tx_packets > before.tx_packets);
                prop_assert!(sent);
                let mut buf = [0u8; 64];
                loop {
                    let (n, _) = socket.recv_from(&mut buf).unwrap();
                    if &buf[..n] == b"after fuzz" {
                        break;
                    }
                }
                // ...and a frame comes in once the guest posts a proper buffer.
                let delivered = rig.metrics().rx_packets;
                let _ = before;
                rx.post(&[(RX_BUFFERS + 0x10_0000, 4096, true)]);
                rig.notify(RX_INDEX);
                host.send_to(b"after fuzz", SocketAddrV4::new(GUEST_IP, 6000))
                    .unwrap();
                let got = rig.run_until(|rig| rig.metrics().rx_packets > delivered);
                prop_assert!(got);
                // Drain what is left so the next case starts with an empty tap.
                rx.post(&[(RX_BUFFERS + 0x20_0000, 4096, true)]);
                rx.post(&[(RX_BUFFERS + 0x30_0000, 4096, true)]);
                rig.notify(RX_INDEX);
                rig.run(20);
                Ok(())
            })
            .unwrap();
    });
}

#[test]
fn test_rx_frame_read_from_the_tap_marks_guest_pages_dirty() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS);
        // The header alone in one page, the frame in the next: only readv writes that one.
        rx.post(&[(RX_BUFFERS, 12, true), (RX_BUFFERS + 0x1000, 2000, true)]);
        rig.run(0);
        clear_dirty(&mem);

        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(b"dirty", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|_| rx.used_idx() == 1));
        assert_eq!(udp_payload(&rx.take_frames()[0].1), b"dirty");
        assert!(
            is_dirty(&mem, RX_BUFFERS + 0x1000),
            "the frame readv wrote is not tracked"
        );
        assert!(is_dirty(&mem, RX_BUFFERS));
        assert!(
            !is_dirty(&mem, RX_BUFFERS + 0x2000),
            "a page nobody wrote is clean"
        );
    });
}

#[test]
fn test_snapshot_restore_gives_held_rx_buffers_back_and_io_continues() {
    in_netns(|| {
        setup_tap();
        let socket = host_udp_socket();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let mut tx = Driver::new(&mem, TX_RING);
        let features = NO_OFFLOADS | VIRTIO_RING_F_EVENT_IDX;
        let state = {
            let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
            rig.activate(&mem, &rx, &tx, features);
            let frame = guest_udp_frame(5000, b"before");
            let len = write_tx(&mem, TX_FRAMES, &[0; 12], &frame);
            tx.post(&[(TX_FRAMES, len, false)]);
            rig.notify(TX_INDEX);
            assert!(rig.run_until(|_| tx.used_idx() == 1));
            assert_eq!(tx.take_used().len(), 1);
            // An RX buffer the device takes from the ring and holds for the next frame.
            rx.post(&[(RX_BUFFERS, 2048, true)]);
            rig.notify(RX_INDEX);
            assert!(rig.run_until(|rig| rig.net().tap_polled));
            let json = serde_json::to_string(&rig.net().save_state()).unwrap();
            serde_json::from_str::<VirtioDeviceState>(&json).unwrap()
        };
        // The old device is gone (and with it its hold on the tap), as after a pause.
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"before");
        assert!(state.activated);
        assert_eq!(
            state.queues[RX_INDEX].next_avail, 0,
            "held buffer given back"
        );
        assert_eq!(state.queues[TX_INDEX].next_avail, 1);
        assert_eq!(state.queues[TX_INDEX].next_used, 1);

        let copy = guest_memory();
        let mut rx2 = rx.moved_to(&copy);
        let mut tx2 = tx.moved_to(&copy);
        copy_guest_memory(&mem, &copy);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        rig.net()
            .restore_state(&state, copy.clone(), rig.interrupt.clone())
            .unwrap();
        assert!(rig.net().is_activated());
        assert_eq!(rig.net().acked_features(), features);

        // A frame from the host lands in the buffer posted before the snapshot.
        let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap();
        host.send_to(b"after restore", SocketAddrV4::new(GUEST_IP, 6000))
            .unwrap();
        assert!(rig.run_until(|_| rx2.used_idx() == 1));
        let frames = rx2.take_frames();
        assert_eq!(udp_payload(&frames[0].1), b"after restore");
        assert!(rig.take_interrupts() >= 1);

        // And the guest's next frame goes out, completed at the next used index.
        let frame = guest_udp_frame(5000, b"after");
        let len = write_tx(&copy, TX_FRAMES, &[0; 12], &frame);
        let head = tx2.post(&[(TX_FRAMES, len, false)]);
        rig.notify(TX_INDEX);
        assert!(rig.run_until(|_| tx2.used_idx() == 2));
        assert_eq!(tx2.take_used(), vec![(u32::from(head), 0)]);
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"after");
        assert_eq!(rx.used_idx(), 0, "the old memory is not touched");
        assert_eq!(tx.used_idx(), 1);
    });
}

#[test]
fn test_snapshot_keeps_held_rx_buffers_only_after_the_last_bad_chain() {
    in_netns(|| {
        setup_tap();
        let mem = guest_memory();
        let mut rx = Driver::new(&mem, RX_RING);
        let tx = Driver::new(&mem, TX_RING);
        let mut rig = Rig::new(&interface(Some(GUEST_MAC_TEXT), None));
        // Merging: the device holds buffers until it has room for a full frame (1530 bytes).
        rig.activate(&mem, &rx, &tx, NO_OFFLOADS | bit(VIRTIO_NET_F_MRG_RXBUF));
        rx.post(&[(RX_BUFFERS, 1024, true)]);
        let bad = rx.post(&[(RX_BUFFERS + 0x1000, 1024, false)]);
        rx.post(&[(RX_BUFFERS + 0x2000, 1024, true)]);
        rig.notify(RX_INDEX);
        assert!(rig.run_until(|rig| rig.net().tap_polled));
        assert_eq!(rx.take_used(), vec![(u32::from(bad), 0)]);

        let state = rig.net().save_state();
        // Rewinding to the first buffer would complete the bad chain a second time.
        assert_eq!(state.queues[RX_INDEX].next_avail, 2);
    });
}
