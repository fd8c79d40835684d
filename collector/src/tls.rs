//! The collector's side of mutual TLS: a rustls server configuration that requires a
//! client certificate from our CA and TLS 1.3, a TLS accept loop that admits connections
//! within bounds (`admission`) and counts refused ones by reason (tonic's built-in TLS
//! cannot), and the host identity of an accepted session (canonical: lower case, no
//! trailing dot).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use listenscope_core::pem::{TlsFileError, identity_of, load_certs, load_identity};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, PeerIncompatible, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::Status;

use crate::admission::{self, Admission, AdmissionLimits, PrefaceError, Prefaced};
use crate::metrics as m;
use crate::revocation::{CrlFile, Revocation, RevocationError};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The message is whole (file, cause, fix); not a `source()`, so anyhow's `{:#}` does
    /// not print the I/O error a second time.
    #[error("{0}")]
    File(TlsFileError),
    #[error("{}: not usable as a CA: {detail}", path.display())]
    Ca {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    /// A CRL that cannot be used (the message names the file and the fix).
    #[error("{0}")]
    Revocation(RevocationError),
}

impl From<rustls::Error> for TlsSetupError {
    fn from(e: rustls::Error) -> Self {
        TlsSetupError::Config(e)
    }
}

impl From<TlsFileError> for TlsSetupError {
    fn from(e: TlsFileError) -> Self {
        TlsSetupError::File(e)
    }
}

/// Server configuration: TLS 1.3 only, our certificate, client certificates required and
/// verified against `ca`, ALPN h2 (gRPC); no revocation list ([`server_tls`] reads them).
///
/// TLS 1.3 only, as docs/protocol.md promises: every agent speaks it (rustls), and 1.2
/// would send each agent's certificate, its host name, in the clear, and be a second
/// protocol to keep safe. A 1.2-only client is refused and counted as `protocol_version`.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    Ok(server_tls(ca, cert, key, Vec::new())?.config)
}

/// The server's TLS: the one `ServerConfig`, and the revocation lists its client verifier
/// follows (reloaded in place: `revocation`).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// `None`: a configuration built elsewhere, without revocation.
    pub revocation: Option<Revocation>,
}

impl From<Arc<ServerConfig>> for ServerTls {
    fn from(config: Arc<ServerConfig>) -> Self {
        ServerTls {
            config,
            revocation: None,
        }
    }
}

/// [`server_config`] whose client verifier also checks the CRLs in `crls`
/// ([`Revocation`]): a bad or unreadable CRL is an error naming the file.
pub fn server_tls(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crls: Vec<CrlFile>,
) -> Result<ServerTls, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    let cas = load_certs(ca)?;
    for c in &cas {
        roots.add(c.clone()).map_err(|e| TlsSetupError::Ca {
            path: ca.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    let provider = Arc::new(listenscope_core::pem::tls13_provider());
    // Built once without CRLs first: a CA that cannot verify anything is named as the CA's
    // problem, not a CRL's.
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), Arc::clone(&provider))
        .build()
        .map_err(|e| TlsSetupError::Ca {
            path: ca.to_path_buf(),
            detail: e.to_string(),
        })?;
    let revocation = Revocation::load(roots, cas, Arc::clone(&provider), crls)
        .map_err(TlsSetupError::Revocation)?;
    let (certs, key) = load_identity(cert, key)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(revocation.verifier())
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls {
        config: Arc::new(cfg),
        revocation: Some(revocation),
    })
}

/// Why a TLS handshake was refused: its metric label (`reason`) and what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoCertificate,
    UnknownCa,
    Expired,
    NotYetValid,
    BadCertificate,
    /// The client refused *our* certificate (it sent an alert): an agent whose CA file or
    /// server name does not match this collector.
    ServerCertificateRefused,
    /// The client offered no TLS 1.3.
    ProtocolVersion,
    /// The certificate is valid but names no host (no DNS SAN or CN, or a name that is not
    /// a host name, such as a wildcard): refused at the first call, PERMISSION_DENIED.
    HostName,
    Handshake,
    Timeout,
    /// The client certificate is on the collector's CRL: refused in the handshake (the
    /// client gets a `certificate_revoked` alert), or its live session ended on a reload
    /// (PERMISSION_DENIED).
    Revoked,
    /// A second agent with another instance id while one holds the host's session with
    /// the same certificate: refused after its Hello (ALREADY_EXISTS), nothing stored.
    DuplicateIdentity,
    /// Its source (IPv4 address, IPv6 /64) already has its limit of connections in
    /// admission (`admission`): closed at once, before any TLS.
    SourceLimit,
    /// Every admission place it may use is taken: closed at once, before any TLS.
    HandshakeLimit,
    /// It had sent nothing yet when every place was taken: its place went to a newer
    /// connection.
    Displaced,
    /// Authenticated, but no HTTP/2 preface in time (or closed before it).
    NoPreface,
    /// Authenticated, but its first bytes are not HTTP/2.
    NotHttp2,
}

