//! Revocation against real collectors over real mutual TLS: `certs revoke` writes a CRL
//! signed by the CA; the collector refuses the certificate at its next handshake (counted
//! as `revoked`) and ends its live session within seconds, without a restart, whether it
//! noticed the file change or got a SIGHUP; a bad CRL is refused at start-up and, on
//! reload, leaves the previous one in force; other hosts are not affected. Before, there
//! was no revocation at all: a stolen certificate wrote its host's rows until the CA was
//! replaced (and SIGHUP killed the collector).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use listenscope_collector::ingest::Limits;
use listenscope_collector::pki::{self, RevokeTarget};
use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use util::*;

type Body = v1::collector_message::Body;

/// The value of the series `name{label}` (or `name` alone when `label` is empty).
fn series(text: &str, name: &str, label: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && (label.is_empty() || l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A session of `host` that stored a snapshot (port 80) and is live.
async fn live_session(pki: &Pki, addr: SocketAddr, host: &str, id: u8) -> RawSession {
    let mut s = session_as(pki, addr, host, hello(id, 0, host)).await;
    assert!(
        matches!(s.recv().await.unwrap(), Some(Body::Welcome(_))),
        "{host} welcomed"
    );
    s.send(snapshot(1, vec![listener("host", 80)])).await;
    assert!(matches!(s.recv().await.unwrap(), Some(Body::Ack(_))));
    s
}

/// The session ends with PERMISSION_DENIED "certificate revoked" within `secs`.
async fn ended_as_revoked(s: &mut RawSession, secs: u64) {
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(secs), s.rx.message())
        .await
        .expect("the live session of a revoked certificate ends within seconds")
        .expect_err("ended with a status");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains("certificate revoked"), "{status}");
    // A figure for the docs, not a bound (shared machines are noisy).
    eprintln!(
        "the revoked session ended {:?} after the CRL was written",
        started.elapsed()
    );
}

/// A new connection of `host` is refused (at the handshake or its first call): it never
/// gets a Welcome.
async fn refused(pki: &Pki, addr: SocketAddr, host: &str) -> tonic::Status {
    match try_session_as(pki, addr, host, hello(77, 0, host)).await {
        Err(st) => st,
        Ok(mut s) => match s.recv().await {
            Err(st) => st,
            Ok(other) => panic!("{host} was let in after its revocation: {other:?}"),
        },
    }
}

/// The session still stores: a delta is acknowledged.
async fn still_stores(s: &mut RawSession, seq: u64, port: u32) {
    s.send(delta(seq, vec![listener("host", port)], vec![]))
        .await;
    match s.recv().await {
        Ok(Some(Body::Ack(a))) => assert_eq!(a.sequence, seq),
        other => panic!("an unrevoked host was affected: {other:?}"),
    }
}

fn revoke(pki: &Pki, host: &str) -> pki::RevokeOutcome {
    pki::revoke(pki.dir.path(), &RevokeTarget::Host(host.into()), false).unwrap()
}

/// The file-change path, in process: `certs revoke` writes crl.pem next to the CA (absent
/// when the collector started); within seconds the revoked host's live session ends with
/// PERMISSION_DENIED and its new connections are refused, while another host's session
/// goes on storing and a second revocation keeps the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_and_its_live_session_ends() {
    let pki = Pki::new(&["h1", "h2", "h3"]);
    let dir = TempDir::new("revoke-file");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start_tls(pki.server_tls_revocable(), &db, Limits::default()).await;
    let mut h1 = live_session(&pki, c.addr, "h1", 1).await;
    let mut h2 = live_session(&pki, c.addr, "h2", 2).await;
    let mut h3 = live_session(&pki, c.addr, "h3", 3).await;

    let out = revoke(&pki, "h1");
    assert!(!out.already);
    assert_eq!((out.crl_number, out.total), (1, 1));
    assert_eq!(
        std::fs::metadata(&out.crl).unwrap().permissions().mode() & 0o777,
        0o644
    );
    ended_as_revoked(&mut h1, 20).await;
    let st = refused(&pki, c.addr, "h1").await;
    assert_ne!(st.code(), tonic::Code::Ok, "{st}");
    still_stores(&mut h2, 2, 8080).await;

    // A second revocation keeps the first: h1 stays out, h3 goes, h2 stays in.
    let out = revoke(&pki, "h3");
    assert_eq!((out.crl_number, out.total), (2, 2));
    ended_as_revoked(&mut h3, 20).await;
    refused(&pki, c.addr, "h1").await;
    refused(&pki, c.addr, "h3").await;
    still_stores(&mut h2, 3, 8081).await;
    let mut again = session_as(&pki, c.addr, "h2", hello(2, 3, "h2")).await;
    assert!(matches!(again.recv().await, Ok(Some(Body::Welcome(_)))));
    drop(again);

    // Nothing h1 sent after its revocation was stored; what it stored before stays.
    assert_eq!(live_ports(&db, "h1").await, [80]);
    assert_eq!(
        pki::revoked(pki.dir.path())
            .unwrap()
            .iter()
            .map(|e| e.host.clone().unwrap())
            .collect::<Vec<_>>(),
        ["h1", "h3"]
    );
    drop((h1, h2, h3));
    c.shutdown().await;
}

