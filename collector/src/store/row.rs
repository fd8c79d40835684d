//! The listener row, defined once: its columns in order with their kinds, the values of
//! one new version, and the way back from stored columns to a record. Each backend turns
//! the column list into its own statement (SQLite: multi-row `VALUES`; PostgreSQL: one
//! array per column through `UNNEST`), so no backend spells out the 39 columns.
//!
//! Firewall verdicts are six columns: per IP version the verdict's name, its reason, and
//! its conditions as one text with one condition per line (the wire refuses control
//! characters inside a condition, so the text splits back exactly; the views show
//! ` | ` between them). The SQL that ranks verdicts (the headline's most permissive
//! verdict, the reports' order) is generated here from `Effective::permissiveness`, so
//! SQL and Rust cannot rank differently.

use std::borrow::Cow;
use std::net::IpAddr;

use listenscope_core::domain::{Container, Effective, ProcessInfo};
use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord};
use sqlx::{ColumnIndex, Decode, Row, Type};
use time::OffsetDateTime;

use super::StoreError;
use super::plan::NewRow;

/// How a column is typed (PostgreSQL's type; SQLite stores integers and text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    /// Text holding a JSON document (`jsonb` on PostgreSQL).
    Json,
    Int4,
    Int8,
    Bool,
    Time,
}

/// Columns of a new `listener` row, in insert order.
pub(crate) const COLUMNS: [(&str, Kind); 39] = [
    ("host_id", Kind::Int8),
    ("lkey", Kind::Text),
    ("netns", Kind::Text),
    ("netns_inode", Kind::Int8),
    ("protocol", Kind::Text),
    ("family", Kind::Text),
    ("address", Kind::Text),
    ("port", Kind::Int4),
    ("interface", Kind::Text),
    ("v6only", Kind::Bool),
    ("reach_ipv4", Kind::Text),
    ("reach_ipv6", Kind::Text),
    ("latent", Kind::Bool),
    ("shown_as", Kind::Text),
    ("netstat_proto", Kind::Text),
    ("trap", Kind::Bool),
    ("hidden_ipv4_exposure", Kind::Bool),
    ("process_names", Kind::Text),
    ("processes", Kind::Json),
    ("container_runtime", Kind::Text),
    ("container_id", Kind::Text),
    ("pod_uid", Kind::Text),
    ("unit", Kind::Text),
    ("cgroup", Kind::Text),
    ("uid", Kind::Int8),
    ("freebind", Kind::Bool),
    ("transparent", Kind::Bool),
    ("source", Kind::Text),
    ("sockets", Kind::Int4),
    ("effective_ipv4", Kind::Text),
    ("effective_ipv6", Kind::Text),
    ("effective_reason_ipv4", Kind::Text),
    ("effective_reason_ipv6", Kind::Text),
    ("effective_conditions_ipv4", Kind::Text),
    ("effective_conditions_ipv6", Kind::Text),
    ("material_hash", Kind::Int8),
    ("full_hash", Kind::Int8),
    ("first_seen", Kind::Time),
    ("valid_from", Kind::Time),
];

/// `col, col, …` of [`COLUMNS`].
pub(crate) fn column_list() -> String {
    COLUMNS.map(|(name, _)| name).join(", ")
}

/// One column's value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val<'a> {
    /// [`Kind::Text`] and [`Kind::Json`].
    Text(Option<Cow<'a, str>>),
    /// [`Kind::Int4`] and [`Kind::Int8`].
    Int(i64),
    Bool(Option<bool>),
    Time(OffsetDateTime),
}

fn text(s: &str) -> Val<'_> {
    Val::Text(Some(Cow::Borrowed(s)))
}

fn opt_text(s: Option<&str>) -> Val<'_> {
    Val::Text(s.map(Cow::Borrowed))
}

fn owned(s: String) -> Val<'static> {
    Val::Text(Some(Cow::Owned(s)))
}

