//! SQLite persistence: functions' desired state, namespaces and secrets. Every mutation is one
//! transaction, so a crash leaves either the old or the new state, never half of one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use crate::model::{Function, FunctionDeployment, FunctionId, Namespace};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("database task failed: {0}")]
    Join(String),
}

impl StoreError {
    /// The data directory's disk (or the database's size limit) is full.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull
        )
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
}

/// What is written with a function's desired replicas.
enum DesiredWith {
    Record(Decision),
    Undo(Decision, i64),
}

/// Upserts a datacenter's engine state and inserts the event, inside a caller's transaction.
fn write_decision(
    tx: &rusqlite::Transaction<'_>,
    id: &FunctionId,
    datacenter: &str,
    state_json: &str,
    event: Option<&EventRecord>,
) -> rusqlite::Result<Option<i64>> {
    tx.execute(
        "INSERT INTO autoscale_states (namespace, name, datacenter, state) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(namespace, name, datacenter) DO UPDATE SET state = excluded.state",
        params![id.namespace, id.name, datacenter, state_json],
    )?;
    match event {
        Some(e) => {
            tx.execute(
                "INSERT INTO scale_events (at, namespace, name, datacenter, event) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![e.at.to_rfc3339(), id.namespace, id.name, e.datacenter, e.json],
            )?;
            Ok(Some(tx.last_insert_rowid()))
        }
        None => Ok(None),
    }
}

#[derive(Debug, Clone)]
pub struct EventFilter {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub datacenter: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: u32,
}

