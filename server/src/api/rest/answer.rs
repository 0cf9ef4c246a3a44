//! HTTP answers: protocol messages as JSON, inference results, statuses and errors.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use prost_reflect::{DynamicMessage, SerializeOptions};
use serde_json::Value;
use tonic::{Code, Status};

use super::{infer, HEADER_LENGTH};
use crate::error::RETRY_PUSHBACK_HEADER;

pub(super) type Answer = Response<Full<Bytes>>;

/// A protocol message in JSON with its proto field names, every field present and
/// 64-bit integers as numbers (the form Triton's HTTP endpoints answer in).
pub(super) fn message_json<M: prost::Message>(message: &M, name: &str) -> Value {
    let descriptor = crate::spec::descriptor_pool()
        .get_message_by_name(&format!("inference.{name}"))
        .expect("every message of the protocol is in its descriptor pool");
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message re-decodes under its own descriptor");
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("a protocol message serializes to JSON")
}

pub(super) fn json_answer(status: StatusCode, json: &Value) -> Answer {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(json).expect("a JSON value serializes"),
        )))
        .expect("status and headers are valid")
}

pub(super) fn empty_ok() -> Answer {
    json_answer(StatusCode::OK, &Value::Object(Default::default()))
}

pub(super) fn health(ok: bool) -> Answer {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("a status is a valid response")
}

pub(super) fn infer_answer(encoded: infer::Encoded) -> Answer {
    if encoded.binary.is_empty() {
        return Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(encoded.json)))
            .expect("headers are valid");
    }
    let json_len = encoded.json.len();
    let total = json_len + encoded.binary.iter().map(Bytes::len).sum::<usize>();
    let mut body = Vec::with_capacity(total);
    body.extend_from_slice(&encoded.json);
    for part in &encoded.binary {
        body.extend_from_slice(part);
    }
    Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(HEADER_LENGTH, json_len)
        .body(Full::new(Bytes::from(body)))
        .expect("headers are valid")
}

/// The HTTP status for a gRPC code (the README's status table).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal | Code::DataLoss | Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Aborted => StatusCode::CONFLICT,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::Cancelled => StatusCode::BAD_REQUEST,
    }
}

/// A status as an HTTP answer: `{"error": message}`, and for overload a `Retry-After`
/// (whole seconds, rounded up) beside the exact `retry-after-ms`.
pub(super) fn status_answer(status: &Status) -> Answer {
    let mut answer = error(http_status(status.code()), status.message());
    let pushback = status
        .metadata()
        .get(RETRY_PUSHBACK_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(ms) = pushback {
        let headers = answer.headers_mut();
        headers.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
        headers.insert("retry-after-ms", HeaderValue::from(ms));
    }
    answer
}

pub(super) fn error(status: StatusCode, message: &str) -> Answer {
    let message = crate::error::bound_message(message.to_owned());
    json_answer(status, &serde_json::json!({ "error": message }))
}
