//! Answers for SRE teams: arbitrary SQL on a read-only connection, and the ready reports
//! (`exposure`, `hosts`), rendered as a table, JSON or CSV.
//!
//! Read-only is enforced by the database, not by parsing SQL: SQLite connections are
//! opened read-only with `PRAGMA query_only`, an authorizer refuses ATTACH, DETACH,
//! pragmas that set and functions that reach outside the database while the statement
//! is prepared, and a statement SQLite does not judge read-only
//! (`sqlite3_stmt_readonly`) is refused before it runs; PostgreSQL runs every statement
//! in a read-only transaction, and `query` refuses a role that could write or is a
//! superuser ([`ReadOnly::privileges`]) unless told otherwise. A refused statement is
//! reported with what to do instead. Every statement has a deadline (default 60 s,
//! `query --timeout`), and a result is capped in rows and in the memory it takes
//! ([`Bounds`]): reading stops at the first row past either cap, and the statement fails.
//!
//! Values come out the same on both databases: SQLite's 0/1 in the schema's boolean
//! columns become booleans, its JSON text (`process_details`) a nested value, as
//! PostgreSQL's native types give them.

use std::borrow::Cow;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use serde_json::{Map, Value};
use sqlx::{
    AssertSqlSafe, Column, Executor as _, Row, SqlSafeStr as _, Statement as _, TypeInfo, ValueRef,
};
use unicode_width::UnicodeWidthStr as _;

use listenscope_core::domain::Effective;

use crate::history::Report;
use crate::store::row;
use crate::store::sqlite_step::{self, Bind, StepError};
use crate::store::{DbUrl, StoreError, postgres, sqlite};

/// Most rows one answer carries; bigger results are an error asking for LIMIT.
pub const MAX_ROWS: usize = 1_000_000;

/// How long one statement may run unless told otherwise (`query --timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Most memory one `query` result may take unless told otherwise (`query --max-bytes`):
/// each value's text plus [`CELL_OVERHEAD`] per value.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// What each value of a result costs in memory beyond its text (counted against
/// `--max-bytes`, so a million rows of small values are bounded too).
pub const CELL_OVERHEAD: u64 = std::mem::size_of::<Value>() as u64;

/// What one statement may take: time, rows, memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub timeout: Duration,
    pub max_rows: usize,
    /// Bytes the result takes in memory: each value's text (a blob as hex) plus
    /// [`CELL_OVERHEAD`].
    pub max_bytes: u64,
}

impl Default for Bounds {
    /// `query`'s defaults: 60 s, [`MAX_ROWS`] rows, [`DEFAULT_MAX_BYTES`].
    fn default() -> Bounds {
        Bounds {
            timeout: DEFAULT_TIMEOUT,
            max_rows: MAX_ROWS,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// The reports' bounds: their SQL is ours and `--limit` bounds their rows; only the row
/// count is capped, as it always was ([`QueryError::TooManyRows`]).
const REPORT_BOUNDS: Bounds = Bounds {
    timeout: DEFAULT_TIMEOUT,
    max_rows: MAX_ROWS,
    max_bytes: u64::MAX,
};

/// The views `query` answers over (docs/views.md), named in `query --help` and in the
/// refusal of a write: the one list.
pub const VIEWS: &str = "current_listeners, effective_exposure, hidden_ipv4_exposure, hosts, \
     listener_changes, listener_history, listener_versions";

/// Columns of the schema that are boolean (PostgreSQL `boolean`, SQLite 0/1), by table.
const BOOLEAN_COLUMNS: &[(&str, &str)] = &[
    ("listener", "v6only"),
    ("listener", "latent"),
    ("listener", "trap"),
    ("listener", "hidden_ipv4_exposure"),
    ("listener", "freebind"),
    ("listener", "transparent"),
];
/// Columns of the schema that hold JSON (PostgreSQL `jsonb`, SQLite text).
const JSON_COLUMNS: &[(&str, &str)] = &[("listener", "processes")];
/// View columns that are boolean expressions rather than table columns (SQLite gives no
/// origin for them), by name.
const BOOLEAN_EXPRESSIONS: &[&str] = &["stale"];

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "refused: this connection is read-only ({0}). `query` answers SELECTs over the views \
         ({VIEWS}); the collector alone writes"
    )]
    WriteRefused(String),
    #[error("SQL error: {0}")]
    Sql(String),
    /// Writing the streamed result failed.
    #[error("cannot write the result: {0}")]
    Output(String),
    /// The reader of the streamed result went away (a closed pipe, `| head`).
    #[error("the reader of the result went away")]
    OutputClosed,
    #[error("the result has more than {MAX_ROWS} rows; add a LIMIT or a WHERE")]
    TooManyRows,
    #[error(
        "the result has more than {0} rows and was stopped there; add a LIMIT or a WHERE, \
         or raise --max-rows"
    )]
    RowsOver(usize),
    #[error(
        "the result takes more than {} of memory (one value, or all rows together) and was \
         stopped there; select fewer or shorter columns, add a LIMIT or a WHERE, or raise \
         --max-bytes",
        format_bytes(*.0)
    )]
    BytesOver(u64),
    #[error(
        "refused: the PostgreSQL role {role} {can}. `query` runs any SQL it is given, so \
         connect as a role that may only SELECT on the views (the read-only role of \
         docs/postgres.md), or pass --allow-privileged-role to run as {role} anyway"
    )]
    PrivilegedRole { role: String, can: String },
    #[error("no SQL statement given (the text is empty or only comments)")]
    Empty,
    #[error(
        "more than one SQL statement given; `query` runs one at a time: split the text at \
         its `;` and run each"
    )]
    Several,
    #[error(
        "more than {0} listener changes in this window (a fleet's first snapshots, or a \
         restored database?); narrow it: a later since, an earlier until, one host or one port"
    )]
    WindowTooBig(usize),
    #[error(
        "the statement ran longer than {} and was stopped; narrow it (WHERE, LIMIT), or \
         give `query` more time with --timeout (e.g. 5m)",
        listenscope_core::config::format_duration(*.0)
    )]
    Timeout(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `N` bytes as people write them: `256MiB`, `1GiB`, `1500B` (whole units when exact).
pub fn format_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    format!("{n}B")
}

/// Parses a byte size: a number with an optional unit `B`, `KiB`, `MiB`, `GiB` (or `K`,
/// `M`, `G`, binary too), e.g. `256MiB`; at least 1 KiB.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let not_a_size = || {
        format!(
            "{text:?} is not a size: write a number of bytes with an optional unit (KiB, \
             MiB, GiB), e.g. 256MiB"
        )
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(not_a_size()),
    };
    let n = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(not_a_size)?;
    if n < 1 << 10 {
        return Err(format!("{text:?} is too small: at least 1KiB"));
    }
    Ok(n)
}

/// A read-only database handle.
#[derive(Debug, Clone)]
pub enum ReadOnly {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// SQL dialect of a handle, for the few statements written per database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A parameter for the prepared report queries.
#[derive(Debug, Clone)]
pub enum Param {
    Int(Option<i64>),
    Text(Option<String>),
    /// A time: text in SQLite's format there, timestamptz on PostgreSQL.
    Time(time::OffsetDateTime),
}

/// Column names and rows of JSON values (integers, reals, text, null; blobs as hex text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl ResultSet {
    /// The rows decoded into `T` by column name (see [`FromRow`]).
    pub fn decode<T: FromRow>(&self) -> Result<Vec<T>, QueryError> {
        self.named().map(|r| T::from_row(&r)).collect()
    }

    /// The rows, each read by column name: for reports that decode only some rows fully.
    pub fn named(&self) -> impl Iterator<Item = Named<'_>> {
        self.rows.iter().map(|values| Named {
            columns: &self.columns,
            values,
        })
    }
}

/// One row of a [`ResultSet`], read by column name with the type the caller expects:
/// the report code never depends on column positions.
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl Named<'_> {
    fn get(&self, name: &str) -> Result<&Value, QueryError> {
        self.columns
            .iter()
            .position(|c| c == name)
            .and_then(|i| self.values.get(i))
            .ok_or_else(|| QueryError::Sql(format!("the result has no column {name:?}")))
    }

    fn wrong(name: &str, want: &str, v: &Value) -> QueryError {
        QueryError::Sql(format!("column {name:?}: expected {want}, got {v}"))
    }

    /// Text, borrowed from the row (no copy: reports decode tens of thousands of rows);
    /// NULL reads as "".
    pub fn str(&self, name: &str) -> Result<&str, QueryError> {
        match self.get(name)? {
            Value::String(s) => Ok(s),
            Value::Null => Ok(""),
            v => Err(Self::wrong(name, "text", v)),
        }
    }

    /// Text; NULL reads as "".
    pub fn text(&self, name: &str) -> Result<String, QueryError> {
        match self.get(name)? {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            v => Err(Self::wrong(name, "text", v)),
        }
    }

    /// The value as it is (times stay in the display format).
    pub fn value(&self, name: &str) -> Result<Value, QueryError> {
        self.get(name).cloned()
    }

    pub fn int(&self, name: &str) -> Result<i64, QueryError> {
        let v = self.get(name)?;
        v.as_i64().ok_or_else(|| Self::wrong(name, "an integer", v))
    }

    /// A boolean: `true`/`false` on PostgreSQL, 0/1 on SQLite.
    pub fn boolean(&self, name: &str) -> Result<bool, QueryError> {
        match self.get(name)? {
            Value::Bool(b) => Ok(*b),
            Value::Number(n) if n.as_i64() == Some(0) => Ok(false),
            Value::Number(n) if n.as_i64() == Some(1) => Ok(true),
            v => Err(Self::wrong(name, "a boolean", v)),
        }
    }
}

