//! `listenscope-agent run` configuration: a TOML file (example in
//! `deploy/agent.toml`), overridden by flags.
//!
//! Two stages: [`RawConfig`] is what the file says (unknown keys are errors), then
//! [`RawConfig::validate`] checks everything and reports *all* problems at once.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess, Visitor};

use listenscope_core::config::{format_duration, parse_duration, read_toml};

use crate::scan::NetnsSelector;

/// The agent's TOML file. Every key is optional in the file; the required ones must then
/// come from flags.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Collector URL, `https://HOST:PORT`, or an array of them (collectors sharing one
    /// database): one session at a time, starting with the first, moving to the next when a
    /// connection fails or breaks. Required, at least one, no duplicates.
    #[serde(default, deserialize_with = "one_or_many")]
    pub collector: Option<Vec<String>>,
    /// CA certificate (PEM) that signed the collector's certificate. Required.
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM); its DNS name is the host's identity. Required.
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM). Required.
    pub tls_key: Option<PathBuf>,
    /// Time between whole scans, e.g. "60s". Default 60s, at least 1s. With `watch` set
    /// to doorbell or polling, changes arrive sooner and the whole scan reconciles.
    pub interval: Option<String>,
    /// How changes are noticed between whole scans: "auto" (default: the doorbell when
    /// the kernel lets the agent use it, else polling), "doorbell" (the same; the
    /// fallback is logged as an error), "polling" (adaptive, within 1 % of a core), or
    /// "interval" (only the whole scans).
    pub watch: Option<String>,
    /// Whether the doorbell also watches successful `bind()` calls, the only prompt
    /// notice of a new UDP socket. Default true. Its price is paid by every process on
    /// the host: while a syscall tracepoint is enabled, every system call takes the
    /// kernel's tracing path (about 27 ns more each, measured on Linux 6.18). With false,
    /// new UDP sockets are found by the next whole scan (`interval`); TCP is unaffected.
    pub bind_events: Option<bool>,
    /// Namespaces to scan: "all" (default), "current", a name, a path (/run/netns/NAME,
    /// an nsfs mount, /proc/PID/ns/net), an inode or "net:[INODE]" (as `scan --netns`).
    pub netns: Option<String>,
    /// Most listener changes held while the collector is unreachable; past it the agent
    /// sends one fresh snapshot on reconnect instead. Default 100000.
    pub max_pending_changes: Option<usize>,
    /// Longest wait between rounds of reconnect attempts (after every collector failed in
    /// a row), e.g. "30s". Default 30s, at least 100ms.
    pub reconnect_max: Option<String>,
    /// Host name to expect in the collector's certificate, for every URL; default: each
    /// URL's own host.
    pub server_name: Option<String>,
    /// Directory for the outbox journal and the instance id (docs/security.md), e.g.
    /// "/var/lib/listenscope-agent"; the agent creates its last component (0700) and locks
    /// it. Default: systemd's `$STATE_DIRECTORY` (the unit's `StateDirectory=`), else none:
    /// unacknowledged changes are then lost when the agent restarts.
    pub state_dir: Option<PathBuf>,
    /// Most bytes the outbox journal may take, e.g. 33554432. Default 32 MiB, at least
    /// 64 KiB. Past it, pending changes collapse into one snapshot.
    pub journal_max_bytes: Option<u64>,
}

/// `collector = "URL"` or `collector = ["URL", …]`.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct OneOrMany;
    impl<'de> Visitor<'de> for OneOrMany {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a URL string or an array of URL strings")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<String>, E> {
            Ok(vec![s.to_string()])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                urls.push(url);
            }
            Ok(urls)
        }
    }
    d.deserialize_any(OneOrMany).map(Some)
}

/// Validated settings for `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Collector URLs (`https://HOST:PORT`), at least one, no two with the same host and
    /// port, in the order they are tried.
    pub collectors: Vec<String>,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub interval: Duration,
    pub watch: WatchSetting,
    /// The doorbell watches `bind()` too (UDP opens at once).
    pub bind_events: bool,
    pub netns: NetnsSelector,
    pub max_pending_changes: usize,
    pub reconnect_max: Duration,
    pub server_name: Option<String>,
}

/// How `run` notices changes between whole scans (`watch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WatchSetting {
    /// The doorbell when it opens, else polling (logged once as a warning).
    #[default]
    Auto,
    /// The doorbell; falling back to polling is logged as an error (someone asked for it).
    Doorbell,
    /// Polling only.
    Polling,
    /// Whole scans every `interval`, nothing in between.
    Interval,
}

