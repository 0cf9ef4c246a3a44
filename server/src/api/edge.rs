//! The transport edge: what the server accepts from the network before any handler sees
//! a request. It owns the accept loops of every port (connection caps, accept errors
//! backed off with rate-limited logs), the HTTP/2 settings of the gRPC port (streams per
//! connection, header list size, keepalive, rapid-reset protection), closing idle
//! connections, and the request bodies of gRPC calls:
//!
//! - each message's 5-byte gRPC header is read as it arrives; a length over the
//!   method's limit is refused RESOURCE_EXHAUSTED before any buffer for it exists;
//! - the message's bytes are reserved from one server-wide budget
//!   (`max_request_bytes_in_flight`) before they are buffered; a message that does not
//!   fit is refused UNAVAILABLE at once. A unary call keeps its reservation until it
//!   is answered (its decoded tensors live that long); a stream's message keeps it until
//!   the next message starts or the stream ends;
//! - the call's deadline (its `grpc-timeout`, bounded by the server's deadline policy)
//!   runs from the HEADERS frame, so a body still arriving at the deadline is answered
//!   DEADLINE_EXCEEDED then, and a message that does not arrive in full within the
//!   body-read timeout is answered DEADLINE_EXCEEDED and its buffer freed.
//!
//! Errors of a request body are `tonic::Status` values: tonic answers the call with the
//! status it finds in the body's error.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::Status;

use sluice_proto::codec::{DecodeBudget, DECODE_BUDGET};

use crate::admission::deadline::DeadlinePolicy;
use crate::config::EdgeLimits;
use crate::error::RETRY_PUSHBACK_HEADER;
use crate::metrics::{self, TransportRefusal};

/// When the server received a call's HEADERS frame; request extensions carry it to the
/// handlers, whose deadlines count from it.
#[derive(Debug, Clone, Copy)]
pub struct RequestStart(pub Instant);

// ---------------------------------------------------------------------------------------
// Accepting connections
// ---------------------------------------------------------------------------------------

