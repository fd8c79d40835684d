//! The write flow, once for both databases: how the messages of many sessions become one
//! transaction (a group commit, fed by [`writer`](super::writer)), and how fingerprints
//! are brought to the current scheme.
//!
//! begin → Hellos (host rows, epochs) → per round: read (PostgreSQL: lock) the host rows
//! → epoch and sequence rules → the hosts' live rows → [`plan`](super::plan::plan) →
//! execute → rebuild the headline rows of touched ports → host bookkeeping → heartbeats
//! (and the watch modes they changed) → commit. A [`Backend`] supplies only its SQL and its batching; the decisions live in
//! `plan` and here.
//!
//! **A connection that saw an error is never used again.** After a failed statement or
//! commit the driver's idea of the transaction state cannot be trusted: SQLite rolls a
//! transaction back by itself on `SQLITE_FULL` or `SQLITE_IOERR`, and sqlx, which still
//! counts it open, would turn every later `BEGIN` into a savepoint inside a transaction
//! that never commits — acknowledging messages that are never durable. So the connection
//! is checked out of the pool behind a guard that closes it unless the flow finished
//! cleanly (also when the task is cancelled mid-flow); closing rolls back whatever the
//! server still holds, and the pool opens a fresh connection for the next message.

use std::collections::HashMap;
use std::future::Future;
use std::ops::{Deref, DerefMut};

use listenscope_core::diff::Changes;
use listenscope_core::fingerprint::{self, Fingerprints};
use listenscope_core::record::ListenerRecord;
use listenscope_core::watch::Watch;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Database, Pool};
use time::OffsetDateTime;

use super::plan::{
    Close, DeltaWork, LiveRow, Plan, Prepared, Stored, delta_rule, plan, snapshot_rule,
};
use super::{Applied, HostSession, StoreError};

/// The connection type of a backend.
pub(crate) type Conn<B> = <<B as Backend>::Db as Database>::Connection;

/// What the host row says about the stored session.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostRow {
    pub session: Option<Vec<u8>>,
    pub committed: u64,
    pub snapshot_at: Option<OffsetDateTime>,
    /// Bumped by every accepted Hello: the connection allowed to write.
    pub epoch: i64,
}

/// The host row's bookkeeping after a committed message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostUpdate<'a> {
    pub host_id: i64,
    /// Set for snapshots: the session whose messages are now committed.
    pub session: Option<&'a [u8]>,
    pub committed: u64,
    pub last_seen: OffsetDateTime,
    /// Set for snapshots: the observation time of the stored state.
    pub snapshot_at: Option<OffsetDateTime>,
    /// Change of the host's count of live listeners.
    pub live_delta: i64,
}

/// One agent message for the store.
#[derive(Debug)]
pub enum Message {
    /// The host's whole state: every live row not in it is closed.
    Snapshot(Vec<ListenerRecord>),
    /// Changes since the previous sequence.
    Delta(Changes),
}

/// A Hello to record: the host row is created or updated and its epoch bumped.
#[derive(Debug, Clone)]
pub(crate) struct HelloWork {
    pub host: String,
    pub os_hostname: String,
    pub agent_version: String,
    pub now: OffsetDateTime,
    /// The collector instance accepting the session (shown in the `hosts` view).
    pub collector: Option<String>,
    /// The agent installation (Hello.instance_id).
    pub instance_id: Option<[u8; 16]>,
    /// The agent's watch mode (None: an agent older than Hello.watch, stored as NULL).
    pub watch: Option<WatchText>,
}

/// A watch mode as stored: its text form (`polling(3s)`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WatchText {
    pub mode: String,
    pub reason: Option<String>,
}

impl From<&Watch> for WatchText {
    fn from(w: &Watch) -> WatchText {
        WatchText {
            mode: w.mode.to_string(),
            reason: w.reason.clone(),
        }
    }
}

/// A watch mode a heartbeat changed: written only while the host's epoch is still the
/// reporting connection's (a replaced connection's report is dropped; the newer Hello
/// wrote its own), and only if it differs from the stored one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WatchChange {
    pub host_id: i64,
    pub epoch: i64,
    pub watch: WatchText,
    /// When the collector learned it (`watch_since`).
    pub at: OffsetDateTime,
}

