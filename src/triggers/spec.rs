//! What a function's annotations ask of the triggers, in OpenFaaS's convention, so that
//! `faas-cli deploy --annotation topic=cron-function --annotation schedule="*/5 * * * *"` and
//! stack.yml files work unchanged: `topic` names the topics the function takes (several,
//! comma-separated), and `cron-function` among them, with `schedule`, runs it on a schedule.
//! Checked at deploy (a bad value is a 400 naming the annotation) and read again by the
//! scheduler. Pure: no clock, no I/O.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::model::FunctionDeployment;

pub const TOPIC: &str = "topic";
pub const SCHEDULE: &str = "schedule";
/// The topic of the OpenFaaS cron connector.
pub const CRON_TOPIC: &str = "cron-function";
/// `skip` (default): a run still going when the next is due makes that next run skipped (and
/// recorded as such); `allow`: runs may overlap.
pub const CRON_CONCURRENCY: &str = "com.faastastic.cron.concurrency";
/// `true`: each run invokes the function once in every datacenter it is placed in, instead of
/// once wherever the gateway routes it.
pub const CRON_EVERY_DATACENTER: &str = "com.faastastic.cron.every-datacenter";

/// The longest `@every` interval's shortest allowed value.
const MIN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// When runs are due.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron pattern, read in a time zone (UTC unless the schedule starts with
    /// `CRON_TZ=Area/City`, as the OpenFaaS cron connector reads it).
    Cron {
        cron: Box<croner::Cron>,
        tz: chrono_tz::Tz,
    },
    /// `@every 30s`: a fixed interval, counted from the previous due time.
    Every(chrono::Duration),
}

impl Schedule {
    /// Reads a schedule: 5 fields (minute hour day-of-month month day-of-week), 6 with seconds
    /// first, the `@hourly`-style nicknames, or `@every DURATION`; an optional `CRON_TZ=` or
    /// `TZ=` prefix names the time zone.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty; write a cron schedule such as \"*/5 * * * *\"".into());
        }
        if let Some(every) = text.strip_prefix("@every") {
            let d = crate::model::parse_duration(every.trim())
                .map_err(|e| format!("@every: {e}"))?
                .filter(|d| *d >= MIN_EVERY)
                .ok_or_else(|| format!("@every: {every:?} is shorter than 1s"))?;
            let d = chrono::Duration::from_std(d).map_err(|_| "@every: too long".to_string())?;
            return Ok(Schedule::Every(d));
        }
        let (tz, pattern) = match text
            .strip_prefix("CRON_TZ=")
            .or_else(|| text.strip_prefix("TZ="))
        {
            Some(rest) => {
                let (zone, pattern) = rest
                    .split_once(char::is_whitespace)
                    .ok_or("a time zone prefix needs a schedule after it")?;
                let tz = chrono_tz::Tz::from_str(zone).map_err(|_| {
                    format!("{zone:?} is not a time zone name (such as Europe/London)")
                })?;
                (tz, pattern.trim())
            }
            None => (chrono_tz::UTC, text),
        };
        let fields = pattern.split_whitespace().count();
        if !pattern.starts_with('@') && !(5..=6).contains(&fields) {
            return Err(format!(
                "{pattern:?} has {fields} fields; a schedule has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
            ));
        }
        let cron = croner::Cron::new(pattern)
            .with_seconds_optional()
            .parse()
            .map_err(|e| format!("{pattern:?} is not a cron schedule: {e}"))?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            tz,
        })
    }

    /// The first due time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) => t.checked_add_signed(*d),
            Schedule::Cron { cron, tz } => {
                let mut from = t.with_timezone(tz);
                // When the clocks go back, a local time happens twice and the pattern's
                // search answers the first: from inside the repeated hour that is in the past.
                // The same local time an hour later is the second one.
                for _ in 0..8 {
                    let next = cron.find_next_occurrence(&from, false).ok()?;
                    let utc = next.with_timezone(&Utc);
                    if utc > t {
                        return Some(utc);
                    }
                    let again = utc + chrono::Duration::hours(1);
                    if again > t && again.with_timezone(tz).naive_local() == next.naive_local() {
                        return Some(again);
                    }
                    from = next;
                }
                None
            }
        }
    }

    /// The last due time at or before `t`, searched from `after` (a time before it).
    pub fn last_between(&self, after: DateTime<Utc>, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if let Schedule::Every(d) = self {
            let step = d.num_milliseconds().max(1);
            let n = (t - after).num_milliseconds() / step;
            return (n > 0).then(|| after + chrono::Duration::milliseconds(n * step));
        }
        // Searched backwards in widening spans, forwards within each.
        for span in [60, 3_600, 86_400, 31 * 86_400, 400 * 86_400] {
            let mut at = (t - chrono::Duration::seconds(span)).max(after);
            let mut last = None;
            for _ in 0..100_000 {
                match self.next_after(at) {
                    Some(n) if n <= t => {
                        last = Some(n);
                        at = n;
                    }
                    _ => break,
                }
            }
            if last.is_some() || at <= after {
                return last;
            }
        }
        None
    }
}

