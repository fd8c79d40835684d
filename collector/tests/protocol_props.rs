//! Property tests of the protocol against a REAL collector (in process, real mTLS gRPC on
//! a real socket, real SQLite and a real PostgreSQL server): proptest generates sessions,
//! random sequences of operations over a small key space, and a plain model
//! (`util/model.rs`, written from docs/protocol.md) says what the collector must answer
//! and store after each message.
//!
//! Operations: valid snapshots cut into random chunks (some left half-sent, finished
//! later or abandoned), valid deltas of random opens, changes and closes, with the next,
//! an old (duplicate) or a skipped (gap) sequence, heartbeats (with a watch mode, the
//! same or another, or none), reconnects (same or new session, acked_sequence zero,
//! committed, ahead of the store or anything; with a watch mode or none; a first message
//! that is not a Hello or a bad Hello; a second Hello), and invalid messages of many
//! kinds (every field rule, bad times, bad watch modes, sequence 0, keys twice, chunks
//! out of order, messages over 4 MiB, too many listeners, an empty message). Messages go out in random
//! windows (up to 3 answers outstanding), through a relay that cuts the client's bytes
//! into random TCP pieces (`util/chunker.rs`).
//!
//! Invariants, checked against the database itself (read-only): the host's current
//! listeners equal the model's (the last valid snapshot plus the deltas applied since),
//! field for field, with fingerprints equal to `core::fingerprint`'s; the committed
//! session and sequence equal the model's; the stored watch mode is the last valid
//! Hello's, or one a heartbeat of that connection reported since (written within a
//! second; the last one once the case ends); no stored version is one the edge refuses;
//! every Ack names exactly the model's sequence and never more than the store has
//! committed; an invalid message gets INVALID_ARGUMENT (with the field named), a stale
//! snapshot of another session ABORTED, and neither changes the store; the Welcome after
//! any of it resumes where the model says.
//!
//! Cases: 64 on SQLite and 16 on PostgreSQL, or `PROPTEST_CASES` for both; a fixed seed
//! unless `PROPTEST_RNG_SEED` is set (docs/protocol.md, "Protocol properties").

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use listenscope_collector::pki;
use listenscope_collector::query::ReadOnly;
use listenscope_collector::store::DbUrl;
use listenscope_core::domain::{
    Container, Effective, Family, ProcessInfo, Protocol, Reach, Source,
};
use listenscope_core::limits;
use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord, is_unsafe_char};
use listenscope_core::watch::{Watch, WatchMode};
use listenscope_core::wire;
use listenscope_proto::v1;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use time::OffsetDateTime;
use util::chunker::Chunker;
use util::model::{Answer, Model, assert_store_is_model, hex, read_store};
use util::{Pki, RawSession, channel, msg};

type Body = v1::collector_message::Body;

/// Cases unless `PROPTEST_CASES` is set; a fixed seed unless `PROPTEST_RNG_SEED` is.
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
            RngSeed::Fixed(0x7072_6f74_6f63_6f6c)
        },
        // No failure files: a failure found becomes a named regular test.
        failure_persistence: None,
        // Each shrinking step replays a session against the collector.
        max_shrink_iters: 256,
        max_shrink_time: 180_000,
        ..base
    }
}

// ---------------------------------------------------------------------------------------
// Records over a small key space (so that deltas hit stored keys).

/// 18 keys: two namespaces × three ports × (0.0.0.0, `::` dual-stack, `::` v6only).
fn keys() -> Vec<ListenerKey> {
    let mut out = Vec::new();
    for netns in ["host", "blue"] {
        for port in [22u16, 80, 443] {
            for (family, address, v6only) in [
                (Family::Ipv4, IpAddr::V4(Ipv4Addr::UNSPECIFIED), None),
                (Family::Ipv6, IpAddr::V6(Ipv6Addr::UNSPECIFIED), Some(false)),
                (Family::Ipv6, IpAddr::V6(Ipv6Addr::UNSPECIFIED), Some(true)),
            ] {
                out.push(ListenerKey {
                    netns: netns.into(),
                    protocol: Protocol::Tcp,
                    family,
                    address,
                    port,
                    interface: None,
                    v6only,
                });
            }
        }
    }
    out
}

/// Characters the edge refuses in any text (a sample: C0, DEL, C1, soft hyphen,
/// zero-width, bidirectional override and isolate, byte order mark).
const UNSAFE: &[char] = &[
    '\0', '\u{7}', '\n', '\u{1b}', '\u{7f}', '\u{9b}', '\u{ad}', '\u{200b}', '\u{202e}',
    '\u{2066}', '\u{feff}',
];

const EDGE: &[char] = &[
    ' ',
    '~',
    '\u{a0}',
    '\u{ac}',
    '\u{ae}',
    '\u{2027}',
    '\u{202f}',
    '\u{206a}',
    '\u{fffc}',
    'é',
    '✓',
    '日',
    '\u{1f600}',
    '\u{10ffff}',
    '\'',
    '"',
    '\\',
    '%',
    '|',
];

fn safe_char() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => proptest::char::range(' ', '~'),
        2 => any::<char>().prop_filter("printable", |c| !is_unsafe_char(*c)),
        2 => select(EDGE),
    ]
}

/// Printable text of at most `max` bytes, sometimes exactly `max`.
fn text(max: usize) -> BoxedStrategy<String> {
    let cut = move |s: String| {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_string()
    };
    prop_oneof![
        8 => vec(safe_char(), 0..10).prop_map(move |v| cut(v.into_iter().collect())),
        1 => safe_char().prop_map(move |c| cut(c.to_string().repeat(max))),
    ]
    .boxed()
}

fn text1(max: usize) -> BoxedStrategy<String> {
    text(max)
        .prop_map(|s| if s.is_empty() { "x".into() } else { s })
        .boxed()
}

