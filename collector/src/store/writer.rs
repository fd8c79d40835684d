//! The group committer: every write of a collector process goes through here.
//!
//! Sessions hand their Hellos and messages to a bounded queue and wait for the outcome; a
//! few writer tasks (SQLite: one; PostgreSQL: several, each on its own connection) take
//! whatever is queued — up to [`MAX_JOBS`] messages or [`MAX_ROWS`] listener rows — and
//! store it in ONE transaction ([`flow::apply_batch`]). Each session is answered only
//! after the commit that holds its message, so an Ack still means "durable", while one
//! fsync now covers hundreds of hosts.
//!
//! **Overload is backpressure.** When the database is behind, the queue fills, sessions
//! wait in [`Writer::apply`] without reading further messages, and HTTP/2 flow control
//! and the agents' ack windows slow the agents down. Nothing times out in here and no
//! session fails because of load alone.
//!
//! **Heartbeats cost no commit of their own.** [`Writer::seen`] records the time in a map;
//! the next batch (or a flush at least every [`FLUSH_EVERY`]) writes all of them with one
//! statement. A watch mode a heartbeat changed ([`Writer::watch`]) rides the same way, in
//! a map of its own (rare: only a change is queued).
//!
//! **A failed batch never blames the innocent.** A deadlock or serialization failure
//! (PostgreSQL, two writers) is retried as a whole; any other failure of a batch of
//! several messages is retried message by message, so a message the database refuses
//! (e.g. a constraint) fails alone and a real fault (disk full, server gone) reaches every
//! session it affects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::flow::{self, Backend, Heard, HelloWork, WatchChange, Work};
use super::{Applied, HostSession, StoreError};
use crate::metrics as m;

/// Messages and Hellos waiting for a writer; past this, sessions wait to enqueue.
const QUEUE: usize = 2048;
/// Most messages (and Hellos) in one transaction.
const MAX_JOBS: usize = 1024;
/// Most listener rows in one transaction (a bigger single message still goes alone).
/// Half the in-flight places' worth of first snapshots: while one batch commits, the
/// next one is being decoded and queued. The commit's fsync costs about the same for
/// 25,000 rows as for 50,000: doubling both (with the places) took an 18,000-host
/// burst on SQLite from 59,442 to 76,902 rows/s.
const MAX_ROWS: usize = 50_000;
/// Heartbeats wait at most this long for a batch to carry them.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Whole-batch retries after a deadlock or serialization failure.
const RETRIES: u32 = 5;
/// After this many listener rows stored since the last time, the first idle second hands
/// freed heap memory back to the operating system (`crate::heap`).
const TRIM_AFTER_ROWS: usize = 100_000;

enum Job {
    Hello(HelloWork, oneshot::Sender<Result<HostSession, StoreError>>),
    Apply(Work, oneshot::Sender<Result<Applied, StoreError>>),
}

impl Job {
    fn size(&self) -> usize {
        match self {
            Job::Hello(..) => 1,
            Job::Apply(w, _) => w.size().max(1),
        }
    }
}

/// Where the writer tasks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// On the collector's runtime, next to the sessions.
    Shared,
    /// On a thread of their own (a single-threaded runtime). SQLite's: its one writer is
    /// the whole ingest's critical path, and on the shared runtime it waited its turn
    /// behind thousands of sessions decoding a burst (77,655 vs 70,442 rows/s, 4,000 hosts
    /// at once). Not for PostgreSQL: its connections are sockets, registered with the
    /// runtime that opened them, and its several writers use both cores.
    OwnThread,
}

/// Runs a writer task; a panic in it ends the process. A collector whose writer is gone
/// would go on accepting agents and answer every message `UNAVAILABLE` forever; exiting
/// lets its supervisor (systemd `Restart=`, Kubernetes) start a healthy one, and the
/// agents resend what was not acknowledged.
async fn fatal_on_panic(run: impl Future<Output = ()>) {
    use futures_util::FutureExt as _;
    if let Err(panic) = std::panic::AssertUnwindSafe(run).catch_unwind().await {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(
            panic = %what,
            "The database writer panicked; the collector exits so that its supervisor \
             restarts it (nothing unacknowledged is lost: agents resend)."
        );
        std::process::exit(70);
    }
}

