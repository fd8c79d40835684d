//! The agent's watch mode (`doorbell`, `polling(3s)`, `interval(10s)`) from the wire to
//! the `hosts` view and report, on SQLite and on PostgreSQL, against a real collector over
//! real mutual TLS: the Hello's mode is stored with the Hello, a heartbeat that reports
//! another one changes it (within the next group commit), one that repeats it changes
//! nothing (`watch_since` stays), an agent from before watch modes is NULL (`unknown` in
//! the report), invalid modes are refused with the field named and nothing stored, and a
//! replaced connection cannot write its mode over the newer one's. Then the real agent
//! binary, in a network namespace, against the real collector binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use listenscope_collector::query::{self, ReadOnly};
use listenscope_collector::store::{AgentHello, DbUrl, Store, StoreOptions};
use listenscope_core::watch::{Watch, WatchMode};
use listenscope_proto::v1;
use listenscope_proto::v1::WatchKind;
use serde_json::{Value, json};
use util::*;

type Body = v1::collector_message::Body;

both_databases!(
    hellos_and_heartbeats_set_the_mode,
    agents_without_a_mode_are_unknown,
    invalid_modes_are_refused_and_nothing_is_stored,
    a_replaced_connection_cannot_write_its_mode,
);

const NO_PERF: &str = "perf_event_open refused: needs CAP_PERFMON";

/// h1's row of the `hosts` view: (watch_mode, watch_reason, watch_since), JSON values.
async fn watch_of(db: &DbUrl, host: &str) -> (Value, Value, Value) {
    let rs = query(
        db,
        "SELECT watch_mode, watch_reason, watch_since FROM hosts WHERE host = ?1",
        &[text(host)],
    )
    .await;
    let row = rs.rows.first().unwrap_or_else(|| panic!("no host {host}"));
    (row[0].clone(), row[1].clone(), row[2].clone())
}

/// Opens a session of `host` with a Hello reporting `watch`; expects the Welcome.
async fn open(pki: &Pki, addr: SocketAddr, host: &str, watch: Option<v1::Watch>) -> RawSession {
    let mut s = session_as(pki, addr, host, hello_watching(1, 0, host, None, watch)).await;
    assert!(
        matches!(s.recv().await, Ok(Some(Body::Welcome(_)))),
        "no Welcome"
    );
    s
}

/// Sends a snapshot and waits for its Ack: everything the session sent before it has
/// been handled by the collector.
async fn barrier(s: &mut RawSession, seq: u64) {
    s.send(snapshot(seq, vec![listener("host", 80)])).await;
    assert!(
        matches!(s.recv().await, Ok(Some(Body::Ack(a))) if a.sequence == seq),
        "no Ack {seq}"
    );
}

async fn hellos_and_heartbeats_set_the_mode(db: &DbUrl) {
    let pki = Pki::new(&["h1"]);
    let c = InProcess::start(&pki, db).await;
    let polling = watch(WatchKind::Polling, 3000, NO_PERF);
    let mut s = open(&pki, c.addr, "h1", Some(polling.clone())).await;
    // Stored with the Hello, before the Welcome.
    let (mode, reason, since) = watch_of(db, "h1").await;
    assert_eq!((mode, reason), (json!("polling(3s)"), json!(NO_PERF)));
    assert!(since.is_string(), "{since:?}");

    // The same mode again, and a heartbeat from an older agent: nothing changes.
    s.send(heartbeat(Some(polling.clone()))).await;
    s.send(heartbeat(None)).await;
    barrier(&mut s, 1).await;
    assert_eq!(
        watch_of(db, "h1").await,
        (json!("polling(3s)"), json!(NO_PERF), since.clone())
    );

    // Another mode: written with the next group commit (a second at most).
    s.send(heartbeat(Some(watch(WatchKind::Doorbell, 0, ""))))
        .await;
    eventually(10, "the heartbeat's doorbell stored", || async {
        watch_of(db, "h1").await.0 == json!("doorbell")
    })
    .await;
    let (_, reason, doorbell_since) = watch_of(db, "h1").await;
    assert_eq!(reason, Value::Null, "the reason goes with the mode");
    assert!(
        doorbell_since.as_str() >= since.as_str(),
        "{doorbell_since:?} before {since:?}"
    );
    // A reason alone is a change too; then back to the plain doorbell.
    s.send(heartbeat(Some(watch(
        WatchKind::Doorbell,
        0,
        "UDP by polling",
    ))))
    .await;
    eventually(10, "the doorbell's reason stored", || async {
        watch_of(db, "h1").await.1 == json!("UDP by polling")
    })
    .await;
    s.send(heartbeat(Some(watch(WatchKind::Doorbell, 0, ""))))
        .await;
    eventually(10, "the plain doorbell stored", || async {
        watch_of(db, "h1").await.1 == Value::Null
    })
    .await;
    let settled = watch_of(db, "h1").await;

    // A reconnect in the same mode keeps `watch_since`; in another one it moves.
    drop(s);
    let mut s = open(&pki, c.addr, "h1", Some(watch(WatchKind::Doorbell, 0, ""))).await;
    assert_eq!(watch_of(db, "h1").await, settled);
    barrier(&mut s, 2).await;
    drop(s);
    let _s = open(
        &pki,
        c.addr,
        "h1",
        Some(watch(WatchKind::Interval, 1500, "")),
    )
    .await;
    let (mode, reason, since) = watch_of(db, "h1").await;
    assert_eq!((mode, reason), (json!("interval(1.5s)"), Value::Null));
    assert!(since.as_str() >= settled.2.as_str(), "{since:?}");

    // The report: `watch` among the columns, its reason and time at the end.
    let ro = ReadOnly::open(db).await.unwrap();
    let report = query::hosts(&ro, None).await.unwrap();
    ro.close().await;
    assert_eq!(report.rows.columns, query::HOSTS_COLUMNS);
    let col = |n: &str| report.rows.columns.iter().position(|c| c == n).unwrap();
    let row = &report.rows.rows[0];
    assert_eq!(row[col("watch")], json!("interval(1.5s)"));
    assert_eq!(row[col("watch_reason")], Value::Null);
    assert_eq!(row[col("watch_since")], since);
    c.shutdown().await;
}

