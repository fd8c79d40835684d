//! The seam between the agent and Linux. Every netlink call, `setns`, `/proc` read and
//! `unsafe` block of the agent lives under this module; everything above it goes through
//! the [`System`] trait and takes plain values, so the scan logic is tested with a fake
//! system and without root (`scan.rs` tests), while `tests/` drive the real one.

pub mod doorbell;
pub mod firewall;
pub mod netlink;
pub mod netns;
pub mod procfs;

use std::collections::HashMap;

use crate::fasthash::FastSet;
use std::io;
use std::sync::OnceLock;

use crate::model::{Family, Ipv6Facts, Ipv6State, LocalAddrs, NetnsView, Protocol, Source};
pub use netns::{Discovery, NetnsEntry};
pub use procfs::{Caps, OwnerWalk};

/// Why one namespace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot enter it: {0}")]
    Enter(#[source] io::Error),
    #[error("sock_diag dump failed: {0}")]
    Dump(#[from] netlink::DumpError),
    #[error(
        "not allowed to enter it and no process of it is left to read /proc/PID/net from \
         (entering another network namespace needs CAP_SYS_ADMIN)"
    )]
    NoAccess,
    #[error("reading /proc/{pid}/net failed: {source}")]
    Procfs { pid: u32, source: io::Error },
    #[error("the namespace reader thread panicked")]
    Panicked,
}

/// What the scan needs from the operating system.
pub trait System: Sync {
    /// Every network namespace this process can find.
    fn discover(&self) -> Discovery;
    /// The listening sockets, local addresses and interface names of one namespace.
    fn read_netns(&self, ns: &NetnsEntry, protocols: &[Protocol]) -> Result<NetnsView, ReadError>;
    /// The namespace's firewall rulesets, raw (`None` when it cannot be entered). Called
    /// after the sockets are read, so it overlaps the owner walk instead of delaying it.
    fn read_firewall(&self, _ns: &NetnsEntry) -> Option<firewall::RawFirewall> {
        None
    }
    /// Which processes hold which of the `wanted` socket inodes, and who they are.
    /// `wanted` may be published after the call starts (the walk overlaps the dumps); the
    /// caller must publish it eventually, even on failure (an empty set ends the walk).
    fn owners(&self, wanted: &OnceLock<FastSet<u64>>) -> OwnerWalk;
    /// cgroup id → cgroup v2 path, for the ids it can find.
    fn cgroup_paths(&self, ids: &FastSet<u64>) -> HashMap<u64, String>;
    /// A process's own cgroup path (fallback when the socket's cgroup id is not found).
    fn process_cgroup(&self, pid: u32) -> Option<String>;
    fn hostname(&self) -> String;
    fn caps(&self) -> Caps;
}

/// The real thing.
#[derive(Debug, Default)]
pub struct LinuxSystem {
    passwd: OnceLock<procfs::Passwd>,
    /// Firewall readings kept across scans: a namespace's rulesets are read again only
    /// when its nftables generation or legacy tables changed (see `firewall.rs`).
    firewall: std::sync::Mutex<firewall::FirewallCache>,
    firewall_opts: firewall::ReadOptions,
}

impl LinuxSystem {
    pub fn new() -> Self {
        Self::default()
    }
}

fn walk_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

impl System for LinuxSystem {
    fn discover(&self) -> Discovery {
        let found = netns::discover();
        // The firewall cache holds at most the namespaces that still exist.
        if let Ok(mut cache) = self.firewall.lock() {
            cache.retain(|inode| found.namespaces.iter().any(|n| n.id.inode == inode));
        }
        found
    }

    fn read_netns(&self, ns: &NetnsEntry, protocols: &[Protocol]) -> Result<NetnsView, ReadError> {
        // This process's own namespace: no thread of ours ever leaves it except the
        // dedicated ones below, so the calling thread is in it.
        if ns.current {
            return read_current_netns(protocols);
        }
        // A dedicated thread: setns changes only the calling thread, and that thread is
        // thrown away afterwards, so no other work ever runs in a borrowed namespace.
        let entered = std::thread::scope(|s| {
            s.spawn(|| {
                netns::enter(&ns.handles, ns.id.inode).map_err(ReadError::Enter)?;
                read_current_netns(protocols)
            })
            .join()
            .unwrap_or(Err(ReadError::Panicked))
        });
        match entered {
            Err(ReadError::Enter(e)) if e.kind() == io::ErrorKind::PermissionDenied => {
                read_via_procfs(ns, protocols)
            }
            other => other,
        }
    }

