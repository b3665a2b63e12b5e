//! A network between the host and the host VM: QEMU user-mode networking (slirp).
//!
//! ```text
//!  host                                        host VM (L1)
//!  127.0.0.1:HP  ──QEMU hostfwd──────────────▶ eth0 10.0.2.15:GP   (a forward; listen on 0.0.0.0)
//!  127.0.0.1:P   ◀── slirp maps 10.0.2.2 ───── connect 10.0.2.2:P  (WRENN_HOSTVM_HOST=10.0.2.2)
//! ```
//!
//! Slirp needs no privileges, no bridge and no tap on the host, and leaves the host's own
//! network alone; it is a NAT in QEMU's process, so the guest can reach the host (and, through
//! the host's sockets, anywhere the host can) but nothing reaches the guest except the
//! forwards. Its 10.0.2.0/24 does not overlap the agent's slot ranges (10.11.0.0/16 and
//! 169.254.0.20/30 inside each namespace). The guest's address is static (init sets it from the
//! kernel command line), so no DHCP client runs at boot; there is no DNS.
//!
//! A service inside the host VM reachable through a forward must listen on 0.0.0.0 (or
//! 10.0.2.15): slirp delivers forwarded connections to eth0's address, not to the loopback.
//!
//! The host's loopback trusts whoever reaches it, and through 10.0.2.2 the host VM does: init
//! rejects what the host VM forwards there (nftables table `wrenn_hostvm`), so that the
//! agent's sandboxes, whose traffic the host VM routes, cannot reach the control plane or
//! PostgreSQL on the host. Only the host VM's own processes can.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::str::FromStr;

use crate::HostVmError;

/// The host's address as the host VM sees it: slirp delivers what is sent there to the host's
/// loopback, so a service on the host's 127.0.0.1:PORT is at 10.0.2.2:PORT inside.
pub const HOST_ADDRESS_FROM_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The host VM's own address on eth0, where forwarded connections arrive.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of slirp's network (10.0.2.0/24).
pub const PREFIX_LEN: u8 = 24;
/// The variable giving commands the host's address: [`HOST_ADDRESS_FROM_GUEST`] inside the host
/// VM, 127.0.0.1 when the command runs directly. Set only when a network was asked for.
pub const HOST_ENV: &str = "WRENN_HOSTVM_HOST";

/// Debian packages a host VM with a network needs on the host (init runs the host's `nft`).
pub const PACKAGES: &[&str] = &["nftables"];

/// The host VM's network: on when present in [`crate::RunOptions`], with these forwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostVmNetwork {
    /// TCP ports of the host forwarded into the host VM.
    pub forwards: Vec<PortForward>,
}

impl HostVmNetwork {
    /// A network with no forwards: the guest reaches the host, nothing reaches the guest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a forward from `host` to the host VM's `guest_port`.
    pub fn forward(mut self, host: SocketAddr, guest_port: u16) -> Self {
        self.forwards.push(PortForward { host, guest_port });
        self
    }

    /// Checks what QEMU would otherwise reject with a less helpful message (or accept and
    /// misroute): IPv4 host addresses, non-zero ports, each host address used once.
    pub(crate) fn validate(&self) -> Result<(), HostVmError> {
        let invalid = |reason: String| Err(HostVmError::InvalidNetwork { reason });
        for (i, fwd) in self.forwards.iter().enumerate() {
            if !fwd.host.is_ipv4() {
                return invalid(format!(
                    "forward {fwd}: the host address must be IPv4 (QEMU's user networking forwards IPv4 only)"
                ));
            }
            if fwd.host.port() == 0 || fwd.guest_port == 0 {
                return invalid(format!(
                    "forward {fwd}: port 0 is not a port (pick a free one with free_local_address())"
                ));
            }
            if self.forwards[..i].iter().any(|f| f.host == fwd.host) {
                return invalid(format!("forward {fwd}: {} is forwarded twice", fwd.host));
            }
        }
        Ok(())
    }

    /// QEMU's `-netdev` value: slirp's network spelled out (so the constants above are what
    /// QEMU uses), and one `hostfwd` per forward to the guest's static address.
    pub(crate) fn netdev(&self, id: &str) -> String {
        let mut arg = format!(
            "user,id={id},net={}/{PREFIX_LEN},host={HOST_ADDRESS_FROM_GUEST},restrict=off",
            Ipv4Addr::from(u32::from(GUEST_ADDRESS) & (u32::MAX << (32 - PREFIX_LEN))),
        );
        for fwd in &self.forwards {
            arg.push_str(&format!(
                ",hostfwd=tcp:{}:{}-{GUEST_ADDRESS}:{}",
                fwd.host.ip(),
                fwd.host.port(),
                fwd.guest_port
            ));
        }
        arg
    }

