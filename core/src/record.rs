//! The fleet's unit of inventory: one listener per endpoint.
//!
//! A scan reports sockets; the fleet stores *endpoints*: (namespace, protocol, family,
//! address, port, interface, v6only). Sockets sharing an endpoint (an SO_REUSEPORT group,
//! one socket per worker) become one [`ListenerRecord`] whose `sockets` counts them and
//! whose `processes` is the union of their owners. A host's inventory is a [`State`]:
//! records by key, ordered, so two states diff in one merge pass (`diff.rs`).
//!
//! These are domain types: the agent's transport converts them to protobuf and the
//! collector converts back with validation (`wire.rs`). The agent builds them from a scan
//! (`listenscope_agent::record::state_of`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::domain::{Container, Family, ProcessInfo, Protocol, Reach, Source};
use crate::limits;

/// What identifies a listener on a host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub netns: String,
    pub protocol: Protocol,
    pub family: Family,
    pub address: IpAddr,
    pub port: u16,
    /// Bound device; `None` when not bound to one.
    pub interface: Option<String>,
    /// As the kernel reported it; `None` for AF_INET or when unknown.
    pub v6only: Option<bool>,
}

/// One listener (endpoint) and what the agent concluded about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerRecord {
    pub key: ListenerKey,
    pub netns_inode: u64,
    pub reach_ipv4: Reach,
    pub reach_ipv6: Reach,
    pub latent: bool,
    pub shown_as: String,
    pub netstat_proto: String,
    pub trap: bool,
    pub hidden_ipv4_exposure: bool,
    /// Owners, ascending by pid, each once.
    pub processes: Vec<ProcessInfo>,
    pub container: Option<Container>,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    pub uid: u32,
    pub freebind: Option<bool>,
    pub transparent: Option<bool>,
    pub source: Source,
    /// Sockets on this endpoint (1 unless SO_REUSEPORT).
    pub sockets: u32,
}

/// A host's inventory at one moment.
pub type State = BTreeMap<ListenerKey, ListenerRecord>;

impl ListenerRecord {
    /// The fields whose change is an event worth a new history version. Owner pids,
    /// cmdlines, the socket count and the namespace inode churn on healthy hosts (worker
    /// recycling, reloads, reboots) and are refreshed in place instead; the exposure, the
    /// classification and who owns it by name are history.
    pub fn material(&self) -> MaterialView<'_> {
        let mut names: Vec<&str> = self.processes.iter().map(|p| p.comm.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut users: Vec<&str> = self.processes.iter().map(|p| p.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        MaterialView {
            reach: (self.reach_ipv4, self.reach_ipv6),
            latent: self.latent,
            shown_as: &self.shown_as,
            netstat_proto: &self.netstat_proto,
            trap: self.trap,
            hidden_ipv4_exposure: self.hidden_ipv4_exposure,
            process_names: names,
            users,
            container: self.container.as_ref(),
            unit: self.unit.as_deref(),
            cgroup: self.cgroup.as_deref(),
            uid: self.uid,
            sockopts: (self.freebind, self.transparent),
            source: self.source,
        }
    }

    /// Distinct owner command names, sorted, comma-separated (`apache2,php-fpm`).
    pub fn process_names(&self) -> String {
        self.material().process_names.join(",")
    }

    /// Rough size on the wire, for splitting messages.
    pub fn approx_bytes(&self) -> usize {
        let k = &self.key;
        let strings = k.netns.len()
            + k.interface.as_ref().map_or(0, String::len)
            + self.shown_as.len()
            + self.unit.as_ref().map_or(0, String::len)
            + self.cgroup.as_ref().map_or(0, String::len)
            + self
                .container
                .as_ref()
                .map_or(0, |c| c.id.len() + c.runtime.len() + 40);
        let procs: usize = self
            .processes
            .iter()
            .map(|p| p.comm.len() + p.cmdline.len() + p.user.len() + 16)
            .sum();
        128 + strings + procs
    }

    /// Applies [`limits::PROCESSES`] and [`limits::CMDLINE_BUDGET`].
    pub fn bound(&mut self) {
        self.processes.truncate(limits::PROCESSES);
        let mut budget = limits::CMDLINE_BUDGET;
        for p in &mut self.processes {
            if p.cmdline.len() > budget {
                p.cmdline.clear();
            }
            budget = budget.saturating_sub(p.cmdline.len());
        }
    }
}

/// See [`ListenerRecord::material`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MaterialView<'a> {
    pub(crate) reach: (Reach, Reach),
    pub(crate) latent: bool,
    pub(crate) shown_as: &'a str,
    pub(crate) netstat_proto: &'a str,
    pub(crate) trap: bool,
    pub(crate) hidden_ipv4_exposure: bool,
    pub(crate) process_names: Vec<&'a str>,
    pub(crate) users: Vec<&'a str>,
    pub(crate) container: Option<&'a Container>,
    pub(crate) unit: Option<&'a str>,
    pub(crate) cgroup: Option<&'a str>,
    pub(crate) uid: u32,
    pub(crate) sockopts: (Option<bool>, Option<bool>),
    pub(crate) source: Source,
}