fn placement_json(replicas: &BTreeMap<String, u64>) -> Result<String, StoreError> {
    serde_json::to_string(replicas).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A row's first three columns, as text.
fn three_texts(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// Bounds the blocking threads that wait for the connection.
    queue: Arc<tokio::sync::Semaphore>,
}

/// How many callers may wait for the connection on blocking threads; the rest wait as tasks.
/// Two keep the connection busy without a task wake-up between calls (one alone made a
/// 1,000-alert webhook a third slower); an unbounded number grew tokio's blocking pool to
/// its 512-thread bound under that webhook, each thread keeping its own allocator pages
/// (about 60 MB), and four raised the peak by 15 MB.
const WAITING_THREADS: usize = 2;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS namespaces (
    name        TEXT PRIMARY KEY,
    labels      TEXT,
    annotations TEXT
);
CREATE TABLE IF NOT EXISTS functions (
    namespace        TEXT NOT NULL,
    name             TEXT NOT NULL,
    deployment       TEXT NOT NULL,
    desired_replicas INTEGER NOT NULL,
    created_at       TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS autoscale_states (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    datacenter TEXT NOT NULL,
    state      TEXT NOT NULL,
    PRIMARY KEY (namespace, name, datacenter)
);
CREATE TABLE IF NOT EXISTS scale_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    datacenter TEXT NOT NULL,
    event      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS scale_events_function ON scale_events (namespace, name, id);
CREATE TABLE IF NOT EXISTS autoscale_pauses (
    scope  TEXT PRIMARY KEY,
    since  TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trigger_state (
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    trigger   TEXT NOT NULL,
    last_due  TEXT NOT NULL,
    PRIMARY KEY (namespace, name, trigger)
);
CREATE TABLE IF NOT EXISTS trigger_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    datacenter TEXT NOT NULL,
    event      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trigger_events_function ON trigger_events (namespace, name, id);
CREATE TABLE IF NOT EXISTS secrets (
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    value     BLOB NOT NULL,
    PRIMARY KEY (namespace, name)
);
"#;

/// Brings a store written by an earlier version up to date, in place. Rows from before
/// datacenters existed get the datacenter `''`, read back as the home datacenter.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_column = |table: &str, column: &str| -> Result<bool, StoreError> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |row| row.get::<_, String>(1))?;
        for name in names {
            if name? == column {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !has_column("functions", "placement")? {
        conn.execute("ALTER TABLE functions ADD COLUMN placement TEXT", [])?;
    }
    let old_states: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'autoscale_state'",
        [],
        |row| row.get(0),
    )?;
    if old_states {
        conn.execute_batch(
            "BEGIN;
             INSERT OR IGNORE INTO autoscale_states (namespace, name, datacenter, state)
               SELECT namespace, name, '', state FROM autoscale_state;
             DROP TABLE autoscale_state;
             COMMIT;",
        )?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database file, owner-only readable since it holds secrets.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            queue: Arc::new(tokio::sync::Semaphore::new(WAITING_THREADS)),
        })
    }

    /// Runs `f` on the connection off the async runtime's worker threads.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self
            .queue
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Every function; one stored before datacenters existed is placed in `home`.
    pub async fn load_functions(&self, home: &str) -> Result<Vec<Function>, StoreError> {
        let home = home.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT namespace, name, deployment, desired_replicas, created_at, placement FROM functions ORDER BY namespace, name",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, Option<String>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (namespace, name, deployment, replicas, created_at, placement) = row?;
                let corrupt = |e: String| StoreError::Corrupt(format!("function {name}.{namespace}: {e}"));
                let deployment: FunctionDeployment =
                    serde_json::from_str(&deployment).map_err(|e| corrupt(e.to_string()))?;
                let created_at = DateTime::parse_from_rfc3339(&created_at)
                    .map_err(|e| corrupt(e.to_string()))?
                    .with_timezone(&Utc);
                let replicas = match placement {
                    Some(json) => serde_json::from_str(&json).map_err(|e| corrupt(e.to_string()))?,
                    None => [(home.clone(), replicas.max(0) as u64)].into(),
                };
                out.push(Function {
                    id: FunctionId::new(name, namespace),
                    deployment,
                    replicas,
                    created_at,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Inserts or replaces a function's whole record.
    pub async fn put_function(&self, function: &Function) -> Result<(), StoreError> {
        let deployment = serde_json::to_string(&function.deployment)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let placement = placement_json(&function.replicas)?;
        let id = function.id.clone();
        let total = function.desired_total().min(i64::MAX as u64) as i64;
        let created_at = function.created_at.to_rfc3339();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO functions (namespace, name, deployment, desired_replicas, created_at, placement)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(namespace, name) DO UPDATE SET
                   deployment = excluded.deployment,
                   desired_replicas = excluded.desired_replicas,
                   created_at = excluded.created_at,
                   placement = excluded.placement",
                params![id.namespace, id.name, deployment, total, created_at, placement],
            )?;
            Ok(())
        })
        .await
    }

    /// Replaces a function's desired replicas per datacenter.
    pub async fn set_desired_replicas(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
    ) -> Result<(), StoreError> {
        self.set_desired_with(id, replicas, None).await.map(|_| ())
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

    async fn write_desired(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
        with: Option<DesiredWith>,
    ) -> Result<Option<i64>, StoreError> {
        let id = id.clone();
        let placement = placement_json(replicas)?;
        let total = replicas
            .values()
            .fold(0u64, |s, n| s.saturating_add(*n))
            .min(i64::MAX as u64) as i64;
        self.call(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE functions SET desired_replicas = ?3, placement = ?4 WHERE namespace = ?1 AND name = ?2",
                params![id.namespace, id.name, total, placement],
            )?;
            let event_id = match with {
                Some(DesiredWith::Record(d)) => {
                    write_decision(&tx, &id, &d.datacenter, &d.state_json, Some(&d.event))?
                }
                Some(DesiredWith::Undo(d, event_id)) => {
                    write_decision(&tx, &id, &d.datacenter, &d.previous_state_json, None)?;
                    tx.execute("DELETE FROM scale_events WHERE id = ?1", params![event_id])?;
                    None
                }
                None => None,
            };
            tx.commit()?;
            Ok(event_id)
        })
        .await
    }

    /// Deletes a function, its autoscaler state (a redeploy starts with fresh cooldowns) and
    /// its triggers' state (a redeploy's schedule starts afresh); its scale and trigger events
    /// stay for the audit trail.
    pub async fn delete_function(&self, id: &FunctionId) -> Result<bool, StoreError> {
        let id = id.clone();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "DELETE FROM functions WHERE namespace = ?1 AND name = ?2",
                params![id.namespace, id.name],
            )?;
            tx.execute(
                "DELETE FROM autoscale_states WHERE namespace = ?1 AND name = ?2",
                params![id.namespace, id.name],
            )?;
            tx.execute(
                "DELETE FROM trigger_state WHERE namespace = ?1 AND name = ?2",
                params![id.namespace, id.name],
            )?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    /// Every function's autoscaler state per datacenter, as JSON text (a state stored before
    /// datacenters existed belongs to `home`).
    pub async fn load_autoscale_states(
        &self,
        home: &str,
    ) -> Result<Vec<(FunctionId, String, String)>, StoreError> {
        let home = home.to_string();
        self.call(move |conn| {
            let mut stmt =
                conn.prepare("SELECT namespace, name, datacenter, state FROM autoscale_states")?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    FunctionId::new(row.get::<_, String>(1)?, row.get::<_, String>(0)?),
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, dc, state) = row?;
                out.push((id, if dc.is_empty() { home.clone() } else { dc }, state));
            }
            Ok(out)
        })
        .await
    }

    /// Stores a decision's new autoscaler state for one datacenter and, when given, its event,
    /// in one transaction.
    pub async fn record_decision(
        &self,
        id: &FunctionId,
        datacenter: &str,
        state_json: String,
        event: Option<EventRecord>,
    ) -> Result<Option<i64>, StoreError> {
        let id = id.clone();
        let datacenter = datacenter.to_string();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let event_id = write_decision(&tx, &id, &datacenter, &state_json, event.as_ref())?;
            tx.commit()?;
            Ok(event_id)
        })
        .await
    }

    /// Paused autoscaling scopes (`*` for all, else `name.namespace`): (scope, since, reason).
    pub async fn load_pauses(&self) -> Result<Vec<(String, DateTime<Utc>, String)>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT scope, since, reason FROM autoscale_pauses")?;
            let rows = stmt.query_map([], three_texts)?;
            let mut out = Vec::new();
            for row in rows {
                let (scope, since, reason) = row?;
                let since = DateTime::parse_from_rfc3339(&since)
                    .map_err(|e| StoreError::Corrupt(format!("pause {scope}: {e}")))?
                    .with_timezone(&Utc);
                out.push((scope, since, reason));
            }
            Ok(out)
        })
        .await
    }

    /// Pauses (`Some`) or resumes (`None`) a scope; returns whether anything changed.
    pub async fn set_pause(
        &self,
        scope: &str,
        pause: Option<(DateTime<Utc>, String)>,
    ) -> Result<bool, StoreError> {
        let scope = scope.to_string();
        self.call(move |conn| {
            let n = match pause {
                Some((since, reason)) => conn.execute(
                    "INSERT OR IGNORE INTO autoscale_pauses (scope, since, reason) VALUES (?1, ?2, ?3)",
                    params![scope, since.to_rfc3339(), reason],
                )?,
                None => conn.execute(
                    "DELETE FROM autoscale_pauses WHERE scope = ?1",
                    params![scope],
                )?,
            };
            Ok(n > 0)
        })
        .await
    }

    /// An event of one function that changes no autoscaler state (a manual scale).
    pub async fn record_event(
        &self,
        id: &FunctionId,
        event: EventRecord,
    ) -> Result<i64, StoreError> {
        let id = id.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO scale_events (at, namespace, name, datacenter, event) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![event.at.to_rfc3339(), id.namespace, id.name, event.datacenter, event.json],
            )?;
            Ok(conn.last_insert_rowid())
        })
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
        let (namespace, name) = (namespace.to_string(), name.to_string());
        let datacenter = datacenter.to_string();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO scale_events (at, namespace, name, datacenter, event) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![at.to_rfc3339(), namespace, name, datacenter, json],
            )?;
            Ok(conn.last_insert_rowid())
        })
        .await
    }

    /// Replaces the text of a stored event (a decision whose outcome is known only after it
    /// was stored).
    pub async fn amend_event(&self, id: i64, json: String) -> Result<(), StoreError> {
        self.amend_in("scale_events", id, json).await
    }

    /// Replaces the text of one row of an events table.
    async fn amend_in(&self, table: &'static str, id: i64, json: String) -> Result<(), StoreError> {
        self.call(move |conn| {
            conn.execute(
                &format!("UPDATE {table} SET event = ?2 WHERE id = ?1"),
                params![id, json],
            )?;
            Ok(())
        })
        .await
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

    /// Scale events, newest first, as (id, JSON text).
    pub async fn scale_events(
        &self,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.events_in("scale_events", filter).await
    }

    /// Trigger runs (and runs skipped or missed), newest first, as (id, JSON text).
    pub async fn trigger_events(
        &self,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.events_in("trigger_events", filter).await
    }

    /// When each function's `trigger` was last due (and so run, skipped or given up).
    pub async fn trigger_due_times(
        &self,
        trigger: &str,
    ) -> Result<Vec<(FunctionId, DateTime<Utc>)>, StoreError> {
        let trigger = trigger.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT namespace, name, last_due FROM trigger_state WHERE trigger = ?1",
            )?;
            let rows = stmt.query_map(params![trigger], three_texts)?;
            let mut out = Vec::new();
            for row in rows {
                let (namespace, name, due) = row?;
                let due = DateTime::parse_from_rfc3339(&due)
                    .map_err(|e| StoreError::Corrupt(format!("trigger_state.last_due: {e}")))?;
                out.push((FunctionId::new(name, namespace), due.with_timezone(&Utc)));
            }
            Ok(out)
        })
        .await
    }

    /// Forgets when `trigger` of `id` was last due (the function no longer has it).
    pub async fn clear_trigger(&self, id: &FunctionId, trigger: &str) -> Result<(), StoreError> {
        let (id, trigger) = (id.clone(), trigger.to_string());
        self.call(move |conn| {
            conn.execute(
                "DELETE FROM trigger_state WHERE namespace = ?1 AND name = ?2 AND trigger = ?3",
                params![id.namespace, id.name, trigger],
            )?;
            Ok(())
        })
        .await
    }

    /// Records that `trigger` of `id` was due at `due`, with the event saying what became of
    /// it, in one transaction: a restart never runs that due time again, and never loses its
    /// record.
    pub async fn record_trigger(
        &self,
        id: &FunctionId,
        trigger: &str,
        due: DateTime<Utc>,
        event: EventRecord,
    ) -> Result<i64, StoreError> {
        let (id, trigger) = (id.clone(), trigger.to_string());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO trigger_state (namespace, name, trigger, last_due) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (namespace, name, trigger) DO UPDATE SET last_due = excluded.last_due",
                params![id.namespace, id.name, trigger, due.to_rfc3339()],
            )?;
            tx.execute(
                "INSERT INTO trigger_events (at, namespace, name, datacenter, event) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![event.at.to_rfc3339(), id.namespace, id.name, event.datacenter, event.json],
            )?;
            let row = tx.last_insert_rowid();
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    /// Marks the runs recorded as running as interrupted: called once at start, when no run
    /// of this process exists yet, so those are runs the previous process did not finish.
    pub async fn interrupt_trigger_runs(&self) -> Result<usize, StoreError> {
        self.call(|conn| {
            Ok(conn.execute(
                "UPDATE trigger_events SET event = json_set(event, '$.outcome', 'interrupted',
                   '$.reason', 'faastastic stopped before the run ended')
                 WHERE json_extract(event, '$.outcome') = 'running'",
                [],
            )?)
        })
        .await
    }

    /// Replaces the text of a trigger event (a run whose outcome is known once it ends).
    pub async fn amend_trigger_event(&self, id: i64, json: String) -> Result<(), StoreError> {
        self.amend_in("trigger_events", id, json).await
    }

    /// Rows of an events table (`scale_events`, `trigger_events`), newest first.
    async fn events_in(
        &self,
        table: &'static str,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.call(move |conn| {
            let mut sql = format!("SELECT id, event FROM {table} WHERE 1 = 1");
            let mut args: Vec<String> = Vec::new();
            for (column, value) in [
                ("name", &filter.name),
                ("namespace", &filter.namespace),
                ("datacenter", &filter.datacenter),
            ] {
                if let Some(v) = value {
                    args.push(v.clone());
                    sql.push_str(&format!(" AND {column} = ?{}", args.len()));
                }
            }
            if let Some(since) = filter.since {
                args.push(since.to_rfc3339());
                sql.push_str(&format!(" AND at >= ?{}", args.len()));
            }
            sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", filter.limit));
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn load_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        self.call(|conn| {
            let mut stmt =
                conn.prepare("SELECT name, labels, annotations FROM namespaces ORDER BY name")?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, Option<String>>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (name, labels, annotations) = row?;
                let parse = |s: Option<String>| -> Result<_, StoreError> {
                    s.map(|s| serde_json::from_str(&s))
                        .transpose()
                        .map_err(|e| StoreError::Corrupt(format!("namespace {name}: {e}")))
                };
                out.push(Namespace {
                    labels: parse(labels)?,
                    annotations: parse(annotations)?,
                    name,
                });
            }
            Ok(out)
        })
        .await
    }

    pub async fn put_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let ns = ns.clone();
        self.call(move |conn| {
            let labels = ns.labels.as_ref().map(|m| serde_json::to_string(m).unwrap_or_default());
            let annotations = ns
                .annotations
                .as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default());
            conn.execute(
                "INSERT INTO namespaces (name, labels, annotations) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, annotations = excluded.annotations",
                params![ns.name, labels, annotations],
            )?;
            Ok(())
        })
        .await
    }

    /// Deletes a namespace and the secrets that lived in it, in one transaction.
    pub async fn delete_namespace(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM namespaces WHERE name = ?1", params![name])?;
            tx.execute("DELETE FROM secrets WHERE namespace = ?1", params![name])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare("SELECT namespace, name, value FROM secrets ORDER BY namespace, name")?;
            let rows = stmt.query_map([], |row| {
                Ok(SecretRecord {
                    namespace: row.get(0)?,
                    name: row.get(1)?,
                    value: row.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn get_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretRecord>, StoreError> {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        self.call(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT namespace, name, value FROM secrets WHERE namespace = ?1 AND name = ?2",
                    params![namespace, name],
                    |row| {
                        Ok(SecretRecord {
                            namespace: row.get(0)?,
                            name: row.get(1)?,
                            value: row.get(2)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    pub async fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        let s = secret.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO secrets (namespace, name, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT(namespace, name) DO UPDATE SET value = excluded.value",
                params![s.namespace, s.name, s.value],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        self.call(move |conn| {
            let n = conn.execute(
                "DELETE FROM secrets WHERE namespace = ?1 AND name = ?2",
                params![namespace, name],
            )?;
            Ok(n > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_calls_wait_as_tasks_not_threads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.db")).unwrap();
        let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let calls = (0..300).map(|_| {
            let (store, threads) = (store.clone(), threads.clone());
            tokio::spawn(async move {
                store
                    .call(move |_| {
                        threads.lock().unwrap().insert(std::thread::current().id());
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        Ok(())
                    })
                    .await
            })
        });
        for call in futures::future::join_all(calls).await {
            call.unwrap().unwrap();
        }
        // Blocking threads are reused once idle, so a bounded queue needs only a few; callers
        // all waiting on threads would have needed one each. (A call can start before the
        // thread of the one it follows counts as idle, more often on a loaded machine, where
        // five threads were seen: a few more than the bound is not the failure looked for.)
        let used = threads.lock().unwrap().len();
        assert!(
            used <= WAITING_THREADS + 4,
            "{used} blocking threads ran 300 calls"
        );
    }

    #[tokio::test]
    async fn functions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let f = Function {
            id: FunctionId::new("figlet", "openfaas-fn"),
            deployment: FunctionDeployment {
                service: Some("figlet".into()),
                image: Some("img".into()),
                labels: Some(Default::default()),
                ..Default::default()
            },
            replicas: [("lon".to_string(), 3), ("syd".to_string(), 1)].into(),
            created_at: Utc::now(),
        };
        {
            let store = Store::open(&path).unwrap();
            store.put_function(&f).await.unwrap();
            let scaled = [("lon".to_string(), 4), ("syd".to_string(), 1)].into();
            store.set_desired_replicas(&f.id, &scaled).await.unwrap();
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.load_functions("home").await.unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            loaded[0].replicas,
            [("lon".to_string(), 4), ("syd".to_string(), 1)].into()
        );
        assert_eq!(loaded[0].deployment, f.deployment);
        assert!(store.delete_function(&f.id).await.unwrap());
        assert!(!store.delete_function(&f.id).await.unwrap());
    }

    /// A store written before datacenters existed opens with everything in the home one.
    #[tokio::test]
    async fn a_store_from_before_datacenters_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                r#"CREATE TABLE functions (namespace TEXT NOT NULL, name TEXT NOT NULL,
                     deployment TEXT NOT NULL, desired_replicas INTEGER NOT NULL,
                     created_at TEXT NOT NULL, PRIMARY KEY (namespace, name));
                   CREATE TABLE autoscale_state (namespace TEXT NOT NULL, name TEXT NOT NULL,
                     state TEXT NOT NULL, PRIMARY KEY (namespace, name));
                   INSERT INTO functions VALUES ('openfaas-fn', 'old', '{"service":"old"}', 3,
                     '2026-01-01T00:00:00Z');
                   INSERT INTO autoscale_state VALUES ('openfaas-fn', 'old', '{"stepping_down":true}');"#,
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let functions = store.load_functions("stage").await.unwrap();
        assert_eq!(functions[0].replicas, [("stage".to_string(), 3)].into());
        let states = store.load_autoscale_states("stage").await.unwrap();
        assert_eq!(states.len(), 1);
        assert_eq!(
            (states[0].1.as_str(), states[0].2.as_str()),
            ("stage", r#"{"stepping_down":true}"#)
        );
        drop(store);
        // Opening again changes nothing more.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.load_autoscale_states("stage").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn secrets_round_trip_and_namespace_delete_cascades() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        store
            .put_namespace(&Namespace {
                name: "dev".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let s = SecretRecord {
            namespace: "dev".into(),
            name: "api-key".into(),
            value: vec![0, 1, 2],
        };
        store.put_secret(&s).await.unwrap();
        assert_eq!(store.get_secret("dev", "api-key").await.unwrap(), Some(s));
        assert!(store.delete_namespace("dev").await.unwrap());
        assert!(store.list_secrets().await.unwrap().is_empty());
    }
}
