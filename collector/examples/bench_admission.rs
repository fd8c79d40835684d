//! Admission-control load generator, run by `scripts/bench-admission`: hostile raw TCP
//! connections held open against a real collector (silent, or with `--speak` 3 bytes of
//! a TLS record and then nothing; reopened as the collector closes them), and meanwhile
//! legitimate agents (each its own client certificate, its own source address, the real
//! Hello → Welcome) connecting at once with the agent's 10 s timeout. A benchmark, not a test: it measures and reports one
//! JSON line.
//!
//! Measured: agents that got their Welcome within 10 s, connect-to-Welcome p50/p99/max,
//! and the collector's open files and RSS (from /proc, sampled every 100 ms from the
//! start of the flood to the last agent's outcome: the maximum is reported).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark program: a failed step should stop it loudly"
)]
#![allow(
    clippy::print_stdout,
    reason = "a benchmark program: its report goes to stdout"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use listenscope_proto::v1;
use listenscope_proto::v1::inventory_client::InventoryClient;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The agent's bound on a whole connect.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
struct Args {
    /// The collector's gRPC address.
    #[arg(long)]
    target: SocketAddr,
    /// The collector's pid (open files and RSS from /proc).
    #[arg(long)]
    pid: u32,
    /// A `certs init` directory; agent certificates bench-N are issued into it if missing.
    #[arg(long)]
    pki: PathBuf,
    /// Server name in the collector's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Hostile connections held open.
    #[arg(long, default_value_t = 0)]
    hostile: usize,
    /// Source addresses they come from (127.1.x.y).
    #[arg(long, default_value_t = 1)]
    hostile_sources: usize,
    /// Each hostile connection sends the first 3 bytes of a TLS record, then nothing (it
    /// cannot be displaced as a silent one is).
    #[arg(long)]
    speak: bool,
    /// Pause before reopening a connection the collector closed (ms).
    #[arg(long, default_value_t = 100)]
    reopen_ms: u64,
    /// Legitimate agents (sources 127.2.x.y).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Connect each agent once before the flood (its source is then known).
    #[arg(long)]
    warm: bool,
    /// How long the flood runs before the agents connect (s).
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
}

fn source(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        net,
        (i / 250) as u8,
        (i % 250) as u8 + 1,
    ))
}

fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

/// Open files and RSS (KiB) of `pid`.
fn sample(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    (fds, rss)
}

/// One agent: connect from `from`, Hello, Welcome, within the agent's timeout.
async fn agent(a: &Args, ca: &[u8], host: &str, from: IpAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let dir = &a.pki;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(a.server_name.clone())
        .identity(Identity::from_pem(
            std::fs::read(dir.join(format!("{host}.pem"))).unwrap(),
            std::fs::read(dir.join(format!("{host}.key"))).unwrap(),
        ));
    let session = async {
        let channel = Endpoint::from_shared(format!("https://{}", a.target))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(AGENT_TIMEOUT)
            .local_address(Some(from))
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = InventoryClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(v1::AgentMessage {
            body: Some(v1::agent_message::Body::Hello(v1::Hello {
                protocol_version: listenscope_core::limits::PROTOCOL_VERSION,
                agent_version: "bench".into(),
                os_hostname: host.into(),
                session_id: vec![7; 16],
                acked_sequence: 0,
                instance_id: Vec::new(),
                watch: None,
            })),
        })
        .await
        .unwrap();
        let mut stream = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("session: {e}"))?
            .into_inner();
        match stream.message().await {
            Ok(Some(v1::CollectorMessage {
                body: Some(v1::collector_message::Body::Welcome(_)),
            })) => Ok(()),
            other => Err(format!("no Welcome: {other:?}")),
        }
    };
    match tokio::time::timeout(AGENT_TIMEOUT, session).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("timeout".into()),
    }
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    listenscope_core::pem::install_crypto_provider();
    raise_fd_limit();
    for i in 0..a.agents {
        let host = format!("bench-{i}");
        if !a.pki.join(format!("{host}.pem")).exists() {
            listenscope_collector::pki::issue(&a.pki, &host, 30).unwrap();
        }
    }
    let ca = std::fs::read(a.pki.join("ca.pem")).unwrap();
    let hosts: Vec<(String, IpAddr)> = (0..a.agents)
        .map(|i| (format!("bench-{i}"), source(2, i)))
        .collect();
    if a.warm {
        for (host, from) in &hosts {
            agent(&a, &ca, host, *from)
                .await
                .unwrap_or_else(|e| panic!("{host} before the flood: {e}"));
        }
    }

    // The flood.
    let stop = CancellationToken::new();
    let attempts = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..a.hostile {
        let src = source(1, i % a.hostile_sources.max(1));
        let (stop, attempts, open) = (stop.clone(), attempts.clone(), open.clone());
        let (target, pause, speak) = (a.target, Duration::from_millis(a.reopen_ms), a.speak);
        flood.spawn(async move {
            loop {
                let sock = TcpSocket::new_v4().unwrap();
                if sock.bind(SocketAddr::new(src, 0)).is_err() {
                    tokio::time::sleep(pause).await;
                    continue;
                }
                attempts.fetch_add(1, Ordering::Relaxed);
                let c = tokio::select! {
                    () = stop.cancelled() => return,
                    c = tokio::time::timeout(Duration::from_secs(10), sock.connect(target)) => c,
                };
                if let Ok(Ok(mut tcp)) = c {
                    if speak {
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, &[0x16, 3, 1]).await;
                    }
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 64];
                    tokio::select! {
                        () = stop.cancelled() => { open.fetch_sub(1, Ordering::Relaxed); return }
                        _ = tcp.read(&mut buf) => {}
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        });
    }
    let peak = Arc::new(std::sync::Mutex::new((0usize, 0u64)));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), a.pid);
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let (f, r) = sample(pid);
                {
                    let mut p = peak.lock().unwrap();
                    *p = (p.0.max(f), p.1.max(r));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let before = attempts.load(Ordering::Relaxed);
    let flood_open = open.load(Ordering::Relaxed);

    // The agents, all at once.
    let a = Arc::new(a);
    let ca = Arc::new(ca);
    let mut fleet = tokio::task::JoinSet::new();
    for (host, from) in hosts {
        let (a, ca) = (a.clone(), ca.clone());
        fleet.spawn(async move { agent(&a, &ca, &host, from).await });
    }
    let mut times = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    while let Some(r) = fleet.join_next().await {
        match r.unwrap() {
            Ok(t) => times.push(t),
            Err(e) => *errors.entry(e.chars().take(120).collect()).or_default() += 1,
        }
    }
    let during = attempts.load(Ordering::Relaxed) - before;
    stop.cancel();
    let _ = sampler.await;
    while flood.join_next().await.is_some() {}
    times.sort();
    let (fds, rss_kib) = *peak.lock().unwrap();
    let report = serde_json::json!({
        "hostile": a.hostile,
        "hostile_sources": a.hostile_sources,
        "warm": a.warm,
        "speak": a.speak,
        "agents": a.agents,
        "welcomed": times.len(),
        "p50_ms": quantile(&times, 0.5),
        "p99_ms": quantile(&times, 0.99),
        "max_ms": times.last().map_or(f64::NAN, |t| t.as_secs_f64() * 1000.0),
        "hostile_open_at_start": flood_open,
        "hostile_connects_while_agents_connected": during,
        "collector_fds_max": fds,
        "collector_rss_mib_max": rss_kib as f64 / 1024.0,
        "errors": errors,
    });
    println!("{report}");
}
