//! Reading a network namespace's firewall rulesets (nftables, iptables-nft, iptables-legacy):
//! the OS half of "effective exposure". Parsing and evaluation live in `crate::firewall`
//! (pure); this module only fetches raw text and says what it could not fetch.
//!
//! Everything here reads the namespace of the **calling thread**: the agent calls
//! [`read_current`] / [`probe_current`] on its per-namespace thread after `setns`. The
//! netlink socket is opened on that thread, `/proc/thread-self/net/*` is that thread's
//! namespace, and a child process (`nft`, `iptables-*-save`) inherits the calling thread's
//! namespace.
//!
//! What is read, and when (FIREWALL_FACTS.md has the measurements behind these choices):
//! - **nftables generation id and table list** over a `NETLINK_NETFILTER` socket
//!   (`NFT_MSG_GETGEN`, `NFT_MSG_GETTABLE` dump): no binary needed. The generation is read
//!   first, so a change made while the rest is read shows as a new generation at the next
//!   probe. Answers are decoded here by hand (a few fixed-layout attributes; the
//!   `netlink-packet-netfilter` crate was not worth a dependency for two messages).
//! - **`nft -j list ruleset`** only when at least one nftables table exists.
//! - **`iptables-nft-save` / `ip6tables-nft-save`** whenever an `ip` / `ip6` table named
//!   like an iptables table (filter, nat, mangle, raw, security) exists. The alternative,
//!   "only when nft's JSON shows `xt` expressions", was rejected: iptables-nft translates
//!   plain matches (`-p tcp --dport 99`) to native expressions, so such a table has no `xt`
//!   at all yet is still iptables-nft's. Run without `-t`: it then lists only existing
//!   tables and creates none (checked: with `-t nat` on a missing table it prints an
//!   invented empty table). Caveat for the parser: on a *native* nft table named like an
//!   iptables one, iptables-nft-save 1.8.9 silently prints rules it cannot translate
//!   wrongly (`ip saddr @set drop` came out as `-A INPUT -j DROP`) and invents missing
//!   builtin chains; prefer nft's JSON for tables without `xt` expressions.
//! - **legacy tables**: their names from `/proc/thread-self/net/ip{,6}_tables_names`, and
//!   `iptables-legacy-save -t NAME` for exactly those names, one run per table. Reading a
//!   legacy table that does not exist instantiates it, so nothing else is ever asked for.
//!
//! Binaries run with an empty environment (`LC_ALL=C` and a fixed `PATH`), stdin from
//! `/dev/null`, in their own process group, with a time bound (the group is killed and the
//! child reaped when it passes) and an output bound. Every failure becomes a
//! [`FirewallProblem`] naming what was not read, why, and the fix; output that is not
//! complete is never returned.
//!
//! [`FirewallCache`] is plain data: which namespace was read when, at which generation,
//! and a pure decision ([`FirewallCache::needs_read`]) of whether to read it again.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::procfs::parse_cap_eff;

/// `CAP_NET_ADMIN`: every nfnetlink request, reads included, needs it.
pub const CAP_NET_ADMIN: u32 = 12;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_GEN_ID: u16 = 1;

