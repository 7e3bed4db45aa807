//! Reaction timelines: a target policy on the shipped defaults, driven on a simulated clock
//! through the pieces the server runs (the counters' rate windows, the strategy, the reading
//! the query loop builds, the engine), for the load shapes users meet: a step, a steeper step,
//! a steady noisy load, a spike and a stop. Each runs with the internal source and with a
//! Prometheus `rate(...[1m])` query (modelled from 1 s scrapes), as the query loop reads
//! them: its source every `interval_ms` (2 s), the short window every 500 ms.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};

use super::policy::patch::PolicyPatch;
use super::policy::{decide, Input, Outcome, Policy, State};
use super::query::{Read, Reading, SHORT_TICK};
use super::rates::RateWindow;
use super::strategy::Strategy;
use crate::config::SHORT_WINDOW;
use crate::platform::ReplicaCounts;

const TARGET: f64 = 10.0;
const INTERVAL_MS: u64 = 2_000;
const WINDOW: Duration = Duration::from_secs(10);
/// The simulation starts this long before the load, so that every window is full of idle.
const LEAD_IN_MS: u64 = 70_000;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Source {
    Internal,
    /// `rate(gateway_function_invocation_total[1m])`, scraped every second.
    Prometheus,
    /// A query without a datacenter label for a function in two datacenters: each is asked
    /// for its half of the total (the internal window's rate), while every call lands in
    /// this one, whose short window sees them all.
    SharedByTwo,
}

/// Invocation times in milliseconds, sorted.
struct Arrivals(Vec<f64>);

impl Arrivals {
    /// Evenly spaced arrivals at `per_sec` from `from_ms` until `to_ms`.
    fn even(per_sec: f64, from_ms: u64, to_ms: u64) -> Vec<f64> {
        let gap = 1000.0 / per_sec;
        (0..)
            .map(|i| from_ms as f64 + gap * i as f64)
            .take_while(|t| *t < to_ms as f64)
            .collect()
    }

    /// A Poisson process at `per_sec` from `from_ms` until `to_ms` (xorshift, seeded).
    fn poisson(per_sec: f64, from_ms: u64, to_ms: u64, seed: u64) -> Vec<f64> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let mut out = Vec::new();
        let mut t = from_ms as f64;
        loop {
            t += -uniform().ln() / per_sec * 1000.0;
            if t >= to_ms as f64 {
                return out;
            }
            out.push(t);
        }
    }

    fn count(&self, t_ms: u64) -> u64 {
        self.0.partition_point(|a| *a <= t_ms as f64) as u64
    }
}

/// A scale change: (ms after the load began, from, to, reason code).
type Change = (i64, u64, u64, &'static str);

struct Sim {
    source: Source,
    policy: Policy,
    strategy: Strategy,
    arrivals: Arrivals,
    base: Instant,
    own: RateWindow<&'static str>,
    recent: RateWindow<&'static str>,
    /// The executor's own-counter window (the staleness window), sampled every second.
    observed: RateWindow<&'static str>,
    scrapes: VecDeque<(u64, u64)>,
    last_read: Option<u64>,
    /// The next turn's time.
    t: u64,
    current: u64,
    state: State,
    changes: Vec<Change>,
    /// What the query loop remembers between readings (`query::Enough`).
    enough_at: Option<(DateTime<Utc>, u64)>,
}

fn at(ms: u64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000, 0).unwrap() + chrono::Duration::milliseconds(ms as i64)
}

impl Sim {
    /// The shipped defaults, with max 20 so that the needed count is never cut.
    fn new(source: Source, current: u64, arrivals: Vec<f64>) -> Sim {
        let (policy, _) = PolicyPatch::default().resolve().unwrap();
        Sim {
            source,
            policy: Policy { max: 20, ..policy },
            strategy: Strategy::Target {
                target: TARGET,
                per_replica: false,
                tolerance: 0.1,
            },
            arrivals: Arrivals(arrivals),
            base: Instant::now(),
            own: RateWindow::new(WINDOW),
            recent: RateWindow::new(SHORT_WINDOW),
            observed: RateWindow::new(WINDOW),
            scrapes: VecDeque::new(),
            last_read: None,
            t: 0,
            current,
            state: State::default(),
            changes: Vec::new(),
            enough_at: None,
        }
    }

    /// `rate(...[1m])` at `t` from the scrapes (plain: the two ends of the minute).
    fn prometheus_rate(&self) -> Option<f64> {
        let (last_t, last) = *self.scrapes.back()?;
        let (first_t, first) = *self.scrapes.front()?;
        (last_t > first_t).then(|| (last - first) as f64 * 1000.0 / (last_t - first_t) as f64)
    }

