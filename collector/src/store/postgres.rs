//! PostgreSQL: for fleets that outgrow one SQLite file, and for teams that already point
//! psql and Grafana at PostgreSQL. This file holds only PostgreSQL's SQL and batching; the
//! write flow is `flow.rs`.
//!
//! A pool of `pool_size` connections serves all sessions in parallel. Messages of one host
//! are serialized by locking its `host` row (`SELECT … FOR UPDATE`), which is also where
//! the session/sequence check happens. Batches use arrays: `INSERT … SELECT * FROM
//! UNNEST($1, …)` and `= ANY($1)`, a constant number of statements per message whatever
//! its size (no per-row round trips).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use listenscope_core::fingerprint::Fingerprints;
use listenscope_core::record::ListenerRecord;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Row};
use time::OffsetDateTime;

use super::flow::{self, Backend, HostRow, HostUpdate};
use super::plan::{LiveRow, Plan};
use super::row::{self, COLUMNS, Kind, Val};
use super::{HostSession, StoreError, StoreOptions, redact};

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    url.parse::<PgConnectOptions>()
        .map_err(|source| StoreError::Open {
            url: redact(url),
            source,
        })
}

impl PgStore {
    pub async fn open(url: &str, opts: &StoreOptions) -> Result<PgStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(opts.pool_size.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect_options(url)?)
            .await
            .map_err(|source| StoreError::Open {
                url: redact(url),
                source,
            })?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        let store = PgStore { pool };
        flow::guarded(&store, async |c| {
            Self::set_setting(c, "stale_after_seconds", &opts.stale_after_secs.to_string()).await
        })
        .await?;
        flow::upgrade_fingerprints(&store).await?;
        Ok(store)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn hello(
        &self,
        host: &str,
        os_hostname: &str,
        agent_version: &str,
        now: OffsetDateTime,
    ) -> Result<HostSession, StoreError> {
        let row = flow::guarded(self, async |c| {
            Ok(sqlx::query(
                "INSERT INTO host (name, os_hostname, agent_version, first_seen, last_seen)
                     VALUES ($1, $2, $3, $4, $4)
                     ON CONFLICT (name) DO UPDATE SET os_hostname = excluded.os_hostname,
                         agent_version = excluded.agent_version, last_seen = excluded.last_seen
                     RETURNING id, session_id, committed_seq",
            )
            .bind(host)
            .bind(os_hostname)
            .bind(agent_version)
            .bind(now)
            .fetch_one(c)
            .await?)
        })
        .await?;
        Ok(HostSession {
            host_id: row.try_get("id")?,
            session_id: row.try_get("session_id")?,
            committed_seq: row.try_get::<i64, _>("committed_seq")? as u64,
        })
    }

    pub async fn prune_batch(&self, cutoff: OffsetDateTime, batch: i64) -> Result<u64, StoreError> {
        flow::guarded(self, async |c| {
            let done = sqlx::query(
                "DELETE FROM listener WHERE id IN (
                     SELECT id FROM listener WHERE valid_to IS NOT NULL AND valid_to < $1 LIMIT $2)",
            )
            .bind(cutoff)
            .bind(batch)
            .execute(c)
            .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    pub async fn heartbeat(&self, host_id: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        flow::guarded(self, async |c| {
            sqlx::query("UPDATE host SET last_seen = $1 WHERE id = $2")
                .bind(now)
                .bind(host_id)
                .execute(c)
                .await?;
            Ok(())
        })
        .await
    }
}

/// One insert column as a PostgreSQL array.
enum Array {
    Text(Vec<Option<String>>),
    Int4(Vec<i32>),
    Int8(Vec<i64>),
    Bool(Vec<Option<bool>>),
    Time(Vec<OffsetDateTime>),
}

impl Array {
    fn new(kind: Kind, n: usize) -> Array {
        match kind {
            Kind::Text | Kind::Json => Array::Text(Vec::with_capacity(n)),
            Kind::Int4 => Array::Int4(Vec::with_capacity(n)),
            Kind::Int8 => Array::Int8(Vec::with_capacity(n)),
            Kind::Bool => Array::Bool(Vec::with_capacity(n)),
            Kind::Time => Array::Time(Vec::with_capacity(n)),
        }
    }

    fn push(&mut self, v: Val<'_>) -> Result<(), StoreError> {
        match (self, v) {
            (Array::Text(a), Val::Text(s)) => a.push(s.map(|s| s.into_owned())),
            (Array::Int4(a), Val::Int(i)) => a.push(
                i32::try_from(i).map_err(|_| StoreError::Corrupt(format!("{i} exceeds int")))?,
            ),
            (Array::Int8(a), Val::Int(i)) => a.push(i),
            (Array::Bool(a), Val::Bool(b)) => a.push(b),
            (Array::Time(a), Val::Time(t)) => a.push(t),
            (_, v) => {
                return Err(StoreError::Corrupt(format!(
                    "value {v:?} does not fit its column"
                )));
            }
        }
        Ok(())
    }
}

fn pg_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "text[]",
        Kind::Json => "text[]::jsonb[]",
        Kind::Int4 => "int[]",
        Kind::Int8 => "bigint[]",
        Kind::Bool => "bool[]",
        Kind::Time => "timestamptz[]",
    }
}

