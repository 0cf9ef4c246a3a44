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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::Error;
use crate::metrics::{self, DropReason};
use crate::pool::InstancePool;
use crate::tensor::{DataType, Tensor};

/// What makes two requests batchable: per input, datatype and non-batch dimensions.
pub type BatchKey = Arc<[(DataType, Vec<i64>)]>;

/// How the model's requests are combined (from `dynamic_batching` in config.pbtxt).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    /// Whether requests are combined at all (`dynamic_batching` present and the model batches).
    pub combine: bool,
    /// Most samples per execution (`max_batch_size`).
    pub max_batch_size: usize,
    /// Sizes worth dispatching at once, ascending.
    pub preferred: Vec<usize>,
    pub max_queue_delay: Duration,
}

/// A validated request waiting for an instance.
pub struct Queued {
    /// Model argument order; leading dimension is `samples` for batching models.
    pub inputs: Vec<Tensor>,
    pub samples: usize,
    pub key: BatchKey,
    pub arrival: Instant,
    /// When the request stops being worth running (deadline or queue timeout).
    pub expires: Option<Instant>,
    pub reply: oneshot::Sender<Result<Done, Error>>,
}

/// A request's share of one execution.
#[derive(Debug)]
pub struct Done {
    pub outputs: Vec<Tensor>,
    pub queue: Duration,
    pub compute: Duration,
    /// Samples in the execution this request was part of.
    pub batch_size: usize,
}

/// The view of a queued request that the policy needs.
pub trait Pending {
    fn samples(&self) -> usize;
    fn key(&self) -> &BatchKey;
    fn arrival(&self) -> Instant;
}

impl Pending for Queued {
    fn samples(&self) -> usize {
        self.samples
    }
    fn key(&self) -> &BatchKey {
        &self.key
    }
    fn arrival(&self) -> Instant {
        self.arrival
    }
}

/// The batch the policy would form now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Indices into the queue, oldest first.
    pub take: Vec<usize>,
    pub samples: usize,
    /// Whether it should go out as soon as an instance is free.
    pub ready: bool,
    /// If not ready: when it will be (the oldest request's arrival + max delay).
    pub ready_at: Option<Instant>,
}

/// Decide the next batch. `None` when the queue is empty.
pub fn plan<P: Pending>(policy: &BatchPolicy, queue: &[P], now: Instant) -> Option<Plan> {
    let head = queue.first()?;
    if !policy.combine {
        return Some(Plan { take: vec![0], samples: head.samples(), ready: true, ready_at: None });
    }
    // Greedily collect, oldest first, the requests that fit beside the head.
    let mut take = Vec::new();
    let mut samples = 0;
    for (i, p) in queue.iter().enumerate() {
        if p.key() != head.key() || samples + p.samples() > policy.max_batch_size {
            continue;
        }
        take.push(i);
        samples += p.samples();
        if samples == policy.max_batch_size {
            return Some(Plan { take, samples, ready: true, ready_at: None });
        }
    }
    // The largest preferred size that a prefix of the collected requests forms exactly.
    let mut prefix = 0;
    let mut best: Option<(usize, usize)> = None; // (count, samples)
    for (n, &i) in take.iter().enumerate() {
        prefix += queue[i].samples();
        if policy.preferred.contains(&prefix) {
            best = Some((n + 1, prefix));
        }
    }
    let largest_preferred = policy.preferred.last().copied().unwrap_or(0);
    if let Some((count, size)) = best {
        // Wait for a larger preferred size only while one is still reachable in time.
        let larger_possible = size < largest_preferred;
        let due = now >= head.arrival() + policy.max_queue_delay;
        if !larger_possible || due || policy.max_queue_delay.is_zero() {
            take.truncate(count);
            return Some(Plan { take, samples: size, ready: true, ready_at: None });
        }
    }
    let ready_at = head.arrival() + policy.max_queue_delay;
    let ready = now >= ready_at;
    Some(Plan { take, samples, ready, ready_at: (!ready).then_some(ready_at) })
}

/// Sending side of a model's batcher. Dropping it lets the actor drain and stop.
pub struct Batcher {
    model: String,
    tx: mpsc::Sender<Queued>,
    queued: Arc<AtomicUsize>,
    max_queue_size: usize,
}

impl Batcher {
    /// Start the actor for `pool`. `max_queue_size` bounds the requests waiting in total.
    pub fn spawn(model: String, policy: BatchPolicy, max_queue_size: usize, pool: InstancePool) -> Batcher {
        let queued = Arc::new(AtomicUsize::new(0));
        // The channel never holds more than the queue may: admission counts first.
        let (tx, rx) = mpsc::channel(max_queue_size.max(1));
        let actor = Actor { model: model.clone(), policy, rx, queue: VecDeque::new(), queued: queued.clone(), pool, idle: 0 };
        tokio::spawn(actor.run());
        Batcher { model, tx, queued, max_queue_size }
    }

