//! One agent session on the collector side: the protocol state machine.
//!
//! Hello → Welcome, then snapshots (assembled from chunks, committed at the last one),
//! deltas and heartbeats. Every message is validated completely before anything is
//! stored; a rule broken ends the stream with INVALID_ARGUMENT and stores nothing of that
//! message (nor of a snapshot it belongs to). Acks are sent only after the commit.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use listenscope_core::diff::Changes;
use listenscope_core::record::{ListenerKey, ListenerRecord};
use listenscope_core::watch::Watch;
use listenscope_core::wire::{self, WireError};
use listenscope_proto::v1;
use prost::Message as _;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::budget::{Assembled, Budget, Ledger};
use crate::metrics as m;
use crate::store::{AgentHello, Applied, HostSession, Message, Store, StoreError};

pub use listenscope_core::limits::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
/// What tonic may decode at all (bounds memory per stream).
pub const DECODE_LIMIT_BYTES: usize = 16 * 1024 * 1024;

/// Agent sessions one collector process holds by default (each needs one open file).
pub const DEFAULT_MAX_SESSIONS: usize = 20_000;

/// Sessions this process holds, by host id: the connection's epoch and how to end it
/// (when a collector sharing the database accepted a newer connection of the host).
pub type Held = Arc<Mutex<HashMap<i64, (i64, CancellationToken)>>>;

/// Per-collector limits on what agents may send, and write pacing.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Listeners per SnapshotChunk or Delta (advertised in Welcome; never below 1000,
    /// which agents may always send).
    pub per_message: usize,
    /// Listeners in one whole snapshot.
    pub per_snapshot: usize,
    /// Encoded bytes of one whole snapshot being assembled.
    pub per_snapshot_bytes: usize,
    /// Agent sessions open at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_sessions: usize,
    /// A heartbeat updates `last_seen` at most this often per session: at a 10 s scan
    /// interval, 10,000 quiet hosts would otherwise cost 1,000 durable commits a second.
    /// Keep it well under `stale_after` (serve uses a quarter of it, at most 30 s).
    pub heartbeat_every: std::time::Duration,
    /// This collector process's name, recorded with each host it holds (`hosts.collector`).
    pub instance: String,
    /// Sessions that may hold a decoded message (or a snapshot being assembled) at once;
    /// the others wait before processing what they received. Bounds the memory of a burst
    /// (every agent resending its snapshot at once) to this many snapshots instead of the
    /// whole fleet's. Twice a writer batch (1,024 messages), so that the next batch is
    /// prepared while one commits.
    pub in_flight: usize,
    /// A snapshot whose next chunk does not arrive within this long ends the session
    /// (its holder would keep an in-flight place forever).
    pub chunk_wait: std::time::Duration,
    /// Encoded bytes of agent messages admitted at once, collector-wide ([`Budget`]). The
    /// largest snapshot accepted is the smaller of `per_snapshot_bytes` and what the
    /// budget allows ([`Budget::snapshot_bytes`]).
    pub memory_budget: usize,
    /// Bounds on connections before they authenticate and speak HTTP/2 (the accept loop).
    pub admission: crate::admission::AdmissionLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_message: 5000,
            per_snapshot: 250_000,
            per_snapshot_bytes: 256 * 1024 * 1024,
            max_sessions: DEFAULT_MAX_SESSIONS,
            heartbeat_every: std::time::Duration::from_secs(30),
            instance: String::new(),
            in_flight: 2048,
            chunk_wait: std::time::Duration::from_secs(60),
            memory_budget: crate::budget::DEFAULT_BUDGET_BYTES,
            admission: crate::admission::AdmissionLimits::default(),
        }
    }
}

