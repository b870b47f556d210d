//! The wire's date formats, in one place.

use chrono::{DateTime, FixedOffset, NaiveDate, SecondsFormat, TimeZone, Utc};

/// Parses ISO 8601 date-times as NOTES.md requires: `Z`, `+00:00` or `+0000` offsets, with or
/// without fractional seconds. Any other offset is accepted too and converted to UTC.
pub fn parse_datetime(input: &str) -> Option<DateTime<Utc>> {
    let s = input.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    // `+0000`-style offsets (and a space instead of `T`) are not RFC 3339.
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(dt) = DateTime::<FixedOffset>::parse_from_str(s, format) {
            return Some(dt.with_timezone(&Utc));
        }
    }
    None
}

/// Room for `YYYY-MM-DDTHH:MM:SS.ffffff+00:00`.
pub type DateBuf = [u8; 32];

/// Every response carries several dates; chrono's `format` parses its pattern on each call, and
/// even `format!` showed in profiles of the read path, so the digits are written by hand.
/// Years outside 0..=9999 never pass validation (and would show as their last four digits).
fn write_micros<'a>(dt: &DateTime<Utc>, offset: &str, buf: &'a mut DateBuf) -> &'a str {
    use chrono::{Datelike, Timelike};
    fn digits(buf: &mut [u8], mut value: u32) {
        for slot in buf.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    // Each accessor of a `DateTime` converts it to local time first: once is enough.
    let naive = dt.naive_utc();
    let year = u32::try_from(naive.year()).unwrap_or(0);
    *buf = *b"0000-00-00T00:00:00.000000+00:00";
    digits(&mut buf[0..4], year);
    digits(&mut buf[5..7], naive.month());
    digits(&mut buf[8..10], naive.day());
    digits(&mut buf[11..13], naive.hour());
    digits(&mut buf[14..16], naive.minute());
    digits(&mut buf[17..19], naive.second());
    // A leap second carries its extra second in the fraction.
    digits(&mut buf[20..26], (naive.nanosecond() / 1_000).min(999_999));
    let end = 26 + offset.len().min(6);
    buf[26..end].copy_from_slice(&offset.as_bytes()[..end - 26]);
    // Only ASCII digits and the punctuation above were written.
    std::str::from_utf8(&buf[..end]).unwrap_or_default()
}

/// Instants in stored documents (`#[serde(with = "time::stored")]`): RFC 3339 in UTC, written
/// and read by hand in the form Subgate writes (`2024-12-24T10:50:23.000000Z`), since chrono's
/// `Display` and parser were a tenth of decoding a profile. Any other RFC 3339 text, as
/// earlier versions wrote it, is read by chrono; an instant finer than a microsecond is
/// written by chrono too, so nothing is rounded.
pub mod stored {
    use chrono::{DateTime, NaiveDate, Utc};
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(dt: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        let nanos = dt.timestamp_subsec_nanos();
        // A leap second's extra second is in its nanoseconds; chrono writes it.
        if nanos < 1_000_000_000 && nanos.is_multiple_of(1_000) {
            s.serialize_str(super::write_micros(dt, "Z", &mut [0; 32]))
        } else {
            s.collect_str(&dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_str(Instant)
    }

    struct Instant;

    impl de::Visitor<'_> for Instant {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an RFC 3339 date-time")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            match parse_utc(text.as_bytes()) {
                Some(dt) => Ok(dt),
                None => text.parse().map_err(E::custom),
            }
        }
    }

    /// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, or `None` for anything else.
    fn parse_utc(b: &[u8]) -> Option<DateTime<Utc>> {
        fn number(digits: &[u8]) -> Option<u32> {
            digits.iter().try_fold(0u32, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        }
        let punctuation = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
        if b.len() < 20 || b.last() != Some(&b'Z') || punctuation.iter().any(|&(i, c)| b[i] != c) {
            return None;
        }
        let nanos = match &b[19..b.len() - 1] {
            [] => 0,
            [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
                number(fraction)? * 10u32.pow(9 - fraction.len() as u32)
            }
            _ => return None,
        };
        let date = NaiveDate::from_ymd_opt(
            i32::try_from(number(&b[0..4])?).ok()?,
            number(&b[5..7])?,
            number(&b[8..10])?,
        )?;
        let time = date.and_hms_nano_opt(
            number(&b[11..13])?,
            number(&b[14..16])?,
            number(&b[17..19])?,
            nanos,
        )?;
        Some(time.and_utc())
    }

    /// The same for optional instants; pair it with `default`.
    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            dt: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match dt {
                Some(dt) => super::serialize(dt, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            #[derive(Deserialize)]
            struct Stored(#[serde(with = "super")] DateTime<Utc>);
            Ok(Option::<Stored>::deserialize(d)?.map(|Stored(dt)| dt))
        }
    }
}

const V2_OFFSET: &str = "+00:00";
const V1_OFFSET: &str = "+0000";

/// v2 dates: `2024-12-24T10:50:23.000000+00:00`.
pub fn format_v2(dt: &DateTime<Utc>) -> String {
    write_micros(dt, V2_OFFSET, &mut [0; 32]).to_owned()
}

/// v1 and webhook dates: `2020-02-21T16:30:34.000000+0000`.
pub fn format_v1(dt: &DateTime<Utc>) -> String {
    write_micros(dt, V1_OFFSET, &mut [0; 32]).to_owned()
}

/// Serializes as [`format_v2`] writes, or null, with no `String` in between: responses and
/// payloads are serialized straight from borrowed views (through `serde_json::Value`, a map
/// per object and a `String` per key, a quarter of a profile read's CPU went).
pub struct V2Date(pub Option<DateTime<Utc>>);

/// Serializes as [`format_v1`] writes, or null (see [`V2Date`]).
pub struct V1Date(pub Option<DateTime<Utc>>);

fn serialize_date<S: serde::Serializer>(
    dt: &Option<DateTime<Utc>>,
    offset: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match dt {
        Some(dt) => serializer.serialize_str(write_micros(dt, offset, &mut [0; 32])),
        None => serializer.serialize_none(),
    }
}

impl serde::Serialize for V2Date {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_date(&self.0, V2_OFFSET, serializer)
    }
}

