//! Command line of `listenscope-collector`.

#![allow(clippy::print_stdout)] // CLI output code: printing to stdout is its job

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::RawConfig;
use crate::ingest::Limits;
use crate::query::{self, Format, ReadOnly};
#[cfg(feature = "quickstart")]
use crate::quickstart;
use crate::store::{DbUrl, Store, StoreOptions};
use crate::{history, pki, server, tls};

/// listenscope collector: stores what agents report, answers questions across the fleet.
#[derive(Debug, Parser)]
#[command(name = "listenscope-collector", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server that agents stream to.
    Serve(ServeArgs),
    /// Create the fleet CA, the server certificate and agent certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run SQL on a read-only connection (views: current_listeners, effective_exposure,
    /// hidden_ipv4_exposure, hosts, listener_changes, listener_history, listener_versions;
    /// see docs/views.md).
    Query(QueryArgs),
    /// Which hosts expose a port over IPv4 although netstat shows only IPv6 lines, with
    /// what their firewall lets through over IPv4 (open and restricted first; filtered
    /// ones marked as not exposed).
    Exposure(ExposureArgs),
    /// Hosts with their last contact; silent (stale) ones first.
    Hosts(HostsArgs),
    /// What changed between two times: listeners opened, changed and closed (firewall
    /// verdicts before → after), and ports whose exposure changed (e.g. became reachable
    /// over IPv4, or opened by a ruleset change).
    Diff(DiffArgs),
    /// Try it on this machine: dev certificates, a collector on SQLite and an agent, then
    /// the inventory and the headline answer.
    #[cfg(feature = "quickstart")]
    Quickstart(quickstart::Args),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration (example: deploy/collector.toml); flags override its keys.
    #[arg(long, env = "LISTENSCOPE_COLLECTOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Database: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: Option<String>,
    /// CA certificate that signs agent certificates.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The collector's certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The collector's private key.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics here (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// A host silent for longer is stale (default 5m).
    #[arg(long, value_name = "DURATION")]
    pub stale_after: Option<String>,
    /// Database connection pool size (default 4).
    #[arg(long, value_name = "N")]
    pub pool_size: Option<u32>,
    /// Prune history older than this (e.g. 90d); default: keep forever. The current state
    /// is never pruned.
    #[arg(long, value_name = "DURATION")]
    pub retain: Option<String>,
    /// Agent sessions held at once; more are refused until one ends (default 20000,
    /// lowered to fit the open-file limit; each session needs one open file).
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// This collector's name in the hosts view (default HOSTNAME:PORT); give each
    /// collector sharing a PostgreSQL database its own.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create DIR/ca.pem, ca.key, server.pem, server.key (keys mode 0600).
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Name or IP the collector is reached by (repeatable). Default: localhost,
        /// 127.0.0.1, ::1 and this machine's host name.
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// Validity of the server certificate in days (the CA gets at least 10 years).
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing CA (every agent certificate must then be issued again).
        #[arg(long)]
        force: bool,
    },
    /// Create DIR/NAME.pem and DIR/NAME.key for one host (DNS SAN = NAME, clientAuth).
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The host's identity in the fleet.
        #[arg(long, value_name = "NAME")]
        host: String,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

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

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Certs(c) => certs(c),
        Command::Serve(a) => runtime()?.block_on(serve(a)),
        Command::Query(a) => runtime()?.block_on(query_cmd(a)),
        Command::Exposure(a) => runtime()?.block_on(exposure_cmd(a)),
        Command::Hosts(a) => runtime()?.block_on(hosts_cmd(a)),
        Command::Diff(a) => runtime()?.block_on(diff_cmd(a)),
        #[cfg(feature = "quickstart")]
        Command::Quickstart(a) => runtime()?.block_on(quickstart::run(a)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn certs(c: CertsCommand) -> anyhow::Result<()> {
    let written = match c {
        CertsCommand::Init {
            dir,
            server_names,
            days,
            force,
        } => {
            let names = if server_names.is_empty() {
                pki::default_server_names()
            } else {
                server_names
            };
            let w = pki::init(&dir, &names, days, force)?;
            println!("Server certificate names: {}", names.join(", "));
            w
        }
        CertsCommand::Issue { dir, host, days } => pki::issue(&dir, &host, days)?,
    };
    for f in written.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let file = match &a.config {
        Some(p) => RawConfig::load(p)?,
        None => RawConfig::default(),
    };
    let cfg = file
        .overridden_by(RawConfig {
            listen: a.listen,
            db: a.db,
            tls_ca: a.tls_ca,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            metrics_listen: a.metrics_listen,
            stale_after: a.stale_after,
            pool_size: a.pool_size,
            retain: a.retain,
            max_sessions: a.max_sessions,
            name: a.name,
        })
        .validate()?;
    let max_sessions = crate::fdlimit::fit_sessions(cfg.max_sessions);
    let tls = tls::server_config(&cfg.tls_ca, &cfg.tls_cert, &cfg.tls_key)?;
    let store = Store::open(
        &cfg.db,
        &StoreOptions {
            stale_after_secs: cfg.stale_after_secs,
            pool_size: cfg.pool_size,
        },
    )
    .await?;
    if let Some(addr) = cfg.metrics_listen {
        crate::metrics::install(addr).map_err(anyhow::Error::msg)?;
        tracing::info!(%addr, "Serving metrics.");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(db = %cfg.db, "Store open.");
    let stop_pruning = tokio_util::sync::CancellationToken::new();
    if let Some(retain) = cfg.retain {
        tracing::info!(
            retain_secs = retain.as_secs(),
            "Pruning history older than the retention period."
        );
        tokio::spawn(crate::retention::run(
            store.clone(),
            retain,
            stop_pruning.clone(),
        ));
    }
    let shutdown = async move {
        listenscope_core::signal::shutdown_signal().await;
        stop_pruning.cancel();
    };
    let limits = Limits {
        max_sessions,
        instance: cfg.name.clone(),
        ..Limits::for_stale_after(std::time::Duration::from_secs(cfg.stale_after_secs))
    };
    tracing::info!(max_sessions, name = %cfg.name, "Accepting agent sessions.");
    server::serve(listener, tls, store, limits, shutdown).await?;
    Ok(())
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

async fn query_cmd(a: QueryArgs) -> anyhow::Result<()> {
    let ro = open_ro(&a.db).await?;
    let rs = ro.run(&a.sql, &[]).await?;
    ro.close().await;
    print(&rs, a.output.format())
}

async fn exposure_cmd(a: ExposureArgs) -> anyhow::Result<()> {
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
        return Ok(());
    }
    print(&rs, format)
}

async fn diff_cmd(a: DiffArgs) -> anyhow::Result<()> {
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
        return Ok(());
    }
    print(&rs, format)
}

async fn hosts_cmd(a: HostsArgs) -> anyhow::Result<()> {
    let ro = open_ro(&a.db).await?;
    let report = query::hosts(&ro, a.limit.get()).await?;
    ro.close().await;
    let rs = report_rows(report);
    print(&rs, a.output.format())
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
