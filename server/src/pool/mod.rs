//! Model instances, from zero up to `instance_group.count`. Each instance is a named OS
//! thread (`model-<name>-<i>`) that loads its own backend, runs the warm-up, then takes
//! one batch at a time from its own channel. It concatenates the requests' inputs (one
//! copy), runs forward, splits the outputs back per request (no copy) and answers each on
//! its oneshot. Every state change is reported on the pool's event channel, which the
//! model's batcher owns: it decides when to start an instance (cold start, queue
//! pressure) and when to retire one (idle). A panicking model fails only its own batch;
//! the instance then reloads its backend and goes on. Retired instances are joined off
//! the async runtime.
//!
//! The pool also owns the stuck-instance watchdog's state. An instance whose current
//! execution has run longer than the model's maximum is moved out of service: its
//! requests are answered at once (each request's answer is a take-once [`Reply`] that
//! the instance thread and the watchdog share, so exactly one of them answers), it never
//! gets another job, and it counts as stuck. A stuck thread cannot be interrupted, only
//! abandoned; if its forward ever returns it is retired (joined off the runtime), never
//! put back to work: its backend's state after an overrun is unknown and a replacement
//! has already taken its place. Stuck threads count toward a cap ([`room_for_instance`])
//! so that a model that hangs every time cannot make the pool spawn threads without end.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::backend::{self, Backend, BackendError};
use crate::config::BackendOptions;
use crate::error::{Error, LoadError};
use crate::metrics::{self, DropReason};
use crate::spec::{ModelSpec, WarmupSample};
use crate::stats::ModelStats;
use crate::tensor::{concat_batch, split_batch, Tensor};
use crate::work::{ComputeEstimate, Done};

#[cfg(test)]
mod tests;
mod worker;

use worker::{join_in_background, millis, Worker};

/// Makes one backend instance; called on the instance's own thread.
pub type Loader = Arc<dyn Fn() -> Result<Box<dyn Backend>, BackendError> + Send + Sync>;

/// Where one request's answer goes. Shared by the instance that runs the request and
/// the pool's watchdog, which answers for an instance that is stuck: whoever answers
/// first takes the sender, so a request is answered exactly once, and an instance that
/// returns after the watchdog gave up on it finds nobody left to answer.
#[derive(Clone)]
pub struct Reply(Arc<Mutex<Option<Answer>>>);

/// Where a request's result or failure is sent.
pub type Answer = oneshot::Sender<Result<Done, Error>>;

impl Reply {
    pub fn new(sender: Answer) -> Reply {
        Reply(Arc::new(Mutex::new(Some(sender))))
    }

    /// Answer the request unless it has been answered already. Whether the answer went
    /// out (false: answered before, or the client has gone).
    pub fn send(&self, answer: Result<Done, Error>) -> bool {
        // Nothing can panic while the lock is held, so a poisoned lock still holds a
        // consistent slot.
        let sender = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        sender.is_some_and(|s| s.send(answer).is_ok())
    }

    /// Whether nobody waits for this answer any more: answered already, or the client
    /// has gone.
    pub fn is_closed(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_none_or(|s| s.is_closed())
    }
}

/// One request of a batch: its inputs in model argument order, its samples, its time
/// in the queue and where its answer goes.
pub struct Task {
    pub inputs: Vec<Tensor>,
    pub samples: usize,
    pub queue_time: Duration,
    pub reply: Reply,
}

/// One batch for an instance.
pub struct Job {
    pub tasks: Vec<Task>,
}

