//! The collector's PostgreSQL server fails under it, then comes back: acknowledged must
//! still mean committed. The PostgreSQL counterpart of `disk_full.rs`, built the same way:
//! a real collector on a throwaway server (util::pg), real agents in their own network
//! namespaces, and hand-driven protocol clients whose every acknowledgement is checked at
//! once against the host's `committed_seq`, read over a separate connection.
//!
//! - `pg_tablespace_fills_up`: the collector's database lives in a tablespace on a small
//!   tmpfs, which is filled while listeners keep changing: table and index extension fails
//!   with ENOSPC ("could not extend file … No space left on device"). Then space returns.
//! - `pg_server_stops_and_restarts`: while agents change listeners and a hand-driven host
//!   streams deltas without pause, the server is stopped, first by a fast shutdown, then
//!   by a crash (SIGKILL to the postmaster), and started again on the same data directory
//!   and port. Each time, a transaction of the collector is caught in flight (waiting for
//!   a row lock that a prepared transaction of the test holds through the outage), so the
//!   store certainly fails mid-transaction. Other messages sent while the server is down
//!   mostly wait in the collector's pool (up to its 30s acquire timeout) and are stored
//!   once it is back.
//!
//! Without restarting the collector, each scenario then checks: every Ack and every
//! Welcome's `resume_after` was committed when the client saw it; the store converges to
//! each agent's own scan, with no duplicate live rows and no transaction left open; no
//! change observed during the fault is lost or re-timed (no agent had to start over from
//! a snapshot); after a graceful restart the collector resumes every session.
//!
//! The collector's database has `synchronous_commit = on` (the throwaway server runs with
//! it off for speed): a commit the collector saw must survive a server crash.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use listenscope_collector::query::{Param, ReadOnly, ResultSet};
use listenscope_collector::store::DbUrl;
use listenscope_collector::timefmt::format as fmt_time;
use listenscope_proto::v1;
use serde_json::Value;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use time::OffsetDateTime;
use tonic::{Code, Status};
use util::pg::{PgServer, Shutdown};
use util::*;

/// (protocol, address, port): how a listener is compared between the store and a scan.
type Key = (String, String, i64);

fn key(proto: &str, addr: &str, port: i64) -> Key {
    (proto.to_string(), addr.to_string(), port)
}

/// A tmpfs mounted on a fresh directory, owned by the PostgreSQL server's user; unmounted
/// (lazily if still busy) on drop, then the directory goes.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = TempDir::new("pgfull-fs");
        let target = dir.path().to_str().unwrap().to_string();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700,uid=65534,gid=65534"),
                "tmpfs",
                &target,
            ],
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = self.dir.path().to_path_buf();
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&target)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

/// Appends to `path` until the filesystem refuses more (ENOSPC): fills it, or tops it up
/// again if something freed space. Returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let buf = vec![0xa5u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match f.write(&buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    total
}

/// On a failing test, the tail of each log (the temp directories holding them go).
struct ShowLogsOnPanic(Vec<PathBuf>);

