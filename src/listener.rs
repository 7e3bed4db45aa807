//! The HTTP accept loop shared by `serve` and `agent`: a bound on open connections (at the
//! bound the loop stops accepting, so new clients wait in the kernel's backlog instead of
//! being refused), a deadline for every request head (a client that never finishes its
//! headers is closed instead of holding a connection forever), an idle deadline for every
//! connection (HTTP/2's included: one with no request open is told to go away), the peer
//! address for `ConnectInfo`, and graceful shutdown with a bounded drain.
//!
//! Plain connections speak HTTP/1.1; TLS connections HTTP/2 or HTTP/1.1, as ALPN agrees.
//!
//! Connections can be served by connection threads: each runs a single-threaded event loop
//! and takes accepted connections in turn, so one invocation's client connection, its
//! upstream connection and their tasks stay on one thread, as in an event-driven proxy (no
//! hand-off between threads, no work stealing, per request). Requests the listener's `inline`
//! test rejects (the API) are handed to the shared runtime, so a long API call never stalls a
//! thread's other connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::lane::{Finished, Lane, Replay};
use futures::future::Either;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::{TaskTracker, TaskTrackerToken};
use tower::ServiceExt;

/// How long open connections may take to finish after shutdown begins.
pub const DRAIN: Duration = Duration::from_secs(10);

/// How often an HTTP/2 peer is pinged, and how long its answer may take.
const H2_PING: Duration = Duration::from_secs(20);
/// Requests open at once on one HTTP/2 connection (nginx's default is 128).
const H2_STREAMS: u32 = 100;

/// How connections are limited.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl From<&crate::config::LimitsConfig> for Limits {
    fn from(l: &crate::config::LimitsConfig) -> Self {
        Limits {
            max_connections: l.max_connections,
            header_timeout: l.header_timeout,
            idle_timeout: l.idle_timeout,
        }
    }
}

/// Where a listener's connections are served.
#[derive(Clone)]
pub struct Lanes {
    /// Connection threads; 0 serves every connection on the caller's runtime.
    pub threads: usize,
    /// Which request paths run on their connection's thread; the others run on the caller's
    /// runtime. Unused without connection threads.
    pub inline: fn(&str) -> bool,
    /// Reads each connection's requests first, and hands the connection to the general
    /// server when it meets one it does not serve.
    pub lane: Option<Arc<Lane>>,
}

impl Lanes {
    /// Every connection on the caller's runtime.
    pub const SHARED: Lanes = Lanes {
        threads: 0,
        inline: |_| true,
        lane: None,
    };

    /// `threads` connection threads (0: one per core) running the invocation paths
    /// (`/function/...`) themselves, first through `lane` when there is one.
    pub fn invocations(threads: usize, lane: Option<Arc<Lane>>) -> Lanes {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Lanes {
            threads,
            inline: |path| path.starts_with("/function/"),
            lane,
        }
    }
}

/// Builds the task that serves one accepted connection; run inside the runtime that is to
/// drive it.
type Job = Box<dyn FnOnce() + Send>;

/// Threads each running a single-threaded runtime that serves the connections handed to it.
/// Dropping this ends the threads once their queues are empty (their open connections are
/// closed with their runtimes, after the listener's drain).
struct ConnectionThreads {
    queues: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
    next: usize,
}

impl ConnectionThreads {
    fn start(threads: usize, lane: Option<Arc<Lane>>) -> std::io::Result<ConnectionThreads> {
        let mut queues = Vec::with_capacity(threads);
        for i in 0..threads {
            let lane = lane.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
            std::thread::Builder::new()
                .name(format!("connections-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        tokio::spawn(housekeeping(lane));
                        while let Some(job) = rx.recv().await {
                            job();
                        }
                    })
                })?;
            queues.push(tx);
        }
        Ok(ConnectionThreads { queues, next: 0 })
    }

    /// Hands `job` to the next thread in turn (or runs it here if that thread is gone).
    fn hand(&mut self, job: Job) {
        let queue = &self.queues[self.next];
        self.next = (self.next + 1) % self.queues.len();
        if let Err(returned) = queue.send(job) {
            tracing::error!("a connection thread has stopped; serving on the shared runtime");
            (returned.0)();
        }
    }
}

