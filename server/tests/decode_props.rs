//! Properties of request decoding, from wire bytes to validated tensors.
//!
//! * Any bytes, and any well-formed but wrong `ModelInferRequest` (random, huge and
//!   negative dims, random datatypes, contents of the wrong length, many tensors, long
//!   strings), go through the codec's decode, `convert::infer_request` and
//!   `model::validate` without a panic; every refusal is INVALID_ARGUMENT with a bounded
//!   message, and whatever is accepted has exactly the bytes its shape needs.
//! * The heap a decoded request holds stays within `limits::decoded_heap_bound` of its
//!   wire size, measured with a counting allocator for random requests and for the
//!   costliest admissible shapes; a request over the caps is refused before anything is
//!   decoded.
//!
//! `PROPTEST_CASES` overrides the case counts configured below (proptest applies the
//! environment to an explicit config too), e.g.
//! `PROPTEST_CASES=200000 cargo test -p sluice --release --test decode_props`.

// The counting allocator needs `unsafe impl GlobalAlloc`; it only forwards to the
// system allocator. The server itself has no unsafe code.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;
use sluice::api::convert;
use sluice::error::{Error, MAX_MESSAGE_BYTES};
use sluice::model::validate;
use sluice::spec::{parse_text, spec_from_config, ModelSpec};
use sluice::tensor::{checked_byte_size, DataType};
use sluice_proto::codec::decode_infer_request;
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use sluice_proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};
use sluice_proto::limits::{
    decoded_heap_bound, MAX_DIMS, MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS, MAX_PARAMETERS_PER_MAP,
    MAX_RAW_INPUT_CONTENTS,
};
use tonic::{Code, Status};

// ---------------------------------------------------------------------------
// Heap accounting
// ---------------------------------------------------------------------------

/// The system allocator, counting the bytes each thread holds and its peak.
struct Counting;

thread_local! {
    // Const-initialised cells without destructors: reading them never allocates.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn signed(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            note(signed(layout.size()));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            note(signed(layout.size()));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        note(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc`, and the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            note(signed(new_size) - signed(layout.size()));
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `f`'s result and the most heap this thread held while it ran, above what it held
/// before (what `f` returns is still held at its end, so it counts).
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, usize::try_from(peak - start).unwrap_or(0))
}

/// Decode `wire` as the server's codec does (from one shared buffer, as tonic holds a
/// message), measuring the heap it costs.
fn decode_measured(wire: &[u8]) -> (Result<ModelInferRequest, Status>, usize) {
    let mut buf = Bytes::copy_from_slice(wire);
    peak_heap(|| decode_infer_request(&mut buf))
}

// ---------------------------------------------------------------------------
// The pipeline under test
// ---------------------------------------------------------------------------

/// Two batched inputs (FP32 with a dynamic dim, INT64 with a fixed one) and an output.
const CONFIG: &str = r#"
name: "m"
backend: "sluice_synthetic"
max_batch_size: 8
input [
  { name: "INPUT__0" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "INPUT__1" data_type: TYPE_INT64 dims: [ 2 ] }
]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ -1 ] } ]
"#;

fn spec() -> ModelSpec {
    let config = parse_text(CONFIG).expect("the test config parses");
    spec_from_config(config, "/models/m").expect("the test config is valid")
}

/// What the server does with a message's bytes, up to the model's queue. Every refusal
/// must be INVALID_ARGUMENT with a bounded message; an accepted request must carry
/// exactly the bytes its shapes need. Returns whether it was accepted.
fn pipeline(spec: &ModelSpec, wire: &[u8]) -> bool {
    let (decoded, heap) = decode_measured(wire);
    let request = match decoded {
        Ok(request) => request,
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().len() <= MAX_MESSAGE_BYTES);
            return false;
        }
    };
    assert!(
        heap <= decoded_heap_bound(wire.len()),
        "decoding {} wire bytes held {heap} heap bytes",
        wire.len()
    );
    // What the server reserves from its budget before decoding must cover it too.
    let cost = sluice_proto::limits::check_infer_request(wire).expect("admitted");
    assert!(
        heap <= cost.heap_bound,
        "decoding {} wire bytes held {heap} heap bytes, above its reserved cost {}",
        wire.len(),
        cost.heap_bound
    );
    let refused = |err: Error| {
        let status = Status::from(err);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        false
    };
    let converted = match convert::infer_request(request) {
        Ok(converted) => converted,
        Err(err) => return refused(err),
    };
    let validated = match validate(spec, &converted) {
        Ok(validated) => validated,
        Err(err) => return refused(err),
    };
    assert_eq!(validated.inputs.len(), spec.inputs.len());
    for (tensor, input) in validated.inputs.iter().zip(&spec.inputs) {
        assert_eq!(tensor.dtype, input.dtype);
        assert_eq!(
            checked_byte_size(&tensor.shape, tensor.dtype),
            Ok(tensor.data.len())
        );
        assert_eq!(
            tensor.shape.first().copied(),
            i64::try_from(validated.batch).ok()
        );
    }
    true
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..5,
        1 => Just(-1i64),
        1 => Just(1i64 << 32),
        1 => Just(1i64 << 46),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
        1 => any::<i64>(),
    ]
}