impl Limits {
    /// Defaults, with heartbeat writes paced for `stale_after`.
    pub fn for_stale_after(stale_after: std::time::Duration) -> Limits {
        Limits {
            heartbeat_every: (stale_after / 4).min(std::time::Duration::from_secs(30)),
            ..Limits::default()
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        if e.is_constraint() {
            // The data, not the database, is at fault: retrying the same message would
            // fail forever. The agent starts over from a snapshot on INVALID_ARGUMENT.
            tracing::warn!(error = %e, "A message broke a database constraint.");
            return Status::invalid_argument(
                "the message conflicts with the stored data (a database constraint refused it); \
                 send a fresh snapshot",
            );
        }
        // Details stay in the collector's log; the agent only needs to retry.
        tracing::error!(error = %e, "Store failure; the agent will retry.");
        Status::unavailable("collector storage failed; retry later")
    }
}

fn invalid(e: WireError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A snapshot being assembled from chunks.
struct Assembling {
    seq: u64,
    at: OffsetDateTime,
    next_chunk: u32,
    bytes: usize,
    records: Vec<ListenerRecord>,
    keys: HashSet<ListenerKey>,
}

/// What the session expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Only a snapshot is applied; deltas are dropped (they were sent before the agent
    /// saw our Resync/Welcome).
    Snapshot,
    /// Deltas continue after this committed sequence.
    After(u64),
}

/// Why a session may have to stop between messages.
#[derive(Debug, Clone)]
pub struct Stop {
    /// The collector is shutting down.
    pub shutdown: CancellationToken,
    /// A newer connection of the same host replaced this one (one session per host), or
    /// (with `why` set) its certificate was revoked.
    pub replaced: CancellationToken,
    /// Why `replaced` ended the session, if not for a newer connection.
    pub why: Arc<std::sync::OnceLock<Status>>,
    /// Takes the host for this connection once its Hello names the agent's instance
    /// (refused for a second machine with the same certificate: `server::Registry`).
    pub claim: crate::server::Claim,
    /// Where this session registers once its Hello is stored.
    pub held: Held,
    /// Places for messages being processed ([`Limits::in_flight`]).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The collector's memory budget (slots for snapshots in several chunks).
    pub budget: Budget,
    /// This session's admitted messages, in the order they are decoded.
    pub ledger: Arc<Ledger>,
}

impl Stop {
    /// The status of a session `replaced` ended.
    fn ended(&self) -> Status {
        self.why
            .get()
            .cloned()
            .unwrap_or_else(|| Status::aborted(TAKEN_OVER))
    }
}

/// Runs one session to its end; errors go to the agent as the stream's final status.
pub async fn run(
    host: String,
    store: Store,
    limits: Limits,
    mut inbound: Streaming<v1::AgentMessage>,
    tx: mpsc::Sender<Result<v1::CollectorMessage, Status>>,
    stop: Stop,
) {
    let shutdown = &stop.shutdown;
    metrics::gauge!(m::CONNECTED_AGENTS).increment(1.0);
    let result = session(&host, &store, &limits, &mut inbound, &tx, &stop).await;
    metrics::gauge!(m::CONNECTED_AGENTS).decrement(1.0);
    match result {
        Ok(()) => tracing::info!(host = %host, "Agent disconnected."),
        // The agent closed its connection (it stopped, or its network went): it comes back
        // by itself, nothing for an operator to do. An agent's clean shutdown lands here
        // too, and used to log a warning on every quickstart.
        Err(status) if status.code() == tonic::Code::Cancelled => {
            tracing::info!(host = %host, reason = %status.message(), "Agent disconnected.");
        }
        Err(status) if shutdown.is_cancelled() && status.code() == tonic::Code::Unavailable => {
            tracing::info!(host = %host, "Session closed for shutdown.");
            let _ = tx.send(Err(status)).await;
        }
        Err(status)
            if status.code() == tonic::Code::Aborted
                && (stop.replaced.is_cancelled() || status.message().starts_with(TAKEN_OVER)) =>
        {
            tracing::info!(host = %host, "Session replaced by a newer connection of this host.");
            let _ = tx.send(Err(status)).await;
        }
        // A second machine with this certificate: counted and logged (rate-limited) where
        // it was refused (`server::Claim`); it retries for as long as both run.
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            tracing::debug!(host = %host, message = %status.message(), "Duplicate session refused.");
            let _ = tx.send(Err(status)).await;
        }
        Err(status) => {
            if status.code() == tonic::Code::InvalidArgument {
                metrics::counter!(m::REJECTED_MESSAGES, "reason" => "invalid_argument")
                    .increment(1);
            }
            tracing::warn!(host = %host, code = ?status.code(), message = %status.message(), "Session ended with an error.");
            let _ = tx.send(Err(status)).await;
        }
    }
}

