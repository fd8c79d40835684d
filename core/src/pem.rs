//! Loading and checking the PEM files of mutual TLS, shared by agent and collector.
//!
//! Every error names the file, what is wrong with it and how to fix it: a missing,
//! expired, not-yet-valid or mismatched certificate is the most common way a fleet
//! rollout fails, and "handshake failure" from deep inside TLS helps nobody.

use std::io;
use std::path::{Path, PathBuf};

use ::time::OffsetDateTime;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{GeneralName, parse_x509_certificate};

const ISSUE_HINT: &str = "create one with `listenscope-collector certs issue --dir DIR --host NAME` \
                          (or `certs init` for the CA and server certificate)";

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{}: cannot read it: {source}; {}", path.display(), read_hint(source))]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----); is it the key file?",
        path.display()
    )]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key in it (expected -----BEGIN PRIVATE KEY-----)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: not a valid X.509 certificate: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{}: the certificate expired on {not_after}; {ISSUE_HINT}", path.display())]
    Expired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
    #[error(
        "{}: the certificate is not valid before {not_before}: check this machine's clock",
        path.display()
    )]
    NotYetValid {
        path: PathBuf,
        not_before: OffsetDateTime,
    },
    #[error(
        "{}: this private key does not belong to the certificate {} (files from different \
         `certs issue` runs?)",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: unusable private key: {detail}", path.display())]
    BadKey { path: PathBuf, detail: String },
    #[error(
        "{}: private key open to {who} (mode {mode:04o}); restrict it with `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyMode {
        path: PathBuf,
        mode: u32,
        /// "other users", or "its group" (allowed, read only, when root owns the file).
        who: &'static str,
    },
    #[error(
        "{}: private key owned by uid {owner}, neither root nor the user running this \
         program (uid {euid}), who could replace it; `chown {euid} {}` (or root)",
        path.display(),
        path.display()
    )]
    KeyOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
}

/// The fix for a file that cannot be read, by cause.
fn read_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => ISSUE_HINT,
        io::ErrorKind::PermissionDenied => {
            "run as a user who may read it, or give that user access (e.g. `chgrp listenscope \
             FILE && chmod 640 FILE` with root as the owner)"
        }
        io::ErrorKind::IsADirectory => "give the path of the PEM file, not of its directory",
        _ => "check the path and the disk",
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// All certificates in a PEM file (a chain or a CA bundle), leaf first.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsFileError::BadCertificate {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    for c in &certs {
        check_validity(path, c, OffsetDateTime::now_utc())?;
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1), refused when others may read
/// or replace it (see [`check_key_access`]).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let pem = read_key_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsFileError::NoKey {
        path: path.to_path_buf(),
    })
}

/// Opens the key file once, checks who may read it on that open file (no window between
/// the check and the read), then reads it.
fn read_key_file(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let err = |source| TlsFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    check_key_access(path, meta.mode(), meta.uid(), effective_uid())?;
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(err)?;
    Ok(pem)
}

/// PostgreSQL's rule for its server key, for the same reasons:
/// - no permission at all for other users;
/// - group read only when root owns the file: that is how Kubernetes hands a secret to a
///   non-root container (`fsGroup`: root-owned, mode 0440), and how a packaged service is
///   given a key it must not be able to change (root:listenscope 0640);
/// - owned by root or by the user running the program (`euid`; `None`: unknown, not
///   checked). Anyone else who owns it could swap in a key of their own.
///
/// Rejected alternative: ssh's stricter "no group bits at all", which refuses the
/// Kubernetes secret volume the collector's manifest uses.
pub fn check_key_access(
    path: &Path,
    mode: u32,
    owner: u32,
    euid: Option<u32>,
) -> Result<(), TlsFileError> {
    let mode = mode & 0o7777;
    let refuse = |who| TlsFileError::KeyMode {
        path: path.to_path_buf(),
        mode,
        who,
    };
    if mode & 0o007 != 0 {
        return Err(refuse("other users"));
    }
    if mode & 0o070 != 0 && (owner != 0 || mode & 0o030 != 0) {
        return Err(refuse("its group"));
    }
    if let Some(euid) = euid
        && owner != 0
        && owner != euid
    {
        return Err(TlsFileError::KeyOwner {
            path: path.to_path_buf(),
            owner,
            euid,
        });
    }
    Ok(())
}

/// The effective uid of this process, from `/proc/self/status` (this crate has no libc
/// binding; the second `Uid:` field is the effective one).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A certificate chain and its key, checked to belong together.
pub fn load_identity(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsFileError> {
    let certs = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsFileError::BadKey {
            path: key_path.to_path_buf(),
            detail: e.to_string(),
        })?;
    rustls::sign::CertifiedKey::new(certs.clone(), signer)
        .keys_match()
        .map_err(|_| TlsFileError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        })?;
    Ok((certs, key))
}

