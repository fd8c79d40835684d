//! The ruleset model: what the evaluator needs from a namespace's nftables and iptables
//! rules, whichever tool wrote them and whichever reader decoded them.
//!
//! Three readers fill it: `nft -j list ruleset` (native nftables, `nft_json.rs`),
//! `iptables-nft-save`/`ip6tables-nft-save` for the tables iptables-nft owns (their match
//! parameters are opaque in nft's JSON) and `iptables-legacy-save` for the legacy tables
//! (invisible to nft, yet they filter). Both iptables texts go through `ipt_save.rs`.
//!
//! The model keeps only what decides a verdict and what explains it: every rule keeps its
//! text as the operator would recognise it. A match no reader understands stays in the
//! model as [`Stmt::Opaque`]: the evaluator then computes both outcomes and answers
//! `unknown` when they differ, instead of guessing.

use std::fmt;

/// A table's address family (`nft` keyword).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableFamily {
    Ip,
    Ip6,
    Inet,
    Netdev,
    Bridge,
    Arp,
}

impl TableFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            TableFamily::Ip => "ip",
            TableFamily::Ip6 => "ip6",
            TableFamily::Inet => "inet",
            TableFamily::Netdev => "netdev",
            TableFamily::Bridge => "bridge",
            TableFamily::Arp => "arp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ip" => TableFamily::Ip,
            "ip6" => TableFamily::Ip6,
            "inet" => TableFamily::Inet,
            "netdev" => TableFamily::Netdev,
            "bridge" => TableFamily::Bridge,
            "arp" => TableFamily::Arp,
            _ => return None,
        })
    }

    /// Does a packet of this IP version (`v6`) traverse this table's base chains?
    /// (`netdev` ingress sees every packet of its device.)
    pub fn sees(self, v6: bool) -> bool {
        match self {
            TableFamily::Ip => !v6,
            TableFamily::Ip6 => v6,
            TableFamily::Inet | TableFamily::Netdev => true,
            TableFamily::Bridge | TableFamily::Arp => false,
        }
    }
}

/// Who wrote (and who read) a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Native nftables, read from `nft -j list ruleset`.
    Nft,
    /// A table iptables-nft owns, rules read from `iptables-nft-save`.
    IptablesNft,
    /// An iptables-legacy table (x_tables), read from `iptables-legacy-save`.
    IptablesLegacy,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Nft => "nft",
            Origin::IptablesNft => "iptables-nft",
            Origin::IptablesLegacy => "iptables-legacy",
        }
    }
}

/// Netfilter hooks a packet to or from a local socket can pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Ingress,
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ingress" => Hook::Ingress,
            "prerouting" | "PREROUTING" => Hook::Prerouting,
            "input" | "INPUT" => Hook::Input,
            "forward" | "FORWARD" => Hook::Forward,
            "output" | "OUTPUT" => Hook::Output,
            "postrouting" | "POSTROUTING" => Hook::Postrouting,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// A base chain's type: only `nat` chains may rewrite the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
    Route,
}

/// What a base chain does with a packet no rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Accept,
    Drop,
}

/// Where a chain hangs in the packet path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub hook: Hook,
    pub kind: ChainType,
    /// Lower runs first (raw −300, mangle −150, dstnat −100, filter 0, security 50, srcnat 100).
    pub priority: i32,
    pub policy: Policy,
    /// Ingress chains: the devices they are bound to. `None` for an ingress chain means
    /// the reader could not tell (nft 1.0.6's JSON leaves them out; `firewall::
    /// ingress_devices` reads them from `nft list ruleset`); other hooks ignore it.
    pub devices: Option<Vec<String>>,
}

/// The standard priorities, for iptables tables (which have no priority of their own).
pub fn iptables_priority(table: &str, hook: Hook) -> Option<(ChainType, i32)> {
    Some(match (table, hook) {
        ("raw", Hook::Prerouting | Hook::Output) => (ChainType::Filter, -300),
        ("mangle", Hook::Output) => (ChainType::Route, -150),
        ("mangle", _) => (ChainType::Filter, -150),
        ("nat", Hook::Prerouting | Hook::Output) => (ChainType::Nat, -100),
        ("nat", Hook::Input | Hook::Postrouting) => (ChainType::Nat, 100),
        ("filter", Hook::Input | Hook::Forward | Hook::Output) => (ChainType::Filter, 0),
        ("security", Hook::Input | Hook::Forward | Hook::Output) => (ChainType::Filter, 50),
        _ => return None,
    })
}

/// One value, or a range of values, of a match's right-hand side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A number or an inclusive range: ports, protocol numbers, ICMP types, marks, hop limits.
    Num(u64, u64),
    /// An address range, inclusive: a single address, a prefix or `a-b`.
    V4(u32, u32),
    V6(u128, u128),
    /// A name: interface names (a trailing `*` matches any suffix), ct states, keywords.
    Name(String),
    /// One element of a concatenation (`ip saddr . tcp dport`), one value per key.
    Tuple(Vec<Value>),
}

impl Value {
    pub fn num(n: u64) -> Value {
        Value::Num(n, n)
    }

