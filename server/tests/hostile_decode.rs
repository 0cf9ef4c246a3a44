//! Hostile inference requests against a real server: shapes whose size overflows or
//! names no data, floods of empty entries, too many dims, huge names, malformed
//! protobuf on ModelInfer and ModelStreamInfer. Each gets its exact gRPC code and a
//! bounded message, and the server answers a good request afterwards.

mod common;

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use common::{fp32_request, raw_request, Client, TestRepo, TestServer};
use prost::Message;
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::model_infer_request::InferInputTensor;
use sluice_proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelStreamInferResponse,
};
use sluice_proto::limits::{MAX_DIMS, MAX_INPUTS, MAX_NAME_BYTES};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Longest message a refusal may carry (the server bounds them at 1 KiB).
const MESSAGE_BOUND: usize = 1024;

async fn start() -> (TestRepo, TestServer) {
    let repo = TestRepo::new();
    repo.bundled("mlp");
    // Dynamic in both dims and not batching: any non-negative 2-d shape fits its dims,
    // so only the size arithmetic stands between a huge shape and the model.
    repo.synthetic("wide", "[ -1, -1 ]", 0, &[]);
    let server = TestServer::start(repo.path()).await;
    (repo, server)
}

fn good() -> ModelInferRequest {
    fp32_request("mlp", "INPUT__0", &[1, 64], &[0.5; 64])
}

/// The request that must be answered after every hostile one.
async fn still_serves(client: &mut Client) {
    let out = client
        .model_infer(good())
        .await
        .expect("a valid request is served")
        .into_inner();
    assert_eq!(out.outputs[0].shape, vec![1, 10]);
    assert_eq!(out.raw_output_contents[0].len(), 10 * 4);
}

/// `req` is refused with `code`, a message containing `parts` and no longer than
/// [`MESSAGE_BOUND`]; then the server still serves.
async fn expect_refused(client: &mut Client, req: ModelInferRequest, code: Code, parts: &[&str]) {
    let err = client
        .model_infer(req)
        .await
        .expect_err("the request is refused");
    check_status(&err, code, parts);
    still_serves(client).await;
}

fn check_status(err: &Status, code: Code, parts: &[&str]) {
    assert_eq!(err.code(), code, "message: {}", err.message());
    assert!(
        err.message().len() <= MESSAGE_BOUND,
        "message of {} bytes",
        err.message().len()
    );
    for part in parts {
        assert!(
            err.message().contains(part),
            "message {:?} lacks {part:?}",
            err.message()
        );
    }
}

