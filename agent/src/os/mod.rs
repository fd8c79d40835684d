//! The seam between the agent and Linux. Every netlink call, `setns`, `/proc` read and
//! `unsafe` block of the agent lives under this module; everything above it goes through
//! the [`System`] trait and takes plain values, so the scan logic is tested with a fake
//! system and without root (`scan.rs` tests), while `tests/` drive the real one.

pub mod doorbell;
pub mod firewall;
pub mod heap;
pub mod netlink;
pub mod netns;
pub mod procfs;
pub mod udp_gone;

use std::collections::HashMap;

use crate::fasthash::FastSet;
use std::io;
use std::sync::OnceLock;

use crate::model::{
    Family, Ipv6Facts, Ipv6State, LocalAddrs, NetnsView, Protocol, RawSocket, Source,
};
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
    /// Which of `pids` hold which of the `wanted` socket inodes (the targeted lookup of
    /// `run`: the processes an event named, before a whole walk).
    fn owners_of(&self, pids: &[u32], wanted: &FastSet<u64>) -> OwnerWalk {
        let _ = (pids, wanted);
        OwnerWalk::default()
    }
    /// The socket dumps and local addresses of a namespace read again through netlink
    /// sockets kept from an earlier [`System::read_netns`] of it: no thread, no `setns`.
    /// `None` when none are kept (read it with `read_netns`).
    fn reread(&self, ns: &NetnsEntry, protocols: &[Protocol]) -> Option<Result<Reread, ReadError>> {
        let _ = (ns, protocols);
        None
    }
    /// Waits up to `timeout` (`None`: forever) for notices of UDP sockets destroyed in the
    /// namespaces read so far and appends them to `out`. `Ok(false)` when this system
    /// watches none (one-shot scans, or the subscription could not be made).
    fn udp_gone(
        &self,
        timeout: Option<std::time::Duration>,
        out: &mut Vec<udp_gone::Gone>,
    ) -> io::Result<bool> {
        let _ = (timeout, out);
        Ok(false)
    }
    /// From now on, every namespace read subscribes to its destroyed-UDP notices (only
    /// worth it when something waits on [`System::udp_gone`]: the doorbell's thread).
    fn want_udp_gone(&self) {}
    /// The network namespace inode of a process or thread; `None` when it is gone.
    fn netns_of(&self, pid: u32) -> Option<u64> {
        let _ = pid;
        None
    }
    /// A process's start time (with the pid, it names one process for good).
    fn start_time(&self, pid: u32) -> Option<u64> {
        let _ = pid;
        None
    }
    /// cgroup id → cgroup v2 path, for the ids it can find.
    fn cgroup_paths(&self, ids: &FastSet<u64>) -> HashMap<u64, String>;
    /// A process's own cgroup path (fallback when the socket's cgroup id is not found).
    fn process_cgroup(&self, pid: u32) -> Option<String>;
    fn hostname(&self) -> String;
    fn caps(&self) -> Caps;
}

/// What [`System::reread`] returns: the part of a [`NetnsView`] that changes with sockets.
#[derive(Debug)]
pub struct Reread {
    pub sockets: Vec<RawSocket>,
    pub local: Option<LocalAddrs>,
}

/// Most namespaces whose netlink sockets are kept open (three descriptors each, with the
/// destroyed-UDP subscription). Past it, a namespace is read on a thread of its own each
/// time, as `scan` does. Lowered to what the open-file limit allows.
const PARKED_MAX: usize = 2048;
/// Descriptors left for everything else (the fd walk, the perf rings, TLS, the journal).
const FD_RESERVE: u64 = 256;

/// A namespace's sock_diag and rtnetlink sockets, opened on a thread inside it and kept.
#[derive(Debug)]
struct NsSockets {
    diag: netlink::Parked,
    route: netlink::Parked,
}

