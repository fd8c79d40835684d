//! How the agent's `run` learns of listeners that open and close, and so how soon the
//! collector hears of them: the watch mode.
//!
//! - `doorbell`: perf tracepoints ring on every listen and close; a scan follows at once
//!   (near real time).
//! - `polling(3s)`: tracepoints are unavailable (no perf, no tracefs); the agent scans
//!   at an adaptive period, the one shown.
//! - `interval(10s)`: the agent scans on a fixed interval (older configurations).
//!
//! The agent reports its mode in every Hello and Heartbeat, with the reason it is not
//! `doorbell` (`perf_event_open refused: needs CAP_PERFMON`), and the collector shows it
//! in the `hosts` view and report: a missed latency goal is visible, never silent.
//!
//! The text form (`Display` / `FromStr`) is what the collector stores: `doorbell`,
//! `polling(3s)`, `interval(10s)`. A period is written in ONE unit, the largest that
//! divides it: `d`, `h`, `m` (minutes), `s`, else seconds with up to three decimals
//! (`1.5s`), or `ms` below one second (`500ms`). Mixed forms such as humantime's `1m 30s`
//! were rejected: a single token reads at a glance in a table column and sorts the same
//! way in every report. Periods count whole milliseconds (what the wire carries);
//! [`Watch::bound`] brings any `Duration` there.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::limits;
use crate::record::clean;

/// How the agent learns of listens and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchMode {
    /// perf tracepoints: a scan follows every listen and close.
    Doorbell,
    /// No tracepoints: scans at this adaptive period.
    Polling(Duration),
    /// Scans on this fixed interval.
    Interval(Duration),
}

/// The agent's watch mode and, when it is not `doorbell`, why (bounded and printable
/// once [`Watch::bound`] ran; the collector refuses anything else).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Watch {
    pub mode: WatchMode,
    pub reason: Option<String>,
}

/// The unit of each text form, largest first, in milliseconds.
const UNITS: [(&str, u64); 4] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
];

impl WatchMode {
    /// `doorbell`, `polling` or `interval`: the mode without its period.
    pub fn name(self) -> &'static str {
        match self {
            WatchMode::Doorbell => "doorbell",
            WatchMode::Polling(_) => "polling",
            WatchMode::Interval(_) => "interval",
        }
    }

    /// The period of `polling` and `interval`; None for `doorbell`.
    pub fn period(self) -> Option<Duration> {
        match self {
            WatchMode::Doorbell => None,
            WatchMode::Polling(d) | WatchMode::Interval(d) => Some(d),
        }
    }

    /// The period in whole milliseconds within what the wire carries (1 ms to
    /// [`limits::WATCH_INTERVAL_MAX_MS`]); 0 for `doorbell`.
    pub fn period_ms(self) -> u64 {
        self.period().map_or(0, period_ms)
    }

    /// The same mode with its period in whole milliseconds within the wire's range.
    fn bounded(self) -> WatchMode {
        let ms = |d| Duration::from_millis(period_ms(d));
        match self {
            WatchMode::Doorbell => WatchMode::Doorbell,
            WatchMode::Polling(d) => WatchMode::Polling(ms(d)),
            WatchMode::Interval(d) => WatchMode::Interval(ms(d)),
        }
    }
}

/// `d` in whole milliseconds (rounded to the nearest), at least 1 and at most
/// [`limits::WATCH_INTERVAL_MAX_MS`].
fn period_ms(d: Duration) -> u64 {
    let ms = (d.as_nanos() + 500_000) / 1_000_000;
    u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .clamp(1, limits::WATCH_INTERVAL_MAX_MS)
}

impl Watch {
    /// A mode with no reason (`doorbell`, or a mode the configuration chose).
    pub fn new(mode: WatchMode) -> Watch {
        Watch { mode, reason: None }
    }

