//! The request the bench sends, built once before the run and cloned per send
//! (tensor data are `Bytes`, so a clone copies no data).
//!
//! Inputs come either from the model's metadata (ModelMetadata, plus ModelConfig's
//! `max_batch_size` when the server offers it), filled with random or zero data at a
//! chosen batch size with `--shape` overrides for variable dimensions, or from an
//! input file:
//!
//! ```json
//! { "inputs": [ { "name": "INPUT__0", "datatype": "FP32", "shape": [1, 64],
//!                 "file": "input0.bin" } ] }
//! ```
//!
//! where each `file` (relative to the JSON file) holds the tensor's raw little-endian,
//! row-major bytes, exactly as `raw_input_contents` carries them.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use sluice_proto::inference::model_infer_request::InferInputTensor;
use sluice_proto::inference::model_metadata_response::TensorMetadata;
use sluice_proto::inference::{ModelInferRequest, ModelMetadataResponse};

use crate::target::Target;

/// What to fill generated tensors with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// Uniform [0, 1) for floats, 0..100 for integers, 0/1 for BOOL.
    #[default]
    Random,
    /// All zeros (empty strings for BYTES).
    Zero,
}

/// Fixed dimensions for one input, replacing its variable (-1) dimensions.
///
/// As with perf_analyzer's `--shape`, the batch dimension is not included for a
/// model that batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeOverride {
    pub name: String,
    pub dims: Vec<i64>,
}

impl FromStr for ShapeOverride {
    type Err = anyhow::Error;

    /// Parses `NAME:D1,D2,...`.
    fn from_str(s: &str) -> Result<ShapeOverride> {
        let (name, dims) = s
            .rsplit_once(':')
            .context("expected NAME:D1,D2,... as in INPUT__0:3,224,224")?;
        let dims = dims
            .split(',')
            .map(|d| d.trim().parse::<i64>().ok().filter(|d| *d >= 0))
            .collect::<Option<Vec<_>>>()
            .with_context(|| {
                format!("dimensions of {name:?} must be integers >= 0, got {dims:?}")
            })?;
        Ok(ShapeOverride {
            name: name.to_owned(),
            dims,
        })
    }
}

/// How to build the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputConfig {
    pub model: String,
    /// Empty: the server's choice.
    pub version: String,
    /// Rows per request for a model that batches.
    pub batch_size: usize,
    pub shapes: Vec<ShapeOverride>,
    pub data: DataKind,
    /// Take the inputs from this JSON file instead of the metadata.
    pub file: Option<PathBuf>,
    pub seed: u64,
}

/// One input tensor's wire datatype and concrete shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

impl TensorPlan {
    fn elements(&self) -> usize {
        self.shape
            .iter()
            .map(|d| usize::try_from(*d).unwrap_or(0))
            .product()
    }
}

