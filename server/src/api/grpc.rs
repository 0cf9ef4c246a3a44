//! `inference.GRPCInferenceService`: the KServe v2 / Triton gRPC protocol.

use std::sync::Arc;

use sluice_proto::grpc_inference_service_server::GrpcInferenceService;
use sluice_proto::inference::*;
use tonic::{Request, Response, Status, Streaming};

use std::time::Duration;

use tokio::time::Instant;
use tower::ServiceExt;

use super::{convert, stream};
use crate::admission::{self, InferCall, InferService};
use crate::config::AdmissionConfig;
use crate::config::{ModelControl, ModelControlMode};
use crate::error::{clip, Error};
use crate::gateway::Gateway;
use crate::model::InferResponse;

pub struct InferenceService {
    gateway: Arc<Gateway>,
    control: ModelControl,
    /// The admission stack every inference request goes through.
    admission: InferService,
}

impl InferenceService {
    /// `global`: the server's in-flight limit ([`admission::global_limit`]).
    pub fn new(
        gateway: Arc<Gateway>,
        control: ModelControl,
        admission: &AdmissionConfig,
        global: Option<Arc<tokio::sync::Semaphore>>,
    ) -> InferenceService {
        InferenceService {
            admission: admission::stack(gateway.clone(), admission, global),
            gateway,
            control,
        }
    }

    /// The service as the gRPC and REST endpoints share it.
    pub fn shared(
        gateway: &Arc<Gateway>,
        config: &crate::config::Config,
        global: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Arc<InferenceService> {
        Arc::new(InferenceService::new(
            gateway.clone(),
            config.control.clone(),
            &config.admission,
            global,
        ))
    }

    /// Run one decoded request through the admission stack.
    pub(super) async fn infer(
        admission: InferService,
        req: ModelInferRequest,
        header_timeout: Option<Duration>,
        received: Instant,
    ) -> Result<InferResponse, Error> {
        let (model, version) = (req.model_name.clone(), req.model_version.clone());
        let request = convert::infer_request(req)?;
        admission
            .oneshot(InferCall {
                model,
                version,
                request,
                header_timeout,
                received,
            })
            .await
    }

    /// RepositoryModelLoad/Unload: the bearer token first (when one is configured), then
    /// the control mode.
    fn authorize_control(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        if let Some(token) = &self.control.token {
            let Some(header) = metadata.get("authorization") else {
                return Err(Status::unauthenticated(
                    "model control needs an 'authorization: Bearer <token>' header",
                ));
            };
            let presented = header
                .to_str()
                .unwrap_or_default()
                .strip_prefix("Bearer ")
                .unwrap_or_default();
            if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                return Err(Status::permission_denied(
                    "the model control token is not valid",
                ));
            }
        }
        match self.control.mode {
            ModelControlMode::Explicit => Ok(()),
            ModelControlMode::None => Err(Status::failed_precondition(
                "model control is off: start sluice with --model-control-mode explicit to load and unload models",
            )),
            ModelControlMode::Poll => Err(Status::failed_precondition(
                "models follow the repository (--model-control-mode poll): change its directories \
                 to load, reload or unload models, or start sluice with --model-control-mode \
                 explicit to load and unload them by request",
            )),
        }
    }
}

/// RepositoryModelLoad's parameters, as Triton defines them: `config` (a ModelConfig in
/// JSON) replaces the model's config.pbtxt for this load. `file:<path>` overrides (model
/// files sent with the request) are not supported, and any other key is refused too:
/// a load that silently ignored part of its request would run something else than the
/// caller asked for.
fn load_parameters(
    model: &str,
    parameters: &std::collections::HashMap<String, ModelRepositoryParameter>,
) -> Result<Option<ModelConfig>, Status> {
    let model = crate::spec::clip(model);
    let invalid = |message: String| Status::invalid_argument(format!("model '{model}': {message}"));
    let mut config = None;
    for (key, value) in parameters {
        if key == "config" {
            let Some(model_repository_parameter::ParameterChoice::StringParam(json)) =
                &value.parameter_choice
            else {
                return Err(invalid(
                    "the 'config' parameter must be a string holding the model configuration as JSON"
                        .to_owned(),
                ));
            };
            config = Some(crate::spec::parse_json(json).map_err(|e| {
                invalid(format!(
                    "the 'config' parameter is not a valid model configuration: {e}"
                ))
            })?);
        } else if key.starts_with("file:") {
            return Err(invalid(format!(
                "file overrides are not supported ('{}'): put the model's files in the repository and load it by name",
                crate::spec::clip(key)
            )));
        } else {
            return Err(invalid(format!(
                "unknown load parameter '{}' (supported: 'config')",
                crate::spec::clip(key)
            )));
        }
    }
    Ok(config)
}