impl Refusal {
    const ALL: [Refusal; 17] = [
        Refusal::NoCertificate,
        Refusal::UnknownCa,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::BadCertificate,
        Refusal::ServerCertificateRefused,
        Refusal::ProtocolVersion,
        Refusal::HostName,
        Refusal::Handshake,
        Refusal::Timeout,
        Refusal::Revoked,
        Refusal::DuplicateIdentity,
        Refusal::SourceLimit,
        Refusal::HandshakeLimit,
        Refusal::Displaced,
        Refusal::NoPreface,
        Refusal::NotHttp2,
    ];

    /// Why `err` (from a TLS accept) happened.
    pub fn of(err: &std::io::Error) -> Refusal {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return Refusal::Handshake;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Refusal::NoCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Refusal::NotYetValid
                }
                // Another CA: unknown by name, or same name and a signature ours does not
                // make.
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Refusal::UnknownCa
                }
                CertificateError::Revoked => Refusal::Revoked,
                _ => Refusal::BadCertificate,
            },
            rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
                // A CA of the same name that did not sign our certificate (rustls sends it
                // for a bad signature in our chain).
                | AlertDescription::DecryptError,
            ) => Refusal::ServerCertificateRefused,
            rustls::Error::PeerIncompatible(
                PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled
                | PeerIncompatible::SupportedVersionsExtensionRequired,
            ) => Refusal::ProtocolVersion,
            _ => Refusal::Handshake,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::ServerCertificateRefused => "server_certificate_refused",
            Refusal::ProtocolVersion => "protocol_version",
            Refusal::HostName => "host_name",
            Refusal::Handshake => "handshake",
            Refusal::Timeout => "timeout",
            Refusal::Revoked => "revoked",
            Refusal::DuplicateIdentity => "duplicate_identity",
            Refusal::SourceLimit => "source_limit",
            Refusal::HandshakeLimit => "handshake_limit",
            Refusal::Displaced => "displaced",
            Refusal::NoPreface => "no_preface",
            Refusal::NotHttp2 => "not_http2",
        }
    }

    /// What the operator does about it.
    pub fn fix(self) -> &'static str {
        match self {
            Refusal::NoCertificate => {
                "the client sent no certificate: give the agent --tls-cert and --tls-key \
                 (`listenscope-collector certs issue --dir DIR --host NAME`)"
            }
            Refusal::UnknownCa => {
                "the client certificate is not signed by this collector's --tls-ca: issue the \
                 agent's certificate from that CA (`certs issue`), or give the collector the \
                 CA that signed it"
            }
            Refusal::Expired => {
                "the client certificate expired: issue a new one (`certs issue --host NAME \
                 --force`) and install it on the agent"
            }
            Refusal::NotYetValid => {
                "the client certificate is not valid yet: check the clocks of the agent's host \
                 and of this one"
            }
            Refusal::BadCertificate => {
                "the client certificate is unusable for an agent (see detail): issue one with \
                 `certs issue`"
            }
            Refusal::ServerCertificateRefused => {
                "the client does not accept this collector's certificate: give the agent the \
                 CA that signed --tls-cert as its --tls-ca, and a --server-name (or collector \
                 URL host) that the certificate names (`certs init --server-name`)"
            }
            Refusal::ProtocolVersion => {
                "the client does not speak TLS 1.3, the only version this collector accepts: \
                 upgrade the agent, or the TLS library of whatever client this is"
            }
            Refusal::HostName => {
                "the client certificate names no host (its DNS SAN, else CN, must be a host \
                 name: letters, digits, '-', '_' in dot-separated labels): issue the agent's \
                 certificate with `listenscope-collector certs issue --host NAME`"
            }
            Refusal::Handshake => {
                "the TLS handshake failed (see detail): is the client an agent speaking TLS \
                 to this port?"
            }
            Refusal::Timeout => {
                "the client did not finish its TLS handshake in time: a slow or lossy network, \
                 or not a TLS client"
            }
            Refusal::Revoked => {
                "the client certificate is revoked (the CRL lists it): nothing to do if that \
                 host's certificate was stolen or retired; a legitimate agent needs a new \
                 certificate (`certs issue --host NAME --force`)"
            }
            Refusal::DuplicateIdentity => {
                "two machines use the same agent certificate: issue each its own \
                 (`certs issue --host NAME`); if one is a stolen copy, revoke it \
                 (`certs revoke`) and issue the real host a new one"
            }
            Refusal::SourceLimit => {
                "this address (IPv6: its /64) holds too many connections that have not \
                 finished TLS: a flood from it, or many agents behind one NAT address \
                 reconnecting at once (raise --max-unauthenticated-per-source)"
            }
            Refusal::HandshakeLimit => {
                "too many connections are in their TLS handshake: a flood from many \
                 addresses (agents that connected before still get in through \
                 --reserved-handshakes), or a fleet reconnecting at once (raise \
                 --max-handshakes)"
            }
            Refusal::Displaced => {
                "the client had sent nothing while every handshake place was taken, and a \
                 newer connection took its place: a flood of silent connections (raise \
                 --max-handshakes if agents are among them)"
            }
            Refusal::NoPreface => {
                "the client finished TLS with a valid certificate but did not start HTTP/2 \
                 (gRPC) in time: a stuck or hostile client holding that certificate"
            }
            Refusal::NotHttp2 => {
                "the client finished TLS with a valid certificate but does not speak HTTP/2: \
                 point only agents (gRPC) at this port"
            }
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why a handshake failed, as a metric label.
pub fn reject_reason(err: &std::io::Error) -> &'static str {
    Refusal::of(err).label()
}

