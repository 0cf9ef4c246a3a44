//! Stuck model instances end to end: an execution that runs past `max_execution_secs` is
//! answered INTERNAL, its instance is counted stuck and replaced (within the cap), a
//! stuck thread that returns is retired, and a model whose every instance is stuck turns
//! the server's liveness false while a slow but working model keeps it true.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::{f32s, fp32_request, http_get, metric_value, TestRepo, TestServer};
use sluice::Config;
use sluice_proto::inference::ServerLiveRequest;
use tonic::Code;

/// The longest execution the servers here allow.
const LIMIT: Duration = Duration::from_millis(200);
/// A batch whose first input holds a negative value never returns.
const HANG: &[(&str, &str)] = &[("behavior", "hang")];
/// Bound on every wait for something that happens in the background.
const WAIT: Duration = Duration::from_secs(10);

fn config(repo: &TestRepo, limit: Duration) -> Config {
    let mut config = Config::for_repository(repo.path());
    config.models.max_execution = Some(limit);
    config
}

/// Liveness as gRPC ServerLive and HTTP /v2/health/live report it.
async fn live(s: &TestServer) -> (bool, u16) {
    let grpc = s
        .client
        .clone()
        .server_live(ServerLiveRequest {})
        .await
        .expect("ServerLive answers")
        .into_inner()
        .live;
    let (http, _) = http_get(s.http, "/v2/health/live").await;
    (grpc, http)
}

/// The gRPC health status of the `liveness` service, which Kubernetes' liveness probe
/// checks.
async fn health_liveness(s: &TestServer) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc))
        .expect("valid address")
        .connect()
        .await
        .expect("health client connects");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: sluice::server::LIVENESS_SERVICE.into(),
        })
        .await
        .expect("health check answers")
        .into_inner()
        .status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Poll `check` every 10 ms until it holds, for at most `WAIT` (then fail with `what`).
async fn until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A value from `/metrics`; a series not exported yet reads 0.
async fn metric(s: &TestServer, series: &str) -> f64 {
    metric_value(s.metrics, &format!("{series} "))
        .await
        .unwrap_or(0.0)
}

fn stuck_gauge(model: &str) -> String {
    format!("sluice_stuck_instances{{model=\"{model}\"}}")
}

fn detections(model: &str) -> String {
    format!("sluice_stuck_instance_detections_total{{model=\"{model}\"}}")
}

/// Send a request that hangs the model and check its answer: INTERNAL, naming the model
/// and the stuck instance, no sooner than the limit and well before the wait bound.
async fn hang(s: &mut TestServer, model: &str) {
    let start = Instant::now();
    let err = s
        .client
        .model_infer(fp32_request(model, "INPUT__0", &[1, 2], &[-1.0, 0.0]))
        .await
        .expect_err("a hanging execution is not answered with a result");
    let took = start.elapsed();
    assert_eq!(err.code(), Code::Internal, "{}", err.message());
    assert!(
        err.message().contains(&format!("'{model}'")) && err.message().contains("instance stuck"),
        "{}",
        err.message()
    );
    assert!(
        took >= LIMIT && took < WAIT,
        "answered after {took:?} (limit {LIMIT:?})"
    );
}

async fn serves(s: &mut TestServer, model: &str) {
    let done = s
        .client
        .model_infer(fp32_request(model, "INPUT__0", &[1, 2], &[1.5, 2.5]))
        .await
        .unwrap_or_else(|e| panic!("{model} serves: {e}"));
    assert_eq!(
        f32s(&done.into_inner().raw_output_contents[0]),
        vec![1.5, 2.5]
    );
}

