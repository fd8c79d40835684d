//! `listenscope-collector serve` configuration: a TOML file (example in
//! `deploy/collector.toml`) overridden by flags, validated all at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use listenscope_core::config::{parse_duration, parse_size};
use serde::Deserialize;

use crate::admission::AdmissionLimits;
use crate::store::DbUrl;

/// The collector's TOML file. Required keys may come from flags instead.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// gRPC listen address, e.g. "0.0.0.0:7443". Required.
    pub listen: Option<String>,
    /// Database URL: "sqlite://PATH" or "postgres://…". Required.
    pub db: Option<String>,
    /// CA certificate (PEM) that signs agent certificates. Required.
    pub tls_ca: Option<PathBuf>,
    /// The collector's certificate (PEM). Required.
    pub tls_cert: Option<PathBuf>,
    /// The collector's private key (PEM). Required.
    pub tls_key: Option<PathBuf>,
    /// Certificate revocation list (PEM, `certs revoke` writes it), reloaded when it
    /// changes and on SIGHUP. Optional; default: crl.pem next to `tls_ca` if it exists.
    pub tls_crl: Option<PathBuf>,
    /// Prometheus metrics listen address, e.g. "127.0.0.1:9464". Optional (off).
    pub metrics_listen: Option<String>,
    /// A host silent for longer is stale, e.g. "5m". Default 5m.
    pub stale_after: Option<String>,
    /// Database connections for readers (and PostgreSQL writers). Default 4.
    pub pool_size: Option<u32>,
    /// Keep history (closed listeners, superseded versions) this long, e.g. "90d".
    /// Default: forever. The current state is never pruned.
    pub retain: Option<String>,
    /// Agent sessions held at once; more are refused (RESOURCE_EXHAUSTED) until one ends.
    /// Default 20000, lowered to what the open-file limit allows.
    pub max_sessions: Option<usize>,
    /// This collector's name in the `hosts` view (which collector holds each host).
    /// Default: HOSTNAME:PORT.
    pub name: Option<String>,
    /// Encoded bytes of agent messages held at once, all sessions together, e.g. "1GiB"
    /// (the default). Admission waits when it is full; memory use is about 2.5 times this
    /// at most (docs/security.md). Also caps the largest snapshot (three quarters of it
    /// minus 4 MiB, at most 256 MiB). At least 16MiB.
    pub memory_budget: Option<String>,
    /// Connections that have not finished TLS and started HTTP/2, per IPv4 address or
    /// IPv6 /64; more are closed at once. Default 32, 1 to 100000.
    pub max_unauthenticated_per_source: Option<usize>,
    /// Connections in TLS handshake (or awaiting the HTTP/2 preface) at once, any source;
    /// more are closed at once. Default 512, 1 to 100000.
    pub max_handshakes: Option<usize>,
    /// More such places, only for source addresses that completed a mutual-TLS handshake
    /// before: agents still get in during a flood. Default 256, 0 to 100000.
    pub reserved_handshakes: Option<usize>,
    /// A TLS handshake must finish within this, e.g. "5s". Default 5s, 1s to 60s.
    pub handshake_timeout: Option<String>,
    /// After TLS, the HTTP/2 preface must arrive within this. Default 5s, 1s to 60s.
    pub preface_timeout: Option<String>,
    /// Listen backlog (connections the kernel queues before accept; it caps this at
    /// net.core.somaxconn). Default: max_sessions, 1024 to 65535.
    pub listen_backlog: Option<u32>,
    /// Also serve the read-only web UI here, e.g. "127.0.0.1:7444" (docs/ui.md).
    /// Optional (off). Off loopback it needs TLS and client certificates from `tls_ca`
    /// unless `ui_public`.
    pub ui_listen: Option<String>,
    /// The web UI's certificate (PEM). Default off loopback: `tls_cert`.
    pub ui_tls_cert: Option<PathBuf>,
    /// The web UI's private key (PEM), with `ui_tls_cert`.
    pub ui_tls_key: Option<PathBuf>,
    /// Serve the web UI over TLS to every client that can connect, without client
    /// certificates. Default false.
    pub ui_public: Option<bool>,
    /// The CA (PEM) whose client certificates open the web UI off loopback, instead of
    /// `tls_ca` (whose certificates include every agent's). Its CRL is `crl.pem` next
    /// to it when present. Optional.
    pub ui_tls_ca: Option<PathBuf>,
    /// The file the values came from (not a key): errors about its keys name it.
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// The keys whose value is the file's (a flag did not override it).
    #[serde(skip)]
    pub file_keys: Vec<&'static str>,
}

