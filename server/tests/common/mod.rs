//! Black-box test support: throwaway model repositories and a real server on
//! 127.0.0.1 with free ports, driven through the generated gRPC client.
#![allow(dead_code)] // each test binary uses a different part

pub mod process;
pub mod raw_h2;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sluice::{Config, Server};
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use sluice_proto::inference::{
    model_infer_request::InferInputTensor, repository_index_response, ModelInferRequest,
    ModelRepositoryParameter, RepositoryIndexRequest, RepositoryModelLoadRequest,
    RepositoryModelUnloadRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub type Client = GrpcInferenceServiceClient<Channel>;

/// Directory with the test-only weights written by `models/export.py --test-weights`.
pub fn test_weights(file: &str) -> PathBuf {
    let dir = std::env::var_os("SLUICE_TEST_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-weights"));
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `make test` (or `python models/export.py --test-weights {}`)",
        path.display(),
        dir.display()
    );
    path
}

/// The bundled repository (`models/`), with exported weights.
pub fn bundled_models() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    assert!(
        dir.join("mlp/1/model.pt").is_file(),
        "bundled weights are missing: run `make test`"
    );
    dir
}

/// A model repository in a temporary directory.
pub struct TestRepo {
    dir: tempfile::TempDir,
}

impl TestRepo {
    pub fn new() -> TestRepo {
        TestRepo {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `<name>/config.pbtxt` and, if given, `<name>/1/model.pt` copied from `weights`.
    pub fn model(&self, name: &str, config: &str, weights: Option<&Path>) -> &TestRepo {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(dir.join("1")).expect("create model dir");
        std::fs::write(dir.join("config.pbtxt"), config).expect("write config");
        if let Some(w) = weights {
            std::fs::copy(w, dir.join("1/model.pt")).expect("copy weights");
        }
        self
    }

    /// A copy of a bundled model (config and weights).
    pub fn bundled(&self, name: &str) -> &TestRepo {
        let src = bundled_models().join(name);
        let config = std::fs::read_to_string(src.join("config.pbtxt")).expect("bundled config");
        self.model(name, &config, Some(&src.join("1/model.pt")))
    }

    /// A synthetic identity model with one FP32 input and output of `dims`.
    pub fn synthetic(
        &self,
        name: &str,
        dims: &str,
        max_batch_size: u32,
        parameters: &[(&str, &str)],
    ) -> &TestRepo {
        let params: String = parameters
            .iter()
            .map(|(k, v)| {
                format!("parameters {{ key: \"{k}\" value: {{ string_value: \"{v}\" }} }}\n")
            })
            .collect();
        let config = format!(
            "backend: \"sluice_synthetic\"\nmax_batch_size: {max_batch_size}\n\
             input [ {{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: {dims} }} ]\n\
             output [ {{ name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: {dims} }} ]\n{params}"
        );
        self.model(name, &config, None)
    }
}

/// A server running in this process on free loopback ports.
pub struct TestServer {
    pub client: Client,
    pub gateway: std::sync::Arc<sluice::gateway::Gateway>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(repo: &Path) -> TestServer {
        TestServer::start_with(Config::for_repository(repo)).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        let server = Server::bind(config).await.expect("server binds");
        let (grpc, http, metrics) = (
            server.grpc_addr(),
            server.http_addr(),
            server.metrics_addr(),
        );
        let gateway = server.gateway();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(shutdown.clone()));
        let client = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
            .await
            .expect("client connects");
        TestServer {
            client,
            gateway,
            grpc,
            http,
            metrics,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("server task")
            .expect("server stops cleanly");
    }
}

/// An FP32 request with the tensor in `raw_input_contents`, as tritonclient sends it.
pub fn fp32_request(model: &str, input: &str, shape: &[i64], values: &[f32]) -> ModelInferRequest {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_request(model, input, "FP32", shape, raw)
}

pub fn raw_request(
    model: &str,
    input: &str,
    datatype: &str,
    shape: &[i64],
    raw: Vec<u8>,
) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: input.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Poll `check` every 5 ms until it holds, for at most `limit` (then fail with `what`).
pub async fn eventually(limit: std::time::Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// One sample's value from `/metrics` (the line starting with `prefix`), if present.
pub async fn metric_value(addr: SocketAddr, prefix: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// RepositoryModelLoad of `name` with `parameters`, with `authorization: Bearer <token>`
/// when a token is given.
pub fn load_request(
    name: &str,
    token: Option<&str>,
    parameters: std::collections::HashMap<String, ModelRepositoryParameter>,
) -> tonic::Request<RepositoryModelLoadRequest> {
    let mut req = tonic::Request::new(RepositoryModelLoadRequest {
        model_name: name.into(),
        parameters,
        ..Default::default()
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// RepositoryModelUnload of `name` with `authorization: Bearer <token>`.
pub fn unload_request(name: &str, token: &str) -> tonic::Request<RepositoryModelUnloadRequest> {
    let mut req = tonic::Request::new(RepositoryModelUnloadRequest {
        model_name: name.into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Every row of RepositoryIndex.
pub async fn index(s: &mut TestServer) -> Vec<repository_index_response::ModelIndex> {
    s.client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models
}

/// State and reason of `name` in RepositoryIndex (the model must be listed).
pub async fn index_row(s: &mut TestServer, name: &str) -> (String, String) {
    let row = index(s)
        .await
        .into_iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} in the index"));
    (row.state, row.reason)
}

/// Fail if `text` shows where the repository `root` lies, as given or canonical.
pub fn assert_hides_root(root: &Path, text: &str) {
    for root in [root.to_path_buf(), root.canonicalize().unwrap()] {
        let root = root.display().to_string();
        assert!(
            !text.contains(&root),
            "answer names the repository's location {root}: {text}"
        );
    }
}

/// A good request to the bundled `mlp` in the repository is answered.
pub async fn good_request_is_answered(s: &mut TestServer) {
    let ok = s
        .client
        .model_infer(fp32_request("mlp", "INPUT__0", &[1, 64], &[0.5; 64]))
        .await;
    assert!(ok.is_ok(), "the good model answers: {ok:?}");
}
