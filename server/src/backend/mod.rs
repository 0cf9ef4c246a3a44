//! The model behind a small synchronous trait. A backend instance is created and used on
//! one dedicated OS thread (see `pool`), never on the async runtime. Only `torch.rs`
//! touches libtorch; `synthetic.rs` stands in for it in tests and overhead benchmarks.

use std::path::Path;

use crate::config::BackendOptions;
use crate::spec::{ModelSpec, Platform};
use crate::tensor::Tensor;

pub mod openmp;
pub mod synthetic;
pub mod torch;

/// One loaded copy of a model.
pub trait Backend: Send {
    /// Run the model on one batch. Inputs are in the model's argument order; outputs are
    /// returned in the model's result order, each with the batch as leading dimension.
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("cannot load {path}: {message}")]
    Load { path: String, message: String },
    #[error("{0}")]
    Forward(String),
    #[error("model panicked: {0}")]
    Panic(String),
    #[error("model instance is gone")]
    InstanceGone,
}

/// libtorch intra-op threads of each instance of a model: its `INTRA_OP_THREAD_COUNT`,
/// else the server's setting, else the machine's `cores` shared among its `instances`
/// (at least one each). Sharing is the default because a model served the usual Triton
/// way, one instance, would otherwise compute on one core of many (BENCHMARKS.md,
/// "Cores used by default"); a model with as many instances as cores gets one thread
/// per instance, which on a small machine beats fewer instances with more threads.
/// A default share of several threads drops to one once the model proves too small to
/// split ([`torch::SMALL_FORWARD`]).
pub fn intra_op_threads(
    model: Option<usize>,
    options: &BackendOptions,
    instances: usize,
    cores: usize,
) -> usize {
    model
        .or(options.intra_op_threads)
        .unwrap_or_else(|| cores / instances.max(1))
        .max(1)
}

/// Cores this process may run on (its affinity and cgroup quota), at least one.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Load one instance of version `version_dir` of the model described by `spec`.
/// Called on the instance's own thread.
pub fn load(
    spec: &ModelSpec,
    version_dir: &Path,
    options: &BackendOptions,
) -> Result<Box<dyn Backend>, BackendError> {
    match spec.platform {
        Platform::Torch => {
            let path = version_dir.join(&spec.model_filename);
            let threads = intra_op_threads(
                spec.torch.intra_op_threads,
                options,
                spec.instance_count,
                available_cores(),
            );
            let backend = torch::TorchBackend::load(&path, spec.device, threads, &spec.torch)?;
            let shared =
                spec.torch.intra_op_threads.is_none() && options.intra_op_threads.is_none();
            if shared && threads > 1 {
                let full_batch = usize::try_from(spec.max_batch_size).unwrap_or(usize::MAX);
                return Ok(Box::new(backend.narrowing_on_small_batches(full_batch)));
            }
            Ok(Box::new(backend))
        }
        Platform::Synthetic => Ok(Box::new(synthetic::SyntheticBackend::from_spec(spec)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intra_op_threads_share_the_cores_unless_set() {
        let unset = BackendOptions {
            intra_op_threads: None,
        };
        let server = BackendOptions {
            intra_op_threads: Some(3),
        };
        // Shared: cores / instances, at least one.
        assert_eq!(intra_op_threads(None, &unset, 1, 2), 2);
        assert_eq!(intra_op_threads(None, &unset, 2, 2), 1);
        assert_eq!(intra_op_threads(None, &unset, 3, 16), 5);
        assert_eq!(intra_op_threads(None, &unset, 4, 2), 1);
        assert_eq!(intra_op_threads(None, &unset, 0, 2), 2);
        // The server's setting, then the model's own, win.
        assert_eq!(intra_op_threads(None, &server, 1, 16), 3);
        assert_eq!(intra_op_threads(Some(6), &server, 1, 16), 6);
    }
}
