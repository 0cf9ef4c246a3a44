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

use crate::batcher::BatchPolicy;
use crate::config::ModelLimits;
use crate::pool::WarmupSample;
use crate::tensor::{shape_string, DataType, Tensor};

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
    pub torch: super::torch_params::TorchParams,
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

fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(sluice_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set compiled into sluice-proto is valid")
    })
}

/// Parse protobuf text format into a `ModelConfig`.
pub fn parse_text(text: &str) -> Result<ModelConfig, String> {
    let descriptor = descriptor_pool()
        .get_message_by_name(sluice_proto::MODEL_CONFIG_MESSAGE)
        .expect("ModelConfig is part of the compiled descriptor set");
    let text = colon_before_lists(text);
    let dynamic =
        DynamicMessage::parse_text_format(descriptor, &text).map_err(|e| e.to_string())?;
    dynamic
        .transcode_to::<ModelConfig>()
        .map_err(|e| e.to_string())
}

/// Parse a `ModelConfig` from protobuf's JSON mapping, as Triton's RepositoryModelLoad
/// `config` parameter carries it (field names as in the .proto or in lowerCamelCase;
/// unknown fields are an error, as in Triton).
pub fn parse_json(text: &str) -> Result<ModelConfig, String> {
    if u64::try_from(text.len()).map_or(true, |n| n > MAX_CONFIG_BYTES) {
        return Err(format!(
            "is {} bytes long, above {MAX_CONFIG_BYTES}",
            text.len()
        ));
    }
    let descriptor = descriptor_pool()
        .get_message_by_name(sluice_proto::MODEL_CONFIG_MESSAGE)
        .expect("ModelConfig is part of the compiled descriptor set");
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let dynamic =
        DynamicMessage::deserialize(descriptor, &mut deserializer).map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    dynamic
        .transcode_to::<ModelConfig>()
        .map_err(|e| e.to_string())
}

/// Text format lets a list of messages follow its field name without a colon
/// (`input [ { ... } ]`), and nearly every Triton config is written that way; the parser
/// we use wants `input: [ ... ]`. Insert the colon where a field name is directly
/// followed by `[`, leaving strings and comments untouched.
fn colon_before_lists(text: &str) -> std::borrow::Cow<'_, str> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    let mut last_token_is_name = false; // the previous token was an identifier
    let mut ident = String::new();
    let mut changed = false;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c {
                        break;
                    }
                }
                last_token_is_name = false;
            }
            '#' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '[' => {
                if last_token_is_name {
                    out.push(':');
                    changed = true;
                }
                out.push(c);
                last_token_is_name = false;
            }
            c if c.is_alphanumeric() || c == '_' || c == '.' => {
                ident.push(c);
                out.push(c);
                if !chars
                    .peek()
                    .is_some_and(|n| n.is_alphanumeric() || *n == '_' || *n == '.')
                {
                    last_token_is_name = ident.starts_with(|f: char| f.is_alphabetic() || f == '_');
                    ident.clear();
                }
            }
            c if c.is_whitespace() => out.push(c),
            c => {
                out.push(c);
                last_token_is_name = false;
            }
        }
    }
    if changed {
        std::borrow::Cow::Owned(out)
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Parse and validate `path`, the config of the model in its parent directory, with the
/// default [`ModelLimits`].
pub fn load_spec(path: PathBuf) -> Result<ModelSpec, ConfigFileError> {
    load_spec_with(path, &ModelLimits::default())
}

/// Parse and validate `path`, the config of the model in its parent directory.
pub fn load_spec_with(path: PathBuf, limits: &ModelLimits) -> Result<ModelSpec, ConfigFileError> {
    let fail = |message: String| ConfigFileError {
        path: path.clone(),
        message,
    };
    let text =
        read_bounded(&path, MAX_CONFIG_BYTES).map_err(|e| fail(format!("cannot read: {e}")))?;
    let text = String::from_utf8(text).map_err(|_| fail("is not UTF-8 text".to_owned()))?;
    let config =
        parse_text(&text).map_err(|e| fail(format!("invalid protobuf text format: {e}")))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    spec_from_config_with(config, dir, limits).map_err(fail)
}

/// The whole of a regular file of at most `max` bytes. The size is checked on the opened
/// file before reading, and the read stops at `max` whatever the file does meanwhile.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() > max {
        return Err(format!("{} bytes, above the limit of {max}", meta.len()));
    }
    let mut data = Vec::new();
    file.take(max)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    Ok(data)
}

/// Validate a parsed config with the default [`ModelLimits`].
pub fn spec_from_config(
    config: ModelConfig,
    model_dir: impl AsRef<Path>,
) -> Result<ModelSpec, String> {
    spec_from_config_with(config, model_dir, &ModelLimits::default())
}

