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
        out.status.success(),
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
        warnings.contains("CAP_SYS_PTRACE + CAP_DAC_READ_SEARCH"),
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

/// The capability set the systemd unit grants (deploy/systemd/listenscope-agent.service) is
/// enough for the whole truth: as `nobody` with only those three capabilities, the scan
/// enters other namespaces (v6only known), names the owners, and warns about nothing.
#[test]
fn the_deployed_capability_set_sees_everything() {
    let ns = Netns::new();
    let _sockets = ns.enter(|| vec![Bind::tcp("::", 9400).v6only(false).open()]);
    let caps = "+sys_admin,+sys_ptrace,+dac_read_search";
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .args(["--inh-caps", caps, "--ambient-caps", caps])
        .arg(env!("CARGO_BIN_EXE_listenscope-agent"))
        .args(["scan", "--json", "--netns", &ns.name])
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
