//! A hostile load against a running sluice, with a good client beside it, and the
//! server's resident memory sampled throughout:
//!
//! - `--stallers` HTTP/2 streams (over `--connections` connections) each announce a
//!   message of `--max-message-bytes`, send all of it but its last byte, and stall;
//!   when the server ends one (refused, timed out) it is opened again;
//! - `--senders` tasks send complete maximum-size ModelInfer messages back to back
//!   (valid protobuf naming `mlp`, with a shape that does not fit it);
//! - `--amplifiers` tasks send messages made of nothing but empty `inputs` entries,
//!   the cheapest bytes to send and the costliest to decode naively;
//! - one good client sends a `mlp` request every 10 ms and records its latency.
//!
//! First `--baseline-seconds` of the good client alone, then `--seconds` of attack.
//! Prints one JSON object: RSS (baseline, peak, VmHWM), the good client's answers and
//! latency before and during the attack, and what the adversaries were answered.
//!
//!     cargo run --release -p sluice --example adversary -- --grpc 127.0.0.1:8001 --pid PID

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use prost::Message;
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use sluice_proto::inference::{model_infer_request::InferInputTensor, ModelInferRequest};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// The server's gRPC address.
    #[arg(long, default_value = "127.0.0.1:8001")]
    grpc: SocketAddr,
    /// The server's process id (its RSS is read from /proc).
    #[arg(long)]
    pid: u32,
    /// The server's max_message_bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_message_bytes: usize,
    /// Connections the stalling streams are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Streams that announce a maximum-size message and stall before its last byte.
    #[arg(long, default_value_t = 64)]
    stallers: usize,
    /// Tasks sending complete maximum-size messages back to back.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Tasks sending messages of empty `inputs` entries back to back.
    #[arg(long, default_value_t = 4)]
    amplifiers: usize,
    /// Size of each amplifying message, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    amplifier_bytes: usize,
    /// Seconds of the good client alone before the attack.
    #[arg(long, default_value_t = 5)]
    baseline_seconds: u64,
    /// Seconds of attack.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn framed(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&u32::try_from(message.len()).expect("fits").to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

fn request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://sluice{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("valid request")
}

/// Tally of gRPC status codes (or transport errors) the adversaries got.
type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(tally: &Tally, what: String) {
    *tally.lock().unwrap().entry(what).or_default() += 1;
}

async fn connect(addr: SocketAddr) -> Option<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (send, connection) = h2::client::handshake(tcp).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(send)
}