    /// Runs until `until_ms` (on the simulation's clock, which starts at 0).
    fn run(&mut self, until_ms: u64, load_start_ms: u64) -> &[Change] {
        while self.t <= until_ms {
            self.turn(load_start_ms, true);
        }
        &self.changes
    }

    /// Samples and scrapes until `until_ms` without deciding: the history a server running
    /// for a while has (the engine's memory starts empty all the same).
    fn warm(&mut self, until_ms: u64) {
        while self.t <= until_ms {
            self.turn(0, false);
        }
    }

    /// One turn of the query loop, as `Runner::evaluate` takes it (Prometheus scrapes every
    /// second in between).
    fn turn(&mut self, load_start_ms: u64, decide_now: bool) {
        let t = self.t;
        self.t += SHORT_TICK.as_millis() as u64;
        if t.is_multiple_of(1000) {
            let now = self.base + Duration::from_millis(t);
            self.observed
                .push(now, [("f", self.arrivals.count(t))].into());
            self.scrapes.push_back((t, self.arrivals.count(t)));
            while self.scrapes.len() > 61 {
                self.scrapes.pop_front();
            }
        }
        let now = self.base + Duration::from_millis(t);
        let count = self.arrivals.count(t);
        self.recent.push(now, [("f", count)].into());
        let due = self
            .last_read
            .is_none_or(|r| t - r + SHORT_TICK.as_millis() as u64 / 2 >= INTERVAL_MS);
        let value = if due {
            self.last_read = Some(t);
            match self.source {
                Source::Internal => {
                    self.own.push(now, [("f", count)].into());
                    self.own.rate(&"f")
                }
                Source::Prometheus => self.prometheus_rate(),
                Source::SharedByTwo => {
                    self.own.push(now, [("f", count)].into());
                    self.own.rate(&"f").map(|r| r / 2.0)
                }
            }
        } else {
            None
        };
        if !decide_now {
            return;
        }
        let reading = Reading {
            value,
            short_value: self.recent.rate(&"f"),
            short_window: Some(SHORT_WINDOW),
            enough_at: self.enough_at,
            now: at(t),
        };
        let replicas = ReplicaCounts {
            desired: self.current,
            ready: self.current,
        };
        let recent = || self.observed.rate(&"f");
        let proposal = match reading.action(&self.strategy, replicas, self.policy.max, recent) {
            Read::Nothing => return,
            Read::Enough => {
                self.enough_at = Some((at(t), self.current));
                return;
            }
            Read::Propose(p) => p,
        };
        if proposal.enough {
            self.enough_at = Some((at(t), self.current));
        }
        let input = Input::Signal {
            action: proposal.action,
            dedupe_key: None,
            observed_rate: None,
        };
        let (d, next) = decide(&self.policy, self.current, &self.state, input, at(t));
        if d.outcome == Outcome::Scale {
            let since = t as i64 - load_start_ms as i64;
            self.changes.push((since, d.from, d.to, d.reason.code()));
            self.current = d.to;
        }
        self.state = next;
    }
}

fn ups(changes: &[Change]) -> Vec<&Change> {
    changes
        .iter()
        .filter(|(_, from, to, _)| to > from)
        .collect()
}

/// Where the load begins relative to the 500 ms ticks.
const PHASES_MS: [u64; 5] = [1, 120, 250, 380, 499];

/// A step from idle to 55/s (5.5 replicas' worth: 6 needed) reaches 6 within 2 s of its start
/// in at most two scale-ups, and stays there while the load lasts.
#[test]
fn a_step_reaches_the_count_it_needs_in_two_decisions_within_two_seconds() {
    for source in [Source::Internal, Source::Prometheus] {
        for phase in PHASES_MS {
            let start = LEAD_IN_MS + phase;
            let mut sim = Sim::new(source, 1, Arrivals::even(55.0, start, start + 120_000));
            let changes = sim.run(start + 120_000, start).to_vec();
            let ctx = format!("{source:?}, load {phase} ms after a tick: {changes:?}");
            let reached = changes.iter().find(|c| c.2 == 6).map(|c| c.0);
            assert!(reached.is_some_and(|ms| ms <= 2_000), "{ctx}");
            assert!(ups(&changes).len() <= 2, "{ctx}");
            assert_eq!(changes.last().unwrap().2, 6, "{ctx}");
            assert!(changes.iter().all(|c| c.2 <= 6), "no overshoot: {ctx}");
            assert!(changes.iter().all(|c| c.2 >= c.1), "no scale-down: {ctx}");
            assert_eq!(changes[0].3, "burst", "{ctx}");
        }
    }
}

