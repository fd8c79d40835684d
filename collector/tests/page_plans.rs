//! The fleet pages' statements on SQLite walk an index and stop at the page's end: no
//! sort of every row the filter selects, no read of every live listener on a port. The
//! store keeps no statistics on SQLite (no ANALYZE), so the plan SQLite chooses for an
//! empty database is the one it chooses at 100,000 hosts: a plan asserted here is the
//! plan of a big fleet (docs/BENCHMARKS.md, "The web UI at 100,000 hosts", has the times).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use listenscope_collector::query::{self, ExposureSort, HostsSort, Order, ReadOnly, Statement};
use listenscope_collector::store::{DbUrl, Store, StoreOptions};
use util::*;

/// SQLite's plan of `s`, one line per step (`SEARCH hidden_port USING INDEX …`).
async fn plan(ro: &ReadOnly, s: &Statement) -> String {
    let rs = ro
        .run(&format!("EXPLAIN QUERY PLAN {}", s.sql), &s.params)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", s.sql));
    let detail = rs.columns.iter().position(|c| c == "detail").unwrap();
    rs.rows
        .iter()
        .map(|r| r[detail].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `s` is planned with `index` and without a sort of its own (`partial`: SQLite may sort
/// the rows of each run of equal leading keys, as it reads them, and still stop at the
/// page's end; never all the rows before the first is returned).
fn by<C>(by: C, descending: bool) -> Order<C> {
    Order { by, descending }
}

async fn walks(ro: &ReadOnly, s: &Statement, index: &str, partial: bool) {
    let p = plan(ro, s).await;
    assert!(
        p.contains(&format!("INDEX {index}")),
        "{index} not used:\n{p}\n{}",
        s.sql
    );
    let sorts = if partial {
        p.contains("TEMP B-TREE FOR ORDER BY")
    } else {
        p.contains("TEMP B-TREE")
    };
    assert!(!sorts, "sorts:\n{p}\n{}", s.sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_pages_walk_indexes_on_sqlite() {
    let dir = TempDir::new("page-plans");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    Store::open(&db, &StoreOptions::default()).await.unwrap();
    let ro = ReadOnly::open(&db).await.unwrap();

    // The headline for one port (by verdict, the default, and by host) and over every
    // port (by verdict and by port); deep pages too (OFFSET walks the index). Over every
    // port by host or by processes sorts (migration 0011 says why).
    for (port, order, index) in [
        (
            Some(80),
            by(ExposureSort::Verdict, true),
            "hidden_port_port_rank",
        ),
        (
            Some(80),
            by(ExposureSort::Host, false),
            "hidden_port_port_host",
        ),
        (None, by(ExposureSort::Verdict, true), "hidden_port_rank"),
        (None, by(ExposureSort::Port, false), "hidden_port_port_host"),
    ] {
        // The other direction is the exact reverse: the same index, read backwards.
        let reversed = by(order.by, !order.descending);
        for (order, proto, offset) in [
            (order, None, 0),
            (order, Some("tcp"), 9_950),
            (reversed, None, 9_950),
        ] {
            let s = query::exposure_statements(&ro, port, proto, order, Some(50), offset);
            // A protocol filter makes the protocol a constant of the order: SQLite then
            // sorts each (verdict, host, namespace) run by port, as it reads.
            walks(&ro, &s.rows, index, proto.is_some()).await;
            if port.is_some() {
                let p = plan(&ro, &s.count).await;
                assert!(
                    p.contains("(port=?"),
                    "the count reads one port's entries:\n{p}"
                );
            }
        }
    }

    // Hosts: silent longest first (the default), by name, by listeners; a deep page.
    for (order, index) in [
        (by(HostsSort::LastSeen, false), "host_last_seen"),
        (by(HostsSort::Listeners, true), "host_live_listeners"),
        (by(HostsSort::Host, false), "sqlite_autoindex_host_1"),
    ] {
        for order in [order, by(order.by, !order.descending)] {
            let s = query::hosts_statements(&ro, false, order, Some(50), 99_950);
            walks(&ro, &s.rows, index, false).await;
        }
    }
    // Stale hosts are a range of last_seen, for the page and for its count.
    let s = query::hosts_statements(&ro, true, by(HostsSort::LastSeen, false), Some(50), 0);
    walks(&ro, &s.rows, "host_last_seen", false).await;
    let p = plan(&ro, &s.count).await;
    assert!(
        p.contains("host_last_seen (last_seen<?)"),
        "stale count:\n{p}"
    );

    // The containers and units of a page's trap sockets: each host's listeners, found
    // by host, whatever the number of hosts and ports (with a list of ports SQLite
    // read every live listener on them, 100,000 rows for port 80 at 100,000 hosts).
    let hosts: Vec<String> = (0..50).map(|i| format!("fleet-{i:06}")).collect();
    for ports in [&[80][..], &[80, 443, 8080]] {
        let s = query::trap_owners_statement(&ro, &hosts, ports).unwrap();
        let p = plan(&ro, &s).await;
        assert!(p.contains("(host_id=?)"), "owners by host:\n{p}");
        assert!(!p.contains("listener_live_port"), "owners by port:\n{p}");
    }
    ro.close().await;
}
