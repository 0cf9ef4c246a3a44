//! Reading a config: protobuf text format or JSON into Triton's `ModelConfig`, then the
//! checks that turn it into a [`ModelSpec`].

use super::*;

pub(crate) fn descriptor_pool() -> &'static DescriptorPool {
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
// Kept whole: one pass of a small scanner whose states (string, comment, name) read together.
pub(super) fn colon_before_lists(text: &str) -> std::borrow::Cow<'_, str> {
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
pub(super) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
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
    name(&mut config, model_dir)?;
    let platform = platform(&mut config)?;
    let max_batch_size = u32::try_from(config.max_batch_size)
        .map_err(|_| format!("max_batch_size {} is negative", config.max_batch_size))?;
    if max_batch_size > MAX_BATCH_SIZE {
        return Err(format!(
            "max_batch_size {max_batch_size} is above the largest supported, {MAX_BATCH_SIZE}"
        ));
    }
    let (inputs, outputs) = declared_tensors(&config, max_batch_size)?;
    check_parameters(&config)?;
    let (instance_count, device) = instance_groups(&mut config, limits)?;
    let version_policy = version_policy(&config, limits)?;
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
    let torch = torch_params::TorchParams::from_config(&config)?;
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

/// The config's name: the model directory's (filled in when the config leaves it out).
fn name(config: &mut ModelConfig, model_dir: &Path) -> Result<(), String> {
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
    Ok(())
}

/// The platform or backend, normalised to Triton's pair for the ModelConfig RPC.
fn platform(config: &mut ModelConfig) -> Result<Platform, String> {
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
    Ok(platform)
}

/// The declared inputs and outputs, each of a size that can be counted at a full batch.
fn declared_tensors(
    config: &ModelConfig,
    max_batch_size: u32,
) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), String> {
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
    Ok((inputs, outputs))
}

/// The `parameters` map: bounded in entries and in bytes per entry.
fn check_parameters(config: &ModelConfig) -> Result<(), String> {
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
    Ok(())
}

/// The instance groups (one CPU instance when none is declared, as in Triton): the
/// total instance count, bounded before any exists, and where they run.
fn instance_groups(
    config: &mut ModelConfig,
    limits: &ModelLimits,
) -> Result<(usize, DeviceKind), String> {
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
        device = group_device(i, group)?;
    }
    Ok((instance_count, device))
}

fn group_device(
    i: usize,
    group: &sluice_proto::inference::ModelInstanceGroup,
) -> Result<DeviceKind, String> {
    if let Some(gpu) = group.gpus.iter().find(|&&g| g < 0) {
        return Err(format!(
            "instance_group[{i}].gpus lists device {gpu}, which is negative"
        ));
    }
    match model_instance_group::Kind::try_from(group.kind) {
        Ok(model_instance_group::Kind::Cpu) => Ok(DeviceKind::Cpu),
        Ok(model_instance_group::Kind::Gpu) => {
            Ok(DeviceKind::Gpu(group.gpus.first().copied().unwrap_or(0)))
        }
        Ok(model_instance_group::Kind::Auto | model_instance_group::Kind::Model) => {
            Ok(DeviceKind::Auto)
        }
        Err(_) => Err(format!(
            "instance_group[{i}].kind {} is unknown",
            group.kind
        )),
    }
}

/// Which versions to serve (the latest one by default, as in Triton).
fn version_policy(config: &ModelConfig, limits: &ModelLimits) -> Result<VersionPolicy, String> {
    Ok(
        match config
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
        },
    )
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

pub(super) fn config_dtype(value: i32) -> Result<DataType, String> {
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
