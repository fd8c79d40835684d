//! `listenscope-agent run` refuses bad configuration with every problem named, and keeps
//! running (retrying) with a clear message when its certificate files are wrong.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::process::Stdio;
use std::time::Duration;

use util::{Proc, TempDir, agent_command as agent, wait_for};

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
        .args(["--interval", "fast", "--netns", "blue"])
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

#[test]
fn unreadable_certificates_are_named_and_retried() {
    let dir = TempDir::new("agentcerts");
    let log = dir.join("agent.log");
    let mut agent = Proc(
        agent()
            .args([
                "run",
                "--collector",
                "https://127.0.0.1:9",
                "--tls-ca",
                "/nonexistent/ca.pem",
            ])
            .args([
                "--tls-cert",
                "/nonexistent/h1.pem",
                "--tls-key",
                "/nonexistent/h1.key",
            ])
            .args(["--reconnect-max", "200ms", "--netns", "current"])
            .env("LISTENSCOPE_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // It keeps running and retrying: a second reconnect is logged, the process still runs.
    let e = wait_for(Duration::from_secs(20), "two reconnect attempts", || {
        let e = std::fs::read_to_string(&log).unwrap_or_default();
        if let Ok(Some(status)) = agent.0.try_wait() {
            panic!("the agent exited ({status}) instead of retrying: {e}");
        }
        match e.matches("Reconnecting.").count() {
            2.. => Ok(e),
            _ => Err(e),
        }
    });
    assert!(e.contains("/nonexistent/ca.pem: cannot read it"), "{e}");
}
