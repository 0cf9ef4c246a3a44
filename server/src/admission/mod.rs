//! Admission control: the tower stack every ModelInfer request passes through before it
//! reaches a model (health, metadata and metrics never do). Declared in one place,
//! [`stack`], outermost first:
//!
//! 1. [`deadline`]: one absolute deadline per request; DEADLINE_EXCEEDED when it passes.
//! 2. Global in-flight limit (tower's load shed over a concurrency limit shared by every
//!    connection): over it, UNAVAILABLE at once with `grpc-retry-pushback-ms`.
//! 3. [`retry`]: transient failures (an instance restarting or loading, a version
//!    unloading) are retried within the deadline and a retry budget, each attempt
//!    admitted afresh by the layer below.
//! 4. [`ModelLimit`]: resolves the model version once and the request's priority level
//!    once, and takes a slot of that version's adaptive concurrency limit
//!    ([`crate::limit`]), a smaller share for lower priorities; over it, UNAVAILABLE
//!    at once with pushback. What it decides travels on as one [`Admission`].
//! 5. The gateway runs the [`Admitted`] request on that version: validation, the
//!    model's queue (which refuses a request whose predicted wait exceeds its remaining
//!    deadline) and the instances.

pub mod deadline;
pub mod retry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::layer::util::{Identity, Stack};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use self::deadline::DeadlineLayer;
use self::retry::RetryTransient;
use crate::config::AdmissionConfig;
use crate::error::Error;
use crate::error::RejectReason;
use crate::gateway::Gateway;
use crate::limit::{AdaptiveLimit, LIMIT_PUSHBACK};
use crate::metrics;
use crate::model::{Admission, InferRequest, InferResponse, LoadedModel};

/// One inference request as the API hands it to the stack.
#[derive(Debug, Clone)]
pub struct InferCall {
    pub model: String,
    pub version: String,
    pub request: InferRequest,
    /// From the call's `grpc-timeout` header.
    pub header_timeout: Option<Duration>,
    /// When the server received the call: timeouts count from here.
    pub received: Instant,
}

/// A call with its absolute deadline, fixed once by the [`deadline`] layer.
#[derive(Debug, Clone)]
pub struct Timed {
    pub call: InferCall,
    /// `None`: the request may run as long as it takes.
    pub deadline: Option<Instant>,
}

/// A call that admission let in, with the one decision made for it.
#[derive(Debug)]
pub struct Admitted {
    pub call: InferCall,
    pub admission: Admission,
}

pub type InferService = BoxCloneSyncService<InferCall, InferResponse, Error>;

/// The admission stack in front of `gateway`, outermost first. Retries sit outside the
/// model's limit, so each attempt is admitted afresh: on the version then being served,
/// with a slot of that version's limit.
/// `global` is the server's in-flight limit ([`global_limit`]), shared with the transport
/// edge, which refuses from a call's HEADERS frame when it has no slot free.
pub fn stack(
    gateway: Arc<Gateway>,
    config: &AdmissionConfig,
    global: Option<Arc<tokio::sync::Semaphore>>,
) -> InferService {
    let global = global.map(global_limit_layer);
    let service = ServiceBuilder::new()
        .layer(DeadlineLayer::new(config.deadline))
        .option_layer(global)
        .layer(tower::retry::RetryLayer::new(RetryTransient::new(
            config.retry,
        )))
        .layer(ModelLimitLayer {
            gateway: gateway.clone(),
            shedding: config.shedding,
        })
        .service(GatewayService { gateway });
    BoxCloneSyncService::new(service.map_err(Error::from).map_err(counted))
}

/// Every refusal for overload leaves the stack here, and is counted here: by model,
/// cause and priority level.
fn counted(err: Error) -> Error {
    if let Error::Overloaded {
        model,
        cause,
        level,
        ..
    } = &err
    {
        metrics::rejected(model, *cause, *level);
    }
    err
}

/// The global limit's layers: tower's load shed over a concurrency limit whose one
/// semaphore is shared by every clone of the service (every connection).
pub(crate) type GlobalLimitLayer = ServiceBuilder<
    Stack<
        tower::limit::GlobalConcurrencyLimitLayer,
        Stack<
            tower::load_shed::LoadShedLayer,
            Stack<tower::util::MapErrLayer<fn(tower::BoxError) -> Error>, Identity>,
        >,
    >,
