//! The invoke proxy: `/function/{name}[/{path}]` to a ready replica over pooled keep-alive
//! connections. Replicas come fresh from the platform on every request, never from a cache keyed
//! by name, so a redeployed function is never routed to its old replica.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue, CONTENT_TYPE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::ProxyConfig;
use crate::fleet::Fleet;
use crate::model::{function_ref, FunctionId};
use crate::platform::{Claim, Endpoint, DURATION_HEADER};
use crate::telemetry::Metrics;

pub type HttpClient = Client<HttpConnector, Body>;

pub const CALL_ID: HeaderName = HeaderName::from_static("x-call-id");
pub const START_TIME: HeaderName = HeaderName::from_static("x-start-time");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const INTERNAL: HeaderName = HeaderName::from_static("x-openfaas-internal");
/// Authenticates the control plane's invocations to a remote datacenter's agent (the
/// `Authorization` header stays the caller's, for the function).
pub const AGENT_TOKEN: HeaderName = HeaderName::from_static("x-faastastic-agent-token");
/// Pins an invocation to one datacenter (else home's replicas first, then the others').
pub const DATACENTER: HeaderName = HeaderName::from_static("x-faastastic-datacenter");

/// Responses up to this size (by `Content-Length`) are read whole before they are answered, so
/// head and body leave in one write; larger or unsized ones are streamed.
const BUFFER_RESPONSE_BYTES: u64 = 64 * 1024;

/// Headers that describe one hop's connection and must not be forwarded.
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn http_client(connect_timeout: Duration, max_idle_per_host: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}

/// A pooled client per thread: upstream connections opened on a connection thread are driven
/// by that thread's event loop, next to the client connections that use them.
pub struct Clients {
    connect_timeout: Duration,
    max_idle_per_host: usize,
    per_thread: thread_local::ThreadLocal<HttpClient>,
}

impl Clients {
    pub fn new(connect_timeout: Duration, max_idle_per_host: usize) -> Clients {
        Clients {
            connect_timeout,
            max_idle_per_host,
            per_thread: thread_local::ThreadLocal::new(),
        }
    }

    /// This thread's client.
    pub fn get(&self) -> &HttpClient {
        self.per_thread
            .get_or(|| http_client(self.connect_timeout, self.max_idle_per_host))
    }
}

/// Removes the headers that describe one hop: the fixed list, and those the message's
/// `Connection` header nominates (RFC 9110 §7.6.1), except the framing and `Host`, which
/// every hop writes itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let nominated: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| {
            ![
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::HOST,
            ]
            .contains(name)
        })
        .collect();
    for name in nominated.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

#[derive(Debug)]
pub enum UpstreamError {
    Connect(String),
    Timeout,
    /// The replica's answer head broke HTTP/1.1 (the cause, as
    /// `faastastic_upstream_protocol_errors_total` labels it, and the error).
    Malformed(&'static str, String),
}

/// Why an answer head hyper's client accepted is refused as the invoke lane refuses it, as
/// (cause, text).
fn refusal_of(parts: &http::response::Parts) -> Option<(&'static str, &'static str)> {
    let codings: Vec<&HeaderValue> = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .collect();
    let lengths: Vec<&HeaderValue> = parts
        .headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .collect();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        Some(("upgrade", "the replica switched protocols unasked"))
    } else if !codings.is_empty()
        && (codings.len() > 1 || !codings[0].as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        Some((
            "transfer_encoding",
            "the replica used a transfer coding other than one chunked",
        ))
    } else if !codings.is_empty() && !lengths.is_empty() {
        Some((
            "transfer_encoding",
            "the replica sent both Transfer-Encoding and Content-Length",
        ))
    } else if !lengths
        .iter()
        .all(|v| plain_decimal(v.as_bytes()).is_some())
        || lengths.windows(2).any(|w| w[0] != w[1])
    {
        Some((
            "content_length",
            "the replica sent an invalid or conflicting Content-Length",
        ))
    } else {
        None
    }
}

