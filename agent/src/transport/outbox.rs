//! What the agent owes the collector: every message not yet acknowledged, in sequence.
//!
//! Pure bookkeeping, no I/O, so the rules are unit-tested:
//! - The first scan becomes a snapshot; each later scan that changes anything becomes one
//!   or more deltas (at most [`MAX_PER_DELTA`] listeners each), stamped with the scan time.
//! - A message leaves the outbox only when the collector acknowledges it (after its
//!   commit). Until then it is resent on every reconnect, so history keeps the time a
//!   change was observed even if the collector was away.
//! - The outbox is bounded: past `max_entries` listener entries it collapses into a single
//!   snapshot of the current state (the collector then closes and opens what differs at
//!   that snapshot's time). Each collapse is counted in `overflows`.
//! - Whenever continuity is lost (collector does not know the session, a sequence gap,
//!   Resync), the outbox restarts from a snapshot of the current state.
//! - Every message pushed and every acknowledgement is also noted as an [`Effect`], which
//!   the journal (`journal.rs`) drains after each operation and writes to disk, so an
//!   agent restart can [`Outbox::restore`] the same outbox.

use std::collections::VecDeque;
use std::sync::Arc;

use time::OffsetDateTime;

use super::base::Base;
use crate::record::State;
use listenscope_core::diff::Changes;

/// Listeners per delta message; larger change sets are split over consecutive sequences.
/// The collector advertises how many it accepts and never less than this (the .proto).
pub const MAX_PER_DELTA: usize = 1000;
/// Approximate bytes per delta message: small, so the collector's per-connection buffers
/// never grow (`listenscope_core::limits::MESSAGE_TARGET_BYTES`).
pub const MAX_DELTA_BYTES: usize = listenscope_core::limits::MESSAGE_TARGET_BYTES;

/// One message the collector has not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    Snapshot {
        seq: u64,
        at: OffsetDateTime,
        state: Arc<State>,
    },
    Delta {
        seq: u64,
        at: OffsetDateTime,
        changes: Changes,
    },
}

impl Pending {
    pub fn seq(&self) -> u64 {
        match self {
            Pending::Snapshot { seq, .. } | Pending::Delta { seq, .. } => *seq,
        }
    }

    fn entries(&self) -> usize {
        match self {
            Pending::Snapshot { state, .. } => state.len(),
            Pending::Delta { changes, .. } => changes.len(),
        }
    }
}

/// What an operation did, for the journal: a message pushed (its sequence; the message is
/// in the queue), or everything up to a sequence acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Pushed(u64),
    Acked(u64),
}

/// An outbox as the journal restores it: what [`Outbox`] holds, in plain values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub session_id: [u8; 16],
    /// The sequence the next pushed message gets.
    pub next_seq: u64,
    pub acked: u64,
    /// The last scanned state (the base of the next diff) and its time.
    pub current: Arc<State>,
    pub current_at: OffsetDateTime,
    /// Unacknowledged messages, consecutive sequences ending at `next_seq - 1`.
    pub queue: Vec<Pending>,
}

/// What a scan did to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Nothing changed: a heartbeat is due instead.
    Unchanged,
    /// This many listener entries were queued as deltas.
    Changed(usize),
    /// The outbox was full and collapsed into one snapshot.
    Collapsed,
}

#[derive(Debug)]
pub struct Outbox {
    pub session_id: [u8; 16],
    next_seq: u64,
    acked: u64,
    /// The last scanned state, compact (`base.rs`): what the next scan is compared with.
    current: Base,
    current_at: OffsetDateTime,
    queue: VecDeque<Pending>,
    entries: usize,
    max_entries: usize,
    /// Times the outbox overflowed and collapsed into a snapshot.
    pub overflows: u64,
    /// What happened since the journal last drained it ([`Outbox::take_effects`]).
    effects: Vec<Effect>,
}

impl Outbox {
    /// A new session whose first message is a snapshot of `state`, observed at `at`.
    pub fn new(session_id: [u8; 16], state: State, at: OffsetDateTime, max_entries: usize) -> Self {
        let mut o = Outbox {
            session_id,
            next_seq: 1,
            acked: 0,
            current: Base::new(&state),
            current_at: at,
            queue: VecDeque::new(),
            entries: 0,
            max_entries: max_entries.max(1),
            overflows: 0,
            effects: Vec::new(),
        };
        o.push_snapshot(Arc::new(state));
        o
    }

