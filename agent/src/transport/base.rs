//! The outbox's last scanned state, kept small: what the next scan is compared with, and
//! what a snapshot is rebuilt from when the collector needs one.
//!
//! A long-running agent holds this for its whole life, so its size is most of the agent's
//! steady memory. A whole [`State`] costs about 1 KiB per listener (a record's strings,
//! its owners' command lines, the firewall reasons, the map's nodes): 10 MiB at 10,000
//! listeners. Here each listener keeps only an identity encoding of its key, a keyed
//! 64-bit hash of the whole record and the record's wire encoding (`v1::Listener`, as the
//! journal and the collector read it), about 400 bytes.
//!
//! - **Flat.** All of it lives in three big allocations (the bytes, the slots, the key
//!   index), rebuilt whole by each [`Base::advance`], never in thousands of small ones.
//!   Big allocations are mapped apart and unmapped when freed (`os/heap.rs`); small
//!   long-lived ones would sit between the short-lived allocations of every scan and keep
//!   their pages resident (measured: 5.8 MiB in use held 14 MiB of heap).
//! - **Diff by hash.** A record whose hash equals the stored one is unchanged. The hash is
//!   SipHash with a key drawn at start-up ([`RandomState`]), so nobody who controls a
//!   process's command line can aim for a collision and hide a change; an accidental one
//!   (2⁻⁶⁴ per compared record) would hide a change until the record changes again or
//!   the next snapshot. The derived `Hash` agrees with `Eq` on every field, as the
//!   whole-record comparison this replaces did. Keys are found through a hash index and
//!   confirmed byte for byte, so two keys are never taken for one.
//! - **Snapshots decode.** A snapshot needs whole records; they are decoded from the wire
//!   encodings, which round-trip exactly (tested), only when one is queued (a new
//!   session, a resync, an overflow): rare, and the decoded state lives only until the
//!   collector acknowledges it.
//!
//! Rejected: keeping hashes only and asking the scanner for a fresh scan whenever a
//! snapshot is needed. It saves another 3–4 MiB at 10,000 listeners, but a snapshot would
//! then wait for a scan and carry a later time than the changes before it, and the
//! journal's checkpoint (which stores this state) could not be written without one.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;

use listenscope_core::diff::Changes;
use listenscope_core::record::{ListenerKey, ListenerRecord};
use listenscope_proto::v1;
use prost::Message;

use crate::record::State;

/// One listener: where its bytes are (`key_len` bytes of identity, then its wire
/// encoding, up to `end`) and its hashes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    start: usize,
    key_len: usize,
    end: usize,
    key_hash: u64,
    digest: u64,
}

/// A state as the outbox keeps it (see the module docs).
#[derive(Debug)]
pub struct Base {
    bytes: Vec<u8>,
    /// In key order.
    slots: Vec<Slot>,
    /// Key hash → slot. A second key with the same hash (2⁻⁶⁴) goes to `collided`.
    index: HashMap<u64, usize>,
    collided: Vec<usize>,
    hasher: RandomState,
}

impl Base {
    pub fn new(state: &State) -> Base {
        let mut base = Base::empty(RandomState::new(), 0, 0);
        base.advance(state);
        base
    }

    fn empty(hasher: RandomState, listeners: usize, bytes: usize) -> Base {
        Base {
            bytes: Vec::with_capacity(bytes),
            slots: Vec::with_capacity(listeners),
            index: HashMap::with_capacity(listeners),
            collided: Vec::new(),
            hasher,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn key_bytes(&self, s: &Slot) -> &[u8] {
        &self.bytes[s.start..s.start + s.key_len]
    }

    fn wire(&self, s: &Slot) -> &[u8] {
        &self.bytes[s.start + s.key_len..s.end]
    }

    /// The slot holding the key whose identity encoding is `key` and hash `hash`.
    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let hit =
            |&i: &usize| self.slots[i].key_hash == hash && self.key_bytes(&self.slots[i]) == key;
        self.index
            .get(&hash)
            .filter(|i| hit(i))
            .or_else(|| self.collided.iter().find(|i| hit(i)))
            .copied()
    }

    /// Appends a listener (identity, then `wire`) in key order.
    fn push(&mut self, key: &[u8], wire: &[u8], key_hash: u64, digest: u64) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(wire);
        let i = self.slots.len();
        self.slots.push(Slot {
            start,
            key_len: key.len(),
            end: self.bytes.len(),
            key_hash,
            digest,
        });
        match self.index.entry(key_hash) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
            }
            std::collections::hash_map::Entry::Occupied(_) => self.collided.push(i),
        }
    }

    /// What differs from this state to `new` (as `listenscope_core::diff::diff` of the
    /// whole states would say), and `new` becomes the state. Unchanged listeners keep
    /// their stored encoding; only opened and changed ones are encoded.
    pub fn advance(&mut self, new: &State) -> Changes {
        let mut next = Base::empty(self.hasher.clone(), new.len(), self.bytes.len());
        let mut out = Changes::default();
        let mut seen = vec![false; self.slots.len()];
        let mut key = Vec::with_capacity(128);
        let mut wire = Vec::with_capacity(512);
        for (k, r) in new {
            key.clear();
            identity(k, &mut key);
            let key_hash = self.hasher.hash_one(k);
            let digest = self.hasher.hash_one(r);
            match self.find(key_hash, &key) {
                Some(i) => {
                    seen[i] = true;
                    let old = self.slots[i];
                    if old.digest == digest {
                        next.push(&key, self.wire(&old), key_hash, digest);
                        continue;
                    }
                    out.changed.push(r.clone());
                }
                None => out.opened.push(r.clone()),
            }
            wire.clear();
            v1::Listener::from(r).encode_raw(&mut wire);
            next.push(&key, &wire, key_hash, digest);
        }
        // The old slots are in key order, so the closed keys are too.
        for (i, s) in self.slots.iter().enumerate() {
            if !seen[i]
                && let Some(r) = decode(self.wire(s))
            {
                out.closed.push(r.key);
            }
        }
        *self = next;
        out
    }

    /// The whole state, decoded. An encoding that no longer decodes (it was made by this
    /// process from a valid record, so only a bug does that) is left out and logged: the
    /// snapshot then lacks that listener, and the next scan opens it again.
    pub fn to_state(&self) -> State {
        self.slots
            .iter()
            .filter_map(|s| decode(self.wire(s)))
            .map(|r| (r.key.clone(), r))
            .collect()
    }

    /// The listeners' wire encodings (`v1::Listener`), in key order.
    pub fn encoded(&self) -> impl Iterator<Item = &[u8]> {
        self.slots.iter().map(|s| self.wire(s))
    }
}

