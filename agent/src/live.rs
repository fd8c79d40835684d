//! `run`'s scanner: a whole scan now and then, and in between inventories that read again
//! only the namespaces an event names (docs/realtime.md).
//!
//! A whole scan (`scan::scan_full`) discovers namespaces, dumps every one and walks every
//! process's fds: about 30 ms of CPU at 10,000 listeners. [`Scanner::refresh`] instead
//! re-dumps the dirty namespaces through netlink sockets kept open in them
//! (`System::reread`), takes every other namespace as last read, and looks up owners only
//! for socket inodes it has not seen before: first in the processes the events named, and
//! only if some are still unknown with a whole /proc walk. Classification, hidden IPv4
//! exposure, firewall verdicts and sorting run over the whole inventory each time, so a
//! refreshed inventory is exactly what a whole scan would have said, given what was read.
//!
//! What a refresh does not notice until the next whole scan (the reconciliation, every
//! `interval`): a new namespace without a listen event, interface and route changes,
//! ruleset changes, and a process that inherited a socket from one that exited.
//!
//! [`plan`] is pure: events in, the work to do out. It is table-tested below.

use std::time::Duration;

use crate::fasthash::{FastMap, FastSet};
use crate::model::{Family, Protocol};
use crate::os::{OwnerWalk, System};
use crate::scan::{self, FirewallMemo, Inventory, NetnsSelector, Reading, ScanError, ScanOptions};

/// What the doorbell said, with the namespace of the process it named (resolved as soon
/// as the event was read, while the process most likely still exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A TCP socket started listening.
    Listen {
        pid: u32,
        netns: Option<u64>,
        family: Family,
        port: u16,
    },
    /// A TCP listener closed.
    Close {
        pid: u32,
        netns: Option<u64>,
        family: Family,
        port: u16,
    },
    /// A socket was bound (UDP listeners appear this way).
    Bind { pid: u32, netns: Option<u64> },
    /// A UDP socket of this namespace bound to `port` was destroyed (`None`: notices of
    /// it were lost).
    UdpGone { netns: u64, port: Option<u16> },
    /// Events were lost (ring overflow): only a whole scan is sure to see everything.
    Lost,
}

/// The work a batch of events calls for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// A whole scan: a namespace not known yet, an event whose process could not be
    /// placed, lost events.
    pub full: bool,
    /// Namespaces (inodes) to dump again.
    pub namespaces: FastSet<u64>,
    /// Processes the events named: where new sockets' owners are looked for first.
    pub pids: Vec<u32>,
    /// TCP listeners (namespace, port) the events say exist now: when the refreshed
    /// namespace has none on that port, the socket lives elsewhere (its creator moved to
    /// another namespace after creating it) and a whole scan finds it.
    pub expect: Vec<(u64, u16)>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        !self.full && self.namespaces.is_empty()
    }

    pub fn whole() -> Dirty {
        Dirty {
            full: true,
            ..Dirty::default()
        }
    }
}

