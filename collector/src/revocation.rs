//! Certificate revocation: the CRLs the collector checks agent certificates against, and
//! reloading them while it runs.
//!
//! [`Revocation`] owns the client-certificate verifier of the collector's one rustls
//! `ServerConfig`: a [`ClientCertVerifier`] that delegates to a rustls
//! `WebPkiClientVerifier` built with the current CRLs, swapped whole on reload. The
//! `ServerConfig` (and every connection it serves) stays the same; only new handshakes
//! see a new CRL. Live sessions of a certificate a reload revoked are ended by the server
//! ([`Revocation::subscribe`]: it compares each session's certificate with the new list).
//!
//! Decisions:
//! - **Reload on SIGHUP and on change.** `serve` reloads on SIGHUP; [`Revocation::watch`]
//!   polls each file's identity (device, inode, size, mtime) every
//!   [`POLL_EVERY`]: no inotify, so it also sees a file replaced by a rename, a ConfigMap
//!   update (a symlink swap) and a file that appears later.
//! - **A bad CRL never weakens revocation.** At start-up it is fatal (naming the file and
//!   the fix); on reload the previous CRLs stay in force, the failure is logged at ERROR
//!   and counted (`listenscope_crl_reloads_total{result="error"}`). A CRL is bad when it
//!   does not parse, or is not signed by a CA of `--tls-ca` (checked here: rustls would
//!   only find out during a handshake, and then refuse every agent of that CA).
//! - **nextUpdate is not enforced.** An out-of-date CRL still lists what it lists; refusing
//!   every agent because nobody re-signed the list would turn a forgotten chore into a
//!   fleet outage. A CRL past its nextUpdate is logged as a warning at each load.
//!   `certs revoke` writes a nextUpdate at the CA's end of validity.
//! - **Only agent certificates are checked** (`only_check_end_entity_revocation`), and a
//!   certificate whose CA has no CRL here is accepted (`allow_unknown_revocation_status`):
//!   during a CA rotation `--tls-ca` holds two CAs and the CRL usually covers one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// How often [`Revocation::watch`] looks at the CRL files.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// A CRL file larger than this is refused (a CRL of 100,000 revoked certificates is
/// about 4 MB).
const MAX_CRL_BYTES: u64 = 64 * 1024 * 1024;

/// The file name of the CRL `certs revoke` writes next to the CA, and which `serve` reads
/// next to `--tls-ca` unless `--tls-crl` names another.
pub const DEFAULT_CRL_FILE: &str = "crl.pem";

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error(
        "{}: cannot read the CRL: {error}; fix the path (--tls-crl / tls_crl), or leave it \
         out to run without revocation",
        path.display()
    )]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{}: {detail}; write it again with `listenscope-collector certs revoke --dir CA_DIR \
         NAME` (or give the PEM CRL of the CA in --tls-ca)",
        path.display()
    )]
    Bad { path: PathBuf, detail: String },
    #[error("{}: the CRLs do not fit the CA: {detail}", path.display())]
    Verifier { path: PathBuf, detail: String },
}

/// A certificate as a CRL names it: its issuer's name (DER) and its serial number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertKey {
    pub issuer: Vec<u8>,
    pub serial: Vec<u8>,
}

impl CertKey {
    /// The key of a certificate (DER); `None` if it does not parse.
    pub fn of(cert: &[u8]) -> Option<CertKey> {
        let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
        Some(CertKey {
            issuer: c.issuer().as_raw().to_vec(),
            serial: c.raw_serial().to_vec(),
        })
    }

    /// The serial number as `openssl x509 -serial` prints it (upper-case hex).
    pub fn serial_hex(&self) -> String {
        serial_hex(&self.serial)
    }
}

/// `bytes` as upper-case hex without leading zero bytes ("00" for zero).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let hex: String = bytes[start..].iter().map(|b| format!("{b:02X}")).collect();
    if hex.is_empty() { "00".into() } else { hex }
}

/// The certificates the loaded CRLs revoke.
#[derive(Debug, Default)]
pub struct Revoked {
    keys: HashSet<CertKey>,
}

