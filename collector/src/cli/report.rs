//! The fleet questions: `query`, `exposure`, `hosts`, `diff`.
//!
//! Errors reach `main` as one message each (the cause said once, with the fix); exit
//! codes are grep's: 0 done (for `exposure`: a host matches), 1 `exposure` found no host,
//! 2 error.

#![allow(clippy::print_stdout)] // CLI output code: printing to stdout is its job

use std::io::{self, Write};
use std::time::Duration;

use clap::{Args, ValueEnum};
use listenscope_core::exit::Exit;

use crate::history;
use crate::query::{self, Format, ReadOnly};
use crate::store::DbUrl;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// JSON array of objects (booleans as true/false, JSON columns nested, on both
    /// databases).
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// CSV (LF line ends) with a header line, even for zero rows.
    #[arg(long)]
    pub csv: bool,
    /// Leave out the header line of the table or CSV (and the table's row count).
    #[arg(long, conflicts_with = "json")]
    pub no_header: bool,
}

/// How many rows a report prints.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Print at most N rows (0: all); how many were left out goes to stderr.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub limit: usize,
}

impl LimitArgs {
    fn get(&self) -> Option<usize> {
        (self.limit > 0).then_some(self.limit)
    }
}

impl OutputArgs {
    fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else if self.csv {
            Format::Csv
        } else {
            Format::Table
        }
    }
}

/// What `query --help` adds after the options: the views, from the one list.
fn query_help() -> String {
    format!(
        "Views: {} (docs/views.md).\n\nOne read-only statement: anything that would change \
         the database is refused before it runs. On PostgreSQL, connect as a role that may \
         only read the views (docs/postgres.md): a superuser, or a role that may write, is \
         refused unless --allow-privileged-role is given. A result past --max-rows or \
         --max-bytes is not printed: the statement is stopped there and fails.\n\nExit \
         status: 0 done, 2 error.",
        query::VIEWS
    )
}

/// What `exposure --help` adds after the options.
fn exposure_help() -> String {
    format!(
        "TIME: {}.\n\nExit status (as grep): 0 a host matches, 1 no host matches, 2 error \
         (bad flag value, database unreachable or without listenscope tables).",
        history::TIME_FORMS
    )
}

/// What `diff --help` adds after the options.
fn diff_help() -> String {
    format!(
        "TIME: {}.\n\nExit status: 0 done (changes or none), 2 error.",
        history::TIME_FORMS
    )
}

#[derive(Debug, Args)]
#[command(after_help = query_help())]
pub struct QueryArgs {
    /// Database: sqlite://PATH or postgres://USER@HOST/DB (as `serve --db`).
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    /// The SQL to run: one read-only statement over the views.
    pub sql: String,
    /// Stop the statement after this long (e.g. 30s, 5m), on SQLite and PostgreSQL.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        value_parser = listenscope_core::config::parse_duration
    )]
    pub timeout: Duration,
    /// Stop and fail (exit 2) past this many rows: a table prints nothing; CSV and JSON,
    /// written as the rows are read, stop there (JSON left unclosed).
    #[arg(
        long,
        value_name = "N",
        default_value_t = query::MAX_ROWS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_rows: usize,
    /// Stop and fail (exit 2) past this many bytes of values: each value's text plus 32
    /// bytes per value (e.g. 64MiB, 1GiB). It bounds a table's memory (built whole); CSV
    /// and JSON are streamed, so it bounds their output. A single larger value is refused
    /// before it is made on SQLite.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = query::parse_bytes)]
    pub max_bytes: u64,
    /// On PostgreSQL, run even as a superuser or a role that may write (a warning is
    /// logged): such a role can reach server files and programs through SQL.
    #[arg(long)]
    pub allow_privileged_role: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
