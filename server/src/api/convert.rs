//! Protocol messages <-> domain values for inference and statistics: decoding a
//! request's tensors (sizes from client shapes checked before anything is allocated)
//! and its Triton parameters, encoding responses and statistics.

use std::time::Duration;

use crate::error::{clip, Error};
use crate::model::{InferRequest, InferResponse, LoadedModel, RequestInput};
use crate::stats::Tally;
use crate::tensor::{checked_element_count, shape_string, DataType};
use bytes::{BufMut, Bytes, BytesMut};
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::{
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferBatchStatistics, InferParameter, InferStatistics, InferTensorContents, ModelInferRequest,
    ModelInferResponse, ModelStatistics, StatisticDuration,
};
use sluice_proto::limits::MAX_DIMS;

/// Decode a ModelInferRequest: tensor bytes from `raw_input_contents` (one entry per
/// input, in order) or from each input's typed `contents`.
///
/// The codec has already bounded the request's counts and string lengths at the wire;
/// here every size derived from a client shape is checked arithmetic, and typed
/// contents are counted and compared with their shape before any buffer exists.
pub fn infer_request(req: ModelInferRequest) -> Result<InferRequest, Error> {
    let ModelInferRequest {
        model_name: model,
        id,
        parameters,
        inputs: request_inputs,
        outputs,
        raw_input_contents: raw,
        ..
    } = req;
    // Triton's `timeout` of 0 means "no timeout", not "already expired".
    let queue_timeout = uint_parameter(&model, &parameters, "timeout")?
        .filter(|&micros| micros > 0)
        .map(Duration::from_micros);
    let priority = uint_parameter(&model, &parameters, "priority")?;
    let invalid = |message: String| Error::InvalidRequest {
        model: model.clone(),
        message,
    };
    if !raw.is_empty() && raw.len() != request_inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries, expected one per input ({})",
            raw.len(),
            request_inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(request_inputs.len());
    for input in request_inputs {
        inputs.push(request_input(&model, input, raw.next())?);
    }
    Ok(InferRequest {
        id,
        inputs,
        outputs: outputs.into_iter().map(|o| o.name).collect(),
        queue_timeout,
        priority,
    })
}

/// One input with its bytes: `raw` (its `raw_input_contents` entry) or its typed
/// `contents`, never both.
fn request_input(
    model: &str,
    mut input: InferInputTensor,
    raw: Option<Bytes>,
) -> Result<RequestInput, Error> {
    let invalid = |message: String| Error::InvalidRequest {
        model: model.to_owned(),
        message,
    };
    // The codec caps dims at the wire; requests built in process meet the same cap.
    if input.shape.len() > MAX_DIMS {
        return Err(invalid(format!(
            "input '{}' has {} dims, more than the {MAX_DIMS} allowed",
            clip(&input.name),
            input.shape.len()
        )));
    }
    let data = match raw {
        Some(bytes) => {
            if input.contents.is_some() {
                return Err(invalid(format!(
                    "input '{}' has both contents and raw_input_contents",
                    clip(&input.name)
                )));
            }
            bytes
        }
        // Taken out of the message so each input's typed values are freed as soon as
        // its bytes exist, instead of living until the whole request is done.
        None => {
            let contents = input.contents.take().unwrap_or_default();
            typed_contents(model, &input, contents)?
        }
    };
    Ok(RequestInput {
        name: input.name,
        datatype: input.datatype,
        shape: input.shape,
        data,
    })
}

/// A request parameter that must be a non-negative integer (Triton's `timeout` in
/// microseconds, `priority`), sent as int64 or uint64.
fn uint_parameter(
    model: &str,
    parameters: &std::collections::HashMap<String, InferParameter>,
    key: &str,
) -> Result<Option<u64>, Error> {
    let Some(choice) = parameters
        .get(key)
        .and_then(|p| p.parameter_choice.as_ref())
    else {
        return Ok(None);
    };
    match choice {
        ParameterChoice::Int64Param(v) => u64::try_from(*v).ok(),
        ParameterChoice::Uint64Param(v) => Some(*v),
        ParameterChoice::BoolParam(_)
        | ParameterChoice::StringParam(_)
        | ParameterChoice::DoubleParam(_) => None,
    }
    .map(Some)
    .ok_or_else(|| Error::InvalidRequest {
        model: model.to_owned(),
        message: format!(
            "parameter '{key}' must be a non-negative integer, got {}",
            clip(&format!("{choice:?}"))
        ),
    })
}

