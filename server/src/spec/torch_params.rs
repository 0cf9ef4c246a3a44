//! Triton's PyTorch backend parameters in a config.pbtxt's `parameters` map, read the way
//! that backend reads them, so a Triton repository's tuning carries over:
//!
//! | key | here |
//! | --- | --- |
//! | `INTRA_OP_THREAD_COUNT` | libtorch intra-op threads of each of the model's instances (Triton: one value for the whole backend) |
//! | `INTER_OP_THREAD_COUNT` | libtorch's inter-op pool, process-wide: the first model that sets it wins, as in Triton |
//! | `DISABLE_OPTIMIZED_EXECUTION` | `true` turns TorchScript's graph optimisations off for the model's instances |
//! | `ENABLE_JIT_PROFILING` | TorchScript's profiling executor on or off, process-wide (first model wins) |
//! | `ENABLE_TENSOR_FUSER` | TorchScript's tensor-expression fuser on or off, process-wide (first model wins) |
//! | `INFERENCE_MODE` | accepted; every forward runs without autograd (no_grad) either way |
//! | `ENABLE_JIT_EXECUTOR`, `ENABLE_CACHE_CLEANING`, `ENABLE_WEIGHT_SHARING`, `DISABLE_CUDNN` | accepted, no effect on this CPU build (executor choice is the profiling flag; CUDA caches and cuDNN are GPU-only; each instance loads its own weights) |
//!
//! Booleans are `true`/`false` (any case) or `1`/`0`; counts are whole numbers from 1 to
//! [`MAX_THREADS`]. Anything else makes the model UNAVAILABLE with the reason.

use sluice_proto::inference::ModelConfig;

/// Most threads a parameter may ask for (far beyond any machine's cores, and bounded so
/// a typo cannot make libtorch start a thread per unit of it).
pub const MAX_THREADS: usize = 1024;

/// Keys that are accepted and have no effect here (documented above).
const ACCEPTED_WITHOUT_EFFECT: &[&str] = &[
    "INFERENCE_MODE",
    "ENABLE_JIT_EXECUTOR",
    "ENABLE_CACHE_CLEANING",
    "ENABLE_WEIGHT_SHARING",
    "DISABLE_CUDNN",
];

/// The PyTorch backend parameters of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TorchParams {
    /// Intra-op threads per instance; `None`: the server's `intra_op_threads`.
    pub intra_op_threads: Option<usize>,
    /// libtorch's process-wide inter-op pool size.
    pub inter_op_threads: Option<usize>,
    /// `DISABLE_OPTIMIZED_EXECUTION: true`.
    pub disable_optimized_execution: bool,
    /// `ENABLE_JIT_PROFILING`, process-wide.
    pub jit_profiling: Option<bool>,
    /// `ENABLE_TENSOR_FUSER`, process-wide.
    pub tensor_fuser: Option<bool>,
}

impl TorchParams {
    pub fn from_config(config: &ModelConfig) -> Result<TorchParams, String> {
        let get = |key: &str| {
            config
                .parameters
                .get(key)
                .map(|p| p.string_value.trim().to_owned())
        };
        let count = |key: &str| -> Result<Option<usize>, String> {
            match get(key) {
                None => Ok(None),
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(Some(n)),
                    _ => Err(format!(
                        "parameter {key} '{}' must be a whole number from 1 to {MAX_THREADS}",
                        super::clip(&v)
                    )),
                },
            }
        };
        let flag = |key: &str| -> Result<Option<bool>, String> {
            get(key).map(|v| boolean(key, &v)).transpose()
        };
        for key in ACCEPTED_WITHOUT_EFFECT {
            flag(key)?;
        }
        Ok(TorchParams {
            intra_op_threads: count("INTRA_OP_THREAD_COUNT")?,
            inter_op_threads: count("INTER_OP_THREAD_COUNT")?,
            disable_optimized_execution: flag("DISABLE_OPTIMIZED_EXECUTION")?.unwrap_or(false),
            jit_profiling: flag("ENABLE_JIT_PROFILING")?,
            tensor_fuser: flag("ENABLE_TENSOR_FUSER")?,
        })
    }
}

fn boolean(key: &str, value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!(
            "parameter {key} '{}' must be true or false",
            super::clip(value)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::inference::ModelParameter;

    fn config(params: &[(&str, &str)]) -> ModelConfig {
        ModelConfig {
            parameters: params
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        ModelParameter {
                            string_value: (*v).to_owned(),
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn no_parameters_change_nothing() {
        assert_eq!(
            TorchParams::from_config(&config(&[])),
            Ok(TorchParams::default())
        );
    }

    #[test]
    fn tritons_keys_are_read_as_the_pytorch_backend_reads_them() {
        let p = TorchParams::from_config(&config(&[
            ("INTRA_OP_THREAD_COUNT", "4"),
            ("INTER_OP_THREAD_COUNT", " 2 "),
            ("DISABLE_OPTIMIZED_EXECUTION", "TRUE"),
            ("ENABLE_JIT_PROFILING", "false"),
            ("ENABLE_TENSOR_FUSER", "0"),
            ("INFERENCE_MODE", "true"),
            ("ENABLE_CACHE_CLEANING", "1"),
            ("some_gateway_setting", "anything"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            TorchParams {
                intra_op_threads: Some(4),
                inter_op_threads: Some(2),
                disable_optimized_execution: true,
                jit_profiling: Some(false),
                tensor_fuser: Some(false),
            }
        );
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (key, value) in [
            ("INTRA_OP_THREAD_COUNT", "0"),
            ("INTRA_OP_THREAD_COUNT", "-1"),
            ("INTER_OP_THREAD_COUNT", "100000"),
            ("INTRA_OP_THREAD_COUNT", "four"),
            ("DISABLE_OPTIMIZED_EXECUTION", "yes"),
            ("INFERENCE_MODE", "maybe"),
            ("ENABLE_TENSOR_FUSER", ""),
        ] {
            let err = TorchParams::from_config(&config(&[(key, value)])).unwrap_err();
            assert!(err.contains(key), "{key}={value}: {err}");
        }
    }
}
