//! Headless Chromium for tests that look at pages as a browser does: the DOM after the
//! HTML parser (and any script) ran, and a screenshot.
//!
//! [`Chromium::find`] finds Debian's Chromium (`apt-get install chromium
//! fonts-dejavu-core`; `scripts/test` installs both when missing) or the binary named by
//! `LISTENSCOPE_CHROMIUM`, and says how to install it when there is none. Each call starts
//! one browser on a fresh profile, bounded in time (60 s unless [`Chromium::timeout`]
//! says otherwise), and returns only after every process of that browser is gone and its
//! temporary directory removed.
//!
//! ## How it is run, and why
//!
//! The binary is `/usr/lib/chromium/chromium`, not Debian's `/usr/bin/chromium` wrapper:
//! the wrapper sources `/etc/chromium.d/*`, which adds flags of its own (extensions,
//! `--enable-remote-extensions`), exports Google API keys, and on some machines prints
//! `[: …: unexpected operator` (its `/dev/shm` check reads two lines from `findmnt`).
//!
//! | flag | why |
//! |---|---|
//! | `--headless` | the browser without a display (no Xvfb) |
//! | `--no-sandbox` | tests run as root, and Chromium refuses to start as root with its sandbox; the pages are the test's own, on loopback |
//! | `--disable-gpu` | software rendering |
//! | `--no-first-run`, `--no-default-browser-check` | no first-run work |
//! | `--user-data-dir=TMP/profile` | a fresh profile per call, removed afterwards |
//! | `--disable-background-networking`, `--disable-component-update`, `--disable-sync`, `--disable-extensions`, `--disable-default-apps`, `--no-pings`, `--disable-domain-reliability`, `--disable-client-side-phishing-detection`, `--disable-breakpad`, `--metrics-recording-only` | no background services: without them a page load also looks up `accounts.google.com` and `clients2.google.com` (seen with `strace -f -e trace=%network`) |
//! | `--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE ::1 , EXCLUDE localhost` | every other host name fails at once, without a DNS query; IP literals go through these rules too, so the loopback ones are excluded by name |
//! | `--hide-scrollbars`, `--force-device-scale-factor=1`, `--window-size=W,H` | a screenshot is exactly W×H pixels of the page |
//! | `--dump-dom` / `--screenshot=PATH` | what to do once the page has loaded |
//!
//! The profile also gets `Default/Preferences` with `alternate_error_pages.enabled` off:
//! otherwise a main-frame `ERR_NAME_NOT_RESOLVED` starts Chromium's DNS probe, which
//! sends real queries for `google.com` to `8.8.8.8` and the system resolver. `HOME`,
//! `XDG_CONFIG_HOME`, `XDG_CACHE_HOME` and `TMPDIR` point into the call's temporary
//! directory: otherwise Chromium writes `~/.config/chromium/Crash Reports` and
//! `~/.cache/dconf`. With all this, `strace` shows no packet leaving loopback; the one
//! connect left is a UDP `connect()` to `2001:4860:4860::8888` followed by
//! `getsockname()`, Chromium asking the kernel which IPv6 source address it would use,
//! which sends nothing. URLs other than `http(s)://` on `127.0.0.1`, `[::1]` or
//! `localhost` are refused before anything starts.
//!
//! ## What Chromium does that callers must know
//!
//! - It exits 0 when the page fails to load (connection refused, name not resolved),
//!   prints nothing on stdout and says `Page load failed: net::ERR_…` on stderr. That is
//!   an error here, with that line.
//! - An HTTP error status is not a load failure: a 404 page's DOM is returned as any other.
//! - `--dump-dom` prints the serialized DOM after the load event: the parser's work
//!   (`<tbody>` added, attributes quoted, unclosed elements closed) and any script's.
//! - Some ports are refused outright (`ERR_UNSAFE_PORT`: 1, 9, 6000, …); ports the kernel
//!   hands out for `127.0.0.1:0` are never among them.
//! - It logs D-Bus connection errors on stderr (there is no bus here); they are noise.
//!
//! A call that runs past its timeout kills the browser (SIGKILL to the process it
//! started), then each process left in its process group, by pid: Chromium's helpers
//! (zygotes, renderers, the GPU and network services) stay in the group of the browser
//! process, and the group's id stays ours while that process is not reaped. After a
//! normal exit the helpers get 5 s to follow (they take well under a second), then are
//! killed the same way; the call returns when none is left.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::TempDir;

