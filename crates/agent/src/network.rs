//! Network slots: where each sandbox's VM is plugged in.
//!
//! A slot is a network namespace holding the VM's tap and one end of a veth pair whose other
//! end is on the host. Every guest has the same address inside its own namespace, so a snapshot
//! resumes anywhere without re-addressing; the host reaches a guest through its slot's
//! namespace-side veth address, which the namespace translates to the guest address.
//!
//! ```text
//!  host (root namespace)                 namespace <name>-<i>                   guest
//!  <name>-v<i>  base+4i+1/30  ──veth──  veth0  base+4i+2/30
//!                                         tap0   169.254.0.22/30  ──tap──  eth0 169.254.0.21/30
//!
//!  host → base+4i+2:PORT      DNAT in the namespace to 169.254.0.21:PORT (envd: 49983)
//!  guest → anywhere           forward filter (egress policy), SNAT to base+4i+2 on veth0,
//!                             then the host's table masquerades it out of the machine
//! ```
//!
//! Slots are made ahead of time by a background task (`warm` of them kept ready) so that
//! [`SlotPool::acquire`] costs nothing on a sandbox's hot path; [`SlotPool::release`] removes a
//! slot entirely (its conntrack state and egress policy go with the namespace) and the index is
//! made fresh again later. All changes are batches of `ip -batch -` and `nft -f -`: every
//! process spawn costs about a millisecond here and far more inside the host VM.
//!
//! On the host the pool owns only the nftables table named after the pool (`wrenn`): it
//! masquerades traffic from the base range leaving for anywhere else, accepts its forwarding,
//! and drops forwarding between slots. Other tables are never touched; note that a drop in
//! another table's forward chain (Docker's, say) still applies to slot traffic.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::Notify;

/// Debian packages that provide the commands slots run (`ip`, `nft`), for
/// `wrenn_image::packages::ensure`.
pub const PACKAGES: &[&str] = &["iproute2", "nftables"];

/// The guest's address, the same in every slot.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The guest's gateway: the tap's address inside the slot's namespace.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// The guest link's prefix length (a /30 holding the guest and its gateway).
pub const GUEST_PREFIX_LEN: u8 = 30;
/// The guest interface `ip=` configures.
pub const GUEST_INTERFACE: &str = "eth0";
/// The MAC address to give the guest's NIC: fixed, like its IPv4 address, so snapshots need no
/// change (locally administered, the address's last four bytes: a9:fe:00:15 = 169.254.0.21).
pub const GUEST_MAC: &str = "06:00:a9:fe:00:15";
/// The MAC address of every slot's tap (the guest's gateway): fixed, like the guest's own, so
/// the neighbour entry a template's guest cached stays right in whatever slot a restore lands.
pub const GATEWAY_MAC: &str = "06:00:a9:fe:00:16";
/// The tap the VMM opens, inside the slot's namespace.
pub const TAP_NAME: &str = "tap0";
/// The namespace-side end of the veth pair.
pub const NAMESPACE_VETH: &str = "veth0";
/// envd's TCP port inside the guest.
pub const ENVD_PORT: u16 = 49983;
/// Default range slots are cut from: 16384 /30s.
pub const DEFAULT_BASE: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 0);
/// Default prefix length of the range.
pub const DEFAULT_PREFIX_LEN: u8 = 16;
/// Default name of the pool: namespaces `wrenn-<i>`, host veths `wrenn-v<i>`, host table `wrenn`.
pub const DEFAULT_NAME: &str = "wrenn";

/// Where namespaces made by `ip netns add` live.
const NETNS_DIR: &str = "/run/netns";
/// Name of the nftables table (on the host and in each namespace).
const SLOT_TABLE: &str = "wrenn";
/// The longest pool name: `<name>-v<index>` must fit in an interface name (15 bytes) for
/// indexes up to 99999.
const MAX_NAME_LEN: usize = 8;
/// How long the refill task waits after a failed slot creation before trying again.
const REFILL_BACKOFF: Duration = Duration::from_secs(1);
/// How long one `ip` or `nft` command may take before it is killed (they take milliseconds;
/// a hung one must not wedge the pool).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `destroy_all` waits for slot creations already running to finish.
const CREATION_DRAIN: Duration = Duration::from_secs(30);

