//! Change history: what changed between two times (`diff`), the headline as of any time
//! (`exposure --at`), and time arguments.
//!
//! Both are driven by the events in their window (the listener versions that began or
//! ended in it, found through indexes on the time columns), never by loading whole fleet
//! states: a port without events did not change. They return what the `listener_changes`
//! and `hidden_ipv4_exposure` views would, on every database and on whatever retention
//! has left. Exposure per port is aggregated here as the headline view does it, firewall
//! verdicts included: the hidden side's effective IPv4 verdict as `hidden_port` keeps it
//! (`store::row::hidden_effective_sql`: the most permissive among the port's trap
//! sockets), and per IP version the most permissive verdict of the port's listeners for
//! `diff`. Verdicts rank by `Effective::permissiveness`, the same numbers the SQL uses.

use std::collections::{BTreeMap, BTreeSet};

use listenscope_core::domain::Effective;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::query::{Dialect, FromRow, Named, Param, QueryError, ReadOnly, ResultSet};
use crate::store::row::rank_sql;
use crate::timefmt;

/// The time arguments `--since`, `--until` and `--at` accept, for `--help` and errors.
pub const TIME_FORMS: &str = "now; an age such as 24h, 7d, 90m (that long ago, at most \
     100 years); a UTC time as this tool prints it (2026-11-27 09:00:00, seconds and \
     .mmm optional) or with a T (2026-11-27T09:00:00); RFC 3339 with a zone \
     (2026-11-27T09:00:00Z, 2026-11-27T10:00:00+01:00); a date (2026-11-27: midnight UTC)";

/// Parses a time argument (see [`TIME_FORMS`]): `now`, an age (that long before `now`),
/// a time in this tool's own format or with a `T` (UTC), RFC 3339 with a zone, or a date
/// (midnight UTC).
pub fn parse_time(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now);
    }
    use listenscope_core::config::{DurationError, try_parse_duration};
    match try_parse_duration(s) {
        Ok(d) => time::Duration::try_from(d)
            .ok()
            .and_then(|d| now.checked_sub(d))
            .ok_or_else(|| format!("{s:?} before now is out of the range of dates")),
        Err(e @ DurationError::OutOfRange(_)) => Err(e.to_string()),
        Err(_) => absolute(s).ok_or_else(|| format!("{s:?} is not a time; use {TIME_FORMS}")),
    }
}

/// A written time: `YYYY-MM-DD`, then optionally ` `/`T` and `HH:MM[:SS[.f…]]`, then
/// optionally `Z` or an offset (RFC 3339); without a zone the time is UTC.
fn absolute(s: &str) -> Option<OffsetDateTime> {
    use time::format_description::BorrowedFormatItem;
    use time::macros::format_description;
    const DATE: &[BorrowedFormatItem<'static>] = format_description!("[year]-[month]-[day]");
    const CLOCK: &[BorrowedFormatItem<'static>] =
        format_description!("[hour]:[minute][optional [:[second][optional [.[subsecond]]]]]");
    let date_len = 10;
    let date = time::Date::parse(s.get(..date_len)?, DATE).ok()?;
    let rest = &s[date_len..];
    if rest.is_empty() {
        return Some(date.midnight().assume_utc());
    }
    let rest = rest.strip_prefix([' ', 'T', 't'])?;
    // RFC 3339 with its zone (`Z`, `+01:00`): the whole text in `T` form.
    if let Ok(t) = OffsetDateTime::parse(&format!("{}T{rest}", &s[..date_len]), &Rfc3339) {
        return Some(t);
    }
    let clock = time::Time::parse(rest, CLOCK).ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
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
    /// Whether any listener held the port (the firewall is compared only then).
    pub present: bool,
    /// Most permissive firewall verdict among its listeners over IPv4 / IPv6 (`n/a`
    /// without listeners), each with the conditions of its listeners when `restricted`
    /// (one condition per line, each listener's list once, in byte order; else empty).
    pub firewall_ipv4: (Effective, String),
    pub firewall_ipv6: (Effective, String),
    /// The hidden side's effective IPv4 verdict and conditions, as the `hidden_port` row
    /// of the port holds them (meaningful when `hidden`).
    pub hidden_effective: Effective,
    pub hidden_conditions: Option<String>,
}

type PortKey = (String, String, String, i64);

/// A stored verdict name; anything else counts as `unknown` (never guessed open).
fn verdict(s: &str) -> Effective {
    s.parse().unwrap_or(Effective::Unknown)
}

/// A verdict read as its rank (`store::row::rank_sql`): the reports that read tens of
/// thousands of versions get an integer per row, not a string to allocate and parse.
fn verdict_of_rank(rank: i64) -> Effective {
    Effective::ALL
        .into_iter()
        .find(|e| i64::from(e.permissiveness()) == rank)
        .unwrap_or(Effective::Unknown)
}

/// The more permissive of two verdicts.
fn widest(a: Option<Effective>, b: Effective) -> Option<Effective> {
    Some(match a {
        Some(a) if a.permissiveness() >= b.permissiveness() => a,
        _ => b,
    })
}

/// A verdict with its conditions as stored (one per line) for display: `restricted
/// (saddr 10.0.0.0/8 | iifname eth0)`.
fn verdict_text(v: Effective, conditions: &str) -> String {
    if conditions.is_empty() {
        v.as_str().to_string()
    } else {
        format!("{} ({})", v.as_str(), conditions.replace('\n', " | "))
    }
}

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
    trap: bool,
    shown_as: String,
    processes: String,
    /// Verdicts and their stored conditions (one per line).
    effective_ipv4: (Effective, String),
    effective_ipv6: (Effective, String),
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
            trap: r.boolean("trap")?,
            shown_as: r.text("shown_as")?,
            processes: r.text("processes")?,
            effective_ipv4: (
                verdict_of_rank(r.int("effective_ipv4_rank")?),
                r.text("effective_conditions_ipv4")?,
            ),
            effective_ipv6: (
                verdict_of_rank(r.int("effective_ipv6_rank")?),
                r.text("effective_conditions_ipv6")?,
            ),
            at_since: r.boolean("at_since")?,
            at_until: r.boolean("at_until")?,
        })
    }
}