#[tokio::test]
async fn a_hanging_request_is_answered_and_a_replacement_serves_the_next() {
    let repo = TestRepo::new();
    repo.synthetic("hang_once", "[ 2 ]", 4, HANG);
    let mut s = TestServer::start_with(config(&repo, LIMIT)).await;
    assert_eq!(metric(&s, &detections("hang_once")).await, 0.0);

    hang(&mut s, "hang_once").await;
    // Counted before the requests were answered.
    assert_eq!(metric(&s, &stuck_gauge("hang_once")).await, 1.0);
    assert_eq!(metric(&s, &detections("hang_once")).await, 1.0);

    // The model has one instance: only its replacement can serve this.
    serves(&mut s, "hang_once").await;
    serves(&mut s, "hang_once").await;
    assert_eq!(
        metric(&s, "sluice_instances{model=\"hang_once\"}").await,
        1.0,
        "the replacement is in service, the stuck one is not counted"
    );
    assert_eq!(
        live(&s).await,
        (true, 200),
        "a replacement serves: still live"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_stuck_thread_that_returns_is_retired() {
    let repo = TestRepo::new();
    // Hangs for 1.5 s, far past the 200 ms limit, then returns.
    repo.synthetic(
        "hang_then_return",
        "[ 2 ]",
        4,
        &[("behavior", "hang"), ("hang_ms", "1500")],
    );
    let mut s = TestServer::start_with(config(&repo, LIMIT)).await;

    hang(&mut s, "hang_then_return").await;
    assert_eq!(metric(&s, &stuck_gauge("hang_then_return")).await, 1.0);
    serves(&mut s, "hang_then_return").await;
    let server = &s;
    until(
        "the stuck thread returns and is retired",
        move || async move { metric(server, &stuck_gauge("hang_then_return")).await == 0.0 },
    )
    .await;
    // Retired, not put back: one instance in service, one detection in all.
    assert_eq!(
        metric(&s, "sluice_instances{model=\"hang_then_return\"}").await,
        1.0
    );
    assert_eq!(metric(&s, &detections("hang_then_return")).await, 1.0);
    serves(&mut s, "hang_then_return").await;
    assert_eq!(live(&s).await, (true, 200));
    assert_eq!(health_liveness(&s).await, SERVING);
    s.stop().await;
}

#[tokio::test]
async fn every_instance_stuck_turns_liveness_false_while_other_models_serve() {
    let repo = TestRepo::new();
    repo.synthetic("wedge", "[ 2 ]", 4, HANG)
        .synthetic("healthy", "[ 2 ]", 4, &[]);
    let mut s = TestServer::start_with(config(&repo, LIMIT)).await;
    assert_eq!(live(&s).await, (true, 200));

    // The instance hangs; its replacement hangs too; the cap allows no third.
    hang(&mut s, "wedge").await;
    hang(&mut s, "wedge").await;
    assert_eq!(metric(&s, &stuck_gauge("wedge")).await, 2.0);
    assert_eq!(metric(&s, &detections("wedge")).await, 2.0);
    let server = &s;
    until("liveness turns false", move || async move {
        live(server).await == (false, 503)
    })
    .await;

    // The wedged model refuses at once; the server and its other models keep serving.
    let start = Instant::now();
    let err = s
        .client
        .model_infer(fp32_request("wedge", "INPUT__0", &[1, 2], &[1.0, 2.0]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("every instance is stuck"),
        "{}",
        err.message()
    );
    assert!(start.elapsed() < LIMIT, "refused at once");
    serves(&mut s, "healthy").await;
    assert_eq!(metric(&s, &detections("healthy")).await, 0.0);
    assert_eq!(live(&s).await, (false, 503), "still not live");
    let server = &s;
    until(
        "the gRPC health liveness service turns NOT_SERVING",
        move || async move { health_liveness(server).await == NOT_SERVING },
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn a_slow_model_within_the_limit_keeps_the_server_live() {
    let repo = TestRepo::new();
    repo.synthetic("slow_ok", "[ 2 ]", 4, &[("sleep_ms", "300")]);
    // Far above the model's 300 ms, so a busy machine cannot make it look stuck.
    let mut s = TestServer::start_with(config(&repo, Duration::from_secs(3))).await;
    for _ in 0..3 {
        serves(&mut s, "slow_ok").await;
    }
    assert_eq!(metric(&s, &detections("slow_ok")).await, 0.0);
    assert_eq!(metric(&s, &stuck_gauge("slow_ok")).await, 0.0);
    assert_eq!(live(&s).await, (true, 200));
    assert_eq!(health_liveness(&s).await, SERVING);
    s.stop().await;
}
