//! The firewall lab: real packets as the judge of what a namespace's nftables/iptables rules
//! let through, so the agent's "effective exposure" is checked against the kernel itself.
//!
//! One [`Lab`] is four throwaway namespaces (names unique per test process, so labs run in
//! parallel), the topology of `tests/data/firewall/README.md`:
//!
//! ```text
//! c1  eth0 198.51.100.100 2001:db8:100::100 <-> server eth0 198.51.100.10 2001:db8:100::10
//! c2  eth0 203.0.113.200  2001:db8:200::200 <-> server eth1 203.0.113.10  2001:db8:200::10
//! ctr eth0 192.0.2.2 (default via 192.0.2.1) <-> server ct0  192.0.2.1 (ip_forward=1)
//! ```
//!
//! The container answers `ctr:80` on TCP 192.0.2.2:80 from the start; [`Lab::listen`] adds
//! the server's dual-stack listeners (`::`, `IPV6_V6ONLY=0`) answering `host:PORT`.
//! [`Lab::load`] resets the server's firewall state and loads a ruleset ([`Load`]);
//! [`Lab::probe`] sends real connections and datagrams from c1 and c2 over IPv4 and IPv6, all
//! at once, and returns a [`ProbeTable`] in the `observed.txt` format; [`expected_verdict`]
//! turns a row of it into the per-family verdict the product must report. [`Fixture`] reads
//! a fixture folder; [`Lab::run`] is listen + load + probe for one.
//!
//! Listeners are threads of the test process holding sockets opened inside the namespaces
//! (rejected: child processes, which a killed test run would leave behind; a thread dies with
//! the process). Dropping the lab stops them, kills by PID any process still inside its
//! namespaces (a case script's leftovers) and deletes the namespaces; it runs during a
//! panic too, so a failing test cleans up. Nothing outside the lab's own namespaces is touched.
//!
//! A TCP outcome is what became of the first SYN ([`CONNECT_TIMEOUT`] explains why), a UDP
//! outcome what came back for one datagram within [`PROBE_TIMEOUT`].
//!
//! Needs root and `nft`, `iptables-nft-restore`, `iptables-legacy-restore`, `conntrack`
//! (Debian: nftables, iptables, conntrack), and `ipset` for the case that uses ipsets;
//! `scripts/test` installs them.

#![allow(dead_code)] // each test binary uses a different part of the harness
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use listenscope_testkit::{Bind, Netns, TempDir, Veth, require_root};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How long a probe waits for an answer: a UDP reply, or what a TCP listener writes once
/// connected.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a TCP probe waits for the handshake: less than the initial SYN retransmission
/// timeout (1 s), so a TCP outcome is the fate of the first SYN. Deliberately: an ICMP error
/// that answers the first SYN arrives, on a veth lab, while `connect()` still holds the
/// socket lock; IPv4 reports it at once, IPv6 keeps it as a soft error (`nstat`:
/// `TcpExtLockDroppedIcmps`) and fails only when the retransmitted SYN's ICMPv6 comes back,
/// about 1.02 s later. Waiting past that would turn the fixtures' `TIMEOUT` for IPv6 TCP to
/// an `icmpx admin-prohibited` reject (c05, c20) into a timing-dependent `UNREACH`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(900);
/// How long loading a case (or any one lab command) may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How often listener threads look at the stop flag (their accept/recv timeout).
const LISTENER_TICK: Duration = Duration::from_millis(50);

/// The server's address on c1's link (`eth0`).
pub const SERVER_C1_V4: &str = "198.51.100.10";
pub const SERVER_C1_V6: &str = "2001:db8:100::10";
/// The server's address on c2's link (`eth1`).
pub const SERVER_C2_V4: &str = "203.0.113.10";
pub const SERVER_C2_V6: &str = "2001:db8:200::10";
pub const C1_V4: &str = "198.51.100.100";
pub const C1_V6: &str = "2001:db8:100::100";
pub const C2_V4: &str = "203.0.113.200";
pub const C2_V6: &str = "2001:db8:200::200";
/// The server's address on the container link (`ct0`).
pub const SERVER_CT_V4: &str = "192.0.2.1";
pub const CTR_V4: &str = "192.0.2.2";
/// The port the container answers on (TCP).
pub const CTR_PORT: u16 = 80;

