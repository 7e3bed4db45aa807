//! On a shared store, this instance follows what the others change: each announced change is
//! read again where it lives (the fleet's functions and namespaces, the engine's states and
//! pauses), and everything is read again after a gap in the announcements and every
//! `RESYNC` as a safety net.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::executor::Autoscaler;
use crate::fleet::Fleet;
use crate::model::FunctionId;
use crate::store::{Change, Note, Store};

/// How often everything is read again whatever was announced.
pub const RESYNC: Duration = Duration::from_secs(10);

/// Starts following a shared store's changes; nothing to follow on a store of one's own.
pub fn spawn(store: &Store, fleet: Arc<Fleet>, autoscaler: Arc<Autoscaler>) {
    let Some(mut notes) = store.subscribe() else {
        return;
    };
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                note = notes.recv() => match note {
                    Ok(note) => note,
                    Err(RecvError::Lagged(_)) => Note::Resync,
                    Err(RecvError::Closed) => return,
                },
                _ = resync.tick() => Note::Resync,
            };
            // What else has arrived is read with it, each thing once (a busy instance
            // announces the same function many times a second).
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match notes.try_recv() {
                    Ok(note) => batch.push(note),
                    Err(TryRecvError::Lagged(_)) => batch.push(Note::Resync),
                    Err(_) => break,
                }
            }
            if batch.contains(&Note::Resync) {
                batch = vec![Note::Resync];
            }
            let mut seen = std::collections::HashSet::new();
            batch.retain(|note| seen.insert(note.clone()));
            for note in &batch {
                if let Err(e) = follow(note, &fleet, &autoscaler).await {
                    tracing::warn!(error = %e, "cannot read another instance's change; reading everything again in {RESYNC:?}");
                }
            }
        }
    });
}

async fn follow(note: &Note, fleet: &Fleet, autoscaler: &Autoscaler) -> anyhow::Result<()> {
    match note {
        Note::Resync => {
            fleet.resync().await?;
            autoscaler.refresh_states(None).await?;
            autoscaler.reload_pauses().await?;
        }
        Note::Changed {
            kind,
            namespace,
            name,
        } => {
            let id = FunctionId::new(name.clone(), namespace.clone());
            match kind {
                Change::Function => fleet.refresh(&id).await?,
                Change::State => autoscaler.refresh_states(Some(&id)).await?,
                Change::Pause => autoscaler.reload_pauses().await?,
                Change::Namespace => fleet.reload_namespaces().await?,
                // Read from the store whenever a function is deployed.
                Change::Secret => {}
            }
        }
    }
    Ok(())
}

/// How often each instance publishes its invocation counters and reads the others'.
pub const COUNTERS: Duration = Duration::from_secs(1);

/// On a shared store, every instance publishes its invocation counters and reads the others',
/// so that what the leader's loops read (the internal rate source, the staleness guard, idle
/// time for scale to zero) covers the traffic of every instance, not only its own.
pub fn spawn_counters(
    store: &Store,
    instance: String,
    metrics: Arc<crate::telemetry::Metrics>,
    activity: Arc<crate::proxy::Activity>,
) {
    if !store.shared() {
        return;
    }
    let store = store.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(COUNTERS);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shared = Shared {
            started_ms: chrono::Utc::now().timestamp_millis(),
            ..Shared::default()
        };
        loop {
            tick.tick().await;
            let rows = shared.changed(&metrics, &activity);
            let published = store.publish_invocations(&instance, rows.clone()).await;
            match published {
                Ok(()) => shared.published(rows),
                Err(e) => tracing::debug!(error = %e, "cannot publish invocation counters"),
            }
            match store.others_invocations(&instance).await {
                Ok(others) => {
                    let (counts, last) = shared.add_others(others);
                    metrics.set_others(counts);
                    activity.set_others(last);
                }
                Err(e) => tracing::debug!(error = %e, "cannot read the other instances' counters"),
            }
        }
    });
}

type CounterKey = (String, String);

/// How far apart two instances' clocks may be when one's start is compared with the other's
/// first reading.
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// What one instance knows of the shared counters.
#[derive(Default)]
struct Shared {
    /// What this instance last published, per (function, datacenter): (total, last).
    mine: std::collections::HashMap<CounterKey, (u64, i64)>,
    /// The last total read of each other instance's counter.
    seen: std::collections::HashMap<(String, String, String), u64>,
    /// The other instances' invocations counted since this instance first read them: it only
    /// grows (a counter that disappears stops adding), so rates read from it stay true.
    others: std::collections::HashMap<CounterKey, u64>,
    /// When this instance started (Unix milliseconds), published with its counters.
    started_ms: i64,
    /// When the others' counters were first read (Unix milliseconds): what an instance that
    /// started before then had counted by its first reading is history, not new traffic.
    first_read_ms: Option<i64>,
    /// The instances whose counters that first reading found.
    first_instances: std::collections::HashSet<String>,
}

