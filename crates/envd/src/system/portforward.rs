//! Port forwarding with E2B's semantics: a program in the sandbox that listens only on
//! loopback (`127.0.0.1:P` or `[::1]:P`) is still reachable from outside at the guest's
//! external IPv4 address, port P.
//!
//! About once a second envd reads `/proc/net/tcp` and `/proc/net/tcp6` for listening sockets.
//! A port with a loopback listener and none on a wildcard address or on the external address
//! gets a forwarder: a listener on `<external>:P` whose connections are proxied to the
//! loopback listener. When the loopback listener goes away, so does the forwarder (open
//! connections finish on their own).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::network;

/// How often the socket tables are read.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// The state of a listening socket in `/proc/net/tcp*`.
const TCP_LISTEN: &str = "0A";

/// Where forwarders listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalAddress {
    /// A fixed address (`--forward-address`).
    Fixed(Ipv4Addr),
    /// The IPv4 address an interface has at the time of each scan (`eth0` by default).
    Interface(String),
}

impl ExternalAddress {
    fn resolve(&self) -> Option<Ipv4Addr> {
        match self {
            Self::Fixed(address) => Some(*address),
            Self::Interface(name) => network::ipv4_address(name),
        }
    }
}

/// Starts the scanner in the background. `skip` lists ports never forwarded (envd's own).
pub fn spawn(external: ExternalAddress, skip: Vec<u16>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut forwarder = Forwarder::new(external, skip);
        let mut interval = tokio::time::interval(SCAN_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            forwarder.scan().await;
        }
    })
}

/// One forwarded port.
#[derive(Debug)]
struct Forward {
    target: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// The scanner's state between scans.
#[derive(Debug)]
struct Forwarder {
    external: ExternalAddress,
    skip: Vec<u16>,
    /// The address the current forwards listen on.
    current: Option<Ipv4Addr>,
    forwards: HashMap<u16, Forward>,
    /// Ports whose forwarder could not listen; retried only after the port disappears, so a
    /// failure is logged once.
    failed: HashSet<u16>,
}

impl Forwarder {
    fn new(external: ExternalAddress, skip: Vec<u16>) -> Self {
        Self {
            external,
            skip,
            current: None,
            forwards: HashMap::new(),
            failed: HashSet::new(),
        }
    }

    async fn scan(&mut self) {
        let address = self.external.resolve();
        if address != self.current {
            if !self.forwards.is_empty() {
                tracing::info!(?address, "external address changed, dropping port forwards");
            }
            self.forwards.clear();
            self.failed.clear();
            self.current = address;
        }
        let Some(external) = address else { return };
        let mut listeners = Vec::new();
        for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            // tcp6 is missing when IPv6 is off.
            if let Ok(text) = tokio::fs::read_to_string(path).await {
                listeners.extend(parse_listeners(&text, v6));
            }
        }
        let forwarded: HashSet<u16> = self.forwards.keys().copied().collect();
        let wanted = wanted_forwards(&listeners, external, &forwarded, &self.skip);