// ---------------------------------------------------------------------------------------
// What is probed, and what happened

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One probed port: `tcp:N`, `udp:N`, or `udp:N@S` (sent from source port S).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Probe {
    pub proto: Proto,
    pub port: u16,
    /// The client's source port; `None`: any.
    pub sport: Option<u16>,
}

impl Probe {
    pub fn tcp(port: u16) -> Probe {
        Probe {
            proto: Proto::Tcp,
            port,
            sport: None,
        }
    }

    pub fn udp(port: u16) -> Probe {
        Probe {
            proto: Proto::Udp,
            port,
            sport: None,
        }
    }

    pub fn with_sport(mut self, sport: u16) -> Probe {
        self.sport = Some(sport);
        self
    }

    /// The probes of a `# PROBE:` line (`tcp:22 udp:68@67 …`).
    pub fn parse_list(s: &str) -> Result<Vec<Probe>, String> {
        s.split_whitespace().map(str::parse).collect()
    }
}

impl FromStr for Probe {
    type Err = String;

    fn from_str(s: &str) -> Result<Probe, String> {
        let bad = || format!("probe {s:?}: want tcp:PORT, udp:PORT or udp:PORT@SOURCEPORT");
        let (proto, rest) = s.split_once(':').ok_or_else(bad)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad()),
        };
        let (port, sport) = match rest.split_once('@') {
            Some((p, sp)) => (p, Some(sp.parse().map_err(|_| bad())?)),
            None => (rest, None),
        };
        Ok(Probe {
            proto,
            port: port.parse().map_err(|_| bad())?,
            sport,
        })
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.sport {
            Some(sp) => write!(f, "{proto}:{}@{sp}", self.port),
            None => write!(f, "{proto}:{}", self.port),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    /// On the server's `eth0`, network 198.51.100.0/24 and 2001:db8:100::/64.
    C1,
    /// On the server's `eth1`, network 203.0.113.0/24 and 2001:db8:200::/64.
    C2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// One column of a probe table: a client and an IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Column {
    pub client: Client,
    pub family: Family,
}

/// The columns of a probe table, in `observed.txt` order: c1-v4, c2-v4, c1-v6, c2-v6.
pub const COLUMNS: [Column; 4] = [
    Column {
        client: Client::C1,
        family: Family::V4,
    },
    Column {
        client: Client::C2,
        family: Family::V4,
    },
    Column {
        client: Client::C1,
        family: Family::V6,
    },
    Column {
        client: Client::C2,
        family: Family::V6,
    },
];

impl Column {
    /// (client's own address, the server's address on the client's link).
    pub fn addrs(self) -> (IpAddr, IpAddr) {
        let (src, dst) = match (self.client, self.family) {
            (Client::C1, Family::V4) => (C1_V4, SERVER_C1_V4),
            (Client::C2, Family::V4) => (C2_V4, SERVER_C2_V4),
            (Client::C1, Family::V6) => (C1_V6, SERVER_C1_V6),
            (Client::C2, Family::V6) => (C2_V6, SERVER_C2_V6),
        };
        (src.parse().unwrap(), dst.parse().unwrap())
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.client {
            Client::C1 => "c1",
            Client::C2 => "c2",
        };
        let v = match self.family {
            Family::V4 => "v4",
            Family::V6 => "v6",
        };
        write!(f, "{c}-{v}")
    }
}