/// The kernel command line argument that configures the guest's network (envd as PID 1 and the
/// kernel both parse `ip=`): the fixed guest address, its gateway and netmask, on eth0.
pub fn guest_kernel_ip_arg() -> String {
    format!(
        "ip={GUEST_ADDRESS}::{GUEST_GATEWAY}:{}::{GUEST_INTERFACE}:off",
        netmask(GUEST_PREFIX_LEN)
    )
}

/// Why a slot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The pool's configuration cannot work.
    #[error("network slot configuration: {reason}")]
    Config { reason: String },
    /// A command could not be started at all.
    #[error("cannot run `{program}` (install the Debian packages iproute2 and nftables)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A file of the host's network configuration could not be read or written.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    /// Every slot is in use.
    #[error("all {max} network slots are in use")]
    Exhausted { max: u32 },
    /// The pool was destroyed.
    #[error("the network slot pool was destroyed")]
    Closed,
    /// An egress rule is not an IPv4 address or CIDR.
    #[error("egress {list} entry '{entry}': {reason}")]
    BadEgress {
        list: &'static str,
        entry: String,
        reason: String,
    },
}

/// How slots are laid out and how many are kept ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPoolConfig {
    /// First address of the range the slots' /30s are cut from (aligned to `prefix_len`).
    pub base: Ipv4Addr,
    /// Prefix length of that range; it holds 2^(30 - prefix_len) slots.
    pub prefix_len: u8,
    /// Most slots at once (warm and in use).
    pub max_slots: u32,
    /// Slots kept made and ready to hand out.
    pub warm: u32,
    /// Names everything the pool makes: namespaces `<name>-<i>`, host veths `<name>-v<i>`, the
    /// host's nftables table `<name>`. Lowercase letters and digits, starting with a letter, at
    /// most 8. Two pools on one host need different names and ranges.
    pub name: String,
}

impl Default for SlotPoolConfig {
    fn default() -> Self {
        SlotPoolConfig {
            base: DEFAULT_BASE,
            prefix_len: DEFAULT_PREFIX_LEN,
            max_slots: 1024,
            warm: 8,
            name: DEFAULT_NAME.to_owned(),
        }
    }
}

impl SlotPoolConfig {
    fn validate(&self) -> Result<(), NetworkError> {
        let bad = |reason: String| Err(NetworkError::Config { reason });
        if !(8..=30).contains(&self.prefix_len) {
            return bad(format!(
                "prefix length {} is not between 8 and 30",
                self.prefix_len
            ));
        }
        if u32::from(self.base) & !mask(self.prefix_len) != 0 {
            return bad(format!(
                "base {} is not the start of a /{} (try {})",
                self.base,
                self.prefix_len,
                Ipv4Addr::from(u32::from(self.base) & mask(self.prefix_len))
            ));
        }
        let capacity = 1u32 << (30 - self.prefix_len);
        if self.max_slots == 0 || self.max_slots > capacity {
            return bad(format!(
                "max_slots {} must be between 1 and {capacity}, the number of /30s in {}/{}",
                self.max_slots, self.base, self.prefix_len
            ));
        }
        if self.warm > self.max_slots {
            return bad(format!(
                "warm {} is more than max_slots {}",
                self.warm, self.max_slots
            ));
        }
        let name_ok = self.name.len() <= MAX_NAME_LEN
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !name_ok {
            return bad(format!(
                "name '{}' must be 1 to {MAX_NAME_LEN} lowercase letters or digits, starting with a letter",
                self.name
            ));
        }
        Ok(())
    }

    fn range(&self) -> String {
        format!("{}/{}", self.base, self.prefix_len)
    }

    fn netns_name(&self, index: u32) -> String {
        format!("{}-{index}", self.name)
    }

    fn host_veth(&self, index: u32) -> String {
        format!("{}-v{index}", self.name)
    }

    /// The host-side veth end of slot `index`: base + 4i + 1.
    fn host_end(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 4 * index + 1)
    }

    /// The namespace-side veth end of slot `index`: base + 4i + 2.
    fn namespace_end(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 4 * index + 2)
    }

    fn slot(&self, index: u32) -> Slot {
        Slot {
            index,
            netns: self.netns_name(index),
            host_veth: self.host_veth(index),
            host_end: self.host_end(index),
            namespace_end: self.namespace_end(index),
        }
    }

    /// The slot index in a namespace name `<name>-<i>`.
    fn index_of_netns(&self, netns: &str) -> Option<u32> {
        parse_index(netns.strip_prefix(&self.name)?.strip_prefix('-')?)
    }

    /// The slot index in a host veth name `<name>-v<i>`.
    fn index_of_veth(&self, link: &str) -> Option<u32> {
        parse_index(link.strip_prefix(&self.name)?.strip_prefix("-v")?)
    }
}

