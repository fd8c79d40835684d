//! Upgrading the collector must not rewrite history: a database written by the 0.1.0
//! release (fingerprints from FxHash over serde_json), served by this collector, with the
//! same agents sending the same state, records zero `changed` (or any other) events.
//! The fixture and how it was made: `tests/fixtures/README.md`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use listenscope_collector::store::{Applied, DbUrl, Store, StoreOptions};
use listenscope_core::diff::Changes;
use listenscope_core::domain::{Container, Family, ProcessInfo, Protocol, Reach, Source};
use listenscope_core::fingerprint::fingerprints;
use listenscope_core::record::{ListenerKey, ListenerRecord};
use time::OffsetDateTime;
use util::{TempDir, query};

include!("fixtures/records.rs");

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
    let t2 = OffsetDateTime::from_unix_timestamp(1_790_000_000 + 3600).unwrap();
    for n in 1..=3u32 {
        let name = format!("h{n}");
        let h = store.hello(&name, &name, "0.2.0", t2).await.unwrap();
        // A restarted agent: a new session, the same state.
        let applied = store
            .apply_snapshot(h.host_id, &[100 + n as u8; 16], 1, t2, fixture_state(n), t2)
            .await
            .unwrap();
        assert_eq!(applied, Applied::Committed { rows: 0 }, "{name}");
    }
    store.close().await;

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
