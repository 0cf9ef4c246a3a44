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
    shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .product()
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
