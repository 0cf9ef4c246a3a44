//! The transport edge: what the server accepts from the network before any handler sees
//! a request. It owns the accept loops of every port (connection caps, accept errors
//! backed off with rate-limited logs), the HTTP/2 settings of the gRPC port (streams per
//! connection, header list size, keepalive, rapid-reset protection), closing idle
//! connections, and the request bodies of gRPC calls:
//!
//! - each message's 5-byte gRPC header is read as it arrives; a length over the
//!   method's limit is refused RESOURCE_EXHAUSTED before any buffer for it exists;
//! - the message's bytes are reserved from one server-wide budget
//!   (`max_request_bytes_in_flight`) before they are buffered; a message that does not
//!   fit is refused UNAVAILABLE at once. A unary call keeps its reservation until it
//!   is answered (its decoded tensors live that long); a stream's message keeps it until
//!   the next message starts or the stream ends;
//! - the call's deadline (its `grpc-timeout`, bounded by the server's deadline policy)
//!   runs from the HEADERS frame, so a body still arriving at the deadline is answered
//!   DEADLINE_EXCEEDED then, and a message that does not arrive in full within the
//!   body-read timeout is answered DEADLINE_EXCEEDED and its buffer freed.
//!
//! Errors of a request body are `tonic::Status` values: tonic answers the call with the
//! status it finds in the body's error.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::Status;

use sluice_proto::codec::{DecodeBudget, DECODE_BUDGET};

use crate::config::DeadlinePolicy;
use crate::config::EdgeLimits;
use crate::error::RETRY_PUSHBACK_HEADER;
use crate::metrics::{self, TransportRefusal};

mod body;
mod budget;
mod early;
mod service;
#[cfg(test)]
mod tests;
mod tls;

pub use body::*;
pub use budget::*;
pub use early::*;
pub use service::*;
pub use tls::{Conn, Tls, ALPN_H2, ALPN_HTTP1};

/// When the server received a call's HEADERS frame; request extensions carry it to the
/// handlers, whose deadlines count from it.
#[derive(Debug, Clone, Copy)]
pub struct RequestStart(pub Instant);

// ---------------------------------------------------------------------------------------
// Accepting connections
// ---------------------------------------------------------------------------------------

/// Lets a repeated log line through at most once per `every`, counting what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimiter {
    pub fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)`: log now, mentioning the `n` occurrences held back since the last line.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// Accept errors (out of file descriptors, out of memory) wait this long first, doubling
/// up to [`ACCEPT_BACKOFF_MAX`] while they repeat, so a full descriptor table does not
/// spin a core.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per kind of accept trouble in this period.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The accept loop of one port: connections up to a cap, errors backed off.
pub struct Acceptor {
    listener: TcpListener,
    /// `grpc`, `http` or `metrics`: the metrics' `port` label.
    port: &'static str,
    slots: Arc<Semaphore>,
    cap: usize,
    open: Arc<AtomicUsize>,
    backoff: Duration,
    error_log: LogLimiter,
    refusal_log: LogLimiter,
}

/// A connection's place under its port's cap; released when the connection closes.
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
    port: &'static str,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let before = self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::open_connections(self.port, before.saturating_sub(1));
    }
}

impl Acceptor {
    pub fn new(listener: TcpListener, port: &'static str, max_connections: usize) -> Acceptor {
        let cap = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Acceptor {
            listener,
            port,
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            open: Arc::new(AtomicUsize::new(0)),
            backoff: ACCEPT_BACKOFF_MIN,
            error_log: LogLimiter::new(ACCEPT_LOG_EVERY),
            refusal_log: LogLimiter::new(ACCEPT_LOG_EVERY),
        }
    }

    /// The next connection that fits under the cap. A connection over the cap is closed
    /// at once (the client sees the connection close, not a hang).
    pub async fn next(&mut self) -> (TcpStream, ConnectionSlot) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                        metrics::transport_refusal(self.port, TransportRefusal::ConnectionLimit);
                        if let Some(held_back) = self.refusal_log.allow(Instant::now()) {
                            tracing::warn!(
                                port = self.port, cap = self.cap, %peer, held_back,
                                "connection limit reached: closing new connections"
                            );
                        }
                        drop(stream);
                        continue;
                    };
                    let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
                    metrics::open_connections(self.port, open);
                    let slot = ConnectionSlot {
                        _permit: permit,
                        open: self.open.clone(),
                        port: self.port,
                    };
                    return (stream, slot);
                }
                Err(e) => {
                    if let Some(held_back) = self.error_log.allow(Instant::now()) {
                        tracing::warn!(
                            port = self.port, error = %e, held_back,
                            retry_in_ms = self.backoff.as_millis() as u64,
                            "cannot accept a connection"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Idle connections
// ---------------------------------------------------------------------------------------

/// Calls in progress on one connection, and since when it has had none.
pub struct Activity {
    /// Whether any call has started on the connection.
    used: std::sync::atomic::AtomicBool,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    changed: Notify,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            used: std::sync::atomic::AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            changed: Notify::new(),
        })
    }

    /// A call starts; it ends when the returned guard drops.
    pub fn start(self: &Arc<Activity>) -> ActiveCall {
        self.used.store(true, Ordering::Release);
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveCall(self.clone())
    }

    /// Resolves once the connection has had no call in progress for `timeout`, or for
    /// `first_call` when no call has ever started on it (a client that connects and
    /// sends nothing, or half a handshake, holds a connection slot only that long).
    pub async fn idle_for(&self, first_call: Duration, timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between still wakes us.
            changed.as_mut().enable();
            if self.active.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let since = *self.idle_since.lock().expect("never poisoned");
            let timeout = if self.used.load(Ordering::Acquire) {
                timeout
            } else {
                first_call
            };
            tokio::select! {
                _ = tokio::time::sleep_until(since + timeout) => {
                    let still = self.active.load(Ordering::Acquire) == 0
                        && *self.idle_since.lock().expect("never poisoned") == since;
                    if still {
                        return;
                    }
                }
                _ = changed => {}
            }
        }
    }
}

/// How long a connection closing for idleness may take to say goodbye (GOAWAY, or a
/// handshake it never finished) before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// One call in progress on a connection.
pub struct ActiveCall(Arc<Activity>);

impl Drop for ActiveCall {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("never poisoned") = Instant::now();
        }
        self.0.changed.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------
// The budget of request bytes in flight
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// gRPC message framing
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Request bodies of gRPC calls
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// The gRPC edge service
// ---------------------------------------------------------------------------------------
