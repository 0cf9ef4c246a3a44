//! Checks on the exported descriptor set and on the generated message types.

use prost::Message;
use prost_types::FileDescriptorSet;
use sluice_proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor, InferParameter,
    ModelInferRequest,
};

const EXPECTED_METHODS: &[&str] = &[
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
];

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(sluice_proto::FILE_DESCRIPTOR_SET).expect("valid descriptor set")
}

#[test]
fn descriptor_set_has_both_files() {
    let fds = descriptor_set();
    let names: Vec<&str> = fds.file.iter().map(|f| f.name()).collect();
    assert!(names.contains(&"model_config.proto"), "{names:?}");
    assert!(names.contains(&"grpc_service.proto"), "{names:?}");
    for file in &fds.file {
        assert_eq!(file.package(), "inference");
    }
}

#[test]
fn service_has_all_methods() {
    let fds = descriptor_set();
    let service = fds
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .find(|s| s.name() == "GRPCInferenceService")
        .expect("GRPCInferenceService present");
    assert_eq!(
        format!("inference.{}", service.name()),
        sluice_proto::SERVICE_NAME
    );

    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    for expected in EXPECTED_METHODS {
        assert!(methods.contains(expected), "missing method {expected}");
    }
    assert_eq!(methods.len(), EXPECTED_METHODS.len(), "{methods:?}");

    let stream = service
        .method
        .iter()
        .find(|m| m.name() == "ModelStreamInfer")
        .expect("ModelStreamInfer present");
    assert!(stream.client_streaming());
    assert!(stream.server_streaming());
    assert_eq!(stream.input_type(), ".inference.ModelInferRequest");
    assert_eq!(stream.output_type(), ".inference.ModelStreamInferResponse");

    let unary = service
        .method
        .iter()
        .find(|m| m.name() == "ModelInfer")
        .expect("ModelInfer present");
    assert!(!unary.client_streaming());
    assert!(!unary.server_streaming());
}

/// Spot checks of wire numbers that Triton clients depend on.
#[test]
fn key_field_numbers() {
    let fds = descriptor_set();
    let message = |name: &str| {
        fds.file
            .iter()
            .flat_map(|f| f.message_type.iter())
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("message {name}"))
            .clone()
    };
    let number = |msg: &prost_types::DescriptorProto, field: &str| {
        msg.field
            .iter()
            .find(|f| f.name() == field)
            .unwrap_or_else(|| panic!("field {}.{field}", msg.name()))
            .number()
    };

    let req = message("ModelInferRequest");
    assert_eq!(number(&req, "raw_input_contents"), 7);
    let resp = message("ModelInferResponse");
    assert_eq!(number(&resp, "raw_output_contents"), 6);
    let param = message("InferParameter");
    assert_eq!(number(&param, "double_param"), 4);
    assert_eq!(number(&param, "uint64_param"), 5);
    let config = message("ModelConfig");
    assert_eq!(number(&config, "backend"), 17);
    assert_eq!(number(&config, "dynamic_batching"), 11);
    assert_eq!(number(&config, "sequence_batching"), 13);
    assert_eq!(number(&config, "ensemble_scheduling"), 15);
    assert_eq!(number(&config, "runtime"), 25);
    assert_eq!(number(&config, "model_metrics"), 26);
    let stats = message("ModelStatistics");
    assert_eq!(number(&stats, "response_stats"), 9);
    let config_resp = message("ModelConfigResponse");
    assert_eq!(number(&config_resp, "config"), 1);
}

#[test]
fn model_infer_request_round_trip() {
    let raw0: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let raw1: Vec<u8> = vec![0xde, 0xad, 0xbe, 0xef];

    let mut request = ModelInferRequest {
        model_name: "simple".to_owned(),
        model_version: "1".to_owned(),
        id: "req-42".to_owned(),
        inputs: vec![
            InferInputTensor {
                name: "INPUT0".to_owned(),
                datatype: "FP32".to_owned(),
                shape: vec![1, 4],
                ..Default::default()
            },
            InferInputTensor {
                name: "INPUT1".to_owned(),
                datatype: "UINT8".to_owned(),
                shape: vec![4],
                ..Default::default()
            },
        ],
        raw_input_contents: vec![raw0.clone().into(), raw1.clone().into()],
        ..Default::default()
    };
    request.parameters.insert(
        "sequence_id".to_owned(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Uint64Param(u64::MAX)),
        },
    );

    let bytes = request.encode_to_vec();
    let decoded = ModelInferRequest::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, request);
    assert_eq!(decoded.raw_input_contents[0].as_ref(), &raw0[..]);
    assert_eq!(decoded.raw_input_contents[1].as_ref(), &raw1[..]);
    assert_eq!(decoded.inputs[0].shape, vec![1, 4]);
    assert_eq!(
        decoded.parameters["sequence_id"].parameter_choice,
        Some(ParameterChoice::Uint64Param(u64::MAX))
    );

    // raw_input_contents is field 7, length-delimited: tag byte 7 << 3 | 2.
    assert!(bytes.contains(&((7 << 3) | 2)));
}
