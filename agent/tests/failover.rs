//! `listenscope-agent run` with several collectors: the real binary skips one that refuses
//! connections without backing off, fails over when the collector it talks to goes away,
//! and carries its session (id and sequence numbers) from one collector to the other.
//!
//! The agent crate cannot run the real collector (the collector depends on the agent, not
//! the other way round), so the collectors here are small real servers in this process:
//! mutual TLS with certificates from a fresh CA, the real gRPC service from
//! `listenscope-proto`, and one shared in-memory "database" that plays the part of the
//! PostgreSQL database real collectors share (committed sequence per session, Acks only
//! after it is "committed"). Each runs on a runtime of its own; dropping that runtime
//! closes its listener and every connection at once, as a killed process would.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod grpc_util;
mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use listenscope_proto::v1;
use listenscope_proto::v1::agent_message::Body as AgentBody;
use listenscope_proto::v1::collector_message::Body as CollectorBody;
use listenscope_proto::v1::inventory_server::Inventory;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use grpc_util::{Collector, Pki, pki};
use util::{LogsOnPanic, Proc, TempDir, agent_command, tcp_listener, wait_for};

/// Generous: the machine is shared and slow; nothing here waits on a backoff.
const WAIT: Duration = Duration::from_secs(60);

/// What the collectors saw, in order, across all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Hello {
        collector: &'static str,
        session_id: Vec<u8>,
        acked: u64,
    },
    /// A complete snapshot, committed.
    Snapshot { collector: &'static str, seq: u64 },
    /// A delta, committed (a resent one already committed is acked, not recorded).
    Delta {
        collector: &'static str,
        seq: u64,
        opened_ports: Vec<u32>,
        closed_ports: Vec<u32>,
    },
    /// A delta that does not follow the committed sequence: continuity was lost.
    Gap {
        collector: &'static str,
        committed: u64,
        got: u64,
    },
}

/// The database the collectors share.
#[derive(Debug, Default)]
struct Db {
    session_id: Vec<u8>,
    committed: u64,
    events: Vec<Event>,
}

type SharedDb = Arc<Mutex<Db>>;

fn lock(db: &SharedDb) -> MutexGuard<'_, Db> {
    db.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
struct FakeCollector {
    name: &'static str,
    db: SharedDb,
}

