//! `listenscope-collector certs`: a small private CA for the fleet.
//!
//! `init` creates the CA and the collector's server certificate; `issue` creates one
//! agent certificate per host (DNS SAN = host name, clientAuth). Private keys are written
//! with mode 0600 through a temporary file and a rename, so a crash never leaves half a
//! key. An existing CA is never replaced without `--force`: every agent certificate
//! depends on it.

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
    // A distinct name per CA: two fleets' CAs are never mistaken for each other.
    let created = OffsetDateTime::now_utc();
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("listenscope fleet CA {}", created.unix_timestamp()),
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
