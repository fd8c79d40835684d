//! The embedded default: SQLite through sqlx.
//!
//! One writer connection (SQLite allows one writer; a pool of one serializes them without
//! lock errors), WAL journal so readers never block it, `synchronous=FULL`: every commit
//! is on disk before it is acknowledged (NORMAL would survive a crash of the process but
//! not of the machine, and agents forget what we acknowledge). Writes are batched: multi-row `VALUES` inserts and `IN (…)`
//! updates in chunks well under SQLite's 32766 bound parameters.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use listenscope_agent::diff::Changes;
use listenscope_agent::record::ListenerRecord;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

use super::plan::{DeltaWork, LiveRow, Plan, Prepared, Stored, delta_rule, plan, snapshot_rule};
use super::{Applied, HostSession, StoreError, StoreOptions};

/// How times are stored: UTC, millisecond precision, SQLite's own text format so that
/// `datetime('now', '-1 day')` compares correctly.
const TIME: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]");

pub fn fmt_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(TIME)
        .expect("a valid date formats")
}

pub fn parse_time(s: &str) -> Result<OffsetDateTime, StoreError> {
    time::PrimitiveDateTime::parse(s, TIME)
        .map(|t| t.assume_utc())
        .map_err(|e| StoreError::Corrupt(format!("time {s:?}: {e}")))
}

/// Rows per multi-row INSERT (33 columns each: 13k parameters).
const INSERT_CHUNK: usize = 400;
/// Ids or keys per `IN (…)` list.
const IN_CHUNK: usize = 500;