const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg`: family, version, res_id (big-endian).
const NFGENMSG_LEN: usize = 4;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// Set on dump answers when the ruleset changed while the dump ran.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `SO_NETNS_COOKIE` (Linux 5.14): a 64-bit id of the socket's namespace that is never
/// reused, unlike nsfs inode numbers (the lowest free one is handed out again at once).
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_NETNS_COOKIE: libc::c_int = 71;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_NETNS_COOKIE: libc::c_int = 0x0050;

/// Most tables accepted from one dump; more is treated as a hostile or broken answer.
pub const MAX_TABLES: usize = 10_000;
/// Most bytes accepted from one netlink dump.
pub const MAX_DUMP_BYTES: usize = 16 << 20;
/// Dumps interrupted by a concurrent ruleset change are restarted this many times.
const DUMP_ATTEMPTS: usize = 3;
/// Receive buffer: nfnetlink fills dump datagrams up to ~32 KiB; twice that is safe (a
/// larger datagram is detected with MSG_TRUNC and reported, never half-decoded).
const RECV_BUF: usize = 64 * 1024;
/// Bound on one netlink read: answers come at once, so this only guards against a bug.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a child's stderr kept (for the first line of an error).
const STDERR_KEPT: usize = 4096;
/// `PATH` given to children (they exec nothing, but a wrapper script might).
const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Searched after `PATH`: agents started by systemd often have no sbin in their `PATH`.
const SBIN_DIRS: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];
/// iptables' table names: an `ip`/`ip6` nftables table with one of these names is read
/// with `ip(6)tables-nft-save` as well.
pub const IPTABLES_TABLES: [&str; 5] = ["filter", "nat", "mangle", "raw", "security"];
const LEGACY_V4_NAMES: &str = "/proc/thread-self/net/ip_tables_names";
const LEGACY_V6_NAMES: &str = "/proc/thread-self/net/ip6_tables_names";

/// How [`read_current`] runs the binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// Path of `nft`; `None`: looked up in `PATH`, then /usr/sbin, /sbin, /usr/local/sbin.
    pub nft: Option<PathBuf>,
    /// Path of `iptables-nft-save` (`None`: looked up like `nft`).
    pub iptables_nft_save: Option<PathBuf>,
    /// Path of `ip6tables-nft-save` (`None`: looked up).
    pub ip6tables_nft_save: Option<PathBuf>,
    /// Path of `iptables-legacy-save` (`None`: looked up).
    pub iptables_legacy_save: Option<PathBuf>,
    /// Path of `ip6tables-legacy-save` (`None`: looked up).
    pub ip6tables_legacy_save: Option<PathBuf>,
    /// Longest one binary may run before it is killed. Default 5 s.
    pub timeout: Duration,
    /// Most bytes of standard output read from one binary; more is reported, not
    /// returned. Default 32 MiB.
    pub max_output: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            nft: None,
            iptables_nft_save: None,
            ip6tables_nft_save: None,
            iptables_legacy_save: None,
            ip6tables_legacy_save: None,
            timeout: Duration::from_secs(5),
            max_output: 32 << 20,
        }
    }
}

/// What was read from one namespace, raw; parsing happens in `crate::firewall` (pure).
/// A field is `None` (or empty) when the thing does not exist *or* could not be read; in
/// the second case [`problems`](Self::problems) says so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawFirewall {
    /// The namespace's cookie (`SO_NETNS_COOKIE`, never reused), `None` before Linux 5.14.
    pub netns_cookie: Option<u64>,
    /// nftables generation id (`NFT_MSG_GETGEN`), read before anything else; `None` if
    /// unreadable (or the kernel has no nfnetlink).
    pub generation: Option<u32>,
    /// (family, name) of every nftables table, from a netlink dump, in the kernel's order.
    /// Families: `ip`, `ip6`, `inet`, `arp`, `bridge`, `netdev` (another number: decimal).
    pub nft_tables: Vec<(String, String)>,
    /// `nft -j list ruleset`, read only when `nft_tables` is not empty.
    pub nft_json: Option<String>,
    /// `nft list ruleset` (text), read only when the JSON has an ingress chain without
    /// its devices (nft 1.0.6 leaves them out of the JSON).
    pub nft_text: Option<String>,
    /// `iptables-nft-save`, read only when an `ip` table named filter, nat, mangle, raw or
    /// security exists (see the module doc for why, and for its caveat).
    pub iptables_nft: Option<String>,
    /// `ip6tables-nft-save`, the same for `ip6` tables.
    pub ip6tables_nft: Option<String>,
    /// Legacy iptables tables instantiated in the namespace (`ip_tables_names`).
    pub legacy_v4_tables: Vec<String>,
    /// Legacy ip6tables tables (`ip6_tables_names`).
    pub legacy_v6_tables: Vec<String>,
    /// `iptables-legacy-save -t NAME` for each of `legacy_v4_tables`, concatenated; only
    /// when that list is not empty, and only when every table was read.
    pub iptables_legacy: Option<String>,
    /// `ip6tables-legacy-save`, the same for `legacy_v6_tables`.
    pub ip6tables_legacy: Option<String>,
    /// Everything that could not be read.
    pub problems: Vec<FirewallProblem>,
}

impl RawFirewall {
    /// The change-detection values this read was made at (compare with [`probe_current`]).
    pub fn probe(&self) -> Probe {
        Probe {
            netns_cookie: self.netns_cookie,
            generation: self.generation,
            legacy_v4: self.legacy_v4_tables.clone(),
            legacy_v6: self.legacy_v6_tables.clone(),
        }
    }
}

/// The cheap change check of one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// `SO_NETNS_COOKIE`: tells a new namespace from an old one that had the same inode.
    pub netns_cookie: Option<u64>,
    /// nftables generation id (changes with every nftables or iptables-nft transaction).
    pub generation: Option<u32>,
    /// Legacy table names (legacy rule changes have no notification, hence the interval).
    pub legacy_v4: Vec<String>,
    /// Legacy ip6tables table names.
    pub legacy_v6: Vec<String>,
}

/// Something that could not be read: what, why, and (see [`fix`](Self::fix)) the remedy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallProblem {
    /// What is missing from the reading, e.g. "the nftables ruleset (nft -j list ruleset)".
    pub what: String,
    pub cause: ProblemCause,
}

/// Why something could not be read. Callers branch on it (a missing capability is a
/// configuration problem of the agent; a timeout is transient).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemCause {
    #[error("the agent lacks CAP_NET_ADMIN: {detail}")]
    MissingCapNetAdmin { detail: String },
    #[error("{program} not found (looked in {searched})")]
    BinaryNotFound {
        program: String,
        /// The distribution package that ships it: `nftables` or `iptables`.
        package: &'static str,
        searched: String,
    },
    #[error("{program} could not be started: {error}")]
    Spawn { program: String, error: String },
    #[error("{program} did not finish within {timeout:?} and was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} wrote more than the {limit} bytes allowed and was killed")]
    OutputTooLarge { program: String, limit: usize },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        /// The first line of its standard error.
        stderr: String,
    },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("the kernel's netlink answer is malformed: {0}")]
    Malformed(String),
    #[error("the kernel's answer is over the reader's bound: {0}")]
    TooLarge(String),
    #[error("cannot read {path}: {error}")]
    Unreadable { path: String, error: String },
}

impl FirewallProblem {
    fn new(what: impl Into<String>, cause: ProblemCause) -> Self {
        FirewallProblem {
            what: what.into(),
            cause,
        }
    }

    /// What an operator does about it.
    pub fn fix(&self) -> String {
        match &self.cause {
            ProblemCause::MissingCapNetAdmin { .. } => "reading rulesets needs CAP_NET_ADMIN: \
                 add it to the agent's capabilities (AmbientCapabilities=CAP_NET_ADMIN, and \
                 CAP_NET_ADMIN in CapabilityBoundingSet= if set, in the systemd unit; \
                 --cap-add=NET_ADMIN for a container)"
                .to_string(),
            ProblemCause::BinaryNotFound {
                program, package, ..
            } => format!(
                "install the {package} package (it provides {program}), or give its path in \
                 the agent's configuration"
            ),
            ProblemCause::Spawn { program, .. } => {
                format!("make {program} an executable the agent's user may run")
            }
            ProblemCause::Timeout { timeout, .. } => format!(
                "retried at the next scan; if the ruleset is very large or the host \
                 overloaded, raise the firewall read timeout (now {timeout:?})"
            ),
            ProblemCause::OutputTooLarge { limit, .. } => format!(
                "if a ruleset this large is expected, raise the firewall output bound (now \
                 {limit} bytes)"
            ),
            ProblemCause::Failed { program, .. } => format!(
                "run `ip netns exec NAMESPACE {program}` (or nsenter) to see the whole error"
            ),
            ProblemCause::Netlink(_) | ProblemCause::Malformed(_) | ProblemCause::TooLarge(_) => {
                "retried at the next scan; if it persists, report it with the kernel version"
                    .to_string()
            }
            ProblemCause::Unreadable { .. } => "run the agent as root, or give it \
                 CAP_DAC_READ_SEARCH (the /proc/PID/net/*_tables_names files are root's, \
                 mode 0440)"
                .to_string(),
        }
    }
}

impl fmt::Display for FirewallProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} not read: {}. Fix: {}",
            self.what,
            self.cause,
            self.fix()
        )
    }
}

/// The problems as sentences, each fix said once: problems with the same fix (the IPv4
/// and IPv6 lists of legacy tables, both unreadable without root) are one sentence, `W1
/// not read: C1; W2 not read: C2. Fix: F`.
pub fn describe(problems: &[FirewallProblem]) -> Vec<String> {
    let mut by_fix: Vec<(String, Vec<String>)> = Vec::new();
    for p in problems {
        let what = format!("{} not read: {}", p.what, p.cause);
        let fix = p.fix();
        match by_fix.iter_mut().find(|(f, _)| *f == fix) {
            Some((_, whats)) => whats.push(what),
            None => by_fix.push((fix, vec![what])),
        }
    }
    by_fix
        .into_iter()
        .map(|(fix, whats)| format!("{}. Fix: {fix}", whats.join("; ")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading

/// Reads the firewall of the namespace the **calling thread** is in. Never panics; every
/// part it could not read is `None`/empty with a [`FirewallProblem`] saying why.
pub fn read_current(opts: &ReadOptions) -> RawFirewall {
    let mut fw = RawFirewall::default();
    let cap_eff = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s));
    let lacks_cap = cap_eff.map(|c| c & (1u64 << CAP_NET_ADMIN) == 0);

    // Legacy names need no capability beyond reading the file: read them first, so a
    // capability problem can say what else it hides.
    fw.legacy_v4_tables = legacy_names(LEGACY_V4_NAMES, &mut fw.problems);
    fw.legacy_v6_tables = legacy_names(LEGACY_V6_NAMES, &mut fw.problems);

    let mut denied = false;
    let mut tables_known = false;
    match NfSocket::open() {
        Ok(mut sock) => {
            fw.netns_cookie = sock.cookie();
            match sock.generation() {
                Ok(g) => fw.generation = Some(g),
                Err(NlError::Denied) => denied = true,
                Err(e) => fw.problems.push(FirewallProblem::new(
                    "the nftables generation id (netlink NFT_MSG_GETGEN)",
                    e.into_cause(),
                )),
            }
            if !denied {
                match sock.tables() {
                    Ok(t) => {
                        fw.nft_tables = t
                            .into_iter()
                            .map(|(fam, name)| (family_name(fam), name))
                            .collect();
                        tables_known = true;
                    }
                    Err(NlError::Denied) => denied = true,
                    Err(e) => fw.problems.push(FirewallProblem::new(
                        "the nftables tables and rules (netlink NFT_MSG_GETTABLE)",
                        e.into_cause(),
                    )),
                }
            }
        }
        // No nfnetlink in this kernel: no nftables (nor iptables-nft) rules can exist.
        Err(NlError::Unsupported) => tables_known = true,
        Err(NlError::Denied) => denied = true,
        Err(e) => fw.problems.push(FirewallProblem::new(
            "the nftables tables and rules (netlink)",
            e.into_cause(),
        )),
    }
    if denied {
        // Every binary below speaks nfnetlink or the iptables sockopts: all need the
        // capability, so none is run; one problem says what is missing and why.
        let mut what = "the nftables and iptables-nft rulesets".to_string();
        for (v6, names) in [(false, &fw.legacy_v4_tables), (true, &fw.legacy_v6_tables)] {
            if !names.is_empty() {
                let tool = if v6 { "ip6tables" } else { "iptables" };
                what.push_str(&format!(", the legacy {tool} tables {}", names.join(", ")));
            }
        }
        let detail = if lacks_cap == Some(true) {
            "this thread's effective capabilities (CapEff in /proc/thread-self/status) do \
             not include it, and the kernel refused the netlink request (EPERM)"
        } else {
            "the kernel refused the netlink request (EPERM); the namespace may belong to a \
             user namespace where the agent has no capabilities"
        };
        fw.problems.push(FirewallProblem::new(
            what,
            ProblemCause::MissingCapNetAdmin {
                detail: detail.to_string(),
            },
        ));
        return fw;
    }

    if tables_known && !fw.nft_tables.is_empty() {
        fw.nft_json = run_tool(
            Tool::Nft,
            opts,
            &["-j", "list", "ruleset"],
            "the nftables ruleset (nft -j list ruleset)",
            &mut fw.problems,
        );
    }
    if fw
        .nft_json
        .as_deref()
        .is_some_and(|j| j.contains("\"hook\": \"ingress\"") || j.contains("\"hook\":\"ingress\""))
    {
        fw.nft_text = run_tool(
            Tool::Nft,
            opts,
            &["list", "ruleset"],
            "the devices of ingress chains (nft list ruleset)",
            &mut fw.problems,
        );
    }
    let has_ipt_table = |family: &str| {
        fw.nft_tables
            .iter()
            .any(|(f, n)| f == family && IPTABLES_TABLES.contains(&n.as_str()))
    };
    if has_ipt_table("ip") {
        fw.iptables_nft = run_tool(
            Tool::IptablesNftSave,
            opts,
            &[],
            "the iptables-nft IPv4 rules (iptables-nft-save)",
            &mut fw.problems,
        );
    }
    if has_ipt_table("ip6") {
        fw.ip6tables_nft = run_tool(
            Tool::Ip6tablesNftSave,
            opts,
            &[],
            "the iptables-nft IPv6 rules (ip6tables-nft-save)",
            &mut fw.problems,
        );
    }
    fw.iptables_legacy = read_legacy(
        Tool::IptablesLegacySave,
        &fw.legacy_v4_tables,
        opts,
        &mut fw.problems,
    );
    fw.ip6tables_legacy = read_legacy(
        Tool::Ip6tablesLegacySave,
        &fw.legacy_v6_tables,
        opts,
        &mut fw.problems,
    );
    fw
}

/// The cheap change check of the calling thread's namespace: one netlink round trip and
/// two small /proc reads. Unreadable parts are `None`/empty (the full read reports why).
pub fn probe_current() -> Probe {
    let mut probe = Probe::default();
    if let Ok(mut sock) = NfSocket::open() {
        probe.netns_cookie = sock.cookie();
        probe.generation = sock.generation().ok();
    }
    let mut ignored = Vec::new();
    probe.legacy_v4 = legacy_names(LEGACY_V4_NAMES, &mut ignored);
    probe.legacy_v6 = legacy_names(LEGACY_V6_NAMES, &mut ignored);
    probe
}

/// Table names from an `ip*_tables_names` file; a missing file (module not loaded) means
/// no legacy tables.
fn legacy_names(path: &str, problems: &mut Vec<FirewallProblem>) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_table_names(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            problems.push(FirewallProblem::new(
                "the list of legacy iptables tables",
                ProblemCause::Unreadable {
                    path: path.to_string(),
                    error: e.to_string(),
                },
            ));
            Vec::new()
        }
    }
}

