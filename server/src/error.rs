//! The one error type of the request path and its single mapping to a gRPC status.
//!
//! Every failure a client can see is a variant here; `From<Error> for tonic::Status` is
//! one exhaustive match, so a new variant cannot ship without a status code. `kind()` is
//! the stable label used in metrics (`outcome`).
//!
//! Messages repeat what the client sent (model, version, tensor names, datatype, shape)
//! so it can see what was wrong, but clipped: every client string through [`clip`],
//! every shape through `shape_string`, and the whole message bounded by
//! [`Error::client_message`]. An echoed 64 KiB name would otherwise make the
//! `grpc-message` trailer too large for the client to read, turning a precise refusal
//! into an opaque RESOURCE_EXHAUSTED on its side.

use std::borrow::Cow;
use std::time::Duration;

use tonic::{Code, Status};

use crate::tensor::{shape_string, DataType};

/// Most characters of one client-supplied value a message repeats; longer values are
/// cut there and end in "...". Real names are far shorter.
pub const ECHO_CHARS: usize = 128;

/// Most bytes of a whole status message: a last guard however many values it names
/// (or however long a model's own failure message is), well under the 8-16 KiB header
/// lists that clients accept even after percent-encoding triples it.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A client-supplied value as messages show it: at most [`ECHO_CHARS`] characters.
pub fn clip(value: &str) -> Cow<'_, str> {
    match value.char_indices().nth(ECHO_CHARS) {
        None => Cow::Borrowed(value),
        Some((cut, _)) => Cow::Owned(format!("{}...", &value[..cut])),
    }
}

/// `message` cut to at most [`MAX_MESSAGE_BYTES`] bytes on a character boundary,
/// ending in "..." when cut.
pub fn bound_message(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut cut = MAX_MESSAGE_BYTES - "...".len();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str("...");
    message
}

/// Everything that can go wrong between receiving a request and answering it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model '{}' is not in the repository", clip(.model))]
    ModelNotFound { model: String },

    #[error(
        "model '{}' has no version '{}' available (available: {available})",
        clip(.model),
        clip(.version)
    )]
    VersionNotFound {
        model: String,
        version: String,
        available: String,
    },

    #[error("model '{}' is not available: {reason}", clip(.model))]
    ModelUnavailable { model: String, reason: String },

    /// A passing state: an instance stopped and restarts, or the model version is being
    /// replaced. The same request may succeed a moment later.
    #[error("model '{}' is restarting: {reason}", clip(.model))]
    Restarting { model: String, reason: String },

    #[error(
        "model '{}': unexpected input '{}' (expected one of: {expected})",
        clip(.model),
        clip(.input)
    )]
    UnknownInput {
        model: String,
        input: String,
        expected: String,
    },

    #[error("model '{}': missing input '{}'", clip(.model), clip(.input))]
    MissingInput { model: String, input: String },

    #[error("model '{}': input '{}' given more than once", clip(.model), clip(.input))]
    DuplicateInput { model: String, input: String },

    #[error(
        "model '{}': unexpected requested output '{}' (expected one of: {expected})",
        clip(.model),
        clip(.output)
    )]
    UnknownOutput {
        model: String,
        output: String,
        expected: String,
    },

    #[error(
        "model '{}': input '{}' has datatype {}, expected {expected}",
        clip(.model),
        clip(.input),
        clip(.actual)
    )]
    WrongDatatype {
        model: String,
        input: String,
        expected: DataType,
        actual: String,
    },

    #[error(
        "model '{}': input '{}' has shape {}, expected {expected}",
        clip(.model),
        clip(.input),
        shape_string(.actual)
    )]
    WrongShape {
        model: String,
        input: String,
        expected: String,
        actual: Vec<i64>,
    },

    #[error(
        "model '{}': input '{}' has batch size {actual}, above max_batch_size {max}",
        clip(.model),
        clip(.input)
    )]
    BatchTooLarge {
        model: String,
        input: String,
        max: u32,
        actual: i64,
    },

    #[error(
        "model '{}': input '{}' holds {actual} bytes, expected {expected} ({detail})",
        clip(.model),
        clip(.input)
    )]
    WrongByteSize {
        model: String,
        input: String,
        expected: usize,
        actual: usize,
        detail: String,
    },

    #[error("model '{}': {message}", clip(.model))]
    InvalidRequest { model: String, message: String },

    #[error("model '{}' failed: {message}", clip(.model))]
    ModelFailed { model: String, message: String },

    #[error("model '{}': deadline exceeded while {stage}", clip(.model))]
    DeadlineExceeded { model: String, stage: &'static str },

    #[error("model '{}' is overloaded: {reason}", clip(.model))]
    Overloaded {
        model: String,
        /// Which bound refused it, and the request's priority level when known: the
        /// admission stack counts every refusal from these, in one place.
        cause: RejectReason,
        level: Option<u32>,
        reason: String,
        retry_after: Duration,
    },

    #[error("server is shutting down")]
    ShuttingDown,
}

