//! From a scan to fleet records: sockets grouped into endpoints.
//!
//! A scan reports sockets; the fleet stores *endpoints* (see
//! [`listenscope_core::record`]). Sockets sharing an endpoint (an SO_REUSEPORT group, one
//! socket per worker) become one record whose `sockets` counts them and whose `processes`
//! is the union of their owners.

pub use listenscope_core::record::{ListenerKey, ListenerRecord, State};

use crate::model::{Listener, ProcessInfo};
use crate::scan::Inventory;

/// The key of a scanned listener.
pub fn key_of(l: &Listener) -> ListenerKey {
    ListenerKey {
        netns: l.netns.name.clone(),
        protocol: l.socket.protocol,
        family: l.socket.family,
        address: l.socket.address,
        port: l.socket.port,
        interface: l.interface.clone(),
        v6only: l.socket.v6only,
    }
}

/// Groups a scan's sockets into endpoint records. Within a group the first socket (scan
/// order) gives the classification; owners are merged.
pub fn state_of(inv: &Inventory) -> State {
    let mut state = State::new();
    for l in &inv.listeners {
        let key = key_of(l);
        let owners = l.pids.iter().filter_map(|p| inv.processes.get(p));
        match state.get_mut(&key) {
            Some(r) => {
                r.sockets += 1;
                for p in owners {
                    if let Err(at) = r.processes.binary_search_by_key(&p.pid, |q| q.pid) {
                        r.processes.insert(at, p.clone());
                    }
                }
                r.freebind = or_opt(r.freebind, l.socket.freebind);
                r.transparent = or_opt(r.transparent, l.socket.transparent);
                r.bound();
            }
            None => {
                let mut processes: Vec<ProcessInfo> = owners.cloned().collect();
                processes.sort_by_key(|p| p.pid);
                processes.dedup_by_key(|p| p.pid);
                let mut record = ListenerRecord {
                    key: key.clone(),
                    netns_inode: l.netns.inode,
                    reach_ipv4: l.class.reach_ipv4,
                    reach_ipv6: l.class.reach_ipv6,
                    latent: l.class.latent,
                    shown_as: l.class.shown_as.clone(),
                    netstat_proto: l.class.netstat_proto.to_string(),
                    trap: l.class.trap,
                    hidden_ipv4_exposure: l.hidden_ipv4_exposure,
                    processes,
                    container: l.container.clone(),
                    unit: l.unit.clone(),
                    cgroup: l.cgroup.clone(),
                    uid: l.socket.uid,
                    freebind: l.socket.freebind,
                    transparent: l.socket.transparent,
                    source: l.source,
                    sockets: 1,
                };
                record.bound();
                state.insert(key, record);
            }
        }
    }
    state
}

fn or_opt(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x || y),
        (x, None) => x,
        (None, y) => y,
    }
}
