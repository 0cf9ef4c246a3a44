//! A loaded model version: validates requests against its spec, runs them on its
//! instances and checks what the model returns. This is the domain the API calls.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::admission::limit::{AdaptiveLimit, ModelShape};
use crate::admission::AdmissionConfig;
use crate::batcher::{BatchKey, Batcher, QueueLimits, Queued, Scaling};
use crate::config::{BackendOptions, ModelDefaults};
use crate::error::{clip, Error};
use crate::metrics;
use crate::pool::InstancePool;
use crate::repository::{ModelSpec, TensorSpec};
use crate::tensor::{checked_byte_size, shape_string, DataType, Tensor};

/// An inference request after protocol decoding, before validation.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub id: String,
    pub inputs: Vec<RequestInput>,
    /// Outputs to return, by name; empty means all of them.
    pub outputs: Vec<String>,
    /// Past this instant the answer is DEADLINE_EXCEEDED (from grpc-timeout).
    pub deadline: Option<Instant>,
    /// Triton's `timeout` request parameter: the request's own queue timeout, honoured
    /// when the model's queue policy allows overriding its default (and a bound on its
    /// deadline).
    pub queue_timeout: Option<Duration>,
    /// Triton's `priority` request parameter (1 the highest; 0 or absent: the model's
    /// default level).
    pub priority: Option<u64>,
    /// Set by admission: the request was admitted over the model's full limit by
    /// displacing lower-priority work, so joining the queue sheds the newest queued
    /// request of a lower level.
    pub preempt: bool,
}

#[derive(Debug, Clone)]
pub struct RequestInput {
    pub name: String,
    /// As sent by the client: checked against the model's datatype here.
    pub datatype: String,
    pub shape: Vec<i64>,
    /// Row-major little-endian bytes.
    pub data: Bytes,
}

#[derive(Debug)]
pub struct InferResponse {
    pub model: String,
    pub version: i64,
    pub id: String,
    pub outputs: Vec<(String, Tensor)>,
    /// Time the request waited in the model's queue.
    pub queue: Duration,
    /// Time the oldest request of its execution waited: how long work stood in the
    /// queue (with batching the whole queue leaves at once, so the newest request's
    /// wait says nothing about it).
    pub batch_wait: Duration,
    /// Time of the execution the request was part of.
    pub compute: Duration,
}

/// A request that fits the model: inputs in the model's argument order.
#[derive(Debug)]
pub struct Validated {
    pub inputs: Vec<Tensor>,
    /// Indices into `spec.outputs`, in the order to answer them.
    pub outputs: Vec<usize>,
    /// Samples in the request (1 for models that do not batch).
    pub batch: usize,
}

/// What every model load needs from the server configuration.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub backend: BackendOptions,
    pub defaults: ModelDefaults,
    pub admission: AdmissionConfig,
}

impl LoadOptions {
    /// The model's own `parameters` first, then the server-wide defaults; by default a
    /// model keeps all its instances.
    pub fn scaling(&self, spec: &ModelSpec) -> Scaling {
        let max = spec.instance_count;
        Scaling {
            min_instances: spec
                .scaling
                .min_instances
                .or(self.defaults.min_instances)
                .unwrap_or(max)
                .min(max),
            max_instances: max,
            idle_timeout: spec
                .scaling
                .idle_timeout
                .unwrap_or(self.defaults.idle_timeout),
            max_execution: self.defaults.max_execution,
        }
    }
}

pub struct LoadedModel {
    pub spec: Arc<ModelSpec>,
    pub version: i64,
    /// The model's concurrency limit (the admission stack takes its slots).
    pub limit: Arc<AdaptiveLimit>,
    batcher: Batcher,
    stats: Arc<Mutex<ModelStats>>,
}

