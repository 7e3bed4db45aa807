//! The NATS JetStream trigger (`[triggers.nats]`): a function whose `topic` annotation names
//! subjects receives their messages through a durable pull consumer per function and subject
//! (`faastastic_NAME_NAMESPACE_HASH`), created on the configured stream with `DeliverPolicy::New`.
//! Each message is one invocation through the gateway's routing (`POST /`, the payload as the
//! body, the message's headers as request headers, plus `X-Topic` with the subject as the
//! OpenFaaS connectors send it and `X-Nats-Delivered` with the delivery count):
//!
//! * a 2xx answer acknowledges the message; anything else (or no answer) asks for it again
//!   after the configured backoff, and after `max_deliver` deliveries publishes it to
//!   `dead_letter_subject` with the last error and terminates it; a message is acknowledged
//!   only after a 2xx, so at-least-once holds across restarts of faastastic and of NATS;
//! * at most `max_in_flight` messages of one function and subject invoke it at once (the
//!   consumer's `max_ack_pending`, so the server holds the rest), and each consumer runs on its
//!   own task: a slow function never holds up another's subjects;
//! * publishers' `Nats-Msg-Id` headers are de-duplicated by the stream (its duplicate window);
//! * a message with a `Faastastic-Reply-To` header gets the function's answer published to that
//!   subject (request/reply: JetStream keeps no publisher's reply subject, it answers the
//!   publication itself), with `Faastastic-Status`, or the error once it is dead-lettered.
//!
//! NATS unreachable, at start or later, stops nothing else: functions deploy and serve HTTP,
//! `faastastic_trigger_up{trigger="nats"}` and `/system/overview` say the trigger is down, the
//! log says so once per outage, and the client reconnects with backoff.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, AckKind};
use axum::body::Body;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, Method, Request};
use sha2::Digest;

use super::spec;
use crate::autoscale::query::{Backlog, FunctionValues, Values};
use crate::config::NatsConfig;
use crate::fleet::Fleet;
use crate::model::FunctionId;
use crate::proxy::Invoker;
use crate::telemetry::Metrics;

/// The trigger's name in the metrics and events.
pub const TRIGGER: &str = "nats";

/// The header naming where a message's answer goes.
pub const REPLY_TO: &str = "Faastastic-Reply-To";

/// How often the consumers are brought in line with the deployed functions.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// The longest a consumer waits before it tries the server again.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Request headers a message cannot set.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "x-faastastic-datacenter",
];

/// One function's subject, and its durable consumer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Subscription {
    id: FunctionId,
    subject: String,
    consumer: String,
}

/// The durable consumer of one deployment of a function and one subject: its name is valid in
/// NATS (letters, digits, `_` and `-`) and unique per function, subject and deployment (a
/// function deleted and deployed again starts from new messages, not from the old one's
/// place).
pub fn consumer_name(id: &FunctionId, subject: &str, deployed_at: i64) -> String {
    let hash = sha2::Sha256::digest(format!(
        "{}\0{}\0{subject}\0{deployed_at}",
        id.namespace, id.name
    ));
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        "faastastic_{}_{}_{:02x}{:02x}{:02x}{:02x}",
        clean(&id.name),
        clean(&id.namespace),
        hash[0],
        hash[1],
        hash[2],
        hash[3]
    )
}

/// Whether a message may name `subject` for its answer: a literal subject (no wildcards) and
/// none of the server's own (`$JS.API...`, `$SYS...`), which faastastic's credentials might be
/// allowed to publish to where the message's publisher is not.
pub fn reply_subject_allowed(subject: &str) -> bool {
    spec::check_subject(subject).is_ok()
        && !subject.starts_with('$')
        && !subject.split('.').any(|t| t == "*" || t == ">")
}

