//! The gateway's domain facade: what the API handlers call. It owns the repository and
//! the server's lifecycle flags (ready, shutting down, live), and records per-request
//! metrics. No protocol types here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::Error;
use crate::metrics;
use crate::model::{InferRequest, InferResponse, LoadedModel};
use crate::repository::Repository;

pub struct Gateway {
    pub repository: Repository,
    ready: AtomicBool,
    shutting_down: AtomicBool,
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

impl Gateway {
    pub fn new(repository: Repository) -> Arc<Gateway> {
        Arc::new(Gateway {
            repository,
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
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

    /// Run one inference request end to end and account for it.
    pub async fn infer(
        &self,
        name: &str,
        version: &str,
        request: InferRequest,
    ) -> Result<InferResponse, Error> {
        let start = Instant::now();
        let result = self.infer_inner(name, version, request).await;
        let label = if self.repository.is_known(name) {
            name
        } else {
            metrics::UNKNOWN_MODEL
        };
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.kind(),
        };
        metrics::request(label, outcome, start.elapsed());
        result
    }

    async fn infer_inner(
        &self,
        name: &str,
        version: &str,
        request: InferRequest,
    ) -> Result<InferResponse, Error> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        metrics::in_flight(before + 1);
        let _counted = InFlight(self);
        // Checked after counting: a drain that saw zero cannot miss this request.
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let model = self.model(name, version)?;
        model.infer(request).await
    }
}
