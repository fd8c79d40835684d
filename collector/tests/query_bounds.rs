//! `query` is bounded on both databases, run as the real binary: on SQLite a read-only
//! connection cannot be switched back or reach another file (pragmas that set, ATTACH,
//! `load_extension` refused while the statement is prepared); a result is capped in rows
//! (`--max-rows`) and in memory (`--max-bytes`), the process stopping there instead of
//! growing (its peak RSS measured by `wait4`), and a single value larger than the cap is
//! refused before it is made; on a throwaway PostgreSQL server a superuser or a role that
//! may write is refused unless `--allow-privileged-role` (then with a warning), while the
//! read-only role of docs/postgres.md runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::io::Read as _;
use std::process::{Command, Stdio};

use listenscope_collector::store::DbUrl;
use util::*;

/// What a finished `listenscope-collector` run left: exit code, stdout, stderr, and its
/// peak resident memory.
struct Run {
    code: i32,
    /// The first [`KEPT`] bytes of stdout.
    stdout: String,
    /// All of stdout's bytes, counted.
    stdout_bytes: u64,
    stderr: String,
    max_rss_bytes: u64,
}

/// Stdout kept for assertions; the rest is only counted (a streamed result of hundreds
/// of MiB is not held by the test either).
const KEPT: usize = 1 << 20;

/// Runs the collector with `args` and waits for it with `wait4`, which reports that one
/// child's peak RSS (other tests' children running at the same time do not count).
fn collector(args: &[&str]) -> Run {
    let mut child = Command::new(collector_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut kept, mut total) = (Vec::new(), 0u64);
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break (kept, total);
            }
            total += n as u64;
            let room = KEPT.saturating_sub(kept.len()).min(n);
            kept.extend_from_slice(&buf[..room]);
        }
    });
    let mut stderr = Vec::new();
    err.read_to_end(&mut stderr).unwrap();
    let (stdout, stdout_bytes) = reader.join().unwrap();
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value to be filled in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, not yet reaped (`child` is never waited by std).
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    std::mem::forget(child);
    assert!(libc::WIFEXITED(status), "killed by a signal: {status}");
    Run {
        code: libc::WEXITSTATUS(status),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stdout_bytes,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        max_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap() * 1024,
    }
}

/// A database with the collector's schema (a collector started once on it).
async fn schema(db: &DbUrl) {
    let pki = Pki::new(&["h1"]);
    InProcess::start(&pki, db).await.shutdown().await;
}

/// Asserts that `sql` is refused (exit 2, `refused`, `says`), printing nothing.
fn refused(url: &str, sql: &str, says: &str) {
    let r = collector(&["query", "--db", url, sql]);
    assert_eq!(r.code, 2, "{sql}: {}", r.stderr);
    assert!(
        r.stderr.contains("refused") && r.stderr.contains(says),
        "{sql}: {}",
        r.stderr
    );
    assert_eq!(r.stdout, "", "{sql}");
    assert_eq!(r.stderr.lines().count(), 1, "{sql}: {}", r.stderr);
}

/// ATTACH (of a new file or of another database), pragmas that set, pragmas that act,
/// DETACH, transaction control and `load_extension` are refused with what was refused;
/// pragmas that read still answer, in both forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_pragmas_attach_and_extensions() {
    let dir = TempDir::new("qb-auth");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    let other = DbUrl::Sqlite(dir.path().join("other.db"));
    schema(&db).await;
    schema(&other).await;
    let url = db.to_string();
    let created = dir.path().join("created.db");
    let attach_new = format!("ATTACH 'file:{}?mode=rwc' AS n", created.display());
    let attach_other = format!("ATTACH '{}' AS o", dir.path().join("other.db").display());
    for (sql, says) in [
        ("PRAGMA query_only = 0", "query_only"),
        ("PRAGMA query_only = OFF", "query_only"),
        ("PRAGMA writable_schema = ON", "writable_schema"),
        ("PRAGMA wal_checkpoint(TRUNCATE)", "wal_checkpoint"),
        ("PRAGMA optimize", "optimize"),
        ("PRAGMA user_version = 7", "user_version"),
        (attach_new.as_str(), "ATTACH"),
        (attach_other.as_str(), "ATTACH"),
        ("DETACH main", "DETACH"),
        (
            "SELECT load_extension('/nonexistent/libx.so')",
            "load_extension",
        ),
    ] {
        refused(&url, sql, says);
    }
    assert!(!created.exists(), "ATTACH created {}", created.display());
    for sql in [
        "PRAGMA user_version",
        "PRAGMA table_info(host)",
        "SELECT name FROM pragma_table_info('host') WHERE name = 'name'",
        "SELECT * FROM pragma_journal_mode",
    ] {
        let r = collector(&["query", "--db", &url, "--csv", "--no-header", sql]);
        assert_eq!(r.code, 0, "{sql}: {}", r.stderr);
        assert!(!r.stdout.is_empty(), "{sql}");
    }
    let r = collector(&[
        "query",
        "--db",
        &url,
        "--csv",
        "SELECT * FROM pragma_journal_mode",
    ]);
    assert_eq!(r.stdout, "journal_mode\nwal\n");
}

