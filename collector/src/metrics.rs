//! Prometheus metrics, served on `--metrics-listen`. Names are constants so tests and
//! dashboards agree with the code.

use std::net::SocketAddr;

/// Gauge: agent sessions open now.
pub const CONNECTED_AGENTS: &str = "listenscope_connected_agents";
/// Counter by `kind` (snapshot_chunk, delta, heartbeat): agent messages received.
pub const MESSAGES: &str = "listenscope_messages_total";
/// Counter: listener rows written (inserted, closed or refreshed).
pub const ROWS: &str = "listenscope_listener_rows_total";
/// Counter by `reason` (no_certificate, unknown_ca, expired, not_yet_valid,
/// bad_certificate, handshake, timeout): connections refused before any RPC.
pub const REJECTED_CONNECTIONS: &str = "listenscope_rejected_connections_total";
/// Counter by `reason` (invalid_argument): sessions ended for a bad message.
pub const REJECTED_MESSAGES: &str = "listenscope_rejected_messages_total";
/// Counter by `reason` (gap): resyncs asked of agents.
pub const RESYNCS: &str = "listenscope_resyncs_total";
/// Histogram: seconds to commit one message.
pub const COMMIT_SECONDS: &str = "listenscope_commit_seconds";

/// Starts the exporter's HTTP listener (needs a tokio runtime). Call once per process.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    metrics::describe_gauge!(CONNECTED_AGENTS, "Agent sessions open now.");
    metrics::describe_counter!(MESSAGES, "Agent messages received, by kind.");
    metrics::describe_counter!(ROWS, "Listener rows written.");
    metrics::describe_counter!(
        REJECTED_CONNECTIONS,
        "Connections refused during TLS, by reason."
    );
    metrics::describe_counter!(REJECTED_MESSAGES, "Sessions ended for an invalid message.");
    metrics::describe_counter!(RESYNCS, "Snapshots asked of agents, by reason.");
    metrics::describe_histogram!(COMMIT_SECONDS, "Seconds to commit one agent message.");
    Ok(())
}