/// One table name per line. Names are kernel-made (`xt_table.name`, at most 31 bytes);
/// anything else is dropped rather than passed to `-t`.
pub fn parse_table_names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|n| {
            !n.is_empty()
                && n.len() < 32
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .map(str::to_string)
        .collect()
}

/// `*-legacy-save -t NAME` for each listed table, concatenated; `None` if any failed.
fn read_legacy(
    tool: Tool,
    tables: &[String],
    opts: &ReadOptions,
    problems: &mut Vec<FirewallProblem>,
) -> Option<String> {
    if tables.is_empty() {
        return None;
    }
    let mut all = String::new();
    for table in tables {
        let what = format!(
            "the legacy {} table {table} ({} -t {table})",
            if tool == Tool::Ip6tablesLegacySave {
                "ip6tables"
            } else {
                "iptables"
            },
            tool.program()
        );
        all.push_str(&run_tool(tool, opts, &["-t", table], &what, problems)?);
    }
    Some(all)
}

/// Finds and runs one tool; its stdout, or a problem.
fn run_tool(
    tool: Tool,
    opts: &ReadOptions,
    args: &[&str],
    what: &str,
    problems: &mut Vec<FirewallProblem>,
) -> Option<String> {
    let path = match find_binary(tool, opts) {
        Ok(p) => p,
        Err(cause) => {
            problems.push(FirewallProblem::new(what, cause));
            return None;
        }
    };
    let program = tool.program().to_string();
    match run_bounded(&path, args, opts.timeout, opts.max_output) {
        Ok(out) if out.status.success() => {
            // nft and iptables write ASCII and JSON-escaped names; a stray invalid byte
            // (a comment) is replaced rather than losing the whole ruleset.
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(out) => {
            let stderr = first_line(&out.stderr);
            let cause = if is_permission_error(&stderr) {
                ProblemCause::MissingCapNetAdmin {
                    detail: format!("{program} said: {stderr}"),
                }
            } else {
                ProblemCause::Failed {
                    program,
                    status: out.status.to_string(),
                    stderr,
                }
            };
            problems.push(FirewallProblem::new(what, cause));
            None
        }
        Err(RunError::Spawn(e)) => {
            problems.push(FirewallProblem::new(
                what,
                ProblemCause::Spawn {
                    program,
                    error: e.to_string(),
                },
            ));
            None
        }
        Err(RunError::Timeout) => {
            problems.push(FirewallProblem::new(
                what,
                ProblemCause::Timeout {
                    program,
                    timeout: opts.timeout,
                },
            ));
            None
        }
        Err(RunError::TooLarge) => {
            problems.push(FirewallProblem::new(
                what,
                ProblemCause::OutputTooLarge {
                    program,
                    limit: opts.max_output,
                },
            ));
            None
        }
        Err(RunError::Io(e)) => {
            problems.push(FirewallProblem::new(
                what,
                ProblemCause::Failed {
                    program,
                    status: "killed".to_string(),
                    stderr: format!("reading its output failed: {e}"),
                },
            ));
            None
        }
    }
}

fn is_permission_error(stderr: &str) -> bool {
    stderr.contains("Operation not permitted") || stderr.contains("Permission denied")
}

/// The first non-empty line, trimmed and bounded.
fn first_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no error output)");
    line.chars().take(300).collect()
}