/// What one probe got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connected (TCP) or answered (UDP) by the server's listener on that port: `host:PORT`.
    Host(u16),
    /// Connected and answered by the container's listener: `ctr:PORT`.
    Ctr(u16),
    /// No handshake within [`CONNECT_TIMEOUT`] (TCP), no answer within [`PROBE_TIMEOUT`]
    /// (UDP): `TIMEOUT`.
    Timeout,
    /// TCP reset or ICMP port unreachable: `REFUSED`.
    Refused,
    /// ICMP administratively prohibited, host or network unreachable: `UNREACH`.
    Unreach,
    /// `n/mok`: n of m repeated tries connected (in fixtures; [`Lab::probe`] tries once).
    Tries { ok: u32, of: u32 },
    /// Anything else, shown as is: `CONNECTED` (a handshake without an answer), `ERR:…`,
    /// an unexpected answer. Never in a fixture, so it always shows up in a diff.
    Other(String),
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Outcome, String> {
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("outcome {s:?}: bad port"))
        };
        Ok(match s {
            "TIMEOUT" => Outcome::Timeout,
            "REFUSED" => Outcome::Refused,
            "UNREACH" => Outcome::Unreach,
            _ => {
                if let Some(p) = s.strip_prefix("host:") {
                    Outcome::Host(port(p)?)
                } else if let Some(p) = s.strip_prefix("ctr:") {
                    Outcome::Ctr(port(p)?)
                } else if let Some((n, m)) = s.strip_suffix("ok").and_then(|t| t.split_once('/')) {
                    let num = |x: &str| x.parse::<u32>().map_err(|_| format!("outcome {s:?}"));
                    Outcome::Tries {
                        ok: num(n)?,
                        of: num(m)?,
                    }
                } else {
                    return Err(format!(
                        "outcome {s:?}: not host:N, ctr:N, TIMEOUT, REFUSED, UNREACH or n/mok"
                    ));
                }
            }
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Host(p) => write!(f, "host:{p}"),
            Outcome::Ctr(p) => write!(f, "ctr:{p}"),
            Outcome::Timeout => f.write_str("TIMEOUT"),
            Outcome::Refused => f.write_str("REFUSED"),
            Outcome::Unreach => f.write_str("UNREACH"),
            Outcome::Tries { ok, of } => write!(f, "{ok}/{of}ok"),
            Outcome::Other(s) => f.write_str(s),
        }
    }
}

/// Probed ports × [`COLUMNS`], in probe order: what `observed.txt` holds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProbeTable {
    pub rows: Vec<(Probe, [Outcome; 4])>,
}

