//! Locked-down model control: explicit mode needs a token (from a setting or a file) or
//! an explicit opt-in; the token is checked; model names are checked before anything
//! touches the disk or the index; the `config` load parameter is applied and `file:`
//! overrides are refused; a reload that fails leaves the loaded version serving. After
//! every refusal the server still answers a good request.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_hides_root, fp32_request, good_request_is_answered, load_request, unload_request,
    TestRepo, TestServer,
};
use sluice::config::{ConfigError, ModelControlMode, Settings};
use sluice_proto::inference::{
    model_repository_parameter::ParameterChoice, ModelConfigRequest, ModelRepositoryParameter,
    RepositoryIndexRequest,
};
use tonic::Code;

const TOKEN: &str = "s3cret-token";

/// Explicit model control over `repo` on free ports, loading mlp at start-up.
fn explicit(repo: &Path) -> Settings {
    Settings {
        model_repository: Some(repo.into()),
        grpc_port: Some(0),
        http_port: Some(0),
        metrics_port: Some(0),
        model_control_mode: Some(ModelControlMode::Explicit),
        load_model: Some(vec!["mlp".into()]),
        ..Settings::default()
    }
}

fn string_param(key: &str, value: &str) -> HashMap<String, ModelRepositoryParameter> {
    HashMap::from([(
        key.to_owned(),
        ModelRepositoryParameter {
            parameter_choice: Some(ParameterChoice::StringParam(value.to_owned())),
        },
    )])
}

async fn index(s: &mut TestServer) -> Vec<(String, String, String)> {
    s.client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| (m.name, m.state, m.reason))
        .collect()
}