/// When the writers ask the database to refresh its statistics: after the first
/// [`ANALYZE_FIRST`] rows this process wrote, then each time the count doubles. PostgreSQL
/// plans a table it never analyzed as if it were a few pages: right after a fleet's first
/// snapshots (a new or restored database), a delta's headline rebuild read every live row
/// (7–10 s per statement, delta ack p50 4.4 s, until autovacuum came round a minute later).
/// Doubling keeps the cost logarithmic in what was written (7 times for 5,000,000 rows).
#[derive(Debug)]
struct Analyze {
    written: AtomicU64,
    next_at: AtomicU64,
    running: AtomicBool,
    /// The writers' tracker: `Writer::close` waits for a running refresh too.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// Rows written before the first statistics refresh.
const ANALYZE_FIRST: u64 = 50_000;

impl Analyze {
    /// Counts `rows` handed to the database (approximate by design: a refused message
    /// counts too); starts a refresh in the background when one is due.
    fn wrote<B: Backend + Clone + Send + 'static>(self: &Arc<Self>, b: &B, rows: u64) {
        let written = self.written.fetch_add(rows, Ordering::Relaxed) + rows;
        let due = self.next_at.load(Ordering::Relaxed);
        if written < due || self.stop.is_cancelled() || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.next_at
            .store(written.saturating_mul(2), Ordering::Relaxed);
        let (me, b) = (Arc::clone(self), b.clone());
        self.tasks.spawn(async move {
            let started = Instant::now();
            match b.analyze().await {
                Ok(()) => tracing::debug!(
                    written,
                    ms = started.elapsed().as_millis() as u64,
                    "Refreshed the planner's statistics."
                ),
                Err(e) => tracing::warn!(error = %e, "Refreshing the planner's statistics failed; \
                    autovacuum will do it later."),
            }
            me.running.store(false, Ordering::Release);
        });
    }
}

/// What heartbeats left for the next batch (see [`Heard`]), one entry per host.
#[derive(Debug, Default)]
struct Waiting {
    seen: HashMap<i64, OffsetDateTime>,
    watch: HashMap<i64, WatchChange>,
}

impl Waiting {
    fn seen(&mut self, id: i64, at: OffsetDateTime) {
        let t = self.seen.entry(id).or_insert(at);
        *t = (*t).max(at);
    }

    /// Keeps one change per host: the one of the newest connection (epoch) and, within a
    /// connection, the latest reported unless `newer` is false (a change put back after a
    /// failed or skipped batch is older than any queued since).
    fn watch(&mut self, c: WatchChange, newer: bool) {
        match self.watch.get(&c.host_id) {
            Some(old) if old.epoch > c.epoch || (old.epoch == c.epoch && !newer) => {}
            _ => {
                self.watch.insert(c.host_id, c);
            }
        }
    }
}

type Seen = Arc<Mutex<Waiting>>;

/// Handle to the writer tasks (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Job>,
    seen: Seen,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Hello(h, _) => write!(f, "Hello({})", h.host),
            Job::Apply(w, _) => write!(f, "Apply(host {}, seq {})", w.host_id, w.seq),
        }
    }
}

fn closed() -> StoreError {
    StoreError::Closed
}

