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
        debug_assert_eq!(checked_byte_size(&shape, dtype), Ok(data.len()));
        Tensor { dtype, shape, data }
    }

    /// The leading (batch) dimension, or 1 for a scalar.
    pub fn batch(&self) -> i64 {
        self.shape.first().copied().unwrap_or(1)
    }
}

/// Why a client's shape has no element count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeError {
    /// A dimension below zero where a size is meant.
    Negative { index: usize, dim: i64 },
    /// The element count, or its size in bytes, does not fit `usize`.
    Overflow,
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeError::Negative { index, dim } => {
                write!(f, "dimension {index} is {dim}, below zero")
            }
            ShapeError::Overflow => f.write_str("its size overflows the address space"),
        }
    }
}

/// Number of elements of a shape, with every dimension a size (>= 0) and the product
/// checked: the only way to size anything from a shape a client sent.
pub fn checked_element_count(shape: &[i64]) -> Result<usize, ShapeError> {
    shape
        .iter()
        .enumerate()
        .try_fold(1usize, |count, (index, &dim)| {
            let dim = usize::try_from(dim).map_err(|_| ShapeError::Negative { index, dim })?;
            count.checked_mul(dim).ok_or(ShapeError::Overflow)
        })
}

/// Bytes a row-major tensor of `shape` and `dtype` holds, checked as
/// [`checked_element_count`].
pub fn checked_byte_size(shape: &[i64], dtype: DataType) -> Result<usize, ShapeError> {
    checked_element_count(shape)?
        .checked_mul(dtype.size())
        .ok_or(ShapeError::Overflow)
}

/// Number of elements of a trusted shape (the server's own, e.g. a config's dims):
/// negative dimensions count as 0 and the product saturates instead of wrapping, so a
/// wrong shape can never produce a small count. Client shapes go through
/// [`checked_element_count`].
pub fn element_count(shape: &[i64]) -> usize {
    shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .fold(1usize, usize::saturating_mul)
}

/// Dimensions [`shape_string`] shows before it elides the rest: real tensors have far
/// fewer, and a client's shape of millions of dims must not become a message that size.
pub const SHAPE_DIMS_SHOWN: usize = 8;

/// `[-1, 64]` style rendering used in error messages and logs; a shape of more than
/// [`SHAPE_DIMS_SHOWN`] dims shows those and the number of dims.
pub fn shape_string(dims: &[i64]) -> String {
    let shown = &dims[..dims.len().min(SHAPE_DIMS_SHOWN)];
    let parts: Vec<String> = shown.iter().map(|d| d.to_string()).collect();
    if dims.len() > shown.len() {
        format!("[{}, ... ({} dims)]", parts.join(", "), dims.len())
    } else {
        format!("[{}]", parts.join(", "))
    }
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
        assert_eq!(element_count(&[1 << 32, 1 << 32, 2]), usize::MAX);
    }

    #[test]
    fn checked_counts_refuse_negative_and_overflowing_shapes() {
        assert_eq!(checked_element_count(&[2, 3, 4]), Ok(24));
        assert_eq!(checked_element_count(&[]), Ok(1));
        assert_eq!(
            checked_element_count(&[0, -1]),
            Err(ShapeError::Negative { index: 1, dim: -1 })
        );
        assert_eq!(
            checked_element_count(&[1 << 32, 1 << 32]),
            Err(ShapeError::Overflow)
        );
        assert_eq!(
            checked_element_count(&[i64::MAX, 3]),
            Err(ShapeError::Overflow)
        );
        // 2**46 elements fit usize but their bytes do not fit memory: the caller compares
        // the count with what was sent before sizing anything.
        assert_eq!(checked_element_count(&[1 << 46]), Ok(1 << 46));
        assert_eq!(
            checked_byte_size(&[1 << 62], DataType::Fp64),
            Err(ShapeError::Overflow)
        );
        assert_eq!(checked_byte_size(&[3, 2], DataType::Fp32), Ok(24));
    }

    #[test]
    fn long_shapes_are_elided() {
        assert_eq!(shape_string(&[-1, 64]), "[-1, 64]");
        let long = vec![1i64; 2_000_000];
        assert_eq!(
            shape_string(&long),
            "[1, 1, 1, 1, 1, 1, 1, 1, ... (2000000 dims)]"
        );
    }
}

/// Concatenate same-shaped (but for the leading dimension) tensors along dimension 0:
/// one copy into a fresh buffer. A single tensor is passed through without a copy.
pub fn concat_batch(parts: &[&Tensor]) -> Tensor {
    let first = parts.first().expect("a batch has at least one request");
    if parts.len() == 1 {
        return (*first).clone();
    }
    let total: i64 = parts.iter().map(|t| t.batch()).sum();
    let mut data = bytes::BytesMut::with_capacity(parts.iter().map(|t| t.data.len()).sum());
    for t in parts {
        debug_assert_eq!((t.dtype, &t.shape[1..]), (first.dtype, &first.shape[1..]));
        data.extend_from_slice(&t.data);
    }
    let mut shape = first.shape.clone();
    shape[0] = total;
    Tensor::new(first.dtype, shape, data.freeze())
}

/// Split a batched tensor into leading-dimension slices of the given sizes, without
/// copying (each slice shares the buffer).
pub fn split_batch(t: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>, String> {
    let total: usize = sizes.iter().sum();
    if t.shape.first().and_then(|&b| usize::try_from(b).ok()) != Some(total) {
        return Err(format!(
            "output has shape {}, expected {total} rows first",
            shape_string(&t.shape)
        ));
    }
    let row_bytes = t.data.len().checked_div(total).unwrap_or(0);
    let mut offset = 0;
    Ok(sizes
        .iter()
        .map(|&n| {
            let mut shape = t.shape.clone();
            shape[0] = n as i64;
            let part = t.data.slice(offset..offset + n * row_bytes);
            offset += n * row_bytes;
            Tensor::new(t.dtype, shape, part)
        })
        .collect())
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn rows(values: &[f32], cols: i64) -> Tensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(
            DataType::Fp32,
            vec![values.len() as i64 / cols, cols],
            data.into(),
        )
    }

    #[test]
    fn concat_then_split_gives_each_request_its_rows() {
        let a = rows(&[1.0, 2.0], 2);
        let b = rows(&[3.0, 4.0, 5.0, 6.0], 2);
        let batch = concat_batch(&[&a, &b]);
        assert_eq!(batch.shape, vec![3, 2]);
        let parts = split_batch(&batch, &[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn split_rejects_a_wrong_leading_dimension() {
        let t = rows(&[1.0, 2.0, 3.0, 4.0], 2);
        assert!(split_batch(&t, &[1, 2])
            .unwrap_err()
            .contains("expected 3 rows"));
    }
}