    /// A mode and why it is not `doorbell`.
    pub fn because(mode: WatchMode, reason: impl Into<String>) -> Watch {
        Watch {
            mode,
            reason: Some(reason.into()),
        }
    }

    /// [`Watch::bound`], by value.
    pub fn bounded(mut self) -> Watch {
        self.bound();
        self
    }

    /// What the collector accepts: the period in whole milliseconds from 1 ms to
    /// [`limits::WATCH_INTERVAL_MAX_MS`], the reason with control and invisible
    /// formatting characters escaped and cut to [`limits::WATCH_REASON`] bytes (an
    /// error text may quote anything), an empty reason as none. Idempotent.
    pub fn bound(&mut self) {
        self.mode = self.mode.bounded();
        if let Some(r) = &mut self.reason {
            clean(r, limits::WATCH_REASON);
        }
        if self.reason.as_deref() == Some("") {
            self.reason = None;
        }
    }
}

/// A period of at least 1 ms as the text form writes it (see the module documentation).
fn write_period(f: &mut fmt::Formatter<'_>, ms: u64) -> fmt::Result {
    for (unit, size) in UNITS {
        if ms.is_multiple_of(size) {
            return write!(f, "{}{unit}", ms / size);
        }
    }
    if ms < 1000 {
        return write!(f, "{ms}ms");
    }
    let frac = format!("{:03}", ms % 1000);
    write!(f, "{}.{}s", ms / 1000, frac.trim_end_matches('0'))
}

impl fmt::Display for WatchMode {
    /// `doorbell`, `polling(3s)`, `interval(10s)`: the period as the wire carries it
    /// ([`WatchMode::period_ms`]), so the text is the same before and after
    /// [`Watch::bound`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if self.period().is_some() {
            f.write_str("(")?;
            write_period(f, self.period_ms())?;
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A text that is not a watch mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a watch mode ({why}); use doorbell, polling(PERIOD) or interval(PERIOD) \
     with a period such as 500ms, 1.5s, 10s, 5m, 1h or 1d"
)]
pub struct WatchModeError {
    /// The text, cut to 64 bytes (a stored value is short; a hostile one stays out of logs).
    pub text: String,
    pub why: &'static str,
}

fn refused(s: &str, why: &'static str) -> WatchModeError {
    let mut text = s.to_string();
    clean(&mut text, 64);
    WatchModeError { text, why }
}

/// `1.5s`, `500ms`, `10s`, `5m`, `1h`, `2d` → milliseconds: digits, a fraction of up to
/// three digits for seconds only, one unit; no sign, no spaces.
fn parse_period(s: &str) -> Result<u64, &'static str> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or("the period has no unit")?;
    let (number, unit) = s.split_at(split);
    let size = match unit {
        "ms" => 1,
        u => UNITS
            .iter()
            .find(|(name, _)| *name == u)
            .map(|(_, size)| *size)
            .ok_or("the unit is not ms, s, m, h or d")?,
    };
    let (whole, frac) = match number.split_once('.') {
        None => (number, ""),
        Some((_, "")) => return Err("a decimal point with no digits after it"),
        Some(_) if unit != "s" => return Err("only seconds take decimals"),
        Some((w, f)) if f.len() <= 3 => (w, f),
        Some(_) => return Err("more than three decimals"),
    };
    if whole.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the period is not a number");
    }
    let whole: u64 = whole.parse().map_err(|_| "the period is too large")?;
    let frac_ms = format!("{frac:0<3}")
        .parse::<u64>()
        .map_err(|_| "the period is not a number")?;
    let ms = whole
        .checked_mul(size)
        .and_then(|ms| ms.checked_add(if frac.is_empty() { 0 } else { frac_ms }))
        .ok_or("the period is too large")?;
    if ms == 0 {
        return Err("the period is zero");
    }
    if ms > limits::WATCH_INTERVAL_MAX_MS {
        return Err("the period is longer than a century");
    }
    Ok(ms)
}

