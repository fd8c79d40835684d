//! The fleet questions (`query`, `exposure`, `hosts`, `diff`) as a shell meets them, run
//! as the real binary on the same data in a SQLite file and in a throwaway PostgreSQL:
//! the same JSON on both (real booleans, nested JSON columns, structured `diff` fields),
//! CSV with LF and a header for zero rows, `--no-header`, grep-like exit codes, every
//! time format the tool prints or documents, clear errors (out-of-range times, no schema,
//! writes refused before they run, statement timeouts), each cause said once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::process::{Command, Output};

use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use serde_json::{Value, json};
use time::OffsetDateTime;
use util::*;

/// Runs the collector. `query` is given `--allow-privileged-role`: these tests read
/// PostgreSQL as the throwaway server's superuser (on SQLite the flag does nothing);
/// `query_bounds.rs` checks the refusal without it and the read-only role.
fn collector(args: &[&str]) -> Output {
    let mut args = args.to_vec();
    if args.first() == Some(&"query") && !args.contains(&"--help") {
        args.push("--allow-privileged-role");
    }
    Command::new(collector_bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// Runs a command that must succeed (exit 0) and parses its JSON.
fn json_of(args: &[&str]) -> Value {
    let o = collector(args);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&o)))
}

/// The times of the stored history, whole seconds (both databases keep them exactly).
struct Times {
    /// Between the first snapshot and the change.
    before: OffsetDateTime,
    /// When the agent observed the change.
    flipped: OffsetDateTime,
}

impl Times {
    /// A history two minutes old, in whole seconds.
    fn new() -> Times {
        let seen =
            OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::minutes(2);
        Times {
            before: seen + time::Duration::seconds(10),
            flipped: seen + time::Duration::seconds(30),
        }
    }

    fn seen(&self) -> OffsetDateTime {
        self.flipped - time::Duration::seconds(30)
    }
}

/// One host `h1`: a snapshot with an IPv6-only listener on port 80 and a dual-stack one
/// on 443 the firewall leaves open; at `flipped` a delta that replaces port 80 by a
/// dual-stack listener (now reachable over IPv4, hidden from netstat) and a ruleset
/// change that filters 443 over IPv4.
async fn fill(pki: &Pki, db: &DbUrl, t: &Times) {
    let c = InProcess::start(pki, db).await;
    let mut v6only = listener("host", 80);
    v6only.key.as_mut().unwrap().v6only = Some(true);
    v6only.reach_ipv4 = v1::Reach::None as i32;
    v6only.trap = false;
    v6only.hidden_ipv4_exposure = false;
    let https = |v4: &str| {
        let mut l = listener("host", 443);
        l.effective_ipv4 = verdict(v4, "inet filter input handle 5", &[]);
        l.effective_ipv6 = verdict(
            "restricted",
            "inet filter input handle 6",
            &["saddr 2001:db8::/32", "iifname eth1"],
        );
        l
    };
    let mut s = session_as(pki, c.addr, "h1", hello(1, 0, "h1")).await;
    s.recv().await.unwrap();
    s.send(snapshot_at(
        1,
        t.seen(),
        vec![v6only.clone(), https("open")],
    ))
    .await;
    assert!(matches!(
        s.recv().await.unwrap(),
        Some(v1::collector_message::Body::Ack(_))
    ));
    s.send(msg(v1::agent_message::Body::Delta(v1::Delta {
        sequence: 2,
        observed_at: Some(ts(t.flipped)),
        opened: vec![listener("host", 80)],
        closed: vec![v6only.key.clone().unwrap()],
        changed: vec![https("filtered")],
    })))
    .await;
    assert!(matches!(
        s.recv().await.unwrap(),
        Some(v1::collector_message::Body::Ack(_))
    ));
    drop(s);
    c.shutdown().await;
}

