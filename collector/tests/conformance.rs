//! One storage conformance suite, run unchanged against SQLite and against a real
//! PostgreSQL server that the test starts itself (`util::pg`). Every test is written once
//! (a function of the database URL) and instantiated per backend by `both_databases!`, so both
//! databases answer every question the same way.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::IpAddr;

use listenscope_collector::history;
use listenscope_collector::query::{self, Param, QueryError, ReadOnly};
use listenscope_collector::store::{Applied, DbUrl, Message, Store, StoreOptions};
use listenscope_core::diff::Changes;
use listenscope_core::domain::{Effective, Family, ProcessInfo, Protocol, Reach, Source};
use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

both_databases!(
    group_commit_burst_and_fencing,
    awkward_text_round_trips,
    snapshots_versions_and_views,
    delta_rules,
    point_in_time_and_diff,
    retention_prunes_only_ended_history,
    query_is_read_only,
    ten_thousand_listeners,
    hosts_ingest_concurrently,
    firewall_verdicts_round_trip,
    firewall_verdicts_history_and_headline,
    effective_exposure_view,
);

// ---------------------------------------------------------------------------------------

/// A day ago, on a whole second, fixed for the whole test run: the base of every
/// scenario's timeline.
fn base() -> OffsetDateTime {
    static BASE: std::sync::OnceLock<OffsetDateTime> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        (OffsetDateTime::now_utc() - Duration::days(1))
            .replace_nanosecond(0)
            .unwrap()
    })
}

fn rec(
    proto: Protocol,
    addr: &str,
    port: u16,
    v6only: Option<bool>,
    reach: (Reach, Reach),
    comm: &str,
    pid: u32,
) -> ListenerRecord {
    let address: IpAddr = addr.parse().unwrap();
    let family = if address.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    };
    let netstat_proto = match (proto, family) {
        (Protocol::Tcp, Family::Ipv4) => "tcp",
        (Protocol::Tcp, Family::Ipv6) => "tcp6",
        (Protocol::Udp, Family::Ipv4) => "udp",
        (Protocol::Udp, Family::Ipv6) => "udp6",
    };
    // netstat's form: v4-mapped addresses print as IPv4 (`10.0.0.5:80`), others as is.
    let shown_as = match address {
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            format!("{}:{port}", a.to_ipv4_mapped().unwrap())
        }
        a => format!("{a}:{port}"),
    };
    ListenerRecord {
        key: ListenerKey {
            netns: "host".into(),
            protocol: proto,
            family,
            address,
            port,
            interface: None,
            v6only,
        },
        netns_inode: 4026531833,
        reach_ipv4: reach.0,
        reach_ipv6: reach.1,
        latent: false,
        shown_as,
        netstat_proto: netstat_proto.into(),
        trap: family == Family::Ipv6 && reach.0.accepts(),
        // The agent decides this per port; every port in this suite has a single kind of
        // socket exposed over IPv4, so the per-socket form of the rule is the same here.
        hidden_ipv4_exposure: family == Family::Ipv6 && reach.0.exposed(),
        processes: vec![ProcessInfo {
            pid,
            comm: comm.into(),
            cmdline: format!("/usr/sbin/{comm}"),
            user: "root".into(),
        }],
        container: None,
        unit: Some(format!("{comm}.service")),
        cgroup: Some(format!("/system.slice/{comm}.service")),
        uid: 0,
        freebind: Some(false),
        transparent: Some(false),
        source: Source::SockDiag,
        sockets: 1,
        // A namespace without firewall rules, as the agent answers for it.
        effective_ipv4: open_or_na(reach.0),
        effective_ipv6: open_or_na(reach.1),
    }
}

/// `open` (no rules) for a version the socket accepts from off-host, else `n/a`.
fn open_or_na(reach: Reach) -> FirewallAnswer {
    if reach.exposed() {
        FirewallAnswer::new(Effective::Open, "no firewall rules in this namespace")
    } else {
        FirewallAnswer::new(Effective::NotApplicable, "not reachable from off-host")
    }
}

use Reach::{Any, None as No};

fn dual80(comm: &str, pid: u32) -> ListenerRecord {
    rec(Protocol::Tcp, "::", 80, Some(false), (Any, Any), comm, pid)
}
fn v6only80() -> ListenerRecord {
    rec(Protocol::Tcp, "::", 80, Some(true), (No, Any), "nginx", 10)
}
fn ssh4(pid: u32) -> ListenerRecord {
    rec(Protocol::Tcp, "0.0.0.0", 22, None, (Any, No), "sshd", pid)
}
fn ssh6() -> ListenerRecord {
    rec(Protocol::Tcp, "::", 22, Some(true), (No, Any), "sshd", 20)
}
fn dns() -> ListenerRecord {
    rec(
        Protocol::Udp,
        "::",
        53,
        Some(false),
        (Any, Any),
        "dnsmasq",
        30,
    )
}

