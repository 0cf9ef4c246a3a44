//! Wire-level bounds of a `ModelInferRequest`, checked before prost decodes it.
//!
//! prost materialises whatever a message holds: every occurrence of a repeated message
//! field becomes a struct, every map entry a hash-table slot, every packed varint an
//! element. A few wire bytes per entry can therefore cost hundreds of heap bytes
//! (an empty `inputs` entry is 2 bytes on the wire and a ~300-byte struct in a
//! doubling `Vec`). [`check_infer_request`] walks the encoded message once, with a
//! tag/varint reader that allocates nothing, and refuses it when a count or a length
//! is above the caps below. Only then does the codec let prost decode it.
//!
//! # Heap cost of an admitted request
//!
//! With the caps in force, decoding a request of `w` wire bytes allocates at most
//! `HEAP_PER_WIRE_BYTE * w + HEAP_OVERHEAD` bytes on top of the receive buffer
//! (see [`decoded_heap_bound`]). Derivation, per kind of field:
//!
//! * `raw_input_contents` entries are `Bytes` slices of the receive buffer: no copy.
//! * Strings are copied once, into exactly-sized buffers: at most 1 byte per wire byte.
//! * Packed scalars (`shape` and the typed `contents` fields) grow a `Vec` by pushing,
//!   so its capacity is below twice its length (or the allocator's minimum of 4 or 8
//!   elements). The costliest is a 1-byte varint decoded into an 8-byte `int64` /
//!   `uint64` element: 8 bytes, times 2 for the spare capacity, is 16 per wire byte.
//!   A one-element vector (capacity 4, 32 bytes) needs at least 3 wire bytes (tag,
//!   length, value), about 11 per wire byte, so it stays under the same bound.
//!   `bytes_contents` (16-32 heap bytes per 2 wire bytes) is refused: sluice serves
//!   no BYTES tensors.
//! * Containers whose entries can be nearly free on the wire are capped in number, so
//!   they cost a constant: the `inputs`, `outputs` and `raw_input_contents` vectors
//!   (at most 2 x cap x element size each) and the parameter maps (at most
//!   [`MAX_PARAMETERS`] entries in the whole request, each costing at most
//!   [`HEAP_PER_PARAMETER`] bytes of table even when it sits alone in a 4-slot table).
//!
//! Hence `16 * w + HEAP_OVERHEAD`, where `HEAP_OVERHEAD` is a few hundred KiB.

use std::fmt;
use std::mem::size_of;

use prost::bytes::Bytes;

use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::inference::InferParameter;

/// Most entries of `inputs`. Models with more than a few dozen inputs are rare; 256
/// leaves room for wide feature models while bounding the per-entry struct cost.
pub const MAX_INPUTS: usize = 256;
/// Most entries of `outputs` (the requested outputs).
pub const MAX_OUTPUTS: usize = 256;
/// Most entries of `raw_input_contents` (one per input when used).
pub const MAX_RAW_INPUT_CONTENTS: usize = MAX_INPUTS;
/// Most entries of one parameters map (the request's, or one tensor's).
pub const MAX_PARAMETERS_PER_MAP: usize = 64;
/// Most parameter entries in the whole request, over all its maps: keeps the hash
/// tables of hundreds of tensors, each with a few parameters, a small constant.
pub const MAX_PARAMETERS: usize = 256;
/// Most dimensions of one tensor's shape. libtorch tensors rarely exceed 8; 64 is far
/// beyond any real model.
pub const MAX_DIMS: usize = 64;
/// Longest model name, model version, tensor name, datatype or parameter key, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest request `id`, in bytes: clients put trace or correlation ids there, some of
/// them structured, so it gets more room than a name.
pub const MAX_ID_BYTES: usize = 4096;
/// Longest string parameter value, in bytes: parameters are the protocol's extension
/// point and may carry small documents (JSON settings), so they get the most room.
pub const MAX_PARAMETER_STRING_BYTES: usize = 64 * 1024;

/// Heap bytes one wire byte of an admitted request can cost once decoded: a 1-byte
/// varint becomes an 8-byte element of a `Vec` with up to twice its length in capacity.
pub const HEAP_PER_WIRE_BYTE: usize = 16;

