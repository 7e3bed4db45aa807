//! The control plane's desired state: functions, namespaces and secrets, kept in the store and
//! converged onto the platform. Handlers call one method here per request; every method either
//! applies its whole change or none of it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use base64::Engine;
use chrono::Utc;
use tokio::sync::Mutex;

use crate::model::{
    truncate_for_message, validate_dns_label, validate_secret_name, Function, FunctionDeployment,
    FunctionId, Namespace,
};
use crate::platform::{Platform, PlatformError, ReplicaCounts, Workload};
use crate::store::{SecretRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The request is wrong; each entry names a field.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

impl FleetError {
    fn invalid(msg: impl Into<String>) -> Self {
        FleetError::Invalid(vec![msg.into()])
    }
}

/// A function with its live replica counts.
#[derive(Debug, Clone)]
pub struct FunctionView {
    pub function: Function,
    pub replicas: ReplicaCounts,
}

/// A secret as clients send it: `rawValue` (base64 bytes) wins over `value` when non-empty.
#[derive(Debug, Clone, Default)]
pub struct SecretInput {
    pub name: String,
    pub namespace: Option<String>,
    pub value: Option<String>,
    pub raw_value: Option<String>,
}

pub struct Fleet {
    store: Store,
    platform: Arc<dyn Platform>,
    default_namespace: String,
    max_replicas: u64,
    functions: RwLock<HashMap<FunctionId, Function>>,
    namespaces: RwLock<BTreeMap<String, Namespace>>,
    /// Serialises mutations so that store and platform see them in one order.
    write: Mutex<()>,
}

impl Fleet {
    /// Loads the stored state and brings every function's replicas back.
    pub async fn restore(
        store: Store,
        platform: Arc<dyn Platform>,
        default_namespace: &str,
        max_replicas: u64,
    ) -> Result<Fleet, FleetError> {
        let mut namespaces: BTreeMap<String, Namespace> = store
            .load_namespaces()
            .await?
            .into_iter()
            .map(|ns| (ns.name.clone(), ns))
            .collect();
        if !namespaces.contains_key(default_namespace) {
            let ns = default_namespace_record(default_namespace);
            store.put_namespace(&ns).await?;
            namespaces.insert(ns.name.clone(), ns);
        }
        let fleet = Fleet {
            store,
            platform,
            default_namespace: default_namespace.to_string(),
            max_replicas,
            functions: RwLock::new(HashMap::new()),
            namespaces: RwLock::new(namespaces),
            write: Mutex::new(()),
        };
        for function in fleet.store.load_functions().await? {
            let workload = fleet.workload(&function.id, &function.deployment).await;
            match workload {
                Ok(w) => {
                    if let Err(e) = fleet.platform.apply(w, function.desired_replicas).await {
                        tracing::error!(function = %function.id, error = %e, "cannot restore function");
                    }
                }
                Err(e) => {
                    tracing::error!(function = %function.id, error = %e, "cannot restore function")
                }
            }
            fleet
                .write_functions()
                .insert(function.id.clone(), function);
        }
        Ok(fleet)
    }

    pub fn default_namespace(&self) -> &str {
        &self.default_namespace
    }

    pub fn platform(&self) -> &Arc<dyn Platform> {
        &self.platform
    }

    fn read_functions(&self) -> std::sync::RwLockReadGuard<'_, HashMap<FunctionId, Function>> {
        self.functions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_functions(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<FunctionId, Function>> {
        self.functions.write().unwrap_or_else(|p| p.into_inner())
    }

    fn namespaces_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Namespace>> {
        self.namespaces.read().unwrap_or_else(|p| p.into_inner())
    }

    fn namespaces_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Namespace>> {
        self.namespaces.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The namespace a request means: the one given (if non-empty) or the default. It must exist.
    pub fn resolve_namespace(&self, given: Option<&str>) -> Result<String, FleetError> {
        let ns = match given {
            Some(ns) if !ns.is_empty() => ns,
            _ => return Ok(self.default_namespace.clone()),
        };
        if self.namespaces_read().contains_key(ns) {
            Ok(ns.to_string())
        } else {
            Err(FleetError::invalid(format!(
                "namespace: {:?} does not exist (known: {})",
                truncate_for_message(ns),
                self.namespace_names().join(", ")
            )))
        }
    }

    /// Desired replicas of a function, or `None` if it is not deployed. Cheap: the invoke path
    /// calls it on every request.
    pub fn desired_replicas(&self, id: &FunctionId) -> Option<u64> {
        self.read_functions().get(id).map(|f| f.desired_replicas)
    }

    pub fn min_replicas(&self, id: &FunctionId) -> Option<u64> {
        self.read_functions()
            .get(id)
            .map(|f| f.deployment.min_replicas())
    }

    pub fn list(&self, namespace: &str) -> Vec<FunctionView> {
        let functions = self.read_functions();
        let mut out: Vec<FunctionView> = functions
            .values()
            .filter(|f| f.id.namespace == namespace)
            .map(|f| self.view(f))
            .collect();
        out.sort_by(|a, b| a.function.id.name.cmp(&b.function.id.name));
        out
    }

    /// Every function in every namespace (for metrics).
    pub fn all(&self) -> Vec<FunctionView> {
        self.read_functions()
            .values()
            .map(|f| self.view(f))
            .collect()
    }

    pub fn get(&self, id: &FunctionId) -> Result<FunctionView, FleetError> {
        self.read_functions()
            .get(id)
            .map(|f| self.view(f))
            .ok_or_else(|| not_found(id))
    }

    fn view(&self, f: &Function) -> FunctionView {
        let mut replicas = self.platform.replicas(&f.id);
        replicas.desired = f.desired_replicas;
        FunctionView {
            function: f.clone(),
            replicas,
        }
    }

    /// Validates a deployment body and returns the function id it names.
    fn check_deployment(&self, dep: &FunctionDeployment) -> Result<FunctionId, FleetError> {
        let mut errors = match dep.validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors,
        };
        if let Err(e) = self.platform.validate(dep) {
            errors.push(e);
        }
        errors.extend(crate::autoscale::labels::check_labels(dep));
        if dep.min_replicas() > self.max_replicas {
            errors.push(format!(
                "labels: {} {} is above this server's limit of {} replicas (limits.max_replicas)",
                crate::model::LABEL_SCALE_MIN,
                dep.min_replicas(),
                self.max_replicas
            ));
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
        Ok(FunctionId::new(
            name,
            namespace.expect("namespace resolved when there are no errors"),
        ))
    }

    /// Reads the secrets a deployment names; a missing one is a 400 naming it.
    async fn workload(
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

    /// POST /system/functions: a new function; an existing name is a conflict.
    pub async fn deploy(&self, dep: FunctionDeployment) -> Result<FunctionId, FleetError> {
        // Checked under the lock, so a namespace deleted meanwhile cannot be deployed into.
        let _guard = self.write.lock().await;
        let id = self.check_deployment(&dep)?;
        if self.read_functions().contains_key(&id) {
            return Err(FleetError::Conflict(format!(
                "function {id} already exists; update it with PUT /system/functions"
            )));
        }
        let workload = self.workload(&id, &dep).await?;
        let function = Function {
            id: id.clone(),
            desired_replicas: dep.min_replicas(),
            deployment: dep,
            created_at: Utc::now(),
        };
        self.store.put_function(&function).await?;
        if let Err(e) = self
            .platform
            .apply(workload, function.desired_replicas)
            .await
        {
            // Undo the record so nothing half-deployed remains.
            self.store.delete_function(&id).await?;
            return Err(e.into());
        }
        self.write_functions().insert(id.clone(), function);
        Ok(id)
    }

    /// PUT /system/functions: replaces a deployed function's spec, keeping its replica count
    /// (raised to the new `com.openfaas.scale.min` when that is higher).
    pub async fn update(&self, dep: FunctionDeployment) -> Result<FunctionId, FleetError> {
        let _guard = self.write.lock().await;
        let id = self.check_deployment(&dep)?;
        let Some(current) = self.read_functions().get(&id).cloned() else {
            return Err(not_found(&id));
        };
        let workload = self.workload(&id, &dep).await?;
        let function = Function {
            desired_replicas: current.desired_replicas.max(dep.min_replicas()),
            deployment: dep,
            ..current.clone()
        };
        self.store.put_function(&function).await?;
        if let Err(e) = self
            .platform
            .apply(workload, function.desired_replicas)
            .await
        {
            self.store.put_function(&current).await?;
            return Err(e.into());
        }
        self.write_functions().insert(id.clone(), function);
        Ok(id)
    }

    /// DELETE /system/functions. Once this returns, no request reaches the old replicas.
    pub async fn remove(&self, id: &FunctionId) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        if !self.read_functions().contains_key(id) {
            return Err(not_found(id));
        }
        self.store.delete_function(id).await?;
        self.write_functions().remove(id);
        self.platform.remove(id).await?;
        Ok(())
    }

    /// Sets the desired replica count (0 allowed: scale to zero).
    pub async fn scale(&self, id: &FunctionId, replicas: u64) -> Result<(), FleetError> {
        self.scale_checked(id, None, replicas).await
    }

    /// Scales only if the desired count is still `expected` (the count a decision was made
    /// from): a manual scale in between is never overwritten. A mismatch is a `Conflict`.
    pub async fn scale_from(
        &self,
        id: &FunctionId,
        expected: u64,
        replicas: u64,
    ) -> Result<(), FleetError> {
        self.scale_checked(id, Some(expected), replicas).await
    }

    async fn scale_checked(
        &self,
        id: &FunctionId,
        expected: Option<u64>,
        replicas: u64,
    ) -> Result<(), FleetError> {
        if replicas > self.max_replicas {
            return Err(FleetError::invalid(format!(
                "replicas: {replicas} is above this server's limit of {} (limits.max_replicas)",
                self.max_replicas
            )));
        }
        let _guard = self.write.lock().await;
        let Some((current, deployment)) = self
            .read_functions()
            .get(id)
            .map(|f| (f.desired_replicas, f.deployment.clone()))
        else {
            return Err(not_found(id));
        };
        if let Some(expected) = expected.filter(|e| *e != current) {
            return Err(FleetError::Conflict(format!(
                "replicas changed from {expected} to {current} meanwhile"
            )));
        }
        self.platform
            .validate_scale(&deployment, replicas)
            .map_err(FleetError::invalid)?;
        if current == replicas {
            return Ok(());
        }
        self.store.set_desired_replicas(id, replicas).await?;
        if let Err(e) = self.platform.scale(id, replicas).await {
            self.store.set_desired_replicas(id, current).await?;
            return Err(e.into());
        }
        if let Some(f) = self.write_functions().get_mut(id) {
            f.desired_replicas = replicas;
        }
        Ok(())
    }

    // ---- namespaces ----

    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces_read().keys().cloned().collect()
    }

    pub fn get_namespace(&self, name: &str) -> Result<Namespace, FleetError> {
        self.namespaces_read()
            .get(name)
            .cloned()
            .ok_or_else(|| FleetError::NotFound(format!("namespace {name} not found")))
    }

    pub async fn create_namespace(&self, ns: Namespace) -> Result<(), FleetError> {
        validate_dns_label("name", &ns.name).map_err(FleetError::invalid)?;
        let _guard = self.write.lock().await;
        if self.namespaces_read().contains_key(&ns.name) {
            return Err(FleetError::Conflict(format!(
                "namespace {} already exists",
                ns.name
            )));
        }
        self.store.put_namespace(&ns).await?;
        self.namespaces_write().insert(ns.name.clone(), ns);
        Ok(())
    }

    pub async fn update_namespace(&self, ns: Namespace) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        if !self.namespaces_read().contains_key(&ns.name) {
            return Err(FleetError::NotFound(format!(
                "namespace {} not found",
                ns.name
            )));
        }
        self.store.put_namespace(&ns).await?;
        self.namespaces_write().insert(ns.name.clone(), ns);
        Ok(())
    }

    pub async fn delete_namespace(&self, name: &str) -> Result<(), FleetError> {
        if name == self.default_namespace {
            return Err(FleetError::invalid(format!(
                "name: {name} is the default namespace and cannot be deleted"
            )));
        }
        let _guard = self.write.lock().await;
        if !self.namespaces_read().contains_key(name) {
            return Err(FleetError::NotFound(format!("namespace {name} not found")));
        }
        let in_use = self
            .read_functions()
            .keys()
            .filter(|id| id.namespace == name)
            .count();
        if in_use > 0 {
            return Err(FleetError::Conflict(format!(
                "namespace {name} still has {in_use} function(s); remove them first"
            )));
        }
        self.store.delete_namespace(name).await?;
        self.namespaces_write().remove(name);
        Ok(())
    }

    // ---- secrets ----

    pub async fn list_secrets(&self, namespace: &str) -> Result<Vec<String>, FleetError> {
        Ok(self
            .store
            .list_secrets()
            .await?
            .into_iter()
            .filter(|s| s.namespace == namespace)
            .map(|s| s.name)
            .collect())
    }

    fn secret_record(&self, input: SecretInput) -> Result<SecretRecord, FleetError> {
        let mut errors = Vec::new();
        if let Err(e) = validate_secret_name(&input.name) {
            errors.push(e);
        }
        let namespace = match self.resolve_namespace(input.namespace.as_deref()) {
            Ok(ns) => ns,
            Err(FleetError::Invalid(e)) => {
                errors.extend(e);
                String::new()
            }
            Err(e) => return Err(e),
        };
        let value = match input.raw_value.as_deref().filter(|v| !v.is_empty()) {
            Some(raw) => match base64::engine::general_purpose::STANDARD.decode(raw) {
                Ok(bytes) => bytes,
                Err(e) => {
                    errors.push(format!("rawValue: not valid base64: {e}"));
                    Vec::new()
                }
            },
            None => input.value.unwrap_or_default().into_bytes(),
        };
        if !errors.is_empty() {
            return Err(FleetError::Invalid(errors));
        }
        Ok(SecretRecord {
            namespace,
            name: input.name,
            value,
        })
    }

    pub async fn create_secret(&self, input: SecretInput) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        let record = self.secret_record(input)?;
        if self
            .store
            .get_secret(&record.namespace, &record.name)
            .await?
            .is_some()
        {
            return Err(FleetError::Conflict(format!(
                "secret with the name {} already exists in namespace {}",
                record.name, record.namespace
            )));
        }
        self.store.put_secret(&record).await?;
        Ok(())
    }

    pub async fn update_secret(&self, input: SecretInput) -> Result<(), FleetError> {
        let _guard = self.write.lock().await;
        let record = self.secret_record(input)?;
        if self
            .store
            .get_secret(&record.namespace, &record.name)
            .await?
            .is_none()
        {
            return Err(secret_not_found(&record.name, &record.namespace));
        }
        self.store.put_secret(&record).await?;
        Ok(())
    }

    pub async fn delete_secret(
        &self,
        name: &str,
        namespace: Option<&str>,
    ) -> Result<(), FleetError> {
        if name.is_empty() {
            return Err(FleetError::invalid("name: is required"));
        }
        let _guard = self.write.lock().await;
        let namespace = self.resolve_namespace(namespace)?;
        let users: Vec<String> = self
            .read_functions()
            .values()
            .filter(|f| {
                f.id.namespace == namespace
                    && f.deployment.secrets.iter().flatten().any(|s| s == name)
            })
            .map(|f| f.id.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(FleetError::Conflict(format!(
                "secret {name} is used by {}; remove it from their secrets first",
                users.join(", ")
            )));
        }
        if !self.store.delete_secret(&namespace, name).await? {
            return Err(secret_not_found(name, &namespace));
        }
        Ok(())
    }
}

fn default_namespace_record(name: &str) -> Namespace {
    let openfaas: BTreeMap<String, String> = [("openfaas".to_string(), "1".to_string())].into();
    Namespace {
        name: name.to_string(),
        labels: Some(openfaas.clone()),
        annotations: Some(openfaas),
    }
}

fn not_found(id: &FunctionId) -> FleetError {
    FleetError::NotFound(format!("function {id} not found"))
}

fn secret_not_found(name: &str, namespace: &str) -> FleetError {
    FleetError::NotFound(format!(
        "unable to find secret: {name} in namespace {namespace}"
    ))
}
