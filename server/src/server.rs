//! Start-up and shutdown: load the repository, bind the three listeners, serve until the
//! shutdown token fires, then drain within the grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sluice_proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission;
use crate::api::{edge, grpc::InferenceService, http, rest};
use crate::config::{Config, EdgeLimits};
use crate::gateway::Gateway;
use crate::metrics;
use crate::model::LoadOptions;
use crate::repository::Repository;

/// A server with its repository loaded and its ports bound, not yet serving.
pub struct Server {
    config: Config,
    gateway: Arc<Gateway>,
    grpc: TcpListener,
    http: TcpListener,
    metrics: TcpListener,
    tls: PortTls,
}

/// TLS of the gRPC and HTTP ports (the metrics port stays plain).
#[derive(Default)]
struct PortTls {
    grpc: Option<Arc<edge::Tls>>,
    http: Option<Arc<edge::Tls>>,
}

impl PortTls {
    /// Read the TLS files now, so that a bad certificate stops the start.
    fn load(config: &Config) -> anyhow::Result<PortTls> {
        let Some(files) = &config.tls else {
            return Ok(PortTls::default());
        };
        let port = |alpn| edge::Tls::new(files.clone(), alpn).map_err(anyhow::Error::msg);
        Ok(PortTls {
            grpc: Some(port(edge::ALPN_H2)?),
            http: Some(port(edge::ALPN_HTTP1)?),
        })
    }
}

/// The gRPC health service name that reports liveness (ServerLive), for probes.
pub const LIVENESS_SERVICE: &str = "liveness";
/// The gRPC health service names that report readiness: the server's (`""`) and the
/// inference service's.
const READINESS_SERVICES: [&str; 2] = [
    "",
    <GrpcInferenceServiceServer<InferenceService> as tonic::server::NamedService>::NAME,
];
/// How often liveness is re-read for the gRPC health service.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the metrics recorder compacts its histograms.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

impl Server {
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let tls = PortTls::load(&config).context("cannot set up TLS")?;
        let root = config.model_repository.clone();
        let options = LoadOptions {
            backend: config.backend,
            defaults: config.models,
            admission: config.admission,
        };
        let control = config.control.clone();
        let repository =
            tokio::task::spawn_blocking(move || Repository::open(&root, options, &control))
                .await
                .context("repository loader panicked")?
                .map_err(anyhow::Error::msg)?;
        let bind = |port: u16, what: &'static str| {
            let addr = SocketAddr::new(config.host, port);
            async move {
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot bind {what} port {addr}"))
            }
        };
        let grpc = bind(config.grpc_port, "gRPC").await?;
        let http = bind(config.http_port, "HTTP").await?;
        let metrics = bind(config.metrics_port, "metrics").await?;
        Ok(Server {
            gateway: Gateway::new(repository),
            config,
            grpc,
            http,
            metrics,
            tls,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.gateway.clone()
    }

    /// Serve until `shutdown` is cancelled. Then readiness and gRPC health turn
    /// NOT_SERVING, new inference is refused, and in-flight calls get up to the grace
    /// period to finish.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            config,
            gateway,
            grpc,
            http,
            metrics,
            tls,
        } = self;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let prometheus = metrics::install();
        let upkeep = spawn_metrics_upkeep(prometheus.clone(), shutdown.clone());

        let (health, health_service) = tonic_health::server::health_reporter();
        let global = admission::global_limit(&config.admission);
        let inference = InferenceService::shared(&gateway, &config, global.clone());
        let routes = grpc_routes(&config, inference.clone(), &health, health_service).await?;
        let liveness = spawn_liveness(health.clone(), gateway.clone(), shutdown.clone());
        let poll = crate::repository::poll::spawn(gateway.clone(), &config, shutdown.clone());

        let grpc_edge = grpc_edge(&config, &gateway, global);
        // Plain HTTP endpoints stop only after the gRPC drain, so probes see NOT_SERVING.
        let http_stop = CancellationToken::new();
        let rest = Arc::new(rest::Rest::new(
            &config,
            inference,
            &gateway,
            &grpc_edge.budget,
        ));
        let http_tasks = spawn_http(
            &config,
            (http, metrics),
            (rest, tls.http),
            prometheus,
            &http_stop,
        );
        let drain_start = CancellationToken::new();
        let grpc_task = tokio::spawn(serve_grpc(
            grpc,
            routes,
            grpc_edge,
            config.edge,
            tls.grpc,
            drain_start.clone(),
        ));
        gateway.set_ready();
        tracing::info!(
            grpc = %config.host, grpc_port = config.grpc_port, http_port = config.http_port,
            metrics_port = config.metrics_port, "serving"
        );

        shutdown.cancelled().await;
        let grace = config.shutdown_grace_period;
        drain(&gateway, &health, grace, drain_start, grpc_task).await;
        http_stop.cancel();
        let _ = tokio::join!(http_tasks.0, http_tasks.1, upkeep, liveness, poll);
        Ok(())
    }
}