/// Validated `serve` settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub db: DbUrl,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// `None`: crl.pem next to `tls_ca`, if present.
    pub tls_crl: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub stale_after_secs: u64,
    pub pool_size: u32,
    pub retain: Option<std::time::Duration>,
    /// `None`: the default, fitted to the open-file limit at start-up.
    pub max_sessions: Option<usize>,
    pub name: String,
    /// Bytes ([`crate::budget::Budget`]).
    pub memory_budget: usize,
    /// `known_sources` is the default; `serve` fits it to the session cap.
    pub admission: AdmissionLimits,
    /// `None`: [`crate::admission::backlog_for`] the session cap.
    pub listen_backlog: Option<u32>,
    /// The web UI, when it is served.
    pub ui: Option<UiConfig>,
}

/// Where and how `serve` serves the web UI.
#[derive(Debug, Clone)]
pub struct UiConfig {
    pub listen: SocketAddr,
    /// Its own certificate and key; `None`: the collector's off loopback, none on it.
    pub identity: Option<(PathBuf, PathBuf)>,
    pub public: bool,
    /// The CA of the UI's client certificates; `None`: the fleet CA (`tls_ca`).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid collector configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl RawConfig {
    pub fn load(path: &Path) -> Result<RawConfig, ConfigErrors> {
        let fail = |e: String| ConfigErrors(vec![format!("{}: {e}", path.display())]);
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(match e.kind() {
                std::io::ErrorKind::NotFound => "no such file; copy deploy/collector.toml there \
                     and edit it, or leave out --config (every key is also a flag)"
                    .to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied; make it readable \
                     by the collector's user (e.g. `chgrp listenscope FILE && chmod 640 FILE`)"
                    .to_string(),
                _ => format!("cannot read it: {e}"),
            })
        })?;
        // toml's message names the line, the key and what it expected.
        let mut raw: RawConfig = toml::from_str(&text).map_err(|e| {
            fail(format!(
                "{}(keys and their meaning: deploy/collector.toml)",
                e.to_string().trim_end().to_string() + "\n"
            ))
        })?;
        raw.file_keys = raw.set_keys();
        raw.file = Some(path.to_path_buf());
        Ok(raw)
    }

    /// The keys that have a value.
    fn set_keys(&self) -> Vec<&'static str> {
        [
            ("listen", self.listen.is_some()),
            ("db", self.db.is_some()),
            ("tls_ca", self.tls_ca.is_some()),
            ("tls_cert", self.tls_cert.is_some()),
            ("tls_key", self.tls_key.is_some()),
            ("tls_crl", self.tls_crl.is_some()),
            ("metrics_listen", self.metrics_listen.is_some()),
            ("stale_after", self.stale_after.is_some()),
            ("pool_size", self.pool_size.is_some()),
            ("retain", self.retain.is_some()),
            ("max_sessions", self.max_sessions.is_some()),
            ("name", self.name.is_some()),
            ("memory_budget", self.memory_budget.is_some()),
            (
                "max_unauthenticated_per_source",
                self.max_unauthenticated_per_source.is_some(),
            ),
            ("max_handshakes", self.max_handshakes.is_some()),
            ("reserved_handshakes", self.reserved_handshakes.is_some()),
            ("handshake_timeout", self.handshake_timeout.is_some()),
            ("preface_timeout", self.preface_timeout.is_some()),
            ("listen_backlog", self.listen_backlog.is_some()),
            ("ui_listen", self.ui_listen.is_some()),
            ("ui_tls_cert", self.ui_tls_cert.is_some()),
            ("ui_tls_key", self.ui_tls_key.is_some()),
            ("ui_public", self.ui_public.is_some()),
            ("ui_tls_ca", self.ui_tls_ca.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }

    /// Values from `other` win where set.
    pub fn overridden_by(self, other: RawConfig) -> RawConfig {
        let overridden = other.set_keys();
        let file_keys = self
            .file_keys
            .iter()
            .copied()
            .filter(|k| !overridden.contains(k))
            .collect();
        RawConfig {
            listen: other.listen.or(self.listen),
            db: other.db.or(self.db),
            tls_ca: other.tls_ca.or(self.tls_ca),
            tls_cert: other.tls_cert.or(self.tls_cert),
            tls_key: other.tls_key.or(self.tls_key),
            tls_crl: other.tls_crl.or(self.tls_crl),
            metrics_listen: other.metrics_listen.or(self.metrics_listen),
            stale_after: other.stale_after.or(self.stale_after),
            pool_size: other.pool_size.or(self.pool_size),
            retain: other.retain.or(self.retain),
            max_sessions: other.max_sessions.or(self.max_sessions),
            name: other.name.or(self.name),
            memory_budget: other.memory_budget.or(self.memory_budget),
            max_unauthenticated_per_source: other
                .max_unauthenticated_per_source
                .or(self.max_unauthenticated_per_source),
            max_handshakes: other.max_handshakes.or(self.max_handshakes),
            reserved_handshakes: other.reserved_handshakes.or(self.reserved_handshakes),
            handshake_timeout: other.handshake_timeout.or(self.handshake_timeout),
            preface_timeout: other.preface_timeout.or(self.preface_timeout),
            listen_backlog: other.listen_backlog.or(self.listen_backlog),
            ui_listen: other.ui_listen.or(self.ui_listen),
            ui_tls_cert: other.ui_tls_cert.or(self.ui_tls_cert),
            ui_tls_key: other.ui_tls_key.or(self.ui_tls_key),
            ui_public: other.ui_public.or(self.ui_public),
            ui_tls_ca: other.ui_tls_ca.or(self.ui_tls_ca),
            file: self.file,
            file_keys,
        }
    }

    pub fn validate(self) -> Result<ServeConfig, ConfigErrors> {
        let file = self.file.clone();
        let file_keys = self.file_keys.clone();
        self.validate_values().map_err(|ConfigErrors(errs)| {
            // A value from the file: say which file (the message starts with its key).
            let Some(file) = file else {
                return ConfigErrors(errs);
            };
            ConfigErrors(
                errs.into_iter()
                    .map(|e| {
                        let key = e.split([' ', ':']).next().unwrap_or("");
                        if file_keys.contains(&key) {
                            format!("{}: {e}", file.display())
                        } else {
                            e
                        }
                    })
                    .collect(),
            )
        })
    }

    fn validate_values(self) -> Result<ServeConfig, ConfigErrors> {
        let mut errs = Vec::new();
        let admission = admission_limits(&self, &mut errs);
        let mut addr = |v: Option<String>, name: &str, required: bool| -> Option<SocketAddr> {
            match v {
                None if required => {
                    errs.push(format!(
                        "{name} is required (e.g. --{} 0.0.0.0:7443)",
                        name.replace('_', "-")
                    ));
                    None
                }
                None => None,
                Some(s) => match s.parse() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        errs.push(format!(
                            "{name} {s:?} is not IP:PORT (e.g. 0.0.0.0:7443 or [::]:7443)"
                        ));
                        None
                    }
                },
            }
        };
        let listen = addr(self.listen, "listen", true);
        let metrics_listen = addr(self.metrics_listen, "metrics_listen", false);
        let ui_listen = addr(self.ui_listen, "ui_listen", false);
        let db = match self.db.as_deref().map(str::parse::<DbUrl>) {
            None => {
                errs.push("db is required (--db sqlite://PATH or postgres://…)".into());
                None
            }
            Some(Err(e)) => {
                errs.push(format!("db: {e}"));
                None
            }
            Some(Ok(u)) => Some(u),
        };
        let mut required = |v: Option<PathBuf>, name: &str| {
            if v.is_none() {
                errs.push(format!(
                    "{name} is required (--{}; create certificates with `listenscope-collector certs init`)",
                    name.replace('_', "-")
                ));
            }
            v.unwrap_or_default()
        };
        let tls_ca = required(self.tls_ca, "tls_ca");
        let tls_cert = required(self.tls_cert, "tls_cert");
        let tls_key = required(self.tls_key, "tls_key");
        let stale_after_secs = match self.stale_after.as_deref().map(parse_duration) {
            None => 300,
            Some(Ok(d)) if d.as_secs() >= 1 => d.as_secs(),
            Some(Ok(_)) => {
                errs.push("stale_after must be at least 1s".into());
                300
            }
            Some(Err(e)) => {
                errs.push(format!("stale_after: {e}"));
                300
            }
        };
        let retain = match self.retain.as_deref().map(parse_duration) {
            None => None,
            Some(Ok(d)) if d.as_secs() >= 3600 => Some(d),
            Some(Ok(_)) => {
                errs.push(
                    "retain must be at least 1h (history younger than that is always kept)".into(),
                );
                None
            }
            Some(Err(e)) => {
                errs.push(format!("retain: {e}"));
                None
            }
        };
        let pool_size = self.pool_size.unwrap_or(4);
        if pool_size == 0 || pool_size > 256 {
            errs.push(format!("pool_size {pool_size} must be between 1 and 256"));
        }
        if let Some(n) = self.max_sessions
            && !(1..=1_000_000).contains(&n)
        {
            errs.push(format!("max_sessions {n} must be between 1 and 1000000"));
        }
        if let Some(n) = &self.name
            && (n.is_empty() || n.len() > 200 || n.chars().any(char::is_control))
        {
            errs.push(format!(
                "name {n:?} must be 1 to 200 printable characters (e.g. collector-a:7443)"
            ));
        }
        let memory_budget = match self.memory_budget.as_deref().map(parse_size) {
            None => crate::budget::DEFAULT_BUDGET_BYTES,
            Some(Ok(n)) if crate::budget::Budget::new(n as usize).is_ok() => n as usize,
            Some(Ok(n)) => {
                errs.push(format!(
                    "memory_budget {n} bytes is below the minimum of {} MiB (e.g. 1GiB)",
                    crate::budget::MIN_BUDGET_BYTES >> 20
                ));
                0
            }
            Some(Err(e)) => {
                errs.push(format!("memory_budget: {e}"));
                0
            }
        };
        if let Some(n) = self.listen_backlog
            && !(1..=65_535).contains(&n)
        {
            errs.push(format!("listen_backlog {n} must be between 1 and 65535"));
        }
        let ui_identity = match (self.ui_tls_cert, self.ui_tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                errs.push("ui_tls_cert needs ui_tls_key (--ui-tls-key FILE)".into());
                None
            }
            (None, Some(_)) => {
                errs.push("ui_tls_key needs ui_tls_cert (--ui-tls-cert FILE)".into());
                None
            }
        };
        let ui_public = self.ui_public.unwrap_or(false);
        if ui_listen.is_none() && (ui_identity.is_some() || ui_public || self.ui_tls_ca.is_some()) {
            errs.push(
                "ui_tls_cert, ui_tls_key, ui_tls_ca and ui_public need ui_listen (--ui-listen ADDR): the web UI is off without it"
                    .into(),
            );
        }
        if ui_public && self.ui_tls_ca.is_some() {
            errs.push(
                "ui_tls_ca and ui_public contradict each other: ui_tls_ca asks the web UI's clients for certificates from that CA, ui_public for none; keep one"
                    .into(),
            );
        }
        let ui = ui_listen.map(|listen| UiConfig {
            listen,
            identity: ui_identity,
            public: ui_public,
            client_ca: self.ui_tls_ca,
        });
        let (Some(listen), Some(db), true) = (listen, db, errs.is_empty()) else {
            return Err(ConfigErrors(errs));
        };
        Ok(ServeConfig {
            listen,
            db,
            tls_ca,
            tls_cert,
            tls_key,
            tls_crl: self.tls_crl,
            metrics_listen,
            stale_after_secs,
            pool_size,
            retain,
            max_sessions: self.max_sessions,
            memory_budget,
            name: self
                .name
                .unwrap_or_else(|| format!("{}:{}", crate::pki::this_hostname(), listen.port())),
            admission,
            listen_backlog: self.listen_backlog,
            ui,
        })
    }
}

