//! What a message does to a host's stored listeners, decided in Rust once for both
//! databases.
//!
//! Input: the host's live rows (id, key, fingerprints) and the incoming records. Output: a
//! [`Plan`] of row operations that each backend executes in one transaction with batched
//! statements. Versioning rules:
//! - a new key → a new row (its lifetime starts: `first_seen` = observation time);
//! - a known key whose *material* fields changed (classification, owner names, attribution)
//!   → the live row is closed as `changed` and a new version starts, keeping `first_seen`;
//! - a known key where only pids, cmdlines, socket count, namespace inode or the firewall
//!   verdicts' reasons changed → the live row is refreshed in place (no history event:
//!   worker recycling and a ruleset reload that renumbers rule handles are not news; a
//!   changed verdict or condition is material, so it is a new version);
//! - a closed key, or (snapshots) any live key absent from the snapshot → closed as `closed`.

use std::collections::HashMap;

use listenscope_core::diff::Changes;
use listenscope_core::domain::Protocol;
use listenscope_core::fingerprint::{Fingerprints, fingerprints};
use listenscope_core::record::{ListenerKey, ListenerRecord};
use time::OffsetDateTime;

use super::Applied;

/// A live (current) row as the backend read it.
#[derive(Debug, Clone)]
pub struct LiveRow {
    pub id: i64,
    pub material_hash: i64,
    pub full_hash: i64,
    pub first_seen: OffsetDateTime,
    pub valid_from: OffsetDateTime,
}

/// An incoming record with its key string and fingerprints.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub lkey: String,
    pub fingerprints: Fingerprints,
    pub record: ListenerRecord,
}

impl Prepared {
    pub fn new(record: ListenerRecord) -> Prepared {
        Prepared {
            lkey: lkey(&record.key),
            fingerprints: fingerprints(&record),
            record,
        }
    }
}

/// A row to insert: a record, when its lifetime began and when this version starts.
#[derive(Debug, Clone)]
pub struct NewRow<'a> {
    pub prepared: &'a Prepared,
    pub first_seen: OffsetDateTime,
    /// The observation time, but never before the version it replaces began (an agent
    /// clock stepping back must not make versions overlap or an event vanish).
    pub valid_from: OffsetDateTime,
}

#[derive(Debug, Default)]
pub struct Plan<'a> {
    pub insert: Vec<NewRow<'a>>,
    pub close_changed: Vec<i64>,
    pub close_closed: Vec<i64>,
    pub refresh: Vec<(i64, &'a Prepared)>,
}

impl Plan<'_> {
    /// Rows written.
    pub fn rows(&self) -> usize {
        self.insert.len() + self.close_changed.len() + self.close_closed.len() + self.refresh.len()
    }

    /// How the host's count of live listeners changes.
    pub fn live_delta(&self) -> i64 {
        self.insert.len() as i64 - self.close_changed.len() as i64 - self.close_closed.len() as i64
    }

    /// Whether the live set or any version's values changed (refreshes only touch pids,
    /// command lines, socket counts, namespace inodes and verdict reasons, which no
    /// maintained summary holds: `hidden_port` keeps verdicts and conditions, not reasons).
    pub fn versions_changed(&self) -> bool {
        !(self.insert.is_empty() && self.close_changed.is_empty() && self.close_closed.is_empty())
    }
}

/// What the host row says about the stored session.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    pub session: Option<&'a [u8]>,
    pub committed: u64,
    /// Observation time of the last stored snapshot.
    pub snapshot_at: Option<OffsetDateTime>,
}

/// The sequence rules for a snapshot: `Some(Duplicate)` when it was already stored,
/// `Some(Superseded)` when it comes from another session and is older than the stored
/// state (a stale agent process, or two machines sharing one certificate, must not roll
/// a host back), `None` to apply it (a newer snapshot from any session takes over).
pub fn snapshot_rule(
    stored: Stored<'_>,
    session: &[u8],
    seq: u64,
    at: OffsetDateTime,
) -> Option<Applied> {
    if stored.session == Some(session) {
        return (stored.committed >= seq).then_some(Applied::Duplicate {
            committed: stored.committed,
        });
    }
    stored
        .snapshot_at
        .is_some_and(|last| at < last)
        .then_some(Applied::Superseded)
}