/// The binary Debian's `chromium` package installs (behind the `/usr/bin/chromium`
/// wrapper).
const DEBIAN_BINARY: &str = "/usr/lib/chromium/chromium";

/// Flags of every run (see the module documentation).
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-pings",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE ::1 , EXCLUDE localhost",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
];

/// What the profile starts with: no DNS probe after a failed name lookup.
const PREFERENCES: &str = r#"{"alternate_error_pages":{"enabled":false}}"#;

/// Most of a DOM this kit reads (more is an error, not a truncated page).
const MAX_DOM: usize = 64 << 20;
/// How much of Chromium's stderr is kept (its end) for error messages.
const MAX_STDERR: usize = 64 << 10;
/// The bound on one call unless [`Chromium::timeout`] gives another.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the browser's helper processes get to exit after it did, before SIGKILL.
const HELPERS_GRACE: Duration = Duration::from_secs(5);

/// A Chromium that can run headless here.
#[derive(Debug, Clone)]
pub struct Chromium {
    program: PathBuf,
    version: String,
    timeout: Duration,
}

impl Chromium {
    /// `LISTENSCOPE_CHROMIUM` if set, else Debian's `/usr/lib/chromium/chromium`, else
    /// `chromium` or `chromium-browser` on `PATH`; checked by running `--version`. The
    /// error names what was tried and the fix.
    pub fn find() -> Result<Chromium, String> {
        let mut tried = Vec::new();
        let candidates: Vec<PathBuf> = match std::env::var_os("LISTENSCOPE_CHROMIUM") {
            Some(p) => vec![PathBuf::from(p)],
            None => {
                let mut c = vec![PathBuf::from(DEBIAN_BINARY)];
                let path = std::env::var_os("PATH").unwrap_or_default();
                for dir in std::env::split_paths(&path) {
                    for name in ["chromium", "chromium-browser"] {
                        c.push(dir.join(name));
                    }
                }
                c
            }
        };
        for program in candidates {
            if !program.is_file() {
                continue;
            }
            let probe = Chromium {
                program: program.clone(),
                version: String::new(),
                // Starting it takes a second or two, even on a busy machine.
                timeout: Duration::from_secs(30),
            };
            match probe.execute(&["--version".to_string()]) {
                Ok(run)
                    if run.stdout.starts_with(b"Chromium")
                        || run.stdout.starts_with(b"Google Chrome") =>
                {
                    return Ok(Chromium {
                        program,
                        version: String::from_utf8_lossy(&run.stdout).trim().to_string(),
                        timeout: DEFAULT_TIMEOUT,
                    });
                }
                Ok(run) => tried.push(format!(
                    "{} (`--version` said {:?}, {})",
                    program.display(),
                    String::from_utf8_lossy(&run.stdout).trim(),
                    tail(&run.stderr)
                )),
                Err(e) => tried.push(format!("{} ({e})", program.display())),
            }
        }
        if tried.is_empty() {
            tried.push(match std::env::var_os("LISTENSCOPE_CHROMIUM") {
                Some(p) => format!("LISTENSCOPE_CHROMIUM={} is not a file", p.display()),
                None => format!("no {DEBIAN_BINARY}, and no chromium or chromium-browser on PATH"),
            });
        }
        Err(format!(
            "headless Chromium is needed and none runs here ({}). Install it: \
             `apt-get install chromium fonts-dejavu-core` (Debian; scripts/test does this \
             when it can), or point LISTENSCOPE_CHROMIUM at a Chromium binary",
            tried.join("; ")
        ))
    }