/// Logs a repeated event at most once per interval, with the count in between.
#[derive(Debug, Default)]
pub(crate) struct RateLimited {
    /// Milliseconds since `start` of the last line logged (0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
    start: std::sync::OnceLock<std::time::Instant>,
}

impl RateLimited {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(n)`: log now, `n` events were not logged since the last line.
    pub(crate) fn hit(&self) -> Option<u64> {
        let start = self.start.get_or_init(std::time::Instant::now);
        let now = start.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now - last < Self::EVERY.as_millis() as u64 {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Refused connections: one log line per reason and interval (a fleet rolled out with
/// the wrong CA must not flood the log), every one counted. Shared by the accept loop
/// (handshake refusals) and the service (certificates that name no host).
#[derive(Debug, Default)]
pub struct Refusals {
    lines: [RateLimited; Refusal::ALL.len()],
}

impl Refusals {
    /// Counts the refusal of `peer` (unknown: `None`), and logs it unless this reason was
    /// logged within the interval.
    pub(crate) fn refused(
        &self,
        peer: Option<SocketAddr>,
        refusal: Refusal,
        detail: &str,
        closed: bool,
    ) {
        metrics::counter!(m::REJECTED_CONNECTIONS, "reason" => refusal.label()).increment(1);
        // The peer is formatted only for a line that is written: a flood refuses
        // thousands a second.
        let peer = DisplayPeer(peer);
        if closed && matches!(refusal, Refusal::Handshake | Refusal::NoPreface) {
            // Closed by the client: a TCP probe or a port scan, not an agent (or an agent
            // that gave up: it says why in its own log).
            tracing::debug!(%peer, reason = refusal.label(), detail, "Connection closed by the client.");
            return;
        }
        if let Some(more) = self.lines[refusal.index()].hit() {
            tracing::warn!(
                %peer,
                reason = refusal.label(),
                detail,
                fix = refusal.fix(),
                refused_since_last_line = more,
                "Connection refused."
            );
        }
    }
}

struct DisplayPeer(Option<SocketAddr>);

impl std::fmt::Display for DisplayPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(p) => p.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// A connection as the gRPC server gets it: TLS done, HTTP/2 preface read (and replayed).
pub type Admitted = Prefaced<TlsStream<TcpStream>>;

/// Accepts TCP connections and admits them (`admission`: per-source limit, handshake
/// places with a reserve for known sources, handshake and HTTP/2 preface deadlines), and
/// yields the connections that authenticated and started HTTP/2. The loop itself never
/// waits for anything but `accept`: a connection over a limit is closed at once, a
/// handshake runs in its own task. Every refusal is counted; logs are rate-limited.
pub fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    refusals: Arc<Refusals>,
    limits: AdmissionLimits,
) -> mpsc::Receiver<Result<Admitted, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let admission = Admission::new(limits);
    let accept_failed = RateLimited::default();
    tokio::spawn(async move {
        let mut accepted = 0u32;
        loop {
            // A flood keeps `accept` ready: let the handshake tasks this loop spawned run
            // (a task marks its connection as having spoken; until then a newer
            // connection may displace it).
            accepted = accepted.wrapping_add(1);
            if accepted.is_multiple_of(16) {
                tokio::task::yield_now().await;
            }
            // The server stopping closes the channel: the listening socket is closed
            // then, not at the next connection (quickstart goes on serving its UI).
            let next = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match next {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    if let Some(more) = accept_failed.hit() {
                        tracing::error!(
                            error = %e,
                            failed_since_last_line = more,
                            "Accepting a connection failed."
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return; // the server stopped
            }
            let ticket = match admission.admit(peer.ip()) {
                Ok(t) => t,
                Err(refused) => {
                    // A reset, not a FIN: no TIME_WAIT left behind for each of a flood.
                    let _ = tcp.set_zero_linger();
                    drop(tcp);
                    let (refusal, detail) = match refused {
                        admission::Refused::SourceLimit => (
                            Refusal::SourceLimit,
                            "its source is at --max-unauthenticated-per-source",
                        ),
                        admission::Refused::HandshakeLimit => (
                            Refusal::HandshakeLimit,
                            "no admission place free (--max-handshakes, and \
                             --reserved-handshakes for known sources)",
                        ),
                    };
                    refusals.refused(Some(peer), refusal, detail, false);
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refusals = Arc::clone(&refusals);
            let admission = Arc::clone(&admission);
            tokio::spawn(async move {
                let limits = &admission.limits;
                let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
                let timed_out = || {
                    refusals.refused(
                        Some(peer),
                        Refusal::Timeout,
                        &format!(
                            "no TLS handshake within {} s",
                            limits.handshake_timeout.as_secs_f32()
                        ),
                        false,
                    );
                };
                // Silent until the first bytes arrive: its place may go to a newer
                // connection meanwhile (`Admission::admit`).
                // `peek`, not `readable`: readiness may be a false positive; a byte is not.
                let mut byte = [0u8; 1];
                let first = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        r = tcp.peek(&mut byte) => Some(r),
                        () = ticket.displaced() => None,
                    }
                })
                .await;
                match first {
                    // A byte, or the end (then the handshake fails and says so).
                    Ok(Some(Ok(_))) => ticket.spoke(),
                    Ok(Some(Err(e))) => {
                        refusals.refused(Some(peer), Refusal::Handshake, &e.to_string(), true);
                        return;
                    }
                    Ok(None) => {
                        let _ = tcp.set_zero_linger();
                        drop(tcp);
                        refusals.refused(
                            Some(peer),
                            Refusal::Displaced,
                            "silent while every place was taken",
                            false,
                        );
                        return;
                    }
                    Err(_) => {
                        timed_out();
                        return;
                    }
                }
                let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        refusals.refused(
                            Some(peer),
                            Refusal::of(&e),
                            &e.to_string(),
                            e.kind() == std::io::ErrorKind::UnexpectedEof,
                        );
                        return;
                    }
                    Err(_) => {
                        timed_out();
                        return;
                    }
                };
                // The handshake verified a client certificate of our CA.
                admission.authenticated(peer.ip());
                match admission::read_preface(&mut tls, limits.preface_timeout).await {
                    Ok(preface) => {
                        // Handed on: the connection leaves admission.
                        drop(ticket);
                        let _ = tx.send(Ok(Prefaced::new(tls, preface))).await;
                    }
                    Err(e) => {
                        let closed = matches!(e, PrefaceError::Closed { .. });
                        let refusal = match e {
                            PrefaceError::NotHttp2 => Refusal::NotHttp2,
                            _ => Refusal::NoPreface,
                        };
                        if !closed {
                            let _ = tls.get_ref().0.set_zero_linger();
                        }
                        refusals.refused(Some(peer), refusal, &e.to_string(), closed);
                    }
                }
            });
        }
    });
    rx
}

/// Why a verified client certificate does not give a host identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("the client certificate names no host (no DNS SAN, no CN)")]
    NoName,
    #[error("the client certificate's name {0:?} is not a host name")]
    NotAHostName(String),
}

impl IdentityError {
    /// How it is counted and logged.
    pub fn refusal(&self) -> Refusal {
        match self {
            IdentityError::NoCertificate => Refusal::NoCertificate,
            IdentityError::NoName | IdentityError::NotAHostName(_) => Refusal::HostName,
        }
    }
}

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Status {
        match e {
            IdentityError::NoCertificate => Status::unauthenticated(e.to_string()),
            IdentityError::NoName | IdentityError::NotAHostName(_) => {
                Status::permission_denied(e.to_string())
            }
        }
    }
}

/// The host name a session writes as: the client certificate's DNS SAN, else its CN, in
/// its canonical form ([`canonical_host_name`]). Nothing the agent says in its messages
/// can change it.
pub fn host_of<T>(req: &tonic::Request<T>) -> Result<String, IdentityError> {
    let certs = req.peer_certs().ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
    let name = identity_of(leaf).ok_or(IdentityError::NoName)?;
    canonical_host_name(&name).ok_or(IdentityError::NotAHostName(name))
}

/// The one spelling of a host identity: DNS names are case-insensitive and a fully
/// qualified `web-01.example.net.` is `web-01.example.net`, so `WEB-01.Example.NET.` and
/// `web-01.example.net` are one host. Lower case, one trailing dot removed, then it must
/// be a [`valid_host_name`]; `None` when it is not (a wildcard, an empty label, `a..`).
///
/// Canonicalised rather than refused: a certificate issued for the FQDN with its root
/// dot, or in the case the inventory system uses, is a legitimate agent.
pub fn canonical_host_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    valid_host_name(&name).then_some(name)
}

/// 1–253 bytes of dot-separated labels, each non-empty and made of letters, digits, `-`
/// and `_` (no leading, trailing or doubled dot).
pub fn valid_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert!(valid_host_name("web-01.example.net"));
        assert!(valid_host_name("h1"));
        assert!(!valid_host_name(""));
        assert!(!valid_host_name("a b"));
        assert!(!valid_host_name("x/../y"));
        assert!(!valid_host_name(&"a".repeat(254)));
        assert!(!valid_host_name("*.example.net"));
        assert!(!valid_host_name("a..b"));
        assert!(!valid_host_name(".a"));
        assert!(
            !valid_host_name("a."),
            "canonical names carry no trailing dot"
        );
    }

    #[test]
    fn canonical_names() {
        let check = |name: &str, want: Option<&str>| {
            assert_eq!(canonical_host_name(name).as_deref(), want, "{name:?}");
        };
        check("web-01.example.net", Some("web-01.example.net"));
        check("WEB-01.Example.NET.", Some("web-01.example.net"));
        check("victim-host.", Some("victim-host"));
        check("H1", Some("h1"));
        // One root dot only: `a..` would otherwise be a third spelling of `a`.
        check("a..", None);
        check(".", None);
        check("", None);
        check("*.example.net", None);
        check("b\u{e4}r.example", None);
    }

    #[test]
    fn reasons() {
        let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            reject_reason(&wrap(rustls::Error::NoCertificatesPresented)),
            "no_certificate"
        );
        assert_eq!(
            reject_reason(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))),
            "unknown_ca"
        );
        assert_eq!(
            reject_reason(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::Expired
            ))),
            "expired"
        );
        assert_eq!(
            reject_reason(&wrap(rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
            ))),
            "server_certificate_refused"
        );
        assert_eq!(
            reject_reason(&wrap(rustls::Error::PeerIncompatible(
                PeerIncompatible::Tls12NotOfferedOrEnabled
            ))),
            "protocol_version"
        );
        assert_eq!(reject_reason(&std::io::Error::other("eof")), "handshake");
        // Every reason is a documented label value.
        for r in Refusal::ALL {
            assert!(m::REJECT_REASONS.contains(&r.label()), "{r:?}");
        }
    }
}
