//! Fleet load generator, run by `scripts/bench-fleet`: N simulated agents against real
//! collector processes on loopback. A benchmark, not a test: it measures and reports.
//!
//! Each simulated agent is a real agent from the collector's point of view: its own
//! client certificate (issued in memory by the project's PKI code from the fleet CA), its
//! own mutual-TLS HTTP/2 connection, and the real protocol (Hello → Welcome → chunked
//! first snapshot → Ack; then Deltas and Heartbeats with random phases; Resync honoured;
//! one unacknowledged message at a time). Listener records are built as the agent builds
//! them and converted by `core::wire`, so they pass the collector's validation.
//!
//! Modes: `hold` connects every agent at a bounded rate, stores first snapshots, holds
//! the sessions with deltas and heartbeats, then disconnects cleanly. With `--burst`, the
//! agents connect and get their Welcome but hold back their first snapshots until every
//! agent is connected; then all of them send at once (ingest throughput, not the connect
//! rate). `turns` runs M agents with at most C connected at once, each storing one
//! snapshot and leaving (to fill a database quickly; `--observed-ago` backdates the
//! snapshots, `--extra-listeners` makes a second turn over the same hosts store exactly
//! that many listener changes per host).
//!
//! Host fleet-N always has the same inventory (seeded by N), whatever the run.
//!
//! One process may open only so many files, so the agents run in `--processes` worker
//! processes (this program again, with `--worker`); the parent moves them through the
//! phases together, samples the collector(s) and PostgreSQL from /proc at each phase
//! boundary, merges the workers' measurements and prints a Markdown table (and JSON).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark program: a failed step should stop it loudly"
)]
#![allow(
    clippy::print_stdout,
    reason = "a benchmark program: its report goes to stdout"
)]

mod agent;
mod mix;
mod parent;
mod stats;
mod worker;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Mode {
    /// Connect every agent, store first snapshots, hold with deltas and heartbeats,
    /// disconnect cleanly.
    Hold,
    /// Agents in turns: connect, store one snapshot, leave; at most --at-once at a time.
    Turns,
}

fn duration(s: &str) -> Result<Duration, String> {
    listenscope_core::config::parse_duration(s)
}

/// Fleet load generator for the listenscope collector (loopback only).
#[derive(Debug, Parser)]
#[command(name = "bench_fleet")]
pub struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Hold)]
    pub mode: Mode,
    /// Collector URL, https://127.x.y.z:PORT or https://[::1]:PORT (loopback only).
    /// Repeatable: agents are spread round robin over the URLs.
    #[arg(long = "collector", value_name = "URL")]
    pub collectors: Vec<String>,
    /// Directory of the fleet CA (ca.pem, ca.key), as `listenscope-collector certs init`
    /// writes it. Host certificates are issued from it in memory.
    #[arg(long, value_name = "DIR")]
    pub pki: Option<PathBuf>,
    /// Name the collector's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Agents in all (hold: held at once; turns: M).
    #[arg(long, default_value_t = 1000)]
    pub agents: u64,
    /// Host names are fleet-NNNNNN from this number on (runs that must not share hosts
    /// use different offsets).
    #[arg(long, default_value_t = 0)]
    pub name_offset: u64,
    /// Listeners per host.
    #[arg(long, default_value_t = 50)]
    pub listeners: usize,
    /// New connections per second, over all workers.
    #[arg(long, default_value_t = 200.0)]
    pub connect_rate: f64,
    /// Handshakes (TCP + TLS + Hello/Welcome) in flight at most, over all workers.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Turns mode: sessions open at once at most (C), over all workers.
    #[arg(long, default_value_t = 500)]
    pub at_once: usize,
    /// Hold mode: every agent connects and gets its Welcome but holds back its first
    /// snapshot; when all are connected, all of them send it at once (the burst phase).
    #[arg(long)]
    pub burst: bool,
    /// Turns mode: snapshots are observed this long ago (observed_at = now − DURATION), so
    /// a fill lies outside a recent history window.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub observed_ago: Option<Duration>,
    /// Turns mode: each host's snapshot holds its inventory plus this many listeners
    /// opened on free ports. Over hosts already stored by a fill, that is exactly this many
    /// listener changes per host, observed now.
    #[arg(long, default_value_t = 0)]
    pub extra_listeners: usize,
    /// Hold mode: how long to hold the sessions after the connect phase.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub hold: Duration,
    /// Steady state: a delta per agent this often (random phase).
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub delta_every: Duration,
    /// Steady state: a heartbeat per agent this often (random phase).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub heartbeat_every: Duration,
    /// TCP + TLS connect timeout per agent.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// How long an agent waits for the response headers, Welcome, or an Ack.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub ack_timeout: Duration,
    /// Overall deadline of the workers' phases (then they disconnect and report).
    #[arg(long, default_value = "30m", value_parser = duration)]
    pub max_duration: Duration,
    /// Worker processes (0: one per 8,000 sockets held at once).
    #[arg(long, default_value_t = 0)]
    pub processes: usize,
    /// Connect from 127.0.0.2 … 127.0.0.(1+K) in turn (0: the kernel's choice), for more
    /// ephemeral ports. IPv4 loopback collectors only.
    #[arg(long, default_value_t = 0)]
    pub source_ips: u32,
    /// Collector process to sample (RSS, CPU); the i-th belongs to the i-th --collector.
    #[arg(long = "collector-pid", value_name = "PID")]
    pub collector_pids: Vec<u32>,
    /// PostgreSQL postmaster to sample (CPU of it and its children).
    #[arg(long, value_name = "PID")]
    pub pg_pid: Option<u32>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Title of the printed table.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Internal: run as a worker with this plan (JSON).
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

