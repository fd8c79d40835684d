//! Rendering an [`Inventory`] for people (a table) and for programs (JSON).
//!
//! The JSON schema is documented in `docs/scan-json.md`; keys are only ever added.
//! JSON is streamed to the writer (no whole-document string), so a 10k-listener host
//! costs no extra memory.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::net::IpAddr;

use comfy_table::{Table, presets};
use serde::Serialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;

use crate::firewall::Effective;
use crate::model::{Family, Listener, ProcessInfo, Reach, Source};
use crate::scan::{Inventory, count};

/// Mark in the first table column for trap rows.
pub const TRAP_MARK: &str = "!";

#[derive(Serialize)]
struct Doc<'a> {
    host: &'a str,
    scanned_at: String,
    agent_version: &'static str,
    namespaces: Vec<DocNetns<'a>>,
    warnings: &'a [String],
    /// The socket truth is incomplete (exit status 3).
    partial: bool,
}

#[derive(Serialize)]
struct DocNetns<'a> {
    inode: u64,
    name: &'a str,
    source: Option<Source>,
    /// Every listener of the namespace, whatever the output filters.
    listeners: usize,
    /// The ones the output filters let through.
    shown: usize,
    /// `null` when the namespace could not be read at all.
    firewall: Option<DocFirewall<'a>>,
    /// Whether its interfaces take IPv6 (`{"state", "reason"}`); `null` when not read.
    ipv6: Option<&'a crate::model::Ipv6Facts>,
}

#[derive(Serialize)]
struct DocFirewall<'a> {
    /// Readers whose tables were found: `nft`, `iptables-nft`, `iptables-legacy`; empty
    /// when the namespace has no ruleset.
    sources: &'a [&'static str],
    generation: Option<u32>,
    /// Why this namespace's verdicts are `unknown`, when they are.
    problem: Option<&'a str>,
}

/// Writes the inventory as one JSON document followed by a newline.
///
/// Listeners are written one by one into a reusable buffer that is flushed every 64 KiB,
/// so memory stays flat however many listeners there are.
pub fn write_json(inv: &Inventory, out: &mut dyn Write) -> io::Result<()> {
    let processes: HashMap<u32, Box<RawValue>> = inv
        .processes
        .iter()
        .map(|(pid, p)| Ok((*pid, listenscope_core::json::to_raw_value(p)?)))
        .collect::<Result<_, serde_json::Error>>()
        .map_err(io::Error::other)?;
    let head = Doc {
        host: &inv.host,
        scanned_at: inv
            .scanned_at
            .format(&Rfc3339)
            .map_err(|e| io::Error::other(e.to_string()))?,
        agent_version: env!("CARGO_PKG_VERSION"),
        namespaces: inv
            .namespaces
            .iter()
            .map(|n| DocNetns {
                inode: n.id.inode,
                name: &n.id.name,
                source: n.source,
                listeners: n.listeners,
                shown: n.shown,
                firewall: n.firewall.as_ref().map(|f| DocFirewall {
                    sources: &f.sources,
                    generation: f.generation,
                    problem: f.problem.as_deref(),
                }),
                ipv6: n.ipv6.as_ref(),
            })
            .collect(),
        warnings: &inv.warnings,
        partial: inv.partial,
    };
    let mut buf = listenscope_core::json::to_vec(&head).map_err(io::Error::other)?;
    buf.pop(); // the closing brace: the listeners array comes last
    buf.extend_from_slice(b",\"listeners\":[");
    for (i, l) in inv.listeners.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_listener(&mut buf, l, &processes);
        if buf.len() >= 64 * 1024 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    buf.extend_from_slice(b"]}\n");
    out.write_all(&buf)
}

