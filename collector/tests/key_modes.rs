//! `listenscope-collector serve` refuses a private key other users may read or replace,
//! naming the file, its mode and the fix (the check lives in `core::pem`, shared with the
//! agent). Before, a 0644 key was accepted silently. The real binary, real files.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use util::*;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `serve` with the Pki's files; returns its exit code and stderr once it exits, or
/// `None` if it is still serving after it had every chance to refuse (then it is stopped).
fn serve(pki: &Pki, dir: &TempDir) -> Option<(Option<i32>, String)> {
    let log = dir.join("serve.log");
    let mut p = Proc(
        Command::new(collector_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(format!(
                "sqlite://{}",
                dir.path().join("listenscope.db").display()
            ))
            .arg("--tls-ca")
            .arg(pki.path("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.path("server.pem"))
            .arg("--tls-key")
            .arg(pki.path("server.key"))
            .env("LISTENSCOPE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The key is read before the listener is served: either it exits, or it logs that it
    // listens.
    let ended = wait_for(Duration::from_secs(60), "serve to exit or listen", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Ok(Some(status)) = p.0.try_wait() {
            return Ok(Some((status.code(), text)));
        }
        if text.contains("Listening") || text.contains("listening") {
            return Ok(None);
        }
        Err(text)
    });
    p.kill();
    ended
}

#[test]
fn serve_refuses_a_private_key_others_can_read() {
    let pki = Pki::new(&[]);
    let dir = TempDir::new("keymodes");
    let key = pki.path("server.key");

    chmod(&key, 0o644);
    let (code, err) = serve(&pki, &dir).expect("serve accepted a key every user can read");
    assert_eq!(code, Some(2), "{err}");
    let want = format!(
        "{}: private key open to other users (mode 0644); restrict it with `chmod 600 {}`",
        key.display(),
        key.display()
    );
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
    // Said once.
    assert_eq!(err.matches("mode 0644").count(), 1, "{err}");

    // Group-readable but owned by someone else than root: refused too.
    chmod(&key, 0o640);
    std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
    let (code, err) = serve(&pki, &dir).expect("serve accepted a group-readable key of nobody");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("open to its group (mode 0640)"), "{err}");

    // 0600 but owned by another user, who could replace it.
    chmod(&key, 0o600);
    let (code, err) = serve(&pki, &dir).expect("serve accepted a key owned by nobody");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("private key owned by uid 65534") && err.contains("`chown 0 "),
        "{err}"
    );

    // Root-owned and readable by its group only (a Kubernetes secret with fsGroup, a
    // packaged root:listenscope 0640 key): accepted.
    std::os::unix::fs::chown(&key, Some(0), None).unwrap();
    chmod(&key, 0o640);
    assert_eq!(serve(&pki, &dir), None, "a root-owned 0640 key was refused");
}