/// Bytes of hash table one parameter entry can cost: alone in hashbrown's smallest
/// table (4 slots of key and value, 4 control bytes and a 16-byte control group).
pub const HEAP_PER_PARAMETER: usize =
    4 * (size_of::<String>() + size_of::<InferParameter>() + 1) + 16;

/// Heap an admitted request can cost beyond [`HEAP_PER_WIRE_BYTE`] per wire byte: the
/// capped containers, at twice their capacity, and the parameter tables.
pub const HEAP_OVERHEAD: usize = 2
    * (MAX_INPUTS * size_of::<InferInputTensor>()
        + MAX_OUTPUTS * size_of::<InferRequestedOutputTensor>()
        + MAX_RAW_INPUT_CONTENTS * size_of::<Bytes>())
    + MAX_PARAMETERS * HEAP_PER_PARAMETER;

// The constant is "a few hundred KiB" as documented above (about 260 KiB on 64-bit).
const _: () = assert!(HEAP_OVERHEAD < 512 * 1024);

/// Upper bound on the heap a `ModelInferRequest` of `wire_bytes` allocates when decoded,
/// once [`check_infer_request`] has admitted it.
pub fn decoded_heap_bound(wire_bytes: usize) -> usize {
    wire_bytes
        .saturating_mul(HEAP_PER_WIRE_BYTE)
        .saturating_add(HEAP_OVERHEAD)
}

