//! Host tensors as they travel between the API and the backends: a datatype, a shape
//! and row-major little-endian bytes. No libtorch types here, so the request path and
//! the tests do not depend on a backend.

use std::fmt;

use bytes::Bytes;

/// The numeric datatypes libtorch can hold, with their KServe v2 wire names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
}

impl DataType {
    pub const ALL: [DataType; 10] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
    ];

    /// The name used in inference requests and model metadata (`"FP32"`).
    pub fn wire_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    pub fn from_wire_name(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.wire_name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Int32 | DataType::Fp32 => 4,
            DataType::Int64 | DataType::Fp64 => 8,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wire_name())
    }
}

/// A dense tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DataType,
    pub shape: Vec<i64>,
    /// Row-major, little-endian; exactly `element_count(shape) * dtype.size()` bytes.
    pub data: Bytes,
}

impl Tensor {
    pub fn new(dtype: DataType, shape: Vec<i64>, data: Bytes) -> Tensor {
        debug_assert_eq!(element_count(&shape) * dtype.size(), data.len());
        Tensor { dtype, shape, data }
    }

    /// The leading (batch) dimension, or 1 for a scalar.
    pub fn batch(&self) -> i64 {
        self.shape.first().copied().unwrap_or(1)
    }
}

/// Number of elements of a shape whose dimensions are all non-negative.
pub fn element_count(shape: &[i64]) -> usize {
    shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).product()
}

/// `[-1, 64]` style rendering used in error messages and logs.
pub fn shape_string(dims: &[i64]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::from_wire_name(d.wire_name()), Some(d));
        }
        assert_eq!(DataType::from_wire_name("BYTES"), None);
        assert_eq!(DataType::from_wire_name("fp32"), None);
    }

    #[test]
    fn element_count_of_shapes() {
        assert_eq!(element_count(&[2, 3, 4]), 24);
        assert_eq!(element_count(&[]), 1);
        assert_eq!(element_count(&[5, 0]), 0);
    }
}
