//! Storage of hosts, live listeners and their full history.
//!
//! [`Store`] is an enum over the concrete backends (sqlx's `Any` driver has no arrays or
//! timestamps, so the two pools stay concrete). Each backend runs the same migrations'
//! shape (`migrations/sqlite`, `migrations/postgres`) and executes the same
//! [`plan::Plan`]s, so both answer the same SQL. Every message is one transaction, and the
//! host's committed sequence is written in that transaction: a message is either fully
//! stored and acknowledged, or not stored at all, and a retry is recognized.

mod flow;
pub(crate) mod plan;
pub(crate) mod postgres;
pub(crate) mod row;
pub(crate) mod sqlite;
pub(crate) mod sqlite_step;
mod writer;

pub use flow::Message;
pub use postgres::{CONNECT_TIMEOUT, check_postgres};

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

use listenscope_core::diff::Changes;
use listenscope_core::record::ListenerRecord;
use listenscope_core::watch::Watch;
use time::OffsetDateTime;

/// A write statement slower than this is logged by the driver, at DEBUG
/// ([`SLOW_WRITE_LEVEL`]): group commits of big bursts legitimately take seconds, and the
/// driver's line carries the whole statement (a 39-array `UNNEST`). An operator watches
/// `listenscope_commit_seconds` instead (docs/metrics.md); `LISTENSCOPE_LOG=sqlx=debug`
/// shows the statements. At WARN they reached quickstart's terminal on a busy machine.
const SLOW_WRITE: std::time::Duration = std::time::Duration::from_secs(10);
/// The level of the driver's slow-statement lines (see [`SLOW_WRITE`]).
const SLOW_WRITE_LEVEL: log::LevelFilter = log::LevelFilter::Debug;

/// Where the data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    /// `sqlite://PATH` (relative) or `sqlite:///abs/path`.
    Sqlite(PathBuf),
    /// `postgres://…` / `postgresql://…`, passed to the driver as is.
    Postgres(String),
}

impl FromStr for DbUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or("");
            if path.is_empty() {
                return Err(format!(
                    "{s:?} names no file; use sqlite://PATH, e.g. sqlite://listenscope.db"
                ));
            }
            return Ok(DbUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(DbUrl::Postgres(s.to_string()));
        }
        Err(format!(
            "unsupported database URL {s:?}: use sqlite://PATH or postgres://USER@HOST/DB"
        ))
    }
}

impl DbUrl {
    /// The full URL, password included (for passing on; use Display for logs).
    pub fn as_url(&self) -> String {
        match self {
            DbUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
            DbUrl::Postgres(url) => url.clone(),
        }
    }
}

impl std::fmt::Display for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            DbUrl::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

/// A URL with its password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Why the store failed. Each variant's message is whole (the cause and, where there is
/// one, the fix), and none exposes a `source()`: printed with anyhow's `{:#}`, a chain
/// would repeat the driver's message after ours (`database error: X: X`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {detail}")]
    Open { url: String, detail: String },
    /// The first connection to PostgreSQL failed: why, and what to do.
    #[error("cannot connect to PostgreSQL {url}: {cause}")]
    Connect { url: String, cause: ConnectCause },
    #[error(
        "cannot create the database {url}: directory {} does not exist; create it \
         (`mkdir -p {}`) or point --db elsewhere",
        dir.display(),
        dir.display()
    )]
    NoDirectory { url: String, dir: PathBuf },
    #[error("database {url} does not exist; start `listenscope-collector serve --db {url}` first")]
    Missing { url: String },
    #[error(
        "database {url} has no listenscope tables yet; start `listenscope-collector serve \
         --db {url}` first (it creates them)"
    )]
    NoSchema { url: String },
    #[error("migrating the database schema failed: {}", migrate_message(.0))]
    Migrate(sqlx::migrate::MigrateError),
    #[error("database error: {}", sql_message(.0))]
    Sql(sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is closed (the collector is shutting down)")]
    Closed,
    #[error("cannot start the database writer thread: {0}")]
    WriterThread(std::io::Error),
    /// A statement stepped on SQLite's own handle failed.
    #[error("database error: {0}")]
    Step(sqlite_step::StepError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Sql(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e)
    }
}

