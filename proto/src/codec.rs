//! The gRPC codec of every generated client and server: prost's, with a bounded decode
//! of `ModelInferRequest`.
//!
//! Before prost decodes a `ModelInferRequest` (ModelInfer, and each message of
//! ModelStreamInfer), [`crate::limits::check_infer_request`] walks its wire bytes and
//! refuses it with INVALID_ARGUMENT when it is malformed or over a cap, so a request
//! never costs more heap than [`crate::limits::decoded_heap_bound`] of its size. A
//! request prost cannot decode is the client's fault too, and is answered
//! INVALID_ARGUMENT instead of prost's INTERNAL. The heap the walk says decoding will
//! take is reserved from the call's [`DecodeBudget`] first, so what a request costs
//! once decoded counts against the server's budget, not only its wire bytes. Every other message is encoded and
//! decoded exactly as `tonic_prost::ProstCodec` does.

use std::any::TypeId;
use std::marker::PhantomData;

use prost::bytes::Buf;
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

use crate::inference::ModelInferRequest;
use crate::limits::{check_infer_request, Refusal};

/// Where the heap a request's decoding will take is reserved before prost allocates it:
/// the server's budget of request bytes in flight, for the call being decoded.
pub trait DecodeBudget: Send + Sync {
    /// Reserve `bytes` for the current message, or refuse the call with a status.
    fn reserve(&self, bytes: usize) -> Result<(), Status>;
}

tokio::task_local! {
    /// The budget of the call decoded on this task, set around the call by the server's
    /// transport. Where none is set (clients, tests), nothing is reserved.
    pub static DECODE_BUDGET: std::sync::Arc<dyn DecodeBudget>;
}

/// prost's codec with [`BoundedDecoder`] in place of prost's decoder; named in the
/// build script with `codec_path`.
#[derive(Debug, Clone)]
pub struct SluiceCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for SluiceCodec<T, U> {
    fn default() -> Self {
        SluiceCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for SluiceCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder { _type: PhantomData }
    }
}

/// Decodes `U` with prost; a `ModelInferRequest` is first checked against the caps of
/// [`crate::limits`].
#[derive(Debug, Clone)]
pub struct BoundedDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Stable Rust has no specialisation, so the one message with a pre-check is
        // picked out by type; the comparison is a constant after monomorphisation.
        if TypeId::of::<U>() == TypeId::of::<ModelInferRequest>() {
            bounded_decode(buf).map(Some)
        } else {
            U::decode(buf)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decode a `ModelInferRequest` as the server does: refused with INVALID_ARGUMENT when
/// malformed or over a cap of [`crate::limits`], else decoded by prost (byte fields
/// share `buf`'s storage when it is `Bytes`).
pub fn decode_infer_request(buf: &mut impl Buf) -> Result<ModelInferRequest, Status> {
    bounded_decode(buf)
}

/// The walk, then prost; generic so the decoder above can name its own `U` (which it
/// has checked to be `ModelInferRequest`).
fn bounded_decode<U: Message + Default>(buf: &mut impl Buf) -> Result<U, Status> {
    // tonic hands the decoder one contiguous buffer holding the whole message; were
    // that ever not so, refusing is safer than decoding unchecked.
    let wire = buf.chunk();
    if wire.len() != buf.remaining() {
        return Err(Status::internal(
            "ModelInferRequest is not in one contiguous buffer",
        ));
    }
    let cost = check_infer_request(wire).map_err(|refusal| invalid(&refusal))?;
    if let Ok(Err(refused)) = DECODE_BUDGET.try_with(|budget| budget.reserve(cost.heap_bound)) {
        return Err(refused);
    }
    U::decode(buf).map_err(|e| invalid(&Refusal::Malformed(e.to_string())))
}

fn invalid(refusal: &Refusal) -> Status {
    Status::invalid_argument(refusal.to_string())
}