        self.forwards.retain(|port, forward| {
            let keep = wanted.get(port) == Some(&forward.target);
            if !keep {
                tracing::info!(port, "port forward removed");
            }
            keep
        });
        self.failed.retain(|port| wanted.contains_key(port));
        for (port, target) in wanted {
            if self.forwards.contains_key(&port) || self.failed.contains(&port) {
                continue;
            }
            match TcpListener::bind(SocketAddr::from((external, port))).await {
                Ok(listener) => {
                    tracing::info!(%external, port, %target, "forwarding port");
                    let accept_loop = tokio::spawn(accept_loop(listener, target));
                    self.forwards.insert(
                        port,
                        Forward {
                            target,
                            accept_loop,
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(%external, port, %error, "cannot forward port");
                    self.failed.insert(port);
                }
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((inbound, peer)) => {
                tokio::spawn(async move {
                    let mut inbound = inbound;
                    let mut outbound = match TcpStream::connect(target).await {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::debug!(%peer, %target, %error, "forward target refused");
                            return;
                        }
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    if let Err(error) =
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                    {
                        tracing::debug!(%peer, %target, %error, "forwarded connection ended");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accept on a forwarded port failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The listening sockets of a `/proc/net/tcp` (or `tcp6`) table.
fn parse_listeners(text: &str, v6: bool) -> Vec<(IpAddr, u16)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&TCP_LISTEN) {
                return None;
            }
            let (address, port) = fields.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let address = if v6 {
                IpAddr::V6(parse_ipv6_hex(address)?)
            } else {
                IpAddr::V4(parse_ipv4_hex(address)?)
            };
            Some((address, port))
        })
        .collect()
}

/// The kernel prints the address as a 32-bit word in host byte order.
fn parse_ipv4_hex(hex: &str) -> Option<Ipv4Addr> {
    if hex.len() != 8 {
        return None;
    }
    let word = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(word.to_ne_bytes()))
}

/// Four 32-bit words, each in host byte order.
fn parse_ipv6_hex(hex: &str) -> Option<Ipv6Addr> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut octets = [0u8; 16];
    for (index, chunk) in octets.chunks_exact_mut(4).enumerate() {
        let word = u32::from_str_radix(hex.get(index * 8..index * 8 + 8)?, 16).ok()?;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Some(Ipv6Addr::from(octets))
}

/// An IPv4 address, seeing through IPv4-mapped IPv6 ones.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

/// The ports to forward and where to: ports with a loopback listener and no listener on a
/// wildcard address or on `external` (our own forwarders, in `forwarded`, excepted).
fn wanted_forwards(
    listeners: &[(IpAddr, u16)],
    external: Ipv4Addr,
    forwarded: &HashSet<u16>,
    skip: &[u16],
) -> BTreeMap<u16, SocketAddr> {
    let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
    for (address, port) in listeners {
        by_port.entry(*port).or_default().push(canonical(*address));
    }
    by_port
        .into_iter()
        .filter(|(port, _)| !skip.contains(port))
        .filter_map(|(port, addresses)| {
            let taken = addresses.iter().any(|address| {
                address.is_unspecified()
                    || (*address == IpAddr::V4(external) && !forwarded.contains(&port))
            });
            if taken {
                return None;
            }
            let target = if addresses
                .iter()
                .any(|a| matches!(a, IpAddr::V4(v4) if v4.is_loopback()))
            {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else if addresses.contains(&IpAddr::V6(Ipv6Addr::LOCALHOST)) {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            } else {
                return None;
            };
            Some((port, SocketAddr::new(target, port)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_endian = "little")]
    #[test]
    fn test_parse_listeners_reads_listen_rows_only() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1FBB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:C2FF 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1FBB 0100007F:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(
            parse_listeners(tcp, false),
            vec![
                (IpAddr::from([127, 0, 0, 1]), 8123),
                (IpAddr::from([0, 0, 0, 0]), 49919)
            ]
        );
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0
   1: 0000000000000000FFFF00000100007F:0051 00000000000000000000000000000000:0000 0A 0
   2: 00000000000000000000000000000000:0052 00000000000000000000000000000000:0000 0A 0
";
        assert_eq!(
            parse_listeners(tcp6, true),
            vec![
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 80),
                ("::ffff:127.0.0.1".parse().unwrap(), 81),
                (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 82),
            ]
        );
        assert!(parse_listeners("header\n 0: zz:zz 0:0 0A\n", false).is_empty());
    }

    #[test]
    fn test_wanted_forwards_picks_loopback_only_ports() {
        let external = Ipv4Addr::new(10, 0, 0, 2);
        let local4 = IpAddr::from([127, 0, 0, 1]);
        let listeners = vec![
            (local4, 3000),                          // forwarded
            (IpAddr::V6(Ipv6Addr::LOCALHOST), 3001), // forwarded to ::1
            (local4, 3002),                          // also on the wildcard
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 3002),
            (local4, 3003), // someone else has external:3003
            (IpAddr::V4(external), 3003),
            (local4, 49983),                             // envd's own
            (IpAddr::from([10, 9, 9, 9]), 3004),         // not loopback at all
            ("::ffff:127.0.0.1".parse().unwrap(), 3005), // mapped loopback
        ];
        let wanted = wanted_forwards(&listeners, external, &HashSet::new(), &[49983]);
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            vec![
                (3000, "127.0.0.1:3000".parse().unwrap()),
                (3001, "[::1]:3001".parse().unwrap()),
                (3005, "127.0.0.1:3005".parse().unwrap()),
            ]
        );
        // Once forwarded, our own listener on external:3000 does not cancel the forward.
        let ours = vec![(local4, 3000), (IpAddr::V4(external), 3000)];
        let wanted = wanted_forwards(&ours, external, &HashSet::from([3000]), &[]);
        assert!(wanted.contains_key(&3000));
        let wanted = wanted_forwards(&ours, external, &HashSet::new(), &[]);
        assert!(wanted.is_empty());
    }
}