fn check_validity(
    path: &Path,
    der: &CertificateDer<'_>,
    now: OffsetDateTime,
) -> Result<(), TlsFileError> {
    let (_, cert) = parse_x509_certificate(der).map_err(|e| TlsFileError::BadCertificate {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let v = cert.validity();
    if v.not_after.to_datetime() < now {
        return Err(TlsFileError::Expired {
            path: path.to_path_buf(),
            not_after: v.not_after.to_datetime(),
        });
    }
    if v.not_before.to_datetime() > now {
        return Err(TlsFileError::NotYetValid {
            path: path.to_path_buf(),
            not_before: v.not_before.to_datetime(),
        });
    }
    Ok(())
}

/// The identity a certificate names: its first DNS subject alternative name, else its
/// subject common name.
pub fn identity_of(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                return Some(dns.to_string());
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Expiry of a certificate, for logs and reports.
pub fn not_after(der: &CertificateDer<'_>) -> Option<OffsetDateTime> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

/// Installs [`tls13_provider`] as the process default; rustls panics when it cannot tell
/// which provider to use. Call first thing in `main`.
///
/// The agent's TLS client is tonic's, which builds its rustls configuration from the
/// process default provider with rustls' default versions (1.2 and 1.3) and offers no
/// way to choose them: a provider without TLS 1.2 cipher suites is how the agent offers
/// TLS 1.3 only (rustls offers a version only if a suite of it is there). PostgreSQL
/// connections (sqlx) pick their own provider and are not affected.
pub fn install_crypto_provider() {
    let _ = tls13_provider().install_default();
}

/// The ring provider with its TLS 1.3 cipher suites only: the protocol is TLS 1.3
/// (docs/protocol.md), on both sides.
pub fn tls13_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)));
    provider
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TLS 1.3 suites only, and some: a client built on it offers TLS 1.3 and nothing
    /// else (the handshakes are tested in the agent's transport and the collector's tests).
    #[test]
    fn the_provider_speaks_tls13_only() {
        let p = tls13_provider();
        assert!(!p.cipher_suites.is_empty());
        for s in &p.cipher_suites {
            assert_eq!(s.version(), &rustls::version::TLS13, "{s:?}");
        }
    }

    /// `check_key_access(mode, owner, euid)`: `None` accepted, else the error's words.
    #[track_caller]
    fn check(mode: u32, owner: u32, euid: Option<u32>, expected: Option<&str>) {
        let got = check_key_access(Path::new("/k.key"), mode, owner, euid)
            .err()
            .map(|e| e.to_string());
        match (got, expected) {
            (None, None) => {}
            (Some(e), Some(want)) => assert!(e.contains(want), "{mode:o}: {e}"),
            (got, want) => {
                panic!("mode {mode:o} owner {owner} euid {euid:?}: {got:?}, want {want:?}")
            }
        }
    }

    #[test]
    fn key_access() {
        let other = Some("open to other users (mode 0644); restrict it with `chmod 600 /k.key`");
        // Regular-file type bits are ignored; the permission bits decide.
        check(0o100600, 0, Some(0), None);
        check(0o100400, 1000, Some(1000), None);
        check(0o100644, 0, Some(0), other);
        check(0o100604, 0, Some(0), Some("other users (mode 0604)"));
        check(0o100601, 0, Some(0), Some("other users (mode 0601)"));
        // Group read: only when root owns it (Kubernetes fsGroup secrets, root:service 0640).
        check(0o100640, 0, Some(65532), None);
        check(0o100440, 0, Some(65532), None);
        check(0o100640, 1000, Some(1000), Some("its group (mode 0640)"));
        check(0o100660, 0, Some(0), Some("its group (mode 0660)"));
        // Owner: root or whoever runs the program.
        check(0o100600, 1000, Some(0), Some("owned by uid 1000"));
        check(0o100600, 1000, Some(1001), Some("`chown 1001 /k.key`"));
        check(0o100600, 1000, None, None);
    }

    #[test]
    fn key_files_are_checked_where_they_are_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("listenscope-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("h.key");
        std::fs::write(&key, "not a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = load_key(&key).unwrap_err().to_string();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let closed = load_key(&key).unwrap_err().to_string();
        let missing = load_key(&dir.join("nope.key")).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            open.contains("mode 0644") && open.contains("chmod 600"),
            "{open}"
        );
        // Past the mode check, the content is judged.
        assert!(closed.contains("no PEM private key"), "{closed}");
        assert!(missing.contains("certs issue"), "{missing}");
        assert!(effective_uid().is_some());
    }
}
