//! Why a connection to a collector failed, named from the error itself and said once, with
//! the fix.
//!
//! tonic reports every failure to connect as "transport error", and a refused client
//! certificate as hyper's debug text. The cause is in the error's `source()` chain: an
//! `io::Error` kind (refused, unreachable, timed out), or a `rustls::Error` wrapped in an
//! `io::Error` (whose `source()` skips it: it is reached through `get_ref()`). [`classify`]
//! walks that chain once and returns the first cause it knows. Name resolution is done
//! before connecting ([`resolve`]), so a DNS failure is known for what it is instead of
//! being recognised by hyper's message text.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use rustls::{AlertDescription, CertificateError};

/// One connection failure, as an operator reads it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "connection refused: nothing listens at {addr}; is the collector running, and is this \
         the port it serves on (`listenscope-collector serve --listen`)?"
    )]
    Refused { addr: String },
    #[error(
        "{addr} is unreachable ({detail}): check the address, and the routes and firewalls \
         between this host and the collector"
    )]
    Unreachable { addr: String, detail: String },
    #[error(
        "{host} does not resolve ({detail}): check the host name in the collector URL, or this host's DNS"
    )]
    Dns { host: String, detail: String },
    #[error(
        "no answer from {addr} within {}s ({stage}): a firewall may drop the traffic, or \
         something other than a collector listens there",
        timeout.as_secs()
    )]
    Timeout {
        addr: String,
        stage: &'static str,
        timeout: Duration,
    },
    #[error(
        "the collector's certificate is not signed by the CA in {}: is it the ca.pem that \
         `listenscope-collector certs init` wrote with the collector's server.pem?",
        ca.display()
    )]
    UntrustedCollector { ca: PathBuf },
    #[error(
        "the collector's certificate is not valid for {name:?}{presented}: use one of its names \
         in the collector URL (or --server-name), or re-issue it with \
         `listenscope-collector certs init --server-name {name} --force`"
    )]
    NameMismatch { name: String, presented: String },
    #[error(
        "the collector's certificate {what}: renew it with `listenscope-collector certs init` \
         on the collector (or check this host's clock)"
    )]
    CollectorCertificateTime { what: &'static str },
    #[error(
        "the collector refused this host's certificate {} (TLS alert {alert}): it is not \
         signed by the collector's CA, or it expired; issue a new one with \
         `listenscope-collector certs issue --dir DIR --host NAME` from the collector's CA",
        cert.display()
    )]
    ClientCertificateRefused { cert: PathBuf, alert: String },
    #[error(
        "{addr} does not speak TLS ({detail}): is this the collector's gRPC port, not its \
         metrics port or another service?"
    )]
    NotTls { addr: String, detail: String },
    #[error("{addr} is not a gRPC collector ({detail}): check the port in the collector URL")]
    NotGrpc { addr: String, detail: String },
    #[error("TLS with {addr} failed: {detail}")]
    Tls { addr: String, detail: String },
    #[error(
        "{addr} closed the connection during the TLS handshake ({detail}): a collector closes \
         it when it refuses this host's certificate or is at its session limit; see its log"
    )]
    ClosedInHandshake { addr: String, detail: String },
    #[error("{addr}: {detail}")]
    Other { addr: String, detail: String },
}

/// What [`classify`] needs to know besides the error.
#[derive(Debug, Clone)]
pub struct Context {
    /// `HOST:PORT` of the collector URL.
    pub addr: String,
    /// The name checked in the collector's certificate.
    pub server_name: String,
    /// `--tls-ca` and `--tls-cert`, named by the fixes.
    pub ca: PathBuf,
    pub cert: PathBuf,
}

/// The first cause found in `err`'s chain; `Other` with the chain's own words when none is.
pub fn classify(err: &(dyn StdError + 'static), cx: &Context) -> ConnectError {
    let addr = cx.addr.clone();
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(found) = rustls_cause(e, cx) {
            return found;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(found) = io.get_ref().and_then(|inner| rustls_cause(inner, cx)) {
                return found;
            }
            if let Some(found) = io_cause(io, cx) {
                return found;
            }
        }
        next = e.source();
    }
    ConnectError::Other {
        addr,
        detail: chain_text(err),
    }
}

/// The cause of a failed call (Hello): a refused client certificate surfaces here with TLS
/// 1.3, as the server's alert on the first read. `None`: the status is the collector's own
/// answer, with nothing below it.
pub fn classify_status(status: &tonic::Status, cx: &Context) -> Option<ConnectError> {
    let source = status.source()?;
    Some(classify(source, cx))
}

