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
//! [`run`] is the read side (`query` and the reports). An authorizer, installed while the
//! statement is prepared and stepped, refuses what is not a question while SQLite
//! compiles it: ATTACH, DETACH, every write, a pragma that is not on the list of those
//! that only read (a flag pragma such as `query_only = 0` takes effect while it is
//! *prepared*, so refusing it after preparing would be too late), and functions that
//! reach outside the database (`load_extension`). A statement that is not read-only by
//! SQLite's own judgement (`sqlite3_stmt_readonly`) is then refused before its first
//! step, so nothing of it happens (`VACUUM INTO` would create its file before
//! `query_only` stopped it). A deadline interrupts it through the progress handler. The
//! result is capped in rows and in bytes ([`Caps`]): stepping stops at the first row
//! past either, and no value larger than the byte cap is ever made (`SQLITE_LIMIT_LENGTH`
//! is lowered to it for the statement, so `zeroblob(5e8)` fails before it allocates).

use std::cell::Cell;
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
    /// The result (or one value of it) is larger than [`Caps::bytes`].
    #[error("more bytes than allowed")]
    TooManyBytes,
    /// The authorizer refused part of the statement while it was prepared; says what.
    #[error("{0}")]
    Denied(String),
    /// SQLite judged the statement not read-only; it was refused before it ran.
    #[error("the statement is not read-only")]
    NotReadOnly,
    /// The deadline passed; the statement was interrupted.
    #[error("the statement ran past its deadline")]
    TimedOut,
    /// The caller's row consumer asked to stop (it keeps its own reason).
    #[error("stopped by the reader of the rows")]
    Stopped,
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

/// Where a result column comes from: (table, column) for a plain column of a table
/// (through views too), `None` for an expression.
pub(crate) type Origin = Option<(String, String)>;

/// Column names and rows (integers, reals, text, null; blobs as hex text).
#[cfg(test)]
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

/// How much one result may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Most rows.
    pub rows: usize,
    /// Most bytes the rows take in memory, counted as [`cell_bytes`] does.
    pub bytes: u64,
}

/// The memory one value of a result takes: the value itself and the text it holds
/// (a blob is held as hex text, two bytes per byte).
pub(crate) fn cell_bytes(payload: u64) -> u64 {
    std::mem::size_of::<Value>() as u64 + payload
}

