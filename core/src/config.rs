//! Small parsers both programs' configurations use: durations and TOML files.

use std::path::Path;
use std::time::Duration;

/// The longest duration accepted anywhere (a century): larger values are typos, and
/// adding them to a date would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// "10s", "500ms", "5m", "24h", "90d", "1h30m", "2w" → Duration (humantime's grammar),
/// at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration; use e.g. 10s, 5m, 24h, 90d".into());
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 10s, 5m, 24h, 90d"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{s:?} is longer than 100 years; use e.g. 90d or 52w"
        ));
    }
    Ok(d)
}

/// A duration as the flags take it: whole seconds when it is one, else milliseconds.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Reads and parses a TOML file; the error names the file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 90d "), Ok(Duration::from_secs(90 * 86400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86400)));
        assert!(parse_duration("10").unwrap_err().contains("not a duration"));
        assert!(
            parse_duration("10parsecs")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("s").is_err());
        assert!(
            parse_duration("99999999d")
                .unwrap_err()
                .contains("100 years")
        );
        assert!(parse_duration("99999999999999999999999s").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for d in [Duration::from_secs(10), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
