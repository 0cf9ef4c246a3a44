//! Triton's PyTorch backend parameters in a config.pbtxt: honoured where they mean
//! something here, accepted where they do not, and a bad value makes only that model
//! UNAVAILABLE.

mod common;

use common::{bundled_models, f32s, fp32_request, TestRepo, TestServer};
use sluice::backend::torch::TorchBackend;
use sluice::backend::{intra_op_threads, Backend};
use sluice::config::BackendOptions;
use sluice::spec::torch_params::TorchParams;
use sluice::spec::DeviceKind;
use sluice::tensor::{DataType, Tensor};
use sluice_proto::inference::RepositoryIndexRequest;

/// The bundled mlp's config with `parameters` added.
fn mlp_with(params: &[(&str, &str)]) -> String {
    let config = std::fs::read_to_string(bundled_models().join("mlp/config.pbtxt")).unwrap();
    let extra: String = params
        .iter()
        .map(|(k, v)| format!("parameters {{ key: \"{k}\" value: {{ string_value: \"{v}\" }} }}\n"))
        .collect();
    format!("{config}\n{extra}")
}

#[test]
fn intra_op_thread_count_sets_the_instance_threads_own_pool() {
    use std::sync::{Arc, Barrier};
    let weights = bundled_models().join("mlp/1/model.pt");
    // Two instances of models with different counts, loaded in this order: the first
    // instance's count must survive the second's load (libtorch keeps a process-wide
    // value that a thread reads the first time it runs parallel work).
    let loaded = Arc::new(Barrier::new(2));
    let second_loaded = Arc::new(Barrier::new(2));
    let instance = |count: Option<usize>, first: bool| {
        let (weights, loaded, second_loaded) =
            (weights.clone(), loaded.clone(), second_loaded.clone());
        std::thread::spawn(move || {
            let options = BackendOptions {
                intra_op_threads: Some(1),
            };
            let params = TorchParams {
                intra_op_threads: count,
                ..TorchParams::default()
            };
            let threads = intra_op_threads(params.intra_op_threads, &options, 2, 8);
            if !first {
                loaded.wait();
            }
            // Both threads reach every barrier, loaded or not, so a failed load fails
            // the test instead of hanging it.
            let backend = TorchBackend::load(&weights, DeviceKind::Cpu, threads, &params);
            if first {
                loaded.wait();
            }
            second_loaded.wait();
            backend.expect("mlp loads");
            tch::get_num_threads()
        })
    };
    let three = instance(Some(3), true);
    let server_default = instance(None, false);
    assert_eq!(
        three.join().unwrap(),
        3,
        "the model's INTRA_OP_THREAD_COUNT"
    );
    assert_eq!(server_default.join().unwrap(), 1, "the server's setting");
}

/// A zero batch of `samples` rows of `row` f32 values each.
fn zeros(samples: usize, row: &[i64]) -> Tensor {
    let mut shape = vec![i64::try_from(samples).unwrap()];
    shape.extend_from_slice(row);
    let bytes = shape.iter().product::<i64>() as usize * 4;
    Tensor::new(DataType::Fp32, shape, vec![0u8; bytes].into())
}

/// Run `batch` through `backend` `times` times; the instance thread's count after.
fn threads_after(backend: &mut TorchBackend, batch: &Tensor, times: usize) -> i32 {
    for _ in 0..times {
        backend
            .forward(std::slice::from_ref(batch))
            .expect("forward");
    }
    tch::get_num_threads()
}

#[test]
fn a_default_share_of_threads_drops_to_one_on_a_model_of_microseconds() {
    let load = |model: &str, narrowing: bool| {
        let weights = bundled_models().join(format!("{model}/1/model.pt"));
        let backend = TorchBackend::load(&weights, DeviceKind::Cpu, 2, &TorchParams::default())
            .expect("loads");
        if narrowing {
            backend.narrowing_on_small_batches(32)
        } else {
            backend
        }
    };
    // Each on its own thread: the count is the calling thread's.
    let mlp = std::thread::spawn(move || {
        let mut mlp = load("mlp", true);
        let before_full = threads_after(&mut mlp, &zeros(31, &[64]), 50);
        // A full batch of the mlp takes tens of microseconds; a few slow ones on a busy
        // machine only delay the switch.
        let after_full = threads_after(&mut mlp, &zeros(32, &[64]), 500);
        (before_full, after_full)
    });
    let set =
        std::thread::spawn(move || threads_after(&mut load("mlp", false), &zeros(32, &[64]), 500));
    let cnn = std::thread::spawn(move || {
        threads_after(&mut load("cnn", true), &zeros(32, &[3, 64, 64]), 3)
    });
    assert_eq!(
        mlp.join().unwrap(),
        (2, 1),
        "mlp: two threads until a full batch, then one"
    );
    assert_eq!(set.join().unwrap(), 2, "a count that was set is kept");
    assert_eq!(
        cnn.join().unwrap(),
        2,
        "the cnn's full batch takes milliseconds"
    );
}

#[tokio::test]
async fn a_triton_tuned_config_serves_the_same_answers() {
    let repo = TestRepo::new();
    let weights = bundled_models().join("mlp/1/model.pt");
    repo.model("mlp", &mlp_with(&[]), Some(&weights));
    repo.model(
        "tuned",
        &mlp_with(&[
            ("INTRA_OP_THREAD_COUNT", "2"),
            ("DISABLE_OPTIMIZED_EXECUTION", "true"),
            ("INFERENCE_MODE", "true"),
            ("ENABLE_CACHE_CLEANING", "false"),
        ])
        .replace("name: \"mlp\"", "name: \"tuned\""),
        Some(&weights),
    );
    repo.model(
        "bad",
        &mlp_with(&[("INTRA_OP_THREAD_COUNT", "zero")]).replace("name: \"mlp\"", "name: \"bad\""),
        Some(&weights),
    );
    let mut s = TestServer::start(repo.path()).await;
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    let answer = |model: &'static str| {
        let mut client = s.client.clone();
        let values = values.clone();
        async move {
            let out = client
                .model_infer(fp32_request(model, "INPUT__0", &[1, 64], &values))
                .await
                .unwrap_or_else(|e| panic!("{model}: {e:?}"))
                .into_inner();
            f32s(&out.raw_output_contents[0])
        }
    };
    let plain = answer("mlp").await;
    let tuned = answer("tuned").await;
    assert_eq!(plain.len(), tuned.len());
    for (a, b) in plain.iter().zip(&tuned) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }
    let index = s
        .client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    let bad = index.iter().find(|m| m.name == "bad").expect("listed");
    assert_eq!(bad.state, "UNAVAILABLE");
    assert!(
        bad.reason.contains("INTRA_OP_THREAD_COUNT"),
        "{}",
        bad.reason
    );
    s.stop().await;
}