/// A typed report row, decoded from a [`Named`] row.
pub trait FromRow: Sized {
    fn from_row(row: &Named<'_>) -> Result<Self, QueryError>;
}

impl ReadOnly {
    pub async fn open(url: &DbUrl) -> Result<ReadOnly, StoreError> {
        match url {
            DbUrl::Sqlite(path) => {
                let pool = sqlite::open_read_only(path).await?;
                // A file the collector never opened (empty, or another program's) has no
                // views: say so instead of the first query's `no such table: hosts`, as
                // PostgreSQL's open does.
                let views: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'view' AND name = 'hosts'",
                )
                .fetch_one(&pool)
                .await?;
                if views == 0 {
                    pool.close().await;
                    return Err(StoreError::NoSchema {
                        url: url.to_string(),
                    });
                }
                Ok(ReadOnly::Sqlite(pool))
            }
            DbUrl::Postgres(url) => Ok(ReadOnly::Postgres(postgres::open_read_only(url, 2).await?)),
        }
    }

    /// What the role of this handle can do beyond reading, for `query`: its name and
    /// every such power, in words (none for SQLite, and for a role that may only read).
    /// Superuser, membership of the roles that read and write server files or run
    /// programs, a write privilege on a table of the schema the views are in, CREATE on
    /// that schema or on the database.
    pub async fn privileges(&self) -> Result<Option<(String, Vec<String>)>, QueryError> {
        let ReadOnly::Postgres(pool) = self else {
            return Ok(None);
        };
        type Powers = (
            String,
            bool,
            Vec<String>,
            Vec<String>,
            Option<String>,
            bool,
            String,
            bool,
        );
        let (role, superuser, members, tables, schema, create_schema, database, create_db): Powers =
            sqlx::query_as(
                "WITH s AS (SELECT c.relnamespace AS oid FROM pg_class c \
                            WHERE c.oid = to_regclass('hosts')) \
                 SELECT current_user::text, \
                   coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false), \
                   ARRAY(SELECT g FROM unnest(ARRAY['pg_execute_server_program', \
                           'pg_write_server_files', 'pg_read_server_files']) AS g \
                         WHERE pg_has_role(current_user, g, 'MEMBER') ORDER BY g), \
                   ARRAY(SELECT c.relname::text FROM pg_class c, s \
                         WHERE c.relnamespace = s.oid AND c.relkind IN ('r', 'p') \
                           AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') \
                         ORDER BY 1), \
                   (SELECT nspname::text FROM pg_namespace n, s WHERE n.oid = s.oid), \
                   coalesce((SELECT has_schema_privilege(s.oid, 'CREATE') FROM s), false), \
                   current_database()::text, \
                   has_database_privilege(current_database(), 'CREATE')",
            )
            .fetch_one(pool)
            .await
            .map_err(sql_error)?;
        if superuser {
            // Everything else follows; one reason is enough.
            let what = "is a superuser (it may read and write server files and run programs)";
            return Ok(Some((role, vec![what.to_string()])));
        }
        let mut can = Vec::new();
        for m in members {
            can.push(format!("is a member of {m}"));
        }
        if !tables.is_empty() {
            can.push(format!(
                "may INSERT, UPDATE, DELETE or TRUNCATE {} {}",
                if tables.len() == 1 { "table" } else { "tables" },
                tables.join(", ")
            ));
        }
        if create_schema {
            can.push(format!(
                "may CREATE in schema {}",
                schema.as_deref().unwrap_or("public")
            ));
        }
        if create_db {
            can.push(format!("may CREATE schemas in database {database}"));
        }
        Ok(Some((role, can)))
    }

    pub async fn close(&self) {
        match self {
            ReadOnly::Sqlite(p) => p.close().await,
            ReadOnly::Postgres(p) => p.close().await,
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            ReadOnly::Sqlite(_) => Dialect::Sqlite,
            ReadOnly::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Picks the statement written for this handle's database.
    pub fn pick<'a>(&self, sqlite: &'a str, postgres: &'a str) -> &'a str {
        match self.dialect() {
            Dialect::Sqlite => sqlite,
            Dialect::Postgres => postgres,
        }
    }

    /// Runs `sql` with `params` bound in order, for at most [`DEFAULT_TIMEOUT`] and
    /// [`MAX_ROWS`] rows (the reports: [`QueryError::TooManyRows`] past it).
    pub async fn run(&self, sql: &str, params: &[Param]) -> Result<ResultSet, QueryError> {
        match self.run_bounded(sql, params, REPORT_BOUNDS).await {
            Err(QueryError::RowsOver(_)) => Err(QueryError::TooManyRows),
            other => other,
        }
    }

    /// Runs `sql` with `params` bound in order within `bounds`: a statement still
    /// running after the timeout is stopped ([`QueryError::Timeout`]); reading stops at
    /// the first row past `max_rows` ([`QueryError::RowsOver`]) or `max_bytes`
    /// ([`QueryError::BytesOver`]).
    pub async fn run_bounded(
        &self,
        sql: &str,
        params: &[Param],
        bounds: Bounds,
    ) -> Result<ResultSet, QueryError> {
        let mut out = ResultSet::default();
        self.run_each(sql, params, bounds, &mut out).await?;
        Ok(out)
    }

    /// [`ReadOnly::run_bounded`] writing the rows to `sink` as they are read (CSV or
    /// JSON: memory stays one row whatever `bounds` allows). On an error past the first
    /// row the output is incomplete: the JSON is left unclosed, so no parser takes it
    /// for a whole answer, and the caller exits non-zero.
    pub async fn run_streaming(
        &self,
        sql: &str,
        bounds: Bounds,
        sink: &mut (dyn RowSink + Send),
    ) -> Result<(), QueryError> {
        self.run_each(sql, &[], bounds, &mut Streamed(&mut *sink))
            .await?;
        sink.finish().map_err(output_error)
    }

    /// The engine under both: `head` gets the column names once (also for no rows),
    /// then `each` every row, in order, within `bounds`.
    async fn run_each(
        &self,
        sql: &str,
        params: &[Param],
        bounds: Bounds,
        rows: &mut (dyn Consumer + Send),
    ) -> Result<(), QueryError> {
        let timeout = bounds.timeout;
        let timed_out = |e: QueryError| match e {
            QueryError::Timeout(_) => QueryError::Timeout(timeout),
            QueryError::RowsOver(_) => QueryError::RowsOver(bounds.max_rows),
            QueryError::BytesOver(_) => QueryError::BytesOver(bounds.max_bytes),
            e => e,
        };
        match self {
            ReadOnly::Sqlite(pool) => {
                // Stepped on this thread, on the connection's own handle (see
                // `store::sqlite_step`): no per-row hand-off from sqlx's worker thread.
                let times: Vec<String> = params
                    .iter()
                    .filter_map(|p| match p {
                        Param::Time(t) => Some(crate::timefmt::format(*t)),
                        _ => None,
                    })
                    .collect();
                let mut times = times.iter();
                let binds: Vec<Bind<'_>> = params
                    .iter()
                    .map(|p| match p {
                        Param::Int(v) => Bind::Int(*v),
                        Param::Text(v) => Bind::Text(v.as_deref()),
                        Param::Time(_) => Bind::Text(times.next().map(String::as_str)),
                    })
                    .collect();
                let mut conn = pool.acquire().await.map_err(sql_error)?;
                let mut handle = conn.lock_handle().await.map_err(sql_error)?;
                let deadline = Instant::now().checked_add(timeout);
                let caps = sqlite_step::Caps {
                    rows: bounds.max_rows,
                    bytes: bounds.max_bytes,
                };
                // Both callbacks reach the consumer; what it said when it stopped the
                // stepping is kept for the caller.
                let state = std::cell::RefCell::new((rows, None::<Typer>, None::<QueryError>));
                let stepped = sqlite_step::run_each(
                    &mut handle,
                    sql,
                    &binds,
                    caps,
                    deadline,
                    &mut |columns, origins| {
                        let (rows, typer, failed) = &mut *state.borrow_mut();
                        *typer = Some(Typer::new(columns, origins));
                        if let Err(e) = rows.head(columns) {
                            *failed = Some(e);
                        }
                    },
                    &mut |mut row| {
                        let (rows, typer, failed) = &mut *state.borrow_mut();
                        if failed.is_some() {
                            return false;
                        }
                        if let Some(t) = typer {
                            t.apply(&mut row);
                        }
                        match rows.row(row) {
                            Ok(()) => true,
                            Err(e) => {
                                *failed = Some(e);
                                false
                            }
                        }
                    },
                );
                let failed = state.into_inner().2;
                match (stepped, failed) {
                    (_, Some(e)) => Err(e),
                    (Err(e), None) => Err(timed_out(step_error(e))),
                    (Ok(()), None) => Ok(()),
                }
            }
            ReadOnly::Postgres(pool) => {
                // The connection defaults to read-only transactions; say it again here so a
                // session setting changed by an earlier statement cannot matter.
                let mut tx = pool.begin().await.map_err(sql_error)?;
                sqlx::query("SET TRANSACTION READ ONLY")
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
                // Whole milliseconds, at least 1 (0 would mean no limit), within int4.
                let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
                sqlx::query(AssertSqlSafe(format!("SET LOCAL statement_timeout = {ms}")))
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
                // A read-only transaction still lets a superuser's `COPY … TO 'file'` (or
                // `TO PROGRAM`) through: it writes no table. Statements without parameters
                // (the user's SQL; the reports' always have some) are described first and
                // refused unless they return rows, before they run.
                let described = if params.is_empty() {
                    let columns = pg_columns(&mut tx, sql).await.map_err(timed_out)?;
                    if columns.is_empty() {
                        return Err(QueryError::WriteRefused(
                            "the statement returns no rows: only questions (SELECT, VALUES, \
                             TABLE, SHOW, EXPLAIN) run here, not COPY, SET, DO or CALL"
                                .into(),
                        ));
                    }
                    Some(columns)
                } else {
                    None
                };
                let mut q = sqlx::query(AssertSqlSafe(sql.to_string()));
                for p in params {
                    q = match p {
                        Param::Int(v) => q.bind(*v),
                        Param::Text(v) => q.bind(v.clone()),
                        Param::Time(t) => q.bind(*t),
                    };
                }
                let mut read: usize = 0;
                let mut held: u64 = 0;
                let mut headed = false;
                {
                    let mut fetched = q.fetch(&mut *tx);
                    while let Some(row) = fetched
                        .try_next()
                        .await
                        .map_err(sql_error)
                        .map_err(timed_out)?
                    {
                        if !headed {
                            let names: Vec<String> =
                                row.columns().iter().map(|c| c.name().to_string()).collect();
                            rows.head(&names)?;
                            headed = true;
                        }
                        if read == bounds.max_rows {
                            return Err(QueryError::RowsOver(bounds.max_rows));
                        }
                        // Counted from the row as received, before any value is copied
                        // out of it. (The driver holds one row whole: a single value is
                        // bounded by PostgreSQL's own 1 GB, not by this cap.)
                        held = held.saturating_add(pg_row_bytes(&row)?);
                        if held > bounds.max_bytes {
                            return Err(QueryError::BytesOver(bounds.max_bytes));
                        }
                        read += 1;
                        rows.row(pg_row(&row)?)?;
                    }
                }
                if !headed {
                    // No row to read the names from: the statement's description has them
                    // (a CSV header and a table header for zero rows, as on SQLite).
                    let names = match described {
                        Some(columns) => columns,
                        None => pg_columns(&mut tx, sql).await?,
                    };
                    rows.head(&names)?;
                }
                tx.rollback().await.map_err(sql_error)?;
                Ok(())
            }
        }
    }
}

/// What [`ReadOnly::run_each`] hands the rows to.
trait Consumer {
    fn head(&mut self, columns: &[String]) -> Result<(), QueryError>;
    fn row(&mut self, row: Vec<Value>) -> Result<(), QueryError>;
}

/// Kept whole ([`ReadOnly::run_bounded`]).
impl Consumer for ResultSet {
    fn head(&mut self, columns: &[String]) -> Result<(), QueryError> {
        self.columns = columns.to_vec();
        Ok(())
    }

    fn row(&mut self, row: Vec<Value>) -> Result<(), QueryError> {
        self.rows.push(row);
        Ok(())
    }
}

/// Written as read ([`ReadOnly::run_streaming`]).
struct Streamed<'a>(&'a mut (dyn RowSink + Send));

impl Consumer for Streamed<'_> {
    fn head(&mut self, columns: &[String]) -> Result<(), QueryError> {
        self.0.head(columns).map_err(output_error)
    }

