//! Persistence: functions' desired state, the autoscaler's state and decisions, namespaces,
//! secrets and trigger runs. One interface ([`Backend`]) with two implementations: the
//! embedded SQLite file (the default, one instance) and a shared PostgreSQL database (several
//! instances, `[store] url`). Every mutation is one transaction, so a crash leaves either the
//! old or the new state, never half of one.

pub(crate) mod lease;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::{Function, FunctionId, Namespace};

pub use lease::Leader;

pub use postgres::{Change, PostgresStore};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {}", chain(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The shared database cannot be reached (or gave no connection in time).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("database task failed: {0}")]
    Join(String),
    /// A write made for the leader after this instance stopped being it.
    #[error(
        "this instance no longer leads (fencing token {0} is stale); another instance acts now"
    )]
    Deposed(i64),
}

/// An error with the causes it wraps ("error connecting to server: Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

impl StoreError {
    /// The data directory's disk (or the database's size limit) is full.
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL)
            }
            _ => false,
        }
    }

    /// The database could not be reached: nothing was stored, and a retry may work.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Postgres(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }
}

/// A stored secret. The value never leaves the store except to be handed to a function.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretRecord {
    pub namespace: String,
    pub name: String,
    pub value: Vec<u8>,
}

/// A scale event to store: its time and datacenter (indexed) and the whole event as JSON.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub at: DateTime<Utc>,
    pub datacenter: String,
    pub json: String,
}

/// A scale decision stored with the desired replicas it sets: the engine state it leaves for
/// one datacenter, the one it replaces (for an undo) and its event.
#[derive(Debug, Clone)]
pub struct Decision {
    pub datacenter: String,
    pub state_json: String,
    pub previous_state_json: String,
    pub event: EventRecord,
    /// The leader's fencing token, for a decision only the leader may make (its loops'): the
    /// write is refused when another instance has taken the lease since.
    pub fence: Option<i64>,
}

/// What is written with a function's desired replicas.
#[derive(Debug, Clone)]
pub enum DesiredWith {
    /// A decision: its engine state and event.
    Record(Decision),
    /// The undo of a decision whose event has this id: its previous state comes back and the
    /// event goes.
    Undo(Decision, i64),
}

#[derive(Debug, Clone)]
pub struct EventFilter {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub datacenter: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: u32,
}

/// The tables that hold events: decisions and changes, and trigger runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Events {
    Scale,
    Trigger,
}

impl Events {
    fn table(self) -> &'static str {
        match self {
            Events::Scale => "scale_events",
            Events::Trigger => "trigger_events",
        }
    }
}

/// One instance's invocations of one function (`name.namespace`) in one datacenter: the total
/// since the instance started and the last one's time (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvocationRow {
    pub function: String,
    pub datacenter: String,
    pub total: u64,
    pub last_ms: i64,
    /// When the instance that counted it started (Unix milliseconds): its count began then.
    pub started_ms: i64,
}

/// A paused autoscaling scope: (`*` or `name.namespace`, since, reason).
pub type PauseRow = (String, DateTime<Utc>, String);

/// What a store does. Both implementations pass the same suite (`tests/store.rs`).
#[async_trait]
pub trait Backend: Send + Sync {
    /// Every function; one stored before datacenters existed is placed in `home`.
    async fn load_functions(&self, home: &str) -> Result<Vec<Function>, StoreError>;
    /// Inserts or replaces a function's whole record.
    async fn put_function(&self, function: &Function) -> Result<(), StoreError>;
    /// Replaces a function's desired replicas per datacenter and, in the same transaction,
    /// writes what comes with them. Returns the id of an event it stored.
    async fn write_desired(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
        with: Option<DesiredWith>,
    ) -> Result<Option<i64>, StoreError>;
    /// Deletes a function, its autoscaler state (a redeploy starts with fresh cooldowns) and
    /// its triggers' state (a redeploy's schedule starts afresh); its scale and trigger events
    /// stay for the audit trail (until `[events]` bounds prune them).
    async fn delete_function(&self, id: &FunctionId) -> Result<bool, StoreError>;

    /// Every function's autoscaler state per datacenter, as JSON text (a state stored before
    /// datacenters existed belongs to `home`).
    async fn load_autoscale_states(
        &self,
        home: &str,
    ) -> Result<Vec<(FunctionId, String, String)>, StoreError>;
    /// Stores a decision's new autoscaler state for one datacenter and, when given, its event,
    /// in one transaction.
    async fn record_decision(
        &self,
        id: &FunctionId,
        datacenter: &str,
        state_json: String,
        event: Option<EventRecord>,
    ) -> Result<Option<i64>, StoreError>;

