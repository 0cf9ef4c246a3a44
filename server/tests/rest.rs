//! The KServe v2 REST endpoints as a raw HTTP/1.1 client sees them: inference answered in
//! JSON, and hostile bodies (too large, never finished, malformed) answered with a
//! precise status while the server keeps serving.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{TestRepo, TestServer};
use sluice::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(edit: impl FnOnce(&mut Config)) -> (TestRepo, TestServer) {
    let repo = TestRepo::new();
    repo.synthetic("id", "[ 2 ]", 0, &[]);
    let mut config = Config::for_repository(repo.path());
    edit(&mut config);
    let server = TestServer::start_with(config).await;
    (repo, server)
}

/// Send `head` (request line and headers, without the blank line) and `body`; the
/// answer's status and body, read until the server closes or 10 s pass.
async fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    read_answer(&mut stream).await
}

async fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

async fn post_json(addr: SocketAddr, path: &str, json: &str) -> (u16, String) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}",
        json.len()
    );
    exchange(addr, &head, json.as_bytes()).await
}

const GOOD: &str =
    r#"{"id":"a1","inputs":[{"name":"INPUT__0","shape":[2],"datatype":"FP32","data":[1.5,-2]}]}"#;

async fn still_serves(s: &TestServer) {
    let (status, body) = post_json(s.http, "/v2/models/id/infer", GOOD).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["id"], "a1");
    assert_eq!(json["outputs"][0]["data"], serde_json::json!([1.5, -2.0]));
}

#[tokio::test]
async fn json_inference_metadata_and_errors() {
    let (_repo, s) = start(|_| {}).await;
    still_serves(&s).await;
    let (status, body) = exchange(s.http, "GET /v2/models/id HTTP/1.1\r\nHost: x", b"").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""shape":[2]"#), "{body}");
    for (path, json, want, fragment) in [
        ("/v2/models/nope/infer", GOOD, 404, "nope"),
        (
            "/v2/models/id/infer",
            "{",
            400,
            "not a valid inference request",
        ),
        (
            "/v2/models/id/infer",
            r#"{"inputs":[{"name":"INPUT__0","shape":[3],"datatype":"FP32","data":[1,2,3]}]}"#,
            400,
            "shape",
        ),
        ("/v2/models/id/run", GOOD, 404, "no endpoint"),
    ] {
        let (status, body) = post_json(s.http, path, json).await;
        assert_eq!(status, want, "{path}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(fragment),
            "{path}: {body}"
        );
    }
    let (status, _) = exchange(s.http, "GET /v2/models/id/infer HTTP/1.1\r\nHost: x", b"").await;
    assert_eq!(status, 405);
    still_serves(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn bodies_are_bounded_in_size_and_in_time() {
    let (_repo, s) = start(|c| {
        c.max_message_bytes = 4096;
        c.edge.body_read_timeout = Duration::from_secs(1);
    })
    .await;
    // Announced over the limit: refused before any of it is read.
    let head = "POST /v2/models/id/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000";
    let (status, body) = exchange(s.http, head, b"").await;
    assert_eq!(status, 413, "{body}");
    // Chunked, growing past the limit: refused once it does.
    let head = "POST /v2/models/id/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked";
    let chunk = format!("1000\r\n{}\r\n", "x".repeat(4096));
    let body = format!("{chunk}{chunk}0\r\n\r\n");
    let (status, answer) = exchange(s.http, head, body.as_bytes()).await;
    assert_eq!(status, 413, "{answer}");
    // Announced, then stalled: answered at the body-read timeout, not held open.
    let mut stream = TcpStream::connect(s.http).await.unwrap();
    let head = "POST /v2/models/id/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n{\"in";
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, body) = read_answer(&mut stream).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not arrive"), "{body}");
    still_serves(&s).await;
    s.stop().await;
}
