//! One storage conformance suite, run unchanged against SQLite and against a real
//! PostgreSQL server that the test starts itself (`util::pg`). Every test is written once
//! (a function of the database URL) and instantiated per backend by `suite!`, so both
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
use listenscope_core::domain::{Family, ProcessInfo, Protocol, Reach, Source};
use listenscope_core::record::{ListenerKey, ListenerRecord};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};
use util::TempDir;
use util::pg::PgServer;

/// Keeps a backend alive for one test (held only for its Drop).
#[allow(dead_code)]
enum Guard {
    _Dir(TempDir),
    _Pg(PgServer),
}

async fn sqlite() -> (DbUrl, Guard) {
    let dir = TempDir::new("conf");
    (DbUrl::Sqlite(dir.path().join("ls.db")), Guard::_Dir(dir))
}

async fn postgres() -> (DbUrl, Guard) {
    // On this thread: the server is tied to its starting thread (PR_SET_PDEATHSIG).
    let server = tokio::task::block_in_place(PgServer::start);
    let url = server.database("listenscope").await;
    (DbUrl::Postgres(url), Guard::_Pg(server))
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let (db, _guard) = super::sqlite().await;
                    super::$test(&db).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let (db, _guard) = super::postgres().await;
                    super::$test(&db).await;
                }
            )*
        }
    };
}

suite!(
    group_commit_burst_and_fencing,
    awkward_text_round_trips,
    snapshots_versions_and_views,
    delta_rules,
    point_in_time_and_diff,
    retention_prunes_only_ended_history,
    query_is_read_only,
    ten_thousand_listeners,
    hosts_ingest_concurrently,
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
            "last_changed"
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
        ["host", "netns", "protocol", "port", "shown_as", "processes"]
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
            "processes"
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
            "collector"
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
    assert_eq!(
        columns(db, "listener_versions")
            .await
            .last()
            .map(String::as_str),
        Some("end_reason")
    );
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