    fn row(&mut self, row: Vec<Value>) -> Result<(), QueryError> {
        self.0.row(&row).map_err(output_error)
    }
}

fn output_error(e: io::Error) -> QueryError {
    match e.kind() {
        io::ErrorKind::BrokenPipe => QueryError::OutputClosed,
        _ => QueryError::Output(e.to_string()),
    }
}

/// Where [`ReadOnly::run_streaming`] writes: the column names once, then each row.
pub trait RowSink {
    fn head(&mut self, columns: &[String]) -> io::Result<()>;
    fn row(&mut self, row: &[Value]) -> io::Result<()>;
    /// After the last row (not called when the query fails).
    fn finish(&mut self) -> io::Result<()>;
}

/// CSV as [`write_csv`] writes it, a line at a time.
#[allow(
    missing_debug_implementations,
    reason = "a writer, no state worth printing"
)]
pub struct CsvSink<W> {
    pub out: W,
    pub header: bool,
}

impl<W: Write> RowSink for CsvSink<W> {
    fn head(&mut self, columns: &[String]) -> io::Result<()> {
        if self.header {
            let names: Vec<Cow<'_, str>> =
                columns.iter().map(|c| Cow::Borrowed(c.as_str())).collect();
            writeln!(self.out, "{}", csv_line(&names))?;
        }
        Ok(())
    }

    fn row(&mut self, row: &[Value]) -> io::Result<()> {
        let cells: Vec<Cow<'_, str>> = row.iter().map(|v| printable_cell(v, &BREAKS)).collect();
        writeln!(self.out, "{}", csv_line(&cells))
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// JSON as [`write_json`] writes it, an object at a time.
#[allow(
    missing_debug_implementations,
    reason = "a writer, no state worth printing"
)]
pub struct JsonSink<W> {
    out: W,
    columns: Vec<String>,
    rows: usize,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> JsonSink<W> {
        JsonSink {
            out,
            columns: Vec::new(),
            rows: 0,
        }
    }
}

impl<W: Write> RowSink for JsonSink<W> {
    fn head(&mut self, columns: &[String]) -> io::Result<()> {
        self.columns = columns.to_vec();
        self.out.write_all(b"[")
    }

    fn row(&mut self, row: &[Value]) -> io::Result<()> {
        if self.rows > 0 {
            self.out.write_all(b",")?;
        }
        self.rows += 1;
        json_object(&self.columns, row, &mut self.out)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.write_all(b"]\n")?;
        self.out.flush()
    }
}

/// The names of the columns `sql` returns, from PostgreSQL's description of it (nothing
/// runs).
async fn pg_columns(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sql: &str,
) -> Result<Vec<String>, QueryError> {
    let stmt = (&mut **tx)
        .prepare(AssertSqlSafe(sql.to_string()).into_sql_str())
        .await
        .map_err(sql_error)?;
    Ok(stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect())
}

/// SQLite's values as PostgreSQL's types give them: 0/1 in a boolean column of the schema
/// (found through the column's origin, views included) as a boolean, JSON text in a JSON
/// column as the nested value. Anything else is left as it is, so a count or an
/// expression stays a number. What each column becomes is found once, from the
/// statement; each row is then converted as it is read.
struct Typer {
    kinds: Option<Vec<Kind>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Bool,
    Json,
}

impl Typer {
    fn new(columns: &[String], origins: &[sqlite_step::Origin]) -> Typer {
        let kinds: Vec<Kind> = columns
            .iter()
            .zip(origins)
            .map(|(name, origin)| match origin {
                Some((t, c)) if BOOLEAN_COLUMNS.contains(&(t.as_str(), c.as_str())) => Kind::Bool,
                Some((t, c)) if JSON_COLUMNS.contains(&(t.as_str(), c.as_str())) => Kind::Json,
                None if BOOLEAN_EXPRESSIONS.contains(&name.as_str()) => Kind::Bool,
                _ => Kind::Plain,
            })
            .collect();
        Typer {
            kinds: (!kinds.iter().all(|k| *k == Kind::Plain)).then_some(kinds),
        }
    }

