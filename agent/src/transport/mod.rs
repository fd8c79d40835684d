//! `listenscope-agent run`: scan every interval, stream changes to the collector.
//!
//! Two loops share an [`outbox::Outbox`]:
//! - the scanner runs a scan every `interval` (on a blocking thread), records the result
//!   in the outbox (snapshot first, then deltas) and wakes the sender;
//! - the connection loop keeps one mutual-TLS session open (`session.rs`), resending what
//!   the collector has not acknowledged. Certificate files are reread on every attempt, so
//!   rotating them needs no restart.
//!
//! Several collectors may share one database. The agent talks to one at a time, starting
//! with the first URL; when a connection fails or a session breaks it moves on to the next
//! URL (round robin) after only `FAILOVER_DELAY` (125–250 ms). Once every URL has failed
//! in a row (a round), it waits a capped exponential backoff with jitter before the next
//! round. A Welcome resets both. The session id and the sequence numbers go on across
//! collectors: a collector on the same database resumes from the committed sequence, one
//! on another database asks for a snapshot. Rejected alternative: backing off before every
//! attempt, which would keep a host away from a healthy collector for up to
//! `reconnect_max` only because another one died.
//!
//! While the collector is unreachable scanning goes on; changes wait in the outbox with
//! their observation times (bounded, see `outbox.rs`).

mod cause;
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

pub use cause::ConnectError;
pub use session::SessionError;

use listenscope_core::pem::{self, TlsFileError};

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
    /// The certificate files cannot be used: fatal at start-up only (later, during a
    /// rotation, a bad file is logged and retried).
    #[error(transparent)]
    Files(#[from] FileProblems),
    #[error("the first scan failed")]
    FirstScan(#[from] scan::ScanError),
    #[error("the scan thread failed: {0}")]
    ScanThread(String),
    #[error("the operating system gave no random bytes for a session id: {0}")]
    Random(String),
    /// `RunConfig::collectors` is empty (validation refuses that; a hand-built config can
    /// still hold it).
    #[error("no collector URL to connect to")]
    NoCollector,
}

/// Every problem with the certificate files, each said once: the fix for missing files
/// (where they come from) is given once, however many are missing.
#[derive(Debug)]
pub struct FileProblems(pub Vec<TlsFileError>);

impl std::error::Error for FileProblems {}

const CREATE_HINT: &str = "these files come from the collector's machine: run `listenscope-collector \
     certs issue --dir DIR --host $(hostname -f)` there (ca.pem is the one `certs init` wrote), \
     copy ca.pem, HOST.pem and HOST.key to this host, and point --tls-ca, --tls-cert and \
     --tls-key (or the config file's tls_ca, tls_cert, tls_key) at them";

impl std::fmt::Display for FileProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let missing = |e: &TlsFileError| matches!(e, TlsFileError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
        let line = |e: &TlsFileError| match e {
            TlsFileError::Read { path, .. } if missing(e) => {
                format!("{}: no such file", path.display())
            }
            other => other.to_string(),
        };
        let lines: Vec<String> = self.0.iter().map(line).collect();
        match lines.as_slice() {
            [one] => f.write_str(one)?,
            many => write!(
                f,
                "the TLS files cannot be used:\n  - {}",
                many.join("\n  - ")
            )?,
        }
        if self.0.iter().any(missing) {
            write!(f, "\n{CREATE_HINT}")?;
        }
        Ok(())
    }
}