/// How a session that lost its host to a newer connection ends (ABORTED).
const TAKEN_OVER: &str = "replaced by a newer connection from this host";

fn reply(b: v1::collector_message::Body) -> Result<v1::CollectorMessage, Status> {
    Ok(v1::CollectorMessage { body: Some(b) })
}

async fn send(
    tx: &mpsc::Sender<Result<v1::CollectorMessage, Status>>,
    b: v1::collector_message::Body,
) -> Result<(), Status> {
    tx.send(reply(b))
        .await
        .map_err(|_| Status::cancelled("the agent went away"))
}

async fn next(
    inbound: &mut Streaming<v1::AgentMessage>,
    stop: &Stop,
) -> Result<Option<v1::AgentMessage>, Status> {
    tokio::select! {
        // A message already being stored finishes first: we only get here between messages.
        () = stop.shutdown.cancelled() => Err(Status::unavailable("collector shutting down; reconnect later")),
        () = stop.replaced.cancelled() => Err(stop.ended()),
        msg = inbound.message() => msg.map_err(disconnected),
    }
}

/// An error reading the agent's stream that comes from its connection (reset, closed
/// without a TLS close_notify, cut off: an agent stopping or a host rebooting) is the
/// agent going away, `Cancelled`, not a session failure: at fleet scale an operator would
/// otherwise see a warning for every agent restart. Errors of the messages themselves
/// (decoding, size) keep their code.
fn disconnected(status: Status) -> Status {
    let mut source = std::error::Error::source(&status);
    while let Some(e) = source {
        let transport =
            e.is::<std::io::Error>() || e.downcast_ref::<h2::Error>().is_some_and(h2::Error::is_io);
        if transport {
            return Status::cancelled(format!(
                "the agent's connection closed: {}",
                status.message()
            ));
        }
        source = e.source();
    }
    status
}

async fn session(
    host: &str,
    store: &Store,
    limits: &Limits,
    inbound: &mut Streaming<v1::AgentMessage>,
    tx: &mpsc::Sender<Result<v1::CollectorMessage, Status>>,
    stop: &Stop,
) -> Result<(), Status> {
    let Some(first) = next(inbound, stop).await? else {
        return Ok(());
    };
    // Given back once the Welcome is sent.
    let hello_bytes = stop.ledger.take();
    check_size(&first)?;
    let hello = match first.body {
        Some(v1::agent_message::Body::Hello(h)) => wire::Hello::try_from(h).map_err(invalid)?,
        _ => {
            return Err(Status::invalid_argument(
                "the first message of a session must be Hello",
            ));
        }
    };
    // Before anything is stored: a second machine with this certificate is refused here.
    // Boxed, like the store calls below: a refusal's write is a large future, and an
    // idle session (one per agent) must not carry its space (measured: +28 KiB per
    // session unboxed).
    Box::pin(stop.claim.claim(hello.instance_id)).await?;
    let mut s = match Session::open(host, store, limits, tx, hello).await {
        Ok(s) => s,
        // Held through another collector sharing the database: the same refusal.
        Err(Opened::HeldElsewhere(detail)) => {
            return Err(Box::pin(stop.claim.refused(detail)).await);
        }
        Err(Opened::Failed(status)) => return Err(status),
    };
    drop(hello_bytes);
    let registered = s.stored.clone();
    stop.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
        registered.host_id,
        (registered.epoch, stop.replaced.clone()),
    );
    let result = messages(&mut s, inbound, stop).await;
    let mut held = stop.held.lock().unwrap_or_else(|p| p.into_inner());
    if held
        .get(&registered.host_id)
        .is_some_and(|(e, _)| *e == registered.epoch)
    {
        held.remove(&registered.host_id);
    }
    result
}

