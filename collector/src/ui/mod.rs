//! The fleet web UI: the headline (which hosts expose a port over IPv4 although netstat
//! shows only IPv6), exposure by port, ports, hosts, a host's listeners and history,
//! changes per hour and stale hosts, as server-rendered HTML (docs/ui.md).
//!
//! Read-only by construction: the router has only GET (and HEAD) routes, every other
//! method is answered 405 before any handler runs, and every read goes through a
//! [`ReadOnly`] handle with the report functions of `query` and `history`. Pages need
//! no JavaScript and load nothing from elsewhere: one stylesheet, served from the
//! binary, and inline SVG. Every response carries a strict Content-Security-Policy.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections (more are closed at once),
//! [`MAX_IN_FLIGHT`] requests answered at once (more wait up to [`QUEUE_WAIT`], then get
//! 503), each answered within [`REQUEST_TIMEOUT`] (else 503), request heads of at most
//! 16 KiB read within [`HEADER_TIMEOUT`], pages of at most 500 rows.
//!
//! Who may connect ([`tls_for`]): plain HTTP only on a loopback address; anywhere else
//! TLS, and client certificates from the fleet CA unless the operator says `--ui-public`.

mod chart;
mod html;
mod pages;
mod params;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use maud::{Markup, html as markup};
use rustls::ServerConfig;
use rustls::server::danger::ClientCertVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower_service::Service as _;

use crate::query::{QueryError, ReadOnly, ResultSet};
use crate::tls::TlsSetupError;

/// The UI's port unless told otherwise: next to the collector's 7443.
pub const DEFAULT_PORT: u16 = 7444;

/// The UI's address unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7444";

/// Connections held at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Requests answered at once; the database does the work, and it has few connections.
pub const MAX_IN_FLIGHT: usize = 4;
/// How long a request waits for one of the [`MAX_IN_FLIGHT`] places before 503.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);
/// How long a request may take to be answered before 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open, however busy.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long the ports table is reused before it is counted again, at least.
const PORTS_TTL: Duration = Duration::from_secs(60);
/// And at least this many times as long as the last count took: a count that reads every
/// live listener for 30 s (SQLite, 5,000,000 listeners) runs at most every 5 minutes
/// while someone looks, about a tenth of one core, not half of it.
const PORTS_TTL_FACTOR: u32 = 10;
/// But never longer than this: a count's time includes its waits (for a connection, a
/// lock), and one slow count must not leave the page stale for an hour.
const PORTS_TTL_MAX: Duration = Duration::from_secs(600);

/// The Content-Security-Policy of every response: nothing but our own stylesheet and
/// images, forms only to ourselves, never framed, no `<base>`.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The stylesheet, served as `/static/ui.css`.
pub const CSS: &str = include_str!("ui.css");

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(
        "the web UI would listen on {addr}, which is not a loopback address, without TLS. \
         Give it a certificate and key ({cert_flags}), or listen on 127.0.0.1:{port}"
    )]
    NeedsTls {
        addr: SocketAddr,
        cert_flags: &'static str,
        port: u16,
    },
    #[error(
        "the web UI on {addr} (not a loopback address) would answer anyone who can connect. \
         Require client certificates from the fleet CA ({ca_flag}), or pass {public_flag} to \
         serve it to every client that can reach {addr}"
    )]
    NeedsClientCerts {
        addr: SocketAddr,
        ca_flag: &'static str,
        public_flag: &'static str,
    },
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
}

/// The flags that fix a refused address, named in [`UiError`] (they differ between
/// `serve` and `ui`).
#[derive(Debug, Clone, Copy)]
pub struct Flags {
    pub cert: &'static str,
    pub ca: &'static str,
    pub public: &'static str,
}

/// Whether `addr` is a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x).
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The UI's TLS for `listen`: none on a loopback address without a certificate; else a
/// certificate (`identity`) is required off loopback, and client certificates
/// (`clients`, the fleet CA's verifier) unless `public`.
pub fn tls_for(
    listen: SocketAddr,
    identity: Option<(&Path, &Path)>,
    clients: Option<Arc<dyn ClientCertVerifier>>,
    public: bool,
    flags: Flags,
) -> Result<Option<Arc<ServerConfig>>, UiError> {
    let loopback = is_loopback(listen);
    let Some((cert, key)) = identity else {
        if loopback {
            return Ok(None);
        }
        return Err(UiError::NeedsTls {
            addr: listen,
            cert_flags: flags.cert,
            port: listen.port(),
        });
    };
    let clients = if public { None } else { clients };
    if clients.is_none() && !public && !loopback {
        return Err(UiError::NeedsClientCerts {
            addr: listen,
            ca_flag: flags.ca,
            public_flag: flags.public,
        });
    }
    Ok(Some(server_config(cert, key, clients)?))
}

