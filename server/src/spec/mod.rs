//! `config.pbtxt`: parse Triton's `ModelConfig` from protobuf text format (against our
//! own copy of its schema, so any valid Triton config parses), or from the JSON a
//! RepositoryModelLoad `config` parameter carries, and turn it into the [`ModelSpec`] the
//! server runs with. Every rejection names the file and the reason.
//!
//! A config is untrusted input: every value that sizes memory, threads or work is bounded
//! here, with checked arithmetic, before anything is allocated or spawned. Bounds an
//! operator may need to raise come from [`ModelLimits`] (settings); the others are the
//! `MAX_*` constants below.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use std::time::Duration;

use prost_reflect::{DescriptorPool, DynamicMessage};
use sluice_proto::inference::{
    model_config::SchedulingChoice, model_instance_group, model_queue_policy, model_version_policy,
    model_warmup, DataType as ConfigDataType, ModelConfig, ModelDynamicBatching, ModelInput,
    ModelOutput,
};

use crate::config::ModelLimits;
use crate::tensor::{shape_string, DataType, Tensor};

mod parse;
mod scheduling;
#[cfg(test)]
mod tests;
pub mod torch_params;
mod warmup;

pub(crate) use parse::descriptor_pool;
pub use parse::{
    clip, config_dtype_name, load_spec, load_spec_with, parse_json, parse_text, spec_from_config,
    spec_from_config_with,
};
use parse::{config_dtype, read_bounded};
use scheduling::{scheduling, tensor_specs, InputOrOutput};
use warmup::{tensor_bytes, warmup_samples};

/// Queue bound for models whose config sets no `max_queue_size` (Triton's 0, unbounded):
/// every queue is bounded so that overload is answered, not buffered.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1024;
/// Most priority levels a model may declare (each level has its own share of the model's
/// concurrency limit and its own queue counters).
pub const MAX_PRIORITY_LEVELS: u32 = 16;
/// Largest config.pbtxt (or `config` load parameter) read: real configs are a few KiB,
/// and every list in one is bounded by its size.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Largest `max_batch_size`: the batcher forms batches up to it and the default warm-up
/// runs it. Far above what a real model batches.
pub const MAX_BATCH_SIZE: u32 = 1 << 16;
/// Most inputs, and most outputs, one model may declare.
pub const MAX_MODEL_TENSORS: usize = 256;
/// Most dimensions of a declared tensor or warm-up input (libtorch allows 64).
pub const MAX_TENSOR_RANK: usize = 32;
/// Largest `max_queue_size`: the model's queue and its channel are sized by it.
pub const MAX_QUEUE_SIZE: u64 = 1 << 20;
/// Longest `max_queue_delay_microseconds` and `default_timeout_microseconds`: one day,
/// so that adding either to a point in time can never overflow.
pub const MAX_QUEUE_TIME_MICROS: u64 = 24 * 3600 * 1_000_000;
/// Most `preferred_batch_size` entries (each is also a default warm-up sample).
pub const MAX_PREFERRED_BATCH_SIZES: usize = 32;
/// Most `model_warmup` samples, and most runs (`count`) of one sample.
pub const MAX_WARMUP_SAMPLES: usize = 64;
pub const MAX_WARMUP_COUNT: u32 = 1000;
/// Most entries in `parameters`, and most bytes of one key and value together.
pub const MAX_PARAMETERS: usize = 256;
pub const MAX_PARAMETER_BYTES: usize = 4096;
/// Folder of a model's warm-up data files; `input_data_file` names stay inside it.
pub const WARMUP_DIR: &str = "warmup";

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

impl BatchPolicy {
    /// The wait the configuration asks of a request so that a batch can form:
    /// `max_queue_delay` when requests are combined, else zero.
    pub fn batching_delay(&self) -> Duration {
        if self.combine {
            self.max_queue_delay
        } else {
            Duration::ZERO
        }
    }
}

/// A warm-up sample: inputs in model argument order, run `count` times.
#[derive(Debug, Clone)]
pub struct WarmupSample {
    pub name: String,
    pub inputs: Vec<Tensor>,
    pub count: u32,
}

