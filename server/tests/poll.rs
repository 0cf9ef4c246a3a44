//! Model control mode `poll`: the server follows the repository while it serves. Each
//! case changes a model directory while requests are in flight (they stall in the
//! model's instances for [`HANG_MS`]) and checks that every one of them is answered,
//! and that the change took effect: a new model serves, a changed config is served, a
//! new version serves, a broken change leaves the old version serving with the reason
//! shown (and the repaired directory loads), a removed model is gone.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{assert_hides_root, eventually, f32s, fp32_request, index_row, load_request};
use common::{TestRepo, TestServer};
use sluice::config::{ModelControlMode, Settings};
use sluice_proto::inference::{ModelConfigRequest, ModelInferResponse};
use tonic::Code;

/// How long a request with a negative value stalls in an instance: far beyond the
/// two scans (one second apart) a change needs to be acted on.
const HANG_MS: u64 = 8000;
/// Longest wait for a change to take effect.
const LIMIT: Duration = Duration::from_secs(15);
/// Requests in flight across each change.
const IN_FLIGHT: usize = 12;

/// A synthetic identity model whose batches with a negative value stall for
/// [`HANG_MS`]; three instances, so that the stalled requests all run at once.
fn config(max_batch_size: u32, extra: &str) -> String {
    format!(
        "backend: \"sluice_synthetic\"\nmax_batch_size: {max_batch_size}\n\
         input [ {{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n\
         output [ {{ name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n\
         instance_group [ {{ count: 3 kind: KIND_CPU }} ]\n\
         dynamic_batching {{ max_queue_delay_microseconds: 100000 }}\n\
         parameters {{ key: \"behavior\" value: {{ string_value: \"hang\" }} }}\n\
         parameters {{ key: \"hang_ms\" value: {{ string_value: \"{HANG_MS}\" }} }}\n{extra}"
    )
}

/// A server in mode poll over `repo`, scanning every second.
async fn start(repo: &Path) -> TestServer {
    let config = Settings {
        model_repository: Some(repo.into()),
        grpc_port: Some(0),
        http_port: Some(0),
        metrics_port: Some(0),
        model_control_mode: Some(ModelControlMode::Poll),
        repository_poll_secs: Some(1),
        ..Settings::default()
    }
    .validate()
    .expect("valid poll settings");
    TestServer::start_with(config).await
}

type Answer = Result<tonic::Response<ModelInferResponse>, tonic::Status>;

/// [`IN_FLIGHT`] requests to `model` that stall in its instances, all admitted when
/// this returns.
async fn stalled(s: &TestServer, model: &str) -> Vec<(f32, tokio::task::JoinHandle<Answer>)> {
    let before = s.gateway.in_flight();
    let requests = (0..IN_FLIGHT)
        .map(|i| {
            let mut client = s.client.clone();
            let request = fp32_request(model, "INPUT__0", &[1, 2], &[-1.0, i as f32]);
            let task = tokio::spawn(async move { client.model_infer(request).await });
            (i as f32, task)
        })
        .collect();
    let gateway = s.gateway.clone();
    eventually(LIMIT, "the stalled requests are admitted", || {
        gateway.in_flight() >= before + IN_FLIGHT
    })
    .await;
    requests
}

/// The change took effect while the requests were still in flight, and every one of
/// them is answered, by the version it was admitted on.
async fn all_answered(requests: Vec<(f32, tokio::task::JoinHandle<Answer>)>, version: &str) {
    assert!(
        requests.iter().any(|(_, task)| !task.is_finished()),
        "the change must land while requests are in flight"
    );
    for (i, task) in requests {
        let answer = task
            .await
            .expect("request task")
            .unwrap_or_else(|e| panic!("in-flight request {i} failed: {e:?}"))
            .into_inner();
        assert_eq!(f32s(&answer.raw_output_contents[0]), vec![-1.0, i]);
        assert_eq!(answer.model_version, version, "request {i}");
    }
}

/// A quick request to `model` (no negative value: it does not stall).
async fn answered(s: &mut TestServer, model: &str) -> ModelInferResponse {
    let request = fp32_request(model, "INPUT__0", &[1, 2], &[1.0, 2.0]);
    let answer = s.client.model_infer(request).await;
    let answer = answer.unwrap_or_else(|e| panic!("{model} answers: {e:?}"));
    answer.into_inner()
}

/// max_batch_size of the version of `model` that new requests get.
fn served_max_batch_size(s: &TestServer, model: &str) -> Option<u32> {
    s.gateway
        .model(model, "")
        .ok()
        .map(|m| m.spec.max_batch_size)
}

