//! The KServe v2 REST protocol on the HTTP port, with Triton's extensions (binary tensor
//! data, model statistics, repository index and model control).
//!
//! Every endpoint calls the gRPC service's handler for the same operation, so REST and
//! gRPC share one admission stack (limits, priorities, deadlines), one set of checks and
//! one status table; this module only translates JSON to protocol messages and back, and
//! a `tonic::Status` to an HTTP status with a JSON `{"error": "..."}` body.
//!
//! A request body is bounded before it is read: it may be at most the server's
//! `max_message_bytes`, its bytes (and what its JSON `data` arrays decode to) are
//! reserved from the same server-wide budget as gRPC messages, and it must arrive within
//! the body-read timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH};
use hyper::{Method, Request, StatusCode};
use serde_json::Value;
use sluice_proto::grpc_inference_service_server::GrpcInferenceService;
use sluice_proto::inference::*;
use tokio::time::Instant;
use tonic::Status;

use super::edge::{Budget, RequestStart};
use super::grpc::InferenceService;
use super::http::Handler;
use crate::gateway::Gateway;

mod answer;
mod infer;
mod route;
#[cfg(test)]
mod tests;

pub use answer::http_status;
pub use infer::{decode, encode, AnswerForm, Decoded};

use answer::*;
use route::*;

/// Largest body of a repository index or model control request (as for their gRPC
/// calls): a `config` override is a few KiB.
const CONTROL_BODY_BYTES: usize = 1 << 20;

/// The header that gives the length of a body's JSON part when binary data follows it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The REST endpoints and what bounds their requests.
pub struct Rest {
    pub service: Arc<InferenceService>,
    pub gateway: Arc<Gateway>,
    /// Shared with the gRPC port's edge.
    pub budget: Budget,
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
}

impl Rest {
    /// The REST endpoints of `service`, sharing the gRPC port's request-byte `budget`.
    pub fn new(
        config: &crate::config::Config,
        service: Arc<InferenceService>,
        gateway: &Arc<Gateway>,
        budget: &Budget,
    ) -> Rest {
        Rest {
            service,
            gateway: gateway.clone(),
            budget: budget.clone(),
            max_body_bytes: config.max_message_bytes,
            body_read_timeout: config.edge.body_read_timeout,
        }
    }

