//! The protocol as a plain model, for the property tests (`protocol_props.rs`): what a
//! collector must store and answer for each message of a session, written from
//! docs/protocol.md and the .proto (where they leave an order open, such as a delta in the
//! middle of a chunked snapshot being refused even while deltas are dropped after a
//! Resync, the model says what `ingest.rs` does and the docs now say it too), plus a
//! reader of what the store actually holds, through the read-only query path.
//!
//! The model covers the session and sequence rules (Hello and resume, chunk order and
//! duplicate keys, snapshots replacing the state, deltas applying at exactly committed+1,
//! duplicates acknowledged again, gaps answered with Resync, deltas ignored until the
//! snapshot a Resync asked for, stale snapshots of another session refused) and the watch
//! mode (the Hello's, written with it; a heartbeat's change written within a second, so
//! any mode reported since the Hello may be the stored one until then). Whether a
//! field value is valid is the generator's to say (an invalid message is built as such);
//! `core/tests/wire_props.rs` holds the field rules to their specification.

use std::collections::BTreeSet;
use std::net::IpAddr;

use listenscope_collector::query::ReadOnly;
use listenscope_core::domain::{Container, ProcessInfo};
use listenscope_core::fingerprint::fingerprints;
use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord, State};
use listenscope_core::watch::Watch;
use listenscope_proto::v1;
use serde_json::Value;
use time::OffsetDateTime;

/// What the collector must answer to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Nothing (a chunk before the last, a heartbeat, a delta sent before a resync).
    Nothing,
    Ack(u64),
    Resync,
    /// The stream ends with this status; the store is unchanged by the message.
    End(tonic::Code),
}

/// What the session expects next (docs/protocol.md, "A session").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Snapshot,
    After(u64),
}

#[derive(Debug, Clone)]
struct Assembling {
    seq: u64,
    at: OffsetDateTime,
    next_chunk: u32,
    keys: BTreeSet<ListenerKey>,
    records: Vec<ListenerRecord>,
}

#[derive(Debug, Clone)]
struct Conn {
    session: [u8; 16],
    expect: Expect,
    assembling: Option<Assembling>,
}

/// One host as the collector must keep it: the stored part (what the database holds)
/// and the live connection's part.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// A valid Hello was stored (the host row exists).
    pub host_exists: bool,
    pub os_hostname: String,
    pub agent_version: String,
    /// The session whose messages are committed, and its last committed sequence.
    pub session: Option<[u8; 16]>,
    pub committed: u64,
    /// Observation time of the stored snapshot.
    pub snapshot_at: Option<OffsetDateTime>,
    /// The last valid snapshot with the deltas applied since.
    pub state: State,
    /// The watch mode the last valid Hello stored (text form and reason; None: NULL).
    pub watch: StoredWatch,
    /// The watch modes heartbeats reported since that Hello, in order: written by the
    /// next group commit, so each may be the stored one for a moment, and the last one
    /// is once they settle.
    pub watch_reported: Vec<StoredWatch>,
    conn: Option<Conn>,
}

/// A watch mode as the `host` row holds it: (`watch_mode`, `watch_reason`), None for NULL.
pub type StoredWatch = Option<(String, Option<String>)>;

fn stored_watch(w: &Watch) -> StoredWatch {
    Some((w.mode.to_string(), w.reason.clone()))
}

impl Model {
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The connection waits for a snapshot (after a Welcome without `resume_after`, or a
    /// Resync): deltas are dropped unanswered.
    pub fn expects_snapshot(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.expect == Expect::Snapshot)
    }