    /// The binary.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// What `--version` said (`Chromium 156.0.8078.108 …`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The same browser with another bound on each call (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Chromium {
        self.timeout = timeout;
        self
    }

    /// The DOM of `url` after it loaded, serialized (`--dump-dom`). Panics on any error.
    pub fn dump_dom(&self, url: &str) -> String {
        self.try_dump_dom(url)
            .unwrap_or_else(|e| panic!("dump the DOM of {url}: {e}"))
    }

    /// A `width`×`height` PNG screenshot of `url` written to `path`. Panics on any error.
    pub fn screenshot(&self, url: &str, path: &Path, width: u32, height: u32) {
        self.try_screenshot(url, path, width, height)
            .unwrap_or_else(|e| panic!("screenshot of {url} to {}: {e}", path.display()))
    }

    /// [`Chromium::dump_dom`], with the error returned.
    pub fn try_dump_dom(&self, url: &str) -> Result<String, String> {
        loopback_only(url)?;
        let run = self.execute(&["--dump-dom".to_string(), url.to_string()])?;
        load_failed(&run)?;
        if run.stdout.is_empty() {
            return Err(format!("Chromium printed no DOM: {}", tail(&run.stderr)));
        }
        String::from_utf8(run.stdout).map_err(|e| format!("the DOM is not UTF-8: {e}"))
    }

    /// [`Chromium::screenshot`], with the error returned. A file already at `path` is
    /// replaced (removed first, so an old one never passes for a new one).
    pub fn try_screenshot(
        &self,
        url: &str,
        path: &Path,
        width: u32,
        height: u32,
    ) -> Result<(), String> {
        loopback_only(url)?;
        let path = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("remove the old {}: {e}", path.display())),
        }
        let run = self.execute(&[
            format!("--window-size={width},{height}"),
            format!("--screenshot={}", path.display()),
            url.to_string(),
        ])?;
        load_failed(&run)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > 0 => Ok(()),
            Ok(_) => Err(format!("Chromium wrote an empty {}", path.display())),
            Err(e) => Err(format!(
                "Chromium wrote no {} ({e}): {}",
                path.display(),
                tail(&run.stderr)
            )),
        }
    }

    /// Runs the browser with `args` on a fresh profile, bounded by the timeout; returns
    /// once every process it started is gone.
    fn execute(&self, args: &[String]) -> Result<Run, String> {
        let dir = TempDir::new("chromium");
        let profile = dir.join("profile");
        let home = dir.join("home");
        let tmp = dir.join("tmp");
        for d in [profile.join("Default"), home.clone(), tmp.clone()] {
            std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let prefs = profile.join("Default").join("Preferences");
        std::fs::write(&prefs, PREFERENCES).map_err(|e| format!("{}: {e}", prefs.display()))?;

        let mut cmd = Command::new(&self.program);
        cmd.args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("TMPDIR", &tmp)
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: its helpers stay in it, so they can be found.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.program.display()))?;
        let stdout = read_bounded(child.stdout.take(), MAX_DOM, false);
        let stderr = read_bounded(child.stderr.take(), MAX_STDERR, true);

        let deadline = Instant::now() + self.timeout;
        let mut timed_out = false;
        while !exited(&child) {
            if Instant::now() >= deadline {
                timed_out = true;
                // SAFETY: signalling the process this call started, not yet reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Helpers still there after the grace are killed: a test must not leave them.
        end_group(
            &child,
            if timed_out {
                Duration::ZERO
            } else {
                HELPERS_GRACE
            },
        );
        let status = child
            .wait()
            .map_err(|e| format!("wait for Chromium: {e}"))?;
        let (stdout, stdout_full) = collect(stdout, "stdout")?;
        let (stderr, _) = collect(stderr, "stderr")?;
        drop(dir);
        if timed_out {
            return Err(format!(
                "Chromium did not finish within {:?}; killed: {}",
                self.timeout,
                tail(&stderr)
            ));
        }
        if stdout_full {
            return Err(format!("Chromium's output is larger than {MAX_DOM} bytes"));
        }
        if !status.success() {
            return Err(format!("Chromium failed ({status}): {}", tail(&stderr)));
        }
        Ok(Run { stdout, stderr })
    }
}

