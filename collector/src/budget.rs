//! The collector-wide memory budget for agent messages in flight.
//!
//! Every agent message is admitted whole before its bytes are read: a gate on the
//! request body of each `Inventory/Session` stream parses the gRPC framing (a 5-byte
//! header carrying the message length), and before it hands tonic the first byte of a
//! message's payload it takes that many bytes from the collector's budget (and from the
//! session's own share). While it waits, it reads nothing more from the stream, so HTTP/2
//! flow control stops the agent: admission waits, memory does not grow. The session gives
//! the bytes back when it has answered the message, or, for the chunks of a snapshot,
//! when the whole snapshot is answered.
//!
//! What is counted is encoded bytes. What they cost in memory is a multiple of that
//! (decoded records, the store's statements); docs/security.md gives the measured
//! factor, and `serve --memory-budget` is sized with it.
//!
//! Why whole messages, not frames: a session that held half a message while waiting for
//! the other half could wait forever for bytes held by other half-read messages. A whole
//! message is admitted at once or not at all (tokio's semaphore is fair and all-or-nothing).
//!
//! A snapshot comes in chunks (agents cut them under 7 KiB), and the chunks already
//! received are held until the last one arrives. Were they held in the same pool that
//! admits messages, snapshots could wait on each other forever (each holding half, none
//! able to finish). So the budget is two pools. A quarter (at least two maximum-size
//! messages) admits **messages**: each is given back once processed, and processing never
//! waits for this pool. The rest holds **snapshots being assembled**: when a chunk that
//! is not the last has been processed, its bytes move from the message pool into the
//! assembly pool. That move waits at most [`ASSEMBLY_WAIT`]; when the assembly pool stays
//! full, the session ends with RESOURCE_EXHAUSTED, gives back everything, and its agent
//! sends the snapshot again after its backoff. Nothing ever waits long while holding
//! what another waiter needs. Rejected: one pool with a deadline (everyone stalls for the
//! deadline when snapshots block each other), and reserving a whole maximum-size snapshot
//! per snapshot (a fleet's snapshots are small; a few reservations would serialize them).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::metrics as m;
pub use listenscope_core::limits::MAX_MESSAGE_BYTES;

/// The default budget: three maximum-size snapshots in several chunks at once, and room
/// for every other session's messages.
pub const DEFAULT_BUDGET_BYTES: usize = 1024 * 1024 * 1024;
/// The smallest budget `serve` accepts: about four maximum-size messages, so that a
/// snapshot can have several chunks.
pub const MIN_BUDGET_BYTES: usize = 16 * 1024 * 1024;
/// The largest snapshot any budget allows (about 250,000 listeners).
pub const MAX_SNAPSHOT_BYTES: usize = 256 * 1024 * 1024;
/// How long a chunk waits for room in the assembly pool before its session ends.
pub const ASSEMBLY_WAIT: Duration = Duration::from_secs(1);
/// gRPC's message header: a compression flag and a 4-byte length.
const HEADER: usize = 5;
/// What the largest message costs: its bytes and its header.
const MESSAGE_COST: usize = MAX_MESSAGE_BYTES + HEADER;
/// Most admitted bytes one session holds in the message pool: the message being processed
/// and the next (a session cannot take the pool from the others by sending ahead).
const PER_SESSION: usize = 2 * MESSAGE_COST;

/// The budget of one collector, shared by its sessions.
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Messages from admission until processed.
    messages: Arc<Semaphore>,
    /// The processed chunks of snapshots being assembled.
    assembly: Arc<Semaphore>,
    total: usize,
    /// The largest snapshot accepted, derived from the budget.
    snapshot_bytes: usize,
    /// Bytes counted in either pool.
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

/// Why a budget cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "memory budget of {bytes} bytes is below the minimum of {} MiB (about four maximum-size \
     messages)",
    MIN_BUDGET_BYTES / (1024 * 1024)
)]
pub struct BudgetTooSmall {
    pub bytes: usize,
}

