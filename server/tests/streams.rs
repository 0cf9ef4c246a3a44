//! ModelStreamInfer end to end: a stream's `grpc-timeout` bounds every request on it,
//! and a shutdown answers what a stream has received, then ends it at once instead of
//! holding the drain open.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, fp32_request, TestRepo, TestServer};
use sluice::config::Config;
use sluice_proto::inference::{ModelInferRequest, ModelStreamInferResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// Each execution of the slow model; long against the scheduling noise of a busy machine.
const EXECUTION_MS: u64 = 1000;

fn slow_model(repo: &TestRepo) {
    repo.model(
        "slow",
        &format!(
            "backend: \"sluice_synthetic\"\nmax_batch_size: 1\n\
             input [ {{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 4 ] }} ]\n\
             output [ {{ name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 4 ] }} ]\n\
             instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n\
             parameters {{ key: \"sleep_ms\" value: {{ string_value: \"{EXECUTION_MS}\" }} }}\n"
        ),
        None,
    );
}

fn request(id: usize) -> ModelInferRequest {
    let mut req = fp32_request("slow", "INPUT__0", &[1, 4], &[1.0; 4]);
    req.id = format!("r{id}");
    req
}

/// Open a stream with `timeout` as its `grpc-timeout`.
async fn open(
    s: &TestServer,
    timeout: Option<Duration>,
) -> (
    mpsc::Sender<ModelInferRequest>,
    Streaming<ModelStreamInferResponse>,
) {
    let (outbound, rx) = mpsc::channel(16);
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = timeout {
        call.set_timeout(t);
    }
    let answers = s
        .client
        .clone()
        .model_stream_infer(call)
        .await
        .expect("the stream opens")
        .into_inner();
    (outbound, answers)
}

/// Every answer until the stream ends, and the status it ended with.
async fn read_all(
    answers: &mut Streaming<ModelStreamInferResponse>,
) -> (Vec<ModelStreamInferResponse>, Result<(), tonic::Status>) {
    let mut got = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), answers.message()).await {
            Err(_) => panic!("the stream neither answered nor ended in 20 s"),
            Ok(Ok(Some(answer))) => got.push(answer),
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(status)) => break Err(status),
        }
    };
    (got, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_deadline_bounds_each_request_on_it() {
    let repo = TestRepo::new();
    slow_model(&repo);
    let s = TestServer::start(repo.path()).await;
    // Five requests in one instance's queue take five executions; the stream allows
    // about two and a half.
    let timeout = Duration::from_millis(EXECUTION_MS * 5 / 2);
    let (outbound, mut answers) = open(&s, Some(timeout)).await;
    let opened = Instant::now();
    for i in 0..5 {
        outbound.send(request(i)).await.unwrap();
    }
    let (got, end) = read_all(&mut answers).await;
    let status = end.expect_err("the stream ends with its deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(opened.elapsed() < Duration::from_secs(10));
    assert_eq!(got.len(), 5, "every request read is answered: {got:?}");
    let ids: Vec<&str> = got
        .iter()
        .map(|a| a.infer_response.as_ref().unwrap().id.as_str())
        .collect();
    for i in 0..5 {
        assert!(ids.contains(&format!("r{i}").as_str()), "{ids:?}");
    }
    // The instance runs them one at a time, in whatever order they reached its queue:
    // the first fits in the deadline, the last ones cannot finish in time and are
    // answered with the deadline, not left hanging.
    let served = got.iter().filter(|a| a.error_message.is_empty()).count();
    let late = got
        .iter()
        .filter(|a| a.error_message.contains("deadline"))
        .count();
    assert!(served >= 1 && late >= 2, "{got:?}");
    assert_eq!(served + late, 5, "{got:?}");
    drop(outbound);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_what_a_stream_received_then_ends_it() {
    let repo = TestRepo::new();
    slow_model(&repo);
    let mut config = Config::for_repository(repo.path());
    config.shutdown_grace_period = Duration::from_secs(60);
    let s = TestServer::start_with(config).await;
    let (outbound, mut answers) = open(&s, None).await;
    for i in 0..3 {
        outbound.send(request(i)).await.unwrap();
    }
    let gateway = s.gateway.clone();
    eventually(
        Duration::from_secs(10),
        "the stream's requests admitted",
        || gateway.in_flight() == 3,
    )
    .await;
    // The client keeps its side open; the server stops.
    let stopping = Instant::now();
    let stopped = tokio::spawn(s.stop());
    let (got, end) = read_all(&mut answers).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|a| a.error_message.is_empty()), "{got:?}");
    let status = end.expect_err("the stream ends UNAVAILABLE: later requests were not read");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The drain did not wait for the open stream until its grace period ran out.
    tokio::time::timeout(Duration::from_secs(20), stopped)
        .await
        .expect("the server stopped well within its grace period")
        .unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(20));
    drop(outbound);
}
