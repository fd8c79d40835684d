//! The collector's test harness: the shared kit (`listenscope-testkit`: temp dirs,
//! processes, namespaces, real sockets, bounded waits, re-exported here) plus what only the
//! collector's tests need: a private CA, collectors in process or as real processes, raw
//! protocol clients with any certificate and message builders, agents as real processes
//! inside their own network namespaces, and read-only queries. PostgreSQL: `pg`.

#![allow(dead_code)] // each test binary uses a different part of the harness
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

pub mod chunker;
pub mod faults;
pub mod model;
pub mod pg;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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

pub use listenscope_testkit::*;

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

    /// An agent certificate signed by this CA with DNS SAN and CN `name` exactly as given
    /// (clientAuth), after `edit` (validity, …), written as `file`.pem and `file`.key:
    /// the certificates `certs issue` would not write (odd names, expired ones).
    pub fn client_cert(
        &self,
        name: &str,
        file: &str,
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (PathBuf, PathBuf) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(self.path("ca.key")).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(self.path("ca.pem")).unwrap(),
            &ca_key,
        )
        .unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        edit(&mut params);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            self.path(&format!("{file}.pem")),
            self.path(&format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
    /// [`Pki::server_tls`] that also reads the CRL `certs revoke` writes here (crl.pem,
    /// absent until the first revocation), as `serve` does by default.
    pub fn server_tls_revocable(&self) -> tls::ServerTls {
        tls::server_tls(
            &self.path("ca.pem"),
            &self.path("server.pem"),
            &self.path("server.key"),
            vec![listenscope_collector::revocation::CrlFile {
                path: self.path("crl.pem"),
                required: false,
            }],
        )
        .unwrap()
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
        InProcess::start_tls(pki.server_tls(), db, limits).await
    }

    /// A collector with the given TLS (e.g. [`Pki::server_tls_revocable`]).
    pub async fn start_tls(
        tls: impl Into<tls::ServerTls>,
        db: &DbUrl,
        limits: Limits,
    ) -> InProcess {
        let store = Store::open(db, &StoreOptions::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(
            listener,
            tls.into(),
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
    hello_from(session, acked, os_hostname, None)
}

/// [`hello`] from agent installation `instance` (`None`: an agent from before instance
/// ids, which sends none).
pub fn hello_from(
    session: u8,
    acked: u64,
    os_hostname: &str,
    instance: Option<[u8; 16]>,
) -> v1::AgentMessage {
    hello_watching(session, acked, os_hostname, instance, None)
}

/// [`hello_from`] reporting the watch mode `watch` (`None`: an agent from before watch
/// modes, which sends none).
pub fn hello_watching(
    session: u8,
    acked: u64,
    os_hostname: &str,
    instance: Option<[u8; 16]>,
    watch: Option<v1::Watch>,
) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Hello(v1::Hello {
        protocol_version: 1,
        agent_version: "test".into(),
        os_hostname: os_hostname.into(),
        session_id: vec![session; 16],
        acked_sequence: acked,
        instance_id: instance.map(|i| i.to_vec()).unwrap_or_default(),
        watch,
    }))
}

/// A watch mode on the wire.
pub fn watch(kind: v1::WatchKind, interval_ms: u64, reason: &str) -> v1::Watch {
    v1::Watch {
        kind: kind as i32,
        interval_ms,
        reason: reason.into(),
    }
}

/// A heartbeat observed now, reporting `watch` (`None`: an agent from before watch modes).
pub fn heartbeat(watch: Option<v1::Watch>) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Heartbeat(v1::Heartbeat {
        observed_at: Some(now_ts()),
        watch,
    }))
}

pub fn now_ts() -> prost_types::Timestamp {
    ts(time::OffsetDateTime::now_utc())
}

/// `at` on the wire.
pub fn ts(at: time::OffsetDateTime) -> prost_types::Timestamp {
    listenscope_core::wire::timestamp(at)
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
        // As an agent from before firewall verdicts sends it: the collector stores
        // `unknown` (see `verdict` for a current agent's).
        effective_ipv4: None,
        effective_ipv6: None,
    }
}

/// A firewall verdict as a current agent sends it.
pub fn verdict(verdict: &str, reason: &str, conditions: &[&str]) -> Option<v1::FirewallVerdict> {
    Some(v1::FirewallVerdict {
        verdict: verdict.into(),
        reason: reason.into(),
        conditions: conditions.iter().map(|c| c.to_string()).collect(),
    })
}

/// A one-chunk snapshot observed now.
pub fn snapshot(seq: u64, listeners: Vec<v1::Listener>) -> v1::AgentMessage {
    snapshot_at(seq, time::OffsetDateTime::now_utc(), listeners)
}

/// A one-chunk snapshot observed at `at`.
pub fn snapshot_at(
    seq: u64,
    at: time::OffsetDateTime,
    listeners: Vec<v1::Listener>,
) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
        sequence: seq,
        chunk_index: 0,
        last: true,
        observed_at: Some(ts(at)),
        listeners,
    }))
}

/// A delta observed now.
pub fn delta(
    seq: u64,
    opened: Vec<v1::Listener>,
    closed: Vec<v1::ListenerKey>,
) -> v1::AgentMessage {
    delta_at(seq, time::OffsetDateTime::now_utc(), opened, closed)
}