/// A steeper step, from idle to five times what the one running replica carries (48/s: 5
/// needed) is met the same way.
#[test]
fn a_steeper_step_is_met_in_two_decisions_as_well() {
    for source in [Source::Internal, Source::Prometheus] {
        for phase in PHASES_MS {
            let start = LEAD_IN_MS + phase;
            let mut sim = Sim::new(source, 1, Arrivals::even(48.0, start, start + 30_000));
            let changes = sim.run(start + 30_000, start).to_vec();
            let ctx = format!("{source:?}, load {phase} ms after a tick: {changes:?}");
            let reached = changes.iter().find(|c| c.2 == 5).map(|c| c.0);
            assert!(reached.is_some_and(|ms| ms <= 2_000), "{ctx}");
            assert!(ups(&changes).len() <= 2, "{ctx}");
            assert!(changes.iter().all(|c| c.2 <= 5), "{ctx}");
        }
    }
}

/// A step on top of a settled load (2 replicas at 19/s, then 100/s: 10 needed) goes up through
/// the burst within about two seconds: the short window's average climbs over its 2 s.
#[test]
fn a_step_on_a_running_load_is_met_through_the_burst() {
    for source in [Source::Internal, Source::Prometheus] {
        let step_at = LEAD_IN_MS + 60_000 + 130;
        let mut load = Arrivals::even(19.0, LEAD_IN_MS, step_at);
        load.extend(Arrivals::even(100.0, step_at, step_at + 30_000));
        let mut sim = Sim::new(source, 2, load);
        sim.run(step_at - 1, step_at);
        assert_eq!(sim.current, 2, "{source:?} settled: {:?}", sim.changes);
        sim.changes.clear();
        let changes = sim.run(step_at + 30_000, step_at).to_vec();
        let ctx = format!("{source:?}: {changes:?}");
        let reached = changes.iter().find(|c| c.2 == 10).map(|c| c.0);
        assert!(reached.is_some_and(|ms| ms <= 2_500), "{ctx}");
        assert!(changes.iter().all(|c| c.2 <= 10 && c.2 > c.1), "{ctx}");
        assert!(changes.iter().all(|c| c.3 == "burst"), "{ctx}");
    }
}

/// A steady Poisson load at 0.9x of what the running replicas carry changes nothing for a
/// minute, on either source, over many seeds.
#[test]
fn a_steady_noisy_load_under_capacity_changes_nothing() {
    for source in [Source::Internal, Source::Prometheus] {
        for seed in 1..=40 {
            let load = Arrivals::poisson(36.0, 0, 200_000, seed);
            let mut sim = Sim::new(source, 4, load);
            sim.warm(LEAD_IN_MS);
            let changes = sim.run(LEAD_IN_MS + 60_000, 0);
            assert!(changes.is_empty(), "{source:?} seed {seed}: {changes:?}");
        }
    }
}

/// The same noisy load from idle (36/s: 4 needed) settles once and then holds: most of it at
/// once through a burst, the rest when the policy's window shows it; at most two scale-ups,
/// no scale-down inside the stabilization window, none back up after one down (a reading of
/// one interval can overshoot by a replica, which the window gives back once).
#[test]
fn a_noisy_step_settles_without_flapping() {
    let mut late = 0;
    for source in [Source::Internal, Source::Prometheus] {
        // When the policy's window shows all of the load: its next read, or a minute.
        let shown = match source {
            Source::Internal | Source::SharedByTwo => 4_500,
            Source::Prometheus => 64_000,
        };
        for seed in 1..=40 {
            let start = LEAD_IN_MS + 7;
            let load = Arrivals::poisson(36.0, start, start + 240_000, seed);
            let mut sim = Sim::new(source, 1, load);
            let changes = sim.run(start + 240_000, start).to_vec();
            let ctx = format!("{source:?} seed {seed}: {changes:?}");
            let reached = |n: u64| changes.iter().find(|c| c.2 >= n).map(|c| c.0);
            assert!(reached(3).is_some_and(|ms| ms <= 2_000), "{ctx}");
            assert!(reached(4).is_some_and(|ms| ms <= shown), "{ctx}");
            late += usize::from(reached(4).is_some_and(|ms| ms > 2_000));
            assert!(ups(&changes).len() <= 2, "{ctx}");
            let first_down = changes.iter().position(|c| c.2 < c.1);
            if let Some(i) = first_down {
                assert!(changes[i].0 >= 60_000, "{ctx}");
                assert!(changes[i..].iter().all(|c| c.2 < c.1), "{ctx}");
            }
            assert_eq!(sim.current, 4, "{ctx}");
        }
    }
    // Most runs have all of it within 2 s, as the even step does.
    assert!(late <= 8, "{late} of 80 runs took more than 2 s");
}

