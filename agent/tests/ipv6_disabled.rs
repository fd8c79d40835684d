//! A namespace whose interfaces have IPv6 disabled (`net.ipv6.conf.*.disable_ipv6`): what
//! `listenscope-agent scan --json` says a dual-stack `:::PORT` socket accepts agrees with
//! real IPv4 and IPv6 connects from a peer namespace over a veth (and from the namespace
//! itself for loopback), and the namespace says why (`namespaces[].ipv6`).
//! docs/kernel.md, "IPv6 disabled in a namespace", has the kernel facts these rely on.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use socket2::Socket;
use util::*;

const PORT: u16 = 8081;
/// A refused or dropped connect gives up after this; a working one answers at once.
const PROBE: Duration = Duration::from_secs(2);

fn at(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), PORT)
}

/// A dual-stack (v6only=0) TCP listener and UDP socket on `::`:PORT in the server namespace.
fn dual_stack(topo: &Topology) -> (Socket, Socket) {
    topo.server.enter(|| {
        (
            tcp_listener("::", PORT, Some(false)),
            udp_socket("::", PORT, Some(false)),
        )
    })
}

/// What really gets through, per (protocol, path).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    tcp_v4_from_peer: bool,
    tcp_v6_from_peer: bool,
    udp_v4_from_peer: bool,
    udp_v6_from_peer: bool,
    tcp_v6_loopback: bool,
    tcp_v4_loopback: bool,
}

fn probe(topo: &Topology, udp: &Socket) -> Seen {
    let (tcp_v4_from_peer, tcp_v6_from_peer, udp_v4_from_peer, udp_v6_from_peer) =
        topo.client.enter(|| {
            (
                tcp_connects(at(A_V4), PROBE),
                tcp_connects(at(A_V6), PROBE),
                udp_delivers(at(A_V4), udp, PROBE),
                udp_delivers(at(A_V6), udp, PROBE),
            )
        });
    let (tcp_v6_loopback, tcp_v4_loopback) = topo.server.enter(|| {
        (
            tcp_connects(at("::1"), PROBE),
            tcp_connects(at("127.0.0.1"), PROBE),
        )
    });
    Seen {
        tcp_v4_from_peer,
        tcp_v6_from_peer,
        udp_v4_from_peer,
        udp_v6_from_peer,
        tcp_v6_loopback,
        tcp_v4_loopback,
    }
}

/// The reach the connects show: `any` from the peer, `loopback` from the namespace only.
fn reach_seen(from_peer: bool, loopback: bool) -> &'static str {
    match (from_peer, loopback) {
        (true, _) => "any",
        (false, true) => "loopback",
        (false, false) => "none",
    }
}

/// The scan of the server namespace: (its `namespaces[]` entry, its tcp and udp listener).
fn scan(topo: &Topology) -> (Value, Value, Value) {
    let doc = scan_json(&["--netns", &topo.server.name]);
    let ns = doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == topo.server.name.as_str())
        .unwrap_or_else(|| panic!("no namespace entry: {doc}"))
        .clone();
    let one = |proto: &str| {
        let found = find(&doc, &topo.server.name, proto, PORT);
        assert_eq!(found.len(), 1, "{proto} :::{PORT} once: {doc}");
        found[0].clone()
    };
    (ns, one("tcp"), one("udp"))
}

/// The JSON says what the connects show, for both protocols; IPv4 is untouched (the
/// dual-stack socket is still the trap) and the IPv6 firewall verdict follows the reach.
#[track_caller]
fn agrees(seen: &Seen, tcp: &Value, udp: &Value) {
    assert!(seen.tcp_v4_from_peer && seen.udp_v4_from_peer, "{seen:?}");
    assert!(seen.tcp_v4_loopback, "{seen:?}");
    let tcp_v6 = reach_seen(seen.tcp_v6_from_peer, seen.tcp_v6_loopback);
    for l in [tcp, udp] {
        assert_eq!(l["reach_ipv4"], "any", "{l}");
        assert_eq!(l["trap"], true, "{l}");
        assert_eq!(l["hidden_ipv4_exposure"], true, "{l}");
        assert_eq!(l["effective_ipv4"], "open", "{l}");
    }
    assert_eq!(tcp["reach_ipv6"], tcp_v6, "seen {seen:?}: {tcp}");
    // UDP from the peer goes the way TCP from the peer goes (the same receive path).
    assert_eq!(seen.udp_v6_from_peer, seen.tcp_v6_from_peer, "{seen:?}");
    assert_eq!(udp["reach_ipv6"], tcp_v6, "seen {seen:?}: {udp}");
    if tcp_v6 != "any" {
        for l in [tcp, udp] {
            assert_eq!(l["effective_ipv6"], "n/a", "{l}");
            // The reason names the namespace, not the socket.
            let why = l["effective_reason"]["ipv6"].as_str().unwrap_or_default();
            assert!(why.contains("in this namespace"), "{l}");
        }
    }
}

