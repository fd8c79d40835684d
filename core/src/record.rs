//! The fleet's unit of inventory: one listener per endpoint.
//!
//! A scan reports sockets; the fleet stores *endpoints*: (namespace, protocol, family,
//! address, port, interface, v6only). Sockets sharing an endpoint (an SO_REUSEPORT group,
//! one socket per worker) become one [`ListenerRecord`] whose `sockets` counts them and
//! whose `processes` is the union of their owners. A host's inventory is a [`State`]:
//! records by key, ordered, so two states diff in one merge pass (`diff.rs`).
//!
//! These are domain types: the agent's transport converts them to protobuf and the
//! collector converts back with validation (`wire.rs`). The agent builds them from a scan
//! (`listenscope_agent::record::state_of`).
//!
//! Each record carries the firewall's verdict per IP version ([`FirewallAnswer`]): the
//! verdict and its conditions are material (a ruleset change that opens or closes a port
//! is history), the reason is not (it names rule handles, which change on every reload).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::domain::{Container, Effective, Family, ProcessInfo, Protocol, Reach, Source};
use crate::limits;

/// What identifies a listener on a host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub netns: String,
    pub protocol: Protocol,
    pub family: Family,
    pub address: IpAddr,
    pub port: u16,
    /// Bound device; `None` when not bound to one.
    pub interface: Option<String>,
    /// As the kernel reported it; `None` for AF_INET or when unknown.
    pub v6only: Option<bool>,
}

/// The reason of a verdict the agent did not send: an agent older than firewall verdicts
/// (the wire leaves the field out). The collector stores `unknown` with this reason.
pub const NOT_REPORTED: &str = "the agent does not report firewall verdicts (upgrade it)";

/// The reason migration 0007 gives the rows stored before verdicts existed (the same text
/// is in `migrations/*/0007_effective_exposure.sql`; a collector test holds them equal).
pub const STORED_BEFORE_VERDICTS: &str = "stored before the collector recorded firewall verdicts";

/// What the namespace's own firewall (nftables, iptables) lets through to a listener over
/// one IP version, for a new connection from off-host: the agent's
/// `firewall::Answer` as the fleet keeps it (a DNAT target is part of the reason).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FirewallAnswer {
    pub verdict: Effective,
    /// The deciding rule (`inet filter input handle 7: tcp dport 22 accept`), the policy
    /// (`policy drop of inet filter input`), or why the verdict is unknown. Not material.
    pub reason: String,
    /// `restricted` only: each entry one way in (`saddr 198.51.100.0/24`,
    /// `iifname eth0 and sport 67`); never empty strings, never a line break. Material
    /// (compared as a set).
    pub conditions: Vec<String>,
}

impl FirewallAnswer {
    pub fn new(verdict: Effective, reason: impl Into<String>) -> FirewallAnswer {
        FirewallAnswer {
            verdict,
            reason: reason.into(),
            conditions: Vec::new(),
        }
    }

    /// `unknown` because the agent did not report verdicts ([`NOT_REPORTED`]).
    pub fn not_reported() -> FirewallAnswer {
        FirewallAnswer::new(Effective::Unknown, NOT_REPORTED)
    }

    /// Applies [`limits::EFFECTIVE_REASON`], [`limits::EFFECTIVE_CONDITIONS`] and
    /// [`limits::EFFECTIVE_CONDITION`], and makes the texts safe to store and print:
    /// control characters become visible escapes (`\u{1b}`), which the collector would
    /// otherwise refuse along with the whole snapshot. Conditions are kept for
    /// `restricted` only, without empty entries, sorted by bytes and each once; past the
    /// count limit the last entry says how many more there were (it sorts last). Idempotent.
    pub fn bound(&mut self) {
        clean(&mut self.reason, limits::EFFECTIVE_REASON);
        if self.verdict != Effective::Restricted {
            self.conditions.clear();
        }
        for c in &mut self.conditions {
            clean(c, limits::EFFECTIVE_CONDITION);
        }
        self.conditions.retain(|c| !c.is_empty());
        // The summary entry sorts after every condition, so that a second call leaves it
        // last: by bytes alone `…` (U+2026) sorts before `‧` or any CJK text, and a
        // summary appended after those would move on the next call (not idempotent).
        self.conditions
            .sort_unstable_by(|a, b| (is_summary(a), a).cmp(&(is_summary(b), b)));
        self.conditions.dedup();
        if self.conditions.len() > limits::EFFECTIVE_CONDITIONS {
            let keep = limits::EFFECTIVE_CONDITIONS - 1;
            let more = self.conditions.len() - keep;
            self.conditions.truncate(keep);
            self.conditions
                .push(format!("{SUMMARY_START}{more}{SUMMARY_END}"));
        }
    }
}

