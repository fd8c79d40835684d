//! The collector's PostgreSQL server fails under it, then comes back: acknowledged must
//! still mean committed. The PostgreSQL counterpart of `disk_full.rs`, built the same way:
//! a real collector on a throwaway server (util::pg), real agents in their own network
//! namespaces, and hand-driven protocol clients whose every acknowledgement is checked at
//! once against the host's `committed_seq`, read over a separate connection. What the
//! two tests share is `util::faults`.
//!
//! - `pg_tablespace_fills_up`: the collector's database lives in a tablespace on a small
//!   tmpfs, which is filled while listeners keep changing: table and index extension fails
//!   with ENOSPC ("could not extend file … No space left on device"). Then space returns.
//! - `pg_server_stops_and_restarts`: while agents change listeners and a hand-driven host
//!   streams deltas without pause, the server is stopped, first by a fast shutdown, then
//!   by a crash (SIGKILL to the postmaster), and started again on the same data directory
//!   and port. Each time, a transaction of the collector is caught in flight (waiting for
//!   a row lock that a prepared transaction of the test holds through the outage), so the
//!   store certainly fails mid-transaction. Other messages sent while the server is down
//!   mostly wait in the collector's pool (up to its 30s acquire timeout) and are stored
//!   once it is back.
//!
//! Without restarting the collector, each scenario then checks: every Ack and every
//! Welcome's `resume_after` was committed when the client saw it; the store converges to
//! each agent's own scan, with no duplicate live rows and no transaction left open; no
//! change observed during the fault is lost or re-timed (no agent had to start over from
//! a snapshot); after a graceful restart the collector resumes every session.
//!
//! The collector's database has `synchronous_commit = on` (the throwaway server runs with
//! it off for speed): a commit the collector saw must survive a server crash.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use listenscope_collector::store::DbUrl;
use listenscope_collector::timefmt::format as fmt_time;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use time::OffsetDateTime;
use tonic::Code;
use util::faults::*;
use util::pg::{PgServer, Shutdown};
use util::*;

