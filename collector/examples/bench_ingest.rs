//! Ingest benchmark, run by `scripts/bench-ingest` (which starts a throwaway PostgreSQL).
//!
//! For each `--db URL` (a fresh database): times the collector's store on the message
//! shapes agents send, and compares with a reference in the same run: the database engine
//! itself copying the same rows into an identically indexed twin table (`INSERT … SELECT`,
//! no client round trips, no parameters, no planning). Prints a Markdown table.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark program: a failed step should stop it loudly"
)]
#![allow(clippy::print_stdout)]

use std::net::IpAddr;
use std::time::Instant;

use listenscope_collector::store::{DbUrl, Store, StoreOptions};
use listenscope_core::diff::Changes;
use listenscope_core::domain::{Effective, Family, ProcessInfo, Protocol, Reach, Source};
use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord};
use time::OffsetDateTime;

fn record(port: u16, comm: &str, pid: u32) -> ListenerRecord {
    let address: IpAddr = "::".parse().unwrap();
    ListenerRecord {
        key: ListenerKey {
            netns: "host".into(),
            protocol: Protocol::Tcp,
            family: Family::Ipv6,
            address,
            port,
            interface: None,
            v6only: Some(port.is_multiple_of(2)),
        },
        netns_inode: 4026531833,
        reach_ipv4: if port.is_multiple_of(2) {
            Reach::None
        } else {
            Reach::Any
        },
        reach_ipv6: Reach::Any,
        latent: false,
        shown_as: format!(":::{port}"),
        netstat_proto: "tcp6".into(),
        trap: port % 2 == 1,
        hidden_ipv4_exposure: port % 2 == 1,
        processes: vec![ProcessInfo {
            pid,
            comm: comm.into(),
            cmdline: format!("/usr/bin/{comm} --port {port} --config /etc/{comm}/{comm}.conf"),
            user: "www-data".into(),
        }],
        container: None,
        unit: Some(format!("{comm}.service")),
        cgroup: Some(format!("/system.slice/{comm}.service")),
        uid: 33,
        freebind: Some(false),
        transparent: Some(false),
        source: Source::SockDiag,
        sockets: 1,
        // Half the dual-stack ports open, half restricted to a management network (the
        // rows carry realistic verdict texts); v6-only ports accept no IPv4.
        effective_ipv4: match port % 4 {
            1 => FirewallAnswer::new(
                Effective::Open,
                format!("inet filter input handle {port}: tcp dport {port} accept"),
            ),
            3 => FirewallAnswer {
                verdict: Effective::Restricted,
                reason: format!(
                    "inet filter input handle {port}: ip saddr 10.0.0.0/8 tcp dport {port} accept"
                ),
                conditions: vec!["saddr 10.0.0.0/8".into()],
            },
            _ => FirewallAnswer::new(Effective::NotApplicable, "the socket accepts no IPv4"),
        },
        effective_ipv6: FirewallAnswer::new(
            Effective::Open,
            format!("inet filter input handle {port}: tcp dport {port} accept"),
        ),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The engine's own cost of writing the same rows with the same indexes: copy the
/// listener rows just stored into a twin table inside the database (no client, no
/// binding, no planning). Our ingest is measured against this lower bound.
async fn reference(url: &DbUrl) -> f64 {
    match url {
        DbUrl::Sqlite(path) => {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            for sql in [
                "CREATE TABLE twin AS SELECT * FROM listener WHERE 0",
                "CREATE UNIQUE INDEX twin_live_key ON twin (host_id, lkey) WHERE valid_to IS NULL",
                "CREATE INDEX twin_live_port ON twin (port, protocol) WHERE valid_to IS NULL",
                "CREATE INDEX twin_host_from ON twin (host_id, valid_from)",
                "CREATE INDEX twin_to ON twin (valid_to) WHERE valid_to IS NOT NULL",
            ] {
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
            let t = Instant::now();
            sqlx::query("INSERT INTO twin SELECT * FROM listener")
                .execute(&pool)
                .await
                .unwrap();
            let took = ms(t);
            pool.close().await;
            took
        }
        DbUrl::Postgres(u) => {
            let pool = sqlx::PgPool::connect(u).await.unwrap();
            sqlx::query("CREATE TABLE twin (LIKE listener INCLUDING DEFAULTS INCLUDING INDEXES)")
                .execute(&pool)
                .await
                .unwrap();
            let t = Instant::now();
            sqlx::query("INSERT INTO twin SELECT * FROM listener")
                .execute(&pool)
                .await
                .unwrap();
            let took = ms(t);
            pool.close().await;
            took
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let urls: Vec<DbUrl> = std::env::args()
        .skip(1)
        .filter(|a| a != "--db")
        .map(|a| a.parse().expect("--db URL"))
        .collect();
    println!("| database | step | ms | rows or messages per s | vs engine copy |");
    println!("|---|---|---:|---:|---:|");
    for url in urls {
        let name = match &url {
            DbUrl::Sqlite(_) => "SQLite",
            DbUrl::Postgres(_) => "PostgreSQL",
        };
        let store = Store::open(
            &url,
            &StoreOptions {
                stale_after_secs: 300,
                pool_size: 8,
            },
        )
        .await
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let snapshot: Vec<ListenerRecord> = (1..=10_000u16)
            .map(|p| record(p, "nginx", 1000 + u32::from(p)))
            .collect();
        let h = store.hello("bench", "bench", "bench", now).await.unwrap();
        let t = Instant::now();
        store
            .apply_snapshot(h.host_id, &[1; 16], 1, now, snapshot.clone(), now)
            .await
            .unwrap();
        let first = ms(t);
        let raw = reference(&url).await;
        println!(
            "| {name} | reference: the engine copying the same 10,000 rows into an indexed twin table | {raw:.1} | {:.0} | 1.00 |",
            10_000.0 / raw * 1000.0
        );
        println!(
            "| {name} | first snapshot, 10,000 listeners (one transaction) | {first:.1} | {:.0} | {:.2} |",
            10_000.0 / first * 1000.0,
            first / raw
        );

        // Steady state: 1,000 pid changes (refresh in place), 100 material changes, 100 gone.
        let mut next = snapshot.clone();
        for (i, r) in next.iter_mut().enumerate().take(1_000) {
            r.processes[0].pid += 50_000;
            if i < 100 {
                r.processes[0].comm = "apache2".into();
            }
        }
        next.truncate(9_900);
        let t = Instant::now();
        store
            .apply_snapshot(
                h.host_id,
                &[1; 16],
                2,
                now + time::Duration::seconds(10),
                next.clone(),
                now,
            )
            .await
            .unwrap();
        let second = ms(t);
        println!(
            "| {name} | re-snapshot, 10,000 → 9,900 with 1,100 changed (1,300 rows written) | {second:.1} | {:.0} | {:.2} |",
            10_000.0 / second * 1000.0,
            second / raw
        );

        // Deltas as agents send them: 1,000 messages of 5 changes each, one after another.
        let t = Instant::now();
        for seq in 3..1003u64 {
            let base = 20_000 + (seq as u16 - 3) * 5;
            let c = Changes {
                opened: (0..5).map(|i| record(base + i, "redis", 9)).collect(),
                ..Changes::default()
            };
            store
                .apply_delta(
                    h.host_id,
                    &[1; 16],
                    seq,
                    now + time::Duration::seconds(seq as i64 * 10),
                    c,
                    now,
                )
                .await
                .unwrap();
        }
        let deltas = ms(t);
        println!(
            "| {name} | 1,000 deltas of 5 listeners, sequential | {deltas:.1} | {:.0} msg/s | |",
            1_000.0 / deltas * 1000.0
        );

        // A fleet reconnecting: 50 hosts × 1,000-listener snapshots at once.
        let t = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..50u8 {
            let store = store.clone();
            let snap: Vec<ListenerRecord> = snapshot[..1000].to_vec();
            tasks.push(tokio::spawn(async move {
                let name = format!("fleet-{i}");
                let h = store.hello(&name, &name, "bench", now).await.unwrap();
                store
                    .apply_snapshot(h.host_id, &[i; 16], 1, now, snap, now)
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let fleet = ms(t);
        println!(
            "| {name} | 50 hosts × 1,000-listener snapshots, concurrently | {fleet:.1} | {:.0} | |",
            50_000.0 / fleet * 1000.0
        );
        store.close().await;
    }
}
