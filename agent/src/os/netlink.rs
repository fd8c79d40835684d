//! Netlink dumps in the calling thread's network namespace: sock_diag (listening sockets)
//! and rtnetlink (the `local` routing table).
//!
//! A netlink socket answers for the namespace it was created in, so callers create these
//! on a thread that has already entered the namespace (see `netns.rs`). Message building
//! and the inet_diag answer use `netlink-packet-sock-diag`; attributes the crate leaves
//! unparsed (`INET_DIAG_CGROUP_ID` = 21, `INET_DIAG_SOCKOPT` = 22) are decoded here, as is
//! the small rtnetlink route message (a whole rtnetlink crate for one dump was rejected).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, Parseable};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags,
};
use netlink_sys::protocols::{NETLINK_ROUTE, NETLINK_SOCK_DIAG};
use netlink_sys::{Socket, SocketAddr};

use crate::model::{Family, LocalAddrs, Protocol, RawSocket};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWROUTE: u16 = 24;
const RT_TABLE_LOCAL: u32 = 255;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const INET_DIAG_CGROUP_ID: u16 = 21;
const INET_DIAG_SOCKOPT: u16 = 22;
/// `TCP_LISTEN`: listening TCP sockets only (the kernel then skips established ones).
const STATE_LISTEN: u32 = 1 << 10;
/// `TCP_CLOSE`: unconnected UDP sockets (what `ss` prints as UNCONN).
const STATE_CLOSE: u32 = 1 << 7;
/// Receive buffer: the kernel fills dump replies up to ~32 KiB; twice that is safe.
const RECV_BUF: usize = 64 * 1024;
/// Upper bound on one netlink read: a dump never stalls, so this only guards against a bug.
const RECV_TIMEOUT_SECS: libc::time_t = 10;

/// Why a dump failed. `Unsupported` is expected (IPv6 disabled at boot) and not an error.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("address family not available in this namespace")]
    Unsupported,
    #[error("netlink I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed netlink answer: {0}")]
    Decode(String),
}

/// An open netlink socket plus its receive buffer.
pub struct Netlink {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

/// A netlink socket kept open between uses, without the 64 KiB receive buffer (the
/// agent keeps two per namespace: the buffers would cost more than the sockets).
///
/// It holds a reference on its network namespace: the kernel keeps a namespace alive
/// while one of its sockets is open, so the owner must drop it once the namespace is no
/// longer found (`LinuxSystem::discover` does).
pub struct Parked {
    socket: Socket,
    seq: u32,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("fd", &self.socket.as_raw_fd())
            .finish()
    }
}

impl Parked {
    /// The socket again, with a fresh receive buffer.
    pub fn unpark(self) -> Netlink {
        Netlink {
            socket: self.socket,
            buf: vec![0; RECV_BUF],
            seq: self.seq,
        }
    }
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("fd", &self.socket.as_raw_fd())
            .finish()
    }
}

impl Netlink {
    /// A sock_diag socket for the calling thread's current network namespace.
    pub fn sock_diag() -> io::Result<Self> {
        Self::open(NETLINK_SOCK_DIAG)
    }

    /// An rtnetlink socket for the calling thread's current network namespace.
    pub fn route() -> io::Result<Self> {
        Self::open(NETLINK_ROUTE)
    }

    fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: `socket` owns an open fd for the whole call; `tv` is a live, initialized
        // `timeval` on this stack frame and the length passed is exactly its size, which is
        // what SO_RCVTIMEO reads. The kernel copies it and keeps no pointer to it.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink {
            socket,
            buf: vec![0; RECV_BUF],
            seq: 0,
        })
    }

    /// Keeps the socket without its receive buffer, to be used again later (possibly from
    /// another thread: a netlink socket stays bound to the namespace it was opened in).
    pub fn park(self) -> Parked {
        Parked {
            socket: self.socket,
            seq: self.seq,
        }
    }

    /// Sends `request` (a complete netlink message) and feeds each answer's
    /// (type, payload) to `each` until NLMSG_DONE.
    fn dump(
        &mut self,
        request: &mut [u8],
        mut each: impl FnMut(u16, &[u8]) -> Result<(), DumpError>,
    ) -> Result<(), DumpError> {
        self.seq = self.seq.wrapping_add(1);
        request[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        self.socket.send(request, 0)?;
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            if n == 0 {
                return Err(DumpError::Decode("netlink socket closed mid-dump".into()));
            }
            let mut off = 0;
            while off + 16 <= n {
                let b = &self.buf[off..n];
                let len = u32::from_ne_bytes(array_at(b, 0)) as usize;
                let kind = u16::from_ne_bytes(array_at(b, 4));
                let seq = u32::from_ne_bytes(array_at(b, 8));
                if len < 16 || len > b.len() {
                    return Err(DumpError::Decode(format!(
                        "message length {len} outside the {} bytes received",
                        b.len()
                    )));
                }
                let payload = &b[16..len];
                off += (len + 3) & !3;
                if seq != self.seq {
                    continue; // a stale answer to an earlier request
                }
                match kind {
                    NLMSG_DONE => {
                        let code = payload
                            .first_chunk()
                            .map(|c| i32::from_ne_bytes(*c))
                            .unwrap_or(0);
                        return done_code(code);
                    }
                    NLMSG_ERROR => {
                        let code = payload
                            .first_chunk()
                            .map(|c| i32::from_ne_bytes(*c))
                            .ok_or_else(|| DumpError::Decode("short NLMSG_ERROR".into()))?;
                        return done_code(code);
                    }
                    _ => each(kind, payload)?,
                }
            }
        }
    }

    /// All listening TCP sockets or unconnected UDP sockets of one family.
    pub fn dump_sockets(
        &mut self,
        protocol: Protocol,
        family: Family,
        out: &mut Vec<RawSocket>,
    ) -> Result<(), DumpError> {
        let (af, socket_id) = match family {
            Family::Ipv4 => (AF_INET, SocketId::new_v4()),
            Family::Ipv6 => (AF_INET6, SocketId::new_v6()),
        };
        let (proto, states) = match protocol {
            Protocol::Tcp => (IPPROTO_TCP, STATE_LISTEN),
            Protocol::Udp => (IPPROTO_UDP, STATE_CLOSE),
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut msg = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: af,
                protocol: proto,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::from_bits_retain(states),
                socket_id,
            })
            .into(),
        );
        msg.finalize();
        let mut request = vec![0; msg.buffer_len()];
        msg.serialize(&mut request);
        self.dump(&mut request, |_, payload| {
            out.push(decode_inet_diag(payload, protocol)?);
            Ok(())
        })
    }

    /// The namespace's local addresses: RTN_LOCAL routes of the `local` table.
    pub fn local_addrs(&mut self, family: Family, out: &mut LocalAddrs) -> Result<(), DumpError> {
        let mut request = route_dump_request(family, RT_TABLE_LOCAL);
        self.dump(&mut request, |kind, payload| {
            if kind == RTM_NEWROUTE {
                let r = decode_route(payload)?;
                if r.table == RT_TABLE_LOCAL && r.rtype == RTN_LOCAL {
                    match r.dst {
                        Some(IpAddr::V4(a)) => out.v4.push((a, r.dst_len)),
                        Some(IpAddr::V6(a)) => out.v6.push((a, r.dst_len, r.oif)),
                        None => {}
                    }
                }
            }
            Ok(())
        })
    }
}

/// An RTM_GETROUTE dump request for one family and table: nlmsghdr (16) + rtmsg (12).
fn route_dump_request(family: Family, table: u32) -> Vec<u8> {
    let mut request = vec![0u8; 28];
    request[0..4].copy_from_slice(&28u32.to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[16] = match family {
        Family::Ipv4 => libc::AF_INET as u8,
        Family::Ipv6 => libc::AF_INET6 as u8,
    };
    request[20] = table as u8;
    request
}

/// The fields of one RTM_NEWROUTE the agent uses.
struct RouteFields {
    dst_len: u8,
    table: u32,
    rtype: u8,
    /// `None`: no RTA_DST (a default route) or an address of another length.
    dst: Option<IpAddr>,
    af: u8,
    oif: u32,
}

/// Decodes one RTM_NEWROUTE (rtmsg and its attributes) without allocating.
fn decode_route(payload: &[u8]) -> Result<RouteFields, DumpError> {
    if payload.len() < 12 {
        return Err(DumpError::Decode("short rtmsg".into()));
    }
    let (af, dst_len, mut table, rtype) =
        (payload[0], payload[1], u32::from(payload[4]), payload[7]);
    let mut dst: Option<&[u8]> = None;
    let mut oif = 0u32;
    let mut attrs = &payload[12..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return Err(DumpError::Decode("bad route attribute length".into()));
        }
        let v = &attrs[4..len];
        match kind {
            RTA_DST => dst = Some(v),
            RTA_OIF if v.len() == 4 => oif = u32::from_ne_bytes(array_at(v, 0)),
            RTA_TABLE if v.len() == 4 => table = u32::from_ne_bytes(array_at(v, 0)),
            _ => {}
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    let dst = match (i32::from(af), dst) {
        (libc::AF_INET, Some(d)) if d.len() == 4 => {
            Some(IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3])))
        }
        (libc::AF_INET6, Some(d)) if d.len() == 16 => {
            let octets: [u8; 16] = array_at(d, 0);
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    };
    Ok(RouteFields {
        af,
        dst_len,
        table,
        rtype,
        dst,
        oif,
    })
}