/// Appends one listener object. Hand-written because it runs 10k times per scan on a busy
/// host: static keys are copied instead of escape-scanned and owners are pre-serialized,
/// which took the JSON step from 4.6 ms to about 2 ms (docs/BENCHMARKS.md). Dynamic strings
/// still go through serde_json's escaping. `output::tests::fast_writer_matches_schema`
/// holds it to the serde reference above.
fn write_listener(buf: &mut Vec<u8>, l: &Listener, processes: &HashMap<u32, Box<RawValue>>) {
    use std::io::Write as _;
    fn string(buf: &mut Vec<u8>, s: &str) {
        // Writing to a Vec cannot fail, and a str always serializes.
        #[allow(clippy::expect_used)]
        listenscope_core::json::to_writer(&mut *buf, s).expect("writing to a Vec cannot fail");
    }
    fn opt_string(buf: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => string(buf, s),
            None => buf.extend_from_slice(b"null"),
        }
    }
    fn opt_bool(buf: &mut Vec<u8>, b: Option<bool>) {
        buf.extend_from_slice(match b {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        });
    }
    fn boolean(buf: &mut Vec<u8>, b: bool) {
        buf.extend_from_slice(if b { b"true" } else { b"false" });
    }
    let s = &l.socket;
    buf.extend_from_slice(b"{\"protocol\":\"");
    buf.extend_from_slice(s.protocol.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"family\":\"");
    buf.extend_from_slice(s.family.as_str().as_bytes());
    let _ = write!(
        buf,
        "\",\"address\":\"{}\",\"port\":{},\"v6only\":",
        s.address, s.port
    );
    opt_bool(buf, s.v6only);
    buf.extend_from_slice(b",\"interface\":");
    opt_string(buf, l.interface.as_deref());
    let _ = write!(buf, ",\"netns\":{{\"inode\":{},\"name\":", l.netns.inode);
    string(buf, &l.netns.name);
    let _ = write!(
        buf,
        "}},\"inode\":{},\"uid\":{},\"processes\":[",
        s.inode, s.uid
    );
    let mut first = true;
    for raw in l.pids.iter().filter_map(|p| processes.get(p)) {
        if !first {
            buf.push(b',');
        }
        first = false;
        buf.extend_from_slice(raw.get().as_bytes());
    }
    buf.extend_from_slice(b"],\"container\":");
    match &l.container {
        // Writing to a Vec cannot fail, and a Container (strings only) always serializes.
        #[allow(clippy::expect_used)]
        Some(c) => {
            listenscope_core::json::to_writer(&mut *buf, c).expect("writing to a Vec cannot fail")
        }
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"unit\":");
    opt_string(buf, l.unit.as_deref());
    buf.extend_from_slice(b",\"cgroup\":");
    opt_string(buf, l.cgroup.as_deref());
    buf.extend_from_slice(b",\"reach_ipv4\":\"");
    buf.extend_from_slice(l.class.reach_ipv4.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"reach_ipv6\":\"");
    buf.extend_from_slice(l.class.reach_ipv6.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"latent\":");
    boolean(buf, l.class.latent);
    // shown_as is digits, hex, dots and colons only.
    buf.extend_from_slice(b",\"shown_as\":\"");
    buf.extend_from_slice(l.class.shown_as.as_bytes());
    buf.extend_from_slice(b"\",\"netstat_proto\":\"");
    buf.extend_from_slice(l.class.netstat_proto.as_bytes());
    buf.extend_from_slice(b"\",\"trap\":");
    boolean(buf, l.class.trap);
    buf.extend_from_slice(b",\"hidden_ipv4_exposure\":");
    boolean(buf, l.hidden_ipv4_exposure);
    buf.extend_from_slice(b",\"freebind\":");
    opt_bool(buf, s.freebind);
    buf.extend_from_slice(b",\"transparent\":");
    opt_bool(buf, s.transparent);
    buf.extend_from_slice(b",\"source\":\"");
    buf.extend_from_slice(l.source.as_str().as_bytes());
    let e = &l.effective;
    buf.extend_from_slice(b"\",\"effective_ipv4\":\"");
    buf.extend_from_slice(e.ipv4.verdict.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"effective_ipv6\":\"");
    buf.extend_from_slice(e.ipv6.verdict.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"effective_reason\":{\"ipv4\":");
    string(buf, &e.ipv4.reason);
    buf.extend_from_slice(b",\"ipv6\":");
    string(buf, &e.ipv6.reason);
    buf.extend_from_slice(b"},\"effective_conditions\":{\"ipv4\":");
    strings(buf, &e.ipv4.conditions);
    buf.extend_from_slice(b",\"ipv6\":");
    strings(buf, &e.ipv6.conditions);
    buf.extend_from_slice(b"},\"effective_diverted_to\":{\"ipv4\":");
    opt_string(buf, e.ipv4.diverted_to.as_deref());
    buf.extend_from_slice(b",\"ipv6\":");
    opt_string(buf, e.ipv6.diverted_to.as_deref());
    buf.extend_from_slice(b"}}");
}

