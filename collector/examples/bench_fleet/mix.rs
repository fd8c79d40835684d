//! What one simulated host listens on: a realistic mix built as the agent would report it
//! (`ListenerRecord`s with the classifier's reach, netstat form, trap and per-port hidden
//! IPv4 exposure, and the firewall's verdicts under one of a few host firewall profiles),
//! and the small changes a steady-state scan finds (ruleset changes and reloads among
//! them).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use listenscope_core::diff::{Changes, diff};
use listenscope_core::domain::{
    Container, Effective, Family, ProcessInfo, Protocol, Reach, Source,
};
use listenscope_core::record::{FirewallAnswer, ListenerKey, ListenerRecord, State};

/// SplitMix64: small, fast, good enough to spread a simulated fleet.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `pct`/100.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn hex(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from_digit(self.below(16) as u32, 16).unwrap_or('0'))
            .collect()
    }

    pub fn bytes16(&mut self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        out[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        out
    }
}

const HOST: &str = "host";
/// The initial network namespace's inode on most kernels.
const HOST_INODE: u64 = 4_026_531_840;
/// Filler listeners use ports from this range, each port once.
const FILLER_PORTS: std::ops::Range<u16> = 20_000..61_000;

/// Who holds a socket.
struct Owner {
    processes: Vec<ProcessInfo>,
    unit: Option<String>,
    cgroup: Option<String>,
    uid: u32,
    container: Option<Container>,
}

fn process(pid: u32, comm: &str, cmdline: &str, user: &str) -> ProcessInfo {
    ProcessInfo {
        pid,
        comm: comm.to_string(),
        cmdline: cmdline.to_string(),
        user: user.to_string(),
    }
}

fn service(unit: &str, uid: u32, processes: Vec<ProcessInfo>) -> Owner {
    Owner {
        processes,
        unit: Some(unit.to_string()),
        cgroup: Some(format!("/system.slice/{unit}")),
        uid,
        container: None,
    }
}

fn reach_v4(a: Ipv4Addr) -> Reach {
    if a.is_unspecified() {
        Reach::Any
    } else if a.is_loopback() {
        Reach::Loopback
    } else {
        Reach::Specific
    }
}

/// One listener as the agent's classifier describes it (agent/src/classify.rs) for the
/// bind modes used here: IPv4 wildcard/loopback/specific, `::` with v6only known, `::1`.
fn listener(
    netns: &str,
    inode: u64,
    protocol: Protocol,
    address: IpAddr,
    port: u16,
    v6only: Option<bool>,
    o: &Owner,
) -> ListenerRecord {
    let (family, reach_ipv4, reach_ipv6, v6only) = match address {
        IpAddr::V4(a) => (Family::Ipv4, reach_v4(a), Reach::None, None),
        IpAddr::V6(a) if a.is_unspecified() => {
            let r4 = match v6only {
                Some(false) => Reach::Any,
                Some(true) => Reach::None,
                None => Reach::Unknown,
            };
            (Family::Ipv6, r4, Reach::Any, v6only)
        }
        // A specific IPv6 bind forces v6only=1.
        IpAddr::V6(a) if a.is_loopback() => {
            (Family::Ipv6, Reach::None, Reach::Loopback, Some(true))
        }
        IpAddr::V6(_) => (Family::Ipv6, Reach::None, Reach::Specific, Some(true)),
    };
    let netstat_proto = match (protocol, family) {
        (Protocol::Tcp, Family::Ipv4) => "tcp",
        (Protocol::Tcp, Family::Ipv6) => "tcp6",
        (Protocol::Udp, Family::Ipv4) => "udp",
        (Protocol::Udp, Family::Ipv6) => "udp6",
    };
    ListenerRecord {
        key: ListenerKey {
            netns: netns.to_string(),
            protocol,
            family,
            address,
            port,
            interface: None,
            v6only,
        },
        netns_inode: inode,
        reach_ipv4,
        reach_ipv6,
        latent: false,
        // Rust prints `::` and `::1` as glibc does; no address here is long enough for
        // netstat's truncation.
        shown_as: format!("{address}:{port}"),
        netstat_proto: netstat_proto.to_string(),
        trap: family == Family::Ipv6 && reach_ipv4.accepts(),
        hidden_ipv4_exposure: false,
        processes: o.processes.clone(),
        container: o.container.clone(),
        unit: o.unit.clone(),
        cgroup: o.cgroup.clone(),
        uid: o.uid,
        freebind: Some(false),
        transparent: Some(false),
        source: Source::SockDiag,
        sockets: 1,
        effective_ipv4: FirewallAnswer::new(Effective::Unknown, "not yet evaluated"),
        effective_ipv6: FirewallAnswer::new(Effective::Unknown, "not yet evaluated"),
    }
}

