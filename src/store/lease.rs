//! Leader election on the store: one instance at a time runs the loops that must run once
//! (query policies, ticks and scale to zero, the reconciler, cron). The leader holds a lease
//! row that it renews every quarter of its time to live; a candidate takes it once it has run
//! out. The leader counts its own lease from *before* it asked for it and gives up a margin
//! early, so a leader that cannot renew (dead database, frozen process) stops acting before
//! the lease ends in the database, and so before any other instance can take it. Writes made
//! for the leader also carry the lease's fencing token, checked in their transaction.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Store;

/// The lease the autoscaler's loops run under.
pub const LEADER_LEASE: &str = "leader";

/// How long before its end the leader stops trusting its lease (clock rates and scheduling).
fn margin(ttl: Duration) -> Duration {
    (ttl / 8).max(Duration::from_millis(50))
}

pub struct Leader {
    store: Option<Store>,
    /// This instance, as the lease names it.
    pub id: String,
    ttl: Duration,
    /// While leading: the fencing token and until when this instance may act.
    term: Mutex<Option<(i64, Instant)>>,
    changed: watch::Sender<bool>,
    /// Set at a clean stop: the lease is not renewed (or taken) again.
    resigned: std::sync::atomic::AtomicBool,
    /// Held while asking for the lease and while giving it up: a renewal in flight never
    /// lands after the release.
    asking: tokio::sync::Mutex<()>,
}

impl Leader {
    /// The only instance of a store nobody shares: always the leader.
    pub fn sole() -> Arc<Leader> {
        let (changed, _) = watch::channel(true);
        Arc::new(Leader {
            store: None,
            id: instance_id(),
            ttl: Duration::MAX,
            term: Mutex::new(Some((1, far_future()))),
            changed,
            resigned: Default::default(),
            asking: Default::default(),
        })
    }

    /// An instance of a shared store: a candidate until [`Leader::spawn`] wins the lease.
    pub fn candidate(store: Store, ttl: Duration) -> Arc<Leader> {
        let (changed, _) = watch::channel(false);
        Arc::new(Leader {
            store: Some(store),
            id: instance_id(),
            ttl,
            term: Mutex::new(None),
            changed,
            resigned: Default::default(),
            asking: Default::default(),
        })
    }

    /// The fencing token while this instance may act as the leader.
    pub fn token(&self) -> Option<i64> {
        let term = self.term.lock().unwrap_or_else(|p| p.into_inner());
        term.filter(|(_, until)| Instant::now() < *until)
            .map(|(token, _)| token)
    }

    pub fn is_leader(&self) -> bool {
        self.token().is_some()
    }

    /// Whether the leader's loops run in several instances (a shared store).
    pub fn elected(&self) -> bool {
        self.store.is_some()
    }

    /// Changes of leadership, as they are noticed (true: this instance leads).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.changed.subscribe()
    }

    /// Campaigns for the lease and keeps it while this process runs.
    pub fn spawn(self: &Arc<Self>, metrics: Arc<crate::telemetry::Metrics>) {
        let Some(store) = self.store.clone() else {
            metrics.leader.set(1);
            return;
        };
        let this = self.clone();
        let metrics_ = metrics.clone();
        tokio::spawn(async move {
            let metrics = metrics_;
            let every = this.ttl / 4;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                let asking = this.asking.lock().await;
                if this.resigned.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let asked = Instant::now();
                let answer = tokio::time::timeout(
                    every,
                    store.acquire_lease(LEADER_LEASE, &this.id, this.ttl),
                )
                .await;
                drop(asking);
                let token = match answer {
                    Ok(Ok(token)) => {
                        metrics.store_up.set(1);
                        if failing {
                            tracing::info!("leader election: the database answers again");
                            failing = false;
                        }
                        token
                    }
                    Ok(Err(e)) => {
                        metrics.store_up.set(0);
                        if !failing {
                            tracing::error!(error = %e, "leader election: cannot reach the database; loops pause when the lease runs out");
                            failing = true;
                        }
                        None
                    }
                    Err(_) => {
                        metrics.store_up.set(0);
                        if !failing {
                            tracing::error!("leader election: the database did not answer in {every:?}; loops pause when the lease runs out");
                            failing = true;
                        }
                        None
                    }
                };
                this.record(token, asked, &metrics);
            }
        });
        // Lost leadership shows at once, not at the next renewal.
        let this = self.clone();
        tokio::spawn(async move {
            let metrics_ = metrics;
            loop {
                let until = {
                    let term = this.term.lock().unwrap_or_else(|p| p.into_inner());
                    term.map(|(_, until)| until)
                };
                match until {
                    Some(until) if Instant::now() >= until => {
                        this.record(None, Instant::now(), &metrics_);
                    }
                    Some(until) => {
                        tokio::time::sleep_until(until.into()).await;
                        continue;
                    }
                    None => {}
                }
                let mut rx = this.watch();
                let _ = rx.changed().await;
            }
        });
    }

    fn record(&self, token: Option<i64>, asked: Instant, metrics: &crate::telemetry::Metrics) {
        // An answer that arrives after a clean stop began is not a new term.
        let token = token.filter(|_| !self.resigned.load(std::sync::atomic::Ordering::SeqCst));
        let until = asked + self.ttl.saturating_sub(margin(self.ttl));
        let (was, now) = {
            let mut term = self.term.lock().unwrap_or_else(|p| p.into_inner());
            let was = term.is_some_and(|(_, u)| Instant::now() < u);
            *term = token.map(|t| (t, until));
            (was, token.is_some() && Instant::now() < until)
        };
        if was != now {
            if now {
                tracing::info!(instance = %self.id, token = ?token, "leader election: this instance leads");
            } else {
                tracing::warn!(instance = %self.id, "leader election: this instance no longer leads");
            }
            self.changed.send_replace(now);
        }
        metrics.leader.set(i64::from(now));
    }

    /// Gives the lease up at a clean stop.
    pub async fn resign(&self) {
        let Some(store) = &self.store else { return };
        let _asking = self.asking.lock().await;
        self.resigned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if self
            .term
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some()
        {
            self.changed.send_replace(false);
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                store.release_lease(LEADER_LEASE, &self.id),
            )
            .await;
        }
    }

    /// The instance holding the lease now (asked of the database), for status pages.
    pub async fn current(&self) -> Option<String> {
        match &self.store {
            None => Some(self.id.clone()),
            Some(store) => store
                .lease_holder(LEADER_LEASE)
                .await
                .ok()
                .flatten()
                .map(|(holder, _)| holder),
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// `host:pid:random`: unique per process, readable in status pages and logs.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".to_string());
    let random: u32 = rand::random();
    format!("{host}:{}:{random:08x}", std::process::id())
}