fn rfc(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// What one database answers to the questions whose answers must not depend on it.
fn answers(url: &str, t: &Times) -> Vec<Value> {
    let since = rfc(t.before);
    vec![
        json_of(&[
            "query",
            "--db",
            url,
            "--json",
            "SELECT host, port, v6only, latent, trap, hidden_ipv4_exposure, freebind, \
             transparent, process_details, effective_ipv4, effective_conditions_ipv6 \
             FROM current_listeners ORDER BY port",
        ]),
        json_of(&[
            "query",
            "--db",
            url,
            "--json",
            "SELECT host, change, port, v6only, trap FROM listener_changes ORDER BY at, port, change",
        ]),
        json_of(&["diff", "--db", url, "--since", &since, "--json"]),
        json_of(&["exposure", "--db", url, "--at", &since, "--json"]),
        json_of(&["exposure", "--db", url, "--json"]),
    ]
}

/// The same data gives the same JSON on SQLite and PostgreSQL: booleans are booleans,
/// `process_details` is nested, `diff` has structured before/after fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_is_the_same_on_both_databases() {
    require_root();
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("rep-json");
    let sqlite = DbUrl::Sqlite(dir.path().join("ls.db"));
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let pg: DbUrl = server.database("reports").await.parse().unwrap();
    // The same history, observation times included, in both.
    let t = Times::new();
    fill(&pki, &sqlite, &t).await;
    fill(&pki, &pg, &t).await;

    let lite = answers(&sqlite.to_string(), &t);
    let post = answers(&pg.to_string(), &t);
    for (a, b) in lite.iter().zip(&post) {
        assert_eq!(a, b, "SQLite and PostgreSQL differ");
    }

    // Real booleans and nested JSON (SQLite stores 0/1 and text).
    let current = &lite[0];
    assert_eq!(current[0]["port"], 80);
    assert_eq!(current[0]["trap"], true, "{current}");
    assert_eq!(current[0]["v6only"], false, "{current}");
    assert_eq!(current[0]["latent"], false, "{current}");
    assert_eq!(current[0]["hidden_ipv4_exposure"], true, "{current}");
    assert_eq!(current[0]["freebind"], false, "{current}");
    assert_eq!(
        current[0]["process_details"][0]["comm"], "apache2",
        "{current}"
    );
    assert_eq!(current[0]["process_details"][0]["pid"], 42, "{current}");
    assert_eq!(
        current[1]["effective_conditions_ipv6"],
        "saddr 2001:db8::/32 | iifname eth1"
    );
    let changes = &lite[1];
    assert!(
        changes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["v6only"] == true && r["trap"] == false),
        "{changes}"
    );
    for url in [sqlite.to_string(), pg.to_string()] {
        let hosts = json_of(&["hosts", "--db", &url, "--json"]);
        assert_eq!(hosts[0]["stale"], false, "{url}: {hosts}");
        assert_eq!(hosts[0]["listeners"], 2, "{url}: {hosts}");
    }

    // diff: every event and exposure line with its before and after, as fields.
    let diff = lite[2].as_array().unwrap();
    let at = listenscope_collector::timefmt::format(t.flipped);
    let kinds: Vec<(&str, i64)> = diff
        .iter()
        .map(|r| (r["change"].as_str().unwrap(), r["port"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("closed", 80),
            ("opened", 80),
            ("changed", 443),
            ("exposure", 80),
            ("exposure", 443)
        ],
        "{}",
        lite[2]
    );
    for r in diff {
        assert_eq!(r["at"], at.as_str(), "{r}");
        assert_eq!(r["host"], "h1");
        assert_eq!(r["netns"], "host");
        assert_eq!(r["protocol"], "tcp");
        assert!(r["detail"].as_str().is_some_and(|d| !d.is_empty()), "{r}");
    }
    let closed = &diff[0];
    assert_eq!(closed["family"], "ipv6");
    assert_eq!(closed["address"], "::");
    assert_eq!(closed["reach_ipv4_before"], "none");
    assert_eq!(closed["hidden_before"], false);
    assert_eq!(closed["reach_ipv4_after"], Value::Null);
    let opened = &diff[1];
    assert_eq!(opened["reach_ipv4_before"], Value::Null);
    assert_eq!(opened["reach_ipv4_after"], "any");
    assert_eq!(opened["hidden_after"], true);
    assert_eq!(opened["processes"], "apache2");
    let changed = &diff[2];
    assert_eq!(
        (
            &changed["firewall_ipv4_before"],
            &changed["firewall_ipv4_after"]
        ),
        (&json!("open"), &json!("filtered")),
        "{changed}"
    );
    assert_eq!(changed["reach_ipv4_before"], "any");
    assert_eq!(changed["firewall_ipv6_after"], "restricted");
    assert_eq!(
        changed["conditions_ipv6_after"],
        "saddr 2001:db8::/32 | iifname eth1"
    );
    let exposure80 = &diff[3];
    assert_eq!(
        (
            &exposure80["reach_ipv4_before"],
            &exposure80["reach_ipv4_after"],
            &exposure80["hidden_before"],
            &exposure80["hidden_after"]
        ),
        (&json!("none"), &json!("any"), &json!(false), &json!(true)),
        "{exposure80}"
    );
    assert_eq!(exposure80["family"], Value::Null);
    let exposure443 = &diff[4];
    assert_eq!(exposure443["firewall_ipv4_before"], "open");
    assert_eq!(exposure443["firewall_ipv4_after"], "filtered");

    // The table keeps its eight columns; the structured ones are for programs.
    let o = collector(&[
        "diff",
        "--db",
        &sqlite.to_string(),
        "--since",
        &rfc(t.before),
    ]);
    let header = stdout(&o).lines().next().unwrap_or_default().to_string();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "AT", "HOST", "CHANGE", "NETNS", "PROTOCOL", "PORT", "SHOWN_AS", "DETAIL"
        ],
        "{}",
        stdout(&o)
    );
}