fn answer() -> impl Strategy<Value = FirewallAnswer> {
    (
        select(Effective::ALL.to_vec()),
        text(limits::EFFECTIVE_REASON),
        vec(text1(40), 0..3),
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

/// A valid record for one of [`keys`], with any valid value in the other fields (few
/// choices for some, so that changes are sometimes only churn: refreshed in place).
fn record() -> impl Strategy<Value = ListenerRecord> {
    let process = (
        1..=u32::MAX,
        text(limits::COMM),
        text(200),
        text(limits::USER),
    )
        .prop_map(|(pid, comm, cmdline, user)| ProcessInfo {
            pid,
            comm,
            cmdline,
            user,
        });
    let container = proptest::option::weighted(
        0.3,
        (
            text1(limits::RUNTIME),
            text(limits::CONTAINER_ID),
            proptest::option::of(text1(limits::POD_UID)),
        )
            .prop_map(|(runtime, id, pod_uid)| Container {
                runtime,
                id,
                pod_uid,
            }),
    );
    (
        (
            0..keys().len(),
            prop_oneof![Just(4026531840u64), any::<u64>()],
            reach(),
            reach(),
            any::<bool>(),
            text(limits::SHOWN_AS),
            select(vec!["tcp", "tcp6"]),
            any::<bool>(),
            any::<bool>(),
            vec(process, 0..3),
        ),
        (
            container,
            proptest::option::of(text1(limits::UNIT)),
            proptest::option::of(text1(100)),
            prop_oneof![Just(0u32), any::<u32>()],
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
            select(vec![Source::SockDiag, Source::Procfs]),
            prop_oneof![3 => 1..=4u32, 1 => 1..=limits::SOCKETS],
            answer(),
            answer(),
        ),
    )
        .prop_map(
            |(
                (
                    k,
                    netns_inode,
                    reach_ipv4,
                    reach_ipv6,
                    latent,
                    shown_as,
                    np,
                    trap,
                    hidden,
                    mut processes,
                ),
                (container, unit, cgroup, uid, freebind, transparent, source, sockets, e4, e6),
            )| {
                processes.sort_by_key(|p| p.pid);
                processes.dedup_by_key(|p| p.pid);
                ListenerRecord {
                    key: keys()[k].clone(),
                    netns_inode,
                    reach_ipv4,
                    reach_ipv6,
                    latent,
                    shown_as,
                    netstat_proto: np.into(),
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

// ---------------------------------------------------------------------------------------
// Operations.

/// Which sequence a message carries, relative to the agent's last one.
#[derive(Debug, Clone, Copy)]
enum Seq {
    Next,
    /// The last one minus this (a duplicate or an older one).
    Again(u8),
    /// A gap of 1 + this.
    Skip(u8),
}

#[derive(Debug, Clone, Copy)]
enum Acked {
    Zero,
    /// What the store has committed (what an agent that saw every Ack says).
    Committed,
    /// More than the store has committed (a restored database).
    Ahead(u8),
    Any(u64),
}

#[derive(Debug, Clone, Copy)]
enum Opening {
    Hello,
    /// A snapshot, a delta, a heartbeat or an empty message first.
    NotHello(u8),
    /// A Hello that breaks a rule.
    BadHello(u8),
    /// A valid Hello, then another.
    HelloTwice,
}

/// Where a corrupted listener or key rides.
#[derive(Debug, Clone, Copy)]
enum Place {
    Opened,
    Changed,
    Closed,
    Chunk,
}

#[derive(Debug, Clone)]
enum Bad {
    /// One field of a valid record broken (`kind`, `param`, `c`: see [`corrupt`]).
    Field {
        record: Box<ListenerRecord>,
        kind: u8,
        param: u8,
        c: char,
        place: Place,
    },
    /// A bad observation time (`how`) on a delta, chunk or heartbeat (`on`).
    Time {
        how: u8,
        on: u8,
    },
    /// A heartbeat with a watch mode that breaks a rule (`how`).
    Watch {
        how: u8,
    },
    SeqZero {
        delta: bool,
    },
    /// A chunk of the snapshot being sent with the wrong index, sequence or time, or a
    /// first chunk that is not chunk 0.
    ChunkOrder {
        how: u8,
    },
    Oversized,
    TooMany,
    EmptyBody,
    SecondHello,
}

#[derive(Debug, Clone)]
enum Op {
    Snapshot {
        records: Vec<ListenerRecord>,
        /// Chunk sizes (cycled).
        cuts: Vec<usize>,
        seq: Seq,
        at: u32,
        /// Send only this many chunks now (the rest: [`Op::Rest`]).
        stop_after: Option<usize>,
        /// Keep a key twice (the model refuses it).
        dup: bool,
    },
    /// The rest of a snapshot left half-sent (a heartbeat if there is none).
    Rest,
    Delta {
        opened: Vec<ListenerRecord>,
        changed: Vec<ListenerRecord>,
        closed: Vec<usize>,
        seq: Seq,
        at: u32,
        /// Close one of the opened keys as well (the model refuses it).
        dup: bool,
        /// Sent even when the collector waits for a snapshot (it drops it); otherwise
        /// the agent sends a snapshot of these records instead, as a real agent does.
        stubborn: bool,
    },
    /// A heartbeat with this watch mode (None: an agent from before watch modes).
    Heartbeat(Option<Watch>),
    Reconnect {
        new_session: Option<[u8; 16]>,
        acked: Acked,
        os_hostname: String,
        agent_version: String,
        /// The Hello's watch mode (None: an agent from before watch modes).
        watch: Option<Watch>,
        opening: Opening,
    },
    Bad(Bad),
}

fn seq() -> impl Strategy<Value = Seq> {
    prop_oneof![
        8 => Just(Seq::Next),
        1 => (0..3u8).prop_map(Seq::Again),
        1 => (0..3u8).prop_map(Seq::Skip),
    ]
}

/// A valid watch mode, or none; from a small set, so that heartbeats often repeat the
/// connection's mode (which the collector must not write) and sometimes change it.
fn watch() -> impl Strategy<Value = Option<Watch>> {
    let ms = |n| std::time::Duration::from_millis(n);
    proptest::option::weighted(
        0.85,
        select(vec![
            Watch::new(WatchMode::Doorbell),
            Watch::because(WatchMode::Doorbell, "UDP by polling"),
            Watch::because(
                WatchMode::Polling(ms(3000)),
                "perf_event_open refused: needs CAP_PERFMON",
            ),
            Watch::because(WatchMode::Polling(ms(1500)), "no tracefs"),
            Watch::new(WatchMode::Interval(ms(10_000))),
        ]),
    )
}

/// Milliseconds after the case's base time (two hours before it started).
fn at() -> impl Strategy<Value = u32> {
    0..7_200_000u32
}

fn op() -> impl Strategy<Value = Op> {
    let snapshot = (
        vec(record(), 0..7),
        vec(0..4usize, 1..4),
        seq(),
        at(),
        proptest::option::weighted(0.15, 1..3usize),
        proptest::bool::weighted(0.08),
    )
        .prop_map(|(records, cuts, seq, at, stop_after, dup)| Op::Snapshot {
            records,
            cuts,
            seq,
            at,
            stop_after,
            dup,
        });
    let delta = (
        vec(record(), 0..3),
        vec(record(), 0..3),
        vec(0..keys().len(), 0..3),
        seq(),
        at(),
        proptest::bool::weighted(0.08),
        proptest::bool::weighted(0.25),
    )
        .prop_map(
            |(opened, changed, closed, seq, at, dup, stubborn)| Op::Delta {
                opened,
                changed,
                closed,
                seq,
                at,
                dup,
                stubborn,
            },
        );
    let reconnect = (
        proptest::option::weighted(0.4, any::<[u8; 16]>()),
        prop_oneof![
            Just(Acked::Zero),
            Just(Acked::Committed),
            (0..3u8).prop_map(Acked::Ahead),
            any::<u64>().prop_map(Acked::Any),
        ],
        text(limits::OS_HOSTNAME),
        text(limits::AGENT_VERSION),
        watch(),
        prop_oneof![
            6 => Just(Opening::Hello),
            1 => (0..4u8).prop_map(Opening::NotHello),
            1 => (0..8u8).prop_map(Opening::BadHello),
            1 => Just(Opening::HelloTwice),
        ],
    )
        .prop_map(
            |(new_session, acked, os_hostname, agent_version, watch, opening)| Op::Reconnect {
                new_session,
                acked,
                os_hostname,
                agent_version,
                watch,
                opening,
            },
        );
    let bad = prop_oneof![
        8 => (
            record(),
            0..23u8,
            any::<u8>(),
            select(UNSAFE.to_vec()),
            select(vec![Place::Opened, Place::Changed, Place::Closed, Place::Chunk]),
        )
            .prop_map(|(record, kind, param, c, place)| Bad::Field {
                record: Box::new(record),
                kind,
                param,
                c,
                place,
            }),
        2 => (0..4u8, 0..3u8).prop_map(|(how, on)| Bad::Time { how, on }),
        1 => (0..5u8).prop_map(|how| Bad::Watch { how }),
        1 => any::<bool>().prop_map(|delta| Bad::SeqZero { delta }),
        2 => (0..4u8).prop_map(|how| Bad::ChunkOrder { how }),
        1 => Just(Bad::Oversized),
        1 => Just(Bad::TooMany),
        1 => Just(Bad::EmptyBody),
        1 => Just(Bad::SecondHello),
    ];
    prop_oneof![
        4 => snapshot,
        1 => Just(Op::Rest),
        5 => delta,
        2 => watch().prop_map(Op::Heartbeat),
        2 => reconnect,
        3 => bad.prop_map(Op::Bad),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    session: [u8; 16],
    ops: Vec<Op>,
    /// Answers outstanding at most before the driver reads them.
    window: usize,
    /// Seed of the relay's cuts.
    cuts: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<[u8; 16]>(),
        vec(op(), 1..16),
        1..=3usize,
        any::<u64>(),
    )
        .prop_map(|(session, ops, window, cuts)| Case {
            session,
            ops,
            window,
            cuts,
        })
}

// ---------------------------------------------------------------------------------------
// Breaking one field.

/// The text fields of a listener: the error's field name, its limit, and the field
/// (created when the listener has none).
type TextField = (&'static str, usize, fn(&mut v1::Listener) -> &mut String);

const TEXT_FIELDS: [TextField; 14] = [
    ("key.netns", limits::NETNS, |l| {
        &mut l.key.as_mut().unwrap().netns
    }),
    ("key.interface", limits::INTERFACE, |l| {
        &mut l.key.as_mut().unwrap().interface
    }),
    ("shown_as", limits::SHOWN_AS, |l| &mut l.shown_as),
    ("processes.comm", limits::COMM, |l| &mut owner(l).comm),
    ("processes.cmdline", limits::CMDLINE, |l| {
        &mut owner(l).cmdline
    }),
    ("processes.user", limits::USER, |l| &mut owner(l).user),
    ("container.runtime", limits::RUNTIME, |l| {
        &mut container(l).runtime
    }),
    ("container.id", limits::CONTAINER_ID, |l| {
        &mut container(l).id
    }),
    ("container.pod_uid", limits::POD_UID, |l| {
        &mut container(l).pod_uid
    }),
    ("unit", limits::UNIT, |l| &mut l.unit),
    ("cgroup", limits::CGROUP, |l| &mut l.cgroup),
    ("effective_ipv4.reason", limits::EFFECTIVE_REASON, |l| {
        &mut verdict(&mut l.effective_ipv4, "open").reason
    }),
    ("effective_ipv6.reason", limits::EFFECTIVE_REASON, |l| {
        &mut verdict(&mut l.effective_ipv6, "filtered").reason
    }),
    (
        "effective_ipv4.conditions",
        limits::EFFECTIVE_CONDITION,
        |l| {
            let v = verdict(&mut l.effective_ipv4, "restricted");
            v.verdict = "restricted".into();
            if v.conditions.is_empty() {
                v.conditions.push("saddr 10.0.0.0/8".into());
            }
            &mut v.conditions[0]
        },
    ),
];

fn owner(l: &mut v1::Listener) -> &mut v1::Process {
    if l.processes.is_empty() {
        l.processes.push(v1::Process {
            pid: 1,
            comm: "init".into(),
            ..Default::default()
        });
    }
    &mut l.processes[0]
}

fn container(l: &mut v1::Listener) -> &mut v1::Container {
    l.container.get_or_insert_with(|| v1::Container {
        runtime: "docker".into(),
        ..Default::default()
    })
}

fn verdict<'a>(v: &'a mut Option<v1::FirewallVerdict>, name: &str) -> &'a mut v1::FirewallVerdict {
    v.get_or_insert_with(|| v1::FirewallVerdict {
        verdict: name.into(),
        ..Default::default()
    })
}

/// Breaks one rule in `l`; returns what the refusal must name. Kinds 0–5, 13 and text
/// kinds on the key's fields break the key only (usable for a closed key).
fn corrupt(l: &mut v1::Listener, kind: u8, param: u8, c: char) -> &'static str {
    let key = l.key.as_mut().unwrap();
    match kind {
        0 => {
            key.port = 0;
            "key.port"
        }
        1 => {
            key.port = 65536 + u32::from(param) * 1000;
            "key.port"
        }
        2 => {
            let good = key.address.len();
            let n = (good + 1 + usize::from(param)) % 20;
            key.address = vec![7; if n == good { n + 1 } else { n }];
            "key.address"
        }
        3 => {
            key.family = if param.is_multiple_of(2) {
                0
            } else {
                3 + i32::from(param)
            };
            "key.family"
        }
        4 => {
            key.protocol = if param.is_multiple_of(2) {
                0
            } else {
                3 + i32::from(param)
            };
            "key.protocol"
        }
        5 => {
            key.netns.clear();
            "key.netns"
        }
        6 => {
            l.reach_ipv4 = 6 + i32::from(param);
            "reach_ipv4"
        }
        7 => {
            l.reach_ipv6 = 0;
            "reach_ipv6"
        }
        8 => {
            l.source = if param.is_multiple_of(2) { 0 } else { 3 };
            "source"
        }
        9 => {
            l.sockets = 0;
            "sockets"
        }
        10 => {
            l.sockets = limits::SOCKETS + 1 + u32::from(param);
            "sockets"
        }
        11 => {
            l.netstat_proto = ["sctp", "", "TCP", "tcp46"][usize::from(param % 4)].into();
            "netstat_proto"
        }
        12 => {
            owner(l).pid = 0;
            "processes.pid"
        }
        13 => {
            key.family = v1::Family::Ipv4 as i32;
            key.address = vec![10, 0, 0, 1];
            key.v6only = Some(param.is_multiple_of(2));
            "key.v6only"
        }
        14 => {
            verdict(&mut l.effective_ipv4, "open").verdict =
                ["OPEN", "closed", "n/a ", "wide open"][usize::from(param % 4)].into();
            "effective_ipv4.verdict"
        }
        15 => {
            let v = verdict(&mut l.effective_ipv6, "open");
            v.verdict = "open".into();
            v.conditions = vec!["saddr 10.0.0.0/8".into()];
            "effective_ipv6.conditions"
        }
        16 => {
            let v = verdict(&mut l.effective_ipv4, "restricted");
            v.verdict = "restricted".into();
            v.conditions.push(String::new());
            "effective_ipv4.conditions"
        }
        17 => {
            l.key = None;
            "key"
        }
        18 => {
            container(l).runtime.clear();
            "container.runtime"
        }
        19 => {
            // An unsafe character somewhere in a text field.
            let (name, _, field) = TEXT_FIELDS[usize::from(param) % TEXT_FIELDS.len()];
            let s = field(l);
            let mut at = usize::from(param) % (s.len() + 1);
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s.insert(at, c);
            name
        }
        20 => {
            // One byte (or one character) past the limit.
            let (name, max, field) = TEXT_FIELDS[usize::from(param) % TEXT_FIELDS.len()];
            *field(l) = if param.is_multiple_of(2) {
                "a".repeat(max + 1)
            } else {
                format!("{}é", "a".repeat(max - 1))
            };
            name
        }
        21 => {
            l.processes = (1..=limits::PROCESSES as u32 + 1)
                .map(|pid| v1::Process {
                    pid,
                    ..Default::default()
                })
                .collect();
            "processes"
        }
        _ => {
            let v = verdict(&mut l.effective_ipv4, "restricted");
            v.verdict = "restricted".into();
            v.conditions = (0..=limits::EFFECTIVE_CONDITIONS)
                .map(|i| format!("saddr 10.{i}.0.0/16"))
                .collect();
            "effective_ipv4.conditions"
        }
    }
}

/// Whether corruption `kind` (with `param`) touches only the key.
fn key_only(kind: u8, param: u8) -> bool {
    match kind {
        0..=5 | 13 => true,
        19 | 20 => usize::from(param) % TEXT_FIELDS.len() < 2,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// The driver: an agent that sends what the case says, checks every answer against the
// model and the store against the model.

/// What the cases exercised (printed at the end: a property that never reaches a path
/// proves nothing about it).
#[derive(Debug, Default)]
struct Stats {
    messages: usize,
    acks: usize,
    resyncs: usize,
    unanswered: usize,
    invalid: usize,
    aborted: usize,
    welcomes: usize,
    resumed: usize,
    store_checks: usize,
    live_max: usize,
}

/// A watch mode that breaks a rule (`how`), and the text its refusal must contain.
fn bad_watch(how: u8) -> (v1::Watch, &'static str) {
    let w = |kind: v1::WatchKind, interval_ms, reason: &str| v1::Watch {
        kind: kind as i32,
        interval_ms,
        reason: reason.into(),
    };
    match how {
        0 => (
            v1::Watch {
                kind: 7,
                ..w(v1::WatchKind::Polling, 3000, "")
            },
            "watch.kind: 7 is not",
        ),
        1 => (w(v1::WatchKind::Unspecified, 0, ""), "watch.kind: 0 is not"),
        2 => (w(v1::WatchKind::Polling, 0, ""), "watch.interval_ms: 0"),
        3 => (
            w(v1::WatchKind::Doorbell, 1000, ""),
            "watch.interval_ms: 1000 for doorbell",
        ),
        _ => (
            w(v1::WatchKind::Polling, 3000, "perf \u{1b}[2J"),
            "watch.reason: contains control characters",
        ),
    }
}

struct Agent {
    session: [u8; 16],
    /// The highest sequence this session used.
    last: u64,
    /// The highest Ack this session received.
    acked: u64,
    /// The watch mode it reports in its Hellos (the last one it reported).
    watch: Option<Watch>,
}

/// A snapshot left half-sent.
struct Pending {
    seq: u64,
    at: OffsetDateTime,
    next: u32,
    chunks: Vec<Vec<ListenerRecord>>,
}

struct Stream {
    s: RawSession,
    /// Answers the collector owes, in order, with what was sent.
    owed: VecDeque<(Answer, String)>,
}

struct Driver<'a> {
    pki: &'a Pki,
    relay: &'a Chunker,
    ro: &'a ReadOnly,
    host: String,
    base: OffsetDateTime,
    window: usize,
    model: Model,
    agent: Agent,
    stream: Option<Stream>,
    pending: Option<Pending>,
    /// Every message sent, for failure reports.
    log: Vec<String>,
    stats: &'a std::sync::Mutex<Stats>,
}

fn hello_msg(
    session: &[u8],
    acked: u64,
    os_hostname: &str,
    agent_version: &str,
    watch: Option<&Watch>,
) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Hello(v1::Hello {
        protocol_version: limits::PROTOCOL_VERSION,
        agent_version: agent_version.into(),
        os_hostname: os_hostname.into(),
        session_id: session.to_vec(),
        acked_sequence: acked,
        instance_id: Vec::new(),
        watch: watch.map(v1::Watch::from),
    }))
}

fn chunk_msg(
    seq: u64,
    index: u32,
    last: bool,
    at: OffsetDateTime,
    ls: Vec<v1::Listener>,
) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
        sequence: seq,
        chunk_index: index,
        last,
        observed_at: Some(wire::timestamp(at)),
        listeners: ls,
    }))
}

