//! Serving HTTP/1.1 connections (the REST port and the metrics port), and `/metrics` in
//! the Prometheus text format. The metrics route is a pure function, tested without
//! sockets.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::edge::{Acceptor, Activity, Conn, Tls, TrackedBody, CLOSE_GRACE};
use crate::config::EdgeLimits;
use crate::gateway::Gateway;

/// Read buffer of an HTTP/1.1 connection: bounds a request's line and headers.
const HTTP1_BUFFER_BYTES: usize = 64 * 1024;

/// What an endpoint answers: status, content type and body.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    fn ok_if(ok: bool) -> Reply {
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Reply::text(status, "")
    }

    fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// The reply as an HTTP response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        Response::builder()
            .status(self.status)
            .header(hyper::header::CONTENT_TYPE, self.content_type)
            .body(Full::new(Bytes::from(self.body)))
            .expect("status and header are valid")
    }
}

/// A router: method and path in, reply out.
pub type Router = Arc<dyn Fn(&Method, &str) -> Reply + Send + Sync>;

/// What answers one HTTP request, whole (a response is built in memory and sent).
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// A [`Router`] as a [`Handler`]: the request's body is not read.
pub fn handler(router: Router) -> Handler {
    Arc::new(move |req: Request<Incoming>| {
        let response = router(req.method(), req.uri().path()).into_response();
        Box::pin(async move { response })
    })
}

/// `/metrics` in the Prometheus text format, and `/v2/health/live|ready` for probes that
/// cannot speak TLS (the metrics port stays plain when the others use TLS). `refresh`
/// sets the gauges that are read at scrape time instead of being updated on every
/// request.
pub fn metrics_router(
    handle: PrometheusHandle,
    refresh: Arc<dyn Fn() + Send + Sync>,
    gateway: Arc<Gateway>,
) -> Router {
    Arc::new(move |method, path| match (method, path) {
        (&Method::GET, "/metrics") => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: {
                refresh();
                handle.render()
            },
        },
        (&Method::GET | &Method::HEAD, "/v2/health/live") => Reply::ok_if(gateway.is_live()),
        (&Method::GET | &Method::HEAD, "/v2/health/ready") => Reply::ok_if(gateway.is_ready()),
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            "metrics are at GET /metrics, health at GET /v2/health/live and /v2/health/ready\n",
        ),
    })
}

/// The HTTP/1.1 settings: a request's headers within the header-read timeout, its
/// request line and headers within [`HTTP1_BUFFER_BYTES`] (431 otherwise).
fn http1_builder(limits: &EdgeLimits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(HTTP1_BUFFER_BYTES);
    builder
}

/// Serve `handler` on the connections `acceptor` admits until `shutdown` is cancelled.
/// A request's headers must arrive within the header-read timeout; a connection without
/// a request in progress for the idle timeout is closed.
pub async fn serve(
    mut acceptor: Acceptor,
    handler: Handler,
    limits: EdgeLimits,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let builder = http1_builder(&limits);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, slot) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = acceptor.next() => accepted,
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let activity = Activity::new();
        let calls = activity.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let call = calls.start();
            let response = handler(req);
            // The call stays active until its response has been sent, so that the idle
            // timer does not close a connection still writing a large answer.
            async move { Ok::<_, Infallible>(response.await.map(|b| TrackedBody::new(b, call))) }
        });
        let idle_timeout = limits
            .idle_connection_timeout
            .min(limits.header_read_timeout);
        let (builder, tls) = (builder.clone(), tls.clone());
        connections.spawn(async move {
            let _slot = slot;
            let Some(stream) = Conn::accept(stream, tls.as_deref(), idle_timeout).await else {
                return;
            };
            let conn = builder.serve_connection(TokioIo::new(stream), service);
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
    // Answers being written when the server stops are finished (each connection closes
    // gracefully on `shutdown`), for at most the close grace.
    drop(acceptor);
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
}
