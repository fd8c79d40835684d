//! Test harness for the collector: a private CA in a temp directory, collectors in process
//! or as real processes, raw protocol clients with any certificate, agents as real
//! processes inside their own network namespaces, and read-only queries.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod pg;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use listenscope_collector::ingest::Limits;
use listenscope_collector::query::{Param, ReadOnly, ResultSet};
use listenscope_collector::store::{DbUrl, Store, StoreOptions};
use listenscope_collector::{pki, server, tls};
use listenscope_proto::v1;
use listenscope_proto::v1::inventory_client::InventoryClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn require_root() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("these tests build network namespaces and need root: run `scripts/test` as root");
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("lst-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Name the collector's certificate carries; clients connect with it as SNI.
pub const SERVER_NAME: &str = "collector.test";

/// A CA with the collector certificate and agent certificates for `hosts`.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new(hosts: &[&str]) -> Pki {
        listenscope_core::pem::install_crypto_provider();
        let dir = TempDir::new("pki");
        pki::init(
            dir.path(),
            &[SERVER_NAME.to_string(), "127.0.0.1".into()],
            30,
            false,
        )
        .unwrap();
        for h in hosts {
            pki::issue(dir.path(), h, 30).unwrap();
        }
        Pki { dir }
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
    pub fn server_tls(&self) -> std::sync::Arc<rustls::ServerConfig> {
        tls::server_config(
            &self.path("ca.pem"),
            &self.path("server.pem"),
            &self.path("server.key"),
        )
        .unwrap()
    }
}

/// A collector running in this process on 127.0.0.1 (real TLS, real socket).
pub struct InProcess {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), server::ServeError>>,
}

impl InProcess {
    pub async fn start(pki: &Pki, db: &DbUrl) -> InProcess {
        InProcess::start_with(pki, db, Limits::default()).await
    }

    pub async fn start_with(pki: &Pki, db: &DbUrl, limits: Limits) -> InProcess {
        let store = Store::open(db, &StoreOptions::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(
            listener,
            pki.server_tls(),
            store,
            limits,
            stop.clone().cancelled_owned(),
        ));
        InProcess { addr, stop, task }
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A TLS channel to `addr` with the given client identity files (None: no client cert).
pub async fn channel(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A hand-driven protocol session: send any message, read what comes back.
pub struct RawSession {
    pub tx: mpsc::Sender<v1::AgentMessage>,
    pub rx: tonic::Streaming<v1::CollectorMessage>,
}

impl RawSession {
    /// Opens the stream and sends `first` (normally a Hello).
    pub async fn open(
        channel: Channel,
        first: v1::AgentMessage,
    ) -> Result<RawSession, tonic::Status> {
        let mut client = InventoryClient::new(channel)
            .max_encoding_message_size(64 * 1024 * 1024)
            .max_decoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
        Ok(RawSession { tx, rx })
    }

    pub async fn send(&self, m: v1::AgentMessage) {
        self.tx.send(m).await.unwrap();
    }

    /// The next message, or the stream's final status as Err; None at a clean end.
    pub async fn recv(&mut self) -> Result<Option<v1::collector_message::Body>, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
            Ok(r) => r.map(|m| m.and_then(|m| m.body)),
            Err(_) => panic!("no answer from the collector within 10s"),
        }
    }
}

/// A session as `host` (its certificate from `pki`), opened with `first`.
pub async fn session_as(
    pki: &Pki,
    addr: SocketAddr,
    host: &str,
    first: v1::AgentMessage,
) -> RawSession {
    try_session_as(pki, addr, host, first).await.unwrap()
}

/// [`session_as`] for tests where the collector may refuse: connection and open errors
/// come back as a status.
pub async fn try_session_as(
    pki: &Pki,
    addr: SocketAddr,
    host: &str,
    first: v1::AgentMessage,
) -> Result<RawSession, tonic::Status> {
    let ch = channel(
        addr,
        &pki.path("ca.pem"),
        Some((
            &pki.path(&format!("{host}.pem")),
            &pki.path(&format!("{host}.key")),
        )),
    )
    .await
    .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    RawSession::open(ch, first).await
}

pub fn msg(b: v1::agent_message::Body) -> v1::AgentMessage {
    v1::AgentMessage { body: Some(b) }
}

pub fn hello(session: u8, acked: u64, os_hostname: &str) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Hello(v1::Hello {
        protocol_version: 1,
        agent_version: "test".into(),
        os_hostname: os_hostname.into(),
        session_id: vec![session; 16],
        acked_sequence: acked,
    }))
}