impl LoadedModel {
    /// Start the model's instances (at least one, loaded and warmed up, so a broken model
    /// is found now) and its batcher. Blocking: call from `spawn_blocking` inside the
    /// Tokio runtime (the batcher is a task).
    pub fn load(
        spec: Arc<ModelSpec>,
        version: i64,
        version_dir: PathBuf,
        options: LoadOptions,
    ) -> Result<LoadedModel, String> {
        let scaling = options.scaling(&spec);
        let stats = Arc::new(Mutex::new(ModelStats::default()));
        let mut pool = InstancePool::new(spec.clone(), version_dir, options.backend, stats.clone());
        pool.start(scaling.min_instances.max(1))?;
        let batcher = Batcher::spawn(
            spec.name.clone(),
            spec.batching.clone(),
            scaling,
            QueueLimits {
                max_queue_size: spec.queue.max_queue_size,
                priority_levels: spec.queue.priority_levels,
                predict_wait: options.admission.shedding,
            },
            pool,
        );
        let limit = Arc::new(AdaptiveLimit::new(
            options.admission.model_limit,
            limit_shape(&spec),
        ));
        metrics::concurrency_limit(&spec.name, limit.limit());
        Ok(LoadedModel {
            spec,
            version,
            limit,
            batcher,
            stats,
        })
    }

    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, Error> {
        let start = Instant::now();
        let result = self.run(request, start).await;
        let mut stats = self
            .stats
            .lock()
            .expect("stats lock is never held across a panic");
        match &result {
            Ok((_, samples, queue, compute)) => {
                stats.record_success(start.elapsed(), *queue, *compute, *samples)
            }
            Err(_) => stats.record_failure(start.elapsed()),
        }
        result.map(|(response, ..)| response)
    }

    async fn run(
        &self,
        request: InferRequest,
        arrival: Instant,
    ) -> Result<(InferResponse, usize, Duration, Duration), Error> {
        let spec = &self.spec;
        let validated = validate(spec, &request)?;
        let priority = spec.queue.priority_level(request.priority);
        let queue_timeout = match request.queue_timeout {
            Some(t) if spec.queue.allow_timeout_override => Some(t),
            _ => spec.queue.default_timeout,
        }
        .filter(|_| spec.queue.reject_on_timeout);
        let expires = [request.deadline, queue_timeout.map(|t| arrival + t)]
            .into_iter()
            .flatten()
            .min();
        let (reply, answer) = oneshot::channel();
        self.batcher.submit(Queued {
            key: batch_key(spec, &validated.inputs),
            inputs: validated.inputs,
            samples: validated.batch,
            arrival,
            expires,
            deadline: request.deadline,
            priority,
            preempt: request.preempt,
            reply,
        })?;
        let gone = || Error::Restarting {
            model: spec.name.clone(),
            reason: "the model stopped".into(),
        };
        let done = match request.deadline {
            // No answer later than the deadline, even if the model is still running.
            Some(deadline) => tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| Error::DeadlineExceeded {
                    model: spec.name.clone(),
                    stage: "running",
                })?,
            None => answer.await,
        }
        .map_err(|_| gone())??;
        let mut produced: Vec<Option<Tensor>> = done.outputs.into_iter().map(Some).collect();
        let mut outputs = Vec::with_capacity(validated.outputs.len());
        for &index in &validated.outputs {
            let out_spec = &spec.outputs[index];
            let tensor = produced
                .get_mut(out_spec.position)
                .and_then(Option::take)
                .ok_or_else(|| Error::ModelFailed {
                    model: spec.name.clone(),
                    message: format!(
                        "model returned {} output(s), output '{}' is at position {}",
                        produced.len(),
                        out_spec.name,
                        out_spec.position
                    ),
                })?;
            check_output(spec, out_spec, &tensor, validated.batch)?;
            outputs.push((out_spec.name.clone(), tensor));
        }
        let response = InferResponse {
            model: spec.name.clone(),
            version: self.version,
            id: request.id,
            outputs,
            queue: done.queue,
            batch_wait: done.batch_wait,
            compute: done.compute,
        };
        Ok((response, validated.batch, done.queue, done.compute))
    }

    pub fn statistics(&self) -> ModelStats {
        self.stats
            .lock()
            .expect("stats lock is never held across a panic")
            .clone()
    }

    /// Instances (loaded or loading, idle) as the batcher last saw them.
    pub fn instances(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        let counts = &self.batcher.instances;
        (
            counts.0.load(Ordering::Acquire),
            counts.1.load(Ordering::Acquire),
        )
    }

    /// Whether every instance is stuck and none can be replaced: the model cannot serve
    /// again on its own, so the server is not live.
    pub fn is_wedged(&self) -> bool {
        self.batcher.is_wedged()
    }

    /// Requests waiting in the model's queue.
    pub fn queue_depth(&self) -> usize {
        self.batcher.depth()
    }

    /// Measured time of one execution of a single sample (scaled from other batch
    /// sizes when that size has not run); `None` before the first execution.
    pub fn unit_execution(&self) -> Option<Duration> {
        self.batcher.estimate().estimate(1)
    }
}

