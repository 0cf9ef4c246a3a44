//! Admission control seen from a client: deadlines answer DEADLINE_EXCEEDED, a wait
//! predicted past the deadline and a full concurrency limit answer UNAVAILABLE at once
//! with pushback, `priority` parameters that are not non-negative integers are
//! INVALID_ARGUMENT (levels beyond the model's mean its default, as in Triton), and a
//! higher priority sheds queued lower-priority work. The server keeps serving after each.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw_h2::{grpc_header, grpc_status, h2_connect, open_call};
use common::{eventually, f32s, fp32_request, http_get, metric_value, TestRepo, TestServer};
use prost::Message;
use sluice::limit::LimitMode;
use sluice::Config;
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use sluice_proto::inference::infer_parameter::ParameterChoice;
use sluice_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use tonic::Code;

const MS: Duration = Duration::from_millis(1);

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

/// A client that sends `grpc-timeout` but does not enforce it itself. tonic's `Channel`
/// ends such a call locally as CANCELLED at the same instant the server's deadline
/// passes (it starts its timer first, so it usually wins); with this client what the
/// test sees is the server's own answer.
fn lenient_client(grpc: SocketAddr) -> GrpcInferenceServiceClient<HttpClient> {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    GrpcInferenceServiceClient::with_origin(http, format!("http://{grpc}").parse().unwrap())
}

/// A synthetic identity model over `[ 2 ]` (no batch dimension) whose every execution
/// takes `sleep_ms`.
fn slow_model(repo: &TestRepo, name: &str, sleep_ms: u32) {
    repo.synthetic(name, "[ 2 ]", 0, &[("sleep_ms", &sleep_ms.to_string())]);
}

fn with_timeout(req: ModelInferRequest, timeout: Duration) -> tonic::Request<ModelInferRequest> {
    let mut req = tonic::Request::new(req);
    req.set_timeout(timeout);
    req
}