/// Run the `sluice` binary with `args` and `env`; it must exit within 60 s (it is killed
/// and the test fails otherwise). Its exit code and standard error.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("the sluice binary starts");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sluice") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().expect("kill sluice");
            child.wait().expect("reap sluice");
            panic!("sluice {args:?} kept running instead of refusing its configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

#[test]
fn the_binary_refuses_explicit_control_without_a_token_and_an_empty_token() {
    let repo = TestRepo::new();
    let dir = repo.path().to_str().unwrap();
    let base = [
        "--model-repository",
        dir,
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        "--model-control-mode",
        "explicit",
    ];
    let (code, stderr) = run_binary(&base, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("allow_unauthenticated_model_control")
            && stderr.contains("--allow-unauthenticated-model-control"),
        "the refusal names the opt-in: {stderr}"
    );

    let (code, stderr) = run_binary(&base, &[("SLUICE_MODEL_CONTROL_TOKEN", "")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("model_control_token") && stderr.contains("empty"),
        "{stderr}"
    );
    let (code, stderr) = run_binary(&base, &[("SLUICE_MODEL_CONTROL_TOKEN", "   ")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");

    let empty = repo.path().join(".empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let (code, stderr) = run_binary(
        &base,
        &[("SLUICE_MODEL_CONTROL_TOKEN_FILE", empty.to_str().unwrap())],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("model_control_token_file") && stderr.contains("is empty"),
        "{stderr}"
    );
}

#[tokio::test]
async fn explicit_control_without_a_token_needs_the_opt_in() {
    let repo = TestRepo::new();
    repo.bundled("mlp").synthetic("echo", "[ 2 ]", 4, &[]);
    let err = explicit(repo.path()).validate().unwrap_err();
    let ConfigError::Invalid { setting, message } = &err else {
        panic!("expected an invalid setting, got {err}");
    };
    assert_eq!(*setting, "model_control_mode");
    assert!(
        message.contains("allow_unauthenticated_model_control"),
        "{message}"
    );

    let config = Settings {
        allow_unauthenticated_model_control: Some(true),
        ..explicit(repo.path())
    }
    .validate()
    .expect("the opt-in allows explicit control without a token");
    let mut s = TestServer::start_with(config).await;
    s.client
        .repository_model_load(load_request("echo", None, Default::default()))
        .await
        .expect("with the opt-in, load needs no token");
    let ok = s
        .client
        .model_infer(fp32_request("echo", "INPUT__0", &[1, 2], &[1.0, 2.0]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    good_request_is_answered(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn token_from_a_file_is_required_and_checked() {
    let repo = TestRepo::new();
    repo.bundled("mlp").synthetic("echo", "[ 2 ]", 4, &[]);
    let token_file = repo.path().join(".token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config = Settings {
        model_control_token_file: Some(token_file),
        ..explicit(repo.path())
    }
    .validate()
    .unwrap();
    let mut s = TestServer::start_with(config).await;

    let err = s
        .client
        .repository_model_load(load_request("echo", None, Default::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    good_request_is_answered(&mut s).await;
    let err = s
        .client
        .repository_model_load(load_request("echo", Some("wrong"), Default::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = s
        .client
        .repository_model_load(load_request("echo", Some(&TOKEN[1..]), Default::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = s
        .client
        .repository_model_unload(unload_request("mlp", "wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    good_request_is_answered(&mut s).await;
    assert!(
        index(&mut s)
            .await
            .contains(&("echo".into(), "UNAVAILABLE".into(), "unloaded".into())),
        "refused calls change nothing"
    );

    s.client
        .repository_model_load(load_request("echo", Some(TOKEN), Default::default()))
        .await
        .expect("the token from the file is accepted");
    let ok = s
        .client
        .model_infer(fp32_request("echo", "INPUT__0", &[1, 2], &[1.0, 2.0]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    s.client
        .repository_model_unload(unload_request("echo", TOKEN))
        .await
        .unwrap();
    good_request_is_answered(&mut s).await;
    s.stop().await;
}

#[tokio::test]
async fn invalid_model_names_touch_nothing() {
    let repo = TestRepo::new();
    repo.bundled("mlp");
    // Directories that a bad name could reach if it were joined to the root.
    std::fs::create_dir_all(repo.path().join(".hidden/1")).unwrap();
    std::fs::create_dir_all(repo.path().join("a/b/1")).unwrap();
    let config = Settings {
        model_control_token: Some(TOKEN.into()),
        ..explicit(repo.path())
    }
    .validate()
    .unwrap();
    let mut s = TestServer::start_with(config).await;
    let before = index(&mut s).await;
    let long = "m".repeat(64 * 1024);
    for name in [
        "",
        "../x",
        "a/b",
        ".hidden",
        "..",
        "a\\b",
        "bell\u{7}",
        &long,
    ] {
        let err = s
            .client
            .repository_model_load(load_request(name, Some(TOKEN), Default::default()))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "load {name:.40?}: {err:?}"
        );
        assert!(
            err.message().len() < 512,
            "the echoed name is clipped: {} bytes",
            err.message().len()
        );
        assert!(err.message().contains("model name"), "{}", err.message());
        assert_hides_root(repo.path(), err.message());
        let err = s
            .client
            .repository_model_unload(unload_request(name, TOKEN))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "unload {name:.40?}: {err:?}"
        );
        assert!(err.message().len() < 512);
        assert_eq!(index(&mut s).await, before, "{name:.40?} changed the index");
        good_request_is_answered(&mut s).await;
    }
    // The scan itself never offered `.hidden` as a model.
    assert!(before.iter().all(|(name, _, _)| name != ".hidden"));
    let missing = s
        .client
        .repository_model_load(load_request("nope", Some(TOKEN), Default::default()))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_hides_root(repo.path(), missing.message());
    assert_eq!(index(&mut s).await, before);
    s.stop().await;
}

/// mlp's configuration as RepositoryModelLoad's `config` parameter carries it.
fn mlp_json(max_batch_size: i64) -> String {
    format!(
        r#"{{"name": "mlp", "platform": "pytorch_libtorch", "max_batch_size": {max_batch_size},
            "input": [{{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": [64]}}],
            "output": [{{"name": "OUTPUT__0", "dataType": "TYPE_FP32", "dims": ["10"]}}],
            "instance_group": [{{"count": 1, "kind": "KIND_CPU"}}]}}"#
    )
}

#[tokio::test]
async fn the_config_parameter_replaces_the_file_and_file_overrides_are_refused() {
    let repo = TestRepo::new();
    repo.bundled("mlp");
    let config = Settings {
        model_control_token: Some(TOKEN.into()),
        ..explicit(repo.path())
    }
    .validate()
    .unwrap();
    let mut s = TestServer::start_with(config).await;
    let batch = |n: usize| fp32_request("mlp", "INPUT__0", &[n as i64, 64], &vec![0.5; n * 64]);
    let max_batch_size = |s: &mut TestServer| {
        let mut client = s.client.clone();
        async move {
            client
                .model_config(ModelConfigRequest {
                    name: "mlp".into(),
                    version: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .config
                .unwrap()
                .max_batch_size
        }
    };
    assert_eq!(max_batch_size(&mut s).await, 32);
    s.client.model_infer(batch(8)).await.unwrap();

    s.client
        .repository_model_load(load_request(
            "mlp",
            Some(TOKEN),
            string_param("config", &mlp_json(4)),
        ))
        .await
        .expect("load with a config parameter");
    assert_eq!(max_batch_size(&mut s).await, 4);
    let err = s.client.model_infer(batch(8)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("max_batch_size 4"),
        "{}",
        err.message()
    );
    s.client.model_infer(batch(4)).await.unwrap();

    // Refused overrides leave the model as it was (max_batch_size 4) and serving.
    let refusals: Vec<(HashMap<String, ModelRepositoryParameter>, &str)> = vec![
        (
            string_param("config", "{ not json"),
            "not a valid model configuration",
        ),
        (
            string_param("config", &mlp_json(-1)),
            "max_batch_size -1 is negative",
        ),
        (
            string_param("config", &mlp_json(1 << 40)),
            "not a valid model configuration",
        ),
        (
            string_param("config", r#"{"name": "mlp", "no_such_field": 1}"#),
            "no_such_field",
        ),
        (
            string_param(
                "config",
                &mlp_json(4).replace(r#""count": 1"#, r#""count": 100000"#),
            ),
            "max_model_instances",
        ),
        (
            string_param("config", &mlp_json(4).replace(r#""mlp""#, r#""other""#)),
            "does not match",
        ),
        (
            HashMap::from([(
                "config".to_owned(),
                ModelRepositoryParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(1)),
                },
            )]),
            "must be a string",
        ),
        (
            string_param("file:1/model.pt", "weights"),
            "file overrides are not supported",
        ),
        (
            string_param("colour", "blue"),
            "unknown load parameter 'colour'",
        ),
    ];
    for (parameters, why) in refusals {
        let err = s
            .client
            .repository_model_load(load_request("mlp", Some(TOKEN), parameters))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}: {err:?}");
        assert!(err.message().contains(why), "{why}: {}", err.message());
        assert_hides_root(repo.path(), err.message());
        assert_eq!(max_batch_size(&mut s).await, 4, "after {why}");
        good_request_is_answered(&mut s).await;
    }

    // A load without the parameter reads config.pbtxt again.
    s.client
        .repository_model_load(load_request("mlp", Some(TOKEN), Default::default()))
        .await
        .unwrap();
    assert_eq!(max_batch_size(&mut s).await, 32);
    s.client.model_infer(batch(8)).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_reload_that_fails_leaves_the_loaded_version_serving() {
    let repo = TestRepo::new();
    repo.synthetic("m", "[ 2 ]", 8, &[]);
    let config = Settings {
        model_control_token: Some(TOKEN.into()),
        load_model: Some(vec!["m".into()]),
        ..explicit(repo.path())
    }
    .validate()
    .unwrap();
    let mut s = TestServer::start_with(config).await;
    let infer = || fp32_request("m", "INPUT__0", &[1, 2], &[1.0, 2.0]);
    std::fs::write(repo.path().join("m/config.pbtxt"), "max_batch_size: { nope").unwrap();
    let load = load_request("m", Some(TOKEN), Default::default());
    let err = s.client.repository_model_load(load).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("reload failed"), "{}", err.message());
    assert_hides_root(repo.path(), err.message());
    // As in Triton: the loaded version keeps serving, the index shows why the reload failed.
    s.client
        .model_infer(infer())
        .await
        .expect("version 1 serves");
    let rows = index(&mut s).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("m", "READY"));
    assert!(rows[0].2.contains("config.pbtxt"), "{rows:?}");

    // A load that succeeds clears the reason.
    repo.synthetic("m", "[ 2 ]", 4, &[]);
    let load = load_request("m", Some(TOKEN), Default::default());
    s.client.repository_model_load(load).await.unwrap();
    assert_eq!(
        index(&mut s).await,
        vec![("m".into(), "READY".into(), String::new())]
    );
    s.client.model_infer(infer()).await.unwrap();
    s.stop().await;
}
