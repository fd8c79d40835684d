//! The collector's SQLite database fills its disk, then gets space back.
//!
//! A real collector on a database inside a small tmpfs, real agents in their own network
//! namespaces, and two hand-driven protocol clients (`h3`, `h4`) whose acknowledgements
//! the test sees directly. The tmpfs is filled to ENOSPC while listeners keep changing,
//! so stores fail with `database or disk is full`; then the filler goes. Without a
//! restart the collector must recover by itself:
//! - every acknowledged sequence is committed (a separate connection sees it at once);
//! - the store converges to what each agent's own scan shows, with no duplicate rows;
//! - no transaction is left open on the database (an outside `BEGIN IMMEDIATE` works);
//! - no change observed during the full period is lost, and each keeps its observation
//!   time (the agent keeps every unacknowledged delta and the collector never has to ask
//!   it for a snapshot, see docs/protocol.md and agent/src/transport/outbox.rs);
//! - after a graceful restart the database still holds everything acknowledged: the
//!   collector resumes every session where the agents' acknowledgements say.

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
use std::time::{Duration, Instant};

use listenscope_collector::query::Param;
use listenscope_collector::store::DbUrl;
use listenscope_collector::timefmt::format as fmt_time;
use listenscope_proto::v1;
use serde_json::Value;
use time::OffsetDateTime;
use tonic::{Code, Status};
use util::*;

/// (protocol, address, port): how a listener is compared between the store and a scan.
type Key = (String, String, i64);

fn key(proto: &str, addr: &str, port: i64) -> Key {
    (proto.to_string(), addr.to_string(), port)
}

/// A tmpfs mounted on a fresh directory; unmounted (lazily if still busy) on drop, then
/// the directory goes.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = TempDir::new("diskfull-fs");
        let target = dir.path().to_str().unwrap().to_string();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
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

/// On a failing test, the tail of each log (the temp directory holding them goes).
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

