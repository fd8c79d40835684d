//! One inventory of the host: namespaces → sockets → classification → owners → attribution.
//!
//! Works only through [`System`], so everything here is tested with a fake system (below).
//! Per-port facts (hidden IPv4 exposure) are computed over every socket of the selected
//! namespaces *before* `--port`/`--trap-only` filter the output, so a filter never changes
//! what is true about a port.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use std::time::Instant;

use time::OffsetDateTime;

use crate::attribution;
use crate::classify::{classify, hidden_ipv4_groups};
use crate::fasthash::{FastMap, FastSet};
use crate::firewall::Firewall;
use crate::model::{Listener, NetnsId, NetnsView, ProcessInfo, Protocol, Source};
use crate::os::procfs::{CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN, CAP_SYS_PTRACE};
use crate::os::{NetnsEntry, ReadError, System};

/// Which namespaces to look at (`--netns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSelector {
    All,
    Current,
    /// A namespace's name as the scan shows it (`host`, a `/run/netns` name, an nsfs mount
    /// path, `net:[INODE]`), or a path that reaches it (`/run/netns/NAME`, an nsfs mount,
    /// `/proc/PID/ns/net`).
    Name(String),
    /// `INODE` or `net:[INODE]`.
    Inode(u64),
}

/// What `--netns` accepts, for help texts and errors.
pub const NETNS_HELP: &str = "all, current, a name (host, a /run/netns name), a path \
                              (/run/netns/NAME, an nsfs mount, /proc/PID/ns/net), INODE or \
                              net:[INODE]";

impl std::str::FromStr for NetnsSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Ok(match s {
            "" => return Err(format!("empty namespace selector; use {NETNS_HELP}")),
            "all" => NetnsSelector::All,
            "current" => NetnsSelector::Current,
            _ => match s.parse::<u64>() {
                Ok(ino) => NetnsSelector::Inode(ino),
                Err(_) => match s.strip_prefix("net:[").and_then(|r| r.strip_suffix(']')) {
                    Some(ino) => NetnsSelector::Inode(
                        ino.parse()
                            .map_err(|_| "the inode in net:[INODE] must be a number")?,
                    ),
                    None => NetnsSelector::Name(s.to_string()),
                },
            },
        })
    }
}

impl std::fmt::Display for NetnsSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetnsSelector::All => f.write_str("all"),
            NetnsSelector::Current => f.write_str("current"),
            NetnsSelector::Name(n) => f.write_str(n),
            NetnsSelector::Inode(i) => write!(f, "net:[{i}]"),
        }
    }
}

impl NetnsSelector {
    /// Whether `ns` is selected. A path matches the namespace it leads to: its name, or
    /// one of the handles discovery found for it (`/run/netns/NAME` for the namespace
    /// named NAME, nsfs mounts, `/proc/PID/ns/net` of a member process).
    fn matches(&self, ns: &NetnsEntry) -> bool {
        match self {
            NetnsSelector::All => true,
            NetnsSelector::Current => ns.current,
            NetnsSelector::Inode(i) => ns.id.inode == *i || ns.id.name == i.to_string(),
            NetnsSelector::Name(n) => {
                let path = std::path::Path::new(n);
                ns.id.name == *n
                    || (path.is_absolute()
                        && (ns.handles.iter().any(|h| h == path)
                            || n.strip_prefix("/run/netns/") == Some(ns.id.name.as_str())))
            }
        }
    }
}

/// What to scan and what to keep.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub netns: NetnsSelector,
    /// Protocols to enumerate (both by default).
    pub protocols: Vec<Protocol>,
    pub port: Option<u16>,
    pub trap_only: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            netns: NetnsSelector::All,
            protocols: vec![Protocol::Tcp, Protocol::Udp],
            port: None,
            trap_only: false,
        }
    }
}

/// One namespace as scanned.
#[derive(Debug, Clone)]
pub struct NetnsReport {
    pub id: NetnsId,
    /// `None` when it could not be read at all (see warnings).
    pub source: Option<Source>,
    /// Listeners found in it, before any output filter (`--proto`, `--port`,
    /// `--trap-only`).
    pub listeners: usize,
    /// Of those, the ones the filters let through (what the output lists).
    pub shown: usize,
    /// Its firewall as read; `None` when the namespace could not be read at all.
    pub firewall: Option<FirewallReport>,
    /// Whether its interfaces take IPv6; `None` when not read (see `NetnsView::ipv6`).
    pub ipv6: Option<crate::model::Ipv6Facts>,
}

/// What was read of one namespace's firewall (scan JSON `namespaces[].firewall`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallReport {
    /// `nft`, `iptables-nft`, `iptables-legacy`; empty when there is no ruleset.
    pub sources: Vec<&'static str>,
    /// The nftables generation id the ruleset was read at.
    pub generation: Option<u32>,
    /// Why the verdicts of this namespace are `unknown`, when they are.
    pub problem: Option<String>,
}

/// The result of a scan.
#[derive(Debug, Clone)]
pub struct Inventory {
    pub host: String,
    pub scanned_at: OffsetDateTime,
    /// Sorted by namespace (host first), protocol, port, family, address, inode.
    pub listeners: Vec<Listener>,
    /// Every process named by a listener.
    pub processes: BTreeMap<u32, ProcessInfo>,
    pub namespaces: Vec<NetnsReport>,
    /// What could not be seen, and which capability would fix it.
    pub warnings: Vec<String>,
    /// The socket truth itself is incomplete: a namespace could not be read, was read
    /// without the kernel's v6only answer (`/proc/PID/net`), or may be missing (processes
    /// whose namespace could not be seen). Warnings about owners or firewall verdicts
    /// alone do not make a scan partial: its sockets and what they accept are all there.
    pub partial: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("no network namespace matches --netns {wanted}; known namespaces: {known}")]
    NoSuchNetns { wanted: String, known: String },
}

