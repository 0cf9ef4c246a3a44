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
async fn run_with_a_priority_mix_breaks_results_down_per_level() {
    let (addr, seen) = support::start(Behavior::RejectPriority(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("prio.json");
    // 200 requests on a constant schedule; a late threshold far beyond any stall keeps
    // every one of them sent, so the counts are exact.
    let mut a = args(&[
        "run",
        "-m",
        "fake",
        "--rate",
        "200",
        "--arrival",
        "constant",
    ]);
    a.extend(args(&[
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--late-threshold",
        "5s",
    ]));
    a.extend(args(&[
        "--priority-mix",
        "1:1,2:1",
        "-q",
        "-u",
        &addr.to_string(),
    ]));
    a.extend(args(&["--json", out.to_str().unwrap()]));
    let output = bench(a).await;
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&output.stderr)
    );

    // The check request before the run carries no priority; the 200 of the run do.
    let by_level = seen.priorities();
    assert_eq!(by_level[&None], 1, "{by_level:?}");
    assert_eq!(by_level[&Some(1)], 100, "{by_level:?}");
    assert_eq!(by_level[&Some(2)], 100, "{by_level:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[1].contains("ok %  codes"), "{stdout}");
    assert!(lines[2].starts_with("rate=200/s"), "{stdout}");
    assert!(
        lines[2].ends_with(" 50.0  OK 100, UNAVAILABLE 100"),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("  prio 1            100     100.0     100.0")
            && lines[3].ends_with("100.0  OK 100"),
        "{stdout}"
    );
    assert!(
        lines[4].starts_with("  prio 2            100       0.0       0.0")
            && lines[4].ends_with("0.0  UNAVAILABLE 100"),
        "{stdout}"
    );

    let v = json(&out);
    let p = &v["points"][0];
    assert_eq!(p["sent"], 200);
    let levels = p["by_priority"].as_array().expect("a breakdown per level");
    assert_eq!(levels.len(), 2);
    let (one, two) = (&levels[0], &levels[1]);
    assert_eq!(
        (one["priority"].as_u64(), two["priority"].as_u64()),
        (Some(1), Some(2))
    );
    for (level, ok, rejected, ratio) in [(one, 100, 0, 1.0), (two, 0, 100, 0.0)] {
        assert_eq!(level["sent"], 100, "{level}");
        assert_eq!(level["ok"], ok, "{level}");
        assert_eq!(level["ok_rps"], f64::from(ok), "{level}");
        assert_eq!(level["goodput_rps"], f64::from(ok), "{level}");
        assert_eq!(level["rejected"], rejected, "{level}");
        assert_eq!(level["success_ratio"], ratio, "{level}");
    }
    assert_eq!(one["codes"], serde_json::json!({"OK": 100}));
    assert_eq!(two["codes"], serde_json::json!({"UNAVAILABLE": 100}));
    assert!(one["latency_ms"]["ok"]["p99"].is_number(), "{one}");
    assert!(two["latency_ms"]["ok"].is_null(), "{two}");
    assert_eq!(two["latency_ms"]["rejected"]["count"], 100, "{two}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_priority_mix_is_refused_before_connecting() {
    let output = bench(args(&[
        "run",
        "-m",
        "fake",
        "-u",
        "127.0.0.1:9",
        "--priority-mix",
        "1:1,2:zero",
    ]))
    .await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("invalid priority weight \"zero\" in \"2:zero\""),
        "{stderr}"
    );
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