/// CSV ends lines with LF and has its header even for zero rows, on every command and
/// both databases; `--no-header` leaves it out (and the table's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_and_headers() {
    require_root();
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("rep-csv");
    let sqlite = DbUrl::Sqlite(dir.path().join("ls.db"));
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let pg: DbUrl = server.database("csv").await.parse().unwrap();
    let t = Times::new();
    for db in [&sqlite, &pg] {
        fill(&pki, db, &t).await;
        let url = db.to_string();
        let run = |args: &[&str], want: i32| {
            let mut all = args.to_vec();
            all.extend(["--db", &url]);
            let o = collector(&all);
            assert_eq!(code(&o), want, "{url} {args:?}: {}", stderr(&o));
            let out = stdout(&o);
            assert!(!out.contains('\r'), "{url} {args:?}: CR in {out:?}");
            out
        };
        // Zero rows: the header alone.
        assert_eq!(
            run(
                &[
                    "query",
                    "--csv",
                    "SELECT host, port FROM current_listeners WHERE port = 9"
                ],
                0
            ),
            "host,port\n",
            "{url}"
        );
        assert_eq!(
            run(&["exposure", "--csv", "--port", "9"], 1),
            "host,netns,protocol,port,shown_as,processes,effective_ipv4,conditions,note\n",
            "{url}"
        );
        let diff_header = run(&["diff", "--csv", "--since", "1s"], 0);
        assert!(
            diff_header.starts_with("at,host,change,netns,protocol,port,shown_as,detail,")
                && diff_header.ends_with(",conditions_ipv6_after\n")
                && diff_header.lines().count() == 1,
            "{url}: {diff_header:?}"
        );
        // Rows, LF-ended; without the header.
        assert_eq!(
            run(
                &[
                    "query",
                    "--csv",
                    "SELECT host, port FROM current_listeners ORDER BY port"
                ],
                0
            ),
            "host,port\nh1,80\nh1,443\n"
        );
        assert_eq!(
            run(
                &[
                    "query",
                    "--csv",
                    "--no-header",
                    "SELECT host, port FROM current_listeners ORDER BY port"
                ],
                0
            ),
            "h1,80\nh1,443\n"
        );
        assert_eq!(
            run(
                &[
                    "query",
                    "--no-header",
                    "SELECT host, port FROM current_listeners ORDER BY port"
                ],
                0
            ),
            "h1  80\nh1  443\n"
        );
        let hosts = run(&["hosts", "--csv"], 0);
        assert!(
            hosts.starts_with("host,os_hostname,agent_version,first_seen,last_seen,stale,")
                && hosts
                    .lines()
                    .nth(1)
                    .is_some_and(|l| l.starts_with("h1,h1,test,")),
            "{url}: {hosts:?}"
        );
        let exposure = run(&["exposure", "--csv", "--no-header", "--port", "80"], 0);
        assert!(
            exposure.starts_with("h1,host,tcp,80,:::80,apache2,"),
            "{exposure:?}"
        );
        // A table without a header for a search that found nothing prints nothing.
        assert_eq!(run(&["exposure", "--no-header", "--port", "9"], 1), "");
    }
    // A fleet nobody reported to yet: the header alone, from either database.
    let pg_empty: DbUrl = server.database("csv_empty").await.parse().unwrap();
    for db in [DbUrl::Sqlite(dir.path().join("empty.db")), pg_empty] {
        InProcess::start(&pki, &db).await.shutdown().await;
        let o = collector(&["hosts", "--csv", "--db", &db.to_string()]);
        assert_eq!(code(&o), 0, "{db}: {}", stderr(&o));
        assert_eq!(
            stdout(&o),
            "host,os_hostname,agent_version,first_seen,last_seen,stale,listeners,watch,\
             collector,duplicate_refusals,duplicate_last_at,duplicate_last_peer,watch_reason,\
             watch_since\n",
            "{db}"
        );
    }
}

