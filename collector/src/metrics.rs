//! Prometheus metrics, served on `--metrics-listen`. Names are constants so tests and
//! dashboards agree with the code; `docs/metrics.md` has the table of every name (a test
//! here keeps the two in step).
//!
//! Every family is registered when the exporter starts, at zero and with each label value
//! it can take: a scrape before the first agent connects already shows them all, so rate()
//! and alerts work from the start instead of on "no data". Latencies are histograms (not
//! summaries): they aggregate across collectors and over time.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Gauge, always 1, labelled `version` (and `commit` when the build set
/// `LISTENSCOPE_COMMIT`): which collector build runs.
pub const BUILD_INFO: &str = "listenscope_build_info";
/// Gauge: agent sessions open now.
pub const CONNECTED_AGENTS: &str = "listenscope_connected_agents";
/// Counter by `kind` ([`MESSAGE_KINDS`]): agent messages received.
pub const MESSAGES: &str = "listenscope_messages_total";
/// Counter: listener rows written (inserted, closed or refreshed).
pub const ROWS: &str = "listenscope_listener_rows_total";
/// Counter by `reason` ([`REJECT_REASONS`]): connections refused by admission control
/// (before TLS, or without an HTTP/2 preface after it), during TLS, for a certificate
/// that names no host, or at the `max_sessions` cap.
pub const REJECTED_CONNECTIONS: &str = "listenscope_rejected_connections_total";
/// Counter by `reason` (invalid_argument): sessions ended for a bad message.
pub const REJECTED_MESSAGES: &str = "listenscope_rejected_messages_total";
/// Counter by `reason` ([`RESYNC_REASONS`]): resyncs asked of agents.
pub const RESYNCS: &str = "listenscope_resyncs_total";
/// Counter by `result` ([`CRL_RELOAD_RESULTS`]): loads of the certificate revocation
/// lists after start-up (SIGHUP, file changed). On `error` the previous lists stay.
pub const CRL_RELOADS: &str = "listenscope_crl_reloads_total";
/// Counter: live sessions ended because a reloaded CRL revoked their certificate.
pub const REVOKED_SESSIONS: &str = "listenscope_revoked_sessions_total";
/// Histogram: seconds to store one group commit (a batch of messages).
pub const COMMIT_SECONDS: &str = "listenscope_commit_seconds";
/// Histogram: messages and Hellos per group commit.
pub const BATCH_MESSAGES: &str = "listenscope_write_batch_messages";
/// Histogram: seconds from a message's arrival to its commit (queueing included): what
/// an agent waits for its Ack.
pub const ACK_SECONDS: &str = "listenscope_ack_seconds";
/// Gauge: the memory budget for agent messages in flight (`serve --memory-budget`).
pub const BUDGET_LIMIT_BYTES: &str = "listenscope_ingest_budget_limit_bytes";
/// Gauge: encoded bytes of agent messages admitted and not yet answered.
pub const BUDGET_BYTES: &str = "listenscope_ingest_budget_bytes";
/// Gauge: the most bytes admitted at once since start.
pub const BUDGET_PEAK_BYTES: &str = "listenscope_ingest_budget_peak_bytes";
/// Counter: messages whose admission had to wait for the budget.
pub const BUDGET_WAITS: &str = "listenscope_ingest_budget_waits_total";
/// Counter: sessions ended (RESOURCE_EXHAUSTED) because no slot for a snapshot in several
/// chunks was free in time.
pub const BUDGET_REFUSALS: &str = "listenscope_ingest_budget_refusals_total";

/// `kind` values of [`MESSAGES`].
pub const MESSAGE_KINDS: &[&str] = &["snapshot_chunk", "delta", "heartbeat"];
/// `reason` values of [`REJECTED_CONNECTIONS`]: refused during TLS or for the
/// certificate's name (see `tls::Refusal`), or at the session cap.
pub const REJECT_REASONS: &[&str] = &[
    "no_certificate",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "bad_certificate",
    "server_certificate_refused",
    "protocol_version",
    "host_name",
    "handshake",
    "timeout",
    "revoked",
    "source_limit",
    "handshake_limit",
    "displaced",
    "no_preface",
    "not_http2",
    "session_limit",
    "duplicate_identity",
];
/// `result` values of [`CRL_RELOADS`].
pub const CRL_RELOAD_RESULTS: &[&str] = &["ok", "error"];
/// `reason` values of [`REJECTED_MESSAGES`].
pub const REJECTED_MESSAGE_REASONS: &[&str] = &["invalid_argument"];
/// `reason` values of [`RESYNCS`].
pub const RESYNC_REASONS: &[&str] = &["gap", "stale_snapshot"];

/// Buckets of the latency histograms, in seconds: a commit of a few rows takes
/// milliseconds, a fleet's first snapshots seconds; past a minute an agent has long
/// been waiting.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of [`BATCH_MESSAGES`].
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// Every metric name, for the documentation check.
#[cfg(test)]
const ALL: &[&str] = &[
    BUILD_INFO,
    CONNECTED_AGENTS,
    MESSAGES,
    ROWS,
    REJECTED_CONNECTIONS,
    REJECTED_MESSAGES,
    RESYNCS,
    CRL_RELOADS,
    REVOKED_SESSIONS,
    COMMIT_SECONDS,
    BATCH_MESSAGES,
    ACK_SECONDS,
    BUDGET_LIMIT_BYTES,
    BUDGET_BYTES,
    BUDGET_PEAK_BYTES,
    BUDGET_WAITS,
    BUDGET_REFUSALS,
];

