//! The product, end to end with real processes: a collector and two agents, each agent in
//! its own network namespace with its own certificate and real listeners in different
//! bind modes. The headline query names exactly the right hosts; a closed listener shows
//! up as a change; the collector killed mid-stream and restarted ends with a store that
//! matches reality, nothing duplicated, no change lost (observed while it was down).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;

use listenscope_collector::query::{Param, ReadOnly};
use listenscope_collector::store::DbUrl;
use serde_json::Value;
use time::OffsetDateTime;
use util::*;

async fn rows(db: &DbUrl, sql: &str) -> Vec<Vec<Value>> {
    query(db, sql, &[]).await.rows
}

async fn headline(db: &DbUrl, port: Option<u16>) -> Vec<(String, String, i64)> {
    let ro = ReadOnly::open(db).await.unwrap();
    let rs = listenscope_collector::query::exposure(&ro, port, None, None)
        .await
        .unwrap()
        .rows;
    ro.close().await;
    rs.rows
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[2].as_str().unwrap().to_string(),
                r[3].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn has_change(db: &DbUrl, host: &str, change: &str, proto: &str, port: i64) -> bool {
    let rs = query(
        db,
        "SELECT count(*) FROM listener_changes WHERE host = ?1 AND change = ?2 AND protocol = ?3 AND port = ?4",
        &[text(host), text(change), text(proto), Param::Int(Some(port))],
    )
    .await;
    rs.rows[0][0].as_i64().unwrap() > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let dir = TempDir::new("fleet-db");
    fleet(DbUrl::Sqlite(dir.path().join("ls.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    fleet(DbUrl::Postgres(server.database("fleet").await)).await;
}

async fn fleet(db: DbUrl) {
    require_root();
    let pki = Pki::new(&["h1", "h2"]);
    let dir = TempDir::new("fleet");
    let a = HostNs::new();
    let b = HostNs::new();
    let port = free_port("0.0.0.0").port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let log = |n: &str| dir.path().join(n);
    let _logs = LogsOnPanic(
        [
            "collector-1.log",
            "collector-2.log",
            "agent-h1.log",
            "agent-h2.log",
        ]
        .map(log)
        .to_vec(),
    );
    let mut collector = spawn_collector(&pki, &db, listen, None, &log("collector-1.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;

    // h1: Apache-style dual-stack :::80 (hidden IPv4), v6-only :::443, sshd pair on 22.
    let mut a_socks = a.enter(|| {
        vec![
            tcp_listener("::", 80, Some(false)),
            tcp_listener("::", 443, Some(true)),
            tcp_listener("0.0.0.0", 22, None),
            tcp_listener("::", 22, Some(true)),
        ]
    });
    // h2: nginx-style 0.0.0.0:80 + v6-only :::80 (not hidden), dual-stack DNS on udp 53.
    let mut b_socks = b.enter(|| {
        vec![
            tcp_listener("0.0.0.0", 80, None),
            tcp_listener("::", 80, Some(true)),
        ]
    });
    let dns = b.enter(|| udp_socket("::", 53, Some(false)));

    let ca = |ns: &HostNs| -> SocketAddr { format!("{}:{port}", ns.host_ip).parse().unwrap() };
    let _agent_a = a.spawn_agent(&pki, "h1", ca(&a), &log("agent-h1.log"));
    let mut agent_b = b.spawn_agent(&pki, "h2", ca(&b), &log("agent-h2.log"));

    eventually(30, "both hosts' first snapshots stored", || async {
        rows(
            &db,
            "SELECT count(*) FROM host WHERE last_snapshot_at IS NOT NULL",
        )
        .await[0][0]
            == 2
    })
    .await;

    // The headline question names exactly h1 for port 80, and h2 only for udp/53.
    assert_eq!(
        headline(&db, Some(80)).await,
        [("h1".into(), "tcp".into(), 80)]
    );
    assert_eq!(
        headline(&db, None).await,
        [
            ("h1".into(), "tcp".into(), 80),
            ("h2".into(), "udp".into(), 53)
        ]
    );
    let h1 = rows(&db, "SELECT port, family, reach_ipv4, shown_as, netns FROM current_listeners WHERE host = 'h1' ORDER BY port, family").await;
    assert_eq!(h1.len(), 4, "{h1:?}");
    assert_eq!(h1[0][4], Value::from(a.name.clone()), "netns name recorded");

    // Closing a listener on one host is a change.
    drop(a_socks.remove(0)); // :::80
    eventually(20, "h1's port 80 closed", || {
        has_change(&db, "h1", "closed", "tcp", 80)
    })
    .await;
    assert!(headline(&db, Some(80)).await.is_empty());

    // Kill the collector mid-stream; change both hosts while it is down.
    collector.kill();
    let killed_at = OffsetDateTime::now_utc();
    let (a_log, b_log) = (log("agent-h1.log"), log("agent-h2.log"));
    let (a_queued, b_queued) = (queued_changes(&a_log), queued_changes(&b_log));
    let _late = a.enter(|| tcp_listener("::", 8080, Some(false)));
    drop(dns);
    drop(b_socks.remove(0)); // 0.0.0.0:80 on h2: now only the v6-only :::80 remains
    // The agents' scans see the changes while the collector is down and queue them as
    // deltas: one on h1 (8080 opened), two on h2 (udp/53 and tcp 0.0.0.0:80 closed).
    eventually(
        20,
        "the changes made during the outage queued by both agents",
        || {
            let (a_log, b_log) = (&a_log, &b_log);
            async move { queued_changes(a_log) > a_queued && queued_changes(b_log) >= b_queued + 2 }
        },
    )
    .await;
    let restarted_at = OffsetDateTime::now_utc();
    let mut collector = spawn_collector(&pki, &db, listen, None, &log("collector-2.log"));

    eventually(40, "changes made during the outage arrive", || async {
        has_change(&db, "h1", "opened", "tcp", 8080).await
            && has_change(&db, "h2", "closed", "udp", 53).await
            && has_change(&db, "h2", "closed", "tcp", 80).await
    })
    .await;

    // Nothing lost: the changes carry the time they were observed, during the outage.
    let fmt = listenscope_collector::timefmt::format;
    let at = rows(
        &db,
        "SELECT at FROM listener_changes WHERE host = 'h1' AND change = 'opened' AND port = 8080",
    )
    .await;
    assert_eq!(at.len(), 1, "opened once, not duplicated: {at:?}");
    let at = at[0][0].as_str().unwrap().to_string();
    assert!(
        at > fmt(killed_at) && at < fmt(restarted_at),
        "observed at {at}, outage {} – {}",
        fmt(killed_at),
        fmt(restarted_at)
    );

    // Nothing duplicated: one live row per listener.
    let dups = rows(
        &db,
        "SELECT host, netns, protocol, family, address, port, count(*) FROM current_listeners
         GROUP BY host, netns, protocol, family, address, port, interface, v6only HAVING count(*) > 1",
    )
    .await;
    assert!(dups.is_empty(), "{dups:?}");

    // The store matches reality: what the agent itself sees in h1's namespace now.
    let scan = std::process::Command::new("ip")
        .args(["netns", "exec", &a.name])
        .arg(agent_bin())
        .args(["scan", "--json", "--netns", "current"])
        .output()
        .unwrap();
    let scan: Value = serde_json::from_slice(&scan.stdout).unwrap();
    let mut real: Vec<(String, String, i64)> = scan["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["protocol"].as_str().unwrap().into(),
                l["address"].as_str().unwrap().into(),
                l["port"].as_i64().unwrap(),
            )
        })
        .collect();
    real.sort();
    let mut stored: Vec<(String, String, i64)> = rows(
        &db,
        "SELECT protocol, address, port FROM current_listeners WHERE host = 'h1'",
    )
    .await
    .iter()
    .map(|r| {
        (
            r[0].as_str().unwrap().into(),
            r[1].as_str().unwrap().into(),
            r[2].as_i64().unwrap(),
        )
    })
    .collect();
    stored.sort();
    assert_eq!(stored, real);
    assert_eq!(
        headline(&db, None).await,
        [("h1".into(), "tcp".into(), 8080)]
    );

    // A host that goes silent turns stale (collector runs with --stale-after 3s).
    agent_b.kill();
    eventually(20, "h2 reported stale", || async {
        let r = rows(&db, "SELECT host, stale FROM hosts ORDER BY host").await;
        let stale = |v: &Value| v == &Value::from(1) || v == &Value::from(true);
        r.len() == 2 && !stale(&r[0][1]) && stale(&r[1][1])
    })
    .await;
    let out = std::process::Command::new(collector_bin())
        .args(["hosts", "--db", &db.as_url()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.lines().nth(1).is_some_and(|l| l.contains("h2")),
        "silent host first:\n{report}"
    );

    // The agent resumed its session: it was told where to continue, not asked to resync.
    let agent_log = std::fs::read_to_string(log("agent-h1.log")).unwrap();
    let connects: Vec<&str> = agent_log
        .lines()
        .filter(|l| l.contains("Connected to collector."))
        .collect();
    assert!(connects.len() >= 2, "{agent_log}");
    assert!(
        connects.last().unwrap().contains("resume_after=Some("),
        "{agent_log}"
    );

    assert_eq!(collector.terminate().code(), Some(0));
    let collector_log = std::fs::read_to_string(log("collector-2.log")).unwrap();
    assert!(
        collector_log.contains("Pruning history older than the retention period."),
        "{collector_log}"
    );
    drop(b_socks);
}
