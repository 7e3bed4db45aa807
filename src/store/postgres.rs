//! The shared PostgreSQL store: several faastastic instances on one database. Every write
//! that others must see sends a notification on [`CHANNEL`] in its own transaction (delivered
//! on commit, never for a rolled-back write), and the schema is versioned: migrations run once,
//! under an advisory lock, however many instances start together.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;

use super::{
    map_json, namespace_from, placement_json, total_of, Backend, DesiredWith, EventFilter,
    EventRecord, Events, FunctionRow, InvocationRow, Note, PauseRow, SecretRecord, StoreError,
    INTERRUPTED_REASON,
};
use crate::config::StoreConfig;
use crate::model::{Function, FunctionId, Namespace};

/// The channel every change is announced on: `{"kind": ..., "namespace": ..., "name": ...}`.
pub const CHANNEL: &str = "faastastic_changes";

/// Held while migrating, so that instances starting together migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6661_6173_7473_6d31; // "faastsm1"

/// The schema, one entry per version, each applied once and in order.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r#"
CREATE TABLE namespaces (
    name        TEXT PRIMARY KEY,
    labels      TEXT,
    annotations TEXT
);
CREATE TABLE functions (
    namespace        TEXT NOT NULL,
    name             TEXT NOT NULL,
    deployment       TEXT NOT NULL,
    desired_replicas BIGINT NOT NULL,
    -- RFC 3339 with nanoseconds: it identifies a deployment, so it reads back exactly.
    created_at       TEXT NOT NULL,
    placement        TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE autoscale_states (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    datacenter TEXT NOT NULL,
    state      TEXT NOT NULL,
    PRIMARY KEY (namespace, name, datacenter)
);
CREATE TABLE scale_events (
    id         BIGSERIAL PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL,
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    datacenter TEXT NOT NULL,
    event      TEXT NOT NULL
);
CREATE INDEX scale_events_function ON scale_events (namespace, name, id);
CREATE TABLE autoscale_pauses (
    scope  TEXT PRIMARY KEY,
    since  TIMESTAMPTZ NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE trigger_state (
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    trigger   TEXT NOT NULL,
    last_due  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (namespace, name, trigger)
);
CREATE TABLE trigger_events (
    id         BIGSERIAL PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL,
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    datacenter TEXT NOT NULL,
    event      TEXT NOT NULL
);
CREATE INDEX trigger_events_function ON trigger_events (namespace, name, id);
CREATE TABLE secrets (
    namespace TEXT NOT NULL,
    name      TEXT NOT NULL,
    value     BYTEA NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE invocations (
    instance   TEXT NOT NULL,
    function   TEXT NOT NULL,
    datacenter TEXT NOT NULL,
    total      BIGINT NOT NULL,
    last_ms    BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (instance, function, datacenter)
);
CREATE INDEX invocations_updated ON invocations (updated_at);
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"#,
)];

/// What changed, as announced to the other instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A function's record or desired replicas (or its removal).
    Function,
    /// A function's autoscaler state in one datacenter.
    State,
    Pause,
    Namespace,
    Secret,
}

pub struct PostgresStore {
    pool: Pool,
    /// The leader lease's own connection.
    lease_pool: Pool,
    /// Bounds the decision locks held at once (see [`PostgresStore::connect`]).
    locks: Arc<tokio::sync::Semaphore>,
    /// Changes committed by any instance, from the listening connection.
    notes: tokio::sync::broadcast::Sender<Note>,
    /// This store's own mark on its announcements: its listener skips them (this instance
    /// already knows what it wrote).
    origin: String,
    /// The database's address without its password, for messages.
    shown: String,
}

fn unavailable(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => StoreError::Postgres(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Announces a change inside a transaction.
async fn notify(
    tx: &impl GenericClient,
    origin: &str,
    change: Change,
    namespace: &str,
    name: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&CHANNEL, &payload(origin, change, namespace, name)],
    )
    .await?;
    Ok(())
}

/// The text of an announcement.
fn payload(origin: &str, change: Change, namespace: &str, name: &str) -> String {
    serde_json::json!({"kind": change, "namespace": namespace, "name": name, "origin": origin})
        .to_string()
}