    pub fn assembling(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.assembling.is_some())
    }

    /// The connection ended (an error status, or the agent closed it).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// A valid Hello: the host row is stored; the Welcome's `resume_after`.
    pub fn hello(
        &mut self,
        session: [u8; 16],
        acked: u64,
        os_hostname: &str,
        agent_version: &str,
        watch: Option<&Watch>,
    ) -> Option<u64> {
        self.host_exists = true;
        self.os_hostname = os_hostname.to_string();
        self.agent_version = agent_version.to_string();
        self.watch = watch.and_then(stored_watch);
        self.watch_reported.clear();
        let resume =
            (self.session == Some(session) && self.committed >= acked).then_some(self.committed);
        self.conn = Some(Conn {
            session,
            expect: resume.map_or(Expect::Snapshot, Expect::After),
            assembling: None,
        });
        resume
    }

    /// A message that breaks a rule (a bad field, a second Hello, an oversized message, a
    /// first message that is not a valid Hello): INVALID_ARGUMENT, nothing stored.
    pub fn invalid(&mut self) -> Answer {
        self.conn = None;
        Answer::End(tonic::Code::InvalidArgument)
    }

    /// A heartbeat with a valid time and, if any, a valid watch mode (which the
    /// connection's host then reports; written asynchronously).
    pub fn heartbeat(&mut self, watch: Option<&Watch>) -> Answer {
        if let Some(w) = watch {
            self.watch_reported.push(stored_watch(w));
        }
        Answer::Nothing
    }

    /// The watch mode the store holds once the heartbeats' writes are done.
    pub fn watch_settled(&self) -> StoredWatch {
        self.watch_reported
            .last()
            .cloned()
            .unwrap_or_else(|| self.watch.clone())
    }

    /// A snapshot chunk whose fields are valid.
    pub fn chunk(
        &mut self,
        seq: u64,
        index: u32,
        last: bool,
        at: OffsetDateTime,
        records: &[ListenerRecord],
    ) -> Answer {
        let conn = self.conn.as_mut().expect("a chunk needs a session");
        if seq == 0 {
            return self.invalid();
        }
        let a = match &mut conn.assembling {
            None if index != 0 => return self.invalid(),
            None => conn.assembling.insert(Assembling {
                seq,
                at,
                next_chunk: 0,
                keys: BTreeSet::new(),
                records: Vec::new(),
            }),
            Some(a) if seq != a.seq || index != a.next_chunk || at != a.at => {
                return self.invalid();
            }
            Some(a) => a,
        };
        for r in records {
            if !a.keys.insert(r.key.clone()) {
                return self.invalid(); // a key twice in one snapshot
            }
            a.records.push(r.clone());
        }
        a.next_chunk += 1;
        if !last {
            return Answer::Nothing;
        }
        let snap = conn.assembling.take().expect("assembling");
        let mine = self.session == Some(conn.session);
        if mine && self.committed >= seq {
            conn.expect = Expect::After(self.committed);
            return Answer::Ack(self.committed);
        }
        if !mine && self.snapshot_at.is_some_and(|stored| at < stored) {
            self.conn = None;
            return Answer::End(tonic::Code::Aborted);
        }
        self.state = snap
            .records
            .into_iter()
            .map(|r| (r.key.clone(), r))
            .collect();
        self.session = Some(conn.session);
        self.committed = seq;
        self.snapshot_at = Some(at);
        conn.expect = Expect::After(seq);
        Answer::Ack(seq)
    }

    /// A delta whose fields are valid.
    pub fn delta(
        &mut self,
        seq: u64,
        opened: &[ListenerRecord],
        changed: &[ListenerRecord],
        closed: &[ListenerKey],
    ) -> Answer {
        let conn = self.conn.as_mut().expect("a delta needs a session");
        let mut keys = BTreeSet::new();
        let all = opened.iter().chain(changed).map(|r| &r.key).chain(closed);
        if seq == 0 || !all.into_iter().all(|k| keys.insert(k)) || conn.assembling.is_some() {
            return self.invalid();
        }
        if conn.expect == Expect::Snapshot {
            return Answer::Nothing; // sent before the agent learnt it must resync
        }
        if self.session != Some(conn.session) {
            self.conn = None;
            return Answer::End(tonic::Code::Aborted);
        }
        if seq <= self.committed {
            conn.expect = Expect::After(self.committed);
            return Answer::Ack(self.committed);
        }
        if seq != self.committed + 1 {
            conn.expect = Expect::Snapshot;
            return Answer::Resync;
        }
        for r in opened.iter().chain(changed) {
            self.state.insert(r.key.clone(), r.clone());
        }
        for k in closed {
            self.state.remove(k);
        }
        self.committed = seq;
        conn.expect = Expect::After(seq);
        Answer::Ack(seq)
    }
}