/// What a batch of events calls for, given the namespaces being watched.
///
/// - A listen or bind in a watched namespace dirties it. In a namespace not seen yet it
///   calls for a whole scan, which discovers namespaces again (ignored when only some
///   namespaces are watched, `--netns`). By a thread gone before it could be placed (a
///   thread that entered a namespace to listen, or a daemon that handed the socket to a
///   child), a whole scan too, or with `--netns` every watched namespace.
/// - A close dirties its namespace if that held a TCP listener on the port; otherwise
///   (the closer is elsewhere or gone) every namespace that did (`holders`).
/// - A UDP socket's end dirties its namespace only if that namespace held a UDP socket on
///   that port (every DNS client socket's end is announced too); lost notices dirty it.
/// - Lost events call for a whole scan.
pub fn plan(
    events: &[Event],
    watched: &FastSet<u64>,
    all_namespaces: bool,
    holders: impl Fn(Protocol, u16) -> Vec<u64>,
) -> Dirty {
    let mut dirty = Dirty::default();
    let opened = |dirty: &mut Dirty, pid: u32, netns: Option<u64>| {
        if !dirty.pids.contains(&pid) {
            dirty.pids.push(pid);
        }
        match netns {
            Some(ns) if watched.contains(&ns) => {
                dirty.namespaces.insert(ns);
            }
            Some(_) => dirty.full |= all_namespaces,
            // Not placed: with every namespace watched it may be a new one; with only
            // some, it may be any of them.
            None if all_namespaces => dirty.full = true,
            None => dirty.namespaces.extend(watched.iter().copied()),
        }
    };
    for event in events {
        match *event {
            Event::Listen {
                pid, netns, port, ..
            } => {
                opened(&mut dirty, pid, netns);
                // The socket may belong to another namespace than the thread that called
                // listen() (sockets stay where they were created): checked after the
                // refresh, a whole scan if it is not there. Port 0: listen() chose it.
                if let Some(ns) = netns.filter(|ns| watched.contains(ns) && port != 0)
                    && !dirty.expect.contains(&(ns, port))
                {
                    dirty.expect.push((ns, port));
                }
            }
            Event::Bind { pid, netns } => opened(&mut dirty, pid, netns),
            Event::Close { netns, port, .. } => {
                // The closing thread's namespace if it held that port, else every watched
                // namespace that did (the closer may be elsewhere, or gone).
                let held = holders(Protocol::Tcp, port);
                match netns.filter(|ns| held.contains(ns) && watched.contains(ns)) {
                    Some(ns) => {
                        dirty.namespaces.insert(ns);
                    }
                    None => dirty
                        .namespaces
                        .extend(held.into_iter().filter(|ns| watched.contains(ns))),
                }
            }
            Event::UdpGone { netns, port } => {
                let held = port.is_none_or(|p| holders(Protocol::Udp, p).contains(&netns));
                if watched.contains(&netns) && held {
                    dirty.namespaces.insert(netns);
                }
            }
            Event::Lost => dirty.full = true,
        }
    }
    dirty
}

/// The scanner of `run`: keeps what the last scan read (`scan::Reading`), the firewalls
/// assembled (`FirewallMemo`) and the owners' start times.
#[derive(Debug)]
pub struct Scanner {
    opts: ScanOptions,
    memo: FirewallMemo,
    /// `None` before the first scan, and after one that could not read every namespace
    /// (every refresh is then a whole scan).
    reading: Option<Reading>,
    /// Start time of every owner pid in `reading`, to tell a recycled pid.
    started: FastMap<u32, u64>,
    /// What the last inventory cost (for `run`'s pacing).
    pub last: Cost,
    /// CPU time of the last polling round's dumps and comparison (this thread's).
    pub probe_cpu: Duration,
}

/// What one inventory took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub whole: bool,
    pub wall: Duration,
}

/// How a refresh went (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refreshed {
    pub whole: bool,
    /// Namespaces dumped again.
    pub namespaces: usize,
    /// Sockets whose owner was not known and was looked up.
    pub looked_up: usize,
    /// Whether the lookup needed a walk of every process.
    pub walked_all: bool,
}

impl Scanner {
    pub fn new(opts: ScanOptions) -> Scanner {
        Scanner {
            opts,
            memo: FirewallMemo::default(),
            reading: None,
            started: FastMap::default(),
            last: Cost::default(),
            probe_cpu: Duration::ZERO,
        }
    }

    /// A whole scan: what `run` starts with and reconciles with.
    pub fn full(&mut self, sys: &dyn System) -> Result<Inventory, ScanError> {
        let t = std::time::Instant::now();
        let mut reading = None;
        let inv = scan::scan_full(sys, &self.opts, &mut self.memo, Some(&mut reading))?;
        self.reading = reading;
        self.started.clear();
        if let Some(r) = &self.reading {
            for &pid in r.processes.keys() {
                if let Some(at) = sys.start_time(pid) {
                    self.started.insert(pid, at);
                }
            }
        }
        self.last = Cost {
            whole: true,
            wall: t.elapsed(),
        };
        Ok(inv)
    }

