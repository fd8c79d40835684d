//! Logging set-up shared by both binaries: `--log-format text|json` and `LISTENSCOPE_LOG`.

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// How log lines look on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`), for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Logs to stderr in `format`, at the level `LISTENSCOPE_LOG` names (an `EnvFilter`
/// directive such as `debug` or `listenscope_collector=debug`), else at `default`. A
/// `LISTENSCOPE_LOG` that does not parse is reported once and `default` is used.
pub fn init(format: LogFormat, default: &str) {
    let (filter, bad) = match std::env::var("LISTENSCOPE_LOG") {
        Ok(v) if !v.is_empty() => match EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(default), Some(format!("{v:?}: {e}"))),
        },
        _ => (EnvFilter::new(default), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (`run 2>&1 | head -1`) must not panic: tracing-subscriber reports
        // a failed write with eprintln!, which panics when stderr is gone.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    if let Some(bad) = bad {
        tracing::warn!(
            "LISTENSCOPE_LOG ignored, it is not a log filter: {bad}; example: LISTENSCOPE_LOG=debug"
        );
    }
}
