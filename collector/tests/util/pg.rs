//! A throwaway PostgreSQL server per test, started from the installed server binaries:
//! `initdb` into a temporary directory (as an unprivileged user: PostgreSQL refuses root),
//! then `postgres` on a private port and socket directory, stopped and removed on drop.
//! No system service, no fixed port. Missing binaries fail the test with the install
//! instruction instead of skipping it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, free_port};

/// Unprivileged uid/gid the server runs as (`nobody`).
const UID: u32 = 65534;

/// Where `initdb` and `postgres` are: `LISTENSCOPE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("LISTENSCOPE_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    (bin.join("initdb").exists() && bin.join("postgres").exists())
                        .then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries (initdb, postgres) were not found under \
             /usr/lib/postgresql/*/bin. Install them: `apt-get install postgresql` (Debian; \
             scripts/test does this when it can), or point LISTENSCOPE_PG_BIN at their directory."
        ),
    }
}

/// A running server; stopped (SIGQUIT, then SIGKILL) and deleted on drop.
pub struct PgServer {
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        for p in [dir.path(), sock.as_path()] {
            std::os::unix::fs::chown(p, Some(UID), Some(UID)).unwrap();
        }
        let out = Command::new(bin.join("initdb"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "listenscope",
            ])
            .args(["-E", "UTF8", "--no-sync", "--locale=C"])
            .uid(UID)
            .gid(UID)
            .current_dir(dir.path())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A few attempts: the port is chosen free but could be taken before postgres binds.
        for _ in 0..5 {
            let port = free_port("127.0.0.1").port();
            let log =
                std::fs::File::create(dir.path().join(format!("postgres-{port}.log"))).unwrap();
            let mut cmd = Command::new(bin.join("postgres"));
            cmd.args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", &format!("unix_socket_directories={}", sock.display())])
                .args([
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ])
                .args(["-c", "max_connections=50", "-c", "shared_buffers=32MB"])
                .uid(UID)
                .gid(UID)
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(log);
            // SAFETY: prctl between fork and exec is async-signal-safe. If the test dies
            // without dropping us, the server goes with it. PDEATHSIG follows the *thread*
            // that started the server: start it on the test's own thread, never on a
            // pooled one (tokio's blocking threads exit when idle).
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().expect("start postgres");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: port taken or bad config; retry with another port
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && ready(&bin, port) {
                    return PgServer {
                        port,
                        child,
                        _dir: dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let logs: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        panic!("postgres did not start:\n{}", logs.join("\n---\n"));
    }

    /// A URL for a new, empty database on this server.
    pub async fn database(&self, name: &str) -> String {
        let admin = format!("postgres://listenscope@127.0.0.1:{}/postgres", self.port);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
            .expect("connect to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        format!("postgres://listenscope@127.0.0.1:{}/{name}", self.port)
    }
}

/// The server accepts connections (not just the TCP port: startup may still be running).
fn ready(bin: &std::path::Path, port: u16) -> bool {
    let isready = bin.join("pg_isready");
    if !isready.exists() {
        return true;
    }
    Command::new(isready)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "listenscope",
            "-d",
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown (nothing to keep).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
