//! Stepping statements on a SQLite connection's own handle, on the caller's thread: one
//! read-only statement's rows ([`run`]), or one statement executed once per row of values
//! ([`Each`]). The only `unsafe` of the store, kept to this file behind a safe API.
//!
//! Why: sqlx runs SQLite on a worker thread and hands every result row over through a
//! channel, one wake-up and two context switches per row. For `query` printing 30,000 rows
//! that was 80 % of the time (164 ms against 31 ms for `sqlite3` itself). For the writer's
//! inserts, sqlx copies every value into its own argument list, and SQLite copies every
//! text again. With the handle locked out of the worker
//! ([`sqlx::sqlite::SqliteConnection::lock_handle`]) the statement is stepped here, without
//! hand-offs, binding the caller's text in place. The connection keeps everything sqlx set
//! on it (pragmas, read-only open, busy timeout, an open transaction).
//!
//! [`run`] is the read side (`query` and the reports): a statement that is not read-only
//! by SQLite's own judgement (`sqlite3_stmt_readonly`) is refused after preparing and
//! before its first step, so nothing of it happens (`VACUUM INTO` would create its file
//! before `query_only` stopped it); and a deadline interrupts it through the progress
//! handler.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::time::Instant;

use libsqlite3_sys as ffi;
use serde_json::Value;
use sqlx::sqlite::LockedSqliteHandle;

/// A parameter bound by position.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bind<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

/// Why a statement failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// SQLite's error: its extended result code and message.
    #[error("{message} (SQLite result code {code})")]
    Sqlite { code: c_int, message: String },
    #[error("no SQL statement given")]
    Empty,
    #[error("more than one SQL statement given")]
    Several,
    #[error("more rows than allowed")]
    TooManyRows,
    /// SQLite judged the statement not read-only; it was refused before it ran.
    #[error("the statement is not read-only")]
    NotReadOnly,
    /// The deadline passed; the statement was interrupted.
    #[error("the statement ran past its deadline")]
    TimedOut,
}

impl StepError {
    /// SQLite's primary result code (the low byte of the extended one), if SQLite failed.
    pub(crate) fn primary_code(&self) -> Option<c_int> {
        match self {
            StepError::Sqlite { code, .. } => Some(code & 0xff),
            _ => None,
        }
    }
}

/// Column names and rows (integers, reals, text, null; blobs as hex text).
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub columns: Vec<String>,
    /// Per column, the table and column it comes from when it is a plain column of a
    /// table (through views too), else `None` (an expression).
    pub origins: Vec<Option<(String, String)>>,
    pub rows: Vec<Vec<Value>>,
}

/// A prepared statement, finalized on drop.
struct Stmt(NonNull<ffi::sqlite3_stmt>);

impl Drop for Stmt {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful prepare and is finalized only here.
        unsafe {
            ffi::sqlite3_finalize(self.0.as_ptr());
        }
    }
}

fn error(db: NonNull<ffi::sqlite3>) -> StepError {
    // SAFETY: `db` is a live handle the caller holds exclusively; the message is copied
    // before any other call on the handle.
    unsafe {
        let code = ffi::sqlite3_extended_errcode(db.as_ptr());
        let message = CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr()))
            .to_string_lossy()
            .into_owned();
        StepError::Sqlite { code, message }
    }
}

/// Prepares the first statement of `sql[from..]`; `None` when only whitespace or comments
/// are left. Returns the statement and the offset where the rest begins.
fn prepare(
    db: NonNull<ffi::sqlite3>,
    sql: &str,
    from: usize,
) -> Result<(Option<Stmt>, usize), StepError> {
    let text = &sql.as_bytes()[from..];
    let len = c_int::try_from(text.len()).map_err(|_| StepError::Sqlite {
        code: ffi::SQLITE_TOOBIG,
        message: "the SQL text is longer than 2 GiB".into(),
    })?;
    let mut stmt = ptr::null_mut();
    let mut tail: *const c_char = ptr::null();
    // SAFETY: `text` outlives the call and its length is passed (no NUL needed); `stmt`
    // and `tail` are out-pointers; SQLite sets `tail` inside `text`.
    let rc = unsafe {
        ffi::sqlite3_prepare_v2(db.as_ptr(), text.as_ptr().cast(), len, &mut stmt, &mut tail)
    };
    if rc != ffi::SQLITE_OK {
        return Err(error(db));
    }
    let consumed = if tail.is_null() {
        text.len()
    } else {
        // SAFETY: `tail` points into `text` (or one past its end).
        unsafe { tail.cast::<u8>().offset_from(text.as_ptr()) as usize }
    };
    Ok((NonNull::new(stmt).map(Stmt), from + consumed))
}

