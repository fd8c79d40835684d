//! `run`'s targeted inventories (`live::Scanner`) against the real kernel: after sockets
//! open and close in a real namespace, a refresh of that namespace says exactly what a
//! whole scan says, finds new owners in the processes the events named without walking
//! every process, and reads the namespace again through netlink sockets kept open in it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

use listenscope_agent::live::{Dirty, Scanner};
use listenscope_agent::model::Protocol;
use listenscope_agent::os::{LinuxSystem, System};
use listenscope_agent::record::{State, state_of};
use listenscope_agent::scan::{self, NetnsSelector, ScanOptions};
use listenscope_testkit::{Netns, tcp_listener, udp_socket};

fn opts(ns: &Netns) -> ScanOptions {
    ScanOptions {
        netns: NetnsSelector::Inode(ns.inode()),
        ..ScanOptions::default()
    }
}

/// What a whole scan, with nothing kept, says now.
fn whole(ns: &Netns) -> State {
    let inv = scan::scan(&LinuxSystem::new(), &opts(ns)).expect("whole scan");
    state_of(&inv)
}

fn dirty(ns: &Netns, pids: &[u32]) -> Dirty {
    Dirty {
        full: false,
        namespaces: [ns.inode()].into_iter().collect(),
        pids: pids.to_vec(),
        expect: Vec::new(),
    }
}

