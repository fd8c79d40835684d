//! The embedded default: SQLite through sqlx. This file holds only SQLite's SQL and
//! batching; the write flow is `flow.rs`.
//!
//! One writer connection (SQLite allows one writer; a pool of one serializes them without
//! lock errors), WAL journal so readers never block it, `synchronous=FULL`: every commit
//! is on disk before it is acknowledged (NORMAL would survive a crash of the process but
//! not of the machine, and agents forget what we acknowledge). Writes are batched: a
//! round of hosts costs a fixed number of statements (lists passed as one JSON parameter,
//! `UPDATE … FROM (VALUES …)` in chunks well under SQLite's 32766 bound parameters), and
//! new rows go through one prepared `INSERT` stepped per row on the connection's own
//! handle (`sqlite_step::Each`).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use listenscope_core::fingerprint::Fingerprints;
use listenscope_core::record::ListenerRecord;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, ConnectOptions as _, QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;

use super::flow::{
    self, Backend, HelloWork, HostRow, HostUpdate, LiveWanted, Rebuild, WatchChange, Write,
};
use super::plan::LiveRow;
use super::row::{self, RECORD_COLUMNS, Val};
use super::sqlite_step::{Bind, Each};
use super::{HeldElsewhere, HostSession, StoreError, StoreOptions};
use crate::timefmt;

/// Rows per multi-row statement (`UPDATE … FROM (VALUES …)`: at most 7 values a row, far
/// under SQLite's 32766 parameters).
const INSERT_CHUNK: usize = 400;
/// Ids or keys per `IN (…)` list.
const IN_CHUNK: usize = 500;

