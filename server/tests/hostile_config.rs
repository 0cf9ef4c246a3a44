//! Hostile model configurations: sizes that would exhaust memory or threads, warm-up files
//! outside the model. Each such model is reported UNAVAILABLE with its reason, at start-up
//! and through RepositoryModelLoad, while a good model in the same repository serves, and
//! no answer names where the repository lies.

mod common;

use common::{
    assert_hides_root, fp32_request, good_request_is_answered, index_row, load_request, TestRepo,
    TestServer,
};
use sluice::config::{ModelControl, ModelControlMode};
use sluice::Config;
use tonic::Code;

const TOKEN: &str = "hostile-test-token";

/// A synthetic model's config with FP32 `INPUT__0`/`OUTPUT__0` of dims [2], plus `extra`.
fn config(max_batch_size: &str, extra: &str) -> String {
    format!(
        "backend: \"sluice_synthetic\"\nmax_batch_size: {max_batch_size}\n\
         input [ {{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n\
         output [ {{ name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n{extra}"
    )
}

/// A warm-up sample of batch 1 whose input is given by `data` (a text-format field).
fn warmup(dims: &str, data: &str, count: u64) -> String {
    format!(
        "model_warmup [ {{ name: \"w\" batch_size: 1 count: {count} inputs {{ key: \"INPUT__0\" \
         value: {{ data_type: TYPE_FP32 dims: {dims} {data} }} }} }} ]\n"
    )
}

/// The hostile models and a phrase each one's reason must contain.
fn hostile_models() -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "huge_batch",
            config("2147483647", ""),
            "max_batch_size 2147483647 is above",
        ),
        (
            "huge_instances",
            config(
                "4",
                "instance_group [ { count: 2147483647 kind: KIND_CPU } ]\n",
            ),
            "max_model_instances",
        ),
        (
            "many_groups",
            config(
                "4",
                &"instance_group [ { count: 40 kind: KIND_CPU } ]\n".repeat(2),
            ),
            "max_model_instances",
        ),
        (
            "huge_warmup_dims",
            config("4", &warmup("[ 70368744177664 ]", "zero_data: true", 1)),
            "max_warmup_bytes",
        ),
        (
            "huge_default_warmup",
            "backend: \"sluice_synthetic\"\nmax_batch_size: 65536\n\
             input [ { name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 1099511627776 ] } ]\n\
             output [ { name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] } ]\n"
                .to_owned(),
            "default warm-up at batch size 1",
        ),
        (
            "huge_warmup_count",
            config("4", &warmup("[ 2 ]", "zero_data: true", 4294967295)),
            "count 4294967295 is above",
        ),
        (
            "huge_queue",
            config(
                "4",
                "dynamic_batching { default_queue_policy { max_queue_size: 4294967295 } }\n",
            ),
            "max_queue_size 4294967295 is above",
        ),
        (
            "escape_dotdot",
            config("4", &warmup("[ 2 ]", "input_data_file: \"../../x\"", 1)),
            "must be a relative path inside the model's warmup/ folder",
        ),
        (
            "escape_absolute",
            config("4", &warmup("[ 2 ]", "input_data_file: \"/etc/passwd\"", 1)),
            "must be a relative path inside the model's warmup/ folder",
        ),
        (
            "escape_symlink",
            config("4", &warmup("[ 2 ]", "input_data_file: \"link.bin\"", 1)),
            "warmup/link.bin resolves to a file outside",
        ),
        (
            "escape_warmup_dir",
            config("4", &warmup("[ 2 ]", "input_data_file: \"outside.bin\"", 1)),
            "resolves to a file outside",
        ),
    ]
}

