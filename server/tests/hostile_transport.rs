//! Transport abuse, as a hostile client would try it against the real server: bodies
//! that stall or never finish, messages larger than allowed, more bytes in flight than
//! the server's budget, too many connections or streams, idle and half-sent connections
//! on the gRPC and HTTP/1 ports. Each case gets a precise status (or a closed
//! connection) and the server answers a good request afterwards.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw_h2::{grpc_header, grpc_status, h2_connect, open_call};
use common::{f32s, fp32_request, http_get, metric_value, TestRepo, TestServer};
use sluice::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A repository with one synthetic identity model over `[ 2 ]`.
fn repo() -> TestRepo {
    let repo = TestRepo::new();
    repo.synthetic("id", "[ 2 ]", 0, &[]);
    repo
}

async fn start(repo: &TestRepo, edit: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::for_repository(repo.path());
    edit(&mut config);
    TestServer::start_with(config).await
}

/// The server still serves: a good request on a fresh client is answered.
async fn still_serves(s: &TestServer) {
    let mut client = common::Client::connect(format!("http://{}", s.grpc))
        .await
        .expect("a new client connects");
    let out = client
        .model_infer(fp32_request("id", "INPUT__0", &[2], &[1.5, -2.0]))
        .await
        .expect("a good request is served");
    assert_eq!(
        f32s(&out.into_inner().raw_output_contents[0]),
        vec![1.5, -2.0]
    );
}