async fn insert_event(
    tx: &impl GenericClient,
    events: Events,
    namespace: &str,
    name: &str,
    e: &EventRecord,
) -> Result<i64, StoreError> {
    let sql = format!(
        "INSERT INTO {} (at, namespace, name, datacenter, event) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        events.table()
    );
    let row = tx
        .query_one(&sql, &[&e.at, &namespace, &name, &e.datacenter, &e.json])
        .await?;
    Ok(row.get(0))
}

/// Upserts a datacenter's engine state and inserts the event, inside a transaction.
async fn write_decision(
    tx: &impl GenericClient,
    origin: &str,
    id: &FunctionId,
    datacenter: &str,
    state_json: &str,
    event: Option<&EventRecord>,
) -> Result<Option<i64>, StoreError> {
    // One statement (one round trip, atomic on its own): the state, its announcement and the
    // event. A data-modifying WITH runs whatever follows; the announcement runs because the
    // final SELECT reads it.
    let announced = payload(origin, Change::State, &id.namespace, &id.name);
    let head = "WITH state AS (
           INSERT INTO autoscale_states (namespace, name, datacenter, state) VALUES ($1, $2, $3, $4)
           ON CONFLICT (namespace, name, datacenter) DO UPDATE SET state = excluded.state
           RETURNING 1
         ), announced AS (SELECT pg_notify($5, $6))";
    match event {
        Some(e) => {
            let row = tx
                .query_one(
                    &format!(
                        "{head} INSERT INTO scale_events (at, namespace, name, datacenter, event)
                         SELECT $7, $1, $2, $8, $9 FROM state, announced RETURNING id"
                    ),
                    &[
                        &id.namespace,
                        &id.name,
                        &datacenter,
                        &state_json,
                        &CHANNEL,
                        &announced,
                        &e.at,
                        &e.datacenter,
                        &e.json,
                    ],
                )
                .await?;
            Ok(Some(row.get(0)))
        }
        None => {
            tx.query_one(
                &format!("{head} SELECT 1 FROM state, announced"),
                &[
                    &id.namespace,
                    &id.name,
                    &datacenter,
                    &state_json,
                    &CHANNEL,
                    &announced,
                ],
            )
            .await?;
            Ok(None)
        }
    }
}

fn secret_of(row: &tokio_postgres::Row) -> SecretRecord {
    SecretRecord {
        namespace: row.get(0),
        name: row.get(1),
        value: row.get(2),
    }
}

/// The connection settings `[store]` describes: the URL, the password from its file and TLS.
pub fn pg_config(cfg: &StoreConfig) -> anyhow::Result<tokio_postgres::Config> {
    use anyhow::Context;
    let mut pg: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("store.url {}: {e}", cfg.redacted_url()))?;
    if let Some(path) = &cfg.password_file {
        let password = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read store.password_file {}", path.display()))?;
        let password = password.trim_end_matches(['\n', '\r']);
        anyhow::ensure!(
            !password.is_empty(),
            "store.password_file {} is empty",
            path.display()
        );
        pg.password(password);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("faastastic");
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(cfg.connect_timeout);
    }
    // A lock (a decision another instance is making, a lease row) is waited for this long at
    // most; then the statement fails and the caller answers or retries.
    let options = match pg.get_options() {
        Some(given) => format!("{given} -c lock_timeout=10s"),
        None => "-c lock_timeout=10s".to_string(),
    };
    pg.options(&options);
    if cfg.tls.is_some() {
        // Configured TLS is never given up for a plain connection.
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    Ok(pg)
}