/// TLS 1.3 with our certificate, HTTP/1.1, and client certificates verified by
/// `clients` when given.
fn server_config(
    cert: &Path,
    key: &Path,
    clients: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let (certs, key) = listenscope_core::pem::load_identity(cert, key)?;
    let provider = Arc::new(listenscope_core::pem::tls13_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match clients {
        Some(v) => builder
            .with_client_cert_verifier(v)
            .with_single_cert(certs, key)?,
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What the handlers share: the read-only handle, how the database is named in the
/// commands the SQL pages show, the places for requests, and the ports table.
#[derive(Debug)]
pub struct UiState {
    ro: ReadOnly,
    /// The database URL as `query --db` takes it (a password replaced by `***`).
    db_label: String,
    slots: Arc<Semaphore>,
    ports: Arc<PortsCache>,
}

/// The ports table ([`crate::query::ports`]) as last counted, shared by the requests.
///
/// Counting reads every live listener that accepts any address, so it runs in a task
/// of its own, one at a time: a request that gives up (its [`REQUEST_TIMEOUT`], a
/// closed connection) does not cancel it, and the next request finds its answer.
#[derive(Debug, Default)]
struct PortsCache {
    state: std::sync::Mutex<PortsState>,
    /// Woken when a count ends, with or without an answer.
    counted: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct PortsState {
    copy: Option<PortsCount>,
    /// When the running count started (`None`: no count runs).
    started: Option<Instant>,
    /// Why the last count failed, while there is no copy to answer with.
    failed: Option<String>,
}

/// One count of the ports table, with the headline's counts by verdict (the two
/// aggregates over whole tables the pages show).
#[derive(Debug, Clone)]
pub struct PortsCount {
    taken: Instant,
    /// How long the count took (the next one waits [`PORTS_TTL_FACTOR`] times as long).
    pub took: Duration,
    /// When the count started (the page says so).
    pub at: time::OffsetDateTime,
    pub rows: Arc<ResultSet>,
    /// [`crate::query::hidden_by_verdict`].
    pub hidden: Arc<Vec<(String, u64, u64)>>,
}

impl PortsCount {
    /// How long this copy is answered before a recount starts: [`PORTS_TTL`], or
    /// [`PORTS_TTL_FACTOR`] times what the count took when that is longer, at most
    /// [`PORTS_TTL_MAX`].
    pub fn ttl(&self) -> Duration {
        PORTS_TTL
            .max(self.took.saturating_mul(PORTS_TTL_FACTOR))
            .min(PORTS_TTL_MAX)
    }
}

impl PortsCache {
    /// Starts a count unless one runs (`state` locked by the caller).
    fn start(self: &Arc<Self>, state: &mut PortsState, ro: &ReadOnly) {
        if state.started.is_some() {
            return;
        }
        state.started = Some(Instant::now());
        let (ro, cache) = (ro.clone(), Arc::clone(self));
        tokio::spawn(async move {
            let at = time::OffsetDateTime::now_utc();
            let counted = match crate::query::ports(&ro).await {
                Ok(rows) => crate::query::hidden_by_verdict(&ro)
                    .await
                    .map(|hidden| (rows, hidden)),
                Err(e) => Err(e),
            };
            {
                let mut state = cache.state.lock().unwrap_or_else(|e| e.into_inner());
                let took = state.started.take().map_or(Duration::ZERO, |s| s.elapsed());
                match counted {
                    Ok((rows, hidden)) => {
                        state.copy = Some(PortsCount {
                            taken: Instant::now(),
                            took,
                            at,
                            rows: Arc::new(rows),
                            hidden: Arc::new(hidden),
                        });
                        state.failed = None;
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            "Counting the ports page failed; the last count (if any) is kept."
                        );
                        if state.copy.is_none() {
                            state.failed = Some(e.to_string());
                        }
                    }
                }
            }
            cache.counted.notify_waiters();
        });
    }

    /// The last count without waiting (`None` before the first has ended); starts a
    /// count when there is none or the copy is older than [`PortsCount::ttl`].
    fn peek(self: &Arc<Self>, ro: &ReadOnly) -> Option<PortsCount> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = state
            .copy
            .as_ref()
            .is_some_and(|c| c.taken.elapsed() < c.ttl());
        if !fresh {
            self.start(&mut state, ro);
        }
        state.copy.clone()
    }

    /// The last count, waiting for the first one when there is none yet. A copy older
    /// than its [`PortsCount::ttl`] is still answered at once while one recount runs in the
    /// background, so only the first request after start-up waits for a fleet-wide
    /// count. A first count that fails is an error for the requests waiting on it; the
    /// next request tries again.
    async fn get(self: &Arc<Self>, ro: &ReadOnly) -> Result<PortsCount, PageError> {
        loop {
            let ended = self.counted.notified();
            tokio::pin!(ended);
            // Registered before looking, so a count ending in between is not missed.
            ended.as_mut().enable();
            if let Some(copy) = self.peek(ro) {
                return Ok(copy);
            }
            ended.await;
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(copy) = &state.copy {
                return Ok(copy.clone());
            }
            if let Some(why) = state.failed.take() {
                return Err(PageError::Unavailable(format!(
                    "counting the ports over every live listener failed: {why}"
                )));
            }
        }
    }
}

impl UiState {
    pub fn new(ro: ReadOnly, db_label: String) -> UiState {
        UiState {
            ro,
            db_label,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            ports: Arc::default(),
        }
    }

    /// The ports table, waiting for a first count until it has run for `wait`:
    /// `Ok(None)` past it (the count goes on; the page says that it runs), an error when
    /// it failed. Only the first requests wait: while a long first count runs, the
    /// others are answered at once.
    async fn ports(&self, wait: Duration) -> Result<Option<PortsCount>, PageError> {
        let wait = {
            let state = self.ports.state.lock().unwrap_or_else(|e| e.into_inner());
            match (&state.copy, state.started) {
                (None, Some(started)) => wait.saturating_sub(started.elapsed()),
                _ => wait,
            }
        };
        match tokio::time::timeout(wait, self.ports.get(&self.ro)).await {
            Ok(counted) => counted.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The ports table, waiting at most `wait` for a first count (`None` past it, or
    /// when the count failed: the page says so).
    async fn ports_within(&self, wait: Duration) -> Option<PortsCount> {
        self.ports(wait).await.ok().flatten()
    }
}

/// Why a page could not be shown.
#[derive(Debug)]
enum PageError {
    Bad(params::BadParam),
    NotFound(String),
    Query(QueryError),
    /// Not answerable now; worth trying again (503).
    Unavailable(String),
}

impl From<params::BadParam> for PageError {
    fn from(e: params::BadParam) -> Self {
        PageError::Bad(e)
    }
}

impl From<QueryError> for PageError {
    fn from(e: QueryError) -> Self {
        PageError::Query(e)
    }
}

impl PageError {
    fn into_page(self, current: &str) -> Response {
        match self {
            PageError::Bad(b) => respond(
                StatusCode::BAD_REQUEST,
                html::page(
                    "Bad request",
                    current,
                    None,
                    markup! {
                        p class="error" {
                            "The parameter " code { (html::text(&b.name)) } " cannot be "
                            code { (html::text(&b.value)) } "."
                        }
                        p { "It takes: " (b.allowed) "." }
                    },
                ),
            ),
            PageError::NotFound(what) => respond(
                StatusCode::NOT_FOUND,
                html::page(
                    "Not found",
                    current,
                    None,
                    markup! { p class="error" { (what) } p { a href="/hosts" { "Every host" } } },
                ),
            ),
            PageError::Unavailable(why) => {
                tracing::warn!(why, "A UI page could not be answered.");
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    html::page(
                        "Not available right now",
                        current,
                        None,
                        markup! {
                            p class="error" { (html::text(&why)) }
                            p { "Try again in a moment." }
                        },
                    ),
                )
            }
            PageError::Query(e) => {
                let status = match e {
                    QueryError::Timeout(_) | QueryError::WindowTooBig(_) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                tracing::warn!(error = %e, "A UI page could not be read from the database.");
                respond(
                    status,
                    html::page(
                        "The database could not answer",
                        current,
                        None,
                        markup! { p class="error" { (html::text(&e.to_string())) } },
                    ),
                )
            }
        }
    }
}

/// An HTML response.
fn respond(status: StatusCode, page: Markup) -> Response {
    (status, Html(page.into_string())).into_response()
}

/// A page made here for the request-level refusals (405, 503, 404).
fn plain_page(status: StatusCode, title: &str, what: &str) -> Response {
    respond(
        status,
        html::page(title, "", None, markup! { p class="error" { (what) } }),
    )
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

async fn not_found() -> Response {
    plain_page(
        StatusCode::NOT_FOUND,
        "Not found",
        "No page here. The pages are listed above.",
    )
}

/// The peer of a connection, for the access log.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// Every request: GET and HEAD only (405 otherwise), a place among [`MAX_IN_FLIGHT`],
/// [`REQUEST_TIMEOUT`], the security headers, and one access-log line at debug.
async fn guard(State(state): State<Arc<UiState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    let mut resp = if method != Method::GET && method != Method::HEAD {
        let mut r = plain_page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "This UI only reads: it answers GET and HEAD, nothing else.",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        r
    } else {
        match tokio::time::timeout(QUEUE_WAIT, Arc::clone(&state.slots).acquire_owned()).await {
            Ok(Ok(_place)) => match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
                Ok(r) => r,
                Err(_) => plain_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Too slow",
                    &format!(
                        "This page took longer than {} s; narrow it (a port, a host, a \
                         shorter window) or ask the database directly with the SQL.",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                ),
            },
            _ => plain_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Busy",
                "Too many pages are being answered at once; try again in a moment.",
            ),
        }
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    tracing::debug!(
        peer = ?peer,
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "UI request."
    );
    resp
}

/// The router: the pages, the stylesheet, and a 404 page, behind [`guard`].
pub fn router(state: Arc<UiState>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/exposure", get(pages::exposure))
        .route("/ports", get(pages::ports))
        .route("/hosts", get(pages::hosts))
        .route("/hosts/{host}", get(pages::host))
        .route("/changes", get(pages::changes))
        .route("/stale", get(pages::stale))
        .route("/static/ui.css", get(css))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            guard,
        ))
        .with_state(state)
}

/// Serves the UI on `listener` (TLS when `tls` is given) until `shutdown` completes;
/// connections still open then get up to 5 s to finish their request.
pub async fn serve(
    listener: TcpListener,
    state: Arc<UiState>,
    tls: Option<Arc<ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = router(state);
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(error = %e, "The UI could not accept a connection.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
                    tracing::debug!(peer = %peer, "UI connection closed: too many open.");
                    continue;
                };
                let (app, acceptor, stop) = (app.clone(), acceptor.clone(), stop_rx.clone());
                conns.spawn(async move {
                    let _place = place;
                    let _ = tokio::time::timeout(
                        CONNECTION_LIFETIME,
                        connection(stream, peer, acceptor, app, stop),
                    )
                    .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    match acceptor {
        None => http(TokioIo::new(stream), peer, app, stop).await,
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => http(TokioIo::new(tls), peer, app, stop).await,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "UI TLS handshake refused.");
                }
                Err(_) => tracing::debug!(peer = %peer, "UI TLS handshake timed out."),
            }
        }
    }
}

async fn http<I>(io: TokioIo<I>, peer: SocketAddr, app: Router, mut stop: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            let mut app = app.clone();
            async move { app.call(req.map(Body::new)).await }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let stopped = async move {
        loop {
            if *stop.borrow_and_update() {
                return;
            }
            if stop.changed().await.is_err() {
                // The server is gone without saying stop: keep serving this request.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                tracing::debug!(peer = %peer, error = %e, "UI connection ended with an error.");
            }
        }
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Binds the UI's address, saying what to do when it cannot.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let fix = match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "; another process listens there (`ss -ltnp 'sport = :{}'`): stop it or \
                 choose another address",
                addr.port()
            ),
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need CAP_NET_BIND_SERVICE".to_string()
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "; no interface of this host has that address".to_string()
            }
            _ => String::new(),
        };
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for the web UI: {e}{fix}"),
        )
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The path of a host's page (`/hosts/NAME`, the name percent-encoded).
pub fn host_path(host: &str) -> String {
    html::host_href(host)
}

