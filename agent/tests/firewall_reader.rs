//! The firewall reader (`os::firewall`) against real namespaces and the real tools: what it
//! reads from nftables, iptables-nft and iptables-legacy rules, that it creates no table
//! and runs no binary it does not need, that the generation id drives the cache, and that
//! every failure (missing binary, missing CAP_NET_ADMIN, a hung or chatty or failing tool)
//! is a problem that names its fix, with no rules claimed. Needs root.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use listenscope_agent::os::firewall::{
    FirewallCache, ProblemCause, RawFirewall, ReadOptions, probe_current, read_current,
};
use util::*;

/// Options whose every binary path does not exist: a read with them that reports no
/// problem ran no binary.
fn no_binaries() -> ReadOptions {
    let missing = |name: &str| Some(PathBuf::from(format!("/nonexistent/{name}")));
    ReadOptions {
        nft: missing("nft"),
        iptables_nft_save: missing("iptables-nft-save"),
        ip6tables_nft_save: missing("ip6tables-nft-save"),
        iptables_legacy_save: missing("iptables-legacy-save"),
        ip6tables_legacy_save: missing("ip6tables-legacy-save"),
        ..ReadOptions::default()
    }
}

fn read_in(ns: &Netns, opts: &ReadOptions) -> RawFirewall {
    ns.enter(|| read_current(opts))
}

/// `nft -f` a ruleset text inside the namespace.
fn nft_load(ns: &Netns, dir: &TempDir, ruleset: &str) {
    let file = dir.join(format!("ruleset-{}.nft", rand_tag()));
    fs::write(&file, ruleset).unwrap();
    ns.exec("nft", &["-f", file.to_str().unwrap()]);
}

fn rand_tag() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Legacy table names of the namespace, read by the test itself.
fn legacy_names(ns: &Netns, file: &str) -> Vec<String> {
    let path = format!("/proc/thread-self/net/{file}");
    ns.enter(|| fs::read_to_string(&path).unwrap_or_default())
        .lines()
        .map(str::to_string)
        .collect()
}

/// An executable shell script in `dir`.
fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn problems_text(fw: &RawFirewall) -> String {
    fw.problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

const SMALL_TABLE: &str = "\
table inet lst_small {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 4711 drop
    }
}
";

#[test]
fn empty_namespace_has_nothing_and_runs_nothing() {
    let ns = Netns::new();
    let fw = read_in(&ns, &no_binaries());
    assert!(fw.problems.is_empty(), "{}", problems_text(&fw));
    assert!(fw.nft_tables.is_empty(), "{:?}", fw.nft_tables);
    assert_eq!(fw.nft_json, None);
    assert_eq!(fw.iptables_nft, None);
    assert_eq!(fw.ip6tables_nft, None);
    assert!(fw.legacy_v4_tables.is_empty() && fw.legacy_v6_tables.is_empty());
    assert_eq!(fw.iptables_legacy, None);
    assert!(
        fw.generation.is_some(),
        "the generation is readable without tables"
    );
    // The same with the real binaries around: still nothing to run, nothing to report.
    let fw = read_in(&ns, &ReadOptions::default());
    assert!(fw.problems.is_empty(), "{}", problems_text(&fw));
    assert_eq!(fw.nft_json, None);
    assert_eq!(ns.enter(probe_current), fw.probe());
}

#[test]
fn nft_ruleset_is_read_and_its_generation_drives_the_cache() {
    let ns = Netns::new();
    let dir = TempDir::new("fw-nft");
    let before = ns.enter(probe_current);
    nft_load(&ns, &dir, SMALL_TABLE);
    let opts = ReadOptions::default();
    let fw = read_in(&ns, &opts);
    assert!(fw.problems.is_empty(), "{}", problems_text(&fw));
    assert_eq!(
        fw.nft_tables,
        vec![("inet".to_string(), "lst_small".to_string())]
    );
    let json = fw.nft_json.as_deref().expect("nft JSON");
    assert!(
        json.contains("\"lst_small\"") && json.contains("4711"),
        "{json}"
    );
    assert_eq!(
        fw.iptables_nft, None,
        "no ip filter table, no iptables-nft-save"
    );
    assert!(fw.generation.is_some());
    assert_ne!(
        fw.generation, before.generation,
        "loading bumps the generation"
    );

    let inode = ns.inode();
    let mut cache = FirewallCache::new();
    let t0 = Instant::now();
    assert!(cache.needs_read(inode, &ns.enter(probe_current), t0));
    cache.insert(inode, fw.clone(), t0);
    // Unchanged: the cache answers, even much later (no legacy tables).
    let later = t0 + Duration::from_secs(3600);
    assert!(!cache.needs_read(inode, &ns.enter(probe_current), later));
    assert_eq!(cache.get(inode), Some(&fw));

    ns.exec(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "lst_small",
            "input",
            "tcp",
            "dport",
            "4712",
            "drop",
        ],
    );
    let probe = ns.enter(probe_current);
    assert_ne!(probe.generation, fw.generation);
    assert!(cache.needs_read(inode, &probe, t0));
    let fw2 = read_in(&ns, &opts);
    assert!(fw2.nft_json.as_deref().unwrap().contains("4712"));
    cache.insert(inode, fw2, t0);
    assert!(!cache.needs_read(inode, &ns.enter(probe_current), t0));

    // Another namespace never passes for this one, even under the same cache key.
    let other = Netns::new();
    assert!(cache.needs_read(inode, &other.enter(probe_current), t0));
}

