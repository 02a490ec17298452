//! Buyer schedules: `mon-fri 08:00-20:00`, `sat 10:00-14:00`, `daily 00:00-23:59`, read in the
//! buyer's own time zone. Ends are exclusive; `23:59` as an end means the end of the day.

use jiff::Timestamp;
use jiff::civil::Weekday;
use jiff::tz::TimeZone;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One window: the weekdays it applies to and a half-open span of minutes of the day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleWindow {
    /// Monday first.
    pub days: [bool; 7],
    pub start_minute: u16,
    /// Exclusive; 1440 is the end of the day.
    pub end_minute: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}`: {why} (expected like \"mon-fri 08:00-20:00\")")]
pub struct ScheduleError {
    pub text: String,
    pub why: String,
}

/// `mon` or `monday` (any case) -> 0.
fn day_index(name: &str) -> Option<usize> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let name = name.trim().to_ascii_lowercase();
    (0..7).find(|&i| DAY_NAMES[i] == name || FULL[i] == name)
}

fn minute_of(text: &str, is_end: bool) -> Option<u16> {
    let (h, m) = text.trim().split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m, is_end) {
        (23, 59, true) | (24, 0, true) => Some(1440),
        (0..=23, 0..=59, _) => Some(h * 60 + m),
        _ => None,
    }
}

impl ScheduleWindow {
    pub fn parse(text: &str) -> Result<ScheduleWindow, ScheduleError> {
        let fail = |why: &str| ScheduleError {
            text: text.to_owned(),
            why: why.to_owned(),
        };
        let mut parts = text.split_whitespace();
        let (Some(days_text), Some(times), None) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(fail("needs days and a time range separated by a space"));
        };
        let mut days = [false; 7];
        if matches!(
            days_text.to_ascii_lowercase().as_str(),
            "daily" | "all" | "everyday"
        ) {
            days = [true; 7];
        } else {
            for item in days_text.split(',') {
                match item.split_once('-') {
                    Some((from, to)) => {
                        let from = day_index(from).ok_or_else(|| fail("unknown day"))?;
                        let to = day_index(to).ok_or_else(|| fail("unknown day"))?;
                        // Ranges may wrap over the week's end (`fri-mon`).
                        let mut day = from;
                        loop {
                            days[day] = true;
                            if day == to {
                                break;
                            }
                            day = (day + 1) % 7;
                        }
                    }
                    None => days[day_index(item).ok_or_else(|| fail("unknown day"))?] = true,
                }
            }
        }
        let (start, end) = times
            .split_once('-')
            .ok_or_else(|| fail("the time range needs a `-`"))?;
        let start_minute = minute_of(start, false).ok_or_else(|| fail("bad start time"))?;
        let end_minute = minute_of(end, true).ok_or_else(|| fail("bad end time"))?;
        if start_minute >= end_minute {
            return Err(fail(
                "the start must be before the end (split a window over midnight in two)",
            ));
        }
        Ok(ScheduleWindow {
            days,
            start_minute,
            end_minute,
        })
    }

    fn contains(&self, weekday: usize, minute: u16) -> bool {
        self.days[weekday] && self.start_minute <= minute && minute < self.end_minute
    }
}

/// A buyer's open hours: open when any window contains the local time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub windows: Vec<ScheduleWindow>,
}

impl Schedule {
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Schedule, ScheduleError> {
        let windows = texts
            .iter()
            .map(|t| ScheduleWindow::parse(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Schedule { windows })
    }

    /// Whether the buyer takes leads at `now_ms` (Unix ms) in time zone `tz`.
    pub fn is_open(&self, tz: &TimeZone, now_ms: i64) -> bool {
        let Ok(now) = Timestamp::from_millisecond(now_ms) else {
            return false;
        };
        let local = now.to_zoned_datetime(tz.clone());
        let weekday = match local.weekday() {
            Weekday::Monday => 0,
            Weekday::Tuesday => 1,
            Weekday::Wednesday => 2,
            Weekday::Thursday => 3,
            Weekday::Friday => 4,
            Weekday::Saturday => 5,
            Weekday::Sunday => 6,
        };
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        self.windows.iter().any(|w| w.contains(weekday, minute))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn at(tz: &str, y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned_datetime(TimeZone::get(tz).unwrap())
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    #[test]
    fn parses_days_and_times() {
        let w = ScheduleWindow::parse("mon-fri 08:00-20:00").unwrap();
        assert_eq!(w.days, [true, true, true, true, true, false, false]);
        assert_eq!((w.start_minute, w.end_minute), (480, 1200));
        let w = ScheduleWindow::parse("Sat,sunday 10:00-23:59").unwrap();
        assert_eq!(w.days, [false, false, false, false, false, true, true]);
        assert_eq!(w.end_minute, 1440);
        let w = ScheduleWindow::parse("fri-mon 0:00-24:00").unwrap();
        assert_eq!(w.days, [true, false, false, false, true, true, true]);
        assert_eq!(
            ScheduleWindow::parse("daily 09:00-17:30").unwrap().days,
            [true; 7]
        );
        for bad in [
            "mon-fri",
            "mon-fry 08:00-20:00",
            "mon 8-20",
            "mon 20:00-08:00",
            "mon 08:00-08:00",
            "mon 08:60-09:00",
            "monkey 08:00-09:00",
            "mon 08:00-09:00 extra",
        ] {
            assert!(ScheduleWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn open_in_the_buyers_time_zone_with_exclusive_ends() {
        let s = Schedule::parse(&["mon-fri 08:00-20:00", "sat 10:00-14:00"]).unwrap();
        let chicago = TimeZone::get("America/Chicago").unwrap();
        // 2026-11-23 is a Monday.
        assert!(s.is_open(&chicago, at("America/Chicago", 2026, 11, 23, 8, 0)));
        assert!(s.is_open(&chicago, at("America/Chicago", 2026, 11, 23, 19, 59)));
        assert!(!s.is_open(&chicago, at("America/Chicago", 2026, 11, 23, 20, 0)));
        assert!(!s.is_open(&chicago, at("America/Chicago", 2026, 11, 23, 7, 59)));
        assert!(s.is_open(&chicago, at("America/Chicago", 2026, 11, 28, 13, 59)));
        assert!(!s.is_open(&chicago, at("America/Chicago", 2026, 11, 28, 14, 0)));
        assert!(!s.is_open(&chicago, at("America/Chicago", 2026, 11, 29, 12, 0)));
        // 09:00 in Chicago is 15:00 UTC: open for Chicago, and the same instant is 01:00
        // Tuesday in Sydney, closed there.
        let sydney = TimeZone::get("Australia/Sydney").unwrap();
        let instant = at("America/Chicago", 2026, 11, 23, 9, 0);
        assert!(s.is_open(&chicago, instant) && !s.is_open(&sydney, instant));
    }

    #[test]
    fn end_of_day_window_covers_the_last_minute() {
        let s = Schedule::parse(&["sun 22:00-23:59"]).unwrap();
        let utc = TimeZone::UTC;
        assert!(s.is_open(&utc, at("UTC", 2026, 11, 29, 23, 59) + 59_000));
        assert!(!s.is_open(&utc, at("UTC", 2026, 11, 30, 0, 0)));
    }
}
