//! Throwaway network namespaces and veth links.
//!
//! Names carry the creating process: namespaces `lst-<pid>-<n>`, links `lv<pid>{a,b}<n>`.
//! Everything is deleted on drop; namespaces left behind by a killed run are deleted by
//! the next test process's first [`require_root`](crate::require_root), once their
//! creator is gone.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::{require_root, run, unique};

/// Prefixes of namespaces this kit creates (`lsc-`: the collector tests' former own).
const PREFIXES: [&str; 2] = ["lst-", "lsc-"];

/// Deletes `lst-<pid>-*` namespaces whose creating test process is gone.
pub(crate) fn sweep_leftovers() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `f` on a new thread that has entered the network namespace behind `nsfile` (a
/// `/run/netns` file, `/proc/PID/ns/net`, any nsfs mount). Sockets it creates stay in that
/// namespace after the thread ends; the calling thread never leaves its own.
pub fn enter_netns<T: Send>(nsfile: impl AsRef<Path>, f: impl FnOnce() -> T + Send) -> T {
    let nsfile = nsfile.as_ref();
    let file = File::open(nsfile).unwrap_or_else(|e| panic!("open {}: {e}", nsfile.display()));
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open nsfs fd; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns {}: {}",
                nsfile.display(),
                io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    })
}

/// A named network namespace (`/run/netns/NAME`) with `lo` up and ICMP errors not
/// rate-limited (negative UDP probes answer at once); deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        require_root();
        let name = format!("lst-{}-{}", std::process::id(), unique());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.sysctl("net.ipv4.icmp_ratelimit", "0");
        ns.sysctl("net.ipv6.icmp.ratelimit", "0");
        ns
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS…`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let kv = format!("{key}={value}");
        self.exec("sysctl", &["-q", "-w", &kv]);
    }

    /// Runs a program inside the namespace (`ip netns exec`); it must succeed.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// The namespace's inode (its identity in `/proc/PID/ns/net`).
    pub fn inode(&self) -> u64 {
        fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("namespace {}: {e}", self.name))
            .ino()
    }

    /// Runs `f` on a thread that has entered this namespace (see [`enter_netns`]).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        enter_netns(self.path(), f)
    }

    /// The index of interface `ifname` in this namespace (0: no such interface).
    pub fn ifindex(&self, ifname: &str) -> u32 {
        let c = std::ffi::CString::new(ifname).expect("interface name without NUL");
        // SAFETY: valid NUL-terminated name.
        self.enter(|| unsafe { libc::if_nametoindex(c.as_ptr()) })
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair: end `a` in namespace `a`, end `b` in namespace `b` (`None`: this process's
/// own namespace, "the host"). Created down and without addresses. An end on the host is
/// deleted on drop (the pair goes with it); ends inside namespaces go with the namespace.
#[derive(Debug)]
pub struct Veth {
    pub a: String,
    pub b: String,
    host_end: Option<String>,
}

impl Veth {
    pub fn new(a: Option<&Netns>, b: Option<&Netns>) -> Veth {
        require_root();
        let (pid, n) = (std::process::id() % 100_000, unique());
        let (a_if, b_if) = (format!("lv{pid}a{n}"), format!("lv{pid}b{n}"));
        let mut args = vec!["link", "add", a_if.as_str()];
        if let Some(ns) = a {
            args.extend(["netns", ns.name.as_str()]);
        }
        args.extend(["type", "veth", "peer", "name", b_if.as_str()]);
        if let Some(ns) = b {
            args.extend(["netns", ns.name.as_str()]);
        }
        run("ip", &args);
        let host_end = match (a, b) {
            (None, _) => Some(a_if.clone()),
            (_, None) => Some(b_if.clone()),
            _ => None,
        };
        Veth {
            a: a_if,
            b: b_if,
            host_end,
        }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        if let Some(end) = &self.host_end {
            let _ = Command::new("ip")
                .args(["link", "del", end])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A veth link from the host into a namespace, on a /24 that no interface of the host
/// uses yet (test processes running at the same time each get their own): host end
/// `10.77.N.1/24`, namespace end `10.77.N.2/24`, both up. The host end (and with it the
/// pair) is deleted on drop.
#[derive(Debug)]
pub struct HostLink {
    pub veth: Veth,
    /// `10.77.N.1`, the host's address on the link.
    pub host_ip: String,
    /// `10.77.N.2`, the namespace's address on the link.
    pub ns_ip: String,
}

impl HostLink {
    pub fn new(ns: &Netns) -> HostLink {
        let veth = Veth::new(None, Some(ns));
        // Choosing a subnet and taking it is one step for every test process on the host.
        let lock = File::create("/run/lock/listenscope-testkit-subnets")
            .or_else(|_| File::create(std::env::temp_dir().join("listenscope-testkit-subnets")))
            .expect("create the subnet lock file");
        // SAFETY: flock on an open fd; released when `lock` is closed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", io::Error::last_os_error());
        let used =
            String::from_utf8_lossy(&run("ip", &["-4", "-o", "addr", "show"]).stdout).into_owned();
        let n = (1..=250)
            .find(|n| !used.contains(&format!(" 10.77.{n}.")))
            .expect("a free 10.77.N.0/24 subnet on the host");
        let (host_ip, ns_ip) = (format!("10.77.{n}.1"), format!("10.77.{n}.2"));
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", &veth.a],
        );
        drop(lock);
        run("ip", &["link", "set", &veth.a, "up"]);
        ns.ip(&["addr", "add", &format!("{ns_ip}/24"), "dev", &veth.b]);
        ns.ip(&["link", "set", &veth.b, "up"]);
        HostLink {
            veth,
            host_ip,
            ns_ip,
        }
    }
}