fn shape() -> impl Strategy<Value = Vec<i64>> {
    prop_oneof![
        8 => vec(dim(), 0..5),
        1 => vec(dim(), MAX_DIMS - 2..MAX_DIMS + 3),
    ]
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z0-9_]{0,10}",
        1 => (0..max).prop_map(|n| "é".repeat(n / 2)),
        1 => (0..max).prop_map(|n| "n".repeat(n)),
    ]
}

fn tensor_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("INPUT__0".to_owned()),
        3 => Just("INPUT__1".to_owned()),
        1 => text(1100),
    ]
}

fn datatype() -> impl Strategy<Value = String> {
    let known: Vec<String> = DataType::ALL
        .iter()
        .map(|d| d.wire_name().to_owned())
        .chain(["BYTES".to_owned(), String::new()])
        .collect();
    prop_oneof![
        6 => proptest::sample::select(known),
        1 => text(1100),
    ]
}

fn contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    let n = 0usize..8;
    proptest::option::of(
        (
            vec(any::<bool>(), n.clone()),
            vec(any::<i32>(), n.clone()),
            vec(any::<i64>(), n.clone()),
            vec(any::<u32>(), n.clone()),
            vec(any::<f32>(), n.clone()),
            vec(any::<f64>(), n),
        )
            .prop_map(|(b, i, l, u, f, d)| InferTensorContents {
                bool_contents: b,
                int_contents: i,
                int64_contents: l,
                uint_contents: u,
                fp32_contents: f,
                fp64_contents: d,
                ..Default::default()
            }),
    )
}

fn parameter() -> impl Strategy<Value = InferParameter> {
    prop_oneof![
        any::<bool>().prop_map(ParameterChoice::BoolParam),
        prop_oneof![Just(0i64), Just(-1), any::<i64>()].prop_map(ParameterChoice::Int64Param),
        any::<u64>().prop_map(ParameterChoice::Uint64Param),
        any::<f64>().prop_map(ParameterChoice::DoubleParam),
        text(70_000).prop_map(ParameterChoice::StringParam),
    ]
    .prop_map(|choice| InferParameter {
        parameter_choice: Some(choice),
    })
}

fn parameters(max: usize) -> impl Strategy<Value = HashMap<String, InferParameter>> {
    let key = prop_oneof![
        Just("timeout".to_owned()),
        Just("priority".to_owned()),
        text(1100),
    ];
    proptest::collection::hash_map(key, parameter(), 0..max)
}

fn input() -> impl Strategy<Value = InferInputTensor> {
    (
        tensor_name(),
        datatype(),
        shape(),
        parameters(3),
        contents(),
    )
        .prop_map(
            |(name, datatype, shape, parameters, contents)| InferInputTensor {
                name,
                datatype,
                shape,
                parameters,
                contents,
            },
        )
}

/// A request the spec accepts, for `batch` samples.
fn valid(batch: i64) -> ModelInferRequest {
    let rows = usize::try_from(batch).expect("a positive batch");
    ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![
            InferInputTensor {
                name: "INPUT__0".into(),
                datatype: "FP32".into(),
                shape: vec![batch, 3],
                ..Default::default()
            },
            InferInputTensor {
                name: "INPUT__1".into(),
                datatype: "INT64".into(),
                shape: vec![batch, 2],
                ..Default::default()
            },
        ],
        raw_input_contents: vec![vec![0u8; 12 * rows].into(), vec![0u8; 16 * rows].into()],
        ..Default::default()
    }
}

/// One change to a valid request, or none.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    Dim {
        input: usize,
        index: usize,
        value: i64,
    },
    Datatype {
        input: usize,
        datatype: String,
    },
    RawLength {
        input: usize,
        len: usize,
    },
    Typed {
        input: usize,
        contents: Option<InferTensorContents>,
    },
    Parameters(HashMap<String, InferParameter>),
    Output(String),
    Id(String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let which = 0usize..2;
    prop_oneof![
        3 => Just(Mutation::None),
        2 => (which.clone(), 0usize..2, dim())
            .prop_map(|(input, index, value)| Mutation::Dim { input, index, value }),
        1 => (which.clone(), datatype())
            .prop_map(|(input, datatype)| Mutation::Datatype { input, datatype }),
        2 => (which.clone(), 0usize..100)
            .prop_map(|(input, len)| Mutation::RawLength { input, len }),
        2 => (which, contents()).prop_map(|(input, contents)| Mutation::Typed { input, contents }),
        2 => parameters(4).prop_map(Mutation::Parameters),
        1 => prop_oneof![Just("OUTPUT__0".to_owned()), text(1100)].prop_map(Mutation::Output),
        1 => text(5000).prop_map(Mutation::Id),
    ]
}

