//! A worker process: its share of the agents. It talks to the parent in JSON lines on
//! stdout (one [`Report`] per phase, the last with its measurements) and waits for a
//! `go` line on stdin between phases, so every worker moves from phase to phase together
//! and the parent can sample the collector at the boundaries. A closed stdin (the parent
//! died) stops it.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use listenscope_collector::pki::Ca;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::agent::{self, Ctx, Phase, Spec};
use crate::mix::Rng;
use crate::stats::{Report, Stats};
use crate::{Mode, Plan};

/// At the end, how long agents get to disconnect once their last Ack is in.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

fn emit(r: &Report) {
    let line = serde_json::to_string(r).expect("a report serializes");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Lets this process open as many files as the hard limit allows (one socket per agent).
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: setrlimit only reads the struct we pass.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
    r.rlim_cur
}

/// Seed for session ids and timer phases: differs per run and per process.
fn run_seed() -> u64 {
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read as _;
        f.read_exact(&mut b)
    }) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => crate::stats::epoch_ms().to_bits() ^ u64::from(std::process::id()),
    }
}

pub fn main(plan: Plan) -> ! {
    let nofile = raise_nofile();
    // One socket per connected agent: all of them in hold mode, `at_once` in turns.
    let open = match plan.mode {
        Mode::Hold => plan.count,
        Mode::Turns => plan.count.min(plan.at_once as u64),
    };
    if open + 64 > nofile {
        eprintln!(
            "bench_fleet worker: {open} connections at once but only {nofile} open files \
             allowed; use more --processes"
        );
        std::process::exit(2);
    }
    listenscope_core::pem::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let stats = rt.block_on(run(plan));
    emit(&Report::Result {
        stats: Box::new(stats),
    });
    // Agents' connections are closed already; skip dropping thousands of tasks.
    std::process::exit(0)
}

/// Waits for `go` from the parent; false on EOF or at `deadline`.
async fn wait_go(cmd: &mut mpsc::UnboundedReceiver<Option<String>>, deadline: Instant) -> bool {
    loop {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            cmd.recv(),
        )
        .await
        {
            Ok(Some(Some(l))) if l.trim() == "go" => return true,
            Ok(Some(Some(_))) => {}
            _ => return false,
        }
    }
}

/// Polls `done` until it holds or `deadline` passes; false at the deadline.
async fn wait_until(deadline: Instant, done: impl Fn() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(50)).await;
    }
}