impl FromStr for WatchMode {
    type Err = WatchModeError;

    /// The inverse of `Display` (which writes the canonical form; other spellings of the
    /// same period, such as `1000ms`, are read too).
    fn from_str(s: &str) -> Result<WatchMode, WatchModeError> {
        if s == "doorbell" {
            return Ok(WatchMode::Doorbell);
        }
        let (name, rest) = s
            .split_once('(')
            .ok_or_else(|| refused(s, "unknown mode"))?;
        let period = rest
            .strip_suffix(')')
            .ok_or_else(|| refused(s, "no closing parenthesis"))?;
        let make: fn(Duration) -> WatchMode = match name {
            "polling" => WatchMode::Polling,
            "interval" => WatchMode::Interval,
            "doorbell" => return Err(refused(s, "doorbell has no period")),
            _ => return Err(refused(s, "unknown mode")),
        };
        let ms = parse_period(period).map_err(|why| refused(s, why))?;
        Ok(make(Duration::from_millis(ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[track_caller]
    fn check(mode: WatchMode, text: &str) {
        assert_eq!(mode.to_string(), text);
        assert_eq!(text.parse::<WatchMode>(), Ok(mode), "{text}");
    }

    #[test]
    fn text_forms() {
        check(WatchMode::Doorbell, "doorbell");
        check(WatchMode::Polling(MS(3000)), "polling(3s)");
        check(WatchMode::Interval(MS(10_000)), "interval(10s)");
        check(WatchMode::Polling(MS(1500)), "polling(1.5s)");
        check(WatchMode::Polling(MS(1250)), "polling(1.25s)");
        check(WatchMode::Polling(MS(2001)), "polling(2.001s)");
        check(WatchMode::Polling(MS(61_500)), "polling(61.5s)");
        check(WatchMode::Polling(MS(500)), "polling(500ms)");
        check(WatchMode::Polling(MS(1)), "polling(1ms)");
        check(WatchMode::Interval(MS(90_000)), "interval(90s)");
        check(WatchMode::Interval(MS(120_000)), "interval(2m)");
        check(WatchMode::Interval(MS(5_400_000)), "interval(90m)");
        check(WatchMode::Interval(MS(3_600_000)), "interval(1h)");
        check(WatchMode::Interval(MS(86_400_000)), "interval(1d)");
        check(WatchMode::Interval(MS(90_000_000)), "interval(25h)");
        check(
            WatchMode::Interval(MS(limits::WATCH_INTERVAL_MAX_MS)),
            "interval(36500d)",
        );
    }

    /// A period the wire cannot carry is shown as the wire would carry it.
    #[test]
    fn text_forms_of_unbounded_periods() {
        let p = |d| WatchMode::Polling(d).to_string();
        assert_eq!(p(Duration::ZERO), "polling(1ms)");
        assert_eq!(p(Duration::from_micros(1499)), "polling(1ms)");
        assert_eq!(p(Duration::from_micros(2_999_600)), "polling(3s)");
        assert_eq!(p(Duration::MAX), "polling(36500d)");
    }

    #[test]
    fn other_spellings_of_a_period_are_read() {
        for (text, mode) in [
            ("polling(1000ms)", WatchMode::Polling(MS(1000))),
            ("polling(1.500s)", WatchMode::Polling(MS(1500))),
            ("polling(0.5s)", WatchMode::Polling(MS(500))),
            ("interval(60s)", WatchMode::Interval(MS(60_000))),
            ("interval(007s)", WatchMode::Interval(MS(7000))),
        ] {
            assert_eq!(text.parse::<WatchMode>(), Ok(mode), "{text}");
        }
    }

    #[test]
    fn refusals() {
        for (text, why) in [
            ("", "unknown mode"),
            ("Doorbell", "unknown mode"),
            ("doorbell(1s)", "doorbell has no period"),
            ("polling", "unknown mode"),
            ("polling()", "no unit"),
            ("polling(3s", "no closing parenthesis"),
            ("polling(3)", "no unit"),
            ("polling(3 s)", "not ms, s, m, h or d"),
            ("polling(s)", "not a number"),
            ("polling(-3s)", "not ms, s, m, h or d"),
            ("polling(+3s)", "not ms, s, m, h or d"),
            ("polling(0s)", "zero"),
            ("polling(0ms)", "zero"),
            ("polling(0.0001s)", "more than three decimals"),
            ("polling(1.s)", "no digits after"),
            ("polling(.5s)", "not a number"),
            ("polling(1.5m)", "only seconds"),
            ("polling(1.2.3s)", "not a number"),
            ("polling(3sec)", "not ms, s, m, h or d"),
            ("polling(36501d)", "longer than a century"),
            ("polling(99999999999999999999s)", "too large"),
            ("polling(18446744073709551615d)", "too large"),
            ("interval(1h30m)", "not ms, s, m, h or d"),
            ("scanning(3s)", "unknown mode"),
        ] {
            let e = text.parse::<WatchMode>().unwrap_err();
            assert!(e.why.contains(why), "{text:?}: {e}");
            assert!(
                e.to_string().contains("use doorbell, polling(PERIOD)"),
                "{e}"
            );
        }
        // A hostile text is cut and escaped in the error.
        let e = format!("polling(\u{1b}[2J{})", "x".repeat(500))
            .parse::<WatchMode>()
            .unwrap_err();
        assert!(e.text.len() <= 64 && !e.text.contains('\u{1b}'), "{e:?}");
    }

    #[test]
    fn bound_makes_what_the_wire_carries() {
        #[track_caller]
        fn bounded(w: Watch) -> Watch {
            let mut b = w.clone();
            b.bound();
            let mut again = b.clone();
            again.bound();
            assert_eq!(again, b, "idempotent");
            b
        }
        let p = |d| Watch::new(WatchMode::Polling(d));
        assert_eq!(bounded(p(Duration::ZERO)).mode, WatchMode::Polling(MS(1)));
        assert_eq!(
            bounded(p(Duration::from_micros(1499))).mode,
            WatchMode::Polling(MS(1))
        );
        assert_eq!(
            bounded(p(Duration::from_micros(1500))).mode,
            WatchMode::Polling(MS(2))
        );
        assert_eq!(
            bounded(Watch::new(WatchMode::Interval(Duration::MAX))).mode,
            WatchMode::Interval(MS(limits::WATCH_INTERVAL_MAX_MS))
        );
        assert_eq!(
            bounded(Watch::because(WatchMode::Doorbell, "")),
            Watch::new(WatchMode::Doorbell)
        );
        let hostile = bounded(Watch::because(
            WatchMode::Polling(MS(3000)),
            format!("perf_event_open: \u{1b}[31m{}", "é".repeat(600)),
        ));
        let reason = hostile.reason.unwrap();
        assert!(reason.len() <= limits::WATCH_REASON, "{}", reason.len());
        assert!(
            reason.starts_with("perf_event_open: \\u{1b}[31m"),
            "{reason}"
        );
        assert!(reason.ends_with('…'));
        let kept = Watch::because(
            WatchMode::Polling(MS(3000)),
            "perf_event_open refused: needs CAP_PERFMON",
        );
        assert_eq!(bounded(kept.clone()), kept);
    }

    #[test]
    fn period_ms_is_the_wire_value() {
        assert_eq!(WatchMode::Doorbell.period_ms(), 0);
        assert_eq!(WatchMode::Polling(MS(3000)).period_ms(), 3000);
        assert_eq!(WatchMode::Interval(Duration::ZERO).period_ms(), 1);
        assert_eq!(
            WatchMode::Interval(crate::config::MAX_DURATION).period_ms(),
            limits::WATCH_INTERVAL_MAX_MS
        );
    }
}