/// Validate a parsed config. `model_dir` is the model's directory, whose name names the
/// model (warm-up data files are read from its `warmup/` folder).
pub fn spec_from_config_with(
    mut config: ModelConfig,
    model_dir: impl AsRef<Path>,
    limits: &ModelLimits,
) -> Result<ModelSpec, String> {
    let model_dir = model_dir.as_ref();
    let dir_name = model_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if config.name.is_empty() {
        config.name = dir_name.to_owned();
    } else if config.name != dir_name {
        return Err(format!(
            "name '{}' does not match the model directory '{dir_name}'",
            config.name
        ));
    }
    let platform = match (config.platform.as_str(), config.backend.as_str()) {
        ("pytorch_libtorch", "" | "pytorch") | ("", "pytorch") => Platform::Torch,
        ("", "sluice_synthetic") => Platform::Synthetic,
        ("", "") => return Err("neither platform nor backend is set (expected platform \"pytorch_libtorch\")".into()),
        (platform, backend) => {
            return Err(format!(
                "unsupported platform '{platform}' / backend '{backend}' (supported: platform \"pytorch_libtorch\" or backend \"pytorch\")"
            ))
        }
    };
    if platform == Platform::Torch {
        config.platform = "pytorch_libtorch".into();
        config.backend = "pytorch".into();
    }
    let max_batch_size = u32::try_from(config.max_batch_size)
        .map_err(|_| format!("max_batch_size {} is negative", config.max_batch_size))?;
    if max_batch_size > MAX_BATCH_SIZE {
        return Err(format!(
            "max_batch_size {max_batch_size} is above the largest supported, {MAX_BATCH_SIZE}"
        ));
    }
    if config.input.is_empty() {
        return Err("no input declared".into());
    }
    if config.output.is_empty() {
        return Err("no output declared".into());
    }
    for (what, n) in [
        ("input", config.input.len()),
        ("output", config.output.len()),
    ] {
        if n > MAX_MODEL_TENSORS {
            return Err(format!(
                "{n} {what}s declared, more than the {MAX_MODEL_TENSORS} supported"
            ));
        }
    }
    let inputs = tensor_specs("input", config.input.iter().map(InputOrOutput::Input))?;
    let outputs = tensor_specs("output", config.output.iter().map(InputOrOutput::Output))?;
    for (what, spec) in inputs
        .iter()
        .map(|s| ("input", s))
        .chain(outputs.iter().map(|s| ("output", s)))
    {
        // The largest tensor the declaration allows (a full batch, each -1 as 1) must be
        // countable: request validation multiplies the same numbers.
        let batch = usize::try_from(max_batch_size.max(1)).ok();
        if batch
            .and_then(|b| tensor_bytes(spec.dtype, &spec.dims)?.checked_mul(b))
            .and_then(|b| i64::try_from(b).ok())
            .is_none()
        {
            return Err(format!(
                "{what} '{}': dims {} of {} at max_batch_size {max_batch_size} describe more bytes than can be addressed",
                spec.name,
                shape_string(&spec.dims),
                spec.dtype
            ));
        }
    }
    if config.parameters.len() > MAX_PARAMETERS {
        return Err(format!(
            "{} parameters, more than the {MAX_PARAMETERS} supported",
            config.parameters.len()
        ));
    }
    if let Some((key, _)) = config
        .parameters
        .iter()
        .find(|(k, v)| k.len().saturating_add(v.string_value.len()) > MAX_PARAMETER_BYTES)
    {
        return Err(format!(
            "parameter '{}' is longer than {MAX_PARAMETER_BYTES} bytes (key and value)",
            clip(key)
        ));
    }

    let mut instance_count = 0usize;
    let mut device = DeviceKind::Cpu;
    if config.instance_group.is_empty() {
        config
            .instance_group
            .push(sluice_proto::inference::ModelInstanceGroup {
                name: config.name.clone(),
                count: 1,
                kind: model_instance_group::Kind::Cpu as i32,
                ..Default::default()
            });
    }
    for (i, group) in config.instance_group.iter_mut().enumerate() {
        if group.count < 0 {
            return Err(format!(
                "instance_group[{i}].count {} is negative",
                group.count
            ));
        }
        if group.count == 0 {
            group.count = 1;
        }
        if group.name.is_empty() {
            group.name = format!("{}_{i}", config.name);
        }
        // Each instance is a thread with its own copy of the weights: bounded before any
        // exists, summed with checked arithmetic so no count can wrap below the bound.
        instance_count = usize::try_from(group.count)
            .ok()
            .and_then(|n| instance_count.checked_add(n))
            .filter(|&n| n <= limits.max_model_instances)
            .ok_or_else(|| {
                format!(
                    "instance_group asks for more than max_model_instances {} instances (instance_group[{i}].count {})",
                    limits.max_model_instances, group.count
                )
            })?;
        if let Some(gpu) = group.gpus.iter().find(|&&g| g < 0) {
            return Err(format!(
                "instance_group[{i}].gpus lists device {gpu}, which is negative"
            ));
        }
        device = match model_instance_group::Kind::try_from(group.kind) {
            Ok(model_instance_group::Kind::Cpu) => DeviceKind::Cpu,
            Ok(model_instance_group::Kind::Gpu) => {
                DeviceKind::Gpu(group.gpus.first().copied().unwrap_or(0))
            }
            Ok(model_instance_group::Kind::Auto | model_instance_group::Kind::Model) => {
                DeviceKind::Auto
            }
            Err(_) => {
                return Err(format!(
                    "instance_group[{i}].kind {} is unknown",
                    group.kind
                ))
            }
        };
    }

    let version_policy = match config
        .version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.as_ref())
    {
        None => VersionPolicy::Latest(1),
        Some(model_version_policy::PolicyChoice::Latest(l)) => {
            VersionPolicy::Latest(l.num_versions.max(1) as usize)
        }
        Some(model_version_policy::PolicyChoice::All(_)) => VersionPolicy::All,
        Some(model_version_policy::PolicyChoice::Specific(s)) => {
            if s.versions.is_empty() {
                return Err("version_policy.specific lists no versions".into());
            }
            // Every version runs at least one instance.
            if s.versions.len() > limits.max_model_instances {
                return Err(format!(
                    "version_policy.specific lists {} versions, more than max_model_instances {}",
                    s.versions.len(),
                    limits.max_model_instances
                ));
            }
            VersionPolicy::Specific(s.versions.clone())
        }
    };
    let model_filename = if config.default_model_filename.is_empty() {
        "model.pt".to_owned()
    } else {
        config.default_model_filename.clone()
    };
    let (batching, queue) = scheduling(&config, max_batch_size)?;
    let warmup = warmup_samples(
        &config,
        &inputs,
        &batching,
        max_batch_size,
        model_dir,
        limits,
    )?;
    let scaling = ScalingParams::from_parameters(&config, instance_count)?;
    let torch = super::torch_params::TorchParams::from_config(&config)?;
    let parameters = config
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.string_value.clone()))
        .collect();
    Ok(ModelSpec {
        name: config.name.clone(),
        platform,
        max_batch_size,
        inputs,
        outputs,
        instance_count,
        device,
        version_policy,
        model_filename,
        batching,
        queue,
        warmup,
        scaling,
        torch,
        parameters,
        config,
    })
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

