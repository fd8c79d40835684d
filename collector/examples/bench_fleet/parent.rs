//! The parent process: starts the workers (this program again, with `--worker`), moves
//! them through the phases together, samples the collector(s) and PostgreSQL from /proc
//! at each boundary, merges what the workers measured and prints it.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::{Count, Report, Stats, Summary, epoch_ms};
use crate::{Args, Mode, Plan};

/// Phases in order, as a worker reports them.
fn rank(r: &Report) -> u8 {
    match r {
        Report::Ready => 1,
        Report::Welcomed { .. } => 2,
        Report::Connected { .. } => 3,
        Report::Held { .. } => 4,
        Report::Result { .. } => 5,
    }
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    reached: u8,
    gone: bool,
    result: Option<Stats>,
}

// ---- /proc ----

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (ppid, utime + stime, cutime + cstime) in ticks, from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some((num(4)? as u32, num(14)? + num(15)?, num(16)? + num(17)?))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn cpu_s(pid: u32) -> Option<f64> {
    stat(pid).map(|(_, own, _)| own as f64 / clock_ticks())
}

/// CPU of a PostgreSQL server: the postmaster's own and its reaped children's
/// (cutime + cstime: backends that exited), plus every live child's own.
fn tree_cpu_s(pid: u32) -> Option<f64> {
    let (_, own, reaped) = stat(pid)?;
    let mut ticks = own + reaped;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, t, _)) = stat(child)
                && ppid == pid
            {
                ticks += t;
            }
        }
    }
    Some(ticks as f64 / clock_ticks())
}

