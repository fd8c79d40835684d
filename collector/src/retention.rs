//! `--retain`: prune history older than the retention period, in the background.
//!
//! Only versions that *ended* before the cutoff go (closed listeners, superseded
//! versions): the current state is never pruned, whatever its age. Deletes run in small
//! batches, each its own short transaction with a pause between, so ingest (SQLite's single
//! writer included) is never blocked for long.

use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Rows per delete batch.
pub const BATCH: i64 = 5000;
/// Pause between batches, letting ingest transactions in.
const PAUSE: Duration = Duration::from_millis(20);

/// How often pruning runs: a tenth of the retention period, between 1 minute and 1 hour.
pub fn every(retain: Duration) -> Duration {
    (retain / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600))
}

/// `now - retain`, or `None` when that is before the first representable date (nothing
/// can have ended then). Checked: the retention task must never panic, since the server
/// would go on without pruning. (`--retain` is at most 100 years where it is parsed.)
pub fn cutoff(now: OffsetDateTime, retain: Duration) -> Option<OffsetDateTime> {
    time::Duration::try_from(retain)
        .ok()
        .and_then(|r| now.checked_sub(r))
}

/// Prunes everything that ended before `now - retain`; returns rows deleted.
pub async fn prune_once(store: &Store, retain: Duration, stop: &CancellationToken) -> u64 {
    let Some(cutoff) = cutoff(OffsetDateTime::now_utc(), retain) else {
        return 0;
    };
    let mut total = 0;
    loop {
        if stop.is_cancelled() {
            break;
        }
        match store.prune_batch(cutoff, BATCH).await {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => {
                tracing::error!(error = %e, "Pruning history failed; retrying next round.");
                break;
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
    if total > 0 {
        tracing::info!(rows = total, cutoff = %crate::timefmt::format(cutoff), "Pruned history.");
    }
    total
}

/// Runs until `stop`.
pub async fn run(store: Store, retain: Duration, stop: CancellationToken) {
    loop {
        prune_once(&store, retain, &stop).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every(retain)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cadence() {
        assert_eq!(
            every(Duration::from_secs(90 * 86400)),
            Duration::from_secs(3600)
        );
        assert_eq!(every(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(
            every(Duration::from_secs(3 * 3600)),
            Duration::from_secs(1080)
        );
        assert_eq!(every(Duration::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn cutoff_never_overflows() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(
            cutoff(now, Duration::from_secs(3600)),
            Some(now - time::Duration::hours(1))
        );
        assert!(cutoff(now, listenscope_core::config::MAX_DURATION).is_some());
        assert_eq!(cutoff(now, Duration::MAX), None);
        assert_eq!(cutoff(now, Duration::from_secs(99_999_999 * 86_400)), None);
    }
}
