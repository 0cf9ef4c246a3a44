//! A whole run: connect, build the request, check it once, run every point with a
//! live view, and write the results.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_proto::inference::ModelInferRequest;
use tonic::Code;

use crate::config::{Outputs, RunSpec};
use crate::inputs;
use crate::load;
use crate::plot;
use crate::progress::{self, Live, Progress};
use crate::report::{self, PointMeta, PointReport, RunReport, TargetInfo};
use crate::stats::{code_name, is_refusal};
use crate::target::Target;

/// How long the single check request may take (a cold model may need to load).
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs every point of `spec` and returns the report (nothing is written).
pub async fn run(spec: &RunSpec, outputs: &Outputs) -> Result<RunReport> {
    let target = Target::connect(&spec.target).await?;
    let request = Arc::new(inputs::build_request(&target, &spec.inputs).await?);
    probe(&target, &request).await?;
    let shown = progress::wanted(outputs.quiet);
    let mut points = Vec::new();
    for plan in spec.points() {
        let live = Live::new(shown);
        let bar = Progress::start(&plan.label, plan.config.load.length(), &live, shown);
        let stats = load::run_point(&target, Arc::clone(&request), &plan.config, &live).await;
        bar.finish();
        let meta = PointMeta {
            label: &plan.label,
            concurrency: plan.concurrency,
            profile: plan.profile(),
            batch_size: spec.inputs.batch_size,
        };
        let point = report::point(&stats, &meta);
        if !outputs.quiet {
            eprintln!("{}", one_line(&point));
        }
        points.push(point);
    }
    Ok(RunReport {
        name: spec.name.clone(),
        target: TargetInfo {
            url: target.url().to_owned(),
            model: spec.inputs.model.clone(),
            version: spec.inputs.version.clone(),
            batch_size: spec.inputs.batch_size,
            connections: target.connections(),
        },
        mode: spec.plan.mode().to_owned(),
        points,
    })
}

/// Sends the request once, so that a wrong model, shape or datatype fails the run at
/// once with the server's message instead of filling a table with errors.
async fn probe(target: &Target, request: &ModelInferRequest) -> Result<()> {
    let mut message = tonic::Request::new(request.clone());
    message.set_timeout(PROBE_TIMEOUT);
    let Err(status) = target.client().model_infer(message).await else {
        return Ok(());
    };
    // Refused or out of time: the server is busy, not the request wrong.
    if is_refusal(status.code()) || status.code() == Code::DeadlineExceeded {
        eprintln!(
            "note: the check request got {}: {} (going on)",
            code_name(status.code()),
            status.message()
        );
        return Ok(());
    }
    bail!(
        "the server rejected the request ({}): {}",
        code_name(status.code()),
        status.message()
    )
}

/// A short summary of a point for stderr, so non-interactive runs show progress too.
fn one_line(p: &PointReport) -> String {
    let p99 = p
        .latency_ms
        .ok
        .as_ref()
        .map_or_else(|| "-".to_owned(), |s| format!("{:.2} ms", s.p99));
    let errors = p.answered - p.successes();
    format!(
        "{:>14}: {:.1} ok/s, p99 {p99}, {errors} errors, {} sent",
        p.label, p.throughput_rps, p.sent
    )
}

/// Prints the table and writes the JSON file and plots the outputs ask for; returns
/// the files written.
pub fn write(report: &RunReport, outputs: &Outputs) -> Result<Vec<PathBuf>> {
    print!("{}", report::table(report));
    let mut written = Vec::new();
    if let Some(path) = &outputs.json {
        report::write_json(report, path)?;
        written.push(path.clone());
    }
    if let Some(prefix) = &outputs.plots {
        if plot::init_font(outputs.font.as_deref()).is_none() {
            eprintln!("warning: no font found for plot text (give one with --font or SLUICE_BENCH_FONT); plots have no text");
        }
        let name = |suffix: &str| {
            let mut s = prefix.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        if report.points.len() > 1 {
            written.extend(plot::sweep(report, &name("-sweep")).context("sweep plot")?);
        }
        if report.mode == "profile" {
            for p in &report.points {
                let title = format!(
                    "{}: model {}, offered profile vs answers",
                    report.name, report.target.model
                );
                written.extend(
                    plot::timeline(p, &title, &name("-timeline")).context("timeline plot")?,
                );
            }
        }
    }
    Ok(written)
}
