//! Graceful shutdown of the real binary: on SIGTERM, work in flight completes, new
//! requests get UNAVAILABLE, and the process exits within its grace period.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fp32_request, http_get, TestRepo};
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_work_and_refuses_new_work() {
    let repo = TestRepo::new();
    repo.synthetic("slow", "[ 2 ]", 4, &[("sleep_ms", "1500")]);
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let grace = Duration::from_secs(10);
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--model-repository", repo.path().to_str().unwrap()])
        .args([
            "--grpc-port",
            &grpc.to_string(),
            "--http-port",
            &http.to_string(),
        ])
        .args([
            "--metrics-port",
            &metrics.to_string(),
            "--log-level",
            "warn",
        ])
        .args(["--shutdown-grace-period-secs", &grace.as_secs().to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("sluice starts");
    let mut server = Running(child);
    let http_addr = format!("127.0.0.1:{http}").parse().unwrap();
    let metrics_addr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err()
        || http_get(http_addr, "/v2/health/ready").await.0 != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server never turned ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = loop {
        if let Ok(c) = GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{grpc}")).await
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
    let dispatched = "sluice_queue_duration_seconds_count{model=\"slow\"}";
    let start = Instant::now();
    while common::metric_value(metrics_addr, dispatched)
        .await
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "request never reached the model"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let term_at = Instant::now();
    // Readiness turns false first; from then on new work is refused.
    while http_get(http_addr, "/v2/health/ready").await.0 != 503 {
        assert!(
            term_at.elapsed() < Duration::from_secs(5),
            "readiness never turned false"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    let exit = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            term_at.elapsed() < grace,
            "still running after the grace period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit}");
}
