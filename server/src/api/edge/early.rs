//! Refusing a ModelInfer call before its body is read: under overload most calls are
//! refused, and each refusal should cost the server as little as it can. A call that
//! finds the server's in-flight limit full is refused from its HEADERS frame. The model's
//! name, version and the request's `priority` and `timeout` parameters sit in the first
//! bytes of the message ([`sluice_proto::peek`]); the edge reads those bytes as they
//! arrive (usually the first DATA frame), asks admission whether the model's
//! concurrency limit would refuse the call now, and if so answers UNAVAILABLE with
//! pushback at once, in the response headers, without buffering, decoding or routing
//! the body; what is left of it is dropped (the stream is reset once the answer is
//! sent). Any call the check cannot judge (an unknown model, a header it cannot read,
//! a limit with room) goes on to the full admission path unchanged, its frames replayed.

use std::sync::Arc;

use sluice_proto::peek::{peek_infer_header, Integer, Peek};

use super::*;
use crate::admission::{refuse_at_headers, refuse_early, EarlyCall};
use crate::config::DeadlinePolicy;
use crate::gateway::Gateway;

/// The most bytes of a body read to find its header fields. Names, an id and a few
/// parameters fit in a few hundred; a call whose fields run longer is admitted the
/// full way.
pub const PEEK_BYTES: usize = 4096;

/// What the edge needs to judge a call early. Installed only when the admission stack
/// sheds load (without it nothing is refused for overload).
#[derive(Clone)]
pub struct EarlyRefusal {
    pub gateway: Arc<Gateway>,
    /// The server's in-flight limit, shared with the admission stack.
    pub global: Arc<tokio::sync::Semaphore>,
}

impl EarlyRefusal {
    /// The refusal of a call decided from its HEADERS frame: the server's in-flight
    /// limit has no slot free.
    pub fn refuse_at_headers(&self) -> Option<Status> {
        refuse_at_headers(&self.global).map(Status::from)
    }

    /// Refuse the call from its HEADERS frame when the server is full; else read the
    /// first bytes of `body` (kept for the full path) and refuse the call if its model's
    /// limit refuses it now.
    pub async fn refuse(
        &self,
        body: &mut LimitedBody,
        policy: &DeadlinePolicy,
        start: Instant,
        header_timeout: Option<Duration>,
    ) -> Option<Status> {
        if let Some(status) = self.refuse_at_headers() {
            return Some(status);
        }
        let enough = |p: &[u8]| !matches!(peek_infer_header(p), Peek::NeedMore);
        let prefix = body.peek(PEEK_BYTES, enough).await;
        self.judge(&prefix, policy, start, header_timeout)
    }

    /// The refusal of the call whose body starts with `prefix`, if its model's limit
    /// refuses it now.
    pub fn judge(
        &self,
        prefix: &[u8],
        policy: &DeadlinePolicy,
        start: Instant,
        header_timeout: Option<Duration>,
    ) -> Option<Status> {
        let Peek::Header(header) = peek_infer_header(prefix) else {
            return None;
        };
        // A negative integer is the decoder's INVALID_ARGUMENT to give.
        let unsigned = |p: Option<Integer>| match p {
            None => Some(None),
            Some(Integer::Unsigned(v)) => Some(Some(v)),
            Some(Integer::Signed(v)) => u64::try_from(v).ok().map(Some),
        };
        let priority = unsigned(header.priority)?;
        // Triton's `timeout` of 0 means none, as in the full path.
        let timeout = unsigned(header.timeout)?
            .filter(|&micros| micros > 0)
            .map(Duration::from_micros);
        let call = EarlyCall {
            model: header.model_name,
            version: header.model_version,
            priority,
            has_deadline: policy.deadline(start, header_timeout, timeout).is_some(),
        };
        refuse_early(&self.gateway, call).map(Status::from)
    }
}

impl LimitedBody {
    /// Read frames until the bytes so far satisfy `enough`, the body ends or fails, or
    /// `limit` bytes have arrived; the frames are kept and given out again first. Returns
    /// a copy of the first `limit` bytes read.
    pub async fn peek(&mut self, limit: usize, enough: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut prefix = Vec::new();
        loop {
            if enough(&prefix) || prefix.len() >= limit {
                return prefix;
            }
            let frame = std::future::poll_fn(|cx| self.poll_wire(cx)).await;
            let Some(frame) = frame else {
                return prefix;
            };
            let failed = frame.is_err();
            if let Ok(Some(data)) = frame.as_ref().map(Frame::data_ref) {
                let take = (limit - prefix.len()).min(data.len());
                prefix.extend_from_slice(&data[..take]);
            }
            self.replay.push_back(frame);
            if failed {
                return prefix;
            }
        }
    }
}

/// The `grpc-status` of a refusal for overload (UNAVAILABLE).
pub(super) const UNAVAILABLE: &str = "14";
