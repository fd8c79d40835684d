//! PostgreSQL: for fleets that outgrow one SQLite file, and for teams that already point
//! psql and Grafana at PostgreSQL.
//!
//! A pool of `pool_size` connections serves all sessions in parallel. Messages of one host
//! are serialized by locking its `host` row (`SELECT … FOR UPDATE`), which is also where
//! the session/sequence check happens. Batches use arrays: `INSERT … SELECT * FROM
//! UNNEST($1, …)` and `= ANY($1)`, a constant number of statements per message whatever
//! its size (no per-row round trips).

use std::collections::HashMap;
use std::time::Duration;

use listenscope_agent::diff::Changes;
use listenscope_agent::record::ListenerRecord;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;

use super::plan::{DeltaWork, LiveRow, Plan, Prepared, Stored, delta_rule, plan, snapshot_rule};
use super::{Applied, HostSession, StoreError, StoreOptions, redact};

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
        sqlx::query("UPDATE setting SET value = $1 WHERE key = 'stale_after_seconds'")
            .bind(opts.stale_after_secs.to_string())
            .execute(&pool)
            .await?;
        Ok(PgStore { pool })
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
        let row = sqlx::query(
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
        .fetch_one(&self.pool)
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
                 SELECT id FROM listener WHERE valid_to IS NOT NULL AND valid_to < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn heartbeat(&self, host_id: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query("UPDATE host SET last_seen = $1 WHERE id = $2")
            .bind(now)
            .bind(host_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Locks the host row for this transaction and returns its session.
    async fn lock_host(
        tx: &mut Transaction<'_, Postgres>,
        host_id: i64,
    ) -> Result<(Option<Vec<u8>>, u64, Option<OffsetDateTime>), StoreError> {
        let row = sqlx::query(
            "SELECT session_id, committed_seq, last_snapshot_at FROM host WHERE id = $1 FOR UPDATE",
        )
        .bind(host_id)
        .fetch_one(&mut **tx)
        .await?;
        Ok((
            row.try_get("session_id")?,
            row.try_get::<i64, _>("committed_seq")? as u64,
            row.try_get("last_snapshot_at")?,
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
        let mut tx = self.pool.begin().await?;
        let (session, committed, snapshot_at) = Self::lock_host(&mut tx, host_id).await?;
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
            "UPDATE host SET session_id = $1, committed_seq = $2, last_seen = $3,
                 last_snapshot_at = $4 WHERE id = $5",
        )
        .bind(session_id)
        .bind(seq as i64)
        .bind(now)
        .bind(at)
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
        let mut tx = self.pool.begin().await?;
        let (session, committed, snapshot_at) = Self::lock_host(&mut tx, host_id).await?;
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
        sqlx::query("UPDATE host SET committed_seq = $1, last_seen = $2 WHERE id = $3")
            .bind(seq as i64)
            .bind(now)
            .bind(host_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Applied::Committed { rows })
    }
}

async fn live_rows(
    tx: &mut Transaction<'_, Postgres>,
    host_id: i64,
    keys: Option<&[&str]>,
) -> Result<HashMap<String, LiveRow>, StoreError> {
    let rows =
        match keys {
            None => sqlx::query(
                "SELECT id, lkey, material_hash, full_hash, first_seen, valid_from FROM listener
                 WHERE host_id = $1 AND valid_to IS NULL",
            )
            .bind(host_id)
            .fetch_all(&mut **tx)
            .await?,
            Some(keys) => sqlx::query(
                "SELECT id, lkey, material_hash, full_hash, first_seen, valid_from FROM listener
                 WHERE host_id = $1 AND valid_to IS NULL AND lkey = ANY($2)",
            )
            .bind(host_id)
            .bind(keys)
            .fetch_all(&mut **tx)
            .await?,
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

/// Executes a plan with array statements; returns rows written.
async fn execute(
    tx: &mut Transaction<'_, Postgres>,
    host_id: i64,
    p: &Plan<'_>,
    at: OffsetDateTime,
) -> Result<usize, StoreError> {
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
        .execute(&mut **tx)
        .await?;
    }
    if !p.refresh.is_empty() {
        let ids: Vec<i64> = p.refresh.iter().map(|(id, _)| *id).collect();
        let inodes: Vec<i64> = p
            .refresh
            .iter()
            .map(|(_, u)| u.record.netns_inode as i64)
            .collect();
        let procs: Vec<String> = p
            .refresh
            .iter()
            .map(|(_, u)| processes_json(&u.record))
            .collect();
        let sockets: Vec<i32> = p
            .refresh
            .iter()
            .map(|(_, u)| u.record.sockets as i32)
            .collect();
        let hashes: Vec<i64> = p.refresh.iter().map(|(_, u)| u.full_hash).collect();
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
        .execute(&mut **tx)
        .await?;
    }
    if !p.insert.is_empty() {
        let mut c = Columns::default();
        for row in &p.insert {
            c.push(row.prepared, row.first_seen, row.valid_from);
        }
        sqlx::query(
            "INSERT INTO listener (host_id, lkey, netns, netns_inode, protocol, family, address,
                 port, interface, v6only, reach_ipv4, reach_ipv6, latent, shown_as, netstat_proto,
                 trap, hidden_ipv4_exposure, process_names, processes, container_runtime,
                 container_id, pod_uid, unit, cgroup, uid, freebind, transparent, source, sockets,
                 material_hash, full_hash, first_seen, valid_from)
             SELECT $1, u.* FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::text[],
                 $6::text[], $7::text[], $8::int[], $9::text[], $10::bool[], $11::text[],
                 $12::text[], $13::bool[], $14::text[], $15::text[], $16::bool[], $17::bool[],
                 $18::text[], $19::text[]::jsonb[], $20::text[], $21::text[], $22::text[], $23::text[],
                 $24::text[], $25::bigint[], $26::bool[], $27::bool[], $28::text[], $29::int[],
                 $30::bigint[], $31::bigint[], $32::timestamptz[], $33::timestamptz[]) AS u",
        )
        .bind(host_id)
        .bind(c.lkey)
        .bind(c.netns)
        .bind(c.netns_inode)
        .bind(c.protocol)
        .bind(c.family)
        .bind(c.address)
        .bind(c.port)
        .bind(c.interface)
        .bind(c.v6only)
        .bind(c.reach_ipv4)
        .bind(c.reach_ipv6)
        .bind(c.latent)
        .bind(c.shown_as)
        .bind(c.netstat_proto)
        .bind(c.trap)
        .bind(c.hidden)
        .bind(c.process_names)
        .bind(c.processes)
        .bind(c.container_runtime)
        .bind(c.container_id)
        .bind(c.pod_uid)
        .bind(c.unit)
        .bind(c.cgroup)
        .bind(c.uid)
        .bind(c.freebind)
        .bind(c.transparent)
        .bind(c.source)
        .bind(c.sockets)
        .bind(c.material_hash)
        .bind(c.full_hash)
        .bind(c.first_seen)
        .bind(c.valid_from)
        .execute(&mut **tx)
        .await?;
    }
    Ok(p.rows())
}

/// JSON text, cast to jsonb by the server: cheaper than building `serde_json::Value`
/// trees for sqlx to encode (10k of them per snapshot).
fn processes_json(r: &ListenerRecord) -> String {
    serde_json::to_string(&r.processes).expect("processes serialize")
}

/// The insert's columns as arrays (one element per row).
#[derive(Default)]
struct Columns {
    lkey: Vec<String>,
    netns: Vec<String>,
    netns_inode: Vec<i64>,
    protocol: Vec<&'static str>,
    family: Vec<&'static str>,
    address: Vec<String>,
    port: Vec<i32>,
    interface: Vec<Option<String>>,
    v6only: Vec<Option<bool>>,
    reach_ipv4: Vec<&'static str>,
    reach_ipv6: Vec<&'static str>,
    latent: Vec<bool>,
    shown_as: Vec<String>,
    netstat_proto: Vec<String>,
    trap: Vec<bool>,
    hidden: Vec<bool>,
    process_names: Vec<String>,
    processes: Vec<String>,
    container_runtime: Vec<Option<String>>,
    container_id: Vec<Option<String>>,
    pod_uid: Vec<Option<String>>,
    unit: Vec<Option<String>>,
    cgroup: Vec<Option<String>>,
    uid: Vec<i64>,
    freebind: Vec<Option<bool>>,
    transparent: Vec<Option<bool>>,
    source: Vec<&'static str>,
    sockets: Vec<i32>,
    material_hash: Vec<i64>,
    full_hash: Vec<i64>,
    first_seen: Vec<OffsetDateTime>,
    valid_from: Vec<OffsetDateTime>,
}

impl Columns {
    fn push(&mut self, p: &Prepared, first_seen: OffsetDateTime, valid_from: OffsetDateTime) {
        let r = &p.record;
        let k = &r.key;
        self.lkey.push(p.lkey.clone());
        self.netns.push(k.netns.clone());
        self.netns_inode.push(r.netns_inode as i64);
        self.protocol.push(k.protocol.as_str());
        self.family.push(k.family.as_str());
        self.address.push(k.address.to_string());
        self.port.push(i32::from(k.port));
        self.interface.push(k.interface.clone());
        self.v6only.push(k.v6only);
        self.reach_ipv4.push(r.reach_ipv4.as_str());
        self.reach_ipv6.push(r.reach_ipv6.as_str());
        self.latent.push(r.latent);
        self.shown_as.push(r.shown_as.clone());
        self.netstat_proto.push(r.netstat_proto.clone());
        self.trap.push(r.trap);
        self.hidden.push(r.hidden_ipv4_exposure);
        self.process_names.push(r.process_names());
        self.processes.push(processes_json(r));
        self.container_runtime
            .push(r.container.as_ref().map(|c| c.runtime.clone()));
        self.container_id
            .push(r.container.as_ref().map(|c| c.id.clone()));
        self.pod_uid
            .push(r.container.as_ref().and_then(|c| c.pod_uid.clone()));
        self.unit.push(r.unit.clone());
        self.cgroup.push(r.cgroup.clone());
        self.uid.push(i64::from(r.uid));
        self.freebind.push(r.freebind);
        self.transparent.push(r.transparent);
        self.source.push(r.source.as_str());
        self.sockets.push(r.sockets as i32);
        self.material_hash.push(p.material_hash);
        self.full_hash.push(p.full_hash);
        self.first_seen.push(first_seen);
        self.valid_from.push(valid_from);
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