    /// The HTTP port's handler.
    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |req| {
            let rest = self.clone();
            Box::pin(async move { rest.answer(req).await })
        })
    }

    async fn answer(&self, req: Request<Incoming>) -> Answer {
        let received = Instant::now();
        let route = match route(req.uri().path()) {
            Ok(route) => route,
            Err(message) => return error(StatusCode::NOT_FOUND, &message),
        };
        let post = matches!(
            route,
            Route::Index
                | Route::Load(_)
                | Route::Unload(_)
                | Route::Model {
                    action: ModelAction::Infer,
                    ..
                }
        );
        let allowed = if post {
            req.method() == Method::POST
        } else {
            req.method() == Method::GET || req.method() == Method::HEAD
        };
        if !allowed {
            let wanted = if post { "POST" } else { "GET" };
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{} takes {wanted}", req.uri().path()),
            );
        }
        let result = match route {
            Route::Model {
                name,
                version,
                action: ModelAction::Infer,
            } => self.infer(req, name, version, received).await,
            Route::Index | Route::Load(_) | Route::Unload(_) => self.control(req, route).await,
            route @ (Route::Server
            | Route::Live
            | Route::Ready
            | Route::AllStats
            | Route::Model { .. }) => self.read(route).await,
        };
        result.unwrap_or_else(|status| status_answer(&status))
    }

    /// The endpoints that read state (GET).
    async fn read(&self, route: Route) -> Result<Answer, Status> {
        let s = &self.service;
        let json = match route {
            Route::Live => {
                return Ok(health(
                    s.server_live(tonic::Request::new(ServerLiveRequest {}))
                        .await?
                        .into_inner()
                        .live,
                ))
            }
            Route::Ready => {
                return Ok(health(
                    s.server_ready(tonic::Request::new(ServerReadyRequest {}))
                        .await?
                        .into_inner()
                        .ready,
                ))
            }
            Route::Server => message_json(
                &s.server_metadata(tonic::Request::new(ServerMetadataRequest {}))
                    .await?
                    .into_inner(),
                "ServerMetadataResponse",
            ),
            Route::AllStats => message_json(
                &s.model_statistics(tonic::Request::new(ModelStatisticsRequest::default()))
                    .await?
                    .into_inner(),
                "ModelStatisticsResponse",
            ),
            Route::Model {
                name,
                version,
                action,
            } => return self.read_model(name, version, action).await,
            Route::Index | Route::Load(_) | Route::Unload(_) => {
                unreachable!("model control is routed to Rest::control")
            }
        };
        Ok(json_answer(StatusCode::OK, &json))
    }

    /// A model's metadata, readiness, config or statistics.
    async fn read_model(
        &self,
        name: String,
        version: String,
        action: ModelAction,
    ) -> Result<Answer, Status> {
        let s = &self.service;
        let json = match action {
            ModelAction::Ready => {
                if !self.gateway.repository.is_known(&name) {
                    return Err(crate::error::Error::ModelNotFound { model: name }.into());
                }
                let ready = s
                    .model_ready(tonic::Request::new(ModelReadyRequest { name, version }))
                    .await?
                    .into_inner()
                    .ready;
                return Ok(health(ready));
            }
            ModelAction::Metadata => message_json(
                &s.model_metadata(tonic::Request::new(ModelMetadataRequest { name, version }))
                    .await?
                    .into_inner(),
                "ModelMetadataResponse",
            ),
            ModelAction::Config => {
                let config = s
                    .model_config(tonic::Request::new(ModelConfigRequest { name, version }))
                    .await?
                    .into_inner()
                    .config
                    .unwrap_or_default();
                message_json(&config, "ModelConfig")
            }
            ModelAction::Stats => message_json(
                &s.model_statistics(tonic::Request::new(ModelStatisticsRequest {
                    name,
                    version,
                }))
                .await?
                .into_inner(),
                "ModelStatisticsResponse",
            ),
            ModelAction::Infer => unreachable!("inference is routed to Rest::infer"),
        };
        Ok(json_answer(StatusCode::OK, &json))
    }

    /// Repository index and model load/unload (POST, with an optional JSON body).
    async fn control(&self, req: Request<Incoming>, route: Route) -> Result<Answer, Status> {
        let authorization = req.headers().get(hyper::header::AUTHORIZATION).cloned();
        let (body, _reserved) = self.body(req, CONTROL_BODY_BYTES).await?;
        let json: Value = if body.is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| Status::invalid_argument(format!("the body is not JSON: {e}")))?
        };
        let parameters = || repository_parameters(json.get("parameters"));
        match route {
            Route::Index => {
                let ready = match json.get("ready") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(Status::invalid_argument("'ready' must be true or false"))
                    }
                };
                let index = self
                    .service
                    .repository_index(tonic::Request::new(RepositoryIndexRequest {
                        repository_name: String::new(),
                        ready,
                    }))
                    .await?
                    .into_inner();
                let models: Vec<Value> = index
                    .models
                    .iter()
                    .map(|m| message_json(m, "RepositoryIndexResponse.ModelIndex"))
                    .collect();
                Ok(json_answer(StatusCode::OK, &Value::Array(models)))
            }
            Route::Load(model_name) => {
                let request = RepositoryModelLoadRequest {
                    repository_name: String::new(),
                    model_name,
                    parameters: parameters()?,
                };
                let request = with_authorization(request, authorization.as_ref());
                self.service.repository_model_load(request).await?;
                Ok(empty_ok())
            }
            Route::Unload(model_name) => {
                let request = RepositoryModelUnloadRequest {
                    repository_name: String::new(),
                    model_name,
                    parameters: parameters()?,
                };
                let request = with_authorization(request, authorization.as_ref());
                self.service.repository_model_unload(request).await?;
                Ok(empty_ok())
            }
            Route::Server | Route::Live | Route::Ready | Route::AllStats | Route::Model { .. } => {
                unreachable!("only model control is routed here")
            }
        }
    }

    async fn infer(
        &self,
        req: Request<Incoming>,
        model: String,
        version: String,
        received: Instant,
    ) -> Result<Answer, Status> {
        let header_len = header_length(&req)?;
        let grpc_timeout = req.headers().get("grpc-timeout").cloned();
        let (body, reserved) = self.body(req, self.max_body_bytes).await?;
        // What JSON `data` arrays decode to is bounded by the body's own limit, and
        // reserved from the budget before it is allocated.
        let mut held = Vec::new();
        let mut refused = None;
        let mut reserve = |bytes| match self.reserve(bytes) {
            Ok(r) => {
                held.push(r);
                true
            }
            Err(status) => {
                refused = Some(status);
                false
            }
        };
        let decoded = decode(
            &model,
            &version,
            &body,
            header_len,
            self.max_body_bytes,
            &mut reserve,
        );
        let decoded = match (decoded, refused) {
            (Ok(decoded), _) => decoded,
            (Err(_), Some(status)) => return Err(status),
            (Err(message), None) => return Err(Status::invalid_argument(message)),
        };
        drop(body);
        let mut request = tonic::Request::new(decoded.request);
        request.extensions_mut().insert(RequestStart(received));
        if let Some(value) = grpc_timeout.and_then(|v| v.to_str().ok()?.parse().ok()) {
            request.metadata_mut().insert("grpc-timeout", value);
        }
        let response = self.service.model_infer(request).await?.into_inner();
        drop((reserved, held));
        self.check_response_size(&response)?;
        Ok(infer_answer(infer::encode(response, &decoded.answer)))
    }

    /// A response whose outputs exceed what a message may hold is refused (as gRPC
    /// refuses to encode it).
    fn check_response_size(&self, response: &ModelInferResponse) -> Result<(), Status> {
        let bytes = response
            .raw_output_contents
            .iter()
            .fold(0usize, |sum, b| sum.saturating_add(b.len()));
        if bytes > self.max_body_bytes {
            return Err(Status::resource_exhausted(format!(
                "the response's outputs ({bytes} bytes) are larger than the {} bytes a message may hold",
                self.max_body_bytes
            )));
        }
        Ok(())
    }

    /// The request's body, whole, with its bytes reserved from the budget.
    async fn body(
        &self,
        req: Request<Incoming>,
        limit: usize,
    ) -> Result<(Bytes, Option<super::edge::Reserved>), Status> {
        if let Some(encoding) = req
            .headers()
            .get(CONTENT_ENCODING)
            .filter(|v| v.as_bytes() != b"identity")
        {
            return Err(Status::invalid_argument(format!(
                "Content-Encoding '{}' is not supported: send the body uncompressed",
                crate::error::clip(&String::from_utf8_lossy(encoding.as_bytes()))
            )));
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .or_else(|| usize::try_from(req.body().size_hint().exact()?).ok());
        if let Some(length) = declared.filter(|&l| l > limit) {
            return Err(too_large(length, limit));
        }
        // Without a length the largest body is reserved: it cannot be known sooner.
        let reserved = match declared {
            Some(0) => None,
            Some(length) => Some(self.reserve(length)?),
            None => Some(self.reserve(limit)?),
        };
        let limited = Limited::new(req.into_body(), limit);
        let body = match tokio::time::timeout(self.body_read_timeout, limited.collect()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "the request body did not arrive within {} s",
                    self.body_read_timeout.as_secs_f64()
                )))
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(too_large(limit.saturating_add(1), limit))
            }
            Ok(Err(e)) => return Err(Status::cancelled(format!("reading the body failed: {e}"))),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        Ok((body, reserved))
    }

    fn reserve(&self, bytes: usize) -> Result<super::edge::Reserved, Status> {
        self.budget
            .try_reserve(bytes)
            .ok_or_else(|| super::edge::budget_full(format!("a REST request of {bytes} bytes")))
    }
}