fn strings(buf: &mut Vec<u8>, list: &[String]) {
    // Writing to a Vec cannot fail, and strings always serialize.
    #[allow(clippy::expect_used)]
    listenscope_core::json::to_writer(&mut *buf, list).expect("writing to a Vec cannot fail");
}

/// The firewall column: the verdict per IP version the socket accepts from off-host.
pub fn firewall_cell(l: &Listener) -> String {
    use crate::firewall::Effective::NotApplicable;
    let word = |a: &crate::firewall::Answer| match a.conditions.first() {
        Some(c) if a.conditions.len() == 1 => format!("{} ({c})", a.verdict.as_str()),
        Some(c) => format!("{} ({c}, …)", a.verdict.as_str()),
        None => a.verdict.as_str().to_owned(),
    };
    let (v4, v6) = (&l.effective.ipv4, &l.effective.ipv6);
    match (v4.verdict == NotApplicable, v6.verdict == NotApplicable) {
        (true, true) => "-".to_owned(),
        (false, true) => format!("v4 {}", word(v4)),
        (true, false) => format!("v6 {}", word(v6)),
        (false, false) if v4 == v6 => word(v4),
        (false, false) => format!("v4 {}, v6 {}", word(v4), word(v6)),
    }
}

/// What a socket really accepts, in words.
pub fn really_accepts(l: &Listener) -> String {
    let addr = l.socket.address;
    if l.class.latent {
        return format!("nothing yet: {} is not a local address", plain(addr));
    }
    let mut parts = Vec::new();
    match l.class.reach_ipv4 {
        Reach::Any => parts.push("all IPv4".to_string()),
        Reach::Loopback if is_wildcard(addr) => parts.push("IPv4 loopback".to_string()),
        Reach::Loopback | Reach::Specific => parts.push(format!("IPv4 {}", plain(addr))),
        Reach::Unknown => parts.push("IPv4 unknown (kernel sent no v6only)".to_string()),
        Reach::None => {}
    }
    match l.class.reach_ipv6 {
        Reach::Any => parts.push("all IPv6".to_string()),
        Reach::Loopback if is_wildcard(addr) => parts.push("IPv6 loopback".to_string()),
        Reach::Loopback | Reach::Specific => parts.push(format!("IPv6 {addr}")),
        Reach::Unknown => parts.push("IPv6 unknown".to_string()),
        Reach::None => {}
    }
    let mut s = if parts.is_empty() {
        "nothing".to_string()
    } else {
        parts.join(" + ")
    };
    if let Some(i) = &l.interface {
        s.push_str(&format!(" (only via {i})"));
    }
    s
}

fn is_wildcard(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_unspecified(),
        IpAddr::V6(a) => {
            a.is_unspecified() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
        }
    }
}