/// `INSERT INTO listener (…) SELECT * FROM UNNEST($1::bigint[], …)`, from the column list.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    let arrays: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| format!("${}::{}", i + 1, pg_type(*kind)))
        .collect();
    format!(
        "INSERT INTO listener ({}) SELECT * FROM UNNEST({})",
        row::column_list(),
        arrays.join(", ")
    )
});

impl Backend for PgStore {
    type Db = Postgres;

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn host_row(c: &mut PgConnection, host_id: i64) -> Result<HostRow, StoreError> {
        let row = sqlx::query(
            "SELECT session_id, committed_seq, last_snapshot_at FROM host WHERE id = $1 FOR UPDATE",
        )
        .bind(host_id)
        .fetch_one(c)
        .await?;
        Ok(HostRow {
            session: row.try_get("session_id")?,
            committed: row.try_get::<i64, _>("committed_seq")? as u64,
            snapshot_at: row.try_get("last_snapshot_at")?,
        })
    }

    async fn live_rows(
        c: &mut PgConnection,
        host_id: i64,
        keys: Option<&[&str]>,
    ) -> Result<HashMap<String, LiveRow>, StoreError> {
        let rows = match keys {
            None => {
                sqlx::query(
                    "SELECT id, lkey, material_hash, full_hash, first_seen, valid_from
                     FROM listener WHERE host_id = $1 AND valid_to IS NULL",
                )
                .bind(host_id)
                .fetch_all(c)
                .await?
            }
            Some(keys) => {
                sqlx::query(
                    "SELECT id, lkey, material_hash, full_hash, first_seen, valid_from
                     FROM listener WHERE host_id = $1 AND valid_to IS NULL AND lkey = ANY($2)",
                )
                .bind(host_id)
                .bind(keys)
                .fetch_all(c)
                .await?
            }
        };
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            out.insert(
                r.try_get::<String, _>("lkey")?,
                LiveRow {
                    id: r.try_get("id")?,
                    material_hash: r.try_get("material_hash")?,
                    full_hash: r.try_get("full_hash")?,
                    first_seen: r.try_get("first_seen")?,
                    valid_from: r.try_get("valid_from")?,
                },
            );
        }
        Ok(out)
    }

    async fn execute(
        c: &mut PgConnection,
        host_id: i64,
        p: &Plan<'_>,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        for (ids, reason) in [(&p.close_changed, "changed"), (&p.close_closed, "closed")] {
            if ids.is_empty() {
                continue;
            }
            // Never end a version before it began (agent clock stepped back).
            sqlx::query(
                "UPDATE listener SET valid_to = GREATEST($1, valid_from), end_reason = $2
                 WHERE id = ANY($3)",
            )
            .bind(at)
            .bind(reason)
            .bind(ids)
            .execute(&mut *c)
            .await?;
        }
        if !p.refresh.is_empty() {
            let n = p.refresh.len();
            let (mut ids, mut inodes, mut procs, mut sockets, mut hashes) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for (id, u) in &p.refresh {
                ids.push(*id);
                inodes.push(u.record.netns_inode as i64);
                procs.push(row::processes_json(&u.record));
                sockets.push(u.record.sockets as i32);
                hashes.push(u.fingerprints.full);
            }
            sqlx::query(
                "UPDATE listener AS l SET netns_inode = u.netns_inode, processes = u.processes,
                     sockets = u.sockets, full_hash = u.full_hash
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]::jsonb[], $4::int[], $5::bigint[])
                     AS u (id, netns_inode, processes, sockets, full_hash)
                 WHERE l.id = u.id",
            )
            .bind(ids)
            .bind(inodes)
            .bind(procs)
            .bind(sockets)
            .bind(hashes)
            .execute(&mut *c)
            .await?;
        }
        if !p.insert.is_empty() {
            let mut arrays: Vec<Array> = COLUMNS
                .iter()
                .map(|(_, kind)| Array::new(*kind, p.insert.len()))
                .collect();
            for n in &p.insert {
                for (a, v) in arrays.iter_mut().zip(row::values(host_id, n)) {
                    a.push(v)?;
                }
            }
            let mut q = sqlx::query(AssertSqlSafe(INSERT.as_str()));
            for a in arrays {
                q = match a {
                    Array::Text(v) => q.bind(v),
                    Array::Int4(v) => q.bind(v),
                    Array::Int8(v) => q.bind(v),
                    Array::Bool(v) => q.bind(v),
                    Array::Time(v) => q.bind(v),
                };
            }
            q.execute(&mut *c).await?;
        }
        Ok(())
    }

    async fn update_host(
        c: &mut PgConnection,
        host_id: i64,
        u: HostUpdate<'_>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE host SET session_id = coalesce($1, session_id), committed_seq = $2,
                 last_seen = $3, last_snapshot_at = coalesce($4, last_snapshot_at)
             WHERE id = $5",
        )
        .bind(u.session)
        .bind(u.committed as i64)
        .bind(u.last_seen)
        .bind(u.snapshot_at)
        .bind(host_id)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn setting(c: &mut PgConnection, key: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM setting WHERE key = $1")
                .bind(key)
                .fetch_optional(c)
                .await?,
        )
    }

    async fn set_setting(c: &mut PgConnection, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO setting (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn live_records(
        c: &mut PgConnection,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, ListenerRecord)>, StoreError> {
        // The casts give every integer column as bigint and the JSON as text: the shared
        // decoder reads the same types as on SQLite.
        let rows = sqlx::query(
            "SELECT id, netns, netns_inode, protocol, family, address, port::bigint AS port,
                 interface, v6only, reach_ipv4, reach_ipv6, latent, shown_as, netstat_proto, trap,
                 hidden_ipv4_exposure, processes::text AS processes, container_runtime,
                 container_id, pod_uid, unit, cgroup, uid, freebind, transparent, source,
                 sockets::bigint AS sockets
             FROM listener WHERE valid_to IS NULL AND id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(c)
        .await?;
        rows.iter().map(row::record_of).collect()
    }

    async fn set_fingerprints(
        c: &mut PgConnection,
        rows: &[(i64, Fingerprints)],
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let material: Vec<i64> = rows.iter().map(|(_, f)| f.material).collect();
        let full: Vec<i64> = rows.iter().map(|(_, f)| f.full).collect();
        sqlx::query(
            "UPDATE listener AS l SET material_hash = u.material, full_hash = u.full
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS u (id, material, full)
             WHERE l.id = u.id",
        )
        .bind(ids)
        .bind(material)
        .bind(full)
        .execute(c)
        .await?;
        Ok(())
    }
}

/// Opens a read-only pool: every connection defaults to read-only transactions and a
/// statement timeout; `query` also wraps each statement in `BEGIN READ ONLY`.
pub async fn open_read_only(url: &str, pool_size: u32) -> Result<PgPool, StoreError> {
    let opts = connect_options(url)?.options([
        ("default_transaction_read_only", "on"),
        ("statement_timeout", "60s"),
    ]);
    PgPoolOptions::new()
        .max_connections(pool_size.max(1))
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts)
        .await
        .map_err(|source| StoreError::Open {
            url: redact(url),
            source,
        })
}
