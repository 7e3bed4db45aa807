//! The invoke lane: a purpose-built HTTP/1.1 path for the common invocation, in front of the
//! general server. It reads a request head, and when the request is an HTTP/1.1
//! `/function/NAME[/path]` call with a `Content-Length` body (or none) to a deployed function
//! with a ready replica, it forwards it over a pooled keep-alive connection and relays the
//! answer itself: one read and one write on each side per request, no per-request tasks,
//! channels or header maps. Anything else (the API, chunked or large request bodies,
//! `Expect`, upgrades, HTTP/1.0, a function without a ready replica, a malformed head) is
//! handed, with the bytes already read, to the general server, which then serves the rest of
//! the connection. Both paths forward and answer the same headers.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::model::FunctionId;
use crate::platform::{Claim, Endpoint};
use crate::proxy::{plain_decimal, Contract, Invoker, RequestFacts, DATACENTER, POOL_IDLE_TIMEOUT};
use crate::telemetry::Invocation;

/// Longest request or response head the lane reads; longer ones go to the general server
/// (which answers 431) or fail the exchange.
const MAX_HEAD: usize = 64 * 1024;
/// Headers per head the lane parses; more go to the general server.
const MAX_HEADERS: usize = 100;
/// Largest request body the lane buffers; larger ones are streamed by the general server.
const MAX_BODY: usize = 1024 * 1024;
/// Buffers grown beyond this are given back between requests.
const SPARE_BUFFER: usize = 128 * 1024;
/// Responses up to this size are relayed in one write with their head.
const BUFFER_RESPONSE: usize = 64 * 1024;
/// Headers that describe one hop (`Host`, `Content-Length` and `X-Start-Time` are not
/// forwarded either: the lane writes its own).
fn is_hop_by_hop(name: &str) -> bool {
    crate::proxy::HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().eq_ignore_ascii_case(name))
}

/// What the caller does with a connection the lane has finished with.
pub enum Finished {
    /// Closed (or to be closed): the client left, asked to close, or broke the protocol.
    Closed,
    /// The general server serves the rest, starting with the bytes already read.
    HandOff(TcpStream, Bytes),
}

/// An upstream connection waiting for its next request, and since when.
type Idle = (TcpStream, Instant);

/// Upstream connections, pooled per thread and per replica (keyed by the replica record's
/// address; the weak reference tells a live record from a reused address).
#[derive(Default)]
struct Pools {
    by_replica: foldhash::HashMap<usize, (Weak<Endpoint>, Vec<Idle>)>,
}

impl Pools {
    /// Closes the connections idle for `longer_than` or more, and forgets replicas that are
    /// gone or have no connection left.
    fn close_idle(&mut self, longer_than: Duration) {
        self.by_replica.retain(|_, (replica, idle)| {
            // Oldest first: connections are checked in at the end.
            let stale = idle.partition_point(|(_, since)| since.elapsed() >= longer_than);
            idle.drain(..stale);
            replica.strong_count() > 0 && !idle.is_empty()
        });
    }
}

/// One function's invocation series and activity clock, kept per thread so that a request
/// counts itself without looking them up by name.
struct Meter {
    started: prometheus::IntCounter,
    activity: Arc<AtomicI64>,
    /// By status code and datacenter: a function's answers use few of them.
    answered: Vec<(u16, String, Invocation)>,
}

/// A thread's meters stop growing here (and start again): bounds memory for a caller
/// touring many functions.
const MAX_METERS: usize = 4096;

pub struct Lane {
    invoker: Arc<Invoker>,
    header_timeout: Duration,
    idle_timeout: Duration,
    pools: thread_local::ThreadLocal<RefCell<Pools>>,
    meters: thread_local::ThreadLocal<RefCell<foldhash::HashMap<FunctionId, Meter>>>,
}

/// A request the lane serves, worked out from its head.
struct Plan {
    head_len: usize,
    body_len: usize,
    /// The client keeps the connection open after this exchange.
    keep_alive: bool,
    head_request: bool,
    /// The method may be sent twice (RFC 9110 idempotent methods).
    repeatable: bool,
    id: FunctionId,
    datacenter: String,
    /// The replica, claimed from the pick on (drained if it is being removed).
    endpoint: Claim,
    request_content_type: Option<Vec<u8>>,
    generated_call_id: Option<[u8; 36]>,
    start_time: u64,
}

/// How a response body is delimited.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    /// Until the upstream closes (the client connection closes after it too).
    Close,
}

/// Why an exchange with a replica failed before any answer reached the client.
enum Upstream {
    Timeout,
    Failed(String),
    /// The answer broke the protocol.
    Malformed(Malformed),
}

impl Plan {
    /// For the answer to a request sent at `sent`.
    fn answer_context(&self, sent: Instant) -> AnswerContext<'_> {
        AnswerContext {
            keep_alive: self.keep_alive,
            duration_since: self.endpoint.direct.map(|_| sent),
            contract: Contract::answering(
                self.generated_call_id,
                self.start_time,
                self.request_content_type.as_deref(),
            ),
        }
    }
}

impl Lane {
    pub fn new(invoker: Arc<Invoker>, header_timeout: Duration, idle_timeout: Duration) -> Lane {
        Lane {
            invoker,
            header_timeout,
            idle_timeout,
            pools: thread_local::ThreadLocal::new(),
            meters: thread_local::ThreadLocal::new(),
        }
    }