/// Starts the exporter's HTTP listener (needs a tokio runtime). Call once per process.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    let failed =
        |e: metrics_exporter_prometheus::BuildError| format!("cannot serve metrics on {addr}: {e}");
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(COMMIT_SECONDS.into()), SECONDS_BUCKETS)
        .map_err(failed)?
        .set_buckets_for_metric(Matcher::Full(ACK_SECONDS.into()), SECONDS_BUCKETS)
        .map_err(failed)?
        .set_buckets_for_metric(Matcher::Full(BATCH_MESSAGES.into()), BATCH_BUCKETS)
        .map_err(failed)?
        .install()
        .map_err(failed)?;
    describe();
    register();
    Ok(())
}

fn describe() {
    metrics::describe_gauge!(
        BUILD_INFO,
        "The collector's version (and commit), always 1."
    );
    metrics::describe_gauge!(CONNECTED_AGENTS, "Agent sessions open now.");
    metrics::describe_counter!(MESSAGES, "Agent messages received, by kind.");
    metrics::describe_counter!(ROWS, "Listener rows written.");
    metrics::describe_counter!(
        REJECTED_CONNECTIONS,
        "Connections refused (during TLS, for the certificate's name, or at the session cap), by reason."
    );
    metrics::describe_counter!(REJECTED_MESSAGES, "Sessions ended for an invalid message.");
    metrics::describe_counter!(RESYNCS, "Snapshots asked of agents, by reason.");
    metrics::describe_counter!(
        CRL_RELOADS,
        "Reloads of the certificate revocation lists, by result (error: the previous lists stay)."
    );
    metrics::describe_counter!(
        REVOKED_SESSIONS,
        "Live sessions ended because a reloaded CRL revoked their certificate."
    );
    metrics::describe_histogram!(COMMIT_SECONDS, "Seconds to store one group commit.");
    metrics::describe_gauge!(
        BUDGET_LIMIT_BYTES,
        "The memory budget for agent messages in flight, in encoded bytes."
    );
    metrics::describe_gauge!(
        BUDGET_BYTES,
        "Encoded bytes of agent messages admitted and not yet answered."
    );
    metrics::describe_gauge!(
        BUDGET_PEAK_BYTES,
        "The most encoded bytes of agent messages admitted at once since start."
    );
    metrics::describe_counter!(
        BUDGET_WAITS,
        "Agent messages whose reading waited for the memory budget."
    );
    metrics::describe_counter!(
        BUDGET_REFUSALS,
        "Sessions ended because no slot for a snapshot in several chunks was free in time."
    );
    metrics::describe_histogram!(BATCH_MESSAGES, "Messages and Hellos per group commit.");
    metrics::describe_histogram!(
        ACK_SECONDS,
        "Seconds from a message's arrival to its commit."
    );
}

/// Registers every family with each of its label values, at zero.
fn register() {
    let version = env!("CARGO_PKG_VERSION");
    // A commit only when the build environment names one: no build script, no git call.
    match option_env!("LISTENSCOPE_COMMIT") {
        Some(commit) if !commit.is_empty() => {
            metrics::gauge!(BUILD_INFO, "version" => version, "commit" => commit).set(1.0);
        }
        _ => metrics::gauge!(BUILD_INFO, "version" => version).set(1.0),
    }
    metrics::gauge!(CONNECTED_AGENTS).increment(0.0);
    metrics::gauge!(BUDGET_BYTES).increment(0.0);
    metrics::gauge!(BUDGET_PEAK_BYTES).increment(0.0);
    metrics::counter!(BUDGET_WAITS).increment(0);
    metrics::counter!(BUDGET_REFUSALS).increment(0);
    metrics::counter!(ROWS).increment(0);
    for kind in MESSAGE_KINDS {
        metrics::counter!(MESSAGES, "kind" => *kind).increment(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!(REJECTED_CONNECTIONS, "reason" => *reason).increment(0);
    }
    for reason in REJECTED_MESSAGE_REASONS {
        metrics::counter!(REJECTED_MESSAGES, "reason" => *reason).increment(0);
    }
    for reason in RESYNC_REASONS {
        metrics::counter!(RESYNCS, "reason" => *reason).increment(0);
    }
    for result in CRL_RELOAD_RESULTS {
        metrics::counter!(CRL_RELOADS, "result" => *result).increment(0);
    }
    metrics::counter!(REVOKED_SESSIONS).increment(0);
    // A registered histogram is exported with empty buckets until its first sample.
    let _ = metrics::histogram!(COMMIT_SECONDS);
    let _ = metrics::histogram!(BATCH_MESSAGES);
    let _ = metrics::histogram!(ACK_SECONDS);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/metrics.md names every metric and every label value.
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        for name in ALL {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in docs/metrics.md"
            );
        }
        for value in MESSAGE_KINDS
            .iter()
            .chain(REJECT_REASONS)
            .chain(REJECTED_MESSAGE_REASONS)
            .chain(RESYNC_REASONS)
            .chain(CRL_RELOAD_RESULTS)
        {
            assert!(
                doc.contains(&format!("`{value}`")),
                "{value} is not in docs/metrics.md"
            );
        }
    }
}
