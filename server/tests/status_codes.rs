//! One test per row of the status table: each bad request gets its code and a message
//! naming the model, the tensor and the expected vs actual value, and the server keeps
//! serving afterwards.

mod common;

use common::{f32s, fp32_request, raw_request, test_weights, TestRepo, TestServer};
use tonic::Code;

const RAISER: &str = r#"
name: "raiser"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"#;

async fn start() -> (TestRepo, TestServer) {
    let repo = TestRepo::new();
    repo.bundled("mlp").model(
        "raiser",
        RAISER,
        Some(&test_weights("raise_on_negative.pt")),
    );
    let server = TestServer::start(repo.path()).await;
    (repo, server)
}

/// The request that must keep working after every rejection.
async fn still_serves(server: &mut TestServer) {
    let ok = server
        .client
        .model_infer(fp32_request("mlp", "INPUT__0", &[1, 64], &[0.5; 64]))
        .await;
    let out = ok.expect("a valid request succeeds").into_inner();
    assert_eq!(out.outputs[0].shape, vec![1, 10]);
    let ok = server
        .client
        .model_infer(fp32_request(
            "raiser",
            "INPUT__0",
            &[1, 4],
            &[1.0, 2.0, 3.0, 4.0],
        ))
        .await;
    assert_eq!(
        f32s(
            &ok.expect("raiser accepts positive input")
                .into_inner()
                .raw_output_contents[0]
        ),
        vec![2.0, 4.0, 6.0, 8.0]
    );
}

async fn expect_status(
    server: &mut TestServer,
    req: sluice_proto::inference::ModelInferRequest,
    code: Code,
    parts: &[&str],
) {
    let err = server
        .client
        .model_infer(req)
        .await
        .expect_err("request must fail");
    assert_eq!(err.code(), code, "message: {}", err.message());
    for part in parts {
        assert!(
            err.message().contains(part),
            "message {:?} lacks {:?}",
            err.message(),
            part
        );
    }
    still_serves(server).await;
}

#[tokio::test]
async fn unknown_model_is_not_found() {
    let (_repo, mut s) = start().await;
    expect_status(
        &mut s,
        fp32_request("nope", "INPUT__0", &[1, 64], &[0.0; 64]),
        Code::NotFound,
        &["'nope'"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn unknown_version_is_not_found() {
    let (_repo, mut s) = start().await;
    let mut req = fp32_request("mlp", "INPUT__0", &[1, 64], &[0.0; 64]);
    req.model_version = "7".into();
    expect_status(
        &mut s,
        req,
        Code::NotFound,
        &["'mlp'", "'7'", "available: 1"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn wrong_input_name_is_invalid() {
    let (_repo, mut s) = start().await;
    let req = fp32_request("mlp", "input", &[1, 64], &[0.0; 64]);
    expect_status(
        &mut s,
        req,
        Code::InvalidArgument,
        &["'mlp'", "'input'", "INPUT__0"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn wrong_datatype_is_invalid() {
    let (_repo, mut s) = start().await;
    let req = raw_request("mlp", "INPUT__0", "INT32", &[1, 64], vec![0; 256]);
    expect_status(
        &mut s,
        req,
        Code::InvalidArgument,
        &["'mlp'", "'INPUT__0'", "INT32", "expected FP32"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn wrong_shape_is_invalid() {
    let (_repo, mut s) = start().await;
    let req = fp32_request("mlp", "INPUT__0", &[1, 63], &[0.0; 63]);
    expect_status(
        &mut s,
        req,
        Code::InvalidArgument,
        &["'mlp'", "'INPUT__0'", "[1, 63]", "[-1, 64]"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn raw_byte_length_mismatch_is_invalid() {
    let (_repo, mut s) = start().await;
    let req = raw_request("mlp", "INPUT__0", "FP32", &[1, 64], vec![0; 255]);
    expect_status(
        &mut s,
        req,
        Code::InvalidArgument,
        &["'mlp'", "'INPUT__0'", "255 bytes", "expected 256"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn batch_above_max_batch_size_is_invalid() {
    let (_repo, mut s) = start().await;
    let req = fp32_request("mlp", "INPUT__0", &[33, 64], &vec![0.0; 33 * 64]);
    expect_status(
        &mut s,
        req,
        Code::InvalidArgument,
        &["'mlp'", "'INPUT__0'", "batch size 33", "max_batch_size 32"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn model_that_raises_is_internal_with_its_message() {
    let (_repo, mut s) = start().await;
    let req = fp32_request("raiser", "INPUT__0", &[1, 4], &[1.0, -1.0, 0.0, 0.0]);
    expect_status(
        &mut s,
        req,
        Code::Internal,
        &["'raiser'", "negative input is not allowed"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn unknown_requested_output_is_invalid() {
    let (_repo, mut s) = start().await;
    let mut req = fp32_request("mlp", "INPUT__0", &[1, 64], &[0.0; 64]);
    req.outputs.push(
        sluice_proto::inference::model_infer_request::InferRequestedOutputTensor {
            name: "OUTPUT__9".into(),
            ..Default::default()
        },
    );
    expect_status(
        &mut s,
        req,
        Code::InvalidArgument,
        &["'mlp'", "OUTPUT__9", "OUTPUT__0"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn missing_input_is_invalid() {
    let (_repo, mut s) = start().await;
    let mut req = fp32_request("mlp", "INPUT__0", &[1, 64], &[0.0; 64]);
    req.inputs.clear();
    req.raw_input_contents.clear();
    expect_status(
        &mut s,
        req,
        Code::InvalidArgument,
        &["'mlp'", "missing input 'INPUT__0'"],
    )
    .await;
    s.stop().await;
}

#[tokio::test]
async fn panicking_model_fails_its_request_and_the_instance_is_replaced() {
    let repo = TestRepo::new();
    repo.bundled("mlp")
        .synthetic("panics", "[ 2 ]", 4, &[("behavior", "panic")]);
    let mut s = TestServer::start(repo.path()).await;
    for _ in 0..3 {
        let err = s
            .client
            .model_infer(fp32_request("panics", "INPUT__0", &[1, 2], &[1.0, -2.0]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("panicked"), "{}", err.message());
    }
    // The replaced instance serves the next request.
    let ok = s
        .client
        .model_infer(fp32_request("panics", "INPUT__0", &[1, 2], &[1.0, 2.0]))
        .await;
    assert_eq!(
        f32s(
            &ok.expect("instance was replaced")
                .into_inner()
                .raw_output_contents[0]
        ),
        vec![1.0, 2.0]
    );
    still_serves_mlp(&mut s).await;
    s.stop().await;
}

async fn still_serves_mlp(server: &mut TestServer) {
    let ok = server
        .client
        .model_infer(fp32_request("mlp", "INPUT__0", &[2, 64], &[0.1; 128]))
        .await;
    assert_eq!(
        ok.expect("mlp serves").into_inner().outputs[0].shape,
        vec![2, 10]
    );
}