/// What a worker runs: the shared settings and its share of the agents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub mode: Mode,
    pub collectors: Vec<String>,
    pub pki: PathBuf,
    pub server_name: String,
    pub listeners: usize,
    pub name_offset: u64,
    pub hold: Duration,
    pub burst: bool,
    pub observed_ago: Option<Duration>,
    pub extra_listeners: usize,
    pub delta_every: Duration,
    pub heartbeat_every: Duration,
    pub connect_timeout: Duration,
    pub ack_timeout: Duration,
    pub max_duration: Duration,
    pub source_ips: u32,
    pub cert_days: u32,
    /// Global index of this worker's first agent, and how many it runs.
    pub first: u64,
    pub count: u64,
    /// This worker's share of the rate and concurrency limits.
    pub connect_rate: f64,
    pub connect_concurrency: usize,
    pub at_once: usize,
}

/// The address of a loopback collector URL, or why it is refused.
fn loopback(url: &str) -> Result<IpAddr, String> {
    let uri: tonic::transport::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url}: use https://ADDR:PORT"));
    }
    let host = uri.host().unwrap_or("");
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{url}: give the collector as an IP address (127.0.0.1 or ::1)"))?;
    if !ip.is_loopback() {
        return Err(format!(
            "{url}: {ip} is not a loopback address; this load generator only targets collectors \
             on this machine (127.0.0.0/8 or ::1)"
        ));
    }
    if uri.port_u16().is_none() {
        return Err(format!("{url}: no port"));
    }
    Ok(ip)
}

fn check(a: &Args) -> Result<(), String> {
    if a.collectors.is_empty() {
        return Err("give at least one --collector URL".into());
    }
    let mut v4 = true;
    for u in &a.collectors {
        v4 &= loopback(u)?.is_ipv4();
    }
    if a.source_ips > 0 && !v4 {
        return Err("--source-ips needs IPv4 loopback collectors".into());
    }
    if a.source_ips > 250 {
        return Err("--source-ips: at most 250".into());
    }
    match &a.pki {
        Some(d) if d.join("ca.pem").is_file() && d.join("ca.key").is_file() => {}
        Some(d) => return Err(format!("{}: no ca.pem and ca.key there", d.display())),
        None => return Err("--pki DIR (the fleet CA) is required".into()),
    }
    if !(1..=200_000).contains(&a.agents) {
        return Err("--agents: 1 to 200,000".into());
    }
    if !(1..=10_000).contains(&a.listeners) {
        return Err("--listeners: 1 to 10,000".into());
    }
    if !(a.connect_rate > 0.0 && a.connect_rate <= 100_000.0) {
        return Err("--connect-rate: above 0, at most 100,000 per second".into());
    }
    if a.connect_concurrency == 0 || a.at_once == 0 {
        return Err("--connect-concurrency and --at-once: at least 1".into());
    }
    if a.processes > 64 {
        return Err("--processes: at most 64".into());
    }
    for (name, d) in [
        ("--delta-every", a.delta_every),
        ("--heartbeat-every", a.heartbeat_every),
        ("--connect-timeout", a.connect_timeout),
        ("--ack-timeout", a.ack_timeout),
        ("--max-duration", a.max_duration),
    ] {
        if d < Duration::from_millis(100) || d > Duration::from_secs(86_400) {
            return Err(format!("{name}: between 100ms and 24h"));
        }
    }
    if a.burst && a.mode != Mode::Hold {
        return Err("--burst is for hold mode".into());
    }
    if let Some(ago) = a.observed_ago {
        if a.mode != Mode::Turns {
            return Err("--observed-ago is for turns mode".into());
        }
        // The collector refuses times before 2000 and more than its clock skew ahead;
        // a month back is far inside that and inside any sensible retention.
        if ago > Duration::from_secs(30 * 86_400) {
            return Err("--observed-ago: at most 30 days".into());
        }
    }
    if a.extra_listeners > 0 && a.mode != Mode::Turns {
        return Err("--extra-listeners is for turns mode".into());
    }
    if a.extra_listeners > 1000 {
        return Err("--extra-listeners: at most 1,000".into());
    }
    if a.hold > a.max_duration {
        return Err("--hold is longer than --max-duration".into());
    }
    if !a.collector_pids.is_empty() && a.collector_pids.len() != a.collectors.len() {
        return Err("give one --collector-pid per --collector (same order), or none".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(plan) = &args.worker {
        worker::main(serde_json::from_str(plan).expect("worker plan"));
    }
    if let Err(e) = check(&args) {
        eprintln!("bench_fleet: {e}");
        return ExitCode::from(2);
    }
    let open_at_once = match args.mode {
        Mode::Hold => args.agents,
        Mode::Turns => args.at_once as u64,
    };
    let processes = match args.processes {
        0 => open_at_once.div_ceil(8000).max(1) as usize,
        p => p,
    }
    .min(args.agents as usize);
    let plan = Plan {
        mode: args.mode,
        collectors: args.collectors.clone(),
        pki: args.pki.clone().expect("checked"),
        server_name: args.server_name.clone(),
        listeners: args.listeners,
        name_offset: args.name_offset,
        hold: args.hold,
        burst: args.burst,
        observed_ago: args.observed_ago,
        extra_listeners: args.extra_listeners,
        delta_every: args.delta_every,
        heartbeat_every: args.heartbeat_every,
        connect_timeout: args.connect_timeout,
        ack_timeout: args.ack_timeout,
        max_duration: args.max_duration,
        source_ips: args.source_ips,
        cert_days: 2,
        first: 0,
        count: 0,
        connect_rate: args.connect_rate,
        connect_concurrency: args.connect_concurrency,
        at_once: args.at_once,
    };
    parent::main(args, plan, processes)
}
