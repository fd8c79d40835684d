//! The wire protocol against a real collector (in process, real TLS on a real socket, real
//! SQLite): acknowledgements only after commit, idempotent retries, resume, resync on a
//! gap, chunked snapshots, and refusal of malformed input with nothing stored.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use listenscope_collector::store::DbUrl;
use listenscope_proto::v1;
use serde_json::Value;
use util::*;

type Body = v1::collector_message::Body;

async fn setup() -> (Pki, TempDir, DbUrl, InProcess) {
    let pki = Pki::new(&["h1", "h2"]);
    let dir = TempDir::new("db");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let c = InProcess::start(&pki, &db).await;
    (pki, dir, db, c)
}

async fn session(pki: &Pki, c: &InProcess, host: &str, first: v1::AgentMessage) -> RawSession {
    session_as(pki, c.addr, host, first).await
}

async fn welcome(s: &mut RawSession) -> v1::Welcome {
    match s.recv().await.unwrap() {
        Some(Body::Welcome(w)) => w,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

async fn ack(s: &mut RawSession) -> u64 {
    match s.recv().await.unwrap() {
        Some(Body::Ack(a)) => a.sequence,
        other => panic!("expected Ack, got {other:?}"),
    }
}

#[tokio::test]
async fn snapshot_delta_ack_resume_and_resync() {
    let (pki, _dir, db, c) = setup().await;
    let mut s = session(&pki, &c, "h1", hello(1, 0, "h1")).await;
    let w = welcome(&mut s).await;
    assert_eq!(w.resume_after, None, "a new host starts with a snapshot");
    assert!(w.max_listeners_per_message > 0);
    s.send(snapshot(
        1,
        vec![listener("host", 80), listener("host", 443)],
    ))
    .await;
    assert_eq!(ack(&mut s).await, 1);
    assert_eq!(
        live_ports(&db, "h1").await,
        [80, 443],
        "acknowledged means stored"
    );

    let k443 = listener("host", 443).key.unwrap();
    s.send(delta(2, vec![listener("host", 8080)], vec![k443.clone()]))
        .await;
    assert_eq!(ack(&mut s).await, 2);
    assert_eq!(live_ports(&db, "h1").await, [80, 8080]);
    let changes = query(
        &db,
        "SELECT change, port FROM listener_changes WHERE host = 'h1' ORDER BY at, change DESC, port",
        &[],
    )
    .await;
    let changes: Vec<(String, i64)> = changes
        .rows
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
        .collect();
    assert!(
        changes.contains(&("closed".into(), 443)) && changes.contains(&("opened".into(), 8080)),
        "{changes:?}"
    );
    drop(s);

    // Reconnect in the same session: resume after what is committed.
    let mut s = session(&pki, &c, "h1", hello(1, 1, "h1")).await;
    assert_eq!(welcome(&mut s).await.resume_after, Some(2));
    // A retry of a committed delta is acknowledged again and stored once.
    s.send(delta(2, vec![listener("host", 8080)], vec![k443.clone()]))
        .await;
    assert_eq!(ack(&mut s).await, 2);
    let rows = query(
        &db,
        "SELECT count(*) FROM listener_changes WHERE host = 'h1' AND port = 8080",
        &[],
    )
    .await;
    assert_eq!(rows.rows[0][0], Value::from(1));
    // A gap asks for a resync; deltas until the snapshot are ignored.
    s.send(delta(4, vec![listener("host", 9000)], vec![])).await;
    match s.recv().await.unwrap() {
        Some(Body::Resync(r)) => assert!(r.reason.contains("expected 3, got 4"), "{}", r.reason),
        other => panic!("expected Resync, got {other:?}"),
    }
    s.send(delta(5, vec![listener("host", 9001)], vec![])).await;
    s.send(snapshot(6, vec![listener("host", 80)])).await;
    assert_eq!(ack(&mut s).await, 6);
    assert_eq!(
        live_ports(&db, "h1").await,
        [80],
        "the snapshot replaced the state"
    );
    drop(s);

    // A new agent process (new session) is told to send a snapshot.
    let mut s = session(&pki, &c, "h1", hello(9, 6, "h1")).await;
    assert_eq!(welcome(&mut s).await.resume_after, None);
    drop(s);
    c.shutdown().await;
}

#[tokio::test]
async fn chunked_snapshot_is_stored_at_its_last_chunk() {
    let (pki, _dir, db, c) = setup().await;
    let mut s = session(&pki, &c, "h1", hello(1, 0, "h1")).await;
    welcome(&mut s).await;
    let at = Some(now_ts());
    for (i, ports) in [[1u32, 2], [3, 4], [5, 6]].iter().enumerate() {
        s.send(msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
            sequence: 1,
            chunk_index: i as u32,
            last: i == 2,
            observed_at: at,
            listeners: ports.iter().map(|p| listener("host", *p)).collect(),
        })))
        .await;
        if i < 2 {
            // Nothing is visible before the last chunk.
            assert!(live_ports(&db, "h1").await.is_empty());
        }
    }
    assert_eq!(ack(&mut s).await, 1);
    assert_eq!(live_ports(&db, "h1").await, [1, 2, 3, 4, 5, 6]);
    c.shutdown().await;
}