/// Prepares the one statement in `sql` (none, or several, is an error).
fn prepare_one(db: NonNull<ffi::sqlite3>, sql: &str) -> Result<Stmt, StepError> {
    let (first, rest) = prepare(db, sql, 0)?;
    let Some(stmt) = first else {
        return Err(StepError::Empty);
    };
    // The rest is scanned, never prepared: SQLite applies a pragma such as `query_only`
    // while preparing it, before any step.
    if !only_trivia(&sql[rest..]) {
        return Err(StepError::Several);
    }
    Ok(stmt)
}

/// Whether `sql` holds nothing but whitespace, `;` and comments.
fn only_trivia(mut sql: &str) -> bool {
    loop {
        sql = sql.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = sql.strip_prefix("/*") {
            // Unterminated: SQLite reads the rest as the comment.
            sql = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return sql.is_empty();
        }
    }
}

/// Binds `binds` to `s` by position. Text is bound in place (`SQLITE_STATIC`): the caller
/// keeps it alive until the statement is stepped and its bindings cleared.
fn bind_all(db: NonNull<ffi::sqlite3>, s: &Stmt, binds: &[Bind<'_>]) -> Result<(), StepError> {
    let s = s.0.as_ptr();
    for (i, b) in binds.iter().enumerate() {
        let at = c_int::try_from(i + 1).unwrap_or(c_int::MAX);
        // SAFETY: `s` is a live statement. Bound text stays valid until `Each::execute`
        // or `run` clears the bindings or finalizes the statement, both before they
        // return, so SQLite never reads it after the borrow ends.
        let rc = unsafe {
            match *b {
                Bind::Int(Some(v)) => ffi::sqlite3_bind_int64(s, at, v),
                Bind::Text(Some(t)) => {
                    let Ok(len) = c_int::try_from(t.len()) else {
                        return Err(StepError::Sqlite {
                            code: ffi::SQLITE_TOOBIG,
                            message: format!("parameter {at} is longer than 2 GiB"),
                        });
                    };
                    // An empty string's pointer may dangle; SQLite reads no byte of it,
                    // but point at a real one anyway.
                    let p = if t.is_empty() {
                        c"".as_ptr()
                    } else {
                        t.as_ptr().cast()
                    };
                    ffi::sqlite3_bind_text(s, at, p, len, ffi::SQLITE_STATIC())
                }
                Bind::Int(None) | Bind::Text(None) => ffi::sqlite3_bind_null(s, at),
            }
        };
        if rc != ffi::SQLITE_OK {
            return Err(error(db));
        }
    }
    Ok(())
}

/// One statement executed once per row of values (the writer's multi-row inserts),
/// inside whatever transaction the connection has open. Borrows the locked handle, so the
/// statement is finalized before the handle goes back to sqlx.
pub(crate) struct Each<'h> {
    db: NonNull<ffi::sqlite3>,
    stmt: Stmt,
    _handle: PhantomData<&'h mut ()>,
}

/// Explicit, so the handle stays borrowed until the statement is finalized (by its
/// field's drop): never after sqlx's worker has the connection back.
impl Drop for Each<'_> {
    fn drop(&mut self) {}
}

impl<'h> Each<'h> {
    /// Prepares `sql` on the locked connection.
    pub(crate) fn new(
        handle: &'h mut LockedSqliteHandle<'_>,
        sql: &str,
    ) -> Result<Each<'h>, StepError> {
        let db = handle.as_raw_handle();
        Ok(Each {
            db,
            stmt: prepare_one(db, sql)?,
            _handle: PhantomData,
        })
    }

    /// Executes the statement once with `binds`.
    pub(crate) fn execute(&mut self, binds: &[Bind<'_>]) -> Result<(), StepError> {
        let s = self.stmt.0.as_ptr();
        let done = bind_all(self.db, &self.stmt, binds).and_then(|()| {
            // SAFETY: `s` is live, bound, and stepped on this thread only. The error is
            // read before the reset below.
            match unsafe { ffi::sqlite3_step(s) } {
                ffi::SQLITE_DONE | ffi::SQLITE_ROW => Ok(()),
                _ => Err(error(self.db)),
            }
        });
        // SAFETY: `s` is live. Reset and clear whatever happened, so no binding outlives
        // `binds` and the next row starts clean.
        unsafe {
            ffi::sqlite3_reset(s);
            ffi::sqlite3_clear_bindings(s);
        }
        done
    }
}