/// A policy's window that asks for less than the short window sees (its total shared by two
/// datacenters while the calls land in one) does not make the count flap: the burst goes up
/// once, and the short window is the floor of every scale-down after it.
#[test]
fn a_lagging_or_shared_window_does_not_undo_a_burst() {
    for seed in 1..=10 {
        let start = LEAD_IN_MS + 7;
        let load = Arrivals::poisson(40.0, start, start + 300_000, seed);
        let mut sim = Sim::new(Source::SharedByTwo, 1, load);
        let changes = sim.run(start + 300_000, start).to_vec();
        let ctx = format!("seed {seed}: {changes:?}");
        // Up in the first seconds (a noisy one may overshoot by one), then never up again.
        assert!(ups(&changes).iter().all(|c| c.0 < 5_000), "{ctx}");
        let first_down = changes.iter().position(|c| c.2 < c.1);
        if let Some(i) = first_down {
            assert!(changes[i..].iter().all(|c| c.2 < c.1), "{ctx}");
        }
        assert!(sim.current >= 4, "{ctx}");
    }
}

/// A spike shorter than the short window (300/s for one second) may scale up, but leaves no
/// extra replica once the stabilization window has passed over the readings it caused (and
/// one down cooldown, when a step down lands between two of them).
#[test]
fn a_spike_leaves_no_extra_replicas_beyond_the_stabilization_window() {
    let (p, _) = PolicyPatch::default().resolve().unwrap();
    for source in [Source::Internal, Source::Prometheus] {
        for phase in PHASES_MS {
            let start = LEAD_IN_MS + phase;
            let mut sim = Sim::new(source, 1, Arrivals::even(300.0, start, start + 1_000));
            // The last reading the spike shows in: the source's window after it ends.
            let shown = match source {
                Source::Internal | Source::SharedByTwo => WINDOW.as_millis() as u64,
                Source::Prometheus => 60_000,
            };
            // The readings that show it are held for the stabilization window; a step down
            // that lands between two of them waits one down cooldown for the next.
            let settled = 1_000
                + shown
                + p.stabilization_window.as_millis() as u64
                + p.down_cooldown.as_millis() as u64
                + 2_500;
            let changes = sim.run(start + settled + 30_000, start).to_vec();
            let ctx = format!("{source:?}, {phase} ms: {changes:?}");
            assert!(!ups(&changes).is_empty(), "a burst answers it: {ctx}");
            assert!(
                changes
                    .iter()
                    .filter(|c| c.2 < c.1)
                    .all(|c| c.0 >= p.stabilization_window.as_millis() as i64),
                "{ctx}"
            );
            assert_eq!(sim.current, 1, "{ctx}");
            let back = changes.iter().rev().find(|c| c.2 == 1).map(|c| c.0);
            assert!(back.is_some_and(|ms| ms <= settled as i64), "{ctx}");
        }
    }
}

/// When the load stops, replicas step down only as the stabilization window and the down
/// cooldown allow: nothing for a window after the stop, then a cooldown between steps.
#[test]
fn a_load_that_stops_steps_down_as_the_window_and_cooldown_allow() {
    let (p, _) = PolicyPatch::default().resolve().unwrap();
    let (window, cooldown) = (
        p.stabilization_window.as_millis() as i64,
        p.down_cooldown.as_millis() as i64,
    );
    for source in [Source::Internal, Source::Prometheus] {
        let start = LEAD_IN_MS + 250;
        let stop = start + 90_000;
        let mut sim = Sim::new(source, 1, Arrivals::even(55.0, start, stop));
        sim.run(stop - 1, start);
        assert_eq!(sim.current, 6, "{source:?}: {:?}", sim.changes);
        sim.changes.clear();
        let changes = sim.run(stop + 300_000, stop).to_vec();
        let ctx = format!("{source:?}: {changes:?}");
        assert!(!changes.is_empty(), "{ctx}");
        assert!(changes.iter().all(|c| c.2 < c.1), "{ctx}");
        assert!(changes[0].0 >= window, "{ctx}");
        for pair in changes.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= cooldown, "{ctx}");
        }
        assert_eq!(sim.current, 1, "{ctx}");
    }
}