async fn messages(
    s: &mut Session<'_>,
    inbound: &mut Streaming<v1::AgentMessage>,
    stop: &Stop,
) -> Result<(), Status> {
    // Held from the first message that carries listeners until it (or the snapshot it
    // starts) is answered.
    let mut place: Option<tokio::sync::OwnedSemaphorePermit> = None;
    // The budget's bytes of the chunks of the snapshot being assembled, given back when
    // it is answered (or the session ends).
    let mut assembly: Vec<Assembled> = Vec::new();
    loop {
        let msg = if s.assembling.is_some() {
            match tokio::time::timeout(s.limits.chunk_wait, next(inbound, stop)).await {
                Ok(m) => m?,
                Err(_) if stop.ledger.waiting() => {
                    metrics::counter!(m::BUDGET_REFUSALS).increment(1);
                    return Err(Status::resource_exhausted(format!(
                        "the collector's memory budget for messages in flight ({} MiB) stayed \
                         full for {} s while this snapshot was assembled; retry later",
                        stop.budget.total() / (1024 * 1024),
                        s.limits.chunk_wait.as_secs()
                    )));
                }
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the next chunk of the snapshot did not arrive within {} s; send the \
                         snapshot again",
                        s.limits.chunk_wait.as_secs()
                    )));
                }
            }
        } else {
            next(inbound, stop).await?
        };
        let Some(msg) = msg else { break };
        // The budget's bytes of this message, given back once it is processed.
        let admitted = stop.ledger.take();
        check_size(&msg)?;
        let carries_listeners = matches!(
            msg.body,
            Some(v1::agent_message::Body::Snapshot(_) | v1::agent_message::Body::Delta(_))
        );
        if carries_listeners && place.is_none() {
            let wait = Arc::clone(&stop.in_flight).acquire_owned();
            place = Some(tokio::select! {
                p = wait => p.map_err(|_| Status::unavailable("collector shutting down; reconnect later"))?,
                () = stop.shutdown.cancelled() => return Err(Status::unavailable("collector shutting down; reconnect later")),
                () = stop.replaced.cancelled() => return Err(stop.ended()),
            });
        }
        let kept = matches!(&msg.body, Some(v1::agent_message::Body::Snapshot(c)) if !c.last);
        let now = OffsetDateTime::now_utc();
        match msg.body {
            None => return Err(Status::invalid_argument("empty AgentMessage")),
            Some(v1::agent_message::Body::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "Hello may only be the first message",
                ));
            }
            Some(v1::agent_message::Body::Heartbeat(h)) => s.heartbeat(h, now).await?,
            Some(v1::agent_message::Body::Snapshot(chunk)) => {
                s.snapshot_chunk(chunk, now).await?;
                // A chunk that is not the last stays in memory until the snapshot is whole.
                if kept && let Some(chunk) = admitted {
                    assembly.push(stop.budget.assemble(chunk).await?);
                }
            }
            Some(v1::agent_message::Body::Delta(d)) => s.delta(d, now).await?,
        }
        if s.assembling.is_none() {
            place = None;
            assembly.clear();
        }
    }
    Ok(())
}

/// Which kind of message a store outcome answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Snapshot,
    Delta,
}

/// One agent's session after its Hello: one method per message kind.
struct Session<'a> {
    host: &'a str,
    store: &'a Store,
    limits: &'a Limits,
    tx: &'a mpsc::Sender<Result<v1::CollectorMessage, Status>>,
    /// The host row and this connection's epoch.
    stored: HostSession,
    session_id: [u8; 16],
    expect: Expect,
    assembling: Option<Assembling>,
    /// When this session last wrote last_seen (hello, commits and heartbeats all do).
    seen_written: Instant,
    /// The watch mode this session last reported (Hello, then heartbeats): a heartbeat
    /// writes its mode only when it differs.
    watch: Option<Watch>,
}