/// Why a request was refused for overload (the `reason` label of
/// `sluice_rejected_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The model's queue held `max_queue_size` requests.
    QueueFull,
    /// The server's in-flight limit is reached.
    InFlightLimit,
    /// The model's (adaptive) concurrency limit, or its priority level's share of it.
    ConcurrencyLimit,
    /// The predicted wait exceeds the request's remaining deadline.
    PredictedWait,
    /// Shed from the queue to make room for a higher-priority request.
    Preempted,
}

impl RejectReason {
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::InFlightLimit => "in_flight_limit",
            RejectReason::ConcurrencyLimit => "concurrency_limit",
            RejectReason::PredictedWait => "predicted_wait",
            RejectReason::Preempted => "preempted",
        }
    }
}

/// Why a model version, or one instance of it, could not be brought up. Its message is
/// what RepositoryIndex and the log report.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// The configuration was rejected, or the repository's layout does not fit it.
    #[error("{0}")]
    Config(String),
    /// The backend could not load the weights.
    #[error("{0}")]
    Backend(String),
    #[error("loader panicked: {0}")]
    LoaderPanicked(String),
    #[error("warm-up sample '{sample}' failed: {message}")]
    WarmupFailed { sample: String, message: String },
    #[error("warm-up sample '{sample}' panicked: {message}")]
    WarmupPanicked { sample: String, message: String },
    #[error("cannot start an instance thread: {0}")]
    Thread(String),
    /// One version of several failed.
    #[error("version {version}: {source}")]
    Version {
        version: i64,
        source: Box<LoadError>,
    },
}

impl Error {
    /// Stable, closed-set label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ModelNotFound { .. } | Error::VersionNotFound { .. } => "not_found",
            Error::ModelUnavailable { .. } | Error::Restarting { .. } => "unavailable",
            Error::UnknownInput { .. }
            | Error::MissingInput { .. }
            | Error::DuplicateInput { .. }
            | Error::UnknownOutput { .. }
            | Error::WrongDatatype { .. }
            | Error::WrongShape { .. }
            | Error::BatchTooLarge { .. }
            | Error::WrongByteSize { .. }
            | Error::InvalidRequest { .. } => "invalid_argument",
            Error::ModelFailed { .. } => "model_failed",
            Error::DeadlineExceeded { .. } => "deadline_exceeded",
            Error::Overloaded { .. } => "overloaded",
            Error::ShuttingDown => "shutting_down",
        }
    }

    /// Whether the failure is a passing state of the gateway (an instance restarting, a
    /// model version being replaced) that the same request may not meet a moment later.
    /// Bad requests, missing models, expiry and overload are not: retrying them would
    /// give the same answer or add load where there is too much.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Restarting { .. })
    }

    /// The message a client receives, in the status or a stream's `error_message`:
    /// the `Display` text (client values already clipped), bounded as a whole.
    pub fn client_message(&self) -> String {
        bound_message(self.to_string())
    }

    /// The gRPC status code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Error::ModelNotFound { .. } | Error::VersionNotFound { .. } => Code::NotFound,
            Error::UnknownInput { .. }
            | Error::MissingInput { .. }
            | Error::DuplicateInput { .. }
            | Error::UnknownOutput { .. }
            | Error::WrongDatatype { .. }
            | Error::WrongShape { .. }
            | Error::BatchTooLarge { .. }
            | Error::WrongByteSize { .. }
            | Error::InvalidRequest { .. } => Code::InvalidArgument,
            Error::ModelUnavailable { .. }
            | Error::Restarting { .. }
            | Error::Overloaded { .. }
            | Error::ShuttingDown => Code::Unavailable,
            Error::ModelFailed { .. } => Code::Internal,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        }
    }
}

/// Metadata key that tells a client how long to back off before retrying (gRFC A6).
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let mut status = Status::new(err.code(), err.client_message());
        if let Error::Overloaded { retry_after, .. } = &err {
            let ms = retry_after.as_millis().to_string();
            if let Ok(value) = ms.parse() {
                status.metadata_mut().insert(RETRY_PUSHBACK_HEADER, value);
            }
        }
        status
    }
}

