//! The pages: each parses its query string (only its own parameters, each checked),
//! builds the SQL it teaches (`sql=1` shows it instead of the answer), reads through the
//! read-only connection with the report functions of `query` and `history`, and
//! renders. Every fleet page reads a page of rows through an index or a maintained
//! table; `/ports` is the exception, computed at most once a minute (see
//! [`super::UiState::ports`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use maud::{Markup, html};
use serde_json::Value;
use time::OffsetDateTime;

use super::chart::{self, Hour};
use super::html::{
    self as h, Paging, View, code_block, host_href, href, none, sort_th, text, th, trap_legend,
    trap_mark, verdict,
};
use super::params::{BadParam, Dir, Params};
use super::{PageError, UiState, respond};
use crate::history;
use crate::query::{self, Dialect, ExposureSort, HostsSort, ListenerSort, Order, ResultSet};
use crate::store::row::rank_sql;
use crate::timefmt;

/// Most rows of "new IPv4 exposures" one page shows.
const NEW_EXPOSURE_ROWS: usize = 200;

/// The longest window `/changes` and a host's history read (31 days of hours).
const MAX_WINDOW: time::Duration = time::Duration::days(31);
/// How long the overview waits for the first count over whole tables (a small fleet's
/// ends within it; a big fleet's page says that it runs).
const OVERVIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the ports page waits for the first count before it says that it runs.
const PORTS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// The most listener changes one page reads from its window (`/changes`, a host's
/// history): every event of the window is read for the timeline and the exposure
/// lines, so this bounds each request's memory (about 1 KiB per event). A window with
/// more asks to be narrowed (503); `diff` on the command line reads up to a million.
pub const MAX_EVENTS: usize = 50_000;

/// One statement a page runs, as it can be run by hand over the views.
struct Sql {
    caption: String,
    sql: String,
    /// The report command that answers the same, when there is one.
    report: Option<String>,
}

/// A page's answer: its title and body, or its SQL.
enum Answer {
    Page { title: String, body: Markup },
}

/// What every page handler gets.
struct Ctx<'a> {
    state: &'a UiState,
    params: Params,
    view: View,
    current: &'static str,
}

impl Ctx<'_> {
    fn dialect(&self) -> Dialect {
        self.state.ro.dialect()
    }

    /// A text literal for the SQL shown.
    fn lit(&self, s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    /// A time literal for the SQL shown: the stored text form on SQLite, a UTC
    /// timestamptz on PostgreSQL.
    fn time_lit(&self, t: OffsetDateTime) -> String {
        match self.dialect() {
            Dialect::Sqlite => format!("'{}'", timefmt::format(t)),
            Dialect::Postgres => format!("TIMESTAMPTZ '{}+00'", timefmt::format(t)),
        }
    }

    /// The page, or its SQL when asked (`sql=1`).
    fn finish(&self, title: &str, sql: Vec<Sql>, run: Option<Answer>) -> Response {
        match run {
            Some(Answer::Page { title, body }) => respond(
                axum::http::StatusCode::OK,
                h::page(&title, self.current, Some(&self.view.sql_href()), body),
            ),
            None => self.sql_page(title, &sql),
        }
    }

    fn sql_page(&self, title: &str, sql: &[Sql]) -> Response {
        let db = self.state.db_label.as_str();
        let body = html! {
            p {
                "The page " a href=(self.view.here()) { (title) }
                " reads these statements through a read-only connection. They run as they \
                 are over the documented views (docs/views.md), with "
                code { "listenscope-collector query" } ", " code { "psql" } " or Grafana."
            }
            @for s in sql {
                h2 { (s.caption) }
                (code_block(&s.sql))
                p { "From a shell:" }
                (code_block(&format!(
                    "listenscope-collector query --db {} {}",
                    shell(db),
                    shell(&s.sql)
                )))
                @if let Some(r) = &s.report {
                    p { "The report that answers the same:" }
                    (code_block(r))
                }
            }
        };
        respond(
            axum::http::StatusCode::OK,
            h::page(&format!("Same as SQL: {title}"), self.current, None, body),
        )
    }

    fn report(&self, args: &str) -> String {
        format!(
            "listenscope-collector {args}",
            args = args.replace("{db}", &shell(&self.state.db_label))
        )
    }
}

