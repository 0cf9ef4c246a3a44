//! The one error type of the request path and its single mapping to a gRPC status.
//!
//! Every failure a client can see is a variant here; `From<Error> for tonic::Status` is
//! one exhaustive match, so a new variant cannot ship without a status code. `kind()` is
//! the stable label used in metrics (`outcome`).

use std::time::Duration;

use tonic::{Code, Status};

use crate::tensor::DataType;

/// Everything that can go wrong between receiving a request and answering it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model '{model}' is not in the repository")]
    ModelNotFound { model: String },

    #[error("model '{model}' has no version '{version}' available (available: {available})")]
    VersionNotFound {
        model: String,
        version: String,
        available: String,
    },

    #[error("model '{model}' is not available: {reason}")]
    ModelUnavailable { model: String, reason: String },

    /// A passing state: an instance stopped and restarts, or the model version is being
    /// replaced. The same request may succeed a moment later.
    #[error("model '{model}' is restarting: {reason}")]
    Restarting { model: String, reason: String },

    #[error("model '{model}': unexpected input '{input}' (expected one of: {expected})")]
    UnknownInput {
        model: String,
        input: String,
        expected: String,
    },

    #[error("model '{model}': missing input '{input}'")]
    MissingInput { model: String, input: String },

    #[error("model '{model}': input '{input}' given more than once")]
    DuplicateInput { model: String, input: String },

    #[error(
        "model '{model}': unexpected requested output '{output}' (expected one of: {expected})"
    )]
    UnknownOutput {
        model: String,
        output: String,
        expected: String,
    },

    #[error("model '{model}': input '{input}' has datatype {actual}, expected {expected}")]
    WrongDatatype {
        model: String,
        input: String,
        expected: DataType,
        actual: String,
    },

    #[error("model '{model}': input '{input}' has shape {actual:?}, expected {expected}")]
    WrongShape {
        model: String,
        input: String,
        expected: String,
        actual: Vec<i64>,
    },

    #[error(
        "model '{model}': input '{input}' has batch size {actual}, above max_batch_size {max}"
    )]
    BatchTooLarge {
        model: String,
        input: String,
        max: u32,
        actual: i64,
    },

    #[error(
        "model '{model}': input '{input}' holds {actual} bytes, expected {expected} ({detail})"
    )]
    WrongByteSize {
        model: String,
        input: String,
        expected: usize,
        actual: usize,
        detail: String,
    },

    #[error("model '{model}': {message}")]
    InvalidRequest { model: String, message: String },

    #[error("model '{model}' failed: {message}")]
    ModelFailed { model: String, message: String },

    #[error("model '{model}': deadline exceeded while {stage}")]
    DeadlineExceeded { model: String, stage: &'static str },

    #[error("model '{model}' is overloaded: {reason}")]
    Overloaded {
        model: String,
        reason: String,
        retry_after: Duration,
    },

    #[error("server is shutting down")]
    ShuttingDown,
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
        let mut status = Status::new(err.code(), err.to_string());
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
    }
}
