//! The evaluator: can a new connection from off-host reach a listener through this
//! namespace's own rules? Pure: a [`Ruleset`] and a [`Question`] in, an [`Answer`] out.
//!
//! ## Method
//! The first packet (TCP SYN or UDP datagram, conntrack state `new`) is walked through
//! the hooks in kernel order (ingress, prerouting, input; base chains by priority; an
//! accept ends only its own base chain), then its reply through output and postrouting.
//! What is known about it: protocol, destination port, destination address (one of the
//! listener's addresses), ct state, mark. What is not: source address, input interface,
//! source port, rate. A match on an unknown splits the walk into two paths, each
//! remembering the condition it assumed; a path whose conditions contradict each other
//! (`iifname "eth0"` then `iifname "eth1"`, disjoint source sets) is dropped. At the end
//! every path has an outcome: accepted (under its conditions), dropped, or diverted by a
//! DNAT. All accepted and none dropped ⇒ `open`; none accepted ⇒ `filtered` (or
//! `diverted`); both ⇒ `restricted`, with the accepting paths' conditions.
//!
//! A match the model cannot decide (an opaque `xt` match, an ipset, a hop limit of a TCP
//! SYN) is an *atom*: the verdict is computed for every truth assignment of the atoms on
//! the way, and when those verdicts differ the answer is `unknown` and names the atoms.
//! It is never `open` by assumption. Work is bounded; past the bound the answer is
//! `unknown`.
//!
//! ## Assumptions (documented in docs/firewall.md)
//! - Off-host packets never arrive on `lo` and never come from a loopback address.
//! - Routing is symmetric: the reply leaves through the interface the request came in
//!   on, so an output rule on `oifname` reads as a condition on the input interface.
//! - Reverse-path checks (`fib saddr . iif oif missing`) pass: a spoofed source is not a
//!   client.
//! - ICMPv6 neighbour solicitations and advertisements are not tracked by conntrack
//!   (state `untracked`): established/related/invalid/new rules do not match them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::model::{
    ChainType, Hook, Key, NatKind, Origin, Policy, Rule, Ruleset, Stmt, Table, Value, Verdict,
};

/// What one listener asks, for one IP version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Question {
    pub tcp: bool,
    pub port: u16,
    pub v6: bool,
    /// The local addresses of that version a client can reach the listener on (the bound
    /// address, or every non-loopback local address for a wildcard socket). Never empty.
    pub daddrs: Vec<IpAddr>,
}

pub use listenscope_core::domain::Effective;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub verdict: Effective,
    /// The deciding rule (`inet filter input handle 7: tcp dport 22 accept`), the policy,
    /// or why the answer is unknown.
    pub reason: String,
    /// `restricted` only: each entry is one way in (`saddr 198.51.100.0/24`,
    /// `iifname eth0 and sport 67`).
    pub conditions: Vec<String>,
    /// `diverted` (and `restricted` with a diverted part): where the traffic goes
    /// (`192.0.2.2:80`, or `:8080` for a redirect to a local port).
    pub diverted_to: Option<String>,
}

impl Answer {
    pub fn new(verdict: Effective, reason: impl Into<String>) -> Self {
        Answer {
            verdict,
            reason: reason.into(),
            conditions: Vec::new(),
            diverted_to: None,
        }
    }
}

/// (tcp, v6, port class) of a cached answer.
type AnswerKey = (bool, bool, usize);

/// Bounds of one question's walk.
const MAX_STEPS: usize = 100_000;
/// Steps of all questions of one namespace together (one scan): a pathological ruleset
/// costs at most about a second of one core, then its remaining answers are `unknown`.
const MAX_TOTAL_STEPS: usize = 2_000_000;
const MAX_OUTCOMES: usize = 20_000;
const MAX_DEPTH: usize = 64;
/// At most 2^10 assignments of undecidable matches are compared.
const MAX_ATOMS: usize = 10;

/// Evaluates questions against one namespace's ruleset, remembering answers (listeners
/// share ports and addresses) and the neighbour-discovery check.
#[derive(Debug)]
pub struct Evaluator {
    tables: Vec<Table>,
    /// Main-table routes (destination, prefix length, interface) for the forward path.
    routes: Vec<(IpAddr, u8, String)>,
    /// The namespace's own addresses: a DNAT to one of them stays local (input), it is
    /// not forwarded.
    local: crate::model::LocalAddrs,
    /// Answers by (tcp, v6, port class, addresses): ports no rule tells apart share one.
    answers: HashMap<Vec<IpAddr>, HashMap<AnswerKey, Answer>>,
    debian_default: bool,
    /// Walk steps spent on this ruleset so far (bounded by `MAX_TOTAL_STEPS`).
    spent: usize,
    /// Sorted boundaries of every port range any rule matches or rewrites to: two ports
    /// between the same boundaries take the same way through every rule.
    port_breaks: Vec<u64>,
    nd: Option<Option<String>>,
}

impl Evaluator {
    pub fn new(ruleset: &Ruleset) -> Self {
        let tables: Vec<Table> = ruleset.tables.iter().map(expand_verdict_maps).collect();
        let port_breaks = port_breaks(&tables);
        Evaluator {
            debian_default: is_debian_default(&tables),
            spent: 0,
            port_breaks,
            tables,
            routes: Vec::new(),
            local: crate::model::LocalAddrs::default(),
            answers: HashMap::new(),
            nd: None,
        }
    }

    /// The namespace's main-table routes: which interface a DNAT target leaves by.
    pub fn set_routes(&mut self, routes: Vec<(IpAddr, u8, String)>) {
        self.routes = routes;
        self.answers.clear();
    }

    /// The namespace's local addresses (the `local` routing table).
    pub fn set_local(&mut self, local: crate::model::LocalAddrs) {
        self.local = local;
        self.answers.clear();
    }

    /// True when no table has a base chain: nothing filters.
    pub fn is_empty(&self) -> bool {
        !self
            .tables
            .iter()
            .any(|t| t.chains.iter().any(|c| c.base.is_some()))
    }

    pub fn answer(&mut self, q: &Question) -> Answer {
        if self.debian_default {
            return Answer::new(
                Effective::Open,
                "Debian's default /etc/nftables.conf: chains with policy accept and no rules",
            );
        }
        let class = self
            .port_breaks
            .partition_point(|&b| b <= u64::from(q.port));
        let key = (q.tcp, q.v6, class);
        if let Some(a) = self
            .answers
            .get(q.daddrs.as_slice())
            .and_then(|m| m.get(&key))
        {
            return a.clone();
        }
        let a = self.compute(q);
        self.answers
            .entry(q.daddrs.clone())
            .or_default()
            .insert(key, a.clone());
        a
    }

    fn compute(&mut self, q: &Question) -> Answer {
        if q.v6 {
            let nd = match &self.nd {
                Some(nd) => nd.clone(),
                None => {
                    let nd = self.neighbour_discovery_blocked();
                    self.nd = Some(nd.clone());
                    nd
                }
            };
            if let Some(why) = nd {
                return Answer::new(
                    Effective::Filtered,
                    format!(
                        "IPv6 neighbour discovery from off-host is dropped ({why}): no IPv6 \
                         client can reach this namespace"
                    ),
                );
            }
        }
        let mut w = Walker::new(&self.tables, &self.routes, q.v6);
        w.local = Some(&self.local);
        let version = if q.v6 { "IPv6" } else { "IPv4" };
        if w.base_chains(&[Hook::Ingress, Hook::Prerouting, Hook::Input], Dir::In)
            .is_empty()
            && w.base_chains(&[Hook::Output, Hook::Postrouting], Dir::Reply)
                .is_empty()
        {
            return Answer::new(
                Effective::Open,
                format!(
                    "no firewall chain sees {version} here (the tables are for the other IP version)"
                ),
            );
        }
        let packet = Packet {
            l4: if q.tcp { 6 } else { 17 },
            port: Some(q.port),
            icmp: None,
            hop_limit: None,
            daddrs: Some(q.daddrs.clone()),
            daddr_ranges: Vec::new(),
            fib_type: "local",
        };
        if self.spent >= MAX_TOTAL_STEPS {
            return Answer::new(
                Effective::Unknown,
                "the agent's evaluation budget for this namespace's ruleset is spent (it \
                 splits into too many paths); other ports were evaluated first",
            );
        }
        let outcomes = w.run(&packet, true);
        self.spent += w.steps;
        if w.exhausted {
            return Answer::new(
                Effective::Unknown,
                "the ruleset is too complex to evaluate within the agent's bounds (too many \
                 paths or jumps nested too deep)",
            );
        }
        w.conclude(&outcomes)
    }

    /// `Some(reason)` when neighbour solicitations or advertisements from off-host are
    /// dropped on every path.
    fn neighbour_discovery_blocked(&self) -> Option<String> {
        for (icmp, name) in [
            (135, "neighbour solicitation"),
            (136, "neighbour advertisement"),
        ] {
            let mut w = Walker::new(&self.tables, &self.routes, true);
            // A solicitation goes to the target's solicited-node multicast address
            // (ff02::1:ffXX:XXXX); a solicited advertisement to the asker's own address.
            let (daddr_ranges, fib_type) = if icmp == 135 {
                (
                    vec![(
                        0xff02_0000_0000_0000_0000_0001_ff00_0000,
                        0xff02_0000_0000_0000_0000_0001_ffff_ffff,
                    )],
                    "multicast",
                )
            } else {
                (
                    vec![(0, 0xfeff_ffff_ffff_ffff_ffff_ffff_ffff_ffff)],
                    "local",
                )
            };
            let packet = Packet {
                l4: 58,
                port: None,
                icmp: Some(icmp),
                hop_limit: Some(255),
                daddrs: None,
                daddr_ranges,
                fib_type,
            };
            let outcomes = w.run(&packet, false);
            if w.exhausted {
                return None;
            }
            let mut drops = outcomes.iter().filter(|o| matches!(o.kind, Kind::Drop));
            if outcomes.iter().all(|o| matches!(o.kind, Kind::Drop))
                && let Some(first) = drops.next()
            {
                return Some(format!("ICMPv6 {name}: {}", first.reason));
            }
        }
        None
    }
}

/// Which well-known tool wrote a table or chain, so a reason reads `ufw: …`, `Docker: …`.
/// Recognised by the names those tools give their tables and chains.
pub(crate) fn pattern(t: &Table, chain: &str) -> Option<Cow<'static, str>> {
    let known = |name: &'static str| Some(Cow::Borrowed(name));
    if chain.starts_with("ufw-") || chain.starts_with("ufw6-") {
        return known("ufw");
    }
    // ufw also owns the built-in chains' policies of its tables ("default deny incoming").
    if t.chains
        .iter()
        .any(|c| c.name.starts_with("ufw-") || c.name.starts_with("ufw6-"))
    {
        return known("ufw");
    }
    if t.name == "firewalld" {
        return Some(firewalld_zone(chain).map_or(Cow::Borrowed("firewalld"), Cow::Owned));
    }
    if chain == "DOCKER-USER" {
        return known("Docker (DOCKER-USER, the administrator's chain)");
    }
    if chain == "DOCKER" || chain.starts_with("DOCKER-") {
        return known("Docker");
    }
    if chain.starts_with("KUBE-") || t.name == "kube-proxy" {
        return known("kube-proxy");
    }
    if t.name.starts_with("cilium") || chain.starts_with("CILIUM_") {
        return known("Cilium");
    }
    None
}