#[tokio::test]
async fn a_new_model_directory_is_loaded_and_load_calls_are_refused() {
    let repo = TestRepo::new();
    repo.model("m", &config(8, ""), None);
    let mut s = start(repo.path()).await;
    for name in ["m", "fresh"] {
        let load = load_request(name, None, Default::default());
        let err = s.client.repository_model_load(load).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("poll"), "{}", err.message());
    }

    let requests = stalled(&s, "m").await;
    repo.model("fresh", &config(4, ""), None);
    let gateway = s.gateway.clone();
    eventually(LIMIT, "the new model serves", || {
        gateway.model("fresh", "").is_ok()
    })
    .await;
    all_answered(requests, "1").await;
    assert_eq!(answered(&mut s, "fresh").await.model_version, "1");
    assert_eq!(
        index_row(&mut s, "fresh").await,
        ("READY".into(), "".into())
    );
    answered(&mut s, "m").await;
    s.stop().await;
}

#[tokio::test]
async fn a_changed_config_is_served_after_the_requests_in_flight() {
    let repo = TestRepo::new();
    repo.model("m", &config(8, ""), None);
    let mut s = start(repo.path()).await;
    let requests = stalled(&s, "m").await;
    repo.model("m", &config(16, ""), None);
    eventually(LIMIT, "max_batch_size 16 is served", || {
        served_max_batch_size(&s, "m") == Some(16)
    })
    .await;
    all_answered(requests, "1").await;
    let config = s
        .client
        .model_config(ModelConfigRequest {
            name: "m".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 16);
    answered(&mut s, "m").await;
    s.stop().await;
}

#[tokio::test]
async fn a_new_version_serves_beside_the_unchanged_one() {
    let repo = TestRepo::new();
    let all = "version_policy: { all { } }\n";
    repo.model("m", &config(8, all), None);
    let mut s = start(repo.path()).await;
    let v1 = s.gateway.model("m", "1").expect("version 1");
    let requests = stalled(&s, "m").await;
    std::fs::create_dir(repo.path().join("m/2")).unwrap();
    eventually(LIMIT, "version 2 serves", || {
        s.gateway.repository.versions("m") == vec![1, 2]
    })
    .await;
    all_answered(requests, "1").await;
    assert_eq!(answered(&mut s, "m").await.model_version, "2", "newest");
    // Version 1's files did not change: it kept serving as it was, not reloaded.
    let still = s.gateway.model("m", "1").expect("version 1");
    assert!(std::sync::Arc::ptr_eq(&v1, &still), "version 1 reloaded");
    let mut request = fp32_request("m", "INPUT__0", &[1, 2], &[1.0, 2.0]);
    request.model_version = "1".into();
    let answer = s.client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(answer.model_version, "1");
    s.stop().await;
}

#[tokio::test]
async fn a_broken_change_leaves_the_old_version_serving_until_repaired() {
    let repo = TestRepo::new();
    repo.model("m", &config(8, ""), None);
    let mut s = start(repo.path()).await;
    let requests = stalled(&s, "m").await;
    std::fs::write(repo.path().join("m/config.pbtxt"), "max_batch_size: { nope").unwrap();
    let gateway = s.gateway.clone();
    eventually(LIMIT, "the failed reload is reported", || {
        gateway
            .repository
            .index()
            .iter()
            .any(|row| row.name == "m" && row.reason.contains("reload failed"))
    })
    .await;
    all_answered(requests, "1").await;
    let (state, reason) = index_row(&mut s, "m").await;
    assert_eq!(state, "READY", "{reason}");
    assert!(reason.contains("config.pbtxt"), "{reason}");
    assert_hides_root(repo.path(), &reason);
    assert_eq!(
        served_max_batch_size(&s, "m"),
        Some(8),
        "the old config serves"
    );
    answered(&mut s, "m").await;

    // Repaired: the next polls load it, and the reason goes.
    repo.model("m", &config(4, ""), None);
    eventually(LIMIT, "the repaired config is served", || {
        served_max_batch_size(&s, "m") == Some(4)
    })
    .await;
    assert_eq!(index_row(&mut s, "m").await, ("READY".into(), "".into()));
    answered(&mut s, "m").await;
    s.stop().await;
}

#[tokio::test]
async fn a_removed_model_finishes_its_requests_then_is_gone() {
    let repo = TestRepo::new();
    repo.model("gone", &config(8, ""), None);
    repo.model("stays", &config(8, ""), None);
    let mut s = start(repo.path()).await;
    let requests = stalled(&s, "gone").await;
    std::fs::remove_dir_all(repo.path().join("gone")).unwrap();
    let gateway = s.gateway.clone();
    eventually(LIMIT, "the removed model is unloaded", || {
        !gateway.repository.is_known("gone")
    })
    .await;
    all_answered(requests, "1").await;
    let request = fp32_request("gone", "INPUT__0", &[1, 2], &[1.0, 2.0]);
    let err = s.client.model_infer(request).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let index = common::index(&mut s).await;
    let names: Vec<&str> = index.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["stays"]);
    answered(&mut s, "stays").await;
    s.stop().await;
}