impl ProbeTable {
    /// Parses `observed.txt`: an optional `== name: title` line, the column header, one row
    /// per probe.
    pub fn parse(text: &str) -> Result<ProbeTable, String> {
        let mut rows = Vec::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first() {
                None => continue,
                Some(&"==") => continue,
                Some(&"port") => {
                    let want: Vec<String> = COLUMNS.iter().map(ToString::to_string).collect();
                    if words[1..] != want {
                        return Err(format!("columns {:?}, want {want:?}", &words[1..]));
                    }
                }
                Some(probe) => {
                    if words.len() != 5 {
                        return Err(format!("row {line:?}: want a probe and 4 outcomes"));
                    }
                    let cells: Vec<Outcome> = words[1..]
                        .iter()
                        .map(|w| w.parse())
                        .collect::<Result<_, _>>()?;
                    rows.push((probe.parse()?, cells.try_into().unwrap()));
                }
            }
        }
        Ok(ProbeTable { rows })
    }

    /// The outcomes of one probe, in [`COLUMNS`] order.
    pub fn row(&self, probe: Probe) -> Option<&[Outcome; 4]> {
        self.rows.iter().find(|(p, _)| *p == probe).map(|(_, r)| r)
    }

    pub fn get(&self, probe: Probe, path: Column) -> Option<&Outcome> {
        let col = COLUMNS.iter().position(|c| *c == path)?;
        self.row(probe).map(|r| &r[col])
    }

    /// The verdict for one probed port and family (see [`expected_verdict`]).
    pub fn verdict(&self, probe: Probe, family: Family) -> Option<Verdict> {
        self.row(probe).map(|r| expected_verdict(probe, r, family))
    }

    pub fn probes(&self) -> Vec<Probe> {
        self.rows.iter().map(|(p, _)| *p).collect()
    }

    /// The `observed.txt` text, headed `== name: title`.
    pub fn render(&self, name: &str, title: &str) -> String {
        let mut out = format!("== {name}: {title}\n");
        let line = |first: &str, cells: Vec<String>| {
            let cells: Vec<String> = cells.iter().map(|c| format!("{c:<12}")).collect();
            format!("   {first:<9} {}\n", cells.join(" "))
        };
        out += &line("port", COLUMNS.iter().map(ToString::to_string).collect());
        for (probe, cells) in &self.rows {
            out += &line(
                &probe.to_string(),
                cells.iter().map(ToString::to_string).collect(),
            );
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Verdicts

/// The per-family exposure of a port, as the product reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Both clients reached the listener on that port.
    Open,
    /// Neither client connected (timeout, reset, ICMP error).
    Filtered,
    /// Exactly one of the two clients reached it.
    Restricted,
    /// Some client was answered by another listener (the container, through a DNAT): the
    /// port leads elsewhere.
    Diverted,
}

/// The verdict for `probe` in one `family`, from its row of a probe table (outcomes in
/// [`COLUMNS`] order): any answer by a listener other than the server's one on the probed
/// port (`ctr:80`; `host:N` for another N, a redirect) → [`Verdict::Diverted`]; otherwise the
/// number of clients answered by `host:PORT` (an `n/mok` with n > 0 counts as reached):
/// 2 → open, 1 → restricted, 0 → filtered.
pub fn expected_verdict(probe: Probe, row: &[Outcome; 4], family: Family) -> Verdict {
    let mut reached = 0;
    let mut diverted = false;
    for (col, outcome) in COLUMNS.iter().zip(row) {
        if col.family != family {
            continue;
        }
        match outcome {
            Outcome::Host(p) if *p == probe.port => reached += 1,
            Outcome::Host(_) | Outcome::Ctr(_) => diverted = true,
            Outcome::Tries { ok, .. } if *ok > 0 => reached += 1,
            _ => {}
        }
    }
    match (diverted, reached) {
        (true, _) => Verdict::Diverted,
        (false, 0) => Verdict::Filtered,
        (false, 1) => Verdict::Restricted,
        (false, _) => Verdict::Open,
    }
}

// ---------------------------------------------------------------------------------------
// Cases

/// How a case's rules get into the server namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Load {
    /// `nft -f FILE`.
    Nft(PathBuf),
    /// `bash FILE` in the server namespace, from the file's folder, with `iptables`,
    /// `ip6tables` and their `-restore`/`-save` forms running the nf_tables backend
    /// (`*-nft*`) whatever the machine's alternatives say; `*-legacy*` and `nft` as named.
    Script(PathBuf),
    /// `iptables-nft-save` + `ip6tables-nft-save` output (as `captured.iptables-nft.txt`),
    /// each part restored with its family's `*-nft-restore`.
    IptablesNft(PathBuf),
    /// The same for `iptables-legacy-save` + `ip6tables-legacy-save` output.
    IptablesLegacy(PathBuf),
}

/// A fixture folder under `tests/data/firewall/`.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// The folder's name (`c05-drop-vs-reject`).
    pub name: String,
    /// The `# CASE:` line.
    pub title: String,
    pub dir: PathBuf,
    /// The `# PROBE:` line.
    pub probes: Vec<Probe>,
    pub load: Load,
}

/// `agent/tests/data/firewall`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/firewall")
}

impl Fixture {
    /// Names of all fixture folders (those with a `case.nft` or `case.sh`), sorted.
    pub fn names() -> Vec<String> {
        let dir = fixtures_dir();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .filter(|e| e.path().join("case.nft").exists() || e.path().join("case.sh").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Reads fixture `name`. A `case.nft` is loaded with `nft -f`; a `case.sh` is run
    /// ([`Load::Script`]), except one that drives a firewall daemon (ufw, firewalld): the lab
    /// does not run daemons, it loads what the daemon left in the kernel,
    /// `captured.iptables-nft.txt` if there is one, else `captured.nft.txt`.
    pub fn open(name: &str) -> Fixture {
        let dir = fixtures_dir().join(name);
        let (case_file, text) = ["case.nft", "case.sh"]
            .iter()
            .map(|f| dir.join(f))
            .find_map(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t)))
            .unwrap_or_else(|| panic!("{}: no case.nft or case.sh", dir.display()));
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("{}: no `{key}` line", case_file.display()))
        };
        let title = header("# CASE:");
        let probes = Probe::parse_list(&header("# PROBE:"))
            .unwrap_or_else(|e| panic!("{}: {e}", case_file.display()));
        let load = if case_file.ends_with("case.nft") {
            Load::Nft(case_file)
        } else if drives_a_daemon(&text) {
            let ipt = dir.join("captured.iptables-nft.txt");
            if ipt.exists() {
                Load::IptablesNft(ipt)
            } else {
                Load::Nft(dir.join("captured.nft.txt"))
            }
        } else {
            Load::Script(case_file)
        };
        Fixture {
            name: name.to_string(),
            title,
            dir,
            probes,
            load,
        }
    }

    /// The committed ground truth, `observed.txt`.
    pub fn observed(&self) -> ProbeTable {
        let p = self.dir.join("observed.txt");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        ProbeTable::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }
}

