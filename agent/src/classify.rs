//! The classifier: what a listening socket really accepts, and what netstat shows for it.
//!
//! Pure functions over plain values; the spec is `docs/kernel.md` ("Reach of a
//! listening socket" and "What the usual tools show"). Every row of those tables is a
//! one-line case in the tests below. Nothing here reads the system: the OS layer hands in
//! the socket as the kernel reported it and the namespace's local addresses.

use std::fmt::Write as _;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::fasthash::FastSet;
use crate::model::{
    Classification, Family, Ipv6Facts, Ipv6State, LocalAddrs, Protocol, RawSocket, Reach,
};

/// ifindex of `lo` in every network namespace (`LOOPBACK_IFINDEX` in the kernel).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Classifies one socket. `local` is the namespace's local table; `None` means it could not
/// be read, and then a bound address is taken as local (latent is not judged). `ipv6` is
/// whether the namespace's interfaces take IPv6 ([`ipv6_state`]); it caps `reach_ipv6`.
pub fn classify(s: &RawSocket, local: Option<&LocalAddrs>, ipv6: Ipv6State) -> Classification {
    let (mut reach_ipv4, mut reach_ipv6, is_local) = reach(s, local);
    reach_ipv6 = match ipv6 {
        Ipv6State::Enabled => reach_ipv6,
        Ipv6State::LoopbackOnly => narrow_to_loopback(reach_ipv6),
        // Unknown stays unknown: what is not known is not claimed either way.
        Ipv6State::Disabled | Ipv6State::Unavailable if reach_ipv6 == Reach::Unknown => {
            Reach::Unknown
        }
        Ipv6State::Disabled | Ipv6State::Unavailable => Reach::None,
    };
    let latent = !is_local;
    if latent {
        reach_ipv4 = Reach::None;
        reach_ipv6 = Reach::None;
    } else if s.ifindex == LOOPBACK_IFINDEX {
        // SO_BINDTODEVICE=lo: only traffic that arrives on lo, i.e. from this namespace.
        reach_ipv4 = narrow_to_loopback(reach_ipv4);
        reach_ipv6 = narrow_to_loopback(reach_ipv6);
    }
    Classification {
        reach_ipv4,
        reach_ipv6,
        latent,
        shown_as: netstat_local_address(s.address, s.port),
        netstat_proto: netstat_proto(s.protocol, s.family),
        trap: s.family == Family::Ipv6 && reach_ipv4.accepts(),
    }
}

/// An IPv6 address on an interface other than `lo` proves that interface takes IPv6
/// (the kernel removes every address of an interface whose `disable_ipv6` is set, and
/// refuses new ones), so the namespace is [`Ipv6State::Enabled`] without reading a sysctl.
/// This is the usual case; only when it is false are the sysctls read.
pub fn ipv6_on_a_non_loopback_interface(local: &LocalAddrs) -> bool {
    local
        .v6
        .iter()
        .any(|&(_, _, oif)| oif != 0 && oif != LOOPBACK_IFINDEX)
}

/// The namespace's [`Ipv6State`] from `net.ipv6.conf.<if>.disable_ipv6` of each of its
/// interfaces, as (interface name, disabled); `all` and `default` are not interfaces and
/// must not be in the list (the kernel copies `all` into every interface when it is
/// written, but an interface can be enabled again afterwards: only the per-interface
/// value decides, docs/kernel.md).
///
/// [`Ipv6State::LoopbackOnly`] needs another interface with IPv6 disabled: a namespace
/// whose only interface is `lo` is not limited by a sysctl, and its IPv4 is not narrowed
/// either (reach is about what the socket and the namespace's settings accept, not about
/// which links exist today).
pub fn ipv6_state(interfaces: &[(String, bool)]) -> Ipv6Facts {
    let enabled: Vec<&str> = interfaces
        .iter()
        .filter(|(_, disabled)| !disabled)
        .map(|(name, _)| name.as_str())
        .collect();
    let disabled = || {
        let mut names: Vec<&str> = interfaces
            .iter()
            .filter(|(_, disabled)| *disabled)
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        const SHOWN: usize = 8;
        let mut list = names
            .iter()
            .take(SHOWN)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if names.len() > SHOWN {
            let _ = write!(list, " and {} more", names.len() - SHOWN);
        }
        list
    };
    let only_lo = interfaces.iter().all(|(name, _)| name == "lo");
    match enabled.as_slice() {
        [] => Ipv6Facts {
            state: Ipv6State::Disabled,
            reason: Some(format!(
                "net.ipv6.conf.IF.disable_ipv6 is 1 on every interface ({}): IPv6 packets \
                 are dropped on arrival and there is no IPv6 address, not even ::1",
                disabled()
            )),
        },
        ["lo"] if !only_lo => Ipv6Facts {
            state: Ipv6State::LoopbackOnly,
            reason: Some(format!(
                "net.ipv6.conf.IF.disable_ipv6 is 1 on every interface but lo ({}): IPv6 \
                 works inside the namespace only",
                disabled()
            )),
        },
        _ => Ipv6Facts {
            state: Ipv6State::Enabled,
            reason: None,
        },
    }
}

