//! Every network namespace is found — named ones, ones only a process holds, ones kept
//! alive by an nsfs bind mount elsewhere — each once, with the right name.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use socket2::Socket;
use util::*;

/// Opens `bind` inside the namespace behind an nsfs file (`/proc/PID/ns/net`, a mount…).
fn open_in(nsfile: &str, bind: Bind) -> Socket {
    enter_netns(nsfile, || bind.open())
}

fn names_by_inode(doc: &serde_json::Value) -> Vec<(u64, String)> {
    doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["inode"].as_u64().unwrap(),
                n["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn finds_every_namespace_once() {
    // 1. A named namespace, also entered by a process: listed once, by its name.
    let named = Netns::new();
    let _inside = Proc(
        Command::new("ip")
            .args(["netns", "exec", &named.name, "sleep", "300"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _s1 = named.enter(|| Bind::tcp("::", 9001).v6only(false).open());

    // 2. A namespace only a process holds.
    let holder = Proc(
        Command::new("unshare")
            .args(["-n", "sleep", "300"])
            .spawn()
            .unwrap(),
    );
    let link = format!("/proc/{}/ns/net", holder.0.id());
    // unshare switches namespaces before exec'ing sleep: wait until it has.
    let host_ino = fs::metadata("/proc/self/ns/net").unwrap().ino();
    let orphan_ino = wait_for(
        Duration::from_secs(5),
        "unshare in its own namespace",
        || match fs::metadata(&link).map(|m| m.ino()) {
            Ok(ino) if ino != host_ino => Ok(ino),
            other => Err(format!("{link}: {other:?}")),
        },
    );
    let _s2 = open_in(&link, Bind::tcp("0.0.0.0", 9002));

    // 3. A namespace kept alive only by an nsfs bind mount outside /run/netns.
    let dir = TempDir::new("mnt");
    let mount_file = dir.join("netns");
    File::create(&mount_file).unwrap();
    let mounted = Netns::new();
    let mounted_ino = mounted.inode();
    run(
        "mount",
        &[
            "--bind",
            &format!("/run/netns/{}", mounted.name),
            mount_file.to_str().unwrap(),
        ],
    );
    drop(mounted); // `ip netns del`: now only our mount keeps it alive
    // Unmounted before `dir` goes (dropped first: declared later).
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Umount(mount_file.clone());
    let _s3 = open_in(
        mount_file.to_str().unwrap(),
        Bind::udp("::", 9003).v6only(true),
    );

    let doc = scan_json(&[]);
    let names = names_by_inode(&doc);
    let count = |ino: u64| names.iter().filter(|(i, _)| *i == ino).count();
    assert_eq!(count(named.inode()), 1, "{names:?}");
    assert_eq!(count(orphan_ino), 1, "{names:?}");
    assert_eq!(count(mounted_ino), 1, "{names:?}");
    let name_of = |ino: u64| names.iter().find(|(i, _)| *i == ino).unwrap().1.clone();
    assert_eq!(name_of(named.inode()), named.name);
    assert_eq!(name_of(orphan_ino), format!("net:[{orphan_ino}]"));
    assert_eq!(name_of(mounted_ino), mount_file.to_str().unwrap());
    assert_eq!(name_of(host_ino), "host");
    // Every namespace's listener is there, with v6only from the kernel.
    assert_eq!(find(&doc, &named.name, "tcp", 9001)[0]["v6only"], false);
    assert_eq!(
        find(&doc, &format!("net:[{orphan_ino}]"), "tcp", 9002)[0]["reach_ipv4"],
        "any"
    );
    let mounted_l = find(&doc, mount_file.to_str().unwrap(), "udp", 9003);
    assert_eq!(mounted_l[0]["v6only"], true);
    assert_eq!(mounted_l[0]["source"], "sock_diag");

    // Selection by inode and by name; `current` is the host here.
    let by_inode = scan_json(&["--netns", &orphan_ino.to_string()]);
    assert_eq!(
        names_by_inode(&by_inode),
        [(orphan_ino, format!("net:[{orphan_ino}]"))]
    );
    let by_name = scan_json(&["--netns", &named.name]);
    assert_eq!(
        names_by_inode(&by_name),
        [(named.inode(), named.name.clone())]
    );
    let current = scan_json(&["--netns", "current"]);
    assert_eq!(names_by_inode(&current), [(host_ino, "host".to_string())]);
}

/// A namespace with IPv6 switched off still scans, and reports its IPv4 listeners.
#[test]
fn ipv6_disabled_namespace_reports_ipv4() {
    let ns = Netns::new();
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    ns.sysctl("net.ipv6.conf.lo.disable_ipv6", "1");
    let _s = ns.enter(|| Bind::tcp("127.0.0.1", 9100).open());
    let doc = scan_json(&["--netns", &ns.name]);
    let l = find(&doc, &ns.name, "tcp", 9100);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["reach_ipv4"], "loopback");
    assert_eq!(doc["listeners"].as_array().unwrap().len(), 1);
}
