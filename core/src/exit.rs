//! Exit statuses of both programs, grep-like so scripts can branch on them:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done; for a search (`scan --trap-only`, `exposure`): something was found |
//! | 1 | a search found nothing |
//! | 2 | error (bad flags, configuration, files, database, network) |
//! | 3 | `scan` only: the scan is partial (some namespaces or owners could not be read, e.g. without root); what it printed is true but incomplete |

/// How a command that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; a search found something.
    Success,
    /// A search found nothing.
    NothingFound,
    /// A scan that could not read everything.
    Partial,
}

/// The exit code of a failed command.
pub const ERROR: u8 = 2;

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::NothingFound => 1,
            Exit::Partial => 3,
        }
    }
}