#[tokio::test]
async fn a_stalled_body_is_answered_deadline_exceeded_at_its_deadline() {
    let repo = repo();
    let s = start(&repo, |_| {}).await;
    let mut h2 = h2_connect(s.grpc).await;
    let (response, mut body) = open_call(&mut h2, INFER, Some("300m")).await;
    // Half a message, then nothing more.
    body.send_data(grpc_header(100), false).unwrap();
    body.send_data(Bytes::from_static(&[0u8; 10]), false)
        .unwrap();
    let sent = Instant::now();
    let (code, message) = grpc_status(response).await;
    let took = sent.elapsed();
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(message.contains("still arriving"), "{message}");
    assert!(
        took >= Duration::from_millis(250),
        "answered at the deadline, not before: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "answered near its deadline (the body-read timeout is 15 s): {took:?}"
    );
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_body_that_never_finishes_is_cut_at_the_body_read_timeout() {
    let repo = repo();
    let s = start(&repo, |c| c.edge.body_read_timeout = Duration::from_secs(1)).await;
    let before = metric_value(
        s.metrics,
        "sluice_transport_refusals_total{port=\"grpc\",reason=\"body_timeout\"}",
    )
    .await
    .unwrap_or(0.0);
    let mut h2 = h2_connect(s.grpc).await;
    // No deadline: only the body-read timeout bounds it. The header announces 60 KiB.
    let (response, mut body) = open_call(&mut h2, INFER, None).await;
    body.send_data(grpc_header(60 * 1024), false).unwrap();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(message.contains("body-read timeout of 1 s"), "{message}");
    // A unary call that never sends its first byte is cut the same way.
    let (response, _body) = open_call(&mut h2, INFER, None).await;
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    let after = metric_value(
        s.metrics,
        "sluice_transport_refusals_total{port=\"grpc\",reason=\"body_timeout\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(after >= before + 2.0, "counted: {before} -> {after}");
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_before_its_bytes_arrive() {
    let repo = repo();
    let s = start(&repo, |c| c.max_message_bytes = 1 << 20).await;
    let mut h2 = h2_connect(s.grpc).await;
    let (response, mut body) = open_call(&mut h2, INFER, None).await;
    // Only the 5-byte header: the server must not wait for (or reserve) 60 MiB.
    body.send_data(grpc_header(60 << 20), false).unwrap();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("62914560 bytes") && message.contains("1048576"),
        "{message}"
    );
    // Non-inference methods take small messages only.
    let (response, mut body) = open_call(
        &mut h2,
        "/inference.GRPCInferenceService/ModelMetadata",
        None,
    )
    .await;
    body.send_data(grpc_header(4 << 20), false).unwrap();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn bytes_beyond_the_budget_are_refused_at_once_and_given_back() {
    let repo = repo();
    let s = start(&repo, |c| {
        c.max_message_bytes = 64 * 1024;
        c.edge.max_request_bytes_in_flight = 100 * 1024;
    })
    .await;
    let mut h2 = h2_connect(s.grpc).await;
    // A slow client holds 60 KiB of the 100 KiB budget while its body trickles in.
    let (held, mut held_body) = open_call(&mut h2, INFER, None).await;
    held_body.send_data(grpc_header(60 * 1024), false).unwrap();
    held_body
        .send_data(Bytes::from(vec![0u8; 1000]), false)
        .unwrap();
    let mut in_flight = 0.0;
    let start = Instant::now();
    while in_flight < 60.0 * 1024.0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        in_flight = metric_value(s.metrics, "sluice_request_bytes_in_flight ")
            .await
            .unwrap_or(0.0);
    }
    assert!(in_flight >= 60.0 * 1024.0, "reserved: {in_flight}");

    // A second 60 KiB message does not fit: refused at once with pushback.
    let (response, mut body) = open_call(&mut h2, INFER, None).await;
    body.send_data(grpc_header(60 * 1024), false).unwrap();
    let asked = Instant::now();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("request bytes in flight"), "{message}");
    assert!(asked.elapsed() < Duration::from_secs(2), "refused at once");

    // A small good request still fits beside the slow one.
    still_serves(&s).await;

    // The slow client gives up: its bytes come back and a large request fits again.
    drop(held_body);
    drop(held);
    drop(h2);
    let mut client = common::Client::connect(format!("http://{}", s.grpc))
        .await
        .unwrap();
    let big = fp32_request("id", "INPUT__0", &[2], &[1.0, 2.0]);
    let mut served = false;
    for _ in 0..200 {
        if metric_value(s.metrics, "sluice_request_bytes_in_flight ")
            .await
            .unwrap_or(1.0)
            == 0.0
        {
            served = client.model_infer(big.clone()).await.is_ok();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        served,
        "the budget was given back when the slow call went away"
    );
    s.stop().await;
}

#[tokio::test]
async fn streams_per_connection_are_capped_by_the_server_settings() {
    let repo = repo();
    let s = start(&repo, |c| c.edge.max_concurrent_streams = 3).await;
    let tcp = TcpStream::connect(s.grpc).await.unwrap();
    let (mut h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // One whole call first, so the server's SETTINGS have arrived.
    let call = async {
        let (response, mut body) =
            open_call(&mut h2, "/inference.GRPCInferenceService/ServerLive", None).await;
        body.send_data(grpc_header(0), true).unwrap();
        grpc_status(response).await.0
    };
    let code = tokio::select! {
        code = call => code,
        _ = &mut connection => panic!("the connection ended"),
    };
    assert_eq!(code, Code::Ok);
    assert_eq!(connection.max_concurrent_send_streams(), 3);
    tokio::spawn(async move {
        let _ = connection.await;
    });

    still_serves(&s).await;
    s.stop().await;
}

/// Whether the server closes `stream` (EOF or reset) within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. the server's SETTINGS or a 408
        }
    }
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_idle_ones_time_out() {
    let repo = repo();
    let s = start(&repo, |c| {
        c.edge.max_connections = 2;
        c.edge.idle_connection_timeout = Duration::from_secs(1);
        c.edge.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    // The test client already holds one connection (TestServer::start connects); one
    // more fits.
    let mut second = TcpStream::connect(s.grpc).await.unwrap();
    second
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut third = TcpStream::connect(s.grpc).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "a connection over the cap is closed"
    );
    // Both idle connections (the test client's and `second`) are closed after 1 s.
    assert!(
        closed_within(&mut second, Duration::from_secs(5)).await,
        "an idle connection is closed"
    );
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn slowloris_on_the_http_ports_is_cut_off() {
    let repo = repo();
    let s = start(&repo, |c| {
        c.edge.header_read_timeout = Duration::from_secs(1);
        c.edge.max_http_connections = 3;
    })
    .await;
    for port in [s.http, s.metrics] {
        // Half a request line, then nothing.
        let mut half = TcpStream::connect(port).await.unwrap();
        half.write_all(b"GET /v2/hea").await.unwrap();
        // Nothing at all.
        let mut silent = TcpStream::connect(port).await.unwrap();
        let started = Instant::now();
        assert!(
            closed_within(&mut half, Duration::from_secs(5)).await,
            "half request on {port}"
        );
        assert!(
            closed_within(&mut silent, Duration::from_secs(5)).await,
            "silent on {port}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "not before the timeout"
        );
    }
    // The cap: three held connections fill it; a fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(s.http).await.unwrap());
    }
    let mut over = TcpStream::connect(s.http).await.unwrap();
    let t = Instant::now();
    assert!(
        closed_within(&mut over, Duration::from_millis(900)).await,
        "over the cap"
    );
    assert!(t.elapsed() < Duration::from_millis(900));
    drop(held);
    // Once they are gone, health answers again.
    let mut ok = false;
    for _ in 0..100 {
        let (status, _) = http_get(s.http, "/v2/health/live").await;
        if status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "health answers once the held connections are gone");
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn rapid_resets_do_not_take_the_server_down() {
    let repo = repo();
    let s = start(&repo, |_| {}).await;
    let mut h2 = h2_connect(s.grpc).await;
    // Open and reset streams as fast as the client allows.
    for _ in 0..2_000 {
        let Ok(ready) = h2.clone().ready().await else {
            break; // the server closed the connection: also fine
        };
        let mut ready = ready;
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://sluice{INFER}"))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        match ready.send_request(request, false) {
            Ok((response, mut body)) => {
                body.send_reset(h2::Reason::CANCEL);
                drop(response);
            }
            Err(_) => break,
        }
        h2 = ready;
    }
    still_serves(&s).await;
    let (status, _) = http_get(s.http, "/v2/health/live").await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test]
async fn the_heap_a_request_decodes_into_counts_against_the_budget() {
    use sluice_proto::inference::{model_infer_request::InferInputTensor, InferTensorContents};
    let repo = repo();
    let s = start(&repo, |c| {
        c.max_message_bytes = 128 * 1024;
        c.edge.max_request_bytes_in_flight = 512 * 1024;
    })
    .await;
    // 60,000 one-byte varints: 60 KB on the wire, up to 16 times that once decoded into
    // int64 values, more than the whole budget. Refused before prost allocates it.
    let typed = sluice_proto::inference::ModelInferRequest {
        model_name: "id".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT__0".into(),
            datatype: "INT64".into(),
            shape: vec![60_000],
            contents: Some(InferTensorContents {
                int64_contents: vec![1; 60_000],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut client = s.client.clone();
    let err = client.model_infer(typed).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("decoding the request takes up to"),
        "{}",
        err.message()
    );
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    // The same bytes as raw contents decode into slices of the receive buffer: they fit
    // (and are then refused by the model for their datatype, not by the budget).
    let raw = common::raw_request("id", "INPUT__0", "INT64", &[7_500], vec![0u8; 60_000]);
    let err = client.model_infer(raw).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_header_block_over_the_limit_is_refused_and_the_server_goes_on() {
    let repo = repo();
    let s = start(&repo, |c| c.edge.max_header_list_bytes = 4096).await;
    let mut request = tonic::Request::new(fp32_request("id", "INPUT__0", &[2], &[1.0, 2.0]));
    let big = "x".repeat(8192);
    request
        .metadata_mut()
        .insert("x-padding", big.parse().unwrap());
    let mut client = common::Client::connect(format!("http://{}", s.grpc))
        .await
        .unwrap();
    let err = client
        .model_infer(request)
        .await
        .expect_err("a header block over the limit is refused");
    assert_ne!(err.code(), Code::Ok);
    still_serves(&s).await;
    s.stop().await;
}
