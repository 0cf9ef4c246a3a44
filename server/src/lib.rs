//! sluice: a model-serving gRPC gateway for TorchScript models, speaking the KServe v2 /
//! Triton inference protocol.
//!
//! The request path, module by module:
//!
//! ```text
//! api (tonic service, the transport edge, HTTP health, /metrics)
//!   -> admission (tower stack: deadline, global in-flight limit, per-model adaptive
//!                 concurrency limit with priorities, retry of transient failures)
//!   -> gateway (lifecycle, per-request accounting)
//!     -> repository (models by name and version, loaded from a Triton-layout directory)
//!       -> model (validate against config.pbtxt, check outputs)
//!         -> batcher (per-model queue actor: flush on size, preferred size or delay)
//!           -> pool (instances: named OS threads, one batch each, concat/split)
//!             -> backend (Backend trait: libtorch `torch`, or `synthetic` for tests)
//! ```
//!
//! Modules are layered; a module imports only from layers below its own (checked by
//! `tests/architecture.rs`, which reads this table):
//!
//! | layer | modules | what they are |
//! | --- | --- | --- |
//! | 11 | server | start-up, listeners, shutdown |
//! | 10 | api | transport edge, gRPC service, protocol conversion, HTTP |
//! | 9 | admission | the tower stack in front of inference |
//! | 8 | gateway | lifecycle flags, per-request accounting |
//! | 7 | repository | the models by name and version |
//! | 6 | model | one loaded model version: validation, its queue, its limit |
//! | 5 | batcher | the per-model queue actor and the batching plan |
//! | 4 | pool | instance threads |
//! | 3 | backend, metrics | executing a model; every metric |
//! | 2 | spec | a config.pbtxt parsed and checked (plain data) |
//! | 1 | config, error, work | settings; the error enum; what passes between batcher and pool |
//! | 0 | limit, stats, tensor | the concurrency-limit algorithm; statistics; host tensors |

pub mod admission;
pub mod api;
pub mod backend;
pub mod batcher;
pub mod config;
pub mod error;
pub mod gateway;
pub mod limit;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod repository;
pub mod server;
pub mod spec;
pub mod stats;
pub mod tensor;
pub mod work;

pub use config::{Config, Settings};
pub use server::Server;