fn parse_time(s: &str) -> Result<OffsetDateTime, StoreError> {
    timefmt::parse(s).map_err(|e| StoreError::Corrupt(format!("time {s:?}: {e}")))
}

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
            return Err(StoreError::NoDirectory {
                url,
                dir: parent.to_path_buf(),
            });
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // A fleet's indexes do not fit SQLite's 2 MiB default cache; 64 MiB keeps the
            // hot index pages of millions of rows in memory. Group commits are big: a
            // checkpoint every 40 MiB of WAL instead of every 4 MiB.
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory")
            .pragma("wal_autocheckpoint", "10000")
            .log_slow_statements(super::SLOW_WRITE_LEVEL, super::SLOW_WRITE);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open {
                url: url.clone(),
                detail: super::sql_message(&e),
            })?;
        sqlx::migrate!("../migrations/sqlite").run(&writer).await?;
        let store = SqliteStore { writer };
        flow::guarded(&store, async |c| {
            Self::set_setting(c, "stale_after_seconds", &opts.stale_after_secs.to_string()).await
        })
        .await?;
        flow::upgrade_fingerprints(&store).await?;
        Ok(store)
    }

    pub async fn close(&self) {
        self.writer.close().await;
    }

    pub async fn epochs(&self, ids: &[i64]) -> Result<HashMap<i64, i64>, StoreError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IN_CHUNK) {
            let found: Vec<(i64, i64)> = flow::guarded(self, async |c| {
                let mut q =
                    QueryBuilder::<Sqlite>::new("SELECT id, session_epoch FROM host WHERE id IN (");
                let mut list = q.separated(",");
                for id in chunk {
                    list.push_bind(*id);
                }
                q.push(")");
                Ok(q.build_query_as().fetch_all(c).await?)
            })
            .await?;
            out.extend(found);
        }
        Ok(out)
    }

    pub async fn duplicate_refused(
        &self,
        host: &str,
        refused: i64,
        at: OffsetDateTime,
        peer: &str,
    ) -> Result<(), StoreError> {
        let at = timefmt::format(at);
        flow::guarded(self, async |c| {
            sqlx::query(
                "UPDATE host SET duplicate_refusals = duplicate_refusals + ?,
                     duplicate_last_at = ?, duplicate_last_peer = ?
                 WHERE name = ?",
            )
            .bind(refused)
            .bind(&at)
            .bind(peer)
            .bind(host)
            .execute(c)
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn prune_batch(&self, cutoff: OffsetDateTime, batch: i64) -> Result<u64, StoreError> {
        let cutoff = timefmt::format(cutoff);
        flow::guarded(self, async |c| {
            let done = sqlx::query(
                "DELETE FROM listener WHERE id IN (
                     SELECT id FROM listener WHERE valid_to IS NOT NULL AND valid_to < ? LIMIT ?)",
            )
            .bind(&cutoff)
            .bind(batch)
            .execute(c)
            .await?;
            Ok(done.rows_affected())
        })
        .await
    }
}

/// Whether every id is different (what `UPDATE … FROM (VALUES …)` needs).
fn distinct(ids: impl Iterator<Item = i64>) -> bool {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().all(|id| seen.insert(id))
}

/// A list passed as ONE parameter, read back with `json_each`: the statement's text does
/// not depend on the list's length, so it is prepared once per connection.
fn json_list<T: serde::Serialize>(items: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(items)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode a list: {e}")))
}

impl Backend for SqliteStore {
    type Db = Sqlite;

    fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    /// Nothing: SQLite plans the writer's statements by their shape (every one names its
    /// index or is a primary-key search), not by statistics, and a fresh database plans
    /// them the same way as an analyzed one.
    async fn analyze(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn hello(c: &mut SqliteConnection, h: &HelloWork) -> Result<HostSession, StoreError> {
        // The WHERE is the rule of docs/protocol.md, "One host, one agent", across
        // collectors: this collector's own sessions were decided by its registry.
        // `watch_since` moves only when the mode or its reason changed (a reconnect in the
        // same mode keeps it), and is NULL with the mode (an agent that reports none).
        let row = sqlx::query(
            "INSERT INTO host (name, os_hostname, agent_version, first_seen, last_seen,
                               session_epoch, collector, instance_id, watch_mode,
                               watch_reason, watch_since)
                 VALUES (?1, ?2, ?3, ?4, ?4, 1, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (name) DO UPDATE SET os_hostname = excluded.os_hostname,
                     agent_version = excluded.agent_version,
                     last_seen = excluded.last_seen,
                     session_epoch = host.session_epoch + 1,
                     collector = excluded.collector,
                     instance_id = excluded.instance_id,
                     watch_mode = excluded.watch_mode,
                     watch_reason = excluded.watch_reason,
                     watch_since = CASE
                         WHEN excluded.watch_mode IS NULL THEN NULL
                         WHEN host.watch_mode IS excluded.watch_mode
                              AND host.watch_reason IS excluded.watch_reason
                              AND host.watch_since IS NOT NULL THEN host.watch_since
                         ELSE excluded.watch_since END
                 WHERE host.instance_id IS NULL OR excluded.instance_id IS NULL
                     OR host.instance_id = excluded.instance_id
                     OR host.collector IS excluded.collector
                     OR (julianday(excluded.last_seen) - julianday(host.last_seen)) * 86400.0
                        > CAST((SELECT value FROM setting WHERE key = 'stale_after_seconds')
                               AS REAL)
                 RETURNING id, session_id, committed_seq, session_epoch",
        )
        .bind(&h.host)
        .bind(&h.os_hostname)
        .bind(&h.agent_version)
        .bind(timefmt::format(h.now))
        .bind(h.collector.as_deref())
        .bind(h.instance_id.map(|i| i.to_vec()))
        .bind(h.watch.as_ref().map(|w| w.mode.as_str()))
        .bind(h.watch.as_ref().and_then(|w| w.reason.as_deref()))
        .bind(h.watch.as_ref().map(|_| timefmt::format(h.now)))
        .fetch_optional(&mut *c)
        .await?;
        let Some(row) = row else {
            let held = sqlx::query(
                "SELECT id, session_id, committed_seq, session_epoch, instance_id, collector,
                        last_seen
                 FROM host WHERE name = ?1",
            )
            .bind(&h.host)
            .fetch_one(c)
            .await?;
            return Ok(HostSession {
                host_id: held.try_get("id")?,
                session_id: held.try_get("session_id")?,
                committed_seq: held.try_get::<i64, _>("committed_seq")? as u64,
                epoch: held.try_get("session_epoch")?,
                held_elsewhere: Some(HeldElsewhere {
                    instance_id: held.try_get("instance_id")?,
                    collector: held.try_get("collector")?,
                    last_seen: held.try_get("last_seen")?,
                }),
            });
        };
        Ok(HostSession {
            host_id: row.try_get("id")?,
            session_id: row.try_get("session_id")?,
            committed_seq: row.try_get::<i64, _>("committed_seq")? as u64,
            epoch: row.try_get("session_epoch")?,
            held_elsewhere: None,
        })
    }

    async fn host_rows(
        c: &mut SqliteConnection,
        ids: &[i64],
    ) -> Result<HashMap<i64, HostRow>, StoreError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IN_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT id, session_id, committed_seq, last_snapshot_at, session_epoch
                 FROM host WHERE id IN (",
            );
            let mut list = q.separated(",");
            for id in chunk {
                list.push_bind(*id);
            }
            q.push(")");
            for row in q.build().fetch_all(&mut *c).await? {
                out.insert(
                    row.try_get("id")?,
                    HostRow {
                        session: row.try_get("session_id")?,
                        committed: row.try_get::<i64, _>("committed_seq")? as u64,
                        snapshot_at: match row.try_get::<Option<String>, _>("last_snapshot_at")? {
                            Some(s) => Some(parse_time(&s)?),
                            None => None,
                        },
                        epoch: row.try_get("session_epoch")?,
                    },
                );
            }
        }
        Ok(out)
    }

    async fn live_rows(
        c: &mut SqliteConnection,
        wanted: &[LiveWanted<'_>],
    ) -> Result<HashMap<i64, HashMap<String, LiveRow>>, StoreError> {
        // Two statements for the whole round, whatever its number of hosts: whole hosts
        // (snapshots) and (host, key) pairs (deltas), each list passed as one JSON array,
        // so the statement text never changes and stays prepared.
        let (whole, pairs) = flow::split_live(wanted);
        let mut out: HashMap<i64, HashMap<String, LiveRow>> =
            wanted.iter().map(|w| (w.host_id, HashMap::new())).collect();
        let mut found = Vec::new();
        if !whole.is_empty() {
            found.extend(
                sqlx::query(
                    "SELECT host_id, id, lkey, material_hash, full_hash, first_seen, valid_from
                     FROM listener INDEXED BY listener_live_key
                     WHERE valid_to IS NULL AND host_id IN (SELECT value FROM json_each(?1))",
                )
                .bind(json_list(&whole)?)
                .fetch_all(&mut *c)
                .await?,
            );
        }
        if !pairs.is_empty() {
            found.extend(
                sqlx::query(
                    "SELECT l.host_id, l.id, l.lkey, l.material_hash, l.full_hash, l.first_seen,
                            l.valid_from
                     FROM json_each(?1) AS k
                     CROSS JOIN listener AS l INDEXED BY listener_live_key
                         ON l.host_id = k.value ->> 0 AND l.lkey = k.value ->> 1
                        AND l.valid_to IS NULL",
                )
                .bind(json_list(&pairs)?)
                .fetch_all(&mut *c)
                .await?,
            );
        }
        for r in found {
            out.entry(r.try_get("host_id")?).or_default().insert(
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
        Ok(out)
    }

    async fn execute(c: &mut SqliteConnection, writes: &[Write<'_>]) -> Result<(), StoreError> {
        // Closes of every message at once. Never end a version before it began (agent
        // clock stepped back).
        let closes: Vec<(i64, String, &str)> = writes
            .iter()
            .flat_map(|w| {
                let at = timefmt::format(w.at);
                let p = &w.plan;
                p.close_changed
                    .iter()
                    .map(|id| (*id, "changed"))
                    .chain(p.close_closed.iter().map(|id| (*id, "closed")))
                    .map(move |(id, reason)| (id, at.clone(), reason))
            })
            .collect();
        debug_assert!(distinct(closes.iter().map(|c| c.0)), "a row closed twice");
        for chunk in closes.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE listener SET valid_to = max(v.column2, valid_from), end_reason = v.column3
                 FROM (",
            );
            q.push_values(chunk, |mut b, (id, at, reason)| {
                b.push_bind(*id).push_bind(at.as_str()).push_bind(*reason);
            });
            q.push(") AS v WHERE listener.id = v.column1");
            q.build().execute(&mut *c).await?;
        }
        // Refreshes of every message at once: UPDATE … FROM (VALUES …). What a refresh
        // writes is what the full fingerprint covers beyond the material one.
        let refresh: Vec<_> = writes.iter().flat_map(|w| &w.plan.refresh).collect();
        for chunk in refresh.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE listener SET netns_inode = v.column2, processes = v.column3,
                     sockets = v.column4, full_hash = v.column5,
                     effective_reason_ipv4 = v.column6, effective_reason_ipv6 = v.column7
                 FROM (",
            );
            q.push_values(chunk, |mut b, (id, u)| {
                let r = &u.record;
                b.push_bind(*id)
                    .push_bind(r.netns_inode as i64)
                    .push_bind(row::processes_json(r))
                    .push_bind(i64::from(r.sockets))
                    .push_bind(u.fingerprints.full)
                    .push_bind(r.effective_ipv4.reason.as_str())
                    .push_bind(r.effective_ipv6.reason.as_str());
            });
            q.push(") AS v WHERE listener.id = v.column1");
            q.build().execute(&mut *c).await?;
        }
        // Inserts: one prepared single-row INSERT stepped per row on the connection's own
        // handle, binding the rows' text in place (no per-value copies into sqlx's
        // arguments, no hand-off per statement to sqlx's thread).
        let rows: Vec<_> = writes
            .iter()
            .flat_map(|w| w.plan.insert.iter().map(move |n| (w.host_id, n)))
            .collect();
        if !rows.is_empty() {
            let marks = vec!["?"; row::COLUMNS.len()].join(", ");
            let insert = format!(
                "INSERT INTO listener ({}) VALUES ({marks})",
                row::column_list()
            );
            let mut handle = c.lock_handle().await?;
            let mut each = Each::new(&mut handle, &insert)?;
            // The rows of a message share their times: each is formatted once.
            let mut times: HashMap<OffsetDateTime, String> = HashMap::new();
            for (host_id, n) in rows {
                let vals = row::values(host_id, n);
                for v in &vals {
                    if let Val::Time(t) = v {
                        times.entry(*t).or_insert_with(|| timefmt::format(*t));
                    }
                }
                let binds = vals.each_ref().map(|v| match v {
                    Val::Text(t) => Bind::Text(t.as_deref()),
                    Val::Int(i) => Bind::Int(Some(*i)),
                    Val::Bool(b) => Bind::Int(b.map(i64::from)),
                    Val::Time(t) => Bind::Text(times.get(t).map(String::as_str)),
                });
                each.execute(&binds)?;
            }
        }
        Ok(())
    }

    async fn rebuild_hidden(
        c: &mut SqliteConnection,
        rebuild: &[Rebuild],
    ) -> Result<(), StoreError> {
        // Whole hosts (snapshots) and (host, port) pairs (deltas): two statements each for
        // the whole round, every list one JSON array.
        static AGGREGATE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO hidden_port (host_id, host, netns, protocol, port, shown_as, processes,
                                          effective_ipv4, effective_conditions_ipv4)
                 SELECT l.host_id, h.name, l.netns, l.protocol, l.port,
                        group_concat(DISTINCT l.shown_as ORDER BY l.shown_as),
                        group_concat(DISTINCT NULLIF(l.process_names, '')
                                     ORDER BY NULLIF(l.process_names, '')),
                        {}",
                row::hidden_effective_sql(false)
            )
        });
        const GROUP: &str = " GROUP BY l.host_id, h.name, l.netns, l.protocol, l.port
             HAVING max(l.hidden_ipv4_exposure) = 1";
        let aggregate = AGGREGATE.as_str();
        let (whole, pairs) = flow::split_rebuild(rebuild);
        if !whole.is_empty() {
            let list = json_list(&whole)?;
            sqlx::query(
                "DELETE FROM hidden_port WHERE host_id IN (SELECT value FROM json_each(?1))",
            )
            .bind(&list)
            .execute(&mut *c)
            .await?;
            sqlx::query(AssertSqlSafe(format!(
                "{aggregate} FROM listener AS l INDEXED BY listener_live_key
                 JOIN host AS h ON h.id = l.host_id
                 WHERE l.valid_to IS NULL AND l.host_id IN (SELECT value FROM json_each(?1))
                 {GROUP}"
            )))
            .bind(&list)
            .execute(&mut *c)
            .await?;
        }
        if !pairs.is_empty() {
            let list = json_list(&pairs)?;
            sqlx::query(
                "DELETE FROM hidden_port WHERE (host_id, port) IN
                     (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
            )
            .bind(&list)
            .execute(&mut *c)
            .await?;
            sqlx::query(AssertSqlSafe(format!(
                "{aggregate} FROM json_each(?1) AS t
                 CROSS JOIN listener AS l INDEXED BY listener_host_port
                     ON l.host_id = t.value ->> 0 AND l.port = t.value ->> 1
                    AND l.valid_to IS NULL
                 JOIN host AS h ON h.id = l.host_id {GROUP}"
            )))
            .bind(&list)
            .execute(&mut *c)
            .await?;
        }
        Ok(())
    }

    async fn update_hosts(
        c: &mut SqliteConnection,
        updates: &[HostUpdate<'_>],
    ) -> Result<(), StoreError> {
        // One statement per chunk of hosts. `UPDATE … FROM` applies one of two rows with
        // the same id, so this relies on a round holding each host once.
        debug_assert!(
            distinct(updates.iter().map(|u| u.host_id)),
            "a host twice in a round"
        );
        for chunk in updates.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE host SET session_id = coalesce(v.column2, session_id),
                     committed_seq = v.column3, last_seen = v.column4,
                     last_snapshot_at = coalesce(v.column5, last_snapshot_at),
                     live_listeners = live_listeners + v.column6
                 FROM (",
            );
            q.push_values(chunk, |mut b, u| {
                b.push_bind(u.host_id)
                    .push_bind(u.session)
                    .push_bind(u.committed as i64)
                    .push_bind(timefmt::format(u.last_seen))
                    .push_bind(u.snapshot_at.map(timefmt::format))
                    .push_bind(u.live_delta);
            });
            q.push(") AS v WHERE host.id = v.column1");
            q.build().execute(&mut *c).await?;
        }
        Ok(())
    }

    async fn touch(
        c: &mut SqliteConnection,
        seen: &[(i64, OffsetDateTime)],
    ) -> Result<(), StoreError> {
        for chunk in seen.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new("UPDATE host SET last_seen = v.column2 FROM (");
            q.push_values(chunk, |mut b, (id, t)| {
                b.push_bind(*id).push_bind(timefmt::format(*t));
            });
            q.push(") AS v WHERE host.id = v.column1");
            q.build().execute(&mut *c).await?;
        }
        Ok(())
    }

    async fn set_watch(
        c: &mut SqliteConnection,
        changes: &[WatchChange],
    ) -> Result<Vec<i64>, StoreError> {
        // One writer connection: no row is ever held by another, nothing is skipped.
        debug_assert!(
            distinct(changes.iter().map(|w| w.host_id)),
            "a host's watch twice in a batch"
        );
        for chunk in changes.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE host SET watch_mode = v.column3, watch_reason = v.column4,
                     watch_since = v.column5
                 FROM (",
            );
            q.push_values(chunk, |mut b, w| {
                b.push_bind(w.host_id)
                    .push_bind(w.epoch)
                    .push_bind(w.watch.mode.as_str())
                    .push_bind(w.watch.reason.as_deref())
                    .push_bind(timefmt::format(w.at));
            });
            q.push(
                ") AS v WHERE host.id = v.column1 AND host.session_epoch = v.column2
                     AND (host.watch_mode IS NOT v.column3 OR host.watch_reason IS NOT v.column4)",
            );
            q.build().execute(&mut *c).await?;
        }
        Ok(Vec::new())
    }

    async fn setting(c: &mut SqliteConnection, key: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM setting WHERE key = ?")
                .bind(key)
                .fetch_optional(c)
                .await?,
        )
    }

    async fn set_setting(
        c: &mut SqliteConnection,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO setting (key, value) VALUES (?, ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn live_records(
        c: &mut SqliteConnection,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, ListenerRecord)>, StoreError> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM listener
             WHERE valid_to IS NULL AND id > ? ORDER BY id LIMIT ?"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after)
            .bind(limit)
            .fetch_all(c)
            .await?;
        rows.iter().map(row::record_of).collect()
    }

    async fn set_fingerprints(
        c: &mut SqliteConnection,
        rows: &[(i64, Fingerprints)],
    ) -> Result<(), StoreError> {
        for chunk in rows.chunks(INSERT_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE listener SET material_hash = v.column2, full_hash = v.column3 FROM (",
            );
            q.push_values(chunk, |mut b, (id, f)| {
                b.push_bind(*id).push_bind(f.material).push_bind(f.full);
            });
            q.push(") AS v WHERE listener.id = v.column1");
            q.build().execute(&mut *c).await?;
        }
        Ok(())
    }
}

/// Opens an existing database read-only: `PRAGMA query_only` on every connection, so no
/// statement can write, whatever it is.
pub async fn open_read_only(path: &Path) -> Result<SqlitePool, StoreError> {
    let url = format!("sqlite://{}", path.display());
    if !path.exists() {
        return Err(StoreError::Missing { url });
    }
    let options = SqliteConnectOptions::from_str(&url)
        .map_err(|e| StoreError::Open {
            url: url.clone(),
            detail: super::sql_message(&e),
        })?
        .read_only(true)
        .pragma("query_only", "1")
        .pragma("cache_size", "-65536")
        .pragma("mmap_size", "268435456")
        // A slow report is the user's to judge: no driver warnings on their terminal.
        .log_slow_statements(log::LevelFilter::Off, Duration::from_secs(60))
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .map_err(|e| StoreError::Open {
            url,
            detail: super::sql_message(&e),
        })
}