fn pushback_ms(status: &tonic::Status) -> u64 {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap_or_else(|| panic!("no pushback on {status:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_deadline_shorter_than_the_execution_is_deadline_exceeded_then_refused_up_front() {
    const SLEEP: u32 = 250;
    let repo = TestRepo::new();
    slow_model(&repo, "slow", SLEEP);
    let s = TestServer::start(repo.path()).await;
    let mut client = lenient_client(s.grpc);

    // Nothing measured yet (warm-up does not count): the request is queued, and its
    // deadline passes while the model runs.
    let start = Instant::now();
    let err = client
        .model_infer(with_timeout(
            fp32_request("slow", "INPUT__0", &[2], &[1.0, 2.0]),
            MS * 50,
        ))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("deadline exceeded"), "{err:?}");
    assert!(
        took >= MS * 50 && took < MS * (SLEEP - 50),
        "answered at its deadline, not when the model finished: {took:?}"
    );

    // The server goes on serving.
    let ok = client
        .model_infer(fp32_request("slow", "INPUT__0", &[2], &[3.0, 4.0]))
        .await
        .expect("the next request is served");
    assert_eq!(
        f32s(&ok.into_inner().raw_output_contents[0]),
        vec![3.0, 4.0]
    );

    // Now one execution has been measured (at least SLEEP): a deadline shorter than that
    // is refused at once instead of being queued to expire.
    let start = Instant::now();
    let err = client
        .model_infer(with_timeout(
            fp32_request("slow", "INPUT__0", &[2], &[1.0, 2.0]),
            MS * 100,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("predicted wait"), "{err:?}");
    assert!(pushback_ms(&err) >= u64::from(SLEEP), "{err:?}");
    assert!(start.elapsed() < MS * 100, "refused at once");

    // A deadline the execution fits in is served.
    let ok = client
        .model_infer(with_timeout(
            fp32_request("slow", "INPUT__0", &[2], &[5.0, 6.0]),
            Duration::from_secs(5),
        ))
        .await
        .expect("a long enough deadline is served");
    assert_eq!(
        f32s(&ok.into_inner().raw_output_contents[0]),
        vec![5.0, 6.0]
    );
    s.stop().await;
}

const PRIORITIES: &str = r#"
backend: "sluice_synthetic"
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { priority_levels: 2 default_priority_level: 2 }
"#;

fn with_priority(choice: Option<ParameterChoice>) -> ModelInferRequest {
    let mut req = fp32_request("ranked", "INPUT__0", &[1, 2], &[1.0, 2.0]);
    if let Some(choice) = choice {
        req.parameters.insert(
            "priority".into(),
            InferParameter {
                parameter_choice: Some(choice),
            },
        );
    }
    req
}

#[tokio::test]
async fn priority_parameters_are_checked_and_levels_beyond_the_models_mean_the_default() {
    let repo = TestRepo::new();
    repo.model("ranked", PRIORITIES, None);
    let mut s = TestServer::start(repo.path()).await;

    let refused = [
        (ParameterChoice::StringParam("1".into()), "'priority'"),
        (ParameterChoice::Int64Param(-1), "'priority'"),
        (ParameterChoice::BoolParam(true), "'priority'"),
    ];
    for (choice, part) in refused {
        let err = s
            .client
            .model_infer(with_priority(Some(choice.clone())))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{choice:?}: {err:?}");
        assert!(err.message().contains("'ranked'"), "{err:?}");
        assert!(err.message().contains(part), "{choice:?}: {err:?}");
    }
    let admitted = || async {
        let (_, body) = http_get(s.metrics, "/metrics").await;
        [1, 2].map(|level| {
            let label = format!("model=\"ranked\",priority=\"{level}\"");
            body.lines()
                .filter(|l| l.starts_with("sluice_admitted_requests_total{") && l.contains(&label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
    };
    let before = admitted().await;

    // Every level is served; 0, none at all and levels beyond the model's two (as in
    // Triton) run at the default level, 2.
    let accepted = [
        None,
        Some(ParameterChoice::Int64Param(0)),
        Some(ParameterChoice::Int64Param(1)),
        Some(ParameterChoice::Uint64Param(2)),
        Some(ParameterChoice::Int64Param(3)),
        Some(ParameterChoice::Uint64Param(7)),
    ];
    for choice in accepted {
        let ok = s
            .client
            .model_infer(with_priority(choice.clone()))
            .await
            .unwrap_or_else(|e| panic!("{choice:?} refused: {e:?}"));
        assert_eq!(
            f32s(&ok.into_inner().raw_output_contents[0]),
            vec![1.0, 2.0]
        );
    }
    let after = admitted().await;
    assert_eq!(after[0] - before[0], 1.0, "only priority 1 runs at level 1");
    assert_eq!(
        after[1] - before[1],
        5.0,
        "the rest runs at the default level"
    );
    s.stop().await;
}

/// Requests of `model` refused for `reason`, summed over priority levels.
async fn rejected(metrics: SocketAddr, model: &str, reason: &str) -> f64 {
    let (_, body) = http_get(metrics, "/metrics").await;
    let (model, reason) = (format!("model=\"{model}\""), format!("reason=\"{reason}\""));
    body.lines()
        .filter(|l| l.starts_with("sluice_rejected_requests_total{"))
        .filter(|l| l.contains(&model) && l.contains(&reason))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn over_the_models_concurrency_limit_a_request_is_refused_at_once() {
    const SLEEP: u32 = 300;
    let repo = TestRepo::new();
    slow_model(&repo, "held", SLEEP);
    let mut config = Config::for_repository(repo.path());
    config.admission.model_limit.mode = LimitMode::Static;
    config.admission.model_limit.max = 2;
    let mut s = TestServer::start_with(config).await;
    let before = rejected(s.metrics, "held", "concurrency_limit").await;

    // Two requests in flight: one running, one queued behind it.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut client = s.client.clone();
        held.push(tokio::spawn(async move {
            client
                .model_infer(fp32_request("held", "INPUT__0", &[2], &[i as f32, 0.0]))
                .await
        }));
    }
    let model = s.gateway.model("held", "").unwrap();
    eventually(Duration::from_secs(2), "two requests in flight", || {
        model.limit.in_flight() == 2
    })
    .await;

    let start = Instant::now();
    let err = s
        .client
        .model_infer(fp32_request("held", "INPUT__0", &[2], &[9.0, 9.0]))
        .await
        .unwrap_err();
    assert!(start.elapsed() < MS * (SLEEP / 2), "refused at once");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("concurrency limit"), "{err:?}");
    assert!(pushback_ms(&err) > 0, "{err:?}");
    assert_eq!(
        rejected(s.metrics, "held", "concurrency_limit").await,
        before + 1.0
    );

    // Both held requests are served; then the limit has room again.
    for (i, h) in held.into_iter().enumerate() {
        let out = h.await.unwrap().expect("held requests are served");
        assert_eq!(
            f32s(&out.into_inner().raw_output_contents[0]),
            vec![i as f32, 0.0]
        );
    }
    assert_eq!(model.limit.in_flight(), 0);
    s.client
        .model_infer(fp32_request("held", "INPUT__0", &[2], &[1.0, 1.0]))
        .await
        .expect("served once the limit has room");
    s.stop().await;
}

/// One request of `model` (values 1 and 2) sent and held in flight by the model's slow
/// execution: resolves once the model's limit counts it.
async fn hold_one(
    s: &TestServer,
    model: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<ModelInferResponse>, tonic::Status>> {
    let mut client = s.client.clone();
    let name = model.to_owned();
    let held = tokio::spawn(async move {
        client
            .model_infer(fp32_request(&name, "INPUT__0", &[2], &[1.0, 2.0]))
            .await
    });
    let model = s.gateway.model(model, "").unwrap();
    eventually(Duration::from_secs(2), "one request in flight", || {
        model.limit.in_flight() == 1
    })
    .await;
    held
}

#[tokio::test]
async fn a_refusal_needs_only_the_first_bytes_of_the_body() {
    const SLEEP: u32 = 300;
    let repo = TestRepo::new();
    slow_model(&repo, "early", SLEEP);
    let mut config = Config::for_repository(repo.path());
    config.admission.model_limit.mode = LimitMode::Static;
    config.admission.model_limit.min = 1;
    config.admission.model_limit.max = 1;
    let s = TestServer::start_with(config).await;
    let held = hold_one(&s, "early").await;
    let before = rejected(s.metrics, "early", "concurrency_limit").await;
    let edge = "sluice_refusal_duration_seconds_count{stage=\"edge\"}";
    let edge_before = metric_value(s.metrics, edge).await.unwrap_or(0.0);

    // A request announced as 64 KiB of which only its first bytes (its name, then the
    // start of its tensors) ever arrive: the full path would wait for the rest until
    // the body-read timeout.
    let wire = fp32_request("early", "INPUT__0", &[2], &[9.0, 9.0]).encode_to_vec();
    let mut h2 = h2_connect(s.grpc).await;
    let (response, mut body) = open_call(&mut h2, INFER, None).await;
    body.send_data(grpc_header(64 * 1024), false).unwrap();
    body.send_data(wire.into(), false).unwrap();
    let start = Instant::now();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(start.elapsed() < MS * (SLEEP / 2), "refused at once");
    assert!(message.contains("concurrency limit"), "{message}");
    // Counted once, as every refusal; timed under the edge's stage (other tests of this
    // binary may add to that unlabelled-by-model histogram too).
    assert_eq!(
        rejected(s.metrics, "early", "concurrency_limit").await,
        before + 1.0
    );
    assert!(metric_value(s.metrics, edge).await.unwrap_or(0.0) >= edge_before + 1.0);

    let out = held.await.unwrap().expect("the held request is served");
    assert_eq!(
        f32s(&out.into_inner().raw_output_contents[0]),
        vec![1.0, 2.0]
    );

    // With room again, a request whose header fields arrive in pieces, with a pause
    // between them, is read whole and served.
    let wire = fp32_request("early", "INPUT__0", &[2], &[3.0, 4.0]).encode_to_vec();
    let (response, mut body) = open_call(&mut h2, INFER, None).await;
    body.send_data(grpc_header(wire.len() as u32), false)
        .unwrap();
    body.send_data(bytes::Bytes::copy_from_slice(&wire[..3]), false)
        .unwrap();
    tokio::time::sleep(MS * 50).await;
    body.send_data(bytes::Bytes::copy_from_slice(&wire[3..]), true)
        .unwrap();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::Ok, "{message}");
    assert_eq!(
        rejected(s.metrics, "early", "concurrency_limit").await,
        before + 1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn a_full_server_refuses_from_the_headers_frame() {
    const SLEEP: u32 = 300;
    let repo = TestRepo::new();
    slow_model(&repo, "busy", SLEEP);
    let mut config = Config::for_repository(repo.path());
    config.admission.max_in_flight = 1;
    let mut s = TestServer::start_with(config).await;
    let held = hold_one(&s, "busy").await;
    let before = rejected(s.metrics, "_all", "in_flight_limit").await;

    // HEADERS only: not one byte of the body is ever sent.
    let mut h2 = h2_connect(s.grpc).await;
    let (response, _body) = open_call(&mut h2, INFER, None).await;
    let start = Instant::now();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(start.elapsed() < MS * (SLEEP / 2), "refused at once");
    assert!(message.contains("in-flight request limit"), "{message}");
    assert_eq!(
        rejected(s.metrics, "_all", "in_flight_limit").await,
        before + 1.0
    );

    held.await.unwrap().expect("the held request is served");
    s.client
        .model_infer(fp32_request("busy", "INPUT__0", &[2], &[3.0, 4.0]))
        .await
        .expect("served once a slot is free");
    s.stop().await;
}

#[tokio::test]
async fn a_closed_loop_without_deadlines_is_not_refused_and_is_not_overload() {
    const SLEEP: u32 = 20;
    const CLIENTS: usize = 24;
    let repo = TestRepo::new();
    // One instance, no batching: 24 closed-loop clients queue behind each other for up
    // to half a second, far past the limit's target of four executions (80 ms).
    slow_model(&repo, "queued", SLEEP);
    let mut config = Config::for_repository(repo.path());
    config.admission.model_limit.min = 2;
    config.admission.model_limit.max = 256;
    let s = TestServer::start_with(config).await;
    let model = s.gateway.model("queued", "").unwrap();
    let mut failures = Vec::new();
    for round in 0..4 {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let mut client = s.client.clone();
                tokio::spawn(async move {
                    client
                        .model_infer(fp32_request("queued", "INPUT__0", &[2], &[i as f32, 1.0]))
                        .await
                })
            })
            .collect();
        for c in clients {
            if let Err(e) = c.await.unwrap() {
                failures.push((round, e.code(), e.message().to_owned()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "requests without a deadline were refused: {failures:?}"
    );
    // A fixed set of clients, each waiting for its answer, never asks more of the
    // model than it serves: however long the queue, that is not overload, and the limit
    // stays where it was.
    assert_eq!(model.limit.limit(), 256);
    s.stop().await;
}

#[tokio::test]
async fn a_higher_priority_request_over_the_limit_sheds_a_queued_lower_one_at_once() {
    const SLEEP: u32 = 200;
    let repo = TestRepo::new();
    repo.model(
        "ranked_slow",
        &format!(
            "backend: \"sluice_synthetic\"\nmax_batch_size: 1\n\
             input [ {{ name: \"INPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n\
             output [ {{ name: \"OUTPUT__0\" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n\
             dynamic_batching {{ priority_levels: 2 default_priority_level: 2 }}\n\
             parameters {{ key: \"sleep_ms\" value: {{ string_value: \"{SLEEP}\" }} }}\n"
        ),
        None,
    );
    let mut config = Config::for_repository(repo.path());
    config.admission.model_limit.mode = LimitMode::Static;
    // Level 1 may use all 4 slots, level 2 (the default) half of them.
    config.admission.model_limit.max = 4;
    let s = TestServer::start_with(config).await;
    let model = s.gateway.model("ranked_slow", "").unwrap();
    let send = |value: f32, priority: Option<i64>| {
        let mut client = s.client.clone();
        let mut req = fp32_request("ranked_slow", "INPUT__0", &[1, 2], &[value, value]);
        if let Some(p) = priority {
            req.parameters.insert(
                "priority".into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(p)),
                },
            );
        }
        tokio::spawn(async move { client.model_infer(req).await })
    };
    let in_flight = |n: usize| {
        let model = model.clone();
        async move {
            eventually(Duration::from_secs(2), &format!("{n} in flight"), || {
                model.limit.in_flight() == n
            })
            .await
        }
    };

    // Level 2 fills its share: one running, one queued.
    let running = send(1.0, None);
    in_flight(1).await;
    let queued = send(2.0, None);
    in_flight(2).await;
    // Level 1 takes the rest of the limit without shedding anything.
    let high: Vec<_> = (3..5).map(|v| send(v as f32, Some(1))).collect();
    in_flight(4).await;
    // The limit is full, but half of it is level 2: one more level-1 request gets in and
    // the queued level-2 request is shed for it, at once.
    let start = Instant::now();
    let preempting = send(5.0, Some(1));
    let err = queued.await.unwrap().unwrap_err();
    assert!(start.elapsed() < MS * (SLEEP / 2), "shed at once");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("priority level 1"), "{err:?}");
    assert!(pushback_ms(&err) > 0, "{err:?}");
    assert_eq!(rejected(s.metrics, "ranked_slow", "preempted").await, 1.0);

    // Everything else is served, each with its own values.
    let served = [1.0, 3.0, 4.0]
        .into_iter()
        .zip(std::iter::once(running).chain(high));
    for (value, h) in served {
        let out = h.await.unwrap().expect("served");
        assert_eq!(
            f32s(&out.into_inner().raw_output_contents[0]),
            vec![value, value]
        );
    }
    let out = preempting
        .await
        .unwrap()
        .expect("the preempting request is served");
    assert_eq!(
        f32s(&out.into_inner().raw_output_contents[0]),
        vec![5.0, 5.0]
    );
    eventually(Duration::from_secs(2), "every slot given back", || {
        model.limit.in_flight() == 0
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn calls_their_clients_abandon_count_as_unserved_and_shrink_the_limit() {
    // One request at a time, 50 ms each: calls queue behind the one running.
    let repo = TestRepo::new();
    slow_model(&repo, "abandoned", 50);
    let mut config = Config::for_repository(repo.path());
    config.admission.model_limit.target = Some(MS);
    let s = TestServer::start_with(config).await;
    let model = s.gateway.model("abandoned", "").unwrap();
    let max = model.limit.limit();
    // Two waves of calls, each abandoned by its client after 30 ms (no deadline is
    // sent: the server never ends them itself), the second wave after the first's
    // window (ten targets) has passed. Every call waited and none was served: an
    // overload seen only through the clients giving up. Abandoned calls that never
    // counted would leave the limit where it was.
    for _ in 0..2 {
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let mut client = s.client.clone();
                let req = fp32_request("abandoned", "INPUT__0", &[2], &[1.0, 2.0]);
                tokio::spawn(async move {
                    tokio::time::timeout(MS * 30, client.model_infer(req))
                        .await
                        .is_err()
                })
            })
            .collect();
        let mut abandoned = 0;
        for call in calls {
            abandoned += usize::from(call.await.expect("call task"));
        }
        assert!(abandoned >= 15, "{abandoned} of 16 abandoned");
        tokio::time::sleep(MS * 20).await;
    }
    eventually(Duration::from_secs(5), "the limit shrinks", || {
        model.limit.limit() < max
    })
    .await;
    // The server goes on serving.
    let mut client = s.client.clone();
    client
        .model_infer(fp32_request("abandoned", "INPUT__0", &[2], &[3.0, 4.0]))
        .await
        .expect("served");
    s.stop().await;
}