    /// Serves invocations on `client` until the connection ends or has to be handed off.
    pub async fn serve(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Finished {
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut upstream_head = Vec::with_capacity(1024);
        let mut answer = Vec::with_capacity(1024);
        let mut from_replica = BytesMut::with_capacity(8 * 1024);
        let peer_text = peer.to_string();
        let mut first = true;
        // Waited on whenever the connection is idle: registered once, not per request.
        let stopping = shutdown.clone().cancelled_owned();
        tokio::pin!(stopping);
        let idle = tokio::time::sleep(self.idle_timeout);
        tokio::pin!(idle);
        // When the last exchange on this connection ended: the start of its idle time.
        let mut idle_since = Instant::now();
        loop {
            // An idle connection does not keep what a large body or answer grew its buffers to.
            if buf.is_empty() && buf.capacity() > SPARE_BUFFER {
                buf = BytesMut::with_capacity(8 * 1024);
            }
            if from_replica.capacity() > SPARE_BUFFER {
                from_replica = BytesMut::with_capacity(8 * 1024);
            }
            if answer.capacity() > SPARE_BUFFER {
                answer = Vec::with_capacity(1024);
            }
            // A complete request head (the header deadline runs from accept for the first
            // request, from its first byte for the next ones).
            let mut deadline =
                (first || !buf.is_empty()).then(|| Instant::now() + self.header_timeout);
            first = false;
            let plan = loop {
                upstream_head.clear();
                if !buf.is_empty() {
                    match self.plan(&buf, &peer_text, &mut upstream_head) {
                        Parsed::Serve(plan) => break plan,
                        Parsed::HandOff => return Finished::HandOff(client, buf.freeze()),
                        Parsed::Partial if buf.len() >= MAX_HEAD => {
                            return Finished::HandOff(client, buf.freeze())
                        }
                        Parsed::Partial => {}
                    }
                }
                let read = match deadline {
                    // Between requests: until the idle timeout, or shutdown. The idle timer
                    // is armed once per connection and moved only when it fires early, so a
                    // busy connection does not register a timer per request.
                    None => loop {
                        tokio::select! {
                            // Shutdown first; then a request already waiting wins over a
                            // timer that ran out.
                            biased;
                            _ = &mut stopping => return Finished::Closed,
                            r = client.read_buf(&mut buf) => break r,
                            _ = &mut idle => {
                                let due = idle_since + self.idle_timeout;
                                if Instant::now() >= due {
                                    return Finished::Closed;
                                }
                                idle.as_mut().reset(due.into());
                            }
                        }
                    },
                    Some(at) => {
                        match tokio::time::timeout_at(at.into(), client.read_buf(&mut buf)).await {
                            Ok(r) => r,
                            Err(_) => return Finished::Closed,
                        }
                    }
                };
                match read {
                    Ok(0) | Err(_) => return Finished::Closed,
                    Ok(_) => {
                        deadline.get_or_insert_with(|| Instant::now() + self.header_timeout);
                    }
                }
            };
            buf.advance(plan.head_len);
            // The body, within the time the general path gives a request to reach its
            // replica and be answered.
            let whole = buf.len() >= plan.body_len;
            let body = async {
                while buf.len() < plan.body_len {
                    if client.read_buf(&mut buf).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                io::Result::Ok(())
            };
            let started = Instant::now();
            // No timer when the body came with the head (the usual case).
            let read = if whole {
                Ok(Ok(()))
            } else {
                let due = started + self.invoker.cfg.upstream_timeout;
                tokio::time::timeout_at(due.into(), body).await
            };
            match read {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Finished::Closed,
                Err(_) => {
                    // As the general path answers a body that stalls on its way to the replica.
                    self.count_start(&plan.id, plan.start_time);
                    let status = http::StatusCode::GATEWAY_TIMEOUT;
                    self.count_answer(&plan.id, status.as_u16(), &plan.datacenter, started);
                    let text = self.invoker.timeout_text(&plan.id, None);
                    write_internal_error(&mut client, status, &text, false).await;
                    return Finished::Closed;
                }
            }
            upstream_head.extend_from_slice(&buf[..plan.body_len]);
            buf.advance(plan.body_len);

            let keep = self
                .exchange(
                    &plan,
                    started,
                    &upstream_head,
                    &mut client,
                    &mut from_replica,
                    &mut answer,
                )
                .await;
            if !keep || !plan.keep_alive || shutdown.is_cancelled() {
                let _ = client.shutdown().await;
                return Finished::Closed;
            }
            // Idle from here, once the whole answer has left.
            idle_since = Instant::now();
        }
    }

    /// Parses the head at the start of `buf`; for a request the lane serves, writes the head
    /// for the replica (without the body) into `out`.
    fn plan(&self, buf: &[u8], peer: &str, out: &mut Vec<u8>) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::HandOff,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::HandOff;
        };
        if !crate::proxy::METHODS.iter().any(|m| m.as_str() == method) {
            return Parsed::HandOff;
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        if !path.starts_with("/function/") {
            return Parsed::HandOff;
        }
        let mut keep_alive = true;
        let mut body_len = None;
        let mut facts = RequestFacts::default();
        for h in req.headers.iter() {
            facts.note(h.name, h.value);
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                let Some(n) = std::str::from_utf8(h.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok())
                else {
                    return Parsed::HandOff;
                };
                if body_len.is_some_and(|m| m != n) || n > MAX_BODY {
                    return Parsed::HandOff;
                }
                body_len = Some(n);
            } else if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        return Parsed::HandOff;
                    }
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("expect")
                || name.eq_ignore_ascii_case("upgrade")
                || name.eq_ignore_ascii_case(DATACENTER.as_str())
            {
                return Parsed::HandOff;
            }
        }
        let (raw_name, suffix) = crate::proxy::split_path(path, "/function/");
        let Ok(id) = self.invoker.lookup(raw_name) else {
            return Parsed::HandOff;
        };
        let Some((datacenter, endpoint)) = self
            .invoker
            .fleet
            .endpoints(&id, None)
            .and_then(|(dc, set)| Some((dc, set.pick()?)))
        else {
            return Parsed::HandOff;
        };
        // A datacenter reached over TLS: the general path speaks it.
        if endpoint.https.is_some() {
            return Parsed::HandOff;
        }

