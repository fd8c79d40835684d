//! One mutual-TLS session with one collector: Hello/Welcome, then send what the outbox
//! holds (within a window of unacknowledged messages) and apply Acks and Resyncs until
//! the stream ends. Which collector, and when, is the connection loop's choice (`mod.rs`).

use std::time::Duration;

use listenscope_core::limits::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use listenscope_core::pem::{self as tls, TlsFileError};
use listenscope_core::record::{ListenerKey, ListenerRecord};
use listenscope_core::wire;
use listenscope_proto::v1;
use listenscope_proto::v1::inventory_client::InventoryClient;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::Shared;
use super::cause::{self, CONNECT_TIMEOUT, ConnectError};
use super::outbox::Pending;
use crate::config::{RunConfig, url_host};

/// Snapshot chunks are cut before they reach this size (see the constant's documentation).
const CHUNK_BYTES: usize = listenscope_core::limits::MESSAGE_TARGET_BYTES;
/// Room left in a chunk for its other fields (sequence, index, time, flags).
const CHUNK_ENVELOPE: usize = 64;
/// Listeners per chunk when the collector does not say.
const DEFAULT_PER_MESSAGE: usize = 1000;
/// Outbox messages sent ahead of acknowledgements.
const WINDOW: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    TlsFile(#[from] TlsFileError),
    /// Connecting failed, or the collector's TLS refused us on the first call.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the collector refused the session ({}): {}", code_name(.0), .0.message())]
    Refused(tonic::Status),
    #[error("the session broke ({}): {}", code_name(.0), status_text(.0))]
    Broken(tonic::Status),
    #[error("protocol violation by the collector: {0}")]
    Protocol(String),
    #[error("the collector closed the session")]
    Closed,
}

fn code_name(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

/// A status's message, or what lies under it when the message is only tonic's summary.
fn status_text(s: &tonic::Status) -> String {
    match std::error::Error::source(s) {
        Some(source) => cause::chain_text(source),
        None => s.message().to_string(),
    }
}

/// The file problems that stop `run` at start-up, and a later reconnect (logged and
/// retried: certificates may be in the middle of a rotation).
pub fn check_files(cfg: &RunConfig) -> Result<(), TlsFileError> {
    tls::load_certs(&cfg.tls_ca)?;
    tls::load_identity(&cfg.tls_cert, &cfg.tls_key)?;
    Ok(())
}

/// What the failure of `url` is explained with.
fn context(cfg: &RunConfig, url: &str) -> cause::Context {
    let host = url_host(url).unwrap_or_default();
    let addr = url
        .strip_prefix("https://")
        .and_then(|r| r.split('/').next())
        .unwrap_or(url)
        .to_string();
    cause::Context {
        addr,
        server_name: cfg.server_name.clone().unwrap_or(host),
        ca: cfg.tls_ca.clone(),
        cert: cfg.tls_cert.clone(),
    }
}

async fn connect(cfg: &RunConfig, url: &str, cx: &cause::Context) -> Result<Channel, SessionError> {
    // Read and check the files on every attempt: rotated certificates are picked up, and
    // an expired or mismatched one is reported by name instead of as a handshake failure.
    check_files(cfg)?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| TlsFileError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let ca = read(&cfg.tls_ca)?;
    let cert = read(&cfg.tls_cert)?;
    let key = read(&cfg.tls_key)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(cx.server_name.clone());
    let classify = |e: tonic::transport::Error| SessionError::Connect(cause::classify(&e, cx));
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(classify)?
        .tls_config(tls)
        .map_err(classify)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let uri = endpoint.uri();
    let port = uri.port_u16().unwrap_or(443);
    cause::resolve(uri.host().unwrap_or_default(), port).await?;
    // tonic's connect timeout covers the TCP connect only: a server that accepts and then
    // says nothing would hold the agent forever in the TLS handshake.
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(connected) => connected.map_err(classify),
        Err(_) => Err(SessionError::Connect(ConnectError::Timeout {
            addr: cx.addr.clone(),
            stage: "TCP connect and TLS handshake",
            timeout: CONNECT_TIMEOUT,
        })),
    }
}

/// A failed first call: the collector's TLS refusing our certificate (TLS 1.3 reports it
/// here, not at connect) is named as such; the collector's own answer is kept as it is.
fn refused(status: tonic::Status, cx: &cause::Context) -> SessionError {
    match cause::classify_status(&status, cx) {
        Some(cause) => SessionError::Connect(cause),
        None => SessionError::Refused(status),
    }
}

/// How one session ended.
#[derive(Debug)]
pub struct Outcome {
    /// How long it was up after the collector's Welcome; None if it was never welcomed.
    pub up: Option<Duration>,
    pub result: Result<(), SessionError>,
}