/// What overlapping runs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    Skip,
    Allow,
}

/// A function's cron trigger.
#[derive(Debug, Clone)]
pub struct CronSpec {
    /// The `schedule` annotation as written.
    pub text: String,
    pub schedule: Schedule,
    pub concurrency: Concurrency,
    pub every_datacenter: bool,
}

/// The topics a function takes, from its `topic` annotation.
pub fn topics(annotations: &BTreeMap<String, String>) -> impl Iterator<Item = &str> {
    annotations
        .get(TOPIC)
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The cron trigger the annotations ask for: `None` when `topic` does not name
/// `cron-function`, else the trigger or every problem with it (each naming its annotation).
pub fn cron_spec(annotations: &BTreeMap<String, String>) -> Option<Result<CronSpec, Vec<String>>> {
    if !topics(annotations).any(|t| t == CRON_TOPIC) {
        return None;
    }
    let mut errors = Vec::new();
    let schedule = match annotations.get(SCHEDULE) {
        None => {
            errors.push(format!(
                "annotations.{SCHEDULE}: is required with {TOPIC}={CRON_TOPIC} (a cron schedule such as \"*/5 * * * *\")"
            ));
            None
        }
        Some(text) => match Schedule::parse(text) {
            Ok(s) => Some(s),
            Err(e) => {
                errors.push(format!("annotations.{SCHEDULE}: {e}"));
                None
            }
        },
    };
    let concurrency = match annotations.get(CRON_CONCURRENCY).map(|v| v.trim()) {
        None | Some("skip") => Concurrency::Skip,
        Some("allow") => Concurrency::Allow,
        Some(other) => {
            errors.push(format!(
                "annotations.{CRON_CONCURRENCY}: {other:?} is not skip or allow"
            ));
            Concurrency::Skip
        }
    };
    let every_datacenter = match annotations
        .get(CRON_EVERY_DATACENTER)
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("false" | "0" | "no") => false,
        Some("true" | "1" | "yes") => true,
        Some(other) => {
            errors.push(format!(
                "annotations.{CRON_EVERY_DATACENTER}: {other:?} is not true or false"
            ));
            false
        }
    };
    Some(match (schedule, errors.is_empty()) {
        (Some(schedule), true) => Ok(CronSpec {
            text: annotations[SCHEDULE].trim().to_string(),
            schedule,
            concurrency,
            every_datacenter,
        }),
        _ => Err(errors),
    })
}

/// Whether `subject` is a NATS subject a consumer can filter on: dot-separated tokens, none
/// empty, no whitespace, `*` a whole token and `>` only as the last one.
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.len() > 256 {
        return Err(format!(
            "{:?} is longer than 256 bytes",
            crate::model::truncate_for_message(subject)
        ));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let bad = token.is_empty()
            || token.chars().any(|c| c.is_whitespace() || c.is_control())
            || (token.contains('*') && *token != "*")
            || (token.contains('>') && (*token != ">" || i + 1 != tokens.len()));
        if bad {
            return Err(format!(
                "{subject:?} is not a NATS subject (dot-separated tokens, none empty, no spaces; * a whole token, > only last)"
            ));
        }
    }
    Ok(())
}

/// The message subjects a function takes: its topics but the cron connector's.
pub fn subjects(annotations: &BTreeMap<String, String>) -> Vec<String> {
    topics(annotations)
        .filter(|t| *t != CRON_TOPIC)
        .map(str::to_string)
        .collect()
}