/// A host's firewall, as the agent's evaluator would judge its listeners. Shares in a
/// fleet: about a third without rules, half with a default-drop input chain that allows
/// ssh and the web, node-exporter from the monitoring network only and most application
/// ports not at all, and a few whose rules the agent cannot read or decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Firewall {
    /// No rules: what the socket accepts from off-host is open.
    NoRules,
    /// `inet filter input` with policy drop and a rule per allowed service.
    DefaultDrop,
    /// The rules could not be read (e.g. nft's JSON failed to parse): every verdict is
    /// unknown, never guessed.
    Unreadable,
}

impl Firewall {
    fn pick(rng: &mut Rng) -> Firewall {
        match rng.below(100) {
            0..35 => Firewall::NoRules,
            35..92 => Firewall::DefaultDrop,
            _ => Firewall::Unreadable,
        }
    }

    /// The verdict over one IP version of a socket that accepts `reach` of it.
    fn answer(self, netns: &str, protocol: Protocol, port: u16, reach: Reach) -> FirewallAnswer {
        if !reach.exposed() {
            return FirewallAnswer::new(
                Effective::NotApplicable,
                "the socket accepts nothing of this version from off-host",
            );
        }
        // A pod's namespace has no rules of its own.
        let fw = if netns == HOST {
            self
        } else {
            Firewall::NoRules
        };
        let rule = |n: u32, what: &str| format!("inet filter input handle {n}: {what}");
        let proto = protocol.as_str();
        match fw {
            Firewall::NoRules => {
                FirewallAnswer::new(Effective::Open, "no firewall rules in this namespace")
            }
            Firewall::Unreadable => FirewallAnswer::new(
                Effective::Unknown,
                "the nftables ruleset could not be parsed: unexpected expression \"osf\"",
            ),
            Firewall::DefaultDrop => match (protocol, port) {
                (Protocol::Tcp, 22 | 80 | 443) => FirewallAnswer::new(
                    Effective::Open,
                    rule(4 + u32::from(port % 7), &format!("tcp dport {port} accept")),
                ),
                (Protocol::Tcp, 9100) => FirewallAnswer {
                    verdict: Effective::Restricted,
                    reason: rule(11, "ip saddr 10.40.0.0/16 tcp dport 9100 accept"),
                    conditions: vec!["saddr 10.40.0.0/16".into()],
                },
                // Application ports: mostly closed, some open to the app network, a few
                // open, a few published to a container by DNAT.
                (_, p) => match p % 10 {
                    0..6 => {
                        FirewallAnswer::new(Effective::Filtered, "policy drop of inet filter input")
                    }
                    6..8 => FirewallAnswer {
                        verdict: Effective::Restricted,
                        reason: rule(
                            20 + u32::from(p % 50),
                            &format!("ip saddr 10.20.0.0/16 {proto} dport {p} accept"),
                        ),
                        conditions: vec!["iifname eth1".into(), "saddr 10.20.0.0/16".into()],
                    },
                    8 => FirewallAnswer::new(
                        Effective::Open,
                        rule(20 + u32::from(p % 50), &format!("{proto} dport {p} accept")),
                    ),
                    _ => FirewallAnswer::new(
                        Effective::Diverted,
                        format!(
                            "ip nat PREROUTING handle 9: {proto} dport {p} dnat to 172.17.0.2:{p}; \
                             diverted to 172.17.0.2:{p}"
                        ),
                    ),
                },
            },
        }
    }

    /// Both verdicts of `r` under this firewall.
    fn apply(self, r: &mut ListenerRecord) {
        let k = &r.key;
        r.effective_ipv4 = self.answer(&k.netns, k.protocol, k.port, r.reach_ipv4);
        r.effective_ipv6 = self.answer(&k.netns, k.protocol, k.port, r.reach_ipv6);
    }
}

/// `reason` with its rule handle (`handle 12:`) renumbered to `to`, as a ruleset reload
/// does; `None` when it names no handle (or already this one).
fn renumbered(reason: &str, to: u32) -> Option<String> {
    let at = reason.find("handle ")? + "handle ".len();
    let digits = reason[at..].bytes().take_while(u8::is_ascii_digit).count();
    let out = format!("{}{to}{}", &reason[..at], &reason[at + digits..]);
    (out != reason).then_some(out)
}

