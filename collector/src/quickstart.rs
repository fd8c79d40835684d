//! `listenscope-collector quickstart`: the whole pipeline on this machine in one command.
//!
//! Dev certificates in the state directory (created once, reused after), a collector on
//! SQLite listening on a loopback port, this machine's agent streaming to it over mutual
//! TLS until its first snapshot is stored; then the inventory and the headline answer are
//! read back through the same read-only views an SRE would query.

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
}

/// How long to wait for the first snapshot to be stored.
const FIRST_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

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
    println!(
        "  collector     https://{addr} (in this process, until the first snapshot is stored)"
    );

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
    let stored = wait_for_snapshot(&ro, &host).await;
    stop_agent.cancel();
    let _ = agent.await;
    stop_server.cancel();
    server.await.context("collector task")??;
    let seq = stored?;
    println!("  agent         scanned this host; snapshot {seq} stored");
    println!();

    let inventory = ro
        .run(
            ro.pick(
                "SELECT netns, netstat_proto AS proto, shown_as, reach_ipv4, reach_ipv6, v6only, trap,
                        effective_ipv4 AS firewall_ipv4, effective_ipv6 AS firewall_ipv6, processes
                 FROM current_listeners WHERE host = ?1
                 ORDER BY netns = 'host' DESC, netns, protocol, port, family",
                "SELECT netns, netstat_proto AS proto, shown_as, reach_ipv4, reach_ipv6, v6only, trap,
                        effective_ipv4 AS firewall_ipv4, effective_ipv6 AS firewall_ipv6, processes
                 FROM current_listeners WHERE host = $1
                 ORDER BY netns = 'host' DESC, netns, protocol, port, family",
            ),
            &[Param::Text(Some(host.clone()))],
        )
        .await?;
    println!("Inventory of {host} (view current_listeners):");
    let mut out = std::io::stdout().lock();
    query::write(&inventory, Format::Table, &mut out)?;
    println!();
    let headline = query::exposure(&ro, None, None, None).await?.rows;
    println!(
        "Reachable over IPv4 although netstat shows only IPv6 lines (view hidden_ipv4_exposure):"
    );
    if headline.rows.is_empty() {
        println!("  none: every port open to IPv4 here also shows an IPv4 line in netstat.");
    } else {
        query::write(&headline, Format::Table, &mut out)?;
    }
    ro.close().await;
    let db_arg = db.to_string();
    println!();
    println!("Next:");
    println!("  listenscope-collector query --db {db_arg} \"SELECT * FROM current_listeners\"");
    println!("  listenscope-collector exposure --db {db_arg} --port 80");
    println!("  listenscope-collector hosts --db {db_arg}");
    println!("  A real fleet: README.md, \"Running a fleet\".");
    Ok(())
}

/// Creates the CA, server and agent certificates unless they are already there.
fn ensure_certs(dir: &Path, host: &str) -> anyhow::Result<bool> {
    let mut created = false;
    if !dir.join("ca.pem").exists() {
        pki::init(dir, &["localhost".into(), "127.0.0.1".into()], 825, false)?;
        created = true;
    }
    if !dir.join(format!("{host}.pem")).exists() {
        pki::issue(dir, host, 825)?;
        created = true;
    }
    Ok(created)
}

/// `host.committed_seq`, read by name.
struct CommittedSeq(i64);

impl FromRow for CommittedSeq {
    fn from_row(r: &Named<'_>) -> Result<Self, QueryError> {
        Ok(CommittedSeq(r.int("committed_seq")?))
    }
}

/// Polls the store until `host` has a committed sequence.
async fn wait_for_snapshot(ro: &ReadOnly, host: &str) -> anyhow::Result<i64> {
    let deadline = tokio::time::Instant::now() + FIRST_SNAPSHOT_TIMEOUT;
    loop {
        let rs = ro
            .run(
                ro.pick(
                    "SELECT committed_seq FROM host WHERE name = ?1 AND last_snapshot_at IS NOT NULL",
                    "SELECT committed_seq FROM host WHERE name = $1 AND last_snapshot_at IS NOT NULL",
                ),
                &[Param::Text(Some(host.to_string()))],
            )
            .await?;
        if let Some(seq) = rs.decode::<CommittedSeq>()?.first() {
            return Ok(seq.0);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the agent's first snapshot was not stored within {}s; run with LISTENSCOPE_LOG=info to see why",
                FIRST_SNAPSHOT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
