//! Network slots on this host, no VM: real namespaces, veth pairs, taps and nftables tables,
//! checked with `ip -j` and `nft -j`, and traffic through them.
//!
//! Where a guest is needed, a test-only stand-in plays it: the slot's tap is replaced by a veth
//! pair named `tap0` whose other end (`eth0`, 169.254.0.21/30) sits in a third namespace, so
//! that DNAT, SNAT, isolation and egress policy are exercised end to end without KVM.
//!
//! Every test uses its own pool name and address range, so they run in parallel. Needs root,
//! `ip` and `nft` (`apt-get install nftables`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use wrenn_agent::network::{
    Egress, GUEST_ADDRESS, NetworkError, Slot, SlotPool, SlotPoolConfig, guest_kernel_ip_arg,
};

/// How long a warm refill may take.
const REFILL_TIMEOUT: Duration = Duration::from_secs(30);

/// A test's pool layout, after removing what an earlier failed run of it left.
fn config(name: &str, third_octet: u8, max_slots: u32, warm: u32) -> SlotPoolConfig {
    clean(name);
    SlotPoolConfig {
        base: Ipv4Addr::new(10, 211, third_octet, 0),
        prefix_len: 24,
        max_slots,
        warm,
        name: name.to_owned(),
    }
}

/// Removes namespaces `<name>-*`, links `<name>-*` and the table `<name>`.
fn clean(name: &str) {
    let prefix = format!("{name}-");
    for (dir, args) in [
        ("/run/netns", ["netns", "del"]),
        ("/sys/class/net", ["link", "del"]),
    ] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&prefix) {
                let _ = Command::new("ip")
                    .args(args)
                    .arg(&file)
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    let _ = Command::new("nft")
        .args(["delete", "table", "ip", name])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Runs a command, failing the test when it fails; returns stdout.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&sh(args)).unwrap()
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn host_table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "ip", name])
        .output()
        .unwrap()
        .status
        .success()
}