    fn read_firewall(&self, ns: &NetnsEntry) -> Option<firewall::RawFirewall> {
        if ns.current {
            return Some(self.firewall_here(ns.id.inode));
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                netns::enter(&ns.handles, ns.id.inode).ok()?;
                Some(self.firewall_here(ns.id.inode))
            })
            .join()
            .ok()
            .flatten()
        })
    }

    fn owners(&self, wanted: &OnceLock<FastSet<u64>>) -> OwnerWalk {
        let passwd = self.passwd.get_or_init(procfs::Passwd::load);
        procfs::walk_socket_owners(&procfs::pids(), wanted, walk_threads(), passwd)
    }

    fn cgroup_paths(&self, ids: &FastSet<u64>) -> HashMap<u64, String> {
        procfs::cgroup_paths(ids)
    }

    fn process_cgroup(&self, pid: u32) -> Option<String> {
        procfs::process_cgroup(pid)
    }

    fn hostname(&self) -> String {
        procfs::hostname()
    }

    fn caps(&self) -> Caps {
        Caps::current()
    }
}

impl LinuxSystem {
    /// The calling thread's namespace's firewall: the cached reading unless the cheap
    /// probe (nftables generation, legacy tables) says it changed.
    fn firewall_here(&self, inode: u64) -> firewall::RawFirewall {
        let probe = firewall::probe_current();
        let now = std::time::Instant::now();
        if let Ok(cache) = self.firewall.lock()
            && !cache.needs_read(inode, &probe, now)
            && let Some(raw) = cache.get(inode)
        {
            return raw.clone();
        }
        let raw = firewall::read_current(&self.firewall_opts);
        if let Ok(mut cache) = self.firewall.lock() {
            cache.insert(inode, raw.clone(), now);
        }
        raw
    }
}

