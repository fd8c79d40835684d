//! Domain types of one inventory.
//!
//! Two layers: what the OS layer reports ([`RawSocket`], [`NetnsView`], [`ProcessInfo`]) and
//! what the agent concludes ([`Classification`], [`Listener`]). Nothing here does I/O, and
//! nothing here is protobuf: the wire format converts at the transport edge.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use listenscope_core::domain::{Container, Family, ProcessInfo, Protocol, Reach, Source};
use serde::Serialize;

/// One listening TCP socket or unconnected UDP socket, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSocket {
    pub protocol: Protocol,
    pub family: Family,
    pub address: IpAddr,
    pub port: u16,
    /// `INET_DIAG_SKV6ONLY`; `None` when the kernel did not send it (AF_INET, or procfs source).
    pub v6only: Option<bool>,
    /// `idiag_if`: SO_BINDTODEVICE or the scope of a link-local bind; 0 = none.
    /// An ifindex inside the socket's own namespace.
    pub ifindex: u32,
    /// IP_FREEBIND from `INET_DIAG_SOCKOPT`; `None` when the kernel did not send it.
    pub freebind: Option<bool>,
    /// IP_TRANSPARENT from `INET_DIAG_SOCKOPT`; `None` when the kernel did not send it.
    pub transparent: Option<bool>,
    pub uid: u32,
    pub inode: u64,
    /// `INET_DIAG_CGROUP_ID`: inode of the creator's cgroup v2 directory.
    pub cgroup_id: Option<u64>,
}

/// One network namespace: its inode (the identity) and a human name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NetnsId {
    pub inode: u64,
    /// `host` for the initial namespace, the `/run/netns` name when there is one, the nsfs
    /// mount path for other bind-mounted ones (docker), else `net:[INODE]`.
    pub name: String,
}

/// The addresses a namespace treats as its own: the `local` routing table, RTN_LOCAL
/// routes only (interface addresses, 127.0.0.0/8, AnyIP prefixes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    /// (prefix, prefix length).
    pub v4: Vec<(Ipv4Addr, u8)>,
    /// (prefix, prefix length, output ifindex or 0).
    pub v6: Vec<(Ipv6Addr, u8, u32)>,
}

impl LocalAddrs {
    pub fn contains_v4(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        self.v4.iter().any(|&(net, len)| {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            a & mask == u32::from(net) & mask
        })
    }

    /// `ifindex` matters only for link-local addresses, which are local per interface.
    pub fn contains_v6(&self, addr: Ipv6Addr, ifindex: u32) -> bool {
        let a = u128::from(addr);
        let link_local = addr.is_unicast_link_local();
        self.v6.iter().any(|&(net, len, oif)| {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            a & mask == u128::from(net) & mask
                && (!link_local || ifindex == 0 || oif == 0 || oif == ifindex)
        })
    }
}

/// Whether the interfaces of a namespace take IPv6 at all: `net.ipv6.conf.<if>.disable_ipv6`
/// per interface (docs/kernel.md, "IPv6 disabled in a namespace"). It bounds what any socket
/// of the namespace accepts over IPv6, whatever it is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ipv6State {
    /// An interface other than `lo` takes IPv6: no limit (the usual case).
    Enabled,
    /// Only `lo` takes IPv6: IPv6 works inside the namespace, never from off it.
    LoopbackOnly,
    /// No interface takes IPv6, `lo` included: no IPv6 packet is accepted and the
    /// namespace has no IPv6 address, not even `::1`.
    Disabled,
    /// The kernel has no IPv6 (`ipv6.disable=1` at boot): there are no IPv6 sockets.
    Unavailable,
}

impl Ipv6State {
    pub fn as_str(self) -> &'static str {
        match self {
            Ipv6State::Enabled => "enabled",
            Ipv6State::LoopbackOnly => "loopback_only",
            Ipv6State::Disabled => "disabled",
            Ipv6State::Unavailable => "unavailable",
        }
    }
}

/// [`Ipv6State`] with the facts that decided it (scan JSON `namespaces[].ipv6`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ipv6Facts {
    pub state: Ipv6State,
    /// Which interfaces have `disable_ipv6=1` (or that the kernel has no IPv6); `None`
    /// when the state is [`Ipv6State::Enabled`].
    pub reason: Option<String>,
}

/// Everything read from one namespace.
#[derive(Debug, Clone)]
pub struct NetnsView {
    pub sockets: Vec<RawSocket>,
    /// `None` when the local table could not be read (procfs fallback): latent is then not judged.
    pub local: Option<LocalAddrs>,
    /// ifindex → name, for the ifindexes the sockets mention.
    pub ifnames: Vec<(u32, String)>,
    pub source: Source,
    /// Conditions worth telling the operator (e.g. "IPv6 is disabled in this namespace").
    pub notes: Vec<String>,
    /// Whether the namespace's interfaces take IPv6; `None` when it was not read (the
    /// namespace was read from /proc/PID/net, or the sysctls could not be read): then
    /// IPv6 reach is not limited.
    pub ipv6: Option<Ipv6Facts>,
    /// The namespace's firewall rulesets as read (`System::read_firewall`, filled in by
    /// the scan after the sockets); `None` when they were not read (the namespace was
    /// read from /proc/PID/net, or could not be entered).
    pub firewall: Option<crate::os::firewall::RawFirewall>,
    /// Unicast routes of the main table as (destination, prefix length, output interface
    /// name), for the firewall's forward path; empty when not read.
    pub routes: Vec<(IpAddr, u8, String)>,
}

/// The classifier's verdict for one socket. See `classify.rs` and `docs/kernel.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub reach_ipv4: Reach,
    pub reach_ipv6: Reach,
    /// Bound address is not local in its namespace: the socket accepts nothing yet.
    pub latent: bool,
    /// Exactly what `netstat -tuln` prints in its Local Address column.
    pub shown_as: String,
    /// Exactly what `netstat -tuln` prints in its Proto column (`tcp`, `tcp6`, `udp`, `udp6`).
    pub netstat_proto: &'static str,
    /// An AF_INET6 socket that accepts IPv4.
    pub trap: bool,
}

/// One listener as the agent reports it.
#[derive(Debug, Clone)]
pub struct Listener {
    pub socket: RawSocket,
    /// Shared by every listener of the namespace.
    pub netns: std::sync::Arc<NetnsId>,
    pub source: Source,
    /// Name of `socket.ifindex` in the socket's namespace; `None` when not bound to a device.
    pub interface: Option<String>,
    pub class: Classification,
    /// The port (netns, protocol, port) is reachable over IPv4 while netstat shows only IPv6
    /// lines for it.
    pub hidden_ipv4_exposure: bool,
    /// Owner pids, ascending; details in [`crate::scan::Inventory::processes`].
    pub pids: Vec<u32>,
    pub cgroup: Option<String>,
    pub container: Option<Container>,
    pub unit: Option<String>,
    /// What the namespace's own firewall lets through, per IP version.
    pub effective: crate::firewall::Exposure,
}