fn rustls_cause(e: &(dyn StdError + 'static), cx: &Context) -> Option<ConnectError> {
    let e = e.downcast_ref::<rustls::Error>()?;
    let addr = cx.addr.clone();
    Some(match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                ConnectError::UntrustedCollector { ca: cx.ca.clone() }
            }
            CertificateError::NotValidForName => ConnectError::NameMismatch {
                name: cx.server_name.clone(),
                presented: String::new(),
            },
            CertificateError::NotValidForNameContext { presented, .. } => {
                ConnectError::NameMismatch {
                    name: cx.server_name.clone(),
                    presented: format!(
                        " (it names {})",
                        presented
                            .iter()
                            .map(|p| plain_name(p))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                ConnectError::CollectorCertificateTime { what: "expired" }
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                ConnectError::CollectorCertificateTime {
                    what: "is not valid yet",
                }
            }
            other => ConnectError::Tls {
                addr,
                detail: format!("the collector's certificate is unusable: {other:?}"),
            },
        },
        rustls::Error::AlertReceived(alert) if refuses_certificate(*alert) => {
            ConnectError::ClientCertificateRefused {
                cert: cx.cert.clone(),
                alert: format!("{alert:?}"),
            }
        }
        rustls::Error::AlertReceived(alert) => ConnectError::Tls {
            addr,
            detail: format!("the collector ended the handshake with alert {alert:?}"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            ConnectError::NotTls {
                addr,
                detail: e.to_string(),
            }
        }
        rustls::Error::NoApplicationProtocol => ConnectError::NotGrpc {
            addr,
            detail: "it offers no HTTP/2 (ALPN h2)".into(),
        },
        other => ConnectError::Tls {
            addr,
            detail: other.to_string(),
        },
    })
}

/// `DnsName("a")` / `IpAddress(…)` as rustls presents a certificate's names → `a`.
fn plain_name(presented: &str) -> String {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .map_or_else(|| presented.to_string(), str::to_string)
}

/// Alerts a server sends when it does not accept the client's certificate, by their
/// rustls names (what `{:?}` and rustls's "received fatal alert: NAME" print).
const REFUSAL_ALERTS: &[&str] = &[
    "UnknownCA",
    "BadCertificate",
    "CertificateExpired",
    "CertificateRevoked",
    "CertificateUnknown",
    "UnsupportedCertificate",
    "CertificateRequired",
    "AccessDenied",
];

fn refuses_certificate(a: AlertDescription) -> bool {
    REFUSAL_ALERTS.contains(&format!("{a:?}").as_str())
}

fn io_cause(e: &io::Error, cx: &Context) -> Option<ConnectError> {
    let addr = cx.addr.clone();
    // h2 keeps only the kind and the text of an I/O error: a TLS alert received on the
    // first read (TLS 1.3 client certificate refusal) reaches us as rustls's words.
    if e.kind() == io::ErrorKind::InvalidData
        && let Some(alert) = e.to_string().strip_prefix("received fatal alert: ")
    {
        let alert = alert.trim().to_string();
        return Some(if REFUSAL_ALERTS.contains(&alert.as_str()) {
            ConnectError::ClientCertificateRefused {
                cert: cx.cert.clone(),
                alert,
            }
        } else {
            ConnectError::Tls {
                addr,
                detail: format!("the collector ended the handshake with alert {alert}"),
            }
        });
    }
    Some(match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectError::Refused { addr },
        io::ErrorKind::HostUnreachable => ConnectError::Unreachable {
            addr,
            detail: "no route to host".into(),
        },
        io::ErrorKind::NetworkUnreachable => ConnectError::Unreachable {
            addr,
            detail: "network unreachable".into(),
        },
        io::ErrorKind::AddrNotAvailable => ConnectError::Unreachable {
            addr,
            detail: "no local address to reach it from".into(),
        },
        io::ErrorKind::TimedOut => ConnectError::Timeout {
            addr,
            stage: "TCP connect",
            timeout: CONNECT_TIMEOUT,
        },
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => ConnectError::ClosedInHandshake {
            addr,
            detail: e.to_string(),
        },
        _ => return None,
    })
}

/// The words of every error in the chain, each once (wrappers often repeat their source).
pub fn chain_text(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// How long one connection (resolve, TCP, TLS, HTTP/2) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves `host` (a name; IP literals need no lookup) before connecting, so a DNS
/// failure is reported as one.
pub async fn resolve(host: &str, port: u16) -> Result<(), ConnectError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let dns = |detail: String| ConnectError::Dns {
        host: host.to_string(),
        detail,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((bare, port))).await {
        Err(_) => Err(dns(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(dns(e.to_string())),
        Ok(Ok(mut addrs)) => match addrs.next() {
            Some(_) => Ok(()),
            None => Err(dns("no address".into())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context {
        Context {
            addr: "c:7443".into(),
            server_name: "c".into(),
            ca: "/ca.pem".into(),
            cert: "/h.pem".into(),
        }
    }

    /// An `io::Error` wrapping `inner`, as tokio-rustls and hyper hand it up.
    fn wrapped(inner: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, inner)
    }

    #[track_caller]
    fn check(err: &(dyn StdError + 'static), expected: &str) {
        let got = classify(err, &cx()).to_string();
        assert!(got.contains(expected), "{got:?} lacks {expected:?}");
    }

    #[test]
    fn causes_are_found_below_wrappers() {
        check(
            &io::Error::from(io::ErrorKind::ConnectionRefused),
            "connection refused: nothing listens at c:7443",
        );
        check(
            &io::Error::from(io::ErrorKind::HostUnreachable),
            "c:7443 is unreachable (no route to host)",
        );
        check(
            &io::Error::from(io::ErrorKind::NetworkUnreachable),
            "(network unreachable)",
        );
        check(
            &wrapped(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
            "not signed by the CA in /ca.pem",
        );
        check(
            &wrapped(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
            "not valid for \"c\": use one of its names",
        );
        check(
            &wrapped(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
            "refused this host's certificate /h.pem (TLS alert UnknownCA)",
        );
        check(
            &wrapped(rustls::Error::AlertReceived(
                AlertDescription::HandshakeFailure,
            )),
            "ended the handshake with alert HandshakeFailure",
        );
        check(
            &wrapped(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            )),
            "does not speak TLS",
        );
        // What h2 leaves of the same alert: the kind and rustls's words.
        check(
            &io::Error::new(
                io::ErrorKind::InvalidData,
                "received fatal alert: CertificateExpired",
            ),
            "refused this host's certificate /h.pem (TLS alert CertificateExpired)",
        );
        check(&io::Error::other("odd"), "c:7443: odd");
    }

    #[test]
    fn chain_text_says_each_part_once() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "connect failed: {}", self.0)
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(io::Error::other("boom"));
        assert_eq!(chain_text(&e), "connect failed: boom");
    }
}