/// Runs the one statement in `sql` with `binds` on the locked connection and returns at
/// most `caps` of rows. What the authorizer or SQLite does not judge read-only is refused
/// before its first step; one still running at `deadline` is interrupted.
#[cfg(test)]
pub(crate) fn run(
    handle: &mut LockedSqliteHandle<'_>,
    sql: &str,
    binds: &[Bind<'_>],
    caps: Caps,
    deadline: Option<Instant>,
) -> Result<Rows, StepError> {
    let mut head = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    run_each(
        handle,
        sql,
        binds,
        caps,
        deadline,
        &mut |columns, origins| head = (columns.to_vec(), origins.to_vec()),
        &mut |row| {
            rows.push(row);
            true
        },
    )?;
    Ok(Rows {
        columns: head.0,
        origins: head.1,
        rows,
    })
}

/// [`run`], handing each row to `each` as it is read instead of keeping it (`head` gets
/// the column names and origins first, even for no rows). The caps count every row
/// handed on. `each` returns false to stop: [`StepError::Stopped`].
pub(crate) fn run_each(
    handle: &mut LockedSqliteHandle<'_>,
    sql: &str,
    binds: &[Bind<'_>],
    caps: Caps,
    deadline: Option<Instant>,
    head: &mut dyn FnMut(&[String], &[Origin]),
    each: &mut dyn FnMut(Vec<Value>) -> bool,
) -> Result<(), StepError> {
    let db = handle.as_raw_handle();
    // Declared before the statement: removed (and the length limit restored) only after
    // it is finalized, so SQLite never calls into a guard that is gone.
    let denied = Cell::new(None);
    let _auth = Authorizer::install(db, &denied);
    let _length = LengthLimit::lower(db, caps.bytes);
    let stmt = match prepare_one(db, sql) {
        Ok(stmt) => stmt,
        Err(e) => return Err(denied.take().map_or(e, StepError::Denied)),
    };
    let s = stmt.0.as_ptr();
    // SAFETY: `s` is a live statement.
    if unsafe { ffi::sqlite3_stmt_readonly(s) } == 0 {
        return Err(StepError::NotReadOnly);
    }
    bind_all(db, &stmt, binds)?;
    // SAFETY: `s` is a live statement.
    let count = unsafe { ffi::sqlite3_column_count(s) };
    let columns: Vec<String> = (0..count).map(|i| column_name(s, i)).collect();
    let origins: Vec<Origin> = (0..count).map(|i| column_origin(s, i)).collect();
    head(&columns, &origins);
    let mut read: usize = 0;
    // Declared after `stmt`: dropped (the handler removed) before the statement is
    // finalized, and before `deadline`'s storage goes.
    let _progress = deadline.as_ref().map(|d| Progress::install(db, d));
    let mut held: u64 = 0;
    loop {
        // SAFETY: `s` is live and stepped on this thread only.
        match unsafe { ffi::sqlite3_step(s) } & 0xff {
            ffi::SQLITE_ROW => {
                if read == caps.rows {
                    return Err(StepError::TooManyRows);
                }
                // Sizes first, from SQLite's own lengths: a row past the cap is never
                // copied.
                for i in 0..count {
                    held = held.saturating_add(cell_bytes(payload_bytes(s, i)));
                }
                if held > caps.bytes {
                    return Err(StepError::TooManyBytes);
                }
                read += 1;
                if !each((0..count).map(|i| column(s, i)).collect()) {
                    return Err(StepError::Stopped);
                }
            }
            ffi::SQLITE_DONE => return Ok(()),
            ffi::SQLITE_INTERRUPT if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(StepError::TimedOut);
            }
            // A value longer than the lowered SQLITE_LIMIT_LENGTH: refused before it was
            // made.
            ffi::SQLITE_TOOBIG => return Err(StepError::TooManyBytes),
            _ => match denied.take() {
                // A pragma's table-valued form is prepared while it is stepped.
                Some(what) => return Err(StepError::Denied(what)),
                None => return Err(error(db)),
            },
        }
    }
}

/// The bytes column `i` of the current row will take once copied: text as it is, a
/// blob as hex, numbers and NULL nothing beyond the value itself.
fn payload_bytes(s: *mut ffi::sqlite3_stmt, i: c_int) -> u64 {
    // SAFETY: `s` holds a row and `i` is below its column count. For text and blobs,
    // `sqlite3_column_bytes` reports the length without converting (the value already
    // is of that type), so the pointer `column` reads afterwards stays the same.
    unsafe {
        match ffi::sqlite3_column_type(s, i) {
            ffi::SQLITE_TEXT => u64::try_from(ffi::sqlite3_column_bytes(s, i)).unwrap_or(0),
            ffi::SQLITE_BLOB => 2 * u64::try_from(ffi::sqlite3_column_bytes(s, i)).unwrap_or(0),
            _ => 0,
        }
    }
}

/// `SQLITE_LIMIT_LENGTH` (the longest text or blob SQLite makes) lowered to a byte cap
/// for one statement, restored on drop.
struct LengthLimit {
    db: NonNull<ffi::sqlite3>,
    before: c_int,
}

impl LengthLimit {
    fn lower(db: NonNull<ffi::sqlite3>, bytes: u64) -> LengthLimit {
        // SAFETY: `db` is a live handle the caller holds exclusively; -1 reads the limit.
        let before = unsafe { ffi::sqlite3_limit(db.as_ptr(), ffi::SQLITE_LIMIT_LENGTH, -1) };
        let want = c_int::try_from(bytes).unwrap_or(c_int::MAX).max(1);
        if want < before {
            // SAFETY: as above; SQLite only ever lowers a limit past its compiled maximum.
            unsafe { ffi::sqlite3_limit(db.as_ptr(), ffi::SQLITE_LIMIT_LENGTH, want) };
        }
        LengthLimit { db, before }
    }
}

impl Drop for LengthLimit {
    fn drop(&mut self) {
        // SAFETY: `db` is still locked by the caller of `run`.
        unsafe { ffi::sqlite3_limit(self.db.as_ptr(), ffi::SQLITE_LIMIT_LENGTH, self.before) };
    }
}

/// Pragmas that only read, in their bare form (`PRAGMA page_size`) or their table-valued
/// one (`SELECT * FROM pragma_journal_mode`). With a value (`PRAGMA page_size = 1024`)
/// these set, and are refused; every pragma not listed is refused in any form.
const READ_PRAGMAS: &[&str] = &[
    "application_id",
    "auto_vacuum",
    "automatic_index",
    "busy_timeout",
    "cache_size",
    "cache_spill",
    "cell_size_check",
    "collation_list",
    "compile_options",
    "data_version",
    "database_list",
    "encoding",
    "foreign_keys",
    "freelist_count",
    "function_list",
    "journal_mode",
    "journal_size_limit",
    "locking_mode",
    "max_page_count",
    "mmap_size",
    "module_list",
    "page_count",
    "page_size",
    "pragma_list",
    "query_only",
    "schema_version",
    "secure_delete",
    "synchronous",
    "temp_store",
    "user_version",
    "wal_autocheckpoint",
];

/// Pragmas whose argument names what to read (a table, an index), never a new setting.
const SCHEMA_PRAGMAS: &[&str] = &[
    "foreign_key_list",
    "index_info",
    "index_list",
    "index_xinfo",
    "table_info",
    "table_list",
    "table_xinfo",
];

/// SQL functions that reach outside the database (files, shared libraries) or change how
/// the connection parses text; refused even where SQLite would judge them harmless.
const DENIED_FUNCTIONS: &[&str] = &[
    "load_extension",
    "readfile",
    "writefile",
    "edit",
    "fts3_tokenizer",
];

/// What the authorizer decides for one action (SQLite's action code and its two first
/// arguments); `Err` says what was refused, for the user.
fn authorize(action: c_int, first: Option<&str>, second: Option<&str>) -> Result<(), String> {
    match action {
        ffi::SQLITE_SELECT | ffi::SQLITE_READ | ffi::SQLITE_RECURSIVE => Ok(()),
        ffi::SQLITE_FUNCTION => {
            let name = second.unwrap_or_default();
            if DENIED_FUNCTIONS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(name))
            {
                Err(format!(
                    "the function {name}() reaches outside the database"
                ))
            } else {
                Ok(())
            }
        }
        ffi::SQLITE_PRAGMA => {
            let name = first.unwrap_or_default();
            let listed = |list: &[&str]| list.iter().any(|p| p.eq_ignore_ascii_case(name));
            match second {
                None if listed(READ_PRAGMAS) || listed(SCHEMA_PRAGMAS) => Ok(()),
                Some(_) if listed(SCHEMA_PRAGMAS) => Ok(()),
                Some(value) if listed(READ_PRAGMAS) => Err(format!(
                    "PRAGMA {name} = {value} changes a setting (read it with `SELECT * FROM pragma_{name}`)"
                )),
                _ => Err(format!("PRAGMA {name} is not one that only reads")),
            }
        }
        ffi::SQLITE_ATTACH => Err("ATTACH opens another database".into()),
        ffi::SQLITE_DETACH => Err("DETACH changes the connection".into()),
        ffi::SQLITE_TRANSACTION | ffi::SQLITE_SAVEPOINT => {
            Err("transaction control (each statement runs on its own)".into())
        }
        _ => Err("the statement would change the database".into()),
    }
}

