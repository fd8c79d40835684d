//! The durable outbox (issue 11, item 9): the real `listenscope-agent run` observes
//! changes while its collector is down, is killed with SIGKILL, observes more while it is
//! down, restarts, and only then reaches the collector. Every change must arrive once,
//! with the time it was observed, in the session the agent had before the kill.
//!
//! The collector is an in-process server (`grpc_util`: real mutual TLS, the real gRPC
//! service) that keeps a host's history the way the real collector does: a session's
//! committed sequence (Welcome resumes a known session from it), a snapshot closes what it
//! lacks and opens what is new at its time, a delta opens and closes at its time, a resent
//! sequence is acknowledged without being stored again. The agent scans a network
//! namespace of its own, so nothing else on the machine changes what it sees.
//!
//! Before the journal the restarted agent started a new session: the collector asked for
//! a snapshot, so the listener opened and closed during the outage never reached the
//! history, and the rest carried the restart's time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod grpc_util;
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use listenscope_proto::v1;
use listenscope_proto::v1::agent_message::Body as AgentBody;
use listenscope_proto::v1::collector_message::Body as CollectorBody;
use listenscope_proto::v1::inventory_server::Inventory;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use grpc_util::{Collector, Pki, pki};
use util::{LogsOnPanic, Netns, Proc, TempDir, agent_command, tcp_listener, wait_for};

/// Generous: the machine is shared and slow.
const WAIT: Duration = Duration::from_secs(90);
/// A scan's time is taken when it starts, so a change made during a scan may carry a
/// time a little before the change: the lower bounds allow this much.
const SCAN_SLACK: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum What {
    Opened,
    Closed,
}

/// The host's history as the collector stored it.
#[derive(Debug, Default)]
struct Db {
    session_id: Vec<u8>,
    committed: u64,
    /// (session id, instance id, acked sequence) of every Hello.
    hellos: Vec<(Vec<u8>, Vec<u8>, u64)>,
    /// Sequences of committed snapshots.
    snapshots: Vec<u64>,
    /// Deltas that did not follow the committed sequence.
    gaps: u64,
    live: BTreeSet<u32>,
    history: Vec<(u32, What, SystemTime)>,
}

type SharedDb = Arc<Mutex<Db>>;

fn lock(db: &SharedDb) -> MutexGuard<'_, Db> {
    db.lock().unwrap_or_else(|p| p.into_inner())
}

/// An observation time as the wire carries it (seconds, nanoseconds).
fn time_of(t: Option<(i64, i32)>) -> SystemTime {
    let (seconds, nanos) = t.expect("observed_at");
    SystemTime::UNIX_EPOCH + Duration::new(seconds as u64, nanos as u32)
}

#[derive(Debug, Clone)]
struct HistoryCollector {
    db: SharedDb,
}

