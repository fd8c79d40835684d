//! The Grafana dashboard (`deploy/grafana/listenscope.json`) against a real PostgreSQL.
//!
//! The JSON is read as Grafana reads it: every panel must have a title and SQL, on the
//! `${DS_LISTENSCOPE}` PostgreSQL data source. Every panel's and every templating
//! variable's `rawSql` is expanded the way Grafana's PostgreSQL data source does it
//! (template variables, `$__interval`, then the macros `$__timeFilter`,
//! `$__timeGroupAlias`, `$__timeGroup`, `$__timeFrom`, `$__timeTo`, with Grafana's own
//! output text and quirks), and an unknown macro or variable fails the test, so a panel
//! cannot use something this test does not expand. Each query then runs on a throwaway
//! PostgreSQL whose fixtures went in through the real ingest path (mutual-TLS gRPC sessions
//! into the in-process collector: three hosts, v6only=0 "trap" listeners among them, a
//! firewall change, closes, a host gone silent), connected as the read-only role created
//! exactly as docs/postgres.md says, over the simple query protocol Grafana uses. Every
//! panel's answer is checked against what the fixtures must give, and a panel without such
//! a check fails the test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use listenscope_collector::ingest::Limits;
use listenscope_collector::query;
use listenscope_collector::server;
use listenscope_collector::store::{DbUrl, Store, StoreOptions};
use listenscope_proto::v1;
use serde_json::Value;
use sqlx::{Column, Row, ValueRef};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use util::*;

/// The data source plugin the dashboard is written for (Grafana ≥ 10.2.3; `postgres` before).
const PLUGIN: &str = "grafana-postgresql-datasource";
/// The data source variable every panel and query names.
const DS_UID: &str = "${DS_LISTENSCOPE}";

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/listenscope.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

// ---------------------------------------------------------------------------------------
// Grafana's expansion of a query, the subset this dashboard uses.
// ---------------------------------------------------------------------------------------

/// What Grafana knows when it sends a query: the time range, `$__interval`, the values of
/// the dashboard's variables.
struct Ctx {
    from: OffsetDateTime,
    to: OffsetDateTime,
    /// `$__interval`: the panel's minimum interval (`"interval"`); `None` when the panel has
    /// none, and then `$__interval` is refused (Grafana would pick one from the panel's
    /// width, which a test cannot know).
    interval: Option<Duration>,
    vars: BTreeMap<String, String>,
}

/// A macro or variable the expansion does not know: the test fails on it.
fn unknown(what: &str) -> String {
    format!(
        "{what}: this test does not expand it, so the query would run untested; use a \
         macro or variable the test knows, or teach `expand` Grafana's behaviour for it"
    )
}

/// Expands `sql` as Grafana does, in its order: the browser replaces the dashboard's
/// variables and `$__interval`; the PostgreSQL data source's backend replaces its global
/// substitutions (`$__interval` again), then every `$name(args)` through its macro engine
/// (`pkg/tsdb/grafana-postgresql-datasource/macros.go`). Anything else starting with `$`
/// is an error here (Grafana would leave it to PostgreSQL, which fails or misreads it).
fn expand(sql: &str, ctx: &Ctx) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("[[") {
            // Grafana's old variable syntax [[name]] / [[name:format]].
            if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                let end = after.find("]]").map_or(after.len(), |e| e + 2);
                return Err(unknown(&format!("[[{}", &after[..end])));
            }
            out.push_str("[[");
            rest = after;
            continue;
        }
        if let Some(after) = rest.strip_prefix('[') {
            out.push('[');
            rest = after;
            continue;
        }
        let after = &rest[1..];
        if let Some(inner) = after.strip_prefix('{') {
            // ${name}, ${name:format}, ${name.field}
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {rest:?}"))?;
            let name = &inner[..end];
            let value = ctx
                .vars
                .get(name)
                .ok_or_else(|| unknown(&format!("${{{name}}}")))?;
            out.push_str(value);
            rest = &inner[end + 1..];
            continue;
        }
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        if name.is_empty() {
            return Err(unknown(&format!("a lone $ in {rest:?}")));
        }
        let tail = &after[len..];
        if let Some(args) = tail.strip_prefix('(') {
            // Grafana's macro pattern: \$([_a-zA-Z0-9]+)\(([^\)]*)\)
            let close = args
                .find(')')
                .ok_or_else(|| format!("${name}( has no closing parenthesis"))?;
            let whole = &rest[..1 + len + 1 + close + 1];
            let mut name = name.to_string();
            // Grafana's pre-5.3 compatibility: a $__timeGroup followed directly by a comma
            // (at its first occurrence in the query) is read as $__timeGroupAlias.
            if name == "__timeGroup"
                && let Some(i) = sql.find(whole)
                && sql[i + whole.len()..].starts_with(',')
            {
                name = "__timeGroupAlias".into();
            }
            let args: Vec<&str> = args[..close]
                .split(',')
                .map(|a| a.trim_matches(' '))
                .collect();
            // The browser replaced variables inside the arguments first: only $__interval
            // is expected there.
            if let Some(a) = args
                .iter()
                .find(|a| a.contains('$') && **a != "$__interval")
            {
                return Err(unknown(&format!("{a} inside {whole}")));
            }
            out.push_str(&macro_text(&name, &args, ctx)?);
            rest = &rest[whole.len()..];
            continue;
        }
        match name {
            "__interval" => out.push_str(&interval_text(ctx)?),
            n if ctx.vars.contains_key(n) => out.push_str(&ctx.vars[n]),
            n => return Err(unknown(&format!("${n}"))),
        }
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// `$__interval` as Grafana writes it (`gtime.FormatInterval`: the count of the largest
/// unit it reaches, rounded down).
fn interval_text(ctx: &Ctx) -> Result<String, String> {
    let i = ctx.interval.ok_or_else(|| {
        "$__interval in a panel without a minimum interval (\"interval\"): Grafana would \
         derive it from the panel's width; give the panel an interval (the timeline uses 1h)"
            .to_string()
    })?;
    let s = i.as_secs();
    if s == 0 {
        return Err(format!("interval {i:?}: below a second"));
    }
    Ok(match s {
        s if s >= 365 * 86_400 => format!("{}y", s / (365 * 86_400)),
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    })
}

