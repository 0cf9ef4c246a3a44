//! `/metrics` shows request counts by outcome and the duration histograms after traffic.

mod common;

use common::{fp32_request, http_get, TestRepo, TestServer};

#[tokio::test]
async fn metrics_show_requests_and_durations() {
    let repo = TestRepo::new();
    repo.bundled("mlp");
    let mut s = TestServer::start(repo.path()).await;
    for _ in 0..3 {
        s.client
            .model_infer(fp32_request("mlp", "INPUT__0", &[2, 64], &[0.0; 128]))
            .await
            .unwrap();
    }
    let bad = s
        .client
        .model_infer(fp32_request("mlp", "INPUT__0", &[2, 63], &[0.0; 126]))
        .await;
    assert!(bad.is_err());
    let _ = s
        .client
        .model_infer(fp32_request("no_such_model", "x", &[1], &[0.0]))
        .await;

    let (status, body) = http_get(s.metrics, "/metrics").await;
    assert_eq!(status, 200);
    let value = |prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{body}"))
    };
    assert_eq!(
        value("sluice_requests_total{model=\"mlp\",outcome=\"success\"}"),
        3.0
    );
    assert_eq!(
        value("sluice_requests_total{model=\"mlp\",outcome=\"invalid_argument\"}"),
        1.0
    );
    assert_eq!(
        value("sluice_requests_total{model=\"_unknown\",outcome=\"not_found\"}"),
        1.0
    );
    assert_eq!(
        value("sluice_request_duration_seconds_count{model=\"mlp\"}"),
        4.0
    );
    assert_eq!(
        value("sluice_compute_duration_seconds_count{model=\"mlp\"}"),
        3.0
    );
    assert!(body.contains("sluice_compute_duration_seconds_bucket{model=\"mlp\",le=\"0.0001\"}"));
    assert!(body.contains("# HELP sluice_requests_total"));
    s.stop().await;
}