#[test]
fn iptables_nft_rules_are_read_with_iptables_nft_save() {
    let ns = Netns::new();
    ns.exec(
        "iptables-nft",
        &["-A", "INPUT", "-p", "tcp", "--dport", "99", "-j", "DROP"],
    );
    let fw = read_in(&ns, &ReadOptions::default());
    assert!(fw.problems.is_empty(), "{}", problems_text(&fw));
    assert!(
        fw.nft_tables
            .contains(&("ip".to_string(), "filter".to_string())),
        "{:?}",
        fw.nft_tables
    );
    let save = fw
        .iptables_nft
        .as_deref()
        .expect("iptables-nft-save output");
    assert!(
        save.contains("-A INPUT -p tcp -m tcp --dport 99 -j DROP"),
        "{save}"
    );
    assert!(fw.nft_json.is_some());
    assert_eq!(fw.ip6tables_nft, None, "no ip6 table");
    assert!(fw.legacy_v4_tables.is_empty());
    // Reading created no table.
    let again = read_in(&ns, &ReadOptions::default());
    assert_eq!(again.nft_tables, fw.nft_tables);
    assert_eq!(again.generation, fw.generation);
}

#[test]
fn legacy_rules_are_read_and_no_table_is_created() {
    let ns = Netns::new();
    assert!(legacy_names(&ns, "ip_tables_names").is_empty());
    let v6_before = legacy_names(&ns, "ip6_tables_names");
    ns.exec(
        "iptables-legacy",
        &["-A", "INPUT", "-p", "tcp", "--dport", "98", "-j", "DROP"],
    );
    assert_eq!(legacy_names(&ns, "ip_tables_names"), ["filter"]);

    let fw = read_in(&ns, &ReadOptions::default());
    assert!(fw.problems.is_empty(), "{}", problems_text(&fw));
    assert_eq!(fw.legacy_v4_tables, ["filter"]);
    assert!(fw.legacy_v6_tables.is_empty());
    let save = fw
        .iptables_legacy
        .as_deref()
        .expect("iptables-legacy-save output");
    assert!(
        save.contains("-A INPUT -p tcp -m tcp --dport 98 -j DROP"),
        "{save}"
    );
    assert_eq!(fw.ip6tables_legacy, None);
    assert!(
        fw.nft_tables.is_empty(),
        "legacy rules are invisible to nft"
    );
    assert_eq!(fw.nft_json, None);

    // Reading instantiated nothing: still only filter, and no ip6 table.
    assert_eq!(legacy_names(&ns, "ip_tables_names"), ["filter"]);
    assert_eq!(legacy_names(&ns, "ip6_tables_names"), v6_before);

    // Legacy changes bump no generation: the cache re-reads on its interval.
    let inode = ns.inode();
    let mut cache = FirewallCache::new();
    let t0 = Instant::now();
    cache.insert(inode, fw, t0);
    let probe = ns.enter(probe_current);
    assert!(!cache.needs_read(inode, &probe, t0 + Duration::from_secs(1)));
    assert!(cache.needs_read(inode, &probe, t0 + cache.legacy_reread));
}

