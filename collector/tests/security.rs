//! Mutual TLS against the real collector binary: clients without a certificate, with one
//! from another CA, or with an expired one are refused, store nothing, and are counted by
//! reason in the metrics; a host's certificate decides which rows it writes, whatever its
//! messages say.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::time::Duration;

use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use time::OffsetDateTime;
use util::*;

type Body = v1::collector_message::Body;

/// An agent certificate for `host` signed by the real CA but already expired.
fn expired_cert(pki: &Pki, host: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    pki.client_cert(host, &format!("{host}-expired"), |params| {
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
        params.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    })
}

/// Opens a session with the given identity and expects the collector to refuse it, at the
/// connection, the call or the first read.
async fn expect_refused(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    id: Option<(&std::path::Path, &std::path::Path)>,
) {
    let ch = match channel(addr, ca, id).await {
        Ok(ch) => ch,
        Err(_) => return,
    };
    let mut s = match RawSession::open(ch, hello(1, 0, "intruder")).await {
        Ok(s) => s,
        Err(_) => return,
    };
    s.send(snapshot(1, vec![listener("host", 80)])).await;
    match s.recv().await {
        Err(_) => {}
        Ok(m) => panic!("a refused client got an answer: {m:?}"),
    }
}

fn counter(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

// Multi-threaded: the test blocks in `terminate()` while the collector waits for this
// process to close its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_store_nothing_and_are_counted() {
    let pki = Pki::new(&["h1"]);
    let stranger = Pki::new(&["h1"]); // another CA, same host name
    let (exp_cert, exp_key) = expired_cert(&pki, "h3");
    let dir = TempDir::new("sec");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let mut collector = spawn_collector(
        &pki,
        &db,
        addr,
        Some(maddr),
        &dir.path().join("collector.log"),
    );
    wait_listening(addr).await;
    wait_listening(maddr).await;

    let ca = pki.path("ca.pem");
    expect_refused(addr, &ca, None).await;
    expect_refused(
        addr,
        &ca,
        Some((&stranger.path("h1.pem"), &stranger.path("h1.key"))),
    )
    .await;
    expect_refused(addr, &ca, Some((&exp_cert, &exp_key))).await;

    let hosts = query(&db, "SELECT count(*) FROM hosts", &[]).await;
    assert_eq!(
        hosts.rows[0][0],
        serde_json::Value::from(0),
        "nothing stored for refused clients"
    );
    let listeners = query(&db, "SELECT count(*) FROM listener", &[]).await;
    assert_eq!(listeners.rows[0][0], serde_json::Value::from(0));

    let counted = |text: &str| {
        ["no_certificate", "unknown_ca", "expired"].iter().all(|r| {
            counter(
                text,
                "listenscope_rejected_connections_total",
                &format!("reason=\"{r}\""),
            ) >= 1
        })
    };
    wait_for_async(
        Duration::from_secs(10),
        "each refusal counted by reason",
        || async {
            let text = metrics(maddr).await;
            if counted(&text) { Ok(()) } else { Err(text) }
        },
    )
    .await;
    let log = std::fs::read_to_string(dir.path().join("collector.log")).unwrap();
    assert!(log.contains("Connection refused."), "{log}");
    assert_eq!(
        collector.terminate().code(),
        Some(0),
        "graceful shutdown on SIGTERM"
    );
}

#[tokio::test]
async fn a_host_writes_only_its_own_rows() {
    let pki = Pki::new(&["h1", "h2"]);
    let dir = TempDir::new("ident");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start(&pki, &db).await;
    let ca = pki.path("ca.pem");

    // h2 stores its own inventory.
    let ch = channel(
        c.addr,
        &ca,
        Some((&pki.path("h2.pem"), &pki.path("h2.key"))),
    )
    .await
    .unwrap();
    let mut s2 = RawSession::open(ch, hello(2, 0, "h2")).await.unwrap();
    assert!(matches!(s2.recv().await.unwrap(), Some(Body::Welcome(_))));
    s2.send(snapshot(1, vec![listener("host", 22)])).await;
    assert!(matches!(s2.recv().await.unwrap(), Some(Body::Ack(_))));
    drop(s2);

    // h1's certificate, messages claiming to be h2 (host name and netns), and even h2's
    // session id: it still writes as h1 only.
    let ch = channel(
        c.addr,
        &ca,
        Some((&pki.path("h1.pem"), &pki.path("h1.key"))),
    )
    .await
    .unwrap();
    let mut s1 = RawSession::open(ch, hello(2, 1, "h2")).await.unwrap();
    match s1.recv().await.unwrap() {
        Some(Body::Welcome(w)) => {
            assert_eq!(w.resume_after, None, "h2's session means nothing to h1")
        }
        other => panic!("{other:?}"),
    }
    s1.send(snapshot(1, vec![listener("h2", 80)])).await;
    assert!(matches!(s1.recv().await.unwrap(), Some(Body::Ack(_))));
    s1.send(delta(2, vec![], vec![listener("host", 22).key.unwrap()]))
        .await;
    assert!(matches!(s1.recv().await.unwrap(), Some(Body::Ack(_))));
    drop(s1);

    let rows = query(
        &db,
        "SELECT host, port FROM current_listeners ORDER BY host, port",
        &[],
    )
    .await;
    let got: Vec<(String, i64)> = rows
        .rows
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
        .collect();
    assert_eq!(got, [("h1".to_string(), 80), ("h2".to_string(), 22)]);
    let h1 = query(&db, "SELECT os_hostname FROM hosts WHERE host = 'h1'", &[]).await;
    assert_eq!(
        h1.rows[0][0], "h2",
        "the claimed name is kept as information only"
    );
    c.shutdown().await;
}

