//! Real sockets: listeners in every bind mode, opened on the calling thread (so in the
//! calling thread's network namespace), and real connection attempts.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

/// How to open one test socket: a listening TCP socket or a bound UDP socket.
#[derive(Debug, Clone)]
pub struct Bind {
    pub udp: bool,
    pub addr: IpAddr,
    pub port: u16,
    /// `IPV6_V6ONLY`; `None` leaves the system default.
    pub v6only: Option<bool>,
    /// `SO_BINDTODEVICE`.
    pub device: Option<String>,
    /// `IP_FREEBIND` / `IPV6_FREEBIND`.
    pub freebind: bool,
    /// Scope (ifindex) for link-local IPv6 binds.
    pub scope: u32,
}

impl Bind {
    pub fn tcp(addr: &str, port: u16) -> Bind {
        Bind {
            udp: false,
            addr: addr
                .parse()
                .unwrap_or_else(|e| panic!("address {addr}: {e}")),
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

    /// Sets or leaves `IPV6_V6ONLY`.
    pub fn v6only_opt(mut self, v: Option<bool>) -> Bind {
        self.v6only = v;
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

    /// Opens the socket on the calling thread (so: in the calling thread's namespace):
    /// `SO_REUSEADDR`, the options above, bound, listening (TCP), non-blocking.
    pub fn open(&self) -> Socket {
        let domain = if self.addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let ty = if self.udp { Type::DGRAM } else { Type::STREAM };
        let s = Socket::new(domain, ty, None).expect("socket");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        if let Some(v) = self.v6only {
            s.set_only_v6(v).expect("IPV6_V6ONLY");
        }
        if let Some(d) = &self.device {
            s.bind_device(Some(d.as_bytes())).expect("SO_BINDTODEVICE");
        }
        if self.freebind {
            if self.addr.is_ipv4() {
                s.set_freebind_v4(true).expect("IP_FREEBIND");
            } else {
                s.set_freebind_v6(true).expect("IPV6_FREEBIND");
            }
        }
        let sa: SocketAddr = match self.addr {
            IpAddr::V4(a) => SocketAddr::new(IpAddr::V4(a), self.port),
            IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, self.port, 0, self.scope)),
        };
        s.bind(&sa.into())
            .unwrap_or_else(|e| panic!("bind {self:?}: {e}"));
        if !self.udp {
            s.listen(128)
                .unwrap_or_else(|e| panic!("listen {self:?}: {e}"));
        }
        s.set_nonblocking(true).expect("O_NONBLOCK");
        s
    }
}

/// A listening TCP socket on `addr`:`port`, opened on the calling thread.
pub fn tcp_listener(addr: &str, port: u16, v6only: Option<bool>) -> Socket {
    Bind::tcp(addr, port).v6only_opt(v6only).open()
}

/// A bound UDP socket on `addr`:`port`, opened on the calling thread.
pub fn udp_socket(addr: &str, port: u16, v6only: Option<bool>) -> Socket {
    Bind::udp(addr, port).v6only_opt(v6only).open()
}

/// A free TCP port on `ip` (bound and released; the tiny race is acceptable in tests).
pub fn free_port(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{ip}:0"))
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().expect("local address")
}

/// A TCP connection attempt from the calling thread: true when the handshake completes.
pub fn tcp_connects(target: SocketAddr, timeout: Duration) -> bool {
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, None).expect("socket");
    s.connect_timeout(&SockAddr::from(target), timeout).is_ok()
}

/// A UDP datagram to `target` from the calling thread: true when `listener` receives it.
/// A port-unreachable answer or silence until `timeout` means it did not get there.
pub fn udp_delivers(target: SocketAddr, listener: &Socket, timeout: Duration) -> bool {
    static TOKEN: AtomicUsize = AtomicUsize::new(0);
    let token = format!("probe-{}", TOKEN.fetch_add(1, Ordering::SeqCst));
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let client = Socket::new(domain, Type::DGRAM, None).expect("socket");
    client.connect(&SockAddr::from(target)).expect("connect");
    client.set_nonblocking(true).expect("O_NONBLOCK");
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