    /// The namespaces being watched (inodes), as of the last whole scan.
    pub fn watched(&self) -> FastSet<u64> {
        self.reading
            .iter()
            .flat_map(|r| &r.discovered.selected)
            .map(|n| n.id.inode)
            .collect()
    }

    /// Whether every namespace is watched (`--netns all`): then an event from an unknown
    /// namespace means a new one.
    pub fn all_namespaces(&self) -> bool {
        self.opts.netns == NetnsSelector::All
    }

    /// Namespaces that held a socket of `protocol` on `port` when last read.
    pub fn holders(&self, protocol: Protocol, port: u16) -> Vec<u64> {
        let Some(r) = &self.reading else {
            return Vec::new();
        };
        r.discovered
            .selected
            .iter()
            .zip(&r.views)
            .filter(|(_, v)| {
                v.sockets
                    .iter()
                    .any(|s| s.protocol == protocol && s.port == port)
            })
            .map(|(n, _)| n.id.inode)
            .collect()
    }

    /// The inventory after `dirty`: a whole scan when it says so or nothing was kept,
    /// else the dirty namespaces dumped again and the rest as last read.
    pub fn refresh(
        &mut self,
        sys: &dyn System,
        dirty: &Dirty,
    ) -> Result<(Inventory, Refreshed), ScanError> {
        let t = std::time::Instant::now();
        let Some(mut reading) = self.reading.take().filter(|_| !dirty.full) else {
            let inv = self.full(sys)?;
            return Ok((inv, whole()));
        };
        let mut done = Refreshed::default();
        for &inode in &dirty.namespaces {
            let Some(i) = reading
                .discovered
                .selected
                .iter()
                .position(|n| n.id.inode == inode)
            else {
                continue; // not watched: `plan` already filtered, kept for safety
            };
            if !reread(sys, &mut reading, i) {
                let inv = self.full(sys)?;
                return Ok((inv, whole()));
            }
            done.namespaces += 1;
        }
        let found = |&(ns, port): &(u64, u16)| {
            reading
                .discovered
                .selected
                .iter()
                .zip(&reading.views)
                .filter(|(n, _)| n.id.inode == ns)
                .flat_map(|(_, v)| &v.sockets)
                .any(|s| s.protocol == Protocol::Tcp && s.port == port)
        };
        if let Some(missing) = dirty.expect.iter().find(|e| !found(e)) {
            tracing::debug!(
                netns = missing.0,
                port = missing.1,
                "A listen was not found in its caller's namespace; scanning everything."
            );
            let inv = self.full(sys)?;
            return Ok((inv, whole()));
        }
        Ok(self.finish(sys, reading, dirty, done, t))
    }

