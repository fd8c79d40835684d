//! Stable fingerprints of a listener record: what the collector stores to tell a material
//! change (a new history version) from churn (refreshed in place) without comparing every
//! column.
//!
//! History is the product, so a fingerprint must never change unless the record does: not
//! with a serde or hasher upgrade, a field rename or a compiler version. Each fingerprint is
//! therefore the first 8 bytes (big-endian, as `i64`) of the SHA-256 of a canonical byte
//! encoding written out field by field below, in a fixed order, with fixed codes for
//! every enum. The encoding is specified in `docs/fingerprints.md`; the tests pin known
//! values, so any change to it fails loudly. Changing it on purpose means a new
//! [`SCHEME`] name, and the collector recomputes the stored fingerprints of live rows
//! when it opens a database written under another scheme.
//!
//! Rejected: hashing serde_json output (field names and serializer write splitting leak
//! into the value) and `std::hash::Hasher` (padding and order are implementation details).
//!
//! Scheme history: `sha256-canonical-v1` had no firewall verdicts. `sha256-canonical-v2`
//! (this one) appends the verdicts and their conditions to the material encoding and the
//! verdicts' reasons to the rest, under new tags; everything v1 encoded is encoded the
//! same way before them.

use ring::digest;

use crate::domain::{Effective, Reach, Source};
use crate::record::ListenerRecord;

/// Name of the encoding and hash, stored beside the fingerprints.
pub const SCHEME: &str = "sha256-canonical-v2";

const MATERIAL_TAG: &[u8] = b"listenscope.material.v2\0";
const FULL_TAG: &[u8] = b"listenscope.full.v2\0";

/// The two fingerprints of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprints {
    /// Over the material fields ([`ListenerRecord::material`]): differs ⇒ a new version.
    pub material: i64,
    /// Over every non-key field: differs (material equal) ⇒ refresh in place.
    pub full: i64,
}

/// Both fingerprints of `r`, from one encoding pass.
pub fn fingerprints(r: &ListenerRecord) -> Fingerprints {
    let mut buf = Vec::with_capacity(256 + r.processes.len() * 64);
    encode_material(r, &mut buf);
    let material = hash(&buf);
    encode_rest(r, &mut buf);
    Fingerprints {
        material,
        full: hash(&buf),
    }
}

fn hash(bytes: &[u8]) -> i64 {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    i64::from_be_bytes(first)
}

/// The material fields, in this order (see docs/fingerprints.md).
pub fn encode_material(r: &ListenerRecord, out: &mut Vec<u8>) {
    let m = r.material();
    out.extend_from_slice(MATERIAL_TAG);
    out.push(reach_code(m.reach.0));
    out.push(reach_code(m.reach.1));
    out.push(u8::from(m.latent));
    put_str(out, m.shown_as);
    put_str(out, m.netstat_proto);
    out.push(u8::from(m.trap));
    out.push(u8::from(m.hidden_ipv4_exposure));
    put_strs(out, &m.process_names);
    put_strs(out, &m.users);
    match m.container {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            put_str(out, &c.runtime);
            put_str(out, &c.id);
            put_opt_str(out, c.pod_uid.as_deref());
        }
    }
    put_opt_str(out, m.unit);
    put_opt_str(out, m.cgroup);
    out.extend_from_slice(&m.uid.to_le_bytes());
    put_opt_bool(out, m.sockopts.0);
    put_opt_bool(out, m.sockopts.1);
    out.push(match m.source {
        Source::SockDiag => 1,
        Source::Procfs => 2,
    });
    out.push(effective_code(m.effective.0));
    out.push(effective_code(m.effective.1));
    put_strs(out, &m.conditions.0);
    put_strs(out, &m.conditions.1);
}

/// The fields that are not material, appended after the material ones.
fn encode_rest(r: &ListenerRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(FULL_TAG);
    out.extend_from_slice(&r.netns_inode.to_le_bytes());
    put_len(out, r.processes.len());
    for p in &r.processes {
        out.extend_from_slice(&p.pid.to_le_bytes());
        put_str(out, &p.comm);
        put_str(out, &p.cmdline);
        put_str(out, &p.user);
    }
    out.extend_from_slice(&r.sockets.to_le_bytes());
    put_str(out, &r.effective_ipv4.reason);
    put_str(out, &r.effective_ipv6.reason);
}