/// Typed `contents` to little-endian bytes. An unknown datatype yields no bytes; the
/// model's validation then reports the datatype it expects.
///
/// Order matters: the shape's element count is computed with checked arithmetic, the
/// values actually present for the datatype are counted and compared with it, and only
/// then is a buffer of `count * size` bytes (bounded by what the message carried)
/// allocated. A shape of `[2**46]` with no data is a mismatch, not an allocation.
fn typed_contents(
    model: &str,
    input: &InferInputTensor,
    c: InferTensorContents,
) -> Result<Bytes, Error> {
    let Some(dtype) = DataType::from_wire_name(&input.datatype) else {
        return Ok(Bytes::new());
    };
    let name = clip(&input.name);
    let invalid = |message: String| Error::InvalidRequest {
        model: model.to_owned(),
        message,
    };
    let expected = checked_element_count(&input.shape).map_err(|e| {
        invalid(format!(
            "input '{name}' has shape {}: {e}",
            shape_string(&input.shape)
        ))
    })?;
    let (field, count) = match dtype {
        DataType::Bool => ("bool_contents", c.bool_contents.len()),
        DataType::Uint8 => ("uint_contents", c.uint_contents.len()),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => {
            ("int_contents", c.int_contents.len())
        }
        DataType::Int64 => ("int64_contents", c.int64_contents.len()),
        DataType::Fp32 => ("fp32_contents", c.fp32_contents.len()),
        DataType::Fp64 => ("fp64_contents", c.fp64_contents.len()),
        DataType::Fp16 | DataType::Bf16 => {
            return Err(invalid(format!(
                "input '{name}': {dtype} has no typed contents field; send it in raw_input_contents"
            )))
        }
    };
    if count != expected {
        return Err(invalid(format!(
            "input '{name}': contents hold {count} {dtype} values in {field}, shape {} needs {expected}",
            shape_string(&input.shape)
        )));
    }
    let size = count.checked_mul(dtype.size()).ok_or_else(|| {
        invalid(format!(
            "input '{name}': {count} {dtype} values overflow the address space"
        ))
    })?;
    let mut out = BytesMut::with_capacity(size);
    put_values(&mut out, dtype, &c).map_err(|v| {
        invalid(format!(
            "input '{name}': {field} value {v} does not fit {dtype}"
        ))
    })?;
    debug_assert_eq!(out.len(), size);
    Ok(out.freeze())
}

/// The typed values of `dtype`'s field as little-endian bytes; a value that does not
/// fit the datatype is returned as the error.
fn put_values(out: &mut BytesMut, dtype: DataType, c: &InferTensorContents) -> Result<(), String> {
    match dtype {
        DataType::Bool => c
            .bool_contents
            .iter()
            .for_each(|&b| out.put_u8(u8::from(b))),
        DataType::Uint8 => {
            for &v in &c.uint_contents {
                out.put_u8(u8::try_from(v).map_err(|_| v.to_string())?);
            }
        }
        DataType::Int8 => {
            for &v in &c.int_contents {
                out.put_i8(i8::try_from(v).map_err(|_| v.to_string())?);
            }
        }
        DataType::Int16 => {
            for &v in &c.int_contents {
                out.put_i16_le(i16::try_from(v).map_err(|_| v.to_string())?);
            }
        }
        DataType::Int32 => c.int_contents.iter().for_each(|&v| out.put_i32_le(v)),
        DataType::Int64 => c.int64_contents.iter().for_each(|&v| out.put_i64_le(v)),
        DataType::Fp32 => c.fp32_contents.iter().for_each(|&v| out.put_f32_le(v)),
        DataType::Fp64 => c.fp64_contents.iter().for_each(|&v| out.put_f64_le(v)),
        // Refused before: no typed field carries these.
        DataType::Fp16 | DataType::Bf16 => {}
    }
    Ok(())
}

/// Encode a response with every output in `raw_output_contents`.
pub fn infer_response(resp: InferResponse) -> ModelInferResponse {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut raw = Vec::with_capacity(resp.outputs.len());
    for (name, tensor) in resp.outputs {
        outputs.push(InferOutputTensor {
            name,
            datatype: tensor.dtype.wire_name().to_owned(),
            shape: tensor.shape,
            ..Default::default()
        });
        raw.push(tensor.data);
    }
    ModelInferResponse {
        model_name: resp.model,
        model_version: resp.version.to_string(),
        id: resp.id,
        outputs,
        raw_output_contents: raw,
        ..Default::default()
    }
}

fn duration(t: Tally) -> Option<StatisticDuration> {
    Some(StatisticDuration {
        count: t.count,
        ns: u64::try_from(t.total.as_nanos()).unwrap_or(u64::MAX),
    })
}

