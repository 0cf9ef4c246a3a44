//! The `sluice` binary as a child process, for tests of what only a process shows
//! (signals, exit status).

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{http_get, metric_value, TestRepo};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running server process, killed if the test ends while it still runs.
pub struct Process {
    child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Start the binary on `repo` with the given shutdown grace period, on free loopback
    /// ports, and wait (at most 30 s) until it reports ready.
    pub async fn start(repo: &TestRepo, grace: Duration) -> Process {
        let ports = [free_port(), free_port(), free_port()];
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--model-repository", repo.path().to_str().unwrap()])
            .args(["--grpc-port", &ports[0].to_string()])
            .args(["--http-port", &ports[1].to_string()])
            .args(["--metrics-port", &ports[2].to_string()])
            .args(["--log-level", "warn"])
            .args(["--shutdown-grace-period-secs", &grace.as_secs().to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("sluice starts");
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut process = Process {
            child,
            grpc: addr(ports[0]),
            http: addr(ports[1]),
            metrics: addr(ports[2]),
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(process.http).is_err()
            || http_get(process.http, "/v2/health/ready").await.0 != 200
        {
            assert!(
                process.child.try_wait().unwrap().is_none(),
                "server exited while starting"
            );
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server never turned ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    /// Send signal `name` (`TERM`, `INT`) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit status, if the process ends within `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait (at most 10 s) until `model` has dispatched a request to an instance.
    pub async fn dispatched(&self, model: &str) {
        let series = format!("sluice_queue_duration_seconds_count{{model=\"{model}\"}}");
        let start = Instant::now();
        while metric_value(self.metrics, &series).await.unwrap_or(0.0) < 1.0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "request never reached the model"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait (at most 5 s) until readiness turns false: the drain has begun.
    pub async fn draining(&self) {
        let start = Instant::now();
        while http_get(self.http, "/v2/health/ready").await.0 != 503 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "readiness never turned false"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
