//! What an operator sees when `serve` (or a report) cannot start, against the real binary:
//! PostgreSQL refused, unresolvable, silent, refusing the password or missing the
//! database is told apart within seconds (not a 30 s "pool timed out"); missing or
//! unreadable files and a bad configuration file fail at once with one line that names
//! the file, the key and the fix, each cause said once; `certs` refuses validities that
//! make no sense and never replaces a host's key silently; `--log-format json` logs JSON.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use listenscope_collector::store::DbUrl;
use util::*;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the collector with `args`; fails the test if it is still running after 15 s (the
/// pool's 30 s wait is the bug this guards against; the budget is 2 s).
fn collector_within(args: &[&str]) -> Output {
    let mut child = Command::new(collector_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "`{}` still running after 15 s: {}",
                args.join(" "),
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `serve` with the test PKI and `db`.
fn serve_args<'a>(pki: &'a Pki, db: &'a str, ca: &'a str, cert: &'a str) -> Vec<String> {
    vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--db".into(),
        db.into(),
        "--tls-ca".into(),
        pki.path(ca).display().to_string(),
        "--tls-cert".into(),
        pki.path(cert).display().to_string(),
        "--tls-key".into(),
        pki.path("server.key").display().to_string(),
    ]
}

/// Exits 2 with one error line holding every `needle`, and `once` exactly once.
fn fails_once(o: &Output, needles: &[&str], once: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
    assert_eq!(
        err.matches(once).count(),
        1,
        "{once:?} not said once: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connect_errors_name_the_cause_fast() {
    require_root();
    let pki = Pki::new(&[]);
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let port = server.port;
    // A role with a password, checked with scram (the rest of the server trusts).
    let admin = server.database("ls").await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await
        .unwrap();
    sqlx::query("CREATE ROLE pw LOGIN PASSWORD 'right'")
        .execute(&pool)
        .await
        .unwrap();
    let hba = server.dir().join("data").join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all pw 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    // Accepts and never answers: the server that does not answer.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed = free_port("127.0.0.1").port();

    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            format!("postgres://u@127.0.0.1:{closed}/x"),
            vec!["connection refused", "Is PostgreSQL running"],
            "refused",
        ),
        (
            "postgres://u@no-such-host.invalid/x".to_string(),
            vec!["cannot resolve the host name", "check the host in the URL"],
            "resolve",
        ),
        (
            format!("postgres://u@127.0.0.1:{silent_port}/x"),
            vec!["no answer from", "within 2 s"],
            "no answer",
        ),
        (
            format!("postgres://pw:wrong@127.0.0.1:{port}/ls"),
            vec![
                "authentication failed for user \"pw\"",
                "pg_hba.conf",
                "pw:***@",
            ],
            "password authentication failed",
        ),
        (
            format!("postgres://listenscope@127.0.0.1:{port}/nodb"),
            vec!["database \"nodb\" does not exist", "createdb nodb"],
            "does not exist",
        ),
    ];
    for (url, needles, once) in &cases {
        let args = serve_args(&pki, url, "ca.pem", "server.pem");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = tokio::task::block_in_place(|| collector_within(&args));
        fails_once(&o, needles, once);
        assert!(!stderr(&o).contains("wrong"), "the password is shown");
        // The reports' read-only open says the same.
        let o = tokio::task::block_in_place(|| collector_within(&["hosts", "--db", url]));
        fails_once(&o, needles, once);
    }
    // The right password gets through, but this user may not create the tables: the
    // database's words once, and the fix.
    let url = format!("postgres://pw:right@127.0.0.1:{port}/ls");
    let args = serve_args(&pki, &url, "ca.pem", "server.pem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tokio::task::block_in_place(|| collector_within(&args));
    fails_once(
        &o,
        &["SQLSTATE 42501", "GRANT CREATE ON SCHEMA public"],
        "permission denied for schema public",
    );
    // A database the collector never opened is named as such, not as `relation "hosts"
    // does not exist`.
    let o = tokio::task::block_in_place(|| {
        collector_within(&[
            "hosts",
            "--db",
            &format!("postgres://pw:right@127.0.0.1:{port}/ls"),
        ])
    });
    fails_once(&o, &["no listenscope tables yet", "serve --db"], "serve");
    drop(silent);
}

#[test]
fn start_up_file_errors_fail_at_once_each_said_once() {
    let pki = Pki::new(&[]);
    let dir = TempDir::new("startup");
    let db = DbUrl::Sqlite(dir.path().join("ls.db")).as_url();
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        collector_within(&args)
    };
    // Missing CA, certificate, key.
    for (ca, cert, missing) in [
        ("nope-ca.pem", "server.pem", "nope-ca.pem"),
        ("ca.pem", "nope.pem", "nope.pem"),
    ] {
        let o = run(serve_args(&pki, &db, ca, cert));
        fails_once(&o, &[missing], "No such file or directory");
    }
    let mut args = serve_args(&pki, &db, "ca.pem", "server.pem");
    let last = args.len() - 1;
    args[last] = pki.path("nope.key").display().to_string();
    fails_once(&run(args), &["nope.key"], "No such file or directory");
    // A private key other users can read (the check is core::pem's; serve applies it).
    let open_key = pki.path("open.key");
    std::fs::copy(pki.path("server.key"), &open_key).unwrap();
    std::fs::set_permissions(
        &open_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let mut args = serve_args(&pki, &db, "ca.pem", "server.pem");
    args[last] = open_key.display().to_string();
    fails_once(&run(args), &["open.key", "0644", "chmod 600"], "chmod 600");
    // Unreadable: a directory where the CA file should be.
    std::fs::create_dir(pki.path("dir.pem")).unwrap();
    let o = run(serve_args(&pki, &db, "dir.pem", "server.pem"));
    fails_once(&o, &["dir.pem"], "Is a directory");
    // The database's directory does not exist.
    let nodir = DbUrl::Sqlite(dir.path().join("nodir").join("ls.db")).as_url();
    let o = run(serve_args(&pki, &nodir, "ca.pem", "server.pem"));
    fails_once(
        &o,
        &["nodir", "does not exist", "mkdir -p"],
        "does not exist",
    );
    // The configuration file: missing, a key of the wrong type, an unknown key, a bad
    // value; each names the file and the key.
    let toml = dir.path().join("collector.toml");
    let t = toml.display().to_string();
    let o = run(vec!["serve".into(), "--config".into(), t.clone()]);
    fails_once(&o, &[&t, "deploy/collector.toml"], "no such file");
    for (text, key, once) in [
        ("db = 5\n", "db", "expected a string"),
        ("dbx = \"x\"\n", "dbx", "unknown field"),
        (
            "listen = \"127.0.0.1:0\"\nstale_after = \"5 parsecs\"\n",
            "stale_after",
            "parsecs",
        ),
    ] {
        std::fs::write(&toml, text).unwrap();
        let o = run(vec!["serve".into(), "--config".into(), t.clone()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(&t) && err.contains(key), "{err}");
        assert!(err.matches(once).count() >= 1, "{err}");
        if key == "stale_after" {
            assert!(
                err.contains(&format!("{t}: stale_after")),
                "the file is named at its key: {err}"
            );
        }
    }
}

/// `serve --log-format json`: every log line is a JSON object with a level and a message.
#[tokio::test]
async fn serve_logs_json_lines() {
    let pki = Pki::new(&[]);
    let dir = TempDir::new("jsonlog");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let addr = free_port("127.0.0.1");
    let log = dir.path().join("collector.log");
    let mut c = spawn_collector_with(&pki, &db, addr, None, &log, &["--log-format", "json"]);
    wait_listening(addr).await;
    assert_eq!(c.terminate().code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "{l}");
        assert!(v["fields"]["message"].is_string(), "{l}");
    }
    assert!(text.contains("Collector listening."), "{text}");
}

fn certs(args: &[&str]) -> Output {
    collector_within(&[&["certs"], args].concat())
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn certs_refuse_senseless_validity_and_keep_existing_keys() {
    let dir = TempDir::new("certs");
    let d = dir.path().join("pki");
    let d = d.to_str().unwrap();
    let o = certs(&["init", "--dir", d, "--days", "0"]);
    fails_once(&o, &["--days 0", "at least 1 day"], "--days 0");
    assert!(!Path::new(d).join("ca.pem").exists(), "nothing written");
    let o = certs(&["init", "--dir", d, "--days", "100000"]);
    fails_once(&o, &["--days 100000", "at most 36500"], "--days 100000");
    let o = certs(&["init", "--dir", d]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = certs(&["issue", "--dir", d, "--host", "h1", "--days", "0"]);
    fails_once(&o, &["--days 0"], "at least 1 day");
    // The CA of `init` lasts 10 years: 100000 days outlive it, and the error says when it
    // expires and what the most is.
    let o = certs(&["issue", "--dir", d, "--host", "h1", "--days", "100000"]);
    fails_once(
        &o,
        &[
            "--days 100000 outlives the CA",
            "ca.pem expires",
            "Use --days 36",
        ],
        "outlives",
    );
    assert!(!Path::new(d).join("h1.pem").exists(), "nothing written");
    let o = certs(&["issue", "--dir", d, "--host", "h1", "--days", "30"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = Path::new(d).join("h1.key");
    let before = std::fs::read(&key).unwrap();
    let stamp = mtime(&key);
    // Issuing again refuses, naming the files; the key is untouched.
    let o = certs(&["issue", "--dir", d, "--host", "h1"]);
    fails_once(&o, &["h1.pem", "h1.key", "--force"], "already exist");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    assert_eq!(mtime(&key), stamp);
    // --force replaces them.
    let o = certs(&["issue", "--dir", d, "--host", "h1", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(&key).unwrap(), before);
}
