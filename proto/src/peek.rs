//! The header fields of a `ModelInferRequest` read from the first bytes of its gRPC
//! message, before the rest of the body has arrived and without decoding it.
//!
//! A server that must refuse a request (its model is overloaded) needs only the model's
//! name and version and the request's `priority` and `timeout` parameters. Every
//! protobuf encoder writes a message's fields in field-number order, so these fields
//! (1 `model_name`, 2 `model_version`, 3 `id`, 4 `parameters`) come before the tensors
//! (5 `inputs`, 6 `outputs`, 7 `raw_input_contents`), typically within the first hundred
//! bytes. [`peek_infer_header`] reads them from a prefix of the gRPC body (the 5-byte
//! message header, then the message) and stops at the first tensor field.
//!
//! A request whose header fields come after its tensors (legal protobuf, written by no
//! common encoder) is judged by the fields that came first; the full decode later sees
//! every field, so such a request is never answered wrongly, only judged early on less.

/// Fields 1-4 of a `ModelInferRequest`, borrowed from the prefix.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InferHeader<'a> {
    pub model_name: &'a str,
    pub model_version: &'a str,
    /// The request-level `priority` parameter, when it is an int64 or uint64.
    pub priority: Option<Integer>,
    /// The request-level `timeout` parameter (microseconds), when it is an int64 or uint64.
    pub timeout: Option<Integer>,
}

/// An integer parameter as it was sent: the server applies its own rules to its sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integer {
    Signed(i64),
    Unsigned(u64),
}

/// What a prefix of a gRPC request body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek<'a> {
    /// The header fields are complete: a tensor field follows, or the message ended.
    Header(InferHeader<'a>),
    /// The prefix ends inside the header fields: more bytes are needed.
    NeedMore,
    /// Not something to judge early (compressed, malformed, not UTF-8, a parameter of
    /// another type): the full decode answers it.
    Unreadable,
}

/// gRPC's message header: a compression flag and a 4-byte big-endian length.
const GRPC_HEADER: usize = 5;

/// Read the header fields from `prefix`, the first bytes of a unary gRPC body.
pub fn peek_infer_header(prefix: &[u8]) -> Peek<'_> {
    let Some(header) = prefix.get(..GRPC_HEADER) else {
        return Peek::NeedMore;
    };
    if header[0] != 0 {
        return Peek::Unreadable;
    }
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let body = &prefix[GRPC_HEADER..];
    let whole = body.len() >= length;
    let message = &body[..length.min(body.len())];
    match read_header(message) {
        Step::Done(h) => Peek::Header(h),
        // The message ended without a tensor field: what was read is all there is.
        Step::Ended(h) if whole => Peek::Header(h),
        // A field cut short by the message's own end is malformed.
        Step::Truncated if whole => Peek::Unreadable,
        Step::Ended(_) | Step::Truncated => Peek::NeedMore,
        Step::Bad => Peek::Unreadable,
    }
}

enum Step<'a> {
    Done(InferHeader<'a>),
    /// The bytes ran out between two fields, before any tensor field.
    Ended(InferHeader<'a>),
    /// The bytes ran out inside a field.
    Truncated,
    Bad,
}

fn read_header(message: &[u8]) -> Step<'_> {
    let mut header = InferHeader::default();
    let mut at = 0usize;
    loop {
        if at == message.len() {
            return Step::Ended(header);
        }
        let Some((key, after_key)) = varint(message, at) else {
            return Step::Truncated;
        };
        let (number, wire_type) = (key >> 3, key & 7);
        if number >= 5 {
            return Step::Done(header);
        }
        let field = match (number, wire_type) {
            (1..=4, 2) => match delimited(message, after_key) {
                Field::Value(value, next) => {
                    at = next;
                    value
                }
                Field::Truncated => return Step::Truncated,
                Field::Bad => return Step::Bad,
            },
            _ => return Step::Bad,
        };
        let read = match number {
            1 => std::str::from_utf8(field)
                .map(|s| header.model_name = s)
                .is_ok(),
            2 => std::str::from_utf8(field)
                .map(|s| header.model_version = s)
                .is_ok(),
            3 => true,
            _ => parameter(field, &mut header),
        };
        if !read {
            return Step::Bad;
        }
    }
}

enum Field<'a> {
    Value(&'a [u8], usize),
    Truncated,
    Bad,
}

/// A length-delimited value starting at `at` (its length varint), and where the next
/// field starts.
fn delimited(bytes: &[u8], at: usize) -> Field<'_> {
    let Some((len, start)) = varint(bytes, at) else {
        return Field::Truncated;
    };
    let Ok(len) = usize::try_from(len) else {
        return Field::Bad;
    };
    match start.checked_add(len) {
        Some(end) if end <= bytes.len() => Field::Value(&bytes[start..end], end),
        Some(_) => Field::Truncated,
        None => Field::Bad,
    }
}

