//! Without root the scan still runs, shows what it can, and says what it could not see and
//! which capability would fix it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

const NOBODY: &str = "65534";

fn as_nobody(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_listenscope-agent"))
        .args(args)
        .output()
        .expect("setpriv");
    (
        out.status.code() == Some(3),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether process `pid` is `sleep` running as nobody (every uid).
fn is_nobodys_sleep(pid: &str) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let uid_nobody = |l: &str| {
        l.strip_prefix("Uid:")
            .is_some_and(|u| u.split_whitespace().all(|id| id == NOBODY))
    };
    status.lines().any(|l| l == "Name:\tsleep") && status.lines().any(uid_nobody)
}

#[test]
fn unprivileged_scan_says_what_it_could_not_see() {
    // One namespace with a process of nobody's inside (readable through /proc/PID/net),
    // one with no process nobody may look at.
    let visible = Netns::new();
    let hidden = Netns::new();
    let _sockets = visible.enter(|| {
        vec![
            Bind::tcp("::", 9300).v6only(false).open(),
            Bind::tcp("0.0.0.0", 9301).open(),
        ]
    });
    let _hidden_socket = hidden.enter(|| Bind::tcp("::", 9302).v6only(false).open());
    let _member = Proc(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &visible.name,
                "setpriv",
                "--reuid",
                NOBODY,
                "--regid",
                NOBODY,
            ])
            .args(["--clear-groups", "sleep", "300"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Ready once it is nobody's `sleep` (not yet `ip` or `setpriv`, still root's).
    wait_until(
        Duration::from_secs(5),
        "nobody's sleep running inside the namespace",
        || {
            let pids = run("ip", &["netns", "pids", &visible.name]).stdout;
            String::from_utf8_lossy(&pids)
                .split_whitespace()
                .any(is_nobodys_sleep)
        },
    );

    let (ok, stdout, stderr) = as_nobody(&["scan", "--json"]);
    assert!(ok, "unprivileged scan must still run: {stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let warnings = doc["warnings"].to_string();

    // The visible namespace came from /proc/PID/net: no v6only there, so never guessed.
    let ns = doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["inode"] == visible.inode())
        .unwrap_or_else(|| panic!("namespace with nobody's process is listed: {doc}"));
    assert_eq!(ns["source"], "procfs");
    let dual = doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["netns"]["inode"] == visible.inode() && l["port"] == 9300)
        .unwrap_or_else(|| panic!("listener read through procfs: {doc}"));
    assert_eq!(dual["v6only"], serde_json::Value::Null);
    assert_eq!(dual["reach_ipv4"], "unknown");
    assert_eq!(dual["reach_ipv6"], "any");
    assert_eq!(dual["trap"], false, "unknown is not claimed");
    assert_eq!(dual["source"], "procfs");
    // root's sockets: nobody cannot see their owners, and is told why.
    assert_eq!(dual["processes"], serde_json::json!([]));
    assert!(
        warnings.contains("grant CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"),
        "{warnings}"
    );
    assert!(warnings.contains("CAP_SYS_ADMIN"), "{warnings}");
    // The other namespace: listed, not scanned, and the fix named.
    let h = doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["inode"] == hidden.inode())
        .unwrap_or_else(|| panic!("/run/netns namespace is listed: {doc}"));
    assert_eq!(h["source"], serde_json::Value::Null);
    assert!(
        warnings.contains(&format!(
            "netns {} (inode {}) not scanned",
            hidden.name,
            hidden.inode()
        )),
        "{warnings}"
    );

    // The table run prints the same warnings on stderr.
    let (ok, table, stderr) = as_nobody(&["scan"]);
    assert!(ok);
    assert!(
        stderr.contains("warning:") && stderr.contains("CAP_SYS_ADMIN"),
        "{stderr}"
    );
    assert!(
        table.contains(" ? "),
        "v6only unknown is shown as ?: {table}"
    );
}

