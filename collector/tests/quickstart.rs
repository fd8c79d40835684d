//! `listenscope-collector quickstart` run twice on one state directory, as a newcomer does:
//! each run shows its own scan (never the previous run's), the headline comes first, the
//! inventory is bounded with the command that shows all of it, and a clean run says
//! nothing on stderr.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::process::{Command, Output};

use util::*;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The port of the run's own collector, from its "collector  https://127.0.0.1:PORT" line.
fn collector_port(out: &str) -> u16 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("collector"))
        .unwrap_or_else(|| panic!("no collector line:\n{out}"));
    let url = line.split_whitespace().nth(1).unwrap();
    url.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn a_second_run_shows_its_own_scan_headline_first_and_a_bounded_inventory() {
    require_root();
    let dir = TempDir::new("qs-twice");
    // More listeners than quickstart prints, on a port range of their own.
    let held: Vec<std::net::TcpListener> = (0..30)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let run = || {
        Command::new(collector_bin())
            .args(["quickstart", "--no-ui"])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let first = run();
    let second = run();
    for o in [&first, &second] {
        assert!(o.status.success(), "{}", stderr(o));
        // A clean run logs nothing at its default level (warn): no cancelled session, no
        // refused handshake of an agent stopped half-way.
        assert_eq!(stderr(o), "", "stdout:\n{}", stdout(o));
    }
    let (p1, p2) = (
        collector_port(&stdout(&first)),
        collector_port(&stdout(&second)),
    );
    assert_ne!(p1, p2);

    // The second run's inventory is its own scan: its collector's port, not the first's
    // (the first run's collector is gone).
    let db = listenscope_collector::store::DbUrl::Sqlite(
        dir.path().join(".listenscope").join("listenscope.db"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shown: Vec<String> = rt
        .block_on(query(
            &db,
            "SELECT shown_as FROM current_listeners WHERE protocol = 'tcp'",
            &[],
        ))
        .rows
        .iter()
        .map(|r| r[0].as_str().unwrap().to_string())
        .collect();
    assert!(
        shown.contains(&format!("127.0.0.1:{p2}")),
        "this run's collector is missing: {shown:?}"
    );
    assert!(
        !shown.contains(&format!("127.0.0.1:{p1}")),
        "the first run's collector is shown as current: {shown:?}"
    );
    for l in &held {
        let a = l.local_addr().unwrap().to_string();
        assert!(shown.contains(&a), "{a} missing from {shown:?}");
    }

    let out = stdout(&second);
    // The headline first, then the inventory.
    let headline = out.find("hidden_ipv4_exposure").expect(&out);
    let inventory = out.find("Inventory of").expect(&out);
    assert!(headline < inventory, "headline after the inventory:\n{out}");
    // Bounded: the 20 most exposed rows, a count of the rest, and the command for all.
    assert!(
        out.contains("The 20 most exposed") && out.contains("(20 rows)"),
        "{out}"
    );
    assert!(out.lines().count() < 60, "{out}");
    assert!(out.contains("more. All of them:"), "{out}");
    assert!(
        out.contains("listenscope-collector query --db sqlite://")
            && out.contains("FROM current_listeners WHERE host ="),
        "{out}"
    );
    let total: usize = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Inventory of ")?
                .split_once(": ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect(&out);
    assert!(total > held.len(), "{total} listeners counted:\n{out}");
    assert!(out.contains("scanned this host at"), "{out}");
}
