//! The web UI over real data on both databases: hosts report through the real ingest
//! path (mutual TLS, gRPC, the store), the UI serves on 127.0.0.1:0 with a shutdown
//! future, pages are fetched over real HTTP/1.1 (and TLS with and without a fleet
//! certificate) and their HTML is parsed and asserted: the headline host of a
//! `v6only=0` socket, hostile agent text shown as text, the security headers, 405 for
//! anything but GET/HEAD, paging and sorting, 400 pages naming the parameter, the
//! start-up refusals off loopback, and accessibility basics (one h1, ordered headings,
//! labelled inputs, captioned tables, the trap mark's contrast from the stylesheet).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use listenscope_collector::ingest::Limits;
use listenscope_collector::query::ReadOnly;
use listenscope_collector::store::{DbUrl, Store, StoreOptions};
use listenscope_collector::{server, ui};
use listenscope_proto::v1;
use scraper::{Html, Selector};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use util::*;

/// What hostile agents named their processes, units and namespaces.
const SCRIPT: &str = "<script>alert(1)</script>";
const IMG: &str = "\"><img src=x onerror=alert(1)>";
const JS_UNIT: &str = "javascript:alert(1)";
const SVG_NETNS: &str = "'><svg onload=alert(1)>";

/// A host's trap listener on `port` (dual-stack `:::port`, the firewall's IPv4 verdict).
fn trap(port: u32, v4: &str) -> v1::Listener {
    let mut l = listener("host", port);
    l.effective_ipv4 = verdict(v4, "inet filter input handle 3", &[]);
    l.effective_ipv6 = verdict("open", "policy accept of inet filter input", &[]);
    l
}

/// h1's listeners: the headline on 80 with hostile owners, a restricted 443, the sshd
/// pair on 22 (not the headline), and a trap in a namespace with a hostile name.
fn h1_listeners() -> Vec<v1::Listener> {
    let mut web = trap(80, "open");
    web.processes = vec![v1::Process {
        pid: 4242,
        comm: SCRIPT.into(),
        cmdline: IMG.into(),
        user: "www-data".into(),
    }];
    web.unit = JS_UNIT.into();
    let mut https = trap(443, "restricted");
    https.effective_ipv4 = verdict(
        "restricted",
        "inet filter input handle 5",
        &["saddr 198.51.100.0/24", "iifname eth0"],
    );
    let mut ssh6 = listener("host", 22);
    ssh6.key.as_mut().unwrap().v6only = Some(true);
    ssh6.reach_ipv4 = v1::Reach::None as i32;
    ssh6.trap = false;
    ssh6.hidden_ipv4_exposure = false;
    ssh6.processes[0].comm = "sshd".into();
    let mut ssh4 = listener("host", 22);
    {
        let k = ssh4.key.as_mut().unwrap();
        k.family = v1::Family::Ipv4 as i32;
        k.address = vec![0; 4];
        k.v6only = None;
    }
    ssh4.reach_ipv6 = v1::Reach::None as i32;
    ssh4.shown_as = "0.0.0.0:22".into();
    ssh4.netstat_proto = "tcp".into();
    ssh4.trap = false;
    ssh4.hidden_ipv4_exposure = false;
    ssh4.processes[0].comm = "sshd".into();
    let mut odd = trap(8443, "open");
    odd.key.as_mut().unwrap().netns = SVG_NETNS.into();
    vec![web, https, ssh6, ssh4, odd]
}

/// Sends `first` then `more` as one host's session, each acknowledged.
async fn report(pki: &Pki, addr: SocketAddr, host: &str, msgs: Vec<v1::AgentMessage>) {
    let mut s = session_as(pki, addr, host, hello(1, 0, host)).await;
    s.recv().await.unwrap();
    for m in msgs {
        s.send(m).await;
        match s.recv().await.unwrap() {
            Some(v1::collector_message::Body::Ack(_)) => {}
            other => panic!("{host}: expected an Ack, got {other:?}"),
        }
    }
}