/// The entry [`FirewallAnswer::bound`] puts last when it drops conditions:
/// `… and N more ways in`.
const SUMMARY_START: &str = "… and ";
const SUMMARY_END: &str = " more ways in";

fn is_summary(c: &str) -> bool {
    c.strip_prefix(SUMMARY_START)
        .and_then(|rest| rest.strip_suffix(SUMMARY_END))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `c` must never reach a terminal as itself: control characters (C0, DEL, C1:
/// escape sequences, line breaks, bell) and the invisible formatting characters that
/// reorder or hide text (bidirectional overrides and isolates, zero-width characters, the
/// byte order mark, the soft hyphen), with which `:::80` can be made to read as
/// something else.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{ad}'
            | '\u{61c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}')
}

/// Text safe to store and print: every [`is_unsafe_char`] escaped as visible text
/// (`\u{1b}`). Returns `None` when `s` is already safe.
pub fn escape_unsafe(s: &str) -> Option<String> {
    escape_unsafe_except(s, &[])
}

/// [`escape_unsafe`] leaving the characters of `keep` alone (CSV quotes line breaks and
/// tabs itself).
pub fn escape_unsafe_except(s: &str, keep: &[char]) -> Option<String> {
    let escape = |c: char| is_unsafe_char(c) && !keep.contains(&c);
    if !s.chars().any(escape) {
        return None;
    }
    Some(
        s.chars()
            .map(|c| {
                if escape(c) {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// [`escape_unsafe`], then cut to `max` bytes at a character boundary, ending in `…` when
/// cut. A no-op on a clean, short string.
pub fn clean(s: &mut String, max: usize) {
    if let Some(escaped) = escape_unsafe(s) {
        *s = escaped;
    }
    if s.len() > max {
        let mut end = max - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// One listener (endpoint) and what the agent concluded about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenerRecord {
    pub key: ListenerKey,
    pub netns_inode: u64,
    pub reach_ipv4: Reach,
    pub reach_ipv6: Reach,
    pub latent: bool,
    pub shown_as: String,
    pub netstat_proto: String,
    pub trap: bool,
    pub hidden_ipv4_exposure: bool,
    /// Owners, ascending by pid, each once.
    pub processes: Vec<ProcessInfo>,
    pub container: Option<Container>,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    pub uid: u32,
    pub freebind: Option<bool>,
    pub transparent: Option<bool>,
    pub source: Source,
    /// Sockets on this endpoint (1 unless SO_REUSEPORT).
    pub sockets: u32,
    /// What the firewall lets through over IPv4 / over IPv6 (`n/a` for a version the
    /// socket accepts nothing of from off-host).
    pub effective_ipv4: FirewallAnswer,
    pub effective_ipv6: FirewallAnswer,
}

/// A host's inventory at one moment.
pub type State = BTreeMap<ListenerKey, ListenerRecord>;

impl ListenerRecord {
    /// The fields whose change is an event worth a new history version. Owner pids,
    /// cmdlines, the socket count, the namespace inode and the firewall verdicts' reasons
    /// churn on healthy hosts (worker recycling, reloads, reboots, ruleset reloads that
    /// renumber rule handles) and are refreshed in place instead; the exposure, the
    /// classification, who owns it by name and what the firewall lets through (verdicts
    /// and their conditions) are history.
    pub fn material(&self) -> MaterialView<'_> {
        let mut names: Vec<&str> = self.processes.iter().map(|p| p.comm.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut users: Vec<&str> = self.processes.iter().map(|p| p.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        MaterialView {
            reach: (self.reach_ipv4, self.reach_ipv6),
            latent: self.latent,
            shown_as: &self.shown_as,
            netstat_proto: &self.netstat_proto,
            trap: self.trap,
            hidden_ipv4_exposure: self.hidden_ipv4_exposure,
            process_names: names,
            users,
            container: self.container.as_ref(),
            unit: self.unit.as_deref(),
            cgroup: self.cgroup.as_deref(),
            uid: self.uid,
            sockopts: (self.freebind, self.transparent),
            source: self.source,
            effective: (self.effective_ipv4.verdict, self.effective_ipv6.verdict),
            conditions: (
                sorted_set(&self.effective_ipv4.conditions),
                sorted_set(&self.effective_ipv6.conditions),
            ),
        }
    }

    /// Distinct owner command names, sorted, comma-separated (`apache2,php-fpm`).
    pub fn process_names(&self) -> String {
        self.material().process_names.join(",")
    }

    /// Rough size on the wire, for splitting messages.
    pub fn approx_bytes(&self) -> usize {
        let k = &self.key;
        let strings = k.netns.len()
            + k.interface.as_ref().map_or(0, String::len)
            + self.shown_as.len()
            + self.unit.as_ref().map_or(0, String::len)
            + self.cgroup.as_ref().map_or(0, String::len)
            + self
                .container
                .as_ref()
                .map_or(0, |c| c.id.len() + c.runtime.len() + 40);
        let procs: usize = self
            .processes
            .iter()
            .map(|p| p.comm.len() + p.cmdline.len() + p.user.len() + 16)
            .sum();
        let firewall: usize = [&self.effective_ipv4, &self.effective_ipv6]
            .iter()
            .map(|a| 16 + a.reason.len() + a.conditions.iter().map(|c| c.len() + 2).sum::<usize>())
            .sum();
        128 + strings + procs + firewall
    }

    /// Applies [`limits::PROCESSES`], [`limits::CMDLINE_BUDGET`], [`limits::SOCKETS`] and
    /// the verdicts' bounds ([`FirewallAnswer::bound`]), and makes every text safe to store
    /// and print ([`clean`]): a process may name itself `\x1b]0;pwned\x07`, and the
    /// collector refuses a record with control characters (and the snapshot with it).
    /// Idempotent.
    pub fn bound(&mut self) {
        self.effective_ipv4.bound();
        self.effective_ipv6.bound();
        clean(&mut self.key.netns, limits::NETNS);
        if let Some(i) = &mut self.key.interface {
            clean(i, limits::INTERFACE);
        }
        clean(&mut self.shown_as, limits::SHOWN_AS);
        for p in &mut self.processes {
            clean(&mut p.comm, limits::COMM);
            clean(&mut p.cmdline, limits::CMDLINE);
            clean(&mut p.user, limits::USER);
        }
        if let Some(c) = &mut self.container {
            clean(&mut c.runtime, limits::RUNTIME);
            clean(&mut c.id, limits::CONTAINER_ID);
            if let Some(p) = &mut c.pod_uid {
                clean(p, limits::POD_UID);
            }
        }
        if let Some(u) = &mut self.unit {
            clean(u, limits::UNIT);
        }
        if let Some(c) = &mut self.cgroup {
            clean(c, limits::CGROUP);
        }
        self.processes.truncate(limits::PROCESSES);
        self.sockets = self.sockets.min(limits::SOCKETS);
        let mut budget = limits::CMDLINE_BUDGET;
        for p in &mut self.processes {
            if p.cmdline.len() > budget {
                p.cmdline.clear();
            }
            budget = budget.saturating_sub(p.cmdline.len());
        }
    }
}

/// The distinct entries of `v`, sorted by bytes (material lists are sets).
fn sorted_set(v: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = v.iter().map(String::as_str).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// See [`ListenerRecord::material`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MaterialView<'a> {
    pub(crate) reach: (Reach, Reach),
    pub(crate) latent: bool,
    pub(crate) shown_as: &'a str,
    pub(crate) netstat_proto: &'a str,
    pub(crate) trap: bool,
    pub(crate) hidden_ipv4_exposure: bool,
    pub(crate) process_names: Vec<&'a str>,
    pub(crate) users: Vec<&'a str>,
    pub(crate) container: Option<&'a Container>,
    pub(crate) unit: Option<&'a str>,
    pub(crate) cgroup: Option<&'a str>,
    pub(crate) uid: u32,
    pub(crate) sockopts: (Option<bool>, Option<bool>),
    pub(crate) source: Source,
    /// Firewall verdicts over IPv4, IPv6.
    pub(crate) effective: (Effective, Effective),
    /// Their conditions, each list sorted and deduplicated.
    pub(crate) conditions: (Vec<&'a str>, Vec<&'a str>),
}

/// Builders for tests in this and the other crates (feature `test-support`).
#[cfg(any(test, feature = "test-support"))]
#[allow(clippy::unwrap_used)] // test support: a bad literal should fail the test loudly
pub mod testkit {
    use super::*;

    /// A plausible record: an nginx-owned TCP listener in a namespace without firewall
    /// rules (both versions `open`), for tests across the workspace.
    pub fn record(netns: &str, addr: &str, port: u16, v6only: Option<bool>) -> ListenerRecord {
        let address: IpAddr = addr.parse().unwrap();
        ListenerRecord {
            key: ListenerKey {
                netns: netns.into(),
                protocol: Protocol::Tcp,
                family: if address.is_ipv4() {
                    Family::Ipv4
                } else {
                    Family::Ipv6
                },
                address,
                port,
                interface: None,
                v6only,
            },
            netns_inode: 4026531833,
            reach_ipv4: Reach::Any,
            reach_ipv6: Reach::Any,
            latent: false,
            shown_as: format!(":::{port}"),
            netstat_proto: "tcp6".into(),
            trap: true,
            hidden_ipv4_exposure: true,
            processes: vec![ProcessInfo {
                pid: 100,
                comm: "nginx".into(),
                cmdline: "nginx: master process".into(),
                user: "root".into(),
            }],
            container: None,
            unit: Some("nginx.service".into()),
            cgroup: Some("/system.slice/nginx.service".into()),
            uid: 0,
            freebind: Some(false),
            transparent: Some(false),
            source: Source::SockDiag,
            sockets: 1,
            effective_ipv4: FirewallAnswer::new(
                Effective::Open,
                "no firewall rules in this namespace",
            ),
            effective_ipv6: FirewallAnswer::new(
                Effective::Open,
                "no firewall rules in this namespace",
            ),
        }
    }

    /// `restricted` with these conditions, decided by `reason`.
    pub fn restricted(reason: &str, conditions: &[&str]) -> FirewallAnswer {
        FirewallAnswer {
            verdict: Effective::Restricted,
            reason: reason.into(),
            conditions: conditions.iter().map(|c| c.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::record;
    use super::*;

    #[test]
    fn records_are_bounded() {
        let mut r = record("host", "::", 80, Some(false));
        r.processes = (1..=5000u32)
            .map(|pid| ProcessInfo {
                pid,
                comm: "worker".into(),
                cmdline: "x".repeat(1000),
                user: "www-data".into(),
            })
            .collect();
        r.bound();
        assert_eq!(r.processes.len(), limits::PROCESSES);
        let cmd: usize = r.processes.iter().map(|p| p.cmdline.len()).sum();
        assert!(cmd <= limits::CMDLINE_BUDGET, "{cmd}");
        assert_eq!(
            r.processes.last().unwrap().comm,
            "worker",
            "names and pids stay"
        );
        assert!(r.approx_bytes() < 300 * 1024);
    }

    #[test]
    fn pid_churn_is_not_material() {
        let a = record("host", "::", 80, Some(false));
        let mut b = a.clone();
        b.processes[0].pid = 101;
        b.processes[0].cmdline = "nginx: worker".into();
        b.sockets = 4;
        b.netns_inode = 1;
        assert_eq!(a.material(), b.material());
        let mut c = a.clone();
        c.reach_ipv4 = Reach::None;
        assert_ne!(a.material(), c.material());
        let mut d = a.clone();
        d.processes[0].comm = "apache2".into();
        assert_ne!(a.material(), d.material());
    }

    #[test]
    fn verdicts_and_conditions_are_material_reasons_are_not() {
        let a = record("host", "::", 80, Some(false));
        // A ruleset reload renumbers handles: the reason changes, nothing material does.
        let mut reload = a.clone();
        reload.effective_ipv4.reason = "inet filter input handle 12: tcp dport 80 accept".into();
        assert_eq!(a.material(), reload.material());
        let mut closed = a.clone();
        closed.effective_ipv4 = FirewallAnswer::new(Effective::Filtered, "policy drop");
        assert_ne!(a.material(), closed.material());
        let mut v6 = a.clone();
        v6.effective_ipv6.verdict = Effective::Unknown;
        assert_ne!(a.material(), v6.material());
        // Conditions are a set: order and repeats do not matter, content does.
        let mut r1 = a.clone();
        r1.effective_ipv4 = testkit::restricted("r", &["saddr 10.0.0.0/8", "iifname eth0"]);
        let mut r2 = a.clone();
        r2.effective_ipv4 =
            testkit::restricted("r", &["iifname eth0", "saddr 10.0.0.0/8", "iifname eth0"]);
        assert_eq!(r1.material(), r2.material());
        let mut r3 = a.clone();
        r3.effective_ipv4 = testkit::restricted("r", &["saddr 10.0.0.0/16", "iifname eth0"]);
        assert_ne!(r1.material(), r3.material());
    }

    #[track_caller]
    fn check_bound(mut a: FirewallAnswer, reason: &str, conditions: &[&str]) {
        a.bound();
        assert_eq!(a.reason, reason);
        assert_eq!(a.conditions, conditions);
        let once = a.clone();
        a.bound();
        assert_eq!(a, once, "bound is idempotent");
    }

    #[test]
    fn verdicts_are_bounded_and_printable() {
        use testkit::restricted;
        check_bound(restricted("ok", &["b", "a", "a", ""]), "ok", &["a", "b"]);
        // Terminal escapes and line breaks become visible text.
        check_bound(
            restricted("rule \u{1b}[31mred", &["iifname \"e\nth0\""]),
            "rule \\u{1b}[31mred",
            &["iifname \"e\\u{a}th0\""],
        );
        // Conditions only with `restricted`.
        let mut open = restricted("accept", &["saddr 10.0.0.0/8"]);
        open.verdict = Effective::Open;
        check_bound(open, "accept", &[]);
        // Long texts are cut at a character boundary, marked with an ellipsis.
        let mut long = restricted(&"é".repeat(600), &[&"x".repeat(300)]);
        long.bound();
        assert!(long.reason.len() <= limits::EFFECTIVE_REASON && long.reason.ends_with('…'));
        assert!(long.conditions[0].len() <= limits::EFFECTIVE_CONDITION);
        // Too many ways in: the first ones and a count of the rest.
        let many: Vec<String> = (0..40).map(|i| format!("saddr 10.0.{i:02}.0/24")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut a = restricted("r", &refs);
        a.bound();
        assert_eq!(a.conditions.len(), limits::EFFECTIVE_CONDITIONS);
        assert_eq!(a.conditions[30], "saddr 10.0.30.0/24");
        assert_eq!(a.conditions[31], "… and 9 more ways in");
        let once = a.clone();
        a.bound();
        assert_eq!(a, once);
    }

    /// Found by `core/tests/wire_props.rs` (`bound_records_are_accepted`): past the count
    /// limit the summary entry was appended after sorting, so conditions that sort after
    /// `…` (U+2026: `‧`, CJK) put it out of order and a second `bound` moved it.
    #[test]
    fn bound_is_idempotent_past_the_condition_limit() {
        let many: Vec<String> = (0..30)
            .map(|i| format!("saddr 10.0.{i:02}.0/24"))
            .chain(["‧", "日本", "日本 2"].map(String::from))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut a = testkit::restricted("r", &refs);
        a.bound();
        assert_eq!(a.conditions.len(), limits::EFFECTIVE_CONDITIONS);
        assert_eq!(a.conditions[31], "… and 2 more ways in");
        let once = a.clone();
        a.bound();
        assert_eq!(a, once);
    }
}
