//! `ui`: the web UI alone, over any database (a PostgreSQL replica, a SQLite file), and
//! the UI flags of `serve`. The UI itself lives in `crate::ui`.

#![allow(clippy::print_stdout)] // CLI output code: printing to stdout is its job

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use listenscope_core::exit::Exit;

use crate::query::ReadOnly;
use crate::revocation::CrlFile;
use crate::store::DbUrl;
use crate::ui;

#[derive(Debug, Args)]
#[command(
    after_help = "Read-only: every page reads through the same read-only connection \
    as `query`. A loopback address is served over plain HTTP; any other address needs TLS \
    (--tls-cert, --tls-key) and either client certificates from the fleet CA (--tls-ca) or \
    --public. Pages and parameters: docs/ui.md."
)]
pub struct UiArgs {
    /// Database: sqlite://PATH or postgres://USER@HOST/DB (as `serve --db`; a read-only
    /// role or a replica is enough).
    #[arg(long, env = "LISTENSCOPE_DB", value_name = "URL")]
    pub db: String,
    /// Address to serve the UI on.
    #[arg(long, value_name = "ADDR", default_value = ui::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// The UI's TLS certificate (required off loopback).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The UI's TLS private key.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (the fleet CA, `certs init`).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Certificate revocation list for those client certificates (default: crl.pem next
    /// to --tls-ca, if it exists or appears later).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_crl: Option<PathBuf>,
    /// Serve over TLS without client certificates, to every client that can connect.
    #[arg(long, requires = "tls_cert", conflicts_with = "tls_ca")]
    pub public: bool,
}

/// The flags `ui` names when it refuses an address.
const UI_FLAGS: ui::Flags = ui::Flags {
    cert: "--tls-cert and --tls-key",
    ca: "--tls-ca FILE",
    public: "--public",
};

/// The flags `serve` names when it refuses an address.
pub(super) const SERVE_FLAGS: ui::Flags = ui::Flags {
    cert: "the collector's --tls-cert and --tls-key by default, or --ui-tls-cert and --ui-tls-key",
    ca: "serve does this with its --tls-ca unless --ui-public is given",
    public: "--ui-public",
};

pub(super) async fn ui_cmd(a: UiArgs) -> anyhow::Result<Exit> {
    let signal = listenscope_core::signal::shutdown_signal();
    let db: DbUrl = a.db.parse().map_err(anyhow::Error::msg)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = match &a.tls_ca {
        Some(ca) => {
            let crl = CrlFile::for_ca(ca, a.tls_crl.as_deref());
            let (cert, key) = (a.tls_cert.as_deref(), a.tls_key.as_deref());
            let (Some(cert), Some(key)) = (cert, key) else {
                anyhow::bail!("--tls-ca needs --tls-cert and --tls-key");
            };
            let tls = crate::tls::server_tls(ca, cert, key, vec![crl])?;
            let revocation = tls
                .revocation
                .ok_or_else(|| anyhow::anyhow!("no revocation state for {}", ca.display()))?;
            tokio::spawn(revocation.clone().watch(stop.clone()));
            Some(revocation.verifier())
        }
        None => None,
    };
    let identity = a.tls_cert.as_deref().zip(a.tls_key.as_deref());
    let tls = ui::tls_for(a.listen, identity, clients, a.public, UI_FLAGS)?;
    let listener = ui::bind(a.listen)?;
    let ro = ReadOnly::open(&db)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    println!(
        "listenscope web UI on {} (read-only, {db}); Ctrl-C to stop",
        ui::url(addr, tls.is_some())
    );
    tracing::info!(%addr, tls = tls.is_some(), "Serving the web UI.");
    let state = Arc::new(ui::UiState::new(ro.clone(), db.to_string()));
    ui::serve(listener, state, tls, signal).await?;
    stop.cancel();
    ro.close().await;
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    /// `serve --ui-listen` without a value is the documented default address; absent,
    /// there is no UI; `ui --listen` defaults to the same address.
    #[test]
    fn ui_addresses() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap().command;
        let Command::Serve(s) = parse(&["c", "serve", "--ui-listen", "--db", "sqlite://x"]) else {
            panic!("not serve")
        };
        assert_eq!(
            s.ui_listen,
            Some(crate::ui::DEFAULT_LISTEN.parse().unwrap())
        );
        let Command::Serve(s) = parse(&["c", "serve", "--ui-listen", "0.0.0.0:9000"]) else {
            panic!("not serve")
        };
        assert_eq!(s.ui_listen, Some("0.0.0.0:9000".parse().unwrap()));
        let Command::Serve(s) = parse(&["c", "serve"]) else {
            panic!("not serve")
        };
        assert_eq!(s.ui_listen, None);
        let Command::Ui(u) = parse(&["c", "ui", "--db", "sqlite://x"]) else {
            panic!("not ui")
        };
        assert_eq!(u.listen, crate::ui::DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(
            crate::ui::DEFAULT_LISTEN,
            format!("127.0.0.1:{}", crate::ui::DEFAULT_PORT)
        );
        // --ui-public without a UI parses (the key may come from the config file), and
        // validation refuses it: `config::tests::web_ui_keys`.
        let Command::Serve(s) = parse(&["c", "serve", "--ui-public"]) else {
            panic!("not serve")
        };
        assert!(s.ui_public && s.ui_listen.is_none());
    }
}
