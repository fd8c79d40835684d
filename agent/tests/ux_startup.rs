//! `listenscope-agent run` at start-up and while it runs: certificate files that cannot be
//! used stop it at once (exit 2, each file named, the fix said once) instead of a retry
//! loop; a private key others may read is refused; `--log-format json` logs JSON lines;
//! a closed stderr (`run 2>&1 | head -1`) never panics it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod ux_util;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use listenscope_testkit::{Proc, TempDir, wait_for};
use ux_util::{AgentFiles, Ca, WAIT, agent};

/// How a run ended: its exit code and stderr.
struct Ended {
    code: Option<i32>,
    stderr: String,
}

/// Runs `listenscope-agent ARGS…` to its end, which must come (bounded: before this
/// change a bad file meant retrying forever).
fn run_to_end(args: &[String]) -> Ended {
    let dir = TempDir::new("ux-run");
    let log = dir.join("stderr");
    let mut child = Proc(
        agent()
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let code = wait_for(WAIT, "the agent to exit", || match child.0.try_wait() {
        Ok(Some(status)) => Ok(status.code()),
        _ => Err(std::fs::read_to_string(&log).unwrap_or_default()),
    });
    Ended {
        code,
        stderr: std::fs::read_to_string(&log).unwrap(),
    }
}

fn run_args(files: &AgentFiles) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--collector".into(),
        "https://127.0.0.1:9".into(),
        "--netns".into(),
        "current".into(),
    ];
    args.extend(files.args());
    args
}

#[test]
fn missing_files_stop_run_at_once_each_named_and_the_fix_said_once() {
    let dir = TempDir::new("ux-missing");
    let files = AgentFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("h1.pem"),
        key: dir.join("h1.key"),
    };
    let o = run_to_end(&run_args(&files));
    let e = &o.stderr;
    assert_eq!(o.code, Some(2), "{e}");
    for f in [&files.ca, &files.cert, &files.key] {
        let named = format!("{}: no such file", f.display());
        assert_eq!(e.matches(&named).count(), 1, "{named:?} not once in:\n{e}");
    }
    assert_eq!(e.matches("certs issue").count(), 1, "{e}");
    assert!(!e.contains("os error"), "{e}");
}

#[test]
fn the_shipped_config_says_which_files_to_create() {
    for f in [
        "/etc/listenscope/ca.pem",
        "/etc/listenscope/agent.pem",
        "/etc/listenscope/agent.key",
    ] {
        assert!(
            !std::path::Path::new(f).exists(),
            "{f} exists on this machine: this test expects a machine without the agent's files"
        );
    }
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml");
    let o = run_to_end(&["run".into(), "--config".into(), config.into()]);
    let e = &o.stderr;
    assert_eq!(o.code, Some(2), "{e}");
    for f in [
        "/etc/listenscope/ca.pem: no such file",
        "/etc/listenscope/agent.pem: no such file",
        "/etc/listenscope/agent.key: no such file",
        "listenscope-collector certs issue",
    ] {
        assert_eq!(e.matches(f).count(), 1, "{f:?} not once in:\n{e}");
    }
}

#[test]
fn unusable_files_stop_run_with_the_cause() {
    let dir = TempDir::new("ux-unusable");
    let ca = Ca::new("ux CA");
    let files = AgentFiles::write(dir.path(), &ca, &ca, "h1");

    // A key every user can read.
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run_to_end(&run_args(&files));
    let e = &o.stderr;
    assert_eq!(o.code, Some(2), "{e}");
    let want = format!(
        "{}: private key open to other users (mode 0644); restrict it with `chmod 600 {}`",
        files.key.display(),
        files.key.display()
    );
    assert!(e.contains(&want), "{want:?} not in:\n{e}");
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The key of another certificate.
    let other_dir = TempDir::new("ux-unusable2");
    let other = AgentFiles::write(other_dir.path(), &ca, &ca, "h2");
    let mut mixed = files.clone();
    mixed.key = other.key.clone();
    let o = run_to_end(&run_args(&mixed));
    let e = &o.stderr;
    assert_eq!(o.code, Some(2), "{e}");
    assert!(
        e.contains(&format!(
            "{}: this private key does not belong to the certificate {}",
            other.key.display(),
            files.cert.display()
        )),
        "{e}"
    );

    // A CA file that is not PEM.
    std::fs::write(&files.ca, "not a certificate").unwrap();
    let o = run_to_end(&run_args(&files));
    let e = &o.stderr;
    assert_eq!(o.code, Some(2), "{e}");
    assert!(
        e.contains(&format!("{}: no PEM certificate in it", files.ca.display())),
        "{e}"
    );
}

