//! The command line as an operator meets it: certificates, configuration mistakes,
//! read-only queries in three formats, and the quickstart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::process::{Command, Output};

use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use util::*;

fn collector(args: &[&str]) -> Output {
    Command::new(collector_bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn certs_init_issue_and_their_errors() {
    let dir = TempDir::new("certs");
    let d = dir.path().join("pki");
    let d = d.to_str().unwrap();
    let o = collector(&[
        "certs",
        "init",
        "--dir",
        d,
        "--server-name",
        "collector.example",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = collector(&["certs", "init", "--dir", d]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("a CA already exists") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    let o = collector(&["certs", "issue", "--dir", d, "--host", "web-01"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("web-01.pem") && stdout(&o).contains("web-01.key"));
    let o = collector(&["certs", "issue", "--dir", d, "--host", "bad host"]);
    assert!(
        stderr(&o).contains("not a valid host name"),
        "{}",
        stderr(&o)
    );
    let empty = dir.path().join("empty");
    let o = collector(&[
        "certs",
        "issue",
        "--dir",
        empty.to_str().unwrap(),
        "--host",
        "h1",
    ]);
    assert!(stderr(&o).contains("certs init --dir"), "{}", stderr(&o));
    let o = collector(&["certs", "init", "--dir", d, "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn serve_names_bad_files_and_settings() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("serve");
    let db = format!("sqlite://{}", dir.path().join("x.db").display());
    let p = |f: &str| pki.path(f).to_str().unwrap().to_string();
    let serve = |ca: &str, cert: &str, key: &str| {
        collector(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--tls-ca",
            ca,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ])
    };
    // Missing file.
    let o = serve(&p("ca.pem"), &p("nope.pem"), &p("server.key"));
    assert!(
        !o.status.success() && stderr(&o).contains("nope.pem: cannot read it"),
        "{}",
        stderr(&o)
    );
    // Key of another certificate.
    let o = serve(&p("ca.pem"), &p("server.pem"), &p("h1.key"));
    assert!(
        stderr(&o).contains("does not belong to the certificate"),
        "{}",
        stderr(&o)
    );
    // A key where a certificate belongs.
    let o = serve(&p("ca.pem"), &p("server.key"), &p("server.key"));
    assert!(stderr(&o).contains("no PEM certificate"), "{}", stderr(&o));
    // Everything wrong at once is reported at once.
    let o = collector(&["serve", "--listen", "nowhere", "--db", "mysql://x"]);
    let e = stderr(&o);
    assert!(
        e.contains("listen \"nowhere\"")
            && e.contains("db: unsupported")
            && e.contains("tls_ca is required"),
        "{e}"
    );
    // A retention period out of range is refused at start (the retention task never
    // sees it), naming the value and the range.
    let o = collector(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &db,
        "--tls-ca",
        &p("ca.pem"),
        "--tls-cert",
        &p("server.pem"),
        "--tls-key",
        &p("server.key"),
        "--retain",
        "99999999d",
    ]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("retain: \"99999999d\" is out of range") && e.contains("100 years (36500d)"),
        "{e}"
    );
    // Unknown keys in the config file.
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:1\"\nstale_afterr = \"1m\"\n").unwrap();
    let o = collector(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("unknown field") && stderr(&o).contains("stale_afterr"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn query_is_read_only_and_speaks_three_formats() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("query");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start(&pki, &db).await;
    let mut s = session_as(&pki, c.addr, "h1", hello(1, 0, "h1")).await;
    s.recv().await.unwrap();
    s.send(snapshot(
        1,
        vec![listener("host", 80), listener("host", 443)],
    ))
    .await;
    assert!(matches!(
        s.recv().await.unwrap(),
        Some(v1::collector_message::Body::Ack(_))
    ));
    drop(s);
    c.shutdown().await;
    let url = db.to_string();

    let o = collector(&[
        "query",
        "--db",
        &url,
        "SELECT host, port, trap FROM current_listeners ORDER BY port",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = stdout(&o);
    assert!(
        t.contains("HOST") && t.contains("443") && t.trim_end().ends_with("(2 rows)"),
        "{t}"
    );
    let o = collector(&[
        "query",
        "--db",
        &url,
        "--json",
        "SELECT host, port FROM current_listeners ORDER BY port",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[1]["port"], 443);
    let o = collector(&[
        "query",
        "--db",
        &url,
        "--csv",
        "SELECT host, port, processes FROM current_listeners ORDER BY port",
    ]);
    assert!(
        stdout(&o).starts_with("host,port,processes\nh1,80,apache2\n"),
        "{}",
        stdout(&o)
    );

    // Writes are refused, whatever their form, and nothing changes.
    for sql in [
        "DELETE FROM listener",
        "UPDATE host SET name = 'x'",
        "INSERT INTO setting VALUES ('a', 'b')",
        "DROP VIEW hosts",
        "CREATE TABLE t (x)",
    ] {
        let o = collector(&["query", "--db", &url, sql]);
        assert!(!o.status.success(), "{sql} was allowed");
        assert!(
            stderr(&o).contains("refused: this connection is read-only"),
            "{sql}: {}",
            stderr(&o)
        );
    }
    let o = collector(&["query", "--db", &url, "SELECT count(*) AS n FROM listener"]);
    assert!(
        stdout(&o).lines().any(|l| l.trim() == "2"),
        "{}",
        stdout(&o)
    );
    let o = collector(&["query", "--db", &url, "SELEC nonsense"]);
    assert!(stderr(&o).contains("SQL error"), "{}", stderr(&o));
    // One statement at a time (two would have printed under one header), none refused.
    let o = collector(&["query", "--db", &url, "SELECT 1; SELECT 2"]);
    assert!(
        !o.status.success() && stdout(&o).is_empty(),
        "{}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("more than one SQL statement"),
        "{}",
        stderr(&o)
    );
    let o = collector(&["query", "--db", &url, "  -- only a comment\n;"]);
    assert!(!o.status.success(), "empty SQL succeeded");
    assert!(
        stderr(&o).contains("no SQL statement given"),
        "{}",
        stderr(&o)
    );
    // Every storage class, and a trailing `;` and comment are fine.
    let o = collector(&[
        "query",
        "--db",
        &url,
        "--json",
        "SELECT x'00ff' AS b, 1.5 AS r, NULL AS n, 'é' AS t, 7 AS i; -- done",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{"b": "00ff", "r": 1.5, "n": null, "t": "é", "i": 7}])
    );
    let missing = format!("sqlite://{}", dir.path().join("none.db").display());
    let o = collector(&["query", "--db", &missing, "SELECT 1"]);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));

    // Reports.
    let o = collector(&["exposure", "--db", &url, "--port", "80"]);
    assert!(
        stdout(&o).contains("h1") && stdout(&o).contains(":::80"),
        "{}",
        stdout(&o)
    );
    let o = collector(&["exposure", "--db", &url, "--port", "22", "--proto", "tcp"]);
    assert!(
        stdout(&o).contains("No host exposes tcp port 22"),
        "{}",
        stdout(&o)
    );
    let o = collector(&["hosts", "--db", &url, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["host"], "h1");
    assert_eq!(v[0]["listeners"], 2);
}

#[test]
fn quickstart_shows_inventory_and_headline() {
    require_root();
    let dir = TempDir::new("qs");
    let run = || {
        Command::new(collector_bin())
            .args(["quickstart", "--no-ui"])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("(created: CA, server, agent"), "{out}");
    assert!(
        out.contains("Inventory of") && out.contains("current_listeners"),
        "{out}"
    );
    assert!(out.contains("hidden_ipv4_exposure"), "{out}");
    // Its own collector's listener is part of the truth on this host.
    assert!(out.contains("127.0.0.1:"), "{out}");
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("(reused: CA, server, agent"),
        "{}",
        stdout(&o)
    );
}

#[tokio::test]
async fn diff_and_point_in_time_from_the_command_line() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("diffcli");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start(&pki, &db).await;
    let mut s = session_as(&pki, c.addr, "h1", hello(1, 0, "h1")).await;
    s.recv().await.unwrap();
    let mut v6only = listener("host", 80);
    v6only.key.as_mut().unwrap().v6only = Some(true);
    v6only.reach_ipv4 = v1::Reach::None as i32;
    v6only.trap = false;
    v6only.hidden_ipv4_exposure = false; // as the agent reports a v6-only socket
    // Observation times chosen, not waited for: the v6-only socket seen a minute ago, the
    // flip to dual-stack 30 s later, and `before` between the two.
    let seen = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let flipped = seen + time::Duration::seconds(30);
    let before = seen + time::Duration::seconds(10);
    s.send(snapshot_at(1, seen, vec![v6only.clone()])).await;
    s.recv().await.unwrap();
    s.send(delta_at(
        2,
        flipped,
        vec![listener("host", 80)],
        vec![v6only.key.clone().unwrap()],
    ))
    .await;
    s.recv().await.unwrap();
    drop(s);
    c.shutdown().await;
    let url = db.to_string();
    let rfc = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };

    let o = collector(&["diff", "--db", &url, "--since", &rfc(before)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("closed") && out.contains("opened") && out.contains("exposure"),
        "{out}"
    );
    assert!(
        out.contains("IPv4 none → any") && out.contains("hidden from netstat no → yes"),
        "{out}"
    );
    let o = collector(&["diff", "--db", &url, "--since", &rfc(before), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        3,
        "since `before`: the flip only (closed, opened, exposure): {v}"
    );
    let o = collector(&[
        "diff",
        "--db",
        &url,
        "--since",
        "1h",
        "--host",
        "nobody-here",
    ]);
    assert!(
        stdout(&o).contains("Nothing changed on nobody-here"),
        "{}",
        stdout(&o)
    );
    let o = collector(&["diff", "--db", &url, "--since", "1h", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        4,
        "opened at the snapshot, closed, opened, exposure"
    );
    // --host as an operator may type it: case and a trailing dot do not matter.
    let o = collector(&[
        "diff", "--db", &url, "--since", "1h", "--host", "H1.", "--json",
    ]);
    let by_name: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(by_name, v, "{}", stderr(&o));
    let o = collector(&["diff", "--db", &url, "--since", "yesterday"]);
    assert!(
        !o.status.success() && stderr(&o).contains("--since") && stderr(&o).contains("RFC 3339"),
        "{}",
        stderr(&o)
    );
    let o = collector(&["diff", "--db", &url, "--since", "now", "--until", "1h"]);
    assert!(stderr(&o).contains("must be before"), "{}", stderr(&o));

    // Point in time: before the flip nothing was exposed, now port 80 is.
    let o = collector(&["exposure", "--db", &url, "--at", &rfc(before)]);
    assert!(
        stdout(&o).contains("No host exposed any port"),
        "{}",
        stdout(&o)
    );
    let o = collector(&["exposure", "--db", &url, "--at", "now", "--port", "80"]);
    assert!(
        stdout(&o).contains("h1") && stdout(&o).contains(":::80"),
        "{}",
        stdout(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_on_postgres() {
    require_root();
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let url = server.database("qs").await;
    let dir = TempDir::new("qspg");
    let o = Command::new(collector_bin())
        .args(["quickstart", "--no-ui", "--db", &url])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("postgres://") && out.contains("Inventory of"),
        "{out}"
    );
    let o = collector(&["hosts", "--db", &url, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["stale"], false, "native booleans on PostgreSQL");
    // The in-process agent reports how it watches (its Hello), shown as the text form.
    let watch = v[0]["watch"].as_str().unwrap_or_default();
    assert!(
        watch.parse::<listenscope_core::watch::WatchMode>().is_ok(),
        "watch {watch:?}: {v}"
    );
}

/// `exposure --port P` with firewall verdicts: each host's effective IPv4 verdict of the
/// hidden port and its conditions, hosts the firewall leaves open or restricted first,
/// filtered ones marked; `exposure --at` shows the verdicts as they were; `diff` shows a
/// ruleset change as a change, before → after, at its observation time.
#[tokio::test]
async fn exposure_and_diff_show_firewall_verdicts() {
    let hosts = ["web-a", "web-b", "web-c", "web-d"];
    let pki = Pki::new(&hosts);
    let dir = TempDir::new("fwcli");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start(&pki, &db).await;
    let seen = time::OffsetDateTime::now_utc() - time::Duration::minutes(2);
    let flipped = seen + time::Duration::seconds(30);
    let before = seen + time::Duration::seconds(10);
    let with = |v4: Option<v1::FirewallVerdict>| {
        let mut l = listener("host", 80);
        l.effective_ipv4 = v4;
        l.effective_ipv6 = verdict(
            "open",
            "inet filter input handle 3: tcp dport 80 accept",
            &[],
        );
        l
    };
    let open = || {
        verdict(
            "open",
            "inet filter input handle 5: tcp dport 80 accept",
            &[],
        )
    };
    let states = [
        with(open()),
        with(verdict(
            "restricted",
            "inet filter input handle 6: ip saddr 10.0.0.0/8 tcp dport 80 accept",
            &["saddr 10.0.0.0/8", "iifname eth1"],
        )),
        with(open()),
        listener("host", 80), // an agent from before verdicts
    ];
    for (i, (host, l)) in hosts.iter().zip(states).enumerate() {
        let mut s = session_as(&pki, c.addr, host, hello(i as u8 + 1, 0, host)).await;
        s.recv().await.unwrap();
        s.send(snapshot_at(1, seen, vec![l])).await;
        assert!(matches!(
            s.recv().await.unwrap(),
            Some(v1::collector_message::Body::Ack(_))
        ));
        if *host == "web-c" {
            // A ruleset change closes the port over IPv4.
            let closed = with(verdict("filtered", "policy drop of inet filter input", &[]));
            s.send(msg(v1::agent_message::Body::Delta(v1::Delta {
                sequence: 2,
                observed_at: Some(ts(flipped)),
                opened: vec![],
                closed: vec![],
                changed: vec![closed],
            })))
            .await;
            assert!(matches!(
                s.recv().await.unwrap(),
                Some(v1::collector_message::Body::Ack(_))
            ));
        }
    }
    c.shutdown().await;
    let url = db.to_string();
    let rfc = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };

    // The table: open, restricted, unknown, then filtered (marked).
    let o = collector(&["exposure", "--db", &url, "--port", "80"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("EFFECTIVE_IPV4")
            && lines[0].contains("CONDITIONS")
            && lines[0].contains("NOTE"),
        "{out}"
    );
    let order: Vec<&str> = lines[1..5]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(order, ["web-a", "web-b", "web-d", "web-c"], "{out}");
    assert!(lines[1].contains(" open"), "{out}");
    assert!(
        lines[2].contains("restricted") && lines[2].contains("saddr 10.0.0.0/8 | iifname eth1"),
        "{out}"
    );
    assert!(lines[3].contains("unknown"), "{out}");
    assert!(
        lines[4].contains("filtered") && lines[4].contains("not exposed"),
        "{out}"
    );
    let o = collector(&["exposure", "--db", &url, "--port", "80", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["effective_ipv4"], "open");
    assert_eq!(v[0]["note"], serde_json::Value::Null);
    assert_eq!(v[1]["conditions"], "saddr 10.0.0.0/8 | iifname eth1");
    assert_eq!(v[3]["host"], "web-c");
    assert_eq!(v[3]["effective_ipv4"], "filtered");
    assert!(
        v[3]["note"].as_str().unwrap().starts_with("filtered:"),
        "{v}"
    );

    // Before the ruleset change web-c was open: it sorts with the open hosts.
    let o = collector(&[
        "exposure",
        "--db",
        &url,
        "--port",
        "80",
        "--at",
        &rfc(before),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let then: Vec<(&str, &str)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap(),
                r["effective_ipv4"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        then,
        [
            ("web-a", "open"),
            ("web-c", "open"),
            ("web-b", "restricted"),
            ("web-d", "unknown")
        ]
    );

    // diff: the change, before → after, at the time the agent observed it.
    let o = collector(&["diff", "--db", &url, "--since", &rfc(before), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(
        rows.len(),
        2,
        "the change event and the port's exposure line: {v}"
    );
    let at = listenscope_collector::timefmt::format(flipped);
    for (row, change) in rows.iter().zip(["changed", "exposure"]) {
        assert_eq!(row["host"], "web-c", "{v}");
        assert_eq!(row["change"], change, "{v}");
        assert_eq!(row["at"], at.as_str(), "{v}");
        assert!(
            row["detail"]
                .as_str()
                .unwrap()
                .contains("firewall IPv4 open → filtered"),
            "{v}"
        );
    }
    let o = collector(&["diff", "--db", &url, "--since", &rfc(before)]);
    assert!(
        stdout(&o).contains("firewall IPv4 open → filtered"),
        "{}",
        stdout(&o)
    );
}
