//! `listenscope-collector certs`: a small private CA for the fleet.
//!
//! `init` creates the CA and the collector's server certificate; `issue` creates one
//! agent certificate per host (DNS SAN = host name, clientAuth). Private keys are written
//! with mode 0600 through a temporary file and a rename, so a crash never leaves half a
//! key. An existing CA is never replaced without `--force`: every agent certificate
//! depends on it.
//!
//! `revoke` adds a certificate to DIR/crl.pem, the CRL signed by the CA, keeping every
//! earlier entry and increasing the CRL number; `serve` reloads it by itself
//! (`revocation`). `revoked` lists its entries.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::tls::valid_host_name;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "{}: a CA already exists there; replacing it invalidates every agent certificate. \
         Pass --force to start over, or use `certs issue` to add hosts",
        path.display()
    )]
    CaExists { path: PathBuf },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{}: cannot read the CA ({detail}); run `listenscope-collector certs init --dir {}` first",
        path.display(),
        dir.display()
    )]
    NoCa {
        path: PathBuf,
        dir: PathBuf,
        detail: String,
    },
    #[error("{name:?} is not a valid host name (letters, digits, '-', '_', '.'; at most 253)")]
    BadName { name: String },
    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),
    #[error("--days 0: a certificate must be valid for at least 1 day (the default is 825)")]
    NoDays,
    #[error("--days {days}: at most {MAX_DAYS} (a century)")]
    TooManyDays { days: u32 },
    #[error(
        "--days {days} outlives the CA: {} expires {} UTC, in {max} days, and no certificate \
         it signs can be valid longer. Use --days {max} or less, or start a new CA \
         (`certs init --force`; every agent certificate must then be issued again)",
        ca.display(),
        crate::timefmt::format(*not_after)
    )]
    OutlivesCa {
        days: u32,
        ca: PathBuf,
        not_after: OffsetDateTime,
        max: i64,
    },
    /// The CA's certificate is expired or not yet valid (a whole message, not a chain).
    #[error("{0}")]
    CaUnusable(listenscope_core::pem::TlsFileError),
    #[error(
        "{} and {} already exist: host {host:?} has a certificate. Issuing again replaces its \
         key, and the agent keeps failing until it gets the new files. Pass --force to \
         replace them",
        cert.display(),
        key.display()
    )]
    HostExists {
        host: String,
        cert: PathBuf,
        key: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(
        "no certificate for host {host:?}: {} does not exist. `certs revoke` revokes the \
         certificate `certs issue` wrote there; for one whose file is gone, pass --serial HEX \
         (`openssl x509 -noout -serial -in FILE` prints it; the collector logs it with \
         refusals)",
        path.display()
    )]
    NoHost { host: String, path: PathBuf },
    #[error("{}: not a certificate of this CA ({detail})", path.display())]
    NotOurs { path: PathBuf, detail: String },
    #[error(
        "serial {serial}: no certificate of this CA in {} has it (its files may be gone); \
         check the number (`openssl x509 -noout -serial -in FILE`), or pass --force to \
         revoke it anyway",
        dir.display()
    )]
    UnknownSerial { serial: String, dir: PathBuf },
    #[error("--serial {0:?}: not a hexadecimal serial number (e.g. 4F:1A:09 or 4f1a09)")]
    BadSerial(String),
    #[error(
        "{}: {detail}; it is not a CRL of the CA in {} and is left alone: move it away to \
         start a new CRL",
        path.display(),
        ca.display()
    )]
    BadCrl {
        path: PathBuf,
        ca: PathBuf,
        detail: String,
    },
}

impl From<rcgen::Error> for RevokeError {
    fn from(e: rcgen::Error) -> Self {
        RevokeError::Pki(PkiError::Generate(e))
    }
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e)
    }
}

/// The longest validity `--days` accepts: a century, like every duration of the tools.
pub const MAX_DAYS: u32 = 36_500;

/// `days` is 1..=[`MAX_DAYS`].
fn check_days(days: u32) -> Result<(), PkiError> {
    match days {
        0 => Err(PkiError::NoDays),
        d if d > MAX_DAYS => Err(PkiError::TooManyDays { days }),
        _ => Ok(()),
    }
}

/// Files written by one command.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Writes `contents` to `path` atomically with `mode`.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that run a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

