//! Running one read-only statement on a SQLite connection's own handle, stepping it on the
//! caller's thread. The only `unsafe` of the store, kept to this file behind a safe API.
//!
//! Why: sqlx runs SQLite on a worker thread and hands every result row over through a
//! channel, one wake-up and two context switches per row. For `query` printing 30,000 rows
//! that was 80 % of the time (164 ms against 31 ms for `sqlite3` itself). With the handle
//! locked out of the worker ([`sqlx::sqlite::SqliteConnection::lock_handle`]) the
//! statement is stepped here, without hand-offs. The connection keeps everything sqlx set
//! on it (`query_only`, read-only open, busy timeout).

use std::ffi::{CStr, c_char, c_int};
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use serde_json::Value;

/// A parameter bound by position.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bind<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

/// Why a statement failed.
#[derive(Debug)]
pub(crate) enum StepError {
    /// SQLite's error: its extended result code and message.
    Sqlite { code: c_int, message: String },
    /// No statement in the text (empty, or only comments).
    Empty,
    /// More than one statement in the text.
    Several,
    /// More rows than the caller's bound.
    TooManyRows,
}

/// Column names and rows (integers, reals, text, null; blobs as hex text).
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub columns: Vec<String>,
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

/// Runs the one statement in `sql` with `binds` on `db` and returns at most `max_rows`
/// rows. `db` must be held exclusively for the call (a locked sqlx handle).
pub(crate) fn run(
    db: NonNull<ffi::sqlite3>,
    sql: &str,
    binds: &[Bind<'_>],
    max_rows: usize,
) -> Result<Rows, StepError> {
    let (first, rest) = prepare(db, sql, 0)?;
    let Some(stmt) = first else {
        return Err(StepError::Empty);
    };
    if rest < sql.len() && prepare(db, sql, rest)?.0.is_some() {
        return Err(StepError::Several);
    }
    let s = stmt.0.as_ptr();
    for (i, b) in binds.iter().enumerate() {
        let at = c_int::try_from(i + 1).unwrap_or(c_int::MAX);
        // SAFETY: `s` is a live statement; text is copied by SQLite (SQLITE_TRANSIENT)
        // before the call returns.
        let rc = unsafe {
            match *b {
                Bind::Int(Some(v)) => ffi::sqlite3_bind_int64(s, at, v),
                Bind::Text(Some(t)) => ffi::sqlite3_bind_text(
                    s,
                    at,
                    t.as_ptr().cast(),
                    c_int::try_from(t.len()).unwrap_or(c_int::MAX),
                    ffi::SQLITE_TRANSIENT(),
                ),
                Bind::Int(None) | Bind::Text(None) => ffi::sqlite3_bind_null(s, at),
            }
        };
        if rc != ffi::SQLITE_OK {
            return Err(error(db));
        }
    }
    // SAFETY: `s` is a live statement.
    let count = unsafe { ffi::sqlite3_column_count(s) };
    let mut out = Rows {
        columns: (0..count).map(|i| column_name(s, i)).collect(),
        rows: Vec::new(),
    };
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
            _ => return Err(error(db)),
        }
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