/// Sends a Hello, an optional good snapshot, then `bad`; expects INVALID_ARGUMENT whose
/// message contains `needle`, and that nothing of `bad` was stored.
async fn refused(bad: v1::AgentMessage, needle: &str) {
    let (pki, _dir, db, c) = setup().await;
    let mut s = session(&pki, &c, "h1", hello(1, 0, "h1")).await;
    welcome(&mut s).await;
    s.send(snapshot(1, vec![listener("host", 22)])).await;
    assert_eq!(ack(&mut s).await, 1);
    s.send(bad).await;
    let status = match s.recv().await {
        Err(st) => st,
        Ok(Some(other)) => panic!("expected a refusal, got {other:?}"),
        Ok(None) => panic!("stream ended without a status"),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
    assert_eq!(
        live_ports(&db, "h1").await,
        [22],
        "nothing of the refused message is stored"
    );
    c.shutdown().await;
}

fn with_key(edit: impl FnOnce(&mut v1::ListenerKey)) -> v1::Listener {
    let mut l = listener("host", 80);
    edit(l.key.as_mut().unwrap());
    l
}

#[tokio::test]
async fn malformed_input_is_refused_with_invalid_argument() {
    // Each bad listener rides with a good one: the whole message is refused.
    let cases: Vec<(v1::Listener, &str)> = vec![
        (with_key(|k| k.port = 0), "key.port: 0 is outside 1–65535"),
        (with_key(|k| k.port = 70000), "key.port: 70000"),
        (
            with_key(|k| k.address = vec![10, 0, 0, 1]),
            "key.address: 4 bytes for ipv6",
        ),
        (with_key(|k| k.protocol = 7), "key.protocol: 7"),
        (with_key(|k| k.family = 0), "key.family"),
        (
            {
                let mut l = listener("host", 80);
                l.reach_ipv4 = 99;
                l
            },
            "reach_ipv4: 99",
        ),
        (
            {
                let mut l = listener("host", 80);
                l.source = 0;
                l
            },
            "source",
        ),
        // Firewall verdicts: known names only, printable bounded texts (a terminal escape
        // in a reason is refused, never stored to be printed later).
        (
            {
                let mut l = listener("host", 80);
                l.effective_ipv4 = verdict("wide-open", "", &[]);
                l
            },
            "effective_ipv4.verdict: \"wide-open\" is not a known verdict",
        ),
        (
            {
                let mut l = listener("host", 80);
                l.effective_ipv6 = verdict("open", "rule \u{1b}[2J accept", &[]);
                l
            },
            "effective_ipv6.reason: contains control characters",
        ),
        (
            {
                let mut l = listener("host", 80);
                l.effective_ipv4 = verdict("open", "accept", &["saddr 10.0.0.0/8"]);
                l
            },
            "effective_ipv4.conditions: given for open",
        ),
    ];
    // The same listener twice in one delta.
    refused(
        msg(v1::agent_message::Body::Delta(v1::Delta {
            sequence: 2,
            observed_at: Some(now_ts()),
            opened: vec![listener("host", 443)],
            closed: vec![listener("host", 443).key.unwrap()],
            changed: vec![],
        })),
        "appears twice in delta 2",
    )
    .await;
    for (bad, needle) in cases {
        refused(
            delta(2, vec![listener("host", 443), bad.clone()], vec![]),
            needle,
        )
        .await;
        refused(snapshot(2, vec![listener("host", 443), bad]), needle).await;
    }
    // A message larger than the limit (~5.6 MiB of cmdlines).
    let mut big = Vec::new();
    for p in 1..=700u32 {
        let mut l = listener("host", p);
        l.processes[0].cmdline = "x".repeat(8000);
        big.push(l);
    }
    refused(snapshot(2, big), "exceeds the 4194304-byte limit").await;
    // Protocol misuse.
    refused(hello(1, 0, "h1"), "Hello may only be the first message").await;
    refused(
        msg(v1::agent_message::Body::Delta(v1::Delta {
            sequence: 2,
            observed_at: None,
            ..Default::default()
        })),
        "observed_at: missing",
    )
    .await;
    refused(v1::AgentMessage { body: None }, "empty AgentMessage").await;
}

#[tokio::test]
async fn first_message_must_be_a_supported_hello() {
    let (pki, _dir, _db, c) = setup().await;
    let mut s = session(&pki, &c, "h1", snapshot(1, vec![])).await;
    let st = s.recv().await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("first message"), "{st:?}");
    let mut bad = hello(1, 0, "h1");
    if let Some(v1::agent_message::Body::Hello(h)) = &mut bad.body {
        h.protocol_version = 2;
    }
    let mut s = session(&pki, &c, "h1", bad).await;
    let st = s.recv().await.unwrap_err();
    assert!(st.message().contains("protocol_version: 2"), "{st:?}");
    c.shutdown().await;
}