pub fn now_ts() -> prost_types::Timestamp {
    listenscope_core::wire::timestamp(time::OffsetDateTime::now_utc())
}

/// A valid wire listener: TCP `::`:port dual-stack (the trap).
pub fn listener(netns: &str, port: u32) -> v1::Listener {
    v1::Listener {
        key: Some(v1::ListenerKey {
            netns: netns.into(),
            protocol: v1::Protocol::Tcp as i32,
            family: v1::Family::Ipv6 as i32,
            address: vec![0; 16],
            port,
            interface: String::new(),
            v6only: Some(false),
        }),
        netns_inode: 4026531833,
        reach_ipv4: v1::Reach::Any as i32,
        reach_ipv6: v1::Reach::Any as i32,
        latent: false,
        shown_as: format!(":::{port}"),
        netstat_proto: "tcp6".into(),
        trap: true,
        hidden_ipv4_exposure: true,
        processes: vec![v1::Process {
            pid: 42,
            comm: "apache2".into(),
            cmdline: "/usr/sbin/apache2 -k start".into(),
            user: "root".into(),
        }],
        container: None,
        unit: "apache2.service".into(),
        cgroup: "/system.slice/apache2.service".into(),
        uid: 0,
        freebind: Some(false),
        transparent: Some(false),
        source: v1::Source::SockDiag as i32,
        sockets: 1,
    }
}

pub fn snapshot(seq: u64, listeners: Vec<v1::Listener>) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
        sequence: seq,
        chunk_index: 0,
        last: true,
        observed_at: Some(now_ts()),
        listeners,
    }))
}

pub fn delta(
    seq: u64,
    opened: Vec<v1::Listener>,
    closed: Vec<v1::ListenerKey>,
) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Delta(v1::Delta {
        sequence: seq,
        observed_at: Some(now_ts()),
        opened,
        closed,
        changed: vec![],
    }))
}

/// Read-only query helper. `?N` placeholders become `$N` on PostgreSQL.
pub async fn query(db: &DbUrl, sql: &str, params: &[Param]) -> ResultSet {
    let ro = ReadOnly::open(db).await.unwrap();
    let sql = match db {
        DbUrl::Postgres(_) => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    out.push('$');
                } else {
                    out.push(c);
                }
            }
            out
        }
        DbUrl::Sqlite(_) => sql.to_string(),
    };
    let rs = ro.run(&sql, params).await.unwrap();
    ro.close().await;
    rs
}

pub fn text(p: &str) -> Param {
    Param::Text(Some(p.to_string()))
}

/// Polls until `check` holds (or panics after `secs`).
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent binary, built by `cargo test --workspace` next to this test binary.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("listenscope-agent");
    assert!(
        bin.exists(),
        "{} is missing: run the whole suite (`cargo test --workspace`, as scripts/test does) so \
         cargo builds the agent binary",
        bin.display()
    );
    bin
}

pub fn collector_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_listenscope-collector"))
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    /// SIGTERM, then wait (graceful shutdown path).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `listenscope-collector serve` as a real process.
pub fn spawn_collector(
    pki: &Pki,
    db: &DbUrl,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    log: &Path,
) -> Proc {
    let mut cmd = Command::new(collector_bin());
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--db")
        .arg(db.as_url())
        .arg("--tls-ca")
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path("server.pem"))
        .arg("--tls-key")
        .arg(pki.path("server.key"))
        .arg("--stale-after")
        .arg("3s")
        .arg("--retain")
        .arg("90d")
        .env("LISTENSCOPE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(m) = metrics {
        cmd.arg("--metrics-listen").arg(m.to_string());
    }
    Proc(cmd.spawn().expect("spawn collector"))
}

