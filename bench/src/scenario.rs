//! Scenario files: a run described in TOML, kept in `bench/scenarios/`.
//!
//! ```toml
//! name = "mlp-closed-sweep"        # optional: the file name without .toml
//! description = "what this run shows"
//! model = "mlp"
//! batch_size = 1                   # optional, 1
//! connections = 1                  # optional, 1
//! data = "random"                  # optional: random | zero
//! shapes = { INPUT__0 = [64] }     # optional: variable dims, batch dim excluded
//! # input_file = "inputs.json"     # optional, relative to this file
//! # priority_mix = "1:1,2:3"       # optional: as `run --priority-mix`
//! # url = "127.0.0.1:8001"         # optional; --url overrides it
//!
//! [timing]                         # optional; the same settings as `run`'s flags
//! duration = "5s"
//! warmup = "1s"
//! deadline = "100ms"
//!
//! [load]
//! mode = "closed"                  # closed | open | profile
//! concurrency = [1, 2, 4, 8]
//! # mode = "open":    rates = [100, 200], arrival = "poisson" | "constant"
//! # mode = "profile": arrival = ..., and either
//! #   stages = [{ rate = 100, duration = "5s" }, { rate = 400, duration = "5s" }]
//! #   spike = { base = 100, peak = 1000, at = "4s", length = "2s", total = "12s" }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::config::{Human, LoadPlan, RunSpec, Timing};
use crate::inputs::{DataKind, InputConfig, ShapeOverride};
use crate::priority::PriorityMix;
use crate::schedule::{Arrival, Profile, Spike, Stage};
use crate::target::TargetConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    name: Option<String>,
    #[allow(dead_code)] // documentation for people reading the file
    description: Option<String>,
    url: Option<String>,
    model: String,
    #[serde(default)]
    model_version: String,
    #[serde(default = "one")]
    batch_size: usize,
    #[serde(default = "one")]
    connections: usize,
    #[serde(default)]
    data: DataKind,
    #[serde(default)]
    shapes: BTreeMap<String, Vec<i64>>,
    input_file: Option<PathBuf>,
    priority_mix: Option<PriorityMix>,
    #[serde(default)]
    timing: Timing,
    load: LoadSection,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