/// A decimal index without sign or leading zeros (so that names map to one index).
fn parse_index(digits: &str) -> Option<u32> {
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(mask(prefix_len))
}

/// One sandbox's place on the network. Hand it back with [`SlotPool::release`] once the VM
/// using it has exited.
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    index: u32,
    netns: String,
    host_veth: String,
    host_end: Ipv4Addr,
    namespace_end: Ipv4Addr,
}

impl Slot {
    /// The slot's number in its pool.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The namespace's name, for `ip netns exec <name>`.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// The namespace the VMM joins: `/run/netns/<name>-<i>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The tap to give the VMM (`host_dev_name`), inside the namespace.
    pub fn tap_name(&self) -> &str {
        TAP_NAME
    }

    /// The host-side veth's name.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// How the host reaches the guest: the namespace-side veth end, translated to the guest's
    /// address for every port.
    pub fn host_address(&self) -> Ipv4Addr {
        self.namespace_end
    }

    /// The host-side veth end: the namespace's default gateway, and the address guest traffic
    /// to the host arrives at.
    pub fn gateway_address(&self) -> Ipv4Addr {
        self.host_end
    }

    /// Where envd answers: [`Slot::host_address`] port 49983.
    pub fn envd_address(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.namespace_end, ENVD_PORT))
    }

    /// Replaces the guest's egress policy in one atomic batch: destinations in `deny` are
    /// refused; a non-empty `allow` refuses everything not in it; both empty allow all.
    /// Connections already established are not cut. A bad entry fails the call, naming it,
    /// before anything changes.
    pub async fn set_egress(&self, egress: &Egress) -> Result<(), NetworkError> {
        let allow = parse_list("allow", &egress.allow)?;
        let deny = parse_list("deny", &egress.deny)?;
        run_in_netns(&self.netns, &egress_batch(&allow, &deny)).await?;
        tracing::debug!(
            slot = self.index,
            allow = allow.len(),
            deny = deny.len(),
            "egress policy set"
        );
        Ok(())
    }
}

/// A guest's egress policy: IPv4 addresses (`1.2.3.4`) or CIDRs (`10.0.0.0/8`; host bits are
/// cleared, so `10.1.2.3/8` means `10.0.0.0/8`). Deny wins over allow; a non-empty allow list
/// drops everything else; both empty allow all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Egress {
    /// Checks every entry; the error names the first bad one.
    pub fn validate(&self) -> Result<(), NetworkError> {
        parse_list("allow", &self.allow)?;
        parse_list("deny", &self.deny)?;
        Ok(())
    }
}

/// An IPv4 network, normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Net {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn parse_net(list: &'static str, entry: &str) -> Result<Net, NetworkError> {
    let bad = |reason: &str| NetworkError::BadEgress {
        list,
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let (addr, prefix) = match entry.trim().split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (entry.trim(), None),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| bad("not an IPv4 address or CIDR (like 10.0.0.0/8)"))?;
    let prefix_len = match prefix {
        None => 32,
        Some(p) if !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()) => p
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 32)
            .ok_or_else(|| bad("prefix length must be between 0 and 32"))?,
        Some(_) => return Err(bad("prefix length must be between 0 and 32")),
    };
    Ok(Net {
        addr: Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
        prefix_len,
    })
}

fn parse_list(list: &'static str, entries: &[String]) -> Result<Vec<Net>, NetworkError> {
    let set: BTreeSet<Net> = entries
        .iter()
        .map(|e| parse_net(list, e))
        .collect::<Result<_, _>>()?;
    Ok(set.into_iter().collect())
}

