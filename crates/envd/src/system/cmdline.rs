//! envd's settings from the kernel command line (`/proc/cmdline`): how the host hands a fresh
//! guest its identity before any `/init` call, the way E2B's envd reads Firecracker's metadata
//! service.
//!
//! Parameters (all optional; a bad value is logged and ignored):
//!
//! | parameter                  | meaning                                                         |
//! |----------------------------|-----------------------------------------------------------------|
//! | `envd.sandbox_id=ID`       | the sandbox's id (`E2B_SANDBOX_ID`, `/run/e2b/.E2B_SANDBOX_ID`)  |
//! | `envd.template_id=ID`      | its template's id (`E2B_TEMPLATE_ID`)                            |
//! | `envd.access_token=TOKEN`  | the access token requests need until `/init` changes it          |
//! | `envd.default_user=NAME`   | the user requests run as when they name none (`--default-user` wins) |
//! | `envd.vsock_port=PORT`     | the vsock port to serve on, 0 for none (`--vsock-port` wins)     |
//! | `envd.hostname=NAME`       | the guest's hostname (as PID 1); else `ip=`'s, else `wrenn`      |
//! | `envd.dns=IP[,IP...]`      | name servers for `/etc/resolv.conf` (as PID 1); else `ip=`'s     |
//! | `ip=CLIENT:SERVER:GW:MASK:HOST:DEV:AUTOCONF[:DNS0[:DNS1]]` | static IPv4 setup of `DEV` (as PID 1), see [`IpConfig`] |
//!
//! Values may be double-quoted (`envd.sandbox_id="a b"`), as the kernel allows.
use std::net::IpAddr;

use super::network::IpConfig;

/// Where the kernel shows its command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// What envd takes from the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    /// `envd.sandbox_id=`.
    pub sandbox_id: Option<String>,
    /// `envd.template_id=`.
    pub template_id: Option<String>,
    /// `envd.access_token=`.
    pub access_token: Option<String>,
    /// `envd.default_user=`.
    pub default_user: Option<String>,
    /// `envd.vsock_port=`.
    pub vsock_port: Option<u32>,
    /// `envd.hostname=`.
    pub hostname: Option<String>,
    /// `envd.dns=`, comma-separated.
    pub dns: Vec<IpAddr>,
    /// `ip=` when it is a static configuration.
    pub ip: Option<IpConfig>,
}

impl KernelCmdline {
    /// Reads and parses `/proc/cmdline`; empty when it cannot be read (logged).
    pub fn read() -> Self {
        match std::fs::read_to_string(PROC_CMDLINE) {
            Ok(text) => Self::parse(&text),
            Err(error) => {
                tracing::warn!(%error, "cannot read {PROC_CMDLINE}");
                Self::default()
            }
        }
    }

    /// Parses a command line; unknown parameters are skipped, bad values logged and skipped.
    pub fn parse(text: &str) -> Self {
        let mut parsed = Self::default();
        for (key, value) in split_params(text) {
            let Some(value) = value else { continue };
            let non_empty = (!value.is_empty()).then(|| value.clone());
            match key.as_str() {
                "envd.sandbox_id" => parsed.sandbox_id = non_empty,
                "envd.template_id" => parsed.template_id = non_empty,
                "envd.access_token" => parsed.access_token = non_empty,
                "envd.default_user" => parsed.default_user = non_empty,
                "envd.hostname" => parsed.hostname = non_empty,
                "envd.vsock_port" => match value.parse() {
                    Ok(port) => parsed.vsock_port = Some(port),
                    Err(error) => tracing::warn!(%value, %error, "bad envd.vsock_port, ignored"),
                },
                "envd.dns" => {
                    parsed.dns = value
                        .split(',')
                        .filter(|server| !server.is_empty())
                        .filter_map(|server| match server.parse() {
                            Ok(address) => Some(address),
                            Err(error) => {
                                tracing::warn!(%server, %error, "bad envd.dns server, ignored");
                                None
                            }
                        })
                        .collect();
                }
                "ip" => match IpConfig::parse(&value) {
                    Ok(config) => parsed.ip = config,
                    Err(error) => tracing::warn!(%value, %error, "ip= not used"),
                },
                _ => {}
            }
        }
        parsed
    }

