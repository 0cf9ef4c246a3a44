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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::Error;
use crate::metrics::{self, DropReason, RejectReason};
use crate::pool::{Event, InstancePool, Job, Reply, Task};
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

/// A request's share of one execution.
#[derive(Debug)]
pub struct Done {
    pub outputs: Vec<Tensor>,
    pub queue: Duration,
    /// Longest wait of any request in the same execution (its oldest request's).
    pub batch_wait: Duration,
    pub compute: Duration,
    /// Samples in the execution this request was part of.
    pub batch_size: usize,
}

/// The view of a queued request that the policy needs.
pub trait Pending {
    fn samples(&self) -> usize;
    fn key(&self) -> &BatchKey;
    fn arrival(&self) -> Instant;
    /// Priority level, 1 the highest.
    fn priority(&self) -> u32 {
        1
    }
}

impl Pending for Queued {
    fn samples(&self) -> usize {
        self.samples
    }
    fn priority(&self) -> u32 {
        self.priority
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
        return Some(Plan {
            take: vec![0],
            samples: head.samples(),
            ready: true,
            ready_at: None,
        });
    }
    // Greedily collect, oldest first, the requests that fit beside the head. A batch
    // carries one priority level (the queue is in priority order, so the head's): a
    // lower level's samples would lengthen a higher level's execution, so lower levels
    // run in batches of their own, formed when no higher level waits.
    let mut take = Vec::new();
    let mut samples = 0;
    for (i, p) in queue.iter().enumerate() {
        if p.key() != head.key()
            || p.priority() != head.priority()
            || samples + p.samples() > policy.max_batch_size
        {
            continue;
        }
        take.push(i);
        samples += p.samples();
        if samples == policy.max_batch_size {
            return Some(Plan {
                take,
                samples,
                ready: true,
                ready_at: None,
            });
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
    if let Some((count, size)) = best {
        take.truncate(count);
        return Some(Plan {
            take,
            samples: size,
            ready: true,
            ready_at: None,
        });
    }
    let ready_at = head.arrival() + policy.max_queue_delay;
    let ready = now >= ready_at;
    Some(Plan {
        take,
        samples,
        ready,
        ready_at: (!ready).then_some(ready_at),
    })
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

/// What waits in the queue: requests in total, samples per priority level.
struct QueueCounts {
    requests: AtomicUsize,
    /// Index: priority level (0 unused).
    samples: Box<[AtomicUsize]>,
}

impl QueueCounts {
    fn new(levels: u32) -> QueueCounts {
        QueueCounts {
            requests: AtomicUsize::new(0),
            samples: (0..=levels.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Samples that would be dispatched before a new request of `level`.
    fn ahead_of(&self, level: u32) -> usize {
        self.samples
            .iter()
            .take(level as usize + 1)
            .map(|n| n.load(Ordering::Acquire))
            .sum()
    }

    fn add(&self, q: &Queued) {
        self.samples[q.priority as usize].fetch_add(q.samples, Ordering::AcqRel);
    }

    fn remove(&self, q: &Queued) {
        self.samples[q.priority as usize].fetch_sub(q.samples, Ordering::AcqRel);
    }
}

/// Measured execution time per batch size (a running average per size), written by the
/// instances, read by admission and dispatch.
#[derive(Debug)]
pub struct ComputeEstimate {
    /// Index: batch size; nanoseconds, 0 = never measured.
    by_size: Box<[AtomicU64]>,
}

/// Weight of a new measurement in a size's running average.
const ESTIMATE_SMOOTHING: f64 = 0.2;

impl ComputeEstimate {
    pub fn new(max_batch_size: usize) -> ComputeEstimate {
        ComputeEstimate {
            by_size: (0..=max_batch_size).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn record(&self, samples: usize, took: Duration) {
        let Some(slot) = self.by_size.get(samples) else {
            return;
        };
        let took = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            (old as f64 * (1.0 - ESTIMATE_SMOOTHING) + took as f64 * ESTIMATE_SMOOTHING) as u64
        };
        slot.store(new.max(1), Ordering::Relaxed);
    }

    /// Time one execution of `samples` takes: measured at that size, else interpolated
    /// linearly between the nearest measured sizes below and above, else scaled in
    /// proportion from the one nearest measured size. `None` before any execution.
    pub fn estimate(&self, samples: usize) -> Option<Duration> {
        let top = self.by_size.len().saturating_sub(1).max(1);
        let samples = samples.clamp(1, top);
        let at = |n: usize| {
            self.by_size
                .get(n)
                .map(|a| a.load(Ordering::Relaxed))
                .filter(|&ns| ns > 0)
                .map(|ns| (n as f64, ns as f64))
        };
        let above = (samples..=top).find_map(at);
        let below = (1..samples).rev().find_map(at);
        let x = samples as f64;
        let ns = match (below, above) {
            (_, Some((n, t))) if n == x => t,
            (Some((n0, t0)), Some((n1, t1))) => t0 + (t1 - t0) * (x - n0) / (n1 - n0),
            (Some((n, t)), None) | (None, Some((n, t))) => t * x / n,
            (None, None) => return None,
        };
        Some(Duration::from_nanos(ns.max(1.0) as u64))
    }
}

/// How long a request would wait and run: `ahead` samples queued before it (its own
/// included) go out in rounds of one batch per instance.
pub fn predicted_wait(
    policy: &BatchPolicy,
    estimate: &ComputeEstimate,
    ahead_samples: usize,
    ahead_requests: usize,
    own_samples: usize,
    instances: usize,
) -> Option<Duration> {
    let instances = instances.max(1);
    if !policy.combine {
        // One request per execution.
        let rounds = ahead_requests.div_ceil(instances).max(1);
        return estimate.estimate(own_samples).map(|t| t * rounds as u32);
    }
    let total = ahead_samples.max(own_samples);
    let per_round = instances * policy.max_batch_size.max(1);
    let rounds = total.div_ceil(per_round).max(1);
    let batch = total.div_ceil(instances).min(policy.max_batch_size.max(1));
    estimate.estimate(batch).map(|t| t * rounds as u32)
}

/// How many instances a model keeps, and how long one execution may run before its
/// instance is given up on (from its config `parameters` and server defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaling {
    /// Instances kept loaded however idle (0: the model scales to zero).
    pub min_instances: usize,
    /// `instance_group.count`: the most instances the pool grows to under queue pressure.
    pub max_instances: usize,
    /// An instance idle this long is unloaded, down to `min_instances`.
    pub idle_timeout: Duration,
    /// An instance whose execution has run this long is stuck (`None`: never).
    pub max_execution: Option<Duration>,
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
            queue: VecDeque::new(),
            counts: counts.clone(),
            estimate: estimate.clone(),
            pool,
            cold_since: None,
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
        if self.limits.predict_wait {
            if let Some(deadline) = request.deadline {
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
                if let Some(wait) = wait.filter(|w| now + *w > deadline) {
                    metrics::rejected(&self.model, RejectReason::PredictedWait, Some(level));
                    return Err(Error::Overloaded {
                        model: self.model.clone(),
                        reason: format!(
                            "predicted wait {:.1} ms exceeds the remaining deadline {:.1} ms",
                            wait.as_secs_f64() * 1e3,
                            deadline.saturating_duration_since(now).as_secs_f64() * 1e3
                        ),
                        retry_after: wait,
                    });
                }
            }
        }
        let depth = self.counts.requests.fetch_add(1, Ordering::AcqRel);
        if depth >= self.limits.max_queue_size {
            self.counts.requests.fetch_sub(1, Ordering::AcqRel);
            metrics::rejected(&self.model, RejectReason::QueueFull, Some(level));
            return Err(Error::Overloaded {
                model: self.model.clone(),
                reason: format!(
                    "queue full ({} requests waiting)",
                    self.limits.max_queue_size
                ),
                retry_after: Duration::from_millis(10),
            });
        }
        self.counts.add(&request);
        metrics::queue_depth(&self.model, depth + 1);
        self.tx.try_send(request).map_err(|e| {
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

struct Actor {
    instances: Arc<(AtomicUsize, AtomicUsize)>,
    wedged: Arc<AtomicBool>,
    model: String,
    policy: BatchPolicy,
    scaling: Scaling,
    rx: mpsc::Receiver<Queued>,
    queue: VecDeque<Queued>,
    counts: Arc<QueueCounts>,
    estimate: Arc<ComputeEstimate>,
    pool: InstancePool,
    /// Set while the model has no instance and one is loading for waiting requests.
    cold_since: Option<Instant>,
}

impl Actor {
    async fn run(mut self) {
        let mut open = true;
        loop {
            let now = Instant::now();
            self.watch(now);
            self.drop_dead(now);
            // Once the channel has closed nothing more can join: flush what is there.
            let ready = |p: &Plan| p.ready || !open;
            let plan = loop {
                let plan = plan(&self.policy, self.queue.make_contiguous(), now);
                match (plan.as_ref().filter(|p| ready(p)), self.pool.idle()) {
                    (Some(p), Some(id)) => {
                        let take = self.fit_deadlines(&p.take, now);
                        self.dispatch(id, &take, now);
                    }
                    _ => break plan,
                }
            };
            if plan.is_some() && self.pool.idle().is_none() {
                self.grow(now);
            }
            if let Some(cutoff) = now.checked_sub(self.scaling.idle_timeout) {
                self.pool.retire_idle(cutoff, self.scaling.min_instances);
            }
            // With a watchdog, stay until no execution runs: once the actor is gone nobody
            // would answer for an execution that hangs while its model unloads.
            let watching = self.scaling.max_execution.is_some() && self.pool.busy_count() > 0;
            if !open && self.queue.is_empty() && !watching {
                break;
            }
            let retire_at = (self.pool.live() > self.scaling.min_instances)
                .then(|| self.pool.next_idle_deadline(self.scaling.idle_timeout))
                .flatten();
            let wake = [
                plan.as_ref().and_then(|p| p.ready_at),
                self.queue
                    .iter()
                    .flat_map(|q| [q.expires, q.deadline])
                    .flatten()
                    .min(),
                retire_at,
                self.scaling
                    .max_execution
                    .and_then(|limit| self.pool.next_stuck_check(limit, now)),
            ]
            .into_iter()
            .flatten()
            .min();
            self.instances.0.store(self.pool.live(), Ordering::Release);
            self.instances
                .1
                .store(self.pool.idle_count(), Ordering::Release);
            self.wedged.store(self.is_wedged(), Ordering::Release);
            tokio::select! {
                // New requests first: a batch grows with everything already sent.
                biased;
                received = self.rx.recv(), if open => match received {
                    Some(q) => self.enqueue(q),
                    None => open = false,
                },
                Some(event) = self.pool.events.recv() => self.on_event(event),
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
        // Dropping the pool lets the instances finish and stop, joined off the runtime.
    }

    /// Work is waiting and no instance is free: start one more, one load at a time.
    fn grow(&mut self, now: Instant) {
        if self.is_wedged() {
            // Nothing will run this work: answer it now rather than at its deadline.
            let reason = self.wedged_reason();
            self.fail_queued(&reason);
            return;
        }
        if self.pool.loading() > 0 || !self.pool.has_room(self.scaling.max_instances) {
            return;
        }
        let cold = self.pool.live() == 0;
        match self.pool.spawn() {
            Ok(_) if cold => {
                self.cold_since = Some(now);
                metrics::cold_start(&self.model);
                tracing::info!(model = %self.model, waiting = self.queue.len(), "cold start: loading an instance");
            }
            Ok(_) => {
                tracing::debug!(model = %self.model, live = self.pool.live(), "queue pressure: loading another instance")
            }
            Err(reason) => self.fail_queued(&reason),
        }
    }

    /// Take instances whose execution has run past `max_execution` out of service and
    /// load replacements up to the instances the model keeps (at least one), as far as
    /// the pool has room: stuck threads count toward its cap, so a model that hangs
    /// every time stops getting new instances.
    fn watch(&mut self, now: Instant) {
        let Some(limit) = self.scaling.max_execution else {
            return;
        };
        if self.pool.detect_stuck(now, limit) == 0 {
            return;
        }
        let keep = self.scaling.min_instances.max(1);
        while self.pool.live() < keep && self.pool.has_room(self.scaling.max_instances) {
            match self.pool.spawn() {
                Ok(id) => {
                    tracing::warn!(model = %self.model, instance = id, stuck = self.pool.stuck(), "loading an instance to replace a stuck one")
                }
                Err(reason) => {
                    tracing::error!(model = %self.model, %reason, "cannot start an instance to replace a stuck one");
                    break;
                }
            }
        }
        if self.is_wedged() {
            tracing::error!(model = %self.model, stuck = self.pool.stuck(),
                "every instance is stuck and no replacement can start: the server reports itself not live");
            let reason = self.wedged_reason();
            self.fail_queued(&reason);
        }
    }

    /// No instance in service or loading, stuck ones only, and no room for another.
    fn is_wedged(&self) -> bool {
        self.pool.stuck() > 0
            && self.pool.live() == 0
            && !self.pool.has_room(self.scaling.max_instances)
    }

    fn wedged_reason(&self) -> String {
        format!(
            "every instance is stuck ({} running past max_execution_secs) and no replacement can start",
            self.pool.stuck()
        )
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        self.pool.on_event(&event, now);
        match event {
            Event::Ready { load, warmup, .. } => {
                if let Some(since) = self.cold_since.take() {
                    for q in &self.queue {
                        metrics::cold_start_wait(&self.model, now - q.arrival.max(since));
                    }
                    tracing::info!(model = %self.model, load_ms = load.as_millis() as u64,
                        warmup_ms = warmup.as_millis() as u64, "cold start done");
                }
            }
            Event::LoadFailed { reason, .. } => {
                if self.pool.live() == 0 {
                    self.cold_since = None;
                    self.fail_queued(&format!("cannot load an instance: {reason}"));
                }
            }
            Event::Stopped { .. } => {
                if self.pool.live() == 0 {
                    self.fail_queued("the last instance stopped");
                }
            }
            Event::Done { .. } => {}
        }
    }

    /// Queue in priority order: after every request of the same or a higher level
    /// (lower number), so within a level the oldest goes first.
    fn enqueue(&mut self, q: Queued) {
        let (level, preempt) = (q.priority, q.preempt);
        let at = self
            .queue
            .iter()
            .rposition(|other| other.priority <= q.priority)
            .map_or(0, |i| i + 1);
        self.queue.insert(at, q);
        if preempt {
            self.shed_below(level);
        }
    }

    /// Make room for a request of `level`: answer the newest queued request of the
    /// lowest level below it UNAVAILABLE (the queue's tail, as it is kept in priority
    /// order). Nothing is shed when every lower-level request is already running.
    fn shed_below(&mut self, level: u32) {
        if self.queue.back().is_none_or(|q| q.priority <= level) {
            return;
        }
        let shed = self.queue.pop_back().expect("checked above");
        self.release(std::slice::from_ref(&shed));
        metrics::rejected(&self.model, RejectReason::Preempted, Some(shed.priority));
        let _ = shed.reply.send(Err(Error::Overloaded {
            model: self.model.clone(),
            reason: format!(
                "shed for a priority level {level} request (this one is level {})",
                shed.priority
            ),
            retry_after: crate::admission::LIMIT_PUSHBACK,
        }));
    }

    /// The longest prefix of the planned batch whose execution, as measured so far,
    /// ends before the earliest deadline in it (at least its first request, which fits
    /// alone: `drop_dead` has removed those that do not). A batch too large for its
    /// deadlines would fail every request in it; the rest waits for the next instance.
    fn fit_deadlines(&self, take: &[usize], now: Instant) -> Vec<usize> {
        let mut samples = 0;
        let mut earliest: Option<Instant> = None;
        let mut fits = 0;
        for (n, &i) in take.iter().enumerate() {
            let q = &self.queue[i];
            samples += q.samples;
            earliest = match (earliest, q.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let late = match (earliest, self.estimate.estimate(samples)) {
                (Some(deadline), Some(run)) => now + run > deadline,
                _ => false,
            };
            if late && n > 0 {
                break;
            }
            fits = n + 1;
        }
        take[..fits].to_vec()
    }

    /// Answer and remove requests that expired, that cannot finish before their
    /// deadline even if dispatched alone now, or whose client left.
    fn drop_dead(&mut self, now: Instant) {
        let estimate = &self.estimate;
        let expired = |q: &Queued| {
            q.expires.is_some_and(|e| e <= now)
                || q.deadline
                    .is_some_and(|d| d <= now + estimate.estimate(q.samples).unwrap_or_default())
        };
        let dead = |q: &Queued| {
            if expired(q) {
                Some(DropReason::Expired)
            } else if q.reply.is_closed() {
                Some(DropReason::Cancelled)
            } else {
                None
            }
        };
        if !self.queue.iter().any(|q| dead(q).is_some()) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut gone = Vec::new();
        for q in self.queue.drain(..) {
            match dead(&q) {
                Some(reason) => gone.push((q, reason)),
                None => kept.push_back(q),
            }
        }
        self.queue = kept;
        let (gone, reasons): (Vec<Queued>, Vec<DropReason>) = gone.into_iter().unzip();
        self.release(&gone);
        for (q, reason) in gone.into_iter().zip(reasons) {
            metrics::dropped(&self.model, reason);
            if reason == DropReason::Expired {
                let _ = q.reply.send(Err(Error::DeadlineExceeded {
                    model: self.model.clone(),
                    stage: "waiting in the queue",
                }));
            }
        }
    }

    /// Account for requests leaving the queue.
    fn release(&self, left: &[Queued]) {
        for q in left {
            self.counts.remove(q);
        }
        let n = left.len();
        let remaining = self.counts.requests.fetch_sub(n, Ordering::AcqRel) - n;
        metrics::queue_depth(&self.model, remaining);
    }

    fn dispatch(&mut self, instance: usize, take: &[usize], now: Instant) {
        let mut batch = Vec::with_capacity(take.len());
        for &i in take.iter().rev() {
            batch.push(
                self.queue
                    .remove(i)
                    .expect("planned indices are in the queue"),
            );
        }
        batch.reverse();
        self.release(&batch);
        let tasks: Vec<Task> = batch
            .into_iter()
            .map(|q| {
                let queue_time = now - q.arrival;
                metrics::queue_wait(&self.model, queue_time);
                Task {
                    inputs: q.inputs,
                    samples: q.samples,
                    queue_time,
                    reply: Reply::new(q.reply),
                }
            })
            .collect();
        if let Err(job) = self.pool.run(instance, Job { tasks }, now) {
            for t in job.tasks {
                t.reply.send(Err(Error::Restarting {
                    model: self.model.clone(),
                    reason: "the model instance stopped".into(),
                }));
            }
        }
    }

    /// Answer every queued request UNAVAILABLE with `reason`.
    fn fail_queued(&mut self, reason: &str) {
        let failed: Vec<Queued> = self.queue.drain(..).collect();
        self.release(&failed);
        for q in failed {
            let _ = q.reply.send(Err(Error::ModelUnavailable {
                model: self.model.clone(),
                reason: reason.into(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::backend::{Backend, BackendError};
    use crate::pool::Loader;
    use crate::repository::{parse_text, spec_from_config};

    // ---- the pure plan -------------------------------------------------------------

    struct P {
        samples: usize,
        key: BatchKey,
        arrival: Instant,
    }

    impl Pending for P {
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

    fn key(dims: &[i64]) -> BatchKey {
        Arc::from(vec![(DataType::Fp32, dims.to_vec())])
    }

    fn policy(max: usize, preferred: &[usize], delay_ms: u64) -> BatchPolicy {
        BatchPolicy {
            combine: true,
            max_batch_size: max,
            preferred: preferred.to_vec(),
            max_queue_delay: Duration::from_millis(delay_ms),
        }
    }

    fn queue(t0: Instant, items: &[(usize, &[i64], u64)]) -> Vec<P> {
        items
            .iter()
            .map(|&(samples, dims, at_ms)| P {
                samples,
                key: key(dims),
                arrival: t0 + Duration::from_millis(at_ms),
            })
            .collect()
    }

    #[test]
    fn no_flush_before_the_delay_then_flush_at_it() {
        let t0 = Instant::now();
        let q = queue(t0, &[(1, &[4], 0), (2, &[4], 1)]);
        let p = plan(&policy(8, &[], 5), &q, t0 + Duration::from_millis(4)).unwrap();
        assert!(!p.ready);
        assert_eq!(p.ready_at, Some(t0 + Duration::from_millis(5)));
        let p = plan(&policy(8, &[], 5), &q, t0 + Duration::from_millis(5)).unwrap();
        assert!(p.ready);
        assert_eq!((p.take, p.samples), (vec![0, 1], 3));
    }

    #[test]
    fn flush_at_max_batch_size_without_waiting() {
        let t0 = Instant::now();
        let q = queue(
            t0,
            &[(3, &[4], 0), (3, &[4], 0), (2, &[4], 0), (1, &[4], 0)],
        );
        let p = plan(&policy(8, &[], 1000), &q, t0).unwrap();
        assert!(p.ready);
        assert_eq!((p.take, p.samples), (vec![0, 1, 2], 8));
    }

    #[test]
    fn a_request_that_would_overflow_waits_for_the_next_batch() {
        let t0 = Instant::now();
        let q = queue(t0, &[(5, &[4], 0), (4, &[4], 0), (3, &[4], 0)]);
        let p = plan(&policy(8, &[], 0), &q, t0).unwrap();
        assert_eq!((p.take, p.samples), (vec![0, 2], 8));
    }

    #[test]
    fn preferred_size_goes_out_at_once() {
        let t0 = Instant::now();
        let q = queue(t0, &[(2, &[4], 0), (2, &[4], 0), (1, &[4], 0)]);
        // 4 is preferred and reachable (2+2); 8, the larger one, is not reachable yet.
        let p = plan(&policy(16, &[4, 8], 100), &q, t0).unwrap();
        assert!(p.ready, "{p:?}");
        assert_eq!((p.take.clone(), p.samples), (vec![0, 1], 4));
        // Only 8 is preferred: 5 samples wait for the delay.
        let p = plan(&policy(16, &[8], 100), &q, t0).unwrap();
        assert!(!p.ready);
        assert_eq!(p.ready_at, Some(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn mixed_shapes_are_kept_apart() {
        let t0 = Instant::now();
        let q = queue(
            t0,
            &[(1, &[4], 0), (1, &[5], 0), (1, &[4], 0), (1, &[5], 0)],
        );
        let p = plan(&policy(8, &[], 0), &q, t0).unwrap();
        assert_eq!(p.take, vec![0, 2]);
        let rest = queue(t0, &[(1, &[5], 0), (1, &[5], 0)]);
        assert_eq!(
            plan(&policy(8, &[], 0), &rest, t0).unwrap().take,
            vec![0, 1]
        );
    }

    #[test]
    fn without_dynamic_batching_each_request_goes_alone() {
        let t0 = Instant::now();
        let q = queue(t0, &[(3, &[4], 0), (1, &[4], 0)]);
        let unbatched = BatchPolicy {
            combine: false,
            ..policy(8, &[], 100)
        };
        let p = plan(&unbatched, &q, t0).unwrap();
        assert_eq!((p.take, p.samples, p.ready), (vec![0], 3, true));
        assert!(plan::<P>(&unbatched, &[], t0).is_none());
    }

    // ---- the actor, with paused time and a backend the test controls -------------------

    /// Records the batch size of every forward; each forward waits for one permit.
    struct Gated {
        permits: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
        seen: Arc<Mutex<Vec<i64>>>,
    }

    impl Backend for Gated {
        fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            self.seen.lock().unwrap().push(inputs[0].batch());
            self.permits
                .lock()
                .unwrap()
                .recv()
                .map_err(|_| BackendError::Forward("gate closed".into()))?;
            Ok(inputs.to_vec())
        }
    }

    struct Harness {
        batcher: Batcher,
        permits: std::sync::mpsc::Sender<()>,
        seen: Arc<Mutex<Vec<i64>>>,
        /// Backends loaded so far, and alive now.
        loads: Arc<AtomicUsize>,
        alive: Arc<AtomicUsize>,
    }

    struct Counted(Gated, Arc<AtomicUsize>);

    impl Backend for Counted {
        fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            self.0.forward(inputs)
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn spec_for(dynamic: &str) -> Arc<crate::repository::ModelSpec> {
        let text = format!(
            r#"backend: "sluice_synthetic" max_batch_size: 8
               input [ {{ name: "x" data_type: TYPE_FP32 dims: [-1] }} ]
               output [ {{ name: "y" data_type: TYPE_FP32 dims: [-1] }} ] {dynamic}"#
        );
        Arc::new(spec_from_config(parse_text(&text).unwrap(), "m").unwrap())
    }

    /// A batcher over gated instances. `load` decides each load's outcome (it may block).
    async fn harness_with(
        dynamic: &str,
        max_queue_size: usize,
        scaling: Scaling,
        load: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Harness {
        let spec = spec_for(dynamic);
        let (permits, rx) = std::sync::mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let loads = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicUsize::new(0));
        let (r, s, l, a) = (rx.clone(), seen.clone(), loads.clone(), alive.clone());
        let loader: Loader = Arc::new(move || {
            load().map_err(|message| BackendError::Load {
                path: "m".into(),
                message,
            })?;
            l.fetch_add(1, Ordering::SeqCst);
            a.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Counted(
                Gated {
                    permits: r.clone(),
                    seen: s.clone(),
                },
                a.clone(),
            )) as Box<dyn Backend>)
        });
        let mut pool = InstancePool::with_loader(
            spec.clone(),
            loader,
            Arc::from(Vec::new()),
            Default::default(),
        );
        let initial = scaling.min_instances.max(1); // as LoadedModel::load does
        let pool = tokio::task::spawn_blocking(move || {
            pool.start(initial).expect("initial instances load");
            pool
        })
        .await
        .unwrap();
        let batcher = Batcher::spawn(
            "m".into(),
            spec.batching.clone(),
            scaling,
            QueueLimits {
                max_queue_size,
                priority_levels: 2,
                predict_wait: true,
            },
            pool,
        );
        Harness {
            batcher,
            permits,
            seen,
            loads,
            alive,
        }
    }

    const ONE: Scaling = Scaling {
        min_instances: 1,
        max_instances: 1,
        idle_timeout: Duration::from_secs(3600),
        // Off: with paused time a parked runtime jumps the clock to the next timer while
        // a gated instance thread is still running; the watchdog has tests of its own.
        max_execution: None,
    };

    async fn harness(dynamic: &str, max_queue_size: usize) -> Harness {
        harness_with(dynamic, max_queue_size, ONE, || Ok(())).await
    }

    fn request(
        samples: usize,
        width: i64,
        expires: Option<Instant>,
    ) -> (Queued, oneshot::Receiver<Result<Done, Error>>) {
        let data = vec![0u8; samples * width as usize * 4];
        let (reply, rx) = oneshot::channel();
        let q = Queued {
            inputs: vec![Tensor::new(
                DataType::Fp32,
                vec![samples as i64, width],
                data.into(),
            )],
            samples,
            key: key(&[width]),
            arrival: Instant::now(),
            expires,
            deadline: None,
            priority: 1,
            preempt: false,
            reply,
        };
        (q, rx)
    }

    /// Let every task run until all are idle (paused time: no timer fires early).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    /// Wait (in real time, bounded) until the instance has started `n` forwards.
    async fn forwards(h: &Harness, n: usize) -> Vec<i64> {
        for _ in 0..2000 {
            let seen = h.seen.lock().unwrap().clone();
            if seen.len() >= n {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(1));
            tokio::task::yield_now().await;
        }
        panic!(
            "only {:?} forwards started, expected {n}",
            h.seen.lock().unwrap()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_at_the_delay_not_before() {
        let h = harness(
            "dynamic_batching { max_queue_delay_microseconds: 5000 }",
            16,
        )
        .await;
        let (a, ra) = request(1, 2, None);
        let (b, rb) = request(2, 2, None);
        h.batcher.submit(a).unwrap();
        h.batcher.submit(b).unwrap();
        settle().await;
        tokio::time::sleep(Duration::from_millis(4)).await;
        settle().await;
        assert!(
            h.seen.lock().unwrap().is_empty(),
            "flushed before the delay"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(forwards(&h, 1).await, vec![3]);
        h.permits.send(()).unwrap();
        let (da, db) = (ra.await.unwrap().unwrap(), rb.await.unwrap().unwrap());
        assert_eq!(
            (da.outputs[0].shape.clone(), db.outputs[0].shape.clone()),
            (vec![1, 2], vec![2, 2])
        );
        assert_eq!((da.batch_size, db.batch_size), (3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn with_zero_delay_the_batch_grows_while_the_instance_is_busy() {
        let h = harness("dynamic_batching { }", 16).await;
        let (first, r1) = request(1, 2, None);
        h.batcher.submit(first).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![1]);
        let mut rest = Vec::new();
        for _ in 0..4 {
            let (q, r) = request(1, 2, None);
            h.batcher.submit(q).unwrap();
            rest.push(r);
        }
        settle().await;
        h.permits.send(()).unwrap(); // the instance frees up: all four go out together
        r1.await.unwrap().unwrap();
        assert_eq!(forwards(&h, 2).await, vec![1, 4]);
        h.permits.send(()).unwrap();
        for r in rest {
            assert_eq!(r.await.unwrap().unwrap().batch_size, 4);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_channel_flushes_a_partial_batch() {
        let h = harness(
            "dynamic_batching { max_queue_delay_microseconds: 10000000 }",
            16,
        )
        .await;
        let (a, ra) = request(1, 2, None);
        h.batcher.submit(a).unwrap();
        settle().await;
        let Harness {
            batcher,
            permits,
            seen,
            ..
        } = h;
        drop(batcher);
        permits.send(()).unwrap();
        let done = ra.await.unwrap().unwrap();
        assert_eq!(done.batch_size, 1);
        assert_eq!(*seen.lock().unwrap(), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_and_cancelled_requests_never_reach_the_model() {
        let h = harness("dynamic_batching { }", 16).await;
        let (busy, rbusy) = request(1, 2, None);
        h.batcher.submit(busy).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![1]);
        // While the instance is busy: one expires, one is cancelled, one stays.
        let (expiring, rexp) = request(2, 2, Some(Instant::now() + Duration::from_millis(10)));
        let (cancelled, rcan) = request(3, 2, None);
        let (kept, rkept) = request(1, 2, None);
        for q in [expiring, cancelled, kept] {
            h.batcher.submit(q).unwrap();
        }
        drop(rcan);
        let expired = rexp.await.unwrap().unwrap_err(); // answered at its deadline
        assert!(
            matches!(expired, Error::DeadlineExceeded { .. }),
            "{expired}"
        );
        h.permits.send(()).unwrap();
        rbusy.await.unwrap().unwrap();
        h.permits.send(()).unwrap();
        assert_eq!(rkept.await.unwrap().unwrap().batch_size, 1);
        assert_eq!(
            *h.seen.lock().unwrap(),
            vec![1, 1],
            "only the live request ran"
        );
        assert_eq!(h.batcher.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let h = harness("dynamic_batching { }", 2).await;
        let (busy, _r0) = request(1, 2, None);
        h.batcher.submit(busy).unwrap();
        forwards(&h, 1).await;
        let (a, _ra) = request(1, 2, None);
        let (b, _rb) = request(1, 2, None);
        h.batcher.submit(a).unwrap();
        h.batcher.submit(b).unwrap();
        // `submit` is synchronous: the refusal cannot wait for anything.
        for _ in 0..100 {
            let (c, _rc) = request(1, 2, None);
            let err = h.batcher.submit(c).unwrap_err();
            assert!(matches!(err, Error::Overloaded { .. }), "{err}");
        }
        assert_eq!(
            h.batcher.depth(),
            2,
            "the queue never holds more than max_queue_size"
        );
        for _ in 0..3 {
            h.permits.send(()).unwrap();
        }
    }

    /// Wait (real time, bounded) until `counter` reads `want`.
    async fn until(counter: &AtomicUsize, want: usize) {
        for _ in 0..2000 {
            if counter.load(Ordering::SeqCst) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
            tokio::task::yield_now().await;
        }
        panic!(
            "counter stayed at {} (wanted {want})",
            counter.load(Ordering::SeqCst)
        );
    }

    const TO_ZERO: Scaling = Scaling {
        min_instances: 0,
        max_instances: 1,
        idle_timeout: Duration::from_secs(60),
        max_execution: None,
    };

    #[tokio::test(start_paused = true)]
    async fn idle_instances_unload_down_to_zero() {
        // min_instances 0 still loads one instance at start (a broken model shows at once).
        let h = harness_with("dynamic_batching { }", 16, TO_ZERO, || Ok(())).await;
        assert_eq!(h.alive.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(59)).await;
        settle().await;
        assert_eq!(
            h.alive.load(Ordering::SeqCst),
            1,
            "unloaded before the idle timeout"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        until(&h.alive, 0).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_at_zero_instances_loads_once_and_all_are_served() {
        let h = harness_with("dynamic_batching { }", 64, TO_ZERO, || Ok(())).await;
        tokio::time::sleep(Duration::from_secs(61)).await;
        until(&h.alive, 0).await;
        let mut answers = Vec::new();
        for _ in 0..20 {
            let (q, r) = request(1, 2, None);
            h.batcher.submit(q).unwrap();
            answers.push(r);
        }
        for _ in 0..20 {
            h.permits.send(()).unwrap();
        }
        let mut served = 0;
        for r in answers {
            served += r.await.unwrap().unwrap().outputs.len();
        }
        assert_eq!(served, 20);
        assert_eq!(
            h.loads.load(Ordering::SeqCst),
            2,
            "one load at start, exactly one for the burst"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_cold_start_respects_the_deadline() {
        // Loads after the first block until the test opens the gate.
        let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
        let open_rx = Mutex::new(open_rx);
        let first = std::sync::atomic::AtomicBool::new(true);
        let h = harness_with("dynamic_batching { }", 16, TO_ZERO, move || {
            if !first.swap(false, Ordering::SeqCst) {
                let _ = open_rx.lock().unwrap().recv();
            }
            Ok(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(61)).await;
        until(&h.alive, 0).await;
        let deadline = Instant::now() + Duration::from_millis(100);
        let (q, r) = request(1, 2, Some(deadline));
        h.batcher.submit(q).unwrap();
        let err = r.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
        assert!(Instant::now() >= deadline && Instant::now() < deadline + Duration::from_millis(5));
        open_tx.send(()).unwrap();
        until(&h.loads, 2).await;
        // The instance that loaded late serves the next request.
        let (q, r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        h.permits.send(()).unwrap();
        r.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_cold_start_is_answered_to_every_waiter() {
        let first = std::sync::atomic::AtomicBool::new(true);
        let h = harness_with("dynamic_batching { }", 16, TO_ZERO, move || {
            if first.swap(false, Ordering::SeqCst) {
                Ok(())
            } else {
                Err("weights vanished".into())
            }
        })
        .await;
        tokio::time::sleep(Duration::from_secs(61)).await;
        until(&h.alive, 0).await;
        let mut answers = Vec::new();
        for _ in 0..5 {
            let (q, r) = request(1, 2, None);
            h.batcher.submit(q).unwrap();
            answers.push(r);
        }
        for r in answers {
            match r.await.unwrap() {
                Err(Error::ModelUnavailable { reason, .. }) => {
                    assert!(reason.contains("weights vanished"), "{reason}")
                }
                other => panic!("expected UNAVAILABLE, got {other:?}"),
            }
        }
        assert_eq!(h.batcher.depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_pressure_grows_the_pool_up_to_its_maximum() {
        let scaling = Scaling {
            min_instances: 1,
            max_instances: 3,
            idle_timeout: Duration::from_secs(60),
            max_execution: None,
        };
        let h = harness_with("dynamic_batching { }", 64, scaling, || Ok(())).await;
        let mut answers = Vec::new();
        // Each request arrives while every instance is busy: the pool grows by one.
        for n in 1..=3 {
            let (q, r) = request(1, 2, None);
            h.batcher.submit(q).unwrap();
            answers.push(r);
            until(&h.alive, n).await;
            forwards(&h, n).await;
        }
        // At the maximum, more pressure only queues.
        for _ in 0..5 {
            let (q, r) = request(1, 2, None);
            h.batcher.submit(q).unwrap();
            answers.push(r);
        }
        settle().await;
        for _ in 0..8 {
            h.permits.send(()).unwrap();
        }
        for r in answers {
            r.await.unwrap().unwrap();
        }
        assert_eq!(
            h.loads.load(Ordering::SeqCst),
            3,
            "never more than max_instances"
        );
        // Idle clocks start when each instance's last Done event lands (real threads, so
        // possibly after a paused-clock jump): give every instance a full idle period.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(61)).await;
            if h.batcher.instances.0.load(Ordering::Acquire) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        until(&h.alive, 1).await; // back down to the minimum
    }

    // ---- priorities, predicted wait and the dispatch-time deadline check --------------

    const MS: Duration = Duration::from_millis(1);

    fn at_priority(
        (q, rx): (Queued, oneshot::Receiver<Result<Done, Error>>),
        priority: u32,
    ) -> (Queued, oneshot::Receiver<Result<Done, Error>>) {
        (Queued { priority, ..q }, rx)
    }

    fn with_deadline(
        (q, rx): (Queued, oneshot::Receiver<Result<Done, Error>>),
        deadline: Instant,
    ) -> (Queued, oneshot::Receiver<Result<Done, Error>>) {
        (
            Queued {
                deadline: Some(deadline),
                ..q
            },
            rx,
        )
    }

    /// Wait (real time, bounded) for a request's answer without ever parking the runtime:
    /// a parked runtime with paused time would jump the clock to the next timer (a
    /// request's deadline) while an instance thread is still finishing.
    async fn answer(rx: &mut oneshot::Receiver<Result<Done, Error>>) -> Result<Done, Error> {
        for _ in 0..2000 {
            match rx.try_recv() {
                Ok(answer) => return answer,
                Err(oneshot::error::TryRecvError::Empty) => {
                    std::thread::sleep(MS);
                    tokio::task::yield_now().await;
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    panic!("the request was dropped without an answer")
                }
            }
        }
        panic!("no answer within 2 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_priority_is_dispatched_first_and_each_level_in_arrival_order() {
        // No dynamic batching: one request per execution, so the executions the backend
        // sees (by their sample counts) are the dispatch order.
        let h = harness("", 16).await;
        let (busy, rbusy) = request(1, 2, None);
        h.batcher.submit(busy).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![1]);
        let (low, rlow) = at_priority(request(2, 2, None), 2);
        let (high_a, rhigh_a) = at_priority(request(3, 2, None), 1);
        let (high_b, rhigh_b) = at_priority(request(4, 2, None), 1);
        for q in [low, high_a, high_b] {
            h.batcher.submit(q).unwrap();
        }
        settle().await;
        for _ in 0..4 {
            h.permits.send(()).unwrap();
        }
        for r in [rbusy, rlow, rhigh_a, rhigh_b] {
            r.await.unwrap().unwrap();
        }
        assert_eq!(
            *h.seen.lock().unwrap(),
            vec![1, 3, 4, 2],
            "level 1 before level 2, each level oldest first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_preempting_request_sheds_the_newest_lower_level_request_at_once() {
        let h = harness("", 16).await;
        let (busy, rbusy) = request(1, 2, None);
        h.batcher.submit(busy).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![1]);
        let preempting = |(q, rx): (Queued, oneshot::Receiver<Result<Done, Error>>)| {
            (Queued { preempt: true, ..q }, rx)
        };
        // Nothing of a lower level is queued: nothing is shed.
        let (first, rfirst) = preempting(at_priority(request(5, 2, None), 1));
        h.batcher.submit(first).unwrap();
        settle().await;
        assert_eq!(h.batcher.depth(), 1);
        let (low_old, rlow_old) = at_priority(request(2, 2, None), 2);
        let (low_new, mut rlow_new) = at_priority(request(3, 2, None), 2);
        let (high, rhigh) = preempting(at_priority(request(4, 2, None), 1));
        for q in [low_old, low_new, high] {
            h.batcher.submit(q).unwrap();
        }
        settle().await;
        // Answered before any instance frees up.
        match rlow_new.try_recv() {
            Ok(Err(Error::Overloaded { reason, .. })) => {
                assert!(reason.contains("priority level 1"), "{reason}")
            }
            other => panic!("the newest level-2 request should be shed, got {other:?}"),
        }
        assert_eq!(h.batcher.depth(), 3);
        for _ in 0..4 {
            h.permits.send(()).unwrap();
        }
        for r in [rbusy, rfirst, rhigh, rlow_old] {
            r.await.unwrap().unwrap();
        }
        assert_eq!(*h.seen.lock().unwrap(), vec![1, 5, 4, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_filled_from_the_highest_priority_first() {
        let h = harness("dynamic_batching { }", 16).await;
        let (busy, rbusy) = request(1, 2, None);
        h.batcher.submit(busy).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![1]);
        // In arrival order the 6 would go first (4 does not fit beside it); by priority
        // the two 4s fill a batch of 8 and the 6 waits for the next one.
        let (low, rlow) = at_priority(request(6, 2, None), 2);
        let (high_a, rhigh_a) = at_priority(request(4, 2, None), 1);
        let (high_b, rhigh_b) = at_priority(request(4, 2, None), 1);
        for q in [low, high_a, high_b] {
            h.batcher.submit(q).unwrap();
        }
        settle().await;
        for _ in 0..3 {
            h.permits.send(()).unwrap();
        }
        rbusy.await.unwrap().unwrap();
        assert_eq!(rhigh_a.await.unwrap().unwrap().batch_size, 8);
        assert_eq!(rhigh_b.await.unwrap().unwrap().batch_size, 8);
        assert_eq!(rlow.await.unwrap().unwrap().batch_size, 6);
        assert_eq!(*h.seen.lock().unwrap(), vec![1, 8, 6]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_carries_one_priority_level() {
        let h = harness("dynamic_batching { }", 16).await;
        let (busy, rbusy) = request(1, 2, None);
        h.batcher.submit(busy).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![1]);
        // 4 + 2 would fit in one batch of 16, but the level-2 request would lengthen the
        // level-1 execution: each level runs on its own, the higher one first.
        let (low, rlow) = at_priority(request(2, 2, None), 2);
        let (high, rhigh) = at_priority(request(4, 2, None), 1);
        for q in [low, high] {
            h.batcher.submit(q).unwrap();
        }
        settle().await;
        for _ in 0..3 {
            h.permits.send(()).unwrap();
        }
        rbusy.await.unwrap().unwrap();
        assert_eq!(rhigh.await.unwrap().unwrap().batch_size, 4);
        assert_eq!(rlow.await.unwrap().unwrap().batch_size, 2);
        assert_eq!(*h.seen.lock().unwrap(), vec![1, 4, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_nearer_than_the_measured_wait_is_refused_at_submit() {
        let h = harness("dynamic_batching { }", 16).await;
        // Before any execution nothing is predicted: a near deadline is not refused.
        assert_eq!(h.batcher.estimate.estimate(1), None);
        // One execution, held by the gate for at least 20 ms of real time.
        let (q, mut r) = with_deadline(request(1, 2, None), Instant::now() + MS);
        h.batcher.submit(q).unwrap();
        forwards(&h, 1).await;
        std::thread::sleep(MS * 20);
        h.permits.send(()).unwrap();
        let done = answer(&mut r).await.unwrap();
        assert!(done.compute >= MS * 20, "{:?}", done.compute);
        // The pool recorded what it measured.
        let measured = done.compute;
        assert_eq!(h.batcher.estimate.estimate(1), Some(measured));

        // A deadline nearer than one execution: refused at once, never queued.
        let now = Instant::now();
        let (near, mut rnear) = with_deadline(request(1, 2, None), now + measured / 2);
        let err = h.batcher.submit(near).unwrap_err();
        let (reason, retry_after) = crate::error::expect_overloaded(err);
        assert!(reason.contains("predicted wait"), "{reason}");
        assert_eq!(retry_after, measured, "pushback is the predicted wait");
        assert!(rnear.try_recv().is_err(), "the request was handed back");
        assert_eq!(h.batcher.depth(), 0);

        // A far deadline: accepted and served.
        let (far, mut rfar) = with_deadline(request(1, 2, None), now + Duration::from_secs(10));
        h.batcher.submit(far).unwrap();
        h.permits.send(()).unwrap();
        answer(&mut rfar).await.unwrap();
        assert_eq!(
            *h.seen.lock().unwrap(),
            vec![1, 1],
            "the refused one never ran"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_predicted_wait_counts_only_what_goes_first() {
        let h = harness("dynamic_batching { }", 16).await;
        h.batcher.estimate.record(8, MS * 80);
        h.batcher.estimate.record(1, MS * 10);
        let (busy, _rbusy) = request(1, 2, None);
        h.batcher.submit(busy).unwrap();
        forwards(&h, 1).await;
        // Two full batches of level 2 wait.
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let (q, r) = at_priority(request(8, 2, None), 2);
            h.batcher.submit(q).unwrap();
            waiting.push(r);
        }
        let deadline = Instant::now() + MS * 100;
        // Another level-2 request would wait for both (3 rounds of 80 ms).
        let (low, _rlow) = with_deadline(at_priority(request(1, 2, None), 2), deadline);
        let err = h.batcher.submit(low).unwrap_err();
        assert_eq!(crate::error::expect_overloaded(err).1, MS * 240);
        // A level-1 request goes before them: only its own execution counts.
        let (high, mut rhigh) = with_deadline(at_priority(request(1, 2, None), 1), deadline);
        h.batcher.submit(high).unwrap();
        assert_eq!(h.batcher.depth(), 3);
        settle().await;
        for _ in 0..4 {
            h.permits.send(()).unwrap();
        }
        assert_eq!(answer(&mut rhigh).await.unwrap().batch_size, 1);
        for mut r in waiting {
            answer(&mut r).await.unwrap();
        }
        assert_eq!(*h.seen.lock().unwrap(), vec![1, 1, 8, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_finish_before_its_deadline_is_not_dispatched() {
        let h = harness("dynamic_batching { }", 16).await;
        // One sample takes 100 ms (the busy request below has 2 samples, so its own
        // execution does not change this figure).
        h.batcher.estimate.record(1, MS * 100);
        let (busy, rbusy) = request(2, 2, None);
        h.batcher.submit(busy).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![2]);
        let t0 = Instant::now();
        let deadline = t0 + MS * 150;
        let (doomed, mut rdoomed) = with_deadline(request(1, 2, None), deadline);
        h.batcher
            .submit(doomed)
            .expect("100 ms predicted, 150 ms left: accepted");
        settle().await;
        // 60 ms later the instance frees up: 90 ms left, less than one execution.
        tokio::time::advance(MS * 60).await;
        h.permits.send(()).unwrap();
        let err = answer(&mut rdoomed).await.unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::DeadlineExceeded
        );
        assert!(
            Instant::now() < deadline,
            "answered before its deadline, not when it expired"
        );
        rbusy.await.unwrap().unwrap();
        assert_eq!(
            *h.seen.lock().unwrap(),
            vec![2],
            "it never reached the model"
        );
        assert_eq!(h.batcher.depth(), 0);
        // The model goes on serving.
        let (next, rnext) = request(1, 2, None);
        h.batcher.submit(next).unwrap();
        h.permits.send(()).unwrap();
        rnext.await.unwrap().unwrap();
        assert_eq!(*h.seen.lock().unwrap(), vec![2, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_batching_the_dispatch_check_uses_each_requests_own_execution() {
        // No dynamic batching: each request runs alone, in 100 ms.
        let h = harness("", 16).await;
        h.batcher.estimate.record(1, MS * 100);
        let (busy, mut rbusy) = request(2, 2, None);
        h.batcher.submit(busy).unwrap();
        assert_eq!(forwards(&h, 1).await, vec![2]);
        // First in line, with 150 ms left: it can run in time, whatever waits behind it.
        let (first, mut rfirst) = with_deadline(request(1, 2, None), Instant::now() + MS * 150);
        h.batcher.submit(first).unwrap();
        let mut behind = Vec::new();
        for _ in 0..3 {
            let (q, r) = request(1, 2, None);
            h.batcher.submit(q).unwrap();
            behind.push(r);
        }
        settle().await;
        for _ in 0..5 {
            h.permits.send(()).unwrap();
        }
        // Never `.await` an answer here: a parked runtime would jump the paused clock to
        // the deadline while the instance thread is still finishing the busy request.
        answer(&mut rbusy).await.unwrap();
        answer(&mut rfirst)
            .await
            .expect("dispatched: one execution of its own fits its deadline");
        for r in behind {
            r.await.unwrap().unwrap();
        }
        assert_eq!(*h.seen.lock().unwrap(), vec![2, 1, 1, 1, 1]);
    }

    // ---- the stuck-instance watchdog ----------------------------------------------------

    const WATCHED: Scaling = Scaling {
        max_execution: Some(Duration::from_secs(1)),
        ..ONE
    };

    #[tokio::test(start_paused = true)]
    async fn an_execution_within_the_limit_is_left_alone() {
        let h = harness_with("", 16, WATCHED, || Ok(())).await;
        let (q, mut r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        forwards(&h, 1).await;
        tokio::time::advance(MS * 999).await;
        settle().await;
        assert!(
            matches!(r.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "answered before the limit"
        );
        h.permits.send(()).unwrap();
        answer(&mut r).await.unwrap();
        // The same instance takes the next request: nothing was replaced.
        let (q, mut r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        h.permits.send(()).unwrap();
        answer(&mut r).await.unwrap();
        assert_eq!(h.loads.load(Ordering::SeqCst), 1);
        assert!(!h.batcher.is_wedged());
    }

    #[tokio::test(start_paused = true)]
    async fn an_execution_that_hangs_while_its_model_unloads_is_still_answered() {
        let h = harness_with("", 16, WATCHED, || Ok(())).await;
        let (q, mut r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        forwards(&h, 1).await;
        let Harness { batcher, .. } = h;
        drop(batcher); // the model unloads
        settle().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let err = answer(&mut r).await.unwrap_err();
        assert!(err.to_string().contains("instance stuck"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_instance_is_answered_for_replaced_once_then_the_model_is_wedged() {
        let h = harness_with("", 16, WATCHED, || Ok(())).await;
        // The gate opens for nobody: the first execution hangs.
        let (q, mut r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        forwards(&h, 1).await;
        tokio::time::advance(MS * 999).await;
        settle().await;
        assert!(matches!(
            r.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        tokio::time::advance(MS).await;
        let err = answer(&mut r).await.unwrap_err();
        assert!(
            matches!(&err, Error::ModelFailed { message, .. } if message.contains("instance stuck")),
            "{err}"
        );
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Internal);
        // One instance, one stuck: a replacement loads and serves nothing yet.
        until(&h.loads, 2).await;
        assert!(!h.batcher.is_wedged());

        // The replacement takes the next request, and hangs on it too.
        let (q, mut r) = request(3, 2, None);
        h.batcher.submit(q).unwrap();
        assert_eq!(forwards(&h, 2).await, vec![1, 3]);
        tokio::time::advance(Duration::from_secs(1)).await;
        let err = answer(&mut r).await.unwrap_err();
        assert!(err.to_string().contains("instance stuck"), "{err}");
        // Two stuck threads for a one-instance model: no room for a third.
        settle().await;
        assert!(h.batcher.is_wedged());
        assert_eq!(h.loads.load(Ordering::SeqCst), 2);
        // New work is answered at once, not left until a deadline.
        let (q, mut r) = request(1, 2, None);
        h.batcher.submit(q).unwrap();
        match answer(&mut r).await {
            Err(Error::ModelUnavailable { reason, .. }) => {
                assert!(reason.contains("every instance is stuck"), "{reason}")
            }
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
        assert_eq!(
            h.seen.lock().unwrap().len(),
            2,
            "stuck instances get no work"
        );

        // Both hung executions return: their threads are retired, not put back to work.
        h.permits.send(()).unwrap();
        h.permits.send(()).unwrap();
        until(&h.alive, 0).await;
        for _ in 0..2000 {
            settle().await;
            if !h.batcher.is_wedged() {
                break;
            }
            std::thread::sleep(MS);
        }
        assert!(!h.batcher.is_wedged());
        // With room again, the next request cold-starts a fresh instance.
        let (q, mut r) = request(2, 2, None);
        h.batcher.submit(q).unwrap();
        h.permits.send(()).unwrap();
        assert_eq!(answer(&mut r).await.unwrap().batch_size, 2);
        assert_eq!(h.loads.load(Ordering::SeqCst), 3);
        assert_eq!(*h.seen.lock().unwrap(), vec![1, 3, 2]);
    }

    // ---- the pure estimates -----------------------------------------------------------

    #[test]
    fn no_estimate_before_any_execution() {
        let e = ComputeEstimate::new(8);
        for n in [0, 1, 4, 8, 100] {
            assert_eq!(e.estimate(n), None);
        }
        let batched = policy(8, &[], 0);
        assert_eq!(predicted_wait(&batched, &e, 4, 2, 1, 1), None);
        let alone = BatchPolicy {
            combine: false,
            ..batched
        };
        assert_eq!(predicted_wait(&alone, &e, 4, 2, 1, 1), None);
    }

    #[test]
    fn the_estimate_is_the_measured_size_or_derived_from_the_nearest() {
        let e = ComputeEstimate::new(8);
        e.record(4, MS * 40);
        assert_eq!(e.estimate(4), Some(MS * 40));
        // One measured size: other sizes in proportion to it, smaller and larger.
        assert_eq!(e.estimate(1), Some(MS * 10));
        assert_eq!(e.estimate(3), Some(MS * 30));
        assert_eq!(e.estimate(6), Some(MS * 60));
        assert_eq!(e.estimate(8), Some(MS * 80));
        // Between two measured sizes: interpolated between them.
        e.record(2, MS * 16);
        assert_eq!(e.estimate(2), Some(MS * 16));
        assert_eq!(e.estimate(3), Some(MS * 28));
        // Below the smallest measured size: in proportion to it.
        assert_eq!(e.estimate(1), Some(MS * 8));
        // Above the largest: in proportion to it.
        assert_eq!(e.estimate(6), Some(MS * 60));
        // Sizes outside 1..=max_batch_size are clamped into it.
        assert_eq!(e.estimate(0), e.estimate(1));
        assert_eq!(e.estimate(100), e.estimate(8));
        // Measurements above max_batch_size are ignored.
        e.record(9, MS);
        assert_eq!(e.estimate(8), Some(MS * 80));
        // A size's figure is a running average: a new measurement moves it a fifth.
        e.record(4, MS * 90);
        let avg = e.estimate(4).unwrap();
        assert!(avg.abs_diff(MS * 50) <= Duration::from_nanos(1), "{avg:?}");
    }

    #[test]
    fn predicted_wait_with_batching_counts_rounds_of_full_batches() {
        let e = ComputeEstimate::new(8);
        e.record(2, MS * 20);
        e.record(8, MS * 80);
        let p = policy(8, &[], 0);
        // Alone in the queue: its own execution.
        assert_eq!(predicted_wait(&p, &e, 2, 1, 2, 1), Some(MS * 20));
        // A full batch with it: one round of 8.
        assert_eq!(predicted_wait(&p, &e, 8, 3, 2, 1), Some(MS * 80));
        // 20 samples, one instance: three rounds of full batches.
        assert_eq!(predicted_wait(&p, &e, 20, 5, 1, 1), Some(MS * 240));
        // Two instances: 16 per round, two rounds.
        assert_eq!(predicted_wait(&p, &e, 20, 5, 1, 2), Some(MS * 160));
        // Four samples over two instances: one round of batches of 2.
        assert_eq!(predicted_wait(&p, &e, 4, 2, 2, 2), Some(MS * 20));
        // No instance counted: as if one.
        assert_eq!(
            predicted_wait(&p, &e, 20, 5, 1, 0),
            predicted_wait(&p, &e, 20, 5, 1, 1)
        );
        // At least its own samples, whatever is counted ahead.
        assert_eq!(predicted_wait(&p, &e, 0, 0, 8, 1), Some(MS * 80));
    }

    #[test]
    fn predicted_wait_without_batching_counts_one_execution_per_request() {
        let e = ComputeEstimate::new(8);
        e.record(2, MS * 20);
        let alone = BatchPolicy {
            combine: false,
            ..policy(8, &[], 0)
        };
        assert_eq!(predicted_wait(&alone, &e, 2, 1, 2, 1), Some(MS * 20));
        // Five requests over two instances: three rounds, samples ahead do not matter.
        assert_eq!(predicted_wait(&alone, &e, 2, 5, 2, 2), Some(MS * 60));
        assert_eq!(predicted_wait(&alone, &e, 40, 5, 2, 2), Some(MS * 60));
        // Its own size sets each execution's time (4 samples: scaled from 2).
        assert_eq!(predicted_wait(&alone, &e, 4, 1, 4, 1), Some(MS * 40));
    }
}
