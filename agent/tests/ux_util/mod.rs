//! What the `ux_*` tests share: certificates from fresh CAs (rcgen), written as an
//! operator would have them (keys 0600), a real mutual-TLS gRPC server to connect to, and
//! the real agent's `run` with its log in a file.

#![allow(dead_code)] // each test binary uses a different part
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use listenscope_proto::v1;
use listenscope_proto::v1::inventory_server::{Inventory, InventoryServer};
use listenscope_testkit::{Proc, wait_for};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// Generous: the machine is shared and slow.
pub const WAIT: Duration = Duration::from_secs(60);

/// A certificate authority.
pub struct Ca {
    pub pem: String,
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, params, key }
    }

    /// (certificate, key) PEM for `names` (the first is the CN).
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    pub fn server(&self, names: &[&str]) -> (String, String) {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    pub fn client(&self, host: &str) -> (String, String) {
        self.leaf(&[host], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// An agent's three files in `dir`: `ca.pem` (trusted for the collector), `HOST.pem`,
/// `HOST.key` (mode 0600, as `certs issue` writes it).
#[derive(Debug, Clone)]
pub struct AgentFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl AgentFiles {
    pub fn write(dir: &Path, trusted: &Ca, signer: &Ca, host: &str) -> AgentFiles {
        let (cert, key) = signer.client(host);
        let files = AgentFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{host}.pem")),
            key: dir.join(format!("{host}.key")),
        };
        std::fs::write(&files.ca, &trusted.pem).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        write_key(&files.key, &key);
        files
    }

    pub fn args(&self) -> Vec<String> {
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        vec![
            "--tls-ca".into(),
            s(&self.ca),
            "--tls-cert".into(),
            s(&self.cert),
            "--tls-key".into(),
            s(&self.key),
        ]
    }
}

/// Writes a private key with mode 0600.
pub fn write_key(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A gRPC service that answers every session with UNAVAILABLE: the tests here are about
/// what happens before it is reached.
#[derive(Debug, Clone)]
struct Nothing;

#[tonic::async_trait]
impl Inventory for Nothing {
    type SessionStream = ReceiverStream<Result<v1::CollectorMessage, Status>>;

    async fn session(
        &self,
        _request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unavailable("test server"))
    }
}

/// A real mutual-TLS gRPC server (tonic, rustls) on 127.0.0.1: `cert`/`key` as its
/// identity, client certificates required from `client_ca`. Stops when dropped.
pub struct TlsServer {
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl TlsServer {
    pub fn start(cert_key: &(String, String), client_ca: &Ca) -> TlsServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&cert_key.0, &cert_key.1))
            .client_ca_root(Certificate::from_pem(&client_ca.pem));
        let server = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(InventoryServer::new(Nothing))
            .serve_with_incoming(TcpListenerStream::new(listener));
        rt.spawn(server);
        TlsServer { addr, _rt: rt }
    }
}

/// The real `listenscope-agent`.
pub fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_listenscope-agent"))
}

/// `listenscope-agent run` with `args`, scanning only its own namespace, retrying fast,
/// logging at info to `log`.
pub fn start_run(args: &[String], log: &Path) -> Proc {
    start_run_with(agent(), args, log)
}

/// [`start_run`] with a prepared command (e.g. `nsenter … listenscope-agent`).
pub fn start_run_with(mut cmd: Command, args: &[String], log: &Path) -> Proc {
    Proc(
        cmd.arg("run")
            .args(args)
            .args(["--netns", "current", "--reconnect-max", "200ms"])
            .env("LISTENSCOPE_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The first log line holding `needle`, once there is one; panics if the agent exits.
pub fn log_line(agent: &mut Proc, log: &Path, needle: &str) -> String {
    wait_for(WAIT, &format!("{needle:?} in the agent's log"), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return Ok(line.to_string());
        }
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status}):\n{text}");
        }
        Err(text)
    })
}