/// The deploy-time check: every problem with the trigger annotations.
pub fn check_annotations(dep: &FunctionDeployment) -> Vec<String> {
    let Some(annotations) = dep.annotations.as_ref() else {
        return Vec::new();
    };
    let mut errors: Vec<String> = topics(annotations)
        .filter_map(|t| check_subject(t).err())
        .map(|e| format!("annotations.{TOPIC}: {e}"))
        .collect();
    if let Some(Err(e)) = cron_spec(annotations) {
        errors.extend(e);
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(schedule: &str, after: &str) -> String {
        Schedule::parse(schedule)
            .unwrap()
            .next_after(at(after))
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn schedules_read_as_cron_reads_them() {
        assert_eq!(
            next("*/5 * * * *", "2026-12-05T10:02:30Z"),
            "2026-12-05T10:05:00+00:00"
        );
        // Strictly after: a due time is never returned twice.
        assert_eq!(
            next("*/5 * * * *", "2026-12-05T10:05:00Z"),
            "2026-12-05T10:10:00+00:00"
        );
        assert_eq!(
            next("* * * * * *", "2026-12-05T10:05:00Z"),
            "2026-12-05T10:05:01+00:00"
        );
        assert_eq!(
            next("30 0 9 * * *", "2026-12-05T10:05:00Z"),
            "2026-12-06T09:00:30+00:00"
        );
        assert_eq!(
            next("@hourly", "2026-12-05T10:05:00Z"),
            "2026-12-05T11:00:00+00:00"
        );
        assert_eq!(
            next("0 0 * * MON", "2026-12-05T10:05:00Z"),
            "2026-12-07T00:00:00+00:00"
        );
        // Day of month and day of week both set: either matches (Vixie cron).
        assert_eq!(
            next("0 0 13 * FRI", "2026-12-05T10:05:00Z"),
            "2026-12-11T00:00:00+00:00"
        );
        assert_eq!(
            next("@every 90s", "2026-12-05T10:05:00Z"),
            "2026-12-05T10:06:30+00:00"
        );
        // 09:00 in London is 09:00 UTC in winter and 08:00 UTC in summer.
        assert_eq!(
            next("CRON_TZ=Europe/London 0 9 * * *", "2026-12-05T10:05:00Z"),
            "2026-12-06T09:00:00+00:00"
        );
        assert_eq!(
            next("TZ=Europe/London 0 9 * * *", "2026-07-05T10:05:00Z"),
            "2026-07-06T08:00:00+00:00"
        );
        // The clocks go back in New York on 2026-11-01 at 06:00Z (02:00 EDT -> 01:00 EST):
        // 01:30 local happens at 05:30Z and again at 06:30Z.
        let ny = Schedule::parse("CRON_TZ=America/New_York */15 * * * *").unwrap();
        let after = |s: &str| ny.next_after(at(s)).unwrap().to_rfc3339();
        assert_eq!(after("2026-11-01T05:20:00Z"), "2026-11-01T05:30:00+00:00");
        assert_eq!(after("2026-11-01T06:20:00Z"), "2026-11-01T06:30:00+00:00");
        assert_eq!(after("2026-11-01T06:45:00Z"), "2026-11-01T07:00:00+00:00");
        let t = Utc.with_ymd_and_hms(2026, 12, 5, 23, 59, 59).unwrap();
        let s = Schedule::parse("0 0 1 1 *").unwrap();
        assert_eq!(
            s.next_after(t).unwrap().to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
    }

    #[test]
    fn the_last_due_time_before_a_moment() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        let last = s.last_between(at("2026-12-01T00:00:00Z"), at("2026-12-05T10:07:00Z"));
        assert_eq!(last, Some(at("2026-12-05T10:05:00Z")));
        assert_eq!(
            s.last_between(at("2026-12-05T10:06:00Z"), at("2026-12-05T10:07:00Z")),
            None
        );
        let every = Schedule::parse("@every 10s").unwrap();
        assert_eq!(
            every.last_between(at("2026-12-05T10:00:00Z"), at("2026-12-06T16:00:05Z")),
            Some(at("2026-12-06T16:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_name_the_problem() {
        for (text, says) in [
            ("", "is empty"),
            ("* * * *", "has 4 fields"),
            ("* * * * * * *", "has 7 fields"),
            ("61 * * * *", "not a cron schedule"),
            ("*/5 * * * FOO", "not a cron schedule"),
            ("@every", "@every"),
            ("@every 0s", "shorter than 1s"),
            ("@every 500ms", "shorter than 1s"),
            ("@every soon", "not a duration"),
            ("CRON_TZ=Mars/Olympus 0 9 * * *", "not a time zone"),
            ("CRON_TZ=UTC", "needs a schedule"),
        ] {
            let e = Schedule::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn subjects_are_checked_as_nats_reads_them() {
        for good in [
            "orders",
            "orders.created",
            "orders.*",
            "orders.>",
            "a.*.c",
            ">",
            "cron-function",
        ] {
            assert_eq!(check_subject(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "orders.",
            ".orders",
            "a..b",
            "orders created",
            "a.>.b",
            "a.b*",
            "a.>b",
            "tab\t",
        ] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
        let a = annotations(&[("topic", "cron-function, orders.created ,jobs.>")]);
        assert_eq!(subjects(&a), ["orders.created", "jobs.>"]);
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_annotations_follow_openfaas() {
        assert!(cron_spec(&annotations(&[("schedule", "* * * * *")])).is_none());
        assert!(cron_spec(&annotations(&[("topic", "orders")])).is_none());
        let spec = cron_spec(&annotations(&[
            ("topic", "orders, cron-function"),
            ("schedule", " */5 * * * * "),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(spec.text, "*/5 * * * *");
        assert_eq!(spec.concurrency, Concurrency::Skip);
        assert!(!spec.every_datacenter);
        let errors = cron_spec(&annotations(&[
            ("topic", "cron-function"),
            (CRON_CONCURRENCY, "replace"),
            (CRON_EVERY_DATACENTER, "maybe"),
        ]))
        .unwrap()
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with("annotations.schedule: is required"),
            "{errors:?}"
        );
        assert!(errors[1].contains(CRON_CONCURRENCY), "{errors:?}");
        assert!(errors[2].contains(CRON_EVERY_DATACENTER), "{errors:?}");
        let errors = cron_spec(&annotations(&[
            ("topic", "cron-function"),
            ("schedule", "often"),
        ]))
        .unwrap()
        .unwrap_err();
        assert!(
            errors[0].starts_with("annotations.schedule: "),
            "{errors:?}"
        );
    }
}
