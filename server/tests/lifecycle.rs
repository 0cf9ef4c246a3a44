//! Model lifecycle end to end: explicit model control with its token, unloading while
//! work is in flight, scale to zero and cold start, and warm-up gating readiness.

mod common;

use std::time::Duration;

use common::{
    eventually, f32s, fp32_request, http_get, index_row, load_request, unload_request, TestRepo,
    TestServer,
};
use sluice::config::{ModelControl, ModelControlMode};
use sluice::Config;
use tonic::Code;

const SLOW: &[(&str, &str)] = &[("sleep_ms", "300")];

#[tokio::test]
async fn explicit_model_control_with_a_token() {
    let repo = TestRepo::new();
    repo.bundled("mlp").synthetic("slow", "[ 2 ]", 4, SLOW);
    let mut config = Config::for_repository(repo.path());
    config.control = ModelControl {
        mode: ModelControlMode::Explicit,
        load_models: vec!["slow".into()],
        token: Some("s3cret".into()),
    };
    let mut s = TestServer::start_with(config).await;

    assert_eq!(
        index_row(&mut s, "mlp").await,
        ("UNAVAILABLE".into(), "unloaded".into())
    );
    assert_eq!(index_row(&mut s, "slow").await.0, "READY");
    let err = s
        .client
        .model_infer(fp32_request("mlp", "INPUT__0", &[1, 64], &[0.0; 64]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // Token checks.
    assert_eq!(
        s.client
            .repository_model_load(load_request("mlp", None, Default::default()))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        s.client
            .repository_model_load(load_request("mlp", Some("guess"), Default::default()))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        s.client
            .repository_model_unload(unload_request("slow", "guess"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Load, then serve.
    s.client
        .repository_model_load(load_request("mlp", Some("s3cret"), Default::default()))
        .await
        .unwrap();
    assert_eq!(index_row(&mut s, "mlp").await.0, "READY");
    s.client
        .model_infer(fp32_request("mlp", "INPUT__0", &[1, 64], &[0.0; 64]))
        .await
        .unwrap();
    let missing = s
        .client
        .repository_model_load(load_request("nope", Some("s3cret"), Default::default()))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Unload while a request runs: it finishes; new ones are refused.
    let mut client = s.client.clone();
    let in_flight = tokio::spawn(async move {
        client
            .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[3.0, 4.0]))
            .await
    });
    let slow = s.gateway.model("slow", "").unwrap();
    eventually(
        Duration::from_secs(5),
        "the slow request is running",
        || slow.instances().1 == 0,
    )
    .await;
    drop(slow);
    s.client
        .repository_model_unload(unload_request("slow", "s3cret"))
        .await
        .unwrap();
    let refused = s
        .client
        .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[3.0, 4.0]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("unloaded"),
        "{}",
        refused.message()
    );
    let done = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes after unload");
    assert_eq!(
        f32s(&done.into_inner().raw_output_contents[0]),
        vec![3.0, 4.0]
    );
    assert_eq!(
        index_row(&mut s, "slow").await,
        ("UNAVAILABLE".into(), "unloaded".into())
    );

    // And back.
    s.client
        .repository_model_load(load_request("slow", Some("s3cret"), Default::default()))
        .await
        .unwrap();
    s.client
        .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[3.0, 4.0]))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn model_control_is_refused_in_mode_none() {
    let repo = TestRepo::new();
    repo.bundled("mlp");
    let mut s = TestServer::start(repo.path()).await;
    let err = s
        .client
        .repository_model_load(load_request("mlp", None, Default::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("explicit"), "{}", err.message());
    s.stop().await;
}

#[tokio::test]
async fn idle_model_scales_to_zero_and_cold_starts_on_demand() {
    let repo = TestRepo::new();
    repo.synthetic(
        "lazy",
        "[ 2 ]",
        4,
        &[
            ("min_instances", "0"),
            ("idle_timeout_secs", "0.2"),
            ("sleep_ms", "20"),
        ],
    );
    let mut s = TestServer::start(repo.path()).await;
    let model = s.gateway.model("lazy", "").unwrap();
    assert_eq!(model.instances().0, 1, "one instance loads at start");
    eventually(
        Duration::from_secs(10),
        "scale to zero after the idle timeout",
        || model.instances().0 == 0,
    )
    .await;
    // Still ready: it loads on demand.
    assert_eq!(http_get(s.http, "/v2/models/lazy/ready").await.0, 200);

    // A burst at zero instances: one cold start, every request served.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut client = s.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .model_infer(fp32_request("lazy", "INPUT__0", &[1, 2], &[i as f32, 1.0]))
                .await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t
            .await
            .unwrap()
            .expect("served after the cold start")
            .into_inner();
        assert_eq!(f32s(&out.raw_output_contents[0]), vec![i as f32, 1.0]);
    }
    let (_, body) = http_get(s.metrics, "/metrics").await;
    let line = body
        .lines()
        .find(|l| l.starts_with("sluice_cold_starts_total{model=\"lazy\"}"))
        .expect("cold start counted");
    assert!(line.ends_with(" 1"), "{line}");
    assert!(body.contains("sluice_cold_start_wait_seconds_count{model=\"lazy\"}"));
    assert!(body.contains("sluice_instance_warmup_duration_seconds_count{model=\"lazy\"}"));
    let _ = s
        .client
        .model_infer(fp32_request("lazy", "INPUT__0", &[1, 2], &[0.0, 0.0]))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_model_that_fails_its_warm_up_never_turns_ready() {
    let repo = TestRepo::new();
    let config = "backend: \"sluice_synthetic\"\nmax_batch_size: 4\n\
        input [ { name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] } ]\n\
        output [ { name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] } ]\n\
        parameters { key: \"behavior\" value: { string_value: \"fail\" } }\n\
        model_warmup [ { name: \"negative\" batch_size: 1 inputs { key: \"INPUT__0\"\n\
          value: { data_type: TYPE_FP32 dims: [ 2 ] input_data_file: \"neg.bin\" } } } ]\n";
    repo.model("picky", config, None).bundled("mlp");
    let warmup = repo.path().join("picky/warmup");
    std::fs::create_dir_all(&warmup).unwrap();
    std::fs::write(
        warmup.join("neg.bin"),
        [(-1.0f32).to_le_bytes(), 1.0f32.to_le_bytes()].concat(),
    )
    .unwrap();
    let mut s = TestServer::start(repo.path()).await;
    let (state, reason) = index_row(&mut s, "picky").await;
    assert_eq!(state, "UNAVAILABLE");
    assert!(
        reason.contains("warm-up sample 'negative' failed"),
        "{reason}"
    );
    assert_eq!(http_get(s.http, "/v2/models/picky/ready").await.0, 503);
    assert_eq!(index_row(&mut s, "mlp").await.0, "READY");
    s.stop().await;
}