/// The `nft` batch that replaces a namespace's egress policy: sets and the egress chain are
/// flushed and refilled in one transaction.
fn egress_batch(allow: &[Net], deny: &[Net]) -> String {
    let t = SLOT_TABLE;
    let mut batch =
        format!("flush chain ip {t} egress\nflush set ip {t} allow\nflush set ip {t} deny\n");
    let join = |nets: &[Net]| {
        nets.iter()
            .map(Net::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !deny.is_empty() {
        batch += &format!("add element ip {t} deny {{ {} }}\n", join(deny));
        batch += &format!(
            "add rule ip {t} egress ip daddr @deny reject with icmp type admin-prohibited\n"
        );
    }
    if !allow.is_empty() {
        batch += &format!("add element ip {t} allow {{ {} }}\n", join(allow));
        batch += &format!(
            "add rule ip {t} egress ip daddr != @allow reject with icmp type admin-prohibited\n"
        );
    }
    batch
}

/// The nftables table inside a slot's namespace: DNAT of what the host sends to the
/// namespace-side address, SNAT of the guest's traffic leaving through veth0, and the forward
/// filter whose `egress` chain holds the policy (empty: allow all).
fn namespace_table(namespace_end: Ipv4Addr) -> String {
    format!(
        "table ip {SLOT_TABLE} {{
  set allow {{ type ipv4_addr; flags interval; auto-merge; }}
  set deny {{ type ipv4_addr; flags interval; auto-merge; }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{NAMESPACE_VETH}\" ip daddr {namespace_end} dnat to {GUEST_ADDRESS}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{NAMESPACE_VETH}\" ip saddr {GUEST_ADDRESS} snat to {namespace_end}
  }}
  chain egress {{
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    ct state invalid drop
    iifname \"{TAP_NAME}\" jump egress
  }}
}}
"
    )
}

/// The host's table: egress NAT for the range, forwarding accepted for it, none between slots
/// and none into it that the slots did not start. Replaced whole, so it is idempotent.
fn host_table(config: &SlotPoolConfig) -> String {
    let (t, range) = (&config.name, config.range());
    format!(
        "add table ip {t}
delete table ip {t}
table ip {t} {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {range} ip daddr {range} drop
    ip saddr {range} accept
    ip daddr {range} ct state established,related accept
    ip daddr {range} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {range} ip daddr != {range} masquerade
  }}
}}
"
    )
}

/// What [`SlotPool::recover`] found and did.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Slots kept for VMs that outlived the previous agent, in use from now on.
    pub adopted: Vec<Slot>,
    /// Indexes asked to be kept whose namespace was gone (their VMs have no network).
    pub missing: Vec<u32>,
    /// Indexes of leftover namespaces or host veths that were removed.
    pub removed: Vec<u32>,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let adopted: Vec<u32> = self.adopted.iter().map(Slot::index).collect();
        write!(
            f,
            "adopted slots {adopted:?}, missing {:?}, removed {:?}",
            self.missing, self.removed
        )
    }
}

/// The pool of slots. Cheap to clone (all clones share one pool); the background refill task
/// ends when the last clone is dropped. Dropping the pool leaves its slots in place for the
/// next agent's [`SlotPool::recover`]; [`SlotPool::destroy_all`] removes everything.
#[derive(Clone)]
pub struct SlotPool {
    inner: Arc<Inner>,
}

impl fmt::Debug for SlotPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotPool")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: SlotPoolConfig,
    state: Mutex<State>,
    /// Wakes the refill task.
    refill: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The refill task holds only a weak reference: wake it so that it sees the pool gone.
        self.refill.notify_one();
    }
}

/// Where each index is: in `free` (nothing exists), in `warm` (made, unused), or neither (in
/// use, or being made or removed).
#[derive(Debug, Default)]
struct State {
    free: BTreeSet<u32>,
    warm: VecDeque<u32>,
    /// Creations running (refill and on-demand), which `destroy_all` waits for.
    creating: u32,
    closed: bool,
}

/// Puts an index back in `free` unless defused: a creation or release that failed or whose
/// future was dropped half-way leaves nothing the next creation cannot clean up.
struct IndexGuard<'a> {
    inner: &'a Inner,
    index: Option<u32>,
}

impl IndexGuard<'_> {
    fn defuse(mut self) -> u32 {
        self.index.take().unwrap_or_default()
    }
}

impl Drop for IndexGuard<'_> {
    fn drop(&mut self) {
        if let Some(index) = self.index.take() {
            let mut state = self.inner.lock();
            if !state.closed {
                state.free.insert(index);
            }
            drop(state);
            self.inner.refill.notify_one();
        }
    }
}

/// Counts a running creation for `destroy_all`.
struct CreatingGuard<'a>(&'a Inner);

impl<'a> CreatingGuard<'a> {
    fn new(inner: &'a Inner, state: &mut State) -> Self {
        state.creating += 1;
        CreatingGuard(inner)
    }
}