/// `exposure` exits as grep does: 0 a host matches, 1 none does, 2 an error.
#[tokio::test]
async fn exposure_exit_codes() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("rep-exit");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let t = Times::new();
    fill(&pki, &db, &t).await;
    let url = db.to_string();
    let missing = format!("sqlite://{}", dir.path().join("none.db").display());
    let before = rfc(t.before);
    for (args, want) in [
        (vec!["--port", "80"], 0),
        (vec!["--port", "80", "--json"], 0),
        (vec![], 0),
        (vec!["--port", "22"], 1),
        (vec!["--port", "22", "--json"], 1),
        (vec!["--port", "80", "--proto", "udp"], 1),
        // Before the change only 443 was hidden from netstat; before the first snapshot
        // nothing was.
        (vec!["--at", &before, "--port", "443"], 0),
        (vec!["--at", &before, "--port", "80"], 1),
        (vec!["--at", "1h"], 1),
        (vec!["--port", "0"], 2),
        (vec!["--port", "http"], 2),
        (vec!["--at", "yesterday"], 2),
        (vec!["--at", "99999999d"], 2),
    ] {
        let mut all = vec!["exposure", "--db", &url];
        all.extend(&args);
        let o = collector(&all);
        assert_eq!(code(&o), want, "{args:?}: {}{}", stdout(&o), stderr(&o));
        if want == 1 && args.contains(&"--json") {
            assert_eq!(stdout(&o).trim(), "[]");
        }
        if want == 2 {
            assert!(stdout(&o).is_empty() && !stderr(&o).is_empty(), "{args:?}");
        }
    }
    let o = collector(&["exposure", "--db", &missing]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // One line naming the file and the fix, said once.
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert_eq!(e.matches("does not exist").count(), 1, "{e}");
    assert!(e.contains("serve --db"), "{e}");
}