/// How many namespaces are read at once.
const NETNS_PARALLEL: usize = 4;

/// Each namespace's firewall as assembled, kept across the scans of `run`: a ruleset is
/// parsed, and its answers computed, again only when what was read changed (the OS
/// layer re-reads it only when its generation changed).
#[derive(Debug, Default)]
pub struct FirewallMemo {
    entries: HashMap<u64, MemoEntry>,
    /// How many times a firewall was assembled (for tests and debug logs).
    built: usize,
}

#[derive(Debug)]
struct MemoEntry {
    raw: Option<crate::os::firewall::RawFirewall>,
    routes: Vec<(std::net::IpAddr, u8, String)>,
    local: Option<crate::model::LocalAddrs>,
    firewall: Firewall,
}

impl FirewallMemo {
    /// The namespace's firewall, assembled again only when its reading, routes or local
    /// addresses differ from last time.
    fn get(&mut self, inode: u64, view: &crate::model::NetnsView) -> &mut Firewall {
        let fresh = self.entries.get(&inode).is_some_and(|e| {
            e.raw == view.firewall && e.routes == view.routes && e.local == view.local
        });
        if !fresh {
            self.built += 1;
            let mut firewall = match &view.firewall {
                Some(raw) => Firewall::from_raw(raw),
                None => Firewall::not_read(
                    "the firewall was not read: the namespace could not be entered (it \
                     needs CAP_SYS_ADMIN; its sockets came from /proc/PID/net)",
                ),
            };
            firewall.set_routes(view.routes.clone());
            if let Some(local) = &view.local {
                firewall.set_local(local);
            }
            self.entries.insert(
                inode,
                MemoEntry {
                    raw: view.firewall.clone(),
                    routes: view.routes.clone(),
                    local: view.local.clone(),
                    firewall,
                },
            );
        }
        // Inserted just above when missing.
        #[allow(clippy::expect_used)]
        &mut self
            .entries
            .get_mut(&inode)
            .expect("the entry was just inserted")
            .firewall
    }

    /// Forgets namespaces no longer selected (gone or filtered out).
    fn retain(&mut self, selected: &[NetnsEntry]) {
        self.entries
            .retain(|inode, _| selected.iter().any(|n| n.id.inode == *inode));
    }
}

/// One scan with nothing kept from earlier ones (`scan` on the command line).
pub fn scan(sys: &dyn System, opts: &ScanOptions) -> Result<Inventory, ScanError> {
    scan_with(sys, opts, &mut FirewallMemo::default())
}

/// One scan that reuses the firewalls assembled by earlier scans (`run`).
pub fn scan_with(
    sys: &dyn System,
    opts: &ScanOptions,
    memo: &mut FirewallMemo,
) -> Result<Inventory, ScanError> {
    scan_full(sys, opts, memo, None)
}

/// What a whole scan read, kept by `run` (`live.rs`) so that the next inventory re-reads
/// only the namespaces an event names.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    pub discovered: Discovered,
    /// One view per `discovered.selected` entry, firewall included. Only kept when every
    /// namespace could be read.
    pub views: Vec<NetnsView>,
    /// The owner walk as found, before it was attached: socket inode → pids, and the
    /// processes. Every wanted inode has an entry (empty: no owner seen).
    pub owners: FastMap<u64, Vec<u32>>,
    pub processes: FastMap<u32, ProcessInfo>,
    /// Processes whose fd table could not be read during that walk.
    pub denied: usize,
}

/// Discovery's outcome: the selected namespaces and what it could not see.
#[derive(Debug, Clone)]
pub(crate) struct Discovered {
    pub selected: Vec<NetnsEntry>,
    pub warnings: Vec<String>,
    /// Some process's namespace could not be seen (makes every inventory partial).
    pub incomplete: bool,
}

/// A whole scan: discovery, every namespace, the whole /proc walk. With `keep`, what was
/// read is stored there for targeted inventories (or `None` when a namespace failed).
pub(crate) fn scan_full(
    sys: &dyn System,
    opts: &ScanOptions,
    memo: &mut FirewallMemo,
    keep: Option<&mut Option<Reading>>,
) -> Result<Inventory, ScanError> {
    let scanned_at = OffsetDateTime::now_utc();
    let started = Instant::now();
    let keeping = keep.is_some();
    // The /proc walk is the longest step and needs only the socket inodes: it starts first,
    // runs while namespaces are found and read (see `walk_socket_owners`), and keeps running
    // while this thread classifies, attributes cgroups and sorts.
    let wanted = OnceLock::new();
    let (collected, walk) = std::thread::scope(|s| {
        let walk = s.spawn(|| sys.owners(&wanted));
        // On an error or a panic the walker must not wait forever for the wanted set.
        let publish_on_exit = PublishEmpty(&wanted);
        let collected = read_phase(sys, opts, &wanted, started).map(|(discovered, views)| {
            let kept = (keeping && views.iter().all(|v| v.is_ok())).then(|| {
                views
                    .iter()
                    .filter_map(|v| v.as_ref().ok().cloned())
                    .collect::<Vec<_>>()
            });
            let collected = assemble_phase(sys, memo, &discovered, views, opts, started);
            (collected, kept.map(|views| (discovered, views)))
        });
        drop(publish_on_exit);
        (collected, walk.join())
    });
    let (collected, kept) = collected?;
    let walk = walk.ok();
    if let Some(keep) = keep {
        *keep = match (kept, &walk) {
            (Some((discovered, views)), Some(walk)) => {
                let mut owners = walk.by_inode.clone();
                for inode in wanted.get().into_iter().flatten() {
                    owners.entry(*inode).or_default();
                }
                Some(Reading {
                    discovered,
                    views,
                    owners,
                    processes: walk.processes.clone(),
                    denied: walk.denied,
                })
            }
            _ => None,
        };
    }
    Ok(finish(sys, collected, walk, scanned_at, started))
}

