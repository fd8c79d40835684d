//! What a worker process measures, in a form the parent merges (JSON on the child's
//! stdout).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Latency samples in microseconds, at most [`Samples::CAP`] kept (reservoir sampling
/// past that, so percentiles stay unbiased).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Samples {
    pub seen: u64,
    pub us: Vec<u32>,
    #[serde(skip)]
    state: u64,
}

impl Samples {
    pub const CAP: usize = 1_000_000;

    pub fn push(&mut self, d: std::time::Duration) {
        let v = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.seen += 1;
        if self.us.len() < Self::CAP {
            self.us.push(v);
            return;
        }
        // xorshift64*: only for choosing which sample to replace.
        self.state ^= self.seen.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let j = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.seen;
        if (j as usize) < Self::CAP {
            self.us[j as usize] = v;
        }
    }

    pub fn merge(&mut self, other: Samples) {
        self.seen += other.seen;
        let room = Self::CAP.saturating_sub(self.us.len());
        self.us.extend(other.us.into_iter().take(room));
    }
}

/// Percentiles of a set of samples, in milliseconds.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub n: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Summary {
    pub fn of(s: &Samples) -> Summary {
        let mut v = s.us.clone();
        v.sort_unstable();
        let at = |q: f64| -> Option<f64> {
            if v.is_empty() {
                return None;
            }
            // Nearest rank.
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            Some(f64::from(v[rank - 1]) / 1000.0)
        };
        Summary {
            n: s.seen,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: v.last().map(|m| f64::from(*m) / 1000.0),
        }
    }
}

/// How many times something went wrong one way, and the first message of that kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Count {
    pub count: u64,
    pub first: String,
}

pub fn note(map: &mut BTreeMap<String, Count>, key: String, msg: String) {
    map.entry(key)
        .and_modify(|c| c.count += 1)
        .or_insert(Count {
            count: 1,
            first: msg,
        });
}

pub fn merge_counts(into: &mut BTreeMap<String, Count>, from: BTreeMap<String, Count>) {
    for (k, c) in from {
        into.entry(k)
            .and_modify(|m| m.count += c.count)
            .or_insert(c);
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) | (None, x) => x,
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) | (None, x) => x,
    }
}

fn add_each(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Milliseconds since the epoch: comparable across the worker processes of one machine.
pub fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Everything one worker process measured.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Agents assigned to the worker.
    pub agents: u64,
    /// Agents that started connecting (the rest were cut by the deadline).
    pub attempted: u64,
    /// Sessions that got their Welcome.
    pub welcomed: u64,
    pub first_acked: u64,
    pub first_failed: u64,
    /// Listener rows of the first snapshots that were acknowledged.
    pub first_rows: u64,
    /// Epoch ms of the first first-snapshot sent, of the last first-snapshot Ack, of the
    /// last Welcome.
    pub first_sent_min_ms: Option<f64>,
    pub first_ack_max_ms: Option<f64>,
    pub welcome_max_ms: Option<f64>,
    /// Burst mode: epoch ms at which this worker released the first snapshots.
    pub burst_go_ms: Option<f64>,
    /// Burst mode: the go → the first snapshot's Ack, per agent.
    pub burst_lat: Samples,
    /// Burst mode: agents that took part in the burst (had their Welcome at the go).
    pub burst_agents: u64,
    /// Burst mode: what answered a held-back first snapshot other than an Ack (a Resync,
    /// or the stream's end with its gRPC code), by "stage: code".
    pub burst_problems: BTreeMap<String, Count>,
    /// Connection start (TCP connect) → Welcome.
    pub welcome_lat: Samples,
    /// First snapshot: first chunk handed to the stream → its Ack.
    pub snapshot_lat: Samples,
    /// Delta sent → its Ack, for Acks received during the hold (steady state).
    pub delta_lat: Samples,
    /// The same for deltas whose Ack came after the hold ended (while the fleet
    /// disconnects).
    pub delta_lat_at_stop: Samples,
    pub deltas_sent: u64,
    pub deltas_acked: u64,
    pub heartbeats: u64,
    pub resyncs: u64,
    /// Sessions that ended or never started, by "stage: gRPC code or error kind".
    pub failures: BTreeMap<String, Count>,
    /// End of the hold: streams that closed with OK after our half-close, and the others.
    pub disconnects_clean: u64,
    pub disconnects_unclean: BTreeMap<String, Count>,
    /// Live sessions when the connect phase ended (the parent's barrier) and when the
    /// hold ended.
    /// Per collector URL (in `--collector` order).
    pub held_connect_end: Vec<u64>,
    pub held_hold_end: Vec<u64>,
    /// Burst mode: live sessions per collector when every agent was welcomed (before the
    /// first snapshots).
    pub held_welcomed: Vec<u64>,
    pub deadline_hit: bool,
}

impl Stats {
    pub fn merge(&mut self, o: Stats) {
        self.agents += o.agents;
        self.attempted += o.attempted;
        self.welcomed += o.welcomed;
        self.first_acked += o.first_acked;
        self.first_failed += o.first_failed;
        self.first_rows += o.first_rows;
        self.first_sent_min_ms = min_opt(self.first_sent_min_ms, o.first_sent_min_ms);
        self.first_ack_max_ms = max_opt(self.first_ack_max_ms, o.first_ack_max_ms);
        self.welcome_max_ms = max_opt(self.welcome_max_ms, o.welcome_max_ms);
        self.burst_go_ms = min_opt(self.burst_go_ms, o.burst_go_ms);
        self.burst_lat.merge(o.burst_lat);
        self.burst_agents += o.burst_agents;
        merge_counts(&mut self.burst_problems, o.burst_problems);
        self.welcome_lat.merge(o.welcome_lat);
        self.snapshot_lat.merge(o.snapshot_lat);
        self.delta_lat.merge(o.delta_lat);
        self.delta_lat_at_stop.merge(o.delta_lat_at_stop);
        self.deltas_sent += o.deltas_sent;
        self.deltas_acked += o.deltas_acked;
        self.heartbeats += o.heartbeats;
        self.resyncs += o.resyncs;
        merge_counts(&mut self.failures, o.failures);
        self.disconnects_clean += o.disconnects_clean;
        merge_counts(&mut self.disconnects_unclean, o.disconnects_unclean);
        add_each(&mut self.held_connect_end, &o.held_connect_end);
        add_each(&mut self.held_hold_end, &o.held_hold_end);
        add_each(&mut self.held_welcomed, &o.held_welcomed);
        self.deadline_hit |= o.deadline_hit;
    }

    pub fn first_sent(&mut self) {
        self.first_sent_min_ms = min_opt(self.first_sent_min_ms, Some(epoch_ms()));
    }
}

/// What a worker prints on stdout, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Report {
    /// Certificates issued; waiting for the parent's go.
    Ready,
    /// Burst mode: every agent has its Welcome or has failed (first snapshots held back).
    Welcomed { live: Vec<u64> },
    /// Every agent has its first snapshot acknowledged or has failed (or the deadline).
    Connected { live: Vec<u64> },
    /// The hold is over.
    Held { live: Vec<u64> },
    /// Everything, at the end.
    Result { stats: Box<Stats> },
}