impl Netlink {
    /// Unicast routes of the `main` table (destination prefix → output interface index),
    /// for the firewall evaluator's forward path: which interface a DNAT target leaves by.
    pub fn main_routes(&mut self, family: Family, out: &mut Vec<Route>) -> Result<(), DumpError> {
        let mut request = route_dump_request(family, RT_TABLE_MAIN);
        self.dump(&mut request, |kind, payload| {
            if kind == RTM_NEWROUTE && out.len() < MAX_ROUTES {
                let r = decode_route(payload)?;
                // No RTA_DST: the default route of that family.
                let dst = r.dst.or(match i32::from(r.af) {
                    libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                    _ => None,
                });
                if r.table == RT_TABLE_MAIN
                    && r.rtype == RTN_UNICAST
                    && let Some(dst) = dst
                {
                    out.push(Route {
                        dst,
                        len: r.dst_len,
                        oif: r.oif,
                    });
                }
            }
            Ok(())
        })
    }
}

/// At most this many routes are kept per namespace (a full BGP table has ~1M: the
/// evaluator needs the connected and container routes, which come first).
const MAX_ROUTES: usize = 10_000;

/// One unicast route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub len: u8,
    /// Output interface index (0 when the route names none, e.g. multipath).
    pub oif: u32,
}

/// The `N` bytes of `b` at `off`. Callers check the length first; a short `b` panics like
/// slice indexing would.
#[inline]
fn array_at<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

fn done_code(code: i32) -> Result<(), DumpError> {
    match -code {
        0 => Ok(()),
        // No inet_diag handler / family compiled out or disabled at boot.
        libc::ENOENT | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT => Err(DumpError::Unsupported),
        errno => Err(DumpError::Io(io::Error::from_raw_os_error(errno))),
    }
}

/// Size of `struct inet_diag_msg` (family…inode) before its attributes.
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_SKV6ONLY: u16 = 11;

/// Decodes one `inet_diag_msg` and its attributes without allocating.
///
/// This runs once per socket per scan; the crate's parser ([`decode_socket`]) boxes each
/// answer and allocates every unknown attribute, which cost ~2 ms per 10k sockets. The
/// layout is the kernel's stable UAPI (`linux/inet_diag.h`); a test checks both decoders
/// agree on a real dump.
pub fn decode_inet_diag(payload: &[u8], protocol: Protocol) -> Result<RawSocket, DumpError> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(DumpError::Decode(format!(
            "inet_diag_msg of {} bytes, expected at least {INET_DIAG_MSG_LEN}",
            payload.len()
        )));
    }
    let u32_at = |off: usize| u32::from_ne_bytes(array_at(payload, off));
    let family = match payload[0] {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        other => {
            return Err(DumpError::Decode(format!(
                "unexpected address family {other}"
            )));
        }
    };
    let port = u16::from_be_bytes([payload[4], payload[5]]);
    let src: [u8; 16] = array_at(payload, 8);
    let address = match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(src)),
    };
    let ifindex = u32_at(40);
    let uid = u32_at(64);
    let inode = u32_at(68);
    let mut v6only = None;
    let mut cgroup_id = None;
    let (mut freebind, mut transparent) = (None, None);
    let mut attrs = &payload[INET_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return Err(DumpError::Decode("bad inet_diag attribute length".into()));
        }
        let v = &attrs[4..len];
        match kind {
            INET_DIAG_SKV6ONLY if !v.is_empty() => v6only = Some(v[0] != 0),
            INET_DIAG_CGROUP_ID if v.len() == 8 => {
                cgroup_id = Some(u64::from_ne_bytes(array_at(v, 0)));
            }
            INET_DIAG_SOCKOPT if !v.is_empty() => {
                freebind = Some(v[0] & 0x04 != 0);
                transparent = Some(v[0] & 0x20 != 0);
            }
            _ => {}
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    Ok(RawSocket {
        protocol,
        family,
        address,
        port,
        v6only: if family == Family::Ipv6 { v6only } else { None },
        ifindex,
        freebind,
        transparent,
        uid,
        inode: u64::from(inode),
        cgroup_id,
    })
}