        let contract = Contract::new(
            &facts,
            Some(peer.as_bytes()),
            endpoint
                .agent_token
                .as_ref()
                .map(http::HeaderValue::as_bytes),
            None,
        );
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(endpoint.path_prefix.as_bytes());
        out.extend_from_slice(suffix.as_bytes());
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(endpoint.authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in req.headers.iter() {
            let name = h.name;
            if is_hop_by_hop(name)
                || name.eq_ignore_ascii_case("content-length")
                || contract.drops_request_header(name)
            {
                continue;
            }
            header(out, name.as_bytes(), h.value);
        }
        contract.request_headers(|name, value| header(out, name.as_bytes(), value));
        if let Some(n) = body_len {
            header(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        // The answer's part of the contract outlives the request's buffer.
        let (generated_call_id, start_time) = (contract.generated_call_id, contract.start_time);
        let request_content_type = contract.request_content_type.map(<[u8]>::to_vec);
        Parsed::Serve(Plan {
            head_len,
            body_len: body_len.unwrap_or(0),
            keep_alive,
            head_request: method == "HEAD",
            repeatable: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
            id,
            datacenter,
            endpoint,
            request_content_type,
            generated_call_id,
            start_time,
        })
    }

    /// Forwards `request` (head and body) and relays the answer to `client`; false when the
    /// client connection must close.
    async fn exchange(
        &self,
        plan: &Plan,
        started: Instant,
        request: &[u8],
        client: &mut TcpStream,
        from_replica: &mut BytesMut,
        answer: &mut Vec<u8>,
    ) -> bool {
        self.count_start(&plan.id, plan.start_time);
        let finish = |code: u16| self.count_answer(&plan.id, code, &plan.datacenter, started);
        from_replica.clear();
        let sent = Instant::now();
        let (mut upstream, head) = match self.send(plan, started, request, from_replica).await {
            Ok(sent) => sent,
            Err(e) => return self.fail(plan, client, started, e).await,
        };
        answer.clear();
        answer_head(&plan.answer_context(sent), &head, answer);
        from_replica.advance(head.len);

        // Until the close: relayed as it comes, and the client connection closes after it.
        let Some(mut end) = BodyEnd::of(head.framing) else {
            finish(head.status);
            let _ = client.write_all(answer).await;
            let _ = client.write_all(from_replica).await;
            let _ = tokio::io::copy(&mut upstream, client).await;
            return false;
        };
        // A small sized body is read whole, so that head and body leave in one write and a
        // body that never comes is a 502.
        if let Framing::Length(n) = head.framing {
            if n <= BUFFER_RESPONSE && from_replica.len() < n {
                let read = async {
                    while from_replica.len() < n {
                        if upstream.read_buf(from_replica).await? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                    io::Result::Ok(())
                };
                match tokio::time::timeout(self.invoker.cfg.upstream_timeout, read).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        return self
                            .fail(
                                plan,
                                client,
                                started,
                                Upstream::Malformed(Malformed::Truncated),
                            )
                            .await
                    }
                    Err(_) => return self.fail(plan, client, started, Upstream::Timeout).await,
                }
            }
        }
        // What has arrived of the body is checked before the head leaves: an answer that is
        // already whole and breaks its framing is a 502.
        let (used, done) = match end.feed(from_replica) {
            Ok(progress) => progress,
            Err(cause) => {
                return self
                    .fail(plan, client, started, Upstream::Malformed(cause))
                    .await
            }
        };
        let mut ended = finish(head.status);
        answer.extend_from_slice(&from_replica[..used]);
        from_replica.advance(used);
        if client.write_all(answer).await.is_err() {
            return false;
        }
        if !done {
            match relay_body(&mut upstream, client, from_replica, &mut end).await {
                Ok(()) => ended = Instant::now(),
                Err(Broken::Malformed(cause)) => {
                    // The head has left: the client learns of it by the connection closing.
                    self.refused(plan, cause);
                    return false;
                }
                Err(Broken::Client | Broken::Upstream) => return false,
            }
        }
        // Reused only when the answer ended exactly where its framing said.
        if head.reusable && from_replica.is_empty() {
            self.check_in(plan.endpoint.endpoint(), upstream, ended);
        }
        true
    }

    /// Answers the client for an exchange that failed before any of the answer was sent;
    /// false when the client connection must close.
    async fn fail(
        &self,
        plan: &Plan,
        client: &mut TcpStream,
        started: Instant,
        e: Upstream,
    ) -> bool {
        let (status, text) = match e {
            Upstream::Timeout => (
                http::StatusCode::GATEWAY_TIMEOUT,
                self.invoker.timeout_text(&plan.id, Some(&plan.endpoint)),
            ),
            Upstream::Failed(e) => {
                tracing::warn!(function = %plan.id, replica = %plan.endpoint.instance, error = %e, "upstream failed");
                (
                    http::StatusCode::BAD_GATEWAY,
                    Invoker::unreachable_text(&plan.id),
                )
            }
            Upstream::Malformed(cause) => {
                self.refused(plan, cause);
                (
                    http::StatusCode::BAD_GATEWAY,
                    Invoker::unreachable_text(&plan.id),
                )
            }
        };
        self.count_answer(&plan.id, status.as_u16(), &plan.datacenter, started);
        write_internal_error(client, status, &text, plan.keep_alive).await
    }

    /// Logs and counts an answer refused for breaking the protocol.
    fn refused(&self, plan: &Plan, cause: Malformed) {
        self.invoker.refused(
            &plan.id,
            &plan.datacenter,
            &plan.endpoint,
            cause.cause(),
            &cause.to_string(),
        );
    }

    /// Sends the request on a pooled connection (once more on a new one if the pooled one
    /// turns out closed before answering) and reads the answer's head.
    async fn send(
        &self,
        plan: &Plan,
        started: Instant,
        request: &[u8],
        from_replica: &mut BytesMut,
    ) -> Result<(TcpStream, ResponseHead), Upstream> {
        let cfg = &self.invoker.cfg;
        // The answer's head is due within the upstream timeout of the request's start, and,
        // for a function's server reached directly, within its exec timeout of being sent.
        let mut due = started + cfg.upstream_timeout;
        if let Some(exec) = plan.endpoint.direct.and_then(|d| d.exec_timeout) {
            due = due.min(Instant::now() + exec);
        }
        let due = tokio::time::Instant::from(due);
        if let Some(mut pooled) = self.check_out(plan.endpoint.endpoint()) {
            // A write that fails means the replica had closed: it cannot have run the request.
            if pooled.write_all(request).await.is_ok() {
                match tokio::time::timeout_at(
                    due,
                    read_response_head(&mut pooled, from_replica, plan.head_request),
                )
                .await
                {
                    Err(_) => return Err(Upstream::Timeout),
                    Ok(Ok(head)) => return Ok((pooled, head)),
                    // Closed by the replica before any byte of an answer: try afresh, unless
                    // the request may not be repeated (the replica may have run it).
                    Ok(Err(Upstream::Failed(_))) if from_replica.is_empty() && plan.repeatable => {}
                    Ok(Err(e)) => return Err(e),
                }
            }
            from_replica.clear();
        }
        let mut fresh =
            match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(plan.endpoint.addr))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(Upstream::Failed(format!("connect: {e}"))),
                Err(_) => return Err(Upstream::Failed("connect: timed out".into())),
            };
        let _ = fresh.set_nodelay(true);
        fresh
            .write_all(request)
            .await
            .map_err(|e| Upstream::Failed(e.to_string()))?;
        match tokio::time::timeout_at(
            due,
            read_response_head(&mut fresh, from_replica, plan.head_request),
        )
        .await
        {
            Err(_) => Err(Upstream::Timeout),
            Ok(Ok(head)) => Ok((fresh, head)),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Counts an invocation of `id` as started and marks the function active, as
    /// [`Invoker::started`] does.
    fn count_start(&self, id: &FunctionId, unix_nanos: u64) {
        let millis = (unix_nanos / 1_000_000) as i64;
        let mut meters = self.meters.get_or_default().borrow_mut();
        if let Some(meter) = meters.get(id) {
            meter.activity.store(millis, Ordering::Relaxed);
            meter.started.inc();
            return;
        }
        if meters.len() >= MAX_METERS {
            meters.clear();
        }
        let meter = Meter {
            started: self
                .invoker
                .metrics
                .invocation_started
                .with_label_values(&[id.qualified().as_str()]),
            activity: self.invoker.activity.clock(id),
            answered: Vec::new(),
        };
        meter.activity.store(millis, Ordering::Relaxed);
        meter.started.inc();
        meters.insert(id.clone(), meter);
    }

    /// Counts an invocation of `id` started at `started`, answered with `code` on behalf of
    /// `datacenter`; returns the moment of the answer.
    fn count_answer(
        &self,
        id: &FunctionId,
        code: u16,
        datacenter: &str,
        started: Instant,
    ) -> Instant {
        let now = Instant::now();
        let seconds = now.saturating_duration_since(started).as_secs_f64();
        let mut meters = self.meters.get_or_default().borrow_mut();
        let Some(meter) = meters.get_mut(id) else {
            // Dropped between start and answer (the thread's meters were full): count it
            // the long way.
            let code = itoa::Buffer::new().format(code).to_owned();
            let name = id.qualified();
            self.invoker
                .metrics
                .invoked(&name, &code, datacenter, seconds);
            return now;
        };
        let known = meter
            .answered
            .iter()
            .position(|(c, dc, _)| *c == code && dc == datacenter);
        let at = known.unwrap_or_else(|| {
            let series = self.invoker.metrics.invocation(
                &id.qualified(),
                itoa::Buffer::new().format(code),
                datacenter,
            );
            meter.answered.push((code, datacenter.to_string(), series));
            meter.answered.len() - 1
        });
        meter.answered[at].2.record(seconds);
        now
    }

    fn check_out(&self, endpoint: &Arc<Endpoint>) -> Option<TcpStream> {
        let mut pools = self.pools.get_or_default().borrow_mut();
        let (replica, idle) = pools
            .by_replica
            .get_mut(&(Arc::as_ptr(endpoint) as usize))?;
        if replica.strong_count() == 0 {
            return None;
        }
        // Every idle connection is looked at: one the replica closed, or wrote to unasked
        // (late bytes of an answer), is dropped.
        while let Some((stream, _)) = idle.pop() {
            if is_open(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Closes this thread's upstream connections idle longer than the general path keeps
    /// them, and forgets the replicas that are gone.
    pub fn sweep(&self) {
        if let Some(pools) = self.pools.get() {
            pools.borrow_mut().close_idle(POOL_IDLE_TIMEOUT);
        }
    }

    fn check_in(&self, endpoint: &Arc<Endpoint>, stream: TcpStream, now: Instant) {
        let max = self.invoker.cfg.max_idle_per_replica;
        let mut pools = self.pools.get_or_default().borrow_mut();
        let entry = pools
            .by_replica
            .entry(Arc::as_ptr(endpoint) as usize)
            .or_insert_with(|| (Arc::downgrade(endpoint), Vec::new()));
        if entry.0.strong_count() == 0 {
            // Another replica's record at a reused address.
            *entry = (Arc::downgrade(endpoint), Vec::new());
        }
        if entry.1.len() < max {
            entry.1.push((stream, now));
        }
    }
}

/// Now as an HTTP date, formatted once a second per thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static LAST: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let (at, text) = last.get();
        if at == second && second != 0 {
            return text;
        }
        let mut text = [b' '; 29];
        let formatted = httpdate::fmt_http_date(now);
        let n = formatted.len().min(29);
        text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        last.set((second, text));
        text
    })
}

/// Whether the replica has not closed (nor written unasked to) an idle connection.
fn is_open(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a non-blocking peek of at most one byte into a local.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

enum Parsed {
    Serve(Plan),
    Partial,
    HandOff,
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A plain-text answer marked as the platform's, as the general path writes them; false when
/// the connection must close.
async fn write_internal_error(
    client: &mut TcpStream,
    status: http::StatusCode,
    text: &str,
    keep_alive: bool,
) -> bool {
    let body = format!("{text}\n");
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status}\r\n").as_bytes());
    header(&mut out, b"content-type", b"text/plain; charset=utf-8");
    header(&mut out, b"x-openfaas-internal", b"proxy");
    header(
        &mut out,
        b"content-length",
        itoa::Buffer::new().format(body.len()).as_bytes(),
    );
    header(&mut out, b"date", &http_date());
    if !keep_alive {
        header(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    client.write_all(&out).await.is_ok() && keep_alive
}

/// Why the lane refused a replica's answer: it broke HTTP/1.1's framing or grammar (RFC
/// 9112). The client gets a 502 (or, once the head has left, a closed connection), the
/// upstream connection is closed, and [`Malformed::cause`] labels
/// `faastastic_upstream_protocol_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not a valid status line and header section.
    Head,
    /// A head longer than the lane reads.
    HeadTooLarge,
    /// A status code below 100.
    Status,
    /// `101 Switching Protocols`, which the lane never asks for.
    Upgrade,
    /// A `Content-Length` that is not a plain decimal number, or two that differ.
    ContentLength,
    /// `Transfer-Encoding` other than one plain `chunked`, on an HTTP/1.0 answer, or beside a
    /// `Content-Length`.
    TransferEncoding,
    /// A chunked body outside the grammar: sizes, line ends, extensions, trailers.
    Chunked,
    /// The answer ended before its framing said it would.
    Truncated,
}

impl Malformed {
    /// The metric label.
    pub fn cause(self) -> &'static str {
        match self {
            Malformed::Head => "head",
            Malformed::HeadTooLarge => "head_too_large",
            Malformed::Status => "status",
            Malformed::Upgrade => "upgrade",
            Malformed::ContentLength => "content_length",
            Malformed::TransferEncoding => "transfer_encoding",
            Malformed::Chunked => "chunked",
            Malformed::Truncated => "truncated",
        }
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Malformed::Head => "the replica's answer head is not valid HTTP/1.1",
            Malformed::HeadTooLarge => "the replica's answer head is too large",
            Malformed::Status => "the replica answered a status code below 100",
            Malformed::Upgrade => "the replica switched protocols unasked",
            Malformed::ContentLength => "the replica sent an invalid or conflicting Content-Length",
            Malformed::TransferEncoding => {
                "the replica sent a Transfer-Encoding other than one chunked on HTTP/1.1 without Content-Length"
            }
            Malformed::Chunked => "the replica's chunked body breaks the chunked grammar",
            Malformed::Truncated => "the replica's answer ended before its framing did",
        })
    }
}