/// The body of one macro, as `evaluateMacro` in Grafana's PostgreSQL data source writes it
/// (no TimescaleDB).
fn macro_text(name: &str, args: &[&str], ctx: &Ctx) -> Result<String, String> {
    let column = || match args.first() {
        Some(c) if !c.is_empty() => Ok(*c),
        _ => Err(format!("missing time column argument for macro {name}")),
    };
    Ok(match name {
        "__timeFilter" => format!(
            "{} BETWEEN '{}' AND '{}'",
            column()?,
            rfc3339_nano(ctx.from),
            rfc3339_nano(ctx.to)
        ),
        "__timeFrom" => format!("'{}'", rfc3339_nano(ctx.from)),
        "__timeTo" => format!("'{}'", rfc3339_nano(ctx.to)),
        "__timeGroup" | "__timeGroupAlias" => {
            if args.len() < 2 {
                return Err(format!(
                    "macro {name} needs time column and interval and optional fill value"
                ));
            }
            if args.len() > 2 {
                return Err(unknown(&format!("${name} with a fill value")));
            }
            // The browser has already replaced $__interval in the arguments.
            let interval = match args[1] {
                "$__interval" => interval_text(ctx)?,
                a => a.trim_matches('\'').to_string(),
            };
            let secs = go_float(parse_interval(&interval)?);
            let group = format!("floor(extract(epoch from {})/{secs})*{secs}", args[0]);
            if name == "__timeGroupAlias" {
                format!("{group} AS \"time\"")
            } else {
                group
            }
        }
        other => return Err(unknown(&format!("the macro ${other}()"))),
    })
}

/// An interval such as `1h` or `30m` in seconds (`gtime.ParseInterval`, the units this test
/// needs: s, m, h, d, w).
fn parse_interval(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("error parsing interval {s}"))?;
    let unit = match &s[digits..] {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        u => return Err(unknown(&format!("the interval unit {u:?} in {s:?}"))),
    };
    Ok(n * unit)
}

/// A whole number of seconds as Go's `%v` prints a float64 (`interval.Seconds()` in the
/// macro): `%g` with the shortest digits, so plain below 1e6 (`3600`) and in exponent form
/// from there (`1.2096e+06`).
fn go_float(n: u64) -> String {
    if n < 1_000_000 {
        return n.to_string();
    }
    let digits = n.to_string();
    let exp = digits.len() - 1;
    let mantissa = digits.trim_end_matches('0');
    let (first, more) = mantissa.split_at(1);
    let dot = if more.is_empty() {
        String::new()
    } else {
        format!(".{more}")
    };
    format!("{first}{dot}e+{exp:02}")
}

/// Go's `time.RFC3339Nano` of a UTC time: fraction without trailing zeros, none if zero.
fn rfc3339_nano(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let frac = format!("{:09}", t.nanosecond());
    let frac = frac.trim_end_matches('0');
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{}{}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        if frac.is_empty() { "" } else { "." },
        frac
    )
}