impl Budget {
    /// A budget of `total` bytes of messages in flight.
    pub fn new(total: usize) -> Result<Budget, BudgetTooSmall> {
        if total < MIN_BUDGET_BYTES {
            return Err(BudgetTooSmall { bytes: total });
        }
        let (messages, assembly) = pools(total);
        metrics::gauge!(m::BUDGET_LIMIT_BYTES).set(total as f64);
        Ok(Budget {
            inner: Arc::new(Shared {
                messages: Arc::new(Semaphore::new(messages)),
                assembly: Arc::new(Semaphore::new(assembly)),
                total,
                snapshot_bytes: MAX_SNAPSHOT_BYTES.min(assembly),
                in_use: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
            }),
        })
    }

    pub fn total(&self) -> usize {
        self.inner.total
    }

    /// The largest snapshot (encoded bytes of its chunks) this budget accepts.
    pub fn snapshot_bytes(&self) -> usize {
        self.inner.snapshot_bytes
    }

    /// The most bytes held at once since start (for tests and the peak gauge).
    pub fn peak(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// A new session's account.
    pub fn ledger(&self) -> Arc<Ledger> {
        Arc::new(Ledger {
            budget: Arc::clone(&self.inner),
            own: Arc::new(Semaphore::new(PER_SESSION)),
            admitted: Mutex::new(VecDeque::new()),
            waiting: AtomicBool::new(false),
        })
    }

    /// Moves a processed chunk of a snapshot being assembled (its admission) into the
    /// assembly pool, waiting at most [`ASSEMBLY_WAIT`] for room.
    pub async fn assemble(&self, chunk: Admitted) -> Result<Assembled, Status> {
        let n = u32::try_from(chunk.bytes).unwrap_or(u32::MAX);
        let pool = Arc::clone(&self.inner.assembly);
        let permit = match pool.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => match tokio::time::timeout(ASSEMBLY_WAIT, pool.acquire_many_owned(n)).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => {
                    return Err(Status::unavailable(
                        "collector shutting down; reconnect later",
                    ));
                }
                Err(_) => {
                    metrics::counter!(m::BUDGET_REFUSALS).increment(1);
                    return Err(Status::resource_exhausted(format!(
                        "the collector's memory for snapshots being assembled ({} MiB of its \
                         --memory-budget) is full; send the snapshot again later",
                        (self.inner.total - pools(self.inner.total).0) >> 20
                    )));
                }
            },
        };
        let bytes = chunk.bytes;
        // Counted once: added for the assembly before the admission gives it back.
        let assembled = Assembled::new(Arc::clone(&self.inner), bytes, permit);
        drop(chunk);
        Ok(assembled)
    }
}

/// The pools of a budget: (messages, assembly).
fn pools(total: usize) -> (usize, usize) {
    let messages = (total / 4).max(2 * MESSAGE_COST);
    (messages, total - messages)
}

/// Bytes of processed chunks of a snapshot being assembled, given back when dropped.
#[derive(Debug)]
pub struct Assembled {
    budget: Arc<Shared>,
    bytes: usize,
    _permit: OwnedSemaphorePermit,
}

impl Assembled {
    fn new(budget: Arc<Shared>, bytes: usize, permit: OwnedSemaphorePermit) -> Assembled {
        budget.counted(bytes);
        Assembled {
            budget,
            bytes,
            _permit: permit,
        }
    }
}

impl Drop for Assembled {
    fn drop(&mut self) {
        self.budget.uncounted(self.bytes);
    }
}

impl Shared {
    fn counted(&self, bytes: usize) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if self.peak.fetch_max(now, Ordering::Relaxed) < now {
            metrics::gauge!(m::BUDGET_PEAK_BYTES).set(now as f64);
        }
        metrics::gauge!(m::BUDGET_BYTES).increment(bytes as f64);
    }

    fn uncounted(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
        metrics::gauge!(m::BUDGET_BYTES).decrement(bytes as f64);
    }
}

/// One session's admitted messages, oldest first, in the order tonic decodes them.
#[derive(Debug)]
pub struct Ledger {
    budget: Arc<Shared>,
    own: Arc<Semaphore>,
    admitted: Mutex<VecDeque<Admitted>>,
    /// The gate is waiting for budget (a slow snapshot is then the budget's fault).
    waiting: AtomicBool,
}

