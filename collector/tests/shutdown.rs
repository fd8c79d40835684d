//! Stopping the collector is prompt even when an agent cannot answer: with a connected
//! agent frozen (SIGSTOP: a hung host, a cut link), SIGTERM still ends the real collector
//! cleanly (exit 0) well within systemd's stop timeout (`TimeoutStopSec=30` in the
//! shipped unit), instead of waiting for the frozen connection's keepalive to expire.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use listenscope_collector::store::DbUrl;
use util::*;

/// The shipped unit's `TimeoutStopSec`, after which systemd kills the collector.
const SYSTEMD_STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_frozen_agent_stops_within_the_unit_timeout() {
    require_root();
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/systemd/listenscope-collector.service"),
    )
    .unwrap();
    assert!(
        unit.lines().any(|l| l == "TimeoutStopSec=30"),
        "the unit's stop timeout changed: update this test"
    );
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("shutdown");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let ns = HostNs::new();
    let port = free_port("0.0.0.0").port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let log = |n: &str| dir.path().join(n);
    let _logs = LogsOnPanic(vec![log("collector.log"), log("agent.log")]);
    let mut collector = spawn_collector(&pki, &db, listen, None, &log("collector.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let agent = ns.spawn_agent(
        &pki,
        "h1",
        format!("{}:{port}", ns.host_ip).parse().unwrap(),
        &log("agent.log"),
    );
    eventually(30, "the agent's snapshot stored", || async {
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

    // The agent's process stops answering anything, its connection open.
    let agent_pid = agent.0.id() as i32;
    // SAFETY: signalling our own, not yet reaped, child by pid.
    unsafe { libc::kill(agent_pid, libc::SIGSTOP) };
    let started = Instant::now();
    // SAFETY: as above, the collector is our child.
    unsafe { libc::kill(collector.0.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| {
        wait_for(
            SYSTEMD_STOP_TIMEOUT,
            "the collector to exit after SIGTERM",
            || {
                collector
                    .0
                    .try_wait()
                    .unwrap()
                    .ok_or_else(|| "still running".to_string())
            },
        )
    });
    let took = started.elapsed();
    // SAFETY: as above; the agent is killed on drop, stopped or not.
    unsafe { libc::kill(agent_pid, libc::SIGCONT) };
    assert_eq!(status.code(), Some(0), "graceful stop: {status:?}");
    let log_text = std::fs::read_to_string(log("collector.log")).unwrap();
    assert!(log_text.contains("Collector stopped."), "{log_text}");
    eprintln!("stopped {took:?} after SIGTERM");
}

/// An agent that stops (SIGTERM, as systemd stops it; or killed) is an agent going away,
/// not a failed session: the collector logs it at info, never as a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_is_no_warning() {
    require_root();
    let pki = Pki::new(&["h1", "h2"]);
    let dir = TempDir::new("agent-stops");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let ns = HostNs::new();
    let port = free_port("0.0.0.0").port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let log = |n: &str| dir.path().join(n);
    let _logs = LogsOnPanic(vec![log("collector.log")]);
    let _collector = spawn_collector(&pki, &db, listen, None, &log("collector.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let to: SocketAddr = format!("{}:{port}", ns.host_ip).parse().unwrap();
    let mut stopped = ns.spawn_agent(&pki, "h1", to, &log("agent-h1.log"));
    let mut killed = ns.spawn_agent(&pki, "h2", to, &log("agent-h2.log"));
    eventually(30, "both snapshots stored", || async {
        query(
            &db,
            "SELECT count(*) FROM host WHERE last_snapshot_at IS NOT NULL",
            &[],
        )
        .await
        .rows[0][0]
            == 2
    })
    .await;
    let status = stopped.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
    killed.kill();
    let collector_log = || std::fs::read_to_string(log("collector.log")).unwrap();
    eventually(20, "both disconnections logged", || async {
        collector_log().matches("Agent disconnected.").count() == 2
    })
    .await;
    let text = collector_log();
    assert!(
        !text.contains("WARN"),
        "an agent stopping is not a warning:\n{text}"
    );
}

/// A SIGTERM while the collector is still starting up (here: waiting for its database,
/// which another process holds locked) stops it gracefully: the handler is installed
/// first thing, not when the server first waits for it (until then the default action
/// kills the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_is_graceful() {
    use sqlx::Connection;
    let pki = Pki::new(&[]);
    let dir = TempDir::new("early-term");
    let path = dir.path().join("ls.db");
    let log = dir.path().join("collector.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut locker = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    let mut collector = spawn_collector(
        &pki,
        &DbUrl::Sqlite(path),
        free_port("127.0.0.1"),
        None,
        &log,
    );
    // Well into its start-up: it cannot get past opening the locked database.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: signalling our own, not yet reaped, child by pid.
    unsafe { libc::kill(collector.0.id() as i32, libc::SIGTERM) };
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    let status = tokio::task::block_in_place(|| collector.0.wait().unwrap());
    assert_eq!(
        status.code(),
        Some(0),
        "killed by the signal instead of stopping: {status:?}"
    );
}
