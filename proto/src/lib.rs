//! Protocol types for sluice: the KServe v2 / Triton gRPC inference protocol.
//!
//! Everything lives in package `inference`, generated at build time from the
//! crate's own `proto/model_config.proto` and `proto/grpc_service.proto`
//! (compiled with `protox`, no system `protoc` needed):
//!
//! * [`inference`] — prost messages such as [`inference::ModelInferRequest`]
//!   and [`inference::ModelConfig`], plus the tonic service modules.
//! * [`grpc_inference_service_server`] / [`grpc_inference_service_client`] —
//!   re-exports of the generated tonic server trait/wrapper and client.
//! * [`FILE_DESCRIPTOR_SET`] — the encoded `FileDescriptorSet` of both files,
//!   for gRPC server reflection and for parsing `config.pbtxt` (protobuf text
//!   format) with a reflection library.
//! * [`codec`] — the codec of every generated client and server: prost's, but a
//!   `ModelInferRequest` is checked against the wire-level caps of [`limits`]
//!   before it is decoded.

pub mod codec;
pub mod limits;
pub mod peek;

/// Generated messages, enums and services of protobuf package `inference`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::wildcard_enum_match_arm
)]
pub mod inference {
    tonic::include_proto!("inference");
}

pub use inference::grpc_inference_service_client;
pub use inference::grpc_inference_service_server;

/// Encoded `google.protobuf.FileDescriptorSet` containing
/// `model_config.proto` and `grpc_service.proto` (with source info).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));

/// Fully-qualified protobuf name of the inference service.
pub const SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// Fully-qualified protobuf name of the model configuration message
/// (the schema of `config.pbtxt`).
pub const MODEL_CONFIG_MESSAGE: &str = "inference.ModelConfig";