/// The zone or policy a firewalld chain belongs to: firewalld names them
/// `{filter_IN,filter_FWD,filter_OUT,nat_PRE,nat_POST,mangle_PRE,raw_PRE}_ZONE[_pre|_log|_deny|_allow|_post]`,
/// and a policy's `…_policy_NAME…`. `None` for its shared chains (`filter_INPUT`,
/// `filter_INPUT_ZONES`, …).
fn firewalld_zone(chain: &str) -> Option<String> {
    const HOOKS: [&str; 7] = [
        "filter_IN_",
        "filter_FWD_",
        "filter_OUT_",
        "nat_PRE_",
        "nat_POST_",
        "mangle_PRE_",
        "raw_PRE_",
    ];
    const PARTS: [&str; 5] = ["_pre", "_log", "_deny", "_allow", "_post"];
    let rest = HOOKS.iter().find_map(|h| chain.strip_prefix(h))?;
    let name = PARTS
        .iter()
        .find_map(|p| rest.strip_suffix(p))
        .unwrap_or(rest);
    if name.is_empty() {
        return None;
    }
    Some(match name.strip_prefix("policy_") {
        Some(policy) => format!("firewalld policy {policy}"),
        None => format!("firewalld zone {name}"),
    })
}

/// Debian's shipped `/etc/nftables.conf`: `table inet filter` with input, forward and
/// output chains at priority 0, policy accept, no rules, and nothing else.
fn is_debian_default(tables: &[Table]) -> bool {
    use super::model::{ChainType, Policy};
    let [t] = tables else { return false };
    let mut hooks: Vec<Hook> = t
        .chains
        .iter()
        .filter_map(|c| {
            let b = c.base.as_ref()?;
            (c.rules.is_empty()
                && b.policy == Policy::Accept
                && b.kind == ChainType::Filter
                && b.priority == 0)
                .then_some(b.hook)
        })
        .collect();
    hooks.sort();
    t.name == "filter"
        && t.family == super::model::TableFamily::Inet
        && t.chains.len() == 3
        && hooks == [Hook::Input, Hook::Forward, Hook::Output]
}

