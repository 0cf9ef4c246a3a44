//! A raw HTTP/2 client for black-box tests that decide what goes on the wire: a body
//! sent in pieces or never finished, a status read from trailers-only headers or
//! trailers.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::net::TcpStream;
use tonic::Code;

/// A raw HTTP/2 connection: the test decides what goes on the wire.
pub async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// Open a gRPC call to `path`; the body is left open for the caller.
pub async fn open_call(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    timeout: Option<&str>,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://sluice{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        request = request.header("grpc-timeout", t);
    }
    let send = send.clone().ready().await.expect("stream available");
    let mut send = send;
    send.send_request(request.body(()).unwrap(), false)
        .expect("request sent")
}

/// A gRPC message header announcing `len` bytes.
pub fn grpc_header(len: u32) -> Bytes {
    let mut h = vec![0u8];
    h.extend_from_slice(&len.to_be_bytes());
    h.into()
}

/// The call's gRPC status code and message, from trailers-only headers or trailers.
pub async fn grpc_status(response: h2::client::ResponseFuture) -> (Code, String) {
    let response = response.await.expect("response headers");
    let read = |headers: &http::HeaderMap| {
        headers.get("grpc-status").map(|code| {
            let code = Code::from_bytes(code.as_bytes());
            let message = headers
                .get("grpc-message")
                .map(|m| percent_decode(m.to_str().unwrap_or_default()))
                .unwrap_or_default();
            (code, message)
        })
    };
    if let Some(status) = read(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers present");
    read(&trailers).expect("grpc-status in trailers")
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