/// What the store holds for one host, read through the read-only path.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub exists: bool,
    pub os_hostname: String,
    pub agent_version: String,
    pub watch: StoredWatch,
    /// Hex, lower case.
    pub session: Option<String>,
    pub committed: u64,
    /// The current listeners.
    pub live: State,
    /// Every version ever stored (current and closed), for the invariants.
    pub versions: Vec<ListenerRecord>,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `host`'s row and every version of its listeners. Each version is decoded back into a
/// record here (independently of the store's own decoder) and its stored fingerprints
/// are checked against `core::fingerprint` (they must not depend on the path a record
/// took); two current rows with one key fail.
pub async fn read_store(ro: &ReadOnly, host: &str) -> Stored {
    let sql = |s: &str| match ro {
        ReadOnly::Postgres(_) => s.replace("?1", "$1"),
        ReadOnly::Sqlite(_) => s.to_string(),
    };
    let param = || {
        [listenscope_collector::query::Param::Text(Some(
            host.to_string(),
        ))]
    };
    let h = ro
        .run(
            &sql(
                "SELECT session_id, committed_seq, os_hostname, agent_version, watch_mode, \
                  watch_reason FROM host WHERE name = ?1",
            ),
            &param(),
        )
        .await
        .unwrap();
    let mut out = Stored::default();
    if let Some(row) = h.rows.first() {
        out.exists = true;
        out.session = row[0].as_str().map(str::to_lowercase);
        out.committed = u64::try_from(row[1].as_i64().unwrap()).unwrap();
        out.os_hostname = row[2].as_str().unwrap().to_string();
        out.agent_version = row[3].as_str().unwrap().to_string();
        out.watch = row[4]
            .as_str()
            .map(|mode| (mode.to_string(), row[5].as_str().map(str::to_string)));
    }
    let rows = ro
        .run(
            &sql(
                "SELECT l.netns, l.netns_inode, l.protocol, l.family, l.address, l.port, \
                  l.interface, l.v6only, l.reach_ipv4, l.reach_ipv6, l.latent, l.shown_as, \
                  l.netstat_proto, l.trap, l.hidden_ipv4_exposure, l.processes, \
                  l.container_runtime, l.container_id, l.pod_uid, l.unit, l.cgroup, l.uid, \
                  l.freebind, l.transparent, l.source, l.sockets, l.effective_ipv4, \
                  l.effective_ipv6, l.effective_reason_ipv4, l.effective_reason_ipv6, \
                  l.effective_conditions_ipv4, l.effective_conditions_ipv6, \
                  l.material_hash, l.full_hash, l.valid_to IS NULL AS live \
                  FROM listener l JOIN host h ON h.id = l.host_id WHERE h.name = ?1 \
                  ORDER BY l.id",
            ),
            &param(),
        )
        .await
        .unwrap();
    for row in &rows.rows {
        let r = decode(row);
        let f = fingerprints(&r);
        assert_eq!(
            (row[32].as_i64().unwrap(), row[33].as_i64().unwrap()),
            (f.material, f.full),
            "stored fingerprints of {r:?}"
        );
        if boolean(&row[34]).unwrap() {
            let key = r.key.clone();
            assert!(
                out.live.insert(key.clone(), r.clone()).is_none(),
                "two current rows for {key:?}"
            );
        }
        out.versions.push(r);
    }
    out
}

fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(*b),
        Value::Number(n) => Some(n.as_i64().unwrap() != 0),
        other => panic!("not a boolean: {other:?}"),
    }
}

fn text(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not text: {v:?}"))
        .to_string()
}

fn opt_text(v: &Value) -> Option<String> {
    (!v.is_null()).then(|| text(v))
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("not an integer: {v:?}"))
}

