//! A slow write is not an operator's warning: the driver's slow-statement lines (the
//! whole SQL text of a statement) stay at debug, and `listenscope_commit_seconds` is the
//! operator's view. Here a real PostgreSQL table lock holds the collector's first write
//! for longer than the slow-statement threshold while a real agent connects; the
//! collector's log (at its default level) carries no driver warning, and the agent's
//! snapshot is stored once the lock goes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::time::Duration;

use listenscope_collector::store::DbUrl;
use sqlx::Connection;
use util::*;

/// Longer than the collector's slow-write threshold (10 s).
const HELD: Duration = Duration::from_secs(11);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_write_on_postgres_is_no_warning() {
    require_root();
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let url = server.database("quiet").await;
    let db = DbUrl::Postgres(url.clone());
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("quiet-logs");
    let ns = HostNs::new();
    let port = free_port("0.0.0.0").port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let log = |n: &str| dir.path().join(n);
    let _logs = LogsOnPanic(vec![log("collector.log"), log("agent.log")]);
    let _collector = spawn_collector(&pki, &db, listen, None, &log("collector.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;

    // Every write of a session starts with its host row: hold that table.
    let mut locker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE host IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let _agent = ns.spawn_agent(
        &pki,
        "h1",
        format!("{}:{port}", ns.host_ip).parse().unwrap(),
        &log("agent.log"),
    );
    tokio::time::sleep(HELD).await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();

    eventually(30, "the snapshot stored after the lock", || async {
        query(
            &db,
            "SELECT count(*) FROM host WHERE last_snapshot_at IS NOT NULL",
            &[],
        )
        .await
        .rows[0][0]
            == 1
    })
    .await;
    let text = std::fs::read_to_string(log("collector.log")).unwrap();
    assert!(
        !text.contains("slow statement") && !text.contains("WARN sqlx"),
        "driver warnings reached the operator:\n{text}"
    );
}
