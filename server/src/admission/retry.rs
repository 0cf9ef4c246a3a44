//! Retry of transient failures inside the gateway (an instance restarting or still
//! loading), within the request's deadline and a retry budget shared by all requests, so
//! that retries never multiply load when the cause is not transient.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Ceiling of the first retry's wait; doubled per retry up to [`MAX_BACKOFF`]. The wait
/// itself is drawn between half the ceiling and the ceiling (see [`RetryTransient`]).
pub const FIRST_BACKOFF: Duration = Duration::from_millis(5);
pub const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// Retries of one request at most, whatever its deadline and the budget.
pub const MAX_RETRIES: u32 = 3;

/// The retry policy: one per request (tower clones it), sharing the budget.
///
/// Waits are jittered ("equal jitter"): before retry `n` (from 0) the ceiling is
/// `FIRST_BACKOFF * 2^n`, at most [`MAX_BACKOFF`], and the wait is drawn uniformly
/// between half the ceiling and the ceiling. Requests that failed together (an instance
/// restarting fails all its queue at once) so retry spread over half the interval
/// instead of all at the same instant. Equal jitter rather than full jitter (uniform
/// from zero): a transient cause needs some time to pass, and a retry sent at once would
/// spend a unit of the shared budget on a failure almost certain to repeat.
///
/// Each policy draws from its own pseudo-random stream. A clone (tower makes one per
/// request) is seeded afresh from a sequence shared by all clones of the policy, so
/// requests never replay one another's draws; the sequence starts from a random seed
/// ([`RetryTransient::new`]) or a given one ([`RetryTransient::seeded`], reproducible).
pub struct RetryTransient {
    budget: Arc<TpsBudget>,
    retries: u32,
    seeds: Arc<Seeds>,
    jitter: Jitter,
}

impl Clone for RetryTransient {
    fn clone(&self) -> RetryTransient {
        RetryTransient {
            budget: self.budget.clone(),
            retries: self.retries,
            seeds: self.seeds.clone(),
            jitter: Jitter(self.seeds.next()),
        }
    }
}

impl RetryTransient {
    pub fn new(budget: RetryBudget) -> RetryTransient {
        RetryTransient::seeded(budget, random_seed())
    }

    /// A policy whose waits, and those of its clones taken in the same order, are the
    /// same for the same `seed`.
    pub fn seeded(budget: RetryBudget, seed: u64) -> RetryTransient {
        let seeds = Arc::new(Seeds(AtomicU64::new(seed)));
        RetryTransient {
            budget: Arc::new(TpsBudget::new(
                budget.ttl,
                budget.min_per_sec,
                budget.percent,
            )),
            retries: 0,
            jitter: Jitter(seeds.next()),
            seeds,
        }
    }

    /// The ceiling of the next retry's wait.
    fn ceiling(&self) -> Duration {
        FIRST_BACKOFF
            .saturating_mul(1 << self.retries.min(16))
            .min(MAX_BACKOFF)
    }

    /// The next retry's wait: uniform between half the ceiling and the ceiling.
    fn backoff(&mut self) -> Duration {
        let ceiling = self.ceiling();
        let floor = ceiling / 2;
        let span = u64::try_from((ceiling - floor).as_nanos()).unwrap_or(u64::MAX);
        floor + Duration::from_nanos(self.jitter.below(span.saturating_add(1)))
    }
}

