//! Keeps this instance's memory of the desired state in step with a store other instances
//! write too: one function read again when a change to it is announced, everything read again
//! after a gap in the announcements and every few seconds as a safety net. Nothing here calls
//! a platform: the instance that made a change carried it out, and the leader's reconciler
//! converges what is left.

use std::collections::{BTreeMap, HashSet};

use super::{Fleet, FleetError};
use crate::model::{Function, FunctionId};

/// The store lock of one function: every change of it (deploy, update, removal, each
/// decision) holds it, whichever instance makes it.
pub fn lock_key(id: &FunctionId) -> String {
    format!("function {}", id.qualified())
}

impl Fleet {
    /// On a shared store: holds `id` against every instance and reads it as stored now, so a
    /// change starts from the latest record and no other instance's change interleaves.
    /// Nothing on a store of one's own.
    pub async fn hold_shared(
        &self,
        id: &FunctionId,
    ) -> Result<Option<crate::store::Guard>, FleetError> {
        if !self.store.shared() {
            return Ok(None);
        }
        let held = self.store.lock(&lock_key(id)).await?;
        // Held, no change of it can be under way anywhere: the stored record is the latest.
        let stored = self.store.load_function(id, &self.home).await?;
        let _taking = self.taking.lock().unwrap_or_else(|p| p.into_inner());
        self.take(id, stored);
        Ok(held)
    }

    /// Reads one function again from the store (another instance announced a change of it):
    /// added, replaced or forgotten to match it, unless this instance changed it while it was
    /// read (the read may be from before that change; it is read again).
    pub async fn refresh(&self, id: &FunctionId) -> Result<(), FleetError> {
        for _ in 0..5 {
            let before = self.generation(id);
            let stored = self.store.load_function(id, &self.home).await?;
            let _guard = self.write.lock().await;
            let _taking = self.taking.lock().unwrap_or_else(|p| p.into_inner());
            if self.generation(id) == before {
                self.take(id, stored);
                return Ok(());
            }
        }
        // Changed here all the while: the next announcement or resync reads it.
        Ok(())
    }

    /// Reads every function and namespace again from the store; a function this instance
    /// changed while they were read is left to its own announcement.
    pub async fn resync(&self) -> Result<(), FleetError> {
        let before = self
            .generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stored = self.store.load_functions(&self.home).await?;
        let _guard = self.write.lock().await;
        let taking = self.taking.lock().unwrap_or_else(|p| p.into_inner());
        let unchanged =
            |id: &FunctionId| before.get(id).copied().unwrap_or(0) == self.generation(id);
        let present: HashSet<FunctionId> = stored.iter().map(|f| f.id.clone()).collect();
        let gone: Vec<FunctionId> = self
            .read_functions()
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for id in gone.into_iter().filter(|id| unchanged(id)) {
            self.take(&id, None);
        }
        for function in stored {
            let id = function.id.clone();
            if unchanged(&id) {
                self.take(&id, Some(function));
            }
        }
        drop(taking);
        drop(_guard);
        self.reload_namespaces().await
    }

    /// Reads the namespaces again from the store.
    pub async fn reload_namespaces(&self) -> Result<(), FleetError> {
        let stored: BTreeMap<String, crate::model::Namespace> = self
            .store
            .load_namespaces()
            .await?
            .into_iter()
            .map(|ns| (ns.name.clone(), ns))
            .collect();
        *self.namespaces_write() = stored;
        Ok(())
    }

    /// Makes the in-memory record of `id` the stored one; an unchanged record is kept as it
    /// is (its views and gauges stay).
    fn take(&self, id: &FunctionId, stored: Option<Function>) {
        match stored {
            None => {
                if self.drop_function(id) {
                    tracing::debug!(function = %id, "removed by another instance");
                }
            }
            Some(f) => {
                let mine = self.read_functions().get(id).map(|p| p.function.clone());
                let same_spec = mine
                    .as_ref()
                    .is_some_and(|m| m.created_at == f.created_at && m.deployment == f.deployment);
                if same_spec && mine.as_ref().is_some_and(|m| m.replicas == f.replicas) {
                    return;
                }
                if !same_spec {
                    // A spec another instance stored and applied (its failures it reported;
                    // the counts the leader's reconciler converges): not applied again here.
                    // A change of counts alone leaves what is known applied as it is.
                    let hash = super::spec_hash(&f.deployment);
                    for dc in f.replicas.keys() {
                        self.applied_set(id, dc, Some(hash));
                    }
                }
                self.put_function(f);
            }
        }
    }
}