#[test]
fn a_missing_binary_names_its_package() {
    let ns = Netns::new();
    let dir = TempDir::new("fw-missing");
    nft_load(&ns, &dir, SMALL_TABLE);
    ns.exec(
        "iptables-nft",
        &["-A", "INPUT", "-p", "tcp", "--dport", "97", "-j", "DROP"],
    );
    let fw = read_in(&ns, &no_binaries());
    assert_eq!(fw.nft_json, None);
    assert_eq!(fw.iptables_nft, None);
    let packages: Vec<(&str, &str)> = fw
        .problems
        .iter()
        .map(|p| match &p.cause {
            ProblemCause::BinaryNotFound {
                program, package, ..
            } => (program.as_str(), *package),
            other => panic!("unexpected problem {other:?}"),
        })
        .collect();
    assert_eq!(
        packages,
        [("nft", "nftables"), ("iptables-nft-save", "iptables")]
    );
    let text = problems_text(&fw);
    assert!(text.contains("install the nftables package"), "{text}");
    assert!(text.contains("install the iptables package"), "{text}");
    // The netlink part needs no binary.
    assert_eq!(fw.nft_tables.len(), 2);
    assert!(fw.generation.is_some());
}

/// Drops CAP_NET_ADMIN from the calling thread's effective, permitted, inheritable and
/// bounding sets (all per-thread), so neither the thread nor any child it starts has it.
fn drop_cap_net_admin_on_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    // SAFETY: prctl with integer arguments touches no memory of ours.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAPBSET_DROP,
            CAP_NET_ADMIN as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "PR_CAPBSET_DROP: {}",
        std::io::Error::last_os_error()
    );
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header reads the header and writes two Data structs, the
    // size of `data`; both are live locals.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    for set in [
        &mut data[0].effective,
        &mut data[0].permitted,
        &mut data[0].inheritable,
    ] {
        *set &= !(1 << CAP_NET_ADMIN);
    }
    // SAFETY: capset reads the v3 header and two Data structs, both live locals.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

#[test]
fn without_cap_net_admin_nothing_is_claimed() {
    let ns = Netns::new();
    let dir = TempDir::new("fw-nocap");
    nft_load(&ns, &dir, SMALL_TABLE);
    ns.exec(
        "iptables-legacy",
        &["-A", "INPUT", "-p", "tcp", "--dport", "96", "-j", "DROP"],
    );
    let (fw, probe) = ns.enter(|| {
        drop_cap_net_admin_on_this_thread();
        (read_current(&ReadOptions::default()), probe_current())
    });
    assert!(fw.nft_tables.is_empty());
    assert_eq!(fw.generation, None);
    assert_eq!(fw.nft_json, None);
    assert_eq!(fw.iptables_nft, None);
    assert_eq!(fw.iptables_legacy, None);
    assert_eq!(fw.problems.len(), 1, "{}", problems_text(&fw));
    let p = &fw.problems[0];
    assert!(
        matches!(p.cause, ProblemCause::MissingCapNetAdmin { .. }),
        "{p}"
    );
    let text = p.to_string();
    assert!(text.contains("CAP_NET_ADMIN"), "{text}");
    assert!(text.contains("AmbientCapabilities=CAP_NET_ADMIN"), "{text}");
    // The legacy table is known to exist (its name is readable), and named as unread.
    assert_eq!(fw.legacy_v4_tables, ["filter"]);
    assert!(p.what.contains("legacy iptables tables filter"), "{text}");
    assert_eq!(probe.generation, None);
    // The rest of the process kept its capability: the same read works on a fresh thread.
    let fw = read_in(&ns, &ReadOptions::default());
    assert!(fw.problems.is_empty(), "{}", problems_text(&fw));
    assert!(fw.iptables_legacy.is_some() && fw.nft_json.is_some());
}