/// Headers the lane may add to a replica's answer head (content type, call id, start time,
/// date, framing, connection).
const ADDED_HEADERS: usize = 6;

/// Chunk extension bytes a chunked answer may carry in all.
const MAX_CHUNK_EXTENSIONS: usize = 4 * 1024;
/// A chunked answer's trailer section at most: bytes, and fields.
const MAX_TRAILER_BYTES: usize = 8 * 1024;
const MAX_TRAILER_FIELDS: usize = 64;

/// A replica's answer head: where it ends in the read buffer, its status, framing and the
/// header positions.
struct ResponseHead {
    len: usize,
    status: u16,
    framing: Framing,
    /// The connection can carry another request after this answer.
    reusable: bool,
    raw: Bytes,
    spans: Vec<(usize, usize, usize, usize)>,
    /// Header names the answer's `Connection` header nominates (positions in `raw`): they
    /// describe the hop and are not relayed.
    nominated: Vec<(usize, usize)>,
}

impl ResponseHead {
    fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.spans.iter().map(|&(ns, ne, vs, ve)| {
            let name = std::str::from_utf8(&self.raw[ns..ne]).unwrap_or("");
            (name, &self.raw[vs..ve])
        })
    }

    fn is_nominated(&self, name: &str) -> bool {
        self.nominated
            .iter()
            .any(|&(s, e)| self.raw[s..e].eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// What the client's answer head is made with, besides the replica's head.
struct AnswerContext<'a> {
    keep_alive: bool,
    /// When the request left for a function's server reached directly: the answer says how
    /// long it took (`X-Duration-Seconds`) unless the function said it.
    duration_since: Option<Instant>,
    /// The answer's part of the invoke contract.
    contract: Contract<'a>,
}

/// Reads until a final (non-1xx) answer head is complete in `buf`; interim answers are
/// dropped.
async fn read_response_head<R: AsyncRead + Unpin>(
    upstream: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<ResponseHead, Upstream> {
    loop {
        if !buf.is_empty() {
            match parse_response_head(buf, head_request).map_err(Upstream::Malformed)? {
                HeadParse::Final(head) => return Ok(head),
                HeadParse::Interim => continue,
                HeadParse::Partial => {}
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(Upstream::Malformed(Malformed::HeadTooLarge));
        }
        match upstream.read_buf(buf).await {
            // A close in the middle of a head is a cut answer; before any byte, a closed
            // connection (which a pooled request may retry).
            Ok(0) if !buf.is_empty() => return Err(Upstream::Malformed(Malformed::Truncated)),
            Ok(0) => return Err(Upstream::Failed("closed before answering".into())),
            Ok(_) => {}
            Err(e) => return Err(Upstream::Failed(e.to_string())),
        }
    }
}

enum HeadParse {
    /// More bytes are needed.
    Partial,
    /// An interim (1xx) answer was consumed from the buffer.
    Interim,
    Final(ResponseHead),
}

/// Parses the answer head at the start of `buf` (RFC 9112 §6.3 decides the framing).
fn parse_response_head(buf: &mut BytesMut, head_request: bool) -> Result<HeadParse, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf).map_err(|_| Malformed::Head)? {
        httparse::Status::Partial => return Ok(HeadParse::Partial),
        httparse::Status::Complete(n) => n,
    };
    // The relayed head gets up to `ADDED_HEADERS` of the lane's own: it stays within what a
    // client reads (hyper's limit is `MAX_HEADERS`).
    if resp.headers.len() + ADDED_HEADERS > MAX_HEADERS {
        return Err(Malformed::HeadTooLarge);
    }
    let status = resp.code.ok_or(Malformed::Head)?;
    match status {
        0..=99 => return Err(Malformed::Status),
        101 => return Err(Malformed::Upgrade),
        100..=199 => {
            buf.advance(len);
            return Ok(HeadParse::Interim);
        }
        _ => {}
    }
    let http10 = resp.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = http10;
    let base = buf.as_ptr() as usize;
    let mut spans = Vec::with_capacity(resp.headers.len());
    let mut nominated = Vec::new();
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = plain_decimal(h.value).ok_or(Malformed::ContentLength)?;
            if length.is_some_and(|m| m != n) {
                return Err(Malformed::ContentLength);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // One plain `chunked` only: another coding would be lost with the header, and a
            // second header is a framing doubt.
            if chunked || !h.value.eq_ignore_ascii_case(b"chunked") {
                return Err(Malformed::TransferEncoding);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.is_empty()
                    && !token.eq_ignore_ascii_case(b"keep-alive")
                    // The framing is the lane's to write, whatever the hop says.
                    && !token.eq_ignore_ascii_case(b"content-length")
                    && !token.eq_ignore_ascii_case(b"transfer-encoding")
                {
                    let start = token.as_ptr() as usize - base;
                    nominated.push((start, start + token.len()));
                }
            }
        }
        let ns = name.as_ptr() as usize - base;
        let vs = h.value.as_ptr() as usize - base;
        spans.push((ns, ns + name.len(), vs, vs + h.value.len()));
    }
    if chunked && (http10 || length.is_some()) {
        return Err(Malformed::TransferEncoding);
    }
    let bodiless = head_request || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(usize::try_from(n).map_err(|_| Malformed::ContentLength)?)
    } else {
        Framing::Close
    };
    // A bodiless answer that announced a body may be followed by it: the connection is not
    // trusted with another request.
    let announced_body = chunked || length.is_some_and(|n| n > 0);
    let reusable = !close && framing != Framing::Close && !(bodiless && announced_body);
    let raw = Bytes::copy_from_slice(&buf[..len]);
    Ok(HeadParse::Final(ResponseHead {
        len,
        status,
        framing,
        reusable,
        raw,
        spans,
        nominated,
    }))
}

