//! Plain HTTP/1.1 endpoints: health on the HTTP port, Prometheus text on the metrics
//! port. Routing is a pure function so it is tested without sockets.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::edge::{Acceptor, Activity, CLOSE_GRACE};
use crate::config::EdgeLimits;
use crate::gateway::Gateway;

/// What an endpoint answers: status, content type and body.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn ok_if(ok: bool) -> Reply {
        if ok {
            Reply::text(StatusCode::OK, "")
        } else {
            Reply::text(StatusCode::SERVICE_UNAVAILABLE, "")
        }
    }
}

/// A router: method and path in, reply out.
pub type Router = Arc<dyn Fn(&Method, &str) -> Reply + Send + Sync>;

/// KServe v2 health endpoints: `/v2/health/live`, `/v2/health/ready`,
/// `/v2/models/<m>[/versions/<v>]/ready`.
pub fn health_router(gateway: Arc<Gateway>) -> Router {
    Arc::new(move |method, path| {
        if method != Method::GET && method != Method::HEAD {
            return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            ["v2", "health", "live"] => Reply::ok_if(gateway.is_live()),
            ["v2", "health", "ready"] => Reply::ok_if(gateway.is_ready()),
            ["v2", "models", name, "ready"] => model_ready(&gateway, name, ""),
            ["v2", "models", name, "versions", version, "ready"] => {
                model_ready(&gateway, name, version)
            }
            _ => Reply::text(StatusCode::NOT_FOUND, format!("no route for {path}\n")),
        }
    })
}

fn model_ready(gateway: &Gateway, name: &str, version: &str) -> Reply {
    if !gateway.repository.is_known(name) {
        return Reply::text(
            StatusCode::NOT_FOUND,
            format!("model '{name}' is not in the repository\n"),
        );
    }
    Reply::ok_if(gateway.is_ready() && gateway.model(name, version).is_ok())
}

/// `/metrics` in the Prometheus text format. `refresh` sets the gauges that are read at
/// scrape time instead of being updated on every request.
pub fn metrics_router(handle: PrometheusHandle, refresh: Arc<dyn Fn() + Send + Sync>) -> Router {
    Arc::new(move |method, path| match (method, path) {
        (&Method::GET, "/metrics") => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: {
                refresh();
                handle.render()
            },
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "metrics are at GET /metrics\n"),
    })
}

/// Serve `router` on the connections `acceptor` admits until `shutdown` is cancelled.
/// A request's headers must arrive within the header-read timeout; a connection without
/// a request in progress for the idle timeout is closed.
pub async fn serve(
    mut acceptor: Acceptor,
    router: Router,
    limits: EdgeLimits,
    shutdown: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, slot) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = acceptor.next() => accepted,
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        let activity = Activity::new();
        let calls = activity.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let _call = calls.start();
            let reply = router(req.method(), req.uri().path());
            let response = Response::builder()
                .status(reply.status)
                .header(hyper::header::CONTENT_TYPE, reply.content_type)
                .body(Full::new(Bytes::from(reply.body)))
                .expect("status and header are valid");
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let idle_timeout = limits
            .idle_connection_timeout
            .min(limits.header_read_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                // Health probes and scrapers send a request at once; a connection that
                // sends nothing is closed like one that sends half a request.
                _ = activity.idle_for(idle_timeout, idle_timeout) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
                }
            }
        });
    }
}