>;

/// The server's in-flight limit when it sheds load: `max_in_flight` slots.
pub fn global_limit(config: &AdmissionConfig) -> Option<Arc<tokio::sync::Semaphore>> {
    config
        .shedding
        .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)))
}

/// The refusal of a call that finds every slot of `global` taken, decided from its
/// HEADERS frame alone, counted like every refusal; `None` when a slot is free (the
/// call then takes one in the stack, or is refused there if it lost the race).
pub fn refuse_at_headers(global: &tokio::sync::Semaphore) -> Option<Error> {
    (global.available_permits() == 0).then(|| counted(global_refusal()))
}

fn global_refusal() -> Error {
    Error::Overloaded {
        model: metrics::ALL_MODELS.to_owned(),
        cause: RejectReason::InFlightLimit,
        level: None,
        reason: "the server's in-flight request limit is reached".into(),
        retry_after: LIMIT_PUSHBACK,
    }
}

/// At most as many calls at once as `semaphore` has slots; one more is refused at once
/// (UNAVAILABLE with pushback), never queued.
pub(crate) fn global_limit_layer(semaphore: Arc<tokio::sync::Semaphore>) -> GlobalLimitLayer {
    ServiceBuilder::new()
        .map_err(global_overload as fn(tower::BoxError) -> Error)
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
            semaphore,
        ))
}

/// Errors of the global limit: tower's `Overloaded` (no slot free) becomes ours; our own
/// errors from the layers inside pass through.
fn global_overload(err: tower::BoxError) -> Error {
    match err.downcast::<Error>() {
        Ok(ours) => *ours,
        Err(other) if other.is::<tower::load_shed::error::Overloaded>() => global_refusal(),
        Err(other) => Error::ModelFailed {
            model: metrics::ALL_MODELS.to_owned(),
            message: other.to_string(),
        },
    }
}

/// The innermost service: the gateway runs the admitted request.
#[derive(Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

impl Service<Admitted> for GatewayService {
    type Response = InferResponse;
    type Error = Error;
    type Future = BoxFuture<InferResponse>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, admitted: Admitted) -> Self::Future {
        let gateway = self.gateway.clone();
        let Admitted { call, admission } = admitted;
        Box::pin(async move { gateway.infer(call.request, admission).await })
    }
}

/// Per model: resolves the model version once, the request's priority level once, and
/// takes a slot of that version's adaptive concurrency limit; the three travel on as
/// one [`Admission`].
#[derive(Clone)]
pub struct ModelLimitLayer {
    gateway: Arc<Gateway>,
    shedding: bool,
}

impl<S> Layer<S> for ModelLimitLayer {
    type Service = ModelLimit<S>;
    fn layer(&self, inner: S) -> ModelLimit<S> {
        ModelLimit {
            inner,
            gateway: self.gateway.clone(),
            shedding: self.shedding,
        }
    }
}

#[derive(Clone)]
pub struct ModelLimit<S> {
    inner: S,
    gateway: Arc<Gateway>,
    shedding: bool,
}

/// Admit `timed` on the version its model serves now, or refuse it: the model lookup,
/// the priority level and the limit's slot, each decided here and nowhere else.
pub fn admit(gateway: &Gateway, timed: Timed, shedding: bool) -> Result<Admitted, Error> {
    let Timed { call, deadline } = timed;
    let model = gateway
        .model(&call.model, &call.version)
        .inspect_err(|e| gateway.account(&call.model, Err(e), std::time::Instant::now()))?;
    let queue = &model.spec.queue;
    let level = queue.priority_level(call.request.priority);
    let permit = if shedding {
        let limit = &model.limit;
        let levels = queue.priority_levels;
        let permit = match deadline {
            Some(_) => limit.try_acquire(level, levels),
            None => limit.try_acquire_without_deadline(level, levels),
        };
        let Some(permit) = permit else {
            return Err(limit_refusal(&call.model, limit, level, levels));
        };
        Some(permit)
    } else {
        None
    };
    metrics::admitted(&call.model, level);
    Ok(Admitted {
        call,
        admission: Admission {
            model,
            deadline,
            level,
            permit,
        },
    })
}