/// Where a response body ends, fed the bytes as they arrive.
enum BodyEnd {
    Length(usize),
    Chunked(Chunks),
}

impl BodyEnd {
    /// The end of a body framed so; `None` when it runs until the close.
    fn of(framing: Framing) -> Option<BodyEnd> {
        match framing {
            Framing::Empty => Some(BodyEnd::Length(0)),
            Framing::Length(n) => Some(BodyEnd::Length(n)),
            Framing::Chunked => Some(BodyEnd::Chunked(Chunks::default())),
            Framing::Close => None,
        }
    }

    /// How many bytes at the start of `buf` belong to the body, and whether it ended there.
    fn feed(&mut self, buf: &[u8]) -> Result<(usize, bool), Malformed> {
        match self {
            BodyEnd::Length(left) => {
                let take = buf.len().min(*left);
                *left -= take;
                Ok((take, *left == 0))
            }
            BodyEnd::Chunked(chunks) => chunks.feed(buf),
        }
    }
}

/// Why relaying a body stopped early.
enum Broken {
    Client,
    Upstream,
    Malformed(Malformed),
}

/// Relays the body's rest (some of it may already be in `buf`), checking its framing as it
/// goes; what follows the body stays in `buf`.
async fn relay_body<R, W>(
    upstream: &mut R,
    client: &mut W,
    buf: &mut BytesMut,
    end: &mut BodyEnd,
) -> Result<(), Broken>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let (used, done) = end.feed(buf).map_err(Broken::Malformed)?;
        if used > 0 {
            client
                .write_all(&buf[..used])
                .await
                .map_err(|_| Broken::Client)?;
            buf.advance(used);
        }
        if done {
            return Ok(());
        }
        buf.reserve(16 * 1024);
        match upstream.read_buf(buf).await {
            Ok(0) => return Err(Broken::Malformed(Malformed::Truncated)),
            Ok(_) => {}
            Err(_) => return Err(Broken::Upstream),
        }
    }
}