    /// The outbox a journal held. If it holds more than `max_entries` (the bound was
    /// lowered since), it collapses into a snapshot of its current state.
    pub fn restore(image: Image, max_entries: usize) -> Self {
        let entries = image.queue.iter().map(Pending::entries).sum();
        let mut o = Outbox {
            session_id: image.session_id,
            next_seq: image.next_seq,
            acked: image.acked,
            current: Base::new(&image.current),
            current_at: image.current_at,
            queue: image.queue.into(),
            entries,
            max_entries: max_entries.max(1),
            overflows: 0,
            effects: Vec::new(),
        };
        if o.entries > o.max_entries {
            o.collapse();
        }
        o
    }

    /// What happened since the last call (pushes and acknowledgements, in order).
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The next sequence to be assigned.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The last scanned state (compact) and its time.
    pub fn current(&self) -> (&Base, OffsetDateTime) {
        (&self.current, self.current_at)
    }

    /// Whether `p` is a snapshot of the last scanned state: the newest queued message is
    /// a snapshot (every scan that changed anything since would have queued a delta).
    pub fn is_current_snapshot(&self, p: &Pending) -> bool {
        matches!(p, Pending::Snapshot { .. })
            && self.queue.back().map(Pending::seq) == Some(p.seq())
    }

    /// The unacknowledged message with sequence `seq`.
    pub fn get(&self, seq: u64) -> Option<&Pending> {
        let first = self.queue.front()?.seq();
        let i = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.queue.get(i).filter(|p| p.seq() == seq)
    }

    /// Replaces everything unacknowledged by one snapshot of the current state, counted
    /// as an overflow (the queue, or its journal, outgrew its bound).
    pub fn collapse(&mut self) {
        self.overflows += 1;
        self.restart_from_snapshot();
    }

    /// Highest sequence the collector acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Listener entries waiting for acknowledgement.
    pub fn pending_entries(&self) -> usize {
        self.entries
    }

    pub fn pending(&self) -> impl Iterator<Item = &Pending> {
        self.queue.iter()
    }

    /// Messages with a sequence above `after`, in order.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &Pending> {
        self.queue.iter().filter(move |p| p.seq() > after)
    }

    /// What may be sent now: the messages above `sent_upto` among the first `window`
    /// unacknowledged ones. The window counts queued messages, not sequence numbers: after
    /// a restart from a snapshot the next sequence can be far above the last acknowledged
    /// one, and a sequence-based window would never open again.
    pub fn sendable(&self, sent_upto: u64, window: usize) -> impl Iterator<Item = &Pending> {
        self.queue
            .iter()
            .take(window)
            .filter(move |p| p.seq() > sent_upto)
    }

    /// Records a scan.
    pub fn record_scan(&mut self, state: State, at: OffsetDateTime) -> Recorded {
        let changes = self.current.advance(&state);
        self.current_at = at;
        if changes.is_empty() {
            return Recorded::Unchanged;
        }
        let n = changes.len();
        if self.entries + n > self.max_entries {
            // The scan's own state is at hand: no need to decode the kept one.
            self.overflows += 1;
            self.queue.clear();
            self.entries = 0;
            self.push_snapshot(Arc::new(state));
            return Recorded::Collapsed;
        }
        for part in split(changes, MAX_PER_DELTA, MAX_DELTA_BYTES) {
            self.push(Pending::Delta {
                seq: 0,
                at,
                changes: part,
            });
        }
        Recorded::Changed(n)
    }

    /// The collector's answer to Hello: resume after a sequence it holds, or (None) start
    /// over from a snapshot. Returns true when the outbox restarted from a snapshot.
    pub fn on_welcome(&mut self, resume_after: Option<u64>) -> bool {
        let Some(r) = resume_after else {
            // Already starting with an unsent snapshot of the current state: keep it.
            let fresh = self.queue.len() == 1
                && self
                    .queue
                    .front()
                    .is_some_and(|p| self.is_current_snapshot(p));
            if !fresh {
                self.restart_from_snapshot();
            }
            return true;
        };
        let last_assigned = self.next_seq - 1;
        if r > last_assigned || r < self.acked {
            // The collector claims what we never sent, or forgot what it acknowledged.
            self.restart_from_snapshot();
            return true;
        }
        self.on_ack(r);
        match self.queue.front() {
            Some(p) if p.seq() != r + 1 => {
                self.restart_from_snapshot();
                true
            }
            _ => false,
        }
    }

    /// Everything up to `seq` is committed.
    pub fn on_ack(&mut self, seq: u64) {
        while let Some(p) = self.queue.front() {
            if p.seq() > seq {
                break;
            }
            self.entries -= p.entries();
            self.queue.pop_front();
        }
        if seq > self.acked {
            self.effects.push(Effect::Acked(seq));
        }
        self.acked = self.acked.max(seq);
    }

    /// Drop everything unacknowledged and start over from a snapshot of the current state.
    pub fn restart_from_snapshot(&mut self) {
        // A queued snapshot of the current state is reused rather than decoded again.
        let state = match self.queue.back() {
            Some(Pending::Snapshot { state, .. }) => Arc::clone(state),
            _ => Arc::new(self.current.to_state()),
        };
        self.queue.clear();
        self.entries = 0;
        self.push_snapshot(state);
    }

    /// Queues a snapshot of `state`, which must be the current state.
    fn push_snapshot(&mut self, state: Arc<State>) {
        let snapshot = Pending::Snapshot {
            seq: 0,
            at: self.current_at,
            state,
        };
        self.push(snapshot);
    }

    fn push(&mut self, mut p: Pending) {
        let seq = self.next_seq;
        self.next_seq += 1;
        match &mut p {
            Pending::Snapshot { seq: s, .. } | Pending::Delta { seq: s, .. } => *s = seq,
        }
        self.entries += p.entries();
        self.queue.push_back(p);
        self.effects.push(Effect::Pushed(seq));
    }
}

