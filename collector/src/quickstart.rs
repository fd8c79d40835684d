//! `listenscope-collector quickstart`: the whole pipeline on this machine in one command.
//!
//! Dev certificates in the state directory (created once, reused after), a collector on
//! SQLite listening on a loopback port, this machine's agent streaming to it over mutual
//! TLS until its first snapshot is stored; then the inventory and the headline answer are
//! read back through the same read-only views an SRE would query. Then it serves the
//! web UI over that database (read-only, loopback) until Ctrl-C or SIGTERM, unless
//! `--no-ui`.

#![allow(clippy::print_stdout)] // CLI output code: printing to stdout is its job

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use listenscope_agent::config::RunConfig;
use listenscope_agent::os::LinuxSystem;
use listenscope_agent::scan::NetnsSelector;
use tokio_util::sync::CancellationToken;

use crate::ingest::Limits;
use crate::query::{self, Format, FromRow, Named, Param, QueryError, ReadOnly};
use crate::store::{DbUrl, Store, StoreOptions};
use crate::tls::valid_host_name;
use crate::{pki, server, tls};

/// `quickstart` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where certificates and the database go (created if missing).
    #[arg(long, default_value = ".listenscope", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Database (default: sqlite://STATE_DIR/listenscope.db).
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// Where the web UI listens after the printout (a loopback address). Default
    /// 127.0.0.1:7444, or a free port when that one is taken.
    #[arg(long, value_name = "ADDR")]
    pub ui_listen: Option<std::net::SocketAddr>,
    /// Exit right after the printout instead of serving the web UI.
    #[arg(long, conflicts_with = "ui_listen")]
    pub no_ui: bool,
}