fn delta_msg(
    seq: u64,
    at: Option<prost_types::Timestamp>,
    opened: Vec<v1::Listener>,
    changed: Vec<v1::Listener>,
    closed: Vec<v1::ListenerKey>,
) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Delta(v1::Delta {
        sequence: seq,
        observed_at: at,
        opened,
        closed,
        changed,
    }))
}

fn wire_of(rs: &[ListenerRecord]) -> Vec<v1::Listener> {
    rs.iter().map(v1::Listener::from).collect()
}

/// Keeps the first record of each key.
fn distinct(rs: Vec<ListenerRecord>, seen: &mut BTreeSet<ListenerKey>) -> Vec<ListenerRecord> {
    rs.into_iter()
        .filter(|r| seen.insert(r.key.clone()))
        .collect()
}

impl Driver<'_> {
    fn at(&self, ms: u32) -> OffsetDateTime {
        self.base + time::Duration::milliseconds(i64::from(ms))
    }

    fn seq(&mut self, s: Seq) -> u64 {
        let n = match s {
            Seq::Next => self.agent.last + 1,
            Seq::Again(k) => self.agent.last.saturating_sub(u64::from(k)).max(1),
            Seq::Skip(k) => self.agent.last + 2 + u64::from(k),
        };
        self.agent.last = self.agent.last.max(n);
        n
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap());
    }

    async fn check_store(&self, when: &str) {
        let stored = read_store(self.ro, &self.host).await;
        self.count(|s| {
            s.store_checks += 1;
            s.live_max = s.live_max.max(stored.live.len());
        });
        assert_store_is_model(
            &stored,
            &self.model,
            &format!("{when}\nsent: {:#?}", self.log),
        );
    }

    /// Opens a stream with `first`; the expected answer is a Welcome with `resume` or the
    /// end of the stream with a status.
    async fn open(
        &mut self,
        first: v1::AgentMessage,
        expect: Result<Option<u64>, tonic::Code>,
        what: String,
    ) {
        assert!(self.stream.is_none());
        self.log.push(format!("open: {what}"));
        let ch = channel(
            self.relay.addr,
            &self.pki.path("ca.pem"),
            Some((
                &self.pki.path(&format!("{}.pem", self.host)),
                &self.pki.path(&format!("{}.key", self.host)),
            )),
        )
        .await
        .expect("connect through the relay");
        let opened = RawSession::open(ch, first).await;
        let got = match opened {
            Err(status) => Err(status),
            Ok(mut s) => match s.recv().await {
                Ok(Some(Body::Welcome(w))) => {
                    assert!(w.max_listeners_per_message >= 1000);
                    self.count(|s| {
                        s.welcomes += 1;
                        s.resumed += usize::from(w.resume_after.is_some());
                    });
                    self.stream = Some(Stream {
                        s,
                        owed: VecDeque::new(),
                    });
                    Ok(w.resume_after)
                }
                Ok(other) => panic!("{what}: expected a Welcome or a status, got {other:?}"),
                Err(status) => Err(status),
            },
        };
        match (expect, got) {
            (Ok(resume), Ok(got)) => assert_eq!(got, resume, "{what}: Welcome.resume_after"),
            (Err(code), Err(status)) => {
                assert_eq!(status.code(), code, "{what}: {status:?}");
                self.stream = None;
            }
            (expect, got) => panic!(
                "{what}: expected {expect:?}, got {got:?}\nsent: {:#?}",
                self.log
            ),
        }
        self.check_store(&what).await;
    }

    /// A valid Hello of the agent's session, as the agent sends it after any break.
    async fn connect(&mut self) {
        let watch = self.agent.watch.clone();
        let resume = self.model.hello(
            self.agent.session,
            self.agent.acked,
            "props",
            "test",
            watch.as_ref(),
        );
        let first = hello_msg(
            &self.agent.session,
            self.agent.acked,
            "props",
            "test",
            watch.as_ref(),
        );
        let what = format!("hello acked {}", self.agent.acked);
        self.open(first, Ok(resume), what).await;
        if let Some(c) = resume {
            self.agent.last = self.agent.last.max(c);
        }
    }

    async fn ensure_connected(&mut self) {
        if self.stream.is_none() {
            self.connect().await;
        }
    }

    /// Sends `m`, which the model says must get `answer`.
    async fn send(&mut self, m: v1::AgentMessage, answer: Answer, what: String) {
        self.log.push(format!("{what} -> {answer:?}"));
        self.count(|s| {
            s.messages += 1;
            match answer {
                Answer::Nothing => s.unanswered += 1,
                Answer::Ack(_) => s.acks += 1,
                Answer::Resync => s.resyncs += 1,
                Answer::End(tonic::Code::Aborted) => s.aborted += 1,
                Answer::End(_) => s.invalid += 1,
            }
        });
        let st = self.stream.as_mut().expect("connected");
        // The collector may have closed the stream already; the answer says so.
        let _ = st.s.tx.send(m).await;
        match answer {
            Answer::Nothing => {}
            Answer::End(_) => {
                st.owed.push_back((answer, what));
                self.pending = None;
                self.drain().await;
            }
            _ => {
                st.owed.push_back((answer, what));
                if st.owed.len() >= self.window {
                    self.drain().await;
                }
            }
        }
    }

    /// Reads every answer owed, checks each, then checks the whole store.
    async fn drain(&mut self) {
        let Some(st) = self.stream.as_mut() else {
            return;
        };
        let mut ended = false;
        while let Some((answer, what)) = st.owed.pop_front() {
            let got = match tokio::time::timeout(Duration::from_secs(30), st.s.rx.message()).await {
                Ok(r) => r.map(|m| m.and_then(|m| m.body)),
                Err(_) => panic!("{what}: no answer within 30 s\nsent: {:#?}", self.log),
            };
            match (&answer, got) {
                (Answer::Ack(n), Ok(Some(Body::Ack(a)))) => {
                    assert_eq!(a.sequence, *n, "{what}: Ack\nsent: {:#?}", self.log);
                    // Acknowledged means committed: the store has this session up to at
                    // least this sequence (later messages may be committed already).
                    let stored = read_store(self.ro, &self.host).await;
                    assert_eq!(stored.session, Some(hex(&self.agent.session)), "{what}");
                    assert!(
                        a.sequence <= stored.committed,
                        "{what}: Ack {} but the store has committed {}",
                        a.sequence,
                        stored.committed
                    );
                    self.agent.acked = self.agent.acked.max(a.sequence);
                }
                (Answer::Resync, Ok(Some(Body::Resync(r)))) => {
                    assert!(r.reason.contains("sequence gap"), "{what}: {}", r.reason);
                }
                (Answer::End(code), Err(status)) => {
                    assert_eq!(
                        status.code(),
                        *code,
                        "{what}: {status:?}\nsent: {:#?}",
                        self.log
                    );
                    if let Some(needle) = what.split("needle ").nth(1) {
                        assert!(
                            status.message().contains(needle),
                            "{what}: {needle:?} not in {:?}",
                            status.message()
                        );
                    }
                    ended = true;
                }
                (answer, got) => panic!(
                    "{what}: expected {answer:?}, got {got:?}\nsent: {:#?}",
                    self.log
                ),
            }
        }
        if ended {
            self.stream = None;
            self.model.disconnect();
        }
        self.check_store("after the answers").await;
    }

    /// Closes the stream as an agent does (end of its requests); the collector ends it
    /// cleanly once it has answered everything.
    async fn close(&mut self) {
        if self.stream.is_none() {
            return;
        }
        self.drain().await;
        let Some(st) = self.stream.take() else { return };
        let Stream { s, .. } = st;
        let RawSession { tx, mut rx } = s;
        drop(tx);
        let end = tokio::time::timeout(Duration::from_secs(30), rx.message())
            .await
            .expect("the stream ends within 30 s");
        assert!(
            matches!(end, Ok(None)),
            "a closed stream ends cleanly, got {end:?}\nsent: {:#?}",
            self.log
        );
        self.log.push("close".into());
        self.model.disconnect();
        self.pending = None;
    }

    async fn send_chunks(&mut self) {
        while let Some(p) = self.pending.as_mut() {
            let Some(records) = (!p.chunks.is_empty()).then(|| p.chunks.remove(0)) else {
                self.pending = None;
                break;
            };
            let (seq, at, index) = (p.seq, p.at, p.next);
            let last = p.chunks.is_empty();
            p.next += 1;
            let answer = self.model.chunk(seq, index, last, at, &records);
            let what = format!(
                "chunk seq {seq} #{index} last {last} ({} listeners)",
                records.len()
            );
            if last {
                self.pending = None;
            }
            self.send(
                chunk_msg(seq, index, last, at, wire_of(&records)),
                answer,
                what,
            )
            .await;
        }
    }

    async fn step(&mut self, op: Op) {
        match op {
            Op::Reconnect {
                new_session,
                acked,
                os_hostname,
                agent_version,
                watch,
                opening,
            } => {
                self.agent.watch = watch;
                self.reconnect(new_session, acked, &os_hostname, &agent_version, opening)
                    .await
            }
            Op::Snapshot {
                records,
                cuts,
                seq,
                at,
                stop_after,
                dup,
            } => {
                self.ensure_connected().await;
                let mut records = distinct(records, &mut BTreeSet::new());
                if dup && let Some(first) = records.first().cloned() {
                    records.push(first);
                }
                let mut chunks = Vec::new();
                let mut rest = records.as_slice();
                for (i, n) in cuts.iter().cycle().enumerate() {
                    // Empty chunks only in the first round of cuts: then there is progress.
                    let n = if i >= cuts.len() { (*n).max(1) } else { *n };
                    let n = n.min(rest.len());
                    chunks.push(rest[..n].to_vec());
                    rest = &rest[n..];
                    if rest.is_empty() {
                        break;
                    }
                }
                let seq = self.seq(seq);
                let total = chunks.len();
                self.pending = Some(Pending {
                    seq,
                    at: self.at(at),
                    next: 0,
                    chunks,
                });
                match stop_after.filter(|n| *n < total) {
                    None => self.send_chunks().await,
                    Some(n) => {
                        for _ in 0..n {
                            let p = self.pending.as_mut().expect("pending");
                            let records = p.chunks.remove(0);
                            let (seq, at, index) = (p.seq, p.at, p.next);
                            p.next += 1;
                            let answer = self.model.chunk(seq, index, false, at, &records);
                            let what = format!("chunk seq {seq} #{index} of {total}, rest later");
                            self.send(
                                chunk_msg(seq, index, false, at, wire_of(&records)),
                                answer,
                                what,
                            )
                            .await;
                            if self.stream.is_none() {
                                break;
                            }
                        }
                    }
                }
            }
            Op::Rest => {
                if self.pending.is_some() && self.stream.is_some() {
                    self.send_chunks().await;
                } else {
                    self.heartbeat(self.agent.watch.clone()).await;
                }
            }
            Op::Delta {
                opened,
                changed,
                closed,
                seq,
                at,
                dup,
                stubborn,
            } => {
                self.ensure_connected().await;
                if self.model.expects_snapshot() && !stubborn && self.pending.is_none() {
                    let records = opened.into_iter().chain(changed).collect();
                    let snapshot = Op::Snapshot {
                        records,
                        cuts: vec![2],
                        seq: Seq::Next,
                        at,
                        stop_after: None,
                        dup: false,
                    };
                    return Box::pin(self.step(snapshot)).await;
                }
                let mut seen = BTreeSet::new();
                let opened = distinct(opened, &mut seen);
                let changed = distinct(changed, &mut seen);
                let mut closed: Vec<ListenerKey> = closed
                    .into_iter()
                    .map(|i| keys()[i].clone())
                    .filter(|k| seen.insert(k.clone()))
                    .collect();
                if dup && let Some(first) = opened.first() {
                    closed.push(first.key.clone());
                }
                let seq = self.seq(seq);
                let answer = self.model.delta(seq, &opened, &changed, &closed);
                let what = format!(
                    "delta seq {seq} (+{} ~{} -{})",
                    opened.len(),
                    changed.len(),
                    closed.len()
                );
                let m = delta_msg(
                    seq,
                    Some(wire::timestamp(self.at(at))),
                    wire_of(&opened),
                    wire_of(&changed),
                    closed.iter().map(v1::ListenerKey::from).collect(),
                );
                self.send(m, answer, what).await;
            }
            Op::Heartbeat(watch) => self.heartbeat(watch).await,
            Op::Bad(bad) => {
                self.ensure_connected().await;
                let (m, what) = self.bad(bad);
                let answer = self.model.invalid();
                self.send(m, answer, what).await;
            }
        }
    }

    /// A heartbeat reporting `watch`; the agent's mode from then on (its next Hellos).
    async fn heartbeat(&mut self, watch: Option<Watch>) {
        self.ensure_connected().await;
        let answer = self.model.heartbeat(watch.as_ref());
        let what = match &watch {
            Some(w) => format!("heartbeat {}", w.mode),
            None => "heartbeat without a watch mode".into(),
        };
        if watch.is_some() {
            self.agent.watch.clone_from(&watch);
        }
        let m = msg(v1::agent_message::Body::Heartbeat(v1::Heartbeat {
            observed_at: Some(wire::timestamp(OffsetDateTime::now_utc())),
            watch: watch.as_ref().map(v1::Watch::from),
        }));
        self.send(m, answer, what).await;
    }

    async fn reconnect(
        &mut self,
        new_session: Option<[u8; 16]>,
        acked: Acked,
        os_hostname: &str,
        agent_version: &str,
        opening: Opening,
    ) {
        self.close().await;
        let now = Some(wire::timestamp(OffsetDateTime::now_utc()));
        match opening {
            Opening::Hello | Opening::HelloTwice => {
                if let Some(s) = new_session {
                    self.agent = Agent {
                        session: s,
                        last: 0,
                        acked: 0,
                        watch: self.agent.watch.take(),
                    };
                }
                let acked = match acked {
                    Acked::Zero => 0,
                    Acked::Committed => self.model.committed,
                    Acked::Ahead(k) => self.model.committed + 1 + u64::from(k),
                    Acked::Any(n) => n,
                };
                let watch = self.agent.watch.clone();
                let resume = self.model.hello(
                    self.agent.session,
                    acked,
                    os_hostname,
                    agent_version,
                    watch.as_ref(),
                );
                let first = hello_msg(
                    &self.agent.session,
                    acked,
                    os_hostname,
                    agent_version,
                    watch.as_ref(),
                );
                self.open(
                    first,
                    Ok(resume),
                    format!("hello new {} acked {acked}", new_session.is_some()),
                )
                .await;
                if let Some(c) = resume {
                    self.agent.last = self.agent.last.max(c);
                }
                if matches!(opening, Opening::HelloTwice) {
                    let answer = self.model.invalid();
                    let again = hello_msg(&self.agent.session, acked, "again", "test", None);
                    self.send(
                        again,
                        answer,
                        "second Hello, needle Hello may only be the first".into(),
                    )
                    .await;
                }
            }
            Opening::NotHello(kind) => {
                let first = match kind {
                    0 => chunk_msg(1, 0, true, OffsetDateTime::now_utc(), vec![]),
                    1 => delta_msg(1, now, vec![], vec![], vec![]),
                    2 => msg(v1::agent_message::Body::Heartbeat(v1::Heartbeat {
                        observed_at: now,
                        watch: None,
                    })),
                    _ => v1::AgentMessage { body: None },
                };
                self.model.invalid();
                self.open(
                    first,
                    Err(tonic::Code::InvalidArgument),
                    format!("first message not a Hello ({kind})"),
                )
                .await;
            }
            Opening::BadHello(kind) => {
                let mut h = v1::Hello {
                    protocol_version: limits::PROTOCOL_VERSION,
                    agent_version: agent_version.into(),
                    os_hostname: os_hostname.into(),
                    session_id: self.agent.session.to_vec(),
                    acked_sequence: 0,
                    instance_id: Vec::new(),
                    watch: self.agent.watch.as_ref().map(v1::Watch::from),
                };
                match kind {
                    0 => h.protocol_version = 2,
                    1 => h.session_id.truncate(15),
                    2 => h.os_hostname.push('\u{1b}'),
                    3 => h.agent_version = "v".repeat(limits::AGENT_VERSION + 1),
                    4 => h.instance_id = vec![1, 2, 3],
                    k => h.watch = Some(bad_watch(k - 5).0),
                }
                self.model.invalid();
                let first = msg(v1::agent_message::Body::Hello(h));
                self.open(
                    first,
                    Err(tonic::Code::InvalidArgument),
                    format!("bad Hello ({kind})"),
                )
                .await;
            }
        }
    }

    /// An invalid message and its description (with the text the refusal must contain
    /// after `needle `).
    fn bad(&mut self, bad: Bad) -> (v1::AgentMessage, String) {
        let now = OffsetDateTime::now_utc();
        let next = self.agent.last + 1;
        match bad {
            Bad::Field {
                record,
                kind,
                param,
                c,
                place,
            } => {
                let mut l = v1::Listener::from(&*record);
                let needle = corrupt(&mut l, kind, param, c);
                let what = format!(
                    "{place:?} with {needle} broken ({kind}/{param}/{c:?}), needle {needle}"
                );
                let ts = Some(wire::timestamp(now));
                let m = match place {
                    Place::Closed if key_only(kind, param) => {
                        delta_msg(next, ts, vec![], vec![], vec![l.key.unwrap()])
                    }
                    Place::Opened | Place::Closed => delta_msg(next, ts, vec![l], vec![], vec![]),
                    Place::Changed => delta_msg(next, ts, vec![], vec![l], vec![]),
                    Place::Chunk => match &self.pending {
                        Some(p) => chunk_msg(p.seq, p.next, false, p.at, vec![l]),
                        None => chunk_msg(next, 0, true, now, vec![l]),
                    },
                };
                (m, what)
            }
            Bad::Time { how, on } => {
                let (t, needle) = match how {
                    0 => (None, "observed_at: missing"),
                    1 => (
                        Some(wire::timestamp(now + time::Duration::minutes(11))),
                        "ahead of the collector's clock",
                    ),
                    2 => (
                        Some(prost_types::Timestamp {
                            seconds: 946_684_799,
                            nanos: 0,
                        }),
                        "before 2000",
                    ),
                    _ => (
                        Some(prost_types::Timestamp {
                            seconds: now.unix_timestamp(),
                            nanos: 1_000_000_000,
                        }),
                        "nanos",
                    ),
                };
                let m = match on {
                    0 => delta_msg(next, t, vec![], vec![], vec![]),
                    1 => msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
                        sequence: next,
                        chunk_index: self.pending.as_ref().map_or(0, |p| p.next),
                        last: true,
                        observed_at: t,
                        listeners: vec![],
                    })),
                    _ => msg(v1::agent_message::Body::Heartbeat(v1::Heartbeat {
                        observed_at: t,
                        watch: None,
                    })),
                };
                (m, format!("bad time {how} on {on}, needle {needle}"))
            }
            Bad::Watch { how } => {
                let (w, needle) = bad_watch(how);
                let m = msg(v1::agent_message::Body::Heartbeat(v1::Heartbeat {
                    observed_at: Some(wire::timestamp(now)),
                    watch: Some(w),
                }));
                (m, format!("bad watch mode {how}, needle {needle}"))
            }
            Bad::SeqZero { delta } => {
                let m = if delta {
                    delta_msg(0, Some(wire::timestamp(now)), vec![], vec![], vec![])
                } else {
                    chunk_msg(0, 0, true, now, vec![])
                };
                (m, "sequence 0, needle 0 is not a sequence number".into())
            }
            Bad::ChunkOrder { how } => {
                let m = match &self.pending {
                    Some(p) => match how {
                        0 => chunk_msg(p.seq, p.next + 1, true, p.at, vec![]),
                        1 => chunk_msg(p.seq + 1, p.next, true, p.at, vec![]),
                        2 => chunk_msg(
                            p.seq,
                            p.next,
                            true,
                            p.at + time::Duration::milliseconds(1),
                            vec![],
                        ),
                        _ => chunk_msg(p.seq, p.next.saturating_sub(1), true, p.at, vec![]),
                    },
                    None => chunk_msg(next, 1 + u32::from(how), true, now, vec![]),
                };
                (m, "chunk out of order, needle chunk".into())
            }
            Bad::Oversized => {
                let ls: Vec<v1::Listener> = (1..=700u32)
                    .map(|p| {
                        let mut l = util::listener("host", p);
                        l.processes[0].cmdline = "x".repeat(6500);
                        l
                    })
                    .collect();
                let m = delta_msg(next, Some(wire::timestamp(now)), ls, vec![], vec![]);
                (
                    m,
                    "over 4 MiB, needle exceeds the 4194304-byte limit".into(),
                )
            }
            Bad::TooMany => {
                let closed = (1..=5001u32)
                    .map(|p| util::listener("host", p).key.unwrap())
                    .collect();
                let m = delta_msg(next, Some(wire::timestamp(now)), vec![], vec![], closed);
                (
                    m,
                    "5001 listeners, needle delta carries 5001 listeners".into(),
                )
            }
            Bad::EmptyBody => (
                v1::AgentMessage { body: None },
                "empty message, needle empty AgentMessage".into(),
            ),
            Bad::SecondHello => (
                hello_msg(&self.agent.session, 0, "again", "test", None),
                "second Hello, needle Hello may only be the first".into(),
            ),
        }
    }
}