/// A delta observed at `at`.
pub fn delta_at(
    seq: u64,
    at: time::OffsetDateTime,
    opened: Vec<v1::Listener>,
    closed: Vec<v1::ListenerKey>,
) -> v1::AgentMessage {
    msg(v1::agent_message::Body::Delta(v1::Delta {
        sequence: seq,
        observed_at: Some(ts(at)),
        opened,
        closed,
        changed: vec![],
    }))
}

/// The ports of `host`'s live listeners, as another connection sees them.
pub async fn live_ports(db: &DbUrl, host: &str) -> Vec<i64> {
    query(
        db,
        "SELECT port FROM current_listeners WHERE host = ?1 ORDER BY port",
        &[text(host)],
    )
    .await
    .rows
    .iter()
    .map(|r| r[0].as_i64().unwrap())
    .collect()
}

/// Keeps a test's database alive until the test ends (held only for its Drop).
pub enum DbGuard {
    Dir(TempDir),
    Pg(pg::PgServer),
}

/// A fresh SQLite database file.
pub async fn sqlite_db() -> (DbUrl, DbGuard) {
    let dir = TempDir::new("db");
    (DbUrl::Sqlite(dir.path().join("ls.db")), DbGuard::Dir(dir))
}

/// A fresh database on a throwaway PostgreSQL server.
pub async fn postgres_db() -> (DbUrl, DbGuard) {
    // On this thread: the server is tied to its starting thread (PR_SET_PDEATHSIG).
    let server = tokio::task::block_in_place(pg::PgServer::start);
    let url = server.database("listenscope").await;
    (DbUrl::Postgres(url), DbGuard::Pg(server))
}

/// Runs each `async fn name(db: &DbUrl)` of the calling file as two tests, `on_sqlite::name`
/// and `on_postgres::name`, each on a fresh database.
#[macro_export]
macro_rules! both_databases {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let (db, _guard) = $crate::util::sqlite_db().await;
                    super::$test(&db).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let (db, _guard) = $crate::util::postgres_db().await;
                    super::$test(&db).await;
                }
            )*
        }
    };
}

/// The text of a real `/metrics` endpoint (the collector's Prometheus exporter).
pub async fn metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    body
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

/// Polls until `check` holds (or panics after `secs`): [`wait_until_async`] in seconds.
pub async fn eventually<F, Fut>(secs: u64, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until_async(Duration::from_secs(secs), what, check).await;
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

/// Starts `listenscope-collector serve` as a real process.
pub fn spawn_collector(
    pki: &Pki,
    db: &DbUrl,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    log: &Path,
) -> Proc {
    spawn_collector_with(pki, db, listen, metrics, log, &[])
}

/// [`spawn_collector`] with more `serve` arguments.
pub fn spawn_collector_with(
    pki: &Pki,
    db: &DbUrl,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    log: &Path,
    more: &[&str],
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
    cmd.args(more);
    Proc(cmd.spawn().expect("spawn collector"))
}

/// A network namespace joined to the host by a veth link on a subnet of its own
/// ([`HostLink`]): host side `10.77.N.1/24` (`host_ip`), namespace side `10.77.N.2/24`.
/// Derefs to its [`Netns`] (`name`, `enter`, `exec`…). Deleted on drop.
#[derive(Debug)]
pub struct HostNs {
    /// Dropped first: the host's end of the link goes before the namespace.
    link: HostLink,
    pub host_if: String,
    pub host_ip: String,
    ns: Netns,
}

impl HostNs {
    pub fn new() -> HostNs {
        let ns = Netns::new();
        let link = HostLink::new(&ns);
        HostNs {
            host_if: link.veth.a.clone(),
            host_ip: link.host_ip.clone(),
            link,
            ns,
        }
    }

    /// Starts `listenscope-agent run` inside this namespace as host `host`, scanning every
    /// second. It logs at info, and at debug what `transport` does (each scan that queues
    /// changes says so: see [`queued_changes`]).
    pub fn spawn_agent(&self, pki: &Pki, host: &str, collector: SocketAddr, log: &Path) -> Proc {
        self.spawn_agent_to(pki, host, &[collector], log)
    }

    /// [`HostNs::spawn_agent`] with a list of collectors to fail over between.
    pub fn spawn_agent_to(
        &self,
        pki: &Pki,
        host: &str,
        collectors: &[SocketAddr],
        log: &Path,
    ) -> Proc {
        let urls: Vec<String> = collectors.iter().map(|c| format!("https://{c}")).collect();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(agent_bin())
            .arg("run")
            .arg("--collector")
            .arg(urls.join(","))
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
            .env("LISTENSCOPE_LOG", "info,listenscope_agent::transport=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        Proc(cmd.spawn().expect("spawn agent"))
    }
}

impl Default for HostNs {
    fn default() -> Self {
        HostNs::new()
    }
}

impl std::ops::Deref for HostNs {
    type Target = Netns;

    fn deref(&self) -> &Netns {
        &self.ns
    }
}

/// How many changes the agent logging to `log` has queued for the collector so far: the
/// sum of `changes=N` over its "Changes queued." lines (one per scan that found any).
pub fn queued_changes(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Changes queued."))
        .filter_map(|l| {
            l.split_once("changes=")?
                .1
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}
