//! Two machines with one certificate, against a real collector over real mutual TLS, on
//! SQLite and on PostgreSQL: while one agent installation (instance id) holds the host's
//! session, another is refused with ALREADY_EXISTS before anything of it is stored (no
//! closed/opened events from its snapshots), the refusal is counted, logged and shown in
//! `hosts`; the same installation reconnecting, or an agent from before instance ids,
//! replaces the older session as before. Before, every new connection replaced the live
//! one: two such agents took turns forever, writing alternating snapshots as history.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::time::Duration;

use listenscope_collector::query::ReadOnly;
use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use serde_json::{Value, json};
use util::*;

type Body = v1::collector_message::Body;

const A: [u8; 16] = [0xa1; 16];
const B: [u8; 16] = [0xb2; 16];

both_databases!(
    a_second_machine_is_refused_while_the_first_holds_the_host,
    the_same_installation_and_old_agents_replace_the_older_session,
);

/// Opens a session of h1 as agent installation `instance`; the first answer.
async fn open(
    pki: &Pki,
    addr: SocketAddr,
    session: u8,
    acked: u64,
    os: &str,
    instance: Option<[u8; 16]>,
) -> (Option<RawSession>, Result<Option<Body>, tonic::Status>) {
    match try_session_as(pki, addr, "h1", hello_from(session, acked, os, instance)).await {
        Err(st) => (None, Err(st)),
        Ok(mut s) => {
            let first = s.recv().await;
            (Some(s), first)
        }
    }
}

/// A listener on `port` as machine `os` reports it (its own process name).
fn listener_of(os: &str, port: u32) -> v1::Listener {
    let mut l = listener("host", port);
    l.processes[0].comm = os.into();
    l
}

async fn one(db: &DbUrl, sql: &str) -> Vec<Value> {
    query(db, sql, &[]).await.rows.remove(0)
}

async fn a_second_machine_is_refused_while_the_first_holds_the_host(db: &DbUrl) {
    let pki = Pki::new(&["h1"]);
    let c = InProcess::start(&pki, db).await;

    let (a, first) = open(&pki, c.addr, 1, 0, "machine-a", Some(A)).await;
    let mut a = a.unwrap();
    assert!(matches!(first, Ok(Some(Body::Welcome(_)))), "{first:?}");
    a.send(snapshot(
        1,
        vec![listener_of("machine-a", 22), listener_of("machine-a", 80)],
    ))
    .await;
    assert!(matches!(a.recv().await, Ok(Some(Body::Ack(_)))));

    // Machine B, same certificate, its own installation: refused, twice (it retries).
    // Its snapshot follows its Hello at once, as an agent sends it: had it been let in,
    // it would close 22 and 80 and open 443.
    for attempt in 1..=2 {
        let mut b = session_as(&pki, c.addr, "h1", hello_from(2, 0, "machine-b", Some(B))).await;
        let _ =
            b.tx.send(snapshot(1, vec![listener_of("machine-b", 443)]))
                .await;
        let st = b
            .recv()
            .await
            .expect_err("a second machine with the same certificate is refused");
        assert_eq!(
            st.code(),
            tonic::Code::AlreadyExists,
            "attempt {attempt}: {st}"
        );
        for part in [
            format!("instance {}", "a1".repeat(16)),
            format!("instance {}", "b2".repeat(16)),
            "two machines share one certificate".into(),
            "certs issue --host NAME".into(),
            " since ".into(),
        ] {
            assert!(st.message().contains(&part), "{part}: {st}");
        }
    }

    // The first machine is unaffected: its delta is stored and acknowledged.
    a.send(delta(2, vec![listener_of("machine-a", 8080)], vec![]))
        .await;
    match a.recv().await {
        Ok(Some(Body::Ack(ack))) => assert_eq!(ack.sequence, 2),
        other => panic!("the holder was disturbed: {other:?}"),
    }

    // No false history: machine B's Hello and snapshot left nothing.
    assert_eq!(live_ports(db, "h1").await, [22, 80, 8080]);
    assert_eq!(
        one(
            db,
            "SELECT count(*) FROM listener_versions WHERE host = 'h1' AND (valid_to IS NOT NULL OR port = 443)"
        )
        .await,
        [json!(0)],
        "nothing closed, nothing of machine B opened"
    );
    assert_eq!(
        one(
            db,
            "SELECT os_hostname, \
             CASE WHEN duplicate_refusals >= 1 THEN 'yes' ELSE 'no' END, duplicate_last_peer, \
             CASE WHEN duplicate_last_at IS NULL THEN 'no' ELSE 'yes' END \
             FROM hosts WHERE host = 'h1'"
        )
        .await,
        [
            json!("machine-a"),
            json!("yes"),
            json!("127.0.0.1"),
            json!("yes")
        ],
        "shown in hosts"
    );
    // …and in the `hosts` report.
    let ro = ReadOnly::open(db).await.unwrap();
    let report = listenscope_collector::query::hosts(&ro, None)
        .await
        .unwrap();
    ro.close().await;
    let col = |name: &str| {
        report
            .rows
            .columns
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("{name} not in {:?}", report.rows.columns))
    };
    let row = &report.rows.rows[0];
    assert!(
        row[col("duplicate_refusals")].as_i64().unwrap() >= 1,
        "{row:?}"
    );
    assert_eq!(row[col("duplicate_last_peer")], json!("127.0.0.1"));

    // When the holder goes away, the other machine gets in (the refusal lasts only while
    // the first holds the session).
    drop(a);
    eventually(20, "machine B admitted once A is gone", || async {
        matches!(
            open(&pki, c.addr, 2, 0, "machine-b", Some(B)).await.1,
            Ok(Some(Body::Welcome(_)))
        )
    })
    .await;
    // The refusals not written yet (at most one write per 10 s) were written when the
    // holder's session ended.
    eventually(10, "every refusal recorded", || async {
        let n = one(db, "SELECT duplicate_refusals FROM hosts WHERE host = 'h1'").await;
        n[0].as_i64().unwrap() >= 2
    })
    .await;
    c.shutdown().await;
}