/// Increment of SplitMix64 (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function: a bijection that scatters consecutive states.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed no other policy of this process starts from: the process's random hash keys
/// over a counter.
fn random_seed() -> u64 {
    static POLICIES: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(POLICIES.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// The seeds of a policy's clones: a SplitMix64 sequence shared by all of them.
struct Seeds(AtomicU64);

impl Seeds {
    fn next(&self) -> u64 {
        mix(self
            .0
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA))
    }
}

/// One policy's stream of draws (SplitMix64).
struct Jitter(u64);

impl Jitter {
    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let wide = u128::from(mix(self.0)) * u128::from(n);
        u64::try_from(wide >> 64).unwrap_or(0)
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
        // Never past the deadline, with the wait as drawn: a retry that cannot finish in
        // time is not tried.
        let wake = Instant::now() + self.backoff();
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
    use tower::util::BoxCloneService;
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

    /// A budget that never runs out in these tests.
    fn roomy() -> RetryBudget {
        RetryBudget {
            ttl: Duration::from_secs(10),
            min_per_sec: 1000,
            percent: 0.0,
        }
    }

    /// The mock answers `Ok(Result)` so that our own errors pass through unboxed.
    fn retrying(policy: RetryTransient) -> (BoxCloneService<Timed, InferResponse, Error>, Handle) {
        let (service, handle): (Mock, Handle) = mock::pair();
        let service = service
            .map_err(|e| Error::ModelFailed {
                model: "mock".into(),
                message: e.to_string(),
            })
            .and_then(|r: Result<InferResponse, Error>| async move { r });
        let layer = tower::retry::RetryLayer::new(policy);
        (BoxCloneService::new(layer.layer(service)), handle)
    }

    /// The wait `policy` draws for a transient failure now; `None`: not retried.
    fn wait(policy: &mut RetryTransient, deadline: Option<Instant>) -> Option<Duration> {
        let now = Instant::now();
        policy
            .retry(&mut call(deadline), &mut Err(unavailable()))
            .map(|sleep| sleep.deadline() - now)
    }

    /// The first waits of `n` requests (clones of `policy`, as tower makes them).
    fn first_waits(policy: &RetryTransient, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| wait(&mut policy.clone(), None).expect("retried"))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_retried_after_a_jittered_backoff() {
        let (service, mut handle) = retrying(RetryTransient::new(RetryBudget::default()));
        handle.allow(2);
        let answer = tokio::spawn(service.oneshot(call(None)));
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(Err(unavailable()));
        let failed = Instant::now();
        let mut next = tokio_test::task::spawn(handle.next_request());
        assert_pending!(next.poll());
        // The retry reaches the service again after a wait between half the first
        // backoff and the first backoff (the timer fires on whole milliseconds).
        let (_, reply) = next.await.unwrap();
        let waited = failed.elapsed();
        assert!(waited >= FIRST_BACKOFF / 2, "retried after {waited:?}");
        assert!(waited <= FIRST_BACKOFF + MS, "retried after {waited:?}");
        reply.send_response(Ok(ok()));
        assert!(answer.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn each_wait_lies_between_half_its_ceiling_and_its_ceiling() {
        let proto = RetryTransient::new(roomy());
        for _ in 0..100 {
            let mut policy = proto.clone();
            for n in 0..MAX_RETRIES {
                let ceiling = FIRST_BACKOFF * (1 << n);
                let waited = wait(&mut policy, None).expect("retried");
                assert!(
                    ceiling / 2 <= waited && waited <= ceiling,
                    "retry {n} waits {waited:?}"
                );
            }
            assert_eq!(wait(&mut policy, None), None, "at most MAX_RETRIES");
        }
        // The ceiling stops doubling at MAX_BACKOFF.
        let mut late = proto.clone();
        late.retries = 6;
        for _ in 0..100 {
            let waited = late.backoff();
            assert!(
                MAX_BACKOFF / 2 <= waited && waited <= MAX_BACKOFF,
                "{waited:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_draw_their_own_waits_spread_over_the_interval() {
        let (floor, ceiling) = (FIRST_BACKOFF / 2, FIRST_BACKOFF);
        let quarter = (ceiling - floor) / 4;
        let mut waits = first_waits(&RetryTransient::new(roomy()), 200);
        // Another policy (another server) draws other waits too.
        waits.extend(first_waits(&RetryTransient::new(roomy()), 200));
        assert!(waits.iter().all(|w| floor <= *w && *w <= ceiling));
        let mut distinct = waits.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 390, "{} distinct of 400", distinct.len());
        assert!(distinct[0] < floor + quarter, "lowest {:?}", distinct[0]);
        assert!(distinct[distinct.len() - 1] > ceiling - quarter);
    }

    #[tokio::test(start_paused = true)]
    async fn a_seed_reproduces_the_waits() {
        let draws = |seed| {
            let mut proto = RetryTransient::seeded(roomy(), seed);
            let mut waits = first_waits(&proto, 20);
            waits.push(wait(&mut proto, None).unwrap());
            waits
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_check_uses_the_drawn_wait() {
        // Between the shortest and the longest first wait: some retries fit, some not.
        let deadline = Instant::now() + FIRST_BACKOFF * 3 / 4;
        let drawn = first_waits(&RetryTransient::seeded(roomy(), 11), 100);
        let proto = RetryTransient::seeded(roomy(), 11);
        let mut retried = 0;
        for drawn in drawn {
            // The same seed: each clone draws the same wait as above.
            let got = wait(&mut proto.clone(), Some(deadline));
            if Instant::now() + drawn < deadline {
                assert_eq!(got, Some(drawn));
                retried += 1;
            } else {
                assert_eq!(got, None, "a wait of {drawn:?} would end past the deadline");
            }
        }
        assert!(0 < retried && retried < 100, "{retried} of 100 retried");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_failing_together_retry_at_different_times() {
        const N: usize = 32;
        let (service, mut handle) = retrying(RetryTransient::new(roomy()));
        handle.allow(2 * N as u64);
        let answers: Vec<_> = (0..N)
            .map(|_| tokio::spawn(service.clone().oneshot(call(None))))
            .collect();
        // All fail at the same instant (an instance restarting fails its whole queue).
        for _ in 0..N {
            let (_, reply) = handle.next_request().await.unwrap();
            reply.send_response(Err(unavailable()));
        }
        let failed = Instant::now();
        let mut arrivals = Vec::new();
        for _ in 0..N {
            let (_, reply) = handle.next_request().await.unwrap();
            arrivals.push(failed.elapsed());
            reply.send_response(Ok(ok()));
        }
        for answer in answers {
            assert!(answer.await.unwrap().is_ok());
        }
        // Within the interval (the timer fires on whole milliseconds), and not in step.
        assert!(arrivals
            .iter()
            .all(|a| FIRST_BACKOFF / 2 <= *a && *a <= FIRST_BACKOFF + MS));
        assert_ne!(arrivals.first(), arrivals.last(), "all retried at once");
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
            let (service, mut handle) = retrying(RetryTransient::new(RetryBudget::default()));
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
        let (service, mut handle) = retrying(RetryTransient::new(RetryBudget::default()));
        handle.allow(2);
        // 2 ms left: less than the shortest first wait (half the first backoff).
        let answer = tokio::spawn(service.oneshot(call(Some(Instant::now() + MS * 2))));
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
        let (service, mut handle) = retrying(RetryTransient::new(budget));
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