/// The real thing.
#[derive(Debug, Default)]
pub struct LinuxSystem {
    passwd: OnceLock<procfs::Passwd>,
    /// Netlink sockets per namespace inode, kept across reads when `keep_sockets` is set
    /// (`run`): a socket opened inside a namespace keeps answering for it from any
    /// thread, so a re-read needs no thread and no `setns`. Each holds its namespace
    /// alive: `discover` drops those no longer found.
    parked: std::sync::Mutex<HashMap<u64, NsSockets>>,
    keep_sockets: bool,
    /// How many namespaces may keep sockets ([`PARKED_MAX`] or what the fd limit allows).
    parked_max: usize,
    /// Destroyed-UDP subscriptions of the namespaces read (with `keep_sockets`), made
    /// once `want_udp_gone` was called.
    gone: Option<udp_gone::UdpGone>,
    gone_wanted: std::sync::atomic::AtomicBool,
    /// Firewall readings kept across scans: a namespace's rulesets are read again only
    /// when its nftables generation or legacy tables changed (see `firewall.rs`).
    firewall: std::sync::Mutex<firewall::FirewallCache>,
    firewall_opts: firewall::ReadOptions,
}

impl LinuxSystem {
    pub fn new() -> Self {
        Self::default()
    }

    /// For the long-running agent: every namespace read keeps its netlink sockets open for
    /// [`System::reread`].
    pub fn keeping_sockets() -> Self {
        let gone = udp_gone::UdpGone::new()
            .map_err(|e| tracing::warn!(error = %e, "No epoll set for UDP close notices: UDP closes are seen at the next whole scan."))
            .ok();
        let limit = raise_fd_limit();
        let parked_max = limit.map_or(PARKED_MAX, |l| {
            (l.saturating_sub(FD_RESERVE) / 3).min(PARKED_MAX as u64) as usize
        });
        LinuxSystem {
            keep_sockets: true,
            parked_max,
            gone,
            ..Self::default()
        }
    }

    /// Subscribes to the calling thread's namespace's destroyed-UDP notices, unless
    /// already done or not wanted.
    fn subscribe_here(&self, inode: u64) -> Option<netlink_sys::Socket> {
        let gone = self.gone.as_ref()?;
        if !gone.watches(inode) && gone.len() >= self.parked_max {
            return None;
        }
        if !self.gone_wanted.load(std::sync::atomic::Ordering::Relaxed) || gone.watches(inode) {
            return None;
        }
        udp_gone::UdpGone::subscribe_here()
            .map_err(|e| tracing::debug!(error = %e, "No UDP close notices for a namespace."))
            .ok()
    }

    fn watch_gone(&self, inode: u64, socket: Option<netlink_sys::Socket>) {
        if let (Some(gone), Some(socket)) = (&self.gone, socket)
            && let Err(e) = gone.add(inode, socket)
        {
            tracing::debug!(error = %e, "Cannot watch a namespace's UDP close notices.");
        }
    }

    fn park(&self, inode: u64, sockets: Option<NsSockets>) {
        let Some(sockets) = sockets else { return };
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if parked.len() < self.parked_max || parked.contains_key(&inode) {
            parked.insert(inode, sockets);
        }
    }
}

