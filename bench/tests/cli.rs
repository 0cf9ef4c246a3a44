//! The `sluice-bench` binary end to end against the fake server: flags and scenario
//! files in, table, warnings, JSON and plots out.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::Behavior;

/// Runs the binary off the runtime's threads, so the fake server keeps serving.
async fn bench(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
            .args(&args)
            .output()
            .expect("the binary runs")
    })
    .await
    .expect("the blocking task completes")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("the JSON file exists"))
        .expect("valid JSON")
}

fn non_empty(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

async fn fake(delay_ms: u64) -> SocketAddr {
    support::start(Behavior::Sleep(Duration::from_millis(delay_ms)))
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_sweep_warns_when_the_generator_falls_behind_and_writes_results() {
    let addr = fake(20).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.json");
    let plots = dir.path().join("plots/fake");
    let mut a = args(&[
        "run",
        "-m",
        "fake",
        "--rate",
        "20,1000",
        "--arrival",
        "constant",
        "--max-in-flight",
        "1",
    ]);
    a.extend(args(&[
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "-q",
        "-u",
        &addr.to_string(),
    ]));
    a.extend(args(&[
        "--json",
        out.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]));
    let output = bench(a).await;
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&output.stderr)
    );

    assert!(
        stdout.contains("point              sent      ok/s"),
        "{stdout}"
    );
    // 20/s fits one outstanding 20 ms request; 1000/s cannot.
    assert!(
        stdout.contains("WARNING: rate=1000/s: the load generator fell behind its schedule"),
        "{stdout}"
    );
    assert!(!stdout.contains("WARNING: rate=20/s"), "{stdout}");
    let v = json(&out);
    assert_eq!(v["mode"], "open");
    assert_eq!(v["points"][0]["schedule"]["fell_behind"], false);
    assert_eq!(v["points"][1]["schedule"]["fell_behind"], true);
    assert!(v["points"][1]["unsent"].as_u64().unwrap() > 500);
    for ext in ["svg", "png"] {
        assert!(
            non_empty(&dir.path().join(format!("plots/fake-sweep.{ext}"))),
            "sweep {ext}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_scenario_with_a_spike_profile_writes_a_timeline() {
    let addr = fake(1).await;
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("spike.toml");
    std::fs::write(
        &scenario,
        r#"
        model = "fake"
        [timing]
        warmup = "0s"
        deadline = "1s"
        [load]
        mode = "profile"
        arrival = "poisson"
        spike = { base = 50, peak = 200, at = "500ms", length = "500ms", total = "2s" }
        "#,
    )
    .unwrap();
    let out_dir = dir.path().join("results");
    let a = args(&[
        "run-scenario",
        scenario.to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
        "-q",
        "-u",
        &addr.to_string(),
    ]);
    let output = bench(a).await;
    assert!(output.status.success(), "stderr:\n{}", text(&output.stderr));

    let v = json(&out_dir.join("spike.json"));
    assert_eq!(v["name"], "spike");
    assert_eq!(v["mode"], "profile");
    let p = &v["points"][0];
    assert_eq!(p["series"].as_array().unwrap().len(), 2);
    assert_eq!(p["series"][0]["offered_rps"], 125.0);
    assert!(p["codes"]["OK"].as_u64().unwrap() > 100, "{}", p["codes"]);
    for ext in ["svg", "png"] {
        assert!(
            non_empty(&out_dir.join(format!("spike-timeline.{ext}"))),
            "timeline {ext}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_fails_with_the_servers_message() {
    let addr = fake(1).await;
    let output = bench(args(&[
        "run",
        "-m",
        "nope",
        "-u",
        &addr.to_string(),
        "--duration",
        "1s",
        "-q",
    ]))
    .await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("ModelMetadata for model \"nope\" failed")
            && stderr.contains("unknown model"),
        "{stderr}"
    );
}
