//! Change history: what changed between two times (`diff`), the headline as of any time
//! (`exposure --at`), and time arguments.
//!
//! Both are driven by the events in their window (the listener versions that began or
//! ended in it, found through indexes on the time columns), never by loading whole fleet
//! states: a port without events did not change. They return what the `listener_changes`
//! and `hidden_ipv4_exposure` views would, on every database and on whatever retention
//! has left. Exposure per port is aggregated here as the headline view does it.

use std::collections::BTreeMap;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::query::{Dialect, FromRow, Named, Param, QueryError, ReadOnly, ResultSet};
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

/// One listener version valid at one or both ends of a window, as [`touched`] reads it.
struct VersionRow {
    port: PortKey,
    reach_ipv4: (u8, &'static str),
    reach_ipv6: (u8, &'static str),
    hidden: bool,
    shown_as: String,
    processes: String,
    at_since: bool,
    at_until: bool,
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
            at_since: r.boolean("at_since")?,
            at_until: r.boolean("at_until")?,
        })
    }
}

/// Accumulates listener versions into per-port states: the best reach of the port, the
/// agent's hidden verdict carried in each record, and the lists the headline view shows.
#[derive(Default)]
struct Acc {
    v4: (u8, &'static str),
    v6: (u8, &'static str),
    hidden: bool,
    shown: std::collections::BTreeSet<String>,
    procs: std::collections::BTreeSet<String>,
}

impl Acc {
    fn add(&mut self, r: &VersionRow) {
        self.v4 = self.v4.max(r.reach_ipv4);
        self.v6 = self.v6.max(r.reach_ipv6);
        self.hidden |= r.hidden;
        self.shown.insert(r.shown_as.clone());
        // Whole owner lists, as the hidden_ipv4_exposure view aggregates them.
        self.procs.insert(r.processes.clone());
    }

    fn state(self) -> PortState {
        PortState {
            ipv4: if self.v4.0 == 0 { "none" } else { self.v4.1 },
            ipv6: if self.v6.0 == 0 { "none" } else { self.v6.1 },
            hidden: self.hidden,
            shown_as: join(self.shown),
            processes: join(self.procs),
        }
    }
}

/// The SQL parameter marker for parameter `n` in this dialect.
fn ph(ro: &ReadOnly, n: usize) -> String {
    match ro.dialect() {
        Dialect::Sqlite => format!("?{n}"),
        Dialect::Postgres => format!("${n}"),
    }
}

/// The listener versions that begin or end in `(since, until]` (`until` absent: any time
/// after `since`), as events: columns host_id, at, change, netns, protocol, family,
/// address, port, shown_as, reach_ipv4, reach_ipv6, processes. Parameters: 1 = since,
/// 2 = until (when bounded), then the host name (when given). Both halves run on an
/// index on the time column, so the cost follows the number of changes, not the fleet.
fn events_sql(ro: &ReadOnly, bounded: bool, host: bool) -> String {
    let since = ph(ro, 1);
    let until = bounded.then(|| ph(ro, 2));
    let host_param = ph(ro, if bounded { 3 } else { 2 });
    let window = |col: &str| {
        let mut w = format!("{col} > {since}");
        if let Some(u) = &until {
            w.push_str(&format!(" AND {col} <= {u}"));
        }
        if host {
            w.push_str(&format!(
                " AND host_id = (SELECT id FROM host WHERE name = {host_param})"
            ));
        }
        w
    };
    const COLS: &str = "netns, protocol, family, address, port, shown_as, reach_ipv4, \
                        reach_ipv6, process_names AS processes";
    format!(
        "SELECT host_id, valid_from AS at,
                CASE WHEN valid_from = first_seen THEN 'opened' ELSE 'changed' END AS change,
                {COLS}
         FROM listener WHERE {}
         UNION ALL
         SELECT host_id, valid_to AS at, 'closed' AS change, {COLS}
         FROM listener WHERE end_reason = 'closed' AND {}",
        window("valid_from"),
        window("valid_to"),
    )
}

fn window_params(
    since: OffsetDateTime,
    until: Option<OffsetDateTime>,
    host: Option<&str>,
) -> Vec<Param> {
    let mut p = vec![Param::Time(since)];
    if let Some(u) = until {
        p.push(Param::Time(u));
    }
    if let Some(h) = host {
        p.push(Param::Text(Some(h.to_string())));
    }
    p
}

/// Every (host, netns, protocol, port) with an event in `(since, until]`, and its state
/// at both ends (`until` absent: now). Only those ports are read: a port without events
/// did not change.
async fn touched(
    ro: &ReadOnly,
    since: OffsetDateTime,
    until: Option<OffsetDateTime>,
    host: Option<&str>,
) -> Result<BTreeMap<PortKey, (PortState, PortState)>, QueryError> {
    let events = events_sql(ro, until.is_some(), host.is_some());
    let valid_at = |n: usize| {
        let t = ph(ro, n);
        format!("(l.valid_from <= {t} AND (l.valid_to IS NULL OR l.valid_to > {t}))")
    };
    let at_since = valid_at(1);
    let at_until = if until.is_some() {
        valid_at(2)
    } else {
        "(l.valid_to IS NULL)".to_string()
    };
    // The versions of each touched port, looked up through (host_id, port). PostgreSQL
    // gets it spelled as a LATERAL lookup: right after a bulk load, before autovacuum has
    // analyzed the table, its planner guesses the window holds a fifth of the fleet and
    // hashes every live listener instead (measured: 0.02 s → 0.2 s at 10,000 hosts).
    // SQLite has no LATERAL and always looks up per touched port.
    let versions = match ro.dialect() {
        Dialect::Sqlite => {
            "JOIN listener l ON l.host_id = t.host_id AND l.port = t.port
                            AND l.netns = t.netns AND l.protocol = t.protocol"
        }
        Dialect::Postgres => {
            "CROSS JOIN LATERAL (
                 SELECT * FROM listener v
                 WHERE v.host_id = t.host_id AND v.port = t.port
                   AND v.netns = t.netns AND v.protocol = t.protocol
                 OFFSET 0) l"
        }
    };
    let sql = format!(
        "WITH t AS (SELECT DISTINCT host_id, netns, protocol, port FROM ({events}) e)
         SELECT h.name AS host, l.netns, l.protocol, l.port, l.reach_ipv4, l.reach_ipv6,
                l.hidden_ipv4_exposure, l.shown_as, l.process_names AS processes,
                CASE WHEN {at_since} THEN 1 ELSE 0 END AS at_since,
                CASE WHEN {at_until} THEN 1 ELSE 0 END AS at_until
         FROM t
         {versions}
         JOIN host h ON h.id = l.host_id
         WHERE {at_since} OR {at_until}"
    );
    let rows = ro.run(&sql, &window_params(since, until, host)).await?;
    // Every touched port, even one with no listener at either end (opened and closed
    // inside the window): its key comes from the events.
    let keys = ro
        .run(
            &format!(
                "SELECT DISTINCT h.name AS host, e.netns, e.protocol, e.port
                 FROM ({events}) e JOIN host h ON h.id = e.host_id"
            ),
            &window_params(since, until, host),
        )
        .await?;
    let mut acc: BTreeMap<PortKey, (Acc, Acc)> = BTreeMap::new();
    for k in keys.decode::<KeyRow>()? {
        acc.entry(k.0).or_default();
    }
    for r in rows.decode::<VersionRow>()? {
        let (before, after) = acc.entry(r.port.clone()).or_default();
        if r.at_since {
            before.add(&r);
        }
        if r.at_until {
            after.add(&r);
        }
    }
    Ok(acc
        .into_iter()
        .map(|(k, (b, a))| (k, (b.state(), a.state())))
        .collect())
}

struct KeyRow(PortKey);

impl FromRow for KeyRow {
    fn from_row(r: &Named<'_>) -> Result<Self, QueryError> {
        Ok(KeyRow((
            r.text("host")?,
            r.text("netns")?,
            r.text("protocol")?,
            r.int("port")?,
        )))
    }
}

/// A window holding more changes than one answer may carry gets an error that says how
/// to narrow it (the reader's bound is meant for `query`).
fn too_many_changes(e: QueryError) -> QueryError {
    match e {
        QueryError::TooManyRows => QueryError::WindowTooBig,
        e => e,
    }
}

/// A report's rows and how many were left out by its limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub rows: ResultSet,
    pub left_out: u64,
}