#[tonic::async_trait]
impl Inventory for FakeCollector {
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

impl FakeCollector {
    /// The protocol as the real collector speaks it, minus validation and storage: Welcome
    /// resumes a known session from its committed sequence, every complete snapshot and
    /// every next delta is committed, then acknowledged.
    async fn serve(
        self,
        mut inbound: Streaming<v1::AgentMessage>,
        tx: mpsc::Sender<Result<v1::CollectorMessage, Status>>,
    ) {
        let send = |body| v1::CollectorMessage { body: Some(body) };
        let Ok(Some(v1::AgentMessage {
            body: Some(AgentBody::Hello(hello)),
        })) = inbound.message().await
        else {
            return;
        };
        let resume_after = {
            let mut db = lock(&self.db);
            db.events.push(Event::Hello {
                collector: self.name,
                session_id: hello.session_id.clone(),
                acked: hello.acked_sequence,
            });
            (db.session_id == hello.session_id).then_some(db.committed)
        };
        let welcome = v1::Welcome {
            resume_after,
            collector_version: "test".into(),
            max_listeners_per_message: 0,
        };
        if tx
            .send(Ok(send(CollectorBody::Welcome(welcome))))
            .await
            .is_err()
        {
            return;
        }
        while let Ok(Some(m)) = inbound.message().await {
            let seq = match m.body {
                Some(AgentBody::Snapshot(c)) if c.last => {
                    let mut db = lock(&self.db);
                    db.session_id.clone_from(&hello.session_id);
                    db.committed = c.sequence;
                    db.events.push(Event::Snapshot {
                        collector: self.name,
                        seq: c.sequence,
                    });
                    c.sequence
                }
                Some(AgentBody::Delta(d)) => {
                    if !self.commit(&hello.session_id, &d) {
                        let _ = tx.send(Err(Status::invalid_argument("gap"))).await;
                        return;
                    }
                    d.sequence
                }
                Some(AgentBody::Hello(_)) => return,
                _ => continue, // snapshot chunks before the last, heartbeats
            };
            let ack = CollectorBody::Ack(v1::Ack { sequence: seq });
            if tx.send(Ok(send(ack))).await.is_err() {
                return;
            }
        }
    }
}

impl FakeCollector {
    /// Commits the delta if it is the next one of the known session (a resent one already
    /// committed is only acknowledged again); false if it breaks the sequence.
    fn commit(&self, session_id: &[u8], d: &v1::Delta) -> bool {
        let mut db = lock(&self.db);
        if db.session_id != session_id || d.sequence > db.committed + 1 {
            let committed = db.committed;
            db.events.push(Event::Gap {
                collector: self.name,
                committed,
                got: d.sequence,
            });
            return false;
        }
        if d.sequence == db.committed + 1 {
            db.committed = d.sequence;
            db.events.push(Event::Delta {
                collector: self.name,
                seq: d.sequence,
                opened_ports: d
                    .opened
                    .iter()
                    .filter_map(|l| l.key.as_ref().map(|k| k.port))
                    .collect(),
                closed_ports: d.closed.iter().map(|k| k.port).collect(),
            });
        }
        true
    }
}

/// A fake collector named `name` on `addr` (port 0: any free port), storing into `db`.
fn start(name: &'static str, pki: &Pki, db: &SharedDb, addr: &str) -> Collector {
    let service = FakeCollector {
        name,
        db: Arc::clone(db),
    };
    Collector::serve(name, pki, service, addr)
}

/// The real agent with `collector_args` (`--collector …`), logging to `log`.
fn start_agent(pki: &Pki, collector_args: &[String], log: &std::path::Path) -> Proc {
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    Proc(
        agent_command()
            .arg("run")
            .args(collector_args)
            .args(["--tls-ca", &path(&pki.ca)])
            .args(["--tls-cert", &path(&pki.agent_cert)])
            .args(["--tls-key", &path(&pki.agent_key)])
            // A backoff this long would fail every wait below: none may happen.
            .args(["--reconnect-max", "10m", "--interval", "1s"])
            .args(["--netns", "current"])
            .env("LISTENSCOPE_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn events(db: &SharedDb) -> Vec<Event> {
    lock(db).events.clone()
}

/// Waits until the collector `name` has said Welcome to the agent `n` times in all.
fn wait_for_hellos(db: &SharedDb, agent: &mut Proc, name: &str, n: usize) -> Vec<Event> {
    wait_for(WAIT, &format!("hello #{n} at collector {name}"), || {
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status})");
        }
        let ev = events(db);
        let hellos = ev
            .iter()
            .filter(|e| matches!(e, Event::Hello { collector, .. } if *collector == name))
            .count();
        if hellos >= n {
            Ok(ev)
        } else {
            Err(format!("{ev:?}"))
        }
    })
}

fn session_ids(ev: &[Event]) -> Vec<(&'static str, Vec<u8>)> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Hello {
                collector,
                session_id,
                ..
            } => Some((*collector, session_id.clone())),
            _ => None,
        })
        .collect()
}

/// The agent's log up to its first line containing `line`, once there is one.
fn log_until(log: &std::path::Path, line: &str) -> String {
    wait_for(WAIT, &format!("{line:?} in the agent's log"), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        match text.find(line) {
            Some(at) => Ok(text[..at].to_string()),
            None => Err(text),
        }
    })
}