    /// One polling round (where there is no doorbell): every watched namespace dumped
    /// again through its kept sockets and compared with what was last read. `None` when
    /// nothing changed; else the inventory, refreshed for the namespaces that changed.
    /// [`Scanner::probe_cpu`] then says what the dumps and the comparison cost (the
    /// refresh that follows a change is not counted: it is paced like any refresh).
    pub fn poll(&mut self, sys: &dyn System) -> Result<Option<(Inventory, Refreshed)>, ScanError> {
        let t = std::time::Instant::now();
        let cpu = crate::os::thread_cpu_time();
        let Some(mut reading) = self.reading.take() else {
            let inv = self.full(sys)?;
            self.probe_cpu = crate::os::thread_cpu_time().saturating_sub(cpu);
            return Ok(Some((inv, whole())));
        };
        let both = [Protocol::Tcp, Protocol::Udp];
        let mut dirty = Dirty::default();
        let mut done = Refreshed::default();
        for i in 0..reading.views.len() {
            let ns = &reading.discovered.selected[i];
            let view = &mut reading.views[i];
            let fresh = match sys.reread(ns, &both) {
                Some(Ok(r)) => r,
                // No kept sockets, or they failed: read it whole, as `refresh` would.
                _ => {
                    let before = inodes(&view.sockets);
                    if !reread(sys, &mut reading, i) {
                        let inv = self.full(sys)?;
                        return Ok(Some((inv, whole())));
                    }
                    if inodes(&reading.views[i].sockets) != before {
                        dirty
                            .namespaces
                            .insert(reading.discovered.selected[i].id.inode);
                        done.namespaces += 1;
                    }
                    continue;
                }
            };
            let changed = inodes(&fresh.sockets) != inodes(&view.sockets)
                || fresh
                    .local
                    .as_ref()
                    .is_some_and(|l| Some(l) != view.local.as_ref());
            if !changed {
                continue;
            }
            let inode = ns.id.inode;
            let named = fresh
                .sockets
                .iter()
                .all(|s| s.ifindex == 0 || view.ifnames.iter().any(|(i, _)| *i == s.ifindex));
            if named {
                view.sockets = fresh.sockets;
                if fresh.local.is_some() {
                    view.local = fresh.local;
                }
            } else if !reread(sys, &mut reading, i) {
                let inv = self.full(sys)?;
                return Ok(Some((inv, whole())));
            }
            dirty.namespaces.insert(inode);
            done.namespaces += 1;
        }
        self.probe_cpu = crate::os::thread_cpu_time().saturating_sub(cpu);
        if dirty.is_empty() {
            self.reading = Some(reading);
            self.last = Cost {
                whole: false,
                wall: t.elapsed(),
            };
            return Ok(None);
        }
        Ok(Some(self.finish(sys, reading, &dirty, done, t)))
    }

    /// Owners brought up to date, then the inventory from `reading`, which is kept.
    fn finish(
        &mut self,
        sys: &dyn System,
        mut reading: Reading,
        dirty: &Dirty,
        mut done: Refreshed,
        t: std::time::Instant,
    ) -> (Inventory, Refreshed) {
        self.own(sys, &mut reading, dirty, &mut done);
        let walk = OwnerWalk {
            by_inode: reading.owners.clone(),
            processes: reading.processes.clone(),
            denied: reading.denied,
        };
        let inv = scan::scan_reading(sys, &self.opts, &mut self.memo, &reading, walk);
        self.reading = Some(reading);
        self.last = Cost {
            whole: false,
            wall: t.elapsed(),
        };
        tracing::debug!(
            namespaces = done.namespaces,
            looked_up = done.looked_up,
            walked_all = done.walked_all,
            us = t.elapsed().as_micros() as u64,
            "Inventory refreshed."
        );
        (inv, done)
    }

    /// Brings `reading.owners` up to date with its sockets: owners of sockets gone are
    /// forgotten, owners of the dirty namespaces' sockets whose process was replaced
    /// (same pid, another start time) are looked up again, and so are new sockets:
    /// first in the processes the events named, then, for what is left, in every process.
    fn own(
        &mut self,
        sys: &dyn System,
        reading: &mut Reading,
        dirty: &Dirty,
        done: &mut Refreshed,
    ) {
        let wanted = scan::wanted_inodes(&reading.views, &self.opts);
        reading.owners.retain(|inode, _| wanted.contains(inode));
        // A cached owner of a dirty namespace's socket that is not the process it was.
        let dirty_inodes: FastSet<u64> = reading
            .discovered
            .selected
            .iter()
            .zip(&reading.views)
            .filter(|(n, _)| dirty.namespaces.contains(&n.id.inode))
            .flat_map(|(_, v)| v.sockets.iter().map(|s| s.inode))
            .collect();
        // Each distinct pid checked once (thousands of sockets may share one owner).
        let mut same: FastMap<u32, bool> = FastMap::default();
        for (inode, pids) in &reading.owners {
            if dirty_inodes.contains(inode) {
                for &p in pids {
                    same.entry(p).or_insert_with(|| {
                        self.started
                            .get(&p)
                            .is_some_and(|&at| sys.start_time(p) == Some(at))
                    });
                }
            }
        }
        reading.owners.retain(|inode, pids| {
            !dirty_inodes.contains(inode) || pids.iter().all(|p| same.get(p) == Some(&true))
        });
        let mut unknown: FastSet<u64> = wanted
            .iter()
            .filter(|i| !reading.owners.contains_key(i))
            .copied()
            .collect();
        done.looked_up = unknown.len();
        if !unknown.is_empty() && !dirty.pids.is_empty() {
            let found = sys.owners_of(&dirty.pids, &unknown);
            self.merge(sys, reading, found, &mut unknown);
        }
        if !unknown.is_empty() {
            done.walked_all = true;
            let set = std::sync::OnceLock::new();
            let _ = set.set(unknown.clone());
            let found = sys.owners(&set);
            reading.denied = found.denied;
            self.merge(sys, reading, found, &mut unknown);
            // Looked for everywhere: no owner to be seen (another pid namespace, a
            // process we may not read). Remembered, so it is not looked for again.
            for inode in unknown {
                reading.owners.insert(inode, Vec::new());
            }
        }
        // Processes no socket names any more.
        let named: FastSet<u32> = reading.owners.values().flatten().copied().collect();
        reading.processes.retain(|pid, _| named.contains(pid));
        self.started.retain(|pid, _| named.contains(pid));
    }