// ---------------------------------------------------------------------------------------
// The dashboard's queries.
// ---------------------------------------------------------------------------------------

/// One query of the dashboard.
#[derive(Debug, Clone)]
struct Query {
    /// The panel's title, or `variable NAME`.
    origin: String,
    sql: String,
    /// `table` or `time_series` (variables: `table`).
    format: String,
    /// The panel's minimum interval (`$__interval`).
    interval: Option<Duration>,
}

/// Every query of the dashboard, after checking the structure Grafana needs: titles, SQL
/// on the `${DS_LISTENSCOPE}` PostgreSQL data source, a data source variable of that name.
fn queries(dash: &Value) -> Vec<Query> {
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
        "schemaVersion of a current Grafana (11 or later)"
    );
    assert!(
        dash["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "a stable uid (at most 40 characters)"
    );
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    assert!(!panels.is_empty(), "no panels");
    let mut ids = BTreeSet::new();
    while let Some(p) = panels.pop() {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "a panel without a title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: duplicate id"
        );
        // Rows hold panels (collapsed rows keep theirs inside) and no query.
        if p["type"] == "row" {
            assert!(p.get("targets").is_none(), "{title}: a row with queries");
            panels.extend(p["panels"].as_array().into_iter().flatten());
            continue;
        }
        let ds = &p["datasource"];
        assert_eq!(ds["type"], PLUGIN, "{title}: data source type");
        assert_eq!(ds["uid"], DS_UID, "{title}: data source");
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "{title}: a panel without SQL");
        let interval = p["interval"].as_str().map(|i| {
            Duration::from_secs(parse_interval(i).unwrap_or_else(|e| panic!("{title}: {e}")))
        });
        for t in targets {
            assert_eq!(t["datasource"]["uid"], DS_UID, "{title}: query data source");
            assert_eq!(t["rawQuery"], true, "{title}: raw SQL (code mode)");
            let sql = t["rawSql"].as_str().unwrap_or_default();
            assert!(!sql.trim().is_empty(), "{title}: a query without SQL: {t}");
            let format = t["format"].as_str().unwrap_or("time_series").to_string();
            assert!(
                format == "table" || format == "time_series",
                "{title}: format {format}"
            );
            out.push(Query {
                origin: title.to_string(),
                sql: sql.to_string(),
                format,
                interval,
            });
        }
    }
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds_var = vars
        .iter()
        .find(|v| v["name"] == "DS_LISTENSCOPE")
        .expect("a data source variable DS_LISTENSCOPE");
    assert_eq!(ds_var["type"], "datasource");
    assert_eq!(
        ds_var["query"], PLUGIN,
        "DS_LISTENSCOPE lists PostgreSQL data sources"
    );
    for v in vars {
        let name = v["name"].as_str().expect("variable name");
        match v["type"].as_str() {
            Some("datasource") => {}
            Some("query") => {
                assert_eq!(
                    v["datasource"]["uid"], DS_UID,
                    "variable {name}: data source"
                );
                // SQL variables keep their query as a string, or (newer editors) as
                // an object with rawSql.
                let sql = v["query"]
                    .as_str()
                    .or_else(|| v["query"]["rawSql"].as_str())
                    .unwrap_or_default();
                assert!(!sql.trim().is_empty(), "variable {name} without SQL");
                out.push(Query {
                    origin: format!("variable {name}"),
                    sql: sql.to_string(),
                    format: "table".into(),
                    interval: None,
                });
            }
            other => panic!("variable {name}: type {other:?} is not checked by this test"),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The expansion, case by case (no database).
// ---------------------------------------------------------------------------------------

fn ctx() -> Ctx {
    Ctx {
        from: OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap(),
        to: OffsetDateTime::from_unix_timestamp_nanos(1_795_086_400_120_000_000).unwrap(),
        interval: Some(Duration::from_secs(3600)),
        vars: BTreeMap::from([("port".to_string(), "8080".to_string())]),
    }
}

#[track_caller]
fn check(sql: &str, expected: &str) {
    assert_eq!(expand(sql, &ctx()), Ok(expected.to_string()), "{sql}");
}

#[track_caller]
fn refused(sql: &str, naming: &str) {
    match expand(sql, &ctx()) {
        Ok(s) => panic!("{sql} expanded to {s}"),
        Err(e) => assert!(e.contains(naming), "{sql}: {e}"),
    }
}

#[test]
fn expands_like_grafana() {
    check(
        "WHERE $__timeFilter(at)",
        "WHERE at BETWEEN '2026-11-18T11:06:40Z' AND '2026-11-19T11:06:40.12Z'",
    );
    check(
        "SELECT $__timeFrom(), $__timeTo()",
        "SELECT '2026-11-18T11:06:40Z', '2026-11-19T11:06:40.12Z'",
    );
    check(
        "SELECT $__timeGroupAlias(at, $__interval), count(*)",
        "SELECT floor(extract(epoch from at)/3600)*3600 AS \"time\", count(*)",
    );
    check(
        "SELECT $__timeGroupAlias(at,'5m')",
        "SELECT floor(extract(epoch from at)/300)*300 AS \"time\"",
    );
    // Followed by a comma, $__timeGroup is read as $__timeGroupAlias (Grafana < 5.3).
    check(
        "SELECT $__timeGroup(at, '1d'), 1",
        "SELECT floor(extract(epoch from at)/86400)*86400 AS \"time\", 1",
    );
    check(
        "GROUP BY $__timeGroup(at, '1h') ORDER BY 1",
        "GROUP BY floor(extract(epoch from at)/3600)*3600 ORDER BY 1",
    );
    // Go's %v of a float64 switches to exponent form at 1e6.
    check(
        "$__timeGroup(at, '2w')",
        "floor(extract(epoch from at)/1.2096e+06)*1.2096e+06",
    );
    check("port = $port AND ${port} > 0", "port = 8080 AND 8080 > 0");
    check("NULLIF('$port', '')", "NULLIF('8080', '')");
    check("ARRAY['a', 'b'][1]", "ARRAY['a', 'b'][1]");
    check("interval '$__interval'", "interval '1h'");

    refused("WHERE $__unixEpochFilter(at)", "$__unixEpochFilter");
    refused("SELECT $__timeEpoch(at)", "$__timeEpoch");
    refused("SELECT $__timeGroup(at, '1h', 0)", "fill value");
    refused("SELECT $__timeGroup(at, '1M')", "interval unit");
    refused("SELECT $__interval_ms", "$__interval_ms");
    refused("WHERE host = '$host'", "$host");
    refused("WHERE port IN (${port:csv})", "${port:csv}");
    refused("WHERE port = [[port]]", "[[port]]");
    refused("SELECT $1", "$1");
    refused("SELECT $$x$$", "lone $");
    refused("SELECT $__timeFilter()", "missing time column");
    refused("WHERE $__timeFilter(${col})", "${col}");
    let mut no_interval = ctx();
    no_interval.interval = None;
    assert!(
        expand("$__timeGroupAlias(at, $__interval)", &no_interval)
            .unwrap_err()
            .contains("minimum interval")
    );
}

#[test]
fn every_panel_has_a_title_and_sql() {
    let qs = queries(&dashboard());
    // The checks are in `queries`; here: the dashboard's SQL all expands.
    for q in &qs {
        let c = Ctx {
            interval: q.interval,
            ..ctx()
        };
        expand(&q.sql, &c).unwrap_or_else(|e| panic!("{}: {e}", q.origin));
    }
    assert!(qs.iter().any(|q| q.format == "time_series"));
}

// ---------------------------------------------------------------------------------------
// Fixtures, through the real ingest path.
// ---------------------------------------------------------------------------------------

/// Seconds after which a silent host is stale here (heartbeats keep the others fresh).
const STALE_AFTER: u64 = 6;

/// A collector in this process with `stale_after` of [`STALE_AFTER`] seconds.
async fn collector(pki: &Pki, db: &DbUrl) -> (std::net::SocketAddr, CancellationToken) {
    let store = Store::open(
        db,
        &StoreOptions {
            stale_after_secs: STALE_AFTER,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server::serve(
        listener,
        pki.server_tls(),
        store,
        Limits::for_stale_after(Duration::from_secs(STALE_AFTER)),
        stop.clone().cancelled_owned(),
    ));
    (addr, stop)
}

fn with_verdicts(mut l: v1::Listener, v4: (&str, &[&str]), v6: (&str, &[&str])) -> v1::Listener {
    l.effective_ipv4 = verdict(v4.0, "inet filter input handle 3", v4.1);
    l.effective_ipv6 = verdict(v6.0, "inet filter input handle 4", v6.1);
    l
}

/// A dual-stack IPv6 socket (IPV6_V6ONLY=0) on `port`: the trap, `:::PORT` in netstat.
fn trap(proto: v1::Protocol, port: u32) -> v1::Listener {
    let mut l = listener("host", port);
    l.key.as_mut().unwrap().protocol = proto as i32;
    if proto == v1::Protocol::Udp {
        l.netstat_proto = "udp6".into();
    }
    l
}

/// sshd's IPv4 socket `0.0.0.0:PORT`.
fn ipv4_any(port: u32) -> v1::Listener {
    let mut l = listener("host", port);
    let k = l.key.as_mut().unwrap();
    k.family = v1::Family::Ipv4 as i32;
    k.address = vec![0; 4];
    k.v6only = None;
    l.reach_ipv6 = v1::Reach::None as i32;
    l.shown_as = format!("0.0.0.0:{port}");
    l.netstat_proto = "tcp".into();
    l.trap = false;
    l.hidden_ipv4_exposure = false;
    l.processes[0].comm = "sshd".into();
    l.processes[0].cmdline = "/usr/sbin/sshd -D".into();
    l
}

/// A v6-only socket `:::PORT` (IPV6_V6ONLY=1): IPv6 only, as netstat says.
fn ipv6_only(port: u32) -> v1::Listener {
    let mut l = listener("host", port);
    l.key.as_mut().unwrap().v6only = Some(true);
    l.reach_ipv4 = v1::Reach::None as i32;
    l.trap = false;
    l.hidden_ipv4_exposure = false;
    l
}

/// Sends `m` and expects an Ack.
async fn acked(s: &mut RawSession, m: v1::AgentMessage) {
    s.send(m).await;
    match s.recv().await {
        Ok(Some(v1::collector_message::Body::Ack(_))) => {}
        other => panic!("expected an Ack, got {other:?}"),
    }
}

/// The history the panels are checked against. `t` is the test's "now" in whole seconds.
struct Fixture {
    /// web-01 and web-02 first reported (5 h before `t`).
    first: OffsetDateTime,
    /// gone-01 reported and went silent (3 h before).
    gone: OffsetDateTime,
    /// web-01's change (2 h before): udp/53 opened, :::22 closed, 8080 restricted.
    change: OffsetDateTime,
}

/// web-01: trap tcp :::8080 (IPv4 open, then restricted), sshd's 0.0.0.0:22 and v6-only
/// :::22 (closed later), later a trap udp :::53 the firewall filters over IPv4.
/// web-02: trap tcp :::8080 (IPv4 verdict unknown) and a v6-only :::443.
/// gone-01: trap tcp :::9090, open; then silent. web-01 and web-02 stay connected and send
/// heartbeats until `stop` (their sessions are returned to keep them open).
async fn fill(
    pki: &Pki,
    addr: std::net::SocketAddr,
    f: &Fixture,
    stop: &CancellationToken,
) -> Vec<RawSession> {
    let l8080 =
        |v4: (&str, &[&str])| with_verdicts(trap(v1::Protocol::Tcp, 8080), v4, ("open", &[]));
    let mut web1 = session_as(pki, addr, "web-01", hello(1, 0, "web-01")).await;
    web1.recv().await.unwrap();
    acked(
        &mut web1,
        snapshot_at(
            1,
            f.first,
            vec![
                l8080(("open", &[])),
                with_verdicts(ipv4_any(22), ("open", &[]), ("n/a", &[])),
                with_verdicts(ipv6_only(22), ("n/a", &[]), ("open", &[])),
            ],
        ),
    )
    .await;
    let udp53 = with_verdicts(
        trap(v1::Protocol::Udp, 53),
        ("filtered", &[]),
        ("open", &[]),
    );
    acked(
        &mut web1,
        msg(v1::agent_message::Body::Delta(v1::Delta {
            sequence: 2,
            observed_at: Some(ts(f.change)),
            opened: vec![udp53],
            closed: vec![ipv6_only(22).key.unwrap()],
            changed: vec![l8080(("restricted", &["saddr 198.51.100.0/24"]))],
        })),
    )
    .await;

    let mut web2 = session_as(pki, addr, "web-02", hello(1, 0, "web-02")).await;
    web2.recv().await.unwrap();
    acked(
        &mut web2,
        snapshot_at(
            1,
            f.first,
            vec![
                with_verdicts(
                    trap(v1::Protocol::Tcp, 8080),
                    ("unknown", &[]),
                    ("open", &[]),
                ),
                with_verdicts(ipv6_only(443), ("n/a", &[]), ("open", &[])),
            ],
        ),
    )
    .await;

    let mut gone = session_as(pki, addr, "gone-01", hello(1, 0, "gone-01")).await;
    gone.recv().await.unwrap();
    acked(
        &mut gone,
        snapshot_at(
            1,
            f.gone,
            vec![with_verdicts(
                trap(v1::Protocol::Tcp, 9090),
                ("open", &[]),
                ("open", &[]),
            )],
        ),
    )
    .await;
    drop(gone);

    for s in [&web1, &web2] {
        let tx = s.tx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if tx.send(heartbeat(None)).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }
    vec![web1, web2]
}

// ---------------------------------------------------------------------------------------
// Running the queries as Grafana does.
// ---------------------------------------------------------------------------------------

/// A query's answer: column names and rows of text (NULL as None), as Grafana receives
/// them over the simple query protocol.
#[derive(Debug, Default)]
struct Answer {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Answer {
    fn col(&self, name: &str) -> usize {
        self.columns
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.columns))
    }

    /// The values of column `name`, NULL as "NULL".
    fn column(&self, name: &str) -> Vec<String> {
        let i = self.col(name);
        self.rows
            .iter()
            .map(|r| r[i].clone().unwrap_or_else(|| "NULL".into()))
            .collect()
    }

    /// The single value of a one-row, one-column answer, as a number.
    fn number(&self) -> i64 {
        assert_eq!(self.rows.len(), 1, "{self:?}");
        assert_eq!(self.columns.len(), 1, "{self:?}");
        self.rows[0][0].as_deref().unwrap().parse().unwrap()
    }

    /// Rows as `a|b|c` over the given columns.
    fn lines(&self, cols: &[&str]) -> Vec<String> {
        let idx: Vec<usize> = cols.iter().map(|c| self.col(c)).collect();
        self.rows
            .iter()
            .map(|r| {
                idx.iter()
                    .map(|&i| r[i].clone().unwrap_or_else(|| "NULL".into()))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()
    }
}

/// Runs `sql` exactly as given, over the simple query protocol (what Grafana's data source
/// does: `PgConn.Exec`), and returns every value as PostgreSQL's text.
async fn run(pool: &sqlx::PgPool, sql: &str) -> Result<Answer, String> {
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(pool)
        .await
        .map_err(|e| e.to_string())?;
    let mut a = Answer::default();
    if let Some(first) = rows.first() {
        a.columns = first
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
    }
    for row in &rows {
        let mut values = Vec::with_capacity(a.columns.len());
        for i in 0..a.columns.len() {
            let raw = row.try_get_raw(i).unwrap();
            values.push(if raw.is_null() {
                None
            } else {
                Some(raw.as_str().unwrap().to_string())
            });
        }
        a.rows.push(values);
    }
    Ok(a)
}

/// The read-only role's statements, exactly as docs/postgres.md gives them.
fn read_only_role_sql() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/postgres.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let start = doc
        .find("```sql\nCREATE ROLE sre_ro")
        .expect("docs/postgres.md creates the role sre_ro in a sql block");
    let block = &doc[start + "```sql\n".len()..];
    let block = &block[..block.find("```").unwrap()];
    block
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every panel's and variable's query, expanded for `range` with the variables `vars`, run
/// as the read-only role: answers by origin. A query that fails fails the test.
async fn answers(
    pool: &sqlx::PgPool,
    qs: &[Query],
    range: (OffsetDateTime, OffsetDateTime),
    vars: &BTreeMap<String, String>,
) -> BTreeMap<String, Answer> {
    let mut out = BTreeMap::new();
    for q in qs {
        let c = Ctx {
            from: range.0,
            to: range.1,
            interval: q.interval,
            vars: vars.clone(),
        };
        let sql = expand(&q.sql, &c).unwrap_or_else(|e| panic!("{}: {e}", q.origin));
        let a = run(pool, &sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{sql}", q.origin));
        if q.format == "time_series" && !a.rows.is_empty() {
            // Grafana refuses a time series without a time column.
            a.col("time");
        }
        assert!(
            out.insert(q.origin.clone(), a).is_none(),
            "two queries in {}",
            q.origin
        );
    }
    out
}

/// Epoch seconds of the `interval`-bucket holding `t` (what `$__timeGroup` computes).
fn bucket(t: OffsetDateTime, interval: u64) -> String {
    let s = t.unix_timestamp() as u64;
    (s / interval * interval).to_string()
}

/// A text value PostgreSQL printed as a number (`3600`, `1795000000.000000`…) in seconds.
fn seconds(s: &str) -> String {
    let n: f64 = s.parse().unwrap();
    assert_eq!(n.fract(), 0.0, "{s}");
    (n as i64).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_answers_from_postgres_as_the_read_only_role() {
    require_root();
    let qs = queries(&dashboard());
    let pki = Pki::new(&["web-01", "web-02", "gone-01"]);
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    // Named as in docs/postgres.md, whose GRANTs name the database.
    let owner = server.database("listenscope").await;
    let db: DbUrl = owner.parse().unwrap();
    let (addr, stop_collector) = collector(&pki, &db).await;

    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let f = Fixture {
        first: now - time::Duration::hours(5),
        gone: now - time::Duration::hours(3),
        change: now - time::Duration::hours(2),
    };
    let stop_heartbeats = CancellationToken::new();
    let _sessions = fill(&pki, addr, &f, &stop_heartbeats).await;

    // The read-only role, as the docs create it, for Grafana's data source.
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&owner)
        .await
        .unwrap();
    for sql in read_only_role_sql() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let ro = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "postgres://sre_ro@127.0.0.1:{}/listenscope",
            server.port
        ))
        .await
        .unwrap();
    let who = run(&ro, "SELECT current_user, rolsuper::text, current_setting('default_transaction_read_only') FROM pg_roles WHERE rolname = current_user")
        .await
        .unwrap();
    assert_eq!(
        who.rows[0],
        [
            Some("sre_ro".into()),
            Some("false".into()),
            Some("on".into())
        ]
    );

    // gone-01 goes stale; the others' heartbeats keep them fresh.
    eventually(60, "gone-01 stale, web-01 and web-02 not", || async {
        run(
            &admin,
            "SELECT string_agg(host || ':' || stale, ',' ORDER BY host) FROM hosts",
        )
        .await
        .unwrap()
        .rows[0][0]
            .as_deref()
            == Some("gone-01:true,web-01:false,web-02:false")
    })
    .await;

    // The whole day, as the dashboard opens (now-24h to now), the trap port chosen.
    let to = OffsetDateTime::now_utc();
    let day = (to - time::Duration::hours(24), to);
    let port = |p: &str| BTreeMap::from([("port".to_string(), p.to_string())]);
    let a = answers(&ro, &qs, day, &port("8080")).await;
    let mut checked: BTreeSet<&str> = BTreeSet::new();
    let mut get = |title: &'static str| {
        checked.insert(title);
        a.get(title)
            .unwrap_or_else(|| panic!("no panel titled {title:?}"))
    };

    assert_eq!(get("Hosts").number(), 3);
    assert_eq!(get("Stale hosts").number(), 1);
    // web-01: 8080, 22 (IPv4), udp 53; web-02: 8080, 443; gone-01: 9090.
    assert_eq!(get("Live listeners").number(), 6);
    let live = run(&ro, "SELECT count(*) FROM current_listeners")
        .await
        .unwrap();
    assert_eq!(
        live.number(),
        6,
        "hosts.listeners agrees with current_listeners"
    );
    // web-01 tcp/8080 and udp/53, web-02 tcp/8080, gone-01 tcp/9090.
    assert_eq!(get("Hidden IPv4 exposures").number(), 4);
    // web-01 8080 (restricted) and gone-01 9090 (open); udp/53 is filtered, web-02 unknown.
    assert_eq!(
        get("Hidden IPv4 exposures the firewall lets in").number(),
        2
    );
    // Opened: 5 at the first snapshots, 1 on gone-01, udp/53; changed 8080; closed :::22.
    assert_eq!(get("Changes in range").number(), 9);

    assert_eq!(
        get("Effective exposures by firewall verdict").lines(&["verdict", "ipv4", "ipv6"]),
        ["open|2|5", "restricted|1|0", "unknown|1|0", "filtered|1|0"],
        "most permissive first: IPv4 open on 0.0.0.0:22 and 9090, restricted 8080 on \
         web-01, unknown on web-02, filtered udp/53; IPv6 open on the five IPv6 sockets"
    );
    assert_eq!(
        get("Trap listeners per port").lines(&["port", "hosts", "listeners"]),
        ["tcp/8080|2|2", "tcp/9090|1|1", "udp/53|1|1"],
        "the v6only=0 trap port 8080 on both web hosts comes first"
    );
    assert_eq!(
        get("Hidden IPv4 exposure on port $port").lines(&[
            "host",
            "netns",
            "protocol",
            "shown_as",
            "processes",
            "firewall_ipv4",
            "ways_in"
        ]),
        [
            "web-01|host|tcp|:::8080|apache2|restricted|saddr 198.51.100.0/24",
            "web-02|host|tcp|:::8080|apache2|unknown|NULL",
        ],
        "the trap port: both hosts, the firewall's answer first"
    );
    let timeline = get("Changes: opened, changed, closed");
    let hour = 3600;
    let rows: Vec<String> = timeline
        .lines(&["time", "opened", "changed", "closed"])
        .iter()
        .map(|l| {
            let (t, rest) = l.split_once('|').unwrap();
            format!("{}|{rest}", seconds(t))
        })
        .collect();
    assert_eq!(
        rows,
        [
            format!("{}|5|0|0", bucket(f.first, hour)),
            format!("{}|1|0|0", bucket(f.gone, hour)),
            format!("{}|1|1|1", bucket(f.change, hour)),
        ],
        "hourly buckets: the first snapshots, gone-01's, web-01's change"
    );
    let fresh = get("New IPv4 exposures in range");
    assert_eq!(
        fresh.lines(&["host", "port", "change", "trap", "firewall_ipv4"]),
        [
            "web-01|53|opened|t|filtered",
            "web-01|8080|changed|t|restricted",
            "gone-01|9090|opened|t|open",
            "web-01|22|opened|f|open",
            "web-01|8080|opened|t|open",
            "web-02|8080|opened|t|unknown",
        ],
        "newest first; the v6-only :::22 and :::443 accept no IPv4 and are not there"
    );
    let stale = get("Hosts gone silent");
    assert_eq!(stale.column("host"), ["gone-01"]);
    assert_eq!(stale.column("listeners"), ["1"]);
    let silent: i64 = stale.column("silent_seconds")[0].parse().unwrap();
    assert!(silent >= STALE_AFTER as i64, "silent for {silent}s");
    assert_eq!(get("variable port").column("port"), ["53", "8080", "9090"]);

    let panels: BTreeSet<&str> = qs.iter().map(|q| q.origin.as_str()).collect();
    assert_eq!(
        checked, panels,
        "every panel and variable has its answer checked here: a new one needs its own \
         assertions"
    );

    // The last 150 minutes only: $__timeFilter keeps web-01's change and drops the rest.
    let recent = (to - time::Duration::minutes(150), to);
    let r = answers(&ro, &qs, recent, &port("8080")).await;
    assert_eq!(r["Changes in range"].number(), 3);
    assert_eq!(
        r["Changes: opened, changed, closed"].rows.len(),
        1,
        "{:?}",
        r["Changes: opened, changed, closed"]
    );
    assert_eq!(
        r["New IPv4 exposures in range"].column("port"),
        ["53", "8080"]
    );

    // Another port, and no port at all (a fleet without hidden exposures: the variable is
    // empty): the panel answers, without an SQL error.
    let other = answers(&ro, &qs, day, &port("9090")).await;
    assert_eq!(
        other["Hidden IPv4 exposure on port $port"].lines(&["host", "firewall_ipv4"]),
        ["gone-01|open"]
    );
    let none = answers(&ro, &qs, day, &port("")).await;
    assert!(none["Hidden IPv4 exposure on port $port"].rows.is_empty());

    // The reports, which the web UI reads through, as the same role: docs/ui.md says a
    // role that may only SELECT the views is enough for `ui --db`.
    let url = format!("postgres://sre_ro@127.0.0.1:{}/listenscope", server.port);
    let reader = query::ReadOnly::open(&url.parse().unwrap())
        .await
        .unwrap_or_else(|e| panic!("open as sre_ro: {e}"));
    let fail = |what: &str, e: query::QueryError| -> ! { panic!("{what} as sre_ro: {e}") };
    let o = query::overview(&reader)
        .await
        .unwrap_or_else(|e| fail("overview", e));
    assert_eq!(o.hosts, 3);
    query::hidden_by_verdict(&reader)
        .await
        .unwrap_or_else(|e| fail("hidden_by_verdict", e));
    query::ports(&reader)
        .await
        .unwrap_or_else(|e| fail("ports", e));
    query::exposure(&reader, Some(80), None, Some(10))
        .await
        .unwrap_or_else(|e| fail("exposure", e));
    query::hosts(&reader, Some(10))
        .await
        .unwrap_or_else(|e| fail("hosts", e));
    query::listeners(
        &reader,
        "web-01",
        query::Order {
            by: query::ListenerSort::Port,
            descending: false,
        },
        10,
        0,
    )
    .await
    .unwrap_or_else(|e| fail("listeners", e));
    listenscope_collector::history::diff(&reader, None, f.first, to, Some(10))
        .await
        .unwrap_or_else(|e| fail("diff", e));
    reader.close().await;

    stop_heartbeats.cancel();
    stop_collector.cancel();
    ro.close().await;
    admin.close().await;
}
