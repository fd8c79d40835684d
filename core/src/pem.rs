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
    #[error("{}: cannot read it: {source}; {ISSUE_HINT}", path.display())]
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

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsFileError::NoKey {
        path: path.to_path_buf(),
    })
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

/// Installs the ring provider as the process default; rustls panics when it cannot tell
/// which provider to use. Call first thing in `main`.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