// ---------------------------------------------------------------------------------------
// Binaries

/// The binaries this module runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Nft,
    IptablesNftSave,
    Ip6tablesNftSave,
    IptablesLegacySave,
    Ip6tablesLegacySave,
}

impl Tool {
    fn program(self) -> &'static str {
        match self {
            Tool::Nft => "nft",
            Tool::IptablesNftSave => "iptables-nft-save",
            Tool::Ip6tablesNftSave => "ip6tables-nft-save",
            Tool::IptablesLegacySave => "iptables-legacy-save",
            Tool::Ip6tablesLegacySave => "ip6tables-legacy-save",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Tool::Nft => "nftables",
            _ => "iptables",
        }
    }

    fn configured(self, opts: &ReadOptions) -> Option<&Path> {
        match self {
            Tool::Nft => opts.nft.as_deref(),
            Tool::IptablesNftSave => opts.iptables_nft_save.as_deref(),
            Tool::Ip6tablesNftSave => opts.ip6tables_nft_save.as_deref(),
            Tool::IptablesLegacySave => opts.iptables_legacy_save.as_deref(),
            Tool::Ip6tablesLegacySave => opts.ip6tables_legacy_save.as_deref(),
        }
    }
}

/// The configured path, or the first executable of that name in `PATH`, /usr/sbin, /sbin,
/// /usr/local/sbin.
fn find_binary(tool: Tool, opts: &ReadOptions) -> Result<PathBuf, ProblemCause> {
    let not_found = |searched: String| ProblemCause::BinaryNotFound {
        program: tool.program().to_string(),
        package: tool.package(),
        searched,
    };
    if let Some(path) = tool.configured(opts) {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(not_found(path.display().to_string()))
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path_var)
        .filter(|d| d.is_absolute())
        .collect();
    for d in SBIN_DIRS {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(PathBuf::from(d));
        }
    }
    if let Some(found) = dirs
        .iter()
        .map(|d| d.join(tool.program()))
        .find(|p| is_executable(p))
    {
        return Ok(found);
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(not_found(searched.join(":")))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What a finished child left.
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

#[derive(Debug)]
enum RunError {
    Spawn(io::Error),
    Timeout,
    TooLarge,
    Io(io::Error),
}

/// Runs `program args…` with an empty environment (`LC_ALL=C`, a fixed `PATH`), stdin
/// null, in a process group of its own. Reads stdout (at most `max_output` bytes) and
/// the start of stderr with `poll`, so neither pipe can fill up and block the child; on
/// timeout or too much output the whole group is killed and the child reaped.
fn run_bounded(
    program: &Path,
    args: &[&str],
    timeout: Duration,
    max_output: usize,
) -> Result<Finished, RunError> {
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("LC_ALL", "C")
        .env("PATH", CHILD_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(RunError::Spawn)?;
    let result = collect(&mut child, deadline, max_output);
    if result.is_err() {
        kill_and_reap(&mut child);
    }
    result
}

fn collect(child: &mut Child, deadline: Instant, max_output: usize) -> Result<Finished, RunError> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut chunk = vec![0u8; 64 * 1024];
    while stdout.is_some() || stderr.is_some() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RunError::Timeout);
        }
        let mut fds = [
            libc::pollfd {
                fd: stdout.as_ref().map_or(-1, |s| s.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stderr.as_ref().map_or(-1, |s| s.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Round up: a 0 ms poll would spin through the last partial millisecond.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live array of two initialized pollfd structs and the count
        // passed is its length; poll writes only their `revents` and keeps no pointer. A
        // negative fd (a closed pipe) is ignored by poll, as documented.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RunError::Io(e));
        }
        if fds[0].revents != 0
            && let Some(pipe) = stdout.as_mut()
        {
            match pipe.read(&mut chunk) {
                Ok(0) => stdout = None,
                Ok(n) => {
                    if out.len() + n > max_output {
                        return Err(RunError::TooLarge);
                    }
                    out.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RunError::Io(e)),
            }
        }
        if fds[1].revents != 0
            && let Some(pipe) = stderr.as_mut()
        {
            match pipe.read(&mut chunk) {
                Ok(0) => stderr = None,
                Ok(n) => {
                    // Keep the start; drain the rest so the child never blocks on it.
                    let keep = n.min(STDERR_KEPT.saturating_sub(err.len()));
                    err.extend_from_slice(&chunk[..keep]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RunError::Io(e)),
            }
        }
    }
    // Both pipes closed: the child is exiting. Wait for it, still within the deadline.
    let mut pause = Duration::from_micros(50);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Ok(Finished {
                    status,
                    stdout: out,
                    stderr: err,
                });
            }
            Ok(None) if Instant::now() >= deadline => return Err(RunError::Timeout),
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(e) => return Err(RunError::Io(e)),
        }
    }
}

