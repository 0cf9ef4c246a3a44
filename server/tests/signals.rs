//! Termination signals on the real binary: the first SIGTERM starts the drain, which
//! lasts while a request is in flight; a second SIGTERM or SIGINT during the drain ends
//! the process at once, with exit status 128 + the signal's number.

mod common;

use std::time::Duration;

use common::process::Process;
use common::{fp32_request, TestRepo};
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// Long enough that only the second signal can end the drain within the test.
const GRACE: Duration = Duration::from_secs(60);

/// SIGTERM with a request in flight, then `second` while draining: the process ends at
/// once with exit status `expected`.
async fn second_signal_exits_at_once(second: &str, expected: i32) {
    let repo = TestRepo::new();
    // A negative input stalls the batch 30 s (warm-up's zeros pass at once).
    repo.synthetic(
        "slow",
        "[ 2 ]",
        4,
        &[("behavior", "hang"), ("hang_ms", "30000")],
    );
    let mut server = Process::start(&repo, GRACE).await;
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .expect("client connects");

    // A request that would run for 30 s; wait until the model has it.
    let in_flight = tokio::spawn(async move {
        client
            .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[-1.0, -2.0]))
            .await
    });
    server.dispatched("slow").await;

    server.signal("TERM");
    // Draining: readiness turns false, and the process stays up for the request.
    server.draining().await;
    assert_eq!(
        server.exit_within(Duration::from_millis(500)).await,
        None,
        "the process must still be draining"
    );
    assert!(!in_flight.is_finished(), "the request is still in flight");

    server.signal(second);
    let exit = server
        .exit_within(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running 5 s after a second signal ({second})"));
    assert_eq!(exit.code(), Some(expected), "exit status {exit}");
    in_flight.abort();
}

#[tokio::test]
async fn a_second_sigterm_while_draining_exits_at_once_with_143() {
    second_signal_exits_at_once("TERM", 143).await;
}

#[tokio::test]
async fn a_sigint_while_draining_exits_at_once_with_130() {
    second_signal_exits_at_once("INT", 130).await;
}