fn mutated(batch: i64, mutation: Mutation) -> ModelInferRequest {
    let mut req = valid(batch);
    match mutation {
        Mutation::None => {}
        Mutation::Dim {
            input,
            index,
            value,
        } => req.inputs[input].shape[index] = value,
        Mutation::Datatype { input, datatype } => req.inputs[input].datatype = datatype,
        Mutation::RawLength { input, len } => {
            req.raw_input_contents[input] = vec![7u8; len].into();
        }
        Mutation::Typed { input, contents } => {
            // Typed contents instead of raw for every input, this one's random.
            req.raw_input_contents.clear();
            for (i, tensor) in req.inputs.iter_mut().enumerate() {
                let rows = usize::try_from(batch).expect("a positive batch");
                tensor.contents = if i == input {
                    contents.clone()
                } else if tensor.datatype == "FP32" {
                    Some(InferTensorContents {
                        fp32_contents: vec![1.5; 3 * rows],
                        ..Default::default()
                    })
                } else {
                    Some(InferTensorContents {
                        int64_contents: vec![-3; 2 * rows],
                        ..Default::default()
                    })
                };
            }
        }
        Mutation::Parameters(parameters) => req.parameters = parameters,
        Mutation::Output(name) => req.outputs.push(InferRequestedOutputTensor {
            name,
            ..Default::default()
        }),
        Mutation::Id(id) => req.id = id,
    }
    req
}

