//! Test harness: throwaway network namespaces joined by veth links, real sockets opened
//! inside them, real connection attempts from another namespace, and the real binary.
//!
//! Everything created here is removed on drop; namespaces left by a crashed run are named
//! `lst-<pid>-<n>` and removed by the next run once that pid is gone.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests build network namespaces and need root: run `scripts/test` as root \
             (CI does)"
        );
    }
    SWEEP.call_once(sweep_leftovers);
}

/// Removes `lst-<pid>-*` namespaces whose creating test process is gone.
fn sweep_leftovers() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("lst-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("lst-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // Make negative UDP probes answer at once (ICMP unreachable is rate-limited otherwise).
        ns.sysctl("net.ipv4.icmp_ratelimit", "0");
        ns.sysctl("net.ipv6.icmp.ratelimit", "0");
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let kv = format!("{key}={value}");
        run(
            "ip",
            &["netns", "exec", &self.name, "sysctl", "-q", "-w", &kv],
        );
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn inode(&self) -> u64 {
        fs::metadata(format!("/run/netns/{}", self.name))
            .expect("namespace file")
            .ino()
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it creates stay in
    /// this namespace after the thread ends.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on an open nsfs fd; affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }

    pub fn ifindex(&self, ifname: &str) -> u32 {
        let c = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: valid NUL-terminated name.
        self.enter(|| unsafe { libc::if_nametoindex(c.as_ptr()) })
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

/// Two namespaces: `server` (A) and `client` (B) joined by a veth pair, with
/// A = 10.200.0.1/24 + 10.201.0.1/32, fd00:200::1/64 + fd00:201::1/128, fe80::a;
/// B = 10.200.0.2/24, fd00:200::2/64, fe80::b, and routes to A's extra addresses.
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
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let server_if = format!("va{}x{n}", std::process::id() % 100_000);
        let client_if = format!("vb{}x{n}", std::process::id() % 100_000);
        run(
            "ip",
            &[
                "link",
                "add",
                &server_if,
                "netns",
                &server.name,
                "type",
                "veth",
                "peer",
                "name",
                &client_if,
                "netns",
                &client.name,
            ],
        );
        for (ns, ifname) in [(&server, &server_if), (&client, &client_if)] {
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

/// How to open one test socket.
#[derive(Debug, Clone)]
pub struct Bind {
    pub udp: bool,
    pub addr: IpAddr,
    pub port: u16,
    pub v6only: Option<bool>,
    pub device: Option<String>,
    pub freebind: bool,
    /// Scope (ifindex) for link-local IPv6 binds.
    pub scope: u32,
}

impl Bind {
    pub fn tcp(addr: &str, port: u16) -> Bind {
        Bind {
            udp: false,
            addr: addr.parse().unwrap(),
            port,
            v6only: None,
            device: None,
            freebind: false,
            scope: 0,
        }
    }
    pub fn udp(addr: &str, port: u16) -> Bind {
        Bind {
            udp: true,
            ..Bind::tcp(addr, port)
        }
    }
    pub fn v6only(mut self, v: bool) -> Bind {
        self.v6only = Some(v);
        self
    }
    pub fn device(mut self, d: &str) -> Bind {
        self.device = Some(d.to_string());
        self
    }
    pub fn freebind(mut self) -> Bind {
        self.freebind = true;
        self
    }
    pub fn scope(mut self, s: u32) -> Bind {
        self.scope = s;
        self
    }

    /// Opens the socket on the calling thread (so: in the calling thread's namespace).
    pub fn open(&self) -> Socket {
        let domain = if self.addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let ty = if self.udp { Type::DGRAM } else { Type::STREAM };
        let s = Socket::new(domain, ty, None).expect("socket");
        s.set_reuse_address(true).unwrap();
        if let Some(v) = self.v6only {
            s.set_only_v6(v).unwrap();
        }
        if let Some(d) = &self.device {
            s.bind_device(Some(d.as_bytes())).expect("SO_BINDTODEVICE");
        }
        if self.freebind {
            if self.addr.is_ipv4() {
                s.set_freebind_v4(true).unwrap();
            } else {
                s.set_freebind_v6(true).unwrap();
            }
        }
        let sa: SocketAddr = match self.addr {
            IpAddr::V4(a) => SocketAddr::new(IpAddr::V4(a), self.port),
            IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, self.port, 0, self.scope)),
        };
        s.bind(&sa.into())
            .unwrap_or_else(|e| panic!("bind {self:?}: {e}"));
        if !self.udp {
            s.listen(128).unwrap();
        }
        s.set_nonblocking(true).unwrap();
        s
    }
}

/// A TCP connection attempt: true when the handshake completes.
pub fn tcp_connects(target: SocketAddr, timeout: Duration) -> bool {
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, None).unwrap();
    s.connect_timeout(&SockAddr::from(target), timeout).is_ok()
}

/// A UDP datagram to `target`: true when `listener` receives it. A port-unreachable
/// answer or silence means it did not get there.
pub fn udp_delivers(target: SocketAddr, listener: &Socket, timeout: Duration) -> bool {
    static TOKEN: AtomicUsize = AtomicUsize::new(0);
    let token = format!("probe-{}", TOKEN.fetch_add(1, Ordering::SeqCst));
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let client = Socket::new(domain, Type::DGRAM, None).unwrap();
    client.connect(&SockAddr::from(target)).unwrap();
    client.set_nonblocking(true).unwrap();
    if client.send(token.as_bytes()).is_err() {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    while Instant::now() < deadline {
        while let Ok(n) = listener.recv(&mut buf) {
            // SAFETY: recv initialised the first n bytes.
            let got: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            if got == token.as_bytes() {
                return true;
            }
        }
        if let Err(e) = client.recv(&mut buf)
            && e.raw_os_error() == Some(libc::ECONNREFUSED)
        {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Runs the real `listenscope-agent` with `args`; returns (exit ok, stdout, stderr).
pub fn agent(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_listenscope-agent"))
        .args(args)
        .output()
        .expect("run listenscope-agent");
    (
        out.status.success(),
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
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap() as u32)
        .collect()
}