/// The fleet, through the real collector: h2…h7 report first and go silent (stale
/// after 4 s), then h1 (fresh) with the headline, hostile text and a closed listener.
async fn fill(pki: &Pki, db: &DbUrl) {
    let store = Store::open(
        db,
        &StoreOptions {
            stale_after_secs: 4,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::serve(
        listener,
        listenscope_collector::tls::ServerTls::from(pki.server_tls()),
        store,
        Limits::default(),
        stop.clone().cancelled_owned(),
    ));
    report(
        pki,
        addr,
        "h2",
        vec![snapshot(1, vec![trap(80, "filtered")])],
    )
    .await;
    for h in ["h3", "h4", "h5", "h6", "h7"] {
        report(pki, addr, h, vec![snapshot(1, vec![trap(8080, "open")])]).await;
    }
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let listeners = h1_listeners();
    let odd_key = listeners[4].key.clone().unwrap();
    report(
        pki,
        addr,
        "h1",
        // The snapshot observed 2 s before the close, so the close is the newest event
        // (times are kept to the millisecond).
        vec![
            snapshot_at(
                1,
                time::OffsetDateTime::now_utc() - time::Duration::seconds(2),
                listeners,
            ),
            delta(2, vec![], vec![odd_key]),
        ],
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A UI served in this process on 127.0.0.1:0 (or `bind`), stopped on drop of `stop`.
struct Served {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start(db: &DbUrl, bind: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Served {
        let ro = ReadOnly::open(db).await.unwrap();
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let mut addr = listener.local_addr().unwrap();
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        let stop = CancellationToken::new();
        let state = Arc::new(ui::UiState::new(ro, db.to_string()));
        let task = tokio::spawn(ui::serve(
            listener,
            state,
            tls,
            stop.clone().cancelled_owned(),
        ));
        Served { addr, stop, task }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// An HTTP response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn doc(&self) -> Html {
        Html::parse_document(&self.body)
    }
}

/// One HTTP/1.1 request (`Connection: close`) over `io`, the whole response read.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    method: &str,
    path: &str,
) -> std::io::Result<Resp> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: ui.test\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    io.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    io.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no response head in {text:?}"),
        ));
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Ok(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Resp {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), exchange(s, method, path))
        .await
        .expect("answered within 30 s")
        .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path).await
}

/// A GET that must answer 200, with its document checked for accessibility basics.
async fn page(addr: SocketAddr, path: &str) -> (Resp, Html) {
    let r = get(addr, path).await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    let doc = r.doc();
    accessible(&doc, path);
    (r, doc)
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap()
}

fn texts(doc: &Html, s: &str) -> Vec<String> {
    doc.select(&sel(s))
        .map(|e| e.text().collect::<String>())
        .collect()
}

/// The table rows (`tbody tr`) of the first table whose caption contains `caption`, as
/// their cells' text.
fn rows(doc: &Html, caption: &str) -> Vec<Vec<String>> {
    let table = doc
        .select(&sel("table"))
        .find(|t| {
            t.select(&sel("caption"))
                .next()
                .is_some_and(|c| c.text().collect::<String>().contains(caption))
        })
        .unwrap_or_else(|| panic!("no table captioned {caption:?}: {}", doc.html()));
    table
        .select(&sel("tbody tr"))
        .map(|tr| {
            tr.select(&sel("td"))
                .map(|td| td.text().collect::<String>().trim().to_string())
                .collect()
        })
        .collect()
}

/// Accessibility basics: a language, exactly one h1 and no skipped heading level, every
/// form control labelled, every table captioned with header cells, the chart named.
fn accessible(doc: &Html, path: &str) {
    assert!(
        doc.select(&sel("html[lang]")).next().is_some(),
        "{path}: no lang"
    );
    let levels: Vec<u8> = doc
        .select(&sel("h1, h2, h3, h4, h5, h6"))
        .map(|h| h.value().name()[1..].parse().unwrap())
        .collect();
    assert_eq!(
        levels.iter().filter(|l| **l == 1).count(),
        1,
        "{path}: h1 count in {levels:?}"
    );
    assert_eq!(levels.first(), Some(&1), "{path}: {levels:?}");
    for w in levels.windows(2) {
        assert!(
            w[1] <= w[0] + 1,
            "{path}: heading level skipped: {levels:?}"
        );
    }
    for control in doc.select(&sel("input, select, textarea")) {
        if matches!(control.value().attr("type"), Some("hidden" | "submit")) {
            continue;
        }
        let id = control
            .value()
            .attr("id")
            .unwrap_or_else(|| panic!("{path}: a control without id"));
        assert!(
            doc.select(&sel(&format!("label[for=\"{id}\"]")))
                .next()
                .is_some(),
            "{path}: no label for {id}"
        );
    }
    for table in doc.select(&sel("table")) {
        assert!(
            table.select(&sel("caption")).next().is_some(),
            "{path}: a table without caption"
        );
        assert!(
            table.select(&sel("thead th[scope=col]")).next().is_some(),
            "{path}: a table without column headers"
        );
    }
    for svg in doc.select(&sel("svg")) {
        assert_eq!(svg.value().attr("role"), Some("img"), "{path}");
        for id in svg.value().attr("aria-labelledby").unwrap().split(' ') {
            assert!(
                doc.select(&sel(&format!("#{id}"))).next().is_some(),
                "{path}: the chart's label {id} is missing"
            );
        }
    }
}