/// Builds the request from the server's metadata or from the input file.
pub async fn build_request(target: &Target, config: &InputConfig) -> Result<ModelInferRequest> {
    let tensors = match &config.file {
        Some(path) => load_file(path)?,
        None => {
            let meta = target
                .model_metadata(&config.model, &config.version)
                .await?;
            let max_batch = target.max_batch_size(&config.model, &config.version).await;
            let mut rng = StdRng::seed_from_u64(config.seed);
            plan_tensors(&meta, max_batch, config)?
                .into_iter()
                .map(|plan| {
                    let data = fill(&plan, config.data, &mut rng)?;
                    Ok((plan, data))
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    Ok(request(&config.model, &config.version, tensors))
}

/// Assembles a request with every tensor in `raw_input_contents`.
pub fn request(model: &str, version: &str, tensors: Vec<(TensorPlan, Bytes)>) -> ModelInferRequest {
    let (inputs, raw) = tensors
        .into_iter()
        .map(|(plan, data)| {
            let input = InferInputTensor {
                name: plan.name,
                datatype: plan.datatype,
                shape: plan.shape,
                ..Default::default()
            };
            (input, data)
        })
        .unzip();
    ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// Concrete shapes for every input of the model.
///
/// `max_batch_size` is ModelConfig's value: above 0 the first dimension is the batch
/// dimension; 0 means the model does not batch; `None` (no ModelConfig) treats a
/// leading -1 as the batch dimension.
pub fn plan_tensors(
    meta: &ModelMetadataResponse,
    max_batch_size: Option<i32>,
    config: &InputConfig,
) -> Result<Vec<TensorPlan>> {
    ensure!(
        !meta.inputs.is_empty(),
        "model {:?} has no inputs in its metadata",
        meta.name
    );
    let batch = config.batch_size.max(1);
    match max_batch_size {
        Some(0) => ensure!(
            batch == 1,
            "model {:?} does not batch (max_batch_size 0): use batch size 1",
            meta.name
        ),
        Some(max) => ensure!(
            batch <= usize::try_from(max).unwrap_or(0),
            "batch size {batch} is above model {:?}'s max_batch_size {max}",
            meta.name
        ),
        None => {}
    }
    for o in &config.shapes {
        ensure!(
            meta.inputs.iter().any(|i| i.name == o.name),
            "--shape names {:?}, which is not an input of model {:?}",
            o.name,
            meta.name
        );
    }
    meta.inputs
        .iter()
        .map(|t| plan_tensor(t, max_batch_size, batch, config))
        .collect()
}

fn plan_tensor(
    t: &TensorMetadata,
    max_batch_size: Option<i32>,
    batch: usize,
    config: &InputConfig,
) -> Result<TensorPlan> {
    let batched = match max_batch_size {
        Some(max) => max > 0,
        None => t.shape.first() == Some(&-1),
    };
    let (batch_dim, rest) = if batched {
        let (_, rest) = t
            .shape
            .split_first()
            .with_context(|| format!("batched input {:?} has no dimensions", t.name))?;
        (
            Some(i64::try_from(batch).expect("batch size fits i64")),
            rest,
        )
    } else {
        (None, &t.shape[..])
    };
    let dims = match config.shapes.iter().find(|o| o.name == t.name) {
        Some(o) => {
            ensure!(
                o.dims.len() == rest.len()
                    && o.dims
                        .iter()
                        .zip(rest)
                        .all(|(given, meta)| *meta == -1 || given == meta),
                "--shape {}:{:?} does not fit input {:?} of shape {:?}{}",
                o.name,
                o.dims,
                t.name,
                rest,
                if batched {
                    " (batch dimension excluded)"
                } else {
                    ""
                }
            );
            o.dims.clone()
        }
        None => {
            ensure!(
                rest.iter().all(|d| *d >= 0),
                "input {:?} has variable dimensions {:?}: give them with --shape {}:D1,D2,...",
                t.name,
                rest,
                t.name
            );
            rest.to_vec()
        }
    };
    ensure!(
        element_size(&t.datatype).is_some() || t.datatype == "BYTES",
        "input {:?} has unknown datatype {:?}",
        t.name,
        t.datatype
    );
    Ok(TensorPlan {
        name: t.name.clone(),
        datatype: t.datatype.clone(),
        shape: batch_dim.into_iter().chain(dims).collect(),
    })
}

/// Bytes per element of a KServe v2 datatype (None for BYTES and unknown names).
pub fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Length of each generated BYTES element.
const STRING_LENGTH: usize = 16;

/// Generates one tensor's raw little-endian bytes.
pub fn fill(plan: &TensorPlan, kind: DataKind, rng: &mut StdRng) -> Result<Bytes> {
    let n = plan.elements();
    if plan.datatype == "BYTES" {
        return Ok(fill_strings(n, kind, rng));
    }
    let size = element_size(&plan.datatype)
        .with_context(|| format!("unknown datatype {:?}", plan.datatype))?;
    let mut out = Vec::with_capacity(n * size);
    if kind == DataKind::Zero {
        out.resize(n * size, 0);
        return Ok(out.into());
    }
    for _ in 0..n {
        random_element(&plan.datatype, rng, &mut out)?;
    }
    Ok(out.into())
}

fn random_element(datatype: &str, rng: &mut StdRng, out: &mut Vec<u8>) -> Result<()> {
    let int = rng.random_range(0..100u8);
    let float: f32 = rng.random();
    match datatype {
        "BOOL" => out.push(int % 2),
        "UINT8" | "INT8" => out.push(int),
        "UINT16" | "INT16" => out.extend_from_slice(&u16::from(int).to_le_bytes()),
        "UINT32" | "INT32" => out.extend_from_slice(&u32::from(int).to_le_bytes()),
        "UINT64" | "INT64" => out.extend_from_slice(&u64::from(int).to_le_bytes()),
        "FP16" => out.extend_from_slice(&half::f16::from_f32(float).to_le_bytes()),
        "BF16" => out.extend_from_slice(&half::bf16::from_f32(float).to_le_bytes()),
        "FP32" => out.extend_from_slice(&float.to_le_bytes()),
        "FP64" => out.extend_from_slice(&f64::from(float).to_le_bytes()),
        other => bail!("cannot generate data of datatype {other:?}"),
    }
    Ok(())
}

/// BYTES elements as the binary protocol lays them out: a u32 LE length, then the bytes.
fn fill_strings(n: usize, kind: DataKind, rng: &mut StdRng) -> Bytes {
    let len = if kind == DataKind::Zero {
        0
    } else {
        STRING_LENGTH
    };
    let mut out = Vec::with_capacity(n * (4 + len));
    for _ in 0..n {
        out.extend_from_slice(&u32::try_from(len).expect("short string").to_le_bytes());
        out.extend((0..len).map(|_| rng.random_range(b'a'..=b'z')));
    }
    out.into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFile {
    inputs: Vec<InputFileTensor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFileTensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    file: PathBuf,
}

/// Reads an input file (format in the module docs) and the raw tensors it names.
pub fn load_file(path: &Path) -> Result<Vec<(TensorPlan, Bytes)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read input file {}", path.display()))?;
    let spec: InputFile = serde_json::from_str(&text)
        .with_context(|| format!("invalid input file {}", path.display()))?;
    ensure!(
        !spec.inputs.is_empty(),
        "input file {} lists no inputs",
        path.display()
    );
    let dir = path.parent().unwrap_or(Path::new("."));
    spec.inputs
        .into_iter()
        .map(|t| {
            let data_path = dir.join(&t.file);
            let data = std::fs::read(&data_path)
                .with_context(|| format!("cannot read tensor data {}", data_path.display()))?;
            let plan = TensorPlan {
                name: t.name,
                datatype: t.datatype,
                shape: t.shape,
            };
            ensure!(
                plan.shape.iter().all(|d| *d >= 0),
                "input {:?} in {} needs a concrete shape",
                plan.name,
                path.display()
            );
            if plan.datatype != "BYTES" {
                let size = element_size(&plan.datatype).with_context(|| {
                    format!(
                        "input {:?} has unknown datatype {:?}",
                        plan.name, plan.datatype
                    )
                })?;
                ensure!(
                    data.len() == plan.elements() * size,
                    "input {:?}: {} holds {} bytes, shape {:?} of {} needs {}",
                    plan.name,
                    data_path.display(),
                    data.len(),
                    plan.shape,
                    plan.datatype,
                    plan.elements() * size
                );
            }
            Ok((plan, Bytes::from(data)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(inputs: &[(&str, &str, &[i64])]) -> ModelMetadataResponse {
        ModelMetadataResponse {
            name: "m".into(),
            inputs: inputs
                .iter()
                .map(|(n, d, s)| TensorMetadata {
                    name: (*n).into(),
                    datatype: (*d).into(),
                    shape: s.to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn config(batch_size: usize, shapes: &[&str]) -> InputConfig {
        InputConfig {
            model: "m".into(),
            version: String::new(),
            batch_size,
            shapes: shapes.iter().map(|s| s.parse().unwrap()).collect(),
            data: DataKind::Random,
            file: None,
            seed: 1,
        }
    }

    #[test]
    fn batch_dimension_takes_the_batch_size() {
        let m = meta(&[("INPUT__0", "FP32", &[-1, 64])]);
        let plans = plan_tensors(&m, Some(32), &config(8, &[])).unwrap();
        assert_eq!(plans[0].shape, vec![8, 64]);
        // Without ModelConfig a leading -1 is taken as the batch dimension.
        assert_eq!(
            plan_tensors(&m, None, &config(2, &[])).unwrap()[0].shape,
            vec![2, 64]
        );
        assert!(plan_tensors(&m, Some(4), &config(8, &[])).is_err());
    }

    #[test]
    fn shape_overrides_fill_variable_dimensions() {
        let m = meta(&[("IMAGE", "UINT8", &[-1, 3, -1, -1])]);
        assert!(
            plan_tensors(&m, Some(8), &config(1, &[])).is_err(),
            "variable dims need --shape"
        );
        let plans = plan_tensors(&m, Some(8), &config(2, &["IMAGE:3,224,224"])).unwrap();
        assert_eq!(plans[0].shape, vec![2, 3, 224, 224]);
        assert!(
            plan_tensors(&m, Some(8), &config(1, &["IMAGE:4,224,224"])).is_err(),
            "fixed dim differs"
        );
        assert!(
            plan_tensors(&m, Some(8), &config(1, &["OTHER:1"])).is_err(),
            "unknown input"
        );
    }

    #[test]
    fn unbatched_model_uses_full_shape() {
        let m = meta(&[("X", "INT64", &[-1, 4])]);
        let plans = plan_tensors(&m, Some(0), &config(1, &["X:7,4"])).unwrap();
        assert_eq!(plans[0].shape, vec![7, 4]);
        assert!(plan_tensors(&m, Some(0), &config(2, &["X:7,4"])).is_err());
    }

    #[test]
    fn fill_has_the_right_size_for_every_datatype() {
        let mut rng = StdRng::seed_from_u64(0);
        for (dt, size) in [
            ("BOOL", 1),
            ("INT8", 1),
            ("FP16", 2),
            ("BF16", 2),
            ("INT32", 4),
            ("FP32", 4),
            ("INT64", 8),
            ("FP64", 8),
        ] {
            let plan = TensorPlan {
                name: "x".into(),
                datatype: dt.into(),
                shape: vec![2, 3],
            };
            assert_eq!(
                fill(&plan, DataKind::Random, &mut rng).unwrap().len(),
                6 * size,
                "{dt}"
            );
            assert!(fill(&plan, DataKind::Zero, &mut rng)
                .unwrap()
                .iter()
                .all(|b| *b == 0));
        }
        let strings = TensorPlan {
            name: "s".into(),
            datatype: "BYTES".into(),
            shape: vec![3],
        };
        assert_eq!(
            fill(&strings, DataKind::Random, &mut rng).unwrap().len(),
            3 * (4 + STRING_LENGTH)
        );
    }

    #[test]
    fn shape_override_parsing() {
        let o: ShapeOverride = "INPUT__0:3,224,224".parse().unwrap();
        assert_eq!((o.name.as_str(), o.dims), ("INPUT__0", vec![3, 224, 224]));
        assert!("INPUT__0".parse::<ShapeOverride>().is_err());
        assert!("X:3,-1".parse::<ShapeOverride>().is_err());
    }

    #[test]
    fn input_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.bin"), [0u8; 16]).unwrap();
        let json = dir.path().join("inputs.json");
        std::fs::write(
            &json,
            r#"{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"file":"x.bin"}]}"#,
        )
        .unwrap();
        let tensors = load_file(&json).unwrap();
        assert_eq!(tensors[0].0.shape, vec![1, 4]);
        assert_eq!(tensors[0].1.len(), 16);
        std::fs::write(
            &json,
            r#"{"inputs":[{"name":"X","datatype":"FP32","shape":[1,5],"file":"x.bin"}]}"#,
        )
        .unwrap();
        assert!(load_file(&json).is_err(), "byte size must match the shape");
    }
}
