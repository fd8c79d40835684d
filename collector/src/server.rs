//! `listenscope-collector serve`: the gRPC server.
//!
//! [`serve`] takes its listener, TLS configuration, store and shutdown future as
//! arguments (tests bind `127.0.0.1:0` and pass a oneshot). Shutdown is graceful: sessions
//! finish the message they are storing, tell their agents to come back later
//! (UNAVAILABLE), and the server stops once they are done.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use listenscope_proto::v1::inventory_server::{Inventory, InventoryServer};
use listenscope_proto::{FILE_DESCRIPTOR_SET, v1};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::budget::{Budget, Gated, Ledger};
use crate::ingest::{self, Limits};
use crate::revocation::{CertKey, Revocation, Revoked};
use crate::store::Store;
use crate::tls::{self, RateLimited, ServerTls};

/// HTTP/2 flow-control window of each agent stream: an agent may have this many bytes in
/// flight before the collector has read them. Kept under the 8 KiB initial size of the
/// per-connection receive buffers (HTTP/2 frames, gRPC messages), so a peer can never
/// send a frame that grows them; those buffers live as long as the connection, and at
/// 18,000 connections they are most of the collector's memory (docs/scale.md). Agents
/// send messages under 7 KiB anyway; the cost is throughput per stream on long round
/// trips (7 KiB per round trip: a 10,000-listener first snapshot takes about 45 s at
/// 50 ms), never on the fleet, whose streams run in parallel.
const STREAM_WINDOW: u32 = 7 * 1024;

/// How long shutdown waits for sessions to finish their current message.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// How long shutdown then waits for peers to close their connections after the GOAWAY.
/// `DRAIN_TIMEOUT` plus this stays under systemd's `TimeoutStopSec=30` of the unit.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `listenscope.v1.Inventory` service.
#[derive(Debug, Clone)]
pub struct InventoryService {
    store: Store,
    limits: Limits,
    sessions: TaskTracker,
    shutdown: CancellationToken,
    /// Bounds open sessions ([`Limits::max_sessions`]).
    slots: Arc<Semaphore>,
    /// The live session of each host.
    registry: Arc<Registry>,
    /// Sessions by host id with their epochs (checked against the database when
    /// collectors share it).
    held: ingest::Held,
    refusals: Arc<RateLimited>,
    /// Refused connections by reason, shared with the TLS accept loop: a certificate that
    /// names no host is refused here, at its first call.
    tls_refusals: Arc<tls::Refusals>,
    /// Places for sessions processing a message ([`Limits::in_flight`]).
    in_flight: Arc<Semaphore>,
    /// Bytes of messages in flight ([`Limits::memory_budget`]).
    budget: Budget,
}

/// How a session of a revoked certificate ends (PERMISSION_DENIED: the agent must not
/// retry with it).
const REVOKED: &str = "certificate revoked: this agent's certificate is on the collector's \
     revocation list; install a new certificate (`listenscope-collector certs issue --host \
     NAME --force`)";

/// The one live session of each host, and the rule that decides between two connections
/// of one host (docs/protocol.md, "One host, one agent"):
///
/// - A connection claims the host at its Hello ([`Claim::claim`]), when its agent's
///   instance id is known; before, it holds nothing.
/// - Same instance id, or either id empty (an agent from before instance ids): the newer
///   connection replaces the older. That is the agent reconnecting while its previous
///   connection is half-open, which it already gave up on.
/// - Different non-empty instance ids: two machines share one certificate. The newcomer
///   is refused (ALREADY_EXISTS) while the holder lives, nothing of it is stored, and the
///   refusal is counted, logged and recorded on the host. A holder that died without
///   closing (half-open) is found by the HTTP/2 keepalive (30 s + 20 s) and then the
///   other gets in. Rejected: "a holder silent for N seconds loses", which would let a
///   copy of the certificate knock the real agent off during a quiet spell (agents only
///   send heartbeats every scan interval), and keepalive already tells dead from quiet.
#[derive(Debug)]
pub struct Registry {
    by_host: Mutex<HashMap<String, Holder>>,
    next_id: AtomicU64,
    revocation: Option<Revocation>,
    /// One log line per interval for duplicate refusals (a pair of machines retries forever).
    duplicates: RateLimited,
    /// Per host: the duplicate refusals not written yet.
    duplicate_writes: Mutex<HashMap<String, Unwritten>>,
}

