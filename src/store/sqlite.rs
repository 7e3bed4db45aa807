//! The embedded SQLite store: one file in the data directory, for one instance.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    map_json, namespace_from, placement_json, total_of, Backend, DesiredWith, EventFilter,
    EventRecord, Events, FunctionRow, PauseRow, SecretRecord, StoreError, INTERRUPTED_REASON,
};
use crate::model::{Function, FunctionId, Namespace};

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
        Some(e) => Ok(Some(insert_event(
            tx,
            Events::Scale,
            &id.namespace,
            &id.name,
            e,
        )?)),
        None => Ok(None),
    }
}

/// Appends an event to its table; returns its id.
fn insert_event(
    conn: &Connection,
    events: Events,
    namespace: &str,
    name: &str,
    e: &EventRecord,
) -> rusqlite::Result<i64> {
    conn.execute(
        &format!(
            "INSERT INTO {} (at, namespace, name, datacenter, event) VALUES (?1, ?2, ?3, ?4, ?5)",
            events.table()
        ),
        params![e.at.to_rfc3339(), namespace, name, e.datacenter, e.json],
    )?;
    Ok(conn.last_insert_rowid())
}

fn parse_time(text: &str, what: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A row's first three columns, as text.
fn three_texts(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

fn secret_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SecretRecord> {
    Ok(SecretRecord {
        namespace: row.get(0)?,
        name: row.get(1)?,
        value: row.get(2)?,
    })
}

pub struct SqliteStore {
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

impl SqliteStore {
    /// Opens (creating if needed) the database file, owner-only readable since it holds secrets.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
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
        Ok(SqliteStore {
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
}

impl SqliteStore {
    /// The functions a `WHERE` clause selects, in order.
    async fn functions_where(
        &self,
        clause: &'static str,
        args: Vec<String>,
        home: &str,
    ) -> Result<Vec<Function>, StoreError> {
        let home = home.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT namespace, name, deployment, desired_replicas, created_at, placement FROM functions {clause} ORDER BY namespace, name"
            ))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |row| {
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
                let (namespace, name, deployment, desired_replicas, created_at, placement) = row?;
                let created_at = parse_time(&created_at, &format!("function {name}.{namespace}"))?;
                let row = FunctionRow {
                    namespace,
                    name,
                    deployment,
                    desired_replicas,
                    created_at,
                    placement,
                };
                out.push(row.into_function(&home)?);
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl Backend for SqliteStore {
    async fn load_functions(&self, home: &str) -> Result<Vec<Function>, StoreError> {
        self.functions_where("", Vec::new(), home).await
    }

    async fn load_function(
        &self,
        id: &FunctionId,
        home: &str,
    ) -> Result<Option<Function>, StoreError> {
        let args = vec![id.namespace.clone(), id.name.clone()];
        let mut found = self
            .functions_where("WHERE namespace = ?1 AND name = ?2", args, home)
            .await?;
        Ok(found.pop())
    }

    async fn load_state(
        &self,
        id: &FunctionId,
        datacenter: &str,
    ) -> Result<Option<String>, StoreError> {
        let (id, datacenter) = (id.clone(), datacenter.to_string());
        self.call(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT state FROM autoscale_states WHERE namespace = ?1 AND name = ?2 AND datacenter = ?3",
                    params![id.namespace, id.name, datacenter],
                    |row| row.get(0),
                )
                .optional()?)
        })
        .await
    }

    async fn put_function(&self, function: &Function) -> Result<(), StoreError> {
        let deployment = serde_json::to_string(&function.deployment)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let placement = placement_json(&function.replicas)?;
        let id = function.id.clone();
        let total = total_of(&function.replicas);
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

    async fn write_desired(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
        with: Option<DesiredWith>,
    ) -> Result<Option<i64>, StoreError> {
        let id = id.clone();
        let placement = placement_json(replicas)?;
        let total = total_of(replicas);
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

    async fn delete_function(&self, id: &FunctionId) -> Result<bool, StoreError> {
        let id = id.clone();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let mut n = 0;
            for table in ["functions", "autoscale_states", "trigger_state"] {
                let deleted = tx.execute(
                    &format!("DELETE FROM {table} WHERE namespace = ?1 AND name = ?2"),
                    params![id.namespace, id.name],
                )?;
                if table == "functions" {
                    n = deleted;
                }
            }
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    async fn load_autoscale_states(
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

    async fn record_decision(
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

    async fn load_pauses(&self) -> Result<Vec<PauseRow>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT scope, since, reason FROM autoscale_pauses")?;
            let rows = stmt.query_map([], three_texts)?;
            let mut out = Vec::new();
            for row in rows {
                let (scope, since, reason) = row?;
                let since = parse_time(&since, &format!("pause {scope}"))?;
                out.push((scope, since, reason));
            }
            Ok(out)
        })
        .await
    }

    async fn set_pause(
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

    async fn append_event(
        &self,
        events: Events,
        namespace: &str,
        name: &str,
        event: EventRecord,
    ) -> Result<i64, StoreError> {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        self.call(move |conn| Ok(insert_event(conn, events, &namespace, &name, &event)?))
            .await
    }

    async fn amend(&self, events: Events, id: i64, json: String) -> Result<(), StoreError> {
        self.call(move |conn| {
            conn.execute(
                &format!("UPDATE {} SET event = ?2 WHERE id = ?1", events.table()),
                params![id, json],
            )?;
            Ok(())
        })
        .await
    }

    async fn prune_older(
        &self,
        events: Events,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, StoreError> {
        self.call(move |conn| {
            // Times are stored as RFC 3339 text in UTC, which sorts as the times do.
            let table = events.table();
            let n = conn.execute(
                &format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM
                        (SELECT id, at FROM {table} ORDER BY id LIMIT ?2) WHERE at < ?1)"
                ),
                params![before.to_rfc3339(), batch],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn over_bound(
        &self,
        events: Events,
        keep: u64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.call(move |conn| {
            let table = events.table();
            let over: Vec<(String, String)> = conn
                .prepare(&format!(
                    "SELECT namespace, name FROM {table} GROUP BY namespace, name
                     HAVING COUNT(*) > ?1"
                ))?
                .query_map(params![keep], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut found = Vec::new();
            for (namespace, name) in over {
                let through: Option<i64> = conn
                    .query_row(
                        &format!(
                            "SELECT id FROM {table} WHERE namespace = ?1 AND name = ?2
                             ORDER BY id DESC LIMIT 1 OFFSET ?3"
                        ),
                        params![namespace, name, keep],
                        |row| row.get(0),
                    )
                    .optional()?;
                if let Some(through) = through {
                    found.push((namespace, name, through));
                }
            }
            Ok(found)
        })
        .await
    }

    async fn prune_function(
        &self,
        events: Events,
        namespace: &str,
        name: &str,
        through: i64,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        self.call(move |conn| {
            let table = events.table();
            let n = conn.execute(
                &format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM {table}
                        WHERE namespace = ?1 AND name = ?2 AND id <= ?3
                            AND json_extract(event, '$.outcome') IS NOT 'running'
                        ORDER BY id LIMIT ?4)"
                ),
                params![namespace, name, through, batch],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn events(
        &self,
        events: Events,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.call(move |conn| {
            let mut sql = format!("SELECT id, event FROM {} WHERE 1 = 1", events.table());
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

    async fn trigger_due_times(
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
                let due = parse_time(&due, "trigger_state.last_due")?;
                out.push((FunctionId::new(name, namespace), due));
            }
            Ok(out)
        })
        .await
    }

    async fn clear_trigger(&self, id: &FunctionId, trigger: &str) -> Result<(), StoreError> {
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

    async fn record_trigger(
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
            let row = insert_event(&tx, Events::Trigger, &id.namespace, &id.name, &event)?;
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    async fn interrupt_trigger_runs(&self) -> Result<usize, StoreError> {
        self.call(|conn| {
            Ok(conn.execute(
                "UPDATE trigger_events SET event = json_set(event, '$.outcome', 'interrupted',
                   '$.reason', ?1)
                 WHERE json_extract(event, '$.outcome') = 'running'",
                params![INTERRUPTED_REASON],
            )?)
        })
        .await
    }

    async fn load_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
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
                out.push(namespace_from(name, labels, annotations)?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let (name, labels, annotations) = (
            ns.name.clone(),
            map_json(&ns.labels),
            map_json(&ns.annotations),
        );
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO namespaces (name, labels, annotations) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET labels = excluded.labels, annotations = excluded.annotations",
                params![name, labels, annotations],
            )?;
            Ok(())
        })
        .await
    }

    async fn delete_namespace(&self, name: &str) -> Result<bool, StoreError> {
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

    async fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare("SELECT namespace, name, value FROM secrets ORDER BY namespace, name")?;
            let rows = stmt.query_map([], secret_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn get_secret(
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
                    secret_row,
                )
                .optional()?)
        })
        .await
    }

    async fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
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

    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
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
    use crate::store::Store;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_calls_wait_as_tasks_not_threads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("q.db")).unwrap());
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
}