/// Test helper: `err` must be a refusal for overload; checks that it reaches the client
/// as UNAVAILABLE with its pushback in `grpc-retry-pushback-ms`, and returns its reason
/// and pushback for the caller's own checks.
#[cfg(test)]
pub(crate) fn expect_overloaded(err: Error) -> (String, Duration) {
    let Error::Overloaded {
        reason,
        retry_after,
        ..
    } = &err
    else {
        panic!("expected Overloaded, got {err:?}");
    };
    let (reason, retry_after) = (reason.clone(), *retry_after);
    let status = Status::from(err);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.metadata().get(RETRY_PUSHBACK_HEADER).unwrap(),
        retry_after.as_millis().to_string().as_str()
    );
    (reason, retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_status_table() {
        let m = || "m".to_string();
        let cases = [
            (Error::ModelNotFound { model: m() }, Code::NotFound),
            (
                Error::VersionNotFound {
                    model: m(),
                    version: "3".into(),
                    available: "1".into(),
                },
                Code::NotFound,
            ),
            (
                Error::BatchTooLarge {
                    model: m(),
                    input: "x".into(),
                    max: 4,
                    actual: 5,
                },
                Code::InvalidArgument,
            ),
            (
                Error::ModelFailed {
                    model: m(),
                    message: "boom".into(),
                },
                Code::Internal,
            ),
            (
                Error::DeadlineExceeded {
                    model: m(),
                    stage: "queued",
                },
                Code::DeadlineExceeded,
            ),
            (Error::ShuttingDown, Code::Unavailable),
            (
                Error::ModelUnavailable {
                    model: m(),
                    reason: "r".into(),
                },
                Code::Unavailable,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn overload_carries_retry_pushback() {
        let err = || Error::Overloaded {
            model: "m".into(),
            cause: RejectReason::QueueFull,
            level: Some(1),
            reason: "queue full".into(),
            retry_after: Duration::from_millis(25),
        };
        let status = Status::from(err());
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get(RETRY_PUSHBACK_HEADER).unwrap(), "25");
        assert_eq!(
            expect_overloaded(err()),
            ("queue full".to_owned(), Duration::from_millis(25))
        );
    }

    #[test]
    fn messages_name_model_tensor_and_values() {
        let msg = Error::WrongDatatype {
            model: "mlp".into(),
            input: "INPUT__0".into(),
            expected: DataType::Fp32,
            actual: "INT32".into(),
        }
        .to_string();
        assert_eq!(
            msg,
            "model 'mlp': input 'INPUT__0' has datatype INT32, expected FP32"
        );
        let msg = Error::WrongShape {
            model: "mlp".into(),
            input: "INPUT__0".into(),
            expected: "[-1, 64]".into(),
            actual: vec![1, 63],
        }
        .to_string();
        assert_eq!(
            msg,
            "model 'mlp': input 'INPUT__0' has shape [1, 63], expected [-1, 64]"
        );
    }

    #[test]
    fn client_values_are_clipped_in_messages() {
        let long = "n".repeat(64 * 1024);
        let status = Status::from(Error::WrongShape {
            model: long.clone(),
            input: long.clone(),
            expected: "[-1, 64]".into(),
            actual: vec![7; 2_000_000],
        });
        let clipped = format!("{}...", "n".repeat(ECHO_CHARS));
        assert_eq!(
            status.message(),
            format!(
                "model '{clipped}': input '{clipped}' has shape \
                 [7, 7, 7, 7, 7, 7, 7, 7, ... (2000000 dims)], expected [-1, 64]"
            )
        );
        let status = Status::from(Error::ModelNotFound {
            model: long.clone(),
        });
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() < 200, "{}", status.message());
        // Multi-byte characters are cut whole.
        assert_eq!(
            clip(&"é".repeat(200)),
            format!("{}...", "é".repeat(ECHO_CHARS))
        );
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn whole_messages_are_bounded_on_a_char_boundary() {
        let status = Status::from(Error::ModelFailed {
            model: "m".into(),
            message: "€".repeat(10_000),
        });
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(status.message().len() > MAX_MESSAGE_BYTES - 8);
        assert!(status.message().starts_with("model 'm' failed: €€"));
        assert!(status.message().ends_with("€..."));
        let short = "model 'm': fine".to_owned();
        assert_eq!(bound_message(short.clone()), short);
    }
}
