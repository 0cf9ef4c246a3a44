//! A loaded model version: validates requests against its spec, runs them on its
//! instances and checks what the model returns. This is the domain the API calls.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::batcher::{BatchKey, Batcher, QueueLimits, Queued, Scaling};
use crate::config::AdmissionConfig;
use crate::config::{BackendOptions, ModelDefaults};
use crate::error::{clip, Error, LoadError};
use crate::limit::{AdaptiveLimit, ModelShape, Permit};
use crate::metrics;
use crate::pool::InstancePool;
use crate::spec::{ModelSpec, TensorSpec};
use crate::stats::ModelStats;
use crate::tensor::{checked_byte_size, shape_string, DataType, Tensor};

/// An inference request after protocol decoding, before validation.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub id: String,
    pub inputs: Vec<RequestInput>,
    /// Outputs to return, by name; empty means all of them.
    pub outputs: Vec<String>,
    /// Triton's `timeout` request parameter: the request's own queue timeout, honoured
    /// when the model's queue policy allows overriding its default (and a bound on its
    /// deadline).
    pub queue_timeout: Option<Duration>,
    /// Triton's `priority` request parameter (1 the highest; 0 or absent: the model's
    /// default level).
    pub priority: Option<u64>,
}

/// What admission decided for one request, once: the model version it runs on, its
/// absolute deadline, its priority level and its slot under that version's concurrency
/// limit. It travels with the request into the model's queue; the slot is given back
/// when the request is answered (the admission dropped).
pub struct Admission {
    pub model: Arc<LoadedModel>,
    /// `None`: the request may run as long as it takes.
    pub deadline: Option<Instant>,
    /// Priority level, 1 the highest, within the model's levels.
    pub level: u32,
    /// `None` with load shedding off (no limit to take a slot of).
    pub permit: Option<Permit>,
}

impl Admission {
    /// Admitted over the model's full limit by displacing lower-priority work: joining
    /// the queue sheds the newest queued request of a lower level.
    pub fn preempts(&self) -> bool {
        self.permit.as_ref().is_some_and(Permit::preempts)
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("model", &self.model.spec.name)
            .field("version", &self.model.version)
            .field("deadline", &self.deadline)
            .field("level", &self.level)
            .field("permit", &self.permit)
            .finish()
    }
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
    /// The part of it beyond the batch the configuration asked for (see
    /// [`crate::work::Done::excess`]).
    pub excess: Duration,
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
    ) -> Result<LoadedModel, LoadError> {
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

    /// Run `request` on this version, as `admission` decided (its deadline, level and
    /// slot). The deadline's timer is admission's: past it, this future is dropped.
    pub async fn infer(
        &self,
        request: InferRequest,
        admission: Admission,
    ) -> Result<InferResponse, Error> {
        let start = Instant::now();
        let result = self.run(request, &admission, start).await;
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
        admission: &Admission,
        arrival: Instant,
    ) -> Result<(InferResponse, usize, Duration, Duration), Error> {
        let spec = &self.spec;
        let validated = validate(spec, &request)?;
        let queue_timeout = match request.queue_timeout {
            Some(t) if spec.queue.allow_timeout_override => Some(t),
            _ => spec.queue.default_timeout,
        }
        .filter(|_| spec.queue.reject_on_timeout);
        let expires = [admission.deadline, queue_timeout.map(|t| arrival + t)]
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
            deadline: admission.deadline,
            priority: admission.level,
            preempt: admission.preempts(),
            reply,
        })?;
        let done = answer.await.map_err(|_| Error::Restarting {
            model: spec.name.clone(),
            reason: "the model stopped".into(),
        })??;
        let outputs = self.answered_outputs(done.outputs, &validated.outputs, validated.batch)?;
        let response = InferResponse {
            model: spec.name.clone(),
            version: self.version,
            id: request.id,
            outputs,
            queue: done.queue,
            batch_wait: done.batch_wait,
            compute: done.compute,
            excess: done.excess,
        };
        Ok((response, validated.batch, done.queue, done.compute))
    }

    /// The outputs the request asked for, by name, each checked against its
    /// declaration: a model that returns too few outputs, or the wrong type or shape,
    /// fails the request.
    fn answered_outputs(
        &self,
        produced: Vec<Tensor>,
        wanted: &[usize],
        batch: usize,
    ) -> Result<Vec<(String, Tensor)>, Error> {
        let spec = &self.spec;
        let mut produced: Vec<Option<Tensor>> = produced.into_iter().map(Some).collect();
        let mut outputs = Vec::with_capacity(wanted.len());
        for &index in wanted {
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
            check_output(spec, out_spec, &tensor, batch)?;
            outputs.push((out_spec.name.clone(), tensor));
        }
        Ok(outputs)
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
        batching_delay: spec.batching.batching_delay(),
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
    let mut slots: Vec<Option<Tensor>> = vec![None; spec.inputs.len()];
    let mut batch: Option<i64> = None;
    for input in &request.inputs {
        let declared = spec.inputs.iter().find(|s| s.name == input.name);
        if declared.is_some_and(|s| slots[s.position].is_some()) {
            return Err(Error::DuplicateInput {
                model: spec.name.clone(),
                input: input.name.clone(),
            });
        }
        let (position, tensor) = validate_input(spec, input, &mut batch)?;
        slots[position] = Some(tensor);
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
                    model: spec.name.clone(),
                    input: missing.name.clone(),
                });
            }
        }
    }
    let outputs = requested_outputs(spec, &request.outputs)?;
    let batch = usize::try_from(batch.unwrap_or(1)).expect("batch was checked to be positive");
    Ok(Validated {
        inputs,
        outputs,
        batch,
    })
}

