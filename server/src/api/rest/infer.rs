//! Inference over REST: a KServe v2 JSON request (with Triton's binary tensor extension)
//! to a `ModelInferRequest`, and a `ModelInferResponse` back to JSON and binary data.
//!
//! A request body is a JSON header, optionally followed by binary tensor data: the
//! `Inference-Header-Content-Length` header gives the JSON part's length, and each input
//! whose parameters carry `binary_data_size` takes that many bytes of what follows, in
//! input order. Other inputs carry their values in `data` (a flat or nested array,
//! row-major). Every size is checked against the body before anything is allocated: a
//! `data` array is parsed straight into a buffer of the shape's byte size, and only after
//! that size was found to fit the text that holds it.

use std::collections::HashMap;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use sluice_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};

use crate::error::clip;
use crate::tensor::{checked_element_count, shape_string, DataType};
use sluice_proto::limits::MAX_DIMS;

/// The request parameter that asks for every output as binary data.
const BINARY_OUTPUT: &str = "binary_data_output";
/// An input's or output's parameter: its bytes travel as binary data.
const BINARY_DATA: &str = "binary_data";
/// An input's parameter: the length of its binary data.
const BINARY_SIZE: &str = "binary_data_size";

/// Parameters as a request carries them: names to scalars.
type JsonParameters = HashMap<String, Scalar>;

#[derive(Deserialize)]
struct JsonRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<JsonParameters>,
    #[serde(borrow)]
    inputs: Vec<JsonInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(Deserialize)]
struct JsonInput<'a> {
    name: String,
    #[serde(deserialize_with = "bounded_shape")]
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<JsonParameters>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Option<JsonParameters>,
}

/// A shape of at most [`MAX_DIMS`] dims: a longer one is refused as it is read, before
/// it takes memory.
fn bounded_shape<'de, D: de::Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    struct Dims;
    impl<'de> Visitor<'de> for Dims {
        type Value = Vec<i64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {MAX_DIMS} integers")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<i64>, A::Error> {
            let mut dims = Vec::new();
            while let Some(dim) = seq.next_element()? {
                if dims.len() == MAX_DIMS {
                    return Err(de::Error::custom(format!(
                        "a shape has at most {MAX_DIMS} dims"
                    )));
                }
                dims.push(dim);
            }
            Ok(dims)
        }
    }
    d.deserialize_seq(Dims)
}

/// A decoded REST inference request: the protocol message and how to answer it.
pub struct Decoded {
    pub request: ModelInferRequest,
    pub answer: AnswerForm,
    /// Bytes the decoded `data` arrays occupy (beyond the body itself).
    pub decoded_bytes: usize,
}

/// Which outputs are answered as binary data.
#[derive(Debug, Default)]
pub struct AnswerForm {
    /// Outputs not named below (or named without a `binary_data` parameter).
    pub binary_by_default: bool,
    pub binary: HashMap<String, bool>,
}

impl AnswerForm {
    fn is_binary(&self, name: &str, dtype: Option<DataType>) -> bool {
        // JSON has no 16-bit floats: those outputs always travel as binary data.
        matches!(dtype, Some(DataType::Fp16 | DataType::Bf16))
            || self
                .binary
                .get(name)
                .copied()
                .unwrap_or(self.binary_by_default)
    }
}

