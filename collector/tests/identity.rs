//! Who a client certificate says it is, and in which TLS, against a real collector: one
//! host however its name is spelled (case, the root's trailing dot), a certificate that
//! names no host refused at its first call and counted and logged like every other
//! refusal, and a client that does not speak TLS 1.3 refused at the handshake.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use util::*;

type Body = v1::collector_message::Body;

/// An agent certificate issued by `pki`'s CA whose DNS SAN and CN are `name` exactly as
/// given (the collector's `certs issue` only writes canonical names; other CAs, such as a
/// company's, may not), written as `file`.pem and `file`.key.
fn cert_named(pki: &Pki, name: &str, file: &str) -> (PathBuf, PathBuf) {
    pki.client_cert(name, file, |_| {})
}

async fn open_as(
    addr: SocketAddr,
    pki: &Pki,
    id: &(PathBuf, PathBuf),
    first: v1::AgentMessage,
) -> Result<RawSession, tonic::Status> {
    let ch = channel(addr, &pki.path("ca.pem"), Some((&id.0, &id.1)))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    RawSession::open(ch, first).await
}

/// `listenscope_rejected_connections_total{reason="REASON"}`; `None` when the series is
/// not exported at all.
fn rejected(text: &str, reason: &str) -> Option<u64> {
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .find(|l| l.starts_with("listenscope_rejected_connections_total") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// The collector's log lines that refused a connection for `reason`.
fn refusal_lines(log: &Path, reason: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains("Connection refused.") && l.contains(&format!("reason=\"{reason}\""))
        })
        .map(str::to_string)
        .collect()
}

/// `WEB-01.Example.NET.`, `web-01.example.net.` and `web-01.example.net` are one host:
/// DNS names are case-insensitive and the root's trailing dot is the same name. Before,
/// `victim-host.` became a host of its own, next to `victim-host` (lower case already
/// held): a second certificate for a host wrote a second history of it.
#[tokio::test]
async fn one_host_however_its_certificate_spells_it() {
    let pki = Pki::new(&[]);
    let dir = TempDir::new("ident-canon");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start(&pki, &db).await;
    let shouting = cert_named(&pki, "WEB-01.Example.NET.", "shouting");
    let rooted = cert_named(&pki, "web-01.example.net.", "rooted");
    let plain = cert_named(&pki, "web-01.example.net", "plain");

    // The first spelling stores a snapshot in session 1.
    let mut s = open_as(c.addr, &pki, &shouting, hello(1, 0, "web-01"))
        .await
        .unwrap();
    assert!(matches!(s.recv().await.unwrap(), Some(Body::Welcome(_))));
    s.send(snapshot(1, vec![listener("host", 80)])).await;
    assert!(matches!(s.recv().await.unwrap(), Some(Body::Ack(_))));
    drop(s);

    // The others continue that session, as the same host would after a reconnect: the
    // collector knows it (resume_after) and takes its next delta.
    let mut seq = 1;
    for id in [&rooted, &plain] {
        let mut s = open_as(c.addr, &pki, id, hello(1, seq, "web-01"))
            .await
            .unwrap();
        match s.recv().await.unwrap() {
            Some(Body::Welcome(w)) => assert_eq!(
                w.resume_after,
                Some(seq),
                "{}: not the host that stored session 1",
                id.0.display()
            ),
            other => panic!("{other:?}"),
        }
        seq += 1;
        s.send(delta(
            seq,
            vec![listener("host", 8000 + seq as u32)],
            vec![],
        ))
        .await;
        assert!(matches!(s.recv().await.unwrap(), Some(Body::Ack(_))));
        drop(s);
    }

    let hosts = query(&db, "SELECT host FROM hosts ORDER BY host", &[]).await;
    let names: Vec<&str> = hosts.rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["web-01.example.net"],
        "one host, in its canonical spelling"
    );
    assert_eq!(
        live_ports(&db, "web-01.example.net").await,
        [80, 8002, 8003],
        "every spelling wrote the same host's rows"
    );
    c.shutdown().await;
}

