//! Upgrading the collector must not rewrite history: a database written by the 0.1.0
//! release (fingerprints from FxHash over serde_json), served by this collector, with the
//! same agents sending the same state, records zero `changed` (or any other) events.
//! The fixture and how it was made: `tests/fixtures/README.md`.
//!
//! The same agents are agents of that release: they report no firewall verdicts, so the
//! collector stores `unknown` for them, as migration 0007 did for the rows it found. Only
//! the verdicts' reason differs (stored before verdicts / not reported by the agent): a
//! refresh in place, never a version.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use listenscope_collector::store::{Applied, DbUrl, Store, StoreOptions};
use listenscope_core::domain::Reach;
use listenscope_core::fingerprint::fingerprints;
use listenscope_core::record::{
    FirewallAnswer, ListenerRecord, NOT_REPORTED, STORED_BEFORE_VERDICTS,
};
use time::OffsetDateTime;
use util::{TempDir, query};

/// The fixture's records in the shape of the release that wrote it: `fixtures/records.rs`
/// is plain struct literals of that release's types, kept as they were, so it compiles
/// here against a copy of those types.
mod release_0_1_0 {
    use listenscope_core::domain::{Container, Family, ProcessInfo, Protocol, Reach, Source};
    use listenscope_core::record::ListenerKey;

    /// `ListenerRecord` of 0.1.0 (no firewall verdicts).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ListenerRecord {
        pub key: ListenerKey,
        pub netns_inode: u64,
        pub reach_ipv4: Reach,
        pub reach_ipv6: Reach,
        pub latent: bool,
        pub shown_as: String,
        pub netstat_proto: String,
        pub trap: bool,
        pub hidden_ipv4_exposure: bool,
        pub processes: Vec<ProcessInfo>,
        pub container: Option<Container>,
        pub unit: Option<String>,
        pub cgroup: Option<String>,
        pub uid: u32,
        pub freebind: Option<bool>,
        pub transparent: Option<bool>,
        pub source: Source,
        pub sockets: u32,
    }

    /// `Changes` of 0.1.0, over its records.
    pub struct Changes {
        #[allow(dead_code)] // the fixture's delta opens nothing; its text still names it
        pub opened: Vec<ListenerRecord>,
        pub closed: Vec<ListenerKey>,
        pub changed: Vec<ListenerRecord>,
    }

    include!("fixtures/records.rs");

    /// Host `n`'s state after the fixture's snapshot and delta.
    pub fn state(n: u32) -> Vec<ListenerRecord> {
        fixture_state(n)
    }
}

/// Host `n`'s state as today's collector receives it from its 0.1.0 agent: no verdicts
/// on the wire, so `unknown` for the reason [`NOT_REPORTED`].
fn fixture_state(n: u32) -> Vec<ListenerRecord> {
    release_0_1_0::state(n)
        .into_iter()
        .map(|r| ListenerRecord {
            key: r.key,
            netns_inode: r.netns_inode,
            reach_ipv4: r.reach_ipv4,
            reach_ipv6: r.reach_ipv6,
            latent: r.latent,
            shown_as: r.shown_as,
            netstat_proto: r.netstat_proto,
            trap: r.trap,
            hidden_ipv4_exposure: r.hidden_ipv4_exposure,
            processes: r.processes,
            container: r.container,
            unit: r.unit,
            cgroup: r.cgroup,
            uid: r.uid,
            freebind: r.freebind,
            transparent: r.transparent,
            source: r.source,
            sockets: r.sockets,
            effective_ipv4: FirewallAnswer::not_reported(),
            effective_ipv6: FirewallAnswer::not_reported(),
        })
        .collect()
}

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/upgrade-0.1.0.db"
);

async fn count(db: &DbUrl, sql: &str) -> i64 {
    query(db, sql, &[]).await.rows[0][0].as_i64().unwrap()
}