fn ports(state: &State) -> Vec<(Protocol, u16)> {
    let mut v: Vec<_> = state.keys().map(|k| (k.protocol, k.port)).collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn a_refresh_says_what_a_whole_scan_says() {
    let ns = Netns::new();
    let me = std::process::id();
    let sys = LinuxSystem::keeping_sockets();
    let mut scanner = Scanner::new(opts(&ns));
    let _first = ns.enter(|| tcp_listener("0.0.0.0", 2201, None));
    let inv = scanner.full(&sys).expect("first scan");
    assert_eq!(ports(&state_of(&inv)), vec![(Protocol::Tcp, 2201)]);

    // New sockets, the process that opened them named: found there, no walk of /proc.
    let (dual, udp) = ns.enter(|| {
        (
            tcp_listener("::", 2202, Some(false)),
            udp_socket("::", 2203, Some(true)),
        )
    });
    let (inv, done) = scanner.refresh(&sys, &dirty(&ns, &[me])).expect("refresh");
    assert!(!done.whole && !done.walked_all, "{done:?}");
    assert_eq!((done.namespaces, done.looked_up), (1, 2), "{done:?}");
    let refreshed = state_of(&inv);
    assert_eq!(
        ports(&refreshed),
        vec![
            (Protocol::Tcp, 2201),
            (Protocol::Tcp, 2202),
            (Protocol::Udp, 2203)
        ]
    );
    assert!(
        refreshed
            .values()
            .all(|r| r.processes.iter().any(|p| p.pid == me)),
        "every socket is ours: {refreshed:#?}"
    );
    assert_eq!(refreshed, whole(&ns));
    // The dual-stack listener is the trap, as in a whole scan.
    assert!(refreshed.values().any(|r| r.key.port == 2202 && r.trap));

    // A socket whose opener is not named: found by walking every process.
    let late = ns.enter(|| tcp_listener("127.0.0.1", 2204, None));
    let (inv, done) = scanner.refresh(&sys, &dirty(&ns, &[])).expect("refresh");
    assert!(done.walked_all && done.looked_up == 1, "{done:?}");
    assert_eq!(state_of(&inv), whole(&ns));

    // A listen its caller's namespace does not hold (the socket was made elsewhere):
    // the refresh gives way to a whole scan.
    let mut elsewhere = dirty(&ns, &[me]);
    elsewhere.expect.push((ns.inode(), 2299));
    let (inv, done) = scanner.refresh(&sys, &elsewhere).expect("refresh");
    assert!(done.whole, "{done:?}");
    assert_eq!(state_of(&inv), whole(&ns));

    // Closes: gone, and the rest unchanged.
    drop((dual, udp, late));
    let (inv, done) = scanner.refresh(&sys, &dirty(&ns, &[])).expect("refresh");
    assert_eq!(done.looked_up, 0, "{done:?}");
    assert_eq!(ports(&state_of(&inv)), vec![(Protocol::Tcp, 2201)]);
    assert_eq!(state_of(&inv), whole(&ns));
}

#[test]
fn polling_finds_changes_and_only_changes() {
    let ns = Netns::new();
    let sys = LinuxSystem::keeping_sockets();
    let mut scanner = Scanner::new(opts(&ns));
    scanner.full(&sys).expect("first scan");
    assert!(
        scanner.poll(&sys).expect("poll").is_none(),
        "nothing changed"
    );

    let udp = ns.enter(|| udp_socket("0.0.0.0", 2301, None));
    let (inv, done) = scanner.poll(&sys).expect("poll").expect("a change");
    assert_eq!(done.namespaces, 1);
    assert_eq!(ports(&state_of(&inv)), vec![(Protocol::Udp, 2301)]);
    assert_eq!(state_of(&inv), whole(&ns));
    assert!(scanner.poll(&sys).expect("poll").is_none(), "nothing new");

    drop(udp);
    let (inv, _) = scanner.poll(&sys).expect("poll").expect("the close");
    assert!(state_of(&inv).is_empty());
}

#[test]
fn kept_sockets_answer_for_their_namespace_until_it_is_gone() {
    let ns = Netns::new();
    let keeping = LinuxSystem::keeping_sockets();
    let entry = || {
        keeping
            .discover()
            .namespaces
            .into_iter()
            .find(|n| n.id.inode == ns.inode())
            .expect("the test namespace is found")
    };
    let e = entry();
    let both = [Protocol::Tcp, Protocol::Udp];
    assert!(
        keeping.reread(&e, &both).is_none(),
        "nothing kept before a read"
    );
    keeping.read_netns(&e, &both).expect("read");
    // From this thread, which never entered the namespace: its sockets, not ours.
    let _l = ns.enter(|| tcp_listener("0.0.0.0", 2401, None));
    let _host = tcp_listener("127.0.0.1", 0, None);
    let r = keeping
        .reread(&e, &both)
        .expect("kept sockets")
        .expect("re-read");
    let ports: Vec<u16> = r.sockets.iter().map(|s| s.port).collect();
    assert_eq!(ports, vec![2401], "only the namespace's own sockets");
    assert!(r.local.is_some_and(|l| !l.v4.is_empty()), "its local table");

    // A one-shot scan keeps nothing.
    let plain = LinuxSystem::new();
    plain.read_netns(&e, &both).expect("read");
    assert!(plain.reread(&e, &both).is_none());

    // Gone from discovery: its sockets are dropped (they would keep it alive).
    let inode = ns.inode();
    drop(ns);
    let found = keeping.discover();
    assert!(found.namespaces.iter().all(|n| n.id.inode != inode));
    assert!(
        keeping.reread(&e, &both).is_none(),
        "sockets of a gone namespace dropped"
    );
}

#[test]
fn a_udp_socket_s_end_is_announced_in_its_namespace() {
    use listenscope_agent::os::udp_gone::Gone;
    let ns = Netns::new();
    let sys = LinuxSystem::keeping_sockets();
    sys.want_udp_gone();
    let entry = sys
        .discover()
        .namespaces
        .into_iter()
        .find(|n| n.id.inode == ns.inode())
        .expect("the test namespace is found");
    let both = [Protocol::Tcp, Protocol::Udp];
    sys.read_netns(&entry, &both).expect("read (subscribes)");
    let v4 = ns.enter(|| udp_socket("0.0.0.0", 2501, None));
    let v6 = ns.enter(|| udp_socket("::", 2502, Some(true)));
    // A UDP socket of another namespace (ours) is not announced here.
    let elsewhere = udp_socket("127.0.0.1", 0, None);
    drop((v4, v6, elsewhere));
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while got.len() < 2 && std::time::Instant::now() < deadline {
        assert!(
            sys.udp_gone(Some(std::time::Duration::from_millis(200)), &mut got)
                .expect("wait")
        );
    }
    got.sort_by_key(|g| match g {
        Gone::Port { port, .. } => *port,
        Gone::Lost { .. } => 0,
    });
    let inode = ns.inode();
    assert_eq!(
        got,
        vec![
            Gone::Port {
                netns: inode,
                port: 2501
            },
            Gone::Port {
                netns: inode,
                port: 2502
            }
        ]
    );
    // A one-shot system watches nothing; nor does a keeping one not asked to.
    assert!(
        !LinuxSystem::new()
            .udp_gone(Some(std::time::Duration::ZERO), &mut got)
            .unwrap()
    );
    let unasked = LinuxSystem::keeping_sockets();
    unasked.read_netns(&entry, &both).expect("read");
    let udp = ns.enter(|| udp_socket("0.0.0.0", 2503, None));
    drop(udp);
    got.clear();
    let waited = unasked.udp_gone(Some(std::time::Duration::from_millis(300)), &mut got);
    assert!(waited.unwrap());
    assert!(got.is_empty(), "{got:?}");
}
