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
/// bad_certificate, handshake, timeout: refused during TLS; session_limit: refused at
/// the `max_sessions` cap).
pub const REJECTED_CONNECTIONS: &str = "listenscope_rejected_connections_total";
/// Counter by `reason` (invalid_argument): sessions ended for a bad message.
pub const REJECTED_MESSAGES: &str = "listenscope_rejected_messages_total";
/// Counter by `reason` (gap): resyncs asked of agents.
pub const RESYNCS: &str = "listenscope_resyncs_total";
/// Histogram: seconds to store one group commit (a batch of messages).
pub const COMMIT_SECONDS: &str = "listenscope_commit_seconds";
/// Histogram: messages and Hellos per group commit.
pub const BATCH_MESSAGES: &str = "listenscope_write_batch_messages";
/// Histogram: seconds from a message's arrival to its commit (queueing included): what
/// an agent waits for its Ack.
pub const ACK_SECONDS: &str = "listenscope_ack_seconds";

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
        "Connections refused (during TLS, or at the session cap), by reason."
    );
    metrics::describe_counter!(REJECTED_MESSAGES, "Sessions ended for an invalid message.");
    metrics::describe_counter!(RESYNCS, "Snapshots asked of agents, by reason.");
    metrics::describe_histogram!(COMMIT_SECONDS, "Seconds to store one group commit.");
    metrics::describe_histogram!(BATCH_MESSAGES, "Messages and Hellos per group commit.");
    metrics::describe_histogram!(
        ACK_SECONDS,
        "Seconds from a message's arrival to its commit."
    );
    Ok(())
}