/// Warm-up samples: Triton's `model_warmup`, or by default zeros at every batch size the
/// batcher will form (1, the preferred sizes, max_batch_size), each run twice so that
/// TorchScript's profiling executor has optimized its graph before the first request.
///
/// Every sample is held for the model's lifetime, so all of them together stay within
/// `max_warmup_bytes`: a configured warm-up beyond it rejects the model; the default one
/// stops before the first batch size that would not fit (and rejects the model only if
/// even batch 1 does not).
fn warmup_samples(
    config: &ModelConfig,
    inputs: &[TensorSpec],
    batching: &BatchPolicy,
    max_batch_size: u32,
    model_dir: &Path,
    limits: &ModelLimits,
) -> Result<Vec<WarmupSample>, String> {
    let mut ordered: Vec<&TensorSpec> = inputs.iter().collect();
    ordered.sort_by_key(|t| t.position);
    let batched = max_batch_size > 0;
    let full_shape = |batch: u32, dims: &[i64]| -> Vec<i64> {
        let dims = dims.iter().map(|&d| if d < 0 { 1 } else { d });
        if batched {
            std::iter::once(i64::from(batch)).chain(dims).collect()
        } else {
            dims.collect()
        }
    };
    let mut budget = WarmupBudget {
        left: limits.max_warmup_bytes,
        limit: limits.max_warmup_bytes,
    };
    if config.model_warmup.is_empty() {
        let mut sizes = vec![1u32];
        if batched {
            sizes.extend(
                batching
                    .preferred
                    .iter()
                    .filter_map(|&p| u32::try_from(p).ok()),
            );
            sizes.push(max_batch_size);
        }
        sizes.sort_unstable();
        sizes.dedup();
        let mut samples = Vec::with_capacity(sizes.len());
        for b in sizes {
            let shapes: Vec<Vec<i64>> = ordered.iter().map(|t| full_shape(b, &t.dims)).collect();
            let bytes = ordered
                .iter()
                .zip(&shapes)
                .try_fold(0usize, |sum, (t, shape)| {
                    sum.checked_add(tensor_bytes(t.dtype, shape)?)
                });
            if let Err(e) = budget.take(bytes, &format!("the default warm-up at batch size {b}")) {
                if samples.is_empty() {
                    return Err(e);
                }
                tracing::warn!(model = %config.name, batch_size = b, "default warm-up skips batch size {b} and above: {e}");
                break;
            }
            samples.push(WarmupSample {
                name: format!("default batch {b}"),
                inputs: ordered
                    .iter()
                    .zip(shapes)
                    .map(|(t, shape)| {
                        // Counted (without overflow) by the budget just above.
                        let bytes = tensor_bytes(t.dtype, &shape).unwrap_or(0);
                        Tensor::new(t.dtype, shape, vec![0u8; bytes].into())
                    })
                    .collect(),
                count: 2,
            });
        }
        return Ok(samples);
    }
    if config.model_warmup.len() > MAX_WARMUP_SAMPLES {
        return Err(format!(
            "model_warmup has {} samples, more than the {MAX_WARMUP_SAMPLES} supported",
            config.model_warmup.len()
        ));
    }
    let mut samples = Vec::with_capacity(config.model_warmup.len());
    for w in &config.model_warmup {
        let fail = |m: String| format!("model_warmup '{}': {m}", clip(&w.name));
        if batched && (w.batch_size < 1 || w.batch_size > max_batch_size) {
            return Err(fail(format!(
                "batch_size {} is not within 1..={max_batch_size}",
                w.batch_size
            )));
        }
        if w.count > MAX_WARMUP_COUNT {
            return Err(fail(format!(
                "count {} is above the largest supported, {MAX_WARMUP_COUNT}",
                w.count
            )));
        }
        let mut tensors = Vec::with_capacity(ordered.len());
        for t in &ordered {
            let input = w
                .inputs
                .get(&t.name)
                .ok_or_else(|| fail(format!("no data for input '{}'", t.name)))?;
            let dtype = config_dtype(input.data_type)
                .map_err(|e| fail(format!("input '{}': {e}", t.name)))?;
            if dtype != t.dtype {
                return Err(fail(format!(
                    "input '{}' is {dtype}, the model takes {}",
                    t.name, t.dtype
                )));
            }
            if input.dims.len() > MAX_TENSOR_RANK {
                return Err(fail(format!(
                    "input '{}' has {} dims, more than the {MAX_TENSOR_RANK} supported",
                    t.name,
                    input.dims.len()
                )));
            }
            let shape = full_shape(w.batch_size, &input.dims);
            let what = format!("input '{}' of shape {}", t.name, shape_string(&shape));
            let bytes = budget
                .take(tensor_bytes(dtype, &shape), &what)
                .map_err(&fail)?;
            let data = match &input.input_data_type {
                None | Some(model_warmup::input::InputDataType::ZeroData(_)) => vec![0u8; bytes],
                Some(model_warmup::input::InputDataType::RandomData(_)) => {
                    random_data(dtype, bytes)
                }
                Some(model_warmup::input::InputDataType::InputDataFile(file)) => {
                    warmup_file(model_dir, file, bytes, &shape, dtype).map_err(&fail)?
                }
            };
            tensors.push(Tensor::new(dtype, shape, data.into()));
        }
        samples.push(WarmupSample {
            name: w.name.clone(),
            inputs: tensors,
            count: w.count.max(1),
        });
    }
    Ok(samples)
}

/// What is left of `max_warmup_bytes` while a model's warm-up samples are built.
struct WarmupBudget {
    left: usize,
    limit: usize,
}

impl WarmupBudget {
    /// Count `bytes` (`None`: too many to count) against the budget before they exist.
    fn take(&mut self, bytes: Option<usize>, what: &str) -> Result<usize, String> {
        match bytes {
            Some(b) if b <= self.left => {
                self.left -= b;
                Ok(b)
            }
            Some(b) => Err(format!(
                "{what} needs {b} bytes of warm-up data; with the samples before it that is above max_warmup_bytes {}",
                self.limit
            )),
            None => Err(format!(
                "{what} needs more bytes of warm-up data than can be counted (max_warmup_bytes {})",
                self.limit
            )),
        }
    }
}

