//! Text from agents is data, never terminal control: a local process that names itself
//! with terminal escapes and a bidirectional override (`prctl(PR_SET_NAME)`, `argv[0]`)
//! and listens, scanned by the real agent and sent to the real collector. The snapshot
//! is accepted (the agent escapes those characters before sending; the collector refuses
//! them raw), and the store holds the names as visible escapes, never the raw bytes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use listenscope_collector::store::DbUrl;
use serde_json::Value;
use util::*;

/// The escapes a hostile process name carries: OSC title, SGR colour, clear screen, and a
/// right-to-left override.
const HOSTILE_ARGV0: &str = "\u{1b}]0;pwned\u{7}\u{1b}[31mevil\u{202e}08:::";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_process_names_are_stored_escaped() {
    require_root();
    let pki = Pki::new(&["h1"]);
    let dir = TempDir::new("hostile");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let ns = HostNs::new();
    let port = free_port("0.0.0.0").port();
    let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let log = |n: &str| dir.path().join(n);
    let _logs = LogsOnPanic(vec![log("collector.log"), log("agent.log")]);
    let _collector = spawn_collector(&pki, &db, listen, None, &log("collector.log"));
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;

    // A dual-stack listener on 8081 held by two processes: python3, whose comm (prctl)
    // carries escapes, and a `sleep` it starts with the socket and a hostile argv[0] (killed
    // with its parent: PR_SET_PDEATHSIG).
    let script = "import ctypes, os, socket, subprocess, time\n\
                  s = socket.socket(socket.AF_INET6)\n\
                  s.setsockopt(41, 26, 0)\n\
                  s.bind(('::', 8081))\n\
                  s.listen()\n\
                  subprocess.Popen([os.environ['ARGV0'], '600'], executable='/bin/sleep', pass_fds=[s.fileno()], preexec_fn=lambda: ctypes.CDLL(None).prctl(1, 9))\n\
                  ctypes.CDLL(None).prctl(15, b'\\x1b[2Jev\\xe2\\x80\\xaeil', 0, 0, 0)\n\
                  time.sleep(600)\n";
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "python3", "-c", script])
        .env("ARGV0", HOSTILE_ARGV0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _hostile = Proc(cmd.spawn().expect("spawn python3"));
    let _agent = ns.spawn_agent(
        &pki,
        "h1",
        format!("{}:{port}", ns.host_ip).parse().unwrap(),
        &log("agent.log"),
    );

    let sql = "SELECT process_details FROM current_listeners \
               WHERE host = 'h1' AND port = 8081";
    // Both owners (python3 and its sleep) recorded.
    let details = || async {
        let rows = query(&db, sql, &[]).await.rows;
        let Some(row) = rows.first() else {
            return Vec::new();
        };
        let details = match &row[0] {
            Value::String(s) => serde_json::from_str(s).unwrap(),
            other => other.clone(),
        };
        details
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| [p["comm"].clone(), p["cmdline"].clone()])
            .map(|v| v.as_str().unwrap().to_string())
            .collect::<Vec<String>>()
    };
    eventually(
        30,
        "the hostile listener stored with both owners",
        || async { details().await.len() == 4 },
    )
    .await;
    let texts = details().await;
    for t in &texts {
        assert!(
            !t.chars().any(listenscope_core::record::is_unsafe_char),
            "raw control or formatting characters stored: {t:?}"
        );
    }
    // The names are kept, visibly escaped: python3's comm and sleep's argv[0].
    assert!(
        texts.iter().any(|t| t == r"\u{1b}[2Jev\u{202e}il"),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t == r"\u{1b}]0;pwned\u{7}\u{1b}[31mevil\u{202e}08::: 600"),
        "{texts:?}"
    );
    let agent_log = std::fs::read_to_string(log("agent.log")).unwrap();
    assert!(
        !agent_log.contains("InvalidArgument") && !agent_log.contains("invalid argument"),
        "the collector refused the agent's snapshot:\n{agent_log}"
    );
}