enum LoadSection {
    Closed {
        concurrency: Vec<usize>,
    },
    Open {
        rates: Vec<f64>,
        #[serde(default)]
        arrival: Arrival,
    },
    Profile {
        #[serde(default)]
        arrival: Arrival,
        stages: Option<Vec<StageSection>>,
        spike: Option<SpikeSection>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageSection {
    rate: f64,
    duration: Human,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpikeSection {
    base: f64,
    peak: f64,
    at: Human,
    length: Human,
    total: Human,
}

/// What the command line may change in a scenario.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub url: Option<String>,
}

/// Reads a scenario file into a validated run.
pub fn load(path: &Path, overrides: &Overrides) -> Result<RunSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read scenario {}", path.display()))?;
    let scenario: Scenario =
        toml::from_str(&text).with_context(|| format!("invalid scenario {}", path.display()))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let spec = scenario
        .into_spec(stem, dir, overrides)
        .with_context(|| format!("in scenario {}", path.display()))?;
    spec.validate()
        .with_context(|| format!("in scenario {}", path.display()))?;
    Ok(spec)
}

impl Scenario {
    fn into_spec(self, stem: String, dir: &Path, overrides: &Overrides) -> Result<RunSpec> {
        let url = overrides
            .url
            .clone()
            .or(self.url)
            .context("no server address: give --url or set url in the scenario")?;
        let plan = match self.load {
            LoadSection::Closed { concurrency } => LoadPlan::Closed { concurrency },
            LoadSection::Open { rates, arrival } => LoadPlan::Open { rates, arrival },
            LoadSection::Profile {
                arrival,
                stages,
                spike,
            } => LoadPlan::Profile {
                profile: profile(stages, spike)?,
                arrival,
            },
        };
        Ok(RunSpec {
            name: self.name.unwrap_or(stem),
            target: TargetConfig {
                url,
                connections: self.connections,
            },
            inputs: InputConfig {
                model: self.model,
                version: self.model_version,
                batch_size: self.batch_size,
                shapes: self
                    .shapes
                    .into_iter()
                    .map(|(name, dims)| ShapeOverride { name, dims })
                    .collect(),
                data: self.data,
                file: self.input_file.map(|f| dir.join(f)),
                seed: self.timing.seed,
            },
            plan,
            timing: self.timing,
            priorities: self.priority_mix,
        })
    }
}

fn profile(stages: Option<Vec<StageSection>>, spike: Option<SpikeSection>) -> Result<Profile> {
    match (stages, spike) {
        (Some(stages), None) => Profile::steps(
            stages
                .into_iter()
                .map(|s| Stage {
                    rate: s.rate,
                    duration: s.duration.0,
                })
                .collect(),
        ),
        (None, Some(s)) => Profile::spike(&Spike {
            base: s.base,
            peak: s.peak,
            at: s.at.0,
            length: s.length.0,
            total: s.total.0,
        }),
        (Some(_), Some(_)) | (None, None) => {
            bail!("a profile needs exactly one of `stages` and `spike`")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Result<RunSpec> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.toml");
        std::fs::write(&path, text).unwrap();
        load(
            &path,
            &Overrides {
                url: Some("127.0.0.1:9".into()),
            },
        )
    }

    #[test]
    fn closed_scenario_with_defaults() {
        let s =
            parse("model = \"mlp\"\n[load]\nmode = \"closed\"\nconcurrency = [1, 2]\n").unwrap();
        assert_eq!(s.name, "demo");
        assert_eq!(s.target.url, "127.0.0.1:9");
        assert_eq!(s.inputs.batch_size, 1);
        assert_eq!(s.timing, Timing::default());
        assert_eq!(
            s.plan,
            LoadPlan::Closed {
                concurrency: vec![1, 2]
            }
        );
        assert_eq!(s.priorities, None);
    }

    #[test]
    fn priority_mix_in_a_scenario() {
        let load = "[load]\nmode = \"open\"\nrates = [100]\n";
        let s = parse(&format!(
            "model = \"m\"\npriority_mix = \"1:3, 2:1\"\n{load}"
        ))
        .unwrap();
        let mix = s.priorities.expect("the scenario gives a mix");
        assert_eq!(mix.levels().collect::<Vec<_>>(), [1, 2]);
        let bad = parse(&format!("model = \"m\"\npriority_mix = \"1:0\"\n{load}")).unwrap_err();
        assert!(
            format!("{bad:#}").contains("the weight of priority 1 must be above 0"),
            "{bad:#}"
        );
    }

    #[test]
    fn spike_profile_with_timing() {
        let s = parse(
            r#"
            name = "spike"
            model = "mlp"
            shapes = { INPUT__0 = [64] }
            [timing]
            warmup = "0s"
            deadline = "50ms"
            [load]
            mode = "profile"
            arrival = "constant"
            spike = { base = 10, peak = 100, at = "1s", length = "1s", total = "3s" }
            "#,
        )
        .unwrap();
        assert_eq!(s.timing.deadline, Some(Human(Duration::from_millis(50))));
        assert_eq!(
            s.inputs.shapes,
            vec![ShapeOverride {
                name: "INPUT__0".into(),
                dims: vec![64]
            }]
        );
        let LoadPlan::Profile { profile, arrival } = &s.plan else {
            panic!("not a profile: {:?}", s.plan)
        };
        assert_eq!(*arrival, Arrival::Constant);
        assert_eq!(profile.expected_requests(), 120.0);
    }

    #[test]
    fn mistakes_are_reported() {
        let typo = "model = \"m\"\n[load]\nmode = \"closed\"\nconcurency = [1]\n";
        assert!(format!("{:#}", parse(typo).unwrap_err()).contains("concurency"));
        let both = "model = \"m\"\n[load]\nmode = \"profile\"\nstages = [{ rate = 1, duration = \"1s\" }]\nspike = { base = 1, peak = 2, at = \"1s\", length = \"1s\", total = \"3s\" }\n";
        assert!(parse(both).is_err());
        let bad_duration = "model = \"m\"\n[timing]\nduration = \"soon\"\n[load]\nmode = \"closed\"\nconcurrency = [1]\n";
        assert!(format!("{:#}", parse(bad_duration).unwrap_err()).contains("invalid duration"));
    }

    #[test]
    fn bundled_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                load(
                    &path,
                    &Overrides {
                        url: Some("127.0.0.1:9".into()),
                    },
                )
                .unwrap();
                n += 1;
            }
        }
        assert!(
            n >= 3,
            "expected the bundled scenarios in {}",
            dir.display()
        );
    }
}
