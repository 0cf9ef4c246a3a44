//! `dynamic_batching` and the queue policy, and the declared inputs and outputs.

use super::*;

/// Batching and queueing from `dynamic_batching`; without it requests run one by one.
pub(super) fn scheduling(
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
    let preferred = preferred_sizes(dynamic, max)?;
    let policy = dynamic.default_queue_policy.unwrap_or_default();
    check_queue_times(dynamic, &policy)?;
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
    Ok((batching, priorities(dynamic, queue)?))
}

/// The batching delay and the queue timeout: at most a day, so that adding either to a
/// point in time can never overflow.
fn check_queue_times(
    dynamic: &ModelDynamicBatching,
    policy: &sluice_proto::inference::ModelQueuePolicy,
) -> Result<(), String> {
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
    Ok(())
}

/// `preferred_batch_size`: each within 1..=max, ascending, once.
fn preferred_sizes(dynamic: &ModelDynamicBatching, max: usize) -> Result<Vec<usize>, String> {
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
    Ok(preferred)
}

/// `priority_levels` and `default_priority_level` (the lowest level by default, as in
/// Triton) on top of the queue settings.
fn priorities(
    dynamic: &ModelDynamicBatching,
    queue: QueueSettings,
) -> Result<QueueSettings, String> {
    Ok(match dynamic.priority_levels {
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
    })
}

pub(super) enum InputOrOutput<'a> {
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

pub(super) fn tensor_specs<'a>(
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