async fn agents_without_a_mode_are_unknown(db: &DbUrl) {
    let pki = Pki::new(&["h1", "h2"]);
    let c = InProcess::start(&pki, db).await;
    // An agent from before watch modes: NULL, and its heartbeats leave it so.
    let mut s = open(&pki, c.addr, "h1", None).await;
    s.send(heartbeat(None)).await;
    barrier(&mut s, 1).await;
    assert_eq!(
        watch_of(db, "h1").await,
        (Value::Null, Value::Null, Value::Null)
    );
    drop(s);
    // Upgraded: the mode appears; downgraded again: unknown, not the upgraded one's mode.
    let s = open(&pki, c.addr, "h1", Some(watch(WatchKind::Polling, 500, ""))).await;
    assert_eq!(watch_of(db, "h1").await.0, json!("polling(500ms)"));
    drop(s);
    let _s = open(&pki, c.addr, "h1", None).await;
    assert_eq!(
        watch_of(db, "h1").await,
        (Value::Null, Value::Null, Value::Null)
    );
    let _h2 = open(&pki, c.addr, "h2", Some(watch(WatchKind::Doorbell, 0, ""))).await;
    // The report says `unknown` where the view has NULL.
    let ro = ReadOnly::open(db).await.unwrap();
    let report = query::hosts(&ro, None).await.unwrap();
    ro.close().await;
    let col = |n: &str| report.rows.columns.iter().position(|c| c == n).unwrap();
    let mut modes: Vec<(Value, Value)> = report
        .rows
        .rows
        .iter()
        .map(|r| (r[col("host")].clone(), r[col("watch")].clone()))
        .collect();
    modes.sort_by_key(|(h, _)| h.to_string());
    assert_eq!(
        modes,
        [
            (json!("h1"), json!("unknown")),
            (json!("h2"), json!("doorbell"))
        ]
    );
    c.shutdown().await;
}

async fn invalid_modes_are_refused_and_nothing_is_stored(db: &DbUrl) {
    let pki = Pki::new(&["h1"]);
    let c = InProcess::start(&pki, db).await;
    // In a Hello: refused before anything is stored (no host row).
    for (bad, field) in [
        (watch(WatchKind::Unspecified, 0, ""), "watch.kind"),
        (
            v1::Watch {
                kind: 9,
                ..watch(WatchKind::Polling, 1000, "")
            },
            "watch.kind",
        ),
        (watch(WatchKind::Polling, 0, ""), "watch.interval_ms"),
        (
            watch(WatchKind::Interval, u64::MAX, ""),
            "watch.interval_ms",
        ),
        (watch(WatchKind::Doorbell, 10, ""), "watch.interval_ms"),
        (
            watch(WatchKind::Polling, 3000, &"r".repeat(513)),
            "watch.reason",
        ),
        (
            watch(WatchKind::Polling, 3000, "\u{1b}]0;pwned\u{7}"),
            "watch.reason",
        ),
    ] {
        let hello = hello_watching(1, 0, "h1", None, Some(bad.clone()));
        let refused = match try_session_as(&pki, c.addr, "h1", hello).await {
            Err(status) => status,
            Ok(mut s) => s.recv().await.expect_err("a bad Hello answered"),
        };
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(
            refused.message().contains(field),
            "{bad:?}: {}",
            refused.message()
        );
    }
    let hosts = query(db, "SELECT count(*) FROM hosts", &[]).await;
    assert_eq!(hosts.rows[0][0], json!(0), "a refused Hello stored a host");

    // In a heartbeat: the session ends, the stored mode stays.
    let mut s = open(&pki, c.addr, "h1", Some(watch(WatchKind::Doorbell, 0, ""))).await;
    s.send(heartbeat(Some(watch(WatchKind::Polling, 0, NO_PERF))))
        .await;
    let ended = s.recv().await.expect_err("a bad heartbeat accepted");
    assert_eq!(ended.code(), tonic::Code::InvalidArgument);
    assert!(
        ended.message().contains("watch.interval_ms"),
        "{}",
        ended.message()
    );
    assert_eq!(
        watch_of(db, "h1").await.0,
        json!("doorbell"),
        "a refused heartbeat changed the mode"
    );
    c.shutdown().await;
}