fn narrow_to_loopback(r: Reach) -> Reach {
    match r {
        Reach::Any | Reach::Specific => Reach::Loopback,
        other => other,
    }
}

/// (reach over IPv4, reach over IPv6, bound address is local) before latent/device narrowing.
fn reach(s: &RawSocket, local: Option<&LocalAddrs>) -> (Reach, Reach, bool) {
    match s.address {
        IpAddr::V4(a) => (reach_v4_addr(a), Reach::None, v4_is_local(a, local)),
        IpAddr::V6(a) if a.is_unspecified() => {
            let v4 = match s.v6only {
                Some(false) => Reach::Any,
                Some(true) => Reach::None,
                None => Reach::Unknown,
            };
            (v4, Reach::Any, true)
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            // v4-mapped binds force v6only=0 and never accept IPv6.
            Some(v4) => (reach_v4_addr(v4), Reach::None, v4_is_local(v4, local)),
            // Any other specific IPv6 bind forces v6only=1.
            None => {
                let r6 = if a.is_loopback() {
                    Reach::Loopback
                } else {
                    Reach::Specific
                };
                (Reach::None, r6, v6_is_local(a, s.ifindex, local))
            }
        },
    }
}

fn reach_v4_addr(a: Ipv4Addr) -> Reach {
    if a.is_unspecified() {
        Reach::Any
    } else if a.is_loopback() {
        Reach::Loopback
    } else {
        Reach::Specific
    }
}

/// Wildcards, multicast groups and broadcast are never "not local": only unicast binds can
/// be latent.
fn v4_is_local(a: Ipv4Addr, local: Option<&LocalAddrs>) -> bool {
    if a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
        return true;
    }
    local.is_none_or(|l| l.contains_v4(a))
}

fn v6_is_local(a: Ipv6Addr, ifindex: u32, local: Option<&LocalAddrs>) -> bool {
    if a.is_unspecified() || a.is_multicast() {
        return true;
    }
    local.is_none_or(|l| l.contains_v6(a, ifindex))
}

/// netstat's Proto column: `tcp`/`udp` for AF_INET sockets, `tcp6`/`udp6` for AF_INET6.
pub fn netstat_proto(protocol: Protocol, family: Family) -> &'static str {
    match (protocol, family) {
        (Protocol::Tcp, Family::Ipv4) => "tcp",
        (Protocol::Tcp, Family::Ipv6) => "tcp6",
        (Protocol::Udp, Family::Ipv4) => "udp",
        (Protocol::Udp, Family::Ipv6) => "udp6",
    }
}

/// Exactly what net-tools `netstat -tuln` prints in the Local Address column.
///
/// net-tools formats the address with glibc `inet_ntop`, except that a v4-mapped address is
/// printed as plain IPv4, then cuts the address so that `addr:port` fits 23 columns
/// (`tcp_do_one`: `if (strlen(addr) + strlen(port) > 22) addr[22 - strlen(port)] = 0`).
pub fn netstat_local_address(address: IpAddr, port: u16) -> String {
    // Hot path (once per socket per scan): no `to_string`/`format!` machinery.
    let mut s = String::with_capacity(48);
    match address {
        IpAddr::V4(a) => push_v4(&mut s, a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => push_v4(&mut s, v4),
            None => s.push_str(&glibc_ntop6(a)),
        },
    }
    let mut digits = [0u8; 5];
    let port = decimal(u32::from(port), &mut digits);
    if s.len() + port.len() > 22 {
        s.truncate(22 - port.len());
    }
    s.push(':');
    s.push_str(port);
    s
}