/// Whether a case script runs ufw or firewalld (a command word outside comments).
fn drives_a_daemon(script: &str) -> bool {
    script
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')))
        .any(|w| w == "ufw" || w == "firewalld")
}

// ---------------------------------------------------------------------------------------
// The lab

/// Commands the lab needs, with the Debian package providing each.
const TOOLS: [(&str, &str); 6] = [
    ("nft", "nftables"),
    ("iptables-nft-restore", "iptables"),
    ("ip6tables-nft-restore", "iptables"),
    ("iptables-legacy-restore", "iptables"),
    ("ip6tables-legacy-restore", "iptables"),
    ("conntrack", "conntrack"),
];

/// The full path of `program` in `PATH` or the sbin directories (tests may run without
/// them in `PATH`).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn require_tools() {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(cmd, _)| find_program(cmd).is_none())
        .map(|(_, pkg)| *pkg)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        missing.is_empty(),
        "the firewall lab needs packages {missing:?} (apt-get install {}); scripts/test \
         installs them",
        missing.join(" ")
    );
}

/// A running lab. Dropping it stops its listeners, kills what runs in its namespaces and
/// deletes them.
#[derive(Debug)]
pub struct Lab {
    pub server: Netns,
    pub c1: Netns,
    pub c2: Netns,
    pub ctr: Netns,
    /// `iptables`, `iptables-restore`, … wrappers running the nf_tables backend.
    shims: TempDir,
    stop: Arc<AtomicBool>,
    listeners: Vec<JoinHandle<()>>,
    /// Ports the server listens on.
    listening: BTreeSet<(Proto, u16)>,
}

impl Lab {
    /// Builds the topology and starts the container's `ctr:80` listener. The server has no
    /// listeners and no rules yet.
    pub fn new() -> Lab {
        require_root();
        require_tools();
        let server = Netns::new();
        let c1 = Netns::new();
        let c2 = Netns::new();
        let ctr = Netns::new();
        // The pairs live inside the namespaces and go with them; renamed to the fixtures'
        // interface names (only unique within a namespace).
        for (peer, server_if) in [(&c1, "eth0"), (&c2, "eth1"), (&ctr, "ct0")] {
            let veth = Veth::new(Some(&server), Some(peer));
            server.ip(&["link", "set", "dev", &veth.a, "name", server_if]);
            peer.ip(&["link", "set", "dev", &veth.b, "name", "eth0"]);
            server.ip(&["link", "set", "dev", server_if, "up"]);
            peer.ip(&["link", "set", "dev", "eth0", "up"]);
        }
        let addr = |ns: &Netns, a: &str, dev: &str| {
            if a.contains(':') {
                ns.ip(&["addr", "add", a, "dev", dev, "nodad"]);
            } else {
                ns.ip(&["addr", "add", a, "dev", dev]);
            }
        };
        addr(&server, "198.51.100.10/24", "eth0");
        addr(&server, "2001:db8:100::10/64", "eth0");
        addr(&server, "203.0.113.10/24", "eth1");
        addr(&server, "2001:db8:200::10/64", "eth1");
        addr(&server, "192.0.2.1/24", "ct0");
        addr(&c1, "198.51.100.100/24", "eth0");
        addr(&c1, "2001:db8:100::100/64", "eth0");
        addr(&c2, "203.0.113.200/24", "eth0");
        addr(&c2, "2001:db8:200::200/64", "eth0");
        addr(&ctr, "192.0.2.2/24", "eth0");
        ctr.ip(&["route", "add", "default", "via", SERVER_CT_V4]);
        server.sysctl("net.ipv4.ip_forward", "1");

        let mut lab = Lab {
            server,
            c1,
            c2,
            ctr,
            shims: nft_shims(),
            stop: Arc::new(AtomicBool::new(false)),
            listeners: Vec::new(),
            listening: BTreeSet::new(),
        };
        let sock = lab.ctr.enter(|| Bind::tcp(CTR_V4, CTR_PORT).open());
        lab.spawn_listener(sock, false, format!("ctr:{CTR_PORT}"));
        lab
    }