/// The host's live rows as committed in the database (a fresh read-only connection).
async fn stored(db: &DbUrl, host: &str) -> BTreeSet<Key> {
    query(
        db,
        "SELECT protocol, address, port FROM current_listeners WHERE host = ?1",
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
    let rs = query(
        db,
        "SELECT h.committed_seq,
                (SELECT count(*) FROM listener l WHERE l.host_id = h.id AND l.valid_to IS NULL)
         FROM host h WHERE h.name = ?1",
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

/// Takes SQLite's write lock from outside and gives it back: fails ("database is
/// locked") while another connection holds a write transaction open.
async fn outside_write_lock(path: &Path) -> Result<(), String> {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::SqliteConnectOptions;
    let mut c = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let r = sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut c).await;
    let r = match r {
        Ok(_) => sqlx::raw_sql("ROLLBACK")
            .execute(&mut c)
            .await
            .map(|_| ())
            .map_err(|e| format!("ROLLBACK: {e}")),
        Err(e) => Err(format!("BEGIN IMMEDIATE: {e}")),
    };
    let _ = sqlx::Connection::close(c).await;
    r
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
    match s.recv().await? {
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
    /// Reads the collector's answers until everything pending is acknowledged (Ok), or
    /// the collector ends the stream with UNAVAILABLE (Err: the store failed). Every Ack
    /// must already be visible to another connection: acknowledged means committed.
    async fn read_acks(&mut self, s: &mut RawSession, db: &DbUrl) -> Result<(), String> {
        let host = self.host;
        while let Some(&(seq, _)) = self.pending.first() {
            match s.recv().await {
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

    /// One session: Hello with what was acknowledged, resend what was not, read the
    /// answers. Err: the collector answered UNAVAILABLE.
    async fn attempt(&mut self, pki: &Pki, addr: SocketAddr, db: &DbUrl) -> Result<(), String> {
        let host = self.host;
        let (mut s, resume) = match open_raw(pki, addr, host, self.session, self.acked).await {
            Ok(x) => x,
            Err(st) if st.code() == Code::Unavailable => return Err(format!("hello: {st}")),
            Err(st) => panic!("{host}: session refused: {st}"),
        };
        match resume {
            Some(r) => {
                assert!(
                    r >= self.acked,
                    "{host}: the collector acknowledged up to {} but now resumes after {r}",
                    self.acked
                );
                // resume_after acknowledges too: everything up to it is stored.
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
        for (_, m) in &self.pending {
            s.send(m.clone()).await;
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
    query(
        db,
        "SELECT change, at FROM listener_changes
         WHERE host = ?1 AND protocol = ?2 AND address = ?3 AND port = ?4 ORDER BY at",
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

/// The changes made to one host while the disk was full.
#[derive(Default)]
struct Changed {
    opened: Vec<Key>,
    closed: Vec<Key>,
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

/// Each change made during the full period is stored exactly once, with a time inside
/// that period (the time the agent observed it, not the time it was finally stored).
async fn check_events(db: &DbUrl, host: &str, c: &Changed, from: &str, to: &str) {
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
                at[0].as_str() >= from && at[0].as_str() <= to,
                "{host}: {k:?} {kind} at {}, but it happened while the disk was full ({from} – \
                 {to}): its delta was lost and replaced by a later snapshot",
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
    let dups = query(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_survives_a_full_disk() {
    require_root();
    let started = Instant::now();
    let pki = Pki::new(&["h1", "h2", "h3", "h4"]);
    let logs = TempDir::new("diskfull-logs");
    let log = |n: &str| logs.path().join(n);
    let _show = ShowLogsOnPanic(
        [
            "collector-1.log",
            "collector-2.log",
            "agent-h1.log",
            "agent-h2.log",
        ]
        .iter()
        .map(|n| log(n))
        .collect(),
    );
    // Declared before every process: dropped (unmounted) after they are killed.
    let fs = Tmpfs::mount("24m");
    let db_path = fs.path().join("ls.db");
    let db = DbUrl::Sqlite(db_path.clone());
    let filler = fs.path().join("filler");

    let a = HostNs::new();
    let b = HostNs::new();
    let port = free_port("0.0.0.0").port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let raw: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut collector = spawn_collector(&pki, &db, listen, None, &log("collector-1.log"));
    wait_listening(raw).await;

    // Real listeners in each namespace, each with the key it is compared by.
    let mut a_socks = a.enter(|| {
        vec![
            (key("tcp", "0.0.0.0", 22), tcp_listener("0.0.0.0", 22, None)),
            (key("tcp", "::", 22), tcp_listener("::", 22, Some(true))),
            (key("tcp", "::", 80), tcp_listener("::", 80, Some(false))),
        ]
    });
    let mut b_socks = b.enter(|| {
        vec![
            (key("tcp", "0.0.0.0", 80), tcp_listener("0.0.0.0", 80, None)),
            (key("udp", "::", 53), udp_socket("::", 53, Some(false))),
        ]
    });
    let ca = |ns: &HostNs| -> SocketAddr { format!("{}:{port}", ns.host_ip).parse().unwrap() };
    let _agent_a = a.spawn_agent(&pki, "h1", ca(&a), &log("agent-h1.log"));
    let _agent_b = b.spawn_agent(&pki, "h2", ca(&b), &log("agent-h2.log"));

    converge(30, "both agents' first snapshots stored", || async {
        store_matches_scan(&db, "h1", &a).await?;
        store_matches_scan(&db, "h2", &b).await?;
        match committed(&db, "h1").await.0 > 0 && committed(&db, "h2").await.0 > 0 {
            true => Ok(()),
            false => Err("no snapshot committed yet".into()),
        }
    })
    .await;

    // h3, driven by hand: its snapshot is acknowledged (and committed) before the disk fills.
    let h3_listener = |p: u32| listener("h3-ns", p);
    let mut h3 = RawAgent {
        host: "h3",
        session: 3,
        acked: 0,
        pending: vec![(1, snapshot(1, vec![h3_listener(1000)]))],
    };
    h3.deliver(&pki, raw, &db, 20).await;
    let (mut h3_session, resume) = open_raw(&pki, raw, "h3", 3, h3.acked)
        .await
        .expect("h3 reconnects");
    assert_eq!(resume, Some(1));

    // ---- The disk fills. ----
    let filled = fill(&filler);
    let probe = fs.path().join("probe");
    assert!(
        std::fs::write(&probe, b"x").is_err(),
        "the tmpfs still takes writes after {filled} bytes of filler"
    );
    let _ = std::fs::remove_file(&probe);
    let filled_at = OffsetDateTime::now_utc();

    // Listeners keep changing in both namespaces: the agents queue deltas the collector
    // cannot commit. Each socket lives for over two scan intervals (the agents scan every
    // second), so the agents observe every change.
    let mut changed_a = Changed::default();
    let mut changed_b = Changed::default();
    // Round 1: open some that stay, some that will go; close ones stored before.
    for p in [7001, 7002] {
        open(
            &a,
            &mut a_socks,
            &mut changed_a,
            "tcp",
            "::",
            p,
            Some(false),
        );
        open(&b, &mut b_socks, &mut changed_b, "udp", "0.0.0.0", p, None);
    }
    for p in 7101..=7103 {
        open(&a, &mut a_socks, &mut changed_a, "tcp", "0.0.0.0", p, None);
        open(&b, &mut b_socks, &mut changed_b, "tcp", "::", p, Some(true));
    }
    close(&mut a_socks, &key("tcp", "0.0.0.0", 22), &mut changed_a);
    close(&mut b_socks, &key("udp", "::", 53), &mut changed_b);

    // h3 sends a delta on the session it has open: the store fails (or, should the
    // collector find room, the Ack must be a real commit).
    let h3_d2 = delta(2, vec![h3_listener(1001)], vec![]);
    h3_session.send(h3_d2.clone()).await;
    h3.pending.push((2, h3_d2));
    let first_try = h3.read_acks(&mut h3_session, &db).await;
    drop(h3_session);
    h3.pending
        .push((3, delta(3, vec![], vec![h3_listener(1000).key.unwrap()])));

    converge(20, "a store failure while the disk is full", || async {
        match read(&log("collector-1.log")).contains("database or disk is full") {
            true => Ok(()),
            false => Err("the collector has not logged `database or disk is full`".into()),
        }
    })
    .await;

    // Two more rounds of changes; h3 retries like an agent. The disk stays full (topped
    // up again in case the collector freed some of its own files).
    let mut retries = vec![first_try];
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fill(&filler);
    retries.push(h3.attempt(&pki, raw, &db).await);
    // Round 2: the short-lived ones go, more come and go.
    for p in 7101..=7103 {
        close(&mut a_socks, &key("tcp", "0.0.0.0", p), &mut changed_a);
        close(&mut b_socks, &key("tcp", "::", p), &mut changed_b);
    }
    for p in 7201..=7203 {
        open(
            &a,
            &mut a_socks,
            &mut changed_a,
            "udp",
            "::",
            p,
            Some(false),
        );
        open(&b, &mut b_socks, &mut changed_b, "tcp", "0.0.0.0", p, None);
    }
    close(&mut a_socks, &key("tcp", "::", 7002), &mut changed_a);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fill(&filler);
    retries.push(h3.attempt(&pki, raw, &db).await);
    // Round 3.
    for p in 7201..=7203 {
        close(&mut a_socks, &key("udp", "::", p), &mut changed_a);
        close(&mut b_socks, &key("tcp", "0.0.0.0", p), &mut changed_b);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fill(&filler);
    retries.push(h3.attempt(&pki, raw, &db).await);
    let full_log_lines = read(&log("collector-1.log"))
        .lines()
        .filter(|l| l.contains("database or disk is full"))
        .count();

    // ---- Space returns. The collector is not restarted. ----
    std::fs::remove_file(&filler).unwrap();
    let unfilled_at = OffsetDateTime::now_utc();
    let (from, to) = (fmt_time(filled_at), fmt_time(unfilled_at));

    // h3's lost delta and one more are acknowledged, and each Ack is already committed.
    h3.deliver(&pki, raw, &db, 60).await;
    // A host that first connects now: its acknowledged snapshot is committed.
    let mut h4 = RawAgent {
        host: "h4",
        session: 4,
        acked: 0,
        pending: vec![(1, snapshot(1, vec![listener("h4-ns", 4000)]))],
    };
    h4.deliver(&pki, raw, &db, 60).await;

    // The store converges to reality, by itself.
    converge(
        60,
        "the store equals every host's real listeners",
        || async {
            store_matches_scan(&db, "h1", &a).await?;
            store_matches_scan(&db, "h2", &b).await?;
            let h3_now = stored(&db, "h3").await;
            if h3_now != BTreeSet::from([key("tcp", "::", 1001)]) {
                return Err(format!("h3 stored {h3_now:?}"));
            }
            Ok(())
        },
    )
    .await;
    let model = |socks: &Socks| -> BTreeSet<Key> { socks.iter().map(|(k, _)| k.clone()).collect() };
    assert_eq!(agent_scan(&a), model(&a_socks), "the test's model of h1");
    assert_eq!(agent_scan(&b), model(&b_socks), "the test's model of h2");
    assert_eq!(
        stored(&db, "h4").await,
        BTreeSet::from([key("tcp", "::", 4000)])
    );
    no_duplicate_live_rows(&db).await;

    // Nothing holds the database in an open transaction.
    if let Err(e) = outside_write_lock(&db_path).await {
        panic!(
            "after recovery the collector still holds a write transaction open: an outside \
             {e}"
        );
    }

    // No change observed while the disk was full is lost or re-timed.
    for (host, c) in [("h1", &changed_a), ("h2", &changed_b)] {
        assert_no_snapshot_restart(host, &read(&log(&format!("agent-{host}.log"))));
        check_events(&db, host, c, &from, &to).await;
    }

    // ---- Graceful restart on the same file: everything acknowledged is still there. ----
    let before: Vec<usize> = ["h1", "h2"]
        .iter()
        .map(|h| connects(&read(&log(&format!("agent-{h}.log")))).len())
        .collect();
    let st = stop_gracefully(&mut collector, 30);
    assert_eq!(st.code(), Some(0), "graceful stop: {st:?}");
    let mut collector = spawn_collector(&pki, &db, listen, None, &log("collector-2.log"));
    wait_listening(raw).await;

    for agent in [&h3, &h4] {
        let (_s, resume) = open_raw(&pki, raw, agent.host, agent.session, agent.acked)
            .await
            .unwrap_or_else(|st| panic!("{}: after the restart: {st}", agent.host));
        assert!(
            resume.is_some_and(|r| r >= agent.acked),
            "{}: acknowledged up to {} before the restart; after it the collector resumes \
             after {resume:?}: acknowledged data was lost",
            agent.host,
            agent.acked
        );
        let (c, _) = committed(&db, agent.host).await;
        assert!(
            c >= agent.acked as i64,
            "{}: acknowledged up to {}, committed_seq {c}",
            agent.host,
            agent.acked
        );
    }
    for (i, h) in ["h1", "h2"].iter().enumerate() {
        let path = log(&format!("agent-{h}.log"));
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
            "{h}: after the restart the collector did not resume the agent's session, so it \
             holds less than it acknowledged: {last}"
        );
        assert_no_snapshot_restart(h, &agent_log);
    }
    converge(
        30,
        "after the restart the store still equals reality",
        || async {
            store_matches_scan(&db, "h1", &a).await?;
            store_matches_scan(&db, "h2", &b).await?;
            Ok(())
        },
    )
    .await;
    assert_eq!(
        stored(&db, "h3").await,
        BTreeSet::from([key("tcp", "::", 1001)])
    );
    assert_eq!(
        stored(&db, "h4").await,
        BTreeSet::from([key("tcp", "::", 4000)])
    );
    no_duplicate_live_rows(&db).await;
    for (host, c) in [("h1", &changed_a), ("h2", &changed_b)] {
        check_events(&db, host, c, &from, &to).await;
    }
    let st = stop_gracefully(&mut collector, 30);
    assert_eq!(
        st.code(),
        Some(0),
        "graceful stop after the restart: {st:?}"
    );
    let refused: Vec<usize> = ["h1", "h2"]
        .iter()
        .map(|h| {
            read(&log(&format!("agent-{h}.log")))
                .matches("collector storage failed")
                .count()
        })
        .collect();
    eprintln!(
        "disk_full: {filled} bytes of filler; {full_log_lines} `database or disk is full` log \
         lines; storage failures seen by h1, h2: {refused:?}; h3 while full: {retries:?}; \
         {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
}