/// Why a session did not open.
enum Opened {
    /// Another agent installation holds the host through another collector (the detail
    /// for the agent).
    HeldElsewhere(String),
    Failed(Status),
}

impl From<Status> for Opened {
    fn from(s: Status) -> Opened {
        Opened::Failed(s)
    }
}

impl From<StoreError> for Opened {
    fn from(e: StoreError) -> Opened {
        Opened::Failed(e.into())
    }
}

impl<'a> Session<'a> {
    /// Records the host and answers Hello with Welcome (and where to resume).
    async fn open(
        host: &'a str,
        store: &'a Store,
        limits: &'a Limits,
        tx: &'a mpsc::Sender<Result<v1::CollectorMessage, Status>>,
        hello: wire::Hello,
    ) -> Result<Session<'a>, Opened> {
        let now = OffsetDateTime::now_utc();
        let instance = (!limits.instance.is_empty()).then_some(limits.instance.as_str());
        // Boxed: a session spends its life idle between messages, and an idle session's
        // state (one per connected agent) should not carry the space of this call.
        let agent = AgentHello {
            os_hostname: &hello.os_hostname,
            agent_version: &hello.agent_version,
            instance_id: hello.instance_id,
            watch: hello.watch.as_ref(),
        };
        let stored = Box::pin(store.hello_at(host, agent, now, instance)).await?;
        if let Some(h) = &stored.held_elsewhere {
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            return Err(Opened::HeldElsewhere(format!(
                "another agent (instance {}) holds this host's session with the same \
                 certificate through collector {} (last heard from at {} UTC); this agent is \
                 instance {}: two machines share one certificate. Issue each its own \
                 (`listenscope-collector certs issue --host NAME`); a stolen copy: `certs \
                 revoke`",
                h.instance_id.as_deref().map_or_else(|| "none".into(), hex),
                h.collector.as_deref().unwrap_or("unnamed"),
                h.last_seen,
                hello
                    .instance_id
                    .as_ref()
                    .map_or_else(|| "none".into(), |i| hex(i)),
            )));
        }
        let resume = (stored.session_id.as_deref() == Some(hello.session_id.as_slice())
            && stored.committed_seq >= hello.acked_sequence)
            .then_some(stored.committed_seq);
        send(
            tx,
            v1::collector_message::Body::Welcome(v1::Welcome {
                resume_after: resume,
                collector_version: env!("CARGO_PKG_VERSION").to_string(),
                max_listeners_per_message: limits.per_message as u32,
            }),
        )
        .await?;
        let watch = hello
            .watch
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |w| w.mode.to_string());
        tracing::info!(host = %host, os_hostname = %hello.os_hostname, agent_version = %hello.agent_version, %watch, resume_after = ?resume, "Agent connected.");
        Ok(Session {
            host,
            store,
            limits,
            tx,
            stored,
            session_id: hello.session_id,
            expect: match resume {
                Some(c) => Expect::After(c),
                None => Expect::Snapshot,
            },
            assembling: None,
            seen_written: Instant::now(),
            watch: hello.watch,
        })
    }

    async fn heartbeat(&mut self, h: v1::Heartbeat, now: OffsetDateTime) -> Result<(), Status> {
        metrics::counter!(m::MESSAGES, "kind" => "heartbeat").increment(1);
        let h = wire::heartbeat(h, now).map_err(invalid)?;
        // Only a change is written: a heartbeat that repeats the mode (nearly all of them)
        // costs nothing more than before. Absent (an older agent): nothing to say.
        if let Some(w) = h.watch
            && self.watch.as_ref() != Some(&w)
        {
            tracing::info!(host = %self.host, watch = %w.mode, reason = w.reason.as_deref().unwrap_or(""), "Watch mode changed.");
            self.store.watch_changed(&self.stored, &w, now);
            self.watch = Some(w);
        }
        if self.seen_written.elapsed() >= self.limits.heartbeat_every {
            self.store.heartbeat(self.stored.host_id, now);
            self.seen_written = Instant::now();
        }
        Ok(())
    }

    async fn snapshot_chunk(
        &mut self,
        chunk: v1::SnapshotChunk,
        now: OffsetDateTime,
    ) -> Result<(), Status> {
        metrics::counter!(m::MESSAGES, "kind" => "snapshot_chunk").increment(1);
        let Some(snap) = add_chunk(&mut self.assembling, chunk, self.limits, now)? else {
            return Ok(());
        };
        let (seq, at) = (snap.seq, snap.at);
        let applied = self
            .store_message(seq, at, Message::Snapshot(snap.records), now)
            .await?;
        self.answer(Kind::Snapshot, seq, applied).await
    }

    async fn delta(&mut self, d: v1::Delta, now: OffsetDateTime) -> Result<(), Status> {
        metrics::counter!(m::MESSAGES, "kind" => "delta").increment(1);
        let (seq, at, changes) = validate_delta(d, self.limits, now)?;
        if self.assembling.is_some() {
            return Err(Status::invalid_argument(
                "a Delta arrived in the middle of a chunked snapshot",
            ));
        }
        if self.expect == Expect::Snapshot {
            return Ok(()); // sent before the agent learnt it must resync
        }
        let applied = self
            .store_message(seq, at, Message::Delta(changes), now)
            .await?;
        self.answer(Kind::Delta, seq, applied).await
    }

    async fn store_message(
        &mut self,
        seq: u64,
        at: OffsetDateTime,
        message: Message,
        now: OffsetDateTime,
    ) -> Result<Applied, Status> {
        let started = Instant::now();
        // Boxed for the same reason as the Hello's store call.
        let applied =
            Box::pin(
                self.store
                    .apply_as(&self.stored, &self.session_id, seq, at, message, now),
            )
            .await?;
        metrics::histogram!(m::ACK_SECONDS).record(started.elapsed().as_secs_f64());
        self.seen_written = Instant::now();
        Ok(applied)
    }

    /// Tells the agent what became of message `seq`: an Ack only for what is committed.
    async fn answer(&mut self, kind: Kind, seq: u64, applied: Applied) -> Result<(), Status> {
        let body = match applied {
            Applied::Committed { rows } => {
                metrics::counter!(m::ROWS).increment(rows as u64);
                if kind == Kind::Snapshot {
                    tracing::info!(host = %self.host, seq, rows, "Snapshot stored.");
                }
                self.expect = Expect::After(seq);
                v1::collector_message::Body::Ack(v1::Ack { sequence: seq })
            }
            Applied::Duplicate { committed } => {
                self.expect = Expect::After(committed);
                v1::collector_message::Body::Ack(v1::Ack {
                    sequence: committed,
                })
            }
            Applied::Gap { committed } => {
                let reason = format!(
                    "sequence gap: expected {}, got {seq}; send a fresh snapshot",
                    committed + 1
                );
                metrics::counter!(m::RESYNCS, "reason" => "gap").increment(1);
                tracing::warn!(host = %self.host, %reason, "Asking for a resync.");
                self.expect = Expect::Snapshot;
                v1::collector_message::Body::Resync(v1::Resync { reason })
            }
            Applied::Superseded if kind == Kind::Snapshot => {
                metrics::counter!(m::RESYNCS, "reason" => "stale_snapshot").increment(1);
                return Err(Status::aborted(
                    "this host's stored state is newer than this snapshot (another agent \
                     session with the same certificate?); not applied",
                ));
            }
            Applied::Superseded => {
                return Err(Status::aborted(
                    "a newer session of this host has taken over; this one is finished",
                ));
            }
            Applied::TakenOver => {
                return Err(Status::aborted(format!(
                    "{TAKEN_OVER} (accepted by this or another collector); this one is finished"
                )));
            }
        };
        send(self.tx, body).await
    }
}

