//! Invocation rates from faastastic's own counters: samples of every function's invocation
//! total, kept just long enough to cover a window, so a rate is one subtraction.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

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

    /// Invocations per second of `key` across the samples; `None` until two samples exist. A
    /// function never invoked reads as 0.
    ///
    /// A load that began inside the window is measured over the part it covers: the samples
    /// before its first invocation are left out, so that idle seconds before a step do not
    /// average it down (a step of 60/s two seconds into a 10 s window reads 60/s, not 12/s).
    /// A load that stops is still measured over the whole window, so a scale-down waits for
    /// the window to empty.
    pub fn rate(&self, key: &K) -> Option<f64> {
        if self.span().is_zero() {
            return None;
        }
        let count = |sample: &HashMap<K, u64>| sample.get(key).copied().unwrap_or(0);
        let (last_at, last) = self.samples.back().map(|(t, s)| (*t, count(s)))?;
        let first = count(&self.samples.front()?.1);
        // The last sample still at the first one's count: where the load began.
        let since = self
            .samples
            .iter()
            .take_while(|(_, s)| count(s) == first)
            .last()
            .map(|(t, _)| *t)?;
        let span = match last_at.duration_since(since) {
            d if last == first || d.is_zero() => self.span(),
            d => d,
        };
        Some(last.saturating_sub(first) as f64 / span.as_secs_f64())
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
}