/// The protocol error in `e`'s causes, by the label the invoke lane gives it.
fn malformed_cause(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return match () {
                _ if h.is_parse_status() => Some("status"),
                _ if h.is_parse_too_large() => Some("head_too_large"),
                _ if h.is_parse() => Some("head"),
                _ => None,
            };
        }
        source = err.source();
    }
    None
}

/// Sends `req` to `uri` (absolute); the caller has removed its hop-by-hop headers
/// ([`strip_hop_by_hop`]). The timeout covers the wait for the response head.
pub async fn send<C>(
    client: &Client<C, Body>,
    uri: Uri,
    req: Request<Body>,
    timeout: Option<Duration>,
) -> Result<Response<Incoming>, UpstreamError>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    parts.headers.remove(header::HOST);
    let fut = client.request(Request::from_parts(parts, body));
    let result = match timeout {
        Some(limit) => tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| UpstreamError::Timeout)?,
        None => fut.await,
    };
    result.map_err(|e| match malformed_cause(&e) {
        Some(cause) => UpstreamError::Malformed(cause, crate::error_chain(&e)),
        None => UpstreamError::Connect(crate::error_chain(&e)),
    })
}

/// An answer's body that holds its request's claim on the replica until it is finished (or
/// dropped), so a replica being removed is drained of it.
pub(crate) struct GuardedBody {
    inner: Incoming,
    _guard: Claim,
}

impl GuardedBody {
    pub(crate) fn new(inner: Incoming, claim: Claim) -> GuardedBody {
        GuardedBody {
            inner,
            _guard: claim,
        }
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// When each function was last invoked (read by the autoscaler for scale to zero).
#[derive(Default)]
pub struct Activity {
    /// Unix milliseconds of each function's last invocation.
    last: std::sync::Mutex<crate::model::FunctionMap<Arc<AtomicI64>>>,
    /// The same, through the other instances on a shared store.
    others: std::sync::Mutex<crate::model::FunctionMap<i64>>,
}

impl Activity {
    pub fn touch(&self, id: &FunctionId) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get(id) {
            Some(clock) => stamp(clock),
            None => {
                let clock = Arc::new(AtomicI64::default());
                stamp(&clock);
                last.insert(id.clone(), clock);
            }
        }
    }

    /// `id`'s clock, to [`stamp`] on each invocation without looking it up again.
    pub(crate) fn clock(&self, id: &FunctionId) -> Arc<AtomicI64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.entry(id.clone()).or_default().clone()
    }

    /// This instance's last invocation of every function it has served, Unix milliseconds.
    pub fn own(&self) -> Vec<(FunctionId, i64)> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.iter()
            .map(|(id, clock)| (id.clone(), clock.load(Ordering::Relaxed)))
            .filter(|(_, millis)| *millis != 0)
            .collect()
    }

    /// Sets when the other instances last invoked each function.
    pub fn set_others(&self, others: crate::model::FunctionMap<i64>) {
        *self.others.lock().unwrap_or_else(|p| p.into_inner()) = others;
    }

    /// When the function was last invoked, through any instance.
    pub fn last(&self, id: &FunctionId) -> Option<chrono::DateTime<chrono::Utc>> {
        let own = {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            last.get(id).map(|c| c.load(Ordering::Relaxed)).unwrap_or(0)
        };
        let other = {
            let others = self.others.lock().unwrap_or_else(|p| p.into_inner());
            others.get(id).copied().unwrap_or(0)
        };
        let millis = own.max(other);
        // A clock handed out but not stamped yet has not seen an invocation.
        (millis != 0)
            .then(|| chrono::DateTime::from_timestamp_millis(millis))
            .flatten()
    }
}

/// Sets an activity clock to now.
pub(crate) fn stamp(clock: &AtomicI64) {
    clock.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
}

/// Why a name does not resolve to a function.
pub(crate) enum Unresolved {
    Invalid(String),
    Missing(FunctionId),
}

