//! The guest's network, brought up by envd as PID 1: the kernel has no IP autoconfiguration
//! built in, so envd applies the kernel command line's `ip=` itself (address, netmask, link
//! up, default route) with the classic interface ioctls, brings up `lo`, and writes
//! `/etc/resolv.conf`. Also reads an interface's IPv4 address (port forwarding's default).
use std::ffi::c_char;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// The interface `ip=` configures when it names none.
pub const DEFAULT_DEVICE: &str = "eth0";

/// A static IPv4 configuration from `ip=<client>:<server>:<gateway>:<netmask>:<hostname>:
/// <device>:<autoconf>:<dns0>:<dns1>` (the kernel's `nfsroot.txt` syntax; empty fields allowed,
/// `server`, `autoconf` and later fields beyond the name servers ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The default route's gateway; no default route when absent.
    pub gateway: Option<Ipv4Addr>,
    /// The netmask (dotted, or a prefix length); classful from the address when absent.
    pub netmask: Ipv4Addr,
    /// A hostname, when given.
    pub hostname: Option<String>,
    /// The interface ([`DEFAULT_DEVICE`] when empty).
    pub device: String,
    /// Name servers (`dns0`, `dns1`).
    pub dns: Vec<Ipv4Addr>,
}

/// Why `ip=` or the network setup failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// `ip=` asks for DHCP or another protocol envd does not speak.
    #[error("ip={0}: only a static configuration is supported")]
    Unsupported(String),
    /// A field of `ip=` is not an IPv4 address or netmask.
    #[error("ip=: bad {field} '{value}'")]
    BadField {
        /// Which field.
        field: &'static str,
        /// Its text.
        value: String,
    },
    /// An interface name longer than the kernel allows.
    #[error("interface name '{0}' is too long")]
    NameTooLong(String),
    /// An ioctl or socket call failed.
    #[error("{what} on {device}")]
    Sys {
        /// The operation.
        what: &'static str,
        /// The interface.
        device: String,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// Writing `/etc/resolv.conf` failed.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl IpConfig {
    /// Parses the value of `ip=`: `Ok(None)` for `off`/`none`, an error for DHCP-style values
    /// and bad fields.
    pub fn parse(value: &str) -> Result<Option<Self>, NetworkError> {
        match value {
            "" | "off" | "none" => return Ok(None),
            "on" | "any" | "dhcp" | "bootp" | "rarp" | "both" | "dhcp6" => {
                return Err(NetworkError::Unsupported(value.to_owned()));
            }
            _ => {}
        }
        let fields: Vec<&str> = value.split(':').collect();
        let field = |index: usize| fields.get(index).copied().unwrap_or("");
        let address = parse_ipv4("client address", field(0))?
            .ok_or_else(|| NetworkError::Unsupported(value.to_owned()))?;
        let gateway = parse_ipv4("gateway", field(2))?;
        let netmask = match field(3) {
            "" => classful_netmask(address),
            text => parse_netmask(text)?,
        };
        let hostname = Some(field(4))
            .filter(|name| !name.is_empty())
            .map(str::to_owned);
        let device = match field(5) {
            "" => DEFAULT_DEVICE.to_owned(),
            name => name.to_owned(),
        };
        let mut dns = Vec::new();
        for (index, name) in [(7, "dns0"), (8, "dns1")] {
            if let Some(server) = parse_ipv4(name, field(index))? {
                dns.push(server);
            }
        }
        Ok(Some(Self {
            address,
            gateway,
            netmask,
            hostname,
            device,
            dns,
        }))
    }
}

fn parse_ipv4(field: &'static str, text: &str) -> Result<Option<Ipv4Addr>, NetworkError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| NetworkError::BadField {
        field,
        value: text.to_owned(),
    })
}

/// A dotted netmask or a prefix length (`24`).
fn parse_netmask(text: &str) -> Result<Ipv4Addr, NetworkError> {
    let bad = || NetworkError::BadField {
        field: "netmask",
        value: text.to_owned(),
    };
    if let Ok(prefix) = text.parse::<u32>() {
        if prefix > 32 {
            return Err(bad());
        }
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        return Ok(Ipv4Addr::from(mask));
    }
    let mask: Ipv4Addr = text.parse().map_err(|_| bad())?;
    let bits = u32::from(mask);
    // A netmask is ones then zeros.
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(bad());
    }
    Ok(mask)
}

/// The kernel's default when `ip=` gives no netmask: the address's class.
fn classful_netmask(address: Ipv4Addr) -> Ipv4Addr {
    match address.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

// The address family in a `sockaddr`: the constant is 2, which fits.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
const AF_INET: libc::sa_family_t = libc::AF_INET as libc::sa_family_t;
// Interface flags are a `short` in `ifreq`; IFF_UP is 1.
#[allow(clippy::cast_possible_truncation)]
const IFF_UP: libc::c_short = libc::IFF_UP as libc::c_short;

/// The kernel's `struct rtentry` (libc has no glibc version of it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// An IPv4 `sockaddr` (the `sockaddr_in` layout: port, then the address).
fn sockaddr_v4(address: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as c_char; 14];
    for (slot, byte) in data[2..6].iter_mut().zip(address.octets()) {
        *slot = c_char::from_ne_bytes([byte]);
    }
    libc::sockaddr {
        sa_family: AF_INET,
        sa_data: data,
    }
}

