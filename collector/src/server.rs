//! `listenscope-collector serve`: the gRPC server.
//!
//! [`serve`] takes its listener, TLS configuration, store and shutdown future as
//! arguments (tests bind `127.0.0.1:0` and pass a oneshot). Shutdown is graceful: sessions
//! finish the message they are storing, tell their agents to come back later
//! (UNAVAILABLE), and the server stops once they are done.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use listenscope_proto::v1::inventory_server::{Inventory, InventoryServer};
use listenscope_proto::{FILE_DESCRIPTOR_SET, v1};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::ingest::{self, Limits};
use crate::store::Store;
use crate::tls::{self, RateLimited};

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
    /// The live session of each host (one per host: a new connection replaces the old,
    /// e.g. a half-open one the agent already gave up on).
    by_host: Arc<Mutex<HashMap<String, (u64, CancellationToken)>>>,
    next_id: Arc<AtomicU64>,
    /// Sessions by host id with their epochs (checked against the database when
    /// collectors share it).
    held: ingest::Held,
    refusals: Arc<RateLimited>,
    /// Refused connections by reason, shared with the TLS accept loop: a certificate that
    /// names no host is refused here, at its first call.
    tls_refusals: Arc<tls::Refusals>,
    /// Places for sessions processing a message ([`Limits::in_flight`]).
    in_flight: Arc<Semaphore>,
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        let older = self
            .by_host
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.clone(), (id, replaced.clone()));
        if let Some((_, older)) = older {
            older.cancel();
        }
        let inbound = request.into_inner();
        // Replies are small and sent one at a time: a short queue is enough.
        let (tx, rx) = mpsc::channel(4);
        let by_host = Arc::clone(&self.by_host);
        let stop = ingest::Stop {
            shutdown: self.shutdown.clone(),
            replaced,
            held: Arc::clone(&self.held),
            in_flight: Arc::clone(&self.in_flight),
        };
        let session = ingest::run(
            host.clone(),
            self.store.clone(),
            self.limits.clone(),
            inbound,
            tx,
            stop,
        );
        self.sessions.spawn(async move {
            session.await;
            let mut map = by_host.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&host).is_some_and(|(i, _)| *i == id) {
                map.remove(&host);
            }
            drop(slot);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
}

/// Serves until `shutdown` resolves, then drains sessions and returns.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    store: Store,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let local = listener.local_addr().ok();
    let sessions = TaskTracker::new();
    let stop_sessions = CancellationToken::new();
    let limits_in_flight = limits.in_flight.max(1);
    let service = InventoryService {
        store: store.clone(),
        slots: Arc::new(Semaphore::new(limits.max_sessions)),
        limits,
        sessions: sessions.clone(),
        shutdown: stop_sessions.clone(),
        by_host: Arc::default(),
        next_id: Arc::default(),
        held: Arc::default(),
        refusals: Arc::default(),
        tls_refusals: Arc::default(),
        in_flight: Arc::new(Semaphore::new(limits_in_flight)),
    };
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
    let inventory = InventoryServer::new(service)
        .max_decoding_message_size(ingest::DECODE_LIMIT_BYTES)
        .max_encoding_message_size(ingest::MAX_MESSAGE_BYTES);

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