#[tonic::async_trait]
impl Inventory for HistoryCollector {
    type SessionStream = ReceiverStream<Result<v1::CollectorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().serve(request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl HistoryCollector {
    async fn serve(
        self,
        mut inbound: Streaming<v1::AgentMessage>,
        tx: mpsc::Sender<Result<v1::CollectorMessage, Status>>,
    ) {
        let send = |body| Ok(v1::CollectorMessage { body: Some(body) });
        let Ok(Some(v1::AgentMessage {
            body: Some(AgentBody::Hello(hello)),
        })) = inbound.message().await
        else {
            return;
        };
        let resume_after = {
            let mut db = lock(&self.db);
            db.hellos.push((
                hello.session_id.clone(),
                hello.instance_id.clone(),
                hello.acked_sequence,
            ));
            (db.session_id == hello.session_id).then_some(db.committed)
        };
        let welcome = v1::Welcome {
            resume_after,
            collector_version: "test".into(),
            max_listeners_per_message: 0,
        };
        if tx
            .send(send(CollectorBody::Welcome(welcome)))
            .await
            .is_err()
        {
            return;
        }
        let mut chunks: BTreeSet<u32> = BTreeSet::new();
        while let Ok(Some(m)) = inbound.message().await {
            let seq = match m.body {
                Some(AgentBody::Snapshot(c)) => {
                    chunks.extend(
                        c.listeners
                            .iter()
                            .filter_map(|l| Some(l.key.as_ref()?.port)),
                    );
                    if !c.last {
                        continue;
                    }
                    let at = time_of(c.observed_at.map(|t| (t.seconds, t.nanos)));
                    let ports = std::mem::take(&mut chunks);
                    let mut db = lock(&self.db);
                    for p in db.live.difference(&ports).copied().collect::<Vec<_>>() {
                        db.history.push((p, What::Closed, at));
                    }
                    for p in ports
                        .difference(&db.live.clone())
                        .copied()
                        .collect::<Vec<_>>()
                    {
                        db.history.push((p, What::Opened, at));
                    }
                    db.live = ports;
                    db.session_id.clone_from(&hello.session_id);
                    db.committed = c.sequence;
                    db.snapshots.push(c.sequence);
                    c.sequence
                }
                Some(AgentBody::Delta(d)) => {
                    // Some(seq) to acknowledge, None for a gap (answered with a Resync).
                    let committed = {
                        let mut db = lock(&self.db);
                        if db.session_id != hello.session_id || d.sequence > db.committed + 1 {
                            db.gaps += 1;
                            None
                        } else {
                            if d.sequence == db.committed + 1 {
                                let at = time_of(d.observed_at.map(|t| (t.seconds, t.nanos)));
                                for k in &d.closed {
                                    db.live.remove(&k.port);
                                    db.history.push((k.port, What::Closed, at));
                                }
                                for l in &d.opened {
                                    let port = l.key.as_ref().unwrap().port;
                                    db.live.insert(port);
                                    db.history.push((port, What::Opened, at));
                                }
                                db.committed = d.sequence;
                            }
                            Some(d.sequence)
                        }
                    };
                    match committed {
                        Some(seq) => seq,
                        None => {
                            let resync = v1::Resync {
                                reason: "sequence gap".into(),
                            };
                            let _ = tx.send(send(CollectorBody::Resync(resync))).await;
                            continue;
                        }
                    }
                }
                Some(AgentBody::Hello(_)) => return,
                _ => continue,
            };
            if tx
                .send(send(CollectorBody::Ack(v1::Ack { sequence: seq })))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// The real agent, scanning namespace `ns` only, with its state in `state`.
fn start_agent(pki: &Pki, url: &str, ns: &Netns, state: &Path, log: &Path) -> Proc {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    Proc(
        agent_command()
            .arg("run")
            .args(["--collector", url])
            .args(["--tls-ca", &path(&pki.ca)])
            .args(["--tls-cert", &path(&pki.agent_cert)])
            .args(["--tls-key", &path(&pki.agent_key)])
            .args(["--reconnect-max", "1s", "--interval", "1s"])
            .args(["--netns", &ns.name])
            .args(["--state-dir", &path(state)])
            .env("LISTENSCOPE_LOG", "info,listenscope_agent::transport=debug")
            .stderr(std::fs::File::create(log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Changes the agent logging to `log` has queued so far ("Changes queued. changes=N").
fn queued(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Changes queued."))
        .filter_map(|l| {
            l.split_once("changes=")?
                .1
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// Waits until the agent has queued `n` changes in all; returns the time it saw that.
fn wait_queued(agent: &mut Proc, log: &Path, n: usize) -> SystemTime {
    wait_for(WAIT, &format!("{n} changes queued by the agent"), || {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status})");
        }
        let q = queued(log);
        if q >= n {
            Ok(())
        } else {
            Err(format!("{q} queued"))
        }
    });
    SystemTime::now()
}

/// A listener on `port` in `ns` (kept open while the socket lives).
fn listen(ns: &Netns, port: u16) -> socket2::Socket {
    ns.enter(|| tcp_listener("0.0.0.0", port, None))
}

#[track_caller]
fn within(what: &str, at: SystemTime, from: SystemTime, to: SystemTime) {
    assert!(
        at >= from - SCAN_SLACK && at <= to,
        "{what} stamped {at:?}, outside [{:?}, {to:?}]",
        from - SCAN_SLACK
    );
}

#[test]
fn changes_survive_an_agent_killed_during_a_collector_outage() {
    let dir = TempDir::new("durable");
    let pki = pki(&dir);
    let ns = Netns::new();
    let state = dir.join("state");
    let (log1, log2) = (dir.join("agent1.log"), dir.join("agent2.log"));
    let _logs = LogsOnPanic(vec![log1.clone(), log2.clone()]);
    let db = SharedDb::default();
    let serve = |addr: &str| {
        Collector::serve(
            "c",
            &pki,
            HistoryCollector {
                db: Arc::clone(&db),
            },
            addr,
        )
    };
    let mut collector = serve("127.0.0.1:0");
    let (addr, url) = (collector.addr, collector.url());

    // Connected: the first (empty) snapshot is committed.
    let mut agent = start_agent(&pki, &url, &ns, &state, &log1);
    wait_for(WAIT, "the first snapshot", || {
        let db = lock(&db);
        if db.snapshots == [1] {
            Ok(())
        } else {
            Err(format!("{db:?}"))
        }
    });

    // The collector goes away; the agent sees three changes, one scan each.
    collector.kill();
    let t = SystemTime::now();
    let l1 = listen(&ns, 7001);
    let seen = wait_queued(&mut agent, &log1, 1);
    let open1 = (t, seen);
    let t = SystemTime::now();
    let l2 = listen(&ns, 7002);
    let seen = wait_queued(&mut agent, &log1, 2);
    let open2 = (t, seen);
    let t = SystemTime::now();
    drop(l1);
    let seen = wait_queued(&mut agent, &log1, 3);
    let close1 = (t, seen);

    // SIGKILL: no shutdown path runs. While the agent is down, 7002 closes and 7003 opens.
    agent.kill();
    let killed = SystemTime::now();
    drop(l2);
    let _l3 = listen(&ns, 7003);

    // The agent comes back (the collector still down), then the collector.
    let mut agent = start_agent(&pki, &url, &ns, &state, &log2);
    wait_for(WAIT, "the restarted agent's first scan", || {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status})");
        }
        let text = std::fs::read_to_string(&log2).unwrap_or_default();
        match text.contains("First scan done.") {
            true => Ok(()),
            false => Err(text),
        }
    });
    let resumed = SystemTime::now();
    let _collector = serve(&addr.to_string());
    // Logged just after the first scan (read too early, the file may not have it yet).
    wait_for(
        WAIT,
        "the journal resumed with the two changes made while down",
        || {
            let log = std::fs::read_to_string(&log2).unwrap_or_default();
            match log.contains("Resuming the session from the outbox journal.")
                && log.contains("changes_while_down=2")
            {
                true => Ok(()),
                false => Err(log),
            }
        },
    );

    let want: BTreeMap<(u32, What), usize> = [
        ((7001, What::Opened), 1),
        ((7001, What::Closed), 1),
        ((7002, What::Opened), 1),
        ((7002, What::Closed), 1),
        ((7003, What::Opened), 1),
    ]
    .into();
    let history = wait_for(WAIT, "every change in the collector's history", || {
        let db = lock(&db);
        let mut got: BTreeMap<(u32, What), usize> = BTreeMap::new();
        for (port, what, _) in &db.history {
            *got.entry((*port, *what)).or_default() += 1;
        }
        if want.keys().all(|k| got.contains_key(k)) && db.committed >= 5 {
            Ok(db.history.clone())
        } else {
            Err(format!("{db:?}"))
        }
    });
    // Give a late duplicate the chance to show.
    std::thread::sleep(Duration::from_secs(2));
    let db = lock(&db);
    let mut got: BTreeMap<(u32, What), usize> = BTreeMap::new();
    for (port, what, _) in &db.history {
        *got.entry((*port, *what)).or_default() += 1;
    }
    assert_eq!(got, want, "each change exactly once: {:?}", db.history);
    // One session all along: one snapshot, no gap, one session id and one instance id
    // (16 bytes, kept in the state directory) in every Hello.
    assert_eq!(db.snapshots, [1], "{db:?}");
    assert_eq!(db.gaps, 0, "{db:?}");
    assert!(db.hellos.len() >= 2, "{db:?}");
    assert!(
        db.hellos.iter().all(|h| h.0 == db.hellos[0].0),
        "the session changed: {:?}",
        db.hellos
    );
    assert!(
        db.hellos
            .iter()
            .all(|h| h.1.len() == 16 && h.1 == db.hellos[0].1),
        "instance ids: {:?}",
        db.hellos
    );
    drop(db);

    // Each change carries the time the agent observed it: the three from before the kill
    // their own scans; the two made while it was down the first scan after the restart.
    let at = |port: u32, what: What| {
        history
            .iter()
            .find(|(p, w, _)| *p == port && *w == what)
            .unwrap()
            .2
    };
    within("7001 opened", at(7001, What::Opened), open1.0, open1.1);
    within("7002 opened", at(7002, What::Opened), open2.0, open2.1);
    within("7001 closed", at(7001, What::Closed), close1.0, close1.1);
    assert!(at(7001, What::Closed) < killed);
    within("7002 closed", at(7002, What::Closed), killed, resumed);
    within("7003 opened", at(7003, What::Opened), killed, resumed);
    assert_eq!(at(7002, What::Closed), at(7003, What::Opened));
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited");
}

/// The state directory at start-up, with the real binary: a second agent on it is refused
/// (exit 2, the fix named), so is a directory other users may write; an unreadable
/// journal is moved aside and the agent starts afresh.
#[test]
fn state_directory_problems_at_start_up() {
    let dir = TempDir::new("durable-start");
    let pki = pki(&dir);
    let ns = Netns::new();
    let state = dir.join("state");
    let log = |n: &str| dir.join(n);
    let _logs = LogsOnPanic(vec![log("first.log"), log("second.log")]);
    // Nothing listens there: the agents keep retrying, which is all these need.
    let url = format!("https://{}", util::free_port("127.0.0.1"));

    // Not a journal: moved aside, and the agent goes on.
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("outbox.journal"), b"not a journal at all").unwrap();
    let mut first = start_agent(&pki, &url, &ns, &state, &log("first.log"));
    wait_for(WAIT, "the unreadable journal moved aside", || {
        let text = std::fs::read_to_string(log("first.log")).unwrap_or_default();
        match text.contains("moved aside") && state.join("outbox.journal.unreadable").exists() {
            true => Ok(()),
            false => Err(text),
        }
    });
    assert_eq!(
        std::fs::read(state.join("outbox.journal.unreadable")).unwrap(),
        b"not a journal at all"
    );
    assert!(first.0.try_wait().unwrap().is_none(), "the agent exited");

    // A second agent on the same directory stops at once and says why.
    let out = |p: Proc| {
        let mut p = p;
        let status = wait_for(WAIT, "the second agent to exit", || {
            p.0.try_wait().unwrap().ok_or_else(String::new)
        });
        (
            status.code(),
            std::fs::read_to_string(log("second.log")).unwrap(),
        )
    };
    let (code, text) = out(start_agent(&pki, &url, &ns, &state, &log("second.log")));
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("is in use by another listenscope-agent: give each agent its own state_dir"),
        "{text}"
    );
    first.kill();

    // A directory everyone may write: refused, with the chmod that fixes it.
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let (code, text) = out(start_agent(&pki, &url, &ns, &open, &log("second.log")));
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!("run `chmod 700 {}`", open.display())),
        "{text}"
    );
}
