//! Graceful shutdown of the real binary: on SIGTERM, work in flight completes, new
//! requests get UNAVAILABLE, and the process exits within its grace period.

mod common;

use std::time::{Duration, Instant};

use common::process::Process;
use common::{fp32_request, TestRepo};
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;

#[tokio::test]
async fn sigterm_drains_in_flight_work_and_refuses_new_work() {
    let repo = TestRepo::new();
    repo.synthetic("slow", "[ 2 ]", 4, &[("sleep_ms", "1500")]);
    let grace = Duration::from_secs(10);
    let mut server = Process::start(&repo, grace).await;
    let mut client = loop {
        if let Ok(c) = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc)).await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // A request that runs for 1.5 s; wait until the model has it.
    let mut in_flight_client = client.clone();
    let in_flight = tokio::spawn(async move {
        in_flight_client
            .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[1.0, 2.0]))
            .await
    });
    server.dispatched("slow").await;

    server.signal("TERM");
    let term_at = Instant::now();
    // Readiness turns false first; from then on new work is refused.
    server.draining().await;
    let refused = client
        .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[1.0, 2.0]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert!(
        refused.message().contains("shutting down"),
        "{}",
        refused.message()
    );

    let done = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(done.into_inner().outputs[0].shape, vec![1, 2]);
    let exit = server
        .exit_within(grace.saturating_sub(term_at.elapsed()))
        .await
        .expect("the process ends within the grace period");
    assert!(exit.success(), "exit status {exit}");
}
