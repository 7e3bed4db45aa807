//! The ready-replica table: what every adapter knows of its functions' replicas, in one shape.
//! An adapter publishes into it (the desired count, the ready endpoints, a stalled update);
//! the control plane and the invoke path read counts, endpoints, readiness and a ready gauge
//! from it, the same way whatever the platform.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, RwLock};

use tokio::sync::watch;

use super::{Condition, Endpoint, EndpointSet, ReadyGauge, ReplicaCounts, Rollout};
use crate::model::{FunctionId, FunctionMap};

/// The endpoints of a function with none ready, shared by every such row.
static NO_ENDPOINTS: LazyLock<Arc<EndpointSet>> = LazyLock::new(Default::default);

/// One function's row. Kept small: a server holds one per function and datacenter (30,000
/// at 10,000 functions in three), so the readiness channel is made only when someone waits.
pub struct Row {
    desired: AtomicU64,
    /// The serving endpoints' count, readable without a lock (the function list reads it for
    /// every function in every datacenter).
    ready: AtomicU64,
    /// Set once the function is removed: gauges held elsewhere read `None` from then on.
    gone: AtomicBool,
    /// Set once the adapter published a desired count: a row made only for a waiter is not
    /// a function the platform runs.
    published: AtomicBool,
    endpoints: RwLock<Arc<EndpointSet>>,
    /// Made by the first [`ReadyTable::watch_ready`], under the endpoints' lock, which every
    /// publication holds while it sends: a waiter misses no change.
    ready_tx: OnceLock<watch::Sender<u64>>,
    rollout: Mutex<Option<Box<Rollout>>>,
    /// Why a replica does not serve (its last exit, say), until it serves again.
    reason: Mutex<Option<Box<str>>>,
}

impl Row {
    fn new() -> Row {
        Row {
            desired: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            published: AtomicBool::new(false),
            endpoints: RwLock::new(NO_ENDPOINTS.clone()),
            ready_tx: OnceLock::new(),
            rollout: Mutex::new(None),
            reason: Mutex::new(None),
        }
    }

    fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the serving endpoints (a new snapshot: a replica left out is never picked
    /// again) and tells whoever waits for readiness.
    pub fn set_ready(&self, endpoints: Vec<Arc<Endpoint>>) {
        let n = endpoints.len() as u64;
        let set = match n {
            0 => NO_ENDPOINTS.clone(),
            _ => Arc::new(EndpointSet::new(endpoints)),
        };
        self.set_endpoints(set, n);
    }

    /// [`Row::set_ready`] for a platform whose endpoints stand for more replicas than one
    /// each (a remote datacenter's agent stands for all of its replicas).
    pub fn set_endpoints(&self, endpoints: Arc<EndpointSet>, ready: u64) {
        let mut current = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        *current = endpoints;
        self.ready.store(ready, Ordering::Release);
        if let Some(tx) = self.ready_tx.get() {
            tx.send_replace(ready);
        }
    }

    fn watch(&self) -> watch::Receiver<u64> {
        let _publishing = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        self.ready_tx
            .get_or_init(|| watch::channel(self.ready.load(Ordering::Acquire)).0)
            .subscribe()
    }

    pub fn counts(&self) -> ReplicaCounts {
        ReplicaCounts {
            desired: self.desired.load(Ordering::Acquire),
            ready: self.ready.load(Ordering::Acquire),
        }
    }

    pub fn set_desired(&self, desired: u64) {
        self.desired.store(desired, Ordering::Release);
        self.published.store(true, Ordering::Release);
    }

    /// Whether a request is waiting for this function's readiness.
    pub fn awaited(&self) -> bool {
        self.ready_tx
            .get()
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// An update waiting for its new version's first ready replica; `None` once it serves.
    pub fn set_rollout(&self, rollout: Option<Rollout>) {
        *self.rollout.lock().unwrap_or_else(|p| p.into_inner()) = rollout.map(Box::new);
    }

    /// Why a replica of the function does not serve; `None` once they all do.
    pub fn set_reason(&self, reason: Option<&str>) {
        let mut current = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_deref() != reason {
            *current = reason.map(Box::from);
        }
    }

    fn close(&self) {
        self.gone.store(true, Ordering::Release);
        self.set_ready(Vec::new());
        self.set_desired(0);
        self.set_rollout(None);
        self.set_reason(None);
    }
}

impl ReadyGauge for Row {
    fn ready(&self) -> Option<u64> {
        let ready = self.ready.load(Ordering::Acquire);
        (!self.gone.load(Ordering::Acquire)).then_some(ready)
    }
}

/// Every function's row on one platform.
#[derive(Default)]
pub struct ReadyTable {
    rows: RwLock<FunctionMap<Arc<Row>>>,
}

impl ReadyTable {
    fn get(&self, id: &FunctionId) -> Option<Arc<Row>> {
        self.rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The function's row, made (empty) if it has none: an adapter publishes through it.
    pub fn row(&self, id: &FunctionId) -> Arc<Row> {
        if let Some(row) = self.get(id) {
            return row;
        }
        self.rows
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Row::new()))
            .clone()
    }

    /// Forgets a function: its endpoints are gone at once, waiters see 0 ready, gauges read
    /// `None`.
    pub fn remove(&self, id: &FunctionId) {
        let row = self
            .rows
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(row) = row {
            row.close();
        }
    }

    /// Forgets every function (an adapter's shutdown).
    pub fn clear(&self) {
        let rows: Vec<Arc<Row>> = self
            .rows
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, row)| row)
            .collect();
        for row in rows {
            row.close();
        }
    }

    /// Forgets every function `keep` refuses.
    pub fn retain(&self, keep: impl Fn(&FunctionId, &Row) -> bool) {
        let mut gone = Vec::new();
        self.rows
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, row| {
                let kept = keep(id, row);
                if !kept {
                    gone.push(row.clone());
                }
                kept
            });
        for row in gone {
            row.close();
        }
    }

    /// Desired and ready counts; zeros for a function this platform does not run.
    pub fn replicas(&self, id: &FunctionId) -> ReplicaCounts {
        self.rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|row| row.counts())
            .unwrap_or_default()
    }

    /// The ready replicas requests may go to.
    pub fn endpoints(&self, id: &FunctionId) -> Option<Arc<EndpointSet>> {
        self.rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|row| row.endpoints())
    }

    /// Watches the ready count, to wait for a starting function. A function not published
    /// yet gets its row now, so that a wait can begin before the adapter first hears of it.
    pub fn watch_ready(&self, id: &FunctionId) -> watch::Receiver<u64> {
        self.row(id).watch()
    }

    /// A live reading of the ready count that stays valid while the function is here.
    pub fn ready_gauge(&self, id: &FunctionId) -> Option<Arc<dyn ReadyGauge>> {
        self.get(id).map(|row| row as Arc<dyn ReadyGauge>)
    }

    /// An update of `id` still waiting for its new version's first ready replica, if any.
    pub fn rollout(&self, id: &FunctionId) -> Option<Rollout> {
        let row = self.get(id)?;
        let rollout = row.rollout.lock().unwrap_or_else(|p| p.into_inner());
        rollout.as_deref().cloned()
    }

    /// Why a replica of `id` does not serve, if the platform knows of one.
    pub fn reason(&self, id: &FunctionId) -> Option<String> {
        let row = self.get(id)?;
        let reason = row.reason.lock().unwrap_or_else(|p| p.into_inner());
        reason.as_deref().map(str::to_string)
    }

    /// A stalled update and a failing replica's reason, when there is either.
    pub fn condition(&self, id: &FunctionId) -> Option<Condition> {
        let condition = Condition {
            update: self.rollout(id),
            reason: self.reason(id),
        };
        (condition != Condition::default()).then_some(condition)
    }

    /// Every function the platform published, with its desired count.
    pub fn desired(&self) -> Vec<(FunctionId, u64)> {
        self.rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, row)| row.published.load(Ordering::Acquire))
            .map(|(id, row)| (id.clone(), row.desired.load(Ordering::Acquire)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(i: u16) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            format!("r{i}"),
            std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
        ))
    }

    #[test]
    fn a_row_serves_counts_endpoints_readiness_and_a_gauge_until_removed() {
        let table = ReadyTable::default();
        let id = FunctionId::new("f", "ns");
        assert_eq!(table.replicas(&id), ReplicaCounts::default());
        assert!(table.endpoints(&id).is_none());
        let mut waiting = table.watch_ready(&id);
        let row = table.row(&id);
        row.set_desired(2);
        row.set_ready(vec![endpoint(1), endpoint(2)]);
        assert_eq!(*waiting.borrow_and_update(), 2);
        assert_eq!(
            table.replicas(&id),
            ReplicaCounts {
                desired: 2,
                ready: 2
            }
        );
        assert_eq!(table.endpoints(&id).unwrap().len(), 2);
        let gauge = table.ready_gauge(&id).unwrap();
        assert_eq!(gauge.ready(), Some(2));
        assert_eq!(table.desired(), vec![(id.clone(), 2)]);
        table.remove(&id);
        assert_eq!(*waiting.borrow_and_update(), 0);
        assert_eq!(
            gauge.ready(),
            None,
            "a gauge held elsewhere sees the removal"
        );
        assert!(table.endpoints(&id).is_none());
        assert!(table.desired().is_empty());
    }

    #[test]
    fn a_reason_stays_until_cleared_or_removed() {
        let table = ReadyTable::default();
        let id = FunctionId::new("f", "ns");
        assert_eq!(table.reason(&id), None);
        let row = table.row(&id);
        row.set_reason(Some("replica exited with status 2"));
        assert_eq!(
            table.reason(&id).as_deref(),
            Some("replica exited with status 2")
        );
        row.set_reason(None);
        assert_eq!(table.reason(&id), None);
        row.set_reason(Some("again"));
        table.remove(&id);
        assert_eq!(table.reason(&id), None);
        assert_eq!(
            *row.reason.lock().unwrap(),
            None,
            "a row held elsewhere is cleared"
        );
    }
}