/// Runs the one statement in `sql` with `binds` on the locked connection and returns at
/// most `max_rows` rows. A statement SQLite does not judge read-only is refused before its
/// first step; one still running at `deadline` is interrupted.
pub(crate) fn run(
    handle: &mut LockedSqliteHandle<'_>,
    sql: &str,
    binds: &[Bind<'_>],
    max_rows: usize,
    deadline: Option<Instant>,
) -> Result<Rows, StepError> {
    let db = handle.as_raw_handle();
    let stmt = prepare_one(db, sql)?;
    let s = stmt.0.as_ptr();
    // SAFETY: `s` is a live statement.
    if unsafe { ffi::sqlite3_stmt_readonly(s) } == 0 {
        return Err(StepError::NotReadOnly);
    }
    bind_all(db, &stmt, binds)?;
    // SAFETY: `s` is a live statement.
    let count = unsafe { ffi::sqlite3_column_count(s) };
    let mut out = Rows {
        columns: (0..count).map(|i| column_name(s, i)).collect(),
        origins: (0..count).map(|i| column_origin(s, i)).collect(),
        rows: Vec::new(),
    };
    // Declared after `stmt`: dropped (the handler removed) before the statement is
    // finalized, and before `deadline`'s storage goes.
    let _progress = deadline.as_ref().map(|d| Progress::install(db, d));
    loop {
        // SAFETY: `s` is live and stepped on this thread only.
        match unsafe { ffi::sqlite3_step(s) } {
            ffi::SQLITE_ROW => {
                if out.rows.len() == max_rows {
                    return Err(StepError::TooManyRows);
                }
                out.rows.push((0..count).map(|i| column(s, i)).collect());
            }
            ffi::SQLITE_DONE => return Ok(out),
            ffi::SQLITE_INTERRUPT if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(StepError::TimedOut);
            }
            _ => return Err(error(db)),
        }
    }
}

/// SQLite virtual machine instructions between two deadline checks (a check is one
/// clock read; 10,000 instructions take well under a millisecond).
const PROGRESS_EVERY: c_int = 10_000;

/// The progress handler that interrupts a statement past its deadline, removed on drop.
/// Borrows the deadline, so the handler never reads it after it is gone.
struct Progress<'d> {
    db: NonNull<ffi::sqlite3>,
    _deadline: PhantomData<&'d Instant>,
}