/// The most permissive verdict of some listeners, and the condition lists of those of
/// them that are `restricted` (non-empty lists, each once, in byte order).
#[derive(Default)]
struct Verdicts {
    widest: Option<Effective>,
    restricted: BTreeSet<String>,
}

impl Verdicts {
    fn add(&mut self, (v, conditions): &(Effective, String)) {
        self.widest = widest(self.widest, *v);
        if *v == Effective::Restricted && !conditions.is_empty() {
            self.restricted.insert(conditions.clone());
        }
    }

    /// The widest verdict (`none` without listeners) and, when it is `restricted`, the
    /// conditions joined one per line (`None` when there are none).
    fn result(self, none: Effective) -> (Effective, Option<String>) {
        let v = self.widest.unwrap_or(none);
        let conditions = (v == Effective::Restricted && !self.restricted.is_empty())
            .then(|| self.restricted.into_iter().collect::<Vec<_>>().join("\n"));
        (v, conditions)
    }
}

/// Accumulates listener versions into per-port states: the best reach of the port, the
/// agent's hidden verdict carried in each record, the lists the headline view shows, and
/// the firewall verdicts (all listeners per IP version; the trap sockets for the hidden
/// side, as `hidden_port` aggregates them).
#[derive(Default)]
struct Acc {
    present: bool,
    v4: (u8, &'static str),
    v6: (u8, &'static str),
    hidden: bool,
    shown: BTreeSet<String>,
    procs: BTreeSet<String>,
    fw4: Verdicts,
    fw6: Verdicts,
    trap4: Verdicts,
}

impl Acc {
    fn add(&mut self, r: &VersionRow) {
        self.present = true;
        self.v4 = self.v4.max(r.reach_ipv4);
        self.v6 = self.v6.max(r.reach_ipv6);
        self.hidden |= r.hidden;
        self.shown.insert(r.shown_as.clone());
        // Whole owner lists, as the hidden_ipv4_exposure view aggregates them.
        self.procs.insert(r.processes.clone());
        self.fw4.add(&r.effective_ipv4);
        self.fw6.add(&r.effective_ipv6);
        if r.trap {
            self.trap4.add(&r.effective_ipv4);
        }
    }

    fn state(self) -> PortState {
        let (fw4, c4) = self.fw4.result(Effective::NotApplicable);
        let (fw6, c6) = self.fw6.result(Effective::NotApplicable);
        let (hidden_effective, hidden_conditions) = self.trap4.result(Effective::Unknown);
        PortState {
            ipv4: if self.v4.0 == 0 { "none" } else { self.v4.1 },
            ipv6: if self.v6.0 == 0 { "none" } else { self.v6.1 },
            hidden: self.hidden,
            shown_as: join(self.shown),
            processes: join(self.procs),
            present: self.present,
            firewall_ipv4: (fw4, c4.unwrap_or_default()),
            firewall_ipv6: (fw6, c6.unwrap_or_default()),
            hidden_effective,
            hidden_conditions,
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
/// after `since`), as events: columns host_id, at, change, netns, protocol, port and, when
/// `full`, id, family, address, shown_as, reach_ipv4, reach_ipv6, processes, the
/// verdicts and their stored conditions (one per line): the port questions read only the
/// keys (PostgreSQL computes every column of a UNION ALL). Parameters: 1 = since,
/// 2 = until (when bounded), then the host name (when given), then the port (when
/// given). Both halves run on an index on the time column, so the cost follows the
/// number of changes, not the fleet.
fn events_sql(ro: &ReadOnly, bounded: bool, host: bool, port: bool, full: bool) -> String {
    let since = ph(ro, 1);
    let until = bounded.then(|| ph(ro, 2));
    let host_param = ph(ro, if bounded { 3 } else { 2 });
    let port_param = ph(ro, 2 + usize::from(bounded) + usize::from(host));
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
        if port {
            w.push_str(&format!(" AND port = {port_param}"));
        }
        w
    };
    let full_cols = format!(
        "id, netns, protocol, family, address, port, shown_as, reach_ipv4, reach_ipv6, \
         hidden_ipv4_exposure, process_names AS processes, {} AS effective_ipv4_rank, {} AS effective_ipv6_rank, \
         effective_conditions_ipv4, effective_conditions_ipv6",
        rank_sql("effective_ipv4"),
        rank_sql("effective_ipv6")
    );
    let cols = if full {
        full_cols.as_str()
    } else {
        "netns, protocol, port"
    };
    format!(
        "SELECT host_id, valid_from AS at,
                CASE WHEN valid_from = first_seen THEN 'opened' ELSE 'changed' END AS change,
                {cols}
         FROM listener WHERE {}
         UNION ALL
         SELECT host_id, valid_to AS at, 'closed' AS change, {cols}
         FROM listener WHERE end_reason = 'closed' AND {}",
        window("valid_from"),
        window("valid_to"),
    )
}

fn window_params(
    since: OffsetDateTime,
    until: Option<OffsetDateTime>,
    host: Option<&str>,
    port: Option<u16>,
) -> Vec<Param> {
    let mut p = vec![Param::Time(since)];
    if let Some(u) = until {
        p.push(Param::Time(u));
    }
    if let Some(h) = host {
        p.push(Param::Text(Some(h.to_string())));
    }
    if let Some(port) = port {
        p.push(Param::Int(Some(i64::from(port))));
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
    port: Option<u16>,
) -> Result<BTreeMap<PortKey, (PortState, PortState)>, QueryError> {
    let events = events_sql(ro, until.is_some(), host.is_some(), port.is_some(), false);
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
    let (rank4, rank6) = (rank_sql("l.effective_ipv4"), rank_sql("l.effective_ipv6"));
    let sql = format!(
        "WITH t AS (SELECT DISTINCT host_id, netns, protocol, port FROM ({events}) e)
         SELECT h.name AS host, l.netns, l.protocol, l.port, l.reach_ipv4, l.reach_ipv6,
                l.hidden_ipv4_exposure, l.trap, l.shown_as, l.process_names AS processes,
                {rank4} AS effective_ipv4_rank, {rank6} AS effective_ipv6_rank,
                l.effective_conditions_ipv4,
                l.effective_conditions_ipv6,
                CASE WHEN {at_since} THEN 1 ELSE 0 END AS at_since,
                CASE WHEN {at_until} THEN 1 ELSE 0 END AS at_until
         FROM t
         {versions}
         JOIN host h ON h.id = l.host_id
         WHERE {at_since} OR {at_until}"
    );
    let rows = ro
        .run(&sql, &window_params(since, until, host, port))
        .await?;
    // Every touched port, even one with no listener at either end (opened and closed
    // inside the window): its key comes from the events.
    let keys = ro
        .run(
            &format!(
                "SELECT DISTINCT h.name AS host, e.netns, e.protocol, e.port
                 FROM ({events}) e JOIN host h ON h.id = e.host_id"
            ),
            &window_params(since, until, host, port),
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
        QueryError::TooManyRows => QueryError::WindowTooBig(crate::query::MAX_ROWS),
        QueryError::RowsOver(n) => QueryError::WindowTooBig(n),
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

/// The headline as of `at`: the rows of [`crate::query::exposure`] as they were then, in
/// its order (ports the firewall leaves open or restricted first). The current headline
/// (maintained at ingest) is rolled back over the changes since `at`: only ports with
/// events after `at` are recomputed from history, effective verdict included.
pub async fn exposure_at(
    ro: &ReadOnly,
    at: OffsetDateTime,
    port: Option<u16>,
    protocol: Option<&str>,
    limit: Option<usize>,
) -> Result<Report, QueryError> {
    let changed = touched(ro, at, None, None, None)
        .await
        .map_err(too_many_changes)?;
    let now = crate::query::headline_rows(ro, port, protocol).await?;
    let wanted = |p: i64, proto: &str| {
        port.is_none_or(|want| i64::from(want) == p) && protocol.is_none_or(|want| want == proto)
    };
    // The rows of ports without events since `at` are today's, as read (moved, not
    // decoded: a port-80 question at 100,000 hosts reads 30,000 of them); the others are
    // rebuilt from history.
    let changed_keys: std::collections::HashSet<(&str, &str, &str, i64)> = changed
        .keys()
        .map(|(h, n, p, port)| (h.as_str(), n.as_str(), p.as_str(), *port))
        .collect();
    let mut rows: Vec<(u8, Vec<Value>)> = Vec::with_capacity(now.rows.len());
    for r in now.rows {
        if r.len() != 8 {
            return Err(QueryError::Sql(format!(
                "headline row of {} columns",
                r.len()
            )));
        }
        let key = (
            r[0].as_str().unwrap_or(""),
            r[1].as_str().unwrap_or(""),
            r[2].as_str().unwrap_or(""),
            r[3].as_i64().unwrap_or(0),
        );
        if changed_keys.contains(&key) {
            continue;
        }
        rows.push((verdict(r[6].as_str().unwrap_or("")).permissiveness(), r));
    }
    drop(changed_keys);
    for ((host, netns, proto, p), (then, _)) in changed {
        if then.hidden && wanted(p, &proto) {
            rows.push((
                then.hidden_effective.permissiveness(),
                vec![
                    Value::from(host),
                    Value::from(netns),
                    Value::from(proto),
                    Value::from(p),
                    Value::from(then.shown_as),
                    text_or_null(then.processes),
                    Value::from(then.hidden_effective.as_str()),
                    // As the view shows them: ' | ' between ways in.
                    then.hidden_conditions
                        .map_or(Value::Null, |c| Value::from(c.replace('\n', " | "))),
                ],
            ));
        }
    }
    // The order of `query::exposure`: most permissive verdict first, then the port key
    // (byte order, as both databases sort it there).
    fn port_key(r: &[Value]) -> (&str, &str, &str, i64) {
        (
            r[0].as_str().unwrap_or(""),
            r[1].as_str().unwrap_or(""),
            r[2].as_str().unwrap_or(""),
            r[3].as_i64().unwrap_or(0),
        )
    }
    rows.sort_unstable_by(|(ra, a), (rb, b)| {
        rb.cmp(ra).then_with(|| port_key(a).cmp(&port_key(b)))
    });
    let left_out = match limit {
        Some(n) if rows.len() > n => {
            let extra = rows.len() - n;
            rows.truncate(n);
            extra as u64
        }
        _ => 0,
    };
    let mut rs = ResultSet {
        columns: crate::query::EXPOSURE_COLUMNS.map(String::from).to_vec(),
        rows: Vec::with_capacity(rows.len()),
    };
    for (_, mut r) in rows {
        let note = crate::query::exposure_note(r[6].as_str().unwrap_or(""));
        r.push(note);
        rs.rows.push(r);
    }
    Ok(Report { rows: rs, left_out })
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// One row of `listener_changes`, as `diff` reads it.
struct EventRow {
    /// The version's row id (to find the version a `changed` replaced).
    id: i64,
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
    hidden: bool,
    processes: String,
    /// For `changed`: reach over IPv4, over IPv6, and hidden, of the version it replaced,
    /// when still stored.
    before_reach: Option<(String, String, bool)>,
    /// The verdicts after the event (before it, for `closed`), conditions as stored.
    effective_ipv4: (Effective, String),
    effective_ipv6: (Effective, String),
    /// For `changed`: the verdicts of the version it replaced, when still stored.
    before_ipv4: Option<(Effective, String)>,
    before_ipv6: Option<(Effective, String)>,
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
            hidden: r.boolean("hidden_ipv4_exposure")?,
            processes: r.text("processes")?,
            before_reach: None,
            effective_ipv4: (
                verdict_of_rank(r.int("effective_ipv4_rank")?),
                r.text("effective_conditions_ipv4")?,
            ),
            effective_ipv6: (
                verdict_of_rank(r.int("effective_ipv6_rank")?),
                r.text("effective_conditions_ipv6")?,
            ),
            id: r.int("id")?,
            before_ipv4: None,
            before_ipv6: None,
        })
    }
}

/// Fills in, for each `changed` event, the verdicts of the version it replaced: the same
/// key's previous row (ids grow with every insert, and a key's versions are inserted in
/// time order), one lookup through (host_id, port) per changed event, in one statement
/// for all of them. Windows without `changed` events cost nothing more. A replaced
/// version that retention already pruned leaves the event without a before.
async fn replaced_verdicts(ro: &ReadOnly, events: &mut [EventRow]) -> Result<(), QueryError> {
    let wanted: Vec<i64> = events
        .iter()
        .filter(|e| e.change == "changed")
        .map(|e| e.id)
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    // The ids go as one JSON array parameter (one statement whatever their number).
    let sql = match ro.dialect() {
        Dialect::Sqlite => {
            "SELECT e.id, p.effective_ipv4, p.effective_ipv6, p.effective_conditions_ipv4,
                    p.effective_conditions_ipv6, p.reach_ipv4, p.reach_ipv6,
                    p.hidden_ipv4_exposure
             FROM json_each(?1) AS k
             JOIN listener e ON e.id = k.value
             JOIN listener p ON p.id = (
                 SELECT max(q.id) FROM listener q
                 WHERE q.host_id = e.host_id AND q.port = e.port AND q.lkey = e.lkey
                   AND q.id < e.id)"
        }
        // As a LATERAL lookup per event (see `touched` for why PostgreSQL gets it so).
        Dialect::Postgres => {
            "SELECT e.id, p.effective_ipv4, p.effective_ipv6, p.effective_conditions_ipv4,
                    p.effective_conditions_ipv6, p.reach_ipv4, p.reach_ipv6,
                    p.hidden_ipv4_exposure
             FROM json_array_elements_text($1::json) AS k (id)
             JOIN listener e ON e.id = k.id::bigint
             CROSS JOIN LATERAL (
                 SELECT q.effective_ipv4, q.effective_ipv6, q.effective_conditions_ipv4,
                        q.effective_conditions_ipv6, q.reach_ipv4, q.reach_ipv6,
                        q.hidden_ipv4_exposure
                 FROM listener q
                 WHERE q.host_id = e.host_id AND q.port = e.port AND q.lkey = e.lkey
                   AND q.id < e.id
                 ORDER BY q.id DESC LIMIT 1) p"
        }
    };
    let list = serde_json::to_string(&wanted)
        .map_err(|e| QueryError::Sql(format!("cannot encode a list: {e}")))?;
    let rows = ro.run(sql, &[Param::Text(Some(list))]).await?;
    let mut before: std::collections::HashMap<i64, ReplacedRow> = rows
        .decode::<ReplacedRow>()?
        .into_iter()
        .map(|r| (r.0, r))
        .collect();
    for e in events.iter_mut().filter(|e| e.change == "changed") {
        if let Some(ReplacedRow(_, [v4, v6], reach)) = before.remove(&e.id) {
            e.before_ipv4 = Some(v4);
            e.before_ipv6 = Some(v6);
            e.before_reach = Some(reach);
        }
    }
    Ok(())
}

/// A replaced version's verdicts and reach (IPv4, IPv6, hidden), by the id of the
/// event's version.
struct ReplacedRow(i64, [(Effective, String); 2], (String, String, bool));

impl FromRow for ReplacedRow {
    fn from_row(r: &Named<'_>) -> Result<Self, QueryError> {
        Ok(ReplacedRow(
            r.int("id")?,
            [
                (
                    verdict(&r.text("effective_ipv4")?),
                    r.text("effective_conditions_ipv4")?,
                ),
                (
                    verdict(&r.text("effective_ipv6")?),
                    r.text("effective_conditions_ipv6")?,
                ),
            ],
            (
                r.text("reach_ipv4")?,
                r.text("reach_ipv6")?,
                r.boolean("hidden_ipv4_exposure")?,
            ),
        ))
    }
}

/// `; firewall IPv4 open, IPv6 restricted (saddr 10.0.0.0/8)` for an event: each IP
/// version's verdict, or its change (`IPv4 open → filtered`) when the event replaced a
/// version with another verdict; versions that are `n/a` and stay so are left out.
fn firewall_detail(e: &EventRow) -> String {
    let mut parts = Vec::new();
    for (name, now, before) in [
        ("IPv4", &e.effective_ipv4, &e.before_ipv4),
        ("IPv6", &e.effective_ipv6, &e.before_ipv6),
    ] {
        match before {
            Some(b) if b != now => parts.push(format!(
                "{name} {} → {}",
                verdict_text(b.0, &b.1),
                verdict_text(now.0, &now.1)
            )),
            _ if now.0 != Effective::NotApplicable => {
                parts.push(format!("{name} {}", verdict_text(now.0, &now.1)))
            }
            _ => {}
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; firewall {}", parts.join(", "))
    }
}

/// The columns of `diff`: the event and `detail` (what changed, in words: the table's
/// eight columns, first, in the order they always had), then the listener's `family` and
/// `address` (`null` on `exposure` lines, which are per port), its processes, and each
/// field's state before and after the event (`null` where there is none: before an
/// `opened`, after a `closed`). `firewall_*` are verdict names, `conditions_*` the ways
/// in of a `restricted` verdict (` | ` between them, as the views show them).
pub const DIFF_COLUMNS: [&str; 25] = [
    "at",
    "host",
    "change",
    "netns",
    "protocol",
    "port",
    "shown_as",
    "detail",
    "family",
    "address",
    "processes",
    "reach_ipv4_before",
    "reach_ipv4_after",
    "reach_ipv6_before",
    "reach_ipv6_after",
    "hidden_before",
    "hidden_after",
    "firewall_ipv4_before",
    "firewall_ipv4_after",
    "conditions_ipv4_before",
    "conditions_ipv4_after",
    "firewall_ipv6_before",
    "firewall_ipv6_after",
    "conditions_ipv6_before",
    "conditions_ipv6_after",
];

/// The columns `diff` prints as a table (the rest is in `detail`).
pub const DIFF_TABLE_COLUMNS: [&str; 8] = [
    "at", "host", "change", "netns", "protocol", "port", "shown_as", "detail",
];

fn text_or_null(s: String) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::from(s)
    }
}

/// One side (before or after) of a `diff` line, as JSON values.
struct Side {
    reach_ipv4: Value,
    reach_ipv6: Value,
    hidden: Value,
    firewall_ipv4: Value,
    conditions_ipv4: Value,
    firewall_ipv6: Value,
    conditions_ipv6: Value,
}

impl Side {
    const NONE: Side = Side {
        reach_ipv4: Value::Null,
        reach_ipv6: Value::Null,
        hidden: Value::Null,
        firewall_ipv4: Value::Null,
        conditions_ipv4: Value::Null,
        firewall_ipv6: Value::Null,
        conditions_ipv6: Value::Null,
    };

    fn verdict(v: &(Effective, String)) -> (Value, Value) {
        (
            Value::from(v.0.as_str()),
            text_or_null(v.1.replace('\n', " | ")),
        )
    }

    fn new(reach: (&str, &str, bool), v4: &(Effective, String), v6: &(Effective, String)) -> Side {
        let ((firewall_ipv4, conditions_ipv4), (firewall_ipv6, conditions_ipv6)) =
            (Side::verdict(v4), Side::verdict(v6));
        Side {
            reach_ipv4: Value::from(reach.0),
            reach_ipv6: Value::from(reach.1),
            hidden: Value::Bool(reach.2),
            firewall_ipv4,
            conditions_ipv4,
            firewall_ipv6,
            conditions_ipv6,
        }
    }

    /// The event's own version.
    fn of_version(e: &EventRow) -> Side {
        Side::new(
            (&e.reach_ipv4, &e.reach_ipv6, e.hidden),
            &e.effective_ipv4,
            &e.effective_ipv6,
        )
    }

    /// The version a `changed` event replaced, when still stored.
    fn replaced(e: &EventRow) -> Side {
        match (&e.before_reach, &e.before_ipv4, &e.before_ipv6) {
            (Some((r4, r6, hidden)), Some(v4), Some(v6)) => Side::new((r4, r6, *hidden), v4, v6),
            _ => Side::NONE,
        }
    }

    /// A port's state at one end of the window (`none` and `n/a` without listeners).
    fn of_port(p: &PortState) -> Side {
        Side::new(
            (p.ipv4, p.ipv6, p.hidden),
            &p.firewall_ipv4,
            &p.firewall_ipv6,
        )
    }

    /// Appends both sides in [`DIFF_COLUMNS`] order (each field before, then after).
    fn push_pair(row: &mut Vec<Value>, before: Side, after: Side) {
        row.extend([
            before.reach_ipv4,
            after.reach_ipv4,
            before.reach_ipv6,
            after.reach_ipv6,
            before.hidden,
            after.hidden,
            before.firewall_ipv4,
            after.firewall_ipv4,
            before.conditions_ipv4,
            after.conditions_ipv4,
            before.firewall_ipv6,
            after.firewall_ipv6,
            before.conditions_ipv6,
            after.conditions_ipv6,
        ]);
    }
}

/// What changed in `(since, until]`: every listener opened, changed or closed, with its
/// observation time and its firewall verdicts (for `changed`, the verdicts' change: the
/// replaced version is looked up by key, one index probe per changed event, in a second
/// statement), then every
/// port whose exposure differs between the two times (over IPv4, over IPv6, hidden from
/// netstat, or the firewall's most permissive verdict per IP version), e.g. a port that
/// became reachable over IPv4 or that a ruleset change opened.
pub async fn diff(
    ro: &ReadOnly,
    host: Option<&str>,
    since: OffsetDateTime,
    until: OffsetDateTime,
    limit: Option<usize>,
) -> Result<Report, QueryError> {
    diff_filtered(ro, host, None, since, until, limit).await
}

/// [`diff`] of one port only (`port`; every port with `None`): its events and its
/// exposure lines, through the same index on the time columns.
pub async fn diff_filtered(
    ro: &ReadOnly,
    host: Option<&str>,
    port: Option<u16>,
    since: OffsetDateTime,
    until: OffsetDateTime,
    limit: Option<usize>,
) -> Result<Report, QueryError> {
    diff_window(ro, host, port, since, until, limit, crate::query::MAX_ROWS).await
}

/// [`diff_filtered`] reading at most `max_events` events of the window (all of them
/// are read, whatever `limit` shows): a window holding more is
/// [`QueryError::WindowTooBig`]. The web UI bounds its memory per request with it.
pub async fn diff_window(
    ro: &ReadOnly,
    host: Option<&str>,
    port: Option<u16>,
    since: OffsetDateTime,
    until: OffsetDateTime,
    limit: Option<usize>,
    max_events: usize,
) -> Result<Report, QueryError> {
    let order = match ro.dialect() {
        Dialect::Sqlite => "ORDER BY e.at, h.name, e.netns, e.protocol, e.port, e.change",
        Dialect::Postgres => {
            "ORDER BY e.at, h.name COLLATE \"C\", e.netns COLLATE \"C\", e.protocol, e.port, e.change"
        }
    };
    let sql = format!(
        "SELECT e.at, h.name AS host, e.change, e.id, e.netns, e.protocol,
                e.port, e.family, e.address, e.shown_as, e.reach_ipv4, e.reach_ipv6,
                e.hidden_ipv4_exposure, e.processes, e.effective_ipv4_rank, e.effective_ipv6_rank,
                e.effective_conditions_ipv4,
                e.effective_conditions_ipv6
         FROM ({}) e JOIN host h ON h.id = e.host_id
         {order}",
        events_sql(ro, true, host.is_some(), port.is_some(), true)
    );
    let bounds = crate::query::Bounds {
        timeout: crate::query::DEFAULT_TIMEOUT,
        max_rows: max_events,
        max_bytes: u64::MAX,
    };
    let events = ro
        .run_bounded(&sql, &window_params(since, Some(until), host, port), bounds)
        .await
        .map_err(too_many_changes)?;
    // Only the rows the limit keeps are decoded and described (a window of 10,000
    // changes prints 1,000); every event still gives its port's latest time, which the
    // exposure lines are reported at.
    let keep = limit.unwrap_or(usize::MAX);
    let mut last_event: BTreeMap<PortKey, Value> = BTreeMap::new();
    let mut shown: Vec<EventRow> = Vec::new();
    for (i, r) in events.named().enumerate() {
        let key = (
            r.text("host")?,
            r.text("netns")?,
            r.text("protocol")?,
            r.int("port")?,
        );
        last_event.insert(key, r.value("at")?);
        if i < keep {
            shown.push(EventRow::from_row(&r)?);
        }
    }
    let mut left_out = events.rows.len().saturating_sub(keep) as u64;
    drop(events);
    replaced_verdicts(ro, &mut shown).await?;
    let mut rs = ResultSet {
        columns: DIFF_COLUMNS.map(String::from).to_vec(),
        rows: Vec::new(),
    };
    for e in shown {
        let detail = format!(
            "{} {} {}: IPv4 {}, IPv6 {}{}{}",
            e.family,
            e.address,
            if e.change == "closed" { "was" } else { "now" },
            e.reach_ipv4,
            e.reach_ipv6,
            firewall_detail(&e),
            match e.processes.as_str() {
                "" => String::new(),
                p => format!(" ({p})"),
            }
        );
        let this = Side::of_version(&e);
        let (before, after) = match e.change.as_str() {
            "opened" => (Side::NONE, this),
            "closed" => (this, Side::NONE),
            // A replaced version that retention pruned has no before.
            _ => (Side::replaced(&e), this),
        };
        let mut row = vec![
            e.at,
            Value::from(e.host),
            Value::from(e.change),
            Value::from(e.netns),
            Value::from(e.protocol),
            Value::from(e.port),
            Value::from(e.shown_as),
            Value::from(detail),
            Value::from(e.family),
            Value::from(e.address),
            text_or_null(e.processes),
        ];
        Side::push_pair(&mut row, before, after);
        rs.rows.push(row);
    }
    for (k, (b, a)) in touched(ro, since, Some(until), host, port)
        .await
        .map_err(too_many_changes)?
    {
        // The firewall is compared where the port has listeners at both ends (a port that
        // opened or closed says so through its reach).
        let firewall_changed = b.present
            && a.present
            && (b.firewall_ipv4 != a.firewall_ipv4 || b.firewall_ipv6 != a.firewall_ipv6);
        if (b.ipv4, b.ipv6, b.hidden) == (a.ipv4, a.ipv6, a.hidden) && !firewall_changed {
            continue;
        }
        if rs.rows.len() >= keep {
            left_out += 1;
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
        if !b.present && a.present {
            // A port that came to be: what the firewall does to it now.
            let now: Vec<String> = [("IPv4", &a.firewall_ipv4), ("IPv6", &a.firewall_ipv6)]
                .into_iter()
                .filter(|(_, v)| v.0 != Effective::NotApplicable)
                .map(|(name, v)| format!("{name} {}", verdict_text(v.0, &v.1)))
                .collect();
            if !now.is_empty() {
                what.push(format!("firewall {}", now.join(", ")));
            }
        }
        if firewall_changed {
            for (name, before, after) in [
                ("IPv4", &b.firewall_ipv4, &a.firewall_ipv4),
                ("IPv6", &b.firewall_ipv6, &a.firewall_ipv6),
            ] {
                if before != after {
                    what.push(format!(
                        "firewall {name} {} → {}",
                        verdict_text(before.0, &before.1),
                        verdict_text(after.0, &after.1)
                    ));
                }
            }
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
        let processes = if a.processes.is_empty() {
            &b.processes
        } else {
            &a.processes
        };
        let mut row = vec![
            at,
            Value::from(k.0.clone()),
            Value::from("exposure"),
            Value::from(k.1.clone()),
            Value::from(k.2.clone()),
            Value::from(k.3),
            Value::from(shown.clone()),
            Value::from(what.join("; ")),
            Value::Null,
            Value::Null,
            text_or_null(processes.clone()),
        ];
        Side::push_pair(&mut row, Side::of_port(&b), Side::of_port(&a));
        rs.rows.push(row);
    }
    Ok(Report { rows: rs, left_out })
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

    /// Every written form the tool accepts, its own output format first.
    #[test]
    fn written_times() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let nine = |ms: i64| {
            time::macros::datetime!(2026-11-27 09:00:00 UTC) + time::Duration::milliseconds(ms)
        };
        for (text, want) in [
            ("2026-11-27 09:00:00", nine(0)),
            ("2026-11-27 09:00:00.250", nine(250)),
            ("2026-11-27 09:00", nine(0)),
            ("2026-11-27T09:00:00", nine(0)),
            ("2026-11-27t09:00:00", nine(0)),
            ("2026-11-27T09:00:00Z", nine(0)),
            ("2026-11-27 09:00:00Z", nine(0)),
            ("2026-11-27T10:00:00+01:00", nine(0)),
            ("2026-11-27T09:00:00.5Z", nine(500)),
            ("2026-11-27", nine(0) - time::Duration::hours(9)),
            ("  2026-11-27  ", nine(0) - time::Duration::hours(9)),
        ] {
            assert_eq!(parse_time(text, now), Ok(want), "{text}");
        }
        // What `timefmt::format` prints reads back as the same time.
        let t = nine(123);
        assert_eq!(parse_time(&timefmt::format(t), now), Ok(t));
        for bad in [
            "2026-13-01",
            "2026-11-31",
            "2026-11-27 25:00",
            "2026-11-27X09:00",
            "2026-11-27 09:00:00 UTC",
            "27.11.2026",
            "2026-11",
        ] {
            let e = parse_time(bad, now).unwrap_err();
            assert!(
                e.contains("is not a time") && e.contains("2026-11-27 09:00:00"),
                "{bad}: {e}"
            );
        }
    }

    /// Ages beyond the range are errors that name the value and the range, never a panic.
    #[test]
    fn ages_out_of_range() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        for huge in ["99999999d", "36501d", "99999999999999999999999s"] {
            let e = parse_time(huge, now).unwrap_err();
            assert!(e.contains(huge) && e.contains("100 years"), "{huge}: {e}");
        }
        assert!(parse_time("36500d", now).is_ok());
        // At the start of the calendar, a century back has no date: an error, no panic.
        let first = time::PrimitiveDateTime::MIN.assume_utc();
        let e = parse_time("1s", first).unwrap_err();
        assert!(e.contains("out of the range of dates"), "{e}");
    }
}
