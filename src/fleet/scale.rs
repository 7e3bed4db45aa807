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

    pub(super) async fn scale_checked(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
        expected: Option<u64>,
        replicas: u64,
        decision: Option<&Decision>,
        on_failure: OnFailure,
    ) -> Result<Scaled, FleetError> {
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
        let changed: Vec<(String, u64)> = target
            .iter()
            .filter(|(dc, n)| current.get(*dc) != Some(*n))
            .map(|(dc, n)| (dc.clone(), *n))
            .collect();
        if changed.is_empty() {
            return Ok(Scaled::Unchanged);
        }
        let event_id = self.store.set_desired_with(id, &target, decision).await?;
        let dcs: Vec<String> = changed.iter().map(|(dc, _)| dc.clone()).collect();
        let result = self
            .each(&dcs, |d| {
                let n = target[&d.name];
                d.platform.scale(id, n)
            })
            .await;
        if result.all_failed() {
            if on_failure == OnFailure::Keep {
                let why = result.into_result("scale").err().map(|e| e.to_string());
                self.set_replicas(id, target);
                let why = format!(
                    "{}; the new count is kept and the reconciler retries it",
                    why.unwrap_or_default()
                );
                return Ok(Scaled::Kept {
                    event: event_id,
                    why,
                });
            }
            let undo = decision.zip(event_id);
            self.store.revert_desired(id, &current, undo).await?;
            return result
                .into_result("scale")
                .map(|_| Scaled::Applied { event: None });
        }
        // Datacenters that failed keep the new desired count: the reconciler converges them.
        self.set_replicas(id, target);
        result
            .into_result("scale")
            .map(|_| Scaled::Applied { event: event_id })
    }
}
