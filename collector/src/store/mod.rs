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
mod row;
pub(crate) mod sqlite;

pub use flow::Message;

use std::path::PathBuf;
use std::str::FromStr;

use listenscope_core::diff::Changes;
use listenscope_core::record::ListenerRecord;
use time::OffsetDateTime;

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("database {url} does not exist; start `listenscope-collector serve --db {url}` first")]
    Missing { url: String },
    #[error("migrating the database schema failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A host as the collector knows it when a session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSession {
    pub host_id: i64,
    /// The session whose messages are committed (None: never had one).
    pub session_id: Option<Vec<u8>>,
    pub committed_seq: u64,
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

/// The writable store used by `serve`.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens (creating if needed) and migrates the database.
    pub async fn open(url: &DbUrl, opts: &StoreOptions) -> Result<Store, StoreError> {
        match url {
            DbUrl::Sqlite(path) => Ok(Store::Sqlite(sqlite::SqliteStore::open(path, opts).await?)),
            DbUrl::Postgres(url) => Ok(Store::Postgres(postgres::PgStore::open(url, opts).await?)),
        }
    }

    /// Records that `host` connected; returns its stored session.
    pub async fn hello(
        &self,
        host: &str,
        os_hostname: &str,
        agent_version: &str,
        now: OffsetDateTime,
    ) -> Result<HostSession, StoreError> {
        match self {
            Store::Sqlite(s) => s.hello(host, os_hostname, agent_version, now).await,
            Store::Postgres(s) => s.hello(host, os_hostname, agent_version, now).await,
        }
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

    /// Stores one message in one transaction (see `flow.rs`).
    pub async fn apply(
        &self,
        host_id: i64,
        session_id: &[u8],
        seq: u64,
        at: OffsetDateTime,
        message: Message,
        now: OffsetDateTime,
    ) -> Result<Applied, StoreError> {
        match self {
            Store::Sqlite(s) => flow::apply(s, host_id, session_id, seq, at, message, now).await,
            Store::Postgres(s) => flow::apply(s, host_id, session_id, seq, at, message, now).await,
        }
    }

    /// The host is alive (a scan found no change).
    pub async fn heartbeat(&self, host_id: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.heartbeat(host_id, now).await,
            Store::Postgres(s) => s.heartbeat(host_id, now).await,
        }
    }

    /// Deletes up to `batch` listener versions that ended before `cutoff` (history only:
    /// live rows have no end). Returns how many went.
    pub async fn prune_batch(&self, cutoff: OffsetDateTime, batch: i64) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.prune_batch(cutoff, batch).await,
            Store::Postgres(s) => s.prune_batch(cutoff, batch).await,
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(s) => s.close().await,
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