/// `ip -j addr` of one link: its IPv4 addresses as `a.b.c.d/len`.
fn addresses(netns: Option<&str>, link: &str) -> Vec<String> {
    let mut args = vec!["ip", "-j"];
    if let Some(netns) = netns {
        args.extend(["-n", netns]);
    }
    args.extend(["addr", "show", "dev", link]);
    json(&args)[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The elements of a set of the slot's table, as nft prints them.
fn set_elements(slot: &Slot, set: &str) -> Vec<String> {
    let v = json(&[
        "ip",
        "netns",
        "exec",
        slot.netns_name(),
        "nft",
        "-j",
        "list",
        "set",
        "ip",
        "wrenn",
        set,
    ]);
    let set = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("set"))
        .unwrap();
    set.get("elem")
        .and_then(Value::as_array)
        .map(|elems| {
            elems
                .iter()
                .map(|e| match e.get("prefix") {
                    Some(p) => format!("{}/{}", p["addr"].as_str().unwrap(), p["len"]),
                    None => e.as_str().unwrap().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_warm(pool: &SlotPool, n: usize) {
    let deadline = Instant::now() + REFILL_TIMEOUT;
    while pool.warm() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} warm slots",
            pool.warm()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `f` on a thread inside namespace `netns`: sockets it makes stay in that namespace.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// A listener that answers each connection with the peer's address, on a thread.
fn serve_peer_address(listener: TcpListener) {
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let peer = conn.peer_addr().unwrap().ip().to_string();
            let _ = conn.write_all(peer.as_bytes());
        }
    });
}

/// Connects to `addr` and returns what the listener said, or the connection error.
fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text)
}

/// The test-only guest: a namespace whose `eth0` is the peer of a veth named `tap0` that
/// replaces the slot's tap, configured as `ip=` configures a real guest.
struct FakeGuest {
    netns: String,
}

impl FakeGuest {
    fn plug(slot: &Slot) -> FakeGuest {
        let netns = format!("{}g", slot.netns_name());
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(std::process::Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &netns]);
        let ns = slot.netns_name();
        sh(&["ip", "-n", ns, "link", "del", "tap0"]);
        sh(&[
            "ip", "-n", ns, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            "169.254.0.22/30",
            "dev",
            "tap0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "tap0", "up"]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            "169.254.0.21/30",
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            "169.254.0.22",
        ]);
        FakeGuest { netns }
    }

    /// Listens on the guest address, port `port`, answering with the peer address.
    fn listen(&self, port: u16) {
        let listener = in_netns(&self.netns, move || {
            TcpListener::bind(SocketAddrV4::new(GUEST_ADDRESS, port)).unwrap()
        });
        serve_peer_address(listener);
    }

    /// Connects from the guest.
    fn ask(&self, addr: SocketAddr) -> std::io::Result<String> {
        in_netns(&self.netns, move || ask(addr))
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_pool_makes_slots_with_addresses_routes_and_rules() {
    let pool = SlotPool::new(config("wt1", 1, 4, 2)).await.unwrap();
    wait_warm(&pool, 2).await;
    assert_eq!(pool.free(), 4);
    let slot = pool.acquire().await.unwrap();
    assert_eq!(slot.index(), 0);
    assert_eq!(slot.host_address(), Ipv4Addr::new(10, 211, 1, 2));
    assert_eq!(slot.envd_address().to_string(), "10.211.1.2:49983");
    assert_eq!(slot.netns_path().to_str(), Some("/run/netns/wt1-0"));
    assert_eq!(slot.tap_name(), "tap0");
    assert!(guest_kernel_ip_arg().starts_with("ip=169.254.0.21::169.254.0.22:"));

    assert_eq!(addresses(None, "wt1-v0"), ["10.211.1.1/30"]);
    assert_eq!(addresses(Some("wt1-0"), "veth0"), ["10.211.1.2/30"]);
    assert_eq!(addresses(Some("wt1-0"), "tap0"), ["169.254.0.22/30"]);
    let tap = json(&["ip", "-j", "-d", "-n", "wt1-0", "link", "show", "tap0"]);
    assert_eq!(tap[0]["linkinfo"]["info_kind"], "tun", "{tap}");
    let routes = json(&["ip", "-j", "-n", "wt1-0", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.211.1.1", "{routes}");
    let forward = sh(&[
        "ip",
        "netns",
        "exec",
        "wt1-0",
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
    ]);
    assert_eq!(forward.trim(), "1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );

    let rules = sh(&[
        "ip", "netns", "exec", "wt1-0", "nft", "-j", "list", "ruleset",
    ]);
    for needle in [
        r#""addr":"169.254.0.21""#,
        r#""snat":{"addr":"10.211.1.2""#,
        r#""hook":"forward""#,
        r#""ct":{"key":"state"}"#,
    ] {
        assert!(
            rules.replace(' ', "").contains(needle),
            "{needle} not in {rules}"
        );
    }
    let host = sh(&["nft", "-j", "list", "table", "ip", "wt1"]);
    assert!(host.contains("masquerade"), "{host}");
    assert!(host.contains("10.211.1.0"), "{host}");

    // The refill made another warm one behind the acquire.
    wait_warm(&pool, 2).await;
    assert!(netns_exists("wt1-2"));

    pool.destroy_all().await.unwrap();
    for name in ["wt1-0", "wt1-1", "wt1-2"] {
        assert!(!netns_exists(name), "{name} left");
    }
    for name in ["wt1-v0", "wt1-v1", "wt1-v2"] {
        assert!(!link_exists(name), "{name} left");
    }
    assert!(!host_table_exists("wt1"));
    assert!(matches!(pool.acquire().await, Err(NetworkError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_traffic_is_translated_isolated_and_follows_egress_policy() {
    let pool = SlotPool::new(config("wt2", 2, 4, 0)).await.unwrap();
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    let guest_a = FakeGuest::plug(&a);
    let guest_b = FakeGuest::plug(&b);
    guest_a.listen(8080);
    guest_b.listen(8080);

    // Host → guest: DNAT of the namespace-side address, any port; the guest sees the host end.
    let to_a = SocketAddr::new(a.host_address().into(), 8080);
    let to_b = SocketAddr::new(b.host_address().into(), 8080);
    assert_eq!(ask(to_a).unwrap(), a.gateway_address().to_string());
    assert_eq!(ask(to_b).unwrap(), b.gateway_address().to_string());

    // Guest → host: leaves as the namespace-side address (SNAT).
    let host_listener = TcpListener::bind(SocketAddrV4::new(a.gateway_address(), 0)).unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    serve_peer_address(host_listener);
    let to_host = SocketAddr::new(a.gateway_address().into(), host_port);
    assert_eq!(guest_a.ask(to_host).unwrap(), a.host_address().to_string());

    // Slots cannot reach each other.
    assert!(guest_a.ask(to_b).is_err(), "slot a reached slot b's guest");
    assert!(guest_b.ask(to_a).is_err(), "slot b reached slot a's guest");

    // Egress policy: deny, allow-only, deny wins, reset.
    let host_net = format!("{}/32", a.gateway_address());
    let set = |allow: &[&str], deny: &[&str]| Egress {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        deny: deny.iter().map(|s| s.to_string()).collect(),
    };
    a.set_egress(&set(&[], &[&host_net])).await.unwrap();
    assert!(guest_a.ask(to_host).is_err(), "deny did not stop the guest");
    // Host → guest is not egress.
    assert!(ask(to_a).is_ok());
    a.set_egress(&set(&["1.2.3.4"], &[])).await.unwrap();
    assert!(
        guest_a.ask(to_host).is_err(),
        "allow-only let other traffic out"
    );
    a.set_egress(&set(&["10.211.2.0/24", "10.211.0.0/16"], &[]))
        .await
        .unwrap();
    assert!(guest_a.ask(to_host).is_ok(), "allowed destination refused");
    a.set_egress(&set(&["10.211.0.0/16"], &[&host_net]))
        .await
        .unwrap();
    assert!(guest_a.ask(to_host).is_err(), "deny did not win over allow");
    assert_eq!(set_elements(&a, "deny"), [a.gateway_address().to_string()]);

    // A bad entry is named and changes nothing.
    let error = a
        .set_egress(&set(&["10.0.0.0/8"], &["10.0.0.0/33"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, NetworkError::BadEgress { entry, .. } if entry == "10.0.0.0/33"),
        "{error}"
    );
    assert!(error.to_string().contains("10.0.0.0/33"), "{error}");
    assert!(
        a.set_egress(&set(&["example.com"], &[])).await.is_err(),
        "a name was accepted"
    );
    assert_eq!(set_elements(&a, "deny"), [a.gateway_address().to_string()]);
    assert_eq!(set_elements(&a, "allow"), ["10.211.0.0/16"]);

    a.set_egress(&Egress::default()).await.unwrap();
    assert!(guest_a.ask(to_host).is_ok(), "allow-all still refused");
    assert!(set_elements(&a, "deny").is_empty());
    // The other slot never had a policy.
    assert!(guest_b.ask(to_host).is_ok());

    drop((guest_a, guest_b));
    pool.destroy_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_release_recycles_a_fresh_namespace_with_no_policy() {
    let pool = SlotPool::new(config("wt3", 3, 1, 1)).await.unwrap();
    wait_warm(&pool, 1).await;
    let slot = pool.acquire().await.unwrap();
    assert_eq!(pool.free(), 0);
    assert!(matches!(
        pool.acquire().await,
        Err(NetworkError::Exhausted { max: 1 })
    ));
    slot.set_egress(&Egress {
        allow: vec![],
        deny: vec!["0.0.0.0/0".into()],
    })
    .await
    .unwrap();
    // A mark the old namespace carries (nsfs inode numbers are reused, so they prove nothing).
    sh(&[
        "ip", "-n", "wt3-0", "link", "add", "mark0", "type", "veth", "peer", "name", "mark1",
    ]);
    pool.release(slot).await;
    assert!(!link_exists("wt3-v0"));
    wait_warm(&pool, 1).await;
    let slot = pool.acquire().await.unwrap();
    assert_eq!(slot.index(), 0);
    let links = sh(&["ip", "-n", "wt3-0", "-br", "link"]);
    assert!(
        !links.contains("mark0"),
        "the namespace (and its conntrack table) was reused: {links}"
    );
    assert!(set_elements(&slot, "deny").is_empty());
    pool.destroy_all().await.unwrap();
    assert!(!netns_exists("wt3-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_acquire_makes_slots_on_demand_up_to_max() {
    let pool = SlotPool::new(config("wt5", 5, 2, 0)).await.unwrap();
    assert_eq!(pool.warm(), 0);
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    assert_ne!(a.index(), b.index());
    assert!(netns_exists(a.netns_name()) && netns_exists(b.netns_name()));
    let error = pool.acquire().await.unwrap_err();
    assert!(
        matches!(error, NetworkError::Exhausted { max: 2 }),
        "{error}"
    );
    pool.release(a).await;
    assert_eq!(pool.free(), 1);
    let c = pool.acquire().await.unwrap();
    assert_eq!(c.index(), 0);
    pool.destroy_all().await.unwrap();
    drop((b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_leftover_namespace_of_the_same_name_is_replaced() {
    let _ = Command::new("ip")
        .args(["netns", "del", "wt6-0"])
        .stderr(std::process::Stdio::null())
        .status();
    sh(&["ip", "netns", "add", "wt6-0"]);
    sh(&[
        "ip", "-n", "wt6-0", "link", "add", "stale0", "type", "veth", "peer", "name", "stale1",
    ]);
    let pool = SlotPool::new(config("wt6", 6, 1, 0)).await.unwrap();
    let slot = pool.acquire().await.unwrap();
    assert_eq!(slot.index(), 0);
    let links = sh(&["ip", "-n", "wt6-0", "-br", "link"]);
    assert!(!links.contains("stale0"), "{links}");
    assert!(links.contains("tap0") && links.contains("veth0"), "{links}");
    pool.destroy_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_recover_keeps_in_use_slots_and_removes_the_rest() {
    let cfg = config("wt4", 4, 8, 3);
    let pool = SlotPool::new(cfg.clone()).await.unwrap();
    wait_warm(&pool, 3).await;
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    assert_eq!((a.index(), b.index()), (0, 1));
    b.set_egress(&Egress {
        allow: vec![],
        deny: vec!["192.0.2.0/24".into()],
    })
    .await
    .unwrap();
    wait_warm(&pool, 3).await;
    // The agent goes away without cleaning up; an orphan host veth is left too.
    drop(pool);
    let _ = Command::new("ip")
        .args(["link", "del", "wt4-v7"])
        .stderr(std::process::Stdio::null())
        .status();
    sh(&[
        "ip", "link", "add", "wt4-v7", "type", "veth", "peer", "name", "wt4peer7",
    ]);

    // No warm slots for now, so that what recover removed stays gone.
    let cfg = SlotPoolConfig { warm: 0, ..cfg };
    let (pool, report) = SlotPool::recover(cfg, &[1, 6]).await.unwrap();
    assert_eq!(report.adopted.len(), 1, "{report}");
    let adopted = &report.adopted[0];
    assert_eq!(adopted.index(), 1);
    assert_eq!(adopted.host_address(), Ipv4Addr::new(10, 211, 4, 6));
    assert_eq!(report.missing, [6]);
    assert_eq!(report.removed, [0, 2, 3, 4, 7], "{report}");
    assert!(netns_exists("wt4-1") && link_exists("wt4-v1"));
    assert_eq!(set_elements(adopted, "deny"), ["192.0.2.0/24"]);
    for gone in ["wt4-0", "wt4-2", "wt4-3", "wt4-4"] {
        assert!(!netns_exists(gone), "{gone} left");
    }
    assert!(!link_exists("wt4-v7") && !link_exists("wt4peer7"));

    // The adopted index is not handed out again; releasing it frees it.
    let mut taken = Vec::new();
    for _ in 0..7 {
        taken.push(pool.acquire().await.unwrap());
    }
    assert!(taken.iter().all(|s| s.index() != 1));
    assert!(pool.acquire().await.is_err());
    let report_slot = report.adopted.into_iter().next().unwrap();
    pool.release(report_slot).await;
    assert_eq!(pool.acquire().await.unwrap().index(), 1);

    pool.destroy_all().await.unwrap();
    assert!(!netns_exists("wt4-1"));
    assert!(!host_table_exists("wt4"));
    drop(a);
}