    fn merge(
        &mut self,
        sys: &dyn System,
        reading: &mut Reading,
        found: OwnerWalk,
        unknown: &mut FastSet<u64>,
    ) {
        for (inode, pids) in found.by_inode {
            unknown.remove(&inode);
            reading.owners.insert(inode, pids);
        }
        for (pid, info) in found.processes {
            if let Some(at) = sys.start_time(pid) {
                self.started.insert(pid, at);
            }
            reading.processes.insert(pid, info);
        }
    }
}

/// The socket inodes of a dump, sorted: what tells a namespace changed (a socket's other
/// facts are fixed once it is bound, and a new socket gets a new inode).
fn inodes(sockets: &[crate::model::RawSocket]) -> Vec<u64> {
    let mut v: Vec<u64> = sockets.iter().map(|s| s.inode).collect();
    v.sort_unstable();
    v
}

fn whole() -> Refreshed {
    Refreshed {
        whole: true,
        ..Refreshed::default()
    }
}

/// Dumps namespace `i` of `reading` again: through its kept sockets when there are, else
/// read whole on a thread of its own (its firewall reading is kept either way). `false`
/// when it cannot be read: the caller falls back to a whole scan.
fn reread(sys: &dyn System, reading: &mut Reading, i: usize) -> bool {
    let ns = &reading.discovered.selected[i];
    let view = &mut reading.views[i];
    let both = [Protocol::Tcp, Protocol::Udp];
    if let Some(Ok(r)) = sys.reread(ns, &both) {
        // A socket bound to an interface not named yet needs the namespace's thread to
        // name it: read whole below.
        let named = r
            .sockets
            .iter()
            .all(|s| s.ifindex == 0 || view.ifnames.iter().any(|(i, _)| *i == s.ifindex));
        if named {
            view.sockets = r.sockets;
            if r.local.is_some() {
                view.local = r.local;
            }
            return true;
        }
    }
    match sys.read_netns(ns, &both) {
        Ok(mut fresh) => {
            fresh.firewall = view.firewall.take();
            *view = fresh;
            true
        }
        Err(e) => {
            tracing::debug!(netns = %ns.id.name, error = %e, "Re-reading a namespace failed.");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(inodes: &[u64]) -> FastSet<u64> {
        inodes.iter().copied().collect()
    }

    fn listen(pid: u32, netns: Option<u64>) -> Event {
        Event::Listen {
            pid,
            netns,
            family: Family::Ipv6,
            port: 80,
        }
    }

    fn close(pid: u32, netns: Option<u64>, port: u16) -> Event {
        Event::Close {
            pid,
            netns,
            family: Family::Ipv4,
            port,
        }
    }

    /// (events, all namespaces watched) → (full, dirty namespaces sorted, pids).
    fn check(events: &[Event], all: bool, expected: (bool, &[u64], &[u32])) {
        check_expecting(events, all, expected, None);
    }

    fn check_expecting(
        events: &[Event],
        all: bool,
        expected: (bool, &[u64], &[u32]),
        expect: Option<&[(u64, u16)]>,
    ) {
        let watched = set(&[1, 2, 3]);
        let holders = |protocol: Protocol, port: u16| match (protocol, port) {
            (Protocol::Tcp, 80) => vec![1, 3, 9],
            (Protocol::Udp, 53) => vec![2],
            _ => vec![],
        };
        let d = plan(events, &watched, all, holders);
        let mut got: Vec<u64> = d.namespaces.iter().copied().collect();
        got.sort_unstable();
        assert_eq!(
            (d.full, got.as_slice(), d.pids.as_slice()),
            expected,
            "events {events:?}, all {all}"
        );
        if let Some(expect) = expect {
            assert_eq!(d.expect, expect, "events {events:?}");
        }
    }

    #[test]
    fn plans() {
        check(&[], true, (false, &[], &[]));
        // A listen in a watched namespace: that one, looking first in that process.
        check(&[listen(10, Some(2))], true, (false, &[2], &[10]));
        // Twice the same process: named once.
        check(
            &[
                listen(10, Some(2)),
                Event::Bind {
                    pid: 10,
                    netns: Some(1),
                },
            ],
            true,
            (false, &[1, 2], &[10]),
        );
        // A namespace not seen yet: a whole scan (it discovers namespaces again)...
        check(&[listen(10, Some(7))], true, (true, &[], &[10]));
        // ...unless only some namespaces are watched: then it is not ours.
        check(&[listen(10, Some(7))], false, (false, &[], &[10]));
        // A thread gone before it was placed: a whole scan, or every watched namespace.
        check(&[listen(10, None)], true, (true, &[], &[10]));
        let bind = Event::Bind {
            pid: 4,
            netns: None,
        };
        check(&[bind], true, (true, &[], &[4]));
        check(&[listen(10, None)], false, (false, &[1, 2, 3], &[10]));
        // A close in a namespace that held the port: that one, no owner lookup.
        check(&[close(10, Some(3), 80)], true, (false, &[3], &[]));
        // A close by a process gone, or elsewhere (a thread that left the socket's
        // namespace), or in a namespace that did not hold the port: every watched
        // namespace with a TCP listener on the port.
        check(&[close(10, None, 80)], true, (false, &[1, 3], &[]));
        check(&[close(10, Some(8), 80)], true, (false, &[1, 3], &[]));
        check(&[close(10, Some(2), 80)], true, (false, &[1, 3], &[]));
        check(&[close(10, None, 443)], true, (false, &[], &[]));
        check(&[close(10, Some(3), 443)], true, (false, &[], &[]));
        // A listen is checked for after the refresh (the caller's namespace may not be
        // the socket's); not when listen() chose the port, nor outside what is watched.
        check_expecting(
            &[listen(10, Some(2))],
            true,
            (false, &[2], &[10]),
            Some(&[(2, 80)]),
        );
        let autobind = Event::Listen {
            pid: 10,
            netns: Some(2),
            family: Family::Ipv4,
            port: 0,
        };
        check_expecting(&[autobind], true, (false, &[2], &[10]), Some(&[]));
        check_expecting(
            &[listen(10, Some(7))],
            false,
            (false, &[], &[10]),
            Some(&[]),
        );
        // A UDP socket's end: only where a socket on that port was known.
        let gone = |netns, port| Event::UdpGone { netns, port };
        check(&[gone(2, Some(53))], true, (false, &[2], &[]));
        check(&[gone(1, Some(53))], true, (false, &[], &[]));
        check(&[gone(2, Some(40123))], true, (false, &[], &[]));
        check(&[gone(5, Some(53))], true, (false, &[], &[]));
        // Notices lost: read it again.
        check(&[gone(3, None)], true, (false, &[3], &[]));
        check(&[gone(5, None)], true, (false, &[], &[]));
        check(
            &[listen(10, Some(2)), Event::Lost],
            true,
            (true, &[2], &[10]),
        );
    }
}