/// Decodes one inet_diag answer with `netlink-packet-sock-diag` (the reference decoder the
/// fast one is tested against).
pub fn decode_socket(payload: &[u8], protocol: Protocol) -> Result<RawSocket, DumpError> {
    let resp = InetResponse::parse(payload).map_err(|e| DumpError::Decode(e.to_string()))?;
    let h = &resp.header;
    let family = match h.family {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        other => {
            return Err(DumpError::Decode(format!(
                "unexpected address family {other}"
            )));
        }
    };
    let mut v6only = None;
    let mut cgroup_id = None;
    let (mut freebind, mut transparent) = (None, None);
    let mut value = [0u8; 16];
    for nla in &resp.nlas {
        match nla {
            Nla::SkV6Only(v) => v6only = Some(*v),
            Nla::Other(attr) => {
                use netlink_packet_core::Nla as _;
                let len = attr.value_len();
                if len > value.len() {
                    continue;
                }
                attr.emit_value(&mut value[..len]);
                match attr.kind() {
                    INET_DIAG_CGROUP_ID if len == 8 => {
                        cgroup_id = Some(u64::from_ne_bytes(array_at(&value, 0)));
                    }
                    INET_DIAG_SOCKOPT if len >= 1 => {
                        freebind = Some(value[0] & 0x04 != 0);
                        transparent = Some(value[0] & 0x20 != 0);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let address = match (family, h.socket_id.source_address) {
        (Family::Ipv4, IpAddr::V4(a)) => IpAddr::V4(a),
        (Family::Ipv6, IpAddr::V6(a)) => IpAddr::V6(a),
        _ => return Err(DumpError::Decode("address does not match family".into())),
    };
    Ok(RawSocket {
        protocol,
        family,
        address,
        port: h.socket_id.source_port,
        v6only: if family == Family::Ipv6 { v6only } else { None },
        ifindex: h.socket_id.interface_id,
        freebind,
        transparent,
        uid: h.uid,
        inode: u64::from(h.inode),
        cgroup_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw answers of a real dump of this namespace, decoded both ways, must agree.
    #[test]
    fn fast_decoder_matches_the_crate() {
        let listener = std::net::TcpListener::bind("[::]:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut nl = Netlink::sock_diag().unwrap();
        let mut seen = 0;
        for (protocol, family) in [
            (Protocol::Tcp, Family::Ipv4),
            (Protocol::Tcp, Family::Ipv6),
            (Protocol::Udp, Family::Ipv4),
            (Protocol::Udp, Family::Ipv6),
        ] {
            let (af, socket_id) = match family {
                Family::Ipv4 => (AF_INET, SocketId::new_v4()),
                Family::Ipv6 => (AF_INET6, SocketId::new_v6()),
            };
            let (proto, states) = match protocol {
                Protocol::Tcp => (IPPROTO_TCP, STATE_LISTEN),
                Protocol::Udp => (IPPROTO_UDP, STATE_CLOSE),
            };
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut msg = NetlinkMessage::new(
                header,
                SockDiagMessage::InetRequest(InetRequest {
                    family: af,
                    protocol: proto,
                    extensions: ExtensionFlags::empty(),
                    states: StateFlags::from_bits_retain(states),
                    socket_id,
                })
                .into(),
            );
            msg.finalize();
            let mut request = vec![0; msg.buffer_len()];
            msg.serialize(&mut request);
            nl.dump(&mut request, |_, payload| {
                let fast = decode_inet_diag(payload, protocol)?;
                let reference = decode_socket(payload, protocol)?;
                assert_eq!(fast, reference);
                seen += 1;
                Ok(())
            })
            .unwrap();
        }
        assert!(seen >= 2, "the test's own sockets were dumped");
        drop((listener, udp));
    }

    #[test]
    fn short_or_broken_answers_are_errors() {
        assert!(decode_inet_diag(&[0u8; 10], Protocol::Tcp).is_err());
        let mut msg = vec![0u8; INET_DIAG_MSG_LEN + 4];
        msg[0] = AF_INET;
        msg[INET_DIAG_MSG_LEN] = 200; // attribute longer than the message
        assert!(decode_inet_diag(&msg, Protocol::Tcp).is_err());
        msg[0] = 99;
        assert!(decode_inet_diag(&msg, Protocol::Tcp).is_err());
    }

    #[test]
    fn done_codes() {
        assert!(done_code(0).is_ok());
        assert!(matches!(
            done_code(-libc::ENOENT),
            Err(DumpError::Unsupported)
        ));
        assert!(matches!(
            done_code(-libc::EAFNOSUPPORT),
            Err(DumpError::Unsupported)
        ));
        assert!(matches!(done_code(-libc::EPERM), Err(DumpError::Io(_))));
    }
}
