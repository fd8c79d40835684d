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
            let mut child = postgres_command(&bin, dir.path(), port)
                .stderr(log)
                .spawn()
                .expect("start postgres");
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

/// How [`PgServer::stop`] ends the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGINT, a fast shutdown: sessions are terminated (SQLSTATE 57P01), their open
    /// transactions roll back, a checkpoint is written.
    Fast,
    /// SIGKILL to the postmaster, a crash: its backends notice it is gone and exit by
    /// themselves, and the next start recovers from the WAL.
    Crash,
}

impl PgServer {
    /// The server's directory: the data directory `data`, the log `postgres-PORT.log`.
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// The server's log ([`PgServer::restart`] appends to it).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join(format!("postgres-{}.log", self.port))
    }

    /// The postmaster is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the server and waits (bounded) until the postmaster and every process it had
    /// started are gone, so that [`PgServer::restart`] can start on the same data
    /// directory (PostgreSQL refuses while an old backend still holds its shared memory).
    pub fn stop(&mut self, how: Shutdown) {
        assert!(self.is_running(), "stop: the server is not running");
        let pid = self.child.id();
        let children = children_of(pid);
        let sig = match how {
            Shutdown::Fast => libc::SIGINT,
            Shutdown::Crash => libc::SIGKILL,
        };
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(pid as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("postgres did not exit within 30s of {how:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // After a crash the backends exit when they see the postmaster gone (they are no
        // longer our children: only their pid and start time identify them). Those still
        // there after 20s are killed.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut left: Vec<(u32, u64)> = children;
        loop {
            left.retain(|&(p, start)| alive(p, start));
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for &(p, start) in &left {
            if alive(p, start) {
                // SAFETY: a process our postmaster started (pid and start time checked).
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while left.iter().any(|&(p, start)| alive(p, start)) {
            assert!(
                Instant::now() < deadline,
                "postgres backends {left:?} survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the stopped server again on the same data directory and port, with the
    /// settings of [`PgServer::start`], and waits (bounded) until it accepts connections
    /// (crash recovery included). Call it on the test's own thread, like `start`.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "restart: the server is still running");
        let bin = bin_dir();
        let dir = self.dir().to_path_buf();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = postgres_command(&bin, &dir, self.port);
        cmd.stderr(log);
        self.child = cmd.spawn().expect("restart postgres");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "postgres exited on restart ({st}):\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && ready(&bin, self.port)
            {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "postgres did not accept connections within 60s of a restart:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `postgres` on `dir`/data at `port`, configured as [`PgServer::start`] does (keep the
/// two alike); stderr is left to the caller.
fn postgres_command(bin: &std::path::Path, dir: &std::path::Path, port: u16) -> Command {
    let data = dir.join("data");
    let sock = dir.join("sock");
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
        .current_dir(dir)
        .stdout(Stdio::null());
    // SAFETY: prctl between fork and exec is async-signal-safe. If the test dies without
    // dropping the server, the server goes with it. PDEATHSIG follows the *thread* that
    // started the server: start it on the test's own thread, never on a pooled one
    // (tokio's blocking threads exit when idle).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
            Ok(())
        });
    }
    cmd
}

/// A process's parent pid, state and start time (clock ticks after boot), from
/// `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u32, char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may contain anything.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, starttime field 22.
    Some((
        f.get(1)?.parse().ok()?,
        f.first()?.chars().next()?,
        f.get(19)?.parse().ok()?,
    ))
}

/// The processes whose parent is `pid`, each with its start time.
fn children_of(pid: u32) -> Vec<(u32, u64)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let (ppid, _, start) = proc_stat(p)?;
            (ppid == pid).then_some((p, start))
        })
        .collect()
}

/// The process `pid` started at `start` still runs (a zombie no longer holds anything).
fn alive(pid: u32, start: u64) -> bool {
    proc_stat(pid).is_some_and(|(_, state, s)| s == start && state != 'Z' && state != 'X')
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Already stopped (see [`PgServer::stop`]) and reaped: its pid may be reused.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
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