impl Drop for CreatingGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.creating = state.creating.saturating_sub(1);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters more than losing the pool, so take the data anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SlotPool {
    /// Sets up the host (IPv4 forwarding, the pool's nftables table) and starts making warm
    /// slots in the background. Namespaces left by an earlier agent are neither adopted nor
    /// removed here (see [`SlotPool::recover`]); a slot whose names they hold replaces them
    /// when it is made.
    pub async fn new(config: SlotPoolConfig) -> Result<SlotPool, NetworkError> {
        config.validate()?;
        setup_host(&config).await?;
        let free = (0..config.max_slots).collect();
        Ok(SlotPool::start(config, free))
    }

    /// Like [`SlotPool::new`], after dealing with namespaces and host veths of this pool's name
    /// left by an earlier agent: slots whose index is in `in_use` (their VMs were adopted) are
    /// kept as they are and returned in the report; the rest are removed.
    pub async fn recover(
        config: SlotPoolConfig,
        in_use: &[u32],
    ) -> Result<(SlotPool, RecoveryReport), NetworkError> {
        config.validate()?;
        if let Some(bad) = in_use.iter().find(|i| **i >= config.max_slots) {
            return Err(NetworkError::Config {
                reason: format!(
                    "slot {bad} to adopt is beyond max_slots {}",
                    config.max_slots
                ),
            });
        }
        setup_host(&config).await?;
        let (namespaces, veths) = leftovers(&config).await?;
        let keep: BTreeSet<u32> = in_use.iter().copied().collect();
        let mut report = RecoveryReport::default();
        let mut batch = String::new();
        let mut removed = BTreeSet::new();
        for index in &veths {
            if !keep.contains(index) || !namespaces.contains(index) {
                batch += &format!("link del {}\n", config.host_veth(*index));
                removed.insert(*index);
            }
        }
        for index in &namespaces {
            if keep.contains(index) {
                report.adopted.push(config.slot(*index));
            } else {
                batch += &format!("netns del {}\n", config.netns_name(*index));
                removed.insert(*index);
            }
        }
        report.missing = keep
            .iter()
            .filter(|i| !namespaces.contains(i))
            .copied()
            .collect();
        report.removed = removed.into_iter().collect();
        if !batch.is_empty() {
            run_ip(None, &batch).await?;
        }
        let free = (0..config.max_slots)
            .filter(|i| !namespaces.contains(i) || !keep.contains(i))
            .collect();
        tracing::info!(pool = %config.name, %report, "network slots recovered");
        Ok((SlotPool::start(config, free), report))
    }

    fn start(config: SlotPoolConfig, free: BTreeSet<u32>) -> SlotPool {
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(State {
                free,
                ..State::default()
            }),
            refill: Arc::new(Notify::new()),
        });
        tokio::spawn(refill_task(Arc::downgrade(&inner)));
        inner.refill.notify_one();
        SlotPool { inner }
    }

    /// The pool's configuration.
    pub fn config(&self) -> &SlotPoolConfig {
        &self.inner.config
    }

    /// A slot to use: a warm one when there is one (no waiting), else one made now. Fails with
    /// [`NetworkError::Exhausted`] when `max_slots` are in use or being made.
    pub async fn acquire(&self) -> Result<Slot, NetworkError> {
        let inner = &*self.inner;
        let (index, creating) = {
            let mut state = inner.lock();
            if state.closed {
                return Err(NetworkError::Closed);
            }
            if let Some(index) = state.warm.pop_front() {
                drop(state);
                inner.refill.notify_one();
                tracing::debug!(slot = index, "warm network slot acquired");
                return Ok(inner.config.slot(index));
            }
            let Some(index) = state.free.pop_first() else {
                return Err(NetworkError::Exhausted {
                    max: inner.config.max_slots,
                });
            };
            (index, CreatingGuard::new(inner, &mut state))
        };
        let guard = IndexGuard {
            inner,
            index: Some(index),
        };
        create_slot(&inner.config, index).await?;
        // Still counted as creating, so that `destroy_all` does not remove it at the same time.
        if inner.lock().closed {
            let _ = remove_slot(&inner.config, index).await;
            return Err(NetworkError::Closed);
        }
        drop(creating);
        let index = guard.defuse();
        inner.refill.notify_one();
        tracing::debug!(slot = index, "network slot made on demand");
        Ok(inner.config.slot(index))
    }

    /// Takes a slot back once its VM has exited: removes its namespace (with its conntrack
    /// state and egress policy) and host veth; the index is made fresh again later. A failure
    /// to remove is logged; the next creation of the index cleans up what is left.
    pub async fn release(&self, slot: Slot) {
        let inner = &*self.inner;
        let _guard = IndexGuard {
            inner,
            index: Some(slot.index),
        };
        match remove_slot(&inner.config, slot.index).await {
            Ok(()) => tracing::debug!(slot = slot.index, "network slot released"),
            Err(error) => tracing::warn!(
                slot = slot.index,
                error = %error,
                "cannot remove a released network slot; it is replaced when made again"
            ),
        }
    }

    /// Removes every slot of this pool's name (warm and in use, and leftovers of earlier
    /// agents) and the host's table; the pool hands out nothing afterwards. For shutdown and
    /// tests.
    pub async fn destroy_all(&self) -> Result<(), NetworkError> {
        let inner = &*self.inner;
        {
            let mut state = inner.lock();
            state.closed = true;
            state.warm.clear();
            state.free.clear();
        }
        inner.refill.notify_one();
        let deadline = tokio::time::Instant::now() + CREATION_DRAIN;
        while inner.lock().creating > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let config = &inner.config;
        let (namespaces, veths) = leftovers(config).await?;
        let mut batch = String::new();
        for index in &veths {
            batch += &format!("link del {}\n", config.host_veth(*index));
        }
        for index in &namespaces {
            batch += &format!("netns del {}\n", config.netns_name(*index));
        }
        if !batch.is_empty() {
            run_ip(None, &batch).await?;
        }
        let table = &config.name;
        run_nft(&format!("add table ip {table}\ndelete table ip {table}\n")).await?;
        tracing::info!(
            pool = %config.name,
            slots = namespaces.len(),
            "network slots destroyed"
        );
        Ok(())
    }

    /// How many more slots [`SlotPool::acquire`] can hand out now (warm ones plus ones it would
    /// make).
    pub fn free(&self) -> usize {
        let state = self.inner.lock();
        state.warm.len() + state.free.len()
    }

    /// How many slots are made and ready.
    pub fn warm(&self) -> usize {
        self.inner.lock().warm.len()
    }
}

