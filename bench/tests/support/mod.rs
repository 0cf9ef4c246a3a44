//! A minimal KServe v2 server for the bench's tests: one model, `fake`, with input
//! `INPUT__0` FP32 [-1, 4], whose ModelInfer echoes its input after a scripted delay
//! or rejects requests of a scripted priority.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sluice_proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::model_infer_response::InferOutputTensor;
use sluice_proto::inference::model_metadata_response::TensorMetadata;
use sluice_proto::inference::*;
use tokio::time::Instant;
use tonic::codegen::tokio_stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// How ModelInfer answers.
#[derive(Clone, Copy, Debug)]
pub enum Behavior {
    /// Every request that arrives in `[first + after, first + after + length)`, where
    /// `first` is the arrival of the first ModelInfer, is held until that window ends;
    /// all others are answered at once.
    Stall { after: Duration, length: Duration },
    /// Every request is answered after this long.
    Sleep(Duration),
    /// Requests whose `priority` parameter is this level are answered UNAVAILABLE, all
    /// others at once.
    RejectPriority(u64),
}

/// What the server saw, for the tests to check.
#[derive(Default)]
pub struct Seen {
    first: OnceLock<Instant>,
    pub infers: AtomicU64,
    /// Requests that arrived inside the stall window.
    pub stalled: AtomicU64,
    /// ModelInfer requests per uint64 `priority` parameter (None: without one).
    priorities: Mutex<BTreeMap<Option<u64>, u64>>,
}

impl Seen {
    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::Relaxed)
    }

    pub fn priorities(&self) -> BTreeMap<Option<u64>, u64> {
        self.priorities.lock().expect("not poisoned").clone()
    }
}

/// The request's `priority` parameter, if it is a uint64 one as Triton's protocol has it.
fn priority(req: &ModelInferRequest) -> Option<u64> {
    match req.parameters.get("priority")?.parameter_choice {
        Some(ParameterChoice::Uint64Param(level)) => Some(level),
        _ => None,
    }
}

struct Fake {
    behavior: Behavior,
    seen: Arc<Seen>,
}

/// Starts the fake on 127.0.0.1 with a free port; it runs until the test's runtime ends.
pub async fn start(behavior: Behavior) -> (SocketAddr, Arc<Seen>) {
    start_with(behavior, true).await
}

/// As [`start`], choosing whether accepted sockets set TCP_NODELAY.
pub async fn start_with(behavior: Behavior, nodelay: bool) -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let seen = Arc::new(Seen::default());
    let service = GrpcInferenceServiceServer::new(Fake {
        behavior,
        seen: Arc::clone(&seen),
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(nodelay)))
            .await
            .expect("the fake server runs");
    });
    (addr, seen)
}

fn tensor(name: &str) -> TensorMetadata {
    TensorMetadata {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![-1, 4],
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not offered by the fake server"))
}

#[tonic::async_trait]
impl GrpcInferenceService for Fake {
    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let now = Instant::now();
        let first = *self.seen.first.get_or_init(|| now);
        self.seen.infers.fetch_add(1, Ordering::Relaxed);
        let level = priority(req.get_ref());
        *self
            .seen
            .priorities
            .lock()
            .expect("not poisoned")
            .entry(level)
            .or_default() += 1;
        match self.behavior {
            Behavior::Stall { after, length } => {
                let (from, until) = (first + after, first + after + length);
                if now >= from && now < until {
                    self.seen.stalled.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep_until(until).await;
                }
            }
            Behavior::Sleep(d) => tokio::time::sleep(d).await,
            Behavior::RejectPriority(rejected) if level == Some(rejected) => {
                return Err(Status::unavailable(format!(
                    "priority {rejected} is not served"
                )));
            }
            Behavior::RejectPriority(_) => {}
        }
        let req = req.into_inner();
        let outputs = req
            .inputs
            .iter()
            .map(|i| InferOutputTensor {
                name: "OUTPUT__0".into(),
                datatype: i.datatype.clone(),
                shape: i.shape.clone(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ModelInferResponse {
            model_name: req.model_name,
            outputs,
            raw_output_contents: req.raw_input_contents,
            ..Default::default()
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        if req.get_ref().name != "fake" {
            return Err(Status::not_found(format!(
                "unknown model {:?}",
                req.get_ref().name
            )));
        }
        Ok(Response::new(ModelMetadataResponse {
            name: "fake".into(),
            versions: vec!["1".into()],
            platform: "fake".into(),
            inputs: vec![tensor("INPUT__0")],
            outputs: vec![tensor("OUTPUT__0")],
        }))
    }

    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        _: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse { ready: true }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        unimplemented()
    }

    type ModelStreamInferStream = tokio_stream::Empty<Result<ModelStreamInferResponse, Status>>;

    async fn model_stream_infer(
        &self,
        _: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        unimplemented()
    }

    // No ModelConfig: the bench must then take a leading -1 as the batch dimension.
    async fn model_config(
        &self,
        _: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        unimplemented()
    }

    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        unimplemented()
    }

    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        unimplemented()
    }

    async fn repository_model_load(
        &self,
        _: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        unimplemented()
    }

    async fn repository_model_unload(
        &self,
        _: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        unimplemented()
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        unimplemented()
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        unimplemented()
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        unimplemented()
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        unimplemented()
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        unimplemented()
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        unimplemented()
    }

    async fn trace_setting(
        &self,
        _: Request<TraceSettingRequest>,
    ) -> Result<Response<TraceSettingResponse>, Status> {
        unimplemented()
    }

    async fn log_settings(
        &self,
        _: Request<LogSettingsRequest>,
    ) -> Result<Response<LogSettingsResponse>, Status> {
        unimplemented()
    }
}
