//! Scale-out on PostgreSQL: two collector processes share one database on a throwaway
//! PostgreSQL server, and agents fail over between them.
//!
//! - Real agents in their own network namespaces, each given both collectors
//!   (`--collector A,B`), stream to A while their listeners change; A is killed with
//!   SIGKILL mid-stream. Every agent moves to B and resumes from the sequence committed in
//!   the database: no snapshot restart, every change stored exactly once with the time it
//!   was observed, no duplicate live rows, and the `hosts` view names B as the holder.
//! - Two collectors never both accept one host's session: a hand-driven client with one
//!   host's certificate connects to A, then to B. From B's Hello on, A's connection can no
//!   longer write (the epoch is checked in the same transaction as every write) and A
//!   closes it with ABORTED — at its next message, or by itself within its epoch check
//!   when the connection stays silent.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::time::Duration;

use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use serde_json::Value;
use time::OffsetDateTime;
use tonic::Code;
use util::faults::{
    Changed, Socks, assert_no_snapshot_restart, check_events, close, committed, connects, key,
    no_duplicate_live_rows, open, store_matches_scan,
};
use util::pg::PgServer;
use util::*;

/// Which collector each host's row names as its holder.
async fn holder(db: &DbUrl, host: &str) -> Option<String> {
    query(
        db,
        "SELECT collector FROM hosts WHERE host = ?1",
        &[text(host)],
    )
    .await
    .rows
    .first()
    .and_then(|r| r[0].as_str().map(str::to_string))
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// The next answer on `s`, which must be the stream's end with `code`.
async fn ends_with(s: &mut RawSession, code: Code, what: &str) -> tonic::Status {
    match s.recv().await {
        Err(st) if st.code() == code => st,
        other => panic!("{what}: expected the stream to end with {code:?}, got {other:?}"),
    }
}

async fn expect_ack(s: &mut RawSession, seq: u64, what: &str) {
    match s.recv().await {
        Ok(Some(v1::collector_message::Body::Ack(a))) if a.sequence == seq => {}
        other => panic!("{what}: expected Ack {seq}, got {other:?}"),
    }
}

async fn expect_welcome(s: &mut RawSession, resume: Option<u64>, what: &str) {
    match s.recv().await {
        Ok(Some(v1::collector_message::Body::Welcome(w))) => {
            assert_eq!(w.resume_after, resume, "{what}: resume_after")
        }
        other => panic!("{what}: expected Welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_collectors_share_one_postgres_and_agents_fail_over() {
    require_root();
    let server = PgServer::start();
    let db = DbUrl::Postgres(server.database("scaleout").await);
    let pki = Pki::new(&["h1", "h2", "h3"]);
    let logs = TempDir::new("scaleout-logs");
    let _show = LogsOnPanic(
        [
            "collector-a.log",
            "collector-a2.log",
            "collector-b.log",
            "agent-h1.log",
            "agent-h2.log",
        ]
        .iter()
        .map(|n| logs.join(n))
        .collect(),
    );
    let (port_a, port_b) = (free_port("0.0.0.0").port(), free_port("0.0.0.0").port());
    let start = |port: u16, name: &str, log: &str| {
        spawn_collector_with(
            &pki,
            &db,
            addr("0.0.0.0", port),
            None,
            &logs.join(log),
            &["--name", name],
        )
    };
    let mut collector_a = start(port_a, "collector-a", "collector-a.log");
    let _collector_b = start(port_b, "collector-b", "collector-b.log");
    wait_listening(addr("127.0.0.1", port_a)).await;
    wait_listening(addr("127.0.0.1", port_b)).await;

    let a = HostNs::new();
    let b = HostNs::new();
    let mut a_socks: Socks = a.enter(|| {
        vec![
            (key("tcp", "0.0.0.0", 22), tcp_listener("0.0.0.0", 22, None)),
            (key("tcp", "::", 80), tcp_listener("::", 80, Some(false))),
        ]
    });
    let mut b_socks: Socks = b.enter(|| {
        vec![
            (key("tcp", "0.0.0.0", 80), tcp_listener("0.0.0.0", 80, None)),
            (key("udp", "::", 53), udp_socket("::", 53, Some(false))),
        ]
    });
    // Both agents know both collectors, A first.
    let both = |ns: &HostNs| [addr(&ns.host_ip, port_a), addr(&ns.host_ip, port_b)];
    let _agents = [
        a.spawn_agent_to(&pki, "h1", &both(&a), &logs.join("agent-h1.log")),
        b.spawn_agent_to(&pki, "h2", &both(&b), &logs.join("agent-h2.log")),
    ];
    wait_for_async(
        Duration::from_secs(30),
        "both first snapshots stored through collector A",
        || async {
            store_matches_scan(&db, "h1", &a).await?;
            store_matches_scan(&db, "h2", &b).await?;
            for h in ["h1", "h2"] {
                if holder(&db, h).await.as_deref() != Some("collector-a") {
                    return Err(format!("{h} is not held by collector-a"));
                }
            }
            Ok(())
        },
    )
    .await;

    // ---- Listeners change; collector A dies mid-stream (SIGKILL). ----
    let from = listenscope_collector::timefmt::format(OffsetDateTime::now_utc());
    let (mut ca, mut cb) = (Changed::since(&from), Changed::since(&from));
    open(&a, &mut a_socks, &mut ca, "tcp", "0.0.0.0", 8001, None);
    open(&b, &mut b_socks, &mut cb, "udp", "0.0.0.0", 5301, None);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    open(&a, &mut a_socks, &mut ca, "tcp", "::", 8002, Some(false));
    collector_a.kill();
    open(&b, &mut b_socks, &mut cb, "tcp", "::", 8003, Some(true));
    close(&mut a_socks, &key("tcp", "0.0.0.0", 8001), &mut ca);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    close(&mut b_socks, &key("udp", "0.0.0.0", 5301), &mut cb);
    open(&a, &mut a_socks, &mut ca, "udp", "::", 5302, Some(false));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ca.to = listenscope_collector::timefmt::format(OffsetDateTime::now_utc());
    cb.to = ca.to.clone();

    wait_for_async(
        Duration::from_secs(40),
        "both hosts held by collector B with their current listeners",
        || async {
            store_matches_scan(&db, "h1", &a).await?;
            store_matches_scan(&db, "h2", &b).await?;
            for h in ["h1", "h2"] {
                if holder(&db, h).await.as_deref() != Some("collector-b") {
                    return Err(format!("{h} is not held by collector-b yet"));
                }
            }
            Ok(())
        },
    )
    .await;
    check_events(&db, "h1", &ca).await;
    check_events(&db, "h2", &cb).await;
    no_duplicate_live_rows(&db).await;
    for h in ["h1", "h2"] {
        let log = std::fs::read_to_string(logs.join(format!("agent-{h}.log"))).unwrap();
        assert_no_snapshot_restart(h, &log);
        let conns = connects(&log);
        assert!(
            conns
                .first()
                .is_some_and(|l| l.contains(&format!(":{port_a}")))
                && conns
                    .last()
                    .is_some_and(|l| l.contains(&format!(":{port_b}"))),
            "{h}: expected to connect to A first and to B last: {conns:#?}"
        );
    }

    // ---- One host, two collectors: only the newest connection may write. ----
    let mut collector_a2 = start(port_a, "collector-a", "collector-a2.log");
    wait_listening(addr("127.0.0.1", port_a)).await;
    let (at_a, at_b) = (addr("127.0.0.1", port_a), addr("127.0.0.1", port_b));
    let mut s_a = session_as(&pki, at_a, "h3", hello(7, 0, "h3")).await;
    expect_welcome(&mut s_a, None, "h3 at A").await;
    s_a.send(snapshot(1, vec![listener("h3-ns", 7001)])).await;
    expect_ack(&mut s_a, 1, "h3's snapshot at A").await;
    assert_eq!(holder(&db, "h3").await.as_deref(), Some("collector-a"));

    // The same host (same agent session) now connects to B: B resumes it, A's is fenced.
    let mut s_b = session_as(&pki, at_b, "h3", hello(7, 1, "h3")).await;
    expect_welcome(&mut s_b, Some(1), "h3 at B").await;
    assert_eq!(holder(&db, "h3").await.as_deref(), Some("collector-b"));
    // Whichever comes first — this delta refused in the database, or A's epoch check
    // closing the silent session — A's connection ends ABORTED and writes nothing.
    let _ = s_a
        .tx
        .send(delta(2, vec![listener("h3-ns", 7002)], vec![]))
        .await;
    let st = ends_with(&mut s_a, Code::Aborted, "h3's old connection at A").await;
    assert!(
        st.message().contains("replaced by a newer connection"),
        "{}",
        st.message()
    );
    assert_eq!(
        committed(&db, "h3").await.0,
        1,
        "nothing of A's delta is stored"
    );
    assert_eq!(live_ports(&db, "h3").await, [7001]);
    // B's connection writes.
    s_b.send(delta(2, vec![listener("h3-ns", 7003)], vec![]))
        .await;
    expect_ack(&mut s_b, 2, "h3's delta at B").await;
    assert_eq!(live_ports(&db, "h3").await, [7001, 7003]);

    // A silent session is closed by its collector's epoch check once another collector
    // accepts the host (no message needed).
    let mut s_a = session_as(&pki, at_a, "h3", hello(7, 2, "h3")).await;
    expect_welcome(&mut s_a, Some(2), "h3 back at A").await;
    let st = ends_with(&mut s_b, Code::Aborted, "h3's silent connection at B").await;
    assert!(
        st.message().contains("replaced by a newer connection"),
        "{}",
        st.message()
    );
    s_a.send(delta(3, vec![], vec![listener("h3-ns", 7001).key.unwrap()]))
        .await;
    expect_ack(&mut s_a, 3, "h3's delta at A").await;
    assert_eq!(live_ports(&db, "h3").await, [7003]);
    let hosts = query(
        &db,
        "SELECT host, collector, listeners FROM hosts ORDER BY host",
        &[],
    )
    .await;
    assert_eq!(
        hosts.rows,
        vec![
            vec![
                Value::from("h1"),
                Value::from("collector-b"),
                Value::from(a_socks.len() as i64)
            ],
            vec![
                Value::from("h2"),
                Value::from("collector-b"),
                Value::from(b_socks.len() as i64)
            ],
            vec![
                Value::from("h3"),
                Value::from("collector-a"),
                Value::from(1)
            ],
        ],
        "the hosts view: holder and live listener count per host"
    );
    collector_a2.kill();
}