/// No markup an agent sent became markup: no script, no img, no event handler, no
/// `javascript:` link anywhere in the document.
fn inert(doc: &Html, path: &str) {
    assert_eq!(
        doc.select(&sel("script, img, iframe, object")).count(),
        0,
        "{path}"
    );
    for e in doc.select(&sel("*")) {
        for (name, value) in e.value().attrs() {
            assert!(!name.starts_with("on"), "{path}: attribute {name}");
            if name == "href" {
                assert!(
                    value.starts_with('/') || value.starts_with('?'),
                    "{path}: href {value}"
                );
            }
        }
    }
    // The chart is the only SVG, and it has no handler (checked above).
    for svg in doc.select(&sel("svg")) {
        assert_eq!(svg.value().attr("class"), Some("chart"), "{path}");
    }
}

/// Every page over the filled database.
async fn check_pages(db: &DbUrl) {
    let served = Served::start(db, "127.0.0.1:0", None).await;
    let a = served.addr;

    // Stale first: h1 reported last, 4 s after the others (stale_after 4 s).
    let (_, doc) = page(a, "/stale").await;
    let stale: Vec<String> = rows(&doc, "Stale hosts")
        .iter()
        .map(|r| r[0].clone())
        .collect();
    assert!(
        stale.contains(&"h2".to_string()) && !stale.contains(&"h1".to_string()),
        "{stale:?}"
    );

    // The overview: counts from the maintained columns.
    let (r, doc) = page(a, "/").await;
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let stats = texts(&doc, "dl.stats dd");
    assert_eq!(stats[0], "7", "hosts: {stats:?}");
    assert_eq!(stats[2], "10", "live listeners: {stats:?}");
    // Hidden ports: h1 80, 443; h2 80; h3…h7 8080 (8443 closed).
    assert_eq!(stats[3], "8", "hidden: {stats:?}");
    assert_eq!(stats[4], "7", "open or restricted: {stats:?}");
    // The whole-table counts (hidden by verdict, ports open to the world): a small
    // fleet's first count ends within the overview's wait.
    assert_eq!(stats.len(), 7, "{stats:?}");
    assert!(
        texts(&doc, "p.note")
            .iter()
            .any(|t| t.contains("counted over whole tables")),
        "{:?}",
        texts(&doc, "p.note")
    );

    // The headline: port 80 over IPv4 on h1 (open, first) and h2 (filtered).
    let (_, doc) = page(a, "/exposure?port=80").await;
    let hl = rows(&doc, "Hosts where IPv4 reaches port 80");
    assert_eq!(hl.len(), 2, "{hl:?}");
    assert_eq!(hl[0][1], "h1");
    assert_eq!(hl[0][5], ":::80");
    assert_eq!(hl[0][6], SCRIPT, "processes shown as text");
    assert_eq!(hl[0][7], JS_UNIT, "unit shown as text");
    assert_eq!(hl[0][8], "open");
    assert_eq!(hl[1][1], "h2");
    assert!(hl[1][9].contains("not exposed"), "{hl:?}");
    assert_eq!(doc.select(&sel("tbody .trap")).count(), 2);
    let h1_link = doc.select(&sel("tbody a[href='/hosts/h1']")).count();
    assert_eq!(h1_link, 1);
    inert(&doc, "/exposure");
    // Restricted shows its conditions.
    let (_, doc) = page(a, "/exposure?port=443&proto=tcp").await;
    let hl = rows(&doc, "Hosts where IPv4 reaches tcp port 443");
    let v = &hl[0][8];
    assert!(
        v.starts_with("restricted (")
            && v.contains("saddr 198.51.100.0/24")
            && v.contains(" | iifname eth0"),
        "{v}"
    );

    // Paging and sorting, server-side.
    let names = |doc: &Html| -> Vec<String> {
        rows(doc, "Hosts where IPv4 reaches port 8080")
            .iter()
            .map(|r| r[1].clone())
            .collect()
    };
    let (_, doc) = page(a, "/exposure?port=8080&sort=host&dir=asc&per=2").await;
    assert_eq!(names(&doc), ["h3", "h4"]);
    assert!(texts(&doc, "p.count")[0].contains('5'));
    let next = doc
        .select(&sel("a[rel=next]"))
        .next()
        .unwrap()
        .value()
        .attr("href")
        .unwrap()
        .to_string();
    assert_eq!(next, "/exposure?port=8080&sort=host&page=2&per=2");
    let (_, doc) = page(a, &next).await;
    assert_eq!(names(&doc), ["h5", "h6"]);
    let (_, doc) = page(a, "/exposure?port=8080&sort=host&dir=desc&per=2&page=3").await;
    assert_eq!(names(&doc), ["h3"]);
    assert!(doc.select(&sel("a[rel=next]")).next().is_none());
    let (_, doc) = page(a, "/hosts?sort=host&dir=desc&per=3").await;
    let hosts: Vec<String> = rows(&doc, "Hosts, sorted by host")
        .iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(hosts, ["h7", "h6", "h5"]);
    let (_, doc) = page(a, "/hosts?sort=listeners").await;
    let first = &rows(&doc, "Hosts, sorted by listeners")[0];
    assert_eq!((first[0].as_str(), first[5].as_str()), ("h1", "4"));
    let sorted = doc.select(&sel("th[aria-sort]")).count();
    assert_eq!(sorted, 1);

    // One host, as the scan table shows it; hostile text is text.
    let (r, doc) = page(a, "/hosts/h1").await;
    let scan = rows(&doc, "Listeners of h1");
    assert_eq!(scan.len(), 4, "{scan:?}");
    let web = scan.iter().find(|r| r[2] == ":::80").unwrap();
    assert_eq!(web[0], "!trap: accepts IPv4 too");
    assert_eq!(web[3], "all IPv4 + all IPv6");
    assert_eq!(web[4], "no");
    assert_eq!(web[5], "open");
    assert_eq!(web[7], format!("{SCRIPT}[4242]"));
    let ssh4 = scan.iter().find(|r| r[2] == "0.0.0.0:22").unwrap();
    assert_eq!(
        (ssh4[0].as_str(), ssh4[3].as_str(), ssh4[4].as_str()),
        ("", "all IPv4", "-")
    );
    let ssh6 = scan.iter().find(|r| r[2] == ":::22").unwrap();
    assert_eq!((ssh6[3].as_str(), ssh6[4].as_str()), ("all IPv6", "yes"));
    let https = scan.iter().find(|r| r[2] == ":::443").unwrap();
    assert!(
        https[5].starts_with("v4 restricted (") && https[5].ends_with(", …), v6 open"),
        "{https:?}"
    );
    let history = rows(&doc, "listener changes of h1");
    assert!(
        history
            .iter()
            .any(|r| r[1] == "closed" && r[2] == SVG_NETNS),
        "{history:?}"
    );
    assert!(
        history.iter().filter(|r| r[1] == "opened").count() >= 4,
        "{history:?}"
    );
    inert(&doc, "/hosts/h1");
    // On the wire, the hostile names are escaped text.
    assert!(
        !r.body.contains(SCRIPT) && !r.body.contains("<img") && !r.body.contains("<svg onload")
    );
    assert!(
        r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        r.body
    );
    let r = get(a, "/hosts/nobody.example").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("never heard of"), "{}", r.body);

    // Changes: the chart, its table, new IPv4 exposures, the events.
    let (_, doc) = page(a, "/changes").await;
    let svg = doc.select(&sel("svg.chart")).next().unwrap();
    assert!(svg.select(&sel("rect.bar-opened")).count() >= 1);
    assert!(svg.select(&sel("rect.bar-closed")).count() >= 1);
    let title = texts(&doc, "svg.chart > title")[0].clone();
    assert!(title.contains("per hour"), "{title}");
    let per_hour = rows(&doc, "Listener changes per hour");
    let opened: u64 = per_hour.iter().map(|r| r[1].parse::<u64>().unwrap()).sum();
    assert_eq!(opened, 11, "{per_hour:?}");
    let new = rows(&doc, "Ports that became reachable over IPv4");
    assert!(new.iter().any(|r| r[2] == "h1" && r[5] == "80"), "{new:?}");
    assert!(
        new.iter().any(|r| r[2] == "h7" && r[5] == "8080"),
        "{new:?}"
    );
    let events = rows(&doc, "Listener changes, newest first");
    assert_eq!(events.len(), 12, "{events:?}");
    assert_eq!(events[0][2], "closed");
    inert(&doc, "/changes");
    let (_, doc) = page(a, "/changes?host=h1&port=80").await;
    assert_eq!(rows(&doc, "Listener changes, newest first").len(), 1);

    // Ports open to the world, per IP version.
    let (_, doc) = page(a, "/ports").await;
    let ports = rows(&doc, "Ports by hosts open to the world");
    let p80 = ports.iter().find(|r| r[0] == "80").unwrap();
    // h1 and h2 accept IPv4 on 80; the firewall leaves h1's open; both hidden.
    assert_eq!(p80[1..], ["tcp", "2", "1", "2", "2", "2"], "{ports:?}");
    assert_eq!(ports[0][0], "8080", "most hosts first: {ports:?}");
    // The overview now shows the effective exposures: the sums of the ports' columns.
    let sum = |i: usize| -> u64 { ports.iter().map(|r| r[i].parse::<u64>().unwrap()).sum() };
    let (_, doc) = page(a, "/").await;
    let stats = texts(&doc, "dl.stats dd");
    assert_eq!(stats.len(), 7, "{stats:?}");
    assert_eq!(
        stats[5],
        format!("{} of {}", sum(3), sum(2)),
        "IPv4: {stats:?}"
    );
    assert_eq!(
        stats[6],
        format!("{} of {}", sum(5), sum(4)),
        "IPv6: {stats:?}"
    );
    assert!(sum(3) > 0 && sum(5) > 0, "{ports:?}");

    // The SQL behind each page, with the command that runs it.
    for path in [
        "/",
        "/exposure?port=80",
        "/ports",
        "/hosts",
        "/stale",
        "/hosts/h1",
        "/changes?host=h1",
    ] {
        let (_, doc) = page(a, path).await;
        let link = doc
            .select(&sel("footer a"))
            .find(|l| l.text().collect::<String>() == "Same as SQL")
            .unwrap_or_else(|| panic!("{path}: no SQL link"))
            .value()
            .attr("href")
            .unwrap()
            .to_string();
        let (_, sql) = page(a, &link).await;
        let code = texts(&sql, "pre code").join("\n");
        assert!(
            code.contains("listenscope-collector query --db"),
            "{path}: {code}"
        );
        assert!(
            [
                "hidden_ipv4_exposure",
                "hosts",
                "current_listeners",
                "listener_changes"
            ]
            .iter()
            .any(|v| code.contains(&format!("FROM {v}"))),
            "{path}: {code}"
        );
    }
    let (_, sql) = page(a, "/exposure?port=80&sql=1").await;
    let code = texts(&sql, "pre code").join("\n");
    assert!(code.contains("WHERE port = 80"), "{code}");
    assert!(code.contains("exposure --db"), "{code}");

    // Security headers on every answer, errors included.
    for path in ["/", "/exposure?port=0", "/nope", "/static/ui.css"] {
        let r = get(a, path).await;
        assert_eq!(r.header("content-security-policy"), Some(ui::CSP), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
    }
    assert_eq!(
        ui::CSP,
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'"
    );

    // Only GET and HEAD.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/exposure", "/hosts/h1", "/nope"] {
            let r = request(a, method, path).await;
            assert_eq!(r.status, 405, "{method} {path}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
    }
    let head = request(a, "HEAD", "/exposure?port=80").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");

    // Bad parameters: 400, naming the parameter and what it takes.
    for (path, name, allowed) in [
        ("/exposure?port=0", "port", "1 to 65535"),
        ("/exposure?port=http", "port", "1 to 65535"),
        ("/exposure?proto=sctp", "proto", "tcp or udp"),
        (
            "/exposure?sort=evil",
            "sort",
            "one of verdict, host, port, processes",
        ),
        ("/hosts?dir=sideways", "dir", "asc or desc"),
        ("/hosts?per=100000", "per", "from 1 to 500"),
        ("/hosts?page=0", "page", "from 1 to"),
        ("/changes?since=yesterday", "since", "RFC 3339"),
        ("/changes?since=90d", "since", "31 days"),
        ("/changes?host=a%20b", "host", "host name"),
        (
            "/ports?colour=red",
            "colour",
            "this page takes proto, sort, dir, page, per, sql",
        ),
        ("/?sql=yes", "sql", "1 (show the SQL)"),
    ] {
        let r = get(a, path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        let doc = r.doc();
        accessible(&doc, path);
        let text = texts(&doc, "main").join(" ");
        assert!(
            text.contains(&format!("The parameter {name} cannot be")),
            "{path}: {text}"
        );
        assert!(text.contains(allowed), "{path}: {text}");
    }
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_on_sqlite() {
    let pki = Pki::new(&["h1", "h2", "h3", "h4", "h5", "h6", "h7"]);
    let dir = TempDir::new("ui-sqlite");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    fill(&pki, &db).await;
    check_pages(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_on_postgres() {
    require_root();
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let db: DbUrl = server.database("ui").await.parse().unwrap();
    let pki = Pki::new(&["h1", "h2", "h3", "h4", "h5", "h6", "h7"]);
    fill(&pki, &db).await;
    check_pages(&db).await;
}

/// A first count that outlasts a request (a big fleet's) is said, not waited for: the
/// ports page waits up to 10 s and then says that it runs, the overview no longer waits
/// once it has run 2 s, and the count's answer shows once it ends. The count is held here by a lock on the listener table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_first_count_is_said_not_waited_for() {
    use sqlx::Connection as _;
    require_root();
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let url = server.database("ui_count").await;
    let db: DbUrl = url.parse().unwrap();
    let pki = Pki::new(&["h1", "h2", "h3", "h4", "h5", "h6", "h7"]);
    fill(&pki, &db).await;
    let mut lock = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query("LOCK TABLE listener IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .unwrap();
    let served = Served::start(&db, "127.0.0.1:0", None).await;
    let a = served.addr;

    let (r, doc) = page(a, "/ports").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let note = texts(&doc, "p.note").join(" ");
    assert!(
        note.contains("is being counted over every live listener"),
        "{note}"
    );
    assert!(texts(&doc, "table").is_empty(), "{}", r.body);
    let (r, doc) = page(a, "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let note = texts(&doc, "p.note").join(" ");
    assert!(note.contains("are being counted"), "{note}");

    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    let mut counted = Vec::new();
    for _ in 0..100 {
        let (_, doc) = page(a, "/ports").await;
        if !texts(&doc, "table").is_empty() {
            counted = rows(&doc, "Ports by hosts open to the world");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !counted.is_empty(),
        "the ports table never showed after the lock"
    );
    assert_eq!(counted[0][..3], ["8080", "tcp", "5"], "{counted:?}");
    let note = texts(&page(a, "/ports").await.1, "p.note").join(" ");
    assert!(
        note.contains("Counted over every live listener at "),
        "{note}"
    );
    served.shutdown().await;
}

/// WCAG's relative luminance of `#rrggbb`.
fn luminance(hex: &str) -> f64 {
    let hex = hex.trim_start_matches('#');
    let channel = |i: usize| {
        let c = f64::from(u8::from_str_radix(&hex[i..i + 2], 16).unwrap()) / 255.0;
        if c <= 0.03928 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * channel(0) + 0.7152 * channel(2) + 0.0722 * channel(4)
}

fn contrast(a: &str, b: &str) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

/// `property` of the rule for `selector` in `css` (a hex colour).
fn css_colour(css: &str, selector: &str, property: &str) -> String {
    let start = css
        .find(&format!("\n{selector} {{"))
        .unwrap_or_else(|| panic!("no rule {selector}"));
    let block = &css[start..start + css[start..].find('}').unwrap()];
    block
        .lines()
        .find_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            (k.trim() == property).then(|| v.trim().trim_end_matches(';').to_string())
        })
        .unwrap_or_else(|| panic!("{selector} has no {property}"))
}

/// The trap mark's colours, from the stylesheet the UI serves, contrast at least 4.5:1
/// (WCAG AA for text); the verdict words too, against the page's background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_mark_contrast_from_the_served_stylesheet() {
    let dir = TempDir::new("ui-css");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    Store::open(&db, &StoreOptions::default()).await.unwrap();
    let served = Served::start(&db, "127.0.0.1:0", None).await;
    let r = get(served.addr, "/static/ui.css").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/css; charset=utf-8"));
    let css = r.body;
    let (fg, bg) = (
        css_colour(&css, ".trap", "color"),
        css_colour(&css, ".trap", "background"),
    );
    let ratio = contrast(&fg, &bg);
    assert!(ratio >= 4.5, "trap mark {fg} on {bg}: {ratio:.2}");
    let page_bg = css_colour(&css, "body", "background");
    for v in [".verdict-open", ".verdict-restricted", ".verdict-filtered"] {
        let c = css_colour(&css, v, "color");
        let ratio = contrast(&c, &page_bg);
        assert!(ratio >= 4.5, "{v} {c} on {page_bg}: {ratio:.2}");
    }
    // An empty fleet still renders every page.
    for path in ["/", "/exposure", "/ports", "/hosts", "/changes", "/stale"] {
        page(served.addr, path).await;
    }
    served.shutdown().await;
}

/// A TLS client with the fleet CA as its root and, optionally, a client certificate.
fn tls_client(pki: &Pki, identity: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in listenscope_core::pem::load_certs(&pki.path("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        listenscope_core::pem::tls13_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => {
            let (certs, key) =
                listenscope_core::pem::load_identity(&pki.path(cert), &pki.path(key)).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls_get(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    path: &str,
) -> std::io::Result<Resp> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let tls = connector.connect(name, tcp).await?;
    exchange(tls, "GET", path).await
}

/// Off loopback: TLS with client certificates from the fleet CA (refused without one,
/// or with one from another CA), or `--ui-public`; plain HTTP and a missing CA are
/// refused at start-up, naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_needs_tls_and_fleet_certificates_or_public() {
    let pki = Pki::new(&["h1"]);
    let other = Pki::new(&["stranger"]);
    let dir = TempDir::new("ui-tls");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    Store::open(&db, &StoreOptions::default()).await.unwrap();
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let flags = ui::Flags {
        cert: "--tls-cert and --tls-key",
        ca: "--tls-ca FILE",
        public: "--public",
    };
    let identity = (pki.path("server.pem"), pki.path("server.key"));
    let identity = Some((identity.0.as_path(), identity.1.as_path()));

    let e = ui::tls_for(any, None, None, false, flags)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a loopback address") && e.contains("--tls-cert"),
        "{e}"
    );
    let e = ui::tls_for(any, identity, None, false, flags)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--tls-ca FILE") && e.contains("--public"), "{e}");
    // Loopback without a certificate: plain HTTP.
    assert!(
        ui::tls_for("127.0.0.1:0".parse().unwrap(), None, None, false, flags)
            .unwrap()
            .is_none()
    );

    // Client certificates from the fleet CA.
    let verifier = pki.server_tls_revocable().revocation.unwrap().verifier();
    let tls = ui::tls_for(any, identity, Some(verifier), false, flags).unwrap();
    let served = Served::start(&db, "0.0.0.0:0", tls).await;
    let fleet = tls_client(&pki, Some(("h1.pem", "h1.key")));
    let r = tls_get(served.addr, &fleet, "/hosts").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-security-policy"), Some(ui::CSP));
    // Without a certificate, or with another CA's: refused (TLS 1.3: at the first read).
    let anonymous = tls_client(&pki, None);
    assert!(tls_get(served.addr, &anonymous, "/hosts").await.is_err());
    let stranger = tls_client_with_root(&pki, &other, ("stranger.pem", "stranger.key"));
    assert!(tls_get(served.addr, &stranger, "/hosts").await.is_err());
    // Plain HTTP to the TLS port gets no page.
    let plain = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    assert!(exchange(plain, "GET", "/").await.is_err());
    served.shutdown().await;

    // --ui-public: TLS, anyone.
    let tls = ui::tls_for(any, identity, None, true, flags).unwrap();
    let served = Served::start(&db, "0.0.0.0:0", tls).await;
    let r = tls_get(served.addr, &anonymous, "/").await.unwrap();
    assert_eq!(r.status, 200);
    served.shutdown().await;
}

/// A client trusting `pki`'s CA that presents a certificate of `other`'s CA.
fn tls_client_with_root(
    pki: &Pki,
    other: &Pki,
    (cert, key): (&str, &str),
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in listenscope_core::pem::load_certs(&pki.path("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let (certs, key) =
        listenscope_core::pem::load_identity(&other.path(cert), &other.path(key)).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        listenscope_core::pem::tls13_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// The binaries refuse an address off loopback without TLS, or without client
/// certificates or --public, before opening anything, and name the fix; `serve
/// --ui-listen` serves the UI next to the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_refuse_unsafe_addresses_and_serve_serves_the_ui() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("ui-bin");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let run = |args: &[&str]| {
        std::process::Command::new(collector_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let url = db.as_url();
    let o = run(&["ui", "--db", &url, "--listen", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not a loopback address") && err.contains("--tls-cert"),
        "{err}"
    );
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let o = run(&[
        "ui",
        "--db",
        &url,
        "--listen",
        "0.0.0.0:0",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--tls-ca") && err.contains("--public"),
        "{err}"
    );
    assert!(
        !dir.path().join("ls.db").exists(),
        "nothing opened before the refusal"
    );

    let grpc = free_port("127.0.0.1");
    let web = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let _collector = spawn_collector_with(
        &pki,
        &db,
        grpc,
        None,
        &log,
        &["--ui-listen", &web.to_string()],
    );
    wait_listening(web).await;
    let r = get(web, "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("Fleet overview"));
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    for _ in 0..50 {
        if logged().contains("Serving the web UI") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged().contains("Serving the web UI"), "{}", logged());

    // --ui-tls-ca: the UI's clients come from the operators' CA, so an agent's
    // certificate (the fleet CA's) no longer opens it.
    let operators = Pki::new(&["alice"]);
    let grpc = free_port("127.0.0.1");
    let web = free_port("0.0.0.0");
    let log = dir.path().join("collector-ops.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let ops_ca = operators.path("ca.pem");
    let _collector = spawn_collector_with(
        &pki,
        &db,
        grpc,
        None,
        &log,
        &[
            "--ui-listen",
            &web.to_string(),
            "--ui-tls-ca",
            ops_ca.to_str().unwrap(),
        ],
    );
    wait_listening(web).await;
    let alice = tls_client_with_root(&pki, &operators, ("alice.pem", "alice.key"));
    let r = tls_get(web, &alice, "/hosts").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let agent = tls_client(&pki, Some(("h1.pem", "h1.key")));
    assert!(
        tls_get(web, &agent, "/hosts").await.is_err(),
        "an agent's certificate opened the UI"
    );
    assert!(tls_get(web, &tls_client(&pki, None), "/").await.is_err());
}

/// A plausible fleet for the screenshots (the README shows one): two web servers whose
/// dual-stack sockets are the headline on port 80 (one let in by the firewall, one only
/// from a subnet), and a database server whose sockets netstat shows honestly.
async fn fill_demo(pki: &Pki, db: &DbUrl) {
    let store = Store::open(db, &StoreOptions::default()).await.unwrap();
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::serve(
        socket,
        listenscope_collector::tls::ServerTls::from(pki.server_tls()),
        store,
        Limits::default(),
        stop.clone().cancelled_owned(),
    ));
    let apache = trap(80, "open");
    let mut nginx = trap(80, "restricted");
    nginx.effective_ipv4 = verdict(
        "restricted",
        "inet filter input handle 9: ip saddr 198.51.100.0/24 tcp dport 80 accept",
        &["saddr 198.51.100.0/24"],
    );
    nginx.processes[0].comm = "nginx".into();
    nginx.processes[0].cmdline = "nginx: master process /usr/sbin/nginx".into();
    nginx.unit = "nginx.service".into();
    let mut postgres = listener("host", 5432);
    postgres.key.as_mut().unwrap().v6only = Some(true);
    postgres.reach_ipv4 = v1::Reach::None as i32;
    postgres.trap = false;
    postgres.hidden_ipv4_exposure = false;
    postgres.processes[0].comm = "postgres".into();
    postgres.processes[0].cmdline = "/usr/lib/postgresql/15/bin/postgres".into();
    postgres.unit = "postgresql@15-main.service".into();
    postgres.effective_ipv6 = verdict("filtered", "policy drop of inet filter input", &[]);
    let mut ssh = trap(22, "open");
    ssh.processes[0].comm = "sshd".into();
    ssh.processes[0].cmdline = "sshd: /usr/sbin/sshd -D [listener]".into();
    ssh.unit = "ssh.service".into();
    report(
        pki,
        addr,
        "web-01.example.net",
        vec![snapshot(1, vec![apache, ssh.clone()])],
    )
    .await;
    report(
        pki,
        addr,
        "web-02.example.net",
        vec![snapshot(1, vec![nginx, ssh.clone()])],
    )
    .await;
    report(
        pki,
        addr,
        "db-01.example.net",
        vec![snapshot(1, vec![postgres])],
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Where screenshots go: `target/ui-screenshots/` (kept by CI as artifacts).
fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A PNG of `width`×`height` with something drawn on it: its signature, its header's
/// size, and more bytes than a blank page compresses to (about 2 KiB at this size).
fn check_png(path: &std::path::Path, width: u32, height: u32) {
    let png = std::fs::read(path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&png[12..16], b"IHDR");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((w, h), (width, height), "{}", path.display());
    assert!(
        png.len() > 20_000,
        "{}: {} bytes",
        path.display(),
        png.len()
    );
}

/// Headless Chromium (Debian's, installed by `scripts/test`) loads the pages from a
/// running UI: the headline host is in the DOM the browser built, nothing the agents sent
/// became an element there, and screenshots of the pages are saved under
/// `target/ui-screenshots/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_shows_the_headline() {
    let chromium = Chromium::find().unwrap_or_else(|fix| panic!("{fix}"));
    let shots = screenshot_dir();

    // The hostile fleet: what the browser made of the agents' text.
    let pki = Pki::new(&["h1", "h2", "h3", "h4", "h5", "h6", "h7"]);
    let dir = TempDir::new("ui-browser");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    fill(&pki, &db).await;
    let served = Served::start(&db, "127.0.0.1:0", None).await;
    let base = format!("http://{}", served.addr);
    for path in [
        "/",
        "/exposure?port=80",
        "/hosts/h1",
        "/changes",
        "/ports",
        "/stale",
    ] {
        let dom = tokio::task::block_in_place(|| chromium.dump_dom(&format!("{base}{path}")));
        let doc = Html::parse_document(&dom);
        inert(&doc, path);
        accessible(&doc, path);
    }
    let dom =
        tokio::task::block_in_place(|| chromium.dump_dom(&format!("{base}/exposure?port=80")));
    let doc = Html::parse_document(&dom);
    let hl = rows(&doc, "Hosts where IPv4 reaches port 80");
    assert_eq!(hl.len(), 2, "{hl:?}");
    assert_eq!((hl[0][1].as_str(), hl[0][5].as_str()), ("h1", ":::80"));
    assert_eq!(
        hl[0][6], SCRIPT,
        "the browser shows the process name as text"
    );
    served.shutdown().await;

    // The plausible fleet: the pages as an SRE sees them.
    let pki = Pki::new(&[
        "web-01.example.net",
        "web-02.example.net",
        "db-01.example.net",
    ]);
    let db = DbUrl::Sqlite(dir.path().join("demo.db"));
    fill_demo(&pki, &db).await;
    let served = Served::start(&db, "127.0.0.1:0", None).await;
    let base = format!("http://{}", served.addr);
    let dom =
        tokio::task::block_in_place(|| chromium.dump_dom(&format!("{base}/exposure?port=80")));
    let doc = Html::parse_document(&dom);
    let hl = rows(&doc, "Hosts where IPv4 reaches port 80");
    let hosts: Vec<&str> = hl.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(
        hosts,
        ["web-01.example.net", "web-02.example.net"],
        "{hl:?}"
    );
    assert_eq!(doc.select(&sel("tbody .trap")).count(), 2);
    for (name, path, height) in [
        ("exposure", "/exposure?port=80", 720),
        ("overview", "/", 900),
        ("host", "/hosts/web-01.example.net", 720),
        ("changes", "/changes", 900),
    ] {
        let png = shots.join(format!("{name}.png"));
        tokio::task::block_in_place(|| {
            chromium.screenshot(&format!("{base}{path}"), &png, 1280, height)
        });
        check_png(&png, 1280, height);
    }
    served.shutdown().await;
}
