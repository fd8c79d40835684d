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
//! round. Only a session that stayed up for [`HEALTHY_SESSION`] (60 s) resets the backoff
//! and starts a new round: two machines sharing one certificate knock each other off right
//! after their Welcome, and resetting on every Welcome (as before) made them flap at once,
//! forever. Rejected: resetting on the first Ack, which such a pair also gets (each one's
//! snapshot is committed before the other knocks it off). A collector that refuses the
//! session with `ALREADY_EXISTS` (another live agent with another instance id holds this
//! certificate) gets a long backoff of its own (1–2 min, doubling to 5–10 min) and an
//! ERROR at most every 10 minutes naming the fix. The session id and the sequence numbers go on across
//! collectors: a collector on the same database resumes from the committed sequence, one
//! on another database asks for a snapshot. Rejected alternative: backing off before every
//! attempt, which would keep a host away from a healthy collector for up to
//! `reconnect_max` only because another one died.
//!
//! While the collector is unreachable scanning goes on; changes wait in the outbox with
//! their observation times (bounded, see `outbox.rs`). With a state directory
//! (`state.rs`) the outbox is journaled (`journal.rs`): a restarted agent resumes its
//! session with every unacknowledged change and its observation time. The first scan
//! after a restart is diffed against the last state the journal holds, so a listener that
//! closed (or opened) while the agent was down is reported at the time of that first
//! scan: the first time the agent saw it, as for any change (it happened between the last
//! scan before and that one).

mod base;
mod bell;
mod cause;
pub mod journal;
pub mod outbox;
pub mod scanner;
mod session;
pub mod state;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::config::{RunConfig, StateConfig};
use crate::live::Scanner;
use crate::os::System;
use crate::record::{State, state_of};
use crate::scan::{self, ScanOptions};
use journal::{Journal, JournalError, Loaded};
use outbox::{Outbox, Recorded};
use state::StateDir;

pub use cause::ConnectError;
pub use session::SessionError;

use listenscope_core::pem::{self, TlsFileError};
use listenscope_core::watch::Watch;

/// Shared between the scanner and the connection.
pub(crate) struct Shared {
    pub outbox: Mutex<Book>,
    /// A scan found nothing new: send a heartbeat with this time.
    pub heartbeat: Mutex<Option<OffsetDateTime>>,
    pub wake: Notify,
    /// This installation's id (`state.rs`), sent in every Hello. None without a state
    /// directory: the agent then sends none, and the collector treats it as an agent from
    /// before instance ids (a newer connection replaces the older). A per-process id would
    /// make an agent restarted after an unclean disconnect look like a second machine
    /// until the collector notices the dead connection.
    pub instance_id: Option<[u8; 16]>,
    /// How the scanner learns of listens and closes now, sent in every Hello and
    /// Heartbeat (`set_watch`).
    pub watch: Mutex<Watch>,
}