/// `s` quoted for a POSIX shell (single quotes; a quote inside as `'\''`).
fn shell(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@=,+%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Parses the query string and runs `page`; bad parameters give the 400 page.
async fn handle<'a, F, Fut>(
    state: &'a UiState,
    raw: Option<String>,
    path: String,
    current: &'static str,
    allowed: &[&str],
    page: F,
) -> Response
where
    F: FnOnce(Ctx<'a>) -> Fut,
    Fut: std::future::Future<Output = Result<Response, PageError>>,
{
    let params = match Params::parse(raw.as_deref(), allowed) {
        Ok(p) => p,
        Err(e) => return PageError::Bad(e).into_page(current),
    };
    let ctx = Ctx {
        state,
        params,
        view: View {
            path,
            pairs: Vec::new(),
        },
        current,
    };
    match page(ctx).await {
        Ok(r) => r,
        Err(e) => e.into_page(current),
    }
}

fn total(report: &history::Report, offset: usize) -> u64 {
    (offset + report.rows.rows.len()) as u64 + report.left_out
}

// ---------------------------------------------------------------------------------------
// Overview

pub async fn overview(State(s): State<Arc<UiState>>, RawQuery(q): RawQuery) -> Response {
    handle(&s, q, "/".into(), "/", &[], |ctx| async move {
        let sql = vec![
            Sql {
                caption: "Hosts, stale hosts and live listeners (maintained counts)".into(),
                sql: query::OVERVIEW_HOSTS_SQL.into(),
                report: Some(ctx.report("hosts --db {db}")),
            },
            Sql {
                caption: "Hidden IPv4 exposures by the firewall's verdict (groups the \
                          headline's whole table: counted with the ports, at most once a \
                          minute)"
                    .into(),
                sql: query::OVERVIEW_HIDDEN_SQL.into(),
                report: Some(ctx.report("exposure --db {db}")),
            },
            Sql {
                caption: "Ports open to the world through the firewall (the sums of the \
                          ports page's columns; counted over every live listener at most \
                          once a minute)"
                    .into(),
                sql: format!(
                    "SELECT sum(ipv4_hosts) AS ipv4_any, sum(ipv4_open) AS ipv4_open,\n       \
                     sum(ipv6_hosts) AS ipv6_any, sum(ipv6_open) AS ipv6_open\nFROM (\n{}\n) AS ports",
                    query::PORTS_VIEW_SQL
                ),
                report: None,
            },
        ];
        if ctx.params.sql()? {
            return Ok(ctx.finish("Fleet overview", sql, None));
        }
        let o = query::overview(&ctx.state.ro).await?;
        // The whole-table counts come from the shared copy: a small fleet's first count
        // ends within the wait; a big one's page says that it runs.
        let counts = ctx.state.ports_within(OVERVIEW_WAIT).await;
        let effective = counts.as_ref().map(|c| {
            let col = |name: &str| c.rows.columns.iter().position(|n| n == name);
            let sum = |name: &str| -> i64 {
                col(name).map_or(0, |i| {
                    c.rows.rows.iter().filter_map(|r| r.get(i).and_then(Value::as_i64)).sum()
                })
            };
            [sum("ipv4_hosts"), sum("ipv4_open"), sum("ipv6_hosts"), sum("ipv6_open")]
        });
        let hidden: &[(String, u64, u64)] = counts.as_ref().map_or(&[], |c| c.hidden.as_slice());
        let hidden_ports: u64 = hidden.iter().map(|r| r.1).sum();
        let exposed: u64 = hidden
            .iter()
            .filter(|r| r.0 == "open" || r.0 == "restricted")
            .map(|r| r.1)
            .sum();
        let body = html! {
            dl class="stats" {
                div { dt { "Hosts" } dd { a href="/hosts" { (o.hosts) } } }
                div { dt { "Stale hosts" } dd { a href="/stale" { (o.stale) } } }
                div { dt { "Live listeners" } dd { (o.listeners) } }
                @if let Some([v4_any, v4_open, v6_any, v6_open]) = effective {
                    div {
                        dt { "Hidden IPv4 exposures" }
                        dd { a href="/exposure" { (hidden_ports) } }
                    }
                    div {
                        dt { "…that the firewall lets in (open or restricted)" }
                        dd { (exposed) }
                    }
                    div {
                        dt { "Open to the world through the firewall, IPv4" }
                        dd { a href="/ports?sort=ipv4_open" { (v4_open) } " of " (v4_any) }
                    }
                    div {
                        dt { "Open to the world through the firewall, IPv6" }
                        dd { a href="/ports?sort=ipv6_open" { (v6_open) } " of " (v6_any) }
                    }
                }
            }
            @match &counts {
                Some(c) => p class="note" {
                    "Open to the world: (host, port) pairs that accept any address over that \
                     IP version, and of those, how many the host's own firewall leaves open. \
                     These counts and the hidden exposures were counted over whole tables at "
                    (timefmt::format(c.at)) " UTC, at most once a minute ("
                    a href="/ports" { "by port" } ")."
                },
                None => p class="note" {
                    "The hidden IPv4 exposures and the ports open to the world are being \
                     counted over every live listener (or the count failed: see the log); \
                     reload in a moment. The headline for one port needs no count: "
                    a href="/exposure" { "exposure by port" } "."
                },
            }
            p {
                "A hidden IPv4 exposure is a port that accepts IPv4 connections from off the \
                 host although netstat shows only IPv6 lines for it ("
                code { "tcp6 :::80" } ")."
            }
            @if counts.is_some() {
                h2 { "Hidden IPv4 exposures by firewall verdict" }
                @if hidden.is_empty() {
                    (none("No host exposes a port over IPv4 while netstat shows only IPv6 lines for it."))
                } @else {
                    table {
                        caption { "Ports reachable over IPv4 while shown as IPv6 only, by what the host's own firewall does to their IPv4 side" }
                        thead { tr { (th("Firewall (IPv4)")) (th("Ports")) (th("Hosts")) } }
                        tbody {
                            @for (v, ports, hosts) in hidden {
                                tr { td { (verdict(v, "")) } td class="num" { (ports) } td class="num" { (hosts) } }
                            }
                        }
                    }
                }
            }
            h2 { "Look up a port" }
            (port_form("/exposure", None, None))
        };
        Ok(ctx.finish(
            "Fleet overview",
            sql,
            Some(Answer::Page {
                title: "Fleet overview".into(),
                body,
            }),
        ))
    })
    .await
}

/// The port lookup form (GET, labelled inputs).
fn port_form(action: &str, port: Option<u16>, proto: Option<&str>) -> Markup {
    html! {
        form method="get" action=(action) class="filters" {
            label for="port" { "Port" }
            input id="port" name="port" type="number" min="1" max="65535"
                value=[port.map(|p| p.to_string())];
            (proto_select(proto))
            button type="submit" { "Show" }
        }
    }
}

/// The protocol filter of a form (labelled).
fn proto_select(proto: Option<&str>) -> Markup {
    html! {
        label for="proto" { "Protocol" }
        select id="proto" name="proto" {
            option value="" selected[proto.is_none()] { "tcp and udp" }
            option value="tcp" selected[proto == Some("tcp")] { "tcp" }
            option value="udp" selected[proto == Some("udp")] { "udp" }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Exposure by port: the headline

pub async fn exposure(State(s): State<Arc<UiState>>, RawQuery(q): RawQuery) -> Response {
    let allowed = ["port", "proto", "sort", "dir", "page", "per"];
    handle(&s, q, "/exposure".into(), "/exposure", &allowed, |mut ctx| async move {
        let p = &ctx.params;
        let port = p.port()?;
        let proto = p.proto()?;
        let (sort, sort_name) = p.sort(&ExposureSort::ALL)?;
        let default_dir = if sort == ExposureSort::Verdict { Dir::Desc } else { Dir::Asc };
        let dir = p.dir(default_dir)?;
        let paging = Paging::from(p)?;
        let want_sql = p.sql()?;
        ctx.view.pairs = vec![
            ("port", port.map(|p| p.to_string()).unwrap_or_default()),
            ("proto", proto.unwrap_or("").to_string()),
            ("sort", if sort == ExposureSort::Verdict { String::new() } else { sort_name.into() }),
            ("dir", if dir == default_dir { String::new() } else { dir.as_str().into() }),
        ];
        ctx.view.pairs.extend(paging.pairs());
        let what = match (port, proto) {
            (Some(p), Some(pr)) => format!("{pr} port {p}"),
            (Some(p), None) => format!("port {p}"),
            (None, Some(pr)) => format!("every {pr} port"),
            (None, None) => "a port".to_string(),
        };
        let title = match port {
            Some(p) => format!("Port {p}: reachable over IPv4, shown as IPv6 only"),
            None => "Reachable over IPv4, shown as IPv6 only".to_string(),
        };
        let order = Order { by: sort, descending: dir == Dir::Desc };
        let sql = exposure_sql(&ctx, port, proto, order, paging);
        if want_sql {
            return Ok(ctx.finish(&title, sql, None));
        }
        let ro = &ctx.state.ro;
        let report =
            query::exposure_sorted(ro, port, proto, order, Some(paging.per), paging.offset())
                .await?;
        let total = total(&report, paging.offset());
        let rows = &report.rows;
        // Container and unit of the page's trap sockets: one lookup for the page.
        let mut hosts: Vec<String> = Vec::new();
        let mut ports: Vec<u16> = Vec::new();
        for r in rows.named() {
            let host = r.text("host")?;
            if !hosts.contains(&host) {
                hosts.push(host);
            }
            let port = u16::try_from(r.int("port")?).unwrap_or(0);
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let owners = owners_by_port(&query::trap_owners(ro, &hosts, &ports).await?)?;
        let body = html! {
            p class="lede" {
                "Every host where IPv4 clients reach " (what) " although "
                code { "netstat -tlnp" } " and " code { "lsof -i" }
                " show only IPv6 lines for it (an IPv6 socket with "
                code { "IPV6_V6ONLY=0" } ", shown as " code { ":::PORT" }
                "), with what the host's own firewall does to that IPv4 side. Hosts the \
                 firewall leaves open or restricted come first."
            }
            (port_form("/exposure", port, proto))
            @if rows.rows.is_empty() && paging.page == 1 {
                (none(&format!(
                    "No host exposes {what} over IPv4 while netstat shows only IPv6 lines for it."
                )))
            } @else {
                p class="count" { strong { (total) } " host ports." }
                table {
                    caption {
                        "Hosts where IPv4 reaches " (what) " although netstat shows only IPv6, \
                         sorted by " (sort_name) " (" (dir.as_str()) "ending)"
                    }
                    thead {
                        tr {
                            th scope="col" { span class="sr-only" { "Trap" } }
                            (sort_th(&ctx.view, "Host", "host", sort_name, dir, Dir::Asc))
                            (th("Namespace"))
                            (th("Protocol"))
                            (sort_th(&ctx.view, "Port", "port", sort_name, dir, Dir::Asc))
                            (th("Shown as"))
                            (sort_th(&ctx.view, "Processes", "processes", sort_name, dir, Dir::Asc))
                            (th("Container / unit"))
                            (sort_th(&ctx.view, "Firewall (IPv4)", "verdict", sort_name, dir, Dir::Desc))
                            (th("Note"))
                        }
                    }
                    tbody {
                        @for r in rows.named() {
                            @let host = r.text("host")?;
                            @let netns = r.text("netns")?;
                            @let protocol = r.text("protocol")?;
                            @let port = r.int("port")?;
                            @let v = r.text("effective_ipv4")?;
                            tr class=[(v == "open" || v == "restricted").then_some("exposed")] {
                                td { (trap_mark()) }
                                td { a href=(host_href(&host)) { (text(&host)) } }
                                td { (text(&netns)) }
                                td { (text(&protocol)) }
                                td class="num" {
                                    a href=(href("/exposure", &[("port", port.to_string()), ("proto", protocol.clone())])) { (port) }
                                }
                                td { code { (text(&r.text("shown_as")?)) } }
                                td { (text(&r.text("processes")?)) }
                                td {
                                    (text(&owners
                                        .get(&(host.clone(), netns.clone(), protocol.clone(), port))
                                        .filter(|o| !o.is_empty())
                                        .map(|o| o.join(", "))
                                        .unwrap_or_else(|| "-".into())))
                                }
                                td { (verdict(&v, &r.text("conditions")?)) }
                                td { (text(&r.text("note")?)) }
                            }
                        }
                    }
                }
                (h::pager(&ctx.view, paging, rows.rows.len(), total))
                (trap_legend())
            }
        };
        Ok(ctx.finish(&title, sql, Some(Answer::Page { title: title.clone(), body })))
    })
    .await
}

/// `(host, netns, protocol, port)` → its trap sockets' containers and units, as the
/// agent's table names them (`docker:0123456789ab`, `pod:UID`, `nginx.service`).
type Owners = BTreeMap<(String, String, String, i64), Vec<String>>;

fn owners_by_port(rs: &ResultSet) -> Result<Owners, PageError> {
    let mut out: Owners = BTreeMap::new();
    for r in rs.named() {
        let key = (
            r.text("host")?,
            r.text("netns")?,
            r.text("protocol")?,
            r.int("port")?,
        );
        let owner = owner_cell(
            r.str("container_runtime")?,
            r.str("container_id")?,
            r.str("pod_uid")?,
            r.str("unit")?,
        );
        let list = out.entry(key).or_default();
        if owner != "-" && !list.contains(&owner) {
            list.push(owner);
        }
    }
    Ok(out)
}

/// The agent's UNIT/CONTAINER cell.
fn owner_cell(runtime: &str, id: &str, pod: &str, unit: &str) -> String {
    if !id.is_empty() {
        let short: String = id.chars().take(12).collect();
        return format!("{runtime}:{short}");
    }
    if !runtime.is_empty() || !pod.is_empty() {
        return format!("pod:{}", if pod.is_empty() { "?" } else { pod });
    }
    if !unit.is_empty() {
        return unit.to_string();
    }
    "-".to_string()
}

fn exposure_sql(
    ctx: &Ctx<'_>,
    port: Option<u16>,
    proto: Option<&str>,
    order: Order<ExposureSort>,
    paging: Paging,
) -> Vec<Sql> {
    let mut filters = Vec::new();
    if let Some(p) = port {
        filters.push(format!("port = {p}"));
    }
    if let Some(p) = proto {
        filters.push(format!("protocol = {}", ctx.lit(p)));
    }
    let order_sql = query::exposure_order_sql(ctx.dialect(), order);
    let where_ = if filters.is_empty() {
        String::new()
    } else {
        format!("\nWHERE {}", filters.join(" AND "))
    };
    let mut report = "exposure --db {db}".to_string();
    if let Some(p) = port {
        report.push_str(&format!(" --port {p}"));
    }
    if let Some(p) = proto {
        report.push_str(&format!(" --proto {p}"));
    }
    let trap_where = match port {
        Some(p) => format!("trap AND port = {p}"),
        None => "trap AND hidden_ipv4_exposure".to_string(),
    };
    vec![
        Sql {
            caption: "The headline rows".into(),
            sql: format!(
                "SELECT host, netns, protocol, port, shown_as, processes,\n       effective_ipv4, effective_conditions_ipv4\nFROM hidden_ipv4_exposure{where_}\n{order_sql}\nLIMIT {} OFFSET {}",
                paging.per,
                paging.offset()
            ),
            report: Some(ctx.report(&report)),
        },
        Sql {
            caption: "Container and unit of their trap sockets".into(),
            sql: format!(
                "SELECT DISTINCT host, netns, protocol, port, container_runtime, container_id, pod_uid, unit\nFROM current_listeners\nWHERE {trap_where}"
            ),
            report: None,
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Ports

/// The columns of the ports table that sort, with their URL names.
const PORT_SORTS: [(&str, &str); 6] = [
    ("ipv4_hosts", "ipv4_hosts"),
    ("port", "port"),
    ("ipv4_open", "ipv4_open"),
    ("ipv6_hosts", "ipv6_hosts"),
    ("ipv6_open", "ipv6_open"),
    ("hidden_hosts", "hidden_hosts"),
];

pub async fn ports(State(s): State<Arc<UiState>>, RawQuery(q): RawQuery) -> Response {
    let allowed = ["proto", "sort", "dir", "page", "per"];
    handle(&s, q, "/ports".into(), "/ports", &allowed, |mut ctx| async move {
        let p = &ctx.params;
        let proto = p.proto()?;
        let (sort, sort_name) = p.sort(&PORT_SORTS)?;
        let default_dir = if sort == "port" { Dir::Asc } else { Dir::Desc };
        let dir = p.dir(default_dir)?;
        let paging = Paging::from(p)?;
        let want_sql = p.sql()?;
        ctx.view.pairs = vec![
            ("proto", proto.unwrap_or("").to_string()),
            ("sort", if sort == PORT_SORTS[0].0 { String::new() } else { sort_name.into() }),
            ("dir", if dir == default_dir { String::new() } else { dir.as_str().into() }),
        ];
        ctx.view.pairs.extend(paging.pairs());
        let title = "Ports open to the world";
        let mut sql_text = query::PORTS_VIEW_SQL.to_string();
        if let Some(p) = proto {
            sql_text = sql_text.replace(
                "WHERE reach_ipv4",
                &format!("WHERE protocol = {} AND (reach_ipv4", ctx.lit(p)),
            );
            sql_text = sql_text.replace(
                "OR hidden_ipv4_exposure\n",
                "OR hidden_ipv4_exposure)\n",
            );
        }
        let order_sql = if sort == "port" {
            format!("port{}, protocol", if dir == Dir::Desc { " DESC" } else { "" })
        } else {
            format!(
                "{sort}{}, port, protocol",
                if dir == Dir::Desc { " DESC" } else { "" }
            )
        };
        let sql = vec![Sql {
            caption: "Hosts per port and IP version that accept any address".into(),
            sql: format!(
                "{sql_text}\nORDER BY {order_sql}\nLIMIT {} OFFSET {}",
                paging.per,
                paging.offset()
            ),
            report: None,
        }];
        if want_sql {
            return Ok(ctx.finish(title, sql, None));
        }
        let Some(counted) = ctx.state.ports(PORTS_WAIT).await? else {
            // A big fleet's first count outlasts a request: say so instead of a timeout.
            let body = html! {
                p class="note" {
                    "The ports table is being counted over every live listener (the first \
                     count after the web UI starts; at 5,000,000 listeners it takes about \
                     half a minute on SQLite). "
                    a href=(ctx.view.here()) { "Reload" } " in a moment. The headline for \
                     one port needs no count: "
                    a href="/exposure" { "exposure by port" } "."
                }
            };
            return Ok(ctx.finish(title, sql, Some(Answer::Page { title: title.into(), body })));
        };
        let (computed, all) = (counted.at, counted.rows);
        let col = |name: &str| all.columns.iter().position(|c| c == name).unwrap_or(0);
        let (c_port, c_proto, c_sort) = (col("port"), col("protocol"), col(sort));
        let num = |r: &[Value], i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
        let mut rows: Vec<&Vec<Value>> = all
            .rows
            .iter()
            .filter(|r| proto.is_none_or(|p| r.get(c_proto).and_then(Value::as_str) == Some(p)))
            .collect();
        rows.sort_by(|a, b| {
            let key = |r: &[Value]| (num(r, c_sort), num(r, c_port));
            let (ka, kb) = (key(a), key(b));
            let primary = if dir == Dir::Desc { kb.0.cmp(&ka.0) } else { ka.0.cmp(&kb.0) };
            primary
                .then(ka.1.cmp(&kb.1))
                .then_with(|| {
                    let p = |r: &[Value]| r.get(c_proto).and_then(Value::as_str).unwrap_or("").to_string();
                    p(a).cmp(&p(b))
                })
        });
        let total = rows.len() as u64;
        let page: Vec<&Vec<Value>> = rows
            .into_iter()
            .skip(paging.offset())
            .take(paging.per)
            .collect();
        let body = html! {
            p class="lede" {
                "Each port some host opens to the world: how many hosts accept any address \
                 on it over IPv4 and over IPv6, how many of those the host's firewall leaves \
                 open, and how many have it hidden from netstat (reachable over IPv4 although \
                 shown as IPv6 only)."
            }
            p class="note" {
                "Counted over every live listener at " (timefmt::format(computed))
                " UTC in " (format!("{:.1}", counted.took.as_secs_f64())) " s; recounted \
                 while someone looks, at most once a minute and at most every ten times \
                 as long as a count takes."
            }
            form method="get" action="/ports" class="filters" {
                (proto_select(proto))
                button type="submit" { "Show" }
            }
            @if page.is_empty() && paging.page == 1 {
                (none("No host opens a port to the world."))
            } @else {
                table {
                    caption { "Ports by hosts open to the world, sorted by " (sort_name) " (" (dir.as_str()) "ending)" }
                    thead {
                        tr {
                            (sort_th(&ctx.view, "Port", "port", sort_name, dir, Dir::Asc))
                            (th("Protocol"))
                            (sort_th(&ctx.view, "Hosts, IPv4 any", "ipv4_hosts", sort_name, dir, Dir::Desc))
                            (sort_th(&ctx.view, "…firewall open", "ipv4_open", sort_name, dir, Dir::Desc))
                            (sort_th(&ctx.view, "Hosts, IPv6 any", "ipv6_hosts", sort_name, dir, Dir::Desc))
                            (sort_th(&ctx.view, "…firewall open", "ipv6_open", sort_name, dir, Dir::Desc))
                            (sort_th(&ctx.view, "Hidden IPv4 (shown as IPv6)", "hidden_hosts", sort_name, dir, Dir::Desc))
                        }
                    }
                    tbody {
                        @for r in &page {
                            @let port = num(r, c_port);
                            @let protocol = r.get(c_proto).and_then(Value::as_str).unwrap_or("");
                            tr {
                                td class="num" { (port) }
                                td { (protocol) }
                                td class="num" { (num(r, col("ipv4_hosts"))) }
                                td class="num" { (num(r, col("ipv4_open"))) }
                                td class="num" { (num(r, col("ipv6_hosts"))) }
                                td class="num" { (num(r, col("ipv6_open"))) }
                                td class="num" {
                                    @let hidden = num(r, col("hidden_hosts"));
                                    @if hidden > 0 {
                                        a href=(href("/exposure", &[("port", port.to_string()), ("proto", protocol.to_string())])) { (hidden) }
                                    } @else { "0" }
                                }
                            }
                        }
                    }
                }
                (h::pager(&ctx.view, paging, page.len(), total))
            }
        };
        Ok(ctx.finish(title, sql, Some(Answer::Page { title: title.into(), body })))
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Hosts and stale hosts

pub async fn hosts(State(s): State<Arc<UiState>>, RawQuery(q): RawQuery) -> Response {
    hosts_page(&s, q, false).await
}

pub async fn stale(State(s): State<Arc<UiState>>, RawQuery(q): RawQuery) -> Response {
    hosts_page(&s, q, true).await
}

async fn hosts_page(s: &UiState, q: Option<String>, stale_only: bool) -> Response {
    let (path, current) = if stale_only {
        ("/stale", "/stale")
    } else {
        ("/hosts", "/hosts")
    };
    let allowed = ["sort", "dir", "page", "per"];
    handle(s, q, path.into(), current, &allowed, |mut ctx| async move {
        let p = &ctx.params;
        let (sort, sort_name) = p.sort(&HostsSort::ALL)?;
        let default_dir = if sort == HostsSort::Listeners { Dir::Desc } else { Dir::Asc };
        let dir = p.dir(default_dir)?;
        let paging = Paging::from(p)?;
        let want_sql = p.sql()?;
        ctx.view.pairs = vec![
            ("sort", if sort == HostsSort::LastSeen { String::new() } else { sort_name.into() }),
            ("dir", if dir == default_dir { String::new() } else { dir.as_str().into() }),
        ];
        ctx.view.pairs.extend(paging.pairs());
        let title = if stale_only { "Stale hosts" } else { "Hosts" };
        let order = Order { by: sort, descending: dir == Dir::Desc };
        let order_sql = query::hosts_order_sql(ctx.dialect(), order);
        let sql = vec![Sql {
            caption: if stale_only {
                "Hosts not heard from for longer than the collector's stale_after".into()
            } else {
                "Every host, silent longest first".into()
            },
            sql: format!(
                "SELECT host, os_hostname, agent_version, first_seen, last_seen, stale, listeners,\n       coalesce(watch_mode, 'unknown') AS watch, collector\nFROM hosts{}\n{order_sql}\nLIMIT {} OFFSET {}",
                if stale_only { "\nWHERE stale" } else { "" },
                paging.per,
                paging.offset()
            ),
            report: Some(ctx.report("hosts --db {db}")),
        }];
        if want_sql {
            return Ok(ctx.finish(title, sql, None));
        }
        let report = query::hosts_sorted(
            &ctx.state.ro,
            stale_only,
            order,
            Some(paging.per),
            paging.offset(),
        )
        .await?;
        let total = total(&report, paging.offset());
        let rows = &report.rows;
        let body = html! {
            p class="lede" {
                @if stale_only {
                    "Hosts whose agent has not been heard from for longer than the \
                     collector's stale_after (default 5 minutes): what they reported last is \
                     still their current state here. Silent longest first."
                } @else {
                    "Every host that ever reported, silent longest first (stale ones first)."
                }
            }
            @if rows.rows.is_empty() && paging.page == 1 {
                (none(if stale_only { "No host is stale." } else { "No host has reported yet." }))
            } @else {
                table {
                    caption { (title) ", sorted by " (sort_name) " (" (dir.as_str()) "ending)" }
                    thead {
                        tr {
                            (sort_th(&ctx.view, "Host", "host", sort_name, dir, Dir::Asc))
                            (th("OS host name"))
                            (th("Agent"))
                            (sort_th(&ctx.view, "Last seen (UTC)", "last_seen", sort_name, dir, Dir::Asc))
                            (th("Stale"))
                            (sort_th(&ctx.view, "Listeners", "listeners", sort_name, dir, Dir::Desc))
                            (th("Watch"))
                            (th("Collector"))
                        }
                    }
                    tbody {
                        @for r in rows.named() {
                            @let host = r.text("host")?;
                            @let is_stale = r.boolean("stale")?;
                            tr class=[is_stale.then_some("stale")] {
                                td { a href=(host_href(&host)) { (text(&host)) } }
                                td { (text(&r.text("os_hostname")?)) }
                                td { (text(&r.text("agent_version")?)) }
                                td { (text(&r.text("last_seen")?)) }
                                td { (if is_stale { "stale" } else { "no" }) }
                                td class="num" { (r.int("listeners")?) }
                                td { (text(&r.text("watch")?)) }
                                td { (text(&r.text("collector")?)) }
                            }
                        }
                    }
                }
                (h::pager(&ctx.view, paging, rows.rows.len(), total))
            }
        };
        Ok(ctx.finish(title, sql, Some(Answer::Page { title: title.into(), body })))
    })
    .await
}

// ---------------------------------------------------------------------------------------
// One host

pub async fn host(
    State(s): State<Arc<UiState>>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let path = host_href(&name);
    let allowed = ["sort", "dir", "page", "per", "since"];
    handle(&s, q, path, "/hosts", &allowed, |mut ctx| async move {
        let Some(host) = crate::tls::canonical_host_name(&name) else {
            return Err(PageError::NotFound(format!(
                "No host is called {:?}: host names are letters, digits, '-', '_' and '.'.",
                text(&name)
            )));
        };
        let p = &ctx.params;
        let (sort, sort_name) = p.sort(&ListenerSort::ALL)?;
        let default_dir = if sort == ListenerSort::Firewall { Dir::Desc } else { Dir::Asc };
        let dir = p.dir(default_dir)?;
        let paging = Paging::from(p)?;
        let now = OffsetDateTime::now_utc();
        let (since, since_text) = p.time("since", "7d", now)?;
        window(since, now, &since_text)?;
        let want_sql = p.sql()?;
        ctx.view.pairs = vec![
            ("sort", if sort == ListenerSort::Port { String::new() } else { sort_name.into() }),
            ("dir", if dir == default_dir { String::new() } else { dir.as_str().into() }),
            ("since", if since_text == "7d" { String::new() } else { since_text.clone() }),
        ];
        ctx.view.pairs.extend(paging.pairs());
        let title = format!("Host {}", text(&host));
        let d = if dir == Dir::Desc { " DESC" } else { "" };
        let order_sql = match sort {
            ListenerSort::Port => format!("port{d}, protocol, netns"),
            ListenerSort::Netns => format!("netns{d}, protocol, port"),
            ListenerSort::Firewall => format!(
                "max({}, {}){d}, netns, protocol, port",
                rank_sql("effective_ipv4"),
                rank_sql("effective_ipv6")
            ),
            ListenerSort::Processes => format!("processes{d}, netns, protocol, port"),
        };
        let host_lit = ctx.lit(&host);
        let sql = vec![
            Sql {
                caption: "The host".into(),
                sql: format!("SELECT * FROM hosts WHERE host = {host_lit}"),
                report: None,
            },
            Sql {
                caption: "Its listeners, as the agent's scan table shows them".into(),
                sql: format!(
                    "SELECT trap, netstat_proto, shown_as, reach_ipv4, reach_ipv6, v6only,\n       effective_ipv4, effective_ipv6, netns, processes, container_id, unit\nFROM current_listeners\nWHERE host = {host_lit}\nORDER BY {}\nLIMIT {} OFFSET {}",
                    if ctx.dialect() == Dialect::Postgres && sort == ListenerSort::Firewall {
                        order_sql.replace("max(", "greatest(")
                    } else {
                        order_sql.clone()
                    },
                    paging.per,
                    paging.offset()
                ),
                report: None,
            },
            Sql {
                caption: format!("Its changes since {}", timefmt::format(since)),
                sql: format!(
                    "SELECT at, change, netns, protocol, port, shown_as, processes,\n       effective_ipv4, effective_ipv6\nFROM listener_changes\nWHERE host = {host_lit} AND at > {}\nORDER BY at DESC",
                    ctx.time_lit(since)
                ),
                report: Some(ctx.report(&format!(
                    "diff --db {{db}} --host {} --since {}",
                    shell(&host),
                    shell(&since_text)
                ))),
            },
        ];
        if want_sql {
            return Ok(ctx.finish(&title, sql, None));
        }
        let ro = &ctx.state.ro;
        let info = query::host(ro, &host).await?;
        let Some(info_row) = info.named().next() else {
            return Err(PageError::NotFound(format!(
                "The collector has never heard of a host called {host}."
            )));
        };
        let listener_count = info_row.int("listeners")?.max(0) as u64;
        let order = Order { by: sort, descending: dir == Dir::Desc };
        let listeners = query::listeners(ro, &host, order, paging.per, paging.offset()).await?;
        let history =
            history::diff_window(ro, Some(&host), None, since, now, None, MAX_EVENTS).await?;
        const HISTORY_ROWS: usize = 50;
        let mut events: Vec<_> = history
            .rows
            .named()
            .filter(|r| r.str("change").is_ok_and(|c| c != "exposure"))
            .collect();
        let all_events = events.len();
        events.reverse();
        events.truncate(HISTORY_ROWS);
        let body = html! {
            h2 { "Agent" }
            dl class="facts" {
                div { dt { "OS host name" } dd { (text(&info_row.text("os_hostname")?)) } }
                div { dt { "Agent version" } dd { (text(&info_row.text("agent_version")?)) } }
                div { dt { "First seen (UTC)" } dd { (text(&info_row.text("first_seen")?)) } }
                div {
                    dt { "Last seen (UTC)" }
                    dd {
                        (text(&info_row.text("last_seen")?))
                        @if info_row.boolean("stale")? { " " strong class="stale-mark" { "(stale)" } }
                    }
                }
                div {
                    dt { "Watch" }
                    dd {
                        (text(&info_row.text("watch")?))
                        @let reason = info_row.text("watch_reason")?;
                        @if !reason.is_empty() { " (" (text(&reason)) ")" }
                    }
                }
                div { dt { "Collector" } dd { (text(&info_row.text("collector")?)) } }
                div { dt { "Live listeners" } dd { (listener_count) } }
            }
            p {
                a href=(href("/changes", &[("host", host.clone())])) { "Changes of this host" }
            }
            h2 { "Listeners" }
            @if listeners.rows.is_empty() && paging.page == 1 {
                (none("No live listener."))
            } @else {
                table class="scan" {
                    caption {
                        "Listeners of " (text(&host)) " as " code { "listenscope-agent scan" }
                        " shows them, sorted by " (sort_name) " (" (dir.as_str()) "ending)"
                    }
                    thead {
                        tr {
                            th scope="col" { span class="sr-only" { "Trap" } }
                            (th("Proto"))
                            (sort_th(&ctx.view, "Shown as", "port", sort_name, dir, Dir::Asc))
                            (th("Really accepts"))
                            (th("V6only"))
                            (sort_th(&ctx.view, "Firewall", "firewall", sort_name, dir, Dir::Desc))
                            (sort_th(&ctx.view, "Netns", "netns", sort_name, dir, Dir::Asc))
                            (sort_th(&ctx.view, "Process", "processes", sort_name, dir, Dir::Asc))
                            (th("Unit / container"))
                        }
                    }
                    tbody {
                        @for r in listeners.named() {
                            @let trap = r.boolean("trap")?;
                            tr {
                                td { @if trap { (trap_mark()) } }
                                td { (text(&r.text("netstat_proto")?)) }
                                td { code { (text(&r.text("shown_as")?)) } }
                                td { (text(&really_accepts(&r)?)) }
                                td { (v6only_cell(&r)?) }
                                td { (firewall_cell(&r)?) }
                                td { (text(&r.text("netns")?)) }
                                td { (text(&process_cell(&r)?)) }
                                td {
                                    (text(&owner_cell(
                                        r.str("container_runtime")?,
                                        r.str("container_id")?,
                                        r.str("pod_uid")?,
                                        r.str("unit")?,
                                    )))
                                }
                            }
                        }
                    }
                }
                (h::pager(&ctx.view, paging, listeners.rows.len(), listener_count))
                (trap_legend())
            }
            h2 { "History since " (timefmt::format(since)) " UTC" }
            @if events.is_empty() {
                (none("No listener opened, changed or closed in this window."))
            } @else {
                table {
                    caption {
                        "Latest " (events.len()) " of " (all_events)
                        " listener changes of " (text(&host)) ", newest first"
                    }
                    thead { tr { (th("At (UTC)")) (th("Change")) (th("Netns")) (th("Protocol")) (th("Port")) (th("Shown as")) (th("What")) } }
                    tbody {
                        @for r in &events {
                            tr {
                                td { (text(&r.text("at")?)) }
                                td { (text(&r.text("change")?)) }
                                td { (text(&r.text("netns")?)) }
                                td { (text(&r.text("protocol")?)) }
                                td class="num" { (r.int("port")?) }
                                td { code { (text(&r.text("shown_as")?)) } }
                                td { (text(&r.text("detail")?)) }
                            }
                        }
                    }
                }
                @if all_events > events.len() {
                    p { a href=(href("/changes", &[("host", host.clone()), ("since", since_text.clone())])) { "All " (all_events) " changes" } }
                }
            }
        };
        Ok(ctx.finish(&title, sql, Some(Answer::Page { title: title.clone(), body })))
    })
    .await
}

/// The agent's REALLY ACCEPTS cell, from the stored reach.
fn really_accepts(r: &query::Named<'_>) -> Result<String, PageError> {
    let address = r.text("address")?;
    let plain = address
        .strip_prefix("::ffff:")
        .filter(|a| a.contains('.'))
        .unwrap_or(&address);
    if r.boolean("latent")? {
        return Ok(format!("nothing yet: {plain} is not a local address"));
    }
    let wildcard = matches!(address.as_str(), "::" | "0.0.0.0" | "::ffff:0.0.0.0");
    let mut parts = Vec::new();
    match r.str("reach_ipv4")? {
        "any" => parts.push("all IPv4".to_string()),
        "loopback" if wildcard => parts.push("IPv4 loopback".to_string()),
        "loopback" | "specific" => parts.push(format!("IPv4 {plain}")),
        "unknown" => parts.push("IPv4 unknown (kernel sent no v6only)".to_string()),
        _ => {}
    }
    match r.str("reach_ipv6")? {
        "any" => parts.push("all IPv6".to_string()),
        "loopback" if wildcard => parts.push("IPv6 loopback".to_string()),
        "loopback" | "specific" => parts.push(format!("IPv6 {address}")),
        "unknown" => parts.push("IPv6 unknown".to_string()),
        _ => {}
    }
    let mut s = if parts.is_empty() {
        "nothing".to_string()
    } else {
        parts.join(" + ")
    };
    let interface = r.text("interface")?;
    if !interface.is_empty() {
        s.push_str(&format!(" (only via {interface})"));
    }
    Ok(s)
}

/// The agent's V6ONLY cell.
fn v6only_cell(r: &query::Named<'_>) -> Result<&'static str, PageError> {
    if r.str("family")? == "ipv4" {
        return Ok("-");
    }
    Ok(match r.value("v6only")? {
        Value::Null => "?",
        _ if r.boolean("v6only")? => "yes",
        _ => "no",
    })
}

/// The agent's FIREWALL cell: the verdict per IP version the socket accepts from off
/// the host, each with its first condition.
fn firewall_cell(r: &query::Named<'_>) -> Result<Markup, PageError> {
    let side = |v: &str, c: &str| -> Markup {
        let mut conds = c.split(" | ").filter(|c| !c.is_empty());
        let first = conds.next();
        let shown = match (first, conds.next()) {
            (Some(f), Some(_)) => format!("{f}, …"),
            (Some(f), None) => f.to_string(),
            (None, _) => String::new(),
        };
        verdict(v, &shown)
    };
    let (v4, v6) = (r.text("effective_ipv4")?, r.text("effective_ipv6")?);
    let (c4, c6) = (
        r.text("effective_conditions_ipv4")?,
        r.text("effective_conditions_ipv6")?,
    );
    Ok(match (v4 == "n/a", v6 == "n/a") {
        (true, true) => html! { "-" },
        (false, true) => html! { "v4 " (side(&v4, &c4)) },
        (true, false) => html! { "v6 " (side(&v6, &c6)) },
        (false, false) if v4 == v6 && c4 == c6 => side(&v4, &c4),
        (false, false) => html! { "v4 " (side(&v4, &c4)) ", v6 " (side(&v6, &c6)) },
    })
}

/// The agent's PROCESS cell (`nginx[811,812,+3] php-fpm[900]`) from the stored owners.
fn process_cell(r: &query::Named<'_>) -> Result<String, PageError> {
    let details = r.value("process_details")?;
    let details = match details {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::Null),
        v => v,
    };
    let owners: Vec<(String, i64)> = details
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let comm = p.get("comm").and_then(Value::as_str).unwrap_or("?");
            (
                comm.to_string(),
                p.get("pid").and_then(Value::as_i64).unwrap_or(0),
            )
        })
        .collect();
    match listenscope_core::domain::process_summary(owners.iter().map(|(c, p)| (c.as_str(), *p))) {
        Some(cell) => Ok(cell),
        None => {
            let names = r.text("processes")?;
            Ok(if names.is_empty() { "-".into() } else { names })
        }
    }
}

/// A window must start before now and span at most [`MAX_WINDOW`].
fn window(since: OffsetDateTime, until: OffsetDateTime, text: &str) -> Result<(), BadParam> {
    if since >= until {
        return Err(Params::bad(
            "since",
            text,
            format!("a time before {} (until)", timefmt::format(until)),
        ));
    }
    if until - since > MAX_WINDOW {
        return Err(Params::bad(
            "since",
            text,
            "a time at most 31 days before until (e.g. 24h, 7d, 31d)",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Changes

pub async fn changes(State(s): State<Arc<UiState>>, RawQuery(q): RawQuery) -> Response {
    let allowed = ["host", "port", "since", "until", "dir", "page", "per"];
    handle(&s, q, "/changes".into(), "/changes", &allowed, |mut ctx| async move {
        let p = &ctx.params;
        let host = p.host()?;
        let port = p.port()?;
        let now = OffsetDateTime::now_utc();
        let (until, until_text) = p.time("until", "now", now)?;
        let (since, since_text) = p.time("since", "24h", now)?;
        window(since, until, &since_text)?;
        let dir = p.dir(Dir::Desc)?;
        let paging = Paging::from(p)?;
        let want_sql = p.sql()?;
        ctx.view.pairs = vec![
            ("host", host.clone().unwrap_or_default()),
            ("port", port.map(|p| p.to_string()).unwrap_or_default()),
            ("since", if since_text == "24h" { String::new() } else { since_text.clone() }),
            ("until", if until_text == "now" { String::new() } else { until_text.clone() }),
            ("dir", if dir == Dir::Desc { String::new() } else { "asc".into() }),
        ];
        ctx.view.pairs.extend(paging.pairs());
        let who = match (&host, port) {
            (Some(h), Some(p)) => format!("port {p} of {h}"),
            (Some(h), None) => h.clone(),
            (None, Some(p)) => format!("port {p} across the fleet"),
            (None, None) => "the fleet".into(),
        };
        let title = "Changes";
        let sql = changes_sql(&ctx, host.as_deref(), port, since, until, &since_text, &until_text, dir, paging);
        if want_sql {
            return Ok(ctx.finish(title, sql, None));
        }
        let report =
            history::diff_window(&ctx.state.ro, host.as_deref(), port, since, until, None, MAX_EVENTS)
                .await?;
        let rs = &report.rows;
        let (mut events, exposures): (Vec<_>, Vec<_>) =
            rs.named().partition(|r| r.str("change").is_ok_and(|c| c != "exposure"));
        let hours = timeline(since, until, &events)?;
        let mut new_exposures: Vec<_> = exposures
            .into_iter()
            .filter(|r| became_reachable(r))
            .collect();
        let all_new = new_exposures.len();
        new_exposures.truncate(NEW_EXPOSURE_ROWS);
        let total = events.len() as u64;
        if dir == Dir::Desc {
            events.reverse();
        }
        let page: Vec<_> = events.iter().skip(paging.offset()).take(paging.per).collect();
        let busiest = hours.iter().map(Hour::total).max().unwrap_or(0);
        let description = format!(
            "{total} listener changes of {who} between {} and {} UTC, per hour; the busiest hour had {busiest}.",
            timefmt::format(since),
            timefmt::format(until)
        );
        let body = html! {
            p class="lede" {
                "Listeners opened, changed and closed on " (text(&who)) " between "
                (timefmt::format(since)) " and " (timefmt::format(until)) " UTC, at the time \
                 each agent observed them."
            }
            form method="get" action="/changes" class="filters" {
                label for="host" { "Host" }
                input id="host" name="host" type="text" value=[host.as_deref()];
                label for="port" { "Port" }
                input id="port" name="port" type="number" min="1" max="65535" value=[port.map(|p| p.to_string())];
                label for="since" { "Since" }
                input id="since" name="since" type="text" value=(since_text);
                label for="until" { "Until" }
                input id="until" name="until" type="text" value=(until_text);
                button type="submit" { "Show" }
            }
            p class="note" { "Times: 24h, 7d, 2026-11-27 09:00:00 (UTC) or RFC 3339; windows up to 31 days." }
            h2 { "Per hour" }
            (chart::timeline(&hours, &format!("Listener changes per hour, {who}"), &description))
            p class="legend" {
                span class="key key-opened" {} " opened "
                span class="key key-changed" {} " changed "
                span class="key key-closed" {} " closed"
            }
            details {
                summary { "The same counts as a table" }
                table {
                    caption { "Listener changes per hour (hours with changes)" }
                    thead { tr { (th("Hour (UTC)")) (th("Opened")) (th("Changed")) (th("Closed")) } }
                    tbody {
                        @for hr in hours.iter().filter(|h| h.total() > 0) {
                            tr {
                                td { (hr.start) }
                                td class="num" { (hr.opened) }
                                td class="num" { (hr.changed) }
                                td class="num" { (hr.closed) }
                            }
                        }
                    }
                }
            }
            h2 { "New IPv4 exposures since " (timefmt::format(since)) " UTC" }
            @if new_exposures.is_empty() {
                (none("No port became reachable over IPv4 in this window."))
            } @else {
                table {
                    caption { "Ports that became reachable over IPv4 in the window (marked: netstat shows them as IPv6 only)" }
                    thead { tr {
                        th scope="col" { span class="sr-only" { "Trap" } }
                        (th("At (UTC)")) (th("Host")) (th("Netns")) (th("Protocol")) (th("Port")) (th("Shown as")) (th("Processes")) (th("What changed"))
                    } }
                    tbody {
                        @for r in &new_exposures {
                            @let host = r.text("host")?;
                            tr {
                                td { @if r.value("hidden_after")? == Value::Bool(true) { (trap_mark()) } }
                                td { (text(&r.text("at")?)) }
                                td { a href=(host_href(&host)) { (text(&host)) } }
                                td { (text(&r.text("netns")?)) }
                                td { (text(&r.text("protocol")?)) }
                                td class="num" { (r.int("port")?) }
                                td { code { (text(&r.text("shown_as")?)) } }
                                td { (text(&r.text("processes")?)) }
                                td { (text(&r.text("detail")?)) }
                            }
                        }
                    }
                }
                @if all_new > new_exposures.len() {
                    p class="note" {
                        "The first " (new_exposures.len()) " of " (all_new)
                        "; narrow the window, or filter by host or port."
                    }
                }
                (trap_legend())
            }
            h2 { "Events" }
            @if page.is_empty() && paging.page == 1 {
                (none("No listener opened, changed or closed in this window."))
            } @else {
                table {
                    caption { "Listener changes, " (if dir == Dir::Desc { "newest" } else { "oldest" }) " first" }
                    thead {
                        tr {
                            (sort_th(&ctx.view, "At (UTC)", "at", "at", dir, Dir::Desc))
                            (th("Host")) (th("Change")) (th("Netns")) (th("Protocol")) (th("Port")) (th("Shown as")) (th("What"))
                        }
                    }
                    tbody {
                        @for r in &page {
                            @let host = r.text("host")?;
                            tr {
                                td { (text(&r.text("at")?)) }
                                td { a href=(host_href(&host)) { (text(&host)) } }
                                td { (text(&r.text("change")?)) }
                                td { (text(&r.text("netns")?)) }
                                td { (text(&r.text("protocol")?)) }
                                td class="num" { (r.int("port")?) }
                                td { code { (text(&r.text("shown_as")?)) } }
                                td { (text(&r.text("detail")?)) }
                            }
                        }
                    }
                }
                (h::pager(&ctx.view, paging, page.len(), total))
            }
        };
        Ok(ctx.finish(title, sql, Some(Answer::Page { title: title.into(), body })))
    })
    .await
}

/// An `exposure` line of `diff` where the port became reachable over IPv4 from off the
/// host, or hidden from netstat.
fn became_reachable(r: &query::Named<'_>) -> bool {
    let reachable = |v: Value| matches!(v.as_str(), Some("any" | "specific"));
    let before = r.value("reach_ipv4_before").unwrap_or(Value::Null);
    let after = r.value("reach_ipv4_after").unwrap_or(Value::Null);
    let hidden_before = r.value("hidden_before").unwrap_or(Value::Null) == Value::Bool(true);
    let hidden_after = r.value("hidden_after").unwrap_or(Value::Null) == Value::Bool(true);
    (reachable(after) && !reachable(before)) || (hidden_after && !hidden_before)
}

/// Every hour from `since` to `until` with its events counted (the `at` of each event,
/// `YYYY-MM-DD HH:…`, bucketed by its first 13 characters).
fn timeline(
    since: OffsetDateTime,
    until: OffsetDateTime,
    events: &[query::Named<'_>],
) -> Result<Vec<Hour>, PageError> {
    let hour_of = |t: OffsetDateTime| {
        let s = timefmt::format(t);
        format!("{}:00", s.get(..13).unwrap_or(&s))
    };
    let mut hours = Vec::new();
    let mut index = BTreeMap::new();
    let mut t = since
        .replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap_or(since);
    while t <= until && hours.len() < 24 * 32 {
        let start = hour_of(t);
        index.insert(start.get(..13).unwrap_or("").to_string(), hours.len());
        hours.push(Hour {
            start,
            ..Hour::default()
        });
        t += time::Duration::hours(1);
    }
    for e in events {
        let at = e.text("at")?;
        let Some(&i) = at.get(..13).and_then(|k| index.get(k)) else {
            continue;
        };
        let hr = &mut hours[i];
        match e.str("change")? {
            "opened" => hr.opened += 1,
            "changed" => hr.changed += 1,
            "closed" => hr.closed += 1,
            _ => {}
        }
    }
    Ok(hours)
}

#[allow(clippy::too_many_arguments)]
fn changes_sql(
    ctx: &Ctx<'_>,
    host: Option<&str>,
    port: Option<u16>,
    since: OffsetDateTime,
    until: OffsetDateTime,
    since_text: &str,
    until_text: &str,
    dir: Dir,
    paging: Paging,
) -> Vec<Sql> {
    let mut filters = vec![
        format!("at > {}", ctx.time_lit(since)),
        format!("at <= {}", ctx.time_lit(until)),
    ];
    if let Some(h) = host {
        filters.push(format!("host = {}", ctx.lit(h)));
    }
    if let Some(p) = port {
        filters.push(format!("port = {p}"));
    }
    let where_ = filters.join(" AND ");
    let hour = match ctx.dialect() {
        Dialect::Sqlite => "strftime('%Y-%m-%d %H:00', at)",
        Dialect::Postgres => {
            "to_char(date_trunc('hour', at AT TIME ZONE 'UTC'), 'YYYY-MM-DD HH24:00')"
        }
    };
    let mut diff = format!(
        "diff --db {{db}} --since {} --until {}",
        shell(since_text),
        shell(until_text)
    );
    if let Some(h) = host {
        diff.push_str(&format!(" --host {}", shell(h)));
    }
    vec![
        Sql {
            caption: "Changes per hour".into(),
            sql: format!(
                "SELECT {hour} AS hour, change, count(*) AS events\nFROM listener_changes\nWHERE {where_}\nGROUP BY 1, 2\nORDER BY 1, 2"
            ),
            report: None,
        },
        Sql {
            caption: "Listener events that left a port reachable over IPv4 (the page lists the \
                      ports whose IPv4 reach or hidden state changed: diff's exposure lines)"
                .into(),
            sql: format!(
                "SELECT at, host, netns, protocol, port, shown_as, processes\nFROM listener_changes\nWHERE change IN ('opened', 'changed') AND reach_ipv4 IN ('any', 'specific')\n  AND {where_}\nORDER BY at"
            ),
            report: Some(ctx.report(&diff)),
        },
        Sql {
            caption: "The events".into(),
            sql: format!(
                "SELECT at, host, change, netns, protocol, port, shown_as, processes,\n       effective_ipv4, effective_ipv6\nFROM listener_changes\nWHERE {where_}\nORDER BY at{}\nLIMIT {} OFFSET {}",
                if dir == Dir::Desc { " DESC" } else { "" },
                paging.per,
                paging.offset()
            ),
            report: Some(ctx.report(&diff)),
        },
    ]
}