/// The values of a new row, in [`COLUMNS`] order.
pub(crate) fn values<'a>(host_id: i64, n: &NewRow<'a>) -> [Val<'a>; 39] {
    let p = n.prepared;
    let r = &p.record;
    let k = &r.key;
    let c = r.container.as_ref();
    [
        Val::Int(host_id),
        text(&p.lkey),
        text(&k.netns),
        Val::Int(r.netns_inode as i64),
        text(k.protocol.as_str()),
        text(k.family.as_str()),
        owned(k.address.to_string()),
        Val::Int(i64::from(k.port)),
        opt_text(k.interface.as_deref()),
        Val::Bool(k.v6only),
        text(r.reach_ipv4.as_str()),
        text(r.reach_ipv6.as_str()),
        Val::Bool(Some(r.latent)),
        text(&r.shown_as),
        text(&r.netstat_proto),
        Val::Bool(Some(r.trap)),
        Val::Bool(Some(r.hidden_ipv4_exposure)),
        owned(r.process_names()),
        owned(processes_json(r)),
        opt_text(c.map(|c| c.runtime.as_str())),
        opt_text(c.map(|c| c.id.as_str())),
        opt_text(c.and_then(|c| c.pod_uid.as_deref())),
        opt_text(r.unit.as_deref()),
        opt_text(r.cgroup.as_deref()),
        Val::Int(i64::from(r.uid)),
        Val::Bool(r.freebind),
        Val::Bool(r.transparent),
        text(r.source.as_str()),
        Val::Int(i64::from(r.sockets)),
        text(r.effective_ipv4.verdict.as_str()),
        text(r.effective_ipv6.verdict.as_str()),
        text(&r.effective_ipv4.reason),
        text(&r.effective_ipv6.reason),
        owned(conditions_text(&r.effective_ipv4)),
        owned(conditions_text(&r.effective_ipv6)),
        Val::Int(p.fingerprints.material),
        Val::Int(p.fingerprints.full),
        Val::Time(n.first_seen),
        Val::Time(n.valid_from),
    ]
}

/// Owners as a JSON array of `{"pid","comm","cmdline","user"}` (the `processes` column,
/// `process_details` in the views).
pub(crate) fn processes_json(r: &ListenerRecord) -> String {
    // Serializing plain strings and integers cannot fail.
    serde_json::to_string(&r.processes).unwrap_or_else(|_| "[]".to_string())
}

/// A verdict's conditions as stored: one per line, `''` for none.
pub(crate) fn conditions_text(a: &FirewallAnswer) -> String {
    a.conditions.join("\n")
}

/// The stored conditions text back as a list (see [`conditions_text`]).
fn conditions_of(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('\n').map(str::to_string).collect()
    }
}

/// `CASE col WHEN 'open' THEN 5 … END`: a verdict column's rank
/// ([`Effective::permissiveness`]; an unexpected text ranks as `unknown`).
pub(crate) fn rank_sql(col: &str) -> String {
    let mut out = format!("CASE {col}");
    for e in Effective::ALL {
        out.push_str(&format!(
            " WHEN '{}' THEN {}",
            e.as_str(),
            e.permissiveness()
        ));
    }
    out.push_str(&format!(
        " ELSE {} END",
        Effective::Unknown.permissiveness()
    ));
    out
}

/// `CASE rank WHEN 5 THEN 'open' … END`: a rank back to its verdict's name; `fallback`
/// for NULL (no listener to rank).
pub(crate) fn verdict_of_rank_sql(rank: &str, fallback: Effective) -> String {
    let mut out = format!("CASE {rank}");
    for e in Effective::ALL {
        out.push_str(&format!(
            " WHEN {} THEN '{}'",
            e.permissiveness(),
            e.as_str()
        ));
    }
    out.push_str(&format!(" ELSE '{}' END", fallback.as_str()));
    out
}

