//! **Pure.** The records of a perf ring buffer's data area → [`Event`]s.
//!
//! The data area is a power-of-two byte ring; `data_head` and `data_tail` are free-running
//! byte counters (never reduced modulo the size), so a record may start near the end and
//! continue at the start. Every record begins with `struct perf_event_header`
//! (`type: u32, misc: u16, size: u16`, `size` including the header). The doorbell's events
//! are opened with `sample_type = PERF_SAMPLE_TID | PERF_SAMPLE_RAW` and no
//! `sample_id_all`, so:
//!
//! - `PERF_RECORD_SAMPLE` (9): `pid: u32, tid: u32, raw_size: u32, raw[raw_size]`, the raw
//!   bytes being the tracepoint's record laid out as its `format` file says
//!   ([`super::format`]). Its `common_type` field tells which tracepoint wrote it: both
//!   tracepoints of a CPU share one ring.
//! - `PERF_RECORD_LOST` (2): `id: u64, lost: u64`: the ring was full and `lost` samples
//!   were dropped by the kernel.
//! - anything else is skipped by its size.
//!
//! The parser never trusts the bytes: a counter gap larger than the ring, a record shorter
//! than its header or running past `head`, a sample whose parts do not fit: each ends or
//! skips the damaged part and is counted, and the caller always moves the tail to `head`,
//! so nothing can make it panic or loop.

use super::format::{BindLayout, SetStateLayout};
use super::{Drained, Event};
use crate::model::Family;

pub const PERF_RECORD_LOST: u32 = 2;
pub const PERF_RECORD_SAMPLE: u32 = 9;
const HEADER: usize = 8;

/// `TCP_LISTEN` and `TCP_CLOSE` (`include/net/tcp_states.h`, also the values the
/// tracepoint's own `print fmt` names): kernel ABI, shared with `/proc/net/tcp`.
pub const TCP_LISTEN: u64 = 10;
pub const TCP_CLOSE: u64 = 7;
const IPPROTO_TCP: u64 = 6;
const IPPROTO_MPTCP: u64 = 262;
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;

/// How raw tracepoint records become events.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    pub set_state: SetStateLayout,
    /// `None` when bind events are not watched.
    pub bind: Option<BindLayout>,
    /// Bind events of this process are dropped (the agent's own netlink sockets are bound
    /// on every scan: without this, each scan would ring the doorbell for the next).
    pub skip_binds_of: Option<u32>,
}

/// A sample that is not what the doorbell opened (damaged, or of another tracepoint).
#[derive(Debug, PartialEq, Eq)]
struct Malformed;

impl Decoder {
    /// One sample's raw tracepoint record → an event, `None` when it is not one the
    /// doorbell reports (see [`Event`]).
    fn decode(&self, pid: u32, tid: u32, raw: &[u8]) -> Result<Option<Event>, Malformed> {
        let s = &self.set_state;
        let kind = s.common_type.read(raw).ok_or(Malformed)?;
        if kind == u64::from(s.id) {
            let field = |slot: super::format::Slot| slot.read(raw).ok_or(Malformed);
            let (old, new) = (field(s.oldstate)?, field(s.newstate)?);
            let (port, family, protocol) = (field(s.sport)?, field(s.family)?, field(s.protocol)?);
            let family = match family {
                AF_INET => Family::Ipv4,
                AF_INET6 => Family::Ipv6,
                _ => return Ok(None),
            };
            // SCTP (132) also moves sockets to TCP_LISTEN through this tracepoint; the
            // agent does not inventory SCTP, so those are not reported.
            if protocol != IPPROTO_TCP && protocol != IPPROTO_MPTCP {
                return Ok(None);
            }
            let port = u16::try_from(port).map_err(|_| Malformed)?;
            return Ok(if new == TCP_LISTEN {
                Some(Event::Listen {
                    pid,
                    tid,
                    family,
                    port,
                })
            } else if old == TCP_LISTEN && new == TCP_CLOSE {
                Some(Event::ListenClose {
                    pid,
                    tid,
                    family,
                    port,
                })
            } else {
                None // the kernel filter lets none of these through
            });
        }
        match &self.bind {
            Some(b) if b.common_type.read(raw).ok_or(Malformed)? == u64::from(b.id) => {
                Ok((self.skip_binds_of != Some(pid)).then_some(Event::Bind { pid, tid }))
            }
            _ => Err(Malformed),
        }
    }
}