impl Report {
    /// Keeps the first `limit` rows (all with `None`).
    pub fn limited(mut rows: ResultSet, limit: Option<usize>) -> Report {
        let left_out = match limit {
            Some(n) if rows.rows.len() > n => {
                let extra = rows.rows.len() - n;
                rows.rows.truncate(n);
                extra as u64
            }
            _ => 0,
        };
        Report { rows, left_out }
    }
}

/// The headline as of `at`: the same columns as the `hidden_ipv4_exposure` view. The
/// current headline (maintained at ingest) is rolled back over the changes since `at`:
/// only ports with events after `at` are recomputed from history.
pub async fn exposure_at(
    ro: &ReadOnly,
    at: OffsetDateTime,
    port: Option<u16>,
    protocol: Option<&str>,
    limit: Option<usize>,
) -> Result<Report, QueryError> {
    let changed = touched(ro, at, None, None)
        .await
        .map_err(too_many_changes)?;
    let now = crate::query::exposure(ro, port, protocol, None).await?.rows;
    let wanted = |p: i64, proto: &str| {
        port.is_none_or(|want| i64::from(want) == p) && protocol.is_none_or(|want| want == proto)
    };
    let mut rows: BTreeMap<PortKey, (String, String)> = BTreeMap::new();
    for r in now.decode::<HeadlineRow>()? {
        if !changed.contains_key(&r.0) {
            rows.insert(r.0, (r.1, r.2));
        }
    }
    for (k, (then, _)) in changed {
        if then.hidden && wanted(k.3, &k.2) {
            rows.insert(k, (then.shown_as, then.processes));
        }
    }
    let mut rs = ResultSet {
        columns: ["host", "netns", "protocol", "port", "shown_as", "processes"]
            .map(String::from)
            .to_vec(),
        rows: Vec::new(),
    };
    for ((host, netns, proto, p), (shown, procs)) in rows {
        rs.rows.push(vec![
            Value::from(host),
            Value::from(netns),
            Value::from(proto),
            Value::from(p),
            Value::from(shown),
            if procs.is_empty() {
                Value::Null
            } else {
                Value::from(procs)
            },
        ]);
    }
    Ok(Report::limited(rs, limit))
}