#[test]
fn an_unreachable_collector_is_skipped_without_backoff() {
    let dir = TempDir::new("failover1");
    let pki = pki(&dir);
    let log = dir.join("agent.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    // A closed port that stays closed: bound (so nobody else takes it) but not listening,
    // so connections are refused.
    let closed = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    closed
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let closed_url = format!(
        "https://{}",
        closed.local_addr().unwrap().as_socket().unwrap()
    );
    let db = SharedDb::default();
    let b = start("b", &pki, &db, "127.0.0.1:0");

    // One comma-separated value; no --server-name, so each URL's own host (127.0.0.1) is
    // the name checked in the collector's certificate.
    let mut agent = start_agent(
        &pki,
        &["--collector".into(), format!("{closed_url},{}", b.url())],
        &log,
    );
    // Its first snapshot: not necessarily sequence 1, since listeners of other tests on
    // this host may change (and be recorded) before the connection.
    wait_for(WAIT, "the snapshot stored through collector b", || {
        let ev = events(&db);
        match ev
            .iter()
            .any(|e| matches!(e, Event::Snapshot { collector: "b", .. }))
        {
            true => Ok(()),
            false => Err(format!("{ev:?}")),
        }
    });
    let hellos = session_ids(&events(&db));
    assert_eq!(hellos.len(), 1, "{hellos:?}");

    // It tried the closed one first, then went straight on to b: no backoff in between
    // (with --reconnect-max 10m a backoff could be long; here none may happen at all).
    let before = log_until(
        &log,
        &format!("Connected to collector. collector={}", b.url()),
    );
    assert!(
        before.contains(&format!("Session failed. collector={closed_url}")),
        "{before}"
    );
    assert!(
        before.contains(&format!(
            "Failing over to the next collector. from={closed_url} to={}",
            b.url()
        )),
        "{before}"
    );
    assert!(!before.contains("Reconnecting."), "backed off:\n{before}");
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited");
}

#[test]
fn a_lost_collector_fails_over_to_the_other_and_back() {
    let dir = TempDir::new("failover2");
    let pki = pki(&dir);
    let log = dir.join("agent.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let db = SharedDb::default();
    let mut a = start("a", &pki, &db, "127.0.0.1:0");
    let mut b = start("b", &pki, &db, "127.0.0.1:0");
    let (a_url, b_url) = (a.url(), b.url());

    // The flag twice, and one name for both certificates.
    let mut agent = start_agent(
        &pki,
        &[
            "--collector".into(),
            a_url.clone(),
            "--collector".into(),
            b_url.clone(),
            "--server-name".into(),
            "localhost".into(),
        ],
        &log,
    );
    // The first URL first: the snapshot goes to a.
    wait_for(WAIT, "the snapshot stored through collector a", || {
        let ev = events(&db);
        match ev
            .iter()
            .any(|e| matches!(e, Event::Snapshot { collector: "a", .. }))
        {
            true => Ok(()),
            false => Err(format!("{ev:?}")),
        }
    });

    // a goes away: the agent moves to b at once, same session, resuming where a's
    // database left off (no new snapshot).
    a.kill();
    let ev = wait_for_hellos(&db, &mut agent, "b", 1);
    let ids = session_ids(&ev);
    assert_eq!(
        ids.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        ["a", "b"],
        "{ev:?}"
    );
    assert_eq!(ids[0].1, ids[1].1, "the session id changed: {ev:?}");
    let before = log_until(&log, &format!("Connected to collector. collector={b_url}"));
    assert!(
        before.contains(&format!(
            "Failing over to the next collector. from={a_url} to={b_url}"
        )),
        "{before}"
    );
    assert!(!before.contains("Reconnecting."), "backed off:\n{before}");

    // The session goes on through b: a new listener arrives as the next delta.
    let opened = tcp_listener("127.0.0.1", 0, None);
    let port = u32::from(opened.local_addr().unwrap().as_socket().unwrap().port());
    wait_for(WAIT, "the new listener as a delta through b", || {
        let ev = events(&db);
        let seen = ev.iter().any(|e| {
            matches!(e, Event::Delta { collector: "b", opened_ports, .. }
                if opened_ports.contains(&port))
        });
        if seen { Ok(()) } else { Err(format!("{ev:?}")) }
    });

    // a is back (same address), b goes away: round robin wraps around to a.
    a = start("a", &pki, &db, &a.addr.to_string());
    b.kill();
    let ev = wait_for_hellos(&db, &mut agent, "a", 2);
    let ids = session_ids(&ev);
    assert_eq!(
        ids.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        ["a", "b", "a"],
        "{ev:?}"
    );
    assert!(ids.iter().all(|(_, id)| *id == ids[0].1), "{ev:?}");
    // And goes on through a: the listener's close arrives as a delta.
    drop(opened);
    wait_for(WAIT, "the listener's close as a delta through a", || {
        let ev = events(&db);
        let seen = ev.iter().any(|e| {
            matches!(e, Event::Delta { collector: "a", closed_ports, .. }
                if closed_ports.contains(&port))
        });
        if seen { Ok(()) } else { Err(format!("{ev:?}")) }
    });

    // One snapshot in all, every delta in sequence, whichever collector stored it.
    let ev = events(&db);
    let snapshots = ev
        .iter()
        .filter(|e| matches!(e, Event::Snapshot { .. }))
        .count();
    assert_eq!(snapshots, 1, "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::Gap { .. })), "{ev:?}");
    // Each Hello reports what the agent heard acknowledged so far: never less than before.
    let acked_at_hellos: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Hello { acked, .. } => Some(*acked),
            _ => None,
        })
        .collect();
    assert!(acked_at_hellos.is_sorted(), "{ev:?}");
    drop(a);
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited");
}
