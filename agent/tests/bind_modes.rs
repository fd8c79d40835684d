//! The headline test: for every bind mode, what `listenscope-agent scan --json` says a
//! socket accepts agrees with real IPv4 and IPv6 connection attempts, made from another
//! namespace (and from the socket's own namespace for loopback), and `shown_as` is
//! exactly what real `netstat -tuln` prints for it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use serde_json::Value;
use socket2::Socket;
use util::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    /// The other namespace, across the veth link.
    Client,
    /// The server namespace itself (loopback targets).
    Server,
}

#[derive(Debug, Clone)]
struct Target {
    ip: IpAddr,
    scope: u32,
    from: From,
}

fn plain(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What the JSON claims for one connection attempt.
fn claimed(l: &Value, t: &Target, server_if: &str) -> bool {
    if l["latent"] == true {
        return false;
    }
    let key = if t.ip.is_ipv4() {
        "reach_ipv4"
    } else {
        "reach_ipv6"
    };
    let bound: IpAddr = l["address"].as_str().unwrap().parse().unwrap();
    let by_address = match l[key].as_str().unwrap() {
        "any" => true,
        "loopback" => t.ip.is_loopback(),
        "specific" => t.ip == plain(bound),
        "none" => false,
        other => panic!("{key}={other} cannot be checked against reality: {l}"),
    };
    let by_interface = match l["interface"].as_str() {
        None => true,
        Some("lo") => t.from == From::Server,
        Some(i) => i == server_if && t.from == From::Client,
    };
    by_address && by_interface
}

fn attempt(t: &Target, port: u16, udp_listener: Option<&Socket>) -> bool {
    let addr = match t.ip {
        IpAddr::V4(a) => SocketAddr::new(IpAddr::V4(a), port),
        IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, port, 0, t.scope)),
    };
    // A latent address is routed to the server, which drops it: keep that wait short.
    let timeout = Duration::from_millis(
        if t.ip == NOT_LOCAL_V4.parse::<IpAddr>().unwrap()
            || t.ip == NOT_LOCAL_V6.parse::<IpAddr>().unwrap()
        {
            400
        } else {
            3000
        },
    );
    match udp_listener {
        Some(l) => udp_delivers(addr, l, timeout),
        None => tcp_connects(addr, timeout),
    }
}

