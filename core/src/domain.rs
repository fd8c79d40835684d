//! The inventory's vocabulary, shared by agent and collector: protocol, address family,
//! reach, where sockets were read from, owners and containers.
//!
//! Plain values, no I/O and no protobuf (the `wire` module converts at the edge).

use std::fmt;

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Transport protocol of a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Address family of the socket itself (AF_INET or AF_INET6), not of the traffic it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// What a socket accepts over one IP version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// Every local address of that version in the socket's namespace.
    Any,
    /// Only a loopback address (127.0.0.0/8, ::1) or only through the `lo` interface.
    Loopback,
    /// Only the one bound, non-loopback address (or multicast group).
    Specific,
    /// Nothing of that version.
    None,
    /// The kernel did not say (no `INET_DIAG_SKV6ONLY`): never guessed.
    Unknown,
}

impl Reach {
    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Any => "any",
            Reach::Loopback => "loopback",
            Reach::Specific => "specific",
            Reach::None => "none",
            Reach::Unknown => "unknown",
        }
    }

    /// True when the socket accepts at least something of that version.
    pub fn accepts(self) -> bool {
        matches!(self, Reach::Any | Reach::Loopback | Reach::Specific)
    }

    /// True when clients off this host can reach it (any or a specific non-loopback address).
    pub fn exposed(self) -> bool {
        matches!(self, Reach::Any | Reach::Specific)
    }
}

/// What the namespace's own firewall (nftables, iptables) lets through to a listener
/// over one IP version, for a new connection from off-host (`docs/firewall.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Effective {
    /// Every client of that version reaches it.
    #[serde(rename = "open")]
    Open,
    /// No client of that version reaches it.
    #[serde(rename = "filtered")]
    Filtered,
    /// Some do (by source, interface, source port, destination address or rate).
    #[serde(rename = "restricted")]
    Restricted,
    /// The rules could not be read or decided: never a guess.
    #[serde(rename = "unknown")]
    Unknown,
    /// A DNAT or redirect sends that traffic elsewhere (e.g. a Docker-published port).
    #[serde(rename = "diverted")]
    Diverted,
    /// The socket itself accepts nothing of that version from off-host (none, loopback
    /// only, or latent): the firewall is not the question.
    #[serde(rename = "n/a")]
    NotApplicable,
}

impl Effective {
    pub fn as_str(self) -> &'static str {
        match self {
            Effective::Open => "open",
            Effective::Filtered => "filtered",
            Effective::Restricted => "restricted",
            Effective::Unknown => "unknown",
            Effective::Diverted => "diverted",
            Effective::NotApplicable => "n/a",
        }
    }

    /// True when at least some clients of that version get through.
    pub fn lets_through(self) -> bool {
        matches!(self, Effective::Open | Effective::Restricted)
    }
}

/// What the fleet does with verdicts: rank them (the agent merging sockets of one endpoint,
/// the collector's headline and reports choosing the verdict of a port's listeners).
impl Effective {
    /// Every verdict, most permissive first.
    pub const ALL: [Effective; 6] = [
        Effective::Open,
        Effective::Restricted,
        Effective::Diverted,
        Effective::Unknown,
        Effective::Filtered,
        Effective::NotApplicable,
    ];

    /// How much this verdict lets through, for choosing one verdict among several (the
    /// most permissive wins): open 5, restricted 4, diverted 3, unknown 2, filtered 1,
    /// n/a 0. `unknown` ranks above `filtered`: a verdict nobody could decide must not
    /// hide one that might be open behind one that is closed. `diverted` ranks above
    /// `unknown`: the traffic certainly goes somewhere. The collector's SQL ranks with the
    /// same numbers (`store::row::rank_sql`, generated from this function).
    pub fn permissiveness(self) -> u8 {
        match self {
            Effective::Open => 5,
            Effective::Restricted => 4,
            Effective::Diverted => 3,
            Effective::Unknown => 2,
            Effective::Filtered => 1,
            Effective::NotApplicable => 0,
        }
    }
}

/// Where a namespace's sockets were read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// NETLINK_SOCK_DIAG: carries v6only, bound device and socket options.
    SockDiag,
    /// `/proc/PID/net/{tcp,tcp6,udp,udp6}`: no v6only, no device (fallback without CAP_SYS_ADMIN).
    Procfs,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::SockDiag => "sock_diag",
            Source::Procfs => "procfs",
        }
    }
}

