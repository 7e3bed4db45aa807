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
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::model::FunctionId;
use crate::platform::Endpoint;
use crate::proxy::{Invoker, AGENT_TOKEN, CALL_ID, DATACENTER, POOL_IDLE_TIMEOUT, START_TIME};
use crate::telemetry::Invocation;

/// Longest request or response head the lane reads; longer ones go to the general server
/// (which answers 431) or fail the exchange.
const MAX_HEAD: usize = 64 * 1024;
/// Headers per head the lane parses; more go to the general server.
const MAX_HEADERS: usize = 100;
/// Largest request body the lane buffers; larger ones are streamed by the general server.
const MAX_BODY: usize = 1024 * 1024;
/// A pooled connection idle this long is checked for a close by the replica before reuse.
const LOOK_AFTER_IDLE: Duration = Duration::from_secs(1);
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
    endpoint: Arc<Endpoint>,
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
}

impl Lane {
    pub fn new(invoker: Arc<Invoker>, header_timeout: Duration) -> Lane {
        Lane {
            invoker,
            header_timeout,
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
                    None => tokio::select! {
                        r = client.read_buf(&mut buf) => r,
                        _ = &mut stopping => return Finished::Closed,
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
            let body = async {
                while buf.len() < plan.body_len {
                    if client.read_buf(&mut buf).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                io::Result::Ok(())
            };
            let started = Instant::now();
            match tokio::time::timeout(self.invoker.cfg.upstream_timeout, body).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Finished::Closed,
                Err(_) => {
                    // As the general path answers a body that stalls on its way to the replica.
                    self.count_start(&plan.id);
                    let status = http::StatusCode::GATEWAY_TIMEOUT;
                    self.count_answer(&plan.id, status.as_u16(), &plan.datacenter, started);
                    let text = self.invoker.timeout_text(&plan.id);
                    write_internal_error(&mut client, status, &text, false).await;
                    return Finished::Closed;
                }
            }
            upstream_head.extend_from_slice(&buf[..plan.body_len]);
            buf.advance(plan.body_len);

            let keep = self
                .exchange(
                    &plan,
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
        if !crate::api::invoke::METHODS
            .iter()
            .any(|m| m.as_str() == method)
        {
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
        let mut host = None;
        let mut content_type = None;
        let mut has_call_id = false;
        let mut has_forwarded_for = false;
        let mut has_forwarded_host = false;
        for h in req.headers.iter() {
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
            } else if name.eq_ignore_ascii_case("host") {
                host = Some(h.value);
            } else if name.eq_ignore_ascii_case("content-type") {
                content_type = Some(h.value);
            } else if name.eq_ignore_ascii_case(CALL_ID.as_str()) {
                has_call_id = true;
            } else if name.eq_ignore_ascii_case("x-forwarded-for") {
                has_forwarded_for = true;
            } else if name.eq_ignore_ascii_case("x-forwarded-host") {
                has_forwarded_host = true;
            }
        }
        let (raw_name, suffix) = crate::api::invoke::split_path(path, "/function/");
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

        let start_time = crate::proxy::unix_nanos().min(u64::MAX as u128) as u64;
        let generated_call_id = (!has_call_id).then(|| {
            let mut id = [0u8; 36];
            uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id);
            id
        });
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
                || name.eq_ignore_ascii_case("host")
                || name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case(START_TIME.as_str())
                || (endpoint.agent_token.is_some()
                    && name.eq_ignore_ascii_case(AGENT_TOKEN.as_str()))
            {
                continue;
            }
            header(out, name.as_bytes(), h.value);
        }
        if let Some(call_id) = &generated_call_id {
            header(out, CALL_ID.as_str().as_bytes(), call_id);
        }
        header(
            out,
            START_TIME.as_str().as_bytes(),
            itoa::Buffer::new().format(start_time).as_bytes(),
        );
        if !has_forwarded_for {
            header(out, b"x-forwarded-for", peer.as_bytes());
        }
        if let (false, Some(host)) = (has_forwarded_host, host) {
            header(out, b"x-forwarded-host", host);
        }
        if let Some(token) = &endpoint.agent_token {
            header(out, AGENT_TOKEN.as_str().as_bytes(), token.as_bytes());
        }
        if let Some(n) = body_len {
            header(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        Parsed::Serve(Plan {
            head_len,
            body_len: body_len.unwrap_or(0),
            keep_alive,
            head_request: method == "HEAD",
            repeatable: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
            id,
            datacenter,
            endpoint,
            request_content_type: content_type.map(<[u8]>::to_vec),
            generated_call_id,
            start_time,
        })
    }

    /// Forwards `request` (head and body) and relays the answer to `client`; false when the
    /// client connection must close.
    async fn exchange(
        &self,
        plan: &Plan,
        request: &[u8],
        client: &mut TcpStream,
        from_replica: &mut BytesMut,
        answer: &mut Vec<u8>,
    ) -> bool {
        let started = Instant::now();
        self.count_start(&plan.id);
        let _in_flight = crate::proxy::InFlight::start(plan.endpoint.clone());
        let finish = |code: u16| self.count_answer(&plan.id, code, &plan.datacenter, started);

        from_replica.clear();
        let (mut upstream, head) = match self.send(plan, request, from_replica).await {
            Ok(sent) => sent,
            Err(e) => {
                let (status, text) = match e {
                    Upstream::Timeout => (
                        http::StatusCode::GATEWAY_TIMEOUT,
                        self.invoker.timeout_text(&plan.id),
                    ),
                    Upstream::Failed(e) => {
                        tracing::warn!(function = %plan.id, replica = %plan.endpoint.instance, error = %e, "upstream failed");
                        (
                            http::StatusCode::BAD_GATEWAY,
                            Invoker::unreachable_text(&plan.id),
                        )
                    }
                };
                finish(status.as_u16());
                return write_internal_error(client, status, &text, plan.keep_alive).await;
            }
        };
        finish(head.status);
        answer.clear();
        self.answer_head(plan, &head, answer);
        from_replica.advance(head.len);

        let reusable = head.reusable;
        let client_ok = match head.framing {
            Framing::Empty => client.write_all(answer).await.is_ok(),
            Framing::Length(n) if n <= BUFFER_RESPONSE => {
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
                    _ => {
                        // The head promised a body that did not come: nothing was sent yet.
                        return write_internal_error(
                            client,
                            http::StatusCode::BAD_GATEWAY,
                            &Invoker::unreachable_text(&plan.id),
                            plan.keep_alive,
                        )
                        .await;
                    }
                }
                answer.extend_from_slice(&from_replica[..n]);
                from_replica.advance(n);
                client.write_all(answer).await.is_ok()
            }
            Framing::Length(n) => {
                client.write_all(answer).await.is_ok()
                    && relay_length(&mut upstream, client, from_replica, n).await
            }
            Framing::Chunked => {
                client.write_all(answer).await.is_ok()
                    && relay_chunked(&mut upstream, client, from_replica).await
            }
            Framing::Close => {
                let _ = client.write_all(answer).await;
                let _ = client.write_all(from_replica).await;
                let _ = tokio::io::copy(&mut upstream, client).await;
                return false;
            }
        };
        if !client_ok {
            return false;
        }
        if reusable && from_replica.is_empty() {
            self.check_in(&plan.endpoint, upstream);
        }
        true
    }

    /// Sends the request on a pooled connection (once more on a new one if the pooled one
    /// turns out closed before answering) and reads the answer's head.
    async fn send(
        &self,
        plan: &Plan,
        request: &[u8],
        from_replica: &mut BytesMut,
    ) -> Result<(TcpStream, ResponseHead), Upstream> {
        let cfg = &self.invoker.cfg;
        if let Some(mut pooled) = self.check_out(&plan.endpoint) {
            if pooled.write_all(request).await.is_ok() {
                match tokio::time::timeout(
                    cfg.upstream_timeout,
                    read_response_head(&mut pooled, from_replica, plan.head_request),
                )
                .await
                {
                    Err(_) => return Err(Upstream::Timeout),
                    Ok(Ok(head)) => return Ok((pooled, head)),
                    // Closed by the replica while idle: nothing was answered, so try afresh
                    // (unless the request may not be repeated: the replica may have run it).
                    Ok(Err(_)) if from_replica.is_empty() && plan.repeatable => {}
                    Ok(Err(e)) => return Err(Upstream::Failed(e.to_string())),
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
        match tokio::time::timeout(
            cfg.upstream_timeout,
            read_response_head(&mut fresh, from_replica, plan.head_request),
        )
        .await
        {
            Err(_) => Err(Upstream::Timeout),
            Ok(Ok(head)) => Ok((fresh, head)),
            Ok(Err(e)) => Err(Upstream::Failed(e.to_string())),
        }
    }

    /// The client's answer head: the replica's status and headers (without hop-by-hop ones),
    /// a default `Content-Type`, the call id and start time, `Date`, and the framing.
    fn answer_head(&self, plan: &Plan, head: &ResponseHead, out: &mut Vec<u8>) {
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
        for (name, value) in head.headers() {
            let replaced = name.eq_ignore_ascii_case(START_TIME.as_str())
                || (plan.generated_call_id.is_some()
                    && name.eq_ignore_ascii_case(CALL_ID.as_str()));
            let framing =
                name.eq_ignore_ascii_case("content-length") && head.framing != Framing::Empty;
            if is_hop_by_hop(name) || replaced || framing {
                continue;
            }
            has_content_type |= name.eq_ignore_ascii_case("content-type");
            has_date |= name.eq_ignore_ascii_case("date");
            header(out, name.as_bytes(), value);
        }
        if !has_content_type {
            let default = plan
                .request_content_type
                .as_deref()
                .unwrap_or(b"text/plain");
            header(out, b"content-type", default);
        }
        if let Some(call_id) = &plan.generated_call_id {
            header(out, CALL_ID.as_str().as_bytes(), call_id);
        }
        header(
            out,
            START_TIME.as_str().as_bytes(),
            itoa::Buffer::new().format(plan.start_time).as_bytes(),
        );
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
        if !plan.keep_alive || head.framing == Framing::Close {
            header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Counts an invocation of `id` as started and marks the function active, as
    /// [`Invoker::started`] does.
    fn count_start(&self, id: &FunctionId) {
        let mut meters = self.meters.get_or_default().borrow_mut();
        if let Some(meter) = meters.get(id) {
            crate::proxy::stamp(&meter.activity);
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
        crate::proxy::stamp(&meter.activity);
        meter.started.inc();
        meters.insert(id.clone(), meter);
    }

    /// Counts an invocation of `id` started at `started`, answered with `code` on behalf of
    /// `datacenter`.
    fn count_answer(&self, id: &FunctionId, code: u16, datacenter: &str, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        let mut meters = self.meters.get_or_default().borrow_mut();
        let Some(meter) = meters.get_mut(id) else {
            // Dropped between start and answer (the thread's meters were full): count it
            // the long way.
            let code = itoa::Buffer::new().format(code).to_owned();
            let name = id.qualified();
            self.invoker
                .metrics
                .invoked(&name, &code, datacenter, seconds);
            return;
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
    }

    fn check_out(&self, endpoint: &Arc<Endpoint>) -> Option<TcpStream> {
        let mut pools = self.pools.get_or_default().borrow_mut();
        let (replica, idle) = pools
            .by_replica
            .get_mut(&(Arc::as_ptr(endpoint) as usize))?;
        if replica.strong_count() == 0 {
            return None;
        }
        while let Some((stream, since)) = idle.pop() {
            // One that waited a while may have been closed by the replica meanwhile.
            if since.elapsed() < LOOK_AFTER_IDLE || is_open(&stream) {
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

    fn check_in(&self, endpoint: &Arc<Endpoint>, stream: TcpStream) {
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
            entry.1.push((stream, Instant::now()));
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
}

impl ResponseHead {
    fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.spans.iter().map(|&(ns, ne, vs, ve)| {
            let name = std::str::from_utf8(&self.raw[ns..ne]).unwrap_or("");
            (name, &self.raw[vs..ve])
        })
    }
}

/// Reads until a final (non-1xx) answer head is complete in `buf`; interim answers are
/// dropped. Fails on a closed connection, a malformed head, or an upgrade.
async fn read_response_head(
    upstream: &mut TcpStream,
    buf: &mut BytesMut,
    head_request: bool,
) -> io::Result<ResponseHead> {
    loop {
        if !buf.is_empty() {
            if let Some(parsed) = parse_response_head(buf, head_request)? {
                match parsed {
                    Some(head) => return Ok(head),
                    None => continue,
                }
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(io::Error::other("the replica's answer head is too large"));
        }
        if upstream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// `Ok(None)` when more bytes are needed; `Ok(Some(None))` when an interim answer was
/// consumed from `buf`.
fn parse_response_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> io::Result<Option<Option<ResponseHead>>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf).map_err(io::Error::other)? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) => n,
    };
    let status = resp.code.unwrap_or(0);
    if status == 101 {
        return Err(io::Error::other("the replica switched protocols unasked"));
    }
    if (100..200).contains(&status) {
        buf.advance(len);
        return Ok(Some(None));
    }
    let mut length = None;
    let mut chunked = false;
    let mut close = resp.version == Some(0);
    let base = buf.as_ptr() as usize;
    let mut spans = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| io::Error::other("the replica sent an invalid Content-Length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(io::Error::other("the replica sent two Content-Lengths"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only plain chunked is relayed: another coding would be lost with the header.
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(io::Error::other(
                    "the replica used a transfer coding other than chunked",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        let ns = name.as_ptr() as usize - base;
        let vs = h.value.as_ptr() as usize - base;
        spans.push((ns, ns + name.len(), vs, vs + h.value.len()));
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let raw = Bytes::copy_from_slice(&buf[..len]);
    Ok(Some(Some(ResponseHead {
        len,
        status,
        framing,
        reusable: !close && framing != Framing::Close,
        raw,
        spans,
    })))
}

/// Relays exactly `n` body bytes (some may already be in `buf`).
async fn relay_length(
    upstream: &mut TcpStream,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    mut n: usize,
) -> bool {
    loop {
        let take = buf.len().min(n);
        if take > 0 {
            if client.write_all(&buf[..take]).await.is_err() {
                return false;
            }
            buf.advance(take);
            n -= take;
        }
        if n == 0 {
            return true;
        }
        buf.reserve(16 * 1024);
        match upstream.read_buf(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// Relays a chunked body as it is, up to and including its last chunk and trailers.
async fn relay_chunked(
    upstream: &mut TcpStream,
    client: &mut TcpStream,
    buf: &mut BytesMut,
) -> bool {
    let mut chunks = Chunks::default();
    loop {
        let (used, done) = match chunks.feed(buf) {
            Ok(progress) => progress,
            Err(()) => return false,
        };
        if used > 0 {
            if client.write_all(&buf[..used]).await.is_err() {
                return false;
            }
            buf.advance(used);
        }
        if done {
            return true;
        }
        buf.reserve(16 * 1024);
        match upstream.read_buf(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
}

/// Finds where a chunked body ends, byte by byte across reads.
#[derive(Default, Debug)]
struct Chunks {
    state: ChunkState,
    size: u64,
}

#[derive(Default, Debug, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    /// Chunk extensions, up to the line's end.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// Consumes bytes of `buf` up to the body's end; returns how many belong to the body and
    /// whether it ended. Fails on a malformed body.
    fn feed(&mut self, buf: &[u8]) -> Result<(usize, bool), ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            if self.state == Data {
                let take = (buf.len() - i).min(self.size as usize);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = buf[i];
            i += 1;
            self.state = match (&self.state, b) {
                (Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = (b as char).to_digit(16).ok_or(())? as u64;
                    self.size = self.size.checked_mul(16).ok_or(())? + digit;
                    Size
                }
                (Size, b';' | b' ' | b'\t') => Extension,
                (Size | Extension, b'\r') => SizeLf,
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (TrailerStart, b'\r') => EndLf,
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(()),
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

    fn body_end(pieces: &[&[u8]]) -> Result<Option<usize>, ()> {
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
        let replica = |instance: &str| {
            Arc::new(Endpoint {
                instance: instance.to_string(),
                addr,
                authority: addr.to_string().parse().unwrap(),
                in_flight: Default::default(),
                path_prefix: String::new(),
                agent_token: None,
            })
        };
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
        assert_eq!(body_end(&[b"zz\r\n"]), Err(()));
        assert_eq!(body_end(&[b"3\r\nabcX\r\n"]), Err(()));
        assert_eq!(body_end(&[b"ffffffffffffffffff\r\n"]), Err(()));
    }

    #[test]
    fn response_framing_follows_the_head() {
        let framing = |head: &str, head_request: bool| {
            let mut buf = BytesMut::from(head.as_bytes());
            parse_response_head(&mut buf, head_request)
                .unwrap()
                .unwrap()
                .map(|h| (h.framing, h.reusable))
        };
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(framing(ok, false), Some((Framing::Length(5), true)));
        assert_eq!(framing(ok, true), Some((Framing::Empty, true)));
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(framing(chunked, false), Some((Framing::Chunked, true)));
        let unframed = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(framing(unframed, false), Some((Framing::Close, false)));
        let closing = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(framing(closing, false), Some((Framing::Length(0), false)));
        let old = "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n";
        assert_eq!(framing(old, false), Some((Framing::Length(2), false)));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n", false),
            Some((Framing::Empty, true))
        );
        assert_eq!(framing("HTTP/1.1 100 Continue\r\n\r\n", false), None);
        let mut coded =
            BytesMut::from("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n");
        assert!(parse_response_head(&mut coded, false).is_err());
        let mut two =
            BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n");
        assert!(parse_response_head(&mut two, false).is_err());
    }
}