/// The aggregates of a `hidden_port` row's firewall side over the port's live listeners
/// `l` (grouped by port): its `effective_ipv4` (the most permissive verdict among the
/// port's trap sockets, the AF_INET6 sockets that accept IPv4; `unknown` if it has none)
/// and its `effective_conditions_ipv4` (for `restricted`, the conditions of its
/// restricted trap sockets: each socket's list once, in byte order, one condition per
/// line; NULL otherwise). `string_agg` is PostgreSQL's spelling of the list. SQLite's
/// `group_concat` takes no separator with DISTINCT, so each list gets the suffix
/// `\n\x1f` and the `\n\x1f,` between lists becomes `\n`: a condition never holds a
/// control character, so that sequence occurs only there, and the suffix sorts below any
/// printable byte, so the lists keep their byte order. `history` computes the same from
/// listener versions, for `exposure --at`.
pub(crate) fn hidden_effective_sql(postgres: bool) -> String {
    let rank = format!(
        "max(CASE WHEN l.trap THEN {} END)",
        rank_sql("l.effective_ipv4")
    );
    let verdict = verdict_of_rank_sql(&rank, Effective::Unknown);
    let restricted = Effective::Restricted.permissiveness();
    let mine = "CASE WHEN l.trap AND l.effective_ipv4 = 'restricted' \
                THEN NULLIF(l.effective_conditions_ipv4, '') END";
    let list = if postgres {
        format!("string_agg(DISTINCT {mine} COLLATE \"C\", chr(10) ORDER BY {mine} COLLATE \"C\")")
    } else {
        format!(
            "rtrim(replace(group_concat(DISTINCT ({mine}) || char(10, 31) \
             ORDER BY ({mine}) || char(10, 31)), char(10, 31, 44), char(10)), char(10, 31))"
        )
    };
    format!("{verdict}, CASE WHEN {rank} = {restricted} THEN {list} END")
}