/// Decode a request body for `model` (`version` may be empty). `header_len` is the
/// `Inference-Header-Content-Length` header, when present. `max_decoded` bounds the
/// bytes `data` arrays may decode to. `Err` is a message for a 400 answer.
///
/// `reserve(bytes)` is asked before a `data` array's buffer is allocated; when it says
/// no, decoding stops with an error (the caller knows why).
pub fn decode(
    model: &str,
    version: &str,
    body: &Bytes,
    header_len: Option<usize>,
    max_decoded: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
) -> Result<Decoded, String> {
    let json_len = header_len.unwrap_or(body.len());
    if json_len > body.len() {
        return Err(format!(
            "Inference-Header-Content-Length is {json_len} but the body has only {} bytes",
            body.len()
        ));
    }
    let request: JsonRequest = serde_json::from_slice(&body[..json_len])
        .map_err(|e| format!("the request is not a valid inference request: {e}"))?;
    let mut binary = body.slice(json_len..);
    let mut request_parameters = parameters(request.parameters.as_ref())?;
    let binary_by_default = match request_parameters.remove(BINARY_OUTPUT) {
        None => false,
        Some(p) => bool_parameter(BINARY_OUTPUT, &p)?,
    };
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut raw = Vec::with_capacity(request.inputs.len());
    let mut decoded_bytes = 0usize;
    for input in request.inputs {
        let room = max_decoded.saturating_sub(decoded_bytes);
        let (tensor, bytes) = decode_input(input, &mut binary, room, reserve)?;
        if tensor.1 {
            decoded_bytes += bytes.len();
        }
        inputs.push(tensor.0);
        raw.push(bytes);
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of binary data follow the inputs and belong to none of them",
            binary.len()
        ));
    }
    let (answer, outputs) = requested_outputs(request.outputs, binary_by_default)?;
    Ok(Decoded {
        request: ModelInferRequest {
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            id: request.id.unwrap_or_default(),
            parameters: request_parameters,
            inputs,
            outputs,
            raw_input_contents: raw,
        },
        answer,
        decoded_bytes,
    })
}

/// The outputs a request names, and which of them are answered as binary data.
fn requested_outputs(
    outputs: Option<Vec<JsonOutput>>,
    binary_by_default: bool,
) -> Result<(AnswerForm, Vec<InferRequestedOutputTensor>), String> {
    let mut answer = AnswerForm {
        binary_by_default,
        binary: HashMap::new(),
    };
    let mut requested = Vec::new();
    for output in outputs.unwrap_or_default() {
        let mut params = parameters(output.parameters.as_ref())?;
        if let Some(p) = params.remove(BINARY_DATA) {
            answer
                .binary
                .insert(output.name.clone(), bool_parameter(BINARY_DATA, &p)?);
        }
        if params.contains_key("classification") {
            return Err(format!(
                "output '{}': the classification extension is not supported",
                clip(&output.name)
            ));
        }
        requested.push(InferRequestedOutputTensor {
            name: output.name,
            parameters: params,
        });
    }
    Ok((answer, requested))
}

/// One input and its bytes (`true` when they were decoded from a `data` array).
fn decode_input(
    input: JsonInput,
    binary: &mut Bytes,
    max_decoded: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
) -> Result<((InferInputTensor, bool), Bytes), String> {
    let name = clip(&input.name).into_owned();
    let mut params = parameters(input.parameters.as_ref())?;
    params.remove(BINARY_DATA);
    let size = match params.remove(BINARY_SIZE) {
        None => None,
        Some(p) => Some(size_parameter(&name, &p)?),
    };
    let (bytes, decoded) = match (size, input.data) {
        (Some(_), Some(_)) => {
            return Err(format!("input '{name}' has both data and {BINARY_SIZE}"))
        }
        (Some(size), None) => {
            if size > binary.len() {
                return Err(format!(
                    "input '{name}' has {BINARY_SIZE} {size} but only {} bytes of binary data remain",
                    binary.len()
                ));
            }
            (binary.split_to(size), false)
        }
        (None, Some(data)) => (json_data(&name, &input, data, max_decoded, reserve)?, true),
        (None, None) => return Err(format!("input '{name}' has neither data nor {BINARY_SIZE}")),
    };
    let tensor = InferInputTensor {
        name: input.name,
        datatype: input.datatype,
        shape: input.shape,
        parameters: params,
        contents: None,
    };
    Ok(((tensor, decoded), bytes))
}