/// Keeps `warm` slots made. Holds the pool weakly so that dropping the pool ends it.
async fn refill_task(pool: Weak<Inner>) {
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let step = refill_once(&inner).await;
        let refill = inner.refill.clone();
        drop(inner);
        match step {
            Refill::Again => {}
            Refill::Wait => refill.notified().await,
            Refill::Backoff => tokio::time::sleep(REFILL_BACKOFF).await,
            Refill::Stop => return,
        }
    }
}

/// What the refill task does next.
enum Refill {
    Again,
    Wait,
    Backoff,
    Stop,
}

/// Makes one warm slot if fewer than `warm` are ready or being made.
async fn refill_once(inner: &Inner) -> Refill {
    let (index, creating) = {
        let mut state = inner.lock();
        if state.closed {
            return Refill::Stop;
        }
        let ready = state.warm.len() + usize::try_from(state.creating).unwrap_or(usize::MAX);
        if ready >= usize::try_from(inner.config.warm).unwrap_or(usize::MAX) {
            return Refill::Wait;
        }
        let Some(index) = state.free.pop_first() else {
            return Refill::Wait;
        };
        (index, CreatingGuard::new(inner, &mut state))
    };
    let guard = IndexGuard {
        inner,
        index: Some(index),
    };
    if let Err(error) = create_slot(&inner.config, index).await {
        tracing::warn!(slot = index, %error, "cannot make a warm network slot");
        return Refill::Backoff;
    }
    let index = guard.defuse();
    let kept = {
        let mut state = inner.lock();
        if !state.closed {
            state.warm.push_back(index);
        }
        !state.closed
    };
    if !kept {
        // Still counted as creating, so that `destroy_all` does not remove it at the same time.
        let _ = remove_slot(&inner.config, index).await;
        return Refill::Stop;
    }
    drop(creating);
    tracing::debug!(slot = index, "warm network slot made");
    Refill::Again
}

/// IPv4 forwarding on, and the pool's table (replaced whole).
async fn setup_host(config: &SlotPoolConfig) -> Result<(), NetworkError> {
    let path = Path::new("/proc/sys/net/ipv4/ip_forward");
    let current = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| NetworkError::Io {
            path: path.to_owned(),
            source,
        })?;
    if current.trim() != "1" {
        tokio::fs::write(path, "1\n")
            .await
            .map_err(|source| NetworkError::Io {
                path: path.to_owned(),
                source,
            })?;
        tracing::info!("IPv4 forwarding turned on for network slots");
    }
    run_nft(&host_table(config)).await
}

