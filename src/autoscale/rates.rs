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
    pub fn rate(&self, key: &K) -> Option<f64> {
        let span = self.span().as_secs_f64();
        if span <= 0.0 {
            return None;
        }
        let count = |sample: &HashMap<K, u64>| sample.get(key).copied().unwrap_or(0);
        let first = count(&self.samples.front()?.1);
        let last = count(&self.samples.back()?.1);
        Some(last.saturating_sub(first) as f64 / span)
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
}
