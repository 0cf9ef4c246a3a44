//! A client that goes away takes its queued work with it: unary calls cancelled by the
//! client (RST_STREAM) and a ModelStreamInfer stream cancelled with requests queued are
//! dropped before they reach the model, and `/metrics` counts them.

mod common;

use std::time::Duration;

use common::{eventually, fp32_request, metric_value, TestRepo, TestServer};
use sluice_proto::inference::ModelInferRequest;

/// How long the running request holds the model's only instance: the cancelled
/// requests stay queued behind it for that long, however slow the machine.
const HOLD_MS: u64 = 3000;
/// Requests queued behind the one running, then cancelled.
const QUEUED: usize = 8;

/// A synthetic model with one instance that runs one request per execution: a request
/// with a negative input holds it for [`HOLD_MS`], others are answered at once.
fn slow_model(repo: &TestRepo, name: &str) {
    let config = format!(
        "backend: \"sluice_synthetic\"\nmax_batch_size: 1\n\
         input [ {{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 4 ] }} ]\n\
         output [ {{ name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 4 ] }} ]\n\
         instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n\
         parameters {{ key: \"behavior\" value: {{ string_value: \"hang\" }} }}\n\
         parameters {{ key: \"hang_ms\" value: {{ string_value: \"{HOLD_MS}\" }} }}\n"
    );
    repo.model(name, &config, None);
}

/// A request answered at once.
fn request(model: &str) -> ModelInferRequest {
    fp32_request(model, "INPUT__0", &[1, 4], &[1.0; 4])
}

/// A request that holds the instance for [`HOLD_MS`].
fn holding(model: &str) -> ModelInferRequest {
    fp32_request(model, "INPUT__0", &[1, 4], &[-1.0; 4])
}

/// The counters that tell what happened to a model's requests.
struct Counts {
    /// Samples the model executed.
    inferences: f64,
    /// Requests dropped because their caller went away.
    cancelled: f64,
    successes: f64,
}

async fn counts(s: &TestServer, model: &str) -> Counts {
    let value = |name: &str, labels: &str| {
        let prefix = format!("{name}{{model=\"{model}\"{labels}}}");
        async move { metric_value(s.metrics, &prefix).await.unwrap_or(0.0) }
    };
    Counts {
        inferences: value("sluice_inferences_total", "").await,
        cancelled: value("sluice_dropped_requests_total", ",reason=\"cancelled\"").await,
        successes: value("sluice_requests_total", ",outcome=\"success\"").await,
    }
}

/// Wait until `n` requests are admitted (queued or running).
async fn admitted(s: &TestServer, n: usize) {
    let gateway = s.gateway.clone();
    eventually(Duration::from_secs(10), "requests admitted", || {
        gateway.in_flight() == n
    })
    .await;
}

/// The counts once `sluice_dropped_requests_total{reason="cancelled"}` has grown by
/// `cancelled` and `sluice_inferences_total` by `inferences` since `before`.
async fn counted(
    s: &TestServer,
    model: &str,
    before: &Counts,
    cancelled: f64,
    inferences: f64,
) -> Counts {
    let start = std::time::Instant::now();
    loop {
        let now = counts(s, model).await;
        let grown = (
            now.cancelled - before.cancelled,
            now.inferences - before.inferences,
        );
        if grown.0 >= cancelled && grown.1 >= inferences {
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "(cancelled, inferred) grew by {grown:?}, ({cancelled}, {inferences}) expected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_unary_calls_never_reach_the_model() {
    let repo = TestRepo::new();
    slow_model(&repo, "slow_unary");
    let s = TestServer::start(repo.path()).await;
    let before = counts(&s, "slow_unary").await;

    // One request occupies the only instance; the others queue behind it.
    let mut client = s.client.clone();
    let running = tokio::spawn(async move { client.model_infer(holding("slow_unary")).await });
    admitted(&s, 1).await;
    let queued: Vec<_> = (0..QUEUED)
        .map(|_| {
            let mut client = s.client.clone();
            tokio::spawn(async move { client.model_infer(request("slow_unary")).await })
        })
        .collect();
    admitted(&s, 1 + QUEUED).await;
    // The clients give up: each call's future is dropped, which resets its HTTP/2 stream.
    for call in &queued {
        call.abort();
    }
    for call in queued {
        assert!(call.await.unwrap_err().is_cancelled());
    }
    running
        .await
        .unwrap()
        .expect("the running request is answered");

    // Every cancelled request is counted as it leaves the queue; none executed.
    let after = counted(&s, "slow_unary", &before, QUEUED as f64, 1.0).await;
    assert_eq!(after.cancelled - before.cancelled, QUEUED as f64);
    assert_eq!(
        after.inferences - before.inferences,
        1.0,
        "only the running one executed"
    );
    assert_eq!(after.successes - before.successes, 1.0);
    assert_eq!(s.gateway.in_flight(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_drops_its_queued_requests() {
    let repo = TestRepo::new();
    slow_model(&repo, "slow_stream");
    let s = TestServer::start(repo.path()).await;
    let before = counts(&s, "slow_stream").await;

    let (outbound, rx) = tokio::sync::mpsc::channel(16);
    let mut client = s.client.clone();
    let mut answers = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    // One holds the instance, then the others wait in the model's queue.
    outbound.send(holding("slow_stream")).await.unwrap();
    admitted(&s, 1).await;
    for _ in 0..QUEUED {
        outbound.send(request("slow_stream")).await.unwrap();
    }
    admitted(&s, 1 + QUEUED).await;
    // The client cancels the stream: both halves dropped, the call is reset.
    drop(answers);
    drop(outbound);
    // The holding request finishes on its instance; the queued ones never start.
    let after = counted(&s, "slow_stream", &before, QUEUED as f64, 1.0).await;
    assert_eq!(after.cancelled - before.cancelled, QUEUED as f64);
    assert_eq!(
        after.inferences - before.inferences,
        1.0,
        "only the running one executed"
    );
    let gateway = s.gateway.clone();
    eventually(Duration::from_secs(10), "the stream's work ended", || {
        gateway.in_flight() == 0
    })
    .await;
    // The server goes on serving streams.
    let (outbound, rx) = tokio::sync::mpsc::channel(1);
    answers = s
        .client
        .clone()
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    outbound.send(request("slow_stream")).await.unwrap();
    drop(outbound);
    let answer = answers.message().await.unwrap().expect("an answer");
    assert_eq!(answer.error_message, "");
    assert!(
        answers.message().await.unwrap().is_none(),
        "then the stream ends OK"
    );
    s.stop().await;
}