/// One entry of the parameters map (key 1, value 2: an `InferParameter`); keeps
/// `priority` and `timeout`. `false` when the entry is malformed.
fn parameter<'a>(entry: &'a [u8], header: &mut InferHeader<'a>) -> bool {
    let (mut key, mut value) = (None, None);
    let mut at = 0;
    while at < entry.len() {
        let Some((tag, after)) = varint(entry, at) else {
            return false;
        };
        let Field::Value(field, next) = delimited(entry, after) else {
            return false;
        };
        match tag {
            0x0a => key = Some(field),
            0x12 => value = Some(field),
            _ => return false,
        }
        at = next;
    }
    let slot = match key {
        Some(b"priority") => &mut header.priority,
        Some(b"timeout") => &mut header.timeout,
        _ => return true,
    };
    // InferParameter: int64_param is field 2, uint64_param field 5 (varints); an entry
    // without a value, or with another type, leaves the parameter unread.
    let Some(value) = value else { return true };
    let Some((tag, after)) = varint(value, 0) else {
        return false;
    };
    let Some((raw, end)) = varint(value, after) else {
        return false;
    };
    if end != value.len() {
        return false;
    }
    *slot = match tag {
        0x10 => Some(Integer::Signed(raw as i64)),
        0x28 => Some(Integer::Unsigned(raw)),
        _ => return false,
    };
    true
}

/// A varint at `at` and the position after it; `None` when the bytes end first or it
/// is longer than 10 bytes.
fn varint(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *bytes.get(at + i)?;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, at + i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost::Message;

    use super::*;
    use crate::inference::infer_parameter::ParameterChoice;
    use crate::inference::model_infer_request::InferInputTensor;
    use crate::inference::{InferParameter, ModelInferRequest};

    fn framed(req: &ModelInferRequest) -> Vec<u8> {
        let message = req.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    fn request(parameters: &[(&str, ParameterChoice)]) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "cnn".into(),
            model_version: "2".into(),
            id: "request-7".into(),
            parameters: parameters
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        InferParameter {
                            parameter_choice: Some(v.clone()),
                        },
                    )
                })
                .collect::<HashMap<_, _>>(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 16 * 1024].into()],
            ..Default::default()
        }
    }

    #[test]
    fn the_header_fields_come_from_the_first_bytes() {
        let wire = framed(&request(&[
            ("priority", ParameterChoice::Uint64Param(2)),
            ("timeout", ParameterChoice::Int64Param(1500)),
            ("sequence_id", ParameterChoice::StringParam("x".into())),
        ]));
        let expected = InferHeader {
            model_name: "cnn",
            model_version: "2",
            priority: Some(Integer::Unsigned(2)),
            timeout: Some(Integer::Signed(1500)),
        };
        // The whole body, and a prefix that ends inside the first tensor.
        assert_eq!(peek_infer_header(&wire), Peek::Header(expected.clone()));
        assert_eq!(peek_infer_header(&wire[..200]), Peek::Header(expected));
    }

    #[test]
    fn a_prefix_that_ends_inside_the_header_asks_for_more() {
        let wire = framed(&request(&[("priority", ParameterChoice::Int64Param(1))]));
        // Up to where the inputs field starts, every cut asks for more bytes.
        let header_end = wire.iter().position(|&b| b == 0x2a).expect("inputs tag");
        for cut in 0..header_end {
            assert_eq!(peek_infer_header(&wire[..cut]), Peek::NeedMore, "cut {cut}");
        }
        assert!(matches!(
            peek_infer_header(&wire[..header_end + 1]),
            Peek::Header(_)
        ));
    }

    #[test]
    fn a_message_without_tensors_is_complete_at_its_end() {
        let req = ModelInferRequest {
            model_name: "mlp".into(),
            ..Default::default()
        };
        let wire = framed(&req);
        assert_eq!(
            peek_infer_header(&wire),
            Peek::Header(InferHeader {
                model_name: "mlp",
                ..Default::default()
            })
        );
        // An empty message: five header bytes and nothing else.
        assert_eq!(
            peek_infer_header(&[0, 0, 0, 0, 0]),
            Peek::Header(InferHeader::default())
        );
    }

    #[test]
    fn what_cannot_be_judged_early_is_left_to_the_decoder() {
        let mut compressed = framed(&request(&[]));
        compressed[0] = 1;
        assert_eq!(peek_infer_header(&compressed), Peek::Unreadable);
        // model_name as a varint, a name that is not UTF-8, a double priority.
        assert_eq!(
            peek_infer_header(&[0, 0, 0, 0, 2, 0x08, 1]),
            Peek::Unreadable
        );
        assert_eq!(
            peek_infer_header(&[0, 0, 0, 0, 3, 0x0a, 1, 0xff]),
            Peek::Unreadable
        );
        let wire = framed(&request(&[("priority", ParameterChoice::DoubleParam(1.0))]));
        assert_eq!(peek_infer_header(&wire), Peek::Unreadable);
        // A length that runs past the end of the message is malformed; past the end
        // of the prefix, it needs more bytes.
        assert_eq!(
            peek_infer_header(&[0, 0, 0, 0, 2, 0x0a, 9]),
            Peek::Unreadable
        );
        assert_eq!(
            peek_infer_header(&[0, 0, 0, 0, 2, 0x0a, 9, b'a', b'b']),
            Peek::Unreadable,
            "the message's own length says where it ends, not the prefix"
        );
        assert_eq!(
            peek_infer_header(&[0, 0, 0, 0, 11, 0x0a, 9, b'a']),
            Peek::NeedMore
        );
    }

    #[test]
    fn other_parameters_and_types_are_ignored() {
        let wire = framed(&request(&[(
            "binary_data_output",
            ParameterChoice::BoolParam(true),
        )]));
        let Peek::Header(h) = peek_infer_header(&wire) else {
            panic!("readable");
        };
        assert_eq!((h.priority, h.timeout), (None, None));
    }
}
