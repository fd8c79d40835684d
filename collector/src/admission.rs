//! Admission control before authentication: what a connection may cost the collector
//! before it has proven, with a client certificate, that it is an agent, and before it
//! speaks HTTP/2.
//!
//! A TCP connection costs one open file and a task from accept until it is handed to the
//! gRPC server. Without bounds, anyone who can reach the port holds them for free (issue
//! 11: 1,000 silent connections kept legitimate agents out). So, in the accept loop and
//! without ever waiting there:
//!
//! - **Per source** ([`AdmissionLimits::per_source`]): connections not yet handed to the
//!   gRPC server (TLS handshake or HTTP/2 preface in progress) per IPv4 address or IPv6
//!   /64 (one host gets a whole /64; per address would let it use 2^64 of them). Over it,
//!   the connection is closed at once (`source_limit`).
//! - **Handshake pools**: at most [`AdmissionLimits::handshakes`] such connections in
//!   all, plus [`AdmissionLimits::reserved_handshakes`] that only *known* sources may use:
//!   addresses (same key) that completed a mutual-TLS handshake before, remembered in a
//!   bounded set ([`KnownSources`], least recently authenticated forgotten first).
//! - **Silent connections yield**: when every place a connection may use is taken, it
//!   takes the shared place of the oldest connection that has not sent a byte yet, which
//!   is reset (`displaced`). A TLS client sends its ClientHello with its first packet
//!   after the TCP handshake, so a silent connection is either hostile or about to
//!   speak; a raw silent flood (issue 11's attack) then holds no place for long, and new
//!   agents get in too. With no silent connection to displace, closed at once
//!   (`handshake_limit`).
//!
//!   Why a reserve for known sources: a flood spread over many addresses (a botnet, or
//!   one host with a /48 of IPv6) passes every per-source limit and fills any shared
//!   pool, and then nobody gets in. Sources are only *remembered* after a client
//!   certificate of our CA was verified, which an attacker without one cannot fake (TCP
//!   needs the SYN-ACK to reach the address; no spoofing), so the fleet that was
//!   connected before the flood (agents reconnecting after a collector restart or a
//!   network cut: the case that matters) still has places the flood cannot take.
//!   Displacing silent connections alone is not enough: a flood that sends a few bytes
//!   and stalls cannot be told from a slow agent until its deadline, and keeps its
//!   places. Rejected alternatives: waiting for a place (what the old loop did: the
//!   accept loop stops, the backlog fills, every agent times out); displacing any
//!   handshake, not only silent ones (an attacker reconnecting faster than a handshake
//!   completes would then displace agents mid-handshake).
//! - **Deadlines**: the TLS handshake ([`AdmissionLimits::handshake_timeout`]) and then
//!   the 24-byte HTTP/2 client preface ([`AdmissionLimits::preface_timeout`]), each for
//!   the whole exchange (a client sending a byte a second does not extend it). A
//!   connection that has the preface is handed on with the bytes replayed
//!   ([`Prefaced`]).
//!
//! Not defended here: SYN floods (the kernel's SYN cookies), bandwidth floods, and an
//! attacker sharing an address (or NAT) with agents, who shares their per-source limit.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The HTTP/2 client connection preface (RFC 9113 §3.4): the first bytes of every gRPC
/// connection.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Sources remembered as known at least ([`AdmissionLimits::known_sources`]).
pub const MIN_KNOWN_SOURCES: usize = 65_536;

/// The bounds of admission; `serve` flags and keys of the same names (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections in TLS handshake or awaiting the HTTP/2 preface per IPv4 address or
    /// IPv6 /64. Default 32.
    pub per_source: usize,
    /// Connections in TLS handshake or awaiting the preface in all (any source). Default
    /// 512.
    pub handshakes: usize,
    /// More of them, for sources that completed a mutual-TLS handshake before. Default
    /// 256.
    pub reserved_handshakes: usize,
    /// A TLS handshake must finish within this (whole handshake). Default 5 s: an agent
    /// gives up connecting after 10 s.
    pub handshake_timeout: Duration,
    /// The HTTP/2 preface must arrive within this after the handshake. Default 5 s.
    pub preface_timeout: Duration,
    /// Sources remembered as known (least recently authenticated forgotten first).
    pub known_sources: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            per_source: 32,
            handshakes: 512,
            reserved_handshakes: 256,
            handshake_timeout: Duration::from_secs(5),
            preface_timeout: Duration::from_secs(5),
            known_sources: MIN_KNOWN_SOURCES,
        }
    }
}

impl AdmissionLimits {
    /// Connections that may be in admission at once: open files to keep for them.
    pub fn most_pending(&self) -> usize {
        self.handshakes + self.reserved_handshakes
    }
}