/// SIGKILL to the child's process group (the child and anything it started), then reap.
fn kill_and_reap(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill() touches no memory. The child is not reaped yet (we reap it
        // below), so its pid, which is also its process group id (process_group(0)),
        // cannot have been reused: the signal reaches only the group we started.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------
// Netlink

/// Why a netlink exchange failed.
#[derive(Debug)]
enum NlError {
    /// EPERM/EACCES: CAP_NET_ADMIN missing in the namespace's user namespace.
    Denied,
    /// No NETLINK_NETFILTER in this kernel.
    Unsupported,
    Io(io::Error),
    Decode(String),
    TooLarge(String),
    /// The dump was interrupted by concurrent changes too many times.
    Interrupted,
}

impl NlError {
    fn from_errno(errno: i32) -> NlError {
        match errno {
            libc::EPERM | libc::EACCES => NlError::Denied,
            _ => NlError::Io(io::Error::from_raw_os_error(errno)),
        }
    }

    fn from_io(e: io::Error) -> NlError {
        match e.raw_os_error() {
            Some(errno) => NlError::from_errno(errno),
            None => NlError::Io(e),
        }
    }

    fn into_cause(self) -> ProblemCause {
        match self {
            NlError::Denied => ProblemCause::MissingCapNetAdmin {
                detail: "the kernel refused the netlink request (EPERM)".into(),
            },
            NlError::Unsupported => {
                ProblemCause::Netlink("NETLINK_NETFILTER is not supported by this kernel".into())
            }
            NlError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ProblemCause::Netlink(format!("no answer within {NETLINK_TIMEOUT:?}"))
            }
            NlError::Io(e) => ProblemCause::Netlink(e.to_string()),
            NlError::Decode(s) => ProblemCause::Malformed(s),
            NlError::TooLarge(s) => ProblemCause::TooLarge(s),
            NlError::Interrupted => ProblemCause::Netlink(format!(
                "the table dump was interrupted by ruleset changes {DUMP_ATTEMPTS} times"
            )),
        }
    }
}

/// A NETLINK_NETFILTER socket of the calling thread's namespace.
struct NfSocket {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl NfSocket {
    fn open() -> Result<NfSocket, NlError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| match e.raw_os_error() {
            Some(libc::EPROTONOSUPPORT) => NlError::Unsupported,
            _ => NlError::from_io(e),
        })?;
        socket.bind_auto().map_err(NlError::from_io)?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(NlError::from_io)?;
        let tv = libc::timeval {
            tv_sec: NETLINK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `socket` owns an open fd for the whole call; `tv` is a live, initialized
        // `timeval` on this stack frame and the length passed is exactly its size, which is
        // what SO_RCVTIMEO reads. The kernel copies it and keeps no pointer to it.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(NlError::Io(io::Error::last_os_error()));
        }
        Ok(NfSocket {
            socket,
            buf: vec![0; RECV_BUF],
            seq: 0,
        })
    }

    /// The namespace cookie, `None` before Linux 5.14.
    fn cookie(&self) -> Option<u64> {
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: the fd is open for the whole call; `cookie` and `len` are live locals,
        // `len` holds the size of `cookie`, and the kernel writes at most that many bytes
        // into it and the actual length into `len`, keeping neither pointer.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        (rc == 0 && len as usize == size_of::<u64>()).then_some(cookie)
    }

    /// NFT_MSG_GETGEN: the namespace's nftables generation id.
    fn generation(&mut self) -> Result<u32, NlError> {
        let mut generation = None;
        self.exchange(NFT_MSG_GETGEN, NLM_F_REQUEST, |kind, _flags, payload| {
            if kind == nft_type(NFT_MSG_NEWGEN) {
                generation = Some(decode_gen(payload).map_err(NlError::Decode)?);
                return Ok(Flow::Stop);
            }
            Ok(Flow::More)
        })?;
        generation.ok_or_else(|| NlError::Decode("no NFT_MSG_NEWGEN in the answer".into()))
    }

    /// NFT_MSG_GETTABLE dump over all families: (family number, name) of every table.
    /// Restarted when a concurrent change interrupts it.
    fn tables(&mut self) -> Result<Vec<(u8, String)>, NlError> {
        for _ in 0..DUMP_ATTEMPTS {
            let mut tables = Vec::new();
            let mut interrupted = false;
            self.exchange(
                NFT_MSG_GETTABLE,
                NLM_F_REQUEST | NLM_F_DUMP,
                |kind, flags, payload| {
                    if flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    if kind == nft_type(NFT_MSG_NEWTABLE) {
                        if tables.len() >= MAX_TABLES {
                            return Err(NlError::TooLarge(format!(
                                "more than {MAX_TABLES} nftables tables"
                            )));
                        }
                        tables.push(decode_table(payload).map_err(NlError::Decode)?);
                    }
                    Ok(Flow::More)
                },
            )?;
            if !interrupted {
                return Ok(tables);
            }
        }
        Err(NlError::Interrupted)
    }

    /// Sends one nftables request (header + nfgenmsg for AF_UNSPEC) and feeds each answer
    /// of its sequence number to `each` until NLMSG_DONE, an error, or `each` stops.
    /// Reads at most [`MAX_DUMP_BYTES`].
    fn exchange(
        &mut self,
        msg: u16,
        flags: u16,
        mut each: impl FnMut(u16, u16, &[u8]) -> Result<Flow, NlError>,
    ) -> Result<(), NlError> {
        self.seq = self.seq.wrapping_add(1);
        let request = nft_request(msg, flags, self.seq);
        self.socket.send(&request, 0).map_err(NlError::from_io)?;
        let mut total = 0usize;
        loop {
            // MSG_TRUNC: the datagram's real length, so a cut one is detected.
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], libc::MSG_TRUNC)
                .map_err(NlError::from_io)?;
            if n == 0 {
                return Err(NlError::Decode("netlink socket closed mid-answer".into()));
            }
            if n > self.buf.len() {
                return Err(NlError::TooLarge(format!(
                    "a netlink datagram of {n} bytes, over the {} byte buffer",
                    self.buf.len()
                )));
            }
            total += n;
            if total > MAX_DUMP_BYTES {
                return Err(NlError::TooLarge(format!(
                    "an answer over {MAX_DUMP_BYTES} bytes"
                )));
            }
            let mut rest = &self.buf[..n];
            while !rest.is_empty() {
                let (m, tail) = next_message(rest).map_err(NlError::Decode)?;
                rest = tail;
                if m.seq != self.seq {
                    continue; // not an answer to this request
                }
                match m.kind {
                    NLMSG_NOOP => {}
                    NLMSG_DONE => return done_code(m.payload),
                    NLMSG_ERROR => return done_code(m.payload),
                    NLMSG_OVERRUN => {
                        return Err(NlError::Decode("netlink overrun".into()));
                    }
                    _ => {
                        if each(m.kind, m.flags, m.payload)? == Flow::Stop {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    More,
    Stop,
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// nlmsghdr + nfgenmsg {AF_UNSPEC, NFNETLINK_V0, res_id 0}.
fn nft_request(msg: u16, flags: u16, seq: u32) -> [u8; NLMSG_HDRLEN + NFGENMSG_LEN] {
    let mut r = [0u8; NLMSG_HDRLEN + NFGENMSG_LEN];
    r[0..4].copy_from_slice(&((NLMSG_HDRLEN + NFGENMSG_LEN) as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&nft_type(msg).to_ne_bytes());
    r[6..8].copy_from_slice(&flags.to_ne_bytes());
    r[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 0 (the kernel), family AF_UNSPEC (all), version 0, res_id 0: all zero.
    r
}

/// The error code of NLMSG_DONE / NLMSG_ERROR (0: success; a missing one counts as 0
/// for DONE, whose payload older kernels leave empty).
fn done_code(payload: &[u8]) -> Result<(), NlError> {
    let code = payload.first_chunk().map_or(0, |c| i32::from_ne_bytes(*c));
    if code == 0 {
        Ok(())
    } else {
        Err(NlError::from_errno(code.saturating_neg()))
    }
}

/// One netlink message of a datagram.
#[derive(Debug, PartialEq, Eq)]
struct Message<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits the first message off `buf`: (message, rest after its aligned length).
fn next_message(buf: &[u8]) -> Result<(Message<'_>, &[u8]), String> {
    let Some(hdr) = buf.first_chunk::<NLMSG_HDRLEN>() else {
        return Err(format!("{} bytes left, less than a header", buf.len()));
    };
    let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    if len < NLMSG_HDRLEN || len > buf.len() {
        return Err(format!(
            "message length {len} outside the {} bytes received",
            buf.len()
        ));
    }
    let m = Message {
        kind: u16::from_ne_bytes([hdr[4], hdr[5]]),
        flags: u16::from_ne_bytes([hdr[6], hdr[7]]),
        seq: u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
        payload: &buf[NLMSG_HDRLEN..len],
    };
    let next = len.saturating_add(3) & !3;
    Ok((m, buf.get(next..).unwrap_or(&[])))
}

/// Netlink attributes (type without flag bits, value) of a payload; malformed ones end
/// the walk with an error. Trailing bytes shorter than an attribute header are padding.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), String>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.0;
        let hdr = b.first_chunk::<4>()?;
        let len = usize::from(u16::from_ne_bytes([hdr[0], hdr[1]]));
        let kind = u16::from_ne_bytes([hdr[2], hdr[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            self.0 = &[];
            return Some(Err(format!(
                "attribute length {len} outside the {} bytes left",
                b.len()
            )));
        }
        self.0 = b.get((len + 3) & !3..).unwrap_or(&[]);
        Some(Ok((kind, &b[4..len])))
    }
}

/// The nfgenmsg and attributes of an nftables answer.
fn split_nfgen(payload: &[u8]) -> Result<(u8, Attrs<'_>), String> {
    match payload.split_first_chunk::<NFGENMSG_LEN>() {
        Some((gen_hdr, attrs)) => Ok((gen_hdr[0], Attrs(attrs))),
        None => Err(format!("nftables answer of {} bytes", payload.len())),
    }
}

/// NFT_MSG_NEWGEN → NFTA_GEN_ID (big-endian u32).
fn decode_gen(payload: &[u8]) -> Result<u32, String> {
    let (_, attrs) = split_nfgen(payload)?;
    for a in attrs {
        let (kind, value) = a?;
        if kind == NFTA_GEN_ID {
            let v: [u8; 4] = value
                .try_into()
                .map_err(|_| format!("NFTA_GEN_ID of {} bytes", value.len()))?;
            return Ok(u32::from_be_bytes(v));
        }
    }
    Err("NFT_MSG_NEWGEN without NFTA_GEN_ID".into())
}

/// NFT_MSG_NEWTABLE → (nfgenmsg family, NFTA_TABLE_NAME).
fn decode_table(payload: &[u8]) -> Result<(u8, String), String> {
    let (family, attrs) = split_nfgen(payload)?;
    for a in attrs {
        let (kind, value) = a?;
        if kind == NFTA_TABLE_NAME {
            let name = value.split(|&b| b == 0).next().unwrap_or_default();
            if name.is_empty() {
                return Err("empty NFTA_TABLE_NAME".into());
            }
            return Ok((family, String::from_utf8_lossy(name).into_owned()));
        }
    }
    Err("NFT_MSG_NEWTABLE without NFTA_TABLE_NAME".into())
}

/// nft's keyword for an nfproto family.
fn family_name(family: u8) -> String {
    match family {
        1 => "inet",
        2 => "ip",
        3 => "arp",
        5 => "netdev",
        7 => "bridge",
        10 => "ip6",
        other => return other.to_string(),
    }
    .to_string()
}

// ---------------------------------------------------------------------------------------
// Cache

/// What the agent keeps across scans: the last reading of each namespace (by nsfs inode)
/// and when it was made. Plain data; the agent probes ([`probe_current`]) on the
/// namespace's thread, asks [`needs_read`](Self::needs_read), and either reads again and
/// [`insert`](Self::insert)s or uses [`get`](Self::get).
#[derive(Debug, Clone)]
pub struct FirewallCache {
    /// How long a reading of a namespace with legacy tables stays valid: legacy changes
    /// announce nothing and bump no generation. Also how long before a reading that had
    /// problems (a timeout, a missing binary) is retried. Default 60 s.
    pub legacy_reread: Duration,
    entries: HashMap<u64, Cached>,
}

#[derive(Debug, Clone)]
struct Cached {
    raw: RawFirewall,
    probe: Probe,
    read_at: Instant,
}

impl Default for FirewallCache {
    fn default() -> Self {
        FirewallCache {
            legacy_reread: Duration::from_secs(60),
            entries: HashMap::new(),
        }
    }
}

impl FirewallCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Must namespace `inode` be read again, given a fresh `probe` of it at `now`?
    /// Yes when it was never read, when it is another namespace than the one read (cookie),
    /// when the nftables generation or the legacy table list changed, and, once
    /// `legacy_reread` has passed since the reading, when legacy tables exist or the
    /// reading had problems.
    pub fn needs_read(&self, inode: u64, probe: &Probe, now: Instant) -> bool {
        let Some(c) = self.entries.get(&inode) else {
            return true;
        };
        if c.probe != *probe {
            return true;
        }
        let stale = now.saturating_duration_since(c.read_at) >= self.legacy_reread;
        let has_legacy = !probe.legacy_v4.is_empty() || !probe.legacy_v6.is_empty();
        stale && (has_legacy || !c.raw.problems.is_empty())
    }

    /// Keeps a reading made at `now` (its probe values are its own, taken at its start).
    pub fn insert(&mut self, inode: u64, raw: RawFirewall, now: Instant) {
        let probe = raw.probe();
        self.entries.insert(
            inode,
            Cached {
                raw,
                probe,
                read_at: now,
            },
        );
    }

    /// The last reading of namespace `inode`.
    pub fn get(&self, inode: u64) -> Option<&RawFirewall> {
        self.entries.get(&inode).map(|c| &c.raw)
    }

    /// Forgets the namespaces `keep` says are gone (call after discovery, so the cache
    /// holds at most the live namespaces).
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.entries.retain(|&inode, _| keep(inode));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute: len, type, value, padding.
    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
        a
    }

    /// nfgenmsg + attributes.
    fn nfgen(family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![family, 0, 0, 0];
        for a in attrs {
            p.extend_from_slice(a);
        }
        p
    }

    fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
        m
    }

    fn gen_payload(id: u32) -> Vec<u8> {
        nfgen(
            0,
            &[
                attr(NFTA_GEN_ID, &id.to_be_bytes()),
                attr(2, &1234u32.to_be_bytes()),
                attr(3, b"nft\0"),
            ],
        )
    }

    #[test]
    fn generation_is_decoded() {
        assert_eq!(decode_gen(&gen_payload(0x0102_0304)), Ok(0x0102_0304));
        // The attribute with the byte-order flag set is still NFTA_GEN_ID.
        let flagged = nfgen(0, &[attr(NFTA_GEN_ID | 0x4000, &7u32.to_be_bytes())]);
        assert_eq!(decode_gen(&flagged), Ok(7));
    }

    #[test]
    fn generation_short_or_hostile() {
        let good = gen_payload(9);
        // Every truncation is an error, never a panic (and never a wrong id).
        for n in 0..good.len() {
            let r = decode_gen(&good[..n]);
            assert!(r.is_err() || r == Ok(9), "cut at {n}: {r:?}");
        }
        assert!(decode_gen(&good[..8]).is_err()); // header of NFTA_GEN_ID only
        assert!(decode_gen(&nfgen(0, &[attr(NFTA_GEN_ID, &[1, 2])])).is_err());
        assert!(decode_gen(&nfgen(0, &[attr(2, &[0; 4])])).is_err());
        let mut huge = nfgen(0, &[attr(NFTA_GEN_ID, &[0; 4])]);
        huge[4] = 0xff; // attribute longer than the message
        assert!(decode_gen(&huge).is_err());
        let mut tiny = nfgen(0, &[attr(NFTA_GEN_ID, &[0; 4])]);
        tiny[4] = 2; // shorter than its own header
        tiny[5] = 0;
        assert!(decode_gen(&tiny).is_err());
    }

    #[test]
    fn tables_are_decoded() {
        let p = nfgen(
            1,
            &[
                attr(NFTA_TABLE_NAME, b"firewalld\0"),
                attr(2, &0u32.to_be_bytes()),
            ],
        );
        assert_eq!(decode_table(&p), Ok((1, "firewalld".to_string())));
        // Name not first, unterminated: still read.
        let p = nfgen(10, &[attr(2, &[0; 4]), attr(NFTA_TABLE_NAME, b"filter")]);
        assert_eq!(decode_table(&p), Ok((10, "filter".to_string())));
        let good = nfgen(2, &[attr(NFTA_TABLE_NAME, b"nat\0")]);
        for n in 0..good.len() {
            let r = decode_table(&good[..n]);
            assert!(r.is_err() || r == Ok((2, "nat".to_string())), "cut at {n}");
        }
        assert!(decode_table(&nfgen(2, &[attr(NFTA_TABLE_NAME, b"\0")])).is_err());
        assert!(decode_table(&nfgen(2, &[])).is_err());
        assert_eq!(
            decode_table(&nfgen(2, &[attr(NFTA_TABLE_NAME, b"t\xff\0")])),
            Ok((2, "t\u{fffd}".to_string()))
        );
    }

    #[test]
    fn families() {
        let check = |n: u8, s: &str| assert_eq!(family_name(n), s);
        check(2, "ip");
        check(10, "ip6");
        check(1, "inet");
        check(5, "netdev");
        check(7, "bridge");
        check(3, "arp");
        check(99, "99");
    }

    #[test]
    fn messages_are_split() {
        let a = message(nft_type(NFT_MSG_NEWTABLE), 2, 5, &[1, 2, 3]);
        let b = message(NLMSG_DONE, 2, 5, &0i32.to_ne_bytes());
        let both = [a.clone(), b].concat();
        let (m, rest) = next_message(&both).unwrap();
        assert_eq!(
            m,
            Message {
                kind: nft_type(NFT_MSG_NEWTABLE),
                flags: 2,
                seq: 5,
                payload: &[1, 2, 3],
            }
        );
        let (m, rest) = next_message(rest).unwrap();
        assert_eq!(m.kind, NLMSG_DONE);
        assert!(rest.is_empty());
        // Truncated anywhere: an error, never a panic.
        for n in 1..a.len() - 1 {
            assert!(next_message(&a[..n]).is_err(), "cut at {n}");
        }
        let mut bad = a.clone();
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes()); // shorter than a header
        assert!(next_message(&bad).is_err());
        bad[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(next_message(&bad).is_err());
        // The last message's padding may be missing.
        let unpadded = &a[..16 + 3];
        let (m, rest) = next_message(unpadded).unwrap();
        assert_eq!(m.payload, &[1, 2, 3]);
        assert!(rest.is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz over all three decoders.
        let mut x: u32 = 0x1234_5678;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode_gen(&buf);
            let _ = decode_table(&buf);
            let mut rest = &buf[..];
            while let Ok((_, r)) = next_message(rest) {
                if r.is_empty() {
                    break;
                }
                rest = r;
            }
        }
    }

    #[test]
    fn request_layout() {
        let r = nft_request(NFT_MSG_GETGEN, NLM_F_REQUEST, 7);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), (10 << 8) | 16);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), 1);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!(&r[12..], &[0; 8]);
        let d = nft_request(NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_DUMP, 1);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), (10 << 8) | 1);
        assert_eq!(u16::from_ne_bytes([d[6], d[7]]), 0x301);
    }

    #[test]
    fn done_codes() {
        assert!(done_code(&0i32.to_ne_bytes()).is_ok());
        assert!(done_code(&[]).is_ok());
        assert!(matches!(
            done_code(&(-libc::EPERM).to_ne_bytes()),
            Err(NlError::Denied)
        ));
        assert!(matches!(
            done_code(&(-libc::EINVAL).to_ne_bytes()),
            Err(NlError::Io(_))
        ));
        assert!(matches!(
            done_code(&i32::MIN.to_ne_bytes()),
            Err(NlError::Io(_))
        ));
    }

    #[test]
    fn legacy_table_names() {
        assert_eq!(parse_table_names("filter\nnat\n"), vec!["filter", "nat"]);
        assert_eq!(parse_table_names(""), Vec::<String>::new());
        assert_eq!(
            parse_table_names("mangle\n\n-x y\nraw\n"),
            vec!["mangle", "raw"]
        );
        assert_eq!(parse_table_names(&"a".repeat(40)), Vec::<String>::new());
    }

    #[test]
    fn problems_say_what_why_and_fix() {
        let p = FirewallProblem::new(
            "the nftables ruleset (nft -j list ruleset)",
            ProblemCause::BinaryNotFound {
                program: "nft".into(),
                package: "nftables",
                searched: "/usr/sbin".into(),
            },
        );
        let s = p.to_string();
        assert!(s.contains("nft not found"), "{s}");
        assert!(s.contains("install the nftables package"), "{s}");
        let p = FirewallProblem::new(
            "x",
            ProblemCause::MissingCapNetAdmin {
                detail: "EPERM".into(),
            },
        );
        assert!(p.to_string().contains("AmbientCapabilities=CAP_NET_ADMIN"));
        // The same fix for two problems is said once.
        let unreadable = |path: &str| {
            FirewallProblem::new(
                "the list of legacy iptables tables",
                ProblemCause::Unreadable {
                    path: path.into(),
                    error: "Permission denied".into(),
                },
            )
        };
        let said = describe(&[unreadable("a"), unreadable("b"), p]);
        assert_eq!(said.len(), 2, "{said:?}");
        assert_eq!(said[0].matches("Fix:").count(), 1, "{}", said[0]);
        assert!(
            said[0].contains("a") && said[0].contains("b"),
            "{}",
            said[0]
        );
        assert_eq!(first_line(b"\n  boom: bad\nmore\n"), "boom: bad");
        assert_eq!(first_line(b""), "(no error output)");
    }

    #[test]
    fn missing_configured_binary() {
        let opts = ReadOptions {
            iptables_nft_save: Some("/nonexistent/iptables-nft-save".into()),
            ..ReadOptions::default()
        };
        match find_binary(Tool::IptablesNftSave, &opts) {
            Err(ProblemCause::BinaryNotFound {
                package, searched, ..
            }) => {
                assert_eq!(package, "iptables");
                assert_eq!(searched, "/nonexistent/iptables-nft-save");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bounded_runs() {
        let sh = Path::new("/bin/sh");
        let t = Duration::from_secs(5);
        let ok = run_bounded(sh, &["-c", "echo out; echo err >&2; env"], t, 1024).unwrap();
        assert!(ok.status.success());
        let out = String::from_utf8(ok.stdout).unwrap();
        // Only our environment (sh may add PWD and SHLVL of its own).
        assert!(out.starts_with("out\n"), "{out}");
        assert!(out.contains("LC_ALL=C"), "{out}");
        assert!(!out.contains("HOME="), "{out}");
        assert_eq!(ok.stderr, b"err\n");
        let started = Instant::now();
        let slow = run_bounded(sh, &["-c", "sleep 10"], Duration::from_millis(100), 1024);
        assert!(matches!(slow, Err(RunError::Timeout)), "{slow:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let big = run_bounded(sh, &["-c", "exec yes"], t, 100_000);
        assert!(matches!(big, Err(RunError::TooLarge)), "{big:?}");
        let fail = run_bounded(sh, &["-c", "echo nope >&2; exit 3"], t, 1024).unwrap();
        assert_eq!(fail.status.code(), Some(3));
        assert!(matches!(
            run_bounded(Path::new("/nonexistent"), &[], t, 1),
            Err(RunError::Spawn(_))
        ));
    }

    fn probe(generation: Option<u32>, legacy_v4: &[&str]) -> Probe {
        Probe {
            netns_cookie: Some(42),
            generation,
            legacy_v4: legacy_v4.iter().map(|s| s.to_string()).collect(),
            legacy_v6: Vec::new(),
        }
    }

    fn raw(p: &Probe, problems: usize) -> RawFirewall {
        RawFirewall {
            netns_cookie: p.netns_cookie,
            generation: p.generation,
            legacy_v4_tables: p.legacy_v4.clone(),
            legacy_v6_tables: p.legacy_v6.clone(),
            problems: (0..problems)
                .map(|_| {
                    FirewallProblem::new(
                        "x",
                        ProblemCause::Timeout {
                            program: "nft".into(),
                            timeout: Duration::from_secs(5),
                        },
                    )
                })
                .collect(),
            ..RawFirewall::default()
        }
    }

    #[test]
    fn cache_decisions() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut cache = FirewallCache::new();
        let p5 = probe(Some(5), &[]);
        // (cached reading, probe, seconds after the reading, expected)
        let check = |cached: Option<RawFirewall>, p: &Probe, after: u64, want: bool| {
            let mut c = FirewallCache::new();
            if let Some(r) = cached {
                c.insert(1, r, t0);
            }
            assert_eq!(c.needs_read(1, p, s(after)), want, "{p:?} after {after}s");
        };
        check(None, &p5, 0, true); // never read
        check(Some(raw(&p5, 0)), &p5, 0, false); // unchanged
        check(Some(raw(&p5, 0)), &p5, 3600, false); // unchanged, no legacy: forever
        check(Some(raw(&p5, 0)), &probe(Some(6), &[]), 1, true); // generation changed
        check(Some(raw(&p5, 0)), &probe(None, &[]), 1, true); // became unreadable
        check(Some(raw(&probe(None, &[]), 0)), &probe(None, &[]), 1, false);
        let mut other_ns = p5.clone();
        other_ns.netns_cookie = Some(43); // the inode now names another namespace
        check(Some(raw(&p5, 0)), &other_ns, 1, true);
        let legacy = probe(Some(5), &["filter"]);
        check(Some(raw(&p5, 0)), &legacy, 1, true); // legacy table appeared
        check(Some(raw(&legacy, 0)), &legacy, 59, false);
        check(Some(raw(&legacy, 0)), &legacy, 60, true); // legacy interval passed
        check(Some(raw(&p5, 1)), &p5, 59, false); // problems: retried after the interval
        check(Some(raw(&p5, 1)), &p5, 60, true);
        // Clock going backwards (another Instant source): never "stale".
        let mut c = FirewallCache::new();
        c.insert(1, raw(&legacy, 0), s(100));
        assert!(!c.needs_read(1, &legacy, s(0)));

        cache.insert(1, raw(&p5, 0), t0);
        cache.insert(2, raw(&p5, 0), t0);
        assert_eq!(cache.get(1).map(|r| r.generation), Some(Some(5)));
        assert!(!cache.needs_read(2, &p5, t0));
        cache.retain(|inode| inode == 1);
        assert_eq!(cache.len(), 1);
        assert!(cache.needs_read(2, &p5, t0));
        cache.legacy_reread = Duration::from_secs(1);
        cache.insert(3, raw(&legacy, 0), t0);
        assert!(cache.needs_read(3, &legacy, s(1)));
    }
}