    /// What init reads from the kernel command line to bring eth0 up.
    pub(crate) fn kernel_args() -> String {
        format!("wrenn.ip={GUEST_ADDRESS}/{PREFIX_LEN} wrenn.gw={HOST_ADDRESS_FROM_GUEST}")
    }
}

/// A TCP port of the host forwarded into the host VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// Where QEMU listens on the host (e.g. 127.0.0.1:5008).
    pub host: SocketAddr,
    /// The port inside the host VM that connections go to.
    pub guest_port: u16,
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.host, self.guest_port)
    }
}

impl FromStr for PortForward {
    type Err = HostVmError;

    /// `HOSTPORT:GUESTPORT` (the host side on 127.0.0.1) or `HOSTADDR:HOSTPORT:GUESTPORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || HostVmError::InvalidNetwork {
            reason: format!(
                "forward {s:?} is not HOSTPORT:GUESTPORT or HOSTADDR:HOSTPORT:GUESTPORT (e.g. 5008:5008)"
            ),
        };
        let (host, guest) = s.rsplit_once(':').ok_or_else(invalid)?;
        let guest_port: u16 = guest.parse().map_err(|_| invalid())?;
        let host = match host.parse::<u16>() {
            Ok(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Err(_) => host.parse::<SocketAddr>().map_err(|_| invalid())?,
        };
        let forward = PortForward { host, guest_port };
        HostVmNetwork {
            forwards: vec![forward],
        }
        .validate()?;
        Ok(forward)
    }
}

/// A port of 127.0.0.1 that nothing listens on right now, for a forward's host side.
///
/// The port is only free when this returns: another process may take it before QEMU binds it,
/// in which case QEMU fails to start and says which forward it could not set up.
pub fn free_local_port() -> Result<u16, HostVmError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|source| HostVmError::FreePort { source })?;
    let port = listener
        .local_addr()
        .map_err(|source| HostVmError::FreePort { source })?
        .port();
    Ok(port)
}

/// [`free_local_port`] as a socket address on 127.0.0.1.
pub fn free_local_address() -> Result<SocketAddr, HostVmError> {
    Ok(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        free_local_port()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_forward_parses_port_pairs_and_addresses() {
        let fwd: PortForward = "15008:5008".parse().unwrap();
        assert_eq!(fwd.host, "127.0.0.1:15008".parse().unwrap());
        assert_eq!(fwd.guest_port, 5008);
        let fwd: PortForward = "0.0.0.0:80:8080".parse().unwrap();
        assert_eq!(fwd.host, "0.0.0.0:80".parse().unwrap());
        assert_eq!(fwd.guest_port, 8080);
        for bad in [
            "5008",
            "a:5008",
            "5008:b",
            "70000:1",
            "0:5008",
            "5008:0",
            "[::1]:80:80",
            "",
        ] {
            let err = bad.parse::<PortForward>().unwrap_err();
            assert!(
                matches!(err, HostVmError::InvalidNetwork { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn test_netdev_spells_out_slirp_and_forwards() {
        let net = HostVmNetwork::new()
            .forward("127.0.0.1:15008".parse().unwrap(), 5008)
            .forward("127.0.0.1:15432".parse().unwrap(), 80);
        assert_eq!(
            net.netdev("n0"),
            "user,id=n0,net=10.0.2.0/24,host=10.0.2.2,restrict=off,\
             hostfwd=tcp:127.0.0.1:15008-10.0.2.15:5008,\
             hostfwd=tcp:127.0.0.1:15432-10.0.2.15:80"
        );
        net.validate().unwrap();
    }

    #[test]
    fn test_validate_rejects_a_host_address_used_twice() {
        let host = "127.0.0.1:15008".parse().unwrap();
        let net = HostVmNetwork::new().forward(host, 1).forward(host, 2);
        let err = net.validate().unwrap_err();
        assert!(err.to_string().contains("forwarded twice"), "{err}");
    }

    #[test]
    fn test_free_local_port_can_be_bound() {
        let port = free_local_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