/// Bytes of a tensor of `shape` (each -1 counted as 1), or `None` if they overflow.
fn tensor_bytes(dtype: DataType, shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(dtype.size(), |bytes, &d| {
        bytes.checked_mul(usize::try_from(d.max(1)).ok()?)
    })
}

/// The contents of warm-up data file `file`: a relative path inside the model's
/// `warmup/` folder (symbolic links included, once resolved), of exactly `bytes` bytes
/// (checked from its metadata before reading). Messages name the file relative to the
/// model, never where the repository lies.
fn warmup_file(
    model_dir: &Path,
    file: &str,
    bytes: usize,
    shape: &[i64],
    dtype: DataType,
) -> Result<Vec<u8>, String> {
    let shown = format!("{WARMUP_DIR}/{}", clip(file));
    let relative = Path::new(file);
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if file.is_empty() || !plain || file.contains('\\') {
        return Err(format!(
            "input_data_file '{}' must be a relative path inside the model's {WARMUP_DIR}/ folder, without '..'",
            clip(file)
        ));
    }
    let outside = || format!("{shown} resolves to a file outside the model's {WARMUP_DIR}/ folder");
    let model = model_dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the model directory: {e}"))?;
    let folder = model_dir
        .join(WARMUP_DIR)
        .canonicalize()
        .map_err(|e| format!("cannot read {shown}: {WARMUP_DIR}/: {e}"))?;
    // A `warmup` that is itself a link out of the model would make every file in it pass.
    if !folder.starts_with(&model) || folder == model {
        return Err(outside());
    }
    let target = folder
        .join(relative)
        .canonicalize()
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !target.starts_with(&folder) {
        return Err(outside());
    }
    let expected = u64::try_from(bytes).unwrap_or(u64::MAX);
    let data = read_bounded(&target, expected).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if data.len() != bytes {
        return Err(format!(
            "{shown} holds {} bytes, shape {} of {dtype} needs {bytes}",
            data.len(),
            shape_string(shape)
        ));
    }
    Ok(data)
}

/// A name from a config or a request, cut short and with control characters escaped, for
/// echoing in a message.
pub fn clip(text: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = text
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(SHOWN).is_some() {
        out.push_str("...");
    }
    out
}

/// Varied but finite data of `dtype` (no NaN or infinity for floating types).
fn random_data(dtype: DataType, bytes: usize) -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        let r = next();
        match dtype {
            DataType::Bool => out.push((r & 1) as u8),
            DataType::Fp32 => out.extend_from_slice(&((r % 1000) as f32 / 1000.0).to_le_bytes()),
            DataType::Fp64 => out.extend_from_slice(&((r % 1000) as f64 / 1000.0).to_le_bytes()),
            // Exponent bits kept in range: values between 0.5 and 1.
            DataType::Fp16 => {
                out.extend_from_slice(&(0x3800u16 | (r as u16 & 0x03ff)).to_le_bytes())
            }
            DataType::Bf16 => {
                out.extend_from_slice(&(0x3f00u16 | (r as u16 & 0x007f)).to_le_bytes())
            }
            DataType::Uint8
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64 => {
                out.extend_from_slice(&r.to_le_bytes()[..dtype.size().min(4)]);
                out.resize(out.len() + dtype.size().saturating_sub(4), 0);
            }
        }
    }
    out.truncate(bytes);
    out
}

/// Batching and queueing from `dynamic_batching`; without it requests run one by one.
fn scheduling(
    config: &ModelConfig,
    max_batch_size: u32,
) -> Result<(BatchPolicy, QueueSettings), String> {
    let unbatched = ModelDynamicBatching::default();
    let (dynamic, enabled) = match &config.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(d)) => (d, true),
        Some(SchedulingChoice::SequenceBatching(_)) => {
            return Err("sequence_batching is not supported".into())
        }
        Some(SchedulingChoice::EnsembleScheduling(_)) => {
            return Err("ensemble_scheduling is not supported".into())
        }
        None => (&unbatched, false),
    };
    let max = usize::try_from(max_batch_size.max(1))
        .expect("max_batch_size is bounded far below usize::MAX");
    if dynamic.preferred_batch_size.len() > MAX_PREFERRED_BATCH_SIZES {
        return Err(format!(
            "dynamic_batching.preferred_batch_size lists {} sizes, more than the {MAX_PREFERRED_BATCH_SIZES} supported",
            dynamic.preferred_batch_size.len()
        ));
    }
    let mut preferred = Vec::with_capacity(dynamic.preferred_batch_size.len());
    for &p in &dynamic.preferred_batch_size {
        match usize::try_from(p) {
            Ok(p) if (1..=max).contains(&p) => preferred.push(p),
            _ => {
                return Err(format!(
                    "dynamic_batching.preferred_batch_size {p} is not within 1..={max}"
                ))
            }
        }
    }
    preferred.sort_unstable();
    preferred.dedup();
    let policy = dynamic.default_queue_policy.unwrap_or_default();
    for (field, micros) in [
        (
            "dynamic_batching.max_queue_delay_microseconds",
            dynamic.max_queue_delay_microseconds,
        ),
        (
            "dynamic_batching.default_queue_policy.default_timeout_microseconds",
            policy.default_timeout_microseconds,
        ),
    ] {
        if micros > MAX_QUEUE_TIME_MICROS {
            return Err(format!(
                "{field} {micros} is above the longest supported, {MAX_QUEUE_TIME_MICROS} (one day)"
            ));
        }
    }
    // The queue's channel is allocated with this capacity.
    let max_queue_size = match policy.max_queue_size {
        0 => DEFAULT_MAX_QUEUE_SIZE,
        n if u64::from(n) > MAX_QUEUE_SIZE => {
            return Err(format!(
                "dynamic_batching.default_queue_policy.max_queue_size {n} is above the largest supported, {MAX_QUEUE_SIZE}"
            ))
        }
        n => usize::try_from(n).map_err(|_| format!("max_queue_size {n} does not fit"))?,
    };
    let batching = BatchPolicy {
        combine: enabled && max_batch_size > 0,
        max_batch_size: max,
        preferred,
        max_queue_delay: Duration::from_micros(dynamic.max_queue_delay_microseconds),
    };
    let queue = QueueSettings {
        max_queue_size,
        default_timeout: (policy.default_timeout_microseconds > 0)
            .then(|| Duration::from_micros(policy.default_timeout_microseconds)),
        allow_timeout_override: policy.allow_timeout_override,
        reject_on_timeout: policy.timeout_action != model_queue_policy::TimeoutAction::Delay as i32,
        priority_levels: 1,
        default_priority_level: 1,
    };
    let queue = match dynamic.priority_levels {
        0 if dynamic.default_priority_level == 0 => queue,
        0 => {
            return Err(format!(
                "dynamic_batching.default_priority_level {} needs priority_levels",
                dynamic.default_priority_level
            ))
        }
        levels => {
            let levels = u32::try_from(levels)
                .ok()
                .filter(|&l| l <= MAX_PRIORITY_LEVELS)
                .ok_or_else(|| {
                    format!(
                        "dynamic_batching.priority_levels {levels} is above {MAX_PRIORITY_LEVELS}"
                    )
                })?;
            let default = match dynamic.default_priority_level {
                0 => levels,
                d if d <= u64::from(levels) => d as u32,
                d => {
                    return Err(format!(
                        "dynamic_batching.default_priority_level {d} is not within 1..={levels}"
                    ))
                }
            };
            QueueSettings {
                priority_levels: levels,
                default_priority_level: default,
                ..queue
            }
        }
    };
    Ok((batching, queue))
}