/// What instances report to the batcher.
#[derive(Debug)]
pub enum Event {
    /// Loaded and warmed up: ready for its first batch.
    Ready {
        id: usize,
        load: Duration,
        warmup: Duration,
    },
    /// Loading or warm-up failed; the instance is gone.
    LoadFailed { id: usize, reason: LoadError },
    /// Finished a batch: ready for the next (or, for a stuck instance, to be retired).
    Done { id: usize },
    /// The instance stopped for good (its backend could not be reloaded after a panic).
    Stopped { id: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Loading,
    Idle {
        since: tokio::time::Instant,
    },
    /// Running the batch handed to it at `since`.
    Busy {
        since: tokio::time::Instant,
    },
}

struct Slot {
    id: usize,
    state: State,
    jobs: std::sync::mpsc::SyncSender<Job>,
    thread: JoinHandle<()>,
    /// The answers of the batch it runs, for the watchdog to give if it gets stuck.
    running: Vec<Reply>,
}

/// An instance taken out of service because its execution ran too long. Its job channel
/// is gone, so once its forward returns the thread ends.
struct Stuck {
    id: usize,
    since: tokio::time::Instant,
    thread: JoinHandle<()>,
}

/// Whether a pool with `live` instances (loaded or loading) and `stuck` stuck threads
/// may start another instance, for a model of `max_instances` instances: never more than
/// `max_instances` in service, and never more than twice that many threads in all. A
/// model with one instance thus gets one replacement for a stuck instance; once the
/// replacement is stuck too, nothing more is started until a stuck thread returns.
pub fn room_for_instance(live: usize, stuck: usize, max_instances: usize) -> bool {
    let threads = live.saturating_add(stuck);
    live < max_instances && threads < max_instances.saturating_mul(2)
}

/// What the watchdog finds among busy instances (`(id, when its execution started)`):
/// those whose execution has run `limit` or longer at `now`, and the earliest moment
/// another one will have (when to look next).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub overdue: Vec<usize>,
    pub next: Option<tokio::time::Instant>,
}

pub fn watch(
    busy: impl IntoIterator<Item = (usize, tokio::time::Instant)>,
    limit: Duration,
    now: tokio::time::Instant,
) -> Watch {
    let mut found = Watch {
        overdue: Vec::new(),
        next: None,
    };
    for (id, since) in busy {
        // A start so far in the future that adding the limit overflows is never overdue.
        match since.checked_add(limit) {
            Some(at) if at <= now => found.overdue.push(id),
            Some(at) => found.next = Some(found.next.map_or(at, |n| n.min(at))),
            None => {}
        }
    }
    found
}

pub struct InstancePool {
    spec: Arc<ModelSpec>,
    loader: Loader,
    warmup: Arc<[WarmupSample]>,
    stats: Arc<Mutex<ModelStats>>,
    /// Measured execution times by batch size, shared with the batcher's admission.
    pub estimate: Arc<ComputeEstimate>,
    events_tx: mpsc::Sender<Event>,
    /// Instance events; owned by whoever drives the pool (the batcher).
    pub events: mpsc::Receiver<Event>,
    slots: Vec<Slot>,
    stuck: Vec<Stuck>,
    next_id: usize,
}

impl InstancePool {
    pub fn new(
        spec: Arc<ModelSpec>,
        version_dir: PathBuf,
        options: BackendOptions,
        stats: Arc<Mutex<ModelStats>>,
    ) -> InstancePool {
        let loader_spec = spec.clone();
        let loader: Loader = Arc::new(move || backend::load(&loader_spec, &version_dir, &options));
        let warmup = spec.warmup.clone().into();
        InstancePool::with_loader(spec, loader, warmup, stats)
    }

    /// A pool whose instances get their backend from `loader`.
    pub fn with_loader(
        spec: Arc<ModelSpec>,
        loader: Loader,
        warmup: Arc<[WarmupSample]>,
        stats: Arc<Mutex<ModelStats>>,
    ) -> InstancePool {
        // Each instance thread has at most one event outstanding at a time
        // (Ready/LoadFailed, then Done per batch, or Stopped), and stuck threads and
        // instances in service together are at most twice the instance count
        // (`room_for_instance`), so this never blocks an instance for long.
        let (events_tx, events) = mpsc::channel(spec.instance_count.max(1).saturating_mul(2));
        InstancePool {
            estimate: Arc::new(ComputeEstimate::new(spec.batching.max_batch_size.max(1))),
            spec,
            loader,
            warmup,
            stats,
            events_tx,
            events,
            slots: Vec::new(),
            stuck: Vec::new(),
            next_id: 0,
        }
    }

    /// Load `n` instances and wait until each has loaded and warmed up. Blocking: call
    /// outside the async runtime (e.g. in `spawn_blocking`).
    pub fn start(&mut self, n: usize) -> Result<(), LoadError> {
        for _ in 0..n {
            self.spawn()?;
        }
        let mut failure = None;
        for _ in 0..n {
            let event = self
                .events
                .blocking_recv()
                .expect("the pool holds a sender");
            if let Event::LoadFailed { reason, .. } = &event {
                failure = failure.or(Some(reason.clone()));
            }
            self.on_event(&event, tokio::time::Instant::now());
        }
        match failure {
            None => Ok(()),
            Some(reason) => Err(reason),
        }
    }