/// What the model's configuration makes normal for its concurrency limit: the wait for a
/// batch to form is asked for, not overload, and a queue that one round of full batches
/// clears is no backlog.
fn limit_shape(spec: &ModelSpec) -> ModelShape {
    let batch = if spec.batching.combine {
        spec.batching.max_batch_size.max(1)
    } else {
        1
    };
    ModelShape {
        batching_delay: if spec.batching.combine {
            spec.batching.max_queue_delay
        } else {
            Duration::ZERO
        },
        round: spec.instance_count.max(1).saturating_mul(batch),
    }
}

/// Requests batch together only when every input has the same datatype and non-batch
/// dimensions (models that do not batch never combine, so their key is never compared).
fn batch_key(spec: &ModelSpec, inputs: &[Tensor]) -> BatchKey {
    let skip = usize::from(spec.max_batch_size > 0);
    inputs
        .iter()
        .map(|t| (t.dtype, t.shape[skip.min(t.shape.len())..].to_vec()))
        .collect()
}

/// Check a request against the model's declared inputs and outputs.
pub fn validate(spec: &ModelSpec, request: &InferRequest) -> Result<Validated, Error> {
    let model = || spec.name.clone();
    let names = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut slots: Vec<Option<Tensor>> = vec![None; spec.inputs.len()];
    let mut batch: Option<i64> = None;
    for input in &request.inputs {
        let Some(index) = spec.inputs.iter().position(|s| s.name == input.name) else {
            return Err(Error::UnknownInput {
                model: model(),
                input: input.name.clone(),
                expected: names(&spec.inputs),
            });
        };
        let in_spec = &spec.inputs[index];
        if slots[in_spec.position].is_some() {
            return Err(Error::DuplicateInput {
                model: model(),
                input: input.name.clone(),
            });
        }
        if DataType::from_wire_name(&input.datatype) != Some(in_spec.dtype) {
            return Err(Error::WrongDatatype {
                model: model(),
                input: input.name.clone(),
                expected: in_spec.dtype,
                actual: input.datatype.clone(),
            });
        }
        let wrong_shape = || Error::WrongShape {
            model: model(),
            input: input.name.clone(),
            expected: shape_string(&spec.full_dims(&in_spec.dims)),
            actual: input.shape.clone(),
        };
        let sample_dims = if spec.max_batch_size > 0 {
            let Some((&b, rest)) = input.shape.split_first() else {
                return Err(wrong_shape());
            };
            if b < 1 {
                return Err(wrong_shape());
            }
            if b > i64::from(spec.max_batch_size) {
                return Err(Error::BatchTooLarge {
                    model: model(),
                    input: input.name.clone(),
                    max: spec.max_batch_size,
                    actual: b,
                });
            }
            if let Some(first) = batch.filter(|&first| first != b) {
                return Err(Error::InvalidRequest {
                    model: model(),
                    message: format!(
                        "input '{}' has batch size {b}, other inputs have {first}",
                        clip(&input.name)
                    ),
                });
            }
            batch = Some(b);
            rest
        } else {
            &input.shape[..]
        };
        let fits = sample_dims.len() == in_spec.dims.len()
            && sample_dims
                .iter()
                .zip(&in_spec.dims)
                .all(|(&got, &want)| got >= 0 && (want == -1 || got == want));
        if !fits {
            return Err(wrong_shape());
        }
        // Every dim is a size by now, but their product is the client's: checked, so a
        // shape like [2**32, 2**32] cannot wrap to a small size that empty data matches.
        let expected =
            checked_byte_size(&input.shape, in_spec.dtype).map_err(|e| Error::InvalidRequest {
                model: model(),
                message: format!(
                    "input '{}' has shape {}: {e}",
                    clip(&input.name),
                    shape_string(&input.shape)
                ),
            })?;
        if input.data.len() != expected {
            return Err(Error::WrongByteSize {
                model: model(),
                input: input.name.clone(),
                expected,
                actual: input.data.len(),
                detail: format!("shape {} of {}", shape_string(&input.shape), in_spec.dtype),
            });
        }
        slots[in_spec.position] = Some(Tensor::new(
            in_spec.dtype,
            input.shape.clone(),
            input.data.clone(),
        ));
    }
    let mut inputs = Vec::with_capacity(slots.len());
    for (slot, position) in slots.into_iter().zip(0..) {
        match slot {
            Some(t) => inputs.push(t),
            None => {
                let missing = spec
                    .inputs
                    .iter()
                    .find(|s| s.position == position)
                    .expect("positions are 0..n");
                return Err(Error::MissingInput {
                    model: model(),
                    input: missing.name.clone(),
                });
            }
        }
    }
    let outputs = if request.outputs.is_empty() {
        (0..spec.outputs.len()).collect()
    } else {
        let mut chosen = Vec::with_capacity(request.outputs.len());
        for name in &request.outputs {
            let Some(index) = spec.outputs.iter().position(|s| &s.name == name) else {
                return Err(Error::UnknownOutput {
                    model: model(),
                    output: name.clone(),
                    expected: names(&spec.outputs),
                });
            };
            if chosen.contains(&index) {
                return Err(Error::InvalidRequest {
                    model: model(),
                    message: format!("output '{}' requested more than once", clip(name)),
                });
            }
            chosen.push(index);
        }
        chosen
    };
    let batch = usize::try_from(batch.unwrap_or(1)).expect("batch was checked to be positive");
    Ok(Validated {
        inputs,
        outputs,
        batch,
    })
}

