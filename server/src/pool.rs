//! Model instances: each is a named OS thread (`model-<name>-<i>`) that owns one loaded
//! backend. An idle instance offers itself on the `free` channel; the batcher answers
//! with one batch on the job channel. The instance concatenates the requests' inputs
//! (one copy), runs forward, splits the outputs back per request (no copy) and answers
//! each on its oneshot. A panicking model fails only its own batch; the instance then
//! reloads its backend and goes on. Dropping the pool closes the channels and joins the
//! threads after the batch they hold.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::backend::{self, Backend, BackendError};
use crate::batcher::{Done, Queued};
use crate::config::BackendOptions;
use crate::error::Error;
use crate::metrics::{self, DropReason};
use crate::model::ModelStats;
use crate::repository::ModelSpec;
use crate::tensor::{concat_batch, split_batch, Tensor};

/// One batch for an instance, with each request's time in the queue.
struct Job {
    requests: Vec<Queued>,
    queue_times: Vec<Duration>,
}

pub struct InstancePool {
    jobs: Option<flume::Sender<Job>>,
    /// One token per idle instance.
    pub free: mpsc::Receiver<()>,
    workers: Vec<JoinHandle<()>>,
}

impl InstancePool {
    /// Start `spec.instance_count` instances of the model in `version_dir` and wait until
    /// each has loaded. Blocking: call from a blocking context.
    pub fn start(
        spec: Arc<ModelSpec>,
        version_dir: PathBuf,
        options: BackendOptions,
        stats: Arc<Mutex<ModelStats>>,
    ) -> Result<InstancePool, BackendError> {
        let loader_spec = spec.clone();
        let loader: Loader = Arc::new(move || backend::load(&loader_spec, &version_dir, &options));
        InstancePool::start_with(spec, loader, stats)
    }

    /// Like [`InstancePool::start`], with each instance's backend made by `loader`.
    pub fn start_with(
        spec: Arc<ModelSpec>,
        loader: Loader,
        stats: Arc<Mutex<ModelStats>>,
    ) -> Result<InstancePool, BackendError> {
        let n = spec.instance_count;
        // A job is only sent against a free token, so neither channel ever holds more
        // than one entry per instance.
        let (jobs, jobs_rx) = flume::bounded::<Job>(n);
        let (free_tx, free) = mpsc::channel(n);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut workers = Vec::with_capacity(n);
        for index in 0..n {
            let instance = Instance {
                spec: spec.clone(),
                loader: loader.clone(),
                jobs: jobs_rx.clone(),
                free: free_tx.clone(),
                stats: stats.clone(),
            };
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("model-{}-{index}", spec.name))
                .spawn(move || instance.run(ready))
                .map_err(|e| BackendError::Load {
                    path: spec.name.clone(),
                    message: format!("cannot start instance thread: {e}"),
                })?;
            workers.push(handle);
        }
        drop((ready_tx, free_tx));
        let mut failure = None;
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(BackendError::InstanceGone)),
            }
        }
        let pool = InstancePool { jobs: Some(jobs), free, workers };
        match failure {
            None => Ok(pool),
            Some(e) => Err(e), // dropping `pool` stops and joins the instances that did load
        }
    }

    /// Hand a batch to an idle instance. Call only holding a token from `free`.
    pub fn run(&self, requests: Vec<Queued>, queue_times: Vec<Duration>) -> Result<(), Vec<Queued>> {
        let Some(jobs) = self.jobs.as_ref() else { return Err(requests) };
        jobs.try_send(Job { requests, queue_times }).map_err(|e| e.into_inner().requests)
    }
}

impl Drop for InstancePool {
    fn drop(&mut self) {
        self.jobs.take();
        self.free.close();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Makes one backend instance; called on the instance's own thread.
pub type Loader = Arc<dyn Fn() -> Result<Box<dyn Backend>, BackendError> + Send + Sync>;

struct Instance {
    spec: Arc<ModelSpec>,
    loader: Loader,
    jobs: flume::Receiver<Job>,
    free: mpsc::Sender<()>,
    stats: Arc<Mutex<ModelStats>>,
}

impl Instance {
    fn load(&self) -> Result<Box<dyn Backend>, BackendError> {
        match catch_unwind(AssertUnwindSafe(|| (self.loader)())) {
            Ok(result) => result,
            Err(panic) => Err(BackendError::Load {
                path: self.spec.name.clone(),
                message: format!("loader panicked: {}", panic_message(&panic)),
            }),
        }
    }

    fn run(self, ready: std::sync::mpsc::Sender<Result<(), BackendError>>) {
        let mut backend = match self.load() {
            Ok(b) => {
                let _ = ready.send(Ok(()));
                b
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        drop(ready);
        loop {
            if self.free.blocking_send(()).is_err() {
                return; // the batcher has stopped
            }
            let Ok(job) = self.jobs.recv() else { return };
            if let Err(panic) = self.execute(backend.as_mut(), job) {
                tracing::error!(model = %self.spec.name, message = %panic, "model panicked; reloading the instance");
                match self.load() {
                    Ok(fresh) => backend = fresh,
                    Err(e) => {
                        tracing::error!(model = %self.spec.name, error = %e, "instance could not be reloaded; it stops");
                        return;
                    }
                }
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
        self.stats.lock().expect("stats lock is never poisoned").record_execution(total, compute);

        let fail = |requests: Vec<Queued>, message: String| {
            for q in requests {
                let _ = q.reply.send(Err(Error::ModelFailed { model: model.clone(), message: message.clone() }));
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
            (0..requests.len()).map(|r| split.iter().map(|parts| parts[r].clone()).collect()).collect()
        };
        for ((q, outputs), queue) in requests.into_iter().zip(per_request).zip(queue_times) {
            let _ = q.reply.send(Ok(Done { outputs, queue, compute, batch_size: total }));
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
