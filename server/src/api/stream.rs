//! ModelStreamInfer: many inference requests on one bidirectional stream, each answered
//! on it in Triton's form.
//!
//! - Each request is admitted like a unary call, with its own deadline: its `timeout`
//!   parameter and the server's deadline policy, bounded by what is left of the stream's
//!   `grpc-timeout` (which covers the whole stream, so it bounds every request on it).
//! - A failure travels in `error_message` with the request's model, version and id, and
//!   the stream goes on. A message that cannot be decoded (malformed, or over the codec's
//!   caps) ends the stream: the requests already received are answered first, then the
//!   stream closes with the decode error's status.
//! - At most [`STREAM_WINDOW`] requests of one stream are in flight (received and not yet
//!   answered); the reader waits for a slot before it reads on, so back-pressure reaches
//!   the client through HTTP/2 flow control.
//! - The client half-closes: the answers in flight are still sent, then the stream ends
//!   OK (DEADLINE_EXCEEDED if its deadline passed before the last answer).
//! - The client cancels the stream or goes away (its answers can no longer be delivered):
//!   every request of the stream still queued is dropped before it reaches the model and
//!   counted in `sluice_dropped_requests_total{reason="cancelled"}`; one already executing
//!   finishes on its instance.
//! - The stream's deadline passes: no more requests are read, those in flight answer
//!   DEADLINE_EXCEEDED in the stream (their deadlines are bounded by it), then the stream
//!   ends DEADLINE_EXCEEDED.
//! - The server shuts down: no more requests are read, the ones received are answered,
//!   then the stream ends UNAVAILABLE (so the client knows the rest was not read), within
//!   the shutdown grace period.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sluice_proto::codec::{DecodeBudget, DECODE_BUDGET};
use sluice_proto::inference::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Status, Streaming};

use super::convert;
use super::grpc::InferenceService;
use crate::admission::InferService;

/// Requests of one stream in flight at most: received, not yet answered.
pub const STREAM_WINDOW: usize = 64;

/// What one stream runs with.
pub(super) struct StreamCall {
    pub admission: InferService,
    /// The stream's deadline, from its `grpc-timeout`.
    pub deadline: Option<Instant>,
    /// Cancelled when the server begins to shut down.
    pub stopping: CancellationToken,
}

/// The answers of one stream, as the transport sends them. Dropped (the client cancelled
/// or went away), it tells the stream's reader, which drops the stream's queued work.
pub struct Answers {
    rx: ReceiverStream<Result<ModelStreamInferResponse, Status>>,
    _gone: DropGuard,
}

impl Stream for Answers {
    type Item = Result<ModelStreamInferResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

/// Start reading `inbound`; the answers come out of the returned stream. `budget`: the
/// edge's reservation of each message's decoded heap, charged as the reader decodes.
pub(super) fn serve(
    call: StreamCall,
    inbound: Streaming<ModelInferRequest>,
    budget: Option<Arc<dyn DecodeBudget>>,
) -> Answers {
    let (tx, rx) = mpsc::channel(STREAM_WINDOW);
    let gone = CancellationToken::new();
    let reader = run(call, inbound, tx, gone.clone());
    match budget {
        Some(budget) => tokio::spawn(DECODE_BUDGET.scope(budget, reader)),
        None => tokio::spawn(reader),
    };
    Answers {
        rx: ReceiverStream::new(rx),
        _gone: gone.drop_guard(),
    }
}

/// Why the reader stopped reading.
#[derive(Debug)]
enum End {
    /// The client half-closed: the stream ends OK once every answer is sent.
    Finished,
    /// The answers can no longer be delivered.
    Gone,
    /// The stream ends with this status once every answer is sent.
    Failed(Status),
}

type Sender = mpsc::Sender<Result<ModelStreamInferResponse, Status>>;

/// The stream's reader: admits each request as it arrives, then answers the rest and
/// ends the stream as [`End`] says.
async fn run(
    call: StreamCall,
    mut inbound: Streaming<ModelInferRequest>,
    tx: Sender,
    gone: CancellationToken,
) {
    // The answering tasks; each holds one of the window's slots, finished ones are reaped
    // as the loop goes, so the set stays that small. Dropping it cancels them.
    let mut answering = JoinSet::new();
    let end = read(&call, &mut inbound, &tx, &gone, &mut answering).await;
    // Stop reading: a message still arriving is not waited for.
    drop(inbound);
    if let End::Gone = end {
        return; // `answering` dropped: queued requests are cancelled.
    }
    loop {
        tokio::select! {
            biased;
            _ = gone.cancelled() => return,
            next = answering.join_next() => if next.is_none() { break },
        }
    }
    let closing = match end {
        End::Failed(status) => Some(status),
        // A stream the client finished still ends with its deadline when that passed
        // before every answer was sent (the late ones answered DEADLINE_EXCEEDED).
        End::Finished if call.deadline.is_some_and(|d| d <= Instant::now()) => {
            Some(deadline_passed())
        }
        End::Finished | End::Gone => None,
    };
    if let Some(status) = closing {
        // Last: it ends the stream for the client.
        let _ = tx.send(Err(status)).await;
    }
}

/// Read and admit requests until the stream ends, the client goes away, its deadline
/// passes or the server stops.
async fn read(
    call: &StreamCall,
    inbound: &mut Streaming<ModelInferRequest>,
    tx: &Sender,
    gone: &CancellationToken,
    answering: &mut JoinSet<()>,
) -> End {
    loop {
        let next = tokio::select! {
            biased;
            _ = gone.cancelled() => return End::Gone,
            _ = until(call.deadline) => return End::Failed(deadline_passed()),
            _ = call.stopping.cancelled() => return End::Failed(Status::unavailable(
                "the server is shutting down; the requests received on this stream were \
                 answered, later ones were not read",
            )),
            next = inbound.next() => next,
        };
        let req = match next {
            None => return End::Finished,
            Some(Err(status)) => return End::Failed(status),
            Some(Ok(req)) => req,
        };
        let received = Instant::now();
        // A slot first: the window bounds the requests in flight.
        let permit = tokio::select! {
            biased;
            _ = gone.cancelled() => return End::Gone,
            _ = until(call.deadline) => return End::Failed(deadline_passed()),
            permit = tx.clone().reserve_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return End::Gone,
            },
        };
        while answering.try_join_next().is_some() {}
        let admission = call.admission.clone();
        let left = call.deadline.map(|d| d.saturating_duration_since(received));
        answering.spawn(async move {
            permit.send(Ok(answer(admission, req, left, received).await));
        });
    }
}

/// The status a stream whose deadline passed ends with.
fn deadline_passed() -> Status {
    Status::deadline_exceeded(
        "the stream's deadline (grpc-timeout) passed; requests after it were not read",
    )
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One request of a stream, answered in Triton's form: a failure travels in
/// `error_message`, with the request's model, version and id. `left`: what remains of
/// the stream's deadline, which bounds the request's.
async fn answer(
    admission: InferService,
    req: ModelInferRequest,
    left: Option<Duration>,
    received: Instant,
) -> ModelStreamInferResponse {
    let (name, version, id) = (
        req.model_name.clone(),
        req.model_version.clone(),
        req.id.clone(),
    );
    match InferenceService::infer(admission, req, left, received).await {
        Ok(resp) => ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(convert::infer_response(resp)),
        },
        Err(e) => ModelStreamInferResponse {
            error_message: e.client_message(),
            infer_response: Some(ModelInferResponse {
                model_name: name,
                model_version: version,
                id,
                ..Default::default()
            }),
        },
    }
}