fn tensor_names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One input checked against its declaration: its position in the model's arguments
/// and the tensor. `batch` is the batch size of the inputs seen so far.
fn validate_input(
    spec: &ModelSpec,
    input: &RequestInput,
    batch: &mut Option<i64>,
) -> Result<(usize, Tensor), Error> {
    let model = || spec.name.clone();
    let Some(index) = spec.inputs.iter().position(|s| s.name == input.name) else {
        return Err(Error::UnknownInput {
            model: model(),
            input: input.name.clone(),
            expected: tensor_names(&spec.inputs),
        });
    };
    let in_spec = &spec.inputs[index];
    if DataType::from_wire_name(&input.datatype) != Some(in_spec.dtype) {
        return Err(Error::WrongDatatype {
            model: model(),
            input: input.name.clone(),
            expected: in_spec.dtype,
            actual: input.datatype.clone(),
        });
    }
    check_shape(spec, in_spec, input, batch)?;
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
    let tensor = Tensor::new(in_spec.dtype, input.shape.clone(), input.data.clone());
    Ok((in_spec.position, tensor))
}

/// The input's shape against its declaration: a batch dimension within
/// `max_batch_size` and equal to the other inputs' (when the model batches), then the
/// declared dims, `-1` matching any size.
fn check_shape(
    spec: &ModelSpec,
    in_spec: &TensorSpec,
    input: &RequestInput,
    batch: &mut Option<i64>,
) -> Result<(), Error> {
    let model = || spec.name.clone();
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
        *batch = Some(b);
        rest
    } else {
        &input.shape[..]
    };
    let fits = sample_dims.len() == in_spec.dims.len()
        && sample_dims
            .iter()
            .zip(&in_spec.dims)
            .all(|(&got, &want)| got >= 0 && (want == -1 || got == want));
    if fits {
        Ok(())
    } else {
        Err(wrong_shape())
    }
}

/// Indices into `spec.outputs` in the order asked (all of them when none is named).
fn requested_outputs(spec: &ModelSpec, requested: &[String]) -> Result<Vec<usize>, Error> {
    if requested.is_empty() {
        return Ok((0..spec.outputs.len()).collect());
    }
    let mut chosen = Vec::with_capacity(requested.len());
    for name in requested {
        let Some(index) = spec.outputs.iter().position(|s| &s.name == name) else {
            return Err(Error::UnknownOutput {
                model: spec.name.clone(),
                output: name.clone(),
                expected: tensor_names(&spec.outputs),
            });
        };
        if chosen.contains(&index) {
            return Err(Error::InvalidRequest {
                model: spec.name.clone(),
                message: format!("output '{}' requested more than once", clip(name)),
            });
        }
        chosen.push(index);
    }
    Ok(chosen)
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