impl From<sqlite_step::StepError> for StoreError {
    fn from(e: sqlite_step::StepError) -> Self {
        StoreError::Step(e)
    }
}

/// A driver error's message once: the database's own words (with its SQLSTATE) rather
/// than sqlx's "error returned from database: …" wrapper.
pub(crate) fn sql_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => match d.code() {
            Some(code) => format!("{} (SQLSTATE {code})", d.message()),
            None => d.message().to_string(),
        },
        sqlx::Error::Configuration(c) => c.to_string(),
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Tls(t) => format!("TLS: {t}"),
        other => other.to_string(),
    }
}

fn migrate_message(e: &sqlx::migrate::MigrateError) -> String {
    let (sql, version) = match e {
        sqlx::migrate::MigrateError::Execute(sql) => (sql, None),
        sqlx::migrate::MigrateError::ExecuteMigration(sql, version) => (sql, Some(*version)),
        other => return other.to_string(),
    };
    let mut out = match version {
        Some(v) => format!("migration {v}: {}", sql_message(sql)),
        None => sql_message(sql),
    };
    if let sqlx::Error::Database(d) = sql
        && d.code().as_deref() == Some("42501")
    {
        // insufficient_privilege: the collector creates its tables at start-up.
        out.push_str(
            "; the collector's user must be able to create tables: make it the database's \
             owner (`createdb -O USER NAME`, or ALTER DATABASE NAME OWNER TO USER) or \
             GRANT CREATE ON SCHEMA public TO USER",
        );
    }
    out
}

/// Why the first connection to PostgreSQL failed, with the fix. Found within
/// [`postgres::CONNECT_TIMEOUT`] at start-up instead of after the pool's 30 s acquire
/// timeout ("pool timed out" named no cause).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectCause {
    #[error(
        "connection refused at {at}: nothing listens there. Is PostgreSQL running, and are \
         the host and port in the URL right?"
    )]
    Refused { at: String },
    #[error("cannot resolve the host name {host:?} ({detail}); check the host in the URL")]
    Dns { host: String, detail: String },
    #[error(
        "no answer from {at} within {secs} s; check the host and port in the URL, and that \
         no firewall drops the connection"
    )]
    Timeout { at: String, secs: u64 },
    #[error(
        "authentication failed for user {user:?} ({detail}); check the user and password in \
         the URL, and the server's pg_hba.conf"
    )]
    Auth { user: String, detail: String },
    #[error(
        "database {name:?} does not exist; create it (`createdb {name}`, or CREATE DATABASE \
         \"{name}\"), or fix the database name in the URL"
    )]
    NoDatabase { name: String },
    #[error("TLS to the server failed ({detail}); check sslmode and sslrootcert in the URL")]
    Tls { detail: String },
    #[error("{detail}")]
    Other { detail: String },
}

impl StoreError {
    /// The data, not the database, is at fault: a constraint refused it (retrying the
    /// same message would fail forever).
    pub fn is_constraint(&self) -> bool {
        use sqlx::error::ErrorKind;
        match self {
            StoreError::Sql(sqlx::Error::Database(d)) => matches!(
                d.kind(),
                ErrorKind::UniqueViolation
                    | ErrorKind::ForeignKeyViolation
                    | ErrorKind::NotNullViolation
                    | ErrorKind::CheckViolation
            ),
            StoreError::Step(e) => e.primary_code() == Some(libsqlite3_sys::SQLITE_CONSTRAINT),
            _ => false,
        }
    }
}

/// What a Hello says about the agent, stored on its host row.
#[derive(Debug, Clone, Copy)]
pub struct AgentHello<'a> {
    /// The host's own idea of its name (information only).
    pub os_hostname: &'a str,
    pub agent_version: &'a str,
    /// The agent installation (None: an agent without one).
    pub instance_id: Option<[u8; 16]>,
    /// How the agent learns of listens and closes (None: an agent older than the field,
    /// stored as NULL).
    pub watch: Option<&'a Watch>,
}

