//! Timestamps: microseconds since the epoch internally, ISO 8601 with six fractional digits
//! and an explicit offset on the wire, and the `since`/`until` filter syntax of the contract.

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::error::{CoreError, CoreResult};

pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// `2026-05-18T09:16:55.185199+00:00`: at most six fractional digits, which every client parses.
pub fn format_ts(us: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]+00:00");
    t.format(&fmt).unwrap_or_default()
}

/// Parses a `since`/`until` value: an ISO 8601 date-time (with or without offset; naive
/// means UTC), a Unix timestamp, or an interval `<N>s|m|h|d|w` meaning "N units ago".
pub fn parse_time_filter(name: &str, value: &str, now_us: i64) -> CoreResult<i64> {
    let v = value.trim();
    let bad = || {
        CoreError::bad(format!("invalid {name} {value:?}: expected ISO 8601, a Unix timestamp or an interval like 15m"))
    };
    if v.is_empty() {
        return Err(bad());
    }
    if let Some(unit) = v.chars().last().filter(|c| "smhdw".contains(*c)) {
        let n: i64 = v[..v.len() - 1].parse().map_err(|_| bad())?;
        let secs = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => 604_800,
        };
        let ago = n.checked_mul(secs).and_then(|s| s.checked_mul(1_000_000)).ok_or_else(bad)?;
        if n < 0 {
            return Err(bad());
        }
        return Ok(now_us.saturating_sub(ago));
    }
    if let Ok(secs) = v.parse::<f64>() {
        if !secs.is_finite() {
            return Err(bad());
        }
        return Ok((secs * 1e6) as i64);
    }
    let to_us = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1000) as i64;
    if let Ok(t) = OffsetDateTime::parse(v, &Rfc3339) {
        return Ok(to_us(t));
    }
    let naive = [
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]"),
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
        format_description!("[year]-[month]-[day]T[hour]:[minute]"),
    ];
    for fmt in naive {
        if let Ok(t) = PrimitiveDateTime::parse(v, &fmt) {
            return Ok(to_us(t.assume_utc()));
        }
    }
    if let Ok(d) = time::Date::parse(v, &format_description!("[year]-[month]-[day]")) {
        return Ok(to_us(d.midnight().assume_utc()));
    }
    // Offsets written like `+0000` or with a `+` that arrived unencoded as a space.
    let repaired = v.replacen(' ', "+", 1);
    if repaired != v {
        return parse_time_filter(name, &repaired, now_us);
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

    #[test]
    fn formats_with_six_digits_and_offset() {
        assert_eq!(format_ts(NOW + 185_199), "2026-01-01T00:00:00.185199+00:00");
    }

    #[test]
    fn parses_every_documented_form() {
        let p = |v| parse_time_filter("since", v, NOW).unwrap();
        assert_eq!(p("15m"), NOW - 900_000_000);
        assert_eq!(p("2h"), NOW - 7_200_000_000);
        assert_eq!(p("1w"), NOW - 604_800_000_000);
        assert_eq!(p("1767225600"), NOW);
        assert_eq!(p("1767225600.5"), NOW + 500_000);
        assert_eq!(p("2026-01-01T00:00:00+00:00"), NOW);
        assert_eq!(p("2026-01-01T01:00:00+01:00"), NOW);
        assert_eq!(p("2026-01-01T00:00:00Z"), NOW);
        assert_eq!(p("2026-01-01T00:00:00"), NOW);
        assert_eq!(p("2026-01-01T00:00:00.25"), NOW + 250_000);
        assert_eq!(p("2026-01-01T00:00:00 00:00"), NOW);
    }

    #[test]
    fn rejects_garbage() {
        for v in ["", "yesterday", "15x", "-5m", "2026-13-01T00:00:00", "nan", "m"] {
            assert!(parse_time_filter("since", v, NOW).is_err(), "{v}");
        }
    }
}