/// The refusal of a request of `level` by `model`'s concurrency limit.
fn limit_refusal(model: &str, limit: &AdaptiveLimit, level: u32, levels: u32) -> Error {
    Error::Overloaded {
        model: model.to_owned(),
        cause: RejectReason::ConcurrencyLimit,
        level: Some(level),
        reason: format!(
            "concurrency limit reached ({} in flight, limit {}, priority level {level} of {levels})",
            limit.in_flight(),
            limit.limit()
        ),
        retry_after: LIMIT_PUSHBACK,
    }
}

/// What the transport edge knows of a request before its body is read: the header
/// fields at the start of the message and whether the call has a deadline.
#[derive(Debug, Clone, Copy)]
pub struct EarlyCall<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub priority: Option<u64>,
    pub has_deadline: bool,
}

/// The refusal [`admit`] would give `call` now by its model's concurrency limit,
/// decided from its header fields alone, so that the edge answers it without reading
/// or decoding the rest of its body; counted like every refusal. `None` when admission
/// must see the whole request: the limit has room, or the model is unknown (the full
/// path answers NOT_FOUND and accounts for it). Only for a stack that sheds load.
pub fn refuse_early(gateway: &Gateway, call: EarlyCall<'_>) -> Option<Error> {
    let model = gateway.model(call.model, call.version).ok()?;
    let queue = &model.spec.queue;
    let level = queue.priority_level(call.priority);
    let levels = queue.priority_levels;
    model
        .limit
        .refuses(level, levels, call.has_deadline)
        .then(|| counted(limit_refusal(call.model, &model.limit, level, levels)))
}

impl<S> Service<Timed> for ModelLimit<S>
where
    S: Service<Admitted, Response = InferResponse, Error = Error> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = InferResponse;
    type Error = Error;
    type Future = BoxFuture<InferResponse>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, timed: Timed) -> Self::Future {
        let admitted = match admit(&self.gateway, timed, self.shedding) {
            Ok(admitted) => admitted,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        if admitted.admission.permit.is_none() {
            return Box::pin(self.inner.call(admitted));
        }
        let mut leaving = Leaving {
            model: admitted.admission.model.clone(),
            level: admitted.admission.level,
            received: admitted.call.received,
            answered: false,
        };
        let answer = self.inner.call(admitted);
        Box::pin(async move {
            // The slot went back when the request was answered (its admission dropped).
            let result = answer.await;
            leaving.answered = true;
            let now = Instant::now();
            // How long work stood waiting: the oldest wait in the request's execution.
            // A request that expired waited its whole time here.
            match &result {
                Ok(r) => leaving.finished(r.batch_wait, r.excess, now, true),
                Err(Error::DeadlineExceeded { .. }) => leaving.unserved(now),
                Err(_) => {}
            }
            result
        })
    }
}

/// An admitted request on its way out, reported to its model's limit when it leaves:
/// served or expired when answered, and unserved when its call is dropped before the
/// answer. A client abandons a call when its own deadline passes, which can come before
/// the server's: on one connection whose streams are all in use, calls wait in the
/// client for a stream with their deadline running, and reach the server with little
/// of it left. If those never counted, an overload whose requests are all abandoned
/// would read as none, and the limit, seeing only what the streams let through, would
/// hold the server in that state for good (every answer late by the client's clock).
struct Leaving {
    model: Arc<LoadedModel>,
    level: u32,
    received: Instant,
    answered: bool,
}

impl Leaving {
    fn finished(&self, waited: Duration, excess: Duration, now: Instant, served: bool) {
        let model = &self.model;
        let unit = model.unit_execution();
        if let Some(after) = model
            .limit
            .on_finished(self.level, waited, excess, unit, now, served)
        {
            metrics::concurrency_limit(&model.spec.name, after);
        }
    }

    /// Not served (expired, or abandoned by its client): it waited its whole time.
    fn unserved(&self, now: Instant) {
        self.finished(
            now.duration_since(self.received),
            Duration::ZERO,
            now,
            false,
        );
    }
}

