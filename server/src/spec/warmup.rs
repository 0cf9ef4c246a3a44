//! Warm-up samples: the config's `model_warmup` (zero, random or file data), or by
//! default one sample per batch size the batcher forms, all within one byte budget.

use super::*;

/// Warm-up samples: Triton's `model_warmup`, or by default zeros at every batch size the
/// batcher will form (1, the preferred sizes, max_batch_size), each run twice so that
/// TorchScript's profiling executor has optimized its graph before the first request.
///
/// Every sample is held for the model's lifetime, so all of them together stay within
/// `max_warmup_bytes`: a configured warm-up beyond it rejects the model; the default one
/// stops before the first batch size that would not fit (and rejects the model only if
/// even batch 1 does not).
pub(super) fn warmup_samples(
    config: &ModelConfig,
    inputs: &[TensorSpec],
    batching: &BatchPolicy,
    max_batch_size: u32,
    model_dir: &Path,
    limits: &ModelLimits,
) -> Result<Vec<WarmupSample>, String> {
    let mut ordered: Vec<&TensorSpec> = inputs.iter().collect();
    ordered.sort_by_key(|t| t.position);
    let shapes = Shapes {
        batched: max_batch_size > 0,
    };
    let mut budget = WarmupBudget {
        left: limits.max_warmup_bytes,
        limit: limits.max_warmup_bytes,
    };
    if config.model_warmup.is_empty() {
        return default_samples(
            config,
            &ordered,
            batching,
            max_batch_size,
            shapes,
            &mut budget,
        );
    }
    if config.model_warmup.len() > MAX_WARMUP_SAMPLES {
        return Err(format!(
            "model_warmup has {} samples, more than the {MAX_WARMUP_SAMPLES} supported",
            config.model_warmup.len()
        ));
    }
    config
        .model_warmup
        .iter()
        .map(|w| {
            configured_sample(w, &ordered, shapes, max_batch_size, model_dir, &mut budget)
                .map_err(|m| format!("model_warmup '{}': {m}", clip(&w.name)))
        })
        .collect()
}

/// One configured `model_warmup` sample: its batch size and count within bounds, then
/// every input in the model's argument order.
fn configured_sample(
    w: &sluice_proto::inference::ModelWarmup,
    ordered: &[&TensorSpec],
    shapes: Shapes,
    max_batch_size: u32,
    model_dir: &Path,
    budget: &mut WarmupBudget,
) -> Result<WarmupSample, String> {
    if shapes.batched && (w.batch_size < 1 || w.batch_size > max_batch_size) {
        return Err(format!(
            "batch_size {} is not within 1..={max_batch_size}",
            w.batch_size
        ));
    }
    if w.count > MAX_WARMUP_COUNT {
        return Err(format!(
            "count {} is above the largest supported, {MAX_WARMUP_COUNT}",
            w.count
        ));
    }
    let inputs = ordered
        .iter()
        .map(|t| configured_input(w, t, shapes, model_dir, budget))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WarmupSample {
        name: w.name.clone(),
        inputs,
        count: w.count.max(1),
    })
}

/// Full shapes of warm-up tensors: the batch size first when the model batches, each
/// variable dimension as 1.
#[derive(Clone, Copy)]
struct Shapes {
    batched: bool,
}

impl Shapes {
    fn full(self, batch: u32, dims: &[i64]) -> Vec<i64> {
        let dims = dims.iter().map(|&d| if d < 0 { 1 } else { d });
        if self.batched {
            std::iter::once(i64::from(batch)).chain(dims).collect()
        } else {
            dims.collect()
        }
    }
}

/// Zeros at every batch size the batcher forms, smallest first, until the budget ends.
fn default_samples(
    config: &ModelConfig,
    ordered: &[&TensorSpec],
    batching: &BatchPolicy,
    max_batch_size: u32,
    shapes: Shapes,
    budget: &mut WarmupBudget,
) -> Result<Vec<WarmupSample>, String> {
    let mut sizes = vec![1u32];
    if shapes.batched {
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
        let full: Vec<Vec<i64>> = ordered.iter().map(|t| shapes.full(b, &t.dims)).collect();
        let bytes = ordered
            .iter()
            .zip(&full)
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
                .zip(full)
                .map(|(t, shape)| {
                    // Counted (without overflow) by the budget just above.
                    let bytes = tensor_bytes(t.dtype, &shape).unwrap_or(0);
                    Tensor::new(t.dtype, shape, vec![0u8; bytes].into())
                })
                .collect(),
            count: 2,
        });
    }
    Ok(samples)
}

/// One input of a configured warm-up sample: its datatype and rank checked against the
/// model's, its bytes taken from the budget, then zeros, random data or the file's.
fn configured_input(
    w: &sluice_proto::inference::ModelWarmup,
    t: &TensorSpec,
    shapes: Shapes,
    model_dir: &Path,
    budget: &mut WarmupBudget,
) -> Result<Tensor, String> {
    let input = w
        .inputs
        .get(&t.name)
        .ok_or_else(|| format!("no data for input '{}'", t.name))?;
    let dtype = config_dtype(input.data_type).map_err(|e| format!("input '{}': {e}", t.name))?;
    if dtype != t.dtype {
        return Err(format!(
            "input '{}' is {dtype}, the model takes {}",
            t.name, t.dtype
        ));
    }
    if input.dims.len() > MAX_TENSOR_RANK {
        return Err(format!(
            "input '{}' has {} dims, more than the {MAX_TENSOR_RANK} supported",
            t.name,
            input.dims.len()
        ));
    }
    let shape = shapes.full(w.batch_size, &input.dims);
    let what = format!("input '{}' of shape {}", t.name, shape_string(&shape));
    let bytes = budget.take(tensor_bytes(dtype, &shape), &what)?;
    let data = match &input.input_data_type {
        None | Some(model_warmup::input::InputDataType::ZeroData(_)) => vec![0u8; bytes],
        Some(model_warmup::input::InputDataType::RandomData(_)) => random_data(dtype, bytes),
        Some(model_warmup::input::InputDataType::InputDataFile(file)) => {
            warmup_file(model_dir, file, bytes, &shape, dtype)?
        }
    };
    Ok(Tensor::new(dtype, shape, data.into()))
}

/// What is left of `max_warmup_bytes` while a model's warm-up samples are built.
pub(super) struct WarmupBudget {
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
pub(super) fn tensor_bytes(dtype: DataType, shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(dtype.size(), |bytes, &d| {
        bytes.checked_mul(usize::try_from(d.max(1)).ok()?)
    })
}

/// The contents of warm-up data file `file`: a relative path inside the model's
/// `warmup/` folder (symbolic links included, once resolved), of exactly `bytes` bytes
/// (checked from its metadata before reading). Messages name the file relative to the
/// model, never where the repository lies.
pub(super) fn warmup_file(
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

/// Varied but finite data of `dtype` (no NaN or infinity for floating types).
pub(super) fn random_data(dtype: DataType, bytes: usize) -> Vec<u8> {
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