/// A free TCP port on `ip` (bound and released; the tiny race is acceptable in tests).
pub fn free_port(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    l.local_addr().unwrap()
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    eventually(
        20,
        &format!("collector listening on {addr}"),
        || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
    )
    .await;
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace joined to the host by a veth pair: host side `10.77.N.1/24`,
/// namespace side `10.77.N.2/24`, N unique in this test process (tests run in parallel and
/// share the host's routing table). Deleted on drop.
pub struct HostNs {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
}

impl HostNs {
    pub fn new() -> HostNs {
        static SUBNET: AtomicUsize = AtomicUsize::new(1);
        require_root();
        let n = SUBNET.fetch_add(1, Ordering::SeqCst);
        assert!(n < 250, "out of test subnets");
        let c = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("lsc-{pid}-{c}");
        let host_if = format!("lc{}h{c}", pid % 100_000);
        let ns_if = format!("lc{}n{c}", pid % 100_000);
        run("ip", &["netns", "add", &name]);
        let ns = HostNs {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: format!("10.77.{n}.1"),
        };
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
            ],
        );
        run(
            "ip",
            &["addr", "add", &format!("10.77.{n}.1/24"), "dev", &host_if],
        );
        run("ip", &["link", "set", &host_if, "up"]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        run(
            "ip",
            &[
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.77.{n}.2/24"),
                "dev",
                &ns_if,
            ],
        );
        run("ip", &["-n", &name, "link", "set", &ns_if, "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens stay there).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on an open nsfs fd; this thread only.
                assert_eq!(
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                    0
                );
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// Starts `listenscope-agent run` inside this namespace as host `host`.
    pub fn spawn_agent(&self, pki: &Pki, host: &str, collector: SocketAddr, log: &Path) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(agent_bin())
            .arg("run")
            .arg("--collector")
            .arg(format!("https://{collector}"))
            .arg("--server-name")
            .arg(SERVER_NAME)
            .arg("--tls-ca")
            .arg(pki.path("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.path(&format!("{host}.pem")))
            .arg("--tls-key")
            .arg(pki.path(&format!("{host}.key")))
            .arg("--interval")
            .arg("1s")
            .arg("--reconnect-max")
            .arg("1s")
            .arg("--netns")
            .arg("current")
            .env("LISTENSCOPE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        Proc(cmd.spawn().expect("spawn agent"))
    }
}

impl Drop for HostNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A listening TCP socket opened on the calling thread.
pub fn tcp_listener(addr: &str, port: u16, v6only: Option<bool>) -> socket2::Socket {
    use socket2::{Domain, Socket, Type};
    let ip: std::net::IpAddr = addr.parse().unwrap();
    let s = Socket::new(
        if ip.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        },
        Type::STREAM,
        None,
    )
    .unwrap();
    s.set_reuse_address(true).unwrap();
    if let Some(v) = v6only {
        s.set_only_v6(v).unwrap();
    }
    s.bind(&SocketAddr::new(ip, port).into()).unwrap();
    s.listen(16).unwrap();
    s
}

pub fn udp_socket(addr: &str, port: u16, v6only: Option<bool>) -> socket2::Socket {
    use socket2::{Domain, Socket, Type};
    let ip: std::net::IpAddr = addr.parse().unwrap();
    let s = Socket::new(
        if ip.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        },
        Type::DGRAM,
        None,
    )
    .unwrap();
    if let Some(v) = v6only {
        s.set_only_v6(v).unwrap();
    }
    s.bind(&SocketAddr::new(ip, port).into()).unwrap();
    s
}
