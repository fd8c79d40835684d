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

use crate::query::{Param, QueryError, ReadOnly, ResultSet};
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

/// Per-port state of every listener version valid at `at` (optionally one host).
pub async fn ports_at(
    ro: &ReadOnly,
    at: OffsetDateTime,
    host: Option<&str>,
) -> Result<BTreeMap<PortKey, PortState>, QueryError> {
    let rs = ro
        .run(
            ro.pick(
                "SELECT host, netns, protocol, port, family, reach_ipv4, reach_ipv6, shown_as, processes
                 FROM listener_versions
                 WHERE valid_from <= ?1 AND (valid_to IS NULL OR valid_to > ?1)
                   AND (?2 IS NULL OR host = ?2)",
                "SELECT host, netns, protocol, port, family, reach_ipv4, reach_ipv6, shown_as, processes
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
        v4_line: bool,
        exposed_v4: bool,
        shown: std::collections::BTreeSet<String>,
        procs: std::collections::BTreeSet<String>,
    }
    let mut acc: BTreeMap<PortKey, Acc> = BTreeMap::new();
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    for r in &rs.rows {
        let key = (s(&r[0]), s(&r[1]), s(&r[2]), r[3].as_i64().unwrap_or(0));
        let a = acc.entry(key).or_insert_with(|| Acc {
            v4: (0, "none"),
            v6: (0, "none"),
            v4_line: false,
            exposed_v4: false,
            shown: Default::default(),
            procs: Default::default(),
        });
        let (r4, r6) = (
            rank(r[5].as_str().unwrap_or("")),
            rank(r[6].as_str().unwrap_or("")),
        );
        a.v4 = a.v4.max(r4);
        a.v6 = a.v6.max(r6);
        a.v4_line |= r[4].as_str() == Some("ipv4");
        a.exposed_v4 |= r4.0 >= 3;
        a.shown.insert(s(&r[7]));
        // Whole owner lists, as the hidden_ipv4_exposure view aggregates them.
        a.procs.insert(s(&r[8]));
    }
    Ok(acc
        .into_iter()
        .map(|(k, a)| {
            (
                k,
                PortState {
                    ipv4: a.v4.1,
                    ipv6: a.v6.1,
                    hidden: a.exposed_v4 && !a.v4_line,
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
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    for e in &events.rows {
        let key = (s(&e[1]), s(&e[3]), s(&e[4]), e[5].as_i64().unwrap_or(0));
        last_event.insert(key, e[0].clone());
        let detail = format!(
            "{} {} {}: IPv4 {}, IPv6 {}{}",
            s(&e[6]),
            s(&e[7]),
            if s(&e[2]) == "closed" { "was" } else { "now" },
            s(&e[9]),
            s(&e[10]),
            match s(&e[11]) {
                p if p.is_empty() => String::new(),
                p => format!(" ({p})"),
            }
        );
        rs.rows.push(vec![
            e[0].clone(),
            e[1].clone(),
            e[2].clone(),
            e[3].clone(),
            e[4].clone(),
            e[5].clone(),
            e[8].clone(),
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