impl Drop for ShowLogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for p in &self.0 {
            let Ok(s) = std::fs::read_to_string(p) else {
                continue;
            };
            let lines: Vec<&str> = s.lines().collect();
            eprintln!(
                "---- {} (last {} of {} lines)",
                p.display(),
                lines.len().min(40),
                lines.len()
            );
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Lines of `p` containing `what`.
fn count_lines(p: &Path, what: &str) -> usize {
    read(p).lines().filter(|l| l.contains(what)).count()
}

/// Like `util::eventually`, but the check says what is still wrong, and the panic says it.
async fn converge<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => {
                panic!("timed out after {secs}s waiting for: {what}\nstill: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A read-only query over a fresh connection (PostgreSQL placeholders: `$N`). Retried
/// while the server cannot answer (it may be down or restarting), for at most 90s.
async fn q(db: &DbUrl, sql: &str, params: &[Param]) -> ResultSet {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = match ReadOnly::open(db).await {
            Ok(ro) => {
                let r = ro.run(sql, params).await.map_err(|e| e.to_string());
                ro.close().await;
                r
            }
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(rs) => return rs,
            Err(e) => {
                assert!(Instant::now() < deadline, "query `{sql}`: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Runs one statement as the server's superuser (`CREATE DATABASE` refuses a transaction
/// block, so one statement per call).
async fn admin(server: &PgServer, db: &str, sql: &str) {
    let url = format!("postgres://listenscope@127.0.0.1:{}/{db}", server.port);
    let mut c = PgConnection::connect(&url).await.expect("connect as admin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = c.close().await;
}

/// A new database for the collector, in `tablespace` if given, where every commit waits
/// for its WAL to be written (so it survives a server crash).
async fn create_database(server: &PgServer, name: &str, tablespace: Option<&str>) -> DbUrl {
    let ts = tablespace
        .map(|t| format!(" TABLESPACE {t}"))
        .unwrap_or_default();
    admin(server, "postgres", &format!("CREATE DATABASE {name}{ts}")).await;
    admin(
        server,
        "postgres",
        &format!("ALTER DATABASE {name} SET synchronous_commit = on"),
    )
    .await;
    let db = DbUrl::Postgres(format!(
        "postgres://listenscope@127.0.0.1:{}/{name}",
        server.port
    ));
    let rs = q(&db, "SELECT current_setting('synchronous_commit')", &[]).await;
    assert_eq!(rs.rows[0][0], Value::from("on"), "synchronous_commit");
    db
}

/// What the agent itself sees in `ns` now (`listenscope-agent scan --json`).
fn agent_scan(ns: &HostNs) -> BTreeSet<Key> {
    let out = tokio::task::block_in_place(|| {
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(agent_bin())
            .args(["scan", "--json", "--netns", "current"])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "scan in {}: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let scan: Value = serde_json::from_slice(&out.stdout).unwrap();
    scan["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            key(
                l["protocol"].as_str().unwrap(),
                l["address"].as_str().unwrap(),
                l["port"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The host's live rows as committed in the database.
async fn stored(db: &DbUrl, host: &str) -> BTreeSet<Key> {
    q(
        db,
        "SELECT protocol, address, port FROM current_listeners WHERE host = $1",
        &[text(host)],
    )
    .await
    .rows
    .iter()
    .map(|r| {
        key(
            r[0].as_str().unwrap(),
            r[1].as_str().unwrap(),
            r[2].as_i64().unwrap(),
        )
    })
    .collect()
}

/// The host's committed sequence and live row count, as another connection sees them.
async fn committed(db: &DbUrl, host: &str) -> (i64, i64) {
    let rs = q(
        db,
        "SELECT h.committed_seq,
                (SELECT count(*) FROM listener l WHERE l.host_id = h.id AND l.valid_to IS NULL)
         FROM host h WHERE h.name = $1",
        &[text(host)],
    )
    .await;
    match rs.rows.first() {
        Some(r) => (r[0].as_i64().unwrap(), r[1].as_i64().unwrap()),
        None => (0, 0),
    }
}

async fn store_matches_scan(db: &DbUrl, host: &str, ns: &HostNs) -> Result<(), String> {
    let real = agent_scan(ns);
    let have = stored(db, host).await;
    if have == real {
        return Ok(());
    }
    Err(format!(
        "{host}: stored but not real {:?}; real but not stored {:?}",
        have.difference(&real).collect::<Vec<_>>(),
        real.difference(&have).collect::<Vec<_>>()
    ))
}

/// `tcp :::port` for each port: how the hand-driven clients' listeners are stored.
fn raw_keys(ports: impl IntoIterator<Item = u32>) -> BTreeSet<Key> {
    ports
        .into_iter()
        .map(|p| key("tcp", "::", i64::from(p)))
        .collect()
}

/// The next answer on a hand-driven session. Longer than `RawSession::recv`'s 10s: while
/// the server is down the collector waits (up to its pool's 30s acquire timeout) for a
/// connection before it answers.
async fn recv(s: &mut RawSession) -> Result<Option<v1::collector_message::Body>, Status> {
    match tokio::time::timeout(Duration::from_secs(60), s.rx.message()).await {
        Ok(r) => r.map(|m| m.and_then(|m| m.body)),
        Err(_) => panic!("no answer from the collector within 60s"),
    }
}

/// Sends on a hand-driven session; Err once the collector has ended the stream.
async fn send(s: &RawSession, m: v1::AgentMessage) -> Result<(), String> {
    s.tx.send(m)
        .await
        .map_err(|_| "the stream is closed".to_string())
}

/// Opens a protocol session as `host` and reads the Welcome: its `resume_after`, or the
/// status the collector ended the stream with.
async fn open_raw(
    pki: &Pki,
    addr: SocketAddr,
    host: &str,
    session: u8,
    acked: u64,
) -> Result<(RawSession, Option<u64>), Status> {
    let mut s = try_session_as(pki, addr, host, hello(session, acked, host)).await?;
    match recv(&mut s).await? {
        Some(v1::collector_message::Body::Welcome(w)) => Ok((s, w.resume_after)),
        None => Err(Status::unavailable("stream ended before Welcome")),
        Some(other) => panic!("{host}: expected Welcome, got {other:?}"),
    }
}

/// A hand-driven agent: the messages it has not had acknowledged, resent like the real
/// agent does, and every Ack checked against the database at once.
struct RawAgent {
    host: &'static str,
    session: u8,
    acked: u64,
    pending: Vec<(u64, v1::AgentMessage)>,
}

impl RawAgent {
    fn new(host: &'static str, session: u8, first: v1::AgentMessage) -> RawAgent {
        RawAgent {
            host,
            session,
            acked: 0,
            pending: vec![(1, first)],
        }
    }

    /// Reads the collector's answers until everything pending is acknowledged (Ok), or
    /// the collector ends the stream with UNAVAILABLE (Err: the store failed). Every Ack
    /// must already be visible to another connection: acknowledged means committed.
    async fn read_acks(&mut self, s: &mut RawSession, db: &DbUrl) -> Result<(), String> {
        let host = self.host;
        while let Some(&(seq, _)) = self.pending.first() {
            match recv(s).await {
                Ok(Some(v1::collector_message::Body::Ack(a))) => {
                    assert_eq!(a.sequence, seq, "{host}: acks come in order");
                    let (c, rows) = committed(db, host).await;
                    assert!(
                        c >= a.sequence as i64,
                        "{host}: the collector acknowledged sequence {} but the database's \
                         committed_seq is {c} ({rows} live rows): acknowledged, not committed",
                        a.sequence
                    );
                    self.acked = a.sequence;
                    self.pending.remove(0);
                }
                Err(st) if st.code() == Code::Unavailable => {
                    return Err(format!("sequence {seq}: {st}"));
                }
                other => panic!("{host}: sequence {seq}: expected Ack, got {other:?}"),
            }
        }
        Ok(())
    }

    /// The Welcome's `resume_after` acknowledges too: everything up to it is committed.
    async fn check_resume(&mut self, resume: Option<u64>, db: &DbUrl) {
        let host = self.host;
        match resume {
            Some(r) => {
                assert!(
                    r >= self.acked,
                    "{host}: the collector acknowledged up to {} but now resumes after {r}",
                    self.acked
                );
                let (c, rows) = committed(db, host).await;
                assert!(
                    c >= r as i64,
                    "{host}: the collector's Welcome resumes after sequence {r} but the \
                     database's committed_seq is {c} ({rows} live rows): acknowledged, not \
                     committed"
                );
                self.acked = r;
                self.pending.retain(|p| p.0 > r);
            }
            None => assert_eq!(
                self.acked, 0,
                "{host}: the collector acknowledged up to {} but no longer knows the session \
                 (Welcome without resume_after)",
                self.acked
            ),
        }
    }

    /// One session: Hello with what was acknowledged, resend what was not, read the
    /// answers. Err: the collector answered UNAVAILABLE.
    async fn attempt(&mut self, pki: &Pki, addr: SocketAddr, db: &DbUrl) -> Result<(), String> {
        let host = self.host;
        let (mut s, resume) = match open_raw(pki, addr, host, self.session, self.acked).await {
            Ok(x) => x,
            Err(st) if st.code() == Code::Unavailable => return Err(format!("hello: {st}")),
            Err(st) => panic!("{host}: session refused: {st}"),
        };
        self.check_resume(resume, db).await;
        for (_, m) in &self.pending {
            send(&s, m.clone()).await?;
        }
        self.read_acks(&mut s, db).await
    }

    /// Delivers everything pending, retrying while the collector answers UNAVAILABLE (for
    /// at most `secs`).
    async fn deliver(&mut self, pki: &Pki, addr: SocketAddr, db: &DbUrl, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Err(e) = self.attempt(pki, addr, db).await {
            assert!(
                Instant::now() < deadline,
                "{}: could not deliver sequences {:?} within {secs}s; last error: {e}",
                self.host,
                self.pending.iter().map(|p| p.0).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Opens a session (the collector must resume it where acknowledged) for sending later.
    async fn open(&mut self, pki: &Pki, addr: SocketAddr, db: &DbUrl) -> RawSession {
        let (s, resume) = open_raw(pki, addr, self.host, self.session, self.acked)
            .await
            .unwrap_or_else(|st| panic!("{}: session: {st}", self.host));
        assert_eq!(resume, Some(self.acked), "{}: resume_after", self.host);
        self.check_resume(resume, db).await;
        s
    }
}

/// What the load client streamed.
struct Load {
    agent: RawAgent,
    /// Its ports live once everything it sent is stored.
    live: BTreeSet<u32>,
    /// Sessions that ended in UNAVAILABLE (or could not be opened).
    failures: Vec<String>,
}

/// Host `h5`: one delta after another (each opens or closes a listener), the next sent as
/// soon as the previous is acknowledged, reconnecting and resending after a failure. Every
/// Ack is checked against the database (retried while the server is down). Runs until
/// `stop`, then delivers what is still pending.
async fn load(pki: Arc<Pki>, addr: SocketAddr, db: DbUrl, stop: Arc<AtomicBool>) -> Load {
    let mut agent = RawAgent::new("h5", 5, snapshot(1, vec![listener("h5-ns", 5000)]));
    let mut live = BTreeSet::from([5000u32]);
    let mut seq = 1u64;
    let mut failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    'session: loop {
        assert!(
            Instant::now() < deadline,
            "h5: the load did not finish within 300s; failures: {failures:?}"
        );
        if stop.load(Ordering::SeqCst) && agent.pending.is_empty() {
            break;
        }
        let (mut s, resume) = match open_raw(&pki, addr, "h5", 5, agent.acked).await {
            Ok(x) => x,
            Err(st) if st.code() == Code::Unavailable => {
                failures.push(format!("hello: {}", st.message()));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(st) => panic!("h5: session refused: {st}"),
        };
        agent.check_resume(resume, &db).await;
        for (_, m) in &agent.pending {
            if let Err(e) = send(&s, m.clone()).await {
                failures.push(e);
                continue 'session;
            }
        }
        loop {
            if let Err(e) = agent.read_acks(&mut s, &db).await {
                failures.push(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'session;
            }
            if stop.load(Ordering::SeqCst) {
                break 'session;
            }
            seq += 1;
            let port = 5001 + (seq % 16) as u32;
            let m = if live.remove(&port) {
                delta(seq, vec![], vec![listener("h5-ns", port).key.unwrap()])
            } else {
                live.insert(port);
                delta(seq, vec![listener("h5-ns", port)], vec![])
            };
            agent.pending.push((seq, m.clone()));
            if let Err(e) = send(&s, m).await {
                failures.push(e);
                continue 'session;
            }
        }
    }
    Load {
        agent,
        live,
        failures,
    }
}

/// Sends SIGTERM and waits (bounded) for the process to exit.
fn stop_gracefully(p: &mut Proc, secs: u64) -> std::process::ExitStatus {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = p.0.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "the collector did not exit within {secs}s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Change events of `host` for one listener: (change, at).
async fn events(db: &DbUrl, host: &str, k: &Key) -> Vec<(String, String)> {
    q(
        db,
        "SELECT change, at FROM listener_changes
         WHERE host = $1 AND protocol = $2 AND address = $3 AND port = $4 ORDER BY at",
        &[text(host), text(&k.0), text(&k.1), Param::Int(Some(k.2))],
    )
    .await
    .rows
    .iter()
    .map(|r| {
        (
            r[0].as_str().unwrap().to_string(),
            r[1].as_str().unwrap().to_string(),
        )
    })
    .collect()
}

/// The changes made to one host during a fault, and when the fault began and ended.
#[derive(Default)]
struct Changed {
    opened: Vec<Key>,
    closed: Vec<Key>,
    from: String,
    to: String,
}

type Socks = Vec<(Key, socket2::Socket)>;

/// Opens a listener inside `ns` and notes it.
fn open(
    ns: &HostNs,
    socks: &mut Socks,
    c: &mut Changed,
    proto: &str,
    addr: &'static str,
    port: u16,
    v6only: Option<bool>,
) {
    let s = ns.enter(|| match proto {
        "tcp" => tcp_listener(addr, port, v6only),
        _ => udp_socket(addr, port, v6only),
    });
    let k = key(proto, addr, i64::from(port));
    socks.push((k.clone(), s));
    c.opened.push(k);
}

/// Closes a listener and notes it.
fn close(socks: &mut Socks, k: &Key, c: &mut Changed) {
    let i = socks.iter().position(|(s, _)| s == k).unwrap();
    socks.remove(i);
    c.closed.push(k.clone());
}

/// Each change made during the fault is stored exactly once, with a time inside the
/// fault (the time the agent observed it, not the time it was finally stored).
async fn check_events(db: &DbUrl, host: &str, c: &Changed) {
    let (from, to) = (&c.from, &c.to);
    for (kind, keys) in [("opened", &c.opened), ("closed", &c.closed)] {
        for k in keys {
            let ev = events(db, host, k).await;
            let at: Vec<&String> = ev
                .iter()
                .filter(|(change, _)| change == kind)
                .map(|(_, at)| at)
                .collect();
            assert_eq!(
                at.len(),
                1,
                "{host}: {k:?} should be {kind} exactly once; its events: {ev:?}"
            );
            assert!(
                at[0].as_str() >= from.as_str() && at[0].as_str() <= to.as_str(),
                "{host}: {k:?} {kind} at {}, but it happened during the fault ({from} – {to}): \
                 its delta was lost and replaced by a later snapshot",
                at[0]
            );
        }
    }
}

/// The agent never had to start over from a snapshot after its first connection: the
/// collector always proved continuity, so every queued delta was delivered.
fn assert_no_snapshot_restart(host: &str, log: &str) {
    let needs = log
        .lines()
        .filter(|l| l.contains("Collector needs a snapshot"))
        .count();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("Collector asked for a resync")
                || l.contains("exceeded max_pending_changes")
                || l.contains("refused a message as invalid")
        })
        .collect();
    assert!(
        needs == 1 && bad.is_empty(),
        "{host}: the agent had to start over from a snapshot ({needs} Welcomes without \
         resume_after, first connection included; {bad:#?}): the collector lost what it had \
         acknowledged or asked for a resync"
    );
}

fn connects(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("Connected to collector."))
        .collect()
}

async fn no_duplicate_live_rows(db: &DbUrl) {
    let dups = q(
        db,
        "SELECT host, netns, protocol, family, address, port, count(*) FROM current_listeners
         GROUP BY host, netns, protocol, family, address, port, interface, v6only
         HAVING count(*) > 1",
        &[],
    )
    .await
    .rows;
    assert!(dups.is_empty(), "duplicate live rows: {dups:?}");
}

/// No connection to the database sits in an aborted transaction or in one open for over
/// 10s: the collector's transactions last milliseconds, so such a one was left behind.
async fn no_transaction_left_open(db: &DbUrl) {
    converge(30, "no transaction left open on the database", || async {
        let rs = q(
            db,
            "SELECT pid, state, xact_start, query FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND (state = 'idle in transaction (aborted)'
                    OR xact_start < now() - interval '10 seconds')",
            &[],
        )
        .await;
        match rs.rows.is_empty() {
            true => Ok(()),
            false => Err(format!("{:?}", rs.rows)),
        }
    })
    .await;
}

/// The collector, two real agents in their namespaces with real listeners, both first
/// snapshots stored. Fields drop in order: processes before the namespaces.
struct Fleet {
    collector: Proc,
    _agents: Vec<Proc>,
    a_socks: Socks,
    b_socks: Socks,
    a: HostNs,
    b: HostNs,
    listen: SocketAddr,
    /// Where the hand-driven clients connect.
    raw: SocketAddr,
    logs: PathBuf,
}

impl Fleet {
    async fn start(pki: &Pki, db: &DbUrl, logs: &Path) -> Fleet {
        let a = HostNs::new();
        let b = HostNs::new();
        let port = free_port("0.0.0.0").port();
        let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
        let raw: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let collector = spawn_collector(pki, db, listen, None, &logs.join("collector-1.log"));
        wait_listening(raw).await;
        let a_socks = a.enter(|| {
            vec![
                (key("tcp", "0.0.0.0", 22), tcp_listener("0.0.0.0", 22, None)),
                (key("tcp", "::", 22), tcp_listener("::", 22, Some(true))),
                (key("tcp", "::", 80), tcp_listener("::", 80, Some(false))),
            ]
        });
        let b_socks = b.enter(|| {
            vec![
                (key("tcp", "0.0.0.0", 80), tcp_listener("0.0.0.0", 80, None)),
                (key("udp", "::", 53), udp_socket("::", 53, Some(false))),
            ]
        });
        let ca = |ns: &HostNs| -> SocketAddr { format!("{}:{port}", ns.host_ip).parse().unwrap() };
        let agents = vec![
            a.spawn_agent(pki, "h1", ca(&a), &logs.join("agent-h1.log")),
            b.spawn_agent(pki, "h2", ca(&b), &logs.join("agent-h2.log")),
        ];
        let fleet = Fleet {
            collector,
            _agents: agents,
            a_socks,
            b_socks,
            a,
            b,
            listen,
            raw,
            logs: logs.to_path_buf(),
        };
        converge(30, "both agents' first snapshots stored", || async {
            fleet.matches_scans(db).await?;
            match committed(db, "h1").await.0 > 0 && committed(db, "h2").await.0 > 0 {
                true => Ok(()),
                false => Err("no snapshot committed yet".into()),
            }
        })
        .await;
        fleet
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    async fn matches_scans(&self, db: &DbUrl) -> Result<(), String> {
        store_matches_scan(db, "h1", &self.a).await?;
        store_matches_scan(db, "h2", &self.b).await
    }

    /// The store converges to reality by itself, without a restart; the test's model of
    /// the namespaces is right; each hand-driven host holds what it was acknowledged for.
    async fn check_recovered(&self, db: &DbUrl, raws: &[(&str, BTreeSet<Key>)], secs: u64) {
        converge(
            secs,
            "the store equals every host's real listeners",
            || async {
                self.matches_scans(db).await?;
                for (host, want) in raws {
                    let have = stored(db, host).await;
                    if &have != want {
                        return Err(format!("{host} stored {have:?}, not {want:?}"));
                    }
                }
                Ok(())
            },
        )
        .await;
        let model =
            |socks: &Socks| -> BTreeSet<Key> { socks.iter().map(|(k, _)| k.clone()).collect() };
        assert_eq!(
            agent_scan(&self.a),
            model(&self.a_socks),
            "the test's model of h1"
        );
        assert_eq!(
            agent_scan(&self.b),
            model(&self.b_socks),
            "the test's model of h2"
        );
        no_duplicate_live_rows(db).await;
        no_transaction_left_open(db).await;
    }

    /// Graceful restart of the collector on the same database: every session resumes where
    /// it was acknowledged, the store still equals reality, no event went missing.
    async fn graceful_restart(
        &mut self,
        pki: &Pki,
        db: &DbUrl,
        raws: &[(&RawAgent, BTreeSet<Key>)],
        changed: &[(&str, &Changed)],
    ) {
        let before: Vec<usize> = ["h1", "h2"]
            .iter()
            .map(|h| connects(&read(&self.log(&format!("agent-{h}.log")))).len())
            .collect();
        let st = stop_gracefully(&mut self.collector, 30);
        assert_eq!(st.code(), Some(0), "graceful stop: {st:?}");
        self.collector = spawn_collector(pki, db, self.listen, None, &self.log("collector-2.log"));
        wait_listening(self.raw).await;

        for (agent, _) in raws {
            let (_s, resume) = open_raw(pki, self.raw, agent.host, agent.session, agent.acked)
                .await
                .unwrap_or_else(|st| panic!("{}: after the restart: {st}", agent.host));
            assert!(
                resume.is_some_and(|r| r >= agent.acked),
                "{}: acknowledged up to {} before the restart; after it the collector resumes \
                 after {resume:?}: acknowledged data was lost",
                agent.host,
                agent.acked
            );
            let (c, _) = committed(db, agent.host).await;
            assert!(
                c >= agent.acked as i64,
                "{}: acknowledged up to {}, committed_seq {c}",
                agent.host,
                agent.acked
            );
        }
        for (i, h) in ["h1", "h2"].iter().enumerate() {
            let path = self.log(&format!("agent-{h}.log"));
            let n = before[i];
            converge(30, &format!("{h} reconnected after the restart"), || {
                let path = path.clone();
                async move {
                    match connects(&read(&path)).len() > n {
                        true => Ok(()),
                        false => Err("no new `Connected to collector.` line".into()),
                    }
                }
            })
            .await;
            let agent_log = read(&path);
            let last = *connects(&agent_log).last().unwrap();
            assert!(
                last.contains("resume_after=Some("),
                "{h}: after the restart the collector did not resume the agent's session, so \
                 it holds less than it acknowledged: {last}"
            );
            assert_no_snapshot_restart(h, &agent_log);
        }
        converge(
            30,
            "after the restart the store still equals reality",
            || async { self.matches_scans(db).await },
        )
        .await;
        for (agent, want) in raws {
            assert_eq!(&stored(db, agent.host).await, want, "{}", agent.host);
        }
        no_duplicate_live_rows(db).await;
        for (host, c) in changed {
            check_events(db, host, c).await;
        }
        let st = stop_gracefully(&mut self.collector, 30);
        assert_eq!(
            st.code(),
            Some(0),
            "graceful stop after the restart: {st:?}"
        );
    }
}

fn logs_to_show(logs: &Path, server: Option<&PgServer>) -> ShowLogsOnPanic {
    let mut v: Vec<PathBuf> = [
        "collector-1.log",
        "collector-2.log",
        "agent-h1.log",
        "agent-h2.log",
    ]
    .iter()
    .map(|n| logs.join(n))
    .collect();
    v.extend(server.map(PgServer::log_path));
    ShowLogsOnPanic(v)
}

const ENOSPC_LINES: [&str; 2] = ["No space left on device", "could not extend file"];

fn enospc_lines(p: &Path) -> usize {
    read(p)
        .lines()
        .filter(|l| ENOSPC_LINES.iter().any(|m| l.contains(m)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_tablespace_fills_up() {
    require_root();
    let started = Instant::now();
    let pki = Pki::new(&["h1", "h2", "h3", "h4"]);
    let logs = TempDir::new("pgfull-logs");
    // Declared before the server: dropped (unmounted) after it has stopped.
    let fs = Tmpfs::mount("32m");
    let ts_dir = fs.path().join("ts");
    std::fs::create_dir(&ts_dir).unwrap();
    std::os::unix::fs::chown(&ts_dir, Some(65534), Some(65534)).unwrap();
    let filler = fs.path().join("filler");
    let server = tokio::task::block_in_place(PgServer::start);
    let _show = logs_to_show(logs.path(), Some(&server));
    admin(
        &server,
        "postgres",
        &format!("CREATE TABLESPACE small LOCATION '{}'", ts_dir.display()),
    )
    .await;
    let db = create_database(&server, "pgfull", Some("small")).await;

    let mut fleet = Fleet::start(&pki, &db, logs.path()).await;
    let raw = fleet.raw;
    let collector_log = fleet.log("collector-1.log");

    // h3, driven by hand: its snapshot is acknowledged (and committed) before the disk fills.
    let mut h3 = RawAgent::new("h3", 3, snapshot(1, vec![listener("h3-ns", 1000)]));
    h3.deliver(&pki, raw, &db, 20).await;
    let mut h3_session = h3.open(&pki, raw, &db).await;

    // ---- The tablespace fills. ----
    let filled = fill(&filler);
    let probe = fs.path().join("probe");
    assert!(
        std::fs::write(&probe, b"x").is_err(),
        "the tmpfs still takes writes after {filled} bytes of filler"
    );
    let _ = std::fs::remove_file(&probe);
    let mut changed_a = Changed {
        from: fmt_time(OffsetDateTime::now_utc()),
        ..Changed::default()
    };
    let mut changed_b = Changed {
        from: changed_a.from.clone(),
        ..Changed::default()
    };
    let (a, b) = (&fleet.a, &fleet.b);
    let (a_socks, b_socks) = (&mut fleet.a_socks, &mut fleet.b_socks);

    // Listeners keep changing in both namespaces; each socket lives for over two scan
    // intervals (the agents scan every second), so the agents observe every change.
    // Round 1: open some that stay, some that will go; close ones stored before.
    for p in [7001, 7002] {
        open(a, a_socks, &mut changed_a, "tcp", "::", p, Some(false));
        open(b, b_socks, &mut changed_b, "udp", "0.0.0.0", p, None);
    }
    for p in 7101..=7103 {
        open(a, a_socks, &mut changed_a, "tcp", "0.0.0.0", p, None);
        open(b, b_socks, &mut changed_b, "tcp", "::", p, Some(true));
    }
    close(a_socks, &key("tcp", "0.0.0.0", 22), &mut changed_a);
    close(b_socks, &key("udp", "::", 53), &mut changed_b);

    // h3 sends a delta that needs new pages (300 rows) on the session it has open: the
    // store fails (or, should PostgreSQL find room, the Ack must be a real commit).
    let h3_d2 = delta(
        2,
        (1001..=1300).map(|p| listener("h3-ns", p)).collect(),
        vec![],
    );
    send(&h3_session, h3_d2.clone()).await.unwrap();
    h3.pending.push((2, h3_d2));
    let first_try = h3.read_acks(&mut h3_session, &db).await;
    drop(h3_session);
    h3.pending.push((
        3,
        delta(3, vec![], vec![listener("h3-ns", 1000).key.unwrap()]),
    ));

    converge(
        20,
        "a store failure while the tablespace is full",
        || async {
            match enospc_lines(&collector_log) > 0 {
                true => Ok(()),
                false => Err(format!(
                    "the collector has not logged any of {ENOSPC_LINES:?}"
                )),
            }
        },
    )
    .await;

    // Two more rounds of changes; h3 retries like an agent. The tmpfs stays full (topped
    // up again in case PostgreSQL freed some of its own files).
    let mut retries = vec![first_try];
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fill(&filler);
    retries.push(h3.attempt(&pki, raw, &db).await);
    // Round 2: the short-lived ones go, more come and go.
    for p in 7101..=7103 {
        close(a_socks, &key("tcp", "0.0.0.0", p), &mut changed_a);
        close(b_socks, &key("tcp", "::", p), &mut changed_b);
    }
    for p in 7201..=7203 {
        open(a, a_socks, &mut changed_a, "udp", "::", p, Some(false));
        open(b, b_socks, &mut changed_b, "tcp", "0.0.0.0", p, None);
    }
    close(a_socks, &key("tcp", "::", 7002), &mut changed_a);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fill(&filler);
    retries.push(h3.attempt(&pki, raw, &db).await);
    // Round 3.
    for p in 7201..=7203 {
        close(a_socks, &key("udp", "::", p), &mut changed_a);
        close(b_socks, &key("tcp", "0.0.0.0", p), &mut changed_b);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fill(&filler);
    retries.push(h3.attempt(&pki, raw, &db).await);
    let full_log_lines = enospc_lines(&collector_log);
    let store_failures = count_lines(&collector_log, "Store failure");

    // ---- Space returns. The collector is not restarted. ----
    std::fs::remove_file(&filler).unwrap();
    changed_a.to = fmt_time(OffsetDateTime::now_utc());
    changed_b.to = changed_a.to.clone();

    // h3's lost delta and one more are acknowledged, and each Ack is already committed.
    h3.deliver(&pki, raw, &db, 60).await;
    // A host that first connects now: its acknowledged snapshot is committed.
    let mut h4 = RawAgent::new("h4", 4, snapshot(1, vec![listener("h4-ns", 4000)]));
    h4.deliver(&pki, raw, &db, 60).await;

    let h3_want = raw_keys(1001..=1300);
    let h4_want = raw_keys([4000]);
    fleet
        .check_recovered(&db, &[("h3", h3_want.clone()), ("h4", h4_want.clone())], 60)
        .await;
    // No change observed while the tablespace was full is lost or re-timed.
    for (host, c) in [("h1", &changed_a), ("h2", &changed_b)] {
        assert_no_snapshot_restart(host, &read(&fleet.log(&format!("agent-{host}.log"))));
        check_events(&db, host, c).await;
    }

    // ---- Graceful restart on the same database: everything acknowledged is there. ----
    fleet
        .graceful_restart(
            &pki,
            &db,
            &[(&h3, h3_want), (&h4, h4_want)],
            &[("h1", &changed_a), ("h2", &changed_b)],
        )
        .await;
    let refused: Vec<usize> = ["h1", "h2"]
        .iter()
        .map(|h| count_lines(&fleet.log(&format!("agent-{h}.log")), "storage failed"))
        .collect();
    eprintln!(
        "pg_tablespace_fills_up: {filled} bytes of filler; {full_log_lines} ENOSPC log lines, \
         {store_failures} store failures while full; storage failures seen by h1, h2: \
         {refused:?}; h3 while full: {retries:?}; {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
}

/// Locks host `host`'s row in a prepared transaction `gid`: the collector's next
/// transaction for that host waits for it (its `SELECT … FOR UPDATE`). Unlike a session's
/// lock, a prepared transaction's survives the server's shutdown and crash: the waiting
/// transaction cannot get the row while the server goes down, so it is certain to fail
/// in flight. [`unlock_host_row`] ends it.
async fn lock_host_row(db: &DbUrl, host: &str, gid: &str) {
    let DbUrl::Postgres(url) = db else {
        unreachable!()
    };
    let mut c = PgConnection::connect(url).await.expect("connect to lock");
    sqlx::raw_sql("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query("SELECT id FROM host WHERE name = $1 FOR UPDATE")
        .bind(host)
        .fetch_one(&mut c)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE TRANSACTION '{gid}'")))
        .execute(&mut c)
        .await
        .unwrap();
    let _ = c.close().await;
}

async fn unlock_host_row(db: &DbUrl, gid: &str) {
    let DbUrl::Postgres(url) = db else {
        unreachable!()
    };
    let mut c = PgConnection::connect(url).await.expect("connect to unlock");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}'")))
        .execute(&mut c)
        .await
        .unwrap();
    let _ = c.close().await;
}

/// One outage under load: a transaction of the collector for h3 is caught in flight
/// (waiting for a row lock), the server stops `how`, listeners change in both namespaces
/// for a few seconds while it is down, then it starts again on the same data directory
/// and port. Returns the changes, what h3's in-flight message got (UNAVAILABLE, asserted)
/// and the store failures the collector logged.
#[allow(clippy::too_many_arguments)]
async fn outage(
    how: Shutdown,
    ports: u16,
    server: &mut PgServer,
    pki: &Pki,
    db: &DbUrl,
    fleet: &mut Fleet,
    h3: &mut RawAgent,
    h3_port: u32,
) -> (Changed, Changed, Result<(), String>, usize) {
    let collector_log = fleet.log("collector-1.log");
    let failures_before = count_lines(&collector_log, "Store failure");
    let mut h3_session = h3.open(pki, fleet.raw, db).await;
    let gid = format!("lock-h3-{how:?}");
    lock_host_row(db, "h3", &gid).await;
    let seq = h3.acked + 1;
    let m = delta(seq, vec![listener("h3-ns", h3_port)], vec![]);
    h3.pending.push((seq, m.clone()));
    send(&h3_session, m).await.unwrap();
    converge(
        20,
        "the collector's transaction for h3 waits for the row lock",
        || async {
            let rs = q(
                db,
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%FROM host WHERE id = $1 FOR UPDATE%'",
                &[],
            )
            .await;
            match rs.rows[0][0].as_i64() {
                Some(n) if n > 0 => Ok(()),
                _ => Err("no transaction waits for the lock on h3's row".into()),
            }
        },
    )
    .await;

    // ---- The server goes. ----
    let from = fmt_time(OffsetDateTime::now_utc());
    tokio::task::block_in_place(|| server.stop(how));
    let mut changed_a = Changed {
        from: from.clone(),
        ..Changed::default()
    };
    let mut changed_b = Changed {
        from,
        ..Changed::default()
    };
    // The transaction caught in flight fails while the server is down.
    converge(20, "a store failure while the server is down", || async {
        match count_lines(&collector_log, "Store failure") > failures_before {
            true => Ok(()),
            false => Err("the collector has logged no new `Store failure`".into()),
        }
    })
    .await;
    let (a, b) = (&fleet.a, &fleet.b);
    let (a_socks, b_socks) = (&mut fleet.a_socks, &mut fleet.b_socks);
    // Changes while the server is down: some stay, some come and go.
    open(
        a,
        a_socks,
        &mut changed_a,
        "tcp",
        "::",
        ports + 1,
        Some(false),
    );
    open(
        b,
        b_socks,
        &mut changed_b,
        "udp",
        "0.0.0.0",
        ports + 1,
        None,
    );
    for p in ports + 101..=ports + 102 {
        open(a, a_socks, &mut changed_a, "tcp", "0.0.0.0", p, None);
        open(b, b_socks, &mut changed_b, "tcp", "::", p, Some(true));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for p in ports + 101..=ports + 102 {
        close(
            a_socks,
            &key("tcp", "0.0.0.0", i64::from(p)),
            &mut changed_a,
        );
        close(b_socks, &key("tcp", "::", i64::from(p)), &mut changed_b);
    }
    open(
        a,
        a_socks,
        &mut changed_a,
        "udp",
        "::",
        ports + 201,
        Some(false),
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!server.is_running(), "the server came back by itself");

    // ---- The server returns, on the same data directory and port. ----
    let to = fmt_time(OffsetDateTime::now_utc());
    changed_a.to = to.clone();
    changed_b.to = to;
    tokio::task::block_in_place(|| server.restart());
    unlock_host_row(db, &gid).await;
    // It failed: the server went down while it waited for the row.
    let in_flight = h3.read_acks(&mut h3_session, db).await;
    drop(h3_session);
    assert!(
        in_flight.is_err(),
        "h3: sequence {seq} was acknowledged, but its transaction was cut by the {how:?} stop"
    );
    let failures = count_lines(&collector_log, "Store failure") - failures_before;
    (changed_a, changed_b, in_flight, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_server_stops_and_restarts() {
    require_root();
    let started = Instant::now();
    let pki = Arc::new(Pki::new(&["h1", "h2", "h3", "h4", "h5"]));
    let logs = TempDir::new("pgdown-logs");
    let mut server = tokio::task::block_in_place(PgServer::start);
    let _show = logs_to_show(logs.path(), Some(&server));
    // Prepared transactions (for `lock_host_row`) take a restart to enable.
    admin(
        &server,
        "postgres",
        "ALTER SYSTEM SET max_prepared_transactions = 4",
    )
    .await;
    tokio::task::block_in_place(|| {
        server.stop(Shutdown::Fast);
        server.restart();
    });
    let db = create_database(&server, "pgdown", None).await;

    let mut fleet = Fleet::start(&pki, &db, logs.path()).await;
    let raw = fleet.raw;

    let mut h3 = RawAgent::new("h3", 3, snapshot(1, vec![listener("h3-ns", 1000)]));
    h3.deliver(&pki, raw, &db, 20).await;

    // The load: h5 streams deltas for as long as the outages last.
    let stop = Arc::new(AtomicBool::new(false));
    let load_task = tokio::spawn(load(pki.clone(), raw, db.clone(), stop.clone()));
    converge(20, "h5's load under way", || async {
        match committed(&db, "h5").await.0 > 5 {
            true => Ok(()),
            false => Err("h5 has fewer than 5 messages committed".into()),
        }
    })
    .await;

    // ---- A fast shutdown, then a crash. ----
    let (fast_a, fast_b, fast_h3, fast_failures) = outage(
        Shutdown::Fast,
        7000,
        &mut server,
        &pki,
        &db,
        &mut fleet,
        &mut h3,
        1001,
    )
    .await;
    h3.pending.push((
        3,
        delta(3, vec![], vec![listener("h3-ns", 1000).key.unwrap()]),
    ));
    h3.deliver(&pki, raw, &db, 60).await;
    let fast_load = committed(&db, "h5").await.0;
    converge(30, "h5's load going on after the restart", || async {
        match committed(&db, "h5").await.0 > fast_load + 5 {
            true => Ok(()),
            false => Err("h5 has not had 5 more messages committed".into()),
        }
    })
    .await;

    let (crash_a, crash_b, crash_h3, crash_failures) = outage(
        Shutdown::Crash,
        8000,
        &mut server,
        &pki,
        &db,
        &mut fleet,
        &mut h3,
        1002,
    )
    .await;
    h3.pending.push((
        5,
        delta(5, vec![], vec![listener("h3-ns", 1001).key.unwrap()]),
    ));
    h3.deliver(&pki, raw, &db, 60).await;
    let crash_load = committed(&db, "h5").await.0;
    converge(30, "h5's load going on after the crash", || async {
        match committed(&db, "h5").await.0 > crash_load + 5 {
            true => Ok(()),
            false => Err("h5 has not had 5 more messages committed".into()),
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let load = tokio::time::timeout(Duration::from_secs(120), load_task)
        .await
        .expect("the load stops within 120s")
        .expect("the load task");
    assert!(load.agent.pending.is_empty());

    // A host that first connects now: its acknowledged snapshot is committed.
    let mut h4 = RawAgent::new("h4", 4, snapshot(1, vec![listener("h4-ns", 4000)]));
    h4.deliver(&pki, raw, &db, 60).await;

    // ---- The collector was never restarted: it recovered by itself. ----
    let h3_want = raw_keys([1002]);
    let h4_want = raw_keys([4000]);
    let h5_want = raw_keys(load.live.iter().copied());
    fleet
        .check_recovered(
            &db,
            &[
                ("h3", h3_want.clone()),
                ("h4", h4_want.clone()),
                ("h5", h5_want.clone()),
            ],
            60,
        )
        .await;
    let (h5_seq, _) = committed(&db, "h5").await;
    assert_eq!(h5_seq, load.agent.acked as i64, "h5: committed_seq");
    let changed = [
        ("h1", &fast_a),
        ("h2", &fast_b),
        ("h1", &crash_a),
        ("h2", &crash_b),
    ];
    for host in ["h1", "h2"] {
        assert_no_snapshot_restart(host, &read(&fleet.log(&format!("agent-{host}.log"))));
    }
    for (host, c) in &changed {
        check_events(&db, host, c).await;
    }

    fleet
        .graceful_restart(
            &pki,
            &db,
            &[(&h3, h3_want), (&h4, h4_want), (&load.agent, h5_want)],
            &changed,
        )
        .await;
    let refused: Vec<usize> = ["h1", "h2"]
        .iter()
        .map(|h| count_lines(&fleet.log(&format!("agent-{h}.log")), "storage failed"))
        .collect();
    eprintln!(
        "pg_server_stops_and_restarts: store failures logged: {fast_failures} (fast shutdown), \
         {crash_failures} (crash); h3's in-flight message: {fast_h3:?} (fast), {crash_h3:?} \
         (crash); h5 streamed {} messages, {} failed sessions; storage failures seen by h1, \
         h2: {refused:?}; {:.1}s in all",
        load.agent.acked,
        load.failures.len(),
        started.elapsed().as_secs_f64()
    );
}
