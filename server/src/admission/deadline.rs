//! The outermost layer: one absolute deadline per request, and DEADLINE_EXCEEDED when it
//! passes, whatever the request is doing then (queued, running, being retried).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::{Layer, Service};

use super::{InferCall, Timed};
use crate::config::DeadlinePolicy;
use crate::error::Error;
use crate::model::InferResponse;

#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    policy: DeadlinePolicy,
}

impl DeadlineLayer {
    pub fn new(policy: DeadlinePolicy) -> DeadlineLayer {
        DeadlineLayer { policy }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            policy: self.policy,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    policy: DeadlinePolicy,
}

impl<S> Service<InferCall> for Deadline<S>
where
    S: Service<Timed, Response = InferResponse, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = InferResponse;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<InferResponse, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: InferCall) -> Self::Future {
        let deadline = self.policy.deadline(
            call.received,
            call.header_timeout,
            call.request.queue_timeout,
        );
        let expired = |stage| Error::DeadlineExceeded {
            model: call.model.clone(),
            stage,
        };
        let Some(deadline) = deadline else {
            return Box::pin(self.inner.call(Timed {
                call,
                deadline: None,
            }));
        };
        if deadline <= Instant::now() {
            let err = expired("arriving");
            return Box::pin(async move { Err(err) });
        }
        let err = expired("in flight");
        let answer = self.inner.call(Timed {
            call,
            deadline: Some(deadline),
        });
        // The request's one timer: nothing is answered later than this, whatever the
        // request is doing then (queued, running, being retried).
        Box::pin(async move {
            tokio::time::timeout_at(deadline, answer)
                .await
                .unwrap_or(Err(err))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_test::{assert_pending, assert_ready_err};
    use tonic::Code;
    use tower_test::mock;

    use super::*;
    use crate::model::InferRequest;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn smallest_timeout_wins_and_the_maximum_caps_it() {
        let t0 = Instant::now();
        let both = DeadlinePolicy {
            default: Some(MS * 500),
            max: Some(MS * 2000),
        };
        assert_eq!(both.deadline(t0, None, None), Some(t0 + MS * 500));
        assert_eq!(both.deadline(t0, Some(MS * 100), None), Some(t0 + MS * 100));
        assert_eq!(
            both.deadline(t0, Some(MS * 300), Some(MS * 200)),
            Some(t0 + MS * 200)
        );
        // The default is a bound too: a longer client timeout does not lift it.
        assert_eq!(both.deadline(t0, Some(MS * 900), None), Some(t0 + MS * 500));
        let capped = DeadlinePolicy {
            default: None,
            max: Some(MS * 2000),
        };
        assert_eq!(
            capped.deadline(t0, Some(MS * 9000), None),
            Some(t0 + MS * 2000)
        );
        assert_eq!(capped.deadline(t0, None, None), Some(t0 + MS * 2000));
        assert_eq!(DeadlinePolicy::default().deadline(t0, None, None), None);
    }

    fn call(header: Option<Duration>) -> InferCall {
        InferCall {
            model: "m".into(),
            version: String::new(),
            request: InferRequest::default(),
            header_timeout: header,
            received: Instant::now(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_answers_deadline_exceeded_and_passes_the_deadline_on() {
        let (service, mut handle) = mock::pair::<Timed, InferResponse>();
        let mut service = mock::Spawn::new(
            DeadlineLayer::new(DeadlinePolicy::default()).layer(service.map_err(into_error)),
        );
        handle.allow(1);
        assert!(service.poll_ready().is_ready());
        let t0 = Instant::now();
        let mut answer = tokio_test::task::spawn(service.call(call(Some(MS * 50))));
        let (seen, _reply) = handle.next_request().await.expect("forwarded");
        assert_eq!(seen.deadline, Some(t0 + MS * 50));
        assert_pending!(answer.poll());
        tokio::time::advance(MS * 49).await;
        assert_pending!(answer.poll());
        tokio::time::advance(MS).await;
        let err = assert_ready_err!(answer.poll());
        assert_eq!(tonic::Status::from(err).code(), Code::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn an_already_expired_request_is_not_forwarded() {
        let (service, mut handle) = mock::pair::<Timed, InferResponse>();
        let mut service = mock::Spawn::new(
            DeadlineLayer::new(DeadlinePolicy::default()).layer(service.map_err(into_error)),
        );
        handle.allow(1);
        assert!(service.poll_ready().is_ready());
        let err = service.call(call(Some(Duration::ZERO))).await.unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded { .. }));
        assert_pending!(tokio_test::task::spawn(handle.next_request()).poll());
    }

    /// The mock's errors are boxed; in these tests it never fails.
    fn into_error(e: Box<dyn std::error::Error + Send + Sync>) -> Error {
        Error::ModelFailed {
            model: "mock".into(),
            message: e.to_string(),
        }
    }

    use tower::ServiceExt;
}
