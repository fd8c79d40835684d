//! What the fault tests (`disk_full.rs`, `pg_faults.rs`) share: a real collector with two
//! real agents and their listeners ([`Fleet`]), hand-driven agents whose every
//! acknowledgement is checked against the database at once ([`RawAgent`]), a small tmpfs
//! to fill up ([`Tmpfs`]), and the checks that nothing acknowledged or observed was lost.
//! Used by those two test binaries only (the `dead_code` allowance of `util` covers the
//! others).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use listenscope_collector::query::{Param, ReadOnly, ResultSet};
use listenscope_collector::store::DbUrl;
use listenscope_collector::timefmt::format as fmt_time;
use listenscope_proto::v1;
use serde_json::Value;
use time::OffsetDateTime;
use tonic::{Code, Status};

use super::{
    HostNs, LogsOnPanic, Pki, Proc, RawSession, TempDir, agent_bin, free_port, hello, query, run,
    spawn_collector, tcp_listener, text, try_session_as, udp_socket, wait_for, wait_for_async,
    wait_listening,
};

/// (protocol, address, port): how a listener is compared between the store and a scan.
pub type Key = (String, String, i64);

pub fn key(proto: &str, addr: &str, port: i64) -> Key {
    (proto.to_string(), addr.to_string(), port)
}

/// `tcp :::port` for each port: how the hand-driven clients' listeners are stored.
pub fn raw_keys(ports: impl IntoIterator<Item = u32>) -> BTreeSet<Key> {
    ports
        .into_iter()
        .map(|p| key("tcp", "::", i64::from(p)))
        .collect()
}

