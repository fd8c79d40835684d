//! The scanner loop of `run`: a whole scan every `interval` (the reconciliation), and in
//! between the changes the doorbell rings for, or that polling finds (docs/realtime.md).
//!
//! - **doorbell**: kernel tracepoints (`os::doorbell`) name the process that listened,
//!   closed a listener or bound a socket. Events are gathered for [`COALESCE`] after the
//!   first, then `live::plan` says which namespaces to read again, and the refreshed
//!   inventory goes to the outbox at once. Lost events cost a whole scan.
//! - **polling**, where the doorbell cannot open (no CAP_PERFMON, no tracefs, seccomp,
//!   lockdown) or was not wanted: every namespace's sockets dumped through kept netlink
//!   sockets and compared, at an interval 100 times what a round costs in CPU (between
//!   [`POLL_MIN`] and [`POLL_MAX`]), so it stays within about 1 % of a core.
//! - **interval**: whole scans only.
//!
//! Pacing: refreshes spend from a CPU budget ([`Budget`]) that fills at 1 % of a core and
//! holds at most [`BUDGET_BURST`]. A sporadic change is refreshed at once. A storm (a DNS
//! server binding a port per query, a fleet of daemons restarting) empties the budget;
//! refreshes then wait for it, but never more than [`PACE_MAX`], so the latency goal
//! holds and a storm costs at most one refresh a second (every event meanwhile is
//! gathered into it). Rejected: a pause of 99 times a refresh's cost after every refresh,
//! which at 10,000 listeners (20–50 ms a refresh) delayed the next ordinary change by a
//! whole second; and the budget without a cap, which held a steady two changes a second
//! back by 4 s.
//!
//! The mode in force (`core::watch::Watch`) is reported to the collector (Hello and
//! heartbeats) and logged when it changes, so a missed latency goal is visible.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;

use listenscope_core::watch::{Watch, WatchMode};

use super::Shared;
use super::outbox::Recorded;
use crate::config::{RunConfig, WatchSetting};
use crate::live::{Dirty, Event, Scanner};
use crate::os::System;
use crate::record::state_of;
use crate::scan::Inventory;

/// How long events are gathered after the first before the inventory is refreshed.
pub const COALESCE: Duration = Duration::from_millis(100);
/// Shortest and longest polling intervals.
pub const POLL_MIN: Duration = Duration::from_secs(1);
pub const POLL_MAX: Duration = Duration::from_secs(10);
/// The share of a core the whole agent aims to stay within while it polls: the rounds
/// get what the rest of its work (whole scans, refreshes, sending, the journal) leaves.
const POLL_TARGET: f64 = 0.008;
/// The rounds' least share, however busy the rest is: the interval then says how far
/// behind changes may be, and it is reported.
const POLL_FLOOR: f64 = POLL_TARGET / 4.0;
/// How far back the rest of the agent's CPU is averaged: several whole scans, so one
/// does not swing the interval.
const POLL_WINDOW: Duration = Duration::from_secs(300);
/// The most CPU time refreshes may spend at once before the budget makes them wait.
pub const BUDGET_BURST: Duration = Duration::from_secs(1);
/// The share of a core the budget fills at: 1 %.
const BUDGET_SHARE: f64 = 0.01;
/// The longest a refresh waits for the budget.
pub const PACE_MAX: Duration = Duration::from_secs(1);
/// Most events held between two refreshes; past it they are dropped for a whole scan.
const PENDING_MAX: usize = 65_536;
/// Batches the doorbell thread may queue before it waits (events then wait in the
/// kernel's rings, and a ring that overflows reports lost events).
const CHANNEL: usize = 64;

/// The polling interval for rounds that cost `round` of CPU each, when the rest of the
/// agent uses `other` of a core: rounds get what is left of [`POLL_TARGET`] (at least
/// [`POLL_FLOOR`]), within [`POLL_MIN`]..=[`POLL_MAX`], rounded up to a whole second so
/// the reported mode does not flicker with noise.
pub fn poll_interval(round: Duration, other: f64) -> Duration {
    let room = (POLL_TARGET - other).max(POLL_FLOOR);
    let wanted = Duration::try_from_secs_f64(round.as_secs_f64() / room)
        .unwrap_or(POLL_MAX)
        .clamp(POLL_MIN, POLL_MAX);
    Duration::from_secs(wanted.as_secs() + u64::from(wanted.subsec_nanos() > 0)).min(POLL_MAX)
}

