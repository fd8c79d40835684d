//! Change history: what changed between two times (`diff`), the headline as of any time
//! (`exposure --at`), and time arguments.
//!
//! Both read the `listener_versions` and `listener_changes` views, so they work the same on
//! every database and on whatever retention has left. Exposure per port is aggregated
//! here, with the definition of the `hidden_ipv4_exposure` view: reachable over IPv4 from
//! off the host (`any`/`specific`) while every socket on the port is an IPv6 one.

use std::collections::BTreeMap;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::query::{FromRow, Named, Param, QueryError, ReadOnly, ResultSet};
use crate::timefmt;

/// Parses `now`, an RFC 3339 time (`2026-11-24T10:00:00Z`) or an age (`24h`, `7d`, `90m`:
/// that long before `now`).
pub fn parse_time(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now);
    }
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    match listenscope_core::config::parse_duration(s) {
        Ok(d) => Ok(now - d),
        Err(_) => Err(format!(
            "{s:?} is not a time: use RFC 3339 (2026-11-24T10:00:00Z), an age (24h, 7d) or now"
        )),
    }
}

/// One (host, netns, protocol, port) and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortState {
    /// Best reach over IPv4 / IPv6 among its listeners: any > specific > loopback > unknown > none.
    pub ipv4: &'static str,
    pub ipv6: &'static str,
    /// Reachable over IPv4 from off the host while netstat shows only IPv6 lines.
    pub hidden: bool,
    pub shown_as: String,
    pub processes: String,
}

type PortKey = (String, String, String, i64);

fn rank(r: &str) -> (u8, &'static str) {
    match r {
        "any" => (4, "any"),
        "specific" => (3, "specific"),
        "loopback" => (2, "loopback"),
        "unknown" => (1, "unknown"),
        _ => (0, "none"),
    }
}

