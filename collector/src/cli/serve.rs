//! `serve` and `certs`.

#![allow(clippy::print_stdout)] // CLI output code: printing to stdout is its job

use std::path::PathBuf;

use clap::{Args, Subcommand};
use listenscope_core::exit::Exit;

use crate::admission::{self, AdmissionLimits};
use crate::config::RawConfig;
use crate::ingest::Limits;
use crate::revocation::{CrlFile, Revocation};
use crate::store::{Store, StoreOptions};
use crate::{pki, server, tls};

/// SIGHUP reloads the CRLs (an operator's `systemctl reload`, or a script after
/// `certs revoke`). Installed before the server accepts anything: SIGHUP's default action
/// would end the process.
fn spawn_reload_on_sighup(revocation: Revocation) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("installing the SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = revocation.reload("SIGHUP");
        }
    });
    Ok(())
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration (example: deploy/collector.toml); flags override its keys.
    #[arg(long, env = "LISTENSCOPE_COLLECTOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Database: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: Option<String>,
    /// CA certificate that signs agent certificates.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The collector's certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The collector's private key.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Certificate revocation list (PEM, from `certs revoke`), reloaded on change and on
    /// SIGHUP. Default: crl.pem next to --tls-ca, if it exists (or appears later).
    #[arg(long, alias = "crl", value_name = "FILE")]
    pub tls_crl: Option<PathBuf>,
    /// Serve Prometheus metrics here (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// A host silent for longer is stale (default 5m).
    #[arg(long, value_name = "DURATION")]
    pub stale_after: Option<String>,
    /// Database connection pool size (default 4).
    #[arg(long, value_name = "N")]
    pub pool_size: Option<u32>,
    /// Prune history older than this (e.g. 90d); default: keep forever. The current state
    /// is never pruned.
    #[arg(long, value_name = "DURATION")]
    pub retain: Option<String>,
    /// Agent sessions held at once; more are refused until one ends (default 20000,
    /// lowered to fit the open-file limit; each session needs one open file).
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// This collector's name in the hosts view (default HOSTNAME:PORT); give each
    /// collector sharing a PostgreSQL database its own.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Encoded bytes of agent messages held at once, all sessions together (default
    /// 1GiB; at least 16MiB). Reading waits when it is full; memory use stays under
    /// about 2.5 times this. Also caps the largest snapshot (three quarters of it minus
    /// 4MiB, at most 256MiB).
    #[arg(long, value_name = "SIZE", env = "LISTENSCOPE_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
    /// Connections that have not finished TLS and started HTTP/2, per IPv4 address or
    /// IPv6 /64; more are closed at once (default 32).
    #[arg(
        long,
        env = "LISTENSCOPE_MAX_UNAUTHENTICATED_PER_SOURCE",
        value_name = "N"
    )]
    pub max_unauthenticated_per_source: Option<usize>,
    /// Connections in TLS handshake or awaiting the HTTP/2 preface at once; more are
    /// closed at once (default 512).
    #[arg(long, env = "LISTENSCOPE_MAX_HANDSHAKES", value_name = "N")]
    pub max_handshakes: Option<usize>,
    /// More such places only for addresses that completed a mutual-TLS handshake before,
    /// so agents get in during a flood (default 256).
    #[arg(long, env = "LISTENSCOPE_RESERVED_HANDSHAKES", value_name = "N")]
    pub reserved_handshakes: Option<usize>,
    /// A TLS handshake must finish within this (default 5s).
    #[arg(long, env = "LISTENSCOPE_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    pub handshake_timeout: Option<String>,
    /// After TLS, the HTTP/2 preface must arrive within this (default 5s).
    #[arg(long, env = "LISTENSCOPE_PREFACE_TIMEOUT", value_name = "DURATION")]
    pub preface_timeout: Option<String>,
    /// Also serve the read-only web UI here (docs/ui.md); given without a value:
    /// 127.0.0.1:7444. Off loopback it needs TLS (the collector's certificate unless
    /// --ui-tls-cert) and client certificates from --tls-ca unless --ui-public.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = crate::ui::DEFAULT_LISTEN)]
    pub ui_listen: Option<String>,
    /// The web UI's TLS certificate (default off loopback: the collector's --tls-cert).
    #[arg(long, value_name = "FILE")]
    pub ui_tls_cert: Option<PathBuf>,
    /// The web UI's TLS private key.
    #[arg(long, value_name = "FILE")]
    pub ui_tls_key: Option<PathBuf>,
    /// Serve the web UI over TLS without client certificates, to every client that can
    /// connect (default: a certificate from the fleet CA is required off loopback).
    #[arg(long)]
    pub ui_public: bool,
    /// The CA whose client certificates open the web UI off loopback, instead of the
    /// fleet CA (--tls-ca, which signed every agent's certificate too); its CRL is
    /// crl.pem next to it when present.
    #[arg(long, value_name = "FILE")]
    pub ui_tls_ca: Option<PathBuf>,
    /// Listen backlog (default max_sessions, 1024 to 65535; the kernel caps it at
    /// net.core.somaxconn).
    #[arg(long, env = "LISTENSCOPE_LISTEN_BACKLOG", value_name = "N")]
    pub listen_backlog: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create DIR/ca.pem, ca.key, server.pem, server.key (keys mode 0600).
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Name or IP the collector is reached by (repeatable). Default: localhost,
        /// 127.0.0.1, ::1 and this machine's host name.
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// Validity of the server certificate in days, 1 to 36500 (the CA gets at least
        /// 10 years).
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing CA (every agent certificate must then be issued again).
        #[arg(long)]
        force: bool,
    },
    /// Create DIR/NAME.pem and DIR/NAME.key for one host (DNS SAN = NAME, clientAuth).
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The host's identity in the fleet.
        #[arg(long, value_name = "NAME")]
        host: String,
        /// Validity in days: at least 1, and not past the CA's expiry.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace the host's existing certificate and key (its agent must then get the new
        /// files).
        #[arg(long)]
        force: bool,
    },
    /// Revoke a host's certificate: add it to DIR/crl.pem (signed by the CA). Collectors
    /// reading that file refuse it and end its live session within seconds.
    #[command(
        after_help = "Collectors whose --tls-ca is DIR/ca.pem read DIR/crl.pem \
        by default; others need the file copied next to their --tls-ca, or named by \
        --tls-crl. They reload it when it changes (checked every 2 s) and on SIGHUP."
    )]
    Revoke {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The host whose certificate (DIR/NAME.pem) to revoke.
        #[arg(
            value_name = "NAME",
            required_unless_present = "serial",
            conflicts_with = "serial"
        )]
        host: Option<String>,
        /// Revoke the certificate with this serial number instead (hex, e.g. 4F:1A:09).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// With --serial: revoke it even if no certificate in DIR has that serial.
        #[arg(long, requires = "serial")]
        force: bool,
    },
    /// List the certificates revoked in DIR/crl.pem.
    Revoked {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

pub(super) fn certs(c: CertsCommand) -> anyhow::Result<Exit> {
    let written = match c {
        CertsCommand::Init {
            dir,
            server_names,
            days,
            force,
        } => {
            let names = if server_names.is_empty() {
                pki::default_server_names()
            } else {
                server_names
            };
            let w = pki::init(&dir, &names, days, force)?;
            println!("Server certificate names: {}", names.join(", "));
            w
        }
        CertsCommand::Issue {
            dir,
            host,
            days,
            force,
        } => pki::issue_with(&dir, &host, days, force)?,
        CertsCommand::Revoke {
            dir,
            host,
            serial,
            force,
        } => return revoke(&dir, host, serial, force),
        CertsCommand::Revoked { dir } => {
            let entries = pki::revoked(&dir)?;
            if entries.is_empty() {
                println!(
                    "No certificate is revoked in {}.",
                    pki::crl_path(&dir).display()
                );
            }
            for e in entries {
                println!(
                    "{}  {}  {}",
                    crate::timefmt::format(e.at),
                    e.serial,
                    e.host.as_deref().unwrap_or("-")
                );
            }
            return Ok(Exit::Success);
        }
    };
    for f in written.files {
        println!("wrote {}", f.display());
    }
    Ok(Exit::Success)
}

fn revoke(
    dir: &std::path::Path,
    host: Option<String>,
    serial: Option<String>,
    force: bool,
) -> anyhow::Result<Exit> {
    let target = match (host, serial) {
        (_, Some(s)) => pki::RevokeTarget::Serial(s),
        (Some(h), None) => pki::RevokeTarget::Host(h),
        (None, None) => anyhow::bail!("name a host (NAME) or --serial HEX"),
    };
    let o = pki::revoke(dir, &target, force)?;
    let what = match &o.entry.host {
        Some(h) => format!("{h}'s certificate (serial {})", o.entry.serial),
        None => format!("serial {}", o.entry.serial),
    };
    if o.already {
        println!(
            "{what} was already revoked on {} UTC; {} is unchanged.",
            crate::timefmt::format(o.entry.at),
            o.crl.display()
        );
        return Ok(Exit::Success);
    }
    println!("Revoked {what}.");
    println!(
        "wrote {} (CRL number {}, {} revoked)",
        o.crl.display(),
        o.crl_number,
        o.total
    );
    println!(
        "A collector with --tls-ca {} reads it within {} s (or at once on SIGHUP), refuses \
         the certificate and ends its live session. Other collectors: copy the file next to \
         their --tls-ca, or to their --tls-crl file.",
        dir.join("ca.pem").display(),
        crate::revocation::POLL_EVERY.as_secs()
    );
    if let Some(h) = &o.entry.host {
        println!(
            "The real host needs a new certificate: listenscope-collector certs issue --dir {} \
             --host {h} --force",
            dir.display()
        );
    }
    Ok(Exit::Success)
}

pub(super) async fn serve(a: ServeArgs) -> anyhow::Result<Exit> {
    // First: a SIGTERM during start-up (opening a big database) must stop it gracefully.
    let signal = listenscope_core::signal::shutdown_signal();
    let file = match &a.config {
        Some(p) => RawConfig::load(p)?,
        None => RawConfig::default(),
    };
    let cfg = file
        .overridden_by(RawConfig {
            listen: a.listen,
            db: a.db,
            tls_ca: a.tls_ca,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            tls_crl: a.tls_crl,
            metrics_listen: a.metrics_listen,
            stale_after: a.stale_after,
            pool_size: a.pool_size,
            retain: a.retain,
            max_sessions: a.max_sessions,
            name: a.name,
            memory_budget: a.memory_budget,
            max_unauthenticated_per_source: a.max_unauthenticated_per_source,
            max_handshakes: a.max_handshakes,
            reserved_handshakes: a.reserved_handshakes,
            handshake_timeout: a.handshake_timeout,
            preface_timeout: a.preface_timeout,
            listen_backlog: a.listen_backlog,
            ui_listen: a.ui_listen,
            ui_tls_cert: a.ui_tls_cert,
            ui_tls_key: a.ui_tls_key,
            ui_public: a.ui_public.then_some(true),
            ui_tls_ca: a.ui_tls_ca,
            ..RawConfig::default()
        })
        .validate()?;
    let max_sessions = crate::fdlimit::fit_sessions(cfg.max_sessions, cfg.admission.most_pending());
    let admission = AdmissionLimits {
        // Every agent of a full collector, twice over: the whole fleet stays known.
        known_sources: (2 * max_sessions).clamp(admission::MIN_KNOWN_SOURCES, 1 << 21),
        ..cfg.admission.clone()
    };
    let backlog = cfg
        .listen_backlog
        .unwrap_or_else(|| admission::backlog_for(max_sessions));
    // The CRL: the one named, which must exist; else crl.pem next to the CA, watched even
    // while absent (`certs revoke --dir` on the CA's directory just works).
    let crl = CrlFile::for_ca(&cfg.tls_ca, cfg.tls_crl.as_deref());
    let tls = tls::server_tls(&cfg.tls_ca, &cfg.tls_cert, &cfg.tls_key, vec![crl])?;
    if let Some(revocation) = &tls.revocation {
        spawn_reload_on_sighup(revocation.clone())?;
    }
    // The web UI's TLS, checked before anything is opened: off loopback it uses the
    // collector's certificate unless given its own, and the collector's client verifier
    // (the fleet CA, the same CRLs) unless --ui-public.
    let (ui_listen, ui_public) = (
        cfg.ui.as_ref().map(|u| u.listen),
        cfg.ui.as_ref().is_some_and(|u| u.public),
    );
    // Ends the web UI (and its own CRL's watch) when the collector stops.
    let stop_ui = tokio_util::sync::CancellationToken::new();
    let ui_tls = match &cfg.ui {
        Some(ui) => {
            let addr = ui.listen;
            let identity = match &ui.identity {
                Some((c, k)) => Some((c.as_path(), k.as_path())),
                None if !crate::ui::is_loopback(addr) => {
                    Some((cfg.tls_cert.as_path(), cfg.tls_key.as_path()))
                }
                None => None,
            };
            let clients = match (&ui.client_ca, identity) {
                // Its own CA (and that CA's CRL, reloaded like the fleet's).
                (Some(ca), Some((cert, key))) => {
                    let crl = CrlFile::for_ca(ca, None);
                    let own = tls::server_tls(ca, cert, key, vec![crl])?
                        .revocation
                        .ok_or_else(|| {
                            anyhow::anyhow!("no revocation state for {}", ca.display())
                        })?;
                    spawn_reload_on_sighup(own.clone())?;
                    tokio::spawn(own.clone().watch(stop_ui.clone()));
                    Some(own.verifier())
                }
                (Some(_), None) => anyhow::bail!(
                    "ui_tls_ca (--ui-tls-ca) asks for client certificates, which need TLS: \
                     the web UI on a loopback address has none unless ui_tls_cert and \
                     ui_tls_key (--ui-tls-cert, --ui-tls-key) are given"
                ),
                (None, _) => tls.revocation.as_ref().map(|r| r.verifier()),
            };
            Some(crate::ui::tls_for(
                addr,
                identity,
                clients,
                ui_public,
                super::ui::SERVE_FLAGS,
            )?)
        }
        None => None,
    };
    let store = Store::open(
        &cfg.db,
        &StoreOptions {
            stale_after_secs: cfg.stale_after_secs,
            pool_size: cfg.pool_size,
        },
    )
    .await?;
    if let Some(addr) = cfg.metrics_listen {
        crate::metrics::install(addr).map_err(anyhow::Error::msg)?;
        tracing::info!(%addr, "Serving metrics.");
    }
    let listener = admission::listen(cfg.listen, backlog).map_err(|e| {
        let fix = match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "; another process listens there (`ss -ltnp 'sport = :{}'`): stop it or \
                     choose another --listen",
                cfg.listen.port()
            ),
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need CAP_NET_BIND_SERVICE".to_string()
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "; no interface of this host has that address".to_string()
            }
            _ => String::new(),
        };
        anyhow::anyhow!("cannot listen on {}: {e}{fix}", cfg.listen)
    })?;
    tracing::info!(db = %cfg.db, "Store open.");
    let ui_thread = match (ui_listen, ui_tls) {
        (Some(addr), Some(ui_tls)) => {
            let listener = crate::ui::bind(addr)?;
            let bound = listener.local_addr()?;
            let thread =
                crate::ui::spawn(listener, cfg.db.clone(), ui_tls.clone(), stop_ui.clone())?;
            tracing::info!(
                url = %crate::ui::url(bound, ui_tls.is_some()),
                client_certificates = ui_tls.is_some() && !ui_public,
                "Serving the web UI (read-only)."
            );
            Some(thread)
        }
        _ => None,
    };
    let stop_pruning = tokio_util::sync::CancellationToken::new();
    if let Some(retain) = cfg.retain {
        tracing::info!(
            retain_secs = retain.as_secs(),
            "Pruning history older than the retention period."
        );
        tokio::spawn(crate::retention::run(
            store.clone(),
            retain,
            stop_pruning.clone(),
        ));
    }
    let shutdown = {
        let stop_ui = stop_ui.clone();
        async move {
            signal.await;
            stop_pruning.cancel();
            stop_ui.cancel();
        }
    };
    let limits = Limits {
        max_sessions,
        instance: cfg.name.clone(),
        memory_budget: cfg.memory_budget,
        admission,
        ..Limits::for_stale_after(std::time::Duration::from_secs(cfg.stale_after_secs))
    };
    if let Some(revocation) = &tls.revocation {
        for f in revocation.files() {
            tracing::info!(
                crl = %f.path.display(),
                present = f.path.exists(),
                revoked = revocation.revoked().len(),
                "Certificate revocation list (reloaded when it changes and on SIGHUP)."
            );
        }
    }
    tracing::info!(
        max_sessions,
        name = %cfg.name,
        backlog,
        max_unauthenticated_per_source = limits.admission.per_source,
        max_handshakes = limits.admission.handshakes,
        reserved_handshakes = limits.admission.reserved_handshakes,
        "Accepting agent sessions."
    );
    let served = server::serve(listener, tls, store, limits, shutdown).await;
    stop_ui.cancel();
    if let Some(thread) = ui_thread {
        // It ends within seconds of the cancel (open pages get 5 s).
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    served?;
    Ok(Exit::Success)
}
