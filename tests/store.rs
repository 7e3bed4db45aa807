//! One suite, two stores: every case runs against the embedded SQLite file and against a real
//! PostgreSQL server (Debian's, started here on a free loopback port), and both must behave
//! the same. Then what only the shared database does: versioned migrations when several
//! instances start at once, change notifications, and its failures named at start.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use faastastic::config::StoreConfig;
use faastastic::model::{Function, FunctionDeployment, FunctionId, Namespace};
use faastastic::store::{Decision, EventFilter, EventRecord, PostgresStore, SecretRecord, Store};

use common::postgres::Postgres;

/// A store of each kind, and what keeps it alive.
enum Kind {
    Sqlite(tempfile::TempDir),
    Postgres(Postgres),
}

impl Kind {
    async fn open(&self) -> Store {
        match self {
            Kind::Sqlite(dir) => Store::open(&dir.path().join("state.db")).unwrap(),
            Kind::Postgres(pg) => {
                let cfg = StoreConfig::new(&pg.url("faastastic"));
                Store::new(Arc::new(PostgresStore::connect(&cfg).await.unwrap()))
            }
        }
    }
}

fn sqlite() -> Kind {
    Kind::Sqlite(tempfile::tempdir().unwrap())
}

fn postgres() -> Kind {
    Kind::Postgres(Postgres::start())
}

/// Runs one case against each store.
macro_rules! both {
    ($case:ident) => {
        mod $case {
            #[tokio::test]
            async fn sqlite() {
                super::$case(super::sqlite()).await;
            }
            #[tokio::test]
            async fn postgres() {
                super::$case(super::postgres()).await;
            }
        }
    };
}

fn function(name: &str, replicas: &[(&str, u64)]) -> Function {
    Function {
        id: FunctionId::new(name, "openfaas-fn"),
        deployment: FunctionDeployment {
            service: Some(name.into()),
            image: Some("img:1".into()),
            labels: Some([("com.openfaas.scale.max".to_string(), "4".to_string())].into()),
            ..Default::default()
        },
        replicas: replicas.iter().map(|(d, n)| (d.to_string(), *n)).collect(),
        // Nanoseconds: a deployment is told apart by this, so it must read back exactly.
        created_at: Utc.timestamp_opt(1_790_000_000, 123_456_789).unwrap(),
    }
}

fn event(at: DateTime<Utc>, dc: &str, text: &str) -> EventRecord {
    EventRecord {
        at,
        datacenter: dc.to_string(),
        json: serde_json::json!({ "text": text }).to_string(),
    }
}

fn all_events(limit: u32) -> EventFilter {
    EventFilter {
        name: None,
        namespace: None,
        datacenter: None,
        since: None,
        limit,
    }
}

