//! The load's own gRPC path: ModelInfer over HTTP/2 (the `h2` crate) with the request
//! message encoded once per run.
//!
//! The generator usually shares the machine with the server it measures, so every
//! microsecond it spends per request is taken from the server. A general-purpose client
//! clones and re-encodes the request message for every call, hands each call to a
//! connection task through a queue, and decodes every answer. Here a call sends the
//! pre-encoded gRPC frame (a reference-counted buffer: no copy) on a stream opened
//! directly on the connection, and reads only the answer's status: the body's bytes are
//! counted and given back to flow control, never decoded. Metadata calls and the check
//! request still use the generated tonic client ([`crate::target`]).

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use prost::Message;
use sluice_proto::inference::ModelInferRequest;
use tokio::net::TcpStream;
use tonic::Code;

const PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// Receive windows and frame size for answers: large enough that big outputs stream
/// without waiting for window updates.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;

/// A request message as it goes on the wire: the gRPC length-prefixed frame
/// (uncompressed flag, 4-byte big-endian length, the protobuf message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded(Bytes);

impl Encoded {
    pub fn new(request: &ModelInferRequest) -> Encoded {
        let len = request.encoded_len();
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len).expect("a request message under 4 GiB"));
        request
            .encode(&mut buf)
            .expect("the buffer was sized for the message");
        Encoded(buf.freeze())
    }
}

/// One HTTP/2 connection for ModelInfer calls; clones share it.
#[derive(Clone, Debug)]
pub struct InferConnection {
    send: h2::client::SendRequest<Bytes>,
    uri: Uri,
}

impl InferConnection {
    /// Connects to `url` (`http://host:port`).
    pub async fn connect(url: &str) -> Result<InferConnection> {
        let base: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        let authority = base
            .authority()
            .with_context(|| format!("no host:port in {url:?}"))?
            .clone();
        let tcp = TcpStream::connect(authority.as_str())
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        // Requests go out at once (no Nagle delay behind the previous frame).
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tcp)
            .await
            .with_context(|| format!("HTTP/2 handshake with {url} failed"))?;
        tokio::spawn(async move {
            // Ends when every handle is dropped or the server closes; calls in flight
            // then fail with UNAVAILABLE, which is what they record.
            let _ = connection.await;
        });
        let uri = Uri::builder()
            .scheme(base.scheme_str().unwrap_or("http"))
            .authority(authority)
            .path_and_query(PATH)
            .build()
            .context("building the ModelInfer URI")?;
        Ok(InferConnection { send, uri })
    }

    /// One ModelInfer call, reduced to its gRPC status code. With a `timeout` the
    /// request carries `grpc-timeout` (the caller enforces the deadline itself).
    pub async fn infer(&self, request: &Encoded, timeout: Option<Duration>) -> Code {
        self.call(request, timeout)
            .await
            .unwrap_or_else(|e| transport_code(&e))
    }

    async fn call(&self, request: &Encoded, timeout: Option<Duration>) -> Result<Code, h2::Error> {
        let mut head = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = timeout {
            head = head.header("grpc-timeout", grpc_timeout(t));
        }
        let head = head.body(()).expect("a valid request head");
        let mut send = self.send.clone().ready().await?;
        let (answer, mut body) = send.send_request(head, false)?;
        body.send_data(request.0.clone(), true)?;
        let answer = answer.await?;
        let status = answer.status();
        if let Some(code) = grpc_status(answer.headers()) {
            // Trailers-only answer: the status is in the headers.
            return Ok(code);
        }
        if status != StatusCode::OK {
            return Ok(http_code(status));
        }
        let mut body = answer.into_body();
        while let Some(data) = body.data().await {
            let data = data?;
            let _ = body.flow_control().release_capacity(data.len());
        }
        let trailers = body.trailers().await?;
        Ok(trailers
            .as_ref()
            .and_then(grpc_status)
            .unwrap_or(Code::Unknown))
    }
}

/// `grpc-timeout`: at most eight digits and a unit, as precise as fits.
fn grpc_timeout(t: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let value = [
        (t.as_nanos(), "n"),
        (t.as_micros(), "u"),
        (t.as_millis(), "m"),
        (u128::from(t.as_secs()), "S"),
        (u128::from(t.as_secs() / 60), "M"),
        (u128::from(t.as_secs() / 3600), "H"),
    ]
    .into_iter()
    .find(|(n, _)| *n <= MAX)
    .map_or_else(|| format!("{MAX}H"), |(n, unit)| format!("{n}{unit}"));
    HeaderValue::from_str(&value).expect("digits and a letter")
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let n: i32 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Code::from(n))
}

/// The gRPC code for an answer that is not gRPC (a proxy's HTTP error), as gRPC
/// clients map it.
fn http_code(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// A stream refused or reset by the server, or a lost connection.
fn transport_code(e: &h2::Error) -> Code {
    match e.reason() {
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        _ => Code::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_use_the_most_precise_unit_that_fits() {
        let cases = [
            (Duration::from_millis(50), "50000000n"),
            (Duration::from_millis(100), "100000u"),
            (Duration::from_millis(250), "250000u"),
            (Duration::from_secs(30), "30000000u"),
            (Duration::from_secs(1000), "1000000m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(200_000_000), "3333333M"),
        ];
        for (t, want) in cases {
            assert_eq!(grpc_timeout(t), want, "{t:?}");
        }
    }

    #[test]
    fn the_frame_is_the_prefixed_message() {
        let request = ModelInferRequest {
            model_name: "m".into(),
            raw_input_contents: vec![Bytes::from(vec![7; 300])],
            ..Default::default()
        };
        let encoded = Encoded::new(&request);
        let bytes = &encoded.0;
        assert_eq!(bytes[0], 0, "not compressed");
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 5);
        assert_eq!(ModelInferRequest::decode(&bytes[5..]).unwrap(), request);
    }

    #[test]
    fn status_comes_from_grpc_status_or_the_http_status() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&headers), Some(Code::Unavailable));
        assert_eq!(
            http_code(StatusCode::SERVICE_UNAVAILABLE),
            Code::Unavailable
        );
        assert_eq!(http_code(StatusCode::NOT_FOUND), Code::Unimplemented);
    }
}
