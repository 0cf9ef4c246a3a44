//! The model's actor: one task that owns the queue and the instance pool and `select!`s
//! between a new request, an instance's report and the next timer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::queue::Queue;
use super::{plan_capped, LowerLevelCap, Plan, Queued, Scaling};
use crate::error::Error;
use crate::limit::TARGET_EXECUTIONS;
use crate::metrics;
use crate::pool::{Event, InstancePool, Job, Reply, Task};
use crate::spec::BatchPolicy;
use crate::work::ComputeEstimate;

pub(super) struct Actor {
    pub(super) instances: Arc<(AtomicUsize, AtomicUsize)>,
    pub(super) wedged: Arc<AtomicBool>,
    pub(super) model: String,
    pub(super) policy: BatchPolicy,
    pub(super) scaling: Scaling,
    pub(super) rx: mpsc::Receiver<Queued>,
    pub(super) queue: Queue,
    pub(super) estimate: Arc<ComputeEstimate>,
    pub(super) pool: InstancePool,
    /// Set while the model has no instance and one is loading for waiting requests.
    pub(super) cold_since: Option<Instant>,
    /// When a request of each priority level (index `level - 1`) last arrived.
    pub(super) arrivals: Vec<Option<Instant>>,
}

/// How recently a higher level must have sent a request for lower levels' batches to be
/// held short (see [`Actor::lower_level_cap`]).
const RECENT: Duration = Duration::from_secs(1);

impl Actor {
    // Kept whole: the actor's loop; one iteration (dispatch, scale, sleep until the next event) reads top to bottom.
    pub(super) async fn run(mut self) {
        let mut open = true;
        loop {
            let now = Instant::now();
            self.watch(now);
            self.queue.drop_dead(&self.estimate, now);
            // Once the channel has closed nothing more can join: flush what is there.
            let ready = |p: &Plan| p.ready || !open;
            let plan = loop {
                let cap = self.lower_level_cap(now);
                let plan = plan_capped(&self.policy, self.queue.as_slice(), now, cap);
                match (plan.as_ref().filter(|p| ready(p)), self.pool.idle()) {
                    (Some(p), Some(id)) => {
                        let take = self.queue.fit_deadlines(&p.take, &self.estimate, now);
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
                self.queue.next_expiry(),
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
                    Some(q) => {
                        self.arrived(q.priority, q.arrival);
                        self.queue.push(q);
                    }
                    None => open = false,
                },
                Some(event) = self.pool.events.recv() => self.on_event(event),
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
        // Dropping the pool lets the instances finish and stop, joined off the runtime.
    }

    fn arrived(&mut self, level: u32, at: Instant) {
        let index = level.max(1) as usize - 1;
        // The level is within the model's priority_levels (bounded when it loads).
        if self.arrivals.len() <= index {
            self.arrivals.resize(index + 1, None);
        }
        self.arrivals[index] = Some(at);
    }

    /// The cap on lower levels' batches, set by the highest level that sent a request
    /// within [`RECENT`] and applied when the head of the queue is of a lower level: the
    /// largest batch whose measured execution takes no longer than the queueing the
    /// concurrency limit allows ([`TARGET_EXECUTIONS`] single-sample executions), so a
    /// higher-level request that arrives as it starts waits no longer than that for the
    /// instance. A full batch of a lower level would hold it for up to `max_batch_size`
    /// executions on a compute-bound model (on `cnn`, 32 of them: over 100 ms on a small
    /// machine); on a model whose cost is mostly fixed the cap allows large batches.
    fn lower_level_cap(&self, now: Instant) -> Option<LowerLevelCap> {
        let index = self
            .arrivals
            .iter()
            .position(|at| at.is_some_and(|at| now.saturating_duration_since(at) < RECENT))?;
        let level = index as u32 + 1;
        if self.queue.iter().next()?.priority <= level {
            return None;
        }
        let samples = self
            .estimate
            .estimate(1)
            .and_then(|one| self.estimate.most_within(one * TARGET_EXECUTIONS))
            .unwrap_or(TARGET_EXECUTIONS as usize);
        Some(LowerLevelCap { level, samples })
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        self.pool.on_event(&event, now);
        match event {
            Event::Ready { load, warmup, .. } => {
                if let Some(since) = self.cold_since.take() {
                    for q in self.queue.iter() {
                        metrics::cold_start_wait(&self.model, now - q.arrival.max(since));
                    }
                    tracing::info!(model = %self.model, load_ms = load.as_millis() as u64,
                        warmup_ms = warmup.as_millis() as u64, "cold start done");
                }
            }
            Event::LoadFailed { reason, .. } => {
                if self.pool.live() == 0 {
                    self.cold_since = None;
                    self.queue
                        .fail_all(&format!("cannot load an instance: {reason}"));
                }
            }
            Event::Stopped { .. } => {
                if self.pool.live() == 0 {
                    self.queue.fail_all("the last instance stopped");
                }
            }
            Event::Done { .. } => {}
        }
    }

    fn dispatch(&mut self, instance: usize, take: &[usize], now: Instant) {
        let batch = self.queue.take(take);
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
}