/// The `Inference-Header-Content-Length` header, when present.
fn header_length(req: &Request<Incoming>) -> Result<Option<usize>, Status> {
    let Some(value) = req.headers().get(HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument("Inference-Header-Content-Length must be a byte count")
        })
}

/// `message` as a gRPC request carrying the HTTP request's `Authorization` header.
fn with_authorization<T>(message: T, authorization: Option<&HeaderValue>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = authorization.and_then(|v| v.to_str().ok()?.parse().ok());
    if let Some(value) = value {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Model control parameters: strings, booleans and integers (a `config` travels as a
/// JSON string, as Triton's clients send it).
fn repository_parameters(
    json: Option<&Value>,
) -> Result<std::collections::HashMap<String, ModelRepositoryParameter>, Status> {
    use model_repository_parameter::ParameterChoice;
    let Some(json) = json else {
        return Ok(Default::default());
    };
    let object = json
        .as_object()
        .ok_or_else(|| Status::invalid_argument("'parameters' must be an object"))?;
    let mut out = std::collections::HashMap::new();
    for (key, value) in object {
        let choice = match value {
            Value::String(s) => ParameterChoice::StringParam(s.clone()),
            Value::Bool(b) => ParameterChoice::BoolParam(*b),
            Value::Number(n) if n.is_i64() => {
                ParameterChoice::Int64Param(n.as_i64().unwrap_or_default())
            }
            Value::Null | Value::Number(_) | Value::Array(_) | Value::Object(_) => {
                return Err(Status::invalid_argument(format!(
                    "parameter '{}' must be a string, a boolean or an integer",
                    crate::error::clip(key)
                )))
            }
        };
        out.insert(
            key.clone(),
            ModelRepositoryParameter {
                parameter_choice: Some(choice),
            },
        );
    }
    Ok(out)
}

fn too_large(length: usize, max: usize) -> Status {
    Status::resource_exhausted(format!(
        "the request body ({length} bytes or more) is larger than the {max} bytes allowed"
    ))
}
