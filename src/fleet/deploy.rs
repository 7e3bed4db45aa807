//! Deploy, update and remove: placement, checks, and the fan-out to each datacenter.

use super::*;
use crate::events::ScaleEvent;

impl Fleet {
    /// Where a deployment goes: `com.faastastic.datacenters` and `datacenter==NAME` choose,
    /// `datacenter!=NAME` excludes, else the configured default (all, or home). Other
    /// constraints are the platform's business.
    pub(super) fn placement(&self, dep: &FunctionDeployment) -> Result<Vec<String>, Vec<String>> {
        let mut errors = Vec::new();
        let mut chosen: Vec<String> = Vec::new();
        let mut excluded: Vec<String> = Vec::new();
        let known = |name: &str, field: &str, errors: &mut Vec<String>| {
            if self.datacenter(name).is_none() {
                errors.push(format!(
                    "{field}: datacenter {:?} is not one of {}",
                    truncate_for_message(name),
                    self.datacenter_names().join(", ")
                ));
            }
        };
        if let Some(list) = dep.label(LABEL_DATACENTERS) {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                known(name, &format!("labels: {LABEL_DATACENTERS}"), &mut errors);
                chosen.push(name.to_string());
            }
        }
        for c in dep.constraints.iter().flatten() {
            if let Some((equal, name)) = datacenter_constraint(c) {
                known(name, "constraints", &mut errors);
                if equal {
                    chosen.push(name.to_string());
                } else {
                    excluded.push(name.to_string());
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let out: Vec<String> = self
            .datacenters
            .iter()
            .map(|d| d.name.clone())
            .filter(|name| {
                if chosen.is_empty() {
                    self.placement == Placement::All || *name == self.home
                } else {
                    chosen.contains(name)
                }
            })
            .filter(|name| !excluded.contains(name))
            .collect();
        if out.is_empty() {
            return Err(vec![
                "constraints: they leave no datacenter to run the function in".to_string(),
            ]);
        }
        Ok(out)
    }

    /// The function a deployment body names, unchecked (to hold its counts before it is
    /// checked under the write lock; a body that does not check out holds them for nothing).
    fn named(&self, dep: &FunctionDeployment) -> FunctionId {
        let namespace = self
            .resolve_namespace(dep.namespace.as_deref())
            .unwrap_or_else(|_| dep.namespace.clone().unwrap_or_default());
        FunctionId::new(dep.service.clone().unwrap_or_default(), namespace)
    }

    /// Validates a deployment body and returns the function id it names and where it goes.
    pub(super) fn check_deployment(
        &self,
        dep: &FunctionDeployment,
    ) -> Result<(FunctionId, Vec<String>), FleetError> {
        let mut errors = match dep.validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors,
        };
        let placement = match self.placement(dep) {
            Ok(p) => p,
            Err(e) => {
                errors.extend(e);
                Vec::new()
            }
        };
        for dc in &placement {
            if let Some(d) = self.datacenter(dc) {
                if let Err(e) = d.platform.validate(dep) {
                    if !errors.contains(&e) {
                        errors.push(e);
                    }
                }
            }
        }
        // The deployment's own checks may have named a label already.
        for e in crate::autoscale::labels::check_labels(dep) {
            let label = e.split(':').next().unwrap_or_default();
            let named = format!("labels: {label} ");
            if !errors.iter().any(|known| known.starts_with(&named)) {
                errors.push(e);
            }
        }
        errors.extend(crate::triggers::spec::check_annotations(dep));
        for (label, n) in [
            (crate::model::LABEL_SCALE_MIN, dep.min_replicas()),
            (crate::model::LABEL_SCALE_INITIAL, dep.initial_replicas()),
        ] {
            // The initial count is named only when the user set it (else it is min's).
            let set = dep.label(label).is_some();
            if set && n > self.max_replicas {
                errors.push(format!(
                    "labels: {label} {n} is above this server's limit of {} replicas (limits.max_replicas)",
                    self.max_replicas
                ));
            }
        }
        let namespace = match self.resolve_namespace(dep.namespace.as_deref()) {
            Ok(ns) => Some(ns),
            Err(FleetError::Invalid(e)) => {
                errors.extend(e);
                None
            }
            Err(e) => return Err(e),
        };
        if !errors.is_empty() {
            return Err(FleetError::Invalid(errors));
        }
        let name = dep.service.clone().unwrap_or_default();
        let id = FunctionId::new(
            name,
            namespace.expect("namespace resolved when there are no errors"),
        );
        // The count it starts with may come from the configuration (`default_min`, a policy
        // entry's `min`): it must run, as a count from the labels must.
        let initial = crate::autoscale::labels::initial_for(&id, dep, &self.autoscale);
        if initial > self.max_replicas {
            errors.push(format!(
                "the function would start with {initial} replicas (its min), above this server's limit of {} (limits.max_replicas)",
                self.max_replicas
            ));
        }
        for dc in &placement {
            if let Some(d) = self.datacenter(dc) {
                if let Err(e) = d.platform.validate_scale(dep, initial) {
                    if !errors.contains(&e) {
                        errors.push(e);
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(FleetError::Invalid(errors));
        }
        Ok((id, placement))
    }

    /// Reads the secrets a deployment names; a missing one is a 400 naming it.
    pub(super) async fn workload(
        &self,
        id: &FunctionId,
        dep: &FunctionDeployment,
    ) -> Result<Workload, FleetError> {
        let mut secrets = Vec::new();
        let mut missing = Vec::new();
        for name in dep.secrets.iter().flatten() {
            match self.store.get_secret(&id.namespace, name).await? {
                Some(s) => secrets.push((s.name, s.value)),
                None => missing.push(format!(
                    "secrets: unable to find secret {name:?} in namespace {:?}",
                    id.namespace
                )),
            }
        }
        if !missing.is_empty() {
            return Err(FleetError::Invalid(missing));
        }
        Ok(Workload {
            id: id.clone(),
            deployment: dep.clone(),
            secrets,
        })
    }

    /// Applies a workload in several datacenters at once, each with its replica count.
    pub(super) async fn apply_in(&self, workload: &Workload, targets: &[(String, u64)]) -> FanOut {
        let hash = spec_hash(&workload.deployment);
        let results = futures::future::join_all(targets.iter().map(|(dc, n)| async move {
            let result = match self.datacenter(dc) {
                Some(d) => d.call(d.platform.apply(workload.clone(), *n)).await,
                None => Err(PlatformError::Failed("not configured".into())),
            };
            if result.is_ok() {
                self.applied_set(&workload.id, dc, Some(hash));
            }
            (dc.clone(), result)
        }))
        .await;
        FanOut(results)
    }

    /// Runs one call per datacenter at once.
    pub(super) async fn each<'a, F, Fut>(&'a self, dcs: &[String], call: F) -> FanOut
    where
        F: Fn(&'a Arc<Datacenter>) -> Fut,
        Fut: std::future::Future<Output = Result<(), PlatformError>> + 'a,
    {
        let results = futures::future::join_all(dcs.iter().map(|dc| {
            let d = self.datacenter(dc);
            let fut = d.map(|d| d.call(call(d)));
            async move {
                let result = match fut {
                    Some(f) => f.await,
                    None => Err(PlatformError::Failed("not configured".into())),
                };
                (dc.clone(), result)
            }
        }))
        .await;
        FanOut(results)
    }

    pub(super) fn applied_set(&self, id: &FunctionId, dc: &str, hash: Option<u64>) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        match hash {
            Some(h) => applied.insert((id.clone(), dc.to_string()), h),
            None => applied.remove(&(id.clone(), dc.to_string())),
        };
    }

    /// POST /system/functions: a new function in the datacenters it names. Deploying the same
    /// spec again for datacenters it is not in yet adds them (one call per datacenter, as
    /// Terraform does with one provider block each); anything else under an existing name is
    /// a conflict.
    pub async fn deploy(&self, dep: FunctionDeployment) -> Result<FunctionId, FleetError> {
        // Checked under the lock, so a namespace deleted meanwhile cannot be deployed into; the
        // function's counts are held first (a scale under way finishes before).
        let _shared = self.hold_shared(&self.named(&dep)).await?;
        let _counts = self.hold_counts(&self.named(&dep), None).await;
        let _guard = self.write.lock().await;
        let (id, mut placement) = self.check_deployment(&dep)?;
        let workload = self.workload(&id, &dep).await?;
        let initial = crate::autoscale::labels::initial_for(&id, &dep, &self.autoscale);
        let existing = self.function(&id);
        let function = match &existing {
            Some(current) => {
                let placed = || {
                    current
                        .replicas
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let new: Vec<String> = placement
                    .iter()
                    .filter(|dc| !current.replicas.contains_key(*dc))
                    .cloned()
                    .collect();
                if new.is_empty() {
                    return Err(FleetError::Conflict(format!(
                        "function {id} already exists in {}; update it with PUT /system/functions",
                        placed()
                    )));
                }
                if without_placement(&current.deployment) != without_placement(&dep) {
                    return Err(FleetError::Conflict(format!(
                        "function {id} already exists (in {}) with a different spec; update it with PUT /system/functions \
                         (a POST with the same spec and a datacenter constraint adds that datacenter)",
                        placed()
                    )));
                }
                let mut f = Function::clone(current);
                for dc in &new {
                    f.replicas.insert(dc.clone(), initial);
                }
                f.deployment = with_placement(&current.deployment, f.replicas.keys());
                placement = new;
                f
            }
            None => Function {
                id: id.clone(),
                replicas: placement.iter().map(|dc| (dc.clone(), initial)).collect(),
                deployment: dep,
                created_at: Utc::now(),
            },
        };
        self.store.put_function(&function).await?;
        let targets: Vec<(String, u64)> =
            placement.iter().map(|dc| (dc.clone(), initial)).collect();
        let result = self.apply_in(&workload, &targets).await;
        if result.all_failed() {
            // Undo the record so nothing half-deployed remains.
            match &existing {
                Some(previous) => self.store.put_function(previous).await?,
                None => {
                    self.store.delete_function(&id).await?;
                }
            }
            return result.into_result("deploy").map(|_| id);
        }
        self.put_function(function);
        result.into_result("deploy").map(|_| id)
    }

    /// PUT /system/functions: replaces a deployed function's spec, keeping its replica counts
    /// (raised to the new `com.openfaas.scale.min` when that is higher). A new placement adds
    /// and removes datacenters.
    pub async fn update(&self, dep: FunctionDeployment) -> Result<FunctionId, FleetError> {
        let _shared = self.hold_shared(&self.named(&dep)).await?;
        let _counts = self.hold_counts(&self.named(&dep), None).await;
        let _guard = self.write.lock().await;
        let (id, placement) = self.check_deployment(&dep)?;
        let Some(current) = self.function(&id) else {
            return Err(not_found(&id));
        };
        let workload = self.workload(&id, &dep).await?;
        let min = crate::autoscale::labels::min_for(&id, &dep, &self.autoscale);
        let replicas: BTreeMap<String, u64> = placement
            .iter()
            .map(|dc| (dc.clone(), current.desired_in(dc).unwrap_or(min).max(min)))
            .collect();
        let dropped: Vec<String> = current
            .replicas
            .keys()
            .filter(|dc| !replicas.contains_key(*dc))
            .cloned()
            .collect();
        let function = Function {
            replicas,
            deployment: dep,
            ..Function::clone(&current)
        };
        self.store.put_function(&function).await?;
        let targets: Vec<(String, u64)> = function
            .replicas
            .iter()
            .map(|(d, n)| (d.clone(), *n))
            .collect();
        let mut result = self.apply_in(&workload, &targets).await;
        if result.all_failed() {
            self.store.put_function(&current).await?;
            return result.into_result("update").map(|_| id);
        }
        result
            .0
            .extend(self.each(&dropped, |d| d.platform.remove(&id)).await.0);
        for dc in &dropped {
            self.applied_set(&id, dc, None);
        }
        // A count the new spec's min raised is a change of its own, audited as one.
        let raised: Vec<(String, u64, u64)> = function
            .replicas
            .iter()
            .filter_map(|(dc, n)| {
                let before = current.desired_in(dc)?;
                (before < *n).then(|| (dc.clone(), before, *n))
            })
            .collect();
        self.put_function(function);
        for (dc, from, to) in raised {
            let event = ScaleEvent::change(
                &id,
                &dc,
                chrono::Utc::now(),
                "update",
                (from, to),
                format!("the updated spec's min is {min}: {from} -> {to}"),
                "min_raised",
                serde_json::json!({"min": min}),
            );
            if let Err(e) = self.store.record_change(&event).await {
                tracing::error!(function = %id, error = %e, "cannot record a scale event");
            }
        }
        result.into_result("update").map(|_| id)
    }

    /// DELETE /system/functions: from every datacenter, or only from `datacenter`. Once this
    /// returns, no request reaches the removed replicas.
    pub async fn remove(
        &self,
        id: &FunctionId,
        datacenter: Option<&str>,
    ) -> Result<(), FleetError> {
        let _shared = self.hold_shared(id).await?;
        let _counts = self.hold_counts(id, None).await;
        let _guard = self.write.lock().await;
        let Some(current) = self.function(id) else {
            return Err(not_found(id));
        };
        let keep: BTreeMap<String, u64> = match datacenter {
            None => BTreeMap::new(),
            Some(dc) => {
                if !current.replicas.contains_key(dc) {
                    return Err(FleetError::NotFound(format!(
                        "function {id} is not in datacenter {dc}"
                    )));
                }
                current
                    .replicas
                    .iter()
                    .filter(|(d, _)| d.as_str() != dc)
                    .map(|(d, n)| (d.clone(), *n))
                    .collect()
            }
        };
        let removed: Vec<String> = current
            .replicas
            .keys()
            .filter(|dc| !keep.contains_key(*dc))
            .cloned()
            .collect();
        if keep.is_empty() {
            self.store.delete_function(id).await?;
            self.drop_function(id);
            self.forget_counts(id, None);
        } else {
            self.store.set_desired_replicas(id, &keep).await?;
            self.set_replicas(id, keep);
            if let Some(dc) = datacenter {
                self.forget_counts(id, Some(dc));
            }
        }
        for dc in &removed {
            self.applied_set(id, dc, None);
        }
        // What failed here is removed by the reconciler once the datacenter answers again.
        self.each(&removed, |d| d.platform.remove(id))
            .await
            .into_result("remove")
    }
}