/// The listen backlog for a session cap: a fleet reconnecting at once (a collector
/// restart) queues in the kernel, not in SYN retransmissions. At least 1024, at most
/// 65535; the kernel lowers it to `net.core.somaxconn`.
pub fn backlog_for(max_sessions: usize) -> u32 {
    max_sessions.clamp(1024, 65_535) as u32
}

/// `net.core.somaxconn`: the kernel's cap on every listen backlog (`None`: unreadable).
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Binds and listens on `addr` with `backlog` (SO_REUSEADDR, as `TcpListener::bind`).
/// Logs the backlog in force when the kernel caps it.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(backlog)?;
    match somaxconn() {
        Some(cap) if cap < backlog => tracing::info!(
            backlog,
            somaxconn = cap,
            "The kernel caps the listen backlog at net.core.somaxconn: a whole fleet \
             reconnecting at once may see SYN retries. Raise it \
             (`sysctl -w net.core.somaxconn={backlog}`, and in /etc/sysctl.d/) for a \
             large fleet."
        ),
        _ => tracing::debug!(backlog, "Listen backlog."),
    }
    Ok(listener)
}

/// What per-source limits count: an IPv4 address, or an IPv6 /64 (an IPv4-mapped IPv6
/// address is its IPv4 address: a dual-stack listener sees those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(u32),
    V6(u64),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(a) => SourceKey::V4(a.to_bits()),
            IpAddr::V6(a) => SourceKey::V6((a.to_bits() >> 64) as u64),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source has [`AdmissionLimits::per_source`] connections in admission.
    SourceLimit,
    /// Every place it may use is taken.
    HandshakeLimit,
}

/// A bounded set of sources that completed a mutual-TLS handshake: the least recently
/// authenticated is forgotten first. No expiry by time: an agent's session lasts weeks,
/// and it must still be known when it reconnects after them.
#[derive(Debug)]
pub struct KnownSources {
    capacity: usize,
    /// Each source's last authentication (a counter, not a time).
    last: HashMap<SourceKey, u64>,
    /// Authentications in order; entries whose counter is no longer `last`'s are stale.
    order: VecDeque<(SourceKey, u64)>,
    next: u64,
}

impl KnownSources {
    pub fn new(capacity: usize) -> KnownSources {
        KnownSources {
            capacity: capacity.max(1),
            last: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
        }
    }

    pub fn contains(&self, key: SourceKey) -> bool {
        self.last.contains_key(&key)
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Remembers `key` as the most recently authenticated.
    pub fn insert(&mut self, key: SourceKey) {
        self.next += 1;
        self.last.insert(key, self.next);
        self.order.push_back((key, self.next));
        while self.last.len() > self.capacity {
            let Some((old, n)) = self.order.pop_front() else {
                break;
            };
            if self.last.get(&old) == Some(&n) {
                self.last.remove(&old);
            }
        }
        // Agents reconnecting again and again leave stale entries: keep the queue within
        // twice the set (amortised O(1)).
        if self.order.len() > 2 * self.capacity + 64 {
            let last = &self.last;
            self.order.retain(|(k, n)| last.get(k) == Some(n));
        }
    }
}

/// The admission state shared by the accept loop and its connection tasks.
#[derive(Debug)]
pub struct Admission {
    pub limits: AdmissionLimits,
    /// Connections in admission per source; a source is removed at zero, so this holds
    /// at most [`AdmissionLimits::most_pending`] entries.
    pending: Mutex<HashMap<SourceKey, usize>>,
    shared: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    known: Mutex<KnownSources>,
    /// Connections holding a shared place, oldest first, that may still be silent
    /// (stale entries are skipped, and compacted past twice the places).
    silent: Mutex<VecDeque<Weak<Slot>>>,
}

/// One connection's place: whether the client has sent a byte, and the signal that a
/// newer connection took the place.
#[derive(Debug)]
struct Slot {
    place: Mutex<Option<OwnedSemaphorePermit>>,
    spoke: AtomicBool,
    displaced: CancellationToken,
}

/// A connection's place in admission, released on drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    source: SourceKey,
    slot: Arc<Slot>,
}

impl Ticket {
    /// The client sent its first bytes: it can no longer be displaced.
    pub fn spoke(&self) {
        self.slot.spoke.store(true, Ordering::Relaxed);
    }

