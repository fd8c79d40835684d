//! `listenscope-agent run` refuses bad configuration with every problem named, and keeps
//! running (retrying) with a clear message when its certificate files go wrong after it
//! started.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;
mod ux_util;

use std::time::Duration;

use util::{LogsOnPanic, TempDir, agent_command as agent, wait_for};
use ux_util::{AgentFiles, Ca, log_line, start_run};

#[test]
fn missing_settings_are_listed_together() {
    let o = agent()
        .arg("run")
        .env_remove("LISTENSCOPE_COLLECTOR")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "collector is required",
        "tls_ca is required",
        "tls_cert is required",
        "tls_key is required",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    let o = agent()
        .args([
            "run",
            "--collector",
            "http://x:1",
            "--tls-ca",
            "a",
            "--tls-cert",
            "b",
            "--tls-key",
            "c",
        ])
        .args(["--interval", "fast", "--netns", "net:[x]"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("https://") && e.contains("interval") && e.contains("netns"),
        "{e}"
    );
}

#[test]
fn config_file_unknown_keys_are_errors() {
    let dir = TempDir::new("agentcfg");
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, "collector = \"https://c:7443\"\nintervall = \"5s\"\n").unwrap();
    let o = agent()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("unknown field") && e.contains("intervall"),
        "{e}"
    );
}

/// At start-up a missing file is fatal (exit 2: `ux_startup.rs`); once running, a file
/// that cannot be read (a rotation half done) is named, logged and retried, and the next
/// attempt reads the files again.
#[test]
fn certificates_unreadable_after_start_are_named_and_retried() {
    let dir = TempDir::new("agentcerts");
    let log = dir.join("agent.log");
    let _logs = LogsOnPanic(vec![log.clone()]);
    let ca = Ca::new("rotation CA");
    let files = AgentFiles::write(dir.path(), &ca, &ca, "h1");
    let mut args = vec!["--collector".to_string(), "https://127.0.0.1:9".into()];
    args.extend(files.args());
    let mut agent = start_run(&args, &log);
    // Running: connection refused, retried.
    log_line(&mut agent, &log, "connection refused");
    // The certificate goes away mid-rotation: named, not fatal.
    let saved = std::fs::read(&files.cert).unwrap();
    std::fs::remove_file(&files.cert).unwrap();
    let e = wait_for(
        Duration::from_secs(60),
        "the missing certificate logged twice",
        || {
            let e = std::fs::read_to_string(&log).unwrap_or_default();
            if let Ok(Some(status)) = agent.0.try_wait() {
                panic!("the agent exited ({status}) instead of retrying: {e}");
            }
            let missing = format!("{}: cannot read it", files.cert.display());
            match e.matches(&missing).count() {
                2.. => Ok(e),
                _ => Err(e),
            }
        },
    );
    assert!(e.contains("certs issue"), "{e}");
    // The new file is read on the next attempt.
    std::fs::write(&files.cert, saved).unwrap();
    let before = e.matches("connection refused").count();
    wait_for(
        Duration::from_secs(60),
        "attempts with the restored file",
        || {
            let e = std::fs::read_to_string(&log).unwrap_or_default();
            if e.matches("connection refused").count() > before {
                Ok(())
            } else {
                Err(e)
            }
        },
    );
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited");
}
