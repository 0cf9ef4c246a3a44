//! Protocol messages <-> domain values for inference and statistics.

use std::time::Duration;

use crate::error::Error;
use crate::model::{InferRequest, InferResponse, LoadedModel, RequestInput, Tally};
use crate::tensor::{element_count, shape_string, DataType};
use bytes::{BufMut, Bytes, BytesMut};
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::{
    model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferBatchStatistics, InferParameter, InferStatistics, InferTensorContents, ModelInferRequest,
    ModelInferResponse, ModelStatistics, StatisticDuration,
};

/// Decode a ModelInferRequest: tensor bytes from `raw_input_contents` (one entry per
/// input, in order) or from each input's typed `contents`.
pub fn infer_request(req: ModelInferRequest) -> Result<InferRequest, Error> {
    let model = req.model_name;
    let queue_timeout =
        uint_parameter(&model, &req.parameters, "timeout")?.map(Duration::from_micros);
    let priority = uint_parameter(&model, &req.parameters, "priority")?;
    let invalid = |message: String| Error::InvalidRequest {
        model: model.clone(),
        message,
    };
    let raw = req.raw_input_contents;
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries, expected one per input ({})",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let data = match raw.next() {
            Some(bytes) => {
                if input.contents.is_some() {
                    return Err(invalid(format!(
                        "input '{}' has both contents and raw_input_contents",
                        input.name
                    )));
                }
                bytes
            }
            None => typed_contents(&model, &input)?,
        };
        inputs.push(RequestInput {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    Ok(InferRequest {
        id: req.id,
        inputs,
        outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        deadline: None,
        queue_timeout,
        priority,
        preempt: false,
    })
}

/// A request parameter that must be a non-negative integer (Triton's `timeout` in
/// microseconds, `priority`), sent as int64 or uint64.
fn uint_parameter(
    model: &str,
    parameters: &std::collections::HashMap<String, InferParameter>,
    key: &str,
) -> Result<Option<u64>, Error> {
    match parameters
        .get(key)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(Some(*v as u64)),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(*v)),
        Some(other) => Err(Error::InvalidRequest {
            model: model.to_owned(),
            message: format!("parameter '{key}' must be a non-negative integer, got {other:?}"),
        }),
    }
}

/// Typed `contents` to little-endian bytes. An unknown datatype yields no bytes; the
/// model's validation then reports the datatype it expects.
fn typed_contents(model: &str, input: &InferInputTensor) -> Result<Bytes, Error> {
    let Some(dtype) = DataType::from_wire_name(&input.datatype) else {
        return Ok(Bytes::new());
    };
    let empty = InferTensorContents::default();
    let c = input.contents.as_ref().unwrap_or(&empty);
    let expected = element_count(&input.shape);
    let invalid = |message: String| Error::InvalidRequest {
        model: model.to_owned(),
        message,
    };
    let mut out = BytesMut::with_capacity(expected * dtype.size());
    let narrow = |what: &str, v: i64, lo: i64, hi: i64| {
        if v < lo || v > hi {
            Err(invalid(format!(
                "input '{}': {what} value {v} does not fit {dtype}",
                input.name
            )))
        } else {
            Ok(v)
        }
    };
    let count = match dtype {
        DataType::Bool => {
            c.bool_contents
                .iter()
                .for_each(|&b| out.put_u8(u8::from(b)));
            c.bool_contents.len()
        }
        DataType::Uint8 => {
            for &v in &c.uint_contents {
                out.put_u8(narrow("uint_contents", i64::from(v), 0, 255)? as u8);
            }
            c.uint_contents.len()
        }
        DataType::Int8 => {
            for &v in &c.int_contents {
                out.put_i8(narrow("int_contents", i64::from(v), -128, 127)? as i8);
            }
            c.int_contents.len()
        }
        DataType::Int16 => {
            for &v in &c.int_contents {
                out.put_i16_le(narrow("int_contents", i64::from(v), -32768, 32767)? as i16);
            }
            c.int_contents.len()
        }
        DataType::Int32 => {
            c.int_contents.iter().for_each(|&v| out.put_i32_le(v));
            c.int_contents.len()
        }
        DataType::Int64 => {
            c.int64_contents.iter().for_each(|&v| out.put_i64_le(v));
            c.int64_contents.len()
        }
        DataType::Fp32 => {
            c.fp32_contents.iter().for_each(|&v| out.put_f32_le(v));
            c.fp32_contents.len()
        }
        DataType::Fp64 => {
            c.fp64_contents.iter().for_each(|&v| out.put_f64_le(v));
            c.fp64_contents.len()
        }
        DataType::Fp16 | DataType::Bf16 => {
            return Err(invalid(format!(
                "input '{}': {dtype} has no typed contents field; send it in raw_input_contents",
                input.name
            )))
        }
    };
    if count != expected {
        return Err(invalid(format!(
            "input '{}': contents hold {count} {dtype} values, shape {} needs {expected}",
            input.name,
            shape_string(&input.shape)
        )));
    }
    Ok(out.freeze())
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