#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path, opts: &StoreOptions) -> Result<SqliteStore, StoreError> {
        let url = format!("sqlite://{}", path.display());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            return Err(StoreError::Open {
                url,
                source: sqlx::Error::Configuration(
                    format!(
                        "directory {} does not exist; create it first",
                        parent.display()
                    )
                    .into(),
                ),
            });
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                url: url.clone(),
                source,
            })?;
        sqlx::migrate!("../migrations/sqlite").run(&writer).await?;
        sqlx::query("UPDATE setting SET value = ? WHERE key = 'stale_after_seconds'")
            .bind(opts.stale_after_secs.to_string())
            .execute(&writer)
            .await?;
        Ok(SqliteStore { writer })
    }

    pub async fn close(&self) {
        self.writer.close().await;
    }

    pub async fn hello(
        &self,
        host: &str,
        os_hostname: &str,
        agent_version: &str,
        now: OffsetDateTime,
    ) -> Result<HostSession, StoreError> {
        let now = fmt_time(now);
        let row = sqlx::query(
            "INSERT INTO host (name, os_hostname, agent_version, first_seen, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (name) DO UPDATE SET os_hostname = excluded.os_hostname,
                 agent_version = excluded.agent_version, last_seen = excluded.last_seen
             RETURNING id, session_id, committed_seq",
        )
        .bind(host)
        .bind(os_hostname)
        .bind(agent_version)
        .bind(&now)
        .fetch_one(&self.writer)
        .await?;
        Ok(HostSession {
            host_id: row.try_get("id")?,
            session_id: row.try_get("session_id")?,
            committed_seq: row.try_get::<i64, _>("committed_seq")? as u64,
        })
    }

    pub async fn prune_batch(&self, cutoff: OffsetDateTime, batch: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM listener WHERE id IN (
                 SELECT id FROM listener WHERE valid_to IS NOT NULL AND valid_to < ? LIMIT ?)",
        )
        .bind(fmt_time(cutoff))
        .bind(batch)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn heartbeat(&self, host_id: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query("UPDATE host SET last_seen = ? WHERE id = ?")
            .bind(fmt_time(now))
            .bind(host_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn session_of(
        tx: &mut Transaction<'_, Sqlite>,
        host_id: i64,
    ) -> Result<(Option<Vec<u8>>, u64, Option<OffsetDateTime>), StoreError> {
        let row = sqlx::query(
            "SELECT session_id, committed_seq, last_snapshot_at FROM host WHERE id = ?",
        )
        .bind(host_id)
        .fetch_one(&mut **tx)
        .await?;
        let snapshot_at = match row.try_get::<Option<String>, _>("last_snapshot_at")? {
            Some(s) => Some(parse_time(&s)?),
            None => None,
        };
        Ok((
            row.try_get("session_id")?,
            row.try_get::<i64, _>("committed_seq")? as u64,
            snapshot_at,
        ))
    }

    pub async fn apply_snapshot(
        &self,
        host_id: i64,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        records: Vec<ListenerRecord>,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        let prepared: Vec<Prepared> = records.into_iter().map(Prepared::new).collect();
        let mut tx = self.writer.begin().await?;
        let (session, committed, snapshot_at) = Self::session_of(&mut tx, host_id).await?;
        let stored = Stored {
            session: session.as_deref(),
            committed,
            snapshot_at,
        };
        if let Some(done) = snapshot_rule(stored, session_id, seq, at) {
            return Ok(done);
        }
        let live = live_rows(&mut tx, host_id, None).await?;
        let p = plan(&live, &prepared, &[], true, at);
        let rows = execute(&mut tx, host_id, &p, at).await?;
        sqlx::query(
            "UPDATE host SET session_id = ?, committed_seq = ?, last_seen = ?, last_snapshot_at = ?
             WHERE id = ?",
        )
        .bind(session_id)
        .bind(seq as i64)
        .bind(fmt_time(now))
        .bind(fmt_time(at))
        .bind(host_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Applied::Committed { rows })
    }

    pub async fn apply_delta(
        &self,
        host_id: i64,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        changes: Changes,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        let mut tx = self.writer.begin().await?;
        let (session, committed, snapshot_at) = Self::session_of(&mut tx, host_id).await?;
        let stored = Stored {
            session: session.as_deref(),
            committed,
            snapshot_at,
        };
        if let Some(not_applied) = delta_rule(stored, session_id, seq) {
            return Ok(not_applied);
        }
        let work = DeltaWork::new(changes);
        let live = live_rows(&mut tx, host_id, Some(&work.keys())).await?;
        let p = plan(&live, &work.upserts, &work.closes, false, at);
        let rows = execute(&mut tx, host_id, &p, at).await?;
        sqlx::query("UPDATE host SET committed_seq = ?, last_seen = ? WHERE id = ?")
            .bind(seq as i64)
            .bind(fmt_time(now))
            .bind(host_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Applied::Committed { rows })
    }
}

/// The host's live rows; only those with the given keys when `keys` is set.
async fn live_rows(
    tx: &mut Transaction<'_, Sqlite>,
    host_id: i64,
    keys: Option<&[&str]>,
) -> Result<HashMap<String, LiveRow>, StoreError> {
    const SELECT: &str = "SELECT id, lkey, material_hash, full_hash, first_seen, valid_from
                          FROM listener WHERE host_id = ? AND valid_to IS NULL";
    let mut out = HashMap::new();
    let mut collect = |rows: Vec<sqlx::sqlite::SqliteRow>| -> Result<(), StoreError> {
        for r in rows {
            out.insert(
                r.try_get::<String, _>("lkey")?,
                LiveRow {
                    id: r.try_get("id")?,
                    material_hash: r.try_get("material_hash")?,
                    full_hash: r.try_get("full_hash")?,
                    first_seen: parse_time(&r.try_get::<String, _>("first_seen")?)?,
                    valid_from: parse_time(&r.try_get::<String, _>("valid_from")?)?,
                },
            );
        }
        Ok(())
    };
    match keys {
        None => collect(
            sqlx::query(SELECT)
                .bind(host_id)
                .fetch_all(&mut **tx)
                .await?,
        )?,
        Some(keys) => {
            for chunk in keys.chunks(IN_CHUNK) {
                let sql = format!("{SELECT} AND lkey IN ({})", question_marks(chunk.len()));
                let mut q = sqlx::query(AssertSqlSafe(sql)).bind(host_id);
                for k in chunk {
                    q = q.bind(*k);
                }
                collect(q.fetch_all(&mut **tx).await?)?;
            }
        }
    }
    Ok(out)
}

/// `?,?,…`: a bind list of `n` parameters.
fn question_marks(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

const COLUMNS: &str = "host_id, lkey, netns, netns_inode, protocol, family, address, port, \
    interface, v6only, reach_ipv4, reach_ipv6, latent, shown_as, netstat_proto, trap, \
    hidden_ipv4_exposure, process_names, processes, container_runtime, container_id, pod_uid, \
    unit, cgroup, uid, freebind, transparent, source, sockets, material_hash, full_hash, \
    first_seen, valid_from";
const NCOLS: usize = 33;

/// Executes a plan; returns rows written.
async fn execute(
    tx: &mut Transaction<'_, Sqlite>,
    host_id: i64,
    p: &Plan<'_>,
    at: OffsetDateTime,
) -> Result<usize, StoreError> {
    let at_s = fmt_time(at);
    // Never end a version before it began (agent clock stepped back).
    for (ids, reason) in [(&p.close_changed, "changed"), (&p.close_closed, "closed")] {
        for chunk in ids.chunks(IN_CHUNK) {
            let sql = format!(
                "UPDATE listener SET valid_to = max(?, valid_from), end_reason = ? WHERE id IN ({})",
                question_marks(chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(&at_s).bind(reason);
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut **tx).await?;
        }
    }
    // Refreshes in one statement per chunk: UPDATE … FROM (VALUES …).
    for chunk in p.refresh.chunks(INSERT_CHUNK) {
        let sql = format!(
            "UPDATE listener SET netns_inode = v.column2, processes = v.column3,
                 sockets = v.column4, full_hash = v.column5
             FROM (VALUES {}) AS v WHERE listener.id = v.column1",
            vec!["(?,?,?,?,?)"; chunk.len()].join(",")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (id, u) in chunk {
            let r = &u.record;
            q = q
                .bind(*id)
                .bind(r.netns_inode as i64)
                .bind(processes_json(r))
                .bind(i64::from(r.sockets))
                .bind(u.full_hash);
        }
        q.execute(&mut **tx).await?;
    }
    for chunk in p.insert.chunks(INSERT_CHUNK) {
        let row = format!("({})", question_marks(NCOLS));
        let sql = format!(
            "INSERT INTO listener ({COLUMNS}) VALUES {}",
            vec![row; chunk.len()].join(",")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for n in chunk {
            let r = &n.prepared.record;
            let k = &r.key;
            q = q
                .bind(host_id)
                .bind(&n.prepared.lkey)
                .bind(&k.netns)
                .bind(r.netns_inode as i64)
                .bind(k.protocol.as_str())
                .bind(k.family.as_str())
                .bind(k.address.to_string())
                .bind(i64::from(k.port))
                .bind(k.interface.as_deref())
                .bind(k.v6only)
                .bind(r.reach_ipv4.as_str())
                .bind(r.reach_ipv6.as_str())
                .bind(r.latent)
                .bind(&r.shown_as)
                .bind(&r.netstat_proto)
                .bind(r.trap)
                .bind(r.hidden_ipv4_exposure)
                .bind(r.process_names())
                .bind(processes_json(r))
                .bind(r.container.as_ref().map(|c| c.runtime.as_str()))
                .bind(r.container.as_ref().map(|c| c.id.as_str()))
                .bind(r.container.as_ref().and_then(|c| c.pod_uid.as_deref()))
                .bind(r.unit.as_deref())
                .bind(r.cgroup.as_deref())
                .bind(i64::from(r.uid))
                .bind(r.freebind)
                .bind(r.transparent)
                .bind(r.source.as_str())
                .bind(i64::from(r.sockets))
                .bind(n.prepared.material_hash)
                .bind(n.prepared.full_hash)
                .bind(fmt_time(n.first_seen))
                .bind(fmt_time(n.valid_from));
        }
        q.execute(&mut **tx).await?;
    }
    Ok(p.rows())
}

/// Owners as a JSON array of `{"pid","comm","cmdline","user"}` (the `process_details`
/// column).
pub fn processes_json(r: &ListenerRecord) -> String {
    serde_json::to_string(&r.processes).expect("processes serialize")
}

/// Opens an existing database read-only: `PRAGMA query_only` on every connection, so no
/// statement can write, whatever it is.
pub async fn open_read_only(path: &Path) -> Result<SqlitePool, StoreError> {
    let url = format!("sqlite://{}", path.display());
    if !path.exists() {
        return Err(StoreError::Missing { url });
    }
    let options = SqliteConnectOptions::from_str(&url)
        .map_err(|source| StoreError::Open {
            url: url.clone(),
            source,
        })?
        .read_only(true)
        .pragma("query_only", "1")
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Open { url, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_sort() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
            + time::Duration::milliseconds(5);
        let s = fmt_time(t);
        assert_eq!(s, "2027-01-15 08:00:00.005");
        assert_eq!(parse_time(&s).unwrap(), t);
        assert!(fmt_time(t) < fmt_time(t + time::Duration::milliseconds(1)));
        assert!(parse_time("yesterday").is_err());
    }
}