/// A repository with the bundled mlp and every hostile model. The symbolic links point at
/// a well-formed file (8 bytes, the sample's exact size) in a hidden folder beside the
/// models (which the scan skips), so only where it lies is wrong.
fn hostile_repo() -> TestRepo {
    let repo = TestRepo::new();
    repo.bundled("mlp");
    for (name, text, _) in hostile_models() {
        repo.model(name, &text, None);
    }
    let outside = repo.path().join(".outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("outside.bin");
    std::fs::write(&secret, [0u8; 8]).unwrap();
    let warmup = repo.path().join("escape_symlink/warmup");
    std::fs::create_dir_all(&warmup).unwrap();
    std::os::unix::fs::symlink(&secret, warmup.join("link.bin")).unwrap();
    std::os::unix::fs::symlink(&outside, repo.path().join("escape_warmup_dir/warmup")).unwrap();
    repo
}

#[tokio::test]
async fn hostile_configs_at_start_up_leave_only_themselves_unavailable() {
    let repo = hostile_repo();
    let mut s = TestServer::start(repo.path()).await;
    assert_eq!(index_row(&mut s, "mlp").await.0, "READY");
    for (name, _, why) in hostile_models() {
        let (state, reason) = index_row(&mut s, name).await;
        assert_eq!(state, "UNAVAILABLE", "{name}: {reason}");
        assert!(
            reason.contains(why),
            "{name}: reason {reason:?} lacks {why:?}"
        );
        assert!(
            reason.contains(&format!("{name}/config.pbtxt")),
            "{name}: the reason names the file relative to the repository: {reason}"
        );
        assert_hides_root(repo.path(), &reason);

        let err = s
            .client
            .model_infer(fp32_request(name, "INPUT__0", &[1, 2], &[1.0, 2.0]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
        assert!(err.message().contains(why), "{name}: {}", err.message());
        assert_hides_root(repo.path(), err.message());
        good_request_is_answered(&mut s).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn hostile_configs_through_repository_model_load() {
    let repo = hostile_repo();
    let mut config = Config::for_repository(repo.path());
    config.control = ModelControl {
        mode: ModelControlMode::Explicit,
        load_models: vec!["mlp".into()],
        token: Some(TOKEN.into()),
    };
    let mut s = TestServer::start_with(config).await;
    for (name, _, why) in hostile_models() {
        assert_eq!(
            index_row(&mut s, name).await,
            ("UNAVAILABLE".to_owned(), "unloaded".to_owned())
        );
        let load = load_request(name, Some(TOKEN), Default::default());
        let err = s.client.repository_model_load(load).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
        assert!(err.message().contains(why), "{name}: {}", err.message());
        assert_hides_root(repo.path(), err.message());

        let (state, reason) = index_row(&mut s, name).await;
        assert_eq!(state, "UNAVAILABLE", "{name}");
        assert!(
            reason.contains(why),
            "{name}: reason {reason:?} lacks {why:?}"
        );
        assert_hides_root(repo.path(), &reason);
        good_request_is_answered(&mut s).await;
    }
    assert_eq!(index_row(&mut s, "mlp").await.0, "READY");
    s.stop().await;
}

#[tokio::test]
async fn a_warm_up_file_inside_warmup_is_read() {
    // The confinement refuses only what leaves the folder: a file in a subfolder, and a
    // link that stays inside, load.
    let repo = TestRepo::new();
    repo.bundled("mlp").model(
        "inside",
        &config(
            "4",
            &warmup("[ 2 ]", "input_data_file: \"sub/../link.bin\"", 3),
        ),
        None,
    );
    let warmup_dir = repo.path().join("inside/warmup");
    std::fs::create_dir_all(warmup_dir.join("sub")).unwrap();
    std::fs::write(warmup_dir.join("data.bin"), [0u8; 8]).unwrap();
    std::os::unix::fs::symlink("data.bin", warmup_dir.join("link.bin")).unwrap();
    let mut s = TestServer::start(repo.path()).await;
    let (state, reason) = index_row(&mut s, "inside").await;
    // `..` is refused even where it would stay inside: the rule is simple to state.
    assert_eq!(state, "UNAVAILABLE");
    assert!(reason.contains("without '..'"), "{reason}");
    s.stop().await;

    repo.model(
        "inside",
        &config("4", &warmup("[ 2 ]", "input_data_file: \"link.bin\"", 3)),
        None,
    );
    let mut s = TestServer::start(repo.path()).await;
    assert_eq!(index_row(&mut s, "inside").await.0, "READY");
    let ok = s
        .client
        .model_infer(fp32_request("inside", "INPUT__0", &[1, 2], &[1.0, 2.0]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    good_request_is_answered(&mut s).await;
    s.stop().await;
}