impl Writer {
    /// Starts `writers` writer tasks on `backend` (each needs one pool connection), on
    /// the caller's runtime or on a thread of their own.
    pub(crate) fn start<B>(backend: B, writers: usize, place: Place) -> Result<Writer, StoreError>
    where
        B: Backend + Clone + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let seen: Seen = Arc::default();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let analyze = Arc::new(Analyze {
            written: AtomicU64::new(0),
            next_at: AtomicU64::new(ANALYZE_FIRST),
            running: AtomicBool::new(false),
            tasks: tasks.clone(),
            stop: stop.clone(),
        });
        let runs: Vec<_> = (0..writers.max(1))
            .map(|_| {
                tasks.track_future(run(
                    backend.clone(),
                    Arc::clone(&rx),
                    Arc::clone(&seen),
                    Arc::clone(&analyze),
                    stop.clone(),
                ))
            })
            .collect();
        tasks.close();
        match place {
            Place::Shared => {
                for r in runs {
                    tokio::spawn(fatal_on_panic(r));
                }
            }
            Place::OwnThread => {
                // The runtime is built on its thread: dropped on a failed spawn here, it
                // would panic (a runtime may not be dropped inside another's context).
                let (built, ready) = std::sync::mpsc::sync_channel(1);
                std::thread::Builder::new()
                    .name("listenscope-writer".into())
                    .spawn(move || {
                        let rt = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => {
                                let _ = built.send(Ok(()));
                                rt
                            }
                            Err(e) => {
                                let _ = built.send(Err(e));
                                return;
                            }
                        };
                        rt.block_on(async move {
                            let mut set = tokio::task::JoinSet::new();
                            for r in runs {
                                set.spawn(fatal_on_panic(r));
                            }
                            while set.join_next().await.is_some() {}
                        });
                    })
                    .map_err(StoreError::WriterThread)?;
                match ready.recv() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(StoreError::WriterThread(e)),
                    Err(_) => {
                        return Err(StoreError::WriterThread(std::io::Error::other(
                            "the writer thread ended before its runtime started",
                        )));
                    }
                }
            }
        }
        Ok(Writer {
            jobs: tx,
            seen,
            stop,
            tasks,
        })
    }

    /// Records a Hello (creates or updates the host row, bumps its epoch).
    pub(crate) async fn hello(&self, h: HelloWork) -> Result<HostSession, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Hello(h, tx))
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Stores one message; returns after the commit that holds it.
    pub(crate) async fn apply(&self, w: Work) -> Result<Applied, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Apply(w, tx))
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// The host was heard from at `at`: written with the next batch (coalesced).
    pub(crate) fn seen(&self, host_id: i64, at: OffsetDateTime) {
        let mut waiting = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        waiting.seen(host_id, at);
    }

    /// A heartbeat reported another watch mode: written with the next batch (the latest
    /// per host).
    pub(crate) fn watch(&self, change: WatchChange) {
        let mut waiting = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        waiting.watch(change, true);
    }

    /// Stores what is queued, writes pending heartbeats, and stops the writer tasks.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

fn take_seen(seen: &Seen) -> Heard {
    let mut waiting = seen.lock().unwrap_or_else(|p| p.into_inner());
    Heard {
        seen: waiting.seen.drain().collect(),
        watches: waiting.watch.drain().map(|(_, c)| c).collect(),
    }
}

/// Heartbeat writes that did not happen, kept for the next batch (behind anything newer).
fn put_back(seen: &Seen, heard: Heard) {
    let mut waiting = seen.lock().unwrap_or_else(|p| p.into_inner());
    for (id, at) in heard.seen {
        waiting.seen(id, at);
    }
    for c in heard.watches {
        waiting.watch(c, false);
    }
}

/// Takes a batch: waits for the first job (or the flush tick, or stop), then whatever
/// else is queued within the budget. `None`: stop, nothing left.
async fn next_batch(
    rx: &tokio::sync::Mutex<mpsc::Receiver<Job>>,
    tick: &mut tokio::time::Interval,
    stop: &CancellationToken,
) -> Option<Vec<Job>> {
    let mut rx = rx.lock().await;
    let mut batch = Vec::new();
    if !stop.is_cancelled() {
        tokio::select! {
            job = rx.recv() => match job {
                Some(j) => batch.push(j),
                None => return None,
            },
            _ = tick.tick() => return Some(batch),
            () = stop.cancelled() => {}
        }
    }
    let mut rows: usize = batch.iter().map(Job::size).sum();
    while batch.len() < MAX_JOBS && rows < MAX_ROWS {
        match rx.try_recv() {
            Ok(j) => {
                rows += j.size();
                batch.push(j);
            }
            Err(_) => break,
        }
    }
    if batch.is_empty() && stop.is_cancelled() {
        return None;
    }
    Some(batch)
}

