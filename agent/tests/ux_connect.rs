//! `listenscope-agent run` names why it cannot reach its collector, once, with the fix:
//! refused, unreachable, name not resolving, no answer, a collector certificate from
//! another CA or for another name, our certificate refused by the collector, and something
//! that does not speak TLS. Before, every one of them was `transport error` (and a refused
//! client certificate hyper's debug text). Real sockets, real TLS (tonic + rustls), the
//! real binary; the agent keeps retrying after each.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod ux_util;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Command;

use listenscope_testkit::{LogsOnPanic, Netns, TempDir};
use ux_util::{AgentFiles, Ca, TlsServer, log_line, start_run_with};

/// Runs the agent against `url` and returns its first "Session failed." line; checks it
/// goes on retrying afterwards.
fn first_failure(tag: &str, files: &AgentFiles, url: &str, extra: &[&str]) -> String {
    first_failure_with(ux_util::agent(), tag, files, url, extra)
}

fn first_failure_with(
    cmd: Command,
    tag: &str,
    files: &AgentFiles,
    url: &str,
    extra: &[&str],
) -> String {
    failure_with(cmd, tag, files, url, extra, "Session failed.")
}

/// The first "Session failed." line that holds `needle`.
fn failure_with(
    cmd: Command,
    tag: &str,
    files: &AgentFiles,
    url: &str,
    extra: &[&str],
    needle: &str,
) -> String {
    let dir = TempDir::new(tag);
    let log = dir.join("agent.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let mut args = vec!["--collector".to_string(), url.to_string()];
    args.extend(files.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut agent = start_run_with(cmd, &args, &log);
    let line = log_line(&mut agent, &log, needle);
    assert!(line.contains("Session failed."), "{line}");
    // Not fatal: it tries again.
    log_line(&mut agent, &log, "Reconnecting.");
    agent.kill();
    // Neither tonic's summary nor hyper's debug text.
    for noise in ["transport error", "hyper::Error", "Custom {", "Kind("] {
        assert!(!line.contains(noise), "{noise:?} in {line}");
    }
    line
}

/// `needle` is said exactly once in `line`.
#[track_caller]
fn once(line: &str, needle: &str) {
    assert_eq!(
        line.matches(needle).count(),
        1,
        "{needle:?} not once in:\n{line}"
    );
}

fn pki(dir: &TempDir) -> (Ca, AgentFiles) {
    let ca = Ca::new("listenscope ux CA");
    let files = AgentFiles::write(dir.path(), &ca, &ca, "h1");
    (ca, files)
}

#[test]
fn connection_refused_names_the_port() {
    let dir = TempDir::new("ux-refused");
    let (_ca, files) = pki(&dir);
    // Bound, never listening: connections are refused for as long as it lives.
    let closed = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    closed
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = closed.local_addr().unwrap().as_socket().unwrap();
    let line = first_failure("ux-refused1", &files, &format!("https://{addr}"), &[]);
    once(
        &line,
        &format!("connection refused: nothing listens at {addr}"),
    );
    once(&line, "is the collector running");
}

#[test]
fn unreachable_network_is_named() {
    let dir = TempDir::new("ux-unreach");
    let (_ca, files) = pki(&dir);
    // A namespace with only lo: 10.255.0.1 has no route at all.
    let ns = Netns::new();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_listenscope-agent"));
    let line = first_failure_with(cmd, "ux-unreach1", &files, "https://10.255.0.1:7443", &[]);
    once(
        &line,
        "10.255.0.1:7443 is unreachable (network unreachable)",
    );
    once(&line, "routes");
}

#[test]
fn a_name_that_does_not_resolve_is_named() {
    let dir = TempDir::new("ux-dns");
    let (_ca, files) = pki(&dir);
    // .invalid never resolves (RFC 6761).
    let line = first_failure(
        "ux-dns1",
        &files,
        "https://collector.listenscope.invalid:7443",
        &[],
    );
    once(&line, "collector.listenscope.invalid does not resolve");
    once(&line, "check the host name in the collector URL");
}

#[test]
fn a_silent_server_times_out() {
    let dir = TempDir::new("ux-silent");
    let (_ca, files) = pki(&dir);
    // Listening, never accepting, never answering: the kernel completes the TCP handshake
    // and the ClientHello waits in the queue. Before, the agent waited here forever.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let line = first_failure("ux-silent1", &files, &format!("https://{addr}"), &[]);
    once(
        &line,
        &format!("no answer from {addr} within 10s (TCP connect and TLS handshake)"),
    );
}

#[test]
fn a_server_that_does_not_speak_tls_is_named() {
    let dir = TempDir::new("ux-plain");
    let (_ca, files) = pki(&dir);
    // An HTTP server on the port (the metrics port, say): it answers the ClientHello with
    // plain text.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in plain.incoming().flatten() {
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let line = first_failure("ux-plain1", &files, &format!("https://{addr}"), &[]);
    once(&line, &format!("{addr} does not speak TLS"));
    once(&line, "not its metrics port");
}

#[test]
fn a_collector_certificate_from_another_ca_is_named() {
    let dir = TempDir::new("ux-untrusted");
    let (ca, files) = pki(&dir);
    let other = Ca::new("another CA");
    let server = TlsServer::start(&other.server(&["localhost", "127.0.0.1"]), &ca);
    let line = first_failure(
        "ux-untrusted1",
        &files,
        &format!("https://{}", server.addr),
        &[],
    );
    once(
        &line,
        &format!(
            "the collector's certificate is not signed by the CA in {}",
            files.ca.display()
        ),
    );
}

#[test]
fn a_server_name_mismatch_is_named_with_the_fix() {
    let dir = TempDir::new("ux-name");
    let (ca, files) = pki(&dir);
    // The certificate names localhost only; the URL says 127.0.0.1.
    let server = TlsServer::start(&ca.server(&["localhost"]), &ca);
    let line = first_failure("ux-name1", &files, &format!("https://{}", server.addr), &[]);
    once(&line, "not valid for \"127.0.0.1\" (it names localhost)");
    once(&line, "certs init --server-name 127.0.0.1");
    // Named right, the same server is trusted: the failure moves on to the session.
    let line = first_failure(
        "ux-name2",
        &files,
        &format!("https://{}", server.addr),
        &["--server-name", "localhost"],
    );
    assert!(!line.contains("not valid for"), "{line}");
    once(
        &line,
        "the collector refused the session (Unavailable): test server",
    );
}

#[test]
fn our_certificate_refused_by_the_collector_is_named() {
    let dir = TempDir::new("ux-client");
    let ca = Ca::new("fleet CA");
    let stranger = Ca::new("another fleet's CA");
    // The agent trusts the collector, but its own certificate comes from another CA.
    let files = AgentFiles::write(dir.path(), &ca, &stranger, "h1");
    let server = TlsServer::start(&ca.server(&["localhost", "127.0.0.1"]), &ca);
    // With TLS 1.3 the refusal is an alert on the first read; an attempt can also see only
    // the closed connection (its words name this cause as a possibility). The alert comes
    // within a few attempts.
    let line = failure_with(
        ux_util::agent(),
        "ux-client1",
        &files,
        &format!("https://{}", server.addr),
        &[],
        "the collector refused this host's certificate",
    );
    once(
        &line,
        &format!(
            "the collector refused this host's certificate {}",
            files.cert.display()
        ),
    );
    once(&line, "certs issue");
}