/// gRPC health reports the ingest service as serving; reflection lists it.
#[tokio::test]
async fn health_and_reflection() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (pki, _dir, _db, c) = setup().await;
    let ch = channel(
        c.addr,
        &pki.path("ca.pem"),
        Some((&pki.path("h1.pem"), &pki.path("h1.key"))),
    )
    .await
    .unwrap();
    let status = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: "listenscope.v1.Inventory".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"listenscope.v1.Inventory".to_string()),
        "{names:?}"
    );
    c.shutdown().await;
}

/// One session per host: a new connection of the same host replaces the old one (a
/// half-open connection the agent gave up on must not keep writing).
#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let (pki, _dir, db, c) = setup().await;
    let mut first = session(&pki, &c, "h1", hello(1, 0, "h1")).await;
    welcome(&mut first).await;
    let mut second = session(&pki, &c, "h1", hello(2, 0, "h1")).await;
    welcome(&mut second).await;
    let st = first.recv().await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::Aborted, "{st:?}");
    assert!(
        st.message().contains("replaced by a newer connection"),
        "{st:?}"
    );
    second.send(snapshot(1, vec![listener("host", 80)])).await;
    assert_eq!(ack(&mut second).await, 1);
    assert_eq!(live_ports(&db, "h1").await, [80]);
    c.shutdown().await;
}

/// A snapshot from another session that is older than the stored state is refused: a
/// stale agent process (or a cloned machine with the same certificate) cannot roll the
/// host back.
#[tokio::test]
async fn an_older_sessions_snapshot_does_not_roll_back() {
    let (pki, _dir, db, c) = setup().await;
    let mut s = session(&pki, &c, "h1", hello(1, 0, "h1")).await;
    welcome(&mut s).await;
    s.send(snapshot(
        1,
        vec![listener("host", 80), listener("host", 443)],
    ))
    .await;
    assert_eq!(ack(&mut s).await, 1);
    drop(s);
    let mut old = session(&pki, &c, "h1", hello(7, 0, "h1")).await;
    welcome(&mut old).await;
    let an_hour_ago = listenscope_core::wire::timestamp(
        time::OffsetDateTime::now_utc() - time::Duration::hours(1),
    );
    old.send(msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
        sequence: 1,
        chunk_index: 0,
        last: true,
        observed_at: Some(an_hour_ago),
        listeners: vec![listener("host", 22)],
    })))
    .await;
    let st = old.recv().await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::Aborted, "{st:?}");
    assert_eq!(live_ports(&db, "h1").await, [80, 443]);
    c.shutdown().await;
}

