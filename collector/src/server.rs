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
use crate::tls;

/// How long shutdown waits for sessions to finish their current message.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

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
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    type SessionStream = ReceiverStream<Result<v1::CollectorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let host = tls::host_of(&request)?;
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable(
                "collector shutting down; reconnect later",
            ));
        }
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            metrics::counter!(crate::metrics::REJECTED_MESSAGES, "reason" => "session_limit")
                .increment(1);
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
        let (tx, rx) = mpsc::channel(32);
        let by_host = Arc::clone(&self.by_host);
        let stop = ingest::Stop {
            shutdown: self.shutdown.clone(),
            replaced,
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
    let service = InventoryService {
        store: store.clone(),
        slots: Arc::new(Semaphore::new(limits.max_sessions)),
        limits,
        sessions: sessions.clone(),
        shutdown: stop_sessions.clone(),
        by_host: Arc::default(),
        next_id: Arc::default(),
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InventoryServer<InventoryService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = ReceiverStream::new(tls::accept_loop(listener, tls));
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
    let served = server.await;
    store.close().await;
    tracing::info!("Collector stopped.");
    Ok(served?)
}
