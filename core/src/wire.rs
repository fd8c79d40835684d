//! The protobuf edge: domain records ↔ `listenscope.v1` messages.
//!
//! Domain → wire is infallible (`From`). Wire → domain is where every rule of the .proto
//! file is enforced (`TryFrom`): a collector that accepts a message through these
//! conversions stores nothing that breaks them. Errors name the field and the rule.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use listenscope_proto::v1;
use time::OffsetDateTime;

use crate::domain::{Container, Effective, Family, ProcessInfo, Protocol, Reach, Source};
use crate::limits;
use crate::record::{FirewallAnswer, ListenerKey, ListenerRecord};
use crate::watch::{Watch, WatchMode};

/// A message field that breaks a protocol rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct WireError {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> WireError {
    WireError {
        field,
        problem: problem.into(),
    }
}

fn bounded(field: &'static str, s: String, max: usize) -> Result<String, WireError> {
    if s.len() > max {
        return Err(bad(
            field,
            format!("{} bytes, at most {max} allowed", s.len()),
        ));
    }
    Ok(s)
}

/// Every text an agent sends is printed by reports in operators' terminals, and key
/// fields are joined into the stored key: a stored escape sequence would be replayed to
/// every operator who reads it, and a bidirectional override makes `:::80` read as
/// something else. So no text may carry control characters or invisible formatting
/// characters ([`crate::record::is_unsafe_char`]); the agent escapes them before sending
/// (`ListenerRecord::bound`).
fn printable(field: &'static str, s: String) -> Result<String, WireError> {
    if let Some(c) = s.chars().find(|&c| crate::record::is_unsafe_char(c)) {
        let what = if c.is_control() {
            "control characters"
        } else {
            "invisible formatting characters"
        };
        return Err(bad(
            field,
            format!(
                "contains {what} ({}); send them escaped",
                c.escape_unicode()
            ),
        ));
    }
    Ok(s)
}

/// [`bounded`], then [`printable`].
fn text(field: &'static str, s: String, max: usize) -> Result<String, WireError> {
    printable(field, bounded(field, s, max)?)
}

/// The field names of one IP version's verdict (errors name the field).
struct VerdictFields {
    verdict: &'static str,
    reason: &'static str,
    conditions: &'static str,
}

const EFFECTIVE_IPV4: VerdictFields = VerdictFields {
    verdict: "effective_ipv4.verdict",
    reason: "effective_ipv4.reason",
    conditions: "effective_ipv4.conditions",
};
const EFFECTIVE_IPV6: VerdictFields = VerdictFields {
    verdict: "effective_ipv6.verdict",
    reason: "effective_ipv6.reason",
    conditions: "effective_ipv6.conditions",
};

impl From<&FirewallAnswer> for v1::FirewallVerdict {
    fn from(a: &FirewallAnswer) -> Self {
        v1::FirewallVerdict {
            verdict: a.verdict.as_str().to_string(),
            reason: a.reason.clone(),
            conditions: a.conditions.clone(),
        }
    }
}

/// One IP version's verdict: a known name, a bounded printable reason, and conditions
/// only for `restricted` (bounded in count and size, printable, none empty). Absent, or
/// an empty verdict with nothing else (an older agent), is `unknown` for the reason
/// [`crate::record::NOT_REPORTED`].
fn firewall(
    f: &VerdictFields,
    v: Option<v1::FirewallVerdict>,
) -> Result<FirewallAnswer, WireError> {
    let Some(v) = v else {
        return Ok(FirewallAnswer::not_reported());
    };
    if v.verdict.is_empty() {
        if !v.reason.is_empty() || !v.conditions.is_empty() {
            return Err(bad(
                f.verdict,
                "empty, but a reason or conditions are given; name the verdict",
            ));
        }
        return Ok(FirewallAnswer::not_reported());
    }
    let verdict: Effective = v.verdict.parse().map_err(|_| {
        // Echo short names only (escaped by {:?}); a hostile megabyte stays out of the log.
        let shown = if v.verdict.len() <= 32 {
            format!("{:?}", v.verdict)
        } else {
            format!("a {}-byte name", v.verdict.len())
        };
        let known: Vec<&str> = Effective::ALL.iter().map(|e| e.as_str()).collect();
        bad(
            f.verdict,
            format!("{shown} is not a known verdict ({})", known.join(", ")),
        )
    })?;
    let reason = text(f.reason, v.reason, limits::EFFECTIVE_REASON)?;
    if !v.conditions.is_empty() && verdict != Effective::Restricted {
        return Err(bad(
            f.conditions,
            format!(
                "given for {}; only restricted has conditions",
                verdict.as_str()
            ),
        ));
    }
    if v.conditions.len() > limits::EFFECTIVE_CONDITIONS {
        return Err(bad(
            f.conditions,
            format!(
                "{} entries, at most {}",
                v.conditions.len(),
                limits::EFFECTIVE_CONDITIONS
            ),
        ));
    }
    let mut conditions = Vec::with_capacity(v.conditions.len());
    for c in v.conditions {
        if c.is_empty() {
            return Err(bad(f.conditions, "an empty entry"));
        }
        conditions.push(text(f.conditions, c, limits::EFFECTIVE_CONDITION)?);
    }
    Ok(FirewallAnswer {
        verdict,
        reason,
        conditions,
    })
}

fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<Protocol> for v1::Protocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Udp => v1::Protocol::Udp,
        }
    }
}

impl From<Family> for v1::Family {
    fn from(f: Family) -> Self {
        match f {
            Family::Ipv4 => v1::Family::Ipv4,
            Family::Ipv6 => v1::Family::Ipv6,
        }
    }
}

impl From<Reach> for v1::Reach {
    fn from(r: Reach) -> Self {
        match r {
            Reach::Any => v1::Reach::Any,
            Reach::Loopback => v1::Reach::Loopback,
            Reach::Specific => v1::Reach::Specific,
            Reach::None => v1::Reach::None,
            Reach::Unknown => v1::Reach::Unknown,
        }
    }
}

impl From<Source> for v1::Source {
    fn from(s: Source) -> Self {
        match s {
            Source::SockDiag => v1::Source::SockDiag,
            Source::Procfs => v1::Source::Procfs,
        }
    }
}

fn protocol(v: i32) -> Result<Protocol, WireError> {
    match v1::Protocol::try_from(v) {
        Ok(v1::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(v1::Protocol::Udp) => Ok(Protocol::Udp),
        _ => Err(bad(
            "key.protocol",
            format!("{v} is not TCP (1) or UDP (2)"),
        )),
    }
}

fn family(v: i32) -> Result<Family, WireError> {
    match v1::Family::try_from(v) {
        Ok(v1::Family::Ipv4) => Ok(Family::Ipv4),
        Ok(v1::Family::Ipv6) => Ok(Family::Ipv6),
        _ => Err(bad(
            "key.family",
            format!("{v} is not IPV4 (1) or IPV6 (2)"),
        )),
    }
}

fn reach(field: &'static str, v: i32) -> Result<Reach, WireError> {
    Ok(match v1::Reach::try_from(v) {
        Ok(v1::Reach::Any) => Reach::Any,
        Ok(v1::Reach::Loopback) => Reach::Loopback,
        Ok(v1::Reach::Specific) => Reach::Specific,
        Ok(v1::Reach::None) => Reach::None,
        Ok(v1::Reach::Unknown) => Reach::Unknown,
        _ => return Err(bad(field, format!("{v} is not a known reach (1–5)"))),
    })
}

fn source(v: i32) -> Result<Source, WireError> {
    match v1::Source::try_from(v) {
        Ok(v1::Source::SockDiag) => Ok(Source::SockDiag),
        Ok(v1::Source::Procfs) => Ok(Source::Procfs),
        _ => Err(bad(
            "source",
            format!("{v} is not SOCK_DIAG (1) or PROCFS (2)"),
        )),
    }
}

impl From<&ListenerKey> for v1::ListenerKey {
    fn from(k: &ListenerKey) -> Self {
        v1::ListenerKey {
            netns: k.netns.clone(),
            protocol: v1::Protocol::from(k.protocol) as i32,
            family: v1::Family::from(k.family) as i32,
            address: match k.address {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
            port: u32::from(k.port),
            interface: k.interface.clone().unwrap_or_default(),
            v6only: k.v6only,
        }
    }
}

impl TryFrom<v1::ListenerKey> for ListenerKey {
    type Error = WireError;

    fn try_from(k: v1::ListenerKey) -> Result<Self, WireError> {
        let family = family(k.family)?;
        let address = match family {
            Family::Ipv4 => <[u8; 4]>::try_from(k.address.as_slice())
                .ok()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            Family::Ipv6 => <[u8; 16]>::try_from(k.address.as_slice())
                .ok()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        }
        .ok_or_else(|| {
            bad(
                "key.address",
                format!(
                    "{} bytes for {}; IPv4 needs 4, IPv6 16",
                    k.address.len(),
                    family.as_str()
                ),
            )
        })?;
        if k.port == 0 || k.port > 65535 {
            return Err(bad("key.port", format!("{} is outside 1–65535", k.port)));
        }
        if k.netns.is_empty() {
            return Err(bad("key.netns", "empty"));
        }
        if family == Family::Ipv4 && k.v6only.is_some() {
            return Err(bad("key.v6only", "set on an IPv4 socket"));
        }
        Ok(ListenerKey {
            netns: text("key.netns", k.netns, limits::NETNS)?,
            protocol: protocol(k.protocol)?,
            family,
            address,
            port: k.port as u16,
            interface: nonempty(text("key.interface", k.interface, limits::INTERFACE)?),
            v6only: k.v6only,
        })
    }
}

impl From<&ProcessInfo> for v1::Process {
    fn from(p: &ProcessInfo) -> Self {
        v1::Process {
            pid: p.pid,
            comm: p.comm.clone(),
            cmdline: p.cmdline.clone(),
            user: p.user.clone(),
        }
    }
}

impl From<&ListenerRecord> for v1::Listener {
    fn from(r: &ListenerRecord) -> Self {
        v1::Listener {
            key: Some((&r.key).into()),
            netns_inode: r.netns_inode,
            reach_ipv4: v1::Reach::from(r.reach_ipv4) as i32,
            reach_ipv6: v1::Reach::from(r.reach_ipv6) as i32,
            latent: r.latent,
            shown_as: r.shown_as.clone(),
            netstat_proto: r.netstat_proto.clone(),
            trap: r.trap,
            hidden_ipv4_exposure: r.hidden_ipv4_exposure,
            processes: r.processes.iter().map(Into::into).collect(),
            container: r.container.as_ref().map(|c| v1::Container {
                runtime: c.runtime.clone(),
                id: c.id.clone(),
                pod_uid: c.pod_uid.clone().unwrap_or_default(),
            }),
            unit: r.unit.clone().unwrap_or_default(),
            cgroup: r.cgroup.clone().unwrap_or_default(),
            uid: r.uid,
            freebind: r.freebind,
            transparent: r.transparent,
            source: v1::Source::from(r.source) as i32,
            sockets: r.sockets,
            effective_ipv4: Some((&r.effective_ipv4).into()),
            effective_ipv6: Some((&r.effective_ipv6).into()),
        }
    }
}

impl TryFrom<v1::Listener> for ListenerRecord {
    type Error = WireError;

    fn try_from(l: v1::Listener) -> Result<Self, WireError> {
        let key: ListenerKey = l.key.ok_or_else(|| bad("key", "missing"))?.try_into()?;
        if !matches!(l.netstat_proto.as_str(), "tcp" | "tcp6" | "udp" | "udp6") {
            return Err(bad(
                "netstat_proto",
                format!("{:?} is not tcp, tcp6, udp or udp6", l.netstat_proto),
            ));
        }
        if l.sockets == 0 {
            return Err(bad("sockets", "0; a listener has at least one socket"));
        }
        if l.sockets > limits::SOCKETS {
            return Err(bad(
                "sockets",
                format!("{}, at most {}", l.sockets, limits::SOCKETS),
            ));
        }
        if l.processes.len() > limits::PROCESSES {
            return Err(bad(
                "processes",
                format!(
                    "{} entries, at most {}",
                    l.processes.len(),
                    limits::PROCESSES
                ),
            ));
        }
        let mut processes = Vec::with_capacity(l.processes.len());
        for p in l.processes {
            if p.pid == 0 {
                return Err(bad("processes.pid", "0 is not a process"));
            }
            processes.push(ProcessInfo {
                pid: p.pid,
                comm: text("processes.comm", p.comm, limits::COMM)?,
                cmdline: text("processes.cmdline", p.cmdline, limits::CMDLINE)?,
                user: text("processes.user", p.user, limits::USER)?,
            });
        }
        processes.sort_by_key(|p| p.pid);
        processes.dedup_by_key(|p| p.pid);
        let container = match l.container {
            Some(c) => {
                if c.runtime.is_empty() {
                    return Err(bad("container.runtime", "empty"));
                }
                Some(Container {
                    runtime: text("container.runtime", c.runtime, limits::RUNTIME)?,
                    id: text("container.id", c.id, limits::CONTAINER_ID)?,
                    pod_uid: nonempty(text("container.pod_uid", c.pod_uid, limits::POD_UID)?),
                })
            }
            None => None,
        };
        Ok(ListenerRecord {
            key,
            netns_inode: l.netns_inode,
            reach_ipv4: reach("reach_ipv4", l.reach_ipv4)?,
            reach_ipv6: reach("reach_ipv6", l.reach_ipv6)?,
            latent: l.latent,
            shown_as: text("shown_as", l.shown_as, limits::SHOWN_AS)?,
            netstat_proto: l.netstat_proto,
            trap: l.trap,
            hidden_ipv4_exposure: l.hidden_ipv4_exposure,
            processes,
            container,
            unit: nonempty(text("unit", l.unit, limits::UNIT)?),
            cgroup: nonempty(text("cgroup", l.cgroup, limits::CGROUP)?),
            uid: l.uid,
            freebind: l.freebind,
            transparent: l.transparent,
            source: source(l.source)?,
            sockets: l.sockets,
            effective_ipv4: firewall(&EFFECTIVE_IPV4, l.effective_ipv4)?,
            effective_ipv6: firewall(&EFFECTIVE_IPV6, l.effective_ipv6)?,
        })
    }
}

/// A session's opening message, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub session_id: [u8; 16],
    /// Highest sequence of this session the agent saw acknowledged.
    pub acked_sequence: u64,
    pub agent_version: String,
    pub os_hostname: String,
    /// The agent installation (`None`: an agent older than the field).
    pub instance_id: Option<[u8; 16]>,
    /// How the agent learns of listens and closes (`None`: an agent older than the field).
    pub watch: Option<Watch>,
}

impl TryFrom<v1::Hello> for Hello {
    type Error = WireError;

    fn try_from(h: v1::Hello) -> Result<Self, WireError> {
        if h.protocol_version != limits::PROTOCOL_VERSION {
            return Err(bad(
                "protocol_version",
                format!(
                    "{} is not supported; this collector speaks {}: upgrade the agent or the \
                     collector",
                    h.protocol_version,
                    limits::PROTOCOL_VERSION
                ),
            ));
        }
        let n = h.session_id.len();
        let session_id = <[u8; 16]>::try_from(h.session_id.as_slice())
            .map_err(|_| bad("session_id", format!("{n} bytes, expected 16")))?;
        let instance_id = match h.instance_id.len() {
            0 => None,
            n => Some(
                <[u8; 16]>::try_from(h.instance_id.as_slice())
                    .map_err(|_| bad("instance_id", format!("{n} bytes, expected 16 or none")))?,
            ),
        };
        Ok(Hello {
            session_id,
            instance_id,
            acked_sequence: h.acked_sequence,
            agent_version: text("agent_version", h.agent_version, limits::AGENT_VERSION)?,
            os_hostname: text("os_hostname", h.os_hostname, limits::OS_HOSTNAME)?,
            watch: h.watch.map(Watch::try_from).transpose()?,
        })
    }
}

impl From<&Watch> for v1::Watch {
    /// The period in whole milliseconds within the wire's range, the reason as it is
    /// (bounded by [`Watch::bound`], which the agent runs before sending).
    fn from(w: &Watch) -> Self {
        let kind = match w.mode {
            WatchMode::Doorbell => v1::WatchKind::Doorbell,
            WatchMode::Polling(_) => v1::WatchKind::Polling,
            WatchMode::Interval(_) => v1::WatchKind::Interval,
        };
        v1::Watch {
            kind: kind as i32,
            interval_ms: w.mode.period_ms(),
            reason: w.reason.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::Watch> for Watch {
    type Error = WireError;

    /// A known kind; a period of 1 ms to [`limits::WATCH_INTERVAL_MAX_MS`] for polling and
    /// interval, none for doorbell; a bounded printable reason (empty: none).
    fn try_from(w: v1::Watch) -> Result<Self, WireError> {
        let period = || match w.interval_ms {
            0 => Err(bad(
                "watch.interval_ms",
                "0; polling and interval need a period of at least 1 ms",
            )),
            ms if ms > limits::WATCH_INTERVAL_MAX_MS => Err(bad(
                "watch.interval_ms",
                format!(
                    "{ms} ms, at most {} (a century)",
                    limits::WATCH_INTERVAL_MAX_MS
                ),
            )),
            ms => Ok(std::time::Duration::from_millis(ms)),
        };
        let mode = match v1::WatchKind::try_from(w.kind) {
            Ok(v1::WatchKind::Doorbell) if w.interval_ms != 0 => {
                return Err(bad(
                    "watch.interval_ms",
                    format!(
                        "{} for doorbell, which has no period; send 0",
                        w.interval_ms
                    ),
                ));
            }
            Ok(v1::WatchKind::Doorbell) => WatchMode::Doorbell,
            Ok(v1::WatchKind::Polling) => WatchMode::Polling(period()?),
            Ok(v1::WatchKind::Interval) => WatchMode::Interval(period()?),
            _ => {
                return Err(bad(
                    "watch.kind",
                    format!(
                        "{} is not DOORBELL (1), POLLING (2) or INTERVAL (3)",
                        w.kind
                    ),
                ));
            }
        };
        Ok(Watch {
            mode,
            reason: nonempty(text("watch.reason", w.reason, limits::WATCH_REASON)?),
        })
    }
}

/// A heartbeat, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub observed_at: OffsetDateTime,
    /// The agent's watch mode (`None`: an agent older than the field).
    pub watch: Option<Watch>,
}

/// A heartbeat: a required observation time ([`observed_at`]) and, when present, a valid
/// watch mode.
pub fn heartbeat(h: v1::Heartbeat, now: OffsetDateTime) -> Result<Heartbeat, WireError> {
    Ok(Heartbeat {
        observed_at: observed_at("observed_at", h.observed_at, now)?,
        watch: h.watch.map(Watch::try_from).transpose()?,
    })
}

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

/// A required observation time: present, well-formed, not before 2000, and not more than
/// [`limits::CLOCK_SKEW_SECS`] ahead of `now`.
pub fn observed_at(
    field: &'static str,
    t: Option<prost_types::Timestamp>,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, WireError> {
    let t = t.ok_or_else(|| bad(field, "missing"))?;
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(bad(field, format!("nanos {} outside 0–999999999", t.nanos)));
    }
    let at = OffsetDateTime::from_unix_timestamp(t.seconds)
        .map_err(|_| bad(field, format!("{} seconds is not a date", t.seconds)))?
        + time::Duration::nanoseconds(i64::from(t.nanos));
    if at.year() < 2000 {
        return Err(bad(
            field,
            format!("{at} is before 2000: is the agent's clock set?"),
        ));
    }
    if at - now > time::Duration::seconds(limits::CLOCK_SKEW_SECS) {
        return Err(bad(
            field,
            format!(
                "{at} is more than {} s ahead of the collector's clock ({now})",
                limits::CLOCK_SKEW_SECS
            ),
        ));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::testkit::record;

    #[test]
    fn round_trip() {
        let mut r = record("host", "::ffff:10.0.0.5", 8080, Some(false));
        r.container = Some(Container {
            runtime: "docker".into(),
            id: "abc".into(),
            pod_uid: None,
        });
        r.key.interface = Some("eth0".into());
        let back = ListenerRecord::try_from(v1::Listener::from(&r)).unwrap();
        assert_eq!(back, r);
        let r4 = record("blue", "10.0.0.5", 22, None);
        assert_eq!(
            ListenerRecord::try_from(v1::Listener::from(&r4)).unwrap(),
            r4
        );
        // Every verdict, with a reason and (restricted) conditions, both versions.
        for v in Effective::ALL {
            let mut r = record("host", "::", 443, Some(false));
            r.effective_ipv4 = FirewallAnswer::new(v, format!("why {}", v.as_str()));
            if v == Effective::Restricted {
                r.effective_ipv4.conditions = vec![
                    "saddr 198.51.100.0/24".into(),
                    "iifname eth0 and sport 67".into(),
                ];
            }
            r.effective_ipv6 = FirewallAnswer::new(Effective::NotApplicable, "é ✓ non-ASCII");
            let back = ListenerRecord::try_from(v1::Listener::from(&r)).unwrap();
            assert_eq!(back, r);
        }
    }

    /// What an agent from before firewall verdicts sends: no verdict messages.
    #[test]
    fn older_agents_report_unknown() {
        let mut l = v1::Listener::from(&record("host", "::", 80, Some(false)));
        l.effective_ipv4 = None;
        l.effective_ipv6 = None;
        let r = ListenerRecord::try_from(l.clone()).unwrap();
        assert_eq!(r.effective_ipv4, FirewallAnswer::not_reported());
        assert_eq!(r.effective_ipv6.verdict, Effective::Unknown);
        assert_eq!(
            r.effective_ipv6.reason,
            "the agent does not report firewall verdicts (upgrade it)"
        );
        // An empty verdict with nothing else means the same.
        l.effective_ipv4 = Some(v1::FirewallVerdict::default());
        let r = ListenerRecord::try_from(l).unwrap();
        assert_eq!(r.effective_ipv4, FirewallAnswer::not_reported());
    }

    #[track_caller]
    fn rejects_verdict(edit: impl FnOnce(&mut v1::FirewallVerdict), field: &str, problem: &str) {
        let mut l = v1::Listener::from(&record("host", "::", 80, Some(false)));
        edit(l.effective_ipv4.as_mut().unwrap());
        let err = ListenerRecord::try_from(l).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.problem.contains(problem), "{err}");
    }

    #[test]
    fn verdict_validation() {
        let restricted = |v: &mut v1::FirewallVerdict| {
            v.verdict = "restricted".into();
            v.conditions = vec!["saddr 10.0.0.0/8".into()];
        };
        // Names only from the known set, exactly as spelled.
        rejects_verdict(
            |v| v.verdict = "OPEN".into(),
            "effective_ipv4.verdict",
            "not a known verdict",
        );
        rejects_verdict(
            |v| v.verdict = "closed".into(),
            "effective_ipv4.verdict",
            "open, restricted, diverted, unknown, filtered, n/a",
        );
        rejects_verdict(
            |v| v.verdict = "x".repeat(100_000),
            "effective_ipv4.verdict",
            "100000-byte name",
        );
        // Empty verdict: only as "not reported", with nothing else.
        rejects_verdict(
            |v| v.verdict.clear(),
            "effective_ipv4.verdict",
            "empty, but a reason",
        );
        rejects_verdict(
            |v| {
                v.verdict.clear();
                v.reason.clear();
                v.conditions = vec!["saddr 10.0.0.0/8".into()];
            },
            "effective_ipv4.verdict",
            "empty",
        );
        // Reason: bounded, printable.
        rejects_verdict(
            |v| v.reason = "x".repeat(1025),
            "effective_ipv4.reason",
            "1025 bytes, at most 1024",
        );
        rejects_verdict(
            |v| v.reason = "handle 7: \u{1b}[2J accept".into(),
            "effective_ipv4.reason",
            "control characters",
        );
        rejects_verdict(
            |v| v.reason = "line\nbreak".into(),
            "effective_ipv4.reason",
            "control characters",
        );
        rejects_verdict(
            |v| v.reason = "c1 \u{9b}31m".into(),
            "effective_ipv4.reason",
            "control characters",
        );
        // Conditions: restricted only, at most 32, each 1–256 printable bytes.
        rejects_verdict(
            |v| v.conditions = vec!["saddr 10.0.0.0/8".into()],
            "effective_ipv4.conditions",
            "only restricted",
        );
        rejects_verdict(
            |v| {
                restricted(v);
                v.conditions = (0..33).map(|i| format!("saddr 10.{i}.0.0/16")).collect();
            },
            "effective_ipv4.conditions",
            "33 entries, at most 32",
        );
        rejects_verdict(
            |v| {
                restricted(v);
                v.conditions.push(String::new());
            },
            "effective_ipv4.conditions",
            "empty entry",
        );
        rejects_verdict(
            |v| {
                restricted(v);
                v.conditions.push("x".repeat(257));
            },
            "effective_ipv4.conditions",
            "257 bytes, at most 256",
        );
        rejects_verdict(
            |v| {
                restricted(v);
                v.conditions.push("iifname \"eth0\u{7}\"".into());
            },
            "effective_ipv4.conditions",
            "control characters",
        );
        // The IPv6 side is checked the same way, under its own name.
        let mut l = v1::Listener::from(&record("host", "::", 80, Some(false)));
        l.effective_ipv6.as_mut().unwrap().verdict = "wide open".into();
        assert_eq!(
            ListenerRecord::try_from(l).unwrap_err().field,
            "effective_ipv6.verdict"
        );
        // At the limits exactly: accepted.
        let mut l = v1::Listener::from(&record("host", "::", 80, Some(false)));
        let v = l.effective_ipv4.as_mut().unwrap();
        restricted(v);
        v.reason = "r".repeat(1024);
        v.conditions = (0..32).map(|i| format!("{i:0>256}")).collect();
        let r = ListenerRecord::try_from(l).unwrap();
        assert_eq!(r.effective_ipv4.conditions.len(), 32);
    }

    #[track_caller]
    fn rejects(edit: impl FnOnce(&mut v1::Listener), field: &str) {
        let mut l = v1::Listener::from(&record("host", "::", 80, Some(false)));
        edit(&mut l);
        let err = ListenerRecord::try_from(l).unwrap_err();
        assert_eq!(err.field, field, "{err}");
    }

    #[test]
    fn validation() {
        rejects(|l| l.key.as_mut().unwrap().port = 0, "key.port");
        rejects(|l| l.key.as_mut().unwrap().port = 65536, "key.port");
        rejects(
            |l| l.key.as_mut().unwrap().address = vec![1, 2, 3, 4],
            "key.address",
        );
        rejects(|l| l.key.as_mut().unwrap().family = 9, "key.family");
        rejects(|l| l.key.as_mut().unwrap().protocol = 0, "key.protocol");
        rejects(
            |l| l.key.as_mut().unwrap().netns = String::new(),
            "key.netns",
        );
        rejects(
            |l| l.key.as_mut().unwrap().interface = "x".repeat(65),
            "key.interface",
        );
        rejects(|l| l.key = None, "key");
        rejects(
            |l| l.key.as_mut().unwrap().netns = "a\u{1f}b".into(),
            "key.netns",
        );
        rejects(
            |l| l.key.as_mut().unwrap().interface = "eth\n0".into(),
            "key.interface",
        );
        rejects(|l| l.reach_ipv4 = 42, "reach_ipv4");
        rejects(|l| l.reach_ipv6 = 0, "reach_ipv6");
        rejects(|l| l.source = 7, "source");
        rejects(|l| l.sockets = 0, "sockets");
        rejects(|l| l.sockets = limits::SOCKETS + 1, "sockets");
        rejects(|l| l.sockets = u32::MAX, "sockets");
        rejects(|l| l.netstat_proto = "sctp".into(), "netstat_proto");
        rejects(|l| l.processes[0].pid = 0, "processes.pid");
        rejects(
            |l| l.processes[0].cmdline = "x".repeat(9000),
            "processes.cmdline",
        );
        rejects(
            |l| {
                l.key.as_mut().unwrap().family = v1::Family::Ipv4 as i32;
                l.key.as_mut().unwrap().address = vec![10, 0, 0, 1];
            },
            "key.v6only",
        );
    }

    #[test]
    fn hellos() {
        let ok = v1::Hello {
            protocol_version: limits::PROTOCOL_VERSION,
            agent_version: "0.2.0".into(),
            os_hostname: "web-01".into(),
            session_id: vec![7; 16],
            acked_sequence: 3,
            instance_id: vec![9; 16],
            watch: Some(v1::Watch {
                kind: v1::WatchKind::Polling as i32,
                interval_ms: 3000,
                reason: "perf_event_open refused: needs CAP_PERFMON".into(),
            }),
        };
        let h = Hello::try_from(ok.clone()).unwrap();
        assert_eq!((h.session_id, h.acked_sequence), ([7; 16], 3));
        assert_eq!(h.instance_id, Some([9; 16]));
        assert_eq!(
            h.watch,
            Some(Watch::because(
                WatchMode::Polling(std::time::Duration::from_secs(3)),
                "perf_event_open refused: needs CAP_PERFMON"
            ))
        );
        let older = v1::Hello {
            instance_id: Vec::new(),
            watch: None,
            ..ok.clone()
        };
        let older = Hello::try_from(older).unwrap();
        assert_eq!((older.instance_id, older.watch), (None, None));
        let field = |edit: fn(&mut v1::Hello)| {
            let mut m = ok.clone();
            edit(&mut m);
            Hello::try_from(m).unwrap_err().field
        };
        assert_eq!(field(|m| m.protocol_version = 2), "protocol_version");
        assert_eq!(field(|m| m.session_id = vec![1; 15]), "session_id");
        assert_eq!(field(|m| m.instance_id = vec![1; 17]), "instance_id");
        assert_eq!(field(|m| m.agent_version = "x".repeat(65)), "agent_version");
        assert_eq!(field(|m| m.os_hostname = "x".repeat(256)), "os_hostname");
        assert_eq!(
            field(|m| m.os_hostname = "\u{1b}]0;pwned\u{7}web".into()),
            "os_hostname"
        );
        assert_eq!(
            field(|m| m.agent_version = "0.1\u{202e}0".into()),
            "agent_version"
        );
        // The watch mode is checked in the Hello too.
        assert_eq!(field(|m| m.watch.as_mut().unwrap().kind = 0), "watch.kind");
    }

    #[track_caller]
    fn watch_refused(kind: i32, interval_ms: u64, reason: &str, field: &str, problem: &str) {
        let w = v1::Watch {
            kind,
            interval_ms,
            reason: reason.into(),
        };
        let err = Watch::try_from(w).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.problem.contains(problem), "{err}");
    }

    #[test]
    fn watch_modes() {
        use std::time::Duration;
        let (doorbell, polling, interval) = (
            v1::WatchKind::Doorbell as i32,
            v1::WatchKind::Polling as i32,
            v1::WatchKind::Interval as i32,
        );
        // Round trips, at the limits too.
        for w in [
            Watch::new(WatchMode::Doorbell),
            Watch::because(WatchMode::Polling(Duration::from_millis(1)), "no tracefs"),
            Watch::new(WatchMode::Interval(Duration::from_secs(10))),
            Watch::because(
                WatchMode::Interval(Duration::from_millis(limits::WATCH_INTERVAL_MAX_MS)),
                "r".repeat(limits::WATCH_REASON),
            ),
            Watch::because(WatchMode::Doorbell, "é ✓ non-ASCII"),
        ] {
            assert_eq!(Watch::try_from(v1::Watch::from(&w)), Ok(w));
        }
        // An empty reason is none.
        let w = v1::Watch {
            kind: polling,
            interval_ms: 3000,
            reason: String::new(),
        };
        assert_eq!(Watch::try_from(w).unwrap().reason, None);
        // Refusals, each naming the field.
        watch_refused(0, 0, "", "watch.kind", "0 is not DOORBELL (1), POLLING (2)");
        watch_refused(4, 10, "", "watch.kind", "4 is not");
        watch_refused(-1, 10, "", "watch.kind", "-1 is not");
        watch_refused(polling, 0, "", "watch.interval_ms", "at least 1 ms");
        watch_refused(interval, 0, "", "watch.interval_ms", "at least 1 ms");
        watch_refused(
            interval,
            limits::WATCH_INTERVAL_MAX_MS + 1,
            "",
            "watch.interval_ms",
            "a century",
        );
        watch_refused(polling, u64::MAX, "", "watch.interval_ms", "at most");
        watch_refused(doorbell, 5, "", "watch.interval_ms", "no period");
        watch_refused(
            polling,
            3000,
            &"r".repeat(limits::WATCH_REASON + 1),
            "watch.reason",
            "513 bytes, at most 512",
        );
        watch_refused(
            polling,
            3000,
            "perf: \u{1b}]0;pwned\u{7}",
            "watch.reason",
            "control characters",
        );
        watch_refused(
            polling,
            3000,
            "needs\u{202e}CAP",
            "watch.reason",
            "invisible formatting",
        );
        // What the agent sends after `bound` is accepted, whatever it started from.
        let mut w = Watch::because(
            WatchMode::Polling(Duration::ZERO),
            format!("line\nbreak {}", "x".repeat(1000)),
        );
        w.bound();
        assert_eq!(Watch::try_from(v1::Watch::from(&w)), Ok(w));
    }

    #[test]
    fn heartbeats() {
        let now = OffsetDateTime::now_utc();
        let w = Watch::new(WatchMode::Doorbell);
        let hb = v1::Heartbeat {
            observed_at: Some(timestamp(now)),
            watch: Some((&w).into()),
        };
        let got = heartbeat(hb.clone(), now).unwrap();
        assert_eq!(got.watch, Some(w));
        let older = v1::Heartbeat {
            watch: None,
            ..hb.clone()
        };
        assert_eq!(heartbeat(older, now).unwrap().watch, None);
        let bad_watch = v1::Heartbeat {
            watch: Some(v1::Watch::default()),
            ..hb.clone()
        };
        assert_eq!(heartbeat(bad_watch, now).unwrap_err().field, "watch.kind");
        let no_time = v1::Heartbeat {
            observed_at: None,
            ..hb
        };
        assert_eq!(heartbeat(no_time, now).unwrap_err().field, "observed_at");
    }

    /// Every text field of a listener refuses terminal control and invisible formatting
    /// characters, naming the field; the same record escaped by `bound` (as the agent
    /// sends it) is accepted.
    #[test]
    fn texts_are_data_never_terminal_control() {
        type Edit = fn(&mut ListenerRecord, &str);
        let fields: [(&str, Edit); 11] = [
            ("shown_as", |r, t| r.shown_as = t.into()),
            ("processes.comm", |r, t| r.processes[0].comm = t.into()),
            ("processes.cmdline", |r, t| {
                r.processes[0].cmdline = t.into()
            }),
            ("processes.user", |r, t| r.processes[0].user = t.into()),
            ("container.runtime", |r, t| {
                r.container.as_mut().unwrap().runtime = t.into()
            }),
            ("container.id", |r, t| {
                r.container.as_mut().unwrap().id = t.into()
            }),
            ("container.pod_uid", |r, t| {
                r.container.as_mut().unwrap().pod_uid = Some(t.into())
            }),
            ("unit", |r, t| r.unit = Some(t.into())),
            ("cgroup", |r, t| r.cgroup = Some(t.into())),
            ("key.netns", |r, t| r.key.netns = t.into()),
            ("key.interface", |r, t| r.key.interface = Some(t.into())),
        ];
        for hostile in [
            "\u{1b}]0;pwned\u{7}\u{1b}[31m:::80",
            "line\nbreak",
            "c1 \u{9b}31m",
            "evil\u{202e}08:::",
            "zero\u{200b}width",
        ] {
            for (name, edit) in &fields {
                let mut r = record("host", "::", 80, Some(false));
                r.processes = vec![ProcessInfo {
                    pid: 1,
                    comm: "nginx".into(),
                    cmdline: "nginx".into(),
                    user: "root".into(),
                }];
                r.container = Some(Container {
                    runtime: "docker".into(),
                    id: "abc".into(),
                    pod_uid: Some("p".into()),
                });
                edit(&mut r, hostile);
                let err = ListenerRecord::try_from(v1::Listener::from(&r)).unwrap_err();
                assert_eq!(err.field, *name, "{hostile:?}: {err}");
                assert!(err.problem.contains("characters"), "{err}");
                r.bound();
                let back = ListenerRecord::try_from(v1::Listener::from(&r))
                    .unwrap_or_else(|e| panic!("{name} {hostile:?} after bound: {e}"));
                assert_eq!(back, r);
            }
        }
    }

    #[test]
    fn observation_times() {
        let now = OffsetDateTime::now_utc();
        assert!(observed_at("t", Some(timestamp(now)), now).is_ok());
        assert_eq!(observed_at("t", None, now).unwrap_err().problem, "missing");
        let future = timestamp(now + time::Duration::hours(1));
        assert!(
            observed_at("t", Some(future), now)
                .unwrap_err()
                .problem
                .contains("ahead")
        );
        let old = prost_types::Timestamp {
            seconds: 5,
            nanos: 0,
        };
        assert!(
            observed_at("t", Some(old), now)
                .unwrap_err()
                .problem
                .contains("2000")
        );
        let bad_nanos = prost_types::Timestamp {
            seconds: now.unix_timestamp(),
            nanos: -1,
        };
        assert!(observed_at("t", Some(bad_nanos), now).is_err());
    }
}