/// The gRPC port's edge; when the server sheds load (it has a global limit), it refuses
/// inference calls early from the shared limits.
fn grpc_edge(
    config: &Config,
    gateway: &Arc<Gateway>,
    global: Option<Arc<tokio::sync::Semaphore>>,
) -> edge::GrpcEdge {
    let edge = edge::GrpcEdge::new(
        &config.edge,
        config.max_message_bytes,
        config.admission.deadline,
    );
    match global {
        Some(global) => edge.with_early_refusal(edge::EarlyRefusal {
            gateway: gateway.clone(),
            global,
        }),
        None => edge,
    }
}

/// The gRPC services: inference (with the admission stack and message-size limits),
/// health (reported SERVING from now) and reflection.
async fn grpc_routes(
    config: &Config,
    inference: Arc<InferenceService>,
    health: &tonic_health::server::HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<tonic::service::Routes> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let inference = GrpcInferenceServiceServer::from_arc(inference)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    report_readiness(health, tonic_health::ServingStatus::Serving).await;
    Ok(tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(inference)
        .prepare())
}

/// The REST endpoints on the HTTP port and `/metrics` on the metrics port, until `stop`.
fn spawn_http(
    config: &Config,
    (http, metrics): (TcpListener, TcpListener),
    (rest, tls): (Arc<rest::Rest>, Option<Arc<edge::Tls>>),
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    stop: &CancellationToken,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let budget = rest.budget.clone();
    let gateway = rest.gateway.clone();
    let refresh_gauges: Arc<dyn Fn() + Send + Sync> = Arc::new(move || budget.report());
    let serve = |listener, name, router, tls| {
        let acceptor = edge::Acceptor::new(listener, name, config.edge.max_http_connections);
        tokio::spawn(http::serve(
            acceptor,
            router,
            config.edge,
            tls,
            stop.clone(),
        ))
    };
    (
        serve(http, "http", rest.handler(), tls),
        serve(
            metrics,
            "metrics",
            http::handler(http::metrics_router(prometheus, refresh_gauges, gateway)),
            None,
        ),
    )
}

/// Keeps the metrics' histograms and gauges current until `stop`.
fn spawn_metrics_upkeep(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    })
}

/// Liveness for probes that speak gRPC health: NOT_SERVING while a model is wedged
/// (every instance stuck), so the orchestrator restarts the process. It stays SERVING
/// while draining: a restart then would only cut the drain short.
fn spawn_liveness(
    health: tonic_health::server::HealthReporter,
    gateway: Arc<Gateway>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LIVENESS_INTERVAL);
        let mut was_live = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let live = gateway.is_live();
            if was_live != Some(live) {
                health
                    .set_service_status(LIVENESS_SERVICE, liveness_status(live))
                    .await;
                was_live = Some(live);
            }
        }
    })
}

/// Report `status` for every readiness service name.
async fn report_readiness(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for service in READINESS_SERVICES {
        health.set_service_status(service, status).await;
    }
}

fn liveness_status(live: bool) -> tonic_health::ServingStatus {
    if live {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    }
}

/// Refuse new inference, report NOT_SERVING, let admitted work finish within `grace`,
/// then close the gRPC transport. While admitted work finishes the transport stays up,
/// so that new calls get a precise UNAVAILABLE (not a reset connection).
async fn drain(
    gateway: &Gateway,
    health: &tonic_health::server::HealthReporter,
    grace: std::time::Duration,
    drain_start: CancellationToken,
    grpc_task: tokio::task::JoinHandle<()>,
) {
    tracing::info!(
        grace_period_secs = grace.as_secs(),
        "shutting down: draining in-flight work"
    );
    let deadline = tokio::time::Instant::now() + grace;
    gateway.begin_shutdown();
    report_readiness(health, tonic_health::ServingStatus::NotServing).await;
    if tokio::time::timeout_at(deadline, gateway.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = gateway.in_flight(),
            "grace period over with requests in flight; exiting"
        );
    }
    // A health Watch is a call that never ends by itself, and an open call keeps its
    // connection from closing: forget the statuses, which ends every Watch, then set
    // them again for the Checks that come while the connections close.
    let mut watched = health.clone();
    for service in READINESS_SERVICES.into_iter().chain([LIVENESS_SERVICE]) {
        watched.clear_service_status(service).await;
    }
    report_readiness(&watched, tonic_health::ServingStatus::NotServing).await;
    watched
        .set_service_status(LIVENESS_SERVICE, liveness_status(gateway.is_live()))
        .await;
    drain_start.cancel();
    match tokio::time::timeout_at(deadline, grpc_task).await {
        Ok(Ok(())) => tracing::info!("drained"),
        Ok(Err(e)) => tracing::error!(error = %e, "gRPC server task failed"),
        Err(_) => tracing::warn!("grace period over with connections still open; exiting"),
    }
}