/// The caps stop the statement: rows past `--max-rows`, memory past `--max-bytes` (a
/// million rows of 1 KiB, which used 5.6 GB before, stop at the default 256 MiB), a single
/// `zeroblob(5e8)` refused before it is made; nothing printed, one error naming the flag;
/// within the caps the whole result prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_caps_rows_and_bytes() {
    let dir = TempDir::new("qb-caps");
    let db = DbUrl::Sqlite(dir.path().join("ls.db"));
    schema(&db).await;
    let url = db.to_string();
    let rows = |n: u64| {
        format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
             SELECT i, printf('%.1000c', 'x') AS pad FROM n"
        )
    };
    check_caps(
        &url,
        &rows(1_000_000),
        &rows(100),
        "SELECT zeroblob(500000000)",
    );
    // SQLite refuses to make the value: the process never holds it.
    let r = collector(&["query", "--db", &url, "SELECT zeroblob(500000000)"]);
    assert!(
        r.max_rss_bytes < 200 << 20,
        "zeroblob(5e8) took {} MiB",
        r.max_rss_bytes >> 20
    );
}

/// What both databases must show: `big` (a million rows of 1 KiB) stops at the default
/// byte cap: a table (built whole for its widths) within bounded memory and printing
/// nothing; CSV and JSON streamed, 256 MiB written while the process stays at a few
/// rows' memory, then the same error (JSON left unclosed, so no parser takes it for a
/// whole answer). `hundred` (100 rows) stops at `--max-rows 10` and at `--max-bytes
/// 64KiB`, and prints whole within the defaults; `one_value` (a single 500 MB value) is
/// refused at the default cap.
fn check_caps(url: &str, big: &str, hundred: &str, one_value: &str) {
    let r = collector(&["query", "--db", url, big]);
    assert_eq!(r.code, 2, "{url}: {}", r.stderr);
    assert!(
        r.stderr.contains("more than 256MiB") && r.stderr.matches("--max-bytes").count() == 1,
        "{url}: {}",
        r.stderr
    );
    assert_eq!(r.stdout, "", "{url}");
    // The cap plus the program: well under the 1 GB the rows would take as text alone.
    assert!(
        r.max_rss_bytes < 600 << 20,
        "{url}: the capped query peaked at {} MiB",
        r.max_rss_bytes >> 20
    );
    for format in ["--csv", "--json"] {
        let r = collector(&["query", "--db", url, format, big]);
        assert_eq!(r.code, 2, "{url} {format}: {}", r.stderr);
        assert!(
            r.stderr.contains("more than 256MiB") && r.stderr.matches("--max-bytes").count() == 1,
            "{url} {format}: {}",
            r.stderr
        );
        assert!(
            r.stdout_bytes > 200 << 20,
            "{url} {format}: only {} bytes streamed before the cap",
            r.stdout_bytes
        );
        // Streamed: the process holds a row at a time, not the 256 MiB it wrote.
        assert!(
            r.max_rss_bytes < 120 << 20,
            "{url} {format}: streaming peaked at {} MiB",
            r.max_rss_bytes >> 20
        );
    }

    let r = collector(&["query", "--db", url, "--max-rows", "10", hundred]);
    assert_eq!(r.code, 2, "{url}: {}", r.stderr);
    assert!(
        r.stderr.contains("more than 10 rows") && r.stderr.matches("--max-rows").count() == 1,
        "{url}: {}",
        r.stderr
    );
    assert_eq!(r.stdout, "", "{url}");

    let r = collector(&["query", "--db", url, "--max-bytes", "64KiB", hundred]);
    assert_eq!(r.code, 2, "{url}: {}", r.stderr);
    assert!(r.stderr.contains("more than 64KiB"), "{url}: {}", r.stderr);

    let r = collector(&["query", "--db", url, "--csv", "--no-header", hundred]);
    assert_eq!(r.code, 0, "{url}: {}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 100, "{url}");

    let r = collector(&["query", "--db", url, one_value]);
    assert_eq!(r.code, 2, "{url}: {}", r.stderr);
    assert!(
        r.stderr.contains("more than 256MiB") && r.stderr.contains("--max-bytes"),
        "{url}: {}",
        r.stderr
    );

    for bad in ["0", "12X", "100"] {
        let r = collector(&["query", "--db", url, "--max-bytes", bad, "SELECT 1"]);
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains("--max-bytes"), "{bad}: {}", r.stderr);
    }
}