/// The authorizer of [`run`], removed on drop. Records what it refused in the borrowed
/// cell (SQLite reports only "not authorized").
struct Authorizer<'c> {
    db: NonNull<ffi::sqlite3>,
    _denied: PhantomData<&'c Cell<Option<String>>>,
}

impl<'c> Authorizer<'c> {
    fn install(db: NonNull<ffi::sqlite3>, denied: &'c Cell<Option<String>>) -> Authorizer<'c> {
        unsafe extern "C" fn decide(
            arg: *mut c_void,
            action: c_int,
            first: *const c_char,
            second: *const c_char,
            _db_name: *const c_char,
            _trigger: *const c_char,
        ) -> c_int {
            let text = |p: *const c_char| {
                if p.is_null() {
                    return None;
                }
                // SAFETY: SQLite passes NUL-terminated strings (or NULL, excluded above),
                // valid for the duration of the call.
                unsafe { CStr::from_ptr(p) }.to_str().ok()
            };
            match authorize(action, text(first), text(second)) {
                Ok(()) => ffi::SQLITE_OK,
                Err(what) => {
                    // SAFETY: `arg` is the cell given below, alive while the authorizer
                    // is installed (the borrow of `Authorizer`), used on this thread only.
                    let denied = unsafe { &*arg.cast::<Cell<Option<String>>>() };
                    // The first refusal is the one to report.
                    let first = denied.take();
                    denied.set(first.or(Some(what)));
                    ffi::SQLITE_DENY
                }
            }
        }
        let arg = ptr::from_ref(denied).cast_mut().cast::<c_void>();
        // SAFETY: `db` is a live handle the caller holds exclusively; the callback only
        // touches the cell, and is removed (drop) before the borrow ends.
        unsafe { ffi::sqlite3_set_authorizer(db.as_ptr(), Some(decide), arg) };
        Authorizer {
            db,
            _denied: PhantomData,
        }
    }
}

impl Drop for Authorizer<'_> {
    fn drop(&mut self) {
        // SAFETY: `db` is still locked by the caller of `run`; this removes the callback.
        unsafe { ffi::sqlite3_set_authorizer(self.db.as_ptr(), None, ptr::null_mut()) };
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

    /// A database file written by `setup` (each statement run in order), then opened again
    /// as `query` opens it: read-only, `query_only`.
    async fn read_only_db(db: &std::path::Path, setup: &[&'static str]) -> SqliteConnection {
        let mut c = SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", db.display()))
            .await
            .unwrap();
        for sql in setup {
            sqlx::query(*sql).execute(&mut c).await.unwrap();
        }
        c.close().await.unwrap();
        let mut c = SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .unwrap();
        sqlx::query("PRAGMA query_only = 1")
            .execute(&mut c)
            .await
            .unwrap();
        c
    }

    fn caps(rows: usize) -> Caps {
        Caps {
            rows,
            bytes: u64::MAX,
        }
    }

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
                caps(10),
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
                run(&mut h, "SELECT k FROM t", &[], caps(2), None),
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
                run(
                    &mut h,
                    "SELECT 1; PRAGMA query_only = 0",
                    &[],
                    caps(10),
                    None
                ),
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
        // WAL, as the collector's databases: the refused pragma would leave it.
        let mut c = read_only_db(
            &db,
            &[
                "PRAGMA journal_mode = WAL",
                "CREATE TABLE t (x INTEGER, b INTEGER)",
                "INSERT INTO t VALUES (1, 0)",
            ],
        )
        .await;
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
                    matches!(
                        run(&mut h, sql, &[], caps(10), None),
                        Err(StepError::NotReadOnly | StepError::Denied(_))
                    ),
                    "{sql}"
                );
            }
            assert!(!target.exists(), "VACUUM INTO created its file");
            let rows = run(
                &mut h,
                "SELECT x AS y, b, x + 1 AS z FROM t",
                &[],
                caps(10),
                None,
            )
            .unwrap();
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
            run(&mut h, forever, &[], caps(10), Some(deadline)),
            Err(StepError::TimedOut)
        ));
        let done = run(
            &mut h,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
             SELECT count(*) AS c FROM n",
            &[],
            caps(10),
            None,
        )
        .unwrap();
        assert_eq!(done.rows, [vec![Value::from(100_000)]]);
    }

    /// A read-only connection cannot be switched back, nor reach another file: the
    /// authorizer refuses the pragma while it is prepared (SQLite applies a flag pragma
    /// then, before any step) and ATTACH before it opens anything; pragmas that only read
    /// still work, in every form.
    #[tokio::test]
    async fn the_authorizer_refuses_what_is_not_a_question() {
        let dir = std::env::temp_dir().join(format!("ls-step-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("ro.db");
        let other = dir.join("other.db");
        let created = dir.join("created.db");
        read_only_db(&other, &["CREATE TABLE t (x INTEGER)"])
            .await
            .close()
            .await
            .unwrap();
        let mut c = read_only_db(&db, &["CREATE TABLE t (x INTEGER)"]).await;
        {
            let mut h = c.lock_handle().await.unwrap();
            let attach_other = format!("ATTACH '{}' AS o", other.display());
            let attach_new = format!("ATTACH 'file:{}?mode=rwc' AS n", created.display());
            for (sql, says) in [
                ("PRAGMA query_only = 0", "query_only"),
                ("PRAGMA query_only = false", "query_only"),
                ("PRAGMA writable_schema = 1", "writable_schema"),
                ("PRAGMA wal_checkpoint", "wal_checkpoint"),
                ("PRAGMA optimize", "optimize"),
                (attach_other.as_str(), "ATTACH"),
                (attach_new.as_str(), "ATTACH"),
                ("DETACH main", "DETACH"),
                ("BEGIN IMMEDIATE", "transaction"),
                (
                    "SELECT load_extension('/nonexistent/libx.so')",
                    "load_extension",
                ),
                ("SELECT * FROM pragma_optimize", "optimize"),
            ] {
                match run(&mut h, sql, &[], caps(10), None) {
                    Err(StepError::Denied(what)) => assert!(what.contains(says), "{sql}: {what}"),
                    other => panic!("{sql}: {other:?}"),
                }
            }
            assert!(!created.exists(), "ATTACH created {}", created.display());
            for sql in [
                "PRAGMA query_only",
                "PRAGMA table_info(t)",
                "SELECT * FROM pragma_table_info('t')",
                "SELECT * FROM pragma_journal_mode",
                "SELECT name FROM pragma_database_list",
            ] {
                let rows =
                    run(&mut h, sql, &[], caps(10), None).unwrap_or_else(|e| panic!("{sql}: {e}"));
                assert!(!rows.rows.is_empty(), "{sql}");
            }
            let list = run(
                &mut h,
                "SELECT name FROM pragma_database_list",
                &[],
                caps(10),
                None,
            )
            .unwrap();
            assert_eq!(list.rows, [vec![Value::from("main")]]);
        }
        let on: i64 = sqlx::query_scalar("PRAGMA query_only")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(on, 1, "a refused statement switched query_only off");
        // The authorizer is gone afterwards: sqlx's own statements are not judged.
        sqlx::query("PRAGMA query_only = 1")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Past the byte cap stepping stops; a single value larger than the cap is refused
    /// before SQLite makes it; the connection's length limit is back afterwards.
    #[tokio::test]
    async fn the_byte_cap_stops_stepping_and_refuses_big_values() {
        let mut c = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let mut h = c.lock_handle().await.unwrap();
        let cap = Caps {
            rows: 1_000_000,
            bytes: 1 << 20,
        };
        let rows_1k = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n \
                       WHERE i < 10000) SELECT i, printf('%.1000c', 'x') FROM n";
        assert!(matches!(
            run(&mut h, rows_1k, &[], cap, None),
            Err(StepError::TooManyBytes)
        ));
        for sql in [
            "SELECT zeroblob(500000000)",
            "SELECT length(zeroblob(500000000))",
            "SELECT randomblob(2000000)",
        ] {
            match run(&mut h, sql, &[], cap, None) {
                Err(StepError::TooManyBytes) => {}
                Err(StepError::Sqlite { code, .. }) if code & 0xff == ffi::SQLITE_TOOBIG => {}
                other => panic!("{sql}: {other:?}"),
            }
        }
        // Within the cap: the whole result.
        let small = run(
            &mut h,
            "SELECT length(zeroblob(100000)) AS n, printf('%.1000c', 'x') AS t",
            &[],
            cap,
            None,
        )
        .unwrap();
        assert_eq!(small.rows[0][0], Value::from(100_000));
        // Uncapped again (the reports): SQLite's own limit is back.
        let big = run(
            &mut h,
            "SELECT length(zeroblob(50000000)) AS n",
            &[],
            caps(10),
            None,
        )
        .unwrap();
        assert_eq!(big.rows[0][0], Value::from(50_000_000));
    }
}
