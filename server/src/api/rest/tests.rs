use super::*;
use crate::error::RETRY_PUSHBACK_HEADER;
use hyper::header::RETRY_AFTER;
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::model_infer_response::InferOutputTensor;
use tonic::Code;

fn decode_json(json: &str) -> Result<Decoded, String> {
    decode(
        "m",
        "",
        &Bytes::from(json.to_owned()),
        None,
        1 << 20,
        &mut |_| true,
    )
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn routes_follow_the_v2_paths() {
    let model = |name: &str, version: &str, action| Route::Model {
        name: name.into(),
        version: version.into(),
        action,
    };
    assert_eq!(route("/v2"), Ok(Route::Server));
    assert_eq!(route("/v2/health/ready/"), Ok(Route::Ready));
    assert_eq!(route("/v2/models/stats"), Ok(Route::AllStats));
    assert_eq!(
        route("/v2/models/mlp"),
        Ok(model("mlp", "", ModelAction::Metadata))
    );
    assert_eq!(
        route("/v2/models/mlp/versions/2/infer"),
        Ok(model("mlp", "2", ModelAction::Infer))
    );
    assert_eq!(
        route("/v2/models/my%20model/config"),
        Ok(model("my model", "", ModelAction::Config))
    );
    assert_eq!(
        route("/v2/repository/models/cnn/unload"),
        Ok(Route::Unload("cnn".into()))
    );
    for bad in [
        "/",
        "/v1/models/x",
        "/v2/models/x/run",
        "/v2/models/%zz",
        "/v2/models/%ff",
    ] {
        assert!(route(bad).is_err(), "{bad}");
    }
}

#[test]
fn json_data_nested_or_flat_becomes_little_endian_bytes() {
    let d = decode_json(
        r#"{"id":"a","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[-3,4]]},
            {"name":"y","shape":[3],"datatype":"INT16","data":[-1,0,32767]},
            {"name":"z","shape":[2],"datatype":"BOOL","data":[true,false]}]}"#,
    )
    .unwrap();
    let r = &d.request;
    assert_eq!((r.model_name.as_str(), r.id.as_str()), ("m", "a"));
    assert_eq!(f32s(&r.raw_input_contents[0]), [1.0, 2.5, -3.0, 4.0]);
    assert_eq!(&r.raw_input_contents[1][..], [0xff, 0xff, 0, 0, 0xff, 0x7f]);
    assert_eq!(&r.raw_input_contents[2][..], [1, 0]);
    assert_eq!(d.decoded_bytes, 16 + 6 + 2);
}

#[test]
fn binary_data_follows_the_json_header_in_input_order() {
    let json = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}},
        {"name":"b","shape":[2],"datatype":"INT32","data":[7,8]},
        {"name":"c","shape":[2],"datatype":"UINT8","parameters":{"binary_data_size":2}}],
        "parameters":{"binary_data_output":true,"priority":2},
        "outputs":[{"name":"o","parameters":{"binary_data":false}}]}"#;
    let mut body = json.as_bytes().to_vec();
    body.extend_from_slice(&1.5f32.to_le_bytes());
    body.extend_from_slice(&[9, 10]);
    let d = decode(
        "m",
        "1",
        &Bytes::from(body),
        Some(json.len()),
        1024,
        &mut |_| true,
    )
    .unwrap();
    let r = &d.request;
    assert_eq!(f32s(&r.raw_input_contents[0]), [1.5]);
    assert_eq!(&r.raw_input_contents[2][..], [9, 10]);
    assert_eq!(d.decoded_bytes, 8);
    assert!(d.answer.binary_by_default);
    assert_eq!(d.answer.binary.get("o"), Some(&false));
    // binary_data_output is REST's own; the rest go on as protocol parameters.
    assert!(!r.parameters.contains_key("binary_data_output"));
    assert_eq!(
        r.parameters["priority"].parameter_choice,
        Some(ParameterChoice::Int64Param(2))
    );
}

#[test]
// Kept whole: one table of bad requests beside the reason each one is given.
fn bad_requests_are_refused_with_the_reason() {
    let cases = [
        (
            r#"{"inputs":[{"name":"x","shape":[3],"datatype":"INT8","data":[1,2,300]}]}"#,
            "300 is not a INT8",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","data":[1,2.5]}]}"#,
            "2.5 is not a INT32",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2,3]}]}"#,
            "more values than the shape",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":[1,2,3]}]}"#,
            "has 3 values",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP16","data":[1]}]}"#,
            "as binary data",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["a"]}]}"#,
            "no model here takes",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","data":[1]}]}"#,
            "not a BOOL",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
            "neither data nor",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}]}"#,
            "both data and",
        ),
        (
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":-4}}]}"#,
            "non-negative",
        ),
        (
            r#"{"inputs":[],"outputs":[{"name":"o","parameters":{"classification":2}}]}"#,
            "classification",
        ),
        (
            r#"{"inputs":[],"parameters":{"binary_data_output":"yes"}}"#,
            "true or false",
        ),
        (
            r#"{"inputs":[],"parameters":{"p":[1]}}"#,
            "string, a boolean or a number",
        ),
        (r#"{"inputs":{}}"#, "not a valid inference request"),
    ];
    for (json, fragment) in cases {
        let err = decode_json(json)
            .err()
            .unwrap_or_else(|| panic!("accepted {json}"));
        assert!(err.contains(fragment), "{json}: {err}");
    }
    let err = decode(
        "m",
        "",
        &Bytes::from_static(b"{}xx"),
        Some(9),
        64,
        &mut |_| true,
    )
    .err()
    .unwrap();
    assert!(err.contains("has only 4 bytes"), "{err}");
    let leftover = r#"{"inputs":[]}"#;
    let body = Bytes::from(format!("{leftover}abc"));
    let err = decode("m", "", &body, Some(leftover.len()), 64, &mut |_| true)
        .err()
        .unwrap();
    assert!(err.contains("3 bytes of binary data"), "{err}");
}

