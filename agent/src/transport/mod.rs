//! `listenscope-agent run`: scan every interval, stream changes to the collector.
//!
//! Two loops share an [`outbox::Outbox`]:
//! - the scanner runs a scan every `interval` (on a blocking thread), records the result
//!   in the outbox (snapshot first, then deltas) and wakes the sender;
//! - the connection loop keeps one mutual-TLS session open (`session.rs`), resending what
//!   the collector has not acknowledged and reconnecting with capped exponential backoff
//!   and jitter. Certificate files are reread on every attempt, so rotating them needs no
//!   restart.
//!
//! While the collector is unreachable scanning goes on; changes wait in the outbox with
//! their observation times (bounded, see `outbox.rs`).

pub mod outbox;
mod session;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::config::RunConfig;
use crate::os::System;
use crate::record::{State, state_of};
use crate::scan::{self, ScanOptions};
use outbox::{Outbox, Recorded};

pub use session::SessionError;

/// Shared between the scanner and the connection.
pub(crate) struct Shared {
    pub outbox: Mutex<Outbox>,
    /// A scan found nothing new: send a heartbeat with this time.
    pub heartbeat: Mutex<Option<OffsetDateTime>>,
    pub wake: Notify,
}

impl Shared {
    pub(crate) fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why `run` gave up. Everything else (collector down, rejected, scan hiccups) is retried.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the first scan failed: {0}")]
    FirstScan(#[from] scan::ScanError),
    #[error("the scan thread failed: {0}")]
    ScanThread(String),
    #[error("the operating system gave no random bytes for a session id: {0}")]
    Random(String),
}

async fn scan_state(
    sys: Arc<dyn System + Send + Sync>,
    opts: ScanOptions,
) -> Result<(State, OffsetDateTime), RunError> {
    tokio::task::spawn_blocking(move || {
        let inv = scan::scan(&*sys, &opts)?;
        Ok((state_of(&inv), inv.scanned_at))
    })
    .await
    .map_err(|e| RunError::ScanThread(e.to_string()))?
}

/// 16 random bytes from the OS (getrandom): the collector tells a restarted agent from a
/// retry by them, so two processes must never pick the same.
fn session_id() -> Result<[u8; 16], RunError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| RunError::Random(e.to_string()))?;
    Ok(id)
}

/// Runs until `shutdown` resolves. Unacknowledged changes are lost on shutdown (the
/// collector asks for a snapshot from the next agent session).
pub async fn run(
    cfg: RunConfig,
    sys: Arc<dyn System + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let opts = ScanOptions {
        netns: cfg.netns.clone(),
        ..ScanOptions::default()
    };
    // Scan before connecting: an early connection must never send an empty inventory.
    let (state, at) = scan_state(Arc::clone(&sys), opts.clone()).await?;
    tracing::info!(listeners = state.len(), "First scan done.");
    let shared = Arc::new(Shared {
        outbox: Mutex::new(Outbox::new(
            session_id()?,
            state,
            at,
            cfg.max_pending_changes,
        )),
        heartbeat: Mutex::new(None),
        wake: Notify::new(),
    });

    let scanner = {
        let shared = Arc::clone(&shared);
        let interval = cfg.interval;
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate: the first scan already ran
            loop {
                tick.tick().await;
                match scan_state(Arc::clone(&sys), opts.clone()).await {
                    Ok((state, at)) => {
                        let recorded = shared.outbox().record_scan(state, at);
                        match recorded {
                            Recorded::Unchanged => {
                                *shared.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(at);
                            }
                            Recorded::Changed(n) => tracing::debug!(changes = n, "Changes queued."),
                            Recorded::Collapsed => tracing::warn!(
                                "Pending changes exceeded max_pending_changes: they are replaced by \
                                 one snapshot, so the history loses their exact times."
                            ),
                        }
                        shared.wake.notify_one();
                    }
                    Err(e) => tracing::error!(error = %e, "Scan failed; retrying next interval."),
                }
            }
        }
    };

    let connection = {
        let shared = Arc::clone(&shared);
        async move {
            let base = Duration::from_millis(500);
            let mut waits = backoff(base, cfg.reconnect_max);
            loop {
                let (welcomed, _ended) = session::run(&cfg, &shared).await;
                if welcomed {
                    waits = backoff(base, cfg.reconnect_max);
                }
                // Never exhausted (no maximum of attempts); `max` if it were.
                let wait = waits.next().unwrap_or(cfg.reconnect_max);
                tracing::info!(retry_in_ms = wait.as_millis() as u64, "Reconnecting.");
                tokio::time::sleep(wait).await;
            }
        }
    };

    tokio::select! {
        () = shutdown => tracing::info!("Shutting down."),
        () = scanner => {}
        () = connection => {}
    }
    Ok(())
}

/// Capped exponential backoff with jitter (backon): each wait is uniform in
/// [cap/2, cap), where cap doubles from `base` up to `max`. backon adds a jitter of up to
/// one delay to each delay, so its delays run from `base/2` to `max/2`.
pub fn backoff(base: Duration, max: Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(base / 2)
        .with_max_delay(max.max(base) / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let base = Duration::from_millis(100);
        let waits: Vec<Duration> = backoff(base, Duration::from_secs(2)).take(10).collect();
        for (i, w) in waits.iter().enumerate() {
            let cap = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(2));
            assert!(
                *w >= cap / 2 && *w <= cap,
                "attempt {i}: {w:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
        // A new series (after a Welcome) starts again at the base.
        assert!(backoff(base, Duration::from_secs(2)).next().unwrap() <= base);
        // Jittered: not every series is the same.
        let series: std::collections::HashSet<Vec<Duration>> = (0..8)
            .map(|_| backoff(base, Duration::from_secs(2)).take(5).collect())
            .collect();
        assert!(series.len() > 1);
    }

    #[test]
    fn session_ids_differ() {
        let ids: std::collections::HashSet<[u8; 16]> =
            (0..64).map(|_| session_id().unwrap()).collect();
        assert_eq!(ids.len(), 64);
        // Not a constant pattern either: both halves vary.
        assert!(ids.iter().any(|id| id[..8] != id[8..]));
    }
}