    /// Start loading one more instance; its `Ready` or `LoadFailed` event follows.
    pub fn spawn(&mut self) -> Result<usize, LoadError> {
        let id = self.next_id;
        self.next_id += 1;
        // One slot: a job is only sent to an idle instance.
        let (jobs, jobs_rx) = std::sync::mpsc::sync_channel(1);
        let worker = Worker {
            id,
            spec: self.spec.clone(),
            loader: self.loader.clone(),
            warmup: self.warmup.clone(),
            jobs: jobs_rx,
            events: self.events_tx.clone(),
            stats: self.stats.clone(),
            estimate: self.estimate.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("model-{}-{id}", self.spec.name))
            .spawn(move || worker.run())
            .map_err(|e| LoadError::Thread(e.to_string()))?;
        self.slots.push(Slot {
            id,
            state: State::Loading,
            jobs,
            thread,
            running: Vec::new(),
        });
        self.report();
        Ok(id)
    }

    /// Apply an event to the instance states.
    pub fn on_event(&mut self, event: &Event, now: tokio::time::Instant) {
        match *event {
            Event::Ready { id, .. } | Event::Done { id } => {
                if self.retire_stuck(id, now) {
                    return;
                }
                if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
                    slot.state = State::Idle { since: now };
                    slot.running.clear();
                }
            }
            Event::LoadFailed { id, .. } | Event::Stopped { id } => {
                if self.retire_stuck(id, now) {
                    return;
                }
                if let Some(i) = self.slots.iter().position(|s| s.id == id) {
                    let slot = self.slots.remove(i);
                    join_in_background(vec![slot.thread]);
                }
                self.report();
            }
        }
    }

    /// A stuck instance's forward has returned (or its thread stopped): its thread ends
    /// now, so join it off the runtime. Whether `id` was stuck.
    fn retire_stuck(&mut self, id: usize, now: tokio::time::Instant) -> bool {
        let Some(i) = self.stuck.iter().position(|s| s.id == id) else {
            return false;
        };
        let stuck = self.stuck.remove(i);
        tracing::warn!(model = %self.spec.name, instance = id,
            ran_ms = millis(now.saturating_duration_since(stuck.since)),
            "stuck instance returned; retired");
        join_in_background(vec![stuck.thread]);
        self.report();
        true
    }

    /// Take every instance whose current execution has run `limit` or longer out of
    /// service: answer its requests INTERNAL, count and log it once. Returns how many
    /// were found.
    pub fn detect_stuck(&mut self, now: tokio::time::Instant, limit: Duration) -> usize {
        let found = watch(self.busy(), limit, now);
        for &id in &found.overdue {
            let i = self
                .slots
                .iter()
                .position(|s| s.id == id)
                .expect("watch only returns ids of slots");
            let Slot {
                state,
                jobs,
                thread,
                running,
                ..
            } = self.slots.remove(i);
            // Without its job channel the thread ends once its forward returns.
            drop(jobs);
            let State::Busy { since } = state else {
                unreachable!("watch only returns busy instances");
            };
            let ran = now.saturating_duration_since(since);
            self.stuck.push(Stuck { id, since, thread });
            metrics::stuck_detected(&self.spec.name);
            self.report();
            tracing::error!(model = %self.spec.name, instance = id, ran_ms = millis(ran),
                limit_ms = millis(limit), requests = running.len(),
                "instance stuck: its execution ran past max_execution_secs; its requests are answered and it gets no more work");
            let message = format!(
                "instance stuck: instance {id} has run one execution for {:.3} s, past the {:.3} s limit (max_execution_secs)",
                ran.as_secs_f64(),
                limit.as_secs_f64()
            );
            for reply in running {
                reply.send(Err(Error::ModelFailed {
                    model: self.spec.name.clone(),
                    message: message.clone(),
                }));
            }
        }
        found.overdue.len()
    }

    /// When the earliest running execution will have run `limit`, if any runs. Pass
    /// the `now` of the last `detect_stuck`: an execution already overdue then has left
    /// the busy set, and none can fall between the two calls unwatched.
    pub fn next_stuck_check(
        &self,
        limit: Duration,
        now: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        watch(self.busy(), limit, now).next
    }

    /// Instances running an execution now.
    pub fn busy_count(&self) -> usize {
        self.busy().count()
    }

    fn busy(&self) -> impl Iterator<Item = (usize, tokio::time::Instant)> + '_ {
        self.slots.iter().filter_map(|s| match s.state {
            State::Busy { since } => Some((s.id, since)),
            State::Loading | State::Idle { .. } => None,
        })
    }

    /// Instances out of service because an execution ran too long, whose thread has
    /// not returned.
    pub fn stuck(&self) -> usize {
        self.stuck.len()
    }

    /// Whether another instance may be started (see [`room_for_instance`]).
    pub fn has_room(&self, max_instances: usize) -> bool {
        room_for_instance(self.live(), self.stuck(), max_instances)
    }

    /// An idle instance, the longest idle first (so the others can reach their idle timeout).
    pub fn idle(&self) -> Option<usize> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                State::Idle { since } => Some((since, s.id)),
                State::Loading | State::Busy { .. } => None,
            })
            .min()
            .map(|(_, id)| id)
    }

    /// Hand a batch to idle instance `id`; its execution counts from `now`.
    pub fn run(&mut self, id: usize, job: Job, now: tokio::time::Instant) -> Result<(), Job> {
        let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) else {
            return Err(job);
        };
        let replies: Vec<Reply> = job.tasks.iter().map(|t| t.reply.clone()).collect();
        match slot.jobs.try_send(job) {
            Ok(()) => {
                slot.state = State::Busy { since: now };
                slot.running = replies;
                Ok(())
            }
            Err(
                std::sync::mpsc::TrySendError::Full(job)
                | std::sync::mpsc::TrySendError::Disconnected(job),
            ) => Err(job),
        }
    }

    /// Retire idle instances that have been idle since before `cutoff`, keeping `min`.
    /// Returns how many were retired.
    pub fn retire_idle(&mut self, cutoff: tokio::time::Instant, min: usize) -> usize {
        let mut retired = Vec::new();
        while self.live() > min {
            let oldest = self
                .slots
                .iter()
                .position(|s| matches!(s.state, State::Idle { since } if since <= cutoff));
            match oldest {
                Some(i) => retired.push(self.slots.remove(i)),
                None => break,
            }
        }
        let n = retired.len();
        if n > 0 {
            for _ in 0..n {
                metrics::instance_unloaded(&self.spec.name);
            }
            tracing::info!(model = %self.spec.name, retired = n, left = self.live(), "idle instances unloaded");
            join_in_background(retired.into_iter().map(|s| s.thread).collect());
            self.report();
        }
        n
    }

    /// When the longest-idle instance reaches `idle_timeout`, if any is idle.
    pub fn next_idle_deadline(&self, idle_timeout: Duration) -> Option<tokio::time::Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                State::Idle { since } => Some(since + idle_timeout),
                State::Loading | State::Busy { .. } => None,
            })
            .min()
    }

    pub fn idle_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, State::Idle { .. }))
            .count()
    }

    /// Instances loaded or loading.
    pub fn live(&self) -> usize {
        self.slots.len()
    }

    pub fn loading(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state == State::Loading)
            .count()
    }

    fn report(&self) {
        metrics::instances(&self.spec.name, self.slots.len());
        metrics::stuck_instances(&self.spec.name, self.stuck.len());
    }
}

impl Drop for InstancePool {
    /// Instances finish the batch they hold, then stop. Joining blocks: off the runtime
    /// when there is one. Stuck threads are not joined (that could wait for ever, and
    /// hold a blocking thread or the runtime's shutdown with it): they are detached and
    /// end on their own if their forward ever returns.
    fn drop(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        let stuck = std::mem::take(&mut self.stuck);
        metrics::instances(&self.spec.name, 0);
        metrics::stuck_instances(&self.spec.name, 0);
        if !stuck.is_empty() {
            tracing::warn!(model = %self.spec.name, stuck = stuck.len(), "model unloaded with stuck instances; their threads are left to end on their own");
        }
        drop(stuck);
        // Dropping each slot's job sender is what lets its thread stop.
        join_in_background(slots.into_iter().map(|s| s.thread).collect());
    }
}