impl Outcome {
    /// The collector refused the session because another live agent, with another
    /// instance id, holds this certificate's session (`ALREADY_EXISTS`).
    pub fn duplicate(&self) -> bool {
        matches!(&self.result, Err(SessionError::Refused(s) | SessionError::Broken(s))
            if s.code() == tonic::Code::AlreadyExists)
    }
}

/// Runs one session with the collector at `url`.
pub async fn run(cfg: &RunConfig, url: &str, shared: &Shared) -> Outcome {
    let mut welcomed = None;
    let result = session(cfg, url, shared, &mut welcomed).await;
    let outcome = Outcome {
        up: welcomed.map(|at: std::time::Instant| at.elapsed()),
        result,
    };
    if outcome.duplicate() {
        // The connection loop says it (rate-limited, with the fix).
        return outcome;
    }
    match &outcome.result {
        Ok(()) => tracing::info!(collector = %url, "Session ended."),
        Err(SessionError::Broken(status) | SessionError::Refused(status))
            if status.code() == tonic::Code::InvalidArgument =>
        {
            // Resending the same refused message would loop forever: start over from a
            // snapshot of the current state. The refused changes' history is lost.
            tracing::error!(
                collector = %url,
                reason = %status.message(),
                "The collector refused a message as invalid; starting over with a fresh snapshot."
            );
            shared.outbox().restart_from_snapshot();
        }
        Err(e) => tracing::warn!(collector = %url, error = %e, "Session failed."),
    }
    outcome
}

async fn session(
    cfg: &RunConfig,
    url: &str,
    shared: &Shared,
    welcomed: &mut Option<std::time::Instant>,
) -> Result<(), SessionError> {
    let cx = context(cfg, url);
    let channel = connect(cfg, url, &cx).await?;
    let mut client = InventoryClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(16);
    let hello = {
        let o = shared.outbox();
        v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            os_hostname: crate::os::procfs::hostname(),
            session_id: o.session_id.to_vec(),
            acked_sequence: o.acked(),
            instance_id: shared.instance_id.map_or_else(Vec::new, |id| id.to_vec()),
            watch: Some((&shared.watch()).into()),
        }
    };
    let _ = tx.send(body(v1::agent_message::Body::Hello(hello))).await;
    // With TLS 1.3 a refused client certificate surfaces here, on the first call.
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| refused(s, &cx))?
        .into_inner();
    let welcome = match inbound.message().await.map_err(|s| refused(s, &cx))? {
        Some(v1::CollectorMessage {
            body: Some(v1::collector_message::Body::Welcome(w)),
        }) => w,
        Some(other) => {
            return Err(SessionError::Protocol(format!(
                "expected Welcome, got {other:?}"
            )));
        }
        None => return Err(SessionError::Closed),
    };
    *welcomed = Some(std::time::Instant::now());
    let per_message = match welcome.max_listeners_per_message {
        0 => DEFAULT_PER_MESSAGE,
        n => (n as usize).min(DEFAULT_PER_MESSAGE),
    };
    let mut sent_upto = {
        let mut o = shared.outbox();
        if o.on_welcome(welcome.resume_after) {
            tracing::info!("Collector needs a snapshot; sending the current inventory.");
        }
        o.acked()
    };
    tracing::info!(
        collector = %url,
        collector_version = %welcome.collector_version,
        resume_after = ?welcome.resume_after,
        "Connected to collector."
    );

    loop {
        // What the window allows, cloned out of the lock (snapshots share their state).
        let batch: Vec<Pending> = {
            let o = shared.outbox();
            o.sendable(sent_upto, WINDOW).cloned().collect()
        };
        for p in batch {
            sent_upto = p.seq();
            tracing::trace!(seq = sent_upto, "Sending.");
            for m in encode(&p, per_message) {
                tx.send(m).await.map_err(|_| SessionError::Closed)?;
            }
        }
        let beat = shared
            .heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(at) = beat {
            // The mode as it is when sent: a change since the beat was queued is told now.
            let hb = v1::Heartbeat {
                observed_at: Some(wire::timestamp(at)),
                watch: Some((&shared.watch()).into()),
            };
            tx.send(body(v1::agent_message::Body::Heartbeat(hb)))
                .await
                .map_err(|_| SessionError::Closed)?;
        }
        tokio::select! {
            msg = inbound.message() => {
                match msg.map_err(SessionError::Broken)?.and_then(|m| m.body) {
                    Some(v1::collector_message::Body::Ack(a)) => shared.outbox().on_ack(a.sequence),
                    Some(v1::collector_message::Body::Resync(r)) => {
                        tracing::warn!(collector = %url, reason = %r.reason, "Collector asked for a resync; sending a snapshot.");
                        let mut o = shared.outbox();
                        o.restart_from_snapshot();
                        sent_upto = o.acked();
                    }
                    Some(v1::collector_message::Body::Welcome(_)) => {
                        return Err(SessionError::Protocol("second Welcome".into()));
                    }
                    None => return Err(SessionError::Closed),
                }
            }
            () = shared.wake.notified() => {}
        }
    }
}

