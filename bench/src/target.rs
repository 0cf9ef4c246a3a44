//! The server under test: a pool of load connections and the metadata calls that
//! describe a model.
//!
//! One HTTP/2 connection multiplexes every request, but its single socket and the
//! client's single connection task can become the bottleneck at high rates, so the
//! pool opens `connections` independent ones ([`InferConnection`]) and workers take them
//! round-robin. Metadata and the check request go over one more connection, through the
//! generated gRPC client.

use std::time::Duration;

use anyhow::{Context, Result};
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use sluice_proto::inference::{ModelConfigRequest, ModelMetadataRequest, ModelMetadataResponse};
use tonic::transport::{Channel, Endpoint};

use crate::wire::InferConnection;

/// A client of `inference.GRPCInferenceService` on one connection.
pub type Client = GrpcInferenceServiceClient<Channel>;

/// Where to connect and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetConfig {
    /// `host:port` or a full `http://host:port` URL.
    pub url: String,
    /// Independent HTTP/2 connections to open.
    pub connections: usize,
}

/// Large enough for any tensor the bench sends or receives; the server enforces its own limit.
const MAX_MESSAGE_BYTES: usize = 1 << 30;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Open connections to the server.
pub struct Target {
    url: String,
    /// Metadata and the check request.
    client: Client,
    /// The load's connections.
    infer: Vec<InferConnection>,
}

impl Target {
    /// Opens `config.connections` load connections (at least one) and the metadata
    /// connection, and fails if any cannot be made.
    pub async fn connect(config: &TargetConfig) -> Result<Target> {
        let url = normalize_url(&config.url);
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid server address {:?}", config.url))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut infer = Vec::with_capacity(config.connections.max(1));
        for _ in 0..config.connections.max(1) {
            infer.push(InferConnection::connect(&url).await?);
        }
        Ok(Target { url, client, infer })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn connections(&self) -> usize {
        self.infer.len()
    }

    /// The generated gRPC client, for metadata and the check request (a handle clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The load connection `i` modulo the pool size (cheap: a handle clone).
    pub fn infer(&self, i: usize) -> InferConnection {
        self.infer[i % self.infer.len()].clone()
    }

    /// The model's inputs and outputs (ModelMetadata).
    pub async fn model_metadata(
        &self,
        model: &str,
        version: &str,
    ) -> Result<ModelMetadataResponse> {
        let request = ModelMetadataRequest {
            name: model.to_owned(),
            version: version.to_owned(),
        };
        let response = self
            .client()
            .model_metadata(request)
            .await
            .with_context(|| format!("ModelMetadata for model {model:?} failed"))?;
        Ok(response.into_inner())
    }

    /// The model's `max_batch_size` from ModelConfig, or `None` when the server does
    /// not offer ModelConfig (it is optional in KServe v2).
    pub async fn max_batch_size(&self, model: &str, version: &str) -> Option<i32> {
        let request = ModelConfigRequest {
            name: model.to_owned(),
            version: version.to_owned(),
        };
        let response = self.client().model_config(request).await.ok()?;
        response.into_inner().config.map(|c| c.max_batch_size)
    }
}

/// Accepts `host:port` as perf_analyzer does, adding the `http://` scheme.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_url;

    #[test]
    fn bare_host_port_gets_a_scheme() {
        assert_eq!(normalize_url("127.0.0.1:8001"), "http://127.0.0.1:8001");
        assert_eq!(
            normalize_url("http://localhost:8001"),
            "http://localhost:8001"
        );
    }
}
