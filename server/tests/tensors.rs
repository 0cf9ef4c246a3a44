//! Tensor encodings: every numeric datatype libtorch has through `raw_input_contents`,
//! typed `contents`, several inputs and outputs, and output selection.

mod common;

use common::{f32s, raw_request, test_weights, TestRepo, TestServer};
use sluice::tensor::DataType;
use sluice_proto::inference::{
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    InferTensorContents, ModelInferRequest,
};
use tonic::Code;

fn identity_config(name: &str, dtype: DataType) -> String {
    let t = sluice::spec::config_dtype_name(dtype);
    format!(
        "name: \"{name}\"\nplatform: \"pytorch_libtorch\"\nmax_batch_size: 4\n\
         input [ {{ name: \"INPUT__0\" data_type: {t} dims: [ 3 ] }} ]\n\
         output [ {{ name: \"OUTPUT__0\" data_type: {t} dims: [ 3 ] }} ]\n"
    )
}

fn model_name(dtype: DataType) -> String {
    format!("identity_{}", dtype.wire_name().to_lowercase())
}

#[tokio::test]
async fn every_datatype_round_trips_through_raw_contents() {
    let repo = TestRepo::new();
    for dtype in DataType::ALL {
        repo.model(
            &model_name(dtype),
            &identity_config(&model_name(dtype), dtype),
            Some(&test_weights("identity.pt")),
        );
    }
    let mut s = TestServer::start(repo.path()).await;
    for dtype in DataType::ALL {
        // Six distinct elements, each a valid value of the type (bools are 0 or 1).
        let raw: Vec<u8> = (0..6 * dtype.size())
            .map(|i| {
                if dtype == DataType::Bool {
                    (i % 2) as u8
                } else {
                    (i * 7 % 61) as u8
                }
            })
            .collect();
        let req = raw_request(
            &model_name(dtype),
            "INPUT__0",
            dtype.wire_name(),
            &[2, 3],
            raw.clone(),
        );
        let resp = s
            .client
            .model_infer(req)
            .await
            .unwrap_or_else(|e| panic!("{dtype}: {e}"))
            .into_inner();
        assert_eq!(resp.outputs[0].datatype, dtype.wire_name());
        assert_eq!(resp.outputs[0].shape, vec![2, 3]);
        assert_eq!(resp.raw_output_contents[0].as_ref(), &raw[..], "{dtype}");
    }
    s.stop().await;
}

fn typed(
    model: &str,
    datatype: &str,
    shape: &[i64],
    contents: InferTensorContents,
) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT__0".into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            contents: Some(contents),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn typed_contents_are_accepted_and_checked() {
    let repo = TestRepo::new();
    for dtype in [
        DataType::Fp32,
        DataType::Int8,
        DataType::Int64,
        DataType::Bool,
        DataType::Fp16,
    ] {
        repo.model(
            &model_name(dtype),
            &identity_config(&model_name(dtype), dtype),
            Some(&test_weights("identity.pt")),
        );
    }
    let mut s = TestServer::start(repo.path()).await;

    let fp32 = InferTensorContents {
        fp32_contents: vec![1.5, -2.0, 3.25],
        ..Default::default()
    };
    let resp = s
        .client
        .model_infer(typed("identity_fp32", "FP32", &[1, 3], fp32))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f32s(&resp.raw_output_contents[0]), vec![1.5, -2.0, 3.25]);

    let int8 = InferTensorContents {
        int_contents: vec![-128, 0, 127],
        ..Default::default()
    };
    let resp = s
        .client
        .model_infer(typed("identity_int8", "INT8", &[1, 3], int8))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.raw_output_contents[0].as_ref(), &[0x80, 0, 0x7f]);

    let int64 = InferTensorContents {
        int64_contents: vec![1 << 40, -1, 7],
        ..Default::default()
    };
    let resp = s
        .client
        .model_infer(typed("identity_int64", "INT64", &[1, 3], int64))
        .await
        .unwrap()
        .into_inner();
    let back: Vec<i64> = resp.raw_output_contents[0]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(back, vec![1 << 40, -1, 7]);

    let bools = InferTensorContents {
        bool_contents: vec![true, false, true],
        ..Default::default()
    };
    let resp = s
        .client
        .model_infer(typed("identity_bool", "BOOL", &[1, 3], bools))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.raw_output_contents[0].as_ref(), &[1, 0, 1]);

    // Out of range, wrong count, and a type without a typed field: precise rejections.
    let cases = [
        (
            typed(
                "identity_int8",
                "INT8",
                &[1, 3],
                InferTensorContents {
                    int_contents: vec![1, 2, 300],
                    ..Default::default()
                },
            ),
            "300",
        ),
        (
            typed(
                "identity_fp32",
                "FP32",
                &[1, 3],
                InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                },
            ),
            "needs 3",
        ),
        (
            typed(
                "identity_fp16",
                "FP16",
                &[1, 3],
                InferTensorContents::default(),
            ),
            "raw_input_contents",
        ),
    ];
    for (req, part) in cases {
        let err = s.client.model_infer(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains(part) && err.message().contains("INPUT__0"),
            "{}",
            err.message()
        );
    }
    s.stop().await;
}

const ADD_SUB: &str = r#"
name: "add_sub"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "b__1" data_type: TYPE_FP32 dims: [ 2 ] },
        { name: "a__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "sum__0" data_type: TYPE_FP32 dims: [ 2 ] },
         { name: "diff__1" data_type: TYPE_FP32 dims: [ 2 ] } ]
"#;

fn add_sub_request(a: [f32; 2], b: [f32; 2], outputs: &[&str]) -> ModelInferRequest {
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 2],
        ..Default::default()
    };
    let raw = |v: [f32; 2]| {
        v.iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    };
    ModelInferRequest {
        model_name: "add_sub".into(),
        inputs: vec![input("a__0"), input("b__1")],
        raw_input_contents: vec![raw(a), raw(b)],
        outputs: outputs
            .iter()
            .map(|n| InferRequestedOutputTensor {
                name: (*n).into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn several_inputs_and_outputs_map_by_index_suffix() {
    let repo = TestRepo::new();
    repo.model("add_sub", ADD_SUB, Some(&test_weights("add_sub.pt")));
    let mut s = TestServer::start(repo.path()).await;

    let all = s
        .client
        .model_infer(add_sub_request([5.0, 1.0], [2.0, 3.0], &[]))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = all.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, vec!["sum__0", "diff__1"]);
    assert_eq!(f32s(&all.raw_output_contents[0]), vec![7.0, 4.0]);
    assert_eq!(f32s(&all.raw_output_contents[1]), vec![3.0, -2.0]);

    let one = s
        .client
        .model_infer(add_sub_request([5.0, 1.0], [2.0, 3.0], &["diff__1"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.outputs.len(), 1);
    assert_eq!(f32s(&one.raw_output_contents[0]), vec![3.0, -2.0]);

    let mut mixed = add_sub_request([1.0, 1.0], [1.0, 1.0], &[]);
    mixed.inputs[1].shape = vec![2, 2];
    mixed.raw_input_contents[1] = vec![0u8; 16].into();
    let err = s.client.model_infer(mixed).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("batch size 2"), "{}", err.message());
    s.stop().await;
}
