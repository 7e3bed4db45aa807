//! Invocation rates from faastastic's own counters: samples of every function's invocation
//! total, kept just long enough to cover a window, so a rate is one subtraction.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The fewest invocations a load that began inside a window is measured from on its own.
pub const MIN_EVENTS: u64 = 5;

/// Keyed by whatever identifies a counter: (`name.namespace`, datacenter) in the server.
pub struct RateWindow<K> {
    window: Duration,
    /// (when, invocations per key), oldest first.
    samples: VecDeque<(Instant, HashMap<K, u64>)>,
}

impl<K: Hash + Eq> RateWindow<K> {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Adds a sample and drops the ones no longer needed to cover the window.
    pub fn push(&mut self, now: Instant, counts: HashMap<K, u64>) {
        self.samples.push_back((now, counts));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    /// How much time the samples cover.
    pub fn span(&self) -> Duration {
        match (self.samples.front(), self.samples.back()) {
            (Some((first, _)), Some((last, _))) => last.duration_since(*first),
            _ => Duration::ZERO,
        }
    }

    /// Invocations per second of `key` over the window; `None` until two samples exist. A
    /// function never invoked reads as 0. See [`Self::rate_over`].
    pub fn rate(&self, key: &K) -> Option<f64> {
        self.rate_over(key, self.window)
    }

    /// Invocations per second of `key` over the last `window` (at most the one the samples
    /// are kept for; the samples that cover it, from the latest one taken at or before its
    /// start); `None` until two samples exist, and while a load that was already running at
    /// the first sample is covered for less than the window (after a start, the rate of a
    /// running load is not known until the window has passed).
    ///
    /// A load that began inside the window is measured over the part it covers, so that idle
    /// seconds before a step do not average it down (a step of 60/s two seconds into a 10 s
    /// window reads 60/s, not 12/s): once two samples show it, from the first of them (the
    /// interval it began in is left out, as where in it the load began is unknown); with only
    /// one, from the last idle sample (a lower bound). Either needs [`MIN_EVENTS`] invocations
    /// in the part it measures; fewer (a lone call after a quiet spell, the tail of a spike)
    /// are measured over the whole window. A load that stops is still measured from where it
    /// began, so its rate falls as the window empties rather than at once.
    pub fn rate_over(&self, key: &K, window: Duration) -> Option<f64> {
        let (last_at, _) = self.samples.back()?;
        let skip = self
            .samples
            .iter()
            .rposition(|(t, _)| last_at.duration_since(*t) >= window)
            .unwrap_or(0);
        let count = |sample: &HashMap<K, u64>| sample.get(key).copied().unwrap_or(0);
        let mut points = self.samples.range(skip..).map(|(t, s)| (*t, count(s)));
        let (first_at, first) = points.next()?;
        // The last sample still at the first one's count, the first one past it (where the
        // load began, if it began after the first sample), and the last one.
        let (mut idle, mut onset, mut last) = ((first_at, first), None, (first_at, first));
        let mut idle_samples = 0;
        for (at, n) in points {
            if onset.is_none() {
                if n == first {
                    idle = (at, n);
                    idle_samples += 1;
                } else {
                    onset = Some((at, n));
                }
            }
            last = (at, n);
        }
        let ((last_at, last), span) = (last, last.0.duration_since(first_at));
        if span.is_zero() {
            return None;
        }
        let per_sec = |(at, n): (Instant, u64)| {
            last.saturating_sub(n) as f64 / last_at.duration_since(at).as_secs_f64()
        };
        let enough = |(_, n): (Instant, u64)| last.saturating_sub(n) >= MIN_EVENTS;
        // Never invoked before the first sample, or idle between two samples.
        let began_inside = idle_samples > 0 || first == 0;
        Some(match onset {
            Some(from) if began_inside && from.0 < last_at && enough(from) => per_sec(from),
            Some(_) if began_inside && enough(idle) => per_sec(idle),
            // Running before the first sample: over the whole window, once covered.
            Some(_) if !began_inside && span < window.min(self.window) => return None,
            _ => per_sec((first_at, first)),
        })
    }

    /// The keys whose count changed over the samples: those invoked within the window.
    pub fn changed(&self) -> impl Iterator<Item = &K> {
        let first = self.samples.front().map(|(_, s)| s);
        self.samples.back().into_iter().flat_map(move |(_, last)| {
            last.iter()
                .filter(move |(k, n)| first.and_then(|f| f.get(*k)) != Some(*n))
                .map(|(k, _)| k)
        })
    }

    /// The keys of the latest sample: everything invoked through faastastic since the start.
    pub fn latest_keys(&self) -> impl Iterator<Item = &K> {
        self.samples.back().into_iter().flat_map(|(_, s)| s.keys())
    }

    /// Whether `key` has been invoked through faastastic at all since the server started.
    pub fn seen(&self, key: &K) -> bool {
        self.samples
            .back()
            .is_some_and(|(_, latest)| latest.get(key).is_some_and(|n| *n > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: u64) -> HashMap<String, u64> {
        [("f.fn".to_string(), n), ("idle.fn".to_string(), 0)].into()
    }

    #[test]
    fn rate_over_the_window_only() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        w.push(t0, counts(0));
        let (f, other, idle) = (
            "f.fn".to_string(),
            "other.fn".to_string(),
            "idle.fn".to_string(),
        );
        assert_eq!(w.rate(&f), None, "one sample has no rate");
        // 100/s for 10 s, then nothing for 10 s.
        for s in 1..=10 {
            w.push(t0 + Duration::from_secs(s), counts(100 * s));
        }
        assert_eq!(w.rate(&f), Some(100.0));
        for s in 11..=20 {
            w.push(t0 + Duration::from_secs(s), counts(1000));
        }
        assert_eq!(w.rate(&f), Some(0.0), "old samples leave the window");
        assert!(w.span() <= Duration::from_secs(11));
        assert_eq!(w.rate(&other), Some(0.0));
        assert!(w.seen(&f) && !w.seen(&other) && !w.seen(&idle));
    }

    /// A step after idle seconds reads at its own rate, not averaged with them; a load that
    /// stops reads over the whole window.
    #[test]
    fn a_load_that_began_inside_the_window_is_measured_over_its_own_span() {
        let t0 = Instant::now();
        let f = "f.fn".to_string();
        let mut w = RateWindow::new(Duration::from_secs(10));
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Idle for 8 s (samples every 500 ms), then 60/s.
        for i in 0..=16 {
            w.push(ms(i * 500), counts(0));
        }
        w.push(ms(8_500), counts(30));
        assert_eq!(w.rate(&f), Some(60.0), "one interval into the step");
        w.push(ms(9_000), counts(60));
        assert_eq!(w.rate(&f), Some(60.0));
        // The load stops: the rate falls as the window empties, not at once.
        for i in 19..=24 {
            w.push(ms(i * 500), counts(60));
        }
        let after = w.rate(&f).unwrap();
        assert!(after > 0.0 && after < 60.0, "{after}");
    }

    /// A load already running when sampling starts has no rate until the samples cover the
    /// window; a shorter window over the same samples reads the recent part only.
    #[test]
    fn a_running_load_waits_for_the_window_and_a_short_window_reads_the_recent_part() {
        let t0 = Instant::now();
        let f = "f.fn".to_string();
        let mut w = RateWindow::new(Duration::from_secs(10));
        let s = |n: u64| t0 + Duration::from_secs(n);
        // 20/s for 12 s (running before the first sample), then 60/s.
        for i in 0..=12 {
            w.push(s(i), counts(1000 + 20 * i));
            let expected = (i >= 10).then_some(20.0);
            assert_eq!(w.rate(&f), expected, "at {i} s");
        }
        for i in 13..=14 {
            w.push(s(i), counts(1240 + 60 * (i - 12)));
        }
        assert_eq!(w.rate_over(&f, Duration::from_secs(2)), Some(60.0));
        assert_eq!(w.rate(&f), Some((20.0 * 8.0 + 120.0) / 10.0));
        // Never invoked before the first sample: the load began inside, and is read at once.
        let mut fresh = RateWindow::new(Duration::from_secs(10));
        fresh.push(s(0), counts(0));
        fresh.push(s(1), counts(40));
        assert_eq!(fresh.rate(&f), Some(40.0));
    }
}
