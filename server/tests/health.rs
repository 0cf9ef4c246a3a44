//! gRPC health and reflection, through their generated clients: health turns
//! NOT_SERVING when the drain begins (liveness stays SERVING), Watch calls end when it
//! does, and reflection describes the services served.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{fp32_request, TestRepo};
use prost::Message;
use prost_reflect::prost_types::FileDescriptorProto;
use sluice::{Config, Server};
use sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use sluice_proto::inference::ModelInferResponse;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const INFERENCE: &str = "inference.GRPCInferenceService";
const HEALTH: &str = "grpc.health.v1.Health";
/// How long any one expected change may take.
const LIMIT: Duration = Duration::from_secs(5);

/// A server in this process whose shutdown the test starts without waiting for it.
struct Serving {
    grpc: SocketAddr,
    gateway: std::sync::Arc<sluice::gateway::Gateway>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Serving {
    async fn start(repo: &TestRepo) -> Serving {
        let mut config = Config::for_repository(repo.path());
        config.shutdown_grace_period = Duration::from_secs(30);
        let server = Server::bind(config).await.expect("server binds");
        let grpc = server.grpc_addr();
        let gateway = server.gateway();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(shutdown.clone()));
        Serving {
            grpc,
            gateway,
            shutdown,
            task,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .expect("client connects")
    }
}

/// The status Health/Check answers for `service`.
async fn check(
    health: &mut HealthClient<Channel>,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    let answer = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(ServingStatus::try_from(answer.into_inner().status).expect("a known status"))
}

/// Check `service` until it answers `want`, for at most [`LIMIT`].
async fn check_until(health: &mut HealthClient<Channel>, service: &str, want: ServingStatus) {
    let start = std::time::Instant::now();
    loop {
        let got = check(health, service).await;
        if got.as_ref().ok() == Some(&want) {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{service:?} answers {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request to the hanging model `slow`, once the gateway holds it.
async fn hold_a_request(
    server: &Serving,
    channel: Channel,
) -> tokio::task::JoinHandle<Result<tonic::Response<ModelInferResponse>, tonic::Status>> {
    let mut client = GrpcInferenceServiceClient::new(channel);
    let in_flight = tokio::spawn(async move {
        client
            .model_infer(fp32_request("slow", "INPUT__0", &[1, 2], &[-1.0, -2.0]))
            .await
    });
    let gateway = server.gateway.clone();
    common::eventually(LIMIT, "the request reaches the gateway", || {
        gateway.in_flight() > 0
    })
    .await;
    in_flight
}

/// A Watch of `service`, which reports SERVING first.
async fn watch_serving(
    health: &mut HealthClient<Channel>,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let request = HealthCheckRequest {
        service: service.into(),
    };
    let mut watch = health.watch(request).await.unwrap().into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    watch
}

/// The next status a Watch stream reports, within [`LIMIT`].
async fn next_status(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let answer = tokio::time::timeout(LIMIT, watch.next())
        .await
        .expect("a status within the limit")
        .expect("the stream goes on")
        .expect("a status, not an error");
    ServingStatus::try_from(answer.status).expect("a known status")
}

#[tokio::test]
async fn health_turns_not_serving_when_the_drain_begins_and_liveness_stays_serving() {
    let repo = TestRepo::new();
    // A negative input stalls the batch 5 s (warm-up's zeros pass at once).
    repo.synthetic(
        "slow",
        "[ 2 ]",
        4,
        &[("behavior", "hang"), ("hang_ms", "5000")],
    );
    let server = Serving::start(&repo).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());

    for service in ["", INFERENCE, sluice::server::LIVENESS_SERVICE] {
        check_until(&mut health, service, ServingStatus::Serving).await;
    }
    let unknown = check(&mut health, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    let mut watches = vec![
        watch_serving(&mut health, "").await,
        watch_serving(&mut health, INFERENCE).await,
    ];

    // A request in flight keeps the drain going while the checks below run.
    let in_flight = hold_a_request(&server, channel.clone()).await;

    server.shutdown.cancel();
    for watch in &mut watches {
        assert_eq!(next_status(watch).await, ServingStatus::NotServing);
    }
    for service in ["", INFERENCE] {
        assert_eq!(
            check(&mut health, service).await.unwrap(),
            ServingStatus::NotServing,
            "{service:?} while draining"
        );
    }
    // Liveness stays SERVING: a restart now would only cut the drain short.
    assert_eq!(
        check(&mut health, sluice::server::LIVENESS_SERVICE)
            .await
            .unwrap(),
        ServingStatus::Serving
    );
    assert!(!in_flight.is_finished(), "the checks ran during the drain");

    // The drain ends when the request is answered; the open Watch calls end with it, so
    // that the server stops then, not at the end of its grace period.
    let answered = tokio::time::timeout(Duration::from_secs(15), in_flight)
        .await
        .expect("the request finishes")
        .unwrap();
    assert!(answered.is_ok(), "{answered:?}");
    for watch in &mut watches {
        let end = tokio::time::timeout(LIMIT, watch.next()).await;
        assert!(matches!(end, Ok(None)), "the Watch ends: {end:?}");
    }
    tokio::time::timeout(LIMIT, server.task)
        .await
        .expect("the server stops before its grace period ends")
        .unwrap()
        .expect("the server stops cleanly");
}

#[tokio::test]
async fn reflection_lists_the_services_and_describes_the_inference_service() {
    let repo = TestRepo::new();
    repo.synthetic("m", "[ 2 ]", 4, &[]);
    let server = Serving::start(&repo).await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(INFERENCE.into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let MessageResponse::ListServicesResponse(list) = next_answer(&mut answers).await else {
        panic!("a service list first");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in [INFERENCE, HEALTH] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }

    let MessageResponse::FileDescriptorResponse(files) = next_answer(&mut answers).await else {
        panic!("a file descriptor for {INFERENCE}");
    };
    let declares_it = files.file_descriptor_proto.iter().any(|bytes| {
        let file = FileDescriptorProto::decode(bytes.as_slice()).expect("a file descriptor");
        file.package() == "inference"
            && file
                .service
                .iter()
                .any(|s| s.name() == "GRPCInferenceService")
    });
    assert!(declares_it, "no descriptor declares {INFERENCE}");
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server.task)
        .await
        .expect("the server stops")
        .unwrap()
        .expect("the server stops cleanly");
}

/// The next answer on a reflection stream, within [`LIMIT`].
async fn next_answer(
    answers: &mut tonic::Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
) -> MessageResponse {
    tokio::time::timeout(LIMIT, answers.next())
        .await
        .expect("an answer within the limit")
        .expect("an answer")
        .expect("not an error")
        .message_response
        .expect("a message")
}
