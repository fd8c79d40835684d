//! Property tests of the protocol edge (`listenscope_core::wire`): what an agent sends is
//! hostile input, so the `TryFrom` conversions are driven with arbitrary messages (any
//! bytes in every field, any lengths and enum values, text with control, bidirectional
//! and zero-width characters, lengths straddling every limit) and with arbitrary bytes
//! decoded by prost. The properties:
//!
//! - validation never panics, and it accepts exactly what the rules of
//!   `proto/listenscope/v1/inventory.proto` allow (an independent statement of those rules,
//!   [`spec_listener`] / [`spec_key`] / [`spec_hello`] / [`spec_watch`], must agree with
//!   `TryFrom`);
//! - whatever it accepts satisfies the invariants the store relies on
//!   ([`assert_record_invariants`]);
//! - a valid record survives domain → proto → bytes → proto → domain unchanged, with the
//!   same fingerprints;
//! - any record the agent builds, after `ListenerRecord::bound`, is accepted unchanged (an
//!   agent never gets a snapshot refused for a strange process name); the same for a
//!   watch mode after `Watch::bound` (a session never refused for a strange reason).
//!
//! Runs `PROPTEST_CASES` cases per property (default 256 here), from a fixed seed unless
//! `PROPTEST_RNG_SEED` is set; failures are not persisted to files (see docs/protocol.md,
//! "Protocol properties").

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use listenscope_core::domain::{
    Container, Effective, Family, ProcessInfo, Protocol, Reach, Source,
};
use listenscope_core::fingerprint::fingerprints;
use listenscope_core::limits;
use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord, is_unsafe_char};
use listenscope_core::watch::{Watch, WatchMode};
use listenscope_core::wire::{self, Hello};
use listenscope_proto::v1;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed};
use prost::Message as _;
use time::OffsetDateTime;

/// Cases per property unless `PROPTEST_CASES` says otherwise; a fixed seed unless
/// `PROPTEST_RNG_SEED` gives one (CI runs the same cases every time; set the variable to
/// explore others). No failure files: a failure found becomes a named regular test.
fn config(cases: u32) -> Config {
    let base = Config::default(); // reads PROPTEST_* from the environment
    Config {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            base.cases
        } else {
            cases
        },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            base.rng_seed
        } else {
            RngSeed::Fixed(0x6c69_7374_656e)
        },
        failure_persistence: None,
        ..base
    }
}

// ---------------------------------------------------------------------------------------
// Text.

/// Characters [`is_unsafe_char`] refuses: C0, DEL, C1, bidirectional controls, zero-width
/// and other invisible formatting characters (a sample of each range, with its ends).
const UNSAFE: &[char] = &[
    '\0', '\u{7}', '\t', '\n', '\r', '\u{1b}', '\u{1f}', '\u{7f}', '\u{80}', '\u{85}', '\u{9b}',
    '\u{9f}', '\u{ad}', '\u{61c}', '\u{180e}', '\u{200b}', '\u{200d}', '\u{200f}', '\u{2028}',
    '\u{202a}', '\u{202e}', '\u{2060}', '\u{2066}', '\u{2069}', '\u{feff}', '\u{fff9}', '\u{fffb}',
];

/// Printable neighbours of the unsafe ranges, and multi-byte characters (lengths are in
/// bytes).
const EDGE: &[char] = &[
    ' ',
    '~',
    '\u{a0}',
    '\u{ac}',
    '\u{ae}',
    '\u{61b}',
    '\u{61d}',
    '\u{180d}',
    '\u{180f}',
    '\u{200a}',
    '\u{2027}',
    '\u{202f}',
    '\u{205f}',
    '\u{206a}',
    '\u{fefe}',
    '\u{ff00}',
    '\u{fff8}',
    '\u{fffc}',
    '\u{fffd}',
    'é',
    '✓',
    '日',
    '\u{1f600}',
    '\u{10ffff}',
];

/// Any character, with the interesting ones over-represented.
fn any_char() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => proptest::char::range(' ', '~'),
        2 => any::<char>(),
        1 => select(UNSAFE),
        2 => select(EDGE),
    ]
}

/// A printable character (what the agent may send).
fn safe_char() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => proptest::char::range(' ', '~'),
        2 => any::<char>().prop_filter("printable", |c| !is_unsafe_char(*c)),
        2 => select(EDGE),
    ]
}