async fn run_case(
    pki: &Pki,
    relay: &Chunker,
    ro: &ReadOnly,
    host: &str,
    case: Case,
    stats: &std::sync::Mutex<Stats>,
) {
    relay.set_seed(case.cuts);
    let now = OffsetDateTime::now_utc();
    // Whole milliseconds: SQLite keeps times to the millisecond, and the stale-snapshot
    // rule compares the stored time with the incoming one.
    let base = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap()
        - time::Duration::hours(2);
    let mut d = Driver {
        pki,
        relay,
        ro,
        host: host.to_string(),
        base,
        window: case.window,
        model: Model::default(),
        agent: Agent {
            session: case.session,
            last: 0,
            acked: 0,
            watch: Some(Watch::new(WatchMode::Interval(
                std::time::Duration::from_secs(10),
            ))),
        },
        stream: None,
        pending: None,
        log: Vec::new(),
        stats,
    };
    for op in case.ops {
        d.step(op).await;
    }
    d.close().await;
    d.check_store("at the end of the case").await;
    // The watch mode a heartbeat changed is written with the next group commit (within a
    // second, or later when PostgreSQL's row was held by another writer): it settles on
    // the last one reported.
    let settled = d.model.watch_settled();
    let what = format!("the last watch mode reported, {settled:?}");
    util::eventually(10, &what, || async {
        read_store(ro, host).await.watch == settled
    })
    .await;
}