/// What the lane relays for a replica's whole answer.
#[derive(Debug)]
pub struct Relayed {
    /// The bytes the client receives.
    pub bytes: Vec<u8>,
    /// The answer's status.
    pub status: u16,
    /// The upstream connection could carry another request.
    pub reusable: bool,
    /// The body runs until the connection closes.
    pub close_delimited: bool,
}

/// What the lane makes of `answer`, a replica's whole answer to a request (a `HEAD` one when
/// `head_request`), as the exchange relays it: the same head parsing, header filtering and
/// framing checks. For tests and the differential fuzz target.
pub fn relay_whole(answer: &[u8], head_request: bool) -> Result<Relayed, Malformed> {
    let mut buf = BytesMut::from(answer);
    let head = loop {
        match parse_response_head(&mut buf, head_request)? {
            HeadParse::Final(head) => break head,
            HeadParse::Interim => {}
            HeadParse::Partial if buf.len() >= MAX_HEAD => return Err(Malformed::HeadTooLarge),
            HeadParse::Partial => return Err(Malformed::Truncated),
        }
    };
    let mut bytes = Vec::new();
    let context = AnswerContext {
        keep_alive: true,
        duration_since: None,
        contract: Contract::answering(None, 1, None),
    };
    answer_head(&context, &head, &mut bytes);
    buf.advance(head.len);
    let Some(mut end) = BodyEnd::of(head.framing) else {
        bytes.extend_from_slice(&buf);
        return Ok(Relayed {
            bytes,
            status: head.status,
            reusable: false,
            close_delimited: true,
        });
    };
    let (used, done) = end.feed(&buf)?;
    if !done {
        return Err(Malformed::Truncated);
    }
    bytes.extend_from_slice(&buf[..used]);
    Ok(Relayed {
        bytes,
        status: head.status,
        reusable: head.reusable && used == buf.len(),
        close_delimited: false,
    })
}

