//! The gateway's domain facade: what the API handlers call. It owns the repository and
//! the server's lifecycle flags (ready, shutting down, live), and records per-request
//! metrics. No protocol types here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::Error;
use crate::metrics;
use crate::model::{Admission, InferRequest, InferResponse, LoadedModel};
use crate::repository::Repository;

pub struct Gateway {
    pub repository: Repository,
    ready: AtomicBool,
    shutting_down: AtomicBool,
    /// Cancelled when shutdown begins, for work that must stop waiting for more.
    stopping: tokio_util::sync::CancellationToken,
    /// Inference requests admitted and not yet answered.
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts one admitted request until it is answered (or its caller goes away).
struct InFlight<'a>(&'a Gateway);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let before = self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        metrics::in_flight(before - 1);
        if before == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The repository, for the tasks that keep it current (repository polling).
impl AsRef<Repository> for Gateway {
    fn as_ref(&self) -> &Repository {
        &self.repository
    }
}

impl Gateway {
    pub fn new(repository: Repository) -> Arc<Gateway> {
        Arc::new(Gateway {
            repository,
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            stopping: tokio_util::sync::CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        })
    }

    /// Live: the process answers and no loaded model is wedged (every instance stuck in
    /// an execution past `max_execution_secs`, none loading, no room to start one). Such
    /// a model serves again only if a stuck execution returns, so the orchestrator had
    /// better restart the process.
    pub fn is_live(&self) -> bool {
        !self.repository.loaded().iter().any(|m| m.is_wedged())
    }

    /// Ready: start-up finished and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutting_down.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// From now on inference is refused with UNAVAILABLE and readiness is false.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.stopping.cancel();
    }

    /// Cancelled once shutdown begins: open streams stop reading new requests.
    pub fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.stopping.clone()
    }

    /// Resolves once no admitted inference request is left (after `begin_shutdown`,
    /// none are admitted any more).
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn model(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, Error> {
        self.repository.get(name, version)
    }

    /// Run one admitted request on the version admission chose, and account for it.
    pub async fn infer(
        &self,
        request: InferRequest,
        admission: Admission,
    ) -> Result<InferResponse, Error> {
        let start = Instant::now();
        let model = admission.model.clone();
        let result = self.run(request, admission).await;
        self.account(&model.spec.name, result.as_ref().map(|_| ()), start);
        result
    }

    /// Record one request's outcome under its model's name (an unknown name under one
    /// label, so that clients cannot grow the metrics without bound).
    pub fn account(&self, name: &str, result: Result<(), &Error>, start: Instant) {
        let label = if self.repository.is_known(name) {
            name
        } else {
            metrics::UNKNOWN_MODEL
        };
        let outcome = match result {
            Ok(()) => "success",
            Err(e) => e.kind(),
        };
        metrics::request(label, outcome, start.elapsed());
    }

    async fn run(
        &self,
        request: InferRequest,
        admission: Admission,
    ) -> Result<InferResponse, Error> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        metrics::in_flight(before + 1);
        let _counted = InFlight(self);
        // Checked after counting: a drain that saw zero cannot miss this request.
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let model = admission.model.clone();
        model.infer(request, admission).await
    }
}
