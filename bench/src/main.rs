//! `sluice-bench`: see `sluice-bench --help` and the crate docs.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use sluice_bench::cli::{Cli, Command, ScenarioArgs};
use sluice_bench::config::{Outputs, RunSpec};
use sluice_bench::{runner, scenario};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice-bench")
        .build()
        .expect("a tokio runtime can be built");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run_one(&args.spec()?, &args.outputs()).await,
        Command::RunScenario(args) => run_scenarios(&args).await,
    }
}

async fn run_scenarios(args: &ScenarioArgs) -> Result<()> {
    let overrides = scenario::Overrides {
        url: args.url.clone(),
    };
    // Read every file first, so a typo in the last one fails before any load is sent.
    let specs = args
        .files
        .iter()
        .map(|f| scenario::load(f, &overrides))
        .collect::<Result<Vec<_>>>()?;
    for spec in &specs {
        let outputs = Outputs {
            json: Some(args.out_dir.join(format!("{}.json", spec.name))),
            plots: Some(args.out_dir.join(&spec.name)),
            quiet: args.common.quiet,
            font: args.common.font.clone(),
        };
        if !args.common.quiet {
            eprintln!("== scenario {} ==", spec.name);
        }
        run_one(spec, &outputs).await?;
        println!();
    }
    Ok(())
}

async fn run_one(spec: &RunSpec, outputs: &Outputs) -> Result<()> {
    let report = runner::run(spec, outputs).await?;
    let written = runner::write(&report, outputs)?;
    if !outputs.quiet {
        for path in written {
            eprintln!("wrote {}", Path::new(&path).display());
        }
    }
    Ok(())
}
