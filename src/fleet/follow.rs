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
        self.refresh(id).await?;
        Ok(held)
    }

    /// Reads one function again from the store: added, replaced or forgotten to match it.
    pub async fn refresh(&self, id: &FunctionId) -> Result<(), FleetError> {
        // Not in the middle of this instance's own change of it (read before its write,
        // applied after it, the read would undo it here).
        let _guard = self.write.lock().await;
        let stored = self.store.load_function(id, &self.home).await?;
        self.take(id, stored);
        Ok(())
    }

    /// Reads every function and namespace again from the store.
    pub async fn resync(&self) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        let stored = self.store.load_functions(&self.home).await?;
        let present: HashSet<FunctionId> = stored.iter().map(|f| f.id.clone()).collect();
        let gone: Vec<FunctionId> = self
            .read_functions()
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.take(&id, None);
        }
        for function in stored {
            let id = function.id.clone();
            self.take(&id, Some(function));
        }
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
                if self.write_functions().remove(id).is_some() {
                    tracing::debug!(function = %id, "removed by another instance");
                }
            }
            Some(f) => {
                let same = self.read_functions().get(id).is_some_and(|placed| {
                    let mine = &placed.function;
                    mine.created_at == f.created_at
                        && mine.replicas == f.replicas
                        && mine.deployment == f.deployment
                });
                if !same {
                    // The instance that stored it applied it (its failures it reported; the
                    // counts the leader's reconciler converges): not applied again here.
                    let hash = super::spec_hash(&f.deployment);
                    for dc in f.replicas.keys() {
                        self.applied_set(id, dc, Some(hash));
                    }
                    self.put_function(f);
                }
            }
        }
    }
}