impl std::str::FromStr for WatchSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(WatchSetting::Auto),
            "doorbell" => Ok(WatchSetting::Doorbell),
            "polling" => Ok(WatchSetting::Polling),
            "interval" => Ok(WatchSetting::Interval),
            other => Err(format!(
                "watch {other:?} is not one of auto, doorbell, polling, interval"
            )),
        }
    }
}

/// Where the agent keeps its state (`transport::state`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// None: no journal, and a new instance id per process.
    pub state_dir: Option<PathBuf>,
    pub journal_max_bytes: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            state_dir: None,
            journal_max_bytes: crate::transport::journal::DEFAULT_MAX_BYTES,
        }
    }
}

/// The smallest `journal_max_bytes`.
pub const JOURNAL_MIN_BYTES: u64 = 64 * 1024;

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

    /// Values from `other` win where set (a list of collectors replaces the other list
    /// wholesale; lists are never merged).
    pub fn overridden_by(self, other: RawConfig) -> RawConfig {
        RawConfig {
            collector: other.collector.or(self.collector),
            tls_ca: other.tls_ca.or(self.tls_ca),
            tls_cert: other.tls_cert.or(self.tls_cert),
            tls_key: other.tls_key.or(self.tls_key),
            interval: other.interval.or(self.interval),
            watch: other.watch.or(self.watch),
            bind_events: other.bind_events.or(self.bind_events),
            netns: other.netns.or(self.netns),
            max_pending_changes: other.max_pending_changes.or(self.max_pending_changes),
            reconnect_max: other.reconnect_max.or(self.reconnect_max),
            server_name: other.server_name.or(self.server_name),
            state_dir: other.state_dir.or(self.state_dir),
            journal_max_bytes: other.journal_max_bytes.or(self.journal_max_bytes),
        }
    }

    /// [`RawConfig::validate_all`] without the state settings.
    pub fn validate(self) -> Result<RunConfig, ConfigErrors> {
        self.validate_all().map(|(run, _)| run)
    }

    /// Checks everything, the state directory settings included.
    pub fn validate_all(self) -> Result<(RunConfig, StateConfig), ConfigErrors> {
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
        let collectors = match self.collector {
            None => {
                errs.push("collector is required (flag --collector https://HOST:PORT)".into());
                Vec::new()
            }
            Some(urls) if urls.is_empty() => {
                errs.push("collector is an empty list: give at least one https://HOST:PORT".into());
                Vec::new()
            }
            Some(urls) => check_collectors(urls, &mut errs),
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
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let reconnect_max = duration(
            self.reconnect_max,
            "reconnect_max",
            Duration::from_secs(30),
            Duration::from_millis(100),
        );
        let watch = match self.watch.as_deref() {
            None => WatchSetting::Auto,
            Some(v) => v.parse().unwrap_or_else(|e| {
                errs.push(e);
                WatchSetting::Auto
            }),
        };
        let netns = match self.netns.as_deref() {
            None => NetnsSelector::All,
            Some(v) => v.parse().unwrap_or_else(|e| {
                errs.push(format!("netns {v:?}: {e}"));
                NetnsSelector::All
            }),
        };
        let max_pending_changes = self.max_pending_changes.unwrap_or(100_000);
        if max_pending_changes == 0 {
            errs.push("max_pending_changes must be at least 1".into());
        }
        let journal_max_bytes = self
            .journal_max_bytes
            .unwrap_or(crate::transport::journal::DEFAULT_MAX_BYTES);
        if journal_max_bytes < JOURNAL_MIN_BYTES {
            errs.push(format!(
                "journal_max_bytes {journal_max_bytes} is below {JOURNAL_MIN_BYTES} (64 KiB); \
                 the default is 33554432 (32 MiB)"
            ));
        }
        match &self.state_dir {
            Some(d) if d.as_os_str().is_empty() => {
                errs.push("state_dir is empty: give a directory, or leave it out".into());
            }
            Some(d) if d.is_relative() => errs.push(format!(
                "state_dir {:?} is relative: give an absolute path (e.g. /var/lib/listenscope-agent)",
                d.display().to_string()
            )),
            _ => {}
        }
        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        let state = StateConfig {
            state_dir: self.state_dir,
            journal_max_bytes,
        };
        Ok((
            RunConfig {
                collectors,
                tls_ca,
                tls_cert,
                tls_key,
                interval,
                watch,
                bind_events: self.bind_events.unwrap_or(true),
                netns,
                max_pending_changes,
                reconnect_max,
                server_name: self.server_name,
            },
            state,
        ))
    }
}