/// The client's answer head: the replica's status and headers (without hop-by-hop ones and
/// those its `Connection` header nominates), a default `Content-Type`, the call id and start
/// time, `Date`, and the framing.
fn answer_head(context: &AnswerContext<'_>, head: &ResponseHead, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(head.status).as_bytes());
    out.push(b' ');
    let reason = http::StatusCode::from_u16(head.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_content_type = false;
    let mut has_date = false;
    let mut has_duration = false;
    for (name, value) in head.headers() {
        let replaced = context.contract.replaces_answer_header(name);
        // The lane writes the framing itself; a 204 has none at all.
        let framing = name.eq_ignore_ascii_case("content-length")
            && (head.framing != Framing::Empty || head.status == 204);
        if is_hop_by_hop(name) || replaced || framing || head.is_nominated(name) {
            continue;
        }
        has_content_type |= name.eq_ignore_ascii_case("content-type");
        has_date |= name.eq_ignore_ascii_case("date");
        has_duration |= name.eq_ignore_ascii_case(crate::platform::DURATION_HEADER);
        header(out, name.as_bytes(), value);
    }
    if let (Some(since), false) = (context.duration_since, has_duration) {
        let secs = crate::platform::seconds_since(since);
        header(
            out,
            crate::platform::DURATION_HEADER.as_bytes(),
            secs.as_bytes(),
        );
    }
    context
        .contract
        .answer_headers(has_content_type, |name, value| {
            header(out, name.as_bytes(), value)
        });
    if !has_date {
        header(out, b"date", &http_date());
    }
    match head.framing {
        Framing::Length(n) => header(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        Framing::Chunked => header(out, b"transfer-encoding", b"chunked"),
        Framing::Close | Framing::Empty => {}
    }
    if !context.keep_alive || head.framing == Framing::Close {
        header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

/// Finds where a chunked body ends, byte by byte across reads, and refuses anything outside
/// RFC 9112 §7.1: sizes are 1 to 16 hex digits, every line ends in CRLF, extensions hold no
/// control characters, trailer fields are `token ":" value`, and extensions and trailers are
/// bounded.
#[derive(Default, Debug)]
struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u8,
    extension_bytes: usize,
    trailer_bytes: usize,
    trailer_fields: usize,
}

#[derive(Default, Debug, PartialEq, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    /// Blanks after the size, before `;` or the line's end.
    SizeBlank,
    /// Chunk extensions, up to the line's end.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer field (or of the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte a field value or chunk extension may hold: visible, blank, or obs-text.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

impl Chunks {
    /// Consumes bytes of `buf` up to the body's end; returns how many belong to the body and
    /// whether it ended.
    fn feed(&mut self, buf: &[u8]) -> Result<(usize, bool), Malformed> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            if self.state == Data {
                let take = (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = buf[i];
            i += 1;
            if matches!(
                self.state,
                TrailerStart | TrailerName | TrailerValue | TrailerLf | EndLf
            ) {
                self.trailer_bytes += 1;
                if self.trailer_bytes > MAX_TRAILER_BYTES {
                    return Err(Malformed::Chunked);
                }
            }
            self.state = match (self.state, b) {
                (Size, _) if b.is_ascii_hexdigit() => {
                    self.digits += 1;
                    if self.digits > 16 {
                        return Err(Malformed::Chunked);
                    }
                    let digit = (b as char).to_digit(16).ok_or(Malformed::Chunked)?;
                    self.size = self.size * 16 + u64::from(digit);
                    Size
                }
                (Size, b' ' | b'\t') if self.digits > 0 => SizeBlank,
                (SizeBlank, b' ' | b'\t') => SizeBlank,
                (Size | SizeBlank, b';') if self.digits > 0 => Extension,
                (Size | SizeBlank | Extension, b'\r') if self.digits > 0 => SizeLf,
                (Extension, _) if is_value_byte(b) => {
                    self.extension_bytes += 1;
                    if self.extension_bytes > MAX_CHUNK_EXTENSIONS {
                        return Err(Malformed::Chunked);
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart, _) if is_token_byte(b) => {
                    self.trailer_fields += 1;
                    if self.trailer_fields > MAX_TRAILER_FIELDS {
                        return Err(Malformed::Chunked);
                    }
                    TrailerName
                }
                (TrailerName, _) if is_token_byte(b) => TrailerName,
                (TrailerName, b':') => TrailerValue,
                (TrailerValue, b'\r') => TrailerLf,
                (TrailerValue, _) if is_value_byte(b) => TrailerValue,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(Malformed::Chunked),
            };
            if self.state == Done {
                return Ok((i, true));
            }
        }
        Ok((i, false))
    }
}

/// A connection handed to the general server: reads return the bytes the lane already read
/// first.
pub struct Replay {
    read: Bytes,
    stream: TcpStream,
}

impl Replay {
    pub fn new(stream: TcpStream, read: Bytes) -> Replay {
        Replay { read, stream }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_end(pieces: &[&[u8]]) -> Result<Option<usize>, Malformed> {
        let mut chunks = Chunks::default();
        let mut total = 0;
        for piece in pieces {
            let (used, done) = chunks.feed(piece)?;
            total += used;
            if done {
                return Ok(Some(total));
            }
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers_across_reads() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nx-trailer: y\r\n\r\nNEXT";
        assert_eq!(body_end(&[body]), Ok(Some(body.len() - 4)));
        for split in 1..body.len() - 4 {
            let (a, b) = body.split_at(split);
            assert_eq!(
                body_end(&[a, b]),
                Ok(Some(body.len() - 4)),
                "split at {split}"
            );
        }
        assert_eq!(body_end(&[b"0\r\n\r\n"]), Ok(Some(5)));
        assert_eq!(body_end(&[b"A\r\n0123456789\r\n"]), Ok(None));
    }

    #[tokio::test]
    async fn an_idle_connection_closed_by_the_replica_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(is_open(&client));
        drop(server);
        let closed = async {
            while is_open(&client) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the close is seen");
    }

    #[tokio::test]
    async fn sweeping_closes_long_idle_connections_and_forgets_gone_replicas() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let replica = |instance: &str| Arc::new(Endpoint::new(instance.to_string(), addr));
        let (kept, gone) = (replica("kept"), replica("gone"));
        let mut pools = Pools::default();
        for endpoint in [&kept, &gone] {
            let mut idle = Vec::new();
            for age in [Duration::from_secs(100), Duration::ZERO] {
                let stream = TcpStream::connect(addr).await.unwrap();
                let since = Instant::now().checked_sub(age).expect("up for over 100 s");
                idle.push((stream, since));
            }
            let key = Arc::as_ptr(endpoint) as usize;
            pools
                .by_replica
                .insert(key, (Arc::downgrade(endpoint), idle));
        }
        drop(gone);
        pools.close_idle(Duration::from_secs(90));
        let left: Vec<usize> = pools
            .by_replica
            .values()
            .map(|(_, idle)| idle.len())
            .collect();
        assert_eq!(left, [1], "the fresh connection of the live replica only");
        let (replica, idle) = &pools.by_replica[&(Arc::as_ptr(&kept) as usize)];
        assert!(replica.upgrade().is_some());
        assert!(idle[0].1.elapsed() < Duration::from_secs(90));
        pools.close_idle(Duration::ZERO);
        assert!(pools.by_replica.is_empty(), "an empty pool is forgotten");
    }

    #[test]
    fn dates_are_http_dates_of_now() {
        let date = http_date();
        let text = std::str::from_utf8(&date).unwrap();
        let parsed = httpdate::parse_http_date(text).unwrap();
        let now = SystemTime::now();
        let skew = now.duration_since(parsed).unwrap_or_default();
        assert!(skew <= Duration::from_secs(2), "{text}");
    }

    #[test]
    fn a_malformed_chunked_body_is_refused() {
        let refused = |body: &[u8]| {
            assert_eq!(
                body_end(&[body]),
                Err(Malformed::Chunked),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            // Split anywhere, the verdict is the same.
            for split in 1..body.len() {
                let (a, b) = body.split_at(split);
                assert_eq!(
                    body_end(&[a, b]),
                    Err(Malformed::Chunked),
                    "split at {split}"
                );
            }
        };
        refused(b"zz\r\n");
        refused(b"3\r\nabcX\r\n");
        refused(b"11111111111111111\r\n");
        // Line ends are CRLF, never a bare LF: in the size line, an extension, after data,
        // in a trailer or at the end.
        refused(b"2\nok\r\n0\r\n\r\n");
        refused(b"2;x\nHTTP/1.1 200 OK\r\nok\r\n0\r\n\r\n");
        refused(b"2\r\nok\n0\r\n\r\n");
        refused(b"0\r\nx: y\nHTTP/1.1 200 OK\r\n\r\n");
        refused(b"0\r\n\n");
        refused(b"0\r\nx: y\r\r\n\r\n");
        // A size is one or more hex digits: no empty line, no sign, no prefix, no blanks first.
        refused(b"\r\n");
        refused(b" 2\r\nok\r\n0\r\n\r\n");
        refused(b"+2\r\nok\r\n0\r\n\r\n");
        refused(b"0x2\r\nok\r\n0\r\n\r\n");
        refused(b"2 3\r\nok\r\n0\r\n\r\n");
        // Control characters in an extension, trailers that are not fields.
        refused(b"2;a=\x00\r\nok\r\n0\r\n\r\n");
        refused(b"0\r\n: no name\r\n\r\n");
        refused(b"0\r\nname with space: v\r\n\r\n");
        refused(b"0\r\nx:\x7f\r\n\r\n");
        // Bounded extensions and trailers.
        let mut long_extension = b"1;".to_vec();
        long_extension.extend(std::iter::repeat_n(b'a', MAX_CHUNK_EXTENSIONS + 1));
        long_extension.extend_from_slice(b"\r\n!\r\n0\r\n\r\n");
        refused(&long_extension);
        let mut many_trailers = b"0\r\n".to_vec();
        for i in 0..=MAX_TRAILER_FIELDS {
            many_trailers.extend_from_slice(format!("t{i}: v\r\n").as_bytes());
        }
        many_trailers.extend_from_slice(b"\r\n");
        refused(&many_trailers);
        let mut long_trailer = b"0\r\nt: ".to_vec();
        long_trailer.extend(std::iter::repeat_n(b'v', MAX_TRAILER_BYTES));
        long_trailer.extend_from_slice(b"\r\n\r\n");
        refused(&long_trailer);
    }

    #[test]
    fn a_well_formed_chunked_body_is_accepted_with_blanks_extensions_and_trailers() {
        for body in [
            &b"2 \t;name=\"quoted \xe9\"\r\nok\r\n0\r\n\r\n"[..],
            b"0000\r\n\r\n",
            b"A;x;y=z\r\n0123456789\r\n0;last\r\nExpires: never\r\nx-sum:\tabc\r\n\r\n",
        ] {
            assert_eq!(body_end(&[body]), Ok(Some(body.len())));
        }
    }

    fn framing(head: &str, head_request: bool) -> Result<Option<(Framing, bool)>, Malformed> {
        let mut buf = BytesMut::from(head.as_bytes());
        Ok(match parse_response_head(&mut buf, head_request)? {
            HeadParse::Final(h) => Some((h.framing, h.reusable)),
            HeadParse::Interim => None,
            HeadParse::Partial => panic!("a complete head"),
        })
    }

    #[test]
    fn response_framing_follows_the_head() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(framing(ok, false), Ok(Some((Framing::Length(5), true))));
        // A HEAD answer that announces a body may be followed by one: not reused.
        assert_eq!(framing(ok, true), Ok(Some((Framing::Empty, false))));
        let empty = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(framing(empty, true), Ok(Some((Framing::Empty, true))));
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(framing(chunked, false), Ok(Some((Framing::Chunked, true))));
        let unframed = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(framing(unframed, false), Ok(Some((Framing::Close, false))));
        let closing = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            framing(closing, false),
            Ok(Some((Framing::Length(0), false)))
        );
        let old = "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n";
        assert_eq!(framing(old, false), Ok(Some((Framing::Length(2), false))));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n", false),
            Ok(Some((Framing::Empty, true)))
        );
        for announced in [
            "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                framing(announced, false),
                Ok(Some((Framing::Empty, false))),
                "{announced}"
            );
        }
        assert_eq!(framing("HTTP/1.1 100 Continue\r\n\r\n", false), Ok(None));
        let identical = "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n";
        assert_eq!(
            framing(identical, false),
            Ok(Some((Framing::Length(1), true)))
        );
    }

    #[test]
    fn answers_that_break_the_framing_rules_are_refused() {
        use Malformed::*;
        for (head, cause) in [
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", TransferEncoding),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n", TransferEncoding),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n", TransferEncoding),
            ("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", TransferEncoding),
            ("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", ContentLength),
            ("HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n", ContentLength),
            ("HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\n", ContentLength),
            ("HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\n", ContentLength),
            ("HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n", ContentLength),
            ("HTTP/1.1 099 Low\r\ncontent-length: 0\r\n\r\n", Status),
            ("HTTP/1.1 000 Zero\r\n\r\n", Status),
            ("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", Upgrade),
            ("HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n", Head),
            ("HTTP/1.1 200 OK\r\nx : a\r\n\r\n", Head),
            ("HTTP/1.1 200 OK\r\nx: \x00\r\n\r\n", Head),
            ("HTTP/2 200 OK\r\n\r\n", Head),
        ] {
            assert_eq!(framing(head, false), Err(cause), "{head:?}");
        }
    }

    #[test]
    fn the_relayed_head_drops_nominated_and_hop_headers_and_a_204_length() {
        let relayed = |answer: &str, head_request: bool| {
            let r = relay_whole(answer.as_bytes(), head_request).unwrap();
            String::from_utf8(r.bytes).unwrap().to_ascii_lowercase()
        };
        let text = relayed(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 2\r\ncontent-length: 2\r\n\r\nok",
            false,
        );
        assert!(!text.contains("x-secret"), "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
        assert!(text.contains("x-kept: 2\r\n"), "{text}");
        assert!(text.ends_with("content-length: 2\r\n\r\nok"), "{text}");
        let no_content = relayed(
            "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            false,
        );
        assert!(!no_content.contains("content-length"), "{no_content}");
        // A HEAD answer keeps the length it announces for the GET, even when the hop's
        // `Connection` names it.
        let head = relayed("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true);
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        let head = relayed(
            "HTTP/1.1 200 OK\r\nconnection: content-length\r\ncontent-length: 5\r\n\r\n",
            true,
        );
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn bytes_after_an_answer_leave_its_connection_out_of_the_pool() {
        let whole = |answer: &[u8], head_request: bool| relay_whole(answer, head_request).unwrap();
        let planted = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nPLANTED";
        for (answer, head_request) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                false,
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", true),
        ] {
            assert!(whole(answer, head_request).reusable);
            let mut more = answer.to_vec();
            more.extend_from_slice(planted);
            let relayed = whole(&more, head_request);
            assert!(!relayed.reusable, "{:?}", String::from_utf8_lossy(&more));
            assert!(
                !relayed.bytes.windows(7).any(|w| w == b"PLANTED"),
                "the planted bytes are not relayed"
            );
        }
    }
}
