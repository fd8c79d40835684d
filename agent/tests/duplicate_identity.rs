//! Two machines sharing one certificate (issue 11, item 5), the agent's side: the real
//! `listenscope-agent run` against in-process collectors (`grpc_util`: real mutual TLS and
//! gRPC) that answer the way a collector does when another live agent holds the
//! certificate's session. The tests count the agent's connection attempts over a window;
//! the bounds come from the agent's smallest possible waits, so a slow machine only makes
//! fewer attempts.
//!
//! Before: `ALREADY_EXISTS` was retried on the normal schedule (every second here), and
//! every Welcome reset the backoff, so two agents knocking each other off reconnected
//! twice a second forever.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod grpc_util;
mod util;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use listenscope_proto::v1;
use listenscope_proto::v1::agent_message::Body as AgentBody;
use listenscope_proto::v1::collector_message::Body as CollectorBody;
use listenscope_proto::v1::inventory_server::Inventory;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use grpc_util::{Collector, Pki, pki};
use util::{LogsOnPanic, Proc, TempDir, agent_command, wait_for};

const WAIT: Duration = Duration::from_secs(60);
/// How long attempts are counted after the first one.
const WINDOW: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Refuse the session: another agent, with another instance id, holds it.
    AlreadyExists,
    /// Welcome, then end the stream at once, as a newer session of the same host would
    /// (`ABORTED`).
    WelcomeThenAbort,
}

/// When a session came, and the instance id of its Hello.
type Attempts = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

/// Answers every session the same way, and counts them.
#[derive(Debug, Clone)]
struct Doorman {
    answer: Answer,
    attempts: Attempts,
}

#[tonic::async_trait]
impl Inventory for Doorman {
    type SessionStream = ReceiverStream<Result<v1::CollectorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let instance_id = match inbound.message().await {
            Ok(Some(v1::AgentMessage {
                body: Some(AgentBody::Hello(h)),
            })) => h.instance_id,
            other => return Err(Status::invalid_argument(format!("no Hello: {other:?}"))),
        };
        self.attempts
            .lock()
            .unwrap()
            .push((Instant::now(), instance_id));
        match self.answer {
            Answer::AlreadyExists => Err(Status::already_exists(
                "another agent with another instance id holds this host's session",
            )),
            Answer::WelcomeThenAbort => {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let welcome = v1::Welcome {
                    resume_after: None,
                    collector_version: "test".into(),
                    max_listeners_per_message: 0,
                };
                let body = |b| Ok(v1::CollectorMessage { body: Some(b) });
                tx.send(body(CollectorBody::Welcome(welcome)))
                    .await
                    .unwrap();
                tx.send(Err(Status::aborted(
                    "a newer session of this host replaced this one",
                )))
                .await
                .unwrap();
                Ok(Response::new(ReceiverStream::new(rx)))
            }
        }
    }
}

fn start_agent(pki: &Pki, url: &str, state: &Path, reconnect_max: &str, log: &Path) -> Proc {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    Proc(
        agent_command()
            .arg("run")
            .args(["--collector", url])
            .args(["--tls-ca", &path(&pki.ca)])
            .args(["--tls-cert", &path(&pki.agent_cert)])
            .args(["--tls-key", &path(&pki.agent_key)])
            .args(["--reconnect-max", reconnect_max, "--interval", "1s"])
            .args(["--netns", "current"])
            .args(["--state-dir", &path(state)])
            .env("LISTENSCOPE_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Runs the agent against a collector answering `answer`; returns the instance ids of the
/// attempts made in the WINDOW after the first one (the first included), and the log.
fn attempts_in_window(answer: Answer, reconnect_max: &str) -> (Vec<Vec<u8>>, String) {
    let dir = TempDir::new("duplicate");
    let pki = pki(&dir);
    let log = dir.join("agent.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let doorman = Doorman {
        answer,
        attempts: Arc::default(),
    };
    let attempts = Arc::clone(&doorman.attempts);
    let collector = Collector::serve("doorman", &pki, doorman, "127.0.0.1:0");
    let mut agent = start_agent(
        &pki,
        &collector.url(),
        &dir.join("state"),
        reconnect_max,
        &log,
    );
    let first = wait_for(WAIT, "the agent's first attempt", || {
        match attempts.lock().unwrap().first() {
            Some((at, _)) => Ok(*at),
            None => Err(std::fs::read_to_string(&log).unwrap_or_default()),
        }
    });
    std::thread::sleep(WINDOW.saturating_sub(first.elapsed()));
    let seen: Vec<Vec<u8>> = attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| at.duration_since(first) <= WINDOW)
        .map(|(_, id)| id.clone())
        .collect();
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited");
    agent.kill();
    (seen, std::fs::read_to_string(&log).unwrap())
}

/// `ALREADY_EXISTS`: one ERROR naming the problem and the fix, and the next attempt no
/// sooner than a minute later, although --reconnect-max is 1 s.
#[test]
fn already_exists_backs_off_for_minutes() {
    let (attempts, log) = attempts_in_window(Answer::AlreadyExists, "1s");
    assert_eq!(attempts.len(), 1, "attempts: {attempts:?}\n{log}");
    // The instance id this installation keeps in its state directory.
    assert_eq!(attempts[0].len(), 16, "{attempts:?}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("ERROR") && l.contains("Another machine uses this host's certificate")
        })
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("Issue this machine its own certificate")
            && errors[0].contains("retry_in_s="),
        "{}",
        errors[0]
    );
}

/// Welcomed and knocked off at once, again and again: the Welcome does not reset the
/// backoff, which grows (waits of at least 250 ms, 500 ms, 1 s, 2 s, 4 s, 8 s), so at most
/// 7 attempts fit in 20 s. Before, each Welcome started the backoff over and the agent
/// tried about twice a second.
#[test]
fn a_session_knocked_off_after_its_welcome_does_not_reset_the_backoff() {
    let (attempts, log) = attempts_in_window(Answer::WelcomeThenAbort, "30s");
    eprintln!("{} attempts in {WINDOW:?}", attempts.len());
    assert!(
        (2..=10).contains(&attempts.len()),
        "{} attempts in {WINDOW:?}\n{log}",
        attempts.len()
    );
    // One installation, one instance id, in every attempt.
    assert!(
        attempts
            .iter()
            .all(|id| id.len() == 16 && *id == attempts[0])
    );
}
