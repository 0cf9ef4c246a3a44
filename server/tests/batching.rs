//! Dynamic batching end to end: many concurrent clients get exactly their own rows, equal
//! to what the model answers them alone, and a flooded queue refuses at once.

mod common;

use common::{f32s, fp32_request, TestRepo, TestServer};
use sluice_proto::inference::ModelStatisticsRequest;
use tonic::Code;

/// A bundled model's config with dynamic batching switched on (whatever the bundled default).
fn with_batching(repo: &TestRepo, name: &str, dims: &str, delay_us: u32) {
    let src = common::bundled_models().join(name);
    let config = format!(
        "name: \"{name}\"\nplatform: \"pytorch_libtorch\"\nmax_batch_size: 32\n\
         input [ {{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: {dims} }} ]\n\
         output [ {{ name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 10 ] }} ]\n\
         instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n\
         dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    );
    repo.model(name, &config, Some(&src.join("1/model.pt")));
}

/// Deterministic, distinct input for client `c`, sample `s`.
fn input(c: usize, s: usize, width: usize) -> Vec<f32> {
    (0..width)
        .map(|i| ((c * 31 + s * 7 + i) % 97) as f32 / 97.0 - 0.5)
        .collect()
}

async fn batched_equals_unbatched(name: &str, dims: &str, width: usize) {
    let repo = TestRepo::new();
    with_batching(&repo, name, dims, 20_000);
    let mut s = TestServer::start(repo.path()).await;
    let shape = |n: usize| -> Vec<i64> {
        let mut v = vec![n as i64];
        v.extend(
            dims.trim_matches(|c| c == '[' || c == ']' || c == ' ')
                .split(',')
                .map(|d| d.trim().parse::<i64>().unwrap()),
        );
        v
    };
    const CLIENTS: usize = 16;
    // Alone first: one request at a time, so each runs in a batch of its own.
    let mut alone = Vec::new();
    for c in 0..CLIENTS {
        let samples = 1 + c % 2;
        let values: Vec<f32> = (0..samples).flat_map(|s| input(c, s, width)).collect();
        let out = s
            .client
            .model_infer(fp32_request(name, "INPUT__0", &shape(samples), &values))
            .await
            .unwrap();
        alone.push(f32s(&out.into_inner().raw_output_contents[0]));
    }
    // Then all at once, concurrently: they share batches.
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = s.client.clone();
        let samples = 1 + c % 2;
        let values: Vec<f32> = (0..samples).flat_map(|s| input(c, s, width)).collect();
        let req = fp32_request(name, "INPUT__0", &shape(samples), &values);
        tasks.push(tokio::spawn(
            async move { (c, client.model_infer(req).await) },
        ));
    }
    for t in tasks {
        let (c, result) = t.await.unwrap();
        let out = result.unwrap().into_inner();
        assert_eq!(
            out.outputs[0].shape,
            vec![(1 + c % 2) as i64, 10],
            "client {c}"
        );
        let got = f32s(&out.raw_output_contents[0]);
        for (g, a) in got.iter().zip(&alone[c]) {
            assert!(
                (g - a).abs() <= 1e-5,
                "{name} client {c}: batched {g} vs alone {a}"
            );
        }
    }
    let stats = s
        .client
        .model_statistics(ModelStatisticsRequest {
            name: name.into(),
            version: String::new(),
        })
        .await;
    let stats = stats.unwrap().into_inner().model_stats.remove(0);
    assert!(
        stats.batch_stats.iter().any(|b| b.batch_size > 2),
        "concurrent requests were never combined: {:?}",
        stats
            .batch_stats
            .iter()
            .map(|b| b.batch_size)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        stats.inference_count,
        2 * (CLIENTS as u64 / 2 + CLIENTS as u64)
    );
    assert!(stats.execution_count < 2 * CLIENTS as u64);
    s.stop().await;
}

#[tokio::test]
async fn mlp_batched_outputs_equal_unbatched() {
    batched_equals_unbatched("mlp", "[ 64 ]", 64).await;
}

#[tokio::test]
async fn cnn_batched_outputs_equal_unbatched() {
    batched_equals_unbatched("cnn", "[ 3, 64, 64 ]", 3 * 64 * 64).await;
}

#[tokio::test]
async fn a_flooded_queue_answers_unavailable_with_pushback() {
    let repo = TestRepo::new();
    let config = "backend: \"sluice_synthetic\"\nmax_batch_size: 4\n\
        input [ { name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] } ]\n\
        output [ { name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] } ]\n\
        dynamic_batching { default_queue_policy { max_queue_size: 4 } }\n\
        parameters { key: \"sleep_ms\" value: { string_value: \"200\" } }\n";
    repo.model("slow", config, None);
    let s = TestServer::start(repo.path()).await;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let mut client = s.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[1.0, 2.0]))
                .await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                assert!(e.message().contains("queue full"), "{}", e.message());
                let pushback = e
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .expect("pushback header");
                assert!(pushback.to_str().unwrap().parse::<u64>().unwrap() > 0);
                refused += 1;
            }
        }
    }
    // At most: one batch running (4) + a full queue (4); everything else was refused.
    assert!((1..=8).contains(&ok), "served {ok}");
    assert_eq!(ok + refused, 40);
    s.stop().await;
}
