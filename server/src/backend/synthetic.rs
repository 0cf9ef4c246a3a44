//! A backend without a model, configured from the config's `parameters`:
//!
//! - `behavior`: `identity` (default: output i is input i), `fail`, `panic` or `hang` (a
//!   batch whose first input holds a negative value fails, panics, or does not return;
//!   warm-up's zeros pass);
//! - `hang_ms`: with `hang`, how long such a batch stalls before it answers as identity
//!   [default: for ever];
//! - `sleep_ms` / `sleep_us`: stall this long per batch before answering, like a model
//!   whose compute time is known.
//!
//! It measures the gateway's own overhead and makes slow or failing models reproducible.

use std::time::Duration;

use super::{Backend, BackendError};
use crate::spec::ModelSpec;
use crate::tensor::{DataType, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behavior {
    Identity,
    Fail,
    Panic,
    Hang,
}

pub struct SyntheticBackend {
    behavior: Behavior,
    stall: Duration,
    /// How long a hanging batch stalls; `None`: for ever.
    hang: Option<Duration>,
}

impl SyntheticBackend {
    pub fn from_spec(spec: &ModelSpec) -> Result<SyntheticBackend, BackendError> {
        let bad = |message: String| BackendError::Load {
            path: spec.name.clone(),
            message,
        };
        let behavior = match spec.parameters.get("behavior").map(String::as_str) {
            None | Some("identity") => Behavior::Identity,
            Some("fail") => Behavior::Fail,
            Some("panic") => Behavior::Panic,
            Some("hang") => Behavior::Hang,
            Some(other) => {
                return Err(bad(format!(
                    "unknown behavior '{other}' (identity, fail, panic, hang)"
                )))
            }
        };
        let number = |key: &str| -> Result<u64, BackendError> {
            match spec.parameters.get(key) {
                None => Ok(0),
                Some(v) => v
                    .parse()
                    .map_err(|_| bad(format!("parameter {key}='{v}' is not a whole number"))),
            }
        };
        let stall =
            Duration::from_millis(number("sleep_ms")?) + Duration::from_micros(number("sleep_us")?);
        let hang = spec
            .parameters
            .contains_key("hang_ms")
            .then(|| number("hang_ms").map(Duration::from_millis))
            .transpose()?;
        Ok(SyntheticBackend {
            behavior,
            stall,
            hang,
        })
    }
}

impl Backend for SyntheticBackend {
    fn forward(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        if !self.stall.is_zero() {
            std::thread::sleep(self.stall);
        }
        let negative = inputs.first().is_some_and(has_negative);
        match self.behavior {
            Behavior::Fail if negative => Err(BackendError::Forward(
                "synthetic failure on negative input".into(),
            )),
            Behavior::Panic if negative => panic!("synthetic panic on negative input"),
            Behavior::Hang if negative => {
                match self.hang {
                    Some(stall) => std::thread::sleep(stall),
                    // Parking may wake spuriously; nothing ever unparks this thread.
                    None => loop {
                        std::thread::park();
                    },
                }
                Ok(inputs.to_vec())
            }
            Behavior::Identity | Behavior::Fail | Behavior::Panic | Behavior::Hang => {
                Ok(inputs.to_vec())
            }
        }
    }
}

/// Whether any element is negative: the sign bit (the top bit of the last little-endian
/// byte) of a signed or floating type.
fn has_negative(t: &Tensor) -> bool {
    match t.dtype {
        DataType::Bool | DataType::Uint8 => false,
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::Fp16
        | DataType::Bf16
        | DataType::Fp32
        | DataType::Fp64 => t
            .data
            .chunks_exact(t.dtype.size())
            .any(|e| e[e.len() - 1] & 0x80 != 0),
    }
}
