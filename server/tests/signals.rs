//! Termination signals on the real binary: the first SIGTERM starts the drain, which
//! lasts while a request is in flight; a second SIGTERM or SIGINT during the drain ends
//! the process at once, with exit status 128 + the signal's number.

mod common;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{fp32_request, http_get, TestRepo};
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;

/// Long enough that only the second signal can end the drain within the test.
const GRACE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server process, killed if the test ends while it still runs.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit status, if the process ends within `limit`.
    async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

/// Start the binary on `repo` with a long grace period; wait until it is ready.
async fn start(repo: &TestRepo) -> (Running, u16, u16, u16) {
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--model-repository", repo.path().to_str().unwrap()])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--http-port", &http.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--log-level", "warn"])
        .args(["--shutdown-grace-period-secs", &GRACE.as_secs().to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("sluice starts");
    let mut server = Running(child);
    let http_addr = format!("127.0.0.1:{http}").parse().unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err()
        || http_get(http_addr, "/v2/health/ready").await.0 != 200
    {
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "server exited while starting"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server never turned ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (server, grpc, http, metrics)
}

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
    let (mut server, grpc, http, metrics) = start(&repo).await;
    let mut client = GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .expect("client connects");

    // A request that would run for 30 s; wait until the model has it.
    let in_flight = tokio::spawn(async move {
        client
            .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[-1.0, -2.0]))
            .await
    });
    let metrics_addr = format!("127.0.0.1:{metrics}").parse().unwrap();
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

    server.signal("TERM");
    // Draining: readiness turns false, and the process stays up for the request.
    let http_addr = format!("127.0.0.1:{http}").parse().unwrap();
    let term_at = Instant::now();
    while http_get(http_addr, "/v2/health/ready").await.0 != 503 {
        assert!(
            term_at.elapsed() < Duration::from_secs(5),
            "readiness never turned false"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
