//! Real mutual-TLS gRPC collectors in the test process, for tests that run the real agent
//! against a collector whose behaviour they choose (`failover.rs`, `outbox_durable.rs`,
//! `duplicate_identity.rs`): a fresh CA with a server and an agent certificate, and a
//! tonic server for any `Inventory` service on a runtime of its own. Dropping that
//! runtime closes the listener and every connection at once, as a killed process would.

#![allow(dead_code)] // each test binary uses a different part
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use listenscope_proto::v1::inventory_server::{Inventory, InventoryServer};
use listenscope_testkit::TempDir;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// A CA, a server certificate for `localhost` and 127.0.0.1, and the agent's
/// certificate for host `h1`, written to `dir`.
#[derive(Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

pub fn pki(dir: &TempDir) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(DnType::CommonName, "listenscope failover test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, &ca_key);
    let leaf = |names: &[&str], usage| {
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
    };
    let (server_cert_pem, server_key_pem) = leaf(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (agent_pem, agent_key_pem) = leaf(&["h1"], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    // As `certs issue` writes it: the agent refuses a key other users can read.
    let agent_key = write("h1.key", &agent_key_pem);
    std::fs::set_permissions(
        &agent_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    Pki {
        ca: write("ca.pem", &ca_pem),
        agent_cert: write("h1.pem", &agent_pem),
        agent_key,
        ca_pem,
        server_cert_pem,
        server_key_pem,
    }
}

/// One running fake collector; `kill` (or drop) takes it away with every connection.
#[derive(Debug)]
pub struct Collector {
    pub addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl Collector {
    /// Serves `service` over mutual TLS on `addr` (port 0: any free port).
    pub fn serve<S: Inventory>(name: &str, pki: &Pki, service: S, addr: &str) -> Collector {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("collector {name} on {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &pki.server_cert_pem,
                &pki.server_key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&pki.ca_pem));
        let server = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(InventoryServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener));
        rt.spawn(server);
        Collector { addr, rt: Some(rt) }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(10));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}
