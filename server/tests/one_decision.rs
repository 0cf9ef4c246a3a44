//! Admission decides once per request: the model version, the deadline, the priority
//! level and the limit's slot, as one value that the request runs with.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{TestRepo, TestServer};
use sluice::admission::{admit, InferCall, Timed};
use sluice::model::{InferRequest, RequestInput};

fn call(model: &str, priority: Option<u64>) -> InferCall {
    let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    InferCall {
        model: model.into(),
        version: String::new(),
        request: InferRequest {
            id: "r".into(),
            inputs: vec![RequestInput {
                name: "INPUT__0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                data: Bytes::from(values),
            }],
            priority,
            ..InferRequest::default()
        },
        header_timeout: None,
        received: tokio::time::Instant::now(),
    }
}

#[tokio::test]
async fn a_reload_between_admission_and_dispatch_cannot_split_a_request() {
    let repo = TestRepo::new();
    repo.synthetic("m", "[ 4 ]", 8, &[]);
    let s = TestServer::start(repo.path()).await;
    let gateway = s.gateway.clone();

    let admitted = admit(
        &gateway,
        Timed {
            call: call("m", None),
            deadline: None,
        },
        true,
    )
    .expect("admitted");
    let v1 = admitted.admission.model.clone();
    assert_eq!(v1.version, 1);
    assert_eq!(v1.limit.in_flight(), 1, "the slot is version 1's");

    // Version 2 appears and the model reloads before the request reaches the queue.
    std::fs::create_dir_all(repo.path().join("m/2")).expect("version dir");
    let reloading = Arc::clone(&gateway);
    tokio::task::spawn_blocking(move || reloading.repository.load("m", None))
        .await
        .expect("load task")
        .expect("reloaded");
    let v2 = gateway.model("m", "").expect("served");
    assert_eq!(v2.version, 2, "new requests go to version 2");
    assert_eq!(v2.limit.in_flight(), 0);

    // The admitted request runs on the version it was admitted on, and gives that
    // version's slot back.
    let response = gateway
        .infer(admitted.call.request, admitted.admission)
        .await
        .expect("answered by version 1");
    assert_eq!(response.version, 1);
    assert_eq!(v1.limit.in_flight(), 0);
    assert_eq!(v2.limit.in_flight(), 0);
    assert_eq!(v1.statistics().inference_count, 1);
    assert_eq!(v2.statistics().inference_count, 0);
    s.stop().await;
}

#[tokio::test]
async fn the_priority_level_is_resolved_once_within_the_models_levels() {
    let repo = TestRepo::new();
    let config = "backend: \"sluice_synthetic\"\nmax_batch_size: 8\n\
        input [ { name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 4 ] } ]\n\
        output [ { name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 4 ] } ]\n\
        dynamic_batching { priority_levels: 3 default_priority_level: 2 }\n";
    repo.model("p", config, None);
    let s = TestServer::start(repo.path()).await;
    for (asked, level) in [
        (None, 2),
        (Some(0), 2),
        (Some(1), 1),
        (Some(3), 3),
        (Some(9), 2),
    ] {
        let timed = Timed {
            call: call("p", asked),
            deadline: None,
        };
        let admitted = admit(&s.gateway, timed, true).expect("admitted");
        assert_eq!(admitted.admission.level, level, "priority {asked:?}");
        let response = s
            .gateway
            .infer(admitted.call.request, admitted.admission)
            .await
            .expect("answered");
        assert_eq!(response.version, 1);
    }
    s.stop().await;
}

#[tokio::test]
async fn an_unknown_model_is_refused_at_admission_with_not_found() {
    let repo = TestRepo::new();
    repo.synthetic("m", "[ 4 ]", 8, &[]);
    let s = TestServer::start(repo.path()).await;
    let timed = Timed {
        call: call("nope", None),
        deadline: None,
    };
    let err = admit(&s.gateway, timed, true).expect_err("no such model");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);
    s.stop().await;
}