#[command(after_help = exposure_help())]
pub struct ExposureArgs {
    /// Database: sqlite://PATH or postgres://USER@HOST/DB (as `serve --db`).
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    /// Only this port (default: every port).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<ProtoArg>,
    /// As of this time instead of now: an age (24h, 7d), a UTC time (2026-11-27
    /// 09:00:00), RFC 3339 or a date (forms below).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    #[command(flatten)]
    pub limit: LimitArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
#[command(after_help = diff_help())]
pub struct DiffArgs {
    /// Database: sqlite://PATH or postgres://USER@HOST/DB (as `serve --db`).
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    /// Only this host (default: the whole fleet).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Start of the window: an age (24h, 7d), a UTC time (2026-11-27 09:00:00), RFC 3339
    /// or a date (forms below).
    #[arg(long, value_name = "TIME")]
    pub since: String,
    /// End of the window (default: now).
    #[arg(long, value_name = "TIME", default_value = "now")]
    pub until: String,
    #[command(flatten)]
    pub limit: LimitArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Exit status: 0 done, 2 error.")]
pub struct HostsArgs {
    /// Database: sqlite://PATH or postgres://USER@HOST/DB (as `serve --db`).
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    #[command(flatten)]
    pub limit: LimitArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

fn print(rs: &query::ResultSet, output: &OutputArgs) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let written = query::write_with(rs, output.format(), !output.no_header, &mut out);
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

async fn open_ro(db: &str) -> anyhow::Result<ReadOnly> {
    let url: DbUrl = db.parse().map_err(anyhow::Error::msg)?;
    ReadOnly::open(&url).await.map_err(once)
}

/// The error as one message: its text already carries its cause (`StoreError` and
/// `QueryError` messages are whole), so no chain is printed after it.
fn once(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::msg(e.to_string())
}

pub(super) async fn query_cmd(a: QueryArgs) -> anyhow::Result<Exit> {
    let ro = open_ro(&a.db).await?;
    if let Err(e) = check_role(&ro, a.allow_privileged_role).await {
        ro.close().await;
        return Err(once(e));
    }
    let bounds = query::Bounds {
        timeout: a.timeout,
        max_rows: a.max_rows,
        max_bytes: a.max_bytes,
    };
    // CSV and JSON are written as the rows are read (memory stays one row whatever
    // --max-bytes allows); a table needs every row for its column widths, so it is built
    // whole, within the bounds.
    let streamed = match a.output.format() {
        Format::Table => None,
        Format::Csv => Some(Box::new(query::CsvSink {
            out: io::BufWriter::new(io::stdout()),
            header: !a.output.no_header,
        }) as Box<dyn query::RowSink + Send>),
        Format::Json => Some(
            Box::new(query::JsonSink::new(io::BufWriter::new(io::stdout())))
                as Box<dyn query::RowSink + Send>,
        ),
    };
    let Some(mut sink) = streamed else {
        let rs = ro.run_bounded(&a.sql, &[], bounds).await;
        ro.close().await;
        print(&rs.map_err(once)?, &a.output)?;
        return Ok(Exit::Success);
    };
    let done = ro.run_streaming(&a.sql, bounds, &mut *sink).await;
    ro.close().await;
    match done {
        // A reader that went away (`| head`) ends the output quietly.
        Err(query::QueryError::OutputClosed) => Ok(Exit::Success),
        Err(e) => Err(once(e)),
        Ok(()) => Ok(Exit::Success),
    }
}

/// Refuses a PostgreSQL role that could do more than read, unless `allow` (then warns).
async fn check_role(ro: &ReadOnly, allow: bool) -> Result<(), query::QueryError> {
    let Some((role, can)) = ro.privileges().await? else {
        return Ok(());
    };
    if can.is_empty() {
        return Ok(());
    }
    let can = can.join(", and ");
    if allow {
        tracing::warn!(
            role = %role,
            "Running query as a privileged PostgreSQL role (--allow-privileged-role): it {can}."
        );
        return Ok(());
    }
    Err(query::QueryError::PrivilegedRole { role, can })
}

pub(super) async fn exposure_cmd(a: ExposureArgs) -> anyhow::Result<Exit> {
    let ro = open_ro(&a.db).await?;
    let proto = a.proto.map(|p| match p {
        ProtoArg::Tcp => "tcp",
        ProtoArg::Udp => "udp",
    });
    let now = time::OffsetDateTime::now_utc();
    let at = match &a.at {
        Some(t) => Some(history::parse_time(t, now).map_err(|e| anyhow::anyhow!("--at: {e}"))?),
        None => None,
    };
    let report = match at {
        Some(at) => history::exposure_at(&ro, at, a.port, proto, a.limit.get()).await,
        None => query::exposure(&ro, a.port, proto, a.limit.get()).await,
    };
    ro.close().await;
    let report = report.map_err(once)?;
    let rs = report_rows(report);
    let format = a.output.format();
    // Without a header the table is for a script: no sentence, the exit code says it.
    if format == Format::Table && rs.rows.is_empty() && !a.output.no_header {
        let what = match (a.port, proto) {
            (Some(p), Some(pr)) => format!("{pr} port {p}"),
            (Some(p), None) => format!("port {p}"),
            (None, Some(pr)) => format!("any {pr} port"),
            (None, None) => "any port".to_string(),
        };
        match at {
            Some(at) => println!(
                "No host exposed {what} over IPv4 while netstat showed only IPv6 lines for it at {}.",
                crate::timefmt::format(at)
            ),
            None => println!(
                "No host exposes {what} over IPv4 while netstat shows only IPv6 lines for it."
            ),
        }
        return Ok(Exit::NothingFound);
    }
    let found = if rs.rows.is_empty() {
        Exit::NothingFound
    } else {
        Exit::Success
    };
    print(&rs, &a.output)?;
    Ok(found)
}

pub(super) async fn diff_cmd(a: DiffArgs) -> anyhow::Result<Exit> {
    let now = time::OffsetDateTime::now_utc();
    let since = history::parse_time(&a.since, now).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let until = history::parse_time(&a.until, now).map_err(|e| anyhow::anyhow!("--until: {e}"))?;
    if since >= until {
        anyhow::bail!(
            "--since must be before --until ({} is not before {})",
            crate::timefmt::format(since),
            crate::timefmt::format(until)
        );
    }
    let ro = open_ro(&a.db).await?;
    // The host as the collector records it (lower case, no trailing dot).
    let host = a
        .host
        .as_deref()
        .map(|h| crate::tls::canonical_host_name(h).unwrap_or_else(|| h.to_string()));
    let report = history::diff(&ro, host.as_deref(), since, until, a.limit.get()).await;
    ro.close().await;
    let mut rs = report_rows(report.map_err(once)?);
    let format = a.output.format();
    if format == Format::Table && rs.rows.is_empty() && !a.output.no_header {
        let who = a.host.as_deref().unwrap_or("the fleet");
        println!(
            "Nothing changed on {who} between {} and {}.",
            crate::timefmt::format(since),
            crate::timefmt::format(until)
        );
        return Ok(Exit::Success);
    }
    if format == Format::Table {
        // The structured before/after columns are for programs (CSV, JSON); people read
        // them in `detail`.
        rs = project(rs, &history::DIFF_TABLE_COLUMNS);
    }
    print(&rs, &a.output)?;
    Ok(Exit::Success)
}

/// Only the named columns, in that order (names missing from `rs` are skipped).
fn project(rs: query::ResultSet, names: &[&str]) -> query::ResultSet {
    let picks: Vec<usize> = names
        .iter()
        .filter_map(|n| rs.columns.iter().position(|c| c == n))
        .collect();
    query::ResultSet {
        columns: picks.iter().map(|&i| rs.columns[i].clone()).collect(),
        rows: rs
            .rows
            .into_iter()
            .map(|r| {
                picks
                    .iter()
                    .map(|&i| r.get(i).cloned().unwrap_or_default())
                    .collect()
            })
            .collect(),
    }
}

pub(super) async fn hosts_cmd(a: HostsArgs) -> anyhow::Result<Exit> {
    let ro = open_ro(&a.db).await?;
    let report = query::hosts(&ro, a.limit.get()).await;
    ro.close().await;
    let mut rs = report_rows(report.map_err(once)?);
    if a.output.format() == Format::Table {
        // The watch mode's reason and time are for programs (CSV, JSON) and the view.
        rs = project(rs, query::HOSTS_TABLE_COLUMNS);
    }
    print(&rs, &a.output)?;
    Ok(Exit::Success)
}

/// The rows to print; how many the limit left out goes to stderr (stdout stays one
/// table, CSV or JSON document).
fn report_rows(report: history::Report) -> query::ResultSet {
    if report.left_out > 0 {
        eprintln!(
            "{} more rows not shown (--limit {}); raise --limit, or --limit 0 for all.",
            report.left_out,
            report.rows.rows.len()
        );
    }
    report.rows
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    /// The flag's default is the library's (one number, two places that must agree).
    #[test]
    fn timeout_default_is_the_library_default() {
        let cli = Cli::try_parse_from(["listenscope-collector", "query", "--db", "x", "SELECT 1"])
            .unwrap();
        let Command::Query(q) = cli.command else {
            panic!("not query")
        };
        assert_eq!(q.timeout, crate::query::DEFAULT_TIMEOUT);
        let defaults = crate::query::Bounds::default();
        assert_eq!(q.max_rows, defaults.max_rows);
        assert_eq!(q.max_bytes, defaults.max_bytes);
        assert!(!q.allow_privileged_role);
    }
}