/// Creates DIR/ca.pem, ca.key, server.pem, server.key.
pub fn init(
    dir: &Path,
    server_names: &[String],
    days: u32,
    force: bool,
) -> Result<Written, PkiError> {
    check_days(days)?;
    let ca_pem = dir.join("ca.pem");
    if ca_pem.exists() && !force {
        return Err(PkiError::CaExists { path: ca_pem });
    }
    for n in server_names {
        if n.parse::<std::net::IpAddr>().is_err() && !valid_host_name(n) {
            return Err(PkiError::BadName { name: n.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(io(dir))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // A distinct name per CA: two fleets' CAs are never mistaken for each other. The
    // nanoseconds too: two CAs made in one second (a test, a script) had one name, and a
    // CRL is matched to its CA by name.
    let created = OffsetDateTime::now_utc();
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!(
            "listenscope fleet CA {}.{:09}",
            created.unix_timestamp(),
            created.nanosecond()
        ),
    );
    validity(&mut ca_params, days.max(3650));
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(server_names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        server_names.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let server_cert = params.signed_by(&server_key, &issuer)?;

    let files = vec![
        (dir.join("ca.key"), ca_key.serialize_pem(), 0o600),
        (ca_pem, ca_cert.pem(), 0o644),
        (dir.join("server.key"), server_key.serialize_pem(), 0o600),
        (dir.join("server.pem"), server_cert.pem(), 0o644),
    ];
    for (path, pem, mode) in &files {
        write_file(path, pem, *mode)?;
    }
    Ok(Written {
        files: files.into_iter().map(|f| f.0).collect(),
    })
}

/// The fleet CA, read once from DIR/ca.pem and DIR/ca.key, to issue host certificates in
/// memory: [`issue`] writes them to files, and a load generator keeps thousands of them
/// without touching the disk.
#[derive(Debug)]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// DIR/ca.pem, for errors.
    path: PathBuf,
    /// The CA certificate's end of validity: nothing it signs may outlive it.
    not_after: OffsetDateTime,
}

impl Ca {
    /// Reads DIR/ca.pem and DIR/ca.key.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let ca_pem_path = dir.join("ca.pem");
        let ca_key_path = dir.join("ca.key");
        let no_ca = |path: &Path, detail: String| PkiError::NoCa {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            detail,
        };
        let ca_pem =
            fs::read_to_string(&ca_pem_path).map_err(|e| no_ca(&ca_pem_path, e.to_string()))?;
        let ca_key_pem =
            fs::read_to_string(&ca_key_path).map_err(|e| no_ca(&ca_key_path, e.to_string()))?;
        let ca_key =
            KeyPair::from_pem(&ca_key_pem).map_err(|e| no_ca(&ca_key_path, e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .map_err(|e| no_ca(&ca_pem_path, e.to_string()))?;
        // Read once more through the shared loader: it refuses an expired CA and gives
        // its end of validity.
        let certs =
            listenscope_core::pem::load_certs(&ca_pem_path).map_err(PkiError::CaUnusable)?;
        let not_after = certs
            .first()
            .and_then(listenscope_core::pem::not_after)
            .ok_or_else(|| no_ca(&ca_pem_path, "no validity period in it".into()))?;
        Ok(Ca {
            issuer,
            path: ca_pem_path,
            not_after,
        })
    }

    /// `days` fits: at least one, and not past the CA's own expiry.
    fn check_days(&self, days: u32) -> Result<(), PkiError> {
        if days == 0 {
            return Err(PkiError::NoDays);
        }
        let max = (self.not_after - OffsetDateTime::now_utc()).whole_days();
        if i64::from(days) > max {
            return Err(PkiError::OutlivesCa {
                days,
                ca: self.path.clone(),
                not_after: self.not_after,
                max: max.max(0),
            });
        }
        Ok(())
    }

    /// A new key and a certificate for `host` (DNS SAN and CN = `host`, clientAuth), valid
    /// for `days`: (certificate PEM, private key PEM).
    pub fn issue_pem(&self, host: &str, days: u32) -> Result<(String, String), PkiError> {
        if !valid_host_name(host) {
            return Err(PkiError::BadName {
                name: host.to_string(),
            });
        }
        self.check_days(days)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, days);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Creates DIR/HOST.pem and DIR/HOST.key, signed by DIR/ca.pem + ca.key; refuses to
/// replace an existing host's files ([`issue_with`] with `force` does).
pub fn issue(dir: &Path, host: &str, days: u32) -> Result<Written, PkiError> {
    issue_with(dir, host, days, false)
}

/// [`issue`]; `force` replaces the host's existing certificate and key. The host is
/// written in its canonical form (`WEB-01.example.net.` → `web-01.example.net`), the name
/// the collector records, so files, certificate and fleet agree.
pub fn issue_with(dir: &Path, host: &str, days: u32, force: bool) -> Result<Written, PkiError> {
    let Some(host) =
        crate::tls::canonical_host_name(host).filter(|h| !matches!(h.as_str(), "ca" | "server"))
    else {
        return Err(PkiError::BadName {
            name: host.to_string(),
        });
    };
    let host = host.as_str();
    let key_path = dir.join(format!("{host}.key"));
    let cert_path = dir.join(format!("{host}.pem"));
    if !force && (key_path.exists() || cert_path.exists()) {
        return Err(PkiError::HostExists {
            host: host.to_string(),
            cert: cert_path,
            key: key_path,
        });
    }
    let (cert, key) = Ca::load(dir)?.issue_pem(host, days)?;
    write_file(&key_path, &key, 0o600)?;
    write_file(&cert_path, &cert, 0o644)?;
    Ok(Written {
        files: vec![key_path, cert_path],
    })
}

/// What to revoke: the certificate of a host (DIR/NAME.pem), or a serial number.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    Host(String),
    /// Hexadecimal, colons allowed (as `openssl x509 -serial` prints it).
    Serial(String),
}

/// One entry of the CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Upper-case hex, no leading zeros (as `openssl x509 -serial`).
    pub serial: String,
    pub at: OffsetDateTime,
    /// The host whose certificate in DIR has this serial, if one does.
    pub host: Option<String>,
}

/// What [`revoke`] did.
#[derive(Debug)]
pub struct RevokeOutcome {
    pub entry: RevokedEntry,
    /// It was on the CRL already (nothing written).
    pub already: bool,
    pub crl: PathBuf,
    pub crl_number: u64,
    /// Entries on the CRL now.
    pub total: usize,
}

/// The CRL `revoke` writes and `serve` reads next to the CA.
pub fn crl_path(dir: &Path) -> PathBuf {
    dir.join(crate::revocation::DEFAULT_CRL_FILE)
}

/// A CA certificate's subject (DER) and the certificates it issued in DIR: (host name
/// from the file name, raw serial).
fn issued_in(dir: &Path, ca_subject: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        if matches!(name, "ca" | "crl") {
            continue;
        }
        let Ok(certs) = listenscope_core::pem::load_certs(&path) else {
            continue;
        };
        if let Some(c) = certs.first()
            && let Ok((_, c)) = x509_parser::parse_x509_certificate(c.as_ref())
            && c.issuer().as_raw() == ca_subject
        {
            out.push((name.to_string(), c.raw_serial().to_vec()));
        }
    }
    out.sort();
    out
}

/// A CRL entry: the certificate's raw serial and when it was revoked.
type Entry = (Vec<u8>, OffsetDateTime);

/// The entries of DIR/crl.pem (none if it does not exist) and its CRL number, checked to
/// be the CA's.
fn read_crl(dir: &Path, ca_der: &[u8]) -> Result<(Vec<Entry>, u64), RevokeError> {
    let path = crl_path(dir);
    let pem = match fs::read(&path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(error) => return Err(PkiError::Io { path, error }.into()),
    };
    let bad = |detail: String| RevokeError::BadCrl {
        path: path.clone(),
        ca: dir.join("ca.pem"),
        detail,
    };
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateRevocationListDer::from_pem_slice(&pem)
        .map_err(|e| bad(format!("not a PEM CRL ({e})")))?;
    let (_, crl) =
        x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| bad(format!("not a CRL ({e})")))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| bad(format!("the CA does not parse ({e})")))?;
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(bad(format!("issued by {}", crl.issuer())));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|e| bad(format!("not signed by this CA's key ({e})")))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let entries = crl
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.revocation_date.to_datetime()))
        .collect();
    Ok((entries, number))
}