async fn run<B: Backend + Clone + Send + 'static>(
    b: B,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    seen: Seen,
    analyze: Arc<Analyze>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rows_since_trim = 0;
    loop {
        let Some(batch) = next_batch(&rx, &mut tick, &stop).await else {
            break;
        };
        if batch.is_empty() && rows_since_trim >= TRIM_AFTER_ROWS {
            // A quiet second after a burst: the burst's decoded messages are freed.
            rows_since_trim = 0;
            let _ = tokio::task::spawn_blocking(|| {
                let started = Instant::now();
                let released = crate::heap::release_free_memory();
                tracing::debug!(
                    released,
                    ms = started.elapsed().as_millis() as u64,
                    "Trimmed the heap after a burst."
                );
            })
            .await;
        }
        let rows = batch.iter().map(Job::size).sum::<usize>();
        rows_since_trim += rows;
        let heard = take_seen(&seen);
        if batch.is_empty() && heard.is_empty() {
            continue;
        }
        commit(&b, batch, heard, &seen).await;
        analyze.wrote(&b, rows as u64);
    }
    // Stopped: whatever heartbeats are left.
    let heard = take_seen(&seen);
    if !heard.is_empty() {
        commit(&b, Vec::new(), heard, &seen).await;
    }
}

fn retryable(e: &StoreError) -> bool {
    let StoreError::Sql(sqlx::Error::Database(d)) = e else {
        return false;
    };
    // deadlock_detected, serialization_failure, lock_not_available
    matches!(d.code().as_deref(), Some("40P01" | "40001" | "55P03"))
}

/// Stores one batch and answers every job in it.
async fn commit<B: Backend>(b: &B, batch: Vec<Job>, heard: Heard, seen: &Seen) {
    let mut hellos = Vec::new();
    let mut hello_tx = Vec::new();
    let mut works = Vec::new();
    let mut work_tx = Vec::new();
    for job in batch {
        match job {
            Job::Hello(h, tx) => {
                hellos.push(h);
                hello_tx.push(tx);
            }
            Job::Apply(w, tx) => {
                works.push(w);
                work_tx.push(tx);
            }
        }
    }
    metrics::histogram!(m::BATCH_MESSAGES).record((hellos.len() + works.len()) as f64);
    let mut attempt = 0;
    let failed = loop {
        let started = Instant::now();
        match flow::apply_batch(b, &hellos, &works, &heard).await {
            Ok(out) => {
                metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                if !out.watch_skipped.is_empty() {
                    let skipped = heard
                        .watches
                        .into_iter()
                        .filter(|c| out.watch_skipped.contains(&c.host_id))
                        .collect();
                    put_back(
                        seen,
                        Heard {
                            seen: Vec::new(),
                            watches: skipped,
                        },
                    );
                }
                for (tx, s) in hello_tx.into_iter().zip(out.hellos) {
                    let _ = tx.send(Ok(s));
                }
                for (tx, a) in work_tx.into_iter().zip(out.applied) {
                    let _ = tx.send(Ok(a));
                }
                return;
            }
            Err(e) if retryable(&e) && attempt < RETRIES => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "Write batch hit a lock conflict; retrying it.");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            Err(e) => break e,
        }
    };
    put_back(seen, heard);
    if hellos.is_empty() && works.is_empty() {
        tracing::warn!(error = %failed, "Writing heartbeats failed; they are kept for the next batch.");
        return;
    }
    if hellos.len() + works.len() == 1 {
        if let Some(tx) = hello_tx.pop() {
            let _ = tx.send(Err(failed));
        } else if let Some(tx) = work_tx.pop() {
            let _ = tx.send(Err(failed));
        }
        return;
    }
    tracing::warn!(error = %failed, messages = hellos.len() + works.len(), "A write batch failed; storing its messages one by one.");
    for (h, tx) in hellos.into_iter().zip(hello_tx) {
        let out = alone(b, std::slice::from_ref(&h), &[]).await;
        let _ = tx.send(out.and_then(|mut o| o.hellos.pop().ok_or_else(lost)));
    }
    for (w, tx) in works.into_iter().zip(work_tx) {
        let out = alone(b, &[], std::slice::from_ref(&w)).await;
        let _ = tx.send(out.and_then(|mut o| o.applied.pop().ok_or_else(lost)));
    }
}