/// Splits a change set into parts of at most `max` entries and about `max_bytes` each
/// (closed first, then opened, then changed), preserving meaning when applied in order.
fn split(changes: Changes, max: usize, max_bytes: usize) -> Vec<Changes> {
    let mut parts = Vec::new();
    let mut cur = Changes::default();
    let mut bytes = 0;
    // Starts a new part when adding `size` would break a limit (never leaves one empty).
    let mut room = |cur: &mut Changes, parts: &mut Vec<Changes>, size: usize| {
        if !cur.is_empty() && (cur.len() >= max || bytes + size > max_bytes) {
            parts.push(std::mem::take(cur));
            bytes = 0;
        }
        bytes += size;
    };
    for k in changes.closed {
        room(&mut cur, &mut parts, 64 + k.netns.len());
        cur.closed.push(k);
    }
    for r in changes.opened {
        room(&mut cur, &mut parts, r.approx_bytes());
        cur.opened.push(r);
    }
    for r in changes.changed {
        room(&mut cur, &mut parts, r.approx_bytes());
        cur.changed.push(r);
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ListenerRecord, State};
    use listenscope_core::diff::diff;
    use listenscope_core::record::testkit::record;

    fn state(ports: &[u16]) -> State {
        ports
            .iter()
            .map(|&p| {
                let r: ListenerRecord = record("host", "::", p, Some(false));
                (r.key.clone(), r)
            })
            .collect()
    }

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    fn seqs(o: &Outbox) -> Vec<(u64, &'static str)> {
        o.pending()
            .map(|p| match p {
                Pending::Snapshot { seq, .. } => (*seq, "snapshot"),
                Pending::Delta { seq, .. } => (*seq, "delta"),
            })
            .collect()
    }

    #[test]
    fn snapshot_then_deltas_then_acks() {
        let mut o = Outbox::new([1; 16], state(&[80]), t(0), 100);
        assert_eq!(seqs(&o), [(1, "snapshot")]);
        assert_eq!(o.record_scan(state(&[80]), t(10)), Recorded::Unchanged);
        assert_eq!(
            o.record_scan(state(&[80, 443]), t(20)),
            Recorded::Changed(1)
        );
        assert_eq!(o.record_scan(state(&[443]), t(30)), Recorded::Changed(1));
        assert_eq!(seqs(&o), [(1, "snapshot"), (2, "delta"), (3, "delta")]);
        o.on_ack(2);
        assert_eq!(seqs(&o), [(3, "delta")]);
        assert_eq!(o.acked(), 2);
        // Delta 3 keeps its observation time until acknowledged.
        match o.pending().next().unwrap() {
            Pending::Delta { at, changes, .. } => {
                assert_eq!(*at, t(30));
                assert_eq!(changes.closed.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        o.on_ack(3);
        assert_eq!(o.pending_entries(), 0);
    }

    #[test]
    fn resume_keeps_deltas_and_their_times() {
        let mut o = Outbox::new([1; 16], state(&[80]), t(0), 100);
        o.on_ack(1);
        o.record_scan(state(&[80, 81]), t(10));
        o.record_scan(state(&[80, 81, 82]), t(20));
        // Collector committed 2 but its ack was lost; it says resume after 2.
        assert!(!o.on_welcome(Some(2)));
        assert_eq!(seqs(&o), [(3, "delta")]);
        assert_eq!(o.after(2).count(), 1);
    }

    #[test]
    fn unknown_session_or_gap_restarts_from_snapshot() {
        let mut o = Outbox::new([1; 16], state(&[80]), t(0), 100);
        // A brand-new session keeps its first snapshot.
        assert!(o.on_welcome(None));
        assert_eq!(seqs(&o), [(1, "snapshot")]);
        o.on_ack(1);
        o.record_scan(state(&[80, 81]), t(10));
        assert!(o.on_welcome(None));
        assert_eq!(seqs(&o), [(3, "snapshot")]);
        match o.pending().next().unwrap() {
            Pending::Snapshot { state, at, .. } => {
                assert_eq!(state.len(), 2);
                assert_eq!(*at, t(10));
            }
            other => panic!("{other:?}"),
        }
        // The collector claims a sequence we never sent.
        assert!(o.on_welcome(Some(99)));
        assert_eq!(seqs(&o), [(4, "snapshot")]);
        // The collector forgot what it acknowledged (restored database).
        o.on_ack(4);
        assert!(o.on_welcome(Some(1)));
        assert_eq!(seqs(&o), [(5, "snapshot")]);
    }

    /// Regression: 40 unacknowledged deltas, then the collector asks for a snapshot. The
    /// snapshot (sequence 42, far above acked + window) must still be sendable.
    #[test]
    fn window_opens_after_restart_from_snapshot() {
        let mut o = Outbox::new([1; 16], state(&[1]), t(0), 1_000_000);
        for i in 2..=41u16 {
            let ports: Vec<u16> = (1..=i).collect();
            o.record_scan(state(&ports), t(i64::from(i)));
        }
        assert_eq!(o.sendable(0, 32).count(), 32);
        assert!(o.on_welcome(None));
        let now: Vec<u64> = o.sendable(0, 32).map(Pending::seq).collect();
        assert_eq!(now, [42]);
        // Sent, not yet acknowledged: nothing more until the ack.
        assert_eq!(o.sendable(42, 32).count(), 0);
        o.record_scan(state(&[1, 2, 3]), t(100));
        assert_eq!(
            o.sendable(42, 32).map(Pending::seq).collect::<Vec<_>>(),
            [43]
        );
        assert_eq!(
            o.sendable(42, 1).count(),
            0,
            "the window counts queued messages"
        );
    }

    #[test]
    fn full_outbox_collapses_into_one_snapshot() {
        let mut o = Outbox::new([1; 16], state(&[1]), t(0), 5);
        o.on_ack(1);
        assert_eq!(o.record_scan(state(&[1, 2, 3]), t(1)), Recorded::Changed(2));
        assert_eq!(
            o.record_scan(state(&[1, 2, 3, 4, 5]), t(2)),
            Recorded::Changed(2)
        );
        assert_eq!(
            o.record_scan(state(&[1, 2, 3, 4, 5, 6, 7]), t(3)),
            Recorded::Collapsed
        );
        assert_eq!(seqs(&o), [(4, "snapshot")]);
        assert_eq!(o.overflows, 1);
        assert_eq!(o.pending_entries(), 7);
    }

    #[test]
    fn big_records_split_by_bytes() {
        let mut big = state(&[1, 2, 3, 4]);
        for r in big.values_mut() {
            r.processes[0].cmdline = "x".repeat(60_000);
        }
        let parts = split(diff(&State::new(), &big), 1000, 100_000);
        assert_eq!(
            parts.iter().map(Changes::len).collect::<Vec<_>>(),
            [1, 1, 1, 1]
        );
        let parts = split(diff(&State::new(), &big), 1000, 10 * 1024 * 1024);
        assert_eq!(parts.len(), 1);
    }

    #[test]
    fn big_change_sets_are_split() {
        let ports: Vec<u16> = (1..=2500).collect();
        let mut o = Outbox::new([1; 16], State::new(), t(0), 10_000);
        o.on_ack(1);
        assert_eq!(o.record_scan(state(&ports), t(1)), Recorded::Changed(2500));
        let sizes: Vec<usize> = o
            .pending()
            .map(|p| match p {
                Pending::Delta { changes, .. } => changes.len(),
                Pending::Snapshot { .. } => 0,
            })
            .collect();
        // Split by bytes (each delta under the message target) and in order.
        assert_eq!(sizes.iter().sum::<usize>(), 2500);
        assert!(
            sizes.len() > 3 && sizes.iter().all(|n| *n <= 1000),
            "{sizes:?}"
        );
        let want: Vec<u64> = (2..2 + sizes.len() as u64).collect();
        assert_eq!(seqs(&o).iter().map(|s| s.0).collect::<Vec<_>>(), want);
        // By count alone when records are small enough.
        let parts = split(diff(&State::new(), &state(&ports)), 1000, usize::MAX);
        assert_eq!(
            parts.iter().map(Changes::len).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
    }
}