/// The UI's address as people open it.
pub fn url(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}/", if tls { "https" } else { "http" })
}

/// The UI on a thread and runtime of its own (two workers), so its reads never hold
/// the threads that take agents' messages: SQLite reads step on the thread that asks.
/// The read-only handle is opened there (a PostgreSQL connection belongs to the runtime
/// that made it); this returns once it is open, or with why it could not be. It serves
/// until `stop` is cancelled; join the handle to wait for it.
pub fn spawn(
    listener: std::net::TcpListener,
    db: crate::store::DbUrl,
    tls: Option<Arc<ServerConfig>>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let handle = std::thread::Builder::new()
        .name("ui".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("ui-worker")
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("starting the web UI's runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let ro = match ReadOnly::open(&db).await {
                    Ok(ro) => ro,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("the web UI's database: {e}")));
                        return;
                    }
                };
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("the web UI's socket: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let state = Arc::new(UiState::new(ro.clone(), db.to_string()));
                if let Err(e) = serve(listener, state, tls, stop.cancelled_owned()).await {
                    tracing::error!(error = %e, "The web UI stopped.");
                }
                ro.close().await;
            });
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(anyhow::anyhow!(e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(anyhow::anyhow!(
                "the web UI's thread ended before it started"
            ))
        }
    }
}