/// Why an encoded `ModelInferRequest` was refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a well-formed protobuf message.
    Malformed(String),
    /// A repeated field or map has more entries than its cap.
    TooMany {
        field: FieldPath,
        count: usize,
        cap: usize,
        what: &'static str,
    },
    /// A string is longer than its cap.
    TooLong {
        field: FieldPath,
        len: usize,
        cap: usize,
    },
    /// A field sluice does not serve and that would cost more than its wire size.
    Unsupported { field: FieldPath, why: &'static str },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Malformed(why) => write!(f, "cannot decode ModelInferRequest: {why}"),
            Refusal::TooMany {
                field,
                count,
                cap,
                what,
            } => write!(f, "{field} has {count} {what}, more than the {cap} allowed"),
            Refusal::TooLong { field, len, cap } => write!(
                f,
                "{field} is {len} bytes long, more than the {cap} allowed"
            ),
            Refusal::Unsupported { field, why } => write!(f, "{field}: {why}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// A field of a `ModelInferRequest`, rendered as `ModelInferRequest.inputs[3].shape`.
/// Built without allocation; only formatted when a refusal is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPath {
    /// `inputs` or `outputs` and the entry's index, for fields inside a tensor.
    pub tensor: Option<(&'static str, usize)>,
    pub field: &'static str,
}

impl FieldPath {
    const fn top(field: &'static str) -> FieldPath {
        FieldPath {
            tensor: None,
            field,
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModelInferRequest.")?;
        if let Some((list, index)) = self.tensor {
            write!(f, "{list}[{index}].")?;
        }
        f.write_str(self.field)
    }
}

/// Heap per tensor beyond the per-byte rule: the minimum capacities of its short vectors.
const SMALL_VEC_MARGIN: usize = 256;
/// Heap per request beyond the per-byte rule.
const REQUEST_MARGIN: usize = 1024;

/// What decoding an admitted request will cost, from the walk over its wire bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCost {
    /// Upper bound on the heap prost allocates to decode it, beyond the receive buffer.
    /// The same derivation as [`decoded_heap_bound`], with this request's own counts in
    /// place of the caps, and its `raw_input_contents` bytes (slices of the receive
    /// buffer) at no cost: `16 x (wire bytes outside raw_input_contents)` plus twice
    /// the entry structs of its tensor lists plus its parameter tables, plus a margin
    /// of 256 bytes per tensor and 1 KiB per request. A request that
    /// carries its tensors in `raw_input_contents` (tritonclient's way) costs a few
    /// KiB whatever its size; typed `contents` cost up to 16 times their wire bytes.
    pub heap_bound: usize,
}

/// Walk an encoded `ModelInferRequest` and refuse it if it is malformed or exceeds a
/// cap; else what decoding it will cost. Allocates nothing unless it refuses; linear
/// in `wire.len()`.
pub fn check_infer_request(wire: &[u8]) -> Result<DecodeCost, Refusal> {
    let mut reader = Reader::new(wire);
    let mut parameters_total = 0usize;
    let mut raw_bytes = 0usize;
    let (mut inputs, mut outputs, mut raw, mut parameters) = (0usize, 0usize, 0usize, 0usize);
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Delimited(s)) => string(FieldPath::top("model_name"), s, MAX_NAME_BYTES)?,
            (2, Value::Delimited(s)) => string(FieldPath::top("model_version"), s, MAX_NAME_BYTES)?,
            (3, Value::Delimited(s)) => string(FieldPath::top("id"), s, MAX_ID_BYTES)?,
            (4, Value::Delimited(entry)) => {
                parameters += 1;
                parameter_entry(FieldPath::top("parameters"), entry, &mut parameters_total)?;
            }
            (5, Value::Delimited(tensor)) => {
                input_tensor(inputs, tensor, &mut parameters_total)?;
                inputs += 1;
            }
            (6, Value::Delimited(tensor)) => {
                output_tensor(outputs, tensor, &mut parameters_total)?;
                outputs += 1;
            }
            (7, Value::Delimited(bytes)) => {
                raw += 1;
                raw_bytes = raw_bytes.saturating_add(bytes.len());
            }
            // Unknown fields, and known ones with a wire type prost will refuse.
            _ => {}
        }
    }
    cap(FieldPath::top("inputs"), inputs, MAX_INPUTS, "entries")?;
    cap(FieldPath::top("outputs"), outputs, MAX_OUTPUTS, "entries")?;
    cap(
        FieldPath::top("raw_input_contents"),
        raw,
        MAX_RAW_INPUT_CONTENTS,
        "entries",
    )?;
    cap(
        FieldPath::top("parameters"),
        parameters,
        MAX_PARAMETERS_PER_MAP,
        "entries",
    )?;
    parameters_cap(parameters_total)?;
    // Plus a margin per tensor and per request for what the per-byte rule rounds away
    // (the allocator's minimum capacities of short vectors).
    let entries = 2
        * (inputs * size_of::<InferInputTensor>()
            + outputs * size_of::<InferRequestedOutputTensor>()
            + raw * size_of::<Bytes>())
        + parameters_total * HEAP_PER_PARAMETER
        + (inputs + outputs) * SMALL_VEC_MARGIN
        + REQUEST_MARGIN;
    // All counts are capped and `wire.len()` is a message length: no overflow.
    let heap_bound = (wire.len() - raw_bytes.min(wire.len())) * HEAP_PER_WIRE_BYTE + entries;
    Ok(DecodeCost { heap_bound })
}

fn cap(field: FieldPath, count: usize, cap: usize, what: &'static str) -> Result<(), Refusal> {
    if count > cap {
        return Err(Refusal::TooMany {
            field,
            count,
            cap,
            what,
        });
    }
    Ok(())
}

fn parameters_cap(total: usize) -> Result<(), Refusal> {
    if total > MAX_PARAMETERS {
        return Err(Refusal::TooMany {
            field: FieldPath::top("parameters (all maps together)"),
            count: total,
            cap: MAX_PARAMETERS,
            what: "entries",
        });
    }
    Ok(())
}

fn string(field: FieldPath, s: &[u8], max: usize) -> Result<(), Refusal> {
    if s.len() > max {
        return Err(Refusal::TooLong {
            field,
            len: s.len(),
            cap: max,
        });
    }
    Ok(())
}