impl serde::Serialize for V1Date {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_date(&self.0, V1_OFFSET, serializer)
    }
}

/// Human form used inside error messages, as Adapty's examples show it.
pub fn format_message(dt: &DateTime<Utc>) -> String {
    dt.to_rfc3339_opts(SecondsFormat::Secs, false)
        .replace('T', " ")
}

/// Plain `YYYY-MM-DD`.
pub fn parse_date(input: &str) -> Option<NaiveDate> {
    if input.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(input, "%Y-%m-%d").ok()
}

/// Storage keeps instants as microseconds since the epoch: compact, sortable, exact.
pub fn to_micros(dt: &DateTime<Utc>) -> i64 {
    dt.timestamp_micros()
}

pub fn from_micros(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_offset_form() {
        let expected = Utc.with_ymd_and_hms(2022, 10, 12, 9, 42, 50).unwrap();
        for s in [
            "2022-10-12T09:42:50Z",
            "2022-10-12T09:42:50+00:00",
            "2022-10-12T09:42:50+0000",
            "2022-10-12T09:42:50.000000+0000",
            "2022-10-12T09:42:50.000Z",
            "2022-10-12T11:42:50+02:00",
        ] {
            assert_eq!(parse_datetime(s), Some(expected), "{s}");
        }
        assert_eq!(parse_datetime("2022-10-12"), None);
        assert_eq!(parse_datetime("yesterday"), None);
    }

    #[test]
    fn formats_six_fraction_digits_in_utc() {
        let dt = Utc.with_ymd_and_hms(2024, 12, 24, 10, 50, 23).unwrap();
        assert_eq!(format_v2(&dt), "2024-12-24T10:50:23.000000+00:00");
        assert_eq!(format_v1(&dt), "2024-12-24T10:50:23.000000+0000");
        assert_eq!(format_message(&dt), "2024-12-24 10:50:23+00:00");
    }

    #[test]
    fn dates_are_strict() {
        assert!(parse_date("2000-12-31").is_some());
        assert!(parse_date("2000-2-3").is_none());
        assert!(parse_date("2000-13-01").is_none());
    }

    #[test]
    fn formats_match_chronos_patterns() {
        for text in [
            "2024-12-24T10:50:23Z",
            "2020-02-21T16:30:34.123456Z",
            "0999-01-02T03:04:05.000001Z",
            "9999-12-31T23:59:59.999999999Z",
        ] {
            let dt = parse_datetime(text).unwrap();
            assert_eq!(
                format_v2(&dt),
                dt.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
            );
            assert_eq!(
                format_v1(&dt),
                dt.format("%Y-%m-%dT%H:%M:%S%.6f+0000").to_string()
            );
        }
    }

    #[test]
    fn stored_instants_read_back_exactly_and_read_what_chrono_wrote() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Doc {
            #[serde(with = "stored")]
            at: DateTime<Utc>,
            #[serde(default, with = "stored::option")]
            until: Option<DateTime<Utc>>,
        }
        for text in [
            "2024-12-24T10:50:23Z",
            "2024-12-24T10:50:23.1Z",
            "2020-02-21T16:30:34.123456Z",
            "2026-11-18T20:48:50.189708258Z",
            "2022-10-12T11:42:50+02:00",
            "0999-01-02T03:04:05.000001Z",
        ] {
            let chrono_read: DateTime<Utc> = text.parse().unwrap();
            let json = serde_json::json!({ "at": text, "until": text });
            let doc: Doc = serde_json::from_value(json).unwrap();
            assert_eq!(doc.at, chrono_read, "{text}");
            assert_eq!(doc.until, Some(chrono_read), "{text}");
            let stored = serde_json::to_value(&doc).unwrap();
            let stored_text = stored["at"].as_str().unwrap();
            assert_eq!(stored_text.parse::<DateTime<Utc>>().unwrap(), chrono_read);
            assert_eq!(serde_json::from_value::<Doc>(stored).unwrap(), doc);
        }
        let dt: DateTime<Utc> = "2024-12-24T10:50:23.5Z".parse().unwrap();
        let stored = serde_json::to_value(Doc {
            at: dt,
            until: None,
        })
        .unwrap();
        assert_eq!(stored["at"], "2024-12-24T10:50:23.500000Z");
        assert_eq!(stored["until"], serde_json::Value::Null);
        let missing: Doc = serde_json::from_str(r#"{"at": "2024-12-24T10:50:23Z"}"#).unwrap();
        assert_eq!(missing.until, None);
        for bad in [
            "2024-12-24",
            "2024-13-01T00:00:00Z",
            "2024-12-24T10:50:23.Z",
            "soon",
        ] {
            let json = serde_json::json!({ "at": bad });
            assert!(serde_json::from_value::<Doc>(json).is_err(), "{bad}");
        }
    }
}
