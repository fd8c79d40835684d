//! The real `/metrics` endpoint of a real `serve`: every family is there before any agent
//! connects (zero, with its label values), the build is named, latencies are histograms
//! with buckets, and they fill once an agent's messages are stored.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::time::Duration;

use listenscope_collector::store::DbUrl;
use util::*;

/// The value of the sample line that starts with `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const FAMILIES: &[(&str, &str)] = &[
    ("listenscope_build_info", "gauge"),
    ("listenscope_connected_agents", "gauge"),
    ("listenscope_messages_total", "counter"),
    ("listenscope_listener_rows_total", "counter"),
    ("listenscope_rejected_connections_total", "counter"),
    ("listenscope_rejected_messages_total", "counter"),
    ("listenscope_resyncs_total", "counter"),
    ("listenscope_commit_seconds", "histogram"),
    ("listenscope_write_batch_messages", "histogram"),
    ("listenscope_ack_seconds", "histogram"),
    ("listenscope_ingest_budget_limit_bytes", "gauge"),
    ("listenscope_ingest_budget_bytes", "gauge"),
    ("listenscope_ingest_budget_peak_bytes", "gauge"),
    ("listenscope_ingest_budget_waits_total", "counter"),
    ("listenscope_ingest_budget_refusals_total", "counter"),
];

// Multi-threaded: the test blocks in `terminate()` while the collector waits for this
// process to close its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_from_start_up_and_histograms_that_fill() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("metrics");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let mut c = spawn_collector(&pki, &db, addr, Some(maddr), &log);
    wait_listening(addr).await;
    wait_listening(maddr).await;

    // Before any agent: every family, typed, at zero.
    let text = metrics(maddr).await;
    for (name, kind) in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "{name} ({kind}) missing before the first agent:\n{text}"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(
            &text,
            &format!("listenscope_build_info{{version=\"{version}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    for series in [
        "listenscope_connected_agents",
        "listenscope_messages_total{kind=\"delta\"}",
        "listenscope_rejected_connections_total{reason=\"unknown_ca\"}",
        "listenscope_rejected_connections_total{reason=\"session_limit\"}",
        "listenscope_resyncs_total{reason=\"gap\"}",
        "listenscope_ack_seconds_count",
        "listenscope_commit_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert_eq!(value(&text, series), Some(0.0), "{series}:\n{text}");
    }
    assert!(
        text.contains("listenscope_commit_seconds_bucket{le=\"0.01\"}")
            && text.contains("listenscope_ack_seconds_bucket{le=\"1\"}"),
        "latencies are histograms with buckets:\n{text}"
    );
    assert!(
        !text.contains("quantile="),
        "no summaries (they do not aggregate):\n{text}"
    );

    // One agent stores a snapshot: the histograms count it.
    let mut s = session_as(&pki, addr, "h1", hello(1, 0, "h1")).await;
    s.recv().await.unwrap();
    s.send(snapshot(1, vec![listener("host", 80)])).await;
    assert!(matches!(
        s.recv().await.unwrap(),
        Some(listenscope_proto::v1::collector_message::Body::Ack(_))
    ));
    wait_for_async(Duration::from_secs(10), "the ack counted", || async {
        let text = metrics(maddr).await;
        match (
            value(&text, "listenscope_ack_seconds_count"),
            value(&text, "listenscope_commit_seconds_bucket{le=\"+Inf\"}"),
            value(&text, "listenscope_connected_agents"),
            value(&text, "listenscope_messages_total{kind=\"snapshot_chunk\"}"),
        ) {
            (Some(a), Some(c), Some(1.0), Some(1.0)) if a >= 1.0 && c >= 1.0 => Ok(()),
            _ => Err(text),
        }
    })
    .await;
    drop(s);
    assert_eq!(c.terminate().code(), Some(0));
}