/// An inventory from namespaces already read (`reading.views`, some of them just read
/// again) and owners already known (`walk`): no discovery, no dumps, no /proc walk.
pub(crate) fn scan_reading(
    sys: &dyn System,
    opts: &ScanOptions,
    memo: &mut FirewallMemo,
    reading: &Reading,
    walk: crate::os::OwnerWalk,
) -> Inventory {
    let scanned_at = OffsetDateTime::now_utc();
    let started = Instant::now();
    let views = reading.views.iter().cloned().map(Ok).collect();
    let collected = assemble_phase(sys, memo, &reading.discovered, views, opts, started);
    finish(sys, collected, Some(walk), scanned_at, started)
}

/// The socket inodes whose owners a scan looks for.
pub(crate) fn wanted_inodes<'a>(
    views: impl IntoIterator<Item = &'a NetnsView>,
    opts: &ScanOptions,
) -> FastSet<u64> {
    views
        .into_iter()
        .flat_map(|v| &v.sockets)
        .filter(|s| opts.port.is_none_or(|p| s.port == p) && opts.protocols.contains(&s.protocol))
        .map(|s| s.inode)
        .collect()
}

/// Owners attached, namespaces sorted: the inventory.
fn finish(
    sys: &dyn System,
    collected: Collected,
    walk: Option<crate::os::OwnerWalk>,
    scanned_at: OffsetDateTime,
    started: Instant,
) -> Inventory {
    let Collected {
        mut listeners,
        mut namespaces,
        mut warnings,
        caps,
        partial,
    } = collected;
    let t_collected = started.elapsed();
    let processes = match walk {
        Some(walk) => attach_owners(sys, walk, &mut listeners, &mut warnings, caps),
        None => {
            warnings.push("the owner walk failed (thread panicked): owners are missing".into());
            BTreeMap::new()
        }
    };
    let t_owners = started.elapsed();
    namespaces
        .sort_by(|a, b| (a.id.name != "host", &a.id.name).cmp(&(b.id.name != "host", &b.id.name)));

    tracing::debug!(
        listeners = listeners.len(),
        namespaces = namespaces.len(),
        collected_and_walked_us = t_collected.as_micros() as u64,
        owners_attached_us = (t_owners - t_collected).as_micros() as u64,
        "Scan finished."
    );
    Inventory {
        host: sys.hostname(),
        scanned_at,
        listeners,
        processes,
        namespaces,
        warnings,
        partial,
    }
}

/// What [`collect`] found, before owners are attached.
struct Collected {
    listeners: Vec<Listener>,
    namespaces: Vec<NetnsReport>,
    warnings: Vec<String>,
    caps: crate::os::Caps,
    /// [`Inventory::partial`].
    partial: bool,
}

/// Finds and reads the namespaces (sockets, then firewalls) and publishes the socket
/// inodes the owner walk should look for.
#[allow(clippy::type_complexity)]
fn read_phase(
    sys: &dyn System,
    opts: &ScanOptions,
    wanted: &OnceLock<FastSet<u64>>,
    started: Instant,
) -> Result<(Discovered, Vec<Result<NetnsView, ReadError>>), ScanError> {
    let caps = sys.caps();
    let discovery = sys.discover();
    let selected = select(&discovery.namespaces, &opts.netns)?;
    let mut warnings = Vec::new();
    let incomplete = discovery.unreadable_pids > 0 && matches!(opts.netns, NetnsSelector::All);
    if incomplete {
        let n = discovery.unreadable_pids;
        warnings.push(format!(
            "could not see which network namespace {} {} in: namespaces only {} are missing ({})",
            count(n, "process", "processes"),
            if n == 1 { "is" } else { "are" },
            if n == 1 { "it uses" } else { "they use" },
            ptrace_hint(caps)
        ));
    }
    if discovery.host_unknown {
        warnings.push(
            "could not tell which namespace is the host's (reading /proc/1/ns/net needs CAP_SYS_PTRACE)"
                .to_string(),
        );
    }
    let t_discover = started.elapsed();
    // Both protocols are always read: `namespaces[].listeners` counts every listener of a
    // namespace whatever the output filters (`--proto` included) show.
    let views = read_all(sys, &selected, &[Protocol::Tcp, Protocol::Udp]);
    let _ = wanted.set(wanted_inodes(views.iter().flatten(), opts));
    let t_read = started.elapsed();
    // The rulesets are read now, while the owner walk (already given its inodes) runs.
    let views = read_firewalls(sys, &selected, views);
    tracing::debug!(
        discover_us = t_discover.as_micros() as u64,
        read_us = (t_read - t_discover).as_micros() as u64,
        "Namespaces read."
    );
    Ok((
        Discovered {
            selected,
            warnings,
            incomplete,
        },
        views,
    ))
}

/// Classifies and orders the listeners of the namespaces read.
fn assemble_phase(
    sys: &dyn System,
    memo: &mut FirewallMemo,
    discovered: &Discovered,
    views: Vec<Result<NetnsView, ReadError>>,
    opts: &ScanOptions,
    started: Instant,
) -> Collected {
    let caps = sys.caps();
    let t0 = started.elapsed();
    let mut warnings = discovered.warnings.clone();
    let selected = &discovered.selected;
    let (listeners, namespaces) = assemble(sys, memo, selected, views, opts, caps, &mut warnings);
    memo.retain(selected);
    let partial = discovered.incomplete
        || namespaces
            .iter()
            .any(|n| n.source != Some(Source::SockDiag));
    tracing::debug!(
        assemble_us = (started.elapsed() - t0).as_micros() as u64,
        "Namespaces assembled."
    );
    Collected {
        listeners,
        namespaces,
        warnings,
        caps,
        partial,
    }
}

