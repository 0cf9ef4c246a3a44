//! The protocol edge: gRPC (KServe v2 `inference.GRPCInferenceService`, health,
//! reflection) and plain HTTP (health, metrics). Handlers convert protocol messages to
//! domain values and call one `Gateway` method; nothing here knows about channels.

pub mod convert;
pub mod edge;
pub mod grpc;
pub mod http;
