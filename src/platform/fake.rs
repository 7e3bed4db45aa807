//! An in-memory platform that runs nothing: what the control plane asked of it is kept in its
//! table, replicas count as ready as soon as they are asked for (unless told otherwise), and
//! failures and slow calls can be switched on. For tests and benchmarks of the control plane,
//! and the reference the adapter compliance suite holds the real adapters to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Endpoint, Platform, PlatformError, ReadyTable, Workload};
use crate::model::{FunctionDeployment, FunctionId};

#[derive(Default)]
pub struct FakePlatform {
    table: ReadyTable,
    workloads: Mutex<HashMap<FunctionId, Workload>>,
    /// While set, every change and the healthcheck fail as an unreachable datacenter does.
    pub down: AtomicBool,
    /// While set, replicas never become ready (a platform that cannot start them).
    pub never_ready: AtomicBool,
    /// While set, a scale call says it has started (`started`) and waits for `release`.
    pub hold: AtomicBool,
    pub started: Notify,
    pub release: Notify,
    /// Changes asked for so far (apply, scale, remove).
    pub calls: AtomicU64,
}

impl FakePlatform {
    pub fn new() -> Arc<FakePlatform> {
        Arc::new(FakePlatform::default())
    }

    /// The deployment last applied for `id`.
    pub fn workload(&self, id: &FunctionId) -> Option<Workload> {
        let workloads = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        workloads.get(id).cloned()
    }

    fn check(&self) -> Result<(), PlatformError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::SeqCst) {
            return Err(PlatformError::Failed("datacenter unreachable".into()));
        }
        Ok(())
    }

    /// `replicas` ready at once (addresses that answer nothing: the fake runs no server).
    fn publish(&self, id: &FunctionId, replicas: u64) {
        let row = self.table.row(id);
        row.set_desired(replicas);
        if self.never_ready.load(Ordering::SeqCst) {
            return;
        }
        let ready = (0..replicas.min(u16::MAX as u64))
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 1 + i as u16));
                Arc::new(Endpoint::new(format!("{}-{i}", id.name), addr))
            })
            .collect();
        row.set_ready(ready);
    }
}

#[async_trait]
impl Platform for FakePlatform {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn validate(&self, _: &FunctionDeployment) -> Result<(), String> {
        Ok(())
    }

    async fn apply(&self, workload: Workload, replicas: u64) -> Result<(), PlatformError> {
        self.check()?;
        let id = workload.id.clone();
        self.workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), workload);
        self.publish(&id, replicas);
        Ok(())
    }

    async fn scale(&self, id: &FunctionId, replicas: u64) -> Result<(), PlatformError> {
        if self.hold.load(Ordering::SeqCst) {
            self.started.notify_one();
            self.release.notified().await;
        }
        self.check()?;
        if self.workload(id).is_none() {
            return Err(PlatformError::Failed(format!(
                "function {id} is not deployed"
            )));
        }
        self.publish(id, replicas);
        Ok(())
    }

    async fn remove(&self, id: &FunctionId) -> Result<(), PlatformError> {
        self.check()?;
        self.workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.table.remove(id);
        Ok(())
    }

    async fn healthcheck(&self) -> Result<(), PlatformError> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(PlatformError::Failed("datacenter unreachable".into())),
            false => Ok(()),
        }
    }

    fn table(&self) -> &ReadyTable {
        &self.table
    }

    async fn shutdown(&self) {
        self.workloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.table.clear();
    }
}