fn sockaddr_to_v4(address: &libc::sockaddr) -> Option<Ipv4Addr> {
    if address.sa_family != AF_INET {
        return None;
    }
    let mut octets = [0u8; 4];
    for (octet, byte) in octets.iter_mut().zip(&address.sa_data[2..6]) {
        *octet = u8::from_ne_bytes(byte.to_ne_bytes());
    }
    Some(Ipv4Addr::from(octets))
}

/// A datagram socket to carry the ioctls (in the caller's network namespace).
fn control_socket(device: &str) -> Result<OwnedFd, NetworkError> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| NetworkError::Sys {
        what: "socket",
        device: device.to_owned(),
        source,
    })
}

fn ifreq(device: &str) -> Result<libc::ifreq, NetworkError> {
    let name = device.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(NetworkError::NameTooLong(device.to_owned()));
    }
    // SAFETY: `ifreq` is plain old data (a name array and a union of plain fields); all zeroes
    // is a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = c_char::from_ne_bytes([*byte]);
    }
    Ok(request)
}

/// One interface ioctl taking an `ifreq`.
fn ifreq_ioctl(
    sock: &OwnedFd,
    request: libc::Ioctl,
    what: &'static str,
    device: &str,
    ifr: &mut libc::ifreq,
) -> Result<(), NetworkError> {
    // SAFETY: every request passed here (SIOC[GS]IF*) reads or writes exactly one `ifreq`,
    // and `ifr` is a valid, exclusively borrowed `ifreq` for the whole call; `sock` is open.
    let result = unsafe { libc::ioctl(sock.as_raw_fd(), request, std::ptr::from_mut(ifr)) };
    nix::errno::Errno::result(result)
        .map(drop)
        .map_err(|source| NetworkError::Sys {
            what,
            device: device.to_owned(),
            source,
        })
}

/// Sets the `IFF_UP` flag of `device`.
pub fn bring_up(device: &str) -> Result<(), NetworkError> {
    let sock = control_socket(device)?;
    let mut ifr = ifreq(device)?;
    ifreq_ioctl(&sock, libc::SIOCGIFFLAGS, "SIOCGIFFLAGS", device, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | IFF_UP;
    ifreq_ioctl(&sock, libc::SIOCSIFFLAGS, "SIOCSIFFLAGS", device, &mut ifr)
}

/// Applies `config`: address, netmask, link up, default route through the gateway.
pub fn configure(config: &IpConfig) -> Result<(), NetworkError> {
    let device = config.device.as_str();
    let sock = control_socket(device)?;
    let mut ifr = ifreq(device)?;
    ifr.ifr_ifru.ifru_addr = sockaddr_v4(config.address);
    ifreq_ioctl(&sock, libc::SIOCSIFADDR, "SIOCSIFADDR", device, &mut ifr)?;
    let mut ifr = ifreq(device)?;
    ifr.ifr_ifru.ifru_netmask = sockaddr_v4(config.netmask);
    ifreq_ioctl(
        &sock,
        libc::SIOCSIFNETMASK,
        "SIOCSIFNETMASK",
        device,
        &mut ifr,
    )?;
    bring_up(device)?;
    if let Some(gateway) = config.gateway {
        add_default_route(&sock, device, gateway)?;
    }
    Ok(())
}

fn add_default_route(sock: &OwnedFd, device: &str, gateway: Ipv4Addr) -> Result<(), NetworkError> {
    let mut name: Vec<c_char> = device
        .bytes()
        .chain([0])
        .map(|byte| c_char::from_ne_bytes([byte]))
        .collect();
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: name.as_mut_ptr(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads one `struct rtentry`, which `RtEntry` lays out exactly; `rt_dev`
    // points at a NUL-terminated name that outlives the call; `sock` is open.
    let result = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT,
            std::ptr::from_mut(&mut route),
        )
    };
    match nix::errno::Errno::result(result) {
        Ok(_) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(source) => Err(NetworkError::Sys {
            what: "SIOCADDRT (default route)",
            device: device.to_owned(),
            source,
        }),
    }
}

/// The IPv4 address of `device`, if it has one.
pub fn ipv4_address(device: &str) -> Option<Ipv4Addr> {
    let sock = control_socket(device).ok()?;
    let mut ifr = ifreq(device).ok()?;
    ifreq_ioctl(&sock, libc::SIOCGIFADDR, "SIOCGIFADDR", device, &mut ifr).ok()?;
    // SAFETY: SIOCGIFADDR filled the `ifru_addr` member of the union.
    let address = unsafe { ifr.ifr_ifru.ifru_addr };
    sockaddr_to_v4(&address)
}