/// What one run printed.
struct Run {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Chromium's `Page load failed: net::ERR_…` (it still exits 0), as an error.
fn load_failed(run: &Run) -> Result<(), String> {
    let err = String::from_utf8_lossy(&run.stderr);
    match err.lines().find_map(|l| l.split_once("Page load failed: ")) {
        Some((_, why)) => Err(format!("Page load failed: {why}")),
        None => Ok(()),
    }
}

/// Only `http(s)://` URLs on 127.0.0.1, [::1] or localhost: the browser resolves nothing
/// else (see the module documentation), and tests send traffic only to loopback.
fn loopback_only(url: &str) -> Result<(), String> {
    let refuse = || {
        Err(format!(
            "{url:?}: only http(s) URLs on 127.0.0.1, [::1] or localhost are loaded \
             (tests stay on loopback, and the browser resolves no other name)"
        ))
    };
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return refuse();
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if authority.contains('@') {
        return refuse();
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return refuse(),
        }
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    match host.to_ascii_lowercase().as_str() {
        "127.0.0.1" | "::1" | "localhost" => Ok(()),
        _ => refuse(),
    }
}

/// Reads a pipe to its end on a thread, keeping at most `cap` bytes (the first, or with
/// `keep_end` the last); the result says whether more came.
fn read_bounded(
    pipe: Option<impl Read + Send + 'static>,
    cap: usize,
    keep_end: bool,
) -> mpsc::Receiver<std::io::Result<(Vec<u8>, bool)>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let mut out = Vec::new();
            let mut more = false;
            if let Some(mut pipe) = pipe {
                let mut buf = [0u8; 64 << 10];
                loop {
                    let n = match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    out.extend_from_slice(&buf[..n]);
                    if out.len() > cap {
                        more = true;
                        if keep_end {
                            out.drain(..out.len() - cap);
                        } else {
                            out.truncate(cap);
                        }
                    }
                }
            }
            Ok((out, more))
        })();
        let _ = tx.send(result);
    });
    rx
}

/// The output a reader thread collected. Every process that could hold the pipe is gone
/// by now, so it ends at once; the bound is for a process outside the group holding it.
fn collect(
    rx: mpsc::Receiver<std::io::Result<(Vec<u8>, bool)>>,
    what: &str,
) -> Result<(Vec<u8>, bool), String> {
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("read Chromium's {what}: {e}")),
        Err(_) => Err(format!(
            "Chromium's {what} stayed open 10 s after its processes were gone"
        )),
    }
}

/// The last lines of Chromium's stderr, without its D-Bus noise.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("dbus") && !l.trim().is_empty())
        .collect();
    let shown = lines[lines.len().saturating_sub(10)..].join("\n");
    if shown.is_empty() {
        "(nothing on stderr)".into()
    } else {
        shown
    }
}

/// The child has exited (it is not reaped: its pid, and so its process group's id, stay
/// ours until [`Child::wait`]).
fn exited(child: &Child) -> bool {
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with WNOWAIT (it stays unreaped) writes only `info`.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is set by waitid (0 when the child has not exited).
    r == 0 && unsafe { info.si_pid() } != 0
}

/// Waits up to `grace` for the other processes of the child's process group to exit, then
/// SIGKILLs, by pid, each one still there (again, until the group is empty: one could
/// have been forked meanwhile), for at most 10 s. Returns how many it killed. The child
/// itself must have exited or been killed, and not be reaped: until it is, the group's id
/// is its pid and cannot name anyone else's processes.
fn end_group(child: &Child, grace: Duration) -> usize {
    let group = child.id();
    let deadline = Instant::now() + grace;
    while !group_members(group).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut killed = std::collections::BTreeSet::new();
    let stop = Instant::now() + Duration::from_secs(10);
    loop {
        let members = group_members(group);
        if members.is_empty() || Instant::now() >= stop {
            return killed.len();
        }
        for pid in members {
            // SAFETY: a process of our unreaped child's process group (see above).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes (not zombies) of process group `group`, other than its leader.
fn group_members(group: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != group)
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the command name (in parentheses, may contain anything): state, ppid,
            // pgrp.
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            f.len() > 2 && f[0] != "Z" && f[0] != "X" && f[2].parse() == Ok(group)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::loopback_only;

    #[test]
    fn only_loopback_urls() {
        for ok in [
            "http://127.0.0.1:8080/",
            "http://127.0.0.1",
            "https://[::1]:443/x?y#z",
            "http://localhost:1234/ports?port=80",
            "http://LOCALHOST/",
        ] {
            assert_eq!(loopback_only(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://example.com/",
            "http://127.0.0.2/",
            "http://127.0.0.1.example.com/",
            "http://evil@127.0.0.1/",
            "http://[::1]x/",
            "file:///etc/passwd",
            "ftp://127.0.0.1/",
            "127.0.0.1:80",
            "http://10.0.0.1/",
        ] {
            assert!(
                loopback_only(bad).is_err_and(|e| e.contains("loopback")),
                "{bad}"
            );
        }
    }
}
