//! The collector's SQLite database fills its disk, then gets space back.
//!
//! A real collector on a database inside a small tmpfs, real agents in their own network
//! namespaces, and two hand-driven protocol clients (`h3`, `h4`) whose acknowledgements
//! the test sees directly. The tmpfs is filled to ENOSPC while listeners keep changing,
//! so stores fail with `database or disk is full`; then the filler goes. Without a
//! restart the collector must recover by itself:
//! - every acknowledged sequence is committed (a separate connection sees it at once);
//! - the store converges to what each agent's own scan shows, with no duplicate rows;
//! - no transaction is left open on the database (an outside `BEGIN IMMEDIATE` works);
//! - no change observed during the full period is lost, and each keeps its observation
//!   time (the agent keeps every unacknowledged delta and the collector never has to ask
//!   it for a snapshot, see docs/protocol.md and agent/src/transport/outbox.rs);
//! - after a graceful restart the database still holds everything acknowledged: the
//!   collector resumes every session where the agents' acknowledgements say.
//!
//! The fleet, the hand-driven clients, the filling and the checks are `util::faults`,
//! shared with `pg_faults.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use listenscope_collector::store::DbUrl;
use util::faults::*;
use util::*;

/// Takes SQLite's write lock from outside and gives it back: fails ("database is
/// locked") while another connection holds a write transaction open.
async fn outside_write_lock(path: &Path) -> Result<(), String> {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::SqliteConnectOptions;
    let mut c = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let r = sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut c).await;
    let r = match r {
        Ok(_) => sqlx::raw_sql("ROLLBACK")
            .execute(&mut c)
            .await
            .map(|_| ())
            .map_err(|e| format!("ROLLBACK: {e}")),
        Err(e) => Err(format!("BEGIN IMMEDIATE: {e}")),
    };
    let _ = sqlx::Connection::close(c).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_survives_a_full_disk() {
    require_root();
    let started = Instant::now();
    let pki = Pki::new(&["h1", "h2", "h3", "h4"]);
    let logs = TempDir::new("diskfull-logs");
    let _show = Fleet::logs_on_panic(logs.path(), []);
    // Declared before every process: dropped (unmounted) after they are killed.
    let fs = Tmpfs::mount("diskfull-fs", "24m", None);
    let db_path = fs.path().join("ls.db");
    let db = DbUrl::Sqlite(db_path.clone());

    let mut fleet = Fleet::start(&pki, &db, logs.path()).await;
    let raw = fleet.raw;
    let collector_log = fleet.log("collector-1.log");

    // h3, driven by hand: its snapshot is acknowledged (and committed) before the disk fills.
    let mut h3 = RawAgent::new("h3", 3, snapshot(1, vec![listener("h3-ns", 1000)]));
    h3.deliver(&pki, raw, &db, 20).await;
    let (h3_session, resume) = h3.open_raw(&pki, raw).await.expect("h3 reconnects");
    assert_eq!(resume, Some(1));

    // ---- The disk fills, while listeners keep changing: the agents queue deltas the
    // collector cannot commit. h3 sends a delta on the session it has open, then retries
    // like an agent. ----
    let h3_deltas = [
        (2, delta(2, vec![listener("h3-ns", 1001)], vec![])),
        (
            3,
            delta(3, vec![], vec![listener("h3-ns", 1000).key.unwrap()]),
        ),
    ];
    let failure = "database or disk is full";
    let mut full = fleet
        .fill_up(&fs, &pki, &mut h3, h3_session, h3_deltas, &[failure])
        .await;
    let full_log_lines = count_lines(&collector_log, failure);

    // ---- Space returns. The collector is not restarted. ----
    full.free(&fs);

    // h3's lost delta and one more are acknowledged, and each Ack is already committed.
    h3.deliver(&pki, raw, &db, 60).await;
    // A host that first connects now: its acknowledged snapshot is committed.
    let mut h4 = RawAgent::new("h4", 4, snapshot(1, vec![listener("h4-ns", 4000)]));
    h4.deliver(&pki, raw, &db, 60).await;

    // The store converges to reality, by itself, and no change observed while the disk was
    // full is lost or re-timed; h4's acknowledged snapshot is there at once.
    let h3_want = raw_keys([1001]);
    let h4_want = raw_keys([4000]);
    let changed = full.changed();
    fleet
        .check_recovered(&[("h3", h3_want.clone())], &changed, 60)
        .await;
    assert_eq!(stored(&db, "h4").await, h4_want);

    // Nothing holds the database in an open transaction.
    if let Err(e) = outside_write_lock(&db_path).await {
        panic!(
            "after recovery the collector still holds a write transaction open: an outside \
             {e}"
        );
    }

    // ---- Graceful restart on the same file: everything acknowledged is still there. ----
    fleet
        .graceful_restart(&pki, &[(&h3, h3_want), (&h4, h4_want)], &changed)
        .await;
    let refused = fleet.refusals();
    eprintln!(
        "disk_full: {} bytes of filler; {full_log_lines} `database or disk is full` log \
         lines; storage failures seen by h1, h2: {refused:?}; h3 while full: {:?}; \
         {:.1}s in all",
        full.filled,
        full.retries,
        started.elapsed().as_secs_f64()
    );
}