/// Reads the calling thread's namespace through netlink.
fn read_current_netns(protocols: &[Protocol]) -> Result<NetnsView, ReadError> {
    let mut notes = Vec::new();
    let mut diag = netlink::Netlink::sock_diag().map_err(netlink::DumpError::Io)?;
    let mut sockets = Vec::new();
    let mut ipv6_missing = false;
    for &protocol in protocols {
        for family in [Family::Ipv4, Family::Ipv6] {
            match diag.dump_sockets(protocol, family, &mut sockets) {
                Ok(()) => {}
                Err(netlink::DumpError::Unsupported) if family == Family::Ipv6 => {
                    ipv6_missing = true
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if ipv6_missing {
        notes.push(
            "IPv6 is not available in this namespace (disabled at boot?): IPv4 only".to_string(),
        );
    }
    let local = match read_local_addrs() {
        Ok(l) => Some(l),
        Err(e) => {
            notes.push(format!(
                "local routing table unreadable ({e}): latent binds not judged"
            ));
            None
        }
    };
    let ipv6 = if ipv6_missing {
        Some(Ipv6Facts {
            state: Ipv6State::Unavailable,
            reason: Some("the kernel has no IPv6 (ipv6.disable=1 at boot?)".to_string()),
        })
    } else {
        ipv6_facts(local.as_ref(), &mut notes)
    };
    let mut ifindexes: Vec<u32> = sockets
        .iter()
        .map(|s| s.ifindex)
        .filter(|&i| i != 0)
        .collect();
    ifindexes.sort_unstable();
    ifindexes.dedup();
    let ifnames = ifindexes.into_iter().map(|i| (i, ifname(i))).collect();
    let routes = match read_routes() {
        Ok(r) => r,
        Err(e) => {
            notes.push(format!(
                "main routing table unreadable ({e}): where DNAT targets lead is not judged"
            ));
            Vec::new()
        }
    };
    Ok(NetnsView {
        sockets,
        local,
        ifnames,
        source: Source::SockDiag,
        notes,
        ipv6,
        firewall: None,
        routes,
    })
}

/// Whether the calling thread's namespace's interfaces take IPv6. An IPv6 address on an
/// interface other than `lo` settles it with nothing read (the usual case); otherwise
/// `disable_ipv6` of each interface is read (one small file per interface).
fn ipv6_facts(local: Option<&LocalAddrs>, notes: &mut Vec<String>) -> Option<Ipv6Facts> {
    if local.is_some_and(crate::classify::ipv6_on_a_non_loopback_interface) {
        return Some(Ipv6Facts {
            state: Ipv6State::Enabled,
            reason: None,
        });
    }
    match procfs::ipv6_disabled_per_interface() {
        Ok(interfaces) => Some(crate::classify::ipv6_state(&interfaces)),
        Err(e) => {
            notes.push(format!(
                "/proc/sys/net/ipv6/conf unreadable ({e}): whether IPv6 is disabled on the \
                 interfaces is not judged (IPv6 reach is reported as if it were enabled)"
            ));
            None
        }
    }
}

fn read_routes() -> Result<Vec<(std::net::IpAddr, u8, String)>, netlink::DumpError> {
    let mut rt = netlink::Netlink::route()?;
    let mut routes = Vec::new();
    rt.main_routes(Family::Ipv4, &mut routes)?;
    match rt.main_routes(Family::Ipv6, &mut routes) {
        Ok(()) | Err(netlink::DumpError::Unsupported) => {}
        Err(e) => return Err(e),
    }
    let mut names: HashMap<u32, String> = HashMap::new();
    Ok(routes
        .into_iter()
        .filter(|r| r.oif != 0)
        .map(|r| {
            let name = names.entry(r.oif).or_insert_with(|| ifname(r.oif)).clone();
            (r.dst, r.len, name)
        })
        .collect())
}

fn read_local_addrs() -> Result<LocalAddrs, netlink::DumpError> {
    let mut rt = netlink::Netlink::route()?;
    let mut local = LocalAddrs::default();
    rt.local_addrs(Family::Ipv4, &mut local)?;
    match rt.local_addrs(Family::Ipv6, &mut local) {
        Ok(()) | Err(netlink::DumpError::Unsupported) => {}
        Err(e) => return Err(e),
    }
    Ok(local)
}

/// Interface name in the calling thread's namespace; `if#N` when it is gone.
fn ifname(index: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` is a writable array of IF_NAMESIZE bytes, the size if_indextoname
    // requires; it writes at most that many bytes, NUL included, and keeps no pointer.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return format!("if#{index}");
    }
    match std::ffi::CStr::from_bytes_until_nul(&buf) {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(_) => format!("if#{index}"), // no NUL: not what the C library promises
    }
}

/// Fallback without CAP_SYS_ADMIN: a member process's `/proc/PID/net` tables.
fn read_via_procfs(ns: &NetnsEntry, protocols: &[Protocol]) -> Result<NetnsView, ReadError> {
    let mut last = None;
    for &pid in &ns.pids {
        match procfs::proc_net_sockets(pid, protocols) {
            Ok(sockets) => {
                return Ok(NetnsView {
                    sockets,
                    local: None,
                    ifnames: Vec::new(),
                    source: Source::Procfs,
                    ipv6: None,
                    firewall: None,
                    routes: Vec::new(),
                    notes: vec![format!(
                        "read from /proc/{pid}/net: v6only, bound interface and latent binds are \
                         unknown here (entering the namespace needs CAP_SYS_ADMIN)"
                    )],
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // exited
            Err(e) => last = Some(ReadError::Procfs { pid, source: e }),
        }
    }
    Err(last.unwrap_or(ReadError::NoAccess))
}

/// The C library's own `inet_ntop(AF_INET6, …)`: the reference the classifier's
/// `glibc_ntop6` is held to in its tests.
#[cfg(test)]
pub(crate) fn libc_inet_ntop6(a: std::net::Ipv6Addr) -> String {
    // glibc's <arpa/inet.h>; the libc crate does not declare it.
    unsafe extern "C" {
        fn inet_ntop(
            af: libc::c_int,
            src: *const libc::c_void,
            dst: *mut libc::c_char,
            size: libc::socklen_t,
        ) -> *const libc::c_char;
    }
    const INET6_ADDRSTRLEN: usize = 46;
    let src = a.octets();
    let mut buf = [0u8; INET6_ADDRSTRLEN];
    // SAFETY: `src` is the 16-byte in6_addr AF_INET6 needs; `buf` is writable for
    // INET6_ADDRSTRLEN bytes, the size passed, which inet_ntop never exceeds (NUL
    // included); neither pointer is kept after the call.
    let p = unsafe {
        inet_ntop(
            libc::AF_INET6,
            src.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            INET6_ADDRSTRLEN as libc::socklen_t,
        )
    };
    assert!(!p.is_null(), "inet_ntop failed for {a:?}");
    match std::ffi::CStr::from_bytes_until_nul(&buf) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => panic!("inet_ntop wrote no NUL for {a:?}"),
    }
}