/// How long to wait for this run's snapshot to be stored.
const FIRST_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Inventory rows printed; the rest is counted, with the command that shows them all (a
/// busy host has thousands of listeners, and the headline must not scroll away).
const INVENTORY_ROWS: usize = 20;

/// The columns of the inventory, for the printed rows and the command that shows all.
const INVENTORY_COLUMNS: &str = "netns, netstat_proto AS proto, shown_as, reach_ipv4, reach_ipv6, v6only, trap, \
     effective_ipv4 AS firewall_ipv4, effective_ipv6 AS firewall_ipv6, processes";

pub async fn run(a: Args) -> anyhow::Result<()> {
    let dir = &a.state_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let certs = dir.join("certs");
    let host = {
        let h = pki::this_hostname();
        if valid_host_name(&h) {
            h
        } else {
            "this-host".to_string()
        }
    };
    let created = ensure_certs(&certs, &host)?;
    let db: DbUrl = match &a.db {
        Some(u) => u.parse().map_err(anyhow::Error::msg)?,
        None => DbUrl::Sqlite(dir.join("listenscope.db")),
    };

    println!("listenscope quickstart (state in {})", dir.display());
    println!(
        "  certificates  {} ({}: CA, server, agent \"{host}\")",
        certs.display(),
        if created { "created" } else { "reused" }
    );
    println!("  database      {db}");

    let store = Store::open(&db, &StoreOptions::default()).await?;
    let tls_cfg = tls::server_config(
        &certs.join("ca.pem"),
        &certs.join("server.pem"),
        &certs.join("server.key"),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("  collector     https://{addr} (in this process, until this run's scan is stored)");

    // This run's data is what its agent observes from now on. An earlier run's snapshot is
    // in the same database (same host, same certificate): waiting for "a snapshot" found
    // that one at once, stopped this run's agent before it connected, and printed the old
    // inventory as new. Millisecond precision: what SQLite stores.
    let started = {
        let now = time::OffsetDateTime::now_utc();
        now.replace_millisecond(now.millisecond()).unwrap_or(now)
    };
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        listener,
        tls_cfg,
        store,
        Limits::default(),
        stop_server.clone().cancelled_owned(),
    ));

    let agent_cfg = RunConfig {
        collectors: vec![format!("https://{addr}")],
        tls_ca: certs.join("ca.pem"),
        tls_cert: certs.join(format!("{host}.pem")),
        tls_key: certs.join(format!("{host}.key")),
        interval: Duration::from_secs(10),
        watch: listenscope_agent::config::WatchSetting::Interval,
        bind_events: true,
        netns: NetnsSelector::All,
        max_pending_changes: 100_000,
        reconnect_max: Duration::from_secs(2),
        server_name: Some("localhost".into()),
    };
    let stop_agent = CancellationToken::new();
    let agent = tokio::spawn(listenscope_agent::transport::run(
        agent_cfg,
        Arc::new(LinuxSystem::new()),
        stop_agent.clone().cancelled_owned(),
    ));

    let ro = ReadOnly::open(&db).await?;
    let stored = wait_for_snapshot(&ro, &host, started).await;
    stop_agent.cancel();
    let _ = agent.await;
    stop_server.cancel();
    server.await.context("collector task")??;
    let observed = stored?;
    println!(
        "  agent         scanned this host at {} UTC; stored (everything below is from this \
         scan; earlier runs stay in the database as history)",
        crate::timefmt::format(observed)
    );
    println!();

    // The headline first: the question listenscope exists to answer.
    let mut out = std::io::stdout().lock();
    let headline = query::exposure(&ro, None, None, None).await?.rows;
    println!(
        "Reachable over IPv4 although netstat shows only IPv6 lines (view hidden_ipv4_exposure):"
    );
    if headline.rows.is_empty() {
        println!("  none: every port open to IPv4 here also shows an IPv4 line in netstat.");
    } else {
        query::write(&headline, Format::Table, &mut out)?;
    }
    println!();

    // Then the inventory, bounded: counts, and the most exposed rows.
    let db_arg = db.to_string();
    let counts = ro
        .run(
            ro.pick(
                "SELECT reach_ipv4, effective_ipv4 AS firewall_ipv4, count(*) AS listeners
                 FROM current_listeners WHERE host = ?1
                 GROUP BY reach_ipv4, effective_ipv4 ORDER BY count(*) DESC, 1, 2",
                "SELECT reach_ipv4, effective_ipv4 AS firewall_ipv4, count(*) AS listeners
                 FROM current_listeners WHERE host = $1
                 GROUP BY reach_ipv4, effective_ipv4 ORDER BY count(*) DESC, 1, 2",
            ),
            &[Param::Text(Some(host.clone()))],
        )
        .await?;
    let total: u64 = counts
        .rows
        .iter()
        .filter_map(|r| r.get(2).and_then(serde_json::Value::as_u64))
        .sum();
    println!(
        "Inventory of {host}: {total} listener{} (view current_listeners), by IPv4 reach and \
         firewall verdict:",
        if total == 1 { "" } else { "s" }
    );
    query::write(&counts, Format::Table, &mut out)?;
    println!();
    let order = format!(
        "ORDER BY {} DESC, {} DESC, netns = 'host' DESC, netns, protocol, port, family",
        crate::store::row::rank_sql("effective_ipv4"),
        crate::store::row::rank_sql("effective_ipv6"),
    );
    let top = ro
        .run(
            &format!(
                "SELECT {INVENTORY_COLUMNS} FROM current_listeners WHERE host = {} {order} \
                 LIMIT {INVENTORY_ROWS}",
                ro.pick("?1", "$1")
            ),
            &[Param::Text(Some(host.clone()))],
        )
        .await?;
    let shown = top.rows.len() as u64;
    if shown < total {
        println!("The {shown} most exposed (firewall verdict, then namespace and port):");
    }
    query::write(&top, Format::Table, &mut out)?;
    let all = format!(
        "listenscope-collector query --db {db_arg} \"SELECT {INVENTORY_COLUMNS} FROM \
         current_listeners WHERE host = '{host}' ORDER BY netns, protocol, port, family\""
    );
    if shown < total {
        println!("… and {} more. All of them:", total - shown);
        println!("  {all}");
    }
    println!();
    println!("Next:");
    if shown >= total {
        println!("  {all}");
    }
    println!("  listenscope-collector exposure --db {db_arg} --port 80");
    println!("  listenscope-collector hosts --db {db_arg}");
    println!("  listenscope-collector diff --db {db_arg} --since 1h");
    println!("  A real fleet: README.md, \"Running a fleet\".");
    drop(out);
    if a.no_ui {
        ro.close().await;
        return Ok(());
    }
    serve_ui(ro, &db, &host, a.ui_listen).await
}

