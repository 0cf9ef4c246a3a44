//! Start-up with broken models: each is reported (which model, which file, why) and the
//! others serve. Plus metadata, config and the HTTP health endpoints.

mod common;

use common::{fp32_request, http_get, TestRepo, TestServer};
use sluice_proto::inference::{
    ModelConfigRequest, ModelMetadataRequest, ModelReadyRequest, RepositoryIndexRequest,
};

const IO: &str = r#"input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 10 ] } ]"#;

#[tokio::test]
async fn broken_models_are_reported_and_the_rest_serve() {
    let repo = TestRepo::new();
    repo.bundled("mlp")
        .model(
            "bad_syntax",
            "name: \"bad_syntax\"\nmax_batch_size: 8\ninput [ { name: ",
            None,
        )
        .model(
            "no_weights",
            &format!("platform: \"pytorch_libtorch\"\nmax_batch_size: 8\n{IO}"),
            None,
        )
        .model(
            "onnx",
            &format!("platform: \"onnxruntime_onnx\"\nmax_batch_size: 8\n{IO}"),
            None,
        );
    let mut s = TestServer::start(repo.path()).await;

    let index = common::index(&mut s).await;
    let row = |name: &str| {
        index
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} in index"))
    };
    assert_eq!(row("mlp").state, "READY");
    for (name, why) in [
        (
            "bad_syntax",
            "bad_syntax/config.pbtxt: invalid protobuf text format",
        ),
        ("no_weights", "no_weights/1/model.pt: file not found"),
        (
            "onnx",
            "onnx/config.pbtxt: unsupported platform 'onnxruntime_onnx'",
        ),
    ] {
        assert_eq!(row(name).state, "UNAVAILABLE", "{name}");
        assert!(
            row(name).reason.contains(why),
            "{name}: reason {:?} lacks {why:?}",
            row(name).reason
        );
        // Paths are relative to the repository: where it lies is no caller's business.
        let root = repo.path().canonicalize().unwrap();
        for hidden in [repo.path(), root.as_path()] {
            assert!(
                !row(name).reason.contains(&hidden.display().to_string()),
                "{name}: reason {:?} names the repository's location",
                row(name).reason
            );
        }
    }

    let ready_only = s
        .client
        .repository_index(RepositoryIndexRequest {
            ready: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ready_only.into_inner().models.len(), 1);

    // The broken ones answer UNAVAILABLE with their reason; mlp serves.
    let err = s
        .client
        .model_infer(fp32_request("no_weights", "INPUT__0", &[1, 64], &[0.0; 64]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("file not found"),
        "{}",
        err.message()
    );
    let ready = s
        .client
        .model_ready(ModelReadyRequest {
            name: "no_weights".into(),
            version: String::new(),
        })
        .await;
    assert!(!ready.unwrap().into_inner().ready);
    let ok = s
        .client
        .model_infer(fp32_request("mlp", "INPUT__0", &[1, 64], &[0.0; 64]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    s.stop().await;
}

#[tokio::test]
async fn metadata_config_and_http_health() {
    let repo = TestRepo::new();
    repo.bundled("mlp");
    let mut s = TestServer::start(repo.path()).await;

    let meta = s
        .client
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await;
    let meta = meta.unwrap().into_inner();
    assert_eq!(meta.versions, vec!["1"]);
    assert_eq!(meta.platform, "pytorch_libtorch");
    assert_eq!(
        (
            meta.inputs[0].datatype.as_str(),
            meta.inputs[0].shape.as_slice()
        ),
        ("FP32", &[-1, 64][..])
    );
    assert_eq!(meta.outputs[0].shape, vec![-1, 10]);

    let config = s
        .client
        .model_config(ModelConfigRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await;
    let config = config.unwrap().into_inner().config.unwrap();
    assert_eq!((config.name.as_str(), config.max_batch_size), ("mlp", 32));
    assert_eq!(config.instance_group[0].count, 2);
    assert!(
        config.scheduling_choice.is_some(),
        "dynamic_batching is returned"
    );

    let missing = s
        .client
        .model_metadata(ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);

    assert_eq!(http_get(s.http, "/v2/health/live").await.0, 200);
    assert_eq!(http_get(s.http, "/v2/health/ready").await.0, 200);
    assert_eq!(http_get(s.http, "/v2/models/mlp/ready").await.0, 200);
    assert_eq!(
        http_get(s.http, "/v2/models/mlp/versions/1/ready").await.0,
        200
    );
    assert_eq!(
        http_get(s.http, "/v2/models/mlp/versions/2/ready").await.0,
        503
    );
    assert_eq!(http_get(s.http, "/v2/models/nope/ready").await.0, 404);
    s.stop().await;
}