#[tokio::test]
async fn old_database_records_no_false_history() {
    let dir = TempDir::new("upgrade");
    let path = dir.path().join("ls.db");
    std::fs::copy(FIXTURE, &path).unwrap();
    let db = DbUrl::Sqlite(path);

    // The fixture really holds other fingerprints than today's: without the upgrade step
    // every listener would look changed (so this test can fail).
    let old: Vec<(i64,)> = {
        let rs = query(
            &db,
            "SELECT l.material_hash FROM listener l JOIN host h ON h.id = l.host_id
             WHERE h.name = 'h1' AND l.valid_to IS NULL ORDER BY l.port, l.protocol",
            &[],
        )
        .await;
        rs.rows.iter().map(|r| (r[0].as_i64().unwrap(),)).collect()
    };
    let mut state = fixture_state(1);
    state.sort_by_key(|r| (r.key.port, r.key.protocol));
    assert_eq!(old.len(), state.len());
    let differing = old
        .iter()
        .zip(&state)
        .filter(|((h,), r)| *h != fingerprints(r).material)
        .count();
    assert_eq!(
        differing,
        state.len(),
        "the fixture should predate the stable scheme"
    );

    let events_before = count(&db, "SELECT count(*) FROM listener_changes").await;
    let rows_before = count(&db, "SELECT count(*) FROM listener").await;

    let store = Store::open(&db, &StoreOptions::default()).await.unwrap();
    assert_eq!(
        query(
            &db,
            "SELECT value FROM setting WHERE key = 'fingerprint_scheme'",
            &[]
        )
        .await
        .rows[0][0],
        serde_json::json!(listenscope_core::fingerprint::SCHEME)
    );
    // Migration 0007 gave the stored rows `unknown`, saying why.
    assert_eq!(
        query(
            &db,
            "SELECT DISTINCT effective_ipv4, effective_reason_ipv4, effective_ipv6,
                    effective_reason_ipv6, effective_conditions_ipv4
             FROM listener_versions",
            &[]
        )
        .await
        .rows,
        [[
            serde_json::json!("unknown"),
            serde_json::json!(STORED_BEFORE_VERDICTS),
            serde_json::json!("unknown"),
            serde_json::json!(STORED_BEFORE_VERDICTS),
            serde_json::Value::Null,
        ]]
    );
    let t2 = OffsetDateTime::from_unix_timestamp(1_790_000_000 + 3600).unwrap();
    for n in 1..=3u32 {
        let name = format!("h{n}");
        let h = store.hello(&name, &name, "0.2.0", t2).await.unwrap();
        // A restarted agent: a new session, the same state. Only the verdicts' reason is
        // new (not reported by the agent): every live row refreshed in place.
        let state = fixture_state(n);
        let rows = state.len();
        let applied = store
            .apply_snapshot(h.host_id, &[100 + n as u8; 16], 1, t2, state.clone(), t2)
            .await
            .unwrap();
        assert_eq!(applied, Applied::Committed { rows }, "{name}");
        // The same state again: nothing to write at all.
        let applied = store
            .apply_snapshot(h.host_id, &[100 + n as u8; 16], 2, t2, state, t2)
            .await
            .unwrap();
        assert_eq!(applied, Applied::Committed { rows: 0 }, "{name}");
    }
    store.close().await;
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM current_listeners
                 WHERE effective_reason_ipv4 <> '{NOT_REPORTED}' OR effective_ipv4 <> 'unknown'"
            )
        )
        .await,
        0
    );

    assert_eq!(
        count(&db, "SELECT count(*) FROM listener_changes").await,
        events_before
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM listener").await,
        rows_before
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM listener_changes WHERE change = 'changed' AND at > '2026-09-21 14:15:00'").await,
        0
    );

    // Reopening does not recompute again, and a real change is still seen as one.
    let store = Store::open(&db, &StoreOptions::default()).await.unwrap();
    let h = store.hello("h1", "h1", "0.2.0", t2).await.unwrap();
    let mut next = fixture_state(1);
    next[0].reach_ipv4 = Reach::None;
    let t3 = t2 + time::Duration::seconds(10);
    let applied = store
        .apply_snapshot(h.host_id, &[7; 16], 1, t3, next, t3)
        .await
        .unwrap();
    assert_eq!(applied, Applied::Committed { rows: 2 });
    store.close().await;
}