/// v4-mapped addresses as the IPv4 address they stand for.
fn plain(a: IpAddr) -> String {
    match a {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

fn v6only_cell(l: &Listener) -> &'static str {
    match (l.socket.family, l.socket.v6only) {
        (Family::Ipv4, _) => "-",
        (Family::Ipv6, Some(true)) => "yes",
        (Family::Ipv6, Some(false)) => "no",
        (Family::Ipv6, None) => "?",
    }
}

/// `nginx[811,812,+3] php-fpm[900]`, or `-` when no process holds it.
pub fn process_cell(l: &Listener, processes: &BTreeMap<u32, ProcessInfo>) -> String {
    let owners = l.pids.iter().filter_map(|pid| {
        processes
            .get(pid)
            .map(|p| (p.comm.as_str(), i64::from(*pid)))
    });
    listenscope_core::domain::process_summary(owners).unwrap_or_else(|| "-".to_string())
}

fn owner_cell(l: &Listener) -> String {
    match (&l.container, &l.unit) {
        (Some(c), _) if !c.id.is_empty() => {
            format!("{}:{}", c.runtime, &c.id[..c.id.len().min(12)])
        }
        (Some(c), _) => format!("pod:{}", c.pod_uid.as_deref().unwrap_or("?")),
        (None, Some(u)) => u.clone(),
        (None, None) => "-".to_string(),
    }
}

/// Writes the human table, its footer, and nothing else (warnings go to stderr). With
/// `header` false: the rows only (no header line, no footer), for `awk` and `cut`.
pub fn write_table(inv: &Inventory, header: bool, out: &mut dyn Write) -> io::Result<()> {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    if !header {
        for l in &inv.listeners {
            table.add_row(table_row(l, inv));
        }
        if !inv.listeners.is_empty() {
            for line in table.to_string().lines() {
                writeln!(out, "{}", line.trim_end())?;
            }
        }
        return Ok(());
    }
    table.set_header(vec![
        "",
        "PROTO",
        "SHOWN AS",
        "REALLY ACCEPTS",
        "V6ONLY",
        "FIREWALL",
        "NETNS",
        "PROCESS",
        "UNIT/CONTAINER",
    ]);
    for l in &inv.listeners {
        table.add_row(table_row(l, inv));
    }
    if inv.listeners.is_empty() {
        writeln!(out, "No listening sockets matched.")?;
    } else {
        // comfy-table pads every line to the table width; trailing blanks are noise in a terminal.
        for line in table.to_string().lines() {
            writeln!(out, "{}", line.trim_end())?;
        }
        writeln!(out)?;
    }
    if inv.listeners.iter().any(|l| l.class.trap) {
        writeln!(
            out,
            "{TRAP_MARK} = IPv6 socket that also accepts IPv4 (IPV6_V6ONLY=0): netstat and lsof \
             show it as IPv6 only (tcp6 :::PORT), but IPv4 clients reach it."
        )?;
    }
    let mut hidden: Vec<String> = inv
        .listeners
        .iter()
        .filter(|l| l.hidden_ipv4_exposure)
        .map(|l| {
            // What the firewall does to that port's hidden IPv4 side: the verdict of the
            // listener that accepts IPv4 while shown as IPv6.
            let fw = inv
                .listeners
                .iter()
                .filter(|o| {
                    o.netns.inode == l.netns.inode
                        && o.socket.protocol == l.socket.protocol
                        && o.socket.port == l.socket.port
                        && o.class.trap
                })
                .map(|o| &o.effective.ipv4)
                .next();
            let fw = match fw.map(|a| (a.verdict, a.conditions.as_slice())) {
                Some((Effective::Open, _))
                    if fw.is_some_and(|a| a.reason.starts_with("no firewall rules")) =>
                {
                    "no firewall rules".to_owned()
                }
                Some((Effective::Open, _)) => "the firewall leaves it open".to_owned(),
                Some((Effective::Filtered, _)) => "the firewall filters it".to_owned(),
                Some((Effective::Restricted, c)) => {
                    format!("the firewall lets some in: {}", c.join(" or "))
                }
                Some((Effective::Diverted, _)) => "a DNAT sends it elsewhere".to_owned(),
                Some((other, _)) => format!("firewall: {}", other.as_str()),
                None => "firewall: unknown".to_owned(),
            };
            format!(
                "{} {}/{} ({fw})",
                l.netns.name, l.socket.protocol, l.socket.port
            )
        })
        .collect();
    hidden.dedup();
    if !hidden.is_empty() {
        writeln!(
            out,
            "Reachable over IPv4 although netstat shows only IPv6 lines: {}",
            hidden.join(", ")
        )?;
    }
    let scanned = inv.namespaces.iter().filter(|n| n.source.is_some()).count();
    writeln!(
        out,
        "{} in {} of {} on {}.",
        count(inv.listeners.len(), "listener", "listeners"),
        scanned,
        count(
            inv.namespaces.len(),
            "network namespace",
            "network namespaces"
        ),
        inv.host
    )
}

/// One table row: the columns of the header in [`write_table`].
fn table_row(l: &Listener, inv: &Inventory) -> Vec<String> {
    [
        if l.class.trap { TRAP_MARK } else { "" }.to_string(),
        l.class.netstat_proto.to_string(),
        l.class.shown_as.clone(),
        really_accepts(l),
        v6only_cell(l).to_string(),
        firewall_cell(l),
        l.netns.name.clone(),
        process_cell(l, &inv.processes),
        owner_cell(l),
    ]
    .into_iter()
    .map(printable)
    .collect()
}

/// A cell for a terminal: a local process may name itself with terminal escapes or a
/// bidirectional override (`prctl(PR_SET_NAME)`, `argv[0]`), and a namespace or unit name
/// can carry them too; they are printed as visible escapes (`\u{1b}`), never as
/// themselves (`listenscope_core::record::is_unsafe_char`).
fn printable(cell: String) -> String {
    listenscope_core::record::escape_unsafe(&cell).unwrap_or(cell)
}

/// The CSV columns: the table's, in words a spreadsheet can filter (booleans `true` /
/// `false`, empty for unknown), plus the JSON fields a sheet needs to tell rows apart and
/// sort them. Documented in docs/scan-json.md.
pub const CSV_COLUMNS: &[&str] = &[
    "trap",
    "netstat_proto",
    "shown_as",
    "really_accepts",
    "v6only",
    "firewall",
    "netns",
    "processes",
    "unit_or_container",
    "protocol",
    "family",
    "address",
    "port",
    "interface",
    "reach_ipv4",
    "reach_ipv6",
    "latent",
    "hidden_ipv4_exposure",
    "effective_ipv4",
    "effective_ipv6",
    "pids",
    "unit",
    "container_runtime",
    "container_id",
    "container_pod_uid",
    "cgroup",
    "uid",
    "inode",
    "netns_inode",
    "source",
];

/// Writes the inventory as CSV (RFC 4180 quoting, LF line ends), header first unless
/// `header` is false; the header is written even when no listener matched.
pub fn write_csv(inv: &Inventory, header: bool, out: &mut dyn Write) -> io::Result<()> {
    let mut line = String::new();
    if header {
        csv_line(&mut line, CSV_COLUMNS.iter().copied());
        out.write_all(line.as_bytes())?;
    }
    let opt_bool = |b: Option<bool>| match b {
        Some(true) => "true",
        Some(false) => "false",
        None => "",
    };
    let boolean = |b: bool| if b { "true" } else { "false" };
    for l in &inv.listeners {
        let s = &l.socket;
        let pids: Vec<String> = l.pids.iter().map(u32::to_string).collect();
        let v6only = match s.family {
            Family::Ipv4 => None,
            Family::Ipv6 => s.v6only,
        };
        let fields: [String; 30] = [
            boolean(l.class.trap).into(),
            l.class.netstat_proto.into(),
            l.class.shown_as.clone(),
            really_accepts(l),
            opt_bool(v6only).into(),
            firewall_cell(l),
            l.netns.name.clone(),
            process_cell(l, &inv.processes),
            owner_cell(l),
            s.protocol.as_str().into(),
            s.family.as_str().into(),
            s.address.to_string(),
            s.port.to_string(),
            l.interface.clone().unwrap_or_default(),
            l.class.reach_ipv4.as_str().into(),
            l.class.reach_ipv6.as_str().into(),
            boolean(l.class.latent).into(),
            boolean(l.hidden_ipv4_exposure).into(),
            l.effective.ipv4.verdict.as_str().into(),
            l.effective.ipv6.verdict.as_str().into(),
            pids.join(" "),
            l.unit.clone().unwrap_or_default(),
            l.container
                .as_ref()
                .map(|c| c.runtime.clone())
                .unwrap_or_default(),
            l.container
                .as_ref()
                .map(|c| c.id.clone())
                .unwrap_or_default(),
            l.container
                .as_ref()
                .and_then(|c| c.pod_uid.clone())
                .unwrap_or_default(),
            l.cgroup.clone().unwrap_or_default(),
            s.uid.to_string(),
            s.inode.to_string(),
            l.netns.inode.to_string(),
            l.source.as_str().into(),
        ];
        line.clear();
        csv_line(&mut line, fields.iter().map(String::as_str));
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// Appends one CSV record and its LF. A field with a comma, a quote or a line break is
/// quoted, its quotes doubled.
fn csv_line<'a>(line: &mut String, fields: impl Iterator<Item = &'a str>) {
    for (i, f) in fields.enumerate() {
        if i > 0 {
            line.push(',');
        }
        // Terminal control never reaches a terminal that shows the CSV (see `printable`);
        // line breaks and tabs stay, quoted as RFC 4180 says.
        let escaped = listenscope_core::record::escape_unsafe_except(f, &['\n', '\r', '\t']);
        let f = escaped.as_deref().unwrap_or(f);
        if f.contains([',', '"', '\n', '\r']) {
            line.push('"');
            line.push_str(&f.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(f);
        }
    }
    line.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Container, NetnsId};

    /// The listener schema as a serde struct: the reference the hand-written
    /// [`write_listener`] is tested against (see `docs/scan-json.md`).
    #[derive(Serialize)]
    struct DocListener<'a> {
        protocol: crate::model::Protocol,
        family: Family,
        address: IpAddr,
        port: u16,
        v6only: Option<bool>,
        interface: Option<&'a str>,
        netns: &'a NetnsId,
        inode: u64,
        uid: u32,
        processes: Vec<&'a RawValue>,
        container: Option<&'a Container>,
        unit: Option<&'a str>,
        cgroup: Option<&'a str>,
        reach_ipv4: Reach,
        reach_ipv6: Reach,
        latent: bool,
        shown_as: &'a str,
        netstat_proto: &'a str,
        trap: bool,
        hidden_ipv4_exposure: bool,
        freebind: Option<bool>,
        transparent: Option<bool>,
        source: Source,
        effective_ipv4: &'a str,
        effective_ipv6: &'a str,
        effective_reason: BTreeMap<&'static str, &'a str>,
        effective_conditions: BTreeMap<&'static str, &'a [String]>,
        effective_diverted_to: BTreeMap<&'static str, Option<&'a str>>,
    }

    impl<'a> DocListener<'a> {
        fn new(l: &'a Listener, processes: &'a HashMap<u32, Box<RawValue>>) -> Self {
            DocListener {
                protocol: l.socket.protocol,
                family: l.socket.family,
                address: l.socket.address,
                port: l.socket.port,
                v6only: l.socket.v6only,
                interface: l.interface.as_deref(),
                netns: &l.netns,
                inode: l.socket.inode,
                uid: l.socket.uid,
                processes: l
                    .pids
                    .iter()
                    .filter_map(|p| processes.get(p))
                    .map(|r| &**r)
                    .collect(),
                container: l.container.as_ref(),
                unit: l.unit.as_deref(),
                cgroup: l.cgroup.as_deref(),
                reach_ipv4: l.class.reach_ipv4,
                reach_ipv6: l.class.reach_ipv6,
                latent: l.class.latent,
                shown_as: &l.class.shown_as,
                netstat_proto: l.class.netstat_proto,
                trap: l.class.trap,
                hidden_ipv4_exposure: l.hidden_ipv4_exposure,
                freebind: l.socket.freebind,
                transparent: l.socket.transparent,
                source: l.source,
                effective_ipv4: l.effective.ipv4.verdict.as_str(),
                effective_ipv6: l.effective.ipv6.verdict.as_str(),
                effective_reason: BTreeMap::from([
                    ("ipv4", l.effective.ipv4.reason.as_str()),
                    ("ipv6", l.effective.ipv6.reason.as_str()),
                ]),
                effective_conditions: BTreeMap::from([
                    ("ipv4", l.effective.ipv4.conditions.as_slice()),
                    ("ipv6", l.effective.ipv6.conditions.as_slice()),
                ]),
                effective_diverted_to: BTreeMap::from([
                    ("ipv4", l.effective.ipv4.diverted_to.as_deref()),
                    ("ipv6", l.effective.ipv6.diverted_to.as_deref()),
                ]),
            }
        }
    }

    /// The hand-written listener JSON equals the serde reference, field for field.
    #[test]
    fn fast_writer_matches_schema() {
        let mut plain = listener("::", Some(false), 0, None);
        plain.pids = vec![7, 8];
        let mut odd = listener("fe80::5", Some(true), 2, Some("eth\"0"));
        odd.netns = std::sync::Arc::new(NetnsId {
            inode: 4026532000,
            name: "/run/docker/netns/ab cd\\ é".into(),
        });
        odd.container = Some(Container {
            runtime: "docker".into(),
            id: "abc".into(),
            pod_uid: Some("pod-1".into()),
        });
        odd.unit = Some("x.service".into());
        odd.cgroup = Some("/system.slice/x.service".into());
        odd.socket.freebind = Some(true);
        odd.socket.transparent = None;
        odd.source = Source::Procfs;
        odd.effective.ipv4 = crate::firewall::Answer {
            verdict: crate::firewall::Effective::Restricted,
            reason: "ip filter INPUT rule 3: -A INPUT -s 198.51.100.0/24 -j ACCEPT".into(),
            conditions: vec!["saddr 198.51.100.0/24".into(), "iifname \"e\\th*\"".into()],
            diverted_to: Some("192.0.2.2:80 (netns \"x\")".into()),
        };
        let latent = listener("10.9.9.9", None, 0, None);
        let mut procs = HashMap::new();
        for pid in [7u32, 8] {
            let p = ProcessInfo {
                pid,
                comm: "ng\tinx".into(),
                cmdline: "nginx: \"master\"".into(),
                user: "www-data".into(),
            };
            procs.insert(pid, serde_json::value::to_raw_value(&p).unwrap());
        }
        for l in [&plain, &odd, &latent] {
            let mut fast = Vec::new();
            write_listener(&mut fast, l, &procs);
            let fast: serde_json::Value = serde_json::from_slice(&fast).unwrap_or_else(|e| {
                panic!("invalid JSON ({e}): {}", String::from_utf8_lossy(&fast))
            });
            let reference = serde_json::to_value(DocListener::new(l, &procs)).unwrap();
            assert_eq!(fast, reference);
        }
    }

    use crate::classify::classify;
    use crate::model::{LocalAddrs, Protocol, RawSocket};

    fn listener(addr: &str, v6only: Option<bool>, ifindex: u32, iface: Option<&str>) -> Listener {
        let address: IpAddr = addr.parse().unwrap();
        let socket = RawSocket {
            protocol: Protocol::Tcp,
            family: if address.is_ipv4() {
                Family::Ipv4
            } else {
                Family::Ipv6
            },
            address,
            port: 80,
            v6only,
            ifindex,
            freebind: None,
            transparent: None,
            uid: 0,
            inode: 1,
            cgroup_id: None,
        };
        let local = LocalAddrs {
            v4: vec![
                ("127.0.0.0".parse().unwrap(), 8),
                ("10.0.0.5".parse().unwrap(), 32),
            ],
            v6: vec![
                ("::1".parse().unwrap(), 128, 1),
                ("fe80::5".parse().unwrap(), 128, 2),
            ],
        };
        Listener {
            class: classify(&socket, Some(&local), crate::model::Ipv6State::Enabled),
            socket,
            netns: std::sync::Arc::new(NetnsId {
                inode: 1,
                name: "host".into(),
            }),
            source: Source::SockDiag,
            interface: iface.map(String::from),
            hidden_ipv4_exposure: false,
            pids: vec![],
            cgroup: None,
            container: None,
            unit: None,
            effective: crate::firewall::Exposure::unknown("not \"read\"\u{1b}"),
        }
    }

    #[test]
    fn words() {
        let cases = [
            (listener("::", Some(false), 0, None), "all IPv4 + all IPv6"),
            (listener("::", Some(true), 0, None), "all IPv6"),
            (
                listener("::", None, 0, None),
                "IPv4 unknown (kernel sent no v6only) + all IPv6",
            ),
            (listener("0.0.0.0", None, 0, None), "all IPv4"),
            (
                listener("0.0.0.0", None, 1, Some("lo")),
                "IPv4 loopback (only via lo)",
            ),
            (listener("127.0.0.1", None, 0, None), "IPv4 127.0.0.1"),
            (
                listener("::ffff:10.0.0.5", Some(false), 0, None),
                "IPv4 10.0.0.5",
            ),
            (listener("::ffff:0.0.0.0", Some(false), 0, None), "all IPv4"),
            (
                listener("fe80::5", Some(true), 2, Some("eth0")),
                "IPv6 fe80::5 (only via eth0)",
            ),
            (
                listener("10.9.9.9", None, 0, None),
                "nothing yet: 10.9.9.9 is not a local address",
            ),
        ];
        for (l, want) in cases {
            assert_eq!(really_accepts(&l), want, "{}", l.socket.address);
        }
    }

    fn inventory(listeners: Vec<Listener>) -> Inventory {
        Inventory {
            host: "h1".into(),
            scanned_at: time::OffsetDateTime::UNIX_EPOCH,
            listeners,
            processes: BTreeMap::new(),
            namespaces: vec![crate::scan::NetnsReport {
                id: NetnsId {
                    inode: 1,
                    name: "host".into(),
                },
                source: Some(Source::SockDiag),
                listeners: 1,
                shown: 1,
                firewall: None,
                ipv6: None,
            }],
            warnings: vec![],
            partial: false,
        }
    }

    fn text(f: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// A local process named with terminal escapes, a C1 control and a bidi override
    /// prints them as visible text in the table and CSV, and as `\uXXXX` escapes in JSON
    /// (the same string once parsed).
    #[test]
    fn hostile_names_print_escaped() {
        let mut l = listener("::", Some(false), 0, None);
        l.netns = std::sync::Arc::new(NetnsId {
            inode: 9,
            name: "\u{1b}]0;pwned\u{7}ev\u{202e}il".into(),
        });
        let inv = inventory(vec![l]);
        for out in [
            text(|o| write_table(&inv, true, o)),
            text(|o| write_csv(&inv, true, o)),
        ] {
            assert!(out.contains(r"\u{1b}]0;pwned\u{7}ev\u{202e}il"), "{out}");
            assert!(
                !out.chars()
                    .any(|c| c != '\n' && listenscope_core::record::is_unsafe_char(c)),
                "{out:?}"
            );
        }
        let mut l = listener("::", Some(false), 0, None);
        let name = "\u{1b}]0;pwned\u{7}e\u{9b}v\u{202e}il";
        l.netns = std::sync::Arc::new(NetnsId {
            inode: 9,
            name: name.into(),
        });
        let json = text(|o| write_json(&inventory(vec![l]), o));
        assert!(
            !json
                .chars()
                .any(|c| c != '\n' && listenscope_core::record::is_unsafe_char(c)),
            "{json:?}"
        );
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(doc["listeners"][0]["netns"]["name"], name, "{json}");
    }

    #[test]
    fn csv_has_lf_lines_a_header_always_and_quotes() {
        let empty = inventory(vec![]);
        let header = CSV_COLUMNS.join(",") + "\n";
        assert_eq!(text(|o| write_csv(&empty, true, o)), header);
        assert_eq!(text(|o| write_csv(&empty, false, o)), "");
        let mut l = listener("::", Some(false), 0, None);
        l.netns = std::sync::Arc::new(NetnsId {
            inode: 9,
            name: "a,\"b\"\nc".into(),
        });
        let inv = inventory(vec![l]);
        let csv = text(|o| write_csv(&inv, true, o));
        assert!(!csv.contains('\r'), "{csv:?}");
        let (head, row) = csv.split_once('\n').unwrap();
        assert_eq!(head, CSV_COLUMNS.join(","));
        assert!(row.ends_with(",9,sock_diag\n"), "{row:?}");
        assert!(row.contains(",\"a,\"\"b\"\"\nc\","), "{row:?}");
        assert!(
            row.starts_with("true,tcp6,:::80,all IPv4 + all IPv6,false,"),
            "{row:?}"
        );
        assert!(
            row.contains(",tcp,ipv6,::,80,,any,any,false,false,"),
            "{row:?}"
        );
        assert_eq!(text(|o| write_csv(&inv, false, o)), row);
    }

    #[test]
    fn table_counts_in_words_and_rows_only_without_header() {
        let inv = inventory(vec![listener("0.0.0.0", None, 0, None)]);
        let table = text(|o| write_table(&inv, true, o));
        assert!(table.trim_start().starts_with("PROTO"), "{table}");
        assert!(
            table.ends_with("1 listener in 1 of 1 network namespace on h1.\n"),
            "{table}"
        );
        let rows = text(|o| write_table(&inv, false, o));
        assert_eq!(rows.lines().count(), 1, "{rows}");
        assert!(rows.contains("tcp") && !rows.contains("PROTO"), "{rows}");
        let none = inventory(vec![]);
        assert_eq!(text(|o| write_table(&none, false, o)), "");
        assert!(
            text(|o| write_table(&none, true, o))
                .ends_with("0 listeners in 1 of 1 network namespace on h1.\n")
        );
    }

    #[test]
    fn process_cells() {
        let mut l = listener("::", Some(false), 0, None);
        l.pids = vec![10, 11, 12, 13, 14, 20];
        let mut procs = BTreeMap::new();
        for pid in [10, 11, 12, 13, 14] {
            procs.insert(
                pid,
                ProcessInfo {
                    pid,
                    comm: "nginx".into(),
                    cmdline: String::new(),
                    user: "root".into(),
                },
            );
        }
        procs.insert(
            20,
            ProcessInfo {
                pid: 20,
                comm: "helper".into(),
                cmdline: String::new(),
                user: "root".into(),
            },
        );
        assert_eq!(process_cell(&l, &procs), "nginx[10,11,12,+2] helper[20]");
        l.pids.clear();
        assert_eq!(process_cell(&l, &procs), "-");
    }
}
