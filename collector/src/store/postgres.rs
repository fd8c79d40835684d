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
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection as _, Postgres, Row};
use time::OffsetDateTime;

use super::flow::{
    self, Backend, HelloWork, HostRow, HostUpdate, LiveWanted, Rebuild, WatchChange, Write,
};
use super::plan::LiveRow;
use super::row::{self, COLUMNS, Kind, Val};
use super::{ConnectCause, HeldElsewhere, HostSession, StoreError, StoreOptions, redact};

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    url.parse::<PgConnectOptions>()
        .map_err(|e| StoreError::Open {
            url: redact(url),
            detail: super::sql_message(&e),
        })
}

/// How long the first connection at start-up may take before the collector (or a report)
/// gives up and says why. The pool's own wait (30 s) is for a busy pool later, not for a
/// server that is not there.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens one connection to the PostgreSQL server of `url` within [`CONNECT_TIMEOUT`] and
/// closes it: `Ok` when the server is there and accepts this user and database, else
/// [`StoreError::Connect`] naming the cause (refused, DNS, timeout, authentication,
/// missing database, TLS) and its fix. Call it before building a pool: a pool retries a
/// failed connection until its acquire timeout and then says only "pool timed out".
pub async fn check_postgres(url: &str) -> Result<(), StoreError> {
    first_connection(url, &connect_options(url)?).await
}

async fn first_connection(url: &str, opts: &PgConnectOptions) -> Result<(), StoreError> {
    let fail = |cause| StoreError::Connect {
        url: redact(url),
        cause,
    };
    let host = opts.get_host().to_string();
    let port = opts.get_port();
    let unix = opts.get_socket().is_some() || host.starts_with('/');
    let at = if unix {
        format!("{host} (port {port})")
    } else {
        format!("{host}:{port}")
    };
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let timeout = || ConnectCause::Timeout {
        at: at.clone(),
        secs: CONNECT_TIMEOUT.as_secs(),
    };
    if !unix {
        // Resolved here, so a name that does not resolve is told apart from a refusal.
        let resolved =
            tokio::time::timeout_at(deadline, tokio::net::lookup_host((host.as_str(), port))).await;
        match resolved {
            Err(_) => return Err(fail(timeout())),
            Ok(Err(e)) => {
                return Err(fail(ConnectCause::Dns {
                    host: host.clone(),
                    detail: e.to_string(),
                }));
            }
            Ok(Ok(_)) => {}
        }
    }
    let conn = match tokio::time::timeout_at(deadline, opts.connect()).await {
        Err(_) => return Err(fail(timeout())),
        Ok(Err(e)) => return Err(fail(connect_cause(opts, &at, &e))),
        Ok(Ok(c)) => c,
    };
    let _ = conn.close().await;
    Ok(())
}

/// The cause of a failed connection attempt, by error kind and SQLSTATE (never by message
/// text).
fn connect_cause(opts: &PgConnectOptions, at: &str, e: &sqlx::Error) -> ConnectCause {
    use std::io::ErrorKind;
    match e {
        sqlx::Error::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::NotFound
            ) =>
        {
            ConnectCause::Refused { at: at.to_string() }
        }
        sqlx::Error::Io(io) if io.kind() == ErrorKind::TimedOut => ConnectCause::Timeout {
            at: at.to_string(),
            secs: CONNECT_TIMEOUT.as_secs(),
        },
        sqlx::Error::Database(d) => match d.code().as_deref() {
            // invalid_password, invalid_authorization_specification (no such role, or
            // pg_hba.conf rejects the connection)
            Some("28P01" | "28000") => ConnectCause::Auth {
                user: opts.get_username().to_string(),
                detail: d.message().to_string(),
            },
            // invalid_catalog_name
            Some("3D000") => ConnectCause::NoDatabase {
                name: opts
                    .get_database()
                    .unwrap_or(opts.get_username())
                    .to_string(),
            },
            _ => ConnectCause::Other {
                detail: super::sql_message(e),
            },
        },
        sqlx::Error::Tls(t) => ConnectCause::Tls {
            detail: t.to_string(),
        },
        other => ConnectCause::Other {
            detail: super::sql_message(other),
        },
    }
}