/// What heartbeats leave for a batch: when each host was heard from (`last_seen`), and
/// the watch modes they changed (each host once).
#[derive(Debug, Default)]
pub(crate) struct Heard {
    pub seen: Vec<(i64, OffsetDateTime)>,
    pub watches: Vec<WatchChange>,
}

impl Heard {
    pub(crate) fn is_empty(&self) -> bool {
        self.seen.is_empty() && self.watches.is_empty()
    }
}

/// One message ready for a transaction: keys and fingerprints computed beforehand.
#[derive(Debug)]
pub(crate) struct Work {
    pub host_id: i64,
    /// The epoch of the connection that sent it; `None`: not fenced (a tool that owns the
    /// database alone, such as the store tests).
    pub epoch: Option<i64>,
    pub session_id: Vec<u8>,
    pub seq: u64,
    pub at: OffsetDateTime,
    pub now: OffsetDateTime,
    pub snapshot: bool,
    pub upserts: Vec<Prepared>,
    pub closes: Vec<Close>,
}

impl Work {
    pub(crate) fn new(
        host_id: i64,
        epoch: Option<i64>,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        message: Message,
        now: OffsetDateTime,
    ) -> Work {
        let (upserts, closes, snapshot) = match message {
            Message::Snapshot(records) => (
                records.into_iter().map(Prepared::new).collect::<Vec<_>>(),
                Vec::new(),
                true,
            ),
            Message::Delta(changes) => {
                let w = DeltaWork::new(changes);
                (w.upserts, w.closes, false)
            }
        };
        Work {
            host_id,
            epoch,
            session_id: session_id.to_vec(),
            seq,
            at,
            now,
            snapshot,
            upserts,
            closes,
        }
    }

    /// Listener rows it carries (the writer's batch budget).
    pub(crate) fn size(&self) -> usize {
        self.upserts.len() + self.closes.len()
    }
}

/// The host's live rows a message needs: all of them (snapshots) or those of some keys.
#[derive(Debug)]
pub(crate) struct LiveWanted<'a> {
    pub host_id: i64,
    pub keys: Option<Vec<&'a str>>,
}

/// A planned message: its host, its observation time (the end of the versions it
/// closes, never before their start) and its row operations.
#[derive(Debug)]
pub(crate) struct Write<'a> {
    pub host_id: i64,
    pub at: OffsetDateTime,
    pub plan: Plan<'a>,
}

/// Which of a host's headline rows to rebuild: all of them, or those of some ports.
#[derive(Debug)]
pub(crate) struct Rebuild {
    pub host_id: i64,
    pub ports: Option<Vec<i32>>,
}