/// A connection verified before the revocation keeps its TLS session, but a new stream
/// on it (an agent reconnecting its gRPC call over the same HTTP/2 connection) is refused:
/// the check is made per session, not only per handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_stream_on_a_connection_verified_before_the_revocation_is_refused() {
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("revoke-stream");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start_tls(pki.server_tls_revocable(), &db, Limits::default()).await;
    let ch = channel(
        c.addr,
        &pki.path("ca.pem"),
        Some((&pki.path("h1.pem"), &pki.path("h1.key"))),
    )
    .await
    .unwrap();
    let mut s = RawSession::open(ch.clone(), hello(1, 0, "h1"))
        .await
        .unwrap();
    assert!(matches!(s.recv().await, Ok(Some(Body::Welcome(_)))));
    revoke(&pki, "h1");
    ended_as_revoked(&mut s, 20).await;
    let st = match RawSession::open(ch, hello(1, 0, "h1")).await {
        Err(st) => st,
        Ok(mut s) => s.recv().await.expect_err("refused"),
    };
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st}");
    assert!(st.message().contains("certificate revoked"), "{st}");
    c.shutdown().await;
}

/// The real binary: SIGHUP reloads the CRL (before, SIGHUP ended the collector), the
/// live session of the revoked certificate ends, its next handshake is refused and
/// counted as `revoked`; a bad CRL on reload is logged at ERROR and counted while the
/// previous one stays in force; the unrevoked host goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_crl_keeps_the_previous_one() {
    let pki = Pki::new(&["h1", "h2"]);
    let dir = TempDir::new("revoke-hup");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let maddr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    // The CRL lives elsewhere than the CA: named by --tls-crl, so it must exist at start.
    let crl = dir.path().join("revoked.pem");
    let mut collector = {
        // An empty CRL of the CA to start with: revoke and un-revoke are not both offered,
        // so make one by revoking a throwaway certificate.
        pki.client_cert("spare", "spare", |_| {});
        let out = pki::revoke(
            pki.dir.path(),
            &RevokeTarget::Serial(serial_of(&pki.path("spare.pem"))),
            false,
        )
        .unwrap();
        std::fs::copy(&out.crl, &crl).unwrap();
        spawn_collector_with(
            &pki,
            &db,
            addr,
            Some(maddr),
            &log,
            &["--tls-crl", crl.to_str().unwrap()],
        )
    };
    wait_listening(addr).await;
    wait_listening(maddr).await;
    let text = metrics(maddr).await;
    assert_eq!(
        series(
            &text,
            "listenscope_rejected_connections_total",
            "reason=\"revoked\""
        ),
        Some(0),
        "{text}"
    );

    let mut h1 = live_session(&pki, addr, "h1", 1).await;
    let mut h2 = live_session(&pki, addr, "h2", 2).await;

    // SIGHUP with nothing changed: a reload, and the collector lives on.
    hup(&collector);
    wait_for_log(&log, "why=\"SIGHUP\"").await;
    still_stores(&mut h2, 2, 8080).await;

    // Revoke h1 into the --tls-crl file, then SIGHUP.
    let out = revoke(&pki, "h1");
    std::fs::copy(&out.crl, dir.path().join("revoked.pem.new")).unwrap();
    std::fs::rename(dir.path().join("revoked.pem.new"), &crl).unwrap();
    hup(&collector);
    ended_as_revoked(&mut h1, 20).await;
    // The SIGHUP's own reload read the new list (whether or not the 2 s poll saw the file
    // first).
    wait_for_log(&log, "why=\"SIGHUP\" revoked=2").await;
    let st = refused(&pki, addr, "h1").await;
    assert_ne!(st.code(), tonic::Code::Ok);
    wait_for_async(Duration::from_secs(10), "counted as revoked", || async {
        let text = metrics(maddr).await;
        match (
            series(
                &text,
                "listenscope_rejected_connections_total",
                "reason=\"revoked\"",
            ),
            series(&text, "listenscope_revoked_sessions_total", ""),
        ) {
            (Some(r), Some(1)) if r >= 1 => Ok(()),
            _ => Err(text),
        }
    })
    .await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("Session ended: its certificate was revoked.")
            && logged.contains("reason=\"revoked\""),
        "{logged}"
    );

    // A bad CRL: the previous one stays (h1 still refused), the error is logged and
    // counted, h2 goes on.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
    )
    .unwrap();
    hup(&collector);
    wait_for_async(Duration::from_secs(10), "the bad CRL counted", || async {
        let text = metrics(maddr).await;
        match series(&text, "listenscope_crl_reloads_total", "result=\"error\"") {
            Some(n) if n >= 1 => Ok(()),
            _ => Err(text),
        }
    })
    .await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.lines().any(|l| l.contains("ERROR")
            && l.contains("previous one stays in force")
            && l.contains("revoked.pem")),
        "{logged}"
    );
    refused(&pki, addr, "h1").await;
    still_stores(&mut h2, 3, 8081).await;
    drop((h1, h2));
    assert_eq!(collector.terminate().code(), Some(0));
}