enum InputOrOutput<'a> {
    Input(&'a ModelInput),
    Output(&'a ModelOutput),
}

impl InputOrOutput<'_> {
    fn parts(&self) -> (&str, i32, &[i64], bool) {
        match self {
            InputOrOutput::Input(i) => (&i.name, i.data_type, &i.dims, i.reshape.is_some()),
            InputOrOutput::Output(o) => (&o.name, o.data_type, &o.dims, o.reshape.is_some()),
        }
    }
}

fn tensor_specs<'a>(
    what: &str,
    tensors: impl Iterator<Item = InputOrOutput<'a>>,
) -> Result<Vec<TensorSpec>, String> {
    let mut specs: Vec<TensorSpec> = Vec::new();
    for (i, t) in tensors.enumerate() {
        let (name, data_type, dims, has_reshape) = t.parts();
        if name.is_empty() {
            return Err(format!("{what}[{i}] has no name"));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(format!("{what} '{name}' is declared twice"));
        }
        if has_reshape {
            return Err(format!("{what} '{name}': reshape is not supported"));
        }
        let dtype = config_dtype(data_type).map_err(|e| format!("{what} '{name}': {e}"))?;
        if dims.len() > MAX_TENSOR_RANK {
            return Err(format!(
                "{what} '{name}' has {} dims, more than the {MAX_TENSOR_RANK} supported",
                dims.len()
            ));
        }
        if let Some(d) = dims.iter().find(|&&d| d < -1 || d == 0) {
            return Err(format!(
                "{what} '{name}': dimension {d} in dims {} is invalid",
                shape_string(dims)
            ));
        }
        specs.push(TensorSpec {
            name: name.to_owned(),
            dtype,
            dims: dims.to_vec(),
            position: i,
        });
    }
    // Triton's PyTorch convention: `<name>__<index>` gives the position explicitly.
    let indexed: Option<Vec<usize>> = specs
        .iter()
        .map(|s| s.name.rsplit_once("__").and_then(|(_, n)| n.parse().ok()))
        .collect();
    if let Some(positions) = indexed {
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        if sorted != (0..positions.len()).collect::<Vec<_>>() {
            return Err(format!(
                "{what} names use the <name>__<index> convention but the indices are not 0..{}",
                positions.len()
            ));
        }
        for (spec, position) in specs.iter_mut().zip(positions) {
            spec.position = position;
        }
    }
    Ok(specs)
}

fn config_dtype(value: i32) -> Result<DataType, String> {
    let dtype =
        ConfigDataType::try_from(value).map_err(|_| format!("unknown data_type {value}"))?;
    match dtype {
        ConfigDataType::TypeBool => Ok(DataType::Bool),
        ConfigDataType::TypeUint8 => Ok(DataType::Uint8),
        ConfigDataType::TypeInt8 => Ok(DataType::Int8),
        ConfigDataType::TypeInt16 => Ok(DataType::Int16),
        ConfigDataType::TypeInt32 => Ok(DataType::Int32),
        ConfigDataType::TypeInt64 => Ok(DataType::Int64),
        ConfigDataType::TypeFp16 => Ok(DataType::Fp16),
        ConfigDataType::TypeBf16 => Ok(DataType::Bf16),
        ConfigDataType::TypeFp32 => Ok(DataType::Fp32),
        ConfigDataType::TypeFp64 => Ok(DataType::Fp64),
        ConfigDataType::TypeInvalid => Err("data_type is not set".into()),
        ConfigDataType::TypeUint16
        | ConfigDataType::TypeUint32
        | ConfigDataType::TypeUint64
        | ConfigDataType::TypeString => Err(format!(
            "data_type {} is not supported by the libtorch backend",
            dtype.as_str_name()
        )),
    }
}