    pub fn v4_prefix(addr: std::net::Ipv4Addr, len: u8) -> Value {
        let a = u32::from(addr);
        let host = if len >= 32 {
            0
        } else {
            u32::MAX >> u32::from(len)
        };
        Value::V4(a & !host, a | host)
    }

    pub fn v6_prefix(addr: std::net::Ipv6Addr, len: u8) -> Value {
        let a = u128::from(addr);
        let host = if len >= 128 {
            0
        } else {
            u128::MAX >> u32::from(len)
        };
        Value::V6(a & !host, a | host)
    }
}

/// What a match looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `meta l4proto`, `ip protocol`, `ip6 nexthdr`, iptables `-p`.
    L4proto,
    /// `meta nfproto` (ipv4 / ipv6).
    Nfproto,
    Sport,
    Dport,
    Saddr,
    Daddr,
    Iifname,
    Oifname,
    /// `ct state`: new, established, related, invalid, untracked.
    CtState,
    /// `ct status`: dnat, snat, …
    CtStatus,
    /// ICMP or ICMPv6 type (the protocol is part of the match: a TCP packet never matches).
    IcmpType {
        v6: bool,
    },
    /// `fib daddr type`: local, unicast, broadcast, multicast, …
    FibDaddrType,
    /// `meta mark`.
    Mark,
    /// `meta mark & MASK` (iptables `--mark V/MASK`): the values are compared with the
    /// masked mark.
    MarkMasked(u64),
    /// IPv6 hop limit / IPv4 TTL.
    HopLimit,
    /// TCP flags under a mask (`tcp flags & (fin|syn|rst|ack) == syn`, iptables `--syn`,
    /// `--tcp-flags MASK COMP`): values are compared with `flags & mask`. FIN 0x01, SYN
    /// 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20, ECE 0x40, CWR 0x80. A non-TCP packet
    /// never matches.
    TcpFlags(u64),
    /// Conntrack direction: `original` or `reply`.
    CtDirection,
    /// A concatenation (`ip saddr . tcp dport`); values are [`Value::Tuple`].
    Concat(Vec<Key>),
}

/// Reject forms, for the reason text (all mean `filtered` to a client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// `reject` with its form (`tcp reset`, `icmpx admin-prohibited`, …).
    Reject(String),
    Jump(String),
    Goto(String),
    Return,
    Continue,
}

/// Address rewriting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Destination NAT (`dnat to`, `-j DNAT`): the packet goes elsewhere.
    Dnat,
    /// `redirect to :PORT`, `-j REDIRECT`: to a local port.
    Redirect,
    /// Source NAT and masquerade: no effect on reachability of the listener.
    Snat,
}

/// One statement of a rule, in rule order.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    /// `key op values`: `negate` for `!=` / `!`; the match holds when the packet's value
    /// is (not) one of `values`.
    Match {
        key: Key,
        negate: bool,
        values: Vec<Value>,
    },
    /// `limit rate …` (`over` when it matches above the rate): a condition on traffic
    /// the agent cannot know.
    Limit {
        text: String,
        over: bool,
    },
    /// A match no reader could decode (e.g. an iptables-nft `xt` match seen only through
    /// nft's JSON, an unknown expression). Evaluated both ways.
    Opaque {
        text: String,
    },
    /// A match whose outcome is the same for every packet the evaluator asks about (the
    /// first packet of a connection to a local socket): `--syn` holds; a type-0 routing
    /// header, a fragment, `tcp flags` other than SYN do not.
    Fixed {
        holds: bool,
        text: String,
    },
    /// `meta mark set N`.
    SetMark(u64),
    /// `meta mark set (mark & and | or) ^ xor`: iptables `--set-xmark V/M` is
    /// `and = !M, xor = V`; nft `mark | 0x4000` is `or = 0x4000`.
    MarkBits {
        and: u64,
        or: u64,
        xor: u64,
    },
    /// `notrack` / `-j CT --notrack`: the packet's ct state becomes `untracked`.
    Notrack,
    /// DNAT, redirect, SNAT/masquerade, with the target as text (`192.0.2.2:80`, `:8080`).
    /// In a nat chain a DNAT or redirect is final for that chain.
    Nat {
        kind: NatKind,
        to: String,
        /// The destination port after the rewrite, when the rule names one.
        port: Option<u16>,
    },
    /// `key vmap { value : verdict, … }`; a named map (`vmap @name`) arrives inlined.
    VerdictMap {
        key: Key,
        entries: Vec<(Value, Verdict)>,
    },
    Verdict(Verdict),
}

/// One rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// nftables handle; `None` for iptables-legacy rules (they have positions only).
    pub handle: Option<u64>,
    /// The rule as the operator would read it (`nft list` or `iptables-save` syntax),
    /// without counters.
    pub text: String,
    pub stmts: Vec<Stmt>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub family: TableFamily,
    pub name: String,
    pub origin: Origin,
    /// Named sets and maps are not kept: the readers inline them into the rules that
    /// use them.
    pub chains: Vec<Chain>,
}

impl Table {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// Every table of one namespace that the readers could read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
