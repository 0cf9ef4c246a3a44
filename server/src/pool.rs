//! Model instances: each is a named OS thread (`model-<name>-<i>`) that owns one loaded
//! backend, takes jobs from a bounded channel shared by the model's instances and answers
//! each on its oneshot. A panicking model fails only its own job; the instance then
//! reloads its backend and goes on. Dropping the pool closes the channel and joins the
//! threads after the jobs they hold.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backend::{self, Backend, BackendError};
use crate::config::BackendOptions;
use crate::metrics;
use crate::repository::ModelSpec;
use crate::tensor::Tensor;

/// One unit of work for an instance: a batch in the model's argument order.
pub struct Job {
    pub inputs: Vec<Tensor>,
    pub reply: oneshot::Sender<Result<Executed, BackendError>>,
}

/// What an instance sends back.
#[derive(Debug)]
pub struct Executed {
    pub outputs: Vec<Tensor>,
    /// Time spent in the backend's forward.
    pub compute: Duration,
}

pub struct InstancePool {
    jobs: Option<flume::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl InstancePool {
    /// Start `spec.instance_count` instances of the model in `version_dir` and wait until
    /// each has loaded. Blocking: call from a blocking context.
    pub fn start(
        spec: Arc<ModelSpec>,
        version_dir: PathBuf,
        options: BackendOptions,
    ) -> Result<InstancePool, BackendError> {
        // One waiting job per instance: an instance that finishes finds its next job at
        // once, and everything beyond waits upstream where it can still be cancelled.
        let (jobs, rx) = flume::bounded::<Job>(spec.instance_count);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut workers = Vec::with_capacity(spec.instance_count);
        for index in 0..spec.instance_count {
            let instance = Instance {
                spec: spec.clone(),
                version_dir: version_dir.clone(),
                options,
                jobs: rx.clone(),
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
        drop(ready_tx);
        let mut failure = None;
        for _ in 0..spec.instance_count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(BackendError::InstanceGone)),
            }
        }
        let pool = InstancePool { jobs: Some(jobs), workers };
        match failure {
            None => Ok(pool),
            Some(e) => Err(e), // dropping `pool` stops and joins the instances that did load
        }
    }

    /// Run one batch on the next free instance. Waits (asynchronously) while every
    /// instance is busy and its queue slot taken.
    pub async fn execute(&self, inputs: Vec<Tensor>) -> Result<Executed, BackendError> {
        let (reply, rx) = oneshot::channel();
        let jobs = self.jobs.as_ref().ok_or(BackendError::InstanceGone)?;
        jobs.send_async(Job { inputs, reply })
            .await
            .map_err(|_| BackendError::InstanceGone)?;
        rx.await.map_err(|_| BackendError::InstanceGone)?
    }
}

impl Drop for InstancePool {
    fn drop(&mut self) {
        self.jobs.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

struct Instance {
    spec: Arc<ModelSpec>,
    version_dir: PathBuf,
    options: BackendOptions,
    jobs: flume::Receiver<Job>,
}

impl Instance {
    fn load(&self) -> Result<Box<dyn Backend>, BackendError> {
        match catch_unwind(AssertUnwindSafe(|| backend::load(&self.spec, &self.version_dir, &self.options))) {
            Ok(result) => result,
            Err(panic) => Err(BackendError::Load {
                path: self.version_dir.display().to_string(),
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
        for job in self.jobs.iter() {
            if job.reply.is_closed() {
                // The caller has gone: never start work nobody waits for.
                metrics::dropped(&self.spec.name, metrics::DropReason::Cancelled);
                continue;
            }
            let start = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| backend.forward(&job.inputs)));
            let compute = start.elapsed();
            match result {
                Ok(outputs) => {
                    let _ = job.reply.send(outputs.map(|outputs| Executed { outputs, compute }));
                }
                Err(panic) => {
                    let message = panic_message(&panic);
                    tracing::error!(model = %self.spec.name, %message, "model panicked; reloading the instance");
                    let _ = job.reply.send(Err(BackendError::Panic(message)));
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
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