/// The backoff before delivery `delivered + 1` of a message that failed `delivered` times.
fn backoff(cfg: &NatsConfig, delivered: u64) -> Duration {
    let i = (delivered.max(1) - 1) as usize;
    cfg.backoff
        .get(i)
        .or(cfg.backoff.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

pub struct NatsTriggers {
    cfg: NatsConfig,
    fleet: Arc<Fleet>,
    invoker: Arc<Invoker>,
    metrics: Arc<Metrics>,
    up: AtomicBool,
    /// Set once the client exists.
    js: std::sync::OnceLock<jetstream::Context>,
    /// The functions and subjects being consumed.
    consuming: std::sync::Mutex<Vec<Subscription>>,
    /// The last error the client reported since it was last connected (logged once).
    last_error: std::sync::Mutex<Option<String>>,
}

impl NatsTriggers {
    pub fn new(
        cfg: NatsConfig,
        fleet: Arc<Fleet>,
        invoker: Arc<Invoker>,
        metrics: Arc<Metrics>,
    ) -> Arc<NatsTriggers> {
        metrics.trigger_up.with_label_values(&[TRIGGER]).set(0);
        Arc::new(NatsTriggers {
            cfg,
            fleet,
            invoker,
            metrics,
            up: AtomicBool::new(false),
            js: std::sync::OnceLock::new(),
            consuming: std::sync::Mutex::new(Vec::new()),
            last_error: std::sync::Mutex::new(None),
        })
    }

    /// Connects (in the background, retrying) and runs the consumers until the process ends.
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.clone().options().await {
                    Ok(options) => match options.connect(self.cfg.url.as_str()).await {
                        Ok(client) => return self.clone().run(client).await,
                        Err(e) => {
                            tracing::error!(url = %self.cfg.redacted_url(), error = %e, "nats: cannot connect");
                        }
                    },
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "nats: the trigger's configuration cannot be used; it stays off");
                        return;
                    }
                }
                tokio::time::sleep(MAX_RETRY).await;
            }
        })
    }

    /// An error of the client (a refused token, a TLS failure), logged once until the next
    /// connection.
    fn client_error(&self, error: String) {
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(error.as_str()) {
            tracing::warn!(url = %self.cfg.redacted_url(), error = %error, "nats: the server refused or failed the connection; retrying");
            *last = Some(error);
        }
    }

    fn set_up(&self, up: bool) {
        if up {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let was = self.up.swap(up, Ordering::AcqRel);
        self.metrics
            .trigger_up
            .with_label_values(&[TRIGGER])
            .set(i64::from(up));
        match (was, up) {
            (false, true) => tracing::info!(url = %self.cfg.redacted_url(), "nats: connected"),
            (true, false) => {
                tracing::warn!(url = %self.cfg.redacted_url(), "nats: the server is unreachable; messages wait in their streams until it is back")
            }
            _ => {}
        }
    }

    /// Whether the client is connected to the server.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    async fn options(self: Arc<Self>) -> anyhow::Result<async_nats::ConnectOptions> {
        let read = |path: &std::path::Path, what: &str| -> anyhow::Result<String> {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("triggers.nats.{what}: cannot read {}", path.display()))?;
            Ok(text.trim().to_string())
        };
        let mut options = async_nats::ConnectOptions::new()
            .name("faastastic")
            .retry_on_initial_connect();
        if let Some(file) = &self.cfg.token_file {
            options = options.token(read(file, "token_file")?);
        }
        if let (Some(user), Some(file)) = (&self.cfg.user, &self.cfg.password_file) {
            options = options.user_and_password(user.clone(), read(file, "password_file")?);
        }
        if let Some(file) = &self.cfg.credentials_file {
            options = options.credentials_file(file).await.with_context(|| {
                format!(
                    "triggers.nats.credentials_file: cannot read {}",
                    file.display()
                )
            })?;
        }
        if let Some(file) = &self.cfg.ca_file {
            options = options
                .add_root_certificates(file.clone())
                .require_tls(true);
        }
        let this = self.clone();
        Ok(options.event_callback(move |event| {
            let this = this.clone();
            async move {
                match event {
                    async_nats::Event::Connected => this.set_up(true),
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        this.set_up(false)
                    }
                    async_nats::Event::ServerError(e) => this.client_error(e.to_string()),
                    async_nats::Event::ClientError(e) => this.client_error(e.to_string()),
                    other => tracing::debug!(event = %other, "nats: event"),
                }
            }
        }))
    }

    /// Keeps one consumer task per function and subject, as the deployed functions ask.
    async fn run(self: Arc<Self>, client: async_nats::Client) {
        if client.connection_state() == async_nats::connection::State::Connected {
            self.set_up(true);
        } else {
            // Not there at start: said once; the client keeps trying.
            tracing::warn!(url = %self.cfg.redacted_url(), "nats: the server is unreachable; functions deploy and serve HTTP meanwhile, and their messages flow once it is back");
        }
        let js = jetstream::new(client);
        let _ = self.js.set(js.clone());
        let mut workers: HashMap<Subscription, tokio::task::JoinHandle<()>> = HashMap::new();
        // Consumers of functions that are gone, deleted once the server lets us.
        let mut to_delete: HashSet<String> = HashSet::new();
        loop {
            let wanted: HashSet<Subscription> = self
                .fleet
                .scan(|f, _| {
                    let subjects = spec::subjects(f.deployment.annotations.as_ref()?);
                    let deployed_at = f.created_at.timestamp_micros();
                    Some(
                        subjects
                            .into_iter()
                            .map(|subject| Subscription {
                                id: f.id.clone(),
                                consumer: consumer_name(&f.id, &subject, deployed_at),
                                subject,
                            })
                            .collect::<Vec<_>>(),
                    )
                })
                .into_iter()
                .flatten()
                .collect();
            let gone: Vec<Subscription> = workers
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            for sub in gone {
                if let Some(task) = workers.remove(&sub) {
                    task.abort();
                }
                tracing::info!(function = %sub.id, subject = %sub.subject, "nats: stopped consuming");
                // The function is gone: so is its place in the stream.
                to_delete.insert(sub.consumer);
            }
            if !to_delete.is_empty() && self.is_up() {
                if let Ok(stream) = js.get_stream(&self.cfg.stream).await {
                    for name in std::mem::take(&mut to_delete) {
                        match stream.delete_consumer(&name).await {
                            Ok(_) => {}
                            Err(e) if e.to_string().contains("not found") => {}
                            Err(_) => {
                                to_delete.insert(name);
                            }
                        }
                    }
                }
            }
            for sub in wanted {
                if workers.get(&sub).is_some_and(|t| !t.is_finished()) {
                    continue;
                }
                let (this, js, key) = (self.clone(), js.clone(), sub.clone());
                let task = tokio::spawn(async move { this.consume_forever(js, key).await });
                workers.insert(sub, task);
            }
            *self.consuming.lock().unwrap_or_else(|p| p.into_inner()) =
                workers.keys().cloned().collect();
            tokio::time::sleep(SYNC_EVERY).await;
        }
    }

    /// One function's subject: consumes, and after any failure (the server gone, the stream
    /// missing) tries again with backoff, saying so once until it works again.
    async fn consume_forever(self: Arc<Self>, js: jetstream::Context, sub: Subscription) {
        let (id, subject) = (&sub.id, &sub.subject);
        let mut wait = Duration::from_millis(250);
        let mut failing: Option<String> = None;
        loop {
            let mut started = false;
            match self.consume(&js, &sub, &mut failing, &mut started).await {
                Ok(()) => {}
                Err(e) => {
                    let text = format!("{e:#}");
                    if failing.as_deref() != Some(text.as_str()) {
                        tracing::warn!(function = %id, subject = %subject, error = %text, "nats: cannot consume; retrying");
                        failing = Some(text);
                    }
                }
            }
            // A consumer that worked before it failed starts again from the shortest wait.
            if started {
                wait = Duration::from_millis(250);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_RETRY);
        }
    }

    async fn stream(&self, js: &jetstream::Context) -> anyhow::Result<jetstream::stream::Stream> {
        match js.get_stream(&self.cfg.stream).await {
            Ok(stream) => Ok(stream),
            Err(e) if self.cfg.subjects.is_empty() => Err(anyhow::anyhow!(
                "stream {:?}: {e} (create it, or set triggers.nats.subjects to have it created)",
                self.cfg.stream
            )),
            Err(_) => js
                .get_or_create_stream(jetstream::stream::Config {
                    name: self.cfg.stream.clone(),
                    subjects: self.cfg.subjects.clone(),
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("cannot create stream {:?}", self.cfg.stream)),
        }
    }

    async fn consume(
        self: &Arc<Self>,
        js: &jetstream::Context,
        sub: &Subscription,
        failing: &mut Option<String>,
        started: &mut bool,
    ) -> anyhow::Result<()> {
        let (id, subject, name) = (&sub.id, sub.subject.as_str(), sub.consumer.clone());
        let stream = self.stream(js).await?;
        // Created, or updated to the configured acknowledgement wait and in-flight bound.
        stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("faastastic: {id} on {subject}")),
                filter_subject: subject.to_string(),
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: self.cfg.ack_wait,
                // Deliveries are counted here, so that a message whose dead-letter
                // publication failed is delivered again rather than dropped.
                max_deliver: -1,
                max_ack_pending: self.cfg.max_in_flight as i64,
                ..Default::default()
            })
            .await
            .with_context(|| format!("consumer {name} on stream {:?}", self.cfg.stream))?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&name)
            .await
            .map_err(|e| anyhow::anyhow!("consumer {name} on stream {:?}: {e}", self.cfg.stream))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.cfg.max_in_flight)
            .messages()
            .await
            .context("cannot pull messages")?;
        *started = true;
        if failing.take().is_some() {
            tracing::info!(function = %id, subject, "nats: consuming again");
        } else {
            tracing::info!(function = %id, subject, consumer = %name, "nats: consuming");
        }
        let in_flight = Arc::new(tokio::sync::Semaphore::new(self.cfg.max_in_flight));
        while let Some(message) = messages.next().await {
            let message = message.context("pulling messages")?;
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let (this, js, id) = (self.clone(), js.clone(), id.clone());
            tokio::spawn(async move {
                this.deliver(&js, &id, message).await;
                drop(permit);
            });
        }
        Err(anyhow::anyhow!("the message stream ended"))
    }

    /// One delivery of one message: the invocation, then its acknowledgement.
    async fn deliver(&self, js: &jetstream::Context, id: &FunctionId, message: jetstream::Message) {
        let delivered = message
            .info()
            .map(|i| i.delivered.max(1) as u64)
            .unwrap_or(1);
        let mut request = Request::builder().method(Method::POST).uri("/");
        if let Some(headers) = &message.headers {
            for (name, values) in headers.iter() {
                let name = name.to_string();
                let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                    continue;
                };
                if RESERVED.contains(&header.as_str()) {
                    continue;
                }
                for value in values {
                    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
                        request = request.header(header.clone(), v);
                    }
                }
            }
        }
        let Ok(mut request) = request.body(Body::from(message.payload.clone())) else {
            // Unreachable with the checks above; never a reason to lose the message.
            let _ = message
                .ack_with(AckKind::Nak(Some(backoff(&self.cfg, delivered))))
                .await;
            return;
        };
        // The connector's own headers, whatever the message carried under those names.
        let headers = request.headers_mut();
        if let Ok(topic) = HeaderValue::from_str(message.subject.as_str()) {
            headers.insert("x-topic", topic);
        } else {
            headers.remove("x-topic");
        }
        headers.insert("x-connector", HeaderValue::from_static("faastastic-nats"));
        headers.insert("x-nats-delivered", HeaderValue::from(delivered));
        // A long invocation keeps the message its own: without progress the server would
        // deliver it again at ack_wait, while it still runs.
        let progress = async {
            loop {
                tokio::time::sleep(self.cfg.ack_wait / 2).await;
                let _ = message.ack_with(AckKind::Progress).await;
            }
        };
        let reply_to = message
            .headers
            .as_ref()
            .and_then(|h| h.get(REPLY_TO))
            .map(|v| v.to_string())
            .filter(|r| reply_subject_allowed(r));
        // A reply carries the whole answer (up to NATS's payload limit); otherwise only the
        // start of a failure is kept for the record.
        let keep = if reply_to.is_some() {
            1024 * 1024
        } else {
            64 * 1024
        };
        let answer = tokio::select! {
            answer = super::invoke(&self.invoker, id, request, keep) => answer,
            _ = progress => unreachable!("the progress loop never ends"),
        };
        let status = answer.status;
        let reply = |status: http::StatusCode, payload: bytes::Bytes| {
            let reply_to = reply_to.clone();
            let content_type = answer.content_type.clone();
            let client = js.client();
            async move {
                let Some(subject) = reply_to else { return };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Faastastic-Status", status.as_u16().to_string().as_str());
                if let Some(ct) = &content_type {
                    headers.insert("Content-Type", ct.as_str());
                }
                if let Err(e) = client.publish_with_headers(subject, headers, payload).await {
                    tracing::warn!(error = %e, "nats: cannot publish a reply");
                }
            }
        };
        let count = |outcome: &str| super::count(&self.metrics, id, TRIGGER, outcome, 1);
        if status.is_success() {
            reply(status, answer.body.clone()).await;
            if let Err(e) = message.ack().await {
                tracing::warn!(function = %id, error = %e, "nats: cannot acknowledge a message; it will be delivered again");
            }
            count("ok");
            return;
        }
        let error = answer.failure();
        if delivered < self.cfg.max_deliver {
            let _ = message
                .ack_with(AckKind::Nak(Some(backoff(&self.cfg, delivered))))
                .await;
            count("retried");
            return;
        }
        // The copy is a new message: the original's de-duplication id and expectations would
        // make a stream drop or refuse it.
        let mut headers = async_nats::HeaderMap::new();
        if let Some(original) = &message.headers {
            for (name, values) in original.iter() {
                if name.to_string().to_ascii_lowercase().starts_with("nats-") {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        headers.insert("Faastastic-Function", id.qualified().as_str());
        headers.insert("Faastastic-Subject", message.subject.as_str());
        headers.insert("Faastastic-Deliveries", delivered.to_string().as_str());
        headers.insert("Faastastic-Error", error.as_str());
        let client = js.client();
        // Flushed: terminated only once the server has the copy.
        let published = match client
            .publish_with_headers(
                self.cfg.dead_letter_subject.clone(),
                headers,
                message.payload.clone(),
            )
            .await
        {
            Ok(()) => client.flush().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match published {
            Ok(()) => {
                reply(status, bytes::Bytes::from(error.clone())).await;
                let _ = message.ack_with(AckKind::Term).await;
                tracing::warn!(function = %id, subject = %message.subject, deliveries = delivered, error = %error, dead_letter = %self.cfg.dead_letter_subject, "nats: a message failed every delivery and went to the dead-letter subject");
                count("dead-lettered");
            }
            Err(e) => {
                tracing::warn!(function = %id, error = %e, "nats: cannot publish to the dead-letter subject; the message will be delivered again");
                let _ = message
                    .ack_with(AckKind::Nak(Some(backoff(&self.cfg, delivered))))
                    .await;
                count("retried");
            }
        }
    }
}

/// The `nats` source of query policies: each function's backlog on its subjects.
#[async_trait::async_trait]
impl Backlog for NatsTriggers {
    async fn backlog(&self) -> Result<Values, String> {
        let js = match (self.is_up(), self.js.get()) {
            (true, Some(js)) => js,
            _ => {
                return Err(format!(
                    "NATS at {} is unreachable",
                    self.cfg.redacted_url()
                ))
            }
        };
        let consuming = self
            .consuming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stream = js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| format!("stream {:?}: {e}", self.cfg.stream))?;
        // Asked 16 at a time; a consumer that does not answer (or does not exist yet: its task
        // is starting) leaves its function without a value this time, the others go on.
        let stream = &stream;
        let answers: Vec<(FunctionId, Option<f64>)> = futures::stream::iter(consuming)
            .map(
                |Subscription {
                     id, consumer: name, ..
                 }| async move {
                    let waiting = match stream.consumer_info(&name).await {
                        Ok(info) => Some(info.num_pending as f64 + info.num_ack_pending as f64),
                        Err(e) => {
                            tracing::debug!(consumer = %name, error = %e, "nats: no backlog read");
                            None
                        }
                    };
                    (id, waiting)
                },
            )
            .buffer_unordered(16)
            .collect()
            .await;
        let mut out = Values::new();
        let mut unread = std::collections::HashSet::new();
        for (id, waiting) in answers {
            match waiting {
                Some(w) => {
                    let v: &mut FunctionValues = out.entry(id).or_default();
                    v.total = Some(v.total.unwrap_or(0.0) + w);
                }
                None => {
                    unread.insert(id);
                }
            }
        }
        // A function with one of its subjects unread has no value (a partial sum would scale
        // it down).
        for id in unread {
            out.remove(&id);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_valid_and_distinct() {
        let id = FunctionId::new("resize-image", "openfaas-fn");
        let a = consumer_name(&id, "images.>", 1);
        let b = consumer_name(&id, "images.new", 1);
        assert_ne!(
            a,
            consumer_name(&id, "images.>", 2),
            "a new deployment, a new consumer"
        );
        assert!(a.starts_with("faastastic_resize-image_openfaas-fn_"), "{a}");
        assert_ne!(a, b);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }

    #[test]
    fn a_message_cannot_aim_its_answer_at_the_server_itself() {
        assert!(reply_subject_allowed("_INBOX.abc123"));
        assert!(reply_subject_allowed("replies.orders.7"));
        for refused in [
            "$JS.API.STREAM.DELETE.faastastic",
            "$SYS.REQ.SERVER.PING",
            "replies.*",
            "replies.>",
            "a..b",
            "",
        ] {
            assert!(!reply_subject_allowed(refused), "{refused}");
        }
    }

    #[test]
    fn the_backoff_follows_the_attempts_and_repeats_its_last() {
        let mut cfg = NatsConfig::new("nats://127.0.0.1:4222");
        cfg.backoff = vec![Duration::from_millis(100), Duration::from_secs(2)];
        assert_eq!(backoff(&cfg, 1), Duration::from_millis(100));
        assert_eq!(backoff(&cfg, 2), Duration::from_secs(2));
        assert_eq!(backoff(&cfg, 7), Duration::from_secs(2));
    }
}