/// The session that holds a host.
#[derive(Debug)]
struct Holder {
    id: u64,
    instance: Option<[u8; 16]>,
    since: OffsetDateTime,
    peer: Option<SocketAddr>,
    /// Its client certificate as a CRL names it (to end it when revoked).
    cert: Option<CertKey>,
    end: CancellationToken,
    why: Arc<OnceLock<Status>>,
}

/// A host's duplicate refusals since its last write.
#[derive(Debug)]
struct Unwritten {
    /// When the last write was (`None`: never).
    written: Option<Instant>,
    count: u64,
    last_at: OffsetDateTime,
    last_peer: String,
}

/// Duplicate refusals of one host are written to the database at most this often (the
/// count is kept in between and written with the next one).
const DUPLICATE_WRITE_EVERY: Duration = Duration::from_secs(10);

/// Hosts whose duplicate refusals are tracked between writes; past it the map starts
/// over (the counts of the last interval are lost, never the refusals themselves).
const MAX_DUPLICATE_HOSTS: usize = 100_000;

impl Registry {
    fn new(revocation: Option<Revocation>) -> Registry {
        Registry {
            by_host: Mutex::default(),
            next_id: AtomicU64::new(1),
            revocation,
            duplicates: RateLimited::default(),
            duplicate_writes: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holder>> {
        self.by_host.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_revoked(&self, cert: Option<&CertKey>) -> bool {
        match (&self.revocation, cert) {
            (Some(r), Some(c)) => r.revoked().contains(c),
            _ => false,
        }
    }

    /// Ends the live sessions of the certificates in `revoked`; returns how many.
    fn end_revoked(&self, revoked: &Revoked) -> usize {
        let map = self.lock();
        let mut ended = 0;
        for (host, h) in map.iter() {
            if h.cert.as_ref().is_some_and(|c| revoked.contains(c)) && !h.end.is_cancelled() {
                let _ = h.why.set(Status::permission_denied(REVOKED));
                h.end.cancel();
                ended += 1;
                metrics::counter!(crate::metrics::REVOKED_SESSIONS).increment(1);
                tracing::warn!(
                    host = %host,
                    serial = %h.cert.as_ref().map(CertKey::serial_hex).unwrap_or_default(),
                    peer = ?h.peer,
                    "Session ended: its certificate was revoked."
                );
            }
        }
        ended
    }

    /// Removes session `id`'s hold on `host`; whether it still held it.
    fn release(&self, host: &str, id: u64) -> bool {
        let mut map = self.lock();
        let held = map.get(host).is_some_and(|h| h.id == id);
        if held {
            map.remove(host);
        }
        held
    }

    /// Writes the duplicate refusals of `host` not written yet (its holder ended: the
    /// other machine's next attempt may well succeed, and would never flush them).
    async fn flush_duplicates(&self, store: &Store, host: &str) {
        let pending = self
            .duplicate_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host);
        if let Some(p) = pending.filter(|p| p.count > 0)
            && let Err(e) = store
                .duplicate_refused(host, p.count, p.last_at, &p.last_peer)
                .await
        {
            tracing::warn!(host = %host, error = %e, "Cannot record duplicate refusals.");
        }
    }

    /// Counts, logs (rate-limited) and records (at most every
    /// [`DUPLICATE_WRITE_EVERY`] per host) a duplicate refusal.
    async fn duplicate_refused(
        &self,
        store: &Store,
        host: &str,
        peer: Option<SocketAddr>,
        detail: &str,
    ) {
        metrics::counter!(crate::metrics::REJECTED_CONNECTIONS, "reason" => tls::Refusal::DuplicateIdentity.label())
            .increment(1);
        if let Some(more) = self.duplicates.hit() {
            tracing::warn!(
                host = %host,
                peer = ?peer,
                detail,
                fix = tls::Refusal::DuplicateIdentity.fix(),
                refused_since_last_line = more,
                "Refused a second agent with the same certificate."
            );
        }
        let due = {
            let mut writes = self
                .duplicate_writes
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if writes.len() >= MAX_DUPLICATE_HOSTS && !writes.contains_key(host) {
                writes.clear();
            }
            let e = writes.entry(host.to_string()).or_insert(Unwritten {
                written: None,
                count: 0,
                last_at: OffsetDateTime::now_utc(),
                last_peer: String::new(),
            });
            e.count += 1;
            e.last_at = OffsetDateTime::now_utc();
            e.last_peer = peer.map(|p| p.ip().to_string()).unwrap_or_default();
            if e.written
                .is_none_or(|w| w.elapsed() >= DUPLICATE_WRITE_EVERY)
            {
                e.written = Some(Instant::now());
                Some((std::mem::take(&mut e.count), e.last_at, e.last_peer.clone()))
            } else {
                None
            }
        };
        if let Some((n, at, peer)) = due
            && let Err(e) = store.duplicate_refused(host, n, at, &peer).await
        {
            tracing::warn!(host = %host, error = %e, "Cannot record a duplicate refusal.");
        }
    }
}

/// A connection's right to claim its host once its Hello is read (in `ingest`).
#[derive(Debug, Clone)]
pub struct Claim {
    registry: Arc<Registry>,
    store: Store,
    host: String,
    id: u64,
    peer: Option<SocketAddr>,
    cert: Option<CertKey>,
    end: CancellationToken,
    why: Arc<OnceLock<Status>>,
}

impl Claim {
    /// Takes the host for this connection, whose agent says it is installation
    /// `instance` (see [`Registry`] for the rule), or refuses: ALREADY_EXISTS for a second
    /// machine with the same certificate, PERMISSION_DENIED for a certificate revoked
    /// since its handshake.
    pub async fn claim(&self, instance: Option<[u8; 16]>) -> Result<(), Status> {
        let refused = {
            let mut map = self.registry.lock();
            if self.registry.is_revoked(self.cert.as_ref()) {
                return Err(Status::permission_denied(REVOKED));
            }
            match map.get(&self.host) {
                Some(h)
                    if !h.end.is_cancelled()
                        && matches!((instance, h.instance), (Some(a), Some(b)) if a != b) =>
                {
                    Some(format!(
                        "another agent (instance {}) holds this host's session with the same \
                         certificate since {} UTC (from {}); this agent is instance {}: two \
                         machines share one certificate. Issue each its own \
                         (`listenscope-collector certs issue --host NAME`); a stolen copy: \
                         `certs revoke`",
                        hex(h.instance.as_ref()),
                        crate::timefmt::format(h.since),
                        h.peer
                            .map_or_else(|| "unknown".into(), |p| p.ip().to_string()),
                        hex(instance.as_ref()),
                    ))
                }
                _ => {
                    let older = map.insert(
                        self.host.clone(),
                        Holder {
                            id: self.id,
                            instance,
                            since: OffsetDateTime::now_utc(),
                            peer: self.peer,
                            cert: self.cert.clone(),
                            end: self.end.clone(),
                            why: Arc::clone(&self.why),
                        },
                    );
                    if let Some(older) = older {
                        older.end.cancel();
                    }
                    None
                }
            }
        };
        match refused {
            None => Ok(()),
            Some(detail) => {
                self.registry
                    .duplicate_refused(&self.store, &self.host, self.peer, &detail)
                    .await;
                Err(Status::already_exists(detail))
            }
        }
    }
}

impl Claim {
    /// Refuses this connection as a duplicate decided elsewhere (another collector
    /// sharing the database holds the host for another installation): counted, logged and
    /// recorded like [`Claim::claim`]'s refusals.
    pub async fn refused(&self, detail: String) -> Status {
        self.registry
            .duplicate_refused(&self.store, &self.host, self.peer, &detail)
            .await;
        Status::already_exists(detail)
    }
}

fn hex(id: Option<&[u8; 16]>) -> String {
    id.map_or_else(
        || "none".into(),
        |b| b.iter().map(|x| format!("{x:02x}")).collect(),
    )
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    type SessionStream = ReceiverStream<Result<v1::CollectorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let host = match tls::host_of(&request) {
            Ok(host) => host,
            Err(e) => {
                self.tls_refusals.refused(
                    request.remote_addr(),
                    e.refusal(),
                    &e.to_string(),
                    false,
                );
                return Err(e.into());
            }
        };
        let cert = request
            .peer_certs()
            .and_then(|c| c.first().and_then(|leaf| CertKey::of(leaf.as_ref())));
        // Verified before the CRL that revokes it was loaded: the connection outlived the
        // reload, so its new streams are refused here.
        if self.registry.is_revoked(cert.as_ref()) {
            self.tls_refusals.refused(
                request.remote_addr(),
                tls::Refusal::Revoked,
                &format!(
                    "host {host}: certificate serial {} is revoked",
                    cert.as_ref().map(CertKey::serial_hex).unwrap_or_default()
                ),
                false,
            );
            return Err(Status::permission_denied(REVOKED));
        }
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable(
                "collector shutting down; reconnect later",
            ));
        }
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            metrics::counter!(crate::metrics::REJECTED_CONNECTIONS, "reason" => "session_limit")
                .increment(1);
            if let Some(more) = self.refusals.hit() {
                tracing::warn!(
                    host = %host,
                    max_sessions = self.limits.max_sessions,
                    refused_since_last_line = more,
                    "Refused a session: the collector holds its maximum of sessions \
                     (raise --max-sessions and the open-file limit, or add a collector)."
                );
            }
            return Err(Status::resource_exhausted(format!(
                "the collector is at its limit of {} sessions; retry later",
                self.limits.max_sessions
            )));
        };
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        // Every session stream comes through the budget's gate (`serve`), which puts the
        // session's ledger into the request.
        let Some(ledger) = request.extensions().get::<Arc<Ledger>>().cloned() else {
            return Err(Status::internal("session without a memory budget ledger"));
        };
        let why = Arc::new(OnceLock::new());
        let claim = Claim {
            registry: Arc::clone(&self.registry),
            store: self.store.clone(),
            host: host.clone(),
            id,
            peer: request.remote_addr(),
            cert,
            end: replaced.clone(),
            why: Arc::clone(&why),
        };
        let inbound = request.into_inner();
        // Replies are small and sent one at a time: a short queue is enough.
        let (tx, rx) = mpsc::channel(4);
        let registry = Arc::clone(&self.registry);
        let stop = ingest::Stop {
            shutdown: self.shutdown.clone(),
            replaced,
            why,
            claim,
            held: Arc::clone(&self.held),
            in_flight: Arc::clone(&self.in_flight),
            budget: self.budget.clone(),
            ledger,
        };
        let session = ingest::run(
            host.clone(),
            self.store.clone(),
            self.limits.clone(),
            inbound,
            tx,
            stop,
        );
        let store = self.store.clone();
        self.sessions.spawn(async move {
            session.await;
            if registry.release(&host, id) {
                // Boxed: this task lives as long as the session; the write's future
                // must not add to every session's size.
                Box::pin(registry.flush_duplicates(&store, &host)).await;
            }
            drop(slot);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Ends live sessions whose certificate a reloaded CRL revokes, until `stop`.
async fn end_revoked(
    registry: Arc<Registry>,
    mut revoked: tokio::sync::watch::Receiver<Arc<Revoked>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = revoked.changed() => if changed.is_err() { return },
        }
        let now = Arc::clone(&revoked.borrow_and_update());
        registry.end_revoked(&now);
    }
}

