//! The write flow, once for both databases: how one agent message becomes one
//! transaction, and how fingerprints are brought to the current scheme.
//!
//! begin → read (PostgreSQL: lock) the host row → sequence rules → the host's live rows →
//! [`plan`](super::plan::plan) → execute → host bookkeeping → commit. A [`Backend`]
//! supplies only its SQL and its batching; the decisions live in `plan` and here.
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
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Database, Pool};
use time::OffsetDateTime;

use super::plan::{DeltaWork, LiveRow, Plan, Prepared, Stored, delta_rule, plan, snapshot_rule};
use super::{Applied, StoreError};

/// The connection type of a backend.
pub(crate) type Conn<B> = <<B as Backend>::Db as Database>::Connection;

/// What the host row says about the stored session.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostRow {
    pub session: Option<Vec<u8>>,
    pub committed: u64,
    pub snapshot_at: Option<OffsetDateTime>,
}

/// The host row's bookkeeping after a committed message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostUpdate<'a> {
    /// Set for snapshots: the session whose messages are now committed.
    pub session: Option<&'a [u8]>,
    pub committed: u64,
    pub last_seen: OffsetDateTime,
    /// Set for snapshots: the observation time of the stored state.
    pub snapshot_at: Option<OffsetDateTime>,
}

/// One agent message for the store.
#[derive(Debug)]
pub enum Message {
    /// The host's whole state: every live row not in it is closed.
    Snapshot(Vec<ListenerRecord>),
    /// Changes since the previous sequence.
    Delta(Changes),
}

/// Live rows recomputed per transaction when bringing fingerprints to the current scheme.
const REHASH_PAGE: i64 = 5000;
/// The `setting` row naming the scheme of the stored fingerprints.
const SCHEME_KEY: &str = "fingerprint_scheme";

/// What a database supplies to the write flow: its SQL and its batching, nothing else.
pub(crate) trait Backend: Sync {
    type Db: Database;

    fn pool(&self) -> &Pool<Self::Db>;

    /// The host row; on PostgreSQL also locks it for the transaction (per-host order).
    fn host_row(
        c: &mut Conn<Self>,
        host_id: i64,
    ) -> impl Future<Output = Result<HostRow, StoreError>> + Send;

    /// The host's live rows; only those with the given keys when `keys` is set.
    fn live_rows(
        c: &mut Conn<Self>,
        host_id: i64,
        keys: Option<&[&str]>,
    ) -> impl Future<Output = Result<HashMap<String, LiveRow>, StoreError>> + Send;

    /// Closes, refreshes and inserts what the plan says, with `at` as the end of closed
    /// versions (never before their start).
    fn execute(
        c: &mut Conn<Self>,
        host_id: i64,
        plan: &Plan<'_>,
        at: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn update_host(
        c: &mut Conn<Self>,
        host_id: i64,
        update: HostUpdate<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

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

/// Stores one message of `session_id` with sequence `seq`, observed at `at`, in one
/// transaction; the host's committed sequence is written in the same transaction.
pub(crate) async fn apply<B: Backend>(
    b: &B,
    host_id: i64,
    session_id: &[u8],
    seq: u64,
    at: OffsetDateTime,
    message: Message,
    now: OffsetDateTime,
) -> Result<Applied, StoreError> {
    // Fingerprints and keys are computed before the transaction starts.
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
    guarded(b, async |conn: &mut Conn<B>| {
        let mut tx = conn.begin().await?;
        let host = B::host_row(&mut *tx, host_id).await?;
        let stored = Stored {
            session: host.session.as_deref(),
            committed: host.committed,
            snapshot_at: host.snapshot_at,
        };
        let rule = if snapshot {
            snapshot_rule(stored, session_id, seq, at)
        } else {
            delta_rule(stored, session_id, seq)
        };
        if let Some(not_applied) = rule {
            tx.rollback().await?;
            return Ok(not_applied);
        }
        let live = if snapshot {
            B::live_rows(&mut *tx, host_id, None).await?
        } else {
            let keys: Vec<&str> = upserts
                .iter()
                .map(|u| u.lkey.as_str())
                .chain(closes.iter().map(String::as_str))
                .collect();
            B::live_rows(&mut *tx, host_id, Some(&keys)).await?
        };
        let p = plan(&live, &upserts, &closes, snapshot, at);
        B::execute(&mut *tx, host_id, &p, at).await?;
        let update = HostUpdate {
            session: snapshot.then_some(session_id),
            committed: seq,
            last_seen: now,
            snapshot_at: snapshot.then_some(at),
        };
        B::update_host(&mut *tx, host_id, update).await?;
        tx.commit().await?;
        Ok(Applied::Committed { rows: p.rows() })
    })
    .await
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