/// What polling has cost and what the rest of the agent uses, over [`POLL_WINDOW`].
#[derive(Debug, Default)]
pub struct PollPace {
    /// (when, the process's CPU time then, all rounds' CPU time until then), oldest first;
    /// one per round, so at most `POLL_WINDOW / POLL_MIN` + 1.
    samples: VecDeque<(Instant, Duration, Duration)>,
    rounds: Duration,
    /// The last rounds' cost: fast up, slow down.
    round: Duration,
}

impl PollPace {
    /// A round that cost `round` ended at `now`, with the process at `process` CPU time
    /// in all. Returns the interval to the next one.
    pub fn after_round(&mut self, now: Instant, process: Duration, round: Duration) -> Duration {
        self.rounds += round;
        // One slow round (a busy machine) does not swing the interval back and forth.
        self.round = round.max(self.round.mul_f64(0.8));
        self.samples.push_back((now, process, self.rounds));
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.0) > POLL_WINDOW)
        {
            self.samples.pop_front();
        }
        poll_interval(self.round, self.other())
    }

    /// The share of a core the agent used outside polling rounds over the window (0 until
    /// two rounds are known).
    pub fn other(&self) -> f64 {
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let wall = last.0.saturating_duration_since(first.0).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        let spent = last.1.saturating_sub(first.1);
        let rounds = last.2.saturating_sub(first.2);
        spent.saturating_sub(rounds).as_secs_f64() / wall
    }
}

/// Whether a new polling interval differs enough from the one the collector was told to
/// tell it again (at least 2 s, or half of it), so the stored mode does not churn.
pub fn worth_reporting(reported: Duration, now: Duration) -> bool {
    let diff = reported.abs_diff(now);
    diff >= Duration::from_secs(2) || diff >= reported / 2
}

/// CPU time refreshes may spend: fills at [`BUDGET_SHARE`] of the time that passes, holds
/// at most [`BUDGET_BURST`], and may go below zero by one refresh (its cost is known only
/// afterwards); below zero, the next refresh waits until it is back.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Seconds of CPU available (negative: owed).
    left: f64,
    at: Instant,
}

impl Budget {
    pub fn new(now: Instant) -> Budget {
        Budget {
            left: BUDGET_BURST.as_secs_f64(),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let passed = now.saturating_duration_since(self.at).as_secs_f64();
        self.left = (self.left + passed * BUDGET_SHARE).min(BUDGET_BURST.as_secs_f64());
        self.at = now;
    }

    /// When the next refresh may start: `now` when the budget is not owed, else when it
    /// is back, but at most [`PACE_MAX`] from now. A refresh started early forgives the
    /// rest of the debt (so a long storm does not pile up a debt it could never repay).
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.left >= 0.0 {
            return now;
        }
        let wait = Duration::from_secs_f64(-self.left / BUDGET_SHARE);
        if wait > PACE_MAX {
            self.left = -PACE_MAX.as_secs_f64() * BUDGET_SHARE;
        }
        now + wait.min(PACE_MAX)
    }

    /// A refresh cost `cpu`.
    pub fn spend(&mut self, now: Instant, cpu: Duration) {
        self.refill(now);
        self.left -= cpu.as_secs_f64();
    }
}

/// What [`start`] set up: the mode in force and, with the doorbell, its events.
pub(crate) struct Started {
    pub watch: Watch,
    bell: Option<mpsc::Receiver<Vec<Event>>>,
}

