//! The command line: `sluice-bench run ...` and `sluice-bench run-scenario FILE...`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::config::{parse_stages, LoadPlan, Outputs, RunSpec, Timing};
use crate::inputs::{DataKind, InputConfig, ShapeOverride};
use crate::priority::PriorityMix;
use crate::schedule::{Arrival, Profile};
use crate::target::TargetConfig;

/// Load generator for KServe v2 / Triton gRPC inference servers (sluice, Triton, ...).
///
/// Reads the model's metadata to build its inputs, then sends ModelInfer requests in a
/// closed loop (N concurrent clients) or an open loop (a constant or Poisson arrival
/// rate, steady or following a profile). Open-loop latency counts from each request's
/// intended send time, and the run says when the generator fell behind its schedule.
/// Reports throughput, goodput, latency percentiles of successes and of rejections, and
/// answers per gRPC status, as a table, a JSON file and SVG/PNG plots.
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run load described by flags.
    ///
    /// Examples:
    ///   sluice-bench run -m mlp -u 127.0.0.1:8001 --concurrency 1,2,4,8
    ///   sluice-bench run -m mlp --rate 500,1000,2000 --deadline 50ms --json out.json --plots out/mlp
    ///   sluice-bench run -m mlp --profile 200@5s,2000@2s,200@5s --warmup 0s --plots out/spike
    ///   sluice-bench run -m mlp --rate 2000 --priority-mix 1:1,2:3 --deadline 50ms
    #[command(verbatim_doc_comment)]
    Run(Box<RunArgs>),
    /// Run scenario files (TOML, see bench/scenarios/), writing NAME.json and plots to --out-dir.
    RunScenario(ScenarioArgs),
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Server address: host:port or http://host:port.
    #[arg(short = 'u', long, default_value = "127.0.0.1:8001")]
    pub url: String,
    /// Independent HTTP/2 connections; requests are spread over them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub connections: usize,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Model name.
    #[arg(short = 'm', long)]
    pub model: String,
    /// Model version [default: the server's choice].
    #[arg(long, default_value = "", hide_default_value = true)]
    pub model_version: String,
    /// Rows per request for a model that batches.
    #[arg(short = 'b', long, default_value_t = 1)]
    pub batch_size: usize,
    /// Dimensions for an input's variable (-1) dims, batch dim excluded; repeatable.
    #[arg(long = "shape", value_name = "NAME:D1,D2,..")]
    pub shapes: Vec<ShapeOverride>,
    /// Data of generated inputs.
    #[arg(long, value_enum, default_value_t = DataKind::Random)]
    pub data: DataKind,
    /// Take inputs from a JSON file ({"inputs": [{"name", "datatype", "shape", "file"}]},
    /// each file holding raw little-endian tensor bytes) instead of the metadata.
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    /// Closed loop: comma-separated numbers of concurrent clients, one point each [default: 1].
    #[arg(long, value_delimiter = ',', value_name = "N,..", conflicts_with_all = ["rate", "profile"])]
    pub concurrency: Vec<usize>,
    /// Open loop: comma-separated request rates per second, one point each.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "RPS,..",
        conflicts_with = "profile"
    )]
    pub rate: Vec<f64>,
    /// Open loop following a rate profile: RATE@DURATION stages, e.g. 100@5s,400@2s,100@5s.
    #[arg(long, value_parser = parse_stages, value_name = "STAGES")]
    pub profile: Option<Profile>,
    /// Open loop: how arrivals are spread.
    #[arg(long, value_enum, default_value_t = Arrival::Poisson)]
    pub arrival: Arrival,
    /// Give each request Triton's `priority` parameter (uint64; 1 is the highest), the
    /// levels interleaved deterministically by weight (1:1,2:3: one request in four at
    /// priority 1), and break the results down per level. Without it no priority is sent.
    #[arg(long, value_name = "LEVEL:WEIGHT,..")]
    pub priority_mix: Option<PriorityMix>,
    #[command(flatten)]
    pub timing: Timing,
    /// Name of the run in reports and plots.
    #[arg(long, default_value = "sluice-bench")]
    pub name: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write plots as PREFIX-sweep.{svg,png} (several points) and PREFIX-timeline.{svg,png} (profiles).
    #[arg(long, value_name = "PREFIX")]
    pub plots: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonOutputArgs,
}