/// A request of random tensors, sometimes more than the caps allow.
fn random_request() -> impl Strategy<Value = ModelInferRequest> {
    let inputs = prop_oneof![
        8 => vec(input(), 0..4),
        1 => (MAX_INPUTS - 2..MAX_INPUTS + 3)
            .prop_map(|n| vec![InferInputTensor::default(); n]),
    ];
    let raw = prop_oneof![
        4 => vec(vec(any::<u8>(), 0..40), 0..4),
        1 => (MAX_RAW_INPUT_CONTENTS - 1..MAX_RAW_INPUT_CONTENTS + 2)
            .prop_map(|n| vec![Vec::new(); n]),
    ];
    let outputs = prop_oneof![
        4 => vec(text(1100), 0..3),
        1 => (MAX_OUTPUTS - 1..MAX_OUTPUTS + 2).prop_map(|n| vec![String::new(); n]),
    ];
    let model = prop_oneof![4 => Just("m".to_owned()), 1 => text(1100)];
    (
        model,
        text(5000),
        prop_oneof![4 => parameters(3), 1 => parameters(MAX_PARAMETERS_PER_MAP + 3)],
        inputs,
        raw,
        outputs,
    )
        .prop_map(
            |(model_name, id, parameters, inputs, raw, outputs)| ModelInferRequest {
                model_name,
                id,
                parameters,
                inputs,
                raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
                outputs: outputs
                    .into_iter()
                    .map(|name| InferRequestedOutputTensor {
                        name,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        )
}

/// Bytes: random ones, or a valid request's encoding with some bytes changed or cut.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let damaged = (
        1i64..4,
        vec((any::<usize>(), any::<u8>()), 1..6),
        any::<usize>(),
    )
        .prop_map(|(batch, flips, cut)| {
            let mut wire = valid(batch).encode_to_vec();
            for (at, byte) in flips {
                let at = at % wire.len();
                wire[at] = byte;
            }
            wire.truncate(wire.len() - cut % 4);
            wire
        });
    prop_oneof![vec(any::<u8>(), 0..200), damaged]
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn any_bytes_are_decoded_or_refused_as_invalid_argument(wire in wire_bytes()) {
        pipeline(&spec(), &wire);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn wrong_requests_are_refused_as_invalid_argument(req in random_request()) {
        pipeline(&spec(), &req.encode_to_vec());
    }

    #[test]
    fn mutated_requests_are_served_or_refused_as_invalid_argument(
        batch in 1i64..9,
        mutation in mutation(),
    ) {
        let accepted = pipeline(&spec(), &mutated(batch, mutation.clone()).encode_to_vec());
        if matches!(mutation, Mutation::None) {
            prop_assert!(accepted, "the unchanged request is valid");
        }
    }
}

// ---------------------------------------------------------------------------
// The heap bound at its worst
// ---------------------------------------------------------------------------

fn one_input(contents: InferTensorContents) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT__0".into(),
            datatype: "INT64".into(),
            shape: vec![1],
            contents: Some(contents),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Decode an admissible request, check it is within the bound, and return the heap it
/// cost.
fn admitted_within_bound(what: &str, req: &ModelInferRequest) -> usize {
    let wire = req.encode_to_vec();
    let (decoded, heap) = decode_measured(&wire);
    let decoded = decoded.unwrap_or_else(|e| panic!("{what}: refused: {e:?}"));
    assert_eq!(&decoded, req, "{what}: decodes to what was sent");
    let bound = decoded_heap_bound(wire.len());
    assert!(
        heap <= bound,
        "{what}: {} wire bytes held {heap} heap bytes, above the bound {bound}",
        wire.len()
    );
    let reserved = sluice_proto::limits::check_infer_request(&wire)
        .expect("admitted")
        .heap_bound;
    assert!(
        heap <= reserved,
        "{what}: {} wire bytes held {heap} heap bytes, above its reserved cost {reserved}",
        wire.len()
    );
    eprintln!(
        "{what}: {} wire bytes, {heap} heap bytes (bound {bound})",
        wire.len()
    );
    heap
}

#[test]
fn the_costliest_admissible_requests_stay_within_the_heap_bound() {
    // One past a power of two: the vector has just doubled, its worst spare capacity.
    const VALUES: usize = (1 << 20) + 1;
    // 1-byte varints into 8-byte elements: the costliest bytes per wire byte. The
    // measurement must see at least the elements themselves, or it measures nothing.
    let heap = admitted_within_bound(
        "int64_contents",
        &one_input(InferTensorContents {
            int64_contents: vec![1; VALUES],
            ..Default::default()
        }),
    );
    assert!(
        heap >= 8 * VALUES,
        "{VALUES} int64 values held only {heap} bytes"
    );
    admitted_within_bound(
        "uint64 contents",
        &one_input(InferTensorContents {
            uint64_contents: vec![1; VALUES],
            ..Default::default()
        }),
    );
    admitted_within_bound(
        "int and uint contents",
        &one_input(InferTensorContents {
            int_contents: vec![1; VALUES / 2],
            uint_contents: vec![1; VALUES / 2],
            bool_contents: vec![true; VALUES / 2],
            ..Default::default()
        }),
    );
    // Every count at its cap, each entry as cheap on the wire as it can be: the
    // constant part of the bound.
    let mut with_parameter = InferInputTensor {
        shape: vec![1; MAX_DIMS],
        ..Default::default()
    };
    with_parameter
        .parameters
        .insert("k".into(), InferParameter::default());
    let mut inputs = vec![with_parameter; MAX_PARAMETERS - 1];
    inputs.resize(MAX_INPUTS, InferInputTensor::default());
    let mut req = ModelInferRequest {
        inputs,
        outputs: vec![InferRequestedOutputTensor::default(); MAX_OUTPUTS],
        raw_input_contents: vec![Bytes::new(); MAX_RAW_INPUT_CONTENTS],
        ..Default::default()
    };
    req.parameters
        .insert(String::new(), InferParameter::default());
    let wire = req.encode_to_vec().len();
    admitted_within_bound("every count at its cap", &req);
    assert!(wire < 64 << 10, "{wire} wire bytes");
    // The request map full of distinct keys.
    let mut req = ModelInferRequest::default();
    for i in 0..MAX_PARAMETERS_PER_MAP {
        req.parameters
            .insert(format!("{i}"), InferParameter::default());
    }
    admitted_within_bound("a full parameters map", &req);
}

#[test]
fn requests_over_a_cap_are_refused_before_anything_is_decoded() {
    // 2 MiB of empty `inputs` entries (once 212 times their size in heap) and two million
    // dims: refused with a message, nothing decoded.
    let mut flood = Vec::with_capacity(2 << 20);
    for _ in 0..(1 << 20) {
        flood.extend_from_slice(&[5 << 3 | 2, 0]);
    }
    let dims = ModelInferRequest {
        inputs: vec![InferInputTensor {
            shape: vec![1; 2_000_000],
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let mut params = ModelInferRequest::default();
    for i in 0..=MAX_PARAMETERS_PER_MAP {
        params
            .parameters
            .insert(format!("{i}"), InferParameter::default());
    }
    for (what, wire) in [
        ("inputs", flood),
        ("dims", dims),
        ("parameters", params.encode_to_vec()),
    ] {
        let (decoded, heap) = decode_measured(&wire);
        let status = decoded.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains("more than the"), "{status:?}");
        assert!(heap < 4096, "{what}: refusing held {heap} heap bytes");
    }
}