impl Revoked {
    pub fn contains(&self, key: &CertKey) -> bool {
        self.keys.contains(key)
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One CRL file to load.
#[derive(Debug, Clone)]
pub struct CrlFile {
    pub path: PathBuf,
    /// `false`: the default next to the CA; absent means no revocations (until it appears).
    pub required: bool,
}

impl CrlFile {
    /// The CRL given explicitly (`Some`: it must exist), else the default
    /// [`DEFAULT_CRL_FILE`] next to the CA `ca` (optional until it appears).
    pub fn for_ca(ca: &Path, explicit: Option<&Path>) -> CrlFile {
        match explicit {
            Some(path) => CrlFile {
                path: path.to_path_buf(),
                required: true,
            },
            None => CrlFile {
                path: ca.parent().unwrap_or(Path::new(".")).join(DEFAULT_CRL_FILE),
                required: false,
            },
        }
    }
}

/// What identifies a file's content cheaply: a change of any of them means read it again.
type Stamp = Option<(u64, u64, u64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    // metadata follows symlinks: a ConfigMap's `..data` swap changes the target's inode.
    let md = std::fs::metadata(path).ok()?;
    Some((md.dev(), md.ino(), md.size(), md.mtime(), md.mtime_nsec()))
}

struct Shared {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// The CA certificates (DER), to check whose signature a CRL carries.
    cas: Vec<CertificateDer<'static>>,
    files: Vec<CrlFile>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    /// Root hints never change on reload (the CAs do not): computed once.
    hints: Vec<DistinguishedName>,
    revoked: watch::Sender<Arc<Revoked>>,
    stamps: Mutex<Vec<Stamp>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The CRLs in force and the verifier built from them. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Revocation {
    shared: Arc<Shared>,
}

impl Revocation {
    /// Loads `files` (a required one must exist and be good; a missing optional one is no
    /// CRL) and builds the verifier over `roots`.
    pub fn load(
        roots: RootCertStore,
        cas: Vec<CertificateDer<'static>>,
        provider: Arc<CryptoProvider>,
        files: Vec<CrlFile>,
    ) -> Result<Revocation, RevocationError> {
        let roots = Arc::new(roots);
        let stamps: Vec<Stamp> = files.iter().map(|f| stamp(&f.path)).collect();
        let (verifier, revoked) = build(&roots, &cas, &provider, &files)?;
        let hints = verifier.root_hint_subjects().to_vec();
        let (tx, _) = watch::channel(Arc::new(revoked));
        Ok(Revocation {
            shared: Arc::new(Shared {
                roots,
                provider,
                cas,
                files,
                current: RwLock::new(verifier),
                hints,
                revoked: tx,
                stamps: Mutex::new(stamps),
            }),
        })
    }

    /// The verifier to put in the `ServerConfig`: it follows every reload.
    pub fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(Verifier {
            shared: Arc::clone(&self.shared),
        })
    }

    /// The CRL files this collector reads.
    pub fn files(&self) -> &[CrlFile] {
        &self.shared.files
    }

    /// The certificates revoked now.
    pub fn revoked(&self) -> Arc<Revoked> {
        Arc::clone(&self.shared.revoked.borrow())
    }

    /// Follows the revoked set: changes after every successful reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Revoked>> {
        self.shared.revoked.subscribe()
    }

    /// Reads the CRL files again. On success the new CRLs are in force for the next
    /// handshake and subscribers hear of it; on failure the previous ones stay, and the
    /// error is logged (ERROR: revocation is not what the operator wrote) and counted.
    pub fn reload(&self, why: &str) -> Result<usize, RevocationError> {
        let s = &self.shared;
        // Stamps first: a change during the read is seen at the next poll.
        *s.stamps.lock().unwrap_or_else(|p| p.into_inner()) =
            s.files.iter().map(|f| stamp(&f.path)).collect();
        match build(&s.roots, &s.cas, &s.provider, &s.files) {
            Ok((verifier, revoked)) => {
                let n = revoked.len();
                *s.current.write().unwrap_or_else(|p| p.into_inner()) = verifier;
                s.revoked.send_replace(Arc::new(revoked));
                metrics::counter!(m::CRL_RELOADS, "result" => "ok").increment(1);
                tracing::info!(why, revoked = n, "Certificate revocation list loaded.");
                Ok(n)
            }
            Err(e) => {
                metrics::counter!(m::CRL_RELOADS, "result" => "error").increment(1);
                tracing::error!(
                    why,
                    error = %e,
                    "Cannot load the certificate revocation list; the previous one stays in force."
                );
                Err(e)
            }
        }
    }

    /// Reloads whenever a file's stamp changes, every [`POLL_EVERY`], until `stop`.
    pub async fn watch(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now: Vec<Stamp> = self.shared.files.iter().map(|f| stamp(&f.path)).collect();
            let changed = *self.shared.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
            if changed {
                let _ = self.reload("file changed");
            }
        }
    }
}