impl Ledger {
    /// The admission of the message tonic decoded last: the oldest not yet taken. The
    /// session holds it until it has answered that message.
    pub fn take(&self) -> Option<Admitted> {
        self.admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Whether the session's stream is paused for lack of budget.
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Takes `bytes` from the session's share and then from the collector's budget.
    async fn admit(
        self: Arc<Self>,
        bytes: usize,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Status> {
        let closed = || Status::unavailable("collector shutting down; reconnect later");
        let n = u32::try_from(bytes).map_err(|_| closed())?;
        let own = Arc::clone(&self.own)
            .acquire_many_owned(n)
            .await
            .map_err(|_| closed())?;
        let global = Arc::clone(&self.budget.messages);
        let all = match global.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!(m::BUDGET_WAITS).increment(1);
                self.waiting.store(true, Ordering::Relaxed);
                let p = global.acquire_many_owned(n).await;
                self.waiting.store(false, Ordering::Relaxed);
                p.map_err(|_| closed())?
            }
        };
        Ok((own, all))
    }
}

/// Bytes of one message, given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    budget: Arc<Shared>,
    bytes: usize,
    _own: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

impl Admitted {
    fn new(
        budget: Arc<Shared>,
        bytes: usize,
        (own, all): (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Admitted {
        budget.counted(bytes);
        Admitted {
            budget,
            bytes,
            _own: own,
            _all: all,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.budget.uncounted(self.bytes);
    }
}

type Admission = Pin<
    Box<dyn Future<Output = Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Status>> + Send>,
>;

/// Where the gate is in the gRPC framing of the stream.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Reading a header; `got` of its 5 bytes seen.
    Header { got: usize, len: [u8; 4] },
    /// Reading a payload; this many bytes of it to go.
    Payload(usize),
}

/// A request body that hands its bytes on only for admitted messages.
pub struct GatedBody {
    inner: tonic::body::Body,
    ledger: Arc<Ledger>,
    framing: Framing,
    /// Bytes read from the connection and not yet handed on.
    pending: Bytes,
    admission: Option<(usize, Admission)>,
}

impl std::fmt::Debug for GatedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatedBody")
            .field("framing", &self.framing)
            .field("pending", &self.pending.len())
            .field("admitting", &self.admission.as_ref().map(|(cost, _)| cost))
            .finish_non_exhaustive()
    }
}

impl GatedBody {
    pub fn new(inner: tonic::body::Body, ledger: Arc<Ledger>) -> GatedBody {
        GatedBody {
            inner,
            ledger,
            framing: Framing::Header {
                got: 0,
                len: [0; 4],
            },
            pending: Bytes::new(),
            admission: None,
        }
    }

    /// Hands on the next piece of `pending` that belongs to one message part; starts the
    /// admission when a header is complete.
    fn next_piece(&mut self) -> Result<Bytes, Status> {
        match self.framing {
            Framing::Header { mut got, mut len } => {
                let n = (HEADER - got).min(self.pending.len());
                let piece = self.pending.split_to(n);
                for &b in &piece[..] {
                    if got > 0 {
                        len[got - 1] = b;
                    }
                    got += 1;
                }
                if got < HEADER {
                    self.framing = Framing::Header { got, len };
                    return Ok(piece);
                }
                let size = u32::from_be_bytes(len) as usize;
                if size > MAX_MESSAGE_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "message of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit: \
                         split snapshots into chunks"
                    )));
                }
                self.framing = Framing::Payload(size);
                let cost = size + HEADER;
                let ledger = Arc::clone(&self.ledger);
                self.admission = Some((cost, Box::pin(ledger.admit(cost))));
                Ok(piece)
            }
            Framing::Payload(rest) => {
                let n = rest.min(self.pending.len());
                let piece = self.pending.split_to(n);
                self.framing = if rest == n {
                    Framing::Header {
                        got: 0,
                        len: [0; 4],
                    }
                } else {
                    Framing::Payload(rest - n)
                };
                Ok(piece)
            }
        }
    }
}

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some((cost, admission)) = &mut this.admission {
                let permits = ready!(admission.as_mut().poll(cx))?;
                let admitted = Admitted::new(Arc::clone(&this.ledger.budget), *cost, permits);
                this.ledger
                    .admitted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(admitted);
                this.admission = None;
            }
            // An empty payload is whole once admitted.
            if let Framing::Payload(0) = this.framing {
                this.framing = Framing::Header {
                    got: 0,
                    len: [0; 4],
                };
            }
            if this.pending.has_remaining() {
                let piece = this.next_piece()?;
                if !piece.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(piece))));
                }
                continue;
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.admission.is_none() && self.inner.is_end_stream()
    }
}

