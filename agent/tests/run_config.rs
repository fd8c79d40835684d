//! `listenscope-agent run` refuses bad configuration with every problem named, and keeps
//! running (retrying) with a clear message when its certificate files are wrong.

use std::process::{Command, Stdio};
use std::time::Duration;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_listenscope-agent"))
}

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
    let dir = std::env::temp_dir().join(format!("lst-agentcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_certificates_are_named_and_retried() {
    let mut child = agent()
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
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/nonexistent/ca.pem: cannot read it"), "{e}");
    assert!(
        e.matches("Reconnecting.").count() >= 2,
        "it keeps retrying: {e}"
    );
}
