//! Owners: a socket shared by a master and its workers lists every process holding it,
//! and processes that exit while a scan runs are skipped, never errors.

mod util;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use util::*;

/// Starts `sleep SECS` holding `fd` (FD_CLOEXEC cleared in the child only).
fn spawn_holder(fd: RawFd, secs: &str) -> Child {
    let mut cmd = Command::new("sleep");
    cmd.arg(secs).stdin(Stdio::null()).stdout(Stdio::null());
    // SAFETY: between fork and exec we only call fcntl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn sleep")
}

struct Reap(Vec<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn shared_socket_lists_every_owner() {
    let ns = Netns::new();
    let socket = ns.enter(|| Bind::tcp("::", 8000).v6only(false).open());
    let workers = Reap(
        (0..3)
            .map(|_| spawn_holder(socket.as_raw_fd(), "300"))
            .collect(),
    );
    let mut expected: Vec<u32> = workers.0.iter().map(|c| c.id()).collect();
    expected.push(std::process::id());
    expected.sort_unstable();

    let doc = scan_json(&["--netns", &ns.name, "--port", "8000"]);
    let l = find(&doc, &ns.name, "tcp", 8000);
    assert_eq!(l.len(), 1);
    assert_eq!(
        owner_pids(l[0]),
        expected,
        "master and every worker: {}",
        l[0]
    );
    let worker = l[0]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == workers.0[0].id())
        .unwrap();
    assert_eq!(worker["comm"], "sleep");
    assert_eq!(worker["cmdline"], "sleep 300");
    assert_eq!(worker["user"], "root");

    // The table groups them by command.
    let (ok, table, _) = agent(&["scan", "--netns", &ns.name]);
    assert!(ok);
    assert!(table.contains("sleep["), "{table}");
}

/// Processes holding listeners come and go while scans run: every scan succeeds, and every
/// owner it lists was alive long enough to be described.
#[test]
fn processes_exiting_mid_scan_are_skipped() {
    let ns = Netns::new();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut spawned = 0;
            let mut port = 20000u16;
            while !stop.load(Ordering::Relaxed) {
                // A fresh listener handed to a short-lived child, then dropped here: the
                // socket lives exactly as long as the child.
                let socket = ns.enter(|| Bind::tcp("0.0.0.0", port).open());
                let child = spawn_holder(socket.as_raw_fd(), "0.02");
                drop(socket);
                let mut child = Reap(vec![child]);
                let _ = child.0[0].wait();
                spawned += 1;
                port = if port == 29999 { 20000 } else { port + 1 };
            }
            spawned
        });
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut scans = 0;
        while Instant::now() < deadline || scans < 10 {
            let doc = scan_json(&["--netns", &ns.name]);
            for l in doc["listeners"].as_array().unwrap() {
                for p in l["processes"].as_array().unwrap() {
                    assert!(p["comm"].is_string() && p["pid"].is_u64(), "{p}");
                }
            }
            scans += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let spawned = churn.join().unwrap();
        assert!(
            spawned > 10,
            "the churn must actually overlap the scans ({spawned} children)"
        );
    });
}

/// The OS layer itself: a pid that no longer exists is "gone", not an error.
#[test]
fn vanished_pid_is_not_an_error() {
    use listenscope_agent::os::procfs;
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let mut found = Vec::new();
    let err = procfs::walk_pid(pid, |_| true, &mut found).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    let passwd = procfs::Passwd::default();
    assert!(procfs::process_info(pid, &passwd).is_none());
    let wanted = std::sync::OnceLock::new();
    wanted.set([1u64].into_iter().collect()).unwrap();
    let walk = procfs::walk_socket_owners(&[pid, std::process::id()], &wanted, 2, &passwd);
    assert_eq!(walk.denied, 0);
    assert!(walk.by_inode.is_empty());
}

/// The walk starts before the wanted inodes are known (it overlaps the netlink dumps) and
/// still reports exactly the wanted sockets once they are published.
#[test]
fn walk_finds_owners_when_wanted_set_arrives_late() {
    use listenscope_agent::os::procfs;
    use std::os::unix::fs::MetadataExt;
    require_root();
    let wanted_socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inode = |s: &std::net::TcpListener| {
        std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .unwrap()
            .ino()
    };
    let (want, other) = (inode(&wanted_socket), inode(&other_socket));
    let wanted = std::sync::OnceLock::new();
    let passwd = procfs::Passwd::load();
    let pids = procfs::pids();
    let walk = std::thread::scope(|s| {
        let walk = s.spawn(|| procfs::walk_socket_owners(&pids, &wanted, 2, &passwd));
        std::thread::sleep(Duration::from_millis(50));
        wanted.set([want].into_iter().collect()).unwrap();
        walk.join().unwrap()
    });
    assert_eq!(walk.by_inode.get(&want), Some(&vec![std::process::id()]));
    assert!(
        !walk.by_inode.contains_key(&other),
        "only wanted inodes are reported"
    );
    assert_eq!(walk.processes[&std::process::id()].pid, std::process::id());
}