#[tokio::test]
async fn limits_on_sessions_and_snapshot_size() {
    let pki = Pki::new(&["h1", "h2"]);
    let dir = TempDir::new("limits");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let limits = listenscope_collector::ingest::Limits {
        max_sessions: 1,
        per_snapshot_bytes: 2000,
        ..Default::default()
    };
    let c = InProcess::start_with(&pki, &db, limits).await;
    let mut s1 = session(&pki, &c, "h1", hello(1, 0, "h1")).await;
    welcome(&mut s1).await;
    let ch = channel(
        c.addr,
        &pki.path("ca.pem"),
        Some((&pki.path("h2.pem"), &pki.path("h2.key"))),
    )
    .await
    .unwrap();
    let st = RawSession::open(ch, hello(2, 0, "h2"))
        .await
        .err()
        .expect("refused");
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    // A snapshot past the byte budget is refused, in pieces or not.
    let at = now_ts();
    let chunk = |i: u32, last: bool| {
        msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
            sequence: 1,
            chunk_index: i,
            last,
            observed_at: Some(at),
            listeners: (1..=4).map(|p| listener("host", i * 10 + p)).collect(),
        }))
    };
    s1.send(chunk(0, false)).await;
    s1.send(chunk(1, false)).await;
    s1.send(chunk(2, true)).await;
    let st = s1.recv().await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("snapshot larger than 2000 bytes"),
        "{st:?}"
    );
    assert!(live_ports(&db, "h1").await.is_empty());
    c.shutdown().await;
}

/// Only `in_flight` sessions process a message at once; the others wait (backpressure,
/// no error). A session that starts a chunked snapshot and stops sending holds its place
/// only until `chunk_wait`: then it ends with DEADLINE_EXCEEDED and the waiting session
/// goes on.
#[tokio::test]
async fn in_flight_places_and_the_chunk_deadline() {
    let pki = Pki::new(&["h1", "h2"]);
    let dir = TempDir::new("inflight");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let limits = listenscope_collector::ingest::Limits {
        in_flight: 1,
        chunk_wait: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let c = InProcess::start_with(&pki, &db, limits).await;
    let mut stalled = session(&pki, &c, "h1", hello(1, 0, "h1")).await;
    welcome(&mut stalled).await;
    let mut waiting = session(&pki, &c, "h2", hello(2, 0, "h2")).await;
    welcome(&mut waiting).await;
    // h1 takes the only place with the first chunk of a snapshot, then goes silent.
    stalled
        .send(msg(v1::agent_message::Body::Snapshot(v1::SnapshotChunk {
            sequence: 1,
            chunk_index: 0,
            last: false,
            observed_at: Some(now_ts()),
            listeners: vec![listener("host", 22)],
        })))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let sent = std::time::Instant::now();
    waiting.send(snapshot(1, vec![listener("host", 80)])).await;
    // h2 is answered only once h1 has lost its place.
    assert_eq!(ack(&mut waiting).await, 1);
    let waited = sent.elapsed();
    match stalled.recv().await {
        Err(st) => {
            assert_eq!(st.code(), tonic::Code::DeadlineExceeded, "{st}");
            assert!(st.message().contains("send the snapshot again"), "{st}");
        }
        other => panic!("expected the stalled session to end, got {other:?}"),
    }
    assert!(
        waited >= std::time::Duration::from_millis(1000),
        "h2 was answered after {waited:?}, before h1's place was freed"
    );
    assert_eq!(live_ports(&db, "h2").await, [80]);
    assert!(
        live_ports(&db, "h1").await.is_empty(),
        "nothing of the stalled snapshot is stored"
    );
    c.shutdown().await;
}