/// An input's `data` array as little-endian bytes of its datatype.
fn json_data(
    name: &str,
    input: &JsonInput,
    data: &RawValue,
    max_decoded: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
) -> Result<Bytes, String> {
    let dtype = json_dtype(name, &input.datatype)?;
    let count = checked_element_count(&input.shape)
        .map_err(|e| format!("input '{name}' shape {}: {e}", shape_string(&input.shape)))?;
    // Every value takes at least one character of the text: a larger count cannot match,
    // and is refused before its buffer exists.
    let text = data.get();
    let too_many = || {
        format!(
            "input '{name}': shape {} needs {count} values, more than its data holds",
            shape_string(&input.shape)
        )
    };
    if count > text.len() {
        return Err(too_many());
    }
    let bytes = count
        .checked_mul(dtype.size())
        .filter(|&b| b <= max_decoded)
        .ok_or_else(|| {
            format!(
                "input '{name}': {count} {} values exceed the {max_decoded} bytes this request may decode",
                input.datatype
            )
        })?;
    if !reserve(bytes) {
        return Err(format!(
            "input '{name}': no room in the request-byte budget for {bytes} bytes"
        ));
    }
    let mut fill = Fill {
        dtype,
        out: BytesMut::with_capacity(bytes),
        left: count,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    (&mut fill)
        .deserialize(&mut de)
        .map_err(|e| format!("input '{name}' data: {e}"))?;
    if fill.left > 0 {
        return Err(format!(
            "input '{name}' data has {} values, shape {} needs {count}",
            count - fill.left,
            shape_string(&input.shape)
        ));
    }
    Ok(fill.out.freeze())
}

/// The datatype of an input sent as JSON values.
fn json_dtype(name: &str, datatype: &str) -> Result<DataType, String> {
    match DataType::from_wire_name(datatype) {
        Some(DataType::Fp16 | DataType::Bf16) => Err(format!(
            "input '{name}': {datatype} values cannot be sent as JSON; send them as binary data"
        )),
        Some(dtype) => Ok(dtype),
        None => Err(format!(
            "input '{name}' has datatype '{}', which no model here takes (one of {})",
            clip(datatype),
            DataType::ALL.map(DataType::wire_name).join(", ")
        )),
    }
}

/// Writes a (nested) JSON array of values into little-endian bytes of `dtype`, at most
/// `left` of them.
struct Fill {
    dtype: DataType,
    out: BytesMut,
    left: usize,
}

/// A JSON number or boolean of a `data` array, as serde hands it over.
#[derive(Clone, Copy)]
enum Number {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Bool(v) => write!(f, "{v}"),
            Number::Int(v) => write!(f, "{v}"),
            Number::Uint(v) => write!(f, "{v}"),
            Number::Float(v) => write!(f, "{v}"),
        }
    }
}

impl Fill {
    fn put<E: de::Error>(&mut self, v: Number) -> Result<(), E> {
        if self.left == 0 {
            return Err(E::custom("more values than the shape holds"));
        }
        self.left -= 1;
        let bad = || E::custom(format!("{v} is not a {} value", self.dtype.wire_name()));
        let int = match v {
            Number::Int(i) => Some(i128::from(i)),
            Number::Uint(u) => Some(i128::from(u)),
            Number::Bool(_) | Number::Float(_) => None,
        };
        let float = match v {
            Number::Int(i) => Some(i as f64),
            Number::Uint(u) => Some(u as f64),
            Number::Float(x) => Some(x),
            Number::Bool(_) => None,
        };
        macro_rules! put_int {
            ($t:ty, $put:ident) => {{
                let x = int.and_then(|i| <$t>::try_from(i).ok()).ok_or_else(bad)?;
                self.out.$put(x)
            }};
        }
        match self.dtype {
            DataType::Bool => match v {
                Number::Bool(b) => self.out.put_u8(u8::from(b)),
                Number::Int(_) | Number::Uint(_) | Number::Float(_) => return Err(bad()),
            },
            DataType::Uint8 => put_int!(u8, put_u8),
            DataType::Int8 => put_int!(i8, put_i8),
            DataType::Int16 => put_int!(i16, put_i16_le),
            DataType::Int32 => put_int!(i32, put_i32_le),
            DataType::Int64 => put_int!(i64, put_i64_le),
            DataType::Fp32 => self.out.put_f32_le(float.ok_or_else(bad)? as f32),
            DataType::Fp64 => self.out.put_f64_le(float.ok_or_else(bad)?),
            DataType::Fp16 | DataType::Bf16 => return Err(bad()),
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &mut Fill {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &mut Fill {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of {} values", self.dtype.wire_name())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(&mut *self)?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.put(Number::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.put(Number::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.put(Number::Uint(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.put(Number::Float(v))
    }
}

/// A parameter's value: a JSON scalar. Arrays, objects and null are refused as they are
/// read, before they take memory.
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct Value;
        impl Visitor<'_> for Value {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a boolean or a number")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                // As Triton's clients mean it: an integer is INT64 unless it needs 64 bits.
                Ok(i64::try_from(v).map_or(Scalar::Uint(v), Scalar::Int))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
        }
        d.deserialize_any(Value)
    }
}

