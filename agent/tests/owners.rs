//! Owners: a socket shared by a master and its workers lists every process holding it,
//! and processes that exit while a scan runs are skipped, never errors.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use util::*;

/// The tests of this file run one at a time: a scan lists every process holding a socket,
/// and another test's short-lived children (the churn below) were once seen holding this
/// test's socket too (CI: an extra `sleep 0.02` among the owners of :8000).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts `sleep SECS` holding `fd` (FD_CLOEXEC cleared in the child only); killed on drop.
fn spawn_holder(fd: RawFd, secs: &str) -> Proc {
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
    Proc(cmd.spawn().expect("spawn sleep"))
}

#[test]
fn shared_socket_lists_every_owner() {
    let _serial = serial();
    let ns = Netns::new();
    let socket = ns.enter(|| Bind::tcp("::", 8000).v6only(false).open());
    let workers: Vec<Proc> = (0..3)
        .map(|_| spawn_holder(socket.as_raw_fd(), "300"))
        .collect();
    let mut expected: Vec<u32> = workers.iter().map(|c| c.pid()).collect();
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
        .find(|p| p["pid"] == workers[0].pid())
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
    let _serial = serial();
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
                let mut child = spawn_holder(socket.as_raw_fd(), "0.02");
                drop(socket);
                let _ = child.0.wait();
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
    let _serial = serial();
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

/// The walk starts before the wanted inodes are known (it overlaps the netlink dumps):
/// owners it sees before the set is published must not be lost. Here the set is published
/// only once the walk has been through every pid and each walker thread that found sockets
/// is parked waiting for it, so every owner is found before the set exists; the walk must
/// still report both owners of the wanted socket, and nothing else.
#[test]
fn walk_finds_owners_when_wanted_set_arrives_late() {
    let _serial = serial();
    use listenscope_agent::os::procfs;
    use std::os::unix::fs::MetadataExt;
    require_root();
    /// Name of the thread that runs the walk; its walker threads inherit it.
    const WALK_THREAD: &str = "lst-late-walk";
    let wanted_socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inode = |s: &std::net::TcpListener| {
        std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .unwrap()
            .ino()
    };
    let (want, other) = (inode(&wanted_socket), inode(&other_socket));
    // A second owner of the wanted socket, in another process.
    let holder = spawn_holder(wanted_socket.as_raw_fd(), "300");
    let me = std::process::id();
    // Every process but this one's other children: a child forked by a test running in
    // parallel holds copies of this process's sockets until it execs.
    let pids: Vec<u32> = procfs::pids()
        .into_iter()
        .filter(|&p| p == holder.pid() || parent_of(p) != Some(me))
        .collect();
    assert!(pids.contains(&me) && pids.contains(&holder.pid()));
    let wanted = OnceLock::new();
    let passwd = procfs::Passwd::load();
    let walk_tid = AtomicI32::new(0);
    let (walk, ended_early) = std::thread::scope(|s| {
        let walk = std::thread::Builder::new()
            .name(WALK_THREAD.into())
            .spawn_scoped(s, || {
                // SAFETY: gettid has no preconditions.
                walk_tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                procfs::walk_socket_owners(&pids, &wanted, 2, &passwd)
            })
            .unwrap();
        wait_until(
            Duration::from_secs(20),
            "the walk through every pid, its walkers waiting for the wanted set",
            || {
                walk.is_finished()
                    || parked_on(&wanted, WALK_THREAD, walk_tid.load(Ordering::SeqCst))
            },
        );
        let ended_early = walk.is_finished();
        wanted.set([want].into_iter().collect()).unwrap();
        (walk.join().unwrap(), ended_early)
    });
    assert!(
        !ended_early,
        "the walk ended before the wanted set was published, so it dropped the owners it \
         had seen: {:?}",
        walk.by_inode.get(&want)
    );
    let mut owners = walk.by_inode.get(&want).cloned().unwrap_or_default();
    owners.sort_unstable();
    let mut expected = vec![me, holder.pid()];
    expected.sort_unstable();
    assert_eq!(
        owners, expected,
        "every owner seen before the set was published"
    );
    assert!(
        !walk.by_inode.contains_key(&other),
        "only wanted inodes are reported"
    );
    assert_eq!(walk.processes[&me].pid, me);
    assert_eq!(walk.processes[&holder.pid()].comm, "sleep");
}

/// A process's parent, from `/proc/PID/stat` (None once it is gone).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID …": COMM may contain anything, so parse after its last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether every thread of this process named `name` (but `except`) is blocked in a futex
/// wait on an address inside `lock` (that is, in `OnceLock::wait`), and at least one is.
/// Read from `/proc/self/task/TID/syscall`: "NR ARG0 …", ARG0 the futex address.
fn parked_on<T>(lock: &OnceLock<T>, name: &str, except: i32) -> bool {
    let start = std::ptr::from_ref(lock) as usize;
    let inside = start..start + std::mem::size_of_val(lock);
    let mut parked = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if task.file_name().to_str().and_then(|t| t.parse().ok()) == Some(except) {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue; // exited
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(syscall) = std::fs::read_to_string(task.path().join("syscall")) else {
            return false; // exiting: look again
        };
        let mut f = syscall.split_whitespace();
        let nr = f.next().and_then(|n| n.parse::<libc::c_long>().ok());
        let addr = f
            .next()
            .and_then(|a| usize::from_str_radix(a.trim_start_matches("0x"), 16).ok());
        match (nr, addr) {
            (Some(libc::SYS_futex), Some(a)) if inside.contains(&a) => parked += 1,
            _ => return false, // still walking (or waiting on something else)
        }
    }
    parked > 0
}
