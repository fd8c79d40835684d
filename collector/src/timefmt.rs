//! The one time format of the collector: how times are stored in SQLite and printed by
//! every command (`2026-11-27 09:00:00.000`, UTC, millisecond precision).
//!
//! It is SQLite's own text form, so `datetime('now', '-1 day')` compares correctly with
//! stored values, and it sorts as text in time order.

use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

const FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]");

/// `t` in UTC as `YYYY-MM-DD HH:MM:SS.mmm`.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    // Every year from -9999 to 9999 formats with this description; `time` only fails for
    // components a description asks for that a value lacks, and UTC datetimes have them all.
    t.format(FORMAT).unwrap_or_else(|_| t.to_string())
}

/// The inverse of [`format`] (the value is UTC).
pub fn parse(s: &str) -> Result<OffsetDateTime, time::error::Parse> {
    time::PrimitiveDateTime::parse(s, FORMAT).map(|t| t.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_sort() {
        let t = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
            + time::Duration::milliseconds(5);
        let s = format(t);
        assert_eq!(s, "2027-01-15 08:00:00.005");
        assert_eq!(parse(&s).unwrap(), t);
        assert!(format(t) < format(t + time::Duration::milliseconds(1)));
        assert!(parse("yesterday").is_err());
    }
}