/// Runs the property against a collector on `db`: one host (and certificate) per case.
fn run_props(db: DbUrl, cases: u32, tag: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pki = Pki::new(&[]);
    let (collector, relay, ro) = rt.block_on(async {
        let c = util::InProcess::start(&pki, &db).await;
        let relay = Chunker::start(c.addr).await;
        let ro = ReadOnly::open(&db).await.unwrap();
        (c, relay, ro)
    });
    let n = AtomicUsize::new(0);
    let stats = std::sync::Mutex::new(Stats::default());
    let mut runner = TestRunner::new(config(cases));
    let result = runner.run(&case(), |case| {
        let host = format!("{tag}-{}", n.fetch_add(1, Ordering::Relaxed));
        // `LISTENSCOPE_PROPS_TRACE=1`: each case before it runs (a hang shows its case).
        if std::env::var_os("LISTENSCOPE_PROPS_TRACE").is_some() {
            eprintln!("{host}: {case:#?}");
        }
        pki::issue(pki.dir.path(), &host, 30).unwrap();
        rt.block_on(run_case(&pki, &relay, &ro, &host, case, &stats));
        Ok(())
    });
    rt.block_on(async {
        ro.close().await;
        drop(relay);
        collector.shutdown().await;
    });
    eprintln!(
        "{tag}: {} cases (with shrinking): {:?}",
        n.load(Ordering::Relaxed),
        stats.lock().unwrap()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn sessions_against_a_real_collector_on_sqlite() {
    let dir = util::TempDir::new("props");
    run_props(DbUrl::Sqlite(dir.path().join("ls.db")), 64, "sq");
}

#[test]
fn sessions_against_a_real_collector_on_postgres() {
    let server = util::pg::PgServer::start();
    let url = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(server.database("props"));
    run_props(DbUrl::Postgres(url), 16, "pg");
}

// ---------------------------------------------------------------------------------------
// Regular tests for what the properties found.

/// Found by the properties (a valid-looking `sockets` past 2^31 − 1): PostgreSQL stores
/// the count in an `integer` column, so a new row failed its insert with UNAVAILABLE
/// forever (the agent retries the same message) and a refresh in place wrapped it
/// negative (`as i32`); SQLite stored it. The edge now refuses counts past
/// `limits::SOCKETS` with INVALID_ARGUMENT, and nothing of the message is stored.
async fn sockets_past_the_column_are_refused(db: &DbUrl) {
    let pki = Pki::new(&["h1"]);
    let c = util::InProcess::start(&pki, db).await;
    let mut s = util::session_as(&pki, c.addr, "h1", util::hello(1, 0, "h1")).await;
    assert!(matches!(s.recv().await, Ok(Some(Body::Welcome(_)))));
    s.send(util::snapshot(1, vec![util::listener("host", 80)]))
        .await;
    assert!(matches!(s.recv().await, Ok(Some(Body::Ack(a))) if a.sequence == 1));
    let sockets = |db: &DbUrl| {
        let db = db.clone();
        async move {
            util::query(
                &db,
                "SELECT port, sockets FROM current_listeners ORDER BY port",
                &[],
            )
            .await
            .rows
        }
    };
    let before = sockets(db).await;
    // A refresh in place (only the socket count changes), then a new row.
    let mut refresh = util::listener("host", 80);
    refresh.sockets = 1 << 31;
    let mut insert = util::listener("host", 443);
    insert.sockets = u32::MAX;
    for (seq, m) in [
        (
            2,
            delta_msg(2, Some(util::now_ts()), vec![], vec![refresh], vec![]),
        ),
        (
            2,
            util::snapshot(2, vec![util::listener("host", 80), insert]),
        ),
    ] {
        let mut s = util::session_as(&pki, c.addr, "h1", util::hello(1, 1, "h1")).await;
        assert!(matches!(s.recv().await, Ok(Some(Body::Welcome(_)))));
        s.send(m).await;
        let status = match s.recv().await {
            Err(status) => status,
            Ok(other) => panic!("sequence {seq}: expected a refusal, got {other:?}"),
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("sockets: "), "{status:?}");
        assert_eq!(sockets(db).await, before, "nothing of it is stored");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_past_the_column_are_refused_on_sqlite() {
    let dir = util::TempDir::new("sockets");
    sockets_past_the_column_are_refused(&DbUrl::Sqlite(dir.path().join("ls.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_past_the_column_are_refused_on_postgres() {
    // On this thread: the server is tied to its starting thread (PR_SET_PDEATHSIG).
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let url = server.database("sockets").await;
    sockets_past_the_column_are_refused(&DbUrl::Postgres(url)).await;
}