/// Runs `scan --json --netns NS` as `nobody` with exactly `caps` (setpriv syntax).
fn scan_with_caps(caps: &str, ns: &Netns) -> serde_json::Value {
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .args(["--inh-caps", caps, "--ambient-caps", caps])
        .arg(env!("CARGO_BIN_EXE_listenscope-agent"))
        .args(["scan", "--json", "--netns", &ns.name])
        .output()
        .expect("setpriv");
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A namespace with an address, a dual-stack listener on 9400 and a firewall that lets
/// only 9400 in.
fn firewalled_netns() -> (Netns, Veth) {
    let ns = Netns::new();
    let veth = Veth::new(Some(&ns), None);
    ns.ip(&["addr", "add", "198.51.100.10/24", "dev", &veth.a]);
    ns.ip(&[
        "addr",
        "add",
        "2001:db8:100::10/64",
        "dev",
        &veth.a,
        "nodad",
    ]);
    ns.ip(&["link", "set", &veth.a, "up"]);
    let rules = "table inet filter { chain input { type filter hook input priority 0; policy drop; \
                 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept; \
                 tcp dport 9400 accept; }; }";
    let out = ns.exec("nft", &[rules]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (ns, veth)
}

/// The capability set the deployment files grant (the systemd unit and the DaemonSet,
/// read from the files themselves) is enough for the whole truth: as `nobody` with only
/// those capabilities, the scan enters other namespaces (v6only known), names the
/// owners, reads the firewall (verdicts decided, no problem), and warns about nothing.
#[test]
fn the_deployed_capability_set_sees_everything() {
    let (ns, _veth) = firewalled_netns();
    let _sockets = ns.enter(|| {
        vec![
            Bind::tcp("::", 9400).v6only(false).open(),
            Bind::tcp("::", 9401).v6only(false).open(),
        ]
    });
    let doc = scan_with_caps(&deployed_caps(), &ns);
    let l = find(&doc, &ns.name, "tcp", 9400);
    assert_eq!(l.len(), 1, "{doc}");
    assert_eq!(
        l[0]["v6only"], false,
        "entered the namespace: the kernel's answer"
    );
    assert_eq!(l[0]["source"], "sock_diag");
    assert!(
        owner_pids(l[0]).contains(&std::process::id()),
        "owners of root's processes: {doc}"
    );
    assert_eq!(
        (
            l[0]["effective_ipv4"].as_str(),
            l[0]["effective_ipv6"].as_str()
        ),
        (Some("open"), Some("open")),
        "{doc}"
    );
    let closed = find(&doc, &ns.name, "tcp", 9401);
    assert_eq!(closed[0]["effective_ipv4"], "filtered", "{doc}");
    let nsdoc = doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == ns.name.as_str())
        .unwrap();
    assert_eq!(
        nsdoc["firewall"]["sources"],
        serde_json::json!(["nft"]),
        "{doc}"
    );
    assert_eq!(
        nsdoc["firewall"]["problem"],
        serde_json::Value::Null,
        "{doc}"
    );
    let warnings: Vec<&str> = doc["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    assert!(
        warnings.iter().all(|w| w.contains("not dumpable")),
        "only the sandbox's undumpable pid 1 may be invisible: {warnings:?}"
    );
}

/// Without CAP_NET_ADMIN the scan still runs; every verdict of a firewalled namespace
/// is `unknown` (never `open`), and the warning names the capability and the fix.
#[test]
fn without_net_admin_verdicts_are_unknown_and_say_why() {
    let (ns, _veth) = firewalled_netns();
    let _sockets = ns.enter(|| vec![Bind::tcp("::", 9402).v6only(false).open()]);
    let doc = scan_with_caps("+sys_admin,+sys_ptrace,+dac_read_search", &ns);
    let l = find(&doc, &ns.name, "tcp", 9402);
    assert_eq!(l[0]["effective_ipv4"], "unknown", "{doc}");
    assert_eq!(l[0]["effective_ipv6"], "unknown", "{doc}");
    let reason = l[0]["effective_reason"]["ipv4"].as_str().unwrap();
    assert!(reason.contains("CAP_NET_ADMIN"), "{reason}");
    let warned = doc["warnings"].as_array().unwrap().iter().any(|w| {
        w.as_str()
            .is_some_and(|w| w.contains("CAP_NET_ADMIN") && w.contains(ns.name.as_str()))
    });
    assert!(warned, "{doc}");
}