/// How often a collector sharing its database checks that its sessions still hold their
/// hosts.
const EPOCH_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Ends the sessions whose host accepted a newer connection at another collector (the
/// epoch in the database moved on). Their writes are already refused in the database
/// (the epoch is checked in every transaction); this closes them promptly instead of at
/// their next message.
async fn watch_epochs(store: Store, held: ingest::Held, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EPOCH_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mine: Vec<(i64, i64)> = held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, (epoch, _))| (*id, *epoch))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let ids: Vec<i64> = mine.iter().map(|(id, _)| *id).collect();
        let now = match store.epochs(&ids).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot check which sessions still hold their hosts.");
                continue;
            }
        };
        let map = held.lock().unwrap_or_else(|p| p.into_inner());
        for (id, epoch) in mine {
            if now.get(&id).is_some_and(|e| *e != epoch)
                && let Some((held_epoch, token)) = map.get(&id)
                && *held_epoch == epoch
            {
                token.cancel();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}; raise --memory-budget")]
    Budget(#[from] crate::budget::BudgetTooSmall),
}

/// Serves until `shutdown` resolves, then drains sessions and returns.
///
/// `tls` is a `ServerConfig` (no revocation) or a [`ServerTls`] from `tls::server_tls`:
/// then its CRL files are watched (reloaded on change) and a reload that revokes the
/// certificate of a live session ends it.
pub async fn serve(
    listener: TcpListener,
    tls: impl Into<ServerTls>,
    store: Store,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let ServerTls {
        config: tls,
        revocation,
    } = tls.into();
    let local = listener.local_addr().ok();
    let sessions = TaskTracker::new();
    let stop_sessions = CancellationToken::new();
    let limits_in_flight = limits.in_flight.max(1);
    let budget = Budget::new(limits.memory_budget)?;
    let limits = Limits {
        per_snapshot_bytes: limits.per_snapshot_bytes.min(budget.snapshot_bytes()),
        ..limits
    };
    let service = InventoryService {
        store: store.clone(),
        slots: Arc::new(Semaphore::new(limits.max_sessions)),
        limits,
        sessions: sessions.clone(),
        shutdown: stop_sessions.clone(),
        registry: Arc::new(Registry::new(revocation.clone())),
        held: Arc::default(),
        refusals: Arc::default(),
        tls_refusals: Arc::default(),
        in_flight: Arc::new(Semaphore::new(limits_in_flight)),
        budget: budget.clone(),
    };
    if let Some(revocation) = revocation {
        if !revocation.files().is_empty() {
            tokio::spawn(revocation.clone().watch(stop_sessions.clone()));
        }
        tokio::spawn(end_revoked(
            Arc::clone(&service.registry),
            revocation.subscribe(),
            stop_sessions.clone(),
        ));
    }
    if store.shared() {
        tokio::spawn(watch_epochs(
            store.clone(),
            Arc::clone(&service.held),
            stop_sessions.clone(),
        ));
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InventoryServer<InventoryService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = ReceiverStream::new(tls::accept_loop(
        listener,
        tls,
        Arc::clone(&service.tls_refusals),
        service.limits.admission.clone(),
    ));
    let inventory = Gated::new(
        InventoryServer::new(service)
            .max_decoding_message_size(ingest::DECODE_LIMIT_BYTES)
            .max_encoding_message_size(ingest::MAX_MESSAGE_BYTES),
        budget,
    );

    let server_stop = CancellationToken::new();
    let drain = {
        let server_stop = server_stop.clone();
        let sessions = sessions.clone();
        async move {
            shutdown.await;
            tracing::info!("Shutting down: finishing in-flight messages.");
            health_reporter
                .set_not_serving::<InventoryServer<InventoryService>>()
                .await;
            stop_sessions.cancel();
            sessions.close();
            if tokio::time::timeout(DRAIN_TIMEOUT, sessions.wait())
                .await
                .is_err()
            {
                tracing::error!("Sessions did not finish in time; stopping anyway.");
            }
            server_stop.cancel();
        }
    };
    tracing::info!(listen = ?local, "Collector listening.");
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(reflection)
        .add_service(inventory)
        .serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned());
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => {
            // The server stopped on its own (it failed): nothing left to drain.
            store.close().await;
            return Ok(served?);
        }
        () = drain => {}
    }
    // Every session has answered its last message. Connections close once their peers
    // read the GOAWAY; one whose peer cannot (frozen, cut off) would hold the process
    // until its keepalive expires (50 s, past systemd's stop timeout): close it.
    let served = match tokio::time::timeout(CLOSE_TIMEOUT, &mut server).await {
        Ok(served) => served,
        Err(_) => {
            tracing::info!(
                after_secs = CLOSE_TIMEOUT.as_secs(),
                "Closing connections whose peers did not close them."
            );
            Ok(())
        }
    };
    store.close().await;
    tracing::info!("Collector stopped.");
    Ok(served?)
}
