//! The shutdown signal both long-running commands wait for.

use std::future::Future;

/// Resolves on SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C). Call it first thing (on
/// the runtime): the handlers are installed by this call, not when the future is first
/// polled, so a SIGTERM that arrives while the program is still starting up stops it
/// gracefully instead of killing it (the default action until a handler exists).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(_)) => {
                let _ = term.recv().await;
            }
            (Err(_), _) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