/// The queue policy (`dynamic_batching.default_queue_policy`), applied to every request.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub max_queue_size: usize,
    /// Longest time a request may wait in the queue; `None`: only its deadline bounds it.
    pub default_timeout: Option<Duration>,
    /// Whether a request's `timeout` parameter replaces `default_timeout`.
    pub allow_timeout_override: bool,
    /// `timeout_action: REJECT` (the default): a request past its queue timeout is
    /// answered DEADLINE_EXCEEDED. `DELAY`: the timeout is ignored, the request stays.
    pub reject_on_timeout: bool,
    /// `priority_levels`: requests carry a level 1 (highest) ..= this; at least 1.
    pub priority_levels: u32,
    /// `default_priority_level`: the level of a request that sends no `priority` (or 0).
    pub default_priority_level: u32,
}

impl QueueSettings {
    /// The level a request runs at for its `priority` parameter. As in Triton, 0, an
    /// absent parameter and a level beyond the configured ones all mean the default
    /// level (a client that sends priorities works unchanged against a model without
    /// them).
    pub fn priority_level(&self, requested: Option<u64>) -> u32 {
        match requested {
            Some(p) if p >= 1 && p <= u64::from(self.priority_levels) => p as u32,
            _ => self.default_priority_level,
        }
    }
}

/// How an instance of the model executes.
#[derive(Debug, Clone, PartialEq)]
pub enum Platform {
    /// TorchScript through libtorch: platform `pytorch_libtorch` or backend `pytorch`.
    Torch,
    /// In-process stand-in (backend `sluice_synthetic`) for tests and overhead benchmarks.
    Synthetic,
}

/// Where instances run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// KIND_AUTO: a GPU when libtorch sees one, else the CPU.
    Auto,
    Cpu,
    Gpu(i32),
}

/// One declared input or output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    /// Dimensions without the batch dimension; -1 is "any size".
    pub dims: Vec<i64>,
    /// Position in the model's forward arguments (inputs) or result tuple (outputs).
    pub position: usize,
}

/// Which versions of a model to serve.
#[derive(Debug, Clone, PartialEq)]
pub enum VersionPolicy {
    Latest(usize),
    All,
    Specific(Vec<i64>),
}

/// A model's configuration, validated.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub platform: Platform,
    /// 0: the model does not batch, shapes are given in full.
    pub max_batch_size: u32,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub instance_count: usize,
    pub device: DeviceKind,
    pub version_policy: VersionPolicy,
    pub model_filename: String,
    pub batching: BatchPolicy,
    pub queue: QueueSettings,
    /// Run by every new instance before it reports ready.
    pub warmup: Vec<WarmupSample>,
    pub scaling: ScalingParams,
    /// Triton's PyTorch backend parameters.
    pub torch: torch_params::TorchParams,
    /// The config's `parameters` map (gateway-only settings live here).
    pub parameters: BTreeMap<String, String>,
    /// The config as parsed, with defaults filled in, for the ModelConfig RPC.
    pub config: ModelConfig,
}

impl ModelSpec {
    /// Full request shape of an input for display: `[-1, 64]` when batching.
    pub fn full_dims(&self, dims: &[i64]) -> Vec<i64> {
        if self.max_batch_size > 0 {
            std::iter::once(-1).chain(dims.iter().copied()).collect()
        } else {
            dims.to_vec()
        }
    }
}

/// Why a model's configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigFileError {
    pub path: PathBuf,
    pub message: String,
}

/// Per-model instance scaling from the config's `parameters` (gateway-only settings):
/// `min_instances` (0 allows scale to zero) and `idle_timeout_secs`. Unset values take the
/// server-wide defaults when the model loads.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ScalingParams {
    pub min_instances: Option<usize>,
    pub idle_timeout: Option<Duration>,
}

impl ScalingParams {
    fn from_parameters(
        config: &ModelConfig,
        instance_count: usize,
    ) -> Result<ScalingParams, String> {
        let get = |key: &str| {
            config
                .parameters
                .get(key)
                .map(|p| p.string_value.trim().to_owned())
        };
        let min_instances = match get("min_instances") {
            None => None,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n <= instance_count => Some(n),
                _ => return Err(format!("parameter min_instances '{v}' must be a whole number from 0 to instance_group count {instance_count}")),
            },
        };
        let idle_timeout = match get("idle_timeout_secs") {
            None => None,
            Some(v) => match v
                .parse::<f64>()
                .map_err(|e| e.to_string())
                .and_then(crate::config::idle_timeout)
            {
                Ok(timeout) => Some(timeout),
                Err(e) => return Err(format!("parameter idle_timeout_secs '{}': {e}", clip(&v))),
            },
        };
        Ok(ScalingParams {
            min_instances,
            idle_timeout,
        })
    }
}