/// ModelStatistics for one loaded version.
pub fn statistics(model: &LoadedModel) -> ModelStatistics {
    let s = model.statistics();
    let zero = |count: u64| Some(StatisticDuration { count, ns: 0 });
    ModelStatistics {
        name: model.spec.name.clone(),
        version: model.version.to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: zero(s.compute_infer.count),
            compute_infer: duration(s.compute_infer),
            compute_output: zero(s.compute_infer.count),
            cache_hit: zero(0),
            cache_miss: zero(0),
        }),
        batch_stats: s
            .batches
            .iter()
            .map(|(&batch_size, &t)| InferBatchStatistics {
                batch_size,
                compute_input: zero(t.count),
                compute_infer: duration(t),
                compute_output: zero(t.count),
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::inference::model_infer_request::InferRequestedOutputTensor;
    use tonic::Code;

    fn request(inputs: Vec<InferInputTensor>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs,
            ..Default::default()
        }
    }

    fn typed(datatype: &str, shape: Vec<i64>, contents: InferTensorContents) -> InferInputTensor {
        InferInputTensor {
            name: "x".into(),
            datatype: datatype.into(),
            shape,
            contents: Some(contents),
            ..Default::default()
        }
    }

    fn with_parameter(key: &str, choice: ParameterChoice) -> ModelInferRequest {
        let mut req = request(vec![]);
        req.parameters.insert(
            key.into(),
            InferParameter {
                parameter_choice: Some(choice),
            },
        );
        req
    }

    fn refusal(req: ModelInferRequest) -> String {
        let err = infer_request(req).expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        err.to_string()
    }

    #[test]
    fn timeout_zero_means_no_timeout() {
        let req = infer_request(with_parameter("timeout", ParameterChoice::Int64Param(0))).unwrap();
        assert_eq!(req.queue_timeout, None);
        let req =
            infer_request(with_parameter("timeout", ParameterChoice::Uint64Param(0))).unwrap();
        assert_eq!(req.queue_timeout, None);
        let req =
            infer_request(with_parameter("timeout", ParameterChoice::Int64Param(1500))).unwrap();
        assert_eq!(req.queue_timeout, Some(Duration::from_micros(1500)));
        let msg = refusal(with_parameter("timeout", ParameterChoice::Int64Param(-1)));
        assert!(
            msg.contains("parameter 'timeout' must be a non-negative integer"),
            "{msg}"
        );
    }

    #[test]
    fn a_huge_shape_without_data_is_refused_before_any_allocation() {
        let msg = refusal(request(vec![typed(
            "FP32",
            vec![1 << 46],
            InferTensorContents::default(),
        )]));
        assert_eq!(
            msg,
            "model 'm': input 'x': contents hold 0 FP32 values in fp32_contents, \
             shape [70368744177664] needs 70368744177664"
        );
        let msg = refusal(request(vec![typed(
            "FP32",
            vec![1 << 32, 1 << 32],
            InferTensorContents::default(),
        )]));
        assert!(msg.contains("its size overflows"), "{msg}");
        let msg = refusal(request(vec![typed(
            "INT64",
            vec![2, -3],
            InferTensorContents::default(),
        )]));
        assert!(msg.contains("dimension 1 is -3, below zero"), "{msg}");
    }

    #[test]
    fn typed_contents_are_counted_against_the_shape() {
        let contents = InferTensorContents {
            int_contents: vec![1, -2, 300],
            ..Default::default()
        };
        let req = infer_request(request(vec![typed("INT32", vec![3], contents.clone())])).unwrap();
        let bytes: Vec<u8> = [1i32, -2, 300]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(req.inputs[0].data.as_ref(), &bytes[..]);
        let msg = refusal(request(vec![typed("INT32", vec![4], contents.clone())]));
        assert!(msg.contains("contents hold 3 INT32 values in int_contents, shape [4] needs 4"));
        // Values present in another field than the datatype's do not count.
        let msg = refusal(request(vec![typed("FP32", vec![3], contents.clone())]));
        assert!(msg.contains("hold 0 FP32 values"), "{msg}");
        let msg = refusal(request(vec![typed("INT8", vec![3], contents)]));
        assert!(
            msg.contains("int_contents value 300 does not fit INT8"),
            "{msg}"
        );
        let msg = refusal(request(vec![typed(
            "UINT8",
            vec![1],
            InferTensorContents {
                uint_contents: vec![256],
                ..Default::default()
            },
        )]));
        assert!(
            msg.contains("uint_contents value 256 does not fit UINT8"),
            "{msg}"
        );
        let msg = refusal(request(vec![typed(
            "FP16",
            vec![1],
            InferTensorContents::default(),
        )]));
        assert!(msg.contains("FP16 has no typed contents field"), "{msg}");
    }

    #[test]
    fn too_many_dims_and_long_names_are_refused_and_clipped() {
        let mut input = typed(
            "FP32",
            vec![1; MAX_DIMS + 1],
            InferTensorContents::default(),
        );
        input.name = "n".repeat(10_000);
        let msg = refusal(request(vec![input]));
        assert!(
            msg.contains("has 65 dims, more than the 64 allowed"),
            "{msg}"
        );
        assert!(msg.len() < 400, "{msg}");
        let msg = refusal(with_parameter(
            "priority",
            ParameterChoice::StringParam("p".repeat(100_000)),
        ));
        assert!(msg.len() < 400, "{msg}");
    }

    #[test]
    fn outputs_and_raw_contents_pass_through() {
        let mut req = request(vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2],
            ..Default::default()
        }]);
        req.raw_input_contents = vec![Bytes::from_static(&[0; 8])];
        req.outputs = vec![InferRequestedOutputTensor {
            name: "y".into(),
            ..Default::default()
        }];
        let decoded = infer_request(req).unwrap();
        assert_eq!(decoded.inputs[0].data.len(), 8);
        assert_eq!(decoded.outputs, vec!["y".to_owned()]);
    }
}
