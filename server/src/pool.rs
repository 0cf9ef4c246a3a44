//! Model instances, from zero up to `instance_group.count`. Each instance is a named OS
//! thread (`model-<name>-<i>`) that loads its own backend, runs the warm-up, then takes
//! one batch at a time from its own channel. It concatenates the requests' inputs (one
//! copy), runs forward, splits the outputs back per request (no copy) and answers each on
//! its oneshot. Every state change is reported on the pool's event channel, which the
//! model's batcher owns: it decides when to start an instance (cold start, queue
//! pressure) and when to retire one (idle). A panicking model fails only its own batch;
//! the instance then reloads its backend and goes on. Retired instances are joined off
//! the async runtime.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::backend::{self, Backend, BackendError};
use crate::batcher::{ComputeEstimate, Done, Queued};
use crate::config::BackendOptions;
use crate::error::Error;
use crate::metrics::{self, DropReason};
use crate::model::ModelStats;
use crate::repository::ModelSpec;
use crate::tensor::{concat_batch, split_batch, Tensor};

/// Makes one backend instance; called on the instance's own thread.
pub type Loader = Arc<dyn Fn() -> Result<Box<dyn Backend>, BackendError> + Send + Sync>;

/// A warm-up sample: inputs in model argument order, run `count` times.
#[derive(Debug, Clone)]
pub struct WarmupSample {
    pub name: String,
    pub inputs: Vec<Tensor>,
    pub count: u32,
}

/// One batch for an instance, with each request's time in the queue.
pub struct Job {
    pub requests: Vec<Queued>,
    pub queue_times: Vec<Duration>,
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
    LoadFailed { id: usize, reason: String },
    /// Finished a batch: ready for the next.
    Done { id: usize },
    /// The instance stopped for good (its backend could not be reloaded after a panic).
    Stopped { id: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Loading,
    Idle { since: tokio::time::Instant },
    Busy,
}

struct Slot {
    id: usize,
    state: State,
    jobs: std::sync::mpsc::SyncSender<Job>,
    thread: JoinHandle<()>,
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
        // Each instance has at most one event outstanding at a time (Ready/LoadFailed,
        // then Done per batch, or Stopped), so this never blocks an instance for long.
        let (events_tx, events) = mpsc::channel(spec.instance_count.max(1) * 2);
        InstancePool {
            estimate: Arc::new(ComputeEstimate::new(spec.batching.max_batch_size.max(1))),
            spec,
            loader,
            warmup,
            stats,
            events_tx,
            events,
            slots: Vec::new(),
            next_id: 0,
        }
    }

    /// Load `n` instances and wait until each has loaded and warmed up. Blocking: call
    /// outside the async runtime (e.g. in `spawn_blocking`).
    pub fn start(&mut self, n: usize) -> Result<(), String> {
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
    pub fn spawn(&mut self) -> Result<usize, String> {
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
            .map_err(|e| format!("cannot start an instance thread: {e}"))?;
        self.slots.push(Slot {
            id,
            state: State::Loading,
            jobs,
            thread,
        });
        self.report();
        Ok(id)
    }

    /// Apply an event to the instance states.
    pub fn on_event(&mut self, event: &Event, now: tokio::time::Instant) {
        match *event {
            Event::Ready { id, .. } | Event::Done { id } => {
                self.set(id, State::Idle { since: now })
            }
            Event::LoadFailed { id, .. } | Event::Stopped { id } => {
                if let Some(i) = self.slots.iter().position(|s| s.id == id) {
                    let slot = self.slots.remove(i);
                    join_in_background(vec![slot]);
                }
                self.report();
            }
        }
    }

    fn set(&mut self, id: usize, state: State) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            slot.state = state;
        }
    }

    /// An idle instance, the longest idle first (so the others can reach their idle timeout).
    pub fn idle(&self) -> Option<usize> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                State::Idle { since } => Some((since, s.id)),
                State::Loading | State::Busy => None,
            })
            .min()
            .map(|(_, id)| id)
    }

    /// Hand a batch to idle instance `id`.
    pub fn run(&mut self, id: usize, job: Job) -> Result<(), Job> {
        let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) else {
            return Err(job);
        };
        match slot.jobs.try_send(job) {
            Ok(()) => {
                slot.state = State::Busy;
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
            join_in_background(retired);
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
                State::Loading | State::Busy => None,
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
    }
}

impl Drop for InstancePool {
    /// Instances finish the batch they hold, then stop. Joining blocks: off the runtime
    /// when there is one.
    fn drop(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        metrics::instances(&self.spec.name, 0);
        join_in_background(slots);
    }
}

/// Close each instance's channel (it stops after its current batch) and join its thread
/// without blocking an async worker.
fn join_in_background(slots: Vec<Slot>) {
    if slots.is_empty() {
        return;
    }
    let threads: Vec<JoinHandle<()>> = slots.into_iter().map(|s| s.thread).collect();
    let join = move || {
        for t in threads {
            let _ = t.join();
        }
        release_free_memory();
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(join);
        }
        Err(_) => join(),
    }
}

/// Hand memory freed by unloaded instances back to the operating system. glibc keeps
/// freed heap pages for reuse, so without this a model scaled to zero would still hold
/// its instances' memory in the process's RSS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim only returns unused pages of the allocator's own arenas; it
    // takes no pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