fn body(b: v1::agent_message::Body) -> v1::AgentMessage {
    v1::AgentMessage { body: Some(b) }
}

/// One outbox entry as wire messages: a delta is one message, a snapshot as many chunks as
/// its size needs (by count and by encoded bytes). Chunks are built one at a time as the
/// sender takes them, so a snapshot is never held whole in wire form: at 10,000 listeners
/// that copy was about 8 MiB (464-byte `v1::Listener`s and their strings), resident in
/// the heap after the first session began. Only the channel's few chunks exist at once.
fn encode(p: &Pending, per_message: usize) -> Encoded<'_> {
    match p {
        Pending::Delta { seq, at, changes } => {
            Encoded::Delta(Some(body(v1::agent_message::Body::Delta(v1::Delta {
                sequence: *seq,
                observed_at: Some(wire::timestamp(*at)),
                opened: changes.opened.iter().map(Into::into).collect(),
                closed: changes.closed.iter().map(Into::into).collect(),
                changed: changes.changed.iter().map(Into::into).collect(),
            }))))
        }
        Pending::Snapshot { seq, at, state } => Encoded::Snapshot(Box::new(Chunks {
            seq: *seq,
            at: *at,
            per_message,
            records: state.values(),
            carried: None,
            index: 0,
            done: false,
        })),
    }
}

/// The messages of one outbox entry, made on demand ([`encode`]). The chunker is boxed:
/// it carries a listener (464 bytes) and lives in the session's future across awaits.
enum Encoded<'a> {
    Delta(Option<v1::AgentMessage>),
    Snapshot(Box<Chunks<'a>>),
}

impl Iterator for Encoded<'_> {
    type Item = v1::AgentMessage;

    fn next(&mut self) -> Option<v1::AgentMessage> {
        match self {
            Encoded::Delta(m) => m.take(),
            Encoded::Snapshot(c) => c.next(),
        }
    }
}

/// A snapshot's chunks, each cut before `per_message` listeners or [`CHUNK_BYTES`].
struct Chunks<'a> {
    seq: u64,
    at: time::OffsetDateTime,
    per_message: usize,
    records: std::collections::btree_map::Values<'a, ListenerKey, ListenerRecord>,
    /// The listener that did not fit the previous chunk, with its encoded size.
    carried: Option<(v1::Listener, usize)>,
    index: u32,
    /// The last chunk went out (an empty snapshot still sends one, empty and last).
    done: bool,
}