/// Any text for a field of at most `max` bytes: short and arbitrary, or around the limit
/// (a run of ASCII and a few arbitrary characters, so multi-byte ones straddle it).
fn any_text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        4 => vec(any_char(), 0..12).prop_map(|v| v.into_iter().collect::<String>()),
        1 => (max.saturating_sub(4)..=max + 2, vec(any_char(), 0..3)).prop_map(|(n, tail)| {
            let mut s = "a".repeat(n);
            s.extend(tail);
            s
        }),
    ]
    .boxed()
}

/// Valid text of at most `max` bytes (empty allowed), sometimes exactly `max` bytes.
fn safe_text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        6 => vec(safe_char(), 0..16).prop_map(move |v| cut(v.into_iter().collect(), max)),
        1 => vec(safe_char(), 0..4).prop_map(move |v| {
            let tail: String = v.into_iter().collect();
            let mut s = "b".repeat(max.saturating_sub(tail.len()));
            s.push_str(&tail);
            cut(s, max)
        }),
    ]
    .boxed()
}

/// Valid non-empty text of at most `max` bytes.
fn safe_text1(max: usize) -> BoxedStrategy<String> {
    safe_text(max)
        .prop_map(|s| if s.is_empty() { "x".into() } else { s })
        .boxed()
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(mut s: String, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn printable(s: &str) -> bool {
    !s.chars().any(is_unsafe_char)
}

fn text_ok(s: &str, max: usize) -> bool {
    s.len() <= max && printable(s)
}

// ---------------------------------------------------------------------------------------
// Arbitrary wire messages.

/// An enum field: mostly around the defined values, sometimes anything.
fn any_enum() -> impl Strategy<Value = i32> {
    prop_oneof![4 => -1..8i32, 1 => any::<i32>()]
}

fn any_key() -> impl Strategy<Value = v1::ListenerKey> {
    (
        any_text(limits::NETNS),
        any_enum(),
        any_enum(),
        prop_oneof![
            vec(any::<u8>(), 4),
            vec(any::<u8>(), 16),
            vec(any::<u8>(), 0..=20)
        ],
        prop_oneof![
            4 => 1..=65535u32,
            1 => select(vec![0u32, 1, 65535, 65536, u32::MAX]),
            1 => any::<u32>(),
        ],
        any_text(limits::INTERFACE),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(
            |(netns, protocol, family, address, port, interface, v6only)| v1::ListenerKey {
                netns,
                protocol,
                family,
                address,
                port,
                interface,
                v6only,
            },
        )
}

fn any_process() -> impl Strategy<Value = v1::Process> {
    (
        prop_oneof![Just(0u32), any::<u32>()],
        any_text(limits::COMM),
        any_text(limits::CMDLINE),
        any_text(limits::USER),
    )
        .prop_map(|(pid, comm, cmdline, user)| v1::Process {
            pid,
            comm,
            cmdline,
            user,
        })
}

fn any_processes() -> impl Strategy<Value = Vec<v1::Process>> {
    prop_oneof![
        30 => vec(any_process(), 0..4),
        // Just past the count limit.
        1 => (limits::PROCESSES..=limits::PROCESSES + 1).prop_map(|n| {
            (1..=n as u32)
                .map(|pid| v1::Process { pid, comm: "w".into(), ..Default::default() })
                .collect()
        }),
    ]
}

fn any_verdict() -> impl Strategy<Value = Option<v1::FirewallVerdict>> {
    let names = select(vec![
        "",
        "open",
        "filtered",
        "restricted",
        "unknown",
        "diverted",
        "n/a",
        "OPEN",
        "closed",
    ]);
    let conditions = prop_oneof![
        8 => vec(any_text(limits::EFFECTIVE_CONDITION), 0..4),
        1 => vec(safe_text1(8), limits::EFFECTIVE_CONDITIONS..=limits::EFFECTIVE_CONDITIONS + 1),
    ];
    proptest::option::weighted(
        0.8,
        (
            prop_oneof![4 => names.prop_map(String::from), 1 => any_text(40)],
            prop_oneof![Just(String::new()), any_text(limits::EFFECTIVE_REASON)],
            prop_oneof![Just(Vec::new()), conditions],
        )
            .prop_map(|(verdict, reason, conditions)| v1::FirewallVerdict {
                verdict,
                reason,
                conditions,
            }),
    )
}

fn any_container() -> impl Strategy<Value = Option<v1::Container>> {
    proptest::option::of(
        (
            any_text(limits::RUNTIME),
            any_text(limits::CONTAINER_ID),
            any_text(limits::POD_UID),
        )
            .prop_map(|(runtime, id, pod_uid)| v1::Container {
                runtime,
                id,
                pod_uid,
            }),
    )
}

fn any_listener() -> impl Strategy<Value = v1::Listener> {
    let netstat = prop_oneof![
        4 => select(vec!["tcp", "tcp6", "udp", "udp6"]).prop_map(String::from),
        1 => any_text(8),
    ];
    (
        (
            proptest::option::weighted(0.95, any_key()),
            any::<u64>(),
            any_enum(),
            any_enum(),
            any::<bool>(),
            any_text(limits::SHOWN_AS),
            netstat,
            any::<bool>(),
            any::<bool>(),
        ),
        (
            any_processes(),
            any_container(),
            any_text(limits::UNIT),
            any_text(limits::CGROUP),
            any::<u32>(),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
            any_enum(),
            prop_oneof![Just(0u32), 1..4u32, any::<u32>()],
            any_verdict(),
            any_verdict(),
        ),
    )
        .prop_map(
            |(
                (
                    key,
                    netns_inode,
                    reach_ipv4,
                    reach_ipv6,
                    latent,
                    shown_as,
                    netstat_proto,
                    trap,
                    hidden,
                ),
                (
                    processes,
                    container,
                    unit,
                    cgroup,
                    uid,
                    freebind,
                    transparent,
                    source,
                    sockets,
                    e4,
                    e6,
                ),
            )| v1::Listener {
                key,
                netns_inode,
                reach_ipv4,
                reach_ipv6,
                latent,
                shown_as,
                netstat_proto,
                trap,
                hidden_ipv4_exposure: hidden,
                processes,
                container,
                unit,
                cgroup,
                uid,
                freebind,
                transparent,
                source,
                sockets,
                effective_ipv4: e4,
                effective_ipv6: e6,
            },
        )
}

/// Any watch mode: kinds around the defined ones, periods straddling both limits, any
/// reason.
fn any_watch() -> impl Strategy<Value = v1::Watch> {
    (
        any_enum(),
        prop_oneof![
            2 => Just(0u64),
            4 => 1..100_000u64,
            1 => select(vec![
                1,
                limits::WATCH_INTERVAL_MAX_MS - 1,
                limits::WATCH_INTERVAL_MAX_MS,
                limits::WATCH_INTERVAL_MAX_MS + 1,
                u64::MAX,
            ]),
            1 => any::<u64>(),
        ],
        any_text(limits::WATCH_REASON),
    )
        .prop_map(|(kind, interval_ms, reason)| v1::Watch {
            kind,
            interval_ms,
            reason,
        })
}

/// A watch mode as the agent might build it before `bound`: any period (zero, sub-ms,
/// huge), any reason (control characters, far too long).
fn raw_agent_watch() -> impl Strategy<Value = Watch> {
    let period = prop_oneof![
        any::<u64>().prop_map(std::time::Duration::from_nanos),
        any::<(u64, u32)>().prop_map(|(s, n)| std::time::Duration::new(s, n % 1_000_000_000)),
        Just(std::time::Duration::ZERO),
    ];
    (
        0..3u8,
        period,
        proptest::option::of(vec(any_char(), 0..700).prop_map(|v| v.into_iter().collect())),
    )
        .prop_map(|(kind, d, reason)| Watch {
            mode: match kind {
                0 => WatchMode::Doorbell,
                1 => WatchMode::Polling(d),
                _ => WatchMode::Interval(d),
            },
            reason,
        })
}

fn any_hello() -> impl Strategy<Value = v1::Hello> {
    let id = || {
        prop_oneof![
            4 => vec(any::<u8>(), 16),
            1 => Just(Vec::new()),
            1 => vec(any::<u8>(), 0..=20),
        ]
    };
    (
        prop_oneof![4 => Just(limits::PROTOCOL_VERSION), 1 => any::<u32>()],
        any_text(limits::AGENT_VERSION),
        any_text(limits::OS_HOSTNAME),
        id(),
        any::<u64>(),
        id(),
        proptest::option::of(any_watch()),
    )
        .prop_map(
            |(
                protocol_version,
                agent_version,
                os_hostname,
                session_id,
                acked_sequence,
                instance_id,
                watch,
            )| {
                v1::Hello {
                    protocol_version,
                    agent_version,
                    os_hostname,
                    session_id,
                    acked_sequence,
                    instance_id,
                    watch,
                }
            },
        )
}

// ---------------------------------------------------------------------------------------
// The rules, stated again from the .proto (independently of `wire.rs`).

fn spec_key(k: &v1::ListenerKey) -> bool {
    let family_ok = match k.family {
        1 => k.address.len() == 4 && k.v6only.is_none(),
        2 => k.address.len() == 16,
        _ => false,
    };
    family_ok
        && matches!(k.protocol, 1 | 2)
        && (1..=65535).contains(&k.port)
        && !k.netns.is_empty()
        && text_ok(&k.netns, limits::NETNS)
        && text_ok(&k.interface, limits::INTERFACE)
}

fn spec_verdict(v: &Option<v1::FirewallVerdict>) -> bool {
    let Some(v) = v else { return true };
    if v.verdict.is_empty() {
        return v.reason.is_empty() && v.conditions.is_empty();
    }
    let known = [
        "open",
        "filtered",
        "restricted",
        "unknown",
        "diverted",
        "n/a",
    ];
    known.contains(&v.verdict.as_str())
        && text_ok(&v.reason, limits::EFFECTIVE_REASON)
        && (v.conditions.is_empty() || v.verdict == "restricted")
        && v.conditions.len() <= limits::EFFECTIVE_CONDITIONS
        && v.conditions
            .iter()
            .all(|c| !c.is_empty() && text_ok(c, limits::EFFECTIVE_CONDITION))
}

fn spec_listener(l: &v1::Listener) -> bool {
    let Some(key) = &l.key else { return false };
    spec_key(key)
        && (1..=5).contains(&l.reach_ipv4)
        && (1..=5).contains(&l.reach_ipv6)
        && matches!(l.source, 1 | 2)
        && ["tcp", "tcp6", "udp", "udp6"].contains(&l.netstat_proto.as_str())
        && (1..=limits::SOCKETS).contains(&l.sockets)
        && text_ok(&l.shown_as, limits::SHOWN_AS)
        && text_ok(&l.unit, limits::UNIT)
        && text_ok(&l.cgroup, limits::CGROUP)
        && l.processes.len() <= limits::PROCESSES
        && l.processes.iter().all(|p| {
            p.pid >= 1
                && text_ok(&p.comm, limits::COMM)
                && text_ok(&p.cmdline, limits::CMDLINE)
                && text_ok(&p.user, limits::USER)
        })
        && l.container.as_ref().is_none_or(|c| {
            !c.runtime.is_empty()
                && text_ok(&c.runtime, limits::RUNTIME)
                && text_ok(&c.id, limits::CONTAINER_ID)
                && text_ok(&c.pod_uid, limits::POD_UID)
        })
        && spec_verdict(&l.effective_ipv4)
        && spec_verdict(&l.effective_ipv6)
}

fn spec_hello(h: &v1::Hello) -> bool {
    h.protocol_version == limits::PROTOCOL_VERSION
        && h.session_id.len() == 16
        && matches!(h.instance_id.len(), 0 | 16)
        && text_ok(&h.agent_version, limits::AGENT_VERSION)
        && text_ok(&h.os_hostname, limits::OS_HOSTNAME)
        && h.watch.as_ref().is_none_or(spec_watch)
}

/// Kind 1 (doorbell) with no period, kinds 2 and 3 (polling, interval) with a period of
/// 1 ms to a century; a printable reason of at most its limit, any kind.
fn spec_watch(w: &v1::Watch) -> bool {
    let period_ok = match w.kind {
        1 => w.interval_ms == 0,
        2 | 3 => (1..=limits::WATCH_INTERVAL_MAX_MS).contains(&w.interval_ms),
        _ => false,
    };
    period_ok && text_ok(&w.reason, limits::WATCH_REASON)
}

/// What the store relies on in an accepted key.
fn assert_key_invariants(k: &ListenerKey) {
    assert!(
        !k.netns.is_empty() && text_ok(&k.netns, limits::NETNS),
        "{k:?}"
    );
    assert!(k.port >= 1, "{k:?}");
    match (k.family, k.address) {
        (Family::Ipv4, IpAddr::V4(_)) => assert_eq!(k.v6only, None, "{k:?}"),
        (Family::Ipv6, IpAddr::V6(_)) => {}
        _ => panic!("address of the wrong family: {k:?}"),
    }
    if let Some(i) = &k.interface {
        assert!(!i.is_empty() && text_ok(i, limits::INTERFACE), "{k:?}");
    }
}

fn assert_answer_invariants(a: &FirewallAnswer) {
    assert!(text_ok(&a.reason, limits::EFFECTIVE_REASON), "{a:?}");
    assert!(a.conditions.len() <= limits::EFFECTIVE_CONDITIONS, "{a:?}");
    assert!(
        a.conditions.is_empty() || a.verdict == Effective::Restricted,
        "{a:?}"
    );
    for c in &a.conditions {
        assert!(
            !c.is_empty() && text_ok(c, limits::EFFECTIVE_CONDITION),
            "{a:?}"
        );
    }
}

/// What the store relies on in an accepted record: every bound of `limits`, no unsafe
/// character in any text, `Some` texts never empty, owners sorted by pid and each once.
fn assert_record_invariants(r: &ListenerRecord) {
    assert_key_invariants(&r.key);
    assert!(text_ok(&r.shown_as, limits::SHOWN_AS), "{r:?}");
    assert!(
        ["tcp", "tcp6", "udp", "udp6"].contains(&r.netstat_proto.as_str()),
        "{r:?}"
    );
    assert!((1..=limits::SOCKETS).contains(&r.sockets), "{r:?}");
    assert!(r.processes.len() <= limits::PROCESSES);
    assert!(
        r.processes.windows(2).all(|w| w[0].pid < w[1].pid),
        "owners sorted by pid, each once"
    );
    for p in &r.processes {
        assert!(p.pid >= 1);
        assert!(text_ok(&p.comm, limits::COMM) && text_ok(&p.cmdline, limits::CMDLINE));
        assert!(text_ok(&p.user, limits::USER));
    }
    if let Some(c) = &r.container {
        assert!(!c.runtime.is_empty() && text_ok(&c.runtime, limits::RUNTIME));
        assert!(text_ok(&c.id, limits::CONTAINER_ID));
        if let Some(p) = &c.pod_uid {
            assert!(!p.is_empty() && text_ok(p, limits::POD_UID));
        }
    }
    for (v, max) in [(&r.unit, limits::UNIT), (&r.cgroup, limits::CGROUP)] {
        if let Some(v) = v {
            assert!(!v.is_empty() && text_ok(v, max), "{r:?}");
        }
    }
    assert_answer_invariants(&r.effective_ipv4);
    assert_answer_invariants(&r.effective_ipv6);
}

/// Runs every validation of the edge over what one decoded message carries (what the
/// collector does before storing anything); returns whether all of it was accepted.
fn validate_message(m: v1::AgentMessage) -> bool {
    let now = OffsetDateTime::now_utc();
    let records = |ls: Vec<v1::Listener>| {
        ls.into_iter().all(|l| match ListenerRecord::try_from(l) {
            Ok(r) => {
                assert_record_invariants(&r);
                true
            }
            Err(_) => false,
        })
    };
    match m.body {
        None => false,
        Some(v1::agent_message::Body::Hello(h)) => Hello::try_from(h).is_ok(),
        Some(v1::agent_message::Body::Heartbeat(h)) => wire::heartbeat(h, now).is_ok(),
        Some(v1::agent_message::Body::Snapshot(c)) => {
            let at = wire::observed_at("observed_at", c.observed_at, now).is_ok();
            records(c.listeners) && at
        }
        Some(v1::agent_message::Body::Delta(d)) => {
            let at = wire::observed_at("observed_at", d.observed_at, now).is_ok();
            let closed = d
                .closed
                .into_iter()
                .all(|k| match ListenerKey::try_from(k) {
                    Ok(k) => {
                        assert_key_invariants(&k);
                        true
                    }
                    Err(_) => false,
                });
            records(d.opened) && records(d.changed) && closed && at
        }
    }
}

// ---------------------------------------------------------------------------------------
// Valid domain records.

fn valid_key() -> impl Strategy<Value = ListenerKey> {
    let v4 = any::<[u8; 4]>().prop_map(|a| (Family::Ipv4, IpAddr::V4(Ipv4Addr::from(a)), None));
    let v6_addr = prop_oneof![
        any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        Just(Ipv6Addr::UNSPECIFIED),
        Just(Ipv6Addr::LOCALHOST),
        any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_ipv6_mapped()),
        any::<[u8; 4]>().prop_map(|a| {
            let [a, b, c, d] = a;
            Ipv6Addr::from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a, b, c, d])
        }),
    ];
    let v6 = (v6_addr, proptest::option::of(any::<bool>()))
        .prop_map(|(a, v6only)| (Family::Ipv6, IpAddr::V6(a), v6only));
    (
        safe_text1(limits::NETNS),
        select(vec![Protocol::Tcp, Protocol::Udp]),
        prop_oneof![v4, v6],
        1..=65535u16,
        proptest::option::of(safe_text1(limits::INTERFACE)),
    )
        .prop_map(
            |(netns, protocol, (family, address, v6only), port, interface)| ListenerKey {
                netns,
                protocol,
                family,
                address,
                port,
                interface,
                v6only,
            },
        )
}