/// Runs forever (the caller selects it against shutdown). The first whole scan's state
/// is already in the outbox; `started` is what [`start`] opened.
pub(crate) async fn run(
    cfg: RunConfig,
    sys: Arc<dyn System + Send + Sync>,
    scanner: Arc<Mutex<Scanner>>,
    shared: Arc<Shared>,
    started: Started,
) {
    let Started {
        watch: mut mode,
        mut bell,
    } = started;
    let mut reconcile = tokio::time::interval_at(Instant::now() + cfg.interval, cfg.interval);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_poll = Instant::now() + POLL_MIN;
    let mut budget = Budget::new(Instant::now());
    let mut pending: Vec<Event> = Vec::new();
    let mut pace = PollPace::default();
    loop {
        let polling = matches!(mode.mode, WatchMode::Polling(_));
        tokio::select! {
            _ = reconcile.tick() => {
                let r = refresh(&sys, &scanner, Dirty::whole()).await;
                if let Some((inv, _)) = r {
                    record(&shared, inv, true).await;
                }
            }
            got = recv(&mut bell) => {
                let Some(batch) = got else {
                    bell = None;
                    mode = Watch::because(
                        WatchMode::Polling(POLL_MIN),
                        "the doorbell stopped (see the agent's log)",
                    );
                    tracing::error!(reason = mode.reason.as_deref(), "The doorbell stopped; polling instead (changes arrive later).");
                    shared.set_watch(mode.clone());
                    next_poll = Instant::now();
                    continue;
                };
                take(&mut pending, batch);
                // Gather what follows for a moment (a restart closes and opens many).
                let until = (Instant::now() + COALESCE).max(budget.ready_at(Instant::now()));
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => break,
                        more = recv(&mut bell) => match more {
                            Some(b) => take(&mut pending, b),
                            None => break,
                        },
                    }
                }
                let events = std::mem::take(&mut pending);
                let dirty = {
                    let s = scanner.lock().unwrap_or_else(|p| p.into_inner());
                    crate::live::plan(&events, &s.watched(), s.all_namespaces(), |proto, port| {
                        s.holders(proto, port)
                    })
                };
                tracing::debug!(events = events.len(), dirty = ?dirty, "Events planned.");
                if dirty.is_empty() {
                    continue;
                }
                let cpu = crate::os::process_cpu_time();
                if let Some((inv, _)) = refresh(&sys, &scanner, dirty).await {
                    record(&shared, inv, false).await;
                }
                budget.spend(Instant::now(), crate::os::process_cpu_time().saturating_sub(cpu));
            }
            () = tokio::time::sleep_until(next_poll), if polling => {
                let found = {
                    let sys = Arc::clone(&sys);
                    let scanner = Arc::clone(&scanner);
                    tokio::task::spawn_blocking(move || {
                        let mut s = scanner.lock().unwrap_or_else(|p| p.into_inner());
                        (s.poll(&*sys), s.probe_cpu)
                    })
                    .await
                };
                let probe_cpu = match found {
                    Ok((Ok(Some((inv, _))), cpu)) => {
                        record(&shared, inv, false).await;
                        cpu
                    }
                    Ok((Ok(None), cpu)) => cpu,
                    Ok((Err(e), cpu)) => {
                        tracing::error!(error = %e, "Polling failed; retrying.");
                        cpu
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "The polling thread failed; retrying.");
                        POLL_MAX.mul_f64(POLL_FLOOR)
                    }
                };
                let every = pace.after_round(Instant::now(), crate::os::process_cpu_time(), probe_cpu);
                if let WatchMode::Polling(reported) = mode.mode
                    && worth_reporting(reported, every)
                {
                    mode.mode = WatchMode::Polling(every);
                    shared.set_watch(mode.clone());
                }
                next_poll = Instant::now() + every;
            }
        }
    }
}

/// Adds a batch to what is pending, bounded: past [`PENDING_MAX`] the events are replaced
/// by one `Lost` (a whole scan sees everything they would have).
fn take(pending: &mut Vec<Event>, batch: Vec<Event>) {
    if pending.len() + batch.len() > PENDING_MAX {
        pending.clear();
        pending.push(Event::Lost);
    } else if pending.as_slice() != [Event::Lost] {
        pending.extend(batch);
    }
}