/// The epoch fence, through the store itself: a mode reported by a connection that a
/// newer Hello replaced is not written over the newer connection's. Closing the store
/// writes everything queued, so the check is not a race.
async fn a_replaced_connection_cannot_write_its_mode(db: &DbUrl) {
    let store = Store::open(db, &StoreOptions::default()).await.unwrap();
    let now = time::OffsetDateTime::now_utc();
    let hello = |watch| AgentHello {
        os_hostname: "h",
        agent_version: "test",
        instance_id: None,
        watch,
    };
    let ms = Duration::from_millis;
    let interval = Watch::new(WatchMode::Interval(ms(10_000)));
    let doorbell = Watch::new(WatchMode::Doorbell);
    let polling = Watch::because(WatchMode::Polling(ms(3000)), NO_PERF);
    let old = store
        .hello_at("h1", hello(Some(&interval)), now, None)
        .await
        .unwrap();
    let new = store
        .hello_at("h1", hello(Some(&doorbell)), now, None)
        .await
        .unwrap();
    assert!(new.epoch > old.epoch);
    let other = store
        .hello_at("h2", hello(Some(&interval)), now, None)
        .await
        .unwrap();
    // The replaced connection reports polling for h1; h2's own connection too.
    store.watch_changed(&old, &polling, now);
    store.watch_changed(&other, &polling, now);
    store.close().await;
    assert_eq!(watch_of(db, "h1").await.0, json!("doorbell"));
    let (mode, reason, since) = watch_of(db, "h2").await;
    assert_eq!((mode, reason), (json!("polling(3s)"), json!(NO_PERF)));
    assert!(since.is_string(), "{since:?}");
}

/// The real agent (`run`, in a network namespace) against the real collector: its
/// Hello's mode is in `hosts`, in the view and in the report (table and JSON).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_reports_its_mode() {
    require_root();
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("watch");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let ns = HostNs::new();
    let port = free_port("0.0.0.0").port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let log = |n: &str| dir.path().join(n);
    let _logs = LogsOnPanic(vec![log("collector.log"), log("agent.log")]);
    let _collector = spawn_collector(&pki, &db, listen, None, &log("collector.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let _agent = ns.spawn_agent(
        &pki,
        "h1",
        format!("{}:{port}", ns.host_ip).parse().unwrap(),
        &log("agent.log"),
    );
    let mode = || async {
        query(&db, "SELECT watch_mode FROM hosts WHERE host = 'h1'", &[])
            .await
            .rows
            .first()
            .map(|r| r[0].clone())
    };
    eventually(30, "the agent's watch mode in hosts", || async {
        mode().await.is_some_and(|m| m.is_string())
    })
    .await;
    let shown = mode().await.unwrap();
    let parsed: WatchMode = shown.as_str().unwrap().parse().unwrap();
    // The agent scans every second (`--interval 1s`): when it falls back to the
    // interval, that is the period it reports.
    if let WatchMode::Interval(d) = parsed {
        assert_eq!(d, Duration::from_secs(1), "{shown}");
    }

    let report = |format: &[&str]| {
        let out = Command::new(collector_bin())
            .arg("hosts")
            .arg("--db")
            .arg(db.as_url())
            .args(format)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = report(&[]);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("WATCH") && !header.contains("WATCH_REASON"),
        "{table}"
    );
    assert!(table.contains(shown.as_str().unwrap()), "{table}");
    let json: Value = serde_json::from_str(&report(&["--json"])).unwrap();
    let row = &json.as_array().unwrap()[0];
    assert_eq!(row["watch"], shown, "{json}");
    assert!(
        row.get("watch_reason").is_some() && row["watch_since"].is_string(),
        "{json}"
    );
}