#[derive(Debug, Args)]
pub struct CommonOutputArgs {
    /// No progress bar or per-point lines on stderr (the final table is still printed).
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// TTF font for plot text [default: a common system sans-serif font].
    #[arg(long, value_name = "FILE", env = "SLUICE_BENCH_FONT")]
    pub font: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ScenarioArgs {
    /// Scenario files to run, in order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Server address, overriding the scenarios' `url`.
    #[arg(short = 'u', long)]
    pub url: Option<String>,
    /// Directory for each scenario's NAME.json and NAME-*.{svg,png}.
    #[arg(long, default_value = "bench-results", value_name = "DIR")]
    pub out_dir: PathBuf,
    #[command(flatten)]
    pub common: CommonOutputArgs,
}

impl RunArgs {
    /// The run these flags describe, validated.
    pub fn spec(&self) -> Result<RunSpec> {
        let plan = if let Some(profile) = &self.profile {
            LoadPlan::Profile {
                profile: profile.clone(),
                arrival: self.arrival,
            }
        } else if !self.rate.is_empty() {
            LoadPlan::Open {
                rates: self.rate.clone(),
                arrival: self.arrival,
            }
        } else if self.concurrency.is_empty() {
            LoadPlan::Closed {
                concurrency: vec![1],
            }
        } else {
            LoadPlan::Closed {
                concurrency: self.concurrency.clone(),
            }
        };
        let spec = RunSpec {
            name: self.name.clone(),
            target: TargetConfig {
                url: self.target.url.clone(),
                connections: self.target.connections,
            },
            inputs: InputConfig {
                model: self.model.clone(),
                version: self.model_version.clone(),
                batch_size: self.batch_size,
                shapes: self.shapes.clone(),
                data: self.data,
                file: self.input_file.clone(),
                seed: self.timing.seed,
            },
            plan,
            timing: self.timing.clone(),
            priorities: self.priority_mix.clone(),
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn outputs(&self) -> Outputs {
        Outputs {
            json: self.output.json.clone(),
            plots: self.output.plots.clone(),
            quiet: self.output.common.quiet,
            font: self.output.common.font.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::CommandFactory;

    use super::*;

    fn run_args(args: &[&str]) -> Result<RunSpec> {
        let cli = Cli::try_parse_from([&["sluice-bench", "run", "-m", "mlp"], args].concat())?;
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        run.spec()
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_make_plans() {
        assert_eq!(
            run_args(&[]).unwrap().plan,
            LoadPlan::Closed {
                concurrency: vec![1]
            }
        );
        let open = run_args(&[
            "--rate",
            "100,200",
            "--arrival",
            "constant",
            "--deadline",
            "20ms",
        ])
        .unwrap();
        assert_eq!(
            open.plan,
            LoadPlan::Open {
                rates: vec![100.0, 200.0],
                arrival: Arrival::Constant
            }
        );
        assert_eq!(
            open.timing.deadline.map(|d| d.0),
            Some(Duration::from_millis(20))
        );
        let profile = run_args(&["--profile", "10@1s,20@1s", "--warmup", "0s"]).unwrap();
        assert_eq!(profile.plan.mode(), "profile");
        let shaped = run_args(&["--shape", "INPUT__0:3,8,8", "--shape", "B:1"]).unwrap();
        assert_eq!(shaped.inputs.shapes.len(), 2);
        assert_eq!(run_args(&[]).unwrap().priorities, None);
    }

    #[test]
    fn priority_mix_flag() {
        let mixed = run_args(&["--rate", "100", "--priority-mix", "1:1,2:3"]).unwrap();
        let mix = mixed.priorities.expect("a mix was given");
        assert_eq!(mix.levels().collect::<Vec<_>>(), [1, 2]);
        let e = run_args(&["--priority-mix", "1:1,0:1"]).unwrap_err();
        assert!(e.to_string().contains("priority levels start at 1"), "{e}");
        let e = run_args(&["--priority-mix", "high"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected LEVEL:WEIGHT in the priority mix"),
            "{e}"
        );
    }

    #[test]
    fn conflicting_or_bad_flags_fail() {
        assert!(run_args(&["--rate", "10", "--concurrency", "2"]).is_err());
        assert!(run_args(&["--concurrency", "0"]).is_err());
        assert!(run_args(&["--duration", "forever"]).is_err());
        assert!(run_args(&["--profile", "10@1s", "--warmup", "2s"]).is_err());
    }
}