#[test]
fn log_format_json_writes_json_lines() {
    let dir = TempDir::new("ux-json");
    let ca = Ca::new("ux CA");
    let files = AgentFiles::write(dir.path(), &ca, &ca, "h1");
    let log = dir.join("agent.log");
    let mut args = vec!["--log-format".to_string(), "json".into()];
    args.extend(run_args(&files).into_iter().skip(1));
    let mut p = Proc(
        agent()
            .arg("run")
            .args(&args)
            .args(["--reconnect-max", "200ms"])
            .env("LISTENSCOPE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let text = wait_for(WAIT, "a failed session and a reconnect logged", || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if t.contains("Reconnecting.") {
            Ok(t)
        } else {
            Err(t)
        }
    });
    p.kill();
    let mut messages = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    for m in ["First scan done.", "Session failed.", "Reconnecting."] {
        assert!(messages.iter().any(|x| x == m), "{m} missing: {messages:?}");
    }
}

/// `run … 2>&1 | head -1`: the reader goes away after one line; the agent goes on (it is
/// a service; its log has nowhere to go) instead of panicking on the next log line.
#[test]
fn a_closed_stderr_does_not_stop_run() {
    let dir = TempDir::new("ux-pipe");
    let ca = Ca::new("ux CA");
    let files = AgentFiles::write(dir.path(), &ca, &ca, "h1");
    // Every attempt is one accepted connection, closed at once: a log line each.
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut args = run_args(&files);
    args[2] = format!("https://{}", collector.local_addr().unwrap());
    let mut p = Proc(
        agent()
            .args(&args)
            .args(["--reconnect-max", "200ms"])
            .env("LISTENSCOPE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The first lines (the watch mode, then the first scan), then the reader goes away.
    let mut first = String::new();
    let mut reader = BufReader::new(p.0.stderr.take().unwrap());
    for _ in 0..5 {
        reader.read_line(&mut first).unwrap();
        if first.contains("First scan done.") {
            break;
        }
    }
    assert!(first.contains("First scan done."), "{first}");
    drop(reader);
    // Three attempts after the pipe closed, each logged (into the closed pipe). Before,
    // the first log line into the closed pipe panicked the agent (exit 101).
    collector.set_nonblocking(true).unwrap();
    let mut attempts = 0;
    wait_for(
        WAIT,
        "three connection attempts after stderr closed",
        || {
            if let Ok(Some(status)) = p.0.try_wait() {
                panic!("the agent ended ({status}) when its stderr closed");
            }
            while let Ok((conn, _)) = collector.accept() {
                drop(conn);
                attempts += 1;
            }
            if attempts >= 3 {
                Ok(())
            } else {
                Err(format!("{attempts} attempts"))
            }
        },
    );
    // The last attempt's lines are written after its connection closed: a bounded wait
    // for an exit that must not come.
    let exited = (0..20).find_map(|_| {
        std::thread::sleep(Duration::from_millis(100));
        p.0.try_wait().unwrap()
    });
    assert!(
        exited.is_none(),
        "the agent ended ({exited:?}) when its stderr closed"
    );
    p.kill();
}