/// At `--max-sessions`, one more session is refused with RESOURCE_EXHAUSTED, counted as
/// `rejected_connections_total{reason="session_limit"}` (not as an invalid message), and
/// logged once per interval with the number refused in between; a slot that frees up is
/// used again.
// Multi-threaded: the test blocks in `terminate()` while the collector waits for this
// process to close its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_cap_are_refused_counted_and_logged() {
    let pki = Pki::new(&["h1", "h2", "h3"]);
    let dir = TempDir::new("cap");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let mut collector =
        spawn_collector_with(&pki, &db, addr, Some(maddr), &log, &["--max-sessions", "1"]);
    wait_listening(addr).await;
    wait_listening(maddr).await;
    let mut first = session_as(&pki, addr, "h1", hello(1, 0, "h1")).await;
    assert!(matches!(
        first.recv().await,
        Ok(Some(
            listenscope_proto::v1::collector_message::Body::Welcome(_)
        ))
    ));
    for (host, n) in [("h2", 2), ("h3", 3), ("h2", 4)] {
        let refused = match try_session_as(&pki, addr, host, hello(n, 0, host)).await {
            Err(st) => st,
            Ok(mut s) => s.recv().await.expect_err("a session past the cap"),
        };
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert!(
            refused.message().contains("limit of 1 sessions"),
            "{refused}"
        );
    }
    wait_for_async(Duration::from_secs(10), "refusals counted", || async {
        let text = metrics(maddr).await;
        match (
            counter(
                &text,
                "listenscope_rejected_connections_total",
                "reason=\"session_limit\"",
            ),
            counter(
                &text,
                "listenscope_rejected_messages_total",
                "session_limit",
            ),
        ) {
            (3, 0) => Ok(()),
            _ => Err(text),
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Refused a session"))
        .collect();
    assert_eq!(lines.len(), 1, "rate-limited to one line here: {text}");
    assert!(
        lines[0].contains("max_sessions=1") && lines[0].contains("--max-sessions"),
        "{}",
        lines[0]
    );
    // The slot frees when the first session ends.
    drop(first);
    wait_for_async(
        Duration::from_secs(10),
        "a freed slot is used again",
        || async {
            match try_session_as(&pki, addr, "h2", hello(9, 0, "h2")).await {
                Ok(mut s) => match s.recv().await {
                    Ok(Some(listenscope_proto::v1::collector_message::Body::Welcome(_))) => Ok(()),
                    other => Err(format!("{other:?}")),
                },
                Err(st) => Err(st.to_string()),
            }
        },
    )
    .await;
    assert_eq!(collector.terminate().code(), Some(0));
}

/// Each refused handshake is counted; the log says, once per reason and interval, who
/// was refused, why and what to do (a fleet rolled out with the wrong CA must not flood
/// the log). An agent that distrusts the collector's certificate is told apart from one
/// the collector distrusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_logged_once_per_reason_with_the_fix() {
    let pki = Pki::new(&["h1"]);
    let stranger = Pki::new(&["h1"]);
    let (exp_cert, exp_key) = expired_cert(&pki, "h3");
    let dir = TempDir::new("refusal-log");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let mut collector = spawn_collector(&pki, &db, addr, Some(maddr), &log);
    wait_listening(addr).await;
    wait_listening(maddr).await;

    let ca = pki.path("ca.pem");
    let foreign = (stranger.path("h1.pem"), stranger.path("h1.key"));
    for _ in 0..2 {
        expect_refused(addr, &ca, None).await;
        expect_refused(addr, &ca, Some((&foreign.0, &foreign.1))).await;
    }
    expect_refused(addr, &ca, Some((&exp_cert, &exp_key))).await;
    // A TCP probe (connect, close): counted, not logged as a refused agent.
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    // Our own certificate, but the agent trusts another CA: it refuses the collector.
    expect_refused(
        addr,
        &stranger.path("ca.pem"),
        Some((&pki.path("h1.pem"), &pki.path("h1.key"))),
    )
    .await;

    wait_for_async(Duration::from_secs(10), "every refusal counted", || async {
        let text = metrics(maddr).await;
        let n = |r: &str| {
            counter(
                &text,
                "listenscope_rejected_connections_total",
                &format!("reason=\"{r}\""),
            )
        };
        if n("no_certificate") >= 2
            && n("unknown_ca") >= 2
            && n("expired") >= 1
            && n("server_certificate_refused") >= 1
            && n("handshake") >= 2
        {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = |reason: &str| -> Vec<String> {
        text.lines()
            .filter(|l| {
                l.contains("Connection refused.") && l.contains(&format!("reason=\"{reason}\""))
            })
            .map(str::to_string)
            .collect()
    };
    for (reason, fix) in [
        ("no_certificate", "give the agent --tls-cert and --tls-key"),
        ("unknown_ca", "not signed by this collector's --tls-ca"),
        ("expired", "certs issue --host NAME --force"),
        (
            "server_certificate_refused",
            "give the agent the CA that signed --tls-cert",
        ),
    ] {
        let l = lines(reason);
        assert_eq!(l.len(), 1, "one line per reason and interval: {text}");
        assert!(l[0].contains("peer=127.0.0.1:"), "{}", l[0]);
        assert!(l[0].contains(fix), "{}", l[0]);
    }
    assert!(
        lines("handshake").is_empty(),
        "probes are not refused agents: {text}"
    );
    assert_eq!(collector.terminate().code(), Some(0));
}