/// Serves the web UI over the quickstart's database on a loopback address until Ctrl-C
/// or SIGTERM: only the UI, read-only (the collector and the agent have stopped).
async fn serve_ui(
    ro: ReadOnly,
    db: &DbUrl,
    host: &str,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    use crate::ui;
    let signal = listenscope_core::signal::shutdown_signal();
    let listener = match listen {
        Some(addr) => {
            if !ui::is_loopback(addr) {
                bail!(
                    "quickstart serves the web UI on a loopback address only ({addr} is not one); for another address run `listenscope-collector ui --db {db}` with TLS (docs/ui.md)"
                );
            }
            ui::bind(addr)?
        }
        None => {
            let default: std::net::SocketAddr = ui::DEFAULT_LISTEN.parse()?;
            match ui::bind(default) {
                Ok(l) => l,
                // Taken (another quickstart, a collector's UI): any free port will do.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    ui::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let home = ui::url(addr, false);
    println!();
    println!("Web UI (read-only, this machine only): {home}");
    println!("  this host's listeners: {}", host_url(&home, host));
    println!("  serving until Ctrl-C (quickstart --no-ui exits here instead)");
    let state = std::sync::Arc::new(ui::UiState::new(ro.clone(), db.to_string()));
    ui::serve(listener, state, None, signal).await?;
    ro.close().await;
    Ok(())
}

/// The host page under `home` (`http://ADDR/`).
fn host_url(home: &str, host: &str) -> String {
    format!(
        "{}{}",
        home.trim_end_matches('/'),
        crate::ui::host_path(host)
    )
}

/// Creates the CA, server and agent certificates unless they are already there.
fn ensure_certs(dir: &Path, host: &str) -> anyhow::Result<bool> {
    let mut created = false;
    if !dir.join("ca.pem").exists() {
        pki::init(dir, &["localhost".into(), "127.0.0.1".into()], 825, false)?;
        created = true;
    }
    if !dir.join(format!("{host}.pem")).exists() {
        // A key left without its certificate (an interrupted run) is replaced.
        pki::issue_with(dir, host, 825, true)?;
        created = true;
    }
    Ok(created)
}

/// `host.last_snapshot_at`, read by name.
struct SnapshotAt(time::OffsetDateTime);

impl FromRow for SnapshotAt {
    fn from_row(r: &Named<'_>) -> Result<Self, QueryError> {
        let text = r.text("last_snapshot_at")?;
        crate::timefmt::parse(&text)
            .map(SnapshotAt)
            .map_err(|e| QueryError::Sql(format!("last_snapshot_at {text:?}: {e}")))
    }
}

/// Polls the store until `host` has a snapshot observed at or after `since` (this run's
/// agent's), and returns its observation time.
async fn wait_for_snapshot(
    ro: &ReadOnly,
    host: &str,
    since: time::OffsetDateTime,
) -> anyhow::Result<time::OffsetDateTime> {
    let deadline = tokio::time::Instant::now() + FIRST_SNAPSHOT_TIMEOUT;
    loop {
        let rs = ro
            .run(
                ro.pick(
                    "SELECT last_snapshot_at FROM host WHERE name = ?1 AND last_snapshot_at >= ?2",
                    "SELECT last_snapshot_at FROM host WHERE name = $1 AND last_snapshot_at >= $2",
                ),
                &[Param::Text(Some(host.to_string())), Param::Time(since)],
            )
            .await?;
        if let Some(at) = rs.decode::<SnapshotAt>()?.first() {
            return Ok(at.0);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "this run's scan was not stored within {}s; run with LISTENSCOPE_LOG=info to see why",
                FIRST_SNAPSHOT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
