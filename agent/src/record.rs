//! From a scan to fleet records: sockets grouped into endpoints.
//!
//! A scan reports sockets; the fleet stores *endpoints* (see
//! [`listenscope_core::record`]). Sockets sharing an endpoint (an SO_REUSEPORT group, one
//! socket per worker) become one record whose `sockets` counts them and whose `processes`
//! is the union of their owners.
//!
//! Each record carries the firewall's verdict per IP version (`Listener::effective`) as a
//! [`FirewallAnswer`]: the agent's `firewall::Answer` with its DNAT target, when there is
//! one, written into the reason (the fleet keeps verdict, reason and conditions).

pub use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord, State};

use crate::firewall::Answer;
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

/// The reason without nftables rule handles (` handle 12:` → `:`). A reload renumbers every
/// handle; carried to the fleet, each reload would refresh every listener of the host.
/// The table, chain and rule text still name the rule; `scan --json` keeps the handles.
fn without_handles(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(at) = rest.find(" handle ") {
        let after = &rest[at + " handle ".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with(':') {
            out.push_str(&rest[..at]);
            rest = &after[digits..];
        } else {
            out.push_str(&rest[..at + " handle ".len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The fleet's form of one verdict: the DNAT target (`diverted_to`) joins the reason, so
/// where the traffic goes is shown without becoming history of its own (the verdict
/// `diverted` is history; a new target address is a reload's detail).
pub fn answer_of(a: &Answer) -> FirewallAnswer {
    let mut reason = without_handles(&a.reason);
    if let Some(to) = &a.diverted_to
        && !reason.contains(to.as_str())
    {
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        reason.push_str("diverted to ");
        reason.push_str(to);
    }
    let mut out = FirewallAnswer {
        verdict: a.verdict,
        reason,
        conditions: a.conditions.clone(),
    };
    out.bound();
    out
}

/// Keeps the more permissive of two verdicts of one endpoint (see [`state_of`]).
fn widen(kept: &mut FirewallAnswer, other: &Answer) {
    if other.verdict.permissiveness() > kept.verdict.permissiveness() {
        *kept = answer_of(other);
    }
}

/// Groups a scan's sockets into endpoint records. Within a group the first socket (scan
/// order) gives the classification; owners are merged.
///
/// Firewall verdicts: the sockets of one endpoint share protocol, address, port and
/// device, which is everything the evaluator asks about, so they share a verdict. Should
/// they ever differ (a ruleset read between two of them, a rule matching on the socket's
/// cgroup or owner), the record keeps the most permissive one, by the order open >
/// restricted > diverted > unknown > filtered > n/a (`Effective::permissiveness`), with
/// that socket's reason and conditions: an endpoint some socket of which lets clients in
/// is open to them, and a report must never understate an exposure. On equal verdicts
/// the first socket's answer stays (scan order, so the record is stable).
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
                widen(&mut r.effective_ipv4, &l.effective.ipv4);
                widen(&mut r.effective_ipv6, &l.effective.ipv6);
                r.bound();
            }
            None => {
                // Exact capacity: collected from a filter, a Vec starts at 4 (320 bytes)
                // and the state keeps it for every listener until the next scan.
                let mut processes: Vec<ProcessInfo> = Vec::with_capacity(l.pids.len());
                processes.extend(owners.cloned());
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
                    effective_ipv4: answer_of(&l.effective.ipv4),
                    effective_ipv6: answer_of(&l.effective.ipv6),
                };
                record.bound();
                state.insert(key, record);
            }
        }
    }
    compact(state)
}

/// The same map with every node full. Inserted in key order (scan order nearly is), a
/// `BTreeMap` leaves each node 6 of 11 entries full: about 870 bytes per entry of 472
/// (key and record), for a state the outbox keeps until the next scan. `append` to a map
/// of one entry rebuilds it with the standard library's bulk push, which fills every node;
/// it streams, freeing each old node once passed, with no vector of every entry and no
/// sort. Rejected: `collect()` (`BTreeMap::from_iter`), which gets there through a `Vec` of
/// every entry and a stable sort with a scratch buffer as large: 9 MiB more at the peak
/// of a 10,000-listener scan.
pub fn compact(mut state: State) -> State {
    let Some((key, record)) = state.pop_first() else {
        return state;
    };
    let mut full = State::new();
    full.insert(key, record);
    full.append(&mut state);
    full
}

fn or_opt(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x || y),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use std::sync::Arc;

    use listenscope_core::domain::Effective;
    use time::OffsetDateTime;

    use super::*;
    use crate::firewall::Exposure;
    use crate::model::{Classification, Family, NetnsId, Protocol, RawSocket, Reach, Source};

    fn answer(verdict: Effective, reason: &str) -> Answer {
        Answer::new(verdict, reason)
    }

    /// A `:::80` dual-stack socket (one of an SO_REUSEPORT group) with these verdicts.
    fn socket(inode: u64, pid: u32, ipv4: Answer, ipv6: Answer) -> Listener {
        Listener {
            socket: RawSocket {
                protocol: Protocol::Tcp,
                family: Family::Ipv6,
                address: IpAddr::from([0u16; 8]),
                port: 80,
                v6only: Some(false),
                ifindex: 0,
                freebind: Some(false),
                transparent: Some(false),
                uid: 0,
                inode,
                cgroup_id: None,
            },
            netns: Arc::new(NetnsId {
                inode: 4026531840,
                name: "host".into(),
            }),
            source: Source::SockDiag,
            interface: None,
            class: Classification {
                reach_ipv4: Reach::Any,
                reach_ipv6: Reach::Any,
                latent: false,
                shown_as: ":::80".into(),
                netstat_proto: "tcp6",
                trap: true,
            },
            hidden_ipv4_exposure: true,
            pids: vec![pid],
            cgroup: None,
            container: None,
            unit: None,
            effective: Exposure { ipv4, ipv6 },
        }
    }

    fn inventory(listeners: Vec<Listener>) -> Inventory {
        let processes: BTreeMap<u32, ProcessInfo> = listeners
            .iter()
            .flat_map(|l| l.pids.iter())
            .map(|&pid| {
                (
                    pid,
                    ProcessInfo {
                        pid,
                        comm: "nginx".into(),
                        cmdline: "nginx: worker process".into(),
                        user: "www-data".into(),
                    },
                )
            })
            .collect();
        Inventory {
            host: "h".into(),
            scanned_at: OffsetDateTime::UNIX_EPOCH,
            listeners,
            processes,
            namespaces: Vec::new(),
            warnings: Vec::new(),
            partial: false,
        }
    }

    fn one(listeners: Vec<Listener>) -> ListenerRecord {
        let state = state_of(&inventory(listeners));
        assert_eq!(state.len(), 1, "one endpoint");
        state.into_values().next().unwrap()
    }

    #[test]
    fn verdicts_are_carried() {
        let mut restricted = answer(Effective::Restricted, "inet filter input: accept");
        restricted.conditions = vec!["saddr 198.51.100.0/24".into()];
        let r = one(vec![socket(
            1,
            10,
            restricted,
            answer(Effective::Filtered, "policy drop of inet filter input"),
        )]);
        assert_eq!(r.effective_ipv4.verdict, Effective::Restricted);
        assert_eq!(r.effective_ipv4.reason, "inet filter input: accept");
        assert_eq!(r.effective_ipv4.conditions, ["saddr 198.51.100.0/24"]);
        assert_eq!(r.effective_ipv6.verdict, Effective::Filtered);
        assert!(r.effective_ipv6.conditions.is_empty());
    }

    /// Sockets of one endpoint that disagree: the most permissive verdict wins, in either
    /// order, with its own reason; equal verdicts keep the first socket's answer.
    #[test]
    fn an_endpoint_keeps_its_most_permissive_verdict() {
        let ladder = [
            Effective::NotApplicable,
            Effective::Filtered,
            Effective::Unknown,
            Effective::Diverted,
            Effective::Restricted,
            Effective::Open,
        ];
        for (i, &low) in ladder.iter().enumerate() {
            for &high in &ladder[i + 1..] {
                for swap in [false, true] {
                    let a = socket(1, 10, answer(low, "low"), answer(high, "high"));
                    let b = socket(2, 11, answer(high, "high"), answer(low, "low"));
                    let r = one(if swap { vec![b, a] } else { vec![a, b] });
                    assert_eq!(r.sockets, 2);
                    assert_eq!(r.processes.len(), 2);
                    assert_eq!(
                        (r.effective_ipv4.verdict, r.effective_ipv6.verdict),
                        (high, high)
                    );
                    assert_eq!(r.effective_ipv4.reason, "high", "{low:?} < {high:?}");
                }
            }
        }
        let r = one(vec![
            socket(
                1,
                10,
                answer(Effective::Open, "first"),
                answer(Effective::Open, "first"),
            ),
            socket(
                2,
                11,
                answer(Effective::Open, "second"),
                answer(Effective::Open, "second"),
            ),
        ]);
        assert_eq!(r.effective_ipv4.reason, "first");
    }

    /// Rebuilt with full nodes, the state holds the same entries in the same order, for
    /// sizes around a node's capacity (11) and its split point.
    #[test]
    fn compact_keeps_every_entry() {
        use listenscope_core::record::testkit::record;
        for n in [0u16, 1, 2, 6, 11, 12, 23, 1000] {
            let mut state = State::new();
            for port in (1..=n).rev() {
                let r = record("host", "::", port, Some(false));
                state.insert(r.key.clone(), r);
            }
            let full = compact(state.clone());
            assert_eq!(full.len(), usize::from(n));
            assert!(full.iter().eq(state.iter()), "{n} entries");
        }
    }

    #[test]
    fn rule_handles_stay_out_of_the_fleet() {
        assert_eq!(
            without_handles(
                "inet filter input handle 7: tcp dport 22 accept; ufw: ip filter ufw-user-input handle 123: -A x"
            ),
            "inet filter input: tcp dport 22 accept; ufw: ip filter ufw-user-input: -A x"
        );
        assert_eq!(
            without_handles("policy drop of inet filter input"),
            "policy drop of inet filter input"
        );
        assert_eq!(
            without_handles("rule text with handle x: kept"),
            "rule text with handle x: kept"
        );
        let a = answer(
            Effective::Open,
            "inet filter input handle 9: tcp dport 22 accept",
        );
        assert_eq!(
            answer_of(&a).reason,
            "inet filter input: tcp dport 22 accept"
        );
    }

    #[test]
    fn a_dnat_target_joins_the_reason() {
        let mut d = answer(
            Effective::Diverted,
            "ip nat PREROUTING handle 3: dnat to 192.0.2.2:80",
        );
        d.diverted_to = Some("192.0.2.2:80 (netns web)".into());
        let a = answer_of(&d);
        assert_eq!(a.verdict, Effective::Diverted);
        assert_eq!(
            a.reason,
            "ip nat PREROUTING: dnat to 192.0.2.2:80; diverted to 192.0.2.2:80 (netns web)"
        );
        // Already named in the reason: not repeated.
        let mut d = answer(Effective::Diverted, "dnat to 192.0.2.2:80");
        d.diverted_to = Some("192.0.2.2:80".into());
        assert_eq!(answer_of(&d).reason, "dnat to 192.0.2.2:80");
    }

    /// Whatever a ruleset holds (a comment with a terminal escape), the record is within
    /// the collector's rules: it escapes, it never sends what the collector refuses.
    #[test]
    fn verdict_texts_are_made_safe() {
        let mut a = answer(Effective::Restricted, "rule \u{1b}]0;pwned\u{7} accept");
        a.conditions = vec!["iifname \"x\ny\"".into(), "x".repeat(1000)];
        let r = one(vec![socket(
            1,
            10,
            a,
            answer(Effective::NotApplicable, "n/a"),
        )]);
        let wire = listenscope_proto::v1::Listener::from(&r);
        let back = ListenerRecord::try_from(wire).unwrap();
        assert_eq!(back, r);
        assert!(!r.effective_ipv4.reason.contains('\u{1b}'));
        assert!(r.effective_ipv4.reason.contains("\\u{1b}"));
    }
}