/// The agent's per-port verdict (`classify::hidden_ipv4_groups`): reachable over IPv4
/// through an AF_INET6 socket while no AF_INET socket shares (netns, protocol, port).
/// Set on every listener of such a group, as `scan::collect` does.
fn mark_hidden(state: &mut State) {
    let mut groups: HashMap<(String, Protocol, u16), (bool, bool)> = HashMap::new();
    for r in state.values() {
        let g = groups
            .entry((r.key.netns.clone(), r.key.protocol, r.key.port))
            .or_default();
        match r.key.family {
            Family::Ipv4 => g.0 = true,
            Family::Ipv6 if r.reach_ipv4.exposed() => g.1 = true,
            Family::Ipv6 => {}
        }
    }
    for r in state.values_mut() {
        let (v4_line, exposed) = groups[&(r.key.netns.clone(), r.key.protocol, r.key.port)];
        r.hidden_ipv4_exposure = exposed && !v4_line;
    }
}

const V4_ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const V6_ANY: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
const V4_LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6_LO: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Applications behind the filler ports: (comm, cmdline pattern, user, uid).
const APPS: &[(&str, &str, &str, u32)] = &[
    (
        "java",
        "/usr/lib/jvm/java-17-openjdk-amd64/bin/java -Xms512m -Xmx2g -jar /opt/{svc}/{svc}.jar --server.port={port}",
        "app",
        1001,
    ),
    (
        "node",
        "/usr/bin/node /srv/{svc}/dist/server.js --port {port}",
        "node",
        1002,
    ),
    (
        "gunicorn",
        "/usr/bin/python3 /usr/bin/gunicorn --workers 4 --bind 0.0.0.0:{port} {svc}.wsgi:application",
        "www-data",
        33,
    ),
    (
        "envoy",
        "/usr/local/bin/envoy -c /etc/envoy/{svc}.yaml --base-id {port}",
        "envoy",
        1003,
    ),
    (
        "dotnet",
        "/usr/bin/dotnet /opt/{svc}/{svc}.dll --urls http://*:{port}",
        "app",
        1001,
    ),
    (
        "ruby",
        "puma 6.4.2 (tcp://0.0.0.0:{port}) [{svc}]",
        "deploy",
        1004,
    ),
    (
        "beam.smp",
        "/usr/lib/erlang/erts-14.2/bin/beam.smp -- -root /usr/lib/erlang -progname erl -- -home /var/lib/{svc} -- -kernel inet_dist_listen_min {port}",
        "rabbitmq",
        1005,
    ),
    (
        "memcached",
        "/usr/bin/memcached -m 64 -p {port} -u memcache -l 127.0.0.1",
        "memcache",
        1006,
    ),
];

/// One simulated host's inventory, and where its next changes come from.
#[derive(Debug)]
pub struct Host {
    pub state: State,
    /// Keys of the filler listeners (the ones steady-state changes open, close, alter).
    fillers: Vec<ListenerKey>,
    used_ports: BTreeSet<u16>,
    next_port: u16,
    target: usize,
    firewall: Firewall,
    rng: Rng,
}

