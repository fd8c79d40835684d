//! Command line of `listenscope-collector`: the clap definitions and the dispatch. The
//! server's commands live in `serve.rs` (`serve`, `certs`), the fleet questions in
//! `report.rs` (`query`, `exposure`, `hosts`, `diff`), the web UI's in `ui.rs` (`ui`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use listenscope_core::exit::Exit;
use listenscope_core::logging::LogFormat;

#[cfg(feature = "quickstart")]
use crate::quickstart;

mod report;
mod serve;
mod ui;

pub use report::{DiffArgs, ExposureArgs, HostsArgs, LimitArgs, OutputArgs, ProtoArg, QueryArgs};
pub use serve::{CertsCommand, ServeArgs};
pub use ui::UiArgs;

/// listenscope collector: stores what agents report, answers questions across the fleet.
#[derive(Debug, Parser)]
#[command(name = "listenscope-collector", version, about, long_about = None)]
pub struct Cli {
    /// Log lines as `text` or `json` (one object per line, for log shippers).
    #[arg(
        long,
        global = true,
        env = "LISTENSCOPE_LOG_FORMAT",
        value_name = "text|json",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server that agents stream to.
    Serve(Box<ServeArgs>),
    /// Create the fleet CA, the server certificate and agent certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run one read-only SQL statement over the views (listed in --help; docs/views.md).
    Query(QueryArgs),
    /// Which hosts expose a port over IPv4 although netstat shows only IPv6 lines, with
    /// what their firewall lets through over IPv4 (open and restricted first; filtered
    /// ones marked as not exposed).
    Exposure(ExposureArgs),
    /// Hosts with their last contact and how each agent learns of listens and closes
    /// (watch: doorbell, polling(3s), interval(10s)); silent (stale) ones first.
    Hosts(HostsArgs),
    /// What changed between two times: listeners opened, changed and closed (firewall
    /// verdicts before → after), and ports whose exposure changed (e.g. became reachable
    /// over IPv4, or opened by a ruleset change).
    Diff(DiffArgs),
    /// Serve the read-only web UI over a database (a PostgreSQL replica, a SQLite file):
    /// the headline by port, ports, hosts, changes per hour, stale hosts.
    Ui(UiArgs),
    /// Try it on this machine: dev certificates, a collector on SQLite and an agent, then
    /// the inventory and the headline answer.
    #[cfg(feature = "quickstart")]
    Quickstart(quickstart::Args),
}

/// Runs one command; the binary turns the result into an exit code (docs: README, "Exit
/// codes"): an error is 2.
pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Certs(c) => serve::certs(c),
        Command::Serve(a) => runtime()?.block_on(serve::serve(*a)),
        Command::Query(a) => runtime()?.block_on(report::query_cmd(a)),
        Command::Exposure(a) => runtime()?.block_on(report::exposure_cmd(a)),
        Command::Hosts(a) => runtime()?.block_on(report::hosts_cmd(a)),
        Command::Diff(a) => runtime()?.block_on(report::diff_cmd(a)),
        Command::Ui(a) => runtime()?.block_on(ui::ui_cmd(a)),
        #[cfg(feature = "quickstart")]
        Command::Quickstart(a) => runtime()?
            .block_on(quickstart::run(a))
            .map(|()| Exit::Success),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