/// On PostgreSQL: a superuser (who could `COPY … TO PROGRAM` or `pg_read_file`) and a
/// role that may write a table are refused, naming the role, what it can do and the fix;
/// the read-only role of docs/postgres.md runs, and is still refused a server file;
/// `--allow-privileged-role` runs as the superuser with a warning. The caps hold as on
/// SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_privileged_roles_and_caps_results() {
    require_root();
    let server = tokio::task::block_in_place(util::pg::PgServer::start);
    let owner = server.database("qb").await;
    let db: DbUrl = owner.parse().unwrap();
    schema(&db).await;
    // The read-only role exactly as docs/postgres.md creates it, and a role that may
    // write one table (no superuser).
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&owner)
        .await
        .unwrap();
    for sql in [
        "CREATE ROLE sre_ro LOGIN PASSWORD 'change-me-too'",
        "GRANT CONNECT ON DATABASE qb TO sre_ro",
        "GRANT USAGE ON SCHEMA public TO sre_ro",
        "GRANT SELECT ON hosts, current_listeners, hidden_ipv4_exposure, listener_changes, \
         listener_history, listener_versions, effective_exposure TO sre_ro",
        "ALTER ROLE sre_ro SET default_transaction_read_only = on",
        "ALTER ROLE sre_ro SET statement_timeout = '60s'",
        "CREATE ROLE writer LOGIN",
        "GRANT USAGE ON SCHEMA public TO writer",
        "GRANT SELECT ON hosts TO writer",
        "GRANT SELECT, INSERT ON setting TO writer",
        "CREATE ROLE creator LOGIN",
        "GRANT USAGE, CREATE ON SCHEMA public TO creator",
        "GRANT SELECT ON hosts TO creator",
        "CREATE ROLE file_reader LOGIN IN ROLE pg_read_server_files",
        "GRANT SELECT ON hosts TO file_reader",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    let ro = format!("postgres://sre_ro@127.0.0.1:{}/qb", server.port);
    let writer = format!("postgres://writer@127.0.0.1:{}/qb", server.port);
    let marker = std::env::temp_dir().join(format!("ls-qb-program-{}", std::process::id()));
    let program = format!("COPY (SELECT 1) TO PROGRAM 'touch {}'", marker.display());

    for sql in [
        "SELECT count(*) FROM hosts",
        "SELECT pg_read_file('/etc/hostname')",
        program.as_str(),
    ] {
        let r = collector(&["query", "--db", &owner, sql]);
        assert_eq!(r.code, 2, "{sql}: {}", r.stderr);
        let e = &r.stderr;
        assert!(
            e.contains("refused")
                && e.contains("role listenscope")
                && e.contains("superuser")
                && e.contains("docs/postgres.md")
                && e.matches("--allow-privileged-role").count() == 1,
            "{sql}: {e}"
        );
        assert_eq!(r.stdout, "", "{sql}");
    }
    assert!(!marker.exists(), "COPY TO PROGRAM ran");

    let r = collector(&["query", "--db", &writer, "SELECT count(*) FROM hosts"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("role writer may INSERT, UPDATE, DELETE or TRUNCATE table setting."),
        "{}",
        r.stderr
    );
    let file_reader = format!("postgres://file_reader@127.0.0.1:{}/qb", server.port);
    let r = collector(&["query", "--db", &file_reader, "SELECT count(*) FROM hosts"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("role file_reader is a member of pg_read_server_files."),
        "{}",
        r.stderr
    );
    let creator = format!("postgres://creator@127.0.0.1:{}/qb", server.port);
    let r = collector(&["query", "--db", &creator, "SELECT count(*) FROM hosts"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("role creator may CREATE in schema public."),
        "{}",
        r.stderr
    );

    let r = collector(&[
        "query",
        "--db",
        &ro,
        "--csv",
        "SELECT count(*) AS n FROM hosts",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "n\n0\n");
    assert_eq!(r.stderr, "");
    let r = collector(&["query", "--db", &ro, "SELECT pg_read_file('/etc/hostname')"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("permission denied"), "{}", r.stderr);

    let r = collector(&[
        "query",
        "--db",
        &owner,
        "--allow-privileged-role",
        "--csv",
        "SELECT count(*) AS n FROM hosts",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "n\n0\n");
    assert!(
        r.stderr.contains("WARN")
            && r.stderr.contains("listenscope")
            && r.stderr.contains("superuser"),
        "{}",
        r.stderr
    );

    let rows =
        |n: u64| format!("SELECT i, repeat('x', 1000) AS pad FROM generate_series(1, {n}) AS i");
    check_caps(
        &ro,
        &rows(1_000_000),
        &rows(100),
        "SELECT repeat('x', 500000000)",
    );
}