async fn run(plan: Plan) -> Stats {
    let deadline = Instant::now() + plan.max_duration;
    let (cmd_tx, mut cmd) = mpsc::unbounded_channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            match line {
                Ok(l) => {
                    if cmd_tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = cmd_tx.send(None);
    });

    // Every agent's certificate, issued in memory before the clock starts.
    let ca = Ca::load(&plan.pki).unwrap_or_else(|e| {
        eprintln!("bench_fleet worker: {e}");
        std::process::exit(2)
    });
    let ca_pem = std::fs::read(plan.pki.join("ca.pem")).expect("ca.pem was just read");
    let seed = run_seed();
    let mut specs = Vec::with_capacity(plan.count as usize);
    for i in 0..plan.count {
        let index = plan.first + i;
        let name = format!("fleet-{:06}", plan.name_offset + index);
        let (cert_pem, key_pem) = ca
            .issue_pem(&name, plan.cert_days)
            .expect("issue a host certificate");
        let source = (plan.source_ips > 0).then(|| {
            // 127.0.0.2 … 127.0.0.(1+K): more source addresses, more ephemeral ports.
            let k = (index % u64::from(plan.source_ips)) as u32;
            IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + k))
        });
        specs.push(Spec {
            index,
            name,
            cert_pem,
            key_pem,
            collector: (index % plan.collectors.len() as u64) as usize,
            source,
            seed: Rng::new(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64(),
        });
    }
    let mut stats = Stats {
        agents: plan.count,
        held_connect_end: vec![0; plan.collectors.len()],
        held_hold_end: vec![0; plan.collectors.len()],
        ..Stats::default()
    };
    emit(&Report::Ready);
    if !wait_go(&mut cmd, deadline).await {
        stats.deadline_hit = Instant::now() >= deadline;
        return stats;
    }

    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let (burst_tx, burst_rx) = watch::channel(None);
    let ctx = Arc::new(Ctx {
        live: plan.collectors.iter().map(|_| AtomicU64::new(0)).collect(),
        plan: plan.clone(),
        ca_pem,
        stats: Mutex::new(stats),
        first_outcomes: AtomicU64::new(0),
        welcome_outcomes: AtomicU64::new(0),
        burst_go: burst_rx,
        finished: AtomicU64::new(0),
        paced: AtomicBool::new(false),
        phase: phase_rx,
    });
    tokio::spawn(pace(Arc::clone(&ctx), specs, deadline));

    let attempted = || ctx.stats().attempted;
    let paced = || ctx.paced.load(Ordering::Relaxed);
    let mut deadline_hit = false;
    match plan.mode {
        Mode::Hold => {
            let mut go_on = true;
            if plan.burst {
                // Everyone connected, first snapshots held back; then all at once.
                deadline_hit |= !wait_until(deadline, || {
                    paced() && ctx.welcome_outcomes.load(Ordering::Relaxed) >= attempted()
                })
                .await;
                let live = ctx.live();
                ctx.stats().held_welcomed = live.clone();
                emit(&Report::Welcomed { live });
                go_on = wait_go(&mut cmd, deadline).await;
                if go_on {
                    ctx.stats().burst_go_ms = Some(crate::stats::epoch_ms());
                    let _ = burst_tx.send(Some(Instant::now()));
                } else {
                    deadline_hit = true;
                }
            }
            if go_on {
                deadline_hit |= !wait_until(deadline, || {
                    paced() && ctx.first_outcomes.load(Ordering::Relaxed) >= attempted()
                })
                .await;
                emit(&Report::Connected { live: ctx.live() });
            }
            if go_on && wait_go(&mut cmd, deadline).await {
                ctx.stats().held_connect_end = ctx.live();
                let _ = phase_tx.send(Phase::Hold);
                let end = (Instant::now() + plan.hold).min(deadline);
                deadline_hit |= end == deadline;
                // The hold ends early only when no agent is left.
                wait_until(end, || {
                    paced() && ctx.finished.load(Ordering::Relaxed) >= attempted()
                })
                .await;
                ctx.stats().held_hold_end = ctx.live();
                emit(&Report::Held { live: ctx.live() });
                deadline_hit |= !wait_go(&mut cmd, deadline).await;
            } else {
                deadline_hit = true;
            }
        }
        Mode::Turns => {
            deadline_hit |= !wait_until(deadline, || {
                paced() && ctx.finished.load(Ordering::Relaxed) >= attempted()
            })
            .await;
        }
    }
    let _ = phase_tx.send(Phase::Stop);
    // Outstanding Acks may take up to their timeout, then the half-close its own.
    let grace = Instant::now() + plan.ack_timeout + STOP_GRACE;
    wait_until(grace, || {
        paced() && ctx.finished.load(Ordering::Relaxed) >= attempted()
    })
    .await;
    let mut s = ctx.stats().clone();
    s.deadline_hit |= deadline_hit;
    s
}

/// Starts the agents at the connect rate, with at most `connect_concurrency` handshakes
/// in flight (and, in turns mode, at most `at_once` sessions open).
async fn pace(ctx: Arc<Ctx>, specs: Vec<Spec>, deadline: Instant) {
    let plan = &ctx.plan;
    let handshakes = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let slots = Arc::new(Semaphore::new(plan.at_once.max(1)));
    let t0 = Instant::now();
    let stopped = || *ctx.phase.borrow() == Phase::Stop || Instant::now() >= deadline;
    for (i, spec) in specs.into_iter().enumerate() {
        if stopped() {
            break;
        }
        let due = t0 + Duration::from_secs_f64(i as f64 / plan.connect_rate);
        sleep_until(due.min(deadline)).await;
        let slot = match plan.mode {
            Mode::Turns => {
                match timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    Arc::clone(&slots).acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => Some(p),
                    _ => break,
                }
            }
            Mode::Hold => None,
        };
        let handshake = match timeout(
            deadline.saturating_duration_since(Instant::now()),
            Arc::clone(&handshakes).acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => break,
        };
        if stopped() {
            break;
        }
        ctx.stats().attempted += 1;
        tokio::spawn(agent::run(Arc::clone(&ctx), spec, handshake, slot));
    }
    ctx.paced.store(true, Ordering::Relaxed);
}