/// Splits `/function/NAME/rest` into (`NAME`, `/rest`), keeping a trailing slash.
pub fn split_path<'a>(path: &'a str, prefix: &str) -> (&'a str, &'a str) {
    let rest = path.strip_prefix(prefix).unwrap_or("");
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

/// The methods a synchronous invocation passes through to the function; others get 405.
pub const METHODS: &[Method] = &[
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
    Method::HEAD,
];

/// `1*DIGIT` as a number (no sign, no spaces, no list).
pub fn plain_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The invoke contract: what faastastic adds to an invocation on its way to a replica and on
/// its way back, decided once per request from the request's own headers. The lane renders it
/// into bytes and the general path into a `HeaderMap`; `tests/hostile_replica.rs` holds both
/// to one table. Hop-by-hop and connection-nominated headers are every hop's to drop and are
/// not part of it.
pub struct Contract<'a> {
    /// `X-Call-Id` made here because the request had none; the answer carries it too.
    pub generated_call_id: Option<[u8; 36]>,
    /// `X-Start-Time` (Unix nanoseconds), both ways.
    pub start_time: u64,
    /// `X-Forwarded-For`: the client's address, when the request names none.
    pub forwarded_for: Option<&'a [u8]>,
    /// `X-Forwarded-Host`: the request's `Host`, when the request names none.
    pub forwarded_host: Option<&'a [u8]>,
    /// `X-Faastastic-Agent-Token` for a remote datacenter's agent; one the client sent is
    /// dropped.
    pub agent_token: Option<&'a [u8]>,
    /// The request's `Content-Type`, the answer's when the replica gives none.
    pub request_content_type: Option<&'a [u8]>,
}

/// What a request's headers say for its [`Contract`].
#[derive(Default)]
pub struct RequestFacts<'a> {
    pub has_call_id: bool,
    pub has_forwarded_for: bool,
    pub has_forwarded_host: bool,
    pub host: Option<&'a [u8]>,
    pub content_type: Option<&'a [u8]>,
}

impl<'a> RequestFacts<'a> {
    /// Takes note of one request header.
    pub fn note(&mut self, name: &str, value: &'a [u8]) {
        if name.eq_ignore_ascii_case(CALL_ID.as_str()) {
            self.has_call_id = true;
        } else if name.eq_ignore_ascii_case(FORWARDED_FOR.as_str()) {
            self.has_forwarded_for = true;
        } else if name.eq_ignore_ascii_case(FORWARDED_HOST.as_str()) {
            self.has_forwarded_host = true;
        } else if name.eq_ignore_ascii_case("host") {
            self.host = Some(value);
        } else if name.eq_ignore_ascii_case("content-type") {
            self.content_type = Some(value);
        }
    }
}