/// Publishes an empty wanted set when dropped before the real one was published.
struct PublishEmpty<'a>(&'a OnceLock<FastSet<u64>>);

impl Drop for PublishEmpty<'_> {
    fn drop(&mut self) {
        let _ = self.0.set(FastSet::default());
    }
}

/// Classifies every socket of the namespaces read, marks hidden IPv4 exposure per port,
/// applies the output filters, attributes cgroups and sorts.
#[allow(clippy::too_many_arguments)]
fn assemble(
    sys: &dyn System,
    memo: &mut FirewallMemo,
    selected: &[NetnsEntry],
    views: Vec<Result<crate::model::NetnsView, ReadError>>,
    opts: &ScanOptions,
    caps: crate::os::Caps,
    warnings: &mut Vec<String>,
) -> (Vec<Listener>, Vec<NetnsReport>) {
    let mut listeners = Vec::new();
    let mut namespaces = Vec::new();
    let mut needs_sys_admin = false;
    // Firewall problems, each once with the namespaces it concerns.
    let mut unreadable: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut locals: HashMap<u64, crate::model::LocalAddrs> = HashMap::new();
    for (ns, result) in selected.iter().zip(views) {
        match result {
            Ok(view) => {
                for note in &view.notes {
                    warnings.push(format!("netns {}: {note}", ns.id.name));
                }
                needs_sys_admin |= view.source == Source::Procfs;
                let ifnames: HashMap<u32, &str> =
                    view.ifnames.iter().map(|(i, n)| (*i, n.as_str())).collect();
                if let Some(local) = &view.local {
                    locals.insert(ns.id.inode, local.clone());
                }
                let firewall = memo.get(ns.id.inode, &view);
                for note in &firewall.notes {
                    warnings.push(format!("netns {}: firewall: {note}", ns.id.name));
                }
                if let Some(problem) = &firewall.unreadable {
                    unreadable
                        .entry(problem.clone())
                        .or_default()
                        .push(ns.id.name.clone());
                }
                namespaces.push(NetnsReport {
                    id: ns.id.clone(),
                    source: Some(view.source),
                    listeners: view.sockets.len(),
                    shown: 0,
                    firewall: Some(FirewallReport {
                        sources: firewall.sources.iter().map(|o| o.as_str()).collect(),
                        generation: firewall.generation,
                        problem: firewall.unreadable.clone(),
                    }),
                    ipv6: view.ipv6.clone(),
                });
                let id = Arc::new(ns.id.clone());
                let ipv6 = view
                    .ipv6
                    .as_ref()
                    .map_or(crate::model::Ipv6State::Enabled, |f| f.state);
                listeners.reserve(view.sockets.len());
                for socket in view.sockets {
                    let class = classify(&socket, view.local.as_ref(), ipv6);
                    let effective =
                        firewall.exposure(&socket, &class, view.local.as_ref(), view.ipv6.as_ref());
                    let interface = (socket.ifindex != 0).then(|| {
                        ifnames
                            .get(&socket.ifindex)
                            .map_or_else(|| format!("if#{}", socket.ifindex), |n| n.to_string())
                    });
                    listeners.push(Listener {
                        socket,
                        netns: Arc::clone(&id),
                        source: view.source,
                        interface,
                        class,
                        hidden_ipv4_exposure: false,
                        pids: Vec::new(),
                        cgroup: None,
                        container: None,
                        unit: None,
                        effective,
                    });
                }
            }
            Err(e) => {
                needs_sys_admin |= matches!(e, ReadError::NoAccess | ReadError::Enter(_));
                warnings.push(format!(
                    "netns {} (inode {}) not scanned: {e}",
                    ns.id.name, ns.id.inode
                ));
                namespaces.push(NetnsReport {
                    id: ns.id.clone(),
                    source: None,
                    listeners: 0,
                    shown: 0,
                    firewall: None,
                    ipv6: None,
                });
            }
        }
    }
    for (problem, names) in unreadable {
        warnings.push(format!(
            "firewall verdicts are unknown in netns {}: {problem}",
            names.join(", ")
        ));
    }
    if needs_sys_admin && !caps.has(CAP_SYS_ADMIN) {
        warnings.push(
            "without CAP_SYS_ADMIN other network namespaces are read from /proc/PID/net or not at all: \
             run as root or grant CAP_SYS_ADMIN for the v6only truth there"
                .to_string(),
        );
    }

    let hidden = hidden_ipv4_groups(listeners.iter().map(|l| {
        (
            (l.netns.inode, l.socket.protocol, l.socket.port),
            l.socket.family,
            l.class.reach_ipv4,
        )
    }));
    for l in &mut listeners {
        l.hidden_ipv4_exposure =
            hidden.contains(&(l.netns.inode, l.socket.protocol, l.socket.port));
    }
    link_diverted(&mut listeners, &locals);
    listeners.retain(|l| {
        opts.port.is_none_or(|p| l.socket.port == p)
            && opts.protocols.contains(&l.socket.protocol)
            && (!opts.trap_only || l.class.trap)
    });
    for n in &mut namespaces {
        n.shown = listeners
            .iter()
            .filter(|l| l.netns.inode == n.id.inode)
            .count();
    }
    attach_socket_cgroups(sys, &mut listeners);
    sort_listeners(&mut listeners, &namespaces);
    (listeners, namespaces)
}