/// Makes slot `index` from nothing, replacing leftovers of the same names: namespace, veth
/// pair, tap, addresses, default route (one `ip -batch` on the host, one in the namespace),
/// then forwarding and the nftables table in the namespace (one more process).
async fn create_slot(config: &SlotPoolConfig, index: u32) -> Result<(), NetworkError> {
    let netns = config.netns_name(index);
    let veth = config.host_veth(index);
    let (host_end, ns_end) = (config.host_end(index), config.namespace_end(index));
    if Path::new(NETNS_DIR).join(&netns).exists() || link_exists(&veth) {
        tracing::info!(slot = index, %netns, "replacing a leftover network slot");
        remove_slot(config, index).await?;
    }
    let host = format!(
        "netns add {netns}
link add {veth} type veth peer name {NAMESPACE_VETH} netns {netns}
addr add {host_end}/30 dev {veth}
link set {veth} up
"
    );
    let inside = format!(
        "link set lo up
addr add {ns_end}/30 dev {NAMESPACE_VETH}
link set {NAMESPACE_VETH} up
tuntap add dev {TAP_NAME} mode tap
link set dev {TAP_NAME} address {GATEWAY_MAC}
addr add {GUEST_GATEWAY}/{GUEST_PREFIX_LEN} dev {TAP_NAME}
link set {TAP_NAME} up
route add default via {host_end}
"
    );
    let made = async {
        run_ip(None, &host).await?;
        run_ip(Some(&netns), &inside).await?;
        run_in_netns(&netns, &namespace_table(ns_end)).await
    }
    .await;
    if let Err(error) = made {
        let _ = remove_slot(config, index).await;
        return Err(error);
    }
    Ok(())
}

/// Removes slot `index`'s host veth (and with it the namespace's end) and its namespace, as far
/// as they exist. A namespace some process still runs in lives on, unnamed, until it exits.
async fn remove_slot(config: &SlotPoolConfig, index: u32) -> Result<(), NetworkError> {
    let netns = config.netns_name(index);
    let veth = config.host_veth(index);
    let mut batch = String::new();
    if link_exists(&veth) {
        batch += &format!("link del {veth}\n");
    }
    if Path::new(NETNS_DIR).join(&netns).exists() {
        batch += &format!("netns del {netns}\n");
    }
    if batch.is_empty() {
        return Ok(());
    }
    run_ip(None, &batch).await
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Indexes of this pool's namespaces (in /run/netns) and host veths (in /sys/class/net).
async fn leftovers(
    config: &SlotPoolConfig,
) -> Result<(BTreeSet<u32>, BTreeSet<u32>), NetworkError> {
    let namespaces = list_dir(Path::new(NETNS_DIR), |n| config.index_of_netns(n)).await?;
    let veths = list_dir(Path::new("/sys/class/net"), |n| config.index_of_veth(n)).await?;
    Ok((namespaces, veths))
}

async fn list_dir(
    dir: &Path,
    index_of: impl Fn(&str) -> Option<u32>,
) -> Result<BTreeSet<u32>, NetworkError> {
    let io = |source| NetworkError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut found = BTreeSet::new();
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io(e)),
    };
    while let Some(entry) = entries.next_entry().await.map_err(io)? {
        if let Some(index) = entry.file_name().to_str().and_then(&index_of) {
            found.insert(index);
        }
    }
    Ok(found)
}

/// `ip -batch -`, in namespace `netns` when given (`ip -n`).
async fn run_ip(netns: Option<&str>, batch: &str) -> Result<(), NetworkError> {
    let mut args = Vec::new();
    if let Some(netns) = netns {
        args.extend(["-n", netns]);
    }
    args.extend(["-batch", "-"]);
    run("ip", &args, batch).await
}

/// `nft -f -` on the host.
async fn run_nft(batch: &str) -> Result<(), NetworkError> {
    run("nft", &["-f", "-"], batch).await
}

/// `nft -f -` inside namespace `netns`, with IPv4 forwarding turned on there first (it is
/// per namespace and off in a new one; /proc/sys/net belongs to the writer's namespace).
async fn run_in_netns(netns: &str, batch: &str) -> Result<(), NetworkError> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward && exec nft -f -",
        ],
        batch,
    )
    .await
}