fn check_size(msg: &v1::AgentMessage) -> Result<(), Status> {
    let n = msg.encoded_len();
    if n > MAX_MESSAGE_BYTES {
        return Err(Status::invalid_argument(format!(
            "message of {n} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit: split snapshots into chunks"
        )));
    }
    Ok(())
}

/// Adds a chunk; returns the whole snapshot when this was its last chunk.
fn add_chunk(
    assembling: &mut Option<Assembling>,
    chunk: v1::SnapshotChunk,
    limits: &Limits,
    now: OffsetDateTime,
) -> Result<Option<Assembling>, Status> {
    let at = wire::observed_at("observed_at", chunk.observed_at, now).map_err(invalid)?;
    if chunk.sequence == 0 {
        return Err(Status::invalid_argument(
            "sequence: 0 is not a sequence number (they start at 1)",
        ));
    }
    if chunk.listeners.len() > limits.per_message {
        return Err(Status::invalid_argument(format!(
            "listeners: {} in one chunk, at most {}",
            chunk.listeners.len(),
            limits.per_message
        )));
    }
    let a = match assembling {
        None => {
            if chunk.chunk_index != 0 {
                return Err(Status::invalid_argument(format!(
                    "chunk_index {} of snapshot {} arrived before chunk 0",
                    chunk.chunk_index, chunk.sequence
                )));
            }
            assembling.insert(Assembling {
                seq: chunk.sequence,
                at,
                next_chunk: 0,
                bytes: 0,
                records: Vec::new(),
                keys: HashSet::new(),
            })
        }
        Some(a) => {
            if chunk.sequence != a.seq || chunk.chunk_index != a.next_chunk || at != a.at {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk out of order: expected sequence {} chunk {} observed at {}, \
                     got sequence {} chunk {} observed at {at}",
                    a.seq, a.next_chunk, a.at, chunk.sequence, chunk.chunk_index
                )));
            }
            a
        }
    };
    if a.records.len() + chunk.listeners.len() > limits.per_snapshot {
        return Err(Status::invalid_argument(format!(
            "snapshot larger than {} listeners",
            limits.per_snapshot
        )));
    }
    a.bytes += chunk.encoded_len();
    if a.bytes > limits.per_snapshot_bytes {
        return Err(Status::invalid_argument(format!(
            "snapshot larger than {} bytes",
            limits.per_snapshot_bytes
        )));
    }
    for l in chunk.listeners {
        let r = ListenerRecord::try_from(l).map_err(invalid)?;
        if !a.keys.insert(r.key.clone()) {
            return Err(Status::invalid_argument(format!(
                "listener {:?} appears twice in snapshot {}",
                r.key, a.seq
            )));
        }
        a.records.push(r);
    }
    a.next_chunk += 1;
    Ok(if chunk.last { assembling.take() } else { None })
}

