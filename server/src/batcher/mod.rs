//! The per-model dynamic batcher: one task that owns the model's queue (an actor).
//!
//! Requests arrive on a bounded channel, each with a oneshot for its answer. The loop
//! `select!`s between a new request, a free instance, and the next timer (the flush
//! deadline armed by the oldest request of the batch being formed, or the earliest
//! request expiry). Which requests go out together, and when, is decided by the pure
//! function [`plan`], unit-tested without a runtime:
//!
//! - a batch holds requests whose non-batch shapes and datatypes match the oldest one;
//! - it goes out when it reaches `max_batch_size` samples, when a preferred size can be
//!   formed, or once the oldest request has waited `max_queue_delay`;
//! - it is taken only when an instance is free, so while every instance is busy the
//!   batch keeps growing (with a zero delay it leaves the moment an instance frees up);
//! - requests whose client has gone or whose deadline has passed are dropped before
//!   dispatch, answered, and counted;
//! - when the channel closes (model unloaded), what is queued is still served.
//!
//! The same loop is the model's watchdog: its timer is also armed for the moment the
//! oldest running execution reaches `max_execution`. An instance found past it is taken
//! out of service by the pool (its requests answered INTERNAL), and the actor loads a
//! replacement when the pool has room for one. When every instance is stuck and none
//! can be started, queued and new requests are answered UNAVAILABLE and the model
//! reports itself wedged, which turns the server's liveness false.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::Error;
use crate::error::RejectReason;
use crate::metrics;
use crate::pool::InstancePool;
use crate::spec::BatchPolicy;
use crate::tensor::{DataType, Tensor};
use crate::work::{ComputeEstimate, Done};

mod actor;
mod estimate;
mod plan;
mod queue;
mod scaling;
#[cfg(test)]
mod tests;

/// Builders the batcher's unit tests share.
#[cfg(test)]
mod test_support {
    use super::*;

    /// The batch key of one FP32 input of `dims`.
    pub(super) fn key(dims: &[i64]) -> BatchKey {
        Arc::from(vec![(DataType::Fp32, dims.to_vec())])
    }

    /// Batching on, up to `max` samples, with `preferred` sizes and a `delay_ms` delay.
    pub(super) fn policy(max: usize, preferred: &[usize], delay_ms: u64) -> BatchPolicy {
        BatchPolicy {
            combine: true,
            max_batch_size: max,
            preferred: preferred.to_vec(),
            max_queue_delay: Duration::from_millis(delay_ms),
        }
    }
}

pub use estimate::predicted_wait;
pub use plan::{plan, plan_capped, LowerLevelCap, Pending, Plan};
pub use scaling::Scaling;

use actor::Actor;
use queue::{Queue, QueueCounts};

/// What makes two requests batchable: per input, datatype and non-batch dimensions.
pub type BatchKey = Arc<[(DataType, Vec<i64>)]>;

/// A validated request waiting for an instance.
pub struct Queued {
    /// Model argument order; leading dimension is `samples` for batching models.
    pub inputs: Vec<Tensor>,
    pub samples: usize,
    pub key: BatchKey,
    pub arrival: Instant,
    /// When the request stops being worth running (deadline or queue timeout).
    pub expires: Option<Instant>,
    /// When its answer must be out: it is not dispatched unless an execution of the
    /// batch, as measured so far, ends before then.
    pub deadline: Option<Instant>,
    /// Priority level, 1 the highest: higher levels are dispatched first.
    pub priority: u32,
    /// Joining the queue sheds the newest queued request of a lower level (admission
    /// let this one in over the full limit on that condition).
    pub preempt: bool,
    pub reply: oneshot::Sender<Result<Done, Error>>,
}

/// Sending side of a model's batcher. Dropping it lets the actor drain and stop.
pub struct Batcher {
    /// Instances as the actor last saw them: (loaded or loading, idle).
    pub instances: Arc<(AtomicUsize, AtomicUsize)>,
    /// Set while every instance is stuck and no replacement can start.
    wedged: Arc<AtomicBool>,
    model: String,
    tx: mpsc::Sender<Queued>,
    counts: Arc<QueueCounts>,
    limits: QueueLimits,
    policy: BatchPolicy,
    estimate: Arc<ComputeEstimate>,
}

/// Bounds on what a model's queue accepts (from its queue policy and the server's
/// admission settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Requests waiting in total.
    pub max_queue_size: usize,
    /// Priority levels (1 the highest); at least 1.
    pub priority_levels: u32,
    /// Refuse a request at once when its predicted wait already exceeds its deadline.
    pub predict_wait: bool,
}