async fn recv(bell: &mut Option<mpsc::Receiver<Vec<Event>>>) -> Option<Vec<Event>> {
    match bell {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Opens what `cfg.watch` asks for: the doorbell (and its events), else polling, or
/// nothing between whole scans. Logged once; the mode goes in the first Hello.
pub(crate) async fn start(cfg: &RunConfig, sys: &Arc<dyn System + Send + Sync>) -> Started {
    let watch = match cfg.watch {
        WatchSetting::Interval => Watch::new(WatchMode::Interval(cfg.interval)),
        WatchSetting::Polling => Watch::because(WatchMode::Polling(POLL_MIN), "watch = polling"),
        WatchSetting::Auto | WatchSetting::Doorbell => {
            let (tx, rx) = mpsc::channel(CHANNEL);
            match super::bell::spawn(Arc::clone(sys), cfg.bind_events, tx).await {
                Ok(()) => {
                    tracing::info!(mode = "doorbell", "Watching for changes.");
                    return Started {
                        watch: Watch::new(WatchMode::Doorbell),
                        bell: Some(rx),
                    };
                }
                Err(why) => {
                    if cfg.watch == WatchSetting::Doorbell {
                        tracing::error!(reason = %why, "The doorbell cannot be used; polling instead (changes arrive later, at some CPU cost).");
                    } else {
                        tracing::warn!(reason = %why, "The doorbell cannot be used; polling instead.");
                    }
                    Watch::because(WatchMode::Polling(POLL_MIN), why)
                }
            }
        }
    };
    tracing::info!(mode = %watch.mode, reason = watch.reason.as_deref(), "Watching for changes.");
    Started { watch, bell: None }
}

/// A refresh (or a whole scan) on a blocking thread. `None` when it failed (logged).
async fn refresh(
    sys: &Arc<dyn System + Send + Sync>,
    scanner: &Arc<Mutex<Scanner>>,
    dirty: Dirty,
) -> Option<(Inventory, crate::live::Refreshed)> {
    let sys = Arc::clone(sys);
    let scanner = Arc::clone(scanner);
    let r = tokio::task::spawn_blocking(move || {
        scanner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refresh(&*sys, &dirty)
    })
    .await;
    match r {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "Scan failed; retrying at the next change or interval.");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "The scan thread failed; retrying.");
            None
        }
    }
}

