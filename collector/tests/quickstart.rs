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

/// One GET over HTTP/1.1 to `base` (`http://ADDR/`) + `path`: status and body.
fn http_get(base: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = base
        .strip_prefix("http://")
        .and_then(|a| a.strip_suffix('/'))
        .unwrap_or_else(|| panic!("not a UI address: {base}"));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect(&raw);
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// After its printout, quickstart keeps serving the web UI on loopback (and only the UI:
/// its collector is gone) until SIGTERM, and the exposure page shows this machine's
/// headline: a dual-stack socket (IPV6_V6ONLY=0) this test holds.
#[test]
fn quickstart_serves_the_ui_with_this_machines_headline() {
    use std::io::BufRead;
    require_root();
    let dir = TempDir::new("qs-ui");
    let trap = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    trap.set_only_v6(false).unwrap();
    trap.bind(&"[::]:0".parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    trap.listen(8).unwrap();
    let port = trap.local_addr().unwrap().as_socket().unwrap().port();

    let mut child = Command::new(collector_bin())
        .args(["quickstart", "--ui-listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Killed if the test fails half-way.
    let mut child = Proc(child);
    let mut printed = String::new();
    let base = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("quickstart ended before the UI line:\n{printed}"))
            .unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if let Some(url) = line.strip_prefix("Web UI (read-only, this machine only): ") {
            break url.to_string();
        }
    };
    let host = printed
        .split("agent \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect(&printed)
        .to_string();
    // The collector it ran is gone: only the UI listens.
    let collector = collector_port(&printed);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", collector)).is_err(),
        "the quickstart's collector still listens"
    );

    let (status, body) = http_get(&base, &format!("/exposure?port={port}"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("href=\"/hosts/{host}\"")) && body.contains(&format!(":::{port}")),
        "{host} :::{port} missing from the exposure page:\n{body}"
    );
    let (status, body) = http_get(&base, "/");
    assert_eq!(status, 200);
    assert!(body.contains("Fleet overview"), "{body}");
    let (status, _) = http_get(&base, &format!("/hosts/{host}"));
    assert_eq!(status, 200);

    // SIGTERM ends it cleanly.
    let status = child.terminate();
    assert!(status.success(), "{status:?}");
    drop(trap);
}