    /// Resolves when a newer connection took this one's place (it must close).
    pub async fn displaced(&self) {
        self.slot.displaced.cancelled().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.release(self.source);
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            shared: Arc::new(Semaphore::new(limits.handshakes)),
            reserved: Arc::new(Semaphore::new(limits.reserved_handshakes)),
            known: Mutex::new(KnownSources::new(limits.known_sources)),
            pending: Mutex::new(HashMap::new()),
            silent: Mutex::new(VecDeque::new()),
            limits,
        })
    }

    /// A place for a connection from `ip`, or why not. Never waits.
    ///
    /// Order: a free shared place; for a known source, a reserved place; else the shared
    /// place of the oldest connection that has not sent a byte yet, which is displaced.
    /// A TLS client sends its ClientHello right after the TCP handshake, so only a
    /// silent connection loses its place: a flood of silent connections yields its places
    /// to whoever arrives, new agents included; a connection that spoke keeps its place
    /// until its deadline.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let source = SourceKey::of(ip);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let n = pending.get(&source).copied().unwrap_or(0);
        if n >= self.limits.per_source {
            return Err(Refused::SourceLimit);
        }
        let (place, shared) = match Arc::clone(&self.shared).try_acquire_owned() {
            Ok(p) => (p, true),
            Err(_) => match self.reserved_place(source) {
                Some(p) => (p, false),
                None => (self.displace_silent().ok_or(Refused::HandshakeLimit)?, true),
            },
        };
        pending.insert(source, n + 1);
        let slot = Arc::new(Slot {
            place: Mutex::new(Some(place)),
            spoke: AtomicBool::new(false),
            displaced: CancellationToken::new(),
        });
        if shared {
            let mut silent = self.silent.lock().unwrap_or_else(|p| p.into_inner());
            silent.push_back(Arc::downgrade(&slot));
            if silent.len() > 2 * self.limits.handshakes + 64 {
                silent.retain(|w| {
                    w.upgrade()
                        .is_some_and(|s| !s.spoke.load(Ordering::Relaxed))
                });
            }
        }
        Ok(Ticket {
            admission: Arc::clone(self),
            source,
            slot,
        })
    }

    fn reserved_place(&self, source: SourceKey) -> Option<OwnedSemaphorePermit> {
        if !self.is_known(source) {
            return None;
        }
        Arc::clone(&self.reserved).try_acquire_owned().ok()
    }

    /// Takes the shared place of the oldest connection that has not spoken, and tells
    /// it to close.
    fn displace_silent(&self) -> Option<OwnedSemaphorePermit> {
        let mut silent = self.silent.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(weak) = silent.pop_front() {
            let Some(slot) = weak.upgrade() else {
                continue;
            };
            if slot.spoke.load(Ordering::Relaxed) {
                continue;
            }
            let place = slot.place.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(place) = place {
                slot.displaced.cancel();
                return Some(place);
            }
        }
        None
    }

    /// `ip` completed a mutual-TLS handshake: remember its source as known.
    pub fn authenticated(&self, ip: IpAddr) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(SourceKey::of(ip));
    }

    pub fn is_known(&self, source: SourceKey) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(source)
    }

    fn release(&self, source: SourceKey) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pending.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&source);
            }
        }
    }
}

/// Why a connection did not send the HTTP/2 preface.
#[derive(Debug, thiserror::Error)]
pub enum PrefaceError {
    #[error("no HTTP/2 preface within {} s ({got} of 24 bytes)", secs.as_secs_f32())]
    Timeout { secs: Duration, got: usize },
    #[error("closed before the HTTP/2 preface ({got} of 24 bytes)")]
    Closed { got: usize },
    #[error("not HTTP/2: the first bytes are not the HTTP/2 client preface")]
    NotHttp2,
    #[error("reading the HTTP/2 preface: {0}")]
    Io(#[from] io::Error),
}

/// Reads the 24-byte HTTP/2 client preface within `timeout` (for the whole preface, not
/// per read), refusing at the first byte that differs.
pub async fn read_preface<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<[u8; 24], PrefaceError> {
    let mut buf = [0u8; 24];
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    while got < buf.len() {
        // Reads at most what is missing: anything after the preface stays in the stream
        // for the HTTP/2 server.
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf[got..])).await {
            Err(_) => {
                return Err(PrefaceError::Timeout { secs: timeout, got });
            }
            Ok(Ok(0)) => return Err(PrefaceError::Closed { got }),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.into()),
        };
        if buf[got..got + n] != PREFACE[got..got + n] {
            return Err(PrefaceError::NotHttp2);
        }
        got += n;
    }
    Ok(buf)
}

/// A stream whose preface was read by admission: reads give the preface first, then the
/// stream; everything else passes through.
#[derive(Debug)]
pub struct Prefaced<S> {
    inner: S,
    preface: [u8; 24],
    replayed: usize,
}

