//! The fleet questions: `query`, `exposure`, `hosts`, `diff`.

#![allow(clippy::print_stdout)] // CLI output code: printing to stdout is its job

use std::io::{self, Write};

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
    /// JSON array of objects.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// CSV with a header line.
    #[arg(long)]
    pub csv: bool,
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

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Database URL.
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    /// The SQL to run (read-only).
    pub sql: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ExposureArgs {
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    /// Only this port (default: every port).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<ProtoArg>,
    /// As of this time (RFC 3339, or an age such as 24h) instead of now.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    #[command(flatten)]
    pub limit: LimitArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    /// Only this host (default: the whole fleet).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Start of the window: RFC 3339 (2026-11-24T10:00:00Z) or an age (24h, 7d).
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
pub struct HostsArgs {
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    #[command(flatten)]
    pub limit: LimitArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

fn print(rs: &query::ResultSet, format: Format) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    match query::write(rs, format, &mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

async fn open_ro(db: &str) -> anyhow::Result<ReadOnly> {
    let url: DbUrl = db.parse().map_err(anyhow::Error::msg)?;
    Ok(ReadOnly::open(&url).await?)
}

pub(super) async fn query_cmd(a: QueryArgs) -> anyhow::Result<Exit> {
    let ro = open_ro(&a.db).await?;
    let rs = ro.run(&a.sql, &[]).await?;
    ro.close().await;
    print(&rs, a.output.format())?;
    Ok(Exit::Success)
}

pub(super) async fn exposure_cmd(a: ExposureArgs) -> anyhow::Result<Exit> {
    let ro = open_ro(&a.db).await?;
    let proto = a.proto.map(|p| match p {
        ProtoArg::Tcp => "tcp",
        ProtoArg::Udp => "udp",
    });
    let now = time::OffsetDateTime::now_utc();
    let at = match &a.at {
        Some(t) => Some(history::parse_time(t, now).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let report = match at {
        Some(at) => history::exposure_at(&ro, at, a.port, proto, a.limit.get()).await?,
        None => query::exposure(&ro, a.port, proto, a.limit.get()).await?,
    };
    ro.close().await;
    let rs = report_rows(report);
    let format = a.output.format();
    if format == Format::Table && rs.rows.is_empty() {
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
    print(&rs, format)?;
    Ok(found)
}

pub(super) async fn diff_cmd(a: DiffArgs) -> anyhow::Result<Exit> {
    let now = time::OffsetDateTime::now_utc();
    let since = history::parse_time(&a.since, now).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let until = history::parse_time(&a.until, now).map_err(|e| anyhow::anyhow!("--until: {e}"))?;
    if since >= until {
        anyhow::bail!("--since must be before --until ({since} is not before {until})");
    }
    let ro = open_ro(&a.db).await?;
    let report = history::diff(&ro, a.host.as_deref(), since, until, a.limit.get()).await?;
    ro.close().await;
    let rs = report_rows(report);
    let format = a.output.format();
    if format == Format::Table && rs.rows.is_empty() {
        let who = a.host.as_deref().unwrap_or("the fleet");
        println!(
            "Nothing changed on {who} between {} and {}.",
            crate::timefmt::format(since),
            crate::timefmt::format(until)
        );
        return Ok(Exit::Success);
    }
    print(&rs, format)?;
    Ok(Exit::Success)
}

pub(super) async fn hosts_cmd(a: HostsArgs) -> anyhow::Result<Exit> {
    let ro = open_ro(&a.db).await?;
    let report = query::hosts(&ro, a.limit.get()).await?;
    ro.close().await;
    let rs = report_rows(report);
    print(&rs, a.output.format())?;
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