impl<'a> Contract<'a> {
    /// The contract for a request with `facts`, from `client` (if known), to a replica reached with
    /// `agent_token` (if any); `generated_call_id` is a call id given to the request earlier
    /// (while it waited for a replica), if any.
    pub fn new(
        facts: &RequestFacts<'a>,
        client: Option<&'a [u8]>,
        agent_token: Option<&'a [u8]>,
        generated_call_id: Option<[u8; 36]>,
    ) -> Self {
        let generated_call_id = generated_call_id.or_else(|| {
            (!facts.has_call_id).then(|| {
                let mut id = [0u8; 36];
                uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id);
                id
            })
        });
        Contract {
            generated_call_id,
            start_time: unix_nanos().min(u64::MAX as u128) as u64,
            forwarded_for: client.filter(|_| !facts.has_forwarded_for),
            forwarded_host: facts.host.filter(|_| !facts.has_forwarded_host),
            agent_token,
            request_content_type: facts.content_type,
        }
    }

    /// The answer's part of a contract decided earlier (the request's buffer is gone).
    pub fn answering(
        generated_call_id: Option<[u8; 36]>,
        start_time: u64,
        request_content_type: Option<&'a [u8]>,
    ) -> Self {
        Contract {
            generated_call_id,
            start_time,
            forwarded_for: None,
            forwarded_host: None,
            agent_token: None,
            request_content_type,
        }
    }

    /// Whether a header of the client's request stays behind (besides hop-by-hop and
    /// nominated ones): the start time is the contract's, the host the replica's, and an agent
    /// token is ours to send. (`Content-Length` is the framing's: each path writes its own.)
    pub fn drops_request_header(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case("x-start-time")
            || name.eq_ignore_ascii_case("host")
            || (self.agent_token.is_some() && name.eq_ignore_ascii_case("x-faastastic-agent-token"))
            || (self.generated_call_id.is_some() && name.eq_ignore_ascii_case("x-call-id"))
    }

    /// The headers added on the way to the replica.
    pub fn request_headers(&self, mut add: impl FnMut(&'static str, &[u8])) {
        if let Some(id) = &self.generated_call_id {
            add("x-call-id", id);
        }
        add(
            "x-start-time",
            itoa::Buffer::new().format(self.start_time).as_bytes(),
        );
        if let Some(client) = self.forwarded_for {
            add("x-forwarded-for", client);
        }
        if let Some(host) = self.forwarded_host {
            add("x-forwarded-host", host);
        }
        if let Some(token) = self.agent_token {
            add("x-faastastic-agent-token", token);
        }
    }

    /// Whether a header of the replica's answer gives way to the contract's own.
    pub fn replaces_answer_header(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case("x-start-time")
            || (self.generated_call_id.is_some() && name.eq_ignore_ascii_case("x-call-id"))
    }

    /// The headers added to the answer; a `Content-Type` only when the answer has none.
    pub fn answer_headers(&self, has_content_type: bool, mut add: impl FnMut(&'static str, &[u8])) {
        if !has_content_type {
            add(
                "content-type",
                self.request_content_type.unwrap_or(b"text/plain"),
            );
        }
        if let Some(id) = &self.generated_call_id {
            add("x-call-id", id);
        }
        add(
            "x-start-time",
            itoa::Buffer::new().format(self.start_time).as_bytes(),
        );
    }
}

/// How long an upstream connection to a replica may wait unused before it is closed.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// What brings a function at zero replicas back for a held invocation: the autoscaler, which
/// decides it like any other replica change and audits it.
#[async_trait::async_trait]
pub trait Wake: Send + Sync {
    /// Asks for replicas of `id` in `datacenter` because `waiting` requests (the invocation
    /// `call_id` among them) wait for one; `Err` says why none will come.
    async fn wake(
        &self,
        id: &FunctionId,
        datacenter: &str,
        waiting: u64,
        call_id: Option<&str>,
    ) -> Result<(), String>;
}

pub struct Invoker {
    clients: Clients,
    pub(crate) activity: Arc<Activity>,
    /// Bounds the requests held while a function starts (or scales from zero).
    waiting: tokio::sync::Semaphore,
    /// Requests held per function, for the wake's audit.
    held: Mutex<HashMap<FunctionId, u64>>,
    waker: Arc<dyn Wake>,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) cfg: ProxyConfig,
}

/// A plain-text error marked as coming from the platform, not from the function.
fn internal_error(status: StatusCode, text: String) -> Response {
    let mut r = (status, format!("{text}\n")).into_response();
    r.headers_mut()
        .insert(INTERNAL, HeaderValue::from_static("proxy"));
    r
}

pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Invoker {
    pub fn new(
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        waker: Arc<dyn Wake>,
        cfg: ProxyConfig,
    ) -> Invoker {
        Invoker {
            activity,
            clients: Clients::new(cfg.connect_timeout, cfg.max_idle_per_replica),
            waiting: tokio::sync::Semaphore::new(cfg.max_waiting_requests),
            held: Mutex::default(),
            waker,
            fleet,
            metrics,
            cfg,
        }
    }

    /// Records an invocation's start (the activity clock and the started counter); returns
    /// the function's label for the metrics that follow.
    pub(crate) fn started(&self, id: &FunctionId) -> String {
        let function_name = id.qualified();
        self.activity.touch(id);
        self.metrics
            .invocation_started
            .with_label_values(&[function_name.as_str()])
            .inc();
        function_name
    }

    /// The answer to an invocation whose replica could not be reached or broke off.
    pub(crate) fn unreachable_text(id: &FunctionId) -> String {
        format!("Can't reach service for: {id}.")
    }

    /// The answer to an invocation that outlived its timeout: for an answer's head from
    /// `endpoint`, the function's `exec_timeout` when that is the shorter; else
    /// `proxy.upstream_timeout_secs`.
    pub(crate) fn timeout_text(&self, id: &FunctionId, endpoint: Option<&Endpoint>) -> String {
        let timeout = endpoint.map_or(self.cfg.upstream_timeout, |e| {
            e.timeout(self.cfg.upstream_timeout)
        });
        let which = if timeout < self.cfg.upstream_timeout {
            "the function's exec_timeout"
        } else {
            "proxy.upstream_timeout_secs"
        };
        format!("Timed out after {timeout:?} waiting for: {id} ({which})")
    }

    /// Resolves `name` or `name.namespace` to a deployed function, or the 400/404 answer.
    pub fn resolve(&self, raw: &str) -> Result<FunctionId, Box<Response>> {
        match self.lookup(raw) {
            Ok(id) => Ok(id),
            Err(Unresolved::Invalid(why)) => Err(Box::new(internal_error(
                StatusCode::BAD_REQUEST,
                format!("invalid function reference: {why} (use name or name.namespace)"),
            ))),
            Err(Unresolved::Missing(id)) => Err(Box::new(internal_error(
                StatusCode::NOT_FOUND,
                format!("function {id} not found"),
            ))),
        }
    }

    /// `name` or `name.namespace` as a deployed function's id.
    pub(crate) fn lookup(&self, raw: &str) -> Result<FunctionId, Unresolved> {
        // The same rule as the /system/* routes'; the namespace need not exist (an unknown
        // one finds no function).
        let (name, namespace) = function_ref(raw, None).map_err(Unresolved::Invalid)?;
        let id = FunctionId::new(name, namespace.unwrap_or(self.fleet.default_namespace()));
        if self.fleet.desired_replicas(&id).is_none() {
            return Err(Unresolved::Missing(id));
        }
        Ok(id)
    }

    /// Proxies one request to a ready replica of `id`; `suffix` is the path after
    /// `/function/{name}` (at least `/`).
    pub async fn invoke(&self, id: &FunctionId, suffix: &str, mut req: Request<Body>) -> Response {
        let pin = match req.headers().get(DATACENTER).map(|v| v.to_str()) {
            None => None,
            Some(Ok(dc)) if self.fleet.datacenter(dc).is_some() => Some(dc.to_string()),
            Some(value) => {
                let value = value.map_or_else(
                    |_| "(not text)".to_string(),
                    |v| format!("{:?}", crate::model::truncate_for_message(v)),
                );
                return internal_error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{DATACENTER}: {value} is not one of {}",
                        self.fleet.datacenter_names().join(", ")
                    ),
                );
            }
        };
        // As /system/scale-function answers it: a datacenter the function is not in.
        if let Some(dc) = &pin {
            if self
                .fleet
                .placement_of(id)
                .is_some_and(|placed| !placed.contains_key(dc))
            {
                return internal_error(
                    StatusCode::NOT_FOUND,
                    format!("function {id} is not in datacenter {dc}"),
                );
            }
        }
        let started = Instant::now();
        let function_name = self.started(id);
        let (response, datacenter) = self.forward(id, pin.as_deref(), suffix, &mut req).await;
        let code = response.status();
        self.metrics.invoked(
            &function_name,
            code.as_str(),
            &datacenter,
            started.elapsed().as_secs_f64(),
        );
        response
    }

    /// The response, and the datacenter that served it (or would have).
    async fn forward(
        &self,
        id: &FunctionId,
        pin: Option<&str>,
        suffix: &str,
        req: &mut Request<Body>,
    ) -> (Response, String) {
        // First of all: the hop headers are this hop's, whatever reads the request next (a
        // wake's audit reads its call id, the contract its forwarding headers; a nominated
        // `X-Forwarded-For` gives way to the real client address).
        strip_hop_by_hop(req.headers_mut());
        let (datacenter, endpoint) = match self.fleet.endpoints(id, pin) {
            Some((dc, set)) => match set.pick() {
                Some(e) => (dc, Ok(e)),
                None => self.ready_endpoint(id, pin, req).await,
            },
            None => self.ready_endpoint(id, pin, req).await,
        };
        let endpoint = match endpoint {
            Ok(e) => e,
            Err(why) => {
                let text = match why {
                    Some(why) => format!("No endpoints available for: {id}: {why}"),
                    None => format!("No endpoints available for: {id}."),
                };
                return (
                    internal_error(StatusCode::SERVICE_UNAVAILABLE, text),
                    datacenter,
                );
            }
        };
        let response = self.send_to(id, &datacenter, endpoint, suffix, req).await;
        (response, datacenter)
    }

    async fn send_to(
        &self,
        id: &FunctionId,
        datacenter: &str,
        claim: Claim,
        suffix: &str,
        req: &mut Request<Body>,
    ) -> Response {
        let endpoint = &claim.endpoint().clone();
        let path_and_query = match req.uri().query() {
            Some(q) => format!("{}{suffix}?{q}", endpoint.path_prefix),
            None => format!("{}{suffix}", endpoint.path_prefix),
        };
        let uri = match PathAndQuery::try_from(path_and_query) {
            Ok(path_and_query) => {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(match endpoint.https {
                    Some(_) => http::uri::Scheme::HTTPS,
                    None => http::uri::Scheme::HTTP,
                });
                parts.authority = Some(endpoint.authority.clone());
                parts.path_and_query = Some(path_and_query);
                Uri::from_parts(parts).expect("a scheme, an authority and a path make a URI")
            }
            Err(e) => {
                return internal_error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid request path: {e}"),
                )
            }
        };

        // The invoke contract, from the request's headers as they came; they stay here, and
        // the replica gets those the contract keeps plus its own.
        let incoming = std::mem::take(req.headers_mut());
        let mut facts = RequestFacts::default();
        for (name, value) in &incoming {
            facts.note(name.as_str(), value.as_bytes());
        }
        let client = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.to_string());
        let early = req.extensions().get::<GeneratedCallId>().map(|g| g.0);
        let contract = Contract::new(
            &facts,
            client.as_deref().map(str::as_bytes),
            endpoint.agent_token.as_ref().map(HeaderValue::as_bytes),
            early,
        );
        let headers = req.headers_mut();
        for (name, value) in &incoming {
            if !contract.drops_request_header(name.as_str()) {
                headers.append(name.clone(), value.clone());
            }
        }
        contract.request_headers(|name, value| set_header(headers, name, value));
        let outgoing = std::mem::take(req);
        let guard = claim;
        let sent_at = Instant::now();
        let timeout = Some(endpoint.timeout(self.cfg.upstream_timeout));
        let sent = match &endpoint.https {
            Some(https) => send(https, uri, outgoing, timeout).await,
            None => send(self.clients.get(), uri, outgoing, timeout).await,
        };
        match sent {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                // What hyper's client lets through but the invoke lane refuses: an upgrade
                // nobody asked for, a transfer coding other than one plain chunked (its
                // header goes with the hop, so the client would get coded bytes unmarked), a
                // length beside chunked framing (RFC 9112 §6.3: a sign of smuggling) and a
                // length that is not one plain number (relayed as it came).
                let refusal = refusal_of(&parts);
                if let Some((cause, text)) = refusal {
                    self.refused(id, datacenter, endpoint, cause, text);
                    return internal_error(StatusCode::BAD_GATEWAY, Self::unreachable_text(id));
                }
                strip_hop_by_hop(&mut parts.headers);
                for name in [START_TIME, CALL_ID] {
                    if contract.replaces_answer_header(name.as_str()) {
                        parts.headers.remove(name);
                    }
                }
                let has_content_type = parts.headers.contains_key(CONTENT_TYPE);
                contract.answer_headers(has_content_type, |name, value| {
                    set_header(&mut parts.headers, name, value)
                });
                if endpoint.direct.is_some() && !parts.headers.contains_key(DURATION_HEADER) {
                    let secs = crate::platform::seconds_since(sent_at);
                    set_header(&mut parts.headers, DURATION_HEADER, secs.as_bytes());
                }
                let small = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .is_some_and(|len| len <= BUFFER_RESPONSE_BYTES);
                if small {
                    let read = tokio::time::timeout(self.cfg.upstream_timeout, body.collect());
                    return match read.await {
                        Ok(Ok(collected)) => {
                            drop(guard);
                            Response::from_parts(parts, Body::from(collected.to_bytes()))
                        }
                        Ok(Err(e)) => {
                            // A sized body can only be cut short; anything else is the
                            // connection failing.
                            if e.is_incomplete_message() {
                                self.refused(id, datacenter, endpoint, "truncated", &e.to_string());
                            } else {
                                tracing::warn!(function = %id, replica = %endpoint.instance, error = %e, "upstream failed");
                            }
                            internal_error(StatusCode::BAD_GATEWAY, Self::unreachable_text(id))
                        }
                        Err(_) => {
                            internal_error(StatusCode::GATEWAY_TIMEOUT, self.timeout_text(id, None))
                        }
                    };
                }
                Response::from_parts(
                    parts,
                    Body::new(GuardedBody {
                        inner: body,
                        _guard: guard,
                    }),
                )
            }
            Err(UpstreamError::Timeout) => internal_error(
                StatusCode::GATEWAY_TIMEOUT,
                self.timeout_text(id, Some(endpoint)),
            ),
            Err(UpstreamError::Connect(e)) => {
                tracing::warn!(function = %id, replica = %endpoint.instance, error = %e, "upstream failed");
                internal_error(StatusCode::BAD_GATEWAY, Self::unreachable_text(id))
            }
            Err(UpstreamError::Malformed(cause, e)) => {
                self.refused(id, datacenter, endpoint, cause, &e);
                internal_error(StatusCode::BAD_GATEWAY, Self::unreachable_text(id))
            }
        }
    }

    /// Logs and counts a replica answer refused for breaking the protocol.
    pub(crate) fn refused(
        &self,
        id: &FunctionId,
        datacenter: &str,
        endpoint: &Endpoint,
        cause: &'static str,
        error: &str,
    ) {
        tracing::warn!(
            function = %id,
            datacenter,
            replica = %endpoint.instance,
            cause,
            "refused the replica's answer: {error}; the connection to it is closed"
        );
        self.metrics
            .upstream_protocol_errors
            .with_label_values(&[id.qualified().as_str(), datacenter, cause])
            .inc();
    }

    /// When no replica is ready (home's, or the pinned datacenter's): waits up to
    /// `ready_timeout` for one, first asking the autoscaler to wake a function at zero
    /// replicas in the datacenter it waits in. `Err` carries why no replica will come, when
    /// that is known.
    async fn ready_endpoint(
        &self,
        id: &FunctionId,
        pin: Option<&str>,
        req: &mut Request<Body>,
    ) -> (String, Result<Claim, Option<String>>) {
        let Some((dc, watch)) = self.fleet.wake_target(id, pin) else {
            let dc = pin.unwrap_or(self.fleet.home()).to_string();
            return (dc, Err(None));
        };
        let Ok(_permit) = self.waiting.try_acquire() else {
            tracing::warn!(function = %id, "too many requests waiting for a replica (proxy.max_waiting_requests)");
            return (dc, Err(None));
        };
        let _held = Held::start(&self.held, id);
        if self.fleet.desired_replicas(id) == Some(0) {
            // The wake is audited under this invocation's call id: it gets one now if it has
            // none (and is answered with it, as if forwarding had made it).
            let call_id = ensure_call_id(req);
            let waiting = self
                .held
                .lock()
                .map_or(1, |h| h.get(id).copied().unwrap_or(1));
            if let Err(why) = self.waker.wake(id, &dc, waiting, call_id.as_deref()).await {
                tracing::warn!(function = %id, datacenter = %dc, "not woken from zero: {why}");
                return (dc, Err(Some(why)));
            }
        }
        let Some(mut ready) = watch.or_else(|| self.fleet.wake_target(id, Some(&dc))?.1) else {
            return (dc, Err(None));
        };
        self.metrics.waiting_requests.inc();
        let _ = tokio::time::timeout(self.cfg.ready_timeout, ready.wait_for(|n| *n > 0)).await;
        self.metrics.waiting_requests.dec();
        let endpoint = self
            .fleet
            .endpoints(id, Some(&dc))
            .and_then(|(_, set)| set.pick());
        (dc, endpoint.ok_or(None))
    }
}