/// Many hosts at once through the group committer: every message gets the outcome it
/// would have had alone (duplicates, gaps and fenced connections included), the maintained
/// headline table equals the headline computed from the live listeners, and each host's
/// maintained listener count equals its live rows.
async fn group_commit_burst_and_fencing(db: &DbUrl) {
    const HOSTS: usize = 1500;
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..HOSTS {
        let store = store.clone();
        tasks.spawn(async move {
            let name = format!("burst-{i:05}");
            let h = store.hello(&name, &name, "test", now).await.unwrap();
            let session = [(i % 251) as u8 + 1; 16];
            let mut snap: Vec<ListenerRecord> = (0..20u16)
                .map(|p| {
                    rec(
                        Protocol::Tcp,
                        "::",
                        2000 + p,
                        Some(true),
                        (No, Any),
                        "svc",
                        5,
                    )
                })
                .collect();
            if i % 3 == 0 {
                snap.push(dual(80, "apache2", 7)); // hidden
            }
            let rows = snap.len();
            assert_eq!(
                store
                    .apply_snapshot(h.host_id, &session, 1, base(), snap.clone(), now)
                    .await
                    .unwrap(),
                Applied::Committed { rows }
            );
            // A resend is recognised; a gap is not applied.
            assert_eq!(
                store
                    .apply_snapshot(h.host_id, &session, 1, base(), snap, now)
                    .await
                    .unwrap(),
                Applied::Duplicate { committed: 1 }
            );
            assert_eq!(
                store
                    .apply_delta(h.host_id, &session, 5, base(), Changes::default(), now)
                    .await
                    .unwrap(),
                Applied::Gap { committed: 1 }
            );
            let open = Changes {
                opened: vec![dual(443, "nginx", 8)],
                ..Changes::default()
            };
            let at = base() + Duration::seconds(1);
            assert_eq!(
                store
                    .apply_delta(h.host_id, &session, 2, at, open, now)
                    .await
                    .unwrap(),
                Applied::Committed { rows: 1 }
            );
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    let hidden = HOSTS.div_ceil(3) + HOSTS;
    assert_eq!(
        same(db, "SELECT count(*) FROM hidden_ipv4_exposure").await,
        vec![vec![json!(hidden)]]
    );
    let maintained = same(
        db,
        "SELECT host, netns, protocol, port, shown_as, processes FROM hidden_ipv4_exposure
         ORDER BY host, port",
    )
    .await;
    let computed = rows(
        db,
        "SELECT host, netns, protocol, port,
                group_concat(DISTINCT shown_as ORDER BY shown_as),
                group_concat(DISTINCT NULLIF(processes, '') ORDER BY NULLIF(processes, ''))
         FROM current_listeners GROUP BY host, netns, protocol, port
         HAVING max(hidden_ipv4_exposure) = 1 ORDER BY host, port",
        "SELECT host, netns, protocol, port,
                string_agg(DISTINCT shown_as COLLATE \"C\", ',' ORDER BY shown_as COLLATE \"C\"),
                string_agg(DISTINCT NULLIF(processes, '') COLLATE \"C\", ','
                           ORDER BY NULLIF(processes, '') COLLATE \"C\")
         FROM current_listeners GROUP BY host, netns, protocol, port
         HAVING bool_or(hidden_ipv4_exposure) ORDER BY host, port",
        &[],
    )
    .await;
    assert_eq!(
        maintained, computed,
        "hidden_port equals the computed headline"
    );
    assert_eq!(
        same(
            db,
            "SELECT count(*) FROM hosts h WHERE listeners <>
                 (SELECT count(*) FROM current_listeners c WHERE c.host = h.host)",
        )
        .await,
        vec![vec![json!(0)]],
        "every host's maintained count equals its live rows"
    );

    // Two connections of one host: after the second Hello, the first may not write.
    let first = store.hello("burst-00000", "x", "test", now).await.unwrap();
    let second = store.hello("burst-00000", "x", "test", now).await.unwrap();
    assert_eq!(second.epoch, first.epoch + 1);
    let session = [1u8; 16];
    let one = |port| Changes {
        opened: vec![dual(port, "late", 9)],
        ..Changes::default()
    };
    let at = base() + Duration::seconds(2);
    assert_eq!(
        store
            .apply_as(&first, &session, 3, at, Message::Delta(one(8080)), now)
            .await
            .unwrap(),
        Applied::TakenOver
    );
    assert_eq!(
        store
            .apply_as(&second, &session, 3, at, Message::Delta(one(8081)), now)
            .await
            .unwrap(),
        Applied::Committed { rows: 1 }
    );
    assert_eq!(
        same(
            db,
            "SELECT port FROM current_listeners WHERE host = 'burst-00000' AND port >= 8080",
        )
        .await,
        vec![vec![json!(8081)]]
    );

    // On PostgreSQL the writers refreshed the planner's statistics after the first 50,000
    // rows (this test writes about 67,000): a never-analyzed table is planned as if it
    // were a few pages, and a delta's headline rebuild then read every live row.
    if let DbUrl::Postgres(_) = db {
        let mut analyzed = json!(0);
        for _ in 0..120 {
            analyzed = rows(
                db,
                "SELECT 1",
                "SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'listener'",
                &[],
            )
            .await[0][0]
                .clone();
            if analyzed.as_i64().is_some_and(|n| n >= 1) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        assert!(
            analyzed.as_i64().is_some_and(|n| n >= 1),
            "listener was never analyzed by the writers: {analyzed}"
        );
    }
    store.close().await;
}

fn dual(port: u16, comm: &str, pid: u32) -> ListenerRecord {
    let mut r = rec(
        Protocol::Tcp,
        "::",
        port,
        Some(false),
        (Any, Any),
        comm,
        pid,
    );
    r.hidden_ipv4_exposure = true;
    r.trap = true;
    r
}

/// Text with tabs, line ends, backslashes, quotes and non-ASCII is stored and read back
/// byte for byte (PostgreSQL writes new rows with COPY, whose text format escapes them).
async fn awkward_text_round_trips(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let h = store.hello("h1", "h1", "test", now).await.unwrap();
    let mut r = ssh4(20);
    let cmdline = "/usr/sbin/sshd -o 'Banner=a\tb' \\N\tx\ny\r\\ \"q\" é 🦀";
    r.processes[0].cmdline = cmdline.to_string();
    r.processes[0].user = "us\\er\t1".to_string();
    r.unit = Some("a\\N.service".to_string());
    // Enough rows that PostgreSQL takes its COPY path (small inserts use UNNEST, which the
    // other tests cover).
    let mut records = vec![r];
    records.extend((1000..3500).map(|port| {
        let mut o = ssh4(20);
        o.key.port = port;
        o.processes[0].cmdline = format!("worker\t{port}\n\\");
        o
    }));
    store
        .apply_snapshot(h.host_id, S1, 1, now, records, now)
        .await
        .unwrap();
    let got = same(
        db,
        "SELECT process_details, unit FROM current_listeners WHERE host = 'h1' AND port = 22",
    )
    .await;
    let details: Value = match &got[0][0] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        v => v.clone(),
    };
    assert_eq!(details[0]["cmdline"], cmdline);
    assert_eq!(details[0]["user"], "us\\er\t1");
    assert_eq!(got[0][1], json!("a\\N.service"));
    let other = same(
        db,
        "SELECT process_details FROM current_listeners WHERE host = 'h1' AND port = 3499",
    )
    .await;
    let details: Value = match &other[0][0] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        v => v.clone(),
    };
    assert_eq!(details[0]["cmdline"], "worker\t3499\n\\");
    store.close().await;
}

async fn open(db: &DbUrl) -> Store {
    Store::open(db, &StoreOptions::default()).await.unwrap()
}

/// Runs SQL on a read-only handle; booleans become 0/1 so both backends compare equal.
async fn rows(db: &DbUrl, sqlite: &str, postgres: &str, params: &[Param]) -> Vec<Vec<Value>> {
    let ro = ReadOnly::open(db).await.unwrap();
    let rs = ro.run(ro.pick(sqlite, postgres), params).await.unwrap();
    ro.close().await;
    rs.rows
        .into_iter()
        .map(|r| r.into_iter().map(norm).collect())
        .collect()
}

async fn same(db: &DbUrl, sql: &str) -> Vec<Vec<Value>> {
    rows(db, sql, sql, &[]).await
}

async fn columns(db: &DbUrl, view: &str) -> Vec<String> {
    let ro = ReadOnly::open(db).await.unwrap();
    let rs = ro.run(&format!("SELECT * FROM {view}"), &[]).await.unwrap();
    ro.close().await;
    rs.columns
}

fn norm(v: Value) -> Value {
    match v {
        Value::Bool(b) => Value::from(i64::from(b)),
        other => other,
    }
}

fn t(at: OffsetDateTime) -> String {
    listenscope_collector::timefmt::format(at)
}

const S1: &[u8] = &[1; 16];
const S2: &[u8] = &[2; 16];

async fn snapshots_versions_and_views(db: &DbUrl) {
    let store = open(db).await;
    let (t1, t2) = (base(), base() + Duration::minutes(10));
    let now = OffsetDateTime::now_utc();
    let h = store.hello("h1", "web-01", "0.1.0", now).await.unwrap();
    assert_eq!((h.session_id.clone(), h.committed_seq), (None, 0));
    let applied = store
        .apply_snapshot(
            h.host_id,
            S1,
            1,
            t1,
            vec![dual80("apache2", 100), ssh4(20), ssh6(), dns()],
            now,
        )
        .await
        .unwrap();
    assert_eq!(applied, Applied::Committed { rows: 4 });
    // Second snapshot: port 80's owner changed by name (material), sshd's pid only
    // (refreshed in place), DNS gone, a specific 10.0.0.5:8080 appeared.
    let specific = rec(
        Protocol::Tcp,
        "10.0.0.5",
        8080,
        None,
        (Reach::Specific, No),
        "java",
        40,
    );
    // A second port-80 socket nobody holds (a kernel socket): no owner names.
    let mut ownerless = rec(
        Protocol::Tcp,
        "::ffff:10.0.0.5",
        80,
        Some(false),
        (Reach::Specific, No),
        "x",
        1,
    );
    ownerless.processes.clear();
    let applied = store
        .apply_snapshot(
            h.host_id,
            S1,
            2,
            t2,
            vec![dual80("nginx", 101), ssh4(21), ssh6(), specific, ownerless],
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        applied,
        Applied::Committed { rows: 6 },
        "changed: close+insert, refresh, close, insert"
    );
    // A retried snapshot is recognized.
    let again = store
        .apply_snapshot(h.host_id, S1, 2, t2, vec![], now)
        .await
        .unwrap();
    assert_eq!(again, Applied::Duplicate { committed: 2 });

    assert_eq!(
        columns(db, "current_listeners").await,
        [
            "host",
            "netns",
            "netns_inode",
            "protocol",
            "family",
            "address",
            "port",
            "interface",
            "v6only",
            "reach_ipv4",
            "reach_ipv6",
            "latent",
            "shown_as",
            "netstat_proto",
            "trap",
            "hidden_ipv4_exposure",
            "processes",
            "process_details",
            "container_runtime",
            "container_id",
            "pod_uid",
            "unit",
            "cgroup",
            "uid",
            "freebind",
            "transparent",
            "source",
            "sockets",
            "first_seen",
            "last_changed",
            "effective_ipv4",
            "effective_ipv6",
            "effective_reason_ipv4",
            "effective_reason_ipv6",
            "effective_conditions_ipv4",
            "effective_conditions_ipv6"
        ]
    );
    assert_eq!(
        same(db, "SELECT protocol, family, address, port, v6only, reach_ipv4, trap, processes, shown_as FROM current_listeners WHERE processes <> '' ORDER BY port, family").await,
        vec![
            vec![json!("tcp"), json!("ipv4"), json!("0.0.0.0"), json!(22), Value::Null, json!("any"), json!(0), json!("sshd"), json!("0.0.0.0:22")],
            vec![json!("tcp"), json!("ipv6"), json!("::"), json!(22), json!(1), json!("none"), json!(0), json!("sshd"), json!(":::22")],
            vec![json!("tcp"), json!("ipv6"), json!("::"), json!(80), json!(0), json!("any"), json!(1), json!("nginx"), json!(":::80")],
            vec![json!("tcp"), json!("ipv4"), json!("10.0.0.5"), json!(8080), Value::Null, json!("specific"), json!(0), json!("java"), json!("10.0.0.5:8080")],
        ]
    );
    // Pid churn was refreshed in place: the new pid is there, with no history event.
    let details = same(
        db,
        "SELECT process_details FROM current_listeners WHERE port = 22 AND family = 'ipv4'",
    )
    .await;
    let details: Value = match &details[0][0] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        v => v.clone(),
    };
    assert_eq!(details[0]["pid"], 21);
    assert_eq!(
        columns(db, "hidden_ipv4_exposure").await,
        [
            "host",
            "netns",
            "protocol",
            "port",
            "shown_as",
            "processes",
            "effective_ipv4",
            "effective_conditions_ipv4"
        ]
    );
    assert_eq!(
        same(db, "SELECT host, netns, protocol, port, shown_as, processes FROM hidden_ipv4_exposure ORDER BY port").await,
        vec![vec![json!("h1"), json!("host"), json!("tcp"), json!(80), json!("10.0.0.5:80,:::80"), json!("nginx")]],
        "sshd's pair and the specific IPv4 socket show IPv4 lines; DNS is gone; no empty owner entries"
    );
    // The reconstruction at any time agrees with the view, lists included.
    let ro = ReadOnly::open(db).await.unwrap();
    assert_eq!(
        history::exposure_at(&ro, OffsetDateTime::now_utc(), None, None, None)
            .await
            .unwrap()
            .rows
            .rows,
        query::exposure(&ro, None, None, None)
            .await
            .unwrap()
            .rows
            .rows
    );
    ro.close().await;
    assert_eq!(
        columns(db, "listener_changes").await,
        [
            "host",
            "change",
            "at",
            "netns",
            "protocol",
            "family",
            "address",
            "port",
            "interface",
            "v6only",
            "shown_as",
            "reach_ipv4",
            "reach_ipv6",
            "trap",
            "processes",
            "effective_ipv4",
            "effective_ipv6",
            "effective_conditions_ipv4",
            "effective_conditions_ipv6"
        ]
    );
    assert_eq!(
        same(db, "SELECT change, at, protocol, port, processes FROM listener_changes ORDER BY at, port, change").await,
        vec![
            vec![json!("opened"), json!(t(t1)), json!("tcp"), json!(22), json!("sshd")],
            vec![json!("opened"), json!(t(t1)), json!("tcp"), json!(22), json!("sshd")],
            vec![json!("opened"), json!(t(t1)), json!("udp"), json!(53), json!("dnsmasq")],
            vec![json!("opened"), json!(t(t1)), json!("tcp"), json!(80), json!("apache2")],
            vec![json!("closed"), json!(t(t2)), json!("udp"), json!(53), json!("dnsmasq")],
            vec![json!("changed"), json!(t(t2)), json!("tcp"), json!(80), json!("nginx")],
            vec![json!("opened"), json!(t(t2)), json!("tcp"), json!(80), json!("")],
            vec![json!("opened"), json!(t(t2)), json!("tcp"), json!(8080), json!("java")],
        ]
    );
    assert_eq!(
        same(db, "SELECT port, first_seen, gone_at FROM listener_history WHERE port IN (53, 80) AND processes <> '' ORDER BY port").await,
        vec![
            vec![json!(53), json!(t(t1)), json!(t(t2))],
            vec![json!(80), json!(t(t1)), Value::Null],
        ],
        "a new version keeps the lifetime's first_seen"
    );
    assert_eq!(
        columns(db, "hosts").await,
        [
            "host",
            "os_hostname",
            "agent_version",
            "first_seen",
            "last_seen",
            "last_snapshot_at",
            "stale",
            "listeners",
            "collector",
            "duplicate_refusals",
            "duplicate_last_at",
            "duplicate_last_peer",
            "watch_mode",
            "watch_reason",
            "watch_since"
        ]
    );
    assert_eq!(
        same(
            db,
            "SELECT host, os_hostname, agent_version, last_snapshot_at, stale, listeners FROM hosts"
        )
        .await,
        vec![vec![
            json!("h1"),
            json!("web-01"),
            json!("0.1.0"),
            json!(t(t2)),
            json!(0),
            json!(5)
        ]]
    );
    // listener_versions: current_listeners' columns but last_changed, the validity
    // interval, then (added later, at the end) the verdicts.
    let versions = columns(db, "listener_versions").await;
    let mut want: Vec<String> = columns(db, "current_listeners").await;
    let verdicts = want.split_off(want.iter().position(|c| c == "effective_ipv4").unwrap());
    want.retain(|c| c != "last_changed");
    want.extend(["valid_from", "valid_to", "end_reason"].map(String::from));
    want.extend(verdicts);
    assert_eq!(versions, want);
    store.close().await;
}

async fn delta_rules(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let (t1, t2, t3) = (
        base(),
        base() + Duration::minutes(1),
        base() + Duration::minutes(2),
    );
    let h = store.hello("h1", "h1", "test", now).await.unwrap();
    store
        .apply_snapshot(h.host_id, S1, 1, t1, vec![ssh4(20)], now)
        .await
        .unwrap();
    let open_dns = Changes {
        opened: vec![dns()],
        ..Changes::default()
    };
    assert_eq!(
        store
            .apply_delta(h.host_id, S1, 2, t2, open_dns.clone(), now)
            .await
            .unwrap(),
        Applied::Committed { rows: 1 }
    );
    // Retry: recognized, stored once.
    assert_eq!(
        store
            .apply_delta(h.host_id, S1, 2, t2, open_dns.clone(), now)
            .await
            .unwrap(),
        Applied::Duplicate { committed: 2 }
    );
    // A gap.
    assert_eq!(
        store
            .apply_delta(h.host_id, S1, 4, t3, Changes::default(), now)
            .await
            .unwrap(),
        Applied::Gap { committed: 2 }
    );
    // Another session: superseded until it snapshots.
    assert_eq!(
        store
            .apply_delta(h.host_id, S2, 3, t3, Changes::default(), now)
            .await
            .unwrap(),
        Applied::Superseded
    );
    // Opening an open key replaces it; closing a closed key does nothing.
    let odd = Changes {
        opened: vec![dual80("apache2", 1), ssh4(22)],
        closed: vec![rec(Protocol::Tcp, "::", 9999, Some(true), (No, Any), "x", 1).key],
        changed: vec![],
    };
    assert_eq!(
        store
            .apply_delta(h.host_id, S1, 3, t3, odd, now)
            .await
            .unwrap(),
        Applied::Committed { rows: 2 },
        "port 80 inserted, port 22 refreshed (pid only), 9999 ignored"
    );
    assert_eq!(
        same(
            db,
            "SELECT port, protocol FROM current_listeners ORDER BY port"
        )
        .await,
        vec![
            vec![json!(22), json!("tcp")],
            vec![json!(53), json!("udp")],
            vec![json!(80), json!("tcp")]
        ]
    );
    let dups = same(
        db,
        "SELECT count(*) FROM current_listeners GROUP BY host, netns, protocol, family, address, port HAVING count(*) > 1",
    )
    .await;
    assert!(dups.is_empty());
    // A delta at a time before the version it closes never ends it before it began.
    let back = Changes {
        closed: vec![dns().key],
        ..Changes::default()
    };
    store
        .apply_delta(h.host_id, S1, 4, t1 - Duration::hours(1), back, now)
        .await
        .unwrap();
    let r = same(
        db,
        "SELECT at FROM listener_changes WHERE change = 'closed' AND port = 53",
    )
    .await;
    assert_eq!(r, vec![vec![json!(t(t2))]]);
    store.close().await;
}

async fn point_in_time_and_diff(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let t1 = base();
    let (t2, t3) = (t1 + Duration::minutes(10), t1 + Duration::minutes(20));
    let m = |x: &OffsetDateTime, mins: i64| *x + Duration::minutes(mins);
    let h = store.hello("h1", "h1", "test", now).await.unwrap();
    let h2 = store.hello("h2", "h2", "test", now).await.unwrap();
    // h1: v6-only :::80 (no IPv4) → dual-stack :::80 at t2 (hidden IPv4) → closed at t3.
    store
        .apply_snapshot(h.host_id, S1, 1, t1, vec![v6only80(), ssh4(20)], now)
        .await
        .unwrap();
    store
        .apply_snapshot(h2.host_id, S2, 1, t1, vec![ssh4(20), ssh6()], now)
        .await
        .unwrap();
    let flip = Changes {
        opened: vec![dual80("nginx", 10)],
        closed: vec![v6only80().key],
        changed: vec![],
    };
    store
        .apply_delta(h.host_id, S1, 2, t2, flip, now)
        .await
        .unwrap();
    let close = Changes {
        closed: vec![dual80("nginx", 10).key],
        ..Changes::default()
    };
    store
        .apply_delta(h.host_id, S1, 3, t3, close, now)
        .await
        .unwrap();

    let ro = ReadOnly::open(db).await.unwrap();
    let headline = |rs: query::ResultSet| -> Vec<(String, i64)> {
        rs.rows
            .iter()
            .map(|r| (r[0].as_str().unwrap().to_string(), r[3].as_i64().unwrap()))
            .collect()
    };
    assert!(
        headline(
            history::exposure_at(&ro, m(&t1, 5), Some(80), None, None)
                .await
                .unwrap()
                .rows
        )
        .is_empty()
    );
    assert_eq!(
        headline(
            history::exposure_at(&ro, m(&t2, 5), Some(80), None, None)
                .await
                .unwrap()
                .rows
        ),
        [("h1".to_string(), 80)]
    );
    assert_eq!(
        headline(
            history::exposure_at(&ro, m(&t2, 5), None, Some("tcp"), None)
                .await
                .unwrap()
                .rows
        ),
        [("h1".to_string(), 80)]
    );
    assert!(
        headline(
            history::exposure_at(&ro, m(&t3, 5), None, None, None)
                .await
                .unwrap()
                .rows
        )
        .is_empty()
    );
    // At "now" the reconstruction agrees with the live view.
    assert_eq!(
        history::exposure_at(&ro, OffsetDateTime::now_utc(), None, None, None)
            .await
            .unwrap()
            .rows
            .rows,
        query::exposure(&ro, None, None, None)
            .await
            .unwrap()
            .rows
            .rows
    );
    // The documented point-in-time SQL over listener_versions.
    let as_of = rows(
        db,
        "SELECT port FROM listener_versions WHERE host = 'h1' AND valid_from <= ?1 AND (valid_to IS NULL OR valid_to > ?1) ORDER BY port, family",
        "SELECT port FROM listener_versions WHERE host = 'h1' AND valid_from <= $1 AND (valid_to IS NULL OR valid_to > $1) ORDER BY port, family",
        &[Param::Time(m(&t2, 5))],
    )
    .await;
    assert_eq!(as_of, vec![vec![json!(22)], vec![json!(80)]]);

    // What changed on h1 between t1+5 and t2+5: the v6only socket closed, the dual-stack
    // one opened, and port 80 became reachable over IPv4, hidden from netstat.
    let d = history::diff(&ro, Some("h1"), m(&t1, 5), m(&t2, 5), None)
        .await
        .unwrap()
        .rows;
    let lines: Vec<(String, i64, String)> = d
        .rows
        .iter()
        .map(|r| {
            (
                r[2].as_str().unwrap().to_string(),
                r[5].as_i64().unwrap(),
                r[7].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!((lines[0].0.as_str(), lines[0].1), ("closed", 80));
    assert_eq!((lines[1].0.as_str(), lines[1].1), ("opened", 80));
    assert_eq!(lines[2].0, "exposure");
    assert!(
        lines[2].2.contains("IPv4 none → any")
            && lines[2].2.contains("hidden from netstat no → yes"),
        "{}",
        lines[2].2
    );
    assert_eq!(
        d.rows[2][0],
        json!(t(t2)),
        "reported at the time of the port's last change"
    );
    // Fleet-wide over the whole window: h2 did nothing, port 80 ends where it began (no
    // listener, no exposure) but both events are listed.
    let d = history::diff(&ro, None, m(&t1, 5), m(&t3, 5), None)
        .await
        .unwrap()
        .rows;
    let kinds: Vec<&str> = d.rows.iter().map(|r| r[2].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["closed", "opened", "closed", "exposure"],
        "{:?}",
        d.rows
    );
    assert!(d.rows.iter().all(|r| r[1] == json!("h1")));
    // A reader bounding the events it reads (the web UI) is told to narrow the window,
    // not given part of it; at the bound it gets all of it.
    let e = history::diff_window(&ro, None, None, m(&t1, 5), m(&t3, 5), None, 2)
        .await
        .unwrap_err();
    assert!(matches!(e, QueryError::WindowTooBig(2)), "{e}");
    assert!(e.to_string().contains("narrow it"), "{e}");
    let d = history::diff_window(&ro, None, None, m(&t1, 5), m(&t3, 5), None, 3)
        .await
        .unwrap();
    assert_eq!(d.rows.rows.len(), 4);
    assert!(
        history::diff(&ro, Some("h2"), m(&t1, 5), m(&t3, 5), None)
            .await
            .unwrap()
            .rows
            .rows
            .is_empty()
    );
    ro.close().await;
    store.close().await;
}

async fn retention_prunes_only_ended_history(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let old = now - Duration::days(120);
    let h = store.hello("h1", "h1", "test", now).await.unwrap();
    // Old lifetime: opened and closed 120 days ago. Current listener: first seen 120 days
    // ago and still there. Recent: closed yesterday.
    store
        .apply_snapshot(
            h.host_id,
            S1,
            1,
            old,
            vec![ssh4(1), dns(), dual80("apache2", 5)],
            now,
        )
        .await
        .unwrap();
    store
        .apply_delta(
            h.host_id,
            S1,
            2,
            old + Duration::hours(1),
            Changes {
                closed: vec![dns().key],
                ..Changes::default()
            },
            now,
        )
        .await
        .unwrap();
    store
        .apply_delta(
            h.host_id,
            S1,
            3,
            now - Duration::days(1),
            Changes {
                closed: vec![dual80("x", 1).key],
                ..Changes::default()
            },
            now,
        )
        .await
        .unwrap();
    // The background task's own step, as `serve --retain 90d` runs it.
    let stop = tokio_util::sync::CancellationToken::new();
    let pruned = listenscope_collector::retention::prune_once(
        &store,
        std::time::Duration::from_secs(90 * 86400),
        &stop,
    )
    .await;
    assert_eq!(pruned, 1, "only the DNS listener ended before the cutoff");
    // Batches: a cutoff that catches both ended versions, one row at a time.
    assert_eq!(store.prune_batch(now, 1).await.unwrap(), 1);
    assert_eq!(store.prune_batch(now, 1).await.unwrap(), 0);
    store
        .apply_snapshot(
            h.host_id,
            S1,
            4,
            now - Duration::minutes(1),
            vec![ssh4(1)],
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        same(
            db,
            "SELECT port, first_seen FROM listener_history ORDER BY port"
        )
        .await,
        vec![vec![json!(22), json!(t(old))]],
        "the current state stays, however old"
    );
    assert_eq!(
        same(db, "SELECT count(*) FROM current_listeners").await,
        vec![vec![json!(1)]]
    );
    store.close().await;
}

async fn query_is_read_only(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let h = store.hello("h1", "h1", "test", now).await.unwrap();
    store
        .apply_snapshot(h.host_id, S1, 1, base(), vec![ssh4(1)], now)
        .await
        .unwrap();
    store.close().await;
    let ro = ReadOnly::open(db).await.unwrap();
    for sql in [
        "DELETE FROM listener",
        "UPDATE host SET name = 'x'",
        "INSERT INTO setting (key, value) VALUES ('a', 'b')",
        "DROP VIEW hosts",
        "CREATE TABLE t (x integer)",
    ] {
        match ro.run(sql, &[]).await {
            Err(QueryError::WriteRefused(_)) => {}
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    match ro.run("SELEC 1", &[]).await {
        Err(QueryError::Sql(_)) => {}
        other => panic!("{other:?}"),
    }
    let rs = ro
        .run(
            "SELECT count(*) AS n, sum(port) AS s, max(last_changed) AS t FROM current_listeners",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rs.columns, ["n", "s", "t"]);
    assert_eq!(
        (norm(rs.rows[0][0].clone()), norm(rs.rows[0][1].clone())),
        (json!(1), json!(22))
    );
    assert_eq!(rs.rows[0][2], json!(t(base())));
    ro.close().await;
}

async fn ten_thousand_listeners(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let h = store.hello("big", "big", "test", now).await.unwrap();
    let mut records: Vec<ListenerRecord> = (1..=10_000u16)
        .map(|p| {
            rec(
                Protocol::Tcp,
                "::",
                p,
                Some(p % 2 == 0),
                if p % 2 == 0 { (No, Any) } else { (Any, Any) },
                "worker",
                u32::from(p),
            )
        })
        .collect();
    assert_eq!(
        store
            .apply_snapshot(h.host_id, S1, 1, base(), records.clone(), now)
            .await
            .unwrap(),
        Applied::Committed { rows: 10_000 }
    );
    // One material change, one pid change, one gone: three rows of work plus one insert.
    records[0].processes[0].comm = "other".into();
    records[1].processes[0].pid = 99_999;
    records.pop();
    assert_eq!(
        store
            .apply_snapshot(
                h.host_id,
                S1,
                2,
                base() + Duration::minutes(1),
                records,
                now
            )
            .await
            .unwrap(),
        Applied::Committed { rows: 4 }
    );
    assert_eq!(
        same(db, "SELECT count(*) FROM current_listeners").await,
        vec![vec![json!(9_999)]]
    );
    assert_eq!(
        same(db, "SELECT count(*) FROM hidden_ipv4_exposure").await,
        vec![vec![json!(5_000)]]
    );
    store.close().await;
}

async fn hosts_ingest_concurrently(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("h{i}");
            let h = store.hello(&name, &name, "test", now).await.unwrap();
            let session = [i; 16];
            store
                .apply_snapshot(h.host_id, &session, 1, base(), vec![ssh4(1), ssh6()], now)
                .await
                .unwrap();
            for seq in 2..12u64 {
                let port = 1000 + seq as u16;
                let c = Changes {
                    opened: vec![rec(
                        Protocol::Tcp,
                        "::",
                        port,
                        Some(false),
                        (Any, Any),
                        "svc",
                        1,
                    )],
                    ..Changes::default()
                };
                let at = base() + Duration::seconds(seq as i64);
                assert_eq!(
                    store
                        .apply_delta(h.host_id, &session, seq, at, c, now)
                        .await
                        .unwrap(),
                    Applied::Committed { rows: 1 }
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        same(
            db,
            "SELECT count(*), count(DISTINCT host) FROM current_listeners"
        )
        .await,
        vec![vec![json!(8 * 12), json!(8)]]
    );
    assert_eq!(
        same(db, "SELECT count(*) FROM hidden_ipv4_exposure").await,
        vec![vec![json!(80)]]
    );
    store.close().await;
}

// --- Firewall verdicts -----------------------------------------------------------------

/// `restricted` with these ways in.
fn restricted(reason: &str, conditions: &[&str]) -> FirewallAnswer {
    FirewallAnswer {
        verdict: Effective::Restricted,
        reason: reason.into(),
        conditions: conditions.iter().map(|c| c.to_string()).collect(),
    }
}

fn answer(verdict: Effective, reason: &str) -> FirewallAnswer {
    FirewallAnswer::new(verdict, reason)
}

/// Runs a statement that writes, outside the collector (a test's own connection).
async fn write_sql(db: &DbUrl, sql: &'static str) {
    match db {
        DbUrl::Sqlite(path) => {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
        DbUrl::Postgres(url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
}

/// Every verdict field is stored and read back exactly: through the views (the six new
/// columns, awkward text included, on PostgreSQL's COPY path too), and through the
/// stored-columns decoder the fingerprint recompute uses (a database marked with another
/// scheme is recomputed on open; the same state then writes nothing, so every field came
/// back as it went in). Rows that predate verdicts say so (migration 0007's default).
async fn firewall_verdicts_round_trip(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let h = store.hello("fw", "fw", "test", now).await.unwrap();
    // Backslashes, quotes, `\N`, non-ASCII and the views' own ` | ` separator inside one
    // condition: stored one per line, shown joined, split back exactly.
    let reason = r#"inet filter input handle 7: ip saddr { 198.51.100.0/24 } tcp dport 80 accept comment "web \N é""#;
    let mut web = dual80("nginx", 10);
    web.effective_ipv4 = restricted(
        reason,
        &[
            "iifname \"eth0\" and sport 1024-65535 | x",
            "saddr 198.51.100.0/24",
        ],
    );
    web.effective_ipv6 = answer(
        Effective::Open,
        "inet filter input handle 8: tcp dport 80 accept",
    );
    let mut dns = dns();
    dns.effective_ipv4 = answer(Effective::Filtered, "policy drop of inet filter input");
    dns.effective_ipv6 = answer(
        Effective::Diverted,
        "ip6 nat PREROUTING handle 3: udp dport 53 redirect to :5353; diverted to :5353",
    );
    let mut unread = ssh4(20);
    unread.effective_ipv4 = answer(
        Effective::Unknown,
        "the nftables ruleset could not be parsed: x",
    );
    let mut records = vec![web, dns, unread];
    // Enough rows for PostgreSQL's COPY path (its text format escapes backslashes).
    records.extend((1000..3500).map(|port| {
        let mut o = ssh4(20);
        o.key.port = port;
        o.effective_ipv4 = restricted(
            &format!("handle {port}: \\ accept"),
            &[&format!("saddr 10.{}.0.0/16 \\N", port % 200)],
        );
        o
    }));
    assert_eq!(
        store
            .apply_snapshot(h.host_id, S1, 1, base(), records.clone(), now)
            .await
            .unwrap(),
        Applied::Committed { rows: 2503 }
    );
    let cols = "port, effective_ipv4, effective_ipv6, effective_reason_ipv4, \
                effective_reason_ipv6, effective_conditions_ipv4, effective_conditions_ipv6";
    assert_eq!(
        same(
            db,
            &format!("SELECT {cols} FROM current_listeners WHERE port IN (22, 53, 80, 3499) ORDER BY port")
        )
        .await,
        vec![
            vec![
                json!(22),
                json!("unknown"),
                json!("n/a"),
                json!("the nftables ruleset could not be parsed: x"),
                json!("not reachable from off-host"),
                Value::Null,
                Value::Null
            ],
            vec![
                json!(53),
                json!("filtered"),
                json!("diverted"),
                json!("policy drop of inet filter input"),
                json!("ip6 nat PREROUTING handle 3: udp dport 53 redirect to :5353; diverted to :5353"),
                Value::Null,
                Value::Null
            ],
            vec![
                json!(80),
                json!("restricted"),
                json!("open"),
                json!(reason),
                json!("inet filter input handle 8: tcp dport 80 accept"),
                json!("iifname \"eth0\" and sport 1024-65535 | x | saddr 198.51.100.0/24"),
                Value::Null
            ],
            vec![
                json!(3499),
                json!("restricted"),
                json!("n/a"),
                json!("handle 3499: \\ accept"),
                json!("not reachable from off-host"),
                json!("saddr 10.99.0.0/16 \\N"),
                Value::Null
            ],
        ]
    );
    // listener_versions has the same values.
    assert_eq!(
        same(
            db,
            &format!("SELECT {cols} FROM listener_versions WHERE port = 80")
        )
        .await,
        same(
            db,
            &format!("SELECT {cols} FROM current_listeners WHERE port = 80")
        )
        .await,
    );
    // Migration 0007 names the rows it found with the core's text.
    let default = rows(
        db,
        "SELECT dflt_value FROM pragma_table_info('listener') WHERE name = 'effective_reason_ipv6'",
        "SELECT column_default FROM information_schema.columns
         WHERE table_name = 'listener' AND column_name = 'effective_reason_ipv6'",
        &[],
    )
    .await;
    let default = default[0][0].as_str().unwrap().to_string();
    assert!(
        default.contains(&format!(
            "'{}'",
            listenscope_core::record::STORED_BEFORE_VERDICTS
        )),
        "{default}"
    );

    // The recompute reads every field back from the stored columns.
    store.close().await;
    write_sql(
        db,
        "UPDATE setting SET value = 'sha256-canonical-v1' WHERE key = 'fingerprint_scheme'",
    )
    .await;
    let store = open(db).await;
    assert_eq!(
        same(
            db,
            "SELECT value FROM setting WHERE key = 'fingerprint_scheme'"
        )
        .await,
        vec![vec![json!(listenscope_core::fingerprint::SCHEME)]]
    );
    assert_eq!(
        store
            .apply_snapshot(
                h.host_id,
                S1,
                2,
                base() + Duration::minutes(1),
                records,
                now
            )
            .await
            .unwrap(),
        Applied::Committed { rows: 0 },
        "fingerprints recomputed from the stored columns equal those of the records"
    );
    store.close().await;
}

/// A verdict or condition change is a new version with an event at its observation time;
/// a reason-only change (a reload renumbering handles) is refreshed in place. The
/// maintained headline carries the effective IPv4 verdict of each hidden port (the most
/// permissive of its trap sockets, with their conditions) in step with every commit, and
/// `exposure --at` and `diff` see the verdicts as they were.
async fn firewall_verdicts_history_and_headline(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let m = |n: i64| base() + Duration::minutes(n);
    let h = store.hello("fw", "fw", "test", now).await.unwrap();
    // Port 80: one dual-stack socket, restricted. Port 8443: two trap sockets (`::` and a
    // v4-mapped address) with the same ways in. Port 9000: an agent that reports no
    // verdicts.
    let mut web = dual80("nginx", 10);
    web.effective_ipv4 = restricted("inet filter input handle 7: accept", &["saddr 10.0.0.0/8"]);
    let mut any8443 = dual(8443, "java", 40);
    any8443.effective_ipv4 = restricted("handle 9: accept", &["iifname eth1"]);
    let mut mapped8443 = rec(
        Protocol::Tcp,
        "::ffff:10.0.0.5",
        8443,
        Some(false),
        (Reach::Specific, No),
        "java",
        41,
    );
    mapped8443.effective_ipv4 = restricted("handle 9: accept", &["iifname eth1"]);
    let mut old = dual(9000, "legacy", 50);
    old.effective_ipv4 = FirewallAnswer::not_reported();
    old.effective_ipv6 = FirewallAnswer::not_reported();
    store
        .apply_snapshot(
            h.host_id,
            S1,
            1,
            m(0),
            vec![
                web.clone(),
                any8443.clone(),
                mapped8443.clone(),
                old,
                ssh4(20),
            ],
            now,
        )
        .await
        .unwrap();
    let events = || async { same(db, "SELECT count(*) FROM listener_changes").await };
    let before = events().await;

    // t1: a reload renumbers port 80's rule: refreshed in place, no event, no version.
    let mut reloaded = web.clone();
    reloaded.effective_ipv4.reason = "inet filter input handle 12: accept".into();
    let changed = |records: Vec<ListenerRecord>| Changes {
        changed: records,
        ..Changes::default()
    };
    assert_eq!(
        store
            .apply_delta(h.host_id, S1, 2, m(1), changed(vec![reloaded.clone()]), now)
            .await
            .unwrap(),
        Applied::Committed { rows: 1 }
    );
    assert_eq!(events().await, before, "a reason is not history");
    assert_eq!(
        same(
            db,
            "SELECT effective_reason_ipv4, last_changed FROM current_listeners WHERE port = 80"
        )
        .await,
        vec![vec![
            json!("inet filter input handle 12: accept"),
            json!(t(m(0)))
        ]]
    );

    // t2: the ruleset closes port 80 and opens 8443 to everyone on the mapped socket.
    let mut closed = reloaded.clone();
    closed.effective_ipv4 = answer(Effective::Filtered, "policy drop of inet filter input");
    let mut opened = mapped8443.clone();
    opened.effective_ipv4 = answer(Effective::Open, "handle 10: tcp dport 8443 accept");
    store
        .apply_delta(h.host_id, S1, 3, m(2), changed(vec![closed, opened]), now)
        .await
        .unwrap();
    // t3: port 80 open again; 8443 back as it was; then a condition change on 8443's `::`.
    let mut reopened = reloaded.clone();
    reopened.effective_ipv4 = answer(Effective::Open, "inet filter input handle 13: accept");
    store
        .apply_delta(
            h.host_id,
            S1,
            4,
            m(3),
            changed(vec![reopened, mapped8443.clone()]),
            now,
        )
        .await
        .unwrap();

    // Events: one per verdict change, at its observation time, with the new verdicts.
    assert_eq!(
        same(
            db,
            "SELECT change, at, port, address, effective_ipv4, effective_conditions_ipv4
             FROM listener_changes WHERE port IN (80, 8443) ORDER BY at, port, address"
        )
        .await,
        vec![
            vec![
                json!("opened"),
                json!(t(m(0))),
                json!(80),
                json!("::"),
                json!("restricted"),
                json!("saddr 10.0.0.0/8")
            ],
            vec![
                json!("opened"),
                json!(t(m(0))),
                json!(8443),
                json!("::"),
                json!("restricted"),
                json!("iifname eth1")
            ],
            vec![
                json!("opened"),
                json!(t(m(0))),
                json!(8443),
                json!("::ffff:10.0.0.5"),
                json!("restricted"),
                json!("iifname eth1")
            ],
            vec![
                json!("changed"),
                json!(t(m(2))),
                json!(80),
                json!("::"),
                json!("filtered"),
                Value::Null
            ],
            vec![
                json!("changed"),
                json!(t(m(2))),
                json!(8443),
                json!("::ffff:10.0.0.5"),
                json!("open"),
                Value::Null
            ],
            vec![
                json!("changed"),
                json!(t(m(3))),
                json!(80),
                json!("::"),
                json!("open"),
                Value::Null
            ],
            vec![
                json!("changed"),
                json!(t(m(3))),
                json!(8443),
                json!("::ffff:10.0.0.5"),
                json!("restricted"),
                json!("iifname eth1")
            ],
        ]
    );

    // The maintained headline, now: open first, then restricted, then unknown.
    let headline_cols = "host, port, shown_as, effective_ipv4, effective_conditions_ipv4";
    assert_eq!(
        same(
            db,
            &format!("SELECT {headline_cols} FROM hidden_ipv4_exposure ORDER BY port")
        )
        .await,
        vec![
            vec![
                json!("fw"),
                json!(80),
                json!(":::80"),
                json!("open"),
                Value::Null
            ],
            vec![
                json!("fw"),
                json!(8443),
                json!("10.0.0.5:8443,:::8443"),
                json!("restricted"),
                json!("iifname eth1")
            ],
            vec![
                json!("fw"),
                json!(9000),
                json!(":::9000"),
                json!("unknown"),
                Value::Null
            ],
        ]
    );
    let ro = ReadOnly::open(db).await.unwrap();
    let report = |rs: query::ResultSet| -> Vec<(i64, String, Value, Value)> {
        assert_eq!(rs.columns, query::EXPOSURE_COLUMNS);
        rs.rows
            .iter()
            .map(|r| {
                (
                    r[3].as_i64().unwrap(),
                    r[6].as_str().unwrap().to_string(),
                    r[7].clone(),
                    r[8].clone(),
                )
            })
            .collect()
    };
    let now_rows = query::exposure(&ro, None, None, None).await.unwrap().rows;
    assert_eq!(
        report(now_rows.clone()),
        [
            (80, "open".to_string(), Value::Null, Value::Null),
            (
                8443,
                "restricted".to_string(),
                json!("iifname eth1"),
                Value::Null
            ),
            (
                9000,
                "unknown".to_string(),
                Value::Null,
                json!("unknown: the firewall was not decided (why: view effective_exposure)")
            ),
        ]
    );
    // As of t0+: port 8443 is rebuilt from history in Rust (it has events later); its row
    // must be the one the database's aggregation keeps now (the same state).
    assert_eq!(
        report(
            history::exposure_at(&ro, m(0) + Duration::seconds(30), None, None, None)
                .await
                .unwrap()
                .rows
        ),
        [
            (
                80,
                "restricted".to_string(),
                json!("saddr 10.0.0.0/8"),
                Value::Null
            ),
            (
                8443,
                "restricted".to_string(),
                json!("iifname eth1"),
                Value::Null
            ),
            (
                9000,
                "unknown".to_string(),
                Value::Null,
                json!("unknown: the firewall was not decided (why: view effective_exposure)")
            ),
        ]
    );
    let then = history::exposure_at(&ro, m(0) + Duration::seconds(30), Some(8443), None, None)
        .await
        .unwrap()
        .rows;
    let live = query::exposure(&ro, Some(8443), None, None)
        .await
        .unwrap()
        .rows;
    assert_eq!(
        then, live,
        "Rust's and the database's aggregation of one state agree"
    );
    // As of t2+: 8443 open (the mapped socket), port 80 filtered and marked, last.
    assert_eq!(
        report(
            history::exposure_at(&ro, m(2) + Duration::seconds(30), None, None, None)
                .await
                .unwrap()
                .rows
        ),
        [
            (8443, "open".to_string(), Value::Null, Value::Null),
            (
                9000,
                "unknown".to_string(),
                Value::Null,
                json!("unknown: the firewall was not decided (why: view effective_exposure)")
            ),
            (
                80,
                "filtered".to_string(),
                Value::Null,
                json!("filtered: the firewall drops new IPv4 connections (not exposed)")
            ),
        ]
    );
    assert_eq!(
        history::exposure_at(&ro, OffsetDateTime::now_utc(), None, None, None)
            .await
            .unwrap()
            .rows
            .rows,
        now_rows.rows
    );

    // diff: the reason-only window is empty; the ruleset changes show before → after at
    // their times, per event and per port.
    assert!(
        history::diff(
            &ro,
            Some("fw"),
            m(0) + Duration::seconds(30),
            m(1) + Duration::seconds(30),
            None
        )
        .await
        .unwrap()
        .rows
        .rows
        .is_empty()
    );
    let d = history::diff(
        &ro,
        Some("fw"),
        m(1) + Duration::seconds(30),
        m(3) + Duration::seconds(30),
        None,
    )
    .await
    .unwrap()
    .rows;
    let lines: Vec<(Value, String, i64, String)> = d
        .rows
        .iter()
        .map(|r| {
            (
                r[0].clone(),
                r[2].as_str().unwrap().to_string(),
                r[5].as_i64().unwrap(),
                r[7].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let find = |at: i64, change: &str, port: i64, needle: &str| {
        assert!(
            lines.iter().any(|(a, c, p, d)| *a == json!(t(m(at)))
                && c == change
                && *p == port
                && d.contains(needle)),
            "{at} {change} {port} {needle:?} in {lines:#?}"
        );
    };
    find(
        2,
        "changed",
        80,
        "firewall IPv4 restricted (saddr 10.0.0.0/8) → filtered",
    );
    find(
        2,
        "changed",
        8443,
        "firewall IPv4 restricted (iifname eth1) → open",
    );
    find(3, "changed", 80, "firewall IPv4 filtered → open");
    find(
        3,
        "changed",
        8443,
        "firewall IPv4 open → restricted (iifname eth1)",
    );
    // Per port, between the window's ends: 80 went from restricted to open; 8443 ended as
    // it began (no exposure line).
    find(
        3,
        "exposure",
        80,
        "firewall IPv4 restricted (saddr 10.0.0.0/8) → open",
    );
    assert!(
        !lines
            .iter()
            .any(|(_, c, p, _)| c == "exposure" && *p == 8443),
        "{lines:#?}"
    );
    assert_eq!(lines.len(), 5, "{lines:#?}");
    ro.close().await;

    // A port whose trap sockets differ: the most permissive wins, with its conditions;
    // two restricted sockets show each list once, in byte order.
    let mut a = dual(7000, "svc", 60);
    a.effective_ipv4 = answer(Effective::Filtered, "policy drop");
    let mut b = rec(
        Protocol::Tcp,
        "::ffff:10.0.0.5",
        7000,
        Some(false),
        (Reach::Specific, No),
        "svc",
        61,
    );
    b.effective_ipv4 = restricted("handle 3: accept", &["saddr 192.0.2.0/24"]);
    let mut c = dual(7001, "svc", 62);
    c.effective_ipv4 = restricted("handle 4: accept", &["iifname eth1", "saddr 192.0.2.0/24"]);
    let mut d = rec(
        Protocol::Tcp,
        "::ffff:10.0.0.5",
        7001,
        Some(false),
        (Reach::Specific, No),
        "svc",
        63,
    );
    d.effective_ipv4 = restricted("handle 4: accept", &["iifname eth1"]);
    store
        .apply_delta(
            h.host_id,
            S1,
            5,
            m(4),
            Changes {
                opened: vec![a, b, c, d],
                ..Changes::default()
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        same(db, "SELECT port, effective_ipv4, effective_conditions_ipv4 FROM hidden_ipv4_exposure WHERE port IN (7000, 7001) ORDER BY port").await,
        vec![
            vec![json!(7000), json!("restricted"), json!("saddr 192.0.2.0/24")],
            vec![json!(7001), json!("restricted"), json!("iifname eth1 | iifname eth1 | saddr 192.0.2.0/24")],
        ]
    );
    // The same from history (ports touched after t3): Rust agrees with the database.
    let ro = ReadOnly::open(db).await.unwrap();
    let live = query::exposure(&ro, None, None, None).await.unwrap().rows;
    let recomputed = history::exposure_at(&ro, OffsetDateTime::now_utc(), None, None, None)
        .await
        .unwrap()
        .rows;
    assert_eq!(recomputed, live);
    // Closing the restricted socket leaves the filtered one: the headline follows.
    store
        .apply_delta(
            h.host_id,
            S1,
            6,
            m(5),
            Changes {
                closed: vec![
                    rec(
                        Protocol::Tcp,
                        "::ffff:10.0.0.5",
                        7000,
                        Some(false),
                        (Reach::Specific, No),
                        "svc",
                        61,
                    )
                    .key,
                ],
                ..Changes::default()
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        same(db, "SELECT effective_ipv4, effective_conditions_ipv4 FROM hidden_ipv4_exposure WHERE port = 7000").await,
        vec![vec![json!("filtered"), Value::Null]]
    );
    let then = history::exposure_at(&ro, m(4) + Duration::seconds(30), Some(7000), None, None)
        .await
        .unwrap()
        .rows;
    assert_eq!(then.rows[0][6], json!("restricted"), "{then:?}");
    assert_eq!(then.rows[0][7], json!("saddr 192.0.2.0/24"));
    ro.close().await;
    store.close().await;
}

/// `effective_exposure`: one row per live listener and IP version whose verdict is not
/// n/a, with its conditions, reason and the listener's context.
async fn effective_exposure_view(db: &DbUrl) {
    let store = open(db).await;
    let now = OffsetDateTime::now_utc();
    let h = store.hello("fw", "fw", "test", now).await.unwrap();
    let mut web = dual80("nginx", 10);
    web.effective_ipv4 = restricted("handle 7: accept", &["saddr 10.0.0.0/8", "iifname eth0"]);
    web.effective_ipv6 = answer(Effective::Filtered, "policy drop of inet filter input");
    let mut lo = rec(
        Protocol::Tcp,
        "127.0.0.1",
        5432,
        None,
        (Reach::Loopback, No),
        "postgres",
        70,
    );
    lo.effective_ipv4 = answer(
        Effective::NotApplicable,
        "the socket accepts IPv4 on loopback only",
    );
    lo.effective_ipv6 = answer(Effective::NotApplicable, "the socket accepts no IPv6");
    store
        .apply_snapshot(
            h.host_id,
            S1,
            1,
            base(),
            vec![web, lo, ssh4(20), ssh6()],
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        columns(db, "effective_exposure").await,
        [
            "host",
            "netns",
            "protocol",
            "port",
            "family",
            "address",
            "shown_as",
            "ip_version",
            "verdict",
            "conditions",
            "reason",
            "hidden_ipv4_exposure",
            "processes",
            "container_runtime",
            "container_id",
            "pod_uid",
            "unit",
            "first_seen",
            "last_changed"
        ]
    );
    assert_eq!(
        same(
            db,
            "SELECT port, family, ip_version, verdict, conditions, reason, hidden_ipv4_exposure,
                    processes, unit, last_changed
             FROM effective_exposure ORDER BY port, family, ip_version"
        )
        .await,
        vec![
            vec![
                json!(22),
                json!("ipv4"),
                json!("ipv4"),
                json!("open"),
                Value::Null,
                json!("no firewall rules in this namespace"),
                json!(0),
                json!("sshd"),
                json!("sshd.service"),
                json!(t(base()))
            ],
            vec![
                json!(22),
                json!("ipv6"),
                json!("ipv6"),
                json!("open"),
                Value::Null,
                json!("no firewall rules in this namespace"),
                json!(0),
                json!("sshd"),
                json!("sshd.service"),
                json!(t(base()))
            ],
            vec![
                json!(80),
                json!("ipv6"),
                json!("ipv4"),
                json!("restricted"),
                json!("saddr 10.0.0.0/8 | iifname eth0"),
                json!("handle 7: accept"),
                json!(1),
                json!("nginx"),
                json!("nginx.service"),
                json!(t(base()))
            ],
            vec![
                json!(80),
                json!("ipv6"),
                json!("ipv6"),
                json!("filtered"),
                Value::Null,
                json!("policy drop of inet filter input"),
                json!(1),
                json!("nginx"),
                json!("nginx.service"),
                json!(t(base()))
            ],
        ],
        "the loopback-only socket (n/a both ways) has no row"
    );
    // Filters reach both halves (the headline recipe: hidden ports the firewall lets in).
    assert_eq!(
        same(
            db,
            "SELECT host, port, verdict FROM effective_exposure
             WHERE ip_version = 'ipv4' AND hidden_ipv4_exposure AND verdict IN ('open', 'restricted')"
        )
        .await,
        vec![vec![json!("fw"), json!(80), json!("restricted")]]
    );
    store.close().await;
}