    /// Enqueue at once or refuse at once: a full queue answers UNAVAILABLE without waiting.
    pub fn submit(&self, request: Queued) -> Result<(), Error> {
        let depth = self.queued.fetch_add(1, Ordering::AcqRel);
        if depth >= self.max_queue_size {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            metrics::rejected(&self.model, metrics::RejectReason::QueueFull);
            return Err(Error::Overloaded {
                model: self.model.clone(),
                reason: format!("queue full ({} requests waiting)", self.max_queue_size),
                retry_after: Duration::from_millis(10),
            });
        }
        metrics::queue_depth(&self.model, depth + 1);
        self.tx.try_send(request).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Closed(_) => Error::ModelUnavailable {
                    model: self.model.clone(),
                    reason: "the model is unloading".into(),
                },
                // Unreachable while the counter bounds the channel; refuse rather than wait.
                mpsc::error::TrySendError::Full(_) => Error::Overloaded {
                    model: self.model.clone(),
                    reason: "queue full".into(),
                    retry_after: Duration::from_millis(10),
                },
            }
        })
    }

    /// Requests waiting now (queued, not yet dispatched).
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

struct Actor {
    model: String,
    policy: BatchPolicy,
    rx: mpsc::Receiver<Queued>,
    queue: VecDeque<Queued>,
    queued: Arc<AtomicUsize>,
    pool: InstancePool,
    /// Free-instance tokens held.
    idle: usize,
}

impl Actor {
    async fn run(mut self) {
        let mut open = true;
        loop {
            let now = Instant::now();
            self.drop_dead(now);
            let plan = plan(&self.policy, self.queue.make_contiguous(), now);
            if let Some(p) = plan.as_ref().filter(|p| p.ready && self.idle > 0) {
                let take = p.take.clone();
                self.dispatch(&take, now);
                continue;
            }
            if !open && self.queue.is_empty() {
                break;
            }
            let want_instance = plan.as_ref().is_some_and(|p| p.ready) && self.idle == 0;
            let wake = [plan.as_ref().and_then(|p| p.ready_at), self.queue.iter().filter_map(|q| q.expires).min()]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                received = self.rx.recv(), if open => match received {
                    Some(q) => self.queue.push_back(q),
                    None => open = false,
                },
                token = self.pool.free.recv(), if want_instance => match token {
                    Some(()) => self.idle += 1,
                    None => {
                        self.fail_all("no model instance is running");
                        if !open { break; }
                    }
                },
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
        // Instances finish what they hold; joining them blocks, so not on the runtime.
        let pool = self.pool;
        tokio::task::spawn_blocking(move || drop(pool));
    }

    /// Answer and remove requests that expired or whose client left.
    fn drop_dead(&mut self, now: Instant) {
        let dead = |q: &Queued| q.expires.is_some_and(|e| e <= now) || q.reply.is_closed();
        if !self.queue.iter().any(dead) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut removed = 0;
        for q in self.queue.drain(..) {
            if q.expires.is_some_and(|e| e <= now) {
                metrics::dropped(&self.model, DropReason::Expired);
                let _ = q.reply.send(Err(Error::DeadlineExceeded { model: self.model.clone(), stage: "waiting in the queue" }));
                removed += 1;
            } else if q.reply.is_closed() {
                metrics::dropped(&self.model, DropReason::Cancelled);
                removed += 1;
            } else {
                kept.push_back(q);
            }
        }
        self.queue = kept;
        self.release(removed);
    }

    fn release(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Ordering::AcqRel) - n;
        metrics::queue_depth(&self.model, left);
    }

    fn dispatch(&mut self, take: &[usize], now: Instant) {
        let mut batch = Vec::with_capacity(take.len());
        for &i in take.iter().rev() {
            batch.push(self.queue.remove(i).expect("planned indices are in the queue"));
        }
        batch.reverse();
        self.release(batch.len());
        self.idle -= 1;
        let queue_times: Vec<Duration> = batch.iter().map(|q| now - q.arrival).collect();
        for t in &queue_times {
            metrics::queue_wait(&self.model, *t);
        }
        if let Err(batch) = self.pool.run(batch, queue_times) {
            for q in batch {
                let _ = q.reply.send(Err(Error::ModelUnavailable {
                    model: self.model.clone(),
                    reason: "no model instance is running".into(),
                }));
            }
        }
    }

    fn fail_all(&mut self, reason: &str) {
        let n = self.queue.len();
        for q in self.queue.drain(..) {
            let _ = q.reply.send(Err(Error::ModelUnavailable { model: self.model.clone(), reason: reason.into() }));
        }
        self.rx.close();
        if n > 0 {
            self.release(n);
        }
    }
}