    /// Starts the server's listeners for these probes (`::`, dual-stack, answering
    /// `host:PORT`); ports it already listens on are skipped.
    pub fn listen(&mut self, probes: &[Probe]) {
        for p in probes {
            if !self.listening.insert((p.proto, p.port)) {
                continue;
            }
            let udp = p.proto == Proto::Udp;
            let bind = if udp {
                Bind::udp("::", p.port)
            } else {
                Bind::tcp("::", p.port)
            }
            .v6only(false);
            let sock = self.server.enter(|| bind.open());
            self.spawn_listener(sock, udp, format!("host:{}", p.port));
        }
    }

    /// One thread serving one socket until the lab is dropped: TCP writes `reply` to each
    /// connection and closes it; UDP answers each datagram with `reply`.
    fn spawn_listener(&mut self, sock: Socket, udp: bool, reply: String) {
        sock.set_nonblocking(false).unwrap();
        // accept() and recv() both give up after SO_RCVTIMEO: the thread sees `stop`.
        sock.set_read_timeout(Some(LISTENER_TICK)).unwrap();
        let stop = Arc::clone(&self.stop);
        let handle = std::thread::spawn(move || {
            if udp {
                let sock = UdpSocket::from(sock);
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(reply.as_bytes(), peer);
                    }
                }
            } else {
                let sock = TcpListener::from(sock);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((mut conn, _)) = sock.accept() {
                        let _ = conn.write_all(reply.as_bytes());
                    }
                }
            }
        });
        self.listeners.push(handle);
    }

    /// Clears the server's firewall state: `nft flush ruleset` (iptables-nft tables are nft
    /// tables), every iptables-legacy table that exists emptied with ACCEPT policies (one
    /// that does not exist is not created), ipsets destroyed (when `ipset` is installed),
    /// conntrack flushed; then the neighbour tables of all four namespaces.
    pub fn reset(&self) {
        self.run_in(&["nft", "flush", "ruleset"], None);
        for (names, restore) in [
            ("ip_tables_names", "iptables-legacy-restore"),
            ("ip6_tables_names", "ip6tables-legacy-restore"),
        ] {
            let tables = self.server.enter(|| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{names}"))
                    .unwrap_or_default()
            });
            let input: String = tables.split_whitespace().map(empty_legacy_table).collect();
            if !input.is_empty() {
                self.run_in(&[restore], Some(&input));
            }
        }
        if find_program("ipset").is_some() {
            self.run_in(&["ipset", "destroy"], None);
        }
        self.run_in(&["conntrack", "-F"], None);
        for ns in [&self.server, &self.c1, &self.c2, &self.ctr] {
            ns.ip(&["neigh", "flush", "all"]);
        }
    }

    /// [`reset`](Lab::reset), then loads `load` into the server namespace.
    pub fn load(&self, load: &Load) {
        self.reset();
        match load {
            Load::Nft(file) => {
                self.run_in(&["nft", "-f", &file.to_string_lossy()], None);
            }
            Load::Script(file) => {
                let mut path = OsString::from(self.shims.path());
                path.push(":");
                path.push(std::env::var_os("PATH").unwrap_or_default());
                path.push(":/usr/sbin:/sbin");
                let mut cmd = self.command_in(&["bash", &file.to_string_lossy()]);
                cmd.env("PATH", path);
                if let Some(dir) = file.parent() {
                    cmd.current_dir(dir);
                }
                finish(cmd, None, &format!("case script {}", file.display()));
            }
            Load::IptablesNft(file) => self.restore(file, "nft"),
            Load::IptablesLegacy(file) => self.restore(file, "legacy"),
        }
    }

    /// Restores a two-family `*-save` dump with `iptables-BACKEND-restore` and
    /// `ip6tables-BACKEND-restore`.
    fn restore(&self, file: &Path, backend: &str) {
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (v4, v6) = split_save(&text);
        if !v4.trim().is_empty() {
            self.run_in(&[&format!("iptables-{backend}-restore")], Some(&v4));
        }
        if !v6.trim().is_empty() {
            self.run_in(&[&format!("ip6tables-{backend}-restore")], Some(&v6));
        }
    }

    /// Listeners for the fixture's probes, its rules loaded, its probes sent.
    pub fn run(&mut self, fixture: &Fixture) -> ProbeTable {
        self.listen(&fixture.probes);
        self.load(&fixture.load);
        self.probe(&fixture.probes)
    }

    /// Sends every probe from c1 and c2 over IPv4 and IPv6 to the server's address on that
    /// client's link, all in parallel (one thread each): a table takes about one
    /// [`PROBE_TIMEOUT`]. The server must listen on the probed ports
    /// ([`listen`](Lab::listen)).
    pub fn probe(&self, probes: &[Probe]) -> ProbeTable {
        let rows = std::thread::scope(|s| {
            let handles: Vec<(Probe, Vec<_>)> = probes
                .iter()
                .map(|&probe| {
                    let cols = COLUMNS
                        .iter()
                        .map(|&col| {
                            let ns = match col.client {
                                Client::C1 => &self.c1,
                                Client::C2 => &self.c2,
                            };
                            s.spawn(move || ns.enter(|| probe_once(probe, col)))
                        })
                        .collect();
                    (probe, cols)
                })
                .collect();
            handles
                .into_iter()
                .map(|(probe, cols)| {
                    let cells: Vec<Outcome> = cols.into_iter().map(|h| h.join().unwrap()).collect();
                    (probe, cells.try_into().unwrap())
                })
                .collect()
        });
        ProbeTable { rows }
    }

    /// `ip netns exec SERVER ARGV…`, not yet started.
    fn command_in(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server.name]).args(argv);
        cmd
    }

    /// Runs `argv` in the server namespace (stdin from `input`); it must succeed in time.
    pub fn run_in(&self, argv: &[&str], input: Option<&str>) -> Output {
        finish(self.command_in(argv), input, &argv.join(" "))
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.listeners.drain(..) {
            let _ = h.join();
        }
        // Leftovers of case scripts: processes whose namespace is one of ours. Only they
        // are killed, by PID; the namespaces go when the `Netns` fields drop.
        let me = std::process::id();
        for ns in [&self.server, &self.c1, &self.c2, &self.ctr] {
            let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &ns.name])
                .stderr(Stdio::null())
                .output()
            else {
                continue;
            };
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .filter(|&p| p as u32 != me)
            {
                // SAFETY: kill(2) on a pid found inside this lab's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Runs `cmd` with `input` on stdin and its output in files (not pipes: a process a case
/// script leaves in the background would hold a pipe open); panics with its output when it
/// fails, and kills it (by PID) when it takes longer than [`COMMAND_TIMEOUT`].
fn finish(mut cmd: Command, input: Option<&str>, what: &str) -> Output {
    let dir = TempDir::new("fwlab-out");
    let file = |name: &str| {
        std::fs::File::create(dir.join(name)).unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(file("stdout"))
    .stderr(file("stderr"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: writing its input: {e}"));
    }
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {COMMAND_TIMEOUT:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_default();
    let out = Output {
        status,
        stdout: read("stdout"),
        stderr: read("stderr"),
    };
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory of wrappers named `iptables`, `iptables-restore`, `iptables-save` and the
/// `ip6tables` ones, each exec'ing its `-nft` form by full path: a case script gets the
/// nf_tables backend whatever `update-alternatives` chose on this machine.
fn nft_shims() -> TempDir {
    let dir = TempDir::new("fwlab-shims");
    for fam in ["iptables", "ip6tables"] {
        for suffix in ["", "-restore", "-save"] {
            let target = format!("{fam}-nft{suffix}");
            let Some(full) = find_program(&target) else {
                continue;
            };
            let shim = dir.join(format!("{fam}{suffix}"));
            std::fs::write(
                &shim,
                format!("#!/bin/sh\nexec {} \"$@\"\n", full.display()),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", shim.display()));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    dir
}

/// `iptables-restore` input emptying legacy table `table`: no rules, no user chains, every
/// built-in chain ACCEPT.
fn empty_legacy_table(table: &str) -> String {
    let chains: &[&str] = match table {
        "filter" | "security" => &["INPUT", "FORWARD", "OUTPUT"],
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        "raw" => &["PREROUTING", "OUTPUT"],
        _ => &[],
    };
    let mut s = format!("*{table}\n");
    for c in chains {
        s += &format!(":{c} ACCEPT [0:0]\n");
    }
    s + "COMMIT\n"
}

/// Splits an `iptables-save` + `ip6tables-save` dump at its `# Generated by …` lines into
/// the IPv4 and the IPv6 part (without such lines: all IPv4).
pub fn split_save(text: &str) -> (String, String) {
    let (mut v4, mut v6) = (String::new(), String::new());
    let mut in_v6 = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# Generated by ") {
            in_v6 = rest.starts_with("ip6tables");
        }
        let part = if in_v6 { &mut v6 } else { &mut v4 };
        part.push_str(line);
        part.push('\n');
    }
    (v4, v6)
}

// ---------------------------------------------------------------------------------------
// Probes (run on a thread inside a client namespace)

fn probe_once(probe: Probe, col: Column) -> Outcome {
    let (src, dst) = col.addrs();
    let target = SocketAddr::new(dst, probe.port);
    let source = SocketAddr::new(src, probe.sport.unwrap_or(0));
    let result = match probe.proto {
        Proto::Tcp => tcp_probe(source, target),
        Proto::Udp => udp_probe(source, target),
    };
    result.unwrap_or_else(|e| error_outcome(&e))
}

fn new_socket(source: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(source), ty, Some(proto))?;
    if source.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(source))?;
    Ok(s)
}

/// Connects ([`CONNECT_TIMEOUT`]), then reads the listener's answer until it closes.
fn tcp_probe(source: SocketAddr, target: SocketAddr) -> std::io::Result<Outcome> {
    let s = new_socket(source, Type::STREAM, Protocol::TCP)?;
    s.connect_timeout(&SockAddr::from(target), CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match (&s).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => return Err(e),
        }
        if answer.len() > 256 {
            break;
        }
    }
    Ok(answer_outcome(&answer))
}

/// Sends one datagram on a connected socket (so ICMP errors come back as errors) and waits
/// for the answer.
fn udp_probe(source: SocketAddr, target: SocketAddr) -> std::io::Result<Outcome> {
    let s = new_socket(source, Type::DGRAM, Protocol::UDP)?;
    s.connect(&SockAddr::from(target))?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    let s = UdpSocket::from(s);
    s.send(b"probe")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    Ok(answer_outcome(&buf[..n]))
}

fn answer_outcome(answer: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(answer);
    if text.is_empty() {
        return Outcome::Other("CONNECTED".into());
    }
    match text.parse() {
        Ok(o @ (Outcome::Host(_) | Outcome::Ctr(_))) => o,
        _ => Outcome::Other(format!("ANSWER:{}", text.escape_debug())),
    }
}

fn error_outcome(e: &std::io::Error) -> Outcome {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        return Outcome::Timeout;
    }
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Outcome::Refused,
        // ICMP admin-prohibited: EHOSTUNREACH (v4), EACCES (v6).
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EACCES) => Outcome::Unreach,
        _ => Outcome::Other(format!("ERR:{e}")),
    }
}