/// The config-file name of a datatype (`TYPE_FP32`), for the ModelConfig answer.
pub fn config_dtype_name(dtype: DataType) -> &'static str {
    match dtype {
        DataType::Bool => "TYPE_BOOL",
        DataType::Uint8 => "TYPE_UINT8",
        DataType::Int8 => "TYPE_INT8",
        DataType::Int16 => "TYPE_INT16",
        DataType::Int32 => "TYPE_INT32",
        DataType::Int64 => "TYPE_INT64",
        DataType::Fp16 => "TYPE_FP16",
        DataType::Bf16 => "TYPE_BF16",
        DataType::Fp32 => "TYPE_FP32",
        DataType::Fp64 => "TYPE_FP64",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MLP: &str = r#"
        name: "mlp"
        platform: "pytorch_libtorch"
        max_batch_size: 32
        input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
        output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 10 ] } ]
        instance_group [ { count: 2 kind: KIND_CPU } ]
        dynamic_batching { max_queue_delay_microseconds: 100 }
        parameters { key: "idle_timeout_secs" value: { string_value: "60" } }
    "#;

    #[test]
    fn parses_a_triton_config() {
        let spec = spec_from_config(parse_text(MLP).unwrap(), "mlp").unwrap();
        assert_eq!(spec.platform, Platform::Torch);
        assert_eq!(spec.max_batch_size, 32);
        assert_eq!(spec.inputs[0].dims, vec![64]);
        assert_eq!(spec.outputs[0].dtype, DataType::Fp32);
        assert_eq!(spec.instance_count, 2);
        assert_eq!(spec.version_policy, VersionPolicy::Latest(1));
        assert_eq!(spec.parameters["idle_timeout_secs"], "60");
        assert_eq!(spec.full_dims(&spec.inputs[0].dims), vec![-1, 64]);
        assert!(spec.batching.combine);
        assert_eq!(spec.batching.max_queue_delay, Duration::from_micros(100));
        assert_eq!(spec.queue.max_queue_size, DEFAULT_MAX_QUEUE_SIZE);
    }

    #[test]
    fn default_warm_up_covers_the_batch_sizes_the_batcher_forms() {
        let text = MLP.replace(
            "max_queue_delay_microseconds: 100",
            "preferred_batch_size: [ 8 ]",
        );
        let spec = spec_from_config(parse_text(&text).unwrap(), "mlp").unwrap();
        let batches: Vec<i64> = spec.warmup.iter().map(|w| w.inputs[0].shape[0]).collect();
        assert_eq!(batches, vec![1, 8, 32]);
        assert_eq!(spec.warmup[2].inputs[0].shape, vec![32, 64]);
        assert!(spec.warmup.iter().all(|w| w.count == 2));
    }

    #[test]
    fn configured_warm_up_and_scaling_parameters() {
        let text = r#"
            platform: "pytorch_libtorch" max_batch_size: 4
            input [ { name: "x" data_type: TYPE_FP16 dims: [-1] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]
            instance_group [ { count: 3 } ]
            model_warmup [ { name: "w" batch_size: 2 count: 5
                             inputs { key: "x" value: { data_type: TYPE_FP16 dims: [3] random_data: true } } } ]
            parameters { key: "min_instances" value: { string_value: "0" } }
            parameters { key: "idle_timeout_secs" value: { string_value: "1.5" } }"#;
        let spec = spec_from_config(parse_text(text).unwrap(), "m").unwrap();
        assert_eq!(spec.warmup.len(), 1);
        assert_eq!(
            (spec.warmup[0].inputs[0].shape.clone(), spec.warmup[0].count),
            (vec![2, 3], 5)
        );
        assert_eq!(spec.warmup[0].inputs[0].data.len(), 12);
        assert_eq!(spec.scaling.min_instances, Some(0));
        assert_eq!(spec.scaling.idle_timeout, Some(Duration::from_millis(1500)));

        let bad = |from: &str, to: &str| {
            spec_from_config(parse_text(&text.replace(from, to)).unwrap(), "m").unwrap_err()
        };
        assert!(bad("TYPE_FP16 dims: [3]", "TYPE_FP32 dims: [3]").contains("the model takes FP16"));
        assert!(bad("key: \"x\" value", "key: \"z\" value").contains("no data for input 'x'"));
        assert!(bad("batch_size: 2", "batch_size: 9").contains("batch_size 9"));
        assert!(bad("string_value: \"0\"", "string_value: \"4\"").contains("min_instances"));
        assert!(bad("1.5", "-1").contains("idle_timeout_secs"));
        assert!(bad("1.5", "1e300").contains("idle_timeout_secs"));
        assert!(bad("1.5", "NaN").contains("idle_timeout_secs"));
    }

    #[test]
    fn dynamic_batching_settings() {
        let text = r#"
            platform: "pytorch_libtorch" max_batch_size: 16
            input [ { name: "x" data_type: TYPE_FP32 dims: [1] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]
            dynamic_batching {
              preferred_batch_size: [ 8, 4 ]
              max_queue_delay_microseconds: 500
              default_queue_policy { max_queue_size: 7 default_timeout_microseconds: 2000
                                     allow_timeout_override: true timeout_action: DELAY }
            }"#;
        let spec = spec_from_config(parse_text(text).unwrap(), "m").unwrap();
        assert_eq!(spec.batching.preferred, vec![4, 8]);
        assert_eq!(spec.batching.max_batch_size, 16);
        assert_eq!(spec.queue.max_queue_size, 7);
        assert_eq!(spec.queue.default_timeout, Some(Duration::from_millis(2)));
        assert!(spec.queue.allow_timeout_override);
        assert!(!spec.queue.reject_on_timeout);

        let none = r#"platform: "pytorch_libtorch" max_batch_size: 16
            input [ { name: "x" data_type: TYPE_FP32 dims: [1] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
        assert!(
            !spec_from_config(parse_text(none).unwrap(), "m")
                .unwrap()
                .batching
                .combine
        );
        let too_big = text.replace("[ 8, 4 ]", "[ 32 ]");
        assert!(spec_from_config(parse_text(&too_big).unwrap(), "m")
            .unwrap_err()
            .contains("32"));
    }

    #[test]
    fn index_suffix_gives_the_position() {
        let text = r#"
            platform: "pytorch_libtorch"
            input [ { name: "b__1" data_type: TYPE_FP32 dims: [1] },
                    { name: "a__0" data_type: TYPE_FP32 dims: [1] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
        let spec = spec_from_config(parse_text(text).unwrap(), "m").unwrap();
        assert_eq!(spec.name, "m");
        assert_eq!(spec.inputs[0].position, 1);
        assert_eq!(spec.inputs[1].position, 0);
        assert_eq!(spec.outputs[0].position, 0);
    }

    #[test]
    fn rejections_say_why() {
        let bad =
            |text: &str, dir: &str| spec_from_config(parse_text(text).unwrap(), dir).unwrap_err();
        let io = r#"input [ { name: "x" data_type: TYPE_FP32 dims: [1] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
        assert!(
            bad(&format!("platform: \"onnxruntime_onnx\" {io}"), "m").contains("onnxruntime_onnx")
        );
        assert!(bad(
            &format!("name: \"other\" platform: \"pytorch_libtorch\" {io}"),
            "m"
        )
        .contains("does not match"));
        let strings = r#"platform: "pytorch_libtorch" input [ { name: "x" data_type: TYPE_STRING dims: [1] } ] output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
        assert!(bad(strings, "m").contains("TYPE_STRING"));
        let no_input = r#"platform: "pytorch_libtorch" output [ { name: "y" data_type: TYPE_FP32 dims: [1] } ]"#;
        assert!(bad(no_input, "m").contains("no input"));
    }

    #[test]
    fn lists_without_colon_parse_like_lists_with_one() {
        let plain = r#"input [ { name: "x[0]" data_type: TYPE_FP32 dims: [ 2 ] } ] # a [ comment
            output: [ { name: "y" data_type: TYPE_FP32 dims [ 2 ] } ]"#;
        let c = parse_text(plain).unwrap();
        assert_eq!(c.input[0].name, "x[0]");
        assert_eq!(c.input[0].dims, vec![2]);
        assert_eq!(c.output[0].dims, vec![2]);
        assert_eq!(colon_before_lists("a: \"q [\" b [1]"), "a: \"q [\" b :[1]");
    }

    /// A config of `max_batch_size` and dims `[2]` plus `extra`, validated under `limits`.
    fn bounded(
        max_batch_size: u64,
        extra: &str,
        limits: &ModelLimits,
    ) -> Result<ModelSpec, String> {
        let text = format!(
            r#"platform: "pytorch_libtorch" max_batch_size: {max_batch_size}
               input [ {{ name: "x" data_type: TYPE_FP32 dims: [2] }} ]
               output [ {{ name: "y" data_type: TYPE_FP32 dims: [2] }} ] {extra}"#
        );
        spec_from_config_with(parse_text(&text).unwrap(), "m", limits)
    }

    #[test]
    fn sizes_from_a_config_are_bounded() {
        let limits = ModelLimits::default();
        let bad =
            |max_batch_size: u64, extra: &str| bounded(max_batch_size, extra, &limits).unwrap_err();
        assert!(bad(u64::from(MAX_BATCH_SIZE) + 1, "").contains("max_batch_size 65537 is above"));
        assert!(bounded(u64::from(MAX_BATCH_SIZE), "", &limits).is_ok());

        let many: String = (1..=MAX_PREFERRED_BATCH_SIZES + 1)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        assert!(bad(
            64,
            &format!("dynamic_batching {{ preferred_batch_size: [ {many} ] }}")
        )
        .contains("preferred_batch_size lists 33 sizes"));
        assert!(bad(
            4,
            "dynamic_batching { max_queue_delay_microseconds: 18446744073709551615 }"
        )
        .contains("max_queue_delay_microseconds"));
        assert!(bad(4, "dynamic_batching { default_queue_policy { default_timeout_microseconds: 86400000001 } }")
            .contains("default_timeout_microseconds"));
        assert!(bad(
            4,
            "dynamic_batching { default_queue_policy { max_queue_size: 1048577 } }"
        )
        .contains("max_queue_size 1048577"));
        let q = bounded(
            4,
            "dynamic_batching { default_queue_policy { max_queue_size: 1048576 } }",
            &limits,
        )
        .unwrap();
        assert_eq!(q.queue.max_queue_size, 1 << 20);

        let rank = vec!["1"; MAX_TENSOR_RANK + 1].join(", ");
        let deep = format!(
            r#"platform: "pytorch_libtorch" input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {rank} ] }} ]
               output [ {{ name: "y" data_type: TYPE_FP32 dims: [2] }} ]"#
        );
        assert!(spec_from_config(parse_text(&deep).unwrap(), "m")
            .unwrap_err()
            .contains("33 dims"));
        // Declared dims whose full batch cannot be counted in bytes.
        let wide = r#"platform: "pytorch_libtorch" max_batch_size: 65536
               input [ { name: "x" data_type: TYPE_FP64 dims: [ 4611686018427387904 ] } ]
               output [ { name: "y" data_type: TYPE_FP32 dims: [2] } ]"#;
        assert!(spec_from_config(parse_text(wide).unwrap(), "m")
            .unwrap_err()
            .contains("more bytes than can be addressed"));

        let outputs: String = (0..=MAX_MODEL_TENSORS)
            .map(|i| format!(r#"output {{ name: "y{i}" data_type: TYPE_FP32 dims: [1] }} "#))
            .collect();
        let text = format!(
            r#"platform: "pytorch_libtorch" input [ {{ name: "x" data_type: TYPE_FP32 dims: [1] }} ] {outputs}"#
        );
        assert!(spec_from_config(parse_text(&text).unwrap(), "m")
            .unwrap_err()
            .contains("257 outputs"));

        let params: String = (0..=MAX_PARAMETERS)
            .map(|i| format!(r#"parameters {{ key: "k{i}" value: {{ string_value: "v" }} }} "#))
            .collect();
        assert!(bad(4, &params).contains("257 parameters"));
        let long = format!(
            r#"parameters {{ key: "k" value: {{ string_value: "{}" }} }}"#,
            "v".repeat(MAX_PARAMETER_BYTES)
        );
        assert!(bad(4, &long).contains("parameter 'k' is longer"));
    }

    #[test]
    fn instances_versions_and_warm_up_stay_within_the_limits() {
        let limits = ModelLimits {
            max_model_instances: 4,
            max_warmup_bytes: 1024,
        };
        let groups = "instance_group [ { count: 2 }, { count: 2 } ]";
        assert_eq!(bounded(4, groups, &limits).unwrap().instance_count, 4);
        let err = bounded(4, "instance_group [ { count: 2 }, { count: 3 } ]", &limits).unwrap_err();
        assert!(
            err.contains("max_model_instances 4") && err.contains("instance_group[1]"),
            "{err}"
        );
        let err = bounded(
            4,
            "instance_group [ { count: 2147483647 }, { count: 2147483647 } ]",
            &limits,
        )
        .unwrap_err();
        assert!(err.contains("instance_group[0]"), "{err}");
        let err = bounded(
            4,
            "version_policy { specific { versions: [1, 2, 3, 4, 5] } }",
            &limits,
        )
        .unwrap_err();
        assert!(err.contains("5 versions"), "{err}");

        // Default warm-up: batch 1 (8 bytes), 64 (512) and 128 (1024) would be 1544 bytes;
        // the sizes that fit are kept, smallest first.
        let spec = bounded(
            128,
            "dynamic_batching { preferred_batch_size: [ 64 ] }",
            &limits,
        )
        .unwrap();
        let sizes: Vec<i64> = spec.warmup.iter().map(|w| w.inputs[0].shape[0]).collect();
        assert_eq!(sizes, vec![1, 64]);
        let tiny = ModelLimits {
            max_warmup_bytes: 7,
            ..limits
        };
        assert!(bounded(4, "", &tiny)
            .unwrap_err()
            .contains("default warm-up at batch size 1 needs 8 bytes"));

        // Configured warm-up: the samples together, and each count.
        let sample = |name: &str, batch: u32, count: u32| {
            format!(
                r#"model_warmup {{ name: "{name}" batch_size: {batch} count: {count}
                   inputs {{ key: "x" value: {{ data_type: TYPE_FP32 dims: [2] random_data: true }} }} }}"#
            )
        };
        let two = format!("{} {}", sample("a", 64, 1), sample("b", 64, 1));
        assert_eq!(bounded(64, &two, &limits).unwrap().warmup.len(), 2);
        let three = format!("{two} {}", sample("c", 1, 1));
        let err = bounded(64, &three, &limits).unwrap_err();
        assert!(
            err.contains("model_warmup 'c'") && err.contains("max_warmup_bytes 1024"),
            "{err}"
        );
        assert!(bounded(4, &sample("n", 1, MAX_WARMUP_COUNT + 1), &limits)
            .unwrap_err()
            .contains("count 1001 is above"));
        let samples: String = (0..=MAX_WARMUP_SAMPLES)
            .map(|i| sample(&format!("s{i}"), 1, 1))
            .collect();
        assert!(bounded(4, &samples, &limits)
            .unwrap_err()
            .contains("65 samples"));
    }

    #[test]
    fn warm_up_files_stay_in_the_warmup_folder() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        std::fs::create_dir_all(model.join("warmup/sub")).unwrap();
        std::fs::write(model.join("warmup/sub/ok.bin"), [0u8; 8]).unwrap();
        std::fs::write(dir.path().join("secret.bin"), [0u8; 8]).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.bin"), model.join("warmup/out.bin"))
            .unwrap();
        let read = |file: &str| warmup_file(&model, file, 8, &[2], DataType::Fp32);
        assert_eq!(read("sub/ok.bin").unwrap(), vec![0u8; 8]);
        assert_eq!(read("./sub/ok.bin").unwrap(), vec![0u8; 8]);
        for refused in [
            "",
            "../secret.bin",
            "sub/../../secret.bin",
            "/etc/passwd",
            "sub\\ok.bin",
        ] {
            let err = read(refused).unwrap_err();
            assert!(err.contains("relative path"), "{refused}: {err}");
        }
        let err = read("out.bin").unwrap_err();
        assert!(
            err.contains("warmup/out.bin resolves to a file outside"),
            "{err}"
        );
        assert!(!err.contains(&dir.path().display().to_string()), "{err}");
        let err = warmup_file(&model, "sub/ok.bin", 4, &[1], DataType::Fp32).unwrap_err();
        assert!(err.contains("above the limit of 4"), "{err}");
        let err = warmup_file(&model, "sub/ok.bin", 12, &[3], DataType::Fp32).unwrap_err();
        assert!(
            err.contains("holds 8 bytes") && err.contains("needs 12"),
            "{err}"
        );
        let err = read("missing.bin").unwrap_err();
        assert!(err.contains("cannot read warmup/missing.bin"), "{err}");
        assert!(!err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn json_configs_parse_like_text_ones() {
        let json = r#"{"name": "mlp", "platform": "pytorch_libtorch", "maxBatchSize": 8,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["64"]}],
            "output": [{"name": "y", "dataType": "TYPE_FP32", "dims": [10]}]}"#;
        let c = parse_json(json).unwrap();
        assert_eq!((c.max_batch_size, c.input[0].dims.clone()), (8, vec![64]));
        assert!(parse_json("{").is_err());
        assert!(parse_json(r#"{"name": "m"} trailing"#).is_err());
        assert!(parse_json(r#"{"nope": 1}"#).unwrap_err().contains("nope"));
        let huge = format!(r#"{{"name": "{}"}}"#, "m".repeat(1 << 20));
        assert!(parse_json(&huge).unwrap_err().contains("bytes long"));
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = parse_text("max_batch_size: 8\ninput [ { name: \"x\" ").unwrap_err();
        assert!(!err.is_empty());
        assert!(parse_text("no_such_field: 1")
            .unwrap_err()
            .contains("no_such_field"));
    }
}