fn validate_delta(
    d: v1::Delta,
    limits: &Limits,
    now: OffsetDateTime,
) -> Result<(u64, OffsetDateTime, Changes), Status> {
    let at = wire::observed_at("observed_at", d.observed_at, now).map_err(invalid)?;
    if d.sequence == 0 {
        return Err(Status::invalid_argument(
            "sequence: 0 is not a sequence number (they start at 1)",
        ));
    }
    let n = d.opened.len() + d.closed.len() + d.changed.len();
    if n > limits.per_message {
        return Err(Status::invalid_argument(format!(
            "delta carries {n} listeners, at most {}",
            limits.per_message
        )));
    }
    let opened = d
        .opened
        .into_iter()
        .map(ListenerRecord::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let changed = d
        .changed
        .into_iter()
        .map(ListenerRecord::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let closed = d
        .closed
        .into_iter()
        .map(ListenerKey::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let mut seen = HashSet::new();
    for k in opened.iter().chain(&changed).map(|r| &r.key).chain(&closed) {
        if !seen.insert(k) {
            return Err(Status::invalid_argument(format!(
                "listener {k:?} appears twice in delta {}",
                d.sequence
            )));
        }
    }
    Ok((
        d.sequence,
        at,
        Changes {
            opened,
            closed,
            changed,
        },
    ))
}