struct Worker {
    id: usize,
    spec: Arc<ModelSpec>,
    loader: Loader,
    warmup: Arc<[WarmupSample]>,
    jobs: std::sync::mpsc::Receiver<Job>,
    events: mpsc::Sender<Event>,
    stats: Arc<Mutex<ModelStats>>,
    estimate: Arc<ComputeEstimate>,
}

impl Worker {
    fn load(&self) -> Result<Box<dyn Backend>, String> {
        match catch_unwind(AssertUnwindSafe(|| (self.loader)())) {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(panic) => Err(format!("loader panicked: {}", panic_message(&panic))),
        }
    }

    /// Run every warm-up sample; a model that fails its warm-up never reports ready.
    fn warm_up(&self, backend: &mut dyn Backend) -> Result<(), String> {
        for sample in self.warmup.iter() {
            for _ in 0..sample.count.max(1) {
                match catch_unwind(AssertUnwindSafe(|| backend.forward(&sample.inputs))) {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        return Err(format!("warm-up sample '{}' failed: {e}", sample.name))
                    }
                    Err(panic) => {
                        return Err(format!(
                            "warm-up sample '{}' panicked: {}",
                            sample.name,
                            panic_message(&panic)
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    fn load_and_warm_up(&self) -> Result<(Box<dyn Backend>, Duration, Duration), String> {
        let start = Instant::now();
        let mut backend = self.load()?;
        let load = start.elapsed();
        let start = Instant::now();
        self.warm_up(backend.as_mut())?;
        Ok((backend, load, start.elapsed()))
    }

    fn run(self) {
        let mut backend = match self.load_and_warm_up() {
            Ok((backend, load, warmup)) => {
                metrics::instance_loaded(&self.spec.name, load, warmup);
                let _ = self.events.blocking_send(Event::Ready {
                    id: self.id,
                    load,
                    warmup,
                });
                backend
            }
            Err(reason) => {
                tracing::error!(model = %self.spec.name, %reason, "instance failed to load");
                let _ = self.events.blocking_send(Event::LoadFailed {
                    id: self.id,
                    reason,
                });
                return;
            }
        };
        while let Ok(job) = self.jobs.recv() {
            if let Err(panic) = self.execute(backend.as_mut(), job) {
                tracing::error!(model = %self.spec.name, message = %panic, "model panicked; reloading the instance");
                match self.load_and_warm_up() {
                    Ok((fresh, ..)) => backend = fresh,
                    Err(e) => {
                        tracing::error!(model = %self.spec.name, error = %e, "instance could not be reloaded; it stops");
                        let _ = self.events.blocking_send(Event::Stopped { id: self.id });
                        return;
                    }
                }
            }
            if self
                .events
                .blocking_send(Event::Done { id: self.id })
                .is_err()
            {
                return; // the batcher has stopped
            }
        }
    }

    /// Run one batch and answer every request in it. `Err` (the panic message) when the
    /// model panicked: the backend may be broken and must be replaced.
    fn execute(&self, backend: &mut dyn Backend, job: Job) -> Result<(), String> {
        let model = &self.spec.name;
        // Clients may have left between dispatch and now: skip their work.
        let (requests, queue_times): (Vec<Queued>, Vec<Duration>) = job
            .requests
            .into_iter()
            .zip(job.queue_times)
            .filter(|(q, _)| {
                let gone = q.reply.is_closed();
                if gone {
                    metrics::dropped(model, DropReason::Cancelled);
                }
                !gone
            })
            .unzip();
        if requests.is_empty() {
            return Ok(());
        }
        let sizes: Vec<usize> = requests.iter().map(|q| q.samples).collect();
        let total: usize = sizes.iter().sum();
        let inputs: Vec<Tensor> = (0..requests[0].inputs.len())
            .map(|i| concat_batch(&requests.iter().map(|q| &q.inputs[i]).collect::<Vec<_>>()))
            .collect();
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| backend.forward(&inputs)));
        let compute = start.elapsed();
        metrics::execution(model, total, compute);
        if matches!(result, Ok(Ok(_))) {
            self.estimate.record(total, compute);
        }
        self.stats
            .lock()
            .expect("stats lock is never poisoned")
            .record_execution(total, compute);

        let fail = |requests: Vec<Queued>, message: String| {
            for q in requests {
                let _ = q.reply.send(Err(Error::ModelFailed {
                    model: model.clone(),
                    message: message.clone(),
                }));
            }
        };
        let outputs = match result {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                fail(requests, e.to_string());
                return Ok(());
            }
            Err(panic) => {
                let message = panic_message(&panic);
                fail(requests, BackendError::Panic(message.clone()).to_string());
                return Err(message);
            }
        };
        // Per output, the slices for each request; a lone request keeps the tensors as is.
        let per_request: Vec<Vec<Tensor>> = if requests.len() == 1 {
            vec![outputs]
        } else {
            let mut split = Vec::with_capacity(outputs.len());
            for (i, out) in outputs.iter().enumerate() {
                match split_batch(out, &sizes) {
                    Ok(parts) => split.push(parts),
                    Err(e) => {
                        fail(requests, format!("output {i}: {e}"));
                        return Ok(());
                    }
                }
            }
            (0..requests.len())
                .map(|r| split.iter().map(|parts| parts[r].clone()).collect())
                .collect()
        };
        let batch_wait = queue_times.iter().copied().max().unwrap_or_default();
        for ((q, outputs), queue) in requests.into_iter().zip(per_request).zip(queue_times) {
            let _ = q.reply.send(Ok(Done {
                outputs,
                queue,
                batch_wait,
                compute,
                batch_size: total,
            }));
        }
        Ok(())
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