/// Send `body` on a new stream; end it or leave it open; return its gRPC status.
async fn call(
    send: &mut h2::client::SendRequest<Bytes>,
    body: Bytes,
    end: bool,
) -> Result<String, String> {
    let ready = send.clone().ready().await.map_err(|e| e.to_string())?;
    let mut ready = ready;
    let (response, mut stream) = ready
        .send_request(request(INFER), false)
        .map_err(|e| e.to_string())?;
    stream.reserve_capacity(body.len());
    // Send as flow control allows; a refused stream stops taking data.
    let mut rest = body;
    let sender = async {
        while !rest.is_empty() {
            match futures_capacity(&mut stream).await {
                Some(n) if n > 0 => {
                    let chunk = rest.split_to(n.min(rest.len()));
                    if stream.send_data(chunk, false).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
        if end {
            let _ = stream.send_data(Bytes::new(), true);
        } else {
            // Stall: keep the stream open until the server ends it.
            std::future::pending::<()>().await;
        }
    };
    let answer = async {
        let response = response.await.map_err(|e| e.to_string())?;
        let status = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        if let Some(s) = status(response.headers()) {
            return Ok(s);
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.map_err(|e| e.to_string())?;
        Ok(trailers
            .as_ref()
            .and_then(status)
            .unwrap_or_else(|| "none".into()))
    };
    tokio::pin!(answer);
    tokio::select! {
        answer = &mut answer => answer,
        // The server stopped taking data (it answered, or reset the stream).
        _ = sender => answer.await,
    }
}

async fn futures_capacity(stream: &mut h2::SendStream<Bytes>) -> Option<usize> {
    std::future::poll_fn(|cx| stream.poll_capacity(cx))
        .await
        .and_then(|r| r.ok())
}

fn code_name(code: &str) -> String {
    match code {
        "0" => "OK",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "8" => "RESOURCE_EXHAUSTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        other => other,
    }
    .to_owned()
}

/// A ModelInfer message of `len` bytes naming `mlp` with a shape it does not take.
fn max_size_message(len: usize) -> Bytes {
    let head = ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT__0".into(),
            datatype: "FP32".into(),
            shape: vec![1, 3],
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    // Field 7 (raw_input_contents), length-delimited, filling the rest.
    let mut msg = head;
    let room = len.saturating_sub(msg.len() + 1 + 10);
    msg.push((7 << 3) | 2);
    prost::encoding::encode_varint(room as u64, &mut msg);
    msg.resize(msg.len() + room, 0);
    framed(&msg)
}

/// `len` bytes of empty `inputs` entries (field 5, length 0).
fn amplifying_message(len: usize) -> Bytes {
    let mut msg = Vec::with_capacity(len);
    while msg.len() + 2 <= len {
        msg.extend_from_slice(&[(5 << 3) | 2, 0]);
    }
    framed(&msg)
}

/// One adversary: sends `body` on a new stream of its connection again and again until
/// `until`, counting what the server answered.
struct Attack {
    label: &'static str,
    grpc: SocketAddr,
    body: Bytes,
    /// Whether the body ends (a complete message) or stalls.
    end: bool,
    until: Instant,
}

impl Attack {
    async fn run(self, tally: Tally, mut send: Option<h2::client::SendRequest<Bytes>>) {
        let label = self.label;
        while Instant::now() < self.until {
            if send.is_none() {
                send = connect(self.grpc).await;
            }
            let Some(s) = send.as_mut() else {
                count(&tally, format!("{label}: cannot connect"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let left = self.until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, call(s, self.body.clone(), self.end)).await {
                Ok(Ok(code)) => count(&tally, format!("{label}: {}", code_name(&code))),
                Ok(Err(_)) => {
                    count(&tally, format!("{label}: connection error"));
                    send = None;
                }
                Err(_) => {}
            }
        }
    }
}

#[derive(Default, Clone)]
struct Latencies {
    ok: Vec<f64>,
    failed: BTreeMap<String, u64>,
}

impl Latencies {
    fn summary(&mut self) -> serde_json::Value {
        self.ok.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if self.ok.is_empty() {
                return f64::NAN;
            }
            let i = ((self.ok.len() as f64 - 1.0) * p).round() as usize;
            self.ok[i]
        };
        serde_json::json!({
            "ok": self.ok.len(),
            "failed": self.failed,
            "p50_ms": q(0.5),
            "p99_ms": q(0.99),
            "max_ms": self.ok.last().copied().unwrap_or(f64::NAN),
        })
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let attacking = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));

    // The good client: one mlp request every 10 ms.
    let good = {
        let (attacking, stop) = (attacking.clone(), stop.clone());
        let grpc = args.grpc;
        tokio::spawn(async move {
            let mut client = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
                .await
                .expect("good client connects");
            let request = ModelInferRequest {
                model_name: "mlp".into(),
                inputs: vec![InferInputTensor {
                    name: "INPUT__0".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 64],
                    ..Default::default()
                }],
                raw_input_contents: vec![Bytes::from(vec![0u8; 256])],
                ..Default::default()
            };
            let (mut before, mut during) = (Latencies::default(), Latencies::default());
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                let phase = if attacking.load(Ordering::Acquire) {
                    &mut during
                } else {
                    &mut before
                };
                let sent = Instant::now();
                let mut req = tonic::Request::new(request.clone());
                req.set_timeout(Duration::from_secs(2));
                match client.model_infer(req).await {
                    Ok(_) => phase.ok.push(sent.elapsed().as_secs_f64() * 1e3),
                    Err(e) => *phase.failed.entry(format!("{:?}", e.code())).or_default() += 1,
                }
            }
            (before, during)
        })
    };

    // RSS sampler.
    let sampler = {
        let (attacking, stop) = (attacking.clone(), stop.clone());
        let pid = args.pid;
        tokio::spawn(async move {
            let (mut baseline, mut peak) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Acquire) {
                let rss = rss_kib(pid, "VmRSS:");
                if attacking.load(Ordering::Acquire) {
                    peak = peak.max(rss);
                } else {
                    baseline.push(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (baseline, peak)
        })
    };

    tokio::time::sleep(Duration::from_secs(args.baseline_seconds)).await;
    attacking.store(true, Ordering::Release);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let tally: Tally = Arc::default();
    let mut attackers = Vec::new();

    // Stalling streams, spread over connections (the streams of one share it).
    let per_connection = args.stallers.div_ceil(args.connections.max(1));
    let almost = {
        let full = max_size_message(args.max_message_bytes);
        full.slice(..full.len() - 1)
    };
    for _ in 0..args.connections {
        let shared = connect(args.grpc).await;
        for _ in 0..per_connection.min(args.stallers) {
            let attack = Attack {
                label: "stall",
                grpc: args.grpc,
                body: almost.clone(),
                end: false,
                until,
            };
            attackers.push(tokio::spawn(attack.run(tally.clone(), shared.clone())));
        }
    }
    // Complete maximum-size messages, and amplifying ones, each task on its connection.
    let complete = [
        (
            "max-size",
            args.senders,
            max_size_message(args.max_message_bytes),
        ),
        (
            "amplifying",
            args.amplifiers,
            amplifying_message(args.amplifier_bytes),
        ),
    ];
    for (label, tasks, body) in complete {
        for _ in 0..tasks {
            let attack = Attack {
                label,
                grpc: args.grpc,
                body: body.clone(),
                end: true,
                until,
            };
            attackers.push(tokio::spawn(attack.run(tally.clone(), None)));
        }
    }
    for a in attackers {
        let _ = a.await;
    }
    stop.store(true, Ordering::Release);
    let (mut before, mut during) = good.await.expect("good client");
    let (baseline, peak) = sampler.await.expect("sampler");
    let median = {
        let mut b = baseline.clone();
        b.sort_unstable();
        b.get(b.len() / 2).copied().unwrap_or(0)
    };
    let report = serde_json::json!({
        "rss_mib": {
            "baseline": median as f64 / 1024.0,
            "peak_under_attack": peak as f64 / 1024.0,
            "vm_hwm": rss_kib(args.pid, "VmHWM:") as f64 / 1024.0,
        },
        "good_client": { "before": before.summary(), "during": during.summary() },
        "adversaries": *tally.lock().unwrap(),
        "attack_seconds": args.seconds,
        "stallers": args.stallers,
        "connections": args.connections,
        "senders": args.senders,
        "amplifiers": args.amplifiers,
        "max_message_bytes": args.max_message_bytes,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