#[derive(Debug, Default, Clone, Serialize)]
struct Sample {
    rss_kib: Option<u64>,
    cpu_s: Option<f64>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Samples {
    collectors: Vec<Sample>,
    postgres_cpu_s: Option<f64>,
}

fn sample(args: &Args) -> Samples {
    Samples {
        collectors: args
            .collector_pids
            .iter()
            .map(|&p| Sample {
                rss_kib: rss_kib(p),
                cpu_s: cpu_s(p),
            })
            .collect(),
        postgres_cpu_s: args.pg_pid.and_then(tree_cpu_s),
    }
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

// ---- output ----

#[derive(Debug, Serialize)]
struct CollectorOut {
    url: String,
    pid: u32,
    sessions_held_connect_end: u64,
    sessions_held_hold_end: u64,
    rss_kib_before: Option<u64>,
    rss_kib_connect_end: Option<u64>,
    /// Burst mode: after every first snapshot was acknowledged (`connect_end` is then
    /// after every Welcome, before any snapshot).
    rss_kib_burst_end: Option<u64>,
    rss_kib_hold_end: Option<u64>,
    rss_kib_after: Option<u64>,
    /// (RSS once first snapshots are stored − before) / sessions it held then: the end of
    /// the connect phase, or in burst mode of the burst.
    rss_kib_per_session: Option<f64>,
    /// Burst mode: (RSS when every agent was welcomed − before) / sessions held then:
    /// an idle session before any snapshot.
    rss_kib_per_session_welcomed: Option<f64>,
    /// Per phase: connect (go → every first snapshot acknowledged or failed; burst mode:
    /// → every Welcome), burst (burst mode: go → every first snapshot acknowledged or
    /// failed), hold, disconnect; in turns mode only `fill`.
    cpu_s: BTreeMap<&'static str, Option<f64>>,
}

/// Burst mode: the first snapshots, held back until every agent was connected, sent at
/// once.
#[derive(Debug, Serialize)]
struct BurstOut {
    /// Agents that were welcomed and waiting at the go (and sent their snapshot).
    agents: u64,
    acked: u64,
    /// Listener rows of the acknowledged snapshots.
    rows: u64,
    /// The parent's go → the last first-snapshot Ack.
    go_to_last_ack_s: Option<f64>,
    /// rows / go_to_last_ack_s.
    rows_per_s: Option<f64>,
    /// Per agent: the go → its Ack.
    ack_latency_from_go: Summary,
    /// Per agent: its first chunk handed to the stream → its Ack.
    ack_latency_from_send: Summary,
    /// Answers other than an Ack to a burst snapshot (a Resync), and sessions that ended
    /// before its Ack (the stream's end, a timeout), by reason in `problems`.
    non_ack: u64,
    problems: BTreeMap<String, Count>,
}

#[derive(Debug, Serialize)]
struct Output {
    label: String,
    mode: &'static str,
    agents: u64,
    listeners_per_host: usize,
    processes: usize,
    collectors: Vec<String>,
    connect_rate: f64,
    connect_concurrency: usize,
    at_once: Option<usize>,
    hold_s: Option<f64>,
    observed_ago_s: Option<f64>,
    extra_listeners: usize,
    delta_every_s: f64,
    heartbeat_every_s: f64,
    attempted: u64,
    welcomed: u64,
    sessions_held_connect_end: Option<u64>,
    sessions_held_hold_end: Option<u64>,
    first_snapshots_acked: u64,
    first_snapshots_failed: u64,
    /// go → the last Welcome.
    time_to_connect_all_s: Option<f64>,
    /// go → the last first-snapshot Ack.
    time_to_all_first_acked_s: Option<f64>,
    first_rows: u64,
    /// first_rows / (last first-snapshot Ack − first first-snapshot sent).
    first_rows_per_s: Option<f64>,
    welcome_latency: Summary,
    snapshot_ack_latency: Summary,
    burst: Option<BurstOut>,
    delta_ack_latency: Summary,
    delta_ack_latency_after_hold: Summary,
    deltas_sent: u64,
    deltas_acked: u64,
    heartbeats_sent: u64,
    resyncs: u64,
    failures: BTreeMap<String, Count>,
    disconnects_clean: u64,
    disconnects_unclean: BTreeMap<String, Count>,
    collector: Vec<CollectorOut>,
    postgres_pid: Option<u32>,
    postgres_cpu_s: BTreeMap<&'static str, Option<f64>>,
    /// The phases in order (keys of the per-phase maps).
    phases: Vec<&'static str>,
    phase_s: BTreeMap<&'static str, f64>,
    wall_s: f64,
    deadline_hit: bool,
    workers_lost: usize,
}

fn fmt_int(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn f1(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

fn f_ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn lat(s: &Summary) -> String {
    if s.n == 0 {
        return "– (none)".into();
    }
    format!(
        "{} / {} / {} ms (n = {})",
        f_ms(s.p50_ms),
        f_ms(s.p99_ms),
        f_ms(s.max_ms),
        fmt_int(s.n)
    )
}

fn mib(k: Option<u64>) -> String {
    k.map_or("–".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

fn cell(s: &str) -> String {
    let s: String = s.chars().take(240).collect();
    s.replace('|', "\\|").replace('\n', " ")
}

fn markdown(o: &Output) -> String {
    let mut t = String::new();
    let mut row = |k: &str, v: String| t.push_str(&format!("| {k} | {v} |\n"));
    let title = format!(
        "{}{}: {} agents × {} listeners, {} collector(s), {} worker process(es)",
        if o.label.is_empty() { "" } else { &o.label },
        if o.label.is_empty() {
            o.mode.to_string()
        } else {
            format!(" ({})", o.mode)
        },
        fmt_int(o.agents),
        o.listeners_per_host,
        o.collectors.len(),
        o.processes
    );
    let of = |n: u64| format!("{} of {}", fmt_int(n), fmt_int(o.agents));
    if let Some(h) = o.sessions_held_connect_end {
        row(
            if o.burst.is_some() {
                "sessions held after the burst"
            } else {
                "sessions held at the end of the connect phase"
            },
            of(h),
        );
    }
    if let Some(h) = o.sessions_held_hold_end {
        row(
            &format!(
                "sessions held at the end of the hold ({:.0} s)",
                o.hold_s.unwrap_or(0.0)
            ),
            of(h),
        );
    }
    let failed: u64 = o.failures.values().map(|c| c.count).sum();
    row(
        "sessions refused or lost (by reason below)",
        fmt_int(failed),
    );
    if let Some(ago) = o.observed_ago_s {
        row("snapshots observed", format!("{ago:.0} s ago"));
    }
    if o.extra_listeners > 0 {
        row(
            "listeners opened per host (over its stored inventory)",
            fmt_int(o.extra_listeners as u64),
        );
    }
    let connect = if o.burst.is_some() {
        "connect phase: "
    } else {
        ""
    };
    row(
        &format!("{connect}time to connect all (go → last Welcome)"),
        format!(
            "{} s ({} welcomed)",
            f1(o.time_to_connect_all_s),
            fmt_int(o.welcomed)
        ),
    );
    row(
        &format!("{connect}connect → Welcome p50 / p99 / max"),
        lat(&o.welcome_latency),
    );
    match &o.burst {
        None => {
            row(
                "time until all first snapshots acknowledged (go → last Ack)",
                format!(
                    "{} s ({} acknowledged, {} failed)",
                    f1(o.time_to_all_first_acked_s),
                    fmt_int(o.first_snapshots_acked),
                    fmt_int(o.first_snapshots_failed)
                ),
            );
            row(
                "first-snapshot rows/s (rows acknowledged / first sent → last Ack)",
                format!(
                    "{} ({} rows)",
                    o.first_rows_per_s
                        .map_or("–".into(), |v| fmt_int(v.round() as u64)),
                    fmt_int(o.first_rows)
                ),
            );
            row(
                "first-snapshot ack latency p50 / p99 / max",
                lat(&o.snapshot_ack_latency),
            );
        }
        Some(b) => {
            row(
                "burst: snapshots sent at the go / acknowledged",
                format!("{} / {}", fmt_int(b.agents), fmt_int(b.acked)),
            );
            row(
                "burst: rows/s (rows acknowledged / go → last Ack)",
                format!(
                    "{} ({} rows)",
                    b.rows_per_s
                        .map_or("–".into(), |v| fmt_int(v.round() as u64)),
                    fmt_int(b.rows)
                ),
            );
            row(
                "burst: go → last first-snapshot Ack",
                format!("{} s", f1(b.go_to_last_ack_s)),
            );
            row(
                "burst: snapshot ack latency from go p50 / p99 / max",
                lat(&b.ack_latency_from_go),
            );
            row(
                "burst: snapshot ack latency from its send p50 / p99 / max",
                lat(&b.ack_latency_from_send),
            );
            row(
                "burst: non-Ack answers or stream errors (by reason below)",
                fmt_int(b.non_ack),
            );
        }
    }
    if o.mode == "hold" {
        row(
            "delta ack latency in the hold p50 / p99 / max",
            lat(&o.delta_ack_latency),
        );
        if o.delta_ack_latency_after_hold.n > 0 {
            row(
                "delta ack latency, Ack after the hold ended (during disconnects)",
                lat(&o.delta_ack_latency_after_hold),
            );
        }
        row(
            "deltas sent / acknowledged, heartbeats, resyncs",
            format!(
                "{} / {}, {}, {}",
                fmt_int(o.deltas_sent),
                fmt_int(o.deltas_acked),
                fmt_int(o.heartbeats_sent),
                fmt_int(o.resyncs)
            ),
        );
        let unclean: u64 = o.disconnects_unclean.values().map(|c| c.count).sum();
        row(
            "disconnects clean / not",
            format!("{} / {}", fmt_int(o.disconnects_clean), fmt_int(unclean)),
        );
    } else if o.resyncs > 0 {
        row("resyncs", fmt_int(o.resyncs));
    }
    let phases = &o.phases;
    let phase_names = phases.join(" / ");
    for (i, c) in o.collector.iter().enumerate() {
        let n = if o.collector.len() > 1 {
            format!("collector {} (pid {})", i + 1, c.pid)
        } else {
            format!("collector (pid {})", c.pid)
        };
        if o.collector.len() > 1 {
            row(
                &format!("{n} sessions held connect end / hold end"),
                format!(
                    "{} / {}",
                    fmt_int(c.sessions_held_connect_end),
                    fmt_int(c.sessions_held_hold_end)
                ),
            );
        }
        let rss = if o.burst.is_some() {
            format!(
                "{} / {} / {} / {} / {}",
                mib(c.rss_kib_before),
                mib(c.rss_kib_connect_end),
                mib(c.rss_kib_burst_end),
                mib(c.rss_kib_hold_end),
                mib(c.rss_kib_after)
            )
        } else if o.mode == "hold" {
            format!(
                "{} / {} / {} / {}",
                mib(c.rss_kib_before),
                mib(c.rss_kib_connect_end),
                mib(c.rss_kib_hold_end),
                mib(c.rss_kib_after)
            )
        } else {
            format!("{} / {}", mib(c.rss_kib_before), mib(c.rss_kib_after))
        };
        row(
            &format!(
                "{n} RSS MiB {}",
                if o.burst.is_some() {
                    "before / connected / after the burst / held / after"
                } else if o.mode == "hold" {
                    "before / connected / held / after"
                } else {
                    "before / after"
                }
            ),
            rss,
        );
        if o.mode == "hold" {
            row(
                &format!(
                    "{n} RSS per held session{}",
                    if o.burst.is_some() {
                        " after the burst"
                    } else {
                        ""
                    }
                ),
                c.rss_kib_per_session
                    .map_or("–".into(), |k| format!("{k:.1} KiB")),
            );
            if let Some(k) = c.rss_kib_per_session_welcomed {
                row(
                    &format!("{n} RSS per session welcomed, before any snapshot"),
                    format!("{k:.1} KiB"),
                );
            }
        }
        let cpu: Vec<String> = phases.iter().map(|p| f1(c.cpu_s[p])).collect();
        row(&format!("{n} CPU s {phase_names}"), cpu.join(" / "));
    }
    if let Some(pid) = o.postgres_pid {
        let cpu: Vec<String> = phases.iter().map(|p| f1(o.postgres_cpu_s[p])).collect();
        row(
            &format!("PostgreSQL (pid {pid} and children) CPU s {phase_names}"),
            cpu.join(" / "),
        );
    }
    let ph: Vec<String> = phases
        .iter()
        .map(|k| format!("{k} {:.1}", o.phase_s.get(k).copied().unwrap_or(0.0)))
        .collect();
    row("phase wall times s", ph.join(", "));
    if o.deadline_hit || o.workers_lost > 0 {
        row(
            "**incomplete**",
            format!(
                "deadline hit: {}, workers lost: {}",
                o.deadline_hit, o.workers_lost
            ),
        );
    }
    let mut out = format!("### {title}\n\n| measure | value |\n|---|---|\n{t}");
    if let Some(b) = o.burst.as_ref().filter(|b| !b.problems.is_empty()) {
        out.push_str(
            "\n| burst: not acknowledged (stage: reason) | count | first message |\n|---|---:|---|\n",
        );
        for (k, c) in &b.problems {
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                cell(k),
                fmt_int(c.count),
                cell(&c.first)
            ));
        }
    }
    if !o.failures.is_empty() || !o.disconnects_unclean.is_empty() {
        out.push_str(
            "\n| refused or lost (stage: reason) | count | first message |\n|---|---:|---|\n",
        );
        for (k, c) in &o.failures {
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                cell(k),
                fmt_int(c.count),
                cell(&c.first)
            ));
        }
        for (k, c) in &o.disconnects_unclean {
            out.push_str(&format!(
                "| disconnect: {} | {} | {} |\n",
                cell(k),
                fmt_int(c.count),
                cell(&c.first)
            ));
        }
    }
    out
}

// ---- the run ----

fn share(total: u64, parts: usize, i: usize) -> u64 {
    let parts = parts as u64;
    total / parts + u64::from((i as u64) < total % parts)
}

pub fn main(args: Args, plan: Plan, processes: usize) -> std::process::ExitCode {
    let started = Instant::now();
    // Workers finish by themselves by max_duration + ack timeout + their stop grace.
    let deadline = started
        + args.max_duration
        + args.ack_timeout
        + crate::worker::STOP_GRACE
        + Duration::from_secs(60);
    let exe = std::env::current_exe().expect("the path of this program");
    let (tx, rx) = mpsc::channel::<(usize, Option<Report>)>();
    let mut workers: Vec<Worker> = Vec::new();
    let mut first = 0;
    let ceil_div = |a: usize, b: usize| a.div_ceil(b.max(1));
    for i in 0..processes {
        let count = share(args.agents, processes, i);
        let p = Plan {
            first,
            count,
            connect_rate: args.connect_rate / processes as f64,
            connect_concurrency: ceil_div(args.connect_concurrency, processes),
            at_once: ceil_div(args.at_once, processes),
            ..plan.clone()
        };
        first += count;
        let mut child = Command::new(&exe)
            .arg("--worker")
            .arg(serde_json::to_string(&p).expect("plan serializes"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a worker process");
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Report>(&line) {
                    Ok(r) => {
                        if tx.send((i, Some(r))).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("worker {i}: {line}"),
                }
            }
            let _ = tx.send((i, None));
        });
        workers.push(Worker {
            child,
            stdin,
            reached: 0,
            gone: false,
            result: None,
        });
    }
    drop(tx);

    // Waits until every worker reached phase `want` (or ended); false at the deadline.
    let wait = |workers: &mut Vec<Worker>, want: u8| -> bool {
        loop {
            if workers.iter().all(|w| w.gone || w.reached >= want) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((i, Some(r))) => {
                    let w = &mut workers[i];
                    w.reached = w.reached.max(rank(&r));
                    match r {
                        Report::Result { stats } => w.result = Some(*stats),
                        Report::Welcomed { live }
                        | Report::Connected { live }
                        | Report::Held { live } => {
                            eprintln!(
                                "bench_fleet: worker {i}: {} sessions live",
                                live.iter().sum::<u64>()
                            );
                        }
                        Report::Ready => {}
                    }
                }
                Ok((i, None)) => workers[i].gone = true,
                Err(_) => return false,
            }
        }
    };
    let go = |workers: &mut Vec<Worker>| {
        for w in workers.iter_mut() {
            if let Some(s) = w.stdin.as_mut() {
                let _ = writeln!(s, "go").and_then(|()| s.flush());
            }
        }
    };

    let mut ok = wait(&mut workers, 1);
    let unready = workers.iter().filter(|w| w.reached < 1).count();
    if unready > 0 {
        eprintln!("bench_fleet: {unready} worker(s) exited before they were ready");
    }
    eprintln!(
        "bench_fleet: certificates issued in {:.1} s; connecting",
        started.elapsed().as_secs_f64()
    );
    let before = sample(&args);
    let t_go_ms = epoch_ms();
    let t_go = Instant::now();
    go(&mut workers);
    let mut t_burst_go_ms = None;
    let mut samples = vec![("before", before)];
    let mut phase_s = BTreeMap::new();
    let mut t_last = t_go;
    let mut mark = |name: &'static str, samples: &mut Vec<(&'static str, Samples)>| {
        samples.push((name, sample(&args)));
        phase_s.insert(name, t_last.elapsed().as_secs_f64());
        t_last = Instant::now();
    };
    match args.mode {
        Mode::Hold => {
            if args.burst {
                ok &= wait(&mut workers, 2);
                mark("connect", &mut samples);
                eprintln!("bench_fleet: every agent connected; first snapshots go now");
                t_burst_go_ms = Some(epoch_ms());
                go(&mut workers);
                ok &= wait(&mut workers, 3);
                mark("burst", &mut samples);
            } else {
                ok &= wait(&mut workers, 3);
                mark("connect", &mut samples);
            }
            eprintln!(
                "bench_fleet: {} over; holding for {:?}",
                if args.burst { "burst" } else { "connect phase" },
                args.hold
            );
            go(&mut workers);
            ok &= wait(&mut workers, 4);
            mark("hold", &mut samples);
            eprintln!("bench_fleet: hold over; disconnecting");
            go(&mut workers);
            ok &= wait(&mut workers, 5);
            mark("disconnect", &mut samples);
        }
        Mode::Turns => {
            ok &= wait(&mut workers, 5);
            mark("fill", &mut samples);
        }
    }
    // Our own children: reaped, or killed by pid when they overstay.
    for w in &mut workers {
        w.stdin = None;
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match w.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    break;
                }
            }
        }
    }

    let mut stats = Stats::default();
    let mut lost = 0;
    for w in &mut workers {
        match w.result.take() {
            Some(s) => stats.merge(s),
            None => lost += 1,
        }
    }
    let times = Times {
        go_ms: t_go_ms,
        burst_go_ms: t_burst_go_ms,
    };
    let out = output(
        &args, processes, stats, &samples, phase_s, times, started, !ok, lost,
    );
    println!("{}", markdown(&out));
    if let Some(path) = &args.json {
        write_json(path, &out);
    }
    if out.deadline_hit || lost > 0 {
        std::process::ExitCode::from(3)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

fn write_json(path: &Path, out: &Output) {
    let json = serde_json::to_string_pretty(out).expect("output serializes");
    if let Err(e) = std::fs::write(path, json + "\n") {
        eprintln!("bench_fleet: {}: {e}", path.display());
    }
}

/// Epoch ms of the parent's go to connect, and (burst mode) of its go to the burst.
struct Times {
    go_ms: f64,
    burst_go_ms: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
fn output(
    args: &Args,
    processes: usize,
    s: Stats,
    samples: &[(&'static str, Samples)],
    phase_s: BTreeMap<&'static str, f64>,
    times: Times,
    started: Instant,
    deadline: bool,
    workers_lost: usize,
) -> Output {
    let get = |name: &str| samples.iter().find(|(n, _)| *n == name).map(|(_, s)| s);
    let phases: Vec<&'static str> = samples.iter().skip(1).map(|(n, _)| *n).collect();
    let held = |v: &Vec<u64>| (args.mode == Mode::Hold).then(|| v.iter().sum::<u64>());
    let collector = args
        .collector_pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let rss = |name: &str| get(name).and_then(|s| s.collectors.get(i)?.rss_kib);
            let cpu = |name: &str| get(name).and_then(|s| s.collectors.get(i)?.cpu_s);
            let mut prev = "before";
            let mut cpu_s = BTreeMap::new();
            for p in &phases {
                cpu_s.insert(*p, diff(cpu(prev), cpu(p)));
                prev = p;
            }
            let held_c = s.held_connect_end.get(i).copied().unwrap_or(0);
            CollectorOut {
                url: args.collectors.get(i).cloned().unwrap_or_default(),
                pid,
                sessions_held_connect_end: held_c,
                sessions_held_hold_end: s.held_hold_end.get(i).copied().unwrap_or(0),
                rss_kib_before: rss("before"),
                rss_kib_connect_end: rss("connect"),
                rss_kib_burst_end: rss("burst"),
                rss_kib_hold_end: rss("hold"),
                rss_kib_after: rss("disconnect").or(rss("fill")),
                rss_kib_per_session_welcomed: match (
                    rss("before"),
                    rss("connect"),
                    s.held_welcomed.get(i).copied().unwrap_or(0),
                ) {
                    (Some(a), Some(b), n) if args.burst && n > 0 => {
                        Some((b as f64 - a as f64) / n as f64)
                    }
                    _ => None,
                },
                rss_kib_per_session: match (rss("before"), rss("burst").or(rss("connect"))) {
                    (Some(a), Some(b)) if held_c > 0 => Some((b as f64 - a as f64) / held_c as f64),
                    _ => None,
                },
                cpu_s,
            }
        })
        .collect();
    let mut postgres_cpu_s = BTreeMap::new();
    let mut prev = "before";
    for p in &phases {
        postgres_cpu_s.insert(
            *p,
            diff(
                get(prev).and_then(|s| s.postgres_cpu_s),
                get(p).and_then(|s| s.postgres_cpu_s),
            ),
        );
        prev = p;
    }
    let secs = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / 1000.0);
    let burst = args.burst.then(|| {
        let took = secs(times.burst_go_ms, s.first_ack_max_ms);
        BurstOut {
            agents: s.burst_agents,
            acked: s.first_acked,
            rows: s.first_rows,
            go_to_last_ack_s: took,
            rows_per_s: took.filter(|d| *d > 0.0).map(|d| s.first_rows as f64 / d),
            ack_latency_from_go: Summary::of(&s.burst_lat),
            ack_latency_from_send: Summary::of(&s.snapshot_lat),
            non_ack: s.burst_problems.values().map(|c| c.count).sum(),
            problems: s.burst_problems.clone(),
        }
    });
    Output {
        label: args.label.clone(),
        mode: match args.mode {
            Mode::Hold => "hold",
            Mode::Turns => "turns",
        },
        agents: args.agents,
        listeners_per_host: args.listeners,
        processes,
        collectors: args.collectors.clone(),
        connect_rate: args.connect_rate,
        connect_concurrency: args.connect_concurrency,
        at_once: (args.mode == Mode::Turns).then_some(args.at_once),
        hold_s: (args.mode == Mode::Hold).then_some(args.hold.as_secs_f64()),
        observed_ago_s: args.observed_ago.map(|d| d.as_secs_f64()),
        extra_listeners: args.extra_listeners,
        delta_every_s: args.delta_every.as_secs_f64(),
        heartbeat_every_s: args.heartbeat_every.as_secs_f64(),
        attempted: s.attempted,
        welcomed: s.welcomed,
        sessions_held_connect_end: held(&s.held_connect_end),
        sessions_held_hold_end: held(&s.held_hold_end),
        first_snapshots_acked: s.first_acked,
        first_snapshots_failed: s.first_failed,
        time_to_connect_all_s: secs(Some(times.go_ms), s.welcome_max_ms),
        time_to_all_first_acked_s: secs(Some(times.go_ms), s.first_ack_max_ms),
        first_rows: s.first_rows,
        first_rows_per_s: secs(s.first_sent_min_ms, s.first_ack_max_ms)
            .filter(|d| *d > 0.0)
            .map(|d| s.first_rows as f64 / d),
        welcome_latency: Summary::of(&s.welcome_lat),
        snapshot_ack_latency: Summary::of(&s.snapshot_lat),
        burst,
        delta_ack_latency: Summary::of(&s.delta_lat),
        delta_ack_latency_after_hold: Summary::of(&s.delta_lat_at_stop),
        deltas_sent: s.deltas_sent,
        deltas_acked: s.deltas_acked,
        heartbeats_sent: s.heartbeats,
        resyncs: s.resyncs,
        failures: s.failures,
        disconnects_clean: s.disconnects_clean,
        disconnects_unclean: s.disconnects_unclean,
        collector,
        postgres_pid: args.pg_pid,
        postgres_cpu_s,
        phases,
        phase_s,
        wall_s: started.elapsed().as_secs_f64(),
        deadline_hit: deadline || s.deadline_hit,
        workers_lost,
    }
}