/// The sequence rules for a delta: `None` to apply it (it is exactly the next sequence of
/// the stored session), else why not.
pub fn delta_rule(stored: Stored<'_>, session: &[u8], seq: u64) -> Option<Applied> {
    let committed = stored.committed;
    if stored.session != Some(session) {
        Some(Applied::Superseded)
    } else if seq <= committed {
        Some(Applied::Duplicate { committed })
    } else if seq != committed + 1 {
        Some(Applied::Gap { committed })
    } else {
        None
    }
}

/// A closed key: its key string and its port.
#[derive(Debug, Clone)]
pub struct Close {
    pub lkey: String,
    pub port: u16,
}

/// A delta prepared for planning: upserts (opened, then changed) and closed keys.
#[derive(Debug)]
pub struct DeltaWork {
    pub upserts: Vec<Prepared>,
    pub closes: Vec<Close>,
}

impl DeltaWork {
    pub fn new(changes: Changes) -> DeltaWork {
        DeltaWork {
            closes: changes
                .closed
                .iter()
                .map(|k| Close {
                    lkey: lkey(k),
                    port: k.port,
                })
                .collect(),
            upserts: changes
                .opened
                .into_iter()
                .chain(changes.changed)
                .map(Prepared::new)
                .collect(),
        }
    }
}

/// The canonical key string stored in `listener.lkey` (unit-separator joined; unique per
/// live listener of a host).
pub fn lkey(k: &ListenerKey) -> String {
    let proto = match k.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    let v6only = match k.v6only {
        Some(true) => "1",
        Some(false) => "0",
        None => "-",
    };
    format!(
        "{}\u{1f}{proto}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{v6only}",
        k.netns,
        k.family.as_str(),
        k.address,
        k.port,
        k.interface.as_deref().unwrap_or("")
    )
}