/// One `map<string, InferParameter>` entry: key = 1, value = 2.
fn parameter_entry(map: FieldPath, entry: &[u8], total: &mut usize) -> Result<(), Refusal> {
    *total += 1;
    // Checked as entries arrive so a flood of tiny entries is refused without walking
    // all of them.
    parameters_cap(*total)?;
    let key = FieldPath {
        field: "parameters key",
        ..map
    };
    let value = FieldPath {
        field: "parameters value",
        ..map
    };
    let mut reader = Reader::new(entry);
    while let Some((field, v)) = reader.field()? {
        match (field, v) {
            (1, Value::Delimited(s)) => string(key, s, MAX_NAME_BYTES)?,
            (2, Value::Delimited(parameter)) => {
                let mut inner = Reader::new(parameter);
                while let Some((field, v)) = inner.field()? {
                    // InferParameter.string_param = 3; the other choices are scalars.
                    if let (3, Value::Delimited(s)) = (field, v) {
                        string(value, s, MAX_PARAMETER_STRING_BYTES)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `InferInputTensor`: name = 1, datatype = 2, shape = 3, parameters = 4, contents = 5.
fn input_tensor(index: usize, tensor: &[u8], total: &mut usize) -> Result<(), Refusal> {
    let at = |field| FieldPath {
        tensor: Some(("inputs", index)),
        field,
    };
    let (mut dims, mut parameters) = (0usize, 0usize);
    let mut reader = Reader::new(tensor);
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Delimited(s)) => string(at("name"), s, MAX_NAME_BYTES)?,
            (2, Value::Delimited(s)) => string(at("datatype"), s, MAX_NAME_BYTES)?,
            // Packed (the proto3 default) or one dim per field occurrence.
            (3, Value::Delimited(packed)) => dims += varint_count(packed)?,
            (3, Value::Varint) => dims += 1,
            (4, Value::Delimited(entry)) => {
                parameters += 1;
                parameter_entry(at("parameters"), entry, total)?;
            }
            (5, Value::Delimited(contents)) => tensor_contents(at, contents)?,
            _ => {}
        }
        // Checked as dims arrive: a shape of millions of dims is refused at once.
        cap(at("shape"), dims, MAX_DIMS, "dims")?;
    }
    cap(
        at("parameters"),
        parameters,
        MAX_PARAMETERS_PER_MAP,
        "entries",
    )
}

/// `InferTensorContents`: the typed fields cost at most [`HEAP_PER_WIRE_BYTE`] per wire
/// byte; `bytes_contents` = 8 (a `Bytes` per 2-byte entry) is refused.
fn tensor_contents(at: impl Fn(&'static str) -> FieldPath, contents: &[u8]) -> Result<(), Refusal> {
    let mut reader = Reader::new(contents);
    while let Some((field, _)) = reader.field()? {
        if field == 8 {
            return Err(Refusal::Unsupported {
                field: at("contents.bytes_contents"),
                why: "BYTES tensors are not served; send a numeric datatype",
            });
        }
    }
    Ok(())
}

/// `InferRequestedOutputTensor`: name = 1, parameters = 2.
fn output_tensor(index: usize, tensor: &[u8], total: &mut usize) -> Result<(), Refusal> {
    let at = |field| FieldPath {
        tensor: Some(("outputs", index)),
        field,
    };
    let mut parameters = 0usize;
    let mut reader = Reader::new(tensor);
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Delimited(s)) => string(at("name"), s, MAX_NAME_BYTES)?,
            (2, Value::Delimited(entry)) => {
                parameters += 1;
                parameter_entry(at("parameters"), entry, total)?;
            }
            _ => {}
        }
    }
    cap(
        at("parameters"),
        parameters,
        MAX_PARAMETERS_PER_MAP,
        "entries",
    )
}

/// Number of varints in a packed field, checking each is terminated.
fn varint_count(packed: &[u8]) -> Result<usize, Refusal> {
    let mut reader = Reader::new(packed);
    let mut count = 0usize;
    while !reader.done() {
        reader.varint()?;
        count += 1;
    }
    Ok(count)
}

// ---------------------------------------------------------------------------
// Protobuf wire format reader
// ---------------------------------------------------------------------------

/// A field's value as the wire format carries it.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint,
    Fixed,
    Delimited(&'a [u8]),
    Group,
}

/// A cursor over protobuf wire bytes: keys, varints and length-delimited slices.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn malformed(&self, why: &str) -> Refusal {
        Refusal::Malformed(format!("{why} at byte {}", self.pos))
    }

    /// A base-128 varint of at most 10 bytes that fits 64 bits, as prost reads them.
    fn varint(&mut self) -> Result<u64, Refusal> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err(self.malformed("truncated varint"));
            };
            self.pos += 1;
            if i == 9 && byte > 1 {
                return Err(self.malformed("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.malformed("varint longer than 10 bytes"))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], Refusal> {
        let left = self.bytes.len() - self.pos;
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= left)
            .ok_or_else(|| self.malformed("length runs past the end of the message"))?;
        let slice = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(slice)
    }

    /// The next field number and value, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u32, Value<'a>)>, Refusal> {
        if self.done() {
            return Ok(None);
        }
        let (number, wire_type) = self.key()?;
        let value = match wire_type {
            0 => {
                self.varint()?;
                Value::Varint
            }
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len = self.varint()?;
                Value::Delimited(self.take(len)?)
            }
            3 => {
                self.skip_group()?;
                Value::Group
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            // An end-group key outside a group, or an undefined wire type.
            _ => return Err(self.malformed("unexpected wire type")),
        };
        Ok(Some((number, value)))
    }

    fn key(&mut self) -> Result<(u32, u8), Refusal> {
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| self.malformed("field key out of range"))?;
        let number = key >> 3;
        if number == 0 {
            return Err(self.malformed("field number 0"));
        }
        let wire_type = u8::try_from(key & 7).expect("three bits fit a byte");
        Ok((number, wire_type))
    }

    /// Skip a (deprecated) group up to its end key, nested groups included, with a
    /// counter instead of recursion.
    fn skip_group(&mut self) -> Result<(), Refusal> {
        let mut depth = 1usize;
        while depth > 0 {
            if self.done() {
                return Err(self.malformed("unterminated group"));
            }
            let (_, wire_type) = self.key()?;
            match wire_type {
                0 => {
                    self.varint()?;
                }
                1 => {
                    self.take(8)?;
                }
                2 => {
                    let len = self.varint()?;
                    self.take(len)?;
                }
                3 => depth += 1,
                4 => depth -= 1,
                5 => {
                    self.take(4)?;
                }
                _ => return Err(self.malformed("unexpected wire type")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::inference::infer_parameter::ParameterChoice;
    use crate::inference::{InferTensorContents, ModelInferRequest};

    fn tensor(name: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        }
    }

    fn check(req: &ModelInferRequest) -> Result<(), Refusal> {
        check_infer_request(&req.encode_to_vec()).map(|_| ())
    }

    #[test]
    fn a_typical_request_passes() {
        let mut req = ModelInferRequest {
            model_name: "mlp".into(),
            id: "x".repeat(MAX_ID_BYTES),
            inputs: vec![tensor("INPUT__0", vec![1, 64]); MAX_INPUTS],
            raw_input_contents: vec![vec![0u8; 256].into(); MAX_INPUTS],
            ..Default::default()
        };
        req.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(
                    "v".repeat(MAX_PARAMETER_STRING_BYTES),
                )),
            },
        );
        assert_eq!(check(&req), Ok(()));
        assert_eq!(check_infer_request(&[]).map(|_| ()), Ok(()));
    }

    #[test]
    fn counts_above_their_caps_are_refused_with_field_count_and_cap() {
        let req = ModelInferRequest {
            inputs: vec![InferInputTensor::default(); MAX_INPUTS + 1],
            ..Default::default()
        };
        assert_eq!(
            check(&req).unwrap_err().to_string(),
            "ModelInferRequest.inputs has 257 entries, more than the 256 allowed"
        );
        let req = ModelInferRequest {
            inputs: vec![tensor("a", vec![1]), tensor("b", vec![1; MAX_DIMS + 1])],
            ..Default::default()
        };
        assert_eq!(
            check(&req).unwrap_err().to_string(),
            "ModelInferRequest.inputs[1].shape has 65 dims, more than the 64 allowed"
        );
        let req = ModelInferRequest {
            raw_input_contents: vec![Bytes::new(); MAX_RAW_INPUT_CONTENTS + 1],
            ..Default::default()
        };
        assert!(matches!(
            check(&req),
            Err(Refusal::TooMany { count: 257, .. })
        ));
        let mut req = ModelInferRequest::default();
        for i in 0..=MAX_PARAMETERS_PER_MAP {
            req.parameters
                .insert(format!("k{i}"), InferParameter::default());
        }
        assert!(check(&req)
            .unwrap_err()
            .to_string()
            .starts_with("ModelInferRequest.parameters has 65 entries"));
    }

    #[test]
    fn parameters_are_capped_over_the_whole_request() {
        let mut one = InferInputTensor::default();
        one.parameters.insert("k".into(), InferParameter::default());
        let req = ModelInferRequest {
            inputs: vec![one; MAX_PARAMETERS + 1],
            ..Default::default()
        };
        assert!(matches!(
            check(&req),
            Err(Refusal::TooMany {
                cap: MAX_PARAMETERS,
                ..
            })
        ));
    }

    #[test]
    fn long_strings_are_refused() {
        let req = ModelInferRequest {
            model_name: "m".repeat(MAX_NAME_BYTES + 1),
            ..Default::default()
        };
        assert_eq!(
            check(&req).unwrap_err().to_string(),
            "ModelInferRequest.model_name is 1025 bytes long, more than the 1024 allowed"
        );
        let req = ModelInferRequest {
            outputs: vec![InferRequestedOutputTensor {
                name: "o".repeat(MAX_NAME_BYTES + 1),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(check(&req)
            .unwrap_err()
            .to_string()
            .starts_with("ModelInferRequest.outputs[0].name is 1025 bytes"));
        let mut input = tensor("i", vec![1]);
        input.parameters.insert(
            "k".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(
                    "v".repeat(MAX_PARAMETER_STRING_BYTES + 1),
                )),
            },
        );
        let req = ModelInferRequest {
            inputs: vec![input],
            ..Default::default()
        };
        assert!(check(&req)
            .unwrap_err()
            .to_string()
            .starts_with("ModelInferRequest.inputs[0].parameters value is 65537 bytes"));
    }

    #[test]
    fn bytes_contents_are_refused() {
        let mut input = tensor("i", vec![1]);
        input.contents = Some(InferTensorContents {
            bytes_contents: vec![Bytes::new()],
            ..Default::default()
        });
        let req = ModelInferRequest {
            inputs: vec![input],
            ..Default::default()
        };
        assert!(matches!(check(&req), Err(Refusal::Unsupported { .. })));
    }

    #[test]
    fn unpacked_dims_count_too() {
        // inputs { shape: 1 (unpacked, wire type 0) x 65 }
        let mut tensor = Vec::new();
        for _ in 0..=MAX_DIMS {
            tensor.extend_from_slice(&[3 << 3, 1]);
        }
        let len = u8::try_from(tensor.len()).unwrap();
        assert!(
            (128..256).contains(&usize::from(len)),
            "a two-byte varint below"
        );
        let mut wire = vec![5 << 3 | 2, len | 0x80, 1];
        wire.extend_from_slice(&tensor);
        assert!(matches!(
            check_infer_request(&wire),
            Err(Refusal::TooMany { count: 65, .. })
        ));
    }

    #[test]
    fn malformed_wire_is_refused_like_prost_does() {
        let cases: &[&[u8]] = &[
            &[0x0a],             // model_name with no length
            &[0x0a, 0x05, b'a'], // length past the end
            &[0x08, 0x80],       // truncated varint
            &[0x00],             // field number 0
            &[0x0c],             // end group outside a group
            &[0x0e],             // wire type 6
            &[0x0b, 0x08, 0x01], // unterminated group
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
        ];
        for wire in cases {
            let refusal = check_infer_request(wire).expect_err("malformed");
            assert!(matches!(refusal, Refusal::Malformed(_)), "{wire:?}");
            assert!(
                ModelInferRequest::decode(*wire).is_err(),
                "prost accepts {wire:?}"
            );
        }
        // A group prost skips as an unknown field passes here too.
        let group: &[u8] = &[0x43, 0x08, 0x01, 0x44];
        assert_eq!(check_infer_request(group).map(|_| ()), Ok(()));
        assert!(ModelInferRequest::decode(group).is_ok());
    }
}