#[test]
fn a_huge_shape_is_refused_before_its_buffer_exists() {
    // 2^40 FP64 values would be 8 TiB: refused from the text's length, allocating nothing.
    let err = decode_json(
        r#"{"inputs":[{"name":"x","shape":[1048576,1048576],"datatype":"FP64","data":[1]}]}"#,
    )
    .err()
    .unwrap();
    assert!(err.contains("more than its data holds"), "{err}");
    let err = decode_json(r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP64","data":[1]}]}"#)
        .err()
        .unwrap();
    assert!(err.contains("shape"), "{err}");
    // What the data would decode to is bounded as well.
    let json = r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP64","data":[1,2,3,4]}]}"#;
    let err = decode("m", "", &Bytes::from(json), None, 31, &mut |_| true)
        .err()
        .unwrap();
    assert!(err.contains("exceed the 31 bytes"), "{err}");
}

#[test]
fn outputs_go_out_as_json_or_binary_data_as_asked() {
    let response = ModelInferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        id: "q".into(),
        outputs: ["a", "b", "h"]
            .iter()
            .zip(["FP32", "INT64", "FP16"])
            .map(|(name, dtype)| InferOutputTensor {
                name: (*name).into(),
                datatype: dtype.into(),
                shape: vec![2],
                ..Default::default()
            })
            .collect(),
        raw_output_contents: vec![
            Bytes::from([0.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat()),
            Bytes::from([7i64.to_le_bytes(), (-1i64).to_le_bytes()].concat()),
            Bytes::from_static(&[0, 60, 0, 188]),
        ],
        ..Default::default()
    };
    let answer = AnswerForm {
        binary_by_default: false,
        binary: [("b".to_owned(), true)].into(),
    };
    let encoded = encode(response, &answer);
    let json: Value = serde_json::from_slice(&encoded.json).unwrap();
    assert_eq!(json["id"], "q");
    assert_eq!(json["outputs"][0]["data"], serde_json::json!([0.5, -2.0]));
    assert_eq!(json["outputs"][1]["parameters"]["binary_data_size"], 16);
    // 16-bit floats have no JSON form: binary data even when JSON was asked for.
    assert_eq!(json["outputs"][2]["parameters"]["binary_data_size"], 4);
    assert_eq!(encoded.binary.len(), 2);
    assert_eq!(encoded.binary[1][..], [0, 60, 0, 188]);
}

#[test]
fn statuses_map_to_http_as_the_readme_says() {
    assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
    assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
    assert_eq!(
        http_status(Code::Unavailable),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        http_status(Code::DeadlineExceeded),
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(
        http_status(Code::ResourceExhausted),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        http_status(Code::Internal),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let mut status = Status::unavailable("busy");
    status
        .metadata_mut()
        .insert(RETRY_PUSHBACK_HEADER, "1500".parse().unwrap());
    let answer = status_answer(&status);
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers()[RETRY_AFTER], "2");
    assert_eq!(answer.headers()["retry-after-ms"], "1500");
}

#[test]
fn protocol_messages_answer_in_tritons_json_form() {
    let json = message_json(
        &ModelMetadataResponse {
            name: "m".into(),
            versions: vec!["1".into()],
            platform: "pytorch_libtorch".into(),
            inputs: vec![model_metadata_response::TensorMetadata {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 64],
            }],
            outputs: vec![],
        },
        "ModelMetadataResponse",
    );
    // 64-bit integers as numbers, proto field names, empty fields present.
    assert_eq!(json["inputs"][0]["shape"], serde_json::json!([-1, 64]));
    assert_eq!(json["outputs"], serde_json::json!([]));
}

#[test]
fn deeply_nested_data_is_refused_without_exhausting_the_stack() {
    let depth = 100_000;
    let json = format!(
        r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{}1{}}}]}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let err = decode("m", "", &Bytes::from(json), None, 1 << 20, &mut |_| true)
        .err()
        .unwrap();
    assert!(err.contains("recursion limit"), "{err}");
}

#[test]
fn the_budget_is_asked_before_a_data_buffer_exists() {
    let json = r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP64","data":[1,2,3,4]}]}"#;
    let mut asked = Vec::new();
    let mut refuse = |bytes| {
        asked.push(bytes);
        false
    };
    let err = decode("m", "", &Bytes::from(json), None, 1 << 20, &mut refuse)
        .err()
        .unwrap();
    assert!(err.contains("budget"), "{err}");
    assert_eq!(asked, [32]);
}

#[test]
fn parameters_and_shapes_are_bounded_as_they_are_read() {
    let nested = format!(
        r#"{{"inputs":[],"parameters":{{"p":[{}]}}}}"#,
        "[],".repeat(1000) + "[]"
    );
    let err = decode_json(&nested).err().unwrap();
    assert!(err.contains("a string, a boolean or a number"), "{err}");
    let dims = vec!["1"; 100].join(",");
    let json =
        format!(r#"{{"inputs":[{{"name":"x","shape":[{dims}],"datatype":"FP32","data":[1]}}]}}"#);
    let err = decode_json(&json).err().unwrap();
    assert!(err.contains("at most"), "{err}");
}
