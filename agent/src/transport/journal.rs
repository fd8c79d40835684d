//! The durable outbox: a local journal of what the agent owes the collector, so an agent
//! restart resumes its session (same session id, sequences and unacknowledged messages
//! with their observation times) instead of losing the changes it saw while the
//! collector was away.
//!
//! The file (`STATE_DIR/outbox.journal`) is an 8-byte magic followed by records, each
//! `[length: u32 LE][CRC-32 of the payload: u32 LE][payload]`; a payload is a kind byte
//! and a body, the listeners in the body encoded as the wire messages (`v1::Delta`,
//! `v1::SnapshotChunk`) so decoding validates them like the collector does. The first
//! record is a checkpoint (`BEGIN`: session id, next sequence, acknowledged sequence, the
//! number of queued messages and the last scanned state), followed by the queued messages
//! (`QUEUED_*`; the checkpoint is whole only with all of them); after it, the
//! live records appended as the outbox changes: a snapshot pushed (it also replaces the
//! current state), a delta pushed (also applied to the current state: a delta is exactly
//! a scan's change), an acknowledgement. Replaying them rebuilds the outbox
//! ([`super::outbox::Image`]).
//!
//! Rules:
//! - **A message is on disk before it is sent.** Pushes are written and fsynced in the
//!   same locked operation that queues them (the scanner's once per scan, a restart from
//!   a snapshot once per event), before the sender can see them; acknowledgements are
//!   only written, and reach the disk with the next fsync. A crash therefore loses at
//!   most acknowledgements the collector will repeat (its `resume_after`), never a message
//!   the collector may have committed. Rejected: fsync on a timer, which would let a
//!   crash forget a sent, committed sequence, and the restarted agent would reuse its
//!   number for other changes that the collector would then acknowledge without storing.
//! - **Bounded.** When the file grows past twice its last checkpoint (at least 1 MiB) or
//!   past `journal_max_bytes`, it is rewritten as one checkpoint (temp file, fsync,
//!   rename, fsync of the directory). A checkpoint that alone exceeds `journal_max_bytes`
//!   collapses the outbox into one snapshot first, as the in-memory bound does; an
//!   inventory that alone exceeds it cannot be journaled ([`JournalError::TooBig`]).
//! - **Corruption-tolerant.** A record that is torn (short) or fails its CRC or its
//!   decoding ends the replay: the tail is dropped ([`Loaded::TornTail`]) and the agent
//!   starts a new session with a fresh snapshot, because the dropped part may have held
//!   messages the collector committed. A file whose magic or checkpoint is unreadable is
//!   [`Loaded::Unreadable`]: the caller moves it aside and starts fresh.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use listenscope_core::diff::{Changes, apply};
use listenscope_core::record::{ListenerKey, ListenerRecord};
use listenscope_core::wire;
use listenscope_proto::v1;
use prost::Message;
use time::OffsetDateTime;

use super::base::Base;
use super::outbox::{Effect, Image, Outbox, Pending};
use crate::record::State;

/// The journal's file name in the state directory.
pub const FILE: &str = "outbox.journal";
/// Where an unreadable journal is moved (one; a later one replaces it).
pub const UNREADABLE: &str = "outbox.journal.unreadable";
const TMP: &str = "outbox.journal.tmp";
const MAGIC: &[u8; 8] = b"LSJRNL01";
/// Record header: length and CRC.
const HEADER: usize = 8;
/// The journal is rewritten as a checkpoint when it grows past twice the last one, but
/// never below this.
const COMPACT_MIN: u64 = 1024 * 1024;
/// Default `journal_max_bytes`: 32 MiB. A restart reads the whole journal and decodes
/// it, so the bound also bounds the agent's memory at start-up, which must stay well
/// within the systemd unit's and the DaemonSet's 128 MiB. A journal holds an inventory of
/// about 100,000 listeners (a checkpoint stores roughly 200–300 bytes per listener).
pub const DEFAULT_MAX_BYTES: u64 = 32 * 1024 * 1024;

