//! Root, commands, child processes, temporary directories, logs of a failed test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::Once;

/// Panics unless running as root (namespaces, veth links, mounts and cgroups need it).
/// The first call in a test process also deletes namespaces left by killed earlier runs.
pub fn require_root() {
    static SWEEP: Once = Once::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests build network namespaces and need root: run `scripts/test` as root \
             (CI does)"
        );
    }
    SWEEP.call_once(crate::netns::sweep_leftovers);
}

/// Runs a command, panicking with its stderr when it cannot start or fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL and reap (nothing happens if it already exited).
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then wait (the graceful shutdown path).
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: signalling our own, not yet reaped, child by pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().expect("wait for the child")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh directory `$TMPDIR/lst-TAG-PID-N`, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "lst-{tag}-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `path().join(p)`.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// On a failing test (dropped while panicking), prints the last lines of each file: logs of
/// the processes it ran, which usually live in a [`TempDir`] that goes with the test.
#[derive(Debug)]
pub struct LogsOnPanic(pub Vec<PathBuf>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for p in &self.0 {
            let Ok(s) = std::fs::read_to_string(p) else {
                continue;
            };
            let lines: Vec<&str> = s.lines().collect();
            eprintln!(
                "---- {} (last {} of {} lines)",
                p.display(),
                lines.len().min(40),
                lines.len()
            );
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}
