//! `listenscope-agent run` configuration: a TOML file (example in
//! `deploy/agent.toml`), overridden by flags.
//!
//! Two stages: [`RawConfig`] is what the file says (unknown keys are errors), then
//! [`RawConfig::validate`] checks everything and reports *all* problems at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use listenscope_core::config::{format_duration, parse_duration, read_toml};

use crate::scan::NetnsSelector;

/// The agent's TOML file. Every key is optional in the file; the required ones must then
/// come from flags.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Collector URL, `https://HOST:PORT`. Required.
    pub collector: Option<String>,
    /// CA certificate (PEM) that signed the collector's certificate. Required.
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM); its DNS name is the host's identity. Required.
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM). Required.
    pub tls_key: Option<PathBuf>,
    /// Time between scans, e.g. "10s". Default 10s, at least 1s.
    pub interval: Option<String>,
    /// Namespaces to scan: "all" (default) or "current".
    pub netns: Option<String>,
    /// Most listener changes held while the collector is unreachable; past it the agent
    /// sends one fresh snapshot on reconnect instead. Default 100000.
    pub max_pending_changes: Option<usize>,
    /// Longest wait between reconnect attempts, e.g. "30s". Default 30s.
    pub reconnect_max: Option<String>,
    /// Host name to expect in the collector's certificate; default: the URL's host.
    pub server_name: Option<String>,
}

/// Validated settings for `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub collector: String,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub interval: Duration,
    pub netns: NetnsSelector,
    pub max_pending_changes: usize,
    pub reconnect_max: Duration,
    pub server_name: Option<String>,
}

/// Every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid agent configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// Reads a TOML file into `T`; the error names the file (and, from toml, the line and
/// the key).
impl RawConfig {
    pub fn load(path: &Path) -> Result<RawConfig, ConfigErrors> {
        read_toml(path).map_err(|e| ConfigErrors(vec![e]))
    }

    /// Values from `other` win where set.
    pub fn overridden_by(self, other: RawConfig) -> RawConfig {
        RawConfig {
            collector: other.collector.or(self.collector),
            tls_ca: other.tls_ca.or(self.tls_ca),
            tls_cert: other.tls_cert.or(self.tls_cert),
            tls_key: other.tls_key.or(self.tls_key),
            interval: other.interval.or(self.interval),
            netns: other.netns.or(self.netns),
            max_pending_changes: other.max_pending_changes.or(self.max_pending_changes),
            reconnect_max: other.reconnect_max.or(self.reconnect_max),
            server_name: other.server_name.or(self.server_name),
        }
    }

    pub fn validate(self) -> Result<RunConfig, ConfigErrors> {
        let mut errs = Vec::new();
        let mut required = |v: Option<PathBuf>, name: &str| {
            v.unwrap_or_else(|| {
                errs.push(format!(
                    "{name} is required (flag --{} or key {name})",
                    name.replace('_', "-")
                ));
                PathBuf::new()
            })
        };
        let tls_ca = required(self.tls_ca, "tls_ca");
        let tls_cert = required(self.tls_cert, "tls_cert");
        let tls_key = required(self.tls_key, "tls_key");
        let collector = match self.collector {
            None => {
                errs.push("collector is required (flag --collector https://HOST:PORT)".into());
                String::new()
            }
            Some(url) => {
                if !url.starts_with("https://") {
                    errs.push(format!(
                        "collector {url:?} must be an https:// URL (mutual TLS is mandatory)"
                    ));
                } else if url_host(&url).is_none() {
                    errs.push(format!("collector {url:?} has no host:port after https://"));
                }
                url
            }
        };
        let mut duration = |v: Option<String>, name: &str, default: Duration, min: Duration| match v
        {
            None => default,
            Some(s) => match parse_duration(&s) {
                Ok(d) if d >= min => d,
                Ok(_) => {
                    errs.push(format!(
                        "{name} {s:?} is shorter than {}",
                        format_duration(min)
                    ));
                    default
                }
                Err(e) => {
                    errs.push(format!("{name}: {e}"));
                    default
                }
            },
        };
        let interval = duration(
            self.interval,
            "interval",
            Duration::from_secs(10),
            Duration::from_secs(1),
        );
        let reconnect_max = duration(
            self.reconnect_max,
            "reconnect_max",
            Duration::from_secs(30),
            Duration::from_millis(100),
        );
        let netns = match self.netns.as_deref() {
            None | Some("all") => NetnsSelector::All,
            Some("current") => NetnsSelector::Current,
            Some(other) => {
                errs.push(format!("netns {other:?}: run scans \"all\" or \"current\""));
                NetnsSelector::All
            }
        };
        let max_pending_changes = self.max_pending_changes.unwrap_or(100_000);
        if max_pending_changes == 0 {
            errs.push("max_pending_changes must be at least 1".into());
        }
        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        Ok(RunConfig {
            collector,
            tls_ca,
            tls_cert,
            tls_key,
            interval,
            netns,
            max_pending_changes,
            reconnect_max,
            server_name: self.server_name,
        })
    }
}

/// `https://host:port/…` → `host` (brackets removed for IPv6 literals).
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6
            .split(']')
            .next()
            .map(str::to_string)
            .filter(|h| !h.is_empty());
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(
            url_host("https://collector:7443").as_deref(),
            Some("collector")
        );
        assert_eq!(url_host("https://[::1]:7443").as_deref(), Some("::1"));
        assert_eq!(
            url_host("https://10.0.0.1:7443/x").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(url_host("https://:7443"), None);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let raw: RawConfig = toml::from_str(
            "collector = \"http://x:1\"\ninterval = \"0s\"\nnetns = \"blue\"\nmax_pending_changes = 0\n",
        )
        .unwrap();
        let err = raw.validate().unwrap_err().to_string();
        for needle in [
            "tls_ca is required",
            "tls_cert",
            "tls_key",
            "https://",
            "interval",
            "netns",
            "max_pending_changes",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<RawConfig>("colector = \"https://x:1\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let file: RawConfig =
            toml::from_str("collector = \"https://a:1\"\ninterval = \"5s\"\n").unwrap();
        let flags = RawConfig {
            collector: Some("https://b:2".into()),
            ..RawConfig::default()
        };
        let merged = file.overridden_by(flags);
        assert_eq!(merged.collector.as_deref(), Some("https://b:2"));
        assert_eq!(merged.interval.as_deref(), Some("5s"));
    }
}