/// A round's wants as two lists, the shape both backends query with: the hosts wanted
/// whole, and the (host, key) pairs.
pub(crate) fn split_live<'a>(wanted: &[LiveWanted<'a>]) -> (Vec<i64>, Vec<(i64, &'a str)>) {
    let whole = wanted
        .iter()
        .filter(|w| w.keys.is_none())
        .map(|w| w.host_id)
        .collect();
    let pairs = wanted
        .iter()
        .flat_map(|w| w.keys.iter().flatten().map(move |k| (w.host_id, *k)))
        .collect();
    (whole, pairs)
}

/// A round's rebuilds as two lists: the hosts rebuilt whole, and the (host, port) pairs.
pub(crate) fn split_rebuild(rebuild: &[Rebuild]) -> (Vec<i64>, Vec<(i64, i32)>) {
    let whole = rebuild
        .iter()
        .filter(|r| r.ports.is_none())
        .map(|r| r.host_id)
        .collect();
    let pairs = rebuild
        .iter()
        .flat_map(|r| r.ports.iter().flatten().map(move |p| (r.host_id, *p)))
        .collect();
    (whole, pairs)
}

/// Live rows recomputed per transaction when bringing fingerprints to the current scheme.
const REHASH_PAGE: i64 = 5000;
/// The `setting` row naming the scheme of the stored fingerprints.
const SCHEME_KEY: &str = "fingerprint_scheme";

/// What a database supplies to the write flow: its SQL and its batching, nothing else.
/// Every method runs inside the caller's transaction and handles many hosts at once (one
/// group commit holds the messages of many sessions).
pub(crate) trait Backend: Sync {
    type Db: Database;

    fn pool(&self) -> &Pool<Self::Db>;

    /// Creates or updates the host row and bumps its epoch; or, when another agent
    /// installation holds the host through another collector and was heard from within
    /// `stale_after`, changes nothing and says who holds it.
    fn hello(
        c: &mut Conn<Self>,
        hello: &HelloWork,
    ) -> impl Future<Output = Result<HostSession, StoreError>> + Send;

    /// The host rows of `ids` (sorted, distinct); on PostgreSQL also locks them for the
    /// transaction, in id order (per-host order without deadlocks between writers).
    fn host_rows(
        c: &mut Conn<Self>,
        ids: &[i64],
    ) -> impl Future<Output = Result<HashMap<i64, HostRow>, StoreError>> + Send;

    /// Live rows per host, keyed by `lkey`.
    fn live_rows(
        c: &mut Conn<Self>,
        wanted: &[LiveWanted<'_>],
    ) -> impl Future<Output = Result<HashMap<i64, HashMap<String, LiveRow>>, StoreError>> + Send;

    /// Closes, refreshes and inserts what the plans say.
    fn execute(
        c: &mut Conn<Self>,
        writes: &[Write<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Recomputes the `hidden_port` rows of the given hosts (and ports) from their live
    /// listeners, with the aggregation the `hidden_ipv4_exposure` view always had, and the
    /// effective IPv4 verdict of each port's hidden side (`row::hidden_effective_sql`).
    fn rebuild_hidden(
        c: &mut Conn<Self>,
        rebuild: &[Rebuild],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn update_hosts(
        c: &mut Conn<Self>,
        updates: &[HostUpdate<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Heartbeats: each host's `last_seen` becomes the time given. Plain assignment, not
    /// the later of the two: a heartbeat coalesced a moment before a commit may set it
    /// back by under a second (harmless), while a maximum would keep a host "fresh" for as
    /// long as the collector's clock once jumped ahead.
    fn touch(
        c: &mut Conn<Self>,
        seen: &[(i64, OffsetDateTime)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The watch modes heartbeats changed (each host once), each written where the host's
    /// epoch is still `epoch` and the stored mode or reason differs. Returns the hosts it
    /// left alone because another writer holds their row (PostgreSQL skips such rows, as
    /// `touch` does, rather than wait): the caller keeps those changes for a later batch.
    fn set_watch(
        c: &mut Conn<Self>,
        changes: &[WatchChange],
    ) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;

    fn setting(
        c: &mut Conn<Self>,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    fn set_setting(
        c: &mut Conn<Self>,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` live rows with `id > after`, by id, as the records that produced them.
    fn live_records(
        c: &mut Conn<Self>,
        after: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<(i64, ListenerRecord)>, StoreError>> + Send;

    /// Refreshes the planner's statistics of the written tables; called by the writer
    /// after much was written (see `writer::Analyze`).
    fn analyze(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn set_fingerprints(
        c: &mut Conn<Self>,
        rows: &[(i64, Fingerprints)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A pooled connection that is closed, not returned to the pool, unless [`Guarded::clean`]
/// was called: see the module documentation.
pub(crate) struct Guarded<DB: Database> {
    conn: PoolConnection<DB>,
    clean: bool,
}

impl<DB: Database> Guarded<DB> {
    pub(crate) async fn acquire(pool: &Pool<DB>) -> Result<Self, StoreError> {
        Ok(Guarded {
            conn: pool.acquire().await?,
            clean: false,
        })
    }

    /// The work on this connection finished without an error: it may be reused.
    pub(crate) fn clean(mut self) {
        self.clean = true;
    }
}

impl<DB: Database> Drop for Guarded<DB> {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}

impl<DB: Database> Deref for Guarded<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.conn
    }
}

impl<DB: Database> DerefMut for Guarded<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }
}

/// Runs `work` on a guarded connection: kept for reuse only when it returned `Ok`.
pub(crate) async fn guarded<B: Backend, T>(
    b: &B,
    work: impl AsyncFnOnce(&mut Conn<B>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut conn = Guarded::acquire(b.pool()).await?;
    let out = work(&mut conn).await?;
    conn.clean();
    Ok(out)
}

/// What one group commit did: the Hellos' host sessions and each message's outcome, in
/// the order given, and the hosts whose watch change waits for a later batch.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub hellos: Vec<HostSession>,
    pub applied: Vec<Applied>,
    /// Hosts of `Heard::watches` not written (their row held by another writer).
    pub watch_skipped: Vec<i64>,
}

/// Stores Hellos, messages and heartbeats of many sessions in ONE transaction (a group
/// commit). Each message gets the outcome it would have had alone: messages of one host
/// are applied in the order given, each seeing the ones before it. Either all of it is
/// committed or none of it. Watch changes come after the Hellos: a change reported by a
/// connection that a Hello of this batch replaced is dropped by its epoch.
pub(crate) async fn apply_batch<B: Backend>(
    b: &B,
    hellos: &[HelloWork],
    works: &[Work],
    heard: &Heard,
) -> Result<Batch, StoreError> {
    guarded(b, async |conn: &mut Conn<B>| {
        let mut tx = conn.begin().await?;
        let mut out = Batch::default();
        for h in hellos {
            out.hellos.push(B::hello(&mut *tx, h).await?);
        }
        out.applied = apply_works::<B>(&mut *tx, works).await?;
        if !heard.seen.is_empty() {
            B::touch(&mut *tx, &heard.seen).await?;
        }
        if !heard.watches.is_empty() {
            out.watch_skipped = B::set_watch(&mut *tx, &heard.watches).await?;
        }
        tx.commit().await?;
        Ok(out)
    })
    .await
}

/// Applies `works` inside an open transaction. A host with several messages in the batch
/// is handled in rounds (its n-th message in round n), so every round reads each host's
/// state once, after the previous round wrote it.
async fn apply_works<B: Backend>(
    c: &mut Conn<B>,
    works: &[Work],
) -> Result<Vec<Applied>, StoreError> {
    let mut outcome: Vec<Option<Applied>> = vec![None; works.len()];
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen_in: HashMap<i64, usize> = HashMap::new();
    for (i, w) in works.iter().enumerate() {
        let n = seen_in.entry(w.host_id).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(i);
        *n += 1;
    }
    for round in rounds {
        let mut ids: Vec<i64> = round.iter().map(|&i| works[i].host_id).collect();
        ids.sort_unstable();
        let hosts = B::host_rows(c, &ids).await?;
        let mut applying = Vec::with_capacity(round.len());
        for &i in &round {
            let w = &works[i];
            let host = hosts.get(&w.host_id).ok_or_else(|| {
                StoreError::Corrupt(format!("host id {} has no host row", w.host_id))
            })?;
            if w.epoch.is_some_and(|e| e != host.epoch) {
                outcome[i] = Some(Applied::TakenOver);
                continue;
            }
            let stored = Stored {
                session: host.session.as_deref(),
                committed: host.committed,
                snapshot_at: host.snapshot_at,
            };
            let rule = if w.snapshot {
                snapshot_rule(stored, &w.session_id, w.seq, w.at)
            } else {
                delta_rule(stored, &w.session_id, w.seq)
            };
            match rule {
                Some(not_applied) => outcome[i] = Some(not_applied),
                None => applying.push(i),
            }
        }
        if applying.is_empty() {
            continue;
        }
        let wanted: Vec<LiveWanted<'_>> = applying
            .iter()
            .map(|&i| {
                let w = &works[i];
                LiveWanted {
                    host_id: w.host_id,
                    keys: (!w.snapshot).then(|| {
                        w.upserts
                            .iter()
                            .map(|u| u.lkey.as_str())
                            .chain(w.closes.iter().map(|c| c.lkey.as_str()))
                            .collect()
                    }),
                }
            })
            .collect();
        let mut live = B::live_rows(c, &wanted).await?;
        let empty = HashMap::new();
        let writes: Vec<Write<'_>> = applying
            .iter()
            .map(|&i| {
                let w = &works[i];
                let rows = live.get(&w.host_id).unwrap_or(&empty);
                Write {
                    host_id: w.host_id,
                    at: w.at,
                    plan: plan(rows, &w.upserts, &w.closes, w.snapshot, w.at),
                }
            })
            .collect();
        live.clear();
        B::execute(c, &writes).await?;
        let rebuild: Vec<Rebuild> = applying
            .iter()
            .zip(&writes)
            .filter(|(_, wr)| wr.plan.versions_changed())
            .map(|(&i, wr)| {
                let w = &works[i];
                Rebuild {
                    host_id: wr.host_id,
                    ports: (!w.snapshot).then(|| {
                        let mut ports: Vec<i32> = w
                            .upserts
                            .iter()
                            .map(|u| i32::from(u.record.key.port))
                            .chain(w.closes.iter().map(|c| i32::from(c.port)))
                            .collect();
                        ports.sort_unstable();
                        ports.dedup();
                        ports
                    }),
                }
            })
            .collect();
        if !rebuild.is_empty() {
            B::rebuild_hidden(c, &rebuild).await?;
        }
        let updates: Vec<HostUpdate<'_>> = applying
            .iter()
            .zip(&writes)
            .map(|(&i, wr)| {
                let w = &works[i];
                HostUpdate {
                    host_id: w.host_id,
                    session: w.snapshot.then_some(w.session_id.as_slice()),
                    committed: w.seq,
                    last_seen: w.now,
                    snapshot_at: w.snapshot.then_some(w.at),
                    live_delta: wr.plan.live_delta(),
                }
            })
            .collect();
        B::update_hosts(c, &updates).await?;
        for (&i, wr) in applying.iter().zip(&writes) {
            outcome[i] = Some(Applied::Committed {
                rows: wr.plan.rows(),
            });
        }
    }
    outcome
        .into_iter()
        .map(|o| {
            o.ok_or_else(|| StoreError::Corrupt("a message was left without an outcome".into()))
        })
        .collect()
}

/// Brings the stored fingerprints of live rows to [`fingerprint::SCHEME`], recomputing
/// them from the stored columns (which hold every field a fingerprint covers), page by
/// page; the scheme is recorded last, so an interrupted run starts over harmlessly.
/// History rows keep theirs: only live rows are ever compared. Returns the rows updated.
pub(crate) async fn upgrade_fingerprints<B: Backend>(b: &B) -> Result<u64, StoreError> {
    let current = guarded(b, async |c: &mut Conn<B>| B::setting(c, SCHEME_KEY).await).await?;
    if current.as_deref() == Some(fingerprint::SCHEME) {
        return Ok(0);
    }
    let mut after = 0;
    let mut done = 0u64;
    loop {
        let page = guarded(b, async |conn: &mut Conn<B>| {
            let mut tx = conn.begin().await?;
            let records = B::live_records(&mut *tx, after, REHASH_PAGE).await?;
            let rows: Vec<(i64, Fingerprints)> = records
                .iter()
                .map(|(id, r)| (*id, fingerprint::fingerprints(r)))
                .collect();
            B::set_fingerprints(&mut *tx, &rows).await?;
            tx.commit().await?;
            Ok(rows.last().map(|(id, _)| (*id, rows.len())))
        })
        .await?;
        let Some((last, n)) = page else { break };
        after = last;
        done += n as u64;
    }
    guarded(b, async |c: &mut Conn<B>| {
        B::set_setting(c, SCHEME_KEY, fingerprint::SCHEME).await
    })
    .await?;
    tracing::info!(
        rows = done,
        from = current.as_deref().unwrap_or("none"),
        to = fingerprint::SCHEME,
        "Recomputed the fingerprints of live listeners."
    );
    Ok(done)
}