/// Writer tasks (group committers) for a pool of `pool_size`: each holds one connection
/// while it stores a batch; three more leave room for pruning and the epoch check.
pub(crate) fn writers(pool_size: u32) -> usize {
    (pool_size as usize / 2).max(1)
}

impl PgStore {
    pub async fn open(url: &str, opts: &StoreOptions) -> Result<PgStore, StoreError> {
        let options =
            connect_options(url)?.log_slow_statements(super::SLOW_WRITE_LEVEL, super::SLOW_WRITE);
        first_connection(url, &options).await?;
        let pool = PgPoolOptions::new()
            .max_connections((writers(opts.pool_size) as u32 + 3).max(opts.pool_size))
            .acquire_timeout(Duration::from_secs(30))
            // Under load writers wait for a connection by design (sessions wait, never
            // fail): not a warning.
            .acquire_slow_level(super::SLOW_WRITE_LEVEL)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open {
                url: redact(url),
                detail: super::sql_message(&e),
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

    pub async fn epochs(&self, ids: &[i64]) -> Result<HashMap<i64, i64>, StoreError> {
        let rows: Vec<(i64, i64)> = flow::guarded(self, async |c| {
            Ok(
                sqlx::query_as("SELECT id, session_epoch FROM host WHERE id = ANY($1)")
                    .bind(ids)
                    .fetch_all(c)
                    .await?,
            )
        })
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn duplicate_refused(
        &self,
        host: &str,
        refused: i64,
        at: OffsetDateTime,
        peer: &str,
    ) -> Result<(), StoreError> {
        flow::guarded(self, async |c| {
            sqlx::query(
                "UPDATE host SET duplicate_refusals = duplicate_refusals + $1,
                     duplicate_last_at = $2, duplicate_last_peer = $3
                 WHERE name = $4",
            )
            .bind(refused)
            .bind(at)
            .bind(peer)
            .bind(host)
            .execute(c)
            .await?;
            Ok(())
        })
        .await
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

/// `COPY listener (…) FROM STDIN`, from the column list (text format).
static COPY: LazyLock<String> =
    LazyLock::new(|| format!("COPY listener ({}) FROM STDIN", row::column_list()));

/// Appends `s` as a field of COPY's text format (backslash escapes for the delimiter, line
/// ends and the backslash itself).
fn copy_text(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// Appends one row of COPY text: fields separated by tabs, `\N` for NULL, times in UTC
/// with microseconds (what timestamptz stores; the same truncation sqlx applies).
fn copy_row<'a>(out: &mut Vec<u8>, values: impl IntoIterator<Item = Val<'a>>) {
    use std::io::Write as _;
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match v {
            Val::Text(None) | Val::Bool(None) => out.extend_from_slice(b"\\N"),
            Val::Text(Some(s)) => copy_text(out, &s),
            Val::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Val::Bool(Some(b)) => out.push(if b { b't' } else { b'f' }),
            Val::Time(t) => {
                let t = t.to_offset(time::UtcOffset::UTC);
                let _ = write!(
                    out,
                    "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second(),
                    t.microsecond()
                );
            }
        }
    }
    out.push(b'\n');
}

/// Batches inserting at least this many rows use COPY (measured: a 10,000-row snapshot
/// 40 % faster than UNNEST). Smaller ones use one UNNEST statement: COPY's extra round
/// trip for its end marker costs more than it saves on a few rows.
const COPY_MIN_ROWS: usize = 2000;

/// New rows through COPY (text format).
async fn insert_copy(c: &mut PgConnection, writes: &[Write<'_>]) -> Result<(), StoreError> {
    let mut copy = c.copy_in_raw(COPY.as_str()).await?;
    let mut buf = Vec::with_capacity(1 << 20);
    for w in writes {
        for new in &w.plan.insert {
            copy_row(&mut buf, row::values(w.host_id, new));
            if buf.len() >= 1 << 20 {
                copy.send(std::mem::take(&mut buf)).await?;
                buf.reserve(1 << 20);
            }
        }
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// New rows through one `INSERT … SELECT * FROM UNNEST(…)`, one array per column.
async fn insert_unnest(
    c: &mut PgConnection,
    writes: &[Write<'_>],
    n: usize,
) -> Result<(), StoreError> {
    let mut arrays: Vec<Array> = COLUMNS
        .iter()
        .map(|(_, kind)| Array::new(*kind, n))
        .collect();
    for w in writes {
        for new in &w.plan.insert {
            for (a, v) in arrays.iter_mut().zip(row::values(w.host_id, new)) {
                a.push(v)?;
            }
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
    Ok(())
}

impl Backend for PgStore {
    type Db = Postgres;

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn analyze(&self) -> Result<(), StoreError> {
        // On its own pool connection: ANALYZE takes no lock that blocks the writers.
        sqlx::query("ANALYZE listener, hidden_port, host")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn hello(c: &mut PgConnection, h: &HelloWork) -> Result<HostSession, StoreError> {
        // The WHERE is the rule of docs/protocol.md, "One host, one agent", across
        // collectors: this collector's own sessions were decided by its registry.
        // `watch_since` moves only when the mode or its reason changed (a reconnect in the
        // same mode keeps it), and is NULL with the mode (an agent that reports none).
        let row = sqlx::query(
            "INSERT INTO host (name, os_hostname, agent_version, first_seen, last_seen,
                               session_epoch, collector, instance_id, watch_mode,
                               watch_reason, watch_since)
                 VALUES ($1, $2, $3, $4, $4, 1, $5, $6, $7, $8, $9)
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
                         WHEN host.watch_mode IS NOT DISTINCT FROM excluded.watch_mode
                              AND host.watch_reason IS NOT DISTINCT FROM excluded.watch_reason
                              AND host.watch_since IS NOT NULL THEN host.watch_since
                         ELSE excluded.watch_since END
                 WHERE host.instance_id IS NULL OR excluded.instance_id IS NULL
                     OR host.instance_id = excluded.instance_id
                     OR host.collector IS NOT DISTINCT FROM excluded.collector
                     OR excluded.last_seen - host.last_seen > make_interval(secs =>
                        (SELECT value::float8 FROM setting WHERE key = 'stale_after_seconds'))
                 RETURNING id, session_id, committed_seq, session_epoch",
        )
        .bind(&h.host)
        .bind(&h.os_hostname)
        .bind(&h.agent_version)
        .bind(h.now)
        .bind(h.collector.as_deref())
        .bind(h.instance_id.map(|i| i.to_vec()))
        .bind(h.watch.as_ref().map(|w| w.mode.as_str()))
        .bind(h.watch.as_ref().and_then(|w| w.reason.as_deref()))
        .bind(h.watch.as_ref().map(|_| h.now))
        .fetch_optional(&mut *c)
        .await?;
        let Some(row) = row else {
            let held = sqlx::query(
                "SELECT id, session_id, committed_seq, session_epoch, instance_id, collector,
                        to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS seen
                 FROM host WHERE name = $1",
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
                    last_seen: held.try_get("seen")?,
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
        c: &mut PgConnection,
        ids: &[i64],
    ) -> Result<HashMap<i64, HostRow>, StoreError> {
        // Locked in id order: writers batching overlapping hosts cannot deadlock.
        let rows = sqlx::query(
            "SELECT id, session_id, committed_seq, last_snapshot_at, session_epoch
             FROM host WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(ids)
        .fetch_all(c)
        .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            out.insert(
                row.try_get("id")?,
                HostRow {
                    session: row.try_get("session_id")?,
                    committed: row.try_get::<i64, _>("committed_seq")? as u64,
                    snapshot_at: row.try_get("last_snapshot_at")?,
                    epoch: row.try_get("session_epoch")?,
                },
            );
        }
        Ok(out)
    }

    async fn live_rows(
        c: &mut PgConnection,
        wanted: &[LiveWanted<'_>],
    ) -> Result<HashMap<i64, HashMap<String, LiveRow>>, StoreError> {
        let (whole, pairs) = flow::split_live(wanted);
        let (key_hosts, keys): (Vec<i64>, Vec<&str>) = pairs.into_iter().unzip();
        let mut out: HashMap<i64, HashMap<String, LiveRow>> =
            wanted.iter().map(|w| (w.host_id, HashMap::new())).collect();
        let mut found = Vec::new();
        if !whole.is_empty() {
            found.extend(
                sqlx::query(
                    "SELECT host_id, id, lkey, material_hash, full_hash, first_seen, valid_from
                     FROM listener WHERE host_id = ANY($1) AND valid_to IS NULL",
                )
                .bind(&whole)
                .fetch_all(&mut *c)
                .await?,
            );
        }
        if !keys.is_empty() {
            found.extend(
                sqlx::query(
                    "SELECT l.host_id, l.id, l.lkey, l.material_hash, l.full_hash, l.first_seen,
                            l.valid_from
                     FROM UNNEST($1::bigint[], $2::text[]) AS k (host_id, lkey)
                     JOIN listener l ON l.host_id = k.host_id AND l.lkey = k.lkey
                                    AND l.valid_to IS NULL",
                )
                .bind(&key_hosts)
                .bind(&keys)
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
                    first_seen: r.try_get("first_seen")?,
                    valid_from: r.try_get("valid_from")?,
                },
            );
        }
        Ok(out)
    }

    async fn execute(c: &mut PgConnection, writes: &[Write<'_>]) -> Result<(), StoreError> {
        let (mut ids, mut ats, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
        for w in writes {
            for (list, reason) in [
                (&w.plan.close_changed, "changed"),
                (&w.plan.close_closed, "closed"),
            ] {
                for id in list {
                    ids.push(*id);
                    ats.push(w.at);
                    reasons.push(reason);
                }
            }
        }
        if !ids.is_empty() {
            // Never end a version before it began (agent clock stepped back).
            sqlx::query(
                "UPDATE listener AS l SET valid_to = GREATEST(v.at, l.valid_from),
                     end_reason = v.reason
                 FROM UNNEST($1::bigint[], $2::timestamptz[], $3::text[]) AS v (id, at, reason)
                 WHERE l.id = v.id",
            )
            .bind(ids)
            .bind(ats)
            .bind(reasons)
            .execute(&mut *c)
            .await?;
        }
        let refresh: Vec<_> = writes.iter().flat_map(|w| &w.plan.refresh).collect();
        if !refresh.is_empty() {
            let n = refresh.len();
            let (mut ids, mut inodes, mut procs, mut sockets, mut hashes) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut reasons4, mut reasons6) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for (id, u) in refresh {
                ids.push(*id);
                inodes.push(u.record.netns_inode as i64);
                procs.push(row::processes_json(&u.record));
                sockets.push(u.record.sockets as i32);
                hashes.push(u.fingerprints.full);
                reasons4.push(u.record.effective_ipv4.reason.as_str());
                reasons6.push(u.record.effective_ipv6.reason.as_str());
            }
            // What a refresh writes is what the full fingerprint covers beyond the
            // material one.
            sqlx::query(
                "UPDATE listener AS l SET netns_inode = u.netns_inode, processes = u.processes,
                     sockets = u.sockets, full_hash = u.full_hash,
                     effective_reason_ipv4 = u.reason4, effective_reason_ipv6 = u.reason6
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]::jsonb[], $4::int[], $5::bigint[],
                             $6::text[], $7::text[])
                     AS u (id, netns_inode, processes, sockets, full_hash, reason4, reason6)
                 WHERE l.id = u.id",
            )
            .bind(ids)
            .bind(inodes)
            .bind(procs)
            .bind(sockets)
            .bind(hashes)
            .bind(reasons4)
            .bind(reasons6)
            .execute(&mut *c)
            .await?;
        }
        let n: usize = writes.iter().map(|w| w.plan.insert.len()).sum();
        if n >= COPY_MIN_ROWS {
            insert_copy(c, writes).await?;
        } else if n > 0 {
            insert_unnest(c, writes, n).await?;
        }
        Ok(())
    }

    async fn rebuild_hidden(c: &mut PgConnection, rebuild: &[Rebuild]) -> Result<(), StoreError> {
        // Whole hosts (snapshots) and (host, port) pairs (deltas), each with statements an
        // index serves: a whole host through host_id, a pair through (host_id, port). The
        // pairs are looked up one by one (LATERAL): as a plain join, PostgreSQL's generic
        // plan read a big host's every live row for each delta (5 ms instead of 0.1 ms).
        let (whole, pairs) = flow::split_rebuild(rebuild);
        let (hosts, ports): (Vec<i64>, Vec<i32>) = pairs.into_iter().unzip();
        static AGGREGATE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO hidden_port (host_id, host, netns, protocol, port, shown_as, processes,
                                          effective_ipv4, effective_conditions_ipv4)
                 SELECT l.host_id, h.name, l.netns, l.protocol, l.port,
                        string_agg(DISTINCT l.shown_as COLLATE \"C\", ',' ORDER BY l.shown_as COLLATE \"C\"),
                        string_agg(DISTINCT NULLIF(l.process_names, '') COLLATE \"C\", ','
                                   ORDER BY NULLIF(l.process_names, '') COLLATE \"C\"),
                        {}",
                row::hidden_effective_sql(true)
            )
        });
        let aggregate = AGGREGATE.as_str();
        const GROUP: &str = " GROUP BY l.host_id, h.name, l.netns, l.protocol, l.port
             HAVING bool_or(l.hidden_ipv4_exposure)";
        if !whole.is_empty() {
            sqlx::query("DELETE FROM hidden_port WHERE host_id = ANY($1)")
                .bind(&whole)
                .execute(&mut *c)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "{aggregate} FROM listener l JOIN host h ON h.id = l.host_id
                 WHERE l.host_id = ANY($1) AND l.valid_to IS NULL {GROUP}"
            )))
            .bind(&whole)
            .execute(&mut *c)
            .await?;
        }
        if !hosts.is_empty() {
            sqlx::query(
                "DELETE FROM hidden_port AS e USING UNNEST($1::bigint[], $2::int[]) AS t (host_id, port)
                 WHERE e.host_id = t.host_id AND e.port = t.port",
            )
            .bind(&hosts)
            .bind(&ports)
            .execute(&mut *c)
            .await?;
            sqlx::query(AssertSqlSafe(format!(
                "{aggregate} FROM UNNEST($1::bigint[], $2::int[]) AS t (host_id, port)
                 CROSS JOIN LATERAL (
                     SELECT * FROM listener v
                     WHERE v.host_id = t.host_id AND v.port = t.port AND v.valid_to IS NULL
                     OFFSET 0) l
                 JOIN host h ON h.id = l.host_id {GROUP}"
            )))
            .bind(&hosts)
            .bind(&ports)
            .execute(&mut *c)
            .await?;
        }
        Ok(())
    }

    async fn update_hosts(
        c: &mut PgConnection,
        updates: &[HostUpdate<'_>],
    ) -> Result<(), StoreError> {
        let n = updates.len();
        let (mut ids, mut sessions, mut committed, mut seen, mut snaps, mut deltas) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for u in updates {
            ids.push(u.host_id);
            sessions.push(u.session);
            committed.push(u.committed as i64);
            seen.push(u.last_seen);
            snaps.push(u.snapshot_at);
            deltas.push(u.live_delta);
        }
        sqlx::query(
            "UPDATE host AS h SET session_id = coalesce(u.session, h.session_id),
                 committed_seq = u.committed, last_seen = u.seen,
                 last_snapshot_at = coalesce(u.snap, h.last_snapshot_at),
                 live_listeners = h.live_listeners + u.delta
             FROM UNNEST($1::bigint[], $2::bytea[], $3::bigint[], $4::timestamptz[],
                         $5::timestamptz[], $6::bigint[]) AS u (id, session, committed, seen, snap, delta)
             WHERE h.id = u.id",
        )
        .bind(ids)
        .bind(sessions)
        .bind(committed)
        .bind(seen)
        .bind(snaps)
        .bind(deltas)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn touch(c: &mut PgConnection, seen: &[(i64, OffsetDateTime)]) -> Result<(), StoreError> {
        let mut sorted = seen.to_vec();
        sorted.sort_unstable_by_key(|(id, _)| *id);
        let (ids, times): (Vec<i64>, Vec<OffsetDateTime>) = sorted.into_iter().unzip();
        // Rows another writer holds are skipped, not waited for: that writer is storing a
        // Hello or a message of the host, which moves last_seen itself. No lock waits, so
        // heartbeats never take part in a deadlock.
        sqlx::query(
            "UPDATE host AS h SET last_seen = u.seen
             FROM UNNEST($1::bigint[], $2::timestamptz[]) AS u (id, seen)
             WHERE h.id = u.id AND h.id IN (
                 SELECT id FROM host WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED)",
        )
        .bind(ids)
        .bind(times)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn set_watch(
        c: &mut PgConnection,
        changes: &[WatchChange],
    ) -> Result<Vec<i64>, StoreError> {
        let mut ids: Vec<i64> = changes.iter().map(|w| w.host_id).collect();
        ids.sort_unstable();
        // As in `touch`: rows another writer holds are skipped, not waited for (no lock
        // waits, so no deadlock), but a mode change must not be lost as a last_seen may:
        // the skipped hosts go back to the caller for a later batch. Rows this
        // transaction locked itself (its own messages) are not skipped.
        let locked: std::collections::HashSet<i64> = sqlx::query_scalar(
            "SELECT id FROM host WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED",
        )
        .bind(&ids)
        .fetch_all(&mut *c)
        .await?
        .into_iter()
        .collect();
        let (mut id, mut epoch, mut mode, mut reason, mut at) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for w in changes.iter().filter(|w| locked.contains(&w.host_id)) {
            id.push(w.host_id);
            epoch.push(w.epoch);
            mode.push(w.watch.mode.as_str());
            reason.push(w.watch.reason.as_deref());
            at.push(w.at);
        }
        if !id.is_empty() {
            sqlx::query(
                "UPDATE host AS h SET watch_mode = u.mode, watch_reason = u.reason,
                     watch_since = u.at
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[],
                             $5::timestamptz[]) AS u (id, epoch, mode, reason, at)
                 WHERE h.id = u.id AND h.session_epoch = u.epoch
                     AND (h.watch_mode IS DISTINCT FROM u.mode
                          OR h.watch_reason IS DISTINCT FROM u.reason)",
            )
            .bind(id)
            .bind(epoch)
            .bind(mode)
            .bind(reason)
            .bind(at)
            .execute(&mut *c)
            .await?;
        }
        ids.retain(|i| !locked.contains(i));
        Ok(ids)
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
                 sockets::bigint AS sockets, effective_ipv4, effective_ipv6,
                 effective_reason_ipv4, effective_reason_ipv6, effective_conditions_ipv4,
                 effective_conditions_ipv6
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
        // `full` is a reserved word in PostgreSQL (FULL JOIN): the alias says `full_hash`.
        sqlx::query(
            "UPDATE listener AS l SET material_hash = u.material_hash, full_hash = u.full_hash
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[])
                 AS u (id, material_hash, full_hash)
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
    // A slow report is the user's to judge: no driver warnings on their terminal.
    let opts = connect_options(url)?
        .log_slow_statements(log::LevelFilter::Off, Duration::from_secs(60))
        .options([
            ("default_transaction_read_only", "on"),
            ("statement_timeout", "60s"),
        ]);
    first_connection(url, &opts).await?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size.max(1))
        .acquire_timeout(Duration::from_secs(30))
        .acquire_slow_level(log::LevelFilter::Off)
        .connect_with(opts)
        .await
        .map_err(|e| StoreError::Open {
            url: redact(url),
            detail: super::sql_message(&e),
        })?;
    // A database the collector never opened has no views: say so instead of the first
    // query's `relation "hosts" does not exist`.
    let (tables,): (bool,) = sqlx::query_as("SELECT to_regclass('hosts') IS NOT NULL")
        .fetch_one(&pool)
        .await?;
    if !tables {
        pool.close().await;
        return Err(StoreError::NoSchema { url: redact(url) });
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_and_format() {
        let mut out = Vec::new();
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789)
            .unwrap()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        copy_row(
            &mut out,
            [
                Val::Text(Some("a\tb\nc\\d\re".into())),
                Val::Text(None),
                Val::Int(-42),
                Val::Bool(Some(true)),
                Val::Bool(None),
                Val::Time(t),
            ],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\tb\\nc\\\\d\\re\t\\N\t-42\tt\t\\N\t2027-01-15 08:00:00.123456+00\n"
        );
    }
}