    fn apply(&self, row: &mut [Value]) {
        let Some(kinds) = &self.kinds else { return };
        for (v, kind) in row.iter_mut().zip(kinds) {
            match (kind, &*v) {
                (Kind::Bool, Value::Number(n)) if n.as_i64() == Some(0) => *v = Value::Bool(false),
                (Kind::Bool, Value::Number(n)) if n.as_i64() == Some(1) => *v = Value::Bool(true),
                (Kind::Json, Value::String(text)) => {
                    if let Ok(parsed) = serde_json::from_str::<Value>(text) {
                        *v = parsed;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The memory a row's values take once decoded, counted as `sqlite_step::cell_bytes`
/// does: the wire bytes of each value (a `bytea` as hex, twice) plus [`CELL_OVERHEAD`].
fn pg_row_bytes(row: &sqlx::postgres::PgRow) -> Result<u64, QueryError> {
    let mut n: u64 = 0;
    for i in 0..row.len() {
        let raw = row.try_get_raw(i).map_err(sql_error)?;
        let len = if raw.is_null() {
            0
        } else {
            let bytes = raw.as_bytes().map_or(0, <[u8]>::len) as u64;
            if raw.type_info().name() == "BYTEA" {
                2 * bytes
            } else {
                bytes
            }
        };
        n = n.saturating_add(sqlite_step::cell_bytes(len));
    }
    Ok(n)
}

fn pg_row(row: &sqlx::postgres::PgRow) -> Result<Vec<Value>, QueryError> {
    use sqlx::postgres::types::PgInterval;
    let mut out = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        let raw = row.try_get_raw(i).map_err(sql_error)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let ty = raw.type_info().name().to_string();
        let e = sql_error;
        let v = match ty.as_str() {
            "BOOL" => Value::from(row.try_get_unchecked::<bool, _>(i).map_err(e)?),
            "INT2" => Value::from(row.try_get_unchecked::<i16, _>(i).map_err(e)?),
            "INT4" => Value::from(row.try_get_unchecked::<i32, _>(i).map_err(e)?),
            "INT8" => Value::from(row.try_get_unchecked::<i64, _>(i).map_err(e)?),
            "FLOAT4" => Value::from(row.try_get_unchecked::<f32, _>(i).map_err(e)?),
            "FLOAT8" => Value::from(row.try_get_unchecked::<f64, _>(i).map_err(e)?),
            "NUMERIC" => numeric(raw.as_bytes().map_err(|x| QueryError::Sql(x.to_string()))?)?,
            "TEXT" | "VARCHAR" | "NAME" | "BPCHAR" | "CHAR" => {
                Value::from(row.try_get_unchecked::<String, _>(i).map_err(e)?)
            }
            "TIMESTAMPTZ" => Value::from(crate::timefmt::format(
                row.try_get_unchecked::<time::OffsetDateTime, _>(i)
                    .map_err(e)?,
            )),
            "TIMESTAMP" => Value::from(crate::timefmt::format(
                row.try_get_unchecked::<time::PrimitiveDateTime, _>(i)
                    .map_err(e)?
                    .assume_utc(),
            )),
            "DATE" => Value::from(
                row.try_get_unchecked::<time::Date, _>(i)
                    .map_err(e)?
                    .to_string(),
            ),
            "INTERVAL" => {
                let iv: PgInterval = row.try_get_unchecked(i).map_err(e)?;
                Value::from(interval(&iv))
            }
            "JSON" | "JSONB" => row.try_get_unchecked::<Value, _>(i).map_err(e)?,
            "BYTEA" => {
                let b: Vec<u8> = row.try_get_unchecked(i).map_err(e)?;
                Value::from(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
            }
            other => {
                let name = row.columns()[i].name();
                return Err(QueryError::Sql(format!(
                    "column {name} has type {other}, which query cannot show; select {name}::text"
                )));
            }
        };
        out.push(v);
    }
    Ok(out)
}

/// `N days HH:MM:SS[.ffffff]` (months shown as such).
fn interval(iv: &sqlx::postgres::types::PgInterval) -> String {
    let mut parts = Vec::new();
    if iv.months != 0 {
        parts.push(format!("{} mons", iv.months));
    }
    if iv.days != 0 {
        parts.push(format!("{} days", iv.days));
    }
    let us = iv.microseconds;
    let sign = if us < 0 { "-" } else { "" };
    let us = us.unsigned_abs();
    let (h, m, s, frac) = (
        us / 3_600_000_000,
        us / 60_000_000 % 60,
        us / 1_000_000 % 60,
        us % 1_000_000,
    );
    let mut t = format!("{sign}{h:02}:{m:02}:{s:02}");
    if frac != 0 {
        t.push_str(&format!(".{frac:06}"));
    }
    parts.push(t);
    parts.join(" ")
}

/// PostgreSQL's binary NUMERIC: an integer when it has no fraction, else a float.
fn numeric(b: &[u8]) -> Result<Value, QueryError> {
    let bad = || QueryError::Sql("malformed NUMERIC value".into());
    if b.len() < 8 {
        return Err(bad());
    }
    let word = |i: usize| i16::from_be_bytes([b[i], b[i + 1]]);
    let (ndigits, weight, sign) = (
        word(0) as usize,
        word(2) as i32,
        u16::from_be_bytes([b[4], b[5]]),
    );
    if sign == 0xC000 {
        return Ok(Value::Null); // NaN
    }
    if b.len() < 8 + 2 * ndigits {
        return Err(bad());
    }
    let mut int: i128 = 0;
    let mut frac = 0f64;
    let mut exact = true;
    for d in 0..ndigits {
        let digit = i128::from(word(8 + 2 * d));
        let power = weight - d as i32;
        if power >= 0 {
            let scale = 10_000i128.checked_pow(power as u32).ok_or_else(bad)?;
            int = digit
                .checked_mul(scale)
                .and_then(|x| int.checked_add(x))
                .ok_or_else(bad)?;
        } else {
            exact = false;
            frac += digit as f64 * 10_000f64.powi(power);
        }
    }
    let negative = sign == 0x4000;
    if exact || frac == 0.0 {
        let v = if negative { -int } else { int };
        return Ok(i64::try_from(v)
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(v as f64)));
    }
    let v = int as f64 + frac;
    Ok(Value::from(if negative { -v } else { v }))
}

/// SQLite's primary result code for a write on a read-only connection (`PRAGMA
/// query_only`, a read-only open); extended codes carry it in their low byte.
const SQLITE_READONLY: i64 = 8;
/// PostgreSQL's SQLSTATE `read_only_sql_transaction`.
const PG_READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// PostgreSQL's SQLSTATE `query_canceled`, which `statement_timeout` raises.
const PG_QUERY_CANCELED: &str = "57014";

/// Whether the database refused a statement because the connection is read-only, by the
/// error code (never by the message text, which changes with versions and locales).
fn is_write_refused(d: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = d.code() else { return false };
    if code == PG_READ_ONLY_SQL_TRANSACTION {
        return true;
    }
    d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
        && code
            .parse::<i64>()
            .is_ok_and(|c| c & 0xff == SQLITE_READONLY)
}

fn sql_error(e: sqlx::Error) -> QueryError {
    match &e {
        sqlx::Error::Database(d) if is_write_refused(d.as_ref()) => {
            QueryError::WriteRefused(d.message().to_string())
        }
        // The timeout is filled in by the caller, which knows it.
        sqlx::Error::Database(d) if d.code().as_deref() == Some(PG_QUERY_CANCELED) => {
            QueryError::Timeout(Duration::ZERO)
        }
        sqlx::Error::Database(d) => QueryError::Sql(d.message().to_string()),
        other => QueryError::Sql(other.to_string()),
    }
}

/// SQLite's primary result code for a text or blob longer than `SQLITE_LIMIT_LENGTH`
/// (lowered to `--max-bytes`).
const SQLITE_TOOBIG: i64 = 18;

/// The cap is filled in by the caller, which knows it.
fn step_error(e: StepError) -> QueryError {
    match e {
        StepError::Sqlite { code, .. } if i64::from(code) & 0xff == SQLITE_TOOBIG => {
            QueryError::BytesOver(0)
        }
        StepError::Sqlite { code, message } if i64::from(code) & 0xff == SQLITE_READONLY => {
            QueryError::WriteRefused(message)
        }
        StepError::Sqlite { message, .. } => QueryError::Sql(message),
        StepError::Empty => QueryError::Empty,
        StepError::Several => QueryError::Several,
        StepError::TooManyRows => QueryError::RowsOver(0),
        StepError::TooManyBytes => QueryError::BytesOver(0),
        StepError::Denied(what) => QueryError::WriteRefused(what),
        StepError::NotReadOnly => {
            QueryError::WriteRefused("the statement would change the database".into())
        }
        StepError::TimedOut => QueryError::Timeout(Duration::ZERO),
        // The sink keeps its own error and returns it instead.
        StepError::Stopped => QueryError::Output("stopped".into()),
    }
}

/// `sql` with `AND col = ?n` for each filter that is set, and their parameters; no
/// `(? IS NULL OR col = ?)`, which keeps SQLite from using an index.
fn filtered(ro: &ReadOnly, sql: &str, filters: &[(&str, Option<Param>)]) -> (String, Vec<Param>) {
    let mut out = sql.to_string();
    let mut params = Vec::new();
    for (col, value) in filters {
        if let Some(v) = value {
            params.push(v.clone());
            let n = params.len();
            out.push_str(&match ro.dialect() {
                Dialect::Sqlite => format!(" AND {col} = ?{n}"),
                Dialect::Postgres => format!(" AND {col} = ${n}"),
            });
        }
    }
    (out, params)
}

/// The number in the first cell of `rs`.
fn count_of(rs: &ResultSet) -> u64 {
    rs.rows
        .first()
        .and_then(|r| r.first())
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// A statement and its parameters, in order.
#[derive(Debug, Clone)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
}

/// What one page of a report runs: its rows (at most `limit` after `offset`), then, when
/// the page is full, the count of every row the filter selects (how many it left out).
#[derive(Debug, Clone)]
pub struct PageStatements {
    pub rows: Statement,
    pub count: Statement,
    limit: Option<usize>,
    offset: usize,
}

impl PageStatements {
    /// Runs the rows, and the count only when the page is full (a count costs what the
    /// filter selects).
    async fn run(self, ro: &ReadOnly) -> Result<Report, QueryError> {
        let rows = ro.run(&self.rows.sql, &self.rows.params).await?;
        let left_out = match self.limit {
            Some(n) if rows.rows.len() == n => {
                count_of(&ro.run(&self.count.sql, &self.count.params).await?)
                    .saturating_sub((self.offset + n) as u64)
            }
            _ => 0,
        };
        Ok(Report { rows, left_out })
    }
}

/// The statements of `select` (filtered) with at most `limit` rows after skipping
/// `offset`, and of `count` with the same filters.
fn limited(
    ro: &ReadOnly,
    select: &str,
    count: &str,
    order: &str,
    filters: &[(&str, Option<Param>)],
    limit: Option<usize>,
    offset: usize,
) -> PageStatements {
    let (sql, params) = filtered(ro, select, filters);
    let sql = match (limit, offset) {
        (Some(n), 0) => format!("{sql} {order} LIMIT {n}"),
        (Some(n), o) => format!("{sql} {order} LIMIT {n} OFFSET {o}"),
        // No LIMIT: SQLite takes `LIMIT -1`, PostgreSQL `LIMIT ALL`; neither is needed.
        (None, 0) => format!("{sql} {order}"),
        (None, o) => format!(
            "{sql} {order} {} OFFSET {o}",
            ro.pick("LIMIT -1", "LIMIT ALL")
        ),
    };
    let (count, count_params) = filtered(ro, count, filters);
    PageStatements {
        rows: Statement { sql, params },
        count: Statement {
            sql: count,
            params: count_params,
        },
        limit,
        offset,
    }
}

/// The order of a report's rows: a column of its whitelist (an enum per report, so no
/// text from outside ever reaches the SQL) and a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order<C> {
    pub by: C,
    pub descending: bool,
}

/// `ASC` or `DESC`.
fn dir_sql(descending: bool) -> &'static str {
    if descending { "DESC" } else { "ASC" }
}

/// A text column as both databases sort it: byte order (PostgreSQL's `C` collation,
/// SQLite's default).
fn text_order(ro: &ReadOnly, col: &str) -> String {
    text_order_in(ro.dialect(), col)
}

fn text_order_in(dialect: Dialect, col: &str) -> String {
    match dialect {
        Dialect::Sqlite => col.to_string(),
        Dialect::Postgres => format!("{col} COLLATE \"C\""),
    }
}

/// The columns the exposure report sorts by ([`exposure_sorted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExposureSort {
    /// The firewall's verdict on the hidden IPv4 side, by permissiveness (descending:
    /// open and restricted first, the report's order).
    #[default]
    Verdict,
    Host,
    Port,
    Processes,
}

impl ExposureSort {
    /// Every column with its name in URLs (`sort=`).
    pub const ALL: [(ExposureSort, &'static str); 4] = [
        (ExposureSort::Verdict, "verdict"),
        (ExposureSort::Host, "host"),
        (ExposureSort::Port, "port"),
        (ExposureSort::Processes, "processes"),
    ];
}

/// The columns of the `exposure` report, now (`exposure`) and as of a time
/// (`history::exposure_at`), in this order.
pub const EXPOSURE_COLUMNS: [&str; 9] = [
    "host",
    "netns",
    "protocol",
    "port",
    "shown_as",
    "processes",
    "effective_ipv4",
    "conditions",
    "note",
];

/// The `note` of an exposure row: what a verdict other than open or restricted means for
/// the headline (open and restricted ports are the exposures: no note). Filtered ports are
/// marked: netstat hides their IPv4 side, but the firewall closes it.
pub fn exposure_note(verdict: &str) -> Value {
    match verdict.parse::<Effective>() {
        Ok(Effective::Filtered) => {
            Value::from("filtered: the firewall drops new IPv4 connections (not exposed)")
        }
        Ok(Effective::Diverted) => {
            Value::from("diverted: the firewall sends IPv4 traffic for the port elsewhere")
        }
        Ok(Effective::NotApplicable) => {
            Value::from("n/a: nothing reaches it over IPv4 from off the host")
        }
        Ok(Effective::Unknown) | Err(_) => {
            Value::from("unknown: the firewall was not decided (why: view effective_exposure)")
        }
        Ok(Effective::Open | Effective::Restricted) => Value::Null,
    }
}

/// The headline: ports reachable over IPv4 although netstat shows only IPv6 lines, with
/// the effective IPv4 verdict of each port's hidden side and its conditions. Ports the
/// firewall leaves open or restricted come first (most permissive verdict first: open,
/// restricted, diverted, unknown, filtered, n/a), then by host, namespace, protocol, port.
pub async fn exposure(
    ro: &ReadOnly,
    port: Option<u16>,
    protocol: Option<&str>,
    limit: Option<usize>,
) -> Result<Report, QueryError> {
    let order = Order {
        by: ExposureSort::Verdict,
        descending: true,
    };
    exposure_sorted(ro, port, protocol, order, limit, 0).await
}

/// [`exposure`] in any order of [`ExposureSort`], `limit` rows after `offset` (the web
/// UI's pages), ties as [`exposure_order_sql`] breaks them.
pub async fn exposure_sorted(
    ro: &ReadOnly,
    port: Option<u16>,
    protocol: Option<&str>,
    order: Order<ExposureSort>,
    limit: Option<usize>,
    offset: usize,
) -> Result<Report, QueryError> {
    let mut report = exposure_statements(ro, port, protocol, order, limit, offset)
        .run(ro)
        .await?;
    report.rows.columns.push("note".to_string());
    for r in &mut report.rows.rows {
        let note = exposure_note(r.get(6).and_then(Value::as_str).unwrap_or(""));
        r.push(note);
    }
    Ok(report)
}

/// The statements behind [`exposure_sorted`]. By verdict (the default) and by port, and
/// by host for one port, in either direction, walk an index of `hidden_port` (migration
/// 0011) and stop at the page's end; by processes, and by host over every port, the
/// rows the filter selects are sorted.
pub fn exposure_statements(
    ro: &ReadOnly,
    port: Option<u16>,
    protocol: Option<&str>,
    order: Order<ExposureSort>,
    limit: Option<usize>,
    offset: usize,
) -> PageStatements {
    let order = exposure_order_sql(ro.dialect(), order);
    limited(
        ro,
        HEADLINE_SELECT,
        "SELECT count(*) FROM hidden_ipv4_exposure WHERE 1 = 1",
        &order,
        &headline_filters(port, protocol),
        limit,
        offset,
    )
}

/// The `ORDER BY` of the exposure report in `order`. Ties are broken by host, namespace,
/// protocol and port: ascending in a column's default direction (verdict descending,
/// the others ascending), and the exact reverse in the other, so that one index of
/// `hidden_port` (migration 0011) serves both directions.
pub fn exposure_order_sql(dialect: Dialect, order: Order<ExposureSort>) -> String {
    let dir = dir_sql(order.descending);
    let default_descending = order.by == ExposureSort::Verdict;
    let ties = dir_sql(order.descending != default_descending);
    let (host, netns) = (
        text_order_in(dialect, "host"),
        text_order_in(dialect, "netns"),
    );
    match order.by {
        ExposureSort::Verdict => format!(
            "ORDER BY {} {dir}, {host} {ties}, {netns} {ties}, protocol {ties}, port {ties}",
            row::rank_sql("effective_ipv4")
        ),
        ExposureSort::Host => {
            format!("ORDER BY {host} {dir}, {netns} {dir}, protocol {dir}, port {dir}")
        }
        // Port first: the ties need no port again (and the order stays the index's).
        ExposureSort::Port => {
            format!("ORDER BY port {dir}, {host} {dir}, {netns} {dir}, protocol {dir}")
        }
        ExposureSort::Processes => format!(
            "ORDER BY {} {dir}, {host} {dir}, {netns} {dir}, protocol {dir}, port {dir}",
            text_order_in(dialect, "processes")
        ),
    }
}

/// The headline rows as [`exposure`] reads them, without its note.
const HEADLINE_SELECT: &str = "SELECT host, netns, protocol, port, shown_as, processes, \
     effective_ipv4, effective_conditions_ipv4 AS conditions
     FROM hidden_ipv4_exposure WHERE 1 = 1";

fn headline_filters(
    port: Option<u16>,
    protocol: Option<&str>,
) -> [(&'static str, Option<Param>); 2] {
    [
        ("port", port.map(|p| Param::Int(Some(i64::from(p))))),
        (
            "protocol",
            protocol.map(|p| Param::Text(Some(p.to_string()))),
        ),
    ]
}

/// Every headline row (the columns of [`EXPOSURE_COLUMNS`] but `note`) in no particular
/// order, for `history::exposure_at`, which orders the rows itself after rolling them
/// back: no sort in the database, no note for rows it replaces.
pub(crate) async fn headline_rows(
    ro: &ReadOnly,
    port: Option<u16>,
    protocol: Option<&str>,
) -> Result<ResultSet, QueryError> {
    let (sql, params) = filtered(ro, HEADLINE_SELECT, &headline_filters(port, protocol));
    ro.run(&sql, &params).await
}

/// The columns of `hosts`: the view's, but `last_snapshot_at`, with the watch mode as
/// `watch` (`unknown` for an agent that does not report one) after `listeners`, and its
/// reason and since when at the end (for programs: `hosts` prints [`HOSTS_TABLE_COLUMNS`]
/// as a table).
pub const HOSTS_COLUMNS: [&str; 14] = [
    "host",
    "os_hostname",
    "agent_version",
    "first_seen",
    "last_seen",
    "stale",
    "listeners",
    "watch",
    "collector",
    "duplicate_refusals",
    "duplicate_last_at",
    "duplicate_last_peer",
    "watch_reason",
    "watch_since",
];

/// What the `hosts` table shows: [`HOSTS_COLUMNS`] but the last two, the watch mode's
/// reason and time, which are long (CSV and JSON carry them; the `hosts` view too).
pub const HOSTS_TABLE_COLUMNS: &[&str] = HOSTS_COLUMNS.split_at(HOSTS_COLUMNS.len() - 2).0;

/// Hosts, silent longest first (so stale hosts come first), with how each agent learns of
/// listens and closes (`watch`: `doorbell`, `polling(3s)`, `interval(10s)`, or `unknown`
/// from agents that do not say, and why it is not `doorbell`) and the connections refused
/// because a second machine used the host's certificate (`duplicate_refusals`, the last
/// one's time and address). Columns: [`HOSTS_COLUMNS`].
pub async fn hosts(ro: &ReadOnly, limit: Option<usize>) -> Result<Report, QueryError> {
    let order = Order {
        by: HostsSort::LastSeen,
        descending: false,
    };
    hosts_sorted(ro, false, order, limit, 0).await
}

/// The `hosts` report's rows: [`HOSTS_COLUMNS`] from the `hosts` view.
const HOSTS_SELECT: &str =
    "SELECT host, os_hostname, agent_version, first_seen, last_seen, stale, listeners,
                coalesce(watch_mode, 'unknown') AS watch, collector, duplicate_refusals,
                duplicate_last_at, duplicate_last_peer, watch_reason, watch_since
         FROM hosts WHERE 1 = 1";

/// The columns the hosts report sorts by ([`hosts_sorted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostsSort {
    /// Last contact (ascending: silent longest first, so stale hosts first; an index).
    #[default]
    LastSeen,
    /// The name (the unique index).
    Host,
    /// Live listeners (the maintained count).
    Listeners,
}

impl HostsSort {
    /// Every column with its name in URLs (`sort=`).
    pub const ALL: [(HostsSort, &'static str); 3] = [
        (HostsSort::LastSeen, "last_seen"),
        (HostsSort::Host, "host"),
        (HostsSort::Listeners, "listeners"),
    ];
}

/// [`hosts`] in any order of [`HostsSort`] (ties by name), `limit` rows after `offset`;
/// with `stale_only`, only the hosts the `hosts` view calls stale.
pub async fn hosts_sorted(
    ro: &ReadOnly,
    stale_only: bool,
    order: Order<HostsSort>,
    limit: Option<usize>,
    offset: usize,
) -> Result<Report, QueryError> {
    hosts_statements(ro, stale_only, order, limit, offset)
        .run(ro)
        .await
}

/// The statements behind [`hosts_sorted`]: on SQLite each order walks an index of
/// `host` (PostgreSQL keeps no index on `last_seen`: a top-N sort of the host table).
pub fn hosts_statements(
    ro: &ReadOnly,
    stale_only: bool,
    order: Order<HostsSort>,
    limit: Option<usize>,
    offset: usize,
) -> PageStatements {
    let order = hosts_order_sql(ro.dialect(), order);
    let (select, count) = if stale_only {
        // The view's `stale` decides; on SQLite the range of last_seen it implies (text
        // in time order, `timefmt`) lets the index on last_seen find them, instead of
        // computing `stale` for every host.
        let range = ro.pick(
            " AND last_seen <= strftime('%Y-%m-%d %H:%M:%f', 'now', '-' ||
                 (SELECT value FROM setting WHERE key = 'stale_after_seconds') || ' seconds')",
            "",
        );
        (
            format!("{HOSTS_SELECT} AND stale{range}"),
            format!("SELECT count(*) FROM hosts WHERE stale{range}"),
        )
    } else {
        (
            HOSTS_SELECT.to_string(),
            "SELECT count(*) FROM host".to_string(),
        )
    };
    match (ro.dialect(), limit) {
        // PostgreSQL sorts the host table for every order but by name (no index on
        // last_seen, see migration 0011): the page's names first, sorting two columns
        // instead of every column (a deep page sorts 100,000 rows of 235 bytes
        // otherwise), then their rows.
        (Dialect::Postgres, Some(n)) => {
            let where_ = &select[HOSTS_SELECT.len()..];
            let page = format!(
                "{select} AND host IN (SELECT host FROM hosts WHERE 1 = 1{where_} {order} \
                 LIMIT {n} OFFSET {offset}) {order}"
            );
            let mut statements = limited(ro, &page, &count, "", &[], None, 0);
            statements.limit = limit;
            statements.offset = offset;
            statements
        }
        _ => limited(ro, &select, &count, &order, &[], limit, offset),
    }
}

/// The `ORDER BY` of the hosts report in `order`, ties by name: ascending in a column's
/// default direction (last_seen and host ascending, listeners descending), the exact
/// reverse in the other (one index of `host` serves both).
pub fn hosts_order_sql(dialect: Dialect, order: Order<HostsSort>) -> String {
    let dir = dir_sql(order.descending);
    let default_descending = order.by == HostsSort::Listeners;
    let ties = dir_sql(order.descending != default_descending);
    let host = text_order_in(dialect, "host");
    match order.by {
        HostsSort::LastSeen => format!("ORDER BY last_seen {dir}, {host} {ties}"),
        HostsSort::Host => format!("ORDER BY {host} {dir}"),
        HostsSort::Listeners => format!("ORDER BY listeners {dir}, {host} {ties}"),
    }
}

/// One host's row of the `hosts` report ([`HOSTS_COLUMNS`]); no rows when the
/// collector has never heard of it.
pub async fn host(ro: &ReadOnly, name: &str) -> Result<ResultSet, QueryError> {
    let (sql, params) = filtered(
        ro,
        HOSTS_SELECT,
        &[("host", Some(Param::Text(Some(name.to_string()))))],
    );
    ro.run(&sql, &params).await
}

/// What the fleet looks like at a glance, from maintained columns (never from every
/// live listener): hosts, stale hosts, live listeners (each host's maintained count,
/// summed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    pub hosts: u64,
    pub stale: u64,
    pub listeners: u64,
}

/// The SQL behind [`overview`]'s counts, over the views (the web UI shows it).
pub const OVERVIEW_HOSTS_SQL: &str = "SELECT count(*) AS hosts,
       coalesce(sum(CASE WHEN stale THEN 1 ELSE 0 END), 0) AS stale,
       coalesce(sum(listeners), 0) AS listeners
FROM hosts";

/// The SQL behind [`overview`]'s headline counts, over the views.
pub const OVERVIEW_HIDDEN_SQL: &str =
    "SELECT effective_ipv4, count(*) AS ports, count(DISTINCT host) AS hosts
FROM hidden_ipv4_exposure
GROUP BY effective_ipv4";

/// The fleet at a glance ([`Overview`]).
pub async fn overview(ro: &ReadOnly) -> Result<Overview, QueryError> {
    let hosts = ro.run(OVERVIEW_HOSTS_SQL, &[]).await?;
    let n = |i: usize| {
        hosts
            .rows
            .first()
            .and_then(|r| r.get(i))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Overview {
        hosts: n(0),
        stale: n(1),
        listeners: n(2),
    })
}

/// The headline's ports and hosts by the firewall's verdict on their hidden IPv4 side,
/// `(verdict, ports, hosts)`, most permissive verdict first. It groups every row of the
/// headline's table (688,000 rows and about 1 s on SQLite at 100,000 hosts × 50
/// listeners): the web UI counts it in the background with the ports table.
pub async fn hidden_by_verdict(ro: &ReadOnly) -> Result<Vec<(String, u64, u64)>, QueryError> {
    let mut out = Vec::new();
    let hidden = ro.run(OVERVIEW_HIDDEN_SQL, &[]).await?;
    for r in hidden.named() {
        out.push((
            r.text("effective_ipv4")?,
            r.int("ports")?.max(0) as u64,
            r.int("hosts")?.max(0) as u64,
        ));
    }
    out.sort_by_key(|(v, _, _)| {
        std::cmp::Reverse(v.parse::<Effective>().map_or(0, |e| e.permissiveness()))
    });
    Ok(out)
}

/// The columns of [`ports`], one row per (port, protocol) that some host opens to the
/// world: how many hosts accept any address over IPv4 on it and how many of those the
/// firewall leaves open, the same over IPv6, and how many hosts have it in the headline
/// (reachable over IPv4 although netstat shows only IPv6 lines).
pub const PORTS_COLUMNS: [&str; 7] = [
    "port",
    "protocol",
    "ipv4_hosts",
    "ipv4_open",
    "ipv6_hosts",
    "ipv6_open",
    "hidden_hosts",
];

/// The same rows as [`ports`] from the `current_listeners` view (the web UI shows it).
pub const PORTS_VIEW_SQL: &str = "SELECT port, protocol,
       count(DISTINCT CASE WHEN reach_ipv4 = 'any' THEN host END) AS ipv4_hosts,
       count(DISTINCT CASE WHEN reach_ipv4 = 'any' AND effective_ipv4 = 'open' THEN host END) AS ipv4_open,
       count(DISTINCT CASE WHEN reach_ipv6 = 'any' THEN host END) AS ipv6_hosts,
       count(DISTINCT CASE WHEN reach_ipv6 = 'any' AND effective_ipv6 = 'open' THEN host END) AS ipv6_open,
       count(DISTINCT CASE WHEN hidden_ipv4_exposure THEN host END) AS hidden_hosts
FROM current_listeners
WHERE reach_ipv4 = 'any' OR reach_ipv6 = 'any' OR hidden_ipv4_exposure
GROUP BY port, protocol";

/// Ports by the number of hosts that open them to the world, per IP version
/// ([`PORTS_COLUMNS`]), in no particular order. This one aggregates every live listener
/// that accepts any address (nothing maintained at ingest counts hosts per port): the
/// web UI computes it at most once a minute and pages the copy.
pub async fn ports(ro: &ReadOnly) -> Result<ResultSet, QueryError> {
    // Over the view, as the page shows it: a role that may only SELECT the views
    // (docs/postgres.md) counts it too.
    ro.run(PORTS_VIEW_SQL, &[]).await
}

/// The columns of [`listeners`]: what the agent's scan table shows of each listener,
/// as the `current_listeners` view holds it.
pub const LISTENER_COLUMNS: &str = "trap, netstat_proto, shown_as, protocol, family, address, port, \
     interface, v6only, reach_ipv4, reach_ipv6, latent, effective_ipv4, effective_ipv6, \
     effective_conditions_ipv4, effective_conditions_ipv6, netns, processes, process_details, \
     container_runtime, container_id, pod_uid, unit, hidden_ipv4_exposure, first_seen, \
     last_changed";

/// The columns one host's listeners sort by ([`listeners`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListenerSort {
    /// Port, then protocol, namespace and family.
    #[default]
    Port,
    /// Namespace, then protocol, port and family (the agent's own order).
    Netns,
    /// The firewall's most permissive verdict over either IP version (descending: open
    /// first).
    Firewall,
    Processes,
}

impl ListenerSort {
    /// Every column with its name in URLs (`sort=`).
    pub const ALL: [(ListenerSort, &'static str); 4] = [
        (ListenerSort::Port, "port"),
        (ListenerSort::Netns, "netns"),
        (ListenerSort::Firewall, "firewall"),
        (ListenerSort::Processes, "processes"),
    ];
}

/// One host's live listeners ([`LISTENER_COLUMNS`]), `limit` after `offset`: an index
/// lookup by host, sorted among that host's listeners only.
pub async fn listeners(
    ro: &ReadOnly,
    host: &str,
    order: Order<ListenerSort>,
    limit: usize,
    offset: usize,
) -> Result<ResultSet, QueryError> {
    let dir = dir_sql(order.descending);
    let netns = text_order(ro, "netns");
    let first = match order.by {
        ListenerSort::Port => format!("port {dir}, protocol, {netns}"),
        ListenerSort::Netns => format!("{netns} {dir}, protocol, port"),
        ListenerSort::Firewall => {
            let (r4, r6) = (
                row::rank_sql("effective_ipv4"),
                row::rank_sql("effective_ipv6"),
            );
            format!(
                "CASE WHEN ({r4}) > ({r6}) THEN ({r4}) ELSE ({r6}) END {dir}, {netns}, protocol, port"
            )
        }
        ListenerSort::Processes => {
            format!(
                "{} {dir}, {netns}, protocol, port",
                text_order(ro, "processes")
            )
        }
    };
    let sql = format!(
        "SELECT {LISTENER_COLUMNS} FROM current_listeners WHERE host = {} \
         ORDER BY {first}, family, address LIMIT {limit} OFFSET {offset}",
        ro.pick("?1", "$1")
    );
    ro.run(&sql, &[Param::Text(Some(host.to_string()))]).await
}

/// Where the headline's trap sockets come from: container and unit of the live trap
/// listeners on `ports` of `hosts` (the rows of one page of [`exposure_sorted`]), as
/// `(host, netns, protocol, port, container_runtime, container_id, pod_uid, unit)`.
/// An index lookup per host: the cost follows the page, not the fleet.
pub async fn trap_owners(
    ro: &ReadOnly,
    hosts: &[String],
    ports: &[u16],
) -> Result<ResultSet, QueryError> {
    match trap_owners_statement(ro, hosts, ports) {
        Some(s) => ro.run(&s.sql, &s.params).await,
        None => Ok(ResultSet::default()),
    }
}

/// The statement behind [`trap_owners`] (none for no hosts or no ports).
pub fn trap_owners_statement(ro: &ReadOnly, hosts: &[String], ports: &[u16]) -> Option<Statement> {
    if hosts.is_empty() || ports.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut marks = |values: Vec<Param>| {
        let mut out = Vec::new();
        for v in values {
            params.push(v);
            out.push(ph(ro, params.len()));
        }
        out.join(", ")
    };
    let host_marks = marks(hosts.iter().map(|h| Param::Text(Some(h.clone()))).collect());
    let port_marks = marks(
        ports
            .iter()
            .map(|p| Param::Int(Some(i64::from(*p))))
            .collect(),
    );
    // SQLite has no statistics (the store runs no ANALYZE): given a list of ports it
    // would read every live listener on them (100,000 rows for port 80 at 100,000 hosts)
    // instead of each host's few. `+port` keeps the port out of index choice there, so
    // it finds the hosts by name and their listeners by host.
    let port_col = ro.pick("+port", "port");
    let sql = format!(
        "SELECT DISTINCT host, netns, protocol, port, container_runtime, container_id, pod_uid, unit
         FROM current_listeners
         WHERE trap AND host IN ({host_marks}) AND {port_col} IN ({port_marks})"
    );
    Some(Statement { sql, params })
}

/// The SQL parameter marker for parameter `n` in this dialect.
fn ph(ro: &ReadOnly, n: usize) -> String {
    match ro.dialect() {
        Dialect::Sqlite => format!("?{n}"),
        Dialect::Postgres => format!("${n}"),
    }
}

/// Output formats of `query`, `exposure`, `hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// Writes `rs` with a header line (table, CSV).
pub fn write(rs: &ResultSet, format: Format, out: &mut dyn Write) -> io::Result<()> {
    write_with(rs, format, true, out)
}

/// Writes `rs`; `header` false leaves out the table's and the CSV's header line (`--no-header`:
/// for `while read` loops and `cut`). JSON has no header.
pub fn write_with(
    rs: &ResultSet,
    format: Format,
    header: bool,
    out: &mut dyn Write,
) -> io::Result<()> {
    match format {
        Format::Table => write_table_with(rs, header, out),
        Format::Json => write_json(rs, out),
        Format::Csv => write_csv_with(rs, header, out),
    }
}

fn cell(v: &Value) -> Cow<'_, str> {
    match v {
        Value::Null => Cow::Borrowed(""),
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

/// Line breaks and tabs: a table prints them as spaces, CSV quotes them.
const BREAKS: [char; 3] = ['\n', '\r', '\t'];

/// A cell for a terminal: whatever a database holds (rows stored before the protocol
/// edge refused them, or SQL that builds them), control and invisible formatting
/// characters are printed as visible escapes (`\u{1b}`), never as themselves.
/// `keep` characters are left for the format to handle (CSV quotes line breaks).
fn printable_cell<'v>(v: &'v Value, keep: &[char]) -> Cow<'v, str> {
    let c = cell(v);
    match listenscope_core::record::escape_unsafe_except(&c, keep) {
        Some(escaped) => Cow::Owned(escaped),
        None => c,
    }
}

/// A cell as a table prints it: escaped, line breaks and tabs as spaces.
fn table_cell(v: &Value) -> Cow<'_, str> {
    match printable_cell(v, &BREAKS) {
        c if c.contains(BREAKS) => Cow::Owned(c.replace(BREAKS, " ")),
        c => c,
    }
}