/// A port a DNAT sends elsewhere (Docker- or kube-proxy-published) names the listener
/// that receives it in another namespace, and that listener names the host port that
/// publishes it: `diverted to 192.0.2.2:80 (netns X)`, `published through …`.
/// Before the output filters, so a `--port` filter does not hide the other side.
fn link_diverted(listeners: &mut [Listener], locals: &HashMap<u64, crate::model::LocalAddrs>) {
    use std::net::IpAddr;
    let mut links: Vec<(usize, usize, bool)> = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        for (v6, answer) in [(false, &l.effective.ipv4), (true, &l.effective.ipv6)] {
            let Some(to) = &answer.diverted_to else {
                continue;
            };
            for target in to.split(", ") {
                let Some((addr, port)) = target.rsplit_once(':') else {
                    continue;
                };
                let addr = addr.trim_start_matches('[').trim_end_matches(']');
                let (Ok(addr), Ok(port)) = (addr.parse::<IpAddr>(), port.parse::<u16>()) else {
                    continue;
                };
                for (j, other) in listeners.iter().enumerate() {
                    let o = &other.socket;
                    if j == i
                        || other.netns.inode == l.netns.inode
                        || o.protocol != l.socket.protocol
                        || o.port != port
                    {
                        continue;
                    }
                    let owns = locals
                        .get(&other.netns.inode)
                        .is_some_and(|loc| match addr {
                            IpAddr::V4(a) => loc.contains_v4(a),
                            IpAddr::V6(a) => loc.contains_v6(a, 0),
                        });
                    let binds = o.address == addr
                        || (o.address.is_unspecified()
                            && match addr {
                                IpAddr::V4(_) => other.class.reach_ipv4.exposed(),
                                IpAddr::V6(_) => other.class.reach_ipv6.exposed(),
                            });
                    if owns && binds {
                        links.push((i, j, v6));
                    }
                }
            }
        }
    }
    // Every namespace that owns the target is named: normally one; several when
    // namespaces reuse an address (which of them the route leads to is not judged).
    let mut targets: BTreeMap<(usize, bool), Vec<String>> = BTreeMap::new();
    for &(i, j, v6) in &links {
        let names = targets.entry((i, v6)).or_default();
        if !names.contains(&listeners[j].netns.name) {
            names.push(listeners[j].netns.name.clone());
        }
    }
    for ((i, v6), mut names) in targets {
        names.sort();
        let answer = if v6 {
            &mut listeners[i].effective.ipv6
        } else {
            &mut listeners[i].effective.ipv4
        };
        if let Some(to) = &mut answer.diverted_to {
            let list = match names.as_slice() {
                [one] => format!(" (netns {one})"),
                many => format!(" (netns one of {})", many.join(", ")),
            };
            to.push_str(&list);
        }
    }
    for (i, j, v6) in links {
        let (from_ns, from_port) = (listeners[i].netns.name.clone(), listeners[i].socket.port);
        let answer = if v6 {
            &listeners[i].effective.ipv6
        } else {
            &listeners[i].effective.ipv4
        };
        let rule = answer.reason.clone();
        let target = &mut listeners[j].effective;
        let side = if v6 {
            &mut target.ipv6
        } else {
            &mut target.ipv4
        };
        let note = format!("; published as port {from_port} of netns {from_ns} by {rule}");
        if !side.reason.contains(&note) {
            side.reason.push_str(&note);
        }
    }
}

/// Namespace (host first, then by name), protocol, port, family, address, inode.
fn sort_listeners(listeners: &mut [Listener], namespaces: &[NetnsReport]) {
    let mut order: Vec<(bool, &str, u64)> = namespaces
        .iter()
        .map(|n| (n.id.name != "host", n.id.name.as_str(), n.id.inode))
        .collect();
    order.sort_unstable();
    let rank: HashMap<u64, usize> = order.iter().enumerate().map(|(i, o)| (o.2, i)).collect();
    // Keys are computed once and the (large) listeners are moved once, not per comparison.
    listeners.sort_by_cached_key(|l| {
        (
            rank.get(&l.netns.inode).copied().unwrap_or(usize::MAX),
            l.socket.protocol,
            l.socket.port,
            l.socket.family,
            l.socket.address,
            l.socket.inode,
        )
    });
}

fn select(all: &[NetnsEntry], sel: &NetnsSelector) -> Result<Vec<NetnsEntry>, ScanError> {
    let picked: Vec<NetnsEntry> = all.iter().filter(|ns| sel.matches(ns)).cloned().collect();
    if picked.is_empty() && *sel != NetnsSelector::All {
        let known = all
            .iter()
            .map(|ns| format!("{} ({})", ns.id.name, ns.id.inode))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ScanError::NoSuchNetns {
            wanted: sel.to_string(),
            known,
        });
    }
    Ok(picked)
}

/// Reads the namespaces, a few at a time, in the given order.
fn read_all(
    sys: &dyn System,
    selected: &[NetnsEntry],
    protocols: &[Protocol],
) -> Vec<Result<crate::model::NetnsView, ReadError>> {
    let results: Mutex<Vec<Option<Result<_, _>>>> =
        Mutex::new((0..selected.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let workers = selected.len().clamp(1, NETNS_PARALLEL);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(ns) = selected.get(i) else { break };
                    let r = sys.read_netns(ns, protocols);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or(Err(ReadError::Panicked)))
        .collect()
}

/// Reads each namespace's firewall (those read through sock_diag; a /proc/PID/net
/// fallback could not enter it either), in parallel like the sockets.
fn read_firewalls(
    sys: &dyn System,
    selected: &[NetnsEntry],
    mut views: Vec<Result<crate::model::NetnsView, ReadError>>,
) -> Vec<Result<crate::model::NetnsView, ReadError>> {
    let wanted: Vec<usize> = views
        .iter()
        .enumerate()
        .filter(|(_, v)| matches!(v, Ok(v) if v.source == Source::SockDiag))
        .map(|(i, _)| i)
        .collect();
    let results: Mutex<Vec<(usize, Option<crate::os::firewall::RawFirewall>)>> =
        Mutex::new(Vec::with_capacity(wanted.len()));
    let next = AtomicUsize::new(0);
    let workers = wanted.len().clamp(1, NETNS_PARALLEL);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = wanted.get(k) else { break };
                    let raw = sys.read_firewall(&selected[i]);
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, raw));
                }
            });
        }
    });
    for (i, raw) in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        if let Some(Ok(view)) = views.get_mut(i) {
            view.firewall = raw;
        }
    }
    views
}

