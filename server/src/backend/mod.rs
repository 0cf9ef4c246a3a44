//! The model behind a small synchronous trait. A backend instance is created and used on
//! one dedicated OS thread (see `pool`), never on the async runtime. Only `torch.rs`
//! touches libtorch; `synthetic.rs` stands in for it in tests and overhead benchmarks.

use std::path::Path;

use crate::config::BackendOptions;
use crate::repository::{ModelSpec, Platform};
use crate::tensor::Tensor;

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
            Ok(Box::new(torch::TorchBackend::load(
                &path,
                spec.device,
                options,
                &spec.torch,
            )?))
        }
        Platform::Synthetic => Ok(Box::new(synthetic::SyntheticBackend::from_spec(spec)?)),
    }
}
