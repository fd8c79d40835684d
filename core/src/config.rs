//! Small parsers both programs' configurations use: durations and TOML files.

use std::path::Path;
use std::time::Duration;

/// The longest duration accepted anywhere (a century): larger values are typos, and
/// adding them to a date would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration; use e.g. 10s, 5m, 24h, 90d")]
    Empty,
    #[error("{0:?} is not a duration ({1}); use e.g. 10s, 5m, 24h, 90d")]
    Invalid(String, String),
    #[error(
        "{0:?} is out of range: a duration is between 1ns and 100 years (36500d); use e.g. \
         90d or 52w"
    )]
    OutOfRange(String),
}

/// "10s", "500ms", "5m", "24h", "90d", "1h30m", "2w" → Duration (humantime's grammar),
/// at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    try_parse_duration(s).map_err(|e| e.to_string())
}

/// [`parse_duration`] with the cause as a value, for callers that branch on it.
pub fn try_parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let d = humantime::parse_duration(s).map_err(|e| match e {
        // humantime's own words for an overflow ("number is too large or cannot be
        // represented…") name no range; a fraction below 1ns is its other case.
        humantime::DurationError::NumberOverflow => DurationError::OutOfRange(s.into()),
        e => DurationError::Invalid(s.into(), e.to_string()),
    })?;
    if d > MAX_DURATION {
        return Err(DurationError::OutOfRange(s.into()));
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

/// "512MiB", "1GiB", "64KiB", "1048576" (bytes) → bytes. Binary units only: "MB" would
/// leave it open whether 10^6 or 2^20 was meant.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => {
            return Err(format!(
                "{s:?} is not a size; use bytes or KiB, MiB, GiB (e.g. 512MiB, 1GiB)"
            ));
        }
    };
    let n: u64 = n.parse().map_err(|_| {
        format!("{s:?} is not a size; use bytes or KiB, MiB, GiB (e.g. 512MiB, 1GiB)")
    })?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
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
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size(" 1GiB "), Ok(1 << 30));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["", "MiB", "1MB", "1.5GiB", "-1", "1 gib", "99999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

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
                .contains("100 years (36500d)")
        );
        for huge in [
            "99999999999999999999999s",
            "36501d",
            "18446744073709551615s",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("out of range") && e.contains("36500d"), "{e}");
        }
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
    }

    #[test]
    fn formats_round_trip() {
        for d in [Duration::from_secs(10), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