/// Compare secrets without an early exit that would leak how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Protocol extensions we implement, as ServerMetadata lists them.
const EXTENSIONS: &[&str] = &[
    "model_repository",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
];

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse {
            live: self.gateway.is_live(),
        }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.gateway.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let req = req.into_inner();
        let ready = self.gateway.is_ready() && self.gateway.model(&req.name, &req.version).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "sluice".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| (*s).to_owned()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        let model = self.gateway.model(&req.name, &req.version)?;
        let spec = &model.spec;
        let tensors = |list: &[crate::spec::TensorSpec]| {
            list.iter()
                .map(|t| model_metadata_response::TensorMetadata {
                    name: t.name.clone(),
                    datatype: t.dtype.wire_name().to_owned(),
                    shape: spec.full_dims(&t.dims),
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: spec.name.clone(),
            versions: self
                .gateway
                .repository
                .versions(&spec.name)
                .iter()
                .map(i64::to_string)
                .collect(),
            platform: spec.config.platform.clone(),
            inputs: tensors(&spec.inputs),
            outputs: tensors(&spec.outputs),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let received = call_start(&req);
        let header_timeout = grpc_timeout(req.metadata())?;
        let response = Self::infer(
            self.admission.clone(),
            req.into_inner(),
            header_timeout,
            received,
        )
        .await?;
        Ok(Response::new(convert::infer_response(response)))
    }

    type ModelStreamInferStream = stream::Answers;

    /// Each request on the stream is answered on it, as [`stream`] describes.
    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let received = call_start(&req);
        // The stream's `grpc-timeout` covers the whole stream.
        let deadline = grpc_timeout(req.metadata())?.map(|t| received + t);
        // The edge's budget reserves each message's decoded heap as the reader reads it.
        let budget = req
            .extensions()
            .get::<super::edge::CallDecodeBudget>()
            .map(|b| b.0.clone());
        let call = stream::StreamCall {
            admission: self.admission.clone(),
            deadline,
            stopping: self.gateway.stopping(),
        };
        Ok(Response::new(stream::serve(call, req.into_inner(), budget)))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let req = req.into_inner();
        let model = self.gateway.model(&req.name, &req.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(model.spec.config.clone()),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let req = req.into_inner();
        let model_stats = if req.name.is_empty() {
            self.gateway
                .repository
                .loaded()
                .iter()
                .map(|m| convert::statistics(m))
                .collect()
        } else if req.version.is_empty() {
            if !self.gateway.repository.is_known(&req.name) {
                return Err(Error::ModelNotFound { model: req.name }.into());
            }
            let all = self.gateway.repository.loaded();
            all.iter()
                .filter(|m| m.spec.name == req.name)
                .map(|m| convert::statistics(m))
                .collect()
        } else {
            vec![convert::statistics(
                self.gateway.model(&req.name, &req.version)?.as_ref(),
            )]
        };
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let ready_only = req.into_inner().ready;
        let models = self
            .gateway
            .repository
            .index()
            .into_iter()
            .filter(|e| !ready_only || e.state == "READY")
            .map(|e| repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.to_owned(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    /// Load or reload a model from the repository (explicit model control mode), with
    /// the configuration a `config` parameter gives, if any.
    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.authorize_control(req.metadata())?;
        let req = req.into_inner();
        let config = load_parameters(&req.model_name, &req.parameters)?;
        let name = req.model_name;
        let gateway = self.gateway.clone();
        tokio::task::spawn_blocking(move || gateway.repository.load(&name, config))
            .await
            .map_err(|e| Status::internal(format!("model load task failed: {e}")))??;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    /// Unload a model: new requests are refused, admitted ones finish.
    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.authorize_control(req.metadata())?;
        let name = req.into_inner().model_name;
        self.gateway.repository.unload(&name)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        Err(unsupported("system shared memory"))
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        Err(unsupported("system shared memory"))
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        Err(unsupported("system shared memory"))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn trace_setting(
        &self,
        _: Request<TraceSettingRequest>,
    ) -> Result<Response<TraceSettingResponse>, Status> {
        Err(unsupported("trace settings"))
    }

    async fn log_settings(
        &self,
        _: Request<LogSettingsRequest>,
    ) -> Result<Response<LogSettingsResponse>, Status> {
        Err(unsupported("log settings (use --log-level)"))
    }
}

/// The call's timeout from its `grpc-timeout` header (gRPC over HTTP/2:
/// up to 8 digits and a unit, H M S m u n).
/// When the call's HEADERS frame arrived (before its body), which timeouts count from.
fn call_start<T>(req: &Request<T>) -> Instant {
    req.extensions()
        .get::<super::edge::RequestStart>()
        .map_or_else(Instant::now, |start| start.0)
}

fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, Status> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default();
    let timeout = parse_grpc_timeout(text).ok_or_else(|| {
        Status::invalid_argument(format!("malformed grpc-timeout header '{}'", clip(text)))
    })?;
    Ok(Some(timeout))
}

pub fn parse_grpc_timeout(text: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by sluice"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_grpc_timeout;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(
            !super::constant_time_eq(b"abc", b"abd") && !super::constant_time_eq(b"abc", b"ab")
        );
        for bad in ["", "m", "10", "1x", "-1m", "123456789m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