/// At start-up a bad CRL is fatal, naming the file and the fix; a missing --tls-crl too.
#[test]
fn a_bad_crl_at_start_up_is_refused_naming_the_file() {
    let pki = Pki::new(&[]);
    let dir = TempDir::new("revoke-start");
    let bad = dir.path().join("bad-crl.pem");
    std::fs::write(&bad, "not a CRL at all\n").unwrap();
    // Another CA's CRL: a real CRL, not signed by this collector's CA.
    let other = Pki::new(&["x"]);
    let other_crl = pki::revoke(other.dir.path(), &RevokeTarget::Host("x".into()), false)
        .unwrap()
        .crl;
    let missing = dir.path().join("missing.pem");
    for (crl, want) in [
        (&bad, "no CRL in it"),
        (&other_crl, "not signed by"),
        (&missing, "cannot read the CRL"),
    ] {
        let out = Command::new(collector_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(format!("sqlite://{}", dir.path().join("ls.db").display()))
            .arg("--tls-ca")
            .arg(pki.path("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.path("server.pem"))
            .arg("--tls-key")
            .arg(pki.path("server.key"))
            .arg("--tls-crl")
            .arg(crl)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&crl.display().to_string()),
            "names the file: {err}"
        );
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// `certs revoke` and `certs revoked` as an operator types them: what was revoked and how
/// the collector picks it up; revoking twice changes nothing; an unknown name or serial
/// is a clear error.
#[test]
fn certs_revoke_from_the_command_line() {
    let pki = Pki::new(&["web-01", "web-02"]);
    let dir = pki.dir.path().to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(collector_bin())
            .args(["certs"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["revoke", "--dir", &dir, "WEB-01"]);
    assert_eq!(code, Some(0), "{err}");
    for part in [
        "Revoked web-01's certificate (serial ",
        "crl.pem (CRL number 1, 1 revoked)",
        "SIGHUP",
        "certs issue --dir",
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
    let (code, out, _) = run(&["revoke", "--dir", &dir, "web-01"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("already revoked"), "{out}");

    let serial = serial_of(&pki.path("web-02.pem"));
    let with_colons: String = serial
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let (code, out, err) = run(&["revoke", "--dir", &dir, "--serial", &with_colons]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("CRL number 2, 2 revoked"), "{out}");

    let (code, out, _) = run(&["revoked", "--dir", &dir]);
    assert_eq!(code, Some(0));
    assert!(out.contains("web-01") && out.contains(&serial), "{out}");

    let (code, _, err) = run(&["revoke", "--dir", &dir, "web-03"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no certificate for host \"web-03\"") && err.contains("--serial"),
        "{err}"
    );
    let (code, _, err) = run(&["revoke", "--dir", &dir, "--serial", "0BADC0FFEE"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("serial 0BADC0FFEE") && err.contains("--force"),
        "{err}"
    );
    let (code, _, err) = run(&["revoke", "--dir", &dir, "--serial", "xyz"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not a hexadecimal serial"), "{err}");
    let (code, out, err) = run(&["revoke", "--dir", &dir, "--serial", "0BADC0FFEE", "--force"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("serial 0BADC0FFEE") && out.contains("3 revoked"),
        "{out}"
    );
}

/// The certificate's serial as `openssl x509 -serial` prints it.
fn serial_of(pem: &Path) -> String {
    let der = listenscope_core::pem::load_certs(pem).unwrap().remove(0);
    listenscope_collector::revocation::CertKey::of(der.as_ref())
        .unwrap()
        .serial_hex()
}

fn hup(p: &Proc) {
    // SAFETY: signalling our own, not yet reaped, child by pid.
    let r = unsafe { libc::kill(p.pid() as i32, libc::SIGHUP) };
    assert_eq!(r, 0, "kill -HUP");
}

async fn wait_for_log(log: &Path, needle: &str) {
    wait_for_async(Duration::from_secs(10), needle, || async {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
}
