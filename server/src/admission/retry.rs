//! Retry of transient failures inside the gateway (an instance restarting or still
//! loading), within the request's deadline and a retry budget shared by all requests, so
//! that retries never multiply load when the cause is not transient.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::Policy;

use super::Timed;
use crate::config::RetryBudget;
use crate::error::Error;
use crate::metrics;
use crate::model::InferResponse;

/// First retry's wait; doubled per retry up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(5);
pub const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// Retries of one request at most, whatever its deadline and the budget.
pub const MAX_RETRIES: u32 = 3;

/// The retry policy: one per request (tower clones it), sharing the budget.
#[derive(Clone)]
pub struct RetryTransient {
    budget: Arc<TpsBudget>,
    retries: u32,
}

impl RetryTransient {
    pub fn new(budget: RetryBudget) -> RetryTransient {
        RetryTransient {
            budget: Arc::new(TpsBudget::new(
                budget.ttl,
                budget.min_per_sec,
                budget.percent,
            )),
            retries: 0,
        }
    }

    fn backoff(&self) -> Duration {
        FIRST_BACKOFF
            .saturating_mul(1 << self.retries.min(16))
            .min(MAX_BACKOFF)
    }
}

impl Policy<Timed, InferResponse, Error> for RetryTransient {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        timed: &mut Timed,
        result: &mut Result<InferResponse, Error>,
    ) -> Option<Self::Future> {
        let err = match result {
            Ok(_) => {
                if self.retries == 0 {
                    self.budget.deposit();
                }
                return None;
            }
            Err(e) if e.is_transient() => e,
            Err(_) => {
                if self.retries == 0 {
                    self.budget.deposit();
                }
                return None;
            }
        };
        if self.retries >= MAX_RETRIES {
            return None;
        }
        let wake = Instant::now() + self.backoff();
        // Never past the deadline: a retry that cannot finish in time is not tried.
        if timed.deadline.is_some_and(|d| wake >= d) {
            return None;
        }
        if !self.budget.withdraw() {
            metrics::retry(&timed.call.model, "budget_exhausted");
            tracing::debug!(model = %timed.call.model, error = %err, "retry budget exhausted");
            return None;
        }
        metrics::retry(&timed.call.model, "retried");
        self.retries += 1;
        Some(tokio::time::sleep_until(wake))
    }

    fn clone_request(&mut self, timed: &Timed) -> Option<Timed> {
        Some(timed.clone())
    }
}

#[cfg(test)]
mod tests {
    use tokio_test::assert_pending;
    use tower::util::BoxService;
    use tower::{Layer, ServiceExt};
    use tower_test::mock;

    use super::*;
    use crate::admission::tests::ok;
    use crate::admission::InferCall;
    use crate::model::InferRequest;

    const MS: Duration = Duration::from_millis(1);

    fn call(deadline: Option<Instant>) -> Timed {
        Timed {
            call: InferCall {
                model: "m".into(),
                version: String::new(),
                request: InferRequest::default(),
                header_timeout: None,
                received: Instant::now(),
            },
            deadline,
        }
    }

    fn unavailable() -> Error {
        Error::Restarting {
            model: "m".into(),
            reason: "the model instance stopped".into(),
        }
    }

    type Mock = mock::Mock<Timed, Result<InferResponse, Error>>;
    type Handle = mock::Handle<Timed, Result<InferResponse, Error>>;

    /// The mock answers `Ok(Result)` so that our own errors pass through unboxed.
    fn retrying(budget: RetryBudget) -> (BoxService<Timed, InferResponse, Error>, Handle) {
        let (service, handle): (Mock, Handle) = mock::pair();
        let service = service
            .map_err(|e| Error::ModelFailed {
                model: "mock".into(),
                message: e.to_string(),
            })
            .and_then(|r: Result<InferResponse, Error>| async move { r });
        let layer = tower::retry::RetryLayer::new(RetryTransient::new(budget));
        (BoxService::new(layer.layer(service)), handle)
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_retried_after_a_backoff() {
        let (service, mut handle) = retrying(RetryBudget::default());
        handle.allow(2);
        let answer = tokio::spawn(service.oneshot(call(None)));
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(Err(unavailable()));
        // The retry waits FIRST_BACKOFF, then reaches the service again.
        let mut next = tokio_test::task::spawn(handle.next_request());
        assert_pending!(next.poll());
        tokio::time::advance(FIRST_BACKOFF).await;
        let (_, reply) = next.await.unwrap();
        reply.send_response(Ok(ok()));
        assert!(answer.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let permanent = [
            Error::ModelNotFound { model: "m".into() },
            Error::ModelUnavailable {
                model: "m".into(),
                reason: "not loaded".into(),
            },
            Error::InvalidRequest {
                model: "m".into(),
                message: "bad".into(),
            },
            Error::DeadlineExceeded {
                model: "m".into(),
                stage: "queued",
            },
            Error::Overloaded {
                model: "m".into(),
                cause: crate::error::RejectReason::QueueFull,
                level: None,
                reason: "full".into(),
                retry_after: MS,
            },
        ];
        for err in permanent {
            let code = err.code();
            let (service, mut handle) = retrying(RetryBudget::default());
            handle.allow(2);
            let answer = tokio::spawn(service.oneshot(call(None)));
            let (_, reply) = handle.next_request().await.unwrap();
            reply.send_response(Err(err));
            let got = answer.await.unwrap().unwrap_err();
            assert_eq!(tonic::Status::from(got).code(), code);
            // The answer is out and the service gone: nothing more reached it.
            assert!(handle.next_request().await.is_none());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_that_would_end_past_the_deadline() {
        let (service, mut handle) = retrying(RetryBudget::default());
        handle.allow(2);
        // 3 ms left: less than the first backoff.
        let answer = tokio::spawn(service.oneshot(call(Some(Instant::now() + MS * 3))));
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(Err(unavailable()));
        assert!(answer.await.unwrap().unwrap_err().is_transient());
        assert!(handle.next_request().await.is_none(), "not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_stops_retrying() {
        // One retry in reserve, none earned from traffic.
        let budget = RetryBudget {
            ttl: Duration::from_secs(1),
            min_per_sec: 1,
            percent: 0.0,
        };
        let (service, mut handle) = retrying(budget);
        handle.allow(3);
        let answer = tokio::spawn(service.oneshot(call(None)));
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(Err(unavailable()));
        tokio::time::advance(FIRST_BACKOFF).await;
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(Err(unavailable()));
        // The second failure finds the budget spent: answered, not retried.
        assert!(answer.await.unwrap().unwrap_err().is_transient());
        assert!(handle.next_request().await.is_none(), "not retried");
    }
}