fn typed(model: &str, shape: Vec<i64>, contents: InferTensorContents) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT__0".into(),
            datatype: "FP32".into(),
            shape,
            contents: Some(contents),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn typed_contents_with_a_huge_shape_and_no_data_are_refused() {
    let (_repo, mut s) = start().await;
    for model in ["mlp", "wide", "no_such_model"] {
        expect_refused(
            &mut s.client,
            typed(model, vec![1 << 46], InferTensorContents::default()),
            Code::InvalidArgument,
            &["contents hold 0 FP32 values", "needs 70368744177664"],
        )
        .await;
    }
    expect_refused(
        &mut s.client,
        typed(
            "wide",
            vec![1 << 32, 1 << 32],
            InferTensorContents::default(),
        ),
        Code::InvalidArgument,
        &["INPUT__0", "[4294967296, 4294967296]", "overflows"],
    )
    .await;
    expect_refused(
        &mut s.client,
        typed(
            "wide",
            vec![2, -2],
            InferTensorContents {
                fp32_contents: vec![1.0; 4],
                ..Default::default()
            },
        ),
        Code::InvalidArgument,
        &["dimension 1 is -2, below zero"],
    )
    .await;
    // Counted, not trusted: values for the shape but in another datatype's field.
    expect_refused(
        &mut s.client,
        typed(
            "wide",
            vec![1, 2],
            InferTensorContents {
                int_contents: vec![1, 2],
                ..Default::default()
            },
        ),
        Code::InvalidArgument,
        &["contents hold 0 FP32 values in fp32_contents, shape [1, 2] needs 2"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn raw_contents_with_huge_overflowing_or_negative_shapes_are_refused() {
    let (_repo, mut s) = start().await;
    // A product of 2**64 would wrap to 0 and match empty data.
    expect_refused(
        &mut s.client,
        raw_request("wide", "INPUT__0", "FP32", &[1 << 32, 1 << 32], vec![]),
        Code::InvalidArgument,
        &["model 'wide'", "INPUT__0", "overflows"],
    )
    .await;
    // A byte size of 2**64 exactly (2**62 FP32 elements).
    expect_refused(
        &mut s.client,
        raw_request("wide", "INPUT__0", "FP32", &[1 << 31, 1 << 31], vec![]),
        Code::InvalidArgument,
        &["overflows"],
    )
    .await;
    expect_refused(
        &mut s.client,
        raw_request("wide", "INPUT__0", "FP32", &[1 << 46, 1], vec![0; 16]),
        Code::InvalidArgument,
        &["holds 16 bytes, expected 281474976710656"],
    )
    .await;
    expect_refused(
        &mut s.client,
        raw_request("wide", "INPUT__0", "FP32", &[4, -1], vec![0; 16]),
        Code::InvalidArgument,
        &["has shape [4, -1], expected [-1, -1]"],
    )
    .await;
    expect_refused(
        &mut s.client,
        raw_request("mlp", "INPUT__0", "FP32", &[1 << 32, 1 << 32], vec![]),
        Code::InvalidArgument,
        &["batch size 4294967296, above max_batch_size"],
    )
    .await;
    expect_refused(
        &mut s.client,
        raw_request("mlp", "INPUT__0", "FP32", &[-1, 64], vec![]),
        Code::InvalidArgument,
        &["has shape [-1, 64], expected [-1, 64]"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn too_many_dims_are_refused() {
    let (_repo, mut s) = start().await;
    expect_refused(
        &mut s.client,
        raw_request("mlp", "INPUT__0", "FP32", &[1; MAX_DIMS + 1], vec![0; 4]),
        Code::InvalidArgument,
        &["ModelInferRequest.inputs[0].shape has 65 dims, more than the 64 allowed"],
    )
    .await;
    // Two million dims: refused at the wire, and the message does not list them.
    expect_refused(
        &mut s.client,
        raw_request("mlp", "INPUT__0", "FP32", &vec![1; 2_000_000], vec![0; 4]),
        Code::InvalidArgument,
        &["has 2000000 dims"],
    )
    .await;
    // Within the cap but wrong for the model: the shape in the message is elided.
    expect_refused(
        &mut s.client,
        raw_request("mlp", "INPUT__0", "FP32", &[1; MAX_DIMS], vec![0; 4]),
        Code::InvalidArgument,
        &["has shape [1, 1, 1, 1, 1, 1, 1, 1, ... (64 dims)], expected [-1, 64]"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn huge_names_get_a_bounded_message() {
    let (_repo, mut s) = start().await;
    let huge = "m".repeat(64 * 1024);
    let mut req = good();
    req.model_name = huge.clone();
    expect_refused(
        &mut s.client,
        req,
        Code::InvalidArgument,
        &["ModelInferRequest.model_name is 65536 bytes long, more than the 1024 allowed"],
    )
    .await;
    let mut req = good();
    req.inputs[0].name = huge.clone();
    expect_refused(
        &mut s.client,
        req,
        Code::InvalidArgument,
        &["ModelInferRequest.inputs[0].name is 65536 bytes long"],
    )
    .await;
    // Under the cap: the lookup fails, and the name is clipped in the answer.
    let long = "n".repeat(MAX_NAME_BYTES);
    let bare = format!("{}...", "n".repeat(128));
    let clipped = format!("'{bare}'");
    let mut req = good();
    req.model_name = long.clone();
    expect_refused(&mut s.client, req, Code::NotFound, &[&clipped]).await;
    let mut req = good();
    req.inputs[0].name = long.clone();
    expect_refused(
        &mut s.client,
        req,
        Code::InvalidArgument,
        &["model 'mlp': unexpected input", &clipped],
    )
    .await;
    let mut req = good();
    req.inputs[0].datatype = long.clone();
    expect_refused(
        &mut s.client,
        req,
        Code::InvalidArgument,
        &[&format!("has datatype {bare}, expected FP32")],
    )
    .await;
    let mut req = good();
    req.model_version = long;
    expect_refused(&mut s.client, req, Code::NotFound, &[&clipped]).await;
    s.stop().await;
}

#[tokio::test]
async fn a_flood_of_empty_inputs_is_refused_quickly() {
    let (_repo, mut s) = start().await;
    // 2 MiB of `inputs {}` entries, two bytes each: built on the wire, since decoding
    // them into structs is what the server must not do.
    let mut wire = ModelInferRequest {
        model_name: "mlp".into(),
        ..Default::default()
    }
    .encode_to_vec();
    for _ in 0..(1 << 20) {
        wire.extend_from_slice(&[5 << 3 | 2, 0]);
    }
    let started = Instant::now();
    let err = raw_call(s.grpc, MODEL_INFER, wire)
        .await
        .expect_err("refused");
    check_status(
        &err,
        Code::InvalidArgument,
        &["ModelInferRequest.inputs has 1048576 entries, more than the 256 allowed"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused in {:?}",
        started.elapsed()
    );
    // Just under the cap is decoded and judged by the model instead.
    let mut req = good();
    req.inputs = vec![InferInputTensor::default(); MAX_INPUTS];
    req.raw_input_contents.clear();
    expect_refused(
        &mut s.client,
        req,
        Code::InvalidArgument,
        &["unexpected input ''"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument() {
    let (_repo, mut s) = start().await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("truncated key", vec![0xff, 0xff, 0xff]),
        ("length past the end", vec![0x0a, 0x40, b'm']),
        // Well-formed wire, wrong for the schema: model_name as a varint.
        ("wrong wire type", vec![0x08, 0x01]),
        ("invalid UTF-8 in a string", vec![0x0a, 0x02, 0xc3, 0x28]),
    ];
    for (what, wire) in cases {
        let err = raw_call(s.grpc, MODEL_INFER, wire).await.expect_err(what);
        check_status(
            &err,
            Code::InvalidArgument,
            &["cannot decode ModelInferRequest"],
        );
        still_serves(&mut s.client).await;
    }
    // The same bytes, well-formed, are served through the raw path too.
    let ok = raw_call(s.grpc, MODEL_INFER, good().encode_to_vec())
        .await
        .expect("served");
    assert!(!ok.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_stream_answers_its_admitted_requests_then_ends_with_the_decode_error() {
    let (_repo, mut s) = start().await;
    let mut good_with_id = good();
    good_with_id.id = "first".into();
    let messages = vec![good_with_id.encode_to_vec(), vec![0xff, 0xff, 0xff]];
    let mut grpc = raw_client(s.grpc).await;
    grpc.ready().await.expect("ready");
    let mut answers = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(messages)),
            PathAndQuery::from_static(MODEL_STREAM_INFER),
            RawCodec,
        )
        .await
        .expect("the stream opens")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), answers.message())
        .await
        .expect("answered in time")
        .expect("the good request is answered before the stream ends")
        .expect("an answer, not the end");
    let first = ModelStreamInferResponse::decode(&first[..]).expect("a stream response");
    assert_eq!(first.error_message, "");
    let first = first.infer_response.expect("a response");
    assert_eq!(first.id, "first");
    assert_eq!(first.outputs[0].shape, vec![1, 10]);
    let err = tokio::time::timeout(Duration::from_secs(30), answers.message())
        .await
        .expect("ended in time")
        .expect_err("the stream ends with the decode error");
    check_status(
        &err,
        Code::InvalidArgument,
        &["cannot decode ModelInferRequest"],
    );
    still_serves(&mut s.client).await;

    // A request over a cap ends the stream the same way.
    let mut over = good();
    over.inputs[0].shape = vec![1; MAX_DIMS + 1];
    grpc.ready().await.expect("ready");
    let mut answers = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![over.encode_to_vec()])),
            PathAndQuery::from_static(MODEL_STREAM_INFER),
            RawCodec,
        )
        .await
        .expect("the stream opens")
        .into_inner();
    let err = tokio::time::timeout(Duration::from_secs(30), answers.message())
        .await
        .expect("ended in time")
        .expect_err("the stream ends with the refusal");
    check_status(&err, Code::InvalidArgument, &["has 65 dims"]);
    still_serves(&mut s.client).await;
    s.stop().await;
}

#[tokio::test]
async fn a_timeout_parameter_of_zero_means_no_timeout() {
    let (_repo, mut s) = start().await;
    for choice in [
        ParameterChoice::Int64Param(0),
        ParameterChoice::Uint64Param(0),
    ] {
        let mut req = good();
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(choice),
            },
        );
        let out = s
            .client
            .model_infer(req)
            .await
            .expect("served without a timeout")
            .into_inner();
        assert_eq!(out.outputs[0].shape, vec![1, 10]);
    }
    still_serves(&mut s.client).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------
// A gRPC client that sends message bytes as given
// ---------------------------------------------------------------------------

const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const MODEL_STREAM_INFER: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// Sends each message's bytes unchanged in a gRPC frame and returns each answer's bytes,
/// so a test can send what no well-behaved encoder would.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

async fn raw_client(addr: std::net::SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    tonic::client::Grpc::new(channel)
}

async fn raw_call(
    addr: std::net::SocketAddr,
    path: &'static str,
    message: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = raw_client(addr).await;
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(message),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}