/// Largest HTTP/2 DATA frame a client may send (the protocol allows up to 16 MiB - 1).
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Serve gRPC (HTTP/2) connections on `listener` until `stop`, then close them
/// gracefully (in-flight calls finish, then GOAWAY). Connections are served here rather
/// than by tonic's transport server so that the edge ([`edge`]) bounds connections,
/// streams and request bodies, and so that the `grpc-timeout` header is enforced by the
/// edge and the admission stack, which answer DEADLINE_EXCEEDED (tonic's transport
/// answers an expired call CANCELLED).
async fn serve_grpc(
    listener: TcpListener,
    routes: tonic::service::Routes,
    edge_config: edge::GrpcEdge,
    limits: EdgeLimits,
    tls: Option<Arc<edge::Tls>>,
    stop: CancellationToken,
) {
    let builder = http2_builder(&limits);
    let mut acceptor = edge::Acceptor::new(listener, "grpc", limits.max_connections);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, slot) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = acceptor.next() => accepted,
        };
        // No Nagle delay: small responses go out at once (with Nagle and delayed ACKs a
        // reply can sit 40 ms in the socket).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let activity = edge::Activity::new();
        let service = hyper_util::service::TowerToHyperService::new(edge::GrpcEdgeService {
            inner: routes.clone(),
            edge: edge_config.clone(),
            activity: activity.clone(),
        });
        let connection = GrpcConnection {
            builder: builder.clone(),
            tls: tls.clone(),
            activity,
            limits,
            stop: stop.clone(),
        };
        connections.spawn(connection.serve(stream, slot, service));
    }
    drop(acceptor);
    connections.close();
    connections.wait().await;
}

/// The gRPC port's service, as hyper serves it.
type GrpcService =
    hyper_util::service::TowerToHyperService<edge::GrpcEdgeService<tonic::service::Routes>>;

/// What serving one gRPC connection needs.
struct GrpcConnection {
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    tls: Option<Arc<edge::Tls>>,
    activity: Arc<edge::Activity>,
    limits: EdgeLimits,
    stop: CancellationToken,
}

impl GrpcConnection {
    /// TLS handshake (on a TLS port), then HTTP/2 until the client leaves, the server
    /// stops (graceful close) or the connection is idle too long.
    async fn serve(
        self,
        stream: tokio::net::TcpStream,
        slot: edge::ConnectionSlot,
        service: GrpcService,
    ) {
        let _slot = slot;
        let idle_timeout = self.limits.idle_connection_timeout;
        let first_call_timeout = self.limits.header_read_timeout.min(idle_timeout);
        let tls = self.tls.as_deref();
        let Some(stream) = edge::Conn::accept(stream, tls, first_call_timeout).await else {
            return;
        };
        let connection = self.builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = self.stop.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            _ = self.activity.idle_for(first_call_timeout, idle_timeout) => {
                tracing::debug!("closing an idle gRPC connection");
                connection.as_mut().graceful_shutdown();
                // A client that never finished its handshake never answers either.
                tokio::time::timeout(edge::CLOSE_GRACE, connection)
                    .await
                    .unwrap_or(Ok(()))
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "gRPC connection ended with an error");
        }
    }
}

/// The HTTP/2 settings of the gRPC port. Large DATA frames: a client may send a whole
/// tensor in one frame (one write and one read instead of one per 16 KiB, the HTTP/2
/// default). Streams per connection, header size and resets a client may cause are
/// bounded; keepalive pings find peers that vanished without closing.
fn http2_builder(limits: &EdgeLimits) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http2_only();
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_bytes)
        .max_pending_accept_reset_streams(limits.http2_max_pending_reset_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_frame_size(MAX_FRAME_BYTES);
    builder
}
