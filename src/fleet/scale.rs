//! Replica counts: the engine's decisions (and the tests') set them here, checked against the
//! server's limit and each platform's.

use super::*;

/// What a replica change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scaled {
    /// The count was already what was asked: nothing stored, nothing called.
    Unchanged,
    /// The new count is stored, with the decision's event (`event`, its id) if one came.
    Applied { event: Option<i64> },
    /// `OnFailure::Keep`: the platform call failed (`why`) and the new count is kept for the
    /// reconciler, with the decision's event.
    Kept { event: Option<i64>, why: String },
}

impl Fleet {
    /// Sets the desired replica count (0 allowed: scale to zero): in one datacenter, or,
    /// without one, as a total spread over the function's datacenters (home first). Outside
    /// tests every replica change is an engine decision ([`Fleet::scale_from`]).
    #[cfg(test)]
    pub async fn scale(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        replicas: u64,
    ) -> Result<(), FleetError> {
        self.scale_checked(id, datacenter, None, replicas, None, OnFailure::Undo)
            .await
            .map(|_| ())
    }

    /// Scales one datacenter only if its desired count is still `expected` (the count a
    /// decision was made from): a manual scale in between is never overwritten. A mismatch is
    /// a `Conflict`.
    ///
    /// `decision` is stored with the new desired count, before any platform call, and undone
    /// with it when every platform call fails.
    ///
    /// `OnFailure::Keep` (an operator's count) keeps the new desired count even when the
    /// datacenter's platform call fails, for the reconciler to converge: [`Scaled::Kept`]
    /// says so.
    pub async fn scale_from(
        &self,
        id: &FunctionId,
        datacenter: &str,
        expected: u64,
        replicas: u64,
        decision: Option<&Decision>,
        on_failure: OnFailure,
    ) -> Result<Scaled, FleetError> {
        self.scale_checked(
            id,
            Some(datacenter),
            Some(expected),
            replicas,
            decision,
            on_failure,
        )
        .await
    }

    /// How a manual scale to `total` replicas would spread over the function's datacenters
    /// (only `datacenter`, when given), checked against the server's limit and each
    /// platform's: a count that cannot run is refused before anything changes.
    pub fn shares_of(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        total: u64,
    ) -> Result<BTreeMap<String, u64>, FleetError> {
        let (shares, deployment) = {
            let functions = self.read_functions();
            let placed = functions.get(id).ok_or_else(|| not_found(id))?;
            let f = &placed.function;
            let shares = match datacenter {
                Some(dc) if f.replicas.contains_key(dc) => [(dc.to_string(), total)].into(),
                Some(dc) => {
                    return Err(FleetError::NotFound(format!(
                        "function {id} is not in datacenter {dc}"
                    )))
                }
                None => self.spread(total, &f.replicas),
            };
            (shares, f.deployment.clone())
        };
        self.check_counts(&deployment, &shares)?;
        Ok(shares)
    }