/// One request held for a replica of a function, counted while it lives.
struct Held<'a> {
    held: &'a Mutex<HashMap<FunctionId, u64>>,
    id: &'a FunctionId,
}

impl<'a> Held<'a> {
    fn start(held: &'a Mutex<HashMap<FunctionId, u64>>, id: &'a FunctionId) -> Self {
        if let Ok(mut h) = held.lock() {
            *h.entry(id.clone()).or_default() += 1;
        }
        Held { held, id }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut h) = self.held.lock() {
            if let Some(n) = h.get_mut(self.id) {
                *n -= 1;
                if *n == 0 {
                    h.remove(self.id);
                }
            }
        }
    }
}

/// A call id generated before forwarding, which the answer carries back.
#[derive(Clone, Copy)]
struct GeneratedCallId([u8; 36]);

/// The request's `X-Call-Id`, given one when it has none.
fn ensure_call_id(req: &mut Request<Body>) -> Option<String> {
    if let Some(id) = req.headers().get(CALL_ID) {
        return id.to_str().ok().map(str::to_string);
    }
    let mut id = [0u8; 36];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id);
    let text = String::from_utf8_lossy(&id).into_owned();
    let value = HeaderValue::from_str(&text).expect("a UUID is a valid header value");
    req.headers_mut().insert(CALL_ID, value);
    req.extensions_mut().insert(GeneratedCallId(id));
    Some(text)
}

/// Sets one of the contract's headers (its names are static, its values already header-safe:
/// they come from the request's own headers, a UUID, a number or an address).
fn set_header(headers: &mut HeaderMap, name: &'static str, value: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_reads_the_last_invocation_through_either_way_of_marking_it() {
        let activity = Activity::default();
        let id = FunctionId::new("f", "ns");
        assert_eq!(activity.last(&id), None);
        let clock = activity.clock(&id);
        assert_eq!(
            activity.last(&id),
            None,
            "a clock not yet stamped saw nothing"
        );
        let before = chrono::Utc::now() - chrono::Duration::milliseconds(1);
        stamp(&clock);
        let stamped = activity.last(&id).expect("stamped");
        assert!(stamped >= before && stamped <= chrono::Utc::now());
        clock.store(0, Ordering::Relaxed);
        activity.touch(&id);
        assert!(
            activity.last(&id).expect("touched") >= before,
            "the same clock"
        );
        let other = FunctionId::new("g", "ns");
        activity.touch(&other);
        assert!(activity.last(&other).is_some());
    }
}