/// Runs `program args` with `input` on stdin; its stderr goes into the error. A command that
/// takes longer than [`COMMAND_TIMEOUT`] is killed.
async fn run(program: &str, args: &[&str], input: &str) -> Result<(), NetworkError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, run_untimed(program, args, input)).await {
        Ok(result) => result,
        Err(_) => Err(NetworkError::Timeout {
            command: format!("{program} {}", args.join(" ")),
            timeout: COMMAND_TIMEOUT,
        }),
    }
}

async fn run_untimed(program: &str, args: &[&str], input: &str) -> Result<(), NetworkError> {
    tracing::trace!(program, ?args, %input, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NetworkError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that fails early closes its stdin; its status says why.
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|source| NetworkError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let command = format!("{program} {}", args.join(" "));
    tracing::debug!(%command, %input, "failed batch");
    Err(NetworkError::Command {
        command,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_kernel_ip_arg_is_the_fixed_guest_link() {
        assert_eq!(
            guest_kernel_ip_arg(),
            "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off"
        );
    }

    #[test]
    fn test_slot_addresses_follow_index() {
        let config = SlotPoolConfig::default();
        let slot = config.slot(3);
        assert_eq!(slot.gateway_address(), Ipv4Addr::new(10, 11, 0, 13));
        assert_eq!(slot.host_address(), Ipv4Addr::new(10, 11, 0, 14));
        assert_eq!(slot.envd_address().to_string(), "10.11.0.14:49983");
        assert_eq!(slot.netns_path(), Path::new("/run/netns/wrenn-3"));
        assert_eq!(slot.host_veth(), "wrenn-v3");
        let last = config.slot(16383);
        assert_eq!(last.host_address(), Ipv4Addr::new(10, 11, 255, 254));
    }

    #[test]
    fn test_config_validate_rejects_bad_layouts() {
        let bad = [
            SlotPoolConfig {
                base: Ipv4Addr::new(10, 11, 0, 4),
                ..SlotPoolConfig::default()
            },
            SlotPoolConfig {
                max_slots: 16385,
                ..SlotPoolConfig::default()
            },
            SlotPoolConfig {
                warm: 2000,
                ..SlotPoolConfig::default()
            },
            SlotPoolConfig {
                prefix_len: 31,
                ..SlotPoolConfig::default()
            },
            SlotPoolConfig {
                name: "toolongname".into(),
                ..SlotPoolConfig::default()
            },
            SlotPoolConfig {
                name: "Wr-1".into(),
                ..SlotPoolConfig::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(NetworkError::Config { .. })),
                "{config:?}"
            );
        }
        SlotPoolConfig::default().validate().unwrap();
    }

    #[test]
    fn test_names_map_back_to_indexes_only_when_canonical() {
        let config = SlotPoolConfig::default();
        assert_eq!(config.index_of_netns("wrenn-12"), Some(12));
        assert_eq!(config.index_of_netns("wrenn-012"), None);
        assert_eq!(config.index_of_netns("wrenn-v12"), None);
        assert_eq!(config.index_of_netns("wrennx-1"), None);
        assert_eq!(config.index_of_veth("wrenn-v7"), Some(7));
        assert_eq!(config.index_of_veth("wrenn-7"), None);
    }

    #[test]
    fn test_parse_net_normalizes_and_names_bad_entries() {
        assert_eq!(
            parse_net("allow", "1.2.3.4").unwrap().to_string(),
            "1.2.3.4/32"
        );
        assert_eq!(
            parse_net("allow", "10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_net("deny", "0.0.0.0/0").unwrap().to_string(),
            "0.0.0.0/0"
        );
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4/33",
            "1.2.3.4/",
            "::1",
            "example.com",
            "1.2.3.4/-1",
        ] {
            let error = parse_net("deny", bad).unwrap_err();
            assert!(
                error.to_string().contains(&format!("'{bad}'")),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn test_egress_batch_allow_mode_only_with_allow_entries() {
        let nets = |s: &[&str]| {
            parse_list("x", &s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let open = egress_batch(&[], &[]);
        assert!(!open.contains("add rule"), "{open}");
        let deny_only = egress_batch(&[], &nets(&["1.1.1.1"]));
        assert!(deny_only.contains("@deny") && !deny_only.contains("@allow"));
        let both = egress_batch(&nets(&["10.0.0.0/8", "10.0.0.0/8"]), &nets(&["1.1.1.1"]));
        assert!(both.contains("allow { 10.0.0.0/8 }"), "{both}");
        assert!(both.find("@deny") < both.find("@allow"), "{both}");
    }
}