    async fn load_pauses(&self) -> Result<Vec<PauseRow>, StoreError>;
    /// Pauses (`Some`) or resumes (`None`) a scope; returns whether anything changed.
    async fn set_pause(
        &self,
        scope: &str,
        pause: Option<(DateTime<Utc>, String)>,
    ) -> Result<bool, StoreError>;

    /// Appends an event to `events`; returns its id.
    async fn append_event(
        &self,
        events: Events,
        namespace: &str,
        name: &str,
        event: EventRecord,
    ) -> Result<i64, StoreError>;
    /// Replaces the text of one stored event (an outcome known only after it was stored).
    async fn amend(&self, events: Events, id: i64, json: String) -> Result<(), StoreError>;
    /// Events, newest first, as (id, JSON text).
    async fn events(
        &self,
        events: Events,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError>;
    /// Of the oldest `batch` events (by id, which follows time), deletes those stored before
    /// `before`; returns how many (fewer than `batch`: the oldest are no longer all old).
    /// Reads no more than `batch` rows, whatever the table's size.
    async fn prune_older(
        &self,
        events: Events,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, StoreError>;
    /// The functions with more than `keep` events (events of no function, such as a query
    /// source's, count as one), each with the id of the newest of its events to go.
    async fn over_bound(
        &self,
        events: Events,
        keep: u64,
    ) -> Result<Vec<(String, String, i64)>, StoreError>;
    /// Deletes the oldest `batch` of a function's events with ids up to `through`, but for
    /// runs still going (outcome `running`, as `interrupt_trigger_runs` finds them: pruned,
    /// a long run with more than the bound of newer runs would lose the outcome written as
    /// it ends); returns how many.
    async fn prune_function(
        &self,
        events: Events,
        namespace: &str,
        name: &str,
        through: i64,
        batch: u32,
    ) -> Result<u64, StoreError>;

    /// When each function's `trigger` was last due (and so run, skipped or given up).
    async fn trigger_due_times(
        &self,
        trigger: &str,
    ) -> Result<Vec<(FunctionId, DateTime<Utc>)>, StoreError>;
    /// Forgets when `trigger` of `id` was last due (the function no longer has it).
    async fn clear_trigger(&self, id: &FunctionId, trigger: &str) -> Result<(), StoreError>;
    /// Records that `trigger` of `id` was due at `due`, with the event saying what became of
    /// it, in one transaction: a restart never runs that due time again, and never loses its
    /// record.
    async fn record_trigger(
        &self,
        id: &FunctionId,
        trigger: &str,
        due: DateTime<Utc>,
        event: EventRecord,
    ) -> Result<i64, StoreError>;
    /// Marks the runs recorded as running as interrupted: called when no run of this process
    /// exists yet, so those are runs an earlier process did not finish.
    async fn interrupt_trigger_runs(&self) -> Result<usize, StoreError>;

    async fn load_namespaces(&self) -> Result<Vec<Namespace>, StoreError>;
    async fn put_namespace(&self, ns: &Namespace) -> Result<(), StoreError>;
    /// Deletes a namespace and the secrets that lived in it, in one transaction.
    async fn delete_namespace(&self, name: &str) -> Result<bool, StoreError>;

    async fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;
    async fn get_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretRecord>, StoreError>;
    async fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError>;
    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, StoreError>;

    /// One function as stored now (`None`: not deployed).
    async fn load_function(
        &self,
        id: &FunctionId,
        home: &str,
    ) -> Result<Option<Function>, StoreError>;

    /// One function's autoscaler state in one datacenter, as JSON text.
    async fn load_state(
        &self,
        id: &FunctionId,
        datacenter: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Whether other instances share this store (and so leadership must be elected).
    fn shared(&self) -> bool {
        false
    }

    /// Holds `key` against every instance until the guard is dropped (decisions about one
    /// function in one datacenter, made one at a time however many instances receive them).
    /// `None` when nobody shares the store: the caller's own lock is enough.
    async fn lock(&self, _key: &str) -> Result<Option<Guard>, StoreError> {
        Ok(None)
    }

    /// Publishes this instance's invocation counters (totals since it started, and when each
    /// function was last invoked, Unix milliseconds), so the leader's loops see every
    /// instance's traffic. Only rows that changed are given.
    async fn publish_invocations(
        &self,
        _instance: &str,
        _rows: Vec<InvocationRow>,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// The other instances' invocation counters (of the last week), per instance.
    async fn others_invocations(
        &self,
        _instance: &str,
    ) -> Result<Vec<(String, InvocationRow)>, StoreError> {
        Ok(Vec::new())
    }

    /// What other instances change, as they commit it (`None`: nobody shares the store).
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<Note>> {
        None
    }

    /// Takes or renews the lease `name` for `holder`, valid for `ttl` by the database's
    /// clock. The fencing token while `holder` holds it (the same while it renews in time, a
    /// higher one for each new term), `None` while another instance does. A store nobody
    /// shares is always led by its one instance.
    async fn acquire_lease(
        &self,
        _name: &str,
        _holder: &str,
        _ttl: std::time::Duration,
    ) -> Result<Option<i64>, StoreError> {
        Ok(Some(1))
    }

    /// Gives the lease up (a clean stop), so that another instance need not wait it out.
    async fn release_lease(&self, _name: &str, _holder: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Who holds the lease `name` now, with its token: `None` when nobody does.
    async fn lease_holder(&self, _name: &str) -> Result<Option<(String, i64)>, StoreError> {
        Ok(None)
    }
}

/// A lock held on the store until dropped (see [`Backend::lock`]).
pub struct Guard(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

/// A change another instance committed to a shared store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Note {
    Changed {
        kind: Change,
        namespace: String,
        name: String,
    },
    /// Changes may have been missed (the listening connection was down): read everything.
    Resync,
}

/// The store the rest of the server holds: one backend, shared.
#[derive(Clone)]
pub struct Store(Arc<dyn Backend>);

impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Store {
    /// Opens (creating if needed) the embedded SQLite store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store(Arc::new(SqliteStore::open(path)?)))
    }

    pub fn new(backend: Arc<dyn Backend>) -> Store {
        Store(backend)
    }

    /// Replaces a function's desired replicas per datacenter.
    pub async fn set_desired_replicas(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
    ) -> Result<(), StoreError> {
        self.write_desired(id, replicas, None).await.map(|_| ())
    }

    /// Replaces a function's desired replicas and, in the same transaction, stores the
    /// decision that set them (its engine state and event, written before the platform is
    /// called). A crash after this leaves a decision that is recorded once and applied by the
    /// reconciler on restart: never lost, never applied twice. Returns the event's id.
    pub async fn set_desired_with(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
        decision: Option<&Decision>,
    ) -> Result<Option<i64>, StoreError> {
        self.write_desired(id, replicas, decision.cloned().map(DesiredWith::Record))
            .await
    }

    /// Undoes [`Store::set_desired_with`] when the platform refused the change: the old
    /// desired replicas and engine state come back and the decision's event is removed, in
    /// one transaction.
    pub async fn revert_desired(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
        undo: Option<(&Decision, i64)>,
    ) -> Result<(), StoreError> {
        let undo = undo.map(|(d, event_id)| DesiredWith::Undo(d.clone(), event_id));
        self.write_desired(id, replicas, undo).await.map(|_| ())
    }

    /// An event of one function that changes no autoscaler state (a manual scale).
    pub async fn record_event(
        &self,
        id: &FunctionId,
        event: EventRecord,
    ) -> Result<i64, StoreError> {
        self.append_event(Events::Scale, &id.namespace, &id.name, event)
            .await
    }

    /// Records an event that is no engine decision (see [`crate::events::ScaleEvent`]).
    pub async fn record_change(
        &self,
        event: &crate::events::ScaleEvent,
    ) -> Result<i64, StoreError> {
        let json = serde_json::to_string(event).unwrap_or_default();
        self.record_source_event(
            &event.namespace,
            &event.function,
            &event.datacenter,
            event.time,
            json,
        )
        .await
    }

    /// An event that concerns no single function (a metric source going down or coming back).
    pub async fn record_source_event(
        &self,
        namespace: &str,
        name: &str,
        datacenter: &str,
        at: DateTime<Utc>,
        json: String,
    ) -> Result<i64, StoreError> {
        let event = EventRecord {
            at,
            datacenter: datacenter.to_string(),
            json,
        };
        self.append_event(Events::Scale, namespace, name, event)
            .await
    }

    /// Applies the audit trail's bounds (`[events]`) to both kinds of events, in batches of a
    /// thousand so other writes go between them; returns how many events went.
    pub async fn prune_events(
        &self,
        bounds: &crate::config::EventsConfig,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        const BATCH: u32 = 1000;
        /// Runs one batch after another until one finds less than a batch to remove: each is
        /// its own store call, so other writes go between.
        async fn in_batches<F, Fut>(mut batch: F) -> Result<u64, StoreError>
        where
            F: FnMut() -> Fut,
            Fut: std::future::Future<Output = Result<u64, StoreError>>,
        {
            let mut removed = 0;
            loop {
                let n = batch().await?;
                removed += n;
                if n < u64::from(BATCH) {
                    return Ok(removed);
                }
            }
        }
        let mut removed = 0;
        for events in [Events::Scale, Events::Trigger] {
            if bounds.retention_days > 0 {
                let before = now - chrono::Duration::days(bounds.retention_days as i64);
                removed += in_batches(|| self.prune_older(events, before, BATCH)).await?;
            }
            if bounds.max_per_function > 0 {
                for (namespace, name, through) in
                    self.over_bound(events, bounds.max_per_function).await?
                {
                    removed += in_batches(|| {
                        self.prune_function(events, &namespace, &name, through, BATCH)
                    })
                    .await?;
                }
            }
        }
        Ok(removed)
    }

    /// Replaces the text of a stored scale event.
    pub async fn amend_event(&self, id: i64, json: String) -> Result<(), StoreError> {
        self.amend(Events::Scale, id, json).await
    }

    /// Replaces the text of a trigger event (a run whose outcome is known once it ends).
    pub async fn amend_trigger_event(&self, id: i64, json: String) -> Result<(), StoreError> {
        self.amend(Events::Trigger, id, json).await
    }

    /// Scale events, newest first, as (id, JSON text).
    pub async fn scale_events(
        &self,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.events(Events::Scale, filter).await
    }

    /// Trigger runs (and runs skipped or missed), newest first, as (id, JSON text).
    pub async fn trigger_events(
        &self,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.events(Events::Trigger, filter).await
    }

    /// The newest `limit` events of every function, parsed (for tests).
    #[cfg(test)]
    pub async fn events_json(&self, limit: u32) -> Vec<serde_json::Value> {
        let filter = EventFilter {
            name: None,
            namespace: None,
            datacenter: None,
            since: None,
            limit,
        };
        let rows = self.scale_events(filter).await.unwrap();
        rows.iter()
            .map(|(_, json)| serde_json::from_str(json).unwrap())
            .collect()
    }
}

fn placement_json(replicas: &BTreeMap<String, u64>) -> Result<String, StoreError> {
    serde_json::to_string(replicas).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The sum of a placement's replicas, as a database integer.
fn total_of(replicas: &BTreeMap<String, u64>) -> i64 {
    replicas
        .values()
        .fold(0u64, |s, n| s.saturating_add(*n))
        .min(i64::MAX as u64) as i64
}

/// A function's stored columns, turned back into a [`Function`].
struct FunctionRow {
    namespace: String,
    name: String,
    deployment: String,
    desired_replicas: i64,
    created_at: DateTime<Utc>,
    placement: Option<String>,
}

impl FunctionRow {
    fn into_function(self, home: &str) -> Result<Function, StoreError> {
        let (name, namespace) = (self.name, self.namespace);
        let corrupt = |e: String| StoreError::Corrupt(format!("function {name}.{namespace}: {e}"));
        let deployment =
            serde_json::from_str(&self.deployment).map_err(|e| corrupt(e.to_string()))?;
        let replicas = match self.placement {
            Some(json) => serde_json::from_str(&json).map_err(|e| corrupt(e.to_string()))?,
            None => [(home.to_string(), self.desired_replicas.max(0) as u64)].into(),
        };
        Ok(Function {
            id: FunctionId::new(name, namespace),
            deployment,
            replicas,
            created_at: self.created_at,
        })
    }
}

/// A namespace's labels or annotations as stored (JSON text, or nothing).
fn map_json(map: &Option<BTreeMap<String, String>>) -> Option<String> {
    map.as_ref()
        .map(|m| serde_json::to_string(m).unwrap_or_default())
}

fn namespace_from(
    name: String,
    labels: Option<String>,
    annotations: Option<String>,
) -> Result<Namespace, StoreError> {
    let parse = |s: Option<String>| -> Result<_, StoreError> {
        s.map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("namespace {name}: {e}")))
    };
    Ok(Namespace {
        labels: parse(labels)?,
        annotations: parse(annotations)?,
        name,
    })
}

/// What an interrupted trigger run says about itself.
const INTERRUPTED_REASON: &str = "faastastic stopped before the run ended";