/// The inventory into the outbox (journaled, off the async threads), and the sender woken.
/// A whole scan that found nothing new is a heartbeat; a refresh that found nothing new is
/// nothing (a bind of a client socket rings the doorbell too).
pub(crate) async fn record(shared: &Arc<Shared>, inv: Inventory, whole: bool) {
    let at: OffsetDateTime = inv.scanned_at;
    let state = state_of(&inv);
    drop(inv);
    let recorded = {
        let shared = Arc::clone(shared);
        tokio::task::spawn_blocking(move || shared.outbox().record_scan(state, at)).await
    };
    let Ok(recorded) = recorded else {
        tracing::error!("Recording a scan failed; retrying at the next one.");
        return;
    };
    match recorded {
        Recorded::Unchanged if whole => {
            *shared.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
        }
        Recorded::Unchanged => return,
        Recorded::Changed(n) => tracing::debug!(changes = n, "Changes queued."),
        Recorded::Collapsed => tracing::warn!(
            "Pending changes exceeded max_pending_changes: they are replaced by one snapshot, \
             so the history loses their exact times."
        ),
    }
    shared.wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_intervals() {
        let ms = Duration::from_millis;
        for (round, other, want) in [
            (ms(0), 0.0, 1),
            (ms(5), 0.0, 1),
            (ms(8), 0.0, 1),
            (ms(9), 0.0, 2),
            (ms(24), 0.0, 3),
            (ms(40), 0.0, 5),
            (ms(80), 0.0, 10),
            (ms(900), 0.0, 10),
            // The rest of the agent takes half of the target: rounds get the other half.
            (ms(8), 0.004, 2),
            (ms(20), 0.004, 5),
            // It takes all of it (or more): rounds still get a quarter.
            (ms(4), 0.008, 2),
            (ms(4), 0.05, 2),
            (ms(30), 0.05, 10),
            // Noise below zero changes nothing.
            (ms(8), -0.01, 1),
        ] {
            assert_eq!(
                poll_interval(round, other),
                Duration::from_secs(want),
                "{round:?} with {other}"
            );
        }
    }

    #[test]
    fn the_poll_pace_leaves_room_for_the_rest() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut pace = PollPace::default();
        // Rounds of 10 ms, and a whole scan of 120 ms every 60 s (0.2 % of a core).
        let (mut now, mut cpu) = (t0, Duration::ZERO);
        let mut every = pace.after_round(now, cpu, ms(10));
        assert_eq!(every, s(2), "nothing else known yet: 10 ms / 0.8 %");
        while now < t0 + s(600) {
            let before = now;
            now += every;
            cpu += ms(10);
            if (now - t0).as_secs() / 60 != (before - t0).as_secs() / 60 {
                cpu += ms(120);
            }
            every = pace.after_round(now, cpu, ms(10));
        }
        let other = pace.other();
        assert!((0.0015..0.0025).contains(&other), "{other}");
        // 10 ms in what 0.8 % - 0.2 % leaves: 1.7 s, rounded up.
        assert_eq!(every, s(2));
        // A busier agent (a storm of refreshes: 1 % of a core) pushes polling to its floor.
        for _ in 0..300 {
            now += s(1);
            cpu += ms(10) + ms(10);
            every = pace.after_round(now, cpu, ms(10));
        }
        assert!(pace.other() > POLL_TARGET, "{}", pace.other());
        assert_eq!(every, s(5), "10 ms at the floor (0.2 %)");
        // The window is bounded.
        assert!(pace.samples.len() <= (POLL_WINDOW.as_secs() / POLL_MIN.as_secs()) as usize + 1);
    }

    #[test]
    fn reported_intervals() {
        let s = Duration::from_secs;
        assert!(!worth_reporting(s(3), s(3)));
        assert!(!worth_reporting(s(3), s(4)));
        assert!(worth_reporting(s(3), s(5)));
        assert!(worth_reporting(s(1), s(2)), "half of it");
        assert!(worth_reporting(s(2), s(1)));
        assert!(!worth_reporting(s(10), s(9)));
    }

    #[test]
    fn the_budget_allows_bursts_and_caps_the_wait() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        // Sporadic refreshes go at once.
        assert_eq!(b.ready_at(t0), t0);
        b.spend(t0, ms(50));
        assert_eq!(b.ready_at(t0 + ms(10)), t0 + ms(10));
        // A storm: 40 refreshes of 50 ms at once empty the burst (1 s) and owe 1 s, which
        // would take 100 s to repay: the wait is capped at PACE_MAX.
        for _ in 0..39 {
            b.spend(t0 + ms(10), ms(50));
        }
        assert_eq!(b.ready_at(t0 + ms(10)), t0 + ms(10) + PACE_MAX);
        // A small debt: waited out exactly (5 ms owed at 1 %: 500 ms).
        let mut b = Budget::new(t0);
        b.spend(t0, BUDGET_BURST + ms(5));
        let wait = b.ready_at(t0) - t0;
        assert!(wait > ms(499) && wait < ms(501), "{wait:?}");
        // A long storm of 20 ms refreshes, as fast as allowed: once the burst is spent, at
        // most one refresh a second.
        let mut b = Budget::new(t0);
        let mut now = t0;
        let mut refreshes = 0;
        while now < t0 + Duration::from_secs(1000) {
            now = b.ready_at(now).max(now + ms(1));
            b.spend(now, ms(20));
            refreshes += 1;
        }
        let burst = (BUDGET_BURST.as_millis() / 20) as usize;
        assert!(
            refreshes <= burst + 1000 + 1,
            "{refreshes} refreshes in 1000 s"
        );
        assert!(refreshes >= 1000, "{refreshes} refreshes in 1000 s");
        // It refills up to the burst only.
        let mut b = Budget::new(t0);
        b.spend(t0, ms(900));
        let hour = t0 + Duration::from_secs(3600);
        assert_eq!(b.ready_at(hour), hour);
        b.spend(hour, ms(1500));
        assert!(b.ready_at(hour) > hour);
    }

    #[test]
    fn pending_is_bounded() {
        let bind = Event::Bind {
            pid: 1,
            netns: None,
        };
        let mut pending = Vec::new();
        take(&mut pending, vec![bind; 10]);
        assert_eq!(pending.len(), 10);
        take(&mut pending, vec![bind; PENDING_MAX]);
        assert_eq!(pending, vec![Event::Lost]);
        // Once lost, more events change nothing: a whole scan is due anyway.
        take(&mut pending, vec![bind; 5]);
        assert_eq!(pending, vec![Event::Lost]);
    }
}