/// Time arguments take what the tool prints (`2026-11-27 09:00:00.000`, UTC), the same
/// with a `T`, RFC 3339 and a bare date; out-of-range ages are errors naming the value
/// and the range; errors print times in the tool's format.
#[tokio::test]
async fn time_arguments_in_every_form() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("rep-time");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let t = Times::new();
    fill(&pki, &db, &t).await;
    let url = db.to_string();
    let printed = listenscope_collector::timefmt::format(t.before);
    let reference = json_of(&["diff", "--db", &url, "--since", &rfc(t.before), "--json"]);
    assert_eq!(reference.as_array().unwrap().len(), 5, "{reference}");
    let t_form = printed.replace(' ', "T");
    let seconds = printed.split('.').next().unwrap().to_string();
    for since in [printed.as_str(), t_form.as_str(), seconds.as_str()] {
        let v = json_of(&["diff", "--db", &url, "--since", since, "--json"]);
        assert_eq!(v, reference, "--since {since}");
        // The same time as the point of `exposure --at`: then only 443 was exposed.
        let o = collector(&[
            "exposure",
            "--db",
            &url,
            "--at",
            since,
            "--csv",
            "--no-header",
        ]);
        assert_eq!(code(&o), 0, "--at {since}: {}", stderr(&o));
        assert_eq!(
            stdout(&o).lines().count(),
            1,
            "--at {since}: {}",
            stdout(&o)
        );
        assert!(
            stdout(&o).starts_with("h1,host,tcp,443,"),
            "--at {since}: {}",
            stdout(&o)
        );
    }
    // A date is midnight UTC: the whole history of today (and of yesterday, for a run
    // just after midnight).
    let day = (t.seen() - time::Duration::days(1)).date().to_string();
    let v = json_of(&["diff", "--db", &url, "--since", &day, "--json"]);
    assert!(v.as_array().unwrap().len() > 5, "--since {day}: {v}");

    for (flag, cmd) in [
        ("--since", "diff"),
        ("--until", "diff"),
        ("--at", "exposure"),
    ] {
        let mut args = vec![cmd, "--db", &url, flag, "99999999d"];
        if flag == "--until" {
            args.extend(["--since", "2000-01-01"]);
        }
        let o = collector(&args);
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {e}");
        assert!(
            e.contains(flag) && e.contains("\"99999999d\"") && e.contains("100 years (36500d)"),
            "{args:?}: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
    }
    let o = collector(&["diff", "--db", &url, "--since", "now", "--until", "1h"]);
    let e = stderr(&o);
    assert_eq!(code(&o), 2);
    assert!(e.contains("must be before"), "{e}");
    // `2026-11-27 20:00:00.000`, never `2026-11-27 20:00:00.0 +00:00:00`.
    assert!(!e.contains("+00:00:00"), "{e}");
    let times: Vec<&str> = e
        .split(['(', ')'])
        .nth(1)
        .unwrap()
        .split(" is not before ")
        .collect();
    for time in times {
        assert!(
            listenscope_collector::timefmt::parse(time).is_ok(),
            "{time:?} is not in the tool's format: {e}"
        );
    }
    let o = collector(&["diff", "--db", &url, "--since", "27.11.2026"]);
    let e = stderr(&o);
    assert!(
        code(&o) == 2 && e.contains("2026-11-27 09:00:00") && e.contains("RFC 3339"),
        "{e}"
    );
    let help = stdout(&collector(&["diff", "--help"]));
    assert!(
        help.contains("2026-11-27 09:00:00") && help.contains("2026-11-27T09:00:00Z"),
        "{help}"
    );
}

