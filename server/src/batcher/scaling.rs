//! How many instances the model runs: a cold start when work arrives at zero, one more
//! under queue pressure, idle ones retired, stuck ones replaced.

use std::time::Duration;

use tokio::time::Instant;

use super::actor::Actor;
use crate::metrics;

/// How many instances a model keeps, and how long one execution may run before its
/// instance is given up on (from its config `parameters` and server defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaling {
    /// Instances kept loaded however idle (0: the model scales to zero).
    pub min_instances: usize,
    /// `instance_group.count`: the most instances the pool grows to under queue pressure.
    pub max_instances: usize,
    /// An instance idle this long is unloaded, down to `min_instances`.
    pub idle_timeout: Duration,
    /// An instance whose execution has run this long is stuck (`None`: never).
    pub max_execution: Option<Duration>,
}

impl Actor {
    /// Work is waiting and no instance is free: start one more, one load at a time.
    pub(super) fn grow(&mut self, now: Instant) {
        if self.is_wedged() {
            // Nothing will run this work: answer it now rather than at its deadline.
            let reason = self.wedged_reason();
            self.queue.fail_all(&reason);
            return;
        }
        if self.pool.loading() > 0 || !self.pool.has_room(self.scaling.max_instances) {
            return;
        }
        let cold = self.pool.live() == 0;
        match self.pool.spawn() {
            Ok(_) if cold => {
                self.cold_since = Some(now);
                metrics::cold_start(&self.model);
                tracing::info!(model = %self.model, waiting = self.queue.len(), "cold start: loading an instance");
            }
            Ok(_) => {
                tracing::debug!(model = %self.model, live = self.pool.live(), "queue pressure: loading another instance")
            }
            Err(reason) => self.queue.fail_all(&reason.to_string()),
        }
    }

    /// Take instances whose execution has run past `max_execution` out of service and
    /// load replacements up to the instances the model keeps (at least one), as far as
    /// the pool has room: stuck threads count toward its cap, so a model that hangs
    /// every time stops getting new instances.
    pub(super) fn watch(&mut self, now: Instant) {
        let Some(limit) = self.scaling.max_execution else {
            return;
        };
        if self.pool.detect_stuck(now, limit) == 0 {
            return;
        }
        let keep = self.scaling.min_instances.max(1);
        while self.pool.live() < keep && self.pool.has_room(self.scaling.max_instances) {
            match self.pool.spawn() {
                Ok(id) => {
                    tracing::warn!(model = %self.model, instance = id, stuck = self.pool.stuck(), "loading an instance to replace a stuck one")
                }
                Err(reason) => {
                    tracing::error!(model = %self.model, %reason, "cannot start an instance to replace a stuck one");
                    break;
                }
            }
        }
        if self.is_wedged() {
            tracing::error!(model = %self.model, stuck = self.pool.stuck(),
                "every instance is stuck and no replacement can start: the server reports itself not live");
            let reason = self.wedged_reason();
            self.queue.fail_all(&reason);
        }
    }

    /// No instance in service or loading, stuck ones only, and no room for another.
    pub(super) fn is_wedged(&self) -> bool {
        self.pool.stuck() > 0
            && self.pool.live() == 0
            && !self.pool.has_room(self.scaling.max_instances)
    }

    pub(super) fn wedged_reason(&self) -> String {
        format!(
            "every instance is stuck ({} running past max_execution_secs) and no replacement can start",
            self.pool.stuck()
        )
    }
}