impl Shared {
    pub(crate) fn outbox(&self) -> std::sync::MutexGuard<'_, Book> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scanner's watch mode is `w` now. Kept bounded (`Watch::bound`: what the
    /// collector accepts); when it differs from the last one, the session sends a
    /// heartbeat at once (stamped now unless a scan's heartbeat is already waiting), so the
    /// collector shows a worse mode without waiting for the next scan that finds nothing.
    /// Returns whether it changed.
    pub(crate) fn set_watch(&self, w: Watch) -> bool {
        let w = w.bounded();
        {
            let mut current = self.watch.lock().unwrap_or_else(|p| p.into_inner());
            if *current == w {
                return false;
            }
            tracing::info!(
                from = %current.mode,
                to = %w.mode,
                reason = w.reason.as_deref().unwrap_or(""),
                "Watch mode changed."
            );
            *current = w;
        }
        self.heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(OffsetDateTime::now_utc);
        self.wake.notify_one();
        true
    }

    /// The current watch mode (for a Hello or a Heartbeat).
    pub(crate) fn watch(&self) -> Watch {
        self.watch.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The outbox and its journal: every change to the outbox goes through here and is
/// journaled in the same locked operation, so the sender never sees a message that is
/// not on disk yet (`journal.rs`). Reading goes through `Deref`; there is deliberately no
/// `DerefMut`, so nothing changes the outbox behind the journal's back.
pub(crate) struct Book {
    outbox: Outbox,
    journal: Option<Journal>,
    dir: Option<PathBuf>,
    /// Writing the journal failed: its file was removed (a restart then starts afresh
    /// instead of from a stale journal) and it is rewritten whole at the next operation.
    broken: bool,
}

impl std::ops::Deref for Book {
    type Target = Outbox;

    fn deref(&self) -> &Outbox {
        &self.outbox
    }
}

impl Book {
    fn without_journal(outbox: Outbox) -> Book {
        Book {
            outbox,
            journal: None,
            dir: None,
            broken: false,
        }
    }

    pub fn record_scan(&mut self, state: State, at: OffsetDateTime) -> Recorded {
        let recorded = self.outbox.record_scan(state, at);
        // Once per scan: the batch of this scan's records (and the acks before) is synced.
        self.persist(true);
        // The scan's inventory, the previous state and the diff are freed now: give their
        // pages back, or the heap keeps the scan's transient peak for good (`os::heap`).
        crate::os::heap::release_free_memory();
        recorded
    }

    pub fn on_welcome(&mut self, resume_after: Option<u64>) -> bool {
        let restarted = self.outbox.on_welcome(resume_after);
        self.persist(false);
        restarted
    }

    pub fn on_ack(&mut self, seq: u64) {
        self.outbox.on_ack(seq);
        // Written, synced with the next push: a lost ack is repeated by `resume_after`.
        self.persist(false);
    }

    pub fn restart_from_snapshot(&mut self) {
        self.outbox.restart_from_snapshot();
        self.persist(false);
    }

    /// Syncs what is written (at shutdown).
    pub fn sync(&mut self) {
        self.persist(true);
    }

    fn persist(&mut self, sync: bool) {
        let overflows = self.outbox.overflows;
        let Some(j) = &mut self.journal else {
            self.outbox.take_effects();
            return;
        };
        let written = if self.broken {
            // Retried once per scan, not on every ack: a full disk is not hammered.
            if !sync {
                self.outbox.take_effects();
                return;
            }
            j.compact(&mut self.outbox)
        } else {
            j.record(&mut self.outbox, sync)
        };
        match written {
            Ok(()) if self.broken => {
                self.broken = false;
                tracing::info!("The outbox journal is written again.");
            }
            Ok(()) => {}
            Err(e @ JournalError::TooBig { .. }) => {
                tracing::error!(
                    error = %e,
                    "The inventory does not fit the outbox journal: going on without it; an agent restart now loses unacknowledged changes."
                );
                self.journal = None;
                self.remove_journal();
            }
            Err(e) => {
                if !self.broken {
                    tracing::error!(
                        error = %e,
                        "Writing the outbox journal failed: its file is removed and rewritten at the next scan; until then an agent restart loses unacknowledged changes."
                    );
                }
                self.broken = true;
                self.remove_journal();
            }
        }
        if self.outbox.overflows > overflows {
            tracing::warn!(
                "The outbox journal reached journal_max_bytes: pending changes are replaced by one snapshot, so the history loses their exact times."
            );
        }
    }

    fn remove_journal(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(journal::FILE));
        }
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
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("the outbox journal cannot be written: {0}")]
    Journal(#[from] JournalError),
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

/// The first whole scan, on a blocking thread.
async fn first_scan(
    sys: Arc<dyn System + Send + Sync>,
    scanner: Arc<Mutex<Scanner>>,
) -> Result<(State, OffsetDateTime), RunError> {
    tokio::task::spawn_blocking(move || {
        let inv = scanner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .full(&*sys)?;
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

/// Runs until `shutdown` resolves, without a state directory: unacknowledged changes are
/// lost when the process ends (the collector asks the next agent session for a snapshot).
pub async fn run(
    cfg: RunConfig,
    sys: Arc<dyn System + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_inner(cfg, StateConfig::default(), sys, shutdown, false).await
}

/// Runs until `shutdown` resolves. With `state.state_dir`, the outbox is journaled there
/// and restored at start: a restart resumes the session and loses nothing it saw; without
/// one, a warning says what that costs (the service's case: `run`, in process, does not).
pub async fn run_with_state(
    cfg: RunConfig,
    state_cfg: StateConfig,
    sys: Arc<dyn System + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_inner(cfg, state_cfg, sys, shutdown, true).await
}

async fn run_inner(
    cfg: RunConfig,
    state_cfg: StateConfig,
    sys: Arc<dyn System + Send + Sync>,
    shutdown: impl Future<Output = ()>,
    warn_stateless: bool,
) -> Result<(), RunError> {
    if cfg.collectors.is_empty() {
        return Err(RunError::NoCollector);
    }
    check_files(&cfg)?;
    // The directory is locked before the first scan: a second agent on it stops at once.
    let dir = match &state_cfg.state_dir {
        Some(path) => Some(StateDir::open(path)?),
        None => None,
    };
    let instance_id = match &dir {
        Some(d) => Some(d.instance_id()?),
        None => None,
    };
    let opts = ScanOptions {
        netns: cfg.netns.clone(),
        ..ScanOptions::default()
    };
    // Scan before connecting: an early connection must never send an empty inventory.
    // The doorbell opens (or polling is chosen) before the first scan: what changes
    // during that scan rings it, so nothing falls between the scan and the watching.
    let started = scanner::start(&cfg, &sys).await;
    let scanner = Arc::new(Mutex::new(Scanner::new(opts)));
    let (state, at) = first_scan(Arc::clone(&sys), Arc::clone(&scanner)).await?;
    tracing::info!(listeners = state.len(), "First scan done.");
    if dir.is_none() && warn_stateless {
        tracing::warn!(
            "No state directory: changes not yet acknowledged by the collector are lost if the \
             agent restarts, and without an instance id a second machine using this \
             certificate cannot be told apart. Set --state-dir (or state_dir; the systemd \
             unit sets StateDirectory=)."
        );
    }
    let book = open_book(dir.as_ref(), &state_cfg, &cfg, state, at)?;
    let shared = Arc::new(Shared {
        outbox: Mutex::new(book),
        heartbeat: Mutex::new(None),
        wake: Notify::new(),
        instance_id,
        // What the scanner found it can do: the first Hello says it already.
        watch: Mutex::new(started.watch.clone().bounded()),
    });

    let watching = scanner::run(
        cfg.clone(),
        Arc::clone(&sys),
        scanner,
        Arc::clone(&shared),
        started,
    );

    let connection = {
        let shared = Arc::clone(&shared);
        async move {
            let mut waits = Waits::new(cfg.reconnect_max);
            let mut failover_waits = failover_delays();
            let mut rotation = Rotation::new(cfg.collectors.len());
            let mut duplicate_log = RateLimit::new(DUPLICATE_LOG_EVERY);
            loop {
                let url = &cfg.collectors[rotation.current()];
                let outcome = session::run(&cfg, url, &shared).await;
                let healthy = waits.ended(outcome.up);
                let step = rotation.ended(healthy);
                let next = &cfg.collectors[rotation.current()];
                if outcome.duplicate() {
                    let wait = waits.next_duplicate();
                    if duplicate_log.due(Instant::now()) {
                        tracing::error!(
                            collector = %url,
                            cert = %cfg.tls_cert.display(),
                            instance_id = %shared.instance_id.map_or_else(|| "none".into(), |id| state::hex(&id)),
                            retry_in_s = wait.as_secs(),
                            "Another machine uses this host's certificate: the collector refused \
                             this agent (ALREADY_EXISTS) because an agent with another instance \
                             id holds the session. Issue this machine its own certificate \
                             (`listenscope-collector certs issue --host NAME`); until then this \
                             agent retries rarely."
                        );
                    } else {
                        tracing::info!(
                            collector = %url,
                            retry_in_s = wait.as_secs(),
                            "Another agent holds this certificate's session; retrying later."
                        );
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
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
                        let wait = waits.next_backoff();
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
        () = watching => {}
        () = connection => {}
    }
    shared.outbox().sync();
    Ok(())
}

/// The outbox at start: restored from the journal when there is one that can be read,
/// else a new session whose first message is the snapshot of the first scan.
fn open_book(
    dir: Option<&StateDir>,
    state_cfg: &StateConfig,
    cfg: &RunConfig,
    state: State,
    at: OffsetDateTime,
) -> Result<Book, RunError> {
    let Some(dir) = dir else {
        return Ok(Book::without_journal(Outbox::new(
            session_id()?,
            state,
            at,
            cfg.max_pending_changes,
        )));
    };
    let path = dir.path().join(journal::FILE);
    let restored = match journal::load(&path)? {
        Loaded::Missing => None,
        Loaded::Restored(image) => Some(image),
        Loaded::TornTail {
            valid_bytes,
            dropped,
            why,
        } => {
            tracing::warn!(
                journal = %path.display(),
                valid_bytes,
                dropped_bytes = dropped,
                reason = %why,
                "The outbox journal ends in a damaged record (a torn write or corruption): \
                 starting a new session with a fresh snapshot."
            );
            None
        }
        Loaded::Unreadable { why } => {
            let aside = dir.path().join(journal::UNREADABLE);
            std::fs::rename(&path, &aside).map_err(|source| JournalError::Io {
                path: aside.clone(),
                source,
            })?;
            tracing::warn!(
                journal = %path.display(),
                moved_to = %aside.display(),
                reason = %why,
                "The outbox journal cannot be read; it was moved aside and the agent starts \
                 afresh (a new session with a snapshot)."
            );
            None
        }
    };
    let mut outbox = match restored {
        Some(image) => {
            let mut o = Outbox::restore(image, cfg.max_pending_changes);
            let pending = o.pending().count();
            // The first scan, diffed against the last journaled one: what changed while
            // the agent was down is stamped with this scan's time.
            let since = match o.record_scan(state, at) {
                Recorded::Unchanged => 0,
                Recorded::Changed(n) => n,
                Recorded::Collapsed => o.pending_entries(),
            };
            tracing::info!(
                session_id = %state::hex(&o.session_id),
                acked = o.acked(),
                pending,
                changes_while_down = since,
                "Resuming the session from the outbox journal."
            );
            o
        }
        None => Outbox::new(session_id()?, state, at, cfg.max_pending_changes),
    };
    let journal = match Journal::create(dir.path(), state_cfg.journal_max_bytes, &mut outbox) {
        Ok(j) => Some(j),
        Err(e @ JournalError::TooBig { .. }) => {
            tracing::error!(
                error = %e,
                "The inventory does not fit the outbox journal: going on without it; an agent \
                 restart loses unacknowledged changes."
            );
            let _ = std::fs::remove_file(&path);
            None
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Book {
        outbox,
        journal,
        dir: Some(dir.path().to_path_buf()),
        broken: false,
    })
}

/// A session that lasted this long was healthy: it resets the backoff and starts a new
/// round of failover.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// The first reconnect waits after an `ALREADY_EXISTS` are 1–2 minutes, doubling up to
/// 5–10 minutes (jittered like the normal backoff).
const DUPLICATE_BASE: Duration = Duration::from_secs(120);
const DUPLICATE_MAX: Duration = Duration::from_secs(600);
/// The duplicate-certificate ERROR is logged at most this often.
const DUPLICATE_LOG_EVERY: Duration = Duration::from_secs(600);
const BACKOFF_BASE: Duration = Duration::from_millis(500);

/// The reconnect waits: the normal series between rounds, and the long one for a duplicate
/// certificate. Only a healthy session resets them.
#[derive(Debug)]
struct Waits {
    max: Duration,
    normal: backon::ExponentialBackoff,
    duplicate: backon::ExponentialBackoff,
}

impl Waits {
    fn new(max: Duration) -> Waits {
        Waits {
            max,
            normal: backoff(BACKOFF_BASE, max),
            duplicate: backoff(DUPLICATE_BASE, DUPLICATE_MAX),
        }
    }

    /// A session ended after being up (since its Welcome) for `up`, or never welcomed
    /// (None). Returns whether it was healthy (and so reset the waits).
    fn ended(&mut self, up: Option<Duration>) -> bool {
        let healthy = up.is_some_and(|d| d >= HEALTHY_SESSION);
        if healthy {
            *self = Waits::new(self.max);
        }
        healthy
    }

    fn next_backoff(&mut self) -> Duration {
        self.normal.next().unwrap_or(self.max)
    }

    fn next_duplicate(&mut self) -> Duration {
        self.duplicate.next().unwrap_or(DUPLICATE_MAX)
    }
}

/// True at most once per `every`.
#[derive(Debug)]
struct RateLimit {
    every: Duration,
    last: Option<Instant>,
}

impl RateLimit {
    fn new(every: Duration) -> RateLimit {
        RateLimit { every, last: None }
    }

    fn due(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// Which collector the connection loop uses, and whether a whole round has failed.
#[derive(Debug)]
struct Rotation {
    len: usize,
    current: usize,
    /// Attempts that ended since the last healthy session or the last backoff.
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

    /// The attempt on the current collector ended, `healthy` (up for [`HEALTHY_SESSION`])
    /// or not: move on to the next one. A healthy session starts a new round, which it
    /// opens itself: with one collector every end is a whole round, as before failover
    /// existed.
    fn ended(&mut self, healthy: bool) -> Step {
        if healthy {
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
    use listenscope_core::watch::WatchMode;

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

    /// Runs attempts on a rotation of `len` collectors: each `(healthy, step, next)` is one
    /// attempt that ended (healthy: up for HEALTHY_SESSION), the step taken and the
    /// collector tried next.
    #[track_caller]
    fn check_rotation(len: usize, attempts: &[(bool, Step, usize)]) {
        let mut r = Rotation::new(len);
        assert_eq!(r.current(), 0, "starts with the first collector");
        for (i, &(healthy, step, next)) in attempts.iter().enumerate() {
            assert_eq!(
                (r.ended(healthy), r.current()),
                (step, next),
                "attempt {i} on {len} collectors"
            );
        }
    }

    #[test]
    fn rotation_fails_over_and_backs_off_after_a_round() {
        use Step::{Backoff, Failover};
        // One collector: every end backs off, healthy or not (the behaviour before
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
        // A healthy session that breaks starts a new round: the other one at once, then
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

    /// Only a session that stayed up for HEALTHY_SESSION resets the backoff: a Welcome (a
    /// short session) no longer does, so two agents knocking each other off slow down.
    /// Before, every welcomed session started the series again at 250–500 ms.
    #[test]
    fn only_a_healthy_session_resets_the_backoff() {
        let max = Duration::from_secs(30);
        let mut w = Waits::new(max);
        let first = w.next_backoff();
        assert!(first <= BACKOFF_BASE, "{first:?}");
        // Welcomed, then knocked off after 2 s, eight times: the waits keep growing to
        // the cap instead of starting over.
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert!(!w.ended(Some(Duration::from_secs(2))));
            waits.push(w.next_backoff());
        }
        assert!(
            waits.last().unwrap() >= &(max / 2),
            "the backoff did not grow: {waits:?}"
        );
        // Never welcomed: no reset either.
        assert!(!w.ended(None));
        assert!(w.next_backoff() >= max / 2);
        // A session that stayed up a minute: back to the start.
        assert!(w.ended(Some(HEALTHY_SESSION)));
        assert!(w.next_backoff() <= BACKOFF_BASE);
    }

    #[test]
    fn duplicate_certificate_backs_off_long() {
        let mut w = Waits::new(Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| w.next_duplicate()).collect();
        assert!(
            waits[0] >= Duration::from_secs(60) && waits[0] <= Duration::from_secs(120),
            "{waits:?}"
        );
        assert!(waits.is_sorted() || waits.windows(2).all(|p| p[1] >= p[0] / 2));
        for w in &waits {
            assert!(
                *w >= Duration::from_secs(60) && *w <= DUPLICATE_MAX,
                "{waits:?}"
            );
        }
        assert!(waits[7] >= DUPLICATE_MAX / 2, "{waits:?}");
        // The normal --reconnect-max (1 s here) does not cut it short.
        assert!(waits.iter().all(|d| *d > Duration::from_secs(1)));
    }

    #[test]
    fn the_duplicate_error_is_rate_limited() {
        let mut limit = RateLimit::new(DUPLICATE_LOG_EVERY);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let logged: Vec<u64> = [0, 60, 300, 599, 600, 700, 1199, 1200]
            .into_iter()
            .filter(|s| limit.due(at(*s)))
            .collect();
        assert_eq!(logged, [0, 600, 1200]);
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
            watch: crate::config::WatchSetting::Interval,
            bind_events: true,
            netns: crate::scan::NetnsSelector::Current,
            max_pending_changes: 1,
            reconnect_max: Duration::from_secs(1),
            server_name: None,
        };
        let sys = Arc::new(crate::os::LinuxSystem::new());
        let ran = run(cfg, sys, std::future::pending()).await;
        assert!(matches!(ran, Err(RunError::NoCollector)), "{ran:?}");
    }

    fn shared(watch: Watch) -> Shared {
        let outbox = Outbox::new([1; 16], State::new(), OffsetDateTime::now_utc(), 10);
        Shared {
            outbox: Mutex::new(Book::without_journal(outbox)),
            heartbeat: Mutex::new(None),
            wake: Notify::new(),
            instance_id: None,
            watch: Mutex::new(watch),
        }
    }

    /// Whether the session was woken (a permit is waiting), taking the permit.
    fn woken(s: &Shared) -> bool {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let notified = std::pin::pin!(s.wake.notified());
        matches!(
            notified.poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(())
        )
    }

    fn pending_heartbeat(s: &Shared) -> Option<OffsetDateTime> {
        *s.heartbeat.lock().unwrap()
    }

    #[test]
    fn a_new_watch_mode_sends_a_heartbeat_at_once() {
        let ten = WatchMode::Interval(Duration::from_secs(10));
        let s = shared(Watch::new(ten));
        // The same mode: nothing to tell.
        assert!(!s.set_watch(Watch::new(ten)));
        assert!(!woken(&s) && pending_heartbeat(&s).is_none());
        // Another one: stored, a heartbeat stamped now, the session woken.
        let before = OffsetDateTime::now_utc();
        let polling = Watch::because(
            WatchMode::Polling(Duration::from_secs(3)),
            "perf_event_open refused: needs CAP_PERFMON",
        );
        assert!(s.set_watch(polling.clone()));
        assert_eq!(s.watch(), polling);
        assert!(woken(&s));
        assert!(pending_heartbeat(&s).is_some_and(|t| t >= before));
        // A scan's heartbeat already waiting keeps its time.
        let scanned = before - time::Duration::seconds(5);
        *s.heartbeat.lock().unwrap() = Some(scanned);
        assert!(s.set_watch(Watch::new(WatchMode::Doorbell)));
        assert_eq!(pending_heartbeat(&s), Some(scanned));
        // A different reason alone is a change too.
        assert!(s.set_watch(Watch::because(WatchMode::Doorbell, "UDP by polling")));
        assert!(!s.set_watch(Watch::because(WatchMode::Doorbell, "UDP by polling")));
    }

    /// What is stored is what the collector accepts: a hostile reason escaped and cut, a
    /// sub-millisecond period rounded; bounding is part of the comparison, so the same
    /// mode given unbounded again is no change.
    #[test]
    fn the_watch_mode_is_kept_bounded() {
        let s = shared(Watch::new(WatchMode::Doorbell));
        let raw = Watch::because(
            WatchMode::Polling(Duration::from_micros(2_999_800)),
            format!("perf: \u{1b}[2J{}", "x".repeat(2000)),
        );
        assert!(s.set_watch(raw.clone()));
        let stored = s.watch();
        assert_eq!(stored.mode, WatchMode::Polling(Duration::from_secs(3)));
        let reason = stored.reason.unwrap();
        assert!(reason.starts_with("perf: \\u{1b}[2J") && reason.len() <= 512);
        assert!(!s.set_watch(raw));
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