/// Listens for changes on a connection of its own for as long as anyone subscribes, and
/// connects again when it is lost; every (re)connection starts with a [`Note::Resync`], since
/// what was committed meanwhile was not heard.
async fn listen<T>(
    pg: tokio_postgres::Config,
    tls: T,
    notes: tokio::sync::broadcast::Sender<Note>,
    listening: tokio::sync::oneshot::Sender<()>,
    origin: String,
) where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    use futures::StreamExt;
    let mut failing = false;
    let mut listening = Some(listening);
    loop {
        match pg.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
                let pump = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = message {
                            if heard.send(n.payload().to_string()).is_err() {
                                return;
                            }
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    if failing {
                        tracing::info!("store: listening for other instances' changes again");
                        failing = false;
                    }
                    let _ = notes.send(Note::Resync);
                    if let Some(listening) = listening.take() {
                        let _ = listening.send(());
                    }
                    while let Some(payload) = hearing.recv().await {
                        match serde_json::from_str::<Payload>(&payload) {
                            Ok(p) if p.origin == origin => {}
                            Ok(p) => {
                                let _ = notes.send(Note::Changed {
                                    kind: p.kind,
                                    namespace: p.namespace,
                                    name: p.name,
                                });
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "store: an unreadable change notification")
                            }
                        }
                    }
                }
                pump.abort();
                if !failing {
                    tracing::warn!("store: the connection listening for other instances' changes was lost; connecting again");
                    failing = true;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "store: cannot listen for other instances' changes; trying again every second");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[derive(serde::Deserialize)]
struct Payload {
    kind: Change,
    namespace: String,
    name: String,
    #[serde(default)]
    origin: String,
}

/// An advisory lock held on a pooled connection, released (and the connection returned) when
/// dropped.
struct Advisory {
    client: Option<deadpool_postgres::Object>,
    key: i64,
    /// Given back once the connection is back in the pool.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Advisory {
    fn drop(&mut self) {
        let (Some(client), key, permit) = (self.client.take(), self.key, self.permit.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to release it on: the connection closes, and the lock with it.
            drop(deadpool_postgres::Object::take(client));
            return;
        };
        runtime.spawn(async move {
            if client
                .execute("SELECT pg_advisory_unlock($1)", &[&key])
                .await
                .is_err()
            {
                // Not released: the connection must not go back to the pool holding it.
                drop(deadpool_postgres::Object::take(client));
            }
            drop(permit);
        });
    }
}

/// A lock key's number: the first 8 bytes of its SHA-256.
fn lock_key(key: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("a digest has 32 bytes"))
}

