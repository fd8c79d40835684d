//! One simulated agent: its own mTLS connection (one HTTP/2 connection, never shared),
//! the real protocol (Hello → Welcome → chunked snapshot → Acks, then Deltas and
//! Heartbeats, Resync honoured), one unacknowledged message at a time.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use listenscope_core::limits::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use listenscope_core::wire;
use listenscope_proto::v1;
use listenscope_proto::v1::inventory_client::InventoryClient;
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

use crate::Plan;
use crate::mix::{Host, Rng};
use crate::stats::{Stats, epoch_ms, note};

/// Chunks are cut before this many encoded bytes, as the agent does.
const CHUNK_BYTES: usize = listenscope_core::limits::MESSAGE_TARGET_BYTES;
/// Listeners per chunk when Welcome does not say.
const DEFAULT_PER_MESSAGE: usize = 1000;
/// After our half-close, how long the collector has to end the stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and storing first snapshots; sessions then idle.
    Connect,
    /// Deltas and heartbeats.
    Hold,
    /// Finish what is outstanding, half-close, wait for the end of the stream.
    Stop,
}

/// What the agents of one worker process share.
#[derive(Debug)]
pub struct Ctx {
    pub plan: Plan,
    pub ca_pem: Vec<u8>,
    pub stats: Mutex<Stats>,
    /// Sessions welcomed and not ended, per collector URL.
    pub live: Vec<AtomicU64>,
    /// Agents whose first snapshot was acknowledged or who failed before.
    pub first_outcomes: AtomicU64,
    /// Agents that got their Welcome or failed before.
    pub welcome_outcomes: AtomicU64,
    /// Burst mode: set (to the instant of the go) when the held-back first snapshots go.
    pub burst_go: watch::Receiver<Option<Instant>>,
    /// Agent tasks that ended.
    pub finished: AtomicU64,
    /// The pacer started every agent it was going to.
    pub paced: AtomicBool,
    pub phase: watch::Receiver<Phase>,
}

impl Ctx {
    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn live(&self) -> Vec<u64> {
        self.live
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect()
    }
}

/// One agent's identity and where it connects.
#[derive(Debug)]
pub struct Spec {
    /// Global index in the fleet (host name = fleet-<name_offset + index>).
    pub index: u64,
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Index into `plan.collectors`.
    pub collector: usize,
    pub source: Option<IpAddr>,
    pub seed: u64,
}

#[derive(Debug)]
struct Failure {
    key: String,
    msg: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    First,
    Delta,
    Resnapshot,
}

/// The one message waiting for its Ack.
#[derive(Debug)]
struct Outstanding {
    seq: u64,
    at: Instant,
    kind: Kind,
}

/// gRPC's name of a status code.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// A connection that failed before any gRPC call, by kind.
fn connect_kind(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = src {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            match io.raw_os_error() {
                Some(libc::ECONNREFUSED) => return "refused (ECONNREFUSED)",
                Some(libc::ETIMEDOUT) => return "timeout (ETIMEDOUT)",
                Some(libc::EADDRNOTAVAIL) => return "no free source port (EADDRNOTAVAIL)",
                Some(libc::EMFILE | libc::ENFILE) => return "out of file descriptors",
                Some(libc::ECONNRESET) => return "reset (ECONNRESET)",
                _ => {}
            }
        }
        if x.downcast_ref::<rustls::Error>().is_some() {
            return "TLS handshake";
        }
        src = x.source();
    }
    let text = chain(e).to_ascii_lowercase();
    if text.contains("timed out") || text.contains("elapsed") {
        "timeout"
    } else if text.contains("tls") || text.contains("certificate") || text.contains("handshake") {
        "TLS handshake"
    } else {
        "error"
    }
}

fn msg(b: v1::agent_message::Body) -> v1::AgentMessage {
    v1::AgentMessage { body: Some(b) }
}