/// The Inventory service with its request bodies gated by the budget; each request
/// carries its session's [`Ledger`] in its extensions.
#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    budget: Budget,
}

impl<S> Gated<S> {
    pub fn new(inner: S, budget: Budget) -> Gated<S> {
        Gated { inner, budget }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for Gated<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let ledger = self.budget.ledger();
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(Arc::clone(&ledger));
        let body = tonic::body::Body::new(GatedBody::new(body, ledger));
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// gRPC frames of messages with these payload sizes, concatenated.
    fn framed(sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            out.push(0);
            out.extend_from_slice(&(n as u32).to_be_bytes());
            out.extend(std::iter::repeat_n(i as u8, n));
        }
        out
    }

    /// A body that yields `bytes` in pieces of `piece` bytes.
    fn body_of(bytes: Vec<u8>, piece: usize) -> tonic::body::Body {
        let frames: Vec<Result<Frame<Bytes>, Status>> = bytes
            .chunks(piece)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        tonic::body::Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    /// Whatever the piece size, the gate hands on every byte in order, never a piece
    /// that spans two messages, and admits one entry per message with its cost.
    #[tokio::test]
    async fn passes_every_byte_and_admits_each_message() {
        let sizes = [0, 1, 4, 5, 6, 300, 17];
        let bytes = framed(&sizes);
        for piece in [1, 2, 3, 5, 7, 64, 4096] {
            let budget = Budget::new(MIN_BUDGET_BYTES).unwrap();
            let ledger = budget.ledger();
            let mut body = GatedBody::new(body_of(bytes.clone(), piece), Arc::clone(&ledger));
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                out.extend_from_slice(&frame.unwrap().into_data().unwrap());
            }
            assert_eq!(out, bytes, "piece {piece}");
            let costs: Vec<usize> = std::iter::from_fn(|| ledger.take())
                .map(|a| a.bytes())
                .collect();
            assert_eq!(
                costs,
                sizes.iter().map(|n| n + HEADER).collect::<Vec<_>>(),
                "piece {piece}"
            );
            assert_eq!(budget.inner.in_use.load(Ordering::Relaxed), 0);
        }
    }

    /// A message that does not fit the rest of the budget is not read until bytes are
    /// given back; then it is.
    #[tokio::test]
    async fn waits_for_the_budget() {
        let budget = Budget::new(MIN_BUDGET_BYTES).unwrap();
        let hog = budget.ledger();
        let big = pools(MIN_BUDGET_BYTES).0 - HEADER - 100;
        let held = Arc::clone(&hog).admit(big + HEADER).await.unwrap();
        let held = Admitted::new(Arc::clone(&budget.inner), big + HEADER, held);
        let ledger = budget.ledger();
        let mut body = GatedBody::new(body_of(framed(&[1000]), 4096), Arc::clone(&ledger));
        // The header is handed on; the payload waits.
        let header = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(header.len(), HEADER);
        let pending = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
        assert!(pending.is_err(), "read past the budget");
        assert!(ledger.waiting());
        drop(held);
        let payload = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(payload.len(), 1000);
        assert!(!ledger.waiting());
        assert_eq!(budget.peak(), big + HEADER);
    }