impl PostgresStore {
    /// The functions a `WHERE` clause selects, in order.
    async fn functions_where(
        &self,
        clause: &str,
        args: &[&(dyn ToSql + Sync)],
        home: &str,
    ) -> Result<Vec<Function>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT namespace, name, deployment, desired_replicas, created_at, placement
                     FROM functions {clause} ORDER BY namespace, name"
                ),
                args,
            )
            .await?;
        rows.into_iter()
            .map(|row| {
                let (namespace, name): (String, String) = (row.get(0), row.get(1));
                let created_at: String = row.get(4);
                let created_at = DateTime::parse_from_rfc3339(&created_at)
                    .map_err(|e| StoreError::Corrupt(format!("function {name}.{namespace}: {e}")))?
                    .with_timezone(&Utc);
                FunctionRow {
                    namespace,
                    name,
                    deployment: row.get(2),
                    desired_replicas: row.get(3),
                    created_at,
                    placement: Some(row.get(5)),
                }
                .into_function(home)
            })
            .collect()
    }

    /// Connects to the database and brings its schema up to date.
    pub async fn connect(cfg: &StoreConfig) -> anyhow::Result<PostgresStore> {
        let pg = pg_config(cfg)?;
        let manager_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let (notes, _) = tokio::sync::broadcast::channel(4096);
        let (listening, heard) = tokio::sync::oneshot::channel();
        let origin = format!("{:016x}", rand::random::<u64>());
        // Two pools: the lease's renewals never wait behind decisions holding connections.
        let (manager, lease_manager) = match &cfg.tls {
            Some(tls) => {
                let client = tls
                    .config()
                    .map_err(|e| anyhow::anyhow!("[store.tls]: {e:#}"))?;
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client);
                tokio::spawn(listen(
                    pg.clone(),
                    tls.clone(),
                    notes.clone(),
                    listening,
                    origin.clone(),
                ));
                (
                    Manager::from_config(pg.clone(), tls.clone(), manager_cfg.clone()),
                    Manager::from_config(pg, tls, manager_cfg),
                )
            }
            None => {
                tokio::spawn(listen(
                    pg.clone(),
                    tokio_postgres::NoTls,
                    notes.clone(),
                    listening,
                    origin.clone(),
                ));
                (
                    Manager::from_config(pg.clone(), tokio_postgres::NoTls, manager_cfg.clone()),
                    Manager::from_config(pg, tokio_postgres::NoTls, manager_cfg),
                )
            }
        };
        let build = |manager, size| {
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(cfg.connect_timeout))
                .create_timeout(Some(cfg.connect_timeout))
                .recycle_timeout(Some(cfg.connect_timeout))
                .build()
                .map_err(|e| anyhow::anyhow!("store: {e}"))
        };
        let pool = build(manager, cfg.pool_size)?;
        let lease_pool = build(lease_manager, 1)?;
        let store = PostgresStore {
            pool,
            lease_pool,
            // A decision holds a connection for its lock and needs one more at a time for
            // its reads and writes: at most half the pool is held by locks.
            locks: Arc::new(tokio::sync::Semaphore::new((cfg.pool_size / 2).max(1))),
            notes,
            origin,
            shown: cfg.redacted_url(),
        };
        store
            .migrate()
            .await
            .map_err(|e| anyhow::anyhow!("cannot use the database {}: {e}", store.shown))?;
        // Listening before anything is read, so that no change made meanwhile goes unheard.
        if tokio::time::timeout(cfg.connect_timeout, heard)
            .await
            .is_err()
        {
            tracing::warn!("store: not listening for other instances' changes yet; they are read every few seconds meanwhile");
        }
        Ok(store)
    }

    /// The database's address without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Applies the migrations this database has not had yet, one instance at a time.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let current: Option<i32> = tx
            .query_one("SELECT max(version) FROM schema_migrations", &[])
            .await?
            .get(0);
        let current = current.unwrap_or(0);
        let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > newest {
            return Err(StoreError::Corrupt(format!(
                "the database's schema is version {current}, newer than this faastastic's {newest}: upgrade faastastic"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "database schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl Backend for PostgresStore {
    async fn load_functions(&self, home: &str) -> Result<Vec<Function>, StoreError> {
        self.functions_where("", &[], home).await
    }

    async fn load_function(
        &self,
        id: &FunctionId,
        home: &str,
    ) -> Result<Option<Function>, StoreError> {
        let mut found = self
            .functions_where(
                "WHERE namespace = $1 AND name = $2",
                &[&id.namespace, &id.name],
                home,
            )
            .await?;
        Ok(found.pop())
    }

    async fn load_state(
        &self,
        id: &FunctionId,
        datacenter: &str,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT state FROM autoscale_states WHERE namespace = $1 AND name = $2 AND datacenter = $3",
                &[&id.namespace, &id.name, &datacenter],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn lock(&self, key: &str) -> Result<Option<super::Guard>, StoreError> {
        let permit = self
            .locks
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let client = self.client().await?;
        let key = lock_key(key);
        // Taken by a task of its own: a caller that gives up waiting (a client that went
        // away) must not leave the lock taken on a connection back in the pool.
        let (took, taken) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let taking = client.execute("SELECT pg_advisory_lock($1)", &[&key]).await;
            let result = taking.map(|_| Advisory {
                client: Some(client),
                key,
                permit: Some(permit),
            });
            // Not wanted any more: dropped, which releases it.
            let _ = took.send(result);
        });
        let held = taken.await.map_err(|e| StoreError::Join(e.to_string()))??;
        Ok(Some(super::Guard(Box::new(held))))
    }

    async fn publish_invocations(
        &self,
        instance: &str,
        rows: Vec<InvocationRow>,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let functions: Vec<&str> = rows.iter().map(|r| r.function.as_str()).collect();
        let datacenters: Vec<&str> = rows.iter().map(|r| r.datacenter.as_str()).collect();
        let totals: Vec<i64> = rows
            .iter()
            .map(|r| r.total.min(i64::MAX as u64) as i64)
            .collect();
        let lasts: Vec<i64> = rows.iter().map(|r| r.last_ms).collect();
        let started = rows[0].started_ms;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO invocations (instance, function, datacenter, total, last_ms, started_ms, updated_at)
                 SELECT $1, f, d, t, l, $6, clock_timestamp()
                 FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS u (f, d, t, l)
                 ON CONFLICT (instance, function, datacenter) DO UPDATE SET
                   total = excluded.total, last_ms = excluded.last_ms, updated_at = excluded.updated_at",
                &[&instance, &functions, &datacenters, &totals, &lasts, &started],
            )
            .await?;
        Ok(())
    }

    async fn others_invocations(
        &self,
        instance: &str,
    ) -> Result<Vec<(String, InvocationRow)>, StoreError> {
        let client = self.client().await?;
        // Counters not updated for a week are dropped (their instances are long gone).
        client
            .execute(
                "DELETE FROM invocations WHERE updated_at < clock_timestamp() - interval '7 days'",
                &[],
            )
            .await?;
        let rows = client
            .query(
                "SELECT instance, function, datacenter, total, last_ms, started_ms FROM invocations
                 WHERE instance <> $1",
                &[&instance],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let row = InvocationRow {
                    function: r.get(1),
                    datacenter: r.get(2),
                    total: r.get::<_, i64>(3).max(0) as u64,
                    last_ms: r.get(4),
                    started_ms: r.get(5),
                };
                (r.get(0), row)
            })
            .collect())
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<Note>> {
        Some(self.notes.subscribe())
    }

    async fn put_function(&self, function: &Function) -> Result<(), StoreError> {
        let deployment = serde_json::to_string(&function.deployment)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let placement = placement_json(&function.replicas)?;
        let (id, total) = (&function.id, total_of(&function.replicas));
        let created_at = function.created_at.to_rfc3339();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO functions (namespace, name, deployment, desired_replicas, created_at, placement)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (namespace, name) DO UPDATE SET
               deployment = excluded.deployment,
               desired_replicas = excluded.desired_replicas,
               created_at = excluded.created_at,
               placement = excluded.placement",
            &[&id.namespace, &id.name, &deployment, &total, &created_at, &placement],
        )
        .await?;
        notify(&tx, &self.origin, Change::Function, &id.namespace, &id.name).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn write_desired(
        &self,
        id: &FunctionId,
        replicas: &BTreeMap<String, u64>,
        with: Option<DesiredWith>,
    ) -> Result<Option<i64>, StoreError> {
        let placement = placement_json(replicas)?;
        let total = total_of(replicas);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE functions SET desired_replicas = $3, placement = $4 WHERE namespace = $1 AND name = $2",
            &[&id.namespace, &id.name, &total, &placement],
        )
        .await?;
        notify(&tx, &self.origin, Change::Function, &id.namespace, &id.name).await?;
        let event_id = match with {
            Some(DesiredWith::Record(d)) => {
                if let Some(token) = d.fence {
                    // Locks the lease row against a takeover until this commits.
                    let held = tx
                        .query_opt(
                            "SELECT 1 FROM leases WHERE name = $1 AND token = $2
                               AND expires_at > clock_timestamp() FOR SHARE",
                            &[&super::lease::LEADER_LEASE, &token],
                        )
                        .await?;
                    if held.is_none() {
                        return Err(StoreError::Deposed(token));
                    }
                }
                write_decision(
                    &tx,
                    &self.origin,
                    id,
                    &d.datacenter,
                    &d.state_json,
                    Some(&d.event),
                )
                .await?
            }
            Some(DesiredWith::Undo(d, event_id)) => {
                write_decision(
                    &tx,
                    &self.origin,
                    id,
                    &d.datacenter,
                    &d.previous_state_json,
                    None,
                )
                .await?;
                tx.execute("DELETE FROM scale_events WHERE id = $1", &[&event_id])
                    .await?;
                None
            }
            None => None,
        };
        tx.commit().await?;
        Ok(event_id)
    }

    async fn delete_function(&self, id: &FunctionId) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut n = 0;
        for table in ["functions", "autoscale_states", "trigger_state"] {
            let deleted = tx
                .execute(
                    &format!("DELETE FROM {table} WHERE namespace = $1 AND name = $2"),
                    &[&id.namespace, &id.name],
                )
                .await?;
            if table == "functions" {
                n = deleted;
            }
        }
        notify(&tx, &self.origin, Change::Function, &id.namespace, &id.name).await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn load_autoscale_states(
        &self,
        _home: &str,
    ) -> Result<Vec<(FunctionId, String, String)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT namespace, name, datacenter, state FROM autoscale_states",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    FunctionId::new(row.get::<_, String>(1), row.get::<_, String>(0)),
                    row.get(2),
                    row.get(3),
                )
            })
            .collect())
    }

    async fn record_decision(
        &self,
        id: &FunctionId,
        datacenter: &str,
        state_json: String,
        event: Option<EventRecord>,
    ) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        write_decision(
            &client,
            &self.origin,
            id,
            datacenter,
            &state_json,
            event.as_ref(),
        )
        .await
    }

    async fn load_pauses(&self) -> Result<Vec<PauseRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT scope, since, reason FROM autoscale_pauses", &[])
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect())
    }

    async fn set_pause(
        &self,
        scope: &str,
        pause: Option<(DateTime<Utc>, String)>,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = match pause {
            Some((since, reason)) => {
                tx.execute(
                    "INSERT INTO autoscale_pauses (scope, since, reason) VALUES ($1, $2, $3)
                     ON CONFLICT (scope) DO NOTHING",
                    &[&scope, &since, &reason],
                )
                .await?
            }
            None => {
                tx.execute("DELETE FROM autoscale_pauses WHERE scope = $1", &[&scope])
                    .await?
            }
        };
        notify(&tx, &self.origin, Change::Pause, "", scope).await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn append_event(
        &self,
        events: Events,
        namespace: &str,
        name: &str,
        event: EventRecord,
    ) -> Result<i64, StoreError> {
        let client = self.client().await?;
        insert_event(&client, events, namespace, name, &event).await
    }

    async fn amend(&self, events: Events, id: i64, json: String) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                &format!("UPDATE {} SET event = $2 WHERE id = $1", events.table()),
                &[&id, &json],
            )
            .await?;
        Ok(())
    }

    async fn prune_older(
        &self,
        events: Events,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let table = events.table();
        let client = self.client().await?;
        Ok(client
            .execute(
                &format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM
                        (SELECT id, at FROM {table} ORDER BY id LIMIT $2) AS oldest WHERE at < $1)"
                ),
                &[&before, &i64::from(batch)],
            )
            .await?)
    }

    async fn over_bound(
        &self,
        events: Events,
        keep: u64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let table = events.table();
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT namespace, name,
                        (SELECT id FROM {table} AS e WHERE e.namespace = g.namespace
                         AND e.name = g.name ORDER BY id DESC LIMIT 1 OFFSET $1)
                     FROM {table} AS g GROUP BY namespace, name HAVING COUNT(*) > $1"
                ),
                &[&keep],
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| Some((row.get(0), row.get(1), row.get::<_, Option<i64>>(2)?)))
            .collect())
    }

    async fn prune_function(
        &self,
        events: Events,
        namespace: &str,
        name: &str,
        through: i64,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let table = events.table();
        let client = self.client().await?;
        Ok(client
            .execute(
                &format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM {table}
                        WHERE namespace = $1 AND name = $2 AND id <= $3
                            AND (event::jsonb ->> 'outcome') IS DISTINCT FROM 'running'
                        ORDER BY id LIMIT $4)"
                ),
                &[&namespace, &name, &through, &i64::from(batch)],
            )
            .await?)
    }

    async fn events(
        &self,
        events: Events,
        filter: EventFilter,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let mut sql = format!("SELECT id, event FROM {} WHERE true", events.table());
        let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (column, value) in [
            ("name", &filter.name),
            ("namespace", &filter.namespace),
            ("datacenter", &filter.datacenter),
        ] {
            if let Some(v) = value {
                args.push(v);
                sql.push_str(&format!(" AND {column} = ${}", args.len()));
            }
        }
        if let Some(since) = &filter.since {
            args.push(since);
            sql.push_str(&format!(" AND at >= ${}", args.len()));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", filter.limit));
        let client = self.client().await?;
        let rows = client.query(&sql, &args).await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    async fn trigger_due_times(
        &self,
        trigger: &str,
    ) -> Result<Vec<(FunctionId, DateTime<Utc>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT namespace, name, last_due FROM trigger_state WHERE trigger = $1",
                &[&trigger],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    FunctionId::new(row.get::<_, String>(1), row.get::<_, String>(0)),
                    row.get(2),
                )
            })
            .collect())
    }

    async fn clear_trigger(&self, id: &FunctionId, trigger: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM trigger_state WHERE namespace = $1 AND name = $2 AND trigger = $3",
                &[&id.namespace, &id.name, &trigger],
            )
            .await?;
        Ok(())
    }

    async fn record_trigger(
        &self,
        id: &FunctionId,
        trigger: &str,
        due: DateTime<Utc>,
        event: EventRecord,
    ) -> Result<i64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO trigger_state (namespace, name, trigger, last_due) VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, name, trigger) DO UPDATE SET last_due = excluded.last_due",
            &[&id.namespace, &id.name, &trigger, &due],
        )
        .await?;
        let row = insert_event(&tx, Events::Trigger, &id.namespace, &id.name, &event).await?;
        tx.commit().await?;
        Ok(row)
    }

    async fn interrupt_trigger_runs(&self) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE trigger_events
                 SET event = (event::jsonb || jsonb_build_object('outcome', 'interrupted', 'reason', $1::text))::text
                 WHERE event::jsonb ->> 'outcome' = 'running'",
                &[&INTERRUPTED_REASON],
            )
            .await?;
        Ok(n as usize)
    }

    async fn load_namespaces(&self) -> Result<Vec<Namespace>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, labels, annotations FROM namespaces ORDER BY name",
                &[],
            )
            .await?;
        rows.into_iter()
            .map(|row| namespace_from(row.get(0), row.get(1), row.get(2)))
            .collect()
    }

    async fn put_namespace(&self, ns: &Namespace) -> Result<(), StoreError> {
        let (labels, annotations) = (map_json(&ns.labels), map_json(&ns.annotations));
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO namespaces (name, labels, annotations) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET labels = excluded.labels, annotations = excluded.annotations",
            &[&ns.name, &labels, &annotations],
        )
        .await?;
        notify(&tx, &self.origin, Change::Namespace, &ns.name, "").await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_namespace(&self, name: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute("DELETE FROM namespaces WHERE name = $1", &[&name])
            .await?;
        tx.execute("DELETE FROM secrets WHERE namespace = $1", &[&name])
            .await?;
        notify(&tx, &self.origin, Change::Namespace, name, "").await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT namespace, name, value FROM secrets ORDER BY namespace, name",
                &[],
            )
            .await?;
        Ok(rows.iter().map(secret_of).collect())
    }

    async fn get_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT namespace, name, value FROM secrets WHERE namespace = $1 AND name = $2",
                &[&namespace, &name],
            )
            .await?;
        Ok(row.as_ref().map(secret_of))
    }

    async fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO secrets (namespace, name, value) VALUES ($1, $2, $3)
             ON CONFLICT (namespace, name) DO UPDATE SET value = excluded.value",
            &[&secret.namespace, &secret.name, &secret.value],
        )
        .await?;
        notify(
            &tx,
            &self.origin,
            Change::Secret,
            &secret.namespace,
            &secret.name,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<i64>, StoreError> {
        let client = self.lease_pool.get().await.map_err(unavailable)?;
        let row = client
            .query_opt(
                "INSERT INTO leases (name, holder, token, expires_at)
                 VALUES ($1, $2, 1, clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (name) DO UPDATE SET
                   holder = excluded.holder,
                   token = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > clock_timestamp()
                                THEN leases.token ELSE leases.token + 1 END,
                   expires_at = excluded.expires_at
                 WHERE leases.holder = excluded.holder OR leases.expires_at <= clock_timestamp()
                 RETURNING token",
                &[&name, &holder, &ttl.as_secs_f64()],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let client = self.lease_pool.get().await.map_err(unavailable)?;
        client
            .execute(
                "UPDATE leases SET expires_at = clock_timestamp() WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
            .await?;
        Ok(())
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<(String, i64)>, StoreError> {
        let client = self.lease_pool.get().await.map_err(unavailable)?;
        let row = client
            .query_opt(
                "SELECT holder, token FROM leases WHERE name = $1 AND expires_at > clock_timestamp()",
                &[&name],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute(
                "DELETE FROM secrets WHERE namespace = $1 AND name = $2",
                &[&namespace, &name],
            )
            .await?;
        notify(&tx, &self.origin, Change::Secret, namespace, name).await?;
        tx.commit().await?;
        Ok(n > 0)
    }
}