/// Plans one message. `live` holds the host's live rows for (at least) every key the
/// message mentions; with `close_others` (snapshots) it must hold all of them.
pub fn plan<'a>(
    live: &HashMap<String, LiveRow>,
    upserts: &'a [Prepared],
    closes: &[Close],
    close_others: bool,
    at: OffsetDateTime,
) -> Plan<'a> {
    let mut p = Plan::default();
    let mut touched = std::collections::HashSet::new();
    for u in upserts {
        touched.insert(u.lkey.as_str());
        match live.get(&u.lkey) {
            None => p.insert.push(NewRow {
                prepared: u,
                first_seen: at,
                valid_from: at,
            }),
            Some(row) if row.material_hash != u.fingerprints.material => {
                p.close_changed.push(row.id);
                p.insert.push(NewRow {
                    prepared: u,
                    first_seen: row.first_seen,
                    valid_from: at.max(row.valid_from),
                });
            }
            Some(row) if row.full_hash != u.fingerprints.full => p.refresh.push((row.id, u)),
            Some(_) => {}
        }
    }
    for Close { lkey: k, .. } in closes {
        if touched.contains(k.as_str()) {
            continue; // opened again in the same message: the upsert wins
        }
        if let Some(row) = live.get(k) {
            p.close_closed.push(row.id);
        }
    }
    if close_others {
        for (k, row) in live {
            if !touched.contains(k.as_str()) {
                p.close_closed.push(row.id);
            }
        }
    }
    p.close_closed.sort_unstable();
    p.close_closed.dedup();
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use listenscope_core::domain::Reach;
    use listenscope_core::record::testkit::record;

    /// A dual-stack `:::port` owned by `pid`, reaching IPv4 as `reach4`.
    fn rec(port: u16, reach4: Reach, pid: u32) -> ListenerRecord {
        let mut r = record("host", "::", port, Some(false));
        r.reach_ipv4 = reach4;
        r.processes[0].pid = pid;
        r
    }

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    fn live_of(rows: &[(i64, &Prepared, i64)]) -> HashMap<String, LiveRow> {
        rows.iter()
            .map(|(id, p, first)| {
                (
                    p.lkey.clone(),
                    LiveRow {
                        id: *id,
                        material_hash: p.fingerprints.material,
                        full_hash: p.fingerprints.full,
                        first_seen: t(*first),
                        valid_from: t(*first),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn versions_and_refreshes() {
        let a = Prepared::new(rec(80, Reach::Any, 10));
        let b = Prepared::new(rec(443, Reach::Any, 10));
        let c = Prepared::new(rec(22, Reach::Any, 10));
        let live = live_of(&[(1, &a, 0), (2, &b, 0), (3, &c, 0)]);
        let a2 = Prepared::new(rec(80, Reach::None, 10)); // material change
        let b2 = Prepared::new(rec(443, Reach::Any, 11)); // pid churn only
        let d = Prepared::new(rec(8080, Reach::Any, 10)); // new
        let upserts = vec![a2, b2, d];
        let close = Close {
            lkey: c.lkey.clone(),
            port: 22,
        };
        let p = plan(&live, &upserts, std::slice::from_ref(&close), false, t(100));
        assert_eq!(p.close_changed, [1]);
        assert_eq!(p.close_closed, [3]);
        assert_eq!(p.refresh.iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
        let inserted: Vec<(u16, OffsetDateTime)> = p
            .insert
            .iter()
            .map(|n| (n.prepared.record.key.port, n.first_seen))
            .collect();
        assert_eq!(
            inserted,
            [(80, t(0)), (8080, t(100))],
            "a new version keeps first_seen"
        );
        assert_eq!(p.rows(), 5);
    }

    #[test]
    fn snapshot_closes_the_rest_and_repeats_are_noops() {
        let a = Prepared::new(rec(80, Reach::Any, 10));
        let b = Prepared::new(rec(443, Reach::Any, 10));
        let live = live_of(&[(1, &a, 0), (2, &b, 0)]);
        let snapshot = vec![a.clone()];
        let p = plan(&live, &snapshot, &[], true, t(5));
        assert_eq!(
            (p.close_closed.clone(), p.insert.len(), p.rows()),
            (vec![2], 0, 1)
        );
        // The same snapshot against the state it produced: nothing to do.
        let live = live_of(&[(1, &a, 0)]);
        assert_eq!(plan(&live, &snapshot, &[], true, t(6)).rows(), 0);
    }

    #[test]
    fn sequence_rules() {
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let st = |session: Option<&'static [u8; 16]>, committed, snap: Option<i64>| Stored {
            session: session.map(|s| &s[..]),
            committed,
            snapshot_at: snap.map(t),
        };
        static A: [u8; 16] = [1; 16];
        // Snapshots: a retry of the stored session is a duplicate; a newer one applies.
        assert_eq!(
            snapshot_rule(st(Some(&A), 5, Some(0)), &a, 5, t(9)),
            Some(Applied::Duplicate { committed: 5 })
        );
        assert_eq!(snapshot_rule(st(Some(&A), 5, Some(0)), &a, 6, t(9)), None);
        assert_eq!(
            snapshot_rule(st(Some(&A), 5, Some(0)), &b, 1, t(9)),
            None,
            "a newer session takes over"
        );
        assert_eq!(
            snapshot_rule(st(Some(&A), 5, Some(10)), &b, 1, t(9)),
            Some(Applied::Superseded),
            "an older session's stale snapshot does not roll the host back"
        );
        assert_eq!(snapshot_rule(st(None, 0, None), &a, 1, t(0)), None);
        // Deltas: only the next sequence of the stored session applies.
        assert_eq!(delta_rule(st(Some(&A), 5, None), &a, 6), None);
        assert_eq!(
            delta_rule(st(Some(&A), 5, None), &a, 5),
            Some(Applied::Duplicate { committed: 5 })
        );
        assert_eq!(
            delta_rule(st(Some(&A), 5, None), &a, 3),
            Some(Applied::Duplicate { committed: 5 })
        );
        assert_eq!(
            delta_rule(st(Some(&A), 5, None), &a, 7),
            Some(Applied::Gap { committed: 5 })
        );
        assert_eq!(
            delta_rule(st(Some(&A), 5, None), &b, 6),
            Some(Applied::Superseded)
        );
        assert_eq!(
            delta_rule(st(None, 0, None), &a, 1),
            Some(Applied::Superseded)
        );
    }

    #[test]
    fn keys_distinguish_v6only_and_interface() {
        let mut k = rec(80, Reach::Any, 1).key;
        let base = lkey(&k);
        k.v6only = Some(true);
        assert_ne!(lkey(&k), base);
        k.v6only = None;
        assert_ne!(lkey(&k), base);
        k.v6only = Some(false);
        k.interface = Some("eth0".into());
        assert_ne!(lkey(&k), base);
    }
}