/// Fixed codes (the same numbers as the protobuf enum, written out so that neither can
/// move the other).
fn reach_code(r: Reach) -> u8 {
    match r {
        Reach::Any => 1,
        Reach::Loopback => 2,
        Reach::Specific => 3,
        Reach::None => 4,
        Reach::Unknown => 5,
    }
}

/// Fixed codes for the firewall verdicts (the names' order in `docs/fingerprints.md`).
fn effective_code(e: Effective) -> u8 {
    match e {
        Effective::Open => 1,
        Effective::Filtered => 2,
        Effective::Restricted => 3,
        Effective::Unknown => 4,
        Effective::Diverted => 5,
        Effective::NotApplicable => 6,
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Every length is bounded far below 4 GiB by the wire limits; saturate rather than wrap.
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_strs(out: &mut Vec<u8>, v: &[&str]) {
    put_len(out, v.len());
    for s in v {
        put_str(out, s);
    }
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn put_opt_bool(out: &mut Vec<u8>, b: Option<bool>) {
    out.push(match b {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Container, ProcessInfo};
    use crate::record::FirewallAnswer;
    use crate::record::testkit::{record, restricted};

    /// Pinned values of [`SCHEME`] `sha256-canonical-v2`: if this fails, stored history
    /// would be rewritten by the change. Never update these numbers; introduce a new
    /// SCHEME (and its pins) instead: the collector then recomputes the fingerprints of
    /// live rows (`store::flow::upgrade_fingerprints`). The Python reference in
    /// `docs/fingerprints.md` reproduces them.
    #[test]
    fn pinned_values() {
        assert_eq!(
            SCHEME, "sha256-canonical-v2",
            "new pins belong to a new scheme"
        );
        let r = record("host", "::", 80, Some(false));
        let f = fingerprints(&r);
        assert_eq!(
            (f.material, f.full),
            (PINNED_PLAIN.0, PINNED_PLAIN.1),
            "{f:?}"
        );
        let mut c = record("net:[4026532999]", "10.0.0.5", 8443, None);
        c.container = Some(Container {
            runtime: "docker".into(),
            id: "0123abcd".into(),
            pod_uid: Some("pod-1".into()),
        });
        c.unit = None;
        c.freebind = None;
        c.transparent = Some(true);
        c.source = Source::Procfs;
        c.reach_ipv6 = Reach::None;
        c.processes.push(ProcessInfo {
            pid: 7,
            comm: "envoy".into(),
            cmdline: "envoy -c /etc/envoy.yaml".into(),
            user: "envoy".into(),
        });
        c.processes.sort_by_key(|p| p.pid);
        c.sockets = 3;
        // Given out of order: the encoding sorts them.
        c.effective_ipv4 = restricted(
            "inet filter input handle 7: tcp dport 8443 accept",
            &["saddr 198.51.100.0/24", "iifname eth0 and sport 67"],
        );
        c.effective_ipv6 =
            FirewallAnswer::new(Effective::NotApplicable, "the socket accepts no IPv6");
        let f = fingerprints(&c);
        assert_eq!(
            (f.material, f.full),
            (PINNED_CONTAINER.0, PINNED_CONTAINER.1),
            "{f:?}"
        );
        // A record from an agent that reports no verdicts (`unknown`, no conditions).
        let mut old = record("host", "0.0.0.0", 22, None);
        old.effective_ipv4 = FirewallAnswer::not_reported();
        old.effective_ipv6 = FirewallAnswer::not_reported();
        let f = fingerprints(&old);
        assert_eq!(
            (f.material, f.full),
            (PINNED_NOT_REPORTED.0, PINNED_NOT_REPORTED.1),
            "{f:?}"
        );
    }

    const PINNED_PLAIN: (i64, i64) = (-7963566737358449449, 6026630409606192952);
    const PINNED_CONTAINER: (i64, i64) = (6426743305424310213, -5703959065850398486);
    const PINNED_NOT_REPORTED: (i64, i64) = (-3998476445158820558, -2317814882638059925);
    // Retired with sha256-canonical-v1 (no verdicts): the same first two records gave
    // (4891275540642266133, -3942253405428012873) and
    // (-8920729506479057747, 173973763286239568).

    /// The exact bytes of a small record, so the documented layout is the implemented one.
    #[test]
    fn layout_matches_the_doc() {
        let mut r = record("host", "::", 80, Some(false));
        r.processes.clear();
        r.unit = None;
        r.cgroup = None;
        r.shown_as = ":::80".into();
        r.effective_ipv4 = restricted("x", &["b", "a"]);
        r.effective_ipv6.verdict = Effective::Filtered;
        let mut b = Vec::new();
        encode_material(&r, &mut b);
        let mut want = MATERIAL_TAG.to_vec();
        assert_eq!(want, b"listenscope.material.v2\0");
        want.extend([1, 1, 0]); // reach any/any, not latent
        want.extend([5, 0, 0, 0]);
        want.extend(b":::80");
        want.extend([4, 0, 0, 0]);
        want.extend(b"tcp6");
        want.extend([1, 1]); // trap, hidden
        want.extend([0, 0, 0, 0, 0, 0, 0, 0]); // no names, no users
        want.extend([0, 0, 0]); // no container, unit, cgroup
        want.extend([0, 0, 0, 0]); // uid 0
        want.extend([1, 1, 1]); // freebind false, transparent false, sock_diag
        want.extend([3, 2]); // restricted over IPv4, filtered over IPv6
        want.extend([2, 0, 0, 0, 1, 0, 0, 0, b'a', 1, 0, 0, 0, b'b']); // sorted
        want.extend([0, 0, 0, 0]); // no IPv6 conditions
        assert_eq!(b, want);
        // The rest: after the socket count, the two reasons.
        r.effective_ipv6.reason = "p".into();
        let mut full = Vec::new();
        encode_material(&r, &mut full);
        let material_len = full.len();
        encode_rest(&r, &mut full);
        let rest = &full[material_len..];
        assert!(rest.starts_with(b"listenscope.full.v2\0"));
        assert!(rest.ends_with(&[1, 0, 0, 0, 1, 0, 0, 0, b'x', 1, 0, 0, 0, b'p']));
    }

    #[test]
    fn churn_changes_only_the_full_fingerprint() {
        let a = record("host", "::", 80, Some(false));
        let mut b = a.clone();
        b.processes[0].pid = 4242;
        b.sockets = 2;
        let (fa, fb) = (fingerprints(&a), fingerprints(&b));
        assert_eq!(fa.material, fb.material);
        assert_ne!(fa.full, fb.full);
        // A ruleset reload renumbers the deciding rule's handle: churn.
        let mut reload = a.clone();
        reload.effective_ipv4.reason = "inet filter input handle 9: accept".into();
        let fr = fingerprints(&reload);
        assert_eq!(fr.material, fa.material);
        assert_ne!(fr.full, fa.full);
        // A ruleset change that closes the port: history.
        let mut closed = a.clone();
        closed.effective_ipv4 = FirewallAnswer::new(Effective::Filtered, "policy drop");
        assert_ne!(fingerprints(&closed).material, fa.material);
        let mut c = a.clone();
        c.reach_ipv4 = Reach::None;
        assert_ne!(fingerprints(&c).material, fa.material);
        // Adjacent strings cannot trade bytes (length prefixes).
        let mut d = a.clone();
        d.unit = Some("ab".into());
        d.cgroup = Some("c".into());
        let mut e = a.clone();
        e.unit = Some("a".into());
        e.cgroup = Some("bc".into());
        assert_ne!(fingerprints(&d).material, fingerprints(&e).material);
        // Nor can the two versions' conditions.
        let mut g = a.clone();
        g.effective_ipv4 = restricted("r", &["saddr 10.0.0.0/8"]);
        g.effective_ipv6 = restricted("r", &[]);
        let mut h = a.clone();
        h.effective_ipv4 = restricted("r", &[]);
        h.effective_ipv6 = restricted("r", &["saddr 10.0.0.0/8"]);
        assert_ne!(fingerprints(&g).material, fingerprints(&h).material);
    }
}