impl Host {
    /// The inventory of fleet host number `index` with `n` listeners (at most: the fixed
    /// services are cut when `n` is smaller than they are). The same index always gives
    /// the same inventory.
    pub fn new(index: u64, n: usize) -> Host {
        let mut rng = Rng::new(index.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
        let firewall = Firewall::pick(&mut rng);
        let mut fixed: Vec<ListenerRecord> = Vec::new();
        let pid = |rng: &mut Rng, base: u32| base + rng.below(400) as u32;

        // sshd: 0.0.0.0:22 and :::22 v6only (Debian's default: two sockets).
        let sshd = service(
            "ssh.service",
            0,
            vec![process(
                pid(&mut rng, 700),
                "sshd",
                "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",
                "root",
            )],
        );
        fixed.push(listener(
            HOST,
            HOST_INODE,
            Protocol::Tcp,
            V4_ANY,
            22,
            None,
            &sshd,
        ));
        fixed.push(listener(
            HOST,
            HOST_INODE,
            Protocol::Tcp,
            V6_ANY,
            22,
            Some(true),
            &sshd,
        ));

        // systemd-resolved: the stub resolvers, TCP and UDP, loopback only.
        let resolved = service(
            "systemd-resolved.service",
            991,
            vec![process(
                pid(&mut rng, 300),
                "systemd-resolve",
                "/usr/lib/systemd/systemd-resolved",
                "systemd-resolve",
            )],
        );
        for a in [[127, 0, 0, 53], [127, 0, 0, 54]] {
            let addr = IpAddr::V4(Ipv4Addr::from(a));
            for p in [Protocol::Udp, Protocol::Tcp] {
                fixed.push(listener(HOST, HOST_INODE, p, addr, 53, None, &resolved));
            }
        }

        // chronyd's command port, udp 127.0.0.1:323 and ::1:323.
        let chrony = service(
            "chrony.service",
            104,
            vec![process(
                pid(&mut rng, 500),
                "chronyd",
                "/usr/sbin/chronyd -F 1",
                "_chrony",
            )],
        );
        fixed.push(listener(
            HOST,
            HOST_INODE,
            Protocol::Udp,
            V4_LO,
            323,
            None,
            &chrony,
        ));
        fixed.push(listener(
            HOST,
            HOST_INODE,
            Protocol::Udp,
            V6_LO,
            323,
            Some(true),
            &chrony,
        ));

        // A dual-stack web server on ~30% of hosts: :::80 and :::443 with v6only=0, no
        // AF_INET socket on those ports: the trap, and hidden IPv4 exposure.
        if rng.chance(30) {
            let master = pid(&mut rng, 1200);
            let mut procs = vec![process(
                master,
                "nginx",
                "nginx: master process /usr/sbin/nginx -g daemon on; master_process on;",
                "root",
            )];
            for w in 1..=(2 + rng.below(3) as u32) {
                procs.push(process(
                    master + w,
                    "nginx",
                    "nginx: worker process",
                    "www-data",
                ));
            }
            let nginx = service("nginx.service", 0, procs);
            for port in [80, 443] {
                fixed.push(listener(
                    HOST,
                    HOST_INODE,
                    Protocol::Tcp,
                    V6_ANY,
                    port,
                    Some(false),
                    &nginx,
                ));
            }
        }

        // node-exporter on about half of the hosts: :::9100 dual-stack.
        if rng.chance(50) {
            let ne = service(
                "prometheus-node-exporter.service",
                107,
                vec![process(
                    pid(&mut rng, 900),
                    "prometheus-node",
                    "/usr/bin/prometheus-node-exporter --collector.systemd",
                    "prometheus",
                )],
            );
            fixed.push(listener(
                HOST,
                HOST_INODE,
                Protocol::Tcp,
                V6_ANY,
                9100,
                Some(false),
                &ne,
            ));
        }

        // Loopback-only databases.
        if rng.chance(40) {
            let pg = Owner {
                cgroup: Some(
                    "/system.slice/system-postgresql.slice/postgresql@16-main.service".into(),
                ),
                ..service(
                    "postgresql@16-main.service",
                    112,
                    vec![process(
                        pid(&mut rng, 1500),
                        "postgres",
                        "/usr/lib/postgresql/16/bin/postgres -D /var/lib/postgresql/16/main -c config_file=/etc/postgresql/16/main/postgresql.conf",
                        "postgres",
                    )],
                )
            };
            fixed.push(listener(
                HOST,
                HOST_INODE,
                Protocol::Tcp,
                V4_LO,
                5432,
                None,
                &pg,
            ));
            fixed.push(listener(
                HOST,
                HOST_INODE,
                Protocol::Tcp,
                V6_LO,
                5432,
                Some(true),
                &pg,
            ));
        }
        if rng.chance(30) {
            let redis = service(
                "redis-server.service",
                113,
                vec![process(
                    pid(&mut rng, 1100),
                    "redis-server",
                    "/usr/bin/redis-server 127.0.0.1:6379",
                    "redis",
                )],
            );
            fixed.push(listener(
                HOST,
                HOST_INODE,
                Protocol::Tcp,
                V4_LO,
                6379,
                None,
                &redis,
            ));
            fixed.push(listener(
                HOST,
                HOST_INODE,
                Protocol::Tcp,
                V6_LO,
                6379,
                Some(true),
                &redis,
            ));
        }

        // A Kubernetes pod's network namespace with its app on 0.0.0.0:8080.
        let pod_uid = format!(
            "{}-{}-{}-{}-{}",
            rng.hex(8),
            rng.hex(4),
            rng.hex(4),
            rng.hex(4),
            rng.hex(12)
        );
        let netns = format!(
            "cni-{}-{}-{}-{}-{}",
            rng.hex(8),
            rng.hex(4),
            rng.hex(4),
            rng.hex(4),
            rng.hex(12)
        );
        let id = rng.hex(64);
        let pod = Owner {
            processes: vec![process(
                pid(&mut rng, 20_000),
                "app",
                "/app/server --listen=0.0.0.0:8080 --metrics",
                "65532",
            )],
            unit: None,
            cgroup: Some(format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
                pod_uid.replace('-', "_")
            )),
            uid: 65532,
            container: Some(Container {
                runtime: "containerd".into(),
                id,
                pod_uid: Some(pod_uid),
            }),
        };
        let pod_inode = HOST_INODE + 400 + rng.below(2000);
        fixed.push(listener(
            &netns,
            pod_inode,
            Protocol::Tcp,
            V4_ANY,
            8080,
            None,
            &pod,
        ));

        fixed.truncate(n);
        for r in &mut fixed {
            firewall.apply(r);
        }
        let mut host = Host {
            state: fixed.into_iter().map(|r| (r.key.clone(), r)).collect(),
            fillers: Vec::new(),
            used_ports: BTreeSet::new(),
            next_port: FILLER_PORTS.start,
            target: 0,
            firewall,
            rng,
        };
        while host.state.len() < n {
            host.open_filler();
        }
        host.target = host.fillers.len();
        mark_hidden(&mut host.state);
        host
    }