/// Trims each URL and reports every bad one and every one listed twice (same host and port:
/// the same collector, whatever the path or case).
fn check_collectors(urls: Vec<String>, errs: &mut Vec<String>) -> Vec<String> {
    let urls: Vec<String> = urls.into_iter().map(|u| u.trim().to_string()).collect();
    let mut seen = HashSet::new();
    let mut reported = HashSet::new();
    for url in &urls {
        match check_url(url) {
            Err(why) => errs.push(format!("collector {url:?} {why}")),
            Ok(authority) => {
                if !seen.insert(authority.clone()) && reported.insert(authority) {
                    errs.push(format!(
                        "collector {url:?} is listed more than once (same host and port)"
                    ));
                }
            }
        }
    }
    urls
}

/// Checks one collector URL; returns its lower-cased `host:port`, the collector's
/// identity for finding duplicates.
fn check_url(url: &str) -> Result<String, String> {
    if !url.starts_with("https://") {
        return Err("must be an https:// URL (mutual TLS is mandatory)".into());
    }
    if url.contains(',') {
        // Only the file can get here: flags are split at commas.
        return Err(
            "holds a comma: list several collectors as an array, collector = [\"https://a:7443\", \"https://b:7443\"]"
                .into(),
        );
    }
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| format!("is not a valid URL ({e})"))?;
    match (uri.authority(), uri.port_u16()) {
        (Some(a), _) if a.as_str().contains('@') => {
            Err("must not carry a user name or password (the identity is the certificate)".into())
        }
        (Some(a), Some(port)) if port != 0 && !a.host().is_empty() => {
            Ok(a.as_str().to_ascii_lowercase())
        }
        _ => {
            Err("has no host:port after https:// (e.g. https://collector.example.net:7443)".into())
        }
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
            "collector = \"http://x:1\"\ninterval = \"0s\"\nnetns = \"net:[x]\"\nmax_pending_changes = 0\n\
             journal_max_bytes = 10\nstate_dir = \"var/lib/x\"\nwatch = \"sometimes\"\n",
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
            "journal_max_bytes 10 is below 65536",
            "state_dir \"var/lib/x\" is relative",
            "watch \"sometimes\" is not one of auto, doorbell, polling, interval",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }

    /// `run --netns` takes what `scan --netns` takes.
    #[test]
    fn netns_takes_the_scan_selectors() {
        let netns = |v: &str| {
            let raw: RawConfig = toml::from_str(&format!(
                "collector = \"https://c:1\"\ntls_ca = \"a\"\ntls_cert = \"b\"\ntls_key = \"c\"\nnetns = {v:?}\n"
            ))
            .unwrap();
            raw.validate().map(|c| c.netns).map_err(|e| e.to_string())
        };
        assert_eq!(netns("all"), Ok(NetnsSelector::All));
        assert_eq!(netns("current"), Ok(NetnsSelector::Current));
        assert_eq!(netns("blue"), Ok(NetnsSelector::Name("blue".into())));
        assert_eq!(
            netns("/run/netns/blue"),
            Ok(NetnsSelector::Name("/run/netns/blue".into()))
        );
        assert_eq!(
            netns("net:[4026532177]"),
            Ok(NetnsSelector::Inode(4026532177))
        );
        assert_eq!(netns("4026532177"), Ok(NetnsSelector::Inode(4026532177)));
        let err = netns("").unwrap_err();
        assert!(
            err.contains("- netns \"\": empty namespace selector; use all"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<RawConfig>("colector = \"https://x:1\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let file: RawConfig =
            toml::from_str("collector = [\"https://a:1\", \"https://c:3\"]\ninterval = \"5s\"\n")
                .unwrap();
        let flags = RawConfig {
            collector: Some(vec!["https://b:2".into()]),
            ..RawConfig::default()
        };
        let merged = file.clone().overridden_by(flags);
        // A flag list replaces the file's list wholesale.
        assert_eq!(merged.collector, Some(vec!["https://b:2".to_string()]));
        assert_eq!(merged.interval.as_deref(), Some("5s"));
        // No flag: the file's list stays, in its order.
        let merged = file.overridden_by(RawConfig::default());
        assert_eq!(
            merged.collector,
            Some(vec!["https://a:1".to_string(), "https://c:3".to_string()])
        );
    }

    /// `collector = …` (TOML) with the required certificate keys added, validated: the
    /// collectors, or every problem (one per line).
    fn collectors(collector_toml: &str) -> Result<Vec<String>, String> {
        let raw: RawConfig = toml::from_str(&format!(
            "{collector_toml}\ntls_ca = \"ca.pem\"\ntls_cert = \"h.pem\"\ntls_key = \"h.key\"\n"
        ))
        .map_err(|e| format!("TOML: {e}"))?;
        raw.validate()
            .map(|cfg| cfg.collectors)
            .map_err(|e| e.0.join("\n"))
    }

    #[track_caller]
    fn check_ok(collector_toml: &str, expected: &[&str]) {
        assert_eq!(
            collectors(collector_toml),
            Ok(expected.iter().map(|u| u.to_string()).collect()),
            "{collector_toml}"
        );
    }

    /// Fails with exactly these problems, in order (each a substring of one line).
    #[track_caller]
    fn check_err(collector_toml: &str, expected: &[&str]) {
        let err = collectors(collector_toml).expect_err(collector_toml);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), expected.len(), "{collector_toml}:\n{err}");
        for (line, needle) in lines.iter().zip(expected) {
            assert!(
                line.contains(needle),
                "{collector_toml}: {needle:?} not in {line:?}"
            );
        }
    }

    #[test]
    fn collector_is_one_url_or_an_array() {
        check_ok("collector = \"https://a:7443\"", &["https://a:7443"]);
        check_ok("collector = [\"https://a:7443\"]", &["https://a:7443"]);
        check_ok(
            "collector = [\"https://b:7443\", \"https://a:7443\", \"https://[::1]:7443\"]",
            &["https://b:7443", "https://a:7443", "https://[::1]:7443"],
        );
        // Same host, other port: another collector.
        check_ok(
            "collector = [\"https://a:7443\", \"https://a:7444\"]",
            &["https://a:7443", "https://a:7444"],
        );
        check_ok("collector = [\" https://a:7443 \"]", &["https://a:7443"]);
        check_ok(
            "collector = \"https://10.0.0.1:7443/\"",
            &["https://10.0.0.1:7443/"],
        );
    }

    #[test]
    fn bad_collectors_are_each_named() {
        check_err("collector = []", &["collector is an empty list"]);
        check_err("", &["collector is required"]);
        check_err(
            "collector = [\"http://a:7443\", \"https://:7443\", \"https://b\", \"https://c:0\", \"a:7443\"]",
            &[
                "collector \"http://a:7443\" must be an https:// URL",
                "collector \"https://:7443\" has no host:port",
                "collector \"https://b\" has no host:port",
                "collector \"https://c:0\" has no host:port",
                "collector \"a:7443\" must be an https:// URL",
            ],
        );
        check_err(
            "collector = \"https://a:7443,https://b:7443\"",
            &[
                "collector \"https://a:7443,https://b:7443\" holds a comma: list several collectors as an array",
            ],
        );
        check_err(
            "collector = \"https://a b:7443\"",
            &["collector \"https://a b:7443\" is not a valid URL"],
        );
        check_err(
            "collector = \"https://agent:secret@a:7443\"",
            &["must not carry a user name or password"],
        );
        check_err(
            "collector = [\"\"]",
            &["collector \"\" must be an https:// URL"],
        );
    }

    #[test]
    fn duplicate_collectors_are_refused_once_each() {
        check_err(
            "collector = [\"https://a:7443\", \"https://b:7443\", \"https://A:7443/\", \"https://a:7443\"]",
            &["collector \"https://A:7443/\" is listed more than once"],
        );
        // Bad and duplicate problems are reported together.
        check_err(
            "collector = [\"https://b:1\", \"http://x:1\", \"https://b:1\"]",
            &[
                "\"http://x:1\" must be an https:// URL",
                "\"https://b:1\" is listed more than once",
            ],
        );
    }

    #[test]
    fn deploy_example_is_valid_in_both_forms() {
        let example = include_str!("../../deploy/agent.toml");
        let raw: RawConfig = toml::from_str(example).unwrap();
        let (run, state) = raw.validate_all().unwrap();
        assert_eq!(run.collectors.len(), 1);
        assert_eq!(
            state,
            StateConfig {
                state_dir: Some("/var/lib/listenscope-agent".into()),
                journal_max_bytes: crate::transport::journal::DEFAULT_MAX_BYTES,
            }
        );
        // The commented array form, in place of the string.
        let array = example
            .replacen("\ncollector = \"", "\n# collector = \"", 1)
            .replacen("# collector = [", "collector = [", 1);
        let raw: RawConfig = toml::from_str(&array).unwrap();
        assert_eq!(raw.validate().unwrap().collectors.len(), 2, "{array}");
    }

    #[test]
    fn collector_of_another_type_is_a_toml_error() {
        let err = collectors("collector = 7443").unwrap_err();
        assert!(
            err.contains("a URL string or an array of URL strings"),
            "{err}"
        );
        let err = collectors("collector = [7443]").unwrap_err();
        assert!(err.starts_with("TOML: "), "{err}");
    }
}