impl<S> Prefaced<S> {
    pub fn new(inner: S, preface: [u8; 24]) -> Prefaced<S> {
        Prefaced {
            inner,
            preface,
            replayed: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefaced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.preface.len() {
            let rest = &this.preface[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefaced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The gRPC server learns the peer's address and certificates from the stream inside.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Prefaced<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn source_keys() {
        let check = |a: &str, b: &str, same: bool| {
            assert_eq!(
                SourceKey::of(ip(a)) == SourceKey::of(ip(b)),
                same,
                "{a} {b}"
            );
        };
        check("192.0.2.1", "192.0.2.1", true);
        check("192.0.2.1", "192.0.2.2", false);
        check("::ffff:192.0.2.1", "192.0.2.1", true);
        check("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", true);
        check("2001:db8:1:2::1", "2001:db8:1:3::1", false);
        check("::1", "127.0.0.1", false);
    }

    #[test]
    fn per_source_and_pools() {
        let a = Admission::new(AdmissionLimits {
            per_source: 2,
            handshakes: 3,
            reserved_handshakes: 1,
            ..AdmissionLimits::default()
        });
        let one = a.admit(ip("10.0.0.1")).unwrap();
        let _two = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).unwrap_err(), Refused::SourceLimit);
        drop(one);
        let _three = a.admit(ip("10.0.0.1")).unwrap();
        // The shared places are taken (3), by connections that all spoke: unknown
        // sources are refused...
        let four = a.admit(ip("10.0.0.2")).unwrap();
        for t in [&_two, &_three, &four] {
            t.spoke();
        }
        assert_eq!(
            a.admit(ip("10.0.0.3")).unwrap_err(),
            Refused::HandshakeLimit
        );
        // ...a known one takes the reserve, and only one.
        a.authenticated(ip("10.0.0.9"));
        let five = a.admit(ip("10.0.0.9")).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.9")).unwrap_err(),
            Refused::HandshakeLimit
        );
        assert_eq!(a.pending.lock().unwrap().len(), 3);
        drop((five, four));
    }

    #[test]
    fn silent_connections_yield_their_place() {
        let a = Admission::new(AdmissionLimits {
            handshakes: 2,
            reserved_handshakes: 0,
            ..AdmissionLimits::default()
        });
        let silent = a.admit(ip("10.0.0.1")).unwrap();
        let spoke = a.admit(ip("10.0.0.2")).unwrap();
        spoke.spoke();
        // Full: the silent one is displaced (the oldest that has not spoken)...
        let newer = a.admit(ip("10.0.0.3")).unwrap();
        assert!(silent.slot.displaced.is_cancelled());
        assert!(!spoke.slot.displaced.is_cancelled());
        newer.spoke();
        // ...and once every place holder spoke, nobody is.
        assert_eq!(
            a.admit(ip("10.0.0.4")).unwrap_err(),
            Refused::HandshakeLimit
        );
        // The displaced one's place went to the newer connection: dropping it frees
        // nothing.
        drop(silent);
        assert_eq!(
            a.admit(ip("10.0.0.4")).unwrap_err(),
            Refused::HandshakeLimit
        );
        drop(spoke);
        let _last = a.admit(ip("10.0.0.4")).unwrap();
    }

    #[test]
    fn known_sources_forget_the_least_recent() {
        let k = |n: u32| SourceKey::V4(n);
        let mut s = KnownSources::new(3);
        for n in 0..3 {
            s.insert(k(n));
        }
        s.insert(k(0)); // 0 authenticated again: 1 is now the oldest
        s.insert(k(3));
        assert!(s.contains(k(0)) && !s.contains(k(1)) && s.contains(k(2)) && s.contains(k(3)));
        for _ in 0..10_000 {
            s.insert(k(2));
        }
        assert_eq!(s.len(), 3);
        assert!(s.order.len() <= 2 * 3 + 64, "{}", s.order.len());
        assert!(s.contains(k(0)) && s.contains(k(3)));
    }

    #[tokio::test]
    async fn preface_replayed_and_refused() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest")
            .await
            .unwrap();
        let mut server = server;
        let p = read_preface(&mut server, Duration::from_secs(1))
            .await
            .unwrap();
        let mut s = Prefaced::new(server, p);
        let mut all = vec![0u8; 28];
        s.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest");

        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        assert!(matches!(
            read_preface(&mut server, Duration::from_secs(1)).await,
            Err(PrefaceError::NotHttp2)
        ));
    }

    /// A byte every 200 ms never gets there: the deadline is for the whole preface.
    #[tokio::test]
    async fn preface_deadline_is_for_the_whole_preface() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let slow = tokio::spawn(async move {
            for b in PREFACE {
                if tokio::io::AsyncWriteExt::write_all(&mut client, &[*b])
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let err = read_preface(&mut server, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PrefaceError::Timeout { got, .. } if got > 0 && got < 24),
            "{err:?}"
        );
        slow.abort();
    }
}