impl Batcher {
    /// Start the actor for `pool`.
    pub fn spawn(
        model: String,
        policy: BatchPolicy,
        scaling: Scaling,
        limits: QueueLimits,
        pool: InstancePool,
    ) -> Batcher {
        let counts = Arc::new(QueueCounts::new(limits.priority_levels));
        let instances = Arc::new((AtomicUsize::new(pool.live()), AtomicUsize::new(0)));
        let wedged = Arc::new(AtomicBool::new(false));
        let estimate = pool.estimate.clone();
        // The channel never holds more than the queue may: admission counts first.
        let (tx, rx) = mpsc::channel(limits.max_queue_size.max(1));
        let actor = Actor {
            instances: instances.clone(),
            wedged: wedged.clone(),
            model: model.clone(),
            policy: policy.clone(),
            scaling,
            rx,
            queue: Queue::new(model.clone(), counts.clone()),
            estimate: estimate.clone(),
            pool,
            cold_since: None,
            arrivals: Vec::new(),
        };
        tokio::spawn(actor.run());
        Batcher {
            instances,
            wedged,
            model,
            tx,
            counts,
            limits,
            policy,
            estimate,
        }
    }

    /// Enqueue at once or refuse at once: a full queue, or (with `predict_wait`) a wait
    /// predicted past the request's deadline, answers UNAVAILABLE without waiting.
    pub fn submit(&self, request: Queued) -> Result<(), Error> {
        let level = request
            .priority
            .clamp(1, self.limits.priority_levels.max(1));
        let request = Queued {
            priority: level,
            ..request
        };
        self.check_predicted_wait(&request)?;
        let depth = self.counts.requests.fetch_add(1, Ordering::AcqRel);
        if depth >= self.limits.max_queue_size {
            self.counts.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Overloaded {
                model: self.model.clone(),
                cause: RejectReason::QueueFull,
                level: Some(level),
                reason: format!(
                    "queue full ({} requests waiting)",
                    self.limits.max_queue_size
                ),
                retry_after: Duration::from_millis(10),
            });
        }
        self.counts.add(&request);
        metrics::queue_depth(&self.model, depth + 1);
        self.tx.try_send(request).map_err(|e| self.not_sent(e))
    }

    /// With `predict_wait`: refuse at once a request whose predicted wait (what is
    /// queued ahead of it, in rounds of batches on the live instances, at the measured
    /// execution times) ends past its deadline.
    fn check_predicted_wait(&self, request: &Queued) -> Result<(), Error> {
        let (Some(deadline), true) = (request.deadline, self.limits.predict_wait) else {
            return Ok(());
        };
        let level = request.priority;
        let live = self.instances.0.load(Ordering::Acquire);
        let wait = (live > 0)
            .then(|| {
                predicted_wait(
                    &self.policy,
                    &self.estimate,
                    self.counts.ahead_of(level) + request.samples,
                    self.counts.requests.load(Ordering::Acquire) + 1,
                    request.samples,
                    live,
                )
            })
            .flatten();
        let now = Instant::now();
        let Some(wait) = wait.filter(|w| now + *w > deadline) else {
            return Ok(());
        };
        Err(Error::Overloaded {
            model: self.model.clone(),
            cause: RejectReason::PredictedWait,
            level: Some(level),
            reason: format!(
                "predicted wait {:.1} ms exceeds the remaining deadline {:.1} ms",
                wait.as_secs_f64() * 1e3,
                deadline.saturating_duration_since(now).as_secs_f64() * 1e3
            ),
            retry_after: wait,
        })
    }

    /// A request the channel did not take: counted out again, and refused.
    fn not_sent(&self, e: mpsc::error::TrySendError<Queued>) -> Error {
        self.counts.requests.fetch_sub(1, Ordering::AcqRel);
        let q = match &e {
            mpsc::error::TrySendError::Closed(q) | mpsc::error::TrySendError::Full(q) => q,
        };
        self.counts.remove(q);
        match e {
            mpsc::error::TrySendError::Closed(_) => Error::Restarting {
                model: self.model.clone(),
                reason: "this model version is unloading".into(),
            },
            // Unreachable while the counter bounds the channel; refuse rather than wait.
            mpsc::error::TrySendError::Full(q) => Error::Overloaded {
                model: self.model.clone(),
                cause: RejectReason::QueueFull,
                level: Some(q.priority),
                reason: "queue full".into(),
                retry_after: Duration::from_millis(10),
            },
        }
    }

    /// Requests waiting now (queued, not yet dispatched).
    pub fn depth(&self) -> usize {
        self.counts.requests.load(Ordering::Acquire)
    }

    /// Measured execution times of the model, by batch size.
    pub fn estimate(&self) -> &ComputeEstimate {
        &self.estimate
    }

    /// Whether every instance of the model is stuck and no replacement can start: the
    /// model cannot serve again unless a stuck execution returns.
    pub fn is_wedged(&self) -> bool {
        self.wedged.load(Ordering::Acquire)
    }
}