#[test]
fn json_agrees_with_real_connections_for_every_bind_mode() {
    let topo = Topology::new();
    let a_if = topo.server_if.clone();
    let a_ifindex = topo.server.ifindex(&a_if);
    let b_ifindex = topo.client.ifindex(&topo.client_if);
    let cases: Vec<(&str, Bind)> = vec![
        ("dual-stack ::", Bind::tcp("::", 7001).v6only(false)),
        ("v6only ::", Bind::tcp("::", 7002).v6only(true)),
        (
            "v4-mapped specific",
            Bind::tcp("::ffff:10.200.0.1", 7003).v6only(false),
        ),
        (
            "v4-mapped ::ffff:0.0.0.0",
            Bind::tcp("::ffff:0.0.0.0", 7004).v6only(false),
        ),
        ("v4 loopback", Bind::tcp("127.0.0.1", 7005)),
        ("v6 loopback", Bind::tcp("::1", 7006)),
        ("v4 specific", Bind::tcp(A_V4, 7007)),
        ("v6 specific", Bind::tcp(A_V6, 7008)),
        ("v6 link-local", Bind::tcp(A_LL, 7009).scope(a_ifindex)),
        ("v4 any", Bind::tcp("0.0.0.0", 7010)),
        (
            "SO_BINDTODEVICE veth",
            Bind::tcp("0.0.0.0", 7011).device(&a_if),
        ),
        (
            "SO_BINDTODEVICE lo, dual-stack",
            Bind::tcp("::", 7012).v6only(false).device("lo"),
        ),
        (
            "freebind non-local v4",
            Bind::tcp(NOT_LOCAL_V4, 7013).freebind(),
        ),
        (
            "freebind non-local v6",
            Bind::tcp(NOT_LOCAL_V6, 7014).freebind(),
        ),
        ("v4 second address", Bind::tcp(A_V4_EXTRA, 7015)),
        ("v6 second address", Bind::tcp(A_V6_EXTRA, 7016)),
        ("udp dual-stack", Bind::udp("::", 7101).v6only(false)),
        ("udp v6only", Bind::udp("::", 7102).v6only(true)),
        ("udp v4 any", Bind::udp("0.0.0.0", 7103)),
        ("udp v4 specific", Bind::udp(A_V4, 7104)),
        (
            "udp v4-mapped specific",
            Bind::udp("::ffff:10.200.0.1", 7105).v6only(false),
        ),
        ("udp v6 loopback", Bind::udp("::1", 7106)),
        (
            "udp bound to veth",
            Bind::udp("::", 7107).v6only(false).device(&a_if),
        ),
    ];
    let sockets: Vec<Socket> = topo
        .server
        .enter(|| cases.iter().map(|(_, b)| b.open()).collect());

    let doc = scan_json(&["--netns", &topo.server.name]);
    let me = std::process::id();

    let client = |ip: &str, scope: u32| Target {
        ip: ip.parse().unwrap(),
        scope,
        from: From::Client,
    };
    let server = |ip: &str| Target {
        ip: ip.parse().unwrap(),
        scope: 0,
        from: From::Server,
    };
    let mut mismatches = Vec::new();
    for ((label, bind), socket) in cases.iter().zip(&sockets) {
        let proto = if bind.udp { "udp" } else { "tcp" };
        let found = find(&doc, &topo.server.name, proto, bind.port);
        assert_eq!(
            found.len(),
            1,
            "{label}: expected one listener, got {found:?}"
        );
        let l = found[0];
        assert!(
            owner_pids(l).contains(&me),
            "{label}: the test process owns it: {l}"
        );
        assert_eq!(l["netns"]["inode"], topo.server.inode(), "{label}");

        let mut targets = vec![
            client(A_V4, 0),
            client(A_V4_EXTRA, 0),
            client(A_V6, 0),
            client(A_V6_EXTRA, 0),
            client(A_LL, b_ifindex),
            server("127.0.0.1"),
            server("::1"),
        ];
        if l["latent"] == true {
            let own = plain(l["address"].as_str().unwrap().parse().unwrap());
            targets.push(Target {
                ip: own,
                scope: 0,
                from: From::Client,
            });
        }
        let udp = bind.udp.then_some(socket);
        for t in &targets {
            let real = match t.from {
                From::Client => topo.client.enter(|| attempt(t, bind.port, udp)),
                From::Server => topo.server.enter(|| attempt(t, bind.port, udp)),
            };
            let says = claimed(l, t, &a_if);
            if real != says {
                mismatches.push(format!(
                    "{label} ({proto} port {}): to {} from {:?}: connection {} but JSON says {} \
                     (reach_ipv4={}, reach_ipv6={}, latent={}, interface={})",
                    bind.port,
                    t.ip,
                    t.from,
                    if real { "succeeded" } else { "failed" },
                    if says { "accepted" } else { "refused" },
                    l["reach_ipv4"],
                    l["reach_ipv6"],
                    l["latent"],
                    l["interface"]
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "JSON disagrees with reality:\n{}",
        mismatches.join("\n")
    );

    // The classification itself, for the cases the product exists for.
    let one = |proto: &str, port: u16| find(&doc, &topo.server.name, proto, port)[0].clone();
    let dual = one("tcp", 7001);
    assert_eq!(
        (
            &dual["reach_ipv4"],
            &dual["reach_ipv6"],
            &dual["v6only"],
            &dual["trap"]
        ),
        (
            &Value::from("any"),
            &Value::from("any"),
            &Value::from(false),
            &Value::from(true)
        )
    );
    assert_eq!(dual["shown_as"], ":::7001");
    assert_eq!(dual["netstat_proto"], "tcp6");
    assert_eq!(dual["hidden_ipv4_exposure"], true);
    let v6only = one("tcp", 7002);
    assert_eq!(
        (&v6only["reach_ipv4"], &v6only["v6only"], &v6only["trap"]),
        (
            &Value::from("none"),
            &Value::from(true),
            &Value::from(false)
        )
    );
    assert_eq!(
        v6only["shown_as"], ":::7002",
        "netstat prints the same for both"
    );
    assert_eq!(v6only["hidden_ipv4_exposure"], false);
    assert_eq!(one("tcp", 7003)["shown_as"], "10.200.0.1:7003");
    assert_eq!(one("tcp", 7004)["shown_as"], "0.0.0.0:7004");
    assert_eq!(one("tcp", 7004)["hidden_ipv4_exposure"], true);
    assert_eq!(one("tcp", 7009)["interface"], Value::from(a_if.clone()));
    assert_eq!(one("tcp", 7011)["interface"], Value::from(a_if.clone()));
    assert_eq!(one("tcp", 7012)["interface"], "lo");
    assert_eq!(
        one("tcp", 7012)["hidden_ipv4_exposure"],
        false,
        "loopback only"
    );
    let latent = one("tcp", 7013);
    assert_eq!(
        (&latent["latent"], &latent["freebind"]),
        (&Value::from(true), &Value::from(true))
    );
    assert_eq!(one("tcp", 7014)["latent"], true);
    assert_eq!(one("tcp", 7015)["latent"], false);
    assert_eq!(one("udp", 7101)["trap"], true);
    assert_eq!(one("udp", 7101)["netstat_proto"], "udp6");

    // shown_as / netstat_proto are exactly what real netstat prints in that namespace.
    let netstat = topo.server.exec("netstat", &["-tuln"]);
    let netstat = String::from_utf8_lossy(&netstat.stdout);
    let lines: Vec<(String, String)> = netstat
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 4 && (f[0].starts_with("tcp") || f[0].starts_with("udp")))
                .then(|| (f[0].to_string(), f[3].to_string()))
        })
        .collect();
    let ours: Vec<(String, String)> = doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["netns"]["name"] == topo.server.name.as_str())
        .map(|l| {
            (
                l["netstat_proto"].as_str().unwrap().to_string(),
                l["shown_as"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut a = lines.clone();
    let mut b = ours.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "netstat -tuln lines vs shown_as:\n{netstat}");
}

/// The table a person reads: the dual-stack row is marked, says it accepts IPv4, and shows
/// the same `:::PORT` that netstat shows; the footer explains the mark.
#[test]
fn table_marks_the_trap_that_netstat_hides() {
    let ns = Netns::new();
    let _sockets = ns.enter(|| {
        vec![
            Bind::tcp("::", 8080).v6only(false).open(),
            Bind::tcp("::", 8443).v6only(true).open(),
            Bind::tcp("0.0.0.0", 22).open(),
            Bind::tcp("::", 22).v6only(true).open(),
        ]
    });
    let netstat = ns.exec("netstat", &["-tln"]);
    let netstat = String::from_utf8_lossy(&netstat.stdout);
    assert!(
        netstat.contains(":::8080") && netstat.contains(":::8443"),
        "{netstat}"
    );

    let (ok, table, _) = agent(&["scan", "--netns", &ns.name]);
    assert!(ok);
    let row = |port: &str| {
        table
            .lines()
            .find(|l| l.contains(&format!(":::{port} ")))
            .unwrap_or_else(|| panic!("no row for :::{port} in\n{table}"))
            .to_string()
    };
    let trap = row("8080");
    assert!(
        trap.trim_start().starts_with('!'),
        "trap row is marked: {trap}"
    );
    assert!(
        trap.contains("all IPv4 + all IPv6") && trap.contains(" no "),
        "{trap}"
    );
    let safe = row("8443");
    assert!(!safe.trim_start().starts_with('!'), "{safe}");
    assert!(
        safe.contains("all IPv6") && !safe.contains("IPv4") && safe.contains(" yes "),
        "{safe}"
    );
    assert!(
        table.contains("! = IPv6 socket that also accepts IPv4"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "Reachable over IPv4 although netstat shows only IPv6 lines: {} tcp/8080",
            ns.name
        )),
        "{table}"
    );
    // sshd pattern (0.0.0.0:22 + v6only :::22) is not hidden exposure.
    assert!(!table.contains("tcp/22"), "{table}");

    // Filters.
    let doc = scan_json(&["--netns", &ns.name, "--trap-only"]);
    let ports: Vec<u64> = doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [8080]);
    let doc = scan_json(&["--netns", &ns.name, "--port", "22", "--proto", "tcp"]);
    assert_eq!(doc["listeners"].as_array().unwrap().len(), 2);
    let doc = scan_json(&["--netns", &ns.name, "--proto", "udp"]);
    assert_eq!(doc["listeners"].as_array().unwrap().len(), 0);
    assert!(doc["scanned_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn bad_flags_say_what_is_wrong() {
    let (ok, _, err) = agent(&["scan", "--port", "0"]);
    assert!(!ok && err.contains("--port"), "{err}");
    let (ok, _, err) = agent(&["scan", "--port", "70000"]);
    assert!(!ok && err.contains("--port"), "{err}");
    let (ok, _, err) = agent(&["scan", "--proto", "sctp"]);
    assert!(!ok && err.contains("tcp") && err.contains("udp"), "{err}");
    let (ok, _, err) = agent(&["scan", "--netns", "no-such-namespace-here"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("no network namespace matches --netns no-such-namespace-here")
            && err.contains("host"),
        "{err}"
    );
}