pub fn write_table(rs: &ResultSet, out: &mut dyn Write) -> io::Result<()> {
    write_table_with(rs, true, out)
}

/// Columns padded to their widest cell, then `(N rows)`; without `header`, only the rows
/// (no header line, no count).
fn write_table_with(rs: &ResultSet, header: bool, out: &mut dyn Write) -> io::Result<()> {
    if rs.columns.is_empty() {
        return if header {
            writeln!(out, "(no rows)")
        } else {
            Ok(())
        };
    }
    // Columns padded to their widest cell (display width, so wide characters line up),
    // two spaces apart; built line by line, since reports can have 100,000 rows. Two
    // passes over the rows (widths, then lines), so the printed text is never held whole
    // next to the result (`query` may print up to --max-bytes of it).
    let names: Vec<String> = rs.columns.iter().map(|c| c.to_uppercase()).collect();
    let mut widths: Vec<usize> = if header {
        names.iter().map(|h| h.width()).collect()
    } else {
        vec![0; names.len()]
    };
    for row in &rs.rows {
        for (w, v) in widths.iter_mut().zip(row) {
            *w = (*w).max(table_cell(v).width());
        }
    }
    let mut line = String::new();
    let mut emit = |row: &[Cow<'_, str>], out: &mut dyn Write| -> io::Result<()> {
        line.clear();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            line.extend(std::iter::repeat_n(' ', w.saturating_sub(c.width())));
        }
        writeln!(out, "{}", line.trim_end())
    };
    if header {
        let names: Vec<Cow<'_, str>> = names.iter().map(|n| Cow::Borrowed(n.as_str())).collect();
        emit(&names, out)?;
    }
    let mut cells = Vec::with_capacity(rs.columns.len());
    for row in &rs.rows {
        cells.clear();
        cells.extend(row.iter().map(table_cell));
        emit(&cells, out)?;
    }
    if !header {
        return Ok(());
    }
    writeln!(
        out,
        "({} row{})",
        rs.rows.len(),
        if rs.rows.len() == 1 { "" } else { "s" }
    )
}