    fn free_port(&mut self) -> Option<u16> {
        for _ in 0..FILLER_PORTS.len() {
            let p = self.next_port;
            self.next_port += 1 + self.rng.below(3) as u16;
            if self.next_port >= FILLER_PORTS.end {
                self.next_port = FILLER_PORTS.start + self.rng.below(7) as u16;
            }
            if !self.used_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    fn app_owner(&mut self, port: u16) -> Owner {
        let (comm, cmd, user, uid) = APPS[self.rng.below(APPS.len() as u64) as usize];
        let svc = format!("svc-{port}");
        let cmdline = cmd
            .replace("{svc}", &svc)
            .replace("{port}", &port.to_string());
        service(
            &format!("{svc}.service"),
            uid,
            vec![process(
                2000 + self.rng.below(60_000) as u32,
                comm,
                &cmdline,
                user,
            )],
        )
    }

    /// A new listener on a free high port: mostly IPv4 wildcard or loopback, some
    /// dual-stack `::` (hidden IPv4 exposure), some UDP.
    fn open_filler(&mut self) -> Option<ListenerKey> {
        let port = self.free_port()?;
        let owner = self.app_owner(port);
        let mut r = match self.rng.below(100) {
            0..50 => listener(HOST, HOST_INODE, Protocol::Tcp, V4_ANY, port, None, &owner),
            50..75 => listener(HOST, HOST_INODE, Protocol::Tcp, V4_LO, port, None, &owner),
            75..90 => listener(
                HOST,
                HOST_INODE,
                Protocol::Tcp,
                V6_ANY,
                port,
                Some(false),
                &owner,
            ),
            _ => listener(HOST, HOST_INODE, Protocol::Udp, V4_ANY, port, None, &owner),
        };
        self.firewall.apply(&mut r);
        self.used_ports.insert(port);
        self.fillers.push(r.key.clone());
        self.state.insert(r.key.clone(), r);
        self.fillers.last().cloned()
    }

    fn close_filler(&mut self) {
        if self.fillers.is_empty() {
            return;
        }
        let i = self.rng.below(self.fillers.len() as u64) as usize;
        let k = self.fillers.swap_remove(i);
        self.used_ports.remove(&k.port);
        self.state.remove(&k);
    }

    /// A worker recycled (new pid and cmdline: refreshed in place, no history), the
    /// service replaced by another program (a material change: a new version), a ruleset
    /// change that opens or closes the port over IPv4 (material), or a ruleset reload that
    /// renumbers the deciding rule (its reason: refreshed in place).
    fn change_filler(&mut self) {
        if self.fillers.is_empty() {
            return;
        }
        let k = self.fillers[self.rng.below(self.fillers.len() as u64) as usize].clone();
        let roll = self.rng.below(100);
        let owner = (roll < 45).then(|| self.app_owner(k.port));
        let bump = 1 + self.rng.below(500) as u32;
        if let Some(r) = self.state.get_mut(&k) {
            match (owner, roll) {
                (Some(o), _) => {
                    r.processes = o.processes;
                    r.uid = o.uid;
                }
                (None, 45..85) => {
                    for p in &mut r.processes {
                        p.pid = p.pid % 4_000_000 + bump;
                    }
                }
                (None, 85..93) if r.reach_ipv4.exposed() => {
                    r.effective_ipv4 = if r.effective_ipv4.verdict == Effective::Open {
                        FirewallAnswer::new(Effective::Filtered, "policy drop of inet filter input")
                    } else {
                        FirewallAnswer::new(
                            Effective::Open,
                            format!(
                                "inet filter input handle {bump}: {} dport {} accept",
                                k.protocol.as_str(),
                                k.port
                            ),
                        )
                    };
                }
                _ => match renumbered(&r.effective_ipv4.reason, bump) {
                    Some(reason) => r.effective_ipv4.reason = reason,
                    None => {
                        for p in &mut r.processes {
                            p.pid = p.pid % 4_000_000 + bump;
                        }
                    }
                },
            }
        }
    }

    /// Opens `n` listeners on free high ports, as a scan would find them, and nothing
    /// else: a snapshot of the result differs from the host's stored one by exactly `n`
    /// listeners opened. Returns how many it opened (fewer only when no port is free).
    pub fn open(&mut self, n: usize) -> usize {
        let opened = (0..n).filter(|_| self.open_filler().is_some()).count();
        mark_hidden(&mut self.state);
        opened
    }

    /// One scan's worth of change: one or two listeners opened, closed or changed,
    /// keeping the count near where it started. Returns what changed (never empty).
    pub fn step(&mut self) -> Changes {
        let before = self.state.clone();
        for _ in 0..1 + self.rng.below(2) {
            let n = self.fillers.len();
            let roll = self.rng.below(3);
            if n + 2 < self.target || (roll == 0 && n <= self.target + 2) {
                self.open_filler();
            } else if n > self.target + 2 || roll == 1 {
                self.close_filler();
            } else {
                self.change_filler();
            }
        }
        mark_hidden(&mut self.state);
        let changes = diff(&before, &self.state);
        if changes.is_empty() {
            // Every change cancelled out (e.g. two pid bumps that wrapped): open one.
            self.open_filler();
            mark_hidden(&mut self.state);
            return diff(&before, &self.state);
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use listenscope_proto::v1;

    #[test]
    fn records_pass_the_collectors_validation() {
        for i in 0..200 {
            let mut h = Host::new(i, 50);
            assert_eq!(h.state.len(), 50);
            for _ in 0..20 {
                let c = h.step();
                assert!(!c.is_empty());
            }
            for r in h.state.values() {
                let back = ListenerRecord::try_from(v1::Listener::from(r)).unwrap();
                assert_eq!(&back, r);
                let mut bounded = r.clone();
                bounded.bound();
                assert_eq!(&bounded, r, "records are within the agent's bounds");
            }
        }
        assert_eq!(Host::new(1, 3).state.len(), 3);
    }

    /// The fleet carries every verdict, in realistic shares.
    #[test]
    fn verdicts_are_a_realistic_mix() {
        let mut seen: HashMap<&'static str, usize> = HashMap::new();
        let mut hidden_open = 0;
        let mut hidden = 0;
        for i in 0..300 {
            let h = Host::new(i, 50);
            for r in h.state.values() {
                for a in [&r.effective_ipv4, &r.effective_ipv6] {
                    *seen.entry(a.verdict.as_str()).or_default() += 1;
                }
                if r.hidden_ipv4_exposure && r.trap {
                    hidden += 1;
                    hidden_open += usize::from(r.effective_ipv4.verdict.lets_through());
                }
            }
        }
        for e in Effective::ALL {
            assert!(
                seen.get(e.as_str()).is_some_and(|&n| n > 0),
                "{e:?}: {seen:?}"
            );
        }
        assert!(
            hidden_open > 0 && hidden_open < hidden,
            "{hidden_open} of {hidden}"
        );
    }

    #[test]
    fn opening_changes_nothing_else() {
        for i in 0..200 {
            let before = Host::new(i, 50).state;
            let mut h = Host::new(i, 50);
            assert_eq!(h.state, before, "the same number gives the same inventory");
            assert_eq!(h.open(1), 1);
            let c = diff(&before, &h.state);
            assert_eq!((c.opened.len(), c.closed.len(), c.changed.len()), (1, 0, 0));
        }
    }
}