/// Columns [`record_of`] reads, for SQLite; PostgreSQL casts the integer and JSON columns
/// to `bigint`/`text` so that one decoder serves both.
pub(crate) const RECORD_COLUMNS: &str = "id, netns, netns_inode, protocol, family, address, \
    port, interface, v6only, reach_ipv4, reach_ipv6, latent, shown_as, netstat_proto, trap, \
    hidden_ipv4_exposure, processes, container_runtime, container_id, pod_uid, unit, cgroup, \
    uid, freebind, transparent, source, sockets, effective_ipv4, effective_ipv6, \
    effective_reason_ipv4, effective_reason_ipv6, effective_conditions_ipv4, \
    effective_conditions_ipv6";

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// A stored row back as the record that produced it (and its id): exactly what the agent
/// sent, so fingerprints recomputed from it equal those of a fresh ingest.
pub(crate) fn record_of<R>(r: &R) -> Result<(i64, ListenerRecord), StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'q> i64: Decode<'q, R::Database> + Type<R::Database>,
    for<'q> bool: Decode<'q, R::Database> + Type<R::Database>,
    for<'q> String: Decode<'q, R::Database> + Type<R::Database>,
{
    let s = |c: &str| r.try_get::<String, _>(c);
    let os = |c: &str| r.try_get::<Option<String>, _>(c);
    let i = |c: &str| r.try_get::<i64, _>(c);
    let ob = |c: &str| r.try_get::<Option<bool>, _>(c);
    let b = |c: &str| r.try_get::<bool, _>(c);
    let id = i("id")?;
    let address: IpAddr = s("address")?.parse().map_err(|e| corrupt("address", e))?;
    let processes: Vec<ProcessInfo> =
        serde_json::from_str(&s("processes")?).map_err(|e| corrupt("processes", e))?;
    let container = match os("container_runtime")? {
        Some(runtime) => Some(Container {
            runtime,
            id: os("container_id")?.unwrap_or_default(),
            pod_uid: os("pod_uid")?,
        }),
        None => None,
    };
    let int = |c: &str| -> Result<i64, StoreError> { Ok(i(c)?) };
    let answer = |v: &str, reason: &str, conds: &str| -> Result<FirewallAnswer, StoreError> {
        Ok(FirewallAnswer {
            verdict: s(v)?.parse().map_err(|e| corrupt(v, e))?,
            reason: s(reason)?,
            conditions: conditions_of(&s(conds)?),
        })
    };
    let ranged =
        |c: &str| -> Result<u32, StoreError> { u32::try_from(int(c)?).map_err(|e| corrupt(c, e)) };
    let record = ListenerRecord {
        key: ListenerKey {
            netns: s("netns")?,
            protocol: s("protocol")?.parse().map_err(|e| corrupt("protocol", e))?,
            family: s("family")?.parse().map_err(|e| corrupt("family", e))?,
            address,
            port: u16::try_from(int("port")?).map_err(|e| corrupt("port", e))?,
            interface: os("interface")?,
            v6only: ob("v6only")?,
        },
        netns_inode: int("netns_inode")? as u64,
        reach_ipv4: s("reach_ipv4")?
            .parse()
            .map_err(|e| corrupt("reach_ipv4", e))?,
        reach_ipv6: s("reach_ipv6")?
            .parse()
            .map_err(|e| corrupt("reach_ipv6", e))?,
        latent: b("latent")?,
        shown_as: s("shown_as")?,
        netstat_proto: s("netstat_proto")?,
        trap: b("trap")?,
        hidden_ipv4_exposure: b("hidden_ipv4_exposure")?,
        processes,
        container,
        unit: os("unit")?,
        cgroup: os("cgroup")?,
        uid: ranged("uid")?,
        freebind: ob("freebind")?,
        transparent: ob("transparent")?,
        source: s("source")?.parse().map_err(|e| corrupt("source", e))?,
        sockets: ranged("sockets")?,
        effective_ipv4: answer(
            "effective_ipv4",
            "effective_reason_ipv4",
            "effective_conditions_ipv4",
        )?,
        effective_ipv6: answer(
            "effective_ipv6",
            "effective_reason_ipv6",
            "effective_conditions_ipv6",
        )?,
    };
    Ok((id, record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::plan::Prepared;
    use listenscope_core::record::testkit::record;

    /// The page indexes hold the verdict's rank as the reports write it: an index on
    /// another expression would never be used, and nothing else would say so.
    #[test]
    fn page_indexes_rank_as_the_reports_do() {
        let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let want = format!("({}) DESC", squeeze(&rank_sql("effective_ipv4")));
        for (name, sql) in [
            (
                "sqlite",
                include_str!("../../../migrations/sqlite/0011_page_indexes.sql"),
            ),
            (
                "postgres",
                include_str!("../../../migrations/postgres/0011_page_indexes.sql"),
            ),
        ] {
            let sql = squeeze(sql);
            assert_eq!(sql.matches(&want).count(), 2, "{name}: {want} in {sql}");
        }
    }

    /// Every value has the variant its column's kind needs, so the backends' binders
    /// cannot drift from the list.
    #[test]
    fn values_match_column_kinds() {
        let mut r = record("host", "::", 80, Some(false));
        r.container = Some(Container {
            runtime: "docker".into(),
            id: "abc".into(),
            pod_uid: None,
        });
        let p = Prepared::new(r);
        let t = OffsetDateTime::UNIX_EPOCH;
        let n = NewRow {
            prepared: &p,
            first_seen: t,
            valid_from: t,
        };
        for ((name, kind), v) in COLUMNS.iter().zip(values(7, &n)) {
            let ok = matches!(
                (kind, &v),
                (Kind::Text | Kind::Json, Val::Text(_))
                    | (Kind::Int4 | Kind::Int8, Val::Int(_))
                    | (Kind::Bool, Val::Bool(_))
                    | (Kind::Time, Val::Time(_))
            );
            assert!(ok, "{name}: {kind:?} got {v:?}");
        }
        assert!(column_list().starts_with("host_id, lkey, netns,"));
    }

    #[test]
    fn conditions_split_back_exactly() {
        for conds in [
            vec![],
            vec!["saddr 10.0.0.0/8"],
            vec!["a | b", "iifname eth0 and sport 67", "é"],
        ] {
            let mut a = FirewallAnswer::new(Effective::Restricted, "r");
            a.conditions = conds.iter().map(|c| c.to_string()).collect();
            assert_eq!(conditions_of(&conditions_text(&a)), a.conditions);
        }
    }

    #[test]
    fn ranks_in_sql_are_the_domain_ranks() {
        assert_eq!(
            rank_sql("v"),
            "CASE v WHEN 'open' THEN 5 WHEN 'restricted' THEN 4 WHEN 'diverted' THEN 3 \
             WHEN 'unknown' THEN 2 WHEN 'filtered' THEN 1 WHEN 'n/a' THEN 0 ELSE 2 END"
        );
        assert!(
            verdict_of_rank_sql("r", Effective::Unknown)
                .ends_with("WHEN 0 THEN 'n/a' ELSE 'unknown' END")
        );
    }
}
