//! The agent's test harness: the shared kit (`listenscope-testkit`: namespaces, veth links,
//! real sockets and probes, temp dirs, processes, bounded waits) plus what only the agent's
//! tests need: a two-namespace topology with known addresses, and the real
//! `listenscope-agent` binary with helpers to read its JSON.

#![allow(dead_code)] // each test binary uses a different part of the harness
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

use std::process::Command;

pub use listenscope_testkit::*;
use serde_json::Value;

/// Two namespaces: `server` (A) and `client` (B) joined by a veth pair, with
/// A = 10.200.0.1/24 + 10.201.0.1/32, fd00:200::1/64 + fd00:201::1/128, fe80::a;
/// B = 10.200.0.2/24, fd00:200::2/64, fe80::b, and routes to A's extra addresses.
#[derive(Debug)]
pub struct Topology {
    pub server: Netns,
    pub client: Netns,
    pub server_if: String,
    pub client_if: String,
}

pub const A_V4: &str = "10.200.0.1";
pub const A_V4_EXTRA: &str = "10.201.0.1";
pub const A_V6: &str = "fd00:200::1";
pub const A_V6_EXTRA: &str = "fd00:201::1";
pub const A_LL: &str = "fe80::a";
/// Routed from B to A but not local in A: binds there are latent.
pub const NOT_LOCAL_V4: &str = "10.202.0.1";
pub const NOT_LOCAL_V6: &str = "fd00:202::1";

impl Topology {
    pub fn new() -> Topology {
        let server = Netns::new();
        let client = Netns::new();
        // The pair goes with the namespaces.
        let link = Veth::new(Some(&server), Some(&client));
        let (server_if, client_if) = (link.a.clone(), link.b.clone());
        for (ns, ifname) in [(&server, &server_if), (&client, &client_if)] {
            // No automatic link-local address: fe80::a and fe80::b are the only ones.
            ns.ip(&["link", "set", "dev", ifname, "addrgenmode", "none"]);
            ns.ip(&["link", "set", "dev", ifname, "up"]);
        }
        let a = |args: &[&str]| server.ip(args);
        a(&["addr", "add", "10.200.0.1/24", "dev", &server_if]);
        a(&["addr", "add", "10.201.0.1/32", "dev", &server_if]);
        a(&["addr", "add", "fd00:200::1/64", "dev", &server_if, "nodad"]);
        a(&["addr", "add", "fd00:201::1/128", "dev", &server_if, "nodad"]);
        a(&["addr", "add", "fe80::a/64", "dev", &server_if, "nodad"]);
        let b = |args: &[&str]| client.ip(args);
        b(&["addr", "add", "10.200.0.2/24", "dev", &client_if]);
        b(&["addr", "add", "fd00:200::2/64", "dev", &client_if, "nodad"]);
        b(&["addr", "add", "fe80::b/64", "dev", &client_if, "nodad"]);
        b(&["route", "add", "10.201.0.0/24", "via", "10.200.0.1"]);
        b(&["route", "add", "10.202.0.0/24", "via", "10.200.0.1"]);
        b(&["route", "add", "fd00:201::/64", "via", "fd00:200::1"]);
        b(&["route", "add", "fd00:202::/64", "via", "fd00:200::1"]);
        Topology {
            server,
            client,
            server_if,
            client_if,
        }
    }
}

/// The real `listenscope-agent`, ready for arguments.
pub fn agent_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_listenscope-agent"))
}

/// Runs the real `listenscope-agent` with `args`; returns (exit ok, stdout, stderr).
pub fn agent(args: &[&str]) -> (bool, String, String) {
    let out = agent_command()
        .args(args)
        .output()
        .expect("run listenscope-agent");
    (
        // 0 complete, 3 partial (a machine may run a process even root cannot read).
        matches!(out.status.code(), Some(0 | 3)),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `listenscope-agent scan --json ARGS…`, parsed; panics with stderr on failure.
pub fn scan_json(args: &[&str]) -> Value {
    let mut all = vec!["scan", "--json"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = agent(&all);
    assert!(ok, "scan failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

/// The listeners of one namespace with the given protocol and port.
pub fn find<'a>(doc: &'a Value, netns: &str, proto: &str, port: u16) -> Vec<&'a Value> {
    doc["listeners"]
        .as_array()
        .expect("listeners array")
        .iter()
        .filter(|l| l["netns"]["name"] == netns && l["protocol"] == proto && l["port"] == port)
        .collect()
}

/// pids listed as owners of a listener.
pub fn owner_pids(l: &Value) -> Vec<u32> {
    l["processes"]
        .as_array()
        .expect("processes array")
        .iter()
        .map(|p| p["pid"].as_u64().expect("pid") as u32)
        .collect()
}

/// The capabilities a deployment file grants: the systemd unit's `AmbientCapabilities=`
/// and the DaemonSet's `capabilities.add`, as `setpriv` names them.
pub fn deployed_caps() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let unit = std::fs::read_to_string(format!("{root}/deploy/systemd/listenscope-agent.service"))
        .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants ambient capabilities");
    let mut unit_caps: Vec<String> = line
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    unit_caps.sort();
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities");
    let mut bounding: Vec<String> = bounding
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    bounding.sort();
    assert_eq!(unit_caps, bounding, "ambient and bounding sets differ");
    let ds =
        std::fs::read_to_string(format!("{root}/deploy/kubernetes/agent-daemonset.yaml")).unwrap();
    let add = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .expect("the DaemonSet adds capabilities");
    let mut ds_caps: Vec<String> = add
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().to_lowercase())
        .collect();
    ds_caps.sort();
    assert_eq!(
        unit_caps, ds_caps,
        "the systemd unit and the DaemonSet grant different sets"
    );
    unit_caps
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",")
}