/// Raises the soft open-file limit to the hard one (the agent keeps sockets per
/// namespace; systemd's default soft limit is 1024) and returns the limit in force
/// (`None`: unlimited or unreadable).
fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live, writable rlimit; getrlimit writes one there, keeps nothing.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a live rlimit the kernel copies; no pointer is kept.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            lim = raised;
        }
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Opens the sockets a later [`System::reread`] uses, in the calling thread's namespace.
fn open_ns_sockets() -> Option<NsSockets> {
    Some(NsSockets {
        diag: netlink::Netlink::sock_diag().ok()?.park(),
        route: netlink::Netlink::route().ok()?.park(),
    })
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
        // Dropping the sockets of a namespace no longer found lets the kernel free it.
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|inode, _| found.namespaces.iter().any(|n| n.id.inode == *inode));
        if let Some(gone) = &self.gone {
            gone.retain(|inode| found.namespaces.iter().any(|n| n.id.inode == inode));
        }
        found
    }

    fn read_netns(&self, ns: &NetnsEntry, protocols: &[Protocol]) -> Result<NetnsView, ReadError> {
        let keep = self.keep_sockets;
        // This process's own namespace: no thread of ours ever leaves it except the
        // dedicated ones below, so the calling thread is in it.
        if ns.current {
            let view = read_current_netns(protocols)?;
            self.park(ns.id.inode, keep.then(open_ns_sockets).flatten());
            self.watch_gone(ns.id.inode, self.subscribe_here(ns.id.inode));
            return Ok(view);
        }
        // A dedicated thread: setns changes only the calling thread, and that thread is
        // thrown away afterwards, so no other work ever runs in a borrowed namespace. The
        // sockets it opens for later re-reads are the only thing that outlives it: a
        // socket belongs to the namespace it was opened in, whichever thread uses it.
        let entered = std::thread::scope(|s| {
            s.spawn(|| {
                netns::enter(&ns.handles, ns.id.inode).map_err(ReadError::Enter)?;
                let view = read_current_netns(protocols)?;
                let kept = keep.then(open_ns_sockets).flatten();
                Ok((view, kept, self.subscribe_here(ns.id.inode)))
            })
            .join()
            .unwrap_or(Err(ReadError::Panicked))
        });
        let entered = entered.map(|(view, sockets, gone)| {
            self.park(ns.id.inode, sockets);
            self.watch_gone(ns.id.inode, gone);
            view
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

    fn owners_of(&self, pids: &[u32], wanted: &FastSet<u64>) -> OwnerWalk {
        let passwd = self.passwd.get_or_init(procfs::Passwd::load);
        let set = OnceLock::new();
        let _ = set.set(wanted.clone());
        procfs::walk_socket_owners(pids, &set, 1, passwd)
    }

    fn reread(&self, ns: &NetnsEntry, protocols: &[Protocol]) -> Option<Result<Reread, ReadError>> {
        // Taken out while in use: another thread re-reading the same namespace meanwhile
        // finds none and reads it the slow way.
        let sockets = self
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ns.id.inode)?;
        let mut diag = sockets.diag.unpark();
        let mut route = sockets.route.unpark();
        let read = reread_with(&mut diag, &mut route, protocols);
        if read.is_ok() {
            self.park(
                ns.id.inode,
                Some(NsSockets {
                    diag: diag.park(),
                    route: route.park(),
                }),
            );
        }
        Some(read)
    }

    fn netns_of(&self, pid: u32) -> Option<u64> {
        procfs::netns_of(pid)
    }

    fn want_udp_gone(&self) {
        self.gone_wanted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn udp_gone(
        &self,
        timeout: Option<std::time::Duration>,
        out: &mut Vec<udp_gone::Gone>,
    ) -> io::Result<bool> {
        match &self.gone {
            Some(gone) => gone.wait(timeout, out).map(|()| true),
            None => Ok(false),
        }
    }

    fn start_time(&self, pid: u32) -> Option<u64> {
        procfs::start_time(pid)
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

/// Sockets and local addresses through kept sockets (see [`System::reread`]). IPv6 being
/// unavailable is not an error, as in [`read_current_netns`].
fn reread_with(
    diag: &mut netlink::Netlink,
    route: &mut netlink::Netlink,
    protocols: &[Protocol],
) -> Result<Reread, ReadError> {
    let mut sockets = Vec::new();
    for &protocol in protocols {
        for family in [Family::Ipv4, Family::Ipv6] {
            match diag.dump_sockets(protocol, family, &mut sockets) {
                Ok(()) => {}
                Err(netlink::DumpError::Unsupported) if family == Family::Ipv6 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let mut local = LocalAddrs::default();
    let local = match route.local_addrs(Family::Ipv4, &mut local).and_then(|()| {
        match route.local_addrs(Family::Ipv6, &mut local) {
            Ok(()) | Err(netlink::DumpError::Unsupported) => Ok(()),
            Err(e) => Err(e),
        }
    }) {
        Ok(()) => Some(local),
        Err(_) => None,
    };
    Ok(Reread { sockets, local })
}

/// CPU time this process has used so far, all threads (`CLOCK_PROCESS_CPUTIME_ID`): what
/// `run` paces its refreshes by. Zero if the clock cannot be read.
pub fn process_cpu_time() -> std::time::Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`): what a
/// polling round costs. Zero if the clock cannot be read.
pub fn thread_cpu_time() -> std::time::Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec on this stack frame; clock_gettime writes
    // exactly one timespec there and keeps no pointer to it.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
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