/// A snapshot as wire messages: chunks of at most `per_message` listeners and about
/// [`CHUNK_BYTES`], all with the same sequence (the agent's `session::encode`), observed
/// now or `ago` before now.
fn snapshot_chunks(
    host: &Host,
    seq: u64,
    per_message: usize,
    ago: Option<Duration>,
) -> Vec<v1::AgentMessage> {
    let mut now = time::OffsetDateTime::now_utc();
    if let Some(ago) = ago {
        now -= ago;
    }
    let at = Some(wire::timestamp(now));
    let mut chunks: Vec<Vec<v1::Listener>> = Vec::new();
    let mut cur: Vec<v1::Listener> = Vec::new();
    let mut bytes = 0;
    for r in host.state.values() {
        let l = v1::Listener::from(r);
        // As the agent counts it: field tag, length, listener; 64 bytes for the rest.
        let len = l.encoded_len();
        let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !cur.is_empty() && (cur.len() >= per_message || bytes + size > CHUNK_BYTES - 64) {
            chunks.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push(l);
    }
    chunks.push(cur);
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, listeners)| {
            msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
                sequence: seq,
                chunk_index: i as u32,
                last: i + 1 == n,
                observed_at: at,
                listeners,
            }))
        })
        .collect()
}

/// Decrements a live-session counter when the session ends, however it ends.
struct Live<'a>(&'a AtomicU64);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn at(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct Agent {
    ctx: Arc<Ctx>,
    rng: Rng,
    stage: &'static str,
    /// The first snapshot's outcome (acknowledged, or failed) has been counted.
    first_done: bool,
    /// The Welcome's outcome (received, or failed before) has been counted.
    welcome_done: bool,
    /// Burst mode: this agent's first snapshot went with the burst and is not yet
    /// acknowledged (what ends it otherwise is a burst problem).
    in_burst: bool,
}

/// Runs one agent to its end. `handshake` is released at Welcome (bounds handshakes in
/// flight); `slot` (turns mode) at the end of the session.
pub async fn run(
    ctx: Arc<Ctx>,
    spec: Spec,
    handshake: OwnedSemaphorePermit,
    slot: Option<OwnedSemaphorePermit>,
) {
    let mut a = Agent {
        ctx: Arc::clone(&ctx),
        rng: Rng::new(spec.seed),
        stage: "connect",
        first_done: false,
        welcome_done: false,
        in_burst: false,
    };
    if let Err(f) = a.session(spec, handshake).await {
        let mut s = ctx.stats();
        if a.in_burst {
            note(&mut s.burst_problems, f.key.clone(), f.msg.clone());
        }
        note(&mut s.failures, f.key, f.msg);
        if !a.welcome_done {
            ctx.welcome_outcomes.fetch_add(1, Ordering::Relaxed);
        }
        if !a.first_done {
            s.first_failed += 1;
            drop(s);
            ctx.first_outcomes.fetch_add(1, Ordering::Relaxed);
        }
    }
    drop(slot);
    ctx.finished.fetch_add(1, Ordering::Relaxed);
}

impl Agent {
    fn fail(&self, what: impl std::fmt::Display, detail: impl Into<String>) -> Failure {
        Failure {
            key: format!("{}: {what}", self.stage),
            msg: detail.into(),
        }
    }

    fn status(&self, st: &Status) -> Failure {
        self.fail(code_name(st.code()), st.message().to_string())
    }

    /// Sends one message; when the stream is gone, the collector's final status says why.
    async fn send(
        &self,
        tx: &mpsc::Sender<v1::AgentMessage>,
        inbound: &mut Streaming<v1::CollectorMessage>,
        m: v1::AgentMessage,
    ) -> Result<(), Failure> {
        let wait = self.ctx.plan.ack_timeout;
        match timeout(wait, tx.send(m)).await {
            Ok(Ok(())) => Ok(()),
            Err(_) => Err(self.fail("send timeout", format!("could not send within {wait:?}"))),
            Ok(Err(_)) => match timeout(Duration::from_secs(5), inbound.message()).await {
                Ok(Err(st)) => Err(self.status(&st)),
                _ => Err(self.fail("closed", "the stream closed while sending")),
            },
        }
    }

    async fn send_snapshot(
        &self,
        tx: &mpsc::Sender<v1::AgentMessage>,
        inbound: &mut Streaming<v1::CollectorMessage>,
        host: &Host,
        seq: u64,
        per_message: usize,
    ) -> Result<(), Failure> {
        let ago = self.ctx.plan.observed_ago;
        for m in snapshot_chunks(host, seq, per_message, ago) {
            self.send(tx, inbound, m).await?;
        }
        Ok(())
    }

    /// Burst mode: waits, welcomed and silent, for the go of the burst; returns its
    /// instant. Anything from the collector meanwhile, or the end of the run, fails the
    /// session.
    async fn wait_burst(
        &self,
        inbound: &mut Streaming<v1::CollectorMessage>,
    ) -> Result<Instant, Failure> {
        let mut go = self.ctx.burst_go.clone();
        let mut phase = self.ctx.phase.clone();
        tokio::select! {
            at = go.wait_for(Option::is_some) => match at {
                Ok(at) => Ok((*at).unwrap_or_else(Instant::now)),
                Err(_) => Err(self.fail("stopped", "the worker went away before the burst")),
            },
            _ = phase.wait_for(|p| *p == Phase::Stop) => {
                Err(self.fail("stopped", "the run ended before the burst"))
            }
            m = inbound.message() => Err(match m {
                Err(st) => self.status(&st),
                Ok(None) => self.fail("closed", "the collector ended the stream (OK)"),
                Ok(Some(m)) => self.fail(
                    "protocol",
                    format!("a message before the first snapshot: {:?}", m.body),
                ),
            }),
        }
    }

    async fn session(
        &mut self,
        spec: Spec,
        handshake: OwnedSemaphorePermit,
    ) -> Result<(), Failure> {
        let ctx = Arc::clone(&self.ctx);
        let plan = &ctx.plan;
        let started = Instant::now();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ctx.ca_pem))
            .identity(Identity::from_pem(spec.cert_pem, spec.key_pem))
            .domain_name(plan.server_name.clone());
        let url = plan.collectors[spec.collector].clone();
        let endpoint = Endpoint::from_shared(url)
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| self.fail("configuration", chain(&e)))?
            .connect_timeout(plan.connect_timeout)
            // As the agent does (transport/session.rs).
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .local_address(spec.source);
        let channel = match timeout(
            plan.connect_timeout + Duration::from_secs(1),
            endpoint.connect(),
        )
        .await
        {
            Err(_) => {
                return Err(self.fail(
                    "timeout",
                    format!("no connection within {:?}", plan.connect_timeout),
                ));
            }
            Ok(Err(e)) => return Err(self.fail(connect_kind(&e), chain(&e))),
            Ok(Ok(c)) => c,
        };
        let mut client = InventoryClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(16);
        let hello = v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: concat!("bench-fleet/", env!("CARGO_PKG_VERSION")).to_string(),
            os_hostname: spec.name.clone(),
            session_id: self.rng.bytes16().to_vec(),
            acked_sequence: 0,
            instance_id: Vec::new(),
            watch: Some(watch()),
        };
        let _ = tx.try_send(msg(v1::agent_message::Body::Hello(hello)));
        self.stage = "session call";
        let answer = plan.ack_timeout;
        let mut inbound = match timeout(answer, client.session(ReceiverStream::new(rx))).await {
            Err(_) => return Err(self.fail("timeout", format!("no response within {answer:?}"))),
            Ok(Err(st)) => return Err(self.status(&st)),
            Ok(Ok(r)) => r.into_inner(),
        };
        self.stage = "welcome";
        let welcome = match timeout(answer, inbound.message()).await {
            Err(_) => return Err(self.fail("timeout", format!("no Welcome within {answer:?}"))),
            Ok(Err(st)) => return Err(self.status(&st)),
            Ok(Ok(None)) => return Err(self.fail("closed", "the stream ended before Welcome")),
            Ok(Ok(Some(m))) => match m.body {
                Some(v1::collector_message::Body::Welcome(w)) => w,
                other => {
                    return Err(self.fail("protocol", format!("expected Welcome, got {other:?}")));
                }
            },
        };
        drop(handshake);
        {
            let mut s = ctx.stats();
            s.welcomed += 1;
            s.welcome_lat.push(started.elapsed());
            s.welcome_max_ms = Some(s.welcome_max_ms.unwrap_or(0.0).max(epoch_ms()));
        }
        self.welcome_done = true;
        ctx.welcome_outcomes.fetch_add(1, Ordering::Relaxed);
        let live = &ctx.live[spec.collector];
        live.fetch_add(1, Ordering::Relaxed);
        let _live = Live(live);
        let per_message = match welcome.max_listeners_per_message {
            0 => DEFAULT_PER_MESSAGE,
            n => n as usize,
        };

        // The inventory follows the host's name: a later run over the same names sends
        // the same listeners (plus the extra ones it is asked for).
        let mut host = Host::new(plan.name_offset + spec.index, plan.listeners);
        if plan.extra_listeners > 0 {
            host.open(plan.extra_listeners);
        }
        let rows = host.state.len() as u64;
        let burst_at = if plan.burst {
            self.stage = "waiting for the burst";
            let at = self.wait_burst(&mut inbound).await?;
            self.in_burst = true;
            ctx.stats().burst_agents += 1;
            Some(at)
        } else {
            None
        };
        self.stage = "first snapshot";
        let mut seq = 1;
        let first_at = Instant::now();
        ctx.stats().first_sent();
        self.send_snapshot(&tx, &mut inbound, &host, seq, per_message)
            .await?;
        let mut outstanding = Some(Outstanding {
            seq,
            at: first_at,
            kind: Kind::First,
        });

        let turns = plan.mode == crate::Mode::Turns;
        let mut phase_rx = ctx.phase.clone();
        let mut next_delta: Option<Instant> = None;
        let mut next_beat: Option<Instant> = None;
        loop {
            let phase = *phase_rx.borrow_and_update();
            if phase == Phase::Hold && next_delta.is_none() {
                // Random phase, so the fleet's scans spread over the interval.
                let now = Instant::now();
                next_delta = Some(now + plan.delta_every.mul_f64(self.rng.unit()));
                next_beat = Some(now + plan.heartbeat_every.mul_f64(self.rng.unit()));
                self.stage = "hold";
            }
            if phase == Phase::Stop {
                self.stage = "stop";
            }
            if outstanding.is_none() && (phase == Phase::Stop || (turns && self.first_done)) {
                break;
            }
            let steady = phase == Phase::Hold && !turns;
            let ack_deadline = outstanding.as_ref().map(|o| o.at + plan.ack_timeout);
            tokio::select! {
                changed = phase_rx.changed(), if phase != Phase::Stop => {
                    if changed.is_err() {
                        // The worker is going away: end like a Stop.
                        break;
                    }
                }
                m = inbound.message() => match m {
                    Err(st) => return Err(self.status(&st)),
                    Ok(None) => {
                        return Err(self.fail("closed", "the collector ended the stream (OK)"));
                    }
                    Ok(Some(v1::CollectorMessage { body })) => match body {
                        Some(v1::collector_message::Body::Ack(a)) => {
                            if let Some(o) = outstanding.take_if(|o| a.sequence >= o.seq) {
                                let took = o.at.elapsed();
                                let mut s = ctx.stats();
                                match o.kind {
                                    Kind::First => {
                                        s.snapshot_lat.push(took);
                                        if let Some(go) = burst_at {
                                            s.burst_lat.push(go.elapsed());
                                        }
                                        self.in_burst = false;
                                        s.first_acked += 1;
                                        s.first_rows += rows;
                                        s.first_ack_max_ms =
                                            Some(s.first_ack_max_ms.unwrap_or(0.0).max(epoch_ms()));
                                        drop(s);
                                        self.first_done = true;
                                        ctx.first_outcomes.fetch_add(1, Ordering::Relaxed);
                                        if self.stage == "first snapshot" {
                                            self.stage = "connected";
                                        }
                                    }
                                    Kind::Delta => {
                                        // Steady state only: a delta still waiting when the
                                        // hold ends competes with the fleet's disconnects.
                                        if *phase_rx.borrow() == Phase::Hold {
                                            s.delta_lat.push(took);
                                        } else {
                                            s.delta_lat_at_stop.push(took);
                                        }
                                        s.deltas_acked += 1;
                                    }
                                    Kind::Resnapshot => {}
                                }
                            }
                        }
                        Some(v1::collector_message::Body::Resync(r)) => {
                            {
                                let mut s = ctx.stats();
                                s.resyncs += 1;
                                if self.in_burst {
                                    note(
                                        &mut s.burst_problems,
                                        format!("{}: Resync instead of Ack", self.stage),
                                        r.reason,
                                    );
                                }
                            }
                            seq += 1;
                            self.send_snapshot(&tx, &mut inbound, &host, seq, per_message)
                                .await?;
                            outstanding = Some(match outstanding {
                                // The first snapshot's latency runs until the one that
                                // replaces it is acknowledged.
                                Some(o) if o.kind == Kind::First => Outstanding { seq, ..o },
                                _ => Outstanding {
                                    seq,
                                    at: Instant::now(),
                                    kind: Kind::Resnapshot,
                                },
                            });
                        }
                        Some(v1::collector_message::Body::Welcome(_)) => {
                            return Err(self.fail("protocol", "a second Welcome"));
                        }
                        None => {}
                    },
                },
                () = at(next_delta), if steady && outstanding.is_none() => {
                    let changes = host.step();
                    seq += 1;
                    let d = v1::Delta {
                        sequence: seq,
                        observed_at: Some(wire::timestamp(time::OffsetDateTime::now_utc())),
                        opened: changes.opened.iter().map(Into::into).collect(),
                        closed: changes.closed.iter().map(Into::into).collect(),
                        changed: changes.changed.iter().map(Into::into).collect(),
                    };
                    let sent = Instant::now();
                    self.send(&tx, &mut inbound, msg(v1::agent_message::Body::Delta(d)))
                        .await?;
                    ctx.stats().deltas_sent += 1;
                    outstanding = Some(Outstanding { seq, at: sent, kind: Kind::Delta });
                    next_delta = next_delta.map(|t| (t + plan.delta_every).max(Instant::now()));
                }
                () = at(next_beat), if steady => {
                    let hb = v1::Heartbeat {
                        observed_at: Some(wire::timestamp(time::OffsetDateTime::now_utc())),
                        watch: Some(watch()),
                    };
                    self.send(&tx, &mut inbound, msg(v1::agent_message::Body::Heartbeat(hb)))
                        .await?;
                    ctx.stats().heartbeats += 1;
                    next_beat = next_beat.map(|t| (t + plan.heartbeat_every).max(Instant::now()));
                }
                () = at(ack_deadline) => {
                    let o = outstanding.as_ref().map(|o| (o.seq, o.kind));
                    return Err(self.fail(
                        "ack timeout",
                        format!("no Ack for {o:?} within {:?}", plan.ack_timeout),
                    ));
                }
            }
        }

        // Clean end: half-close, the collector ends the stream with OK.
        drop(tx);
        let end = timeout(CLOSE_TIMEOUT, async {
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(st) => return Err(st),
                }
            }
        })
        .await;
        let mut s = ctx.stats();
        match end {
            Ok(Ok(())) => s.disconnects_clean += 1,
            Ok(Err(st)) => note(
                &mut s.disconnects_unclean,
                code_name(st.code()).to_string(),
                st.message().to_string(),
            ),
            Err(_) => note(
                &mut s.disconnects_unclean,
                "timeout".to_string(),
                format!("the stream did not end within {CLOSE_TIMEOUT:?} of our half-close"),
            ),
        }
        Ok(())
    }
}

/// The watch mode a simulated agent reports, as a real one on a 10 s interval does: the
/// same in the Hello and every heartbeat (the collector writes it only at the Hello).
fn watch() -> v1::Watch {
    v1::Watch {
        kind: v1::WatchKind::Interval as i32,
        interval_ms: 10_000,
        reason: String::new(),
    }
}
