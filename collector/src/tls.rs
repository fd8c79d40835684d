//! The collector's side of mutual TLS: a rustls server configuration that requires a
//! client certificate from our CA, a TLS accept loop that counts refused connections by
//! reason (tonic's built-in TLS cannot), and the host identity of an accepted session.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use listenscope_core::pem::{TlsFileError, identity_of, load_certs, load_identity};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::Status;

use crate::metrics as m;

/// A slow or silent client gets this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait (bounded, not unbounded tasks).
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    File(#[from] TlsFileError),
    #[error("{}: not usable as a CA: {detail}", path.display())]
    Ca {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Server configuration: our certificate, client certificates required and verified
/// against `ca`, ALPN h2 (gRPC).
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsSetupError::Ca {
            path: ca.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsSetupError::Ca {
                path: ca.to_path_buf(),
                detail: e.to_string(),
            })?;
    let (certs, key) = load_identity(cert, key)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Why a handshake failed, as a metric label.
pub fn reject_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "handshake";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            // Another CA: unknown by name, or same name and a signature ours does not make.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            _ => "bad_certificate",
        },
        _ => "handshake",
    }
}

/// Accepts TCP connections, runs TLS handshakes concurrently (bounded), and yields the
/// established streams. Refused handshakes are counted and logged, never yielded.
pub fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(error = %e, "Accepting a connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            if tx.is_closed() {
                return; // the server stopped
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => refused(peer, reject_reason(&e), &e.to_string()),
                    Err(_) => refused(peer, "timeout", "handshake took too long"),
                }
            });
        }
    });
    rx
}

fn refused(peer: SocketAddr, reason: &'static str, detail: &str) {
    metrics::counter!(m::REJECTED_CONNECTIONS, "reason" => reason).increment(1);
    tracing::warn!(%peer, reason, detail, "Connection refused.");
}

/// The host name a session writes as: the client certificate's DNS SAN, else its CN.
/// Nothing the agent says in its messages can change it.
pub fn host_of<T>(req: &tonic::Request<T>) -> Result<String, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let name = identity_of(leaf).ok_or_else(|| {
        Status::permission_denied("the client certificate names no host (no DNS SAN, no CN)")
    })?;
    if !valid_host_name(&name) {
        return Err(Status::permission_denied(format!(
            "the client certificate's name {name:?} is not a host name"
        )));
    }
    // DNS names are case-insensitive: WEB01 and web01 are one host.
    Ok(name.to_ascii_lowercase())
}

/// Letters, digits, `-`, `_`, `.`; 1–253 bytes.
pub fn valid_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
        assert_eq!(reject_reason(&std::io::Error::other("eof")), "handshake");
    }
}