/// Builders for tests in this and the other crates (feature `test-support`).
#[cfg(any(test, feature = "test-support"))]
#[allow(clippy::unwrap_used)] // test support: a bad literal should fail the test loudly
pub mod testkit {
    use super::*;

    /// A plausible record: an nginx-owned TCP listener, for tests across the workspace.
    pub fn record(netns: &str, addr: &str, port: u16, v6only: Option<bool>) -> ListenerRecord {
        let address: IpAddr = addr.parse().unwrap();
        ListenerRecord {
            key: ListenerKey {
                netns: netns.into(),
                protocol: Protocol::Tcp,
                family: if address.is_ipv4() {
                    Family::Ipv4
                } else {
                    Family::Ipv6
                },
                address,
                port,
                interface: None,
                v6only,
            },
            netns_inode: 4026531833,
            reach_ipv4: Reach::Any,
            reach_ipv6: Reach::Any,
            latent: false,
            shown_as: format!(":::{port}"),
            netstat_proto: "tcp6".into(),
            trap: true,
            hidden_ipv4_exposure: true,
            processes: vec![ProcessInfo {
                pid: 100,
                comm: "nginx".into(),
                cmdline: "nginx: master process".into(),
                user: "root".into(),
            }],
            container: None,
            unit: Some("nginx.service".into()),
            cgroup: Some("/system.slice/nginx.service".into()),
            uid: 0,
            freebind: Some(false),
            transparent: Some(false),
            source: Source::SockDiag,
            sockets: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::record;
    use super::*;

    #[test]
    fn records_are_bounded() {
        let mut r = record("host", "::", 80, Some(false));
        r.processes = (1..=5000u32)
            .map(|pid| ProcessInfo {
                pid,
                comm: "worker".into(),
                cmdline: "x".repeat(1000),
                user: "www-data".into(),
            })
            .collect();
        r.bound();
        assert_eq!(r.processes.len(), limits::PROCESSES);
        let cmd: usize = r.processes.iter().map(|p| p.cmdline.len()).sum();
        assert!(cmd <= limits::CMDLINE_BUDGET, "{cmd}");
        assert_eq!(
            r.processes.last().unwrap().comm,
            "worker",
            "names and pids stay"
        );
        assert!(r.approx_bytes() < 300 * 1024);
    }

    #[test]
    fn pid_churn_is_not_material() {
        let a = record("host", "::", 80, Some(false));
        let mut b = a.clone();
        b.processes[0].pid = 101;
        b.processes[0].cmdline = "nginx: worker".into();
        b.sockets = 4;
        b.netns_inode = 1;
        assert_eq!(a.material(), b.material());
        let mut c = a.clone();
        c.reach_ipv4 = Reach::None;
        assert_ne!(a.material(), c.material());
        let mut d = a.clone();
        d.processes[0].comm = "apache2".into();
        assert_ne!(a.material(), d.material());
    }
}