/// An array of objects keyed by column name, written one object at a time (never the
/// whole document in memory next to the result).
pub fn write_json(rs: &ResultSet, out: &mut dyn Write) -> io::Result<()> {
    out.write_all(b"[")?;
    for (i, r) in rs.rows.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        json_object(&rs.columns, r, &mut *out)?;
    }
    out.write_all(b"]")?;
    writeln!(out)
}

/// One row as an object keyed by column name.
fn json_object(columns: &[String], row: &[Value], out: &mut dyn Write) -> io::Result<()> {
    let mut m = Map::new();
    for (c, v) in columns.iter().zip(row) {
        m.insert(c.clone(), v.clone());
    }
    listenscope_core::json::to_writer(out, &Value::Object(m)).map_err(io::Error::other)
}

/// RFC 4180 fields (quoted when they hold a comma, quote or line break), joined.
fn csv_line(cells: &[Cow<'_, str>]) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    cells.iter().map(|c| field(c)).collect::<Vec<_>>().join(",")
}

pub fn write_csv(rs: &ResultSet, out: &mut dyn Write) -> io::Result<()> {
    write_csv_with(rs, true, out)
}

/// RFC 4180 fields (quoted when they hold a comma, quote or line break), lines ended by
/// LF as Unix tools expect (RFC 4180's CRLF breaks `cut`, `grep $`, `while read`); the
/// header line even for zero rows, unless `header` is false. Nested JSON values (e.g.
/// `process_details`) are written as JSON text.
fn write_csv_with(rs: &ResultSet, header: bool, out: &mut dyn Write) -> io::Result<()> {
    let mut sink = CsvSink { out, header };
    sink.head(&rs.columns)?;
    for r in &rs.rows {
        sink.row(r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs() -> ResultSet {
        ResultSet {
            columns: vec!["host".into(), "port".into(), "note".into()],
            rows: vec![
                vec![Value::from("h1"), Value::from(80), Value::Null],
                vec![
                    Value::from("h2"),
                    Value::from(443),
                    Value::from("a,\"b\"\nc"),
                ],
            ],
        }
    }

    /// Terminal escapes and bidi overrides already in a database print as visible text in
    /// tables and CSV (JSON escapes them itself, as `\u001b`; a bidi override too).
    #[test]
    fn hostile_cells_print_escaped() {
        let rs = ResultSet {
            columns: vec!["comm".into(), "details".into()],
            rows: vec![vec![
                Value::from("\u{1b}]0;pwned\u{7}ev\u{202e}il\nx"),
                serde_json::json!([{"comm": "a\u{202e}b"}]),
            ]],
        };
        let mut table = Vec::new();
        write_table(&rs, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(
            table.contains(r"\u{1b}]0;pwned\u{7}ev\u{202e}il x"),
            "{table}"
        );
        assert!(table.contains(r"a\u{202e}b"), "{table}");
        let mut csv = Vec::new();
        write_csv(&rs, &mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        assert!(
            csv.contains("\"\\u{1b}]0;pwned\\u{7}ev\\u{202e}il\nx\""),
            "{csv}"
        );
        let mut json = Vec::new();
        write_json(&rs, &mut json).unwrap();
        let json = String::from_utf8(json).unwrap();
        assert!(json.contains(r"ev\u202eil"), "{json}");
        assert!(
            !json
                .trim_end()
                .chars()
                .any(listenscope_core::record::is_unsafe_char),
            "{json:?}"
        );
        // Still the same values.
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back[0]["comm"], rs.rows[0][0]);
        assert_eq!(back[0]["details"], rs.rows[0][1]);
        for text in [&table, &csv] {
            assert!(
                !text
                    .chars()
                    .any(|c| c != '\n' && listenscope_core::record::is_unsafe_char(c)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn byte_sizes() {
        for (text, n) in [
            ("256MiB", 256 << 20),
            ("1GiB", 1 << 30),
            ("64k", 64 << 10),
            ("2048", 2048),
            ("1024B", 1024),
            (" 3 M ", 3 << 20),
        ] {
            assert_eq!(parse_bytes(text), Ok(n), "{text}");
        }
        for bad in [
            "",
            "0",
            "100",
            "12X",
            "1.5GiB",
            "-1",
            "99999999999999999999GiB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(format_bytes(DEFAULT_MAX_BYTES), "256MiB");
        assert_eq!(format_bytes(1 << 30), "1GiB");
        assert_eq!(format_bytes(1500), "1500B");
        assert_eq!(format_bytes(64 << 10), "64KiB");
    }

    #[test]
    fn csv_quotes() {
        let mut out = Vec::new();
        write_csv(&rs(), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "host,port,note\nh1,80,\nh2,443,\"a,\"\"b\"\"\nc\"\n"
        );
        let mut out = Vec::new();
        write_with(&rs(), Format::Csv, false, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "h1,80,\nh2,443,\"a,\"\"b\"\"\nc\"\n"
        );
        // Zero rows: the header alone (a CSV reader still learns the columns).
        let empty = ResultSet {
            columns: rs().columns,
            rows: vec![],
        };
        let mut out = Vec::new();
        write_csv(&empty, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "host,port,note\n");
    }

    #[test]
    fn table_without_header() {
        let mut out = Vec::new();
        write_with(&rs(), Format::Table, false, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "h1  80\nh2  443  a,\"b\" c\n"
        );
    }

    #[test]
    fn json_objects() {
        let mut out = Vec::new();
        write_json(&rs(), &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["host"], "h1");
        assert_eq!(v[0]["note"], Value::Null);
        assert_eq!(v[1]["port"], 443);
    }

    fn numeric_bytes(ndigits: i16, weight: i16, sign: u16, digits: &[i16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(ndigits.to_be_bytes());
        b.extend(weight.to_be_bytes());
        b.extend(sign.to_be_bytes());
        b.extend(0i16.to_be_bytes());
        for d in digits {
            b.extend(d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics() {
        // 12345.678 = 1·10000¹ + 2345 + 6780·10000⁻¹
        let v = numeric(&numeric_bytes(3, 1, 0, &[1, 2345, 6780])).unwrap();
        assert!((v.as_f64().unwrap() - 12345.678).abs() < 1e-9, "{v}");
        assert_eq!(
            numeric(&numeric_bytes(1, 0, 0, &[42])).unwrap(),
            Value::from(42)
        );
        assert_eq!(
            numeric(&numeric_bytes(2, 1, 0x4000, &[3, 0])).unwrap(),
            Value::from(-30000)
        );
        assert_eq!(
            numeric(&numeric_bytes(0, 0, 0, &[])).unwrap(),
            Value::from(0)
        );
        assert_eq!(
            numeric(&numeric_bytes(0, 0, 0xC000, &[])).unwrap(),
            Value::Null
        );
        assert!(numeric(&[0, 5]).is_err());
    }

    #[test]
    fn intervals() {
        use sqlx::postgres::types::PgInterval;
        let iv = PgInterval {
            months: 0,
            days: 1,
            microseconds: 3_723_500_000,
        };
        assert_eq!(interval(&iv), "1 days 01:02:03.500000");
        let iv = PgInterval {
            months: 0,
            days: 0,
            microseconds: -5_000_000,
        };
        assert_eq!(interval(&iv), "-00:00:05");
    }

    #[test]
    fn table_aligns_by_display_width() {
        let rs = ResultSet {
            columns: vec!["host".into(), "n".into()],
            rows: vec![
                vec![Value::from("日本"), Value::from(1)],
                vec![Value::from("a\tb"), Value::Null],
                vec![Value::from("abcde"), Value::from(22)],
            ],
        };
        let mut out = Vec::new();
        write_table(&rs, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HOST   N\n日本   1\na b\nabcde  22\n(3 rows)\n"
        );
    }

    #[test]
    fn table_counts_rows() {
        let mut out = Vec::new();
        write_table(&rs(), &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("HOST") && s.contains("h2") && s.ends_with("(2 rows)\n"),
            "{s}"
        );
    }
}
