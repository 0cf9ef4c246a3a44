//! sluice: a model-serving gRPC gateway for TorchScript models, speaking the KServe v2 /
//! Triton inference protocol.
//!
//! The request path, module by module:
//!
//! ```text
//! api (tonic service, HTTP health, /metrics)
//!   -> admission (tower stack: deadline, global in-flight limit, per-model adaptive
//!                 concurrency limit with priorities, retry of transient failures)
//!   -> gateway (domain facade: lifecycle, per-request metrics)
//!     -> repository (models by name and version, loaded from a Triton-layout directory)
//!       -> model (validate against config.pbtxt, check outputs, statistics)
//!         -> batcher (per-model queue actor: flush on size, preferred size or delay)
//!           -> pool (instances: named OS threads, one batch each, concat/split)
//!           -> backend (Backend trait: libtorch `torch`, or `synthetic` for tests)
//! ```
//! Cross-cutting: `config` (one validated value), `error` (one enum -> gRPC status),
//! `metrics` (every metric), `tensor` (host tensors), `server` (start-up, shutdown).

pub mod admission;
pub mod api;
pub mod backend;
pub mod batcher;
pub mod config;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod repository;
pub mod server;
pub mod tensor;

pub use config::{Config, Settings};
pub use server::Server;
