//! The admission settings: deadlines, shedding, the limits and the retry budget.

use std::time::Duration;

use tokio::time::Instant;

use crate::limit::LimitConfig;

/// Every admission setting (see the README's configuration table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    pub deadline: DeadlinePolicy,
    /// `false`: no concurrency limits and no predicted-wait refusals; only each model's
    /// `max_queue_size` bounds what waits (as in Triton).
    pub shedding: bool,
    /// Requests in flight in the whole server.
    pub max_in_flight: usize,
    pub model_limit: LimitConfig,
    pub retry: RetryBudget,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            deadline: DeadlinePolicy::default(),
            shedding: true,
            max_in_flight: 2048,
            model_limit: LimitConfig::default(),
            retry: RetryBudget::default(),
        }
    }
}

/// Server-side bounds on request deadlines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadlinePolicy {
    /// Applied to requests that bring no timeout of their own.
    pub default: Option<Duration>,
    /// No request may run longer than this, whatever it asks for.
    pub max: Option<Duration>,
}

impl DeadlinePolicy {
    /// The request's deadline: the smallest of its `grpc-timeout`, its `timeout`
    /// parameter and the configured default, capped by the configured maximum, counted
    /// from `received`. `None`: the request may run as long as it takes.
    pub fn deadline(
        &self,
        received: Instant,
        header: Option<Duration>,
        parameter: Option<Duration>,
    ) -> Option<Instant> {
        let asked = [header, parameter, self.default]
            .into_iter()
            .flatten()
            .min();
        let timeout = match (asked, self.max) {
            (Some(t), Some(max)) => Some(t.min(max)),
            (None, max) => max,
            (t, None) => t,
        };
        timeout.map(|t| received + t)
    }
}

/// How many retries the budget allows (tower's `TpsBudget`): `min_per_sec` always, plus
/// `percent` of the requests of the last `ttl`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub ttl: Duration,
    pub min_per_sec: u32,
    pub percent: f32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            percent: 0.2,
        }
    }
}