/// Runs on each connection thread: once a second, closes the thread's upstream connections
/// idle too long. The ticking timer also keeps the thread's timer wheel holding a deadline at
/// most a second away, so the per-request timeouts registered behind it (always later) do not
/// need the runtime to wake itself with a system call, as it must when the wheel is empty.
async fn housekeeping(lane: Option<Arc<Lane>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(lane) = &lane {
            lane.sweep();
        }
    }
}

/// A request handed to the shared runtime; dropping it (the client went away) cancels the
/// handler, as it would be cancelled had it run on the connection's thread.
struct Handed(tokio::task::JoinHandle<Result<Response, Infallible>>);

impl Future for Handed {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| match joined {
            Ok(answer) => answer,
            Err(e) => {
                tracing::error!(error = %e, "a request handler failed");
                Ok((StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response())
            }
        })
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every connection is served with.
#[derive(Clone)]
struct Connections {
    app: Router,
    builder: Builder<TokioExecutor>,
    lanes: Lanes,
    /// The caller's runtime, for requests not run inline (with connection threads).
    shared: tokio::runtime::Handle,
    /// Cancelled when the listener stops accepting (lane connections close when idle, the
    /// general server's once their requests are answered).
    stopping: CancellationToken,
    limits: Limits,
    /// TLS on every connection (they go to the general server, not the lane).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Connections {
    /// Spawns the task serving `stream` on the current runtime; it releases `slot` at the end.
    fn spawn(
        self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        open: TaskTrackerToken,
    ) {
        tokio::spawn(async move {
            if let Some(acceptor) = self.tls.clone() {
                let handshake =
                    tokio::time::timeout(self.limits.header_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        self.serve_http(tls, peer, h2).await
                    }
                    // Which side and why: "invalid peer certificate: UnknownIssuer" and the
                    // like at warn; probes that connect and close, or speak plain HTTP, at
                    // debug (they would flood the log).
                    Ok(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("certificate") {
                            tracing::warn!(%peer, error = %text, "refused a client's TLS handshake")
                        } else {
                            tracing::debug!(%peer, error = %text, "a TLS handshake failed")
                        }
                    }
                    Err(_) => tracing::debug!(%peer, "a TLS handshake took too long"),
                }
                drop(slot);
                return;
            }
            match self.lanes.lane.clone() {
                None => self.serve_http(stream, peer, false).await,
                Some(lane) => match lane.serve(stream, peer, self.stopping.clone()).await {
                    Finished::Closed => {}
                    Finished::HandOff(stream, read) => {
                        tracing::debug!(%peer, "connection handed from the invoke lane to the general server");
                        self.serve_http(Replay::new(stream, read), peer, false)
                            .await
                    }
                },
            }
            drop(slot);
            drop(open);
        });
    }