/// Normalised serial bytes of `hex` ("4F:1A:09", "0x4f1a09").
fn parse_serial(hex: &str) -> Result<Vec<u8>, RevokeError> {
    let digits: String = hex
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if digits.is_empty() || digits.len() > 42 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(RevokeError::BadSerial(hex.to_string()));
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| RevokeError::BadSerial(hex.to_string()))
}

/// Revokes a certificate of the CA in DIR: adds it to DIR/crl.pem (written through a
/// temporary file and a rename, mode 0644), keeping the entries already there, with the
/// next CRL number. Revoking what is already revoked changes nothing.
pub fn revoke(
    dir: &Path,
    target: &RevokeTarget,
    force: bool,
) -> Result<RevokeOutcome, RevokeError> {
    let ca = Ca::load(dir)?;
    let ca_der = listenscope_core::pem::load_certs(&ca.path)
        .map_err(PkiError::CaUnusable)?
        .remove(0);
    let (_, ca_cert) =
        x509_parser::parse_x509_certificate(ca_der.as_ref()).map_err(|e| RevokeError::NotOurs {
            path: ca.path.clone(),
            detail: e.to_string(),
        })?;
    let ca_subject = ca_cert.subject().as_raw().to_vec();
    let issued = issued_in(dir, &ca_subject);
    let (serial, host) = match target {
        RevokeTarget::Host(name) => {
            let host = crate::tls::canonical_host_name(name)
                .ok_or_else(|| PkiError::BadName { name: name.clone() })?;
            let path = dir.join(format!("{host}.pem"));
            if !path.exists() {
                return Err(RevokeError::NoHost { host, path });
            }
            let certs =
                listenscope_core::pem::load_certs(&path).map_err(|e| RevokeError::NotOurs {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            let (_, c) = x509_parser::parse_x509_certificate(certs[0].as_ref()).map_err(|e| {
                RevokeError::NotOurs {
                    path: path.clone(),
                    detail: e.to_string(),
                }
            })?;
            if c.issuer().as_raw() != ca_subject.as_slice() {
                return Err(RevokeError::NotOurs {
                    path,
                    detail: format!("issued by {}", c.issuer()),
                });
            }
            (c.raw_serial().to_vec(), Some(host))
        }
        RevokeTarget::Serial(hex) => {
            let want = crate::revocation::serial_hex(&parse_serial(hex)?);
            match issued
                .iter()
                .find(|(_, s)| crate::revocation::serial_hex(s) == want)
            {
                Some((h, s)) => (s.clone(), Some(h.clone())),
                None if force => (parse_serial(hex)?, None),
                None => {
                    return Err(RevokeError::UnknownSerial {
                        serial: want,
                        dir: dir.to_path_buf(),
                    });
                }
            }
        }
    };
    let hex = crate::revocation::serial_hex(&serial);
    let (mut entries, number) = read_crl(dir, ca_der.as_ref())?;
    let crl = crl_path(dir);
    if let Some((_, at)) = entries
        .iter()
        .find(|(s, _)| crate::revocation::serial_hex(s) == hex)
    {
        return Ok(RevokeOutcome {
            entry: RevokedEntry {
                serial: hex,
                at: *at,
                host,
            },
            already: true,
            crl,
            crl_number: number,
            total: entries.len(),
        });
    }
    let now = OffsetDateTime::now_utc();
    entries.push((serial, now));
    let number = number + 1;
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        // Not enforced by the collector (see `revocation`): the list is authoritative
        // until the next `revoke` replaces it, so it claims to be for the CA's lifetime.
        next_update: ca.not_after.max(now + Duration::days(1)),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: entries
            .iter()
            .map(|(s, at)| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: *at,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let signed = params.signed_by(&ca.issuer)?;
    write_file(&crl, &signed.pem()?, 0o644)?;
    Ok(RevokeOutcome {
        entry: RevokedEntry {
            serial: hex,
            at: now,
            host,
        },
        already: false,
        crl,
        crl_number: number,
        total: entries.len(),
    })
}

/// The entries of DIR/crl.pem, oldest first, with the host whose certificate in DIR has
/// each serial.
pub fn revoked(dir: &Path) -> Result<Vec<RevokedEntry>, RevokeError> {
    let ca_path = dir.join("ca.pem");
    let ca_der = listenscope_core::pem::load_certs(&ca_path)
        .map_err(PkiError::CaUnusable)?
        .remove(0);
    let (_, ca_cert) =
        x509_parser::parse_x509_certificate(ca_der.as_ref()).map_err(|e| RevokeError::NotOurs {
            path: ca_path.clone(),
            detail: e.to_string(),
        })?;
    let issued = issued_in(dir, ca_cert.subject().as_raw());
    let (entries, _) = read_crl(dir, ca_der.as_ref())?;
    let mut out: Vec<RevokedEntry> = entries
        .into_iter()
        .map(|(s, at)| {
            let serial = crate::revocation::serial_hex(&s);
            let host = issued
                .iter()
                .find(|(_, i)| crate::revocation::serial_hex(i) == serial)
                .map(|(h, _)| h.clone());
            RevokedEntry { serial, at, host }
        })
        .collect();
    out.sort_by_key(|e| e.at);
    Ok(out)
}

/// This machine's name (this UTS namespace's), or "" when it cannot be read.
pub fn this_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Default names for the server certificate: loopback plus this machine's name.
pub fn default_server_names() -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let host = this_hostname();
    if valid_host_name(&host) && !names.contains(&host) {
        names.push(host);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn serials() {
        let check = |hex: &str, want: Option<&str>| {
            let got = parse_serial(hex)
                .ok()
                .map(|b| crate::revocation::serial_hex(&b));
            assert_eq!(got.as_deref(), want, "{hex:?}");
        };
        check("4F:1A:09", Some("4F1A09"));
        check("4f1a09", Some("4F1A09"));
        check("0x4f1a09", Some("4F1A09"));
        check("f1a09", Some("0F1A09"));
        check("00:80", Some("80"));
        check("0", Some("00"));
        check("", None);
        check("xyz", None);
        check("4F 1A", None);
        check(&"a".repeat(43), None);
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lst-pki-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_issue_and_check() {
        let dir = tmpdir("a");
        init(&dir, &["localhost".into(), "127.0.0.1".into()], 30, false).unwrap();
        for (f, mode) in [("ca.key", 0o600), ("server.key", 0o600), ("ca.pem", 0o644)] {
            let m = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{f}");
        }
        // Never replaces a CA silently.
        let err = init(&dir, &["localhost".into()], 30, false).unwrap_err();
        assert!(matches!(err, PkiError::CaExists { .. }), "{err}");
        issue(&dir, "h1", 30).unwrap();
        let (certs, _) =
            listenscope_core::pem::load_identity(&dir.join("h1.pem"), &dir.join("h1.key")).unwrap();
        assert_eq!(
            listenscope_core::pem::identity_of(&certs[0]).as_deref(),
            Some("h1")
        );
        // The server certificate and the CA load and match.
        crate::tls::server_config(
            &dir.join("ca.pem"),
            &dir.join("server.pem"),
            &dir.join("server.key"),
        )
        .unwrap();
        // Issued under the name the collector records: lower case, no trailing dot.
        let w = issue(&dir, "WEB-01.Example.NET.", 30).unwrap();
        assert!(
            w.files.iter().all(|f| f
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("web-01.example.net.")),
            "{:?}",
            w.files
        );
        let (certs, _) = listenscope_core::pem::load_identity(
            &dir.join("web-01.example.net.pem"),
            &dir.join("web-01.example.net.key"),
        )
        .unwrap();
        assert_eq!(
            listenscope_core::pem::identity_of(&certs[0]).as_deref(),
            Some("web-01.example.net")
        );
        assert!(matches!(
            issue(&dir, "CA", 30),
            Err(PkiError::BadName { .. })
        ));
        // A key from another issue run does not match.
        issue(&dir, "h2", 30).unwrap();
        let err = listenscope_core::pem::load_identity(&dir.join("h1.pem"), &dir.join("h2.key"))
            .unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        // In memory, from a CA loaded once: the same kind of certificate.
        let ca = Ca::load(&dir).unwrap();
        let (cert, key) = ca.issue_pem("fleet-000001", 30).unwrap();
        fs::write(dir.join("m.pem"), cert).unwrap();
        write_file(&dir.join("m.key"), &key, 0o600).unwrap();
        let (certs, _) =
            listenscope_core::pem::load_identity(&dir.join("m.pem"), &dir.join("m.key")).unwrap();
        assert_eq!(
            listenscope_core::pem::identity_of(&certs[0]).as_deref(),
            Some("fleet-000001")
        );
        assert!(matches!(
            ca.issue_pem("bad name", 30),
            Err(PkiError::BadName { .. })
        ));
        // --force replaces it.
        init(&dir, &["localhost".into()], 30, true).unwrap();
        assert!(matches!(
            issue(&dir, "bad name", 30),
            Err(PkiError::BadName { .. })
        ));
        assert!(matches!(
            issue(&tmpdir("none"), "h1", 30),
            Err(PkiError::NoCa { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