impl Iterator for Chunks<'_> {
    type Item = v1::AgentMessage;

    fn next(&mut self) -> Option<v1::AgentMessage> {
        if self.done {
            return None;
        }
        let mut listeners = Vec::new();
        let mut bytes = 0;
        loop {
            let next = self.carried.take().or_else(|| {
                self.records.next().map(|r| {
                    let l = v1::Listener::from(r);
                    // As encoded inside the chunk: field tag, length, listener.
                    let len = l.encoded_len();
                    let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
                    (l, size)
                })
            });
            let Some((l, size)) = next else {
                self.done = true;
                break;
            };
            if !listeners.is_empty()
                && (listeners.len() >= self.per_message
                    || bytes + size > CHUNK_BYTES - CHUNK_ENVELOPE)
            {
                self.carried = Some((l, size));
                break;
            }
            bytes += size;
            listeners.push(l);
        }
        let chunk = v1::SnapshotChunk {
            sequence: self.seq,
            chunk_index: self.index,
            last: self.done,
            observed_at: Some(wire::timestamp(self.at)),
            listeners,
        };
        self.index += 1;
        Some(body(v1::agent_message::Body::Snapshot(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::State;
    use listenscope_core::record::testkit::record;
    use std::sync::Arc;

    /// The agent speaks TLS 1.3 only (docs/protocol.md): a real server that offers TLS 1.2
    /// alone (a downgraded or outdated "collector") never completes a handshake with it.
    /// Before, the agent offered 1.2 too and the handshake succeeded.
    #[tokio::test]
    async fn the_agent_offers_tls13_only() {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        use std::os::unix::fs::PermissionsExt;

        listenscope_core::pem::install_crypto_provider();
        let dir = listenscope_testkit::TempDir::new("tls13");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), &ca_key).unwrap();
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
            p.extended_key_usages = vec![usage];
            (p.signed_by(&key, &issuer).unwrap(), key)
        };
        let (server_cert, server_key) = leaf("collector.test", ExtendedKeyUsagePurpose::ServerAuth);
        let (agent_cert, agent_key) = leaf("h1", ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("h1.pem"), agent_cert.pem()).unwrap();
        std::fs::write(dir.join("h1.key"), agent_key.serialize_pem()).unwrap();
        std::fs::set_permissions(dir.join("h1.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();

        // A real TLS server on a real socket, TLS 1.2 only, ALPN h2: everything an agent
        // offering 1.2 would accept.
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
        )
        .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handshake = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut conn = rustls::ServerConnection::new(Arc::new(server)).unwrap();
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut tcp) {
                    return Err(e.to_string());
                }
            }
            Ok(conn.protocol_version())
        });

        let cfg = RunConfig {
            collectors: vec![format!("https://{addr}")],
            tls_ca: dir.join("ca.pem"),
            tls_cert: dir.join("h1.pem"),
            tls_key: dir.join("h1.key"),
            interval: Duration::from_secs(10),
            watch: crate::config::WatchSetting::Interval,
            bind_events: true,
            netns: crate::scan::NetnsSelector::Current,
            max_pending_changes: 1,
            reconnect_max: Duration::from_secs(1),
            server_name: Some("collector.test".into()),
        };
        let url = format!("https://{addr}");
        let cx = context(&cfg, &url);
        let connected = connect(&cfg, &url, &cx).await;
        let server_saw = handshake.join().unwrap();
        assert!(
            server_saw.is_err(),
            "the agent completed a handshake with a TLS 1.2-only server: {server_saw:?}"
        );
        let err = server_saw.unwrap_err();
        assert!(err.contains("Tls12NotOffered"), "{err}");
        assert!(connected.is_err(), "the agent connected over TLS 1.2");
    }

    #[test]
    fn snapshots_are_chunked_and_empty_ones_still_sent() {
        let state: State = (1..=2500u16)
            .map(|p| {
                let r = record("host", "::", p, Some(false));
                (r.key.clone(), r)
            })
            .collect();
        let at = time::OffsetDateTime::now_utc();
        let pending = Pending::Snapshot {
            seq: 7,
            at,
            state: Arc::new(state),
        };
        let msgs: Vec<_> = encode(&pending, 1000).collect();
        let chunks: Vec<(u32, bool, usize, usize)> = msgs
            .iter()
            .map(|m| match &m.body {
                Some(v1::agent_message::Body::Snapshot(c)) => {
                    assert_eq!(c.sequence, 7);
                    (c.chunk_index, c.last, c.listeners.len(), m.encoded_len())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        // Every listener once, in chunks numbered in order, the last one marked; each chunk
        // under the message target (so the collector's buffers never grow) and full up to
        // it (no chunk could have taken the next listener).
        assert_eq!(chunks.iter().map(|c| c.2).sum::<usize>(), 2500);
        let one = v1::Listener::from(&record("host", "::", 1, Some(false))).encoded_len();
        for (i, &(index, last, n, bytes)) in chunks.iter().enumerate() {
            assert_eq!((index as usize, last), (i, i + 1 == chunks.len()));
            assert!(
                n <= 1000 && bytes <= CHUNK_BYTES,
                "chunk {i}: {n}, {bytes} bytes"
            );
            if !last {
                assert!(
                    bytes + one + 3 > CHUNK_BYTES - CHUNK_ENVELOPE,
                    "chunk {i} stopped early: {bytes}"
                );
            }
        }
        // The collector's per-message limit applies as well.
        let pending = Pending::Snapshot {
            seq: 8,
            at,
            state: Arc::new(
                (1..=25u16)
                    .map(|p| {
                        let r = record("host", "::", p, Some(false));
                        (r.key.clone(), r)
                    })
                    .collect(),
            ),
        };
        let small: Vec<_> = encode(&pending, 10).collect();
        let sizes: Vec<usize> = small
            .iter()
            .map(|m| match &m.body {
                Some(v1::agent_message::Body::Snapshot(c)) => c.listeners.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, [10, 10, 5]);
        for m in &msgs {
            assert!(m.encoded_len() < MAX_MESSAGE_BYTES);
        }
        // A host with no listeners still sends one (empty, last) chunk: it closes the rest.
        let pending = Pending::Snapshot {
            seq: 1,
            at,
            state: Arc::new(State::new()),
        };
        let empty: Vec<_> = encode(&pending, 1000).collect();
        assert_eq!(empty.len(), 1);
        assert!(matches!(&empty[0].body,
            Some(v1::agent_message::Body::Snapshot(c)) if c.last && c.listeners.is_empty()));
    }
}