/// Checks at start-up that the CA, certificate and key files exist, can be read, parse,
/// are valid now, that the key is private to this user and belongs to the certificate.
/// Every problem is reported, not only the first.
pub fn check_files(cfg: &RunConfig) -> Result<(), FileProblems> {
    let mut problems = Vec::new();
    if let Err(e) = pem::load_certs(&cfg.tls_ca) {
        problems.push(e);
    }
    let cert = pem::load_certs(&cfg.tls_cert)
        .map_err(|e| problems.push(e))
        .is_ok();
    let key = pem::load_key(&cfg.tls_key)
        .map_err(|e| problems.push(e))
        .is_ok();
    if cert
        && key
        && let Err(e) = session::check_files(cfg)
    {
        problems.push(e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(FileProblems(problems))
    }
}

/// One scan on a blocking thread; `memo` keeps the assembled firewalls between scans (a
/// ruleset is parsed and evaluated again only when it changed).
async fn scan_state(
    sys: Arc<dyn System + Send + Sync>,
    opts: ScanOptions,
    memo: Arc<std::sync::Mutex<scan::FirewallMemo>>,
) -> Result<(State, OffsetDateTime), RunError> {
    tokio::task::spawn_blocking(move || {
        let mut memo = memo.lock().unwrap_or_else(|p| p.into_inner());
        let inv = scan::scan_with(&*sys, &opts, &mut memo)?;
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
    if cfg.collectors.is_empty() {
        return Err(RunError::NoCollector);
    }
    check_files(&cfg)?;
    let opts = ScanOptions {
        netns: cfg.netns.clone(),
        ..ScanOptions::default()
    };
    // Scan before connecting: an early connection must never send an empty inventory.
    let memo = Arc::new(std::sync::Mutex::new(scan::FirewallMemo::default()));
    let (state, at) = scan_state(Arc::clone(&sys), opts.clone(), Arc::clone(&memo)).await?;
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
                match scan_state(Arc::clone(&sys), opts.clone(), Arc::clone(&memo)).await {
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
            let mut failover_waits = failover_delays();
            let mut rotation = Rotation::new(cfg.collectors.len());
            loop {
                let url = &cfg.collectors[rotation.current()];
                let (welcomed, _ended) = session::run(&cfg, url, &shared).await;
                if welcomed {
                    waits = backoff(base, cfg.reconnect_max);
                }
                let step = rotation.ended(welcomed);
                let next = &cfg.collectors[rotation.current()];
                // Neither series is ever exhausted (no maximum of attempts).
                match step {
                    Step::Failover => {
                        let wait = failover_waits.next().unwrap_or(FAILOVER_DELAY);
                        tracing::info!(
                            from = %url,
                            to = %next,
                            retry_in_ms = wait.as_millis() as u64,
                            "Failing over to the next collector."
                        );
                        tokio::time::sleep(wait).await;
                    }
                    Step::Backoff => {
                        let wait = waits.next().unwrap_or(cfg.reconnect_max);
                        tracing::info!(
                            collector = %next,
                            collectors = cfg.collectors.len(),
                            retry_in_ms = wait.as_millis() as u64,
                            "Reconnecting."
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
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

/// Which collector the connection loop uses, and whether a whole round has failed.
#[derive(Debug)]
struct Rotation {
    len: usize,
    current: usize,
    /// Attempts that ended since the last Welcome or the last backoff.
    ended_in_round: usize,
}

/// What to do after an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Try the next collector after `FAILOVER_DELAY` and its jitter.
    Failover,
    /// Every collector failed in a row: wait the backoff, then try the next one.
    Backoff,
}

impl Rotation {
    fn new(len: usize) -> Rotation {
        Rotation {
            len: len.max(1),
            current: 0,
            ended_in_round: 0,
        }
    }

    /// Index of the collector to try.
    fn current(&self) -> usize {
        self.current
    }

    /// The attempt on the current collector ended, `welcomed` or not: move on to the next
    /// one. A welcomed session starts a new round, which it opens itself: with one
    /// collector every end is a whole round, as before failover existed.
    fn ended(&mut self, welcomed: bool) -> Step {
        if welcomed {
            self.ended_in_round = 0;
        }
        self.ended_in_round += 1;
        self.current = (self.current + 1) % self.len;
        if self.ended_in_round >= self.len {
            self.ended_in_round = 0;
            Step::Backoff
        } else {
            Step::Failover
        }
    }
}

/// The wait before trying the next collector within a round is this plus a jitter of up
/// to as much again (125–250 ms). Short, so a healthy collector takes over at once;
/// jittered, so a fleet whose collector died does not reconnect all in one burst.
const FAILOVER_DELAY: Duration = Duration::from_millis(125);

fn failover_delays() -> backon::ConstantBackoff {
    use backon::BackoffBuilder;
    backon::ConstantBuilder::default()
        .with_delay(FAILOVER_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
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

    /// Runs attempts on a rotation of `len` collectors: each `(welcomed, expected)` is one
    /// attempt that ended, the step taken and the collector tried next.
    #[track_caller]
    fn check_rotation(len: usize, attempts: &[(bool, Step, usize)]) {
        let mut r = Rotation::new(len);
        assert_eq!(r.current(), 0, "starts with the first collector");
        for (i, &(welcomed, step, next)) in attempts.iter().enumerate() {
            assert_eq!(
                (r.ended(welcomed), r.current()),
                (step, next),
                "attempt {i} on {len} collectors"
            );
        }
    }

    #[test]
    fn rotation_fails_over_and_backs_off_after_a_round() {
        use Step::{Backoff, Failover};
        // One collector: every end backs off, welcomed or not (the behaviour before
        // failover).
        check_rotation(
            1,
            &[(false, Backoff, 0), (false, Backoff, 0), (true, Backoff, 0)],
        );
        // Two: the second is tried at once, a failed round backs off, and so on.
        check_rotation(
            2,
            &[
                (false, Failover, 1),
                (false, Backoff, 0),
                (false, Failover, 1),
                (false, Backoff, 0),
            ],
        );
        // A welcomed session that breaks starts a new round: the other one at once, then
        // back off if that fails too.
        check_rotation(
            2,
            &[
                (false, Failover, 1),
                (true, Failover, 0),
                (false, Backoff, 1),
                (true, Failover, 0),
                (true, Failover, 1),
            ],
        );
        // Three: a round is three failures in a row, counted from any collector.
        check_rotation(
            3,
            &[
                (false, Failover, 1),
                (true, Failover, 2),
                (false, Failover, 0),
                (false, Backoff, 1),
                (false, Failover, 2),
                (false, Failover, 0),
                (false, Backoff, 1),
            ],
        );
    }

    #[test]
    fn failover_delays_are_short_and_jittered() {
        let waits: Vec<Duration> = failover_delays().take(64).collect();
        for w in &waits {
            assert!(
                *w >= FAILOVER_DELAY && *w <= 2 * FAILOVER_DELAY,
                "{w:?} outside [{FAILOVER_DELAY:?}, {:?}]",
                2 * FAILOVER_DELAY
            );
        }
        assert!(
            waits.iter().any(|w| *w != waits[0]),
            "not jittered: {waits:?}"
        );
    }

    #[tokio::test]
    async fn no_collector_is_an_error() {
        let cfg = RunConfig {
            collectors: Vec::new(),
            tls_ca: "ca.pem".into(),
            tls_cert: "h.pem".into(),
            tls_key: "h.key".into(),
            interval: Duration::from_secs(10),
            netns: crate::scan::NetnsSelector::Current,
            max_pending_changes: 1,
            reconnect_max: Duration::from_secs(1),
            server_name: None,
        };
        let sys = Arc::new(crate::os::LinuxSystem::new());
        let ran = run(cfg, sys, std::future::pending()).await;
        assert!(matches!(ran, Err(RunError::NoCollector)), "{ran:?}");
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