/// The admission keys, checked (problems go to `errs`; defaults stand in for bad values).
fn admission_limits(raw: &RawConfig, errs: &mut Vec<String>) -> AdmissionLimits {
    let d = AdmissionLimits::default();
    let mut count = |v: Option<usize>, name: &str, min: usize, default: usize| match v {
        None => default,
        Some(n) if (min..=100_000).contains(&n) => n,
        Some(n) => {
            errs.push(format!("{name} {n} must be between {min} and 100000"));
            default
        }
    };
    let per_source = count(
        raw.max_unauthenticated_per_source,
        "max_unauthenticated_per_source",
        1,
        d.per_source,
    );
    let handshakes = count(raw.max_handshakes, "max_handshakes", 1, d.handshakes);
    let reserved_handshakes = count(
        raw.reserved_handshakes,
        "reserved_handshakes",
        0,
        d.reserved_handshakes,
    );
    let mut secs = |v: Option<&str>, name: &str, default: Duration| match v.map(parse_duration) {
        None => default,
        Some(Ok(t)) if (Duration::from_secs(1)..=Duration::from_secs(60)).contains(&t) => t,
        Some(Ok(_)) => {
            errs.push(format!(
                "{name} must be between 1s and 60s (an agent gives up connecting after 10s)"
            ));
            default
        }
        Some(Err(e)) => {
            errs.push(format!("{name}: {e}"));
            default
        }
    };
    let handshake_timeout = secs(
        raw.handshake_timeout.as_deref(),
        "handshake_timeout",
        d.handshake_timeout,
    );
    let preface_timeout = secs(
        raw.preface_timeout.as_deref(),
        "preface_timeout",
        d.preface_timeout,
    );
    AdmissionLimits {
        per_source,
        handshakes,
        reserved_handshakes,
        handshake_timeout,
        preface_timeout,
        ..d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_problems_at_once() {
        let raw: RawConfig = toml::from_str(
            "listen = \"nope\"\ndb = \"mysql://x\"\nstale_after = \"5 parsecs\"\npool_size = 0\nretain = \"10m\"\nmax_sessions = 0\nname = \"\"\n\
             max_unauthenticated_per_source = 0\nmax_handshakes = 0\nreserved_handshakes = 100001\n\
             handshake_timeout = \"90s\"\npreface_timeout = \"soon\"\nlisten_backlog = 0\n",
        )
        .unwrap();
        let err = raw.validate().unwrap_err().to_string();
        for needle in [
            "listen \"nope\"",
            "db: unsupported",
            "tls_ca is required",
            "tls_cert",
            "tls_key",
            "stale_after",
            "pool_size",
            "max_sessions 0",
            "name \"\"",
            "max_unauthenticated_per_source 0 must be between 1 and 100000",
            "max_handshakes 0",
            "reserved_handshakes 100001",
            "handshake_timeout must be between 1s and 60s",
            "preface_timeout: ",
            "listen_backlog 0",
        ] {
            assert!(err.contains(needle), "{needle} missing:\n{err}");
        }
    }

    #[test]
    fn errors_name_the_file_of_a_value() {
        let dir = std::env::temp_dir().join(format!("lst-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("collector.toml");
        std::fs::write(&path, "listen = \"nope\"\nstale_after = \"5 parsecs\"\n").unwrap();
        let file = RawConfig::load(&path).unwrap();
        let flags = RawConfig {
            stale_after: Some("7 parsecs".into()),
            ..RawConfig::default()
        };
        let err = file
            .overridden_by(flags)
            .validate()
            .unwrap_err()
            .to_string();
        let p = path.display().to_string();
        assert!(err.contains(&format!("{p}: listen \"nope\"")), "{err}");
        // The flag's value is not the file's.
        assert!(err.contains("- stale_after: \"7 parsecs\""), "{err}");
        let err = RawConfig::load(&dir.join("none.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no such file; copy deploy/collector.toml"),
            "{err}"
        );
        std::fs::write(&path, "dbx = 1\n").unwrap();
        let err = RawConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&p) && err.contains("unknown field `dbx`"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The example shipped in deploy/ and the packages is a valid configuration.
    #[test]
    fn the_shipped_example_is_valid() {
        let raw: RawConfig = toml::from_str(include_str!("../../deploy/collector.toml")).unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.listen.port(), 7443);
        assert!(c.metrics_listen.is_some() && c.retain.is_some());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<RawConfig>("listn = \"x\"").is_err());
    }

    #[test]
    fn valid() {
        let raw: RawConfig = toml::from_str(
            "listen = \"127.0.0.1:7443\"\ndb = \"sqlite://x.db\"\ntls_ca = \"ca.pem\"\ntls_cert = \"s.pem\"\ntls_key = \"s.key\"\nstale_after = \"2m\"\n",
        )
        .unwrap();
        let c = raw.validate().unwrap();
        assert_eq!(c.stale_after_secs, 120);
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.admission, AdmissionLimits::default());
        assert_eq!(c.listen_backlog, None);
        let raw: RawConfig = toml::from_str(
            "max_unauthenticated_per_source = 4\nmax_handshakes = 100\nreserved_handshakes = 0\n\
             handshake_timeout = \"2s\"\npreface_timeout = \"3s\"\nlisten_backlog = 4096\n",
        )
        .unwrap();
        let c = RawConfig {
            listen: Some("127.0.0.1:7443".into()),
            db: Some("sqlite://x.db".into()),
            tls_ca: Some("ca.pem".into()),
            tls_cert: Some("s.pem".into()),
            tls_key: Some("s.key".into()),
            ..raw
        }
        .validate()
        .unwrap();
        assert_eq!((c.admission.per_source, c.admission.handshakes), (4, 100));
        assert_eq!(c.admission.reserved_handshakes, 0);
        assert_eq!(c.admission.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.admission.preface_timeout, Duration::from_secs(3));
        assert_eq!(c.listen_backlog, Some(4096));
        assert!(c.ui.is_none(), "the web UI is off unless asked for");
    }

    #[test]
    fn web_ui_keys() {
        let base = "listen = \"127.0.0.1:7443\"\ndb = \"sqlite://x.db\"\ntls_ca = \"ca.pem\"\n\
                    tls_cert = \"s.pem\"\ntls_key = \"s.key\"\n";
        let parse = |more: &str| {
            toml::from_str::<RawConfig>(&format!("{base}{more}"))
                .unwrap()
                .validate()
        };
        let ui = parse(
            "ui_listen = \"0.0.0.0:7444\"\nui_tls_cert = \"u.pem\"\nui_tls_key = \"u.key\"\n",
        )
        .unwrap()
        .ui
        .unwrap();
        assert_eq!(ui.listen, "0.0.0.0:7444".parse().unwrap());
        assert_eq!(ui.identity, Some(("u.pem".into(), "u.key".into())));
        assert!(!ui.public);
        let ui = parse("ui_listen = \"127.0.0.1:7444\"\nui_public = true\n")
            .unwrap()
            .ui
            .unwrap();
        assert!(ui.public && ui.identity.is_none());
        assert_eq!(ui.client_ca, None, "the fleet CA unless told");
        let ui = parse("ui_listen = \"0.0.0.0:7444\"\nui_tls_ca = \"ops.pem\"\n")
            .unwrap()
            .ui
            .unwrap();
        assert_eq!(ui.client_ca, Some("ops.pem".into()));
        // A flag overrides the file, key by key.
        let file: RawConfig =
            toml::from_str(&format!("{base}ui_listen = \"127.0.0.1:7444\"\n")).unwrap();
        let c = file
            .overridden_by(RawConfig {
                ui_listen: Some("127.0.0.1:9444".into()),
                ..RawConfig::default()
            })
            .validate()
            .unwrap();
        assert_eq!(c.ui.unwrap().listen.port(), 9444);
        for (more, says) in [
            (
                "ui_listen = \"localhost\"\n",
                "ui_listen \"localhost\" is not IP:PORT",
            ),
            (
                "ui_listen = \"127.0.0.1:1\"\nui_tls_cert = \"u.pem\"\n",
                "ui_tls_cert needs ui_tls_key",
            ),
            (
                "ui_listen = \"127.0.0.1:1\"\nui_tls_key = \"u.key\"\n",
                "ui_tls_key needs ui_tls_cert",
            ),
            ("ui_public = true\n", "need ui_listen"),
            ("ui_tls_ca = \"ops.pem\"\n", "need ui_listen"),
            (
                "ui_listen = \"0.0.0.0:1\"\nui_tls_ca = \"ops.pem\"\nui_public = true\n",
                "ui_tls_ca and ui_public contradict",
            ),
        ] {
            let e = parse(more).unwrap_err().to_string();
            assert!(e.contains(says), "{more:?}: {e}");
        }
    }
}