/// Fills `pids` of every listener from the walk; returns the process table. Processes that
/// exited during the scan are already absent from the walk.
fn attach_owners(
    sys: &dyn System,
    mut walk: crate::os::OwnerWalk,
    listeners: &mut [Listener],
    warnings: &mut Vec<String>,
    caps: crate::os::Caps,
) -> BTreeMap<u32, ProcessInfo> {
    let mut by_pid: HashMap<u32, Option<String>> = HashMap::new();
    let mut attributed: HashMap<String, Attribution> = HashMap::new();
    for l in listeners.iter_mut() {
        // Each inode belongs to one listener: take the pids instead of copying them.
        if let Some(mut pids) = walk.by_inode.remove(&l.socket.inode) {
            pids.sort_unstable();
            l.pids = pids;
        }
        // Fallback attribution: the socket's own cgroup was not found, its owner's may be.
        if l.cgroup.is_none()
            && let Some(&pid) = l.pids.first()
            && let Some(path) = by_pid
                .entry(pid)
                .or_insert_with(|| sys.process_cgroup(pid))
                .clone()
        {
            apply_attribution(l, path, &mut attributed);
        }
    }
    if walk.denied > 0 {
        warnings.push(format!(
            "could not read the open files of {}: {} sockets show no owner ({})",
            count(walk.denied, "process", "processes"),
            if walk.denied == 1 { "its" } else { "their" },
            ptrace_hint(caps)
        ));
    }
    walk.processes.into_iter().collect()
}

type Attribution = (Option<crate::model::Container>, Option<String>);

fn apply_attribution(l: &mut Listener, path: String, cache: &mut HashMap<String, Attribution>) {
    let (container, unit) = cache
        .entry(path.clone())
        .or_insert_with(|| attribution::attribute(&path));
    l.container = container.clone();
    l.unit = unit.clone();
    l.cgroup = Some(path);
}

/// `1 process`, `2 processes`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Which capability would let us look at other processes, or why having it did not help.
fn ptrace_hint(caps: crate::os::Caps) -> String {
    let missing: Vec<&str> = [
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    ]
    .iter()
    .filter(|(c, _)| !caps.has(*c))
    .map(|(_, n)| *n)
    .collect();
    if missing.is_empty() {
        "denied despite CAP_SYS_PTRACE: those processes are not dumpable or a security module refused".to_string()
    } else {
        // Said once: "run as root, or grant the missing ones".
        format!(
            "run as root, or grant {} (reading other users' processes needs \
             CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)",
            missing.join(" and ")
        )
    }
}