    /// Serves the rest of a connection with the general HTTP server, in HTTP/2 with `h2`.
    async fn serve_http<I>(self, io: I, peer: SocketAddr, h2: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connections {
            app,
            builder,
            lanes,
            shared,
            stopping,
            limits,
            ..
        } = self;
        let mut builder = if h2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        };
        let reads = Arc::new(AtomicU64::new(0));
        builder.http1().timer(HeadTimer {
            limits,
            reads: reads.clone(),
            first: AtomicBool::new(true),
        });
        let io = CountedReads {
            io,
            reads,
            first_byte: Some(Box::pin(tokio::time::sleep(limits.header_timeout))),
        };
        let handed = lanes.threads > 0;
        // HTTP/2 has no head deadline between requests: its idle time is tracked here.
        let activity = h2.then(Activity::new);
        let opens = activity.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            let req = req.map(axum::body::Body::new);
            let answer = if !handed || (lanes.inline)(req.uri().path()) {
                Either::Left(app.clone().oneshot(req))
            } else {
                Either::Right(Handed(shared.spawn(app.clone().oneshot(req))))
            };
            match &opens {
                None => Either::Left(answer),
                Some(activity) => Either::Right(OpenUntilAnswered {
                    answer,
                    open: Some(activity.begin()),
                }),
            }
        });
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = async {
            match &activity {
                Some(a) => a.idle(limits.header_timeout, limits.idle_timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(idle);
        // Told to go away (shutdown or idle): the connection ends once its open requests are
        // answered; one with none left that does not end within the header timeout (a client
        // that reads nothing) is dropped.
        let mut closing: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let ended = loop {
            tokio::select! {
                ended = conn.as_mut() => break ended,
                _ = stopping.cancelled(), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Box::pin(tokio::time::sleep(DRAIN)));
                }
                _ = &mut idle, if closing.is_none() => {
                    tracing::debug!(%peer, "closing an idle HTTP/2 connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Box::pin(tokio::time::sleep(limits.header_timeout)));
                }
                _ = async { closing.as_mut().expect("guarded").await }, if closing.is_some() => {
                    // Shutting down: the drain is over. Idle: only once no request is open.
                    if stopping.is_cancelled() || activity.as_ref().is_none_or(|a| a.open() == 0) {
                        tracing::debug!(%peer, "a connection told to go away did not; dropped");
                        return;
                    }
                    closing = Some(Box::pin(tokio::time::sleep(limits.header_timeout)));
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// The requests open on an HTTP/2 connection, and since when it has had none.
#[derive(Clone)]
struct Activity(Arc<watch::Sender<Open>>);

#[derive(Clone, Copy)]
struct Open {
    requests: usize,
    since: Instant,
    /// A request has been answered on this connection.
    served: bool,
}

impl Activity {
    fn new() -> Activity {
        Activity(Arc::new(watch::Sender::new(Open {
            requests: 0,
            since: Instant::now(),
            served: false,
        })))
    }

    fn open(&self) -> usize {
        self.0.borrow().requests
    }

    /// Counts a request open until the returned guard drops (its answer's body sent).
    fn begin(&self) -> OpenRequest {
        self.0.send_modify(|o| o.requests += 1);
        OpenRequest(self.0.clone())
    }

    /// Completes once the connection has had no request open for `idle` (`first` before its
    /// first request, as an HTTP/1 connection's first head must come within the header
    /// timeout).
    async fn idle(&self, first: Duration, idle: Duration) {
        let mut changes = self.0.subscribe();
        loop {
            let open = *changes.borrow_and_update();
            if open.requests > 0 {
                let _ = changes.changed().await;
                continue;
            }
            let after = if open.served { idle } else { first };
            tokio::select! {
                _ = tokio::time::sleep_until((open.since + after).into()) => return,
                _ = changes.changed() => {}
            }
        }
    }
}

/// One open request on an HTTP/2 connection.
struct OpenRequest(Arc<watch::Sender<Open>>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.send_modify(|o| {
            o.requests -= 1;
            o.since = Instant::now();
            o.served = true;
        });
    }
}

/// A request's answer whose body holds the request open until it is sent (or dropped).
struct OpenUntilAnswered<F> {
    answer: F,
    open: Option<OpenRequest>,
}

impl<F> Future for OpenUntilAnswered<F>
where
    F: Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answered = std::task::ready!(Pin::new(&mut self.answer).poll(cx));
        let open = self.open.take();
        Poll::Ready(
            answered.map(|r| r.map(|body| axum::body::Body::new(HeldBody { body, _open: open }))),
        )
    }
}

/// A response body that keeps its request counted as open until it is dropped.
struct HeldBody {
    body: axum::body::Body,
    _open: Option<OpenRequest>,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` completes, then waits up
/// to `drain` for open connections (a followed log stream would otherwise keep the process up
/// forever).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    lanes: Lanes,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    // A peer that stops answering pings while a request is open (a followed log, a long
    // invocation) is dropped instead of holding the connection.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS)
        .keep_alive_interval(Some(H2_PING))
        .keep_alive_timeout(H2_PING);
    let open = TaskTracker::new();
    let mut threads = match lanes.threads {
        0 => None,
        n => match ConnectionThreads::start(n, lanes.lane.clone()) {
            Ok(threads) => Some(threads),
            Err(e) => {
                tracing::error!(error = %e, "cannot start connection threads; serving on the shared runtime");
                None
            }
        },
    };
    let connections = Connections {
        app,
        builder,
        lanes: Lanes {
            threads: threads.as_ref().map_or(0, |t| t.queues.len()),
            ..lanes
        },
        shared: tokio::runtime::Handle::current(),
        stopping: CancellationToken::new(),
        limits,
        tls,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connections = connections.clone();
        let token = open.token();
        let Some(threads) = threads.as_mut() else {
            connections.spawn(stream, peer, slot, token);
            continue;
        };
        // The stream moves to the thread's event loop (it is registered there).
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand a connection to a connection thread");
                continue;
            }
        };
        threads.hand(Box::new(move || {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => connections.spawn(stream, peer, slot, token),
                Err(e) => tracing::warn!(%peer, error = %e, "cannot serve a connection"),
            }
        }));
    }
    drop(listener);
    connections.stopping.cancel();
    drop(connections);
    tokio::select! {
        _ = async { open.close(); open.wait().await } => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!("connections still open {drain:?} after shutdown began; closing them");
        }
    }
    drop(threads);
}

/// The general server's clock for request heads. hyper asks it for one deadline from the
/// moment it waits for a request head, idle time included; this gives the first request
/// `header_timeout` from then (accept), and each later one `idle_timeout` to begin and
/// `header_timeout` from its first byte to finish its head, as the invoke lane does.
struct HeadTimer {
    limits: Limits,
    /// Bytes read from the client so far (by [`CountedReads`]).
    reads: Arc<AtomicU64>,
    /// No head has been waited for yet on this connection.
    first: AtomicBool,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep::fixed(Instant::now() + duration))
    }

    fn sleep_until(&self, _hyper_deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = Instant::now();
        if self.first.swap(false, Ordering::Relaxed) {
            return Box::pin(HeadSleep::fixed(now + self.limits.header_timeout));
        }
        Box::pin(HeadSleep {
            sleep: Box::pin(tokio::time::sleep_until(
                (now + self.limits.idle_timeout).into(),
            )),
            idle: Some((
                self.reads.clone(),
                self.reads.load(Ordering::Relaxed),
                self.limits.header_timeout,
            )),
        })
    }
}

/// A head deadline; while `idle` is set, the connection waits for a request's first byte, and
/// the deadline moves to `header_timeout` after it once it comes.
struct HeadSleep {
    sleep: Pin<Box<tokio::time::Sleep>>,
    idle: Option<(Arc<AtomicU64>, u64, Duration)>,
}

impl HeadSleep {
    fn fixed(deadline: Instant) -> HeadSleep {
        HeadSleep {
            sleep: Box::pin(tokio::time::sleep_until(deadline.into())),
            idle: None,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this after every read that left the head incomplete.
        if let Some((reads, at_start, header_timeout)) = &self.idle {
            if reads.load(Ordering::Relaxed) != *at_start {
                let deadline = Instant::now() + *header_timeout;
                self.sleep.as_mut().reset(deadline.into());
                self.idle = None;
            }
        }
        self.sleep.as_mut().poll(cx)
    }
}

/// Counts the bytes read from a client connection, for [`HeadTimer`]; and closes a connection
/// whose first byte does not come within the header timeout (hyper's own timer starts only
/// once the protocol is known, which waits for bytes).
struct CountedReads<I> {
    io: I,
    reads: Arc<AtomicU64>,
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountedReads<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.reads.fetch_add(read as u64, Ordering::Relaxed);
            self.first_byte = None;
        }
        if polled.is_pending() {
            if let Some(deadline) = self.first_byte.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within the header timeout",
                    )));
                }
            }
        }
        polled
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountedReads<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
