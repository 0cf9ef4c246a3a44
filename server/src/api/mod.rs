//! The protocol edge: gRPC (KServe v2 `inference.GRPCInferenceService`, health,
//! reflection), the KServe v2 REST protocol on the HTTP port, and `/metrics`. Handlers convert protocol messages to
//! domain values and call one `Gateway` method; nothing here knows about channels.

pub mod convert;
pub mod edge;
pub mod grpc;
pub mod http;
pub mod rest;
pub mod stream;