/// A row of the headline view.
struct HeadlineRow(PortKey, String, String);

impl FromRow for HeadlineRow {
    fn from_row(r: &Named<'_>) -> Result<Self, QueryError> {
        let procs = match r.value("processes")? {
            Value::Null => String::new(),
            Value::String(s) => s,
            v => v.to_string(),
        };
        Ok(HeadlineRow(
            (
                r.text("host")?,
                r.text("netns")?,
                r.text("protocol")?,
                r.int("port")?,
            ),
            r.text("shown_as")?,
            procs,
        ))
    }
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
    limit: Option<usize>,
) -> Result<Report, QueryError> {
    let order = match ro.dialect() {
        Dialect::Sqlite => "ORDER BY e.at, h.name, e.netns, e.protocol, e.port, e.change",
        Dialect::Postgres => {
            "ORDER BY e.at, h.name COLLATE \"C\", e.netns COLLATE \"C\", e.protocol, e.port, e.change"
        }
    };
    let sql = format!(
        "SELECT e.at, h.name AS host, e.change, e.netns, e.protocol, e.port, e.family,
                e.address, e.shown_as, e.reach_ipv4, e.reach_ipv6, e.processes
         FROM ({}) e JOIN host h ON h.id = e.host_id
         {order}",
        events_sql(ro, true, host.is_some())
    );
    let events = ro
        .run(&sql, &window_params(since, Some(until), host))
        .await
        .map_err(too_many_changes)?;
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
    for (k, (b, a)) in touched(ro, since, Some(until), host)
        .await
        .map_err(too_many_changes)?
    {
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
            .get(&k)
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
    Ok(Report::limited(rs, limit))
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