/// Copies `buf.len()` bytes of the ring starting at counter `at`, wrapping at the end.
/// `ring` must not be empty.
fn copy_out(ring: &[u8], at: u64, buf: &mut [u8]) {
    let len = ring.len();
    let start = (at % len as u64) as usize;
    let first = buf.len().min(len - start);
    buf[..first].copy_from_slice(&ring[start..start + first]);
    let rest = buf.len() - first;
    buf[first..].copy_from_slice(&ring[..rest]);
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes every record between the counters `tail` and `head` of `ring` (the data area,
/// bytes at the same positions as in the kernel's ring), appending events to `out` and
/// counting lost and malformed records in `counts`. The caller then sets `data_tail` to
/// `head`, whatever was found: damage is counted, never retried.
pub fn parse_ring(
    ring: &[u8],
    tail: u64,
    head: u64,
    decoder: &Decoder,
    out: &mut Vec<Event>,
    counts: &mut Drained,
) {
    let avail = head.wrapping_sub(tail);
    if avail == 0 {
        return;
    }
    if ring.is_empty() || avail > ring.len() as u64 {
        counts.malformed += 1; // counters that cannot be: nothing between them is trusted
        return;
    }
    // Records are at most u16::MAX bytes; one that wraps is copied here.
    let mut wrapped = Vec::new();
    let mut pos = tail;
    while pos != head {
        let left = head.wrapping_sub(pos);
        let mut header = [0u8; HEADER];
        if left < HEADER as u64 {
            counts.malformed += 1;
            return;
        }
        copy_out(ring, pos, &mut header);
        let kind = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
        let size = usize::from(u16::from_ne_bytes([header[6], header[7]]));
        if size < HEADER || size as u64 > left {
            counts.malformed += 1; // its end is unknown, so is every later start
            return;
        }
        let start = (pos % ring.len() as u64) as usize;
        let record: &[u8] = if start + size <= ring.len() {
            &ring[start..start + size]
        } else {
            wrapped.resize(size, 0);
            copy_out(ring, pos, &mut wrapped);
            &wrapped
        };
        let body = &record[HEADER..];
        match kind {
            PERF_RECORD_SAMPLE => match sample(body, decoder) {
                Ok(Some(e)) => out.push(e),
                Ok(None) => counts.ignored += 1,
                Err(Malformed) => counts.malformed += 1,
            },
            PERF_RECORD_LOST => match u64_at(body, 8) {
                Some(n) => counts.lost = counts.lost.saturating_add(n),
                None => counts.malformed += 1,
            },
            _ => {} // other record types (none are asked for) are skipped
        }
        pos = pos.wrapping_add(size as u64);
    }
}

/// `pid, tid, raw_size, raw` → an event.
fn sample(body: &[u8], decoder: &Decoder) -> Result<Option<Event>, Malformed> {
    let pid = u32_at(body, 0).ok_or(Malformed)?;
    let tid = u32_at(body, 4).ok_or(Malformed)?;
    let raw_size = u32_at(body, 8).ok_or(Malformed)? as usize;
    let raw = body.get(12..12 + raw_size).ok_or(Malformed)?;
    decoder.decode(pid, tid, raw)
}

#[cfg(test)]
mod tests {
    use super::super::format::Slot;
    use super::*;

    const SET_STATE_ID: u16 = 2287;
    const BIND_ID: u16 = 2237;

    fn decoder() -> Decoder {
        let s = |offset, size| Slot { offset, size };
        Decoder {
            set_state: SetStateLayout {
                id: SET_STATE_ID,
                common_type: s(0, 2),
                oldstate: s(16, 4),
                newstate: s(20, 4),
                sport: s(24, 2),
                family: s(28, 2),
                protocol: s(30, 2),
            },
            bind: Some(BindLayout {
                id: BIND_ID,
                common_type: s(0, 2),
            }),
            skip_binds_of: Some(99),
        }
    }

    /// A `perf_event_header` + body, padded to 8 bytes like the kernel's records.
    fn record(kind: u32, body: &[u8]) -> Vec<u8> {
        let size = (HEADER + body.len()).next_multiple_of(8);
        let mut r = Vec::with_capacity(size);
        r.extend_from_slice(&kind.to_ne_bytes());
        r.extend_from_slice(&0u16.to_ne_bytes());
        r.extend_from_slice(&(size as u16).to_ne_bytes());
        r.extend_from_slice(body);
        r.resize(size, 0);
        r
    }

    fn sample_of(pid: u32, tid: u32, raw: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&pid.to_ne_bytes());
        body.extend_from_slice(&tid.to_ne_bytes());
        body.extend_from_slice(&(raw.len() as u32).to_ne_bytes());
        body.extend_from_slice(raw);
        record(PERF_RECORD_SAMPLE, &body)
    }

    /// The 72-byte raw record of inet_sock_set_state as Linux 6.18 lays it out.
    fn set_state_raw(old: i32, new: i32, sport: u16, family: u16, protocol: u16) -> Vec<u8> {
        let mut raw = vec![0u8; 72];
        raw[0..2].copy_from_slice(&SET_STATE_ID.to_ne_bytes());
        raw[4..8].copy_from_slice(&1234i32.to_ne_bytes()); // common_pid
        raw[16..20].copy_from_slice(&old.to_ne_bytes());
        raw[20..24].copy_from_slice(&new.to_ne_bytes());
        raw[24..26].copy_from_slice(&sport.to_ne_bytes());
        raw[26..28].copy_from_slice(&40000u16.to_ne_bytes());
        raw[28..30].copy_from_slice(&family.to_ne_bytes());
        raw[30..32].copy_from_slice(&protocol.to_ne_bytes());
        raw
    }

    fn bind_raw() -> Vec<u8> {
        let mut raw = vec![0u8; 24];
        raw[0..2].copy_from_slice(&BIND_ID.to_ne_bytes());
        raw[8..12].copy_from_slice(&49i32.to_ne_bytes()); // __syscall_nr
        raw
    }

    fn lost(n: u64) -> Vec<u8> {
        let mut body = 7u64.to_ne_bytes().to_vec(); // id
        body.extend_from_slice(&n.to_ne_bytes());
        record(PERF_RECORD_LOST, &body)
    }

    /// Writes `records` into a ring of `len` bytes from counter `tail` on, like the
    /// kernel, and parses them back.
    fn through_ring(len: usize, tail: u64, records: &[Vec<u8>]) -> (Vec<Event>, Drained) {
        let mut ring = vec![0xAAu8; len];
        let mut head = tail;
        for r in records {
            for &b in r {
                ring[(head % len as u64) as usize] = b;
                head = head.wrapping_add(1);
            }
        }
        parse(&ring, tail, head)
    }

    fn parse(ring: &[u8], tail: u64, head: u64) -> (Vec<Event>, Drained) {
        let mut out = Vec::new();
        let mut counts = Drained::default();
        parse_ring(ring, tail, head, &decoder(), &mut out, &mut counts);
        (out, counts)
    }

    fn listen(pid: u32, family: Family, port: u16) -> Event {
        Event::Listen {
            pid,
            tid: pid + 1,
            family,
            port,
        }
    }

    fn drained(lost: u64, malformed: u64) -> Drained {
        Drained {
            lost,
            malformed,
            ignored: 0,
        }
    }

    #[test]
    fn samples_become_events() {
        let check = |raw: Vec<u8>, want: Option<Event>| {
            let (events, counts) = through_ring(4096, 0, &[sample_of(10, 11, &raw)]);
            let ignored = u64::from(want.is_none());
            assert_eq!(events, want.into_iter().collect::<Vec<_>>(), "{raw:?}");
            assert_eq!(
                counts,
                Drained {
                    ignored,
                    ..Drained::default()
                }
            );
        };
        check(
            set_state_raw(7, 10, 8080, 2, 6),
            Some(listen(10, Family::Ipv4, 8080)),
        );
        check(
            set_state_raw(7, 10, 443, 10, 6),
            Some(listen(10, Family::Ipv6, 443)),
        );
        check(
            set_state_raw(7, 10, 443, 10, 262), // MPTCP
            Some(listen(10, Family::Ipv6, 443)),
        );
        check(
            set_state_raw(10, 7, 8080, 2, 6),
            Some(Event::ListenClose {
                pid: 10,
                tid: 11,
                family: Family::Ipv4,
                port: 8080,
            }),
        );
        // listen() before bind(): the port is assigned after the tracepoint fires.
        check(
            set_state_raw(7, 10, 0, 2, 6),
            Some(listen(10, Family::Ipv4, 0)),
        );
        check(set_state_raw(7, 10, 5000, 2, 132), None); // SCTP
        check(set_state_raw(7, 10, 5000, 1, 6), None); // neither AF_INET nor AF_INET6
        check(set_state_raw(10, 3, 8080, 2, 6), None); // an accepted child (unfiltered)
        check(set_state_raw(1, 4, 8080, 2, 6), None); // a connection's state change
        check(bind_raw(), Some(Event::Bind { pid: 10, tid: 11 }));
    }

    #[test]
    fn own_binds_are_skipped_but_not_own_listens() {
        let (events, counts) = through_ring(
            4096,
            0,
            &[
                sample_of(99, 100, &bind_raw()),
                sample_of(99, 100, &set_state_raw(7, 10, 80, 2, 6)),
            ],
        );
        assert_eq!(events, [listen(99, Family::Ipv4, 80)]);
        assert_eq!(
            counts,
            Drained {
                ignored: 1,
                ..Drained::default()
            }
        );
    }

    #[test]
    fn without_bind_events_a_bind_record_is_not_one_of_ours() {
        let mut d = decoder();
        d.bind = None;
        let mut out = Vec::new();
        let mut counts = Drained::default();
        let ring = [
            sample_of(1, 2, &bind_raw()),
            sample_of(1, 2, &set_state_raw(7, 10, 80, 2, 6)),
        ]
        .concat();
        parse_ring(&ring, 0, ring.len() as u64, &d, &mut out, &mut counts);
        assert_eq!(out, [listen(1, Family::Ipv4, 80)]);
        assert_eq!(counts, drained(0, 1));
    }

    #[test]
    fn records_wrapping_around_the_end_are_read_whole() {
        let records = [
            sample_of(1, 2, &set_state_raw(7, 10, 1, 2, 6)),
            sample_of(3, 4, &bind_raw()),
            lost(5),
            sample_of(5, 6, &set_state_raw(10, 7, 2, 10, 6)),
        ];
        let want = vec![
            listen(1, Family::Ipv4, 1),
            Event::Bind { pid: 3, tid: 4 },
            Event::ListenClose {
                pid: 5,
                tid: 6,
                family: Family::Ipv6,
                port: 2,
            },
        ];
        // Every starting point in a 512-byte ring (the records take 264 bytes): the end of
        // the ring cuts each record, and each header, at every possible place.
        for tail in 0..512 {
            let (events, counts) = through_ring(512, tail, &records);
            assert_eq!(events, want, "tail {tail}");
            assert_eq!(counts, drained(5, 0), "tail {tail}");
        }
        // Counters past 2^64: still free-running, wrapping included.
        let (events, counts) = through_ring(512, u64::MAX - 40, &records);
        assert_eq!((events, counts), (want, drained(5, 0)));
    }

    #[test]
    fn lost_records_add_up_and_unknown_records_are_skipped() {
        let (events, counts) = through_ring(
            4096,
            0,
            &[
                lost(3),
                record(3, &[0u8; 24]), // PERF_RECORD_COMM
                record(77, &[]),       // a type from the future, header only
                lost(u64::MAX),        // saturates, never overflows
                sample_of(1, 2, &bind_raw()),
            ],
        );
        assert_eq!(events, [Event::Bind { pid: 1, tid: 2 }]);
        assert_eq!(counts, drained(u64::MAX, 0));
    }

    #[test]
    fn damaged_rings_are_counted_never_trusted() {
        let good = sample_of(1, 2, &bind_raw());
        let check = |ring: &[u8], tail: u64, head: u64, want: (usize, Drained)| {
            let (events, counts) = parse(ring, tail, head);
            assert_eq!((events.len(), counts), want, "tail {tail} head {head}");
        };
        let ring_of = |records: &[&[u8]]| {
            let mut r = records.concat();
            r.resize(4096, 0);
            r
        };
        let ok = ring_of(&[&good, &good]);
        let n = good.len() as u64;
        check(&ok, 0, 2 * n, (2, drained(0, 0)));
        check(&ok, 0, 0, (0, drained(0, 0)));
        check(&ok, 5, 5, (0, drained(0, 0)));
        // head behind tail, or further ahead than the ring holds.
        check(&ok, 100, 50, (0, drained(0, 1)));
        check(&ok, 0, 4097, (0, drained(0, 1)));
        check(&[], 0, 8, (0, drained(0, 1)));
        // head in the middle of a record, or of a header: what came before is kept.
        check(&ok, 0, n + 8, (1, drained(0, 1)));
        check(&ok, 0, n + 3, (1, drained(0, 1)));
        // A zero-size record would never advance: it ends the parse.
        check(&[0u8; 4096], 0, 4096, (0, drained(0, 1)));
        // A size below the header's own.
        let mut tiny = record(PERF_RECORD_SAMPLE, &[]);
        tiny[6..8].copy_from_slice(&4u16.to_ne_bytes());
        check(&ring_of(&[&tiny, &good]), 0, 8 + n, (0, drained(0, 1)));
        // Samples whose parts do not fit are skipped by their size, the next one is read.
        let mut raw_too_long = sample_of(1, 2, &bind_raw());
        raw_too_long[16..20].copy_from_slice(&1000u32.to_ne_bytes());
        let no_pid = record(PERF_RECORD_SAMPLE, &[1, 2, 3]);
        let short_raw = sample_of(1, 2, &[0xAF]); // common_type cut in half
        let short_set_state = sample_of(1, 2, &set_state_raw(7, 10, 1, 2, 6)[..26]);
        let other_tracepoint = sample_of(1, 2, &[9, 9, 0, 0, 0, 0, 0, 0]);
        let short_lost = record(PERF_RECORD_LOST, &[0u8; 8]);
        for bad in [
            &raw_too_long,
            &no_pid,
            &short_raw,
            &short_set_state,
            &other_tracepoint,
            &short_lost,
        ] {
            let ring = ring_of(&[bad, &good]);
            check(
                &ring,
                0,
                (bad.len() + good.len()) as u64,
                (1, drained(0, 1)),
            );
        }
        // Random bytes: no panic, no endless loop, whatever they decode to.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..2000 {
            let mut ring = vec![0u8; 256];
            for b in &mut ring {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Plausible small sizes now and then, so records get decoded too.
            if round % 2 == 0 {
                ring[6..8].copy_from_slice(&(((x % 30) as u16) * 8).to_ne_bytes());
                ring[0..4].copy_from_slice(&PERF_RECORD_SAMPLE.to_ne_bytes());
            }
            let tail = x % 1000;
            parse(&ring, tail, tail + x % 300);
        }
    }
}
