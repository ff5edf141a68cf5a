//! A budget's windows: calendar days, ISO weeks (from Monday) and months in a named time
//! zone, each from local midnight to the next window's local midnight (23 or 25 hours on
//! a day the clocks change). Pure: the moment is an argument, so tests choose it.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// How long a budget's window is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// One window, `[start_ms, end_ms)` in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Window {
    /// The window of `period` in `tz` that holds the moment `now_ms`.
    pub fn at(now_ms: i64, period: Period, tz: &TimeZone) -> Window {
        let now = Timestamp::from_millisecond(now_ms).unwrap_or(Timestamp::UNIX_EPOCH);
        let today = now.to_zoned(tz.clone()).date();
        let first = match period {
            Period::Day => today,
            Period::Week => today
                .checked_sub(i64::from(today.weekday().to_monday_zero_offset()).days())
                .unwrap_or(today),
            Period::Month => today.first_of_month(),
        };
        let next = match period {
            Period::Day => first.checked_add(1.day()),
            Period::Week => first.checked_add(1.week()),
            Period::Month => first.checked_add(1.month()),
        }
        .unwrap_or(first);
        Window {
            start_ms: midnight(first, tz).unwrap_or(now_ms),
            end_ms: midnight(next, tz).unwrap_or(now_ms + 1),
        }
    }

    /// Seconds from `now_ms` until the window ends (at least 1).
    pub fn seconds_left(&self, now_ms: i64) -> u64 {
        ((self.end_ms - now_ms).max(0) as u64).div_ceil(1000).max(1)
    }

    /// The end as an RFC 3339 UTC time, for headers and the admin endpoint.
    pub fn end_rfc3339(&self) -> String {
        Timestamp::from_millisecond(self.end_ms)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }
}

/// The first moment of `date` in `tz` (midnight, or the first time after a gap).
fn midnight(date: Date, tz: &TimeZone) -> Option<i64> {
    let zoned = date.to_zoned(tz.clone()).ok()?;
    Some(zoned.timestamp().as_millisecond())
}

/// A time zone by its IANA name (`UTC`, `Europe/Berlin`), from the built-in database.
pub fn time_zone(name: &str) -> Option<TimeZone> {
    TimeZone::get(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn utc(text: &str) -> String {
        Timestamp::from_millisecond(ms(text)).unwrap().to_string()
    }

    fn bounds(w: Window) -> (String, String) {
        let t = |m| Timestamp::from_millisecond(m).unwrap().to_string();
        (t(w.start_ms), t(w.end_ms))
    }

    #[test]
    fn a_day_in_utc_runs_from_midnight_to_midnight() {
        let tz = time_zone("UTC").unwrap();
        let w = Window::at(ms("2026-12-02T13:54:00Z"), Period::Day, &tz);
        assert_eq!(
            bounds(w),
            (utc("2026-12-02T00:00:00Z"), utc("2026-12-03T00:00:00Z"))
        );
        // The last millisecond is in it; midnight is the next one's.
        let last = Window::at(ms("2026-12-02T23:59:59.999Z"), Period::Day, &tz);
        assert_eq!(last, w);
        let next = Window::at(ms("2026-12-03T00:00:00Z"), Period::Day, &tz);
        assert_eq!(next.start_ms, w.end_ms);
        assert_eq!(w.seconds_left(ms("2026-12-02T23:59:59.500Z")), 1);
    }

    #[test]
    fn a_day_in_a_named_zone_resets_at_its_local_midnight() {
        let berlin = time_zone("Europe/Berlin").unwrap();
        // 23:30 UTC on the 2nd is 00:30 on the 3rd in Berlin (UTC+1 in winter).
        let w = Window::at(ms("2026-12-02T23:30:00Z"), Period::Day, &berlin);
        assert_eq!(
            bounds(w),
            (utc("2026-12-02T23:00:00Z"), utc("2026-12-03T23:00:00Z"))
        );
        // The day the clocks go forward has 23 hours, the day they go back 25.
        let spring = Window::at(ms("2026-03-29T12:00:00Z"), Period::Day, &berlin);
        assert_eq!(spring.end_ms - spring.start_ms, 23 * 3_600_000);
        let autumn = Window::at(ms("2026-10-25T12:00:00Z"), Period::Day, &berlin);
        assert_eq!(autumn.end_ms - autumn.start_ms, 25 * 3_600_000);
        let ny = time_zone("America/New_York").unwrap();
        let w = Window::at(ms("2026-12-02T03:00:00Z"), Period::Day, &ny);
        assert_eq!(w.start_ms, ms("2026-12-01T05:00:00Z"));
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let tz = time_zone("UTC").unwrap();
        // 2026-12-02 is a Wednesday.
        let w = Window::at(ms("2026-12-02T10:00:00Z"), Period::Week, &tz);
        assert_eq!(
            bounds(w),
            (utc("2026-11-30T00:00:00Z"), utc("2026-12-07T00:00:00Z"))
        );
        let sunday = Window::at(ms("2026-12-06T23:59:59Z"), Period::Week, &tz);
        assert_eq!(sunday, w);
        let m = Window::at(ms("2026-02-14T10:00:00Z"), Period::Month, &tz);
        assert_eq!(
            bounds(m),
            (utc("2026-02-01T00:00:00Z"), utc("2026-03-01T00:00:00Z"))
        );
        let dec = Window::at(ms("2026-12-31T23:59:59Z"), Period::Month, &tz);
        assert_eq!(dec.end_ms, ms("2027-01-01T00:00:00Z"));
        let tokyo = time_zone("Asia/Tokyo").unwrap();
        let m = Window::at(ms("2026-11-30T16:00:00Z"), Period::Month, &tokyo);
        assert_eq!(m.start_ms, ms("2026-11-30T15:00:00Z"));
    }

    #[test]
    fn unknown_zones_and_periods_are_none() {
        assert!(time_zone("Mars/Olympus").is_none());
        assert_eq!(Period::parse("fortnight"), None);
        assert_eq!(Period::parse("week"), Some(Period::Week));
    }
}