/// A process that holds a socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    /// Effective user name (or the numeric uid when /etc/passwd does not name it).
    pub user: String,
}

/// A container a socket belongs to, derived from its cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Container {
    /// `docker`, `containerd`, `cri-o`, `podman`, `lxc`, or `kubernetes` when only the pod
    /// layout shows which runtime it is not.
    pub runtime: String,
    pub id: String,
    /// Kubernetes pod UID when the cgroup path carries one.
    pub pod_uid: Option<String>,
}

/// A name that is not one of an enum's [`as_str`](Protocol::as_str) forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a known {what}")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}

macro_rules! from_names {
    ($ty:ident, $what:literal, [$($v:ident),+]) => {
        impl FromStr for $ty {
            type Err = UnknownName;

            /// The inverse of `as_str`.
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                $(if s == $ty::$v.as_str() {
                    return Ok($ty::$v);
                })+
                Err(UnknownName { what: $what, name: s.to_string() })
            }
        }
    };
}

from_names!(Protocol, "protocol", [Tcp, Udp]);
from_names!(Family, "address family", [Ipv4, Ipv6]);
from_names!(Reach, "reach", [Any, Loopback, Specific, None, Unknown]);
from_names!(Source, "source", [SockDiag, Procfs]);
from_names!(
    Effective,
    "effective verdict",
    [Open, Filtered, Restricted, Unknown, Diverted, NotApplicable]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in [
            Reach::Any,
            Reach::Loopback,
            Reach::Specific,
            Reach::None,
            Reach::Unknown,
        ] {
            assert_eq!(r.as_str().parse(), Ok(r));
        }
        for p in [Protocol::Tcp, Protocol::Udp] {
            assert_eq!(p.as_str().parse(), Ok(p));
        }
        for f in [Family::Ipv4, Family::Ipv6] {
            assert_eq!(f.as_str().parse(), Ok(f));
        }
        for s in [Source::SockDiag, Source::Procfs] {
            assert_eq!(s.as_str().parse(), Ok(s));
        }
        assert_eq!("sctp".parse::<Protocol>().unwrap_err().what, "protocol");
        for e in Effective::ALL {
            assert_eq!(e.as_str().parse(), Ok(e));
        }
        assert!("".parse::<Effective>().is_err());
        assert!("OPEN".parse::<Effective>().is_err());
    }

    #[test]
    fn verdicts_rank_most_permissive_first() {
        let ranks: Vec<u8> = Effective::ALL.iter().map(|e| e.permissiveness()).collect();
        assert_eq!(ranks, [5, 4, 3, 2, 1, 0]);
    }
}

/// Owners as the scan table's PROCESS cell shows them: by command name in order of first
/// appearance, up to three pids each (`nginx[811,812,+3] php-fpm[900]`); `None` for none.
/// The agent's `scan` and the collector's web UI both print it.
pub fn process_summary<'a>(owners: impl IntoIterator<Item = (&'a str, i64)>) -> Option<String> {
    let mut by_comm: Vec<(&str, Vec<i64>)> = Vec::new();
    for (comm, pid) in owners {
        match by_comm.iter_mut().find(|(c, _)| *c == comm) {
            Some((_, pids)) => pids.push(pid),
            None => by_comm.push((comm, vec![pid])),
        }
    }
    if by_comm.is_empty() {
        return None;
    }
    Some(
        by_comm
            .iter()
            .map(|(comm, pids)| {
                let shown: Vec<String> = pids.iter().take(3).map(|p| p.to_string()).collect();
                let more = if pids.len() > 3 {
                    format!(",+{}", pids.len() - 3)
                } else {
                    String::new()
                };
                format!("{comm}[{}{more}]", shown.join(","))
            })
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod process_summary_tests {
    use super::process_summary;

    #[test]
    fn grouped_by_name_three_pids_each() {
        assert_eq!(process_summary([]), None);
        assert_eq!(
            process_summary([("nginx", 811), ("php-fpm", 900), ("nginx", 812)]).as_deref(),
            Some("nginx[811,812] php-fpm[900]")
        );
        let many = (1..=5).map(|p| ("w", p));
        assert_eq!(process_summary(many).as_deref(), Some("w[1,2,3,+2]"));
    }
}