/// The verifier of `files` over `roots`, and what they revoke.
fn build(
    roots: &Arc<RootCertStore>,
    cas: &[CertificateDer<'static>],
    provider: &Arc<CryptoProvider>,
    files: &[CrlFile],
) -> Result<(Arc<dyn ClientCertVerifier>, Revoked), RevocationError> {
    let mut crls = Vec::new();
    let mut revoked = Revoked::default();
    let mut last = None;
    for f in files {
        let Some(bytes) = read(f)? else { continue };
        for crl in check_crls(&f.path, &bytes, cas)? {
            revoked.keys.extend(crl.revoked);
            crls.push(crl.der);
        }
        last = Some(f.path.clone());
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider))
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| RevocationError::Verifier {
                path: last.unwrap_or_default(),
                detail: e.to_string(),
            })?;
    Ok((verifier, revoked))
}

/// The file's bytes; `None` for a missing optional file.
fn read(f: &CrlFile) -> Result<Option<Vec<u8>>, RevocationError> {
    use std::io::Read;
    let err = |error| RevocationError::Read {
        path: f.path.clone(),
        error,
    };
    let file = match std::fs::File::open(&f.path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !f.required => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_CRL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_CRL_BYTES {
        return Err(RevocationError::Bad {
            path: f.path.clone(),
            detail: format!("larger than {MAX_CRL_BYTES} bytes"),
        });
    }
    Ok(Some(bytes))
}

/// One checked CRL.
struct CheckedCrl {
    der: CertificateRevocationListDer<'static>,
    revoked: Vec<CertKey>,
}

/// Every CRL of a PEM file, each parsed and its signature checked against the CA that
/// issued it (one of `cas`).
fn check_crls(
    path: &Path,
    pem: &[u8],
    cas: &[CertificateDer<'static>],
) -> Result<Vec<CheckedCrl>, RevocationError> {
    let bad = |detail: String| RevocationError::Bad {
        path: path.to_path_buf(),
        detail,
    };
    let mut out = Vec::new();
    for der in CertificateRevocationListDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| bad(format!("not a PEM CRL ({e})")))?;
        let (rest, crl) = x509_parser::parse_x509_crl(der.as_ref())
            .map_err(|e| bad(format!("not a CRL ({e})")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the CRL".into()));
        }
        let issuer = crl.issuer().as_raw();
        let ca = cas.iter().find_map(|c| {
            let (_, c) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
            (c.subject().as_raw() == issuer).then_some(c)
        });
        let Some(ca) = ca else {
            return Err(bad(format!(
                "not signed by a CA of --tls-ca: it is issued by {:?}",
                crl.issuer().to_string()
            )));
        };
        crl.verify_signature(ca.public_key()).map_err(|e| {
            bad(format!(
                "not signed by the CA of --tls-ca named {:?} ({e}): another CA of that name \
                 made it",
                crl.issuer().to_string()
            ))
        })?;
        if let Some(next) = crl.next_update()
            && next.timestamp() < time::OffsetDateTime::now_utc().unix_timestamp()
        {
            tracing::warn!(
                path = %path.display(),
                next_update = %next,
                "The certificate revocation list is past its nextUpdate; it is still applied \
                 (re-sign it with `certs revoke`, or refresh it from your CA)."
            );
        }
        let revoked = crl
            .iter_revoked_certificates()
            .map(|r| CertKey {
                issuer: issuer.to_vec(),
                serial: r.raw_serial().to_vec(),
            })
            .collect();
        out.push(CheckedCrl { der, revoked });
    }
    if out.is_empty() {
        return Err(bad(
            "no CRL in it (expected -----BEGIN X509 CRL-----)".into()
        ));
    }
    Ok(out)
}

/// The collector's client-certificate verifier: the current `WebPkiClientVerifier`.
#[derive(Debug)]
struct Verifier {
    shared: Arc<Shared>,
}

impl Verifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(
            &self
                .shared
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.shared.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}
