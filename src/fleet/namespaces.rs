//! Namespaces and secrets.

use super::*;

impl Fleet {
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

    pub(super) fn secret_record(&self, input: SecretInput) -> Result<SecretRecord, FleetError> {
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