impl Shared {
    /// This instance's counters that changed since they were last published.
    fn changed(
        &self,
        metrics: &crate::telemetry::Metrics,
        activity: &crate::proxy::Activity,
    ) -> Vec<crate::store::InvocationRow> {
        let last: std::collections::HashMap<String, i64> = activity
            .own()
            .into_iter()
            .map(|(id, ms)| (id.qualified(), ms))
            .collect();
        metrics
            .own_invocation_counts()
            .into_iter()
            .filter_map(|((function, datacenter), total)| {
                let last_ms = last.get(&function).copied().unwrap_or(0);
                let key = (function, datacenter);
                if self.mine.get(&key) == Some(&(total, last_ms)) {
                    return None;
                }
                Some(crate::store::InvocationRow {
                    function: key.0,
                    datacenter: key.1,
                    total,
                    last_ms,
                    started_ms: self.started_ms,
                })
            })
            .collect()
    }

    fn published(&mut self, rows: Vec<crate::store::InvocationRow>) {
        for row in rows {
            self.mine
                .insert((row.function, row.datacenter), (row.total, row.last_ms));
        }
    }

    /// Adds what the other instances counted since the last read; their counters as this
    /// instance keeps them, and when each function was last invoked through any of them.
    fn add_others(
        &mut self,
        rows: Vec<(String, crate::store::InvocationRow)>,
    ) -> (
        std::collections::HashMap<CounterKey, u64>,
        crate::model::FunctionMap<i64>,
    ) {
        let mut last = crate::model::FunctionMap::default();
        let first = self.first_read_ms.is_none();
        let first_read = *self
            .first_read_ms
            .get_or_insert_with(|| chrono::Utc::now().timestamp_millis());
        if first {
            self.first_instances = rows.iter().map(|(i, _)| i.clone()).collect();
        }
        for (instance, row) in rows {
            if let Some((name, namespace)) = row.function.split_once('.') {
                let id = FunctionId::new(name.to_string(), namespace.to_string());
                let at = last.entry(id).or_insert(0);
                *at = (*at).max(row.last_ms);
            }
            // A counter seen for the first time counts from zero when it is new traffic: a
            // counter an instance known from the first reading starts later, or one of an
            // instance that started after it (five minutes allowed for clocks apart). Else
            // (a counter from before this instance read them) from where it is.
            let fresh = if first {
                false
            } else if self.first_instances.contains(&instance) {
                true
            } else {
                row.started_ms > first_read - CLOCK_SKEW_MS
            };
            let seen = self
                .seen
                .entry((instance, row.function.clone(), row.datacenter.clone()))
                .or_insert(if fresh { 0 } else { row.total });
            let grew = row.total.saturating_sub(*seen);
            *seen = row.total;
            *self
                .others
                .entry((row.function, row.datacenter))
                .or_default() += grew;
        }
        (self.others.clone(), last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InvocationRow;

    /// A counter of `function` in `lon` by `instance`, which started at `started_ms`.
    fn row(
        instance: &str,
        function: &str,
        total: u64,
        last_ms: i64,
        started_ms: i64,
    ) -> (String, InvocationRow) {
        let row = InvocationRow {
            function: function.to_string(),
            datacenter: "lon".to_string(),
            total,
            last_ms,
            started_ms,
        };
        (instance.to_string(), row)
    }

    #[test]
    fn others_counters_only_grow_from_what_was_there_at_start() {
        let mut shared = Shared::default();
        let later = chrono::Utc::now().timestamp_millis() + 10_000;
        let key = ("api.openfaas-fn".to_string(), "lon".to_string());
        // Totals from before this instance's first reading are history, not a burst.
        let (counts, last) = shared.add_others(vec![row("b", "api.openfaas-fn", 5000, 7, 500)]);
        assert_eq!(counts[&key], 0);
        assert_eq!(last[&FunctionId::new("api", "openfaas-fn")], 7);
        let (counts, _) = shared.add_others(vec![
            row("b", "api.openfaas-fn", 5030, 8, 500),
            // An instance that started since: all of its count is new.
            row("c", "api.openfaas-fn", 12, 9, later),
        ]);
        assert_eq!(counts[&key], 42);
        // An instance gone (its row no longer read): the count stays where it was.
        let (counts, last) = shared.add_others(vec![row("c", "api.openfaas-fn", 20, 10, later)]);
        assert_eq!(counts[&key], 50);
        assert_eq!(last[&FunctionId::new("api", "openfaas-fn")], 10);
        // A counter of an instance not seen at the first reading that started long before
        // it: history, counted from where it is.
        let (counts, _) =
            shared.add_others(vec![row("d", "other.openfaas-fn", 1_000_000, 11, -400_000)]);
        let other = ("other.openfaas-fn".to_string(), "lon".to_string());
        assert_eq!(counts[&other], 0);
        // A new counter of an instance known from the first reading: new traffic.
        let (counts, _) = shared.add_others(vec![row("b", "new.openfaas-fn", 3, 12, 500)]);
        assert_eq!(
            counts[&("new.openfaas-fn".to_string(), "lon".to_string())],
            3
        );
    }
}