fn push_v4(s: &mut String, a: Ipv4Addr) {
    let mut digits = [0u8; 5];
    for (i, o) in a.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(decimal(u32::from(o), &mut digits));
    }
}

/// `n` (< 100000) in decimal, written into `buf`.
fn decimal(mut n: u32, buf: &mut [u8; 5]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    // Only ASCII digits were written above: always valid UTF-8.
    #[allow(clippy::expect_used)]
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

/// glibc's `inet_ntop(AF_INET6)`: longest zero run (first on ties, at least two words)
/// becomes `::`, and addresses whose first 96 bits are zero (but not `::`/`::1`-like runs of
/// seven) or that are `::ffff:0:0/96` end in dotted IPv4. Rust's `Display` differs for
/// `::a00:5` (glibc: `::10.0.0.5`), which netstat users see.
pub fn glibc_ntop6(a: Ipv6Addr) -> String {
    let w = a.segments();
    // (start word, run length) of the best and the current run of zero words.
    type Run = Option<(usize, usize)>;
    let (mut best, mut cur): (Run, Run) = (None, None);
    for (i, &word) in w.iter().enumerate() {
        if word == 0 {
            cur = Some(match cur {
                Some((base, len)) => (base, len + 1),
                None => (i, 1),
            });
        } else if let Some(c) = cur.take()
            && best.is_none_or(|b| c.1 > b.1)
        {
            best = Some(c);
        }
    }
    if let Some(c) = cur
        && best.is_none_or(|b| c.1 > b.1)
    {
        best = Some(c);
    }
    let best = best.filter(|b| b.1 >= 2);

    let mut out = String::with_capacity(40);
    let mut i = 0;
    while i < 8 {
        if let Some((base, len)) = best
            && i >= base
            && i < base + len
        {
            if i == base {
                out.push(':');
            }
            i += 1;
            continue;
        }
        if i != 0 {
            out.push(':');
        }
        if i == 6
            && let Some((0, len)) = best
            && (len == 6 || (len == 5 && w[5] == 0xffff))
        {
            let o = a.octets();
            let _ = write!(out, "{}.{}.{}.{}", o[12], o[13], o[14], o[15]);
            return out;
        }
        let _ = write!(out, "{:x}", w[i]);
        i += 1;
    }
    if let Some((base, len)) = best
        && base + len == 8
    {
        out.push(':');
    }
    out
}

/// The (namespace, protocol, port) groups that are reachable over IPv4 from off the host
/// while netstat shows only IPv6 lines (`tcp6`/`udp6`) for them: the fleet's headline question.
///
/// Input: one `(group key, socket family, reach over IPv4)` per socket.
pub fn hidden_ipv4_groups<K, I>(sockets: I) -> FastSet<K>
where
    K: Eq + Hash + Clone,
    I: IntoIterator<Item = (K, Family, Reach)>,
{
    let mut has_v4_line = FastSet::default();
    let mut exposed = FastSet::default();
    for (key, family, reach_ipv4) in sockets {
        match family {
            Family::Ipv4 => {
                has_v4_line.insert(key);
            }
            Family::Ipv6 if reach_ipv4.exposed() => {
                exposed.insert(key);
            }
            Family::Ipv6 => {}
        }
    }
    exposed.retain(|k| !has_v4_line.contains(k));
    exposed
}

#[cfg(test)]
mod tests {
    use super::*;

    use Reach::{Any, Loopback, None as No, Specific, Unknown};

    /// A namespace with 10.0.0.5/24 and fd00::5/64 on ifindex 2, fe80::5 on ifindex 2,
    /// loopback, and an AnyIP route for 192.0.2.0/24.
    fn ns() -> LocalAddrs {
        LocalAddrs {
            v4: vec![
                ("127.0.0.0".parse().unwrap(), 8),
                ("10.0.0.5".parse().unwrap(), 32),
                ("192.0.2.0".parse().unwrap(), 24),
            ],
            v6: vec![
                ("::1".parse().unwrap(), 128, 1),
                ("fd00::5".parse().unwrap(), 128, 2),
                ("fe80::5".parse().unwrap(), 128, 2),
            ],
        }
    }

    fn sock(proto: Protocol, addr: &str, v6only: Option<bool>, ifindex: u32) -> RawSocket {
        let address: IpAddr = addr.parse().unwrap();
        RawSocket {
            protocol: proto,
            family: if address.is_ipv4() {
                Family::Ipv4
            } else {
                Family::Ipv6
            },
            address,
            port: 80,
            v6only,
            ifindex,
            freebind: Some(false),
            transparent: Some(false),
            uid: 0,
            inode: 1,
            cgroup_id: None,
        }
    }

    /// One case: (bound address, v6only, ifindex) → (reach v4, reach v6, latent, shown_as, trap).
    #[track_caller]
    fn check(
        addr: &str,
        v6only: Option<bool>,
        ifindex: u32,
        expect: (Reach, Reach, bool, &str, bool),
    ) {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let c = classify(
                &sock(proto, addr, v6only, ifindex),
                Some(&ns()),
                Ipv6State::Enabled,
            );
            let got = (
                c.reach_ipv4,
                c.reach_ipv6,
                c.latent,
                c.shown_as.as_str(),
                c.trap,
            );
            assert_eq!(got, expect, "{proto} {addr} v6only={v6only:?} if={ifindex}");
        }
    }

    // The reach table of docs/kernel.md, row by row, then its "shown as" table.
    #[test]
    fn reach_table() {
        // AF_INET 0.0.0.0 → every local IPv4 address, no IPv6.
        check("0.0.0.0", None, 0, (Any, No, false, "0.0.0.0:80", false));
        // AF_INET 127.x.y.z → only that loopback address.
        check(
            "127.0.0.1",
            None,
            0,
            (Loopback, No, false, "127.0.0.1:80", false),
        );
        check(
            "127.0.0.53",
            None,
            0,
            (Loopback, No, false, "127.0.0.53:80", false),
        );
        // AF_INET specific.
        check(
            "10.0.0.5",
            None,
            0,
            (Specific, No, false, "10.0.0.5:80", false),
        );
        // AF_INET6 :: v6only=0 → both: the trap.
        check("::", Some(false), 0, (Any, Any, false, ":::80", true));
        // AF_INET6 :: v6only=1 → IPv6 only; netstat prints the same.
        check("::", Some(true), 0, (No, Any, false, ":::80", false));
        // AF_INET6 ::ffff:a.b.c.d → only that IPv4 address, no IPv6.
        check(
            "::ffff:10.0.0.5",
            Some(false),
            0,
            (Specific, No, false, "10.0.0.5:80", true),
        );
        // AF_INET6 ::ffff:0.0.0.0 → every IPv4 address, no IPv6.
        check(
            "::ffff:0.0.0.0",
            Some(false),
            0,
            (Any, No, false, "0.0.0.0:80", true),
        );
        // AF_INET6 ::1 / specific / link-local → only that IPv6 address.
        check("::1", Some(true), 0, (No, Loopback, false, "::1:80", false));
        check(
            "fd00::5",
            Some(true),
            0,
            (No, Specific, false, "fd00::5:80", false),
        );
        check(
            "fe80::5",
            Some(true),
            2,
            (No, Specific, false, "fe80::5:80", false),
        );
        // v4-mapped loopback.
        check(
            "::ffff:127.0.0.1",
            Some(false),
            0,
            (Loopback, No, false, "127.0.0.1:80", true),
        );
    }

    /// One case under a namespace IPv6 state: (address, v6only, ifindex) → (v4, v6, trap).
    #[track_caller]
    fn check_ipv6(
        state: Ipv6State,
        addr: &str,
        v6only: Option<bool>,
        expect: (Reach, Reach, bool),
    ) {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let c = classify(&sock(proto, addr, v6only, 0), Some(&ns()), state);
            assert_eq!(
                (c.reach_ipv4, c.reach_ipv6, c.trap),
                expect,
                "{proto} {addr} v6only={v6only:?} {state:?}"
            );
        }
    }

    // docs/kernel.md, "IPv6 disabled in a namespace": the namespace caps IPv6 reach and
    // leaves IPv4 alone (a dual-stack socket still takes IPv4: still the trap).
    #[test]
    fn namespace_without_ipv6() {
        use Ipv6State::{Disabled, Enabled, LoopbackOnly, Unavailable};
        for state in [Disabled, Unavailable] {
            check_ipv6(state, "::", Some(false), (Any, No, true));
            check_ipv6(state, "::", Some(true), (No, No, false));
            check_ipv6(state, "::", None, (Unknown, No, false));
            check_ipv6(state, "::1", Some(true), (No, No, false));
            check_ipv6(state, "fd00::5", Some(true), (No, No, false));
            check_ipv6(state, "::ffff:10.0.0.5", Some(false), (Specific, No, true));
            check_ipv6(state, "0.0.0.0", None, (Any, No, false));
        }
        check_ipv6(LoopbackOnly, "::", Some(false), (Any, Loopback, true));
        check_ipv6(LoopbackOnly, "::", Some(true), (No, Loopback, false));
        check_ipv6(LoopbackOnly, "::1", Some(true), (No, Loopback, false));
        check_ipv6(LoopbackOnly, "fd00::5", Some(true), (No, Loopback, false));
        check_ipv6(LoopbackOnly, "0.0.0.0", None, (Any, No, false));
        check_ipv6(Enabled, "::", Some(false), (Any, Any, true));
        check_ipv6(Enabled, "fd00::5", Some(true), (No, Specific, false));
    }

    #[track_caller]
    fn state_of(interfaces: &[(&str, bool)]) -> Ipv6Facts {
        let list: Vec<(String, bool)> = interfaces
            .iter()
            .map(|&(n, d)| (n.to_string(), d))
            .collect();
        ipv6_state(&list)
    }

    // Measured on Linux 6.18 (docs/kernel.md): only the per-interface value decides.
    #[test]
    fn ipv6_state_from_the_sysctls() {
        use Ipv6State::{Disabled, Enabled, LoopbackOnly};
        // all.disable_ipv6=1: written through to every interface.
        let f = state_of(&[("lo", true), ("eth0", true)]);
        assert_eq!(f.state, Disabled);
        assert_eq!(
            f.reason.as_deref(),
            Some(
                "net.ipv6.conf.IF.disable_ipv6 is 1 on every interface (eth0, lo): IPv6 packets \
                 are dropped on arrival and there is no IPv6 address, not even ::1"
            )
        );
        // Then lo enabled again: ::1 comes back, nothing from off the namespace.
        let f = state_of(&[("lo", false), ("eth0", true), ("eth1", true)]);
        assert_eq!(f.state, LoopbackOnly);
        assert_eq!(
            f.reason.as_deref(),
            Some(
                "net.ipv6.conf.IF.disable_ipv6 is 1 on every interface but lo (eth0, eth1): \
                 IPv6 works inside the namespace only"
            )
        );
        // Only lo exists and takes IPv6: nothing is disabled, nothing is narrowed.
        assert_eq!(state_of(&[("lo", false)]).state, Enabled);
        // Only lo exists and it is disabled: not even ::1.
        assert_eq!(state_of(&[("lo", true)]).state, Disabled);
        // One other interface enabled (even with lo disabled): it takes IPv6.
        assert_eq!(state_of(&[("lo", true), ("eth0", false)]).state, Enabled);
        assert_eq!(state_of(&[("lo", false), ("eth0", false)]).state, Enabled);
        assert_eq!(
            state_of(&[("lo", false), ("eth0", true), ("eth1", false)]),
            Ipv6Facts {
                state: Enabled,
                reason: None
            }
        );
        // A long list is cut.
        let many: Vec<(String, bool)> = (0..10)
            .map(|i| (format!("veth{i}"), true))
            .chain([("lo".to_string(), true)])
            .collect();
        let f = ipv6_state(&many);
        assert!(
            f.reason
                .as_deref()
                .is_some_and(|r| r
                    .contains("(lo, veth0, veth1, veth2, veth3, veth4, veth5, veth6 and 3 more)")),
            "{f:?}"
        );
    }

    #[test]
    fn an_ipv6_address_off_loopback_settles_it() {
        // The ns() namespace has fd00::5 on ifindex 2.
        assert!(ipv6_on_a_non_loopback_interface(&ns()));
        let only_lo = LocalAddrs {
            v4: vec![],
            v6: vec![("::1".parse().unwrap(), 128, 1)],
        };
        assert!(!ipv6_on_a_non_loopback_interface(&only_lo));
        assert!(!ipv6_on_a_non_loopback_interface(&LocalAddrs::default()));
    }

    #[test]
    fn v6only_unknown_is_never_guessed() {
        check("::", None, 0, (Unknown, Any, false, ":::80", false));
    }

    #[test]
    fn interface_bound() {
        // Bound to lo ⇒ loopback only, whatever the address.
        check(
            "0.0.0.0",
            None,
            1,
            (Loopback, No, false, "0.0.0.0:80", false),
        );
        check(
            "::",
            Some(false),
            1,
            (Loopback, Loopback, false, ":::80", true),
        );
        check(
            "10.0.0.5",
            None,
            1,
            (Loopback, No, false, "10.0.0.5:80", false),
        );
        // Bound to another device: still every address (reached through that device).
        check("0.0.0.0", None, 2, (Any, No, false, "0.0.0.0:80", false));
        check("::", Some(true), 2, (No, Any, false, ":::80", false));
    }

    #[test]
    fn latent() {
        // Not in the local table: accepts nothing yet.
        check("10.9.9.9", None, 0, (No, No, true, "10.9.9.9:80", false));
        check(
            "::ffff:10.9.9.9",
            Some(false),
            0,
            (No, No, true, "10.9.9.9:80", false),
        );
        check(
            "fd00::9",
            Some(true),
            0,
            (No, No, true, "fd00::9:80", false),
        );
        // A link-local address is local only on its own interface.
        check(
            "fe80::5",
            Some(true),
            3,
            (No, No, true, "fe80::5:80", false),
        );
        // AnyIP route: the whole prefix is local.
        check(
            "192.0.2.77",
            None,
            0,
            (Specific, No, false, "192.0.2.77:80", false),
        );
        // Loopback outside 127/8 routes is not special-cased: 127.x is local via the table.
        check(
            "127.255.0.1",
            None,
            0,
            (Loopback, No, false, "127.255.0.1:80", false),
        );
    }

    #[test]
    fn latent_not_judged_without_local_table() {
        let c = classify(
            &sock(Protocol::Tcp, "10.9.9.9", None, 0),
            None,
            Ipv6State::Enabled,
        );
        assert_eq!((c.reach_ipv4, c.latent), (Specific, false));
    }

    #[test]
    fn udp_multicast_and_broadcast_are_not_latent() {
        check(
            "224.0.0.251",
            None,
            0,
            (Specific, No, false, "224.0.0.251:80", false),
        );
        check(
            "255.255.255.255",
            None,
            0,
            (Specific, No, false, "255.255.255.255:80", false),
        );
        check(
            "ff02::fb",
            Some(true),
            2,
            (No, Specific, false, "ff02::fb:80", false),
        );
    }

    #[test]
    fn netstat_proto_column() {
        let c = classify(
            &sock(Protocol::Udp, "::", Some(false), 0),
            Some(&ns()),
            Ipv6State::Enabled,
        );
        assert_eq!(c.netstat_proto, "udp6");
        let c = classify(
            &sock(Protocol::Tcp, "0.0.0.0", None, 0),
            Some(&ns()),
            Ipv6State::Enabled,
        );
        assert_eq!(c.netstat_proto, "tcp");
    }

    #[track_caller]
    fn shown(addr: &str, port: u16, expect: &str) {
        assert_eq!(netstat_local_address(addr.parse().unwrap(), port), expect);
    }

    // Each expectation was read off real `netstat -tln` (net-tools 2.10) on this machine kind.
    #[test]
    fn netstat_forms() {
        shown("::", 1001, ":::1001");
        shown("::ffff:0.0.0.0", 1003, "0.0.0.0:1003");
        shown("::ffff:10.0.0.5", 1004, "10.0.0.5:1004");
        shown("fd00::5", 1007, "fd00::5:1007");
        shown("::1", 1008, "::1:1008");
        // Truncation: addr:port fits 23 columns.
        shown("fe80::1234:5678:9abc:def0", 1006, "fe80::1234:5678:9a:1006");
        shown(
            "fe80::1234:5678:9abc:def0",
            10006,
            "fe80::1234:5678:9:10006",
        );
        shown(
            "fd00:1234:5678:9abc:def0:1234:5678:9abc",
            1011,
            "fd00:1234:5678:9ab:1011",
        );
        // glibc inet_ntop forms.
        shown("::a00:5", 2000, "::10.0.0.5:2000");
        shown("::100", 2001, "::100:2001");
        shown("2001:db8::1", 2002, "2001:db8::1:2002");
        shown("2001:db8:0:0:1:0:0:1", 2003, "2001:db8::1:0:0:1:2003");
        shown("::ffff:0:a00:5", 2004, "::ffff:0:a00:5:2004");
        shown("64:ff9b::a00:5", 2005, "64:ff9b::a00:5:2005");
        shown("::2", 2006, "::2:2006");
    }

    #[test]
    fn ntop6_matches_glibc() {
        for (addr, expect) in [
            ("::", "::"),
            ("::1", "::1"),
            ("1::", "1::"),
            ("1:0:0:2::", "1:0:0:2::"),
            ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
            ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),
            ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),
            ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
        ] {
            assert_eq!(glibc_ntop6(addr.parse().unwrap()), expect, "{addr}");
        }
    }

    /// Differential: the hand-written form equals the C library's `inet_ntop` over every
    /// address whose eight words are each 0, 1, 0xffff or 0xa00 (65,536 addresses: every
    /// zero-run layout, the v4-mapped and v4-compatible forms glibc prints with dots).
    #[test]
    fn ntop6_matches_the_c_library_everywhere() {
        const WORDS: [u16; 4] = [0, 1, 0xffff, 0x0a00];
        for n in 0..4u32.pow(8) {
            let mut w = [0u16; 8];
            for (i, word) in w.iter_mut().enumerate() {
                *word = WORDS[(n / 4u32.pow(i as u32) % 4) as usize];
            }
            let a = Ipv6Addr::from(w);
            assert_eq!(glibc_ntop6(a), crate::os::libc_inet_ntop6(a), "{w:x?}");
        }
    }

    #[track_caller]
    fn hidden(sockets: &[(u16, Family, Reach)], expect: &[u16]) {
        let got = hidden_ipv4_groups(sockets.iter().copied());
        let mut got: Vec<u16> = got.into_iter().collect();
        got.sort_unstable();
        assert_eq!(got, expect);
    }

    #[test]
    fn hidden_ipv4_exposure_per_port() {
        use Family::{Ipv4, Ipv6};
        // Dual-stack :::80 alone: hidden.
        hidden(&[(80, Ipv6, Any)], &[80]);
        // nginx/sshd pattern: 0.0.0.0:22 + v6only :::22 → netstat shows a tcp line.
        hidden(&[(22, Ipv4, Any), (22, Ipv6, No)], &[]);
        // v6only alone: not reachable over IPv4.
        hidden(&[(443, Ipv6, No)], &[]);
        // v4-mapped specific on a tcp6 line: hidden.
        hidden(&[(8080, Ipv6, Specific)], &[8080]);
        // v4-mapped loopback: not exposed off the host.
        hidden(&[(9000, Ipv6, Loopback)], &[]);
        // Unknown v6only: not claimed.
        hidden(&[(53, Ipv6, Unknown)], &[]);
        // Reuseport group of a v6only and a dual-stack socket: hidden.
        hidden(&[(5000, Ipv6, No), (5000, Ipv6, Any)], &[5000]);
        // A v4 line on a loopback address still shows the port over IPv4 in netstat.
        hidden(&[(25, Ipv4, Loopback), (25, Ipv6, Any)], &[]);
    }
}