    /// The name servers for `/etc/resolv.conf`: `envd.dns=`, else those of `ip=`.
    pub fn name_servers(&self) -> Vec<IpAddr> {
        if !self.dns.is_empty() {
            return self.dns.clone();
        }
        self.ip
            .iter()
            .flat_map(|ip| ip.dns.iter().copied().map(IpAddr::V4))
            .collect()
    }

    /// The hostname to set: `envd.hostname=`, else the one in `ip=`, else `wrenn`.
    pub fn hostname(&self) -> String {
        self.hostname
            .clone()
            .or_else(|| self.ip.as_ref().and_then(|ip| ip.hostname.clone()))
            .unwrap_or_else(|| "wrenn".to_owned())
    }
}

/// Splits a command line the kernel's way: words separated by white space, double quotes
/// group (and are removed), `key=value` or a bare `key`.
fn split_params(text: &str) -> Vec<(String, Option<String>)> {
    let mut params = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    params.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        params.push(word);
    }
    params
        .into_iter()
        .map(|word| match word.split_once('=') {
            Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
            None => (word, None),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn test_parse_full_cmdline_reads_every_parameter() {
        let parsed = KernelCmdline::parse(
            "console=ttyS0 reboot=k panic=1 init=/usr/bin/envd \
             ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off \
             envd.sandbox_id=sbx-1 envd.template_id=tpl-2 envd.access_token=tok \
             envd.default_user=user envd.vsock_port=1024 envd.hostname=box \
             envd.dns=1.1.1.1,2606:4700:4700::1111 quiet\n",
        );
        assert_eq!(parsed.sandbox_id.as_deref(), Some("sbx-1"));
        assert_eq!(parsed.template_id.as_deref(), Some("tpl-2"));
        assert_eq!(parsed.access_token.as_deref(), Some("tok"));
        assert_eq!(parsed.default_user.as_deref(), Some("user"));
        assert_eq!(parsed.vsock_port, Some(1024));
        assert_eq!(parsed.hostname(), "box");
        assert_eq!(
            parsed.name_servers(),
            vec![
                IpAddr::from([1, 1, 1, 1]),
                "2606:4700:4700::1111".parse::<IpAddr>().unwrap()
            ]
        );
        let ip = parsed.ip.unwrap();
        assert_eq!(ip.address, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(ip.device, "eth0");
    }

    #[test]
    fn test_parse_quoted_value_keeps_spaces() {
        let parsed = KernelCmdline::parse(r#"a=1 envd.sandbox_id="with space" "envd.hostname=h""#);
        assert_eq!(parsed.sandbox_id.as_deref(), Some("with space"));
        assert_eq!(parsed.hostname.as_deref(), Some("h"));
    }

    #[test]
    fn test_parse_bad_values_are_ignored() {
        let parsed = KernelCmdline::parse(
            "envd.vsock_port=-1 envd.dns=1.1.1.1,nope ip=dhcp envd.sandbox_id= envd.template_id",
        );
        assert_eq!(parsed.vsock_port, None);
        assert_eq!(parsed.dns, vec![IpAddr::from([1, 1, 1, 1])]);
        assert_eq!(parsed.ip, None);
        assert_eq!(parsed.sandbox_id, None);
        assert_eq!(parsed.template_id, None);
    }

    #[test]
    fn test_hostname_and_dns_fall_back_to_ip_then_default() {
        let from_ip =
            KernelCmdline::parse("ip=10.0.0.2::10.0.0.1:255.0.0.0:guest:eth1:off:8.8.8.8");
        assert_eq!(from_ip.hostname(), "guest");
        assert_eq!(from_ip.name_servers(), vec![IpAddr::from([8, 8, 8, 8])]);
        let empty = KernelCmdline::parse("");
        assert_eq!(empty.hostname(), "wrenn");
        assert!(empty.name_servers().is_empty());
    }
}