const BEGIN: u8 = 1;
const SNAPSHOT: u8 = 2;
const DELTA: u8 = 3;
const ACK: u8 = 4;
const QUEUED_SNAPSHOT: u8 = 5;
/// A queued snapshot whose state is the checkpoint's current state (not written twice).
const QUEUED_SNAPSHOT_CURRENT: u8 = 6;
const QUEUED_DELTA: u8 = 7;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "the inventory alone takes {need} bytes in the journal, more than journal_max_bytes \
         ({max}): raise journal_max_bytes (or --journal-max-bytes)"
    )]
    TooBig { need: u64, max: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a journal file held.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No journal: a first start, or one without a state directory before.
    Missing,
    Restored(Image),
    /// The checkpoint and `records` records after it were valid, then came `dropped`
    /// bytes that are not (a torn write or corruption).
    TornTail {
        valid_bytes: u64,
        dropped: u64,
        why: String,
    },
    /// Not a journal, or its checkpoint is damaged.
    Unreadable {
        why: String,
    },
}

/// Reads the journal at `path` (`Missing` if there is none).
pub fn load(path: &Path) -> Result<Loaded, JournalError> {
    match fs::read(path) {
        Ok(bytes) => Ok(replay(&bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Loaded::Missing),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Rebuilds the outbox from a journal's bytes. Pure, and total: any input gives an answer.
pub fn replay(bytes: &[u8]) -> Loaded {
    let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Loaded::Unreadable {
            why: "it does not start with the journal's magic bytes".into(),
        };
    };
    let mut image: Option<Image> = None;
    let mut checkpoint_left = 0;
    loop {
        let at = (bytes.len() - rest.len()) as u64;
        let whole = image.is_some() && checkpoint_left == 0;
        if rest.is_empty() {
            return match image {
                Some(img) if whole => Loaded::Restored(img),
                _ => Loaded::Unreadable {
                    why: "it holds no whole checkpoint".into(),
                },
            };
        }
        let step = next_record(rest).and_then(|(payload, tail)| {
            apply_record(&mut image, &mut checkpoint_left, payload)?;
            Ok(tail)
        });
        match step {
            Ok(tail) => rest = tail,
            Err(why) if whole => {
                return Loaded::TornTail {
                    valid_bytes: at,
                    dropped: rest.len() as u64,
                    why,
                };
            }
            Err(why) => {
                return Loaded::Unreadable {
                    why: format!("its checkpoint is damaged ({why})"),
                };
            }
        }
    }
}

/// One framed record: its payload and what follows.
fn next_record(b: &[u8]) -> Result<(&[u8], &[u8]), String> {
    if b.len() < HEADER {
        return Err(format!("a record header cut after {} bytes", b.len()));
    }
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let crc = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let body = &b[HEADER..];
    if body.len() < len {
        return Err(format!(
            "a record of {len} bytes cut after {} bytes",
            body.len()
        ));
    }
    let (payload, tail) = body.split_at(len);
    if crc32(payload) != crc {
        return Err("a record fails its CRC".into());
    }
    Ok((payload, tail))
}

/// Applies one record. `checkpoint_left` counts the queued records the checkpoint still
/// owes: a checkpoint is whole only with all of them.
fn apply_record(
    image: &mut Option<Image>,
    checkpoint_left: &mut u64,
    payload: &[u8],
) -> Result<(), String> {
    let (&kind, body) = payload.split_first().ok_or("an empty record")?;
    if kind == BEGIN {
        if image.is_some() {
            return Err("a second checkpoint".into());
        }
        if body.len() < 40 {
            return Err("a short checkpoint".into());
        }
        let (fixed, chunk) = body.split_at(40);
        let mut session_id = [0u8; 16];
        session_id.copy_from_slice(&fixed[..16]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&fixed[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (next_seq, acked, queued) = (u64_at(16), u64_at(24), u64_at(32));
        let (_, at, state) = snapshot_of(chunk)?;
        if next_seq == 0 {
            return Err("a checkpoint with sequence 0".into());
        }
        *image = Some(Image {
            session_id,
            next_seq,
            acked,
            current: Arc::new(state),
            current_at: at,
            queue: Vec::new(),
        });
        *checkpoint_left = queued;
        return Ok(());
    }
    let img = image.as_mut().ok_or("a record before the checkpoint")?;
    let queued_kind = matches!(
        kind,
        QUEUED_SNAPSHOT | QUEUED_SNAPSHOT_CURRENT | QUEUED_DELTA
    );
    if queued_kind != (*checkpoint_left > 0) {
        return Err("a checkpoint whose queue does not match its count".into());
    }
    if queued_kind {
        *checkpoint_left -= 1;
    }
    let push = |img: &mut Image, p: Pending| {
        if p.seq() != img.next_seq {
            return Err(format!(
                "message {} where {} was next",
                p.seq(),
                img.next_seq
            ));
        }
        img.next_seq += 1;
        img.queue.push(p);
        Ok(())
    };
    match kind {
        SNAPSHOT | QUEUED_SNAPSHOT | QUEUED_SNAPSHOT_CURRENT => {
            let (seq, at, state) = snapshot_of(body)?;
            let state = match kind {
                QUEUED_SNAPSHOT_CURRENT => Arc::clone(&img.current),
                _ => Arc::new(state),
            };
            if kind == SNAPSHOT {
                img.queue.clear();
                img.current = Arc::clone(&state);
                img.current_at = at;
            }
            push(img, Pending::Snapshot { seq, at, state })
        }
        DELTA | QUEUED_DELTA => {
            let (seq, at, changes) = delta_of(body)?;
            if kind == DELTA {
                apply(Arc::make_mut(&mut img.current), &changes);
                img.current_at = at;
            }
            push(img, Pending::Delta { seq, at, changes })
        }
        ACK => {
            let seq = u64::from_le_bytes(body.try_into().map_err(|_| "a bad ack")?);
            img.queue.retain(|p| p.seq() > seq);
            img.acked = img.acked.max(seq);
            Ok(())
        }
        other => Err(format!("an unknown record kind {other}")),
    }
}

/// A time as the wire carries it (seconds, nanoseconds).
fn time_of(t: Option<(i64, i32)>) -> Result<OffsetDateTime, String> {
    let (seconds, nanos) = t.ok_or("a message without its time")?;
    let nanos = u32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or("a time with bad nanoseconds")?;
    OffsetDateTime::from_unix_timestamp(seconds)
        .map(|s| s + time::Duration::nanoseconds(i64::from(nanos)))
        .map_err(|e| e.to_string())
}

fn snapshot_of(body: &[u8]) -> Result<(u64, OffsetDateTime, State), String> {
    let c = v1::SnapshotChunk::decode(body).map_err(|e| e.to_string())?;
    let at = time_of(c.observed_at.map(|t| (t.seconds, t.nanos)))?;
    let mut state = State::new();
    for l in c.listeners {
        let r = ListenerRecord::try_from(l).map_err(|e| e.to_string())?;
        if state.insert(r.key.clone(), r).is_some() {
            return Err("a snapshot with a listener twice".into());
        }
    }
    Ok((c.sequence, at, state))
}

fn delta_of(body: &[u8]) -> Result<(u64, OffsetDateTime, Changes), String> {
    let d = v1::Delta::decode(body).map_err(|e| e.to_string())?;
    let at = time_of(d.observed_at.map(|t| (t.seconds, t.nanos)))?;
    let records = |ls: Vec<v1::Listener>| {
        ls.into_iter()
            .map(|l| ListenerRecord::try_from(l).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()
    };
    let changes = Changes {
        opened: records(d.opened)?,
        closed: d
            .closed
            .into_iter()
            .map(|k| ListenerKey::try_from(k).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
        changed: records(d.changed)?,
    };
    Ok((d.sequence, at, changes))
}

/// A snapshot chunk of `state` (none: no listeners) appended to `out` as protobuf, the
/// bytes `v1::SnapshotChunk::encode_raw` writes, converted and encoded one listener at a
/// time: a `SnapshotChunk` value would hold the whole state again in wire types (about
/// 8 MiB at 10,000 listeners) next to its encoding, at every checkpoint and snapshot.
fn encode_chunk(out: &mut Vec<u8>, seq: u64, at: OffsetDateTime, state: Option<&State>) {
    chunk_header(out, seq, at);
    for r in state.into_iter().flat_map(|s| s.values()) {
        prost::encoding::message::encode(LISTENERS_FIELD, &v1::Listener::from(r), out);
    }
}

/// A snapshot chunk of the outbox's kept state, whose listeners are already encoded.
fn encode_base_chunk(out: &mut Vec<u8>, seq: u64, at: OffsetDateTime, base: &Base) {
    chunk_header(out, seq, at);
    for l in base.encoded() {
        prost::encoding::encode_key(
            LISTENERS_FIELD,
            prost::encoding::WireType::LengthDelimited,
            out,
        );
        prost::encoding::encode_varint(l.len() as u64, out);
        out.extend_from_slice(l);
    }
}

/// A `SnapshotChunk` without its listeners; they are appended after it.
fn chunk_header(out: &mut Vec<u8>, seq: u64, at: OffsetDateTime) {
    v1::SnapshotChunk {
        sequence: seq,
        chunk_index: 0,
        last: true,
        observed_at: Some(wire::timestamp(at)),
        listeners: Vec::new(),
    }
    .encode_raw(out);
    // `listeners` is field 5, the last one: encode_raw would write it here too.
}

/// `SnapshotChunk.listeners` (proto/listenscope/v1/inventory.proto).
const LISTENERS_FIELD: u32 = 5;

fn delta(seq: u64, at: OffsetDateTime, changes: &Changes) -> v1::Delta {
    v1::Delta {
        sequence: seq,
        observed_at: Some(wire::timestamp(at)),
        opened: changes.opened.iter().map(Into::into).collect(),
        closed: changes.closed.iter().map(Into::into).collect(),
        changed: changes.changed.iter().map(Into::into).collect(),
    }
}

/// Appends one framed record (`kind`, then `body` written by `fill`) to `out`.
fn frame(out: &mut Vec<u8>, kind: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    out.push(kind);
    fill(out);
    let payload = &out[start + HEADER..];
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let crc = crc32(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
}

/// A live record: what `pending` did when it was pushed.
fn push_record(out: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Snapshot { seq, at, state } => frame(out, SNAPSHOT, |b| {
            encode_chunk(b, *seq, *at, Some(state));
        }),
        Pending::Delta { seq, at, changes } => frame(out, DELTA, |b| {
            delta(*seq, *at, changes).encode_raw(b);
        }),
    }
}

/// The whole outbox as a journal: magic, checkpoint, queued messages.
pub fn checkpoint(o: &Outbox) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    let (current, current_at) = o.current();
    let first = o.pending().next().map_or(o.next_seq(), Pending::seq);
    frame(&mut out, BEGIN, |b| {
        b.extend_from_slice(&o.session_id);
        b.extend_from_slice(&first.to_le_bytes());
        b.extend_from_slice(&o.acked().to_le_bytes());
        b.extend_from_slice(&(o.pending().count() as u64).to_le_bytes());
        encode_base_chunk(b, 0, current_at, current);
    });
    for p in o.pending() {
        match p {
            Pending::Snapshot { seq, at, .. } if o.is_current_snapshot(p) => {
                frame(&mut out, QUEUED_SNAPSHOT_CURRENT, |b| {
                    encode_chunk(b, *seq, *at, None);
                });
            }
            Pending::Snapshot { seq, at, state } => frame(&mut out, QUEUED_SNAPSHOT, |b| {
                encode_chunk(b, *seq, *at, Some(state));
            }),
            Pending::Delta { seq, at, changes } => frame(&mut out, QUEUED_DELTA, |b| {
                delta(*seq, *at, changes).encode_raw(b);
            }),
        }
    }
    out
}

/// The live records for what the outbox did since the journal last drained it.
fn effects_to_records(o: &mut Outbox) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut pushed = false;
    for e in o.take_effects() {
        match e {
            Effect::Pushed(seq) => {
                // A message pushed and then replaced within one operation (a restart from
                // a snapshot right after) is gone; the snapshot that replaced it follows.
                if let Some(p) = o.get(seq) {
                    push_record(&mut out, p);
                    pushed = true;
                }
            }
            Effect::Acked(seq) => frame(&mut out, ACK, |b| b.extend_from_slice(&seq.to_le_bytes())),
        }
    }
    (out, pushed)
}

/// The open journal of a state directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    checkpoint_len: u64,
    max_bytes: u64,
    /// Written since the last fsync.
    unsynced: bool,
}

impl Journal {
    /// Writes a fresh journal for `o` in `dir` (replacing any), collapsing `o` if its
    /// checkpoint would exceed `max_bytes`.
    pub fn create(dir: &Path, max_bytes: u64, o: &mut Outbox) -> Result<Journal, JournalError> {
        let bytes = fitted_checkpoint(o, max_bytes)?;
        let (file, len) = write_atomically(dir, &bytes)?;
        o.take_effects();
        Ok(Journal {
            dir: dir.to_path_buf(),
            path: dir.join(FILE),
            file,
            len,
            checkpoint_len: len,
            max_bytes,
            unsynced: false,
        })
    }

    /// Writes what `o` did since the last call. With `sync` (or when anything was pushed:
    /// a message must be on disk before it can be sent) the file is fsynced too. Grows
    /// past its bound: rewritten as a checkpoint.
    pub fn record(&mut self, o: &mut Outbox, sync: bool) -> Result<(), JournalError> {
        let (bytes, pushed) = effects_to_records(o);
        if !bytes.is_empty() {
            self.file.write_all(&bytes).map_err(io_err(&self.path))?;
            self.len += bytes.len() as u64;
            self.unsynced = true;
        }
        if self.len > self.max_bytes || self.len > COMPACT_MIN.max(2 * self.checkpoint_len) {
            return self.compact(o);
        }
        if (sync || pushed) && self.unsynced {
            self.file.sync_data().map_err(io_err(&self.path))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Rewrites the journal as one checkpoint of `o`.
    pub fn compact(&mut self, o: &mut Outbox) -> Result<(), JournalError> {
        let bytes = fitted_checkpoint(o, self.max_bytes)?;
        let (file, len) = write_atomically(&self.dir, &bytes)?;
        o.take_effects();
        self.file = file;
        self.len = len;
        self.checkpoint_len = len;
        self.unsynced = false;
        Ok(())
    }

    /// Bytes in the file now.
    pub fn bytes(&self) -> u64 {
        self.len
    }
}

/// The checkpoint of `o`, collapsed into one snapshot if it would exceed `max_bytes`.
fn fitted_checkpoint(o: &mut Outbox, max_bytes: u64) -> Result<Vec<u8>, JournalError> {
    let bytes = checkpoint(o);
    if bytes.len() as u64 <= max_bytes {
        return Ok(bytes);
    }
    o.collapse();
    let bytes = checkpoint(o);
    if bytes.len() as u64 <= max_bytes {
        Ok(bytes)
    } else {
        Err(JournalError::TooBig {
            need: bytes.len() as u64,
            max: max_bytes,
        })
    }
}

/// `bytes` as `dir/FILE`, atomically: a temp file (0600), fsync, rename, fsync of the
/// directory. Returns the file, open for appending, and its length.
fn write_atomically(dir: &Path, bytes: &[u8]) -> Result<(File, u64), JournalError> {
    let tmp = dir.join(TMP);
    let path = dir.join(FILE);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    // The handle was opened for writing at offset 0 and has written everything: its
    // position is the end, where later records go.
    Ok((file, bytes.len() as u64))
}

pub fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// CRC-32 (IEEE 802.3, the one of zlib and Ethernet), table-driven.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::outbox::Recorded;
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
            + time::Duration::nanoseconds(123_456_789)
    }

    fn image_of(o: &Outbox) -> Image {
        let (current, current_at) = o.current();
        Image {
            session_id: o.session_id,
            next_seq: o.next_seq(),
            acked: o.acked(),
            current: Arc::new(current.to_state()),
            current_at,
            queue: o.pending().cloned().collect(),
        }
    }

    /// A journal as the agent writes it: a checkpoint, then live records (pushes, acks,
    /// a restart from a snapshot, more deltas). Returns the bytes, the byte offsets where
    /// records end, and the outbox they describe.
    fn sample() -> (Vec<u8>, Vec<usize>, Outbox) {
        let mut o = Outbox::new([7; 16], state(&[80]), t(0), 1000);
        let mut bytes = checkpoint(&o);
        o.take_effects();
        let mut ends = vec![bytes.len()];
        let mut step = |o: &mut Outbox, bytes: &mut Vec<u8>| {
            let (b, _) = effects_to_records(o);
            let mut rest = b.as_slice();
            let mut at = bytes.len();
            while !rest.is_empty() {
                let (p, tail) = next_record(rest).unwrap();
                at += HEADER + p.len();
                ends.push(at);
                rest = tail;
            }
            bytes.extend_from_slice(&b);
        };
        o.on_ack(1);
        step(&mut o, &mut bytes);
        o.record_scan(state(&[80, 443]), t(10));
        step(&mut o, &mut bytes);
        o.record_scan(state(&[443, 8080]), t(20));
        step(&mut o, &mut bytes);
        o.on_ack(2);
        step(&mut o, &mut bytes);
        o.on_welcome(None);
        step(&mut o, &mut bytes);
        o.record_scan(state(&[443, 8080, 9000]), t(30));
        step(&mut o, &mut bytes);
        (bytes, ends, o)
    }

    /// The chunk encoded listener by listener is byte for byte the one prost writes for
    /// the whole `SnapshotChunk` (what journals written before held, and what replay
    /// decodes).
    #[test]
    fn chunks_are_encoded_as_prost_encodes_them() {
        let s = state(&[22, 80, 443, 8080]);
        for (listeners, state) in [
            (Vec::new(), None),
            (s.values().map(Into::into).collect(), Some(&s)),
        ] {
            let whole = v1::SnapshotChunk {
                sequence: 9,
                chunk_index: 0,
                last: true,
                observed_at: Some(wire::timestamp(t(5))),
                listeners,
            }
            .encode_to_vec();
            let mut streamed = Vec::new();
            encode_chunk(&mut streamed, 9, t(5), state);
            assert_eq!(streamed, whole);
        }
    }

    #[test]
    fn replay_restores_exactly_what_was_written() {
        let (bytes, _, o) = sample();
        assert_eq!(replay(&bytes), Loaded::Restored(image_of(&o)));
        // The queue: the snapshot of the restart (its time kept) and the delta after it.
        let img = match replay(&bytes) {
            Loaded::Restored(img) => img,
            other => panic!("{other:?}"),
        };
        let seqs: Vec<(u64, OffsetDateTime)> = img
            .queue
            .iter()
            .map(|p| match p {
                Pending::Snapshot { seq, at, .. } | Pending::Delta { seq, at, .. } => (*seq, *at),
            })
            .collect();
        assert_eq!(seqs, [(4, t(20)), (5, t(30))]);
        assert_eq!(img.current.len(), 3);
        assert_eq!(img.acked, 2);
        // And a checkpoint of the restored outbox says the same.
        let restored = Outbox::restore(img.clone(), 1000);
        assert_eq!(replay(&checkpoint(&restored)), Loaded::Restored(img));
    }

    /// Cut at every byte: a cut on a record boundary restores the outbox as of that
    /// record; anywhere else the torn record is dropped (never a panic, never a different
    /// outbox); before the checkpoint is complete the file is unreadable.
    #[test]
    fn torn_tail_at_every_offset() {
        let (bytes, ends, _) = sample();
        let checkpoint_end = ends[0];
        for cut in 0..bytes.len() {
            let got = replay(&bytes[..cut]);
            if cut < checkpoint_end {
                assert!(
                    matches!(got, Loaded::Unreadable { .. }),
                    "cut {cut}: {got:?}"
                );
            } else if ends.contains(&cut) {
                assert!(matches!(got, Loaded::Restored(_)), "cut {cut}: {got:?}");
            } else {
                let last_end = *ends.iter().filter(|e| **e <= cut).max().unwrap();
                assert_eq!(
                    got,
                    Loaded::TornTail {
                        valid_bytes: last_end as u64,
                        dropped: (cut - last_end) as u64,
                        why: match &got {
                            Loaded::TornTail { why, .. } => why.clone(),
                            _ => String::new(),
                        },
                    },
                    "cut {cut}"
                );
            }
        }
    }

    /// Flip each bit of every byte: the journal never restores (the CRC or the framing
    /// catches it), whether the flip hits the checkpoint (unreadable) or a later record
    /// (torn tail).
    #[test]
    fn bit_flips_are_caught() {
        let (bytes, ends, _) = sample();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let got = replay(&b);
                match got {
                    Loaded::Unreadable { .. } => assert!(i < ends[0], "byte {i}"),
                    Loaded::TornTail { valid_bytes, .. } => {
                        assert!(i >= valid_bytes as usize, "byte {i}: {valid_bytes}");
                    }
                    other => panic!("byte {i} bit {bit}: {other:?}"),
                }
            }
        }
        assert!(matches!(replay(b""), Loaded::Unreadable { .. }));
        assert!(matches!(
            replay(b"garbage!garbage"),
            Loaded::Unreadable { .. }
        ));
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    fn tmpdir(name: &str) -> listenscope_testkit::TempDir {
        listenscope_testkit::TempDir::new(name)
    }

    #[test]
    fn journal_file_round_trip_and_compaction() {
        let dir = tmpdir("journal-compact");
        let mut o = Outbox::new([3; 16], state(&[1]), t(0), 1_000_000);
        let mut j = Journal::create(dir.path(), DEFAULT_MAX_BYTES, &mut o).unwrap();
        let mode = fs::metadata(dir.join(FILE)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        o.on_ack(1);
        j.record(&mut o, false).unwrap();
        // Many scans, acknowledged as they go: the journal is compacted, never grows
        // past its bound, and always restores the outbox.
        let mut grew = 0;
        for i in 2..=3000u16 {
            let ports: Vec<u16> = (1..=1 + i % 50).map(|p| p + i).collect();
            o.record_scan(state(&ports), t(i64::from(i)));
            j.record(&mut o, false).unwrap();
            if i % 3 == 0 {
                let last = o.next_seq() - 1;
                o.on_ack(last);
                j.record(&mut o, false).unwrap();
            }
            grew = grew.max(j.bytes());
        }
        assert!(grew <= 2 * COMPACT_MIN, "{grew}");
        assert_eq!(
            load(&dir.join(FILE)).unwrap(),
            Loaded::Restored(image_of(&o))
        );
    }

    #[test]
    fn bound_reached_collapses_into_a_snapshot() {
        let dir = tmpdir("journal-bound");
        let big: Vec<u16> = (1..=200).collect();
        let mut o = Outbox::new([3; 16], state(&big), t(0), 1_000_000);
        let one = checkpoint(&o).len() as u64;
        // Room for the inventory and a little more, not for many deltas.
        let max = one * 2;
        let mut j = Journal::create(dir.path(), max, &mut o).unwrap();
        for i in 1..=40u16 {
            let ports: Vec<u16> = (1..=200).map(|p| p + i * 7).collect();
            assert!(matches!(
                o.record_scan(state(&ports), t(i64::from(i))),
                Recorded::Changed(_)
            ));
            j.record(&mut o, false).unwrap();
            assert!(j.bytes() <= max, "{} > {max}", j.bytes());
        }
        assert!(o.overflows > 0);
        // The queue is one snapshot of the current state, with the latest time.
        let img = match load(&dir.join(FILE)).unwrap() {
            Loaded::Restored(img) => img,
            other => panic!("{other:?}"),
        };
        assert_eq!(img, image_of(&o));
        assert!(matches!(img.queue.first(), Some(Pending::Snapshot { .. })));
        // An inventory bigger than the bound alone cannot be journaled.
        let err = Journal::create(dir.path(), one / 2, &mut o).unwrap_err();
        assert!(matches!(err, JournalError::TooBig { .. }), "{err}");
        assert!(err.to_string().contains("raise journal_max_bytes"), "{err}");
    }
}