fn texts(rows: &[(i64, String)]) -> Vec<String> {
    rows.iter()
        .map(|(_, json)| {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            v["text"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

both!(functions_round_trip_and_survive_reopening);
async fn functions_round_trip_and_survive_reopening(kind: Kind) {
    let store = kind.open().await;
    let f = function("figlet", &[("lon", 3), ("syd", 1)]);
    store.put_function(&f).await.unwrap();
    store
        .put_function(&function("alpha", &[("lon", 0)]))
        .await
        .unwrap();
    let scaled: BTreeMap<String, u64> = [("lon".to_string(), 4), ("syd".to_string(), 1)].into();
    store.set_desired_replicas(&f.id, &scaled).await.unwrap();
    drop(store);

    let store = kind.open().await;
    let loaded = store.load_functions("home").await.unwrap();
    let names: Vec<&str> = loaded.iter().map(|f| f.id.name.as_str()).collect();
    assert_eq!(names, ["alpha", "figlet"], "ordered by namespace and name");
    let figlet = &loaded[1];
    assert_eq!(figlet.replicas, scaled);
    assert_eq!(figlet.deployment, f.deployment);
    assert_eq!(
        figlet.created_at, f.created_at,
        "createdAt to the nanosecond"
    );

    // A whole record replaced.
    let mut updated = f.clone();
    updated.deployment.image = Some("img:2".into());
    store.put_function(&updated).await.unwrap();
    let loaded = store.load_functions("home").await.unwrap();
    assert_eq!(loaded[1].deployment.image.as_deref(), Some("img:2"));

    assert!(store.delete_function(&f.id).await.unwrap());
    assert!(!store.delete_function(&f.id).await.unwrap(), "already gone");
    assert_eq!(store.load_functions("home").await.unwrap().len(), 1);
}

both!(a_decision_is_stored_with_its_replicas_and_undone_whole);
async fn a_decision_is_stored_with_its_replicas_and_undone_whole(kind: Kind) {
    let store = kind.open().await;
    let f = function("api", &[("lon", 1)]);
    store.put_function(&f).await.unwrap();
    store
        .record_decision(&f.id, "lon", r#"{"n":1}"#.into(), None)
        .await
        .unwrap();
    let at = Utc::now();
    let decision = Decision {
        datacenter: "lon".into(),
        state_json: r#"{"n":2}"#.into(),
        previous_state_json: r#"{"n":1}"#.into(),
        event: event(at, "lon", "up 1 -> 4"),
        fence: None,
    };
    let four: BTreeMap<String, u64> = [("lon".to_string(), 4)].into();
    let id = store
        .set_desired_with(&f.id, &four, Some(&decision))
        .await
        .unwrap()
        .expect("an event id");
    assert_eq!(
        store.load_functions("home").await.unwrap()[0].replicas,
        four
    );
    let states = store.load_autoscale_states("home").await.unwrap();
    assert_eq!(
        states,
        vec![(f.id.clone(), "lon".to_string(), r#"{"n":2}"#.to_string())]
    );
    let events = store.scale_events(all_events(10)).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, id);

    // The platform refused: replicas, state and event all go back.
    let one: BTreeMap<String, u64> = [("lon".to_string(), 1)].into();
    store
        .revert_desired(&f.id, &one, Some((&decision, id)))
        .await
        .unwrap();
    assert_eq!(store.load_functions("home").await.unwrap()[0].replicas, one);
    let states = store.load_autoscale_states("home").await.unwrap();
    assert_eq!(states[0].2, r#"{"n":1}"#);
    assert!(store.scale_events(all_events(10)).await.unwrap().is_empty());

    // Deleting the function forgets its state but keeps its audit trail.
    store
        .record_event(&f.id, event(at, "lon", "manual"))
        .await
        .unwrap();
    store.delete_function(&f.id).await.unwrap();
    assert!(store
        .load_autoscale_states("home")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        texts(&store.scale_events(all_events(10)).await.unwrap()),
        ["manual"]
    );
}

both!(events_are_filtered_ordered_limited_and_amended);
async fn events_are_filtered_ordered_limited_and_amended(kind: Kind) {
    let store = kind.open().await;
    let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    let a = FunctionId::new("a", "openfaas-fn");
    let b = FunctionId::new("b", "dev");
    for (i, (id, dc)) in [(&a, "lon"), (&b, "lon"), (&a, "syd"), (&a, "lon")]
        .into_iter()
        .enumerate()
    {
        let at = t0 + Duration::minutes(i as i64);
        store
            .record_event(id, event(at, dc, &format!("e{i}")))
            .await
            .unwrap();
    }
    store
        .record_source_event(
            "",
            "",
            "",
            t0 + Duration::minutes(9),
            r#"{"text":"source"}"#.into(),
        )
        .await
        .unwrap();
    let all = store.scale_events(all_events(100)).await.unwrap();
    assert_eq!(
        texts(&all),
        ["source", "e3", "e2", "e1", "e0"],
        "newest first"
    );
    assert_eq!(
        texts(&store.scale_events(all_events(2)).await.unwrap()),
        ["source", "e3"]
    );
    let only = |name: Option<&str>, namespace: Option<&str>, dc: Option<&str>, since| EventFilter {
        name: name.map(str::to_string),
        namespace: namespace.map(str::to_string),
        datacenter: dc.map(str::to_string),
        since,
        limit: 100,
    };
    let rows = store
        .scale_events(only(Some("a"), None, Some("lon"), None))
        .await
        .unwrap();
    assert_eq!(texts(&rows), ["e3", "e0"]);
    let rows = store
        .scale_events(only(None, Some("dev"), None, None))
        .await
        .unwrap();
    assert_eq!(texts(&rows), ["e1"]);
    let since = Some(t0 + Duration::minutes(2));
    let rows = store
        .scale_events(only(Some("a"), None, None, since))
        .await
        .unwrap();
    assert_eq!(texts(&rows), ["e3", "e2"]);
    // A value that reads as SQL is only a value.
    let rows = store
        .scale_events(only(Some("a' OR '1'='1"), None, None, None))
        .await
        .unwrap();
    assert!(rows.is_empty());

    let newest = all[1].0;
    store
        .amend_event(newest, r#"{"text":"e3 amended"}"#.into())
        .await
        .unwrap();
    let rows = store.scale_events(all_events(2)).await.unwrap();
    assert_eq!(texts(&rows), ["source", "e3 amended"]);
}

both!(the_audit_trail_is_pruned_by_age_and_by_count);
async fn the_audit_trail_is_pruned_by_age_and_by_count(kind: Kind) {
    use faastastic::config::EventsConfig;
    let store = kind.open().await;
    let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    let a = FunctionId::new("a", "openfaas-fn");
    let b = FunctionId::new("b", "dev");
    // Oldest first, as they would be written (ids follow time).
    for (id, ago, text) in [
        (Some(&a), Duration::days(40), "a-old1"),
        (None, Duration::days(35), "source-old"),
        (Some(&b), Duration::days(31), "b-old"),
        (
            Some(&a),
            Duration::days(30) + Duration::seconds(1),
            "a-old2",
        ),
        (Some(&a), Duration::days(29), "a-1"),
        (Some(&b), Duration::days(2), "b-1"),
        (Some(&a), Duration::hours(2), "a-2"),
        (None, Duration::hours(2), "source-1"),
        (Some(&a), Duration::hours(1), "a-3"),
    ] {
        let at = now - ago;
        match id {
            Some(id) => {
                store
                    .record_event(id, event(at, "lon", text))
                    .await
                    .unwrap();
            }
            None => {
                let json = serde_json::json!({ "text": text }).to_string();
                store
                    .record_source_event("", "", "", at, json)
                    .await
                    .unwrap();
            }
        }
    }
    let run = |at: DateTime<Utc>, text: &str| EventRecord {
        at,
        datacenter: "lon".into(),
        json: serde_json::json!({ "text": text }).to_string(),
    };
    let mut rows = Vec::new();
    for (ago, text) in [(60, "run-old"), (3, "run-1"), (2, "run-2"), (1, "run-3")] {
        let due = now - Duration::days(ago);
        let mut record = run(due, text);
        if text == "run-1" {
            // Still going: its outcome is written when it ends.
            record.json = serde_json::json!({ "text": text, "outcome": "running" }).to_string();
        }
        rows.push(store.record_trigger(&a, "cron", due, record).await.unwrap());
    }
    // Nothing to do with no bound.
    let none = EventsConfig {
        retention_days: 0,
        max_per_function: 0,
    };
    assert_eq!(store.prune_events(&none, now).await.unwrap(), 0);
    assert_eq!(store.scale_events(all_events(100)).await.unwrap().len(), 9);

    // 30 days: the four older scale events and the old run go, whatever their function.
    let age = EventsConfig {
        retention_days: 30,
        max_per_function: 0,
    };
    assert_eq!(store.prune_events(&age, now).await.unwrap(), 5);
    assert_eq!(
        texts(&store.scale_events(all_events(100)).await.unwrap()),
        ["a-3", "source-1", "a-2", "b-1", "a-1"]
    );
    // Two a function: a's oldest goes; b and the source events are within it; the runs are
    // counted apart from the scale events.
    let count = EventsConfig {
        retention_days: 30,
        max_per_function: 2,
    };
    // A run still going is left alone: pruned, it would lose the outcome written as it ends.
    assert_eq!(store.prune_events(&count, now).await.unwrap(), 1);
    assert_eq!(
        texts(&store.scale_events(all_events(100)).await.unwrap()),
        ["a-3", "source-1", "a-2", "b-1"]
    );
    assert_eq!(
        texts(&store.trigger_events(all_events(100)).await.unwrap()),
        ["run-3", "run-2", "run-1"]
    );
    let ended = serde_json::json!({ "text": "run-1", "outcome": "ok" }).to_string();
    store.amend_trigger_event(rows[1], ended).await.unwrap();
    assert_eq!(store.prune_events(&count, now).await.unwrap(), 1);
    assert_eq!(
        texts(&store.trigger_events(all_events(100)).await.unwrap()),
        ["run-3", "run-2"]
    );
    // Done: pruning again finds nothing.
    assert_eq!(store.prune_events(&count, now).await.unwrap(), 0);

    // More old events than one batch: all go, in several. (Ids follow time: a batch looks at
    // the oldest events only.)
    let c = FunctionId::new("c", "openfaas-fn");
    for i in 0..1001 {
        let at = now + Duration::seconds(i);
        store
            .record_event(&c, event(at, "lon", &format!("c{i}")))
            .await
            .unwrap();
    }
    let later = now + Duration::days(100);
    assert_eq!(store.prune_events(&age, later).await.unwrap(), 1005 + 2);
    assert!(store.scale_events(all_events(10)).await.unwrap().is_empty());
    assert!(store
        .trigger_events(all_events(10))
        .await
        .unwrap()
        .is_empty());
}

both!(pauses_are_set_once_and_lifted_once);
async fn pauses_are_set_once_and_lifted_once(kind: Kind) {
    let store = kind.open().await;
    let since = Utc.with_ymd_and_hms(2026, 12, 1, 8, 30, 0).unwrap();
    assert!(store
        .set_pause("*", Some((since, "deploy freeze".into())))
        .await
        .unwrap());
    assert!(
        !store
            .set_pause("*", Some((Utc::now(), "again".into())))
            .await
            .unwrap(),
        "a pause already in place keeps its time and reason"
    );
    assert!(store
        .set_pause("api.openfaas-fn", Some((since, "x".into())))
        .await
        .unwrap());
    let mut pauses = store.load_pauses().await.unwrap();
    pauses.sort();
    assert_eq!(
        pauses,
        vec![
            ("*".to_string(), since, "deploy freeze".to_string()),
            ("api.openfaas-fn".to_string(), since, "x".to_string()),
        ]
    );
    assert!(store.set_pause("*", None).await.unwrap());
    assert!(!store.set_pause("*", None).await.unwrap());
    assert_eq!(store.load_pauses().await.unwrap().len(), 1);
}

both!(trigger_due_times_runs_and_interruptions);
async fn trigger_due_times_runs_and_interruptions(kind: Kind) {
    let store = kind.open().await;
    let id = FunctionId::new("nightly", "openfaas-fn");
    let due = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let running = |at| EventRecord {
        at,
        datacenter: "lon".into(),
        json: serde_json::json!({"outcome": "running", "due": at}).to_string(),
    };
    let first = store
        .record_trigger(&id, "cron", due, running(due))
        .await
        .unwrap();
    store
        .amend_trigger_event(first, r#"{"outcome":"ok"}"#.into())
        .await
        .unwrap();
    let next = due + Duration::minutes(1);
    store
        .record_trigger(&id, "cron", next, running(next))
        .await
        .unwrap();
    assert_eq!(
        store.trigger_due_times("cron").await.unwrap(),
        vec![(id.clone(), next)]
    );
    assert!(store.trigger_due_times("other").await.unwrap().is_empty());

    // At start, a run still marked running was cut short; a finished one stays as it was.
    assert_eq!(store.interrupt_trigger_runs().await.unwrap(), 1);
    assert_eq!(store.interrupt_trigger_runs().await.unwrap(), 0);
    let rows = store.trigger_events(all_events(10)).await.unwrap();
    let outcomes: Vec<serde_json::Value> = rows
        .iter()
        .map(|(_, j)| serde_json::from_str(j).unwrap())
        .collect();
    assert_eq!(outcomes[0]["outcome"], "interrupted");
    assert!(outcomes[0]["reason"].as_str().unwrap().contains("stopped"));
    assert!(
        outcomes[0]["due"].is_string(),
        "the rest of the record is kept"
    );
    assert_eq!(outcomes[1]["outcome"], "ok");

    store.clear_trigger(&id, "cron").await.unwrap();
    assert!(store.trigger_due_times("cron").await.unwrap().is_empty());
    // A function's deletion forgets its due times too.
    store
        .record_trigger(&id, "cron", next, running(next))
        .await
        .unwrap();
    store
        .put_function(&function("nightly", &[("lon", 1)]))
        .await
        .unwrap();
    store.delete_function(&id).await.unwrap();
    assert!(store.trigger_due_times("cron").await.unwrap().is_empty());
}

both!(namespaces_and_secrets_round_trip_and_cascade);
async fn namespaces_and_secrets_round_trip_and_cascade(kind: Kind) {
    let store = kind.open().await;
    let dev = Namespace {
        name: "dev".into(),
        labels: Some([("team".to_string(), "a".to_string())].into()),
        annotations: None,
    };
    store.put_namespace(&dev).await.unwrap();
    store
        .put_namespace(&Namespace {
            name: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(store.load_namespaces().await.unwrap()[0], dev);
    // Bytes of every value, a zero among them, come back as they went in.
    let value: Vec<u8> = (0..=255u8).collect();
    let s = SecretRecord {
        namespace: "dev".into(),
        name: "api-key".into(),
        value: value.clone(),
    };
    store.put_secret(&s).await.unwrap();
    store
        .put_secret(&SecretRecord {
            namespace: "prod".into(),
            name: "api-key".into(),
            value: b"p".to_vec(),
        })
        .await
        .unwrap();
    assert_eq!(
        store.get_secret("dev", "api-key").await.unwrap(),
        Some(s.clone())
    );
    let replaced = SecretRecord {
        value: b"new".to_vec(),
        ..s.clone()
    };
    store.put_secret(&replaced).await.unwrap();
    assert_eq!(
        store.get_secret("dev", "api-key").await.unwrap(),
        Some(replaced)
    );
    assert_eq!(store.get_secret("dev", "missing").await.unwrap(), None);
    assert!(store.delete_namespace("dev").await.unwrap());
    assert!(!store.delete_namespace("dev").await.unwrap());
    let left = store.list_secrets().await.unwrap();
    assert_eq!(left.len(), 1, "the namespace's secrets went with it");
    assert_eq!(left[0].namespace, "prod");
    assert!(store.delete_secret("prod", "api-key").await.unwrap());
    assert!(!store.delete_secret("prod", "api-key").await.unwrap());
}

// What only the shared database does.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_migrate_once() {
    let pg = Postgres::start();
    let cfg = StoreConfig::new(&pg.url("together"));
    let starts = (0..6).map(|_| {
        let cfg = cfg.clone();
        tokio::spawn(async move { PostgresStore::connect(&cfg).await.map(|_| ()) })
    });
    for started in futures::future::join_all(starts).await {
        started
            .unwrap()
            .expect("an instance failed to start beside the others");
    }
    assert_eq!(
        pg.psql(
            "together",
            "SELECT string_agg(version::text, ',') FROM schema_migrations"
        ),
        "1",
        "each migration is recorded once"
    );
    // A schema newer than this build: refused, saying what to do, and left alone.
    pg.psql(
        "together",
        "INSERT INTO schema_migrations (version) VALUES (99)",
    );
    let e = PostgresStore::connect(&cfg).await.err().expect("refused");
    let text = format!("{e:#}");
    assert!(
        text.contains("version 99") && text.contains("upgrade faastastic"),
        "{text}"
    );
    assert!(!text.contains(common::postgres::PASSWORD), "{text}");
}

#[tokio::test]
async fn every_write_is_announced_on_commit() {
    let kind = postgres();
    // Two instances: what one writes, the other hears (and the writer does not: it knows).
    let store = kind.open().await;
    let other = kind.open().await;
    // Listening once connected: changes from now on are all heard.
    let mut notes = other.subscribe().expect("a shared store announces changes");
    let mut own = store.subscribe().unwrap();
    let f = function("api", &[("lon", 1)]);
    store.put_function(&f).await.unwrap();
    store
        .set_pause("*", Some((Utc::now(), "x".into())))
        .await
        .unwrap();
    let recorded = store
        .record_decision(
            &f.id,
            "lon",
            "{}".into(),
            Some(event(Utc::now(), "lon", "held")),
        )
        .await
        .unwrap();
    let newest = store.scale_events(all_events(1)).await.unwrap();
    assert_eq!(Some(newest[0].0), recorded);
    let mut heard = Vec::new();
    while heard.len() < 3 {
        let note = tokio::time::timeout(std::time::Duration::from_secs(5), notes.recv())
            .await
            .expect("a change was not announced")
            .unwrap();
        if note != faastastic::store::Note::Resync {
            heard.push(note);
        }
    }
    use faastastic::store::{Change, Note};
    // The writer hears the other's write (a marker), and nothing of its own before it.
    other
        .put_function(&function("marker", &[("lon", 1)]))
        .await
        .unwrap();
    loop {
        let note = tokio::time::timeout(std::time::Duration::from_secs(5), own.recv())
            .await
            .expect("the other's write was not announced")
            .unwrap();
        match note {
            Note::Resync => continue,
            Note::Changed { ref name, .. } if name == "marker" => break,
            other => panic!("a store heard its own write: {other:?}"),
        }
    }
    assert_eq!(
        heard,
        vec![
            Note::Changed {
                kind: Change::Function,
                namespace: "openfaas-fn".into(),
                name: "api".into()
            },
            Note::Changed {
                kind: Change::Pause,
                namespace: String::new(),
                name: "*".into()
            },
            Note::Changed {
                kind: Change::State,
                namespace: "openfaas-fn".into(),
                name: "api".into()
            },
        ]
    );
}

#[tokio::test]
async fn the_lease_goes_to_one_holder_and_to_another_once_it_runs_out() {
    let kind = postgres();
    let store = kind.open().await;
    let ttl = std::time::Duration::from_millis(600);
    let a = store.acquire_lease("leader", "a", ttl).await.unwrap();
    assert_eq!(a, Some(1));
    assert_eq!(store.acquire_lease("leader", "b", ttl).await.unwrap(), None);
    // Renewed in time: the same term.
    assert_eq!(
        store.acquire_lease("leader", "a", ttl).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.lease_holder("leader").await.unwrap(),
        Some(("a".to_string(), 1))
    );
    tokio::time::sleep(ttl + std::time::Duration::from_millis(100)).await;
    // Run out: b's term, with a higher token; a's next renewal fails.
    assert_eq!(
        store.acquire_lease("leader", "b", ttl).await.unwrap(),
        Some(2)
    );
    assert_eq!(store.acquire_lease("leader", "a", ttl).await.unwrap(), None);
    // A write fenced with a's old token is refused, whole.
    let f = function("api", &[("lon", 1)]);
    store.put_function(&f).await.unwrap();
    let decision = |fence| Decision {
        datacenter: "lon".into(),
        state_json: "{}".into(),
        previous_state_json: "{}".into(),
        event: event(Utc::now(), "lon", "up"),
        fence: Some(fence),
    };
    let four: BTreeMap<String, u64> = [("lon".to_string(), 4)].into();
    let e = store
        .set_desired_with(&f.id, &four, Some(&decision(1)))
        .await
        .expect_err("a deposed leader's write");
    assert!(e.to_string().contains("no longer leads"), "{e}");
    assert_eq!(
        store.load_functions("home").await.unwrap()[0].replicas["lon"],
        1
    );
    assert!(store.scale_events(all_events(10)).await.unwrap().is_empty());
    // b's token writes.
    store
        .set_desired_with(&f.id, &four, Some(&decision(2)))
        .await
        .unwrap();
    // Given up at a clean stop: another takes it at once.
    store.release_lease("leader", "b").await.unwrap();
    assert_eq!(
        store.acquire_lease("leader", "a", ttl).await.unwrap(),
        Some(3)
    );
}

/// Runs `faastastic serve` with `config` until it exits (it must, within 30 s); its exit code
/// and what it printed.
fn serve_until_exit(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faastastic.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = std::process::Command::new(common::BIN)
        .args(["serve", "--no-auth", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("faastastic did not stop");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

const REMOTE_DC: &str =
    "[[datacenters]]\nname = \"lon\"\nplatform = \"remote\"\nurl = \"http://127.0.0.1:9\"\n";

#[test]
fn a_database_that_cannot_be_used_stops_the_start_named_without_its_password() {
    // Nobody listens there.
    let port = common::free_port();
    let config = format!(
        "[store]\nurl = \"postgres://faastastic:hunter2@127.0.0.1:{port}/faastastic\"\nconnect_timeout_ms = 1000\n{REMOTE_DC}"
    );
    let (code, text) = serve_until_exit(&config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "postgres://faastastic:<redacted>@127.0.0.1:{port}/faastastic"
        )),
        "{text}"
    );
    assert!(
        text.contains("refused") || text.contains("connect"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // A server that is there, with the wrong password.
    let pg = Postgres::start();
    let url = pg
        .url("faastastic")
        .replace(common::postgres::PASSWORD, "wrong-pw");
    let (code, text) = serve_until_exit(&format!("[store]\nurl = \"{url}\"\n{REMOTE_DC}"));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("wrong-pw"), "{text}");

    // Datacenters one instance runs alone cannot be shared.
    let url = pg.url("faastastic");
    let (code, text) = serve_until_exit(&format!("[store]\nurl = \"{url}\"\n"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("platform \"local\"") && text.contains("remote"),
        "{text}"
    );
    let docker = "[[datacenters]]\nname = \"lon\"\nplatform = \"docker\"\n";
    let (code, text) = serve_until_exit(&format!("[store]\nurl = \"{url}\"\n{docker}"));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("platform \"docker\""), "{text}");
}