fn valid_answer() -> impl Strategy<Value = FirewallAnswer> {
    (
        select(Effective::ALL.to_vec()),
        safe_text(limits::EFFECTIVE_REASON),
        vec(safe_text1(limits::EFFECTIVE_CONDITION), 0..=3),
    )
        .prop_map(|(verdict, reason, conditions)| FirewallAnswer {
            verdict,
            reason,
            conditions: if verdict == Effective::Restricted {
                conditions
            } else {
                Vec::new()
            },
        })
}

fn reach() -> impl Strategy<Value = Reach> {
    select(vec![
        Reach::Any,
        Reach::Loopback,
        Reach::Specific,
        Reach::None,
        Reach::Unknown,
    ])
}

/// A record the collector must accept, with any valid value in every field.
fn valid_record() -> impl Strategy<Value = ListenerRecord> {
    let process = (
        1..=u32::MAX,
        safe_text(limits::COMM),
        safe_text(limits::CMDLINE),
        safe_text(limits::USER),
    )
        .prop_map(|(pid, comm, cmdline, user)| ProcessInfo {
            pid,
            comm,
            cmdline,
            user,
        });
    let container = proptest::option::of(
        (
            safe_text1(limits::RUNTIME),
            safe_text(limits::CONTAINER_ID),
            proptest::option::of(safe_text1(limits::POD_UID)),
        )
            .prop_map(|(runtime, id, pod_uid)| Container {
                runtime,
                id,
                pod_uid,
            }),
    );
    (
        (
            valid_key(),
            any::<u64>(),
            reach(),
            reach(),
            any::<bool>(),
            safe_text(limits::SHOWN_AS),
            select(vec!["tcp", "tcp6", "udp", "udp6"]),
            any::<bool>(),
            any::<bool>(),
            vec(process, 0..4),
        ),
        (
            container,
            proptest::option::of(safe_text1(limits::UNIT)),
            proptest::option::of(safe_text1(limits::CGROUP)),
            any::<u32>(),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
            select(vec![Source::SockDiag, Source::Procfs]),
            prop_oneof![1..=8u32, 1..=limits::SOCKETS],
            valid_answer(),
            valid_answer(),
        ),
    )
        .prop_map(
            |(
                (
                    key,
                    netns_inode,
                    reach_ipv4,
                    reach_ipv6,
                    latent,
                    shown_as,
                    netstat,
                    trap,
                    hidden,
                    mut processes,
                ),
                (container, unit, cgroup, uid, freebind, transparent, source, sockets, e4, e6),
            )| {
                processes.sort_by_key(|p| p.pid);
                processes.dedup_by_key(|p| p.pid);
                ListenerRecord {
                    key,
                    netns_inode,
                    reach_ipv4,
                    reach_ipv6,
                    latent,
                    shown_as,
                    netstat_proto: netstat.to_string(),
                    trap,
                    hidden_ipv4_exposure: hidden,
                    processes,
                    container,
                    unit,
                    cgroup,
                    uid,
                    freebind,
                    transparent,
                    source,
                    sockets,
                    effective_ipv4: e4,
                    effective_ipv6: e6,
                }
            },
        )
}