    /// Refuses counts above the server's limit or that a datacenter's platform cannot run.
    pub(super) fn check_counts(
        &self,
        deployment: &FunctionDeployment,
        target: &BTreeMap<String, u64>,
    ) -> Result<(), FleetError> {
        let mut errors = Vec::new();
        for (dc, n) in target {
            if *n > self.max_replicas {
                errors.push(format!(
                    "replicas: {n} in {dc} is above this server's limit of {} per datacenter (limits.max_replicas)",
                    self.max_replicas
                ));
            } else if let Some(d) = self.datacenter(dc) {
                if let Err(e) = d.platform.validate_scale(deployment, *n) {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(FleetError::Invalid(errors))
        }
    }

    /// `total` spread over `dcs` in preference order: equal shares, the remainder to the first.
    pub(super) fn spread(&self, total: u64, dcs: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let order: Vec<&String> = self
            .preference()
            .map(|d| &d.name)
            .filter(|n| dcs.contains_key(*n))
            .chain(dcs.keys().filter(|n| self.datacenter(n).is_none()))
            .collect();
        let k = order.len().max(1) as u64;
        order
            .into_iter()
            .enumerate()
            .map(|(i, dc)| (dc.clone(), total / k + u64::from((i as u64) < total % k)))
            .collect()
    }

    /// The lock of one function's count in one datacenter.
    fn count_lock(&self, id: &FunctionId, datacenter: &str) -> CountLock {
        let mut locks = self.count_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks
            .entry((id.clone(), datacenter.to_string()))
            .or_default()
            .clone()
    }

    /// Whether `lock` is still the count's lock (a removed function's locks are forgotten: a
    /// holder of the old one must take the new one).
    fn is_count_lock(&self, id: &FunctionId, datacenter: &str, lock: &CountLock) -> bool {
        let locks = self.count_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks
            .get(&(id.clone(), datacenter.to_string()))
            .is_some_and(|current| Arc::ptr_eq(current, lock))
    }

    /// Holds a function's counts in `datacenters` (every configured one when `None`), in one
    /// order, so that two holders never wait for each other. Taken before `write`.
    pub(super) async fn hold_counts(
        &self,
        id: &FunctionId,
        datacenters: Option<&[String]>,
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut names: Vec<&str> = match datacenters {
            Some(dcs) => dcs.iter().map(String::as_str).collect(),
            None => self.datacenters.iter().map(|d| d.name.as_str()).collect(),
        };
        names.sort_unstable();
        names.dedup();
        let mut held = Vec::with_capacity(names.len());
        for dc in names {
            loop {
                let lock = self.count_lock(id, dc);
                let guard = lock.clone().lock_owned().await;
                if self.is_count_lock(id, dc, &lock) {
                    held.push(guard);
                    break;
                }
            }
        }
        held
    }

    /// The count of `id` in `datacenter` when no change of it is under way (the reconciler
    /// leaves one that is to the change).
    pub(super) fn try_hold_count(
        &self,
        id: &FunctionId,
        datacenter: &str,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let lock = self.count_lock(id, datacenter);
        let guard = lock.clone().try_lock_owned().ok()?;
        self.is_count_lock(id, datacenter, &lock).then_some(guard)
    }

    /// Forgets the count locks of a function removed (from `datacenter` only, when given).
    pub(super) fn forget_counts(&self, id: &FunctionId, datacenter: Option<&str>) {
        let mut locks = self.count_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|(f, dc), _| f != id || datacenter.is_some_and(|only| only != dc));
    }

    /// The change itself. The new counts are stored, and take effect in the fleet, before the
    /// platform calls, which run without the fleet's write lock (only the changed
    /// datacenters' count locks are held across them); when every call fails they are put
    /// back, on top of whatever else changed meanwhile.
    pub(super) async fn scale_checked(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        expected: Option<u64>,
        replicas: u64,
        decision: Option<&Decision>,
        on_failure: OnFailure,
    ) -> Result<Scaled, FleetError> {
        let locked: Option<Vec<String>> = datacenter.map(|dc| vec![dc.to_string()]);
        let _counts = self.hold_counts(id, locked.as_deref()).await;
        let (current, target, changed, event_id) = {
            let _guard = self.write.lock().await;
            let Some((current, deployment)) = self
                .read_functions()
                .get(id)
                .map(|f| (f.replicas.clone(), f.deployment.clone()))
            else {
                return Err(not_found(id));
            };
            let target = match datacenter {
                Some(dc) => {
                    let Some(now) = current.get(dc) else {
                        return Err(FleetError::NotFound(format!(
                            "function {id} is not in datacenter {dc}"
                        )));
                    };
                    if let Some(expected) = expected.filter(|e| e != now) {
                        return Err(FleetError::Conflict(format!(
                            "replicas changed from {expected} to {now} meanwhile"
                        )));
                    }
                    let mut t = current.clone();
                    t.insert(dc.to_string(), replicas);
                    t
                }
                None => self.spread(replicas, &current),
            };
            self.check_counts(&deployment, &target)?;
            let changed: Vec<String> = target
                .iter()
                .filter(|(dc, n)| current.get(*dc) != Some(*n))
                .map(|(dc, _)| dc.clone())
                .collect();
            if changed.is_empty() {
                return Ok(Scaled::Unchanged);
            }
            let event_id = self.store.set_desired_with(id, &target, decision).await?;
            self.set_replicas(id, target.clone());
            (current, target, changed, event_id)
        };
        let result = self
            .each(&changed, |d| {
                let n = target[&d.name];
                d.platform.scale(id, n)
            })
            .await;
        if !result.all_failed() {
            // Datacenters that failed keep the new desired count: the reconciler converges them.
            return result
                .into_result("scale")
                .map(|_| Scaled::Applied { event: event_id });
        }
        if on_failure == OnFailure::Keep {
            let why = result.into_result("scale").err().map(|e| e.to_string());
            let why = format!(
                "{}; the new count is kept and the reconciler retries it",
                why.unwrap_or_default()
            );
            return Ok(Scaled::Kept {
                event: event_id,
                why,
            });
        }
        let _guard = self.write.lock().await;
        // Put back the changed datacenters' counts only: another datacenter's may have
        // changed meanwhile. A function removed meanwhile has nothing to put back.
        let now = self.read_functions().get(id).map(|f| f.replicas.clone());
        if let Some(mut back) = now {
            for dc in &changed {
                if let (Some(n), Some(old)) = (back.get_mut(dc), current.get(dc)) {
                    *n = *old;
                }
            }
            let undo = decision.zip(event_id);
            self.store.revert_desired(id, &back, undo).await?;
            self.set_replicas(id, back);
        }
        result
            .into_result("scale")
            .map(|_| Scaled::Applied { event: None })
    }
}