    /// Once a frame's bytes are handed on, the gate keeps no view of it: an idle session
    /// must not pin the connection's read buffer (`split_to` of the whole rest leaves an
    /// empty `Bytes` that does not).
    #[tokio::test]
    async fn keeps_no_view_of_a_frame_handed_on() {
        struct Owner(Vec<u8>, Arc<AtomicBool>);
        impl AsRef<[u8]> for Owner {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Owner {
            fn drop(&mut self) {
                self.1.store(true, Ordering::Relaxed);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let frame = Bytes::from_owner(Owner(framed(&[100]), Arc::clone(&dropped)));
        // One frame, then a stream that stays open (an idle session).
        use futures_util::StreamExt as _;
        let frames = futures_util::stream::iter([Ok::<_, Status>(Frame::data(frame))])
            .chain(futures_util::stream::pending());
        let budget = Budget::new(MIN_BUDGET_BYTES).unwrap();
        let mut body = GatedBody::new(
            tonic::body::Body::new(http_body_util::StreamBody::new(frames)),
            budget.ledger(),
        );
        let mut got = 0;
        while got < HEADER + 100 {
            got += body
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap()
                .len();
        }
        assert!(
            dropped.load(Ordering::Relaxed),
            "the gate still holds the frame"
        );
    }

    /// A length over the protocol's message limit ends the stream at its header, with the
    /// limit and the fix.
    #[tokio::test]
    async fn refuses_oversized_messages_at_the_header() {
        let budget = Budget::new(MIN_BUDGET_BYTES).unwrap();
        let mut head = vec![0];
        head.extend_from_slice(&((MAX_MESSAGE_BYTES + 1) as u32).to_be_bytes());
        let mut body = GatedBody::new(body_of(head, 4096), budget.ledger());
        let err = loop {
            match body.frame().await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("split snapshots into chunks"),
            "{err}"
        );
    }

    #[test]
    fn sizes_follow_the_budget() {
        assert!(Budget::new(MIN_BUDGET_BYTES - 1).is_err());
        let small = Budget::new(MIN_BUDGET_BYTES).unwrap();
        assert_eq!(
            pools(MIN_BUDGET_BYTES),
            (2 * MESSAGE_COST, MIN_BUDGET_BYTES - 2 * MESSAGE_COST)
        );
        assert_eq!(small.snapshot_bytes(), MIN_BUDGET_BYTES - 2 * MESSAGE_COST);
        let default = Budget::new(DEFAULT_BUDGET_BYTES).unwrap();
        assert_eq!(pools(DEFAULT_BUDGET_BYTES).0, DEFAULT_BUDGET_BYTES / 4);
        assert_eq!(default.snapshot_bytes(), MAX_SNAPSHOT_BYTES);
    }

    /// Processed chunks move to the assembly pool (counted once), freeing the message
    /// pool; when the assembly pool stays full the chunk is refused after a short wait,
    /// with RESOURCE_EXHAUSTED, instead of waiting while holding.
    #[tokio::test]
    async fn chunks_move_to_the_assembly_pool_or_are_refused() {
        let budget = Budget::new(MIN_BUDGET_BYTES).unwrap();
        let (messages, assembly) = pools(MIN_BUDGET_BYTES);
        let ledger = budget.ledger();
        let admit = |n: usize| {
            let ledger = Arc::clone(&ledger);
            let inner = Arc::clone(&budget.inner);
            async move { Admitted::new(inner, n, ledger.admit(n).await.unwrap()) }
        };
        let first = budget.assemble(admit(assembly / 2).await).await.unwrap();
        let second = budget.assemble(admit(assembly / 2).await).await.unwrap();
        assert_eq!(
            budget.inner.in_use.load(Ordering::Relaxed),
            2 * (assembly / 2)
        );
        assert_eq!(budget.inner.messages.available_permits(), messages);
        let refused = budget.assemble(admit(1000).await).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--memory-budget"), "{refused}");
        drop((first, second));
        assert_eq!(budget.inner.in_use.load(Ordering::Relaxed), 0);
        assert!(budget.assemble(admit(1000).await).await.is_ok());
    }
}