/// A model that returns the wrong type or shape fails its request with INTERNAL.
fn check_output(
    spec: &ModelSpec,
    out: &TensorSpec,
    tensor: &Tensor,
    batch: usize,
) -> Result<(), Error> {
    let fail = |message: String| Error::ModelFailed {
        model: spec.name.clone(),
        message,
    };
    if tensor.dtype != out.dtype {
        return Err(fail(format!(
            "output '{}' has datatype {}, config declares {}",
            out.name, tensor.dtype, out.dtype
        )));
    }
    let sample_dims = if spec.max_batch_size > 0 {
        match tensor.shape.split_first() {
            Some((&b, rest)) if usize::try_from(b) == Ok(batch) => rest,
            _ => {
                return Err(fail(format!(
                    "output '{}' has shape {}, expected batch size {batch} first",
                    out.name,
                    shape_string(&tensor.shape)
                )))
            }
        }
    } else {
        &tensor.shape[..]
    };
    let fits = sample_dims.len() == out.dims.len()
        && sample_dims
            .iter()
            .zip(&out.dims)
            .all(|(&g, &w)| w == -1 || g == w);
    if !fits {
        return Err(fail(format!(
            "output '{}' has shape {}, config declares {}",
            out.name,
            shape_string(&tensor.shape),
            shape_string(&spec.full_dims(&out.dims))
        )));
    }
    Ok(())
}

/// Counts and cumulative durations as the ModelStatistics RPC reports them.
#[derive(Debug, Clone, Default)]
pub struct ModelStats {
    pub inference_count: u64,
    pub execution_count: u64,
    /// Milliseconds since the epoch of the last inference; 0 if none.
    pub last_inference_ms: u64,
    pub success: Tally,
    pub fail: Tally,
    pub queue: Tally,
    pub compute_infer: Tally,
    /// Executions and their compute time per batch size seen.
    pub batches: std::collections::BTreeMap<u64, Tally>,
}

/// A count and a total duration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub count: u64,
    pub total: Duration,
}

impl Tally {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total += d;
    }
}

impl ModelStats {
    fn record_success(
        &mut self,
        total: Duration,
        queue: Duration,
        compute: Duration,
        samples: usize,
    ) {
        self.inference_count += samples as u64;
        self.success.add(total);
        self.queue.add(queue);
        self.compute_infer.add(compute);
        self.touch();
    }

    fn record_failure(&mut self, total: Duration) {
        self.fail.add(total);
        self.touch();
    }

    /// One execution of the model on a batch of `samples`.
    pub fn record_execution(&mut self, samples: usize, compute: Duration) {
        self.execution_count += 1;
        self.batches.entry(samples as u64).or_default().add(compute);
    }

    fn touch(&mut self) {
        self.last_inference_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
    }
}
