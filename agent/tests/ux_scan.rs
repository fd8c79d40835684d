//! `listenscope-agent scan` in the shell: CSV (LF, a header even with no row), rows without
//! a header, counts in words ("1 listener"), grep-like exit codes (a complete, a partial,
//! a `--trap-only` search; unreadable owners alone are not partial), the namespace selectors the docs promise (`net:[INODE]`,
//! `/run/netns/NAME`), namespace counts that do not depend on `--proto`, and a reader
//! that goes away early. Real namespaces and sockets, the real binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod ux_util;

use std::process::{Command, Stdio};

use listenscope_testkit::{Bind, Netns};
use socket2::Socket;

/// A namespace holding `binds` (opened inside it; the sockets stay there).
fn netns_with(binds: &[Bind]) -> (Netns, Vec<Socket>) {
    let ns = Netns::new();
    let sockets = ns.enter(|| binds.iter().map(Bind::open).collect());
    (ns, sockets)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn output(mut cmd: Command) -> Run {
    let o = cmd.output().unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `scan ARGS…` as root.
fn scan(args: &[&str]) -> Run {
    let mut cmd = ux_util::agent();
    cmd.arg("scan").args(args);
    output(cmd)
}

/// `scan ARGS…` as root in a PID namespace of its own: no process it cannot read (this
/// machine may run one that even root cannot look into), so the scan is complete.
fn complete_scan(args: &[&str]) -> Run {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--"])
        .arg(env!("CARGO_BIN_EXE_listenscope-agent"))
        .arg("scan")
        .args(args);
    let run = output(cmd);
    assert!(
        !run.stderr.contains("warning:"),
        "not a complete scan:\n{}",
        run.stderr
    );
    run
}

/// `scan ARGS…` as nobody without capabilities: other namespaces cannot be entered and
/// other users' processes cannot be read.
fn as_nobody(args: &[&str]) -> Run {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(env!("CARGO_BIN_EXE_listenscope-agent"))
    .arg("scan")
    .args(args);
    output(cmd)
}

#[test]
fn exit_codes_are_grep_like() {
    let (trap_ns, _t) = netns_with(&[Bind::tcp("::", 8080).v6only(false)]);
    let (plain_ns, _p) = netns_with(&[Bind::tcp("0.0.0.0", 8081)]);
    let (trap, plain) = (trap_ns.name.as_str(), plain_ns.name.as_str());

    // Complete: 0, and --trap-only is a search: 0 found, 1 nothing found.
    assert_eq!(complete_scan(&["--netns", plain]).code, Some(0));
    let r = complete_scan(&["--netns", trap, "--trap-only"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains(":::8080"), "{}", r.stdout);
    let r = complete_scan(&["--netns", plain, "--trap-only"]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);

    // Partial: a namespace nobody may not enter (not scanned), or all namespaces while
    // other users' namespaces cannot be seen: 3, also for a search that found nothing.
    let r = as_nobody(&["--netns", plain]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("warning:"), "{}", r.stderr);
    let r = as_nobody(&["--json"]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stdout.contains("\"partial\":true"), "{}", r.stdout);
    let r = as_nobody(&["--netns", trap, "--trap-only"]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);

    // Owners that cannot be read are a warning, not a partial scan: every socket of the
    // namespace and what it accepts is there (a root-owned listener, read by nobody).
    let _root_owned = Bind::tcp("127.0.0.1", 0).open();
    let r = as_nobody(&["--netns", "current", "--json"]);
    assert!(
        r.stderr.is_empty(),
        "JSON carries the warnings: {}",
        r.stderr
    );
    assert!(r.stdout.contains("\"partial\":false"), "{}", r.stdout);
    assert!(r.stdout.contains("show no owner"), "{}", r.stdout);
    assert_eq!(r.code, Some(0), "{}", r.stdout);

    // Errors: 2.
    let r = scan(&["--netns", "no-such-namespace"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let r = scan(&["--csv", "--json"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);

    // Documented where people look.
    let help = scan(&["--help"]).stdout;
    for line in [
        "Exit status:",
        "1  --trap-only: no trap found",
        "3  the scan is partial",
    ] {
        assert!(help.contains(line), "{line:?} not in:\n{help}");
    }
}

#[test]
fn csv_has_a_header_always_lf_lines_and_rows_without_header() {
    let (ns, _s) = netns_with(&[Bind::tcp("0.0.0.0", 8082)]);
    let header = "trap,netstat_proto,shown_as,really_accepts,v6only,firewall,netns,processes,\
                  unit_or_container,protocol,family,address,port,interface,reach_ipv4,\
                  reach_ipv6,latent,hidden_ipv4_exposure,effective_ipv4,effective_ipv6,pids,\
                  unit,container_runtime,container_id,container_pod_uid,cgroup,uid,inode,\
                  netns_inode,source";
    let r = complete_scan(&["--csv", "--netns", &ns.name]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!r.stdout.contains('\r'), "CRLF: {:?}", r.stdout);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert_eq!(lines[0], header);
    assert!(
        lines[1].starts_with("false,tcp,0.0.0.0:8082,all IPv4,,")
            && lines[1].contains(&format!(
                ",{},-,-,tcp,ipv4,0.0.0.0,8082,,any,none,false,false,",
                ns.name
            ))
            && lines[1].ends_with(&format!(",{},sock_diag", ns.inode())),
        "{}",
        lines[1]
    );
    // No row: still the header.
    let r = complete_scan(&["--csv", "--netns", &ns.name, "--port", "9"]);
    assert_eq!(r.stdout, format!("{header}\n"));
    // Rows only.
    let r = complete_scan(&["--csv", "--no-header", "--netns", &ns.name]);
    assert_eq!(r.stdout, format!("{}\n", lines[1]));
    let r = complete_scan(&["--no-header", "--netns", &ns.name]);
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    assert!(
        r.stdout.contains("0.0.0.0:8082") && !r.stdout.contains("PROTO"),
        "{}",
        r.stdout
    );
    // The table counts in words.
    let r = complete_scan(&["--netns", &ns.name]);
    assert!(
        r.stdout
            .contains("1 listener in 1 of 1 network namespace on "),
        "{}",
        r.stdout
    );
}

#[test]
fn documented_namespace_selectors_work() {
    let (ns, _s) = netns_with(&[Bind::tcp("0.0.0.0", 8083)]);
    let inode = ns.inode();
    for sel in [
        ns.name.clone(),
        ns.path().display().to_string(),
        format!("net:[{inode}]"),
        inode.to_string(),
    ] {
        let r = scan(&["--json", "--netns", &sel]);
        assert!(matches!(r.code, Some(0 | 3)), "--netns {sel}: {}", r.stderr);
        let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let picked: Vec<u64> = doc["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["inode"].as_u64().unwrap())
            .collect();
        assert_eq!(picked, [inode], "--netns {sel}");
    }
}

#[test]
fn namespace_counts_do_not_depend_on_filters() {
    let (ns, _s) = netns_with(&[Bind::tcp("0.0.0.0", 8084), Bind::udp("0.0.0.0", 8084)]);
    let counts = |args: &[&str]| {
        let mut all = vec!["--json", "--netns", &ns.name];
        all.extend_from_slice(args);
        let r = scan(&all);
        let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let n = &doc["namespaces"][0];
        (n["listeners"].as_u64(), n["shown"].as_u64())
    };
    assert_eq!(counts(&[]), (Some(2), Some(2)));
    assert_eq!(counts(&["--proto", "tcp"]), (Some(2), Some(1)));
    assert_eq!(counts(&["--port", "9"]), (Some(2), Some(0)));
}

#[test]
fn a_reader_that_goes_away_ends_the_scan_quietly() {
    for format in [&[][..], &["--json"][..], &["--csv"][..]] {
        let mut child = ux_util::agent()
            .arg("scan")
            .args(format)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the first byte.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            matches!(o.status.code(), Some(0 | 3)),
            "{format:?}: {:?} {err}",
            o.status
        );
        assert!(
            !err.contains("error") && !err.contains("panicked"),
            "{format:?}: {err}"
        );
    }
}
