//! One instance's thread: load, warm up, then run the batches it is handed; a panic
//! fails only its batch and the backend reloads.

use super::*;

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Join instance threads (whose job channels are closed, so they stop after their
/// current batch) without blocking an async worker.
pub(super) fn join_in_background(threads: Vec<JoinHandle<()>>) {
    if threads.is_empty() {
        return;
    }
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
pub(super) fn release_free_memory() {
    // SAFETY: malloc_trim only returns unused pages of the allocator's own arenas; it
    // takes no pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn release_free_memory() {}

pub(super) struct Worker {
    pub(super) id: usize,
    pub(super) spec: Arc<ModelSpec>,
    pub(super) loader: Loader,
    pub(super) warmup: Arc<[WarmupSample]>,
    pub(super) jobs: std::sync::mpsc::Receiver<Job>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) stats: Arc<Mutex<ModelStats>>,
    pub(super) estimate: Arc<ComputeEstimate>,
}

impl Worker {
    pub(super) fn load(&self) -> Result<Box<dyn Backend>, LoadError> {
        match catch_unwind(AssertUnwindSafe(|| (self.loader)())) {
            Ok(result) => result.map_err(|e| LoadError::Backend(e.to_string())),
            Err(panic) => Err(LoadError::LoaderPanicked(panic_message(&panic))),
        }
    }

    /// Run every warm-up sample; a model that fails its warm-up never reports ready.
    pub(super) fn warm_up(&self, backend: &mut dyn Backend) -> Result<(), LoadError> {
        for sample in self.warmup.iter() {
            for _ in 0..sample.count.max(1) {
                match catch_unwind(AssertUnwindSafe(|| backend.forward(&sample.inputs))) {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        return Err(LoadError::WarmupFailed {
                            sample: sample.name.clone(),
                            message: e.to_string(),
                        })
                    }
                    Err(panic) => {
                        return Err(LoadError::WarmupPanicked {
                            sample: sample.name.clone(),
                            message: panic_message(&panic),
                        })
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn load_and_warm_up(
        &self,
    ) -> Result<(Box<dyn Backend>, Duration, Duration), LoadError> {
        let start = Instant::now();
        let mut backend = self.load()?;
        let load = start.elapsed();
        let start = Instant::now();
        self.warm_up(backend.as_mut())?;
        Ok((backend, load, start.elapsed()))
    }

    pub(super) fn run(self) {
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
                tracing::error!(model = %self.spec.name, reason = %reason, "instance failed to load");
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
    pub(super) fn execute(&self, backend: &mut dyn Backend, job: Job) -> Result<(), String> {
        let model = &self.spec.name;
        let tasks = live_tasks(model, job);
        if tasks.is_empty() {
            return Ok(());
        }
        let sizes: Vec<usize> = tasks.iter().map(|t| t.samples).collect();
        let total: usize = sizes.iter().sum();
        let inputs: Vec<Tensor> = (0..tasks[0].inputs.len())
            .map(|i| concat_batch(&tasks.iter().map(|t| &t.inputs[i]).collect::<Vec<_>>()))
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

        let outputs = match result {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                self.fail(tasks, e.to_string());
                return Ok(());
            }
            Err(panic) => {
                let message = panic_message(&panic);
                self.fail(tasks, BackendError::Panic(message.clone()).to_string());
                return Err(message);
            }
        };
        let per_request = match per_request(outputs, &sizes) {
            Ok(split) => split,
            Err(message) => {
                self.fail(tasks, message);
                return Ok(());
            }
        };
        let batch_wait = tasks.iter().map(|t| t.queue_time).max().unwrap_or_default();
        let excess = self.excess(&tasks, total, batch_wait);
        for (t, outputs) in tasks.into_iter().zip(per_request) {
            t.reply.send(Ok(Done {
                outputs,
                queue: t.queue_time,
                batch_wait,
                compute,
                excess,
                batch_size: total,
            }));
        }
        Ok(())
    }

    /// The execution time of a batch of `total` beyond that of the samples the model's
    /// batching delay gathered with its oldest request (which waited `batch_wait`):
    /// time the oldest request spent on work that joined it only because work stood
    /// in the queue. With no delay, that is everything but the oldest request's own
    /// samples.
    fn excess(&self, tasks: &[Task], total: usize, batch_wait: Duration) -> Duration {
        let delay = self.spec.batching.batching_delay();
        let gathered: usize = tasks
            .iter()
            .filter(|t| t.queue_time.saturating_add(delay) >= batch_wait)
            .map(|t| t.samples)
            .sum();
        self.estimate.beyond_gathered(total, gathered)
    }

    /// Answer every task of a failed execution. After a stuck execution the watchdog has
    /// answered already: these sends find nobody and do nothing.
    fn fail(&self, tasks: Vec<Task>, message: String) {
        for t in tasks {
            t.reply.send(Err(Error::ModelFailed {
                model: self.spec.name.clone(),
                message: message.clone(),
            }));
        }
    }
}

/// The job's tasks whose client still waits: clients may have left between dispatch and
/// now, and their work is skipped (counted as cancelled).
fn live_tasks(model: &str, job: Job) -> Vec<Task> {
    job.tasks
        .into_iter()
        .filter(|t| {
            let gone = t.reply.is_closed();
            if gone {
                metrics::dropped(model, DropReason::Cancelled);
            }
            !gone
        })
        .collect()
}

/// Per request, its slice of every output (`sizes`: each request's samples); a lone
/// request keeps the tensors as they are.
fn per_request(outputs: Vec<Tensor>, sizes: &[usize]) -> Result<Vec<Vec<Tensor>>, String> {
    if sizes.len() == 1 {
        return Ok(vec![outputs]);
    }
    let mut split = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.iter().enumerate() {
        split.push(split_batch(out, sizes).map_err(|e| format!("output {i}: {e}"))?);
    }
    Ok((0..sizes.len())
        .map(|r| split.iter().map(|parts| parts[r].clone()).collect())
        .collect())
}

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
