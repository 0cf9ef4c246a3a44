//! TorchScript models through libtorch (`tch`). The only module that touches `tch`.

use std::path::Path;
use std::time::{Duration, Instant};

use tch::{CModule, Device, IValue, Kind};

use super::{Backend, BackendError};
use crate::spec::torch_params::TorchParams;
use crate::spec::DeviceKind;
use crate::tensor::{DataType, Tensor};

pub struct TorchBackend {
    module: CModule,
    device: Device,
    /// Set while the instance computes on a default share of several cores: the samples
    /// of a full batch (0 when the model does not batch), see [`SMALL_FORWARD`].
    narrow_at: Option<usize>,
    /// `<model>/<version>/<file>`, for the log.
    name: String,
}

/// A forward of a full batch faster than this is too small for several intra-op
/// threads. The threads sleep between parallel regions (`OMP_WAIT_POLICY=PASSIVE`, see
/// `openmp`), so every region wakes its helpers: on a loaded machine that wake-up costs
/// more than the share of a forward this short a second thread could take over. With
/// both cores busy, the bundled mlp's batch of 32 took 49 us on two threads and 31 us on
/// one, the cnn's 27 ms on two and 50 ms on one (BENCHMARKS.md, "Dynamic batching",
/// compute limit); 250 us leaves room for models several times the mlp and stays far
/// below any forward that splits well ("One thread for forwards of microseconds").
pub const SMALL_FORWARD: Duration = Duration::from_micros(250);

impl TorchBackend {
    /// Load `path` for this thread with `intra_op_threads` (see
    /// [`super::intra_op_threads`]). libtorch's intra-op thread count is per calling
    /// thread (OpenMP), so it is set here, on the instance's own thread.
    pub fn load(
        path: &Path,
        device: DeviceKind,
        intra_op_threads: usize,
        params: &TorchParams,
    ) -> Result<TorchBackend, BackendError> {
        let fail = |message: String| BackendError::Load {
            path: repository_relative(path),
            message,
        };
        if !path.is_file() {
            return Err(fail("file not found".into()));
        }
        // libtorch sizes a thread's pool from a process-wide value the first time that
        // thread asks for it; asking first makes the count set next this thread's own,
        // whatever another model's instance sets after it.
        let _ = tch::get_num_threads();
        tch::set_num_threads(i32::try_from(intra_op_threads).unwrap_or(i32::MAX));
        // Thread-local in libtorch, so it holds for this instance's forwards only.
        tch::jit::set_graph_executor_optimize(!params.disable_optimized_execution);
        apply_process_wide(path, params);
        let device = match device {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Auto => Device::cuda_if_available(),
            DeviceKind::Gpu(index) => {
                if !tch::Cuda::is_available() {
                    return Err(fail(
                        "instance_group asks for KIND_GPU but libtorch sees no CUDA device".into(),
                    ));
                }
                Device::Cuda(usize::try_from(index).unwrap_or(0))
            }
        };
        let mut module =
            CModule::load_on_device(path, device).map_err(|e| fail(first_line(&e.to_string())))?;
        module.set_eval();
        Ok(TorchBackend {
            module,
            device,
            narrow_at: None,
            name: repository_relative(path),
        })
    }

    /// The intra-op thread count this instance was loaded with is the machine's default
    /// share, not a setting: drop to one thread, for good, the first time a batch of
    /// `full_batch` samples (the model's `max_batch_size`; 0 when it does not batch, so
    /// any forward) runs in under [`SMALL_FORWARD`]. A fast full batch is proof of a
    /// model too small to split; one observation suffices because a busy machine only
    /// ever makes a forward slower.
    #[must_use]
    pub fn narrowing_on_small_batches(mut self, full_batch: usize) -> TorchBackend {
        self.narrow_at = Some(full_batch);
        self
    }

    fn narrow_if_small(&mut self, inputs: &[Tensor], took: Duration) {
        let Some(full) = self.narrow_at else { return };
        let samples = inputs
            .first()
            .and_then(|t| t.shape.first())
            .and_then(|&n| usize::try_from(n).ok())
            .unwrap_or(0);
        if took < SMALL_FORWARD && (full == 0 || samples >= full) {
            self.narrow_at = None;
            tch::set_num_threads(1);
            tracing::info!(
                model = %self.name,
                took_us = took.as_micros(),
                "a full batch computes in microseconds: this instance uses one intra-op thread"
            );
        }
    }
}