/// cgroup path, container and unit of every listener whose socket cgroup id resolves
/// (many sockets share a cgroup: each path is attributed once).
fn attach_socket_cgroups(sys: &dyn System, listeners: &mut [Listener]) {
    let ids: FastSet<u64> = listeners
        .iter()
        .filter_map(|l| l.socket.cgroup_id)
        .collect();
    let paths = sys.cgroup_paths(&ids);
    let mut attributed: HashMap<String, Attribution> = HashMap::new();
    for l in listeners.iter_mut() {
        if let Some(path) = l.socket.cgroup_id.and_then(|id| paths.get(&id)) {
            apply_attribution(l, path.clone(), &mut attributed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, LocalAddrs, NetnsView, RawSocket, Reach};
    use crate::os::{Caps, Discovery, OwnerWalk};
    use std::net::IpAddr;

    /// A system made of plain values.
    #[derive(Default)]
    struct Fake {
        namespaces: Vec<(NetnsEntry, Result<Vec<RawSocket>, ()>)>,
        owners: HashMap<u64, Vec<u32>>,
        processes: HashMap<u32, ProcessInfo>,
        cgroups: HashMap<u64, String>,
        denied: usize,
        caps: u64,
    }

    impl System for Fake {
        fn discover(&self) -> Discovery {
            Discovery {
                namespaces: self.namespaces.iter().map(|(n, _)| n.clone()).collect(),
                unreadable_pids: 0,
                host_unknown: false,
            }
        }
        fn read_netns(
            &self,
            ns: &NetnsEntry,
            protocols: &[Protocol],
        ) -> Result<NetnsView, ReadError> {
            let (_, r) = self.namespaces.iter().find(|(n, _)| n.id == ns.id).unwrap();
            let sockets = r.clone().map_err(|()| ReadError::NoAccess)?;
            Ok(NetnsView {
                sockets: sockets
                    .into_iter()
                    .filter(|s| protocols.contains(&s.protocol))
                    .collect(),
                local: Some(LocalAddrs {
                    v4: vec![
                        ("127.0.0.0".parse().unwrap(), 8),
                        ("10.0.0.1".parse().unwrap(), 32),
                    ],
                    v6: vec![("::1".parse().unwrap(), 128, 1)],
                }),
                ifnames: vec![(2, "eth0".into())],
                source: Source::SockDiag,
                notes: vec![],
                ipv6: None,
                firewall: None,
                routes: vec![],
            })
        }
        fn owners(&self, wanted: &OnceLock<FastSet<u64>>) -> OwnerWalk {
            let wanted = wanted.wait();
            // Like the real walk: a pid that cannot be described (exited) is dropped.
            let alive = |pids: &Vec<u32>| -> Vec<u32> {
                pids.iter()
                    .copied()
                    .filter(|p| self.processes.contains_key(p))
                    .collect()
            };
            OwnerWalk {
                processes: self.processes.clone().into_iter().collect(),
                by_inode: self
                    .owners
                    .iter()
                    .filter(|(i, _)| wanted.contains(i))
                    .map(|(i, p)| (*i, alive(p)))
                    .filter(|(_, p)| !p.is_empty())
                    .collect(),
                denied: self.denied,
            }
        }
        fn cgroup_paths(&self, ids: &FastSet<u64>) -> HashMap<u64, String> {
            self.cgroups
                .iter()
                .filter(|(i, _)| ids.contains(i))
                .map(|(i, p)| (*i, p.clone()))
                .collect()
        }
        fn process_cgroup(&self, _pid: u32) -> Option<String> {
            Some("/system.slice/fallback.service".into())
        }
        fn hostname(&self) -> String {
            "h1".into()
        }
        fn caps(&self) -> Caps {
            Caps(self.caps)
        }
    }

    fn ns(inode: u64, name: &str, current: bool) -> NetnsEntry {
        NetnsEntry {
            id: NetnsId {
                inode,
                name: name.into(),
            },
            current,
            handles: vec![],
            pids: vec![],
        }
    }

    fn sock(proto: Protocol, addr: &str, port: u16, v6only: Option<bool>, inode: u64) -> RawSocket {
        let address: IpAddr = addr.parse().unwrap();
        RawSocket {
            protocol: proto,
            family: if address.is_ipv4() {
                Family::Ipv4
            } else {
                Family::Ipv6
            },
            address,
            port,
            v6only,
            ifindex: 0,
            freebind: None,
            transparent: None,
            uid: 0,
            inode,
            cgroup_id: Some(inode + 1000),
        }
    }

    fn proc(pid: u32, comm: &str) -> (u32, ProcessInfo) {
        (
            pid,
            ProcessInfo {
                pid,
                comm: comm.into(),
                cmdline: comm.into(),
                user: "root".into(),
            },
        )
    }

    fn fake() -> Fake {
        let mut blue = ns(100, "blue", false);
        blue.handles = vec![
            "/run/netns/blue".into(),
            "/run/docker/netns/b1".into(),
            "/proc/4242/ns/net".into(),
        ];
        Fake {
            namespaces: vec![
                (
                    blue,
                    Ok(vec![sock(Protocol::Udp, "::", 53, Some(false), 7)]),
                ),
                (
                    ns(1, "host", true),
                    Ok(vec![
                        sock(Protocol::Tcp, "::", 80, Some(false), 1),
                        sock(Protocol::Tcp, "0.0.0.0", 22, None, 2),
                        sock(Protocol::Tcp, "::", 22, Some(true), 3),
                        sock(Protocol::Tcp, "10.9.9.9", 8080, None, 4),
                    ]),
                ),
                (ns(200, "red", false), Err(())),
            ],
            owners: HashMap::from([
                (1, vec![12, 11]),
                (2, vec![20]),
                (3, vec![20]),
                (7, vec![99]),
            ]),
            // pid 99 exited between the walk and the process read.
            processes: HashMap::from([proc(11, "apache2"), proc(12, "apache2"), proc(20, "sshd")]),
            cgroups: HashMap::from([(1001, "/system.slice/apache2.service".into())]),
            denied: 0,
            caps: u64::MAX,
        }
    }

    fn rows(inv: &Inventory) -> Vec<String> {
        inv.listeners
            .iter()
            .map(|l| {
                format!(
                    "{} {} {} {}/{} trap={} hidden={} pids={:?}",
                    l.netns.name,
                    l.class.netstat_proto,
                    l.class.shown_as,
                    l.class.reach_ipv4.as_str(),
                    l.class.reach_ipv6.as_str(),
                    l.class.trap,
                    l.hidden_ipv4_exposure,
                    l.pids
                )
            })
            .collect()
    }

    #[test]
    fn whole_scan() {
        let inv = scan(&fake(), &ScanOptions::default()).unwrap();
        assert_eq!(
            rows(&inv),
            [
                "host tcp 0.0.0.0:22 any/none trap=false hidden=false pids=[20]",
                "host tcp6 :::22 none/any trap=false hidden=false pids=[20]",
                "host tcp6 :::80 any/any trap=true hidden=true pids=[11, 12]",
                "host tcp 10.9.9.9:8080 none/none trap=false hidden=false pids=[]",
                "blue udp6 :::53 any/any trap=true hidden=true pids=[]",
            ]
        );
        assert!(inv.listeners[3].class.latent);
        assert_eq!(
            inv.processes.keys().copied().collect::<Vec<_>>(),
            [11, 12, 20]
        );
        // Unreadable namespace: a warning, the rest still scanned.
        assert!(
            inv.warnings
                .iter()
                .any(|w| w.contains("netns red (inode 200) not scanned")),
            "{:?}",
            inv.warnings
        );
        // Unit from the socket's cgroup id, else from the owner's cgroup.
        assert_eq!(inv.listeners[2].unit.as_deref(), Some("apache2.service"));
        assert_eq!(inv.listeners[0].unit.as_deref(), Some("fallback.service"));
        assert_eq!(inv.listeners[3].unit, None);
        assert_eq!(inv.host, "h1");
    }

    #[test]
    fn filters_do_not_change_port_facts() {
        let opts = ScanOptions {
            port: Some(80),
            ..ScanOptions::default()
        };
        let inv = scan(&fake(), &opts).unwrap();
        assert_eq!(
            rows(&inv),
            ["host tcp6 :::80 any/any trap=true hidden=true pids=[11, 12]"]
        );

        let opts = ScanOptions {
            trap_only: true,
            protocols: vec![Protocol::Udp],
            ..ScanOptions::default()
        };
        let inv = scan(&fake(), &opts).unwrap();
        assert_eq!(
            rows(&inv),
            ["blue udp6 :::53 any/any trap=true hidden=true pids=[]"]
        );
    }

    /// `namespaces[].listeners` counts what a namespace holds, whatever the filters show;
    /// `shown` counts what they let through.
    #[test]
    fn namespace_counts_ignore_filters() {
        let counts = |opts: ScanOptions| {
            let inv = scan(&fake(), &opts).unwrap();
            inv.namespaces
                .iter()
                .map(|n| (n.id.name.clone(), n.listeners, n.shown))
                .collect::<Vec<_>>()
        };
        let name = |s: &str| s.to_string();
        assert_eq!(
            counts(ScanOptions::default()),
            [
                (name("host"), 4, 4),
                (name("blue"), 1, 1),
                (name("red"), 0, 0)
            ]
        );
        assert_eq!(
            counts(ScanOptions {
                protocols: vec![Protocol::Udp],
                ..ScanOptions::default()
            }),
            [
                (name("host"), 4, 0),
                (name("blue"), 1, 1),
                (name("red"), 0, 0)
            ]
        );
        assert_eq!(
            counts(ScanOptions {
                port: Some(22),
                protocols: vec![Protocol::Tcp],
                ..ScanOptions::default()
            }),
            [
                (name("host"), 4, 2),
                (name("blue"), 1, 0),
                (name("red"), 0, 0)
            ]
        );
    }

    #[test]
    fn warnings_count_in_words() {
        let mut f = fake();
        f.denied = 1;
        let inv = scan(&f, &ScanOptions::default()).unwrap();
        let w = inv.warnings.join("\n");
        assert!(w.contains("open files of 1 process: its sockets"), "{w}");
        assert_eq!(count(2, "process", "processes"), "2 processes");
    }

    #[test]
    fn netns_selection() {
        let pick = |s: &str| {
            let opts = ScanOptions {
                netns: s.parse().unwrap(),
                ..ScanOptions::default()
            };
            scan(&fake(), &opts).map(|inv| {
                inv.namespaces
                    .iter()
                    .map(|n| n.id.name.clone())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(pick("current").unwrap(), ["host"]);
        assert_eq!(pick("blue").unwrap(), ["blue"]);
        assert_eq!(pick("100").unwrap(), ["blue"]);
        // As documented (README, docs/scan-json.md): net:[INODE] and /run/netns/NAME.
        assert_eq!(pick("net:[100]").unwrap(), ["blue"]);
        assert_eq!(pick("/run/netns/blue").unwrap(), ["blue"]);
        // Any path discovery reached it by.
        assert_eq!(pick("/run/docker/netns/b1").unwrap(), ["blue"]);
        assert_eq!(pick("/proc/4242/ns/net").unwrap(), ["blue"]);
        assert!(pick("/run/netns/green").is_err());
        assert!(pick("/run/docker/netns").is_err());
        assert_eq!(pick("all").unwrap(), ["host", "blue", "red"]);
        let err = pick("net:[7]").unwrap_err().to_string();
        assert!(err.contains("--netns net:[7]"), "{err}");
        assert!(
            "net:[x]"
                .parse::<NetnsSelector>()
                .unwrap_err()
                .contains("must be a number")
        );
        let err = pick("green").unwrap_err().to_string();
        assert!(
            err.contains("--netns green") && err.contains("blue (100)"),
            "{err}"
        );
        assert!("".parse::<NetnsSelector>().is_err());
    }

    #[test]
    fn says_what_it_could_not_see() {
        let mut f = fake();
        f.denied = 3;
        f.caps = 0;
        let inv = scan(&f, &ScanOptions::default()).unwrap();
        let w = inv.warnings.join("\n");
        assert!(
            w.contains("open files of 3 processes")
                && w.contains("run as root, or grant CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"),
            "{w}"
        );
        // The capabilities are named once per warning, not as "needs X; missing X".
        assert!(!w.contains("missing CAP_SYS_PTRACE"), "{w}");
        assert!(w.contains("CAP_SYS_ADMIN"), "{w}");
    }

    #[test]
    fn v6only_unknown_stays_unknown() {
        let mut f = fake();
        f.namespaces = vec![(
            ns(1, "host", true),
            Ok(vec![sock(Protocol::Tcp, "::", 80, None, 1)]),
        )];
        let inv = scan(&f, &ScanOptions::default()).unwrap();
        let l = &inv.listeners[0];
        assert_eq!(
            (l.class.reach_ipv4, l.class.trap, l.hidden_ipv4_exposure),
            (Reach::Unknown, false, false)
        );
    }

    /// `run` scans every interval: an unchanged namespace's firewall is not assembled (nor
    /// its answers computed) again; a changed reading, route or address is.
    #[test]
    fn firewall_memo_rebuilds_only_on_change() {
        let raw = crate::os::firewall::RawFirewall {
            generation: Some(7),
            ..Default::default()
        };
        let mut view = NetnsView {
            sockets: vec![],
            local: None,
            ifnames: vec![],
            source: Source::SockDiag,
            notes: vec![],
            ipv6: None,
            firewall: Some(raw),
            routes: vec![],
        };
        let mut memo = FirewallMemo::default();
        memo.get(1, &view);
        memo.get(1, &view);
        assert_eq!(memo.built, 1);
        view.routes
            .push(("10.0.0.0".parse().unwrap(), 8, "eth0".into()));
        memo.get(1, &view);
        assert_eq!(memo.built, 2);
        if let Some(raw) = &mut view.firewall {
            raw.generation = Some(8);
        }
        memo.get(1, &view);
        memo.get(2, &view);
        assert_eq!(memo.built, 4);
        memo.retain(&[]);
        assert!(memo.entries.is_empty());
    }
}