impl<'d> Progress<'d> {
    fn install(db: NonNull<ffi::sqlite3>, deadline: &'d Instant) -> Progress<'d> {
        extern "C" fn past(arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `&Instant` given below, alive while the handler is
            // installed (the borrow of `Progress`).
            let deadline = unsafe { &*arg.cast::<Instant>() };
            c_int::from(Instant::now() >= *deadline)
        }
        let arg = ptr::from_ref(deadline).cast_mut().cast::<c_void>();
        // SAFETY: `db` is a live handle the caller holds exclusively; the handler only
        // reads the deadline, and is removed (drop) before the borrow ends.
        unsafe { ffi::sqlite3_progress_handler(db.as_ptr(), PROGRESS_EVERY, Some(past), arg) };
        Progress {
            db,
            _deadline: PhantomData,
        }
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        // SAFETY: `db` is still locked by the caller of `run`; this removes the handler.
        unsafe { ffi::sqlite3_progress_handler(self.db.as_ptr(), 0, None, ptr::null_mut()) };
    }
}

/// The table and column that column `i` comes from, when it is a plain column.
fn column_origin(s: *mut ffi::sqlite3_stmt, i: c_int) -> Option<(String, String)> {
    // SAFETY: `s` is a live, prepared statement and `i` below its column count; both
    // names are copied before any other call on the statement (the bundled SQLite is
    // built with SQLITE_ENABLE_COLUMN_METADATA).
    unsafe {
        let table = ffi::sqlite3_column_table_name(s, i);
        let column = ffi::sqlite3_column_origin_name(s, i);
        if table.is_null() || column.is_null() {
            return None;
        }
        Some((
            CStr::from_ptr(table).to_string_lossy().into_owned(),
            CStr::from_ptr(column).to_string_lossy().into_owned(),
        ))
    }
}

/// The name of column `i`, copied.
fn column_name(s: *mut ffi::sqlite3_stmt, i: c_int) -> String {
    // SAFETY: `s` is a live statement and `i` below its column count; the name is copied
    // before any other call on the statement.
    unsafe {
        let name = ffi::sqlite3_column_name(s, i);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// Column `i` of the current row, by the value's own storage class.
fn column(s: *mut ffi::sqlite3_stmt, i: c_int) -> Value {
    // SAFETY: `s` holds a row (the last step returned SQLITE_ROW) and `i` is below the
    // column count. Text and blob pointers are read before any other call on the column,
    // with the length SQLite reports for the same conversion.
    unsafe {
        match ffi::sqlite3_column_type(s, i) {
            ffi::SQLITE_INTEGER => Value::from(ffi::sqlite3_column_int64(s, i)),
            ffi::SQLITE_FLOAT => Value::from(ffi::sqlite3_column_double(s, i)),
            ffi::SQLITE_TEXT => {
                let p = ffi::sqlite3_column_text(s, i);
                let n = ffi::sqlite3_column_bytes(s, i) as usize;
                if p.is_null() {
                    Value::from("")
                } else {
                    let bytes = std::slice::from_raw_parts(p, n);
                    Value::from(String::from_utf8_lossy(bytes).into_owned())
                }
            }
            ffi::SQLITE_BLOB => {
                let p = ffi::sqlite3_column_blob(s, i);
                let n = ffi::sqlite3_column_bytes(s, i) as usize;
                let bytes: &[u8] = if p.is_null() {
                    &[]
                } else {
                    std::slice::from_raw_parts(p.cast(), n)
                };
                let mut hex = String::with_capacity(2 * bytes.len());
                for b in bytes {
                    use std::fmt::Write as _;
                    let _ = write!(hex, "{b:02x}");
                }
                Value::from(hex)
            }
            _ => Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;
    use sqlx::sqlite::SqliteConnection;

    use super::*;
    use crate::store::StoreError;

    #[tokio::test]
    async fn each_binds_in_place_and_reports_constraints() {
        let mut c = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER, note TEXT)")
            .execute(&mut c)
            .await
            .unwrap();
        {
            let mut h = c.lock_handle().await.unwrap();
            let mut each =
                Each::new(&mut h, "INSERT INTO t (k, n, note) VALUES (?, ?, ?)").unwrap();
            for i in 0..3 {
                // Text built per row and dropped after it: bound in place, then cleared.
                let k = format!("key-{i}\t\"é\"");
                each.execute(&[Bind::Text(Some(&k)), Bind::Int(Some(i)), Bind::Text(None)])
                    .unwrap();
            }
            let again = each
                .execute(&[
                    Bind::Text(Some("key-1\t\"é\"")),
                    Bind::Int(None),
                    Bind::Text(None),
                ])
                .unwrap_err();
            assert_eq!(
                again.primary_code(),
                Some(ffi::SQLITE_CONSTRAINT),
                "{again}"
            );
            assert!(StoreError::from(again).is_constraint());
            // The statement is usable after a failure.
            each.execute(&[
                Bind::Text(Some("last")),
                Bind::Int(Some(9)),
                Bind::Text(Some("x")),
            ])
            .unwrap();
            drop(each);
            let rows = run(
                &mut h,
                "SELECT k, n, note FROM t WHERE n >= ?1 ORDER BY n",
                &[Bind::Int(Some(1))],
                10,
                None,
            )
            .unwrap();
            assert_eq!(rows.columns, ["k", "n", "note"]);
            assert_eq!(
                rows.rows,
                [
                    vec![Value::from("key-1\t\"é\""), Value::from(1), Value::Null],
                    vec![Value::from("key-2\t\"é\""), Value::from(2), Value::Null],
                    vec![Value::from("last"), Value::from(9), Value::from("x")],
                ]
            );
            assert!(matches!(
                run(&mut h, "SELECT k FROM t", &[], 2, None),
                Err(StepError::TooManyRows)
            ));
            assert!(matches!(
                Each::new(&mut h, "SELECT 1; SELECT 2"),
                Err(StepError::Several)
            ));
        }
        // The connection goes on working through sqlx afterwards.
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 4);
        let full = StoreError::from(StepError::Sqlite {
            code: ffi::SQLITE_FULL,
            message: "database or disk is full".into(),
        });
        assert!(!full.is_constraint());
    }

    #[test]
    fn trailing_text_is_scanned_not_prepared() {
        for t in ["", " ; ;\n", "-- done", "-- a\n; /* b */ ", "/* open"] {
            assert!(only_trivia(t), "{t:?}");
        }
        for t in [
            "SELECT 2",
            "; PRAGMA query_only=0",
            "-- a\nSELECT 2",
            "/* a */ x",
        ] {
            assert!(!only_trivia(t), "{t:?}");
        }
    }

    #[tokio::test]
    async fn a_second_statement_never_reaches_sqlite() {
        let mut c = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("PRAGMA query_only = 1")
            .execute(&mut c)
            .await
            .unwrap();
        {
            let mut h = c.lock_handle().await.unwrap();
            assert!(matches!(
                run(&mut h, "SELECT 1; PRAGMA query_only = 0", &[], 10, None),
                Err(StepError::Several)
            ));
        }
        let on: i64 = sqlx::query_scalar("PRAGMA query_only")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(on, 1, "the refused statement changed the connection");
    }

    /// What is not read-only is refused before it runs: `VACUUM INTO` creates no file,
    /// a journal-mode change is refused rather than failing with an I/O error.
    #[tokio::test]
    async fn writes_are_refused_before_they_run() {
        let dir = std::env::temp_dir().join(format!("ls-step-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("ro.db");
        let target = dir.join("copy.db");
        {
            let mut c = SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", db.display()))
                .await
                .unwrap();
            // WAL, as the collector's databases: the refused pragma would leave it.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&mut c)
                .await
                .unwrap();
            sqlx::query("CREATE TABLE t (x INTEGER, b INTEGER)")
                .execute(&mut c)
                .await
                .unwrap();
            sqlx::query("INSERT INTO t VALUES (1, 0)")
                .execute(&mut c)
                .await
                .unwrap();
            c.close().await.unwrap();
        }
        let mut c = SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .unwrap();
        sqlx::query("PRAGMA query_only = 1")
            .execute(&mut c)
            .await
            .unwrap();
        {
            let mut h = c.lock_handle().await.unwrap();
            let vacuum = format!("VACUUM INTO '{}'", target.display());
            for sql in [
                vacuum.as_str(),
                "PRAGMA journal_mode = DELETE",
                "DELETE FROM t",
                "CREATE TEMP TABLE u (x)",
            ] {
                assert!(
                    matches!(run(&mut h, sql, &[], 10, None), Err(StepError::NotReadOnly)),
                    "{sql}"
                );
            }
            assert!(!target.exists(), "VACUUM INTO created its file");
            let rows = run(&mut h, "SELECT x AS y, b, x + 1 AS z FROM t", &[], 10, None).unwrap();
            assert_eq!(
                rows.origins,
                [
                    Some(("t".into(), "x".into())),
                    Some(("t".into(), "b".into())),
                    None
                ]
            );
        }
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
        c.close().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A statement past its deadline is interrupted and says so; the handler is gone
    /// afterwards (the next statement without a deadline runs to its end).
    #[tokio::test]
    async fn a_deadline_interrupts() {
        let mut c = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let mut h = c.lock_handle().await.unwrap();
        let forever = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                       SELECT count(*) FROM n";
        let deadline = Instant::now() + std::time::Duration::from_millis(200);
        assert!(matches!(
            run(&mut h, forever, &[], 10, Some(deadline)),
            Err(StepError::TimedOut)
        ));
        let done = run(
            &mut h,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
             SELECT count(*) AS c FROM n",
            &[],
            10,
            None,
        )
        .unwrap();
        assert_eq!(done.rows, [vec![Value::from(100_000)]]);
    }
}