fn answer(verdict: &Value, reason: &Value, conditions: &Value) -> FirewallAnswer {
    let conditions = text(conditions);
    FirewallAnswer {
        verdict: text(verdict).parse().unwrap(),
        reason: text(reason),
        conditions: if conditions.is_empty() {
            Vec::new()
        } else {
            conditions.split('\n').map(String::from).collect()
        },
    }
}

/// One `listener` row (the columns of [`read_store`]'s query) as a record.
fn decode(row: &[Value]) -> ListenerRecord {
    let processes: Vec<ProcessInfo> = match &row[15] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        v => serde_json::from_value(v.clone()).unwrap(),
    };
    let address: IpAddr = text(&row[4]).parse().unwrap();
    ListenerRecord {
        key: ListenerKey {
            netns: text(&row[0]),
            protocol: text(&row[2]).parse().unwrap(),
            family: text(&row[3]).parse().unwrap(),
            address,
            port: u16::try_from(int(&row[5])).unwrap(),
            interface: opt_text(&row[6]),
            v6only: boolean(&row[7]),
        },
        netns_inode: int(&row[1]) as u64,
        reach_ipv4: text(&row[8]).parse().unwrap(),
        reach_ipv6: text(&row[9]).parse().unwrap(),
        latent: boolean(&row[10]).unwrap(),
        shown_as: text(&row[11]),
        netstat_proto: text(&row[12]),
        trap: boolean(&row[13]).unwrap(),
        hidden_ipv4_exposure: boolean(&row[14]).unwrap(),
        processes,
        container: opt_text(&row[16]).map(|runtime| Container {
            runtime,
            id: opt_text(&row[17]).unwrap_or_default(),
            pod_uid: opt_text(&row[18]),
        }),
        unit: opt_text(&row[19]),
        cgroup: opt_text(&row[20]),
        uid: u32::try_from(int(&row[21])).unwrap(),
        freebind: boolean(&row[22]),
        transparent: boolean(&row[23]),
        source: text(&row[24]).parse().unwrap(),
        sockets: u32::try_from(int(&row[25]))
            .unwrap_or_else(|_| panic!("stored sockets {} is not a count", row[25])),
        effective_ipv4: answer(&row[26], &row[28], &row[30]),
        effective_ipv6: answer(&row[27], &row[29], &row[31]),
    }
}

/// The store holds exactly what the model says: the host row (or none), the committed
/// session and sequence, the current listeners field for field, and nothing stored, in
/// any version, that the protocol edge would refuse now.
pub fn assert_store_is_model(stored: &Stored, model: &Model, when: &str) {
    assert_eq!(stored.exists, model.host_exists, "{when}: host row");
    if !model.host_exists {
        return;
    }
    assert_eq!(
        (&stored.os_hostname, &stored.agent_version),
        (&model.os_hostname, &model.agent_version),
        "{when}: the host row has the last valid Hello's texts"
    );
    assert!(
        stored.watch == model.watch || model.watch_reported.contains(&stored.watch),
        "{when}: the stored watch mode {:?} is neither the last valid Hello's {:?} nor one \
         a heartbeat reported since {:?}",
        stored.watch,
        model.watch,
        model.watch_reported
    );
    assert_eq!(
        (stored.session.clone(), stored.committed),
        (model.session.map(|s| hex(&s)), model.committed),
        "{when}: committed session and sequence"
    );
    if stored.live != model.state {
        let only_store: Vec<_> = stored
            .live
            .iter()
            .filter(|(k, v)| model.state.get(*k) != Some(*v))
            .collect();
        let only_model: Vec<_> = model
            .state
            .iter()
            .filter(|(k, v)| stored.live.get(*k) != Some(*v))
            .collect();
        panic!(
            "{when}: the store's current listeners differ from the last valid snapshot plus \
             the deltas applied since.\nstore only/different: {only_store:#?}\nmodel only/\
             different: {only_model:#?}"
        );
    }
    for r in &stored.versions {
        let again = ListenerRecord::try_from(v1::Listener::from(r));
        assert_eq!(
            again.as_ref(),
            Ok(r),
            "{when}: a stored version the edge refuses"
        );
    }
}