/// Lets a repeated log line through at most once per `every`, counting what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimiter {
    pub fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)`: log now, mentioning the `n` occurrences held back since the last line.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// Accept errors (out of file descriptors, out of memory) wait this long first, doubling
/// up to [`ACCEPT_BACKOFF_MAX`] while they repeat, so a full descriptor table does not
/// spin a core.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per kind of accept trouble in this period.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The accept loop of one port: connections up to a cap, errors backed off.
pub struct Acceptor {
    listener: TcpListener,
    /// `grpc`, `http` or `metrics`: the metrics' `port` label.
    port: &'static str,
    slots: Arc<Semaphore>,
    cap: usize,
    open: Arc<AtomicUsize>,
    backoff: Duration,
    error_log: LogLimiter,
    refusal_log: LogLimiter,
}

/// A connection's place under its port's cap; released when the connection closes.
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
    port: &'static str,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let before = self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::open_connections(self.port, before.saturating_sub(1));
    }
}

impl Acceptor {
    pub fn new(listener: TcpListener, port: &'static str, max_connections: usize) -> Acceptor {
        let cap = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Acceptor {
            listener,
            port,
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            open: Arc::new(AtomicUsize::new(0)),
            backoff: ACCEPT_BACKOFF_MIN,
            error_log: LogLimiter::new(ACCEPT_LOG_EVERY),
            refusal_log: LogLimiter::new(ACCEPT_LOG_EVERY),
        }
    }

    /// The next connection that fits under the cap. A connection over the cap is closed
    /// at once (the client sees the connection close, not a hang).
    pub async fn next(&mut self) -> (TcpStream, ConnectionSlot) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                        metrics::transport_refusal(self.port, TransportRefusal::ConnectionLimit);
                        if let Some(held_back) = self.refusal_log.allow(Instant::now()) {
                            tracing::warn!(
                                port = self.port, cap = self.cap, %peer, held_back,
                                "connection limit reached: closing new connections"
                            );
                        }
                        drop(stream);
                        continue;
                    };
                    let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
                    metrics::open_connections(self.port, open);
                    let slot = ConnectionSlot {
                        _permit: permit,
                        open: self.open.clone(),
                        port: self.port,
                    };
                    return (stream, slot);
                }
                Err(e) => {
                    if let Some(held_back) = self.error_log.allow(Instant::now()) {
                        tracing::warn!(
                            port = self.port, error = %e, held_back,
                            retry_in_ms = self.backoff.as_millis() as u64,
                            "cannot accept a connection"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Idle connections
// ---------------------------------------------------------------------------------------

/// Calls in progress on one connection, and since when it has had none.
pub struct Activity {
    /// Whether any call has started on the connection.
    used: std::sync::atomic::AtomicBool,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    changed: Notify,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            used: std::sync::atomic::AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            changed: Notify::new(),
        })
    }

    /// A call starts; it ends when the returned guard drops.
    pub fn start(self: &Arc<Activity>) -> ActiveCall {
        self.used.store(true, Ordering::Release);
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveCall(self.clone())
    }

    /// Resolves once the connection has had no call in progress for `timeout`, or for
    /// `first_call` when no call has ever started on it (a client that connects and
    /// sends nothing, or half a handshake, holds a connection slot only that long).
    pub async fn idle_for(&self, first_call: Duration, timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between still wakes us.
            changed.as_mut().enable();
            if self.active.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let since = *self.idle_since.lock().expect("never poisoned");
            let timeout = if self.used.load(Ordering::Acquire) {
                timeout
            } else {
                first_call
            };
            tokio::select! {
                _ = tokio::time::sleep_until(since + timeout) => {
                    let still = self.active.load(Ordering::Acquire) == 0
                        && *self.idle_since.lock().expect("never poisoned") == since;
                    if still {
                        return;
                    }
                }
                _ = changed => {}
            }
        }
    }
}

/// How long a connection closing for idleness may take to say goodbye (GOAWAY, or a
/// handshake it never finished) before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One call in progress on a connection.
pub struct ActiveCall(Arc<Activity>);

impl Drop for ActiveCall {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("never poisoned") = Instant::now();
        }
        self.0.changed.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------
// The budget of request bytes in flight
// ---------------------------------------------------------------------------------------

/// Bytes are reserved in units of this many (so that the 32-bit permit counts of the
/// semaphore reach any budget); every message costs at least one unit, which also
/// accounts for the fixed cost of a small request.
const BUDGET_UNIT: usize = 1024;

/// Reservations up to this size are small: nearly all inference requests (a 224x224x3
/// FP32 image is 600 KB).
const SMALL_RESERVATION_BYTES: usize = 1 << 20;

/// The server-wide budget of request bytes being received, decoded or awaiting their
/// answer. Large reservations (over [`SMALL_RESERVATION_BYTES`]) may together take only
/// three quarters of it (or one largest message, if that is more), so clients holding
/// maximum-size messages, stalled or not, cannot shut out the small requests of
/// everyone else: a quarter of the budget stays theirs.
#[derive(Clone)]
pub struct Budget {
    units: Arc<Semaphore>,
    total_units: usize,
    /// The share large reservations draw from as well.
    large: Arc<Semaphore>,
}

impl Budget {
    /// A budget of `bytes`, whose large share still fits a message of `largest` bytes.
    pub fn new(bytes: usize, largest: usize) -> Budget {
        let max_units = Semaphore::MAX_PERMITS.min(u32::MAX as usize);
        let largest_units = largest
            .saturating_add(GRPC_HEADER_BYTES)
            .div_ceil(BUDGET_UNIT);
        // A message of the largest size (and its header) always fits an empty budget.
        let total_units = bytes
            .div_ceil(BUDGET_UNIT)
            .max(largest_units)
            .clamp(1, max_units);
        let large_units = (total_units / 4 * 3).max(largest_units).min(total_units);
        Budget {
            units: Arc::new(Semaphore::new(total_units)),
            total_units,
            large: Arc::new(Semaphore::new(large_units)),
        }
    }

    /// Units that `bytes` (a message and its 5-byte header) cost.
    fn units_for(bytes: usize) -> Option<u32> {
        u32::try_from(bytes.div_ceil(BUDGET_UNIT).max(1)).ok()
    }

    /// Reserve `bytes` now, or `None` when the budget (or its large share, for a large
    /// reservation) cannot hold them.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reserved> {
        let units = Budget::units_for(bytes)?;
        let large = if bytes > SMALL_RESERVATION_BYTES {
            Some(self.large.clone().try_acquire_many_owned(units).ok()?)
        } else {
            None
        };
        let permit = self.units.clone().try_acquire_many_owned(units).ok()?;
        Some(Reserved {
            _permit: permit,
            _large: large,
        })
    }

    /// Bytes reserved now (in whole units).
    pub fn in_use(&self) -> usize {
        (self.total_units - self.units.available_permits()) * BUDGET_UNIT
    }

    /// Set the bytes-in-flight gauge; called when /metrics is scraped rather than on
    /// every reservation, which would cost each request a metrics lookup.
    pub fn report(&self) {
        metrics::request_bytes_in_flight(self.in_use());
    }
}

/// Bytes held from the budget; given back on drop.
pub struct Reserved {
    _permit: OwnedSemaphorePermit,
    _large: Option<OwnedSemaphorePermit>,
}

/// The reservations of one call's current message (its wire bytes, and the heap its
/// decoding takes), shared by its body (which replaces them message by message), the
/// codec (which adds the decoded heap) and the call's future (which keeps a unary
/// call's until it is answered).
#[derive(Default)]
pub struct Reservation(Mutex<Vec<Reserved>>);

impl Reservation {
    /// Give back what the previous message held; hold `reserved` instead.
    fn replace(&self, reserved: Option<Reserved>) {
        let old = std::mem::replace(
            &mut *self.0.lock().expect("never poisoned"),
            reserved.into_iter().collect(),
        );
        drop(old);
    }

    fn add(&self, reserved: Reserved) {
        self.0.lock().expect("never poisoned").push(reserved);
    }
}

/// The budget as the codec sees it for one call: the decoded heap of each message is
/// reserved beside its wire bytes, or the call is refused.
pub struct CallBudget {
    budget: Budget,
    reservation: Arc<Reservation>,
}

impl DecodeBudget for CallBudget {
    fn reserve(&self, bytes: usize) -> Result<(), Status> {
        match self.budget.try_reserve(bytes) {
            Some(reserved) => {
                self.reservation.add(reserved);
                Ok(())
            }
            None => {
                metrics::transport_refusal("grpc", TransportRefusal::BytesInFlight);
                Err(budget_full(format!(
                    "decoding the request takes up to {bytes} bytes"
                )))
            }
        }
    }
}

/// The budget of the call a handler serves, from its request's extensions: streams
/// decode their messages on a task of their own, which sets it as
/// [`DECODE_BUDGET`] around its reads.
#[derive(Clone)]
pub struct CallDecodeBudget(pub Arc<dyn DecodeBudget>);

/// UNAVAILABLE with pushback: the budget of request bytes in flight is full.
fn budget_full(what: String) -> Status {
    let mut status = Status::unavailable(format!(
        "server is overloaded: its budget of request bytes in flight is full ({what})"
    ));
    status.metadata_mut().insert(
        RETRY_PUSHBACK_HEADER,
        tonic::metadata::MetadataValue::from(BUDGET_PUSHBACK_MS),
    );
    status
}

// ---------------------------------------------------------------------------------------
// gRPC message framing
// ---------------------------------------------------------------------------------------

/// gRPC length-prefixed messages: a compression flag byte and a big-endian u32 length.
const GRPC_HEADER_BYTES: usize = 5;

/// Follows the message boundaries of a gRPC body as its chunks pass, without buffering.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Framer {
    header: [u8; GRPC_HEADER_BYTES],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

/// What a chunk completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEvent {
    /// A message header: the message that follows has this many bytes.
    Header(u32),
    /// The current message has arrived in full.
    Complete,
}

impl Framer {
    /// Feed one chunk; `on_event` sees each header and completion in order and may stop
    /// the body with an error.
    pub fn feed<E>(
        &mut self,
        mut data: &[u8],
        mut on_event: impl FnMut(FrameEvent) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0 {
                    on_event(FrameEvent::Complete)?;
                }
                continue;
            }
            let n = (GRPC_HEADER_BYTES - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == GRPC_HEADER_BYTES {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                on_event(FrameEvent::Header(len))?;
                // u32 always fits usize on the targets we build for (64-bit).
                self.remaining = usize::try_from(len).unwrap_or(usize::MAX);
                if self.remaining == 0 {
                    on_event(FrameEvent::Complete)?;
                }
            }
        }
        Ok(())
    }

    /// Part of a message (its header or its bytes) has arrived, but not all of it.
    pub fn mid_message(&self) -> bool {
        self.have > 0 || self.remaining > 0
    }
}

// ---------------------------------------------------------------------------------------
// Request bodies of gRPC calls
// ---------------------------------------------------------------------------------------

/// How a gRPC method's request body is bounded.
#[derive(Debug, Clone, Copy)]
struct BodyRules {
    /// Largest message, in bytes.
    max_message: usize,
    /// Messages up to this size are not charged to the budget (health checks, metadata
    /// calls: they must keep answering when inference has filled the budget).
    free_below: usize,
    /// A stream may wait any time between messages; a unary call's whole body must
    /// arrive within the body-read timeout.
    streaming: bool,
}

/// Non-inference calls carry small messages (names, a JSON config on model load).
const CONTROL_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Messages this small cost the server next to nothing, however many are in flight
/// under the stream and connection caps.
const FREE_MESSAGE_BYTES: usize = 4096;

const INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";
const STREAM_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

fn rules_for(path: &str, max_message_bytes: usize) -> BodyRules {
    match path {
        INFER_PATH | STREAM_INFER_PATH => BodyRules {
            max_message: max_message_bytes,
            free_below: 0,
            streaming: path == STREAM_INFER_PATH,
        },
        _ => BodyRules {
            max_message: CONTROL_MAX_MESSAGE_BYTES.min(max_message_bytes),
            free_below: FREE_MESSAGE_BYTES,
            // Reflection and health's Watch are streams; every other method is unary
            // and gains nothing from a longer wait.
            streaming: path.ends_with("/ServerReflectionInfo") || path.ends_with("/Watch"),
        },
    }
}

/// A gRPC request body bounded as the module documentation describes.
pub struct LimitedBody {
    inner: Incoming,
    framer: Framer,
    rules: BodyRules,
    budget: Budget,
    reservation: Arc<Reservation>,
    body_timeout: Duration,
    /// The call's deadline, if it has one.
    deadline: Option<Instant>,
    /// When the message being received must be complete, if one is.
    message_due: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    finished: bool,
}

impl LimitedBody {
    fn new(
        inner: Incoming,
        rules: BodyRules,
        limits: &GrpcEdge,
        reservation: Arc<Reservation>,
        start: Instant,
        deadline: Option<Instant>,
    ) -> LimitedBody {
        LimitedBody {
            inner,
            framer: Framer::default(),
            rules,
            budget: limits.budget.clone(),
            reservation,
            body_timeout: limits.body_timeout,
            deadline,
            message_due: (!rules.streaming).then(|| start + limits.body_timeout),
            timer: None,
            finished: false,
        }
    }

    /// When the body must have made progress: the earlier of the deadline and the
    /// current message's due time.
    fn due(&self) -> Option<Instant> {
        [self.deadline, self.message_due]
            .into_iter()
            .flatten()
            .min()
    }

    /// End the body with `status`, giving its reservation back.
    fn fail(&mut self, reason: TransportRefusal, status: Status) -> Status {
        metrics::transport_refusal("grpc", reason);
        self.finished = true;
        self.timer = None;
        self.reservation.replace(None);
        status
    }

    fn on_chunk(&mut self, data: &[u8]) -> Result<(), Status> {
        let was_mid = self.framer.mid_message();
        let rules = self.rules;
        let mut framer = std::mem::take(&mut self.framer);
        let mut refusal = None;
        let result = framer.feed(data, |event| match event {
            FrameEvent::Header(len) => {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > rules.max_message {
                    refusal = Some(TransportRefusal::MessageTooLarge);
                    return Err(Status::resource_exhausted(format!(
                        "request message of {len} bytes is larger than the server's limit of {} bytes",
                        rules.max_message
                    )));
                }
                // The previous message of a stream has been decoded by now (tonic reads
                // the next header only after yielding it): its bytes go back first.
                self.reservation.replace(None);
                if len >= rules.free_below {
                    let bytes = len.saturating_add(GRPC_HEADER_BYTES);
                    let Some(reserved) = self.budget.try_reserve(bytes) else {
                        refusal = Some(TransportRefusal::BytesInFlight);
                        return Err(budget_full(format!("a message of {len} bytes")));
                    };
                    self.reservation.replace(Some(reserved));
                }
                Ok(())
            }
            FrameEvent::Complete => Ok(()),
        });
        self.framer = framer;
        if let Err(status) = result {
            let reason = refusal.unwrap_or(TransportRefusal::MessageTooLarge);
            return Err(self.fail(reason, status));
        }
        if self.rules.streaming {
            // A stream's message is due within the body-read timeout of its first byte;
            // between messages it may idle.
            match (was_mid, self.framer.mid_message()) {
                (false, true) => self.message_due = Some(Instant::now() + self.body_timeout),
                (_, false) => self.message_due = None,
                (true, true) => {}
            }
        }
        Ok(())
    }
}

/// Pushback asked of a client refused for the byte budget: about the time it takes a
/// few requests to be answered and give their bytes back.
const BUDGET_PUSHBACK_MS: u64 = 20;

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(status) = this.on_chunk(data.chunk()) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finished = true;
                Poll::Ready(Some(Err(Status::from_error(Box::new(e)))))
            }
            Poll::Ready(None) => {
                this.finished = true;
                this.timer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                // The one timer exists only once the body has had to wait: a body that
                // arrives with its headers (most unary calls) never allocates one.
                let Some(at) = this.due() else {
                    return Poll::Pending;
                };
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if timer.deadline() != at {
                            timer.as_mut().reset(at);
                        }
                        timer
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep_until(at))),
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let now = Instant::now();
                let status = if this.deadline.is_some_and(|d| d <= now) {
                    this.fail(
                        TransportRefusal::BodyDeadline,
                        Status::deadline_exceeded(
                            "deadline exceeded while the request was still arriving",
                        ),
                    )
                } else {
                    let timeout = this.body_timeout.as_secs();
                    this.fail(
                        TransportRefusal::BodyTimeout,
                        Status::deadline_exceeded(format!(
                            "request body did not arrive within the server's body-read timeout of {timeout} s"
                        )),
                    )
                };
                Poll::Ready(Some(Err(status)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its call counted as active on its connection until the
/// response has been sent (or the stream reset).
pub struct TrackedBody<B> {
    inner: B,
    _call: ActiveCall,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------------------
// The gRPC edge service
// ---------------------------------------------------------------------------------------

/// What every gRPC call on every connection shares.
#[derive(Clone)]
pub struct GrpcEdge {
    pub budget: Budget,
    pub body_timeout: Duration,
    pub max_message_bytes: usize,
    pub deadlines: DeadlinePolicy,
}

impl GrpcEdge {
    pub fn new(limits: &EdgeLimits, max_message_bytes: usize, deadlines: DeadlinePolicy) -> Self {
        GrpcEdge {
            budget: Budget::new(limits.max_request_bytes_in_flight, max_message_bytes),
            body_timeout: limits.body_read_timeout,
            max_message_bytes,
            deadlines,
        }
    }
}

/// The edge in front of one connection's gRPC routes.
#[derive(Clone)]
pub struct GrpcEdgeService<S> {
    pub inner: S,
    pub edge: GrpcEdge,
    pub activity: Arc<Activity>,
}

type ResponseFuture<B> = Pin<
    Box<
        dyn Future<Output = Result<hyper::Response<TrackedBody<B>>, std::convert::Infallible>>
            + Send,
    >,
>;

impl<S, B> tower::Service<hyper::Request<Incoming>> for GrpcEdgeService<S>
where
    S: tower::Service<
        hyper::Request<LimitedBody>,
        Response = hyper::Response<B>,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    type Response = hyper::Response<TrackedBody<B>>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: hyper::Request<Incoming>) -> Self::Future {
        let start = Instant::now();
        let call = self.activity.start();
        let rules = rules_for(req.uri().path(), self.edge.max_message_bytes);
        let header_timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(super::grpc::parse_grpc_timeout);
        // Inference calls get the server's deadline policy (its default and maximum);
        // other calls only the deadline they ask for.
        let deadline = if rules.free_below == 0 {
            self.edge.deadlines.deadline(start, header_timeout, None)
        } else {
            header_timeout.map(|t| start + t)
        };
        req.extensions_mut().insert(RequestStart(start));
        let reservation = Arc::new(Reservation::default());
        let decode_budget: Arc<dyn DecodeBudget> = Arc::new(CallBudget {
            budget: self.edge.budget.clone(),
            reservation: reservation.clone(),
        });
        req.extensions_mut()
            .insert(CallDecodeBudget(decode_budget.clone()));
        let req = req.map(|body| {
            LimitedBody::new(
                body,
                rules,
                &self.edge,
                reservation.clone(),
                start,
                deadline,
            )
        });
        let answer = self.inner.call(req);
        Box::pin(DECODE_BUDGET.scope(decode_budget, async move {
            let response = answer.await?;
            // A unary call's message bytes stay reserved until here: its decoded
            // tensors lived until the answer was ready.
            drop(reservation);
            Ok(response.map(|inner| TrackedBody { inner, _call: call }))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    fn events(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<FrameEvent> {
        let mut seen = Vec::new();
        for chunk in chunks {
            framer
                .feed::<()>(chunk, |e| {
                    seen.push(e);
                    Ok(())
                })
                .unwrap();
        }
        seen
    }

    #[test]
    fn framer_follows_messages_across_any_split() {
        let mut stream = message(3);
        stream.extend(message(0));
        stream.extend(message(70_000));
        let want = vec![
            FrameEvent::Header(3),
            FrameEvent::Complete,
            FrameEvent::Header(0),
            FrameEvent::Complete,
            FrameEvent::Header(70_000),
            FrameEvent::Complete,
        ];
        for split in [1, 2, 4, 5, 6, 7, 13, 4096, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(split).collect();
            let mut framer = Framer::default();
            assert_eq!(events(&mut framer, &chunks), want, "chunks of {split}");
            assert!(!framer.mid_message());
        }
    }

    #[test]
    fn framer_reports_a_header_before_its_body_arrives() {
        let mut framer = Framer::default();
        let seen = events(&mut framer, &[&[0, 0x04, 0, 0, 0]]);
        assert_eq!(seen, vec![FrameEvent::Header(64 << 20)]);
        assert!(framer.mid_message());
        let mut half = Framer::default();
        assert!(events(&mut half, &[&[0, 0]]).is_empty());
        assert!(half.mid_message(), "half a header is part of a message");
    }

    #[test]
    fn framer_stops_at_the_first_error() {
        let mut framer = Framer::default();
        let mut stream = message(2);
        stream.extend(message(9));
        let mut seen = 0;
        let result = framer.feed(&stream, |e| {
            seen += 1;
            match e {
                FrameEvent::Header(9) => Err("too big"),
                FrameEvent::Header(_) | FrameEvent::Complete => Ok(()),
            }
        });
        assert_eq!(result, Err("too big"));
        assert_eq!(seen, 3);
    }

    #[test]
    fn budget_reserves_in_units_and_gives_back_on_drop() {
        let budget = Budget::new(10 * BUDGET_UNIT, BUDGET_UNIT);
        let a = budget.try_reserve(1).expect("one unit");
        assert_eq!(budget.in_use(), BUDGET_UNIT);
        let b = budget.try_reserve(9 * BUDGET_UNIT).expect("nine units");
        assert!(budget.try_reserve(1).is_none(), "full");
        drop(a);
        let c = budget.try_reserve(BUDGET_UNIT).expect("room again");
        assert!(budget.try_reserve(BUDGET_UNIT + 1).is_none());
        drop((b, c));
        assert_eq!(budget.in_use(), 0);
        assert!(
            budget.try_reserve(11 * BUDGET_UNIT).is_none(),
            "over the whole budget"
        );
    }

    #[test]
    fn large_reservations_leave_a_quarter_of_the_budget_to_small_ones() {
        let mib = 1 << 20;
        let budget = Budget::new(64 * mib, 8 * mib);
        let mut large = Vec::new();
        while let Some(r) = budget.try_reserve(8 * mib) {
            large.push(r);
        }
        // Six fill the 48 MiB large share, though 16 MiB of the budget are left.
        assert_eq!(large.len(), 6);
        let mut small = Vec::new();
        while let Some(r) = budget.try_reserve(mib) {
            small.push(r);
        }
        assert_eq!(small.len(), 16, "the quarter kept for small requests");
        // A budget no bigger than the largest message still lets one in.
        let tight = Budget::new(8 * mib, 8 * mib);
        assert!(tight.try_reserve(8 * mib + GRPC_HEADER_BYTES).is_some());
    }

    #[test]
    fn reservation_is_replaced_message_by_message() {
        let budget = Budget::new(2 * BUDGET_UNIT, BUDGET_UNIT);
        let r = Reservation::default();
        r.replace(budget.try_reserve(2 * BUDGET_UNIT));
        assert_eq!(budget.in_use(), 2 * BUDGET_UNIT);
        r.replace(None);
        r.replace(budget.try_reserve(BUDGET_UNIT));
        assert_eq!(budget.in_use(), BUDGET_UNIT);
        // The codec adds the decoded heap beside the wire bytes; both go back together.
        let call = CallBudget {
            budget: budget.clone(),
            reservation: Arc::new(Reservation::default()),
        };
        call.reserve(BUDGET_UNIT / 2).expect("fits");
        assert_eq!(budget.in_use(), 2 * BUDGET_UNIT);
        let refused = call.reserve(BUDGET_UNIT).expect_err("full");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.metadata().get(RETRY_PUSHBACK_HEADER).is_some());
        drop(call);
        assert_eq!(budget.in_use(), BUDGET_UNIT);
        drop(r);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn log_limiter_lets_one_line_through_per_period_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut log = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(log.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.allow(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.allow(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(log.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(25)), Some(1));
    }

    #[test]
    fn method_rules() {
        let infer = rules_for(INFER_PATH, 1 << 26);
        assert_eq!(
            (infer.max_message, infer.free_below, infer.streaming),
            (1 << 26, 0, false)
        );
        assert!(rules_for(STREAM_INFER_PATH, 1 << 26).streaming);
        let meta = rules_for("/inference.GRPCInferenceService/ModelMetadata", 1 << 26);
        assert_eq!(meta.max_message, CONTROL_MAX_MESSAGE_BYTES);
        assert!(!meta.streaming && meta.free_below > 0);
        assert!(rules_for("/grpc.health.v1.Health/Watch", 1 << 26).streaming);
        assert_eq!(rules_for("/x/Y", 2048).max_message, 2048);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_after_its_last_call_ends() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(30);
        let call = activity.start();
        let idle = activity.idle_for(timeout, timeout);
        tokio::pin!(idle);
        tokio::select! {
            _ = &mut idle => panic!("a call is in progress"),
            _ = tokio::time::sleep(timeout * 3) => {}
        }
        drop(call);
        let ended = Instant::now();
        idle.await;
        assert_eq!(Instant::now() - ended, timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_call_restarts_the_idle_clock() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        let watcher = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle_for(Duration::from_secs(5), timeout).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(activity.start());
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(activity.start());
        watcher.await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_secs(52));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_any_call_is_idle_after_the_first_call_timeout() {
        let activity = Activity::new();
        let start = Instant::now();
        activity
            .idle_for(Duration::from_secs(5), Duration::from_secs(300))
            .await;
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
    }
}