/// A certificate from the fleet CA whose name is not a host name (here a wildcard, as
/// when a server certificate is reused for an agent) is refused with PERMISSION_DENIED at
/// the first call, as before, and now also counted as `host_name` and logged (once per
/// interval) with the peer, the name and the fix. Before, it was neither: an agent locked
/// out this way left no trace on the collector.
// Multi-threaded: the test blocks in `terminate()` while the collector waits for this
// process to close its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_no_host_is_refused_counted_and_logged() {
    let pki = Pki::new(&["h1"]);
    let wildcard = cert_named(&pki, "*.example.net", "wildcard");
    let dir = TempDir::new("ident-name");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let mut collector = spawn_collector(&pki, &db, addr, Some(maddr), &log);
    wait_listening(addr).await;
    wait_listening(maddr).await;

    let registered = metrics(maddr).await;
    assert_eq!(
        rejected(&registered, "host_name"),
        Some(0),
        "registered at zero from start-up: {registered}"
    );

    for n in 1..=2 {
        let status = match open_as(addr, &pki, &wildcard, hello(n, 0, "web-01")).await {
            Err(st) => st,
            Ok(mut s) => s
                .recv()
                .await
                .expect_err("a certificate that names no host"),
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        assert!(status.message().contains("*.example.net"), "{status}");
    }
    wait_for_async(Duration::from_secs(10), "both refusals counted", || async {
        let text = metrics(maddr).await;
        if rejected(&text, "host_name") == Some(2) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    let lines = refusal_lines(&log, "host_name");
    assert_eq!(
        lines.len(),
        1,
        "one line per reason and interval: {lines:?}"
    );
    for part in [
        "peer=127.0.0.1:",
        "*.example.net",
        "certs issue --host NAME",
    ] {
        assert!(lines[0].contains(part), "{part} missing: {}", lines[0]);
    }
    let hosts = query(&db, "SELECT count(*) FROM hosts", &[]).await;
    assert_eq!(
        hosts.rows[0][0],
        serde_json::Value::from(0),
        "nothing stored"
    );

    // A valid agent is not affected.
    let mut ok = session_as(&pki, addr, "h1", hello(9, 0, "h1")).await;
    assert!(matches!(ok.recv().await, Ok(Some(Body::Welcome(_)))));
    drop(ok);
    assert_eq!(collector.terminate().code(), Some(0));
}

/// A client that speaks TLS 1.2 only, with a valid agent certificate, never completes a
/// handshake (docs/protocol.md: TLS 1.3); the refusal is counted as `protocol_version`
/// and logged with the fix. Before, the collector negotiated TLS 1.2 with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_client_is_refused_and_counted() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("ident-tls12");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let mut collector = spawn_collector(&pki, &db, addr, Some(maddr), &log);
    wait_listening(addr).await;
    wait_listening(maddr).await;

    let pem = |f: &str| std::fs::read(pki.path(f)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&pem("ca.pem")) {
        roots.add(c).unwrap();
    }
    // The full ring provider (1.2 suites included), restricted to TLS 1.2 only.
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        rustls_pemfile_certs(&pem("h1.pem")),
        PrivateKeyDer::from_pem_slice(&pem("h1.key")).unwrap(),
    )
    .unwrap();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let handshake = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp),
    )
    .await
    .expect("the collector answers the handshake");
    match handshake {
        Ok(tls) => panic!(
            "the collector negotiated {:?} with a TLS 1.2-only client",
            tls.get_ref().1.protocol_version()
        ),
        Err(e) => assert!(
            e.to_string().contains("ProtocolVersion"),
            "refused for the version: {e}"
        ),
    }
    wait_for_async(Duration::from_secs(10), "the refusal counted", || async {
        let text = metrics(maddr).await;
        if rejected(&text, "protocol_version") == Some(1) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    let lines = refusal_lines(&log, "protocol_version");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("peer=127.0.0.1:"), "{}", lines[0]);
    assert!(
        lines[0].contains("TLS 1.3"),
        "the fix names the version: {}",
        lines[0]
    );

    // The same certificate over TLS 1.3 (the harness' client) is welcome.
    let mut ok = session_as(&pki, addr, "h1", hello(1, 0, "h1")).await;
    assert!(matches!(ok.recv().await, Ok(Some(Body::Welcome(_)))));
    drop(ok);
    assert_eq!(collector.terminate().code(), Some(0));
}

/// Every certificate of a PEM file.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}
