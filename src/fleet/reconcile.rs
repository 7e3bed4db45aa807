//! The reconciler: each datacenter converges to the desired state.

use super::*;

impl Fleet {
    /// One pass of the reconciler: every datacenter converges to the desired state. Functions
    /// a datacenter missed (it was down) are applied, wrong counts scaled, leftovers removed.
    /// A datacenter that does not answer is skipped until the next pass.
    pub async fn reconcile(&self) {
        futures::future::join_all(self.datacenters.iter().map(|d| self.reconcile_in(d))).await;
    }

    pub(super) async fn reconcile_in(&self, d: &Arc<Datacenter>) {
        if let Err(e) = d.healthcheck().await {
            tracing::debug!(datacenter = %d.name, error = %e, "reconciler: datacenter unhealthy");
            return;
        }
        let actual = match d.call(d.platform.list()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::debug!(datacenter = %d.name, error = %e, "reconciler: datacenter unavailable");
                return;
            }
        };
        let actual: HashMap<FunctionId, u64> = actual.into_iter().collect();
        let desired: Vec<Arc<Function>> = self
            .read_functions()
            .values()
            .filter(|f| f.replicas.contains_key(&d.name))
            .map(|f| f.function.clone())
            .collect();
        for f in &desired {
            // A change of this count under way converges it itself.
            let Some(_count) = self.try_hold_count(&f.id, &d.name) else {
                continue;
            };
            // Decided under the write lock (the function may have changed or gone meanwhile),
            // carried out without it: the count lock keeps other changes of this count out,
            // and a slow datacenter holds up no other change.
            let (f, want, reapply) = {
                let _guard = self.write.lock().await;
                let Some(f) = self.function(&f.id) else {
                    continue;
                };
                let Some(want) = f.desired_in(&d.name) else {
                    continue;
                };
                let applied = self
                    .applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&(f.id.clone(), d.name.clone()))
                    .copied();
                let reapply =
                    !actual.contains_key(&f.id) || applied != Some(spec_hash(&f.deployment));
                if !reapply && actual.get(&f.id) == Some(&want) {
                    continue;
                }
                (f, want, reapply)
            };
            let result = if reapply {
                match self.workload(&f.id, &f.deployment).await {
                    Ok(w) => {
                        let r = self.apply_in(&w, &[(d.name.clone(), want)]).await;
                        r.into_result("apply")
                    }
                    Err(e) => Err(e),
                }
            } else {
                d.call(d.platform.scale(&f.id, want))
                    .await
                    .map_err(FleetError::from)
            };
            match result {
                Ok(()) => {
                    tracing::info!(function = %f.id, datacenter = %d.name, replicas = want, "reconciled")
                }
                Err(e) => {
                    tracing::warn!(function = %f.id, datacenter = %d.name, error = %e, "reconciler: cannot converge")
                }
            }
        }
        for id in actual.keys() {
            // Held, a deploy of this function waits until the leftover is gone.
            let Some(_count) = self.try_hold_count(id, &d.name) else {
                continue;
            };
            let placed = {
                let _guard = self.write.lock().await;
                self.read_functions()
                    .get(id)
                    .is_some_and(|f| f.replicas.contains_key(&d.name))
            };
            if !placed {
                self.forget_counts(id, Some(&d.name));
                match d.call(d.platform.remove(id)).await {
                    Ok(()) => {
                        tracing::info!(function = %id, datacenter = %d.name, "reconciler removed a leftover function")
                    }
                    Err(e) => {
                        tracing::warn!(function = %id, datacenter = %d.name, error = %e, "reconciler: cannot remove a leftover function")
                    }
                }
            }
        }
    }

    /// Runs the reconciler every `interval` until the process ends.
    pub fn spawn_reconciler(self: &Arc<Self>, interval: Duration) {
        let fleet = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            let mut leading = fleet.leader.watch();
            loop {
                // Only the leader converges; one that has just become it does at once.
                tokio::select! {
                    _ = tick.tick() => {}
                    Ok(()) = leading.changed() => {}
                }
                if fleet.leader.is_leader() {
                    fleet.reconcile().await;
                }
            }
        });
    }
}