/// JSON parameters as protocol parameters (string, bool, integer or double).
fn parameters(json: Option<&JsonParameters>) -> Result<HashMap<String, InferParameter>, String> {
    let mut out = HashMap::new();
    for (key, value) in json.into_iter().flatten() {
        let choice = match value {
            Scalar::Bool(b) => ParameterChoice::BoolParam(*b),
            Scalar::Str(s) => ParameterChoice::StringParam(s.clone()),
            Scalar::Int(i) => ParameterChoice::Int64Param(*i),
            Scalar::Uint(u) => ParameterChoice::Uint64Param(*u),
            Scalar::Float(f) => ParameterChoice::DoubleParam(*f),
        };
        out.insert(
            key.clone(),
            InferParameter {
                parameter_choice: Some(choice),
            },
        );
    }
    Ok(out)
}

fn bool_parameter(key: &str, p: &InferParameter) -> Result<bool, String> {
    match p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Ok(b),
        _ => Err(format!("parameter '{key}' must be true or false")),
    }
}

fn size_parameter(input: &str, p: &InferParameter) -> Result<usize, String> {
    match p.parameter_choice {
        Some(ParameterChoice::Int64Param(i)) => usize::try_from(i).ok(),
        Some(ParameterChoice::Uint64Param(u)) => usize::try_from(u).ok(),
        _ => None,
    }
    .ok_or_else(|| format!("input '{input}': {BINARY_SIZE} must be a non-negative integer"))
}

/// An encoded response: the JSON part, then the binary data (empty when none).
pub struct Encoded {
    pub json: Vec<u8>,
    pub binary: Vec<Bytes>,
}

/// Encode an inference response; outputs travel as binary data where `answer` says.
pub fn encode(resp: ModelInferResponse, answer: &AnswerForm) -> Encoded {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut binary = Vec::new();
    for (output, bytes) in resp.outputs.into_iter().zip(resp.raw_output_contents) {
        let dtype = DataType::from_wire_name(&output.datatype);
        let mut json = serde_json::json!({
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        });
        match dtype.filter(|_| !answer.is_binary(&output.name, dtype)) {
            Some(dtype) => json["data"] = values(dtype, &bytes),
            None => {
                json["parameters"] = serde_json::json!({ BINARY_SIZE: bytes.len() });
                binary.push(bytes);
            }
        }
        outputs.push(json);
    }
    let mut json = serde_json::json!({
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "outputs": outputs,
    });
    if !resp.id.is_empty() {
        json["id"] = Value::String(resp.id);
    }
    Encoded {
        json: serde_json::to_vec(&json).expect("a JSON value always serializes"),
        binary,
    }
}

/// Little-endian `bytes` of `dtype` as a flat JSON array.
fn values(dtype: DataType, bytes: &[u8]) -> Value {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> Value) -> Value {
        Value::Array(
            bytes
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks have N bytes")))
                .collect(),
        )
    }
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match dtype {
        DataType::Bool => each(bytes, |[b]: [u8; 1]| Value::Bool(b != 0)),
        DataType::Uint8 => each(bytes, |[b]: [u8; 1]| Value::from(b)),
        DataType::Int8 => each(bytes, |b| Value::from(i8::from_le_bytes(b))),
        DataType::Int16 => each(bytes, |b| Value::from(i16::from_le_bytes(b))),
        DataType::Int32 => each(bytes, |b| Value::from(i32::from_le_bytes(b))),
        DataType::Int64 => each(bytes, |b| Value::from(i64::from_le_bytes(b))),
        DataType::Fp32 => each(bytes, |b| float(f64::from(f32::from_le_bytes(b)))),
        DataType::Fp64 => each(bytes, |b| float(f64::from_le_bytes(b))),
        // Always sent as binary data (see AnswerForm::is_binary).
        DataType::Fp16 | DataType::Bf16 => Value::Null,
    }
}
