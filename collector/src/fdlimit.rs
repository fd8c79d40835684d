//! The open-file limit and the session cap: every agent session holds one socket, so a
//! collector whose limit is too low fails with "Too many open files" long before its
//! `max_sessions` (systemd's default soft limit is 1024). At start-up the soft limit is
//! raised to the hard one, and the cap is fitted to what the limit allows.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::ingest::DEFAULT_MAX_SESSIONS;

/// Open files kept for everything but sessions and connections in admission: database
/// files and connections, the listening sockets, logs.
pub const RESERVE: u64 = 256;

/// Raises the soft open-file limit to the hard limit; returns the limit now in force
/// (`None`: unlimited or unknown).
pub fn raise() -> Option<u64> {
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let wanted = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, wanted) {
            tracing::warn!(error = %e, "Cannot raise the open-file limit to its hard limit.");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Sessions that fit an open-file limit, with `pending` connections in admission (TLS
/// handshakes, HTTP/2 prefaces: `AdmissionLimits::most_pending`).
pub fn budget(limit: Option<u64>, pending: usize) -> usize {
    match limit {
        None => usize::MAX,
        Some(l) => l.saturating_sub(RESERVE + pending as u64) as usize,
    }
}

/// The session cap to use: `wanted` (explicit) or the default, against the open-file
/// limit (less `pending` connections in admission), with a warning that names the fix
/// when they do not fit.
pub fn fit_sessions(wanted: Option<usize>, pending: usize) -> usize {
    let limit = raise();
    let fits = budget(limit, pending);
    let shown = limit.map_or("unlimited".to_string(), |l| l.to_string());
    match wanted {
        Some(n) if n > fits => {
            tracing::warn!(
                max_sessions = n,
                open_file_limit = %shown,
                sessions_that_fit = fits,
                "max_sessions needs more open files than allowed: sessions past the limit \
                 will fail with 'Too many open files'. Raise the limit (systemd: \
                 LimitNOFILE=65536 in the unit, as deploy/systemd ships it) or lower \
                 --max-sessions."
            );
            n
        }
        Some(n) => n,
        None if fits < DEFAULT_MAX_SESSIONS / 4 => {
            let n = fits.max(1);
            tracing::warn!(
                max_sessions = n,
                open_file_limit = %shown,
                "The open-file limit allows only this many agent sessions (default {}). \
                 Raise it (systemd: LimitNOFILE=65536) for a larger fleet.",
                DEFAULT_MAX_SESSIONS
            );
            n
        }
        None => fits.min(DEFAULT_MAX_SESSIONS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        // The defaults: 512 + 256 connections in admission.
        assert_eq!(budget(Some(20_000), 768), 18_976);
        assert_eq!(budget(Some(100), 768), 0);
        assert_eq!(budget(None, 768), usize::MAX);
    }
}