fn decode(wire: &[u8]) -> Option<ListenerRecord> {
    match v1::Listener::decode(wire)
        .map_err(|e| e.to_string())
        .and_then(|l| ListenerRecord::try_from(l).map_err(|e| e.to_string()))
    {
        Ok(r) => Some(r),
        Err(why) => {
            tracing::error!(error = %why, "A kept listener does not decode; it is left out.");
            None
        }
    }
}

/// An unambiguous byte encoding of a key (every field, lengths before strings): equal
/// bytes ⇔ equal keys. Only compared, never decoded.
fn identity(k: &ListenerKey, out: &mut Vec<u8>) {
    let text = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    text(out, &k.netns);
    out.push(k.protocol as u8);
    out.push(k.family as u8);
    match k.address {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&k.port.to_le_bytes());
    match &k.interface {
        None => out.push(0),
        Some(i) => {
            out.push(1);
            text(out, i);
        }
    }
    out.push(match k.v6only {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use listenscope_core::diff::diff;
    use listenscope_core::record::testkit::record;

    fn state(records: &[ListenerRecord]) -> State {
        records.iter().map(|r| (r.key.clone(), r.clone())).collect()
    }

    #[test]
    fn advance_says_what_the_whole_diff_says() {
        let a = record("host", "0.0.0.0", 22, None);
        let b = record("host", "::", 80, Some(false));
        let c = record("web", "127.0.0.1", 8080, None);
        let mut b2 = b.clone();
        b2.sockets = 4;
        let mut c2 = c.clone();
        c2.processes.clear();
        let d = record("web", "::1", 53, Some(true));
        let steps = [
            state(&[]),
            state(&[a.clone(), b.clone()]),
            state(&[a.clone(), b.clone()]),
            state(&[a.clone(), b2.clone(), c.clone()]),
            state(&[b2.clone(), c2.clone(), d.clone()]),
            state(std::slice::from_ref(&d)),
            state(&[]),
        ];
        let mut base = Base::new(&steps[0]);
        for w in steps.windows(2) {
            let got = base.advance(&w[1]);
            assert_eq!(
                got,
                diff(&w[0], &w[1]),
                "{:?} → {:?}",
                w[0].keys(),
                w[1].keys()
            );
            assert_eq!(base.to_state(), w[1]);
            assert_eq!(base.len(), w[1].len());
            assert_eq!(base.encoded().count(), w[1].len());
        }
    }

    #[test]
    fn keys_with_one_hash_are_told_apart() {
        let mut base = Base::empty(RandomState::new(), 2, 0);
        base.push(b"key-a", b"wire-a", 7, 1);
        base.push(b"key-b", b"wire-b", 7, 2);
        base.push(b"key-c", b"wire-c", 8, 3);
        assert_eq!(base.find(7, b"key-a"), Some(0));
        assert_eq!(base.find(7, b"key-b"), Some(1));
        assert_eq!(base.find(8, b"key-c"), Some(2));
        assert_eq!(base.find(7, b"key-c"), None);
        assert_eq!(base.find(9, b"key-a"), None);
        assert_eq!(
            base.encoded().collect::<Vec<_>>(),
            [b"wire-a", b"wire-b", b"wire-c"]
        );
    }

    #[test]
    fn identities_differ_with_every_field() {
        let base = record("host", "::", 80, Some(false)).key;
        let mut variants = vec![base.clone()];
        let mut k = base.clone();
        k.netns = "hos".into();
        variants.push(k);
        let mut k = base.clone();
        k.protocol = listenscope_core::domain::Protocol::Udp;
        variants.push(k);
        let mut k = base.clone();
        k.address = "::1".parse().unwrap();
        variants.push(k);
        let mut k = base.clone();
        k.port = 81;
        variants.push(k);
        let mut k = base.clone();
        k.interface = Some(String::new());
        variants.push(k);
        let mut k = base.clone();
        k.v6only = Some(true);
        variants.push(k);
        let mut k = base.clone();
        k.v6only = None;
        variants.push(k);
        let mut k = record("host", "0.0.0.0", 80, None).key;
        k.family = base.family;
        variants.push(k);
        let ids: std::collections::BTreeSet<Vec<u8>> = variants
            .iter()
            .map(|k| {
                let mut out = Vec::new();
                identity(k, &mut out);
                out
            })
            .collect();
        assert_eq!(ids.len(), variants.len());
    }

    #[test]
    fn a_record_round_trips_through_its_encoding() {
        let mut r = record("ns-ü", "::", 443, Some(false));
        r.unit = Some("apache2.service".into());
        r.cgroup = Some("/system.slice/apache2.service".into());
        r.freebind = Some(true);
        let s = state(&[r]);
        assert_eq!(Base::new(&s).to_state(), s);
    }
}