/// Every boundary of a port range the rules match (`Dport`, `Sport`, in concatenations
/// too) or rewrite to: `lo` and `hi + 1` of each.
fn port_breaks(tables: &[Table]) -> Vec<u64> {
    fn add(key: &Key, value: &Value, out: &mut Vec<u64>) {
        match (key, value) {
            (Key::Dport | Key::Sport, Value::Num(lo, hi)) => {
                out.push(*lo);
                out.push(hi.saturating_add(1));
            }
            (Key::Concat(keys), Value::Tuple(parts)) => {
                for (k, v) in keys.iter().zip(parts) {
                    add(k, v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for t in tables {
        for c in &t.chains {
            for r in &c.rules {
                for s in &r.stmts {
                    match s {
                        Stmt::Match { key, values, .. } => {
                            for v in values {
                                add(key, v, &mut out);
                            }
                        }
                        Stmt::VerdictMap { key, entries } => {
                            for (v, _) in entries {
                                add(key, v, &mut out);
                            }
                        }
                        Stmt::Nat { port: Some(p), .. } => {
                            out.push(u64::from(*p));
                            out.push(u64::from(*p) + 1);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A verdict map becomes one rule per element (the elements are disjoint, so at most one
/// applies; a jump returns to the rule after the map, as it would). Keeps the evaluator's
/// walk to plain matches and verdicts.
fn expand_verdict_maps(t: &Table) -> Table {
    let mut t = t.clone();
    for chain in &mut t.chains {
        if !chain
            .rules
            .iter()
            .any(|r| r.stmts.iter().any(|s| matches!(s, Stmt::VerdictMap { .. })))
        {
            continue;
        }
        let mut rules = Vec::with_capacity(chain.rules.len());
        for rule in chain.rules.drain(..) {
            let Some(at) = rule
                .stmts
                .iter()
                .position(|s| matches!(s, Stmt::VerdictMap { .. }))
            else {
                rules.push(rule);
                continue;
            };
            let Stmt::VerdictMap { key, entries } = &rule.stmts[at] else {
                continue;
            };
            // The pieces share the original's identity and text, and end with a marker
            // so a jump's return lands after the last piece.
            let n = entries.len();
            for (i, (value, verdict)) in entries.iter().enumerate() {
                let mut stmts = rule.stmts[..at].to_vec();
                stmts.push(Stmt::Match {
                    key: key.clone(),
                    negate: false,
                    values: vec![value.clone()],
                });
                stmts.push(Stmt::Verdict(verdict.clone()));
                rules.push(Rule {
                    handle: rule.handle,
                    text: rule.text.clone(),
                    stmts,
                });
                let _ = (i, n);
            }
        }
        chain.rules = rules;
    }
    t
}

/// The packet asked about, apart from what varies per path.
#[derive(Debug, Clone)]
struct Packet {
    l4: u64,
    /// Destination port (TCP/UDP).
    port: Option<u16>,
    icmp: Option<u64>,
    hop_limit: Option<u64>,
    /// The listener's addresses; `None`: `daddr_ranges` (neighbour discovery).
    daddrs: Option<Vec<IpAddr>>,
    /// Destination ranges when there is no one listener address.
    daddr_ranges: Vec<(u128, u128)>,
    /// `fib daddr type` of the destination: `local` for a listener's address,
    /// `multicast` for a neighbour solicitation's solicited-node address.
    fib_type: &'static str,
}

/// What the walk does not know, each a dimension a path can put conditions on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dim {
    /// The client's address.
    Saddr,
    /// The local address the client connects to.
    Daddr,
    /// The client's port.
    Sport,
    /// The interface the request arrives on (and the reply leaves by).
    Iif,
    /// A rate or quota (interned text).
    Rate(usize),
    /// A match the model cannot decide (interned).
    Atom(usize),
}

#[derive(Debug, Clone, PartialEq)]
struct Cond {
    dim: Dim,
    negate: bool,
    /// Shared: a path's conditions are cloned at every split.
    values: std::sync::Arc<[Value]>,
}

impl Dim {
    /// Dimensions whose conditions are sets of numbers (addresses, ports): a path keeps
    /// their current set, so a split costs the set, not every condition again.
    fn is_interval(self) -> bool {
        matches!(self, Dim::Saddr | Dim::Daddr | Dim::Sport)
    }
}

/// Request or reply direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    In,
    Reply,
    /// A DNATed request on its way to the target (forward, postrouting).
    Forward,
    /// The target's reply on its way back to the client.
    ForwardReply,
}

/// Where a DNATed connection goes: the target and the interface that leads there.
#[derive(Debug, Clone)]
struct Fwd {
    addr: IpAddr,
    port: Option<u16>,
    /// From the main routing table; `None` when no route matched (then matches on it
    /// are undecidable).
    oif: Option<String>,
}

#[derive(Debug, Clone)]
struct Path {
    conds: Vec<Cond>,
    mark: u64,
    ct_state: &'static str,
    dnat: Option<String>,
    /// The rule that DNATed it.
    dnat_rule: Option<String>,
    /// The last explicit accept on the way (the deciding rule of an `open`).
    accepted_by: Option<String>,
    /// The current set of each interval dimension with conditions (the domain minus and
    /// intersected with them), kept so a split costs one set operation.
    sets: Vec<(Dim, Vec<(u128, u128)>)>,
}

#[derive(Debug, Clone)]
enum Kind {
    Accept,
    Drop,
    Divert(String),
}

#[derive(Debug, Clone)]
struct Outcome {
    kind: Kind,
    /// All conditions for accepted and diverted paths; for dropped ones only the atoms
    /// (what `conclude` needs), so thousands of drops do not keep thousands of lists.
    conds: Vec<Cond>,
    /// How many conditions the path had (the most general drop is named first).
    weight: usize,
    reason: String,
}

/// How a base chain ended for one path.
enum End {
    Accept(Option<String>),
    Drop(String),
    /// The rule and the target.
    Divert(String, String),
}

struct Frame {
    chain: usize,
    rule: usize,
}

struct Task {
    frames: Vec<Frame>,
    path: Path,
    /// Next statement of the current rule (`frames.last().rule`).
    stmt: usize,
}

enum Flow {
    NextRule,
    Done,
    Entered,
}

struct Walker<'a> {
    tables: &'a [Table],
    v6: bool,
    steps: usize,
    exhausted: bool,
    rates: Vec<String>,
    atoms: Vec<(usize, String)>,
    /// The listener's addresses as intervals (`None`: any address of the family).
    daddrs: Option<Vec<(u128, u128)>>,
    routes: &'a [(IpAddr, u8, String)],
    local: Option<&'a crate::model::LocalAddrs>,
    fwd: Option<Fwd>,
}

impl<'a> Walker<'a> {
    fn new(tables: &'a [Table], routes: &'a [(IpAddr, u8, String)], v6: bool) -> Self {
        Walker {
            routes,
            local: None,
            fwd: None,
            tables,
            v6,
            steps: 0,
            exhausted: false,
            rates: Vec::new(),
            atoms: Vec::new(),
            daddrs: None,
        }
    }

    /// Every base chain of `hooks` this IP version passes, in kernel order.
    fn base_chains(&self, hooks: &[Hook], dir: Dir) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (ti, t) in self.tables.iter().enumerate() {
            if !t.family.sees(self.v6) {
                continue;
            }
            for (ci, c) in t.chains.iter().enumerate() {
                let Some(b) = &c.base else { continue };
                if !hooks.contains(&b.hook) {
                    continue;
                }
                // NAT chains see only the first packet of a connection, never a reply.
                if matches!(dir, Dir::Reply | Dir::ForwardReply) && b.kind == ChainType::Nat {
                    continue;
                }
                out.push((ti, ci));
            }
        }
        out.sort_by_key(|&(ti, ci)| {
            let b = self.tables[ti].chains[ci].base.as_ref();
            (b.map(|b| b.hook), b.map_or(0, |b| b.priority))
        });
        out
    }

    /// Walks the packet in, then (when `reply`) its answer out.
    fn run(&mut self, p: &Packet, reply: bool) -> Vec<Outcome> {
        self.daddrs = p.daddrs.as_ref().map(|addrs| {
            let mut v: Vec<(u128, u128)> = addrs
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(a) if !self.v6 => Some(u128::from(u32::from(*a))),
                    IpAddr::V6(a) if self.v6 => Some(u128::from(*a)),
                    _ => None,
                })
                .map(|a| (a, a))
                .collect();
            normalize(&mut v);
            v
        });
        if self.daddrs.is_none() && !p.daddr_ranges.is_empty() {
            self.daddrs = Some(p.daddr_ranges.clone());
        }
        let start = Path {
            conds: Vec::new(),
            mark: 0,
            ct_state: if p.icmp.is_some() { "untracked" } else { "new" },
            dnat: None,
            dnat_rule: None,
            accepted_by: None,
            sets: Vec::new(),
        };
        let mut outcomes = Vec::new();
        let inbound = self.base_chains(&[Hook::Ingress, Hook::Prerouting, Hook::Input], Dir::In);
        let live = self.through(p, Dir::In, &inbound, vec![start], &mut outcomes);
        if !reply {
            for path in live {
                outcomes.push(Outcome {
                    kind: Kind::Accept,
                    reason: path.accepted_by.clone().unwrap_or_default(),
                    weight: path.conds.len(),
                    conds: path.conds,
                });
            }
            return outcomes;
        }
        let mut replies = Vec::new();
        let mut diverted: Vec<(String, Vec<Path>)> = Vec::new();
        for path in live {
            if let Some(to) = path.dnat.clone() {
                match diverted.iter_mut().find(|(t, _)| *t == to) {
                    Some((_, paths)) => paths.push(path),
                    None => diverted.push((to, vec![path])),
                }
            } else {
                replies.push(Path {
                    ct_state: reply_state(&path, p),
                    // A reply leaves with the socket's mark, not the request's.
                    mark: 0,
                    ..path
                });
            }
        }
        for (to, paths) in diverted {
            self.forward(p, &to, paths, &mut outcomes);
        }
        let outbound = self.base_chains(&[Hook::Output, Hook::Postrouting], Dir::Reply);
        let done = self.through(p, Dir::Reply, &outbound, replies, &mut outcomes);
        for path in done {
            outcomes.push(Outcome {
                kind: Kind::Accept,
                reason: path.accepted_by.clone().unwrap_or_default(),
                weight: path.conds.len(),
                conds: path.conds,
            });
        }
        outcomes
    }

    /// A DNATed connection's way to its target and back: forward and postrouting for the
    /// request, forward and postrouting for the reply. A redirect (to a local port) or a
    /// target that cannot be parsed ends diverted without this walk.
    fn forward(&mut self, p: &Packet, to: &str, paths: Vec<Path>, outcomes: &mut Vec<Outcome>) {
        let divert = |outcomes: &mut Vec<Outcome>, paths: Vec<Path>| {
            for path in paths {
                outcomes.push(Outcome {
                    kind: Kind::Divert(to.to_owned()),
                    reason: path.dnat_rule.clone().unwrap_or_default(),
                    weight: path.conds.len(),
                    conds: path.conds,
                });
            }
        };
        let Some((addr, port)) = parse_target(to) else {
            divert(outcomes, paths);
            return;
        };
        let is_local = self.local.is_some_and(|l| match addr {
            IpAddr::V4(a) => l.contains_v4(a),
            IpAddr::V6(a) => l.contains_v6(a, 0),
        });
        if addr.is_ipv6() != self.v6 || is_local {
            // To one of the host's own addresses: delivered locally (input), to whatever
            // listens there; that listener's own verdict covers its input rules.
            divert(outcomes, paths);
            return;
        }
        let oif = self.route(addr);
        self.fwd = Some(Fwd { addr, port, oif });
        let chains = self.base_chains(&[Hook::Forward, Hook::Postrouting], Dir::Forward);
        let through = self.through(p, Dir::Forward, &chains, paths, outcomes);
        let replies = through
            .into_iter()
            .map(|path| Path {
                ct_state: reply_state(&path, p),
                ..path
            })
            .collect();
        let chains = self.base_chains(&[Hook::Forward, Hook::Postrouting], Dir::ForwardReply);
        let back = self.through(p, Dir::ForwardReply, &chains, replies, outcomes);
        self.fwd = None;
        divert(outcomes, back);
    }

    /// The output interface of the longest matching route.
    fn route(&self, addr: IpAddr) -> Option<String> {
        let a = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        self.routes
            .iter()
            .filter(|(dst, len, _)| {
                dst.is_ipv6() == addr.is_ipv6() && {
                    let bits = if addr.is_ipv6() { 128 } else { 32 };
                    let d = match dst {
                        IpAddr::V4(d) => u128::from(u32::from(*d)),
                        IpAddr::V6(d) => u128::from(*d),
                    };
                    let len = u32::from(*len).min(bits);
                    len == 0 || (a ^ d) >> (bits - len) == 0
                }
            })
            .max_by_key(|(_, len, _)| *len)
            .map(|(_, _, name)| name.clone())
    }

    fn through(
        &mut self,
        p: &Packet,
        dir: Dir,
        chains: &[(usize, usize)],
        mut live: Vec<Path>,
        outcomes: &mut Vec<Outcome>,
    ) -> Vec<Path> {
        for &(ti, ci) in chains {
            let table = &self.tables[ti];
            let chain = &table.chains[ci];
            let Some(base) = &chain.base else { continue };
            let mut next = Vec::new();
            for path in live {
                if path.dnat.is_some() && base.hook == Hook::Input {
                    // Diverted: it takes the forward path, not this one.
                    next.push(path);
                    continue;
                }
                let mut paths = vec![path];
                if base.hook == Hook::Ingress {
                    // A chain bound to devices sees only their packets; when the reader
                    // could not tell which, whether it applies is undecidable.
                    let cond = match &base.devices {
                        Some(devs) => Cond {
                            dim: Dim::Iif,
                            negate: false,
                            values: devs
                                .iter()
                                .map(|d| Value::Name(d.clone()))
                                .collect::<Vec<_>>()
                                .into(),
                        },
                        None => Cond {
                            dim: Dim::Atom(self.chain_atom(ti, ci)),
                            negate: false,
                            values: Vec::new().into(),
                        },
                    };
                    let (yes, no) = self.split(paths.remove(0), &cond);
                    next.extend(no);
                    paths.extend(yes);
                }
                for path in paths {
                    let mut ends = Vec::new();
                    self.run_chain(p, dir, ti, ci, path, &mut ends);
                    for (mut path, end) in ends {
                        match end {
                            End::Accept(by) => {
                                // The reason names what let the connection in; the
                                // reply's own accepts (`ct state established accept`
                                // in output) explain nothing.
                                if by.is_some() && matches!(dir, Dir::In | Dir::Forward) {
                                    path.accepted_by = by;
                                }
                                next.push(path);
                            }
                            End::Drop(reason) => {
                                let to = path.dnat.clone().unwrap_or_default();
                                let reason = match dir {
                                    Dir::Reply => format!("the reply is dropped by {reason}"),
                                    Dir::In => reason,
                                    Dir::Forward => {
                                        format!("diverted to {to}, then dropped by {reason}")
                                    }
                                    Dir::ForwardReply => format!(
                                        "diverted to {to}; the reply is dropped by {reason}"
                                    ),
                                };
                                outcomes.push(Outcome {
                                    kind: Kind::Drop,
                                    weight: path.conds.len(),
                                    conds: path
                                        .conds
                                        .into_iter()
                                        .filter(|c| matches!(c.dim, Dim::Atom(_)))
                                        .collect(),
                                    reason,
                                });
                            }
                            End::Divert(rule, to) => {
                                path.accepted_by = Some(rule.clone());
                                path.dnat_rule = Some(rule);
                                path.dnat = Some(to);
                                next.push(path);
                            }
                        }
                    }
                }
                if outcomes.len() + next.len() > MAX_OUTCOMES {
                    self.exhausted = true;
                    return Vec::new();
                }
            }
            live = next;
        }
        live
    }

    fn rule_ref(&self, ti: usize, ci: usize, ri: usize) -> String {
        let t = &self.tables[ti];
        let c = &t.chains[ci];
        let who = pattern(t, &c.name).map_or(String::new(), |p| format!("{p}: "));
        let r = &c.rules[ri];
        let at = match (r.handle, t.origin) {
            (Some(h), _) => format!("handle {h}"),
            (None, _) => format!("rule {}", ri + 1),
        };
        let origin = match t.origin {
            Origin::IptablesLegacy => " (iptables-legacy)",
            _ => "",
        };
        format!(
            "{who}{} {} {}{origin} {at}: {}",
            t.family.as_str(),
            t.name,
            c.name,
            r.text
        )
    }

    fn policy_ref(&self, ti: usize, ci: usize) -> String {
        let t = &self.tables[ti];
        let c = &t.chains[ci];
        let who = pattern(t, &c.name).map_or(String::new(), |p| format!("{p}: "));
        let origin = match t.origin {
            Origin::IptablesLegacy => " (iptables-legacy)",
            _ => "",
        };
        format!(
            "{who}policy drop of {} {} {}{origin}",
            t.family.as_str(),
            t.name,
            c.name
        )
    }

    fn run_chain(
        &mut self,
        p: &Packet,
        dir: Dir,
        ti: usize,
        base: usize,
        path: Path,
        out: &mut Vec<(Path, End)>,
    ) {
        let table = &self.tables[ti];
        let policy = table.chains[base].base.as_ref().map(|b| b.policy);
        let nat = table.chains[base]
            .base
            .as_ref()
            .is_some_and(|b| b.kind == ChainType::Nat);
        let mut work = vec![Task {
            frames: vec![Frame {
                chain: base,
                rule: 0,
            }],
            path,
            stmt: 0,
        }];
        while let Some(mut task) = work.pop() {
            loop {
                self.steps += 1;
                if self.steps > MAX_STEPS || task.frames.len() > MAX_DEPTH {
                    self.exhausted = true;
                    return;
                }
                let Some(frame) = task.frames.last() else {
                    break;
                };
                let chain = &table.chains[frame.chain];
                if frame.rule >= chain.rules.len() {
                    task.frames.pop();
                    task.stmt = 0;
                    if task.frames.is_empty() {
                        let end = match policy {
                            Some(Policy::Drop) => End::Drop(self.policy_ref(ti, base)),
                            _ => End::Accept(None),
                        };
                        out.push((task.path, end));
                        break;
                    }
                    continue;
                }
                let (ci, ri) = (frame.chain, frame.rule);
                match self.exec_rule(p, dir, ti, ci, ri, nat, &mut task, &mut work, out) {
                    Flow::NextRule => {
                        if let Some(f) = task.frames.last_mut() {
                            f.rule += 1;
                        }
                        task.stmt = 0;
                    }
                    Flow::Entered => task.stmt = 0,
                    Flow::Done => break,
                }
            }
            if self.exhausted {
                return;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn exec_rule(
        &mut self,
        p: &Packet,
        dir: Dir,
        ti: usize,
        ci: usize,
        ri: usize,
        nat: bool,
        task: &mut Task,
        work: &mut Vec<Task>,
        out: &mut Vec<(Path, End)>,
    ) -> Flow {
        let tables = self.tables;
        let table = &tables[ti];
        let rule = &table.chains[ci].rules[ri];
        // A rule with only matches (a counter, a log whose target the model dropped)
        // changes nothing: skip it instead of splitting on its matches.
        if task.stmt == 0
            && !rule.stmts.iter().any(|s| {
                matches!(
                    s,
                    Stmt::Verdict(_)
                        | Stmt::Nat { .. }
                        | Stmt::SetMark(_)
                        | Stmt::MarkBits { .. }
                        | Stmt::Notrack
                        | Stmt::VerdictMap { .. }
                )
            })
        {
            return Flow::NextRule;
        }
        while task.stmt < rule.stmts.len() {
            let stmt = &rule.stmts[task.stmt];
            task.stmt += 1;
            let test = match stmt {
                Stmt::Match {
                    key,
                    negate,
                    values,
                } => self.decide(p, dir, &task.path, key, *negate, values),
                Stmt::Opaque { .. } => {
                    let id = self.atom(stmt, ti, ci, ri);
                    Test::Cond(Cond {
                        dim: Dim::Atom(id),
                        negate: false,
                        values: Vec::new().into(),
                    })
                }
                Stmt::Limit { text, over } => {
                    let id = match self.rates.iter().position(|r| r == text) {
                        Some(i) => i,
                        None => {
                            self.rates.push(text.clone());
                            self.rates.len() - 1
                        }
                    };
                    Test::Cond(Cond {
                        dim: Dim::Rate(id),
                        negate: *over,
                        values: Vec::new().into(),
                    })
                }
                Stmt::Fixed { holds, .. } => Test::Known(*holds),
                Stmt::SetMark(m) => {
                    task.path.mark = *m;
                    continue;
                }
                Stmt::MarkBits { and, or, xor } => {
                    task.path.mark = ((task.path.mark & and) | or) ^ xor;
                    continue;
                }
                Stmt::Notrack => {
                    task.path.ct_state = "untracked";
                    continue;
                }
                Stmt::Nat { kind, to, port } => {
                    if !nat || matches!(dir, Dir::Reply | Dir::ForwardReply) {
                        continue;
                    }
                    if dir == Dir::Forward {
                        // Postrouting SNAT/masquerade of the forwarded packet: no effect
                        // on whether it arrives.
                        out.push((task.path.clone(), End::Accept(None)));
                        return Flow::Done;
                    }
                    let rule_ref = self.rule_ref(ti, ci, ri);
                    let end = match kind {
                        NatKind::Snat => End::Accept(None),
                        // A redirect without a port keeps it; one to a port range
                        // (`to` names it, `port` is None) may move it.
                        NatKind::Redirect
                            if (port.is_none() && to.is_empty()) || *port == p.port =>
                        {
                            End::Accept(Some(rule_ref))
                        }
                        NatKind::Dnat if dnat_is_noop(to, *port, p) => End::Accept(Some(rule_ref)),
                        _ => End::Divert(rule_ref, to.clone()),
                    };
                    out.push((task.path.clone(), end));
                    return Flow::Done;
                }
                Stmt::VerdictMap { .. } => continue, // expanded in `Evaluator::new`
                Stmt::Verdict(v) => return self.verdict(v, ti, ci, ri, task, out),
            };
            let test = match test {
                Test::Undecidable => Test::Cond(Cond {
                    dim: Dim::Atom(self.atom(stmt, ti, ci, ri)),
                    negate: false,
                    values: Vec::new().into(),
                }),
                other => other,
            };
            match test {
                Test::Undecidable => {}
                Test::Known(true) => {}
                Test::Known(false) => return Flow::NextRule,
                Test::Cond(cond) => {
                    let (yes, no) = self.split(task.path.clone(), &cond);
                    if let Some(no) = no {
                        work.push(Task {
                            frames: task
                                .frames
                                .iter()
                                .enumerate()
                                .map(|(i, f)| Frame {
                                    chain: f.chain,
                                    rule: if i + 1 == task.frames.len() {
                                        f.rule + 1
                                    } else {
                                        f.rule
                                    },
                                })
                                .collect(),
                            path: no,
                            stmt: 0,
                        });
                    }
                    match yes {
                        Some(yes) => task.path = yes,
                        None => return Flow::Done,
                    }
                }
            }
        }
        Flow::NextRule
    }

    fn verdict(
        &mut self,
        v: &Verdict,
        ti: usize,
        ci: usize,
        ri: usize,
        task: &mut Task,
        out: &mut Vec<(Path, End)>,
    ) -> Flow {
        let table = &self.tables[ti];
        match v {
            Verdict::Accept => {
                out.push((
                    task.path.clone(),
                    End::Accept(Some(self.rule_ref(ti, ci, ri))),
                ));
                Flow::Done
            }
            Verdict::Drop | Verdict::Reject(_) => {
                out.push((task.path.clone(), End::Drop(self.rule_ref(ti, ci, ri))));
                Flow::Done
            }
            Verdict::Continue => Flow::NextRule,
            Verdict::Return => {
                task.frames.pop();
                if task.frames.is_empty() {
                    // `return` in a base chain: its policy. Re-enter an empty frame past
                    // the end so the caller's loop applies it.
                    task.frames.push(Frame {
                        chain: ci,
                        rule: usize::MAX,
                    });
                }
                // The caller's frame already points past the jump (see Jump below).
                Flow::Entered
            }
            Verdict::Jump(name) | Verdict::Goto(name) => {
                let Some(target) = table.chains.iter().position(|c| &c.name == name) else {
                    // nft refuses a jump to a missing chain; an iptables text could name
                    // one. Treat it like an undecidable drop.
                    return Flow::NextRule;
                };
                if matches!(v, Verdict::Goto(_)) {
                    if let Some(f) = task.frames.last_mut() {
                        *f = Frame {
                            chain: target,
                            rule: 0,
                        };
                    }
                } else {
                    // Where the return lands: after this rule (and after every piece of
                    // an expanded verdict map, which share the handle).
                    if let Some(f) = task.frames.last_mut() {
                        f.rule = last_piece(&table.chains[ci].rules, ri);
                    }
                    task.frames.push(Frame {
                        chain: target,
                        rule: 0,
                    });
                }
                Flow::Entered
            }
        }
    }

    /// The atom "this ingress chain's devices include the packet's": an ingress chain
    /// whose devices the reader could not learn.
    fn chain_atom(&mut self, ti: usize, ci: usize) -> usize {
        let chain = &self.tables[ti].chains[ci];
        let id = chain as *const _ as usize;
        if let Some(i) = self.atoms.iter().position(|(k, _)| *k == id) {
            return i;
        }
        let t = &self.tables[ti];
        self.atoms.push((
            id,
            format!(
                "the devices of ingress chain {} {} {} (not in nft's JSON)",
                t.family.as_str(),
                t.name,
                chain.name
            ),
        ));
        self.atoms.len() - 1
    }

    fn atom(&mut self, stmt: &Stmt, ti: usize, ci: usize, ri: usize) -> usize {
        let id = stmt as *const Stmt as usize;
        if let Some(i) = self.atoms.iter().position(|(k, _)| *k == id) {
            return i;
        }
        let text = match stmt {
            Stmt::Opaque { text } => text.clone(),
            Stmt::Match {
                key: Key::HopLimit, ..
            } => "hop limit".to_owned(),
            Stmt::Match {
                key: Key::Iifname | Key::Oifname,
                ..
            } => "the interface towards the DNAT target (no route to it was read)".to_owned(),
            Stmt::Match {
                key: Key::Dport | Key::Sport,
                ..
            } => "the port of the DNAT target (the rule names none)".to_owned(),
            Stmt::Match { .. } => "a concatenated match over several unknowns".to_owned(),
            _ => "a map lookup".to_owned(),
        };
        let text = format!("`{text}` in {}", self.rule_ref(ti, ci, ri));
        self.atoms.push((id, text));
        self.atoms.len() - 1
    }

    /// Known outcome, or a condition on an unknown.
    fn decide(
        &self,
        p: &Packet,
        dir: Dir,
        path: &Path,
        key: &Key,
        negate: bool,
        values: &[Value],
    ) -> Test {
        let known = |hit: bool| Test::Known(hit != negate);
        let cond = |dim: Dim| {
            Test::Cond(Cond {
                dim,
                negate,
                values: values.into(),
            })
        };
        let has_ports = matches!(p.l4, 6 | 17 | 132 | 33 | 136);
        match key {
            Key::L4proto => known(values.iter().any(|v| num_in(v, p.l4))),
            Key::Nfproto => {
                let me = if self.v6 { ("ipv6", 10) } else { ("ipv4", 2) };
                known(values.iter().any(|v| match v {
                    Value::Name(n) => n == me.0,
                    other => num_in(other, me.1),
                }))
            }
            // A port match implies a protocol with ports: on ICMP it never matches,
            // negated or not.
            Key::Dport | Key::Sport if !has_ports => Test::Known(false),
            Key::Dport => match (dir, p.port, &self.fwd) {
                (Dir::In, Some(port), _) => {
                    known(values.iter().any(|v| num_in(v, u64::from(port))))
                }
                (Dir::Forward, _, Some(f)) => match f.port.or(p.port) {
                    Some(port) => known(values.iter().any(|v| num_in(v, u64::from(port)))),
                    None => Test::Undecidable,
                },
                _ => cond(Dim::Sport),
            },
            Key::Sport => match (dir, p.port, &self.fwd) {
                (Dir::Reply, Some(port), _) => {
                    known(values.iter().any(|v| num_in(v, u64::from(port))))
                }
                (Dir::ForwardReply, _, Some(f)) => match f.port.or(p.port) {
                    Some(port) => known(values.iter().any(|v| num_in(v, u64::from(port)))),
                    None => Test::Undecidable,
                },
                _ => cond(Dim::Sport),
            },
            Key::Saddr | Key::Daddr => {
                // `ip saddr` never matches an IPv6 packet, negated or not.
                if !values.iter().any(|v| self.same_family(v)) && !values.is_empty() {
                    return Test::Known(false);
                }
                let source = *key == Key::Saddr;
                match (dir, &self.fwd) {
                    // The target's address is known on the forward path.
                    (Dir::Forward, Some(f)) if !source => {
                        known(values.iter().any(|v| addr_in(v, f.addr)))
                    }
                    (Dir::ForwardReply, Some(f)) if source => {
                        known(values.iter().any(|v| addr_in(v, f.addr)))
                    }
                    (Dir::Forward | Dir::ForwardReply, _) => cond(Dim::Saddr),
                    (Dir::In, _) => cond(if source { Dim::Saddr } else { Dim::Daddr }),
                    (Dir::Reply, _) => cond(if source { Dim::Daddr } else { Dim::Saddr }),
                }
            }
            Key::Iifname => match dir {
                Dir::In | Dir::Forward => cond(Dim::Iif),
                // A locally generated reply has no input interface: no match either way.
                Dir::Reply => Test::Known(false),
                Dir::ForwardReply => self.oif_is(values, negate),
            },
            Key::Oifname => match dir {
                Dir::In => Test::Known(false),
                Dir::Reply | Dir::ForwardReply => cond(Dim::Iif),
                Dir::Forward => self.oif_is(values, negate),
            },
            Key::CtState => known(values.iter().any(|v| name_is(v, path.ct_state))),
            Key::CtStatus => {
                let dnat = path.dnat.is_some() || self.fwd.is_some();
                known(values.iter().any(|v| dnat && name_is(v, "dnat")))
            }
            Key::IcmpType { v6 } => match p.icmp {
                Some(t) if *v6 == self.v6 => known(values.iter().any(|v| num_in(v, t))),
                _ => Test::Known(false),
            },
            Key::FibDaddrType => match dir {
                Dir::In => known(values.iter().any(|v| name_is(v, p.fib_type))),
                Dir::Reply | Dir::Forward | Dir::ForwardReply => {
                    known(values.iter().any(|v| name_is(v, "unicast")))
                }
            },
            Key::Mark => known(values.iter().any(|v| num_in(v, path.mark))),
            // The request is a SYN, the reply a SYN-ACK; only TCP has flags.
            Key::TcpFlags(mask) => {
                if p.l4 != 6 {
                    return Test::Known(false);
                }
                let flags: u64 = match dir {
                    Dir::In | Dir::Forward => 0x02,
                    Dir::Reply | Dir::ForwardReply => 0x12,
                };
                known(values.iter().any(|v| num_in(v, flags & mask)))
            }
            Key::CtDirection => {
                let d = match dir {
                    Dir::In | Dir::Forward => "original",
                    Dir::Reply | Dir::ForwardReply => "reply",
                };
                known(values.iter().any(|v| name_is(v, d)))
            }
            Key::MarkMasked(mask) => known(values.iter().any(|v| num_in(v, path.mark & mask))),
            Key::HopLimit => match p.hop_limit {
                Some(h) if dir == Dir::In => known(values.iter().any(|v| num_in(v, h))),
                // A client's hop limit depends on its distance.
                _ => Test::Undecidable,
            },
            Key::Concat(keys) => self.decide_concat(p, dir, path, keys, negate, values),
        }
    }

    /// A concatenation: elements whose known parts do not match are out; if one of the
    /// rest has no unknown part the match holds; if all of the rest vary in the same one
    /// unknown, it is a condition on that; anything else is undecidable.
    fn decide_concat(
        &self,
        p: &Packet,
        dir: Dir,
        path: &Path,
        keys: &[Key],
        negate: bool,
        values: &[Value],
    ) -> Test {
        let mut dim_values: Option<(Dim, Vec<Value>)> = None;
        let mut mixed = false;
        for v in values {
            let Value::Tuple(parts) = v else { continue };
            if parts.len() != keys.len() {
                continue;
            }
            let mut fits = true;
            let mut unknown: Vec<(Dim, Value)> = Vec::new();
            for (k, part) in keys.iter().zip(parts) {
                match self.decide(p, dir, path, k, false, std::slice::from_ref(part)) {
                    Test::Known(true) => {}
                    Test::Known(false) => {
                        fits = false;
                        break;
                    }
                    Test::Cond(c) => unknown.push((c.dim, part.clone())),
                    Test::Undecidable => return Test::Undecidable,
                }
            }
            if !fits {
                continue;
            }
            match unknown.as_slice() {
                [] => return Test::Known(!negate),
                [(dim, value)] => match &mut dim_values {
                    None => dim_values = Some((*dim, vec![value.clone()])),
                    Some((d, vals)) if d == dim => vals.push(value.clone()),
                    Some(_) => mixed = true,
                },
                _ => mixed = true,
            }
        }
        if mixed {
            return Test::Undecidable;
        }
        match dim_values {
            None => Test::Known(negate),
            Some((dim, values)) => Test::Cond(Cond {
                dim,
                negate,
                values: values.into(),
            }),
        }
    }

    /// A match on the interface that leads to a DNAT target.
    fn oif_is(&self, values: &[Value], negate: bool) -> Test {
        match self.fwd.as_ref().and_then(|f| f.oif.as_deref()) {
            Some(oif) => Test::Known(
                values
                    .iter()
                    .any(|v| matches!(v, Value::Name(p) if name_matches(p, oif)))
                    != negate,
            ),
            None => Test::Undecidable,
        }
    }

    fn same_family(&self, v: &Value) -> bool {
        match v {
            Value::V4(..) => !self.v6,
            Value::V6(..) => self.v6,
            _ => false,
        }
    }

    /// The path with `cond` assumed, and the path with its negation, each when possible.
    /// The path is cloned only when both are.
    fn split(&self, path: Path, cond: &Cond) -> (Option<Path>, Option<Path>) {
        let mut neg = cond.clone();
        neg.negate = !neg.negate;
        if cond.dim.is_interval() {
            let current = path
                .sets
                .iter()
                .find(|(d, _)| *d == cond.dim)
                .map_or_else(|| self.domain(cond.dim), |(_, set)| set.clone());
            let vals = self.intervals(cond.dim, &cond.values);
            let inside = intersect(&current, &vals);
            let outside = subtract(&current, &vals);
            let with = |mut p: Path, c: Cond, set: Vec<(u128, u128)>| {
                match p.sets.iter_mut().find(|(d, _)| *d == c.dim) {
                    Some((_, s)) => *s = set,
                    None => p.sets.push((c.dim, set)),
                }
                p.conds.push(c);
                p
            };
            let (yes_set, no_set) = if cond.negate {
                (outside, inside)
            } else {
                (inside, outside)
            };
            return match (yes_set.is_empty(), no_set.is_empty()) {
                (false, false) => (
                    Some(with(path.clone(), cond.clone(), yes_set)),
                    Some(with(path, neg, no_set)),
                ),
                (false, true) => (Some(with(path, cond.clone(), yes_set)), None),
                (true, false) => (None, Some(with(path, neg, no_set))),
                (true, true) => (None, None),
            };
        }
        let yes_ok = self.feasible(&path.conds, cond);
        let no_ok = self.feasible(&path.conds, &neg);
        match (yes_ok, no_ok) {
            (true, true) => {
                let mut yes = path.clone();
                yes.conds.push(cond.clone());
                let mut no = path;
                no.conds.push(neg);
                (Some(yes), Some(no))
            }
            (true, false) => {
                let mut yes = path;
                yes.conds.push(cond.clone());
                (Some(yes), None)
            }
            (false, true) => {
                let mut no = path;
                no.conds.push(neg);
                (None, Some(no))
            }
            (false, false) => (None, None),
        }
    }

    /// Non-interval dimensions (interfaces, rates, atoms): can `new` hold with `conds`?
    fn feasible(&self, conds: &[Cond], new: &Cond) -> bool {
        let same: Vec<&Cond> = conds
            .iter()
            .filter(|c| c.dim == new.dim)
            .chain(std::iter::once(new))
            .collect();
        match new.dim {
            Dim::Rate(_) | Dim::Atom(_) => same.iter().all(|c| c.negate == new.negate),
            Dim::Iif => names_feasible(&same),
            Dim::Saddr | Dim::Daddr | Dim::Sport => {
                let mut set = self.domain(new.dim);
                for c in &same {
                    let vals = self.intervals(c.dim, &c.values);
                    set = if c.negate {
                        subtract(&set, &vals)
                    } else {
                        intersect(&set, &vals)
                    };
                    if set.is_empty() {
                        return false;
                    }
                }
                true
            }
        }
    }

    fn domain(&self, dim: Dim) -> Vec<(u128, u128)> {
        match dim {
            Dim::Sport => vec![(1, 65535)],
            Dim::Saddr if self.v6 => {
                // Everything but ::1.
                vec![(0, 0), (2, u128::MAX)]
            }
            Dim::Saddr => vec![(0, 0x7eff_ffff), (0x8000_0000, u128::from(u32::MAX))],
            Dim::Daddr if self.daddrs.is_some() => self.daddrs.clone().unwrap_or_default(),
            _ if self.v6 => vec![(0, u128::MAX)],
            _ => vec![(0, u128::from(u32::MAX))],
        }
    }

    fn intervals(&self, dim: Dim, values: &[Value]) -> Vec<(u128, u128)> {
        let mut out: Vec<(u128, u128)> = values
            .iter()
            .filter_map(|v| match (dim, v) {
                (Dim::Sport, Value::Num(a, b)) => Some((u128::from(*a), u128::from(*b))),
                (Dim::Saddr | Dim::Daddr, Value::V4(a, b)) if !self.v6 => {
                    Some((u128::from(*a), u128::from(*b)))
                }
                (Dim::Saddr | Dim::Daddr, Value::V6(a, b)) if self.v6 => Some((*a, *b)),
                _ => None,
            })
            .collect();
        normalize(&mut out);
        out
    }
}

enum Test {
    Known(bool),
    Cond(Cond),
    /// A match on something the walk cannot know and the model cannot express as a
    /// condition: an atom of the rule that holds it.
    Undecidable,
}

fn addr_in(v: &Value, a: IpAddr) -> bool {
    match (v, a) {
        (Value::V4(lo, hi), IpAddr::V4(a)) => (*lo..=*hi).contains(&u32::from(a)),
        (Value::V6(lo, hi), IpAddr::V6(a)) => (*lo..=*hi).contains(&u128::from(a)),
        _ => false,
    }
}

/// `192.0.2.2:80`, `[2001:db8::2]:80`, `192.0.2.2` → address and port; `:8080` (a
/// redirect to a local port) and ranges → `None`.
fn parse_target(to: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(a) = to.parse::<IpAddr>() {
        return Some((a, None));
    }
    let (addr, port) = to.rsplit_once(':')?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    Some((addr.parse().ok()?, Some(port.parse().ok()?)))
}

/// The conntrack state of the reply: `established` for a tracked connection; for one
/// exempted by `notrack`, conntrack meets the reply first: a SYN-ACK with no connection is
/// `invalid`, a UDP answer is `new`.
fn reply_state(path: &Path, p: &Packet) -> &'static str {
    match (path.ct_state, p.l4) {
        ("untracked", 6) => "invalid",
        ("untracked", _) => "new",
        _ => "established",
    }
}

fn num_in(v: &Value, n: u64) -> bool {
    matches!(v, Value::Num(a, b) if *a <= n && n <= *b)
}

fn name_is(v: &Value, name: &str) -> bool {
    matches!(v, Value::Name(n) if n.eq_ignore_ascii_case(name))
}

/// nft writes an interface wildcard as `eth*` (iptables `eth+`, converted by its reader).
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if !prefix.ends_with('\\') => name.starts_with(prefix),
        _ => pattern.replace("\\*", "*") == name,
    }
}

/// Is there an interface name, other than `lo` (off-host packets never arrive on it),
/// that satisfies every condition?
fn names_feasible(conds: &[&Cond]) -> bool {
    let names = |c: &Cond| -> Vec<String> {
        c.values
            .iter()
            .filter_map(|v| match v {
                Value::Name(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    };
    let mut candidates: Vec<String> = Vec::new();
    for c in conds.iter().filter(|c| !c.negate) {
        for n in names(c) {
            match n.strip_suffix('*') {
                Some(prefix) => candidates.push(format!("{prefix}\u{1}")),
                None => candidates.push(n),
            }
        }
    }
    if candidates.is_empty() {
        candidates.push("\u{2}some interface".to_owned());
        // Every name a negative condition could exclude, so "anything but X" is found.
    }
    candidates.iter().any(|cand| {
        cand != "lo"
            && conds.iter().all(|c| {
                let hit = names(c).iter().any(|p| name_matches(p, cand));
                hit != c.negate
            })
    })
}

fn normalize(v: &mut Vec<(u128, u128)>) {
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for &(a, b) in v.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *v = out;
}

fn intersect(a: &[(u128, u128)], b: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    for &(a0, a1) in a {
        for &(b0, b1) in b {
            let (lo, hi) = (a0.max(b0), a1.min(b1));
            if lo <= hi {
                out.push((lo, hi));
            }
        }
    }
    normalize(&mut out);
    out
}

fn subtract(a: &[(u128, u128)], b: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = a.to_vec();
    for &(b0, b1) in b {
        let mut next = Vec::with_capacity(out.len() + 1);
        for (a0, a1) in out {
            if b1 < a0 || b0 > a1 {
                next.push((a0, a1));
                continue;
            }
            if a0 < b0 {
                next.push((a0, b0 - 1));
            }
            if b1 < a1 {
                next.push((b1 + 1, a1));
            }
        }
        out = next;
    }
    out
}

/// The index of the last rule that is a piece of the same expanded verdict map as `ri`
/// (the same rule otherwise), so a jump from it returns after the whole map.
fn last_piece(rules: &[Rule], ri: usize) -> usize {
    let mut end = ri;
    let is_piece = |r: &Rule| r.text == rules[ri].text && r.handle == rules[ri].handle;
    while end + 1 < rules.len() && is_piece(&rules[end + 1]) && rules[ri].handle.is_some() {
        end += 1;
    }
    end + 1
}

/// A DNAT to the listener's own address and port changes nothing.
fn dnat_is_noop(to: &str, port: Option<u16>, p: &Packet) -> bool {
    let addr = to
        .rsplit_once(':')
        .filter(|_| port.is_some())
        .map_or(to, |(a, _)| a)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if addr.is_empty() {
        // `DNAT --to-destination :PORT`: the address stays.
        return port.is_some() && port == p.port;
    }
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return false;
    };
    port.is_none_or(|port| Some(port) == p.port)
        && p.daddrs.as_ref().is_some_and(|d| d.contains(&addr))
}

impl Walker<'_> {
    /// Aggregates outcomes into an answer, for every assignment of the undecidable
    /// atoms met on the way; different answers ⇒ `unknown`, naming the atoms.
    fn conclude(&self, outcomes: &[Outcome]) -> Answer {
        let mut atoms: Vec<usize> = outcomes
            .iter()
            .flat_map(|o| o.conds.iter())
            .filter_map(|c| match c.dim {
                Dim::Atom(i) => Some(i),
                _ => None,
            })
            .collect();
        atoms.sort_unstable();
        atoms.dedup();
        if atoms.is_empty() {
            return self.aggregate(outcomes.iter());
        }
        if atoms.len() > MAX_ATOMS {
            return Answer::new(
                Effective::Unknown,
                format!(
                    "{} matches the agent cannot evaluate decide it, among them {}",
                    atoms.len(),
                    self.atoms[atoms[0]].1
                ),
            );
        }
        let mut seen: Vec<Answer> = Vec::new();
        for bits in 0u32..(1 << atoms.len()) {
            let holds = |i: usize| {
                atoms
                    .iter()
                    .position(|&a| a == i)
                    .is_some_and(|k| bits & (1 << k) != 0)
            };
            let answer = self.aggregate(outcomes.iter().filter(|o| {
                o.conds.iter().all(|c| match c.dim {
                    Dim::Atom(i) => holds(i) != c.negate,
                    _ => true,
                })
            }));
            if !seen
                .iter()
                .any(|s| s.verdict == answer.verdict && s.conditions == answer.conditions)
            {
                seen.push(answer);
            }
        }
        if seen.len() == 1 {
            return seen.remove(0);
        }
        let names: Vec<&str> = atoms.iter().map(|&i| self.atoms[i].1.as_str()).collect();
        let mut verdicts: Vec<&str> = seen.iter().map(|a| a.verdict.as_str()).collect();
        verdicts.dedup();
        Answer::new(
            Effective::Unknown,
            format!(
                "depends on {} (the agent cannot evaluate it; {} depending on it)",
                names.join(" and "),
                verdicts.join(" or ")
            ),
        )
    }

    fn aggregate<'o>(&self, outcomes: impl Iterator<Item = &'o Outcome>) -> Answer {
        let (mut accepts, mut drops, mut diverts) = (Vec::new(), Vec::new(), Vec::new());
        for o in outcomes {
            match &o.kind {
                Kind::Accept => accepts.push(o),
                Kind::Drop => drops.push(o),
                Kind::Divert(_) => diverts.push(o),
            }
        }
        if accepts.is_empty() && diverts.is_empty() {
            if drops.is_empty() {
                return Answer::new(Effective::Unknown, "no path through the ruleset");
            }
            // Every distinct reason, the most general (fewest conditions) first.
            drops.sort_by_key(|d| d.weight);
            let mut reasons: Vec<&str> = Vec::new();
            for d in &drops {
                if !reasons.contains(&d.reason.as_str()) {
                    reasons.push(&d.reason);
                }
            }
            let more = reasons.len().saturating_sub(3);
            reasons.truncate(3);
            let mut reason = reasons.join("; ");
            if more > 0 {
                let _ = write!(reason, "; and {more} more rules");
            }
            return Answer::new(Effective::Filtered, reason);
        }
        if accepts.is_empty() {
            let mut by: Vec<&str> = diverts.iter().map(|d| d.reason.as_str()).collect();
            by.sort_unstable();
            by.dedup();
            let mut answer = Answer::new(Effective::Diverted, by.join("; "));
            answer.diverted_to = diverted_to(&diverts);
            if let Some(d) = drops.first() {
                // Only some get through to the target: say which, and why the others not.
                let ways = self.simplify(diverts.iter().map(|o| o.conds.clone()).collect());
                answer.conditions = ways.iter().map(|c| self.render_conds(c)).collect();
                answer.conditions.sort_unstable();
                answer.conditions.dedup();
                let _ = write!(answer.reason, "; otherwise {}", d.reason);
            }
            return answer;
        }
        let accepted_by = |list: &[&Outcome]| {
            let mut r: Vec<&str> = list
                .iter()
                .map(|o| o.reason.as_str())
                .filter(|r| !r.is_empty())
                .collect();
            r.sort_unstable();
            r.dedup();
            if r.is_empty() {
                "no rule stops it (policy accept)".to_owned()
            } else {
                r.join("; ")
            }
        };
        if drops.is_empty() && diverts.is_empty() {
            return Answer::new(Effective::Open, accepted_by(&accepts));
        }
        let ways = self.simplify(accepts.iter().map(|o| o.conds.clone()).collect());
        let mut conditions: Vec<String> = ways.iter().map(|c| self.render_conds(c)).collect();
        conditions.sort_unstable();
        conditions.dedup();
        let mut reason = accepted_by(&accepts);
        if let Some(d) = diverts.first() {
            let _ = write!(reason, "; otherwise diverted by {}", d.reason);
        }
        Answer {
            verdict: Effective::Restricted,
            reason,
            conditions,
            diverted_to: diverted_to(&diverts),
        }
    }

    /// The accepting paths as few, short conditions: conditions implied by the rest of
    /// their path go (`iifname != lo` after `iifname eth0`, or on its own: off-host
    /// traffic never arrives on `lo`), then two paths that differ only in one condition
    /// and its opposite merge, and a path implied by a more general one goes.
    fn simplify(&self, paths: Vec<Vec<Cond>>) -> Vec<Vec<Cond>> {
        let mut paths: Vec<Vec<Cond>> = paths
            .into_iter()
            .map(|mut conds| {
                conds.retain(|c| !matches!(c.dim, Dim::Atom(_)));
                conds = self.canonical(conds);
                let mut i = 0;
                while i < conds.len() {
                    let (c, rest) = (conds[i].clone(), [&conds[..i], &conds[i + 1..]].concat());
                    if self.implied(&rest, &c) {
                        conds.remove(i);
                    } else {
                        i += 1;
                    }
                }
                conds
            })
            .collect();
        'merge: loop {
            for i in 0..paths.len() {
                for j in 0..paths.len() {
                    if i == j {
                        continue;
                    }
                    // Same but for one number dimension: one path with the union.
                    if let Some(merged) = self.union_of(&paths[i], &paths[j]) {
                        paths[i] = merged;
                        paths.remove(j);
                        continue 'merge;
                    }
                    // Absorption: j's conditions imply all of i's (j is a special case).
                    if paths[i]
                        .iter()
                        .all(|c| paths[j].contains(c) || self.implied(&paths[j], c))
                    {
                        paths.remove(j);
                        continue 'merge;
                    }
                    // (A and x) or (B and not x), B weaker than A  ⇒  A or (B and not x).
                    let found = paths[i].iter().position(|x| {
                        paths[j]
                            .iter()
                            .any(|y| y.dim == x.dim && y.values == x.values && y.negate != x.negate)
                            && {
                                let a: Vec<&Cond> = paths[i].iter().filter(|c| *c != x).collect();
                                paths[j].iter().all(|b| {
                                    (b.dim == x.dim && b.values == x.values && b.negate != x.negate)
                                        || a.contains(&b)
                                })
                            }
                    });
                    if let Some(k) = found {
                        paths[i].remove(k);
                        continue 'merge;
                    }
                }
            }
            break;
        }
        paths
    }

    /// Do the conditions `rest` (of the same path) already imply `c`?
    fn implied(&self, rest: &[Cond], c: &Cond) -> bool {
        let same: Vec<&Cond> = rest.iter().filter(|r| r.dim == c.dim).collect();
        match c.dim {
            Dim::Rate(_) | Dim::Atom(_) => same.iter().any(|r| r.negate == c.negate),
            Dim::Iif => {
                let names = |c: &Cond| -> Vec<String> {
                    c.values
                        .iter()
                        .filter_map(|v| match v {
                            Value::Name(n) => Some(n.clone()),
                            _ => None,
                        })
                        .collect()
                };
                // The names the rest allows, when it pins them to literals.
                let literals: Vec<String> = same
                    .iter()
                    .filter(|r| !r.negate)
                    .flat_map(|r| names(r))
                    .filter(|n| !n.ends_with('*'))
                    .collect();
                let allowed: Vec<&String> = literals
                    .iter()
                    .filter(|n| {
                        *n != "lo"
                            && same
                                .iter()
                                .all(|r| names(r).iter().any(|p| name_matches(p, n)) != r.negate)
                    })
                    .collect();
                let hits = |n: &str| names(c).iter().any(|p| name_matches(p, n));
                // `!= {ct0, eth1}` implies `!= eth1`.
                if c.negate
                    && same
                        .iter()
                        .any(|r| r.negate && names(c).iter().all(|n| names(r).contains(n)))
                {
                    return true;
                }
                if same.iter().any(|r| !r.negate) && !literals.is_empty() {
                    allowed.iter().all(|n| hits(n) != c.negate)
                } else {
                    // Unbounded names: only `!= lo` is implied (the domain).
                    c.negate && names(c).iter().all(|n| n == "lo")
                }
            }
            Dim::Saddr | Dim::Daddr | Dim::Sport => {
                let mut set = self.domain(c.dim);
                for r in &same {
                    let vals = self.intervals(r.dim, &r.values);
                    set = if r.negate {
                        subtract(&set, &vals)
                    } else {
                        intersect(&set, &vals)
                    };
                }
                let vals = self.intervals(c.dim, &c.values);
                if c.negate {
                    intersect(&set, &vals).is_empty()
                } else {
                    subtract(&set, &vals).is_empty()
                }
            }
        }
    }

    /// A path's number conditions (addresses, ports) as one set per dimension: the
    /// domain intersected with and minus each; none when that is the whole domain.
    fn canonical(&self, conds: Vec<Cond>) -> Vec<Cond> {
        let mut sets: Vec<(Dim, Vec<(u128, u128)>)> = Vec::new();
        let mut out = Vec::new();
        for c in conds {
            if !c.dim.is_interval() {
                if !out.contains(&c) {
                    out.push(c);
                }
                continue;
            }
            let vals = self.intervals(c.dim, &c.values);
            let at = match sets.iter().position(|(d, _)| *d == c.dim) {
                Some(at) => at,
                None => {
                    sets.push((c.dim, self.domain(c.dim)));
                    sets.len() - 1
                }
            };
            let set = &mut sets[at].1;
            *set = if c.negate {
                subtract(set, &vals)
            } else {
                intersect(set, &vals)
            };
        }
        for (dim, set) in sets {
            if set != self.domain(dim) {
                out.push(Cond {
                    dim,
                    negate: false,
                    values: self.values_of(dim, &set).into(),
                });
            }
        }
        out
    }

    fn values_of(&self, dim: Dim, set: &[(u128, u128)]) -> Vec<Value> {
        set.iter()
            .map(|&(lo, hi)| match dim {
                Dim::Sport => Value::Num(lo as u64, hi as u64),
                _ if self.v6 => Value::V6(lo, hi),
                _ => Value::V4(lo as u32, hi as u32),
            })
            .collect()
    }

    /// Two canonical paths equal but for the set of one number dimension: their union.
    fn union_of(&self, a: &[Cond], b: &[Cond]) -> Option<Vec<Cond>> {
        let only_a: Vec<&Cond> = a.iter().filter(|c| !b.contains(c)).collect();
        let only_b: Vec<&Cond> = b.iter().filter(|c| !a.contains(c)).collect();
        let (dim, sa, sb) = match (only_a.as_slice(), only_b.as_slice()) {
            ([x], [y]) if x.dim == y.dim && x.dim.is_interval() => (
                x.dim,
                self.intervals(x.dim, &x.values),
                self.intervals(y.dim, &y.values),
            ),
            _ => return None,
        };
        let mut union = [sa, sb].concat();
        normalize(&mut union);
        let mut out: Vec<Cond> = a.iter().filter(|c| c.dim != dim).cloned().collect();
        if union != self.domain(dim) {
            out.push(Cond {
                dim,
                negate: false,
                values: self.values_of(dim, &union).into(),
            });
        }
        Some(out)
    }

    fn render_conds(&self, conds: &[Cond]) -> String {
        let mut parts: Vec<String> = Vec::new();
        for c in conds {
            let mut op = if c.negate { " != " } else { " " };
            // A canonical set (see `canonical`) reads better as what it leaves out when
            // that is shorter: `saddr != 10.0.0.1, 10.0.0.2` rather than five ranges.
            let shown: Vec<Value>;
            let values = || -> String {
                let list: Vec<String> = c.values.iter().map(render_value).collect();
                list_text(&list)
            };
            let values: Box<dyn Fn() -> String> = if c.dim.is_interval() && !c.negate {
                let set = self.intervals(c.dim, &c.values);
                let rest = subtract(&self.domain(c.dim), &set);
                if rest.len() < set.len() {
                    op = " != ";
                    shown = self.values_of(c.dim, &rest);
                    Box::new(move || list_text(&shown.iter().map(render_value).collect::<Vec<_>>()))
                } else {
                    Box::new(values)
                }
            } else {
                Box::new(values)
            };
            let part = match c.dim {
                Dim::Saddr => format!("saddr{op}{}", values()),
                Dim::Daddr => format!("daddr{op}{}", values()),
                Dim::Sport => format!("sport{op}{}", values()),
                Dim::Iif => format!("iifname{op}{}", values()),
                Dim::Rate(i) => {
                    let text = self.rates.get(i).map_or("rate", String::as_str);
                    if c.negate {
                        format!("not {text}")
                    } else {
                        text.trim_start_matches("limit ").to_owned()
                    }
                }
                Dim::Atom(_) => continue,
            };
            if !parts.contains(&part) {
                parts.push(part);
            }
        }
        if parts.is_empty() {
            "some traffic".to_owned()
        } else {
            parts.join(" and ")
        }
    }
}

/// A list of values for a condition, at most eight of them named.
fn list_text(list: &[String]) -> String {
    if list.len() <= 8 {
        return list.join(", ");
    }
    format!("{}, … ({} in all)", list[..8].join(", "), list.len())
}

fn diverted_to(diverts: &[&Outcome]) -> Option<String> {
    let mut to: Vec<&str> = diverts
        .iter()
        .filter_map(|d| match &d.kind {
            Kind::Divert(to) => Some(to.as_str()),
            _ => None,
        })
        .collect();
    to.sort_unstable();
    to.dedup();
    (!to.is_empty()).then(|| to.join(", "))
}

/// A value as nft prints it: prefixes where the range is one, `a-b` otherwise.
pub(crate) fn render_value(v: &Value) -> String {
    fn prefix_len(lo: u128, hi: u128, bits: u32) -> Option<u32> {
        let size = hi.checked_sub(lo)?.checked_add(1);
        match size {
            None => Some(0), // the whole 128-bit space
            Some(size) if size.is_power_of_two() && lo.is_multiple_of(size) => {
                Some(bits - size.trailing_zeros())
            }
            _ => None,
        }
    }
    match v {
        Value::Num(a, b) if a == b => a.to_string(),
        Value::Num(a, b) => format!("{a}-{b}"),
        Value::V4(a, b) => {
            let ip = |x: u32| std::net::Ipv4Addr::from(x).to_string();
            match prefix_len(u128::from(*a), u128::from(*b), 32) {
                Some(32) => ip(*a),
                Some(len) => format!("{}/{len}", ip(*a)),
                None => format!("{}-{}", ip(*a), ip(*b)),
            }
        }
        Value::V6(a, b) => {
            let ip = |x: u128| std::net::Ipv6Addr::from(x).to_string();
            match prefix_len(*a, *b, 128) {
                Some(128) => ip(*a),
                Some(len) => format!("{}/{len}", ip(*a)),
                None => format!("{}-{}", ip(*a), ip(*b)),
            }
        }
        Value::Name(n) => n.clone(),
        Value::Tuple(parts) => parts
            .iter()
            .map(render_value)
            .collect::<Vec<_>>()
            .join(" . "),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::firewall::model::Table;
    use crate::firewall::nft_json;

    fn ruleset(case: &str) -> Ruleset {
        let path = format!(
            "{}/tests/data/firewall/{case}/captured.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let tables: Vec<Table> = nft_json::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        Ruleset { tables }
    }

    fn nft(text: &str) -> Ruleset {
        Ruleset {
            tables: nft_json::parse(text).unwrap(),
        }
    }

    fn question(spec: &str, v6: bool) -> Question {
        let (proto, port) = spec.split_once(':').unwrap();
        Question {
            tcp: proto == "tcp",
            port: port.parse().unwrap(),
            v6,
            daddrs: if v6 {
                vec![
                    "2001:db8:100::10".parse().unwrap(),
                    "2001:db8:200::10".parse().unwrap(),
                ]
            } else {
                vec![
                    "198.51.100.10".parse().unwrap(),
                    "203.0.113.10".parse().unwrap(),
                ]
            },
        }
    }

    /// `expected`: "v4 verdict / v6 verdict", with restricted conditions in brackets.
    fn check(rs: &Ruleset, spec: &str, expected: &str) {
        let mut ev = Evaluator::new(rs);
        let show = |a: &Answer| {
            if a.conditions.is_empty() {
                a.verdict.as_str().to_owned()
            } else {
                format!("{}[{}]", a.verdict.as_str(), a.conditions.join(" | "))
            }
        };
        let v4 = ev.answer(&question(spec, false));
        let v6 = ev.answer(&question(spec, true));
        let got = format!("{} / {}", show(&v4), show(&v6));
        assert_eq!(got, expected, "{spec}: v4 {v4:?}\n v6 {v6:?}");
    }

    #[test]
    fn captured_native_rulesets() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "c01-empty",
                &[("tcp:22", "open / open"), ("udp:53", "open / open")],
            ),
            (
                "c02-policy-drop-ssh",
                &[
                    ("tcp:22", "open / open"),
                    ("tcp:80", "filtered / filtered"),
                    ("udp:53", "filtered / filtered"),
                ],
            ),
            (
                "c03-forgot-icmpv6",
                &[
                    ("tcp:22", "open / filtered"),
                    ("tcp:80", "filtered / filtered"),
                ],
            ),
            (
                "c04-ip-family-only",
                &[
                    ("tcp:22", "open / open"),
                    ("tcp:80", "filtered / open"),
                    ("udp:53", "filtered / open"),
                ],
            ),
            (
                "c05-drop-vs-reject",
                &[
                    ("tcp:22", "open / open"),
                    ("tcp:80", "filtered / filtered"),
                    ("tcp:443", "filtered / filtered"),
                    ("tcp:8443", "filtered / filtered"),
                    ("udp:53", "filtered / filtered"),
                ],
            ),
            (
                "c06-per-source",
                &[
                    ("tcp:22", "open / open"),
                    (
                        "tcp:5432",
                        "restricted[saddr 198.51.100.0/24] / restricted[saddr 2001:db8:100::/64]",
                    ),
                ],
            ),
            (
                "c07-per-interface",
                &[
                    ("tcp:22", "open / open"),
                    (
                        "tcp:9100",
                        "restricted[iifname eth0] / restricted[iifname eth0]",
                    ),
                ],
            ),
            (
                "c08-interval-set",
                &[
                    ("tcp:22", "filtered / filtered"),
                    ("tcp:80", "open / open"),
                    ("tcp:443", "open / open"),
                    ("tcp:3000", "filtered / filtered"),
                    ("tcp:8080", "open / open"),
                    ("tcp:8443", "open / open"),
                    ("udp:53", "open / open"),
                    ("udp:123", "open / open"),
                ],
            ),
            (
                "c11-two-tables",
                &[
                    ("tcp:22", "open / open"),
                    ("tcp:8080", "filtered / filtered"),
                ],
            ),
            (
                "c12-prerouting-raw",
                &[
                    ("tcp:22", "open / open"),
                    ("tcp:3000", "filtered / filtered"),
                    ("udp:123", "filtered / filtered"),
                ],
            ),
            (
                "c20-firewalld",
                &[
                    ("tcp:22", "open / open"),
                    ("tcp:80", "filtered / filtered"),
                    ("tcp:5432", "restricted[saddr 198.51.100.0/24] / filtered"),
                    ("udp:546", "filtered / filtered"),
                ],
            ),
            (
                // Source zones before interface zones; mDNS only to its multicast group.
                "c42-firewalld-zones",
                &[
                    ("tcp:22", "open / open"),
                    ("tcp:80", "restricted[saddr 198.51.100.0/24] / filtered"),
                    (
                        "tcp:5432",
                        "restricted[iifname eth1 and saddr != 198.51.100.0/24] / \
                         restricted[iifname eth1 and saddr != 2001:db8:100::/64]",
                    ),
                    ("tcp:8080", "filtered / restricted[saddr 2001:db8:100::/64]"),
                    ("udp:546", "filtered / filtered"),
                    ("udp:5353", "filtered / filtered"),
                ],
            ),
        ];
        for (case, checks) in cases {
            let rs = ruleset(case);
            for (spec, expected) in *checks {
                check(&rs, spec, expected);
            }
        }
    }

    #[test]
    fn firewalld_reasons_name_the_zone() {
        let mut ev = Evaluator::new(&ruleset("c42-firewalld-zones"));
        let a = ev.answer(&question("tcp:5432", false));
        assert!(
            a.reason
                .starts_with("firewalld zone internal: inet firewalld filter_IN_internal_allow"),
            "{}",
            a.reason
        );
        let a = ev.answer(&question("tcp:80", true));
        assert!(a.reason.starts_with("firewalld"), "{}", a.reason);
        // An open port's reason is the accept that let the SYN in, not the reply's.
        let a = ev.answer(&question("tcp:22", false));
        assert!(
            a.reason.contains("tcp dport 22 accept") && !a.reason.contains("filter_OUTPUT"),
            "{}",
            a.reason
        );
        assert_eq!(firewalld_zone("filter_INPUT_ZONES"), None);
        assert_eq!(firewalld_zone("filter_INPUT"), None);
        assert_eq!(
            firewalld_zone("filter_IN_policy_allow-host-ipv6_allow").as_deref(),
            Some("firewalld policy allow-host-ipv6")
        );
        assert_eq!(
            firewalld_zone("nat_PRE_my_zone").as_deref(),
            Some("firewalld zone my_zone")
        );
    }

    #[test]
    fn reasons_name_the_deciding_rule_or_policy() {
        let mut ev = Evaluator::new(&ruleset("c02-policy-drop-ssh"));
        let a = ev.answer(&question("tcp:80", false));
        assert_eq!(a.reason, "policy drop of inet filter input");
        let a = ev.answer(&question("tcp:22", false));
        assert_eq!(a.reason, "inet filter input handle 8: tcp dport 22 accept");
        let mut ev = Evaluator::new(&ruleset("c03-forgot-icmpv6"));
        let a = ev.answer(&question("tcp:22", true));
        assert!(a.reason.contains("neighbour discovery"), "{}", a.reason);
        let mut ev = Evaluator::new(&ruleset("c12-prerouting-raw"));
        let a = ev.answer(&question("tcp:3000", false));
        assert_eq!(a.reason, "inet raw pre handle 2: tcp dport 3000 drop");
    }

    const HEAD: &str = r#"{"nftables":[{"table":{"family":"inet","name":"f"}},
        {"chain":{"family":"inet","table":"f","name":"in","type":"filter","hook":"input","prio":0,"policy":"POLICY"}},
        {"chain":{"family":"inet","table":"f","name":"out","type":"filter","hook":"output","prio":0,"policy":"accept"}},
        {"chain":{"family":"inet","table":"f","name":"sub"}},
        {"chain":{"family":"inet","table":"f","name":"pre","type":"nat","hook":"prerouting","prio":-100,"policy":"accept"}}"#;

    fn rules(policy: &str, rules: &[(&str, &str)]) -> Ruleset {
        let mut s = HEAD.replace("POLICY", policy);
        for (i, (chain, expr)) in rules.iter().enumerate() {
            s.push_str(&format!(
                r#",{{"rule":{{"family":"inet","table":"f","chain":"{chain}","handle":{},"expr":{expr}}}}}"#,
                i + 10
            ));
        }
        s.push_str("]}");
        nft(&s)
    }

    const ND: (&str, &str) = (
        "in",
        r#"[{"match":{"op":"==","left":{"payload":{"protocol":"icmpv6","field":"type"}},"right":{"set":["nd-neighbor-solicit","nd-neighbor-advert"]}}},{"accept":null}]"#,
    );
    const DPORT: &str = r#"{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":PORT}}"#;

    fn dport(p: u16) -> String {
        DPORT.replace("PORT", &p.to_string())
    }

    #[test]
    fn synthetic_rulesets() {
        // Rate limit: restricted by the rate.
        let rs = rules(
            "drop",
            &[
                ND,
                (
                    "in",
                    &format!(
                        r#"[{},{{"limit":{{"rate":2,"per":"minute"}}}},{{"accept":null}}]"#,
                        dport(9000)
                    ),
                ),
            ],
        );
        check(
            &rs,
            "tcp:9000",
            "restricted[rate 2/minute] / restricted[rate 2/minute]",
        );
        // Source port (DHCP-style): restricted to that source port; UDP only.
        let rs = rules(
            "drop",
            &[
                ND,
                (
                    "in",
                    r#"[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"sport"}},"right":67}},{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":68}},{"accept":null}]"#,
                ),
            ],
        );
        check(&rs, "udp:68", "restricted[sport 67] / restricted[sport 67]");
        check(&rs, "tcp:68", "filtered / filtered");
        // `tcp dport 53 drop` does not touch UDP 53.
        let rs = rules(
            "accept",
            &[("in", &format!(r#"[{},{{"drop":null}}]"#, dport(53)))],
        );
        check(&rs, "udp:53", "open / open");
        check(&rs, "tcp:53", "filtered / filtered");
        // Jump and return: the sub-chain's accept, or back to the policy.
        let rs = rules(
            "drop",
            &[
                ND,
                ("in", r#"[{"jump":{"target":"sub"}}]"#),
                ("sub", &format!(r#"[{},{{"return":null}}]"#, dport(80))),
                ("sub", &format!(r#"[{},{{"accept":null}}]"#, dport(81))),
            ],
        );
        check(&rs, "tcp:80", "filtered / filtered");
        check(&rs, "tcp:81", "open / open");
        // A reply path drop filters the port.
        let rs = rules(
            "accept",
            &[(
                "out",
                r#"[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"sport"}},"right":8080}},{"drop":null}]"#,
            )],
        );
        check(&rs, "tcp:8080", "filtered / filtered");
        check(&rs, "tcp:8081", "open / open");
        let mut ev = Evaluator::new(&rs);
        assert!(
            ev.answer(&question("tcp:8080", false))
                .reason
                .starts_with("the reply is dropped by")
        );
        // DNAT of the port in prerouting (an inet chain: both versions take it; nothing
        // on the forward path stops it).
        let rs = rules(
            "accept",
            &[(
                "pre",
                &format!(
                    r#"[{},{{"dnat":{{"family":"ip","addr":"192.0.2.2","port":80}}}}]"#,
                    dport(8080)
                ),
            )],
        );
        check(&rs, "tcp:8080", "diverted / diverted");
        let mut ev = Evaluator::new(&rs);
        assert_eq!(
            ev.answer(&question("tcp:8080", false))
                .diverted_to
                .as_deref(),
            Some("192.0.2.2:80")
        );
        // An undecidable match that decides: unknown, never open.
        let rs = rules(
            "drop",
            &[
                ND,
                (
                    "in",
                    &format!(
                        r#"[{{"match":{{"op":"==","left":{{"meta":{{"key":"cpu"}}}},"right":0}}}},{},{{"accept":null}}]"#,
                        dport(5000)
                    ),
                ),
            ],
        );
        check(&rs, "tcp:5000", "unknown / unknown");
        check(&rs, "tcp:5001", "filtered / filtered");
        let mut ev = Evaluator::new(&rs);
        assert!(
            ev.answer(&question("tcp:5000", false))
                .reason
                .contains("meta cpu")
        );
        // Negated interface and contradicting interfaces on one path.
        let rs = rules(
            "drop",
            &[
                ND,
                (
                    "in",
                    r#"[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth0"}},{"jump":{"target":"sub"}}]"#,
                ),
                (
                    "sub",
                    r#"[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"eth1"}},{"accept":null}]"#,
                ),
                (
                    "in",
                    r#"[{"match":{"op":"!=","left":{"meta":{"key":"iifname"}},"right":"eth9"}},{"accept":null}]"#,
                ),
            ],
        );
        check(
            &rs,
            "tcp:1",
            "restricted[iifname != eth9] / restricted[iifname != eth9]",
        );
        // `iifname "lo" accept` alone is no way in from off-host.
        let rs = rules(
            "drop",
            &[
                ND,
                (
                    "in",
                    r#"[{"match":{"op":"==","left":{"meta":{"key":"iifname"}},"right":"lo"}},{"accept":null}]"#,
                ),
            ],
        );
        check(&rs, "tcp:1", "filtered / filtered");
        // Destination address of a wildcard listener: restricted to one local address.
        let rs = rules(
            "drop",
            &[
                ND,
                (
                    "in",
                    r#"[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"198.51.100.10"}},{"accept":null}]"#,
                ),
            ],
        );
        check(&rs, "tcp:1", "restricted[daddr 198.51.100.10] / filtered");
    }

    #[test]
    fn verdict_maps_and_concatenations() {
        let rs = rules(
            "drop",
            &[
                ND,
                (
                    "in",
                    r#"[{"vmap":{"key":{"payload":{"protocol":"tcp","field":"dport"}},"data":{"set":[[22,{"accept":null}],[8080,{"jump":{"target":"sub"}}]]}}}]"#,
                ),
                (
                    "sub",
                    r#"[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"198.51.100.0","len":24}}}},{"accept":null}]"#,
                ),
                (
                    "in",
                    r#"[{"match":{"op":"==","left":{"concat":[{"payload":{"protocol":"ip","field":"saddr"}},{"payload":{"protocol":"tcp","field":"dport"}}]},"right":{"set":[{"concat":[{"prefix":{"addr":"203.0.113.0","len":24}},5432]}]}}},{"accept":null}]"#,
                ),
            ],
        );
        check(&rs, "tcp:22", "open / open");
        check(
            &rs,
            "tcp:8080",
            "restricted[saddr 198.51.100.0/24] / filtered",
        );
        check(
            &rs,
            "tcp:5432",
            "restricted[saddr 203.0.113.0/24] / filtered",
        );
        check(&rs, "tcp:23", "filtered / filtered");
    }

    /// Thirty independent conditional jumps that return double the paths each time:
    /// bounded, and the answer says so instead of guessing.
    #[test]
    fn path_explosion_is_bounded() {
        let mut list = vec![ND];
        let mut exprs = Vec::new();
        for i in 0..30 {
            // Rates are independent of each other: every one doubles the paths.
            exprs.push(format!(
                r#"[{{"limit":{{"rate":{},"per":"second"}}}},{{"jump":{{"target":"sub"}}}}]"#,
                i + 1
            ));
        }
        // Forty ports the rules tell apart: forty walks, each past its own bound.
        for port in 2..42 {
            exprs.push(format!(r#"[{},{{"drop":null}}]"#, dport(port)));
        }
        for e in &exprs {
            list.push(("in", e.as_str()));
        }
        list.push(("sub", r#"[{"counter":null}]"#));
        let rs = rules("drop", &list);
        let mut ev = Evaluator::new(&rs);
        let a = ev.answer(&question("tcp:1", false));
        assert_eq!(a.verdict, Effective::Unknown, "{a:?}");
        assert!(a.reason.contains("too complex"), "{}", a.reason);
        let mut last = a;
        for port in 2..42 {
            last = ev.answer(&question(&format!("tcp:{port}"), false));
        }
        // The total budget holds (a count, not a time: these machines are noisy), and
        // what it cut off says so.
        assert!(ev.spent <= MAX_TOTAL_STEPS + MAX_STEPS, "{}", ev.spent);
        assert!(last.reason.contains("budget"), "{last:?}");
    }

    #[test]
    fn interval_arithmetic() {
        assert_eq!(subtract(&[(0, 10)], &[(3, 4)]), vec![(0, 2), (5, 10)]);
        assert_eq!(intersect(&[(0, 10)], &[(5, 20), (30, 40)]), vec![(5, 10)]);
        assert!(subtract(&[(5, 5)], &[(0, 10)]).is_empty());
        assert_eq!(
            render_value(&Value::V4(0xc633_6400, 0xc633_64ff)),
            "198.51.100.0/24"
        );
        assert_eq!(render_value(&Value::V6(0, u128::MAX)), "::/0");
        assert!(name_matches("eth*", "eth0") && !name_matches("eth*", "wlan0"));
    }
}