/// A host as the collector knows it when a session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSession {
    pub host_id: i64,
    /// The session whose messages are committed (None: never had one).
    pub session_id: Option<Vec<u8>>,
    pub committed_seq: u64,
    /// This connection's epoch: only it may write for the host until the next Hello.
    pub epoch: i64,
    /// Set when the Hello was refused, nothing written: another agent installation holds
    /// the host through another collector sharing the database, and was heard from within
    /// `stale_after` (docs/protocol.md, "One host, one agent").
    pub held_elsewhere: Option<HeldElsewhere>,
}

/// Who holds a host whose Hello was refused ([`HostSession::held_elsewhere`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldElsewhere {
    pub instance_id: Option<Vec<u8>>,
    pub collector: Option<String>,
    /// When the holder was last heard from, as stored.
    pub last_seen: String,
}

/// The outcome of storing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Stored; `rows` listener rows written.
    Committed { rows: usize },
    /// Already stored earlier (a retry): acknowledge `committed` again.
    Duplicate { committed: u64 },
    /// Not the next sequence of the stored session: the agent must resync.
    Gap { committed: u64 },
    /// Another session of this host has taken over.
    Superseded,
    /// A newer connection of this host (to this or another collector sharing the
    /// database) was accepted since this one: this connection may no longer write.
    TakenOver,
}

/// Sizing and tunables.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A host silent for longer than this is `stale` in the `hosts` view.
    pub stale_after_secs: u64,
    /// Connections in the read pool (PostgreSQL also sizes its write pool from it).
    pub pool_size: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            stale_after_secs: 300,
            pool_size: 4,
        }
    }
}

/// The writable store used by `serve`: a database and its group committer.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    writer: writer::Writer,
}

#[derive(Debug, Clone)]
enum Db {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens (creating if needed) and migrates the database, and starts the writers.
    pub async fn open(url: &DbUrl, opts: &StoreOptions) -> Result<Store, StoreError> {
        Ok(match url {
            DbUrl::Sqlite(path) => {
                let s = sqlite::SqliteStore::open(path, opts).await?;
                Store {
                    writer: writer::Writer::start(s.clone(), 1, writer::Place::OwnThread)?,
                    db: Db::Sqlite(s),
                }
            }
            DbUrl::Postgres(url) => {
                let s = postgres::PgStore::open(url, opts).await?;
                Store {
                    writer: writer::Writer::start(
                        s.clone(),
                        postgres::writers(opts.pool_size),
                        writer::Place::Shared,
                    )?,
                    db: Db::Postgres(s),
                }
            }
        })
    }

    /// Records that `host` connected; returns its stored session and this connection's
    /// epoch (the Hello is stored with the next group commit).
    pub async fn hello(
        &self,
        host: &str,
        os_hostname: &str,
        agent_version: &str,
        now: OffsetDateTime,
    ) -> Result<HostSession, StoreError> {
        let agent = AgentHello {
            os_hostname,
            agent_version,
            instance_id: None,
            watch: None,
        };
        self.hello_at(host, agent, now, None).await
    }

    /// [`Store::hello`] with everything the Hello says about the agent, naming the
    /// collector instance that accepts the session.
    pub async fn hello_at(
        &self,
        host: &str,
        agent: AgentHello<'_>,
        now: OffsetDateTime,
        collector: Option<&str>,
    ) -> Result<HostSession, StoreError> {
        self.writer
            .hello(flow::HelloWork {
                instance_id: agent.instance_id,
                host: host.to_string(),
                os_hostname: agent.os_hostname.to_string(),
                agent_version: agent.agent_version.to_string(),
                now,
                collector: collector.map(str::to_string),
                watch: agent.watch.map(flow::WatchText::from),
            })
            .await
    }

    /// Replaces the host's live listeners with a snapshot.
    pub async fn apply_snapshot(
        &self,
        host_id: i64,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        records: Vec<ListenerRecord>,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        self.apply(
            host_id,
            session_id,
            seq,
            at,
            Message::Snapshot(records),
            now,
        )
        .await
    }

    /// Applies one delta if it is the next sequence of the stored session.
    pub async fn apply_delta(
        &self,
        host_id: i64,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        changes: Changes,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        self.apply(host_id, session_id, seq, at, Message::Delta(changes), now)
            .await
    }