/// A record as the agent's scan could build it before `bound`: structurally sound (a
/// namespace name, an owner pid, a runtime name, one of netstat's protocol names, at
/// least one socket), with any text of any length in every text field.
fn raw_agent_record() -> impl Strategy<Value = ListenerRecord> {
    let long = |max: usize| {
        prop_oneof![
            3 => any_text(max),
            1 => vec(any_char(), 0..8).prop_map(move |v| {
                // Far past the limit, unsafe characters included: escaping grows them.
                let s: String = v.into_iter().collect();
                s.repeat(max / s.len().max(1) + 2)
            }),
        ]
    };
    let nonempty =
        move |max: usize| long(max).prop_map(|s| if s.is_empty() { "n".into() } else { s });
    (
        valid_record(),
        (
            nonempty(limits::NETNS),
            proptest::option::of(nonempty(limits::INTERFACE)),
        ),
        long(limits::SHOWN_AS),
        vec(
            (
                long(limits::COMM),
                long(limits::CMDLINE),
                long(limits::USER),
            ),
            0..3,
        ),
        proptest::option::of((nonempty(limits::RUNTIME), long(limits::CONTAINER_ID))),
        (
            proptest::option::of(nonempty(limits::UNIT)),
            proptest::option::of(nonempty(limits::CGROUP)),
        ),
        (
            long(limits::EFFECTIVE_REASON),
            vec(long(limits::EFFECTIVE_CONDITION), 0..40),
        ),
        any::<u32>(),
    )
        .prop_map(
            |(
                mut r,
                (netns, interface),
                shown_as,
                owners,
                container,
                (unit, cgroup),
                (reason, conds),
                sockets,
            )| {
                r.key.netns = netns;
                r.key.interface = interface;
                r.shown_as = shown_as;
                r.processes = owners
                    .into_iter()
                    .enumerate()
                    .map(|(i, (comm, cmdline, user))| ProcessInfo {
                        pid: i as u32 + 1,
                        comm,
                        cmdline,
                        user,
                    })
                    .collect();
                r.container = container.map(|(runtime, id)| Container {
                    runtime,
                    id,
                    pod_uid: None,
                });
                r.unit = unit;
                r.cgroup = cgroup;
                r.effective_ipv4.reason = reason;
                r.effective_ipv4.conditions = conds;
                r.sockets = sockets.max(1);
                r
            },
        )
}