/// Runs one statement as the server's superuser (`CREATE DATABASE` refuses a transaction
/// block, so one statement per call).
async fn admin(server: &PgServer, db: &str, sql: &str) {
    let url = format!("postgres://listenscope@127.0.0.1:{}/{db}", server.port);
    let mut c = PgConnection::connect(&url).await.expect("connect as admin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = c.close().await;
}

/// A new database for the collector, in `tablespace` if given, where every commit waits
/// for its WAL to be written (so it survives a server crash).
async fn create_database(server: &PgServer, name: &str, tablespace: Option<&str>) -> DbUrl {
    let ts = tablespace
        .map(|t| format!(" TABLESPACE {t}"))
        .unwrap_or_default();
    admin(server, "postgres", &format!("CREATE DATABASE {name}{ts}")).await;
    admin(
        server,
        "postgres",
        &format!("ALTER DATABASE {name} SET synchronous_commit = on"),
    )
    .await;
    let db = DbUrl::Postgres(format!(
        "postgres://listenscope@127.0.0.1:{}/{name}",
        server.port
    ));
    // On a connection of its own: the reports' read-only open refuses a database the
    // collector has not created its tables in yet.
    let DbUrl::Postgres(url) = &db else {
        unreachable!()
    };
    let mut c = PgConnection::connect(url).await.expect("connect");
    let (sync,): (String,) = sqlx::query_as("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let _ = c.close().await;
    assert_eq!(sync, "on", "synchronous_commit");
    db
}

/// What the load client streamed.
struct Load {
    agent: RawAgent,
    /// Its ports live once everything it sent is stored.
    live: BTreeSet<u32>,
    /// Sessions that ended in UNAVAILABLE (or could not be opened).
    failures: Vec<String>,
}

/// Host `h5`: one delta after another (each opens or closes a listener), the next sent as
/// soon as the previous is acknowledged, reconnecting and resending after a failure. Every
/// Ack is checked against the database (retried while the server is down). Runs until
/// `stop`, then delivers what is still pending.
async fn load(pki: Arc<Pki>, addr: SocketAddr, db: DbUrl, stop: Arc<AtomicBool>) -> Load {
    let mut agent = RawAgent::new("h5", 5, snapshot(1, vec![listener("h5-ns", 5000)])).patient();
    let mut live = BTreeSet::from([5000u32]);
    let mut seq = 1u64;
    let mut failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    'session: loop {
        assert!(
            Instant::now() < deadline,
            "h5: the load did not finish within 300s; failures: {failures:?}"
        );
        if stop.load(Ordering::SeqCst) && agent.pending.is_empty() {
            break;
        }
        let (mut s, resume) = match agent.open_raw(&pki, addr).await {
            Ok(x) => x,
            Err(st) if st.code() == Code::Unavailable => {
                failures.push(format!("hello: {}", st.message()));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(st) => panic!("h5: session refused: {st}"),
        };
        agent.check_resume(resume, &db).await;
        for (_, m) in &agent.pending {
            if let Err(e) = agent.send(&s, m.clone()).await {
                failures.push(e);
                continue 'session;
            }
        }
        loop {
            if let Err(e) = agent.read_acks(&mut s, &db).await {
                failures.push(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'session;
            }
            if stop.load(Ordering::SeqCst) {
                break 'session;
            }
            seq += 1;
            let port = 5001 + (seq % 16) as u32;
            let m = if live.remove(&port) {
                delta(seq, vec![], vec![listener("h5-ns", port).key.unwrap()])
            } else {
                live.insert(port);
                delta(seq, vec![listener("h5-ns", port)], vec![])
            };
            agent.pending.push((seq, m.clone()));
            if let Err(e) = agent.send(&s, m).await {
                failures.push(e);
                continue 'session;
            }
        }
    }
    Load {
        agent,
        live,
        failures,
    }
}

/// No connection to the database sits in an aborted transaction or in one open for over
/// 10s: the collector's transactions last milliseconds, so such a one was left behind.
async fn no_transaction_left_open(db: &DbUrl) {
    wait_for_async(
        Duration::from_secs(30),
        "no transaction left open on the database",
        || async {
            let rs = q(
                db,
                "SELECT pid, state, xact_start, query FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND (state = 'idle in transaction (aborted)'
                    OR xact_start < now() - interval '10 seconds')",
                &[],
            )
            .await;
            match rs.rows.is_empty() {
                true => Ok(()),
                false => Err(format!("{:?}", rs.rows)),
            }
        },
    )
    .await;
}

const ENOSPC_LINES: [&str; 2] = ["No space left on device", "could not extend file"];

fn enospc_lines(p: &Path) -> usize {
    read(p)
        .lines()
        .filter(|l| ENOSPC_LINES.iter().any(|m| l.contains(m)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_tablespace_fills_up() {
    require_root();
    let started = Instant::now();
    let pki = Pki::new(&["h1", "h2", "h3", "h4"]);
    let logs = TempDir::new("pgfull-logs");
    // Declared before the server: dropped (unmounted) after it has stopped. Owned by the
    // server's user.
    let fs = Tmpfs::mount("pgfull-fs", "32m", Some(65534));
    let ts_dir = fs.path().join("ts");
    std::fs::create_dir(&ts_dir).unwrap();
    std::os::unix::fs::chown(&ts_dir, Some(65534), Some(65534)).unwrap();
    let server = tokio::task::block_in_place(PgServer::start);
    let _show = Fleet::logs_on_panic(logs.path(), [server.log_path()]);
    admin(
        &server,
        "postgres",
        &format!("CREATE TABLESPACE small LOCATION '{}'", ts_dir.display()),
    )
    .await;
    let db = create_database(&server, "pgfull", Some("small")).await;

    let mut fleet = Fleet::start(&pki, &db, logs.path()).await;
    let raw = fleet.raw;
    let collector_log = fleet.log("collector-1.log");

    // h3, driven by hand: its snapshot is acknowledged (and committed) before the disk fills.
    let mut h3 = RawAgent::new("h3", 3, snapshot(1, vec![listener("h3-ns", 1000)])).patient();
    h3.deliver(&pki, raw, &db, 20).await;
    let h3_session = h3.open(&pki, raw, &db).await;

    // ---- The tablespace fills, while listeners keep changing. h3 sends a delta that
    // needs new pages (300 rows) on the session it has open, then retries like an agent. ----
    let h3_deltas = [
        (
            2,
            delta(
                2,
                (1001..=1300).map(|p| listener("h3-ns", p)).collect(),
                vec![],
            ),
        ),
        (
            3,
            delta(3, vec![], vec![listener("h3-ns", 1000).key.unwrap()]),
        ),
    ];
    let mut full = fleet
        .fill_up(&fs, &pki, &mut h3, h3_session, h3_deltas, &ENOSPC_LINES)
        .await;
    let full_log_lines = enospc_lines(&collector_log);
    let store_failures = count_lines(&collector_log, "Store failure");

    // ---- Space returns. The collector is not restarted. ----
    full.free(&fs);

    // h3's lost delta and one more are acknowledged, and each Ack is already committed.
    h3.deliver(&pki, raw, &db, 60).await;
    // A host that first connects now: its acknowledged snapshot is committed.
    let mut h4 = RawAgent::new("h4", 4, snapshot(1, vec![listener("h4-ns", 4000)])).patient();
    h4.deliver(&pki, raw, &db, 60).await;

    let h3_want = raw_keys(1001..=1300);
    let h4_want = raw_keys([4000]);
    // Nor is any change observed while the tablespace was full lost or re-timed.
    let changed = full.changed();
    fleet
        .check_recovered(
            &[("h3", h3_want.clone()), ("h4", h4_want.clone())],
            &changed,
            60,
        )
        .await;
    no_transaction_left_open(&db).await;

    // ---- Graceful restart on the same database: everything acknowledged is there. ----
    fleet
        .graceful_restart(&pki, &[(&h3, h3_want), (&h4, h4_want)], &changed)
        .await;
    let refused = fleet.refusals();
    eprintln!(
        "pg_tablespace_fills_up: {} bytes of filler; {full_log_lines} ENOSPC log lines, \
         {store_failures} store failures while full; storage failures seen by h1, h2: \
         {refused:?}; h3 while full: {:?}; {:.1}s in all",
        full.filled,
        full.retries,
        started.elapsed().as_secs_f64()
    );
}

/// Locks host `host`'s row in a prepared transaction `gid`: the collector's next
/// transaction for that host waits for it (its `SELECT … FOR UPDATE`). Unlike a session's
/// lock, a prepared transaction's survives the server's shutdown and crash: the waiting
/// transaction cannot get the row while the server goes down, so it is certain to fail
/// in flight. [`unlock_host_row`] ends it.
async fn lock_host_row(db: &DbUrl, host: &str, gid: &str) {
    let DbUrl::Postgres(url) = db else {
        unreachable!()
    };
    let mut c = PgConnection::connect(url).await.expect("connect to lock");
    sqlx::raw_sql("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query("SELECT id FROM host WHERE name = $1 FOR UPDATE")
        .bind(host)
        .fetch_one(&mut c)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE TRANSACTION '{gid}'")))
        .execute(&mut c)
        .await
        .unwrap();
    let _ = c.close().await;
}

async fn unlock_host_row(db: &DbUrl, gid: &str) {
    let DbUrl::Postgres(url) = db else {
        unreachable!()
    };
    let mut c = PgConnection::connect(url).await.expect("connect to unlock");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}'")))
        .execute(&mut c)
        .await
        .unwrap();
    let _ = c.close().await;
}

/// One outage under load: a transaction of the collector for h3 is caught in flight
/// (waiting for a row lock), the server stops `how`, listeners change in both namespaces
/// for a few seconds while it is down, then it starts again on the same data directory
/// and port. Returns the changes, what h3's in-flight message got (UNAVAILABLE, asserted)
/// and the store failures the collector logged.
#[allow(clippy::too_many_arguments)]
async fn outage(
    how: Shutdown,
    ports: u16,
    server: &mut PgServer,
    pki: &Pki,
    db: &DbUrl,
    fleet: &mut Fleet,
    h3: &mut RawAgent,
    h3_port: u32,
) -> (Changed, Changed, Result<(), String>, usize) {
    let collector_log = fleet.log("collector-1.log");
    let failures_before = count_lines(&collector_log, "Store failure");
    let mut h3_session = h3.open(pki, fleet.raw, db).await;
    let gid = format!("lock-h3-{how:?}");
    lock_host_row(db, "h3", &gid).await;
    let seq = h3.acked + 1;
    h3.send_next(
        &h3_session,
        seq,
        delta(seq, vec![listener("h3-ns", h3_port)], vec![]),
    )
    .await;
    wait_for_async(
        Duration::from_secs(20),
        "the collector's transaction for h3 waits for the row lock",
        || async {
            let rs = q(
                db,
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%FROM host WHERE id = ANY($1) ORDER BY id FOR UPDATE%'",
                &[],
            )
            .await;
            match rs.rows[0][0].as_i64() {
                Some(n) if n > 0 => Ok(()),
                _ => Err("no transaction waits for the lock on h3's row".into()),
            }
        },
    )
    .await;

    // ---- The server goes. ----
    let from = fmt_time(OffsetDateTime::now_utc());
    tokio::task::block_in_place(|| server.stop(how));
    let (mut changed_a, mut changed_b) = (Changed::since(&from), Changed::since(&from));
    // The transaction caught in flight fails while the server is down.
    wait_for_async(
        Duration::from_secs(20),
        "a store failure while the server is down",
        || async {
            match count_lines(&collector_log, "Store failure") > failures_before {
                true => Ok(()),
                false => Err("the collector has logged no new `Store failure`".into()),
            }
        },
    )
    .await;
    let (a, b) = (&fleet.a, &fleet.b);
    let (a_socks, b_socks) = (&mut fleet.a_socks, &mut fleet.b_socks);
    // Changes while the server is down: some stay, some come and go.
    open(
        a,
        a_socks,
        &mut changed_a,
        "tcp",
        "::",
        ports + 1,
        Some(false),
    );
    open(
        b,
        b_socks,
        &mut changed_b,
        "udp",
        "0.0.0.0",
        ports + 1,
        None,
    );
    for p in ports + 101..=ports + 102 {
        open(a, a_socks, &mut changed_a, "tcp", "0.0.0.0", p, None);
        open(b, b_socks, &mut changed_b, "tcp", "::", p, Some(true));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for p in ports + 101..=ports + 102 {
        close(
            a_socks,
            &key("tcp", "0.0.0.0", i64::from(p)),
            &mut changed_a,
        );
        close(b_socks, &key("tcp", "::", i64::from(p)), &mut changed_b);
    }
    open(
        a,
        a_socks,
        &mut changed_a,
        "udp",
        "::",
        ports + 201,
        Some(false),
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!server.is_running(), "the server came back by itself");

    // ---- The server returns, on the same data directory and port. ----
    let to = fmt_time(OffsetDateTime::now_utc());
    changed_a.to = to.clone();
    changed_b.to = to;
    tokio::task::block_in_place(|| server.restart());
    unlock_host_row(db, &gid).await;
    // It failed: the server went down while it waited for the row.
    let in_flight = h3.read_acks(&mut h3_session, db).await;
    drop(h3_session);
    assert!(
        in_flight.is_err(),
        "h3: sequence {seq} was acknowledged, but its transaction was cut by the {how:?} stop"
    );
    let failures = count_lines(&collector_log, "Store failure") - failures_before;
    (changed_a, changed_b, in_flight, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_server_stops_and_restarts() {
    require_root();
    let started = Instant::now();
    let pki = Arc::new(Pki::new(&["h1", "h2", "h3", "h4", "h5"]));
    let logs = TempDir::new("pgdown-logs");
    let mut server = tokio::task::block_in_place(PgServer::start);
    let _show = Fleet::logs_on_panic(logs.path(), [server.log_path()]);
    // Prepared transactions (for `lock_host_row`) take a restart to enable.
    admin(
        &server,
        "postgres",
        "ALTER SYSTEM SET max_prepared_transactions = 4",
    )
    .await;
    tokio::task::block_in_place(|| {
        server.stop(Shutdown::Fast);
        server.restart();
    });
    let db = create_database(&server, "pgdown", None).await;

    let mut fleet = Fleet::start(&pki, &db, logs.path()).await;
    let raw = fleet.raw;

    let mut h3 = RawAgent::new("h3", 3, snapshot(1, vec![listener("h3-ns", 1000)])).patient();
    h3.deliver(&pki, raw, &db, 20).await;

    // The load: h5 streams deltas for as long as the outages last.
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(pki.clone(), raw, db.clone(), stop.clone()));
    wait_for_async(Duration::from_secs(20), "h5's load under way", || async {
        match committed(&db, "h5").await.0 > 5 {
            true => Ok(()),
            false => Err("h5 has fewer than 5 messages committed".into()),
        }
    })
    .await;

    // ---- A fast shutdown, then a crash. ----
    let (fast_a, fast_b, fast_h3, fast_failures) = outage(
        Shutdown::Fast,
        7000,
        &mut server,
        &pki,
        &db,
        &mut fleet,
        &mut h3,
        1001,
    )
    .await;
    h3.pending.push((
        3,
        delta(3, vec![], vec![listener("h3-ns", 1000).key.unwrap()]),
    ));
    h3.deliver(&pki, raw, &db, 60).await;
    let fast_load = committed(&db, "h5").await.0;
    wait_for_async(
        Duration::from_secs(30),
        "h5's load going on after the restart",
        || async {
            match committed(&db, "h5").await.0 > fast_load + 5 {
                true => Ok(()),
                false => Err("h5 has not had 5 more messages committed".into()),
            }
        },
    )
    .await;

    let (crash_a, crash_b, crash_h3, crash_failures) = outage(
        Shutdown::Crash,
        8000,
        &mut server,
        &pki,
        &db,
        &mut fleet,
        &mut h3,
        1002,
    )
    .await;
    h3.pending.push((
        5,
        delta(5, vec![], vec![listener("h3-ns", 1001).key.unwrap()]),
    ));
    h3.deliver(&pki, raw, &db, 60).await;
    let crash_load = committed(&db, "h5").await.0;
    wait_for_async(
        Duration::from_secs(30),
        "h5's load going on after the crash",
        || async {
            match committed(&db, "h5").await.0 > crash_load + 5 {
                true => Ok(()),
                false => Err("h5 has not had 5 more messages committed".into()),
            }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let load = tokio::time::timeout(Duration::from_secs(120), load_task)
        .await
        .expect("the load stops within 120s")
        .expect("the load task");
    assert!(load.agent.pending.is_empty());

    // A host that first connects now: its acknowledged snapshot is committed.
    let mut h4 = RawAgent::new("h4", 4, snapshot(1, vec![listener("h4-ns", 4000)])).patient();
    h4.deliver(&pki, raw, &db, 60).await;

    // ---- The collector was never restarted: it recovered by itself. ----
    let h3_want = raw_keys([1002]);
    let h4_want = raw_keys([4000]);
    let h5_want = raw_keys(load.live.iter().copied());
    let changed = [
        ("h1", &fast_a),
        ("h2", &fast_b),
        ("h1", &crash_a),
        ("h2", &crash_b),
    ];
    fleet
        .check_recovered(
            &[
                ("h3", h3_want.clone()),
                ("h4", h4_want.clone()),
                ("h5", h5_want.clone()),
            ],
            &changed,
            60,
        )
        .await;
    no_transaction_left_open(&db).await;
    let (h5_seq, _) = committed(&db, "h5").await;
    assert_eq!(h5_seq, load.agent.acked as i64, "h5: committed_seq");

    fleet
        .graceful_restart(
            &pki,
            &[(&h3, h3_want), (&h4, h4_want), (&load.agent, h5_want)],
            &changed,
        )
        .await;
    let refused = fleet.refusals();
    eprintln!(
        "pg_server_stops_and_restarts: store failures logged: {fast_failures} (fast shutdown), \
         {crash_failures} (crash); h3's in-flight message: {fast_h3:?} (fast), {crash_h3:?} \
         (crash); h5 streamed {} messages, {} failed sessions; storage failures seen by h1, \
         h2: {refused:?}; {:.1}s in all",
        load.agent.acked,
        load.failures.len(),
        started.elapsed().as_secs_f64()
    );
}