/// `net.ipv6.conf.all.disable_ipv6=1`: written through to every interface, `lo` included.
/// Only IPv4 gets in, `::1` is gone, and the JSON says `reach_ipv6: none` with the reason.
#[test]
fn all_disabled_means_no_ipv6_at_all() {
    let topo = Topology::new();
    let (_tcp, udp) = dual_stack(&topo);
    topo.server.sysctl("net.ipv6.conf.all.disable_ipv6", "1");

    let seen = probe(&topo, &udp);
    assert!(!seen.tcp_v6_from_peer && !seen.tcp_v6_loopback, "{seen:?}");
    let (ns, tcp, udp_l) = scan(&topo);
    agrees(&seen, &tcp, &udp_l);
    assert_eq!(ns["ipv6"]["state"], "disabled", "{ns}");
    let reason = ns["ipv6"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("disable_ipv6 is 1 on every interface")
            && reason.contains("lo")
            && reason.contains(&topo.server_if),
        "{ns}"
    );
    assert_eq!(tcp["reach_ipv6"], "none");
}

/// All disabled, then `lo` enabled again: `::1` is back, nothing from off the namespace.
#[test]
fn only_loopback_enabled_means_loopback() {
    let topo = Topology::new();
    let (_tcp, udp) = dual_stack(&topo);
    topo.server.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    topo.server.sysctl("net.ipv6.conf.lo.disable_ipv6", "0");

    let seen = probe(&topo, &udp);
    assert!(!seen.tcp_v6_from_peer && seen.tcp_v6_loopback, "{seen:?}");
    let (ns, tcp, udp_l) = scan(&topo);
    agrees(&seen, &tcp, &udp_l);
    assert_eq!(ns["ipv6"]["state"], "loopback_only", "{ns}");
    assert_eq!(tcp["reach_ipv6"], "loopback");
}

/// Only the veth disabled (`all` stays 0): the same as above, though `all` says 0.
#[test]
fn the_one_interface_disabled_means_loopback() {
    let topo = Topology::new();
    let (_tcp, udp) = dual_stack(&topo);
    let key = format!("net.ipv6.conf.{}.disable_ipv6", topo.server_if);
    topo.server.sysctl(&key, "1");

    let seen = probe(&topo, &udp);
    let (ns, tcp, udp_l) = scan(&topo);
    agrees(&seen, &tcp, &udp_l);
    assert_eq!(ns["ipv6"]["state"], "loopback_only", "{ns}");
}

/// `all` is 1 but the veth was enabled again (and given its address back): IPv6 works
/// over it, so `all` alone decides nothing and the reach stays `any`.
#[test]
fn an_interface_enabled_again_after_all_means_any() {
    let topo = Topology::new();
    let (_tcp, udp) = dual_stack(&topo);
    topo.server.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    let key = format!("net.ipv6.conf.{}.disable_ipv6", topo.server_if);
    topo.server.sysctl(&key, "0");
    topo.server.ip(&[
        "addr",
        "add",
        "fd00:200::1/64",
        "dev",
        &topo.server_if,
        "nodad",
    ]);

    let seen = probe(&topo, &udp);
    assert!(seen.tcp_v6_from_peer, "{seen:?}");
    let (ns, tcp, udp_l) = scan(&topo);
    agrees(&seen, &tcp, &udp_l);
    assert_eq!(ns["ipv6"]["state"], "enabled", "{ns}");
    assert_eq!(ns["ipv6"]["reason"], Value::Null, "{ns}");
}

/// A namespace whose only interface is `lo`, IPv6 untouched: nothing is disabled, so
/// nothing is narrowed (IPv4 is not narrowed for a missing link either), and `::1` works.
#[test]
fn only_lo_and_nothing_disabled_is_not_limited() {
    let ns = Netns::new();
    let _tcp = ns.enter(|| tcp_listener("::", PORT, Some(false)));
    assert!(ns.enter(|| tcp_connects(at("::1"), PROBE)));
    let doc = scan_json(&["--netns", &ns.name]);
    let l = find(&doc, &ns.name, "tcp", PORT);
    assert_eq!(l.len(), 1, "{doc}");
    assert_eq!(l[0]["reach_ipv6"], "any", "{doc}");
    assert_eq!(doc["namespaces"][0]["ipv6"]["state"], "enabled", "{doc}");
}