/// A tmpfs mounted on a fresh directory, owned by `owner` (as uid and gid) if given, with
/// a file `filler` that fills it up; unmounted (lazily if still busy) on drop, then the
/// directory goes.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    pub fn mount(tag: &str, size: &str, owner: Option<u32>) -> Tmpfs {
        let dir = TempDir::new(tag);
        let target = dir.path().to_str().unwrap().to_string();
        let owner = owner
            .map(|id| format!(",uid={id},gid={id}"))
            .unwrap_or_default();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700{owner}"),
                "tmpfs",
                &target,
            ],
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Fills the filesystem up and checks that it takes no more writes. Returns the bytes
    /// of filler written.
    fn fill(&self) -> u64 {
        let filled = write_until_full(&self.filler());
        let probe = self.path().join("probe");
        assert!(
            std::fs::write(&probe, b"x").is_err(),
            "the tmpfs still takes writes after {filled} bytes of filler"
        );
        let _ = std::fs::remove_file(&probe);
        filled
    }

    /// Fills it up again, in case something freed space since.
    fn top_up(&self) {
        write_until_full(&self.filler());
    }

    /// Deletes the filler: space returns.
    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
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
                .stderr(Stdio::null())
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
fn write_until_full(path: &Path) -> u64 {
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

/// The text of `p`; empty while it cannot be read.
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Lines of `p` containing `what`.
pub fn count_lines(p: &Path, what: &str) -> usize {
    read(p).lines().filter(|l| l.contains(what)).count()
}

/// A read-only query over a fresh connection, with `$N` placeholders (SQLite takes them
/// too). PostgreSQL: retried while the server cannot answer (it may be down or
/// restarting), for at most 90s. SQLite: [`query`], which fails the test at once.
pub async fn q(db: &DbUrl, sql: &str, params: &[Param]) -> ResultSet {
    if let DbUrl::Sqlite(_) = db {
        return query(db, sql, params).await;
    }
    wait_for_async(
        Duration::from_secs(90),
        &format!("query `{sql}`"),
        || async {
            let ro = ReadOnly::open(db).await.map_err(|e| e.to_string())?;
            let r = ro.run(sql, params).await.map_err(|e| e.to_string());
            ro.close().await;
            r
        },
    )
    .await
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
pub async fn stored(db: &DbUrl, host: &str) -> BTreeSet<Key> {
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
pub async fn committed(db: &DbUrl, host: &str) -> (i64, i64) {
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

/// Ok when the host's stored listeners are what its agent's own scan of `ns` shows; else
/// what is still different.
pub async fn store_matches_scan(db: &DbUrl, host: &str, ns: &HostNs) -> Result<(), String> {
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

pub async fn no_duplicate_live_rows(db: &DbUrl) {
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

/// A hand-driven agent: the messages it has not had acknowledged, resent like the real
/// agent does, and every Ack checked against the database at once.
pub struct RawAgent {
    pub host: &'static str,
    pub session: u8,
    pub acked: u64,
    pub pending: Vec<(u64, v1::AgentMessage)>,
    /// How long it waits for each answer of the collector.
    answer_within: Duration,
    /// Whether a stream the collector has already ended is a failed session, tried again
    /// (true), or fails the test when the agent sends on it (false).
    retry_closed: bool,
}

impl RawAgent {
    /// An agent whose first message is `first` (sequence 1). It expects each answer within
    /// 10s (like `RawSession::recv`) and the stream to stay open while it sends.
    pub fn new(host: &'static str, session: u8, first: v1::AgentMessage) -> RawAgent {
        RawAgent {
            host,
            session,
            acked: 0,
            pending: vec![(1, first)],
            answer_within: Duration::from_secs(10),
            retry_closed: false,
        }
    }

    /// For a collector whose database server may be down: it waits up to 60s for an
    /// answer (the collector itself first waits up to its pool's 30s acquire timeout for a
    /// connection), and a stream the collector has ended is a failed session to try again.
    pub fn patient(self) -> RawAgent {
        RawAgent {
            answer_within: Duration::from_secs(60),
            retry_closed: true,
            ..self
        }
    }

    /// The next answer on `s`, or the stream's final status as Err; None at a clean end.
    async fn recv(
        &self,
        s: &mut RawSession,
    ) -> Result<Option<v1::collector_message::Body>, Status> {
        match tokio::time::timeout(self.answer_within, s.rx.message()).await {
            Ok(r) => r.map(|m| m.and_then(|m| m.body)),
            Err(_) => panic!(
                "no answer from the collector within {:?}",
                self.answer_within
            ),
        }
    }

    /// Sends on a session of this agent; Err once the collector has ended the stream (a
    /// [`patient`](Self::patient) agent; any other fails the test).
    pub async fn send(&self, s: &RawSession, m: v1::AgentMessage) -> Result<(), String> {
        match s.tx.send(m).await {
            Ok(()) => Ok(()),
            Err(_) if self.retry_closed => Err("the stream is closed".to_string()),
            Err(e) => panic!("{}: send: {e}", self.host),
        }
    }

    /// Queues `m` as sequence `seq` and sends it on the open session `s`.
    pub async fn send_next(&mut self, s: &RawSession, seq: u64, m: v1::AgentMessage) {
        self.pending.push((seq, m.clone()));
        if let Err(e) = self.send(s, m).await {
            panic!("{}: sequence {seq}: {e}", self.host);
        }
    }

    /// Opens a session (Hello with what was acknowledged) and reads the Welcome: its
    /// `resume_after`, or the status the collector ended the stream with.
    pub async fn open_raw(
        &self,
        pki: &Pki,
        addr: SocketAddr,
    ) -> Result<(RawSession, Option<u64>), Status> {
        let host = self.host;
        let mut s = try_session_as(pki, addr, host, hello(self.session, self.acked, host)).await?;
        match self.recv(&mut s).await? {
            Some(v1::collector_message::Body::Welcome(w)) => Ok((s, w.resume_after)),
            None => Err(Status::unavailable("stream ended before Welcome")),
            Some(other) => panic!("{host}: expected Welcome, got {other:?}"),
        }
    }

    /// Reads the collector's answers until everything pending is acknowledged (Ok), or
    /// the collector ends the stream with UNAVAILABLE (Err: the store failed). Every Ack
    /// must already be visible to another connection: acknowledged means committed.
    pub async fn read_acks(&mut self, s: &mut RawSession, db: &DbUrl) -> Result<(), String> {
        let host = self.host;
        while let Some(&(seq, _)) = self.pending.first() {
            match self.recv(s).await {
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
    pub async fn check_resume(&mut self, resume: Option<u64>, db: &DbUrl) {
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
    pub async fn attempt(&mut self, pki: &Pki, addr: SocketAddr, db: &DbUrl) -> Result<(), String> {
        let host = self.host;
        let (mut s, resume) = match self.open_raw(pki, addr).await {
            Ok(x) => x,
            Err(st) if st.code() == Code::Unavailable => return Err(format!("hello: {st}")),
            Err(st) => panic!("{host}: session refused: {st}"),
        };
        self.check_resume(resume, db).await;
        for (_, m) in &self.pending {
            self.send(&s, m.clone()).await?;
        }
        self.read_acks(&mut s, db).await
    }

    /// Delivers everything pending, retrying while the collector answers UNAVAILABLE (for
    /// at most `secs`).
    pub async fn deliver(&mut self, pki: &Pki, addr: SocketAddr, db: &DbUrl, secs: u64) {
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
    pub async fn open(&mut self, pki: &Pki, addr: SocketAddr, db: &DbUrl) -> RawSession {
        let (s, resume) = self
            .open_raw(pki, addr)
            .await
            .unwrap_or_else(|st| panic!("{}: session: {st}", self.host));
        assert_eq!(resume, Some(self.acked), "{}: resume_after", self.host);
        self.check_resume(resume, db).await;
        s
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
pub struct Changed {
    pub opened: Vec<Key>,
    pub closed: Vec<Key>,
    pub from: String,
    pub to: String,
}

impl Changed {
    /// None yet, in a fault that began at `from`.
    pub fn since(from: &str) -> Changed {
        Changed {
            from: from.to_string(),
            ..Changed::default()
        }
    }
}

/// Listeners held open, each with the key it is compared by.
pub type Socks = Vec<(Key, socket2::Socket)>;

/// Opens a listener inside `ns` and notes it.
pub fn open(
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
pub fn close(socks: &mut Socks, k: &Key, c: &mut Changed) {
    let i = socks.iter().position(|(s, _)| s == k).unwrap();
    socks.remove(i);
    c.closed.push(k.clone());
}

/// Each change made during the fault is stored exactly once, with a time inside the
/// fault (the time the agent observed it, not the time it was finally stored).
pub async fn check_events(db: &DbUrl, host: &str, c: &Changed) {
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
pub fn assert_no_snapshot_restart(host: &str, log: &str) {
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

pub fn connects(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("Connected to collector."))
        .collect()
}

/// Sends SIGTERM and waits (bounded) for the process to exit.
fn stop_gracefully(p: &mut Proc, secs: u64) -> ExitStatus {
    // SAFETY: signalling our own, not yet reaped, child by pid.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    wait_for(
        Duration::from_secs(secs),
        "the collector to exit after SIGTERM",
        || p.0.try_wait().unwrap().ok_or_else(String::new),
    )
}

/// What a filesystem kept full went through ([`Fleet::fill_up`]).
pub struct FullPeriod {
    /// Bytes of filler that filled it.
    pub filled: u64,
    /// The changes made to h1 and to h2 while it was full.
    pub a: Changed,
    pub b: Changed,
    /// What each of h3's tries to store its delta got while it was full.
    pub retries: Vec<Result<(), String>>,
}

impl FullPeriod {
    /// Space returns: the filler goes, and the fault ends now.
    pub fn free(&mut self, fs: &Tmpfs) {
        fs.free();
        self.a.to = fmt_time(OffsetDateTime::now_utc());
        self.b.to = self.a.to.clone();
    }

    /// The changes, by host.
    pub fn changed(&self) -> [(&'static str, &Changed); 2] {
        [("h1", &self.a), ("h2", &self.b)]
    }
}

/// The collector, two real agents (h1, h2) in their namespaces with real listeners, both
/// first snapshots stored. Fields drop in order: processes before the namespaces.
pub struct Fleet {
    collector: Proc,
    _agents: Vec<Proc>,
    pub a_socks: Socks,
    pub b_socks: Socks,
    pub a: HostNs,
    pub b: HostNs,
    listen: SocketAddr,
    /// Where the hand-driven clients connect.
    pub raw: SocketAddr,
    logs: PathBuf,
    db: DbUrl,
}

impl Fleet {
    /// The logs a fleet writes into `logs`, and `more`, shown if the test fails.
    pub fn logs_on_panic(logs: &Path, more: impl IntoIterator<Item = PathBuf>) -> LogsOnPanic {
        let mut v: Vec<PathBuf> = [
            "collector-1.log",
            "collector-2.log",
            "agent-h1.log",
            "agent-h2.log",
        ]
        .iter()
        .map(|n| logs.join(n))
        .collect();
        v.extend(more);
        LogsOnPanic(v)
    }

    /// Starts the collector on `db` and the agents, logging into `logs`, and waits for
    /// both first snapshots.
    pub async fn start(pki: &Pki, db: &DbUrl, logs: &Path) -> Fleet {
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
            db: db.clone(),
        };
        wait_for_async(
            Duration::from_secs(30),
            "both agents' first snapshots stored",
            || async {
                fleet.matches_scans().await?;
                match committed(db, "h1").await.0 > 0 && committed(db, "h2").await.0 > 0 {
                    true => Ok(()),
                    false => Err("no snapshot committed yet".into()),
                }
            },
        )
        .await;
        fleet
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    async fn matches_scans(&self) -> Result<(), String> {
        store_matches_scan(&self.db, "h1", &self.a).await?;
        store_matches_scan(&self.db, "h2", &self.b).await
    }

    /// The filesystem `fs` under the database fills up while listeners keep changing in
    /// both namespaces, in three rounds: the first opens listeners that stay and ones that
    /// the second closes, and closes ones stored before; the second also opens some that
    /// the third closes. After the first round, `h3` sends the first of `h3_deltas` on its
    /// open session `h3_session` (the store fails or, should the database find room, the
    /// Ack must be a real commit) and queues the second; the collector must log a store
    /// failure, a line with one of `failure`. 2.5s before each later round and after the
    /// last (over two scan intervals of the agents, so they observe every change), `fs`
    /// is topped up again (in case the database freed some of its own files) and `h3`
    /// tries again like an agent. The filesystem is still full on return.
    pub async fn fill_up(
        &mut self,
        fs: &Tmpfs,
        pki: &Pki,
        h3: &mut RawAgent,
        mut h3_session: RawSession,
        h3_deltas: [(u64, v1::AgentMessage); 2],
        failure: &[&str],
    ) -> FullPeriod {
        let filled = fs.fill();
        let from = fmt_time(OffsetDateTime::now_utc());
        let (mut a, mut b) = (Changed::since(&from), Changed::since(&from));
        self.round(1, &mut a, &mut b);

        let [(seq, first), second] = h3_deltas;
        h3.send_next(&h3_session, seq, first).await;
        let mut retries = vec![h3.read_acks(&mut h3_session, &self.db).await];
        drop(h3_session);
        h3.pending.push(second);
        let log = self.log("collector-1.log");
        wait_for_async(
            Duration::from_secs(20),
            "a store failure while the filesystem is full",
            || async {
                match read(&log)
                    .lines()
                    .any(|l| failure.iter().any(|f| l.contains(f)))
                {
                    true => Ok(()),
                    false => Err(format!("the collector has not logged any of {failure:?}")),
                }
            },
        )
        .await;

        for round in [Some(2), Some(3), None] {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            fs.top_up();
            retries.push(h3.attempt(pki, self.raw, &self.db).await);
            if let Some(n) = round {
                self.round(n, &mut a, &mut b);
            }
        }
        FullPeriod {
            filled,
            a,
            b,
            retries,
        }
    }

    /// Round `n` of [`fill_up`](Self::fill_up)'s changes, noted in `ca` (h1) and `cb` (h2).
    fn round(&mut self, n: u8, ca: &mut Changed, cb: &mut Changed) {
        let (a, b) = (&self.a, &self.b);
        let (a_socks, b_socks) = (&mut self.a_socks, &mut self.b_socks);
        match n {
            1 => {
                for p in [7001, 7002] {
                    open(a, a_socks, ca, "tcp", "::", p, Some(false));
                    open(b, b_socks, cb, "udp", "0.0.0.0", p, None);
                }
                for p in 7101..=7103 {
                    open(a, a_socks, ca, "tcp", "0.0.0.0", p, None);
                    open(b, b_socks, cb, "tcp", "::", p, Some(true));
                }
                close(a_socks, &key("tcp", "0.0.0.0", 22), ca);
                close(b_socks, &key("udp", "::", 53), cb);
            }
            2 => {
                for p in 7101..=7103 {
                    close(a_socks, &key("tcp", "0.0.0.0", p), ca);
                    close(b_socks, &key("tcp", "::", p), cb);
                }
                for p in 7201..=7203 {
                    open(a, a_socks, ca, "udp", "::", p, Some(false));
                    open(b, b_socks, cb, "tcp", "0.0.0.0", p, None);
                }
                close(a_socks, &key("tcp", "::", 7002), ca);
            }
            3 => {
                for p in 7201..=7203 {
                    close(a_socks, &key("udp", "::", p), ca);
                    close(b_socks, &key("tcp", "0.0.0.0", p), cb);
                }
            }
            _ => unreachable!("fill_up has three rounds"),
        }
    }

    /// The store converges to reality by itself, without a restart (within `secs`); the
    /// test's model of the namespaces is right; each hand-driven host holds what it was
    /// acknowledged for; no live row is stored twice; no change observed during the faults
    /// (`changed`) is lost or re-timed, and neither agent had to start over from a snapshot.
    pub async fn check_recovered(
        &self,
        raws: &[(&str, BTreeSet<Key>)],
        changed: &[(&str, &Changed)],
        secs: u64,
    ) {
        wait_for_async(
            Duration::from_secs(secs),
            "the store equals every host's real listeners",
            || async {
                self.matches_scans().await?;
                for (host, want) in raws {
                    let have = stored(&self.db, host).await;
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
        no_duplicate_live_rows(&self.db).await;
        for host in ["h1", "h2"] {
            assert_no_snapshot_restart(host, &read(&self.log(&format!("agent-{host}.log"))));
        }
        for (host, c) in changed {
            check_events(&self.db, host, c).await;
        }
    }

    /// How many times each agent (h1, h2) was told that the collector's storage failed
    /// (lines of its log).
    pub fn refusals(&self) -> [usize; 2] {
        ["h1", "h2"].map(|h| count_lines(&self.log(&format!("agent-{h}.log")), "storage failed"))
    }

    /// Graceful restart of the collector on the same database: every session resumes where
    /// it was acknowledged, the store still equals reality, no event went missing. Then
    /// the collector stops gracefully.
    pub async fn graceful_restart(
        &mut self,
        pki: &Pki,
        raws: &[(&RawAgent, BTreeSet<Key>)],
        changed: &[(&str, &Changed)],
    ) {
        let before: Vec<usize> = ["h1", "h2"]
            .iter()
            .map(|h| connects(&read(&self.log(&format!("agent-{h}.log")))).len())
            .collect();
        let st = stop_gracefully(&mut self.collector, 30);
        assert_eq!(st.code(), Some(0), "graceful stop: {st:?}");
        self.collector = spawn_collector(
            pki,
            &self.db,
            self.listen,
            None,
            &self.log("collector-2.log"),
        );
        wait_listening(self.raw).await;

        for (agent, _) in raws {
            let (_s, resume) = agent
                .open_raw(pki, self.raw)
                .await
                .unwrap_or_else(|st| panic!("{}: after the restart: {st}", agent.host));
            assert!(
                resume.is_some_and(|r| r >= agent.acked),
                "{}: acknowledged up to {} before the restart; after it the collector resumes \
                 after {resume:?}: acknowledged data was lost",
                agent.host,
                agent.acked
            );
            let (c, _) = committed(&self.db, agent.host).await;
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
            wait_for_async(
                Duration::from_secs(30),
                &format!("{h} reconnected after the restart"),
                || async {
                    match connects(&read(&path)).len() > n {
                        true => Ok(()),
                        false => Err("no new `Connected to collector.` line".to_string()),
                    }
                },
            )
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
        wait_for_async(
            Duration::from_secs(30),
            "after the restart the store still equals reality",
            || async { self.matches_scans().await },
        )
        .await;
        for (agent, want) in raws {
            assert_eq!(&stored(&self.db, agent.host).await, want, "{}", agent.host);
        }
        no_duplicate_live_rows(&self.db).await;
        for (host, c) in changed {
            check_events(&self.db, host, c).await;
        }
        let st = stop_gracefully(&mut self.collector, 30);
        assert_eq!(
            st.code(),
            Some(0),
            "graceful stop after the restart: {st:?}"
        );
    }
}