impl Drop for Leaving {
    fn drop(&mut self) {
        if !self.answered {
            self.unserved(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok, task};
    use tower_test::mock;

    use super::*;
    use crate::model::InferRequest;

    fn call() -> InferCall {
        InferCall {
            model: "m".into(),
            version: String::new(),
            request: InferRequest::default(),
            header_timeout: None,
            received: Instant::now(),
        }
    }

    /// An empty successful answer, for the layer tests of this module and its children.
    pub(super) fn ok() -> InferResponse {
        InferResponse {
            model: "m".into(),
            version: 1,
            id: String::new(),
            outputs: Vec::new(),
            queue: Duration::ZERO,
            batch_wait: Duration::ZERO,
            compute: Duration::ZERO,
            excess: Duration::ZERO,
        }
    }

    type Handle = mock::Handle<InferCall, InferResponse>;

    /// The global limit of `max` calls in front of a mock the test answers.
    fn limited(
        max: usize,
    ) -> (
        mock::Spawn<impl Service<InferCall, Response = InferResponse, Error = Error>>,
        Handle,
    ) {
        let (service, handle) = mock::pair::<InferCall, InferResponse>();
        (
            mock::Spawn::new(
                global_limit_layer(Arc::new(tokio::sync::Semaphore::new(max))).service(service),
            ),
            handle,
        )
    }

    /// A refusal of the global limit: UNAVAILABLE, naming the limit, with pushback.
    fn assert_shed(err: Error) {
        let (reason, retry_after) = crate::error::expect_overloaded(err);
        assert!(reason.contains("in-flight request limit"), "{reason}");
        assert_eq!(retry_after, LIMIT_PUSHBACK);
    }

    #[tokio::test]
    async fn over_the_global_limit_a_call_is_shed_at_once_with_pushback() {
        let (mut service, mut handle) = limited(1);
        assert_ready_ok!(service.poll_ready());
        let mut first = task::spawn(service.call(call()));
        let (_, reply) = handle.next_request().await.expect("the first call passes");
        assert_pending!(first.poll());

        // The one slot is held: the next call is answered without waiting for it.
        assert_ready_ok!(service.poll_ready(), "load shed never makes a caller wait");
        assert_shed(assert_ready_err!(task::spawn(service.call(call())).poll()));
        assert_pending!(
            task::spawn(handle.next_request()).poll(),
            "the shed call never reached the service"
        );

        // The first call completes and its slot is free again: a new call passes.
        reply.send_response(ok());
        assert_ready_ok!(first.poll());
        drop(first);
        assert_ready_ok!(service.poll_ready());
        let mut third = task::spawn(service.call(call()));
        let (_, reply) = handle
            .next_request()
            .await
            .expect("the slot was given back");
        reply.send_response(ok());
        assert_ready_ok!(third.poll());
    }

    #[tokio::test]
    async fn a_call_that_fails_also_gives_its_slot_back() {
        let (mut service, mut handle) = limited(1);
        assert_ready_ok!(service.poll_ready());
        let mut first = task::spawn(service.call(call()));
        let (_, reply) = handle.next_request().await.unwrap();
        // Our own errors from the layers inside pass through unchanged.
        reply.send_error(Error::ModelNotFound { model: "m".into() });
        let err = assert_ready_err!(first.poll());
        assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
        drop(first);
        assert_ready_ok!(service.poll_ready());
        let mut next = task::spawn(service.call(call()));
        let (_, reply) = handle.next_request().await.expect("slot given back");
        reply.send_response(ok());
        assert_ready_ok!(next.poll());
    }

    #[tokio::test]
    async fn an_inner_service_that_is_not_ready_sheds_at_once() {
        let (mut service, mut handle) = limited(8);
        handle.allow(0);
        assert_ready_ok!(service.poll_ready(), "load shed never makes a caller wait");
        assert_shed(assert_ready_err!(task::spawn(service.call(call())).poll()));
        // Ready again: calls pass.
        handle.allow(1);
        assert_ready_ok!(service.poll_ready());
        let mut next = task::spawn(service.call(call()));
        let (_, reply) = handle.next_request().await.expect("forwarded once ready");
        reply.send_response(ok());
        assert_ready_ok!(next.poll());
    }
}