/// libtorch settings that exist once per process (the inter-op pool, the profiling
/// executor, the tensor fuser): the first model that sets each one wins, as in Triton's
/// PyTorch backend; a later model asking for another value is told so in the log. The
/// inter-op pool can only be sized before it first runs work, so it is set at most once.
// Kept whole: one block per process-wide libtorch setting, each with its first-wins rule.
fn apply_process_wide(path: &Path, params: &TorchParams) {
    use std::sync::{Mutex, OnceLock};
    #[derive(Default)]
    struct Chosen {
        inter_op: Option<usize>,
        profiling: Option<bool>,
        fuser: Option<bool>,
    }
    static CHOSEN: OnceLock<Mutex<Chosen>> = OnceLock::new();
    let mut chosen = CHOSEN
        .get_or_init(Mutex::default)
        .lock()
        .expect("never poisoned");
    let model = repository_relative(path);
    if let Some(n) = params.inter_op_threads {
        match chosen.inter_op {
            None => {
                // libtorch refuses once its inter-op pool has run work; that is a
                // warning here, not a failed load.
                let set = std::panic::catch_unwind(|| {
                    tch::set_num_interop_threads(i32::try_from(n).unwrap_or(1))
                });
                if set.is_err() {
                    tracing::warn!(%model, asked = n, "libtorch's inter-op pool is already running: INTER_OP_THREAD_COUNT not applied");
                }
                chosen.inter_op = Some(n);
            }
            Some(first) if first != n => tracing::warn!(
                %model, asked = n, kept = first,
                "INTER_OP_THREAD_COUNT is process-wide and already set by another model"
            ),
            Some(_) => {}
        }
    }
    if let Some(on) = params.jit_profiling {
        match chosen.profiling {
            None => {
                tch::jit::set_profiling_mode(on);
                chosen.profiling = Some(on);
            }
            Some(first) if first != on => tracing::warn!(
                %model, asked = on, kept = first,
                "ENABLE_JIT_PROFILING is process-wide and already set by another model"
            ),
            Some(_) => {}
        }
    }
    if let Some(on) = params.tensor_fuser {
        match chosen.fuser {
            None => {
                tch::jit::set_tensor_expr_fuser_enabled(on);
                chosen.fuser = Some(on);
            }
            Some(first) if first != on => tracing::warn!(
                %model, asked = on, kept = first,
                "ENABLE_TENSOR_FUSER is process-wide and already set by another model"
            ),
            Some(_) => {}
        }
    }
}

impl Backend for TorchBackend {
    // Everything a model returns that is not a tensor is an error, whatever tch's
    // (foreign, growing) IValue enum calls it.
    #[allow(clippy::wildcard_enum_match_arm)]
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        let _no_grad = tch::no_grad_guard();
        let args = inputs
            .iter()
            .map(|t| to_torch(t, self.device).map(IValue::Tensor))
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        let result = self
            .module
            .forward_is(&args)
            .map_err(|e| BackendError::Forward(model_message(&e.to_string())))?;
        self.narrow_if_small(inputs, start.elapsed());
        let tensors = match result {
            IValue::Tensor(t) => vec![t],
            IValue::Tuple(items) | IValue::GenericList(items) => items
                .into_iter()
                .map(|v| match v {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(BackendError::Forward(format!(
                        "model returned a {} inside its result, expected tensors",
                        ivalue_kind(&other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            IValue::TensorList(items) => items,
            other => {
                return Err(BackendError::Forward(format!(
                    "model returned a {}, expected a tensor or a tuple of tensors",
                    ivalue_kind(&other)
                )))
            }
        };
        tensors.iter().map(from_torch).collect()
    }
}

fn kind_of(dtype: DataType) -> Kind {
    match dtype {
        DataType::Bool => Kind::Bool,
        DataType::Uint8 => Kind::Uint8,
        DataType::Int8 => Kind::Int8,
        DataType::Int16 => Kind::Int16,
        DataType::Int32 => Kind::Int,
        DataType::Int64 => Kind::Int64,
        DataType::Fp16 => Kind::Half,
        DataType::Bf16 => Kind::BFloat16,
        DataType::Fp32 => Kind::Float,
        DataType::Fp64 => Kind::Double,
    }
}

fn dtype_of(kind: Kind) -> Option<DataType> {
    DataType::ALL.into_iter().find(|&d| kind_of(d) == kind)
}

fn to_torch(t: &Tensor, device: Device) -> Result<tch::Tensor, BackendError> {
    let tensor =
        tch::Tensor::f_from_data_size(&t.data, &t.shape, kind_of(t.dtype)).map_err(|e| {
            BackendError::Forward(format!(
                "cannot build input tensor: {}",
                first_line(&e.to_string())
            ))
        })?;
    if device == Device::Cpu {
        Ok(tensor)
    } else {
        Ok(tensor.to_device(device))
    }
}

fn from_torch(t: &tch::Tensor) -> Result<Tensor, BackendError> {
    let kind = t.kind();
    let dtype = dtype_of(kind).ok_or_else(|| {
        BackendError::Forward(format!(
            "model returned a tensor of unsupported type {kind:?}"
        ))
    })?;
    let t = t.to_device(Device::Cpu).contiguous();
    let shape = t.size();
    let numel = t.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut data, numel).map_err(|e| {
        BackendError::Forward(format!(
            "cannot read output: {}",
            first_line(&e.to_string())
        ))
    })?;
    Ok(Tensor::new(dtype, shape, data.into()))
}

#[allow(clippy::wildcard_enum_match_arm)] // tch may add variants
fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "tensor",
        IValue::Double(_) => "float",
        IValue::Int(_) => "int",
        IValue::Bool(_) => "bool",
        IValue::Tuple(_) => "tuple",
        IValue::IntList(_) => "list of ints",
        IValue::DoubleList(_) => "list of floats",
        IValue::BoolList(_) => "list of bools",
        IValue::String(_) => "string",
        IValue::TensorList(_) => "list of tensors",
        IValue::GenericList(_) => "list",
        IValue::GenericDict(_) => "dict",
        IValue::Object(_) => "object",
        _ => "value",
    }
}

/// `<model>/<version>/<file>`: the weights' path as callers may see it. Load errors reach
/// clients (a cold start that fails answers the waiting requests), and where the model
/// repository lies on the server is none of their business.
fn repository_relative(path: &Path) -> String {
    let parts: Vec<_> = path.iter().collect();
    let tail = &parts[parts.len().saturating_sub(3)..];
    tail.iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_owned()
}

/// libtorch errors carry a TorchScript traceback; keep the model's own message line,
/// e.g. "RuntimeError: negative input is not allowed".
fn model_message(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .find(|l| l.contains("Error:") || l.starts_with("RuntimeError"))
        .map(str::to_owned)
        .unwrap_or_else(|| first_line(s))
}