#[test]
fn a_hung_chatty_or_failing_tool_is_a_problem_and_returns_nothing() {
    let ns = Netns::new();
    let dir = TempDir::new("fw-tools");
    nft_load(&ns, &dir, SMALL_TABLE);
    let with_nft = |path: PathBuf, timeout_ms: u64, max_output: usize| ReadOptions {
        nft: Some(path),
        timeout: Duration::from_millis(timeout_ms),
        max_output,
        ..ReadOptions::default()
    };

    // Hung: killed at the deadline (its group too: `sleep` is the shell's child).
    let hung = script(&dir, "hung-nft", "echo '{\"partial'; sleep 30; echo done");
    let started = Instant::now();
    let fw = read_in(&ns, &with_nft(hung, 300, 1 << 20));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(fw.nft_json, None, "partial output is never returned");
    assert!(
        matches!(&fw.problems[..], [p] if matches!(p.cause, ProblemCause::Timeout { .. })),
        "{}",
        problems_text(&fw)
    );

    // Chatty: stopped at the bound.
    let chatty = script(&dir, "chatty-nft", "exec yes");
    let fw = read_in(&ns, &with_nft(chatty, 5000, 64 * 1024));
    assert_eq!(fw.nft_json, None);
    assert!(
        matches!(&fw.problems[..], [p] if matches!(p.cause, ProblemCause::OutputTooLarge { limit: 65536, .. })),
        "{}",
        problems_text(&fw)
    );

    // Failing: the exit status and the first line of stderr.
    let failing = script(
        &dir,
        "failing-nft",
        "echo '{}'; echo 'Error: boom here' >&2; echo second >&2; exit 3",
    );
    let fw = read_in(&ns, &with_nft(failing, 5000, 1 << 20));
    assert_eq!(fw.nft_json, None);
    match &fw.problems[..] {
        [p] => match &p.cause {
            ProblemCause::Failed { stderr, status, .. } => {
                assert_eq!(stderr, "Error: boom here");
                assert!(status.contains('3'), "{status}");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }

    // The environment is empty but for LC_ALL and PATH.
    let env = script(&dir, "env-nft", "env");
    let fw = read_in(&ns, &with_nft(env, 5000, 1 << 20));
    let out = fw.nft_json.unwrap();
    assert!(out.contains("LC_ALL=C") && out.contains("PATH="), "{out}");
    assert!(!out.contains("HOME=") && !out.contains("CARGO"), "{out}");
}

/// (wall, CPU of this thread + reaped children) of `f`, averaged over `n` runs.
fn cost<T>(n: u32, mut f: impl FnMut() -> T) -> (Duration, Duration) {
    fn cpu(who: libc::c_int) -> Duration {
        // SAFETY: getrusage writes one rusage into the zeroed local it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `ru` is live and writable.
        unsafe { libc::getrusage(who, &raw mut ru) };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
    let both = || cpu(libc::RUSAGE_THREAD) + cpu(libc::RUSAGE_CHILDREN);
    let (wall0, cpu0) = (Instant::now(), both());
    for _ in 0..n {
        std::hint::black_box(f());
    }
    ((wall0.elapsed()) / n, (both() - cpu0) / n)
}

/// Measures `read_current` (empty namespace, ufw-sized iptables-nft ruleset) and
/// `probe_current`, and holds them to generous bounds. CPU includes the children (nft,
/// iptables-nft-save) only when no other test reaps children meanwhile: run it alone
/// (`--test firewall_reader cost -- --nocapture`) for exact figures.
#[test]
fn cost_of_reading() {
    let ns = Netns::new();
    let opts = ReadOptions::default();
    let (empty_wall, empty_cpu) = ns.enter(|| cost(20, || read_current(&opts)));
    let (probe_wall, probe_cpu) = ns.enter(|| cost(200, probe_current));

    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/firewall/c14-ufw/captured.iptables-nft.txt");
    let text = fs::read_to_string(&data).unwrap();
    let split = text.find("# Generated by ip6tables").expect("an IPv6 part");
    let dir = TempDir::new("fw-ufw");
    let (v4, v6) = (dir.join("v4.txt"), dir.join("v6.txt"));
    fs::write(&v4, &text[..split]).unwrap();
    fs::write(&v6, &text[split..]).unwrap();
    ns.exec("iptables-nft-restore", &[v4.to_str().unwrap()]);
    ns.exec("ip6tables-nft-restore", &[v6.to_str().unwrap()]);
    let fw = read_in(&ns, &opts);
    assert!(fw.problems.is_empty(), "{}", problems_text(&fw));
    assert!(
        fw.iptables_nft
            .as_deref()
            .unwrap()
            .contains("ufw-user-input")
    );
    assert!(
        fw.ip6tables_nft
            .as_deref()
            .unwrap()
            .contains("ufw6-user-input")
    );
    let json_len = fw.nft_json.as_ref().map_or(0, String::len);
    let (ufw_wall, ufw_cpu) = ns.enter(|| cost(10, || read_current(&opts)));
    let (ufw_probe_wall, ufw_probe_cpu) = ns.enter(|| cost(200, probe_current));
    eprintln!(
        "read_current, empty namespace: wall {empty_wall:?}, cpu {empty_cpu:?}\n\
         read_current, ufw ({json_len} B of JSON + both iptables-nft-save): wall \
         {ufw_wall:?}, cpu {ufw_cpu:?}\n\
         probe_current: wall {probe_wall:?}, cpu {probe_cpu:?} (empty); wall \
         {ufw_probe_wall:?}, cpu {ufw_probe_cpu:?} (ufw)"
    );
    assert!(empty_wall < Duration::from_millis(50), "{empty_wall:?}");
    assert!(probe_wall < Duration::from_millis(10), "{probe_wall:?}");
    assert!(ufw_wall < Duration::from_millis(500), "{ufw_wall:?}");
}