/// Two collectors sharing one PostgreSQL database: machine B, connecting to the other
/// collector than machine A holds the host through, is refused the same way (each
/// collector's registry knows only its own sessions; the host row's instance id decides),
/// and writes nothing. Machine A itself may move to the other collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_machine_on_another_collector_is_refused() {
    let (db, _guard) = postgres_db().await;
    let pki = Pki::new(&["h1"]);
    let limits = |name: &str| listenscope_collector::ingest::Limits {
        instance: name.into(),
        ..Default::default()
    };
    let ca = InProcess::start_with(&pki, &db, limits("collector-a")).await;
    let cb = InProcess::start_with(&pki, &db, limits("collector-b")).await;

    let (a, first) = open(&pki, ca.addr, 1, 0, "machine-a", Some(A)).await;
    let mut a = a.unwrap();
    assert!(matches!(first, Ok(Some(Body::Welcome(_)))), "{first:?}");
    a.send(snapshot(1, vec![listener_of("machine-a", 22)]))
        .await;
    assert!(matches!(a.recv().await, Ok(Some(Body::Ack(_)))));

    let mut b = session_as(&pki, cb.addr, "h1", hello_from(2, 0, "machine-b", Some(B))).await;
    let _ =
        b.tx.send(snapshot(1, vec![listener_of("machine-b", 443)]))
            .await;
    let st = b
        .recv()
        .await
        .expect_err("refused through the other collector");
    assert_eq!(st.code(), tonic::Code::AlreadyExists, "{st}");
    for part in [
        format!("instance {}", "a1".repeat(16)),
        "through collector collector-a".into(),
        "two machines share one certificate".into(),
    ] {
        assert!(st.message().contains(&part), "{part}: {st}");
    }
    // Machine A keeps writing through collector A; nothing of B was stored.
    a.send(delta(2, vec![listener_of("machine-a", 80)], vec![]))
        .await;
    match a.recv().await {
        Ok(Some(Body::Ack(ack))) => assert_eq!(ack.sequence, 2),
        other => panic!("the holder was disturbed: {other:?}"),
    }
    assert_eq!(live_ports(&db, "h1").await, [22, 80]);
    assert_eq!(
        one(
            &db,
            "SELECT os_hostname, collector, duplicate_refusals >= 1 FROM hosts WHERE host = 'h1'"
        )
        .await,
        [json!("machine-a"), json!("collector-a"), json!(true)]
    );
    // The same installation may move to collector B (its old session there ends).
    let (moved, first) = open(&pki, cb.addr, 1, 2, "machine-a", Some(A)).await;
    assert!(matches!(first, Ok(Some(Body::Welcome(_)))), "{first:?}");
    drop(moved);
    ca.shutdown().await;
    cb.shutdown().await;
}

