//! Container and unit attribution from the socket's own cgroup (INET_DIAG_CGROUP_ID),
//! with real cgroup v2 directories laid out the way docker and systemd lay them out.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::*;

const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Leaf first; retried because a killed process leaves its cgroup asynchronously.
        for _ in 0..50 {
            let mut dirs: Vec<PathBuf> = fs::read_dir(&self.0)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default();
            dirs.push(self.0.clone());
            if dirs
                .iter()
                .all(|d| fs::remove_dir(d).is_ok() || !d.exists())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Starts a listener on `port` in `ns`, created by a process that lives in `cgroup`.
fn listener_in_cgroup(ns: &Netns, cgroup: &Path, port: u16) -> Proc {
    let script = format!(
        "import socket,time\n\
         s=socket.socket(socket.AF_INET6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
         s.bind(('::', {port}))\n\
         s.listen()\n\
         print('ready', flush=True)\n\
         time.sleep(300)\n"
    );
    let procs = cgroup.join("cgroup.procs");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}' && exec ip netns exec '{}' python3 -c \"$0\"",
            procs.display(),
            ns.name
        ))
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn listener");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "listener did not start");
    Proc(child)
}

#[test]
fn container_and_unit_come_from_the_sockets_cgroup() {
    require_root();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = listenscope_agent::os::procfs::cgroup2_mount(&mountinfo)
        .expect("a cgroup v2 hierarchy is mounted (hybrid or unified)");
    let top = root.join(format!("lst-{}", std::process::id()));
    let docker = top.join(format!("docker-{ID}.scope"));
    let unit = top.join("web.service");
    fs::create_dir_all(&docker).unwrap();
    fs::create_dir_all(&unit).unwrap();
    let _cleanup = Cgroup(top.clone());

    let ns = Netns::new();
    let _c1 = listener_in_cgroup(&ns, &docker, 9200);
    let _c2 = listener_in_cgroup(&ns, &unit, 9201);

    let doc = scan_json(&["--netns", &ns.name]);
    let c = find(&doc, &ns.name, "tcp", 9200)[0].clone();
    assert_eq!(c["container"]["runtime"], "docker", "{c}");
    assert_eq!(c["container"]["id"], ID);
    assert_eq!(c["unit"], serde_json::Value::Null);
    let top_name = top.file_name().unwrap().to_str().unwrap();
    assert_eq!(c["cgroup"], format!("/{top_name}/docker-{ID}.scope"));
    assert_eq!(c["processes"][0]["comm"], "python3");

    let u = find(&doc, &ns.name, "tcp", 9201)[0].clone();
    assert_eq!(u["unit"], "web.service", "{u}");
    assert_eq!(u["container"], serde_json::Value::Null);

    let (ok, table, _) = agent(&["scan", "--netns", &ns.name]);
    assert!(ok);
    assert!(
        table.contains(&format!("docker:{}", &ID[..12])) && table.contains("web.service"),
        "{table}"
    );
}
