//! Answers for SRE teams: arbitrary SQL on a read-only connection, and the ready reports
//! (`exposure`, `hosts`), rendered as a table, JSON or CSV.
//!
//! Read-only is enforced by the database, not by parsing SQL: SQLite connections run with
//! `PRAGMA query_only`. A statement that would write fails there and is reported as
//! refused, with what to do instead.

use std::io::{self, Write};

use comfy_table::{Table, presets};
use futures_util::TryStreamExt;
use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};

use crate::store::{DbUrl, StoreError, sqlite};

/// Most rows one answer carries; bigger results are an error asking for LIMIT.
pub const MAX_ROWS: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "refused: this connection is read-only ({0}). `query` answers SELECTs over the views \
         (current_listeners, hidden_ipv4_exposure, hosts, listener_changes, listener_history); \
         the collector alone writes"
    )]
    WriteRefused(String),
    #[error("SQL error: {0}")]
    Sql(String),
    #[error("the result has more than {MAX_ROWS} rows; add a LIMIT or a WHERE")]
    TooManyRows,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A read-only database handle.
#[derive(Debug, Clone)]
pub enum ReadOnly {
    Sqlite(sqlx::SqlitePool),
}

/// A parameter for the prepared report queries.
#[derive(Debug, Clone)]
pub enum Param {
    Int(Option<i64>),
    Text(Option<String>),
}

/// Column names and rows of JSON values (integers, reals, text, null; blobs as hex text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl ReadOnly {
    pub async fn open(url: &DbUrl) -> Result<ReadOnly, StoreError> {
        match url {
            DbUrl::Sqlite(path) => Ok(ReadOnly::Sqlite(sqlite::open_read_only(path).await?)),
            DbUrl::Postgres(_) => Err(StoreError::Corrupt(
                "PostgreSQL is not supported by this build".into(),
            )),
        }
    }

    pub async fn close(&self) {
        match self {
            ReadOnly::Sqlite(p) => p.close().await,
        }
    }

    /// Runs `sql` with `params` bound in order.
    pub async fn run(&self, sql: &str, params: &[Param]) -> Result<ResultSet, QueryError> {
        match self {
            ReadOnly::Sqlite(pool) => {
                let mut q = sqlx::query(AssertSqlSafe(sql.to_string()));
                for p in params {
                    q = match p {
                        Param::Int(v) => q.bind(*v),
                        Param::Text(v) => q.bind(v.clone()),
                    };
                }
                let mut rows = q.fetch(pool);
                let mut out = ResultSet::default();
                while let Some(row) = rows.try_next().await.map_err(sql_error)? {
                    if out.columns.is_empty() {
                        out.columns = row.columns().iter().map(|c| c.name().to_string()).collect();
                    }
                    if out.rows.len() == MAX_ROWS {
                        return Err(QueryError::TooManyRows);
                    }
                    out.rows.push(sqlite_row(&row)?);
                }
                Ok(out)
            }
        }
    }
}

fn sql_error(e: sqlx::Error) -> QueryError {
    let msg = match &e {
        sqlx::Error::Database(d) => d.message().to_string(),
        other => other.to_string(),
    };
    let lower = msg.to_lowercase();
    if lower.contains("readonly") || lower.contains("read-only") || lower.contains("read only") {
        QueryError::WriteRefused(msg)
    } else {
        QueryError::Sql(msg)
    }
}

fn sqlite_row(row: &sqlx::sqlite::SqliteRow) -> Result<Vec<Value>, QueryError> {
    let mut out = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        let raw = row.try_get_raw(i).map_err(sql_error)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        // SQLite is dynamically typed: decode by the value's own storage class.
        let v = match raw.type_info().name() {
            "INTEGER" | "BOOLEAN" => {
                Value::from(row.try_get_unchecked::<i64, _>(i).map_err(sql_error)?)
            }
            "REAL" => Value::from(row.try_get_unchecked::<f64, _>(i).map_err(sql_error)?),
            "BLOB" => {
                let b: Vec<u8> = row.try_get_unchecked(i).map_err(sql_error)?;
                Value::from(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
            }
            _ => Value::from(row.try_get_unchecked::<String, _>(i).map_err(sql_error)?),
        };
        out.push(v);
    }
    Ok(out)
}

/// The headline: ports reachable over IPv4 although netstat shows only IPv6 lines.
pub async fn exposure(
    ro: &ReadOnly,
    port: Option<u16>,
    protocol: Option<&str>,
) -> Result<ResultSet, QueryError> {
    ro.run(
        "SELECT host, netns, protocol, port, shown_as, processes FROM hidden_ipv4_exposure
         WHERE (?1 IS NULL OR port = ?1) AND (?2 IS NULL OR protocol = ?2)
         ORDER BY host, netns, protocol, port",
        &[
            Param::Int(port.map(i64::from)),
            Param::Text(protocol.map(str::to_string)),
        ],
    )
    .await
}

/// Hosts, silent ones first.
pub async fn hosts(ro: &ReadOnly) -> Result<ResultSet, QueryError> {
    ro.run(
        "SELECT host, os_hostname, agent_version, first_seen, last_seen, stale, listeners
         FROM hosts ORDER BY stale DESC, host",
        &[],
    )
    .await
}

/// Output formats of `query`, `exposure`, `hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

pub fn write(rs: &ResultSet, format: Format, out: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Table => write_table(rs, out),
        Format::Json => write_json(rs, out),
        Format::Csv => write_csv(rs, out),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn write_table(rs: &ResultSet, out: &mut dyn Write) -> io::Result<()> {
    if rs.columns.is_empty() {
        return writeln!(out, "(no rows)");
    }
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header(
        rs.columns
            .iter()
            .map(|c| c.to_uppercase())
            .collect::<Vec<_>>(),
    );
    for r in &rs.rows {
        t.add_row(r.iter().map(cell).collect::<Vec<_>>());
    }
    for line in t.to_string().lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    writeln!(
        out,
        "({} row{})",
        rs.rows.len(),
        if rs.rows.len() == 1 { "" } else { "s" }
    )
}

/// An array of objects keyed by column name.
pub fn write_json(rs: &ResultSet, out: &mut dyn Write) -> io::Result<()> {
    let rows: Vec<Value> = rs
        .rows
        .iter()
        .map(|r| {
            let mut m = Map::new();
            for (c, v) in rs.columns.iter().zip(r) {
                m.insert(c.clone(), v.clone());
            }
            Value::Object(m)
        })
        .collect();
    serde_json::to_writer(&mut *out, &rows).map_err(io::Error::other)?;
    writeln!(out)
}

/// RFC 4180: a header line, fields quoted when they hold a comma, quote or line break.
pub fn write_csv(rs: &ResultSet, out: &mut dyn Write) -> io::Result<()> {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let line = |cells: Vec<String>| cells.iter().map(|c| field(c)).collect::<Vec<_>>().join(",");
    write!(out, "{}\r\n", line(rs.columns.clone()))?;
    for r in &rs.rows {
        write!(out, "{}\r\n", line(r.iter().map(cell).collect()))?;
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

    #[test]
    fn csv_quotes() {
        let mut out = Vec::new();
        write_csv(&rs(), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "host,port,note\r\nh1,80,\r\nh2,443,\"a,\"\"b\"\"\nc\"\r\n"
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
