//! Notices of destroyed UDP sockets, per network namespace: how `run` learns of a UDP
//! listener's close within moments (docs/realtime.md).
//!
//! sock_diag multicasts a message when a socket is destroyed, to the members of its
//! `SKNLGRP_INET_UDP_DESTROY` / `SKNLGRP_INET6_UDP_DESTROY` groups in the socket's own
//! namespace (the TCP groups are not used: they fire for every connection, ~13 % of a core
//! at 26k connections/s). The message is an `inet_diag_msg` with the socket's address,
//! port and cookie, inode 0. A subscription is a sock_diag socket opened inside the
//! namespace (on the namespace's thread, like the sockets `System::reread` keeps) and
//! registered here; one epoll set waits on all of them.
//!
//! Every UDP socket's end is announced, DNS clients' included: the caller keeps only ports
//! it knew a listener on. The kernel queues these messages only while someone is
//! subscribed, and a full receive queue (ENOBUFS) says messages were lost: the namespace
//! is then read again.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

/// `SKNLGRP_INET_UDP_DESTROY` and `SKNLGRP_INET6_UDP_DESTROY` (`linux/sock_diag.h`).
const GROUP_UDP4_DESTROY: u32 = 2;
const GROUP_UDP6_DESTROY: u32 = 4;
/// `SOCK_DIAG_BY_FAMILY`: the type of the notices.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Receive queue asked for each subscription: room for ~2,000 notices between two reads.
const RCVBUF: libc::c_int = 256 * 1024;
/// Most epoll events taken per wait.
const EVENTS: usize = 64;

/// One thing a wait found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// A UDP socket bound to this port was destroyed in this namespace.
    Port { netns: u64, port: u16 },
    /// Notices of this namespace were lost (its queue overflowed).
    Lost { netns: u64 },
}

/// The subscriptions of every namespace read so far, and the epoll set over them.
#[derive(Debug)]
pub struct UdpGone {
    epoll: OwnedFd,
    /// namespace inode → its subscription. Replacing or removing one closes it, which also
    /// takes it out of the epoll set.
    sockets: Mutex<HashMap<u64, Socket>>,
}

impl UdpGone {
    pub fn new() -> io::Result<UdpGone> {
        // SAFETY: epoll_create1 takes no pointer; on success it returns a new fd that only
        // this OwnedFd owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(UdpGone {
            // SAFETY: `fd` was just returned by epoll_create1 and is owned by no one else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            sockets: Mutex::new(HashMap::new()),
        })
    }

    /// A subscription in the calling thread's namespace (call it on that namespace's
    /// thread, then [`UdpGone::add`] it from anywhere).
    pub fn subscribe_here() -> io::Result<Socket> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        socket.add_membership(GROUP_UDP4_DESTROY)?;
        // A kernel without IPv6 has no such group: IPv4 notices alone then.
        let _ = socket.add_membership(GROUP_UDP6_DESTROY);
        socket.set_non_blocking(true)?;
        let rcvbuf = RCVBUF;
        // SAFETY: the fd is open for the call; `rcvbuf` is a live c_int and the length
        // passed is its size. The kernel copies the value. A refusal leaves the default.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const rcvbuf).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Ok(socket)
    }

    /// Watches `socket` (from [`UdpGone::subscribe_here`]) for namespace `netns`.
    pub fn add(&self, netns: u64, socket: Socket) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: netns,
        };
        // SAFETY: both fds are open for the call; `ev` is a live epoll_event the kernel
        // copies and does not keep.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                socket.as_raw_fd(),
                &raw mut ev,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.lock().insert(netns, socket);
        Ok(())
    }

    /// How many namespaces are watched.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether `netns` is watched.
    pub fn watches(&self, netns: u64) -> bool {
        self.lock().contains_key(&netns)
    }

    /// Keeps only the namespaces `keep` says (the others' sockets are closed).
    pub fn retain(&self, mut keep: impl FnMut(u64) -> bool) {
        self.lock().retain(|netns, _| keep(*netns));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Socket>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` (forever: `None`) for notices and appends what they say to
    /// `out`. An interrupted wait returns with nothing.
    pub fn wait(&self, timeout: Option<Duration>, out: &mut Vec<Gone>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
        // SAFETY: `events` is a live array of EVENTS epoll_events, the count passed; the
        // kernel writes at most that many and keeps no pointer.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS as libc::c_int,
                ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let mut buf = vec![0u8; 32 * 1024];
        let sockets = self.lock();
        for ev in &events[..n as usize] {
            let netns = ev.u64;
            let Some(socket) = sockets.get(&netns) else {
                continue; // removed since
            };
            loop {
                match socket.recv(&mut &mut buf[..], 0) {
                    Ok(0) => break,
                    Ok(len) => {
                        for port in parse_notices(&buf[..len]) {
                            out.push(Gone::Port { netns, port });
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        out.push(Gone::Lost { netns });
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        out.push(Gone::Lost { netns });
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The local ports named by the destroy notices in one datagram. Anything else (other
/// message types, truncated messages) is skipped.
pub fn parse_notices(datagram: &[u8]) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut off = 0;
    while off + 16 <= datagram.len() {
        let b = &datagram[off..];
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            break;
        }
        let payload = &b[16..len];
        // inet_diag_msg: family(1) state(1) timer(1) retrans(1), then id.sport (big endian).
        if kind == SOCK_DIAG_BY_FAMILY
            && payload.len() >= 6
            && matches!(i32::from(payload[0]), libc::AF_INET | libc::AF_INET6)
        {
            ports.push(u16::from_be_bytes([payload[4], payload[5]]));
        }
        off += (len + 3) & !3;
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(kind: u16, family: u8, port: u16) -> Vec<u8> {
        let mut payload = vec![family, 7, 0, 0];
        payload.extend_from_slice(&port.to_be_bytes());
        payload.resize(72, 0);
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&payload);
        m
    }

    #[test]
    fn notices() {
        let two = [notice(20, 2, 53), notice(20, 10, 5353)].concat();
        assert_eq!(parse_notices(&two), vec![53, 5353]);
        // Another type, another family: skipped.
        assert_eq!(parse_notices(&notice(3, 2, 53)), Vec::<u16>::new());
        assert_eq!(parse_notices(&notice(20, 1, 53)), Vec::<u16>::new());
        // Truncated, garbage, empty: nothing, no panic.
        let n = notice(20, 2, 53);
        for cut in 0..n.len() {
            assert!(parse_notices(&n[..cut]).is_empty(), "cut at {cut}");
        }
        let mut bad = notice(20, 2, 53);
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_notices(&bad).is_empty());
        assert!(parse_notices(&[0xff; 40]).is_empty());
    }
}
