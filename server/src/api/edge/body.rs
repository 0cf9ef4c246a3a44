//! A gRPC request body read frame by frame: each message's header checked as it
//! arrives, its bytes reserved from the budget, its arrival timed.

use super::*;

/// gRPC length-prefixed messages: a compression flag byte and a big-endian u32 length.
pub(super) const GRPC_HEADER_BYTES: usize = 5;

/// Follows the message boundaries of a gRPC body as its chunks pass, without buffering.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Framer {
    pub(super) header: [u8; GRPC_HEADER_BYTES],
    pub(super) have: usize,
    /// Bytes of the current message still to come.
    pub(super) remaining: usize,
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

/// How a gRPC method's request body is bounded.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyRules {
    /// Largest message, in bytes.
    pub(super) max_message: usize,
    /// Messages up to this size are not charged to the budget (health checks, metadata
    /// calls: they must keep answering when inference has filled the budget).
    pub(super) free_below: usize,
    /// A stream may wait any time between messages; a unary call's whole body must
    /// arrive within the body-read timeout.
    pub(super) streaming: bool,
}

/// Non-inference calls carry small messages (names, a JSON config on model load).
pub(super) const CONTROL_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Messages this small cost the server next to nothing, however many are in flight
/// under the stream and connection caps.
pub(super) const FREE_MESSAGE_BYTES: usize = 4096;

pub(super) const INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

pub(super) const STREAM_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

pub(super) fn rules_for(path: &str, max_message_bytes: usize) -> BodyRules {
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
    pub(super) inner: Incoming,
    pub(super) framer: Framer,
    pub(super) rules: BodyRules,
    pub(super) budget: Budget,
    pub(super) reservation: Arc<Reservation>,
    pub(super) body_timeout: Duration,
    /// The call's deadline, if it has one.
    pub(super) deadline: Option<Instant>,
    /// When the message being received must be complete, if one is.
    pub(super) message_due: Option<Instant>,
    pub(super) timer: Option<Pin<Box<Sleep>>>,
    pub(super) finished: bool,
    /// Frames already read from the wire (by [`LimitedBody::peek`]), given out first.
    pub(super) replay: std::collections::VecDeque<Result<Frame<Bytes>, Status>>,
}

impl LimitedBody {
    pub(super) fn new(
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
            replay: std::collections::VecDeque::new(),
        }
    }

    /// When the body must have made progress: the earlier of the deadline and the
    /// current message's due time.
    pub(super) fn due(&self) -> Option<Instant> {
        [self.deadline, self.message_due]
            .into_iter()
            .flatten()
            .min()
    }

    /// End the body with `status`, giving its reservation back.
    pub(super) fn fail(&mut self, reason: TransportRefusal, status: Status) -> Status {
        metrics::transport_refusal("grpc", reason);
        self.finished = true;
        self.timer = None;
        self.reservation.replace(None);
        status
    }

    pub(super) fn on_chunk(&mut self, data: &[u8]) -> Result<(), Status> {
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
pub(super) const BUDGET_PUSHBACK_MS: u64 = 20;

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.replay.pop_front() {
            Some(frame) => Poll::Ready(Some(frame)),
            None => self.poll_wire(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.replay.is_empty() && (self.finished || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl LimitedBody {
    // Kept whole: the body's one state machine (header, message, end), frame by frame.
    pub(super) fn poll_wire(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self;
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
}

/// A response body that keeps its call counted as active on its connection until the
/// response has been sent (or the stream reset).
pub struct TrackedBody<B> {
    pub(super) inner: B,
    pub(super) _call: ActiveCall,
}

impl<B> TrackedBody<B> {
    /// `inner`, keeping `call` active until it has been sent.
    pub fn new(inner: B, call: ActiveCall) -> TrackedBody<B> {
        TrackedBody { inner, _call: call }
    }
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