async fn the_same_installation_and_old_agents_replace_the_older_session(db: &DbUrl) {
    let pki = Pki::new(&["h1"]);
    let c = InProcess::start(&pki, db).await;

    let (a, first) = open(&pki, c.addr, 1, 0, "machine-a", Some(A)).await;
    let mut a = a.unwrap();
    assert!(matches!(first, Ok(Some(Body::Welcome(_)))));
    a.send(snapshot(1, vec![listener_of("machine-a", 22)]))
        .await;
    assert!(matches!(a.recv().await, Ok(Some(Body::Ack(_)))));

    // The same installation reconnects (its old connection half-open): it replaces the
    // old session and resumes it.
    let (a2, first) = open(&pki, c.addr, 1, 1, "machine-a", Some(A)).await;
    match first {
        Ok(Some(Body::Welcome(w))) => assert_eq!(w.resume_after, Some(1)),
        other => panic!("the same installation was refused: {other:?}"),
    }
    let st = a.recv().await.expect_err("the older session ends");
    assert_eq!(st.code(), tonic::Code::Aborted, "{st}");

    // An agent from before instance ids (none sent) replaces it too, as before…
    let (old, first) = open(&pki, c.addr, 3, 0, "machine-a", None).await;
    assert!(matches!(first, Ok(Some(Body::Welcome(_)))), "{first:?}");
    let st = a2.unwrap().recv().await.expect_err("replaced");
    assert_eq!(st.code(), tonic::Code::Aborted, "{st}");

    // …and an agent with an id replaces a holder without one: either id empty, the
    // newer wins.
    let (_b, first) = open(&pki, c.addr, 2, 0, "machine-a", Some(B)).await;
    assert!(matches!(first, Ok(Some(Body::Welcome(_)))), "{first:?}");
    let st = old.unwrap().recv().await.expect_err("replaced");
    assert_eq!(st.code(), tonic::Code::Aborted, "{st}");
    assert_eq!(
        one(
            db,
            "SELECT duplicate_refusals, duplicate_last_at FROM hosts WHERE host = 'h1'"
        )
        .await,
        [json!(0), Value::Null],
        "no duplicate was refused"
    );
    c.shutdown().await;
}

/// The real binary counts each refusal as `duplicate_identity` and logs one line per
/// interval with the host, the peer and the fix, however often the second machine
/// retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_and_logged_once_per_interval() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("dup-bin");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let mut collector = spawn_collector(&pki, &db, addr, Some(maddr), &log);
    wait_listening(addr).await;
    wait_listening(maddr).await;
    let label = "reason=\"duplicate_identity\"";
    let count = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("listenscope_rejected_connections_total") && l.contains(label))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    assert_eq!(count(&metrics(maddr).await), Some(0));

    let (a, first) = open(&pki, addr, 1, 0, "machine-a", Some(A)).await;
    assert!(matches!(first, Ok(Some(Body::Welcome(_)))));
    for _ in 0..3 {
        let (_, first) = open(&pki, addr, 2, 0, "machine-b", Some(B)).await;
        assert_eq!(first.unwrap_err().code(), tonic::Code::AlreadyExists);
    }
    wait_for_async(
        Duration::from_secs(10),
        "three refusals counted",
        || async {
            let text = metrics(maddr).await;
            if count(&text) == Some(3) {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .await;
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("Refused a second agent with the same certificate."))
        .collect();
    assert_eq!(lines.len(), 1, "one line per interval: {logged}");
    for part in ["host=h1", "127.0.0.1", "issue each its own"] {
        assert!(lines[0].contains(part), "{part}: {}", lines[0]);
    }
    assert!(
        !logged.contains("Session ended with an error."),
        "no unthrottled line per refusal: {logged}"
    );
    drop(a);
    assert_eq!(collector.terminate().code(), Some(0));
}