fn lost() -> StoreError {
    StoreError::Corrupt("a batch returned no outcome".into())
}

/// One Hello or message in its own transaction (retrying lock conflicts).
async fn alone<B: Backend>(
    b: &B,
    hellos: &[HelloWork],
    works: &[Work],
) -> Result<flow::Batch, StoreError> {
    let mut attempt = 0;
    loop {
        match flow::apply_batch(b, hellos, works, &Heard::default()).await {
            Err(e) if retryable(&e) && attempt < RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::flow::WatchText;

    fn change(host_id: i64, epoch: i64, mode: &str) -> WatchChange {
        WatchChange {
            host_id,
            epoch,
            watch: WatchText {
                mode: mode.into(),
                reason: None,
            },
            at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    /// Which change of host 1 is kept, after queueing `(epoch, mode, newer)` in order.
    #[track_caller]
    fn check(queued: &[(i64, &str, bool)], kept: Option<(i64, &str)>) {
        let mut w = Waiting::default();
        for &(epoch, mode, newer) in queued {
            w.watch(change(1, epoch, mode), newer);
        }
        let got = w.watch.get(&1).map(|c| (c.epoch, c.watch.mode.as_str()));
        assert_eq!(got, kept, "{queued:?}");
    }

    #[test]
    fn one_watch_change_per_host_the_newest() {
        check(&[], None);
        check(&[(1, "doorbell", true)], Some((1, "doorbell")));
        // Within a connection, the latest reported.
        check(
            &[(1, "doorbell", true), (1, "polling(3s)", true)],
            Some((1, "polling(3s)")),
        );
        // A newer connection's wins whatever the order; an older one never replaces it.
        check(
            &[(2, "doorbell", true), (1, "polling(3s)", true)],
            Some((2, "doorbell")),
        );
        check(
            &[(1, "polling(3s)", true), (2, "doorbell", true)],
            Some((2, "doorbell")),
        );
        // Put back after a failed or skipped batch: behind anything queued since.
        check(
            &[(1, "doorbell", true), (1, "polling(3s)", false)],
            Some((1, "doorbell")),
        );
        check(&[(1, "polling(3s)", false)], Some((1, "polling(3s)")));
        check(
            &[(1, "doorbell", true), (2, "polling(3s)", false)],
            Some((2, "polling(3s)")),
        );
        // Other hosts are kept apart.
        let mut w = Waiting::default();
        w.watch(change(1, 1, "doorbell"), true);
        w.watch(change(2, 1, "polling(3s)"), true);
        assert_eq!(w.watch.len(), 2);
    }

    #[test]
    fn put_back_keeps_what_failed() {
        let seen: Seen = Arc::default();
        seen.lock().unwrap().seen(1, OffsetDateTime::UNIX_EPOCH);
        seen.lock().unwrap().watch(change(1, 1, "doorbell"), true);
        let heard = take_seen(&seen);
        assert_eq!((heard.seen.len(), heard.watches.len()), (1, 1));
        assert!(take_seen(&seen).is_empty());
        // Meanwhile the connection reported another mode: the failed one stays behind it.
        seen.lock()
            .unwrap()
            .watch(change(1, 1, "polling(3s)"), true);
        put_back(&seen, heard);
        let again = take_seen(&seen);
        assert_eq!(again.seen.len(), 1);
        assert_eq!(again.watches, [change(1, 1, "polling(3s)")]);
    }
}