/// A database the collector never opened (a fresh SQLite file, an empty PostgreSQL
/// database) gets the same message from every report: no tables, start `serve` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_schema_is_said_the_same_on_both_databases() {
    require_root();
    let dir = TempDir::new("rep-empty");
    let file = dir.path().join("fresh.db");
    std::fs::write(&file, b"").unwrap();
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let pg = server.database("empty").await;
    for url in [format!("sqlite://{}", file.display()), pg] {
        for args in [
            vec!["hosts"],
            vec!["exposure", "--port", "80"],
            vec!["diff", "--since", "1h"],
            vec!["query", "SELECT * FROM hosts"],
        ] {
            let mut all = args.clone();
            all.extend(["--db", &url]);
            let o = collector(&all);
            let e = stderr(&o);
            assert_eq!(code(&o), 2, "{url} {args:?}: {e}");
            assert!(
                e.contains("no listenscope tables")
                    && e.contains(&format!("listenscope-collector serve --db {url}")),
                "{url} {args:?}: {e}"
            );
            assert!(
                !e.contains("does not exist") && !e.contains("no such table"),
                "{url} {args:?}: {e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}

/// What is not read-only is refused before it runs (nothing created, no I/O error), on
/// both databases; the refusal and `query --help` name every view of the schema; a
/// statement past `--timeout` is stopped with a message naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_refuses_writes_and_stops_at_its_timeout() {
    require_root();
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("rep-ro");
    let sqlite = DbUrl::Sqlite(dir.path().join("ls.db"));
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let pg: DbUrl = server.database("ro").await.parse().unwrap();
    let t = Times::new();
    fill(&pki, &sqlite, &t).await;
    fill(&pki, &pg, &t).await;
    let lite = sqlite.to_string();
    let post = pg.to_string();

    let copy = dir.path().join("copy.db");
    let vacuum = format!("VACUUM INTO '{}'", copy.display());
    let o = collector(&["query", "--db", &lite, &vacuum]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
    assert!(!copy.exists(), "VACUUM INTO created {}", copy.display());
    let o = collector(&["query", "--db", &lite, "PRAGMA journal_mode=DELETE"]);
    let e = stderr(&o);
    assert!(
        code(&o) == 2 && e.contains("refused") && !e.contains("I/O"),
        "{e}"
    );
    let mode = json_of(&[
        "query",
        "--db",
        &lite,
        "--json",
        "SELECT * FROM pragma_journal_mode",
    ]);
    assert_eq!(mode[0]["journal_mode"], "wal");
    // PostgreSQL's read-only transaction refuses what would write, and creates nothing.
    let server_file = std::env::temp_dir().join(format!("ls-copy-{}", std::process::id()));
    let copy_to = format!("COPY (SELECT 1) TO '{}'", server_file.display());
    for sql in [
        "CREATE TABLE t (x int)",
        "CREATE TEMP TABLE t (x int)",
        "INSERT INTO setting (key, value) VALUES ('a', 'b')",
        copy_to.as_str(),
    ] {
        let o = collector(&["query", "--db", &post, sql]);
        assert_eq!(code(&o), 2, "{sql}");
        assert!(stderr(&o).contains("refused"), "{sql}: {}", stderr(&o));
    }
    assert!(
        !server_file.exists(),
        "COPY TO wrote {}",
        server_file.display()
    );
    let tables = json_of(&[
        "query",
        "--db",
        &post,
        "--json",
        "SELECT count(*) AS n FROM pg_class WHERE relname = 't'",
    ]);
    assert_eq!(tables[0]["n"], 0);

    // The views named to the user are the schema's views, on both databases.
    let views = |url: &str, sql: &str| -> Vec<String> {
        let v = json_of(&["query", "--db", url, "--json", sql]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    let mut schema = views(
        &lite,
        "SELECT name FROM sqlite_master WHERE type = 'view' ORDER BY name",
    );
    let pg_views = views(
        &post,
        "SELECT viewname::text AS name FROM pg_views WHERE schemaname = 'public' ORDER BY 1",
    );
    assert_eq!(schema, pg_views);
    schema.sort();
    assert!(
        schema.contains(&"listener_versions".to_string()),
        "{schema:?}"
    );
    let refusal = stderr(&collector(&["query", "--db", &lite, "DELETE FROM host"]));
    let help = stdout(&collector(&["query", "--help"]));
    let listed = listenscope_collector::query::VIEWS;
    for view in &schema {
        assert!(listed.split(", ").any(|v| v == view), "VIEWS lacks {view}");
        assert!(refusal.contains(view.as_str()), "{view}: {refusal}");
        assert!(help.contains(view.as_str()), "{view}: {help}");
    }
    assert_eq!(listed.split(", ").count(), schema.len(), "{listed}");

    // Timeouts: a statement that would run forever is stopped; the message names the
    // limit and the flag, once.
    for (url, sql) in [
        (
            &lite,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n",
        ),
        (&post, "SELECT pg_sleep(600)"),
    ] {
        let o = collector(&["query", "--db", url, "--timeout", "1s", sql]);
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{url}: {e}");
        assert!(
            e.contains("longer than 1s") && e.matches("--timeout").count() == 1,
            "{url}: {e}"
        );
    }
    let o = collector(&["query", "--db", &lite, "--timeout", "soon", "SELECT 1"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("not a duration"), "{}", stderr(&o));
}