fn join(set: std::collections::BTreeSet<String>) -> String {
    set.into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// One listener version valid at some time, as `ports_at` reads it.
struct VersionRow {
    port: PortKey,
    reach_ipv4: (u8, &'static str),
    reach_ipv6: (u8, &'static str),
    hidden: bool,
    shown_as: String,
    processes: String,
}

impl FromRow for VersionRow {
    fn from_row(r: &Named<'_>) -> Result<Self, QueryError> {
        Ok(VersionRow {
            port: (
                r.text("host")?,
                r.text("netns")?,
                r.text("protocol")?,
                r.int("port")?,
            ),
            reach_ipv4: rank(&r.text("reach_ipv4")?),
            reach_ipv6: rank(&r.text("reach_ipv6")?),
            hidden: r.boolean("hidden_ipv4_exposure")?,
            shown_as: r.text("shown_as")?,
            processes: r.text("processes")?,
        })
    }
}

/// Per-port state of every listener version valid at `at` (optionally one host). The
/// hidden verdict is the agent's, carried in each record; reach is the best of the port.
pub async fn ports_at(
    ro: &ReadOnly,
    at: OffsetDateTime,
    host: Option<&str>,
) -> Result<BTreeMap<PortKey, PortState>, QueryError> {
    let rs = ro
        .run(
            ro.pick(
                "SELECT host, netns, protocol, port, reach_ipv4, reach_ipv6, hidden_ipv4_exposure,
                        shown_as, processes
                 FROM listener_versions
                 WHERE valid_from <= ?1 AND (valid_to IS NULL OR valid_to > ?1)
                   AND (?2 IS NULL OR host = ?2)",
                "SELECT host, netns, protocol, port, reach_ipv4, reach_ipv6, hidden_ipv4_exposure,
                        shown_as, processes
                 FROM listener_versions
                 WHERE valid_from <= $1 AND (valid_to IS NULL OR valid_to > $1)
                   AND ($2::text IS NULL OR host = $2)",
            ),
            &[Param::Time(at), Param::Text(host.map(str::to_string))],
        )
        .await?;
    struct Acc {
        v4: (u8, &'static str),
        v6: (u8, &'static str),
        hidden: bool,
        shown: std::collections::BTreeSet<String>,
        procs: std::collections::BTreeSet<String>,
    }
    let mut acc: BTreeMap<PortKey, Acc> = BTreeMap::new();
    for r in rs.decode::<VersionRow>()? {
        let a = acc.entry(r.port).or_insert_with(|| Acc {
            v4: (0, "none"),
            v6: (0, "none"),
            hidden: false,
            shown: Default::default(),
            procs: Default::default(),
        });
        a.v4 = a.v4.max(r.reach_ipv4);
        a.v6 = a.v6.max(r.reach_ipv6);
        a.hidden |= r.hidden;
        a.shown.insert(r.shown_as);
        // Whole owner lists, as the hidden_ipv4_exposure view aggregates them.
        a.procs.insert(r.processes);
    }
    Ok(acc
        .into_iter()
        .map(|(k, a)| {
            (
                k,
                PortState {
                    ipv4: a.v4.1,
                    ipv6: a.v6.1,
                    hidden: a.hidden,
                    shown_as: join(a.shown),
                    processes: join(a.procs),
                },
            )
        })
        .collect())
}

/// The headline as of `at`: the same columns as the `hidden_ipv4_exposure` view.
pub async fn exposure_at(
    ro: &ReadOnly,
    at: OffsetDateTime,
    port: Option<u16>,
    protocol: Option<&str>,
) -> Result<ResultSet, QueryError> {
    let ports = ports_at(ro, at, None).await?;
    let mut rs = ResultSet {
        columns: ["host", "netns", "protocol", "port", "shown_as", "processes"]
            .map(String::from)
            .to_vec(),
        rows: Vec::new(),
    };
    for ((host, netns, proto, p), st) in ports {
        if !st.hidden
            || port.is_some_and(|want| i64::from(want) != p)
            || protocol.is_some_and(|want| want != proto)
        {
            continue;
        }
        rs.rows.push(vec![
            Value::from(host),
            Value::from(netns),
            Value::from(proto),
            Value::from(p),
            Value::from(st.shown_as),
            Value::from(st.processes),
        ]);
    }
    Ok(rs)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// One row of `listener_changes`, as `diff` reads it.
struct EventRow {
    /// In the display format, as the view gives it.
    at: Value,
    host: String,
    change: String,
    netns: String,
    protocol: String,
    port: i64,
    family: String,
    address: String,
    shown_as: String,
    reach_ipv4: String,
    reach_ipv6: String,
    processes: String,
}

impl FromRow for EventRow {
    fn from_row(r: &Named<'_>) -> Result<Self, QueryError> {
        Ok(EventRow {
            at: r.value("at")?,
            host: r.text("host")?,
            change: r.text("change")?,
            netns: r.text("netns")?,
            protocol: r.text("protocol")?,
            port: r.int("port")?,
            family: r.text("family")?,
            address: r.text("address")?,
            shown_as: r.text("shown_as")?,
            reach_ipv4: r.text("reach_ipv4")?,
            reach_ipv6: r.text("reach_ipv6")?,
            processes: r.text("processes")?,
        })
    }
}

/// What changed in `(since, until]`: every listener opened, changed or closed, then every
/// port whose exposure differs between the two times (over IPv4, over IPv6, or hidden
/// from netstat), e.g. a port that became reachable over IPv4.
pub async fn diff(
    ro: &ReadOnly,
    host: Option<&str>,
    since: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<ResultSet, QueryError> {
    let events = ro
        .run(
            ro.pick(
                "SELECT at, host, change, netns, protocol, port, family, address, shown_as,
                        reach_ipv4, reach_ipv6, processes
                 FROM listener_changes
                 WHERE at > ?1 AND at <= ?2 AND (?3 IS NULL OR host = ?3)
                 ORDER BY at, host, netns, protocol, port, change",
                "SELECT at, host, change, netns, protocol, port, family, address, shown_as,
                        reach_ipv4, reach_ipv6, processes
                 FROM listener_changes
                 WHERE at > $1 AND at <= $2 AND ($3::text IS NULL OR host = $3)
                 ORDER BY at, host COLLATE \"C\", netns COLLATE \"C\", protocol, port, change",
            ),
            &[
                Param::Time(since),
                Param::Time(until),
                Param::Text(host.map(str::to_string)),
            ],
        )
        .await?;
    let mut rs = ResultSet {
        columns: [
            "at", "host", "change", "netns", "protocol", "port", "shown_as", "detail",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    // Latest event per port inside the window: the time an exposure change is reported at.
    let mut last_event: BTreeMap<PortKey, Value> = BTreeMap::new();
    for e in events.decode::<EventRow>()? {
        let key = (e.host.clone(), e.netns.clone(), e.protocol.clone(), e.port);
        last_event.insert(key, e.at.clone());
        let detail = format!(
            "{} {} {}: IPv4 {}, IPv6 {}{}",
            e.family,
            e.address,
            if e.change == "closed" { "was" } else { "now" },
            e.reach_ipv4,
            e.reach_ipv6,
            match e.processes.as_str() {
                "" => String::new(),
                p => format!(" ({p})"),
            }
        );
        rs.rows.push(vec![
            e.at,
            Value::from(e.host),
            Value::from(e.change),
            Value::from(e.netns),
            Value::from(e.protocol),
            Value::from(e.port),
            Value::from(e.shown_as),
            Value::from(detail),
        ]);
    }
    let before = ports_at(ro, since, host).await?;
    let after = ports_at(ro, until, host).await?;
    let none = PortState {
        ipv4: "none",
        ipv6: "none",
        hidden: false,
        shown_as: String::new(),
        processes: String::new(),
    };
    let keys: std::collections::BTreeSet<&PortKey> = before.keys().chain(after.keys()).collect();
    for k in keys {
        let (b, a) = (
            before.get(k).unwrap_or(&none),
            after.get(k).unwrap_or(&none),
        );
        if (b.ipv4, b.ipv6, b.hidden) == (a.ipv4, a.ipv6, a.hidden) {
            continue;
        }
        let mut what = Vec::new();
        if b.ipv4 != a.ipv4 {
            what.push(format!("IPv4 {} → {}", b.ipv4, a.ipv4));
        }
        if b.ipv6 != a.ipv6 {
            what.push(format!("IPv6 {} → {}", b.ipv6, a.ipv6));
        }
        if b.hidden != a.hidden {
            what.push(format!(
                "hidden from netstat {} → {}",
                yes_no(b.hidden),
                yes_no(a.hidden)
            ));
        }
        let at = last_event
            .get(k)
            .cloned()
            .unwrap_or_else(|| Value::from(timefmt::format(until)));
        let shown = if a.shown_as.is_empty() {
            &b.shown_as
        } else {
            &a.shown_as
        };
        rs.rows.push(vec![
            at,
            Value::from(k.0.clone()),
            Value::from("exposure"),
            Value::from(k.1.clone()),
            Value::from(k.2.clone()),
            Value::from(k.3),
            Value::from(shown.clone()),
            Value::from(what.join("; ")),
        ]);
    }
    Ok(rs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        assert_eq!(parse_time("now", now), Ok(now));
        assert_eq!(parse_time("24h", now), Ok(now - time::Duration::hours(24)));
        assert_eq!(parse_time("7d", now), Ok(now - time::Duration::days(7)));
        let t = parse_time("2026-11-24T10:00:00Z", now).unwrap();
        assert_eq!(t.unix_timestamp(), 1_795_514_400);
        assert!(
            parse_time("yesterday", now)
                .unwrap_err()
                .contains("RFC 3339")
        );
    }
}