/// Domain → proto → bytes → proto → domain.
fn through_the_wire(r: &ListenerRecord) -> Result<ListenerRecord, wire::WireError> {
    let bytes = v1::Listener::from(r).encode_to_vec();
    ListenerRecord::try_from(
        v1::Listener::decode(bytes.as_slice()).expect("decode what we encoded"),
    )
}

// ---------------------------------------------------------------------------------------
// The properties.

proptest! {
    #![proptest_config(config(512))]

    /// Listener validation never panics, accepts exactly what the rules allow, and what it
    /// accepts satisfies the store's invariants and converts back to the same message.
    #[test]
    fn listener_validation_is_the_spec(l in any_listener()) {
        let expected = spec_listener(&l);
        let got = ListenerRecord::try_from(l.clone());
        prop_assert_eq!(got.is_ok(), expected, "{:?} for {:?}", got.as_ref().err(), l);
        if let Ok(r) = got {
            assert_record_invariants(&r);
            let again = ListenerRecord::try_from(v1::Listener::from(&r)).unwrap();
            prop_assert_eq!(&again, &r);
            prop_assert_eq!(fingerprints(&again), fingerprints(&r));
        }
    }

    #[test]
    fn key_validation_is_the_spec(k in any_key()) {
        let expected = spec_key(&k);
        let got = ListenerKey::try_from(k.clone());
        prop_assert_eq!(got.is_ok(), expected, "{:?} for {:?}", got.as_ref().err(), k);
        if let Ok(key) = got {
            assert_key_invariants(&key);
            prop_assert_eq!(ListenerKey::try_from(v1::ListenerKey::from(&key)).unwrap(), key);
        }
    }

    #[test]
    fn hello_validation_is_the_spec(h in any_hello()) {
        let expected = spec_hello(&h);
        let got = Hello::try_from(h.clone());
        prop_assert_eq!(got.is_ok(), expected, "{:?} for {:?}", got.as_ref().err(), h);
        if let Ok(hello) = got {
            prop_assert_eq!(&hello.session_id[..], &h.session_id[..]);
            let instance = (!h.instance_id.is_empty()).then_some(h.instance_id);
            prop_assert_eq!(hello.instance_id.map(|i| i.to_vec()), instance);
            prop_assert!(text_ok(&hello.agent_version, limits::AGENT_VERSION));
            prop_assert!(text_ok(&hello.os_hostname, limits::OS_HOSTNAME));
            prop_assert_eq!(hello.watch.is_some(), h.watch.is_some());
        }
    }

    /// Watch validation accepts exactly what the rules allow; what it accepts has a
    /// period of whole milliseconds within the limits (none for doorbell), a printable
    /// bounded reason (never `Some("")`), survives the wire unchanged, and its text form
    /// reads back as the same mode.
    #[test]
    fn watch_validation_is_the_spec(w in any_watch()) {
        let expected = spec_watch(&w);
        let got = Watch::try_from(w.clone());
        prop_assert_eq!(got.is_ok(), expected, "{:?} for {:?}", got.as_ref().err(), w);
        if let Ok(watch) = got {
            match watch.mode.period() {
                None => prop_assert_eq!(watch.mode, WatchMode::Doorbell),
                Some(d) => {
                    prop_assert_eq!(d.as_millis(), u128::from(w.interval_ms));
                }
            }
            if let Some(r) = &watch.reason {
                prop_assert!(!r.is_empty() && text_ok(r, limits::WATCH_REASON));
            }
            let back = v1::Watch::from(&watch);
            prop_assert_eq!(&back, &w);
            let text = watch.mode.to_string();
            prop_assert_eq!(text.parse::<WatchMode>(), Ok(watch.mode), "{}", text);
        }
    }

    /// Whatever mode and reason the agent builds, `bound` makes a watch the collector
    /// accepts as is (and `bound` is idempotent).
    #[test]
    fn bound_watches_are_accepted(mut w in raw_agent_watch()) {
        w.bound();
        let once = w.clone();
        w.bound();
        prop_assert_eq!(&w, &once, "bound is idempotent");
        match Watch::try_from(v1::Watch::from(&w)) {
            Ok(back) => prop_assert_eq!(back, w),
            Err(e) => prop_assert!(false, "refused after bound: {}", e),
        }
    }

    /// Any timestamp: no panic; what is accepted is after 2000 and at most the allowed
    /// skew ahead.
    #[test]
    fn observation_times(
        seconds in prop_oneof![
            any::<i64>(),
            -1_000_000_000..5_000_000_000i64,
            Just(253_402_300_799i64),
        ],
        nanos in prop_oneof![any::<i32>(), 0..1_000_000_000i32, Just(999_999_999)],
    ) {
        let now = OffsetDateTime::now_utc();
        let t = prost_types::Timestamp { seconds, nanos };
        if let Ok(at) = wire::observed_at("t", Some(t), now) {
            prop_assert!(at.year() >= 2000);
            prop_assert!(at - now <= time::Duration::seconds(limits::CLOCK_SKEW_SECS));
            prop_assert_eq!(wire::timestamp(at), t, "the time converts back exactly");
        }
    }

    /// A valid record survives the wire unchanged, fingerprints included.
    #[test]
    fn valid_records_round_trip(r in valid_record()) {
        assert_record_invariants(&r);
        let back = through_the_wire(&r).unwrap();
        prop_assert_eq!(&back, &r);
        prop_assert_eq!(fingerprints(&back), fingerprints(&r));
        let key = ListenerKey::try_from(v1::ListenerKey::from(&r.key)).unwrap();
        prop_assert_eq!(key, r.key);
    }

    /// Whatever a scan produced, `bound` makes it a record the collector accepts as is:
    /// the agent never has a snapshot refused for a hostile process name or a long text.
    #[test]
    fn bound_records_are_accepted(mut r in raw_agent_record()) {
        r.bound();
        let once = r.clone();
        r.bound();
        prop_assert_eq!(&r, &once, "bound is idempotent");
        match through_the_wire(&r) {
            Ok(back) => prop_assert_eq!(back, r),
            Err(e) => prop_assert!(false, "refused after bound: {}", e),
        }
    }

    /// Arbitrary bytes as an AgentMessage: decoding and validation never panic.
    #[test]
    fn arbitrary_bytes(bytes in vec(any::<u8>(), 0..600)) {
        if let Ok(m) = v1::AgentMessage::decode(bytes.as_slice()) {
            validate_message(m);
        }
    }

    /// A valid message with its bytes damaged (flipped, cut, inserted): never a panic, and
    /// whatever still decodes and validates satisfies the invariants (checked inside).
    #[test]
    fn damaged_messages(
        records in vec(valid_record(), 1..3),
        seq in any::<u64>(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8),
    ) {
        let msg = v1::AgentMessage {
            body: Some(v1::agent_message::Body::Delta(v1::Delta {
                sequence: seq,
                observed_at: Some(wire::timestamp(OffsetDateTime::now_utc())),
                opened: records.iter().map(v1::Listener::from).collect(),
                closed: records.iter().map(|r| v1::ListenerKey::from(&r.key)).collect(),
                changed: vec![],
            })),
        };
        let mut bytes = msg.encode_to_vec();
        prop_assert!(validate_message(msg));
        for (at, byte, how) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] ^= byte | 1,
                1 => bytes.truncate(i),
                _ => bytes.insert(i, byte),
            }
        }
        if let Ok(m) = v1::AgentMessage::decode(bytes.as_slice()) {
            validate_message(m);
        }
    }
}