    /// Stores one message (see `flow.rs`) without the connection fence: for tools that
    /// own the database alone.
    pub async fn apply(
        &self,
        host_id: i64,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        message: Message,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        let work = flow::Work::new(host_id, None, session_id, seq, at, message, now);
        self.writer.apply(work).await
    }

    /// Stores one message of the connection that holds `host` (its [`HostSession`]): a
    /// message from a connection a newer Hello replaced is refused
    /// ([`Applied::TakenOver`]). Keys and fingerprints are computed here, on the
    /// caller's task, before the message is queued.
    pub async fn apply_as(
        &self,
        host: &HostSession,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        message: Message,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        let work = flow::Work::new(
            host.host_id,
            Some(host.epoch),
            session_id,
            seq,
            at,
            message,
            now,
        );
        self.writer.apply(work).await
    }

    /// The host is alive (a scan found no change): `last_seen` is written with the next
    /// group commit, at most a second later.
    pub fn heartbeat(&self, host_id: i64, now: OffsetDateTime) {
        self.writer.seen(host_id, now);
    }

    /// A heartbeat of the connection that holds `host` reported another watch mode:
    /// written with the next group commit (at most a second later), unless a newer
    /// connection of the host was accepted since. Call it only for a change: heartbeats
    /// that repeat the mode must cost nothing.
    pub fn watch_changed(&self, host: &HostSession, watch: &Watch, now: OffsetDateTime) {
        self.writer.watch(flow::WatchChange {
            host_id: host.host_id,
            epoch: host.epoch,
            watch: watch.into(),
            at: now,
        });
    }

    /// The epochs of the given hosts now (a collector sharing the database may have
    /// accepted a newer connection of some of them).
    pub async fn epochs(&self, host_ids: &[i64]) -> Result<HashMap<i64, i64>, StoreError> {
        match &self.db {
            Db::Sqlite(s) => s.epochs(host_ids).await,
            Db::Postgres(s) => s.epochs(host_ids).await,
        }
    }

    /// Records on `host` that `refused` connections of a second agent with the same
    /// certificate were refused, the last at `at` from `peer` (`hosts`: duplicate
    /// refusals). Outside the group commit: rare, and rate-limited by the caller.
    pub async fn duplicate_refused(
        &self,
        host: &str,
        refused: u64,
        at: OffsetDateTime,
        peer: &str,
    ) -> Result<(), StoreError> {
        let refused = i64::try_from(refused).unwrap_or(i64::MAX);
        match &self.db {
            Db::Sqlite(s) => s.duplicate_refused(host, refused, at, peer).await,
            Db::Postgres(s) => s.duplicate_refused(host, refused, at, peer).await,
        }
    }

    /// Whether several collector processes may share this database (PostgreSQL).
    pub fn shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// Deletes up to `batch` listener versions that ended before `cutoff` (history only:
    /// live rows have no end). Returns how many went.
    pub async fn prune_batch(&self, cutoff: OffsetDateTime, batch: i64) -> Result<u64, StoreError> {
        match &self.db {
            Db::Sqlite(s) => s.prune_batch(cutoff, batch).await,
            Db::Postgres(s) => s.prune_batch(cutoff, batch).await,
        }
    }

    /// Stores what is queued, then closes the database.
    pub async fn close(&self) {
        self.writer.close().await;
        match &self.db {
            Db::Sqlite(s) => s.close().await,
            Db::Postgres(s) => s.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!("sqlite://x.db".parse(), Ok(DbUrl::Sqlite("x.db".into())));
        assert_eq!(
            "sqlite:///var/lib/x.db".parse(),
            Ok(DbUrl::Sqlite("/var/lib/x.db".into()))
        );
        assert_eq!("sqlite:x.db".parse(), Ok(DbUrl::Sqlite("x.db".into())));
        assert!(
            "sqlite://"
                .parse::<DbUrl>()
                .unwrap_err()
                .contains("names no file")
        );
        assert!(matches!(
            "postgres://u:p@h/db".parse(),
            Ok(DbUrl::Postgres(_))
        ));
        assert!(
            "mysql://x"
                .parse::<DbUrl>()
                .unwrap_err()
                .contains("sqlite://PATH or postgres://")
        );
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