/// Writes a `resolv.conf` naming `servers` (nothing when there are none).
pub fn write_resolv_conf(path: &Path, servers: &[IpAddr]) -> Result<(), NetworkError> {
    if servers.is_empty() {
        return Ok(());
    }
    let text: String = servers
        .iter()
        .map(|server| format!("nameserver {server}\n"))
        .collect();
    // /etc/resolv.conf is often a dangling symlink in images (systemd-resolved); replace it.
    if path.is_symlink() {
        let _ = std::fs::remove_file(path);
    }
    std::fs::write(path, text).map_err(|source| NetworkError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn test_ip_parse_firecracker_style_reads_fields() {
        let config = IpConfig::parse("172.16.0.2::172.16.0.1:255.255.255.252::eth0:off")
            .unwrap()
            .unwrap();
        assert_eq!(
            config,
            IpConfig {
                address: Ipv4Addr::new(172, 16, 0, 2),
                gateway: Some(Ipv4Addr::new(172, 16, 0, 1)),
                netmask: Ipv4Addr::new(255, 255, 255, 252),
                hostname: None,
                device: "eth0".to_owned(),
                dns: Vec::new(),
            }
        );
    }

    #[test]
    fn test_ip_parse_defaults_and_dns() {
        let config = IpConfig::parse("10.1.2.3:::::").unwrap().unwrap();
        assert_eq!(config.netmask, Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(config.device, DEFAULT_DEVICE);
        assert_eq!(config.gateway, None);
        let config = IpConfig::parse("192.168.1.9::192.168.1.1:20:vm:ens3:none:9.9.9.9:1.1.1.1")
            .unwrap()
            .unwrap();
        assert_eq!(config.netmask, Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(config.hostname.as_deref(), Some("vm"));
        assert_eq!(config.device, "ens3");
        assert_eq!(
            config.dns,
            vec![Ipv4Addr::new(9, 9, 9, 9), Ipv4Addr::new(1, 1, 1, 1)]
        );
    }

    #[test]
    fn test_ip_parse_off_dhcp_and_bad_fields() {
        assert_eq!(IpConfig::parse("off").unwrap(), None);
        assert!(matches!(
            IpConfig::parse("dhcp"),
            Err(NetworkError::Unsupported(_))
        ));
        assert!(matches!(
            IpConfig::parse("10.0.0.300::10.0.0.1:255.255.255.0::eth0:off"),
            Err(NetworkError::BadField {
                field: "client address",
                ..
            })
        ));
        assert!(matches!(
            IpConfig::parse("10.0.0.2::10.0.0.1:255.0.255.0::eth0:off"),
            Err(NetworkError::BadField {
                field: "netmask",
                ..
            })
        ));
        assert!(matches!(
            IpConfig::parse("10.0.0.2::10.0.0.1:33::eth0:off"),
            Err(NetworkError::BadField {
                field: "netmask",
                ..
            })
        ));
        assert!(IpConfig::parse(":::::eth0:off").is_err());
    }

    #[test]
    fn test_write_resolv_conf_lists_servers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        write_resolv_conf(&path, &[]).unwrap();
        assert!(!path.exists());
        write_resolv_conf(&path, &[IpAddr::from([8, 8, 4, 4]), "::1".parse().unwrap()]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "nameserver 8.8.4.4\nnameserver ::1\n"
        );
    }

    /// Configures a veth interface in a network namespace of its own thread (unshare
    /// CLONE_NEWNET changes only the calling thread), so the host's network is untouched.
    #[test]
    fn test_configure_sets_address_route_and_reads_back() {
        let outcome = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) (tests run as root)");
            bring_up("lo").unwrap();
            assert_eq!(ipv4_address("lo"), Some(Ipv4Addr::LOCALHOST));
            let made = Command::new("ip")
                .args([
                    "link", "add", "wrtest0", "type", "veth", "peer", "name", "wrtest1",
                ])
                .status()
                .unwrap();
            assert!(made.success(), "ip link add veth");
            assert_eq!(ipv4_address("wrtest0"), None);
            let config =
                IpConfig::parse("10.201.0.2::10.201.0.1:255.255.255.0::wrtest0:off").unwrap();
            configure(&config.unwrap()).unwrap();
            assert_eq!(ipv4_address("wrtest0"), Some(Ipv4Addr::new(10, 201, 0, 2)));
            let addresses = Command::new("ip")
                .args(["-4", "addr", "show", "wrtest0"])
                .output()
                .unwrap();
            let routes = Command::new("ip")
                .args(["-4", "route", "show", "default"])
                .output()
                .unwrap();
            (
                String::from_utf8_lossy(&addresses.stdout).into_owned(),
                String::from_utf8_lossy(&routes.stdout).into_owned(),
            )
        })
        .join()
        .unwrap();
        let (addresses, routes) = outcome;
        assert!(addresses.contains("10.201.0.2/24"), "{addresses}");
        assert!(addresses.contains("UP"), "{addresses}");
        assert!(
            routes.contains("default via 10.201.0.1 dev wrtest0"),
            "{routes}"
        );
        assert!(
            configure(&IpConfig {
                device: "a-name-far-too-long-for-linux".to_owned(),
                ..IpConfig::parse("10.0.0.2").unwrap().unwrap()
            })
            .is_err()
        );
    }
}
